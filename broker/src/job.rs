//! One task per running job: offer segment k as a lot, collect sealed bids
//! until the bid deadline, award r providers, wait for the first valid
//! result until the award deadline, settle (pay once, cancel the other
//! replicas), and go on from C(k+1). Every step is recorded in the job's KV
//! record first, so a broker that restarts resumes where it stood.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rust_decimal::Decimal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vmlot_schemas::ledger::Settlement;
use vmlot_schemas::market::{
    Award, Bid, CancelAttempt, GuestState, JobState, JobStatus, Lot, OpenLot, Reply, SegmentCount,
    SegmentResult, SettledSegment, ToProvider,
};
use vmlot_schemas::{JobId, LotId, Money, ProviderId, WIRE_VERSION, subjects};

use crate::auction::{self, BidRefused};
use crate::state::UpdateError;
use crate::{BrokerError, LotEvent, LotRoute, Shared, verify};

type Awarded = Vec<(ProviderId, Money)>;

enum Offer {
    Awarded(Box<(Lot, Awarded, chrono::DateTime<Utc>)>),
    NoBids,
    /// Valid bids came, but every bidder has all its slots awarded already.
    AllBusy,
    Stopped,
}

enum Waited {
    Settled,
    TimedOut,
    Stopped,
}

/// Longest wait before offering again when every bidder was busy.
const BUSY_BACKOFF_CAP: Duration = Duration::from_secs(2);

fn update_failed<E: std::fmt::Display>(err: UpdateError<E>) -> BrokerError {
    match err {
        UpdateError::Broker(b) => b,
        other => BrokerError::nats("update job", other.to_string()),
    }
}

/// Drives `job` until it ends or `stop` fires (shutdown or cancel).
pub(crate) async fn drive(
    shared: &Arc<Shared>,
    job: JobId,
    stop: CancellationToken,
    tx: mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
) -> Result<(), BrokerError> {
    let mut backoff = shared.config.min_backoff;
    // Offers in a row that drew no bid: each one invites twice as many providers.
    let mut quiet_offers = 0u32;
    ensure_held(shared, job).await?;
    loop {
        if stop.is_cancelled() {
            return on_stop(shared, job).await;
        }
        let Some((status, _)) = shared.jobs.get(&job).await? else {
            return Ok(());
        };
        if status.state.is_final() {
            cancel_open_lot(shared, &status, "job ended").await;
            return refund(shared, &status).await;
        }
        let segment = status.settled.len() as u32;
        // A payment written before a crash settles its segment; it is not paid again.
        if let Some(payment) = shared.books.settlement(job, segment).await? {
            tracing::info!(%job, segment, "segment already paid; applying the recorded settlement");
            apply_settlement(shared, &payment).await?;
            continue;
        }
        if let Some((state, reason)) = end_before(&status) {
            finish(shared, job, state, reason).await?;
            continue;
        }
        let resumable = status
            .open_lot
            .as_ref()
            .and_then(|open| match open.award_deadline {
                Some(deadline) if !open.awarded.is_empty() && deadline > Utc::now() => {
                    Some((open.lot.clone(), open.awarded.clone(), deadline))
                }
                _ => None,
            });
        let (lot, awarded, deadline) = match resumable {
            Some((lot, awarded, deadline)) => {
                // Resumed after a restart: its awards hold their providers' slots again.
                let mut capacity = shared.capacity.lock().expect("capacity lock");
                for (provider, _) in &awarded {
                    capacity.commit(*provider, lot.lot);
                }
                (lot, awarded, deadline)
            }
            None => {
                cancel_open_lot(shared, &status, "attempt timed out").await;
                match offer(shared, &status, quiet_offers, &tx, rx, &stop).await? {
                    Offer::Awarded(awarded) => {
                        backoff = shared.config.min_backoff;
                        quiet_offers = 0;
                        *awarded
                    }
                    offer @ (Offer::NoBids | Offer::AllBusy) => {
                        // Wait for a slot to free up somewhere (one waiting
                        // job wakes per slot) or for the backoff, whichever
                        // comes first: a market short of providers queues
                        // its jobs instead of flooding providers with lots.
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = shared.slot_freed.notified() => {}
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        // Bidders that were all busy are there and will be
                        // free soon: their wait stays short.
                        let cap = match offer {
                            Offer::AllBusy => shared.config.max_backoff.min(BUSY_BACKOFF_CAP),
                            _ => shared.config.max_backoff,
                        };
                        backoff = (backoff * 2).min(cap);
                        if matches!(offer, Offer::NoBids) {
                            quiet_offers = quiet_offers.saturating_add(1);
                        }
                        continue;
                    }
                    Offer::Stopped => continue,
                }
            }
        };
        shared
            .lots
            .lock()
            .expect("lots lock")
            .insert(lot.lot, LotRoute { job, tx: tx.clone() });
        let waited = await_result(shared, &status, &lot, &awarded, deadline, rx, &stop).await;
        shared.lots.lock().expect("lots lock").remove(&lot.lot);
        shared.release_slots(awarded.iter().map(|(p, _)| *p), &lot.lot);
        match waited? {
            Waited::Settled | Waited::Stopped => {}
            Waited::TimedOut => {
                tracing::warn!(%job, segment, attempt = lot.attempt, "no valid result by the deadline; offering again")
            }
        }
    }
}

