//! One QEMU process of a segment: spawned with the guest's priority (and
//! in the guest's cgroup, for a scavenging provider) and tied to the
//! provider's life, its QMP connection, commands with a timeout and
//! cancellation, and its end (quit, then kill; the cgroup removed).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::qmp::{self, Qmp, QmpCapabilities, QmpError, Quit};
use crate::cgroup::{self, GuestCgroup};
use crate::driver::api::{DriverError, SegmentEnd};
use crate::driver::host::{io_err, spawn_error};

/// Used when [`super::QemuConfig::binary`] is not set; looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// The Debian package that ships [`DEFAULT_BINARY`], named in errors.
pub const PACKAGE: &str = "qemu-system-x86";

/// QEMU creates its QMP socket within milliseconds; this only bounds a
/// process that neither opens it nor exits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// One QEMU process and its QMP connection.
pub(super) struct Process {
    pub(super) child: Child,
    pub(super) qmp: Option<Qmp>,
    pub(super) binary: PathBuf,
    pub(super) stderr: PathBuf,
    pub(super) socket: PathBuf,
    /// The guest's cgroup, removed once QEMU has exited.
    cgroup: Option<GuestCgroup>,
}

impl Process {
    pub(super) fn spawn(
        binary: &Path,
        args: &[OsString],
        stderr: &Path,
        socket: PathBuf,
        idle_priority: bool,
        cgroup: Option<GuestCgroup>,
    ) -> Result<Process, DriverError> {
        let log = std::fs::File::create(stderr).map_err(|e| io_err("create", stderr, e))?;
        let log2 = log.try_clone().map_err(|e| io_err("dup", stderr, e))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Every way out of a segment, a panic included, ends QEMU.
            .kill_on_drop(true);
        let join = cgroup.as_ref().map(GuestCgroup::join);
        // SAFETY: prctl, sched_setscheduler and Join::enter (open, write,
        // close of C strings made before the fork) are async-signal-safe.
        // A provider killed outright (SIGKILL runs no destructor) must not
        // leave its guest running: the kernel kills QEMU with it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // The guest yields to every other program of the machine.
                let param = libc::sched_param { sched_priority: 0 };
                if idle_priority && libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // Before QEMU allocates guest RAM, so all of it is charged
                // to the guest's cgroup. A failure is seen by the parent,
                // which checks, and the guest then runs unconfined.
                if let Some(join) = &join {
                    let _ = join.enter();
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| spawn_error(binary, PACKAGE, e, DriverError::Start))?;
        let cgroup = cgroup.and_then(|cgroup| match child.id() {
            Some(pid) if !cgroup.contains(pid) => {
                let dir = cgroup.memory_dir().display().to_string();
                cgroup::unconfined(&format!("QEMU (pid {pid}) could not enter {dir}"));
                cgroup.remove();
                None
            }
            _ => Some(cgroup),
        });
        Ok(Process {
            child,
            qmp: None,
            binary: binary.to_path_buf(),
            stderr: stderr.to_path_buf(),
            socket,
            cgroup,
        })
    }

    /// Waits for the QMP socket, reads the greeting, leaves negotiation mode.
    pub(super) async fn connect(&mut self, cancel: &CancellationToken) -> Result<(), DriverError> {
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
        match self.command(&QmpCapabilities, cancel).await {
            Ok(_) => Ok(()),
            Err(QmpError::Closed) => Err(DriverError::Start(self.exit_message().await)),
            Err(e) => Err(self.qmp_error(e)),
        }
    }

    pub(super) async fn command<C: qmp::Command>(
        &mut self,
        command: &C,
        cancel: &CancellationToken,
    ) -> Result<C::Return, QmpError> {
        let qmp = self.qmp.as_mut().ok_or(QmpError::Closed)?;
        qmp.execute(command, COMMAND_TIMEOUT, cancel).await
    }

    /// Sends `command` and leaves its answer for [`Self::answer`].
    pub(super) async fn send<C: qmp::Command>(
        &mut self,
        command: &C,
        answer_by: Instant,
        cancel: &CancellationToken,
    ) -> Result<u64, QmpError> {
        let qmp = self.qmp.as_mut().ok_or(QmpError::Closed)?;
        qmp.send(command, answer_by, cancel).await
    }

    /// The answer to the command [`Self::send`] sent as `id`.
    pub(super) async fn answer<C: qmp::Command>(
        &mut self,
        id: u64,
        answer_by: Instant,
        cancel: &CancellationToken,
    ) -> Result<C::Return, QmpError> {
        let qmp = self.qmp.as_mut().ok_or(QmpError::Closed)?;
        qmp.answer::<C>(id, answer_by, cancel).await
    }

    pub(super) fn qmp_error(&self, e: QmpError) -> DriverError {
        match e {
            QmpError::Cancelled => DriverError::Cancelled,
            e => DriverError::Qmp(e.to_string()),
        }
    }

    /// How the guest ended, from the events seen so far.
    pub(super) fn guest_end(&self) -> Option<SegmentEnd> {
        self.qmp.as_ref().and_then(Qmp::guest_end)
    }

    /// Why QEMU stopped talking: its exit status and the end of its stderr.
    pub(super) async fn exit_message(&mut self) -> String {
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
    pub(super) async fn quit(&mut self) {
        if let Some(qmp) = self.qmp.as_mut() {
            let never = CancellationToken::new();
            let _ = qmp.execute(&Quit, QUIT_TIMEOUT, &never).await;
        }
        if tokio::time::timeout(QUIT_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
        }
        self.remove_cgroup();
    }

    /// SIGKILL and reap: no QEMU outlives a failed or cancelled segment.
    pub(super) async fn kill(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_)))
            && let Err(e) = self.child.kill().await
        {
            tracing::warn!("killing QEMU: {e}");
        }
        self.remove_cgroup();
    }

    /// Removes the guest's cgroup, QEMU having exited.
    fn remove_cgroup(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        if self.cgroup.is_some() {
            // Ended neither by quit nor kill (a panic, a dropped segment):
            // kill_on_drop would kill it after this; the cgroup goes once
            // QEMU has exited.
            let _ = self.child.start_kill();
            self.remove_cgroup();
        }
    }
}
