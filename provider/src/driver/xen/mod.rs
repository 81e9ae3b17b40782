//! The Xen driver: one domain per segment, driven through the `xl`
//! toolstack (Xen 4.17, Debian's `xen-utils-4.17`) from dom0.
//!
//! Every segment writes its own `xl` domain config into its workdir, built
//! from the lot's [`VmConfig`](vmlot_schemas::VmConfig) and the boot
//! files, under a domain name used by no other segment. Segment 0 is
//! `xl create -e <cfg>`; a later segment is `xl restore -e <cfg>
//! <machine-state>` with that fresh config, because the config inside a
//! save file names the disk paths of the host that saved it. Before
//! restoring, the config embedded in the save file is read and compared
//! with the lot (type, memory, vCPUs); a mismatch is refused. `-e` makes
//! `xl` return once the domain runs instead of leaving a monitor process
//! behind; with every `on_*` action `preserve`, a guest that powers off,
//! reboots or crashes stays in its shut-down state, so the driver can read
//! how it ended before it destroys the domain.
//!
//! At the planned time the domain is saved into
//! `<workdir>/machine-state.partial`, renamed to `machine-state` once whole
//! (the segment template). The disks are written in place by the guest and
//! reported back as they stand. Every way out of a segment destroys its
//! domain.
//!
//! - [`xl`]: running `xl` (timeouts, retries, the command log).
//! - [`domain`]: the live domain and the template's steps on it.
//! - [`config`]: the domain config, and the checkpoint's checked against the lot.
//! - [`console`]: the segment's console from xenconsoled's log.
//! - [`reap`]: domains left by providers that died.

use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vmlot_schemas::HypervisorKind;

use crate::driver::api::{Driver, DriverError, SegmentPlan, SegmentReport, SegmentStart};
use crate::driver::host::{expect_kind, find_binary, io_err, remove_if_exists, validate};
use crate::driver::template;

pub(crate) mod config;
pub(crate) mod console;
pub(crate) mod domain;
pub(crate) mod reap;
pub(crate) mod xl;

pub use config::{CONFIG_FILE, GuestType};
pub use console::DEFAULT_CONSOLE_DIR;
pub use domain::{DOMAIN_PREFIX, POLL_INTERVAL};
pub use xl::{DEFAULT_BINARY, PACKAGE, XL_LOG_FILE};

use config::{absolute_files, check_saved_config, domain_config, read_saved_config};
use domain::{Domain, XenMachine, domain_name};
use xl::{QUERY_TIMEOUT, Xl};

/// Says `control_d` in dom0 (xenfs).
const CAPABILITIES: &str = "/proc/xen/capabilities";

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
                    reap::reap_orphans(&xl, cancel).await;
                    Ok(())
                } else {
                    Err(DriverError::Toolstack(problems.join("; ")))
                }
            })
            .await
            .map(|_| ())
    }

    async fn run(&self, plan: &SegmentPlan, cancel: CancellationToken) -> Result<SegmentReport, DriverError> {
        expect_kind(plan, HypervisorKind::Xen)?;
        validate(plan)?;
        let files = absolute_files(&plan.files)?;
        let name = domain_name();
        // Built before anything runs: a value that cannot be written into
        // an xl config is a bad image, whatever the host.
        let config = domain_config(&name, &plan.vm, &files, self.guest_type)?;
        // Likewise a checkpoint of another machine than the lot's.
        if let SegmentStart::Restore { machine_state } = &plan.start {
            let saved = read_saved_config(machine_state)
                .await
                .map_err(DriverError::Restore)?;
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
        let console = console::log_path(&self.console_dir, &name);
        // Only a stale file of a dead provider could be there; its bytes are
        // not this segment's.
        remove_if_exists(&console)?;

        let span = tracing::info_span!("xen_segment", domain = %name);
        let xl = Xl {
            binary,
            log: Some(workdir.join(XL_LOG_FILE)),
        };
        let machine = XenMachine::new(Domain::new(xl, name), config_path, console);
        template::run_segment(machine, plan, &workdir, &cancel)
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
