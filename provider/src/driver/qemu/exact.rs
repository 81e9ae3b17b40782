//! Deterministic segments: the guest runs under `-icount` with a virtual
//! clock, and a segment is an exact count of guest instructions. QEMU has
//! no command to stop at an instruction count outside record/replay, so
//! the `vmlot-icount-stop` TCG plugin (crate `icount-stop`) parks the vCPU
//! once it has counted K instructions since it was armed, and this module
//! stops the VM there without racing it, leg after leg, until QEMU's own
//! icount (`query-replay`) is exactly the target.
//!
//! One leg: arm the plugin (`arm K`), `cont`, wait for `parked`, send QMP
//! `stop` without waiting for its answer, wait until QEMU's trace log shows
//! `qmp_enter_stop` (from there QEMU's main thread holds its big lock until
//! the vCPU is marked stopped), release the plugin, read the answer, read
//! the icount. The plugin counts whole translation blocks at their entry,
//! an upper bound of the icount, so a leg never overshoots; coarse legs go
//! to [`FINE_MARGIN`] short of the target, then fine legs with one
//! instruction per translation block (`one-insn-per-tb`, an HMP command)
//! end on it. Measured and explained in
//! `docs/research/deterministic-segments.md`; a release before the trace
//! line overshoots by a few instructions now and then.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::driver::api::DriverError;

/// Coarse legs stop this far short of the target.
pub const FINE_MARGIN: u64 = 1024;
/// Within this distance of the target, legs run one instruction per
/// translation block.
pub const FINE_WINDOW: u64 = 2 * FINE_MARGIN + 8192;
/// Fine legs allowed before giving up (2 are usual).
pub const MAX_FINE_LEGS: u32 = 16;
/// The trace event QEMU logs when it starts handling QMP `stop`.
pub const STOP_TRACE: &str = "qmp_enter_stop";
/// How long QEMU has to load the plugin and connect it, and to answer it.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long QEMU has to log [`STOP_TRACE`] after `stop` was sent.
const TRACE_TIMEOUT: Duration = Duration::from_secs(10);
const TRACE_POLL: Duration = Duration::from_micros(200);

/// An exact segment: its instruction count, and what it needs on QEMU's
/// command line.
#[derive(Clone, Debug)]
pub struct ExactArgs {
    /// Guest instructions the segment runs.
    pub instructions: u64,
    /// The plugin's shared object.
    pub plugin: PathBuf,
    /// The unix socket the plugin connects to.
    pub ctl: PathBuf,
    /// QEMU's trace log (`-D`), where [`STOP_TRACE`] lines appear.
    pub trace: PathBuf,
}

/// The plugin's end of the control socket, once it has connected.
pub struct StopControl {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    trace: PathBuf,
    /// [`STOP_TRACE`] lines seen in the trace log so far.
    stops_seen: usize,
}

/// The listening socket, bound before QEMU starts (the plugin connects
/// while QEMU loads it, before QMP is up).
pub struct StopListener {
    listener: UnixListener,
    trace: PathBuf,
}

impl StopListener {
    pub fn bind(args: &ExactArgs) -> Result<Self, DriverError> {
        let _ = std::fs::remove_file(&args.ctl);
        let listener = UnixListener::bind(&args.ctl)
            .map_err(|e| DriverError::Start(format!("icount-stop socket {}: {e}", args.ctl.display())))?;
        Ok(StopListener {
            listener,
            trace: args.trace.clone(),
        })
    }

    /// Waits for the plugin to connect and say hello.
    pub async fn accept(self, cancel: &CancellationToken) -> Result<StopControl, DriverError> {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            accepted = tokio::time::timeout(CTL_TIMEOUT, self.listener.accept()) => accepted,
        };
        let (stream, _) = accepted
            .map_err(|_| DriverError::Start("the icount-stop plugin never connected".into()))?
            .map_err(|e| DriverError::Start(format!("icount-stop socket: {e}")))?;
        let (read, write) = UnixStream::into_split(stream);
        let mut control = StopControl {
            lines: BufReader::new(read).lines(),
            write,
            trace: self.trace,
            stops_seen: 0,
        };
        let hello = control.line(cancel).await?;
        if !hello.starts_with("hello") {
            return Err(DriverError::Start(format!("icount-stop plugin said {hello:?}")));
        }
        Ok(control)
    }
}

/// Where the run to the target stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// Stop `k` instructions on, counting per translation block.
    Coarse(u64),
    /// Stop `k` instructions on, one instruction per translation block.
    Fine(u64),
    /// The icount is the target.
    There,
}

