//! The provider daemon: heartbeats, bids on lots it can run while it has a
//! free slot and is idle, runs the segments it is awarded, and publishes
//! their results. A crash mid-segment costs only that attempt: the broker
//! offers the lot again from the same checkpoint.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockCache, BlockStore, StoreOptions, pull_file, push_file};
use vmlot_schemas::market::{
    Award, Bid, Checkpoint, GuestState, Heartbeat, Lot, SegmentResult, SegmentTimings, ToProvider,
};
use vmlot_schemas::{
    BlockId, Chunking, HypervisorKind, LotId, ManifestId, ObjectKind, WIRE_VERSION, subjects,
};

use crate::bidding;
use crate::config::ProviderConfig;
use crate::driver::{BootFiles, Driver, SegmentEnd, SegmentPlan, SegmentStart};

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

/// How long after a lot's bid deadline its award may still arrive (the
/// broker awards right at the deadline; a lost lot frees its slot then).
const AWARD_GRACE: Duration = Duration::from_millis(1000);

/// How long a winner keeps its slot for an award on its way.
const AWARD_WAIT: Duration = Duration::from_secs(10);

struct Daemon {
    client: async_nats::Client,
    js: jetstream::Context,
    store: BlockStore,
    cache: Arc<BlockCache>,
    config: ProviderConfig,
    drivers: HashMap<HypervisorKind, Arc<dyn Driver>>,
    /// Segments running now, by lot.
    active: Mutex<HashMap<LotId, CancellationToken>>,
    /// Lots bid on and not yet decided, with when the award would be
    /// overdue: each holds a slot, so a one-slot provider never wins two
    /// lots at once.
    pending: Mutex<HashMap<LotId, Instant>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Daemon {
    fn free_slots(&self) -> u32 {
        let active = self.active.lock().expect("active lock").len();
        let mut pending = self.pending.lock().expect("pending lock");
        let now = Instant::now();
        pending.retain(|_, overdue| *overdue > now);
        self.config.slots.saturating_sub((active + pending.len()) as u32)
    }

    /// Holds a slot for a bid until its award is overdue.
    fn hold_slot(&self, lot: LotId, bid_deadline: chrono::DateTime<Utc>) {
        let left = (bid_deadline - Utc::now()).to_std().unwrap_or_default() + AWARD_GRACE;
        self.pending
            .lock()
            .expect("pending lock")
            .insert(lot, Instant::now() + left);
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
    let store = BlockStore::open(client.clone(), StoreOptions::default()).await?;
    let cache = Arc::new(BlockCache::open(&config.cache_dir, config.cache_bytes)?);
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| nats("create work dir", format!("{}: {e}", config.work_dir.display())))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(15));
    let daemon = Arc::new(Daemon {
        client: client.clone(),
        js,
        store,
        cache,
        config,
        drivers,
        active: Mutex::new(HashMap::new()),
        pending: Mutex::new(HashMap::new()),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });

    let awards = award_consumer(&daemon).await?;
    let mut lot_subs = Vec::new();
    for kind in &daemon.config.hypervisors {
        let subject = subjects::lot(*kind, &daemon.config.arch);
        lot_subs.push(
            client
                .subscribe(subject)
                .await
                .map_err(|e| nats("subscribe lots", e))?,
        );
    }
    let closed = client
        .subscribe(subjects::LOT_CLOSED)
        .await
        .map_err(|e| nats("subscribe lot notices", e))?;
    let lots = futures::stream::select_all(lot_subs);
    daemon.tasks.spawn(heartbeats(Arc::clone(&daemon)));
    daemon.tasks.spawn(bid_on_lots(Arc::clone(&daemon), lots));
    daemon.tasks.spawn(release_lost_lots(Arc::clone(&daemon), closed));
    daemon.tasks.spawn(take_awards(Arc::clone(&daemon), awards));
    tracing::info!(provider = %daemon.config.id, name = %daemon.config.name, "provider running");

    shutdown.await;
    tracing::info!("provider stopping");
    daemon.shutdown.cancel();
    daemon.tasks.close();
    daemon.tasks.wait().await;
    Ok(())
}

