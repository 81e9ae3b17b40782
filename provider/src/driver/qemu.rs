//! The QEMU driver: one QEMU process per segment, driven over QMP.
//!
//! A segment either boots the image (QEMU starts with `-S`, so the guest
//! only runs once QMP is up and the clock is started with `cont`), or
//! rebuilds the very same machine with `-incoming defer` and loads a
//! checkpoint into it. The guest then runs for the planned wall-clock time,
//! unless it powers off or crashes first. A guest still running is stopped
//! and saved with the `mapped-ram` migration capability to
//! `<workdir>/machine-state`: RAM pages sit at fixed 4 KiB-aligned offsets
//! and zero pages are holes, so the file is sparse and successive
//! checkpoints of one guest differ only where the guest wrote.
//!
//! Every segment writes its own serial console file, so the console of a
//! segment is exactly what the guest printed during it: the consoles of a
//! job's segments, concatenated, are the console of an uninterrupted run.
//!
//! The machine is fixed (`-machine q35`, `-nodefaults`, one serial port,
//! raw disks as virtio-blk): a checkpoint only loads into a machine built
//! with the same arguments, so boot and restore share one argument list.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::HypervisorKind;

use super::{
    Driver, DriverError, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart, find_binary, io_err,
    remove_if_exists, validate,
};

/// Used when [`QemuConfig::binary`] is not set; looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// The Debian package that ships [`DEFAULT_BINARY`], named in errors.
pub const PACKAGE: &str = "qemu-system-x86";
/// The file a saved segment leaves in its workdir.
pub const STATE_FILE: &str = "machine-state";
const PARTIAL_STATE_FILE: &str = "machine-state.partial";
/// The serial console of the segment, in its workdir.
pub const CONSOLE_FILE: &str = "console.log";
/// QEMU's stdout and stderr, in the workdir (kept for post-mortems).
pub const STDERR_FILE: &str = "qemu.stderr";
const QMP_SOCKET: &str = "qmp.sock";

/// QEMU creates its QMP socket within milliseconds; this only bounds a
/// process that neither opens it nor exits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Saves and loads are local file copies of guest RAM (~0.6 s for 128 MiB
/// here); this only catches a wedged migration.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
const MIGRATION_POLL: Duration = Duration::from_millis(20);
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A working KVM takes well under a second to boot a Linux kernel to its
/// root-mount panic; TCG needs ~10 s, a broken KVM never gets there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// `sun_path` is 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 100;

/// Which QEMU accelerator runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accel {
    /// KVM if it really runs guests here, else TCG. Decided once per driver
    /// by a probe boot (see [`QemuDriver::accel_for`]).
    #[default]
    Auto,
    /// Hardware virtualization; fails to start where `/dev/kvm` is unusable.
    Kvm,
    /// Pure emulation: slow, but works everywhere.
    Tcg,
}

impl Accel {
    fn flag(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            // Auto is resolved before a machine is built; TCG is the safe side.
            Accel::Tcg | Accel::Auto => "tcg",
        }
    }
}

/// How to run QEMU.
#[derive(Clone, Debug, Default)]
pub struct QemuConfig {
    /// The QEMU system emulator; a bare name is looked up on `PATH`.
    /// Default: [`DEFAULT_BINARY`].
    pub binary: Option<PathBuf>,
    pub accel: Accel,
}

/// Runs segments of x86_64 guests in QEMU, talking QMP over a unix socket.
///
/// Checkpoints made under one accelerator should be restored under the
/// same one, so providers of one market should agree on it.
pub struct QemuDriver {
    binary: PathBuf,
    accel: Accel,
    /// The answer of the KVM probe, for [`Accel::Auto`].
    probed: OnceCell<Accel>,
}

impl QemuDriver {
    pub fn new(config: QemuConfig) -> Self {
        QemuDriver {
            binary: config.binary.unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY)),
            accel: config.accel,
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
            Accel::Kvm | Accel::Tcg => Ok(self.accel),
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
        if plan.vm.hypervisor != HypervisorKind::Qemu {
            return Err(DriverError::WrongHypervisor {
                expected: HypervisorKind::Qemu,
                actual: plan.vm.hypervisor,
            });
        }
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
        let state = workdir.join(STATE_FILE);
        let stderr = workdir.join(STDERR_FILE);
        let socket = socket_path(workdir);
        // A fresh console per segment: its bytes are this segment's output.
        remove_if_exists(&console)?;
        remove_if_exists(&socket)?;

