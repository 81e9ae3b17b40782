//! Adaptive replication (pure): under a quorum check, whether an attempt
//! is replicated or awarded to its cheapest bidder alone. As BOINC does
//! it, a provider's attempts are replicated until it has a run of results
//! that other replicas agreed with, and from then on at random, with a
//! probability that falls as the run grows: `trust_after / streak`. The
//! run counts only agreements (an unreplicated result proves nothing and
//! does not lengthen it) and any refusal ends it, so a provider cannot
//! buy its way to fewer checks with unchecked work.

/// The broker's setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Agreeing results in a row a provider needs before any of its
    /// attempts goes unreplicated; 0 turns adaptive replication off (every
    /// attempt of a quorum job is replicated).
    pub trust_after: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { trust_after: 10 }
    }
}

impl Policy {
    /// Whether an attempt whose winner has `streak` agreeing results in a
    /// row is replicated, with `draw` taken uniformly from `0..streak` by
    /// the caller: always below `trust_after`, and then with probability
    /// `trust_after / streak`.
    pub fn replicate(&self, streak: u64, draw: u64) -> bool {
        self.trust_after == 0 || streak < self.trust_after || draw < self.trust_after
    }

    /// The probability [`Policy::replicate`] says yes, as a fraction
    /// (numerator, denominator), for people and tests.
    pub fn chance(&self, streak: u64) -> (u64, u64) {
        if self.trust_after == 0 || streak <= self.trust_after {
            (1, 1)
        } else {
            (self.trust_after, streak)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many draws of `0..streak` replicate.
    fn replicated(policy: Policy, streak: u64) -> u64 {
        (0..streak.max(1))
            .filter(|&d| policy.replicate(streak, d))
            .count() as u64
    }

    #[test]
    fn a_provider_without_a_run_of_agreements_is_always_replicated() {
        let p = Policy { trust_after: 10 };
        for streak in 0..10 {
            for draw in 0..streak.max(1) {
                assert!(p.replicate(streak, draw), "streak {streak} draw {draw}");
            }
            assert_eq!(p.chance(streak), (1, 1));
        }
        assert_eq!(p.chance(10), (1, 1));
    }

    #[test]
    fn the_chance_of_replication_falls_as_trust_after_over_the_streak() {
        let p = Policy { trust_after: 10 };
        for streak in [10u64, 11, 20, 40, 1000] {
            let (num, den) = p.chance(streak);
            // Exactly `trust_after` of the `streak` equally likely draws replicate.
            assert_eq!(replicated(p, streak) * den, num * streak, "streak {streak}");
        }
        assert_eq!(p.chance(20), (10, 20));
        assert!(!p.replicate(20, 10) && p.replicate(20, 9));
    }

    #[test]
    fn zero_turns_it_off() {
        let off = Policy { trust_after: 0 };
        assert!((0..100).all(|d| off.replicate(100, d)));
        assert_eq!(off.chance(1_000_000), (1, 1));
    }
}
