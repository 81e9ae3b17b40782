//! Providers' deposits (`deposit:PROVIDER` in the books), when the broker
//! asks for them ([`DepositPolicy`]): which bidders hold enough to win a
//! lot, what a provider proven to have cheated a job forfeits to its
//! submitter, and a provider's own requests to move earnings into its
//! deposit or back out. The provider is whoever its credentials name:
//! the API hands this module the caller's id, never a field of the body.

use std::sync::Arc;

use rust_decimal::Decimal;
use vmlot_ledger::LedgerError;
use vmlot_schemas::api::{DepositRequest, Deposited};
use vmlot_schemas::ledger::{Account, Forfeit, ForfeitCause};
use vmlot_schemas::market::{Bid, JobStatus};
use vmlot_schemas::{Money, ProviderId, WIRE_VERSION};

use crate::config::DepositPolicy;
use crate::shared::Shared;

/// Why a deposit or release was refused.
#[derive(Debug, thiserror::Error)]
pub enum DepositError {
    #[error("version {0} not supported (speaks {WIRE_VERSION})")]
    Version(u32),
    #[error("the amount must be positive, in a valid unit with at most 8 decimal places")]
    BadAmount,
    #[error("not enough: {0}")]
    Insufficient(String),
    #[error("request {0} was already used for another amount")]
    Conflict(uuid::Uuid),
    #[error("the deposit stays while {0}")]
    Busy(String),
    #[error("the books: {0}")]
    Books(LedgerError),
}

impl DepositError {
    /// The API's error code for it.
    pub fn code(&self) -> &'static str {
        match self {
            DepositError::Version(_) | DepositError::BadAmount => "bad-request",
            DepositError::Insufficient(_) => "insufficient-funds",
            DepositError::Conflict(_) => "conflict",
            DepositError::Busy(_) => "busy",
            DepositError::Books(_) => "unavailable",
        }
    }
}

impl From<LedgerError> for DepositError {
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::InsufficientFunds { .. } => DepositError::Insufficient(err.to_string()),
            LedgerError::Malformed(_) => DepositError::BadAmount,
            other => DepositError::Books(other),
        }
    }
}

/// `provider` moves `req.amount` of its earnings into its deposit.
pub(crate) async fn put(
    shared: &Shared,
    provider: ProviderId,
    req: DepositRequest,
) -> Result<Deposited, DepositError> {
    check(&req)?;
    let recorded = shared.books.deposit(&req.id, provider, &req.amount).await;
    let tx = conflict(recorded, &req)?;
    tracing::info!(%provider, amount = %req.amount, "deposit put in");
    standing(shared, provider, tx, &req.amount.unit).await
}

/// `provider` takes `req.amount` of its deposit back into its earnings:
/// only while it holds no award (a result it has not sent yet could be
/// proven a cheat) and no pending payment (its checkpoint could yet fail
/// to restore).
pub(crate) async fn release(
    shared: &Shared,
    provider: ProviderId,
    req: DepositRequest,
) -> Result<Deposited, DepositError> {
    check(&req)?;
    let awards = shared
        .capacity
        .lock()
        .expect("capacity lock")
        .outstanding(&provider);
    if awards > 0 {
        return Err(DepositError::Busy(format!("{awards} award(s) are outstanding")));
    }
    let pending = shared
        .books
        .balance(&Account::Pending(provider), &req.amount.unit)
        .await
        .map_err(DepositError::Books)?;
    if !pending.is_zero() {
        return Err(DepositError::Busy(format!(
            "{pending} {} of payments are pending",
            req.amount.unit
        )));
    }
    let recorded = shared.books.release(&req.id, provider, &req.amount).await;
    let tx = conflict(recorded, &req)?;
    tracing::info!(%provider, amount = %req.amount, "deposit released");
    standing(shared, provider, tx, &req.amount.unit).await
}

fn check(req: &DepositRequest) -> Result<(), DepositError> {
    if req.version != WIRE_VERSION {
        return Err(DepositError::Version(req.version));
    }
    let amount = &req.amount;
    if amount.amount <= Decimal::ZERO
        || amount.amount.scale() > vmlot_schemas::ledger::MAX_SCALE
        || !amount.unit_is_valid()
    {
        return Err(DepositError::BadAmount);
    }
    Ok(())
}

