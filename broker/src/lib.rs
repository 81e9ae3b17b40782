//! The vmlot broker as a library: [`run`] is what the binary and the tests
//! both call, with their own shutdown future.
//!
//! - [`server`]: [`run`]: streams, resume, routing tasks, the API, shutdown.
//! - [`api`]: the job API, a NATS micro service (`vmlot.api.*`).
//! - [`lease`]: partition leases: which jobs this broker runs, among any
//!   number of brokers, and the hand-over when one joins or dies;
//!   [`partition`]: its fair share (pure).
//! - [`route`]: bids, heartbeats and results in, routed to their lot's job task.
//! - [`job`]: one task per running job: the loop over the steps below,
//!   with retries, backoff and cancellation.
//! - [`lifecycle`]: a job's life as pure transitions of its record.
//! - the market's steps, one module each: [`offer`] (a lot out, bids in),
//!   [`award`] (auction, capacity, winners recorded, awards sent),
//!   [`settle`] (verify, pay once into pending, record, cancel the other
//!   replicas), [`resolve`] (a pending payment posted once the next
//!   segment continued from its checkpoint or the job ended, or voided when
//!   it does not restore), [`cancel`] (tell providers to stop), [`hold`]
//!   and [`refund`] (the escrow's two ends).
//! - [`auction`]: the sealed-bid reverse auction (pure).
//! - [`quorum`]: what replicas of an attempt must agree on, and whether
//!   they do (pure).
//! - [`partial`]: a segment its provider's owner preempted: how long it
//!   ran by the broker's clock, what it is paid, the rest of the segment
//!   (pure).
//! - [`replication`]: whether a quorum job's attempt is replicated, from
//!   its winner's run of agreeing results (pure).
//! - [`capacity`]: awards outstanding per provider, never above its slots.
//! - [`deposit`]: providers' deposits: the minimum to win a lot, the
//!   forfeit of a proven cheat, a provider's deposit and release requests.
//! - [`quota`]: what one account may ask (jobs in flight, segments,
//!   redundancy, memory, image size, request rate) (pure).
//! - [`state`]: job records in a KV bucket with revision checks.
//! - [`verify`]: checks a result's checkpoint against the store.
//! - [`stored_save`]: the canonical digest of a QEMU save in the store,
//!   for the quorum check.
//! - the books are [`vmlot_ledger`]: a submission holds the budget in the
//!   job's escrow, each settlement pays from it once (pending, then
//!   posted), the job's end refunds.
//! - [`logging`]: text or JSON logs for the binary.
//! - [`metrics`]: the Prometheus series, one function per thing counted.

pub mod access;
pub mod api;
pub mod auction;
pub mod award;
pub mod cancel;
pub mod capacity;
pub mod check;
pub mod config;
pub mod deposit;
pub mod error;
#[cfg(feature = "fault-injection")]
mod fault;
#[cfg(test)]
mod fixtures;
pub mod hold;
pub mod job;
pub mod lease;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod offer;
pub mod partial;
pub mod partition;
pub mod quorum;
pub mod quota;
pub mod refund;
pub mod replication;
pub mod resolve;
pub mod route;
pub mod server;
pub mod settle;
mod shared;
pub mod standing;
pub mod state;
pub mod stored_save;
pub mod unsettled;
pub mod verify;

pub use auction::PricingRule;
pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::run;
pub(crate) use shared::Shared;
