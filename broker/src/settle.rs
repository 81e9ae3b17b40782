//! Where a segment's money moves: wait for the awarded providers' results
//! until the deadline; the first that verifies (the open attempt, an
//! awarded provider, its checkpoint whole in the store) is recorded in the
//! job, if the attempt is still open there (a compare-and-set: one result
//! per segment, whatever other task believes it runs the job), then paid
//! exactly once (the settlement's ledger id is derived from job, segment
//! and attempt), into its provider's pending account until the next
//! segment continues from its checkpoint (`post`); the other replicas are
//! told to stop. A broker that died between recording and paying pays
//! what the record holds before the job's next step (`pay_recorded`).
//!
//! A partial segment (its provider's owner preempted it) is held while
//! another replica may still run the whole segment, and settles when none
//! can, paid by [`partial`]'s rules.
//!
//! The job's settled segment and the ledger's settlement built from it
//! are made in one place (`record`).

use std::collections::HashSet;
use std::sync::Arc;

use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vmlot_schemas::ledger::ForfeitCause;
use vmlot_schemas::market::{GuestState, JobStatus, Lot, ResultCheck, SegmentResult};
use vmlot_schemas::standing::RefusalKind;
use vmlot_schemas::{BlockId, HypervisorKind, Manifest, Money, ProviderId};

use crate::check::{self, Refusal};
use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::quorum::{self, Decision, Vote};
use crate::shared::{LotEvent, Shared};
use crate::standing::Outcome;
use crate::state::UpdateError;
use crate::stored_save::{self, StoredSaveError};
use crate::{award, cancel, deposit, metrics, partial, verify};

mod delivery;
mod record;

pub(crate) use record::pay_recorded;
use record::{Recording, pay_and_post, record, settled_segment};

/// How waiting for an attempt's results ended.
pub(crate) enum Waited {
    /// The attempt is over with the segment settled (by this wait, or in
    /// the job's record by another task before it).
    Settled,
    TimedOut,
    /// Every awarded provider's result was refused (or said the checkpoint
    /// does not restore): no valid one can come.
    AllRefused,
    /// Enough providers could not restore the job's checkpoint: the
    /// payment that produced it is due to be voided.
    VoidDue,
    Stopped,
}

