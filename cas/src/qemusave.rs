//! The head of a QEMU migration stream saved to a file, as the provider's
//! QEMU driver writes a checkpoint (`migrate` to a `file` channel with the
//! `mapped-ram` capability, QEMU 10, `-machine q35`): enough to tell whether
//! a claimed machine state is the right kind of state for a lot (machine
//! type, RAM blocks and their sizes) without reading the guest's memory.
//! Pure: bytes in, a [`QemuSaveHeader`] or a named error out.
//!
//! Layout, integers big-endian, as QEMU 10.0 writes it (checked against real
//! saves; fixtures in `cas/tests/data/`):
//!
//! ```text
//! "QEVM" u32 3                                   qemu_savevm_state_header
//! 0x07 u32 len machine ("pc-q35-10.0")           QEMU_VM_CONFIGURATION, then its
//!   (0x05 u8 len name u32 1 fields)*             subsections, in this order if needed:
//!                                                target-page-bits (u32), capabilities
//!                                                (u32 n, n × (u8 len name)), uuid ([u8; 16])
//! 0x01 u32 section_id u8 3 "ram" u32 0 u32 4     QEMU_VM_SECTION_START of "ram"
//! u64 ram_total | 0x04                           ram_save_setup: RAM_SAVE_FLAG_MEM_SIZE
//! per block: u8 len idstr u64 used_length        largest block first
//!   with x-ignore-shared: u64 addr               the block's guest-physical address
//!   with mapped-ram: u32 1 u64 4096 u64 bitmap_offset u64 pages_offset
//! ```
//!
//! With mapped-ram the block records are not contiguous: after each record
//! QEMU seeks past the block's bitmap and pages (`mapped_ram_setup_ramblock`
//! in migration/ram.c), so the next record starts at `pages_offset +
//! used_length`, 129 MiB into a 128 MiB guest's save. The first
//! [`HEADER_PREFIX`] bytes hold everything up to the first block, the guest's
//! RAM ([`GUEST_RAM_ID`]); the other blocks (ROMs, 520 KiB on q35) are read a
//! record at a time at [`QemuSaveHeader::next_block_at`].
//!
//! A stream without mapped-ram parses too (its records are contiguous), as
//! does one saved with `x-ignore-shared` (the guest's RAM in a shared file
//! the save leaves out; the driver then saves without mapped-ram, see
//! `provider/src/driver/qemu/vm.rs`). Refused by name: another magic or
//! version, any other capability, the two together (QEMU 10.0 cannot write
//! them: "Failed to write bitmap to file: Bad address", fixed upstream in
//! December 2025 with a format change), and anything but ram's setup as the
//! first section (e.g. an early-setup device such as virtio-mem).

/// Leading bytes of a save that always hold the head up to the end of the
/// first RAM block's record (at most 789 bytes; a real q35 save needs
/// 139), rounded up to one 4 KiB store block.
pub const HEADER_PREFIX: usize = 4096;
/// Bytes at [`QemuSaveHeader::next_block_at`] that always hold one record.
/// (A record has the mapped-ram header or, with x-ignore-shared, an
/// address: never both, and the header is the longer.)
pub const RAM_BLOCK_RECORD_MAX: usize = 1 + MAX_ID + 8 + MAPPED_RAM_HEADER_LEN;
/// More RAM blocks than any machine of ours has (q35 has six).
pub const MAX_RAM_BLOCKS: usize = 64;
/// The guest's RAM on the pc and q35 machines (`default_ram_id`): its
/// `used_length` is exactly `memory_mib << 20`. QEMU lists blocks largest
/// (reserved size) first, so for any real guest it is the first block.
pub const GUEST_RAM_ID: &str = "pc.ram";

