//! The broker's inbound market traffic: bids, heartbeats and results are
//! decoded and checked against their subject here, then routed to the job
//! task whose lot they name (heartbeats fill the provider table). What
//! names no open lot is refused and logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::market::{Bid, Heartbeat, SegmentResult};
use vmlot_schemas::{ProviderId, WIRE_VERSION, subjects};

use crate::metrics;
use crate::shared::{LotEvent, Shared};

/// Routes each bid to the task of the lot it names.
/// `bids` are those of one partition's lots; `stop` ends the routing.
pub(crate) async fn route_bids(
    shared: Arc<Shared>,
    mut bids: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            msg = bids.next() => match msg { Some(m) => m, None => return },
        };
        if vmlot_identity::echo::refuse(&msg.subject, msg.headers.as_ref()) {
            continue;
        }
        let bid: Bid = match serde_json::from_slice(&msg.payload) {
            Ok(bid) => bid,
            Err(err) => {
                tracing::warn!(subject = %msg.subject, %err, "refused malformed bid");
                metrics::refused("bid", "malformed");
                continue;
            }
        };
        if bid.version != WIRE_VERSION || subjects::provider_of(&msg.subject) != Some(bid.provider) {
            tracing::warn!(subject = %msg.subject, provider = %bid.provider, "refused bid: wrong version or not from its own subject");
            metrics::refused("bid", "wrong-subject");
            continue;
        }
        let route = shared
            .lots
            .lock()
            .expect("lots lock")
            .get(&bid.lot)
            .filter(|r| r.bids)
            .map(|r| r.tx.clone());
        match route {
            Some(tx) => {
                metrics::bid_routed();
                let _ = tx.try_send(LotEvent::Bid(bid));
            }
            None => {
                tracing::warn!(lot = %bid.lot, provider = %bid.provider, "refused bid for a lot not open");
                metrics::refused("bid", "lot-not-open");
            }
        }
    }
}

/// Keeps each provider's last heartbeat and when it came.
/// Providers silent for this many provider timeouts are dropped from the
/// table (only a valid provider identity can beat, one entry each, but
/// identities come and go).
const PRUNE_AFTER_TIMEOUTS: u32 = 6;

pub(crate) async fn track_heartbeats(shared: Arc<Shared>, mut beats: async_nats::Subscriber) {
    let mut pruned = Instant::now();
    loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            msg = beats.next() => match msg { Some(m) => m, None => return },
        };
        if vmlot_identity::echo::refuse(&msg.subject, msg.headers.as_ref()) {
            continue;
        }
        match serde_json::from_slice::<Heartbeat>(&msg.payload) {
            Ok(hb) if subjects::provider_of(&msg.subject) == Some(hb.provider) => {
                let mut providers = shared.providers.lock().expect("providers lock");
                record_heartbeat(
                    &mut providers,
                    &mut pruned,
                    hb,
                    Instant::now(),
                    shared.config.provider_timeout,
                );
            }
            _ => {
                tracing::warn!(subject = %msg.subject, "refused malformed heartbeat");
                metrics::refused("heartbeat", "malformed");
            }
        }
    }
}

/// Records `hb` as heard `now`; at most once per `timeout`, drops every
/// provider silent for [`PRUNE_AFTER_TIMEOUTS`] timeouts. Pure: the table
/// and the clock are the caller's.
fn record_heartbeat(
    providers: &mut HashMap<ProviderId, (Heartbeat, Instant)>,
    pruned: &mut Instant,
    hb: Heartbeat,
    now: Instant,
    timeout: Duration,
) {
    providers.insert(hb.provider, (hb, now));
    if now.saturating_duration_since(*pruned) > timeout {
        let stale = timeout * PRUNE_AFTER_TIMEOUTS;
        providers.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < stale);
        *pruned = now;
    }
}

