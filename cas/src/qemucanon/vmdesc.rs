//! The stream's own description: the JSON QEMU appends after `EOF`
//! (`0x06 u32 len JSON`, the last bytes of the file), read into a typed
//! tree. Only what the walk needs is kept: per device section (by name and
//! instance) and for the configuration, the fields in order (name, element
//! count, and how many bytes each element takes in the stream, or a nested
//! struct) and the subsections sent.
//!
//! ```json
//! {"page_size": 4096,
//!  "configuration": {"vmsd_name": "configuration", "version": 1, "fields": [...], "subsections": [...]},
//!  "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
//!    "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, ...,
//!               {"name": "channels", "array_len": 3, "type": "struct", "struct": {...}, "size": 32}],
//!    "subsections": [{"vmsd_name": "timer/icount", "version": 1, "fields": [...]}]}, ...]}
//! ```
//!
//! `size` is what QEMU wrote for one element, except for `capability`
//! (one byte of length, then the name: the walk reads the length) and
//! `struct` (the walk recurses). Names are bounded ([`MAX_NAME`]), and so
//! is the nesting ([`MAX_DEPTH`]).

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{CanonError, MAX_VMDESC, PAGE_SIZE, SaveBytes};

/// QEMU_VM_VMDESCRIPTION.
pub(super) const VMDESC: u8 = 0x06;
/// The tail read first; grown fourfold while it holds no vmdesc header.
const FIRST_TAIL: u64 = 64 << 10;
/// Longer than any QEMU field, section or vmsd name.
pub(super) const MAX_NAME: usize = 256;
/// Deeper than QEMU nests structs and subsections (q35: 3).
pub(super) const MAX_DEPTH: usize = 16;

/// A save's vmdesc.
pub(super) struct Vmdesc {
    /// File offset of its `0x06`: where the migration stream ends.
    pub at: u64,
    pub configuration: Option<Vmsd>,
    pub devices: HashMap<(String, u32), Vmsd>,
}

/// One vmstate description: a section's, a struct's or a subsection's.
pub(super) struct Vmsd {
    pub fields: Vec<Field>,
    /// (name, description) of each subsection sent, in stream order.
    pub subsections: Vec<(String, Vmsd)>,
}

pub(super) struct Field {
    pub name: String,
    /// `array_len`: the field is that many elements named `name[i]`.
    pub count: Option<u64>,
    pub kind: Kind,
}

pub(super) enum Kind {
    /// This many bytes per element.
    Bytes(u64),
    /// A length byte, then that many bytes (a migration capability's name).
    Capability,
    Struct(Vmsd),
}

/// Finds the vmdesc at the end of the save and reads it.
pub(super) fn read<S: SaveBytes + ?Sized>(save: &S) -> Result<Vmdesc, CanonError> {
    let (at, json) = locate(save)?;
    let value: Value = serde_json::from_slice(&json).map_err(|e| CanonError::Vmdesc(e.to_string()))?;
    let top = object(&value, "the vmdesc")?;
    if let Some(page_size) = top.get("page_size")
        && page_size.as_u64() != Some(PAGE_SIZE)
    {
        return Err(malformed(format!("page_size {page_size}")));
    }
    let configuration = match top.get("configuration") {
        Some(c) => Some(vmsd(c, 0)?),
        None => None,
    };
    let mut devices = HashMap::new();
    for device in array(top.get("devices"), "devices")? {
        let d = object(device, "a device")?;
        let name = name(d.get("name"), "a device's name")?;
        let instance = d
            .get("instance_id")
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| malformed(format!("device {name:?} without a u32 instance_id")))?;
        if devices
            .insert((name.clone(), instance), vmsd(device, 0)?)
            .is_some()
        {
            return Err(malformed(format!(
                "device {name:?} instance {instance} listed twice"
            )));
        }
    }
    Ok(Vmdesc {
        at,
        configuration,
        devices,
    })
}

