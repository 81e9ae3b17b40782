//! `vmlot-broker`: parses flags, sets up logging, runs [`vmlot_broker::run`]
//! until SIGINT or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmlot_broker::config::DepositPolicy;
use vmlot_broker::logging::{self, LogFormat};
use vmlot_broker::quota::Quotas;
use vmlot_broker::{BrokerConfig, PricingRule};
use vmlot_schemas::{HashAlgorithm, Money};

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
    /// How much sooner than its award plus the segment's length a running
    /// guest's result may arrive and still be believed, in milliseconds
    /// (clock skew between the broker and the NATS server).
    #[arg(long, default_value_t = 2000)]
    early_allowance_ms: u64,
    /// Distinct providers that must fail to restore a checkpoint before the
    /// pending payment for the segment that produced it is voided.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    restore_quorum: u64,
    /// How long the check restore of a job's last checkpoint (which proves
    /// it restores before its payment is posted) runs the guest, in seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    check_seconds: u32,
    /// Agreeing results in a row a provider needs before a quorum job's
    /// attempts it wins may go unreplicated (then replicated with
    /// probability N / its run); 0 replicates every attempt.
    #[arg(long, default_value_t = vmlot_broker::replication::Policy::default().trust_after)]
    trust_after: u64,
    /// The deposit a provider must hold to win lots, as AMOUNT UNIT (e.g.
    /// "10 CRD"); none asked for when unset.
    #[arg(long, value_parser = parse_money)]
    min_deposit: Option<Money>,
    /// Taken from a cheating provider's deposit for the job's submitter
    /// (at most what it holds); the minimum deposit when unset.
    #[arg(long, value_parser = parse_positive, requires = "min_deposit")]
    forfeit: Option<rust_decimal::Decimal>,
    /// How a partial segment (saved early because its provider's machine
    /// owner needed the machine) is paid: pro-rata (the winning bid times
    /// the share of the lot's time it ran) or none.
    #[arg(long, default_value = "pro-rata")]
    partial_pay: vmlot_broker::partial::PartialPay,
    /// Longest wait before re-offering a segment that drew no bid, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    max_backoff_ms: u64,
    /// pay-as-bid or second-price.
    #[arg(long, default_value = "pay-as-bid")]
    pricing: PricingRule,
    /// The operator's fee: a share of each segment's price (0.05 = 5 %).
    #[arg(long, default_value = "0", value_parser = parse_fee)]
    fee_rate: rust_decimal::Decimal,
    /// Jobs one account may have in flight at once.
    #[arg(long, default_value_t = Quotas::default().jobs_in_flight)]
    max_jobs_in_flight: usize,
    /// Segments one job may ask for.
    #[arg(long, default_value_t = Quotas::default().segments_per_job)]
    max_segments: u32,
    /// Replicas of each segment one job may ask for.
    #[arg(long, default_value_t = Quotas::default().redundancy)]
    max_redundancy: u32,
    /// Guest memory one job may ask for, in MiB.
    #[arg(long, default_value_t = Quotas::default().memory_mib)]
    max_memory_mib: u32,
    /// Bytes one job's image may store.
    #[arg(long, default_value_t = Quotas::default().image_bytes)]
    max_image_bytes: u64,
    /// API requests per second per caller (bursts of twice as many).
    #[arg(long, default_value_t = Quotas::default().requests_per_second)]
    max_requests_per_second: u32,
    /// What blocks and manifests are named by when the broker creates the
    /// store: sha256 by default wherever identities are checked (strangers
    /// may store blocks, and SHA-1 collisions can be made), sha1 (the
    /// seed's) by default with --open. An existing store keeps its own.
    #[arg(long, env = "VMLOT_BLOCK_HASH")]
    block_hash: Option<HashAlgorithm>,
    #[command(flatten)]
    access: vmlot_identity::Access,
    /// The broker's credentials in the books' account, where the ledger and
    /// the job records live (`vmlot admin init` writes
    /// `creds/broker-books.creds`). Not needed with --open.
    #[arg(long, env = "VMLOT_BOOKS_CREDS")]
    books_creds: Option<std::path::PathBuf>,
    /// Log lines as text or as JSON objects (filter with VMLOT_LOG).
    #[arg(long, env = "VMLOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

