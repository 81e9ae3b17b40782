//! The canonical digest of a QEMU 10.0 save made with `mapped-ram`: equal
//! for two saves of the same guest state, whatever the host did around them
//! (when the VM stopped, how many times the migration thread found no dirty
//! RAM), so that replicas of one segment can be compared by 32 bytes. A port
//! of `docs/research/detstop/canon.py`. Pure: reads through [`SaveBytes`],
//! no I/O of its own, no async.
//!
//! Layout, integers big-endian (QEMU 10.0, `migration/savevm.c`, `ram.c`):
//!
//! ```text
//! "QEVM" u32 3                                  head, read by qemusave::parse_header
//! 0x07 configuration                            QEMU_VM_CONFIGURATION: fields and
//!                                               subsections as vmdesc.configuration says
//! 0x01 u32 id u8 3 "ram" u32 0 u32 4            ram's setup: u64 ram_total | 0x04 and a
//!   u64 (ram_total | 0x04), block records     record per block; with mapped-ram each record
//!                                               is followed (at its own offsets) by the block's
//!                                               bitmap and pages, see qemusave
//! then, from the end of the last block's pages:
//!   u64 0x10, 0x7e u32 id                     the setup's EOS, its footer
//!   0x02|0x03 u32 id, u64 flag words          ram PART/END: flag words only (EOS 0x10,
//!                                               MULTIFD_FLUSH 0x200), a varying number of them
//!   0x04 u32 id u8 len name u32 instance      QEMU_VM_SECTION_FULL of a device: its fields
//!     u32 version, fields, (0x05 u8 len name  as vmdesc lays them out, then the subsections
//!     u32 version fields)*                    the vmdesc lists, each behind 0x05
//!   0x7e u32 id                               section footer, after each section
//!   0x08 u16 11 u16 0                         MIG_CMD_SWITCHOVER_START, before the devices
//! 0x00                                          QEMU_VM_EOF
//! 0x06 u32 len JSON                             QEMU_VM_VMDESCRIPTION, the last bytes of the file
//! ```
//!
//! The vmdesc (`vmdesc.rs`) lists, for every device section written, each
//! field's name, type and size (`size` is the bytes QEMU actually wrote for
//! it), nested structs, `array_len`, and the subsections sent. The device
//! sections are walked with it (`stream.rs`) leaf by leaf; every leaf is
//! hashed as `u32 len(key) key u32 len(data) data` with key
//! `section/instance@vversion:path/of/field[i]` (the configuration section
//! as `configuration/0@v0:configuration/...`); the masked leaves
//! ([`MASKED`]: the `timer` section's `cpu_ticks_offset` and
//! `cpu_clock_offset`, host clock readings taken when the VM stops) as
//! `u32 len(key) key 0xff "MASKED"`. This device digest equals canon.py's
//! `devices` for the same save.
//!
//! The RAM (`ram.rs`) is not taken from the stream's ram sections, only from
//! the mapped-ram layout: per block, `"block\0" id "\0" u64 used_length`,
//! then `u64 page_index digest` for every page whose bitmap bit is set and
//! which is not all zero (canon.py's rule: a zero page and an absent page
//! hash the same; QEMU 10.0 sets no bit for a zero page anyway). The
//! digest of a page is the caller's (see [`canonical_digest`]).
//!
//! Final digest: `sha256("vmlot-canon-v2\0" ram_digest device_digest)`.
//! (v1 is canon.py, which hashes the page bytes themselves in place of
//! their digests: its final hash differs from this one.)

mod ram;
mod stream;
mod vmdesc;

#[cfg(test)]
mod tests;

use std::io;

use sha2::{Digest, Sha256};

use crate::qemusave::QemuSaveError;