/// The offset of the vmdesc's `0x06` and its JSON. The JSON is ASCII
/// without control characters and ends the file with its `}`, so the
/// header is the last `0x06` followed by a length that reaches exactly to
/// the end of the file and a `{` (a `0x06` inside the length itself
/// cannot qualify: its "length" would take in the `{`, making it far longer
/// than [`MAX_VMDESC`]).
fn locate<S: SaveBytes + ?Sized>(save: &S) -> Result<(u64, Vec<u8>), CanonError> {
    let len = save.len();
    if len == 0 || super::read(save, len - 1, 1)? != b"}" {
        return Err(CanonError::NoVmdesc);
    }
    let most = len.min(MAX_VMDESC + 5);
    let mut tail = len.min(FIRST_TAIL);
    loop {
        let start = len - tail;
        let bytes = super::read(save, start, tail as usize)?;
        let found = (0..bytes.len().saturating_sub(5)).rev().find(|&p| {
            let n = || u32::from_be_bytes([bytes[p + 1], bytes[p + 2], bytes[p + 3], bytes[p + 4]]);
            bytes[p] == VMDESC && bytes[p + 5] == b'{' && p as u64 + 5 + u64::from(n()) == tail
        });
        if let Some(p) = found {
            return Ok((start + p as u64, bytes[p + 5..].to_vec()));
        }
        if tail == most {
            return Err(CanonError::NoVmdesc);
        }
        tail = most.min(tail * 4);
    }
}

fn vmsd(value: &Value, depth: usize) -> Result<Vmsd, CanonError> {
    if depth > MAX_DEPTH {
        return Err(malformed(format!("nested deeper than {MAX_DEPTH}")));
    }
    let o = object(value, "a vmstate description")?;
    let mut fields = Vec::new();
    for field in array_or_empty(o.get("fields"), "fields")? {
        let f = object(field, "a field")?;
        let name = name(f.get("name"), "a field's name")?;
        let count = match f.get("array_len") {
            None => None,
            Some(n) => Some(
                n.as_u64()
                    .ok_or_else(|| malformed(format!("{name}: array_len {n}")))?,
            ),
        };
        let kind = match f.get("type").and_then(Value::as_str) {
            Some("struct") => {
                let s = f
                    .get("struct")
                    .ok_or_else(|| malformed(format!("struct {name} undescribed")))?;
                Kind::Struct(vmsd(s, depth + 1)?)
            }
            Some("capability") => Kind::Capability,
            Some(_) => Kind::Bytes(
                f.get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| malformed(format!("{name}: no size")))?,
            ),
            None => return Err(malformed(format!("{name}: no type"))),
        };
        fields.push(Field { name, count, kind });
    }
    let mut subsections = Vec::new();
    for sub in array_or_empty(o.get("subsections"), "subsections")? {
        let s = object(sub, "a subsection")?;
        let name = name(s.get("vmsd_name"), "a subsection's vmsd_name")?;
        subsections.push((name, vmsd(sub, depth + 1)?));
    }
    Ok(Vmsd { fields, subsections })
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, CanonError> {
    v.as_object()
        .ok_or_else(|| malformed(format!("{what} is not an object")))
}

fn array<'a>(v: Option<&'a Value>, what: &str) -> Result<&'a [Value], CanonError> {
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| malformed(format!("{what} is not a list")))
}

fn array_or_empty<'a>(v: Option<&'a Value>, what: &str) -> Result<&'a [Value], CanonError> {
    match v {
        None => Ok(&[]),
        v => array(v, what),
    }
}

fn name(v: Option<&Value>, what: &str) -> Result<String, CanonError> {
    match v.and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= MAX_NAME => Ok(s.to_string()),
        _ => Err(malformed(format!(
            "{what} missing, empty or longer than {MAX_NAME}"
        ))),
    }
}

fn malformed(why: String) -> CanonError {
    CanonError::Vmdesc(why)
}
