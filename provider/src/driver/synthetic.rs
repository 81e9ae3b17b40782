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
//! Layout: block 0 is a header (magic, seed, segment counter, a chain
//! digest of all changes so far); blocks 1.. are "RAM", zero at boot (holes:
//! the file is sparse).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sha1::{Digest, Sha1};
use tokio_util::sync::CancellationToken;
use vmlot_schemas::HypervisorKind;

use super::{Driver, DriverError, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart, io_err};

/// The block size: a page, the grid checkpoints are diffed on.
pub const BLOCK: usize = 4096;
/// The state file a saved segment leaves in its workdir.
pub const STATE_FILE: &str = "machine-state";
const TMP_FILE: &str = "machine-state.partial";
const MAGIC: &[u8; 8] = b"VMLOTSYN";
const VERSION: u32 = 2;
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
        if plan.vm.hypervisor != HypervisorKind::Synthetic {
            return Err(DriverError::WrongHypervisor {
                expected: HypervisorKind::Synthetic,
                actual: plan.vm.hypervisor,
            });
        }
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let job = Job::parse(plan)?;
        let fraction = self.changed_fraction;
        let plan2 = plan.clone();
        let token = cancel.clone();
        let started = Instant::now();
        // The file work blocks, so it runs on the blocking pool and checks
        // the token every MiB: waiting for it after a cancel is quick, and
        // it cannot recreate the file after the clean-up below.
        let result = match tokio::task::spawn_blocking(move || segment(&plan2, &job, fraction, &token)).await
        {
            Ok(result) => result,
            Err(e) => Err(DriverError::Io {
                op: "run segment",
                path: plan.workdir.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }),
        };
        let tmp = plan.workdir.join(TMP_FILE);
        let mut done = match result {
            Ok(_) if cancel.is_cancelled() => {
                let _ = std::fs::remove_file(&tmp);
                return Err(DriverError::Cancelled);
            }
            Ok(done) => done,
            Err(e) => {
                // Nothing of a cancelled or failed attempt is kept.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // The segment "runs" for run_for in all: the work counts, and with
        // run_for zero (benchmarks) nothing sleeps.
        let rest = plan
            .run_for
            .saturating_sub(started.elapsed().saturating_sub(done.start_time));
        if !rest.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(DriverError::Cancelled);
                }
                _ = tokio::time::sleep(rest) => {}
            }
        }
        done.run_time = started.elapsed().saturating_sub(done.start_time);

        let save_started = Instant::now();
        let end = if done.halted {
            let _ = std::fs::remove_file(&tmp);
            SegmentEnd::Halted
        } else {
            let state = plan.workdir.join(STATE_FILE);
            std::fs::rename(&tmp, &state).map_err(|e| io_err("rename", &tmp, e))?;
            SegmentEnd::Saved {
                machine_state: state,
                disks: plan.files.disks.clone(),
            }
        };
        Ok(SegmentReport {
            end,
            console: done.console,
            start_time: done.start_time,
            run_time: done.run_time,
            save_time: save_started.elapsed(),
        })
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

/// What the command line and VM config say.
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

/// Block 0 of the state file.
struct Header {
    seed: u64,
    /// Segments completed.
    counter: u64,
    /// Chained over every change: equal digests, equal states.
    digest: [u8; 20],
    state_kib: u32,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.state_kib.to_le_bytes());
        b[16..24].copy_from_slice(&self.seed.to_le_bytes());
        b[24..32].copy_from_slice(&self.counter.to_le_bytes());
        b[32..52].copy_from_slice(&self.digest);
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < 52 || &b[0..8] != MAGIC || b[8..12] != VERSION.to_le_bytes() {
            return None;
        }
        Some(Header {
            state_kib: u32::from_le_bytes(b[12..16].try_into().ok()?),
            seed: u64::from_le_bytes(b[16..24].try_into().ok()?),
            counter: u64::from_le_bytes(b[24..32].try_into().ok()?),
            digest: b[32..52].try_into().ok()?,
        })
    }
}

struct Done {
    console: Vec<u8>,
    halted: bool,
    start_time: Duration,
    run_time: Duration,
}

