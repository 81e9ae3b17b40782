//! Checks a result's checkpoint before anything is paid for it: every
//! manifest present and well-formed, every block in the store, the sizes
//! it claims. Blocks of the checkpoint the segment started from were checked
//! when that one settled, so only new blocks are looked up.

use std::collections::{HashMap, HashSet};

use vmlot_cas::BlockStore;
use vmlot_schemas::market::Checkpoint;
use vmlot_schemas::{BlockId, Extent, Manifest, ManifestId};

/// Why a checkpoint was refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("manifest {id}: {reason}")]
    Manifest { id: ManifestId, reason: String },
    #[error("{count} block(s) missing from the store, e.g. {example}")]
    MissingBlocks { count: usize, example: BlockId },
    #[error("checkpoint claims {claimed} stored bytes, its manifests hold {actual}")]
    Size { claimed: u64, actual: u64 },
    #[error("store unavailable: {0}")]
    Store(String),
}

/// The parts of a verified checkpoint the result checks read further.
#[derive(Debug, Default)]
pub struct Verified {
    /// The machine state's manifest, if there is one (the checks read its
    /// first bytes).
    pub machine_state: Option<Manifest>,
    /// The size of the memory part, if there is one.
    pub memory_size: Option<u64>,
}

/// Blocks of a checkpoint already verified (by manifest).
pub async fn known_blocks(store: &BlockStore, cp: &Checkpoint) -> HashSet<BlockId> {
    let mut known = HashSet::new();
    for &id in cp.parts() {
        if let Ok(manifest) = store.get_manifest(&id).await {
            known.extend(manifest.unique_blocks().into_iter().map(|(b, _)| b));
        }
    }
    known
}

/// Verifies `new`, taking `known` blocks as present (whether it needs a
/// machine state is `check::claims`'s question, asked before).
///
/// Returns what the result checks read further.
pub async fn checkpoint(
    store: &BlockStore,
    new: &Checkpoint,
    known: &HashSet<BlockId>,
) -> Result<Verified, Invalid> {
    let mut actual = 0u64;
    let mut verified = Verified::default();
    for &id in new.parts() {
        let manifest = store.get_manifest(&id).await.map_err(|e| Invalid::Manifest {
            id,
            reason: e.to_string(),
        })?;
        if Some(id) == new.machine_state {
            verified.machine_state = Some(manifest.clone());
        }
        if Some(id) == new.memory {
            verified.memory_size = Some(manifest.size);
        }
        actual += manifest.stored_bytes();
        let fresh: Vec<BlockId> = manifest
            .unique_blocks()
            .into_iter()
            .map(|(b, _)| b)
            .filter(|b| !known.contains(b))
            .collect();
        // Pointed at by someone: whether the bytes are what the names say
        // is for the next restore to find, and a failed one is blamed on
        // this result's producer (an honest producer takes a block as
        // stored only from its own pointers, the house's, or a pack whose
        // bytes it checked).
        let missing = store
            .missing_anywhere(&fresh)
            .await
            .map_err(|e| Invalid::Store(e.to_string()))?;
        if let Some(example) = missing.iter().next() {
            return Err(Invalid::MissingBlocks {
                count: missing.len(),
                example: *example,
            });
        }
    }
    if actual != new.stored_bytes {
        return Err(Invalid::Size {
            claimed: new.stored_bytes,
            actual,
        });
    }
    Ok(verified)
}

/// The first `want` bytes of the object `manifest` describes (all of it if
/// shorter): what the result checks read of a machine state. Only the
/// blocks holding those bytes are fetched.
pub async fn prefix(store: &BlockStore, manifest: &Manifest, want: usize) -> Result<Vec<u8>, Invalid> {
    let mut needed = Vec::new();
    let mut covered = 0u64;
    for extent in &manifest.extents {
        if covered >= want as u64 {
            break;
        }
        if let Extent::Block { b, .. } = extent {
            needed.push(*b);
        }
        covered += extent.len();
    }
    let blocks = std::sync::Mutex::new(HashMap::new());
    store
        .get_blocks(&needed, |b, bytes| {
            blocks.lock().expect("blocks lock").insert(b, bytes);
            Ok(())
        })
        .await
        .map_err(|e| Invalid::Store(e.to_string()))?;
    let blocks = blocks.into_inner().expect("blocks lock");
    let mut out = Vec::with_capacity(want);
    for extent in &manifest.extents {
        if out.len() >= want {
            break;
        }
        match extent {
            Extent::Block { b, .. } => match blocks.get(b) {
                Some(bytes) => out.extend_from_slice(bytes),
                None => {
                    return Err(Invalid::MissingBlocks {
                        count: 1,
                        example: *b,
                    });
                }
            },
            Extent::Zero { z } => {
                let n = (*z).min((want - out.len()) as u64) as usize;
                out.resize(out.len() + n, 0);
            }
        }
    }
    out.truncate(want);
    Ok(out)
}

/// Stored bytes of a set of manifests (for a job's first checkpoint).
pub async fn stored_bytes(store: &BlockStore, ids: &[ManifestId]) -> Result<u64, Invalid> {
    let mut total = 0;
    for id in ids {
        let manifest = store.get_manifest(id).await.map_err(|e| Invalid::Manifest {
            id: *id,
            reason: e.to_string(),
        })?;
        total += manifest.stored_bytes();
    }
    Ok(total)
}
