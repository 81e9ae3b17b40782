//! `vmlot-provider doctor`: whether this host can serve as a provider,
//! said in words, one line per check, before a service manager starts the
//! daemon (the systemd unit runs it as `ExecStartPre`, so a broken host
//! fails loudly at start instead of bidding and then failing every award).
//!
//! Each check is a small function returning a [`Check`]: `ok`, `warning`
//! (the provider runs, worse: QEMU under TCG, no deterministic segments,
//! little disk, a scavenger's guests without a memory ceiling) or
//! `missing` (it cannot serve: no QEMU 10, a NATS server it cannot reach,
//! credentials that are not a provider's). The decisions
//! (version, thresholds, how a connection failed) are pure functions,
//! unit-tested beside them; the probes around them only gather facts.
//! Nothing is written: directories that do not exist yet are judged by the
//! nearest one that does, where the daemon would create them.
//!
//! - [`market`]: the settings, the credentials, the NATS server.
//! - [`host`]: QEMU (version, mapped-ram), KVM, the icount-stop plugin, a
//!   scavenger's guest cgroups, Xen's `xl`.
//! - [`disk`]: free space and write access in the work and cache dirs.

use serde::Serialize;
use vmlot_identity::Access;
use vmlot_schemas::HypervisorKind;

use crate::config::Settings;

pub mod disk;
pub mod host;
pub mod market;

pub use disk::MIN_FREE;
pub use host::MIN_QEMU;
pub use market::NATS_TIMEOUT;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// The provider runs, but worse than it could.
    Warning,
    /// The provider cannot serve until this is fixed.
    Missing,
}

impl Status {
    /// The word the report uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Missing => "missing",
        }
    }
}

/// One line of the report: what was checked, how it came out, and in
/// words what was seen and, unless `ok`, what to do.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Self {
        Check {
            name,
            status,
            detail: detail.into(),
        }
    }
}

/// Every check, in the order they ran.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// True when nothing is missing (warnings allowed).
    pub fn ready(&self) -> bool {
        self.count(Status::Missing) == 0
    }

    /// 0 when nothing is missing, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.ready() { 0 } else { 1 }
    }

    /// One line per check (`status name detail`), then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!("{:<8} {:<12} {}\n", c.status.as_str(), c.name, c.detail));
        }
        let (missing, warnings) = (self.count(Status::Missing), self.count(Status::Warning));
        out.push_str(&if missing == 0 {
            format!("ready to serve ({warnings} warning(s))\n")
        } else {
            format!("not ready: {missing} missing, {warnings} warning(s)\n")
        });
        out
    }

    /// `{"ready": bool, "checks": [{"name", "status", "detail"}, …]}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "ready": self.ready(), "checks": self.checks })
    }
}

/// Runs every check for the provider that `settings`, `access` and `nats`
/// (what the daemon would be started with) describe.
pub async fn examine(nats_urls: &str, access: &Access, settings: &Settings) -> Report {
    let (settings_check, config) = market::settings_check(settings);
    let mut checks = vec![settings_check, market::credentials(access, settings.id)];
    checks.push(market::nats(nats_urls, access).await);
    if config.hypervisors.contains(&HypervisorKind::Qemu) {
        let (found, binary) = host::qemu_binary().await;
        checks.push(found);
        if let Some(binary) = binary {
            checks.push(host::mapped_ram(&binary).await);
        }
        checks.push(host::kvm_check(&config.qemu_accel, host::open_kvm()));
        checks.push(host::icount_plugin(config.qemu_icount_stop_plugin.as_deref()));
        let probed = config.idle_load.map(|_| crate::cgroup::probe());
        checks.push(host::guest_cgroup(config.guest_memory_headroom_mib, probed));
    }
    if config.hypervisors.contains(&HypervisorKind::Xen) {
        checks.push(host::xen_toolstack(config.xl_binary.as_deref()).await);
    }
    checks.extend(disk::disks(&config));
    Report { checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_fails_only_on_missing() {
        let mut report = Report {
            checks: vec![
                Check::new("qemu", Status::Ok, "fine"),
                Check::new("kvm", Status::Warning, "TCG"),
            ],
        };
        assert_eq!(report.exit_code(), 0);
        assert!(
            report.text().starts_with("ok       qemu         fine\n"),
            "{}",
            report.text()
        );
        report
            .checks
            .push(Check::new("nats", Status::Missing, "could not reach"));
        assert_eq!(report.exit_code(), 1);
        assert!(report.text().ends_with("not ready: 1 missing, 1 warning(s)\n"));
        assert_eq!(report.json()["checks"][2]["status"], "missing");
    }
}
