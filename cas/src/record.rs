//! How a manifest is kept in the store. Its id is always the hash of its
//! canonical JSON ([`Manifest::canonical_bytes`]), but what is stored under
//! that id is one of three records:
//!
//! - the canonical JSON itself (the first format, still read);
//! - `VMZ1` and the canonical JSON compressed by zstd ([`encode_whole`]);
//! - `VMD1` and, compressed, the edits that turn another manifest (its
//!   base: the checkpoint this one grew from) into this one ([`Delta`]).
//!
//! A checkpoint's manifest lists every block of the machine's state, about
//! 17 000 names for a 128 MiB guest, while a segment changes a few hundred:
//! stored as edits, the next checkpoint's manifest costs what changed. A
//! reader rebuilds the canonical JSON from whichever record it finds and
//! checks it against the id, so a record cannot lie about what it names;
//! decompression stops at the manifest size limit, and a chain of bases is
//! followed at most [`MAX_CHAIN`] deep.

use std::io::Read;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmlot_schemas::{Chunking, Extent, HashAlgorithm, Manifest, ManifestError, ManifestId, ObjectKind};

/// Starts a zstd-compressed canonical manifest.
pub const WHOLE_MAGIC: &[u8; 4] = b"VMZ1";
/// Starts a zstd-compressed [`Delta`].
pub const DELTA_MAGIC: &[u8; 4] = b"VMD1";

/// Longest chain of bases a reader follows; a writer starts over with a
/// whole record well before it ([`WRITE_CHAIN`]).
pub const MAX_CHAIN: u32 = 64;
/// A writer stores a whole record instead of a delta whose base is this
/// many deltas deep already.
pub const WRITE_CHAIN: u32 = 16;

const ZSTD_LEVEL: i32 = 3;
/// Time the diff may take before it settles for a coarser edit list.
const DIFF_DEADLINE: Duration = Duration::from_millis(300);

/// A manifest as the edits from its base. Its header fields are the
/// manifest's own (they need not equal the base's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub base: ManifestId,
    pub version: u32,
    pub kind: ObjectKind,
    pub hash: HashAlgorithm,
    pub chunking: Chunking,
    pub size: u64,
    /// In order of `at`, none overlapping the one before.
    pub edits: Vec<Edit>,
}

/// Replace `del` extents of the base starting at index `at` with `ins`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub at: u32,
    pub del: u32,
    pub ins: Vec<Extent>,
}

/// A stored record, decoded but not yet checked against its id.
#[derive(Debug)]
pub enum Record {
    /// Canonical JSON bytes (stored as they are or decompressed).
    Whole(Vec<u8>),
    Delta(Delta),
}

/// Decodes a stored record; decompressed output over `max` bytes is refused.
pub fn decode(bytes: &[u8], max: u64) -> Result<Record, ManifestError> {
    if let Some(packed) = bytes.strip_prefix(WHOLE_MAGIC) {
        return Ok(Record::Whole(unpack(packed, max)?));
    }
    if let Some(packed) = bytes.strip_prefix(DELTA_MAGIC) {
        let json = unpack(packed, max)?;
        let delta: Delta = serde_json::from_slice(&json)
            .map_err(|e| ManifestError::Garbled(format!("manifest delta: {e}")))?;
        return Ok(Record::Delta(delta));
    }
    Ok(Record::Whole(bytes.to_vec()))
}

fn unpack(packed: &[u8], max: u64) -> Result<Vec<u8>, ManifestError> {
    let decoder = zstd::stream::read::Decoder::new(packed)
        .map_err(|e| ManifestError::Garbled(format!("manifest record: {e}")))?;
    let mut out = Vec::new();
    decoder
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| ManifestError::Garbled(format!("manifest record: {e}")))?;
    if out.len() as u64 > max {
        return Err(ManifestError::TooLarge {
            size: out.len() as u64,
            max,
        });
    }
    Ok(out)
}

fn pack(magic: &[u8; 4], bytes: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend(zstd::bulk::compress(bytes, ZSTD_LEVEL).expect("zstd compresses into a Vec"));
    out
}

/// The whole manifest, compressed.
pub fn encode_whole(manifest: &Manifest) -> Vec<u8> {
    encode_whole_bytes(&manifest.canonical_bytes())
}

