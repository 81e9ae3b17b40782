//! The pieces a chunker cuts: a run of zeros or a block named by its hash,
//! and the fixed-size cutter every chunking falls back on. Below both
//! [`crate::chunk`] (which picks a chunking) and [`crate::xensave`] (which
//! cuts `xl save` files and falls back to fixed blocks where they do not
//! parse), so neither imports the other's internals.

use std::io::Read;

use vmlot_schemas::{BlockId, HashAlgorithm};

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

/// Cuts `reader` into blocks of `size` bytes (the last may be shorter),
/// named by `hash`.
pub(crate) fn chunk_fixed<R: Read>(
    mut reader: R,
    size: u32,
    hash: HashAlgorithm,
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
                sink(Piece::Data(BlockId::of(hash, block), block))?;
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
