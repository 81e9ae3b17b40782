//! The market commands: `image push`, `submit`, `status`, `cancel`,
//! `providers`, `market` (`watch`, `logs`, `fetch` and the books' commands
//! have their own modules).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmlot_cas::{BlockStore, StoreOptions, push_file};
use vmlot_schemas::market::{
    ApiError, GuestState, Heartbeat, Image, JobRef, JobState, JobStatus, MarketView, Reply, SegmentCount,
    SubmitJob, Submitted,
};
use vmlot_schemas::{
    Chunking, HypervisorKind, JobId, ManifestId, Money, ObjectKind, ProviderId, VmConfig, WIRE_VERSION,
    subjects,
};

use crate::cli::Cli;

/// The broker refused the request (exit code 5; 6 when something named does not exist).
#[derive(Debug)]
pub struct Refused(pub ApiError);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused ({}): {}", self.0.code, self.0.message)
    }
}

impl std::error::Error for Refused {}

/// The job is not done: still running, or ended other than done (exit code 8).
#[derive(Debug)]
pub struct JobDidNotFinish(pub JobState);

impl std::fmt::Display for JobDidNotFinish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            JobState::Running => f.write_str("the job is still running"),
            state => write!(f, "job ended {state:?}"),
        }
    }
}

impl std::error::Error for JobDidNotFinish {}

/// Sends one API request and decodes its reply.
pub async fn request<T: Serialize, R: DeserializeOwned>(
    client: &async_nats::Client,
    endpoint: &str,
    body: &T,
) -> Result<R> {
    let payload = serde_json::to_vec(body)?;
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(subjects::api(endpoint), payload.into()),
    )
    .await
    .context("the broker did not answer within 30 s")?
    .with_context(|| format!("request {endpoint}: is a broker running?"))?;
    match serde_json::from_slice::<Reply<R>>(&reply.payload).context("undecodable broker reply")? {
        Reply::Ok(value) => Ok(value),
        Reply::Error(err) => Err(Refused(err).into()),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum HypervisorArg {
    Qemu,
    Xen,
    Synthetic,
}

/// The files and VM of an image.
#[derive(Args)]
pub struct ImageArgs {
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long = "disk")]
    pub disks: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "qemu")]
    pub hypervisor: HypervisorArg,
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
}

/// Pushes an image's files (only cold blocks cross the wire) and describes it.
pub async fn push_image(cli: &Cli, args: &ImageArgs) -> Result<Image> {
    let kernel = args.kernel.as_ref().context("--kernel is required")?;
    let store = BlockStore::open(cli.connect().await?, StoreOptions::default()).await?;
    let none = HashSet::new();
    let push = async |path: &Path, kind| -> Result<ManifestId> {
        let report = push_file(&store, None, path, kind, Chunking::FIXED_4K, &none)
            .await
            .with_context(|| format!("pushing {}", path.display()))?;
        Ok(report.manifest_id)
    };
    let kernel = push(kernel, ObjectKind::Kernel).await?;
    let initrd = match &args.initrd {
        Some(p) => Some(push(p, ObjectKind::Initrd).await?),
        None => None,
    };
    let mut disks = Vec::new();
    for d in &args.disks {
        disks.push(push(d, ObjectKind::Disk).await?);
    }
    let hypervisor = match args.hypervisor {
        HypervisorArg::Qemu => HypervisorKind::Qemu,
        HypervisorArg::Xen => HypervisorKind::Xen,
        HypervisorArg::Synthetic => HypervisorKind::Synthetic,
    };
    Ok(Image {
        vm: VmConfig {
            hypervisor,
            arch: args.arch.clone(),
            memory_mib: args.memory,
            vcpus: args.vcpus,
            cmdline: args.cmdline.clone(),
        },
        kernel,
        initrd,
        disks,
    })
}

/// `vmlot submit`.
#[derive(Args)]
pub struct SubmitArgs {
    /// An image description written by `vmlot image push -o`; or give the files below.
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub files: ImageArgs,
    /// Segment length T in seconds.
    #[arg(long)]
    pub segment_seconds: u32,
    /// Number of segments; omit with --until-halt.
    #[arg(long, conflicts_with = "until_halt")]
    pub segments: Option<u32>,
    #[arg(long)]
    pub until_halt: bool,
    #[arg(long, default_value_t = 1)]
    pub redundancy: u32,
    /// Most paid for one segment.
    #[arg(long)]
    pub reserve: Decimal,
    /// Most paid in all.
    #[arg(long)]
    pub budget: Decimal,
    #[arg(long, default_value = "CRD")]
    pub unit: String,
    #[arg(long, env = "VMLOT_ACCOUNT", default_value = "default")]
    pub account: String,
    /// Follow the job to its end, like `vmlot watch`.
    #[arg(long)]
    pub watch: bool,
}

pub async fn submit(cli: &Cli, args: &SubmitArgs) -> Result<()> {
    let image = match &args.image {
        Some(path) => {
            serde_json::from_slice(&std::fs::read(path)?).context("reading the image description")?
        }
        None => push_image(cli, &args.files).await?,
    };
    let segments = match (args.segments, args.until_halt) {
        (Some(n), false) => SegmentCount::Count(n),
        (None, true) => SegmentCount::UntilHalt,
        _ => bail!("give --segments N or --until-halt"),
    };
    let spec = vmlot_schemas::market::JobSpec {
        image,
        segment_seconds: args.segment_seconds,
        segments,
        redundancy: args.redundancy,
        reserve_price: Money::new(args.reserve, args.unit.clone()),
        budget: Money::new(args.budget, args.unit.clone()),
        account: args.account.clone(),
    };
    let client = cli.connect().await?;
    let submitted: Submitted = request(
        &client,
        "submit",
        &SubmitJob {
            version: WIRE_VERSION,
            spec,
        },
    )
    .await?;
    if cli.json && !args.watch {
        println!("{}", serde_json::to_string(&submitted)?);
    } else if !cli.json {
        println!("job {}", submitted.job);
    }
    if args.watch {
        crate::watch::watch(cli, &client, submitted.job).await?;
    }
    Ok(())
}

