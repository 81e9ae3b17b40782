//! Offering a lot: invite a handful of providers (named ones with a free
//! slot, the one that ran the previous segment, and random shards when
//! those are too few), publish the lot on their subjects, and collect the
//! bids that arrive in the bid window, refusing the ones that do not
//! qualify. The auction and the award are the next step ([`crate::award`]).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vmlot_schemas::market::{Bid, JobStatus, Lot};
use vmlot_schemas::{Money, subjects};

use crate::auction::{self, BidRefused};
use crate::error::BrokerError;
use crate::lifecycle;
use crate::shared::{LotEvent, Shared};

/// What an offer's bid window brought.
pub(crate) enum Offered {
    /// The window closed: the valid bids, and whether any bid was refused
    /// only for being above the job's remaining budget.
    Bids {
        lot: Box<Lot>,
        bids: Vec<Bid>,
        over_budget: bool,
    },
    /// The job was stopped (shutdown or cancel) during the window.
    Stopped,
}

/// Offers `lot` (built by [`lifecycle::offer`]) and collects its bids.
/// `quiet_offers` is how many offers in a row drew no bid: each one
/// invites twice as many providers.
pub(crate) async fn offer(
    shared: &Arc<Shared>,
    status: &JobStatus,
    mut lot: Lot,
    quiet_offers: u32,
    tx: &mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<Offered, BrokerError> {
    invite(shared, status, &mut lot, quiet_offers);
    shared.route_lot(lot.lot, status.job, tx);
    if let Err(err) = publish(shared, &lot).await {
        shared.unroute_lot(&lot.lot);
        return Err(err);
    }
    tracing::debug!(shards = ?lot.shards, invited = lot.invited.len(), "lot offered");
    crate::metrics::lot_offered();
    let remaining = lifecycle::remaining(status);
    let collected = collect_bids(shared, &lot, &remaining, rx, stop)
        .instrument(tracing::info_span!("bids"))
        .await;
    // Its results stay routed through the award (the caller unroutes the
    // lot when nobody takes it).
    match collected {
        Some(_) => shared.close_bids(&lot.lot),
        None => shared.unroute_lot(&lot.lot),
    }
    Ok(match collected {
        Some((bids, over_budget)) => Offered::Bids {
            lot: Box::new(lot),
            bids,
            over_budget,
        },
        None => Offered::Stopped,
    })
}

/// Bids a lot should draw: a few per replica.
fn bidders_wanted(redundancy: u32) -> usize {
    (4 * redundancy as usize).clamp(8, 256)
}

/// How many of the [`subjects::LOT_SHARDS`] provider shards a lot goes
/// to: enough for a handful of bids, doubling with each offer that drew
/// none; `None` means every provider.
fn shards_to_invite(redundancy: u32, eligible: usize, quiet_offers: u32) -> Option<usize> {
    let wanted = (bidders_wanted(redundancy) as u64) << quiet_offers.min(20);
    let shards = u64::from(subjects::LOT_SHARDS);
    let needed = (wanted * shards).div_ceil(eligible.max(1) as u64);
    (eligible > 0 && needed < shards).then_some(needed as usize)
}

/// `count` of the provider shards, at random.
fn pick_shards(count: usize) -> Vec<u16> {
    let count = count.min(subjects::LOT_SHARDS as usize);
    let mut shards: Vec<u16> =
        rand::seq::index::sample(&mut rand::thread_rng(), subjects::LOT_SHARDS as usize, count)
            .into_iter()
            .map(|i| i as u16)
            .collect();
    shards.sort_unstable();
    shards
}

/// Fills the lot's invitations: up to a handful of live providers with a
/// free slot by name, plus the previous segment's provider (it holds the
/// blocks hot) unless the lot checks its checkpoint, plus just enough random shards to reach a handful of
/// bidders when the named ones are too few.
fn invite(shared: &Shared, status: &JobStatus, lot: &mut Lot, quiet_offers: u32) {
    let eligible = shared.eligible_providers(&status.spec.image.vm);
    let wanted = bidders_wanted(status.spec.redundancy);
    lot.invited = shared.providers_with_room(&eligible, wanted);
    // Enough free providers named: no random shards needed to find bidders.
    let random_shards = if lot.invited.len() >= wanted {
        Some(0)
    } else {
        shards_to_invite(status.spec.redundancy, eligible.len(), quiet_offers)
    };
    // (Not to the check restore of its own checkpoint: it may not take it.)
    if let Some(previous) = status.settled.last()
        && !lot.check
        && !lot.invited.contains(&previous.provider)
    {
        lot.invited.push(previous.provider);
    }
    lot.shards = random_shards.map(pick_shards);
}

/// The subjects `lot` goes out on: `.all`, or its shards and each named provider.
fn lot_subjects(lot: &Lot) -> Vec<String> {
    let (hypervisor, arch) = (lot.image.vm.hypervisor, &lot.image.vm.arch);
    match &lot.shards {
        None => vec![subjects::lot(hypervisor, arch)],
        Some(shards) => shards
            .iter()
            .map(|shard| subjects::lot_shard(hypervisor, arch, *shard))
            .chain(lot.invited.iter().map(|p| subjects::lot_for(hypervisor, arch, p)))
            .collect(),
    }
}

async fn publish(shared: &Shared, lot: &Lot) -> Result<(), BrokerError> {
    let body = bytes::Bytes::from(serde_json::to_vec(lot).expect("lot serializes"));
    for subject in lot_subjects(lot) {
        shared
            .client
            .publish(subject, body.clone())
            .await
            .map_err(|e| BrokerError::nats("publish lot", e))?;
    }
    Ok(())
}

/// Collects bids on `lot` until its window closes: the valid ones, and
/// whether one was refused for the budget. `None` when stopped.
async fn collect_bids(
    shared: &Shared,
    lot: &Lot,
    remaining: &Money,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Option<(Vec<Bid>, bool)> {
    let mut bids: Vec<Bid> = Vec::new();
    let mut over_budget = false;
    let window = tokio::time::sleep(shared.config.bid_window);
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = &mut window => return Some((bids, over_budget)),
            event = rx.recv() => match event {
                Some(LotEvent::Bid(bid)) if bid.lot == lot.lot => {
                    match check_bid(shared, lot, &bids, &bid, remaining) {
                        Ok(()) => bids.push(bid),
                        Err(refused) => {
                            over_budget |= matches!(refused, BidRefused::AboveBudget { .. });
                            tracing::warn!(provider = %bid.provider, %refused, "bid refused");
                            crate::metrics::refused("bid", refused.kind());
                        }
                    }
                }
                Some(LotEvent::Bid(bid)) => tracing::warn!(lot = %bid.lot, "bid for a closed lot ignored"),
                Some(LotEvent::Result(event)) => {
                    let (result, msg) = *event;
                    tracing::warn!(lot = %result.lot, provider = %result.provider, "result for a lot not awarded; refused");
                    let _ = msg.ack().await;
                }
                None => return None,
            }
        }
    }
}

