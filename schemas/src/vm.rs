//! What a VM needs from a host: the part of an image a provider matches
//! lots against.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
