//! Cutting a byte stream into blocks and recording them in a manifest.
//!
//! Fixed 4 KiB blocks suit disks (file systems are 4 KiB aligned) and RAM
//! saved with QEMU's `mapped-ram` (every page at its own aligned offset).
//! FastCDC suits objects with no natural grid. `xl save` files are cut
//! along their records, one block per guest page ([`crate::xensave`]).
//! All-zero blocks become zero runs in the manifest and are never hashed
//! into the store.

use std::io::Read;

use vmlot_schemas::{BlockId, Chunking, Extent, HashAlgorithm, Manifest, ObjectKind, WIRE_VERSION};

/// Builds a manifest extent by extent, merging adjacent zero runs.
pub struct ManifestBuilder {
    manifest: Manifest,
}

impl ManifestBuilder {
    pub fn new(kind: ObjectKind, chunking: Chunking) -> Self {
        Self {
            manifest: Manifest {
                version: WIRE_VERSION,
                kind,
                hash: HashAlgorithm::Sha1,
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

/// True when every byte is zero; 16 bytes at a time because this runs on
/// every block and the compiler vectorizes it.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// One cut piece of the input, not yet stored.
pub enum Piece<'a> {
    Zero(u64),
    Data(BlockId, &'a [u8]),
}

/// Cuts `reader` by `chunking`, handing each piece to `sink` in order.
/// The data slice is only valid during the call.
pub fn chunk_stream<R: Read>(
    reader: R,
    chunking: Chunking,
    mut sink: impl FnMut(Piece<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match chunking {
        Chunking::Fixed { size } => chunk_fixed(reader, size, sink),
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
                    sink(Piece::Data(BlockId::of(&chunk.data), &chunk.data))?;
                }
            }
            Ok(())
        }
        Chunking::XenRecords { max } => crate::xensave::chunk_xen_save(reader, max, sink).map(|_| ()),
    }
}

/// Cuts `reader` into blocks of `size` bytes (the last may be shorter).
pub(crate) fn chunk_fixed<R: Read>(
    mut reader: R,
    size: u32,
    mut sink: impl FnMut(Piece<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    // Read in large slabs to keep syscalls off the hot path.
    let size = size as usize;
    let slab_len = size * 256;
    let mut slab = vec![0u8; slab_len];
    loop {
        let filled = read_full(&mut reader, &mut slab)?;
        if filled == 0 {
            return Ok(());
        }
        for block in slab[..filled].chunks(size) {
            if is_zero(block) {
                sink(Piece::Zero(block.len() as u64))?;
            } else {
                sink(Piece::Data(BlockId::of(block), block))?;
            }
        }
        if filled < slab_len {
            return Ok(());
        }
    }
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
pub(crate) fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The manifest of `reader` alone, storing nothing (for benchmarks and `have`).
pub fn manifest_of<R: Read>(reader: R, kind: ObjectKind, chunking: Chunking) -> std::io::Result<Manifest> {
    let mut builder = ManifestBuilder::new(kind, chunking);
    chunk_stream(reader, chunking, |piece| {
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
        let m = manifest_of(&data[..], ObjectKind::Blob, Chunking::FIXED_4K).unwrap();
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
        let a = manifest_of(&data[..], ObjectKind::Blob, Chunking::FASTCDC_16K).unwrap();
        let b = manifest_of(&shifted[..], ObjectKind::Blob, Chunking::FASTCDC_16K).unwrap();
        let a_ids: std::collections::HashSet<_> = a.unique_blocks().into_iter().collect();
        let shared = b.unique_blocks().iter().filter(|x| a_ids.contains(x)).count();
        assert!(
            shared * 10 >= a_ids.len() * 9,
            "only {shared} of {} chunks shared",
            a_ids.len()
        );
    }
}
