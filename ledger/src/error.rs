//! The one error of the books' operations: what a write refused, what a
//! read could not decode, what NATS failed. Every module of the crate
//! returns it, so it sits below them all.

use rust_decimal::Decimal;
use vmlot_schemas::ledger::Account;

/// Why the books refused or failed a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("malformed transaction: {0}")]
    Malformed(String),
    /// The write would take `account` below zero: a user short of a
    /// budget, a provider depositing more than it has earned, a release
    /// or forfeit of more than the deposit holds (`account` says which).
    #[error("insufficient funds: {account} holds {balance} {unit}, {needed} {unit} needed")]
    InsufficientFunds {
        account: Account,
        unit: String,
        balance: Decimal,
        needed: Decimal,
    },
    /// A request id used before for another request: the transaction
    /// already on its subject stands, and differs from this one.
    #[error("{subject} already holds a different transaction: {found}")]
    Conflict { subject: String, found: String },
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
