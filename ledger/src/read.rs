//! Reading the books: filtered queries, statements and balances. Each
//! query reads only the subjects that can hold what it asks for (one
//! account's postings, one job's transactions, one kind's), so the server
//! does the filtering, and a time range starts the read at its start.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Serialize, de::DeserializeOwned};
use vmlot_schemas::ledger::{Account, Posting, Settlement, Side, Transaction, TxKind};
use vmlot_schemas::{JobId, ProviderId, subjects};

use crate::direct::BooksApi;
use crate::error::LedgerError;

/// Slack between a record's own time and the stream's receive time, when
/// a read seeks by time.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::minutes(5);

/// A stored record and where it sits.
pub struct Stored<T> {
    pub seq: u64,
    pub subject: String,
    pub value: Result<T, String>,
}

/// Reads every message of `stream` on `filters` from `start` on (the
/// stream's time), in stream order, handing each to `each` (sequence,
/// subject, payload) until it returns false or the read reaches the end
/// of what matched when it began. With `last_per_subject`, only each
/// subject's last message. Reads with direct gets ([`BooksApi`]), the
/// one way in that cannot write.
pub async fn read_raw(
    api: &BooksApi,
    stream: &str,
    filters: Vec<String>,
    start: Option<DateTime<Utc>>,
    last_per_subject: bool,
    mut each: impl FnMut(u64, &str, &[u8]) -> bool,
) -> Result<u64, LedgerError> {
    let filters = if filters.is_empty() {
        vec![">".to_string()]
    } else {
        filters
    };
    if filters.len() == 1 && !last_per_subject {
        return api.read(stream, Some(&filters[0]), start, each).await;
    }
    // Several filters: each read on its own, merged in stream order.
    let mut merged: BTreeMap<u64, (String, Vec<u8>)> = BTreeMap::new();
    for filter in &filters {
        let mut keep = |seq: u64, subject: &str, payload: &[u8]| {
            merged.insert(seq, (subject.to_string(), payload.to_vec()));
            true
        };
        if last_per_subject {
            api.last_per_subject(stream, filter, &mut keep).await?;
        } else {
            api.read(stream, Some(filter), start, &mut keep).await?;
        }
    }
    let mut read = 0;
    for (seq, (subject, payload)) in merged {
        read += 1;
        if !each(seq, &subject, &payload) {
            break;
        }
    }
    Ok(read)
}

/// [`read_raw`] over the ledger stream, each message decoded.
pub async fn read_all<T: DeserializeOwned>(
    api: &BooksApi,
    filters: Vec<String>,
    start: Option<DateTime<Utc>>,
    mut each: impl FnMut(Stored<T>) -> bool,
) -> Result<u64, LedgerError> {
    read_raw(
        api,
        subjects::LEDGER_STREAM,
        filters,
        start,
        false,
        |seq, subject, payload| {
            each(Stored {
                seq,
                subject: subject.to_string(),
                value: serde_json::from_slice(payload).map_err(|e| e.to_string()),
            })
        },
    )
    .await
}

/// What `vmlot ledger` asks for. Every field narrows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub account: Option<Account>,
    pub job: Option<JobId>,
    pub provider: Option<ProviderId>,
    pub kind: Option<TxKind>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// One entry of one transaction: a line of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub at: DateTime<Utc>,
    pub tx: uuid::Uuid,
    pub kind: TxKind,
    pub account: Account,
    pub unit: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub debit: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub credit: Decimal,
    /// The account's balance after this entry (when read from its postings).
    #[serde(with = "rust_decimal::serde::str_option")]
    pub balance: Option<Decimal>,
    pub job: Option<JobId>,
    pub segment: Option<u32>,
}

impl Row {
    fn of_posting(p: Posting) -> Self {
        let (debit, credit) = if p.change.is_sign_negative() {
            (-p.change, Decimal::ZERO)
        } else {
            (Decimal::ZERO, p.change)
        };
        Row {
            at: p.at,
            tx: p.tx,
            kind: p.kind,
            account: p.account,
            unit: p.unit,
            debit,
            credit,
            balance: Some(p.balance),
            job: p.job,
            segment: p.segment,
        }
    }

