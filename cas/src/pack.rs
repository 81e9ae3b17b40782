//! A pack: many blocks in one stored message with an index in front, as
//! rustic's packs are, so a pull moves one message and one set of
//! JetStream headers per pack instead of per 4 KiB block. Pure: written
//! and read here, stored by `store/packs.rs`.
//!
//! ```text
//! "VMP2"  u8 algorithm (1 SHA-1, 2 SHA-256)  u32 count
//! count × { 4 bytes: the start of the block's name  u8 encoding (0 raw, 1 zstd)  u32 size
//!           [u32 stored, zstd only: a raw block stores its size] }
//! the stored bytes of each block, in index order
//! ```
//!
//! Integers are little-endian. The index holds only the first
//! [`NAME_PREFIX`] bytes of each name: a block is checked against its full
//! name when it is taken out anyway, so the prefix only says which entry
//! to open (9 bytes an entry instead of the 41 of `VMP1`'s whole SHA-256
//! names: 0.3 MB less per 8 000 new 4 KiB blocks on every push and pull).
//! A pack is written by anyone, so a reader trusts nothing in it: the
//! index is bounded and must account for every byte, and each block is
//! checked against its own name when it is taken out ([`Pack::open`]).

use bytes::{BufMut, Bytes, BytesMut};
use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, HashAlgorithm, PackId, ids::Digest};

use crate::error::CasError;

pub const PACK_MAGIC: &[u8; 4] = b"VMP2";

/// Bytes of each block's name the index holds.
pub const NAME_PREFIX: usize = 4;

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
    let data_len: usize = stored.iter().map(|(_, b)| b.len()).sum();
    let mut out = BytesMut::with_capacity(9 + (NAME_PREFIX + 9) * blocks.len() + data_len);
    out.put_slice(PACK_MAGIC);
    out.put_u8(algorithm_code(hash));
    out.put_u32_le(blocks.len() as u32);
    for ((id, data), (encoding, bytes)) in blocks.iter().zip(&stored) {
        out.put_slice(&id.0.as_bytes()[..NAME_PREFIX]);
        out.put_u8(*encoding);
        out.put_u32_le(data.len() as u32);
        if *encoding == ZSTD {
            out.put_u32_le(bytes.len() as u32);
        }
    }
    for (_, bytes) in &stored {
        out.put_slice(bytes);
    }
    Ok(out.freeze())
}

/// One block's place in a pack.
#[derive(Clone, Debug)]
struct Entry {
    prefix: [u8; NAME_PREFIX],
    size: u32,
    encoding: u8,
    at: usize,
    stored: usize,
}

/// A pack read back: its index checked, its blocks still as stored.
#[derive(Debug)]
pub struct Pack {
    id: PackId,
    hash: HashAlgorithm,
    bytes: Bytes,
    entries: Vec<Entry>,
}

