//! Awarding a lot: run the auction among the bidders with a free slot and
//! reserve the winners' slots in one step, record the winners and the
//! award deadline in the job's record, then send each winner its award and
//! wait for it to say it took it. A lot no bidder could win leaves the job
//! waiting for providers (or ends it when every bid was over its budget).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use vmlot_schemas::market::{Award, Bid, JobStatus, Lot, Reply, ResultCheck, ToProvider};
use vmlot_schemas::{JobId, Money, ProviderId, WIRE_VERSION, subjects};

use crate::error::BrokerError;
use crate::lifecycle::{self, Ending, Refused};
use crate::shared::Shared;
use crate::state::UpdateError;
use crate::{auction, deposit};

/// Standby bidders kept for a quorum's tie-breaker.
const STANDBY: usize = 3;

/// How long a provider has to confirm an award.
const AWARD_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How an award went.
pub(crate) enum Awarded {
    /// Winners recorded, at least one took its award: the record, with the
    /// awarded lot open.
    Taken(Box<JobStatus>),
    /// No valid bid: the job waits for providers.
    NoBids,
    /// Valid bids came, but every bidder has all its slots awarded already
    /// (or no winner took its award).
    AllBusy,
    /// The job ended meanwhile (cancelled, or no bid within its budget).
    Stopped,
}

/// Awards `lot` among `bids` (the valid bids its window collected).
pub(crate) async fn award(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    mut bids: Vec<Bid>,
    over_budget: bool,
) -> Result<Awarded, BrokerError> {
    // A provider that sent this job a refused result bids in vain.
    // So does one that could not restore the job's checkpoint: another
    // provider's word on it is what counts.
    // And the check restore of a checkpoint is never its producer's word,
    // nor is the rest of a preempted segment the preempted provider's.
    let own = lifecycle::checked_provider(status, lot);
    let preempted = lifecycle::preempted_by(status);
    bids.retain(|b| {
        !status.refused.contains(&b.provider)
            && !status.restore_failures.contains(&b.provider)
            && Some(b.provider) != own
            && Some(b.provider) != preempted
    });
    let bids = deposit::eligible(shared, bids).await;
    let valid_bids = bids.len();
    let standby = match status.spec.check {
        ResultCheck::Quorum => bids.clone(),
        _ => Vec::new(),
    };
    let mut winners = choose_winners(shared, lot, bids, status.spec.redundancy as usize);
    let standby = auction::standby(standby, &winners, STANDBY);
    if winners.is_empty() {
        return no_winner(shared, status, valid_bids, over_budget).await;
    }
    // Under a quorum, the check restore proves only that the last
    // checkpoint restores: one provider does. Any other attempt goes to
    // one provider when adaptive replication trusts its winner.
    let unreplicated = status.spec.check == ResultCheck::Quorum
        && (lot.check || (winners.len() > 1 && !replicate(shared, winners[0].0).await));
    if unreplicated {
        let others = winners.split_off(1);
        shared.release_slots(others.iter().map(|(p, _)| *p), &lot.lot);
        tracing::info!(provider = %winners[0].0, check = lot.check, "this attempt is not replicated");
    }
    let release = || shared.release_slots(winners.iter().map(|(p, _)| *p), &lot.lot);
    let deadline = result_deadline(shared, lot);
    let recorded = match record(shared, status, lot, &winners, &standby, unreplicated, deadline).await {
        Ok(recorded) => recorded,
        Err(UpdateError::Refused(refused)) => {
            tracing::info!(%refused, "award not recorded");
            release();
            return Ok(Awarded::Stopped);
        }
        Err(UpdateError::NotFound) => {
            release();
            return Ok(Awarded::Stopped);
        }
        Err(UpdateError::Broker(e)) => {
            release();
            return Err(e);
        }
    };
    if send_awards(shared, lot, &winners, deadline).await == 0 {
        match shared.jobs.transition(&status.job, lifecycle::withdraw_lot).await {
            Ok(_) | Err(UpdateError::Refused(Refused::NoOpenLot)) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Awarded::AllBusy);
    }
    Ok(Awarded::Taken(Box::new(recorded)))
}

