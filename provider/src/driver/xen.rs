//! The Xen driver: one domain per segment, driven through the `xl`
//! toolstack (Xen 4.17, Debian's `xen-utils-4.17`) from dom0.
//!
//! Every segment writes its own `xl` domain config into its workdir, built
//! from the lot's [`VmConfig`] and the boot files, under a domain name used
//! by no other segment. Segment 0 is `xl create -e <cfg>`; a later segment
//! is `xl restore -e <cfg> <machine-state>` with that fresh config, because
//! the config inside a save file names the disk paths of the host that
//! saved it. Before restoring, the config embedded in the save file is read
//! and compared with the lot (type, memory, vCPUs); a mismatch is refused.
//! `-e` makes `xl` return once the domain runs instead of leaving a monitor
//! process behind; with every `on_*` action `preserve`, a guest that powers
//! off, reboots or crashes stays in its shut-down state, so the driver can
//! read how it ended before it destroys the domain.
//!
//! While the guest runs the driver polls `xl list <name>` (the six-letter
//! state column `rbps?d`, whose fifth letter is the shutdown reason) every
//! [`POLL_INTERVAL`]. At the planned time it runs `xl save <name>
//! <workdir>/machine-state.partial`, which suspends the guest, writes the
//! file and destroys the domain; the file is renamed to `machine-state`
//! once whole. The disks are written in place by the guest and reported
//! back as they stand.
//!
//! The console: xenconsoled (`--log=guest`) writes each domain's console to
//! `<console_dir>/guest-<name>.log`. A name is never reused, so that file
//! holds exactly this segment's output: it is read once the domain is gone
//! and its size has settled, then deleted. Output the guest wrote but
//! xenconsoled had not yet read at save time stays in the console ring
//! page, which is part of the saved memory of a PV guest, and is read out
//! after the restore; the consoles of a job's segments, concatenated, are
//! the console of an uninterrupted run. (A PVH restore clears the console
//! page: up to one ring of unread output can be lost there.)
//!
//! `xl` under nested emulation sometimes dies from a signal. A command that
//! does was not carried out, or not wholly: queries and `destroy` are simply
//! retried; a `create` or `restore` is retried after destroying whatever
//! half-made domain it left; after a `save` the domain's state decides (gone:
//! the save completed; still running: retry; left suspended: the attempt
//! fails). Every way out of a segment destroys its domain.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vmlot_schemas::{HypervisorKind, VmConfig};

use super::{
    BootFiles, Driver, DriverError, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart, find_binary,
    io_err, remove_if_exists, validate,
};

/// Used when [`XenConfig::binary`] is not set; looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "xl";
/// The Debian package that ships [`DEFAULT_BINARY`], named in errors.
pub const PACKAGE: &str = "xen-utils-4.17";
/// Where xenconsoled `--log=guest` writes guest consoles by default.
pub const DEFAULT_CONSOLE_DIR: &str = "/var/log/xen/console";
/// The file a saved segment leaves in its workdir.
pub const STATE_FILE: &str = "machine-state";
const PARTIAL_STATE_FILE: &str = "machine-state.partial";
/// The `xl` domain config of the segment, in its workdir.
pub const CONFIG_FILE: &str = "domain.cfg";
/// Every `xl` command of the segment with its exit status and stderr, in
/// the workdir (kept for post-mortems).
pub const XL_LOG_FILE: &str = "xl.log";
/// Prefix of every domain name this driver creates.
pub const DOMAIN_PREFIX: &str = "vmlot-";
/// Says `control_d` in dom0 (xenfs).
const CAPABILITIES: &str = "/proc/xen/capabilities";

/// The magic an xl save file starts with (`savefileheader_magic` in
/// tools/xl/xl.h): 32 bytes, the NUL included.
pub const SAVE_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// `SAVEFILE_BYTEORDER_VALUE`, written in the saving host's byte order.
const SAVE_BYTEORDER: u32 = 0x0102_0304;
/// `XL_MANDATORY_FLAG_JSON`: the embedded config is libxl JSON.
const SAVE_FLAG_JSON: u32 = 1 << 0;
/// `XL_MANDATORY_FLAG_STREAMv2`: the domain stream is migration v2.
const SAVE_FLAG_STREAM_V2: u32 = 1 << 1;
/// magic, byteorder, mandatory_flags, optional_flags, optional_data_len.
const SAVE_HEADER_LEN: usize = 32 + 4 * 4;
/// A domain config is a few KiB of JSON; anything far larger is not one.
const MAX_OPTIONAL_DATA: u32 = 1 << 20;

/// `xl info`, `list`, `destroy`: quick, except under nested emulation.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// `xl create` / `restore`: building the domain, loading its memory.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// `xl save`: writing guest RAM to a local file; this only catches a
/// wedged save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a running guest's state is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Times an `xl` command that died from a signal is tried again.
const SIGNAL_RETRIES: u32 = 3;
/// xenconsoled drains the ring asynchronously: the log is complete once
/// its size has not changed for this long…
const CONSOLE_SETTLE: Duration = Duration::from_millis(300);
const CONSOLE_POLL: Duration = Duration::from_millis(50);
/// …or, at the latest, after this long.
const CONSOLE_MAX_WAIT: Duration = Duration::from_secs(10);
/// xvda … xvdz.
const MAX_DISKS: usize = 26;
/// Most of an `xl` stderr kept in an error message.
const STDERR_TAIL: usize = 4096;

