//! The farm's one operation, a recipe made into a stored, indexed image:
//! built ([`crate::build`]) in a scratch directory, its disk (and export)
//! pushed to the content-addressed store, only the blocks the store lacks
//! crossing the wire, beside the boot kit's kernel and initrd
//! ([`crate::kit`]), and the record written to the index last, so an
//! image in the index is always whole.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::Utc;
use vmlot_cas::BlockStore;
use vmlot_schemas::ObjectKind;
use vmlot_schemas::recipe::{ImageRecord, Recipe, RecipeId, StoredObject};

use crate::build::{Builder, Progress};
use crate::error::BuildError;
use crate::index::Index;
use crate::kit::Kit;
use crate::stored::push_stored;

/// Everything a build needs.
pub struct Farm {
    pub store: BlockStore,
    pub index: Index,
    pub builder: Builder,
    pub kit: Kit,
    /// Scratch directories of builds go here.
    pub work_dir: PathBuf,
}

impl Farm {
    /// Builds `recipe`, stores it and writes its record to the index.
    pub async fn make(
        &self,
        recipe: &Recipe,
        id: &RecipeId,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, BuildError> {
        let started = Instant::now();
        std::fs::create_dir_all(&self.work_dir)
            .map_err(|e| BuildError::io("work directory", &self.work_dir, e))?;
        let scratch = tempfile::Builder::new()
            .prefix(&format!("build-{}-", &id.to_hex()[..12]))
            .tempdir_in(&self.work_dir)
            .map_err(|e| BuildError::io("scratch directory", &self.work_dir, e))?;
        let made = self.builder.build(recipe, id, scratch.path(), progress).await?;
        progress("store", "pushing the disk: only the blocks the store lacks");
        let disk = self.push(&made.disk, ObjectKind::Disk).await?;
        progress(
            "store",
            &format!(
                "disk {}: {} of {} blocks sent ({} bytes)",
                disk.manifest, disk.sent_blocks, disk.unique_blocks, disk.sent_bytes
            ),
        );
        let export = match &made.export {
            Some(tar) => Some(self.push(tar, ObjectKind::Blob).await?),
            None => None,
        };
        let record = ImageRecord {
            version: 1,
            recipe_id: *id,
            recipe: recipe.canonical(),
            kernel: self.kit.kernel.clone(),
            initrd: self.kit.initrd.clone(),
            disk,
            export,
            cmdline: self.kit.cmdline.clone(),
            installed: made.installed,
            built_at: Utc::now(),
            build_millis: started.elapsed().as_millis() as u64,
        };
        self.index
            .put(&record)
            .await
            .map_err(|e| BuildError::Recipe(format!("indexing the image: {e}")))?;
        Ok(record)
    }

    /// An image built under another boot kit, given this farm's (its disk
    /// does not depend on the kit; a kernel or initrd mended since boots
    /// it), the index updated; as it is when the kit is the same.
    pub async fn rekit(&self, image: ImageRecord) -> Result<ImageRecord, crate::FarmError> {
        if image.kernel.manifest == self.kit.kernel.manifest
            && image.initrd.manifest == self.kit.initrd.manifest
            && image.cmdline == self.kit.cmdline
        {
            return Ok(image);
        }
        let image = ImageRecord {
            kernel: self.kit.kernel.clone(),
            initrd: self.kit.initrd.clone(),
            cmdline: self.kit.cmdline.clone(),
            ..image
        };
        tracing::info!(recipe = %image.recipe_id, "built under another boot kit: given this one");
        self.index.put(&image).await?;
        Ok(image)
    }

    async fn push(&self, path: &Path, kind: ObjectKind) -> Result<StoredObject, BuildError> {
        push_stored(&self.store, path, kind)
            .await
            .map_err(BuildError::Store)
    }
}
