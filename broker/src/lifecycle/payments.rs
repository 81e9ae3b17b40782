//! How a settled segment's pending payment resolves: posted once another
//! provider continued from its checkpoint (or the job ended), or voided
//! when enough providers could not restore it.

use vmlot_schemas::ProviderId;
use vmlot_schemas::market::{GuestState, JobStatus, Lot, ResultCheck, SettledSegment};

use super::{Refused, running};

/// The payments that are due to be posted: each settled segment whose
/// checkpoint another provider continued from (a later segment was run,
/// from a checkpoint descending from it, by a provider other than the one
/// before it, or by two agreeing replicas), those that wait for no
/// continuation ([`awaits_continuation`]), and, once the job has ended,
/// every one left.
/// A provider continuing from its own
/// checkpoint proves nothing: a run of segments by one provider stays
/// pending until someone else restores where it ended, or the check
/// restore does ([`check_due`]; never awarded to that provider).
pub fn due_posts(status: &JobStatus) -> Vec<&SettledSegment> {
    if status.state.is_final() {
        return status.payments().filter(|s| !s.posted).collect();
    }
    let settled = &status.settled;
    let quorum = status.spec.check == ResultCheck::Quorum;
    let continued = (1..settled.len())
        .rev()
        .find(|&j| settled[j].provider != settled[j - 1].provider || (quorum && !settled[j].unreplicated))
        .unwrap_or(0);
    settled
        .iter()
        .enumerate()
        .filter(|(i, s)| !s.posted && (*i < continued || !awaits_continuation(status, s)))
        .map(|(_, s)| s)
        .collect()
}

/// True when `settled`'s payment waits for another provider to continue
/// from its checkpoint: every segment under a continuation check, and
/// under a quorum check one that adaptive replication left to a single
/// provider (nobody compared it). A quorum's agreed segment and a job
/// checked by nobody are paid at once.
pub fn awaits_continuation(status: &JobStatus, settled: &SettledSegment) -> bool {
    match status.spec.check {
        ResultCheck::Continuation => true,
        ResultCheck::Quorum => settled.unreplicated,
        ResultCheck::None => false,
    }
}

/// The provider that may not take `lot`'s award although nothing else
/// bars it: for the check restore, the one whose checkpoint it checks.
pub fn checked_provider(status: &JobStatus, lot: &Lot) -> Option<ProviderId> {
    lot.check
        .then(|| status.settled.last().map(|last| last.provider))
        .flatten()
}

/// **Posted**: a settled segment's (or the check restore's) pending
/// payment went on to its provider. Applies to an ended job too; a repeat
/// is refused.
pub fn posted(status: &JobStatus, segment: u32) -> Result<JobStatus, Refused> {
    let mut next = status.clone();
    let mut payments = next.settled.iter_mut().chain(next.check.as_mut());
    match payments.find(|s| s.segment == segment) {
        Some(settled) if !settled.posted => settled.posted = true,
        _ => return Err(Refused::NotPending(segment)),
    }
    Ok(next)
}

/// **Restore failed**: `provider`, awarded the open attempt, reports that
/// the job's checkpoint does not restore on its hypervisor. It is not
/// awarded this checkpoint again (another provider's word is what counts);
/// see [`void_due`] for what enough such reports do. A repeat is refused.
pub fn restore_failed(status: &JobStatus, provider: ProviderId) -> Result<JobStatus, Refused> {
    running(status)?;
    if status.restore_failures.contains(&provider) {
        return Err(Refused::AlreadyReported(provider));
    }
    let mut next = status.clone();
    next.restore_failures.push(provider);
    Ok(next)
}

/// The settled segment whose payment is due to be voided: the last one,
/// still pending, whose checkpoint (the job's current one) `quorum`
/// distinct providers could not restore.
pub fn void_due(status: &JobStatus, quorum: usize) -> Option<&SettledSegment> {
    if status.state.is_final() || status.restore_failures.len() < quorum.max(1) {
        return None;
    }
    status
        .settled
        .last()
        .filter(|last| !last.posted && matches!(last.guest, GuestState::Running { .. }))
}

/// **Voided**: the last settled segment's pending payment went back to the
/// escrow because its checkpoint does not restore. The job goes back to
/// where that segment started (its attempts go on from the voided one, so
/// the next attempt's settlement has a subject of its own), and the
/// provider that produced it is not awarded this job again.
pub fn void(status: &JobStatus, segment: u32) -> Result<JobStatus, Refused> {
    running(status)?;
    let Some(last) = status
        .settled
        .last()
        .filter(|l| l.segment == segment && !l.posted)
    else {
        return Err(Refused::NotPending(segment));
    };
    let mut next = status.clone();
    next.checkpoint = match status.settled.len() {
        0 | 1 => vmlot_schemas::market::Checkpoint {
            machine_state: None,
            disks: status.spec.image.disks.clone(),
            stored_bytes: status.checkpoint.stored_bytes,
            memory: None,
        },
        n => match status.settled[n - 2].guest.state() {
            Some(before) => before.clone(),
            None => return Err(Refused::NotPending(segment)),
        },
    };
    next.spent.amount -= last.price.amount;
    next.attempts = last.attempt;
    if !next.refused.contains(&last.provider) {
        next.refused.push(last.provider);
    }
    next.settled.pop();
    next.open_lot = None;
    next.restore_failures.clear();
    next.waiting_for_providers = false;
    Ok(next)
}
