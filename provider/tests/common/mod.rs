//! What the provider's VM tests share: the test guest's files, a plan
//! for it, and a QEMU driver under TCG.

use std::path::Path;
use std::time::Duration;

use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{BootFiles, SegmentPlan, SegmentStart};
use vmlot_schemas::{HypervisorKind, VmConfig};

/// The test guest's memory.
pub const MEMORY_MIB: u32 = 128;

/// How to get what the VM tests need.
pub const SETUP: &str = "run `make deps guest` in the repository root (QEMU from scripts/deps.sh, \
                         the guest from scripts/build-guest.sh)";

/// The test guest (scripts/build-guest.sh); panics (fails the test) when
/// it or QEMU is missing.
pub fn guest() -> BootFiles {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest");
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.cpio.gz");
    for file in [&kernel, &initrd] {
        assert!(
            file.is_file(),
            "test guest file {} is missing: {SETUP}",
            file.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file()),
        "qemu-system-x86_64 is not on PATH: {SETUP}"
    );
    BootFiles {
        kernel,
        initrd: Some(initrd),
        disks: Vec::new(),
        memory: None,
    }
}

/// A plain (not deterministic, no owner) segment of the test guest with
/// `cmdline`, run in `workdir`.
pub fn plan(
    files: &BootFiles,
    cmdline: String,
    start: SegmentStart,
    run_for: Duration,
    workdir: &Path,
) -> SegmentPlan {
    SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Qemu,
            arch: "x86_64".into(),
            memory_mib: MEMORY_MIB,
            vcpus: 1,
            cmdline,
        },
        files: files.clone(),
        start,
        run_for,
        instructions: None,
        workdir: workdir.to_path_buf(),
        owner: None,
    }
}

/// The QEMU driver under TCG: the same on every machine, no KVM probe.
pub fn tcg() -> QemuDriver {
    QemuDriver::new(QemuConfig {
        binary: None,
        accel: Accel::Tcg,
        ..Default::default()
    })
}
