//! A job's life as pure transitions over its record ([`JobStatus`]): each
//! step of the market is a function of the record, the event and the time
//! that returns the next record or a named refusal, with no NATS in sight.
//! The job task (`job`, `offer`, `award`, `settle`, `refund`, `hold`)
//! applies these to the stored record (through `JobStore::transition` in
//! `state`), and [`cancel`] is the job API's, so the rules of a job's life
//! are here, and unit tested, rather than spread through closures.
//!
//! The life of a job, segment by segment:
//!
//! ```text
//! offer ──► bids ──► award ──► results ──► settle ──► (next segment: offer)
//!   ▲        │                   │  └─ check_result refused: no change
//!   │        └─ no winner: wait_for_providers, or end (no bid fits)
//!   └──────────── deadline_passed ◄──┘
//! before each offer: ending (count reached → Done, budget spent → BudgetSpent)
//! count reached, last payment pending: check_due → one more lot, the
//!   check restore of the last checkpoint; its result accepted → Done
//! settle: guest halted → Done, guest crashed → Failed
//! partial (its provider's owner preempted it): settled like a segment,
//!   not counted as one (full_segments); the next lot runs the rest
//!   (segment_seconds), never on the provider preempted (preempted_by)
//! posted: a settled segment's payment, once another provider continued
//!   from its checkpoint or the job ended (due_posts says which)
//! restore_failed: an awarded provider could not restore the checkpoint;
//!   at the quorum (void_due) → void: the last segment unsettled, the job
//!   back at its input, its provider refused
//! quorum check: award keeps standby bidders; replicas that disagree get
//!   add_replica (a tie-breaker); the first of two agreeing results settles
//! cancel → Cancelled; withdraw_lot; once final: refunded
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vmlot_schemas::market::INSTRUCTIONS_PER_SECOND;
use vmlot_schemas::market::{
    GuestState, JobState, JobStatus, Lot, OpenLot, ResultCheck, SegmentCount, SegmentResult, SettledSegment,
};
use vmlot_schemas::{HypervisorKind, LotId, Money, ProviderId, WIRE_VERSION};

/// Why a job ends before its next segment is offered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The job's segment count was reached.
    SegmentsRan(u32),
    /// Its submitter (or the operator) stopped it: this many segments ran.
    Stopped(u32),
    /// The segments ran, but no bid for the check restore of the last
    /// checkpoint fits what is left of the budget: its payment is posted
    /// unchecked.
    CheckUnaffordable(u32),
    /// Nothing is left of the budget.
    BudgetSpent,
    /// Bids came, and every one was above what is left of the budget.
    NoBidFits,
    /// The budget could not be held in escrow (a broker that died between
    /// writing the job and holding its budget found the funds gone).
    Unfunded(String),
}

impl Ending {
    /// The final state the job ends in.
    pub fn state(&self) -> JobState {
        match self {
            Ending::SegmentsRan(_) | Ending::Stopped(_) | Ending::CheckUnaffordable(_) => JobState::Done,
            Ending::BudgetSpent | Ending::NoBidFits => JobState::BudgetSpent,
            Ending::Unfunded(_) => JobState::Failed,
        }
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::SegmentsRan(n) => write!(f, "all {n} segments ran"),
            Ending::Stopped(n) => write!(f, "stopped after {n} segments"),
            Ending::CheckUnaffordable(n) => write!(
                f,
                "all {n} segments ran; no check restore of the last checkpoint fits the remaining budget"
            ),
            Ending::BudgetSpent => f.write_str("budget spent"),
            Ending::NoBidFits => f.write_str("no bid fits the remaining budget"),
            Ending::Unfunded(why) => f.write_str(why),
        }
    }
}

