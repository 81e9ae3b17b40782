//! Segment overhead with a real QEMU guest: what it costs, per segment of
//! length T, to hand a running VM on — save, upload of the cold blocks,
//! download by another provider that holds the previous checkpoint, and
//! restore there — against copying the whole machine-state file through the
//! same nats-server, measured in the same run.
//!
//! Two providers, A and B, each with its own NATS connection, store handle,
//! block cache and QEMU driver, do what the provider daemon does
//! (`provider/src/daemon.rs`), step by step so each step can be timed:
//!
//! The guest's RAM is a file of its own, as the provider daemon runs every
//! QEMU guest that is not deterministic: a save writes the device state
//! (x-ignore-shared) and the RAM file is the checkpoint's memory part
//! (`--ram-in-state`: mapped-ram saves of all of it, as before).
//!
//! - A runs segment k (segment 0 boots, later ones restore the checkpoint
//!   A fetched through its own cache, its RAM pulled onto the RAM file A
//!   saved) and saves checkpoint C(k+1);
//! - A pushes C(k+1) with fixed 4 KiB blocks over C(k) (its blocks taken
//!   as stored, the manifest stored as the edits from C(k)'s), through A's
//!   cache;
//! - B, whose cache holds C(k) (it fetched it in the previous round), pulls
//!   C(k+1) through its cache and restores it, running the guest briefly to
//!   show it goes on; B's RAM is pulled onto the RAM file B kept from that
//!   previous run, which it pushed (untimed) as a provider ends a segment:
//!   B is a provider that ran the job before, as the daemon keeps its last
//!   RAM file of each job (`provider/src/daemon/kept.rs`);
//! - A fetches C(k+1) through its cache to run segment k+1: the bytes that
//!   takes are what a provider moves when it wins the next segment of its
//!   own VM;
//! - the naive copy: the whole machine-state file (and RAM file) as 1 MiB
//!   messages into a scratch JetStream stream, read back into a file;
//! - the floor: the pages that changed since C(k) (by the manifests) read,
//!   hashed and published raw into the same scratch stream, nothing else.
//!
//! Bytes are what the server counted on each provider's connection
//! (`/connz`, message bytes both ways), not what the store meant to send.
//! Row 0 (boot) starts from empty caches and an empty store, so everything
//! is cold; the summary counts rows 1.. only.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use vmlot_cas::chunk::manifest_of;
use vmlot_cas::layout::Layout;
use vmlot_cas::{BlockCache, BlockStore, Seed, StoreOptions, pull_file_over, push_file_over};
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{Driver, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart};
use vmlot_schemas::{
    BlockId, Chunking, Extent, HashAlgorithm, HypervisorKind, Manifest, ManifestId, ObjectKind, VmConfig,
};
use vmlot_tests::NatsServer;

use crate::baseline::{Cpu, guest_files, publish_pipelined, version};

#[derive(clap::Args)]
pub struct Args {
    /// Segment length T, in seconds.
    #[arg(long, default_value_t = 60)]
    segment_seconds: u64,
    /// Measured segments after the boot segment (each restored from the previous checkpoint).
    #[arg(long, default_value_t = 3)]
    segments: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u32,
    /// Guest workload: memwriter's rate, KiB of new random data per second.
    #[arg(long, default_value_t = 256)]
    rate_kib: u32,
    /// Guest workload: size of the tmpfs ring memwriter writes around, MiB.
    #[arg(long, default_value_t = 32)]
    ring_mib: u32,
    /// How long B runs the guest after restoring it (to see it go on), seconds.
    #[arg(long, default_value_t = 2)]
    restore_run_seconds: u64,
    /// Directory with the test guest's vmlinuz and initrd.cpio.gz (default: .tools/guest).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Keep the guest's RAM inside the machine state (mapped-ram saves of
    /// all of it), as before the RAM got a file of its own.
    #[arg(long)]
    ram_in_state: bool,
}

/// A checkpoint's files on one provider: the machine state, and the
/// guest's RAM when it is a file of its own.
#[derive(Clone)]
struct Parts {
    state: PathBuf,
    memory: Option<PathBuf>,
}

impl Parts {
    fn files(&self) -> impl Iterator<Item = (&PathBuf, ObjectKind)> {
        std::iter::once((&self.state, ObjectKind::MachineState))
            .chain(self.memory.iter().map(|m| (m, ObjectKind::Memory)))
    }
}

