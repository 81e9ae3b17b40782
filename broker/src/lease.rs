//! Partition leases: how any number of brokers share the jobs, each job
//! run by one broker at a time. Jobs fall into partitions by id
//! ([`vmlot_schemas::subjects::partition_of`]); a broker runs a
//! partition's jobs while it holds the partition's lease, an entry
//! `partition.<k>` in the KV bucket [`LEASE_BUCKET`] whose every message
//! lapses [`LEASE_TTL`] after it is written. The holder renews it every
//! [`RENEW_EVERY`] with a compare-and-set on its revision; each broker also
//! renews `member.<id>`, so all know how many brokers are live.
//!
//! Each round (the pure [`crate::partition::plan`] decides): free
//! partitions are taken up to the fair share (`create` succeeds for one
//! broker only), what is held beyond it is handed back. Taking partition
//! `k` subscribes to its bids (`vmlot.bid.*.k`), reads its results from
//! its own durable consumer (`broker-pk`, where the last holder stopped),
//! listens for pokes from other brokers and resumes its unsettled jobs
//! (those the index [`crate::unsettled`] names) from their records, as a
//! restarted broker does. Handing it back stops
//! those tasks (as a shutdown does: nothing is withdrawn or cancelled) and
//! then deletes the lease. A broker that dies simply stops renewing: its
//! leases lapse within [`LEASE_TTL`] and the others take them.
//!
//! The lease is for liveness, not for safety: a broker that cannot renew
//! gives its partitions up locally after [`FENCE_AFTER`], before its lease
//! can lapse, but a task stuck in a request may still act later. Were two
//! brokers ever to run one job, every step is still a compare-and-set on
//! the job's record, a segment is paid only once the record holds it as
//! settled (`settle`), and every payment has a deterministic id, so
//! nothing is done twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_schemas::market::JobRef;
use vmlot_schemas::subjects::{self, LEASE_BUCKET, PARTITIONS};
use vmlot_schemas::{JobId, WIRE_VERSION};

use crate::error::BrokerError;
use crate::partition::{self, Move};
use crate::route;
use crate::shared::{Holding, Shared};

/// A lease message lapses this long after it is written.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often a broker renews its leases and looks for free partitions.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A lease its holder could not renew for this long is given up locally
/// (its jobs stopped), well before it can lapse and be taken.
pub const FENCE_AFTER: Duration = Duration::from_secs(3);
/// This often, the held partitions' unsettled jobs are read again for
/// jobs no task runs (a poke lost on the way).
const RESCAN_EVERY: Duration = Duration::from_secs(15);
/// Longest wait for a partition's tasks to stop when it is handed back.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The lease bucket and this broker's name in it.
pub(crate) struct Leases {
    kv: kv::Store,
    js: jetstream::Context,
    me: String,
    /// The partition this broker looks at first when it takes free ones,
    /// fixed by its name, so brokers that look at once mostly differ.
    start: u16,
}

fn partition_key(partition: u16) -> String {
    format!("partition.{partition}")
}

impl Leases {
    /// Opens (or creates) the lease bucket through `books_js` (only
    /// brokers reach it); `js` is the market's, for result consumers.
    pub async fn open(
        books_js: &jetstream::Context,
        js: jetstream::Context,
        replicas: usize,
        me: String,
    ) -> Result<Self, BrokerError> {
        if me.is_empty()
            || !me
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(BrokerError::nats(
                "broker id",
                format!("{me:?}: want letters, digits, '-' or '_'"),
            ));
        }
        let kv = match books_js.get_key_value(LEASE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => books_js
                .create_key_value(kv::Config {
                    bucket: LEASE_BUCKET.to_string(),
                    history: 1,
                    max_age: LEASE_TTL,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| BrokerError::nats("create the lease bucket", e))?,
        };
        let start = subjects::partition_of(&JobId(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            me.as_bytes(),
        )));
        Ok(Self { kv, js, me, start })
    }

    fn member_key(&self) -> String {
        format!("member.{}", self.me)
    }
}

