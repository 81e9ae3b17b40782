//! The vmlot broker as a library: [`run`] is what the binary and the tests
//! both call, with their own shutdown future.
//!
//! - [`api`]: the job API, a NATS micro service (`vmlot.api.*`).
//! - [`job`]: one task per running job: offer a lot, collect bids, award,
//!   wait for results, settle, next segment.
//! - [`auction`]: the sealed-bid reverse auction (pure).
//! - [`capacity`]: awards outstanding per provider, never above its slots.
//! - [`state`]: job records in a KV bucket with revision checks.
//! - the books are [`vmlot_ledger`]: a submission holds the budget in the
//!   job's escrow, each settlement pays from it once, the job's end refunds.
//! - [`verify`]: checks a result's checkpoint against the store.

pub mod api;
pub mod auction;
pub mod capacity;
pub mod job;
pub mod state;
pub mod verify;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockStore, CasError, StoreOptions};
use vmlot_schemas::market::{Bid, Heartbeat, SegmentResult};
use vmlot_schemas::{JobId, LotId, ProviderId, WIRE_VERSION, subjects};

pub use auction::PricingRule;

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Replicas of every stream the broker creates (3 in a 3-node cluster).
    pub replicas: usize,
    /// How long a lot takes bids.
    pub bid_window: Duration,
    /// Added to the segment length T for the award deadline: time to fetch,
    /// restore, save and upload.
    pub transfer_allowance: Duration,
    /// First wait after an offer drew no bid; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub pricing: PricingRule,
    /// A provider silent this long is no longer listed.
    pub provider_timeout: Duration,
    /// The operator's share of each segment's price (0.05 = 5 %), paid to
    /// the operator account at settlement.
    pub fee_rate: rust_decimal::Decimal,
    /// The secret `vmlot admin credit` must present; `None` refuses every credit.
    pub operator_token: Option<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            bid_window: Duration::from_secs(2),
            transfer_allowance: Duration::from_secs(60),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            pricing: PricingRule::PayAsBid,
            provider_timeout: Duration::from_secs(10),
            fee_rate: rust_decimal::Decimal::ZERO,
            operator_token: None,
        }
    }
}

