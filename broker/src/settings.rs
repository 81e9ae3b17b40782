//! The broker's settings, layered as the provider's are: the defaults, then
//! a TOML file (`--config FILE`), then the environment, then flags, the
//! later winning key by key.
//!
//! One type, [`Settings`], is both what clap parses and what the file
//! holds, so a key is always its flag's name in snake_case
//! (`--bid-window-ms` is `bid_window_ms = 2000`) and its default is the
//! one `--help` shows. A key left out keeps its default; an unknown key or
//! a bad value is refused, naming the key and the file.
//!
//! How the layers meet: clap fills every field, from a flag, an
//! environment variable or its default, and says which
//! ([`ArgMatches::value_source`]). [`figment`] then merges all of them
//! (the defaults), the file over them, and over both only the values that
//! came from a flag or the environment. Every layer goes through the same
//! deserializers, which call the flags' own parsers, so a value is checked
//! the same way wherever it comes from.
//!
//! How the broker connects (`--nats`, `--creds`, `--tls-ca`, `--open`,
//! `--books-creds`) and logs (`--log-format`) stays flags and environment
//! only, as for the provider: that belongs to the unit's environment file,
//! the market's rules to this one.

use std::path::PathBuf;
use std::time::Duration;

use clap::ArgMatches;
use clap::parser::ValueSource;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use vmlot_broker::config::DepositPolicy;
use vmlot_broker::partial::PartialPay;
use vmlot_broker::quota::Quotas;
use vmlot_broker::replication;
use vmlot_broker::{BrokerConfig, PricingRule};
use vmlot_schemas::{HashAlgorithm, Money};

/// The market's settings: each a flag, and a key of the settings file.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML settings file: keys named as these flags in snake_case (e.g.
    /// bid_window_ms = 2000); the environment and flags override it.
    #[arg(long, env = "VMLOT_BROKER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Replicas of the streams the broker creates (3 for a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// How long each lot takes bids, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub bid_window_ms: u64,
    /// Time allowed beyond the segment length for fetch, restore, save and upload, in seconds.
    #[arg(long, default_value_t = 60)]
    pub transfer_allowance_s: u64,
    /// How much sooner than its award plus the segment's length a running
    /// guest's result may arrive and still be believed, in milliseconds
    /// (clock skew between the broker and the NATS server).
    #[arg(long, default_value_t = 2000)]
    pub early_allowance_ms: u64,
    /// Distinct providers that must fail to restore a checkpoint before the
    /// pending payment for the segment that produced it is voided.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(deserialize_with = "at_least_one")]
    pub restore_quorum: u64,
    /// How long the check restore of a job's last checkpoint (which proves
    /// it restores before its payment is posted) runs the guest, in seconds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(deserialize_with = "at_least_one")]
    pub check_seconds: u32,
    /// Agreeing results in a row a provider needs before a quorum job's
    /// attempts it wins may go unreplicated (then replicated with
    /// probability N / its run); 0 replicates every attempt.
    #[arg(long, default_value_t = replication::Policy::default().trust_after)]
    pub trust_after: u64,
    /// The deposit a provider must hold to win lots, as AMOUNT UNIT (e.g.
    /// "10 CRD"); none asked for when unset.
    #[arg(long, value_parser = parse_money)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "money_text",
        deserialize_with = "min_deposit"
    )]
    pub min_deposit: Option<Money>,
    /// Taken from a cheating provider's deposit for the job's submitter
    /// (at most what it holds); the minimum deposit when unset. Needs a
    /// minimum deposit.
    #[arg(long, value_parser = parse_positive)]
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "forfeit"
    )]
    pub forfeit: Option<Decimal>,
    /// How a partial segment (saved early because its provider's machine
    /// owner needed the machine) is paid: pro-rata (the winning bid times
    /// the share of the lot's time it ran) or none.
    #[arg(long, default_value = "pro-rata")]
    #[serde(serialize_with = "partial_pay_name", deserialize_with = "partial_pay")]
    pub partial_pay: PartialPay,
    /// Longest wait before re-offering a segment that drew no bid, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub max_backoff_ms: u64,
    /// pay-as-bid or second-price.
    #[arg(long, default_value = "pay-as-bid")]
    #[serde(serialize_with = "pricing_name", deserialize_with = "pricing")]
    pub pricing: PricingRule,
    /// The operator's fee: a share of each segment's price (0.05 = 5 %).
    #[arg(long, default_value = "0", value_parser = parse_fee)]
    #[serde(deserialize_with = "fee_rate")]
    pub fee_rate: Decimal,
    /// Jobs one account may have in flight at once.
    #[arg(long, default_value_t = Quotas::default().jobs_in_flight)]
    pub max_jobs_in_flight: usize,
    /// Segments one job may ask for.
    #[arg(long, default_value_t = Quotas::default().segments_per_job)]
    pub max_segments: u32,
    /// Replicas of each segment one job may ask for.
    #[arg(long, default_value_t = Quotas::default().redundancy)]
    pub max_redundancy: u32,
    /// Guest memory one job may ask for, in MiB.
    #[arg(long, default_value_t = Quotas::default().memory_mib)]
    pub max_memory_mib: u32,
    /// Bytes one job's image may store.
    #[arg(long, default_value_t = Quotas::default().image_bytes)]
    pub max_image_bytes: u64,
    /// API requests per second per caller (bursts of twice as many).
    #[arg(long, default_value_t = Quotas::default().requests_per_second)]
    pub max_requests_per_second: u32,
    /// What blocks and manifests are named by when the broker creates the
    /// store: sha256 by default wherever identities are checked (strangers
    /// may store blocks, and SHA-1 collisions can be made), sha1 (the
    /// seed's) by default with --open. An existing store keeps its own.
    #[arg(long, env = "VMLOT_BLOCK_HASH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_hash: Option<HashAlgorithm>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464); off
    /// when unset.
    #[arg(long, env = "VMLOT_METRICS_LISTEN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// This broker's name among brokers sharing the jobs (letters, digits,
    /// '-', '_'); kept across restarts, it takes back its leases at once.
    /// Two live brokers must never share one. A fresh UUID when unset.
    #[arg(long, env = "VMLOT_BROKER_ID")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_id: Option<String>,
}

