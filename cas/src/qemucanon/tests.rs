//! A small save laid out as QEMU 10.0 lays out a mapped-ram save (two RAM
//! blocks, the `timer` section and a device with a struct array and a
//! subsection), what the digest makes of it, and hostile variants of it.
//! Real saves: tests/tests/qemu_canon.rs.

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::*;

const MIB: u64 = 1 << 20;

/// (page index, fill byte) of each page whose bitmap bit is set.
type Held = Vec<(u64, u8)>;

/// The parts of a fake save; [`Fake::build`] lays them out.
struct Fake {
    /// (id, pages, the pages held).
    blocks: Vec<(&'static str, u64, Held)>,
    /// The stream from the end of the last block's pages up to EOF.
    stream: Vec<u8>,
    /// Between EOF and the vmdesc (nothing, in QEMU's saves).
    trailer: Vec<u8>,
    vmdesc: Value,
    caps: Vec<&'static str>,
}

fn full(id: u32, name: &str, instance: u32, version: u32, body: &[u8]) -> Vec<u8> {
    let mut s = vec![0x04];
    s.extend(id.to_be_bytes());
    s.push(name.len() as u8);
    s.extend(name.as_bytes());
    s.extend(instance.to_be_bytes());
    s.extend(version.to_be_bytes());
    s.extend(body);
    s.push(0x7e);
    s.extend(id.to_be_bytes());
    s
}

fn subsection(name: &str, version: u32) -> Vec<u8> {
    [
        &[0x05, name.len() as u8][..],
        name.as_bytes(),
        &version.to_be_bytes(),
    ]
    .concat()
}

/// ram's PART with these flag words, and its footer.
fn ram_part(words: &[u64]) -> Vec<u8> {
    let mut s = vec![0x02, 0, 0, 0, 2];
    s.extend(words.iter().flat_map(|w| w.to_be_bytes()));
    s.extend([0x7e, 0, 0, 0, 2]);
    s
}

fn timer_body() -> Vec<u8> {
    let mut b = [0x11u8; 8].to_vec(); // cpu_ticks_offset
    b.extend([0; 8]); // unused
    b.extend([0x22; 8]); // cpu_clock_offset
    b.extend(subsection("timer/icount", 1));
    b.extend(7u64.to_be_bytes()); // qemu_icount_bias
    b.extend(3_000_000_000u64.to_be_bytes()); // qemu_icount
    b
}

fn dev_body() -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..2u8 {
        b.extend([0, 0, 0, i, 0xb0 + i]); // regs[i]: a (4 bytes), b (1)
    }
    b.extend(subsection("dev/extra", 2));
    b.extend([0xee; 3]);
    b
}

