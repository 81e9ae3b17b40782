//! Group commit: writes that wait for the books go out together. nats-server
//! commits a single-replica file stream's atomic batches one after another,
//! each through a temporary store it makes, fsyncs and removes (~300–400 a
//! second on this project's machine, however many are in flight), so the
//! books' throughput is batches a second times transactions a batch. Every
//! write through a [`crate::Books`] handle joins its [`Queue`]; one writer at
//! a time takes what waits and writes it as one atomic batch, planned here
//! by [`plan`] (pure: no I/O).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_nats::HeaderMap;
use async_nats::jetstream::message::OutboundMessage;
use rust_decimal::Decimal;
use tokio::sync::oneshot;
use vmlot_schemas::ledger::Transaction;
use vmlot_schemas::subjects;

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

/// Most messages one group's batch holds: the server takes at most 1 000
/// in an atomic batch, and a smaller batch keeps a refused one cheap to
/// write again.
pub const MAX_GROUP_MESSAGES: usize = 500;

/// The answer to one unit: each transaction's, in the unit's order, or
/// the first refusal among them.
pub type Answer = Result<Vec<Recorded>, LedgerError>;

/// Transactions a caller wants written, each with its subject, and where
/// their answer goes. A unit's transactions go into the same batch when
/// they can: none of them refused, none on the books already.
pub struct Unit {
    pub txs: Vec<(String, Transaction)>,
    pub answer: oneshot::Sender<Answer>,
}

impl Unit {
    /// Messages its transactions take in a batch: each, and its postings.
    fn messages(&self) -> usize {
        self.txs.iter().map(|(_, tx)| 1 + tx.entries.len()).sum()
    }
}

/// The writes waiting for a handle's writer, oldest first.
#[derive(Default)]
pub struct Queue {
    units: Mutex<VecDeque<Unit>>,
}

impl Queue {
    /// Puts `txs` in line; the answer comes on the receiver. A receiver
    /// whose sender is dropped unanswered means the writer that took the
    /// unit stopped: writing it again is safe, since a transaction's
    /// subject takes one transaction and a second try finds the first.
    pub fn push(&self, txs: Vec<(String, Transaction)>) -> oneshot::Receiver<Answer> {
        let (answer, receiver) = oneshot::channel();
        self.units
            .lock()
            .expect("ledger queue")
            .push_back(Unit { txs, answer });
        receiver
    }

    /// The oldest units whose messages fit in `max_messages`, and always
    /// the first, whatever its size.
    pub fn take(&self, max_messages: usize) -> Vec<Unit> {
        let mut units = self.units.lock().expect("ledger queue");
        let mut taken: Vec<Unit> = Vec::new();
        let mut messages = 0;
        while let Some(next) = units.front() {
            let size = next.messages();
            if !taken.is_empty() && messages + size > max_messages {
                break;
            }
            messages += size;
            taken.extend(units.pop_front());
        }
        taken
    }
}

/// One group's atomic batch, and what became of each transaction offered
/// (by its index in the offer).
#[derive(Default)]
pub struct Plan {
    pub batch: Vec<OutboundMessage>,
    /// In the batch.
    pub placed: Vec<usize>,
    /// Would take an account below zero after what is placed before it:
    /// left out, with the refusal.
    pub short: Vec<(usize, LedgerError)>,
    /// On a subject an earlier transaction of the offer takes: left out
    /// (the batch would be refused whole); it finds that one once written.
    pub repeated: Vec<usize>,
}

/// Plans the atomic batch for `txs` (each with its subject), given each
/// account's last posting (`lasts`, by posting subject: the balance and
/// the sequence read). Each transaction expects its subject empty and is
/// followed by its postings; an account's first posting expects the
/// sequence read, and a later one follows it inside the batch, which the
/// server applies whole and in order. A transaction that would take an
/// account below zero (balances as the ones placed before it leave them)
/// is left out and named; so is a second one on the same subject.
pub fn plan(txs: &[(&str, &Transaction)], lasts: HashMap<String, (Decimal, u64)>) -> Plan {
    let mut accounts: HashMap<String, (Decimal, Option<u64>)> = lasts
        .into_iter()
        .map(|(subject, (balance, seq))| (subject, (balance, Some(seq))))
        .collect();
    let mut subjects_taken = HashSet::new();
    let mut plan = Plan::default();
    for (index, (subject, tx)) in txs.iter().enumerate() {
        if !subjects_taken.insert(*subject) {
            plan.repeated.push(index);
            continue;
        }
        match postings(tx, &accounts) {
            Err(short) => {
                subjects_taken.remove(subject);
                plan.short.push((index, short));
            }
            Ok(after) => {
                plan.batch.push(OutboundMessage {
                    subject: subject.to_string().into(),
                    payload: serde_json::to_vec(tx).expect("transaction serializes").into(),
                    headers: Some(expect_last_subject_seq(0)),
                });
                for (entry, (posting_subject, balance)) in tx.entries.iter().zip(after) {
                    let (held, seq) = accounts
                        .get_mut(&posting_subject)
                        .expect("every account's last posting was read");
                    *held = balance;
                    plan.batch.push(OutboundMessage {
                        subject: posting_subject.into(),
                        payload: serde_json::to_vec(&build::posting(tx, entry, balance))
                            .expect("posting serializes")
                            .into(),
                        headers: seq.take().map(expect_last_subject_seq),
                    });
                }
                plan.placed.push(index);
            }
        }
    }
    plan
}