/// A job's record, as the broker's `status` endpoint returns it.
pub async fn job_status(client: &async_nats::Client, job: JobId) -> Result<JobStatus> {
    request(
        client,
        "status",
        &JobRef {
            version: WIRE_VERSION,
            job,
        },
    )
    .await
}

/// `vmlot status`: the job's record, with provider names where the broker knows them.
pub async fn show_status(cli: &Cli, job: JobId) -> Result<()> {
    let client = cli.connect().await?;
    let status = job_status(&client, job).await?;
    let names = if cli.json {
        Default::default()
    } else {
        crate::watch::provider_names(&client).await
    };
    print_status(cli, &status, &names)
}

pub fn print_status(cli: &Cli, s: &JobStatus, names: &HashMap<ProviderId, String>) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    let total = match s.spec.segments {
        SegmentCount::Count(n) => n.to_string(),
        SegmentCount::UntilHalt => "until halt".into(),
    };
    println!("job       {}", s.job);
    println!(
        "state     {:?}{}",
        s.state,
        s.end_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!("segments  {} of {}", s.settled.len(), total);
    println!("spent     {} of {}", s.spent, s.spec.budget);
    if s.waiting_for_providers {
        println!("waiting   for providers (no bid on the last offer)");
    }
    if let Some(open) = &s.open_lot {
        println!(
            "open lot  segment {} attempt {} ({} awarded)",
            open.lot.segment,
            open.lot.attempt,
            open.awarded.len()
        );
    }
    if s.settled.is_empty() {
        return Ok(());
    }
    // Wall time is the provider's: fetch + start + run + save + upload.
    println!(
        "\n{:>4} {:>3}  {:<26}  {:>10}  {:>7}  {:>7}  {:>10}  {:>10}  guest",
        "seg", "try", "provider", "price", "wall s", "run s", "fetched", "sent"
    );
    let (mut fetched, mut sent, mut wall) = (0u64, 0u64, 0u64);
    for seg in &s.settled {
        let who = match names.get(&seg.provider) {
            Some(name) => format!("{name} ({})", crate::watch::short(&seg.provider)),
            None => seg.provider.to_string(),
        };
        let guest = match &seg.guest {
            GuestState::Running { .. } => "running".to_string(),
            GuestState::Halted => "halted".to_string(),
            GuestState::Crashed { reason } => format!("crashed: {reason}"),
        };
        println!(
            "{:>4} {:>3}  {:<26}  {:>10}  {:>7.2}  {:>7.2}  {:>10}  {:>10}  {}",
            seg.segment,
            seg.attempt,
            who,
            seg.price.to_string(),
            crate::watch::wall_ms(seg) as f64 / 1000.0,
            seg.timings.run_ms as f64 / 1000.0,
            human_bytes(seg.fetched_bytes),
            human_bytes(seg.sent_bytes),
            guest
        );
        fetched += seg.fetched_bytes;
        sent += seg.sent_bytes;
        wall += crate::watch::wall_ms(seg);
    }
    println!(
        "{:>4} {:>3}  {:<26}  {:>10}  {:>7.2}  {:>7}  {:>10}  {:>10}",
        "all",
        "",
        "",
        s.spent.to_string(),
        wall as f64 / 1000.0,
        "",
        human_bytes(fetched),
        human_bytes(sent)
    );
    Ok(())
}

/// Bytes for people: B, KiB, MiB, GiB with one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub async fn cancel(cli: &Cli, job: JobId) -> Result<()> {
    let client = cli.connect().await?;
    let s: JobStatus = request(
        &client,
        "cancel",
        &JobRef {
            version: WIRE_VERSION,
            job,
        },
    )
    .await?;
    print_status(cli, &s, &HashMap::new())
}

pub async fn providers(cli: &Cli) -> Result<()> {
    let client = cli.connect().await?;
    let list: Vec<Heartbeat> = request(&client, "providers", &()).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<16}  {:<20}  {:>6}  {:>5}  idle",
        "provider", "name", "hypervisors", "memory", "slots"
    );
    for p in list {
        let kinds: Vec<&str> = p.hypervisors.iter().map(|h| h.as_str()).collect();
        println!(
            "{:<36}  {:<16}  {:<20}  {:>6}  {:>2}/{:<2}  {}",
            p.provider.to_string(),
            p.name,
            kinds.join(","),
            p.memory_mib,
            p.free_slots,
            p.slots,
            p.idle
        );
    }
    Ok(())
}

pub async fn market(cli: &Cli) -> Result<()> {
    let client = cli.connect().await?;
    let view: MarketView = request(&client, "market", &()).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "running jobs {}, providers {}, open lots {}",
        view.running_jobs,
        view.providers.len(),
        view.open_lots.len()
    );
    for open in view.open_lots {
        println!(
            "  lot {} job {} segment {} attempt {} reserve {} awarded {}",
            open.lot.lot,
            open.lot.job,
            open.lot.segment,
            open.lot.attempt,
            open.lot.reserve_price,
            open.awarded.len()
        );
    }
    Ok(())
}