async fn award_consumer(daemon: &Daemon) -> Result<consumer::PullConsumer, ProviderError> {
    // The broker creates the stream; wait for it rather than fail at start.
    let stream = loop {
        match daemon.js.get_stream(subjects::AWARD_STREAM).await {
            Ok(s) => break s,
            Err(err) => {
                tracing::info!(%err, "award stream not there yet; waiting for the broker");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let name = format!("provider-{}", daemon.config.id);
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subjects::award(&daemon.config.id),
                ack_policy: consumer::AckPolicy::Explicit,
                inactive_threshold: Duration::from_secs(24 * 3600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("award consumer", e))
}

async fn heartbeats(daemon: Arc<Daemon>) {
    let subject = subjects::heartbeat(&daemon.config.id);
    let mut tick = tokio::time::interval(daemon.config.heartbeat);
    loop {
        tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = Heartbeat {
            version: WIRE_VERSION,
            provider: daemon.config.id,
            name: daemon.config.name.clone(),
            hypervisors: daemon.config.hypervisors.clone(),
            arch: daemon.config.arch.clone(),
            memory_mib: daemon.config.memory_mib,
            slots: daemon.config.slots,
            free_slots: daemon.free_slots(),
            idle: bidding::machine_idle(daemon.config.idle_load),
            sent_at: Utc::now(),
        };
        let body = serde_json::to_vec(&beat).expect("heartbeat serializes");
        let _ = daemon.client.publish(subject.clone(), body.into()).await;
    }
}

async fn bid_on_lots(
    daemon: Arc<Daemon>,
    mut lots: impl futures::Stream<Item = async_nats::Message> + Unpin,
) {
    loop {
        let msg = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            msg = lots.next() => match msg { Some(m) => m, None => return },
        };
        let lot: Lot = match serde_json::from_slice(&msg.payload) {
            Ok(lot) => lot,
            Err(err) => {
                tracing::warn!(subject = %msg.subject, %err, "ignored malformed lot");
                continue;
            }
        };
        if lot.version != WIRE_VERSION || lot.bid_deadline < Utc::now() {
            continue;
        }
        let hot_share = hot_share(&daemon, &lot.checkpoint).await;
        let idle = bidding::machine_idle(daemon.config.idle_load);
        match bidding::decide(&daemon.config, &lot, daemon.free_slots(), idle, hot_share) {
            Ok(price) => {
                let bid = Bid {
                    version: WIRE_VERSION,
                    lot: lot.lot,
                    provider: daemon.config.id,
                    price,
                    hot_bytes: (Decimal::from(lot.checkpoint.stored_bytes) * hot_share)
                        .trunc()
                        .try_into()
                        .unwrap_or(0),
                    sent_at: Utc::now(),
                };
                let body = serde_json::to_vec(&bid).expect("bid serializes");
                daemon.hold_slot(lot.lot, lot.bid_deadline);
                if let Err(err) = daemon
                    .client
                    .publish(subjects::bid(&daemon.config.id), body.into())
                    .await
                {
                    tracing::warn!(%err, "could not send bid");
                }
            }
            Err(reason) => tracing::debug!(lot = %lot.lot, ?reason, "no bid"),
        }
    }
}

/// Frees the slot held for a bid as soon as the lot went to others; a
/// winner keeps holding it until its award arrives.
async fn release_lost_lots(daemon: Arc<Daemon>, mut notices: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            msg = notices.next() => match msg { Some(m) => m, None => return },
        };
        let Ok(closed) = serde_json::from_slice::<vmlot_schemas::market::LotClosed>(&msg.payload) else {
            continue;
        };
        let mut pending = daemon.pending.lock().expect("pending lock");
        if closed.awarded.contains(&daemon.config.id) {
            if let Some(overdue) = pending.get_mut(&closed.lot) {
                *overdue = Instant::now() + AWARD_WAIT;
            }
        } else {
            pending.remove(&closed.lot);
        }
    }
}

/// Share of a checkpoint's stored bytes already in the local cache.
async fn hot_share(daemon: &Daemon, checkpoint: &Checkpoint) -> Decimal {
    let (mut hot, mut total) = (0u64, 0u64);
    for id in checkpoint.machine_state.iter().chain(&checkpoint.disks) {
        if let Ok(manifest) = daemon.store.get_manifest(id).await {
            let have = daemon.cache.have(&manifest);
            hot += have.hot_bytes;
            total += have.hot_bytes + have.cold_bytes;
        }
    }
    if total == 0 {
        Decimal::ZERO
    } else {
        Decimal::from(hot) / Decimal::from(total)
    }
}