        let mut args = machine_args(plan, accel, &console)?;
        args.push("-chardev".into());
        args.push(
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                escape(&socket).map_err(DriverError::Start)?
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

        let started = Instant::now();
        let mut vm = Vm::spawn(&binary, &args, &stderr, socket)?;
        tracing::debug!(workdir = %workdir.display(), ?accel, "QEMU started");
        let result = drive(&mut vm, plan, &state, started, &cancel).await;
        match &result {
            Ok(_) => vm.quit().await,
            Err(_) => vm.kill().await,
        }
        drop(vm);
        let (end, start_time, run_time, save_time) = result?;
        let console = match tokio::fs::read(&console).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read", &console, e)),
        };
        Ok(SegmentReport {
            end,
            console,
            start_time,
            run_time,
            save_time,
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

type Outcome = (SegmentEnd, Duration, Duration, Duration);

/// Start → run → save on a spawned QEMU; the caller ends the process.
async fn drive(
    vm: &mut Vm,
    plan: &SegmentPlan,
    state: &Path,
    started: Instant,
    cancel: &CancellationToken,
) -> Result<Outcome, DriverError> {
    vm.connect(cancel).await?;
    if let SegmentStart::Restore { machine_state } = &plan.start {
        restore(vm, machine_state, cancel).await?;
    }
    // Booted with -S, and a restored machine stays paused (it was saved
    // stopped): either way the guest runs from here.
    vm.command("cont", None, cancel)
        .await
        .map_err(|e| vm.qmp_error(e))?;
    let start_time = started.elapsed();

    let run_started = Instant::now();
    let ended = run_guest(vm, plan.run_for, cancel).await?;
    let run_time = run_started.elapsed();
    if let Some(end) = ended {
        return Ok((end, start_time, run_time, Duration::ZERO));
    }

    // Saved under another name and renamed once complete: a failed save
    // leaves no half file, and a checkpoint restored from the same path
    // survives until its successor is whole.
    let partial = state.with_file_name(PARTIAL_STATE_FILE);
    let save_started = Instant::now();
    let end = match save(vm, &partial, cancel).await {
        Ok(Some(end)) => end,
        Ok(None) => {
            std::fs::rename(&partial, state).map_err(|e| io_err("rename", &partial, e))?;
            SegmentEnd::Saved {
                machine_state: state.to_path_buf(),
                disks: plan.files.disks.clone(),
            }
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    Ok((end, start_time, run_time, save_started.elapsed()))
}

/// Loads `machine_state` into a QEMU started with `-incoming defer`.
async fn restore(vm: &mut Vm, machine_state: &Path, cancel: &CancellationToken) -> Result<(), DriverError> {
    let filename = utf8(machine_state).map_err(DriverError::Restore)?;
    set_mapped_ram(vm, cancel).await?;
    // exit-on-error=false: a bad file leaves QEMU up, so query-migrate can
    // tell why instead of QEMU just exiting.
    let args = json!({ "channels": file_channel(filename), "exit-on-error": false });
    match vm.command("migrate-incoming", Some(args), cancel).await {
        Ok(_) => {}
        Err(QmpError::Closed) => return Err(DriverError::Restore(vm.exit_message().await)),
        Err(e) => return Err(vm.qmp_error(e)),
    }
    match wait_migration(vm, cancel).await {
        Ok(()) => Ok(()),
        Err(MigrationError::Failed(why)) => Err(DriverError::Restore(why)),
        Err(MigrationError::Qmp(QmpError::Closed)) => Err(DriverError::Restore(vm.exit_message().await)),
        Err(MigrationError::Qmp(e)) => Err(vm.qmp_error(e)),
    }
}

/// Lets the guest run until `run_for` has passed (`None`) or it ended.
async fn run_guest(
    vm: &mut Vm,
    run_for: Duration,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    let deadline = Instant::now() + run_for;
    loop {
        if let Some(end) = vm.guest_end() {
            return Ok(Some(end));
        }
        let qmp = vm
            .qmp
            .as_mut()
            .ok_or_else(|| DriverError::Qmp("not connected".into()))?;
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            msg = qmp.recv() => msg,
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
        };
        match msg {
            Ok(msg) => qmp.keep_event(&msg),
            // QEMU went away on its own: not a guest poweroff (that is a
            // SHUTDOWN event first, and -no-shutdown keeps QEMU up).
            Err(QmpError::Closed) => {
                return Ok(Some(vm.guest_end().unwrap_or(SegmentEnd::Crashed {
                    reason: vm.exit_message().await,
                })));
            }
            Err(e) => return Err(vm.qmp_error(e)),
        }
    }
}

/// Stops the guest and saves it to `state`: `None`, or how the guest
/// ended if it powered off or crashed just before the stop.
async fn save(
    vm: &mut Vm,
    state: &Path,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    match vm.command("stop", None, cancel).await {
        Ok(_) => {}
        Err(QmpError::Closed) => {
            return match vm.guest_end() {
                Some(end) => Ok(Some(end)),
                None => Err(DriverError::Save(vm.exit_message().await)),
            };
        }
        Err(e) => return Err(vm.qmp_error(e)),
    }
    if let Some(end) = vm.guest_end() {
        return Ok(Some(end));
    }
    let filename = utf8(state).map_err(DriverError::Save)?;
    set_mapped_ram(vm, cancel).await?;
    // QEMU truncates its target, but a fresh file is surely sparse even if
    // the old one is still open elsewhere (e.g. by an upload).
    remove_if_exists(state)?;
    let args = json!({ "channels": file_channel(filename) });
    match vm.command("migrate", Some(args), cancel).await {
        Ok(_) => {}
        Err(QmpError::Closed) => return Err(DriverError::Save(vm.exit_message().await)),
        Err(e) => return Err(vm.qmp_error(e)),
    }
    match wait_migration(vm, cancel).await {
        Ok(()) => {}
        Err(MigrationError::Failed(why)) => return Err(DriverError::Save(why)),
        Err(MigrationError::Qmp(QmpError::Closed)) => {
            return Err(DriverError::Save(vm.exit_message().await));
        }
        Err(MigrationError::Qmp(e)) => return Err(vm.qmp_error(e)),
    }
    // A poweroff the guest requested just before the stop is only handled
    // by QEMU's main loop afterwards; such a save would restore into a guest
    // that already asked to be switched off.
    if let Some(end) = vm.guest_end() {
        let _ = std::fs::remove_file(state);
        return Ok(Some(end));
    }
    match std::fs::metadata(state) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(DriverError::Save(format!("{} is not a file", state.display()))),
        Err(e) => return Err(DriverError::Save(format!("{}: {e}", state.display()))),
    }
    Ok(None)
}

async fn set_mapped_ram(vm: &mut Vm, cancel: &CancellationToken) -> Result<(), DriverError> {
    let args = json!({ "capabilities": [{ "capability": "mapped-ram", "state": true }] });
    vm.command("migrate-set-capabilities", Some(args), cancel)
        .await
        .map(|_| ())
        .map_err(|e| vm.qmp_error(e))
}

/// A migration channel to a local file (structured, so paths with commas
/// are not mangled the way a `file:` URI would be).
fn file_channel(filename: &str) -> Value {
    json!([{
        "channel-type": "main",
        "addr": { "transport": "file", "filename": filename, "offset": 0 },
    }])
}

enum MigrationError {
    Failed(String),
    Qmp(QmpError),
}

/// Polls `query-migrate` until it says `completed` (both ends of a
/// migration report there). MIGRATION events would need the `events`
/// capability and still leave the error text to `query-migrate`.
async fn wait_migration(vm: &mut Vm, cancel: &CancellationToken) -> Result<(), MigrationError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = vm
            .command("query-migrate", None, cancel)
            .await
            .map_err(MigrationError::Qmp)?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
        match status {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("(no error-desc)");
                return Err(MigrationError::Failed(format!("migration {status}: {why}")));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Failed(format!(
                "migration still '{status}' after {} s",
                MIGRATION_TIMEOUT.as_secs()
            )));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(MigrationError::Qmp(QmpError::Cancelled)),
            _ = tokio::time::sleep(MIGRATION_POLL) => {}
        }
    }
}