/// A restarted broker waits for the lot the job had awarded: its awards
/// hold their providers' slots again.
pub(crate) fn resume(shared: &Shared, status: &JobStatus) {
    let Some(open) = &status.open_lot else { return };
    let _resume = tracing::info_span!("resume").entered();
    tracing::info!(deadline = ?open.award_deadline, "waiting for the results of the awarded lot");
    let mut capacity = shared.capacity.lock().expect("capacity lock");
    for (provider, _) in &open.awarded {
        capacity.commit(*provider, open.lot.lot);
    }
}

/// Chooses the winners among the bidders with a free slot and holds their
/// slots in one step, so two lots closing at once cannot both take a
/// provider's last slot.
fn choose_winners(
    shared: &Shared,
    lot: &Lot,
    mut bids: Vec<Bid>,
    redundancy: usize,
) -> Vec<(ProviderId, Money)> {
    let mut capacity = shared.capacity.lock().expect("capacity lock");
    bids.retain(|b| capacity.has_room(&b.provider, b.slots));
    let winners = auction::award(bids, redundancy, shared.config.pricing, &lot.reserve_price);
    for (provider, _) in &winners {
        capacity.commit(*provider, lot.lot);
    }
    winners
}

/// Nobody won: every bid over the budget ends the job; otherwise it waits
/// for providers (recorded only if that changes its record).
async fn no_winner(
    shared: &Arc<Shared>,
    status: &JobStatus,
    valid_bids: usize,
    over_budget: bool,
) -> Result<Awarded, BrokerError> {
    if over_budget && valid_bids == 0 {
        let ending = match lifecycle::segment_limit(status) {
            // The segments ran; only their check does not fit.
            Some(n) if lifecycle::check_due(status) => Ending::CheckUnaffordable(n),
            _ => Ending::NoBidFits,
        };
        shared.jobs.end(&status.job, ending).await?;
        return Ok(Awarded::Stopped);
    }
    if lifecycle::wait_for_providers(status).as_ref() != Ok(status) {
        match shared
            .jobs
            .transition(&status.job, lifecycle::wait_for_providers)
            .await
        {
            Ok(_) | Err(UpdateError::Refused(Refused::Final(_))) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if valid_bids == 0 {
        tracing::info!("no bids; waiting for providers");
        return Ok(Awarded::NoBids);
    }
    tracing::debug!(valid_bids, "every bidder is busy; offering again soon");
    Ok(Awarded::AllBusy)
}

/// When a result of `lot` awarded now is due: the segment's length plus
/// the time to fetch, restore, save and upload.
fn result_deadline(shared: &Shared, lot: &Lot) -> DateTime<Utc> {
    let allowance = Duration::from_secs(lot.segment_seconds as u64) + shared.config.transfer_allowance;
    Utc::now() + chrono::Duration::from_std(allowance).unwrap_or_default()
}

/// Whether the quorum job's attempt won by `provider` is replicated, by
/// adaptive replication from its run of agreeing results ([`Policy`]).
/// Its standing unreadable: replicated.
///
/// [`Policy`]: crate::replication::Policy
async fn replicate(shared: &Shared, provider: ProviderId) -> bool {
    let policy = shared.config.replication;
    if policy.trust_after == 0 {
        return true;
    }
    let streak = match shared.standings.get(provider).await {
        Ok(standing) => standing.streak,
        Err(err) => {
            tracing::warn!(%provider, %err, "standing unreadable; replicating");
            return true;
        }
    };
    let draw = rand::Rng::gen_range(&mut rand::thread_rng(), 0..streak.max(1));
    policy.replicate(streak, draw)
}

/// Records the winners and the deadline in the job's record, before any
/// award is sent: a broker that restarts finds the award and waits for it.
async fn record(
    shared: &Shared,
    status: &JobStatus,
    lot: &Lot,
    winners: &[(ProviderId, Money)],
    standby: &[(ProviderId, Money)],
    unreplicated: bool,
    deadline: DateTime<Utc>,
) -> Result<JobStatus, UpdateError<Refused>> {
    let (lot, winners, standby, now) = (lot.clone(), winners.to_vec(), standby.to_vec(), Utc::now());
    shared
        .jobs
        .transition(&status.job, move |s| {
            let mut awarded = lifecycle::award(s, &lot, &winners, deadline, now)?;
            if !standby.is_empty() {
                awarded = lifecycle::standby(&awarded, &standby)?;
            }
            if unreplicated {
                awarded = lifecycle::unreplicated(&awarded)?;
            }
            Ok(awarded)
        })
        .await
}

/// Under a quorum check whose replicas disagree: awards the open attempt
/// to the first of its standby bidders that has a free slot and takes it,
/// too. The record with it awarded, or None when no standby bidder is left.
pub(crate) async fn tie_breaker(
    shared: &Arc<Shared>,
    job: JobId,
    lot: &Lot,
) -> Result<Option<(JobStatus, ProviderId)>, BrokerError> {
    loop {
        let Some((status, _)) = shared.jobs.get(&job).await? else {
            return Ok(None);
        };
        let Some(open) = status.open_lot.as_ref().filter(|open| open.lot.lot == lot.lot) else {
            return Ok(None);
        };
        let Some((provider, price)) = open.standby.first().cloned() else {
            return Ok(None);
        };
        let deadline = result_deadline(shared, lot);
        shared
            .capacity
            .lock()
            .expect("capacity lock")
            .commit(provider, lot.lot);
        let recorded = match shared
            .jobs
            .transition(&job, move |s| lifecycle::add_replica(s, provider, deadline))
            .await
        {
            Ok(recorded) => recorded,
            Err(UpdateError::Refused(refused)) => {
                // Excluded since it bid: drop it from the standby and go on.
                tracing::info!(%provider, %refused, "standby bidder not awarded");
                shared.release_slots([provider], &lot.lot);
                drop_standby(shared, job, provider).await?;
                continue;
            }
            Err(UpdateError::NotFound) => return Ok(None),
            Err(UpdateError::Broker(e)) => return Err(e),
        };
        let span = tracing::info_span!("tie-breaker", %provider);
        if send_awards(shared, lot, &[(provider, price)], deadline)
            .instrument(span)
            .await
            == 1
        {
            return Ok(Some((recorded, provider)));
        }
        // It did not take the award: it can send no result; the next one.
    }
}

/// Takes `provider` off the open lot's standby bidders.
async fn drop_standby(shared: &Shared, job: JobId, provider: ProviderId) -> Result<(), BrokerError> {
    let dropped = shared
        .jobs
        .transition(&job, move |s| lifecycle::drop_standby(s, provider))
        .await;
    match dropped {
        Ok(_) | Err(UpdateError::Refused(_) | UpdateError::NotFound) => Ok(()),
        Err(UpdateError::Broker(e)) => Err(e),
    }
}

/// Sends every winner its award; returns how many took it. A winner that
/// did not gets its slot back at once.
async fn send_awards(
    shared: &Shared,
    lot: &Lot,
    winners: &[(ProviderId, Money)],
    deadline: DateTime<Utc>,
) -> usize {
    let sends = winners.iter().map(|(provider, price)| {
        let award = ToProvider::Award(Box::new(Award {
            version: WIRE_VERSION,
            lot: lot.clone(),
            provider: *provider,
            price: price.clone(),
            deadline,
        }));
        let span = tracing::info_span!("award", provider = %provider);
        async move {
            match send_award(shared, provider, &award).await {
                Ok(()) => {
                    tracing::info!(%price, "awarded");
                    crate::metrics::awarded();
                    true
                }
                Err(reason) => {
                    tracing::warn!(%reason, "award not taken");
                    shared.release_slots([*provider], &lot.lot);
                    false
                }
            }
        }
        .instrument(span)
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .filter(|taken| *taken)
        .count()
}

/// Sends an award; Ok once the provider confirms it took it.
async fn send_award(shared: &Shared, provider: &ProviderId, award: &ToProvider) -> Result<(), String> {
    let body = serde_json::to_vec(award).expect("award serializes");
    let reply = tokio::time::timeout(
        AWARD_REPLY_TIMEOUT,
        shared.client.request(subjects::award(provider), body.into()),
    )
    .await
    .map_err(|_| "no answer in time".to_string())?
    .map_err(|e| e.to_string())?;
    match serde_json::from_slice::<Reply<()>>(&reply.payload) {
        Ok(Reply::Ok(())) => Ok(()),
        Ok(Reply::Error(refused)) => Err(format!("refused: {}", refused.message)),
        Err(err) => Err(format!("unreadable answer: {err}")),
    }
}
