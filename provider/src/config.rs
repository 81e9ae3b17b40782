//! Provider settings, layered in one place: the defaults, then a TOML file,
//! then the environment, then flags (the later wins, key by key).
//!
//! The TOML keys are the field names of [`ProviderConfig`] (`id`, `name`,
//! `hypervisors`, `arch`, `memory_mib`, `slots`, `price_per_second`,
//! `min_price`, `unit`, `hot_discount`, `cache_dir`, `cache_bytes`,
//! `work_dir`, `idle_load`, `owner_suspend_seconds`,
//! `preempt_notice_seconds`, `guest_memory_headroom_mib`, `metrics_listen`, `heartbeat` in
//! ms, `qemu_accel`,
//! `qemu_icount_stop_plugin`,
//! `xen_guest_type`, `xl_binary`, `xen_console_dir`,
//! `synthetic_changed_fraction`); a missing key keeps its default, an
//! unknown one is refused. Every key is also a flag (`--memory-mib`) and an
//! environment variable (`VMLOT_PROVIDER_MEMORY_MIB`), both listed by
//! `vmlot-provider --help`.
//!
//! The layering is [`figment`]'s: the file is its TOML provider and
//! [`Settings`] (what clap read from the flags, or from the environment
//! where a flag is absent) is serialized on top of it, so a value given
//! neither way leaves the file's. clap reads the environment because it
//! parses a variable exactly as the flag (a decimal price stays a decimal,
//! `qemu,xen` is a list), which a generic environment provider cannot.

use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use vmlot_schemas::{HypervisorKind, ProviderId};

/// Everything a provider daemon needs to know about itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// Stable identity (a UUID); keep it across restarts so awards still reach you.
    pub id: ProviderId,
    pub name: String,
    pub hypervisors: Vec<HypervisorKind>,
    pub arch: String,
    /// Largest guest memory this machine will run.
    pub memory_mib: u32,
    /// Segments run at once.
    pub slots: u32,
    /// Asking price per second of segment, in `unit`.
    pub price_per_second: Decimal,
    /// Lowest price asked for any segment (covers transfer for short ones).
    pub min_price: Decimal,
    pub unit: String,
    /// Discount for a checkpoint already held: price × (1 − discount × hot share).
    pub hot_discount: Decimal,
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    pub work_dir: PathBuf,
    /// Cycle scavenging: bid only while the machine owner's share of the
    /// CPU (0 to 1, everything but this provider and its guests, over the
    /// last second or more) is below this (none: always bid).
    pub idle_load: Option<f64>,
    /// With `idle_load` set, a running guest is paused while the owner is
    /// busy; this long at most, then it is saved early (the segment is
    /// preempted). Zero: saved early at once, never paused.
    pub owner_suspend_seconds: u64,
    /// The warning a preempted guest gets before it is saved (QEMU guests
    /// read it on their second serial port), never more than what is left
    /// of the segment.
    pub preempt_notice_seconds: u64,
    /// With `idle_load` set, each QEMU guest runs in a cgroup of its own
    /// whose memory ceiling is the guest's memory plus this, in MiB (QEMU's
    /// own memory: the TCG translation cache, devices).
    pub guest_memory_headroom_mib: u64,
    #[serde(deserialize_with = "millis")]
    pub heartbeat: Duration,
    /// QEMU accelerator: auto (KVM only if it really runs guests), kvm or tcg.
    pub qemu_accel: String,
    /// The `vmlot-icount-stop` QEMU plugin for deterministic segments
    /// (default: `libvmlot_icount_stop.so` beside the provider binary).
    pub qemu_icount_stop_plugin: Option<PathBuf>,
    /// Xen guest type: `pv` (works with Xen nested under TCG) or `pvh`
    /// (needs hardware virtualization). Checkpoints restore only into the
    /// same type, so a market's Xen providers should agree on it.
    pub xen_guest_type: String,
    /// The `xl` binary (default: `xl` on `PATH`).
    pub xl_binary: Option<PathBuf>,
    /// xenconsoled's `--log-dir`, where it writes `guest-<domain>.log`
    /// (it must run with `--log=guest`).
    pub xen_console_dir: PathBuf,
    /// Changed share of blocks per segment for the synthetic driver (read
    /// only by a provider built with the `synthetic` feature).
    pub synthetic_changed_fraction: f64,
    /// Where the Prometheus endpoint listens (see [`crate::metrics`]);
    /// none when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        let base = std::env::temp_dir().join("vmlot-provider");
        Self {
            id: ProviderId::new(),
            name: "provider".into(),
            hypervisors: vec![HypervisorKind::Qemu],
            arch: "x86_64".into(),
            memory_mib: 4096,
            slots: 1,
            price_per_second: Decimal::new(1, 3),
            min_price: Decimal::new(1, 2),
            unit: "CRD".into(),
            hot_discount: Decimal::new(2, 1),
            cache_dir: base.join("cache"),
            cache_bytes: 8 << 30,
            work_dir: base.join("work"),
            idle_load: None,
            owner_suspend_seconds: 60,
            preempt_notice_seconds: 10,
            guest_memory_headroom_mib: 512,
            heartbeat: Duration::from_secs(1),
            qemu_accel: "auto".into(),
            qemu_icount_stop_plugin: None,
            xen_guest_type: "pv".into(),
            xl_binary: None,
            xen_console_dir: crate::driver::xen::DEFAULT_CONSOLE_DIR.into(),
            synthetic_changed_fraction: 0.05,
            metrics_listen: None,
        }
    }
}