async fn take_awards(daemon: Arc<Daemon>, consumer: consumer::PullConsumer) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(%err, "award consumer unavailable; retrying");
                tokio::select! {
                    _ = daemon.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = daemon.shutdown.cancelled() => return,
                msg = messages.next() => msg,
            };
            let msg = match msg {
                Some(Ok(m)) => m,
                Some(Err(err)) => {
                    tracing::warn!(%err, "award stream error");
                    continue;
                }
                None => break,
            };
            // Acked on receipt: a provider that dies mid-segment loses the
            // attempt, and the broker offers the lot again after the deadline.
            let _ = msg.ack().await;
            match serde_json::from_slice::<ToProvider>(&msg.payload) {
                Ok(ToProvider::Award(award)) => start_segment(&daemon, *award),
                Ok(ToProvider::Cancel(cancel)) => {
                    if let Some(token) = daemon.active.lock().expect("active lock").get(&cancel.lot) {
                        tracing::info!(lot = %cancel.lot, reason = %cancel.reason, "segment cancelled");
                        token.cancel();
                    }
                }
                Err(err) => tracing::warn!(%err, "ignored malformed award message"),
            }
        }
    }
}

fn start_segment(daemon: &Arc<Daemon>, award: Award) {
    let lot_id = award.lot.lot;
    if award.provider != daemon.config.id || award.deadline < Utc::now() {
        tracing::warn!(lot = %lot_id, "ignored award: not ours or past its deadline");
        return;
    }
    daemon.pending.lock().expect("pending lock").remove(&lot_id);
    let token = {
        let mut active = daemon.active.lock().expect("active lock");
        if active.contains_key(&lot_id) {
            return;
        }
        if active.len() as u32 >= daemon.config.slots {
            tracing::warn!(lot = %lot_id, "award beyond free slots; not run");
            return;
        }
        let token = daemon.shutdown.child_token();
        active.insert(lot_id, token.clone());
        token
    };
    let daemon2 = Arc::clone(daemon);
    daemon.tasks.spawn(async move {
        let workdir = daemon2.config.work_dir.join(lot_id.to_string());
        match run_award(&daemon2, &award, &workdir, token).await {
            Ok(()) => {}
            Err(err) => tracing::warn!(lot = %lot_id, %err, "segment attempt failed"),
        }
        let _ = std::fs::remove_dir_all(&workdir);
        daemon2.active.lock().expect("active lock").remove(&lot_id);
    });
}

/// Why one attempt failed; the daemon goes on.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("fetching the checkpoint: {0}")]
    Fetch(vmlot_cas::CasError),
    #[error("driver: {0}")]
    Driver(#[from] crate::driver::DriverError),
    #[error("storing the new checkpoint: {0}")]
    Upload(vmlot_cas::CasError),
    #[error("publishing the result: {0}")]
    Publish(String),
    #[error("{0}")]
    Io(String),
}

