//! The provider's Prometheus series (served by [`vmlot_telemetry::serve`]
//! when `metrics_listen` is set). One function per thing that happens,
//! called where it happens; every label takes a bounded set of values.
//!
//! | series | type | labels |
//! |---|---|---|
//! | `vmlot_provider_lots_seen_total` | counter | |
//! | `vmlot_provider_bids_total` | counter | |
//! | `vmlot_provider_awards_total` | counter | `taken`: yes, no |
//! | `vmlot_provider_segments_total` | counter | `end`: running, halted, crashed, preempted, restore-failed, failed |
//! | `vmlot_provider_segment_phase_seconds` | histogram | `phase`: fetch, start, run, save, upload, suspended |
//! | `vmlot_provider_fetched_bytes_total`, `vmlot_provider_sent_bytes_total` | counter | (block bytes) |
//! | `vmlot_provider_slots_busy` | gauge | |
//! | `vmlot_provider_owner_idle` | gauge | 1 idle, 0 busy (at the last bid) |

use metrics::{counter, gauge, histogram};
use vmlot_schemas::market::{GuestState, SegmentResult};

pub fn lot_seen() {
    counter!("vmlot_provider_lots_seen_total").increment(1);
}

pub fn bid_sent() {
    counter!("vmlot_provider_bids_total").increment(1);
}

pub fn award(taken: bool) {
    counter!("vmlot_provider_awards_total", "taken" => if taken { "yes" } else { "no" }).increment(1);
}

/// A slot taken (`+1`) or freed (`-1`) by a segment.
pub fn slot(delta: f64) {
    gauge!("vmlot_provider_slots_busy").increment(delta);
}

pub fn owner_idle(idle: bool) {
    gauge!("vmlot_provider_owner_idle").set(if idle { 1.0 } else { 0.0 });
}

/// A segment attempt that ended in an error before any result.
pub fn segment_failed() {
    counter!("vmlot_provider_segments_total", "end" => "failed").increment(1);
}

/// A result published.
pub fn segment(result: &SegmentResult) {
    let end = match (&result.guest, result.preempted) {
        (_, true) => "preempted",
        (GuestState::Running { .. }, false) => "running",
        (GuestState::Halted { .. }, false) => "halted",
        (GuestState::Crashed { .. }, false) => "crashed",
        (GuestState::RestoreFailed { .. }, false) => "restore-failed",
    };
    counter!("vmlot_provider_segments_total", "end" => end).increment(1);
    for (phase, ms) in result.timings.phases() {
        histogram!("vmlot_provider_segment_phase_seconds", "phase" => phase).record(ms as f64 / 1e3);
    }
    counter!("vmlot_provider_fetched_bytes_total").increment(result.fetched_bytes);
    counter!("vmlot_provider_sent_bytes_total").increment(result.sent_bytes);
}
