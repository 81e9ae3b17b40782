//! `vmlot-provider`: reads its settings (file, environment, flags), picks
//! its drivers, runs [`vmlot_provider::daemon::run`] until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use vmlot_provider::config::{ProviderConfig, Settings};
use vmlot_provider::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "vmlot-provider",
    version,
    about = "Sells time segments of this machine on the vmlot market"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "VMLOT_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(flatten)]
    access: vmlot_identity::Access,
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let mut config = ProviderConfig::load(&cli.settings).context("reading the provider's settings")?;
    let drivers = vmlot_provider::setup::drivers(&config)?;
    let (options, creds) = cli.access.options()?;
    // Among strangers a provider is who its credentials say: their name is
    // its id, and the server lets it bid, beat and report only under it.
    if let Some(creds) = &creds {
        let id = vmlot_provider::setup::identity(&creds.caller, cli.settings.id)?;
        config.id = id;
    }
    let client = vmlot_provider::daemon::connect(&cli.nats, options).await?;
    vmlot_provider::daemon::run(client, config, drivers, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
