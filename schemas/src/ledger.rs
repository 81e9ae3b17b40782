//! The books: double-entry transactions between accounts, and the
//! per-account postings that index them.
//!
//! This module sits beside the market module, not above it: the books
//! keep their own record of a settled segment ([`Settlement`]), built from
//! the ids, money and VM types below both, so a ledger reader needs no
//! market message to read them.
//!
//! Sign convention: an entry either debits or credits an account, and an
//! account's balance is its credits minus its debits. Money moves *from*
//! the debited account *to* the credited one. Submitter, provider and
//! escrow accounts never go below zero; the operator account, which funds
//! submitters, goes negative by what it has issued.
//!
//! A provider may keep part of its earnings in a deposit held by the
//! broker ([`Account::Deposit`]: [`TxKind::Deposit`] in, [`TxKind::Release`]
//! out); when it is proven to have cheated on a job, part of the deposit
//! goes to the job's submitter ([`TxKind::Forfeit`], with its [`Forfeit`]
//! record saying why).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, LotId, ManifestId, ProviderId};
use crate::money::Money;
use crate::vm::{GuestState, SegmentTimings};

/// Most decimal places an amount on the books may carry. Anything finer is
/// refused at the door, so no entry is ever rounded after the fact.
pub const MAX_SCALE: u32 = 8;

/// An account on the books. Written `operator`, `user:NAME`,
/// `provider:UUID`, `pending:UUID`, `deposit:UUID` or `escrow:JOB`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// Funds submitters and providers (`vmlot admin credit`) and receives
    /// the broker's fee.
    Operator,
    /// A submitter's account (the job spec's `account`).
    User(String),
    /// Where a provider's earnings go, once posted.
    Provider(ProviderId),
    /// A provider's earnings not yet posted: paid for segments whose
    /// checkpoint has not been restored by anyone yet (two-phase, as
    /// TigerBeetle's pending transfers). A post moves them on to
    /// [`Account::Provider`]; a void returns them to the job's escrow.
    Pending(ProviderId),
    /// A provider's deposit: earnings it put aside, held by the broker as
    /// its stake in the market. It bids only while this holds the
    /// broker's minimum; part of it goes to a job's submitter when the
    /// provider is proven to have cheated on that job ([`Forfeit`]).
    Deposit(ProviderId),
    /// One per job: holds its budget from submission until it ends.
    Escrow(JobId),
}

/// Why an account name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad account {0:?}: want operator, user:NAME (1-64 of A-Z a-z 0-9 _ -), provider:UUID, pending:UUID, deposit:UUID or escrow:UUID"
)]
pub struct BadAccount(pub String);

/// True when `name` may name a user account: it becomes a NATS subject token.
pub fn valid_user_name(name: &str) -> bool {
    // A user account is its submitter's name: the same rule.
    crate::caller::valid_name(name)
}

impl Account {
    /// True for accounts whose balance may go below zero.
    pub fn may_go_negative(&self) -> bool {
        matches!(self, Account::Operator)
    }

    /// The subject token of this account (its written form, `:` and all).
    pub fn token(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Operator => f.write_str("operator"),
            Account::User(name) => write!(f, "user:{name}"),
            Account::Provider(id) => write!(f, "provider:{id}"),
            Account::Pending(id) => write!(f, "pending:{id}"),
            Account::Deposit(id) => write!(f, "deposit:{id}"),
            Account::Escrow(job) => write!(f, "escrow:{job}"),
        }
    }
}

