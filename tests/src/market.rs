//! A whole market on loopback for integration tests and benchmarks: a
//! real nats-server (or a JetStream cluster of them, [`Market::on_cluster`]),
//! the `vmlot-broker` binary as a process (so a test can SIGKILL it),
//! providers as processes or (for load) as tasks of this process, and the
//! job API called through the client library, as the CLI calls it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rust_decimal::Decimal;
use vmlot_client::Api;
use vmlot_client::api::{Answer, Submit};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::ledger::{Account, CreditRequest, Settlement};
use vmlot_schemas::market::{Image, JobSpec, JobStatus, SubmitJob, Submitted};
use vmlot_schemas::{Chunking, HypervisorKind, JobId, Money, ObjectKind, VmConfig, WIRE_VERSION};

use crate::in_process::{InProcessOptions, InProcessProviders};
pub use crate::spec::ProviderSpec;
use crate::{NatsCluster, NatsServer, Process};

/// The operator every test market has: funds accounts, sees every job.
pub const TEST_OPERATOR: &str = "house";

/// Broker flags that keep tests quick: short bid windows and deadlines.
pub fn fast_broker_args() -> Vec<String> {
    ["--bid-window-ms", "300", "--transfer-allowance-s", "3"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// How long [`Market::status`] waits for a broker to answer (tests restart it).
pub const STATUS_PATIENCE: Duration = Duration::from_secs(30);

/// The market's processes and tasks; everything stops on drop.
pub struct Market {
    /// The market's server; on a cluster, its first node. Every process
    /// and connection of the market is given its
    /// [`NatsServer::client_urls`]: on a cluster, every node's.
    pub server: NatsServer,
    /// On a cluster, its other nodes ([`Market::nodes`] lists them all).
    pub peers: Vec<NatsServer>,
    pub broker: Process,
    /// Brokers beside the first ([`Market::add_broker`]), sharing its jobs.
    pub brokers: Vec<Process>,
    pub providers: Vec<Process>,
    /// OS Farm, when a test started it ([`Market::add_farm`]).
    pub farm: Option<Process>,
    /// Providers running as tasks of this process ([`Market::add_in_process_providers`]).
    pub in_process: InProcessProviders,
    pub dir: tempfile::TempDir,
    /// The job API as each caller a test has used, on one connection each.
    apis: tokio::sync::Mutex<std::collections::HashMap<Caller, Api>>,
    /// The first broker's flags (with its credentials), which every
    /// broker added later is given too.
    broker_args: Vec<String>,
    /// On a cluster, the directory of its nodes' stores: removed last,
    /// after every node has stopped.
    _cluster_dir: Option<tempfile::TempDir>,
}

impl Market {
    /// A new nats-server, the broker with `broker_args`, and `providers` as processes.
    pub fn start(broker_args: Vec<String>, providers: &[ProviderSpec]) -> Result<Self> {
        Self::on(NatsServer::start()?, broker_args, providers)
    }

    /// The same on a server already running (a benchmark measures it alone first).
    pub fn on(server: NatsServer, broker_args: Vec<String>, providers: &[ProviderSpec]) -> Result<Self> {
        Self::on_nodes(None, server, Vec::new(), broker_args, providers)
    }

    /// A new JetStream cluster of `nodes` servers, the broker with
    /// `broker_args` keeping `nodes` replicas of everything, and `providers`.
    pub async fn start_on_cluster(
        nodes: usize,
        broker_args: Vec<String>,
        providers: &[ProviderSpec],
    ) -> Result<Self> {
        Self::on_cluster(NatsCluster::start(nodes)?, broker_args, providers).await
    }

    /// The market on a running cluster, authenticated as on one server:
    /// once the nodes have elected a JetStream meta leader, the broker
    /// starts with `broker_args` and `--replicas` the cluster's size (so
    /// every stream and bucket it, the block store and the books create has
    /// a copy on each node); the broker, the providers, the `vmlot` CLI and
    /// the harness's own connections are given every node's URL.
    pub async fn on_cluster(
        cluster: NatsCluster,
        broker_args: Vec<String>,
        providers: &[ProviderSpec],
    ) -> Result<Self> {
        crate::wait_jetstream(&cluster.client().await?).await?;
        let replicas = cluster.servers.len();
        let (mut nodes, dir) = cluster.into_parts();
        let server = nodes.remove(0);
        let broker_args = [broker_args, vec!["--replicas".into(), replicas.to_string()]].concat();
        Self::on_nodes(Some(dir), server, nodes, broker_args, providers)
    }

    /// `cluster_dir` comes first: should this fail, parameters drop in
    /// reverse order, so the nodes stop before their directory goes.
    fn on_nodes(
        cluster_dir: Option<tempfile::TempDir>,
        server: NatsServer,
        peers: Vec<NatsServer>,
        broker_args: Vec<String>,
        providers: &[ProviderSpec],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("vmlot-market-").tempdir()?;
        let books = match server.auth() {
            crate::Auth::Secured => vec![
                "--books-creds".into(),
                server.deployment().books_creds_path().display().to_string(),
            ],
            crate::Auth::Open => vec![],
        };
        let broker_args = [broker_args, books].concat();
        let broker = Process::start(
            "vmlot-broker",
            "broker",
            server.client_urls(),
            server.access(Role::Broker, "broker")?.as_deref(),
            &broker_args,
            dir.path(),
        )?;
        let mut market = Self {
            server,
            peers,
            broker,
            brokers: Vec::new(),
            broker_args,
            providers: Vec::new(),
            farm: None,
            in_process: InProcessProviders::default(),
            dir,
            apis: Default::default(),
            _cluster_dir: cluster_dir,
        };
        for spec in providers {
            market.add_provider(spec)?;
        }
        Ok(market)
    }

    /// Another broker named `id` (its `--broker-id`) on the market's
    /// servers with the first broker's flags and `extra`: the brokers
    /// share the jobs' partitions by their leases.
    pub fn add_broker(&mut self, id: &str, extra: &[String]) -> Result<&mut Process> {
        // The first broker's own id is not this one's.
        let mut inherited = Vec::new();
        let mut args = self.broker_args.iter();
        while let Some(arg) = args.next() {
            if arg == "--broker-id" {
                args.next();
            } else {
                inherited.push(arg.clone());
            }
        }
        let args = [inherited, extra.to_vec(), vec!["--broker-id".into(), id.into()]].concat();
        let broker = Process::start(
            "vmlot-broker",
            id,
            self.server.client_urls(),
            self.server.access(Role::Broker, "broker")?.as_deref(),
            &args,
            self.dir.path(),
        )?;
        self.brokers.push(broker);
        Ok(self.brokers.last_mut().expect("just pushed"))
    }

    /// Starts OS Farm (`vmlot-farm`) as the house, with the broker's
    /// credentials: its boot kit from `make farm-boot`, its downloaded
    /// packages kept in `.tools/farm-apt-cache` across runs (a build
    /// downloads only what no earlier one did).
    pub fn add_farm(&mut self) -> Result<&mut Process> {
        let boot = crate::repo_root().join(".tools/farm-boot");
        for f in ["vmlinuz", "initrd.cpio.gz"] {
            anyhow::ensure!(
                boot.join(f).is_file(),
                "{} missing: run `make farm-boot`",
                boot.join(f).display()
            );
        }
        let args: Vec<String> = vec![
            "--work-dir".into(),
            self.dir.path().join("farm").display().to_string(),
            "--apt-cache".into(),
            crate::repo_root()
                .join(".tools/farm-apt-cache")
                .display()
                .to_string(),
            "--kernel".into(),
            boot.join("vmlinuz").display().to_string(),
            "--initrd".into(),
            boot.join("initrd.cpio.gz").display().to_string(),
        ];
        let farm = Process::start(
            "vmlot-farm",
            "farm",
            self.server.client_urls(),
            self.server.access(Role::Broker, "broker")?.as_deref(),
            &args,
            self.dir.path(),
        )?;
        Ok(self.farm.insert(farm))
    }

    /// Waits until the broker answers and `providers` providers have sent a heartbeat.
    pub async fn ready(&self, providers: usize) -> Result<()> {
        self.ready_within(providers, Duration::from_secs(30)).await
    }

    /// [`Market::ready`] with a time limit of its own (nested hosts boot slowly).
    pub async fn ready_within(&self, providers: usize, limit: Duration) -> Result<()> {
        let api = self.api().await;
        let seen = wait_for(limit, async || match api.providers().await {
            Ok(list) if list.len() >= providers => Some(()),
            _ => None,
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
            self.server.client_urls(),
            self.server
                .access(Role::Provider, &spec.id.to_string())?
                .as_deref(),
            &[args, spec.args.clone()].concat(),
            self.dir.path(),
        )?);
        Ok(())
    }

    /// Starts `specs` as synthetic providers in this process, each a task
    /// running the provider daemon on its own connection (a load of
    /// hundreds of providers without hundreds of processes).
    pub async fn add_in_process_providers(
        &mut self,
        specs: &[ProviderSpec],
        options: &InProcessOptions,
    ) -> Result<()> {
        self.in_process
            .add(&self.server, self.dir.path(), specs, options)
            .await
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An image for the synthetic driver: [`fake_kernel`] pushed to the
    /// store, `cmdline` its parameters (`synthetic.seed=…`, `synthetic.state_kib=…`).
    pub async fn push_synthetic_image(&self, cmdline: &str) -> Result<Image> {
        let store = vmlot_cas::BlockStore::join(
            self.server.client().await?,
            Default::default(),
            Some(std::time::Duration::from_secs(30)),
        )
        .await?;
        let kernel = fake_kernel(self.path())?;
        let pushed = vmlot_cas::push_file(
            &store,
            None,
            &kernel,
            ObjectKind::Kernel,
            Chunking::FIXED_4K,
            &HashSet::new(),
        )
        .await?;
        Ok(Image {
            vm: VmConfig {
                hypervisor: HypervisorKind::Synthetic,
                arch: "x86_64".into(),
                memory_mib: 16,
                vcpus: 1,
                cmdline: cmdline.into(),
            },
            kernel: pushed.manifest_id,
            initrd: None,
            disks: vec![],
        })
    }

    /// The job API as the operator ([`TEST_OPERATOR`]: sees every job,
    /// funds accounts), on one connection that rides out server restarts.
    pub async fn api(&self) -> Api {
        self.api_as(&Caller::new(Role::Operator, TEST_OPERATOR)).await
    }

    /// The job API as submitter `name`, with its own credentials.
    pub async fn submitter(&self, name: &str) -> Api {
        self.api_as(&Caller::new(Role::Submitter, name)).await
    }

    /// The job API as `caller`, with its own credentials and connection.
    pub async fn api_as(&self, caller: &Caller) -> Api {
        let mut apis = self.apis.lock().await;
        if let Some(api) = apis.get(caller) {
            return api.clone();
        }
        let client = self
            .server
            .client_as(caller.role, &caller.name)
            .await
            .expect("connect to the market's NATS");
        let api = Api::new(client, caller.clone());
        apis.insert(caller.clone(), api.clone());
        api
    }

    /// Credits `amount` CRD to user `account`, as the operator.
    pub async fn fund(&self, account: &str, amount: &str) -> Result<()> {
        fund(&self.api().await, account, amount).await
    }

    /// Stakes `amount` CRD for provider `id`: the operator credits its
    /// earnings account (its buy-in), and the provider, as itself, moves
    /// them into its deposit. What the deposit holds after it.
    pub async fn stake(&self, id: vmlot_schemas::ProviderId, amount: &str) -> Result<Decimal> {
        let money = Money::new(
            Decimal::from_str(amount).with_context(|| format!("amount {amount:?}"))?,
            "CRD",
        );
        let credit = CreditRequest {
            version: WIRE_VERSION,
            id: uuid::Uuid::new_v4(),
            account: Account::Provider(id),
            amount: money.clone(),
            memo: "buy-in".into(),
        };
        self.api().await.credit(&credit).await?;
        let provider = self.api_as(&Caller::new(Role::Provider, id.to_string())).await;
        let deposit = vmlot_client::api::DepositRequest {
            version: WIRE_VERSION,
            id: uuid::Uuid::new_v4(),
            amount: money,
        };
        let done = provider.call::<vmlot_client::api::Deposit>(&deposit).await?;
        Ok(done.deposit.amount)
    }

    /// Funds the spec's account with its budget and submits it as that
    /// account's submitter; the job.
    pub async fn submit(&self, spec: JobSpec) -> JobId {
        self.fund(&spec.account, &spec.budget.amount.to_string())
            .await
            .expect("funds credited");
        let submitted = self.try_submit(spec).await.expect("submit accepted");
        submitted.job
    }

    /// A submission as the spec's account's submitter, and the broker's
    /// answer (accepted or refused).
    pub async fn try_submit(&self, spec: JobSpec) -> Answer<Submitted> {
        let api = self.submitter(&spec.account).await;
        let request = SubmitJob {
            version: WIRE_VERSION,
            spec,
        };
        api.answer::<Submit>(&request)
            .await
            .expect("the broker answers submit")
    }

    /// A job's record; asks again while no broker answers (tests restart
    /// it) or its store is unavailable (a NATS node killed), for up to
    /// [`STATUS_PATIENCE`]. Any other refusal fails the test.
    pub async fn status(&self, job: JobId) -> JobStatus {
        let api = self.api().await;
        let reply = wait_for(STATUS_PATIENCE, async || match api.status(job).await {
            Ok(status) => Some(Ok(status)),
            Err(vmlot_client::CallError::Refused(refused)) if refused.code == "unavailable" => None,
            Err(vmlot_client::CallError::Refused(refused)) => Some(Err(refused)),
            Err(_) => None,
        })
        .await
        .expect("a broker answers status");
        reply.expect("status")
    }

    /// Waits until the job ends (in any final state); fails the test with
    /// its record and the logs after `limit`.
    pub async fn wait_final(&self, job: JobId, limit: Duration) -> JobStatus {
        match self.api().await.wait_final(job, limit).await {
            Ok(status) => status,
            Err(e) => panic!(
                "{e}: job {job} never ended\n{:#?}\n{}",
                self.status(job).await,
                self.logs()
            ),
        }
    }

    /// Waits until the ended job's escrow went back to its submitter (its
    /// last payments posted before that); its record then.
    pub async fn wait_refunded(&self, job: JobId) -> JobStatus {
        wait_for(Duration::from_secs(30), async || {
            let status = self.status(job).await;
            status.refunded.then_some(status)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: job {job} never refunded\n{}", self.logs()))
    }

    /// Every process log, for failure messages (on a cluster, the
    /// nodes' too).
    pub fn logs(&self) -> String {
        let mut out = format!("--- broker\n{}", tail(&self.broker.log()));
        for b in &self.brokers {
            out.push_str(&format!("\n--- broker {}\n{}", b.name(), tail(&b.log())));
        }
        for p in &self.providers {
            out.push_str(&format!("\n--- provider\n{}", tail(&p.log())));
        }
        if let Some(farm) = &self.farm {
            out.push_str(&format!("\n--- farm\n{}", tail(&farm.log())));
        }
        if !self.peers.is_empty() {
            for node in self.nodes() {
                // Without the retries of routes to a node that is down.
                let text = node.log();
                let log: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("Error trying to connect to route"))
                    .collect();
                out.push_str(&format!("\n--- nats {}\n{}", node.name(), tail(&log.join("\n"))));
            }
        }
        out
    }

    /// The market's NATS servers: its server, then a cluster's other nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &NatsServer> {
        std::iter::once(&self.server).chain(&self.peers)
    }

    /// The node named `name` (`n1`, `n2`, …), to kill or restart.
    pub fn node_mut(&mut self, name: &str) -> &mut NatsServer {
        std::iter::once(&mut self.server)
            .chain(&mut self.peers)
            .find(|n| n.name() == name)
            .unwrap_or_else(|| panic!("no NATS node {name}"))
    }

    /// Who is connected to the node named `name` now: `broker`, a
    /// provider process's name, or `test` (this process: the harness's
    /// own connections and in-process providers), one entry per connection.
    pub fn clients_on(&self, name: &str) -> Result<Vec<String>> {
        let node = self
            .nodes()
            .find(|n| n.name() == name)
            .with_context(|| format!("no NATS node {name}"))?;
        let processes: Vec<&Process> = std::iter::once(&self.broker)
            .chain(&self.brokers)
            .chain(&self.providers)
            .collect();
        let mut clients = Vec::new();
        for port in node.client_ports()? {
            let pid = crate::pid_of_connection(port, node.port());
            let who = match pid {
                Some(pid) if pid == std::process::id() => "test".to_string(),
                Some(pid) => processes
                    .iter()
                    .find(|p| p.pid() == Some(pid))
                    .map_or_else(|| format!("pid {pid}"), |p| p.name().to_string()),
                None => "?".to_string(),
            };
            clients.push(who);
        }
        clients.sort();
        Ok(clients)
    }

    /// `vmlot ARGS` as the market's operator.
    pub fn vmlot(&self, args: &[&str]) -> std::process::Output {
        self.vmlot_as(Role::Operator, TEST_OPERATOR, args)
    }

    /// `vmlot ARGS` with the credentials of `role`'s user `name`, given
    /// every node's URL.
    pub fn vmlot_as(&self, role: Role, name: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::workspace_binary("vmlot").expect("vmlot built"))
            .env("VMLOT_NATS", self.server.client_urls())
            .env("VMLOT_TLS_CA", self.server.tls_ca())
            .env("VMLOT_CREDS", self.server.creds(role, name).expect("credentials"))
            .args(args)
            .output()
            .expect("run vmlot")
    }

    /// The job's payments once its money is settled. The broker writes a
    /// segment's payment after the record that settles it, and the last
    /// one (the check restore, or a halting guest's segment) is in the
    /// same record that ends the job: a final record alone does not say
    /// the books have it. The refund comes after every payment the record
    /// holds, so this waits for that; the refunded record with them.
    pub async fn paid(&self, job: JobId) -> (JobStatus, Vec<Settlement>) {
        let refunded = self.wait_refunded(job).await;
        (refunded, payments(self.api().await.nats(), job).await)
    }

    /// Exactly one payment per settled segment (and check restore), to
    /// the result that settled it, at its price; the job's spending is
    /// their sum. Waits for the job's refund first ([`Market::paid`]).
    pub async fn assert_paid_once(&self, job: JobId) -> JobStatus {
        let (done, paid) = self.paid(job).await;
        let summary = || {
            paid.iter()
                .map(|p| {
                    format!(
                        "segment {} attempt {} to {} {}",
                        p.segment, p.attempt, p.provider, p.amount
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let segments: Vec<u32> = paid.iter().map(|p| p.segment).collect();
        // The settled segments, then the check restore if one ran.
        let recorded: Vec<_> = done.payments().collect();
        assert_eq!(
            segments.len(),
            recorded.len(),
            "one payment per settled segment; the books hold:\n{}\nthe record: {done:#?}",
            summary()
        );
        assert_eq!(
            segments.iter().copied().collect::<HashSet<u32>>(),
            (0..recorded.len() as u32).collect(),
            "each segment paid once; the books hold:\n{}",
            summary()
        );
        for p in &paid {
            let settled = recorded[p.segment as usize];
            assert_eq!(
                (p.provider, p.attempt, &p.amount),
                (settled.provider, settled.attempt, &settled.price),
                "segment {} paid to its settling result",
                p.segment
            );
        }
        let total: Decimal = paid.iter().map(|p| p.amount.amount).sum();
        assert_eq!(done.spent.amount, total);
        done
    }

    /// The books reconcile, checked by the library and by `vmlot ledger
    /// verify`.
    pub async fn assert_books_verify(&self) {
        let api = vmlot_ledger::BooksApi::for_server(self.server.client().await.unwrap()).await;
        let report = vmlot_ledger::verify::verify(&api).await.unwrap();
        assert!(report.ok(), "{:#?}\n{}", report.problems, self.logs());
        let out = self.vmlot(&["ledger", "verify"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }

    /// Every JetStream stream of the market (the store's, the results')
    /// and of the books' account (the ledger, and the KV buckets as their
    /// `KV_` streams), as the servers describe them now.
    pub async fn streams(&self) -> Result<Vec<async_nats::jetstream::stream::Info>> {
        let mut infos = Vec::new();
        for client in [self.server.client().await?, self.server.books_client().await?] {
            let js = async_nats::jetstream::new(client);
            let mut listed = js.streams();
            while let Some(info) = futures::StreamExt::next(&mut listed).await {
                infos.push(info?);
            }
        }
        Ok(infos)
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Credits `amount` CRD to user `account`, as the operator.
pub async fn fund(api: &Api, account: &str, amount: &str) -> Result<()> {
    let request = CreditRequest {
        version: WIRE_VERSION,
        id: uuid::Uuid::new_v4(),
        account: Account::User(account.to_string()),
        amount: Money::new(
            Decimal::from_str(amount).with_context(|| format!("amount {amount:?}"))?,
            "CRD",
        ),
        memo: "test funds".into(),
    };
    match api.credit(&request).await {
        Ok(_) => Ok(()),
        Err(vmlot_client::CallError::Refused(e)) => bail!("credit refused: {} {}", e.code, e.message),
        Err(e) => Err(e.into()),
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
    /// `VMLOT_PROVIDER_FAULT` for a provider that lies (the provider's
    /// `fault-injection` feature), e.g. `flip-ram-byte`.
    pub fault: Option<&'static str>,
    /// More lines for its settings file (e.g. a scavenger's `idle_load`).
    pub settings: String,
}

impl QemuProviderSpec {
    pub fn new(name: &str, price: &str) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            price: price.into(),
            accel: "tcg".into(),
            fault: None,
            settings: String::new(),
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
        std::fs::write(
            &config,
            format!("qemu_accel = {:?}\n{}", spec.accel, spec.settings),
        )?;
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
        let fault: Vec<(&str, &str)> = spec.fault.iter().map(|f| ("VMLOT_PROVIDER_FAULT", *f)).collect();
        self.providers.push(Process::start_with_env(
            "vmlot-provider",
            &spec.name,
            self.server.client_urls(),
            self.server
                .access(Role::Provider, &spec.id.to_string())?
                .as_deref(),
            &args,
            self.dir.path(),
            &fault,
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

/// A job's record as stored in the broker's KV bucket (readable while no
/// broker runs), through `client`, a connection to the books' account
/// ([`crate::NatsServer::books_client`]).
pub async fn read_job_record(client: &async_nats::Client, job: impl std::fmt::Display) -> Result<String> {
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("vmlot-jobs").await?;
    match kv.get(job.to_string()).await? {
        Some(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        None => bail!("no record of job {job}"),
    }
}

/// The job's record as the broker last wrote it (through `client`, the
/// books' connection).
pub async fn job_record(client: &async_nats::Client, job: vmlot_schemas::JobId) -> Result<JobStatus> {
    let text = read_job_record(client, job).await?;
    serde_json::from_str(&text).with_context(|| format!("job {job}'s record: {text}"))
}

/// The settlement payments of `job`, read from the books.
pub async fn payments(
    client: &async_nats::Client,
    job: vmlot_schemas::JobId,
) -> Vec<vmlot_schemas::ledger::Settlement> {
    let api = vmlot_ledger::BooksApi::for_server(client.clone()).await;
    vmlot_ledger::read::settlements(&api)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.job == job)
        .collect()
}
