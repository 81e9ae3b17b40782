//! Heartbeats: the provider's offer (hypervisors, memory, slots free,
//! idle or not) every `heartbeat`, which the broker uses to invite and to
//! check bids.

use std::sync::Arc;

use chrono::Utc;
use vmlot_schemas::market::Heartbeat;
use vmlot_schemas::{WIRE_VERSION, subjects};

use super::state::Daemon;

/// Sends heartbeats until shutdown.
pub(super) async fn heartbeats(daemon: Arc<Daemon>) {
    let subject = subjects::heartbeat(&daemon.config.id);
    let mut tick = tokio::time::interval(daemon.config.heartbeat);
    loop {
        tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = Heartbeat {
            version: WIRE_VERSION,
            provider: daemon.config.id,
            name: daemon.config.name.clone(),
            hypervisors: daemon.config.hypervisors.clone(),
            arch: daemon.config.arch.clone(),
            memory_mib: daemon.config.memory_mib,
            slots: daemon.config.slots,
            free_slots: daemon.free_slots(),
            idle: daemon.owner.idle(daemon.config.idle_load),
            sent_at: Utc::now(),
        };
        let body = serde_json::to_vec(&beat).expect("heartbeat serializes");
        let _ = daemon.client.publish(subject.clone(), body.into()).await;
    }
}
