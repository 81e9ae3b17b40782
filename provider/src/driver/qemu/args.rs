//! QEMU's command line. The machine is fixed (`-machine q35`,
//! `-nodefaults`, two serial ports, raw disks as virtio-blk): a checkpoint
//! only loads into a machine built with the same arguments, so boot and
//! restore share one argument list and differ only in how QEMU waits
//! (`-S` before a boot, `-incoming defer` before a restore).
//!
//! The serial ports: the guest's ttyS0 is its console, written to the
//! segment's console file; ttyS1 is the provider's notice channel, a unix
//! socket QEMU listens on ([`NOTICE_CHARDEV`]) where the driver writes
//! `vmlot-preempt <seconds>` before an early save. Every machine has both,
//! deterministic or not, so that any checkpoint restores into any segment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::exact::{ExactArgs, STOP_TRACE};
use crate::driver::api::{DriverError, SegmentPlan, SegmentStart};

/// Which QEMU accelerator runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// KVM if it really runs guests here, else TCG. Decided once per driver
    /// by a probe boot (see [`super::QemuDriver::accel_for`]).
    #[default]
    Auto,
    /// Hardware virtualization; fails to start where `/dev/kvm` is unusable.
    Kvm,
    /// Pure emulation: slow, but works everywhere.
    Tcg,
    /// The deterministic machine's emulation (one TCG thread, the guest's
    /// clock its instruction count, a fixed RTC, as deterministic segments run) with no
    /// instruction stop: the only machine a deterministic job's state
    /// restores into, so `vmlot run-local` resumes such a job with it.
    Icount,
}

impl Accel {
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            // Auto is resolved before a machine is built; TCG is the safe side.
            // Icount's machine is built from DETERMINISTIC, not this flag.
            Accel::Tcg | Accel::Auto | Accel::Icount => "tcg",
        }
    }
}

/// `sun_path` is 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 100;

/// The guest's RAM backend when it runs in a file of its own: named as
/// QEMU names the RAM of `-m` alone, so the RAM block keeps its id
/// (`pc.ram`) and a state saved with its RAM inside loads into either.
pub(crate) const MEMORY_BACKEND: &str = "pc.ram";

/// The id of the notice channel's chardev (the guest's second serial port).
pub(crate) const NOTICE_CHARDEV: &str = "vmlot-notice";

/// The unix sockets and files of one QEMU process, in its workdir.
pub(crate) struct Paths<'a> {
    /// The serial console (ttyS0), a file.
    pub console: &'a Path,
    /// QMP.
    pub qmp: &'a Path,
    /// The notice channel (ttyS1), a socket QEMU listens on.
    pub notice: &'a Path,
}

/// Everything QEMU is started with for `plan`: the machine, its serial
/// console and notice channel, QMP, and the wait for a boot or a restore.
pub(crate) fn command_line(
    plan: &SegmentPlan,
    accel: Accel,
    paths: &Paths<'_>,
    exact: Option<&ExactArgs>,
) -> Result<Vec<OsString>, DriverError> {
    let socket = paths.qmp;
    let mut args = machine_args(plan, accel, paths, exact.is_some())?;
    if let Some(exact) = exact {
        args.extend(exact_args(exact)?);
    }
    args.push("-chardev".into());
    args.push(
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            escape(socket).map_err(DriverError::Start)?
        )
        .into(),
    );
    args.push("-mon".into());
    args.push("chardev=qmp,mode=control".into());
    match plan.start {
        SegmentStart::Boot => args.push("-S".into()),
        SegmentStart::Restore { .. } => {
            args.push("-incoming".into());
            args.push("defer".into());
        }
    }
    Ok(args)
}

/// A deterministic machine: one vCPU in one TCG thread, the guest's time
/// its instruction count (`-icount shift=0`: one instruction, one virtual
/// nanosecond; `sleep=off`: an idle guest skips to its next timer), its
/// clock starting at a fixed date. Every replica of a segment, and every
/// segment of the job, runs with these.
const DETERMINISTIC: [&str; 6] = [
    "-accel",
    "tcg,thread=single",
    "-icount",
    "shift=0,sleep=off",
    "-rtc",
    "clock=vm,base=2024-01-01T00:00:00",
];