impl Fake {
    fn new() -> Self {
        let mut stream = ram_part(&[0x10]).split_off(5); // the setup's EOS and footer
        stream.extend(ram_part(&[0x10]));
        stream.extend([0x03, 0, 0, 0, 2]);
        stream.extend(0x10u64.to_be_bytes());
        stream.extend([0x7e, 0, 0, 0, 2]);
        stream.extend([0x08, 0, 11, 0, 0]); // SWITCHOVER_START
        stream.extend(full(3, "timer", 0, 2, &timer_body()));
        stream.extend(full(4, "dev", 0, 1, &dev_body()));
        let field = |name: &str, kind: &str, size: u64| json!({"name": name, "type": kind, "size": size});
        let int = |name: &str, size: u64| field(name, "int64", size);
        let caps = [int("caps_count", 4), field("capabilities", "capability", 11)];
        let reg = json!({"vmsd_name": "reg", "version": 1, "fields": [int("a", 4), int("b", 1)]});
        let vmdesc = json!({
            "page_size": 4096,
            "configuration": {"vmsd_name": "configuration", "version": 1,
                "fields": [int("len", 4), field("name", "buffer", 11)],
                "subsections": [{"vmsd_name": "configuration/capabilities", "version": 1, "fields": caps}]},
            "devices": [
                {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                 "fields": [int("cpu_ticks_offset", 8), field("unused", "unused_buffer", 8),
                            int("cpu_clock_offset", 8)],
                 "subsections": [{"vmsd_name": "timer/icount", "version": 1,
                    "fields": [int("qemu_icount_bias", 8), int("qemu_icount", 8)]}]},
                {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
                 "fields": [{"name": "regs", "array_len": 2, "type": "struct", "size": 5, "struct": reg}],
                 "subsections": [{"vmsd_name": "dev/extra", "version": 2,
                    "fields": [field("x", "buffer", 3)]}]},
            ],
        });
        Self {
            blocks: vec![
                ("pc.ram", 16, vec![(1, 0xaa), (5, 0), (15, 0x0f)]),
                ("pc.bios", 2, vec![(0, 0x55)]),
            ],
            stream,
            trailer: Vec::new(),
            vmdesc,
            caps: vec!["mapped-ram"],
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0".to_vec();
        s.extend(subsection("configuration/capabilities", 1));
        s.extend((self.caps.len() as u32).to_be_bytes());
        for cap in &self.caps {
            s.push(cap.len() as u8);
            s.extend(cap.as_bytes());
        }
        s.extend(b"\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x04");
        let total: u64 = self.blocks.iter().map(|b| b.1 * PAGE_SIZE).sum();
        s.extend((total | 4).to_be_bytes());
        for (id, pages, set) in &self.blocks {
            s.push(id.len() as u8);
            s.extend(id.as_bytes());
            s.extend((pages * PAGE_SIZE).to_be_bytes());
            if !self.caps.contains(&"mapped-ram") {
                continue; // a classic save: its pages would be in the stream
            }
            let bitmap_at = s.len() as u64 + 28;
            let pages_at = (bitmap_at + pages.div_ceil(64) * 8).next_multiple_of(MIB);
            s.extend(1u32.to_be_bytes());
            s.extend(PAGE_SIZE.to_be_bytes());
            s.extend(bitmap_at.to_be_bytes());
            s.extend(pages_at.to_be_bytes());
            s.resize((pages_at + pages * PAGE_SIZE) as usize, 0);
            for &(i, fill) in set {
                s[(bitmap_at + i / 8) as usize] |= 1 << (i % 8);
                let page = (pages_at + i * PAGE_SIZE) as usize;
                s[page..page + PAGE_SIZE as usize].fill(fill);
            }
        }
        s.extend(&self.stream);
        s.push(0x00);
        s.extend(&self.trailer);
        let json = serde_json::to_vec(&self.vmdesc).unwrap();
        s.push(0x06);
        s.extend((json.len() as u32).to_be_bytes());
        s.extend(json);
        s
    }
}

fn digest(save: &[u8]) -> Result<[u8; 32], CanonError> {
    canonical_digest(save, page_sha256(save))
}

fn edited(edit: impl FnOnce(&mut Fake)) -> Result<[u8; 32], CanonError> {
    let mut fake = Fake::new();
    edit(&mut fake);
    digest(&fake.build())
}

/// A save with the byte at `at` xored with `mask` (without copying it).
struct Flipped<'a>(&'a [u8], u64, u8);

impl SaveBytes for Flipped<'_> {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = self.0.read_at(offset, len)?;
        if let Some(i) = self.1.checked_sub(offset).filter(|&i| i < len as u64) {
            buf[i as usize] ^= self.2;
        }
        Ok(buf)
    }
    fn len(&self) -> u64 {
        SaveBytes::len(self.0)
    }
}

/// One save's bytes followed by other bytes (without copying them).
struct Joined<'a>(&'a [u8], &'a [u8]);

