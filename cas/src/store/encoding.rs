//! What a block's own subject holds: a pointer to the pack that holds it
//! (`store/packs.rs`): the pack id's 16 bytes and no header of its own,
//! the fewest bytes a pointer can cross the wire in (the pack id as text
//! with a `Vmlot-Encoding: pack` header took 42 more, per block pushed);
//! or, as before packs, the block raw, or zstd-compressed with a header
//! saying so. Blocks are written in packs only, so a subject holding 16
//! bytes holds a pointer (a whole block of 16 bytes, planted by hand,
//! would be read as one, its pack not found, and passed over); whatever a
//! subject holds is checked against the block's name before it is
//! believed.

use async_nats::jetstream;
use bytes::Bytes;
use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, PackId, subjects};

use crate::error::CasError;

const ZSTD: &str = "zstd";
/// The length of a pointer: a pack id's bytes.
const POINTER_LEN: usize = 16;

/// A pointer to `pack`, as stored.
pub(super) fn pointer(pack: &PackId) -> Bytes {
    Bytes::copy_from_slice(pack.0.as_bytes())
}

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
        None if msg.payload.len() == POINTER_LEN => {
            let bytes: [u8; POINTER_LEN] = msg.payload[..].try_into().expect("16 bytes");
            Ok(Stored::InPack(PackId(uuid::Uuid::from_bytes(bytes))))
        }
        None => Ok(Stored::Whole(msg.payload.clone())),
        Some(ZSTD) => zstd::bulk::decompress(&msg.payload, MAX_BLOCK_BYTES as usize)
            .map(|data| Stored::Whole(Bytes::from(data)))
            .map_err(|e| CasError::BlockEncoding {
                block: *id,
                reason: e.to_string(),
            }),
        Some(other) => Err(CasError::BlockEncoding {
            block: *id,
            reason: format!("unknown encoding {other:?}"),
        }),
    }
}