/// Errors that stop the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("block store: {0}")]
    Store(#[from] CasError),
    #[error("NATS {op}: {reason}")]
    Nats { op: &'static str, reason: String },
    #[error("ledger: {0}")]
    Ledger(#[from] vmlot_ledger::LedgerError),
}

impl BrokerError {
    pub(crate) fn nats(op: &'static str, err: impl std::fmt::Display) -> Self {
        BrokerError::Nats {
            op,
            reason: err.to_string(),
        }
    }
}

/// True when the environment asks for fault `point` (`VMLOT_FAULT`): the
/// fault tests kill the broker at an exact step this way. Unset, never.
pub(crate) fn fault_injected(point: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("VMLOT_FAULT").ok()).as_deref() == Some(point)
}

/// What reaches a job task about its open lot.
pub(crate) enum LotEvent {
    Bid(Bid),
    Result(Box<(SegmentResult, jetstream::Message)>),
}

/// Routing of bids and results to the job task that owns the lot.
pub(crate) struct LotRoute {
    pub job: JobId,
    pub tx: mpsc::Sender<LotEvent>,
}

/// State shared by the broker's tasks.
pub(crate) struct Shared {
    pub client: async_nats::Client,
    pub store: BlockStore,
    pub jobs: state::JobStore,
    pub books: vmlot_ledger::Books,
    pub config: BrokerConfig,
    pub lots: Mutex<HashMap<LotId, LotRoute>>,
    pub providers: Mutex<HashMap<ProviderId, (Heartbeat, std::time::Instant)>>,
    pub capacity: Mutex<capacity::Capacity>,
    /// Signalled once per slot freed: jobs that found no free bidder wait
    /// on it (one wakes per slot, in turn) instead of re-offering blindly.
    pub slot_freed: tokio::sync::Notify,
    pub running: Mutex<HashMap<JobId, CancellationToken>>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// The hypervisor, architecture and memory a heartbeat declares cover `vm`.
fn offers(hb: &Heartbeat, vm: &vmlot_schemas::VmConfig) -> bool {
    hb.hypervisors.contains(&vm.hypervisor) && hb.arch == vm.arch && hb.memory_mib >= vm.memory_mib
}

impl Shared {
    /// Starts the task that drives `job`, unless one already does. A lot
    /// the job has open is routed to it at once, so results that waited in
    /// the stream while no broker ran are not refused as unknown.
    pub fn spawn_job(self: &Arc<Self>, job: JobId, open_lot: Option<LotId>) {
        let token = {
            let mut running = self.running.lock().expect("running lock");
            if running.contains_key(&job) {
                return;
            }
            let token = self.shutdown.child_token();
            running.insert(job, token.clone());
            token
        };
        let (tx, rx) = mpsc::channel(1024);
        if let Some(lot) = open_lot {
            self.lots
                .lock()
                .expect("lots lock")
                .insert(lot, LotRoute { job, tx: tx.clone() });
        }
        let shared = Arc::clone(self);
        self.tasks.spawn(async move {
            let mut rx = rx;
            let mut pause = Duration::from_secs(1);
            // A NATS error stops one pass, not the job: it resumes from its
            // durable record, which every step writes first.
            while let Err(err) = job::drive(&shared, job, token.clone(), tx.clone(), &mut rx).await {
                tracing::error!(%job, %err, ?pause, "job task failed; resuming from its record");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            shared.running.lock().expect("running lock").remove(&job);
        });
    }

    /// Live providers that could run `vm`, with their slots: how many the
    /// invitation share is drawn from, and who may be named.
    pub fn eligible_providers(&self, vm: &vmlot_schemas::VmConfig) -> Vec<(ProviderId, u32)> {
        let providers = self.providers.lock().expect("providers lock");
        providers
            .values()
            .filter(|(hb, seen)| seen.elapsed() < self.config.provider_timeout && offers(hb, vm))
            .map(|(hb, _)| (hb.provider, hb.slots))
            .collect()
    }

    /// True when `provider`'s last heartbeat offers what `vm` needs. A bid
    /// from a provider that does not (a QEMU host bidding on a Xen lot, or
    /// one never heard of) is refused whatever subject it came in on.
    pub fn provider_offers(&self, provider: &ProviderId, vm: &vmlot_schemas::VmConfig) -> bool {
        let providers = self.providers.lock().expect("providers lock");
        providers.get(provider).is_some_and(|(hb, _)| offers(hb, vm))
    }

    /// Ends the reservations `lot` holds at `providers` and wakes one
    /// waiting job per slot freed.
    pub fn release_slots(&self, providers: impl IntoIterator<Item = ProviderId>, lot: &LotId) {
        let providers: Vec<ProviderId> = providers.into_iter().collect();
        self.capacity
            .lock()
            .expect("capacity lock")
            .release(providers.iter().copied(), lot);
        for _ in &providers {
            self.slot_freed.notify_one();
        }
    }

    /// Up to `n` of `eligible`, picked at random, with a slot no award
    /// holds: invited to a lot by name, so a market short of slots still
    /// puts each lot before someone free to take it.
    pub fn providers_with_room(&self, eligible: &[(ProviderId, u32)], n: usize) -> Vec<ProviderId> {
        use rand::seq::SliceRandom;
        let mut free: Vec<ProviderId> = {
            let capacity = self.capacity.lock().expect("capacity lock");
            eligible
                .iter()
                .filter(|(p, slots)| capacity.has_room(p, *slots))
                .map(|(p, _)| *p)
                .collect()
        };
        free.shuffle(&mut rand::thread_rng());
        free.truncate(n);
        free
    }

    pub fn live_providers(&self) -> Vec<Heartbeat> {
        let providers = self.providers.lock().expect("providers lock");
        let mut live: Vec<Heartbeat> = providers
            .values()
            .filter(|(_, seen)| seen.elapsed() < self.config.provider_timeout)
            .map(|(hb, _)| hb.clone())
            .collect();
        live.sort_by(|a, b| a.name.cmp(&b.name));
        live
    }
}

/// Provisions the streams, resumes every running job, serves the job API
/// and runs the market until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    let store = BlockStore::open(
        client.clone(),
        StoreOptions {
            replicas: config.replicas,
            ..Default::default()
        },
    )
    .await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(15));
    provision(&js, config.replicas).await?;
    let books = vmlot_ledger::Books::provision(&js, config.replicas).await?;
    let jobs = state::JobStore::open(&js, config.replicas).await?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        store,
        jobs,
        books,
        config,
        lots: Mutex::new(HashMap::new()),
        providers: Mutex::new(HashMap::new()),
        capacity: Mutex::new(capacity::Capacity::default()),
        slot_freed: tokio::sync::Notify::new(),
        running: Mutex::new(HashMap::new()),
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
        shared.spawn_job(status.job, status.open_lot.map(|open| open.lot.lot));
    }
    shared.tasks.spawn(route_bids(Arc::clone(&shared), bids));
    shared
        .tasks
        .spawn(track_heartbeats(Arc::clone(&shared), heartbeats));
    shared.tasks.spawn(route_results(Arc::clone(&shared), results));
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