impl FromStr for Account {
    type Err = BadAccount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadAccount(s.to_string());
        if s == "operator" {
            return Ok(Account::Operator);
        }
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "user" if valid_user_name(rest) => Ok(Account::User(rest.to_string())),
            "provider" => rest.parse().map(Account::Provider).map_err(|_| bad()),
            "pending" => rest.parse().map(Account::Pending).map_err(|_| bad()),
            "deposit" => rest.parse().map(Account::Deposit).map_err(|_| bad()),
            "escrow" => rest.parse().map(Account::Escrow).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl Serialize for Account {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Account {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Account {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Account".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(operator|user:[A-Za-z0-9_-]{1,64}|(provider|pending|deposit|escrow):[0-9a-f-]{36})$"
        })
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TxKind {
    /// The operator funds a user account, or a provider's (its deposit's
    /// first money, before it has earned any).
    Credit,
    /// A submission moves the job's budget from its submitter into escrow.
    Hold,
    /// A settled segment: its price from escrow to the provider's pending
    /// account, until its checkpoint is restored.
    Settlement,
    /// A settlement's checkpoint was restored: its price from the
    /// provider's pending account to the provider (less any fee, to the operator).
    Post,
    /// A settlement's checkpoint did not restore: its price back from the
    /// provider's pending account to the job's escrow.
    Void,
    /// The job ended: what is left in escrow back to the submitter.
    Refund,
    /// A provider puts part of its earnings into its deposit: from
    /// `provider:P` to `deposit:P`.
    Deposit,
    /// A provider takes (part of) its deposit back: from `deposit:P` to
    /// `provider:P`.
    Release,
    /// A provider proven to have cheated on a job loses part of its
    /// deposit to the job's submitter: from `deposit:P` to `user:PAYER`,
    /// the transaction carrying its [`Forfeit`] record.
    Forfeit,
}

impl TxKind {
    pub const ALL: [TxKind; 9] = [
        TxKind::Credit,
        TxKind::Hold,
        TxKind::Settlement,
        TxKind::Post,
        TxKind::Void,
        TxKind::Refund,
        TxKind::Deposit,
        TxKind::Release,
        TxKind::Forfeit,
    ];

    /// The kind's name, as written.
    pub fn as_str(&self) -> &'static str {
        match self {
            TxKind::Credit => "credit",
            TxKind::Hold => "hold",
            TxKind::Settlement => "settlement",
            TxKind::Post => "post",
            TxKind::Void => "void",
            TxKind::Refund => "refund",
            TxKind::Deposit => "deposit",
            TxKind::Release => "release",
            TxKind::Forfeit => "forfeit",
        }
    }

    /// The subject token its transactions are written under: a post and
    /// a void of one settlement share one subject (`resolve`), which takes
    /// one message, so a settlement is never both posted and voided.
    pub fn subject_token(&self) -> &'static str {
        match self {
            TxKind::Post | TxKind::Void => "resolve",
            other => other.as_str(),
        }
    }
}

impl FromStr for TxKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TxKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown kind {s:?}: want credit, hold, settlement, post, void, refund, deposit, release or forfeit"))
    }
}

/// Which way an entry moves money for its account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Debit,
    Credit,
}

/// One leg of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub account: Account,
    pub side: Side,
    /// Never negative; the side says which way it moves.
    #[serde(with = "crate::money::plain_decimal")]
    #[schemars(with = "String", regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub amount: Decimal,
}

impl Entry {
    pub fn debit(account: Account, amount: Decimal) -> Self {
        Self {
            account,
            side: Side::Debit,
            amount,
        }
    }

    pub fn credit(account: Account, amount: Decimal) -> Self {
        Self {
            account,
            side: Side::Credit,
            amount,
        }
    }

    /// The entry's effect on its account's balance.
    pub fn signed(&self) -> Decimal {
        match self.side {
            Side::Debit => -self.amount,
            Side::Credit => self.amount,
        }
    }
}

/// A balanced, immutable movement of money. Its id is derived from what it
/// is for (the job, the segment, the credit request), and it is written to
/// a subject of its own that takes one message only, so a retried write is
/// a no-op and a second, different one is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    pub version: u32,
    pub id: uuid::Uuid,
    pub kind: TxKind,
    pub at: DateTime<Utc>,
    /// The unit every entry is in.
    pub unit: String,
    pub entries: Vec<Entry>,
    pub job: Option<JobId>,
    pub segment: Option<u32>,
    /// The provider whose accounts it moves: the paid one (settlements,
    /// posts, voids), the depositor (deposits, releases, forfeits).
    pub provider: Option<ProviderId>,
    /// For people: who asked, why.
    pub memo: String,
    /// The settlement's details, so a broker that crashed right after
    /// paying resumes from them.
    pub settlement: Option<Box<Settlement>>,
    /// A post or void: the id of the settlement it resolves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolves: Option<uuid::Uuid>,
    /// A forfeit: who lost what to whom, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forfeit: Option<Box<Forfeit>>,
}

