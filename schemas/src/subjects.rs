//! The NATS subject map. Every subject and stream name is built here, never
//! by `format!` elsewhere, so the map in `docs/ARCHITECTURE.md` stays true.

use crate::ids::BlockId;

/// Stream holding one message per block, subject [`block`].
pub const BLOCK_STREAM: &str = "VMLOT_BLOCKS";
/// Subjects of [`BLOCK_STREAM`].
pub const BLOCK_SUBJECTS: &str = "vmlot.cas.block.*";
/// Object-store bucket holding manifests, keyed by manifest id.
pub const MANIFEST_BUCKET: &str = "vmlot-manifests";
/// Header naming a block's stored encoding (absent: raw bytes).
pub const BLOCK_ENCODING_HEADER: &str = "Vmlot-Encoding";

/// Subject of one block.
pub fn block(id: &BlockId) -> String {
    format!("vmlot.cas.block.{id}")
}
