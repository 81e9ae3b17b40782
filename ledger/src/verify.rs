//! Reconciliation: replays the whole ledger, and the job records beside
//! it, and names every record that breaks a rule:
//! - every transaction balances, sits on the subject its id and kind call
//!   for, and has the shape of its kind;
//! - every entry has its posting and every posting its entry, each posting
//!   carrying the balance the replay gives;
//! - no account but the operator's goes below zero, and all balances of a
//!   unit sum to zero;
//! - every settled segment is paid exactly once, to the provider whose
//!   result settled it, at its price; no payment for a segment the job
//!   never settled (a cancelled or losing replica);
//! - every job's escrow holds its budget less its payments while it runs,
//!   and is refunded to zero once it ends.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_nats::jetstream;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use vmlot_schemas::ledger::{Account, Posting, Side, Transaction, TxKind};
use vmlot_schemas::market::JobStatus;
use vmlot_schemas::{JobId, LotId, ProviderId, subjects};

use crate::read::read_raw;
use crate::{LedgerError, tx_id};

/// One broken rule, and the record that breaks it.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// The record: a subject and stream sequence, or a job.
    pub record: String,
    pub what: String,
}

/// What a replay found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub transactions: u64,
    pub postings: u64,
    pub jobs: u64,
    /// Broken rules; the books verify when this is empty.
    pub problems: Vec<Problem>,
    /// Not wrong, but worth knowing (a broker catching up after a crash).
    pub notes: Vec<String>,
    /// Every account's balance per unit, from the replay.
    pub balances: BTreeMap<String, BTreeMap<String, String>>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Paid {
    provider: ProviderId,
    amount: Decimal,
    lot: LotId,
    record: String,
}

/// A ledger message, named only when a problem is reported.
struct Rec<'a>(&'a str, u64);

impl std::fmt::Display for Rec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (seq {})", self.0, self.1)
    }
}

/// What replay needs of a transaction: its settlement's details without
/// the whole result they carry (most of a settlement's bytes), which
/// serde skips instead of building.
#[derive(Deserialize)]
struct TxView {
    version: u32,
    id: uuid::Uuid,
    kind: TxKind,
    at: chrono::DateTime<chrono::Utc>,
    unit: String,
    entries: Vec<vmlot_schemas::ledger::Entry>,
    job: Option<JobId>,
    segment: Option<u32>,
    provider: Option<ProviderId>,
    settlement: Option<SettlementView>,
}

#[derive(Deserialize)]
struct SettlementView {
    job: JobId,
    segment: u32,
    lot: LotId,
    provider: ProviderId,
    amount: vmlot_schemas::Money,
    result: ResultView,
}

#[derive(Deserialize)]
struct ResultView {
    job: JobId,
    segment: u32,
    provider: ProviderId,
}

impl TxView {
    fn split(self) -> (Transaction, Option<SettlementView>) {
        let tx = Transaction {
            version: self.version,
            id: self.id,
            kind: self.kind,
            at: self.at,
            unit: self.unit,
            entries: self.entries,
            job: self.job,
            segment: self.segment,
            provider: self.provider,
            memo: String::new(),
            settlement: None,
        };
        (tx, self.settlement)
    }
}

#[derive(Default)]
struct Replay {
    report: Report,
    balances: HashMap<(Account, String), Decimal>,
    /// Last balance per posting subject.
    chain: HashMap<String, Decimal>,
    /// Entries still waiting for their posting: (tx, account) → (change, unit, record).
    unposted: HashMap<(uuid::Uuid, Account), (Decimal, String, String)>,
    seen: HashSet<uuid::Uuid>,
    holds: HashMap<JobId, (String, Decimal, String)>,
    paid: HashMap<JobId, BTreeMap<u32, Paid>>,
    refunds: HashSet<JobId>,
}

impl Replay {
    fn problem(&mut self, record: &dyn std::fmt::Display, what: impl Into<String>) {
        self.report.problems.push(Problem {
            record: record.to_string(),
            what: what.into(),
        });
    }

