//! The quorum check (`ResultCheck::Quorum`): the replicas of one attempt
//! run a deterministic guest, so honest ones end in the same state; a
//! result is paid when another replica's agrees with it. What they must
//! agree on is [`canonical`]; whether an attempt's results agree yet is
//! [`decide`]. Both are pure; `settle` applies them to the results as they
//! come, and `lifecycle::add_replica` records a tie-breaker.

use vmlot_schemas::market::{GuestState, SegmentResult};
use vmlot_schemas::{HypervisorKind, ProviderId};

/// Distinct replicas whose states must agree before one is paid.
pub(crate) const QUORUM: usize = 2;

/// Why a result's state has no canonical form to compare.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotCanonical {
    #[error("{0:?} states have no canonical form the broker can compare yet")]
    Hypervisor(HypervisorKind),
    #[error("a restore failure has no state")]
    NothingRan,
    #[error("a QEMU machine state is compared by its canonical digest, and none was given")]
    NoDigest,
}

/// The hypervisors whose states the broker can compare. A synthetic state
/// holds nothing of the host it ran on (no clock, no address), so its
/// manifest id, a digest of its bytes, is already canonical. A QEMU save
/// of a deterministic segment holds the host's clock in two fields of its
/// timer section: its canonical digest ([`crate::stored_save`]) leaves
/// them out. A Xen save holds more of the host (no canonical form yet).
pub fn comparable(hypervisor: HypervisorKind) -> bool {
    matches!(hypervisor, HypervisorKind::Synthetic | HypervisorKind::Qemu)
}

/// What two replicas of an attempt must agree on: how the guest ended,
/// every object of its new checkpoint (or final state), and its console.
/// A QEMU machine state counts by `machine_state`, its canonical digest.
pub(crate) fn canonical(
    hypervisor: HypervisorKind,
    result: &SegmentResult,
    machine_state: Option<[u8; 32]>,
) -> Result<String, NotCanonical> {
    if !comparable(hypervisor) {
        return Err(NotCanonical::Hypervisor(hypervisor));
    }
    let (how, state) = match &result.guest {
        GuestState::Running { checkpoint } => ("running", Some(checkpoint)),
        GuestState::Halted { final_state } => ("halted", final_state.as_ref()),
        GuestState::Crashed { final_state, .. } => ("crashed", final_state.as_ref()),
        GuestState::RestoreFailed { .. } => return Err(NotCanonical::NothingRan),
    };
    let mut parts = vec![how.to_string()];
    if let Some(state) = state {
        parts.push(match (hypervisor, state.machine_state, machine_state) {
            (_, None, _) => String::new(),
            (HypervisorKind::Qemu, Some(_), Some(digest)) => {
                digest.iter().map(|b| format!("{b:02x}")).collect()
            }
            (HypervisorKind::Qemu, Some(_), None) => return Err(NotCanonical::NoDigest),
            (_, Some(named), _) => named.to_string(),
        });
        parts.push(state.memory.map(|m| m.to_string()).unwrap_or_default());
        parts.extend(state.disks.iter().map(|d| d.to_string()));
    }
    parts.push(result.console.map(|c| c.to_string()).unwrap_or_default());
    Ok(parts.join(" "))
}

/// One replica's valid result, as far as the quorum goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Vote {
    pub provider: ProviderId,
    pub canonical: String,
}

/// Where an attempt's results stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// [`QUORUM`] distinct replicas agree: `winner` (an index into the
    /// votes) is the first result of the agreeing ones, the one paid; the
    /// `minority` voted for another state.
    Agreed { winner: usize, minority: Vec<usize> },
    /// Replicas that may still answer could make a quorum.
    Open,
    /// Every awarded replica has answered (or been refused) and no two
    /// agree: one more replica must break the tie.
    Split,
}

/// Decides on `votes` (in arrival order) with `outstanding` awarded
/// replicas still to answer.
pub(crate) fn decide(votes: &[Vote], outstanding: usize) -> Decision {
    for (i, vote) in votes.iter().enumerate() {
        let agreeing: Vec<usize> = votes
            .iter()
            .enumerate()
            .filter(|(_, v)| v.canonical == vote.canonical)
            .map(|(j, _)| j)
            .collect();
        let distinct: std::collections::HashSet<ProviderId> =
            agreeing.iter().map(|&j| votes[j].provider).collect();
        if distinct.len() >= QUORUM {
            let minority = (0..votes.len())
                .filter(|j| votes[*j].canonical != vote.canonical)
                .collect();
            return Decision::Agreed { winner: i, minority };
        }
    }
    if outstanding == 0 {
        Decision::Split
    } else {
        Decision::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(provider: ProviderId, state: &str) -> Vote {
        Vote {
            provider,
            canonical: state.into(),
        }
    }

    #[test]
    fn two_agreeing_replicas_settle_on_the_first_of_them_and_the_other_state_is_the_minority() {
        let (a, b, c) = (ProviderId::new(), ProviderId::new(), ProviderId::new());
        assert_eq!(decide(&[], 2), Decision::Open);
        assert_eq!(decide(&[vote(a, "x")], 1), Decision::Open);
        assert_eq!(
            decide(&[vote(a, "x"), vote(b, "x")], 0),
            Decision::Agreed {
                winner: 0,
                minority: vec![]
            }
        );
        // A liar answered first: the honest pair wins, the liar is the minority.
        assert_eq!(
            decide(&[vote(c, "forged"), vote(a, "x"), vote(b, "x")], 0),
            Decision::Agreed {
                winner: 1,
                minority: vec![0]
            }
        );
    }

    #[test]
    fn a_disagreement_waits_for_the_replicas_left_and_then_needs_a_tie_breaker() {
        let (a, b) = (ProviderId::new(), ProviderId::new());
        let split = [vote(a, "x"), vote(b, "y")];
        assert_eq!(decide(&split, 1), Decision::Open);
        assert_eq!(decide(&split, 0), Decision::Split);
    }

    #[test]
    fn one_provider_agreeing_with_itself_is_no_quorum() {
        let a = ProviderId::new();
        assert_eq!(decide(&[vote(a, "x"), vote(a, "x")], 0), Decision::Split);
    }
}