/// Why a transition does not apply to a job as it stands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The job is done, failed, cancelled or out of budget: nothing more happens to it.
    #[error("job already ended ({0:?})")]
    Final(JobState),
    /// Only an ended job is refunded.
    #[error("job still running")]
    StillRunning,
    #[error("the job's escrow is already refunded")]
    AlreadyRefunded,
    /// The job ends instead of offering another segment.
    #[error("the job ends: {0}")]
    Ends(Ending),
    #[error("the job has no open lot")]
    NoOpenLot,
    #[error("the job's results are not checked by a quorum")]
    NotQuorum,
    /// The open lot is awarded and its deadline has not passed: wait for it.
    #[error("lot {lot} is awarded until {deadline}")]
    AwardPending { lot: LotId, deadline: DateTime<Utc> },
    /// A lot, result or payment for a segment other than the job's next one.
    #[error("segment {got} is not the job's next segment ({next})")]
    NotNextSegment { next: u32, got: u32 },
    /// An award for an attempt other than the segment's next one.
    #[error("attempt {got} is not the segment's next attempt ({next})")]
    NotNextAttempt { next: u32, got: u32 },
    /// A lot of another job.
    #[error("lot is not one of this job's")]
    OtherJob,
    /// An award with no winner.
    #[error("an award needs at least one winner")]
    NoWinner,
    /// A result for an attempt that is not the open one.
    #[error("result does not match the open lot (job, segment or attempt)")]
    NotOpen,
    #[error("provider was not awarded this lot")]
    NotAwarded(ProviderId),
    /// A payment applied again (a repeat finds it applied).
    #[error("segment {0} is already settled")]
    AlreadySettled(u32),
    /// A provider refused once, refused again (a repeat changes nothing).
    #[error("provider {0} is already refused for this job")]
    AlreadyRefused(ProviderId),
    /// A provider whose result for this job was refused is not awarded again.
    #[error("provider {0} sent this job a result that was refused")]
    Excluded(ProviderId),
    /// The check restore awarded to the provider whose checkpoint it checks.
    #[error("provider {0} cannot check its own checkpoint")]
    OwnCheckpoint(ProviderId),
    /// A post or void of a segment that is not settled, or is resolved already.
    #[error("segment {0} has no pending payment")]
    NotPending(u32),
    /// A second report from one provider that the checkpoint does not restore.
    #[error("provider {0} already reported that this checkpoint does not restore")]
    AlreadyReported(ProviderId),
    /// A restore failure settles nothing.
    #[error("a result whose checkpoint did not restore settles nothing")]
    NothingRan,
}

fn running(status: &JobStatus) -> Result<(), Refused> {
    if status.state.is_final() {
        return Err(Refused::Final(status.state));
    }
    Ok(())
}

/// The segment the job runs next (0-based).
pub fn next_segment(status: &JobStatus) -> u32 {
    status.settled.len() as u32
}

/// What is left of the job's budget.
pub fn remaining(status: &JobStatus) -> Money {
    Money::new(
        status.spec.budget.amount - status.spent.amount,
        status.spec.budget.unit.clone(),
    )
}

/// Segment count reached (and the last checkpoint checked, or no check
/// possible) or budget spent: the job ends before offering another lot.
pub fn ending(status: &JobStatus) -> Option<Ending> {
    let budget_left = remaining(status).amount > Decimal::ZERO;
    if let Some(n) = segment_limit(status)
        && status.full_segments() >= n
    {
        if check_due(status) && budget_left {
            return None;
        }
        return Some(match status.stop_after {
            Some(stop) if stop == n => Ending::Stopped(n),
            _ => Ending::SegmentsRan(n),
        });
    }
    if !budget_left {
        return Some(Ending::BudgetSpent);
    }
    None
}

/// How many segments the job runs at most: its count, or fewer once it
/// was stopped (`None`: until the guest halts).
pub fn segment_limit(status: &JobStatus) -> Option<u32> {
    let count = match status.spec.segments {
        SegmentCount::Count(n) => Some(n),
        SegmentCount::UntilHalt => None,
    };
    match (count, status.stop_after) {
        (Some(n), Some(stop)) => Some(n.min(stop)),
        (n, stop) => n.or(stop),
    }
}

/// True when the job's segments have all run and the checkpoint the last
/// one produced waits for a check restore ([`Lot::check`]): its payment is
/// pending, the guest still runs, and no check was accepted yet.
pub fn check_due(status: &JobStatus) -> bool {
    let Some(n) = segment_limit(status) else {
        return false;
    };
    !status.state.is_final()
        && status.check.is_none()
        && status.full_segments() >= n
        && status.settled.last().is_some_and(|last| {
            !last.posted
                && awaits_continuation(status, last)
                && matches!(last.guest, GuestState::Running { .. })
        })
}

/// How long the job's next segment runs: its length, or what partial
/// segments left of it ([`crate::partial::rest_seconds`]).
pub fn segment_seconds(status: &JobStatus) -> u32 {
    match status.partial_ms() {
        0 => status.spec.segment_seconds,
        ran => crate::partial::rest_seconds(status.spec.segment_seconds, ran),
    }
}

