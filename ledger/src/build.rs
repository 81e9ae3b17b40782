//! The transactions of each kind, and the postings of a transaction,
//! built without I/O: [`crate::Books`] writes them, and the ledger
//! benchmark generates a book of exactly these records.

use chrono::Utc;
use rust_decimal::Decimal;
use vmlot_schemas::ledger::{
    Account, Entry, Forfeit, ForfeitCause, Posting, Settlement, Transaction, TxKind,
};
use vmlot_schemas::{JobId, Money, ProviderId, WIRE_VERSION, subjects};

use crate::amount::split_fee;

/// Namespace of transaction ids (UUID v5 over the transaction's subject).
const TX_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d1f_5a4e_9b2c_4c1d_8e7f_a0b1_c2d3_e4f5);

/// The id of the transaction written on `subject`: the same on every retry.
pub fn tx_id(subject: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&TX_NAMESPACE, subject.as_bytes())
}

/// A transaction of `kind` on `subject`, dated now; the rest left empty.
fn on(subject: &str, kind: TxKind, unit: &str, entries: Vec<Entry>, memo: String) -> Transaction {
    Transaction {
        version: WIRE_VERSION,
        id: tx_id(subject),
        kind,
        at: Utc::now(),
        unit: unit.to_string(),
        entries,
        job: None,
        segment: None,
        provider: None,
        memo,
        settlement: None,
        resolves: None,
        forfeit: None,
    }
}

/// The operator funds `account` (credit request `request`).
pub fn credit(request: &uuid::Uuid, account: &Account, amount: &Money, memo: &str) -> (String, Transaction) {
    let subject = subjects::credit_tx(request);
    let entries = vec![
        Entry::debit(Account::Operator, amount.amount),
        Entry::credit(account.clone(), amount.amount),
    ];
    let tx = on(&subject, TxKind::Credit, &amount.unit, entries, memo.to_string());
    (subject, tx)
}

/// A job's budget from its submitter into its escrow.
pub fn hold(job: JobId, user: &str, budget: &Money) -> (String, Transaction) {
    let subject = subjects::hold_tx(&job);
    let entries = vec![
        Entry::debit(Account::User(user.to_string()), budget.amount),
        Entry::credit(Account::Escrow(job), budget.amount),
    ];
    let mut tx = on(
        &subject,
        TxKind::Hold,
        &budget.unit,
        entries,
        format!("budget of job {job}"),
    );
    tx.job = Some(job);
    (subject, tx)
}

/// A settled segment paid from the job's escrow into its provider's
/// pending account, where it waits for the checkpoint to be restored. The
/// transaction carries `settlement`, the books' own record of what was
/// settled.
pub fn settlement(settlement: Settlement) -> (String, Transaction) {
    let subject = subjects::settlement_tx(&settlement.job, settlement.segment, settlement.attempt);
    let entries = vec![
        Entry::debit(Account::Escrow(settlement.job), settlement.amount.amount),
        Entry::credit(Account::Pending(settlement.provider), settlement.amount.amount),
    ];
    let memo = format!(
        "segment {} of job {} (attempt {}), pending",
        settlement.segment, settlement.job, settlement.attempt
    );
    let mut tx = on(
        &subject,
        TxKind::Settlement,
        &settlement.amount.unit,
        entries,
        memo,
    );
    tx.at = settlement.at;
    tx.job = Some(settlement.job);
    tx.segment = Some(settlement.segment);
    tx.provider = Some(settlement.provider);
    tx.settlement = Some(Box::new(settlement));
    (subject, tx)
}

/// The settlement's checkpoint was restored: its price from the provider's
/// pending account to the provider, the fee (if any) to the operator.
pub fn post(settlement: &Settlement, fee_rate: Decimal) -> (String, Transaction) {
    let (share, fee) = split_fee(settlement.amount.amount, fee_rate);
    let mut entries = vec![
        Entry::debit(Account::Pending(settlement.provider), settlement.amount.amount),
        Entry::credit(Account::Provider(settlement.provider), share),
    ];
    if !fee.is_zero() {
        entries.push(Entry::credit(Account::Operator, fee));
    }
    resolution(settlement, TxKind::Post, entries, "posted")
}

/// The settlement's checkpoint did not restore: its price back from the
/// provider's pending account to the job's escrow.
pub fn void(settlement: &Settlement, why: &str) -> (String, Transaction) {
    let entries = vec![
        Entry::debit(Account::Pending(settlement.provider), settlement.amount.amount),
        Entry::credit(Account::Escrow(settlement.job), settlement.amount.amount),
    ];
    resolution(settlement, TxKind::Void, entries, &format!("void: {why}"))
}