/// The next leg from `icount` to `target` (pure).
pub fn next_leg(icount: u64, target: u64) -> Result<Leg, DriverError> {
    if icount > target {
        return Err(DriverError::Qmp(format!(
            "deterministic stop overshot: icount {icount}, target {target}"
        )));
    }
    let left = target - icount;
    Ok(match left {
        0 => Leg::There,
        n if n > FINE_WINDOW => Leg::Coarse(n - FINE_MARGIN),
        n => Leg::Fine(n),
    })
}

impl StopControl {
    /// The plugin's next line.
    async fn line(&mut self, cancel: &CancellationToken) -> Result<String, DriverError> {
        tokio::select! {
            _ = cancel.cancelled() => Err(DriverError::Cancelled),
            line = tokio::time::timeout(CTL_TIMEOUT, self.lines.next_line()) => match line {
                Err(_) => Err(DriverError::Qmp("the icount-stop plugin did not answer".into())),
                Ok(Err(e)) => Err(DriverError::Qmp(format!("icount-stop socket: {e}"))),
                Ok(Ok(None)) => Err(DriverError::Qmp("the icount-stop plugin went away".into())),
                Ok(Ok(Some(line))) => Ok(line),
            }
        }
    }

    async fn say(&mut self, line: &str) -> Result<(), DriverError> {
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| DriverError::Qmp(format!("icount-stop socket: {e}")))
    }

    /// Arms the plugin to park `k` instructions from now.
    pub async fn arm(&mut self, k: u64, cancel: &CancellationToken) -> Result<(), DriverError> {
        self.say(&format!("arm {k}")).await?;
        let answer = self.line(cancel).await?;
        if answer != format!("armed {k}") {
            return Err(DriverError::Qmp(format!(
                "icount-stop plugin answered {answer:?} to arm {k}"
            )));
        }
        Ok(())
    }

    /// Waits for the plugin to report the vCPU parked. Cancel-safe: a
    /// caller may race it against QMP events.
    pub async fn parked(&mut self) -> Result<(), DriverError> {
        match self.lines.next_line().await {
            Ok(Some(line)) if line.starts_with("parked") => Ok(()),
            Ok(Some(line)) => Err(DriverError::Qmp(format!("icount-stop plugin said {line:?}"))),
            Ok(None) => Err(DriverError::Qmp("the icount-stop plugin went away".into())),
            Err(e) => Err(DriverError::Qmp(format!("icount-stop socket: {e}"))),
        }
    }

    /// Counts the [`STOP_TRACE`] lines logged so far, before a `stop`.
    pub fn before_stop(&mut self) -> Result<(), DriverError> {
        self.stops_seen = count_stops(&self.trace)?;
        Ok(())
    }

    /// Waits until QEMU logged one more [`STOP_TRACE`] line than
    /// [`Self::before_stop`] saw, then lets the parked vCPU go: it can no
    /// longer run guest code before the VM is stopped.
    pub async fn release_after_stop(&mut self, cancel: &CancellationToken) -> Result<(), DriverError> {
        let deadline = Instant::now() + TRACE_TIMEOUT;
        while count_stops(&self.trace)? <= self.stops_seen {
            if Instant::now() >= deadline {
                return Err(DriverError::Qmp(format!(
                    "QEMU never logged {STOP_TRACE} to {}",
                    self.trace.display()
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(DriverError::Cancelled),
                _ = tokio::time::sleep(TRACE_POLL) => {}
            }
        }
        self.say("release").await
    }
}

fn count_stops(trace: &Path) -> Result<usize, DriverError> {
    match std::fs::read(trace) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(STOP_TRACE))
            .count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(DriverError::Qmp(format!("trace log {}: {e}", trace.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_go_coarse_then_fine_and_never_past_the_target() {
        let target = 3_000_000_000;
        assert_eq!(next_leg(0, target).unwrap(), Leg::Coarse(target - FINE_MARGIN));
        assert_eq!(
            next_leg(target - FINE_WINDOW, target).unwrap(),
            Leg::Fine(FINE_WINDOW)
        );
        assert_eq!(
            next_leg(target - FINE_WINDOW - 1, target).unwrap(),
            Leg::Coarse(FINE_WINDOW + 1 - FINE_MARGIN)
        );
        assert_eq!(next_leg(target - 3, target).unwrap(), Leg::Fine(3));
        assert_eq!(next_leg(target, target).unwrap(), Leg::There);
        assert!(next_leg(target + 1, target).is_err(), "an overshoot is an error");
    }
}