/// Checks one bid: invited, fit for the lot's VM, first from its
/// provider, and a price within the reserve and the remaining budget.
fn check_bid(
    shared: &Shared,
    lot: &Lot,
    bids: &[Bid],
    bid: &Bid,
    remaining: &Money,
) -> Result<(), BidRefused> {
    if !lot.invites(&bid.provider) {
        Err(BidRefused::NotInvited(bid.provider))
    } else if !shared.provider_offers(&bid.provider, &lot.image.vm) {
        Err(BidRefused::Unfit(bid.provider))
    } else if bids.iter().any(|b| b.provider == bid.provider) {
        Err(BidRefused::Duplicate(bid.provider))
    } else {
        auction::check_bid(bid, &lot.reserve_price, remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invitations_reach_a_handful_and_widen_after_quiet_offers() {
        assert_eq!(shards_to_invite(1, 3, 0), None, "a small market: everyone");
        assert_eq!(shards_to_invite(1, 0, 0), None, "no heartbeat yet: everyone");
        assert_eq!(
            shards_to_invite(1, 200, 0),
            Some(3),
            "8 of 200: 3 shards of about 3 each"
        );
        assert_eq!(shards_to_invite(3, 200, 0), Some(4), "4 per replica");
        assert_eq!(shards_to_invite(1, 200, 1), Some(6));
        assert_eq!(shards_to_invite(1, 200, 5), None);
        assert_eq!(shards_to_invite(u32::MAX, 1, u32::MAX), None, "no overflow");
        let shards = pick_shards(3);
        assert_eq!(shards.len(), 3);
        assert!(shards.windows(2).all(|w| w[0] < w[1]), "distinct");
        assert!(pick_shards(0).is_empty());
    }
}
