//! Deterministic segments on real QEMU: the guest runs an exact count of
//! instructions under a virtual clock, stopped there by the
//! `vmlot-icount-stop` plugin (`cargo build -p vmlot-icount-stop`, which
//! `make test` runs). Two replicas of a segment, and of the segment that
//! continues from each, print the same console and end in the same state
//! (by the canonical digest of the save, which leaves out the host's
//! clock); the raw saves differ.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::qemu::{Accel, PLUGIN_FILE, QemuConfig, QemuDriver};
use vmlot_provider::driver::{BootFiles, Driver, SegmentEnd, SegmentPlan, SegmentStart};
use vmlot_schemas::{HypervisorKind, VmConfig};

const SETUP: &str = "run `make deps guest` and `cargo build -p vmlot-icount-stop` in the repository root";

fn guest() -> BootFiles {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest");
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
    for file in [&kernel, &initrd] {
        assert!(
            file.is_file(),
            "test guest file {} is missing: {SETUP}",
            file.display()
        );
    }
    BootFiles {
        kernel,
        initrd: Some(initrd),
        disks: Vec::new(),
        memory: None,
    }
}

/// The plugin cargo built into this profile's directory (the test runs
/// from its `deps/` subdirectory).
fn plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let plugin = exe
        .parent()
        .and_then(Path::parent)
        .expect("profile directory")
        .join(PLUGIN_FILE);
    assert!(plugin.is_file(), "{} is missing: {SETUP}", plugin.display());
    plugin
}

fn driver() -> QemuDriver {
    QemuDriver::new(QemuConfig {
        binary: None,
        accel: Accel::Tcg,
        icount_stop_plugin: Some(plugin()),
        ..Default::default()
    })
}

fn plan(start: SegmentStart, instructions: u64, workdir: &Path) -> SegmentPlan {
    SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Qemu,
            arch: "x86_64".into(),
            memory_mib: 128,
            vcpus: 1,
            cmdline: "console=ttyS0 quiet loglevel=0 panic=-1 vmlot.steps=40 vmlot.work_kib=256".into(),
        },
        files: guest(),
        start,
        run_for: Duration::from_secs(10),
        instructions: Some(instructions),
        workdir: workdir.to_path_buf(),
        owner: None,
    }
}

/// Runs one replica's segment; its saved state and console.
async fn replica(
    driver: &QemuDriver,
    start: SegmentStart,
    instructions: u64,
    workdir: &Path,
) -> (PathBuf, Vec<u8>) {
    let report = driver
        .run_segment(&plan(start, instructions, workdir), CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("deterministic segment in {}: {e}", workdir.display()));
    match report.end {
        SegmentEnd::Saved { machine_state, .. } => (machine_state, report.console),
        other => panic!("the guest should still run: {other:?}"),
    }
}

/// The canonical digest of a save, each page by the SHA-256 of its bytes.
fn canonical(save: &Path) -> [u8; 32] {
    use vmlot_cas::qemucanon::{canonical_digest, page_sha256};
    let bytes = std::fs::read(save).unwrap();
    canonical_digest(&bytes[..], page_sha256(&bytes[..]))
        .unwrap_or_else(|e| panic!("{}: {e}", save.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_a_deterministic_segment_end_in_the_same_state() {
    let driver = driver();
    let dir = tempfile::tempdir().unwrap();
    let mut states = Vec::new();
    for r in ["a", "b"] {
        let first = dir.path().join(format!("{r}-1"));
        let (state1, console1) = replica(&driver, SegmentStart::Boot, 3_000_000_000, &first).await;
        // Keep the state: the next segment's workdir is another one.
        let kept = dir.path().join(format!("{r}-1.state"));
        std::fs::rename(&state1, &kept).unwrap();
        let second = dir.path().join(format!("{r}-2"));
        let start = SegmentStart::Restore {
            machine_state: kept.clone(),
        };
        let (state2, console2) = replica(&driver, start, 3_500_000_000, &second).await;
        states.push((kept, console1, state2, console2));
    }
    let (a, b) = (&states[0], &states[1]);
    assert_ne!(
        std::fs::read(&a.0).unwrap(),
        std::fs::read(&b.0).unwrap(),
        "raw saves hold the host's clock"
    );
    assert_eq!(
        canonical(&a.0),
        canonical(&b.0),
        "segment 1 ends in the same state"
    );
    assert_eq!(a.1, b.1, "segment 1 prints the same");
    assert_eq!(
        canonical(&a.2),
        canonical(&b.2),
        "segment 2 ends in the same state"
    );
    assert!(!a.3.is_empty(), "the guest printed its steps in segment 2");
    assert_eq!(a.3, b.3, "segment 2 prints the same");
}
