//! From settings to drivers: one driver for each hypervisor the provider
//! offers, built from its settings. The one place that knows which
//! hypervisors this build has: the synthetic one exists only with the
//! cargo feature `synthetic`, and asking a build without it is refused
//! here, by name.

use std::sync::Arc;

use vmlot_schemas::HypervisorKind;

use crate::cgroup::Confinement;
use crate::config::ProviderConfig;
use crate::driver::Driver;
use crate::driver::qemu::{Accel, QemuConfig, QemuDriver};
use crate::driver::xen::{GuestType, XenConfig, XenDriver};

/// Why the drivers the settings ask for cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "hypervisor `synthetic` is test machinery: this vmlot-provider was built without the \
         cargo feature `synthetic` (cargo build -p vmlot-provider --features synthetic)"
    )]
    SyntheticNotBuilt,
    #[error("xen_guest_type: {0}")]
    XenGuestType(String),
    #[error("the credentials are a {0}'s, not a provider's")]
    NotAProvider(vmlot_schemas::caller::Role),
    #[error("the credentials name provider {0:?}, which is not a provider id (a UUID)")]
    BadProviderName(String),
    #[error(
        "the credentials name provider {creds}, the settings say id {settings}: a provider's id is its credentials' (drop the id setting)"
    )]
    IdMismatch {
        creds: String,
        settings: vmlot_schemas::ProviderId,
    },
}

/// The provider's id from its credentials' name; a different `id` in the
/// settings is refused rather than one of the two silently winning.
pub fn identity(
    caller: &vmlot_schemas::caller::Caller,
    settings_id: Option<vmlot_schemas::ProviderId>,
) -> Result<vmlot_schemas::ProviderId, SetupError> {
    use vmlot_schemas::caller::Role;
    if caller.role != Role::Provider {
        return Err(SetupError::NotAProvider(caller.role));
    }
    let id: vmlot_schemas::ProviderId = caller
        .name
        .parse()
        .map_err(|_| SetupError::BadProviderName(caller.name.clone()))?;
    match settings_id {
        Some(other) if other != id => Err(SetupError::IdMismatch {
            creds: caller.name.clone(),
            settings: other,
        }),
        _ => Ok(id),
    }
}

/// The drivers for `config.hypervisors`.
pub fn drivers(config: &ProviderConfig) -> Result<Vec<Arc<dyn Driver>>, SetupError> {
    config
        .hypervisors
        .iter()
        .map(|kind| driver(config, *kind))
        .collect()
}

fn driver(config: &ProviderConfig, kind: HypervisorKind) -> Result<Arc<dyn Driver>, SetupError> {
    Ok(match kind {
        HypervisorKind::Qemu => {
            let accel = match config.qemu_accel.as_str() {
                "kvm" => Accel::Kvm,
                "tcg" => Accel::Tcg,
                _ => Accel::Auto,
            };
            Arc::new(QemuDriver::new(QemuConfig {
                binary: None,
                accel,
                icount_stop_plugin: config.qemu_icount_stop_plugin.clone(),
                // A provider scavenging cycles (bidding only while the
                // owner is idle) also runs its guests behind the owner's work.
                idle_priority: config.idle_load.is_some(),
                // And in a cgroup of their own, with a memory ceiling.
                confine: config.idle_load.map(|_| Confinement {
                    headroom_mib: config.guest_memory_headroom_mib,
                }),
            }))
        }
        HypervisorKind::Xen => {
            let guest_type: GuestType = config.xen_guest_type.parse().map_err(SetupError::XenGuestType)?;
            Arc::new(XenDriver::new(XenConfig {
                binary: config.xl_binary.clone(),
                guest_type,
                console_dir: config.xen_console_dir.clone(),
            }))
        }
        HypervisorKind::Synthetic => synthetic(config)?,
    })
}

#[cfg(feature = "synthetic")]
fn synthetic(config: &ProviderConfig) -> Result<Arc<dyn Driver>, SetupError> {
    use crate::driver::synthetic::{SyntheticConfig, SyntheticDriver};
    Ok(Arc::new(SyntheticDriver::new(SyntheticConfig {
        changed_fraction: config.synthetic_changed_fraction,
    })))
}

#[cfg(not(feature = "synthetic"))]
fn synthetic(_: &ProviderConfig) -> Result<Arc<dyn Driver>, SetupError> {
    Err(SetupError::SyntheticNotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hypervisors: &[HypervisorKind]) -> ProviderConfig {
        ProviderConfig {
            hypervisors: hypervisors.to_vec(),
            ..ProviderConfig::default()
        }
    }

    #[test]
    fn one_driver_per_hypervisor() {
        let built = drivers(&config(&[HypervisorKind::Qemu, HypervisorKind::Xen])).unwrap();
        let kinds: Vec<_> = built.iter().map(|d| d.kind()).collect();
        assert_eq!(kinds, [HypervisorKind::Qemu, HypervisorKind::Xen]);
        let bad = ProviderConfig {
            xen_guest_type: "hvm".into(),
            ..config(&[HypervisorKind::Xen])
        };
        assert!(matches!(drivers(&bad), Err(SetupError::XenGuestType(_))));
    }

    #[cfg(not(feature = "synthetic"))]
    #[test]
    fn synthetic_is_refused_naming_the_feature() {
        let err = drivers(&config(&[HypervisorKind::Synthetic])).err().unwrap();
        assert!(matches!(err, SetupError::SyntheticNotBuilt));
        assert!(err.to_string().contains("cargo feature `synthetic`"), "{err}");
    }

    #[cfg(feature = "synthetic")]
    #[test]
    fn synthetic_is_built_with_the_feature() {
        let built = drivers(&config(&[HypervisorKind::Synthetic])).unwrap();
        assert_eq!(built[0].kind(), HypervisorKind::Synthetic);
    }
}