/// A settled segment as the books record it, inside its settlement
/// [`Transaction`]: who paid whom for which segment, and what the settling
/// result left behind, so a broker that crashed between paying and
/// recording the segment in the job resumes from the books alone. Written
/// once per (job, segment): its transaction's subject takes one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settlement {
    pub job: JobId,
    pub segment: u32,
    /// The lot (segment attempt) the paid result was for.
    pub lot: LotId,
    pub attempt: u32,
    /// The paid provider: the one whose result settled the segment.
    pub provider: ProviderId,
    /// The user account whose job pays (from its escrow).
    pub payer: String,
    /// The segment's price, the provider's winning bid.
    pub amount: Money,
    /// When the segment was paid.
    pub at: DateTime<Utc>,
    /// How the guest stood at the end of the segment: where the next one
    /// starts, or why the job ended.
    pub guest: GuestState,
    /// The guest's console output during the segment, as a manifest.
    pub console: Option<ManifestId>,
    pub timings: SegmentTimings,
    /// Block bytes the provider fetched from the store for the segment's start.
    pub fetched_bytes: u64,
    /// Block bytes the provider sent to the store for the segment's end.
    pub sent_bytes: u64,
    /// When the provider finished the segment (its result's time).
    pub finished_at: DateTime<Utc>,
    /// A partial segment (its provider's owner preempted it): the
    /// milliseconds of the lot's time it is paid for (see
    /// `SettledSegment::partial_ms`); `amount` is then the broker's
    /// `--partial-pay` share of the winning bid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_ms: Option<u64>,
}

/// Why a provider's deposit was forfeited: the cheating its job's record
/// or the books prove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ForfeitCause {
    /// The provider's checkpoint did not restore: the payment for the
    /// attempt ([`Settlement`]) was voided.
    Unrestorable,
    /// The provider's result was in the minority of a quorum: the job's
    /// record lists it among those refused.
    Minority,
}

impl ForfeitCause {
    /// The cause's name, as written.
    pub fn as_str(&self) -> &'static str {
        match self {
            ForfeitCause::Unrestorable => "unrestorable",
            ForfeitCause::Minority => "minority",
        }
    }
}

impl fmt::Display for ForfeitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A forfeit as the books record it, inside its forfeit [`Transaction`]:
/// which provider lost how much of its deposit to which job's submitter,
/// for which attempt at which segment, and why. Written at most once per
/// (job, segment, attempt, provider): its transaction's subject takes one
/// message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forfeit {
    pub job: JobId,
    pub segment: u32,
    /// The attempt at the segment the provider cheated on.
    pub attempt: u32,
    /// The provider whose deposit is taken.
    pub provider: ProviderId,
    /// The user account of the job's submitter, which receives it.
    pub payer: String,
    /// What is taken from the deposit.
    pub amount: Money,
    pub cause: ForfeitCause,
}

impl Transaction {
    /// Total debits and total credits.
    pub fn totals(&self) -> (Decimal, Decimal) {
        self.entries
            .iter()
            .fold((Decimal::ZERO, Decimal::ZERO), |(d, c), e| match e.side {
                Side::Debit => (d + e.amount, c),
                Side::Credit => (d, c + e.amount),
            })
    }

    /// Why this transaction is not well-formed, if it is not: unbalanced,
    /// a negative or over-precise amount, no entries, an account twice.
    pub fn malformed(&self) -> Option<String> {
        if self.entries.is_empty() {
            return Some("no entries".into());
        }
        for e in &self.entries {
            if e.amount.is_sign_negative() {
                return Some(format!("negative amount {} for {}", e.amount, e.account));
            }
            if e.amount.scale() > MAX_SCALE {
                return Some(format!(
                    "amount {} has more than {MAX_SCALE} decimal places",
                    e.amount
                ));
            }
        }
        let mut accounts: Vec<&Account> = self.entries.iter().map(|e| &e.account).collect();
        accounts.sort();
        if accounts.windows(2).any(|w| w[0] == w[1]) {
            return Some("an account appears twice".into());
        }
        let (debits, credits) = self.totals();
        (debits != credits).then(|| format!("unbalanced: debits {debits} != credits {credits}"))
    }
}

/// One entry as seen from its account, with the balance it leaves: the
/// per-account index of the books. Written in the same atomic batch as
/// its transaction, each on its account's own subject and only if no
/// other posting got there first, so balances never race.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Posting {
    pub version: u32,
    pub tx: uuid::Uuid,
    pub kind: TxKind,
    pub at: DateTime<Utc>,
    pub account: Account,
    pub unit: String,
    /// Signed: credits add, debits subtract.
    #[serde(with = "crate::money::plain_decimal")]
    #[schemars(with = "String", regex(pattern = r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub change: Decimal,
    /// The account's balance in this unit after this posting.
    #[serde(with = "crate::money::plain_decimal")]
    #[schemars(with = "String", regex(pattern = r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub balance: Decimal,
    pub job: Option<JobId>,
    pub segment: Option<u32>,
}

/// operator → broker: fund a user account (or a provider's, for its deposit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    pub version: u32,
    /// Chosen by the caller: retrying with the same id credits once.
    pub id: uuid::Uuid,
    pub account: Account,
    pub amount: Money,
    pub memo: String,
}

#[cfg(test)]
mod tests;
