//! What every command gets from the global options: where NATS is, one
//! connection to it made on first use, whether to print JSON, and the
//! handles built on that connection (the job API, the block store, the
//! ledger's JetStream context).

use std::time::Duration;

use tokio::sync::OnceCell;
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_client::Api;

/// How long connecting to NATS may take before it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// NATS could not be reached (exit code 4).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach NATS at {url}: {reason}")]
pub struct Unreachable {
    pub url: String,
    pub reason: String,
}

/// The global options, and the connection made from them.
pub struct Context {
    /// NATS server URL(s), comma-separated.
    nats_url: String,
    /// Print JSON instead of text for people.
    pub json: bool,
    nats: OnceCell<async_nats::Client>,
}

impl Context {
    pub fn new(nats_url: String, json: bool) -> Self {
        Self {
            nats_url,
            json,
            nats: OnceCell::new(),
        }
    }

    /// The NATS connection (made on first use, shared after). A URL that
    /// does not parse is a usage error; a server that does not answer is
    /// [`Unreachable`].
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        self.nats.get_or_try_init(|| self.connect()).await.cloned()
    }

    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nats_url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(addrs)
            .await
            .map_err(|e| Unreachable {
                url: self.nats_url.clone(),
                reason: e.to_string(),
            })?;
        Ok(client)
    }

    /// The broker's job API.
    pub async fn api(&self) -> anyhow::Result<Api> {
        Ok(Api::new(self.nats().await?))
    }

    /// The content-addressed store, with default options.
    pub async fn store(&self) -> anyhow::Result<BlockStore> {
        self.store_with(StoreOptions::default()).await
    }

    /// The content-addressed store, with `options`.
    pub async fn store_with(&self, options: StoreOptions) -> anyhow::Result<BlockStore> {
        Ok(BlockStore::open(self.nats().await?, options).await?)
    }

    /// JetStream over the connection (the ledger's reads).
    pub async fn jetstream(&self) -> anyhow::Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.nats().await?))
    }
}
