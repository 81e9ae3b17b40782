//! Wire types of vmlot: every message that crosses NATS is defined here and
//! nowhere else, so a client in another language needs only this crate's
//! JSON Schemas (`schemas/json/`) and the subject map in [`subjects`].
//!
//! Conventions: every message carries a `version`; ids are UUIDs (or SHA-1
//! names for content); times are RFC 3339 UTC; money is a decimal string
//! with a unit code.

pub mod ids;
pub mod manifest;
pub mod money;
pub mod subjects;

pub use ids::{BlockId, JobId, LotId, ManifestId, ProviderId};
pub use manifest::{Chunking, Extent, HashAlgorithm, Manifest, ManifestError, ObjectKind};
pub use money::Money;

/// Version of the wire format this crate speaks; decoders refuse others.
pub const WIRE_VERSION: u32 = 1;

/// Every schema published in `schemas/json/`, by file stem.
pub fn json_schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("manifest", schemars::schema_for!(Manifest)),
        ("money", schemars::schema_for!(Money)),
    ]
}
