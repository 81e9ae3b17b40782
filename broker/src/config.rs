//! The broker's settings, with the defaults the binary's flags start from.

use std::time::Duration;

use crate::auction::PricingRule;
use crate::partial::PartialPay;
use crate::quota::Quotas;
use crate::replication;
use vmlot_schemas::{HashAlgorithm, Money};

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Replicas of every stream the broker creates (3 in a 3-node cluster).
    pub replicas: usize,
    /// How long a lot takes bids.
    pub bid_window: Duration,
    /// Added to the segment length T for the award deadline: time to fetch,
    /// restore, save and upload.
    pub transfer_allowance: Duration,
    /// First wait after an offer drew no bid; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub pricing: PricingRule,
    /// A provider silent this long is no longer listed.
    pub provider_timeout: Duration,
    /// The operator's share of each segment's price (0.05 = 5 %), paid to
    /// the operator account at settlement.
    pub fee_rate: rust_decimal::Decimal,
    /// What one account may ask of the market.
    pub quotas: Quotas,
    /// What the block store names blocks and manifests by, when the broker
    /// creates it (a store keeps the algorithm it was made with).
    pub block_hash: HashAlgorithm,
    /// How much sooner than its award plus T a running guest's result may
    /// arrive (clock skew between the broker and the NATS server, rounding).
    pub early_allowance: Duration,
    /// Distinct providers that must fail to restore a checkpoint before the
    /// pending payment that produced it is voided (one could lie to void an
    /// honest provider's pay).
    pub restore_quorum: usize,
    /// How long the check restore of a job's last checkpoint runs its
    /// guest, in seconds (capped at the job's segment length).
    pub check_seconds: u32,
    /// Adaptive replication of quorum jobs' attempts.
    pub replication: replication::Policy,
    /// Provider deposits: none asked for when unset.
    pub deposit: Option<DepositPolicy>,
    /// How a partial segment (its provider's owner preempted it) is paid.
    pub partial_pay: PartialPay,
    /// Where the Prometheus endpoint listens (see [`crate::metrics`]);
    /// none when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// This broker's name among brokers (see [`crate::lease`]); a fresh
    /// UUID per start when unset. Kept across restarts, a broker takes
    /// back the leases it held at once instead of waiting for them to
    /// lapse; two live brokers must never share one.
    pub broker_id: Option<String>,
}

/// What the broker asks of providers' deposits (`deposit:PROVIDER` in the
/// books, funded from their earnings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositPolicy {
    /// A provider whose deposit holds less than this (in its unit) does
    /// not win lots.
    pub minimum: Money,
    /// Taken from a provider's deposit and given to the job's submitter
    /// when the provider is proven to have cheated it (a checkpoint that
    /// did not restore, a minority result); at most what the deposit holds.
    pub forfeit: rust_decimal::Decimal,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            bid_window: Duration::from_secs(2),
            transfer_allowance: Duration::from_secs(60),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            pricing: PricingRule::PayAsBid,
            provider_timeout: Duration::from_secs(10),
            fee_rate: rust_decimal::Decimal::ZERO,
            quotas: Quotas::default(),
            block_hash: HashAlgorithm::Sha256,
            early_allowance: Duration::from_secs(2),
            restore_quorum: 2,
            check_seconds: 1,
            replication: replication::Policy::default(),
            deposit: None,
            partial_pay: PartialPay::default(),
            metrics_listen: None,
            broker_id: None,
        }
    }
}