/// Which kind of Xen guest a domain is. Checkpoints only restore into the
/// same kind, so providers of one market should agree on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestType {
    /// Paravirtualized: no hardware virtualization needed, so it works in
    /// a Xen nested under TCG. The kernel must be a Xen PV kernel (its
    /// console is `hvc0`).
    #[default]
    Pv,
    /// PVH: a PV-aware kernel in an HVM container. Needs VT-x/AMD-V in the
    /// machine Xen runs on; domains get `tsc_mode="native"`, which nested
    /// TCG needs.
    Pvh,
}

impl GuestType {
    /// The word `xl` and libxl use: `pv` or `pvh`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestType::Pv => "pv",
            GuestType::Pvh => "pvh",
        }
    }
}

impl FromStr for GuestType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pv" => Ok(GuestType::Pv),
            "pvh" => Ok(GuestType::Pvh),
            other => Err(format!("unknown Xen guest type {other:?} (pv, pvh)")),
        }
    }
}

/// How to run Xen domains.
#[derive(Clone, Debug)]
pub struct XenConfig {
    /// The `xl` binary; a bare name is looked up on `PATH`.
    /// Default: [`DEFAULT_BINARY`].
    pub binary: Option<PathBuf>,
    pub guest_type: GuestType,
    /// Where xenconsoled writes `guest-<domain>.log` (its `--log-dir`).
    pub console_dir: PathBuf,
}

impl Default for XenConfig {
    fn default() -> Self {
        XenConfig {
            binary: None,
            guest_type: GuestType::default(),
            console_dir: PathBuf::from(DEFAULT_CONSOLE_DIR),
        }
    }
}

/// Runs segments of x86_64 guests as Xen domains, through `xl` in dom0.
pub struct XenDriver {
    binary: PathBuf,
    guest_type: GuestType,
    console_dir: PathBuf,
    /// Set once this machine has been seen to be a working dom0; a failed
    /// check is repeated on the next segment.
    toolstack: OnceCell<()>,
}

impl XenDriver {
    pub fn new(config: XenConfig) -> Self {
        XenDriver {
            binary: config.binary.unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY)),
            guest_type: config.guest_type,
            console_dir: config.console_dir,
            toolstack: OnceCell::new(),
        }
    }

    /// The guest type this driver builds domains of.
    pub fn guest_type(&self) -> GuestType {
        self.guest_type
    }

    /// Checks that this is a dom0 with a working toolstack: `xl info`
    /// answers, `/proc/xen/capabilities` says `control_d`, and the console
    /// log directory exists. Every problem found is named in one
    /// [`DriverError::Toolstack`]. Success is kept for the driver's life.
    pub async fn check_toolstack(&self, cancel: &CancellationToken) -> Result<(), DriverError> {
        let binary = find_binary(&self.binary, PACKAGE)?;
        self.toolstack
            .get_or_try_init(|| async {
                let xl = Xl {
                    binary: binary.clone(),
                    log: None,
                };
                let info = xl.run_retrying(&["info"], QUERY_TIMEOUT, cancel).await?;
                let caps = tokio::fs::read_to_string(CAPABILITIES).await;
                let mut problems = Vec::new();
                match &caps {
                    Ok(c)
                        if c.split(|ch: char| ch == ',' || ch.is_whitespace())
                            .any(|w| w == "control_d") => {}
                    Ok(c) => problems.push(format!(
                        "{CAPABILITIES} says {:?}, not control_d: this is a guest domain, not dom0",
                        c.trim()
                    )),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(format!(
                        "no {CAPABILITIES}: this machine is not running under Xen \
                         (or xenfs is not mounted on /proc/xen)"
                    )),
                    Err(e) => problems.push(format!("{CAPABILITIES}: {e}")),
                }
                if !info.success() {
                    problems.push(format!(
                        "{} (xl needs root in dom0 with xenstored running: start xencommons)",
                        info.describe()
                    ));
                }
                if !self.console_dir.is_dir() {
                    problems.push(format!(
                        "no console log directory {}: xenconsoled must run with --log=guest --log-dir={}",
                        self.console_dir.display(),
                        self.console_dir.display()
                    ));
                }
                if problems.is_empty() {
                    tracing::info!(xl = %binary.display(), "Xen toolstack ready (dom0)");
                    reap_orphans(&xl, cancel).await;
                    Ok(())
                } else {
                    Err(DriverError::Toolstack(problems.join("; ")))
                }
            })
            .await
            .map(|_| ())
    }

    async fn run(&self, plan: &SegmentPlan, cancel: CancellationToken) -> Result<SegmentReport, DriverError> {
        if plan.vm.hypervisor != HypervisorKind::Xen {
            return Err(DriverError::WrongHypervisor {
                expected: HypervisorKind::Xen,
                actual: plan.vm.hypervisor,
            });
        }
        validate(plan)?;
        let files = absolute_files(&plan.files)?;
        let name = domain_name();
        // Built before anything runs: a value that cannot be written into
        // an xl config is a bad image, whatever the host.
        let config = domain_config(&name, &plan.vm, &files, self.guest_type)?;
        // Likewise a checkpoint of another machine than the lot's.
        if let SegmentStart::Restore { machine_state } = &plan.start {
            let saved = read_saved_config(machine_state).await?;
            check_saved_config(&saved, &plan.vm, self.guest_type)?;
        }
        let binary = find_binary(&self.binary, PACKAGE)?;
        if cancel.is_cancelled() {
            return Err(DriverError::Cancelled);
        }
        self.check_toolstack(&cancel).await?;
        tokio::fs::create_dir_all(&plan.workdir)
            .await
            .map_err(|e| io_err("create", &plan.workdir, e))?;
        let workdir =
            std::fs::canonicalize(&plan.workdir).map_err(|e| io_err("resolve", &plan.workdir, e))?;
        let config_path = workdir.join(CONFIG_FILE);
        std::fs::write(&config_path, &config).map_err(|e| io_err("write", &config_path, e))?;
        let console = self.console_dir.join(format!("guest-{name}.log"));
        // Only a stale file of a dead provider could be there; its bytes are
        // not this segment's.
        remove_if_exists(&console)?;

        let span = tracing::info_span!("xen_segment", domain = %name);
        let xl = Xl {
            binary,
            log: Some(workdir.join(XL_LOG_FILE)),
        };
        let mut domain = Domain::new(xl, name);
        async move {
            let result = drive(&mut domain, plan, &config_path, &workdir, &cancel).await;
            // A guest that halted or crashed is still there (preserved):
            // let xenconsoled read the rest of its ring before it goes.
            if matches!(&result, Ok((SegmentEnd::Halted | SegmentEnd::Crashed { .. }, ..))) {
                settle(&console).await;
            }
            let destroyed = domain.destroy().await;
            let (end, start_time, run_time, save_time) = match result {
                Ok(outcome) => outcome,
                Err(e) => {
                    let _ = std::fs::remove_file(&console);
                    return Err(e);
                }
            };
            // The segment's result stands; a domain that would not go is
            // the host's problem (and the guard tries once more).
            if let Err(e) = destroyed {
                tracing::error!("after the segment: {e}");
            }
            let console = take_console(&console).await?;
            tracing::info!(?end, bytes = console.len(), "segment done");
            Ok(SegmentReport {
                end,
                console,
                start_time,
                run_time,
                save_time,
            })
        }
        .instrument(span)
        .await
    }
}

