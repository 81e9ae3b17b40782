//! The synthetic driver: a stand-in for market load tests. It never runs a
//! VM and must never be offered as a real hypervisor.
//!
//! Its "machine state" is a file of `memory_mib` MiB that evolves like a
//! guest's RAM would, cheaply and deterministically: each segment rewrites
//! a configured fraction of its 4 KiB blocks. Which blocks and what they
//! become depend only on the state and the segment number, so two providers
//! running the same segment produce byte-identical states and consoles (the
//! market can compare them), and checkpoints share most blocks with their
//! predecessor (the store's deduplication sees realistic deltas).
//!
//! Command line (whitespace-separated, other words ignored):
//! - `synthetic.seed=S`: seeds the state at boot (default: the whole cmdline);
//! - `synthetic.segments=N`: the job halts after its N-th segment (default:
//!   never);
//! - `synthetic.state_kib=K`: the state is K KiB instead of `memory_mib`
//!   (a multiple of 4, at least 8), so market load tests measure the market
//!   rather than hashing.
//!
//! Layout (the header: `vmlot_cas::synthetic`): block 0 is a header (magic, seed, segment counter, a chain
//! digest of all changes so far); blocks 1.. are "RAM", zero at boot (holes:
//! the file is sparse). The random choices are ChaCha8 streams
//! (`rand_chacha`, whose output is fixed for a seed across versions) seeded
//! from SHA-1 of the state, so they depend on nothing else.
//!
//! Compiled only with the cargo feature `synthetic`: it is test machinery,
//! and a release provider offers no such hypervisor.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;
use sha1::{Digest, Sha1};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vmlot_cas::synthetic::SyntheticHeader as Header;
use vmlot_schemas::HypervisorKind;

use super::api::{
    Driver, DriverError, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart, VmState, VmStep,
};
use super::host::{expect_kind, io_err};
use super::template::{self, Machine};

/// The block size: a page, the grid checkpoints are diffed on.
pub const BLOCK: usize = 4096;
/// The "RAM" a segment works on in its workdir, until it is saved.
const RAM_FILE: &str = "synthetic-ram";
/// Blocks copied or changed between two looks at the cancellation token.
const CANCEL_EVERY: usize = 256;

/// How the synthetic state evolves.
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    /// Fraction of the data blocks each segment rewrites, in `[0, 1]`
    /// (out-of-range values are clamped, NaN counts as 0).
    pub changed_fraction: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            changed_fraction: 0.05,
        }
    }
}

/// A fake hypervisor for market load tests: no VM, a deterministic state
/// file instead (see the module docs). Kind [`HypervisorKind::Synthetic`].
pub struct SyntheticDriver {
    changed_fraction: f64,
}

impl SyntheticDriver {
    pub fn new(config: SyntheticConfig) -> Self {
        let f = config.changed_fraction;
        SyntheticDriver {
            changed_fraction: if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) },
        }
    }

    async fn run(&self, plan: &SegmentPlan, cancel: CancellationToken) -> Result<SegmentReport, DriverError> {
        expect_kind(plan, HypervisorKind::Synthetic)?;
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let machine = SyntheticMachine {
            job: Job::parse(plan)?,
            fraction: self.changed_fraction,
            ram: plan.workdir.join(RAM_FILE),
            header: None,
            changed: false,
            console: Vec::new(),
        };
        template::run_segment(machine, plan, &plan.workdir, &cancel).await
    }
}

impl Driver for SyntheticDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Synthetic
    }

    fn run_segment<'a>(
        &'a self,
        plan: &'a SegmentPlan,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<SegmentReport, DriverError>> {
        Box::pin(self.run(plan, cancel))
    }
}

/// One segment's "guest": the RAM file and its header. The file work
/// blocks, so it runs on the blocking pool and checks the token every MiB;
/// every step waits for it, so nothing writes the file after the clean-up.
struct SyntheticMachine {
    job: Job,
    fraction: f64,
    ram: PathBuf,
    /// Set once started.
    header: Option<Header>,
    /// The segment's changes are made (once, however many slices it runs
    /// in: a segment's state depends on the state alone).
    changed: bool,
    console: Vec<u8>,
}

impl Machine for SyntheticMachine {
    /// A fresh state (boot) or a copy of the checkpoint (restore).
    async fn start(&mut self, plan: &SegmentPlan, cancel: &CancellationToken) -> Result<(), DriverError> {
        let (job, ram, workdir, start, token) = (
            self.job,
            self.ram.clone(),
            plan.workdir.clone(),
            plan.start.clone(),
            cancel.clone(),
        );
        let header = blocking(&plan.workdir, move || {
            boot_or_restore(&job, &workdir, &ram, &start, &token)
        })
        .await?;
        self.header = Some(header);
        Ok(())
    }