/// The edits that turn `base` into `manifest`. On a fixed grid (disks,
/// a guest's RAM file) content stays at its offset, and an alignment by
/// byte offset is exact and linear. Otherwise (FastCDC, Xen records) the
/// cheaper of that and a Myers diff over the extents, which finds content
/// that moved, as FastCDC's blocks do after an insertion. Myers costs the
/// extents times the edits: a 128 MiB RAM file with 4 200 pages changed
/// spent its whole 300 ms deadline, most of a segment's upload, to find
/// what the alignment had found in a millisecond.
pub fn diff(base_id: ManifestId, base: &Manifest, manifest: &Manifest) -> Delta {
    let aligned = aligned(&base.extents, &manifest.extents);
    let cost = |edits: &[Edit]| edits.iter().map(|e| 1 + e.ins.len()).sum::<usize>();
    let on_grid = matches!(manifest.chunking, Chunking::Fixed { .. }) && manifest.chunking == base.chunking;
    let edits = if on_grid || aligned.is_empty() {
        aligned
    } else {
        let myers = myers(&base.extents, &manifest.extents);
        if cost(&aligned) <= cost(&myers) {
            aligned
        } else {
            myers
        }
    };
    Delta {
        base: base_id,
        version: manifest.version,
        kind: manifest.kind,
        hash: manifest.hash,
        chunking: manifest.chunking,
        size: manifest.size,
        edits,
    }
}

fn myers(base: &[Extent], new: &[Extent]) -> Vec<Edit> {
    let ops = similar::capture_diff_slices_deadline(
        similar::Algorithm::Myers,
        base,
        new,
        Some(Instant::now() + DIFF_DEADLINE),
    );
    let mut edits: Vec<Edit> = Vec::new();
    for op in ops {
        let (tag, old, range) = op.as_tag_tuple();
        if tag != similar::DiffTag::Equal {
            push_edit(&mut edits, old.start, old.len(), &new[range]);
        }
    }
    edits
}

/// Walks both lists by byte offset: an extent at the same offset with the
/// same content is kept, everything between two such is one edit.
fn aligned(base: &[Extent], new: &[Extent]) -> Vec<Edit> {
    let mut edits = Vec::new();
    let (mut i, mut j) = (0usize, 0usize);
    let (mut at_base, mut at_new) = (0u64, 0u64);
    while i < base.len() || j < new.len() {
        if i < base.len() && j < new.len() && at_base == at_new && base[i] == new[j] {
            at_base += base[i].len();
            at_new += new[j].len();
            i += 1;
            j += 1;
            continue;
        }
        let (from_i, from_j) = (i, j);
        loop {
            let base_left = i < base.len();
            let new_left = j < new.len();
            if base_left && (!new_left || at_base <= at_new) {
                at_base += base[i].len();
                i += 1;
            } else if new_left {
                at_new += new[j].len();
                j += 1;
            }
            let done = i == base.len() && j == new.len();
            let resync = i < base.len() && j < new.len() && at_base == at_new && base[i] == new[j];
            if done || resync {
                break;
            }
        }
        push_edit(&mut edits, from_i, i - from_i, &new[from_j..j]);
    }
    edits
}

/// Appends an edit, merged into the last one when they touch or overlap
/// (a diff may report an insertion at the start of the range it has just
/// deleted: the inserted extents still come after the last edit's).
fn push_edit(edits: &mut Vec<Edit>, at: usize, del: usize, ins: &[Extent]) {
    match edits.last_mut() {
        Some(last) if at <= (last.at + last.del) as usize => {
            let end = (at + del).max((last.at + last.del) as usize);
            last.del = (end - last.at as usize) as u32;
            last.ins.extend_from_slice(ins);
        }
        _ => edits.push(Edit {
            at: at as u32,
            del: del as u32,
            ins: ins.to_vec(),
        }),
    }
}

/// The smaller of the whole record and, given a base, the delta record.
pub fn encode_best(manifest: &Manifest, base: Option<(ManifestId, &Manifest)>) -> Vec<u8> {
    let whole = encode_whole(manifest);
    let Some((base_id, base)) = base else {
        return whole;
    };
    let delta = diff(base_id, base, manifest);
    // A writer never stores a record it cannot read back.
    if delta.apply(base).as_ref() != Ok(manifest) {
        tracing::warn!(base = %base_id, "a manifest delta did not rebuild its manifest; storing it whole");
        return whole;
    }
    let delta = encode_delta(&delta);
    if delta.len() < whole.len() { delta } else { whole }
}

/// A delta record.
pub fn encode_delta(delta: &Delta) -> Vec<u8> {
    pack(
        DELTA_MAGIC,
        &serde_json::to_vec(delta).expect("a delta serializes"),
    )
}