    fn transaction(&mut self, record: &Rec, subject: &str, tx: TxView) {
        let (tx, settlement) = tx.split();
        self.report.transactions += 1;
        if let Some(why) = tx.malformed() {
            self.problem(record, why);
            return;
        }
        if tx.id != tx_id(subject) {
            self.problem(record, format!("id {} is not the id of its subject", tx.id));
        }
        if !self.seen.insert(tx.id) {
            self.problem(record, format!("transaction {} written twice", tx.id));
            return;
        }
        let expected_subject = match (tx.kind, tx.job, tx.segment) {
            (TxKind::Credit, _, _) => subjects::credit_tx(&uuid::Uuid::nil())
                .rsplit_once('.')
                .map(|(prefix, _)| prefix.to_string())
                .filter(|prefix| subject.starts_with(prefix.as_str()))
                .map(|_| subject.to_string()),
            (TxKind::Hold, Some(job), _) => Some(subjects::hold_tx(&job)),
            (TxKind::Refund, Some(job), _) => Some(subjects::refund_tx(&job)),
            (TxKind::Settlement, Some(job), Some(segment)) => Some(subjects::settlement_tx(&job, segment)),
            _ => None,
        };
        if expected_subject.as_deref() != Some(subject) {
            self.problem(
                record,
                format!("a {:?} transaction does not belong on this subject", tx.kind),
            );
        }
        self.check_shape(record, &tx, settlement.as_ref());
        for e in &tx.entries {
            let balance = self
                .balances
                .entry((e.account.clone(), tx.unit.clone()))
                .or_default();
            *balance += e.signed();
            let after = *balance;
            if after.is_sign_negative() && !after.is_zero() && !e.account.may_go_negative() {
                self.problem(
                    record,
                    format!("takes {} below zero ({after} {})", e.account, tx.unit),
                );
            }
            self.unposted.insert(
                (tx.id, e.account.clone()),
                (e.signed(), tx.unit.clone(), record.to_string()),
            );
        }
    }

    /// The entries a transaction of each kind must have.
    fn check_shape(&mut self, record: &Rec, tx: &Transaction, settlement: Option<&SettlementView>) {
        let debits: Vec<&Account> = tx
            .entries
            .iter()
            .filter(|e| e.side == Side::Debit)
            .map(|e| &e.account)
            .collect();
        let credits: Vec<&Account> = tx
            .entries
            .iter()
            .filter(|e| e.side == Side::Credit)
            .map(|e| &e.account)
            .collect();
        let amount_of = |account: &Account| {
            tx.entries
                .iter()
                .find(|e| &e.account == account)
                .map(|e| e.amount)
                .unwrap_or_default()
        };
        let job_escrow = tx.job.map(Account::Escrow);
        let shape_ok = match tx.kind {
            TxKind::Credit => {
                matches!(debits[..], [Account::Operator]) && matches!(credits[..], [Account::User(_)])
            }
            TxKind::Hold => {
                matches!(debits[..], [Account::User(_)])
                    && credits.len() == 1
                    && Some(credits[0]) == job_escrow.as_ref()
            }
            TxKind::Refund => {
                debits.len() == 1
                    && Some(debits[0]) == job_escrow.as_ref()
                    && matches!(credits[..], [Account::User(_)])
            }
            TxKind::Settlement => {
                debits.len() == 1
                    && Some(debits[0]) == job_escrow.as_ref()
                    && credits
                        .iter()
                        .all(|a| matches!(a, Account::Provider(_) | Account::Operator))
                    && credits
                        .iter()
                        .filter(|a| matches!(a, Account::Provider(_)))
                        .count()
                        == 1
            }
        };
        if !shape_ok {
            self.problem(
                record,
                format!("the entries do not have the shape of a {:?}", tx.kind),
            );
            return;
        }
        let Some(job) = tx.job else { return };
        match tx.kind {
            TxKind::Hold => {
                if let Account::User(user) = debits[0] {
                    self.holds
                        .insert(job, (user.clone(), amount_of(debits[0]), tx.unit.clone()));
                }
            }
            TxKind::Refund => {
                self.refunds.insert(job);
            }
            TxKind::Settlement => {
                let Some(s) = settlement else {
                    self.problem(record, "a settlement without its details");
                    return;
                };
                let paid_to = credits.iter().find_map(|a| match a {
                    Account::Provider(p) => Some(*p),
                    _ => None,
                });
                if paid_to != Some(s.provider) || tx.provider != Some(s.provider) {
                    self.problem(record, "pays a provider other than the one its details name");
                }
                if s.result.provider != s.provider {
                    self.problem(
                        record,
                        format!(
                            "pays {} for a result of {} (a losing replica?)",
                            s.provider, s.result.provider
                        ),
                    );
                }
                if s.job != job
                    || Some(s.segment) != tx.segment
                    || s.result.segment != s.segment
                    || s.result.job != job
                {
                    self.problem(record, "details name another job or segment");
                }
                if s.amount.amount != amount_of(debits[0]) || s.amount.unit != tx.unit {
                    self.problem(record, "the escrow is debited other than the settled price");
                }
                let segment = s.segment;
                let paid = Paid {
                    provider: s.provider,
                    amount: s.amount.amount,
                    lot: s.lot,
                    record: record.to_string(),
                };
                if let Some(first) = self.paid.entry(job).or_default().insert(segment, paid) {
                    self.problem(
                        record,
                        format!(
                            "segment {segment} of job {job} paid again (first: {})",
                            first.record
                        ),
                    );
                }
            }
            TxKind::Credit => {}
        }
    }