/// A checkpoint as stored: each part's manifest, in [`Parts::files`] order.
struct Stored {
    parts: Vec<(ManifestId, Manifest)>,
    /// Time to push (or pull) all parts.
    elapsed: Duration,
    /// Block payload fetched from the store (pulls).
    fetched_bytes: u64,
}

const MB: f64 = 1_000_000.0;
/// Comfortably more than every checkpoint of a run: nothing is evicted.
const CACHE_BYTES: u64 = 4 << 30;
/// Messages of the naive copy, and acknowledgements it waits for at once.
const NAIVE_MESSAGE: usize = 1 << 20;
const NAIVE_IN_FLIGHT: usize = 64;
/// Bytes one pull of the naive read asks for: well under the client's
/// 64 MiB slow-consumer limit.
const NAIVE_PULL_BYTES: usize = 32 << 20;
const NAIVE_STREAM: &str = "VMLOT_BENCH_NAIVE";
const NAIVE_SUBJECT: &str = "vmlot.bench.naive";

/// One provider as the daemon has it: its own connection, store handle,
/// block cache and driver.
struct Provider {
    store: BlockStore,
    /// Its connection as the server counts it (`/connz`).
    cid: u64,
    cache: BlockCache,
    driver: QemuDriver,
    dir: PathBuf,
}

impl Provider {
    async fn new(server: &NatsServer, dir: PathBuf, accel: Accel) -> Result<Self> {
        let (client, cid) = server.counted_client().await?;
        let store = BlockStore::open(client, StoreOptions::default()).await?;
        let cache = BlockCache::open(dir.join("cache"), CACHE_BYTES)?;
        let driver = QemuDriver::new(QemuConfig {
            binary: None,
            accel,
            ..Default::default()
        });
        Ok(Self {
            store,
            cid,
            cache,
            driver,
            dir,
        })
    }
}

/// The figures of one row: segment k on A, its checkpoint C(k+1) moved on.
struct Row {
    segment: u32,
    a_start: f64,
    save: f64,
    file_bytes: u64,
    stored_bytes: u64,
    /// What the server counted on A's connection (both ways) for the push.
    upload_bytes: u64,
    upload: f64,
    /// Reading, cutting and hashing the file alone (the local part of the upload).
    chunk_hash: f64,
    upload_server_cpu: f64,
    upload_client_cpu: f64,
    /// What the server counted on B's connection (both ways) for the pull.
    download_bytes: u64,
    download: f64,
    download_server_cpu: f64,
    download_client_cpu: f64,
    restore: f64,
    /// Block payload A fetched going on from its own checkpoint.
    same_block_bytes: u64,
    /// What the server counted on A's connection for that pull.
    same_wire_bytes: u64,
    same_manifest_bytes: u64,
    same_time: f64,
    naive: Naive,
    floor: Floor,
    a_tick: Option<u64>,
    b_tick: Option<u64>,
}

impl Row {
    /// save + upload + download + restore: what handing the VM on costs.
    fn total(&self) -> f64 {
        self.save + self.upload + self.download + self.restore
    }

    /// The same with the whole file copied instead of the cold blocks.
    fn naive_total(&self) -> f64 {
        self.save + self.naive.publish + self.naive.read + self.restore
    }
}

struct Naive {
    bytes: u64,
    publish: f64,
    read: f64,
}

/// What a segment is held to (issue 17 step 4): hashing the pages that
/// changed since the previous checkpoint and sending them raw, nothing else.
struct Floor {
    bytes: u64,
    secs: f64,
}