/// Builds `<workdir>/machine-state.partial`: a fresh state (boot) or a
/// copy of the checkpoint (restore), then one segment of changes.
fn segment(
    plan: &SegmentPlan,
    job: &Job,
    fraction: f64,
    cancel: &CancellationToken,
) -> Result<Done, DriverError> {
    let started = Instant::now();
    if cancel.is_cancelled() {
        return Err(DriverError::Cancelled);
    }
    std::fs::create_dir_all(&plan.workdir).map_err(|e| io_err("create", &plan.workdir, e))?;
    let tmp = plan.workdir.join(TMP_FILE);
    let len = job.blocks * BLOCK as u64;
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io_err("create", &tmp, e))?;
    out.set_len(len).map_err(|e| io_err("resize", &tmp, e))?;
    let mut header = match &plan.start {
        SegmentStart::Boot => Header {
            seed: job.seed,
            counter: 0,
            digest: Sha1::digest(job.seed.to_le_bytes()).into(),
            state_kib: (len / 1024) as u32,
        },
        SegmentStart::Restore { machine_state } => restore(machine_state, &out, &tmp, len, cancel)?,
    };
    let start_time = started.elapsed();

    let n = header.counter;
    let data_blocks = job.blocks.saturating_sub(1);
    let count = ((data_blocks as f64) * fraction).round() as u64;
    let mut select = Rng(u64_of(&hash(&[
        b"select",
        &header.seed.to_le_bytes(),
        &n.to_le_bytes(),
        &header.digest,
    ])));
    let mut chosen = pick(&mut select, data_blocks, count);
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
            .map_err(|e| io_err("read", &tmp, e))?;
        let old = Sha1::digest(&block);
        let mut rng = Rng(u64_of(&hash(&[
            b"block",
            &header.seed.to_le_bytes(),
            &n.to_le_bytes(),
            &index.to_le_bytes(),
            &old,
        ])));
        for word in block.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        out.write_all_at(&block, offset)
            .map_err(|e| io_err("write", &tmp, e))?;
        chain.update(index.to_le_bytes());
        chain.update(&block);
    }
    header.digest = chain.finalize().into();
    header.counter = n + 1;
    out.write_all_at(&header.encode(), 0)
        .map_err(|e| io_err("write", &tmp, e))?;

    let hex: String = header.digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut console = format!("synthetic: segment {n} digest {hex}\n");
    let halted = job.limit.is_some_and(|limit| header.counter >= limit);
    if halted {
        console.push_str(&format!("synthetic: done after {} segments\n", header.counter));
    }
    Ok(Done {
        console: console.into_bytes(),
        halted,
        start_time,
        run_time: Duration::ZERO,
    })
}

/// Checks the checkpoint and copies it into `out` (already sized),
/// skipping zero blocks so the copy stays sparse.
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
    let mut offset = 0u64;
    while offset < len {
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        let n = (len - offset).min(chunk.len() as u64) as usize;
        src.read_exact_at(&mut chunk[..n], offset)
            .map_err(|e| bad(e.to_string()))?;
        for (i, block) in chunk[..n].chunks(BLOCK).enumerate() {
            if block.iter().any(|&b| b != 0) {
                let at = offset + (i * BLOCK) as u64;
                out.write_all_at(block, at)
                    .map_err(|e| io_err("write", out_path, e))?;
            }
        }
        offset += n as u64;
    }
    Ok(header)
}

/// `count` distinct indices below `n`: a partial Fisher-Yates shuffle over
/// a virtual identity array, so memory follows `count`, not `n`.
fn pick(rng: &mut Rng, n: u64, count: u64) -> Vec<u64> {
    let count = count.min(n);
    let mut swapped = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let j = i + rng.below(n - i);
        let at_j = *swapped.get(&j).unwrap_or(&j);
        let at_i = *swapped.get(&i).unwrap_or(&i);
        swapped.insert(j, at_i);
        out.push(at_j);
    }
    out
}

/// SplitMix64: fast, and fully determined by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by rejection.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
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
