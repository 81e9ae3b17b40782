//! One job's story in the logs: every market step of a lot runs in a span
//! named after the step and carrying the same five fields (`job`, `lot`,
//! `segment`, `attempt`, `provider`), so filtering on a job id gives its
//! whole life at this provider, step by step.

use tracing::Span;
use vmlot_schemas::market::Lot;
use vmlot_schemas::{JobId, LotId, ProviderId};

/// A market step of the provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Deciding on a lot and sending the bid.
    Bid,
    /// Taking an award (and waiting for a slot).
    Award,
    /// Pulling the image and checkpoint from the store.
    Fetch,
    /// The driver running the segment.
    Run,
    /// Pushing the new checkpoint and the console.
    Push,
    /// Publishing the result.
    Result,
    /// The broker cancelling the attempt.
    Cancel,
}

/// Which lot a step is about: what the span fields say.
#[derive(Clone, Copy, Debug)]
pub(super) struct LotRef {
    pub job: JobId,
    pub lot: LotId,
    pub segment: u32,
    pub attempt: u32,
}

impl LotRef {
    pub fn of(lot: &Lot) -> LotRef {
        LotRef {
            job: lot.job,
            lot: lot.lot,
            segment: lot.segment,
            attempt: lot.attempt,
        }
    }

    /// The span of `step` on this lot at `provider`.
    pub fn span(&self, step: Step, provider: &ProviderId) -> Span {
        macro_rules! span {
            ($name:literal) => {
                tracing::info_span!(
                    $name,
                    job = %self.job,
                    lot = %self.lot,
                    segment = self.segment,
                    attempt = self.attempt,
                    provider = %provider,
                )
            };
        }
        match step {
            Step::Bid => span!("bid"),
            Step::Award => span!("award"),
            Step::Fetch => span!("fetch"),
            Step::Run => span!("run"),
            Step::Push => span!("push"),
            Step::Result => span!("result"),
            Step::Cancel => span!("cancel"),
        }
    }
}
