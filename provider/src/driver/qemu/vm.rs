//! One segment's QEMU: the steps of the segment template on its process
//! ([`super::process`]): start, run, pause, resume, save over QMP; quit or
//! kill; and the notice written to the guest's second serial port.
//!
//! A restore loads the checkpoint with `migrate-incoming`; a save stops
//! the guest and migrates it into a file, one of two ways:
//!
//! - the guest's RAM in QEMU's own memory: with the `mapped-ram`
//!   capability, RAM pages at fixed 4 KiB-aligned offsets of the file and
//!   zero pages holes, so the file is sparse and successive checkpoints of
//!   one guest differ only where the guest wrote;
//! - the guest's RAM in a file of its own ([`BootFiles::memory`], a shared
//!   file-backed memory backend): with `x-ignore-shared`, so the save holds
//!   the device state and the small ROM blocks only (a few hundred KiB),
//!   and the RAM file, already on the 4 KiB grid, is the checkpoint's
//!   memory part; a restore maps the file instead of reading RAM into QEMU.
//!   Not with mapped-ram too: QEMU 10.0 cannot write the two together
//!   ("Failed to write bitmap to file: Bad address", fixed upstream in
//!   December 2025), and the device state is small enough to stream.
//!
//! Which way a state was saved is read from its head
//! ([`vmlot_cas::qemusave`]), and the restore sets the same capability.
//!
//! [`BootFiles::memory`]: crate::driver::api::BootFiles::memory

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::args::{Accel, Paths, command_line, utf8};
use super::exact::{self, ExactArgs, Leg, StopControl, StopListener};
use super::memory::{prepare_memory, saved_without_ram};
use super::process::{COMMAND_TIMEOUT, Process};
use super::qmp::{
    Cont, HumanMonitorCommand, Migrate, MigrateIncoming, MigrateSetCapabilities, MigrationCapability,
    MigrationCapabilityStatus, MigrationChannel, MigrationStatus, QmpError, QueryMigrate, QueryReplay, Stop,
};
use crate::cgroup::{self, Confinement};
use crate::driver::api::{DriverError, SegmentEnd, SegmentPlan, SegmentStart};
use crate::driver::host::{io_err, remove_if_exists};
use crate::driver::template::Machine;

/// Saves and loads are local file copies of guest RAM (~0.6 s for 128 MiB
/// here); this only catches a wedged migration.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
const MIGRATION_POLL: Duration = Duration::from_millis(20);
/// Connecting to QEMU's own listening socket and writing one line into it
/// takes microseconds; this only bounds a QEMU that stopped answering.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(5);
/// The notice line's first word; the second is the seconds left.
pub const NOTICE_WORD: &str = "vmlot-preempt";

/// The segment's QEMU as the template drives it.
pub(crate) struct QemuMachine {
    binary: PathBuf,
    accel: Accel,
    /// The serial console file.
    console: PathBuf,
    /// QEMU's stdout and stderr.
    stderr: PathBuf,
    socket: PathBuf,
    /// The notice channel's socket (the guest's ttyS1).
    notice: PathBuf,
    /// The connection a notice was written to, held open until QEMU goes:
    /// QEMU reads a socket only as fast as the guest's UART takes bytes,
    /// and drops what it has not read when the client hangs up.
    notice_stream: Option<UnixStream>,
    process: Option<Process>,
    /// A deterministic segment's plugin and trace log, when the plan asks
    /// for an exact instruction count.
    exact: Option<ExactArgs>,
    /// Its control socket and target once started.
    stopper: Option<Stopper>,
    /// QEMU runs under `SCHED_IDLE`.
    idle_priority: bool,
    /// QEMU runs in a cgroup of its own, sized so.
    confine: Option<Confinement>,
    /// The guest's RAM is in this file (see [`BootFiles::memory`]), left
    /// out of the save.
    ///
    /// [`BootFiles::memory`]: crate::driver::api::BootFiles::memory
    memory: Option<PathBuf>,
}

/// An exact run under way: the plugin's control, the icount to stop at,
/// and whether legs run one instruction per translation block.
struct Stopper {
    control: StopControl,
    target: u64,
    fine: bool,
    fine_legs: u32,
}

impl QemuMachine {
    pub fn new(
        binary: PathBuf,
        accel: Accel,
        console: PathBuf,
        stderr: PathBuf,
        socket: PathBuf,
        notice: PathBuf,
        exact: Option<ExactArgs>,
    ) -> Self {
        QemuMachine {
            binary,
            accel,
            console,
            stderr,
            socket,
            notice,
            notice_stream: None,
            process: None,
            exact,
            stopper: None,
            idle_priority: false,
            confine: None,
            memory: None,
        }
    }

