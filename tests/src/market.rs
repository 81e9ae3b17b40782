//! A whole market on loopback for integration tests: a real nats-server,
//! the `vmlot-broker` and `vmlot-provider` binaries as processes (so a test
//! can SIGKILL them), and API calls as the CLI makes them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{NatsServer, Process};

/// The operator secret every test broker is started with.
pub const TEST_OPERATOR_TOKEN: &str = "vmlot-test-operator";

/// Broker flags that keep tests quick: short bid windows and deadlines.
pub fn fast_broker_args() -> Vec<String> {
    ["--bid-window-ms", "300", "--transfer-allowance-s", "3"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A provider of the synthetic driver (market tests; never a VM).
pub struct ProviderSpec {
    pub name: String,
    pub id: uuid::Uuid,
    pub price_per_second: String,
    pub min_price: String,
    pub hot_discount: String,
    pub slots: u32,
}

impl ProviderSpec {
    pub fn synthetic(name: &str, min_price: &str) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            price_per_second: "0".into(),
            min_price: min_price.into(),
            hot_discount: "0".into(),
            slots: 1,
        }
    }
}

/// The market's processes; everything stops on drop.
pub struct Market {
    pub server: NatsServer,
    pub broker: Process,
    pub providers: Vec<Process>,
    pub dir: tempfile::TempDir,
}

impl Market {
    pub fn start(broker_args: Vec<String>, providers: &[ProviderSpec]) -> Result<Self> {
        let server = NatsServer::start()?;
        let dir = tempfile::Builder::new().prefix("vmlot-market-").tempdir()?;
        let broker = Process::start("vmlot-broker", "broker", &server.url(), &broker_args, dir.path())?;
        let mut market = Self {
            server,
            broker,
            providers: Vec::new(),
            dir,
        };
        for spec in providers {
            market.add_provider(spec)?;
        }
        Ok(market)
    }

    /// Waits until the broker answers and `providers` providers have sent a heartbeat.
    pub async fn ready(&self, providers: usize) -> Result<()> {
        self.ready_within(providers, Duration::from_secs(30)).await
    }

    /// [`Market::ready`] with a time limit of its own (nested hosts boot slowly).
    pub async fn ready_within(&self, providers: usize, limit: Duration) -> Result<()> {
        let client = self.server.client().await?;
        let seen = wait_for(limit, async || {
            match api::<(), Vec<serde_json::Value>>(&client, "providers", &()).await {
                Ok(Ok(list)) if list.len() >= providers => Some(()),
                _ => None,
            }
        })
        .await;
        seen.map_err(|e| anyhow::anyhow!("market not ready: {e}\n{}", self.logs()))
    }

