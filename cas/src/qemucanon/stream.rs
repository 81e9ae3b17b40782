//! The walk of the migration stream itself, section by section, with the
//! vmdesc: the configuration and every device section hashed leaf by leaf
//! (the module doc says how), ram's setup skipped (its records, bitmaps
//! and pages are [`super::ram`]'s) and ram's later parts read as the flag
//! words they are. Two spans are read: the head (from the magic to ram's
//! setup word) and the device-state part (from the end of the last block's
//! pages to the vmdesc), each through a [`Cursor`] that reads at most
//! [`CHUNK`] bytes at a time and never past the span.

use std::collections::HashMap;
use std::fmt::Write;

use sha2::{Digest, Sha256};

use super::ram::RamLayout;
use super::vmdesc::{Field, Kind, Vmdesc, Vmsd};
use super::{CanonError, DeviceLeaf, MASKED, MAX_DEVICE_STATE, MAX_STEPS, SaveBytes, read};

const EOF: u8 = 0x00;
const START: u8 = 0x01;
const PART: u8 = 0x02;
const END: u8 = 0x03;
const FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;
/// `MIG_CMD_SWITCHOVER_START` (migration/savevm.c).
const MIG_CMD_SWITCHOVER_START: u16 = 11;
/// Where the configuration section starts: right after "QEVM" u32 3.
const CONFIGURATION_AT: u64 = 8;
const RAM_FLAG_CONTINUE: u64 = 0x20;
const RAM_FLAG_EOS: u64 = 0x10;
const RAM_FLAG_MULTIFD_FLUSH: u64 = 0x200;
const EOS_AND_FLUSH: u64 = RAM_FLAG_EOS | RAM_FLAG_MULTIFD_FLUSH;
const RAM_FLAGS: u64 = super::PAGE_SIZE - 1;
/// Bytes read at a time.
const CHUNK: u64 = 64 << 10;
/// More sections than any machine has (q35: 31).
const MAX_SECTIONS: usize = 4096;
/// Longer than any leaf's key (q35: 88 bytes).
const MAX_KEY: usize = 1024;

/// Walks the stream; returns the device digest.
pub(super) fn walk<S: SaveBytes + ?Sized>(
    save: &S,
    layout: &RamLayout,
    desc: &Vmdesc,
    leaves: Option<&mut Vec<DeviceLeaf>>,
) -> Result<[u8; 32], CanonError> {
    if layout.resume_at >= desc.at {
        let what = "the device state".into();
        return Err(CanonError::Truncated {
            at: layout.resume_at,
            what,
        });
    }
    if desc.at - layout.resume_at > MAX_DEVICE_STATE {
        return Err(CanonError::DeviceStateTooLarge {
            len: desc.at - layout.resume_at,
        });
    }
    let mut w = Walker {
        hasher: Sha256::new(),
        leaves,
        seen: [false; MASKED.len()],
        steps: 0,
        key: String::new(),
        path_at: 0,
        elems: 0,
        section: String::new(),
    };
    let mut c = Cursor::new(save, layout.setup_word_at + 8);
    c.take(8, "the magic")?; // checked by qemusave::parse_header
    let mut sections: HashMap<u32, String> = HashMap::new();
    let mut ram_started = false;
    loop {
        let at = c.pos;
        match c.u8("a section type")? {
            EOF if c.pos == desc.at => break,
            EOF => {
                return Err(CanonError::EofNotAtVmdesc {
                    at,
                    vmdesc_at: desc.at,
                });
            }
            CONFIGURATION if at == CONFIGURATION_AT => {
                let config = desc.configuration.as_ref();
                let config = config.ok_or_else(|| CanonError::Vmdesc("no configuration".into()))?;
                w.section("configuration", "configuration/0@v0");
                let saved = w.push("configuration", None)?;
                w.vmsd(&mut c, config)?;
                w.pop(saved);
            }
            kind @ (START | FULL) => {
                let id = c.be32("a section id")?;
                let name = c.name("a section name")?;
                let (instance, version) = (c.be32("an instance id")?, c.be32("a section version")?);
                if sections.len() == MAX_SECTIONS {
                    return Err(CanonError::TooComplex("sections"));
                }
                sections.insert(id, name.clone());
                if name == "ram" {
                    // Where parse_header found ram's setup: its records,
                    // bitmaps and pages are skipped, the stream resumes
                    // after the last block's pages.
                    if ram_started || kind != START || c.pos != layout.setup_word_at {
                        return Err(CanonError::MisplacedSection { kind, at });
                    }
                    let word_at = c.pos;
                    let word = c.be64("ram's setup")?;
                    if word != layout.setup_word {
                        return Err(CanonError::RamFlags {
                            flags: word & RAM_FLAGS,
                            at: word_at,
                        });
                    }
                    ram_started = true;
                    c = Cursor::new(save, desc.at);
                    c.pos = layout.resume_at;
                    ram_flags(&mut c)?;
                } else if kind == START {
                    return Err(CanonError::IterativeSection { name });
                } else {
                    let Some(d) = desc.devices.get(&(name.clone(), instance)) else {
                        return Err(CanonError::SectionNotInVmdesc { name, instance });
                    };
                    w.section(&name, &format!("{name}/{instance}@v{version}"));
                    w.vmsd(&mut c, d)?;
                }
                footer(&mut c, id)?;
            }
            PART | END => {
                let id = c.be32("a section id")?;
                match sections.get(&id) {
                    None => return Err(CanonError::UnknownSectionId { id, at }),
                    Some(name) if name != "ram" => {
                        return Err(CanonError::IterativeSection { name: name.clone() });
                    }
                    Some(_) => ram_flags(&mut c)?,
                }
                footer(&mut c, id)?;
            }
            COMMAND => {
                // QEMU 10.0 announces the switchover (no data) before the
                // device state; any other command changes what a load does.
                let (cmd, len) = (c.be16("a command")?, c.be16("a command's length")?);
                if (cmd, len) != (MIG_CMD_SWITCHOVER_START, 0) {
                    return Err(CanonError::Command { cmd, at });
                }
            }
            kind @ (CONFIGURATION | SUBSECTION | FOOTER | super::vmdesc::VMDESC) => {
                return Err(CanonError::MisplacedSection { kind, at });
            }
            kind => return Err(CanonError::UnknownSectionType { kind, at }),
        }
    }
    for (i, &(section, field)) in MASKED.iter().enumerate() {
        if !w.seen[i] {
            return Err(CanonError::MaskedFieldMissing { section, field });
        }
    }
    Ok(w.hasher.finalize().into())
}

