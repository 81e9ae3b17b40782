//! `vmlot-broker`: parses flags, sets up logging, runs [`vmlot_broker::run`]
//! until SIGINT or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmlot_broker::logging::{self, LogFormat};
use vmlot_broker::{BrokerConfig, PricingRule};

#[derive(Parser)]
#[command(
    name = "vmlot-broker",
    version,
    about = "The vmlot broker: time-segment lots on NATS"
)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Replicas of the streams the broker creates (3 for a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// How long each lot takes bids, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    bid_window_ms: u64,
    /// Time allowed beyond the segment length for fetch, restore, save and upload, in seconds.
    #[arg(long, default_value_t = 60)]
    transfer_allowance_s: u64,
    /// Longest wait before re-offering a segment that drew no bid, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    max_backoff_ms: u64,
    /// pay-as-bid or second-price.
    #[arg(long, default_value = "pay-as-bid")]
    pricing: PricingRule,
    /// The operator's fee: a share of each segment's price (0.05 = 5 %).
    #[arg(long, default_value = "0", value_parser = parse_fee)]
    fee_rate: rust_decimal::Decimal,
    #[command(flatten)]
    access: vmlot_identity::Access,
    /// Log lines as text or as JSON objects (filter with VMLOT_LOG).
    #[arg(long, env = "VMLOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl Args {
    fn config(&self) -> BrokerConfig {
        BrokerConfig {
            replicas: self.replicas,
            bid_window: Duration::from_millis(self.bid_window_ms),
            transfer_allowance: Duration::from_secs(self.transfer_allowance_s),
            pricing: self.pricing,
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            fee_rate: self.fee_rate,
            ..BrokerConfig::default()
        }
    }
}

fn parse_fee(text: &str) -> Result<rust_decimal::Decimal, String> {
    let rate = vmlot_ledger::parse_amount(text)?;
    if rate.is_sign_negative() || rate >= rust_decimal::Decimal::ONE {
        return Err(format!("fee rate {rate} must be at least 0 and below 1"));
    }
    Ok(rate)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format);
    let addrs: Vec<async_nats::ServerAddr> = args
        .nats
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()?;
    let (options, creds) = args.access.options()?;
    let client = options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    // The server's INFO says whether it checks identities; with
    // retry_on_initial_connect it arrives once the first connection is up.
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !client.server_info().auth_required {
        if !args.access.open {
            anyhow::bail!(
                "the NATS server at {} checks no credentials: set it up with `vmlot admin init`, or run the broker with --open to accept that anyone may be anyone",
                args.nats
            );
        }
        tracing::warn!(
            "running OPEN (--open): the server checks no identities, so anyone on it may be anyone"
        );
    } else if let Some(creds) = creds {
        tracing::info!(user = %creds.caller, "connected with credentials");
    }
    vmlot_broker::run(client, args.config(), shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