impl Settings {
    /// The settings in force: clap's defaults, then the file `config`
    /// names, then what `matches` says came from a flag or the
    /// environment. `self` is what clap made of `matches`.
    pub fn load(&self, matches: &ArgMatches) -> Result<Settings, Box<figment::Error>> {
        let given: Dict = Value::serialize(self)?
            .into_dict()
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| {
                matches!(
                    matches.value_source(key),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .collect();
        let mut figment = Figment::from(Serialized::defaults(self));
        if let Some(path) = &self.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        let settings: Settings = figment.merge(Serialized::defaults(given)).extract()?;
        if settings.forfeit.is_some() && settings.min_deposit.is_none() {
            return Err(Box::new(figment::Error::from(
                "forfeit is set but min_deposit is not: a forfeit is taken from a deposit, so ask for one (--min-deposit or min_deposit in the settings file)"
                    .to_string(),
            )));
        }
        Ok(settings)
    }

    /// The broker's configuration; `open` says the server checks no
    /// identities (which makes sha1 the default block hash).
    pub fn broker_config(&self, open: bool) -> BrokerConfig {
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
            replication: replication::Policy {
                trust_after: self.trust_after,
            },
            deposit: self.min_deposit.clone().map(|minimum| DepositPolicy {
                forfeit: self.forfeit.unwrap_or(minimum.amount),
                minimum,
            }),
            pricing: self.pricing,
            partial_pay: self.partial_pay,
            metrics_listen: self.metrics_listen,
            broker_id: self.broker_id.clone(),
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

/// The operator's fee rate: at least 0 and below 1.
fn parse_fee(text: &str) -> Result<Decimal, String> {
    let rate = vmlot_ledger::parse_amount(text)?;
    if rate.is_sign_negative() || rate >= Decimal::ONE {
        return Err(format!("fee rate {rate} must be at least 0 and below 1"));
    }
    Ok(rate)
}

/// A positive amount on the books.
fn parse_positive(text: &str) -> Result<Decimal, String> {
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

/// A value read as text, or a bare number taken as its text (`fee_rate =
/// 0.05` as well as `"0.05"`), handed to a flag's own parser.
fn parsed<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Text;
    impl Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    parse(&d.deserialize_any(Text)?).map_err(de::Error::custom)
}

fn fee_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    parsed(d, parse_fee)
}

fn forfeit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    parsed(d, parse_positive).map(Some)
}

fn min_deposit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Money>, D::Error> {
    parsed(d, parse_money).map(Some)
}

fn partial_pay<'de, D: Deserializer<'de>>(d: D) -> Result<PartialPay, D::Error> {
    parsed(d, str::parse)
}

fn pricing<'de, D: Deserializer<'de>>(d: D) -> Result<PricingRule, D::Error> {
    parsed(d, str::parse)
}

/// A count that must be at least 1, as the flag's range says.
fn at_least_one<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + From<u8> + std::fmt::Display,
{
    let n = T::deserialize(d)?;
    if n < T::from(1) {
        return Err(de::Error::custom(format!("must be at least 1, not {n}")));
    }
    Ok(n)
}

/// As the flag takes it: `10 CRD`.
fn money_text<S: Serializer>(money: &Option<Money>, s: S) -> Result<S::Ok, S::Error> {
    match money {
        Some(money) => s.collect_str(money),
        None => s.serialize_none(),
    }
}

fn partial_pay_name<S: Serializer>(pay: &PartialPay, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match pay {
        PartialPay::ProRata => "pro-rata",
        PartialPay::Unpaid => "none",
    })
}

fn pricing_name<S: Serializer>(rule: &PricingRule, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match rule {
        PricingRule::PayAsBid => "pay-as-bid",
        PricingRule::SecondPrice => "second-price",
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    /// The settings `args` (and the file they name) come to.
    fn load(args: &[&str]) -> Result<Settings, String> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("vmlot-broker").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.settings.load(&matches).map_err(|e| e.to_string())
    }

    /// A settings file holding `text`, in a directory kept alive with it.
    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        (dir, path)
    }

