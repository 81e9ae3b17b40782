//! How the daemon logs: plain text for a person at a terminal, or one JSON
//! object per line for a log pipeline. Either way every market step runs
//! in a span carrying `job`, `lot`, `segment`, `attempt` and `provider`
//! (see [`crate::daemon`]), so one job's story is one filter on those
//! fields. `VMLOT_LOG` sets the filter (default `info`).

/// The format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, span fields inline.
    #[default]
    Text,
    /// One JSON object per line, with the current span and the span list.
    Json,
}

/// Installs the global subscriber; call once, first thing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMLOT_LOG").unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
}
