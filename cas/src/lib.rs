//! Content-addressed storage for VM images and checkpoints, as in the seed:
//! objects are cut into blocks named by their SHA-1; only blocks the
//! receiver lacks ("cold" blocks) cross the network.
//!
//! - [`chunk`] cuts a byte stream into blocks and builds its manifest.
//! - [`piece`] is what a cutter yields, and the fixed-size cutter.
//! - [`xensave`] cuts an `xl save` file along its records, a block per guest page,
//!   and reads its header (the one parser of it: the Xen driver uses it too).
//! - [`store`] keeps blocks and manifests in JetStream.
//! - [`cache`] keeps blocks on a provider's or client's disk.
//! - [`transfer`] pushes a file into the store and pulls it back out.
//!
//! This crate knows nothing of jobs or money.

pub mod cache;
pub mod chunk;
pub mod error;
pub mod piece;
pub mod store;
pub mod transfer;
pub mod xensave;

pub use cache::{BlockCache, HaveReport};
pub use error::CasError;
pub use store::{BlockStore, StoreOptions};
pub use transfer::{PullReport, PushReport, pull_file, push_file};
pub use xensave::{SavedConfig, XlHeader, XlHeaderError, read_saved_config};