/// The guest page size of every save this reads (the vmdesc's `page_size`).
pub const PAGE_SIZE: u64 = 4096;
/// The device leaves left out of the digest, as (section name, field):
/// host clock readings QEMU takes at `cpu_disable_ticks()` when the VM
/// stops (vmstate "timer", softmmu/cpu-timers.c). Each must be in the save,
/// an 8-byte top-level field of the section, or the save is refused: a
/// format change cannot silently unmask a field or mask another one.
pub const MASKED: [(&str, &str); 2] = [("timer", "cpu_ticks_offset"), ("timer", "cpu_clock_offset")];
/// The largest vmdesc read (QEMU's for q35 and our guest is 45 KB).
pub const MAX_VMDESC: u64 = 4 << 20;
/// The largest device-state part read (the bytes between the last RAM
/// block's pages and the vmdesc; 33 KB on q35).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;
/// Bounds the work on a hostile vmdesc: fields and array elements visited
/// (a real q35 save has 20,272 leaves).
pub const MAX_STEPS: u64 = 1 << 19;
const DOMAIN: &[u8] = b"vmlot-canon-v2\0";

/// Reads the bytes of a save (the save file, or a block store's copy of it).
pub trait SaveBytes {
    /// Exactly `len` bytes at `offset`; never asked for bytes past [`SaveBytes::len`].
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// The save's length in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SaveBytes for [u8] {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
}

