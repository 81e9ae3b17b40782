//! Writing to the books: [`Books`] provisions the `VMLOT_LEDGER` stream and
//! writes each transaction with its postings in one atomic batch, once per
//! subject, with balances checked against the last posting of each account;
//! the transactions that wait for a handle at the same time share one batch
//! ([`crate::group`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::OutboundMessage, stream};
use jetstream_extra::batch_publish::BatchPublishExt;
use rust_decimal::Decimal;
use tokio::sync::oneshot;
use vmlot_schemas::ledger::{Account, Forfeit, Posting, Settlement, Transaction};
use vmlot_schemas::{JobId, Money, ProviderId, subjects};

use crate::build;
use crate::error::LedgerError;
pub use crate::group::Recorded;
use crate::group::{self, MAX_GROUP_MESSAGES, Queue, Unit};

/// Attempts at a write whose accounts others keep writing.
const MAX_ATTEMPTS: u32 = 50;

/// Handle on the books.
#[derive(Clone)]
pub struct Books {
    js: jetstream::Context,
    stream: stream::Stream,
    /// Writes through this handle wait here, and go out in groups
    /// ([`crate::group`]): one atomic batch for whatever waits.
    queue: Arc<Queue>,
    /// Held by the one task writing a group at a time.
    writing: Arc<tokio::sync::Mutex<()>>,
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
            queue: Arc::default(),
            writing: Arc::default(),
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
        let mut answers = self.record_together(vec![(subject.to_string(), tx)]).await?;
        Ok(answers.pop().expect("one answer for one transaction"))
    }

    /// Writes `txs` (each with its subject) as [`Books::record`] writes
    /// one, in one atomic batch when none is refused or on the books
    /// already (a segment's settlement and the posts it makes due go
    /// together), and with whatever else waits for this handle: every
    /// write joins its queue, and one task at a time writes all that
    /// waits as one batch ([`crate::group`]; nats-server commits a
    /// single-replica stream's batches one after another, so the books'
    /// rate is batches a second times transactions a batch). The answers
    /// are in the order of `txs`, or the first refusal among them.
    pub async fn record_together(
        &self,
        txs: Vec<(String, Transaction)>,
    ) -> Result<Vec<Recorded>, LedgerError> {
        if let Some(why) = txs.iter().find_map(|(_, tx)| tx.malformed()) {
            return Err(LedgerError::Malformed(why));
        }
        if txs.is_empty() {
            return Ok(Vec::new());
        }
        loop {
            let mut answer = self.queue.push(txs.clone());
            loop {
                let writing = tokio::select! {
                    biased;
                    answer = &mut answer => match answer {
                        Ok(answer) => return answer,
                        Err(_) => break,
                    },
                    writing = self.writing.lock() => writing,
                };
                match answer.try_recv() {
                    Ok(answer) => return answer,
                    Err(oneshot::error::TryRecvError::Closed) => break,
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
                let units = self.queue.take(MAX_GROUP_MESSAGES);
                self.write_group(units).await;
                drop(writing);
            }
            // The task that took them stopped before answering: writing
            // them again finds any it wrote (a subject takes one).
            tracing::debug!("ledger writer stopped before answering; writing again");
        }
    }

    /// Writes one group of units and answers each. What the group's batch
    /// leaves out or a refused batch does not settle is planned again:
    /// one found on the books since is answered with that one; when
    /// nothing was, another writer moved an account first, and the group
    /// waits a little and reads the balances again.
    async fn write_group(&self, units: Vec<Unit>) {
        let mut results: Vec<Vec<Option<Result<Recorded, LedgerError>>>> = units
            .iter()
            .map(|unit| unit.txs.iter().map(|_| None).collect())
            .collect();
        let mut pending: Vec<(usize, usize)> = units
            .iter()
            .enumerate()
            .flat_map(|(u, unit)| (0..unit.txs.len()).map(move |t| (u, t)))
            .collect();
        let mut attempt = 0;
        while !pending.is_empty() {
            let offer: Vec<(&str, &Transaction)> = pending
                .iter()
                .map(|&(u, t)| (units[u].txs[t].0.as_str(), &units[u].txs[t].1))
                .collect();
            let mut keys: Vec<String> = offer
                .iter()
                .flat_map(|(_, tx)| tx.entries.iter().map(|e| subjects::posting(&e.account, &tx.unit)))
                .collect();
            keys.sort();
            keys.dedup();
            let lasts = match self.lasts(&keys).await {
                Ok(lasts) => lasts,
                Err(e) => {
                    for &(u, t) in &pending {
                        results[u][t] = Some(Err(e.clone()));
                    }
                    break;
                }
            };
            let plan = group::plan(&offer, lasts);
            let written = plan.batch.is_empty()
                || match self.publish_batch(plan.batch).await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::debug!(%err, transactions = plan.placed.len(), "ledger batch refused");
                        false
                    }
                };
            // What the books must be asked about (with the refusal to give
            // when nothing is there; none: plan it again), and what goes
            // back into the plan unasked.
            let (asked, mut again): (Vec<(usize, Option<LedgerError>)>, Vec<usize>) = if written {
                for &i in &plan.placed {
                    let (u, t) = pending[i];
                    results[u][t] = Some(Ok(Recorded::Now(units[u].txs[t].1.clone())));
                }
                // A retry of a write that already happened reads the
                // balance it left: not a shortfall.
                let short = plan.short.into_iter().map(|(i, short)| (i, Some(short)));
                let repeated = plan.repeated.into_iter().map(|i| (i, None));
                (short.chain(repeated).collect(), Vec::new())
            } else {
                // Refused whole: one of them is on the books already, or
                // another writer moved one of the accounts first.
                let asked = plan.placed.iter().map(|&i| (i, None)).collect();
                let unasked = plan.short.iter().map(|(i, _)| *i).chain(plan.repeated);
                (asked, unasked.collect())
            };
            let found = futures::future::join_all(asked.iter().map(|(i, _)| {
                let (u, t) = pending[*i];
                self.transaction(&units[u].txs[t].0)
            }))
            .await;
            let mut found_any = false;
            for ((i, if_absent), found) in asked.into_iter().zip(found) {
                let (u, t) = pending[i];
                results[u][t] = match (found, if_absent) {
                    (Ok(Some(before)), _) => {
                        found_any = true;
                        Some(Ok(Recorded::Before(before)))
                    }
                    (Ok(None), Some(short)) => Some(Err(short)),
                    (Ok(None), None) => {
                        again.push(i);
                        continue;
                    }
                    (Err(e), _) => Some(Err(e)),
                };
            }
            let again: Vec<(usize, usize)> = again.into_iter().map(|i| pending[i]).collect();
            if !written && !found_any && !again.is_empty() {
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    for &(u, t) in &again {
                        let tx = &units[u].txs[t].1;
                        results[u][t] = Some(Err(LedgerError::Contended {
                            account: tx
                                .entries
                                .iter()
                                .map(|e| e.account.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            attempts: attempt,
                        }));
                    }
                    break;
                }
                tracing::debug!(
                    attempt,
                    transactions = again.len(),
                    "ledger write refused; reading balances again"
                );
                let jitter = rand::random::<u64>() % (5 * u64::from(attempt.min(20)) + 1);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            pending = again;
        }
        for (unit, results) in units.into_iter().zip(results) {
            let answer = results
                .into_iter()
                .map(|r| r.expect("every transaction of a group is answered"))
                .collect();
            // A caller that stopped waiting is not asked again.
            let _ = unit.answer.send(answer);
        }
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