    pub fn add_provider(&mut self, spec: &ProviderSpec) -> Result<()> {
        let base = self.dir.path().join(&spec.name);
        let args: Vec<String> = vec![
            "--hypervisors".into(),
            "synthetic".into(),
            "--name".into(),
            spec.name.clone(),
            "--id".into(),
            spec.id.to_string(),
            "--price-per-second".into(),
            spec.price_per_second.clone(),
            "--min-price".into(),
            spec.min_price.clone(),
            "--hot-discount".into(),
            spec.hot_discount.clone(),
            "--slots".into(),
            spec.slots.to_string(),
            "--cache-dir".into(),
            base.join("cache").display().to_string(),
            "--work-dir".into(),
            base.join("work").display().to_string(),
        ];
        self.providers.push(Process::start(
            "vmlot-provider",
            &spec.name,
            &self.server.url(),
            &args,
            self.dir.path(),
        )?);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Credits `amount` CRD to user `account`, as the operator.
    pub async fn fund(&self, account: &str, amount: &str) -> Result<()> {
        fund(&self.server.client().await?, account, amount).await
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!("--- broker\n{}", tail(&self.broker.log()));
        for p in &self.providers {
            out.push_str(&format!("\n--- provider\n{}", tail(&p.log())));
        }
        out
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Credits `amount` CRD to user `account`, as the operator.
pub async fn fund(client: &async_nats::Client, account: &str, amount: &str) -> Result<()> {
    let request = serde_json::json!({
        "version": 1,
        "id": uuid::Uuid::new_v4(),
        "account": format!("user:{account}"),
        "amount": {"amount": amount, "unit": "CRD"},
        "memo": "test funds",
        "operator_token": TEST_OPERATOR_TOKEN,
    });
    match api::<_, serde_json::Value>(client, "credit", &request).await? {
        Ok(_) => Ok(()),
        Err(e) => bail!("credit refused: {} {}", e.code, e.message),
    }
}

/// One API call, decoded.
pub async fn api<T: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    endpoint: &str,
    body: &T,
) -> Result<Result<R, vmlot_schemas_reply::ApiError>> {
    let payload = serde_json::to_vec(body)?;
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(format!("vmlot.api.{endpoint}"), payload.into()),
    )
    .await??;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(ok) = value.get("ok") {
        return Ok(Ok(serde_json::from_value(ok.clone())?));
    }
    if let Some(err) = value.get("error") {
        return Ok(Err(serde_json::from_value(err.clone())?));
    }
    bail!("reply is neither ok nor error: {value}")
}

/// The error shape of the API, kept here so the harness does not depend on
/// the crate under test for decoding.
pub mod vmlot_schemas_reply {
    #[derive(Debug, serde::Deserialize)]
    pub struct ApiError {
        pub code: String,
        pub message: String,
    }
}

/// Polls `check` until it returns Some, or fails after `limit`.
pub async fn wait_for<T>(limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A small file to stand in as the kernel of a synthetic image.
pub fn fake_kernel(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("synthetic-kernel");
    std::fs::write(&path, b"not a kernel: the synthetic driver never boots anything")?;
    Ok(path)
}

/// A provider running real QEMU guests (the QEMU driver), asking the same
/// price for every segment.
pub struct QemuProviderSpec {
    pub name: String,
    pub id: uuid::Uuid,
    /// The provider's price per segment (its `min_price`; nothing per second,
    /// no discount for hot blocks), so who wins a lot is decided by price alone.
    pub price: String,
    /// QEMU accelerator (`auto`, `kvm`, `tcg`). Tests use `tcg`: the same
    /// on every machine, and no 5 s KVM probe in each provider's first segment.
    pub accel: String,
}

impl QemuProviderSpec {
    pub fn new(name: &str, price: &str) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            price: price.into(),
            accel: "tcg".into(),
        }
    }
}

impl Market {
    /// Starts a QEMU provider. Its segments run in [`Market::work_dir`].
    pub fn add_qemu_provider(&mut self, spec: &QemuProviderSpec) -> Result<()> {
        let base = self.dir.path().join(&spec.name);
        std::fs::create_dir_all(&base)?;
        // The accelerator has no flag: it comes from the settings file.
        let config = base.join("provider.toml");
        std::fs::write(&config, format!("qemu_accel = {:?}\n", spec.accel))?;
        let args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--hypervisors".into(),
            "qemu".into(),
            "--name".into(),
            spec.name.clone(),
            "--id".into(),
            spec.id.to_string(),
            "--price-per-second".into(),
            "0".into(),
            "--min-price".into(),
            spec.price.clone(),
            "--hot-discount".into(),
            "0".into(),
            "--slots".into(),
            "1".into(),
            "--cache-dir".into(),
            base.join("cache").display().to_string(),
            "--work-dir".into(),
            self.work_dir(&spec.name).display().to_string(),
        ];
        self.providers.push(Process::start(
            "vmlot-provider",
            &spec.name,
            &self.server.url(),
            &args,
            self.dir.path(),
        )?);
        Ok(())
    }

    /// Where the provider named `name` runs its segments.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name).join("work")
    }
}

/// Pids of the processes (other than this one) whose command line
/// contains `needle`, e.g. the QEMU of a provider's work directory.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs each process named by pid (QEMUs a killed provider left
/// behind: a machine that dies takes its guests with it).
pub fn kill_pids(pids: &[u32]) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// A job's record as stored in the broker's KV bucket (readable while no broker runs).
pub async fn read_job_record(client: &async_nats::Client, job: impl std::fmt::Display) -> Result<String> {
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("vmlot-jobs").await?;
    match kv.get(job.to_string()).await? {
        Some(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        None => bail!("no record of job {job}"),
    }
}

/// The settlement payments of `job`, read from the books.
pub async fn payments(
    client: &async_nats::Client,
    job: vmlot_schemas::JobId,
) -> Vec<vmlot_schemas::ledger::Settlement> {
    let js = async_nats::jetstream::new(client.clone());
    vmlot_ledger::read::settlements(&js)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.job == job)
        .collect()
}
