//! A block as it is stored on its own subject: raw, zstd-compressed with
//! a header saying so when that saves more than the header costs, or a
//! pointer to the pack that holds it (`store/packs.rs`).

use async_nats::jetstream;
use bytes::Bytes;
use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, PackId, subjects};

use crate::error::CasError;

const ZSTD: &str = "zstd";
/// The encoding of a block's pointer to its pack.
pub(super) const PACK: &str = "pack";

/// What a block's own subject holds.
pub(super) enum Stored {
    /// The block's bytes, decoded (not yet checked against its name).
    Whole(Bytes),
    /// A pointer: the pack holding the block.
    InPack(PackId),
}

pub(super) fn decode_block(
    id: &BlockId,
    msg: &jetstream::message::StreamMessage,
) -> Result<Stored, CasError> {
    let encoding = msg
        .headers
        .get(subjects::BLOCK_ENCODING_HEADER)
        .map(|v| v.as_str().to_string());
    match encoding.as_deref() {
        None => Ok(Stored::Whole(msg.payload.clone())),
        Some(ZSTD) => zstd::bulk::decompress(&msg.payload, MAX_BLOCK_BYTES as usize)
            .map(|data| Stored::Whole(Bytes::from(data)))
            .map_err(|e| CasError::BlockEncoding {
                block: *id,
                reason: e.to_string(),
            }),
        Some(PACK) => std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|v| v.parse::<PackId>().ok())
            .map(Stored::InPack)
            .ok_or_else(|| CasError::BlockEncoding {
                block: *id,
                reason: "a pointer that names no pack".into(),
            }),
        Some(other) => Err(CasError::BlockEncoding {
            block: *id,
            reason: format!("unknown encoding {other:?}"),
        }),
    }
}