pub async fn run(args: Args) -> Result<()> {
    if args.segment_seconds == 0 {
        bail!("--segment-seconds must be at least 1");
    }
    let files = guest_files(args.guest.as_deref())?;
    let t = args.segment_seconds as f64;
    let began = Instant::now();
    let never = CancellationToken::new();
    let accel = QemuDriver::new(QemuConfig {
        binary: None,
        accel: Accel::Auto,
        ..Default::default()
    })
    .accel_for(&files.kernel, &never)
    .await
    .context("probing the QEMU accelerator")?;

    let server = NatsServer::start()?;
    let root = tempfile::Builder::new()
        .prefix("vmlot-bench-segment-")
        .tempdir()?;
    let a = Provider::new(&server, root.path().join("a"), accel).await?;
    let b = Provider::new(&server, root.path().join("b"), accel).await?;
    let naive_js = jetstream::new(server.client().await?);

    let vm = VmConfig {
        hypervisor: HypervisorKind::Qemu,
        arch: "x86_64".into(),
        memory_mib: args.memory_mib,
        vcpus: 1,
        cmdline: format!(
            "console=ttyS0 quiet loglevel=1 panic=-1 vmlot.mode=memwriter vmlot.rate_kib={} vmlot.ring_mib={}",
            args.rate_kib, args.ring_mib
        ),
    };
    let plan =
        |start: SegmentStart, memory: Option<PathBuf>, run_for: Duration, workdir: PathBuf| SegmentPlan {
            vm: vm.clone(),
            files: vmlot_provider::driver::BootFiles {
                memory: memory.filter(|_| !args.ram_in_state),
                ..files.clone()
            },
            start,
            run_for,
            instructions: None,
            workdir,
            owner: None,
        };

    println!(
        "nats-server: {}",
        version(vmlot_tests::nats_server_binary()?.as_os_str(), "--version")
    );
    println!("qemu: {}", version("qemu-system-x86_64".as_ref(), "--version"));
    println!(
        "guest: {} MiB, 1 vCPU, accel {accel:?}, memwriter {} KiB/s into a {} MiB tmpfs ring; \
         T = {} s, {} measured segments after the boot segment",
        args.memory_mib, args.rate_kib, args.ring_mib, args.segment_seconds, args.segments
    );
    println!(
        "guest RAM: {}",
        if args.ram_in_state {
            "in the machine state (mapped-ram saves of all of it)"
        } else {
            "a file of its own (x-ignore-shared saves of the device state; the RAM file is the checkpoint's memory part)"
        }
    );
    println!("fsync: sync_interval always (every acknowledged write is on disk)");
    println!("load average at start: {}", load_average());

    let mut rows: Vec<Row> = Vec::new();
    let mut previous: Option<Stored> = None;
    // The checkpoint A restores next segment, fetched through its cache.
    let mut a_next: Option<Parts> = None;
    // The RAM file B kept from its last run of the guest, and its manifest.
    let mut b_kept: Option<(PathBuf, Manifest)> = None;
    for k in 0..=args.segments {
        let a_seg = a.dir.join(format!("seg{k}"));
        let (start, memory) = match a_next.take() {
            None => (SegmentStart::Boot, Some(a_seg.join("memory"))),
            Some(parts) => (
                SegmentStart::Restore {
                    machine_state: parts.state,
                },
                parts.memory,
            ),
        };
        eprintln!(
            "[{:>6.1} s] segment {k}: A runs {} s",
            began.elapsed().as_secs_f64(),
            args.segment_seconds
        );
        let run = a
            .driver
            .run_segment(
                &plan(
                    start,
                    memory,
                    Duration::from_secs(args.segment_seconds),
                    a_seg.join("run"),
                ),
                never.clone(),
            )
            .await
            .with_context(|| format!("segment {k} on A"))?;
        let a_tick = last_tick(&run.console);
        let state = saved(&run).with_context(|| format!("segment {k} on A"))?;
        let mut file_bytes = 0;
        for (path, _) in state.files() {
            file_bytes += std::fs::metadata(path)?.len();
        }

        // A pushes the new checkpoint: the previous one's blocks are known
        // stored, and each part's manifest is stored as the edits from the
        // same part of the previous.
        let known: HashSet<BlockId> = previous
            .iter()
            .flat_map(|p| &p.parts)
            .flat_map(|(_, m)| m.unique_blocks().into_iter().map(|(id, _)| id))
            .collect();
        let cpu = Cpu::now(&server);
        let traffic = server.connection_traffic(a.cid)?;
        let pushed = push_parts(&a, &state, &known, previous.as_ref())
            .await
            .context("A pushes the checkpoint")?;
        let upload_wire = (server.connection_traffic(a.cid)? - traffic).total();
        let (upload_server_cpu, upload_client_cpu) = cpu.stop(&server);
        let mut chunk_hash = 0.0;
        for (path, _) in state.files() {
            chunk_hash += chunk_and_hash(path, a.store.hash()).await?;
        }

        // B, holding the previous checkpoint, fetches this one and restores it.
        let b_seg = b.dir.join(format!("seg{k}"));
        std::fs::create_dir_all(&b_seg)?;
        let cpu = Cpu::now(&server);
        let traffic = server.connection_traffic(b.cid)?;
        // B's RAM onto the one it kept from its own last save of the job.
        let b_seed = b_kept
            .as_ref()
            .map(|(path, manifest): &(PathBuf, Manifest)| Seed { path, manifest });
        let (b_parts, fetched) = pull_parts(&b, &pushed, &b_seg, b_seed)
            .await
            .context("B pulls the checkpoint")?;
        let download_wire = (server.connection_traffic(b.cid)? - traffic).total();
        let (download_server_cpu, download_client_cpu) = cpu.stop(&server);
        eprintln!(
            "[{:>6.1} s] segment {k}: A pushed, B pulled; B restores",
            began.elapsed().as_secs_f64()
        );
        let restored = b
            .driver
            .run_segment(
                &plan(
                    SegmentStart::Restore {
                        machine_state: b_parts.state,
                    },
                    b_parts.memory,
                    Duration::from_secs(args.restore_run_seconds),
                    b_seg.join("run"),
                ),
                never.clone(),
            )
            .await
            .with_context(|| format!("restore of checkpoint {} on B", k + 1))?;
        let b_saved = saved(&restored).with_context(|| format!("restore of checkpoint {} on B", k + 1))?;
        let b_tick = first_tick(&restored.console);
        // B's run ends as a segment does on a provider: its save pushed
        // (untimed) and its RAM file kept for B's next pull of the job.
        b_kept = None;
        if let Some(ram) = &b_saved.memory {
            let b_known = HashSet::new();
            let b_pushed = push_parts(&b, &b_saved, &b_known, Some(&pushed))
                .await
                .context("B pushes its save")?;
            let kept = b.dir.join("kept.ram");
            std::fs::rename(ram, &kept)?;
            b_kept = b_pushed.parts.get(1).map(|(_, m)| (kept, m.clone()));
        }
        std::fs::remove_dir_all(&b_seg)?;

        // The naive copy of the same files through the same server.
        let mut naive = Naive {
            bytes: 0,
            publish: 0.0,
            read: 0.0,
        };
        for (path, _) in state.files() {
            let one = naive_copy(&naive_js, path, &root.path().join("naive-copy"))
                .await
                .context("naive whole-file copy")?;
            naive.bytes += one.bytes;
            naive.publish += one.publish;
            naive.read += one.read;
        }

        let floor = changed_pages_floor(&naive_js, &state, &pushed, previous.as_ref())
            .await
            .context("hashing and sending the changed pages alone")?;

        // A goes on to segment k+1 from the same checkpoint, through its
        // cache (after the naive copy: this moves A's RAM file).
        let next_seg = a.dir.join(format!("seg{}", k + 1));
        std::fs::create_dir_all(&next_seg)?;
        let traffic = server.connection_traffic(a.cid)?;
        // Its RAM onto the RAM file it saved, as the daemon does.
        let seed = state
            .memory
            .as_deref()
            .zip(pushed.parts.get(1))
            .map(|(path, (_, manifest))| Seed { path, manifest });
        let (next_parts, same) = pull_parts(&a, &pushed, &next_seg, seed)
            .await
            .context("A fetches its own checkpoint")?;
        let same_wire = (server.connection_traffic(a.cid)? - traffic).total();
        std::fs::remove_dir_all(&a_seg)?;

        let row = Row {
            segment: k,
            a_start: run.start_time.as_secs_f64(),
            save: run.save_time.as_secs_f64(),
            file_bytes,
            stored_bytes: pushed.parts.iter().map(|(_, m)| m.stored_bytes()).sum(),
            upload_bytes: upload_wire,
            upload: pushed.elapsed.as_secs_f64(),
            chunk_hash,
            upload_server_cpu,
            upload_client_cpu,
            download_bytes: download_wire,
            download: fetched.elapsed.as_secs_f64(),
            download_server_cpu,
            download_client_cpu,
            restore: restored.start_time.as_secs_f64(),
            same_block_bytes: same.fetched_bytes,
            same_wire_bytes: same_wire,
            same_manifest_bytes: pushed.parts.iter().map(|(id, m)| manifest_len(id, m)).sum(),
            same_time: same.elapsed.as_secs_f64(),
            naive,
            floor,
            a_tick,
            b_tick,
        };
        eprintln!(
            "[{:>6.1} s] segment {k}: total {:.2} s = {:.2} % of T",
            began.elapsed().as_secs_f64(),
            row.total(),
            row.total() / t * 100.0
        );
        rows.push(row);
        previous = Some(pushed);
        a_next = Some(next_parts);
    }
    println!("load average at end: {}\n", load_average());
    print_tables(&rows, t, args.memory_mib);
    Ok(())
}

