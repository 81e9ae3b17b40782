//! Telling providers to stop an attempt: the replicas that lost a settled
//! segment, and every provider of a lot whose job ended, was cancelled or
//! timed out. Best effort (core NATS): a provider that misses it runs on,
//! and its late result is refused.

use std::sync::Arc;

use tracing::Instrument;
use vmlot_schemas::market::{CancelAttempt, JobStatus, ToProvider};
use vmlot_schemas::{LotId, ProviderId, WIRE_VERSION, subjects};

use crate::error::BrokerError;
use crate::shared::Shared;

/// Tells the providers awarded the job's open lot to stop.
pub(crate) async fn open_lot(shared: &Arc<Shared>, status: &JobStatus, reason: &str) {
    let Some(open) = &status.open_lot else { return };
    let providers: Vec<ProviderId> = open.awarded.iter().map(|(p, _)| *p).collect();
    attempt(shared, open.lot.lot, &providers, reason).await;
}

/// Tells each of `providers` to stop its attempt at `lot`.
pub(crate) async fn attempt(shared: &Arc<Shared>, lot: LotId, providers: &[ProviderId], reason: &str) {
    for provider in providers {
        let span = tracing::info_span!("cancel", %lot, %provider);
        async {
            if let Err(err) = send(shared, provider, lot, reason).await {
                tracing::warn!(%err, "could not send cancel");
            } else {
                tracing::debug!(%reason, "cancel sent");
            }
        }
        .instrument(span)
        .await;
    }
}

async fn send(
    shared: &Arc<Shared>,
    provider: &ProviderId,
    lot: LotId,
    reason: &str,
) -> Result<(), BrokerError> {
    let cancel = ToProvider::Cancel(CancelAttempt {
        version: WIRE_VERSION,
        lot,
        reason: reason.into(),
    });
    let body = serde_json::to_vec(&cancel).expect("cancel serializes");
    shared
        .client
        .publish(subjects::award(provider), body.into())
        .await
        .map_err(|e| BrokerError::nats("publish to provider", e))
}