impl Pack {
    /// Reads pack `id`'s index. Refuses a pack of another algorithm than
    /// `hash` (the store's), and any index that is not exactly its bytes.
    pub fn parse(id: PackId, hash: HashAlgorithm, bytes: Bytes) -> Result<Pack, CasError> {
        let bad = |reason: String| CasError::BadPack { pack: id, reason };
        if bytes.len() < 9 || &bytes[..4] != PACK_MAGIC {
            return Err(bad("not a pack (no VMP2 magic)".into()));
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
        // Each entry's length is known from its encoding byte: the index is
        // read entry by entry, every length checked against what is left.
        let short = |i: usize| bad(format!("the index ends inside block {i}'s entry"));
        let mut entries = Vec::with_capacity(count);
        let mut pos = 9;
        let u32_at = |pos: usize| -> Option<u32> {
            bytes
                .get(pos..pos + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        for i in 0..count {
            let prefix: [u8; NAME_PREFIX] = bytes
                .get(pos..pos + NAME_PREFIX)
                .ok_or_else(|| short(i))?
                .try_into()
                .unwrap();
            let encoding = *bytes.get(pos + NAME_PREFIX).ok_or_else(|| short(i))?;
            let size = u32_at(pos + NAME_PREFIX + 1).ok_or_else(|| short(i))?;
            pos += NAME_PREFIX + 5;
            if size > MAX_BLOCK_BYTES || size == 0 {
                return Err(bad(format!("block {i} claims {size} bytes")));
            }
            let stored = match encoding {
                RAW => size as usize,
                ZSTD => {
                    let stored = u32_at(pos).ok_or_else(|| short(i))?;
                    pos += 4;
                    stored as usize
                }
                other => return Err(bad(format!("block {i} has unknown encoding {other}"))),
            };
            entries.push(Entry {
                prefix,
                size,
                encoding,
                at: 0,
                stored,
            });
        }
        // The blocks' bytes start where the index ends, known only now.
        let mut at = pos;
        for (i, entry) in entries.iter_mut().enumerate() {
            entry.at = at;
            at = at
                .checked_add(entry.stored)
                .filter(|end| *end <= bytes.len())
                .ok_or_else(|| bad(format!("block {i} runs past the pack's end")))?;
        }
        if at != bytes.len() {
            return Err(bad(format!("{} bytes after the last block", bytes.len() - at)));
        }
        Ok(Pack {
            id,
            hash,
            bytes,
            entries,
        })
    }

    pub fn id(&self) -> PackId {
        self.id
    }

    /// The names of the blocks that open, in index order (each decoded
    /// and hashed: the index holds only the start of each name).
    pub fn ids(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.blocks().filter_map(|(id, data)| data.ok().map(|_| id))
    }

    /// The pack's bytes as stored (what crossed the wire).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Block `block` taken out, decoded and checked against its name;
    /// `None` when no entry of the index starts with its name. Of several
    /// entries that do, the first that opens to `block`.
    pub fn open(&self, block: &BlockId) -> Option<Result<Bytes, CasError>> {
        let prefix = &block.0.as_bytes()[..NAME_PREFIX];
        let mut first_err = None;
        for entry in self.entries.iter().filter(|e| e.prefix == prefix) {
            match self.decode(entry, block) {
                Ok(data) => {
                    let actual = BlockId::of(block.algorithm(), &data);
                    if actual == *block {
                        return Some(Ok(data));
                    }
                    first_err.get_or_insert(CasError::CorruptBlock {
                        block: *block,
                        actual,
                    });
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map(Err)
    }

    /// Every block, decoded, with the name its bytes hash to (or why it
    /// did not decode, named by its index entry's prefix), in index order.
    pub fn blocks(&self) -> impl Iterator<Item = (BlockId, Result<Bytes, CasError>)> + '_ {
        self.entries.iter().map(|e| {
            let mut named = [0u8; 32];
            named[..NAME_PREFIX].copy_from_slice(&e.prefix);
            let placeholder = BlockId(match self.hash {
                HashAlgorithm::Sha1 => Digest::Sha1(named[..20].try_into().unwrap()),
                HashAlgorithm::Sha256 => Digest::Sha256(named),
            });
            match self.decode(e, &placeholder) {
                Ok(data) => (BlockId::of(self.hash, &data), Ok(data)),
                Err(err) => (placeholder, Err(err)),
            }
        })
    }

    /// An entry's bytes, decoded to the size the index gives (`block`
    /// names it in errors).
    fn decode(&self, e: &Entry, block: &BlockId) -> Result<Bytes, CasError> {
        let stored = self.bytes.slice(e.at..e.at + e.stored);
        let data = if e.encoding == ZSTD {
            let data =
                zstd::bulk::decompress(&stored, e.size as usize).map_err(|err| CasError::BlockEncoding {
                    block: *block,
                    reason: format!("in pack {}: {err}", self.id),
                })?;
            Bytes::from(data)
        } else {
            stored
        };
        if data.len() != e.size as usize {
            return Err(CasError::BlockEncoding {
                block: *block,
                reason: format!(
                    "in pack {}: {} bytes decoded, the index says {}",
                    self.id,
                    data.len(),
                    e.size
                ),
            });
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
        // The index: 9 bytes a raw block.
        let raw = encode(HashAlgorithm::Sha256, &blocks, None).unwrap();
        assert_eq!(raw.len(), 9 + 10 * (NAME_PREFIX + 5) + 10 * 4096);
        let compressed = encode(HashAlgorithm::Sha256, &blocks, Some(3)).unwrap();
        assert!(compressed.len() < 10 * 4096 / 2, "{}", compressed.len());
    }

    #[test]
    fn entries_whose_names_start_alike_are_told_apart_by_their_bytes() {
        let blocks = blocks(2, 4096);
        let mut bytes = encode(HashAlgorithm::Sha256, &blocks, None).unwrap().to_vec();
        // The second entry given the first one's prefix: both open by name.
        let first = bytes[9..9 + NAME_PREFIX].to_vec();
        let second = 9 + NAME_PREFIX + 5;
        bytes[second..second + NAME_PREFIX].copy_from_slice(&first);
        let pack = Pack::parse(PackId::new(), HashAlgorithm::Sha256, bytes.into()).unwrap();
        assert_eq!(&pack.open(&blocks[0].0).unwrap().unwrap(), &blocks[0].1);
        assert!(
            pack.open(&blocks[1].0).is_none(),
            "its prefix is gone from the index"
        );
        let mut named_like_first = blocks[1].0;
        if let Digest::Sha256(d) = &mut named_like_first.0 {
            d[..NAME_PREFIX].copy_from_slice(&first);
        }
        // A name the index's prefix matches but no entry's bytes hash to.
        assert!(matches!(
            pack.open(&named_like_first),
            Some(Err(CasError::CorruptBlock { .. }))
        ));
        assert_eq!(pack.ids().collect::<Vec<_>>(), vec![blocks[0].0, blocks[1].0]);
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
        // An index that ends inside an entry, or names an unknown encoding.
        assert!(reason(good[..9 + NAME_PREFIX + 2].to_vec()).contains("ends inside block 0"));
        let mut unknown = good.to_vec();
        unknown[9 + NAME_PREFIX] = 7;
        assert!(reason(unknown).contains("unknown encoding 7"));
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
        bomb.extend_from_slice(&id.0.as_bytes()[..NAME_PREFIX]);
        bomb.push(ZSTD);
        bomb.extend_from_slice(&4096u32.to_le_bytes());
        bomb.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        bomb.extend_from_slice(&packed);
        let pack = parse(bomb).unwrap();
        assert!(matches!(
            pack.open(&id),
            Some(Err(CasError::BlockEncoding { .. }))
        ));
    }
}
