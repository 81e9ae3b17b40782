//! One guest's cgroup: its name, its directories and settings (pure
//! layout), made and removed, and joined between fork and exec.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::place::{CgroupError, GUESTS, Place, io_error, write_file};

/// The kernel's lowest `cpu.shares` (v1).
const V1_LOWEST_SHARES: &str = "2";
/// The lowest `cpu.weight` (v2).
const V2_LOWEST_WEIGHT: &str = "1";
pub(super) const MIB: u64 = 1 << 20;
/// A QEMU killed a moment ago is still exiting: its cgroup is removed as
/// soon as it is empty, tried this long.
const REMOVE_PATIENCE: Duration = Duration::from_secs(10);
const REMOVE_POLL: Duration = Duration::from_millis(50);

/// How a guest's cgroup is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Confinement {
    /// Memory allowed beyond the guest's own, in MiB.
    pub headroom_mib: u64,
}

impl Confinement {
    /// The memory ceiling of a guest of `guest_mib` MiB, in bytes.
    pub fn ceiling_bytes(&self, guest_mib: u32) -> u64 {
        (u64::from(guest_mib) + self.headroom_mib) * MIB
    }
}

/// The name of the cgroup of a guest run in `workdir` by process `pid`:
/// the lot's id where the path names one (the daemon runs a lot in
/// `<work_dir>/<lot>/run`), else `segment-<n>`; then `.<pid>`.
pub fn guest_name(workdir: &Path, pid: u32, n: u64) -> String {
    let lot = workdir
        .ancestors()
        .filter_map(|dir| dir.file_name()?.to_str())
        .find(|name| uuid::Uuid::parse_str(name).is_ok());
    match lot {
        Some(lot) => format!("{lot}.{pid}"),
        None => format!("segment-{n}.{pid}"),
    }
}

/// A process-wide number for [`guest_name`]'s `segment-<n>`.
pub fn next_segment() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A file of a guest's cgroup and what goes in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Setting {
    file: &'static str,
    value: String,
    /// Written only where the kernel has the file (`cpu.idle`, and v2's
    /// `cpu.weight` when the cpu controller is not delegated).
    if_present: bool,
}

pub(super) fn setting(file: &'static str, value: impl Into<String>, if_present: bool) -> Setting {
    Setting {
        file,
        value: value.into(),
        if_present,
    }
}

/// The directories of the guest cgroup `name` under `place`, each with what
/// is written into it. The first holds the memory controller.
pub(super) fn layout(place: &Place, name: &str, ceiling_bytes: u64) -> Vec<(PathBuf, Vec<Setting>)> {
    let memory = |file| setting(file, ceiling_bytes.to_string(), false);
    match place {
        Place::V1 { memory: mem, cpu } => {
            let mut dirs = vec![(mem.join(GUESTS).join(name), vec![memory("memory.limit_in_bytes")])];
            if let Some(cpu) = cpu {
                dirs.push((
                    cpu.join(GUESTS).join(name),
                    vec![
                        setting("cpu.shares", V1_LOWEST_SHARES, false),
                        setting("cpu.idle", "1", true),
                    ],
                ));
            }
            dirs
        }
        Place::V2 { own } => vec![(
            own.join(GUESTS).join(name),
            vec![
                memory("memory.max"),
                setting("cpu.weight", V2_LOWEST_WEIGHT, true),
                setting("cpu.idle", "1", true),
            ],
        )],
    }
}

/// One guest's cgroup (its directory in each hierarchy).
#[derive(Debug)]
pub struct GuestCgroup {
    dirs: Vec<PathBuf>,
    join: Join,
}

impl GuestCgroup {
    /// Makes the cgroup `name` under `place` with a memory ceiling of
    /// `ceiling_bytes` and the lowest CPU weight. Nothing is left behind
    /// when a step fails.
    pub fn create(place: &Place, name: &str, ceiling_bytes: u64) -> Result<GuestCgroup, CgroupError> {
        let layout = layout(place, name, ceiling_bytes);
        let made = GuestCgroup {
            dirs: layout.iter().map(|(dir, _)| dir.clone()).collect(),
            join: Join::new(layout.iter().map(|(dir, _)| dir.join("cgroup.procs"))),
        };
        let apply = || {
            for (dir, settings) in &layout {
                std::fs::create_dir_all(dir).map_err(io_error("mkdir", dir))?;
                for s in settings {
                    let path = dir.join(s.file);
                    if s.if_present && !path.exists() {
                        continue;
                    }
                    write_file(&path, &s.value).map_err(io_error("write", &path))?;
                }
            }
            Ok(())
        };
        // On failure `made` is dropped: what was made is removed.
        apply().map(|()| made)
    }

    /// The cgroup's directory in the memory hierarchy (v1), or its only
    /// one (v2).
    pub fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// What the child calls between fork and exec to enter the cgroup.
    pub fn join(&self) -> Join {
        self.join.clone()
    }

    /// Whether process `pid` is in the cgroup (in its memory hierarchy).
    pub fn contains(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.memory_dir().join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
    }

    /// Removes the cgroup (as dropping it does): now if nothing runs in
    /// it, else from a thread that tries again for [`REMOVE_PATIENCE`] (a
    /// process killed a moment ago is still exiting).
    pub fn remove(self) {
        drop(self)
    }
}

impl Drop for GuestCgroup {
    fn drop(&mut self) {
        if remove_dirs(&self.dirs).is_ok() {
            return;
        }
        let dirs = std::mem::take(&mut self.dirs);
        std::thread::spawn(move || {
            let deadline = Instant::now() + REMOVE_PATIENCE;
            loop {
                std::thread::sleep(REMOVE_POLL);
                match remove_dirs(&dirs) {
                    Ok(()) => return,
                    Err(e) if Instant::now() >= deadline => {
                        let dir = dirs[0].display();
                        tracing::warn!(%dir, "guest cgroup not removed: {e}");
                        return;
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// Removes cgroup directories; those already gone count as removed.
fn remove_dirs(dirs: &[PathBuf]) -> io::Result<()> {
    for dir in dirs {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `cgroup.procs` files of a guest's cgroup as C strings, made before
/// the fork: [`Join::enter`] only opens, writes and closes, which is safe
/// between fork and exec.
#[derive(Clone, Debug)]
pub struct Join {
    procs: Vec<CString>,
}

impl Join {
    fn new(paths: impl Iterator<Item = PathBuf>) -> Join {
        Join {
            procs: paths
                .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
                .collect(),
        }
    }

    /// Moves the calling process into the cgroup (`0` in `cgroup.procs`
    /// names the writer). Async-signal-safe: for a `pre_exec` hook.
    pub fn enter(&self) -> io::Result<()> {
        for path in &self.procs {
            // SAFETY: `path` is a valid C string owned by self; the
            // descriptor is closed on every path.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = (written != 1).then(io::Error::last_os_error);
                libc::close(fd);
                if let Some(err) = err {
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}