/// The plugin that parks the vCPU at a counted instruction, and the trace
/// log that tells when QEMU began to stop (see [`super::exact`]).
fn exact_args(exact: &ExactArgs) -> Result<Vec<OsString>, DriverError> {
    let plugin = escape(&exact.plugin).map_err(DriverError::Start)?;
    let ctl = escape(&exact.ctl).map_err(DriverError::Start)?;
    Ok(vec![
        "-plugin".into(),
        format!("{plugin},ctl={ctl}").into(),
        "-D".into(),
        exact.trace.clone().into_os_string(),
        "-trace".into(),
        STOP_TRACE.into(),
    ])
}

/// The machine: identical for a boot and for a restore into it.
fn machine_args(
    plan: &SegmentPlan,
    accel: Accel,
    paths: &Paths<'_>,
    deterministic: bool,
) -> Result<Vec<OsString>, DriverError> {
    let vm = &plan.vm;
    let deterministic = deterministic || accel == Accel::Icount;
    if deterministic && vm.vcpus != 1 {
        return Err(DriverError::BadImage(format!(
            "a deterministic segment runs one vCPU; the image has {}",
            vm.vcpus
        )));
    }
    let machine = match &plan.files.memory {
        None => "q35".to_string(),
        Some(_) => format!("q35,memory-backend={MEMORY_BACKEND}"),
    };
    let mut args: Vec<OsString> = if deterministic {
        DETERMINISTIC.iter().map(OsString::from).collect()
    } else {
        vec!["-accel".into(), accel.flag().into()]
    };
    args.extend(
        [
            "-machine",
            &machine,
            "-m",
            &vm.memory_mib.to_string(),
            "-smp",
            &vm.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            // A reset (panic=-1 after a panic, a triple fault) ends the guest
            // instead of rebooting it; with -no-shutdown QEMU then stays up so
            // the SHUTDOWN event, and not a closed socket, tells how it ended.
            "-no-reboot",
            "-no-shutdown",
        ]
        .iter()
        .map(OsString::from),
    );
    if let Some(memory) = &plan.files.memory {
        let path = escape(memory).map_err(DriverError::BadImage)?;
        args.push("-object".into());
        args.push(
            format!(
                "memory-backend-file,id={MEMORY_BACKEND},size={}M,mem-path={path},share=on",
                vm.memory_mib
            )
            .into(),
        );
    }
    // The order of -serial is the guest's: ttyS0 (COM1) first.
    let console = escape(paths.console).map_err(DriverError::Start)?;
    args.push("-chardev".into());
    args.push(format!("file,id=console,path={console}").into());
    args.push("-serial".into());
    args.push("chardev:console".into());
    // wait=off: QEMU does not wait for a client; without one the guest's
    // writes to ttyS1 are dropped and it reads nothing.
    let notice = escape(paths.notice).map_err(DriverError::Start)?;
    args.push("-chardev".into());
    args.push(format!("socket,id={NOTICE_CHARDEV},path={notice},server=on,wait=off").into());
    args.push("-serial".into());
    args.push(format!("chardev:{NOTICE_CHARDEV}").into());
    args.push("-kernel".into());
    args.push(plan.files.kernel.clone().into_os_string());
    if let Some(initrd) = &plan.files.initrd {
        args.push("-initrd".into());
        args.push(initrd.clone().into_os_string());
    }
    args.push("-append".into());
    args.push(vm.cmdline.clone().into());
    for disk in &plan.files.disks {
        let disk = escape(disk).map_err(DriverError::BadImage)?;
        args.push("-drive".into());
        args.push(format!("file={disk},format=raw,if=virtio").into());
    }
    Ok(args)
}

/// `<workdir>/qmp.sock`, or a short path under the temp dir when the
/// workdir is too deep for a unix socket address.
pub(crate) fn socket_path(workdir: &Path) -> PathBuf {
    socket_path_named(workdir, "qmp")
}

/// `<workdir>/NAME.sock`, or a short path under the temp dir when the
/// workdir is too deep for a unix socket address.
pub(crate) fn socket_path_named(workdir: &Path, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = workdir.join(format!("{name}.sock"));
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vmlot-{name}-{}-{n}.sock", std::process::id()))
}

/// A path as a QEMU option value: UTF-8, commas doubled.
fn escape(path: &Path) -> Result<String, String> {
    Ok(utf8(path)?.replace(',', ",,"))
}