impl SaveBytes for Joined<'_> {
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let whole = SaveBytes::len(self.0);
        let mut buf = Vec::with_capacity(len);
        let end = offset + len as u64;
        if offset < whole {
            buf.extend(self.0.read_at(offset, (end.min(whole) - offset) as usize)?);
        }
        if end > whole {
            let from = offset.max(whole);
            buf.extend(self.1.read_at(from - whole, (end - from) as usize)?);
        }
        Ok(buf)
    }
    fn len(&self) -> u64 {
        (self.0.len() + self.1.len()) as u64
    }
}

fn flipped(save: &[u8], at: u64) -> Result<[u8; 32], CanonError> {
    let f = Flipped(save, at, 0x01);
    canonical_digest(&f, page_sha256(&f))
}

fn leaf_at(save: &[u8], key: &str) -> u64 {
    let leaves = device_leaves(save).unwrap();
    leaves.iter().find(|l| l.key == key).unwrap().at
}

#[test]
fn walks_every_leaf_with_its_key_and_place() {
    let save = Fake::new().build();
    let leaves = device_leaves(&save[..]).unwrap();
    let keys: Vec<(&str, u64, bool)> = leaves.iter().map(|l| (l.key.as_str(), l.len, l.masked)).collect();
    assert_eq!(
        keys,
        [
            ("configuration/0@v0:configuration/len", 4, false),
            ("configuration/0@v0:configuration/name", 11, false),
            (
                "configuration/0@v0:configuration/configuration/capabilities@v1/caps_count",
                4,
                false
            ),
            (
                "configuration/0@v0:configuration/configuration/capabilities@v1/capabilities",
                10,
                false
            ),
            ("timer/0@v2:cpu_ticks_offset", 8, true),
            ("timer/0@v2:unused", 8, false),
            ("timer/0@v2:cpu_clock_offset", 8, true),
            ("timer/0@v2:timer/icount@v1/qemu_icount_bias", 8, false),
            ("timer/0@v2:timer/icount@v1/qemu_icount", 8, false),
            ("dev/0@v1:regs[0]/a", 4, false),
            ("dev/0@v1:regs[0]/b", 1, false),
            ("dev/0@v1:regs[1]/a", 4, false),
            ("dev/0@v1:regs[1]/b", 1, false),
            ("dev/0@v1:dev/extra@v2/x", 3, false),
        ]
    );
    let icount = leaves[8].at as usize;
    assert_eq!(save[icount..icount + 8], 3_000_000_000u64.to_be_bytes());
    assert_eq!(save[leaves[13].at as usize], 0xee);
}

#[test]
fn the_digest_is_pinned() {
    // The format is what replicas compare: a change must be deliberate.
    // Computed apart: canon.py's parser and device hash, and the RAM rule
    // of the module doc with the pages' SHA-256, in Python.
    let d = digest(&Fake::new().build()).unwrap();
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "66b2a57da810c1cd8053ecfae94ad19d61b84bfd28a4069be76f6a83c0438a56"
    );
}

#[test]
fn what_the_host_varies_does_not_count() {
    let base = digest(&Fake::new().build()).unwrap();
    // Another number of ram parts (EOS markers, multifd flushes).
    let more_parts = edited(|f| {
        let at = f.stream.len() - full(4, "dev", 0, 1, &dev_body()).len();
        let parts = [ram_part(&[0x200, 0x10]), ram_part(&[0x210]), ram_part(&[0x30])].concat();
        f.stream.splice(at..at, parts);
    });
    assert_eq!(more_parts.unwrap(), base);
    // The masked fields.
    let save = Fake::new().build();
    for key in ["timer/0@v2:cpu_ticks_offset", "timer/0@v2:cpu_clock_offset"] {
        assert_eq!(flipped(&save, leaf_at(&save, key) + 5).unwrap(), base);
    }
    // A zero page hashes as an absent one; a bit past a block's last page is ignored.
    assert_eq!(edited(|f| f.blocks[0].2.retain(|&(i, _)| i != 5)).unwrap(), base);
    let mut save = Fake::new().build();
    let bios = bitmap_at(&save, 1);
    save[bios] |= 0x80; // page 7 of a 2-page block
    assert_eq!(digest(&save).unwrap(), base);
}

