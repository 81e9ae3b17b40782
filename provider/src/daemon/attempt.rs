//! One attempt at a segment, step by step, each step a span of its own:
//! `fetch` the image and checkpoint from the store, `run` the segment on
//! the driver, `push` the new checkpoint and the console, publish the
//! `result`. A failure ends the attempt, never the daemon; the broker
//! offers the lot again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tracing::Instrument;
use vmlot_cas::{Seed, pull_file, pull_file_over, push_file, push_file_over};
use vmlot_schemas::market::{Award, Checkpoint, GuestState, Lot, SegmentResult, SegmentTimings};
use vmlot_schemas::{BlockId, Chunking, HypervisorKind, ManifestId, ObjectKind, WIRE_VERSION, subjects};

use super::span::{LotRef, Step};
use super::state::Daemon;
use crate::driver::{BootFiles, DriverError, OwnerPolicy, SegmentEnd, SegmentPlan, SegmentStart};

/// Why one attempt failed; the daemon goes on.
#[derive(Debug, thiserror::Error)]
pub(super) enum AttemptError {
    #[error("fetching the checkpoint: {0}")]
    Fetch(vmlot_cas::CasError),
    #[error("driver: {0}")]
    Driver(#[from] DriverError),
    #[error("storing the new checkpoint: {0}")]
    Upload(vmlot_cas::CasError),
    #[error("publishing the result: {0}")]
    Publish(String),
    #[error("{0}")]
    Io(String),
}

/// Runs the attempt `award` gave this provider, in `workdir`.
pub(super) async fn run(
    daemon: &Arc<Daemon>,
    award: &Award,
    workdir: &Path,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), AttemptError> {
    let lot = &award.lot;
    let at = LotRef::of(lot);
    let me = &daemon.config.id;
    let driver = daemon
        .drivers
        .get(&lot.image.vm.hypervisor)
        .cloned()
        .ok_or_else(|| AttemptError::Io(format!("no driver for {:?}", lot.image.vm.hypervisor)))?;
    let _ = std::fs::remove_dir_all(workdir);
    std::fs::create_dir_all(workdir).map_err(|e| AttemptError::Io(e.to_string()))?;

    let fetch_started = Instant::now();
    let (plan, fetched_bytes) = fetch(daemon, lot, workdir)
        .instrument(at.span(Step::Fetch, me))
        .await?;
    let fetch_ms = fetch_started.elapsed().as_millis() as u64;

    let report = async {
        tracing::info!("running segment");
        driver.run_segment(&plan, cancel.clone()).await
    }
    .instrument(at.span(Step::Run, me))
    .await;
    let report = match report {
        // The lot's checkpoint does not load here: say so, so the broker
        // can weigh it against the payment that produced it.
        Err(DriverError::Restore(reason)) => {
            tracing::warn!(%reason, "the lot's checkpoint did not restore; reporting it");
            let timings = SegmentTimings {
                fetch_ms,
                ..Default::default()
            };
            let guest = GuestState::RestoreFailed { reason };
            let result = result_of(daemon, lot, guest, None, timings, (fetched_bytes, 0));
            return publish(daemon, &result)
                .instrument(at.span(Step::Result, me))
                .await;
        }
        other => other?,
    };

    let upload_started = Instant::now();
    let (guest, console, sent_bytes) = push(
        daemon,
        lot,
        report.end,
        &plan.files.disks,
        &report.console,
        workdir,
    )
    .instrument(at.span(Step::Push, me))
    .await?;
    if cancel.is_cancelled() {
        return Err(AttemptError::Driver(DriverError::Cancelled));
    }
    let timings = SegmentTimings {
        fetch_ms,
        start_ms: report.start_time.as_millis() as u64,
        run_ms: report.run_time.as_millis() as u64,
        save_ms: report.save_time.as_millis() as u64,
        upload_ms: upload_started.elapsed().as_millis() as u64,
        suspended_ms: report.suspended.as_millis() as u64,
    };
    let result = SegmentResult {
        preempted: report.preempted,
        ..result_of(daemon, lot, guest, console, timings, (fetched_bytes, sent_bytes))
    };
    publish(daemon, &result)
        .instrument(at.span(Step::Result, me))
        .await
}

/// This provider's result for `lot`, finished now; `bytes` are those
/// fetched from and sent to the store.
fn result_of(
    daemon: &Daemon,
    lot: &Lot,
    guest: GuestState,
    console: Option<ManifestId>,
    timings: SegmentTimings,
    (fetched_bytes, sent_bytes): (u64, u64),
) -> SegmentResult {
    SegmentResult {
        version: WIRE_VERSION,
        lot: lot.lot,
        job: lot.job,
        segment: lot.segment,
        attempt: lot.attempt,
        provider: daemon.config.id,
        guest,
        console,
        timings,
        fetched_bytes,
        sent_bytes,
        finished_at: Utc::now(),
        preempted: false,
    }
}

/// Pulls the image and the checkpoint into `workdir`: the segment's plan,
/// and the bytes fetched from the store (not the cache).
async fn fetch(daemon: &Daemon, lot: &Lot, workdir: &Path) -> Result<(SegmentPlan, u64), AttemptError> {
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
    let memory = workdir.join("memory");
    let memory = match &lot.checkpoint.memory {
        Some(id) => {
            fetched_bytes += pull_memory(daemon, lot, id, &memory).await?;
            Some(memory)
        }
        None => ram_apart(lot).then_some(memory),
    };
    let plan = SegmentPlan {
        vm: lot.image.vm.clone(),
        files: BootFiles {
            kernel,
            initrd,
            disks,
            memory,
        },
        start,
        run_for: Duration::from_secs(lot.segment_seconds as u64),
        instructions: lot.instructions,
        workdir: workdir.join("run"),
        owner: owner_policy(daemon),
    };
    std::fs::create_dir_all(&plan.workdir).map_err(|e| AttemptError::Io(e.to_string()))?;
    tracing::debug!(fetched_bytes, "fetched");
    Ok((plan, fetched_bytes))
}

/// Pulls the guest's RAM to `dest`, onto the RAM file this provider kept
/// from its last segment of the job if it has one; the bytes fetched from
/// the store.
async fn pull_memory(daemon: &Daemon, lot: &Lot, id: &ManifestId, dest: &Path) -> Result<u64, AttemptError> {
    let kept = daemon.kept.take(&lot.job);
    let base = match &kept {
        Some((_, kept_id)) => daemon
            .store
            .get_manifest_via(kept_id, Some(&daemon.cache))
            .await
            .ok(),
        None => None,
    };
    let seed = match (&kept, &base) {
        (Some((path, _)), Some(manifest)) => Some(Seed { path, manifest }),
        _ => None,
    };
    let onto = seed.is_some();
    let report = pull_file_over(&daemon.store, Some(&daemon.cache), id, dest, seed)
        .await
        .map_err(AttemptError::Fetch);
    if let Some((path, _)) = &kept {
        // Moved by the pull unless it failed first, or was not used.
        let _ = std::fs::remove_file(path);
    }
    let report = report?;
    tracing::debug!(
        onto_kept = onto,
        fetched_bytes = report.fetched_bytes,
        "guest RAM pulled"
    );
    Ok(report.fetched_bytes)
}

/// The owner comes first on a scavenging provider (`idle_load` set): the
/// owner is busy while its CPU share is at or above `idle_load`, by the
/// meter the bids use.
fn owner_policy(daemon: &Daemon) -> Option<OwnerPolicy> {
    let threshold = daemon.config.idle_load?;
    let meter = Arc::clone(&daemon.owner);
    Some(OwnerPolicy::new(
        Arc::new(move || !meter.idle(Some(threshold))),
        Duration::from_secs(daemon.config.owner_suspend_seconds),
        Duration::from_secs(daemon.config.preempt_notice_seconds),
    ))
}

/// Pushes what the segment left: the new checkpoint if the guest still
/// runs, its final disks (`disks`, as the guest left them) if it ended,
/// and the console. Returns the guest's state for the result, the
/// console's manifest and the bytes sent.
async fn push(
    daemon: &Daemon,
    lot: &Lot,
    end: SegmentEnd,
    disks: &[PathBuf],
    console: &[u8],
    workdir: &Path,
) -> Result<(GuestState, Option<ManifestId>, u64), AttemptError> {
    let known = known_blocks(daemon, &lot.checkpoint).await;
    let mut sent_bytes = 0u64;
    let guest = match end {
        SegmentEnd::Saved {
            machine_state,
            memory,
            disks,
        } => {
            #[cfg(feature = "fault-injection")]
            crate::fault::after_save(&machine_state);
            let state = push_file_over(
                &daemon.store,
                Some(&daemon.cache),
                &machine_state,
                ObjectKind::MachineState,
                machine_state_chunking(lot.image.vm.hypervisor),
                &known,
                lot.checkpoint.machine_state.as_ref(),
            )
            .await
            .map_err(AttemptError::Upload)?;
            sent_bytes += state.sent_bytes;
            let mut stored_bytes = state.manifest.stored_bytes();
            let memory = match memory {
                Some(ram) => {
                    // Not through the cache: the RAM file itself is kept
                    // (below), and a cache file per changed page is most of
                    // a push's time on this file system.
                    let pushed = push_file_over(
                        &daemon.store,
                        None,
                        &ram,
                        ObjectKind::Memory,
                        Chunking::FIXED_4K,
                        &known,
                        lot.checkpoint.memory.as_ref(),
                    )
                    .await
                    .map_err(AttemptError::Upload)?;
                    sent_bytes += pushed.sent_bytes;
                    daemon.kept.keep(lot.job, pushed.manifest_id, &ram);
                    Some((pushed.manifest_id, pushed.manifest.stored_bytes()))
                }
                None => None,
            };
            // A liar that leaves the part out claims the bytes of the rest.
            #[cfg(feature = "fault-injection")]
            let memory = memory.filter(|_| crate::fault::keeps_ram_part());
            let memory = memory.map(|(id, bytes)| {
                stored_bytes += bytes;
                id
            });
            let (disk_ids, disk_bytes) =
                push_disks(daemon, &disks, &lot.checkpoint.disks, &known, &mut sent_bytes).await?;
            GuestState::Running {
                checkpoint: Checkpoint {
                    machine_state: Some(state.manifest_id),
                    memory,
                    disks: disk_ids,
                    stored_bytes: stored_bytes + disk_bytes,
                },
            }
        }
        SegmentEnd::Halted => GuestState::Halted {
            final_state: Some(
                final_state(daemon, disks, &lot.checkpoint.disks, &known, &mut sent_bytes).await?,
            ),
        },
        SegmentEnd::Crashed { reason } => GuestState::Crashed {
            reason,
            final_state: Some(
                final_state(daemon, disks, &lot.checkpoint.disks, &known, &mut sent_bytes).await?,
            ),
        },
    };
    let console = if console.is_empty() {
        None
    } else {
        let path = workdir.join("console.log");
        std::fs::write(&path, console).map_err(|e| AttemptError::Io(e.to_string()))?;
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
    tracing::debug!(sent_bytes, "pushed");
    Ok((guest, console, sent_bytes))
}

/// Pushes `disks`, each manifest stored as the edits from the same disk's
/// in `bases` (the segment's input) when that is smaller; returns their
/// manifests and stored bytes, adding the bytes sent to `sent_bytes`.
async fn push_disks(
    daemon: &Daemon,
    disks: &[PathBuf],
    bases: &[ManifestId],
    known: &HashSet<BlockId>,
    sent_bytes: &mut u64,
) -> Result<(Vec<ManifestId>, u64), AttemptError> {
    let mut ids = Vec::new();
    let mut stored_bytes = 0;
    for (i, disk) in disks.iter().enumerate() {
        let pushed = push_file_over(
            &daemon.store,
            Some(&daemon.cache),
            disk,
            ObjectKind::Disk,
            Chunking::FIXED_4K,
            known,
            bases.get(i),
        )
        .await
        .map_err(AttemptError::Upload)?;
        *sent_bytes += pushed.sent_bytes;
        stored_bytes += pushed.manifest.stored_bytes();
        ids.push(pushed.manifest_id);
    }
    Ok((ids, stored_bytes))
}

/// An ended guest's final state: its disks as it left them (a powered-off
/// guest has no machine state worth restoring).
async fn final_state(
    daemon: &Daemon,
    disks: &[PathBuf],
    bases: &[ManifestId],
    known: &HashSet<BlockId>,
    sent_bytes: &mut u64,
) -> Result<Checkpoint, AttemptError> {
    let (disks, stored_bytes) = push_disks(daemon, disks, bases, known, sent_bytes).await?;
    Ok(Checkpoint {
        machine_state: None,
        disks,
        stored_bytes,
        memory: None,
    })
}

/// Publishes `result` to the provider's results subject (JetStream: the
/// broker reads it even if it was down when it was sent).
async fn publish(daemon: &Daemon, result: &SegmentResult) -> Result<(), AttemptError> {
    let body = serde_json::to_vec(result).expect("result serializes");
    daemon
        .js
        .publish(
            subjects::result(&daemon.config.id, subjects::partition_of(&result.job)),
            body.into(),
        )
        .await
        .map_err(|e| AttemptError::Publish(e.to_string()))?
        .await
        .map_err(|e| AttemptError::Publish(e.to_string()))?;
    tracing::info!("result published");
    crate::metrics::segment(result);
    Ok(())
}

/// Blocks of the checkpoint a segment started from: in the store already.
async fn known_blocks(daemon: &Daemon, checkpoint: &Checkpoint) -> HashSet<BlockId> {
    let mut known = HashSet::new();
    for id in checkpoint.parts() {
        if let Ok(manifest) = daemon.store.get_manifest_via(id, Some(&daemon.cache)).await {
            known.extend(manifest.unique_blocks().into_iter().map(|(b, _)| b));
        }
    }
    known
}

/// Whether the segment runs the guest with its RAM in a file of its own,
/// saved apart from the machine state (see [`BootFiles::memory`]): a
/// QEMU guest whose checkpoint has it so, or any QEMU guest the market
/// does not compare replicas of (a deterministic segment's state must hold
/// its RAM for the broker's canonical digest).
fn ram_apart(lot: &Lot) -> bool {
    lot.checkpoint.memory.is_some()
        || (lot.image.vm.hypervisor == HypervisorKind::Qemu && lot.instructions.is_none())
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
