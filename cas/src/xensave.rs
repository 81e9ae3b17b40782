//! Cutting an `xl save` file along its records, so that each guest page is
//! a block of its own wherever the stream happened to put it.
//!
//! An `xl save` file (libxl stream v2, Xen 4.6 and later; layouts taken
//! from the xen-project/xen tree, whose saver writes libxc image version 3)
//! is three nested formats, all walked here without holding more than one block:
//!
//! 1. the xl header (`tools/xl/xl.h`, `struct save_file_header`): 32 bytes of
//!    magic `"Xen saved domain, xl format\n \0 \r"`, then `byteorder`
//!    (`0x01020304` in the saver's order), `mandatory_flags` (bit 1: stream
//!    v2), `optional_flags`, `optional_data_len`, each a u32; then
//!    `optional_data_len` bytes of optional data (a u32 length and the
//!    domain config as JSON);
//! 2. the libxl migration stream v2 (`docs/specs/libxl-migration-stream.pandoc`):
//!    a 16-byte header (`"LibxlFmt"`, version 2, options; big-endian), then
//!    records `{type u32, length u32, body, zero padding to 8}`; the
//!    `LIBXC_CONTEXT` record (type 1, empty body) is followed inline by
//! 3. the libxc migration stream (`docs/specs/libxc-migration-stream.pandoc`,
//!    `tools/libs/guest/xg_sr_stream_format.h`): a 24-byte image header
//!    (marker all ones, `"XENF"`, version 2 or 3, options; big-endian), a
//!    16-byte domain header (type, `page_shift`, Xen version), then records
//!    of the same framing until its own `END`. A `PAGE_DATA` record (type 1)
//!    is `{count u32, reserved u32, pfn[count] u64}` followed by one page of
//!    data for every pfn whose type (top nibble) is not `BROKEN`, `XALLOC` or
//!    `XTAB`. After the libxc `END`, libxl records (emulator state) resume
//!    until the libxl `END`.
//!
//! Every record header shifts what follows by 8 bytes and every pfn array
//! by 8 bytes a page, so guest pages drift off any fixed grid; cutting at
//! the page bytes themselves makes the same page the same block in every
//! save. Everything between pages (headers, pfn arrays, other records) is
//! cut into blocks of at most `max` bytes, ending where the next page
//! begins.
//!
//! The xl header and the domain config it embeds are read by `header`,
//! for the cutter and for the Xen driver: [`XlHeader::parse`] is the one
//! parser of those 48 bytes, and [`read_saved_config`] says what domain a
//! save file holds, so a checkpoint can be checked against a lot before a
//! domain is built for it.
//!
//! Nothing here trusts the input: from the first thing that does not parse
//! (other magic, big-endian or legacy stream, a record longer than libxc's
//! 128 MiB limit, bytes after the end), the rest of the file, from the
//! first byte not yet cut, is cut into fixed 4 KiB blocks; a truncated
//! stream simply ends. Every byte is handed out exactly once, in order, so
//! any input round-trips.

use std::io::{self, BufReader, Cursor, Read};

use vmlot_schemas::manifest::MAX_BLOCK_BYTES;
use vmlot_schemas::{BlockId, Chunking, HashAlgorithm};

use crate::piece::{Piece, chunk_fixed, is_zero, read_full};

mod header;

pub use header::{
    MAX_XL_OPTIONAL_DATA, SavedConfig, XL_BYTEORDER, XL_FLAG_JSON, XL_FLAG_STREAM_V2, XL_HEADER_LEN,
    XL_MAGIC, XlHeader, XlHeaderError, read_saved_config,
};

const LIBXL_IDENT: [u8; 8] = *b"LibxlFmt";
const LIBXL_VERSION: u32 = 2;
const LIBXL_REC_END: u32 = 0;
const LIBXL_REC_LIBXC_CONTEXT: u32 = 1;

const LIBXC_MARKER: [u8; 8] = [0xff; 8];
const LIBXC_ID: [u8; 4] = *b"XENF";
const LIBXC_REC_END: u32 = 0;
const LIBXC_REC_PAGE_DATA: u32 = 1;
/// `REC_LENGTH_MAX` in `xg_sr_stream_format.h`; longer means we are lost.
const REC_LENGTH_MAX: u32 = 128 << 20;
/// pfn type nibbles `BROKEN`, `XALLOC`, `XTAB`: pfns that carry no page data.
const PFN_TYPES_WITHOUT_DATA: std::ops::RangeInclusive<u64> = 0xd..=0xf;

