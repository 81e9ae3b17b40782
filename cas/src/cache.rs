//! A provider's or client's local block cache: one file per block under
//! `dir/<first two hex digits>/<rest>`, a size cap, least-recently-used
//! eviction. Knowing what it holds in memory lets `have` answer hot/cold
//! counts without touching the network.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use vmlot_schemas::{BlockId, Manifest, ManifestId};

use crate::error::CasError;

/// How much of a manifest is already here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HaveReport {
    pub hot_blocks: u64,
    pub cold_blocks: u64,
    pub hot_bytes: u64,
    pub cold_bytes: u64,
}

impl HaveReport {
    /// Fraction of the stored bytes already present (1.0 for an all-zero object).
    pub fn hot_fraction(&self) -> f64 {
        let total = self.hot_bytes + self.cold_bytes;
        if total == 0 {
            1.0
        } else {
            self.hot_bytes as f64 / total as f64
        }
    }
}

#[derive(Default)]
struct Index {
    /// block -> (size, last-use tick)
    entries: HashMap<BlockId, (u64, u64)>,
    /// last-use tick -> block, oldest first
    by_use: BTreeMap<u64, BlockId>,
    total: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, id: BlockId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(&id) {
            self.by_use.remove(&entry.1);
            entry.1 = tick;
            self.by_use.insert(tick, id);
        }
    }

    fn insert(&mut self, id: BlockId, size: u64) {
        if self.entries.contains_key(&id) {
            self.touch(id);
            return;
        }
        self.tick += 1;
        self.entries.insert(id, (size, self.tick));
        self.by_use.insert(self.tick, id);
        self.total += size;
    }

    fn remove(&mut self, id: &BlockId) {
        if let Some((size, tick)) = self.entries.remove(id) {
            self.by_use.remove(&tick);
            self.total -= size;
        }
    }
}

/// The on-disk block cache.
pub struct BlockCache {
    dir: PathBuf,
    cap_bytes: u64,
    index: Mutex<Index>,
}

