//! The guest's cgroup on the real machine (issue 15): a scavenging
//! provider's QEMU runs in a cgroup of its own under the provider's, with
//! a memory ceiling of the guest's memory plus the headroom and the lowest
//! CPU weight, and the cgroup is gone after the segment; the ceiling is a
//! real one; leftovers of dead daemons are swept, a running one's are not.
//!
//! Needs write access to this process's cgroup in the memory (and cpu)
//! hierarchy, as root on cgroup v1 has, or a delegated cgroup v2 subtree.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vmlot_provider::cgroup::{self, Confinement, GuestCgroup, Place};
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::{BootFiles, Driver, SegmentPlan, SegmentStart};
use vmlot_schemas::{HypervisorKind, VmConfig};

/// The tests take turns: a sweep must not meet another test's cgroup
/// between its making and its process entering it.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SETUP: &str = "run `make deps guest` in the repository root";
const MIB: u64 = 1 << 20;

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn place() -> &'static Place {
    cgroup::place().expect("guests' cgroups unavailable here (see the warning above): run as root on cgroup v1, or in a delegated cgroup v2 subtree")
}

/// Where the cgroup file system with `controller` is mounted (`None`:
/// the v2 one), from `/proc/self/mounts`.
fn mount_of(controller: Option<&str>) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        let wanted = match controller {
            Some(c) => f[2] == "cgroup" && f[3].split(',').any(|o| o == c),
            None => f[2] == "cgroup2",
        };
        wanted.then(|| PathBuf::from(f[1]))
    })
}

/// The path of process `pid`'s cgroup with `controller` (`None`: v2).
fn cgroup_of(pid: &str, controller: Option<&str>) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match controller {
            Some(c) => controllers.split(',').any(|have| have == c),
            None => id == "0",
        };
        wanted.then(|| path.to_string())
    })
}

fn read_at(mount: &Path, cgroup: &str, file: &str) -> Option<String> {
    let path = mount.join(cgroup.trim_start_matches('/')).join(file);
    Some(std::fs::read_to_string(path).ok()?.trim().to_string())
}

/// A QEMU child of this process, what its cgroup said while it ran.
#[derive(Debug)]
struct Seen {
    pid: String,
    /// Its cgroup path in the memory hierarchy (v1) or v2's.
    cgroup: String,
    /// Its path in the cpu hierarchy (v1 only).
    cpu_cgroup: Option<String>,
    limit: Option<String>,
    weight: Option<String>,
    idle: Option<String>,
}

/// QEMU children of this process, and their cgroups' settings.
fn qemu_children(v1: bool) -> Vec<Seen> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat.split_once('(').map_or("", |(_, c)| c);
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(1) != Some(&me.as_str()) || !comm.starts_with("qemu-system") || fields[0] == "Z" {
            continue;
        }
        let seen = if v1 {
            let (memory, cpu) = (mount_of(Some("memory")).unwrap(), mount_of(Some("cpu")));
            let cgroup = cgroup_of(&pid, Some("memory")).unwrap_or_default();
            let cpu_cgroup = cgroup_of(&pid, Some("cpu"));
            let at_cpu = |file| read_at(cpu.as_deref()?, cpu_cgroup.as_deref()?, file);
            Seen {
                limit: read_at(&memory, &cgroup, "memory.limit_in_bytes"),
                weight: at_cpu("cpu.shares"),
                idle: at_cpu("cpu.idle"),
                pid,
                cgroup,
                cpu_cgroup: cpu_cgroup.clone(),
            }
        } else {
            let mount = mount_of(None).unwrap();
            let cgroup = cgroup_of(&pid, None).unwrap_or_default();
            Seen {
                limit: read_at(&mount, &cgroup, "memory.max"),
                weight: read_at(&mount, &cgroup, "cpu.weight"),
                idle: read_at(&mount, &cgroup, "cpu.idle"),
                pid,
                cgroup,
                cpu_cgroup: None,
            }
        };
        found.push(seen);
    }
    found
}