/// The footer QEMU writes after each section (`0x7e u32 section_id`, for
/// every machine type since 2.4), which a load checks.
fn footer<S: SaveBytes + ?Sized>(c: &mut Cursor<'_, S>, id: u32) -> Result<(), CanonError> {
    let at = c.pos;
    if c.u8("a section footer")? != FOOTER || c.be32("a section footer")? != id {
        return Err(CanonError::MissingFooter { id, at });
    }
    Ok(())
}

/// One part of the ram section after its setup: flag words up to EOS. With
/// mapped-ram no page travels in the stream; QEMU 10.0 writes EOS, and
/// MULTIFD_FLUSH words with multifd.
fn ram_flags<S: SaveBytes + ?Sized>(c: &mut Cursor<'_, S>) -> Result<(), CanonError> {
    loop {
        let at = c.pos;
        let flags = c.be64("a ram flag word")? & RAM_FLAGS;
        match flags & !RAM_FLAG_CONTINUE {
            RAM_FLAG_MULTIFD_FLUSH => {}
            RAM_FLAG_EOS | EOS_AND_FLUSH => return Ok(()),
            _ => return Err(CanonError::RamFlags { flags, at }),
        }
    }
}

/// Hashes the leaves of one section after another.
struct Walker<'l> {
    hasher: Sha256,
    leaves: Option<&'l mut Vec<DeviceLeaf>>,
    /// Which of [`MASKED`] were met.
    seen: [bool; MASKED.len()],
    steps: u64,
    /// `section:path/so/far`.
    key: String,
    /// Where the path starts in `key`.
    path_at: usize,
    /// Elements in the path.
    elems: usize,
    /// The section's name (what [`MASKED`] names).
    section: String,
}