impl BlockCache {
    /// Opens (or creates) a cache in `dir` holding at most `cap_bytes`.
    /// Existing blocks are indexed oldest-modified first, so the use order
    /// survives a restart (reads bump the file's modification time).
    pub fn open(dir: impl Into<PathBuf>, cap_bytes: u64) -> Result<Self, CasError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| CasError::io("create cache dir", &dir, e))?;
        let mut found = Vec::new();
        for shard in std::fs::read_dir(&dir).map_err(|e| CasError::io("read cache dir", &dir, e))? {
            let shard = shard.map_err(|e| CasError::io("read cache dir", &dir, e))?;
            let prefix = shard.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !shard.path().is_dir() {
                continue;
            }
            for entry in
                std::fs::read_dir(shard.path()).map_err(|e| CasError::io("read cache dir", &dir, e))?
            {
                let entry = entry.map_err(|e| CasError::io("read cache dir", &dir, e))?;
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                let Ok(id) = name.parse::<BlockId>() else { continue };
                let Ok(meta) = entry.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, id, meta.len()));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, id, size) in found {
            index.insert(id, size);
        }
        let cache = Self {
            dir,
            cap_bytes,
            index: Mutex::new(index),
        };
        cache.evict();
        Ok(cache)
    }

    fn path_of(&self, id: &BlockId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, id: &BlockId) -> bool {
        self.index
            .lock()
            .expect("cache index lock")
            .entries
            .contains_key(id)
    }

    /// Bytes held now.
    pub fn size(&self) -> u64 {
        self.index.lock().expect("cache index lock").total
    }

    /// A block's content, verified against its name. A block whose file was
    /// damaged on disk is dropped and reported absent, never returned.
    pub fn get(&self, id: &BlockId) -> Option<Bytes> {
        if !self.contains(id) {
            return None;
        }
        let path = self.path_of(id);
        match std::fs::read(&path) {
            Ok(data) if id.matches(&data) => {
                self.index.lock().expect("cache index lock").touch(*id);
                if let Ok(file) = std::fs::File::options().write(true).open(&path) {
                    let _ = file.set_modified(SystemTime::now());
                }
                Some(Bytes::from(data))
            }
            _ => {
                tracing::warn!(block = %id, "dropping damaged or vanished cache entry");
                self.index.lock().expect("cache index lock").remove(id);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps a block whose content the caller has verified.
    pub fn put(&self, id: &BlockId, data: &[u8]) -> Result<(), CasError> {
        if self.contains(id) {
            return Ok(());
        }
        if data.len() as u64 > self.cap_bytes {
            return Ok(());
        }
        let path = self.path_of(id);
        let parent = path.parent().expect("block path has a shard dir");
        std::fs::create_dir_all(parent).map_err(|e| CasError::io("create cache shard", parent, e))?;
        // Write then rename, so a crash never leaves a half block under a name.
        let tmp = parent.join(format!(".{}-{}.tmp", std::process::id(), next_tmp_suffix()));
        std::fs::write(&tmp, data).map_err(|e| CasError::io("write cache block", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| CasError::io("commit cache block", &path, e))?;
        self.index
            .lock()
            .expect("cache index lock")
            .insert(*id, data.len() as u64);
        self.evict();
        Ok(())
    }

    /// Keeps a manifest's canonical bytes, under the block name of the same
    /// hash of the same bytes (so [`get`](Self::get)'s check holds for it
    /// and it is evicted like a block).
    pub fn put_manifest(&self, id: &ManifestId, manifest: &Manifest) -> Result<(), CasError> {
        self.put(&BlockId(id.0), &manifest.canonical_bytes())
    }

    /// A manifest's canonical bytes kept by [`put_manifest`](Self::put_manifest),
    /// verified against `id`'s hash (not yet decoded).
    pub fn manifest_bytes(&self, id: &ManifestId) -> Option<Bytes> {
        self.get(&BlockId(id.0))
    }

    fn evict(&self) {
        let mut index = self.index.lock().expect("cache index lock");
        while index.total > self.cap_bytes {
            let Some((_, id)) = index.by_use.iter().next().map(|(t, id)| (*t, *id)) else {
                break;
            };
            index.remove(&id);
            let _ = std::fs::remove_file(self.path_of(&id));
        }
    }

    /// Hot/cold blocks and bytes of `manifest`, from memory alone.
    pub fn have(&self, manifest: &Manifest) -> HaveReport {
        let index = self.index.lock().expect("cache index lock");
        let mut report = HaveReport::default();
        for (id, n) in manifest.unique_blocks() {
            if index.entries.contains_key(&id) {
                report.hot_blocks += 1;
                report.hot_bytes += n as u64;
            } else {
                report.cold_blocks += 1;
                report.cold_bytes += n as u64;
            }
        }
        report
    }
}

fn next_tmp_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: u8) -> (BlockId, Vec<u8>) {
        let data = vec![n; 1000];
        (BlockId::of(vmlot_schemas::HashAlgorithm::Sha256, &data), data)
    }

    #[test]
    fn evicts_least_recently_used_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 3000).unwrap();
        let (a, da) = block(1);
        let (b, db) = block(2);
        let (c, dc) = block(3);
        let (d, dd) = block(4);
        cache.put(&a, &da).unwrap();
        cache.put(&b, &db).unwrap();
        cache.put(&c, &dc).unwrap();
        assert!(cache.get(&a).is_some()); // a is now the most recent
        cache.put(&d, &dd).unwrap(); // evicts b
        assert!(cache.contains(&a) && !cache.contains(&b) && cache.contains(&c) && cache.contains(&d));
        assert_eq!(cache.size(), 3000);
        drop(cache);
        let again = BlockCache::open(dir.path(), 3000).unwrap();
        assert!(again.contains(&a) && again.contains(&d) && !again.contains(&b));
    }

    #[test]
    fn damaged_file_is_dropped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 20).unwrap();
        let (a, da) = block(9);
        cache.put(&a, &da).unwrap();
        std::fs::write(cache.path_of(&a), b"tampered").unwrap();
        assert!(cache.get(&a).is_none());
        assert!(!cache.contains(&a));
    }
}