impl Args {
    /// The settings; `open` says the server checks no identities.
    fn config(&self, open: bool) -> BrokerConfig {
        let default_hash = if open {
            HashAlgorithm::Sha1
        } else {
            HashAlgorithm::Sha256
        };
        BrokerConfig {
            block_hash: self.block_hash.unwrap_or(default_hash),
            replicas: self.replicas,
            bid_window: Duration::from_millis(self.bid_window_ms),
            transfer_allowance: Duration::from_secs(self.transfer_allowance_s),
            early_allowance: Duration::from_millis(self.early_allowance_ms),
            restore_quorum: self.restore_quorum as usize,
            check_seconds: self.check_seconds,
            replication: vmlot_broker::replication::Policy {
                trust_after: self.trust_after,
            },
            deposit: self.min_deposit.clone().map(|minimum| DepositPolicy {
                forfeit: self.forfeit.unwrap_or(minimum.amount),
                minimum,
            }),
            pricing: self.pricing,
            partial_pay: self.partial_pay,
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            fee_rate: self.fee_rate,
            quotas: Quotas {
                jobs_in_flight: self.max_jobs_in_flight,
                segments_per_job: self.max_segments,
                redundancy: self.max_redundancy,
                memory_mib: self.max_memory_mib,
                image_bytes: self.max_image_bytes,
                requests_per_second: self.max_requests_per_second,
            },
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

/// A positive amount on the books.
fn parse_positive(text: &str) -> Result<rust_decimal::Decimal, String> {
    let amount = vmlot_ledger::parse_amount(text)?;
    if amount.is_sign_negative() || amount.is_zero() {
        return Err(format!("{amount} must be above 0"));
    }
    Ok(amount)
}

/// `AMOUNT UNIT`, e.g. `10 CRD`.
fn parse_money(text: &str) -> Result<Money, String> {
    let (amount, unit) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("{text:?}: want AMOUNT UNIT, e.g. \"10 CRD\""))?;
    let money = Money::new(parse_positive(amount)?, unit.trim());
    if !money.unit_is_valid() {
        return Err(format!("{unit:?} is not a unit"));
    }
    Ok(money)
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
    let (client, creds) = connect(&args.access, &addrs, &args.nats).await?;
    // The server's INFO says whether it checks identities.
    let open = !client.server_info().auth_required;
    let books = if open {
        if !args.access.open {
            anyhow::bail!(
                "the NATS server at {} checks no credentials: set it up with `vmlot admin init`, or run the broker with --open to accept that anyone may be anyone",
                args.nats
            );
        }
        tracing::warn!(
            "running OPEN (--open): the server checks no identities, so anyone on it may be anyone, and the books share the market's account"
        );
        client.clone()
    } else {
        if let Some(creds) = creds {
            tracing::info!(user = %creds.caller, "connected with credentials");
        }
        let Some(path) = args.books_creds.clone() else {
            anyhow::bail!(
                "the books live in an account of their own: pass --books-creds (creds/broker-books.creds of the deployment)"
            );
        };
        let access = vmlot_identity::Access {
            creds: Some(path),
            ..args.access.clone()
        };
        let (books, creds) = connect(&access, &addrs, &args.nats).await?;
        if let Some(creds) = creds {
            tracing::info!(user = %creds.caller, "connected to the books' account");
        }
        books
    };
    let config = args.config(open);
    tracing::info!(block_hash = %config.block_hash, "block store names");
    vmlot_broker::run(client, books, config, shutdown_signal()).await?;
    Ok(())
}

/// Connects with `access`, retrying until the server answers; returns once
/// the first connection is up (so the server's INFO is known).
async fn connect(
    access: &vmlot_identity::Access,
    addrs: &[async_nats::ServerAddr],
    url: &str,
) -> anyhow::Result<(async_nats::Client, Option<vmlot_identity::Creds>)> {
    let (options, creds) = access.options()?;
    let client = options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((client, creds))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