impl Walker<'_> {
    /// Starts the leaves of section `name`, keyed `key:path`.
    fn section(&mut self, name: &str, key: &str) {
        self.section = name.to_string();
        self.key = format!("{key}:");
        self.path_at = self.key.len();
        self.elems = 0;
    }

    /// Appends `name` (or `name[index]`) to the path; returns what [`Walker::pop`] needs.
    fn push(&mut self, name: &str, index: Option<u64>) -> Result<usize, CanonError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(CanonError::TooComplex("fields"));
        }
        let saved = self.key.len();
        if self.elems > 0 {
            self.key.push('/');
        }
        self.key.push_str(name);
        if let Some(i) = index {
            let _ = write!(self.key, "[{i}]");
        }
        if self.key.len() > MAX_KEY {
            return Err(CanonError::TooComplex("field paths"));
        }
        self.elems += 1;
        Ok(saved)
    }

    fn pop(&mut self, saved: usize) {
        self.key.truncate(saved);
        self.elems -= 1;
    }

    /// The fields of `d`, then its subsections, each behind `0x05 u8 len
    /// name u32 version` and named `name@vversion` in the path.
    fn vmsd<S: SaveBytes + ?Sized>(&mut self, c: &mut Cursor<'_, S>, d: &Vmsd) -> Result<(), CanonError> {
        for field in &d.fields {
            match field.count {
                None => self.element(c, field, None)?,
                Some(n) => {
                    for i in 0..n {
                        self.element(c, field, Some(i))?;
                    }
                }
            }
        }
        for (name, sub) in &d.subsections {
            let at = c.pos;
            let found = match c.u8("a subsection")? {
                SUBSECTION => Some(c.name("a subsection name")?),
                _ => None,
            };
            if found.as_deref() != Some(name.as_str()) {
                let (section, subsection) = (self.key.clone(), name.clone());
                return Err(CanonError::MissingSubsection {
                    section,
                    subsection,
                    at,
                });
            }
            let version = c.be32("a subsection version")?;
            let saved = self.push(&format!("{name}@v{version}"), None)?;
            self.vmsd(c, sub)?;
            self.pop(saved);
        }
        Ok(())
    }

    fn element<S: SaveBytes + ?Sized>(
        &mut self,
        c: &mut Cursor<'_, S>,
        field: &Field,
        index: Option<u64>,
    ) -> Result<(), CanonError> {
        let saved = self.push(&field.name, index)?;
        match &field.kind {
            Kind::Struct(d) => self.vmsd(c, d)?,
            Kind::Capability => {
                let len = c.u8(&self.key)?;
                self.leaf(c, len.into())?;
            }
            Kind::Bytes(len) => self.leaf(c, *len)?,
        }
        self.pop(saved);
        Ok(())
    }

    /// Hashes the next `len` bytes as the leaf at the current path.
    fn leaf<S: SaveBytes + ?Sized>(&mut self, c: &mut Cursor<'_, S>, len: u64) -> Result<(), CanonError> {
        let at = c.pos;
        let path = &self.key[self.path_at..];
        let masked = MASKED
            .iter()
            .position(|&(s, f)| self.elems == 1 && self.section == s && path == f);
        self.hasher.update((self.key.len() as u32).to_be_bytes());
        self.hasher.update(self.key.as_bytes());
        if let Some(i) = masked {
            let (section, field) = MASKED[i];
            if len != 8 {
                return Err(CanonError::MaskedFieldSize { section, field, len });
            }
            self.seen[i] = true;
            c.feed(len, &self.key, |_| {})?;
            self.hasher.update(b"\xffMASKED");
        } else {
            let Ok(len32) = u32::try_from(len) else {
                return Err(CanonError::Truncated {
                    at,
                    what: self.key.clone(),
                });
            };
            self.hasher.update(len32.to_be_bytes());
            let hasher = &mut self.hasher;
            c.feed(len, &self.key, |bytes| hasher.update(bytes))?;
        }
        if let Some(leaves) = self.leaves.as_deref_mut() {
            let key = self.key.clone();
            leaves.push(DeviceLeaf {
                key,
                at,
                len,
                masked: masked.is_some(),
            });
        }
        Ok(())
    }
}

/// Reads a span of the save forward, [`CHUNK`] bytes at a time.
struct Cursor<'a, S: ?Sized> {
    save: &'a S,
    pos: u64,
    /// Where the span ends: nothing at or past it is read.
    end: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl<'a, S: SaveBytes + ?Sized> Cursor<'a, S> {
    fn new(save: &'a S, end: u64) -> Self {
        Self {
            save,
            pos: 0,
            end,
            buf: Vec::new(),
            buf_at: 0,
        }
    }

    /// The next `n` bytes, `n` at most [`CHUNK`].
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], CanonError> {
        let truncated = || CanonError::Truncated {
            at: self.pos,
            what: what.to_string(),
        };
        let end = self
            .pos
            .checked_add(n as u64)
            .filter(|&e| e <= self.end)
            .ok_or_else(truncated)?;
        if self.pos < self.buf_at || end > self.buf_at + self.buf.len() as u64 {
            let len = (self.end - self.pos).min(CHUNK.max(n as u64));
            self.buf = read(self.save, self.pos, len as usize)?;
            self.buf_at = self.pos;
        }
        let from = (self.pos - self.buf_at) as usize;
        self.pos = end;
        Ok(&self.buf[from..from + n])
    }

    /// Gives the next `n` bytes to `sink`, a chunk at a time.
    fn feed(&mut self, n: u64, what: &str, mut sink: impl FnMut(&[u8])) -> Result<(), CanonError> {
        if self.pos.checked_add(n).is_none_or(|e| e > self.end) {
            return Err(CanonError::Truncated {
                at: self.pos,
                what: what.to_string(),
            });
        }
        let mut left = n;
        while left > 0 {
            let step = left.min(CHUNK);
            sink(self.take(step as usize, what)?);
            left -= step;
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], CanonError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, CanonError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn be16(&mut self, what: &str) -> Result<u16, CanonError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn be32(&mut self, what: &str) -> Result<u32, CanonError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn be64(&mut self, what: &str) -> Result<u64, CanonError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// A length byte and that many bytes of UTF-8, as QEMU writes an idstr.
    fn name(&mut self, what: &str) -> Result<String, CanonError> {
        let at = self.pos;
        let len = self.u8(what)?;
        let bytes = self.take(len.into(), what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CanonError::NameNotUtf8 { at })
    }
}
