//! Content-addressed storage for VM images and checkpoints, as in the seed:
//! objects are cut into blocks named by their SHA-1; only blocks the
//! receiver lacks ("cold" blocks) cross the network.
//!
//! - [`chunk`] cuts a byte stream into blocks and builds its manifest.
//! - [`piece`] is what a cutter yields, and the fixed-size cutter.
//! - [`xensave`] cuts an `xl save` file along its records, a block per guest page,
//!   and reads its header (the one parser of it: the Xen driver uses it too).
//! - `synthetic` (feature `synthetic`, test machinery) reads and writes the synthetic
//!   driver's state header.
//! - [`qemusave`] reads the head of a QEMU save (`mapped-ram`, or `x-ignore-shared`
//!   with the guest's RAM in a file of its own): machine type and RAM blocks.
//! - [`qemucanon`] gives a QEMU `mapped-ram` save's canonical digest, equal for
//!   two saves of one guest state (replicas), reading no guest page.
//! - [`store`] keeps blocks and manifests in JetStream.
//! - [`record`] is how a manifest is stored: whole, compressed, or as the edits from
//!   the manifest it grew from.
//! - [`cache`] keeps blocks on a provider's or client's disk.
//! - [`transfer`] pushes a file into the store and pulls it back out, onto an
//!   older copy of it when there is one ([`layout`] says what that holds).
//!
//! This crate knows nothing of jobs or money.

pub mod cache;
pub mod chunk;
pub mod error;
pub mod layout;
pub mod locations;
pub mod pack;
pub mod piece;
pub mod qemucanon;
pub mod qemusave;
pub mod record;
pub mod store;
#[cfg(feature = "synthetic")]
pub mod synthetic;
pub mod transfer;
pub mod xensave;

pub use cache::{BlockCache, HaveReport};
pub use error::CasError;
pub use qemucanon::{CanonError, SaveBytes, canonical_digest};
pub use qemusave::{QemuSaveError, QemuSaveHeader, RamBlock};
pub use store::{BlockStore, Located, StoreOptions, Written};
pub use transfer::{PullReport, PushReport, Seed, pull_file, pull_file_over, push_file, push_file_over};
pub use xensave::{SavedConfig, XlHeader, XlHeaderError, read_saved_config};