/// Where block `i`'s bitmap starts.
fn bitmap_at(save: &[u8], i: usize) -> usize {
    let mut h = crate::qemusave::parse_header(&save[..4096]).unwrap();
    while let Some(at) = h.next_block_at() {
        let end = (at as usize + crate::qemusave::RAM_BLOCK_RECORD_MAX).min(save.len());
        h.read_next_block(&save[at as usize..end]).unwrap();
    }
    h.ram_blocks[i].mapped.unwrap().bitmap_offset as usize
}

#[test]
fn what_the_guest_holds_counts() {
    let save = Fake::new().build();
    let base = digest(&save).unwrap();
    let ram_page = MIB + 15 * PAGE_SIZE + 100; // pc.ram's page 15
    for at in [
        ram_page,
        leaf_at(&save, "timer/0@v2:unused"),
        leaf_at(&save, "dev/0@v1:regs[1]/b"),
    ] {
        assert_ne!(flipped(&save, at).unwrap(), base, "{at:#x}");
    }
    assert_ne!(edited(|f| f.blocks[1].2.push((1, 0x01))).unwrap(), base);
    // The page's place counts, not only its content.
    assert_ne!(edited(|f| f.blocks[0].2[0].0 = 2).unwrap(), base);
    // So do the names the vmdesc gives (the layout the bytes are read with).
    assert_ne!(
        edited(|f| f.vmdesc["devices"][1]["fields"][0]["name"] = json!("regz")).unwrap(),
        base
    );
    // A page's digest is the caller's: another one gives another digest.
    let other = canonical_digest(&save[..], |at| Ok(Some([at as u8; 32]))).unwrap();
    assert_ne!(other, base);
}

fn is<T>(got: Result<T, CanonError>, want: impl Fn(&CanonError) -> bool) -> bool {
    match got {
        Err(e) => want(&e) || panic!("unexpected error: {e}"),
        Ok(_) => false,
    }
}

