//! Deterministic segments (issue 14): the cost of running a guest as exact
//! counts of instructions, against plain TCG running the same guest to the
//! same end in the same run, and the cost of the canonical digest that
//! replicas are compared by, against plain SHA-1 and SHA-256 of the same
//! save file.
//!
//! Each round, with the provider's own QEMU driver and the hash-chain test
//! guest (which does a fixed amount of work and powers off):
//!
//! - plain: one segment under `-accel tcg` (no icount), boot to power-off;
//! - icount: one deterministic segment whose count is never reached, boot
//!   to power-off: what `-icount` and the counting plugin cost alone;
//! - exact: deterministic segments of `--segment-seconds` (converted at
//!   the market's `INSTRUCTIONS_PER_SECOND`) chained through their saves
//!   until the guest powers off: what a quorum job's provider runs, with
//!   its stops, saves and restores.
//!
//! Each save of the exact chain is then digested twice: as the provider
//! can (every page's SHA-256, from the file) and as the broker does
//! (`stored_save`: the save pushed to a block store on a real nats-server,
//! pages named by their blocks, never fetched), beside a whole-file SHA-1
//! and SHA-256 of the same bytes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha1::Digest as _;
use tokio_util::sync::CancellationToken;
use vmlot_cas::qemucanon::{canonical_digest, page_sha256};
use vmlot_cas::{BlockStore, StoreOptions, push_file};
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{Driver, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart};
use vmlot_schemas::market::INSTRUCTIONS_PER_SECOND;
use vmlot_schemas::{Chunking, HypervisorKind, ObjectKind, VmConfig};
use vmlot_tests::NatsServer;

use crate::baseline::guest_files;

#[derive(clap::Args)]
pub struct Args {
    /// Segment length T of the exact chain, in seconds of the market's rate.
    #[arg(long, default_value_t = 4)]
    segment_seconds: u64,
    /// Rounds of the three runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The guest's work: hash-chain steps (each hashes `--work-kib`).
    #[arg(long, default_value_t = 40)]
    steps: u32,
    #[arg(long, default_value_t = 256)]
    work_kib: u32,
    /// Directory with the test guest's vmlinuz and initrd.cpio.gz (default: .tools/guest).
    #[arg(long)]
    guest: Option<PathBuf>,
}

/// Longer than any run here: the guest powers off long before.
const NO_END: Duration = Duration::from_secs(900);
/// An instruction count the guest never reaches before it powers off.
const NEVER: u64 = 1 << 50;

/// What one round measured.
struct Round {
    plain: f64,
    icount: f64,
    exact_run: f64,
    exact_wall: f64,
    segments: usize,
    saves: Vec<SaveCost>,
}

struct SaveCost {
    bytes: u64,
    provider_digest: f64,
    broker_digest: f64,
    sha1: f64,
    sha256: f64,
}

pub async fn run(args: Args) -> Result<()> {
    if args.segment_seconds == 0 || args.rounds == 0 {
        bail!("--segment-seconds and --rounds must be at least 1");
    }
    let files = guest_files(args.guest.as_deref())?;
    let driver = QemuDriver::new(QemuConfig {
        binary: None,
        accel: Accel::Tcg,
        ..Default::default()
    });
    let server = NatsServer::start()?;
    let store = BlockStore::open(server.client().await?, StoreOptions::default()).await?;
    let root = tempfile::Builder::new()
        .prefix("vmlot-bench-deterministic-")
        .tempdir()?;
    let vm = VmConfig {
        hypervisor: HypervisorKind::Qemu,
        arch: "x86_64".into(),
        memory_mib: 128,
        vcpus: 1,
        cmdline: format!(
            "console=ttyS0 quiet loglevel=0 panic=-1 vmlot.steps={} vmlot.work_kib={}",
            args.steps, args.work_kib
        ),
    };
    let instructions = args.segment_seconds * INSTRUCTIONS_PER_SECOND;
    eprintln!(
        "deterministic: guest {} steps x {} KiB, exact segments of {instructions} instructions ({} s at {INSTRUCTIONS_PER_SECOND}/s), {} rounds",
        args.steps, args.work_kib, args.segment_seconds, args.rounds
    );
    let mut rounds = Vec::new();
    let mut consoles: Vec<Vec<u8>> = Vec::new();
    for r in 0..args.rounds {
        let dir = root.path().join(format!("round-{r}"));
        let plan = |start: SegmentStart, instructions: Option<u64>, name: &str| SegmentPlan {
            vm: vm.clone(),
            files: files.clone(),
            start,
            run_for: match instructions {
                Some(n) if n < NEVER => Duration::from_secs(args.segment_seconds),
                _ => NO_END,
            },
            instructions,
            workdir: dir.join(name),
            owner: None,
        };
        let plain = halted(&driver, &plan(SegmentStart::Boot, None, "plain")).await?;
        let icount = halted(&driver, &plan(SegmentStart::Boot, Some(NEVER), "icount")).await?;
        // The exact chain, to the guest's power-off.
        let (mut exact_run, mut exact_wall, mut saves, mut console) = (0.0, 0.0, Vec::new(), Vec::new());
        let mut start = SegmentStart::Boot;
        for k in 0.. {
            let began = Instant::now();
            let report = driver
                .run_segment(
                    &plan(start, Some(instructions), &format!("exact-{k}")),
                    CancellationToken::new(),
                )
                .await
                .with_context(|| format!("exact segment {k}"))?;
            exact_wall += began.elapsed().as_secs_f64();
            exact_run += report.run_time.as_secs_f64();
            console.extend_from_slice(&report.console);
            match report.end {
                SegmentEnd::Saved { machine_state, .. } => {
                    saves.push(save_cost(&store, &machine_state).await?);
                    let kept = dir.join(format!("state-{k}"));
                    std::fs::rename(&machine_state, &kept)?;
                    start = SegmentStart::Restore { machine_state: kept };
                }
                SegmentEnd::Halted => break,
                SegmentEnd::Crashed { reason } => bail!("the guest crashed in exact segment {k}: {reason}"),
            }
            if k > 1000 {
                bail!("the guest never powered off");
            }
        }
        if consoles.iter().any(|c| *c != console) {
            bail!("round {r}'s exact chain printed another console than round 0's");
        }
        consoles.push(console);
        let round = Round {
            plain: plain.run_time.as_secs_f64(),
            icount: icount.run_time.as_secs_f64(),
            exact_run,
            exact_wall,
            segments: saves.len() + 1,
            saves,
        };
        eprintln!(
            "round {r}: plain {:.2} s, icount {:.2} s, exact {} segments: run {:.2} s, wall {:.2} s",
            round.plain, round.icount, round.segments, round.exact_run, round.exact_wall
        );
        rounds.push(round);
        let _ = std::fs::remove_dir_all(&dir);
    }
    report(&args, instructions, &rounds);
    Ok(())
}

