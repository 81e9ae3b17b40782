//! The hypervisor driver interface: boot from an image or restore from a
//! checkpoint, run T seconds, save, and report how the guest ended.
//!
//! A driver works on local files only; moving them through the
//! content-addressed store is the caller's job. Drivers: [`qemu`] (QMP),
//! [`xen`] (`xl` in dom0), [`synthetic`] (no VM, for market load tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::{HypervisorKind, VmConfig};

pub mod qemu;
pub mod synthetic;
pub mod xen;

/// The files an image boots from. Restores need them too: QEMU rebuilds
/// the same machine before it loads the saved state into it.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Raw disk images, attached in order; the guest writes them in place.
    pub disks: Vec<PathBuf>,
}

/// Where a segment starts.
#[derive(Clone, Debug)]
pub enum SegmentStart {
    /// Segment 0: boot the image.
    Boot,
    /// A later segment: restore this saved machine state (the disks in
    /// [`BootFiles::disks`] are the checkpoint's disks).
    Restore { machine_state: PathBuf },
}

/// One segment to run.
#[derive(Clone, Debug)]
pub struct SegmentPlan {
    pub vm: VmConfig,
    pub files: BootFiles,
    pub start: SegmentStart,
    /// How long the guest runs before it is stopped and saved.
    pub run_for: Duration,
    /// A directory the driver owns for this segment (sockets, logs, the
    /// saved state it writes).
    pub workdir: PathBuf,
}

/// How a segment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Still running when the segment ended: saved.
    Saved {
        machine_state: PathBuf,
        /// The disks as they stand (the same files as [`BootFiles::disks`]).
        disks: Vec<PathBuf>,
    },
    /// The guest powered off: the job is done, no checkpoint needed.
    Halted,
    /// The guest crashed (panic, reset, triple fault).
    Crashed { reason: String },
}

/// What a driver reports for one segment.
#[derive(Clone, Debug)]
pub struct SegmentReport {
    pub end: SegmentEnd,
    /// Everything the guest wrote to its console during this segment.
    pub console: Vec<u8>,
    /// Boot or restore until the guest runs.
    pub start_time: Duration,
    /// Time the guest ran.
    pub run_time: Duration,
    /// Stop + save.
    pub save_time: Duration,
}

/// Why a segment could not be run. The provider survives every one of
/// these: the attempt fails, the daemon goes on.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("hypervisor binary {binary} not found (install {package})")]
    MissingBinary { binary: String, package: &'static str },
    #[error("this driver runs {expected:?} guests, the lot is for {actual:?}")]
    WrongHypervisor {
        expected: HypervisorKind,
        actual: HypervisorKind,
    },
    #[error("image refused: {0}")]
    BadImage(String),
    #[error("hypervisor failed to start: {0}")]
    Start(String),
    #[error("QMP: {0}")]
    Qmp(String),
    /// The Xen toolstack cannot be used: not a dom0, xenstored down, `xl`
    /// failing or not answering, a domain gone behind the driver's back.
    #[error("Xen toolstack: {0}")]
    Toolstack(String),
    #[error("restore failed: {0}")]
    Restore(String),
    #[error("save failed: {0}")]
    Save(String),
    #[error("segment cancelled")]
    Cancelled,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A hypervisor driver.
pub trait Driver: Send + Sync {
    fn kind(&self) -> HypervisorKind;

    /// Runs one segment. On `cancel` the guest is stopped and the attempt
    /// ends with [`DriverError::Cancelled`]; nothing of it is kept.
    fn run_segment<'a>(
        &'a self,
        plan: &'a SegmentPlan,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<SegmentReport, DriverError>>;
}

/// Refuses what a hypervisor would refuse later and less clearly: an
/// architecture other than x86_64, no memory or vCPUs, boot files or a
/// saved state that are not files.
pub(crate) fn validate(plan: &SegmentPlan) -> Result<(), DriverError> {
    let vm = &plan.vm;
    if vm.arch != "x86_64" {
        return Err(DriverError::BadImage(format!(
            "this driver runs x86_64 guests, the image is {}",
            vm.arch
        )));
    }
    if vm.memory_mib == 0 || vm.vcpus == 0 {
        return Err(DriverError::BadImage(format!(
            "memory_mib ({}) and vcpus ({}) must be positive",
            vm.memory_mib, vm.vcpus
        )));
    }
    let files = &plan.files;
    let mut check = vec![("kernel", &files.kernel)];
    check.extend(files.initrd.iter().map(|p| ("initrd", p)));
    check.extend(files.disks.iter().map(|p| ("disk", p)));
    for (what, path) in check {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(DriverError::BadImage(format!(
                    "{what} {} is not a file",
                    path.display()
                )));
            }
            Err(e) => return Err(DriverError::BadImage(format!("{what} {}: {e}", path.display()))),
        }
    }
    if let SegmentStart::Restore { machine_state } = &plan.start {
        match std::fs::metadata(machine_state) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(DriverError::Restore(format!(
                    "{} is not a file",
                    machine_state.display()
                )));
            }
            Err(e) => return Err(DriverError::Restore(format!("{}: {e}", machine_state.display()))),
        }
    }
    Ok(())
}

/// The hypervisor's binary, checked to exist, so a missing one is reported
/// as such (naming the Debian `package` that ships it) rather than as a
/// failed start. A bare name is looked up on `PATH`.
pub(crate) fn find_binary(binary: &Path, package: &'static str) -> Result<PathBuf, DriverError> {
    let missing = || DriverError::MissingBinary {
        binary: binary.display().to_string(),
        package,
    };
    if binary.components().count() > 1 {
        return if is_executable(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_executable(p))
        .ok_or_else(missing)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path, e)),
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> DriverError {
    DriverError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}
