//! Running `xl`, the Xen toolstack's command: one command at a time, with
//! a timeout, cancellation, a log of every command in the segment's
//! workdir, and retries for `xl` dying from a signal (seen under nested
//! emulation) where a retry is safe.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::driver::api::DriverError;
use crate::driver::host::spawn_error;

/// Used when [`super::XenConfig::binary`] is not set; looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "xl";
/// The Debian package that ships [`DEFAULT_BINARY`], named in errors.
pub const PACKAGE: &str = "xen-utils-4.17";
/// Every `xl` command of the segment with its exit status and stderr, in
/// the workdir (kept for post-mortems).
pub const XL_LOG_FILE: &str = "xl.log";

/// `xl info`, `list`, `destroy`: quick, except under nested emulation.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Times an `xl` command that died from a signal is tried again.
pub(crate) const SIGNAL_RETRIES: u32 = 3;
/// Most of an `xl` stderr kept in an error message.
const STDERR_TAIL: usize = 4096;

/// The `xl` binary and the segment's command log.
pub(crate) struct Xl {
    pub binary: PathBuf,
    pub log: Option<PathBuf>,
}

/// A finished `xl` command.
pub(crate) struct XlRun {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl XlRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// The command, how it ended, and the end of its stderr.
    pub fn describe(&self) -> String {
        let how = match self.signal() {
            Some(sig) => format!("died from signal {sig} ({})", signal_name(sig)),
            None => format!("failed ({})", self.status),
        };
        let mut err = self.stderr.trim();
        if err.len() > STDERR_TAIL {
            let mut cut = err.len() - STDERR_TAIL;
            while !err.is_char_boundary(cut) {
                cut += 1;
            }
            err = &err[cut..];
        }
        let err = if err.is_empty() { "(no stderr)" } else { err };
        format!("`{}` {how}: {err}", self.command)
    }
}

impl Xl {
    /// Runs `xl args` once. Cancellation and the timeout kill it.
    pub async fn run<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<XlRun, DriverError> {
        let command = std::iter::once(OsStr::new("xl"))
            .chain(args.iter().map(AsRef::as_ref))
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ");
        let child = Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error(&self.binary, PACKAGE, e, DriverError::Toolstack))?;
        let output = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            out = tokio::time::timeout(timeout, child.wait_with_output()) => out,
        };
        let output = match output {
            Err(_) => {
                self.log_line(&format!(
                    "$ {command}\n  no answer within {} s\n",
                    timeout.as_secs()
                ));
                return Err(DriverError::Toolstack(format!(
                    "`{command}` gave no answer within {} s",
                    timeout.as_secs()
                )));
            }
            Ok(Err(e)) => return Err(DriverError::Toolstack(format!("`{command}`: {e}"))),
            Ok(Ok(output)) => output,
        };
        let run = XlRun {
            command,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        tracing::debug!(command = %run.command, status = %run.status, "xl");
        let mut entry = format!("$ {}\n  {}\n", run.command, run.status);
        for line in run.stderr.lines() {
            let _ = writeln!(entry, "  | {line}");
        }
        self.log_line(&entry);
        Ok(run)
    }

    /// [`Xl::run`], again while `xl` dies from a signal: for commands that
    /// are safe to repeat (queries, `destroy`).
    pub async fn run_retrying<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<XlRun, DriverError> {
        let mut attempt = 0;
        loop {
            let run = self.run(args, timeout, cancel).await?;
            if run.signal().is_none() || attempt >= SIGNAL_RETRIES {
                return Ok(run);
            }
            attempt += 1;
            tracing::warn!(attempt, "{}; trying again", run.describe());
        }
    }

    fn log_line(&self, text: &str) {
        let Some(log) = &self.log else { return };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::debug!("{}: {e}", log.display());
        }
    }
}

/// `xl` naming a domain that does not exist (find_domain: "… is an invalid
/// domain identifier"; list: "Domain '…' does not exist").
pub(crate) fn is_no_such_domain(stderr: &str) -> bool {
    stderr.contains("invalid domain identifier") || stderr.contains("does not exist")
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_such_domain_is_recognised() {
        assert!(is_no_such_domain(
            "vmlot-1 is an invalid domain identifier (rc=-6)\n"
        ));
        assert!(is_no_such_domain("Error: Domain 'vmlot-1' does not exist.\n"));
        assert!(!is_no_such_domain(
            "xencall: error: Could not obtain handle on privileged command interface"
        ));
    }
}