/// The machine: identical for a boot and for a restore into it.
fn machine_args(plan: &SegmentPlan, accel: Accel, console: &Path) -> Result<Vec<OsString>, DriverError> {
    let vm = &plan.vm;
    let mut args: Vec<OsString> = [
        "-accel",
        accel.flag(),
        "-machine",
        "q35",
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
    .map(OsString::from)
    .collect();
    let console = escape(console).map_err(DriverError::Start)?;
    args.push("-chardev".into());
    args.push(format!("file,id=console,path={console}").into());
    args.push("-serial".into());
    args.push("chardev:console".into());
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
    let mut child = cmd.spawn().map_err(|e| spawn_error(binary, e))?;
    let outcome = tokio::select! {
        _ = cancel.cancelled() => Err(DriverError::Cancelled),
        exit = tokio::time::timeout(PROBE_TIMEOUT, child.wait()) => {
            Ok(matches!(exit, Ok(Ok(status)) if status.success()))
        }
    };
    let _ = child.kill().await;
    outcome
}

/// One QEMU process and its QMP connection.
struct Vm {
    child: Child,
    qmp: Option<Qmp>,
    binary: PathBuf,
    stderr: PathBuf,
    socket: PathBuf,
}

impl Vm {
    fn spawn(binary: &Path, args: &[OsString], stderr: &Path, socket: PathBuf) -> Result<Vm, DriverError> {
        let log = std::fs::File::create(stderr).map_err(|e| io_err("create", stderr, e))?;
        let log2 = log.try_clone().map_err(|e| io_err("dup", stderr, e))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Every way out of a segment, a panic included, ends QEMU.
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        // A provider killed outright (SIGKILL runs no destructor) must not
        // leave its guest running: the kernel kills QEMU with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| spawn_error(binary, e))?;
        Ok(Vm {
            child,
            qmp: None,
            binary: binary.to_path_buf(),
            stderr: stderr.to_path_buf(),
            socket,
        })
    }

    /// Waits for the QMP socket, reads the greeting, leaves negotiation mode.
    async fn connect(&mut self, cancel: &CancellationToken) -> Result<(), DriverError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let stream = loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(DriverError::Start(self.exit_message().await));
            }
            if let Ok(stream) = UnixStream::connect(&self.socket).await {
                break stream;
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Start(format!(
                    "no QMP socket at {} after {} s",
                    self.socket.display(),
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(DriverError::Cancelled),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        let mut qmp = Qmp::new(stream);
        let greeting = tokio::select! {
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            g = tokio::time::timeout(COMMAND_TIMEOUT, qmp.recv()) => g,
        };
        match greeting {
            Ok(Ok(g)) if g.get("QMP").is_some() => {}
            Ok(Ok(g)) => return Err(DriverError::Qmp(format!("unexpected greeting {g}"))),
            Ok(Err(QmpError::Closed)) => return Err(DriverError::Start(self.exit_message().await)),
            Ok(Err(e)) => return Err(DriverError::Qmp(e.to_string())),
            Err(_) => return Err(DriverError::Qmp("no QMP greeting".into())),
        }
        self.qmp = Some(qmp);
        match self.command("qmp_capabilities", None, cancel).await {
            Ok(_) => Ok(()),
            Err(QmpError::Closed) => Err(DriverError::Start(self.exit_message().await)),
            Err(e) => Err(self.qmp_error(e)),
        }
    }

    async fn command(
        &mut self,
        name: &str,
        args: Option<Value>,
        cancel: &CancellationToken,
    ) -> Result<Value, QmpError> {
        let qmp = self.qmp.as_mut().ok_or(QmpError::Closed)?;
        qmp.execute(name, args, COMMAND_TIMEOUT, cancel).await
    }

    fn qmp_error(&self, e: QmpError) -> DriverError {
        match e {
            QmpError::Cancelled => DriverError::Cancelled,
            e => DriverError::Qmp(e.to_string()),
        }
    }

    /// How the guest ended, from the events seen so far.
    fn guest_end(&self) -> Option<SegmentEnd> {
        self.qmp.as_ref().and_then(|q| guest_end(&q.events))
    }

    /// Why QEMU stopped talking: its exit status and the end of its stderr.
    async fn exit_message(&mut self) -> String {
        let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        let mut err = std::fs::read(&self.stderr).unwrap_or_default();
        if err.len() > 4096 {
            err.drain(..err.len() - 4096);
        }
        let err = String::from_utf8_lossy(&err);
        let err = err.trim();
        let err = if err.is_empty() { "(no stderr)" } else { err };
        let binary = self.binary.display();
        match status {
            Ok(Ok(status)) => format!("{binary} exited ({status}): {err}"),
            Ok(Err(e)) => format!("{binary}: wait: {e}; stderr: {err}"),
            Err(_) => format!("{binary} closed QMP but keeps running; stderr: {err}"),
        }
    }

    /// Ends QEMU politely (`quit` flushes and closes its files), then by force.
    async fn quit(&mut self) {
        if let Some(qmp) = self.qmp.as_mut() {
            let never = CancellationToken::new();
            let _ = qmp.execute("quit", None, QUIT_TIMEOUT, &never).await;
        }
        if tokio::time::timeout(QUIT_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
        }
    }

    /// SIGKILL and reap: no QEMU outlives a failed or cancelled segment.
    async fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Err(e) = self.child.kill().await {
            tracing::warn!("killing QEMU: {e}");
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[derive(Debug)]
enum QmpError {
    Cancelled,
    /// The connection ended: QEMU exited or is exiting.
    Closed,
    Timeout(String),
    Failed(String),
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Cancelled => write!(f, "cancelled"),
            QmpError::Closed => write!(f, "QEMU closed the QMP connection"),
            QmpError::Timeout(what) | QmpError::Failed(what) => write!(f, "{what}"),
        }
    }
}

struct QmpEvent {
    name: String,
    data: Value,
}

/// A minimal QMP client: one command at a time, matched by id; events
/// that arrive meanwhile are kept for the segment to inspect.
///
/// A reader task turns lines into messages on a channel, so waiting for
/// the next message can sit in a `select!` with the segment timer and the
/// cancellation token without losing half-read lines.
struct Qmp {
    writer: OwnedWriteHalf,
    rx: mpsc::UnboundedReceiver<Result<Value, String>>,
    reader: JoinHandle<()>,
    events: Vec<QmpEvent>,
    next_id: u64,
}

impl Qmp {
    fn new(stream: UnixStream) -> Qmp {
        let (read, writer) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_messages(read, tx));
        Qmp {
            writer,
            rx,
            reader,
            events: Vec::new(),
            next_id: 1,
        }
    }

    async fn recv(&mut self) -> Result<Value, QmpError> {
        match self.rx.recv().await {
            None => Err(QmpError::Closed),
            Some(msg) => msg.map_err(QmpError::Failed),
        }
    }

    fn keep_event(&mut self, msg: &Value) {
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or_default();
            tracing::debug!(event = name, %data, "QMP event");
            self.events.push(QmpEvent {
                name: name.to_string(),
                data,
            });
        }
    }

    async fn execute(
        &mut self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": name, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let deadline = Instant::now() + timeout;
        let timed_out = || QmpError::Timeout(format!("{name}: no answer within {} s", timeout.as_secs()));
        tokio::select! {
            _ = cancel.cancelled() => return Err(QmpError::Cancelled),
            sent = tokio::time::timeout_at(deadline, self.writer.write_all(&line)) => match sent {
                Err(_) => return Err(timed_out()),
                Ok(Err(_)) => return Err(QmpError::Closed),
                Ok(Ok(())) => {}
            },
        }
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Err(QmpError::Cancelled),
                msg = tokio::time::timeout_at(deadline, self.recv()) => msg.map_err(|_| timed_out())??,
            };
            if msg.get("event").is_some() {
                self.keep_event(&msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            let desc = msg
                .get("error")
                .map(|e| {
                    e.get("desc")
                        .and_then(Value::as_str)
                        .map_or_else(|| e.to_string(), str::to_string)
                })
                .unwrap_or_else(|| format!("unexpected answer {msg}"));
            return Err(QmpError::Failed(format!("{name}: {desc}")));
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_messages(read: OwnedReadHalf, tx: mpsc::UnboundedSender<Result<Value, String>>) {
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg = serde_json::from_slice::<Value>(&line)
            .map_err(|e| format!("bad QMP message {:?}: {e}", String::from_utf8_lossy(&line)));
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// SHUTDOWN says why (`guest-shutdown` is a poweroff; `guest-reset` and
/// `guest-panic` are crashes under -no-reboot); GUEST_PANICKED comes from
/// a pvpanic device. A `host-*` reason (a signal to QEMU, say) ends the
/// segment too, but the reason says it was not the guest's doing.
fn guest_end(events: &[QmpEvent]) -> Option<SegmentEnd> {
    events.iter().find_map(|ev| match ev.name.as_str() {
        "SHUTDOWN" => {
            let reason = ev.data.get("reason").and_then(Value::as_str).unwrap_or("unknown");
            Some(match reason {
                "guest-shutdown" => SegmentEnd::Halted,
                r if r.starts_with("guest-") => SegmentEnd::Crashed {
                    reason: r.to_string(),
                },
                r => SegmentEnd::Crashed {
                    reason: format!("QEMU shut down by the host ({r})"),
                },
            })
        }
        "GUEST_PANICKED" => Some(SegmentEnd::Crashed {
            reason: "guest-panic".into(),
        }),
        _ => None,
    })
}

/// `<workdir>/qmp.sock`, or a short path under the temp dir when the
/// workdir is too deep for a unix socket address.
fn socket_path(workdir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = workdir.join(QMP_SOCKET);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vmlot-qmp-{}-{n}.sock", std::process::id()))
}

/// A path as a QEMU option value: UTF-8, commas doubled.
fn escape(path: &Path) -> Result<String, String> {
    Ok(utf8(path)?.replace(',', ",,"))
}

fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))
}

fn spawn_error(binary: &Path, e: std::io::Error) -> DriverError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DriverError::MissingBinary {
            binary: binary.display().to_string(),
            package: PACKAGE,
        }
    } else {
        DriverError::Start(format!("spawn {}: {e}", binary.display()))
    }
}
