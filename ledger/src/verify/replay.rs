//! The replay of the ledger stream, message by message in stream order:
//! each transaction well-formed, on its own subject, once; each entry with
//! its posting and each posting with its entry, carrying the balance the
//! replay gives; no account but the operator's below zero, and every
//! unit's balances summing to zero.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, Posting, Transaction, TxKind};
use vmlot_schemas::market::JobStatus;
use vmlot_schemas::subjects;

use super::jobs::JobBooks;
use super::report::{Rec, Report};
use super::shape;
use crate::build::tx_id;

/// The subject `subject` would be for a transaction written under a
/// caller's request id (its last token), by `of_request`.
fn by_request(subject: &str, of_request: fn(&uuid::Uuid) -> String) -> Option<String> {
    let (_, request) = subject.rsplit_once('.')?;
    request.parse().ok().map(|request| of_request(&request))
}

/// An entry waiting for its posting. The unit and the transaction's
/// subject are shared by its entries, and the record is named only if
/// the posting never comes: no string is formatted per entry.
struct Unposted {
    change: Decimal,
    unit: Arc<str>,
    subject: Arc<str>,
    seq: u64,
}

#[derive(Default)]
pub(super) struct Replay {
    pub report: Report,
    books: JobBooks,
    /// Last balance per posting subject.
    chain: HashMap<String, Decimal>,
    /// Entries still waiting for their posting, by (tx, account).
    unposted: HashMap<(uuid::Uuid, Account), Unposted>,
    seen: HashSet<uuid::Uuid>,
}

impl Replay {
    /// One ledger stream message, as read.
    pub fn message(&mut self, seq: u64, subject: &str, payload: &[u8]) {
        let record = &Rec(subject, seq);
        if subjects::is_ledger_tx(subject) {
            match serde_json::from_slice::<Transaction>(payload) {
                Ok(tx) => self.transaction(record, subject, tx),
                Err(e) => self
                    .report
                    .problem(record, format!("undecodable transaction: {e}")),
            }
        } else if subjects::is_ledger_posting(subject) {
            match serde_json::from_slice::<Posting>(payload) {
                Ok(p) => self.posting(record, subject, p),
                Err(e) => self.report.problem(record, format!("undecodable posting: {e}")),
            }
        } else {
            self.report
                .problem(record, "a message outside the ledger's subjects");
        }
    }

    fn transaction(&mut self, record: &Rec, subject: &str, tx: Transaction) {
        self.report.transactions += 1;
        if let Some(why) = tx.malformed() {
            self.report.problem(record, why);
            return;
        }
        if tx.id != tx_id(subject) {
            self.report
                .problem(record, format!("id {} is not the id of its subject", tx.id));
        }
        if !self.seen.insert(tx.id) {
            self.report
                .problem(record, format!("transaction {} written twice", tx.id));
            return;
        }
        let expected_subject = match (tx.kind, tx.job, tx.segment) {
            (TxKind::Credit, _, _) => by_request(subject, subjects::credit_tx),
            (TxKind::Deposit, _, _) => by_request(subject, subjects::deposit_tx),
            (TxKind::Release, _, _) => by_request(subject, subjects::release_tx),
            (TxKind::Forfeit, _, _) => tx
                .forfeit
                .as_ref()
                .map(|f| subjects::forfeit_tx(&f.job, f.segment, f.attempt, &f.provider)),
            (TxKind::Hold, Some(job), _) => Some(subjects::hold_tx(&job)),
            (TxKind::Refund, Some(job), _) => Some(subjects::refund_tx(&job)),
            (TxKind::Settlement, Some(job), Some(segment)) => tx
                .settlement
                .as_ref()
                .map(|s| subjects::settlement_tx(&job, segment, s.attempt)),
            (TxKind::Post | TxKind::Void, Some(_), Some(_)) => tx
                .resolves
                .and_then(|settled| self.books.resolution_subject(&settled)),
            _ => None,
        };
        if expected_subject.as_deref() != Some(subject) {
            self.report.problem(
                record,
                format!("a {:?} transaction does not belong on this subject", tx.kind),
            );
        }
        let (problems, effect) = shape::check(record, &tx);
        for what in problems {
            self.report.problem(record, what);
        }
        self.books.apply(&mut self.report, record, effect);
        let (unit, on): (Arc<str>, Arc<str>) = (tx.unit.as_str().into(), subject.into());
        for e in &tx.entries {
            let balance = self
                .books
                .balances
                .entry((e.account.clone(), tx.unit.clone()))
                .or_default();
            *balance += e.signed();
            let after = *balance;
            if after.is_sign_negative() && !after.is_zero() && !e.account.may_go_negative() {
                self.report.problem(
                    record,
                    format!("takes {} below zero ({after} {})", e.account, tx.unit),
                );
            }
            let unposted = Unposted {
                change: e.signed(),
                unit: unit.clone(),
                subject: on.clone(),
                seq: record.1,
            };
            self.unposted.insert((tx.id, e.account.clone()), unposted);
        }
    }

