//! One task per running job: the loop over the market's steps. Each pass
//! reads the job's record and takes the next step: pay a settled segment
//! the record holds and the books do not (`settle::pay_recorded`: its
//! broker died between the two), post or void the payments that are due
//! ([`crate::resolve`]), refund an ended job ([`crate::refund`]), end a
//! job whose count or budget is
//! reached, wait for a lot still awarded, or offer a new attempt
//! ([`crate::offer`]) and award it ([`crate::award`]), then wait for its
//! results ([`crate::settle`]). The rules are [`crate::lifecycle`]'s; this
//! module holds only the order, the backoff between offers, and what a
//! cancel or shutdown does. A NATS error ends one pass, and the task
//! resumes from the job's record after a pause.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use vmlot_schemas::market::{JobStatus, Lot};
use vmlot_schemas::{JobId, LotId};

use crate::award::{self, Awarded};
use crate::error::BrokerError;
use crate::lifecycle::{self, Refused};
use crate::offer::{self, Offered};
use crate::settle::{self, Waited};
use crate::shared::{LotEvent, Shared};
use crate::state::UpdateError;
use crate::{cancel, hold, refund, resolve};

/// Longest wait before offering again when every bidder was busy.
const BUSY_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Longest pause before a job task that failed resumes from its record.
const RESUME_PAUSE_CAP: Duration = Duration::from_secs(30);

impl Shared {
    /// Starts the task that drives `job`, unless one already does or this
    /// broker does not hold the job's partition. A lot the job has open is
    /// routed to it at once, so results that waited in the stream while
    /// no broker ran are not refused as unknown.
    pub fn spawn_job(self: &Arc<Self>, job: JobId, open_lot: Option<LotId>) {
        let (parent, tracker) = {
            let partitions = self.partitions.lock().expect("partitions lock");
            match partitions.get(&vmlot_schemas::subjects::partition_of(&job)) {
                Some(holding) => (holding.token.clone(), holding.tracker.clone()),
                None => return,
            }
        };
        let token = {
            let mut running = self.running.lock().expect("running lock");
            if running.contains_key(&job) {
                return;
            }
            let token = parent.child_token();
            running.insert(job, token.clone());
            token
        };
        let (tx, rx) = mpsc::channel(1024);
        if let Some(lot) = open_lot {
            self.route_results(lot, job, &tx);
        }
        let shared = Arc::clone(self);
        let task = async move {
            crate::metrics::job_task(1.0);
            let mut rx = rx;
            let mut pause = Duration::from_secs(1);
            // A NATS error stops one pass, not the job: it resumes from its
            // durable record, which every step writes first.
            while let Err(err) = drive(&shared, job, &parent, token.clone(), tx.clone(), &mut rx).await {
                tracing::error!(%err, ?pause, "job task failed; resuming from its record");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RESUME_PAUSE_CAP);
            }
            shared.running.lock().expect("running lock").remove(&job);
            shared.in_flight.lock().expect("in-flight lock").release(&job);
            crate::metrics::job_task(-1.0);
        };
        self.tasks
            .spawn(tracker.track_future(task.instrument(tracing::info_span!("job", %job))));
    }
}

/// The wait between offers that found no winner: doubles from the
/// broker's minimum, and each offer that drew no bid at all invites twice
/// as many providers the next time.
struct Pace {
    backoff: Duration,
    /// Offers in a row that drew no bid.
    quiet_offers: u32,
}

impl Pace {
    fn new(shared: &Shared) -> Self {
        Self {
            backoff: shared.config.min_backoff,
            quiet_offers: 0,
        }
    }

    fn awarded(&mut self, shared: &Shared) {
        self.backoff = shared.config.min_backoff;
        self.quiet_offers = 0;
    }

    /// Waits for a slot to free up somewhere (one waiting job wakes per
    /// slot) or for the backoff, whichever comes first: a market short of
    /// providers queues its jobs instead of flooding providers with lots.
    /// Bidders that were all busy are there and will be free soon: their
    /// wait stays short.
    async fn wait(&mut self, shared: &Shared, stop: &CancellationToken, no_bids: bool) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = shared.slot_freed.notified() => {}
            _ = tokio::time::sleep(self.backoff) => {}
        }
        let cap = if no_bids {
            shared.config.max_backoff
        } else {
            shared.config.max_backoff.min(BUSY_BACKOFF_CAP)
        };
        self.backoff = (self.backoff * 2).min(cap);
        if no_bids {
            self.quiet_offers = self.quiet_offers.saturating_add(1);
        }
    }
}