async fn run_award(
    daemon: &Arc<Daemon>,
    award: &Award,
    workdir: &Path,
    cancel: CancellationToken,
) -> Result<(), AttemptError> {
    let lot = &award.lot;
    tracing::info!(lot = %lot.lot, segment = lot.segment, attempt = lot.attempt, "running segment");
    let driver = daemon
        .drivers
        .get(&lot.image.vm.hypervisor)
        .cloned()
        .ok_or_else(|| AttemptError::Io(format!("no driver for {:?}", lot.image.vm.hypervisor)))?;
    let _ = std::fs::remove_dir_all(workdir);
    std::fs::create_dir_all(workdir).map_err(|e| AttemptError::Io(e.to_string()))?;

    let fetch_started = Instant::now();
    let mut fetched_bytes = 0u64;
    let mut fetch = async |id: &ManifestId, name: &str| -> Result<PathBuf, AttemptError> {
        let path = workdir.join(name);
        let report = pull_file(&daemon.store, Some(&daemon.cache), id, &path)
            .await
            .map_err(AttemptError::Fetch)?;
        fetched_bytes += report.fetched_bytes;
        Ok(path)
    };
    let kernel = fetch(&lot.image.kernel, "kernel").await?;
    let initrd = match &lot.image.initrd {
        Some(id) => Some(fetch(id, "initrd").await?),
        None => None,
    };
    let mut disks = Vec::new();
    for (i, id) in lot.checkpoint.disks.iter().enumerate() {
        disks.push(fetch(id, &format!("disk{i}")).await?);
    }
    let start = match &lot.checkpoint.machine_state {
        Some(id) => SegmentStart::Restore {
            machine_state: fetch(id, "machine-state.in").await?,
        },
        None => SegmentStart::Boot,
    };
    let fetch_ms = fetch_started.elapsed().as_millis() as u64;

    let plan = SegmentPlan {
        vm: lot.image.vm.clone(),
        files: BootFiles {
            kernel,
            initrd,
            disks,
        },
        start,
        run_for: Duration::from_secs(lot.segment_seconds as u64),
        workdir: workdir.join("run"),
    };
    std::fs::create_dir_all(&plan.workdir).map_err(|e| AttemptError::Io(e.to_string()))?;
    let report = driver.run_segment(&plan, cancel.clone()).await?;

    let upload_started = Instant::now();
    let known = known_blocks(daemon, &lot.checkpoint).await;
    let mut sent_bytes = 0u64;
    let guest = match report.end {
        SegmentEnd::Saved { machine_state, disks } => {
            let state = push_file(
                &daemon.store,
                Some(&daemon.cache),
                &machine_state,
                ObjectKind::MachineState,
                Chunking::FIXED_4K,
                &known,
            )
            .await
            .map_err(AttemptError::Upload)?;
            sent_bytes += state.sent_bytes;
            let mut stored_bytes = state.manifest.stored_bytes();
            let mut disk_ids = Vec::new();
            for disk in &disks {
                let pushed = push_file(
                    &daemon.store,
                    Some(&daemon.cache),
                    disk,
                    ObjectKind::Disk,
                    Chunking::FIXED_4K,
                    &known,
                )
                .await
                .map_err(AttemptError::Upload)?;
                sent_bytes += pushed.sent_bytes;
                stored_bytes += pushed.manifest.stored_bytes();
                disk_ids.push(pushed.manifest_id);
            }
            GuestState::Running {
                checkpoint: Checkpoint {
                    machine_state: Some(state.manifest_id),
                    disks: disk_ids,
                    stored_bytes,
                },
            }
        }
        SegmentEnd::Halted => GuestState::Halted,
        SegmentEnd::Crashed { reason } => GuestState::Crashed { reason },
    };
    let console = if report.console.is_empty() {
        None
    } else {
        let path = workdir.join("console.log");
        std::fs::write(&path, &report.console).map_err(|e| AttemptError::Io(e.to_string()))?;
        let pushed = push_file(
            &daemon.store,
            None,
            &path,
            ObjectKind::Blob,
            Chunking::FIXED_4K,
            &HashSet::new(),
        )
        .await
        .map_err(AttemptError::Upload)?;
        Some(pushed.manifest_id)
    };
    if cancel.is_cancelled() {
        return Err(AttemptError::Driver(crate::driver::DriverError::Cancelled));
    }
    let result = SegmentResult {
        version: WIRE_VERSION,
        lot: lot.lot,
        job: lot.job,
        segment: lot.segment,
        attempt: lot.attempt,
        provider: daemon.config.id,
        guest,
        console,
        timings: SegmentTimings {
            fetch_ms,
            start_ms: report.start_time.as_millis() as u64,
            run_ms: report.run_time.as_millis() as u64,
            save_ms: report.save_time.as_millis() as u64,
            upload_ms: upload_started.elapsed().as_millis() as u64,
        },
        fetched_bytes,
        sent_bytes,
        finished_at: Utc::now(),
    };
    let body = serde_json::to_vec(&result).expect("result serializes");
    daemon
        .js
        .publish(subjects::result(&daemon.config.id), body.into())
        .await
        .map_err(|e| AttemptError::Publish(e.to_string()))?
        .await
        .map_err(|e| AttemptError::Publish(e.to_string()))?;
    tracing::info!(lot = %lot.lot, segment = lot.segment, "result published");
    Ok(())
}

/// Blocks of the checkpoint a segment started from: in the store already.
async fn known_blocks(daemon: &Daemon, checkpoint: &Checkpoint) -> HashSet<BlockId> {
    let mut known = HashSet::new();
    for id in checkpoint.machine_state.iter().chain(&checkpoint.disks) {
        if let Ok(manifest) = daemon.store.get_manifest(id).await {
            known.extend(manifest.unique_blocks().into_iter().map(|(b, _)| b));
        }
    }
    known
}
