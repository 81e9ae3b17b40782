//! The provider daemon: heartbeats, bids on lots it can run while it has a
//! free slot and is idle, runs the segments it is awarded, and publishes
//! their results. A crash mid-segment costs only that attempt: the broker
//! offers the lot again from the same checkpoint.
//!
//! - [`run`] connects the pieces and owns every task (a `TaskTracker`,
//!   stopped by one `CancellationToken` at shutdown).
//! - `state`: what the tasks share; `span`: the span of each market step.
//! - `heartbeat`, `bid`, `award` (awards and cancels), `attempt` (fetch,
//!   run, push, result): one module per step of the provider's market.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockCache, BlockStore, StoreOptions};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::{HypervisorKind, subjects};

use crate::config::ProviderConfig;
use crate::driver::Driver;

mod attempt;
mod award;
mod bid;
mod heartbeat;
mod kept;
mod span;
mod state;

use state::Daemon;

/// Errors that stop the daemon (a failed segment never does).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("block store: {0}")]
    Store(#[from] vmlot_cas::CasError),
    #[error("NATS {op}: {reason}")]
    Nats { op: &'static str, reason: String },
    #[error("no driver configured for {0:?}")]
    NoDriver(HypervisorKind),
}

fn nats(op: &'static str, err: impl std::fmt::Display) -> ProviderError {
    ProviderError::Nats {
        op,
        reason: err.to_string(),
    }
}

/// Runs the provider until `shutdown` completes. Running segments are
/// cancelled at shutdown (their lots are offered again).
pub async fn run(
    client: async_nats::Client,
    config: ProviderConfig,
    drivers: Vec<Arc<dyn Driver>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProviderError> {
    let drivers: HashMap<HypervisorKind, Arc<dyn Driver>> =
        drivers.into_iter().map(|d| (d.kind(), d)).collect();
    for kind in &config.hypervisors {
        if !drivers.contains_key(kind) {
            return Err(ProviderError::NoDriver(*kind));
        }
    }
    // The broker creates the store's streams; a provider that starts first waits.
    // Its pointers and manifest records carry its name, the one its
    // credentials let it write under.
    let options = StoreOptions {
        writer: Caller::new(Role::Provider, config.id.to_string()),
        ..StoreOptions::default()
    };
    let store = BlockStore::join(client.clone(), options, None).await?;
    let cache = Arc::new(BlockCache::open(&config.cache_dir, config.cache_bytes)?);
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| nats("create work dir", format!("{}: {e}", config.work_dir.display())))?;
    if config.idle_load.is_some() && drivers.contains_key(&HypervisorKind::Qemu) {
        // A scavenger's guests get cgroups of their own: found (or said to
        // be unavailable) now, and a killed daemon's leftovers removed.
        crate::cgroup::place();
    }
    let kept = kept::Kept::open(config.work_dir.join("kept")).map_err(|e| {
        nats(
            "create the kept RAM files' dir",
            format!("{}: {e}", config.work_dir.display()),
        )
    })?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(15));
    let config_slots = config.slots as usize;
    let daemon = Arc::new(Daemon {
        client: client.clone(),
        js,
        store,
        cache,
        kept,
        config,
        drivers,
        active: Mutex::new(HashMap::new()),
        slots: Arc::new(tokio::sync::Semaphore::new(config_slots)),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        owner: Arc::new(crate::owner::Meter::default()),
    });

    if let Some(addr) = daemon.config.metrics_listen {
        vmlot_telemetry::serve(addr, &daemon.tasks, daemon.shutdown.clone())
            .map_err(|e| nats("metrics endpoint", e))?;
    }
    let awards = client
        .subscribe(subjects::award(&daemon.config.id))
        .await
        .map_err(|e| nats("subscribe awards", e))?;
    let mut lot_subs = Vec::new();
    let shard = subjects::shard_of(&daemon.config.id);
    for kind in &daemon.config.hypervisors {
        for subject in [
            subjects::lot(*kind, &daemon.config.arch),
            subjects::lot_shard(*kind, &daemon.config.arch, shard),
            subjects::lot_for(*kind, &daemon.config.arch, &daemon.config.id),
        ] {
            lot_subs.push(
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| nats("subscribe lots", e))?,
            );
        }
    }
    let lots = futures::stream::select_all(lot_subs);
    daemon.tasks.spawn(heartbeat::heartbeats(Arc::clone(&daemon)));
    daemon.tasks.spawn(bid::bid_on_lots(Arc::clone(&daemon), lots));
    daemon
        .tasks
        .spawn(award::take_awards(Arc::clone(&daemon), awards));
    tracing::info!(provider = %daemon.config.id, name = %daemon.config.name, "provider running");

    shutdown.await;
    tracing::info!("provider stopping");
    daemon.shutdown.cancel();
    daemon.tasks.close();
    daemon.tasks.wait().await;
    Ok(())
}