/// How long a result the store could not check waits before it is
/// delivered again.
const RECHECK_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for the results of the awarded lot open in `status` until its
/// deadline, and settles the segment with the first valid one (under a
/// quorum check, the first of two that agree, [`tally`]).
pub(crate) async fn await_result(
    shared: &Arc<Shared>,
    status: &JobStatus,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<Waited, BrokerError> {
    let mut added = Vec::new();
    let waited = wait(shared, status, rx, stop, &mut added).await;
    // A tie-breaker's slot is held by this wait, not by the awarded lot
    // the job task started with.
    if let Some(open) = &status.open_lot {
        shared.release_slots(added, &open.lot.lot);
    }
    waited
}

async fn wait(
    shared: &Arc<Shared>,
    status: &JobStatus,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
    added: &mut Vec<ProviderId>,
) -> Result<Waited, BrokerError> {
    // The record as this wait knows it: a tie-breaker's award changes it.
    let mut status = status.clone();
    let Some(open) = status.open_lot.clone() else {
        return Err(Refused::NoOpenLot.into());
    };
    let until = |status: &JobStatus| {
        let deadline = status
            .open_lot
            .as_ref()
            .and_then(|open| open.award_deadline)
            .unwrap_or_else(Utc::now);
        tokio::time::Instant::now() + (deadline - Utc::now()).to_std().unwrap_or_default()
    };
    let timeout = tokio::time::sleep_until(until(&status));
    tokio::pin!(timeout);
    // Past the deadline while results stored before it may still be on
    // their way ([`delivery`]): until when this wait goes on for them.
    let mut grace: Option<tokio::time::Instant> = None;
    let known = verify::known_blocks(&shared.store, &status.checkpoint).await;
    // Providers refused during this wait (the record has those before it).
    let mut refused: Vec<ProviderId> = Vec::new();
    let mut ballots: Vec<Ballot> = Vec::new();
    // Valid partial segments (their providers' owners preempted them),
    // held while another replica may still run the whole segment.
    let mut held: Vec<Held> = Vec::new();
    // An attempt adaptive replication left to one provider settles on
    // its first valid result.
    let quorum = status.spec.check == ResultCheck::Quorum && !open.unreplicated;
    loop {
        // Results already here come before the deadline's check.
        let (result, msg) = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Waited::Stopped),
            event = rx.recv() => match event {
                Some(LotEvent::Result(event)) => *event,
                Some(LotEvent::Bid(_)) => continue,
                None => return Ok(Waited::Stopped),
            },
            _ = &mut timeout => {
                let now = tokio::time::Instant::now();
                let until = *grace.get_or_insert(now + delivery::GRACE);
                if now < until && delivery::undelivered(shared, &status.job).await {
                    tracing::info!("deadline passed with results undelivered; waiting for them");
                    timeout.as_mut().reset(tokio::time::Instant::now() + delivery::GRACE_STEP);
                    continue;
                }
                return settle_held(shared, &status, &open.lot, &mut held, Waited::TimedOut).await;
            }
        };
        let received = delivery::received_at(&msg);
        let deadline = status.open_lot.as_ref().and_then(|open| open.award_deadline);
        if grace.is_some() && deadline.is_some_and(|deadline| received > deadline) {
            // Stored after the deadline: late, as the router calls a
            // result for a lot no longer open.
            tracing::warn!(provider = %result.provider, "refused result stored after the deadline");
            metrics::refused("result", "lot-not-open");
            let _ = msg.ack().await;
            continue;
        }
        let span = tracing::info_span!("result", provider = %result.provider);
        if let GuestState::RestoreFailed { reason } = &result.guest {
            let outcome = restore_failed(shared, &status, &result, received, reason)
                .instrument(span)
                .await;
            let _ = msg.ack().await;
            match outcome? {
                Some(waited) => return Ok(waited),
                None => continue,
            }
        }
        let outcome = async {
            let checked = match check(shared, &status, &result, received, &known).await {
                Ok((price, manifest)) if quorum => machine_state_digest(shared, &status, manifest.as_ref())
                    .await
                    .map(|digest| (price, digest)),
                Ok((price, _)) => Ok((price, None)),
                Err(e) => Err(e),
            };
            match checked {
                Ok((price, digest)) if quorum => {
                    let _ = msg.ack().await;
                    match quorum::canonical(status.spec.image.vm.hypervisor, &result, digest) {
                        Ok(canonical) => ballots.push(Ballot {
                            vote: Vote {
                                provider: result.provider,
                                canonical,
                            },
                            result,
                            price,
                            received,
                        }),
                        Err(why) => tracing::warn!(%why, "result not counted in the quorum"),
                    }
                    Ok(None)
                }
                Ok((price, _)) => {
                    if let Some(ran_ms) = partial::ran_ms(&open, &result, received) {
                        held.push(Held {
                            result,
                            price,
                            ran_ms,
                            received,
                        });
                        let waited = if outstanding(&status, &refused, &held) > 0 {
                            tracing::info!(ran_ms, "preempted by its owner; the other replicas run on");
                            None
                        } else {
                            Some(settle_held(shared, &status, &open.lot, &mut held, Waited::TimedOut).await?)
                        };
                        let _ = msg.ack().await;
                        return Ok(waited);
                    }
                    let settled = settle(shared, &status, &open.lot, &result, price, None, received)
                        .instrument(tracing::info_span!("settle"))
                        .await?;
                    let _ = msg.ack().await;
                    if settled {
                        count(shared, result.provider, Outcome::Valid);
                    }
                    Ok::<_, BrokerError>(Some(Waited::Settled))
                }
                Err(Checked::Refused(refusal)) => {
                    tracing::warn!(kind = %refusal.kind, reason = %refusal.why, "result refused");
                    metrics::refused("result", refusal.kind);
                    let was_awarded = awarded(&status).any(|p| p == result.provider);
                    if was_awarded && !refused.contains(&result.provider) {
                        refuse(shared, &status, result.provider, &refusal).await?;
                        refused.push(result.provider);
                    }
                    let _ = msg.ack().await;
                    if quorum || outstanding(&status, &refused, &held) > 0 {
                        return Ok(None);
                    }
                    // Nothing whole can come: the best partial, if any, settles.
                    Ok(Some(
                        settle_held(shared, &status, &open.lot, &mut held, Waited::AllRefused).await?,
                    ))
                }
                Err(Checked::Unverifiable(why)) => {
                    // The broker's trouble, not the provider's: the result
                    // comes back later and is checked again.
                    tracing::warn!(%why, "result not checked now; asking for it again");
                    let _ = msg.ack_with(AckKind::Nak(Some(RECHECK_DELAY))).await;
                    Ok(None)
                }
            }
        }
        .instrument(span)
        .await?;
        if let Some(waited) = outcome {
            return Ok(waited);
        }
        if quorum {
            match tally(shared, &status, &open.lot, &ballots, &refused).await? {
                Tally::Open => {}
                Tally::Over(waited) => return Ok(waited),
                Tally::TieBreaker(recorded, provider) => {
                    added.push(provider);
                    status = *recorded;
                    timeout.as_mut().reset(until(&status));
                }
            }
        }
    }
}

