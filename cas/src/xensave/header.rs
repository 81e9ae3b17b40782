//! The header of an xl save file, parsed in one place: the 48 fixed bytes
//! ([`XlHeader`]) and the libxl JSON domain config behind them
//! ([`SavedConfig`]). The cutter in [`super`] reads the fixed part to find
//! where the stream begins; the Xen driver reads the config to check a
//! checkpoint against the lot it is meant to resume.

use std::io::{self, Read};

use crate::piece::read_full;

/// `savefileheader_magic` from `tools/xl/xl.h`: 32 bytes, the NUL included.
pub const XL_MAGIC: [u8; 32] = *b"Xen saved domain, xl format\n \0 \r";
/// `SAVEFILE_BYTEORDER_VALUE`, written in the saving host's byte order.
pub const XL_BYTEORDER: u32 = 0x0102_0304;
/// `XL_MANDATORY_FLAG_JSON`: the embedded config is libxl JSON.
pub const XL_FLAG_JSON: u32 = 1 << 0;
/// `XL_MANDATORY_FLAG_STREAMv2`: the libxl v2 stream follows the header.
pub const XL_FLAG_STREAM_V2: u32 = 1 << 1;
/// The fixed part of the xl header: magic, byteorder, mandatory_flags,
/// optional_flags, optional_data_len.
pub const XL_HEADER_LEN: usize = 32 + 4 * 4;
/// A domain config is a few KiB of JSON; optional data far larger than
/// this is not one.
pub const MAX_XL_OPTIONAL_DATA: u32 = 1 << 20;

/// The fixed part of an xl save file's header (`struct save_file_header`
/// in tools/xl/xl.h, written by `save_domain_core_writeconfig` in
/// tools/xl/xl_saverestore.c): [`XL_MAGIC`], then `byteorder`,
/// `mandatory_flags`, `optional_flags` and `optional_data_len`, each a
/// `u32` in the saving host's byte order. `optional_data_len` bytes of
/// optional data follow: a `u32` config length and that many bytes of
/// domain config, libxl JSON with a trailing NUL when [`XL_FLAG_JSON`] is
/// set. The domain's stream comes after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XlHeader {
    /// Written by a big-endian host.
    pub big_endian: bool,
    pub mandatory_flags: u32,
    pub optional_flags: u32,
    pub optional_data_len: u32,
}

/// Why the header of an xl save file, or the domain config in it, was
/// refused.
#[derive(Debug, thiserror::Error)]
pub enum XlHeaderError {
    #[error("not an xl save file (no \"Xen saved domain, xl format\" magic)")]
    NotXlSave,
    #[error("truncated: {got} of {XL_HEADER_LEN} header bytes")]
    TruncatedHeader { got: usize },
    #[error("bad byte-order marker {0:02x?}")]
    ByteOrder([u8; 4]),
    #[error("saved on a host of the other byte order")]
    OtherByteOrder,
    #[error("mandatory flags {0:#x} unknown to Xen 4.17's xl (saved by a newer xl?)")]
    UnknownFlags(u32),
    #[error("{0} bytes of optional data; a domain config is far smaller")]
    OptionalDataTooLong(u32),
    #[error("truncated: {got} of {want} bytes of optional data")]
    TruncatedOptionalData { got: usize, want: usize },
    #[error("no domain config in the save file")]
    NoConfig,
    #[error("config of {len} bytes overruns {available} bytes of optional data")]
    ConfigOverrun { len: usize, available: usize },
    #[error("the embedded config is in xl's old text form, not JSON (saved by a pre-4.5 xl)")]
    TextConfig,
    #[error("embedded config is not JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl XlHeader {
    /// Reads the fixed header from the start of `bytes`: the magic and a
    /// byte-order marker of either order. Nothing else is judged here (the
    /// cutter walks any stream it can, whatever its flags);
    /// [`XlHeader::check_restorable`] asks what restoring it needs.
    pub fn parse(bytes: &[u8]) -> Result<XlHeader, XlHeaderError> {
        if bytes.len() < XL_MAGIC.len() || bytes[..XL_MAGIC.len()] != XL_MAGIC {
            return Err(XlHeaderError::NotXlSave);
        }
        if bytes.len() < XL_HEADER_LEN {
            return Err(XlHeaderError::TruncatedHeader { got: bytes.len() });
        }
        let word = |i: usize| -> [u8; 4] {
            let at = XL_MAGIC.len() + 4 * i;
            bytes[at..at + 4].try_into().expect("4 bytes")
        };
        let big_endian = match word(0) {
            w if u32::from_le_bytes(w) == XL_BYTEORDER => false,
            w if u32::from_be_bytes(w) == XL_BYTEORDER => true,
            w => return Err(XlHeaderError::ByteOrder(w)),
        };
        let u32_at = |i| u32_in(big_endian, word(i));
        Ok(XlHeader {
            big_endian,
            mandatory_flags: u32_at(1),
            optional_flags: u32_at(2),
            optional_data_len: u32_at(3),
        })
    }

