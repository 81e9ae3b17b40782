//! What the vmlot binaries show an operator: the daemons' Prometheus
//! scrape endpoint ([`serve`]), every binary's man pages and shell
//! completions ([`Generate`]), and the signals a daemon stops on
//! ([`shutdown_signal`]).
//!
//! The endpoint: a Prometheus scrape endpoint
//! (`GET` on any path of the address given) over the `metrics` facade.
//! The broker and the provider record their series with `metrics::counter!`,
//! `gauge!` and `histogram!` where things happen (names in their own
//! `metrics` modules); without an endpoint those calls do nothing.
//!
//! The exporter is `metrics-exporter-prometheus` (its HTTP listener, hyper
//! underneath): histograms are rendered as Prometheus histograms with the
//! buckets given here, the rest as counters and gauges.

use std::net::SocketAddr;

mod generate;
mod shutdown;
pub use clap_complete::Shell;
pub use generate::Generate;
pub use shutdown::shutdown_signal;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Seconds: from a few milliseconds (a settlement) to an hour (a segment).
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("metrics endpoint on {addr}: {source}")]
    Build {
        addr: SocketAddr,
        #[source]
        source: BuildError,
    },
}

/// Installs the process's metrics recorder and serves it on `addr` from a
/// task of `tasks`, which stops when `shutdown` is cancelled. Every series
/// whose name ends in `_seconds` is a histogram over [`SECONDS_BUCKETS`].
///
/// Call once per process, from inside the Tokio runtime (a second call
/// fails: the recorder is global). The crate's own upkeep task (draining
/// histogram samples every 5 s) lives as long as the runtime.
pub fn serve(
    addr: SocketAddr,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), EndpointError> {
    let build = |e| EndpointError::Build { addr, source: e };
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .map_err(build)?
        .build()
        .map_err(build)?;
    metrics::set_global_recorder(recorder).map_err(|e| build(e.into()))?;
    tasks.spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            served = exporter => {
                if let Err(err) = served {
                    tracing::error!(%addr, ?err, "metrics endpoint stopped");
                }
            }
        }
    });
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(())
}
