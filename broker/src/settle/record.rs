//! The settlement's records, in the order they are written: the job's
//! settled segment first (`settled_segment`, recorded by `record` with a
//! compare-and-set on the job, so one result settles an attempt and only
//! while that attempt is open), then the ledger's [`Settlement`] built
//! from it (`payment`, written by `pay`, once: its id is derived from job,
//! segment and attempt). A broker that died between the two, or a task
//! that found the segment settled by another, pays what the record holds
//! before the job moves on (`pay_recorded`).
//!
//! The record is the fence, not the books: two tasks that each believe
//! they run a job (a broker that stalled past its lease and the one that
//! took the job over) may each hold an attempt open in their copy, but
//! only one can record a settlement for the segment, and a payment is
//! only ever written for a recorded one.

use std::sync::Arc;

use chrono::Utc;
use vmlot_ledger::Recorded;
use vmlot_schemas::Money;
use vmlot_schemas::ledger::Settlement;
use vmlot_schemas::market::{JobStatus, Lot, SegmentResult, SettledSegment};

use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::metrics;
use crate::shared::Shared;
use crate::state::UpdateError;

/// The settled segment `result` makes of `lot` at `price` (its `awarded`
/// is filled by [`lifecycle::settle`] from the job's open lot).
pub(super) fn settled_segment(
    lot: &Lot,
    result: &SegmentResult,
    price: Money,
    partial_ms: Option<u64>,
) -> SettledSegment {
    SettledSegment {
        segment: lot.segment,
        attempt: lot.attempt,
        lot: lot.lot,
        provider: result.provider,
        awarded: Vec::new(),
        price,
        guest: result.guest.clone(),
        console: result.console,
        timings: result.timings,
        fetched_bytes: result.fetched_bytes,
        sent_bytes: result.sent_bytes,
        settled_at: Utc::now(),
        finished_at: Some(result.finished_at),
        posted: false,
        unreplicated: false,
        partial_ms,
    }
}

/// Whether recording a settled segment made it the job's.
pub(super) enum Recording {
    /// The job's record now holds it: the record as written.
    Recorded(Box<JobStatus>),
    /// The attempt is no longer open in the job's record (another result,
    /// or another broker's task, settled the segment first, or the attempt
    /// was closed): nothing is recorded, nothing is paid.
    NotOpen(Refused),
}

/// Records `paid` in its job, if the attempt it settles is still open.
pub(super) async fn record(
    shared: &Shared,
    status: &JobStatus,
    paid: SettledSegment,
) -> Result<Recording, BrokerError> {
    match shared
        .jobs
        .transition(&status.job, move |s| lifecycle::settle(s, paid.clone()))
        .await
    {
        Ok(next) => Ok(Recording::Recorded(Box::new(next))),
        Err(UpdateError::Refused(
            why @ (Refused::NotOpen | Refused::AlreadySettled(_) | Refused::NotNextSegment { .. }),
        )) => Ok(Recording::NotOpen(why)),
        Err(e) => Err(e.into()),
    }
}

/// The payment the books hold for `paid`, a settled segment of `status`.
fn payment(status: &JobStatus, paid: &SettledSegment) -> Settlement {
    Settlement {
        job: status.job,
        segment: paid.segment,
        lot: paid.lot,
        attempt: paid.attempt,
        provider: paid.provider,
        payer: status.spec.account.clone(),
        amount: paid.price.clone(),
        at: paid.settled_at,
        guest: paid.guest.clone(),
        console: paid.console,
        timings: paid.timings,
        fetched_bytes: paid.fetched_bytes,
        sent_bytes: paid.sent_bytes,
        finished_at: paid.finished_at.unwrap_or(paid.settled_at),
        partial_ms: paid.partial_ms,
    }
}

/// Writes the payment for `paid`, a settled segment the job's record
/// holds, from the job's escrow into its provider's pending account
/// (once: a repeat finds it written).
pub(super) async fn pay(
    shared: &Shared,
    status: &JobStatus,
    paid: &SettledSegment,
) -> Result<Recorded, BrokerError> {
    let recorded = shared.books.settle(payment(status, paid)).await?;
    metrics::payment("settle", &recorded);
    Ok(recorded)
}

/// As [`pay`], with the posts that recording `paid` made due
/// ([`lifecycle::due_posts`] of `recorded`, the job's record as it now
/// stands: the segment before it, once another provider continued from
/// its checkpoint) written in the same batch, and then marked posted in
/// the job's record. The ledger stream commits atomic batches one after
/// another, so a segment's settlement and the post it triggers cost one
/// batch instead of two. A post whose settlement is not on the books yet
/// is left for [`crate::resolve::due`], as is everything when a void is
/// due instead.
pub(super) async fn pay_and_post(
    shared: &Shared,
    recorded: &JobStatus,
    paid: &SettledSegment,
) -> Result<Recorded, BrokerError> {
    if lifecycle::void_due(recorded, shared.config.restore_quorum).is_some() {
        return pay(shared, recorded, paid).await;
    }
    let mut posts = Vec::new();
    for due in lifecycle::due_posts(recorded) {
        let settlement = if (due.segment, due.attempt) == (paid.segment, paid.attempt) {
            Some(payment(recorded, paid))
        } else {
            shared
                .books
                .settlement(recorded.job, due.segment, due.attempt)
                .await?
        };
        if let Some(settlement) = settlement {
            posts.push(settlement);
        }
    }
    let fee_rate = shared.config.fee_rate;
    let mut txs = vec![vmlot_ledger::build::settlement(payment(recorded, paid))];
    txs.extend(posts.iter().map(|s| vmlot_ledger::build::post(s, fee_rate)));
    let mut written = shared.books.record_together(txs).await?.into_iter();
    let settled = written.next().expect("the settlement's answer comes first");
    metrics::payment("settle", &settled);
    for (settlement, post) in posts.iter().zip(written) {
        metrics::payment("post", &post);
        if post.tx().kind == vmlot_schemas::ledger::TxKind::Post {
            crate::resolve::mark_posted(shared, recorded.job, settlement).await?;
        }
    }
    Ok(settled)
}

/// Before the job's next step: its last payment as the record holds it
/// (the last settled segment, or the check restore) is on the books. A
/// broker that died between recording a segment and paying it, or a task
/// whose settlement lost to another's record, pays it here. `on_books`
/// is the last payment this task found on the books (segment, attempt),
/// so each is looked up once.
pub(crate) async fn pay_recorded(
    shared: &Arc<Shared>,
    status: &JobStatus,
    on_books: &mut Option<(u32, u32)>,
) -> Result<(), BrokerError> {
    let Some(last) = status.payments().last() else {
        return Ok(());
    };
    let key = (last.segment, last.attempt);
    if *on_books == Some(key) {
        return Ok(());
    }
    if shared
        .books
        .settlement(status.job, last.segment, last.attempt)
        .await?
        .is_none()
    {
        tracing::info!(
            segment = last.segment,
            attempt = last.attempt,
            provider = %last.provider,
            "segment settled in the job's record but not on the books; paying it"
        );
        pay(shared, status, last).await?;
    }
    *on_books = Some(key);
    Ok(())
}
