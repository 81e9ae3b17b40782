//! OS Farm's recipes and images: a recipe says how to make a VM image
//! (distribution and suite, architecture, packages, files, a command run at
//! boot, disk size, format); its id is the SHA-256 of its canonical JSON,
//! so two callers asking for the same image name it alike and the farm
//! builds it once. An [`ImageRecord`] is what the farm made of a recipe:
//! the store's manifests of the kernel, the initrd and the disk.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{Digest, HashAlgorithm, IdError, ManifestId};

/// Version of the recipe format.
pub const RECIPE_VERSION: u32 = 1;
/// Distributions the farm builds (only Debian's archive is reachable).
pub const DISTRIBUTIONS: &[&str] = &["debian"];
/// Suites the farm builds.
pub const SUITES: &[&str] = &["bookworm", "trixie", "bullseye", "sid"];
/// Architectures the farm builds (its guests run on x86-64 QEMU).
pub const ARCHITECTURES: &[&str] = &["amd64"];
/// Most packages one recipe names.
pub const MAX_PACKAGES: usize = 200;
/// Most files one recipe adds, and the most bytes of each.
pub const MAX_FILES: usize = 64;
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Longest command.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// The disk's size bounds, MiB.
pub const MIN_DISK_MIB: u32 = 64;
pub const MAX_DISK_MIB: u32 = 16 * 1024;

/// What the farm writes besides the raw disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// An ext4 disk image (the disk a job boots from).
    #[default]
    Raw,
    /// The raw disk and, as an export, the root file system as a tar.
    Tar,
}

/// One file a recipe adds to the root file system (text).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits, e.g. 493 (0o755).
    #[serde(default = "default_mode")]
    pub mode: u32,
    pub content: String,
}

fn default_mode() -> u32 {
    0o644
}

/// How to make an image.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub version: u32,
    /// e.g. `debian`.
    pub distribution: String,
    /// e.g. `bookworm`.
    pub suite: String,
    /// Debian's name, e.g. `amd64`.
    pub architecture: String,
    /// Packages installed beside the distribution's minimal base.
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// Run by `/bin/sh -c` at boot, its output on the console; the guest
    /// powers off when it ends. None: the guest powers off at once.
    #[serde(default)]
    pub command: Option<String>,
    pub disk_mib: u32,
    #[serde(default)]
    pub format: ImageFormat,
}

/// Why a recipe is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecipeError {
    #[error("recipe version {0} is not supported (this farm reads {RECIPE_VERSION})")]
    Version(u32),
    #[error("distribution {0:?} is not built here (one of: {list})", list = DISTRIBUTIONS.join(", "))]
    Distribution(String),
    #[error("suite {0:?} is not built here (one of: {list})", list = SUITES.join(", "))]
    Suite(String),
    #[error("architecture {0:?} is not built here (one of: {list})", list = ARCHITECTURES.join(", "))]
    Architecture(String),
    #[error("{0} packages named; at most {MAX_PACKAGES}")]
    TooManyPackages(usize),
    #[error(
        "{0:?} is not a Debian package name (lower-case letters, digits, + - ., two or more, starting with a letter or digit)"
    )]
    Package(String),
    #[error("{0} files; at most {MAX_FILES}")]
    TooManyFiles(usize),
    #[error("file path {path:?}: {reason}")]
    FilePath { path: String, reason: &'static str },
    #[error("file {path:?} is {size} bytes; at most {MAX_FILE_BYTES}")]
    FileTooLarge { path: String, size: usize },
    #[error("file {path:?}: mode {mode:o} is more than permission bits (at most 7777 octal)")]
    FileMode { path: String, mode: u32 },
    #[error("file {0:?} is given twice")]
    DuplicateFile(String),
    #[error("the command is {0} bytes; at most {MAX_COMMAND_BYTES}, without NUL")]
    Command(usize),
    #[error("disk of {0} MiB; from {MIN_DISK_MIB} to {MAX_DISK_MIB}")]
    DiskSize(u32),
}

/// Paths a recipe may not write under: the guest's kernel file systems
/// and what the farm itself puts there to boot.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev", "/run", "/sbin/vmlot-init"];

impl Recipe {
    /// The recipe in canonical form: packages sorted and each once, files
    /// sorted by path. Its JSON is what the id hashes.
    pub fn canonical(&self) -> Recipe {
        let mut r = self.clone();
        r.packages.sort();
        r.packages.dedup();
        r.files.sort_by(|a, b| a.path.cmp(&b.path));
        r
    }

