//! The vmlot books, kept in the `VMLOT_LEDGER` stream.
//!
//! A transaction is written together with one posting per entry, in one
//! atomic batch:
//! - the transaction on its own subject, derived from what it is for
//!   (`vmlot.ledger.tx.settlement.<job>.<segment>.<attempt>`, its post or
//!   void on `vmlot.ledger.tx.resolve.<job>.<segment>.<attempt>`, ...), only
//!   if that subject is empty: a retry is recognised, a second payment (or
//!   a second resolution) refused;
//! - each posting on its account's subject (`vmlot.ledger.post.<account>.<unit>`),
//!   only if the last posting there is the one the balance was read from:
//!   two writers racing for one account cannot both spend its balance.
//!
//! The stream denies deletes and purges: records are immutable. Readers
//! ([`read`]) answer queries and statements from subject filters, and
//! [`verify`] replays everything.
//!
//! Modules, each using only those listed before it: [`error`], [`amount`]
//! (fees, typed amounts), [`build`] (each kind of transaction, no I/O),
//! [`group`] (group commit: the queue of waiting writes and the plan of
//! their one batch, no I/O), [`books`] (writes), [`direct`] (the read-only way in: batched direct
//! gets), [`read`] (queries), [`verify`] (reconciliation).
//! This file only declares them and re-exports what callers name.

pub mod amount;
pub mod books;
pub mod build;
pub mod direct;
pub mod error;
pub mod group;
pub mod read;
pub mod verify;

pub use amount::{parse_amount, split_fee};
pub use books::{Books, Recorded};
pub use build::tx_id;
pub use direct::BooksApi;
pub use error::LedgerError;
pub use verify::Balances;