/// Under a quorum check, the canonical digest of a QEMU result's machine
/// state (its manifest as the checks read it), from the store (a
/// synthetic state needs none: its manifest id is canonical).
async fn machine_state_digest(
    shared: &Shared,
    status: &JobStatus,
    machine_state: Option<&Manifest>,
) -> Result<Option<[u8; 32]>, Checked> {
    let (HypervisorKind::Qemu, Some(manifest)) = (status.spec.image.vm.hypervisor, machine_state) else {
        return Ok(None);
    };
    match stored_save::canonical_digest(&shared.store, manifest).await {
        Ok(digest) => Ok(Some(digest)),
        Err(StoredSaveError::Invalid(why)) => Err(Refusal::new(RefusalKind::WrongKind, why).into()),
        Err(StoredSaveError::Store(why)) => Err(Checked::Unverifiable(why)),
    }
}

/// A valid partial segment waiting for the attempt's other replicas.
struct Held {
    result: SegmentResult,
    price: Money,
    ran_ms: u64,
    /// When the result reached the NATS server.
    received: DateTime<Utc>,
}

/// The awarded providers that may still send a result for the open
/// attempt: not refused (before or during this wait), not unable to
/// restore its checkpoint, not holding a partial segment already.
fn outstanding(status: &JobStatus, refused: &[ProviderId], held: &[Held]) -> usize {
    awarded(status)
        .filter(|p| {
            !refused.contains(p)
                && !status.refused.contains(p)
                && !status.restore_failures.contains(p)
                && !held.iter().any(|h| h.result.provider == *p)
        })
        .count()
}

/// No whole segment can come (every other replica refused, or the
/// deadline passed): the held partial segment that ran longest settles
/// the attempt; with none held, the wait ends with nothing valid.
async fn settle_held(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    held: &mut Vec<Held>,
    otherwise: Waited,
) -> Result<Waited, BrokerError> {
    let Some(best) = (0..held.len()).max_by_key(|&i| held[i].ran_ms) else {
        return Ok(otherwise);
    };
    let Held {
        result,
        price,
        ran_ms,
        received,
    } = held.swap_remove(best);
    if settle(shared, status, lot, &result, price, Some(ran_ms), received)
        .instrument(tracing::info_span!("settle", partial_ms = ran_ms))
        .await?
    {
        count(shared, result.provider, Outcome::Valid);
    }
    Ok(Waited::Settled)
}

/// The providers awarded the open attempt in `status`.
fn awarded(status: &JobStatus) -> impl Iterator<Item = ProviderId> + '_ {
    status
        .open_lot
        .iter()
        .flat_map(|open| open.awarded.iter().map(|(p, _)| *p))
}

/// A valid result under a quorum check, waiting for another to agree.
struct Ballot {
    vote: Vote,
    result: SegmentResult,
    price: Money,
    /// When the result reached the NATS server.
    received: DateTime<Utc>,
}

/// What the quorum's count did.
enum Tally {
    /// No quorum yet; replicas may still answer.
    Open,
    /// The attempt is over (settled, or no replica left to break a tie).
    Over(Waited),
    /// The replicas disagree: the record with a tie-breaker awarded.
    TieBreaker(Box<JobStatus>, ProviderId),
}

