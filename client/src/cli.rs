//! Command-line shape of `vmlot` and its exit codes.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Exit code when data failed verification (tampered, missing or refused).
pub const EXIT_INTEGRITY: u8 = 3;
/// Exit code when NATS could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;

#[derive(Parser)]
#[command(name = "vmlot", version, about = "Client of the vmlot VM time-segment market")]
pub struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "VMLOT_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// Print JSON instead of a human table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Move files through the content-addressed store.
    #[command(subcommand)]
    Store(crate::store::StoreCommand),
}

impl Cli {
    pub async fn run(&self) -> Result<()> {
        match &self.command {
            Command::Store(cmd) => cmd.run(self).await,
        }
    }

    pub async fn connect(&self) -> Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nats
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()?;
        async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(addrs)
            .await
            .map_err(|e| anyhow::Error::new(Unreachable(format!("cannot reach NATS at {}: {e}", self.nats))))
    }
}

/// NATS could not be reached (exit code [`EXIT_UNREACHABLE`]).
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Scripts can tell a refused (tampered, missing) object from an outage.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<Unreachable>().is_some() {
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    match err.downcast_ref::<vmlot_cas::CasError>() {
        Some(
            vmlot_cas::CasError::CorruptBlock { .. }
            | vmlot_cas::CasError::MissingBlock(_)
            | vmlot_cas::CasError::BlockSize { .. }
            | vmlot_cas::CasError::BlockEncoding { .. }
            | vmlot_cas::CasError::MissingManifest(_)
            | vmlot_cas::CasError::Manifest { .. },
        ) => ExitCode::from(EXIT_INTEGRITY),
        _ => ExitCode::FAILURE,
    }
}
