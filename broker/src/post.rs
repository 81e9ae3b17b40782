//! Where a pending payment is posted: a segment's settlement waits in its
//! provider's pending account until the next segment's provider has
//! restored the checkpoint it produced (a result of the next segment was
//! accepted) or the job has ended; then it is posted (the provider is
//! paid, less the fee) and the job records it. Each post is written once
//! (its subject takes one message), so a broker that died between posting
//! and recording posts again harmlessly and records it.

use std::sync::Arc;

use tracing::Instrument;
use vmlot_schemas::market::JobStatus;

use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::shared::Shared;
use crate::state::UpdateError;

/// Posts every payment of `status` that is due ([`lifecycle::due_posts`])
/// and records each in the job.
pub(crate) async fn due(shared: &Arc<Shared>, status: &JobStatus) -> Result<(), BrokerError> {
    for settled in lifecycle::due_posts(status) {
        let (segment, attempt) = (settled.segment, settled.attempt);
        let span = tracing::info_span!("post", segment, attempt, provider = %settled.provider);
        async {
            let Some(payment) = shared.books.settlement(status.job, segment, attempt).await? else {
                return Err(BrokerError::nats(
                    "post",
                    format!(
                        "segment {segment} (attempt {attempt}) is settled in the job but not on the books"
                    ),
                ));
            };
            let recorded = shared.books.post(&payment, shared.config.fee_rate).await?;
            if recorded.tx().kind != vmlot_schemas::ledger::TxKind::Post {
                return Err(BrokerError::nats(
                    "post",
                    format!(
                        "segment {segment} (attempt {attempt})'s payment was voided, yet the job keeps it"
                    ),
                ));
            }
            match shared
                .jobs
                .transition(&status.job, move |s| lifecycle::posted(s, segment))
                .await
            {
                Ok(_) | Err(UpdateError::Refused(Refused::NotPending(_))) => {
                    tracing::info!(amount = %payment.amount, "posted");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
        .instrument(span)
        .await?;
    }
    Ok(())
}
