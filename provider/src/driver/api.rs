//! What the daemon and a driver say to each other: a [`SegmentPlan`] in, a
//! [`SegmentReport`] or a [`DriverError`] out, through the [`Driver`]
//! trait. Kept apart from the drivers so that every driver, the segment
//! template and the daemon depend on it and it depends on none of them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::{HypervisorKind, VmConfig};

/// The files an image boots from. Restores need them too: QEMU rebuilds
/// the same machine before it loads the saved state into it.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Raw disk images, attached in order; the guest writes them in place.
    pub disks: Vec<PathBuf>,
    /// The guest's RAM as a file of its own, written in place by the guest
    /// and left out of the saved machine state, so a save writes the device
    /// state only and this file is the checkpoint's memory part (QEMU: a
    /// shared file-backed memory backend saved with `x-ignore-shared`; the
    /// other drivers refuse it). Made empty for a boot, or for a restore of
    /// a state saved with its RAM inside; a state saved without its RAM
    /// needs the file it was saved beside.
    pub memory: Option<PathBuf>,
}

/// Where a segment starts.
#[derive(Clone, Debug)]
pub enum SegmentStart {
    /// Segment 0: boot the image.
    Boot,
    /// A later segment: restore this saved machine state (the disks in
    /// [`BootFiles::disks`] are the checkpoint's disks).
    Restore { machine_state: PathBuf },
}

/// One segment to run.
#[derive(Clone, Debug)]
pub struct SegmentPlan {
    pub vm: VmConfig,
    pub files: BootFiles,
    pub start: SegmentStart,
    /// How long the guest runs before it is stopped and saved.
    pub run_for: Duration,
    /// A deterministic segment: the guest runs exactly this many
    /// instructions under a virtual clock (QEMU only), and `run_for` only
    /// bounds how long that may take.
    pub instructions: Option<u64>,
    /// A directory the driver owns for this segment (sockets, logs, the
    /// saved state it writes).
    pub workdir: PathBuf,
    /// Cycle scavenging: the machine's owner comes first, so while the
    /// owner is busy the guest is paused, and saved early if the owner
    /// stays busy (see [`OwnerPolicy`]). Ignored by deterministic segments
    /// (`instructions`), whose replicas must run their exact count.
    pub owner: Option<OwnerPolicy>,
}

/// What a segment does when the machine's owner needs the machine: the
/// guest is paused at once; if the owner is still busy after
/// `suspend_for`, the guest is resumed, told it will be saved in `notice`
/// (never more than what is left of the segment), and saved then: the
/// segment is reported preempted.
#[derive(Clone)]
pub struct OwnerPolicy {
    /// True while the owner needs the machine (asked once per `poll`).
    pub busy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// How long a paused guest waits for the owner to go idle again before
    /// it is preempted; zero preempts at once, without a pause.
    pub suspend_for: Duration,
    /// How long the guest runs between the notice and the save.
    pub notice: Duration,
    /// How often `busy` is asked: the guest runs in slices this long.
    pub poll: Duration,
}

impl OwnerPolicy {
    /// How often a provider asks whether its owner is busy: the owner's
    /// CPU share is measured over a second at least.
    pub const POLL: Duration = Duration::from_secs(1);

    /// A policy polling `busy` every [`Self::POLL`].
    pub fn new(busy: Arc<dyn Fn() -> bool + Send + Sync>, suspend_for: Duration, notice: Duration) -> Self {
        OwnerPolicy {
            busy,
            suspend_for,
            notice,
            poll: Self::POLL,
        }
    }

    /// Whether the owner needs the machine now.
    pub fn is_busy(&self) -> bool {
        (self.busy)()
    }
}

impl fmt::Debug for OwnerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnerPolicy")
            .field("busy", &format_args!("<fn>"))
            .field("suspend_for", &self.suspend_for)
            .field("notice", &self.notice)
            .field("poll", &self.poll)
            .finish()
    }
}