/// Block size from where the stream stops parsing.
const FALLBACK_BLOCK: u32 = 4096;

/// Pfns read per slab from a PAGE_DATA record (libxc batches 1024).
const PFN_SLAB: usize = 1024;

/// What the walk found, for benchmarks and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XenWalk {
    /// Bytes cut in all.
    pub bytes: u64,
    /// Guest page size from the libxc domain header (0 when none was read).
    pub page_size: u32,
    /// PAGE_DATA records whose layout matched their length.
    pub page_records: u64,
    /// Guest pages cut as blocks of their own.
    pub pages: u64,
    /// Of those, all-zero pages (zero runs in the manifest).
    pub zero_pages: u64,
    /// Where fixed 4 KiB blocks took over, when they did.
    pub fallback: Option<Fallback>,
}

/// The point where the stream stopped parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    /// File offset of the first byte cut as fixed 4 KiB blocks.
    pub offset: u64,
    pub reason: &'static str,
}

/// Cuts an `xl save` stream into pieces as described in the module docs,
/// handing each to `sink` in order. Fails only on I/O (or a sink error) and
/// on a `max` that cannot hold a 4 KiB page.
pub fn chunk_xen_save<R, F>(reader: R, max: u32, hash: HashAlgorithm, mut sink: F) -> io::Result<XenWalk>
where
    R: Read,
    F: FnMut(Piece<'_>) -> io::Result<()>,
{
    if !(Chunking::XEN_MIN_BLOCK..=MAX_BLOCK_BYTES).contains(&max) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "xen-records max block {max} out of range {}..={MAX_BLOCK_BYTES}",
                Chunking::XEN_MIN_BLOCK
            ),
        ));
    }
    let mut cutter = Cutter {
        reader: BufReader::with_capacity(1 << 20, reader),
        gap: Vec::with_capacity(max as usize),
        page: Vec::new(),
        max: max as usize,
        offset: 0,
        walk: XenWalk::default(),
        hash,
        sink: &mut sink,
    };
    let outcome = cutter.walk();
    let Cutter {
        reader,
        gap,
        offset,
        mut walk,
        ..
    } = cutter;
    match outcome {
        Ok(()) | Err(Stop::End) => {
            emit(&mut sink, hash, &gap)?;
            walk.bytes = offset;
        }
        Err(Stop::Io(e)) => return Err(e),
        Err(Stop::Unparsed(reason)) => {
            let start = offset - gap.len() as u64;
            walk.fallback = Some(Fallback {
                offset: start,
                reason,
            });
            let mut rest = CountingReader {
                inner: Cursor::new(gap).chain(reader),
                count: 0,
            };
            chunk_fixed(&mut rest, FALLBACK_BLOCK, hash, &mut sink)?;
            walk.bytes = start + rest.count;
        }
    }
    Ok(walk)
}

