//! What every command gets from the global options: where NATS is, one
//! connection to it made on first use, whether to print JSON, and the
//! handles built on that connection (the job API, the block store, the
//! ledger's JetStream context).

use std::time::Duration;

use tokio::sync::OnceCell;
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_client::Api;
use vmlot_identity::Access;
use vmlot_schemas::caller::Caller;

/// How long the store's streams may take to appear (a broker starting).
pub const STORE_PATIENCE: Duration = Duration::from_secs(10);

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
    /// Credentials, TLS, or open.
    access: Access,
    /// Who to be on an open server (`--as`); with credentials, they decide.
    open_as: Option<Caller>,
    nats: OnceCell<(async_nats::Client, Option<Caller>)>,
}

/// With no credentials nobody is anyone in particular.
#[derive(Debug, thiserror::Error)]
#[error("who is calling? pass --creds FILE, or on an open server --as ROLE/NAME (e.g. submitter/alice)")]
pub struct NoCaller;

impl Context {
    pub fn new(nats_url: String, json: bool, access: Access, open_as: Option<Caller>) -> Self {
        Self {
            nats_url,
            json,
            access,
            open_as,
            nats: OnceCell::new(),
        }
    }

    /// The NATS connection (made on first use, shared after). A URL that
    /// does not parse is a usage error; a server that does not answer is
    /// [`Unreachable`].
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        Ok(self.connection().await?.0)
    }

    async fn connection(&self) -> anyhow::Result<(async_nats::Client, Option<Caller>)> {
        self.nats.get_or_try_init(|| self.connect()).await.cloned()
    }

    async fn connect(&self) -> anyhow::Result<(async_nats::Client, Option<Caller>)> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nats_url
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()?;
        let (options, creds) = self.access.options()?;
        let client = options
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(addrs)
            .await
            .map_err(|e| Unreachable {
                url: self.nats_url.clone(),
                reason: e.to_string(),
            })?;
        let caller = creds.map(|c| c.caller).or_else(|| self.open_as.clone());
        Ok((client, caller))
    }

    /// The broker's job API, as whoever the credentials (or `--as`) say.
    pub async fn api(&self) -> anyhow::Result<Api> {
        let (client, caller) = self.connection().await?;
        Ok(Api::new(client, caller.ok_or(NoCaller)?))
    }

    /// The content-addressed store, with default options.
    pub async fn store(&self) -> anyhow::Result<BlockStore> {
        self.store_with(StoreOptions::default()).await
    }

    /// The content-addressed store, with `options`, writing as whoever
    /// the credentials (or `--as`) say; on an open server with neither, as
    /// the house.
    pub async fn store_with(&self, options: StoreOptions) -> anyhow::Result<BlockStore> {
        let (client, caller) = self.connection().await?;
        let options = StoreOptions {
            writer: caller.unwrap_or(options.writer),
            ..options
        };
        Ok(BlockStore::join(client, options, Some(STORE_PATIENCE)).await?)
    }

    /// The books, read-only: through the books' account's exports when
    /// the server checks identities, directly when it runs open.
    pub async fn books(&self) -> anyhow::Result<vmlot_ledger::BooksApi> {
        Ok(vmlot_ledger::BooksApi::for_server(self.nats().await?).await)
    }
}
