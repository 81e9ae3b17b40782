//! The settlement's records: the ledger's [`Settlement`] the broker builds
//! for a paid result (`payment`), the job's settled segment read back from
//! one (`settled_segment`, applied once by `apply`), and the payment a
//! broker that died between paying and recording finds before it offers
//! the segment again (`resume_paid`).

use std::sync::Arc;

use chrono::Utc;
use tracing::Instrument;
use vmlot_schemas::Money;
use vmlot_schemas::ledger::Settlement;
use vmlot_schemas::market::{JobStatus, Lot, SegmentResult, SettledSegment};

use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::shared::Shared;
use crate::state::UpdateError;

/// Before offering the job's next segment: a payment for its open attempt
/// written before a crash settles it, and is not paid again. True when one
/// was applied. (Only the open attempt can have been paid: a result is
/// settled only for the attempt the record holds open.)
pub(crate) async fn resume_paid(shared: &Arc<Shared>, status: &JobStatus) -> Result<bool, BrokerError> {
    let segment = lifecycle::next_segment(status);
    let Some(open) = status
        .open_lot
        .as_ref()
        .filter(|open| open.lot.segment == segment)
    else {
        return Ok(false);
    };
    let Some(payment) = shared
        .books
        .settlement(status.job, segment, open.lot.attempt)
        .await?
    else {
        return Ok(false);
    };
    let span = tracing::info_span!(
        "resume",
        segment,
        lot = %payment.lot,
        attempt = payment.attempt,
        provider = %payment.provider
    );
    async {
        tracing::info!("segment already paid; applying the recorded settlement");
        apply(shared, &payment).await
    }
    .instrument(span)
    .await?;
    Ok(true)
}

/// The settlement the broker writes for `result` settling `lot` at `price`.
pub(super) fn payment(status: &JobStatus, lot: &Lot, result: &SegmentResult, price: Money) -> Settlement {
    Settlement {
        job: status.job,
        segment: lot.segment,
        lot: lot.lot,
        attempt: lot.attempt,
        provider: result.provider,
        payer: status.spec.account.clone(),
        amount: price,
        at: Utc::now(),
        guest: result.guest.clone(),
        console: result.console,
        timings: result.timings,
        fetched_bytes: result.fetched_bytes,
        sent_bytes: result.sent_bytes,
        finished_at: result.finished_at,
        partial_ms: None,
    }
}

/// The settled segment a payment records in its job (its `awarded` is
/// filled by [`lifecycle::settle`] from the job's open lot).
fn settled_segment(payment: &Settlement) -> SettledSegment {
    SettledSegment {
        segment: payment.segment,
        attempt: payment.attempt,
        lot: payment.lot,
        provider: payment.provider,
        awarded: Vec::new(),
        price: payment.amount.clone(),
        guest: payment.guest.clone(),
        console: payment.console,
        timings: payment.timings,
        fetched_bytes: payment.fetched_bytes,
        sent_bytes: payment.sent_bytes,
        settled_at: payment.at,
        posted: false,
        unreplicated: false,
        partial_ms: payment.partial_ms,
    }
}

/// Records a paid segment in the job (once: a repeat finds it applied).
pub(super) async fn apply(shared: &Shared, payment: &Settlement) -> Result<(), BrokerError> {
    let paid = settled_segment(payment);
    match shared
        .jobs
        .transition(&payment.job, move |s| lifecycle::settle(s, paid.clone()))
        .await
    {
        Ok(_) | Err(UpdateError::Refused(Refused::AlreadySettled(_) | Refused::NotNextSegment { .. })) => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
