//! The QEMU driver: one QEMU process per segment, driven over QMP.
//!
//! A segment either boots the image (QEMU starts with `-S`, so the guest
//! only runs once QMP is up and the clock is started with `cont`), or
//! rebuilds the very same machine with `-incoming defer` and loads a
//! checkpoint into it. The guest then runs for the planned wall-clock time,
//! unless it powers off or crashes first. A guest still running is stopped
//! and saved to `<workdir>/machine-state` (see [`vm`]).
//!
//! Every segment writes its own serial console file, so the console of a
//! segment is exactly what the guest printed during it: the consoles of a
//! job's segments, concatenated, are the console of an uninterrupted run.
//!
//! The guest's second serial port (ttyS1) is the provider's notice
//! channel: before a save forced by the machine's owner (see
//! [`OwnerPolicy`](crate::driver::OwnerPolicy)) the driver writes one line,
//! `vmlot-preempt <seconds>`, to `<workdir>/notice.sock`, where QEMU
//! listens. A guest that wants the warning reads ttyS1 (raw, no echo).
//!
//! - [`args`]: QEMU's command line (one machine for boot and restore).
//! - [`qmp`]: typed QMP requests and the client that sends them.
//! - [`vm`]: one segment's QEMU process and the template's steps on it.
//! - [`memory`]: the guest's RAM as a file of its own, readied before QEMU
//!   starts.
//! - [`exact`]: deterministic segments, stopped at an exact instruction
//!   count with the `vmlot-icount-stop` plugin.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::process::Command;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::HypervisorKind;

use crate::cgroup::Confinement;
use crate::driver::api::{Driver, DriverError, SegmentPlan, SegmentReport};
use crate::driver::host::{expect_kind, find_binary, io_err, remove_if_exists, spawn_error, validate};
use crate::driver::template;

pub(crate) mod args;
pub mod exact;
mod memory;
mod process;
pub(crate) mod qmp;
pub(crate) mod vm;

pub use args::Accel;
pub use process::{DEFAULT_BINARY, PACKAGE};
pub use vm::NOTICE_WORD;

/// The serial console of the segment, in its workdir.
pub const CONSOLE_FILE: &str = "console.log";
/// QEMU's stdout and stderr, in the workdir (kept for post-mortems).
pub const STDERR_FILE: &str = "qemu.stderr";

/// A working KVM takes well under a second to boot a Linux kernel to its
/// root-mount panic; TCG needs ~10 s, a broken KVM never gets there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run QEMU.
#[derive(Clone, Debug, Default)]
pub struct QemuConfig {
    /// The QEMU system emulator; a bare name is looked up on `PATH`.
    /// Default: [`DEFAULT_BINARY`].
    pub binary: Option<PathBuf>,
    pub accel: Accel,
    /// The `vmlot-icount-stop` plugin for deterministic segments. Default:
    /// [`PLUGIN_FILE`] beside the running program (where cargo and the
    /// release build put it).
    pub icount_stop_plugin: Option<PathBuf>,
    /// Run guests under the idle scheduling policy (`SCHED_IDLE`): they
    /// get a CPU only when nothing else on the machine wants it, so the
    /// owner's own work is not slowed (cycle scavenging).
    pub idle_priority: bool,
    /// Run each guest in a cgroup of its own under the provider's, with
    /// the lowest CPU weight and a memory ceiling of the guest's memory
    /// plus a headroom (see [`crate::cgroup`]); `None`: in the provider's.
    pub confine: Option<Confinement>,
}

/// The plugin's file name as cargo builds it.
pub const PLUGIN_FILE: &str = "libvmlot_icount_stop.so";
/// QEMU's trace log of a deterministic segment, in the workdir.
pub const TRACE_FILE: &str = "qemu-trace.log";

/// Runs segments of x86_64 guests in QEMU, talking QMP over a unix socket.
///
/// Checkpoints made under one accelerator should be restored under the
/// same one, so providers of one market should agree on it.
pub struct QemuDriver {
    binary: PathBuf,
    accel: Accel,
    plugin: Option<PathBuf>,
    idle_priority: bool,
    confine: Option<Confinement>,
    /// The answer of the KVM probe, for [`Accel::Auto`].
    probed: OnceCell<Accel>,
}