/// Under a quorum check, after each result: settles the attempt once two
/// replicas agree (the first of them is paid; a replica whose state
/// differs is refused as the minority), or awards a tie-breaker when every
/// replica has answered and none agree.
async fn tally(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    ballots: &[Ballot],
    refused: &[ProviderId],
) -> Result<Tally, BrokerError> {
    let votes: Vec<Vote> = ballots.iter().map(|b| b.vote.clone()).collect();
    let outstanding = awarded(status)
        .filter(|p| {
            !votes.iter().any(|v| v.provider == *p)
                && !refused.contains(p)
                && !status.refused.contains(p)
                && !status.restore_failures.contains(p)
        })
        .count();
    match quorum::decide(&votes, outstanding) {
        Decision::Open => Ok(Tally::Open),
        Decision::Agreed { winner, minority } => {
            let paid = &ballots[winner];
            let settled = settle(
                shared,
                status,
                lot,
                &paid.result,
                paid.price.clone(),
                None,
                paid.received,
            )
            .instrument(tracing::info_span!(
                "settle",
                agreed = votes.len() - minority.len()
            ))
            .await?;
            if !settled {
                // Another task settled the segment: its count stands.
                return Ok(Tally::Over(Waited::Settled));
            }
            for (i, ballot) in ballots.iter().enumerate() {
                if !minority.contains(&i) {
                    count(shared, ballot.vote.provider, Outcome::Agreed);
                    continue;
                }
                let why = format!(
                    "its state differs from the one {} replicas agreed on",
                    votes.len() - minority.len()
                );
                tracing::warn!(provider = %ballot.vote.provider, %why, "minority result");
                metrics::refused("result", RefusalKind::Minority);
                refuse(
                    shared,
                    status,
                    ballot.vote.provider,
                    &Refusal::new(RefusalKind::Minority, why),
                )
                .await?;
                deposit::forfeit(
                    shared,
                    status,
                    lot.segment,
                    lot.attempt,
                    ballot.vote.provider,
                    ForfeitCause::Minority,
                )
                .await;
            }
            // A tie-breaker still running is told to stop.
            let running: Vec<ProviderId> = awarded(status)
                .filter(|p| !votes.iter().any(|v| v.provider == *p))
                .collect();
            cancel::attempt(shared, lot.lot, &running, "the replicas agreed").await;
            Ok(Tally::Over(Waited::Settled))
        }
        Decision::Split => match award::tie_breaker(shared, status.job, lot).await? {
            Some((recorded, provider)) => {
                tracing::warn!(%provider, "replicas disagree; a tie-breaker is awarded");
                Ok(Tally::TieBreaker(Box::new(recorded), provider))
            }
            None => {
                tracing::warn!("replicas disagree and no standby bidder is left; the attempt is over");
                Ok(Tally::Over(Waited::AllRefused))
            }
        },
    }
}

