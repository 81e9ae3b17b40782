//! How many awards each provider has outstanding. Providers bid on many lots
//! at once; the broker, the one place that sees every award, never gives a
//! provider more outstanding awards than the slots its bids declare.

use std::collections::{HashMap, HashSet};

use vmlot_schemas::{LotId, ProviderId};

/// Most slots a bid may declare; a larger claim is cut to this.
pub const MAX_SLOTS: u32 = 1024;

#[derive(Default)]
pub struct Capacity {
    outstanding: HashMap<ProviderId, HashSet<LotId>>,
}

impl Capacity {
    /// True when `provider`, running `slots` at once, can take one more award.
    pub fn has_room(&self, provider: &ProviderId, slots: u32) -> bool {
        let used = self.outstanding.get(provider).map_or(0, HashSet::len);
        used < slots.min(MAX_SLOTS) as usize
    }

    /// Records an award of `lot` to `provider` (again: no change).
    pub fn commit(&mut self, provider: ProviderId, lot: LotId) {
        self.outstanding.entry(provider).or_default().insert(lot);
    }

    /// The attempt of `lot` is over (settled, timed out or stopped): its
    /// providers' slots are free for other awards.
    pub fn release(&mut self, providers: impl IntoIterator<Item = ProviderId>, lot: &LotId) {
        for provider in providers {
            if let Some(lots) = self.outstanding.get_mut(&provider) {
                lots.remove(lot);
                if lots.is_empty() {
                    self.outstanding.remove(&provider);
                }
            }
        }
    }

    /// Outstanding awards of `provider`.
    pub fn outstanding(&self, provider: &ProviderId) -> usize {
        self.outstanding.get(provider).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_never_holds_more_awards_than_its_slots() {
        let mut cap = Capacity::default();
        let p = ProviderId::new();
        let (a, b) = (LotId::new(), LotId::new());
        assert!(cap.has_room(&p, 1));
        cap.commit(p, a);
        assert!(!cap.has_room(&p, 1));
        assert!(cap.has_room(&p, 2));
        cap.commit(p, a);
        assert_eq!(
            cap.outstanding(&p),
            1,
            "committing the same lot twice counts once"
        );
        cap.commit(p, b);
        assert!(!cap.has_room(&p, 2));
        cap.release([p], &a);
        assert!(cap.has_room(&p, 2));
        cap.release([p], &b);
        assert_eq!(cap.outstanding(&p), 0);
        assert!(!cap.has_room(&p, 0), "a provider declaring no slots gets nothing");
    }
}