/// The provider whose owner preempted the job's last segment: it is not
/// awarded the rest (an honest one does not bid while its owner is busy;
/// one that saves early on purpose cannot hold a job in tiny steps).
pub fn preempted_by(status: &JobStatus) -> Option<ProviderId> {
    status
        .settled
        .last()
        .filter(|last| last.partial_ms.is_some())
        .map(|last| last.provider)
}

/// True when the job's segments are counts of guest instructions: a
/// quorum job on QEMU (whose replicas must end in the same state).
pub fn deterministic(status: &JobStatus) -> bool {
    status.spec.check == ResultCheck::Quorum && status.spec.image.vm.hypervisor == HypervisorKind::Qemu
}

/// The job's open lot if it is awarded and its deadline has not passed at
/// `now`: the job waits for its results instead of offering again.
pub fn live_award(status: &JobStatus, now: DateTime<Utc>) -> Option<&OpenLot> {
    status
        .open_lot
        .as_ref()
        .filter(|open| !open.awarded.is_empty() && open.award_deadline.is_some_and(|deadline| deadline > now))
}

/// **Offer**: a new attempt at the job's next segment, taking bids for
/// `bid_window` from `now`. Invitations (`shards`, `invited`) are left
/// empty for the offer step to fill. The record does not change: nothing is
/// recorded before the award, so a lot that dies with the broker during its
/// bid window was never awarded and is simply offered anew.
///
/// Once the segments have all run ([`check_due`]) the lot is the check
/// restore of the last checkpoint: it runs for `check_seconds` (never
/// longer than a segment).
pub fn offer(
    status: &JobStatus,
    lot: LotId,
    now: DateTime<Utc>,
    bid_window: Duration,
    check_seconds: u32,
) -> Result<Lot, Refused> {
    running(status)?;
    if let Some(ending) = ending(status) {
        return Err(Refused::Ends(ending));
    }
    let check = check_due(status);
    let segment_seconds = if check {
        check_seconds.min(status.spec.segment_seconds)
    } else {
        segment_seconds(status)
    };
    if let Some(open) = live_award(status, now) {
        return Err(Refused::AwardPending {
            lot: open.lot.lot,
            deadline: open.award_deadline.unwrap_or(now),
        });
    }
    Ok(Lot {
        version: WIRE_VERSION,
        lot,
        job: status.job,
        segment: next_segment(status),
        attempt: status.attempts + 1,
        image: status.spec.image.clone(),
        checkpoint: status.checkpoint.clone(),
        segment_seconds,
        reserve_price: status.spec.reserve_price.clone(),
        bid_deadline: now + chrono::Duration::from_std(bid_window).unwrap_or_default(),
        shards: None,
        invited: Vec::new(),
        check,
        instructions: deterministic(status).then(|| u64::from(segment_seconds) * INSTRUCTIONS_PER_SECOND),
    })
}

