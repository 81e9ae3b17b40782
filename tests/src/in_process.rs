//! Synthetic providers as tasks of this process: the provider daemon
//! (`vmlot_provider::daemon::run`) on its own connection per provider,
//! stopped by one cancellation token. The market benchmark runs hundreds
//! this way; as processes they would measure process overhead instead.
//!
//! Every use of `vmlot_provider`'s library is in this module.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rust_decimal::Decimal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmlot_provider::config::ProviderConfig;
use vmlot_provider::driver::Driver;
use vmlot_provider::driver::synthetic::{SyntheticConfig, SyntheticDriver};
use vmlot_schemas::{HypervisorKind, ProviderId};

use crate::NatsServer;
use crate::spec::ProviderSpec;

/// What in-process providers share beyond their [`ProviderSpec`].
#[derive(Clone, Debug)]
pub struct InProcessOptions {
    /// Largest guest each accepts.
    pub memory_mib: u32,
    /// Each one's block cache cap.
    pub cache_bytes: u64,
    pub heartbeat: Duration,
    /// Share of the state's blocks the synthetic driver rewrites per segment.
    pub changed_fraction: f64,
}

impl Default for InProcessOptions {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            cache_bytes: 256 << 20,
            heartbeat: Duration::from_secs(2),
            changed_fraction: 0.05,
        }
    }
}

/// Provider daemons running as tasks; cancelled on drop (or stopped and
/// awaited with [`InProcessProviders::stop`]).
#[derive(Default)]
pub struct InProcessProviders {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl InProcessProviders {
    /// Starts one daemon per spec, with its cache and work directories under `dir`.
    pub async fn add(
        &mut self,
        server: &NatsServer,
        dir: &Path,
        specs: &[ProviderSpec],
        options: &InProcessOptions,
    ) -> Result<()> {
        for spec in specs {
            let decimal = |field: &str, text: &str| {
                Decimal::from_str(text).with_context(|| format!("provider {}: {field} {text:?}", spec.name))
            };
            let config = ProviderConfig {
                id: ProviderId(spec.id),
                name: spec.name.clone(),
                hypervisors: vec![HypervisorKind::Synthetic],
                memory_mib: options.memory_mib,
                slots: spec.slots,
                price_per_second: decimal("price per second", &spec.price_per_second)?,
                min_price: decimal("min price", &spec.min_price)?,
                hot_discount: decimal("hot discount", &spec.hot_discount)?,
                cache_dir: dir.join(&spec.name).join("cache"),
                cache_bytes: options.cache_bytes,
                work_dir: dir.join(&spec.name).join("work"),
                heartbeat: options.heartbeat,
                ..ProviderConfig::default()
            };
            let drivers: Vec<Arc<dyn Driver>> = vec![Arc::new(SyntheticDriver::new(SyntheticConfig {
                changed_fraction: options.changed_fraction,
            }))];
            let client = server
                .client_as(vmlot_schemas::caller::Role::Provider, &spec.id.to_string())
                .await?;
            let stopped = self.stop.clone().cancelled_owned();
            let name = spec.name.clone();
            self.tasks.push(tokio::spawn(async move {
                if let Err(e) = vmlot_provider::daemon::run(client, config, drivers, stopped).await {
                    eprintln!("in-process provider {name} stopped: {e}");
                }
            }));
        }
        Ok(())
    }

    /// How many providers run here.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether none do.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Cancels every daemon and waits until each has finished.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for InProcessProviders {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
