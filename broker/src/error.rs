//! The broker's one error type: what ends a job task's pass (it resumes
//! from its record) or stops the broker at start.

use vmlot_cas::CasError;

use crate::lifecycle::Refused;

/// Errors that stop the broker, or one pass of a job task.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("block store: {0}")]
    Store(#[from] CasError),
    #[error("NATS {op}: {reason}")]
    Nats { op: &'static str, reason: String },
    #[error("ledger: {0}")]
    Ledger(#[from] vmlot_ledger::LedgerError),
    /// A step the job's record did not allow (see [`crate::lifecycle`]).
    #[error("job record: {0}")]
    Lifecycle(#[from] Refused),
    #[error(transparent)]
    Metrics(#[from] vmlot_telemetry::EndpointError),
}

impl BrokerError {
    pub(crate) fn nats(op: &'static str, err: impl std::fmt::Display) -> Self {
        BrokerError::Nats {
            op,
            reason: err.to_string(),
        }
    }
}