/// Routes each result to the task of the lot it names; that task acks it.
/// `consumer` reads one partition's results; `stop` ends the routing.
pub(crate) async fn route_results(
    shared: Arc<Shared>,
    consumer: consumer::PullConsumer,
    stop: CancellationToken,
) {
    loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(%err, "results consumer unavailable; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                msg = messages.next() => msg,
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(err)) => {
                    tracing::warn!(%err, "results stream error");
                    continue;
                }
                None => break,
            };
            if vmlot_identity::echo::refuse(&msg.subject, msg.headers.as_ref()) {
                let _ = msg.ack().await;
                continue;
            }
            let result: SegmentResult = match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(subject = %msg.subject, %err, "refused malformed result");
                    metrics::refused("result", "malformed");
                    let _ = msg.ack().await;
                    continue;
                }
            };
            if result.version != WIRE_VERSION || subjects::provider_of(&msg.subject) != Some(result.provider)
            {
                tracing::warn!(subject = %msg.subject, "refused result: wrong version or not from its own subject");
                metrics::refused("result", "wrong-subject");
                let _ = msg.ack().await;
                continue;
            }
            let route = shared
                .lots
                .lock()
                .expect("lots lock")
                .get(&result.lot)
                .map(|r| (r.job, r.tx.clone()));
            match route {
                Some((job, tx)) if job == result.job => {
                    // The job task acks once it has dealt with the result.
                    if let Err(mpsc::error::SendError(LotEvent::Result(event))) =
                        tx.send(LotEvent::Result(Box::new((result, msg)))).await
                    {
                        let _ = event
                            .1
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
                _ => {
                    tracing::warn!(lot = %result.lot, provider = %result.provider, "refused result for a lot not open (late, replayed or never offered)");
                    metrics::refused("result", "lot-not-open");
                    let _ = msg.ack().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(provider: ProviderId) -> Heartbeat {
        Heartbeat {
            version: vmlot_schemas::WIRE_VERSION,
            provider,
            name: provider.to_string(),
            hypervisors: vec![vmlot_schemas::HypervisorKind::Synthetic],
            arch: "x86_64".into(),
            memory_mib: 64,
            slots: 1,
            free_slots: 1,
            idle: true,
            sent_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn silent_providers_leave_the_table_and_beating_ones_stay() {
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        let (mut table, mut pruned) = (HashMap::new(), t0);
        let (gone, stays, late) = (ProviderId::new(), ProviderId::new(), ProviderId::new());
        record_heartbeat(&mut table, &mut pruned, beat(gone), t0, timeout);
        record_heartbeat(&mut table, &mut pruned, beat(stays), t0, timeout);
        // `stays` beats every 10 s; `gone` never again.
        for k in 1..=5 {
            let now = t0 + timeout * k;
            record_heartbeat(&mut table, &mut pruned, beat(stays), now, timeout);
            assert!(table.contains_key(&gone), "dropped after only {k} timeouts");
        }
        let now = t0 + timeout * 6 + Duration::from_secs(1);
        record_heartbeat(&mut table, &mut pruned, beat(late), now, timeout);
        assert!(!table.contains_key(&gone));
        assert!(table.contains_key(&stays) && table.contains_key(&late));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn a_flood_of_beats_prunes_at_most_once_per_timeout() {
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        let (mut table, mut pruned) = (HashMap::new(), t0);
        let old = ProviderId::new();
        record_heartbeat(&mut table, &mut pruned, beat(old), t0, timeout);
        let now = t0 + timeout * 7;
        record_heartbeat(&mut table, &mut pruned, beat(ProviderId::new()), now, timeout);
        assert!(!table.contains_key(&old));
        assert_eq!(pruned, now);
        // Within the next timeout, no sweep: the clock of the last one stands.
        record_heartbeat(
            &mut table,
            &mut pruned,
            beat(ProviderId::new()),
            now + Duration::from_secs(1),
            timeout,
        );
        assert_eq!(pruned, now);
    }
}