/// The broker's lease loop, until shutdown; then every partition is
/// handed back at once, so other brokers need not wait for the leases to
/// lapse.
pub(crate) async fn hold(shared: Arc<Shared>, leases: Leases) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The rescan reads the record of every unsettled job of the held
    // partitions: under load, seconds. It goes on between rounds, never in
    // their way: a renewal that waited for it let every lease lapse (a
    // market benchmark's one broker lost all sixteen partitions at once and
    // stopped their jobs).
    let rescans = rescan_forever(&shared);
    tokio::pin!(rescans);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tick.tick() => {}
            () = &mut rescans => {}
        }
        round(&shared, &leases).await;
    }
    for p in shared.held_partitions() {
        hand_back(&shared, &leases, p).await;
    }
    let _ = leases.kv.delete(leases.member_key()).await;
}

/// Every [`RESCAN_EVERY`], the jobs of the held partitions that no task
/// runs are started; never returns.
async fn rescan_forever(shared: &Arc<Shared>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + RESCAN_EVERY, RESCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let held = shared.held_partitions();
        if let Err(err) = resume_jobs(shared, &held).await {
            tracing::warn!(%err, "could not read the held partitions' jobs");
        }
    }
}

/// One round: say this broker is live, renew what it holds, and take or
/// hand back partitions toward its fair share.
pub(crate) async fn round(shared: &Arc<Shared>, leases: &Leases) {
    if let Err(err) = leases.kv.put(leases.member_key(), leases.me.clone().into()).await {
        tracing::warn!(%err, "could not renew this broker's membership");
    }
    renew(shared, leases).await;
    let Some((brokers, owners)) = look(leases).await else {
        return;
    };
    let held: BTreeSet<u16> = shared.held_partitions().into_iter().collect();
    // A lease still naming this broker that it no longer runs (given up
    // while NATS was unreachable) is taken back like a free one.
    let free: BTreeSet<u16> = (0..PARTITIONS)
        .filter(|p| owners.get(p).is_none_or(|(owner, _)| *owner == leases.me))
        .filter(|p| !held.contains(p))
        .collect();
    for step in partition::plan(&held, &free, brokers, leases.start) {
        match step {
            Move::Take(p) => {
                let taken = match owners.get(&p) {
                    Some((_, revision)) => leases
                        .kv
                        .update(partition_key(p), leases.me.clone().into(), *revision)
                        .await
                        .ok(),
                    None => leases
                        .kv
                        .create(partition_key(p), leases.me.clone().into())
                        .await
                        .ok(),
                };
                // Another broker took it first: it is theirs.
                if let Some(revision) = taken
                    && let Err(err) = take(shared, leases, p, revision).await
                {
                    tracing::warn!(partition = p, %err, "could not start a partition taken; handing it back");
                    hand_back(shared, leases, p).await;
                }
            }
            Move::Release(p) => hand_back(shared, leases, p).await,
        }
    }
}

/// Renews every lease held; one another broker now holds, or one not
/// renewed for [`FENCE_AFTER`], is given up locally.
async fn renew(shared: &Arc<Shared>, leases: &Leases) {
    let held: Vec<(u16, u64, Instant)> = shared
        .partitions
        .lock()
        .expect("partitions lock")
        .iter()
        .map(|(p, h)| (*p, h.revision, h.renewed))
        .collect();
    for (p, revision, renewed) in held {
        let outcome = match leases
            .kv
            .update(partition_key(p), leases.me.clone().into(), revision)
            .await
        {
            Ok(revision) => Some(revision),
            // Lapsed or taken (the revision moved on), or NATS trouble:
            // the entry says which.
            Err(_) => match leases.kv.entry(partition_key(p)).await {
                Ok(Some(entry))
                    if entry.value.as_ref() == leases.me.as_bytes()
                        && entry.operation == kv::Operation::Put =>
                {
                    leases
                        .kv
                        .update(partition_key(p), leases.me.clone().into(), entry.revision)
                        .await
                        .ok()
                }
                Ok(_) => {
                    tracing::warn!(
                        partition = p,
                        "partition lease lost to another broker or lapsed; its jobs stop here"
                    );
                    stop(shared, p).await;
                    continue;
                }
                Err(_) => None,
            },
        };
        match outcome {
            Some(revision) => {
                if let Some(h) = shared.partitions.lock().expect("partitions lock").get_mut(&p) {
                    h.revision = revision;
                    h.renewed = Instant::now();
                }
            }
            None if renewed.elapsed() > FENCE_AFTER => {
                tracing::warn!(
                    partition = p,
                    "partition lease not renewed in time; its jobs stop here"
                );
                stop(shared, p).await;
            }
            None => {}
        }
    }
}