    /// One segment of changes (on the first call only, when the owner's
    /// policy runs the segment in slices), then the rest of `run_for` (the
    /// work counts; with `run_for` zero, as in benchmarks, nothing sleeps).
    async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        let started = Instant::now();
        let Some(header) = self.header else {
            return Err(DriverError::NotRunning {
                step: VmStep::Run,
                state: VmState::Created,
            });
        };
        let header = if self.changed {
            header
        } else {
            let (job, fraction, ram, token) = (self.job, self.fraction, self.ram.clone(), cancel.clone());
            let dir = self.ram.parent().unwrap_or(Path::new(".")).to_path_buf();
            let (header, console) =
                blocking(&dir, move || change(&job, header, fraction, &ram, &token)).await?;
            self.header = Some(header);
            self.changed = true;
            self.console = console;
            header
        };
        let rest = run_for.saturating_sub(started.elapsed());
        if !rest.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return Err(DriverError::Cancelled),
                _ = tokio::time::sleep(rest) => {}
            }
        }
        let halted = self.job.limit.is_some_and(|limit| header.counter >= limit);
        Ok(halted.then_some(SegmentEnd::Halted))
    }

    /// Nothing runs between slices: a pause is the clock standing still.
    async fn pause(&mut self, _: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        tracing::debug!("synthetic guest paused");
        Ok(None)
    }

    async fn resume(&mut self, _: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        tracing::debug!("synthetic guest resumed");
        Ok(None)
    }

    /// No guest to tell: logged only.
    async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError> {
        tracing::info!(seconds, "synthetic guests get no notice");
        Ok(false)
    }

    async fn save(
        &mut self,
        partial: &Path,
        _: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        std::fs::rename(&self.ram, partial).map_err(|e| io_err("rename", &self.ram, e))?;
        Ok(None)
    }

    /// Nothing of a halted, cancelled or failed segment is kept.
    async fn stop(&mut self, _: Result<&SegmentEnd, &DriverError>) {
        let _ = std::fs::remove_file(&self.ram);
    }

    async fn console(&mut self) -> Result<Vec<u8>, DriverError> {
        Ok(std::mem::take(&mut self.console))
    }
}

/// Runs `work` on the blocking pool; a cancelled one says so.
async fn blocking<T: Send + 'static>(
    dir: &Path,
    work: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(DriverError::Io {
            op: "run segment",
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// What the command line and VM config say.
#[derive(Clone, Copy)]
struct Job {
    seed: u64,
    limit: Option<u64>,
    blocks: u64,
}

impl Job {
    fn parse(plan: &SegmentPlan) -> Result<Job, DriverError> {
        let cmdline = &plan.vm.cmdline;
        let mut seed = None;
        let mut limit = None;
        let mut state_kib = u64::from(plan.vm.memory_mib) * 1024;
        for word in cmdline.split_whitespace() {
            if let Some(s) = word.strip_prefix("synthetic.seed=") {
                seed = Some(s);
            } else if let Some(k) = word.strip_prefix("synthetic.state_kib=") {
                match k.parse::<u64>() {
                    Ok(k) if k >= 8 && k % 4 == 0 && k <= u64::from(u32::MAX) => state_kib = k,
                    _ => {
                        return Err(DriverError::BadImage(format!(
                            "synthetic.state_kib={k}: want a multiple of 4, at least 8"
                        )));
                    }
                }
            } else if let Some(n) = word.strip_prefix("synthetic.segments=") {
                match n.parse::<u64>() {
                    Ok(n) if n > 0 => limit = Some(n),
                    _ => {
                        return Err(DriverError::BadImage(format!(
                            "synthetic.segments={n}: want a positive integer"
                        )));
                    }
                }
            }
        }
        if plan.vm.memory_mib == 0 {
            return Err(DriverError::BadImage("memory_mib must be positive".into()));
        }
        let blocks = state_kib * 1024 / BLOCK as u64;
        let seed = u64_of(&Sha1::digest(seed.unwrap_or(cmdline).as_bytes()));
        Ok(Job { seed, limit, blocks })
    }
}

/// Creates `ram` (`job.blocks` blocks): zero at boot, else a copy of the
/// checkpoint.
fn boot_or_restore(
    job: &Job,
    workdir: &Path,
    ram: &Path,
    start: &SegmentStart,
    cancel: &CancellationToken,
) -> Result<Header, DriverError> {
    if cancel.is_cancelled() {
        return Err(DriverError::Cancelled);
    }
    std::fs::create_dir_all(workdir).map_err(|e| io_err("create", workdir, e))?;
    let len = job.blocks * BLOCK as u64;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(ram)
        .map_err(|e| io_err("create", ram, e))?;
    out.set_len(len).map_err(|e| io_err("resize", ram, e))?;
    match start {
        SegmentStart::Boot => Ok(Header {
            seed: job.seed,
            counter: 0,
            digest: Sha1::digest(job.seed.to_le_bytes()).into(),
            state_kib: (len / 1024) as u32,
            data: [0; 20],
        }),
        SegmentStart::Restore { machine_state } => restore(machine_state, &out, ram, len, cancel),
    }
}

/// One segment of changes to `ram`: a `fraction` of its data blocks,
/// chosen and rewritten from the state alone. Returns the new header
/// (written to block 0) and the segment's console.
fn change(
    job: &Job,
    mut header: Header,
    fraction: f64,
    ram: &Path,
    cancel: &CancellationToken,
) -> Result<(Header, Vec<u8>), DriverError> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ram)
        .map_err(|e| io_err("open", ram, e))?;
    let n = header.counter;
    let data_blocks = job.blocks.saturating_sub(1);
    let count = ((data_blocks as f64) * fraction).round() as u64;
    let mut select = rng(&[
        b"select",
        &header.seed.to_le_bytes(),
        &n.to_le_bytes(),
        &header.digest,
    ]);
    let mut chosen: Vec<u64> = rand::seq::index::sample(&mut select, data_blocks as usize, count as usize)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    chosen.sort_unstable();

    let mut chain = Sha1::new();
    chain.update(header.digest);
    chain.update(n.to_le_bytes());
    let mut block = vec![0u8; BLOCK];
    for (i, &index) in chosen.iter().enumerate() {
        if i % CANCEL_EVERY == 0 && cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let offset = (index + 1) * BLOCK as u64;
        out.read_exact_at(&mut block, offset)
            .map_err(|e| io_err("read", ram, e))?;
        let old = Sha1::digest(&block);
        rng(&[
            b"block",
            &header.seed.to_le_bytes(),
            &n.to_le_bytes(),
            &index.to_le_bytes(),
            &old,
        ])
        .fill_bytes(&mut block);
        out.write_all_at(&block, offset)
            .map_err(|e| io_err("write", ram, e))?;
        chain.update(index.to_le_bytes());
        chain.update(&block);
    }
    header.digest = chain.finalize().into();
    header.counter = n + 1;
    header.data = data_digest(&out, job.blocks, ram, cancel)?;
    out.write_all_at(&header.encode(), 0)
        .map_err(|e| io_err("write", ram, e))?;
    if cancel.is_cancelled() {
        return Err(DriverError::Cancelled);
    }

    let hex: String = header.digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut console = format!("synthetic: segment {n} digest {hex}\n");
    if job.limit.is_some_and(|limit| header.counter >= limit) {
        console.push_str(&format!("synthetic: done after {} segments\n", header.counter));
    }
    Ok((header, console.into_bytes()))
}