#[test]
fn a_scavenging_providers_guest_runs_in_a_cgroup_of_its_own() {
    let _turn = turn();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(guest_in_its_cgroup());
}

async fn guest_in_its_cgroup() {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/guest");
    let files = BootFiles {
        kernel: guest.join("vmlinuz"),
        initrd: Some(guest.join("initrd.cpio.gz")),
        disks: Vec::new(),
        memory: None,
    };
    assert!(files.kernel.exists(), "no test guest: {SETUP}");
    let v1 = matches!(place(), Place::V1 { .. });
    let me = std::process::id().to_string();
    // This process's own cgroups, read before the driver runs (on v2 it
    // may move itself into a leaf of its cgroup).
    let (own, own_cpu) = if v1 {
        (
            cgroup_of(&me, Some("memory")).unwrap(),
            cgroup_of(&me, Some("cpu")),
        )
    } else {
        (cgroup_of(&me, None).unwrap(), None)
    };
    let under = |own: &str| format!("{}/{}/", own.trim_end_matches('/'), cgroup::GUESTS);
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
    let driver = QemuDriver::new(QemuConfig {
        accel: Accel::Tcg,
        idle_priority: true,
        confine: Some(Confinement { headroom_mib: 512 }),
        ..Default::default()
    });
    let run = driver.run_segment(&plan, CancellationToken::new());
    tokio::pin!(run);
    let mut seen = Vec::new();
    let report = loop {
        tokio::select! {
            report = &mut run => break report,
            _ = tokio::time::sleep(Duration::from_millis(200)) => seen.extend(qemu_children(v1)),
        }
    };
    report.unwrap();
    assert!(!seen.is_empty(), "QEMU never seen running");
    let ceiling = ((128 + 512) * MIB).to_string();
    for s in &seen {
        let name = s.cgroup.strip_prefix(&under(&own)).unwrap_or_else(|| {
            panic!(
                "QEMU {} is in {}, not under this process's {own}: {seen:?}",
                s.pid, s.cgroup
            )
        });
        assert!(
            !name.is_empty() && !name.contains('/') && name.ends_with(&format!(".{me}")),
            "the segment's cgroup should be named for this process: {name:?}"
        );
        assert_eq!(
            s.limit.as_deref(),
            Some(ceiling.as_str()),
            "memory ceiling: {s:?}"
        );
        if v1 {
            let cpu = s.cpu_cgroup.as_deref().unwrap_or_default();
            assert_eq!(
                cpu,
                format!("{}{name}", under(own_cpu.as_deref().unwrap())),
                "{s:?}"
            );
            // The lowest shares, or an idle group (cpu.idle, kernel 5.15
            // on), which the kernel weighs as SCHED_IDLE: 3.
            let lowest = if s.idle.as_deref() == Some("1") { "3" } else { "2" };
            assert_eq!(s.weight.as_deref(), Some(lowest), "cpu.shares: {s:?}");
        } else if s.weight.is_some() {
            assert_eq!(s.weight.as_deref(), Some("1"), "cpu.weight: {s:?}");
        }
        assert!(matches!(s.idle.as_deref(), None | Some("1")), "cpu.idle: {s:?}");
    }
    // The segment is over: its cgroup is gone, in every hierarchy.
    let memory = if v1 {
        mount_of(Some("memory"))
    } else {
        mount_of(None)
    }
    .unwrap();
    let gone = memory.join(seen[0].cgroup.trim_start_matches('/'));
    assert!(!gone.exists(), "{} left behind", gone.display());
    if let (Some(cpu), Some(path)) = (mount_of(Some("cpu")).filter(|_| v1), &seen[0].cpu_cgroup) {
        let gone = cpu.join(path.trim_start_matches('/'));
        assert!(!gone.exists(), "{} left behind", gone.display());
    }

    // A segment cancelled mid-run (QEMU killed) leaves no cgroup either.
    let cancel = CancellationToken::new();
    let run = driver.run_segment(&plan, cancel.clone());
    tokio::pin!(run);
    let mut confined = None;
    let report = loop {
        tokio::select! {
            report = &mut run => break report,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(s) = qemu_children(v1).into_iter().find(|s| s.cgroup.starts_with(&under(&own))) {
                    confined = Some(s.cgroup);
                    cancel.cancel();
                }
            }
        }
    };
    assert!(report.is_err(), "the cancelled segment should fail: {report:?}");
    let confined = confined.expect("QEMU never seen in its cgroup");
    let gone = memory.join(confined.trim_start_matches('/'));
    assert!(
        !gone.exists(),
        "{} left behind by a cancelled segment",
        gone.display()
    );
}

