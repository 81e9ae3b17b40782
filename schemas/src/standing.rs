//! A provider's standing: what the broker made of the results it sent.
//! Every result an awarded provider sends is either valid (it settled its
//! segment, or would have but for a faster replica) or refused for a named
//! reason; the broker counts both per provider, and the operator reads the
//! counts through the job API (`standing`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::ProviderId;

/// Why a result was refused: its stable name (the counts are keyed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalKind {
    /// Not for the attempt open now, or from a provider not awarded it.
    NotOpen,
    /// A running guest's result came before the segment could have run.
    TooEarly,
    /// A halted or crashed guest's result without the guest's final state.
    NoFinalState,
    /// The new state is the input's (or one of the image's parts): nothing ran.
    Unchanged,
    /// The machine state is not the kind the lot's hypervisor writes, or
    /// not for the lot's machine (memory, vCPUs).
    WrongKind,
    /// A manifest or block is missing or malformed, or a size is wrong.
    Incomplete,
    /// A state this provider was paid for did not restore on the providers
    /// of the next segment: its payment was voided.
    Unrestorable,
    /// Under a quorum check, a state other replicas of the same attempt
    /// agreed on, and this one's differs.
    Minority,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 8] = [
        RefusalKind::NotOpen,
        RefusalKind::TooEarly,
        RefusalKind::NoFinalState,
        RefusalKind::Unchanged,
        RefusalKind::WrongKind,
        RefusalKind::Incomplete,
        RefusalKind::Unrestorable,
        RefusalKind::Minority,
    ];

    /// The stable name, as on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefusalKind::NotOpen => "not-open",
            RefusalKind::TooEarly => "too-early",
            RefusalKind::NoFinalState => "no-final-state",
            RefusalKind::Unchanged => "unchanged",
            RefusalKind::WrongKind => "wrong-kind",
            RefusalKind::Incomplete => "incomplete",
            RefusalKind::Unrestorable => "unrestorable",
            RefusalKind::Minority => "minority",
        }
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One provider's counts, kept by the broker (a KV record only the broker
/// writes) and returned by the `standing` endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Standing {
    pub provider: ProviderId,
    /// Results that passed every check.
    pub valid: u64,
    /// Of those, results another replica's agreed with (a quorum check).
    #[serde(default)]
    pub agreed: u64,
    /// Agreeing results since the last refusal: the run adaptive
    /// replication trusts (a result checked by nobody leaves it as it is).
    #[serde(default)]
    pub streak: u64,
    /// Results refused, by reason.
    #[serde(default)]
    pub refused: BTreeMap<RefusalKind, u64>,
    /// The last refusal in words, for people.
    #[serde(default)]
    pub last_refusal: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Standing {
    pub fn new(provider: ProviderId) -> Self {
        Standing {
            provider,
            ..Standing::default()
        }
    }

    /// All refusals, whatever the reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Counts one valid result.
    pub fn count_valid(&mut self, at: DateTime<Utc>) {
        self.valid += 1;
        self.updated_at = Some(at);
    }

    /// Counts one valid result that other replicas agreed with: the run
    /// grows.
    pub fn count_agreed(&mut self, at: DateTime<Utc>) {
        self.count_valid(at);
        self.agreed += 1;
        self.streak += 1;
    }

    /// Counts one refusal: the run of agreements ends.
    pub fn count_refused(&mut self, kind: RefusalKind, why: &str, at: DateTime<Utc>) {
        self.streak = 0;
        *self.refused.entry(kind).or_default() += 1;
        self.last_refusal = Some(format!("{kind}: {why}"));
        self.updated_at = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_round_trips_with_names_as_keys() {
        let mut s = Standing::new(ProviderId::new());
        s.count_refused(RefusalKind::TooEarly, "3 s after the award", Utc::now());
        s.count_refused(RefusalKind::TooEarly, "1 s after the award", Utc::now());
        s.count_refused(RefusalKind::Unchanged, "same state", Utc::now());
        s.count_valid(Utc::now());
        assert_eq!((s.valid, s.refused_total()), (1, 3));
        s.count_agreed(Utc::now());
        s.count_agreed(Utc::now());
        s.count_valid(Utc::now());
        assert_eq!((s.valid, s.agreed, s.streak), (4, 2, 2));
        s.count_refused(RefusalKind::Minority, "differs", Utc::now());
        assert_eq!((s.agreed, s.streak), (2, 0));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["refused"]["too-early"], 2);
        assert_eq!(json["refused"]["unchanged"], 1);
        assert_eq!(serde_json::from_value::<Standing>(json).unwrap(), s);
        for kind in RefusalKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