/// The live brokers (at least this one) and who holds each partition
/// (its holder and the entry's revision); `None` when the bucket cannot
/// be read.
async fn look(leases: &Leases) -> Option<(usize, HashMap<u16, (String, u64)>)> {
    let mut keys = match leases.kv.keys().await {
        Ok(keys) => keys,
        Err(err) => {
            tracing::warn!(%err, "could not read the lease bucket");
            return None;
        }
    };
    let mut brokers = 0;
    let mut partitions = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { return None };
        if key.starts_with("member.") {
            brokers += 1;
        } else if let Some(p) = key.strip_prefix("partition.").and_then(|p| p.parse::<u16>().ok()) {
            partitions.push(p);
        }
    }
    let mut owners = HashMap::new();
    for p in partitions {
        if let Ok(Some(entry)) = leases.kv.entry(partition_key(p)).await
            && entry.operation == kv::Operation::Put
        {
            owners.insert(
                p,
                (String::from_utf8_lossy(&entry.value).into_owned(), entry.revision),
            );
        }
    }
    Some((brokers.max(1), owners))
}

/// Starts running partition `p`, whose lease this broker now holds at
/// `revision`: its bids, its results where the last holder stopped, the
/// pokes of other brokers, and its unsettled jobs.
async fn take(shared: &Arc<Shared>, leases: &Leases, p: u16, revision: u64) -> Result<(), BrokerError> {
    let token = shared.shutdown.child_token();
    let tracker = TaskTracker::new();
    shared.partitions.lock().expect("partitions lock").insert(
        p,
        Holding {
            token: token.clone(),
            tracker: tracker.clone(),
            revision,
            renewed: Instant::now(),
        },
    );
    tracing::info!(partition = p, "partition taken");
    let bids = shared
        .client
        .subscribe(subjects::bids_of_partition(p))
        .await
        .map_err(|e| BrokerError::nats("subscribe bids", e))?;
    let pokes = shared
        .client
        .subscribe(subjects::broker_poke(p))
        .await
        .map_err(|e| BrokerError::nats("subscribe pokes", e))?;
    let results = results_consumer(&leases.js, p).await?;
    // Jobs first, so every open lot has its route before results come.
    resume_jobs(shared, &[p]).await?;
    let tasks = &shared.tasks;
    tasks.spawn(tracker.track_future(route::route_bids(Arc::clone(shared), bids, token.clone())));
    tasks.spawn(tracker.track_future(route::route_results(Arc::clone(shared), results, token.clone())));
    tasks.spawn(tracker.track_future(look_again_on_pokes(Arc::clone(shared), pokes, token)));
    Ok(())
}

/// Starts a task for each unsettled job of `partitions` that has none
/// (and whose partition is still held: [`Shared::spawn_job`] checks).
async fn resume_jobs(shared: &Arc<Shared>, partitions: &[u16]) -> Result<(), BrokerError> {
    if partitions.is_empty() {
        return Ok(());
    }
    for status in shared.jobs.unsettled_in(partitions).await? {
        if shared
            .running
            .lock()
            .expect("running lock")
            .contains_key(&status.job)
        {
            continue;
        }
        tracing::info!(job = %status.job, "resuming job");
        shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .resume(&status.spec.account, status.job);
        shared.spawn_job(status.job, status.open_lot.map(|open| open.lot.lot));
    }
    Ok(())
}

