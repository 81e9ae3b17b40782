//! The farm's images by recipe id: the KV bucket `vmlot-images`, which
//! only the farm writes. An entry is written once a build is stored, so a
//! recipe found here is answered at once.

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use vmlot_schemas::recipe::{ImageRecord, RecipeId};
use vmlot_schemas::subjects::IMAGE_BUCKET;

use crate::error::FarmError;

/// The image index.
#[derive(Clone)]
pub struct Index {
    kv: kv::Store,
}

impl Index {
    /// Opens the bucket, making it when it is not there.
    pub async fn open(js: &jetstream::Context) -> Result<Self, FarmError> {
        let kv = match js.get_key_value(IMAGE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: IMAGE_BUCKET.to_string(),
                    description: "OS Farm: images by recipe id".into(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| FarmError::nats("create the image bucket", e))?,
        };
        Ok(Index { kv })
    }

    /// The image built from `id`, if there is one. An entry that does not
    /// parse, or names another recipe, is treated as absent (and rebuilt).
    pub async fn get(&self, id: &RecipeId) -> Result<Option<ImageRecord>, FarmError> {
        let Some(bytes) = self
            .kv
            .get(id.to_hex())
            .await
            .map_err(|e| FarmError::nats("read the image bucket", e))?
        else {
            return Ok(None);
        };
        match serde_json::from_slice::<ImageRecord>(&bytes) {
            Ok(record) if record.recipe_id == *id && record.recipe.id() == *id => Ok(Some(record)),
            Ok(_) => {
                tracing::warn!(recipe = %id, "an image entry names another recipe; ignored");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(recipe = %id, %e, "an image entry does not parse; ignored");
                Ok(None)
            }
        }
    }

    pub async fn put(&self, record: &ImageRecord) -> Result<(), FarmError> {
        let bytes = serde_json::to_vec(record).expect("an image record serializes");
        self.kv
            .put(record.recipe_id.to_hex(), bytes.into())
            .await
            .map_err(|e| FarmError::nats("write the image bucket", e))?;
        Ok(())
    }

    /// Every image, oldest build first.
    pub async fn all(&self) -> Result<Vec<ImageRecord>, FarmError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| FarmError::nats("list the image bucket", e))?
            .try_collect()
            .await
            .map_err(|e| FarmError::nats("list the image bucket", e))?;
        let mut out = Vec::new();
        for key in keys {
            let Ok(id) = key.parse::<RecipeId>() else { continue };
            if let Some(record) = self.get(&id).await? {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.built_at);
        Ok(out)
    }
}
