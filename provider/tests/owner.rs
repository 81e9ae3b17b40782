//! The owner comes first (issue 15). The owner's activity leaves the
//! provider's own guests out: a guest this process started, hashing at
//! full speed under QEMU, is not the owner's activity, and the provider
//! still counts as idle; a busy program it did not start is the owner's,
//! and it does not. A scavenging provider's QEMU driver runs its guests
//! under the idle scheduling policy.
//!
//! Measured on the real machine over a few seconds each, so it needs the
//! machine otherwise quiet (as `cargo test` runs it: one test binary at a
//! time, and this one holds one test); the thresholds leave room for the
//! noise of a quiet machine, not for another busy program.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{BootFiles, Driver, SegmentPlan, SegmentStart};
use vmlot_provider::owner::Meter;
use vmlot_schemas::{HypervisorKind, VmConfig};

/// The tests take turns: one measures the machine's CPU.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SETUP: &str = "run `make deps guest` in the repository root";
/// How long each share is measured over.
const WINDOW: Duration = Duration::from_secs(3);

/// Kills the process on drop.
struct Killed(u32);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-9").arg(self.0.to_string()).status();
    }
}

/// The owner's share over [`WINDOW`], as `meter` sees it.
fn share_over_window(meter: &Meter) -> f64 {
    meter.owner_share();
    std::thread::sleep(WINDOW);
    meter.owner_share()
}

#[test]
fn a_guest_at_full_cpu_is_not_the_owners_activity_but_another_program_is() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest");
    let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initrd.cpio.gz"));
    assert!(kernel.exists() && initrd.exists(), "no test guest: {SETUP}");
    // The provider's guest: a child of this process, hashing for minutes.
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-m", "128", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet vmlot.steps=100000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("qemu-system-x86_64: {e}: {SETUP}"));
    let _guest = Killed(child.id());
    std::thread::sleep(Duration::from_secs(1));

    let provider = Meter::default();
    // The same machine with nothing left out: every busy tick counts.
    let everything = Meter::of(u32::MAX);
    everything.owner_share();
    let owner = share_over_window(&provider);
    let all = everything.owner_share();
    assert!(
        all > 0.35,
        "the guest should keep one of the machine's cores busy: {all:.2} of the CPU was"
    );
    assert!(
        owner < 0.2,
        "the provider's own guest counted as the owner's activity: {owner:.2} (the machine {all:.2})"
    );
    assert!(provider.idle(Some(0.25)));
    drop(_guest);
    let _ = child.wait();

    // A busy program the provider did not start: its parent exits at once,
    // so it is nobody's child here.
    let out = Command::new("sh")
        .args(["-c", "(while :; do :; done) >/dev/null 2>&1 & echo $!"])
        .output()
        .unwrap();
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let _hog = Killed(pid);
    let owner = share_over_window(&provider);
    assert!(
        owner > 0.3,
        "a program the provider did not start is the owner's activity: only {owner:.2}"
    );
    assert!(!provider.idle(Some(0.25)));
}

/// Children of this process whose command is QEMU's, with their
/// scheduling policy (`/proc/PID/stat` field 41; 5 is `SCHED_IDLE`).
fn qemu_children() -> Vec<(u32, u32)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat.split_once('(').map_or("", |(_, c)| c);
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        let policy: u32 = fields.get(38).and_then(|f| f.parse().ok()).unwrap_or(u32::MAX);
        let zombie = fields.first() == Some(&"Z");
        if ppid == me && comm.starts_with("qemu-system") && !zombie {
            found.push((pid, policy));
        }
    }
    found
}

#[test]
fn a_scavenging_providers_guest_runs_under_the_idle_policy() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(idle_policy());
}

async fn idle_policy() {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest");
    let files = BootFiles {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.cpio.gz")),
        disks: Vec::new(),
        memory: None,
    };
    assert!(files.kernel.exists(), "no test guest: {SETUP}");
    let dir = tempfile::tempdir().unwrap();
    let plan = SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Qemu,
            arch: "x86_64".into(),
            memory_mib: 128,
            vcpus: 1,
            cmdline: "console=ttyS0 quiet loglevel=1 vmlot.steps=1000".into(),
        },
        files,
        start: SegmentStart::Boot,
        run_for: Duration::from_secs(3),
        instructions: None,
        workdir: dir.path().to_path_buf(),
        owner: None,
    };
    for idle in [true, false] {
        let driver = QemuDriver::new(QemuConfig {
            accel: Accel::Tcg,
            idle_priority: idle,
            ..Default::default()
        });
        let run = driver.run_segment(&plan, CancellationToken::new());
        tokio::pin!(run);
        let mut seen = Vec::new();
        let report = loop {
            tokio::select! {
                report = &mut run => break report,
                _ = tokio::time::sleep(Duration::from_millis(200)) => seen.extend(qemu_children()),
            }
        };
        report.unwrap();
        assert!(!seen.is_empty(), "QEMU never seen running");
        let want = if idle { 5 } else { 0 };
        assert!(
            seen.iter().all(|&(_, policy)| policy == want),
            "idle priority {idle}: policies {seen:?}"
        );
    }
}