    fn of_transaction(tx: &Transaction) -> impl Iterator<Item = Row> + '_ {
        tx.entries.iter().map(move |e| {
            let (debit, credit) = match e.side {
                Side::Debit => (e.amount, Decimal::ZERO),
                Side::Credit => (Decimal::ZERO, e.amount),
            };
            Row {
                at: tx.at,
                tx: tx.id,
                kind: tx.kind,
                account: e.account.clone(),
                unit: tx.unit.clone(),
                debit,
                credit,
                balance: None,
                job: tx.job,
                segment: tx.segment,
            }
        })
    }
}

impl Filter {
    fn keeps(&self, row: &Row) -> bool {
        self.account.as_ref().is_none_or(|a| *a == row.account)
            && self.job.is_none_or(|j| row.job == Some(j))
            && self.provider.is_none_or(|p| row.account == Account::Provider(p))
            && self.kind.is_none_or(|k| row.kind == k)
            && self.since.is_none_or(|t| row.at >= t)
            && self.until.is_none_or(|t| row.at < t)
    }

    /// The one account whose postings answer this filter, if there is one.
    fn account_to_read(&self) -> Option<Account> {
        self.account
            .clone()
            .or_else(|| self.provider.map(Account::Provider))
    }
}

/// Ledger lines matching `filter`, in the order they were written.
/// Records that cannot be decoded are an error naming them.
pub async fn query(api: &BooksApi, filter: &Filter) -> Result<Vec<Row>, LedgerError> {
    let start = filter.since.map(|t| t - CLOCK_SLACK);
    let until = filter.until.map(|t| t + CLOCK_SLACK);
    let mut rows = Vec::new();
    let mut bad = None;
    if let Some(account) = filter.account_to_read() {
        let filters = posting_subjects(api, &account).await?;
        if filters.is_empty() {
            return Ok(rows);
        }
        read_all::<Posting>(api, filters, start, |m| match m.value {
            Ok(p) => {
                let past = until.is_some_and(|u| p.at > u);
                let row = Row::of_posting(p);
                if filter.keeps(&row) {
                    rows.push(row);
                }
                !past
            }
            Err(e) => {
                bad = Some((m.subject, e));
                false
            }
        })
        .await?;
    } else {
        let filters = match (filter.job, filter.kind) {
            (Some(job), Some(TxKind::Forfeit)) => vec![subjects::forfeits_of_job(&job)],
            (Some(job), _) => {
                // A job's forfeits sit a token deeper than its other transactions.
                let mut of_job = subjects::ledger_tx_job(&job).to_vec();
                of_job.push(subjects::forfeits_of_job(&job));
                of_job
            }
            (None, Some(kind)) => vec![subjects::ledger_tx_kind(kind)],
            (None, None) => vec![subjects::LEDGER_TX_ALL.to_string()],
        };
        read_all::<Transaction>(api, filters, start, |m| match m.value {
            Ok(tx) => {
                let past = until.is_some_and(|u| tx.at > u);
                rows.extend(Row::of_transaction(&tx).filter(|r| filter.keeps(r)));
                !past
            }
            Err(e) => {
                bad = Some((m.subject, e));
                false
            }
        })
        .await?;
    }
    match bad {
        Some((subject, reason)) => Err(LedgerError::Corrupt { subject, reason }),
        None => Ok(rows),
    }
}

/// Debits and credits per (account, unit) over `rows`.
pub fn totals(rows: &[Row]) -> BTreeMap<(Account, String), (Decimal, Decimal)> {
    let mut out: BTreeMap<(Account, String), (Decimal, Decimal)> = BTreeMap::new();
    for r in rows {
        let t = out.entry((r.account.clone(), r.unit.clone())).or_default();
        t.0 += r.debit;
        t.1 += r.credit;
    }
    out
}

/// An account's statement for one period, per unit.
#[derive(Clone, Debug, Serialize)]
pub struct Statement {
    pub account: Account,
    pub unit: String,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    #[serde(with = "rust_decimal::serde::str")]
    pub opening: Decimal,
    pub entries: Vec<Row>,
    #[serde(with = "rust_decimal::serde::str")]
    pub debits: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub credits: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub closing: Decimal,
}

