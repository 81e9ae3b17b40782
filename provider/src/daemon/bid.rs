//! Bidding: every lot this provider is invited to is priced (by
//! [`crate::bidding`], from its own price and the share of the checkpoint
//! it holds) and bid on while it has a free slot and is idle. Each lot is
//! one `bid` step in the logs.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use tracing::Instrument;
use vmlot_schemas::market::{Bid, Checkpoint, Lot};
use vmlot_schemas::{JobId, WIRE_VERSION, subjects};

use super::span::{LotRef, Step};
use super::state::Daemon;
use crate::bidding;

/// How far this machine's clock may be ahead of the broker's before a lot
/// looks past its bid deadline. Bid windows are a fraction of a second, so
/// a clock a few hundred milliseconds ahead (a host that set its clock from
/// a one-second RTC and has no NTP, as the nested Xen test hosts do) would
/// otherwise skip every lot. A bid that does arrive late is simply ignored
/// by the broker.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// Reads lots until shutdown and bids on those it may.
pub(super) async fn bid_on_lots(
    daemon: Arc<Daemon>,
    mut lots: impl futures::Stream<Item = async_nats::Message> + Unpin,
) {
    loop {
        let msg = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            msg = lots.next() => match msg { Some(m) => m, None => return },
        };
        if vmlot_identity::echo::refuse(&msg.subject, msg.headers.as_ref()) {
            continue;
        }
        let lot: Lot = match serde_json::from_slice(&msg.payload) {
            Ok(lot) => lot,
            Err(err) => {
                tracing::warn!(subject = %msg.subject, %err, "ignored malformed lot");
                continue;
            }
        };
        if lot.version != WIRE_VERSION
            || lot.bid_deadline + CLOCK_SKEW < Utc::now()
            || !lot.invites(&daemon.config.id)
        {
            continue;
        }
        crate::metrics::lot_seen();
        let span = LotRef::of(&lot).span(Step::Bid, &daemon.config.id);
        bid(&daemon, &lot).instrument(span).await;
    }
}

/// Decides on `lot` and sends the bid, if any.
async fn bid(daemon: &Daemon, lot: &Lot) {
    let hot_share = hot_share(daemon, &lot.job, &lot.checkpoint).await;
    let idle = daemon.owner.idle(daemon.config.idle_load);
    crate::metrics::owner_idle(idle);
    match bidding::decide(&daemon.config, lot, daemon.free_slots(), idle, hot_share) {
        Ok(price) => {
            let bid = Bid {
                version: WIRE_VERSION,
                lot: lot.lot,
                provider: daemon.config.id,
                price,
                hot_bytes: (Decimal::from(lot.checkpoint.stored_bytes) * hot_share)
                    .trunc()
                    .try_into()
                    .unwrap_or(0),
                slots: daemon.config.slots,
                sent_at: Utc::now(),
            };
            let body = serde_json::to_vec(&bid).expect("bid serializes");
            match daemon
                .client
                .publish(
                    subjects::bid(&daemon.config.id, subjects::partition_of(&lot.job)),
                    body.into(),
                )
                .await
            {
                Ok(()) => {
                    crate::metrics::bid_sent();
                    tracing::debug!(price = %bid.price.amount, %hot_share, "bid sent")
                }
                Err(err) => tracing::warn!(%err, "could not send bid"),
            }
        }
        Err(reason) => tracing::debug!(?reason, "no bid"),
    }
}

/// Share of a checkpoint's stored bytes already here: in the local cache,
/// or, for its memory part, in the RAM file kept from this provider's last
/// segment of the job (counted whole: it differs by what one segment wrote).
async fn hot_share(daemon: &Daemon, job: &JobId, checkpoint: &Checkpoint) -> Decimal {
    let (mut hot, mut total) = (0u64, 0u64);
    let kept = daemon.kept.holds(job);
    for id in checkpoint.parts() {
        if let Ok(manifest) = daemon.store.get_manifest(id).await {
            if kept && Some(*id) == checkpoint.memory {
                hot += manifest.stored_bytes();
                total += manifest.stored_bytes();
                continue;
            }
            let have = daemon.cache.have(&manifest);
            hot += have.hot_bytes;
            total += have.hot_bytes + have.cold_bytes;
        }
    }
    if total == 0 {
        Decimal::ZERO
    } else {
        Decimal::from(hot) / Decimal::from(total)
    }
}
