//! One file into the block store, as an image's part.

use std::collections::HashSet;
use std::path::Path;

use vmlot_cas::{BlockStore, push_file};
use vmlot_schemas::recipe::StoredObject;
use vmlot_schemas::{Chunking, ObjectKind};

/// Pushes one file (fixed 4 KiB blocks: an ext4 disk's file data sits on
/// that grid, so a block another image holds is found wherever it lies).
pub async fn push_stored(
    store: &BlockStore,
    path: &Path,
    kind: ObjectKind,
) -> Result<StoredObject, vmlot_cas::CasError> {
    let report = push_file(store, None, path, kind, Chunking::FIXED_4K, &HashSet::new()).await?;
    Ok(StoredObject {
        manifest: report.manifest_id,
        size: report.manifest.size,
        unique_blocks: report.unique_blocks,
        sent_blocks: report.sent_blocks,
        sent_bytes: report.sent_bytes,
    })
}