/// Drives `job` until it ends or `stop` fires: a cancel, or `partition`
/// (shutdown, or the job's partition given up here).
pub(crate) async fn drive(
    shared: &Arc<Shared>,
    job: JobId,
    partition: &CancellationToken,
    stop: CancellationToken,
    tx: mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
) -> Result<(), BrokerError> {
    let mut pace = Pace::new(shared);
    hold::ensure_held(shared, job).await?;
    // The last payment this task found on the books.
    let mut on_books = None;
    loop {
        if stop.is_cancelled() {
            return on_stop(shared, job, partition, &mut on_books).await;
        }
        let Some((status, _)) = shared.jobs.get(&job).await? else {
            return Ok(());
        };
        settle::pay_recorded(shared, &status, &mut on_books).await?;
        if resolve::due(shared, &status).await? {
            continue;
        }
        if status.state.is_final() {
            crate::metrics::job_ended(status.state);
            cancel::open_lot(shared, &status, "job ended").await;
            return refund::refund(shared, &status).await;
        }
        if let Some(ending) = lifecycle::ending(&status) {
            shared.jobs.end(&job, ending).await?;
            continue;
        }
        let now = Utc::now();
        let status = match lifecycle::deadline_passed(&status, now) {
            // Resumed after a restart: wait for the lot still awarded.
            Err(Refused::AwardPending { .. }) => {
                let lot = status.open_lot.as_ref().map(|open| open.lot.clone());
                let Some(lot) = lot else { continue };
                let resumed = async {
                    award::resume(shared, &status);
                    wait_for_results(shared, &status, &lot, &tx, rx, &stop).await
                };
                resumed.instrument(attempt_span(&lot)).await?;
                continue;
            }
            Ok(next) => {
                cancel::open_lot(shared, &status, "attempt timed out").await;
                next
            }
            Err(_) => status,
        };
        let lot = lifecycle::offer(
            &status,
            LotId::new(),
            now,
            shared.config.bid_window,
            shared.config.check_seconds,
        )?;
        let span = attempt_span(&lot);
        attempt(shared, &status, lot, &mut pace, &tx, rx, &stop)
            .instrument(span)
            .await?;
    }
}

/// The span of one attempt at one segment (or at the check restore):
/// every step of it logs inside.
fn attempt_span(lot: &Lot) -> tracing::Span {
    tracing::info_span!("attempt", segment = lot.segment, attempt = lot.attempt, lot = %lot.lot, check = lot.check)
}

/// One attempt: offer the lot, award it, wait for its results; or, when
/// nobody won, wait before the next offer.
async fn attempt(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: Lot,
    pace: &mut Pace,
    tx: &mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let offered = offer::offer(shared, status, lot, pace.quiet_offers, tx, rx, stop)
        .instrument(tracing::info_span!("offer"))
        .await?;
    let Offered::Bids {
        lot,
        bids,
        over_budget,
    } = offered
    else {
        return Ok(());
    };
    // The offer left the lot's results routed: a provider may answer its
    // award before the broker hears its reply. Nobody took it: unrouted.
    let awarded = award::award(shared, status, &lot, bids, over_budget).await;
    if !matches!(awarded, Ok(Awarded::Taken(_))) {
        shared.unroute_lot(&lot.lot);
    }
    match awarded? {
        Awarded::Taken(recorded) => {
            pace.awarded(shared);
            wait_for_results(shared, &recorded, &lot, tx, rx, stop).await
        }
        Awarded::NoBids => {
            pace.wait(shared, stop, true).await;
            Ok(())
        }
        Awarded::AllBusy => {
            pace.wait(shared, stop, false).await;
            Ok(())
        }
        Awarded::Stopped => Ok(()),
    }
}

/// Routes the awarded `lot`'s results to this task until it settles, times
/// out or is stopped; its providers' slots are free again after.
async fn wait_for_results(
    shared: &Arc<Shared>,
    status: &JobStatus,
    lot: &Lot,
    tx: &mpsc::Sender<LotEvent>,
    rx: &mut mpsc::Receiver<LotEvent>,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    shared.route_results(lot.lot, status.job, tx);
    let waited = settle::await_result(shared, status, rx, stop).await;
    shared.unroute_lot(&lot.lot);
    let awarded = status
        .open_lot
        .iter()
        .flat_map(|open| open.awarded.iter().map(|(p, _)| *p));
    shared.release_slots(awarded, &lot.lot);
    match waited? {
        Waited::Settled | Waited::Stopped => {}
        Waited::TimedOut => tracing::warn!("no valid result by the deadline; offering again"),
        Waited::AllRefused | Waited::VoidDue => {
            tracing::warn!("no awarded provider can settle the attempt; closing it");
            cancel::open_lot(shared, status, "the attempt is over").await;
            match shared.jobs.transition(&status.job, lifecycle::withdraw_lot).await {
                Ok(_) | Err(UpdateError::Refused(Refused::NoOpenLot | Refused::Final(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Stopped by shutdown (leave everything as it stands: results wait in
/// their stream) or by a cancel (tell the awarded providers).
async fn on_stop(
    shared: &Arc<Shared>,
    job: JobId,
    partition: &CancellationToken,
    on_books: &mut Option<(u32, u32)>,
) -> Result<(), BrokerError> {
    // A shutdown, or the partition given up here (to another broker, or
    // for a lapse of the lease: this broker may hold it again by now,
    // with another task for the job): the job stays as its record says,
    // for whoever runs it next.
    if shared.shutdown.is_cancelled() || partition.is_cancelled() {
        return Ok(());
    }
    if let Some((status, _)) = shared.jobs.get(&job).await? {
        settle::pay_recorded(shared, &status, on_books).await?;
        cancel::open_lot(shared, &status, "job cancelled").await;
        match shared.jobs.transition(&job, lifecycle::withdraw_lot).await {
            Ok(_) | Err(UpdateError::Refused(Refused::NoOpenLot)) => {}
            Err(e) => return Err(e.into()),
        }
        if status.state.is_final() {
            resolve::due(shared, &status).await?;
            refund::refund(shared, &status).await?;
        }
    }
    Ok(())
}
