//! The vmlot provider: bids on lots it can run, runs the segments it wins
//! on a hypervisor, returns the new checkpoint and is paid per segment.
//!
//! - [`driver`]: the hypervisor interface and its drivers.
//! - [`config`]: settings (TOML file and flags).
//! - [`daemon`]: [`daemon::run`], the daemon itself, shared by the binary and tests.
//! - [`bidding`]: what to bid, from the provider's own price and what it holds.

pub mod bidding;
pub mod config;
pub mod daemon;
pub mod driver;
