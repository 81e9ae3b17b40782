//! A pack: many blocks in one stored message with an index in front, as
//! rustic's packs are, so a pull moves one message and one set of
//! JetStream headers per pack instead of per 4 KiB block. Pure: written
//! and read here, stored by `store/packs.rs`.
//!
//! ```text
//! "VMP1"  u8 algorithm (1 SHA-1, 2 SHA-256)  u32 count
//! count × { digest (20 or 32 bytes)  u32 size  u32 stored  u8 encoding (0 raw, 1 zstd) }
//! the stored bytes of each block, in index order
//! ```
//!
//! Integers are little-endian. A pack is written by anyone, so a reader
//! trusts nothing in it: the index is bounded and must account for every
//! byte, and each block is checked against its own name when it is taken
//! out ([`Pack::open`]).

use bytes::{BufMut, Bytes, BytesMut};
use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, HashAlgorithm, PackId, ids::Digest};

use crate::error::CasError;

pub const PACK_MAGIC: &[u8; 4] = b"VMP1";

/// Block bytes a writer puts in one pack before it starts another: large
/// enough that a pack's headers are noise, small enough that a reader who
/// wants one block of it does not fetch much else.
pub const PACK_TARGET_BYTES: usize = 256 * 1024;

/// Most blocks a writer puts in one pack (tiny Xen records would
/// otherwise make packs of thousands, each with its pointer).
pub const PACK_BLOCKS: usize = 256;

/// Most blocks a reader accepts in one pack.
pub const MAX_PACK_BLOCKS: usize = 4096;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

fn algorithm_code(hash: HashAlgorithm) -> u8 {
    match hash {
        HashAlgorithm::Sha1 => 1,
        HashAlgorithm::Sha256 => 2,
    }
}

fn digest_len(hash: HashAlgorithm) -> usize {
    hash.hex_len() / 2
}

/// Cuts `blocks` into packs of about [`PACK_TARGET_BYTES`] and at most
/// `max_blocks` blocks (and [`PACK_BLOCKS`]) each, in order.
pub fn plan(blocks: &[(BlockId, Bytes)], max_blocks: usize) -> Vec<std::ops::Range<usize>> {
    let max_blocks = max_blocks.clamp(1, PACK_BLOCKS);
    let mut packs = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, (_, data)) in blocks.iter().enumerate() {
        if i > start && (bytes + data.len() > PACK_TARGET_BYTES || i - start == max_blocks) {
            packs.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += data.len();
    }
    if start < blocks.len() {
        packs.push(start..blocks.len());
    }
    packs
}

/// Writes one pack of `blocks` (all named by `hash`), each compressed at
/// `level` when that saves more than a few bytes. CPU work: call it off
/// the async workers.
pub fn encode(
    hash: HashAlgorithm,
    blocks: &[(BlockId, Bytes)],
    level: Option<i32>,
) -> Result<Bytes, CasError> {
    let mut stored: Vec<(u8, Bytes)> = Vec::with_capacity(blocks.len());
    for (id, data) in blocks {
        let packed = match level {
            Some(level) => Some(
                zstd::bulk::compress(data, level).map_err(|e| CasError::BlockEncoding {
                    block: *id,
                    reason: e.to_string(),
                })?,
            ),
            None => None,
        };
        stored.push(match packed {
            Some(packed) if packed.len() + 16 < data.len() => (ZSTD, packed.into()),
            _ => (RAW, data.clone()),
        });
    }
    let entry = digest_len(hash) + 9;
    let data_len: usize = stored.iter().map(|(_, b)| b.len()).sum();
    let mut out = BytesMut::with_capacity(9 + entry * blocks.len() + data_len);
    out.put_slice(PACK_MAGIC);
    out.put_u8(algorithm_code(hash));
    out.put_u32_le(blocks.len() as u32);
    for ((id, data), (encoding, bytes)) in blocks.iter().zip(&stored) {
        out.put_slice(id.0.as_bytes());
        out.put_u32_le(data.len() as u32);
        out.put_u32_le(bytes.len() as u32);
        out.put_u8(*encoding);
    }
    for (_, bytes) in &stored {
        out.put_slice(bytes);
    }
    Ok(out.freeze())
}

/// One block's place in a pack.
#[derive(Clone, Debug)]
struct Entry {
    id: BlockId,
    size: u32,
    encoding: u8,
    at: usize,
    stored: usize,
}