/// A whole record of any bytes (tests plant bad ones with it).
pub fn encode_whole_bytes(bytes: &[u8]) -> Vec<u8> {
    pack(WHOLE_MAGIC, bytes)
}

impl Delta {
    /// The manifest these edits make of `base` (not yet checked against
    /// any id: the caller does that).
    pub fn apply(&self, base: &Manifest) -> Result<Manifest, ManifestError> {
        let garbled = |what: String| ManifestError::Garbled(format!("manifest delta: {what}"));
        let mut extents = Vec::with_capacity(base.extents.len());
        let mut cursor = 0usize;
        for edit in &self.edits {
            let at = edit.at as usize;
            let end = at
                .checked_add(edit.del as usize)
                .filter(|&end| at >= cursor && end <= base.extents.len())
                .ok_or_else(|| {
                    garbled(format!(
                        "edit at {} deleting {} does not fit after {cursor} in a base of {} extents",
                        edit.at,
                        edit.del,
                        base.extents.len()
                    ))
                })?;
            extents.extend_from_slice(&base.extents[cursor..at]);
            extents.extend_from_slice(&edit.ins);
            cursor = end;
        }
        extents.extend_from_slice(&base.extents[cursor..]);
        Ok(Manifest {
            version: self.version,
            kind: self.kind,
            hash: self.hash,
            chunking: self.chunking,
            size: self.size,
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use vmlot_schemas::BlockId;

    use super::*;

    fn block(n: u32) -> Extent {
        Extent::Block {
            b: BlockId::of(HashAlgorithm::Sha256, &n.to_le_bytes()),
            n: 4096,
        }
    }

    fn manifest(extents: Vec<Extent>) -> Manifest {
        Manifest {
            version: 1,
            kind: ObjectKind::MachineState,
            hash: HashAlgorithm::Sha256,
            chunking: Chunking::FIXED_4K,
            size: extents.iter().map(Extent::len).sum(),
            extents,
        }
    }

    /// A checkpoint of 20 000 blocks and zero runs, and the next one with
    /// 300 blocks changed, a zero run filled and a block zeroed.
    fn pair() -> (Manifest, Manifest) {
        let a: Vec<Extent> = (0..20_000)
            .map(|i| {
                if i % 7 == 3 {
                    Extent::Zero { z: 4096 }
                } else {
                    block(i)
                }
            })
            .collect();
        let mut b = a.clone();
        for i in (0..20_000).step_by(67) {
            b[i] = block(1_000_000 + i as u32);
        }
        b[10] = block(2_000_000);
        b[17] = Extent::Zero { z: 4096 };
        (manifest(a), manifest(b))
    }

    fn rebuilt(record: &[u8], base: &Manifest, id: &ManifestId) -> Manifest {
        let manifest = match decode(record, 1 << 30).unwrap() {
            Record::Whole(bytes) => Manifest::decode(&bytes, id).unwrap(),
            Record::Delta(delta) => delta.apply(base).unwrap(),
        };
        Manifest::decode(&manifest.canonical_bytes(), id).unwrap()
    }

    #[test]
    fn a_delta_costs_what_changed_and_rebuilds_the_manifest() {
        let (a, b) = pair();
        let whole = encode_whole(&b);
        let best = encode_best(&b, Some((a.id(), &a)));
        assert!(best.starts_with(DELTA_MAGIC));
        assert!(
            best.len() * 20 < whole.len(),
            "delta {} bytes against whole {}",
            best.len(),
            whole.len()
        );
        let back = rebuilt(&best, &a, &b.id());
        assert_eq!(back, b);
        assert_eq!(back.id(), b.id());
    }

    #[test]
    fn both_diffs_rebuild_the_manifest_exactly() {
        let (a, b) = pair();
        // Content that moved: an extent inserted near the start shifts
        // every offset after it; Myers finds the rest unchanged.
        let mut shifted = b.extents.clone();
        shifted.insert(5, block(3_000_000));
        let shifted = manifest(shifted);
        // The same edits on content-defined blocks, where content moves.
        let cdc = |m: &Manifest| Manifest {
            chunking: Chunking::FASTCDC_16K,
            ..m.clone()
        };
        // Most of the object changed: the alignment stays exact.
        let mut most = a.extents.clone();
        for (i, e) in most.iter_mut().enumerate() {
            if i % 5 != 0 {
                *e = block(4_000_000 + i as u32);
            }
        }
        let most = manifest(most);
        for target in [&b, &shifted, &most, &a] {
            for edits in [
                myers(&a.extents, &target.extents),
                aligned(&a.extents, &target.extents),
            ] {
                let delta = Delta {
                    edits,
                    ..diff(a.id(), &a, target)
                };
                assert_eq!(&delta.apply(&a).unwrap(), target);
            }
        }
        let cost_over = |base: &Manifest, m: &Manifest| {
            diff(base.id(), base, m)
                .edits
                .iter()
                .map(|e| e.ins.len())
                .sum::<usize>()
        };
        let cost = |m: &Manifest| cost_over(&a, m);
        let (ca, cb, cshifted) = (cdc(&a), cdc(&b), cdc(&shifted));
        assert_eq!(
            cost_over(&ca, &cshifted),
            cost_over(&ca, &cb) + 1,
            "Myers finds what moved"
        );
        // On a fixed grid the alignment alone is used: the shifted blocks
        // all count as changed.
        assert!(cost(&shifted) > 10_000, "{}", cost(&shifted));
        assert!(cost(&most) <= 16_000, "{}", cost(&most));
        assert!(diff(a.id(), &a, &a).edits.is_empty());
    }

    #[test]
    fn unrelated_manifests_are_stored_whole() {
        let (a, _) = pair();
        let other = manifest((5_000_000..5_020_000).map(block).collect());
        let best = encode_best(&other, Some((a.id(), &a)));
        assert!(best.starts_with(WHOLE_MAGIC));
        let Record::Whole(bytes) = decode(&best, 1 << 30).unwrap() else {
            panic!("whole record expected")
        };
        assert_eq!(Manifest::decode(&bytes, &other.id()).unwrap(), other);
    }

    #[test]
    fn the_first_format_reads_as_it_is() {
        let (a, _) = pair();
        let Record::Whole(bytes) = decode(&a.canonical_bytes(), 1 << 30).unwrap() else {
            panic!("whole record expected")
        };
        assert_eq!(bytes, a.canonical_bytes());
    }

    #[test]
    fn decompression_stops_at_the_limit() {
        let (a, _) = pair();
        let record = encode_whole(&a);
        let limit = a.canonical_bytes().len() as u64 - 1;
        assert!(matches!(
            decode(&record, limit),
            Err(ManifestError::TooLarge { .. })
        ));
        let mut garbage = DELTA_MAGIC.to_vec();
        garbage.extend_from_slice(b"not zstd at all");
        assert!(matches!(
            decode(&garbage, 1 << 30),
            Err(ManifestError::Garbled(_))
        ));
    }

    #[test]
    fn edits_out_of_order_or_past_the_base_are_refused() {
        let (a, b) = pair();
        let mut delta = diff(a.id(), &a, &b);
        assert!(delta.edits.len() > 2);
        delta.edits.swap(0, 1);
        assert!(matches!(delta.apply(&a), Err(ManifestError::Garbled(_))));
        let past = Delta {
            edits: vec![Edit {
                at: a.extents.len() as u32,
                del: 1,
                ins: vec![],
            }],
            ..diff(a.id(), &a, &b)
        };
        assert!(matches!(past.apply(&a), Err(ManifestError::Garbled(_))));
        let overflow = Delta {
            edits: vec![Edit {
                at: u32::MAX,
                del: u32::MAX,
                ins: vec![],
            }],
            ..diff(a.id(), &a, &b)
        };
        assert!(matches!(overflow.apply(&a), Err(ManifestError::Garbled(_))));
    }

    #[test]
    fn an_insertion_reported_inside_the_range_just_deleted_joins_that_edit() {
        // Seen from the Myers diff on an `xl save` checkpoint (bench-xen):
        // a delete of base[5..6), then an insertion at old index 5.
        let (base, _) = pair();
        let (x, y) = (block(900_001), block(900_002));
        let mut edits = Vec::new();
        push_edit(&mut edits, 5, 1, &[x]);
        push_edit(&mut edits, 5, 0, &[y]);
        assert_eq!(edits.len(), 1);
        assert_eq!((edits[0].at, edits[0].del), (5, 1));
        let delta = Delta {
            base: base.id(),
            version: base.version,
            kind: base.kind,
            hash: base.hash,
            chunking: base.chunking,
            size: base.size - base.extents[5].len() + x.len() + y.len(),
            edits,
        };
        let rebuilt = delta.apply(&base).unwrap();
        assert_eq!(&rebuilt.extents[4..8], &[base.extents[4], x, y, base.extents[6]]);
    }
}