#[test]
fn refuses_by_name() {
    use CanonError as E;
    assert!(is(edited(|f| f.caps.clear()), |e| matches!(e, E::NotMappedRam)));
    assert!(is(
        edited(|f| f.caps = vec!["mapped-ram", "x-ignore-shared"]),
        |e| matches!(e, E::Head(QemuSaveError::Capability(_)))
    ));
    assert!(is(edited(|f| f.caps = vec!["x-bogus"]), |e| matches!(
        e,
        E::Head(QemuSaveError::Capability(_))
    )));
    assert!(is(edited(|f| f.stream.insert(13, 0x42)), |e| matches!(
        e,
        E::UnknownSectionType { kind: 0x42, .. }
    )));
    assert!(is(edited(|f| f.stream.extend([0x08, 0, 3, 0, 0])), |e| matches!(
        e,
        E::Command { cmd: 3, .. }
    )));
    assert!(is(
        edited(|f| f.stream.extend(full(9, "nodesc", 0, 1, &[]))),
        |e| { matches!(e, E::SectionNotInVmdesc { name, instance: 0 } if name == "nodesc") }
    ));
    assert!(is(edited(|f| f.stream.extend([0x02, 0, 0, 0, 9])), |e| matches!(
        e,
        E::UnknownSectionId { id: 9, .. }
    )));
    assert!(is(edited(|f| f.stream.extend([0x02, 0, 0, 0, 4])), |e| matches!(
        e,
        E::IterativeSection { .. }
    )));
    for (flags, part) in [(0x08, &[0x08][..]), (0, &[0]), (0x04, &[0x200, 0x04])] {
        let got = edited(|f| f.stream.extend(ram_part(part)));
        assert!(is(
            got,
            |e| matches!(e, E::RamFlags { flags: f, .. } if *f == flags)
        ));
    }
    let unended = |f: &mut Fake| f.stream.truncate(f.stream.len() - 5);
    assert!(is(edited(unended), |e| matches!(
        e,
        E::MissingFooter { id: 4, .. }
    )));
    let other_id = |f: &mut Fake| *f.stream.last_mut().unwrap() = 3;
    assert!(is(edited(other_id), |e| matches!(
        e,
        E::MissingFooter { id: 4, .. }
    )));
    assert!(is(edited(|f| f.stream.extend([0x07])), |e| matches!(
        e,
        E::MisplacedSection { kind: 7, .. }
    )));
    assert!(is(edited(|f| f.trailer = vec![0x7e, 0, 0, 0, 3]), |e| matches!(
        e,
        E::EofNotAtVmdesc { .. }
    )));
    // The vmdesc lists a subsection the stream lacks, or one of another name.
    let no_sub = |f: &mut Fake| f.vmdesc["devices"][1]["subsections"][0]["vmsd_name"] = json!("dev/other");
    assert!(is(edited(no_sub), |e| {
        matches!(e, E::MissingSubsection { section, subsection, .. }
            if section == "dev/0@v1:" && subsection == "dev/other")
    }));
    // The masked fields absent (renamed, or no timer section), or resized.
    let renamed = |f: &mut Fake| f.vmdesc["devices"][0]["fields"][0]["name"] = json!("ticks");
    assert!(is(edited(renamed), |e| {
        matches!(
            e,
            E::MaskedFieldMissing {
                section: "timer",
                field: "cpu_ticks_offset"
            }
        )
    }));
    let no_timer = |f: &mut Fake| {
        let timer = full(3, "timer", 0, 2, &timer_body());
        let at = f.stream.windows(timer.len()).position(|w| w == timer).unwrap();
        f.stream.drain(at..at + timer.len());
    };
    assert!(is(edited(no_timer), |e| matches!(
        e,
        E::MaskedFieldMissing { .. }
    )));
    let resized = |f: &mut Fake| {
        f.vmdesc["devices"][0]["fields"][2]["size"] = json!(4);
        f.vmdesc["devices"][0]["fields"][1]["size"] = json!(12);
    };
    assert!(is(edited(resized), |e| matches!(
        e,
        E::MaskedFieldSize { len: 4, .. }
    )));
    // A field the vmdesc names past the end of the stream.
    let long = |f: &mut Fake| f.vmdesc["devices"][1]["subsections"][0]["fields"][0]["size"] = json!(300);
    assert!(is(edited(long), |e| {
        matches!(e, E::Truncated { what, .. } if what == "dev/0@v1:dev/extra@v2/x")
    }));
    // A page digest that cannot be had.
    let save = Fake::new().build();
    let failing = canonical_digest(&save[..], |_| Err(io::Error::other("no such block")));
    assert!(is(failing, |e| matches!(e, E::Read(_))));
}

