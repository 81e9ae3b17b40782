//! The broker's server: [`run`] provisions the streams, resumes every job
//! not yet settled, starts the routing tasks and the job API, and stops
//! them all at shutdown, waiting for each task to finish.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_schemas::subjects;

use crate::capacity::Capacity;
use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::shared::Shared;
use crate::{api, lease, route, standing, state};

/// `client` is the broker's connection to the market, `books_client` to
/// the account of the books and the job records.
/// Provisions the streams, resumes every running job, serves the job API
/// and runs the market until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    books_client: async_nats::Client,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    let store = BlockStore::open(
        client.clone(),
        StoreOptions {
            replicas: config.replicas,
            hash: config.block_hash,
            ..Default::default()
        },
    )
    .await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(15));
    provision(&js, config.replicas).await?;
    // The books and the job records live where only the broker reaches
    // (the books' account; the same one when running open).
    let mut books_js = jetstream::new(books_client);
    books_js.set_timeout(Duration::from_secs(15));
    let books = vmlot_ledger::Books::provision(&books_js, config.replicas).await?;
    let jobs = state::JobStore::open(&books_js, config.replicas).await?;
    let standings = standing::Standings::open(&books_js, config.replicas).await?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        store,
        jobs,
        books,
        standings,
        config: config.clone(),
        lots: Mutex::new(HashMap::new()),
        providers: Mutex::new(HashMap::new()),
        capacity: Mutex::new(Capacity::default()),
        slot_freed: tokio::sync::Notify::new(),
        running: Mutex::new(HashMap::new()),
        partitions: Mutex::new(HashMap::new()),
        in_flight: Mutex::new(Default::default()),
        rates: rate_limiter(config.quotas.requests_per_second),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });

    if let Some(addr) = config.metrics_listen {
        vmlot_telemetry::serve(addr, &shared.tasks, shared.shutdown.clone())?;
    }
    let heartbeats = client
        .subscribe(subjects::ALL_HEARTBEATS)
        .await
        .map_err(|e| BrokerError::nats("subscribe heartbeats", e))?;
    shared
        .tasks
        .spawn(route::track_heartbeats(Arc::clone(&shared), heartbeats));
    // The jobs this broker runs: those of the partitions it holds. A first
    // round before the API opens, so a lone broker (the partitions free or
    // lapsed) resumes every unsettled job, ended ones still to refund
    // included, before it takes new ones.
    let me = config
        .broker_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let leases = lease::Leases::open(&books_js, js.clone(), config.replicas, me.clone()).await?;
    lease::round(&shared, &leases).await;
    shared.tasks.spawn(lease::hold(Arc::clone(&shared), leases));
    let api = api::start(Arc::clone(&shared)).await?;
    tracing::info!(broker = %me, "broker running");

    shutdown.await;
    tracing::info!("broker stopping");
    shared.shutdown.cancel();
    api.stop().await;
    shared.tasks.close();
    shared.tasks.wait().await;
    tracing::info!("broker stopped");
    Ok(())
}

async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), BrokerError> {
    let config = stream::Config {
        name: subjects::RESULT_STREAM.to_string(),
        subjects: vec![subjects::RESULT_SUBJECTS.to_string()],
        // Bounded: a result is a few KiB of ids and timings, acked by the
        // broker as soon as its lot has dealt with it; one older than a
        // day is for a lot long closed.
        max_age: Duration::from_secs(24 * 3600),
        max_message_size: 1 << 20,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    let mut results = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| BrokerError::nats("create stream", e))?;
    // A stream made before results carried their partition
    // (`vmlot.result.<provider>`) takes the new subjects.
    let info = results
        .info()
        .await
        .map_err(|e| BrokerError::nats("results stream", e))?;
    if info.config.subjects != config.subjects {
        let updated = stream::Config {
            subjects: config.subjects,
            ..info.config.clone()
        };
        js.update_stream(updated)
            .await
            .map_err(|e| BrokerError::nats("update the results stream's subjects", e))?;
    }
    Ok(())
}

/// `per_second` requests per caller, in bursts of up to twice as many.
fn rate_limiter(per_second: u32) -> crate::shared::RateLimiter {
    let rate = std::num::NonZeroU32::new(per_second.max(1)).expect("at least 1");
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2"));
    governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
}