fn resolution(
    settlement: &Settlement,
    kind: TxKind,
    entries: Vec<Entry>,
    what: &str,
) -> (String, Transaction) {
    let subject = subjects::resolve_tx(&settlement.job, settlement.segment, settlement.attempt);
    let memo = format!(
        "segment {} of job {} (attempt {}) {what}",
        settlement.segment, settlement.job, settlement.attempt
    );
    let mut tx = on(&subject, kind, &settlement.amount.unit, entries, memo);
    tx.job = Some(settlement.job);
    tx.segment = Some(settlement.segment);
    tx.provider = Some(settlement.provider);
    let settled_on = subjects::settlement_tx(&settlement.job, settlement.segment, settlement.attempt);
    tx.resolves = Some(tx_id(&settled_on));
    (subject, tx)
}

/// The job ended: `left`, what its escrow holds, back to `user`.
pub fn refund(job: JobId, user: &str, unit: &str, left: Decimal) -> (String, Transaction) {
    let subject = subjects::refund_tx(&job);
    let entries = vec![
        Entry::debit(Account::Escrow(job), left),
        Entry::credit(Account::User(user.to_string()), left),
    ];
    let mut tx = on(
        &subject,
        TxKind::Refund,
        unit,
        entries,
        format!("job {job} ended"),
    );
    tx.job = Some(job);
    (subject, tx)
}

/// A provider puts `amount` of its earnings into its deposit (its request
/// `request`: the same request deposits once).
pub fn deposit(request: &uuid::Uuid, provider: ProviderId, amount: &Money) -> (String, Transaction) {
    let subject = subjects::deposit_tx(request);
    let entries = vec![
        Entry::debit(Account::Provider(provider), amount.amount),
        Entry::credit(Account::Deposit(provider), amount.amount),
    ];
    let memo = format!("provider {provider} deposits");
    let mut tx = on(&subject, TxKind::Deposit, &amount.unit, entries, memo);
    tx.provider = Some(provider);
    (subject, tx)
}

/// A provider takes `amount` of its deposit back into its earnings (its
/// request `request`: the same request releases once).
pub fn release(request: &uuid::Uuid, provider: ProviderId, amount: &Money) -> (String, Transaction) {
    let subject = subjects::release_tx(request);
    let entries = vec![
        Entry::debit(Account::Deposit(provider), amount.amount),
        Entry::credit(Account::Provider(provider), amount.amount),
    ];
    let memo = format!("provider {provider} takes back part of its deposit");
    let mut tx = on(&subject, TxKind::Release, &amount.unit, entries, memo);
    tx.provider = Some(provider);
    (subject, tx)
}

/// A provider proven to have cheated on an attempt at a segment loses
/// part of its deposit to the job's submitter. The transaction carries
/// `forfeit`, the books' own record of who lost what to whom and why.
pub fn forfeit(forfeit: &Forfeit) -> (String, Transaction) {
    let subject = subjects::forfeit_tx(&forfeit.job, forfeit.segment, forfeit.attempt, &forfeit.provider);
    let entries = vec![
        Entry::debit(Account::Deposit(forfeit.provider), forfeit.amount.amount),
        Entry::credit(Account::User(forfeit.payer.clone()), forfeit.amount.amount),
    ];
    let why = match forfeit.cause {
        ForfeitCause::Unrestorable => "its checkpoint did not restore",
        ForfeitCause::Minority => "its result was in the minority of a quorum",
    };
    let memo = format!(
        "forfeit ({}): provider {} on segment {} of job {} (attempt {}): {why}",
        forfeit.cause, forfeit.provider, forfeit.segment, forfeit.job, forfeit.attempt
    );
    let mut tx = on(&subject, TxKind::Forfeit, &forfeit.amount.unit, entries, memo);
    tx.job = Some(forfeit.job);
    tx.segment = Some(forfeit.segment);
    tx.provider = Some(forfeit.provider);
    tx.forfeit = Some(Box::new(forfeit.clone()));
    (subject, tx)
}

/// `entry` of `tx` seen from its account, leaving `balance`.
pub fn posting(tx: &Transaction, entry: &Entry, balance: Decimal) -> Posting {
    Posting {
        version: WIRE_VERSION,
        tx: tx.id,
        kind: tx.kind,
        at: tx.at,
        account: entry.account.clone(),
        unit: tx.unit.clone(),
        change: entry.signed(),
        balance,
        job: tx.job,
        segment: tx.segment,
    }
}
