//! The checks every driver makes before it touches a hypervisor, and the
//! small file and process helpers they share, written once: a lot for
//! another hypervisor, an image a hypervisor would refuse later and less
//! clearly, a hypervisor binary that is missing (named with its package).

use std::path::{Path, PathBuf};

use vmlot_schemas::HypervisorKind;

use super::api::{DriverError, SegmentPlan, SegmentStart};

/// Refuses a lot for another hypervisor than `kind`, and a guest RAM file
/// ([`BootFiles::memory`]) for a hypervisor whose RAM is in its own save.
///
/// [`BootFiles::memory`]: super::api::BootFiles::memory
pub(crate) fn expect_kind(plan: &SegmentPlan, kind: HypervisorKind) -> Result<(), DriverError> {
    if plan.vm.hypervisor != kind {
        return Err(DriverError::WrongHypervisor {
            expected: kind,
            actual: plan.vm.hypervisor,
        });
    }
    if plan.files.memory.is_some() && kind != HypervisorKind::Qemu {
        return Err(DriverError::BadImage(format!(
            "a {kind:?} guest's RAM is in its saved state: no memory file"
        )));
    }
    Ok(())
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

/// A hypervisor process that could not be spawned: a binary gone since
/// [`find_binary`] saw it is [`DriverError::MissingBinary`], anything else
/// the driver's own kind of failure (`other`).
pub(crate) fn spawn_error(
    binary: &Path,
    package: &'static str,
    e: std::io::Error,
    other: fn(String) -> DriverError,
) -> DriverError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DriverError::MissingBinary {
            binary: binary.display().to_string(),
            package,
        }
    } else {
        other(format!("spawn {}: {e}", binary.display()))
    }
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
