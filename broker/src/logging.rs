//! Logs for the broker binary: human-readable text (the default) or one
//! JSON object per line, filtered by `VMLOT_LOG` (default `info`). The
//! market's steps log inside spans named after them and carrying `job`,
//! `lot`, `segment`, `attempt` and `provider`, so one job's life is one
//! filter: `VMLOT_LOG='info,[job{job=<id>}]=debug'`, or in JSON the
//! `spans` of each line.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, its spans as a prefix.
    #[default]
    Text,
    /// One JSON object per event, with the current span and the span list.
    Json,
}

/// Installs the global subscriber; call once, at the start of `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("VMLOT_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