    fn posting(&mut self, record: &Rec, subject: &str, p: Posting) {
        self.report.postings += 1;
        if subjects::posting(&p.account, &p.unit) != subject {
            self.report.problem(
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
            self.report.problem(
                record,
                format!("balance {} does not follow {before} {:+}", p.balance, p.change),
            );
        }
        match self.unposted.remove(&(p.tx, p.account)) {
            Some(entry) if entry.change == p.change && *entry.unit == *p.unit => {}
            Some(_) => self.report.problem(
                record,
                format!("posting differs from its entry in transaction {}", p.tx),
            ),
            None => self
                .report
                .problem(record, format!("posting for no entry of a transaction {}", p.tx)),
        }
    }

    /// Checks one job record against the replayed books.
    pub fn job(&mut self, status: &JobStatus) {
        self.books.check(&mut self.report, status);
    }

    /// What is left once every message and job record is seen: entries
    /// without postings, payments and holds without jobs, and the balances.
    pub fn finish(mut self) -> Report {
        let leftovers: Vec<(String, String)> = self
            .unposted
            .drain()
            .map(|((tx, account), entry)| {
                (
                    Rec(&entry.subject, entry.seq).to_string(),
                    format!("entry for {account} in {tx} has no posting"),
                )
            })
            .collect();
        for (record, what) in leftovers {
            self.report.problem(&record, what);
        }
        self.books.leftovers(&mut self.report);
        let mut sums: BTreeMap<String, Decimal> = BTreeMap::new();
        for ((account, unit), balance) in &self.books.balances {
            *sums.entry(unit.clone()).or_default() += *balance;
            let posted = self
                .chain
                .get(&subjects::posting(account, unit))
                .copied()
                .unwrap_or_default();
            if posted != *balance {
                self.report.problem(
                    &subjects::posting(account, unit),
                    format!("last posting says {posted}, the replay {balance}"),
                );
            }
            self.report
                .balances
                .entry(account.to_string())
                .or_default()
                .insert(unit.clone(), balance.to_string());
        }
        for (unit, sum) in sums {
            if !sum.is_zero() {
                self.report.problem(
                    &format!("unit {unit}"),
                    format!("balances sum to {sum}, not zero"),
                );
            }
        }
        self.report
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use vmlot_schemas::ledger::{Forfeit, ForfeitCause};
    use vmlot_schemas::{JobId, Money, ProviderId};

    use super::*;

    /// The problems replaying `tx` on `subject` (after `before`) names
    /// about where it sits.
    fn placed(before: &[(String, Transaction)], subject: &str, tx: &Transaction) -> Vec<String> {
        let mut replay = Replay::default();
        for (seq, (subject, tx)) in before
            .iter()
            .chain([&(subject.to_string(), tx.clone())])
            .enumerate()
        {
            replay.message(seq as u64 + 1, subject, &serde_json::to_vec(tx).unwrap());
        }
        replay
            .report
            .problems
            .into_iter()
            .filter(|p| p.what.contains("subject") || p.what.contains("twice"))
            .map(|p| p.what)
            .collect()
    }

    #[test]
    fn deposits_releases_and_forfeits_sit_on_their_own_subjects() {
        let (provider, request) = (ProviderId::new(), uuid::Uuid::new_v4());
        let crd = Money::new(Decimal::ONE, "CRD");
        let (deposited_on, deposit) = crate::build::deposit(&request, provider, &crd);
        let (released_on, release) = crate::build::release(&request, provider, &crd);
        let forfeit = Forfeit {
            job: JobId::new(),
            segment: 2,
            attempt: 1,
            provider,
            payer: "alice".into(),
            amount: crd.clone(),
            cause: ForfeitCause::Minority,
        };
        let (forfeited_on, forfeited) = crate::build::forfeit(&forfeit);
        let none: Vec<String> = vec![];
        assert_eq!(placed(&[], &deposited_on, &deposit), none);
        assert_eq!(placed(&[], &released_on, &release), none);
        assert_eq!(placed(&[], &forfeited_on, &forfeited), none);

        // A deposit where its release belongs, or under no request id.
        let problems = placed(&[], &released_on, &deposit);
        assert!(
            problems.contains(&"a Deposit transaction does not belong on this subject".to_string()),
            "{problems:?}"
        );
        let problems = placed(&[], &format!("{deposited_on}.x"), &deposit);
        assert!(
            problems.iter().any(|p| p.contains("does not belong")),
            "{problems:?}"
        );
        let mut forged = deposit.clone();
        let elsewhere = format!("vmlot.ledger.tx.deposit.{}", request.simple());
        forged.id = tx_id(&elsewhere);
        assert_eq!(
            placed(&[], &elsewhere, &forged),
            ["a Deposit transaction does not belong on this subject"]
        );

        // A forfeit on another attempt's subject, or another provider's.
        for elsewhere in [
            subjects::forfeit_tx(&forfeit.job, 2, 2, &provider),
            subjects::forfeit_tx(&forfeit.job, 2, 1, &ProviderId::new()),
        ] {
            let mut forged = forfeited.clone();
            forged.id = tx_id(&elsewhere);
            assert_eq!(
                placed(&[], &elsewhere, &forged),
                ["a Forfeit transaction does not belong on this subject"]
            );
        }
        // The same forfeit twice.
        let first = [(forfeited_on.clone(), forfeited.clone())];
        let problems = placed(&first, &forfeited_on, &forfeited);
        assert!(
            problems.iter().any(|p| p.contains("written twice")),
            "{problems:?}"
        );
    }
}
