//! What the daemon's tasks share: the connections, the settings, the
//! drivers, the attempts under way and the slot permits. Every task holds
//! an `Arc` of it; none of them owns another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockCache, BlockStore};
use vmlot_schemas::{HypervisorKind, LotId};

use super::span::LotRef;
use crate::config::ProviderConfig;
use crate::driver::Driver;

pub(super) struct Daemon {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub store: BlockStore,
    pub cache: Arc<BlockCache>,
    /// The RAM files of this provider's last segments, to pull onto.
    pub kept: super::kept::Kept,
    pub config: ProviderConfig,
    pub drivers: HashMap<HypervisorKind, Arc<dyn Driver>>,
    /// Segments awarded and not finished, by lot (running or waiting for a slot).
    pub active: Mutex<HashMap<LotId, Active>>,
    /// One permit per slot, held while a segment runs. The broker never has
    /// more awards outstanding than the slots bids declare; an award can
    /// still arrive while a cancelled segment is winding down, and waits.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Every task of the daemon, waited for at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled at shutdown; each attempt's token is a child of it.
    pub shutdown: CancellationToken,
    /// The machine owner's activity, this daemon's guests left out; the
    /// bids, the heartbeats and every running segment's owner policy ask
    /// the same meter.
    pub owner: Arc<crate::owner::Meter>,
}

/// An attempt this provider took on.
pub(super) struct Active {
    /// Cancels the attempt (a `Cancel` from the broker, or shutdown).
    pub token: CancellationToken,
    /// For the cancel step's span.
    pub lot: LotRef,
}

impl Daemon {
    pub fn free_slots(&self) -> u32 {
        let active = self.active.lock().expect("active lock").len();
        self.config.slots.saturating_sub(active as u32)
    }
}
