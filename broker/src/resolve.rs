//! Where a pending payment is resolved. A segment's settlement waits in
//! its provider's pending account until the checkpoint it produced has
//! been restored: it is **posted** (the provider is paid, less the fee)
//! once a result of the next segment is accepted or the job has ended,
//! and **voided** (the price goes back to the escrow) when enough distinct
//! providers could not restore it; the job then goes back to that
//! segment's input and offers it again, and the provider forfeits part of
//! its deposit to the submitter (when the broker asks for deposits). Each
//! post or void is written once, on one subject for both, so a broker that
//! died between writing it and recording it in the job writes it again
//! harmlessly and records it.

use std::sync::Arc;

use tracing::Instrument;
use vmlot_schemas::JobId;
use vmlot_schemas::ledger::{ForfeitCause, Settlement, TxKind};
use vmlot_schemas::market::JobStatus;
use vmlot_schemas::standing::RefusalKind;

use crate::deposit;
use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::shared::Shared;
use crate::standing::Outcome;
use crate::state::UpdateError;

/// Posts every payment of `status` that is due ([`lifecycle::due_posts`]),
/// or voids the one [`lifecycle::void_due`] names, and records it in the
/// job. True when the record changed.
pub(crate) async fn due(shared: &Arc<Shared>, status: &JobStatus) -> Result<bool, BrokerError> {
    if let Some(voided) = lifecycle::void_due(status, shared.config.restore_quorum) {
        let (segment, attempt) = (voided.segment, voided.attempt);
        let span = tracing::info_span!("void", segment, attempt, provider = %voided.provider);
        void(shared, status, segment, attempt).instrument(span).await?;
        return Ok(true);
    }
    let due = lifecycle::due_posts(status);
    let changed = !due.is_empty();
    for settled in due {
        let (segment, attempt) = (settled.segment, settled.attempt);
        let span = tracing::info_span!("post", segment, attempt, provider = %settled.provider);
        post(shared, status, segment, attempt).instrument(span).await?;
    }
    Ok(changed)
}

/// The books' record of a settled segment's payment.
async fn payment(
    shared: &Shared,
    status: &JobStatus,
    segment: u32,
    attempt: u32,
) -> Result<Settlement, BrokerError> {
    shared
        .books
        .settlement(status.job, segment, attempt)
        .await?
        .ok_or_else(|| {
            BrokerError::nats(
                "resolve",
                format!("segment {segment} (attempt {attempt}) is settled in the job but not on the books"),
            )
        })
}

async fn post(shared: &Shared, status: &JobStatus, segment: u32, attempt: u32) -> Result<(), BrokerError> {
    let payment = payment(shared, status, segment, attempt).await?;
    let recorded = shared.books.post(&payment, shared.config.fee_rate).await?;
    crate::metrics::payment("post", &recorded);
    if recorded.tx().kind != TxKind::Post {
        return Err(BrokerError::nats(
            "post",
            format!("segment {segment} (attempt {attempt})'s payment was voided, yet the job keeps it"),
        ));
    }
    mark_posted(shared, status.job, &payment).await
}

/// Records in the job that `payment`'s post is on the books (a repeat
/// finds it recorded).
pub(crate) async fn mark_posted(
    shared: &Shared,
    job: JobId,
    payment: &Settlement,
) -> Result<(), BrokerError> {
    let segment = payment.segment;
    match shared
        .jobs
        .transition(&job, move |s| lifecycle::posted(s, segment))
        .await
    {
        Ok(_) | Err(UpdateError::Refused(Refused::NotPending(_))) => {
            tracing::info!(segment, amount = %payment.amount, "posted");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn void(shared: &Shared, status: &JobStatus, segment: u32, attempt: u32) -> Result<(), BrokerError> {
    let payment = payment(shared, status, segment, attempt).await?;
    let why = format!(
        "its checkpoint did not restore on {} providers",
        status.restore_failures.len()
    );
    let recorded = shared.books.void(&payment, &why).await?;
    crate::metrics::payment("void", &recorded);
    if recorded.tx().kind != TxKind::Void {
        return Err(BrokerError::nats(
            "void",
            format!("segment {segment} (attempt {attempt})'s payment was posted before"),
        ));
    }
    // Before the job moves on: a broker that dies here voids (harmlessly)
    // and forfeits (once) again.
    let cause = ForfeitCause::Unrestorable;
    deposit::forfeit(shared, status, segment, attempt, payment.provider, cause).await;
    match shared
        .jobs
        .transition(&status.job, move |s| lifecycle::void(s, segment))
        .await
    {
        Ok(_) => {
            tracing::warn!(amount = %payment.amount, %why, "voided; the segment runs again from its input");
            shared
                .standings
                .count(
                    payment.provider,
                    Outcome::Refused(RefusalKind::Unrestorable, &why),
                )
                .await;
            Ok(())
        }
        Err(UpdateError::Refused(Refused::NotPending(_))) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
