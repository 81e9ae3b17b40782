//! `vmlot-broker`: parses flags, sets up logging, runs [`vmlot_broker::run`].

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "vmlot-broker", version, about = "The vmlot broker")]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Replicas of the streams the broker creates (3 for a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMLOT_LOG"))
        .init();
    let args = Args::parse();
    let addrs: Vec<async_nats::ServerAddr> = args
        .nats
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()?;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    let config = vmlot_broker::BrokerConfig {
        replicas: args.replicas,
    };
    vmlot_broker::run(client, config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