/// Stopped by shutdown (leave everything as it stands: results wait in
/// their stream) or by a cancel (tell the awarded providers).
async fn on_stop(shared: &Arc<Shared>, job: JobId) -> Result<(), BrokerError> {
    if shared.shutdown.is_cancelled() {
        return Ok(());
    }
    if let Some((status, _)) = shared.jobs.get(&job).await? {
        cancel_open_lot(shared, &status, "job cancelled").await;
        clear_open_lot(shared, job).await?;
        if status.state.is_final() {
            refund(shared, &status).await?;
        }
    }
    Ok(())
}

/// Makes sure the job's budget is in escrow. The API holds it at
/// submission; a broker that died between writing the job record and the
/// hold writes it here, and a submitter short of funds by then fails the job.
async fn ensure_held(shared: &Arc<Shared>, job: JobId) -> Result<(), BrokerError> {
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
    match shared
        .books
        .hold(job, &status.spec.account, &status.spec.budget)
        .await
    {
        Ok(_) => Ok(()),
        Err(short @ vmlot_ledger::LedgerError::InsufficientFunds { .. }) => {
            finish(shared, job, JobState::Failed, short.to_string()).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The job ended: what is left in its escrow goes back to the submitter, once.
async fn refund(shared: &Arc<Shared>, status: &JobStatus) -> Result<(), BrokerError> {
    if status.refunded {
        return Ok(());
    }
    let recorded = shared
        .books
        .refund(status.job, &status.spec.account, &status.spec.budget.unit)
        .await?;
    let amount = recorded
        .tx()
        .entries
        .first()
        .map(|e| e.amount)
        .unwrap_or_default();
    tracing::info!(job = %status.job, %amount, "escrow refunded");
    shared
        .jobs
        .update::<std::convert::Infallible, _>(&status.job, |s| {
            s.refunded = true;
            Ok(())
        })
        .await
        .map_err(update_failed)?;
    Ok(())
}

/// Forgets the job's open lot in its record.
async fn clear_open_lot(shared: &Arc<Shared>, job: JobId) -> Result<(), BrokerError> {
    shared
        .jobs
        .update::<std::convert::Infallible, _>(&job, |s| {
            s.open_lot = None;
            Ok(())
        })
        .await
        .map_err(update_failed)?;
    Ok(())
}

/// A reason to end the job before offering another segment.
fn end_before(status: &JobStatus) -> Option<(JobState, String)> {
    let done = status.settled.len() as u32;
    if let SegmentCount::Count(n) = status.spec.segments
        && done >= n
    {
        return Some((JobState::Done, format!("all {n} segments ran")));
    }
    if status.spec.budget.amount - status.spent.amount <= Decimal::ZERO {
        return Some((JobState::BudgetSpent, "budget spent".into()));
    }
    None
}

async fn finish(
    shared: &Arc<Shared>,
    job: JobId,
    state: JobState,
    reason: String,
) -> Result<(), BrokerError> {
    tracing::info!(%job, ?state, %reason, "job ended");
    shared
        .jobs
        .update::<std::convert::Infallible, _>(&job, move |s| {
            if !s.state.is_final() {
                s.state = state;
                s.end_reason = Some(reason.clone());
                s.open_lot = None;
            }
            Ok(())
        })
        .await
        .map_err(update_failed)?;
    Ok(())
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

async fn offer(
    shared: &Arc<Shared>,
    status: &JobStatus,
    quiet_offers: u32,
    tx: &mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<Offer, BrokerError> {
    let job = status.job;
    let remaining = Money::new(
        status.spec.budget.amount - status.spent.amount,
        status.spec.budget.unit.clone(),
    );
    let bid_window = shared.config.bid_window;
    let eligible = shared.eligible_providers(&status.spec.image.vm);
    // Nothing is recorded before the award: a lot that dies with the broker
    // during its bid window was never awarded, and is simply offered anew.
    let mut lot = Lot {
        version: WIRE_VERSION,
        lot: LotId::new(),
        job,
        segment: status.settled.len() as u32,
        attempt: status.attempts + 1,
        image: status.spec.image.clone(),
        checkpoint: status.checkpoint.clone(),
        segment_seconds: status.spec.segment_seconds,
        reserve_price: status.spec.reserve_price.clone(),
        bid_deadline: Utc::now() + chrono::Duration::from_std(bid_window).unwrap_or_default(),
        shards: None,
        invited: Vec::new(),
    };
    let wanted = bidders_wanted(status.spec.redundancy);
    lot.invited = shared.providers_with_room(&eligible, wanted);
    // Enough free providers named: no random shards needed to find bidders.
    let random_shards = if lot.invited.len() >= wanted {
        Some(0)
    } else {
        shards_to_invite(status.spec.redundancy, eligible.len(), quiet_offers)
    };
    if let Some(previous) = status.settled.last()
        && !lot.invited.contains(&previous.provider)
    {
        lot.invited.push(previous.provider);
    }
    lot.shards = random_shards.map(pick_shards);
    shared
        .lots
        .lock()
        .expect("lots lock")
        .insert(lot.lot, LotRoute { job, tx: tx.clone() });
    let (hypervisor, arch) = (lot.image.vm.hypervisor, &lot.image.vm.arch);
    let subjects: Vec<String> = match &lot.shards {
        None => vec![subjects::lot(hypervisor, arch)],
        Some(shards) => shards
            .iter()
            .map(|shard| subjects::lot_shard(hypervisor, arch, *shard))
            .chain(lot.invited.iter().map(|p| subjects::lot_for(hypervisor, arch, p)))
            .collect(),
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&lot).expect("lot serializes"));
    for subject in subjects {
        if let Err(err) = shared.client.publish(subject, body.clone()).await {
            shared.lots.lock().expect("lots lock").remove(&lot.lot);
            return Err(BrokerError::nats("publish lot", err));
        }
    }
    tracing::debug!(%job, lot = %lot.lot, segment = lot.segment, attempt = lot.attempt, shards = ?lot.shards, invited = lot.invited.len(), "lot offered");

    let mut bids: Vec<Bid> = Vec::new();
    let mut over_budget = false;
    let window = tokio::time::sleep(bid_window);
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                shared.lots.lock().expect("lots lock").remove(&lot.lot);
                return Ok(Offer::Stopped);
            }
            _ = &mut window => break,
            event = rx.recv() => match event {
                Some(LotEvent::Bid(bid)) if bid.lot == lot.lot => {
                    let checked = if !lot.invites(&bid.provider) {
                        Err(BidRefused::NotInvited(bid.provider))
                    } else if !shared.provider_offers(&bid.provider, &lot.image.vm) {
                        Err(BidRefused::Unfit(bid.provider))
                    } else if bids.iter().any(|b| b.provider == bid.provider) {
                        Err(BidRefused::Duplicate(bid.provider))
                    } else {
                        auction::check_bid(&bid, &lot.reserve_price, &remaining)
                    };
                    match checked {
                        Ok(()) => bids.push(bid),
                        Err(refused) => {
                            over_budget |= matches!(refused, BidRefused::AboveBudget { .. });
                            tracing::warn!(%job, lot = %lot.lot, provider = %bid.provider, %refused, "bid refused");
                        }
                    }
                }
                Some(LotEvent::Bid(bid)) => tracing::warn!(lot = %bid.lot, "bid for a closed lot ignored"),
                Some(LotEvent::Result(event)) => {
                    let (result, msg) = *event;
                    tracing::warn!(lot = %result.lot, provider = %result.provider, "result for a lot not awarded; refused");
                    let _ = msg.ack().await;
                }
                None => return Ok(Offer::Stopped),
            }
        }
    }
    shared.lots.lock().expect("lots lock").remove(&lot.lot);

    let valid_bids = bids.len();
    // Choose and hold the winners' slots in one step, so two lots closing at
    // once cannot both take a provider's last slot.
    let winners = {
        let mut capacity = shared.capacity.lock().expect("capacity lock");
        bids.retain(|b| capacity.has_room(&b.provider, b.slots));
        let winners = auction::award(
            bids,
            status.spec.redundancy as usize,
            shared.config.pricing,
            &lot.reserve_price,
        );
        for (provider, _) in &winners {
            capacity.commit(*provider, lot.lot);
        }
        winners
    };
    if winners.is_empty() {
        if over_budget && valid_bids == 0 {
            finish(
                shared,
                job,
                JobState::BudgetSpent,
                "no bid fits the remaining budget".into(),
            )
            .await?;
            return Ok(Offer::Stopped);
        }
        if status.open_lot.is_some() || !status.waiting_for_providers {
            shared
                .jobs
                .update::<std::convert::Infallible, _>(&job, |s| {
                    s.open_lot = None;
                    s.waiting_for_providers = true;
                    Ok(())
                })
                .await
                .map_err(update_failed)?;
        }
        if valid_bids == 0 {
            tracing::info!(%job, lot = %lot.lot, "no bids; waiting for providers");
            return Ok(Offer::NoBids);
        }
        tracing::debug!(%job, lot = %lot.lot, valid_bids, "every bidder is busy; offering again soon");
        return Ok(Offer::AllBusy);
    }
    let release = |shared: &Arc<Shared>| shared.release_slots(winners.iter().map(|(p, _)| *p), &lot.lot);

    let allowance = Duration::from_secs(lot.segment_seconds as u64) + shared.config.transfer_allowance;
    let deadline = Utc::now() + chrono::Duration::from_std(allowance).unwrap_or_default();
    let (record, awarded) = (lot.clone(), winners.clone());
    let recorded = shared
        .jobs
        .update(&job, move |s| {
            if s.state.is_final() {
                return Err("job ended");
            }
            s.open_lot = Some(OpenLot {
                lot: record.clone(),
                awarded: awarded.clone(),
                award_deadline: Some(deadline),
            });
            s.attempts = record.attempt;
            s.waiting_for_providers = false;
            Ok(())
        })
        .await;
    match recorded {
        Ok(_) => {}
        Err(UpdateError::Refused(_)) | Err(UpdateError::NotFound) => {
            release(shared);
            return Ok(Offer::Stopped);
        }
        Err(UpdateError::Broker(e)) => {
            release(shared);
            return Err(e);
        }
    }
    let sends = winners.iter().map(|(provider, price)| {
        let award = ToProvider::Award(Box::new(Award {
            version: WIRE_VERSION,
            lot: lot.clone(),
            provider: *provider,
            price: price.clone(),
            deadline,
        }));
        async move { award_to(shared, provider, &award).await }
    });
    let taken = futures::future::join_all(sends).await;
    let mut accepted = 0;
    for ((provider, price), taken) in winners.iter().zip(taken) {
        match taken {
            Ok(()) => {
                accepted += 1;
                tracing::info!(%job, lot = %lot.lot, %provider, %price, "awarded");
            }
            Err(reason) => {
                tracing::warn!(%job, lot = %lot.lot, %provider, %reason, "award not taken");
                shared.release_slots([*provider], &lot.lot);
            }
        }
    }
    if accepted == 0 {
        clear_open_lot(shared, job).await?;
        return Ok(Offer::AllBusy);
    }
    Ok(Offer::Awarded(Box::new((lot, winners, deadline))))
}

/// How long a provider has to confirm an award.
const AWARD_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends an award; Ok once the provider confirms it took it.
async fn award_to(shared: &Arc<Shared>, provider: &ProviderId, award: &ToProvider) -> Result<(), String> {
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

/// Tells a provider to stop an attempt. Best effort: a provider that misses
/// it runs on, and its late result is refused.
async fn send_to_provider(
    shared: &Arc<Shared>,
    provider: &ProviderId,
    msg: &ToProvider,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(msg).expect("provider message serializes");
    shared
        .client
        .publish(subjects::award(provider), body.into())
        .await
        .map_err(|e| BrokerError::nats("publish to provider", e))
}

async fn await_result(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    awarded: &Awarded,
    deadline: chrono::DateTime<Utc>,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<Waited, BrokerError> {
    let job = status.job;
    let left = (deadline - Utc::now()).to_std().unwrap_or_default();
    let timeout = tokio::time::sleep(left);
    tokio::pin!(timeout);
    let known = verify::known_blocks(&shared.store, &status.checkpoint).await;
    loop {
        let (result, msg) = tokio::select! {
            _ = stop.cancelled() => return Ok(Waited::Stopped),
            _ = &mut timeout => return Ok(Waited::TimedOut),
            event = rx.recv() => match event {
                Some(LotEvent::Result(event)) => *event,
                Some(LotEvent::Bid(_)) => continue,
                None => return Ok(Waited::Stopped),
            }
        };
        match check_result(shared, lot, awarded, &result, &known).await {
            Ok(price) => {
                let settlement = Settlement {
                    job,
                    segment: lot.segment,
                    lot: lot.lot,
                    attempt: lot.attempt,
                    provider: result.provider,
                    payer: status.spec.account.clone(),
                    amount: price,
                    at: Utc::now(),
                    guest: result.guest.clone(),
                    console: result.console,
                    timings: result.timings,
                    fetched_bytes: result.fetched_bytes,
                    sent_bytes: result.sent_bytes,
                    finished_at: result.finished_at,
                };
                let recorded = shared.books.settle(settlement, shared.config.fee_rate).await?;
                if matches!(recorded, vmlot_ledger::Recorded::Now(_))
                    && crate::fault_injected("crash-after-settlement")
                {
                    tracing::error!(%job, segment = lot.segment, "fault injected: dying between settlement and the next lot");
                    std::process::abort();
                }
                if let vmlot_ledger::Recorded::Before(_) = recorded {
                    tracing::warn!(%job, segment = lot.segment, "segment was already paid; no second payment");
                }
                let Some(paid) = recorded.tx().settlement.as_deref() else {
                    return Err(BrokerError::nats(
                        "settle",
                        "settlement record without its details",
                    ));
                };
                apply_settlement(shared, paid).await?;
                let winner = paid.provider;
                let losers: Vec<ProviderId> =
                    awarded.iter().map(|(p, _)| *p).filter(|p| *p != winner).collect();
                for provider in &losers {
                    let cancel = ToProvider::Cancel(CancelAttempt {
                        version: WIRE_VERSION,
                        lot: lot.lot,
                        reason: format!("segment settled by {winner}"),
                    });
                    if let Err(err) = send_to_provider(shared, provider, &cancel).await {
                        tracing::warn!(%provider, %err, "could not send cancel");
                    }
                }
                let _ = msg.ack().await;
                tracing::info!(%job, segment = lot.segment, provider = %winner, amount = %paid.amount, "settled");
                return Ok(Waited::Settled);
            }
            Err(reason) => {
                tracing::warn!(%job, lot = %lot.lot, provider = %result.provider, %reason, "result refused");
                let _ = msg.ack().await;
            }
        }
    }
}

/// Checks a result against the lot it claims; returns the price owed.
async fn check_result(
    shared: &Arc<Shared>,
    lot: &Lot,
    awarded: &Awarded,
    result: &SegmentResult,
    known: &std::collections::HashSet<vmlot_schemas::BlockId>,
) -> Result<Money, String> {
    if result.lot != lot.lot
        || result.job != lot.job
        || result.segment != lot.segment
        || result.attempt != lot.attempt
    {
        return Err("result does not match the open lot (job, segment or attempt)".into());
    }
    let Some((_, price)) = awarded.iter().find(|(p, _)| *p == result.provider) else {
        return Err("provider was not awarded this lot".into());
    };
    if let GuestState::Running { checkpoint } = &result.guest {
        verify::checkpoint(&shared.store, checkpoint, known)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(price.clone())
}

/// Records a paid segment in the job (once: a repeat finds it applied).
async fn apply_settlement(shared: &Arc<Shared>, payment: &Settlement) -> Result<(), BrokerError> {
    let payment = payment.clone();
    let job = payment.job;
    shared
        .jobs
        .update::<std::convert::Infallible, _>(&job, move |s| {
            if s.settled.len() as u32 != payment.segment {
                return Ok(());
            }
            let awarded = s
                .open_lot
                .as_ref()
                .filter(|open| open.lot.lot == payment.lot)
                .map(|open| open.awarded.iter().map(|(p, _)| *p).collect())
                .unwrap_or_else(|| vec![payment.provider]);
            s.settled.push(SettledSegment {
                segment: payment.segment,
                attempt: payment.attempt,
                lot: payment.lot,
                provider: payment.provider,
                awarded,
                price: payment.amount.clone(),
                guest: payment.guest.clone(),
                console: payment.console,
                timings: payment.timings,
                fetched_bytes: payment.fetched_bytes,
                sent_bytes: payment.sent_bytes,
                settled_at: payment.at,
            });
            s.spent.amount += payment.amount.amount;
            s.open_lot = None;
            s.attempts = 0;
            s.waiting_for_providers = false;
            if s.state.is_final() {
                return Ok(());
            }
            match &payment.guest {
                GuestState::Running { checkpoint } => s.checkpoint = checkpoint.clone(),
                GuestState::Halted => {
                    s.state = JobState::Done;
                    s.end_reason = Some("guest halted".into());
                }
                GuestState::Crashed { reason } => {
                    s.state = JobState::Failed;
                    s.end_reason = Some(format!("guest crashed: {reason}"));
                }
            }
            Ok(())
        })
        .await
        .map_err(update_failed)?;
    Ok(())
}

/// Tells the providers of a job's open awarded lot to stop.
async fn cancel_open_lot(shared: &Arc<Shared>, status: &JobStatus, reason: &str) {
    let Some(open) = &status.open_lot else { return };
    let providers: Vec<ProviderId> = open.awarded.iter().map(|(p, _)| *p).collect();
    for provider in &providers {
        let cancel = ToProvider::Cancel(CancelAttempt {
            version: WIRE_VERSION,
            lot: open.lot.lot,
            reason: reason.into(),
        });
        if let Err(err) = send_to_provider(shared, provider, &cancel).await {
            tracing::warn!(%provider, %err, "could not send cancel");
        }
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