impl ProviderConfig {
    /// The defaults, then the file `settings.config` names, then what
    /// `settings` carries (from the environment or flags).
    pub fn load(settings: &Settings) -> Result<ProviderConfig, Box<figment::Error>> {
        let mut figment = Figment::new();
        if let Some(path) = &settings.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        Ok(figment.merge(Serialized::defaults(settings)).extract()?)
    }
}

/// The settings as flags, each also read from its `VMLOT_PROVIDER_…`
/// environment variable when the flag is absent; unset ones leave the
/// file's value (or the default) alone.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct Settings {
    /// TOML settings file (keys as in the README); the environment and
    /// flags override it.
    #[arg(long, env = "VMLOT_PROVIDER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Stable identity (a UUID); keep it across restarts.
    #[arg(long, env = "VMLOT_PROVIDER_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<ProviderId>,
    #[arg(long, env = "VMLOT_PROVIDER_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hypervisors to offer, comma-separated: qemu, xen (and synthetic in
    /// a build with the `synthetic` feature).
    #[arg(long, env = "VMLOT_PROVIDER_HYPERVISORS", value_delimiter = ',', value_parser = hypervisor)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hypervisors: Option<Vec<HypervisorKind>>,
    /// Guest architecture offered.
    #[arg(long, env = "VMLOT_PROVIDER_ARCH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Largest guest memory this machine will run, in MiB.
    #[arg(long, env = "VMLOT_PROVIDER_MEMORY_MIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Segments run at once.
    #[arg(long, env = "VMLOT_PROVIDER_SLOTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Asking price per second of segment.
    #[arg(long, env = "VMLOT_PROVIDER_PRICE_PER_SECOND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_per_second: Option<Decimal>,
    /// Lowest price asked for any segment.
    #[arg(long, env = "VMLOT_PROVIDER_MIN_PRICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_price: Option<Decimal>,
    /// The money unit prices are in.
    #[arg(long, env = "VMLOT_PROVIDER_UNIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Discount for checkpoints already held: price × (1 − discount × hot share).
    #[arg(long, env = "VMLOT_PROVIDER_HOT_DISCOUNT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_discount: Option<Decimal>,
    #[arg(long, env = "VMLOT_PROVIDER_CACHE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Size cap of the block cache, in bytes.
    #[arg(long, env = "VMLOT_PROVIDER_CACHE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_bytes: Option<u64>,
    #[arg(long, env = "VMLOT_PROVIDER_WORK_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// Bid only while the owner's CPU share (0 to 1; this provider's
    /// guests not counted) is below this.
    #[arg(long, env = "VMLOT_PROVIDER_IDLE_LOAD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_load: Option<f64>,
    /// With --idle-load: how long a guest stays paused for a busy owner
    /// before it is saved early (0: at once).
    #[arg(long, env = "VMLOT_PROVIDER_OWNER_SUSPEND_SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_suspend_seconds: Option<u64>,
    /// Warning a guest gets before such an early save, in seconds.
    #[arg(long, env = "VMLOT_PROVIDER_PREEMPT_NOTICE_SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preempt_notice_seconds: Option<u64>,
    /// With --idle-load: a guest's memory ceiling beyond its own memory, in MiB.
    #[arg(long, env = "VMLOT_PROVIDER_GUEST_MEMORY_HEADROOM_MIB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_memory_headroom_mib: Option<u64>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long, env = "VMLOT_PROVIDER_METRICS_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Heartbeat interval, in milliseconds.
    #[arg(long, env = "VMLOT_PROVIDER_HEARTBEAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<u64>,
    /// QEMU accelerator: auto, kvm or tcg.
    #[arg(long, env = "VMLOT_PROVIDER_QEMU_ACCEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_accel: Option<String>,
    /// The icount-stop QEMU plugin for deterministic segments.
    #[arg(long, env = "VMLOT_PROVIDER_QEMU_ICOUNT_STOP_PLUGIN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_icount_stop_plugin: Option<PathBuf>,
    /// Xen guest type: pv or pvh.
    #[arg(long, env = "VMLOT_PROVIDER_XEN_GUEST_TYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xen_guest_type: Option<String>,
    /// The `xl` binary (default: `xl` on PATH).
    #[arg(long, env = "VMLOT_PROVIDER_XL_BINARY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xl_binary: Option<PathBuf>,
    /// xenconsoled's --log-dir.
    #[arg(long, env = "VMLOT_PROVIDER_XEN_CONSOLE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xen_console_dir: Option<PathBuf>,
    /// Changed share of blocks per segment (synthetic driver).
    #[arg(long, env = "VMLOT_PROVIDER_SYNTHETIC_CHANGED_FRACTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic_changed_fraction: Option<f64>,
}