    fn posting(&mut self, record: &Rec, subject: &str, p: Posting) {
        self.report.postings += 1;
        if subjects::posting(&p.account, &p.unit) != subject {
            self.problem(
                record,
                format!("a posting of {} is on another account's subject", p.account),
            );
        }
        // Allocates a key only for an account's first posting.
        let before = match self.chain.get_mut(subject) {
            Some(last) => std::mem::replace(last, p.balance),
            None => {
                self.chain.insert(subject.to_string(), p.balance);
                Decimal::ZERO
            }
        };
        if p.balance != before + p.change {
            self.problem(
                record,
                format!("balance {} does not follow {before} {:+}", p.balance, p.change),
            );
        }
        match self.unposted.remove(&(p.tx, p.account)) {
            Some((change, unit, _)) if change == p.change && unit == p.unit => {}
            Some(_) => self.problem(
                record,
                format!("posting differs from its entry in transaction {}", p.tx),
            ),
            None => self.problem(record, format!("posting for no entry of a transaction {}", p.tx)),
        }
    }

    fn job(&mut self, status: &JobStatus) {
        self.report.jobs += 1;
        let job = status.job;
        let record = format!("job {job}");
        let escrow = self
            .balances
            .get(&(Account::Escrow(job), status.spec.budget.unit.clone()))
            .copied()
            .unwrap_or_default();
        match self.holds.get(&job) {
            Some((user, amount, unit)) => {
                if *user != status.spec.account
                    || *amount != status.spec.budget.amount
                    || *unit != status.spec.budget.unit
                {
                    let what = format!(
                        "held {amount} {unit} of user:{user}, its budget is {}",
                        status.spec.budget
                    );
                    self.problem(&record, what);
                }
            }
            None if !status.settled.is_empty() => {
                self.problem(&record, "segments settled with no budget held");
            }
            None => self.report.notes.push(format!(
                "{record}: no budget held (submission in progress or refused)"
            )),
        }
        let mut paid_total = Decimal::ZERO;
        let mut paid_of_job = self.paid.remove(&job).unwrap_or_default();
        for settled in &status.settled {
            match paid_of_job.remove(&settled.segment) {
                None => self.problem(
                    &record,
                    format!("segment {} settled but never paid", settled.segment),
                ),
                Some(paid) => {
                    paid_total += paid.amount;
                    if paid.provider != settled.provider {
                        self.problem(
                            &paid.record,
                            format!(
                                "paid {}, but the result of {} settled the segment",
                                paid.provider, settled.provider
                            ),
                        );
                    }
                    if paid.amount != settled.price.amount || paid.lot != settled.lot {
                        self.problem(&paid.record, "price or lot differ from the job's settled segment");
                    }
                }
            }
        }
        for (segment, paid) in paid_of_job {
            paid_total += paid.amount;
            if status.state.is_final() {
                self.problem(
                    &paid.record,
                    format!("payment for segment {segment}, which the ended job never settled (a cancelled or losing replica)"),
                );
            } else {
                self.report.notes.push(format!(
                    "{record}: segment {segment} is paid, the job record has not caught up yet"
                ));
            }
        }
        let refunded = self.refunds.remove(&job);
        if status.state.is_final() {
            if self.holds.contains_key(&job) && !refunded {
                self.problem(
                    &record,
                    format!("ended ({:?}) but its escrow was never refunded", status.state),
                );
            }
            if !escrow.is_zero() {
                self.problem(
                    &record,
                    format!("ended, yet its escrow holds {escrow} {}", status.spec.budget.unit),
                );
            }
        } else if let Some((_, held, _)) = self.holds.get(&job) {
            if refunded {
                self.problem(&record, "refunded while still running");
            } else if escrow != *held - paid_total {
                self.problem(
                    &record,
                    format!(
                        "escrow holds {escrow}, budget {held} less payments {paid_total} is {}",
                        *held - paid_total
                    ),
                );
            }
        }
        self.holds.remove(&job);
    }