    #[test]
    fn defaults_alone_are_the_flags_defaults() {
        let s = load(&[]).unwrap();
        assert_eq!(
            (s.replicas, s.bid_window_ms, s.transfer_allowance_s),
            (1, 2000, 60)
        );
        assert_eq!(
            (s.restore_quorum, s.check_seconds, s.max_backoff_ms),
            (2, 1, 10_000)
        );
        assert_eq!(
            (s.partial_pay, s.pricing),
            (PartialPay::ProRata, PricingRule::PayAsBid)
        );
        assert_eq!((&s.min_deposit, s.forfeit, s.block_hash), (&None, None, None));
        let config = s.broker_config(false);
        let default = BrokerConfig::default();
        assert_eq!(config.bid_window, default.bid_window);
        assert_eq!(config.transfer_allowance, default.transfer_allowance);
        assert_eq!(config.early_allowance, default.early_allowance);
        assert_eq!(config.max_backoff, default.max_backoff);
        assert_eq!(config.quotas, default.quotas);
        assert_eq!(config.replication, default.replication);
        assert_eq!((config.fee_rate, config.deposit), (Decimal::ZERO, None));
        assert_eq!(config.block_hash, HashAlgorithm::Sha256);
        assert_eq!(s.broker_config(true).block_hash, HashAlgorithm::Sha1);
    }

    #[test]
    fn the_file_over_the_defaults_and_flags_over_the_file() {
        let (_dir, path) = file(
            r#"
replicas = 3
bid_window_ms = 500
partial_pay = "none"
pricing = "second-price"
min_deposit = "10 CRD"
fee_rate = 0.05
max_image_bytes = 1073741824
block_hash = "sha1"
"#,
        );
        let s = load(&["--config", &path]).unwrap();
        assert_eq!((s.replicas, s.bid_window_ms), (3, 500));
        assert_eq!(
            (s.partial_pay, s.pricing),
            (PartialPay::Unpaid, PricingRule::SecondPrice)
        );
        assert_eq!(s.fee_rate, Decimal::new(5, 2));
        assert_eq!(s.max_image_bytes, 1 << 30);
        assert_eq!(s.block_hash, Some(HashAlgorithm::Sha1));
        // What the file leaves out keeps its default.
        assert_eq!((s.transfer_allowance_s, s.max_backoff_ms), (60, 10_000));
        let config = s.broker_config(false);
        let deposit = config.deposit.expect("a deposit policy");
        assert_eq!(deposit.minimum.to_string(), "10 CRD");
        assert_eq!(
            deposit.forfeit,
            Decimal::TEN,
            "the forfeit defaults to the minimum"
        );
        assert_eq!(config.block_hash, HashAlgorithm::Sha1);

        // A flag wins over the file, key by key; a flag's default does not.
        let s = load(&[
            "--config",
            &path,
            "--replicas",
            "5",
            "--partial-pay",
            "pro-rata",
            "--forfeit",
            "0.5",
        ])
        .unwrap();
        assert_eq!((s.replicas, s.bid_window_ms), (5, 500));
        assert_eq!(
            (s.partial_pay, s.pricing),
            (PartialPay::ProRata, PricingRule::SecondPrice)
        );
        assert_eq!(
            s.forfeit,
            Some(Decimal::new(5, 1)),
            "a flag's forfeit with the file's deposit"
        );
        assert_eq!(s.min_deposit.map(|m| m.to_string()).as_deref(), Some("10 CRD"));
        // Given as a flag equal to the default, it still overrides the file.
        let s = load(&["--config", &path, "--bid-window-ms", "2000"]).unwrap();
        assert_eq!(s.bid_window_ms, 2000);
    }

