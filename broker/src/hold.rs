//! The escrow's first end, for a job whose submission did not finish: the
//! API holds the budget at submission, and a broker that died between
//! writing the job record and the hold writes the hold here when the job's
//! task starts (or fails the job if the submitter is short of funds by then).

use std::sync::Arc;

use tracing::Instrument;
use vmlot_schemas::{JobId, subjects};

use crate::error::BrokerError;
use crate::lifecycle::Ending;
use crate::shared::Shared;

/// Makes sure the job's budget is in escrow.
pub(crate) async fn ensure_held(shared: &Arc<Shared>, job: JobId) -> Result<(), BrokerError> {
    if shared
        .books
        .transaction(&subjects::hold_tx(&job))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let Some((status, _)) = shared.jobs.get(&job).await? else {
        return Ok(());
    };
    if status.state.is_final() {
        return Ok(());
    }
    async {
        tracing::info!(budget = %status.spec.budget, "holding the budget the submission did not");
        match shared
            .books
            .hold(job, &status.spec.account, &status.spec.budget)
            .await
        {
            Ok(_) => Ok(()),
            Err(short @ vmlot_ledger::LedgerError::InsufficientFunds { .. }) => {
                shared.jobs.end(&job, Ending::Unfunded(short.to_string())).await
            }
            Err(e) => Err(e.into()),
        }
    }
    .instrument(tracing::info_span!("hold"))
    .await
}