    /// Refuses what this host's xl (Xen 4.17) could not restore: a save of
    /// the other byte order, mandatory flags it does not know, and
    /// optional data too long to be a domain config.
    pub fn check_restorable(&self) -> Result<(), XlHeaderError> {
        if self.big_endian != cfg!(target_endian = "big") {
            return Err(XlHeaderError::OtherByteOrder);
        }
        let unknown = self.mandatory_flags & !(XL_FLAG_JSON | XL_FLAG_STREAM_V2);
        if unknown != 0 {
            return Err(XlHeaderError::UnknownFlags(unknown));
        }
        if self.optional_data_len > MAX_XL_OPTIONAL_DATA {
            return Err(XlHeaderError::OptionalDataTooLong(self.optional_data_len));
        }
        Ok(())
    }

    /// The domain config embedded in `optional` (the optional data).
    pub fn config(&self, optional: &[u8]) -> Result<SavedConfig, XlHeaderError> {
        let len_bytes: [u8; 4] = optional
            .get(..4)
            .ok_or(XlHeaderError::NoConfig)?
            .try_into()
            .expect("4 bytes");
        let len = u32_in(self.big_endian, len_bytes) as usize;
        let data = optional.get(4..4 + len).ok_or(XlHeaderError::ConfigOverrun {
            len,
            available: optional.len(),
        })?;
        if self.mandatory_flags & XL_FLAG_JSON == 0 {
            return Err(XlHeaderError::TextConfig);
        }
        let text = data.strip_suffix(&[0]).unwrap_or(data);
        let json: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| XlHeaderError::NotJson(e.to_string()))?;
        Ok(SavedConfig::from_json(self.mandatory_flags, &json))
    }
}

fn u32_in(big_endian: bool, word: [u8; 4]) -> u32 {
    if big_endian {
        u32::from_be_bytes(word)
    } else {
        u32::from_le_bytes(word)
    }
}

/// What the header of an xl save file says about the domain it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedConfig {
    /// `mandatory_flags` of the header.
    pub mandatory_flags: u32,
    /// `c_info.type`: `pv`, `pvh` or `hvm` (lower case).
    pub guest_type: Option<String>,
    /// `b_info.max_memkb` (the domain's `maxmem`, its memory if unset).
    pub max_memkb: Option<u64>,
    /// `b_info.target_memkb`.
    pub target_memkb: Option<u64>,
    /// `b_info.max_vcpus`.
    pub max_vcpus: Option<u64>,
    /// The domain's name when it was saved.
    pub name: Option<String>,
}