/// Why the walk stopped early.
enum Stop {
    /// The input ended (a complete or truncated stream): cut what is held.
    End,
    /// The input is not what we understand: fixed blocks from here.
    Unparsed(&'static str),
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

type Step<T = ()> = Result<T, Stop>;

struct Cutter<'s, R, F> {
    reader: BufReader<R>,
    /// Bytes read but not yet cut: everything since the last page or the
    /// last full `max`-sized block. Never longer than `max`.
    gap: Vec<u8>,
    page: Vec<u8>,
    max: usize,
    /// Bytes read from the input so far.
    offset: u64,
    walk: XenWalk,
    hash: HashAlgorithm,
    sink: &'s mut F,
}

impl<R, F> Cutter<'_, R, F>
where
    R: Read,
    F: FnMut(Piece<'_>) -> io::Result<()>,
{
    fn walk(&mut self) -> Step {
        let xl: [u8; XL_HEADER_LEN] = self.take()?;
        let header = match XlHeader::parse(&xl) {
            Ok(header) if !header.big_endian => header,
            Err(XlHeaderError::NotXlSave) => return Err(Stop::Unparsed("not an xl save file (magic)")),
            Ok(_) | Err(_) => return Err(Stop::Unparsed("xl header is not little-endian")),
        };
        if header.mandatory_flags & XL_FLAG_STREAM_V2 == 0 {
            return Err(Stop::Unparsed("legacy (pre-v2) migration stream"));
        }
        self.skip(header.optional_data_len as u64)?;

        let libxl: [u8; 16] = self.take()?;
        if libxl[..8] != LIBXL_IDENT {
            return Err(Stop::Unparsed("no libxl stream header"));
        }
        if be32(&libxl[8..]) != LIBXL_VERSION {
            return Err(Stop::Unparsed("unknown libxl stream version"));
        }
        if be32(&libxl[12..]) & 1 != 0 {
            return Err(Stop::Unparsed("big-endian libxl stream"));
        }
        loop {
            let (kind, len) = self.record_header()?;
            self.skip(padded(len))?;
            match kind {
                LIBXL_REC_END => break,
                LIBXL_REC_LIBXC_CONTEXT => self.libxc()?,
                _ => {}
            }
        }
        // Anything after the libxl END is not ours to interpret.
        let _: [u8; 1] = self.take()?;
        Err(Stop::Unparsed("bytes after the libxl end record"))
    }

    fn libxc(&mut self) -> Step {
        let image: [u8; 24] = self.take()?;
        if image[..8] != LIBXC_MARKER || image[8..12] != LIBXC_ID {
            return Err(Stop::Unparsed("no libxc image header"));
        }
        if !matches!(be32(&image[12..]), 2 | 3) {
            return Err(Stop::Unparsed("unknown libxc stream version"));
        }
        if u16::from_be_bytes([image[16], image[17]]) & 1 != 0 {
            return Err(Stop::Unparsed("big-endian libxc stream"));
        }
        let domain: [u8; 16] = self.take()?;
        let page_shift = u16::from_le_bytes([domain[4], domain[5]]);
        if !(12..=20).contains(&page_shift) || 1usize << page_shift > self.max {
            return Err(Stop::Unparsed("guest page size does not fit a block"));
        }
        let page_size = 1usize << page_shift;
        self.walk.page_size = page_size as u32;
        loop {
            let (kind, len) = self.record_header()?;
            match kind {
                LIBXC_REC_END => return self.skip(padded(len)),
                LIBXC_REC_PAGE_DATA => self.page_data(len, page_size)?,
                _ => self.skip(padded(len))?,
            }
        }
    }

    /// One PAGE_DATA record: its header and pfn array go to the gap, each
    /// page with data becomes a block. A record whose length does not match
    /// its pfn array is passed over as plain bytes (the framing still holds).
    fn page_data(&mut self, len: u32, page_size: usize) -> Step {
        let body = padded(len);
        if len < 8 {
            return self.skip(body);
        }
        let head: [u8; 8] = self.take()?;
        let count = le32(&head) as u64;
        let mut consumed = 8u64;
        if consumed + 8 * count > len as u64 {
            return self.skip(body - consumed);
        }
        let mut with_data = 0u64;
        let mut slab = vec![0u8; 8 * PFN_SLAB];
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(PFN_SLAB);
            let got = read_full(&mut self.reader, &mut slab[..8 * n])?;
            self.offset += got as u64;
            self.push_gap(&slab[..got])?;
            if got < 8 * n {
                return Err(Stop::End);
            }
            with_data += slab[..8 * n]
                .chunks_exact(8)
                .filter(|pfn| !PFN_TYPES_WITHOUT_DATA.contains(&(le64(pfn) >> 60)))
                .count() as u64;
            left -= n;
        }
        consumed += 8 * count;
        if consumed + with_data * page_size as u64 != len as u64 {
            return self.skip(body - consumed);
        }
        self.walk.page_records += 1;
        for _ in 0..with_data {
            self.guest_page(page_size)?;
        }
        self.skip(body - len as u64)
    }

    /// Ends the gap and cuts the next `page_size` bytes as one block.
    fn guest_page(&mut self, page_size: usize) -> Step {
        self.flush_gap()?;
        let mut page = std::mem::take(&mut self.page);
        page.resize(page_size, 0);
        let got = read_full(&mut self.reader, &mut page)?;
        self.offset += got as u64;
        let result = if got < page_size {
            self.push_gap(&page[..got]).map_err(Stop::from)?;
            Err(Stop::End)
        } else {
            self.walk.pages += 1;
            if is_zero(&page) {
                self.walk.zero_pages += 1;
            }
            emit(self.sink, self.hash, &page).map_err(Stop::from)
        };
        self.page = page;
        result
    }

    fn record_header(&mut self) -> Step<(u32, u32)> {
        let header: [u8; 8] = self.take()?;
        let len = le32(&header[4..]);
        if len > REC_LENGTH_MAX {
            return Err(Stop::Unparsed("record longer than libxc's 128 MiB limit"));
        }
        Ok((le32(&header), len))
    }

    /// Reads `N` bytes into the gap and returns them for parsing.
    fn take<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut buf = [0u8; N];
        let got = read_full(&mut self.reader, &mut buf)?;
        self.offset += got as u64;
        self.push_gap(&buf[..got])?;
        if got < N { Err(Stop::End) } else { Ok(buf) }
    }

