//! The guest's RAM as the mapped-ram layout holds it: the blocks' records
//! (read by [`crate::qemusave`]), each block's bitmap (bit `i`, least
//! significant bit first within a byte, set if page `i` was written) and
//! pages (page `i` at `pages_offset + i * 4096`). Hashed per block, in
//! record order: `"block\0" id "\0" u64 used_length`, then `u64 i digest`
//! for every set bit whose page is not all zero. Bits past the block's
//! last page (the bitmap is whole u64 words) are ignored, as QEMU does.

use std::io;

use sha2::{Digest, Sha256};

use super::{CanonError, PAGE_SIZE, SaveBytes, read};
use crate::qemusave::{self, HEADER_PREFIX, RAM_BLOCK_RECORD_MAX, RamBlock};

/// Bitmap bytes read at a time.
const BITMAP_CHUNK: u64 = 64 << 10;
/// `u32 version, u64 page_size, u64 bitmap_offset, u64 pages_offset`.
const MAPPED_RAM_HEADER_LEN: u64 = 28;

/// Where the RAM is, and where the stream around it is.
pub(super) struct RamLayout {
    pub blocks: Vec<RamBlock>,
    /// The `ram` setup's `u64 ram_total | 0x04`.
    pub setup_word: u64,
    /// Where that word lies: right after ram's section header.
    pub setup_word_at: u64,
    /// Where the stream goes on: after the last block's pages.
    pub resume_at: u64,
}

/// Reads the head and every RAM block's record.
pub(super) fn read_layout<S: SaveBytes + ?Sized>(save: &S) -> Result<RamLayout, CanonError> {
    let prefix = read(save, 0, save.len().min(HEADER_PREFIX as u64) as usize)?;
    let mut header = qemusave::parse_header(&prefix)?;
    if !header.mapped_ram {
        return Err(CanonError::NotMappedRam);
    }
    while let Some(at) = header.next_block_at() {
        if at >= save.len() {
            return Err(CanonError::Truncated {
                at,
                what: "a RAM block record".into(),
            });
        }
        let len = (save.len() - at).min(RAM_BLOCK_RECORD_MAX as u64);
        header.read_next_block(&read(save, at, len as usize)?)?;
    }
    // parse_header read at least one record, checked the first one's
    // bitmap to start right after it and ram's setup word to come right
    // before it; checked here again rather than trusted to stay so.
    let first = header.ram_blocks.first().ok_or(CanonError::NotMappedRam)?;
    let bitmap_offset = first.mapped.ok_or(CanonError::NotMappedRam)?.bitmap_offset;
    let record = 1 + first.id.len() as u64 + 8 + MAPPED_RAM_HEADER_LEN;
    let (Some(setup_word_at), Some(resume_at)) =
        (bitmap_offset.checked_sub(record + 8), header.stream_resumes_at())
    else {
        return Err(CanonError::NotMappedRam);
    };
    Ok(RamLayout {
        setup_word: header.ram_total | 0x04,
        setup_word_at,
        resume_at,
        blocks: header.ram_blocks,
    })
}

/// The RAM digest: every set bit's page, named by `page_digest`.
pub(super) fn digest<S: SaveBytes + ?Sized>(
    save: &S,
    layout: &RamLayout,
    mut page_digest: impl FnMut(u64) -> io::Result<Option<[u8; 32]>>,
) -> Result<[u8; 32], CanonError> {
    let mut h = Sha256::new();
    for block in &layout.blocks {
        let mapped = block.mapped.ok_or(CanonError::NotMappedRam)?;
        h.update(b"block\0");
        h.update(block.id.as_bytes());
        h.update(b"\0");
        h.update(block.used_length.to_be_bytes());
        let pages = block.used_length / PAGE_SIZE;
        let bitmap_len = pages.div_ceil(8);
        let mut done = 0;
        while done < bitmap_len {
            let n = (bitmap_len - done).min(BITMAP_CHUNK);
            let bytes = read(save, mapped.bitmap_offset + done, n as usize)?;
            for (j, &byte) in bytes.iter().enumerate() {
                for bit in (0..8).filter(|bit| byte >> bit & 1 == 1) {
                    let page = (done + j as u64) * 8 + bit;
                    if page >= pages {
                        break;
                    }
                    if let Some(d) = page_digest(mapped.pages_offset + page * PAGE_SIZE)? {
                        h.update(page.to_be_bytes());
                        h.update(d);
                    }
                }
            }
            done += n;
        }
    }
    Ok(h.finalize().into())
}
