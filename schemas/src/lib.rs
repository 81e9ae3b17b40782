//! Wire types of vmlot: every message that crosses NATS is defined here and
//! nowhere else, so a client in another language needs only this crate's
//! JSON Schemas (`schemas/json/`) and the subject map in [`subjects`].
//!
//! Layers, each using only those before it: [`ids`], [`caller`], [`money`], [`vm`]
//! (and [`manifest`]); then [`market`], [`standing`] and [`ledger`], which do
//! not know each other; then [`subjects`], the subject map over all of them; then
//! [`api`], the job API's endpoints.
//!
//! Conventions: every message carries a `version`; ids are UUIDs (or SHA-1
//! names for content); times are RFC 3339 UTC; money is a decimal string
//! with a unit code.
//!
//! [`recipe`] (OS Farm's recipes and the images made of them) sits beside
//! [`market`], using only [`ids`] and [`manifest`].

pub mod api;
pub mod caller;
pub mod catalog;
pub mod ids;
pub mod ledger;
pub mod manifest;
pub mod market;
pub mod money;
pub mod recipe;
pub mod standing;
pub mod subjects;
pub mod vm;
pub mod wire;

pub use catalog::json_schemas;
pub use ids::{BlockId, JobId, LotId, ManifestId, PackId, ProviderId};
pub use manifest::{Chunking, Extent, HashAlgorithm, Manifest, ManifestError, ObjectKind};
pub use money::Money;
pub use vm::{HypervisorKind, VmConfig};
pub use wire::WIRE_VERSION;
