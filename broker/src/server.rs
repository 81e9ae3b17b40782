//! The broker's server: [`run`] provisions the streams, resumes every job
//! not yet settled, starts the routing tasks and the job API, and stops
//! them all at shutdown, waiting for each task to finish.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_schemas::subjects;

use crate::capacity::Capacity;
use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::shared::Shared;
use crate::{api, route, standing, state};

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
        in_flight: Mutex::new(Default::default()),
        rates: rate_limiter(config.quotas.requests_per_second),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });

    let bids = client
        .subscribe(subjects::ALL_BIDS)
        .await
        .map_err(|e| BrokerError::nats("subscribe bids", e))?;
    let heartbeats = client
        .subscribe(subjects::ALL_HEARTBEATS)
        .await
        .map_err(|e| BrokerError::nats("subscribe heartbeats", e))?;
    let results = results_consumer(&js).await?;
    // Resume before results are routed, so every open lot has its route.
    // Ended jobs whose escrow is not yet refunded resume too, to refund it.
    for status in shared.jobs.unsettled().await? {
        tracing::info!(job = %status.job, "resuming job");
        shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .resume(&status.spec.account, status.job);
        shared.spawn_job(status.job, status.open_lot.map(|open| open.lot.lot));
    }
    shared.tasks.spawn(route::route_bids(Arc::clone(&shared), bids));
    shared
        .tasks
        .spawn(route::track_heartbeats(Arc::clone(&shared), heartbeats));
    shared
        .tasks
        .spawn(route::route_results(Arc::clone(&shared), results));
    let api = api::start(Arc::clone(&shared)).await?;
    tracing::info!("broker running");

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
    js.get_or_create_stream(stream::Config {
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
    })
    .await
    .map_err(|e| BrokerError::nats("create stream", e))?;
    Ok(())
}

async fn results_consumer(js: &jetstream::Context) -> Result<consumer::PullConsumer, BrokerError> {
    let stream = js
        .get_stream(subjects::RESULT_STREAM)
        .await
        .map_err(|e| BrokerError::nats("results stream", e))?;
    stream
        .get_or_create_consumer(
            "broker",
            consumer::pull::Config {
                durable_name: Some("broker".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BrokerError::nats("results consumer", e))
}

/// `per_second` requests per caller, in bursts of up to twice as many.
fn rate_limiter(per_second: u32) -> crate::shared::RateLimiter {
    let rate = std::num::NonZeroU32::new(per_second.max(1)).expect("at least 1");
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2"));
    governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
}
