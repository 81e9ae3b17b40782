//! Test machinery (cargo feature `fault-injection`, never in a release
//! build), a provider that lies with its own credentials:
//! `VMLOT_PROVIDER_FAULT=flip-ram-byte` makes it alter one byte of guest
//! RAM in each QEMU save it makes, after the save and before the upload (a
//! state that is not what the segment computed, for the quorum tests);
//! `drop-ram-part` makes it leave the guest's RAM file out of each result
//! whose device state was saved without it (a checkpoint that cannot
//! restore, for the broker's check of the memory part).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmlot_cas::qemusave::{HEADER_PREFIX, parse_header};

const VAR: &str = "VMLOT_PROVIDER_FAULT";
const FLIP_RAM_BYTE: &str = "flip-ram-byte";
const DROP_RAM_PART: &str = "drop-ram-part";
const PAGE: u64 = 4096;

/// Applies the fault asked for, if any, to the save at `machine_state`.
pub fn after_save(machine_state: &Path) {
    if std::env::var(VAR).as_deref() != Ok(FLIP_RAM_BYTE) {
        return;
    }
    match flip_ram_byte(machine_state) {
        Ok(offset) => tracing::warn!(
            offset,
            "fault injected: one byte of guest RAM flipped in the save"
        ),
        Err(e) => tracing::warn!(%e, "fault not injected"),
    }
}

/// Flips a byte in the first page of guest RAM the save holds; its offset.
fn flip_ram_byte(path: &Path) -> io::Result<u64> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut head = vec![0u8; HEADER_PREFIX];
    let n = file.read_at(&mut head, 0)?;
    let header = parse_header(&head[..n]).map_err(|e| bad(e.to_string()))?;
    let ram = header.guest_ram().ok_or_else(|| bad("no guest RAM".into()))?;
    let mapped = ram.mapped.ok_or_else(|| bad("not a mapped-ram save".into()))?;
    let mut bitmap = vec![0u8; ram.used_length.div_ceil(PAGE * 8) as usize];
    file.read_exact_at(&mut bitmap, mapped.bitmap_offset)?;
    let (byte, value) = bitmap
        .iter()
        .enumerate()
        .find(|(_, b)| **b != 0)
        .ok_or_else(|| bad("no page of guest RAM in the save".into()))?;
    let page = byte as u64 * 8 + u64::from(value.trailing_zeros());
    let offset = mapped.pages_offset + page * PAGE + 100;
    let mut one = [0u8; 1];
    file.read_exact_at(&mut one, offset)?;
    file.write_all_at(&[one[0] ^ 0xff], offset)?;
    Ok(offset)
}

/// Whether the result names the RAM part it pushed (`drop-ram-part` says
/// no).
pub fn keeps_ram_part() -> bool {
    if std::env::var(VAR).as_deref() == Ok(DROP_RAM_PART) {
        tracing::warn!("fault injected: the guest's RAM part left out of the result");
        return false;
    }
    true
}