    /// Passes `n` bytes into the gap without looking at them.
    fn skip(&mut self, mut n: u64) -> Step {
        while n > 0 {
            let start = self.gap.len();
            let want = ((self.max - start) as u64).min(n) as usize;
            self.gap.resize(start + want, 0);
            let got = read_full(&mut self.reader, &mut self.gap[start..])?;
            self.gap.truncate(start + got);
            self.offset += got as u64;
            n -= got as u64;
            if self.gap.len() == self.max {
                self.flush_gap()?;
            }
            if got < want {
                return Err(Stop::End);
            }
        }
        Ok(())
    }

    fn push_gap(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = (self.max - self.gap.len()).min(bytes.len());
            self.gap.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.gap.len() == self.max {
                self.flush_gap()?;
            }
        }
        Ok(())
    }

    fn flush_gap(&mut self) -> io::Result<()> {
        emit(self.sink, self.hash, &self.gap)?;
        self.gap.clear();
        Ok(())
    }
}

/// Hands one block (or zero run) to the sink; nothing for no bytes.
fn emit<F: FnMut(Piece<'_>) -> io::Result<()>>(
    sink: &mut F,
    hash: HashAlgorithm,
    data: &[u8],
) -> io::Result<()> {
    if data.is_empty() {
        Ok(())
    } else if is_zero(data) {
        sink(Piece::Zero(data.len() as u64))
    } else {
        sink(Piece::Data(BlockId::of(hash, data), data))
    }
}

