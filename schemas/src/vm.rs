//! The virtual machine itself, below the market and the books: what a VM
//! needs from a host (the part of an image a provider matches lots
//! against), the state it is left in between two segments, and how long a
//! segment's steps took. The market's results and the ledger's settlement
//! records both carry these, so they live in neither.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::ManifestId;

/// The hypervisor a job's checkpoints are made for; a checkpoint of one
/// kind can only be restored by the same kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    Qemu,
    Xen,
    /// A synthetic stand-in for market load tests; never a VM, never the default.
    Synthetic,
}

impl HypervisorKind {
    /// The subject token for this kind.
    pub fn as_str(&self) -> &'static str {
        match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Xen => "xen",
            HypervisorKind::Synthetic => "synthetic",
        }
    }
}

/// The virtual machine a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub hypervisor: HypervisorKind,
    /// Guest architecture, e.g. `x86_64`.
    pub arch: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Kernel command line for the first boot.
    pub cmdline: String,
}

/// A VM's whole state between two segments. Segment 0 starts from the
/// image (no machine state); later segments from the previous result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The hypervisor's saved machine state; `None` for a fresh boot.
    pub machine_state: Option<ManifestId>,
    /// The guest's RAM as an object of its own (a raw file of the machine's
    /// memory size, on the 4 KiB grid), when the machine state leaves it
    /// out: QEMU saves a guest run with its RAM in a file with
    /// `x-ignore-shared`, the device state only. `None`: the RAM, if any,
    /// is in the machine state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ManifestId>,
    /// The disks as they stand, in the image's order.
    #[serde(default)]
    pub disks: Vec<ManifestId>,
    /// Stored bytes of all parts (zero runs excluded): what a cold provider fetches.
    pub stored_bytes: u64,
}

impl Checkpoint {
    /// Its stored parts, each once in this order: the machine state, the
    /// memory part, the disks.
    pub fn parts(&self) -> impl Iterator<Item = &ManifestId> {
        self.machine_state.iter().chain(&self.memory).chain(&self.disks)
    }
}

/// How the guest stood at the end of the segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum GuestState {
    /// Still running: saved as this checkpoint, C(k+1).
    Running { checkpoint: Checkpoint },
    /// Powered off: the job is done. `final_state` is the guest as it
    /// stood when it stopped (its disks; no machine state): a result must
    /// carry it to be paid (records written before it existed have none).
    Halted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        final_state: Option<Checkpoint>,
    },
    /// Crashed: the job is done, failed by its own guest; `final_state` as
    /// for [`GuestState::Halted`].
    Crashed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        final_state: Option<Checkpoint>,
    },
    /// The segment never started: the lot's checkpoint did not restore on
    /// this provider's hypervisor. Never paid; reported by enough distinct
    /// providers, it voids the pending payment of the segment that
    /// produced the checkpoint. Never settles a segment.
    RestoreFailed { reason: String },
}

impl GuestState {
    /// The state the guest was left in: the next checkpoint of a running
    /// guest, the final state of one that ended.
    pub fn state(&self) -> Option<&Checkpoint> {
        match self {
            GuestState::Running { checkpoint } => Some(checkpoint),
            GuestState::Halted { final_state } | GuestState::Crashed { final_state, .. } => {
                final_state.as_ref()
            }
            GuestState::RestoreFailed { .. } => None,
        }
    }

    /// True once the guest has powered off or crashed.
    pub fn ended(&self) -> bool {
        matches!(self, GuestState::Halted { .. } | GuestState::Crashed { .. })
    }
}

/// Time spent in each step of a segment, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SegmentTimings {
    pub fetch_ms: u64,
    pub start_ms: u64,
    pub run_ms: u64,
    pub save_ms: u64,
    pub upload_ms: u64,
    /// Time the guest was held paused because the provider's machine owner
    /// needed the machine (cycle scavenging); not part of `run_ms`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suspended_ms: u64,
}

impl SegmentTimings {
    /// Each phase by name, in milliseconds (for metrics and reports).
    pub fn phases(&self) -> [(&'static str, u64); 6] {
        [
            ("fetch", self.fetch_ms),
            ("start", self.start_ms),
            ("run", self.run_ms),
            ("save", self.save_ms),
            ("upload", self.upload_ms),
            ("suspended", self.suspended_ms),
        ]
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
