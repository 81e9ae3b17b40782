//! OS Farm: VM images named by their recipe and built on demand (the
//! seed's third part). A recipe ([`vmlot_schemas::recipe::Recipe`]) is
//! canonical JSON and its id the hash of it; the farm builds one with
//! `mmdebstrap` into an ext4 disk, stores it in the content-addressed
//! store beside one shared boot kit, indexes it by recipe id, and answers
//! a recipe it has built before at once.
//!
//! - [`build`]: a recipe made into files (mmdebstrap, the recipe's files
//!   and boot script, `mkfs.ext4 -d`, tar), its command lines pure;
//! - [`kit`]: the kernel and initrd every image boots with;
//! - [`farm`]: a build stored and indexed;
//! - [`index`]: the images by recipe id (KV `vmlot-images`);
//! - [`stored`]: one file pushed as an image's part;
//! - [`service`]: the `image-build`, `image-list` and `image-show`
//!   endpoints, the build queue, progress.

pub mod build;
pub mod error;
pub mod farm;
pub mod index;
pub mod kit;
pub mod service;
pub mod stored;

pub use error::{BuildError, FarmError};
pub use farm::Farm;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_cas::{BlockStore, StoreOptions};

/// How a farm runs.
#[derive(Clone, Debug)]
pub struct FarmConfig {
    pub work_dir: PathBuf,
    pub apt_cache: PathBuf,
    pub mirror: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Runs the farm on `client` until `shutdown`.
pub async fn run(
    client: async_nats::Client,
    config: FarmConfig,
    shutdown: CancellationToken,
) -> Result<(), FarmError> {
    // The broker keeps the store (and fixes its hash); the farm joins it.
    let store = BlockStore::join(
        client.clone(),
        StoreOptions::default(),
        Some(std::time::Duration::from_secs(120)),
    )
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    let index = index::Index::open(&js).await?;
    let kit = kit::Kit::push(&store, &config.kernel, &config.initrd).await?;
    tracing::info!(kernel = %kit.kernel.manifest, initrd = %kit.initrd.manifest, "boot kit stored");
    let farm = Farm {
        store,
        index,
        builder: build::Builder {
            mirror: config.mirror,
            apt_cache: config.apt_cache,
        },
        kit,
        work_dir: config.work_dir,
    };
    let tasks = TaskTracker::new();
    let served = service::serve(client, farm, shutdown.clone(), &tasks).await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    served
}
