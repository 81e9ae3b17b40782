//! The daemon's side: its place probed (for the doctor) and prepared once
//! (v2: controllers delegated), leftovers swept, and a cgroup for each
//! guest, or a warning once when guests cannot be confined.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::guest::{Confinement, GuestCgroup, guest_name, next_segment};
use super::place::{
    CgroupError, DAEMON_LEAF, GUESTS, Place, io_error, locate, make_dir, owner_pid, read, v2_controllers,
    write_file,
};

/// This process's [`Place`], found without writing anything: the memory
/// controller is there and the daemon may make cgroups under it (what
/// `vmlot-provider doctor` reports).
pub fn probe() -> Result<Place, CgroupError> {
    let place = locate(
        &read(Path::new("/proc/self/cgroup"))?,
        &read(Path::new("/proc/self/mountinfo"))?,
    )?;
    let mut writable = match &place {
        Place::V1 { memory, cpu } => std::iter::once(memory).chain(cpu).cloned().collect(),
        Place::V2 { own } => {
            v2_controllers(&read(&own.join("cgroup.controllers"))?)?;
            vec![own.clone(), own.join("cgroup.subtree_control")]
        }
    };
    for path in writable.drain(..) {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| CgroupError::Unavailable(format!("{} has a NUL byte", path.display())))?;
        // SAFETY: access(2) reads the C string and touches nothing else.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(io_error("write access to", &path)(io::Error::last_os_error()));
        }
    }
    Ok(place)
}

/// cgroup v2: enables the memory (and cpu) controllers for `own`'s
/// children and for `vmlot-guests`'s, moving the daemon into
/// [`DAEMON_LEAF`] when processes in `own` keep it from doing so.
fn delegate_v2(own: &Path) -> Result<(), CgroupError> {
    let enable = v2_controllers(&read(&own.join("cgroup.controllers"))?)?;
    let control = own.join("cgroup.subtree_control");
    if let Err(e) = write_file(&control, enable) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io_error("write", &control)(e));
        }
        let leaf = own.join(DAEMON_LEAF);
        make_dir(&leaf)?;
        let procs = leaf.join("cgroup.procs");
        write_file(&procs, "0").map_err(io_error("write", &procs))?;
        tracing::info!(cgroup = %leaf.display(), "moved the daemon into a leaf cgroup, to delegate controllers to its guests");
        write_file(&control, enable).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => CgroupError::Unavailable(format!(
                "other processes share the daemon's cgroup {}: run it alone in one (a systemd unit with Delegate=yes)",
                own.display()
            )),
            _ => io_error("write", &control)(e),
        })?;
    }
    let guests = own.join(GUESTS);
    make_dir(&guests)?;
    let control = guests.join("cgroup.subtree_control");
    write_file(&control, enable).map_err(io_error("write", &control))
}

/// Removes the empty guest cgroups left by daemons no longer running (or
/// by an earlier process with this one's pid); a running daemon's stay.
pub fn sweep(place: &Place) {
    let me = std::process::id();
    for guests in place.guest_dirs() {
        let Ok(entries) = std::fs::read_dir(&guests) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let alive = owner_pid(&name.to_string_lossy())
                .is_some_and(|pid| pid != me && Path::new("/proc").join(pid.to_string()).exists());
            // A cgroup with processes in it refuses rmdir: only empty ones go.
            if entry.path().is_dir() && !alive && std::fs::remove_dir(entry.path()).is_ok() {
                tracing::info!(cgroup = %entry.path().display(), "removed a leftover guest cgroup");
            }
        }
    }
}

/// Finds the daemon's place, makes `vmlot-guests` (v2: delegates the
/// controllers) and sweeps leftovers.
fn prepare() -> Result<Place, CgroupError> {
    let place = probe()?;
    match &place {
        Place::V1 { .. } => {
            for dir in place.guest_dirs() {
                make_dir(&dir)?;
            }
        }
        Place::V2 { own } => delegate_v2(own)?,
    }
    sweep(&place);
    Ok(place)
}

/// The daemon's place for its guests' cgroups, prepared on the first call
/// (at the daemon's start): `None` when guests cannot be confined here,
/// said once in a warning.
pub fn place() -> Option<&'static Place> {
    static PLACE: OnceLock<Option<Place>> = OnceLock::new();
    PLACE
        .get_or_init(|| match prepare() {
            Ok(place) => {
                tracing::info!(%place, "each guest runs in a cgroup of its own");
                Some(place)
            }
            Err(e) => {
                unconfined(&e);
                None
            }
        })
        .as_ref()
}

/// Logs that guests run without a cgroup of their own: a warning the first
/// time, a debug line after.
pub fn unconfined(why: &dyn fmt::Display) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!("guest runs without a cgroup of its own: {why}");
    } else {
        tracing::warn!(
            "guests run without a cgroup of their own (SCHED_IDLE only, no memory ceiling): {why}"
        );
    }
}

/// A cgroup for the guest of a segment run in `workdir`, with `confinement`
/// for `guest_mib` MiB of guest memory; `None` (logged) when it cannot be had.
pub fn for_guest(workdir: &Path, guest_mib: u32, confinement: Confinement) -> Option<GuestCgroup> {
    let place = place()?;
    let name = guest_name(workdir, std::process::id(), next_segment());
    match GuestCgroup::create(place, &name, confinement.ceiling_bytes(guest_mib)) {
        Ok(cgroup) => Some(cgroup),
        Err(e) => {
            unconfined(&e);
            None
        }
    }
}