async fn route_bids(shared: Arc<Shared>, mut bids: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            msg = bids.next() => match msg { Some(m) => m, None => return },
        };
        let bid: Bid = match serde_json::from_slice(&msg.payload) {
            Ok(bid) => bid,
            Err(err) => {
                tracing::warn!(subject = %msg.subject, %err, "refused malformed bid");
                continue;
            }
        };
        if bid.version != WIRE_VERSION || subjects::provider_of(&msg.subject) != Some(bid.provider) {
            tracing::warn!(subject = %msg.subject, provider = %bid.provider, "refused bid: wrong version or not from its own subject");
            continue;
        }
        let route = shared
            .lots
            .lock()
            .expect("lots lock")
            .get(&bid.lot)
            .map(|r| r.tx.clone());
        match route {
            Some(tx) => {
                let _ = tx.try_send(LotEvent::Bid(bid));
            }
            None => {
                tracing::warn!(lot = %bid.lot, provider = %bid.provider, "refused bid for a lot not open")
            }
        }
    }
}

async fn track_heartbeats(shared: Arc<Shared>, mut beats: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            msg = beats.next() => match msg { Some(m) => m, None => return },
        };
        match serde_json::from_slice::<Heartbeat>(&msg.payload) {
            Ok(hb) if subjects::provider_of(&msg.subject) == Some(hb.provider) => {
                shared
                    .providers
                    .lock()
                    .expect("providers lock")
                    .insert(hb.provider, (hb, std::time::Instant::now()));
            }
            _ => tracing::warn!(subject = %msg.subject, "refused malformed heartbeat"),
        }
    }
}

async fn route_results(shared: Arc<Shared>, consumer: consumer::PullConsumer) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(%err, "results consumer unavailable; retrying");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                msg = messages.next() => msg,
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(err)) => {
                    tracing::warn!(%err, "results stream error");
                    continue;
                }
                None => break,
            };
            let result: SegmentResult = match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(subject = %msg.subject, %err, "refused malformed result");
                    let _ = msg.ack().await;
                    continue;
                }
            };
            if result.version != WIRE_VERSION || subjects::provider_of(&msg.subject) != Some(result.provider)
            {
                tracing::warn!(subject = %msg.subject, "refused result: wrong version or not from its own subject");
                let _ = msg.ack().await;
                continue;
            }
            let route = shared
                .lots
                .lock()
                .expect("lots lock")
                .get(&result.lot)
                .map(|r| (r.job, r.tx.clone()));
            match route {
                Some((job, tx)) if job == result.job => {
                    // The job task acks once it has dealt with the result.
                    if let Err(mpsc::error::SendError(LotEvent::Result(event))) =
                        tx.send(LotEvent::Result(Box::new((result, msg)))).await
                    {
                        let _ = event
                            .1
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
                _ => {
                    tracing::warn!(lot = %result.lot, provider = %result.provider, "refused result for a lot not open (late, replayed or never offered)");
                    let _ = msg.ack().await;
                }
            }
        }
    }
}