/// Runs `plan` to the guest's power-off.
async fn halted(driver: &QemuDriver, plan: &SegmentPlan) -> Result<SegmentReport> {
    let report = driver.run_segment(plan, CancellationToken::new()).await?;
    match report.end {
        SegmentEnd::Halted => Ok(report),
        other => bail!("the guest did not power off within one segment: {other:?}"),
    }
}

/// The digests of one save, timed.
async fn save_cost(store: &BlockStore, save: &std::path::Path) -> Result<SaveCost> {
    let bytes = std::fs::read(save)?;
    let timed = |f: &mut dyn FnMut()| {
        let began = Instant::now();
        f();
        began.elapsed().as_secs_f64()
    };
    let mut provider = Ok([0u8; 32]);
    let provider_digest = timed(&mut || provider = canonical_digest(&bytes[..], page_sha256(&bytes[..])));
    let provider = provider.context("canonical digest of the save file")?;
    let sha1 = timed(&mut || {
        std::hint::black_box(sha1::Sha1::digest(&bytes));
    });
    let sha256 = timed(&mut || {
        std::hint::black_box(sha2::Sha256::digest(&bytes));
    });
    let pushed = push_file(
        store,
        None,
        save,
        ObjectKind::MachineState,
        Chunking::FIXED_4K,
        &Default::default(),
    )
    .await?;
    let began = Instant::now();
    let broker = vmlot_broker::stored_save::canonical_digest(store, &pushed.manifest).await?;
    let broker_digest = began.elapsed().as_secs_f64();
    // The store names blocks by SHA-256: both ways give one digest.
    if provider != broker {
        bail!(
            "the broker's digest of {} differs from the file's",
            save.display()
        );
    }
    Ok(SaveCost {
        bytes: bytes.len() as u64,
        provider_digest,
        broker_digest,
        sha1,
        sha256,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(args: &Args, instructions: u64, rounds: &[Round]) {
    let plain = median(rounds.iter().map(|r| r.plain).collect());
    let icount = median(rounds.iter().map(|r| r.icount).collect());
    let exact_run = median(rounds.iter().map(|r| r.exact_run).collect());
    let exact_wall = median(rounds.iter().map(|r| r.exact_wall).collect());
    let saves: Vec<&SaveCost> = rounds.iter().flat_map(|r| &r.saves).collect();
    let per = |f: fn(&SaveCost) -> f64| median(saves.iter().map(|s| f(s)).collect());
    let bytes = median(saves.iter().map(|s| s.bytes as f64).collect());
    println!(
        "## Deterministic segments: {} hash-chain steps x {} KiB, 128 MiB, one vCPU; medians of {} rounds\n",
        args.steps,
        args.work_kib,
        rounds.len()
    );
    println!("| run (boot to the guest's power-off) | guest run s | vs plain TCG |");
    println!("| --- | ---: | ---: |");
    println!("| plain TCG (`-accel tcg`, the market's default) | {plain:.2} | 1.00 |");
    println!(
        "| icount + plugin, no stop | {icount:.2} | {:.2} |",
        icount / plain
    );
    println!(
        "| exact segments of {instructions} instructions ({} s), {} of them: run | {exact_run:.2} | {:.2} |",
        args.segment_seconds,
        rounds[0].segments,
        exact_run / plain
    );
    println!(
        "| the same, wall (QEMU start, restore, run, stop, save) | {exact_wall:.2} | {:.2} |\n",
        exact_wall / plain
    );
    println!(
        "| per save ({:.1} MB file, {} saves) | ms |",
        bytes / 1e6,
        saves.len()
    );
    println!("| --- | ---: |");
    println!(
        "| canonical digest, provider side (every page's SHA-256 from memory) | {:.1} |",
        per(|s| s.provider_digest) * 1e3
    );
    println!(
        "| canonical digest, broker side (from the store, pages by block id) | {:.1} |",
        per(|s| s.broker_digest) * 1e3
    );
    println!(
        "| baseline: SHA-1 of the whole file | {:.1} |",
        per(|s| s.sha1) * 1e3
    );
    println!(
        "| baseline: SHA-256 of the whole file | {:.1} |",
        per(|s| s.sha256) * 1e3
    );
}