/// Issue 17 step 4: ≤ 1 % of T for a 128 MiB guest, ≤ 2 % for 1 GiB.
fn target_percent(memory_mib: u32) -> f64 {
    if memory_mib <= 128 { 1.0 } else { 2.0 }
}

fn print_tables(rows: &[Row], t: f64, memory_mib: u32) {
    let target = target_percent(memory_mib);
    let label = |r: &Row| {
        if r.segment == 0 {
            "0 (boot, cold)".to_string()
        } else {
            r.segment.to_string()
        }
    };
    let tick = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());

    println!("## Handing the VM to another provider (A saves and uploads, B downloads and restores)\n");
    println!(
        "| segment | A start s | save s | file MB | stored MB | A up wire MB | upload s | B down wire MB | download s | B restore s | total s | % of T | changed MB | floor s | total / floor | guest tick A→B |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {}→{} |",
            label(r),
            r.a_start,
            r.save,
            r.file_bytes as f64 / MB,
            r.stored_bytes as f64 / MB,
            r.upload_bytes as f64 / MB,
            r.upload,
            r.download_bytes as f64 / MB,
            r.download,
            r.restore,
            r.total(),
            r.total() / t * 100.0,
            r.floor.bytes as f64 / MB,
            r.floor.secs,
            r.total() / r.floor.secs.max(1e-3),
            tick(r.a_tick),
            tick(r.b_tick),
        );
    }

    println!("\n## The same provider goes on, and the naive whole-file copy\n");
    println!(
        "| segment | A refetch block bytes | A refetch wire bytes | manifest KB (whole) | A refetch s | naive MB | naive publish s | naive read s | naive total s | naive % of T | bytes naive/store | transfer s naive/store |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let store_bytes = (r.upload_bytes + r.download_bytes).max(1) as f64;
        let store_time = r.upload + r.download;
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} |",
            label(r),
            r.same_block_bytes,
            r.same_wire_bytes,
            r.same_manifest_bytes as f64 / 1000.0,
            r.same_time,
            r.naive.bytes as f64 / MB,
            r.naive.publish,
            r.naive.read,
            r.naive_total(),
            r.naive_total() / t * 100.0,
            2.0 * r.naive.bytes as f64 / store_bytes,
            (r.naive.publish + r.naive.read) / store_time,
        );
    }

    println!(
        "\n## Where the transfer time goes (CPU seconds of nats-server and of this process over the step; \
         the A refetch is a pull with every block in the cache: the local part of a download)\n"
    );
    println!(
        "| segment | upload s | of which chunk+hash s | server CPU s | client CPU s | download s | local rebuild s (A refetch) | server CPU s | client CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            label(r),
            r.upload,
            r.chunk_hash,
            r.upload_server_cpu,
            r.upload_client_cpu,
            r.download,
            r.same_time,
            r.download_server_cpu,
            r.download_client_cpu,
        );
    }

    let measured: Vec<&Row> = rows.iter().filter(|r| r.segment > 0).collect();
    if measured.is_empty() {
        println!("\nsummary: no measured segment (--segments 0 runs the boot segment only)");
        return;
    }
    let n = measured.len() as f64;
    let mean = |f: &dyn Fn(&Row) -> f64| measured.iter().map(|r| f(r)).sum::<f64>() / n;
    let worst = measured.iter().map(|r| r.total() / t * 100.0).fold(0.0, f64::max);
    let total = mean(&|r| r.total());
    let naive = mean(&|r| r.naive_total());
    let floor = mean(&|r| r.floor.secs);
    let moved: u64 = measured.iter().map(|r| r.same_block_bytes).sum();
    println!(
        "\nsummary over segments {} at T = {t:.0} s: save {:.2} + upload {:.2} + download {:.2} + restore {:.2} \
         = {total:.2} s = {:.2} % of T (worst {worst:.2} %; target for {memory_mib} MiB ≤ {target} %: {}); same provider going on moved {moved} \
         block bytes (target 0: {}); hashing and sending the changed pages alone {floor:.2} s, the hand-over {:.1}× that \
         (target ≤ 2×: {}); naive whole-file copy {naive:.2} s = {:.2} % of T, {:.1}× the store's time",
        if measured.len() == 1 {
            "1".to_string()
        } else {
            format!("1–{}", measured.len())
        },
        mean(&|r| r.save),
        mean(&|r| r.upload),
        mean(&|r| r.download),
        mean(&|r| r.restore),
        total / t * 100.0,
        if worst <= target { "met" } else { "not met" },
        if moved == 0 { "met" } else { "not met" },
        total / floor.max(1e-3),
        if total <= 2.0 * floor { "met" } else { "not met" },
        naive / t * 100.0,
        naive / total,
    );
}