/// The transaction written for `req`. The books refuse the same id reused
/// for another kind, provider, unit or amount ([`LedgerError::Conflict`]).
fn conflict(
    recorded: Result<vmlot_ledger::Recorded, LedgerError>,
    req: &DepositRequest,
) -> Result<vmlot_schemas::ledger::Transaction, DepositError> {
    match recorded {
        Ok(recorded) => Ok(recorded.tx().clone()),
        Err(LedgerError::Conflict { .. }) => Err(DepositError::Conflict(req.id)),
        Err(e) => Err(e.into()),
    }
}

/// The answer: the transaction, and the deposit and earnings after it.
async fn standing(
    shared: &Shared,
    provider: ProviderId,
    tx: vmlot_schemas::ledger::Transaction,
    unit: &str,
) -> Result<Deposited, DepositError> {
    let balance = |account| async move { shared.books.balance(&account, unit).await };
    let deposit = balance(Account::Deposit(provider)).await?;
    let earnings = balance(Account::Provider(provider)).await?;
    Ok(Deposited {
        tx,
        deposit: Money::new(deposit, unit),
        earnings: Money::new(earnings, unit),
    })
}

/// The bids whose providers hold the deposit the broker asks for (all of
/// them when it asks for none). A deposit that cannot be read counts as
/// none: the bid waits for the next offer.
pub(crate) async fn eligible(shared: &Arc<Shared>, bids: Vec<Bid>) -> Vec<Bid> {
    let Some(policy) = &shared.config.deposit else {
        return bids;
    };
    let held = futures::future::join_all(bids.iter().map(|bid| async move {
        let account = Account::Deposit(bid.provider);
        match shared.books.balance(&account, &policy.minimum.unit).await {
            Ok(balance) => balance >= policy.minimum.amount,
            Err(err) => {
                tracing::warn!(provider = %bid.provider, %err, "deposit unreadable");
                false
            }
        }
    }))
    .await;
    bids.into_iter()
        .zip(held)
        .filter_map(|(bid, enough)| {
            if !enough {
                tracing::debug!(provider = %bid.provider, "bid refused: deposit below the minimum");
            }
            enough.then_some(bid)
        })
        .collect()
}

/// `provider` was proven to have cheated `status`'s job on `segment`
/// (attempt `attempt`): the broker's forfeit, at most what its deposit
/// holds, goes to the job's submitter. Written once per (job, segment,
/// attempt, provider); best effort: a failure is logged.
pub(crate) async fn forfeit(
    shared: &Shared,
    status: &JobStatus,
    segment: u32,
    attempt: u32,
    provider: ProviderId,
    cause: ForfeitCause,
) {
    let Some(policy) = &shared.config.deposit else {
        return;
    };
    if let Err(err) = try_forfeit(shared, policy, status, segment, attempt, provider, cause).await {
        tracing::warn!(%provider, %err, "deposit not forfeited");
    }
}

async fn try_forfeit(
    shared: &Shared,
    policy: &DepositPolicy,
    status: &JobStatus,
    segment: u32,
    attempt: u32,
    provider: ProviderId,
    cause: ForfeitCause,
) -> Result<(), LedgerError> {
    let unit = &policy.minimum.unit;
    let held = shared.books.balance(&Account::Deposit(provider), unit).await?;
    let amount = held.min(policy.forfeit);
    if amount <= Decimal::ZERO {
        tracing::info!(%provider, "no deposit to forfeit");
        return Ok(());
    }
    let forfeit = Forfeit {
        job: status.job,
        segment,
        attempt,
        provider,
        payer: status.spec.account.clone(),
        amount: Money::new(amount, unit.clone()),
        cause,
    };
    let recorded = shared.books.forfeit(&forfeit).await?;
    crate::metrics::payment("forfeit", &recorded);
    tracing::warn!(%provider, amount = %forfeit.amount, cause = cause.as_str(), "deposit forfeited to the submitter");
    Ok(())
}