    /// Runs QEMU under the idle scheduling policy (or not).
    pub fn idle_priority(mut self, idle: bool) -> Self {
        self.idle_priority = idle;
        self
    }

    /// Runs QEMU in a cgroup of its own (see [`crate::cgroup`]), or not.
    pub fn confine(mut self, confine: Option<Confinement>) -> Self {
        self.confine = confine;
        self
    }

    fn process(&mut self) -> Result<&mut Process, DriverError> {
        self.process
            .as_mut()
            .ok_or_else(|| DriverError::Qmp("QEMU is not running".into()))
    }
}

impl Machine for QemuMachine {
    async fn start(&mut self, plan: &SegmentPlan, cancel: &CancellationToken) -> Result<(), DriverError> {
        let ram_outside = match &plan.start {
            SegmentStart::Restore { machine_state } => saved_without_ram(machine_state)?,
            SegmentStart::Boot => false,
        };
        match &plan.files.memory {
            Some(memory) => prepare_memory(memory, plan.vm.memory_mib, ram_outside)?,
            None if ram_outside => {
                return Err(DriverError::Restore(
                    "the state was saved without the guest's RAM, and no memory file was given".into(),
                ));
            }
            None => {}
        }
        self.memory = plan.files.memory.clone();
        let exact = self.exact.as_ref();
        let paths = Paths {
            console: &self.console,
            qmp: &self.socket,
            notice: &self.notice,
        };
        let args = command_line(plan, self.accel, &paths, exact)?;
        // The plugin connects while QEMU loads it, before QMP is up.
        let listener = exact.map(StopListener::bind).transpose()?;
        let cgroup = self
            .confine
            .and_then(|c| cgroup::for_guest(&plan.workdir, plan.vm.memory_mib, c));
        let process = Process::spawn(
            &self.binary,
            &args,
            &self.stderr,
            self.socket.clone(),
            self.idle_priority,
            cgroup,
        )?;
        tracing::debug!(workdir = %plan.workdir.display(), accel = ?self.accel, exact = ?plan.instructions, "QEMU started");
        let vm = self.process.insert(process);
        vm.connect(cancel).await?;
        let control = match listener {
            Some(listener) => Some(listener.accept(cancel).await?),
            None => None,
        };
        if let SegmentStart::Restore { machine_state } = &plan.start {
            restore(vm, machine_state, ram_outside, cancel).await?;
        }
        if let (Some(control), Some(exact)) = (control, exact) {
            let icount = vm
                .command(&QueryReplay, cancel)
                .await
                .map_err(|e| vm.qmp_error(e))?
                .icount;
            let mut stopper = Stopper {
                control,
                target: icount + exact.instructions,
                fine: false,
                fine_legs: 0,
            };
            arm_next(vm, &mut stopper, icount, cancel).await?;
            self.stopper = Some(stopper);
        }
        // Booted with -S, and a restored machine stays paused (it was saved
        // stopped): either way the guest runs from here.
        vm.command(&Cont, cancel).await.map_err(|e| vm.qmp_error(e))?;
        Ok(())
    }

    async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        let vm = self
            .process
            .as_mut()
            .ok_or_else(|| DriverError::Qmp("QEMU is not running".into()))?;
        match self.stopper.as_mut() {
            // The instruction count ends it; the time only bounds it.
            Some(stopper) => run_exact(vm, stopper, exact_limit(run_for), cancel).await,
            None => run_guest(vm, run_for, cancel).await,
        }
    }

    /// QMP `stop`: the vCPUs stop, and so does the guest's clock.
    async fn pause(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        let vm = self.process()?;
        match vm.command(&Stop, cancel).await {
            Ok(_) => Ok(vm.guest_end()),
            Err(QmpError::Closed) => Ok(Some(gone(vm).await)),
            Err(e) => Err(vm.qmp_error(e)),
        }
    }

    /// QMP `cont`.
    async fn resume(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        let vm = self.process()?;
        match vm.command(&Cont, cancel).await {
            Ok(_) => Ok(None),
            Err(QmpError::Closed) => Ok(Some(gone(vm).await)),
            // A guest that shut down just before the pause cannot go on.
            Err(e) => match vm.guest_end() {
                Some(end) => Ok(Some(end)),
                None => Err(vm.qmp_error(e)),
            },
        }
    }

    /// Writes `vmlot-preempt <seconds>` and a newline to the guest's ttyS1.
    /// A notice that cannot be written is logged, not an error: the owner
    /// still needs the machine, and the save goes ahead.
    async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError> {
        let line = format!("{NOTICE_WORD} {seconds}\n");
        let write = async {
            let mut stream = UnixStream::connect(&self.notice).await?;
            stream.write_all(line.as_bytes()).await?;
            stream.flush().await?;
            Ok::<_, std::io::Error>(stream)
        };
        let socket = self.notice.display();
        match tokio::time::timeout(NOTICE_TIMEOUT, write).await {
            Ok(Ok(stream)) => {
                tracing::info!(seconds, %socket, "notice written to the guest's ttyS1");
                self.notice_stream = Some(stream);
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::warn!(%socket, "notice not sent: {e}");
                Ok(false)
            }
            Err(_) => {
                let after = NOTICE_TIMEOUT.as_secs();
                tracing::warn!(%socket, "notice not sent: no answer within {after} s");
                Ok(false)
            }
        }
    }

    async fn save(
        &mut self,
        partial: &Path,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        let ram_outside = self.memory.is_some();
        save(self.process()?, partial, ram_outside, cancel).await
    }

    async fn stop(&mut self, outcome: Result<&SegmentEnd, &DriverError>) {
        self.notice_stream = None;
        if let Some(mut vm) = self.process.take() {
            match outcome {
                Ok(_) => vm.quit().await,
                Err(_) => vm.kill().await,
            }
        }
    }

    async fn console(&mut self) -> Result<Vec<u8>, DriverError> {
        match tokio::fs::read(&self.console).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("read", &self.console, e)),
        }
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        // QEMU leaves its listening socket behind.
        let _ = std::fs::remove_file(&self.notice);
    }
}

