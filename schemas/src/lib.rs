//! Wire types of vmlot: every message that crosses NATS is defined here and
//! nowhere else, so a client in another language needs only this crate's
//! JSON Schemas (`schemas/json/`) and the subject map in [`subjects`].
//!
//! Conventions: every message carries a `version`; ids are UUIDs (or SHA-1
//! names for content); times are RFC 3339 UTC; money is a decimal string
//! with a unit code.

pub mod api;
pub mod ids;
pub mod ledger;
pub mod manifest;
pub mod market;
pub mod money;
pub mod subjects;
pub mod vm;

pub use ids::{BlockId, JobId, LotId, ManifestId, ProviderId};
pub use manifest::{Chunking, Extent, HashAlgorithm, Manifest, ManifestError, ObjectKind};
pub use money::Money;
pub use vm::{HypervisorKind, VmConfig};

/// Version of the wire format this crate speaks; decoders refuse others.
pub const WIRE_VERSION: u32 = 1;

/// Every schema published in `schemas/json/`, by file stem.
pub fn json_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("manifest", schemars::schema_for!(Manifest)),
        ("money", schemars::schema_for!(Money)),
        ("vm-config", schemars::schema_for!(VmConfig)),
        ("submit-job", schemars::schema_for!(market::SubmitJob)),
        ("lot", schemars::schema_for!(market::Lot)),
        ("bid", schemars::schema_for!(market::Bid)),
        ("to-provider", schemars::schema_for!(market::ToProvider)),
        ("segment-result", schemars::schema_for!(market::SegmentResult)),
        ("heartbeat", schemars::schema_for!(market::Heartbeat)),
        ("job-ref", schemars::schema_for!(market::JobRef)),
        ("job-status", schemars::schema_for!(market::JobStatus)),
        ("segment-payment", schemars::schema_for!(market::SegmentPayment)),
        ("transaction", schemars::schema_for!(ledger::Transaction)),
        ("posting", schemars::schema_for!(ledger::Posting)),
        ("credit-request", schemars::schema_for!(ledger::CreditRequest)),
        ("market-view", schemars::schema_for!(market::MarketView)),
        (
            "reply-submitted",
            schemars::schema_for!(market::Reply<market::Submitted>),
        ),
        (
            "reply-job-status",
            schemars::schema_for!(market::Reply<market::JobStatus>),
        ),
    ]
}
