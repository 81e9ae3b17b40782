//! Partial segments: a provider whose machine owner needed the machine
//! back saves the guest before its segment's time is up and says so
//! ([`SegmentResult::preempted`]). The broker takes that early checkpoint
//! as progress (the job goes on from it), pays it by its setting
//! ([`PartialPay`]) for the time it ran, and offers the rest of the
//! segment as the next lot. Pure: the job's open lot, the result and when
//! the NATS server stored it.
//!
//! The time is the broker's measure, not the provider's word alone: the
//! run time the provider reports, never more than the time since its
//! award. A provider that claims less is paid less; one that claims more
//! than the wall clock allows is paid for the wall clock.

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use vmlot_schemas::Money;
use vmlot_schemas::market::{GuestState, OpenLot, SegmentResult};

/// How a partial segment is paid: a broker setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartialPay {
    /// The winning bid times the share of the lot's time it ran.
    #[default]
    ProRata,
    /// Nothing: a provider is paid for whole segments only.
    Unpaid,
}

impl std::str::FromStr for PartialPay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pro-rata" => Ok(PartialPay::ProRata),
            "none" => Ok(PartialPay::Unpaid),
            other => Err(format!("unknown partial pay {other:?} (pro-rata | none)")),
        }
    }
}

/// Decimal places a pro-rata price keeps (rounded toward zero: the
/// submitter never pays more than the share).
const PRICE_PLACES: u32 = 8;

/// The milliseconds of the open lot that `result` ran if it is a partial
/// segment: a running guest saved early, with less than the lot's time
/// run. `None`: it is a whole segment (or ended), checked as one.
pub fn ran_ms(open: &OpenLot, result: &SegmentResult, received: DateTime<Utc>) -> Option<u64> {
    if !result.preempted || !matches!(result.guest, GuestState::Running { .. }) {
        return None;
    }
    let lot_ms = u64::from(open.lot.segment_seconds) * 1000;
    let since_award = open
        .awarded_at
        .map(|at| (received - at).num_milliseconds().max(0) as u64)
        .unwrap_or(lot_ms);
    let ran = result.timings.run_ms.min(since_award);
    (ran < lot_ms).then_some(ran)
}

/// What a partial segment of `ran_ms` earns under `pay`, at `bid` for a
/// lot of `segment_seconds`.
pub fn price(pay: PartialPay, bid: &Money, ran_ms: u64, segment_seconds: u32) -> Money {
    let lot_ms = u64::from(segment_seconds) * 1000;
    let amount = match pay {
        PartialPay::Unpaid => Decimal::ZERO,
        _ if lot_ms == 0 => Decimal::ZERO,
        PartialPay::ProRata => (bid.amount * Decimal::from(ran_ms.min(lot_ms)) / Decimal::from(lot_ms))
            .round_dp_with_strategy(PRICE_PLACES, RoundingStrategy::ToZero)
            .normalize(),
    };
    Money::new(amount, bid.unit.clone())
}

/// The seconds the next lot runs: what is left of a segment of
/// `segment_seconds` once partial segments ran `partial_ms` of it (at
/// least one second).
pub fn rest_seconds(segment_seconds: u32, partial_ms: u64) -> u32 {
    let left = (u64::from(segment_seconds) * 1000).saturating_sub(partial_ms);
    (left.div_ceil(1000) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use vmlot_schemas::ProviderId;
    use vmlot_schemas::market::Checkpoint;

    use super::*;
    use crate::fixtures::{job, money, offered, result_of};
    use crate::lifecycle::award;

    #[test]
    fn pro_rata_is_the_share_of_the_lot_run_rounded_down() {
        assert_eq!(
            price(PartialPay::ProRata, &money("0.3"), 12_000, 30),
            money("0.12")
        );
        assert_eq!(price(PartialPay::ProRata, &money("1"), 1, 3), money("0.00033333"));
        // Never more than the bid.
        assert_eq!(price(PartialPay::ProRata, &money("1"), 99_000, 30), money("1"));
        assert_eq!(price(PartialPay::Unpaid, &money("0.3"), 12_000, 30), money("0"));
        assert_eq!(price(PartialPay::ProRata, &money("0.3"), 0, 30), money("0"));
    }

    #[test]
    fn the_rest_is_what_partials_left_of_the_segment() {
        assert_eq!(rest_seconds(30, 12_000), 18);
        assert_eq!(rest_seconds(30, 12_001), 18);
        assert_eq!(rest_seconds(30, 29_999), 1);
        assert_eq!(rest_seconds(30, 45_000), 1);
        assert_eq!(rest_seconds(30, 0), 30);
    }

    #[test]
    fn a_partial_runs_less_than_its_lot_by_the_broker_s_clock() {
        let p = ProviderId::new();
        let status = job(vmlot_schemas::market::SegmentCount::UntilHalt);
        let lot = vmlot_schemas::market::Lot {
            segment_seconds: 30,
            ..offered(&status, Utc::now())
        };
        let awarded_at = Utc::now();
        let deadline = awarded_at + Duration::minutes(5);
        let status = award(&status, &lot, &[(p, money("0.3"))], deadline, awarded_at).unwrap();
        let open = status.open_lot.clone().unwrap();
        let running = GuestState::Running {
            checkpoint: Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
                memory: None,
            },
        };
        let mut result = result_of(&status, p, running);
        result.timings.run_ms = 12_000;
        let at = |s: i64| awarded_at + Duration::seconds(s);
        // Not preempted: a whole segment.
        assert_eq!(ran_ms(&open, &result, at(20)), None);
        result.preempted = true;
        assert_eq!(ran_ms(&open, &result, at(20)), Some(12_000));
        // It cannot have run longer than since its award.
        assert_eq!(ran_ms(&open, &result, at(5)), Some(5_000));
        // A "partial" as long as its lot is a whole segment.
        result.timings.run_ms = 30_000;
        assert_eq!(ran_ms(&open, &result, at(40)), None);
        // An ended guest is no partial.
        result.guest = GuestState::Halted { final_state: None };
        result.timings.run_ms = 1_000;
        assert_eq!(ran_ms(&open, &result, at(40)), None);
    }
}
