//! The vmlot client library: the one caller of the broker's job API.
//!
//! The `vmlot` CLI, the integration-test harness and the benchmarks all
//! talk to the broker through [`api::Api`], so a request is encoded, sent
//! and its reply decoded in one place; endpoints, subjects and payload types
//! come from `vmlot_schemas::api`.

pub mod api;

pub use api::{Api, CallError};
