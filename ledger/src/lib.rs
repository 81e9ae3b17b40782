//! The vmlot books, kept in the `VMLOT_LEDGER` stream.
//!
//! A transaction is written together with one posting per entry, in one
//! atomic batch:
//! - the transaction on its own subject, derived from what it is for
//!   (`vmlot.ledger.tx.settlement.<job>.<segment>`, ...), only if that
//!   subject is empty: a retry is recognised, a second payment refused;
//! - each posting on its account's subject (`vmlot.ledger.post.<account>.<unit>`),
//!   only if the last posting there is the one the balance was read from:
//!   two writers racing for one account cannot both spend its balance.
//!
//! The stream denies deletes and purges: records are immutable. Readers
//! ([`read`]) answer queries and statements from subject filters, and
//! [`verify`] replays everything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::OutboundMessage, stream};
use bytes::Bytes;
use jetstream_extra::batch_publish::BatchPublishExt;
use rust_decimal::{Decimal, RoundingStrategy};
use vmlot_schemas::ledger::{Account, Posting, Transaction};
use vmlot_schemas::market::SegmentPayment;
use vmlot_schemas::{JobId, Money, subjects};

pub mod build;
pub mod read;
pub mod verify;

/// Why the books refused or failed a write.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("malformed transaction: {0}")]
    Malformed(String),
    #[error("insufficient funds: {account} holds {balance} {unit}, {needed} {unit} needed")]
    InsufficientFunds {
        account: Account,
        unit: String,
        balance: Decimal,
        needed: Decimal,
    },
    #[error("{account} was written by others {attempts} times in a row; gave up")]
    Contended { account: String, attempts: u32 },
    #[error("undecodable ledger record on {subject}: {reason}")]
    Corrupt { subject: String, reason: String },
    #[error("NATS ({op}): {message}")]
    Nats { op: &'static str, message: String },
}

impl LedgerError {
    pub fn nats(op: &'static str, err: impl std::fmt::Display) -> Self {
        LedgerError::Nats {
            op,
            message: err.to_string(),
        }
    }
}

/// What a write found.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// This call wrote it.
    Now(Transaction),
    /// A transaction for the same thing was already on the books (a retry,
    /// or a broker that crashed after writing it): that one stands.
    Before(Transaction),
}

impl Recorded {
    pub fn tx(&self) -> &Transaction {
        match self {
            Recorded::Now(t) | Recorded::Before(t) => t,
        }
    }
}

/// Namespace of transaction ids (UUID v5 over the transaction's subject).
const TX_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d1f_5a4e_9b2c_4c1d_8e7f_a0b1_c2d3_e4f5);

/// The id of the transaction written on `subject`: the same on every retry.
pub fn tx_id(subject: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&TX_NAMESPACE, subject.as_bytes())
}

/// Attempts at a write whose accounts others keep writing.
const MAX_ATTEMPTS: u32 = 50;

/// Splits a segment's price into the provider's share and the operator's
/// fee at `fee_rate` (0.05 = 5 %). The fee is rounded half-to-even to
/// [`vmlot_schemas::ledger::MAX_SCALE`] decimal places (the finest amount
/// the books hold), and the provider gets the rest, so the two always add
/// up to the price exactly.
pub fn split_fee(price: Decimal, fee_rate: Decimal) -> (Decimal, Decimal) {
    if fee_rate <= Decimal::ZERO {
        return (price, Decimal::ZERO);
    }
    let fee = (price * fee_rate.min(Decimal::ONE))
        .round_dp_with_strategy(
            vmlot_schemas::ledger::MAX_SCALE,
            RoundingStrategy::MidpointNearestEven,
        )
        .normalize()
        .min(price);
    (price - fee, fee)
}

