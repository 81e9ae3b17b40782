//! A block as it is stored: raw, or zstd-compressed with a header saying
//! so when that saves more than the header costs.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, subjects};

use crate::error::CasError;

/// A block as it goes on the wire.
#[derive(Clone)]
pub(super) struct EncodedBlock {
    pub(super) payload: Bytes,
    pub(super) headers: Option<HeaderMap>,
}

const ZSTD: &str = "zstd";

pub(super) async fn encode_group(
    group: Vec<(BlockId, Bytes)>,
    level: Option<i32>,
) -> Result<Vec<(BlockId, EncodedBlock)>, CasError> {
    let Some(level) = level else {
        return Ok(group
            .into_iter()
            .map(|(id, data)| {
                (
                    id,
                    EncodedBlock {
                        payload: data,
                        headers: None,
                    },
                )
            })
            .collect());
    };
    // Compression is CPU work: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        group
            .into_iter()
            .map(|(id, data)| {
                let packed = zstd::bulk::compress(&data, level).map_err(|e| CasError::BlockEncoding {
                    block: id,
                    reason: e.to_string(),
                })?;
                // Incompressible blocks stay raw: the header costs more than it saves.
                if packed.len() + 32 >= data.len() {
                    return Ok((
                        id,
                        EncodedBlock {
                            payload: data,
                            headers: None,
                        },
                    ));
                }
                let mut headers = HeaderMap::new();
                headers.insert(subjects::BLOCK_ENCODING_HEADER, ZSTD);
                Ok((
                    id,
                    EncodedBlock {
                        payload: packed.into(),
                        headers: Some(headers),
                    },
                ))
            })
            .collect()
    })
    .await
    .map_err(|e| CasError::nats("compress blocks", e))?
}

pub(super) fn decode_block(id: &BlockId, msg: &jetstream::message::StreamMessage) -> Result<Bytes, CasError> {
    let encoding = msg
        .headers
        .get(subjects::BLOCK_ENCODING_HEADER)
        .map(|v| v.as_str().to_string());
    match encoding.as_deref() {
        None => Ok(msg.payload.clone()),
        Some(ZSTD) => zstd::bulk::decompress(&msg.payload, MAX_BLOCK_BYTES as usize)
            .map(Bytes::from)
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