/// A provider awarded the open attempt says the job's checkpoint does not
/// restore: recorded (it is not awarded this checkpoint again), and the
/// wait ends when enough providers said so (the payment that produced the
/// checkpoint is due to be voided) or no awarded provider is left to
/// send a result.
async fn restore_failed(
    shared: &Arc<Shared>,
    status: &JobStatus,
    result: &SegmentResult,
    received: DateTime<Utc>,
    reason: &str,
) -> Result<Option<Waited>, BrokerError> {
    if let Err(refusal) = check::claims(status, result, received, shared.config.early_allowance) {
        tracing::warn!(kind = %refusal.kind, reason = %refusal.why, "restore failure report refused");
        return Ok(None);
    }
    tracing::warn!(%reason, "the checkpoint did not restore on this provider");
    let provider = result.provider;
    let recorded = match shared
        .jobs
        .transition(&status.job, move |s| lifecycle::restore_failed(s, provider))
        .await
    {
        Ok(recorded) => recorded,
        Err(UpdateError::Refused(Refused::AlreadyReported(_) | Refused::Final(_))) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if lifecycle::void_due(&recorded, shared.config.restore_quorum).is_some() {
        return Ok(Some(Waited::VoidDue));
    }
    let none_left = status.open_lot.as_ref().is_some_and(|open| {
        open.awarded
            .iter()
            .all(|(p, _)| recorded.refused.contains(p) || recorded.restore_failures.contains(p))
    });
    Ok(none_left.then_some(Waited::AllRefused))
}

/// Counts a valid result in its provider's standing, off the settlement's
/// path (a task of the broker's, which shutdown waits for).
fn count(shared: &Arc<Shared>, provider: ProviderId, outcome: Outcome<'static>) {
    let standings = shared.standings.clone();
    shared
        .tasks
        .spawn(async move { standings.count(provider, outcome).await }.in_current_span());
}

/// Counts a refused result against its provider and keeps the provider
/// off the job's later lots.
async fn refuse(
    shared: &Shared,
    status: &JobStatus,
    provider: ProviderId,
    refusal: &Refusal,
) -> Result<(), BrokerError> {
    shared
        .standings
        .count(provider, Outcome::Refused(refusal.kind, &refusal.why))
        .await;
    match shared
        .jobs
        .transition(&status.job, move |s| lifecycle::refuse_provider(s, provider))
        .await
    {
        Ok(_) | Err(UpdateError::Refused(Refused::AlreadyRefused(_) | Refused::Final(_))) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Why a result was not accepted.
enum Checked {
    /// It failed a check: the provider's doing.
    Refused(Refusal),
    /// The store could not be read: the broker's trouble.
    Unverifiable(String),
}

impl From<Refusal> for Checked {
    fn from(refusal: Refusal) -> Self {
        Checked::Refused(refusal)
    }
}

impl From<verify::Invalid> for Checked {
    fn from(invalid: verify::Invalid) -> Self {
        match invalid {
            verify::Invalid::Store(why) => Checked::Unverifiable(why),
            other => Checked::Refused(Refusal::new(RefusalKind::Incomplete, other.to_string())),
        }
    }
}

/// Checks a result: its claims against the open attempt and the clock,
/// then the state it names against the store, then the machine state's
/// kind; returns the price owed and the machine state's manifest.
async fn check(
    shared: &Shared,
    status: &JobStatus,
    result: &SegmentResult,
    received: DateTime<Utc>,
    known: &HashSet<BlockId>,
) -> Result<(Money, Option<Manifest>), Checked> {
    let price = check::claims(status, result, received, shared.config.early_allowance)?;
    let Some(state) = result.guest.state() else {
        return Err(Refusal::new(RefusalKind::NoFinalState, "no state").into());
    };
    let verified = verify::checkpoint(&shared.store, state, known).await?;
    if let (GuestState::Running { .. }, Some(manifest)) = (&result.guest, &verified.machine_state) {
        let vm = &status.spec.image.vm;
        let prefix = verify::prefix(&shared.store, manifest, check::prefix_len(vm.hypervisor)).await?;
        check::state_kind(vm, result.segment, manifest.size, &prefix, verified.memory_size)?;
    }
    Ok((price, verified.machine_state))
}

/// Settles the open attempt with `result`: records it in the job (only
/// while the attempt is open there), pays it (once, whoever asks again),
/// and tells the other replicas to stop. False when the attempt was no
/// longer open in the job's record: nothing was recorded or paid.
async fn settle(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    result: &SegmentResult,
    price: Money,
    partial_ms: Option<u64>,
    received: DateTime<Utc>,
) -> Result<bool, BrokerError> {
    let price = match partial_ms {
        Some(ran) => partial::price(shared.config.partial_pay, &price, ran, lot.segment_seconds),
        None => price,
    };
    #[cfg(feature = "fault-injection")]
    crate::fault::stall_before_settlement().await;
    let paid = settled_segment(lot, result, price, partial_ms);
    let recorded = match record(shared, status, paid.clone()).await? {
        Recording::Recorded(recorded) => recorded,
        Recording::NotOpen(why) => {
            tracing::warn!(%why, "the attempt is no longer open in the job's record; not paid");
            metrics::refused("result", "lot-not-open");
            return Ok(false);
        }
    };
    #[cfg(feature = "fault-injection")]
    crate::fault::crash_before_payment();
    // The record as written (its `awarded` filled in from the open lot).
    let paid = recorded
        .payments()
        .find(|s| (s.segment, s.attempt) == (paid.segment, paid.attempt))
        .cloned()
        .unwrap_or(paid);
    if let vmlot_ledger::Recorded::Before(_) = pay_and_post(shared, &recorded, &paid).await? {
        tracing::warn!("segment was already paid; no second payment");
    }
    let winner = paid.provider;
    let losers: Vec<ProviderId> = status
        .open_lot
        .iter()
        .flat_map(|open| open.awarded.iter().map(|(p, _)| *p))
        .filter(|p| *p != winner)
        .collect();
    cancel::attempt(shared, lot.lot, &losers, &format!("segment settled by {winner}")).await;
    tracing::info!(provider = %winner, amount = %paid.price, "settled");
    metrics::settled(result, received, partial_ms.is_some());
    Ok(true)
}