/// A pack read back: its index checked, its blocks still as stored.
#[derive(Debug)]
pub struct Pack {
    id: PackId,
    bytes: Bytes,
    entries: Vec<Entry>,
}

impl Pack {
    /// Reads pack `id`'s index. Refuses a pack of another algorithm than
    /// `hash` (the store's), and any index that is not exactly its bytes.
    pub fn parse(id: PackId, hash: HashAlgorithm, bytes: Bytes) -> Result<Pack, CasError> {
        let bad = |reason: String| CasError::BadPack { pack: id, reason };
        if bytes.len() < 9 || &bytes[..4] != PACK_MAGIC {
            return Err(bad("not a pack (no VMP1 magic)".into()));
        }
        if bytes[4] != algorithm_code(hash) {
            return Err(bad(format!(
                "its blocks are not named by {hash}, the store's algorithm"
            )));
        }
        let count = u32::from_le_bytes(bytes[5..9].try_into().unwrap()) as usize;
        if count == 0 || count > MAX_PACK_BLOCKS {
            return Err(bad(format!("{count} blocks (1 to {MAX_PACK_BLOCKS} allowed)")));
        }
        let dlen = digest_len(hash);
        let entry = dlen + 9;
        let index_end = 9 + count * entry;
        if bytes.len() < index_end {
            return Err(bad(format!(
                "{} bytes cannot hold an index of {count} blocks",
                bytes.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        let mut at = index_end;
        for i in 0..count {
            let e = &bytes[9 + i * entry..9 + (i + 1) * entry];
            let digest = match hash {
                HashAlgorithm::Sha1 => Digest::Sha1(e[..dlen].try_into().unwrap()),
                HashAlgorithm::Sha256 => Digest::Sha256(e[..dlen].try_into().unwrap()),
            };
            let size = u32::from_le_bytes(e[dlen..dlen + 4].try_into().unwrap());
            let stored = u32::from_le_bytes(e[dlen + 4..dlen + 8].try_into().unwrap()) as usize;
            let encoding = e[dlen + 8];
            if size > MAX_BLOCK_BYTES || size == 0 {
                return Err(bad(format!("block {i} claims {size} bytes")));
            }
            if encoding != RAW && encoding != ZSTD {
                return Err(bad(format!("block {i} has unknown encoding {encoding}")));
            }
            if encoding == RAW && stored != size as usize {
                return Err(bad(format!("raw block {i} stores {stored} bytes for {size}")));
            }
            entries.push(Entry {
                id: BlockId(digest),
                size,
                encoding,
                at,
                stored,
            });
            at = at
                .checked_add(stored)
                .filter(|end| *end <= bytes.len())
                .ok_or_else(|| bad(format!("block {i} runs past the pack's end")))?;
        }
        if at != bytes.len() {
            return Err(bad(format!("{} bytes after the last block", bytes.len() - at)));
        }
        Ok(Pack { id, bytes, entries })
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    /// The blocks the index names, in order.
    pub fn ids(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.entries.iter().map(|e| e.id)
    }

    /// The pack's bytes as stored (what crossed the wire).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Block `block` taken out, decoded and checked against its name;
    /// `None` when the index does not name it.
    pub fn open(&self, block: &BlockId) -> Option<Result<Bytes, CasError>> {
        let entry = self.entries.iter().find(|e| e.id == *block)?;
        Some(self.open_entry(entry))
    }

    /// Every block, decoded and checked, in index order.
    pub fn blocks(&self) -> impl Iterator<Item = (BlockId, Result<Bytes, CasError>)> + '_ {
        self.entries.iter().map(|e| (e.id, self.open_entry(e)))
    }

    fn open_entry(&self, e: &Entry) -> Result<Bytes, CasError> {
        let stored = self.bytes.slice(e.at..e.at + e.stored);
        let data = if e.encoding == ZSTD {
            let data =
                zstd::bulk::decompress(&stored, e.size as usize).map_err(|err| CasError::BlockEncoding {
                    block: e.id,
                    reason: format!("in pack {}: {err}", self.id),
                })?;
            Bytes::from(data)
        } else {
            stored
        };
        if data.len() != e.size as usize {
            return Err(CasError::BlockEncoding {
                block: e.id,
                reason: format!(
                    "in pack {}: {} bytes decoded, the index says {}",
                    self.id,
                    data.len(),
                    e.size
                ),
            });
        }
        let actual = BlockId::of(e.id.algorithm(), &data);
        if actual != e.id {
            return Err(CasError::CorruptBlock { block: e.id, actual });
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(n: usize, size: usize) -> Vec<(BlockId, Bytes)> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..size).map(|j| ((i * 31 + j / 7) % 251) as u8).collect();
                (BlockId::of(HashAlgorithm::Sha256, &data), Bytes::from(data))
            })
            .collect()
    }

    #[test]
    fn a_pack_gives_back_every_block_raw_or_compressed() {
        let blocks = blocks(10, 4096);
        for level in [None, Some(3)] {
            let bytes = encode(HashAlgorithm::Sha256, &blocks, level).unwrap();
            let pack = Pack::parse(PackId::new(), HashAlgorithm::Sha256, bytes).unwrap();
            assert_eq!(
                pack.ids().collect::<Vec<_>>(),
                blocks.iter().map(|b| b.0).collect::<Vec<_>>()
            );
            for (id, data) in &blocks {
                assert_eq!(&pack.open(id).unwrap().unwrap(), data);
            }
            let other = BlockId::of(HashAlgorithm::Sha256, b"not here");
            assert!(pack.open(&other).is_none());
        }
        let compressed = encode(HashAlgorithm::Sha256, &blocks, Some(3)).unwrap();
        assert!(compressed.len() < 10 * 4096 / 2, "{}", compressed.len());
    }

    #[test]
    fn packs_are_planned_by_bytes() {
        let small = blocks(200, 4096);
        let plan = plan(&small, 1000);
        assert_eq!(
            plan.iter().map(|r| r.len()).collect::<Vec<_>>(),
            vec![64, 64, 64, 8]
        );
        assert_eq!(plan.last().unwrap().end, 200);
        // Tiny blocks: at most PACK_BLOCKS, or fewer when asked.
        let tiny = blocks(600, 100);
        let sizes = |p: Vec<std::ops::Range<usize>>| p.iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(sizes(super::plan(&tiny, 1000)), vec![256, 256, 88]);
        assert_eq!(sizes(super::plan(&tiny[..10], 4)), vec![4, 4, 2]);
        // A block over the target still gets a pack of its own.
        let big = blocks(2, PACK_TARGET_BYTES + 1);
        assert_eq!(super::plan(&big, 1000), vec![0..1, 1..2]);
        assert!(super::plan(&[], 1000).is_empty());
    }

    #[test]
    fn a_lying_pack_is_refused_by_name() {
        let blocks = blocks(3, 4096);
        let good = encode(HashAlgorithm::Sha256, &blocks, None).unwrap();
        let parse = |b: Vec<u8>| Pack::parse(PackId::new(), HashAlgorithm::Sha256, b.into());
        let reason = |b: Vec<u8>| match parse(b) {
            Err(CasError::BadPack { reason, .. }) => reason,
            other => panic!("expected a bad pack, got {other:?}"),
        };
        assert!(reason(b"garbage".to_vec()).contains("magic"));
        assert!(reason(good[..good.len() - 1].to_vec()).contains("past the pack's end"));
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(reason(longer).contains("after the last block"));
        let mut many = good.to_vec();
        many[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(reason(many).contains("blocks (1 to"));
        let mut sha1 = good.to_vec();
        sha1[4] = 1;
        assert!(reason(sha1).contains("not named by sha256"));
        // A block's bytes changed: the index parses, the block does not open.
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let pack = parse(flipped).unwrap();
        assert!(matches!(
            pack.open(&blocks[2].0),
            Some(Err(CasError::CorruptBlock { .. }))
        ));
        assert_eq!(&pack.open(&blocks[0].0).unwrap().unwrap(), &blocks[0].1);
        // A zstd block that unpacks past its size.
        let big = vec![7u8; 64 * 1024];
        let id = BlockId::of(HashAlgorithm::Sha256, &big[..4096]);
        let packed = zstd::bulk::compress(&big, 3).unwrap();
        let mut bomb = Vec::new();
        bomb.extend_from_slice(PACK_MAGIC);
        bomb.push(2);
        bomb.extend_from_slice(&1u32.to_le_bytes());
        bomb.extend_from_slice(id.0.as_bytes());
        bomb.extend_from_slice(&4096u32.to_le_bytes());
        bomb.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        bomb.push(ZSTD);
        bomb.extend_from_slice(&packed);
        let pack = parse(bomb).unwrap();
        assert!(matches!(
            pack.open(&id),
            Some(Err(CasError::BlockEncoding { .. }))
        ));
    }
}
