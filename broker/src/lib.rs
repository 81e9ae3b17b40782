//! The vmlot broker as a library: `run(client, config, shutdown)` is what
//! the binary and the tests both call.
//!
//! Today it provisions the durable state every other part relies on (the
//! block stream and the manifest bucket, with the configured replication)
//! and then waits for shutdown. The market (lots, auctions, settlement)
//! is not built yet; see the README's status table.

use std::future::Future;

use vmlot_cas::{BlockStore, CasError, StoreOptions};

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Replicas of every stream the broker creates (3 in a cluster).
    pub replicas: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self { replicas: 1 }
    }
}

/// Errors that stop the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("provisioning the block store: {0}")]
    Store(#[from] CasError),
}

/// Provisions the streams, then runs until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    BlockStore::open(
        client,
        StoreOptions {
            replicas: config.replicas,
            ..Default::default()
        },
    )
    .await?;
    tracing::info!(replicas = config.replicas, "streams provisioned");
    shutdown.await;
    tracing::info!("broker stopped");
    Ok(())
}
