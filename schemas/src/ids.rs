//! One id type per kind, so a block id cannot be passed where a manifest id
//! is meant.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::{Digest, Sha1};

/// Error for a string that is not a valid id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

macro_rules! sha1_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 20]);

        impl $name {
            /// The SHA-1 of `bytes`.
            pub fn of(bytes: &[u8]) -> Self {
                Self(Sha1::digest(bytes).into())
            }

            /// Lower-case hex, as used in subjects and JSON.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let err = |reason| IdError { kind: $kind, value: s.chars().take(80).collect(), reason };
                if s.len() != 40 {
                    return Err(err("must be 40 hex digits"));
                }
                if s.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(err("must be lower-case hex"));
                }
                let mut out = [0u8; 20];
                hex::decode_to_slice(s, &mut out).map_err(|_| err("not hex"))?;
                Ok(Self(out))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": "^[0-9a-f]{40}$",
                    "description": concat!("SHA-1 name of a ", $kind, ", 40 lower-case hex digits")
                })
            }
        }
    };
}

sha1_id!(
    /// Name of a block: the SHA-1 of its (uncompressed) content.
    BlockId,
    "block"
);
sha1_id!(
    /// Name of a manifest: the SHA-1 of its canonical JSON bytes.
    ManifestId,
    "manifest"
);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        #[serde(transparent)]
        pub struct $name(pub uuid::Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(uuid::Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, uuid::Error> {
                uuid::Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A submitted job.
    JobId
);
uuid_id!(
    /// One lot: an offer of one segment attempt of a job.
    LotId
);
uuid_id!(
    /// A provider daemon.
    ProviderId
);

/// Providers fall into this many shards by id. A lot that needs only a
/// handful of bidders is offered to a few shards, not to every provider.
pub const LOT_SHARDS: u16 = 64;

/// The lot shard `provider` falls in: fixed by its id, so the broker and
/// the provider agree on it without asking each other.
pub fn shard_of(provider: &ProviderId) -> u16 {
    let b = provider.0.as_bytes();
    u16::from_be_bytes([b[14], b[15]]) % LOT_SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_id_round_trips_and_rejects_bad_hex() {
        let id = BlockId::of(b"hello");
        assert_eq!(id.to_hex(), "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d");
        assert_eq!(id.to_hex().parse::<BlockId>().unwrap(), id);
        assert!("zz".parse::<BlockId>().is_err());
        assert!(
            "AAF4C61DDCC5E8A2DABEDE0F3B482CD9AEA9434D"
                .parse::<BlockId>()
                .is_err()
        );
        assert!(serde_json::from_str::<BlockId>("\"aaf4\"").is_err());
    }
}