/// Runs `sh -c script` inside a fresh guest cgroup with `ceiling` bytes;
/// returns its exit code, the cgroup removed.
fn run_confined(script: &str, ceiling: u64) -> Option<i32> {
    let name = cgroup::guest_name(
        Path::new("ceiling-test"),
        std::process::id(),
        cgroup::next_segment(),
    );
    let cg = GuestCgroup::create(place(), &name, ceiling).unwrap();
    let join = cg.join();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: Join::enter only opens, writes and closes.
    unsafe {
        cmd.pre_exec(move || join.enter());
    }
    let status = cmd.status().unwrap();
    let dir = cg.memory_dir().to_path_buf();
    cg.remove();
    assert!(!dir.exists(), "{} left behind", dir.display());
    status.code()
}

#[test]
fn the_memory_ceiling_is_real() {
    let _turn = turn();
    // tail keeps a line without a newline in memory: 200 MB of it.
    let hold = "head -c 200000000 /dev/zero | tail";
    let small = run_confined(hold, 32 * MIB);
    assert_eq!(
        small,
        Some(128 + 9),
        "tail holding 200 MB under a 32 MiB ceiling should be OOM-killed"
    );
    let large = run_confined(hold, 1024 * MIB);
    assert_eq!(large, Some(0), "the same under 1 GiB should finish");
}

#[test]
fn leftovers_of_dead_daemons_are_swept() {
    let _turn = turn();
    let place = place();
    // A process that has exited (its pid free), one that runs.
    let mut done = Command::new("true").spawn().unwrap();
    let dead = done.id();
    done.wait().unwrap();
    let mut alive = Command::new("sleep").arg("60").spawn().unwrap();
    let leftover = GuestCgroup::create(place, &format!("leftover.{dead}"), 64 * MIB).unwrap();
    let running = GuestCgroup::create(place, &format!("running.{}", alive.id()), 64 * MIB).unwrap();
    // A dead daemon's cgroup with a process still in it stays too.
    let busy = GuestCgroup::create(place, &format!("busy.{dead}"), 64 * MIB).unwrap();
    let join = busy.join();
    let mut inside = Command::new("sleep");
    inside.arg("60");
    // SAFETY: Join::enter only opens, writes and closes.
    unsafe {
        inside.pre_exec(move || join.enter());
    }
    let mut inside = inside.spawn().unwrap();
    assert!(busy.contains(inside.id()));

    cgroup::sweep(place);
    let (l, r, b) = (
        leftover.memory_dir().exists(),
        running.memory_dir().exists(),
        busy.memory_dir().exists(),
    );
    for child in [&mut alive, &mut inside] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let dirs: Vec<PathBuf> = [&running, &busy]
        .iter()
        .map(|c| c.memory_dir().to_path_buf())
        .collect();
    for cg in [leftover, running, busy] {
        cg.remove();
    }
    assert!(!l, "an empty cgroup of a dead daemon should be swept");
    assert!(r, "a running daemon's cgroup should stay");
    assert!(b, "a cgroup with a process in it should stay");
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