/// Statements of `account` for `[from, until)`, one per unit it holds.
/// An entry belongs to the period its own time falls in. Each posting
/// carries the balance it leaves, so only the period (and a few minutes'
/// slack either side, for postings written a little after their time) is
/// read: the opening balance is the balance before the first posting
/// read, plus every change read that is dated before the period.
pub async fn statement(
    api: &BooksApi,
    account: &Account,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Statement>, LedgerError> {
    // Units whose last posting is older than the read's start: unchanged
    // through the period. The others must each be met in the read.
    let mut unmet: BTreeMap<String, Posting> = last_postings(api, &subjects::postings_of(account))
        .await?
        .into_iter()
        .map(|p| (p.unit.clone(), p))
        .collect();
    let start = from - CLOCK_SLACK;
    let mut by_unit: BTreeMap<String, Statement> = BTreeMap::new();
    for (unit, last) in &unmet {
        if last.at < start {
            by_unit.insert(
                unit.clone(),
                new_statement(account, unit, from, until, last.balance),
            );
        }
    }
    unmet.retain(|_, last| last.at >= start);
    let mut bad = None;
    if !unmet.is_empty() {
        let filters = unmet
            .keys()
            .map(|unit| subjects::posting(account, unit))
            .collect();
        read_all::<Posting>(api, filters, Some(start), |m| match m.value {
            Ok(p) => {
                unmet.remove(&p.unit);
                let s = by_unit
                    .entry(p.unit.clone())
                    .or_insert_with(|| new_statement(account, &p.unit, from, until, p.balance - p.change));
                if p.at < from {
                    s.opening += p.change;
                    s.closing += p.change;
                } else if p.at < until {
                    let row = Row::of_posting(p);
                    s.debits += row.debit;
                    s.credits += row.credit;
                    s.closing += row.credit - row.debit;
                    s.entries.push(row);
                } else if p.at > until + CLOCK_SLACK && unmet.is_empty() {
                    return false;
                }
                true
            }
            Err(e) => {
                bad = Some((m.subject, e));
                false
            }
        })
        .await?;
    }
    if let Some((subject, reason)) = bad {
        return Err(LedgerError::Corrupt { subject, reason });
    }
    for s in by_unit.values_mut() {
        s.entries.sort_by_key(|r| r.at);
    }
    Ok(by_unit.into_values().collect())
}

fn new_statement(
    account: &Account,
    unit: &str,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    opening: Decimal,
) -> Statement {
    Statement {
        account: account.clone(),
        unit: unit.to_string(),
        from,
        until,
        opening,
        entries: Vec::new(),
        debits: Decimal::ZERO,
        credits: Decimal::ZERO,
        closing: opening,
    }
}

/// The posting subjects of one account, one per unit it has held. Reads
/// filter on these literal subjects, not on the account's wildcard: the
/// server finds a literal subject's messages from its index instead of
/// scanning every block of the stream.
async fn posting_subjects(api: &BooksApi, account: &Account) -> Result<Vec<String>, LedgerError> {
    Ok(last_postings(api, &subjects::postings_of(account))
        .await?
        .into_iter()
        .map(|p| subjects::posting(account, &p.unit))
        .collect())
}

/// Balances of one account, per unit it has ever held.
pub async fn balances(api: &BooksApi, account: &Account) -> Result<BTreeMap<String, Decimal>, LedgerError> {
    let last = last_postings(api, &subjects::postings_of(account)).await?;
    Ok(last.into_iter().map(|p| (p.unit, p.balance)).collect())
}

/// The last posting of every account and unit under `filter`.
pub async fn last_postings(api: &BooksApi, filter: &str) -> Result<Vec<Posting>, LedgerError> {
    let mut out = Vec::new();
    let mut bad = None;
    read_raw(
        api,
        subjects::LEDGER_STREAM,
        vec![filter.to_string()],
        None,
        true,
        |_, subject, payload| {
            match serde_json::from_slice::<Posting>(payload) {
                Ok(p) => out.push(p),
                Err(e) => bad = Some((subject.to_string(), e.to_string())),
            }
            bad.is_none()
        },
    )
    .await?;
    match bad {
        Some((subject, reason)) => Err(LedgerError::Corrupt { subject, reason }),
        None => Ok(out),
    }
}

/// Every settlement's details, in the order they were written.
pub async fn settlements(api: &BooksApi) -> Result<Vec<Settlement>, LedgerError> {
    let mut out = Vec::new();
    let mut bad = None;
    read_all::<Transaction>(
        api,
        vec![subjects::ledger_tx_kind(TxKind::Settlement)],
        None,
        |m| {
            match m.value {
                Ok(tx) => out.extend(tx.settlement.map(|s| *s)),
                Err(e) => bad = Some((m.subject, e)),
            }
            bad.is_none()
        },
    )
    .await?;
    match bad {
        Some((subject, reason)) => Err(LedgerError::Corrupt { subject, reason }),
        None => Ok(out),
    }
}