    fn finish(mut self) -> Report {
        let leftovers: Vec<(String, String)> = self
            .unposted
            .drain()
            .map(|((tx, account), (_, _, record))| {
                (record, format!("entry for {account} in {tx} has no posting"))
            })
            .collect();
        for (record, what) in leftovers {
            self.problem(&record, what);
        }
        for (job, paid) in std::mem::take(&mut self.paid) {
            for (segment, paid) in paid {
                self.problem(
                    &paid.record,
                    format!("pays segment {segment} of job {job}, which has no job record"),
                );
            }
        }
        for (job, _) in std::mem::take(&mut self.holds) {
            self.problem(
                &format!("escrow:{job}"),
                "budget held for a job that has no record",
            );
        }
        let mut sums: BTreeMap<String, Decimal> = BTreeMap::new();
        for ((account, unit), balance) in &self.balances {
            *sums.entry(unit.clone()).or_default() += *balance;
            let posted = self
                .chain
                .get(&subjects::posting(account, unit))
                .copied()
                .unwrap_or_default();
            if posted != *balance {
                self.report.problems.push(Problem {
                    record: subjects::posting(account, unit),
                    what: format!("last posting says {posted}, the replay {balance}"),
                });
            }
            self.report
                .balances
                .entry(account.to_string())
                .or_default()
                .insert(unit.clone(), balance.to_string());
        }
        for (unit, sum) in sums {
            if !sum.is_zero() {
                self.report.problems.push(Problem {
                    record: format!("unit {unit}"),
                    what: format!("balances sum to {sum}, not zero"),
                });
            }
        }
        self.report
    }
}

/// Messages handed from the reader to the replay at a time.
const REPLAY_BATCH: usize = 1024;
/// Batches queued between the reader and the replay: bounds the memory a
/// replay slower than the reader can take.
const REPLAY_QUEUE: usize = 64;

impl Replay {
    /// One ledger stream message, as read.
    fn message(&mut self, seq: u64, subject: &str, payload: &[u8]) {
        let record = &Rec(subject, seq);
        if subject.starts_with("vmlot.ledger.tx.") {
            match serde_json::from_slice::<TxView>(payload) {
                Ok(tx) => self.transaction(record, subject, tx),
                Err(e) => self.problem(record, format!("undecodable transaction: {e}")),
            }
        } else if subject.starts_with("vmlot.ledger.post.") {
            match serde_json::from_slice::<Posting>(payload) {
                Ok(p) => self.posting(record, subject, p),
                Err(e) => self.problem(record, format!("undecodable posting: {e}")),
            }
        } else {
            self.problem(record, "a message outside the ledger's subjects");
        }
    }
}

/// Replays the whole ledger and the job records. The ledger's messages are
/// decoded and replayed on a thread of their own, in stream order, while
/// the next ones are read: decoding costs about as much as reading, and the
/// two then overlap.
pub async fn verify(js: &jetstream::Context) -> Result<Report, LedgerError> {
    type Batch = Vec<(u64, String, Vec<u8>)>;
    let (queue, batches) = std::sync::mpsc::sync_channel::<Batch>(REPLAY_QUEUE);
    let replayer = tokio::task::spawn_blocking(move || {
        let mut replay = Replay::default();
        for batch in batches {
            for (seq, subject, payload) in batch {
                replay.message(seq, &subject, &payload);
            }
        }
        replay
    });
    let mut batch: Batch = Vec::with_capacity(REPLAY_BATCH);
    let read = read_raw(
        js,
        subjects::LEDGER_STREAM,
        vec![],
        None,
        false,
        |seq, subject, payload| {
            batch.push((seq, subject.to_string(), payload.to_vec()));
            if batch.len() < REPLAY_BATCH {
                return true;
            }
            // Fails only if the replay thread is gone (it panicked); the
            // join below reports that.
            queue
                .send(std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH)))
                .is_ok()
        },
    )
    .await;
    if !batch.is_empty() {
        let _ = queue.send(batch);
    }
    drop(queue);
    read?;
    // The job records are read while the replay catches up.
    let mut jobs = Vec::new();
    let mut undecodable = Vec::new();
    let bucket_stream = format!("KV_{}", subjects::JOB_BUCKET);
    let bucket_subjects = format!("$KV.{}.>", subjects::JOB_BUCKET);
    let found = js.get_stream_no_info(&bucket_stream).await.is_ok();
    if found {
        read_raw(
            js,
            &bucket_stream,
            vec![bucket_subjects],
            None,
            true,
            |seq, subject, payload| {
                if payload.is_empty() {
                    return true; // a deleted record (a refused submission)
                }
                match serde_json::from_slice::<JobStatus>(payload) {
                    Ok(status) => jobs.push(status),
                    Err(e) => undecodable.push((
                        format!("{subject} (seq {seq})"),
                        format!("undecodable job record: {e}"),
                    )),
                }
                true
            },
        )
        .await?;
    }
    let mut replay = replayer
        .await
        .map_err(|e| LedgerError::nats("ledger replay", e))?;
    for (record, what) in undecodable {
        replay.problem(&record, what);
    }
    for status in &jobs {
        replay.job(status);
    }
    Ok(replay.finish())
}
