//! What the provider's VM tests share: the test guest's files.

use std::path::Path;

use vmlot_provider::driver::BootFiles;

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
    }
}