/// A record body with its padding to the next 8-byte boundary.
fn padded(len: u32) -> u64 {
    (len as u64).next_multiple_of(8)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::{Rng, RngCore, SeedableRng};
    use vmlot_schemas::{Extent, Manifest, ObjectKind};

    use super::*;
    use crate::chunk::manifest_of;

    const PAGE: usize = 4096;

    /// Builds synthetic `xl save` files in the layout the module docs give.
    struct SaveFile {
        bytes: Vec<u8>,
    }

    impl SaveFile {
        /// xl header with `config` as optional data, libxl header, a
        /// TOOLSTACK-like libxl record, LIBXC_CONTEXT, libxc headers.
        fn new(config: &[u8]) -> Self {
            let mut b = Vec::new();
            b.extend_from_slice(&XL_MAGIC);
            b.extend_from_slice(&XL_BYTEORDER.to_le_bytes());
            b.extend_from_slice(&(XL_FLAG_STREAM_V2 | 1).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&(4 + config.len() as u32).to_le_bytes());
            b.extend_from_slice(&(config.len() as u32).to_le_bytes());
            b.extend_from_slice(config);
            b.extend_from_slice(&LIBXL_IDENT);
            b.extend_from_slice(&LIBXL_VERSION.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            let mut file = SaveFile { bytes: b };
            file.record(LIBXL_REC_LIBXC_CONTEXT, &[]);
            file.bytes.extend_from_slice(&LIBXC_MARKER);
            file.bytes.extend_from_slice(&LIBXC_ID);
            file.bytes.extend_from_slice(&3u32.to_be_bytes());
            file.bytes.extend_from_slice(&[0u8; 8]);
            file.bytes.extend_from_slice(&2u32.to_le_bytes()); // x86 HVM
            file.bytes.extend_from_slice(&12u16.to_le_bytes());
            file.bytes.extend_from_slice(&[0u8; 2]);
            file.bytes.extend_from_slice(&4u32.to_le_bytes());
            file.bytes.extend_from_slice(&17u32.to_le_bytes());
            file
        }

        fn record(&mut self, kind: u32, body: &[u8]) {
            self.bytes.extend_from_slice(&kind.to_le_bytes());
            self.bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            self.bytes.extend_from_slice(body);
            let pad = padded(body.len() as u32) as usize - body.len();
            self.bytes.extend(std::iter::repeat_n(0u8, pad));
        }

        /// A PAGE_DATA record; `None` pages are XTAB pfns (no data).
        fn pages(&mut self, first_pfn: u64, pages: &[Option<&[u8]>]) {
            let mut body = Vec::new();
            body.extend_from_slice(&(pages.len() as u32).to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
            for (i, p) in pages.iter().enumerate() {
                let kind: u64 = if p.is_some() { 0 } else { 0xf };
                body.extend_from_slice(&((kind << 60) | (first_pfn + i as u64)).to_le_bytes());
            }
            for p in pages.iter().flatten() {
                assert_eq!(p.len(), PAGE);
                body.extend_from_slice(p);
            }
            self.record(LIBXC_REC_PAGE_DATA, &body);
        }

        /// libxc END, an emulator record, libxl END.
        fn finish(mut self, emulator: &[u8]) -> Vec<u8> {
            self.record(LIBXC_REC_END, &[]);
            let mut body = 2u32.to_le_bytes().to_vec();
            body.extend_from_slice(&0u32.to_le_bytes());
            body.extend_from_slice(emulator);
            self.record(3, &body);
            self.record(LIBXL_REC_END, &[]);
            self.bytes
        }
    }

    fn random_pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut p = vec![0u8; PAGE];
                rng.fill_bytes(&mut p);
                p
            })
            .collect()
    }

    /// Pieces as (block id or None for a zero run, length).
    type Pieces = Vec<(Option<BlockId>, usize)>;

    /// Cuts `data`, checking every piece, and rebuilds it from the pieces.
    fn cut(data: &[u8], max: u32) -> (Pieces, XenWalk, Vec<u8>) {
        let mut pieces = Vec::new();
        let mut rebuilt = Vec::new();
        let walk = chunk_xen_save(data, max, HashAlgorithm::Sha256, |piece| {
            match piece {
                Piece::Zero(n) => {
                    pieces.push((None, n as usize));
                    rebuilt.extend(std::iter::repeat_n(0u8, n as usize));
                }
                Piece::Data(id, d) => {
                    assert_eq!(id, BlockId::of(HashAlgorithm::Sha256, d));
                    pieces.push((Some(id), d.len()));
                    rebuilt.extend_from_slice(d);
                }
            }
            Ok(())
        })
        .unwrap();
        assert!(pieces.iter().all(|&(_, n)| n > 0 && n <= max as usize));
        (pieces, walk, rebuilt)
    }

    fn ids(pieces: &[(Option<BlockId>, usize)]) -> HashSet<BlockId> {
        pieces.iter().filter_map(|(id, _)| *id).collect()
    }

    #[test]
    fn each_page_is_one_block_wherever_it_sits() {
        let pages = random_pages(1, 10);
        let p = |i: usize| Some(&pages[i][..]);
        let mut a = SaveFile::new(b"{\"name\":\"guest\"}\0");
        a.pages(0, &[p(0), p(1), p(2), None, p(3)]);
        a.pages(5, &[p(4), p(5)]);
        let a = a.finish(b"qemu device state");
        // Another save of the same domain: longer config, another record
        // in front, other batching, one page changed, one page zeroed.
        let zero = vec![0u8; PAGE];
        let mut b = SaveFile::new(b"{\"name\":\"guest\",\"uuid\":\"x\"}\0");
        b.record(0x8000_0001, b"optional record");
        b.pages(0, &[p(0), None, p(1)]);
        b.pages(3, &[p(2), p(3), p(6), p(5), Some(&zero[..])]);
        let b = b.finish(b"qemu device state, changed");

        let (pa, wa, ra) = cut(&a, 65536);
        let (pb, wb, rb) = cut(&b, 65536);
        assert_eq!(ra, a);
        assert_eq!(rb, b);
        assert_eq!(wa.fallback, None);
        assert_eq!(wb.fallback, None);
        assert_eq!((wa.pages, wa.page_records, wa.page_size), (6, 2, 4096));
        assert_eq!((wb.pages, wb.zero_pages, wb.page_records), (7, 1, 2));
        assert_eq!((wa.bytes, wb.bytes), (a.len() as u64, b.len() as u64));

        let in_a = ids(&pa);
        for (i, page) in pages.iter().enumerate().take(7) {
            let id = BlockId::of(HashAlgorithm::Sha256, page);
            let in_b = ids(&pb).contains(&id);
            assert_eq!(in_a.contains(&id), i <= 5, "page {i} in a");
            assert_eq!(in_b, i != 4, "page {i} in b");
        }
        // The pages are not 4 KiB aligned in either file, so fixed blocks
        // would have matched nothing.
        let fixed = |d: &[u8]| -> HashSet<BlockId> {
            manifest_of(
                d,
                ObjectKind::MachineState,
                Chunking::FIXED_4K,
                HashAlgorithm::Sha256,
            )
            .unwrap()
            .unique_blocks()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
        };
        assert!(
            pages
                .iter()
                .all(|p| !fixed(&a).contains(&BlockId::of(HashAlgorithm::Sha256, p)))
        );
        assert_eq!(pb.iter().filter(|(id, n)| id.is_none() && *n == PAGE).count(), 1);
    }

    #[test]
    fn long_records_are_cut_at_max() {
        let mut s = SaveFile::new(&[b'c'; 10_000]);
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
        s.record(0x0b, &blob);
        s.pages(0, &[Some(&random_pages(2, 1)[0])]);
        let data = s.finish(&blob);
        let (pieces, walk, rebuilt) = cut(&data, 8192);
        assert_eq!(rebuilt, data);
        assert_eq!(walk.pages, 1);
        assert!(pieces.iter().filter(|(_, n)| *n == 8192).count() >= 20);
        let m = manifest_of(
            &data[..],
            ObjectKind::MachineState,
            Chunking::XenRecords { max: 8192 },
            HashAlgorithm::Sha256,
        )
        .unwrap();
        m.validate().unwrap();
        assert_eq!(m.size, data.len() as u64);
    }

    #[test]
    fn other_files_cut_exactly_like_fixed_4k() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut data = vec![0u8; 50_000];
        rng.fill_bytes(&mut data[..30_000]);
        let xen = manifest_of(
            &data[..],
            ObjectKind::Disk,
            Chunking::XEN_RECORDS,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        let fixed = manifest_of(
            &data[..],
            ObjectKind::Disk,
            Chunking::FIXED_4K,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        assert_eq!(xen.extents, fixed.extents);
        let (_, walk, _) = cut(&data, 65536);
        assert_eq!(
            walk.fallback,
            Some(Fallback {
                offset: 0,
                reason: "not an xl save file (magic)"
            })
        );
    }

    #[test]
    fn every_truncation_round_trips() {
        let pages = random_pages(4, 3);
        let mut s = SaveFile::new(b"cfg\0");
        s.pages(0, &[Some(&pages[0][..]), None, Some(&pages[1][..])]);
        s.pages(3, &[Some(&pages[2][..])]);
        let data = s.finish(b"dm");
        let mut cuts: Vec<usize> = (0..400).collect();
        cuts.extend((400..data.len()).step_by(97));
        for end in cuts {
            let (_, walk, rebuilt) = cut(&data[..end], 4096);
            assert_eq!(rebuilt, &data[..end], "cut at {end}");
            assert_eq!(walk.bytes, end as u64);
        }
    }

    #[test]
    fn damage_falls_back_and_round_trips() {
        let pages = random_pages(5, 4);
        let mut s = SaveFile::new(b"cfg\0");
        s.pages(0, &[Some(&pages[0][..]), Some(&pages[1][..])]);
        let page_record_end = s.bytes.len();
        s.pages(2, &[Some(&pages[2][..]), Some(&pages[3][..])]);
        let last_page_end = s.bytes.len();
        let clean = s.finish(b"dm");

        // A record claiming 1 GiB: the pages before it still match.
        let mut huge = clean.clone();
        huge[page_record_end + 4..page_record_end + 8].copy_from_slice(&(1u32 << 30).to_le_bytes());
        let (pieces, walk, rebuilt) = cut(&huge, 65536);
        assert_eq!(rebuilt, huge);
        assert_eq!(walk.pages, 2);
        assert_eq!(
            walk.fallback.as_ref().map(|f| f.offset),
            Some(page_record_end as u64)
        );
        assert!(ids(&pieces).contains(&BlockId::of(HashAlgorithm::Sha256, &pages[1])));

        // A PAGE_DATA count that does not add up: passed over as bytes.
        let mut miscounted = clean.clone();
        miscounted[page_record_end + 8] = 1;
        let (_, walk, rebuilt) = cut(&miscounted, 65536);
        assert_eq!(rebuilt, miscounted);
        assert_eq!((walk.pages, walk.page_records, walk.fallback), (2, 1, None));

        // Trailing bytes after the libxl END.
        let mut trailing = clean.clone();
        trailing.extend_from_slice(b"tail");
        let (_, walk, rebuilt) = cut(&trailing, 65536);
        assert_eq!(rebuilt, trailing);
        assert_eq!(walk.pages, 4);
        // Fixed blocks start at the first byte not yet cut: after the last page.
        assert_eq!(walk.fallback.map(|f| f.offset), Some(last_page_end as u64));

        // Big-endian, legacy and other-version streams are not walked.
        for (at, byte) in [(32usize, 0x01u8), (36, 0x01), (48 + 8 + 11, 9)] {
            let mut bad = clean.clone();
            bad[at] = byte;
            let (_, walk, rebuilt) = cut(&bad, 65536);
            assert_eq!(rebuilt, bad);
            assert!(walk.fallback.is_some(), "byte {at}");
            assert_eq!(walk.pages, 0);
        }
    }

    #[test]
    fn random_input_round_trips() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let pages = random_pages(7, 2);
        let mut s = SaveFile::new(b"cfg\0");
        s.pages(0, &[Some(&pages[0][..]), Some(&pages[1][..])]);
        let valid = s.finish(b"dm");
        for round in 0..300 {
            // Random bytes, and the valid stream with random bytes flipped
            // or spliced in (so the walk gets deep before it is lost).
            let data = if round % 2 == 0 {
                let mut d = vec![0u8; rng.gen_range(0..20_000)];
                rng.fill_bytes(&mut d);
                d
            } else {
                let mut d = valid.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..d.len());
                    if rng.gen_bool(0.5) {
                        d[at] = rng.r#gen();
                    } else {
                        let mut junk = vec![0u8; rng.gen_range(1..64)];
                        rng.fill_bytes(&mut junk);
                        d.splice(at..at, junk);
                    }
                }
                d
            };
            let max = [4096u32, 5000, 65536][round % 3];
            let (_, walk, rebuilt) = cut(&data, max);
            assert_eq!(rebuilt, data, "round {round}");
            assert_eq!(walk.bytes, data.len() as u64);
            let m = manifest_of(
                &data[..],
                ObjectKind::Blob,
                Chunking::XenRecords { max },
                HashAlgorithm::Sha256,
            )
            .unwrap();
            m.validate().unwrap();
            assert_eq!(m.size, data.len() as u64);
        }
    }

    #[test]
    fn a_max_below_a_page_is_refused() {
        let err = chunk_xen_save(&b""[..], 2048, HashAlgorithm::Sha256, |_| Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn zero_pages_become_zero_runs() {
        let zero = vec![0u8; PAGE];
        let data_page = random_pages(8, 1);
        let mut s = SaveFile::new(b"cfg\0");
        s.pages(0, &[Some(&zero[..]), Some(&zero[..]), Some(&data_page[0][..])]);
        let data = s.finish(b"dm");
        let m: Manifest = manifest_of(
            &data[..],
            ObjectKind::MachineState,
            Chunking::XEN_RECORDS,
            HashAlgorithm::Sha256,
        )
        .unwrap();
        assert!(m.extents.contains(&Extent::Zero { z: 2 * PAGE as u64 }));
        assert!(
            m.unique_blocks()
                .iter()
                .any(|(id, _)| *id == BlockId::of(HashAlgorithm::Sha256, &data_page[0]))
        );
    }
}