const MAGIC: &[u8; 4] = b"QEVM";
const VERSION: u32 = 3;
const SECTION_START: u8 = 0x01;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const RAM_VERSION: u32 = 4;
const FLAG_MEM_SIZE: u64 = 0x04;
const PAGE_SIZE: u64 = 4096;
const MAPPED_RAM_HEADER_LEN: usize = 4 + 3 * 8;
const MAPPED_RAM_ALIGNMENT: u64 = 1 << 20;
/// QEMU's `idstr` and machine names: a length byte, at most 255 bytes.
const MAX_ID: usize = 255;
/// QEMU 10 validates two capabilities; more than this is not QEMU.
const MAX_CAPS: u32 = 8;
/// The capabilities accepted; any other would change the layout or is unknown.
const MAPPED_RAM: &str = "mapped-ram";
const IGNORE_SHARED: &str = "x-ignore-shared";
const SUBSECTIONS: [&str; 3] = [
    "configuration/target-page-bits",
    "configuration/capabilities",
    "configuration/uuid",
];
/// The longest head up to the end of the first block's record, with
/// `caps` names of `cap` bytes each and a first record of `record` bytes.
const fn worst_head(cap: usize, record: usize) -> usize {
    8 + (1 + 4 + MAX_ID)
        + (2 + SUBSECTIONS[0].len() + 4 + 4)
        + (2 + SUBSECTIONS[1].len() + 4 + 4 + MAX_CAPS as usize * (1 + cap))
        + (2 + SUBSECTIONS[2].len() + 4 + 16)
        + (1 + 4 + 1 + 3 + 4 + 4 + 8)
        + record
}
const WORST_MAPPED: usize = worst_head(MAPPED_RAM.len(), RAM_BLOCK_RECORD_MAX);
const WORST_IGNORE_SHARED: usize = worst_head(IGNORE_SHARED.len(), 1 + MAX_ID + 8 + 8);
const WORST_HEAD: usize = if WORST_MAPPED > WORST_IGNORE_SHARED {
    WORST_MAPPED
} else {
    WORST_IGNORE_SHARED
};
const _: () = assert!(WORST_HEAD <= HEADER_PREFIX);

/// What the head of a QEMU save says about the machine it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuSaveHeader {
    /// The machine type (`pc-q35-10.0`), absent when QEMU sends no
    /// configuration section.
    pub machine: Option<String>,
    /// Saved with the `mapped-ram` capability (as our driver saves a guest
    /// whose RAM is in the save).
    pub mapped_ram: bool,
    /// Saved with `x-ignore-shared`: RAM blocks backed by a shared file
    /// (the guest's, when the driver runs it so) are listed, not saved.
    pub ignore_shared: bool,
    /// The sum of every block's `used_length`, declared before the blocks.
    pub ram_total: u64,
    /// The blocks read so far, in stream order; all of them once
    /// [`QemuSaveHeader::next_block_at`] is `None`.
    pub ram_blocks: Vec<RamBlock>,
    next_at: u64,
}

/// One RAM block's record in the `ram` section's setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub id: String,
    pub used_length: u64,
    /// Its guest-physical address, with x-ignore-shared.
    pub addr: Option<u64>,
    /// Where its dirty bitmap and pages lie in the file, with mapped-ram.
    pub mapped: Option<MappedRam>,
}

/// A block's `MappedRamHeader`: file offsets, checked to be QEMU's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRam {
    pub bitmap_offset: u64,
    pub pages_offset: u64,
}

/// Why the head of a save was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QemuSaveError {
    #[error("not a QEMU migration stream (no QEVM magic)")]
    NotQemu,
    #[error("QEMU migration stream version {0}, not {VERSION}")]
    Version(u32),
    /// The bytes end too early: at least `need` bytes (from the start of
    /// the slice given) are needed to go on.
    #[error("truncated: at least {need} bytes needed")]
    Truncated { need: usize },
    #[error("migration capability {0:?} changes the layout or is unknown")]
    Capability(String),
    #[error("more than {MAX_RAM_BLOCKS} RAM blocks")]
    TooManyBlocks,
    #[error("malformed QEMU migration stream: {0}")]
    Malformed(String),
}

fn malformed(why: impl Into<String>) -> QemuSaveError {
    QemuSaveError::Malformed(why.into())
}