/// SHA-1 of every block after the header: what a restore checks.
fn data_digest(
    file: &File,
    blocks: u64,
    path: &Path,
    cancel: &CancellationToken,
) -> Result<[u8; 20], DriverError> {
    let mut sha = Sha1::new();
    let mut chunk = vec![0u8; BLOCK * CANCEL_EVERY];
    let len = blocks * BLOCK as u64;
    let mut offset = BLOCK as u64;
    while offset < len {
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let n = (len - offset).min(chunk.len() as u64) as usize;
        file.read_exact_at(&mut chunk[..n], offset)
            .map_err(|e| io_err("read", path, e))?;
        sha.update(&chunk[..n]);
        offset += n as u64;
    }
    Ok(sha.finalize().into())
}

/// Checks the checkpoint (its header, its size, the digest of its data)
/// and copies it into `out` (already sized), skipping zero blocks so the
/// copy stays sparse.
fn restore(
    from: &Path,
    out: &File,
    out_path: &Path,
    expected_len: u64,
    cancel: &CancellationToken,
) -> Result<Header, DriverError> {
    let bad = |why: String| DriverError::Restore(format!("{}: {why}", from.display()));
    let src = File::open(from).map_err(|e| bad(e.to_string()))?;
    let len = src.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut first = vec![0u8; BLOCK];
    src.read_exact_at(&mut first, 0)
        .map_err(|e| bad(format!("no header: {e}")))?;
    let header = Header::decode(&first).ok_or_else(|| bad("not a synthetic machine state".into()))?;
    if u64::from(header.state_kib) * 1024 != expected_len || len != expected_len {
        return Err(bad(format!(
            "{len} bytes, header says {} KiB, the job's state is {} KiB",
            header.state_kib,
            expected_len / 1024
        )));
    }
    let mut chunk = vec![0u8; BLOCK * CANCEL_EVERY];
    let mut data = Sha1::new();
    let mut offset = 0u64;
    while offset < len {
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let n = (len - offset).min(chunk.len() as u64) as usize;
        src.read_exact_at(&mut chunk[..n], offset)
            .map_err(|e| bad(e.to_string()))?;
        let skip = if offset == 0 { BLOCK.min(n) } else { 0 };
        data.update(&chunk[skip..n]);
        for (i, block) in chunk[..n].chunks(BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = offset + (i * BLOCK) as u64;
                out.write_all_at(block, at)
                    .map_err(|e| io_err("write", out_path, e))?;
            }
        }
        offset += n as u64;
    }
    if <[u8; 20]>::from(data.finalize()) != header.data {
        return Err(bad("its data does not match its header's digest".into()));
    }
    Ok(header)
}

/// A random stream determined by `parts` alone.
fn rng(parts: &[&[u8]]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(u64_of(&hash(parts)))
}

fn hash(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

fn u64_of(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b)
}
