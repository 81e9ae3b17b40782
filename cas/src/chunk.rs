//! Cutting a byte stream into blocks and recording them in a manifest.
//!
//! Fixed 4 KiB blocks suit disks (file systems are 4 KiB aligned) and RAM
//! saved with QEMU's `mapped-ram` (every page at its own aligned offset).
//! FastCDC suits objects with no natural grid. `xl save` files are cut
//! along their records, one block per guest page ([`crate::xensave`]).
//! All-zero blocks become zero runs in the manifest and are never hashed
//! into the store.

use std::io::Read;

use crate::piece::chunk_fixed;
pub use crate::piece::{Piece, is_zero};

use vmlot_schemas::{BlockId, Chunking, Extent, HashAlgorithm, Manifest, ObjectKind, WIRE_VERSION};

/// Builds a manifest extent by extent, merging adjacent zero runs.
pub struct ManifestBuilder {
    manifest: Manifest,
}

impl ManifestBuilder {
    pub fn new(kind: ObjectKind, chunking: Chunking, hash: HashAlgorithm) -> Self {
        Self {
            manifest: Manifest {
                version: WIRE_VERSION,
                kind,
                hash,
                chunking,
                size: 0,
                extents: Vec::new(),
            },
        }
    }

    /// Adds `len` zero bytes.
    pub fn zero(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        self.manifest.size += len;
        if let Some(Extent::Zero { z }) = self.manifest.extents.last_mut() {
            *z += len;
        } else {
            self.manifest.extents.push(Extent::Zero { z: len });
        }
    }

    /// Adds a stored block.
    pub fn block(&mut self, id: BlockId, len: u32) {
        self.manifest.size += len as u64;
        self.manifest.extents.push(Extent::Block { b: id, n: len });
    }

    pub fn finish(self) -> Manifest {
        self.manifest
    }
}

/// Cuts `reader` by `chunking`, names each block by `hash` and hands each
/// piece to `sink` in order. The data slice is only valid during the call.
pub fn chunk_stream<R: Read>(
    reader: R,
    chunking: Chunking,
    hash: HashAlgorithm,
    mut sink: impl FnMut(Piece<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match chunking {
        Chunking::Fixed { size } => chunk_fixed(reader, size, hash, sink),
        Chunking::Fastcdc { min, avg, max } => {
            let chunker = fastcdc::v2020::StreamCDC::new(reader, min, avg, max);
            for chunk in chunker {
                let chunk = chunk.map_err(|e| match e {
                    fastcdc::v2020::Error::IoError(io) => io,
                    other => std::io::Error::other(other.to_string()),
                })?;
                if is_zero(&chunk.data) {
                    sink(Piece::Zero(chunk.length as u64))?;
                } else {
                    sink(Piece::Data(BlockId::of(hash, &chunk.data), &chunk.data))?;
                }
            }
            Ok(())
        }
        Chunking::XenRecords { max } => crate::xensave::chunk_xen_save(reader, max, hash, sink).map(|_| ()),
    }
}

/// The manifest of `reader` alone, storing nothing (for benchmarks and `have`).
pub fn manifest_of<R: Read>(
    reader: R,
    kind: ObjectKind,
    chunking: Chunking,
    hash: HashAlgorithm,
) -> std::io::Result<Manifest> {
    let mut builder = ManifestBuilder::new(kind, chunking, hash);
    chunk_stream(reader, chunking, hash, |piece| {
        match piece {
            Piece::Zero(n) => builder.zero(n),
            Piece::Data(id, data) => builder.block(id, data.len() as u32),
        }
        Ok(())
    })?;
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_merge_and_sizes_add_up() {
        let mut data = vec![0u8; 4096 * 3];
        data.extend_from_slice(&[7u8; 4096]);
        data.extend_from_slice(&[0u8; 100]);
        let m = manifest_of(
            &data[..],
            ObjectKind::Blob,
            Chunking::FIXED_4K,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        assert_eq!(m.size, data.len() as u64);
        assert_eq!(m.extents.len(), 3);
        assert_eq!(m.extents[0], Extent::Zero { z: 4096 * 3 });
        assert_eq!(m.extents[2], Extent::Zero { z: 100 });
        m.validate().unwrap();
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        for len in [0usize, 1, 15, 16, 17, 4096] {
            let zeros = vec![0u8; len];
            assert!(is_zero(&zeros));
            for pos in 0..len {
                let mut d = zeros.clone();
                d[pos] = 1;
                assert!(!is_zero(&d), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn fastcdc_finds_shifted_content_again() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut data);
        let mut shifted = vec![1u8; 100];
        shifted.extend_from_slice(&data);
        let a = manifest_of(
            &data[..],
            ObjectKind::Blob,
            Chunking::FASTCDC_16K,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        let b = manifest_of(
            &shifted[..],
            ObjectKind::Blob,
            Chunking::FASTCDC_16K,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        let a_ids: std::collections::HashSet<_> = a.unique_blocks().into_iter().collect();
        let shared = b.unique_blocks().iter().filter(|x| a_ids.contains(x)).count();
        assert!(
            shared * 10 >= a_ids.len() * 9,
            "only {shared} of {} chunks shared",
            a_ids.len()
        );
    }
}
