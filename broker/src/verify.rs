//! Checks a result's checkpoint before anything is paid for it: every
//! manifest present and well-formed, every block in the store, the sizes it
//! claims. Blocks of the checkpoint the segment started from were checked
//! when that one settled, so only new blocks are looked up.

use std::collections::HashSet;

use vmlot_cas::BlockStore;
use vmlot_schemas::market::Checkpoint;
use vmlot_schemas::{BlockId, ManifestId};

/// Why a checkpoint was refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("manifest {id}: {reason}")]
    Manifest { id: ManifestId, reason: String },
    #[error("{count} block(s) missing from the store, e.g. {example}")]
    MissingBlocks { count: usize, example: BlockId },
    #[error("checkpoint claims {claimed} stored bytes, its manifests hold {actual}")]
    Size { claimed: u64, actual: u64 },
    #[error("a running guest's checkpoint needs a machine state")]
    NoMachineState,
    #[error("store unavailable: {0}")]
    Store(String),
}

fn parts(cp: &Checkpoint) -> Vec<ManifestId> {
    cp.machine_state.iter().chain(cp.disks.iter()).copied().collect()
}

/// Blocks of a checkpoint already verified (by manifest).
pub async fn known_blocks(store: &BlockStore, cp: &Checkpoint) -> HashSet<BlockId> {
    let mut known = HashSet::new();
    for id in parts(cp) {
        if let Ok(manifest) = store.get_manifest(&id).await {
            known.extend(manifest.unique_blocks().into_iter().map(|(b, _)| b));
        }
    }
    known
}

/// Verifies `new`, taking `known` blocks as present.
pub async fn checkpoint(
    store: &BlockStore,
    new: &Checkpoint,
    known: &HashSet<BlockId>,
) -> Result<(), Invalid> {
    if new.machine_state.is_none() {
        return Err(Invalid::NoMachineState);
    }
    let mut actual = 0u64;
    for id in parts(new) {
        let manifest = store.get_manifest(&id).await.map_err(|e| Invalid::Manifest {
            id,
            reason: e.to_string(),
        })?;
        actual += manifest.stored_bytes();
        let fresh: Vec<BlockId> = manifest
            .unique_blocks()
            .into_iter()
            .map(|(b, _)| b)
            .filter(|b| !known.contains(b))
            .collect();
        let missing = store
            .missing(&fresh)
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
    Ok(())
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
