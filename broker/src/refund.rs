//! The escrow's last end: when a job is over (done, failed, cancelled,
//! budget spent) what is left in its escrow goes back to the submitter,
//! once; the job record's `refunded` flag says it was done, so a restarted
//! broker finishes a refund it had not recorded.

use std::sync::Arc;

use tracing::Instrument;
use vmlot_schemas::market::JobStatus;

use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::shared::Shared;
use crate::state::UpdateError;

/// Refunds the ended job `status` unless its record says it was.
pub(crate) async fn refund(shared: &Arc<Shared>, status: &JobStatus) -> Result<(), BrokerError> {
    if status.refunded {
        return Ok(());
    }
    async {
        let recorded = shared
            .books
            .refund(status.job, &status.spec.account, &status.spec.budget.unit)
            .await?;
        crate::metrics::payment("refund", &recorded);
        let amount = recorded
            .tx()
            .entries
            .first()
            .map(|e| e.amount)
            .unwrap_or_default();
        tracing::info!(%amount, "escrow refunded");
        match shared.jobs.transition(&status.job, lifecycle::refunded).await {
            Ok(_) | Err(UpdateError::Refused(Refused::AlreadyRefunded)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    .instrument(tracing::info_span!("refund"))
    .await
}