/// A hypervisor by its name on the command line.
fn hypervisor(name: &str) -> Result<HypervisorKind, String> {
    match name {
        "qemu" => Ok(HypervisorKind::Qemu),
        "xen" => Ok(HypervisorKind::Xen),
        "synthetic" => Ok(HypervisorKind::Synthetic),
        other => Err(format!("unknown hypervisor {other:?} (qemu, xen, synthetic)")),
    }
}

fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(d)?))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn load(args: &[&str]) -> Result<ProviderConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("vmlot-provider").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        ProviderConfig::load(&cli.settings).map_err(|e| e.to_string())
    }

    /// The only test that sets `VMLOT_PROVIDER_*` variables (no other
    /// reads them), so the layers can be seen one above the other.
    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("provider.toml");
        std::fs::write(
            &file,
            r#"
name = "from-file"
hypervisors = ["xen"]
slots = 2
min_price = "0.5"
memory_mib = 1024
heartbeat = 250
owner_suspend_seconds = 20
guest_memory_headroom_mib = 256
"#,
        )
        .unwrap();
        let file = file.to_str().unwrap();

        // Defaults alone.
        let c = load(&[]).unwrap();
        assert_eq!((c.name.as_str(), c.slots, c.memory_mib), ("provider", 1, 4096));
        assert_eq!(c.hypervisors, [HypervisorKind::Qemu]);
        assert_eq!((c.owner_suspend_seconds, c.preempt_notice_seconds), (60, 10));
        assert_eq!(c.guest_memory_headroom_mib, 512);

        // The file over the defaults; what it leaves out keeps its default.
        let c = load(&["--config", file]).unwrap();
        assert_eq!((c.name.as_str(), c.slots, c.memory_mib), ("from-file", 2, 1024));
        assert_eq!(c.hypervisors, [HypervisorKind::Xen]);
        assert_eq!(c.min_price, Decimal::new(5, 1));
        assert_eq!(c.heartbeat, Duration::from_millis(250));
        assert_eq!(c.price_per_second, Decimal::new(1, 3));
        assert_eq!((c.owner_suspend_seconds, c.preempt_notice_seconds), (20, 10));
        assert_eq!(c.guest_memory_headroom_mib, 256);

        // The environment over the file.
        // SAFETY: no other test reads or writes these variables, and the
        // standard library serializes its own environment accesses.
        unsafe {
            std::env::set_var("VMLOT_PROVIDER_SLOTS", "3");
            std::env::set_var("VMLOT_PROVIDER_HYPERVISORS", "qemu,xen");
            std::env::set_var("VMLOT_PROVIDER_PRICE_PER_SECOND", "0.00012345");
            std::env::set_var("VMLOT_PROVIDER_PREEMPT_NOTICE_SECONDS", "5");
            std::env::set_var("VMLOT_PROVIDER_GUEST_MEMORY_HEADROOM_MIB", "768");
        }
        let from_env = load(&["--config", file]);
        // Flags over the environment.
        let from_flags = load(&[
            "--config",
            file,
            "--slots",
            "4",
            "--name",
            "flag",
            "--hypervisors",
            "qemu",
            "--guest-memory-headroom-mib",
            "1024",
        ]);
        // SAFETY: as above.
        unsafe {
            std::env::remove_var("VMLOT_PROVIDER_SLOTS");
            std::env::remove_var("VMLOT_PROVIDER_HYPERVISORS");
            std::env::remove_var("VMLOT_PROVIDER_PRICE_PER_SECOND");
            std::env::remove_var("VMLOT_PROVIDER_PREEMPT_NOTICE_SECONDS");
            std::env::remove_var("VMLOT_PROVIDER_GUEST_MEMORY_HEADROOM_MIB");
        }
        let c = from_env.unwrap();
        assert_eq!((c.name.as_str(), c.slots, c.memory_mib), ("from-file", 3, 1024));
        assert_eq!(c.hypervisors, [HypervisorKind::Qemu, HypervisorKind::Xen]);
        assert_eq!(c.price_per_second, Decimal::new(12345, 8));
        assert_eq!((c.owner_suspend_seconds, c.preempt_notice_seconds), (20, 5));
        assert_eq!(c.guest_memory_headroom_mib, 768);
        let c = from_flags.unwrap();
        assert_eq!((c.name.as_str(), c.slots, c.memory_mib), ("flag", 4, 1024));
        assert_eq!(c.hypervisors, [HypervisorKind::Qemu]);
        assert_eq!(c.price_per_second, Decimal::new(12345, 8));
        assert_eq!(c.min_price, Decimal::new(5, 1));
        assert_eq!(c.guest_memory_headroom_mib, 1024);
    }

    #[test]
    fn every_key_has_a_flag() {
        let id = ProviderId::new().to_string();
        let c = load(&[
            "--id",
            &id,
            "--arch",
            "x86_64",
            "--unit",
            "XYZ",
            "--hot-discount",
            "0",
            "--cache-dir",
            "/c",
            "--cache-bytes",
            "1024",
            "--work-dir",
            "/w",
            "--idle-load",
            "0.5",
            "--owner-suspend-seconds",
            "0",
            "--preempt-notice-seconds",
            "30",
            "--guest-memory-headroom-mib",
            "64",
            "--qemu-accel",
            "tcg",
            "--xen-guest-type",
            "pvh",
            "--xl-binary",
            "/usr/sbin/xl",
            "--xen-console-dir",
            "/var/log/c",
            "--synthetic-changed-fraction",
            "0.25",
        ])
        .unwrap();
        assert_eq!(c.id.to_string(), id);
        assert_eq!(c.unit, "XYZ");
        assert_eq!(c.hot_discount, Decimal::ZERO);
        assert_eq!((c.cache_dir, c.cache_bytes), (PathBuf::from("/c"), 1024));
        assert_eq!(c.work_dir, PathBuf::from("/w"));
        assert_eq!(c.idle_load, Some(0.5));
        assert_eq!((c.owner_suspend_seconds, c.preempt_notice_seconds), (0, 30));
        assert_eq!(c.guest_memory_headroom_mib, 64);
        assert_eq!((c.qemu_accel.as_str(), c.xen_guest_type.as_str()), ("tcg", "pvh"));
        assert_eq!(c.xl_binary, Some(PathBuf::from("/usr/sbin/xl")));
        assert_eq!(c.xen_console_dir, PathBuf::from("/var/log/c"));
        assert_eq!(c.synthetic_changed_fraction, 0.25);
    }

    #[test]
    fn bad_settings_are_refused_with_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("provider.toml");
        std::fs::write(&file, "slots = 1\nslotz = 2\n").unwrap();
        let why = load(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(why.contains("slotz"), "{why}");
        assert!(why.contains("provider.toml"), "{why}");

        let absent = dir.path().join("absent.toml");
        let why = load(&["--config", absent.to_str().unwrap()]).unwrap_err();
        assert!(why.contains("absent.toml"), "{why}");

        let why = load(&["--hypervisors", "qemu,vmware"]).unwrap_err();
        assert!(why.contains("unknown hypervisor \"vmware\""), "{why}");
        let why = load(&["--slots", "many"]).unwrap_err();
        assert!(why.contains("--slots"), "{why}");
    }
}