    /// The only test that sets a variable these settings read
    /// (`VMLOT_METRICS_LISTEN`), and no other test looks at that key.
    #[test]
    fn the_environment_over_the_file() {
        let (_dir, path) = file("metrics_listen = \"127.0.0.1:9464\"\n");
        assert_eq!(
            load(&["--config", &path]).unwrap().metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        // SAFETY: no other test reads or writes this variable's key, and
        // the standard library serializes its own environment accesses.
        unsafe { std::env::set_var("VMLOT_METRICS_LISTEN", "0.0.0.0:9999") };
        let from_env = load(&["--config", &path]);
        let from_flag = load(&["--config", &path, "--metrics-listen", "127.0.0.1:1"]);
        // SAFETY: as above.
        unsafe { std::env::remove_var("VMLOT_METRICS_LISTEN") };
        assert_eq!(
            from_env.unwrap().metrics_listen,
            Some("0.0.0.0:9999".parse().unwrap())
        );
        assert_eq!(
            from_flag.unwrap().metrics_listen,
            Some("127.0.0.1:1".parse().unwrap())
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        for (text, names) in [
            ("replicas = 3\nbid_windw_ms = 10\n", &["bid_windw_ms"][..]),
            ("nats = \"nats://x:4222\"\n", &["nats"]),
            ("config = \"/etc/other.toml\"\n", &["config"]),
            (
                "partial_pay = \"half\"\n",
                &["partial_pay", "unknown partial pay \"half\""],
            ),
            ("pricing = \"first-price\"\n", &["pricing", "first-price"]),
            ("restore_quorum = 0\n", &["restore_quorum", "at least 1"]),
            ("check_seconds = 0\n", &["check_seconds", "at least 1"]),
            ("fee_rate = \"1.5\"\n", &["fee_rate", "below 1"]),
            ("min_deposit = \"10\"\n", &["min_deposit", "AMOUNT UNIT"]),
            ("min_deposit = \"-1 CRD\"\n", &["min_deposit", "above 0"]),
            ("replicas = \"three\"\n", &["replicas"]),
            ("bid_window_ms = -1\n", &["bid_window_ms"]),
            ("block_hash = \"md5\"\n", &["block_hash", "md5"]),
            ("metrics_listen = \"localhost\"\n", &["metrics_listen"]),
            ("replicas = 3\nreplicas = 4\n", &["replicas"]),
        ] {
            let (_dir, path) = file(text);
            let why = load(&["--config", &path]).expect_err(text);
            for name in names {
                assert!(why.contains(name), "{text:?}: {why}");
            }
            assert!(why.contains("broker.toml"), "{text:?}: names the file: {why}");
        }

        let why = load(&["--config", "/nonexistent/broker.toml"]).unwrap_err();
        assert!(why.contains("/nonexistent/broker.toml"), "{why}");

        // A forfeit needs a deposit to be taken from, wherever either is set.
        let (_dir, path) = file("forfeit = \"0.5\"\n");
        let why = load(&["--config", &path]).unwrap_err();
        assert!(why.contains("min_deposit"), "{why}");
        let why = load(&["--forfeit", "0.5"]).unwrap_err();
        assert!(why.contains("min_deposit"), "{why}");
        assert!(load(&["--config", &path, "--min-deposit", "2 CRD"]).is_ok());

        // Flags are still refused by clap, as before.
        let why = load(&["--restore-quorum", "0"]).unwrap_err();
        assert!(why.contains("--restore-quorum"), "{why}");
        let why = load(&["--fee-rate", "1"]).unwrap_err();
        assert!(why.contains("below 1"), "{why}");
    }

    /// `deploy/systemd/broker.toml` lists every key, each commented out
    /// with its default (or, for a key with none, a value that parses).
    #[test]
    fn the_example_file_lists_every_key_with_its_default() {
        let example = include_str!("../../deploy/systemd/broker.toml");
        let defaults = load(&[]).unwrap();
        let keys: Vec<String> = Value::serialize(&defaults)
            .unwrap()
            .into_dict()
            .unwrap()
            .into_keys()
            .chain(
                [
                    "min_deposit",
                    "forfeit",
                    "block_hash",
                    "metrics_listen",
                    "broker_id",
                ]
                .map(String::from),
            )
            .collect();
        let uncommented: String = example
            .lines()
            .filter_map(|line| line.strip_prefix('#'))
            .filter(|line| line.contains(" = ") && !line.starts_with(' '))
            .map(|line| format!("{line}\n"))
            .collect();
        for key in &keys {
            assert!(
                uncommented.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "{key} is not in the example"
            );
        }
        let (_dir, path) = file(&uncommented);
        let s = load(&["--config", &path]).unwrap();
        let mut all = Value::serialize(&s).unwrap().into_dict().unwrap();
        let mut want = Value::serialize(&defaults).unwrap().into_dict().unwrap();
        for optional in [
            "min_deposit",
            "forfeit",
            "block_hash",
            "metrics_listen",
            "broker_id",
        ] {
            assert!(all.remove(optional).is_some(), "{optional} parses");
            want.remove(optional);
        }
        assert_eq!(all, want, "the example's values are the defaults");
    }
}
