//! Writing to the books: [`Books`] provisions the `VMLOT_LEDGER` stream and
//! writes each transaction with its postings in one atomic batch, once per
//! subject, with balances checked against the last posting of each account.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::OutboundMessage, stream};
use jetstream_extra::batch_publish::BatchPublishExt;
use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, Forfeit, Posting, Settlement, Transaction};
use vmlot_schemas::{JobId, Money, ProviderId, subjects};

use crate::build;
use crate::error::LedgerError;

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

/// Attempts at a write whose accounts others keep writing.
const MAX_ATTEMPTS: u32 = 50;

/// Handle on the books.
#[derive(Clone)]
pub struct Books {
    js: jetstream::Context,
    stream: stream::Stream,
    /// Writes through this handle queue per account instead of racing:
    /// a busy account (one submitter's burst, a popular provider) would
    /// otherwise lose most compare-and-set rounds. Other writers are still
    /// fenced by the stream's sequence checks.
    account_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The stream has copies on other nodes: reads go to its leader. A
    /// direct get may be answered by a follower that has not yet applied
    /// the last write, and a balance read there can refuse a hold the
    /// credit just before it covers.
    leader_reads: bool,
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
            .get_stream(subjects::LEDGER_STREAM)
            .await
            .map_err(|e| LedgerError::nats("ledger stream", e))?;
        let replicas = stream.cached_info().config.num_replicas;
        Ok(Self {
            js: js.clone(),
            stream,
            account_locks: Arc::default(),
            leader_reads: replicas > 1,
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
        let leader = if self.leader_reads {
            match self.stream.get_last_raw_message_by_subject(subject).await {
                Ok(msg) => Some(msg),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(None),
                // No leader yet (an election): any replica's copy. It may
                // be a write behind; every posting names the sequence it
                // builds on, so a write built on it is refused.
                Err(e) => {
                    tracing::debug!(subject, error = %e, "no leader read; reading a replica");
                    None
                }
            }
        } else {
            None
        };
        let msg = match leader {
            Some(msg) => msg,
            None => match self.stream.direct_get_last_for_subject(subject).await {
                Ok(msg) => msg,
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(LedgerError::nats("read ledger", e)),
            },
        };
        serde_json::from_slice(&msg.payload)
            .map(|v| Some((v, msg.sequence)))
            .map_err(|e| LedgerError::Corrupt {
                subject: subject.to_string(),
                reason: e.to_string(),
            })
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
        let keys = tx
            .entries
            .iter()
            .map(|e| subjects::posting(&e.account, &tx.unit))
            .collect();
        let held = self.lock_accounts(keys).await;
        let outcome = self.record_locked(subject, &tx, &held.keys).await;
        drop(held);
        outcome.map(|recorded| match recorded {
            Some(before) => Recorded::Before(before),
            None => Recorded::Now(tx),
        })
    }

    /// Waits for this handle's locks on the accounts whose posting
    /// subjects are `keys`, taken in sorted order, so two writers never
    /// wait on each other in a circle.
    async fn lock_accounts(&self, mut keys: Vec<String>) -> AccountsHeld {
        keys.sort();
        keys.dedup();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut all = self.account_locks.lock().expect("account locks");
            keys.iter()
                .map(|k| Arc::clone(all.entry(k.clone()).or_default()))
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for lock in &locks {
            guards.push(Arc::clone(lock).lock_owned().await);
        }
        AccountsHeld {
            table: Arc::clone(&self.account_locks),
            keys,
            guards,
        }
    }

    /// Writes `txs` (each with its subject) in one atomic batch: all of
    /// them or none. nats-server commits a single-replica file stream's
    /// atomic batches one after another, each through a temporary store
    /// of its own that it makes, fsyncs and removes, so two transactions
    /// due at the same moment (a segment's settlement and the post of the
    /// one before it) cost half as much together (BENCHMARKS.md,
    /// 2026-12-06). When that batch is refused (one of them is on the
    /// books already, or another writer moved an account first), or would
    /// take an account below zero, each is written on its own by
    /// [`Books::record`], which finds those written before and names any
    /// shortfall. The answers are in the order of `txs`.
    pub async fn record_together(
        &self,
        txs: Vec<(String, Transaction)>,
    ) -> Result<Vec<Recorded>, LedgerError> {
        if txs.len() < 2 {
            let mut out = Vec::new();
            for (subject, tx) in txs {
                out.push(self.record(&subject, tx).await?);
            }
            return Ok(out);
        }
        if let Some(why) = txs.iter().find_map(|(_, tx)| tx.malformed()) {
            return Err(LedgerError::Malformed(why));
        }
        let keys = txs
            .iter()
            .flat_map(|(_, tx)| tx.entries.iter().map(|e| subjects::posting(&e.account, &tx.unit)))
            .collect();
        let held = self.lock_accounts(keys).await;
        let written = self.batch_of(&txs, &held.keys).await;
        drop(held);
        match written {
            Ok(true) => Ok(txs.into_iter().map(|(_, tx)| Recorded::Now(tx)).collect()),
            Ok(false) => {
                let mut out = Vec::with_capacity(txs.len());
                for (subject, tx) in txs {
                    out.push(self.record(&subject, tx).await?);
                }
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    /// One try at [`Books::record_together`]'s batch, with the locks on
    /// every account of `txs` (their posting subjects are `keys`) held:
    /// false when it was not written.
    async fn batch_of(&self, txs: &[(String, Transaction)], keys: &[String]) -> Result<bool, LedgerError> {
        let Ok(batch) = batch_for(txs, self.lasts(keys).await?) else {
            return Ok(false);
        };
        let written = self.publish_batch(batch).await;
        if let Err(err) = &written {
            tracing::debug!(%err, "transactions refused together; writing each on its own");
        }
        Ok(written.is_ok())
    }

    /// Each of `keys`' (posting subjects') last posting: the account's
    /// balance, and the stream sequence its next posting must follow (0
    /// for an account with none).
    async fn lasts(&self, keys: &[String]) -> Result<HashMap<String, (Decimal, u64)>, LedgerError> {
        let lasts = futures::future::try_join_all(keys.iter().map(|subject| async move {
            let last = self.last::<Posting>(subject).await?;
            let last = last
                .map(|(p, seq)| (p.balance, seq))
                .unwrap_or((Decimal::ZERO, 0));
            Ok::<_, LedgerError>((subject.clone(), last))
        }))
        .await?;
        Ok(lasts.into_iter().collect())
    }

    /// Publishes `batch` as one atomic batch and waits for its commit.
    async fn publish_batch(
        &self,
        batch: Vec<OutboundMessage>,
    ) -> Result<(), jetstream_extra::batch_publish::BatchPublishError> {
        self.js
            .batch_publish_all()
            .ack_first(false)
            .timeout(Duration::from_secs(10))
            .publish(futures::stream::iter(batch))
            .await
            .map(drop)
    }

    /// [`Books::record`] with its accounts' locks held: `None` when this
    /// call wrote `tx`, the transaction found otherwise.
    async fn record_locked(
        &self,
        subject: &str,
        tx: &Transaction,
        keys: &[String],
    ) -> Result<Option<Transaction>, LedgerError> {
        let txs = [(subject.to_string(), tx.clone())];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let batch = match batch_for(&txs, self.lasts(keys).await?) {
                Ok(batch) => batch,
                Err(short) => {
                    // A retry of a write that already happened reads the
                    // balance it left: not a shortfall.
                    if let Some(before) = self.transaction(subject).await? {
                        return Ok(Some(before));
                    }
                    return Err(short);
                }
            };
            let written = self.publish_batch(batch).await;
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

    /// The operator funds a user account, or a provider's (so it can put
    /// a deposit in before it has earned). `request` is the caller's id:
    /// the same request credits once.
    pub async fn credit(
        &self,
        request: uuid::Uuid,
        account: &Account,
        amount: &Money,
        memo: &str,
    ) -> Result<Recorded, LedgerError> {
        if !matches!(account, Account::User(_) | Account::Provider(_)) {
            return Err(LedgerError::Malformed(format!(
                "only user and provider accounts are funded, not {account}"
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

    /// Pays a settled segment from the job's escrow into its provider's
    /// pending account. Once per attempt at a segment: its replicas race
    /// for one subject.
    pub async fn settle(&self, settlement: Settlement) -> Result<Recorded, LedgerError> {
        let (subject, tx) = build::settlement(settlement);
        self.record(&subject, tx).await
    }

    /// The settlement of an attempt at a segment, if one was written.
    pub async fn settlement(
        &self,
        job: JobId,
        segment: u32,
        attempt: u32,
    ) -> Result<Option<Settlement>, LedgerError> {
        Ok(self
            .transaction(&subjects::settlement_tx(&job, segment, attempt))
            .await?
            .and_then(|tx| tx.settlement.map(|s| *s)))
    }

    /// Posts a pending settlement: the provider is paid (less the fee).
    /// A settlement resolved before (posted or voided) stays as it was:
    /// the answer is that resolution.
    pub async fn post(&self, settlement: &Settlement, fee_rate: Decimal) -> Result<Recorded, LedgerError> {
        let (subject, tx) = build::post(settlement, fee_rate);
        self.record(&subject, tx).await
    }

    /// Voids a pending settlement: its price goes back to the job's escrow.
    /// A settlement resolved before stays as it was (see [`Books::post`]).
    pub async fn void(&self, settlement: &Settlement, why: &str) -> Result<Recorded, LedgerError> {
        let (subject, tx) = build::void(settlement, why);
        self.record(&subject, tx).await
    }

    /// A provider puts `amount` of its earnings into its deposit. `request`
    /// is the provider's id for the request: the same request deposits
    /// once, and another deposit under a used id is refused
    /// ([`LedgerError::Conflict`]). More than the provider's balance is
    /// refused as [`LedgerError::InsufficientFunds`] of `provider:P`.
    pub async fn deposit(
        &self,
        request: &uuid::Uuid,
        provider: ProviderId,
        amount: &Money,
    ) -> Result<Recorded, LedgerError> {
        positive("deposit", amount)?;
        let (subject, tx) = build::deposit(request, provider, amount);
        self.record_request(&subject, tx).await
    }

    /// A provider takes `amount` of its deposit back into its earnings;
    /// `request` as for [`Books::deposit`]. More than the deposit holds is
    /// refused as [`LedgerError::InsufficientFunds`] of `deposit:P`.
    pub async fn release(
        &self,
        request: &uuid::Uuid,
        provider: ProviderId,
        amount: &Money,
    ) -> Result<Recorded, LedgerError> {
        positive("release", amount)?;
        let (subject, tx) = build::release(request, provider, amount);
        self.record_request(&subject, tx).await
    }

    /// Gives part of a cheating provider's deposit to the job's submitter.
    /// Once per (job, segment, attempt, provider): a forfeit written
    /// before stands, and is the answer. More than the deposit holds is
    /// refused as [`LedgerError::InsufficientFunds`] of `deposit:P`: the
    /// caller takes at most the deposit's [`Books::balance`].
    pub async fn forfeit(&self, forfeit: &Forfeit) -> Result<Recorded, LedgerError> {
        positive("forfeit", &forfeit.amount)?;
        if !vmlot_schemas::ledger::valid_user_name(&forfeit.payer) {
            return Err(LedgerError::Malformed(format!(
                "a forfeit goes to a user account, not {:?}",
                forfeit.payer
            )));
        }
        let (subject, tx) = build::forfeit(forfeit);
        self.record(&subject, tx).await
    }

    /// [`Books::record`] for a transaction whose subject is a caller's
    /// request id: one found there must be this same request.
    async fn record_request(&self, subject: &str, tx: Transaction) -> Result<Recorded, LedgerError> {
        let (kind, provider, unit, entries) = (tx.kind, tx.provider, tx.unit.clone(), tx.entries.clone());
        match self.record(subject, tx).await? {
            Recorded::Before(before)
                if before.kind != kind
                    || before.provider != provider
                    || before.unit != unit
                    || before.entries != entries =>
            {
                let amount = before.totals().0;
                let of = before
                    .provider
                    .map(|p| format!(" of provider {p}"))
                    .unwrap_or_default();
                Err(LedgerError::Conflict {
                    subject: subject.to_string(),
                    found: format!("a {} of {amount} {}{of}", before.kind.as_str(), before.unit),
                })
            }
            recorded => Ok(recorded),
        }
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

/// Refuses an amount that moves nothing (or backwards).
fn positive(what: &str, amount: &Money) -> Result<(), LedgerError> {
    if amount.amount <= Decimal::ZERO {
        return Err(LedgerError::Malformed(format!(
            "a {what} must be positive, not {amount}"
        )));
    }
    Ok(())
}

/// The atomic batch that writes `txs` (each with its subject), given each
/// account's last posting (`lasts`, by posting subject: the balance and
/// the sequence read): each transaction expects its subject empty and is
/// followed by its postings; an account's first posting expects the
/// sequence read, and a later one follows it inside the batch, which the
/// server applies whole and in order. Refused as
/// [`LedgerError::InsufficientFunds`] at the first entry that would take
/// its account below zero.
fn batch_for(
    txs: &[(String, Transaction)],
    lasts: HashMap<String, (Decimal, u64)>,
) -> Result<Vec<OutboundMessage>, LedgerError> {
    let mut accounts: HashMap<String, (Decimal, Option<u64>)> = lasts
        .into_iter()
        .map(|(subject, (balance, seq))| (subject, (balance, Some(seq))))
        .collect();
    let mut batch = Vec::new();
    for (subject, tx) in txs {
        batch.push(OutboundMessage {
            subject: subject.clone().into(),
            payload: serde_json::to_vec(tx).expect("transaction serializes").into(),
            headers: Some(expect_last_subject_seq(0)),
        });
        for entry in &tx.entries {
            let posting_subject = subjects::posting(&entry.account, &tx.unit);
            let (balance, seq) = accounts
                .get_mut(&posting_subject)
                .expect("every account's last posting was read");
            let after = *balance + entry.signed();
            if after.is_sign_negative() && !after.is_zero() && !entry.account.may_go_negative() {
                return Err(LedgerError::InsufficientFunds {
                    account: entry.account.clone(),
                    unit: tx.unit.clone(),
                    balance: *balance,
                    needed: entry.amount,
                });
            }
            *balance = after;
            batch.push(OutboundMessage {
                subject: posting_subject.into(),
                payload: serde_json::to_vec(&build::posting(tx, entry, after))
                    .expect("posting serializes")
                    .into(),
                headers: seq.take().map(expect_last_subject_seq),
            });
        }
    }
    Ok(batch)
}

fn expect_last_subject_seq(seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
    headers
}

/// This handle's locks on some accounts (their posting subjects, `keys`),
/// given back on drop; an account's lock leaves the table once nobody
/// holds or waits for it.
struct AccountsHeld {
    table: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    keys: Vec<String>,
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for AccountsHeld {
    fn drop(&mut self) {
        self.guards.clear();
        let mut all = self.table.lock().expect("account locks");
        for key in &self.keys {
            if all.get(key).is_some_and(|l| Arc::strong_count(l) == 1) {
                all.remove(key);
            }
        }
    }
}
