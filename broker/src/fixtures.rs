//! Jobs, lots and results for the broker's unit tests (no NATS).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vmlot_schemas::market::{
    Checkpoint, GuestState, Image, JobSpec, JobState, JobStatus, Lot, SegmentCount, SegmentResult,
    SegmentTimings,
};
use vmlot_schemas::{HypervisorKind, JobId, LotId, ManifestId, Money, ProviderId, VmConfig, WIRE_VERSION};

use crate::lifecycle::{award, offer};

pub(crate) const WINDOW: Duration = Duration::from_secs(2);

pub(crate) fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

pub(crate) fn checkpoint(name: &[u8]) -> Checkpoint {
    Checkpoint {
        machine_state: Some(ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, name)),
        disks: vec![],
        stored_bytes: 4096,
        memory: None,
    }
}

/// A running job of `segments` segments, budget 10, reserve 1, 2 replicas.
pub(crate) fn job(segments: SegmentCount) -> JobStatus {
    let spec = JobSpec {
        image: Image {
            vm: VmConfig {
                hypervisor: HypervisorKind::Synthetic,
                arch: "x86_64".into(),
                memory_mib: 16,
                vcpus: 1,
                cmdline: String::new(),
            },
            kernel: ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, b"kernel"),
            initrd: None,
            disks: vec![],
        },
        segment_seconds: 1,
        segments,
        redundancy: 2,
        check: vmlot_schemas::market::ResultCheck::Continuation,
        reserve_price: money("1"),
        budget: money("10"),
        account: "alice".into(),
    };
    let start = Checkpoint {
        machine_state: None,
        disks: vec![],
        stored_bytes: 0,
        memory: None,
    };
    JobStatus::submitted(JobId::new(), spec, start, Utc::now())
}

pub(crate) fn ended(state: JobState) -> JobStatus {
    let mut s = job(SegmentCount::UntilHalt);
    s.state = state;
    s
}

pub(crate) fn offered(status: &JobStatus, now: DateTime<Utc>) -> Lot {
    offer(status, LotId::new(), now, WINDOW, 1).expect("offer")
}

/// `status` with a fresh lot awarded to `winners` at 0.5 each, due at `deadline`.
pub(crate) fn awarded(status: &JobStatus, winners: &[ProviderId], deadline: DateTime<Utc>) -> JobStatus {
    let lot = offered(status, Utc::now());
    let winners: Vec<_> = winners.iter().map(|p| (*p, money("0.5"))).collect();
    award(status, &lot, &winners, deadline, Utc::now()).expect("award")
}

pub(crate) fn result_of(status: &JobStatus, provider: ProviderId, guest: GuestState) -> SegmentResult {
    let lot = &status.open_lot.as_ref().expect("an open lot").lot;
    SegmentResult {
        version: WIRE_VERSION,
        lot: lot.lot,
        job: lot.job,
        segment: lot.segment,
        attempt: lot.attempt,
        provider,
        guest,
        console: None,
        timings: SegmentTimings::default(),
        fetched_bytes: 0,
        sent_bytes: 0,
        finished_at: Utc::now(),
        preempted: false,
    }
}
