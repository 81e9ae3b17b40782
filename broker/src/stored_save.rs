//! The canonical digest of a QEMU save as the block store holds it, for
//! the quorum check: [`vmlot_cas::qemucanon`] reads the save's head, RAM
//! bitmaps, device state and vmdesc (about 108 KB of a 128 MiB guest's
//! 140 MB save), and takes each RAM page's digest from the manifest: the
//! store keeps these saves in fixed 4 KiB blocks aligned to the file, so a
//! page is one block, named by its digest, or a zero extent. The guest's
//! memory is never fetched.
//!
//! The digest is computed by a pure, synchronous function over bytes it
//! asks for as it goes; the store is async. So it runs in rounds: each
//! round answers from the blocks fetched so far and notes those it lacked,
//! which are fetched (in one batch) before the next round. A save needs
//! four or five rounds.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Mutex;

use bytes::Bytes;
use vmlot_cas::BlockStore;
use vmlot_cas::qemucanon::{self, CanonError, SaveBytes};
use vmlot_schemas::ids::Digest;
use vmlot_schemas::{BlockId, Extent, Manifest};

/// Rounds before giving up on a save that keeps asking for more.
const MAX_ROUNDS: usize = 16;

/// Why a stored save has no canonical digest.
#[derive(Debug, thiserror::Error)]
pub enum StoredSaveError {
    /// The save is not one whose state can be compared: the provider's doing.
    #[error("{0}")]
    Invalid(String),
    /// The store could not be read: the broker's trouble.
    #[error("block store: {0}")]
    Store(String),
}

/// The canonical digest of the QEMU save `manifest` describes.
pub async fn canonical_digest(store: &BlockStore, manifest: &Manifest) -> Result<[u8; 32], StoredSaveError> {
    let save = StoredSave::new(manifest);
    for _ in 0..MAX_ROUNDS {
        let result = qemucanon::canonical_digest(&save, |offset| save.page_digest(offset));
        let wanted = save.take_missing();
        match result {
            Ok(digest) if wanted.is_empty() => return Ok(digest),
            Err(e) if wanted.is_empty() => return Err(StoredSaveError::Invalid(invalid(e))),
            // Something it read was not fetched yet: fetch it and go again.
            _ => save.fetch(store, wanted).await?,
        }
    }
    Err(StoredSaveError::Invalid(format!(
        "the save asked for more blocks after {MAX_ROUNDS} rounds"
    )))
}

fn invalid(e: CanonError) -> String {
    format!("not a comparable QEMU save: {e}")
}

/// A save read through its manifest: the extents by offset, and the blocks
/// fetched so far.
struct StoredSave {
    /// Each extent's start offset, in order.
    starts: Vec<u64>,
    extents: Vec<Extent>,
    size: u64,
    blocks: Mutex<HashMap<BlockId, Bytes>>,
    /// Blocks a round needed and did not have.
    missing: Mutex<HashSet<BlockId>>,
}

impl StoredSave {
    fn new(manifest: &Manifest) -> Self {
        let (starts, size) = vmlot_cas::layout::starts(&manifest.extents);
        StoredSave {
            starts,
            extents: manifest.extents.clone(),
            size,
            blocks: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashSet::new()),
        }
    }

    /// The extent holding `offset`, and where it starts.
    fn extent_at(&self, offset: u64) -> Option<(u64, &Extent)> {
        let i = self.starts.partition_point(|&s| s <= offset).checked_sub(1)?;
        let extent = &self.extents[i];
        (offset < self.starts[i] + extent.len()).then_some((self.starts[i], extent))
    }

    /// The digest of the 4 KiB page at `offset`: none for zeros, else the
    /// block's id (its digest), without reading it.
    fn page_digest(&self, offset: u64) -> io::Result<Option<[u8; 32]>> {
        match self.extent_at(offset) {
            Some((_, Extent::Zero { .. })) => Ok(None),
            Some((start, Extent::Block { b, n })) if start == offset && *n == 4096 => Ok(Some(match b.0 {
                Digest::Sha256(d) => d,
                // A SHA-1 store's ids, widened: replicas compare within one store.
                Digest::Sha1(d) => {
                    let mut wide = [0u8; 32];
                    wide[..20].copy_from_slice(&d);
                    wide
                }
            })),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the page at {offset:#x} is not one 4 KiB block of the save"),
            )),
        }
    }

    fn take_missing(&self) -> HashSet<BlockId> {
        std::mem::take(&mut *self.missing.lock().expect("missing lock"))
    }

    async fn fetch(&self, store: &BlockStore, wanted: HashSet<BlockId>) -> Result<(), StoredSaveError> {
        let wanted: Vec<BlockId> = wanted.into_iter().collect();
        store
            .get_blocks(&wanted, |b, bytes| {
                self.blocks.lock().expect("blocks lock").insert(b, bytes);
                Ok(())
            })
            .await
            .map_err(|e| StoredSaveError::Store(e.to_string()))?;
        let blocks = self.blocks.lock().expect("blocks lock");
        match wanted.iter().find(|b| !blocks.contains_key(b)) {
            Some(b) => Err(StoredSaveError::Invalid(format!(
                "block {b} of the save is not in the store"
            ))),
            None => Ok(()),
        }
    }
}

impl SaveBytes for StoredSave {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut out = Vec::with_capacity(len);
        let mut at = offset;
        let blocks = self.blocks.lock().expect("blocks lock");
        let mut lacking = false;
        while at < end {
            let (start, extent) = self
                .extent_at(at)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            let stop = (start + extent.len()).min(end);
            let (from, to) = ((at - start) as usize, (stop - start) as usize);
            match extent {
                Extent::Zero { .. } => out.resize(out.len() + (to - from), 0),
                Extent::Block { b, .. } => match blocks.get(b) {
                    Some(bytes) if bytes.len() >= to => out.extend_from_slice(&bytes[from..to]),
                    Some(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("block {b} is short"),
                        ));
                    }
                    None => {
                        self.missing.lock().expect("missing lock").insert(*b);
                        lacking = true;
                        out.resize(out.len() + (to - from), 0);
                    }
                },
            }
            at = stop;
        }
        if lacking {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "blocks not fetched yet",
            ));
        }
        Ok(out)
    }

    fn len(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::{Chunking, HashAlgorithm, ObjectKind};

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

    #[test]
    fn reads_ask_for_the_blocks_they_lack_and_pages_are_named_by_their_blocks() {
        let a = BlockId(Digest::of(HashAlgorithm::Sha256, b"a"));
        let save = StoredSave::new(&manifest(vec![
            Extent::Block { b: a, n: 4096 },
            Extent::Zero { z: 8192 },
        ]));
        assert_eq!(save.len(), 12288);
        let lacking = save.read_at(4000, 200).unwrap_err();
        assert_eq!(lacking.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(save.take_missing(), HashSet::from([a]));
        save.blocks
            .lock()
            .unwrap()
            .insert(a, Bytes::from(vec![7u8; 4096]));
        let bytes = save.read_at(4000, 200).unwrap();
        assert_eq!(&bytes[..96], &[7u8; 96][..]);
        assert!(bytes[96..].iter().all(|&b| b == 0));
        assert!(save.take_missing().is_empty());
        assert_eq!(
            save.read_at(12200, 200).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let Digest::Sha256(id) = a.0 else { unreachable!() };
        assert_eq!(save.page_digest(0).unwrap(), Some(id));
        assert_eq!(save.page_digest(8192).unwrap(), None);
        assert!(save.page_digest(100).is_err(), "not a page boundary");
    }
}
