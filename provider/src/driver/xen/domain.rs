//! A segment's Xen domain, alive: created or restored with `xl`, watched
//! with `xl list`, saved with `xl save`, destroyed on every way out of the
//! segment; and the segment template's steps on it ([`XenMachine`]).
//!
//! While the guest runs its state is polled with `xl list <name>` (the
//! six-letter state column `rbps?d`, whose fifth letter is the shutdown
//! reason) every [`POLL_INTERVAL`]. At the planned time `xl save <name>
//! <partial>` suspends the guest, writes the file and destroys the domain.
//! For the machine's owner the domain is held with `xl pause` and let go
//! with `xl unpause`; Xen has no channel to tell the guest of an early
//! save, so its notice is only logged.
//!
//! `xl` under nested emulation sometimes dies from a signal. A command that
//! does was not carried out, or not wholly: queries and `destroy` are simply
//! retried; a `create` or `restore` is retried after destroying whatever
//! half-made domain it left; after a `save` the domain's state decides (gone:
//! the save completed; still running: retry; left suspended: the attempt
//! fails).

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::read_saved_config;
use super::console;
use super::xl::{QUERY_TIMEOUT, SIGNAL_RETRIES, Xl, is_no_such_domain};
use crate::driver::api::{DriverError, SegmentEnd, SegmentPlan, SegmentStart};
use crate::driver::host::remove_if_exists;
use crate::driver::template::Machine;

/// Prefix of every domain name this driver creates.
pub const DOMAIN_PREFIX: &str = "vmlot-";
/// How often a running guest's state is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// `xl create` / `restore`: building the domain, loading its memory.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// `xl save`: writing guest RAM to a local file; this only catches a
/// wedged save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The segment's domain as the template drives it.
pub(crate) struct XenMachine {
    domain: Domain,
    /// The segment's `xl` config (absolute).
    config: PathBuf,
    /// xenconsoled's log of the domain.
    console: PathBuf,
}

impl XenMachine {
    pub fn new(domain: Domain, config: PathBuf, console: PathBuf) -> Self {
        XenMachine {
            domain,
            config,
            console,
        }
    }
}

impl Machine for XenMachine {
    async fn start(&mut self, plan: &SegmentPlan, cancel: &CancellationToken) -> Result<(), DriverError> {
        let config = self.config.as_os_str();
        match &plan.start {
            SegmentStart::Boot => {
                let args = [OsStr::new("create"), OsStr::new("-e"), config];
                self.domain.start(&args, DriverError::Start, cancel).await
            }
            SegmentStart::Restore { machine_state } => {
                let machine_state = std::fs::canonicalize(machine_state)
                    .map_err(|e| DriverError::Restore(format!("{}: {e}", machine_state.display())))?;
                let args = [
                    OsStr::new("restore"),
                    OsStr::new("-e"),
                    config,
                    machine_state.as_os_str(),
                ];
                self.domain.start(&args, DriverError::Restore, cancel).await
            }
        }
        // Neither create nor restore was given -p: the guest runs from here.
    }

    async fn run(
        &mut self,
        run_for: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        run_guest(&self.domain, run_for, cancel).await
    }

    /// `xl pause`.
    async fn pause(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        self.domain.pause_or_unpause("pause", cancel).await
    }

    /// `xl unpause`.
    async fn resume(&mut self, cancel: &CancellationToken) -> Result<Option<SegmentEnd>, DriverError> {
        self.domain.pause_or_unpause("unpause", cancel).await
    }

    /// No channel into a Xen guest here: logged only.
    async fn notice(&mut self, seconds: u64) -> Result<bool, DriverError> {
        tracing::info!(seconds, "Xen guests get no notice: saving without one");
        Ok(false)
    }

    async fn save(
        &mut self,
        partial: &Path,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        save(&mut self.domain, partial, cancel).await
    }

