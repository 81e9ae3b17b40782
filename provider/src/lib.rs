//! The vmlot provider: bids on lots it can run, runs the segments it wins
//! on a hypervisor, returns the new checkpoint and is paid per segment.
//!
//! - [`config`]: settings, layered (defaults, TOML file, environment, flags).
//! - [`setup`]: the drivers the settings ask for.
//! - [`driver`]: the hypervisor interface, the segment template, the drivers.
//! - [`daemon`]: [`daemon::run`], the daemon itself, shared by the binary and tests.
//! - [`bidding`]: what to bid, from the provider's own price and what it holds.
//! - [`owner`]: the owner's activity ([`desktop`]: someone at a graphical session);
//!   [`cgroup`]: a scavenger's guests' cgroups.
//! - [`logging`]: text or JSON log lines.
//! - [`metrics`]: the Prometheus series (`metrics_listen`), one function per thing counted.

pub mod bidding;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod desktop;
pub mod doctor;
pub mod driver;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod logging;
pub mod metrics;
pub mod owner;
pub mod setup;