impl Driver for XenDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Xen
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

/// Start → run → save; the caller destroys whatever is left of the domain.
async fn drive(
    domain: &mut Domain,
    plan: &SegmentPlan,
    config: &Path,
    workdir: &Path,
    cancel: &CancellationToken,
) -> Result<Outcome, DriverError> {
    let started = Instant::now();
    match &plan.start {
        SegmentStart::Boot => {
            let args = [OsStr::new("create"), OsStr::new("-e"), config.as_os_str()];
            domain.start(&args, DriverError::Start, cancel).await?;
        }
        SegmentStart::Restore { machine_state } => {
            let machine_state = std::fs::canonicalize(machine_state)
                .map_err(|e| DriverError::Restore(format!("{}: {e}", machine_state.display())))?;
            let args = [
                OsStr::new("restore"),
                OsStr::new("-e"),
                config.as_os_str(),
                machine_state.as_os_str(),
            ];
            domain.start(&args, DriverError::Restore, cancel).await?;
        }
    }
    // Neither create nor restore was given -p: the guest runs from here.
    let start_time = started.elapsed();
    tracing::info!(start_time = ?start_time, "domain running");

    let run_started = Instant::now();
    let ended = run_guest(domain, plan.run_for, cancel).await?;
    let run_time = run_started.elapsed();
    if let Some(end) = ended {
        return Ok((end, start_time, run_time, Duration::ZERO));
    }

    // Saved under another name and renamed once complete: a failed save
    // leaves no half file, and a checkpoint restored from the same path
    // survives until its successor is whole.
    let partial = workdir.join(PARTIAL_STATE_FILE);
    let state = workdir.join(STATE_FILE);
    let save_started = Instant::now();
    let end = match save(domain, &partial, cancel).await {
        Ok(Some(end)) => {
            let _ = std::fs::remove_file(&partial);
            end
        }
        Ok(None) => {
            std::fs::rename(&partial, &state).map_err(|e| io_err("rename", &partial, e))?;
            SegmentEnd::Saved {
                machine_state: state,
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
        .map_err(|e| DriverError::Save(format!("xl save wrote an unreadable file: {e}")))?;
    Ok(None)
}

/// One segment's domain. Dropped while it may still exist (a panic, a
/// dropped future), it is destroyed by a detached `xl destroy`.
struct Domain {
    xl: Xl,
    name: String,
    /// Whether the domain may exist: set before it is created, cleared
    /// once `xl save` or `xl destroy` removed it.
    alive: bool,
}

impl Domain {
    fn new(xl: Xl, name: String) -> Domain {
        Domain {
            xl,
            name,
            alive: false,
        }
    }

    /// `xl create` / `xl restore` (`args`), retried after destroying any
    /// half-made domain when `xl` died from a signal; `fail` names the
    /// error of a start that `xl` refused.
    async fn start(
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
    async fn state(&self, cancel: &CancellationToken) -> Result<DomainState, DriverError> {
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

    /// `xl destroy`, never cancelled; a domain that is already gone is
    /// fine.
    async fn destroy(&mut self) -> Result<(), DriverError> {
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
enum DomainState {
    /// Running, blocked, runnable or paused: not shut down.
    Running,
    Shutdown(ShutdownReason),
    Dying,
    Gone,
}

/// `SHUTDOWN_*` of xen/include/public/sched.h, as `xl list` prints them in
/// the fifth letter of its state column (`-rscwS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShutdownReason {
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
fn parse_list(stdout: &str, name: &str) -> Option<DomainState> {
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

/// `xl` naming a domain that does not exist (find_domain: "… is an invalid
/// domain identifier"; list: "Domain '…' does not exist").
fn is_no_such_domain(stderr: &str) -> bool {
    stderr.contains("invalid domain identifier") || stderr.contains("does not exist")
}

/// The `xl` binary and the segment's command log.
struct Xl {
    binary: PathBuf,
    log: Option<PathBuf>,
}

/// A finished `xl` command.
struct XlRun {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl XlRun {
    fn success(&self) -> bool {
        self.status.success()
    }

    fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// The command, how it ended, and the end of its stderr.
    fn describe(&self) -> String {
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
    async fn run<S: AsRef<OsStr>>(
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
            .map_err(|e| spawn_error(&self.binary, e))?;
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
    async fn run_retrying<S: AsRef<OsStr>>(
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

/// Waits until xenconsoled has stopped appending to `path`.
async fn settle(path: &Path) {
    let size = || std::fs::metadata(path).map(|m| m.len()).ok();
    let started = Instant::now();
    let mut last = size();
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(CONSOLE_POLL).await;
        let now = size();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= CONSOLE_SETTLE {
            return;
        }
        if started.elapsed() >= CONSOLE_MAX_WAIT {
            tracing::warn!(path = %path.display(), "console log still growing; taken as it stands");
            return;
        }
    }
}

/// The segment's console once the domain is gone: the whole log file,
/// which is then deleted.
async fn take_console(path: &Path) -> Result<Vec<u8>, DriverError> {
    settle(path).await;
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                path = %path.display(),
                "no console log: is xenconsoled running with --log=guest?"
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(io_err("read", path, e)),
    };
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), "removing console log: {e}");
    }
    Ok(bytes)
}

/// Destroys the domains of providers that died on this host (SIGKILL
/// leaves them running: `xl create -e` ties a domain to no process), so
/// their memory is free for the segments this provider will run. A domain
/// is an orphan when its name carries the pid of a process that is gone;
/// those of live providers beside this one are left alone.
async fn reap_orphans(xl: &Xl, cancel: &CancellationToken) {
    let list = match xl.run_retrying(&["list"], QUERY_TIMEOUT, cancel).await {
        Ok(run) if run.success() => run.stdout,
        _ => return,
    };
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    for name in orphaned_domains(&list, std::process::id(), alive) {
        tracing::warn!(domain = %name, "destroying a domain left by a provider that died");
        if let Err(e) = xl
            .run_retrying(&["destroy", name.as_str()], QUERY_TIMEOUT, cancel)
            .await
        {
            tracing::warn!(domain = %name, "could not destroy it: {e}");
        }
    }
}

/// The names in `xl list` output made by a provider process (see
/// [`domain_name`]) that is neither `own_pid` nor `alive`.
fn orphaned_domains(list: &str, own_pid: u32, alive: impl Fn(u32) -> bool) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let pid: u32 = name
                .strip_prefix(DOMAIN_PREFIX)?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            (pid != own_pid && !alive(pid)).then(|| name.to_string())
        })
        .collect()
}

/// `vmlot-<pid>-<8 hex>`: unique per segment, and the pid tells an
/// operator which provider process a leftover domain belonged to.
fn domain_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{DOMAIN_PREFIX}{}-{n}-{}", std::process::id(), &random[..8])
}

/// The xl domain config of one segment. `files` must be absolute paths.
///
/// Every string is written between quotes that xl's config parser ends at
/// the next quote, so a value holding a quote, a backslash or a line break
/// is refused ([`DriverError::BadImage`]) rather than escaped.
fn domain_config(
    name: &str,
    vm: &VmConfig,
    files: &BootFiles,
    guest: GuestType,
) -> Result<String, DriverError> {
    if files.disks.len() > MAX_DISKS {
        return Err(DriverError::BadImage(format!(
            "{} disks; at most {MAX_DISKS} (xvda…xvdz)",
            files.disks.len()
        )));
    }
    let mut cfg = String::new();
    let _ = writeln!(cfg, "# One segment of a vmlot job; written by the provider.");
    let _ = writeln!(cfg, "name = \"{}\"", config_str("domain name", name)?);
    let _ = writeln!(cfg, "type = \"{}\"", guest.as_str());
    let _ = writeln!(cfg, "memory = {}", vm.memory_mib);
    let _ = writeln!(cfg, "vcpus = {}", vm.vcpus);
    let _ = writeln!(cfg, "kernel = \"{}\"", config_path("kernel", &files.kernel)?);
    if let Some(initrd) = &files.initrd {
        let _ = writeln!(cfg, "ramdisk = \"{}\"", config_path("initrd", initrd)?);
    }
    let _ = writeln!(
        cfg,
        "cmdline = \"{}\"",
        config_str("kernel command line", &vm.cmdline)?
    );
    if guest == GuestType::Pvh {
        // The TSC as the CPU has it: under nested TCG Xen's emulated TSC
        // modes misbehave.
        let _ = writeln!(cfg, "tsc_mode = \"native\"");
    }
    let mut disks = Vec::new();
    for (i, disk) in files.disks.iter().enumerate() {
        let target = config_path("disk", disk)?;
        // target= comes last: xl takes the rest of the spec literally, commas
        // included.
        disks.push(format!(
            "'format=raw, vdev=xvd{}, access=rw, target={target}'",
            char::from(b'a' + i as u8)
        ));
    }
    if disks.is_empty() {
        let _ = writeln!(cfg, "disk = [ ]");
    } else {
        let _ = writeln!(cfg, "disk = [ {} ]", disks.join(", "));
    }
    let _ = writeln!(cfg, "vif = [ ]");
    // Keep a shut-down domain, so its state says how it ended.
    for event in ["on_poweroff", "on_reboot", "on_crash", "on_watchdog"] {
        let _ = writeln!(cfg, "{event} = \"preserve\"");
    }
    Ok(cfg)
}

fn config_str<'a>(what: &str, value: &'a str) -> Result<&'a str, DriverError> {
    match value
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\' | '\n' | '\r' | '\0'))
    {
        Some(c) => Err(DriverError::BadImage(format!(
            "{what} {value:?} holds {c:?}, which cannot be written into an xl config"
        ))),
        None => Ok(value),
    }
}

fn config_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, DriverError> {
    let s = path
        .to_str()
        .ok_or_else(|| DriverError::BadImage(format!("{what} path {} is not UTF-8", path.display())))?;
    if !path.is_absolute() {
        return Err(DriverError::BadImage(format!("{what} path {s} is not absolute")));
    }
    config_str(&format!("{what} path"), s)
}

/// The boot files as absolute paths without symlinks, as `xl` (running
/// elsewhere) must see them.
fn absolute_files(files: &BootFiles) -> Result<BootFiles, DriverError> {
    let resolve = |what: &str, p: &Path| {
        std::fs::canonicalize(p).map_err(|e| DriverError::BadImage(format!("{what} {}: {e}", p.display())))
    };
    Ok(BootFiles {
        kernel: resolve("kernel", &files.kernel)?,
        initrd: files
            .initrd
            .as_deref()
            .map(|p| resolve("initrd", p))
            .transpose()?,
        disks: files
            .disks
            .iter()
            .map(|p| resolve("disk", p))
            .collect::<Result<_, _>>()?,
    })
}

/// What the header of an xl save file says about the domain it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedConfig {
    /// `mandatory_flags` of the header.
    pub mandatory_flags: u32,
    /// `c_info.type`: `pv`, `pvh` or `hvm`.
    pub guest_type: Option<String>,
    /// `b_info.max_memkb` (the domain's `maxmem`, its memory if unset).
    pub max_memkb: Option<u64>,
    /// `b_info.target_memkb`.
    pub target_memkb: Option<u64>,
    /// `b_info.max_vcpus`.
    pub max_vcpus: Option<u64>,
    /// The domain's name when it was saved.
    pub name: Option<String>,
}

/// Reads the header and embedded config of the xl save file at `path`.
///
/// Layout (tools/xl/xl.h `struct save_file_header`, written by
/// `save_domain_core_writeconfig` in tools/xl/xl_saverestore.c): 32 bytes
/// of [`SAVE_MAGIC`]; `u32 byteorder` (0x01020304), `u32 mandatory_flags`,
/// `u32 optional_flags`, `u32 optional_data_len`, all in the saving host's
/// byte order; then `optional_data_len` bytes of optional data: a `u32`
/// config length and that many bytes of config, libxl JSON with a trailing
/// NUL when the `JSON` flag (bit 0) is set. The domain's stream follows.
pub async fn read_saved_config(path: &Path) -> Result<SavedConfig, DriverError> {
    let bad = |why: String| DriverError::Restore(format!("{}: {why}", path.display()));
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let mut fixed = [0u8; SAVE_HEADER_LEN];
    let got = read_full(&mut file, &mut fixed)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let header = SaveHeader::parse(&fixed[..got]).map_err(bad)?;
    let mut optional = vec![0u8; header.optional_data_len as usize];
    let got = read_full(&mut file, &mut optional)
        .await
        .map_err(|e| bad(e.to_string()))?;
    if got < optional.len() {
        return Err(bad(format!(
            "truncated: {got} of {} bytes of optional data",
            optional.len()
        )));
    }
    header.config(&optional).map_err(bad)
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The fixed part of an xl save file header.
#[derive(Clone, Copy, Debug)]
struct SaveHeader {
    big_endian: bool,
    mandatory_flags: u32,
    optional_data_len: u32,
}

impl SaveHeader {
    fn parse(bytes: &[u8]) -> Result<SaveHeader, String> {
        if bytes.len() < SAVE_MAGIC.len() || &bytes[..SAVE_MAGIC.len()] != SAVE_MAGIC {
            return Err("not an xl save file (no \"Xen saved domain, xl format\" magic)".into());
        }
        if bytes.len() < SAVE_HEADER_LEN {
            return Err(format!(
                "truncated: {} of {SAVE_HEADER_LEN} header bytes",
                bytes.len()
            ));
        }
        let word = |i: usize| -> [u8; 4] {
            let at = SAVE_MAGIC.len() + 4 * i;
            [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
        };
        let big_endian = match word(0) {
            w if u32::from_le_bytes(w) == SAVE_BYTEORDER => false,
            w if u32::from_be_bytes(w) == SAVE_BYTEORDER => true,
            w => return Err(format!("bad byte-order marker {:02x?}", w)),
        };
        let u32_at = |i| {
            if big_endian {
                u32::from_be_bytes(word(i))
            } else {
                u32::from_le_bytes(word(i))
            }
        };
        if big_endian != cfg!(target_endian = "big") {
            return Err("saved on a host of the other byte order".into());
        }
        let header = SaveHeader {
            big_endian,
            mandatory_flags: u32_at(1),
            optional_data_len: u32_at(3),
        };
        let unknown = header.mandatory_flags & !(SAVE_FLAG_JSON | SAVE_FLAG_STREAM_V2);
        if unknown != 0 {
            return Err(format!(
                "mandatory flags {unknown:#x} unknown to Xen 4.17's xl (saved by a newer xl?)"
            ));
        }
        if header.optional_data_len > MAX_OPTIONAL_DATA {
            return Err(format!(
                "{} bytes of optional data; a domain config is far smaller",
                header.optional_data_len
            ));
        }
        Ok(header)
    }

    /// The embedded config, from the optional data.
    fn config(&self, optional: &[u8]) -> Result<SavedConfig, String> {
        if optional.len() < 4 {
            return Err("no domain config in the save file".into());
        }
        let len_bytes = [optional[0], optional[1], optional[2], optional[3]];
        let len = if self.big_endian {
            u32::from_be_bytes(len_bytes)
        } else {
            u32::from_le_bytes(len_bytes)
        } as usize;
        let data = optional.get(4..4 + len).ok_or_else(|| {
            format!(
                "config of {len} bytes overruns {} bytes of optional data",
                optional.len()
            )
        })?;
        if self.mandatory_flags & SAVE_FLAG_JSON == 0 {
            return Err(
                "the embedded config is in xl's old text form, not JSON (saved by a pre-4.5 xl)".into(),
            );
        }
        let text = data.strip_suffix(&[0]).unwrap_or(data);
        let json: Value =
            serde_json::from_slice(text).map_err(|e| format!("embedded config is not JSON: {e}"))?;
        let c_info = json.get("c_info");
        let b_info = json.get("b_info");
        let guest_type = c_info
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .or_else(|| {
                // The build info's keyed union: "type.pv": {…}.
                b_info?
                    .as_object()?
                    .keys()
                    .find_map(|k| k.strip_prefix("type.").map(str::to_ascii_lowercase))
            });
        let number = |v: Option<&Value>, key: &str| v.and_then(|v| v.get(key)).and_then(Value::as_u64);
        Ok(SavedConfig {
            mandatory_flags: self.mandatory_flags,
            guest_type,
            max_memkb: number(b_info, "max_memkb"),
            target_memkb: number(b_info, "target_memkb"),
            max_vcpus: number(b_info, "max_vcpus"),
            name: c_info
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// Refuses a save file whose domain is not the lot's: another guest type,
/// memory size or vCPU count would not restore into the domain we build
/// (or would restore into a different machine than the lot paid for).
fn check_saved_config(saved: &SavedConfig, vm: &VmConfig, guest: GuestType) -> Result<(), DriverError> {
    let mismatch = |field: &str, saved: String, lot: String| {
        DriverError::Restore(format!(
            "checkpoint does not match the lot: {field} is {saved} in the save file, {lot} in the lot"
        ))
    };
    match saved.guest_type.as_deref() {
        Some(t) if t == guest.as_str() => {}
        Some(t) => {
            return Err(mismatch(
                "type",
                t.to_string(),
                format!("{} (this provider's guest type)", guest.as_str()),
            ));
        }
        None => return Err(DriverError::Restore("save file config has no domain type".into())),
    }
    let memkb = saved.max_memkb.or(saved.target_memkb).ok_or_else(|| {
        DriverError::Restore("save file config has no memory size (b_info.max_memkb)".into())
    })?;
    if memkb != u64::from(vm.memory_mib) * 1024 {
        return Err(mismatch(
            "memory",
            format!("{} MiB", memkb as f64 / 1024.0),
            format!("{} MiB", vm.memory_mib),
        ));
    }
    let vcpus = saved.max_vcpus.ok_or_else(|| {
        DriverError::Restore("save file config has no vCPU count (b_info.max_vcpus)".into())
    })?;
    if vcpus != u64::from(vm.vcpus) {
        return Err(mismatch("vcpus", vcpus.to_string(), vm.vcpus.to_string()));
    }
    Ok(())
}

fn spawn_error(binary: &Path, e: std::io::Error) -> DriverError {
    if e.kind() == std::io::ErrorKind::NotFound {
        DriverError::MissingBinary {
            binary: binary.display().to_string(),
            package: PACKAGE,
        }
    } else {
        DriverError::Toolstack(format!("spawn {}: {e}", binary.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(memory_mib: u32, vcpus: u32, cmdline: &str) -> VmConfig {
        VmConfig {
            hypervisor: HypervisorKind::Xen,
            arch: "x86_64".into(),
            memory_mib,
            vcpus,
            cmdline: cmdline.into(),
        }
    }

    fn files(disks: &[&str]) -> BootFiles {
        BootFiles {
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.cpio.gz".into()),
            disks: disks.iter().map(PathBuf::from).collect(),
        }
    }

    fn bad_image(r: Result<String, DriverError>) -> String {
        match r {
            Err(DriverError::BadImage(why)) => why,
            other => panic!("expected BadImage, got {other:?}"),
        }
    }

    #[test]
    fn pv_config_has_everything_the_lot_says() {
        let cfg = domain_config(
            "vmlot-1-0-abcdef01",
            &vm(128, 2, "console=hvc0 quiet vmlot.steps=200"),
            &files(&["/work/d0.raw", "/work/with, comma=and space.raw"]),
            GuestType::Pv,
        )
        .expect("config");
        let expected = "\
# One segment of a vmlot job; written by the provider.
name = \"vmlot-1-0-abcdef01\"
type = \"pv\"
memory = 128
vcpus = 2
kernel = \"/img/vmlinuz\"
ramdisk = \"/img/initrd.cpio.gz\"
cmdline = \"console=hvc0 quiet vmlot.steps=200\"
disk = [ 'format=raw, vdev=xvda, access=rw, target=/work/d0.raw', \
'format=raw, vdev=xvdb, access=rw, target=/work/with, comma=and space.raw' ]
vif = [ ]
on_poweroff = \"preserve\"
on_reboot = \"preserve\"
on_crash = \"preserve\"
on_watchdog = \"preserve\"
";
        assert_eq!(cfg, expected);
        assert!(!cfg.contains("tsc_mode"));
    }

    #[test]
    fn pvh_config_sets_native_tsc_and_no_disks_is_an_empty_list() {
        let mut f = files(&[]);
        f.initrd = None;
        let cfg = domain_config("vmlot-x", &vm(256, 1, "console=hvc0"), &f, GuestType::Pvh).expect("config");
        assert!(cfg.contains("type = \"pvh\"\n"), "{cfg}");
        assert!(cfg.contains("tsc_mode = \"native\"\n"), "{cfg}");
        assert!(cfg.contains("disk = [ ]\n"), "{cfg}");
        assert!(!cfg.contains("ramdisk"), "{cfg}");
    }

    #[test]
    fn values_that_would_break_out_of_their_quotes_are_refused() {
        for cmdline in [
            "init=/bin/sh\" extra=\"1",
            "a'b",
            "line\nbreak",
            "cr\rhere",
            "back\\slash",
            "nul\0",
        ] {
            let why = bad_image(domain_config(
                "n",
                &vm(128, 1, cmdline),
                &files(&[]),
                GuestType::Pv,
            ));
            assert!(why.contains("kernel command line"), "{why}");
        }
        for disk in ["/w/it's.raw", "/w/a\"b.raw", "/w/new\nline.raw"] {
            let why = bad_image(domain_config(
                "n",
                &vm(128, 1, ""),
                &files(&[disk]),
                GuestType::Pv,
            ));
            assert!(why.contains("disk path"), "{why}");
        }
        let mut f = files(&[]);
        f.kernel = "relative/vmlinuz".into();
        let why = bad_image(domain_config("n", &vm(128, 1, ""), &f, GuestType::Pv));
        assert!(why.contains("not absolute"), "{why}");
        let many: Vec<String> = (0..27).map(|i| format!("/d/{i}.raw")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let why = bad_image(domain_config("n", &vm(128, 1, ""), &files(&many), GuestType::Pv));
        assert!(why.contains("at most 26"), "{why}");
    }

    #[test]
    fn orphans_are_domains_of_dead_provider_processes_only() {
        let list = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                    Domain-0                                     0  1024     2     r-----      50.1\n\
                    vmlot-100-0-0badcafe                         1   128     1     -b----       3.0\n\
                    vmlot-200-4-deadbeef                         2   128     1     -b----       3.0\n\
                    vmlot-300-1-feedf00d                         3   128     1     -b----       3.0\n\
                    vmlot-x-1-feedf00d                           4   128     1     -b----       3.0\n\
                    someone-else                                 5   128     1     -b----       3.0\n";
        // 100 is this provider, 200 another live one, 300 dead.
        let orphans = orphaned_domains(list, 100, |pid| pid == 200);
        assert_eq!(orphans, vec!["vmlot-300-1-feedf00d".to_string()]);
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

    #[test]
    fn guest_type_words() {
        assert_eq!("pv".parse::<GuestType>(), Ok(GuestType::Pv));
        assert_eq!("pvh".parse::<GuestType>(), Ok(GuestType::Pvh));
        assert!("hvm".parse::<GuestType>().is_err());
        assert_eq!(GuestType::default(), GuestType::Pv);
    }

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
        assert!(is_no_such_domain(
            "vmlot-1 is an invalid domain identifier (rc=-6)\n"
        ));
        assert!(is_no_such_domain("Error: Domain 'vmlot-1' does not exist.\n"));
        assert!(!is_no_such_domain(
            "xencall: error: Could not obtain handle on privileged command interface"
        ));
    }

    /// An xl save file prefix as xl writes it, in this host's byte order.
    fn save_file(mandatory_flags: u32, config: Option<&[u8]>) -> Vec<u8> {
        let mut optional = Vec::new();
        if let Some(config) = config {
            optional.extend_from_slice(&(config.len() as u32).to_ne_bytes());
            optional.extend_from_slice(config);
        }
        let mut file = SAVE_MAGIC.to_vec();
        for word in [SAVE_BYTEORDER, mandatory_flags, 0, optional.len() as u32] {
            file.extend_from_slice(&word.to_ne_bytes());
        }
        file.extend_from_slice(&optional);
        // The libxl migration stream v2 follows (its header: "LibxlFmt", version 2).
        file.extend_from_slice(b"LibxlFmt\0\0\0\x02\0\0\0\0");
        file
    }

    fn config_json(kind: &str, memkb: u64, vcpus: u64) -> Vec<u8> {
        let json = serde_json::json!({
            "c_info": { "type": kind, "name": "vmlot-9-0-00000000", "uuid": "0b0e6d6c-0000-4000-8000-000000000000" },
            "b_info": {
                "max_vcpus": vcpus,
                "avail_vcpus": [0],
                "max_memkb": memkb,
                "target_memkb": memkb,
                format!("type.{kind}"): { "slack_memkb": 0 },
            },
            "disks": [],
            "on_poweroff": "preserve",
        });
        let mut text = serde_json::to_vec_pretty(&json).expect("json");
        text.push(0);
        text
    }

    fn parse(bytes: &[u8]) -> Result<SavedConfig, String> {
        let header = SaveHeader::parse(&bytes[..bytes.len().min(SAVE_HEADER_LEN)])?;
        let start = SAVE_HEADER_LEN;
        let end = start + header.optional_data_len as usize;
        let optional = bytes.get(start..end).ok_or("truncated optional data")?;
        header.config(optional)
    }

    #[tokio::test]
    async fn save_header_is_read_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("machine-state");
        std::fs::write(
            &path,
            save_file(
                SAVE_FLAG_JSON | SAVE_FLAG_STREAM_V2,
                Some(&config_json("pv", 131072, 2)),
            ),
        )
        .expect("write");
        let saved = read_saved_config(&path).await.expect("parse");
        assert_eq!(
            saved,
            SavedConfig {
                mandatory_flags: 3,
                guest_type: Some("pv".into()),
                max_memkb: Some(131072),
                target_memkb: Some(131072),
                max_vcpus: Some(2),
                name: Some("vmlot-9-0-00000000".into()),
            }
        );
        check_saved_config(&saved, &vm(128, 2, ""), GuestType::Pv).expect("matches the lot");

        // Truncated inside the optional data.
        let whole = std::fs::read(&path).expect("read");
        std::fs::write(&path, &whole[..SAVE_HEADER_LEN + 10]).expect("write");
        let err = read_saved_config(&path).await.expect_err("truncated");
        assert!(
            matches!(&err, DriverError::Restore(why) if why.contains("truncated")),
            "{err}"
        );
        // Truncated inside the fixed header.
        std::fs::write(&path, &whole[..40]).expect("write");
        let err = read_saved_config(&path).await.expect_err("truncated");
        assert!(
            matches!(&err, DriverError::Restore(why) if why.contains("truncated")),
            "{err}"
        );
        // Empty, and a QEMU checkpoint.
        std::fs::write(&path, b"").expect("write");
        let err = read_saved_config(&path).await.expect_err("empty");
        assert!(
            matches!(&err, DriverError::Restore(why) if why.contains("not an xl save file")),
            "{err}"
        );
        std::fs::write(
            &path,
            b"QEVM\0\0\0\x03 and more bytes than a header holds, surely",
        )
        .expect("write");
        let err = read_saved_config(&path).await.expect_err("qemu");
        assert!(
            matches!(&err, DriverError::Restore(why) if why.contains("not an xl save file")),
            "{err}"
        );
        let err = read_saved_config(&dir.path().join("absent"))
            .await
            .expect_err("absent");
        assert!(matches!(err, DriverError::Restore(_)), "{err}");
    }

    #[test]
    fn save_header_refusals() {
        let good = config_json("pv", 131072, 1);
        let err = |bytes: Vec<u8>| parse(&bytes).expect_err("refused");

        let mut swapped = save_file(SAVE_FLAG_JSON, Some(&good));
        swapped[32..36].reverse();
        assert!(err(swapped).contains("other byte order"));
        let mut garbled = save_file(SAVE_FLAG_JSON, Some(&good));
        garbled[32..36].copy_from_slice(b"\x01\x01\x01\x01");
        assert!(err(garbled).contains("byte-order"));
        assert!(err(save_file(SAVE_FLAG_JSON | 1 << 7, Some(&good))).contains("unknown"));
        assert!(err(save_file(SAVE_FLAG_STREAM_V2, Some(b"memory = 128\n"))).contains("text form"));
        assert!(err(save_file(SAVE_FLAG_JSON, None)).contains("no domain config"));
        assert!(err(save_file(SAVE_FLAG_JSON, Some(b"{not json\0"))).contains("not JSON"));

        let mut huge = save_file(SAVE_FLAG_JSON, Some(&good));
        huge[44..48].copy_from_slice(&(MAX_OPTIONAL_DATA + 1).to_ne_bytes());
        assert!(err(huge).contains("optional data"));
        // A config length that runs past the optional data.
        let mut overrun = save_file(SAVE_FLAG_JSON, Some(&good));
        overrun[48..52].copy_from_slice(&(good.len() as u32 + 1).to_ne_bytes());
        assert!(err(overrun).contains("overruns"));
    }

    #[test]
    fn saved_config_must_match_the_lot() {
        let saved =
            |kind, memkb, vcpus| parse(&save_file(3, Some(&config_json(kind, memkb, vcpus)))).unwrap();
        let refused = |saved: SavedConfig, vm: VmConfig, guest| match check_saved_config(&saved, &vm, guest) {
            Err(DriverError::Restore(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        check_saved_config(&saved("pvh", 262144, 4), &vm(256, 4, ""), GuestType::Pvh).expect("match");

        let why = refused(saved("pv", 262144, 1), vm(128, 1, ""), GuestType::Pv);
        assert!(
            why.contains("memory is 256 MiB in the save file, 128 MiB in the lot"),
            "{why}"
        );
        let why = refused(saved("pv", 131072, 2), vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("vcpus is 2 in the save file, 1 in the lot"), "{why}");
        let why = refused(saved("pvh", 131072, 1), vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("type is pvh in the save file"), "{why}");
        let why = refused(saved("hvm", 131072, 1), vm(128, 1, ""), GuestType::Pvh);
        assert!(why.contains("type is hvm"), "{why}");

        // The keyed union stands in for a missing c_info.type.
        let mut json: Value =
            serde_json::from_slice(config_json("pvh", 131072, 1).strip_suffix(&[0]).unwrap()).unwrap();
        json["c_info"].as_object_mut().unwrap().remove("type");
        let text = serde_json::to_vec(&json).unwrap();
        let s = parse(&save_file(1, Some(&text))).unwrap();
        assert_eq!(s.guest_type.as_deref(), Some("pvh"));
        // No type at all is refused, not guessed.
        json["b_info"].as_object_mut().unwrap().remove("type.pvh");
        let s = parse(&save_file(1, Some(&serde_json::to_vec(&json).unwrap()))).unwrap();
        let why = refused(s, vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("no domain type"), "{why}");
    }
}
