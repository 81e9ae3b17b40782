//! The manifest of a content-addressed object: which blocks, in which order,
//! make up an image part, a disk or a saved machine state.
//!
//! Runs of zero bytes (all-zero blocks and sparse holes alike) are extents of
//! their own, never stored or listed block by block. The manifest names its
//! hash algorithm (SHA-1 or SHA-256), every block in it is named by that
//! one, and its id is the hash by that one of its canonical JSON bytes
//! (`serde_json` compact output of this struct, fields in declaration
//! order); a reader re-encodes what it decoded to check the bytes were
//! canonical.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::ids::HashAlgorithm;
use crate::ids::{BlockId, ManifestId};
use crate::wire::WIRE_VERSION;

/// Largest manifest a reader accepts, checked before decoding. A 4 KiB-block
/// manifest costs about 60 bytes per block, so this covers objects of ~8 GiB.
pub const MAX_MANIFEST_BYTES: u64 = 128 << 20;

/// Largest single block: FastCDC's maximum chunk is well below this.
pub const MAX_BLOCK_BYTES: u32 = 1 << 20;

/// What an object is; informs nothing in the store, helps people and checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Kernel,
    Initrd,
    Disk,
    /// A hypervisor's saved machine state (QEMU migration file, `xl save` file).
    MachineState,
    /// A guest's RAM kept apart from its machine state (see
    /// `Checkpoint::memory`).
    Memory,
    /// Anything else (tarballs, test data).
    Blob,
}

/// How the object was cut into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Chunking {
    /// Fixed-size blocks (4 KiB fits file systems and mapped-ram RAM).
    Fixed { size: u32 },
    /// Content-defined chunking (FastCDC 2020) for objects with no natural grid.
    Fastcdc { min: u32, avg: u32, max: u32 },
    /// An `xl save` file cut along its migration-stream records: one block
    /// per guest page (the page bytes exactly, wherever the stream put
    /// them), the bytes between pages in blocks of at most `max`, and fixed
    /// 4 KiB blocks from wherever the stream stops parsing.
    XenRecords { max: u32 },
}

impl Chunking {
    /// Fixed 4 KiB blocks.
    pub const FIXED_4K: Chunking = Chunking::Fixed { size: 4096 };
    /// FastCDC with a 16 KiB average.
    pub const FASTCDC_16K: Chunking = Chunking::Fastcdc {
        min: 4096,
        avg: 16384,
        max: 65536,
    };
    /// `xl save` records, non-page stretches cut at 64 KiB.
    pub const XEN_RECORDS: Chunking = Chunking::XenRecords { max: 65536 };

    /// The guest page size the Xen record chunker needs to fit in a block
    /// (x86 Xen saves 4 KiB pages; the fallback also cuts 4 KiB blocks).
    pub const XEN_MIN_BLOCK: u32 = 4096;

    /// The longest block this chunking can produce.
    pub fn max_block(&self) -> u32 {
        match *self {
            Chunking::Fixed { size } => size,
            Chunking::Fastcdc { max, .. } => max,
            Chunking::XenRecords { max } => max,
        }
    }
}

/// One piece of the object, in order. (Ordered only so that sequence
/// diffs can sort them.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Extent {
    /// A stored block `b` of `n` bytes.
    Block { b: BlockId, n: u32 },
    /// `z` zero bytes (all-zero blocks or a sparse hole), not stored.
    Zero { z: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Block { n, .. } => n as u64,
            Extent::Zero { z } => z,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ordered list of extents that make up an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub kind: ObjectKind,
    pub hash: HashAlgorithm,
    pub chunking: Chunking,
    /// Total size in bytes: the sum of the extents' lengths.
    pub size: u64,
    pub extents: Vec<Extent>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {size} bytes, over the {max}-byte limit")]
    TooLarge { size: u64, max: u64 },
    #[error("manifest bytes hash to {actual}, not to its id {expected}")]
    IdMismatch {
        expected: ManifestId,
        actual: ManifestId,
    },
    #[error("manifest is not valid JSON of the expected shape: {0}")]
    Garbled(String),
    #[error("manifest bytes are not in canonical form")]
    NotCanonical,
    #[error("manifest version {0} is not supported (this build speaks {1})")]
    Version(u32, u32),
    #[error("hash algorithm {0:?} is not supported")]
    UnsupportedHash(String),
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
}

