//! The provider daemon: heartbeats, bids on lots it can run while it has a
//! free slot and is idle, runs the segments it is awarded, and publishes
//! their results. A crash mid-segment costs only that attempt: the broker
//! offers the lot again from the same checkpoint.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockCache, BlockStore, StoreOptions, pull_file, push_file};
use vmlot_schemas::market::{
    ApiError, Award, Bid, Checkpoint, GuestState, Heartbeat, Lot, Reply, SegmentResult, SegmentTimings,
    ToProvider,
};
use vmlot_schemas::{
    BlockId, Chunking, HypervisorKind, LotId, ManifestId, ObjectKind, WIRE_VERSION, subjects,
};

use crate::bidding;
use crate::config::ProviderConfig;
use crate::driver::{BootFiles, Driver, SegmentEnd, SegmentPlan, SegmentStart};

/// How far this machine's clock may be ahead of the broker's before a lot
/// looks past its bid deadline. Bid windows are a fraction of a second, so
/// a clock a few hundred milliseconds ahead (a host that set its clock from
/// a one-second RTC and has no NTP, as the nested Xen test hosts do) would
/// otherwise skip every lot. A bid that does arrive late is simply ignored
/// by the broker.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

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

struct Daemon {
    client: async_nats::Client,
    js: jetstream::Context,
    store: BlockStore,
    cache: Arc<BlockCache>,
    config: ProviderConfig,
    drivers: HashMap<HypervisorKind, Arc<dyn Driver>>,
    /// Segments awarded and not finished, by lot (running or waiting for a slot).
    active: Mutex<HashMap<LotId, CancellationToken>>,
    /// One permit per slot, held while a segment runs. The broker never has
    /// more awards outstanding than the slots bids declare; an award can
    /// still arrive while a cancelled segment is winding down, and waits.
    slots: Arc<tokio::sync::Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Daemon {
    fn free_slots(&self) -> u32 {
        let active = self.active.lock().expect("active lock").len();
        self.config.slots.saturating_sub(active as u32)
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
    let config_slots = config.slots as usize;
    let daemon = Arc::new(Daemon {
        client: client.clone(),
        js,
        store,
        cache,
        config,
        drivers,
        active: Mutex::new(HashMap::new()),
        slots: Arc::new(tokio::sync::Semaphore::new(config_slots)),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });

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
    daemon.tasks.spawn(heartbeats(Arc::clone(&daemon)));
    daemon.tasks.spawn(bid_on_lots(Arc::clone(&daemon), lots));
    daemon.tasks.spawn(take_awards(Arc::clone(&daemon), awards));
    tracing::info!(provider = %daemon.config.id, name = %daemon.config.name, "provider running");

    shutdown.await;
    tracing::info!("provider stopping");
    daemon.shutdown.cancel();
    daemon.tasks.close();
    daemon.tasks.wait().await;
    Ok(())
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
        if lot.version != WIRE_VERSION
            || lot.bid_deadline + CLOCK_SKEW < Utc::now()
            || !lot.invites(&daemon.config.id)
        {
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
                    slots: daemon.config.slots,
                    sent_at: Utc::now(),
                };
                let body = serde_json::to_vec(&bid).expect("bid serializes");
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

/// Awards and cancels from the broker. An award is answered once taken:
/// from then on the attempt is this provider's, and a crash costs only it.
async fn take_awards(daemon: Arc<Daemon>, mut messages: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            msg = messages.next() => match msg { Some(m) => m, None => return },
        };
        let answer: Reply<()> = match serde_json::from_slice::<ToProvider>(&msg.payload) {
            Ok(ToProvider::Award(award)) => match start_segment(&daemon, *award) {
                Ok(()) => Reply::Ok(()),
                Err(reason) => Reply::Error(ApiError {
                    code: "refused".into(),
                    message: reason,
                }),
            },
            Ok(ToProvider::Cancel(cancel)) => {
                if let Some(token) = daemon.active.lock().expect("active lock").get(&cancel.lot) {
                    tracing::info!(lot = %cancel.lot, reason = %cancel.reason, "segment cancelled");
                    token.cancel();
                }
                Reply::Ok(())
            }
            Err(err) => {
                tracing::warn!(%err, "ignored malformed award message");
                Reply::Error(ApiError {
                    code: "bad-request".into(),
                    message: err.to_string(),
                })
            }
        };
        if let Some(reply) = msg.reply {
            let body = serde_json::to_vec(&answer).expect("answer serializes");
            let _ = daemon.client.publish(reply, body.into()).await;
        }
    }
}

fn start_segment(daemon: &Arc<Daemon>, award: Award) -> Result<(), String> {
    let lot_id = award.lot.lot;
    if award.provider != daemon.config.id || award.deadline < Utc::now() {
        tracing::warn!(lot = %lot_id, "refused award: not ours or past its deadline");
        return Err("not this provider's award, or past its deadline".into());
    }
    if !daemon.drivers.contains_key(&award.lot.image.vm.hypervisor) {
        return Err(format!("no {:?} driver here", award.lot.image.vm.hypervisor));
    }
    let token = {
        let mut active = daemon.active.lock().expect("active lock");
        if active.contains_key(&lot_id) {
            return Ok(());
        }
        let token = daemon.shutdown.child_token();
        active.insert(lot_id, token.clone());
        token
    };
    let daemon2 = Arc::clone(daemon);
    daemon.tasks.spawn(async move {
        let deadline = (award.deadline - Utc::now()).to_std().unwrap_or_default();
        let permit = tokio::select! {
            _ = token.cancelled() => None,
            permit = tokio::time::timeout(deadline, Arc::clone(&daemon2.slots).acquire_owned()) => permit.ok().and_then(Result::ok),
        };
        if let Some(_permit) = permit {
            let workdir = daemon2.config.work_dir.join(lot_id.to_string());
            match run_award(&daemon2, &award, &workdir, token).await {
                Ok(()) => {}
                Err(err) => tracing::warn!(lot = %lot_id, %err, "segment attempt failed"),
            }
            let _ = std::fs::remove_dir_all(&workdir);
        } else {
            tracing::warn!(lot = %lot_id, "award cancelled or past its deadline before a slot freed; not run");
        }
        daemon2.active.lock().expect("active lock").remove(&lot_id);
    });
    Ok(())
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
                machine_state_chunking(lot.image.vm.hypervisor),
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

/// How a hypervisor's saved state is cut into blocks. QEMU's mapped-ram
/// file keeps every page on the 4 KiB grid; `xl save` writes pages in
/// batches behind pfn arrays, so they drift off it and only a chunker that
/// reads the stream's page records finds the same page again.
fn machine_state_chunking(hypervisor: HypervisorKind) -> Chunking {
    match hypervisor {
        HypervisorKind::Xen => Chunking::XEN_RECORDS,
        HypervisorKind::Qemu | HypervisorKind::Synthetic => Chunking::FIXED_4K,
    }
}