impl QemuDriver {
    pub fn new(config: QemuConfig) -> Self {
        let beside_us = || Some(std::env::current_exe().ok()?.parent()?.join(PLUGIN_FILE));
        QemuDriver {
            binary: config.binary.unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY)),
            accel: config.accel,
            plugin: config.icount_stop_plugin.or_else(beside_us),
            idle_priority: config.idle_priority,
            confine: config.confine,
            probed: OnceCell::new(),
        }
    }

    /// The accelerator segments of this driver run with: [`Accel::Kvm`] or
    /// [`Accel::Tcg`].
    ///
    /// For [`Accel::Auto`] the first call probes and the answer is kept for
    /// the driver's lifetime. The probe does not trust `/dev/kvm` merely
    /// opening (on some hosts it opens, even runs the firmware, and then
    /// hangs in the guest kernel's decompressor): if `/dev/kvm` opens it
    /// boots `kernel` under `-accel kvm` with no initrd, no disk and
    /// `panic=-1`, so a working CPU reaches the root-mount panic, resets,
    /// and QEMU (`-no-reboot`) exits by itself. Exiting cleanly within
    /// [`PROBE_TIMEOUT`] (5 s) means KVM works; anything else means TCG.
    /// Cost: under a second with KVM, 5 s once per driver without it.
    pub async fn accel_for(&self, kernel: &Path, cancel: &CancellationToken) -> Result<Accel, DriverError> {
        match self.accel {
            Accel::Kvm | Accel::Tcg | Accel::Icount => Ok(self.accel),
            Accel::Auto => {
                let binary = find_binary(&self.binary, PACKAGE)?;
                let accel = self
                    .probed
                    .get_or_try_init(|| async {
                        let works = probe_kvm(&binary, kernel, cancel).await?;
                        let accel = if works { Accel::Kvm } else { Accel::Tcg };
                        tracing::info!(?accel, "QEMU accelerator probed");
                        Ok::<_, DriverError>(accel)
                    })
                    .await?;
                Ok(*accel)
            }
        }
    }

    async fn run(&self, plan: &SegmentPlan, cancel: CancellationToken) -> Result<SegmentReport, DriverError> {
        expect_kind(plan, HypervisorKind::Qemu)?;
        validate(plan)?;
        let binary = find_binary(&self.binary, PACKAGE)?;
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        tokio::fs::create_dir_all(&plan.workdir)
            .await
            .map_err(|e| io_err("create", &plan.workdir, e))?;
        let accel = self.accel_for(&plan.files.kernel, &cancel).await?;

        let workdir = &plan.workdir;
        let console = workdir.join(CONSOLE_FILE);
        let socket = args::socket_path(workdir);
        let notice = args::socket_path_named(workdir, "notice");
        // A fresh console per segment: its bytes are this segment's output.
        remove_if_exists(&console)?;
        remove_if_exists(&socket)?;
        remove_if_exists(&notice)?;
        let exact = match plan.instructions {
            None => None,
            Some(n) => Some(self.exact_args(workdir, n)?),
        };
        let stderr = workdir.join(STDERR_FILE);
        let machine = vm::QemuMachine::new(binary, accel, console, stderr, socket, notice, exact)
            .idle_priority(self.idle_priority)
            .confine(self.confine);
        template::run_segment(machine, plan, workdir, &cancel).await
    }
}

impl QemuDriver {
    /// The plugin, its control socket and the trace log of a deterministic
    /// segment of `instructions` in `workdir`.
    fn exact_args(&self, workdir: &Path, instructions: u64) -> Result<exact::ExactArgs, DriverError> {
        let plugin = self
            .plugin
            .clone()
            .filter(|p| p.is_file())
            .ok_or_else(|| DriverError::Start(format!(
                "deterministic segments need the icount-stop plugin ({PLUGIN_FILE}: build it with `cargo build -p vmlot-icount-stop`, or set qemu.icount_stop_plugin); not found at {}",
                self.plugin.as_deref().map_or("(nowhere)".into(), |p| p.display().to_string())
            )))?;
        let trace = workdir.join(TRACE_FILE);
        remove_if_exists(&trace)?;
        Ok(exact::ExactArgs {
            instructions,
            plugin,
            ctl: args::socket_path_named(workdir, "stop"),
            trace,
        })
    }
}

impl Driver for QemuDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn run_segment<'a>(
        &'a self,
        plan: &'a SegmentPlan,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<SegmentReport, DriverError>> {
        Box::pin(self.run(plan, cancel))
    }
}

/// See [`QemuDriver::accel_for`].
async fn probe_kvm(binary: &Path, kernel: &Path, cancel: &CancellationToken) -> Result<bool, DriverError> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(false);
    }
    let mut cmd = Command::new(binary);
    cmd.args(["-accel", "kvm", "-machine", "q35", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-serial", "none", "-kernel"])
        .arg(kernel)
        .args(["-append", "panic=-1 loglevel=0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_error(binary, PACKAGE, e, DriverError::Start))?;
    let outcome = tokio::select! {
        _ = cancel.cancelled() => Err(DriverError::Cancelled),
        exit = tokio::time::timeout(PROBE_TIMEOUT, child.wait()) => {
            Ok(matches!(exit, Ok(Ok(status)) if status.success()))
        }
    };
    let _ = child.kill().await;
    outcome
}