/// A path as QMP and QEMU options carry it: UTF-8 only.
pub(crate) fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vmlot_schemas::{HypervisorKind, VmConfig};

    use super::*;
    use crate::driver::api::BootFiles;

    fn plan(start: SegmentStart) -> SegmentPlan {
        SegmentPlan {
            vm: VmConfig {
                hypervisor: HypervisorKind::Qemu,
                arch: "x86_64".into(),
                memory_mib: 128,
                vcpus: 2,
                cmdline: "console=ttyS0".into(),
            },
            files: BootFiles {
                kernel: "/img/vmlinuz".into(),
                initrd: None,
                disks: vec!["/w/disk,0.raw".into()],
                memory: None,
            },
            start,
            run_for: Duration::ZERO,
            instructions: None,
            workdir: "/w".into(),
            owner: None,
        }
    }

    fn paths() -> Paths<'static> {
        Paths {
            console: Path::new("/w/console.log"),
            qmp: Path::new("/w/qmp.sock"),
            notice: Path::new("/w/notice.sock"),
        }
    }

    fn line(start: SegmentStart) -> Vec<String> {
        command_line(&plan(start), Accel::Tcg, &paths(), None)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn boot_and_restore_build_the_same_machine() {
        let boot = line(SegmentStart::Boot);
        let restore = line(SegmentStart::Restore {
            machine_state: "/w/in".into(),
        });
        assert_eq!(boot.last().unwrap(), "-S");
        assert_eq!(&restore[restore.len() - 2..], ["-incoming", "defer"]);
        assert_eq!(boot[..boot.len() - 1], restore[..restore.len() - 2]);
        assert!(boot.contains(&"file=/w/disk,,0.raw,format=raw,if=virtio".to_string()));
        assert!(boot.contains(&"socket,id=qmp,path=/w/qmp.sock,server=on,wait=off".to_string()));
    }

    /// ttyS0 is the console and ttyS1 the notice socket, on every machine:
    /// boots and restores, deterministic or not.
    #[test]
    fn every_machine_has_the_console_then_the_notice_port() {
        let exact = ExactArgs {
            instructions: 1000,
            plugin: "/p/libvmlot_icount_stop.so".into(),
            ctl: "/w/stop.sock".into(),
            trace: "/w/trace.log".into(),
        };
        let mut deterministic = plan(SegmentStart::Boot);
        deterministic.vm.vcpus = 1;
        let lines = [
            line(SegmentStart::Boot),
            line(SegmentStart::Restore {
                machine_state: "/w/in".into(),
            }),
            command_line(&deterministic, Accel::Tcg, &paths(), Some(&exact))
                .unwrap()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect(),
        ];
        for line in lines {
            let serials: Vec<&str> = line
                .windows(2)
                .filter(|w| w[0] == "-serial")
                .map(|w| w[1].as_str())
                .collect();
            assert_eq!(serials, ["chardev:console", "chardev:vmlot-notice"], "{line:?}");
            assert!(
                line.contains(&"socket,id=vmlot-notice,path=/w/notice.sock,server=on,wait=off".to_string()),
                "{line:?}"
            );
        }
    }

    /// Icount builds the deterministic machine (the one a quorum job's
    /// state was saved in) without the plugin that stops it.
    #[test]
    fn icount_builds_the_deterministic_machine_without_a_stop() {
        let mut one = plan(SegmentStart::Restore {
            machine_state: "/w/in".into(),
        });
        one.vm.vcpus = 1;
        let line: Vec<String> = command_line(&one, Accel::Icount, &paths(), None)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(line[..DETERMINISTIC.len()], DETERMINISTIC);
        assert!(!line.iter().any(|a| a == "-plugin"), "{line:?}");
        assert_eq!(line.iter().filter(|a| *a == "-accel").count(), 1, "{line:?}");
        let two = plan(SegmentStart::Boot);
        assert!(matches!(
            command_line(&two, Accel::Icount, &paths(), None),
            Err(DriverError::BadImage(_))
        ));
    }

    #[test]
    fn deep_workdirs_get_a_short_socket() {
        assert_eq!(socket_path(Path::new("/w")), Path::new("/w/qmp.sock"));
        let deep = PathBuf::from(format!("/{}", "d".repeat(120)));
        let socket = socket_path(&deep);
        assert!(
            socket.as_os_str().len() <= MAX_SOCKET_PATH,
            "{}",
            socket.display()
        );
    }
}