/// How a segment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Still running when the segment ended: saved.
    Saved {
        machine_state: PathBuf,
        /// The guest's RAM, when it is not in the machine state (the same
        /// file as [`BootFiles::memory`]).
        memory: Option<PathBuf>,
        /// The disks as they stand (the same files as [`BootFiles::disks`]).
        disks: Vec<PathBuf>,
    },
    /// The guest powered off: the job is done, no checkpoint needed.
    Halted,
    /// The guest crashed (panic, reset, triple fault).
    Crashed { reason: String },
}

/// What a driver reports for one segment.
#[derive(Clone, Debug)]
pub struct SegmentReport {
    pub end: SegmentEnd,
    /// Everything the guest wrote to its console during this segment.
    pub console: Vec<u8>,
    /// Boot or restore until the guest runs.
    pub start_time: Duration,
    /// Time the guest ran (paused time left out).
    pub run_time: Duration,
    /// Stop + save.
    pub save_time: Duration,
    /// Time the guest was held paused for the machine's owner.
    pub suspended: Duration,
    /// Saved before its time was up because the owner stayed busy (see
    /// [`OwnerPolicy`]).
    pub preempted: bool,
}

/// Where a segment's guest stands. Each step of a segment is allowed from
/// one state only (see [`VmStep`]); the segment template refuses the others
/// with [`DriverError::NotRunning`] or [`DriverError::AlreadyStarted`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Not started yet.
    Created,
    /// Booted or restored, and not yet saved or ended.
    Running,
    /// Held still for the machine's owner, to be resumed.
    Paused,
    /// Powered off or crashed by itself.
    Ended,
    /// Saved: the guest is gone, its state is in the file.
    Saved,
    /// Whatever was left of it has been ended by the driver.
    Stopped,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "not started",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Ended => "ended",
            VmState::Saved => "saved",
            VmState::Stopped => "stopped",
        })
    }
}

/// A step of a segment, as named in a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStep {
    /// Boot or restore.
    Start,
    /// Let the guest run.
    Run,
    /// Stop the guest and save it.
    Save,
    /// Hold the guest still (for the machine's owner).
    Pause,
    /// Let a paused guest go on.
    Resume,
    /// Tell the guest it is about to be saved.
    Notice,
}

impl fmt::Display for VmStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmStep::Start => "start",
            VmStep::Run => "run",
            VmStep::Save => "save",
            VmStep::Pause => "pause",
            VmStep::Resume => "resume",
            VmStep::Notice => "notify",
        })
    }
}

/// Why a segment could not be run. The provider survives every one of
/// these: the attempt fails, the daemon goes on.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("hypervisor binary {binary} not found (install {package})")]
    MissingBinary { binary: String, package: &'static str },
    #[error("this driver runs {expected:?} guests, the lot is for {actual:?}")]
    WrongHypervisor {
        expected: HypervisorKind,
        actual: HypervisorKind,
    },
    #[error("image refused: {0}")]
    BadImage(String),
    #[error("hypervisor failed to start: {0}")]
    Start(String),
    #[error("QMP: {0}")]
    Qmp(String),
    /// The Xen toolstack cannot be used: not a dom0, xenstored down, `xl`
    /// failing or not answering, a domain gone behind the driver's back.
    #[error("Xen toolstack: {0}")]
    Toolstack(String),
    #[error("restore failed: {0}")]
    Restore(String),
    #[error("save failed: {0}")]
    Save(String),
    /// A run or a save asked of a guest that is not running: one that was
    /// never started, is paused, has ended, or is saved already (or a
    /// resume of one that is not paused).
    #[error("cannot {step} a guest that is {state}")]
    NotRunning { step: VmStep, state: VmState },
    /// A second start of the same guest.
    #[error("cannot start a guest that is {state}: a guest starts once")]
    AlreadyStarted { state: VmState },
    #[error("segment cancelled")]
    Cancelled,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A hypervisor driver.
pub trait Driver: Send + Sync {
    fn kind(&self) -> HypervisorKind;

    /// Runs one segment. On `cancel` the guest is stopped and the attempt
    /// ends with [`DriverError::Cancelled`]; nothing of it is kept.
    fn run_segment<'a>(
        &'a self,
        plan: &'a SegmentPlan,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<SegmentReport, DriverError>>;
}