impl SavedConfig {
    fn from_json(mandatory_flags: u32, json: &serde_json::Value) -> SavedConfig {
        use serde_json::Value;
        let c_info = json.get("c_info");
        let b_info = json.get("b_info");
        let guest_type = c_info
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .or_else(|| {
                // The build info's keyed union: "type.pv": {…}.
                b_info?
                    .as_object()?
                    .keys()
                    .find_map(|k| k.strip_prefix("type.").map(str::to_ascii_lowercase))
            });
        let number = |v: Option<&Value>, key: &str| v.and_then(|v| v.get(key)).and_then(Value::as_u64);
        SavedConfig {
            mandatory_flags,
            guest_type,
            max_memkb: number(b_info, "max_memkb"),
            target_memkb: number(b_info, "target_memkb"),
            max_vcpus: number(b_info, "max_vcpus"),
            name: c_info
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

impl SavedConfig {
    /// Where the saved domain is not a machine of `memory_mib` MiB and
    /// `vcpus` vCPUs, in words; `None` when it is.
    pub fn differs_from(&self, memory_mib: u32, vcpus: u32) -> Option<String> {
        let Some(memkb) = self.max_memkb.or(self.target_memkb) else {
            return Some("the save's config has no memory size".into());
        };
        if memkb != u64::from(memory_mib) * 1024 {
            return Some(format!(
                "memory is {} KiB in the save, {} MiB in the lot",
                memkb, memory_mib
            ));
        }
        match self.max_vcpus {
            None => Some("the save's config has no vCPU count".into()),
            Some(n) if n != u64::from(vcpus) => Some(format!("{n} vCPU(s) in the save, {vcpus} in the lot")),
            Some(_) => None,
        }
    }
}

/// Reads the header and the embedded domain config from the start of an
/// xl save file, refusing what this host's xl could not restore (see
/// [`XlHeader::check_restorable`]). Reads no further than the config.
pub fn read_saved_config<R: Read>(mut reader: R) -> Result<SavedConfig, XlHeaderError> {
    let mut fixed = [0u8; XL_HEADER_LEN];
    let got = read_full(&mut reader, &mut fixed)?;
    let header = XlHeader::parse(&fixed[..got])?;
    header.check_restorable()?;
    let mut optional = vec![0u8; header.optional_data_len as usize];
    let got = read_full(&mut reader, &mut optional)?;
    if got < optional.len() {
        return Err(XlHeaderError::TruncatedOptionalData {
            got,
            want: optional.len(),
        });
    }
    header.config(&optional)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The libxl stream header xl writes after its own.
    const LIBXL_HEADER: &[u8] = b"LibxlFmt\0\0\0\x02\0\0\0\0";

    /// An xl save file prefix as xl writes it, in this host's byte order.
    fn xl_prefix(mandatory_flags: u32, config: Option<&[u8]>) -> Vec<u8> {
        let mut optional = Vec::new();
        if let Some(config) = config {
            optional.extend_from_slice(&(config.len() as u32).to_ne_bytes());
            optional.extend_from_slice(config);
        }
        let mut file = XL_MAGIC.to_vec();
        for word in [XL_BYTEORDER, mandatory_flags, 0, optional.len() as u32] {
            file.extend_from_slice(&word.to_ne_bytes());
        }
        file.extend_from_slice(&optional);
        file.extend_from_slice(LIBXL_HEADER);
        file
    }

    fn config_json(kind: &str, memkb: u64, vcpus: u64) -> Vec<u8> {
        let json = serde_json::json!({
            "c_info": { "type": kind, "name": "vmlot-9-0-00000000", "uuid": "0b0e6d6c-0000-4000-8000-000000000000" },
            "b_info": {
                "max_vcpus": vcpus,
                "avail_vcpus": [0],
                "max_memkb": memkb,
                "target_memkb": memkb,
                format!("type.{kind}"): { "slack_memkb": 0 },
            },
            "disks": [],
            "on_poweroff": "preserve",
        });
        let mut text = serde_json::to_vec_pretty(&json).expect("json");
        text.push(0);
        text
    }

    fn saved(bytes: &[u8]) -> Result<SavedConfig, String> {
        read_saved_config(bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn saved_config_is_read_from_the_header() {
        let file = xl_prefix(
            XL_FLAG_JSON | XL_FLAG_STREAM_V2,
            Some(&config_json("pv", 131072, 2)),
        );
        assert_eq!(
            saved(&file).expect("parse"),
            SavedConfig {
                mandatory_flags: 3,
                guest_type: Some("pv".into()),
                max_memkb: Some(131072),
                target_memkb: Some(131072),
                max_vcpus: Some(2),
                name: Some("vmlot-9-0-00000000".into()),
            }
        );
        let header = XlHeader::parse(&file).expect("header");
        assert_eq!(header.big_endian, cfg!(target_endian = "big"));
        assert_eq!(header.optional_data_len as usize, file.len() - XL_HEADER_LEN - 16);

        // Truncated inside the optional data, inside the fixed header.
        let err = saved(&file[..XL_HEADER_LEN + 10]).expect_err("truncated");
        assert!(err.contains("truncated"), "{err}");
        let err = saved(&file[..40]).expect_err("truncated");
        assert!(err.contains("truncated"), "{err}");
        // Empty, and a QEMU checkpoint.
        for other in [
            &b""[..],
            &b"QEVM\0\0\0\x03 and more bytes than a header holds, surely"[..],
        ] {
            let err = saved(other).expect_err("not xl");
            assert!(err.contains("not an xl save file"), "{err}");
        }
    }

    #[test]
    fn saved_config_refusals() {
        let good = config_json("pv", 131072, 1);
        let err = |bytes: Vec<u8>| saved(&bytes).expect_err("refused");

        let mut swapped = xl_prefix(XL_FLAG_JSON, Some(&good));
        swapped[32..36].reverse();
        assert!(err(swapped).contains("other byte order"));
        let mut garbled = xl_prefix(XL_FLAG_JSON, Some(&good));
        garbled[32..36].copy_from_slice(b"\x01\x01\x01\x01");
        assert!(err(garbled).contains("byte-order"));
        assert!(err(xl_prefix(XL_FLAG_JSON | 1 << 7, Some(&good))).contains("unknown"));
        assert!(err(xl_prefix(XL_FLAG_STREAM_V2, Some(b"memory = 128\n"))).contains("text form"));
        assert!(err(xl_prefix(XL_FLAG_JSON, None)).contains("no domain config"));
        assert!(err(xl_prefix(XL_FLAG_JSON, Some(b"{not json\0"))).contains("not JSON"));

        let mut huge = xl_prefix(XL_FLAG_JSON, Some(&good));
        huge[44..48].copy_from_slice(&(MAX_XL_OPTIONAL_DATA + 1).to_ne_bytes());
        assert!(err(huge).contains("optional data"));
        // A config length that runs past the optional data.
        let mut overrun = xl_prefix(XL_FLAG_JSON, Some(&good));
        overrun[48..52].copy_from_slice(&(good.len() as u32 + 1).to_ne_bytes());
        assert!(err(overrun).contains("overruns"));
    }

    #[test]
    fn guest_type_falls_back_to_the_keyed_union() {
        let mut json: serde_json::Value =
            serde_json::from_slice(config_json("pvh", 131072, 1).strip_suffix(&[0]).unwrap()).unwrap();
        json["c_info"].as_object_mut().unwrap().remove("type");
        let s = saved(&xl_prefix(1, Some(&serde_json::to_vec(&json).unwrap()))).unwrap();
        assert_eq!(s.guest_type.as_deref(), Some("pvh"));
        // No type at all is reported as none, not guessed.
        json["b_info"].as_object_mut().unwrap().remove("type.pvh");
        let s = saved(&xl_prefix(1, Some(&serde_json::to_vec(&json).unwrap()))).unwrap();
        assert_eq!(s.guest_type, None);
    }
}