/// Each entry's posting subject and the balance it leaves, or the first
/// entry that would take its account below zero.
fn postings(
    tx: &Transaction,
    accounts: &HashMap<String, (Decimal, Option<u64>)>,
) -> Result<Vec<(String, Decimal)>, LedgerError> {
    tx.entries
        .iter()
        .map(|entry| {
            let posting_subject = subjects::posting(&entry.account, &tx.unit);
            let (balance, _) = accounts
                .get(&posting_subject)
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
            Ok((posting_subject, after))
        })
        .collect()
}

fn expect_last_subject_seq(seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::JobId;
    use vmlot_schemas::ledger::Account;

    fn d(n: i64) -> Decimal {
        Decimal::from(n)
    }

    fn header(msg: &OutboundMessage) -> Option<String> {
        msg.headers.as_ref().map(|h| {
            h.get("Nats-Expected-Last-Subject-Sequence")
                .expect("the header")
                .to_string()
        })
    }

    fn hold(budget: Decimal) -> (String, Transaction) {
        let money = vmlot_schemas::Money {
            amount: budget,
            unit: "CREDIT".into(),
        };
        build::hold(JobId::new(), "alice", &money)
    }

    fn lasts(txs: &[(String, Transaction)], user: (Decimal, u64)) -> HashMap<String, (Decimal, u64)> {
        txs.iter()
            .flat_map(|(_, tx)| tx.entries.iter().map(|e| (e.account.clone(), tx.unit.clone())))
            .map(|(account, unit)| {
                let last = if account == Account::User("alice".into()) {
                    user
                } else {
                    (Decimal::ZERO, 0)
                };
                (subjects::posting(&account, &unit), last)
            })
            .collect()
    }

    fn offer(txs: &[(String, Transaction)]) -> Vec<(&str, &Transaction)> {
        txs.iter().map(|(s, t)| (s.as_str(), t)).collect()
    }

    #[test]
    fn one_accounts_transactions_chain_inside_the_batch() {
        let txs = vec![hold(d(3)), hold(d(4))];
        let plan = plan(&offer(&txs), lasts(&txs, (d(10), 41)));
        assert_eq!(plan.placed, vec![0, 1]);
        assert!(plan.short.is_empty() && plan.repeated.is_empty());
        let user = subjects::posting(&Account::User("alice".into()), "CREDIT");
        let user_postings: Vec<_> = plan.batch.iter().filter(|m| m.subject.as_str() == user).collect();
        assert_eq!(user_postings.len(), 2);
        // The first expects the sequence read; the second follows it.
        assert_eq!(header(user_postings[0]).as_deref(), Some("41"));
        assert_eq!(header(user_postings[1]), None);
        let second: vmlot_schemas::ledger::Posting =
            serde_json::from_slice(&user_postings[1].payload).unwrap();
        assert_eq!(second.balance, d(3));
        // Every transaction expects its subject empty.
        for (subject, _) in &txs {
            let msg = plan.batch.iter().find(|m| m.subject.as_str() == subject).unwrap();
            assert_eq!(header(msg).as_deref(), Some("0"));
        }
    }

    #[test]
    fn a_transaction_that_would_overdraw_is_left_out_and_the_rest_go() {
        let txs = vec![hold(d(6)), hold(d(6)), hold(d(4))];
        let plan = plan(&offer(&txs), lasts(&txs, (d(10), 7)));
        assert_eq!(plan.placed, vec![0, 2]);
        assert_eq!(plan.short.len(), 1);
        let (index, refusal) = &plan.short[0];
        assert_eq!(*index, 1);
        assert!(
            matches!(refusal, LedgerError::InsufficientFunds { balance, needed, .. } if *balance == d(4) && *needed == d(6)),
            "{refusal:?}"
        );
        // Two transactions and their two postings each.
        assert_eq!(plan.batch.len(), 6);
    }

    #[test]
    fn a_second_transaction_on_one_subject_waits_for_the_first() {
        let first = hold(d(1));
        let mut second = hold(d(2));
        second.0 = first.0.clone();
        let txs = vec![first, second];
        let plan = plan(&offer(&txs), lasts(&txs, (d(10), 1)));
        assert_eq!(plan.placed, vec![0]);
        assert_eq!(plan.repeated, vec![1]);
        assert_eq!(plan.batch.len(), 3);
    }

    #[test]
    fn the_queue_hands_out_what_fits_and_always_the_first() {
        let queue = Queue::default();
        let _a = queue.push(vec![hold(d(1)), hold(d(1))]);
        let _b = queue.push(vec![hold(d(1))]);
        let _c = queue.push(vec![hold(d(1))]);
        // A hold is three messages: the first unit (6) fits alone in 4.
        assert_eq!(queue.take(4).len(), 1);
        assert_eq!(queue.take(6).len(), 2);
        assert!(queue.take(6).is_empty());
    }
}