    /// The canonical JSON: the canonical form, fields in declaration order,
    /// no spaces.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.canonical()).expect("a recipe always serializes")
    }

    /// The recipe's id: SHA-256 of its canonical JSON.
    pub fn id(&self) -> RecipeId {
        RecipeId(Digest::of(HashAlgorithm::Sha256, &self.canonical_bytes()))
    }

    /// Every rule a recipe must keep, checked before anything is built.
    pub fn validate(&self) -> Result<(), RecipeError> {
        if self.version != RECIPE_VERSION {
            return Err(RecipeError::Version(self.version));
        }
        let known = |list: &[&str], v: &str| list.contains(&v);
        if !known(DISTRIBUTIONS, &self.distribution) {
            return Err(RecipeError::Distribution(clip(&self.distribution)));
        }
        if !known(SUITES, &self.suite) {
            return Err(RecipeError::Suite(clip(&self.suite)));
        }
        if !known(ARCHITECTURES, &self.architecture) {
            return Err(RecipeError::Architecture(clip(&self.architecture)));
        }
        if self.packages.len() > MAX_PACKAGES {
            return Err(RecipeError::TooManyPackages(self.packages.len()));
        }
        if let Some(bad) = self.packages.iter().find(|p| !package_name(p)) {
            return Err(RecipeError::Package(clip(bad)));
        }
        if self.files.len() > MAX_FILES {
            return Err(RecipeError::TooManyFiles(self.files.len()));
        }
        let mut paths = std::collections::HashSet::new();
        for f in &self.files {
            file_path(&f.path).map_err(|reason| RecipeError::FilePath {
                path: clip(&f.path),
                reason,
            })?;
            if f.content.len() > MAX_FILE_BYTES {
                return Err(RecipeError::FileTooLarge {
                    path: clip(&f.path),
                    size: f.content.len(),
                });
            }
            if f.mode > 0o7777 {
                return Err(RecipeError::FileMode {
                    path: clip(&f.path),
                    mode: f.mode,
                });
            }
            if !paths.insert(f.path.as_str()) {
                return Err(RecipeError::DuplicateFile(clip(&f.path)));
            }
        }
        if let Some(c) = &self.command
            && (c.len() > MAX_COMMAND_BYTES || c.contains('\0'))
        {
            return Err(RecipeError::Command(c.len()));
        }
        if !(MIN_DISK_MIB..=MAX_DISK_MIB).contains(&self.disk_mib) {
            return Err(RecipeError::DiskSize(self.disk_mib));
        }
        Ok(())
    }
}

/// Debian policy 5.6.1: at least two characters, lower-case letters,
/// digits, `+`, `-` and `.`, starting with a letter or digit.
fn package_name(p: &str) -> bool {
    p.len() >= 2
        && p.len() <= 100
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn file_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be absolute");
    }
    if path.len() > 1024 || path.contains('\0') {
        return Err("longer than 1024 bytes or holds NUL");
    }
    if path.ends_with('/') {
        return Err("names a directory, not a file");
    }
    if path
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("must be normal: no empty, `.` or `..` parts");
    }
    if RESERVED
        .iter()
        .any(|r| path == *r || path.strip_prefix(r).is_some_and(|rest| rest.starts_with('/')))
    {
        return Err(
            "lies under a path the farm or the kernel owns (/proc, /sys, /dev, /run, /sbin/vmlot-init)",
        );
    }
    Ok(())
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A recipe's name: the SHA-256 of its canonical JSON, 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecipeId(pub Digest);

impl RecipeId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }
}

impl fmt::Display for RecipeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RecipeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecipeId({})", self.to_hex())
    }
}

impl FromStr for RecipeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = |reason| IdError {
            kind: "recipe",
            value: clip(s),
            reason,
        };
        if s.len() != 64 {
            return Err(err("must be 64 hex digits (SHA-256)"));
        }
        s.parse::<ManifestId>()
            .map(|m| RecipeId(m.0))
            .map_err(|e| err(e.reason))
    }
}

impl Serialize for RecipeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for RecipeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for RecipeId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RecipeId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9a-f]{64}$",
            "description": "SHA-256 of a recipe's canonical JSON, lower-case hex"
        })
    }
}

/// One object the farm stored for an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredObject {
    pub manifest: ManifestId,
    /// The object's size in bytes.
    pub size: u64,
    /// Distinct blocks it names.
    pub unique_blocks: u64,
    /// Blocks the farm wrote because the store lacked them (the rest were
    /// there already: another image's, or this object's own repeats).
    pub sent_blocks: u64,
    pub sent_bytes: u64,
}

/// What the farm made of a recipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub version: u32,
    pub recipe_id: RecipeId,
    /// The recipe, canonical.
    pub recipe: Recipe,
    pub kernel: StoredObject,
    pub initrd: StoredObject,
    /// The ext4 root file system.
    pub disk: StoredObject,
    /// The root file system as a tar (format `tar`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<StoredObject>,
    /// The kernel command line that boots the disk and runs the command.
    pub cmdline: String,
    /// Every package installed, `name=version`, sorted.
    pub installed: Vec<String>,
    pub built_at: DateTime<Utc>,
    /// How long the build took, milliseconds.
    pub build_millis: u64,
}

/// caller → farm: build this recipe, or answer the image built before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    pub version: u32,
    pub recipe: Recipe,
}