/// Reads the head of a save from `prefix`: everything up to the first RAM
/// block's record, and the later records that lie inside `prefix` (all of
/// them for a whole file, or for a stream without mapped-ram).
pub fn parse_header(prefix: &[u8]) -> Result<QemuSaveHeader, QemuSaveError> {
    let n = prefix.len().min(MAGIC.len());
    if prefix[..n] != MAGIC[..n] {
        return Err(QemuSaveError::NotQemu);
    }
    let mut r = Reader {
        bytes: prefix,
        pos: MAGIC.len(),
    };
    let version = r.be32()?;
    if version != VERSION {
        return Err(QemuSaveError::Version(version));
    }
    let (mut machine, mut mapped_ram, mut ignore_shared) = (None, false, false);
    if r.peek()? == CONFIGURATION {
        r.pos += 1;
        let len = r.be32()? as usize;
        if len > MAX_ID {
            return Err(malformed(format!("machine type of {len} bytes")));
        }
        machine = Some(r.string(len, "machine type")?);
        let mut next = 0;
        while r.peek()? == SUBSECTION {
            r.pos += 1;
            let name = r.id("subsection name")?;
            let Some(i) = SUBSECTIONS[next..].iter().position(|s| *s == name) else {
                return Err(malformed(format!("unexpected subsection {name:?}")));
            };
            next += i + 1;
            if r.be32()? != 1 {
                return Err(malformed(format!("subsection {name:?} of another version")));
            }
            if next == 2 {
                let count = r.be32()?;
                if count > MAX_CAPS {
                    return Err(malformed(format!("{count} capabilities")));
                }
                for _ in 0..count {
                    match r.id("capability")? {
                        cap if cap == MAPPED_RAM => mapped_ram = true,
                        cap if cap == IGNORE_SHARED => ignore_shared = true,
                        cap => return Err(QemuSaveError::Capability(cap)),
                    }
                }
            } else {
                // target-page-bits: a u32; uuid: 16 bytes.
                r.take(if next == 1 { 4 } else { 16 })?;
            }
        }
    }
    if mapped_ram && ignore_shared {
        return Err(QemuSaveError::Capability(format!(
            "{MAPPED_RAM} with {IGNORE_SHARED}"
        )));
    }
    let (kind, _section_id) = (r.u8()?, r.be32()?);
    let (idstr, instance, version) = (r.id("section name")?, r.be32()?, r.be32()?);
    if kind != SECTION_START || idstr != "ram" || instance != 0 || version != RAM_VERSION {
        return Err(malformed(format!(
            "section {kind:#04x} {idstr:?} instance {instance} version {version} where ram's setup belongs"
        )));
    }
    let word = r.be64()?;
    let ram_total = word & !(PAGE_SIZE - 1);
    if word & (PAGE_SIZE - 1) != FLAG_MEM_SIZE || ram_total == 0 {
        return Err(malformed(format!(
            "RAM setup word {word:#x} declares no RAM size"
        )));
    }
    let mut header = QemuSaveHeader {
        machine,
        mapped_ram,
        ignore_shared,
        ram_total,
        ram_blocks: Vec::new(),
        next_at: r.pos as u64,
    };
    header.read_next_block(&prefix[r.pos..]).map_err(|e| match e {
        QemuSaveError::Truncated { need } => QemuSaveError::Truncated { need: need + r.pos },
        e => e,
    })?;
    // Later records that lie whole inside the prefix; the caller reads
    // the others at next_block_at().
    while let Some(at) = header.next_block_at() {
        let Some(rest) = usize::try_from(at).ok().and_then(|at| prefix.get(at..)) else {
            break;
        };
        match header.read_next_block(rest) {
            Ok(_) => {}
            Err(QemuSaveError::Truncated { .. }) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(header)
}

impl QemuSaveHeader {
    /// Where the next block's record starts in the file, or `None` once
    /// the blocks read add up to [`QemuSaveHeader::ram_total`].
    pub fn next_block_at(&self) -> Option<u64> {
        (self.read_length() < self.ram_total).then_some(self.next_at)
    }

    /// Reads the record at [`QemuSaveHeader::next_block_at`] from `bytes`
    /// (the file from there on; [`RAM_BLOCK_RECORD_MAX`] bytes, or to its
    /// end, are enough) and returns its length; 0 if all blocks are read.
    pub fn read_next_block(&mut self, bytes: &[u8]) -> Result<usize, QemuSaveError> {
        let Some(at) = self.next_block_at() else {
            return Ok(0);
        };
        if self.ram_blocks.len() == MAX_RAM_BLOCKS {
            return Err(QemuSaveError::TooManyBlocks);
        }
        let mut r = Reader { bytes, pos: 0 };
        let (id, used_length) = (r.id("RAM block id")?, r.be64()?);
        if id.is_empty() || self.ram_blocks.iter().any(|b| b.id == id) {
            return Err(malformed(format!("RAM block id {id:?} empty or repeated")));
        }
        let left = self.ram_total - self.read_length();
        if used_length == 0 || used_length % PAGE_SIZE != 0 || used_length > left {
            return Err(malformed(format!(
                "RAM block {id:?} of {used_length:#x} bytes, {left:#x} left"
            )));
        }
        let addr = if self.ignore_shared { Some(r.be64()?) } else { None };
        let overflow = || malformed("file offsets overflow");
        let mapped = if self.mapped_ram {
            let (version, page_size) = (r.be32()?, r.be64()?);
            let (bitmap_offset, pages_offset) = (r.be64()?, r.be64()?);
            let end = at.checked_add(r.pos as u64).ok_or_else(overflow)?;
            let bitmap = (used_length / PAGE_SIZE).div_ceil(64) * 8;
            let pages = end
                .checked_add(bitmap)
                .and_then(|b| b.checked_next_multiple_of(MAPPED_RAM_ALIGNMENT));
            if version != 1 || page_size != PAGE_SIZE || bitmap_offset != end || Some(pages_offset) != pages {
                return Err(malformed(format!(
                    "mapped-ram header of {id:?}: version {version}, page size {page_size}, \
                     bitmap at {bitmap_offset:#x}, pages at {pages_offset:#x}"
                )));
            }
            Some(MappedRam {
                bitmap_offset,
                pages_offset,
            })
        } else {
            None
        };
        let next = match mapped {
            Some(m) => m.pages_offset.checked_add(used_length),
            None => at.checked_add(r.pos as u64),
        };
        self.next_at = next.ok_or_else(overflow)?;
        self.ram_blocks.push(RamBlock {
            id,
            used_length,
            addr,
            mapped,
        });
        Ok(r.pos)
    }

    /// Where the migration stream goes on once every block's record has
    /// been read (with mapped-ram: right after the last block's pages), or
    /// `None` while [`QemuSaveHeader::next_block_at`] still has one to read.
    pub fn stream_resumes_at(&self) -> Option<u64> {
        self.next_block_at().is_none().then_some(self.next_at)
    }

    /// The guest's RAM block, if read yet.
    pub fn guest_ram(&self) -> Option<&RamBlock> {
        self.ram_blocks.iter().find(|b| b.id == GUEST_RAM_ID)
    }

    fn read_length(&self) -> u64 {
        self.ram_blocks.iter().map(|b| b.used_length).sum()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QemuSaveError> {
        let end = self.pos.saturating_add(n);
        let got = self
            .bytes
            .get(self.pos..end)
            .ok_or(QemuSaveError::Truncated { need: end })?;
        self.pos = end;
        Ok(got)
    }
    fn peek(&self) -> Result<u8, QemuSaveError> {
        self.bytes
            .get(self.pos)
            .copied()
            .ok_or(QemuSaveError::Truncated { need: self.pos + 1 })
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], QemuSaveError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, QemuSaveError> {
        Ok(self.array::<1>()?[0])
    }
    fn be32(&mut self) -> Result<u32, QemuSaveError> {
        self.array().map(u32::from_be_bytes)
    }
    fn be64(&mut self) -> Result<u64, QemuSaveError> {
        self.array().map(u64::from_be_bytes)
    }
    fn string(&mut self, len: usize, what: &str) -> Result<String, QemuSaveError> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }
    /// A length byte and that many bytes, as QEMU writes an `idstr`.
    fn id(&mut self, what: &str) -> Result<String, QemuSaveError> {
        let len = self.u8()? as usize;
        self.string(len, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    // The first 512 bytes of real saves by QEMU 10.0.2 (TCG, q35, the test guest) and, laid
    // end to end, the later records of the 128 MiB one cut out at their offsets.
    const MAPPED_128: &[u8] = include_bytes!("../tests/data/qemu10-q35-128m-mapped.head");
    const MAPPED_256: &[u8] = include_bytes!("../tests/data/qemu10-q35-256m-mapped.head");
    const CLASSIC_128: &[u8] = include_bytes!("../tests/data/qemu10-q35-128m-classic.head");
    const RECORDS_128: &[u8] = include_bytes!("../tests/data/qemu10-q35-128m-mapped.records");
    // A save with x-ignore-shared of a guest whose RAM is a shared file.
    const NO_RAM_128: &[u8] = include_bytes!("../tests/data/qemu10-q35-128m-ignore-shared.head");
    const ROMS: [(&str, u64); 5] = [
        ("/rom@etc/acpi/tables", 0x20000),
        ("pc.bios", 0x40000),
        ("pc.rom", 0x20000),
        ("/rom@etc/table-loader", 0x1000),
        ("/rom@etc/acpi/rsdp", 0x1000),
    ];
    const MIB: u64 = 1 << 20;

    fn sizes(h: &QemuSaveHeader) -> Vec<(&str, u64)> {
        h.ram_blocks
            .iter()
            .map(|b| (b.id.as_str(), b.used_length))
            .collect()
    }

    #[test]
    fn reads_the_head_of_a_real_mapped_ram_save() {
        for (bytes, mib) in [(MAPPED_128, 128), (MAPPED_256, 256)] {
            let h = parse_header(&bytes[..0x8b]).unwrap();
            assert_eq!(h.machine.as_deref(), Some("pc-q35-10.0"));
            assert!(h.mapped_ram);
            assert_eq!(h.ram_total, mib * MIB + 520 * 1024);
            assert_eq!(sizes(&h), [(GUEST_RAM_ID, mib * MIB)]);
            let mapped = MappedRam {
                bitmap_offset: 0x8b,
                pages_offset: MIB,
            };
            assert_eq!(h.ram_blocks[0].mapped, Some(mapped));
            assert_eq!(h.next_block_at(), Some(MIB + mib * MIB));
            assert_eq!(parse_header(bytes), Ok(h));
        }
    }

    #[test]
    fn walks_the_later_blocks_of_a_real_save() {
        let mut h = parse_header(MAPPED_128).unwrap();
        let (mut rest, mut ats) = (RECORDS_128, vec![]);
        while let Some(at) = h.next_block_at() {
            assert_eq!(h.stream_resumes_at(), None);
            ats.push(at);
            rest = &rest[h.read_next_block(rest).unwrap()..];
        }
        assert!(rest.is_empty());
        assert_eq!(h.stream_resumes_at(), Some(0x860_1000));
        assert_eq!(ats, [0x810_0000, 0x822_0000, 0x834_0000, 0x842_0000, 0x850_1000]);
        assert_eq!(sizes(&h)[1..], ROMS);
        assert_eq!(h.guest_ram().map(|b| b.used_length), Some(128 * MIB));
        assert_eq!(h.read_next_block(b"anything"), Ok(0));
    }

    #[test]
    fn reads_every_block_of_a_real_classic_save_from_its_prefix() {
        let h = parse_header(CLASSIC_128).unwrap();
        assert_eq!((h.machine.as_deref(), h.mapped_ram), (Some("pc-q35-10.0"), false));
        assert_eq!(sizes(&h)[0], (GUEST_RAM_ID, 128 * MIB));
        assert_eq!(sizes(&h)[1..], ROMS);
        assert!(h.ram_blocks.iter().all(|b| b.mapped.is_none()));
        assert_eq!(h.next_block_at(), None);
    }

    #[test]
    fn reads_a_real_save_that_leaves_the_shared_ram_out() {
        let h = parse_header(NO_RAM_128).unwrap();
        assert_eq!(h.machine.as_deref(), Some("pc-q35-10.0"));
        assert!(h.ignore_shared && !h.mapped_ram, "{h:?}");
        assert_eq!(sizes(&h)[0], (GUEST_RAM_ID, 128 * MIB));
        assert_eq!(sizes(&h)[1..], ROMS);
        assert_eq!(h.guest_ram().and_then(|b| b.addr), Some(0));
        assert!(
            h.ram_blocks
                .iter()
                .all(|b| b.mapped.is_none() && b.addr.is_some())
        );
        assert_eq!(h.next_block_at(), None);
    }

    /// QEMU 10.0 cannot write mapped-ram and x-ignore-shared together, and
    /// a later QEMU writes another layout for them: refused by name.
    #[test]
    fn refuses_mapped_ram_with_ignore_shared() {
        let caps = b"configuration/capabilities";
        let at = MAPPED_128.windows(caps.len()).position(|w| w == caps).unwrap() + caps.len();
        // u32 version, u32 count, then the names.
        assert_eq!(MAPPED_128[at..at + 8], [0, 0, 0, 1, 0, 0, 0, 1]);
        let mut both = MAPPED_128[..at + 4].to_vec();
        both.extend_from_slice(&2u32.to_be_bytes());
        both.push(IGNORE_SHARED.len() as u8);
        both.extend_from_slice(IGNORE_SHARED.as_bytes());
        both.extend_from_slice(&MAPPED_128[at + 8..]);
        assert_eq!(
            parse_header(&both),
            Err(QemuSaveError::Capability(format!(
                "{MAPPED_RAM} with {IGNORE_SHARED}"
            )))
        );
    }

    #[test]
    fn every_truncation_asks_for_more() {
        // Where the first block's record ends.
        for (bytes, end) in [(MAPPED_128, 0x8b), (CLASSIC_128, 0x40)] {
            let whole = parse_header(bytes).unwrap();
            for len in 0..bytes.len() {
                match parse_header(&bytes[..len]) {
                    Err(QemuSaveError::Truncated { need }) => assert!(len < need && need <= end, "{len}"),
                    Ok(h) => assert!(len >= end && whole.ram_blocks.starts_with(&h.ram_blocks), "{len}"),
                    Err(e) => panic!("{len}: {e}"),
                }
            }
        }
        let mut h = parse_header(MAPPED_128).unwrap();
        for len in 0..0x39 {
            let got = h.read_next_block(&RECORDS_128[..len]);
            assert!(
                matches!(got, Err(QemuSaveError::Truncated { need }) if need > len),
                "{len}"
            );
        }
        assert_eq!(h.read_next_block(&RECORDS_128[..0x39]), Ok(0x39));
    }

    fn patched(at: usize, bytes: &[u8]) -> Result<QemuSaveHeader, QemuSaveError> {
        let mut save = MAPPED_128.to_vec();
        save[at..at + bytes.len()].copy_from_slice(bytes);
        parse_header(&save)
    }

    fn is_malformed<T>(got: Result<T, QemuSaveError>) -> bool {
        matches!(got, Err(QemuSaveError::Malformed(_)))
    }

    #[test]
    fn refuses_other_streams_by_name() {
        assert_eq!(parse_header(b"QEVX"), Err(QemuSaveError::NotQemu));
        assert_eq!(parse_header(b"Xen saved domain"), Err(QemuSaveError::NotQemu));
        assert_eq!(parse_header(b"QE"), Err(QemuSaveError::Truncated { need: 8 }));
        assert_eq!(patched(4, &[0, 0, 0, 4]), Err(QemuSaveError::Version(4)));
        let other = Err(QemuSaveError::Capability("mapped-rom".into()));
        assert_eq!(patched(0x3d, b"mapped-rom"), other);
        assert!(is_malformed(patched(0x19, b"configuration/capabilitiez")));
        assert!(is_malformed(patched(0x4d, b"rom"))); // another section first
        assert!(is_malformed(patched(0x5f, &[0x05]))); // setup flags
        assert!(is_malformed(patched(0x70, &[2]))); // mapped-ram header version
    }

    #[test]
    fn refuses_absurd_lengths_and_offsets() {
        assert!(is_malformed(patched(9, &u32::MAX.to_be_bytes()))); // machine type
        assert!(is_malformed(patched(0x38, &u32::MAX.to_be_bytes()))); // capability count
        assert!(is_malformed(patched(0x67, &(!0xfffu64).to_be_bytes()))); // used_length
        assert!(is_malformed(patched(0x67, &(128 * MIB + 1).to_be_bytes())));
        assert!(is_malformed(patched(0x7b, &0x8cu64.to_be_bytes()))); // bitmap_offset
        assert!(is_malformed(patched(0x83, &(u64::MAX - 4095).to_be_bytes()))); // pages_offset
        // Blocks that overrun the declared total, repeat an id, or outnumber the bound.
        let mut h = parse_header(MAPPED_128).unwrap();
        let mut big = RECORDS_128[..0x39].to_vec();
        big[0x15..0x1d].copy_from_slice(&MIB.to_be_bytes());
        assert!(is_malformed(h.read_next_block(&big)));
        assert!(is_malformed(
            h.read_next_block(&[b"\x06pc.ram", &RECORDS_128[0x15..0x39]].concat())
        ));
        let blocks = MAX_RAM_BLOCKS as u64 + 1;
        let mut classic = CLASSIC_128[..0x29].to_vec();
        classic.extend(((blocks * PAGE_SIZE) | FLAG_MEM_SIZE).to_be_bytes());
        for i in 0..blocks {
            classic.extend(format!("\x03b{i:02}").bytes().chain(PAGE_SIZE.to_be_bytes()));
        }
        assert_eq!(parse_header(&classic), Err(QemuSaveError::TooManyBlocks));
    }

    #[test]
    fn the_longest_head_fits_the_prefix() {
        let sub = |name: &str| {
            [
                &[SUBSECTION, name.len() as u8][..],
                name.as_bytes(),
                &[0, 0, 0, 1],
            ]
            .concat()
        };
        let mut head = [&MAPPED_128[..8], &[CONFIGURATION, 0, 0, 0, 255], &[b'm'; 255]].concat();
        head.extend(sub(SUBSECTIONS[0]).into_iter().chain([0, 0, 0, 12]));
        head.extend(sub(SUBSECTIONS[1]).into_iter().chain(MAX_CAPS.to_be_bytes()));
        head.extend(b"\x0amapped-ram".repeat(MAX_CAPS as usize));
        head.extend(sub(SUBSECTIONS[2]).into_iter().chain([0; 16]));
        head.extend(&MAPPED_128[0x47..0x58]); // the ram section's header
        head.extend((MIB | FLAG_MEM_SIZE).to_be_bytes());
        head.extend([255].into_iter().chain([b'x'; 255]).chain(MIB.to_be_bytes()));
        let bitmap_offset = (head.len() + MAPPED_RAM_HEADER_LEN) as u64;
        head.extend([0, 0, 0, 1].into_iter().chain(PAGE_SIZE.to_be_bytes()));
        head.extend(bitmap_offset.to_be_bytes().into_iter().chain(MIB.to_be_bytes()));
        assert_eq!(head.len(), WORST_MAPPED);
        let h = parse_header(&head).unwrap();
        assert_eq!((h.ram_blocks[0].id.len(), h.next_block_at()), (255, None));

        // With x-ignore-shared: longer names, and an address for a header.
        let mut head = [&MAPPED_128[..8], &[CONFIGURATION, 0, 0, 0, 255], &[b'm'; 255]].concat();
        head.extend(sub(SUBSECTIONS[0]).into_iter().chain([0, 0, 0, 12]));
        head.extend(sub(SUBSECTIONS[1]).into_iter().chain(MAX_CAPS.to_be_bytes()));
        head.extend(b"\x0fx-ignore-shared".repeat(MAX_CAPS as usize));
        head.extend(sub(SUBSECTIONS[2]).into_iter().chain([0; 16]));
        head.extend(&MAPPED_128[0x47..0x58]);
        head.extend((MIB | FLAG_MEM_SIZE).to_be_bytes());
        head.extend([255].into_iter().chain([b'x'; 255]).chain(MIB.to_be_bytes()));
        head.extend(0u64.to_be_bytes());
        assert_eq!(head.len(), WORST_IGNORE_SHARED);
        let h = parse_header(&head).unwrap();
        assert!(h.ignore_shared);
        assert_eq!((h.ram_blocks[0].id.len(), h.next_block_at()), (255, None));
    }

    #[test]
    fn hostile_bytes_never_panic() {
        for bytes in [MAPPED_128, CLASSIC_128] {
            for bit in 0..0xc0 * 8 {
                let mut save = bytes.to_vec();
                save[bit / 8] ^= 1 << (bit % 8);
                let _ = parse_header(&save);
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let mut h = parse_header(MAPPED_128).unwrap();
        for _ in 0..5000 {
            let len = rng.gen_range(0..400);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let _ = h.clone().read_next_block(&junk);
            junk.splice(0..0, MAPPED_128[..rng.gen_range(0..0x90)].iter().copied());
            let _ = parse_header(&junk);
        }
        h.next_at = u64::MAX - 10;
        assert!(is_malformed(h.read_next_block(&RECORDS_128[..0x39])));
    }
}