/// **Award**: the auction's winners of `lot`, with their prices, are
/// recorded with the deadline for their results; this attempt becomes the
/// segment's latest.
pub fn award(
    status: &JobStatus,
    lot: &Lot,
    winners: &[(ProviderId, Money)],
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<JobStatus, Refused> {
    running(status)?;
    if lot.job != status.job {
        return Err(Refused::OtherJob);
    }
    if lot.segment != next_segment(status) {
        return Err(Refused::NotNextSegment {
            next: next_segment(status),
            got: lot.segment,
        });
    }
    if lot.attempt != status.attempts + 1 {
        return Err(Refused::NotNextAttempt {
            next: status.attempts + 1,
            got: lot.attempt,
        });
    }
    if winners.is_empty() {
        return Err(Refused::NoWinner);
    }
    if let Some(ends) = ending(status) {
        // Stopped while its lot took bids.
        return Err(Refused::Ends(ends));
    }
    if let Some((p, _)) = winners
        .iter()
        .find(|(p, _)| status.refused.contains(p) || status.restore_failures.contains(p))
    {
        return Err(Refused::Excluded(*p));
    }
    if let Some(own) = checked_provider(status, lot)
        && winners.iter().any(|(p, _)| *p == own)
    {
        return Err(Refused::OwnCheckpoint(own));
    }
    let mut next = status.clone();
    next.open_lot = Some(OpenLot {
        lot: lot.clone(),
        awarded: winners.to_vec(),
        award_deadline: Some(deadline),
        awarded_at: Some(now),
        standby: Vec::new(),
        unreplicated: false,
    });
    next.attempts = lot.attempt;
    next.waiting_for_providers = false;
    Ok(next)
}

/// **Result refused**: `provider` sent a result for this job that failed
/// its checks; it is never awarded one of the job's lots again. Its award
/// stays in the open lot (its slot is its own problem), so the other
/// replicas can still settle. A repeat changes nothing.
pub fn refuse_provider(status: &JobStatus, provider: ProviderId) -> Result<JobStatus, Refused> {
    running(status)?;
    if status.refused.contains(&provider) {
        return Err(Refused::AlreadyRefused(provider));
    }
    let mut next = status.clone();
    next.refused.push(provider);
    Ok(next)
}

/// True when every provider awarded the open attempt has had a result
/// refused for this job: no valid result can come, so the attempt is over
/// before its deadline.
pub fn all_awarded_refused(status: &JobStatus) -> bool {
    status.open_lot.as_ref().is_some_and(|open| {
        !open.awarded.is_empty() && open.awarded.iter().all(|(p, _)| status.refused.contains(p))
    })
}

/// **Waiting for providers**: an offer drew no bid, or only bids from
/// providers with no free slot; no lot is open until the next offer.
pub fn wait_for_providers(status: &JobStatus) -> Result<JobStatus, Refused> {
    running(status)?;
    let mut next = status.clone();
    next.open_lot = None;
    next.waiting_for_providers = true;
    Ok(next)
}

/// **Deadline passed**: the open attempt's deadline went by with no valid
/// result; its lot is no longer open and the next offer is a new attempt
/// (the attempt count keeps this one).
pub fn deadline_passed(status: &JobStatus, now: DateTime<Utc>) -> Result<JobStatus, Refused> {
    running(status)?;
    let Some(open) = &status.open_lot else {
        return Err(Refused::NoOpenLot);
    };
    if let Some(live) = live_award(status, now) {
        return Err(Refused::AwardPending {
            lot: open.lot.lot,
            deadline: live.award_deadline.unwrap_or(now),
        });
    }
    let mut next = status.clone();
    next.open_lot = None;
    Ok(next)
}

/// **Lot withdrawn**: the job's open lot is dropped without a result (its
/// providers were told to stop after a cancel, or none of them took the
/// award). Applies to an ended job too.
pub fn withdraw_lot(status: &JobStatus) -> Result<JobStatus, Refused> {
    if status.open_lot.is_none() {
        return Err(Refused::NoOpenLot);
    }
    let mut next = status.clone();
    next.open_lot = None;
    Ok(next)
}

/// **Result received**: whether `result` can settle the job's open
/// attempt, and the price owed to its provider if it does. A refusal is
/// the "result refused" transition: the record does not change. (The
/// checkpoint is verified against the store on top of this, by `verify`.)
pub fn check_result(status: &JobStatus, result: &SegmentResult) -> Result<Money, Refused> {
    running(status)?;
    let Some(open) = &status.open_lot else {
        return Err(Refused::NoOpenLot);
    };
    let lot = &open.lot;
    if result.lot != lot.lot
        || result.job != lot.job
        || result.segment != lot.segment
        || result.attempt != lot.attempt
    {
        return Err(Refused::NotOpen);
    }
    if status.refused.contains(&result.provider) {
        return Err(Refused::Excluded(result.provider));
    }
    match open.awarded.iter().find(|(p, _)| *p == result.provider) {
        Some((_, price)) => Ok(price.clone()),
        None => Err(Refused::NotAwarded(result.provider)),
    }
}

/// **Result accepted**: a settled segment is recorded, before it is paid
/// (its `awarded` is taken from the open lot it settles), the spend grows,
/// the open lot closes and the checkpoint advances; a halted guest ends
/// the job done, a crashed one failed. An ended job whose lot is still
/// open (a cancel not yet told to its providers) records it too, and
/// keeps its final state. Only the open attempt settles: a repeat, or a
/// result for an attempt no longer open, is refused and changes nothing.
pub fn settle(status: &JobStatus, mut paid: SettledSegment) -> Result<JobStatus, Refused> {
    if matches!(paid.guest, GuestState::RestoreFailed { .. }) {
        return Err(Refused::NothingRan);
    }
    let next_segment = next_segment(status);
    if paid.segment < next_segment || (status.check.is_some() && paid.segment == next_segment) {
        return Err(Refused::AlreadySettled(paid.segment));
    }
    if paid.segment > next_segment {
        return Err(Refused::NotNextSegment {
            next: next_segment,
            got: paid.segment,
        });
    }
    // Only the attempt open in the record settles: a task holding an
    // older copy of the record (its broker stalled past its lease, and
    // another took the job on) is refused here, before anything is paid.
    let Some(open) = status
        .open_lot
        .as_ref()
        .filter(|open| open.lot.lot == paid.lot && open.lot.attempt == paid.attempt)
    else {
        return Err(Refused::NotOpen);
    };
    paid.awarded = open.awarded.iter().map(|(p, _)| *p).collect();
    paid.unreplicated = open.unreplicated;
    let mut next = status.clone();
    next.spent.amount += paid.price.amount;
    next.open_lot = None;
    next.attempts = 0;
    next.waiting_for_providers = false;
    next.restore_failures.clear();
    if let Some(n) = segment_limit(status)
        && status.full_segments() >= n
    {
        // The check restore: the last checkpoint restored and ran; the
        // job ends with that checkpoint, not the check's.
        if !next.state.is_final() {
            let ended = match status.stop_after {
                Some(stop) if stop == n => Ending::Stopped(n),
                _ => Ending::SegmentsRan(n),
            };
            next.state = JobState::Done;
            next.end_reason = Some(format!(
                "{ended}; the last checkpoint restored on {}",
                paid.provider
            ));
        }
        next.check = Some(paid);
        return Ok(next);
    }
    if !next.state.is_final() {
        match &paid.guest {
            GuestState::Running { checkpoint } => next.checkpoint = checkpoint.clone(),
            GuestState::Halted { final_state } => {
                next.state = JobState::Done;
                next.end_reason = Some("guest halted".into());
                if let Some(last) = final_state {
                    next.checkpoint = last.clone();
                }
            }
            GuestState::Crashed { reason, final_state } => {
                if let Some(last) = final_state {
                    next.checkpoint = last.clone();
                }
                next.state = JobState::Failed;
                next.end_reason = Some(format!("guest crashed: {reason}"));
            }
            GuestState::RestoreFailed { .. } => return Err(Refused::NothingRan),
        }
    }
    next.settled.push(paid);
    Ok(next)
}

/// **End**: segment count reached, budget spent, no bid within the budget,
/// or the budget never held. The open lot closes.
pub fn end(status: &JobStatus, ending: Ending) -> Result<JobStatus, Refused> {
    running(status)?;
    let mut next = status.clone();
    next.state = ending.state();
    next.end_reason = Some(ending.to_string());
    next.open_lot = None;
    Ok(next)
}

/// **Stop**: the job runs no segment after the one running now (none
/// running: no further one), then ends done with that segment's
/// checkpoint (under a continuation check, after its check restore). A
/// repeat changes nothing; an ended job is refused.
pub fn stop(status: &JobStatus) -> Result<JobStatus, Refused> {
    running(status)?;
    if status.stop_after.is_some() {
        return Ok(status.clone());
    }
    let running_now = status
        .open_lot
        .as_ref()
        .is_some_and(|open| !open.awarded.is_empty() && !open.lot.check);
    let mut next = status.clone();
    next.stop_after = Some(status.full_segments() + u32::from(running_now));
    Ok(next)
}

/// **Cancel**: the submitter stops a running job. Its open lot stays in the
/// record until the job task has told the awarded providers to stop.
pub fn cancel(status: &JobStatus) -> Result<JobStatus, Refused> {
    running(status)?;
    let mut next = status.clone();
    next.state = JobState::Cancelled;
    next.end_reason = Some("cancelled by the submitter".into());
    Ok(next)
}

/// **Refunded**: what was left in an ended job's escrow went back to the
/// submitter.
pub fn refunded(status: &JobStatus) -> Result<JobStatus, Refused> {
    if !status.state.is_final() {
        return Err(Refused::StillRunning);
    }
    if status.refunded {
        return Err(Refused::AlreadyRefunded);
    }
    let mut next = status.clone();
    next.refunded = true;
    Ok(next)
}

mod payments;
mod replicas;

pub use payments::{
    awaits_continuation, checked_provider, due_posts, posted, restore_failed, void, void_due,
};
pub use replicas::{add_replica, drop_standby, standby, unreplicated};

#[cfg(test)]
mod tests;