impl Manifest {
    /// Canonical bytes: the id is the hash of exactly these.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    /// The manifest id (hash of the canonical bytes by its own algorithm).
    pub fn id(&self) -> ManifestId {
        ManifestId::of(self.hash, &self.canonical_bytes())
    }

    /// Decodes stored manifest bytes that claim to be `expected`: size limit
    /// first, then the hash, then the shape, canonical form and consistency.
    pub fn decode(bytes: &[u8], expected: &ManifestId) -> Result<Manifest, ManifestError> {
        let size = bytes.len() as u64;
        if size > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size,
                max: MAX_MANIFEST_BYTES,
            });
        }
        // Name the hash problem before the id, so a manifest from a newer
        // build that uses another algorithm gets the clearer error.
        let peek: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Garbled(e.to_string()))?;
        if let Some(h) = peek.get("hash").and_then(|h| h.as_str())
            && h.parse::<HashAlgorithm>().is_err()
        {
            return Err(ManifestError::UnsupportedHash(h.chars().take(40).collect()));
        }
        let actual = ManifestId::of(expected.algorithm(), bytes);
        if actual != *expected {
            return Err(ManifestError::IdMismatch {
                expected: *expected,
                actual,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(peek).map_err(|e| ManifestError::Garbled(e.to_string()))?;
        if manifest.canonical_bytes() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        if manifest.hash != expected.algorithm() {
            return Err(ManifestError::Inconsistent(format!(
                "manifest records {} but is named by {}",
                manifest.hash,
                expected.algorithm()
            )));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Structural checks a reader makes before trusting the manifest.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.version != WIRE_VERSION {
            return Err(ManifestError::Version(self.version, WIRE_VERSION));
        }
        let max_block = self.chunking.max_block();
        if max_block == 0 || max_block > MAX_BLOCK_BYTES {
            return Err(ManifestError::Inconsistent(format!(
                "block size limit {max_block} out of range"
            )));
        }
        if let Chunking::Fastcdc { min, avg, max } = self.chunking
            && !(min <= avg && avg <= max)
        {
            return Err(ManifestError::Inconsistent(
                "fastcdc needs min <= avg <= max".into(),
            ));
        }
        if let Chunking::XenRecords { max } = self.chunking
            && max < Chunking::XEN_MIN_BLOCK
        {
            return Err(ManifestError::Inconsistent(format!(
                "xen-records needs max >= {}",
                Chunking::XEN_MIN_BLOCK
            )));
        }
        let mut total: u64 = 0;
        for (i, extent) in self.extents.iter().enumerate() {
            match *extent {
                Extent::Block { b, .. } if b.algorithm() != self.hash => {
                    return Err(ManifestError::Inconsistent(format!(
                        "extent {i}: block named by {}, manifest by {}",
                        b.algorithm(),
                        self.hash
                    )));
                }
                Extent::Block { n, .. } if n == 0 || n > max_block => {
                    return Err(ManifestError::Inconsistent(format!(
                        "extent {i}: block of {n} bytes (limit {max_block})"
                    )));
                }
                Extent::Zero { z: 0 } => {
                    return Err(ManifestError::Inconsistent(format!("extent {i}: empty zero run")));
                }
                _ => {}
            }
            total = total
                .checked_add(extent.len())
                .ok_or_else(|| ManifestError::Inconsistent("size overflows".into()))?;
        }
        if total != self.size {
            return Err(ManifestError::Inconsistent(format!(
                "extents add up to {total} bytes, manifest says {}",
                self.size
            )));
        }
        Ok(())
    }

    /// Distinct blocks with their sizes, in first-use order.
    pub fn unique_blocks(&self) -> Vec<(BlockId, u32)> {
        let mut seen = std::collections::HashSet::new();
        self.extents
            .iter()
            .filter_map(|e| match *e {
                Extent::Block { b, n } if seen.insert(b) => Some((b, n)),
                _ => None,
            })
            .collect()
    }

    /// Bytes held in stored blocks (zero runs excluded), counting repeats once.
    pub fn stored_bytes(&self) -> u64 {
        self.unique_blocks().iter().map(|&(_, n)| n as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: 1,
            kind: ObjectKind::Blob,
            hash: HashAlgorithm::Sha1,
            chunking: Chunking::FIXED_4K,
            size: 4096 + 8192,
            extents: vec![
                Extent::Block {
                    b: BlockId::of(HashAlgorithm::Sha1, b"x"),
                    n: 4096,
                },
                Extent::Zero { z: 8192 },
            ],
        }
    }

    #[test]
    fn decode_accepts_its_own_bytes() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.canonical_bytes(), &m.id()).unwrap(), m);
    }

    #[test]
    fn decode_names_each_problem() {
        let m = sample();
        let bytes = m.canonical_bytes();
        let id = m.id();
        assert!(matches!(
            Manifest::decode(&bytes[..bytes.len() - 3], &id),
            Err(ManifestError::Garbled(_))
        ));
        let mut flipped = bytes.clone();
        let pos = flipped.iter().position(|&c| c == b'8').unwrap();
        flipped[pos] = b'7';
        assert!(matches!(
            Manifest::decode(&flipped, &id),
            Err(ManifestError::IdMismatch { .. })
        ));
        let other = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("sha1", "blake3");
        assert!(
            matches!(Manifest::decode(other.as_bytes(), &id), Err(ManifestError::UnsupportedHash(h)) if h == "blake3")
        );
        let mut bad = m.clone();
        bad.size += 1;
        assert!(matches!(
            Manifest::decode(&bad.canonical_bytes(), &bad.id()),
            Err(ManifestError::Inconsistent(_))
        ));
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(
            Manifest::decode(&pretty, &ManifestId::of(HashAlgorithm::Sha1, &pretty)),
            Err(ManifestError::NotCanonical)
        );
        let huge = vec![b' '; MAX_MANIFEST_BYTES as usize + 1];
        assert!(matches!(
            Manifest::decode(&huge, &id),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn chunking_wire_form_is_stable() {
        let enc = |c: Chunking| serde_json::to_string(&c).unwrap();
        assert_eq!(enc(Chunking::FIXED_4K), r#"{"fixed":{"size":4096}}"#);
        assert_eq!(
            enc(Chunking::FASTCDC_16K),
            r#"{"fastcdc":{"min":4096,"avg":16384,"max":65536}}"#
        );
        assert_eq!(enc(Chunking::XEN_RECORDS), r#"{"xen-records":{"max":65536}}"#);
        let back: Chunking = serde_json::from_str(r#"{"xen-records":{"max":65536}}"#).unwrap();
        assert_eq!(back, Chunking::XEN_RECORDS);
    }

    #[test]
    fn xen_records_needs_room_for_a_page() {
        let mut m = sample();
        m.chunking = Chunking::XenRecords { max: 2048 };
        m.extents = vec![Extent::Zero { z: m.size }];
        assert!(matches!(m.validate(), Err(ManifestError::Inconsistent(_))));
        m.chunking = Chunking::XEN_RECORDS;
        m.validate().unwrap();
    }

    #[test]
    fn sha256_manifests_hold_only_sha256_names() {
        let mut m = sample();
        m.hash = HashAlgorithm::Sha256;
        // A SHA-1 block in a SHA-256 manifest is refused.
        assert!(matches!(m.validate(), Err(ManifestError::Inconsistent(_))));
        m.extents[0] = Extent::Block {
            b: BlockId::of(HashAlgorithm::Sha256, b"x"),
            n: 4096,
        };
        m.validate().unwrap();
        let id = m.id();
        assert_eq!(id.algorithm(), HashAlgorithm::Sha256);
        assert_eq!(Manifest::decode(&m.canonical_bytes(), &id).unwrap(), m);
        // The same bytes under their SHA-1 name: the manifest says sha256,
        // so a reader expecting SHA-1 names refuses it.
        let sha1_name = ManifestId::of(HashAlgorithm::Sha1, &m.canonical_bytes());
        assert!(matches!(
            Manifest::decode(&m.canonical_bytes(), &sha1_name),
            Err(ManifestError::Inconsistent(_))
        ));
    }
}
