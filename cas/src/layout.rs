//! Where a manifest's extents lie in its object, by byte offset: so a pull
//! onto an older copy of the object (a seed, see
//! [`crate::transfer::pull_file_over`]) writes only the extents that are
//! not already there at the same offset. Pure.

use vmlot_schemas::{Extent, Manifest};

/// A manifest's extents with their start offsets.
pub struct Layout<'a> {
    starts: Vec<u64>,
    extents: &'a [Extent],
    size: u64,
}

/// Each extent's start offset, in order, and the object's size.
pub fn starts(extents: &[Extent]) -> (Vec<u64>, u64) {
    let mut starts = Vec::with_capacity(extents.len());
    let mut at = 0u64;
    for extent in extents {
        starts.push(at);
        at = at.saturating_add(extent.len());
    }
    (starts, at)
}

impl<'a> Layout<'a> {
    pub fn of(manifest: &'a Manifest) -> Self {
        let (starts, size) = starts(&manifest.extents);
        Layout {
            starts,
            extents: &manifest.extents,
            size,
        }
    }

    /// Whether the object this layout describes, cut or extended to any
    /// length (an extension reads as zeros), already holds `extent` at
    /// `at`: the same block at the same offset, or zeros throughout.
    pub fn holds(&self, at: u64, extent: &Extent) -> bool {
        match extent {
            Extent::Block { .. } => self
                .index_at(at)
                .is_some_and(|i| self.starts[i] == at && self.extents[i] == *extent),
            Extent::Zero { z } => {
                let end = at.saturating_add(*z);
                let Some(mut i) = self.index_at(at) else {
                    // Wholly past the end: the extension's zeros.
                    return at >= self.size;
                };
                while i < self.extents.len() && self.starts[i] < end {
                    if matches!(self.extents[i], Extent::Block { .. }) {
                        return false;
                    }
                    i += 1;
                }
                true
            }
        }
    }

    /// The extent that covers byte `at`.
    fn index_at(&self, at: u64) -> Option<usize> {
        if at >= self.size {
            return None;
        }
        Some(self.starts.partition_point(|s| *s <= at) - 1)
    }
}

#[cfg(test)]
mod tests {
    use vmlot_schemas::{BlockId, Chunking, HashAlgorithm, ObjectKind, WIRE_VERSION};

    use super::*;

    fn block(tag: u8) -> Extent {
        Extent::Block {
            b: BlockId::of(HashAlgorithm::Sha256, &[tag]),
            n: 4096,
        }
    }

    fn manifest(extents: Vec<Extent>) -> Manifest {
        Manifest {
            version: WIRE_VERSION,
            kind: ObjectKind::Memory,
            hash: HashAlgorithm::Sha256,
            chunking: Chunking::FIXED_4K,
            size: extents.iter().map(Extent::len).sum(),
            extents,
        }
    }

    #[test]
    fn a_block_is_held_only_where_the_same_block_starts() {
        let m = manifest(vec![block(1), Extent::Zero { z: 8192 }, block(2)]);
        let l = Layout::of(&m);
        assert!(l.holds(0, &block(1)));
        assert!(!l.holds(0, &block(2)));
        assert!(l.holds(12288, &block(2)));
        // Inside another extent, or past the end.
        assert!(!l.holds(2048, &block(1)));
        assert!(!l.holds(16384, &block(2)));
    }

    #[test]
    fn zeros_are_held_where_nothing_but_zeros_lies() {
        let m = manifest(vec![block(1), Extent::Zero { z: 8192 }, block(2)]);
        let l = Layout::of(&m);
        assert!(l.holds(4096, &Extent::Zero { z: 8192 }));
        assert!(l.holds(8192, &Extent::Zero { z: 4096 }));
        assert!(!l.holds(4096, &Extent::Zero { z: 12288 }));
        assert!(!l.holds(0, &Extent::Zero { z: 4096 }));
        // An extension of the file reads as zeros.
        assert!(l.holds(16384, &Extent::Zero { z: 1 << 20 }));
        assert!(!l.holds(12288, &Extent::Zero { z: 1 << 20 }));
        let empty = manifest(vec![]);
        assert!(Layout::of(&empty).holds(0, &Extent::Zero { z: 4096 }));
        assert!(!Layout::of(&empty).holds(0, &block(1)));
    }
}
