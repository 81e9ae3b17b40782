//! Provider settings, from a TOML file with flags on top.
//!
//! The TOML keys are the field names of [`ProviderConfig`] (`id`, `name`,
//! `hypervisors`, `slots`, `price_per_second`, `min_price`, `hot_discount`,
//! `cache_dir`, `cache_bytes`, `work_dir`, `idle_load`, `heartbeat` in ms,
//! `qemu_accel`, `xen_guest_type`, `xl_binary`, `xen_console_dir`,
//! `synthetic_changed_fraction`, …); a missing key keeps its default.

use std::path::PathBuf;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;
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
    /// Cycle scavenging: bid only while the 1-minute load per core is below
    /// this (none: always bid).
    pub idle_load: Option<f64>,
    #[serde(with = "millis")]
    pub heartbeat: Duration,
    /// QEMU accelerator: auto (KVM only if it really runs guests), kvm or tcg.
    pub qemu_accel: String,
    /// Xen guest type: `pv` (works with Xen nested under TCG) or `pvh`
    /// (needs hardware virtualization). Checkpoints restore only into the
    /// same type, so a market's Xen providers should agree on it.
    pub xen_guest_type: String,
    /// The `xl` binary (default: `xl` on `PATH`).
    pub xl_binary: Option<PathBuf>,
    /// xenconsoled's `--log-dir`, where it writes `guest-<domain>.log`
    /// (it must run with `--log=guest`).
    pub xen_console_dir: PathBuf,
    /// Changed share of blocks per segment for the synthetic driver.
    pub synthetic_changed_fraction: f64,
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
            heartbeat: Duration::from_secs(1),
            qemu_accel: "auto".into(),
            xen_guest_type: "pv".into(),
            xl_binary: None,
            xen_console_dir: crate::driver::xen::DEFAULT_CONSOLE_DIR.into(),
            synthetic_changed_fraction: 0.05,
        }
    }
}

impl ProviderConfig {
    /// Reads a TOML file; missing keys keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

mod millis {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