/// Handle on the books.
#[derive(Clone)]
pub struct Books {
    js: jetstream::Context,
    stream: stream::Stream<()>,
    /// Writes through this handle queue per account instead of racing:
    /// a busy account (one submitter's burst, a popular provider) would
    /// otherwise lose most compare-and-set rounds. Other writers are still
    /// fenced by the stream's sequence checks.
    account_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Books {
    /// Creates the ledger stream if it is missing (`replicas` copies in a
    /// cluster) and opens it.
    pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<Self, LedgerError> {
        js.get_or_create_stream(stream::Config {
            name: subjects::LEDGER_STREAM.to_string(),
            subjects: vec![subjects::LEDGER_SUBJECTS.to_string()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            allow_atomic_publish: true,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .map_err(|e| LedgerError::nats("create ledger stream", e))?;
        Self::open(js).await
    }

    /// Opens the existing ledger stream.
    pub async fn open(js: &jetstream::Context) -> Result<Self, LedgerError> {
        let stream = js
            .get_stream_no_info(subjects::LEDGER_STREAM)
            .await
            .map_err(|e| LedgerError::nats("ledger stream", e))?;
        Ok(Self {
            js: js.clone(),
            stream,
            account_locks: Arc::default(),
        })
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// The last message on `subject` and its sequence, decoded.
    async fn last<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
    ) -> Result<Option<(T, u64)>, LedgerError> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => serde_json::from_slice(&msg.payload)
                .map(|v| Some((v, msg.sequence)))
                .map_err(|e| LedgerError::Corrupt {
                    subject: subject.to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(LedgerError::nats("read ledger", e)),
        }
    }

    /// The transaction on `subject`, if written.
    pub async fn transaction(&self, subject: &str) -> Result<Option<Transaction>, LedgerError> {
        Ok(self.last::<Transaction>(subject).await?.map(|(t, _)| t))
    }

    /// An account's balance in `unit` (zero if it never had a posting).
    pub async fn balance(&self, account: &Account, unit: &str) -> Result<Decimal, LedgerError> {
        Ok(self
            .last::<Posting>(&subjects::posting(account, unit))
            .await?
            .map(|(p, _)| p.balance)
            .unwrap_or_default())
    }

    /// Writes `tx` on `subject` with its postings, unless a transaction is
    /// there already. Refuses a malformed transaction, and one that would
    /// take an account other than the operator's below zero.
    pub async fn record(&self, subject: &str, tx: Transaction) -> Result<Recorded, LedgerError> {
        if let Some(why) = tx.malformed() {
            return Err(LedgerError::Malformed(why));
        }
        let body = Bytes::from(serde_json::to_vec(&tx).expect("transaction serializes"));
        let mut keys: Vec<String> = tx
            .entries
            .iter()
            .map(|e| subjects::posting(&e.account, &tx.unit))
            .collect();
        keys.sort();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut all = self.account_locks.lock().expect("account locks");
            keys.iter()
                .map(|k| Arc::clone(all.entry(k.clone()).or_default()))
                .collect()
        };
        // In sorted order, so two writers never wait on each other in a circle.
        let mut guards = Vec::with_capacity(locks.len());
        for lock in &locks {
            guards.push(lock.lock().await);
        }
        let outcome = self.record_locked(subject, &tx, body).await;
        drop(guards);
        drop(locks);
        let mut all = self.account_locks.lock().expect("account locks");
        for key in keys {
            if all.get(&key).is_some_and(|l| Arc::strong_count(l) == 1) {
                all.remove(&key);
            }
        }
        drop(all);
        outcome.map(|recorded| match recorded {
            Some(before) => Recorded::Before(before),
            None => Recorded::Now(tx),
        })
    }

    /// [`Books::record`] with its accounts' locks held: `None` when this
    /// call wrote `tx`, the transaction found otherwise.
    async fn record_locked(
        &self,
        subject: &str,
        tx: &Transaction,
        body: Bytes,
    ) -> Result<Option<Transaction>, LedgerError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Each account's last posting: its balance, and the sequence the
            // write expects to follow.
            let unit = tx.unit.as_str();
            let lasts = futures::future::try_join_all(tx.entries.iter().map(|e| async move {
                let subject = subjects::posting(&e.account, unit);
                let last = self.last::<Posting>(&subject).await?;
                Ok::<_, LedgerError>((subject, last))
            }))
            .await?;
            let mut batch = Vec::with_capacity(tx.entries.len() + 1);
            batch.push(OutboundMessage {
                subject: subject.to_string().into(),
                payload: body.clone(),
                headers: Some(expect_last_subject_seq(0)),
            });
            for (entry, (posting_subject, last)) in tx.entries.iter().zip(&lasts) {
                let (before, seq) = last
                    .as_ref()
                    .map(|(p, seq)| (p.balance, *seq))
                    .unwrap_or((Decimal::ZERO, 0));
                let after = before + entry.signed();
                if after.is_sign_negative() && !after.is_zero() && !entry.account.may_go_negative() {
                    // A retry of a write that already happened reads the
                    // balance it left: not a shortfall.
                    if let Some(before) = self.transaction(subject).await? {
                        return Ok(Some(before));
                    }
                    return Err(LedgerError::InsufficientFunds {
                        account: entry.account.clone(),
                        unit: tx.unit.clone(),
                        balance: before,
                        needed: entry.amount,
                    });
                }
                let posting = build::posting(tx, entry, after);
                batch.push(OutboundMessage {
                    subject: posting_subject.clone().into(),
                    payload: serde_json::to_vec(&posting).expect("posting serializes").into(),
                    headers: Some(expect_last_subject_seq(seq)),
                });
            }
            let written = self
                .js
                .batch_publish_all()
                .ack_first(false)
                .timeout(Duration::from_secs(10))
                .publish(futures::stream::iter(batch))
                .await;
            match written {
                Ok(_) => return Ok(None),
                Err(err) => {
                    // Refused whole: the transaction is there already, or
                    // another write moved one of the accounts first.
                    if let Some(before) = self.transaction(subject).await? {
                        return Ok(Some(before));
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(LedgerError::Contended {
                            account: tx
                                .entries
                                .iter()
                                .map(|e| e.account.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            attempts: attempt,
                        });
                    }
                    tracing::debug!(%subject, %err, attempt, "ledger write refused; reading balances again");
                    let jitter = rand::random::<u64>() % (5 * u64::from(attempt.min(20)) + 1);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
            }
        }
    }

    /// The operator funds a user account. `request` is the caller's id:
    /// the same request credits once.
    pub async fn credit(
        &self,
        request: uuid::Uuid,
        account: &Account,
        amount: &Money,
        memo: &str,
    ) -> Result<Recorded, LedgerError> {
        if !matches!(account, Account::User(_)) {
            return Err(LedgerError::Malformed(format!(
                "only user accounts are funded, not {account}"
            )));
        }
        if amount.amount <= Decimal::ZERO {
            return Err(LedgerError::Malformed(format!(
                "a credit must be positive, not {amount}"
            )));
        }
        let (subject, tx) = build::credit(&request, account, amount, memo);
        self.record(&subject, tx).await
    }

    /// Moves a job's budget from its submitter into its escrow.
    pub async fn hold(&self, job: JobId, user: &str, budget: &Money) -> Result<Recorded, LedgerError> {
        let (subject, tx) = build::hold(job, user, budget);
        self.record(&subject, tx).await
    }

    /// Pays a settled segment from the job's escrow: the provider's share
    /// to the provider, the fee (if any) to the operator. Once per segment.
    pub async fn settle(&self, payment: SegmentPayment, fee_rate: Decimal) -> Result<Recorded, LedgerError> {
        let (subject, tx) = build::settlement(payment, fee_rate);
        self.record(&subject, tx).await
    }

    /// The settlement of a segment, if one was written.
    pub async fn settlement(&self, job: JobId, segment: u32) -> Result<Option<SegmentPayment>, LedgerError> {
        Ok(self
            .transaction(&subjects::settlement_tx(&job, segment))
            .await?
            .and_then(|tx| tx.settlement.map(|s| *s)))
    }

    /// The job ended: what is left in its escrow goes back to `user`. Written
    /// once, even when nothing is left, so the books show the escrow closed.
    pub async fn refund(&self, job: JobId, user: &str, unit: &str) -> Result<Recorded, LedgerError> {
        let subject = subjects::refund_tx(&job);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(before) = self.transaction(&subject).await? {
                return Ok(Recorded::Before(before));
            }
            let left = self.balance(&Account::Escrow(job), unit).await?;
            let (_, tx) = build::refund(job, user, unit, left);
            // A settlement racing in between the read of `left` and the
            // write moves the escrow below `left`: read it again.
            match self.record(&subject, tx).await {
                Err(LedgerError::InsufficientFunds { .. }) if attempt < MAX_ATTEMPTS => continue,
                other => return other,
            }
        }
    }
}

fn expect_last_subject_seq(seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
    headers
}

/// Parses an amount as typed by a person: a plain decimal, no exponent,
/// at most [`vmlot_schemas::ledger::MAX_SCALE`] places.
pub fn parse_amount(text: &str) -> Result<Decimal, String> {
    let amount = vmlot_schemas::money::plain_decimal::parse(text.trim())?;
    if amount.scale() > vmlot_schemas::ledger::MAX_SCALE {
        return Err(format!(
            "{text} has more than {} decimal places",
            vmlot_schemas::ledger::MAX_SCALE
        ));
    }
    Ok(amount)
}

/// Balances by (account, unit), from replaying transactions.
pub type Balances = HashMap<(Account, String), Decimal>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn the_fee_and_the_share_add_up_to_the_price() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(split_fee(d("1.00"), d("0")), (d("1.00"), d("0")));
        assert_eq!(split_fee(d("1.00"), d("0.05")), (d("0.95"), d("0.05")));
        assert_eq!(split_fee(d("0.5"), d("0.1")), (d("0.45"), d("0.05")));
        // 0.000000125 rounds half to even at 8 places: 0.00000012.
        assert_eq!(
            split_fee(d("0.0000025"), d("0.05")),
            (d("0.00000238"), d("0.00000012"))
        );
        assert_eq!(
            split_fee(d("3"), d("2")),
            (d("0"), d("3")),
            "a fee never exceeds the price"
        );
        for (p, r) in [("0.07", "0.3333"), ("123.456", "0.015"), ("1", "0.999")] {
            let (share, fee) = split_fee(d(p), d(r));
            assert_eq!(share + fee, d(p));
            assert!(share >= Decimal::ZERO && fee >= Decimal::ZERO);
        }
    }

    #[test]
    fn amounts_are_plain_decimals() {
        assert_eq!(
            parse_amount("12.50").unwrap(),
            Decimal::from_str("12.50").unwrap()
        );
        assert!(parse_amount("1e3").is_err());
        assert!(parse_amount("0.000000001").is_err());
        assert!(parse_amount("abc").is_err());
    }
}
