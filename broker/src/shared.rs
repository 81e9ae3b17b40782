//! What the broker's tasks share: NATS, the store, the job records, the
//! books, the lots open now (to route bids and results to their job task),
//! the providers heard from, and the capacity table.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::BlockStore;
use vmlot_schemas::market::{Bid, Heartbeat, SegmentResult};
use vmlot_schemas::{JobId, LotId, ProviderId};

use crate::capacity::Capacity;
use crate::config::BrokerConfig;
use crate::quota::InFlight;
use crate::state::JobStore;

/// A rate limit per caller (`governor`'s keyed limiter).
pub(crate) type RateLimiter = governor::DefaultKeyedRateLimiter<vmlot_schemas::caller::Caller>;

/// What reaches a job task about its open lot.
pub(crate) enum LotEvent {
    Bid(Bid),
    Result(Box<(SegmentResult, jetstream::Message)>),
}

/// Routing of bids and results to the job task that owns the lot.
pub(crate) struct LotRoute {
    pub job: JobId,
    pub tx: mpsc::Sender<LotEvent>,
    /// The lot's bid window is open: bids are routed too, not only
    /// results.
    pub bids: bool,
}

/// A partition of the jobs this broker holds the lease of.
pub(crate) struct Holding {
    /// Cancelled when the partition is handed back or lost.
    pub token: CancellationToken,
    /// Its job and routing tasks.
    pub tracker: TaskTracker,
    /// The lease entry's revision, for the next renewal.
    pub revision: u64,
    /// When the lease was last renewed.
    pub renewed: std::time::Instant,
}

/// State shared by the broker's tasks.
pub(crate) struct Shared {
    pub client: async_nats::Client,
    pub store: BlockStore,
    pub jobs: JobStore,
    pub books: vmlot_ledger::Books,
    /// What each provider's results came to.
    pub standings: crate::standing::Standings,
    pub config: BrokerConfig,
    pub lots: Mutex<HashMap<LotId, LotRoute>>,
    pub providers: Mutex<HashMap<ProviderId, (Heartbeat, std::time::Instant)>>,
    pub capacity: Mutex<Capacity>,
    /// Signalled once per slot freed: jobs that found no free bidder wait
    /// on it (one wakes per slot, in turn) instead of re-offering blindly.
    pub slot_freed: tokio::sync::Notify,
    pub running: Mutex<HashMap<JobId, CancellationToken>>,
    /// The partitions of the jobs this broker holds the leases of, and
    /// their tasks (see [`crate::lease`]).
    pub partitions: Mutex<HashMap<u16, Holding>>,
    /// Each account's jobs in flight, against its quota.
    pub in_flight: Mutex<InFlight>,
    /// API requests per caller per second.
    pub rates: RateLimiter,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

/// The hypervisor, architecture and memory a heartbeat declares cover `vm`.
fn offers(hb: &Heartbeat, vm: &vmlot_schemas::VmConfig) -> bool {
    hb.hypervisors.contains(&vm.hypervisor) && hb.arch == vm.arch && hb.memory_mib >= vm.memory_mib
}

impl Shared {
    /// Routes bids and results for `lot` to the job task listening on `tx`.
    pub fn route_lot(&self, lot: LotId, job: JobId, tx: &mpsc::Sender<LotEvent>) {
        self.route(lot, job, tx, true);
    }

    /// Routes only the results for `lot` (awarded, or being awarded) to the
    /// job task listening on `tx`: its bids are refused.
    pub fn route_results(&self, lot: LotId, job: JobId, tx: &mpsc::Sender<LotEvent>) {
        self.route(lot, job, tx, false);
    }

    fn route(&self, lot: LotId, job: JobId, tx: &mpsc::Sender<LotEvent>, bids: bool) {
        let route = LotRoute {
            job,
            tx: tx.clone(),
            bids,
        };
        self.lots.lock().expect("lots lock").insert(lot, route);
    }

    /// Closes `lot`'s bid window and keeps routing its results: a provider
    /// may answer its award with a result (a short segment) before the
    /// broker has heard its reply to the award, and that result must reach
    /// the job task rather than be refused as for a lot not open.
    pub fn close_bids(&self, lot: &LotId) {
        if let Some(route) = self.lots.lock().expect("lots lock").get_mut(lot) {
            route.bids = false;
        }
    }

    /// Stops routing `lot`: bids and results for it are refused from now on.
    pub fn unroute_lot(&self, lot: &LotId) {
        self.lots.lock().expect("lots lock").remove(lot);
    }

    /// Live providers that could run `vm`, with their slots: how many the
    /// invitation share is drawn from, and who may be named.
    pub fn eligible_providers(&self, vm: &vmlot_schemas::VmConfig) -> Vec<(ProviderId, u32)> {
        let providers = self.providers.lock().expect("providers lock");
        providers
            .values()
            .filter(|(hb, seen)| seen.elapsed() < self.config.provider_timeout && offers(hb, vm))
            .map(|(hb, _)| (hb.provider, hb.slots))
            .collect()
    }

    /// True when `provider`'s last heartbeat offers what `vm` needs. A bid
    /// from a provider that does not (a QEMU host bidding on a Xen lot, or
    /// one never heard of) is refused whatever subject it came in on.
    pub fn provider_offers(&self, provider: &ProviderId, vm: &vmlot_schemas::VmConfig) -> bool {
        let providers = self.providers.lock().expect("providers lock");
        providers.get(provider).is_some_and(|(hb, _)| offers(hb, vm))
    }

    /// Ends the reservations `lot` holds at `providers` and wakes one
    /// waiting job per slot freed.
    pub fn release_slots(&self, providers: impl IntoIterator<Item = ProviderId>, lot: &LotId) {
        let providers: Vec<ProviderId> = providers.into_iter().collect();
        self.capacity
            .lock()
            .expect("capacity lock")
            .release(providers.iter().copied(), lot);
        for _ in &providers {
            self.slot_freed.notify_one();
        }
    }

    /// Up to `n` of `eligible`, picked at random, with a slot no award
    /// holds: invited to a lot by name, so a market short of slots still
    /// puts each lot before someone free to take it.
    pub fn providers_with_room(&self, eligible: &[(ProviderId, u32)], n: usize) -> Vec<ProviderId> {
        use rand::seq::SliceRandom;
        let mut free: Vec<ProviderId> = {
            let capacity = self.capacity.lock().expect("capacity lock");
            eligible
                .iter()
                .filter(|(p, slots)| capacity.has_room(p, *slots))
                .map(|(p, _)| *p)
                .collect()
        };
        free.shuffle(&mut rand::thread_rng());
        free.truncate(n);
        free
    }

    /// Providers heard from within the provider timeout, by name.
    pub fn live_providers(&self) -> Vec<Heartbeat> {
        let providers = self.providers.lock().expect("providers lock");
        let mut live: Vec<Heartbeat> = providers
            .values()
            .filter(|(_, seen)| seen.elapsed() < self.config.provider_timeout)
            .map(|(hb, _)| hb.clone())
            .collect();
        live.sort_by(|a, b| a.name.cmp(&b.name));
        live
    }
}