/// How the guest ended when QEMU closed QMP on its own: what its events
/// said, else a crash with QEMU's last words.
async fn gone(vm: &mut Process) -> SegmentEnd {
    match vm.guest_end() {
        Some(end) => end,
        None => SegmentEnd::Crashed {
            reason: vm.exit_message().await,
        },
    }
}

/// Loads `machine_state` into a QEMU started with `-incoming defer`, with
/// the capability it was saved with (`ram_outside`: `x-ignore-shared`).
async fn restore(
    vm: &mut Process,
    machine_state: &Path,
    ram_outside: bool,
    cancel: &CancellationToken,
) -> Result<(), DriverError> {
    let filename = utf8(machine_state).map_err(DriverError::Restore)?;
    set_capabilities(vm, ram_outside, cancel).await?;
    // exit-on-error=false: a bad file leaves QEMU up, so query-migrate can
    // tell why instead of QEMU just exiting.
    let incoming = MigrateIncoming {
        channels: MigrationChannel::file(filename),
        exit_on_error: false,
    };
    match vm.command(&incoming, cancel).await {
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
    vm: &mut Process,
    run_for: Duration,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    let deadline = Instant::now() + run_for;
    run_until(vm, deadline, || Ok(None), std::future::pending(), cancel).await
}

/// Lets the guest run until `reached` resolves (`None`), the deadline
/// passes (what `at_deadline` says) or the guest ends by itself (how).
async fn run_until(
    vm: &mut Process,
    deadline: Instant,
    at_deadline: impl FnOnce() -> Result<Option<SegmentEnd>, DriverError>,
    reached: impl Future<Output = Result<(), DriverError>>,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    tokio::pin!(reached);
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
            done = &mut reached => return done.map(|()| None),
            msg = qmp.recv() => msg,
            _ = tokio::time::sleep_until(deadline) => return at_deadline(),
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

/// How long an exact segment of `run_for` may take: the broker's rate is
/// about what TCG runs here, a slower host or a busy one takes longer.
fn exact_limit(run_for: Duration) -> Duration {
    run_for * 4 + Duration::from_secs(60)
}

/// Arms the plugin for the next leg from `icount` (one instruction per
/// translation block near the target).
async fn arm_next(
    vm: &mut Process,
    stopper: &mut Stopper,
    icount: u64,
    cancel: &CancellationToken,
) -> Result<Leg, DriverError> {
    let leg = exact::next_leg(icount, stopper.target)?;
    match leg {
        Leg::There => {}
        Leg::Coarse(k) => stopper.control.arm(k, cancel).await?,
        Leg::Fine(k) => {
            stopper.fine_legs += 1;
            if stopper.fine_legs > exact::MAX_FINE_LEGS {
                return Err(DriverError::Qmp(format!(
                    "deterministic stop: icount {icount} still short of {} after {} fine legs",
                    stopper.target,
                    exact::MAX_FINE_LEGS
                )));
            }
            if !stopper.fine {
                one_insn_per_tb(vm, true, cancel).await?;
                stopper.fine = true;
            }
            stopper.control.arm(k, cancel).await?;
        }
    }
    Ok(leg)
}

async fn one_insn_per_tb(vm: &mut Process, on: bool, cancel: &CancellationToken) -> Result<(), DriverError> {
    let command = HumanMonitorCommand {
        command_line: format!("one-insn-per-tb {}", if on { "on" } else { "off" }),
    };
    let printed = vm.command(&command, cancel).await.map_err(|e| vm.qmp_error(e))?;
    if !printed.trim().is_empty() {
        return Err(DriverError::Qmp(format!("one-insn-per-tb: {}", printed.trim())));
    }
    Ok(())
}

/// Runs the guest leg by leg until QEMU's icount is the target (the guest
/// is then stopped there: `None`) or it ended by itself.
async fn run_exact(
    vm: &mut Process,
    stopper: &mut Stopper,
    limit: Duration,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    let deadline = Instant::now() + limit;
    loop {
        // The guest runs (start() or the last leg sent `cont`) until parked.
        let target = stopper.target;
        let too_long = || {
            Err(DriverError::Qmp(format!(
                "deterministic segment not at instruction {target} after {} s",
                limit.as_secs()
            )))
        };
        if let Some(end) = run_until(vm, deadline, too_long, stopper.control.parked(), cancel).await? {
            return Ok(Some(end));
        }
        // Parked: stop the VM, and let the vCPU go only once QEMU holds it.
        stopper.control.before_stop()?;
        let answer_by = Instant::now() + COMMAND_TIMEOUT;
        let stop = vm
            .send(&Stop, answer_by, cancel)
            .await
            .map_err(|e| vm.qmp_error(e))?;
        stopper.control.release_after_stop(cancel).await?;
        vm.answer::<Stop>(stop, answer_by, cancel)
            .await
            .map_err(|e| vm.qmp_error(e))?;
        let icount = vm
            .command(&QueryReplay, cancel)
            .await
            .map_err(|e| vm.qmp_error(e))?
            .icount;
        if arm_next(vm, stopper, icount, cancel).await? == Leg::There {
            if stopper.fine {
                one_insn_per_tb(vm, false, cancel).await?;
                stopper.fine = false;
            }
            tracing::debug!(icount, "stopped at the segment's instruction count");
            return Ok(None);
        }
        vm.command(&Cont, cancel).await.map_err(|e| vm.qmp_error(e))?;
    }
}

/// Stops the guest and saves it to `state`: `None`, or how the guest
/// ended if it powered off or crashed just before the stop.
/// With `ram_outside`, the guest's RAM (a shared file) is left out.
async fn save(
    vm: &mut Process,
    state: &Path,
    ram_outside: bool,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    match vm.command(&Stop, cancel).await {
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
    set_capabilities(vm, ram_outside, cancel).await?;
    // QEMU truncates its target, but a fresh file is surely sparse even if
    // the old one is still open elsewhere (e.g. by an upload).
    remove_if_exists(state)?;
    let migrate = Migrate {
        channels: MigrationChannel::file(filename),
    };
    match vm.command(&migrate, cancel).await {
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
        return Ok(Some(end));
    }
    match std::fs::metadata(state) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(DriverError::Save(format!("{} is not a file", state.display()))),
        Err(e) => return Err(DriverError::Save(format!("{}: {e}", state.display()))),
    }
    Ok(None)
}

/// `mapped-ram` for a state that holds the guest's RAM, `x-ignore-shared`
/// for one that leaves it in its file (`ram_outside`); each excludes the
/// other, both are set every time (a restored QEMU keeps what its load set).
async fn set_capabilities(
    vm: &mut Process,
    ram_outside: bool,
    cancel: &CancellationToken,
) -> Result<(), DriverError> {
    let status = |capability, state| MigrationCapabilityStatus { capability, state };
    let command = MigrateSetCapabilities {
        capabilities: vec![
            status(MigrationCapability::MappedRam, !ram_outside),
            status(MigrationCapability::XIgnoreShared, ram_outside),
        ],
    };
    vm.command(&command, cancel)
        .await
        .map(|_| ())
        .map_err(|e| vm.qmp_error(e))
}

enum MigrationError {
    Failed(String),
    Qmp(QmpError),
}

/// Polls `query-migrate` until it says `completed` (both ends of a
/// migration report there). MIGRATION events would need the `events`
/// capability and still leave the error text to `query-migrate`.
async fn wait_migration(vm: &mut Process, cancel: &CancellationToken) -> Result<(), MigrationError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = vm
            .command(&QueryMigrate, cancel)
            .await
            .map_err(MigrationError::Qmp)?;
        let status = info.status.unwrap_or(MigrationStatus::None);
        match status {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let why = info.error_desc.as_deref().unwrap_or("(no error-desc)");
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