/// Hashes the pages of `parts` that are not at the same offset in the
/// same part of `previous` (by the manifests) and publishes them raw, in
/// 1 MiB messages pipelined into a scratch stream on the same server: the
/// floor a segment's hand-over is held to.
async fn changed_pages_floor(
    js: &jetstream::Context,
    parts: &Parts,
    pushed: &Stored,
    previous: Option<&Stored>,
) -> Result<Floor> {
    let mut pages = Vec::new();
    for (i, ((path, _), (_, manifest))) in parts.files().zip(&pushed.parts).enumerate() {
        let before = previous.and_then(|p| p.parts.get(i)).map(|(_, m)| Layout::of(m));
        let mut at = 0u64;
        for extent in &manifest.extents {
            let held = before.as_ref().is_some_and(|b| b.holds(at, extent));
            if let (Extent::Block { n, .. }, false) = (extent, held) {
                pages.push((path.clone(), at, *n as usize));
            }
            at += extent.len();
        }
    }
    let stream = scratch_stream(js).await?;
    let started = Instant::now();
    let mut files = std::collections::HashMap::new();
    let mut message = Vec::with_capacity(NAIVE_MESSAGE);
    let mut messages = Vec::new();
    for (path, at, n) in pages {
        let file = match files.entry(path) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let f = std::fs::File::open(e.key())?;
                e.insert(f)
            }
        };
        let mut page = vec![0u8; n];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut page, at)?;
        std::hint::black_box(BlockId::of(HashAlgorithm::Sha256, &page));
        message.extend_from_slice(&page);
        if message.len() >= NAIVE_MESSAGE {
            messages.push(Ok(bytes::Bytes::from(std::mem::take(&mut message))));
        }
    }
    if !message.is_empty() {
        messages.push(Ok(bytes::Bytes::from(message)));
    }
    let bytes = publish_pipelined(js, NAIVE_SUBJECT, messages.into_iter(), NAIVE_IN_FLIGHT).await?;
    let secs = started.elapsed().as_secs_f64();
    drop(stream);
    js.delete_stream(NAIVE_STREAM).await?;
    Ok(Floor { bytes, secs })
}