#[test]
fn refuses_absurd_vmdescs() {
    use CanonError as E;
    let malformed = |e: &CanonError| matches!(e, E::Vmdesc(_));
    let dev = |f: &mut Fake, field: &str, v: Value| f.vmdesc["devices"][1]["fields"][0][field] = v;
    let endless = |f: &mut Fake| {
        dev(f, "array_len", json!(1u64 << 62));
        dev(f, "struct", json!({"fields": []}));
    };
    assert!(is(edited(endless), |e| matches!(e, E::TooComplex("fields"))));
    assert!(is(edited(|f| dev(f, "array_len", json!(-1))), malformed));
    assert!(is(edited(|f| dev(f, "name", json!("n".repeat(300)))), malformed));
    assert!(is(edited(|f| dev(f, "type", json!(null))), malformed));
    assert!(is(edited(|f| dev(f, "struct", json!([]))), malformed));
    for size in [u64::MAX, 1 << 33, 1 << 31] {
        let huge = |f: &mut Fake| f.vmdesc["devices"][1]["subsections"][0]["fields"][0]["size"] = json!(size);
        assert!(is(edited(huge), |e| matches!(e, E::Truncated { .. })), "{size}");
    }
    let mut deep = json!({"fields": []});
    for _ in 0..40 {
        deep = json!({"fields": [{"name": "s", "type": "struct", "struct": deep}]});
    }
    assert!(is(edited(|f| f.vmdesc["devices"][1] = deep), malformed));
    assert!(is(edited(|f| f.vmdesc["page_size"] = json!(65536)), malformed));
    assert!(is(edited(|f| f.vmdesc["devices"] = json!({})), malformed));
    let twice = |f: &mut Fake| {
        let timer = f.vmdesc["devices"][0].clone();
        f.vmdesc["devices"].as_array_mut().unwrap().push(timer);
    };
    assert!(is(edited(twice), malformed));
    // Not JSON; a vmdesc length one off either way; no JSON at the end.
    let save = Fake::new().build();
    let n = save.len();
    let json = serde_json::to_vec(&Fake::new().vmdesc).unwrap().len();
    let (header, len) = (n - json - 5, json as u32);
    let patched = |at: usize, bytes: &[u8]| {
        let mut s = save.clone();
        s[at..at + bytes.len()].copy_from_slice(bytes);
        digest(&s)
    };
    assert!(is(patched(n - 2, b"!"), malformed));
    for wrong in [len - 1, len + 1, u32::MAX] {
        let got = patched(header + 1, &wrong.to_be_bytes());
        assert!(is(got, |e| matches!(e, E::NoVmdesc)), "{wrong}");
    }
    assert!(is(patched(n - 1, b" "), |e| matches!(e, E::NoVmdesc)));
    assert!(is(digest(b"QEVM"), |e| matches!(
        e,
        E::Head(QemuSaveError::Truncated { need: 8 })
    )));
    assert!(is(digest(&[]), |e| matches!(
        e,
        E::Head(QemuSaveError::Truncated { need: 8 })
    )));
    assert!(is(digest(b"Xen saved domain"), |e| matches!(
        e,
        E::Head(QemuSaveError::NotQemu)
    )));
    // Many sections: bounded.
    let many = |f: &mut Fake| {
        let empty = json!({"name": "empty", "instance_id": 0});
        f.vmdesc["devices"].as_array_mut().unwrap().push(empty);
        for id in 10..5000 {
            f.stream.extend(full(id, "empty", 0, 1, &[]));
        }
    };
    assert!(is(edited(many), |e| matches!(e, E::TooComplex("sections"))));
}

#[test]
fn every_truncation_is_refused() {
    let save = Fake::new().build();
    for len in (0..200)
        .chain(save.len() - 4000..save.len())
        .chain((0..save.len()).step_by(4093))
    {
        assert!(digest(&save[..len]).is_err(), "{len}");
    }
    // The stream cut short before a whole vmdesc: refused, unless the cut
    // drops whole sections the masks do not need (here: "dev").
    let stream = Fake::new().stream;
    let dev = full(4, "dev", 0, 1, &dev_body()).len();
    for cut in 1..stream.len() {
        let got = edited(|f| f.stream.truncate(stream.len() - cut));
        assert_eq!(got.is_ok(), cut == dev, "{cut}: {got:?}");
    }
}

#[test]
fn hostile_bytes_never_panic() {
    let save = Fake::new().build();
    let tail_from = save.len() - Fake::new().stream.len() - 1;
    for at in (0..0xa0).chain(tail_from..save.len()) {
        for mask in [0x01, 0x80, 0xff] {
            let f = Flipped(&save, at as u64, mask);
            let _ = canonical_digest(&f, page_sha256(&f));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    for _ in 0..3000 {
        let len = rng.gen_range(0..600);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        let _ = digest(&junk);
        junk.splice(0..0, save[..rng.gen_range(0..0xa0)].iter().copied());
        let _ = digest(&junk);
        let cut = rng.gen_range(tail_from..save.len());
        let joined = Joined(&save[..cut], &junk);
        let _ = canonical_digest(&joined, page_sha256(&joined));
    }
}