/// farm → caller: the image, and whether this request built it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Built {
    pub image: ImageRecord,
    /// False: the farm had built it before and answered at once.
    pub built: bool,
}

/// farm → caller, before the answer to a build: one line of its progress
/// (sent on the request's reply subject with the header
/// [`crate::subjects::PROGRESS_HEADER`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BuildProgress {
    pub recipe_id: RecipeId,
    /// The build's step: `queued`, `bootstrap`, `files`, `disk`, `export`, `store`.
    pub step: String,
    pub line: String,
}

/// caller → farm: one image, by its recipe's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeRef {
    pub recipe_id: RecipeId,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn recipe() -> Recipe {
        Recipe {
            version: RECIPE_VERSION,
            distribution: "debian".into(),
            suite: "bookworm".into(),
            architecture: "amd64".into(),
            packages: vec!["hello".into(), "bc".into()],
            files: vec![RecipeFile {
                path: "/etc/motd".into(),
                mode: 0o644,
                content: "hi\n".into(),
            }],
            command: Some("hello".into()),
            disk_mib: 256,
            format: ImageFormat::Raw,
        }
    }

    #[test]
    fn the_id_is_the_hash_of_the_canonical_json_whatever_the_order() {
        let a = recipe();
        let mut b = a.clone();
        b.packages = vec!["bc".into(), "hello".into(), "hello".into()];
        assert_eq!(a.id(), b.id());
        assert_eq!(
            a.id().to_hex(),
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a.canonical_bytes()))
        );
        let text = String::from_utf8(a.canonical_bytes()).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"distribution":"debian","suite":"bookworm""#),
            "{text}"
        );
        assert!(text.contains(r#""packages":["bc","hello"]"#), "{text}");
        let mut c = a.clone();
        c.command = Some("hello -g hi".into());
        assert_ne!(a.id(), c.id());
        let parsed: RecipeId = a.id().to_hex().parse().unwrap();
        assert_eq!(parsed, a.id());
        assert!("abc".parse::<RecipeId>().is_err());
        assert!(
            a.id().to_hex()[..40].parse::<RecipeId>().is_err(),
            "a SHA-1 length is not a recipe id"
        );
    }

    #[test]
    fn a_good_recipe_passes() {
        recipe().validate().unwrap();
        let minimal: Recipe = serde_json::from_str(
            r#"{"version":1,"distribution":"debian","suite":"bookworm","architecture":"amd64","disk_mib":128}"#,
        )
        .unwrap();
        minimal.validate().unwrap();
        assert_eq!(minimal.format, ImageFormat::Raw);
    }

    #[test]
    fn each_bad_recipe_is_refused_by_name() {
        let bad = |f: &dyn Fn(&mut Recipe)| {
            let mut r = recipe();
            f(&mut r);
            r.validate().unwrap_err()
        };
        assert_eq!(bad(&|r| r.version = 2), RecipeError::Version(2));
        assert!(matches!(
            bad(&|r| r.distribution = "slc".into()),
            RecipeError::Distribution(_)
        ));
        assert!(matches!(
            bad(&|r| r.suite = "potato".into()),
            RecipeError::Suite(_)
        ));
        assert!(matches!(
            bad(&|r| r.architecture = "arm64".into()),
            RecipeError::Architecture(_)
        ));
        for p in ["--allow-unauthenticated", "Hello", "a", "x y", "pkg;rm", ""] {
            assert!(
                matches!(bad(&|r| r.packages.push(p.into())), RecipeError::Package(_)),
                "{p}"
            );
        }
        assert!(matches!(
            bad(&|r| r.packages = (0..201).map(|i| format!("p{i}")).collect()),
            RecipeError::TooManyPackages(201)
        ));
        for path in [
            "etc/x",
            "/etc/../x",
            "/etc//x",
            "/proc/x",
            "/dev",
            "/sbin/vmlot-init",
            "/etc/",
            "/./x",
        ] {
            let e = bad(&|r| r.files[0].path = path.into());
            assert!(matches!(e, RecipeError::FilePath { .. }), "{path}: {e}");
        }
        assert!(matches!(
            bad(&|r| r.files[0].content = "x".repeat(MAX_FILE_BYTES + 1)),
            RecipeError::FileTooLarge { .. }
        ));
        assert!(matches!(
            bad(&|r| r.files[0].mode = 0o10000),
            RecipeError::FileMode { .. }
        ));
        assert!(matches!(
            bad(&|r| r.files.push(r.files[0].clone())),
            RecipeError::DuplicateFile(_)
        ));
        assert!(matches!(
            bad(&|r| r.command = Some("a\0b".into())),
            RecipeError::Command(_)
        ));
        assert_eq!(bad(&|r| r.disk_mib = 1), RecipeError::DiskSize(1));
        assert!(serde_json::from_str::<Recipe>(r#"{"version":1,"surprise":true}"#).is_err());
        // Paths that only look reserved are fine.
        let mut r = recipe();
        r.files[0].path = "/device/x".into();
        r.validate().unwrap();
    }
}