/// Pushes each part of a checkpoint through the provider's cache, over
/// the same part of `previous`.
async fn push_parts(
    p: &Provider,
    parts: &Parts,
    known: &HashSet<BlockId>,
    previous: Option<&Stored>,
) -> Result<Stored> {
    let mut stored = Stored {
        parts: Vec::new(),
        elapsed: Duration::ZERO,
        fetched_bytes: 0,
    };
    for (i, (path, kind)) in parts.files().enumerate() {
        let base = previous.and_then(|p| p.parts.get(i)).map(|(id, _)| id);
        // The RAM not through the cache, as the daemon pushes it.
        let cache = (kind != ObjectKind::Memory).then_some(&p.cache);
        let pushed = push_file_over(&p.store, cache, path, kind, Chunking::FIXED_4K, known, base).await?;
        stored.elapsed += pushed.elapsed;
        stored.parts.push((pushed.manifest_id, pushed.manifest));
    }
    Ok(stored)
}

/// Pulls each part of a stored checkpoint through the provider's cache
/// into `dir`; the RAM onto `seed` (moved) when given, as the provider
/// daemon pulls its own last save of a job (`provider/src/daemon/kept.rs`).
async fn pull_parts(
    p: &Provider,
    stored: &Stored,
    dir: &Path,
    seed: Option<Seed<'_>>,
) -> Result<(Parts, Stored)> {
    let mut seed = seed;
    let mut paths = Vec::new();
    let mut pulled = Stored {
        parts: Vec::new(),
        elapsed: Duration::ZERO,
        fetched_bytes: 0,
    };
    for (i, (id, manifest)) in stored.parts.iter().enumerate() {
        let path = dir.join(if i == 0 { "machine-state.in" } else { "memory.in" });
        let onto = if i == 0 { None } else { seed.take() };
        let report = pull_file_over(&p.store, Some(&p.cache), id, &path, onto).await?;
        pulled.elapsed += report.elapsed;
        pulled.fetched_bytes += report.fetched_bytes;
        pulled.parts.push((*id, manifest.clone()));
        paths.push(path);
    }
    let mut paths = paths.into_iter();
    let parts = Parts {
        state: paths.next().context("a checkpoint without a machine state")?,
        memory: paths.next(),
    };
    Ok((parts, pulled))
}

