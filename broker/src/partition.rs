//! Which partitions of the jobs a broker should hold (pure). Jobs fall
//! into [`PARTITIONS`] partitions by id; each is run by the one broker
//! holding its lease ([`crate::lease`]). Brokers share them evenly: each
//! takes free partitions up to its fair share, `⌈PARTITIONS / brokers⌉`,
//! and hands back, one at a time, what it holds beyond it, so a broker
//! that joins gets work and one that dies has its partitions taken by the
//! others once its leases lapse.

use std::collections::BTreeSet;

use vmlot_schemas::subjects::PARTITIONS;

/// One step of a broker's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Take this free partition's lease.
    Take(u16),
    /// Hand this partition back (stop its jobs, then delete the lease).
    Release(u16),
}

/// A broker's fair share of the partitions among `brokers` live ones
/// (itself included, so at least one).
pub fn fair_share(brokers: usize) -> usize {
    (PARTITIONS as usize).div_ceil(brokers.max(1))
}

/// What a broker holding `held` does, with `free` the partitions nobody
/// holds and `brokers` the live brokers it knows of (itself included).
/// Partitions are taken in a spread order (`start` first, then every
/// other), so brokers that look at once mostly take different ones.
pub fn plan(held: &BTreeSet<u16>, free: &BTreeSet<u16>, brokers: usize, start: u16) -> Vec<Move> {
    let share = fair_share(brokers);
    if held.len() > share {
        // One at a time: the others take it before more is handed back.
        return held
            .iter()
            .next_back()
            .map(|p| vec![Move::Release(*p)])
            .unwrap_or_default();
    }
    let room = share - held.len();
    (0..PARTITIONS)
        .map(|i| (start + i) % PARTITIONS)
        .filter(|p| free.contains(p) && !held.contains(p))
        .take(room)
        .map(Move::Take)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ps: impl IntoIterator<Item = u16>) -> BTreeSet<u16> {
        ps.into_iter().collect()
    }

    #[test]
    fn a_lone_broker_takes_every_partition() {
        let moves = plan(&set([]), &set(0..PARTITIONS), 1, 5);
        assert_eq!(moves.len(), PARTITIONS as usize);
        assert_eq!(moves[0], Move::Take(5));
    }

    #[test]
    fn a_second_broker_gets_half_as_the_first_hands_back_one_at_a_time() {
        let mut a = set(0..PARTITIONS);
        let mut b = set([]);
        for _ in 0..2 * PARTITIONS {
            let free: BTreeSet<u16> = (0..PARTITIONS)
                .filter(|p| !a.contains(p) && !b.contains(p))
                .collect();
            for m in plan(&a, &free, 2, 0) {
                match m {
                    Move::Take(p) => assert!(a.insert(p)),
                    Move::Release(p) => assert!(a.remove(&p)),
                }
            }
            let free: BTreeSet<u16> = (0..PARTITIONS)
                .filter(|p| !a.contains(p) && !b.contains(p))
                .collect();
            for m in plan(&b, &free, 2, 7) {
                match m {
                    Move::Take(p) => assert!(b.insert(p)),
                    Move::Release(p) => assert!(b.remove(&p)),
                }
            }
        }
        assert_eq!(a.len(), PARTITIONS as usize / 2);
        assert_eq!(b.len(), PARTITIONS as usize / 2);
        assert!(a.is_disjoint(&b));
    }

    #[test]
    fn a_dead_brokers_partitions_are_taken_by_the_survivors() {
        // Three brokers held 6, 6 and 4; the third is gone and its
        // leases lapsed: two brokers, a share of 8 each.
        let a = set(0..6);
        let free = set(12..16);
        let moves = plan(&a, &free, 2, 0);
        assert_eq!(moves, vec![Move::Take(12), Move::Take(13)]);
    }

    #[test]
    fn nothing_moves_at_the_fair_share() {
        assert!(plan(&set(0..8), &set([]), 2, 0).is_empty());
        assert_eq!(fair_share(3), 6);
        assert_eq!(fair_share(0), PARTITIONS as usize);
    }
}
