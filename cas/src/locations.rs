//! Where a manifest's blocks are: for each of its distinct blocks, in the
//! manifest's order, the pack that holds it (or none known). Its writer
//! leaves it beside the manifest so a reader can fetch whole packs without
//! asking block by block; it is a hint, never trusted: every block taken
//! from a pack is checked against its name, and a block the hint misplaces
//! is looked up by its own name. Pure.
//!
//! ```text
//! "VML1"  zstd( u32 packs  packs × 16-byte id  u32 runs  runs × { u32 pack index + 1 (0: none)  u32 length } )
//! ```

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use vmlot_schemas::{BlockId, Manifest, PackId};

pub const LOCATIONS_MAGIC: &[u8; 4] = b"VML1";

/// Largest record a reader unpacks (a 1 GiB guest's 262 144 blocks in
/// scattered packs take 2 MiB).
pub const MAX_LOCATIONS_BYTES: usize = 16 << 20;

/// The record of `manifest`'s blocks at `at` (blocks it does not place
/// are left unplaced); `None` when it would place none.
pub fn encode(manifest: &Manifest, at: &HashMap<BlockId, PackId>) -> Option<Bytes> {
    let mut packs: Vec<PackId> = Vec::new();
    let mut index: HashMap<PackId, u32> = HashMap::new();
    let mut runs: Vec<(u32, u32)> = Vec::new();
    let mut placed = false;
    for (block, _) in manifest.unique_blocks() {
        let code = match at.get(&block) {
            Some(pack) => {
                placed = true;
                *index.entry(*pack).or_insert_with(|| {
                    packs.push(*pack);
                    packs.len() as u32
                })
            }
            None => 0,
        };
        match runs.last_mut() {
            Some((last, n)) if *last == code => *n += 1,
            _ => runs.push((code, 1)),
        }
    }
    if !placed {
        return None;
    }
    let mut raw = BytesMut::with_capacity(8 + packs.len() * 16 + runs.len() * 8);
    raw.put_u32_le(packs.len() as u32);
    for pack in &packs {
        raw.put_slice(pack.0.as_bytes());
    }
    raw.put_u32_le(runs.len() as u32);
    for (code, n) in runs {
        raw.put_u32_le(code);
        raw.put_u32_le(n);
    }
    let packed = zstd::bulk::compress(&raw, 3).ok()?;
    let mut out = BytesMut::with_capacity(4 + packed.len());
    out.put_slice(LOCATIONS_MAGIC);
    out.put_slice(&packed);
    Some(out.freeze())
}

/// Reads a record written for `manifest`: the pack of each block it
/// places. A record that does not fit the manifest (another's, garbage,
/// too large) reads as the reason why.
pub fn decode(manifest: &Manifest, bytes: &[u8]) -> Result<HashMap<BlockId, PackId>, String> {
    let body = bytes
        .strip_prefix(LOCATIONS_MAGIC)
        .ok_or("not a locations record (no VML1 magic)")?;
    let raw =
        zstd::bulk::decompress(body, MAX_LOCATIONS_BYTES).map_err(|e| format!("does not unpack: {e}"))?;
    let mut raw = &raw[..];
    let take_u32 = |raw: &mut &[u8]| -> Result<u32, String> {
        if raw.remaining() < 4 {
            return Err("ends early".into());
        }
        Ok(raw.get_u32_le())
    };
    let packs_n = take_u32(&mut raw)? as usize;
    if raw.remaining() < packs_n.saturating_mul(16) {
        return Err(format!("ends inside its {packs_n} pack ids"));
    }
    let mut packs = Vec::with_capacity(packs_n);
    for _ in 0..packs_n {
        let mut id = [0u8; 16];
        raw.copy_to_slice(&mut id);
        packs.push(PackId(uuid::Uuid::from_bytes(id)));
    }
    let runs_n = take_u32(&mut raw)? as usize;
    if raw.remaining() != runs_n.saturating_mul(8) {
        return Err(format!("{} bytes left for {runs_n} runs", raw.remaining()));
    }
    let blocks = manifest.unique_blocks();
    let mut at = HashMap::new();
    let mut next = 0usize;
    for _ in 0..runs_n {
        let code = raw.get_u32_le() as usize;
        let n = raw.get_u32_le() as usize;
        let end = next
            .checked_add(n)
            .filter(|end| *end <= blocks.len() && n > 0)
            .ok_or_else(|| format!("a run of {n} past the manifest's {} blocks", blocks.len()))?;
        if code > packs.len() {
            return Err(format!("pack {code} of {}", packs.len()));
        }
        if code > 0 {
            for (block, _) in &blocks[next..end] {
                at.insert(*block, packs[code - 1]);
            }
        }
        next = end;
    }
    if next != blocks.len() {
        return Err(format!("places {next} of the manifest's {} blocks", blocks.len()));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::{Chunking, Extent, HashAlgorithm, ObjectKind, WIRE_VERSION};

    fn manifest(n: u32) -> Manifest {
        let extents = (0..n)
            .map(|i| Extent::Block {
                b: BlockId::of(HashAlgorithm::Sha256, &i.to_le_bytes()),
                n: 4096,
            })
            .collect();
        Manifest {
            version: WIRE_VERSION,
            kind: ObjectKind::Disk,
            hash: HashAlgorithm::Sha256,
            chunking: Chunking::FIXED_4K,
            size: n as u64 * 4096,
            extents,
        }
    }

    #[test]
    fn a_record_places_what_its_writer_placed() {
        let m = manifest(1000);
        let blocks = m.unique_blocks();
        let (p, q) = (PackId::new(), PackId::new());
        let mut at = HashMap::new();
        for (i, (b, _)) in blocks.iter().enumerate() {
            match i {
                0..400 => at.insert(*b, p),
                500..900 => at.insert(*b, q),
                _ => None,
            };
        }
        let bytes = encode(&m, &at).unwrap();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(decode(&m, &bytes).unwrap(), at);
        assert!(encode(&m, &HashMap::new()).is_none());
    }

    #[test]
    fn a_record_for_another_manifest_or_garbage_is_refused() {
        let m = manifest(100);
        let at: HashMap<_, _> = m
            .unique_blocks()
            .into_iter()
            .map(|(b, _)| (b, PackId::new()))
            .collect();
        let bytes = encode(&m, &at).unwrap();
        assert!(
            decode(&manifest(50), &bytes)
                .unwrap_err()
                .contains("past the manifest")
        );
        assert!(decode(&manifest(200), &bytes).unwrap_err().contains("places 100"));
        assert!(
            decode(&m, b"VML1garbage")
                .unwrap_err()
                .contains("does not unpack")
        );
        assert!(decode(&m, b"nope").unwrap_err().contains("magic"));
        // A bomb: a tiny record that unpacks past the limit.
        let huge = vec![0u8; MAX_LOCATIONS_BYTES + 1];
        let mut bomb = LOCATIONS_MAGIC.to_vec();
        bomb.extend(zstd::bulk::compress(&huge, 3).unwrap());
        assert!(decode(&m, &bomb).is_err());
    }
}
