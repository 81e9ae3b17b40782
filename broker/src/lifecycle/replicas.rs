//! The quorum check's transitions: an attempt left unreplicated, the
//! auction's next bidders kept as standby, and one of them awarded the
//! open attempt when its replicas disagree (what they must agree on is [`crate::quorum`]'s).

use chrono::{DateTime, Utc};
use vmlot_schemas::market::{JobStatus, ResultCheck};
use vmlot_schemas::{Money, ProviderId};

use super::{Refused, running};

/// **Standby**: under a quorum check, the auction's next bidders after the
/// winners of the open lot, kept in order for a tie-breaker (those the
/// job refuses, or awarded already, left out).
pub fn standby(status: &JobStatus, bidders: &[(ProviderId, Money)]) -> Result<JobStatus, Refused> {
    running(status)?;
    let Some(open) = &status.open_lot else {
        return Err(Refused::NoOpenLot);
    };
    let standby = bidders
        .iter()
        .filter(|(p, _)| {
            !status.refused.contains(p)
                && !status.restore_failures.contains(p)
                && !open.awarded.iter().any(|(a, _)| a == p)
        })
        .cloned()
        .collect();
    let mut next = status.clone();
    if let Some(open) = next.open_lot.as_mut() {
        open.standby = standby;
    }
    Ok(next)
}

/// **Unreplicated**: adaptive replication left the open attempt of a
/// quorum job to its one awarded provider; it settles on that provider's
/// first valid result, and its payment waits for a continuation.
pub fn unreplicated(status: &JobStatus) -> Result<JobStatus, Refused> {
    running(status)?;
    if status.spec.check != ResultCheck::Quorum {
        return Err(Refused::NotQuorum);
    }
    let mut next = status.clone();
    match next.open_lot.as_mut() {
        Some(open) if open.awarded.len() == 1 => {
            open.unreplicated = true;
            open.standby.clear();
            Ok(next)
        }
        _ => Err(Refused::NoOpenLot),
    }
}

/// **Tie-breaker awarded**: the open attempt's replicas disagree, so
/// `provider`, the first of its standby bidders, is awarded it too, at its
/// own price; the attempt's deadline is at least `deadline`.
pub fn add_replica(
    status: &JobStatus,
    provider: ProviderId,
    deadline: DateTime<Utc>,
) -> Result<JobStatus, Refused> {
    running(status)?;
    if status.refused.contains(&provider) || status.restore_failures.contains(&provider) {
        return Err(Refused::Excluded(provider));
    }
    let mut next = status.clone();
    let Some(open) = next.open_lot.as_mut() else {
        return Err(Refused::NoOpenLot);
    };
    let Some(at) = open.standby.iter().position(|(p, _)| *p == provider) else {
        return Err(Refused::NotAwarded(provider));
    };
    let (provider, price) = open.standby.remove(at);
    open.awarded.push((provider, price));
    open.award_deadline = open.award_deadline.max(Some(deadline));
    Ok(next)
}

/// **Standby dropped**: `provider` can no longer break a tie (the job
/// refused it since it bid). Applies to an ended job too.
pub fn drop_standby(status: &JobStatus, provider: ProviderId) -> Result<JobStatus, Refused> {
    let mut next = status.clone();
    match next.open_lot.as_mut() {
        Some(open) if open.standby.iter().any(|(p, _)| *p == provider) => {
            open.standby.retain(|(p, _)| *p != provider);
            Ok(next)
        }
        _ => Err(Refused::NotAwarded(provider)),
    }
}