/// Stops running partition `p` here (its tasks end as at a shutdown) and
/// waits for them, briefly.
async fn stop(shared: &Arc<Shared>, p: u16) {
    let Some(holding) = shared.partitions.lock().expect("partitions lock").remove(&p) else {
        return;
    };
    holding.token.cancel();
    holding.tracker.close();
    if tokio::time::timeout(STOP_WAIT, holding.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(partition = p, "partition's tasks still stopping");
    }
    tracing::info!(partition = p, "partition given up");
}

/// Stops partition `p` here, then deletes its lease for another broker.
async fn hand_back(shared: &Arc<Shared>, leases: &Leases, p: u16) {
    stop(shared, p).await;
    if let Err(err) = leases.kv.delete(partition_key(p)).await {
        tracing::warn!(partition = p, %err, "could not delete the lease; it lapses by itself");
    }
}

/// The durable consumer of partition `p`'s results, shared by whichever
/// broker holds it.
async fn results_consumer(js: &jetstream::Context, p: u16) -> Result<consumer::PullConsumer, BrokerError> {
    let stream = js
        .get_stream(subjects::RESULT_STREAM)
        .await
        .map_err(|e| BrokerError::nats("results stream", e))?;
    let name = subjects::results_consumer(p);
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subjects::results_of_partition(p),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BrokerError::nats("results consumer", e))
}

/// Another broker changed a job of this partition (a submission, a
/// cancel): its task is started, or told to stop if the job has ended.
async fn look_again_on_pokes(
    shared: Arc<Shared>,
    mut pokes: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            msg = pokes.next() => match msg { Some(m) => m, None => return },
        };
        let Ok(poke) = serde_json::from_slice::<JobRef>(&msg.payload) else {
            tracing::warn!(subject = %msg.subject, "malformed poke ignored");
            continue;
        };
        if let Err(err) = shared.look_again(poke.job).await {
            tracing::warn!(job = %poke.job, %err, "could not look at a poked job");
        }
    }
}

impl Shared {
    /// The partitions this broker holds now.
    fn held_partitions(&self) -> Vec<u16> {
        self.partitions
            .lock()
            .expect("partitions lock")
            .keys()
            .copied()
            .collect()
    }

    /// True while this broker holds `job`'s partition.
    pub(crate) fn holds(&self, job: &JobId) -> bool {
        self.partitions
            .lock()
            .expect("partitions lock")
            .contains_key(&subjects::partition_of(job))
    }

    /// The job's record changed outside its task: here, its task is
    /// started (or stopped, if the job has ended); elsewhere, the broker
    /// holding its partition is told.
    pub(crate) async fn look_again(self: &Arc<Self>, job: JobId) -> Result<(), BrokerError> {
        if !self.holds(&job) {
            let poke = JobRef {
                version: WIRE_VERSION,
                job,
            };
            let body = serde_json::to_vec(&poke).expect("poke serializes");
            return self
                .client
                .publish(subjects::broker_poke(subjects::partition_of(&job)), body.into())
                .await
                .map_err(|e| BrokerError::nats("poke", e));
        }
        let Some((status, _)) = self.jobs.get(&job).await? else {
            return Ok(());
        };
        if status.state.is_final()
            && let Some(token) = self.running.lock().expect("running lock").get(&job)
        {
            token.cancel();
            return Ok(());
        }
        if !self.running.lock().expect("running lock").contains_key(&job) {
            self.in_flight
                .lock()
                .expect("in-flight lock")
                .resume(&status.spec.account, job);
            self.spawn_job(job, status.open_lot.map(|open| open.lot.lot));
        }
        Ok(())
    }

    /// A new job id in a partition this broker holds (when it holds any),
    /// so a submission starts here without a poke.
    pub(crate) fn new_job_id(&self) -> JobId {
        for _ in 0..(8 * PARTITIONS) {
            let job = JobId::new();
            if self.holds(&job) {
                return job;
            }
        }
        JobId::new()
    }
}
