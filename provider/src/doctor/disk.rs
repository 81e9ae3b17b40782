//! The doctor's checks of the disk: free space and write access where the
//! provider keeps its block cache and runs its segments.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Check, Status};
use crate::config::ProviderConfig;

/// Free space wanted on any filesystem the provider writes to.
pub const MIN_FREE: u64 = 10 << 30;

/// Free space wanted in the work dir: a segment holds its input and its
/// output machine state, each up to the guest's memory, so twice
/// `memory_mib` per slot; at least [`MIN_FREE`].
pub fn work_need(config: &ProviderConfig) -> u64 {
    let per_slot = (2 * u64::from(config.memory_mib)) << 20;
    (per_slot * u64::from(config.slots.max(1))).max(MIN_FREE)
}

/// Free space wanted in the cache dir: twice the cache's budget
/// (`cache_bytes`, room to fill it while old blocks are evicted); at
/// least [`MIN_FREE`].
pub fn cache_need(config: &ProviderConfig) -> u64 {
    config.cache_bytes.saturating_mul(2).max(MIN_FREE)
}

/// A size in words: `12.3 GiB`, `512 MiB`.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// `free` bytes on a filesystem where `need` are wanted by `what`.
pub fn space_check(name: &'static str, dir: &Path, free: u64, need: u64, why: &str) -> Check {
    if free >= need {
        Check::new(
            name,
            Status::Ok,
            format!(
                "{}: {} free (≥ {} wanted: {why})",
                dir.display(),
                size(free),
                size(need)
            ),
        )
    } else {
        Check::new(
            name,
            Status::Warning,
            format!(
                "{}: {} free, under the {} wanted ({why}): free some space or move it to a larger filesystem",
                dir.display(),
                size(free),
                size(need)
            ),
        )
    }
}

/// What a directory's filesystem offers: its nearest existing ancestor
/// (the directory itself once it exists), whether that is writable, its
/// free bytes and its device.
struct Fs {
    existing: PathBuf,
    writable: bool,
    free: u64,
    dev: u64,
}

fn filesystem(dir: &Path) -> std::io::Result<Fs> {
    let absolute = std::path::absolute(dir)?;
    let existing = absolute
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated string and `stat` a zeroed
    // statvfs that libc fills; both outlive the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let writable = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    Ok(Fs {
        dev: std::fs::metadata(&existing)?.dev(),
        existing,
        writable,
        free,
    })
}

/// Free space and write access in the work dir and the cache dir. When
/// both are on one filesystem, the cache's line wants both needs at once.
pub(super) fn disks(config: &ProviderConfig) -> Vec<Check> {
    let work = filesystem(&config.work_dir);
    let cache = filesystem(&config.cache_dir);
    let shared = matches!((&work, &cache), (Ok(w), Ok(c)) if w.dev == c.dev);
    let work_why = format!(
        "2 × {} MiB per slot × {} slot(s), at least {}",
        config.memory_mib,
        config.slots,
        size(MIN_FREE)
    );
    let cache_why = if shared {
        format!(
            "2 × cache_bytes ({}) plus the work dir's, on the same filesystem",
            size(config.cache_bytes)
        )
    } else {
        format!(
            "2 × cache_bytes ({}), at least {}",
            size(config.cache_bytes),
            size(MIN_FREE)
        )
    };
    let cache_need = cache_need(config) + if shared { work_need(config) } else { 0 };
    vec![
        disk("work-dir", &config.work_dir, work, work_need(config), &work_why),
        disk("cache-dir", &config.cache_dir, cache, cache_need, &cache_why),
    ]
}

fn disk(name: &'static str, dir: &Path, fs: std::io::Result<Fs>, need: u64, why: &str) -> Check {
    match fs {
        Err(e) => Check::new(name, Status::Missing, format!("{}: {e}", dir.display())),
        Ok(fs) if !fs.writable => Check::new(
            name,
            Status::Missing,
            format!(
                "{} is not writable by this user (uid {}), so {} cannot be made or used: give the \
                 provider's user that directory",
                fs.existing.display(),
                // SAFETY: getuid has no preconditions and cannot fail.
                unsafe { libc::getuid() },
                dir.display()
            ),
        ),
        Ok(fs) => space_check(name, dir, fs.free, need, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_thresholds() {
        let config = ProviderConfig::default();
        // 8 GiB of cache: 16 GiB wanted; one 4 GiB slot: the 10 GiB floor.
        assert_eq!(cache_need(&config), 16 << 30);
        assert_eq!(work_need(&config), MIN_FREE);
        let big = ProviderConfig {
            slots: 4,
            memory_mib: 8192,
            cache_bytes: 1 << 30,
            ..ProviderConfig::default()
        };
        assert_eq!(work_need(&big), 64 << 30);
        assert_eq!(cache_need(&big), MIN_FREE);
        let dir = Path::new("/var/lib/vmlot/work");
        let low = space_check("work-dir", dir, 3 << 30, 10 << 30, "why");
        assert_eq!(low.status, Status::Warning);
        assert!(
            low.detail.contains("3.0 GiB free, under the 10.0 GiB wanted"),
            "{}",
            low.detail
        );
        assert_eq!(
            space_check("work-dir", dir, 10 << 30, 10 << 30, "why").status,
            Status::Ok
        );
        assert_eq!(size(512 << 20), "512 MiB");
    }
}