    async fn stop(&mut self, outcome: Result<&SegmentEnd, &DriverError>) {
        // A guest that halted or crashed is still there (preserved): let
        // xenconsoled read the rest of its ring before it goes.
        if matches!(outcome, Ok(SegmentEnd::Halted | SegmentEnd::Crashed { .. })) {
            console::settle(&self.console).await;
        }
        let destroyed = self.domain.destroy().await;
        match outcome {
            Err(_) => {
                let _ = std::fs::remove_file(&self.console);
            }
            // The segment's result stands; a domain that would not go is
            // the host's problem (and the guard tries once more).
            Ok(_) => {
                if let Err(e) = destroyed {
                    tracing::error!("after the segment: {e}");
                }
            }
        }
    }

    async fn console(&mut self) -> Result<Vec<u8>, DriverError> {
        console::take(&self.console).await
    }
}

/// Lets the guest run until `run_for` has passed (`None`) or it shut down.
async fn run_guest(
    domain: &Domain,
    run_for: Duration,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    let deadline = Instant::now() + run_for;
    loop {
        match domain.state(cancel).await? {
            DomainState::Running => {}
            DomainState::Shutdown(reason) => return Ok(Some(reason.end())),
            DomainState::Dying | DomainState::Gone => {
                return Err(DriverError::Toolstack(format!(
                    "domain {} was destroyed behind the provider's back",
                    domain.name
                )));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(DriverError::Cancelled),
            _ = tokio::time::sleep((deadline - now).min(POLL_INTERVAL)) => {}
        }
    }
}

/// `xl save`s the running domain to `partial`: `None` once the file is
/// whole (the domain is then gone), or how the guest ended if it shut down
/// just before.
async fn save(
    domain: &mut Domain,
    partial: &Path,
    cancel: &CancellationToken,
) -> Result<Option<SegmentEnd>, DriverError> {
    let mut attempt = 0;
    loop {
        remove_if_exists(partial)?;
        let args = [OsStr::new("save"), OsStr::new(&domain.name), partial.as_os_str()];
        let run = domain.xl.run(&args, SAVE_TIMEOUT, cancel).await?;
        if run.success() {
            domain.alive = false;
            break;
        }
        // Did the guest shut down just before the save? Then that is the end
        // of the segment, not a failed save.
        let state = domain.state(cancel).await?;
        if let DomainState::Shutdown(reason) = state
            && reason != ShutdownReason::Suspend
        {
            return Ok(Some(reason.end()));
        }
        if run.signal().is_none() {
            return Err(DriverError::Save(run.describe()));
        }
        match state {
            // xl destroys the domain only after libxl reported the save
            // complete (and the file closed): the save is whole.
            DomainState::Gone | DomainState::Dying => {
                tracing::warn!("{}, but the domain is gone: the save completed", run.describe());
                domain.alive = false;
                break;
            }
            // Nothing was done, or libxl resumed the guest after a failure.
            DomainState::Running if attempt < SIGNAL_RETRIES => {
                attempt += 1;
                tracing::warn!(attempt, "{}; the domain still runs, saving again", run.describe());
            }
            DomainState::Running => return Err(DriverError::Save(run.describe())),
            // Suspended mid-save by an xl that then died: `xl` cannot resume
            // it, and the file may be short. This attempt is lost.
            DomainState::Shutdown(_) => {
                return Err(DriverError::Save(format!(
                    "{}; the domain was left suspended mid-save",
                    run.describe()
                )));
            }
        }
    }
    // A whole save file starts with a well-formed header and config.
    read_saved_config(partial)
        .await
        .map_err(|why| DriverError::Save(format!("xl save wrote an unreadable file: {why}")))?;
    Ok(None)
}

/// One segment's domain. Dropped while it may still exist (a panic, a
/// dropped future), it is destroyed by a detached `xl destroy`.
pub(crate) struct Domain {
    xl: Xl,
    name: String,
    /// Whether the domain may exist: set before it is created, cleared
    /// once `xl save` or `xl destroy` removed it.
    alive: bool,
}

impl Domain {
    pub fn new(xl: Xl, name: String) -> Domain {
        Domain {
            xl,
            name,
            alive: false,
        }
    }

    /// `xl create` / `xl restore` (`args`), retried after destroying any
    /// half-made domain when `xl` died from a signal; `fail` names the
    /// error of a start that `xl` refused.
    pub async fn start(
        &mut self,
        args: &[&OsStr],
        fail: fn(String) -> DriverError,
        cancel: &CancellationToken,
    ) -> Result<(), DriverError> {
        self.alive = true;
        let mut attempt = 0;
        loop {
            let run = self.xl.run(args, START_TIMEOUT, cancel).await?;
            if run.success() {
                return Ok(());
            }
            // A failed create can leave a half-built domain of our name.
            self.destroy().await?;
            if run.signal().is_none() || attempt >= SIGNAL_RETRIES {
                return Err(fail(run.describe()));
            }
            attempt += 1;
            tracing::warn!(attempt, "{}; trying again", run.describe());
            self.alive = true;
        }
    }

    /// The domain's state from `xl list <name>`.
    pub async fn state(&self, cancel: &CancellationToken) -> Result<DomainState, DriverError> {
        let run = self
            .xl
            .run_retrying(&["list", self.name.as_str()], QUERY_TIMEOUT, cancel)
            .await?;
        if run.success() {
            return parse_list(&run.stdout, &self.name).ok_or_else(|| {
                DriverError::Toolstack(format!(
                    "`xl list {}` printed no state: {:?}",
                    self.name, run.stdout
                ))
            });
        }
        if is_no_such_domain(&run.stderr) {
            return Ok(DomainState::Gone);
        }
        Err(DriverError::Toolstack(run.describe()))
    }

    /// `xl pause` or `xl unpause` (`verb`; both may be repeated): `None`,
    /// or how the guest ended if it shut down before `xl` could act.
    pub async fn pause_or_unpause(
        &self,
        verb: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<SegmentEnd>, DriverError> {
        let run = self
            .xl
            .run_retrying(&[verb, self.name.as_str()], QUERY_TIMEOUT, cancel)
            .await?;
        if run.success() {
            return Ok(None);
        }
        match self.state(cancel).await? {
            DomainState::Shutdown(reason) => Ok(Some(reason.end())),
            _ => Err(DriverError::Toolstack(run.describe())),
        }
    }

    /// `xl destroy`, never cancelled; a domain that is already gone is
    /// fine.
    pub async fn destroy(&mut self) -> Result<(), DriverError> {
        if !self.alive {
            return Ok(());
        }
        let never = CancellationToken::new();
        let run = self
            .xl
            .run_retrying(&["destroy", self.name.as_str()], QUERY_TIMEOUT, &never)
            .await?;
        if run.success() || is_no_such_domain(&run.stderr) {
            self.alive = false;
            return Ok(());
        }
        Err(DriverError::Toolstack(format!(
            "{}: domain {} may still exist",
            run.describe(),
            self.name
        )))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if !self.alive {
            return;
        }
        let binary = self.xl.binary.clone();
        let name = std::mem::take(&mut self.name);
        tracing::warn!(domain = %name, "segment abandoned: destroying its domain in the background");
        // No runtime to await on in a destructor: a plain thread waits.
        std::thread::spawn(move || {
            for _ in 0..=SIGNAL_RETRIES {
                match std::process::Command::new(&binary)
                    .args(["destroy", name.as_str()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                {
                    Ok(status) if status.signal().is_some() => continue,
                    _ => return,
                }
            }
        });
    }
}

/// What `xl list` says of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DomainState {
    /// Running, blocked, runnable or paused: not shut down.
    Running,
    Shutdown(ShutdownReason),
    Dying,
    Gone,
}

/// `SHUTDOWN_*` of xen/include/public/sched.h, as `xl list` prints them in
/// the fifth letter of its state column (`-rscwS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShutdownReason {
    Poweroff,
    Reboot,
    Suspend,
    Crash,
    Watchdog,
    SoftReset,
    Unknown,
}

impl ShutdownReason {
    fn from_letter(c: char) -> ShutdownReason {
        match c {
            '-' => ShutdownReason::Poweroff,
            'r' => ShutdownReason::Reboot,
            's' => ShutdownReason::Suspend,
            'c' => ShutdownReason::Crash,
            'w' => ShutdownReason::Watchdog,
            'S' => ShutdownReason::SoftReset,
            _ => ShutdownReason::Unknown,
        }
    }

    /// A poweroff ends the job; anything else is a crash (a reboot too: the
    /// guest is not rebooted, `on_reboot="preserve"`).
    fn end(self) -> SegmentEnd {
        let reason = match self {
            ShutdownReason::Poweroff => return SegmentEnd::Halted,
            ShutdownReason::Reboot => "reboot",
            ShutdownReason::Suspend => "suspend (not requested by the provider)",
            ShutdownReason::Crash => "crash",
            ShutdownReason::Watchdog => "watchdog",
            ShutdownReason::SoftReset => "soft-reset",
            ShutdownReason::Unknown => "unknown shutdown reason",
        };
        SegmentEnd::Crashed {
            reason: reason.to_string(),
        }
    }
}

/// The state of `name` in `xl list` output: the header, then
/// `name id mem vcpus state time` with a state like `-b----` or `---sc-`.
pub(crate) fn parse_list(stdout: &str, name: &str) -> Option<DomainState> {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let flags: Vec<char> = line.split_whitespace().nth(4)?.chars().collect();
    if flags.len() != 6 {
        return None;
    }
    Some(if flags[5] == 'd' {
        DomainState::Dying
    } else if flags[3] == 's' {
        DomainState::Shutdown(ShutdownReason::from_letter(flags[4]))
    } else {
        DomainState::Running
    })
}

/// `vmlot-<pid>-<8 hex>`: unique per segment, and the pid tells an
/// operator which provider process a leftover domain belonged to.
pub(crate) fn domain_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{DOMAIN_PREFIX}{}-{n}-{}", std::process::id(), &random[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::xen::config::config_str;

    const LIST_HEADER: &str = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n";

    fn list_line(name: &str, state: &str) -> String {
        format!(
            "{LIST_HEADER}{name:<40} {:>5} {:>5} {:>5}     {state}  {:>8.1}\n",
            7, 128, 1, 0.4
        )
    }

    #[test]
    fn list_state_column_is_read() {
        let n = "vmlot-12-3-0badcafe";
        let state = |s| parse_list(&list_line(n, s), n);
        assert_eq!(state("r-----"), Some(DomainState::Running));
        assert_eq!(state("-b----"), Some(DomainState::Running));
        assert_eq!(state("------"), Some(DomainState::Running));
        assert_eq!(state("--p---"), Some(DomainState::Running));
        assert_eq!(
            state("---s--"),
            Some(DomainState::Shutdown(ShutdownReason::Poweroff))
        );
        assert_eq!(
            state("---sr-"),
            Some(DomainState::Shutdown(ShutdownReason::Reboot))
        );
        assert_eq!(
            state("---sc-"),
            Some(DomainState::Shutdown(ShutdownReason::Crash))
        );
        assert_eq!(
            state("---ss-"),
            Some(DomainState::Shutdown(ShutdownReason::Suspend))
        );
        assert_eq!(
            state("---sw-"),
            Some(DomainState::Shutdown(ShutdownReason::Watchdog))
        );
        assert_eq!(state("---sc-d"), None);
        assert_eq!(state("-----d"), Some(DomainState::Dying));
        assert_eq!(state("---scd"), Some(DomainState::Dying));
        // Another domain's line is not ours, and a prefix is not a match.
        assert_eq!(parse_list(&list_line("vmlot-12-3", "r-----"), n), None);
        assert_eq!(parse_list(LIST_HEADER, n), None);
    }

    #[test]
    fn shutdown_reasons_end_segments() {
        assert_eq!(ShutdownReason::Poweroff.end(), SegmentEnd::Halted);
        for r in [
            ShutdownReason::Reboot,
            ShutdownReason::Crash,
            ShutdownReason::Watchdog,
            ShutdownReason::Suspend,
            ShutdownReason::SoftReset,
            ShutdownReason::Unknown,
        ] {
            assert!(matches!(r.end(), SegmentEnd::Crashed { .. }), "{r:?}");
        }
    }

    #[test]
    fn domain_names_are_unique_and_plain() {
        let a = domain_name();
        let b = domain_name();
        assert_ne!(a, b);
        let pid = std::process::id().to_string();
        assert!(a.starts_with(&format!("{DOMAIN_PREFIX}{pid}-")), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
        assert!(config_str("name", &a).is_ok());
    }
}
