//! Errors of the content-addressed store, one variant per thing that can go
//! wrong, so callers (and tests) can tell a tampered block from a lost one.

use vmlot_schemas::{BlockId, HashAlgorithm, ManifestError, ManifestId, PackId};

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("block {block} is corrupt: its content hashes to {actual}")]
    CorruptBlock { block: BlockId, actual: BlockId },
    #[error("block {0} is not in the store")]
    MissingBlock(BlockId),
    #[error("block {block} has {actual} bytes, the manifest says {expected}")]
    BlockSize {
        block: BlockId,
        expected: u32,
        actual: usize,
    },
    #[error("block {block} cannot be decoded: {reason}")]
    BlockEncoding { block: BlockId, reason: String },
    #[error("pack {pack} refused: {reason}")]
    BadPack { pack: PackId, reason: String },
    #[error("block {block} is not in pack {pack}, where its pointer says it is")]
    NotInPack { block: BlockId, pack: PackId },
    #[error("block {block}'s pointer names pack {pack}, which is not stored")]
    MissingPack { block: BlockId, pack: PackId },
    #[error("{what} is named by {found}, but this store names everything by {store}")]
    WrongHash {
        what: String,
        found: HashAlgorithm,
        store: HashAlgorithm,
    },
    #[error(
        "the block store was made with {made}; it cannot be reopened with {asked} (the algorithm is fixed when the store is created)"
    )]
    HashChanged {
        made: HashAlgorithm,
        asked: HashAlgorithm,
    },
    #[error("the block store's stream {stream} records an unknown hash algorithm {value:?}")]
    UnknownHash { stream: String, value: String },
    #[error("manifest {0} is not in the store")]
    MissingManifest(ManifestId),
    #[error("manifest {id} refused: {source}")]
    Manifest {
        id: ManifestId,
        #[source]
        source: ManifestError,
    },
    #[error("NATS {op} failed: {reason}")]
    Nats { op: &'static str, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl CasError {
    pub(crate) fn nats(op: &'static str, err: impl std::fmt::Display) -> Self {
        CasError::Nats {
            op,
            reason: err.to_string(),
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        CasError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