/// The saved files of a segment that was meant to go on.
fn saved(report: &SegmentReport) -> Result<Parts> {
    match &report.end {
        SegmentEnd::Saved {
            machine_state,
            memory,
            ..
        } => Ok(Parts {
            state: machine_state.clone(),
            memory: memory.clone(),
        }),
        other => bail!(
            "the guest did not keep running ({other:?}); console:\n{}",
            String::from_utf8_lossy(&report.console)
        ),
    }
}

/// Seconds to read, cut and hash the file alone, as a push does before
/// anything crosses the wire.
async fn chunk_and_hash(path: &Path, hash: HashAlgorithm) -> Result<f64> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<f64> {
        let started = Instant::now();
        let file = std::fs::File::open(&path)?;
        manifest_of(file, ObjectKind::MachineState, Chunking::FIXED_4K, hash)?;
        Ok(started.elapsed().as_secs_f64())
    })
    .await?
}

/// Size of the canonical manifest: what a provider reads before any block.
fn manifest_len(id: &ManifestId, manifest: &Manifest) -> u64 {
    let bytes = manifest.canonical_bytes();
    debug_assert_eq!(ManifestId::of(manifest.hash, &bytes), *id);
    bytes.len() as u64
}

/// memwriter's tick numbers on a segment's console.
fn ticks(console: &[u8]) -> impl Iterator<Item = u64> + '_ {
    std::str::from_utf8(console)
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("memwriter: tick "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn last_tick(console: &[u8]) -> Option<u64> {
    ticks(console).last()
}

fn first_tick(console: &[u8]) -> Option<u64> {
    ticks(console).next()
}

/// The scratch stream the naive copy and the floor publish into (deleted
/// after each).
async fn scratch_stream(js: &jetstream::Context) -> Result<stream::Stream> {
    Ok(js
        .create_stream(stream::Config {
            name: NAIVE_STREAM.into(),
            subjects: vec![NAIVE_SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?)
}

/// The whole file as 1 MiB acknowledged publishes (pipelined) into a scratch
/// stream, then read back with a pull consumer into a file that is
/// fsynced, as a pull's is. The stream is deleted afterwards.
async fn naive_copy(js: &jetstream::Context, path: &Path, dest: &Path) -> Result<Naive> {
    let stream = scratch_stream(js).await?;
    let started = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let pieces = std::iter::from_fn(|| {
        let mut piece = Vec::with_capacity(NAIVE_MESSAGE);
        match (&mut file).take(NAIVE_MESSAGE as u64).read_to_end(&mut piece) {
            Ok(0) => None,
            Ok(_) => Some(Ok(piece.into())),
            Err(e) => Some(Err(e)),
        }
    });
    let bytes = publish_pipelined(js, NAIVE_SUBJECT, pieces, NAIVE_IN_FLIGHT).await?;
    let publish = started.elapsed().as_secs_f64();

    let started = Instant::now();
    // A plain pull consumer with a byte bound per pull: the ordered
    // consumer asks for 500 messages at once, 500 MiB here, and a reader
    // that also writes to disk then falls behind the server's slow-consumer
    // limit and stalls.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(NAIVE_PULL_BYTES / NAIVE_MESSAGE)
        .max_bytes_per_batch(NAIVE_PULL_BYTES)
        .messages()
        .await?;
    let mut out = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(dest)?);
    let mut read = 0u64;
    while read < bytes {
        let Some(msg) = messages.next().await else {
            bail!("ordered consumer ended early")
        };
        let msg = msg?;
        out.write_all(&msg.payload)?;
        read += msg.payload.len() as u64;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let read = started.elapsed().as_secs_f64();
    drop(messages);
    js.delete_stream(NAIVE_STREAM).await?;
    std::fs::remove_file(dest)?;
    Ok(Naive { bytes, publish, read })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
