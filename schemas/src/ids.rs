//! One id type per kind, so a block id cannot be passed where a manifest id
//! is meant.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

/// Error for a string that is not a valid id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Hash algorithm naming blocks and manifests. A store has one (kept in its
/// stream's metadata); every manifest records the one it was made with.
/// SHA-1 is the seed's, kept for closed pools; SHA-256 is the default
/// wherever strangers write blocks, because SHA-1 collisions can be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HashAlgorithm {
    Sha1,
    Sha256,
}

impl HashAlgorithm {
    /// The name used in manifests, stream metadata and flags.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Sha256 => "sha256",
        }
    }

    /// Length of a name made with this algorithm, in hex digits.
    pub fn hex_len(self) -> usize {
        match self {
            HashAlgorithm::Sha1 => 40,
            HashAlgorithm::Sha256 => 64,
        }
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sha1" => Ok(HashAlgorithm::Sha1),
            "sha256" => Ok(HashAlgorithm::Sha256),
            other => Err(format!(
                "unknown hash algorithm {:?} (sha1 or sha256)",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// A content hash: its algorithm is told by its length, so a name is
/// self-describing in subjects and JSON (40 or 64 lower-case hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Digest {
    Sha1([u8; 20]),
    Sha256([u8; 32]),
}

impl Digest {
    /// The hash of `bytes` by `algorithm`.
    pub fn of(algorithm: HashAlgorithm, bytes: &[u8]) -> Self {
        match algorithm {
            HashAlgorithm::Sha1 => Digest::Sha1(Sha1::digest(bytes).into()),
            HashAlgorithm::Sha256 => Digest::Sha256(Sha256::digest(bytes).into()),
        }
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        match self {
            Digest::Sha1(_) => HashAlgorithm::Sha1,
            Digest::Sha256(_) => HashAlgorithm::Sha256,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Digest::Sha1(b) => b,
            Digest::Sha256(b) => b,
        }
    }

    /// True when `bytes` hash to this digest by its own algorithm.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        Digest::of(self.algorithm(), bytes) == *self
    }

    fn parse(s: &str) -> Result<Self, &'static str> {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("must be lower-case hex");
        }
        match s.len() {
            40 => {
                let mut out = [0u8; 20];
                hex::decode_to_slice(s, &mut out).map_err(|_| "not hex")?;
                Ok(Digest::Sha1(out))
            }
            64 => {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| "not hex")?;
                Ok(Digest::Sha256(out))
            }
            _ => Err("must be 40 (SHA-1) or 64 (SHA-256) hex digits"),
        }
    }
}

macro_rules! content_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Digest);

        impl $name {
            /// The hash of `bytes` by `algorithm`.
            pub fn of(algorithm: HashAlgorithm, bytes: &[u8]) -> Self {
                Self(Digest::of(algorithm, bytes))
            }

            /// The algorithm this name was made with.
            pub fn algorithm(&self) -> HashAlgorithm {
                self.0.algorithm()
            }

            /// True when `bytes` are what this name names.
            pub fn matches(&self, bytes: &[u8]) -> bool {
                self.0.matches(bytes)
            }

            /// Lower-case hex, as used in subjects and JSON.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0.as_bytes())
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
                Digest::parse(s).map(Self).map_err(|reason| IdError {
                    kind: $kind,
                    value: s.chars().take(80).collect(),
                    reason,
                })
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
                    "pattern": "^([0-9a-f]{40}|[0-9a-f]{64})$",
                    "description": concat!("SHA-1 (40 hex digits) or SHA-256 (64) name of a ", $kind, ", lower-case")
                })
            }
        }
    };
}

content_id!(
    /// Name of a block: the hash of its (uncompressed) content.
    BlockId,
    "block"
);
content_id!(
    /// Name of a manifest: the hash of its canonical JSON bytes, by the
    /// algorithm the manifest records.
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
uuid_id!(
    /// A pack of blocks in the store: random, so nobody can take a pack's
    /// name before its writer (its blocks are checked against their own
    /// names, so the pack needs no content name).
    PackId
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

/// Jobs fall into this many partitions by id. Each partition is run by
/// one broker at a time, the one holding its lease; bids and results carry
/// their job's partition in their subject, so a broker hears only those
/// of the partitions it holds.
pub const PARTITIONS: u16 = 16;

/// The partition `job` falls in: fixed by its id, so brokers and
/// providers agree on it without asking each other.
pub fn partition_of(job: &JobId) -> u16 {
    let b = job.0.as_bytes();
    u16::from_be_bytes([b[14], b[15]]) % PARTITIONS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_id_round_trips_and_rejects_bad_hex() {
        let id = BlockId::of(HashAlgorithm::Sha1, b"hello");
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

    #[test]
    fn sha256_names_are_told_by_their_length() {
        let id = BlockId::of(HashAlgorithm::Sha256, b"hello");
        assert_eq!(
            id.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let back: BlockId = id.to_hex().parse().unwrap();
        assert_eq!(back, id);
        assert_eq!(back.algorithm(), HashAlgorithm::Sha256);
        assert!(id.matches(b"hello"));
        assert!(!id.matches(b"hellO"));
        assert_ne!(id, BlockId::of(HashAlgorithm::Sha1, b"hello"));
        assert!(id.to_hex()[..50].parse::<BlockId>().is_err());
        assert_eq!("sha256".parse::<HashAlgorithm>(), Ok(HashAlgorithm::Sha256));
        assert!("md5".parse::<HashAlgorithm>().is_err());
    }
}
