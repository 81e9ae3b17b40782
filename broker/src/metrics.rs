//! The broker's Prometheus series (served by [`vmlot_telemetry::serve`]
//! when `--metrics-listen` is given; recorded either way, at no cost
//! without an endpoint). One function per thing that happens, called
//! where it happens; every label takes a bounded set of values.
//!
//! | series | type | labels |
//! |---|---|---|
//! | `vmlot_broker_jobs_submitted_total` | counter | |
//! | `vmlot_broker_jobs_running` | gauge | (job tasks this broker runs) |
//! | `vmlot_broker_jobs_ended_total` | counter | `state` |
//! | `vmlot_broker_lots_offered_total` | counter | |
//! | `vmlot_broker_bids_total` | counter | (bids routed to an open lot) |
//! | `vmlot_broker_awards_total` | counter | |
//! | `vmlot_broker_segments_settled_total` | counter | `partial` |
//! | `vmlot_broker_settle_seconds` | histogram | (result at the server to settlement written) |
//! | `vmlot_broker_segment_phase_seconds` | histogram | `phase` (as providers report) |
//! | `vmlot_broker_fetched_bytes_total`, `vmlot_broker_sent_bytes_total` | counter | (block bytes providers report) |
//! | `vmlot_broker_payments_total` | counter | `kind`: settle, post, void, refund, forfeit |
//! | `vmlot_broker_refused_total` | counter | `message`: bid, result, heartbeat, request; `reason` |

use chrono::{DateTime, Utc};
use metrics::{counter, gauge, histogram};
use vmlot_schemas::market::{JobState, SegmentResult};

pub fn job_submitted() {
    counter!("vmlot_broker_jobs_submitted_total").increment(1);
}

/// A job task started (`+1`) or ended (`-1`) on this broker.
pub fn job_task(delta: f64) {
    gauge!("vmlot_broker_jobs_running").increment(delta);
}

/// A job reached its final state (`done`, `cancelled`, ...), named as on
/// the wire.
pub fn job_ended(state: JobState) {
    let name = serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    counter!("vmlot_broker_jobs_ended_total", "state" => name).increment(1);
}

pub fn lot_offered() {
    counter!("vmlot_broker_lots_offered_total").increment(1);
}

pub fn bid_routed() {
    counter!("vmlot_broker_bids_total").increment(1);
}

pub fn awarded() {
    counter!("vmlot_broker_awards_total").increment(1);
}

/// A segment settled on `result`, which reached the NATS server at
/// `received`.
pub fn settled(result: &SegmentResult, received: DateTime<Utc>, partial: bool) {
    counter!("vmlot_broker_segments_settled_total", "partial" => if partial { "yes" } else { "no" })
        .increment(1);
    let latency = (Utc::now() - received).num_microseconds().unwrap_or(0).max(0);
    histogram!("vmlot_broker_settle_seconds").record(latency as f64 / 1e6);
    for (phase, ms) in result.timings.phases() {
        histogram!("vmlot_broker_segment_phase_seconds", "phase" => phase).record(ms as f64 / 1e3);
    }
    counter!("vmlot_broker_fetched_bytes_total").increment(result.fetched_bytes);
    counter!("vmlot_broker_sent_bytes_total").increment(result.sent_bytes);
}

/// Money moved: `settle` (escrow to pending), `post`, `void`, `refund`,
/// `forfeit`; counted when written, not when found written before.
pub fn payment(kind: &'static str, recorded: &vmlot_ledger::Recorded) {
    if matches!(recorded, vmlot_ledger::Recorded::Now(_)) {
        counter!("vmlot_broker_payments_total", "kind" => kind).increment(1);
    }
}

/// A message refused: `message` is `bid`, `result`, `heartbeat` or
/// `request`; `reason` one of a fixed set of words (a refusal's kind).
pub fn refused(message: &'static str, reason: impl std::fmt::Display) {
    counter!("vmlot_broker_refused_total", "message" => message, "reason" => reason.to_string()).increment(1);
}