/// Why a save has no canonical digest.
#[derive(Debug, thiserror::Error)]
pub enum CanonError {
    /// Reading the save, or a page's digest, failed.
    #[error("reading the save: {0}")]
    Read(#[from] io::Error),
    /// The head (magic, configuration, RAM block records) was refused.
    #[error("head of the save: {0}")]
    Head(#[from] QemuSaveError),
    #[error("saved without the mapped-ram capability")]
    NotMappedRam,
    #[error("no vmdesc (0x06 u32 length JSON) ends the save")]
    NoVmdesc,
    #[error("the vmdesc is not what QEMU writes: {0}")]
    Vmdesc(String),
    /// The stream ends (at the vmdesc) before `what`, which starts at `at`.
    #[error("truncated: {what} at {at:#x} runs past the end of the stream")]
    Truncated { at: u64, what: String },
    #[error("unknown section type {kind:#04x} at {at:#x}")]
    UnknownSectionType { kind: u8, at: u64 },
    /// A type QEMU writes, where it does not write it.
    #[error("section type {kind:#04x} out of place at {at:#x}")]
    MisplacedSection { kind: u8, at: u64 },
    /// Commands other than SWITCHOVER_START (postcopy, COLO, packaged
    /// streams) change what a load does and are not part of a plain save:
    /// refused, not skipped.
    #[error("migration command {cmd} at {at:#x}")]
    Command { cmd: u16, at: u64 },
    #[error("a name at {at:#x} in the stream is not UTF-8")]
    NameNotUtf8 { at: u64 },
    #[error("section id {id} at {at:#x} was never started")]
    UnknownSectionId { id: u32, at: u64 },
    #[error("iterative section {name:?}: only ram is iterative in our saves")]
    IterativeSection { name: String },
    #[error("section {name:?} instance {instance} is not in the vmdesc")]
    SectionNotInVmdesc { name: String, instance: u32 },
    /// The vmdesc lists a subsection the stream does not carry there.
    #[error("{section}: subsection {subsection:?} missing at {at:#x}")]
    MissingSubsection {
        section: String,
        subsection: String,
        at: u64,
    },
    /// A section does not end with `0x7e` and its id where QEMU ends it.
    #[error("section {id} has no footer at {at:#x}")]
    MissingFooter { id: u32, at: u64 },
    #[error("ram section flags {flags:#x} at {at:#x}")]
    RamFlags { flags: u64, at: u64 },
    /// A field [`MASKED`] names is not in the save: its format changed.
    #[error("masked field {section}:{field} not in the save")]
    MaskedFieldMissing {
        section: &'static str,
        field: &'static str,
    },
    #[error("masked field {section}:{field} has {len} bytes, not 8")]
    MaskedFieldSize {
        section: &'static str,
        field: &'static str,
        len: u64,
    },
    /// The stream's `EOF` marker is not right before the vmdesc.
    #[error("end of stream at {at:#x}, the vmdesc at {vmdesc_at:#x}")]
    EofNotAtVmdesc { at: u64, vmdesc_at: u64 },
    #[error("device state of {len} bytes, more than {MAX_DEVICE_STATE}")]
    DeviceStateTooLarge { len: u64 },
    /// More fields, sections or key bytes than any QEMU save has.
    #[error("the save is more complex than any QEMU save: {0}")]
    TooComplex(&'static str),
}

/// One device-state leaf as the digest sees it (for diagnostics: what
/// canon.py's `--dump` prints, with where the bytes are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLeaf {
    /// `section/instance@vversion:path/of/field`.
    pub key: String,
    /// The leaf's bytes are `len` bytes at file offset `at`.
    pub at: u64,
    pub len: u64,
    pub masked: bool,
}

/// The canonical digest of a mapped-ram save (see the module doc for what
/// goes in). `page_digest(file_offset)` names the 4 KiB page at that file
/// offset: `Some(digest)`, or `None` for an all-zero page (which then
/// hashes as if its bitmap bit were clear). The caller chooses: the pages'
/// SHA-256 ([`page_sha256`]), or the block store's id of the 4 KiB block
/// there (the store cuts these saves in fixed 4 KiB blocks aligned to the
/// file, so a page is one block and a zero page a zero run). Digests made
/// with different `page_digest`s are not comparable.
///
/// Reads the head, the RAM blocks' records and bitmaps, the device-state
/// part and the vmdesc, never a page: for a 128 MiB q35 guest, 107,993
/// bytes of a 140,590,995-byte save in 16 reads (4 KiB of head, five
/// 292-byte reads for the RAM block records, six bitmaps of which pc.ram's
/// is the 4 KiB one, a 64 KiB tail holding the 45 KB vmdesc, 33 KB of
/// device state), then calls `page_digest` once per set bitmap bit (11,994
/// pc.ram pages after 3e9 instructions of our guest's boot). Measured by
/// tests/tests/qemu_canon.rs: 4 ms, or 44 ms with [`page_sha256`].
pub fn canonical_digest<S: SaveBytes + ?Sized>(
    save: &S,
    page_digest: impl FnMut(u64) -> io::Result<Option<[u8; 32]>>,
) -> Result<[u8; 32], CanonError> {
    let layout = ram::read_layout(save)?;
    let desc = vmdesc::read(save)?;
    let devices = stream::walk(save, &layout, &desc, None)?;
    let ram = ram::digest(save, &layout, page_digest)?;
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(ram);
    h.update(devices);
    Ok(h.finalize().into())
}

/// Every device-state leaf of a save in stream order, masked ones marked:
/// what [`canonical_digest`] hashes besides the RAM.
pub fn device_leaves<S: SaveBytes + ?Sized>(save: &S) -> Result<Vec<DeviceLeaf>, CanonError> {
    let layout = ram::read_layout(save)?;
    let desc = vmdesc::read(save)?;
    let mut leaves = Vec::new();
    stream::walk(save, &layout, &desc, Some(&mut leaves))?;
    Ok(leaves)
}

/// A `page_digest` for [`canonical_digest`] that reads each page from the
/// save itself: `None` if it is all zero, else its SHA-256.
pub fn page_sha256<S: SaveBytes + ?Sized>(save: &S) -> impl FnMut(u64) -> io::Result<Option<[u8; 32]>> + '_ {
    move |offset| {
        let page = read(save, offset, PAGE_SIZE as usize)?;
        Ok((!crate::piece::is_zero(&page)).then(|| Sha256::digest(&page).into()))
    }
}

/// `len` bytes at `offset`, checked to lie inside the save and to be as
/// many as asked for.
fn read<S: SaveBytes + ?Sized>(save: &S, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    if offset.checked_add(len as u64).is_none_or(|end| end > save.len()) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{len} bytes at {offset:#x} past the end of a {}-byte save",
                save.len()
            ),
        ));
    }
    let bytes = save.read_at(offset, len)?;
    if bytes.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} bytes read of {len} at {offset:#x}", bytes.len()),
        ));
    }
    Ok(bytes)
}
