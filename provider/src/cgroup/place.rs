//! Where the daemon's guests' cgroups go: the daemon's own cgroup, found
//! from `/proc/self/cgroup` and `/proc/self/mountinfo` (pure), and the few
//! file operations every cgroup step shares.

use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// The directory, under the daemon's cgroup, that holds its guests' cgroups.
pub const GUESTS: &str = "vmlot-guests";
/// cgroup v2: the leaf the daemon moves into when its own cgroup holds
/// processes.
pub const DAEMON_LEAF: &str = "daemon";
/// Why guests cannot have cgroups of their own here.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub(super) fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// The daemon's own cgroup: the directories its guests' cgroups go under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// cgroup v1: the daemon's cgroup in the memory hierarchy, and in the
    /// cpu one when that is mounted.
    V1 { memory: PathBuf, cpu: Option<PathBuf> },
    /// cgroup v2: the daemon's cgroup (as it was before the daemon moved
    /// into [`DAEMON_LEAF`]).
    V2 { own: PathBuf },
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::V1 {
                memory,
                cpu: Some(cpu),
            } => {
                write!(f, "cgroup v1 under {} and {}", memory.display(), cpu.display())
            }
            Place::V1 { memory, cpu: None } => {
                write!(f, "cgroup v1 under {} (no cpu hierarchy)", memory.display())
            }
            Place::V2 { own } => write!(f, "cgroup v2 under {}", own.display()),
        }
    }
}

impl Place {
    /// The `vmlot-guests` directories.
    pub(super) fn guest_dirs(&self) -> Vec<PathBuf> {
        match self {
            Place::V1 { memory, cpu } => std::iter::once(memory)
                .chain(cpu)
                .map(|d| d.join(GUESTS))
                .collect(),
            Place::V2 { own } => vec![own.join(GUESTS)],
        }
    }
}

/// The path of this process's cgroup in `/proc/self/cgroup` (lines
/// `id:controllers:path`): in the v1 hierarchy that has `controller`, or
/// with `None` the v2 one (`0::path`).
pub fn own_path<'a>(proc_self_cgroup: &'a str, controller: Option<&str>) -> Option<&'a str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(c) => controllers.split(',').any(|have| have == c),
        };
        wanted.then_some(path)
    })
}

/// A cgroup file system mounted here, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// The hierarchy's directory shown at `point` (`/` unless a subtree is
    /// bind-mounted, as in some containers).
    root: String,
    point: PathBuf,
    v2: bool,
    /// The super options: a v1 mount's controllers are among them.
    options: Vec<String>,
}

impl Mount {
    /// Where cgroup `path` (as `/proc/self/cgroup` names it) is on disk.
    fn dir(&self, path: &str) -> Option<PathBuf> {
        let rest = if self.root == "/" {
            path
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        let rest = rest.trim_start_matches('/');
        Some(if rest.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rest)
        })
    }
}

/// The cgroup mounts in `/proc/self/mountinfo` (`id parent dev root point
/// options [optional…] - type source super-options`).
fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mine, theirs) = line.split_once(" - ")?;
            let mine: Vec<&str> = mine.split(' ').collect();
            let mut theirs = theirs.split(' ');
            let fstype = theirs.next()?;
            let options = theirs.nth(1).unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(Mount {
                root: mine.get(3)?.to_string(),
                point: PathBuf::from(mine.get(4)?),
                v2,
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The daemon's [`Place`] from its `/proc/self/cgroup` and
/// `/proc/self/mountinfo`: cgroup v1 where the memory controller is on a
/// v1 hierarchy (a controller is on one hierarchy at a time), else v2.
pub fn locate(proc_self_cgroup: &str, mountinfo: &str) -> Result<Place, CgroupError> {
    let mounts = cgroup_mounts(mountinfo);
    let v1_dir = |controller: &str| {
        let mount = mounts
            .iter()
            .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))?;
        let path = own_path(proc_self_cgroup, Some(controller));
        Some(path.and_then(|p| mount.dir(p)).ok_or_else(|| {
            CgroupError::Unavailable(format!(
                "this process's {controller} cgroup ({path:?}) is not under {} (mounted from {})",
                mount.point.display(),
                mount.root
            ))
        }))
    };
    if let Some(memory) = v1_dir("memory") {
        let cpu = v1_dir("cpu").and_then(Result::ok);
        return Ok(Place::V1 { memory: memory?, cpu });
    }
    let Some(mount) = mounts.iter().find(|m| m.v2) else {
        return Err(CgroupError::Unavailable(
            "no cgroup file system with the memory controller is mounted".into(),
        ));
    };
    let path = own_path(proc_self_cgroup, None);
    match path.and_then(|p| mount.dir(p)) {
        Some(own) => Ok(Place::V2 { own }),
        None => Err(CgroupError::Unavailable(format!(
            "this process's cgroup v2 ({path:?}) is not under {}",
            mount.point.display()
        ))),
    }
}

/// What a v2 cgroup enables for its children, from its
/// `cgroup.controllers`: memory (needed) and cpu (when there).
pub fn v2_controllers(available: &str) -> Result<&'static str, CgroupError> {
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    match (has("memory"), has("cpu")) {
        (true, true) => Ok("+memory +cpu"),
        (true, false) => Ok("+memory"),
        (false, _) => Err(CgroupError::Unavailable(format!(
            "the memory controller is not available to this cgroup (cgroup.controllers: {:?})",
            available.trim()
        ))),
    }
}

/// The process that made a guest's cgroup, from its name (`….<pid>`).
pub fn owner_pid(name: &str) -> Option<u32> {
    name.rsplit_once('.')?.1.parse().ok()
}

/// Writes `value` into the existing cgroup file `path`.
pub(super) fn write_file(path: &Path, value: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

pub(super) fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("mkdir", path)(e)),
    }
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(io_error("read", path))
}
