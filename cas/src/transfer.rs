//! Moving whole files through the store: push cuts a file into blocks and
//! writes only those the store lacks; pull rebuilds it from its manifest,
//! taking what it can from the local cache and verifying every block.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use vmlot_schemas::{BlockId, Chunking, Extent, Manifest, ManifestId, ObjectKind, PackId};

use crate::cache::BlockCache;
use crate::chunk::{ManifestBuilder, Piece, chunk_stream};
use crate::error::CasError;
use crate::layout::Layout;
use crate::store::BlockStore;

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    pub manifest_id: ManifestId,
    pub manifest: Manifest,
    /// Distinct stored blocks in the object.
    pub unique_blocks: u64,
    /// Blocks written because the store lacked them.
    pub sent_blocks: u64,
    /// Bytes of block payload that crossed the wire.
    pub sent_bytes: u64,
    pub elapsed: Duration,
}

/// What a pull did.
#[derive(Clone, Debug)]
pub struct PullReport {
    pub manifest: Manifest,
    pub unique_blocks: u64,
    pub cached_blocks: u64,
    pub fetched_blocks: u64,
    /// Bytes of block payload that crossed the wire.
    pub fetched_bytes: u64,
    pub elapsed: Duration,
}

/// Pushes `path` into the store. Blocks listed in `known_present` (e.g. the
/// checkpoint this one grew from) are taken as stored without asking.
/// Blocks sent are also kept in `cache` when one is given.
pub async fn push_file(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    path: &Path,
    kind: ObjectKind,
    chunking: Chunking,
    known_present: &HashSet<BlockId>,
) -> Result<PushReport, CasError> {
    push_file_over(store, cache, path, kind, chunking, known_present, None).await
}

/// As [`push_file`], the manifest stored as the edits from `base` (the
/// object this one grew from, e.g. the segment's input checkpoint) when
/// that is smaller; `base`'s blocks are taken as stored.
pub async fn push_file_over(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    path: &Path,
    kind: ObjectKind,
    chunking: Chunking,
    known_present: &HashSet<BlockId>,
    base: Option<&ManifestId>,
) -> Result<PushReport, CasError> {
    let started = Instant::now();
    let batch = store.options().batch;
    let file = std::fs::File::open(path).map_err(|e| CasError::io("open", path, e))?;
    let (tx, mut rx) = mpsc::channel::<Vec<(BlockId, Bytes)>>(store.options().concurrency * 2);
    let mut known = known_present.clone();
    // Which pack holds each block: the base's record, then what the
    // uploads find stored or write; left beside the manifest for readers.
    let mut located: HashMap<BlockId, PackId> = HashMap::new();
    if let Some(base) = base {
        let base_manifest = store.get_manifest_via(base, cache).await?;
        known.extend(base_manifest.unique_blocks().into_iter().map(|(id, _)| id));
        located = store.get_locations(base, &base_manifest).await;
        tracing::debug!(elapsed = ?started.elapsed(), "base manifest and locations read");
    }
    let owned_path = path.to_path_buf();
    let hash = store.hash();

    // Reading and hashing is CPU and blocking I/O: its own thread, feeding
    // batches of new distinct blocks to the uploaders below.
    let chunker = tokio::task::spawn_blocking(move || -> Result<(Manifest, u64), CasError> {
        let mut builder = ManifestBuilder::new(kind, chunking, hash);
        let mut seen: HashSet<BlockId> = HashSet::new();
        let mut pending = Vec::with_capacity(batch);
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        chunk_stream(reader, chunking, hash, |piece| {
            match piece {
                Piece::Zero(n) => builder.zero(n),
                Piece::Data(id, data) => {
                    builder.block(id, data.len() as u32);
                    if seen.insert(id) && !known.contains(&id) {
                        pending.push((id, Bytes::copy_from_slice(data)));
                        if pending.len() == batch {
                            let full = std::mem::replace(&mut pending, Vec::with_capacity(batch));
                            tx.blocking_send(full)
                                .map_err(|_| std::io::Error::other("uploader stopped"))?;
                        }
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| CasError::io("read", &owned_path, e))?;
        if !pending.is_empty() {
            tx.blocking_send(pending)
                .map_err(|_| CasError::nats("block upload", "uploader stopped"))?;
        }
        Ok((builder.finish(), seen.len() as u64))
    });

    let mut sent_blocks = 0u64;
    let mut sent_bytes = 0u64;
    let uploads = async {
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                next = rx.recv(), if in_flight.len() < store.options().concurrency => match next {
                    Some(group) => in_flight.push(upload_group(store, cache, group)),
                    None => break,
                },
                Some(done) = in_flight.next() => {
                    let (blocks, bytes, found) = done?;
                    sent_blocks += blocks;
                    sent_bytes += bytes;
                    located.extend(found);
                }
            }
        }
        while let Some(done) = in_flight.next().await {
            let (blocks, bytes, found) = done?;
            sent_blocks += blocks;
            sent_bytes += bytes;
            located.extend(found);
        }
        Ok::<_, CasError>(())
    };
    let upload_result = uploads.await;
    // Dropping the receiver on an upload error stops the chunker promptly.
    drop(rx);
    let chunked = chunker.await.map_err(|e| CasError::nats("chunker task", e))?;
    upload_result?;
    let (manifest, unique_blocks) = chunked?;
    tracing::debug!(elapsed = ?started.elapsed(), sent_blocks, "blocks read, hashed and written");
    let manifest_id = store.put_manifest_over(&manifest, base).await?;
    tracing::debug!(elapsed = ?started.elapsed(), "manifest written");
    store.put_locations(&manifest_id, &manifest, &located).await;
    tracing::debug!(elapsed = ?started.elapsed(), "locations written");
    if let Some(cache) = cache {
        cache.put_manifest(&manifest_id, &manifest)?;
    }
    Ok(PushReport {
        manifest_id,
        manifest,
        unique_blocks,
        sent_blocks,
        sent_bytes,
        elapsed: started.elapsed(),
    })
}

/// Writes the blocks of `group` the store lacks; returns how many, their
/// bytes on the wire, and the pack of every block of the group found in
/// one or written into one.
async fn upload_group(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    group: Vec<(BlockId, Bytes)>,
) -> Result<(u64, u64, HashMap<BlockId, PackId>), CasError> {
    let ids: Vec<BlockId> = group.iter().map(|(id, _)| *id).collect();
    let present = store.locate_checked(&ids).await?;
    let to_send: Vec<(BlockId, Bytes)> = group
        .iter()
        .filter(|(id, _)| !present.contains_key(id))
        .cloned()
        .collect();
    let written = store.put_blocks(&to_send).await?;
    if let Some(cache) = cache {
        for (id, data) in &group {
            cache.put(id, data)?;
        }
    }
    let mut packs = written.packs;
    packs.extend(present.into_iter().filter_map(|(id, pack)| Some((id, pack?))));
    Ok((to_send.len() as u64, written.wire, packs))
}

/// Rebuilds the object `manifest_id` at `dest`. It is written to a
/// temporary file beside `dest` and renamed into place only when every
/// block has arrived and verified, so a failed pull leaves nothing at
/// `dest`. Zero runs become holes: the file is as sparse as its source.
pub async fn pull_file(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    manifest_id: &ManifestId,
    dest: &Path,
) -> Result<PullReport, CasError> {
    pull_file_over(store, cache, manifest_id, dest, None).await
}

/// A local file to pull onto: it holds the object `manifest` describes
/// (this process wrote or pulled it, and nothing has changed it since).
/// The pull takes it over (moves it), so the caller gives it up.
pub struct Seed<'a> {
    pub path: &'a Path,
    pub manifest: &'a Manifest,
}

/// As [`pull_file`], onto `seed` when given: the seed becomes the new file,
/// and only the extents it does not already hold at the same offset are
/// written (a guest's RAM file after one segment: the pages the guest
/// wrote). No extent is read back: the seed is taken as what its manifest
/// says. Blocks written still come from the cache or the store, verified;
/// those fetched are not put in the cache (the new file is the copy kept).
pub async fn pull_file_over(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    manifest_id: &ManifestId,
    dest: &Path,
    seed: Option<Seed<'_>>,
) -> Result<PullReport, CasError> {
    let started = Instant::now();
    let manifest = store.get_manifest_via(manifest_id, cache).await?;
    tracing::debug!(elapsed = ?started.elapsed(), "manifest read");
    let partial = partial_path(dest);
    let base = match seed {
        Some(seed) => {
            std::fs::rename(seed.path, &partial).map_err(|e| CasError::io("take over", seed.path, e))?;
            Some(seed.manifest)
        }
        None => None,
    };
    let result = write_object(store, cache, manifest_id, &manifest, &partial, base).await;
    match result {
        Ok((cached_blocks, fetched_blocks, fetched_bytes)) => {
            std::fs::rename(&partial, dest).map_err(|e| CasError::io("rename into place", dest, e))?;
            Ok(PullReport {
                unique_blocks: cached_blocks + fetched_blocks,
                manifest,
                cached_blocks,
                fetched_blocks,
                fetched_bytes,
                elapsed: started.elapsed(),
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Bytes written to a pulled file between two nudges to the kernel to
/// start writing them to disk ([`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing `file`'s dirty pages to disk without
/// waiting for them, so that the fsync before the rename finds most of
/// them written (a pull of 58 MB waited 50-60 ms for its fsync when every
/// page was still dirty at the end). Only a head start: the fsync is what
/// makes the file durable, so a failure here is ignored.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on a file descriptor this function borrows
    // for the call; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Cached blocks gathered for one [`write_runs`].
const CACHED_PER_WRITE: usize = 256;

/// Writes each `(offset, bytes)` of `runs` (sorted by offset), every
/// stretch of them that lies end to end with one `pwritev` of up to
/// [`MAX_IOVECS`] buffers: a pull of 58 MB in 4 KiB blocks made 14 000
/// `pwrite` calls, now a few hundred.
fn write_runs(file: &std::fs::File, runs: &[(u64, Bytes)]) -> std::io::Result<()> {
    let mut i = 0;
    while i < runs.len() {
        let start = runs[i].0;
        let mut end = start + runs[i].1.len() as u64;
        let mut j = i + 1;
        while j < runs.len() && j - i < MAX_IOVECS && runs[j].0 == end {
            end += runs[j].1.len() as u64;
            j += 1;
        }
        write_stretch(file, &runs[i..j])?;
        i = j;
    }
    Ok(())
}

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes buffers that lie end to end from the first one's offset; what
/// a short write leaves is written buffer by buffer.
fn write_stretch(file: &std::fs::File, stretch: &[(u64, Bytes)]) -> std::io::Result<()> {
    let slices: Vec<std::io::IoSlice<'_>> = stretch.iter().map(|(_, d)| std::io::IoSlice::new(d)).collect();
    let total: usize = stretch.iter().map(|(_, d)| d.len()).sum();
    let mut done = loop {
        match rustix::io::pwritev(file, &slices, stretch[0].0) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if done == total {
        return Ok(());
    }
    for (at, data) in stretch {
        if done >= data.len() {
            done -= data.len();
            continue;
        }
        file.write_all_at(&data[done..], at + done as u64)?;
        done = 0;
    }
    Ok(())
}

fn partial_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.vmlot-partial"))
}

/// Writes the object at `partial`: a new file, or over `base` (the object
/// the file at `partial` already holds), only where that differs.
async fn write_object(
    store: &BlockStore,
    cache: Option<&BlockCache>,
    manifest_id: &ManifestId,
    manifest: &Manifest,
    partial: &Path,
    base: Option<&Manifest>,
) -> Result<(u64, u64, u64), CasError> {
    let file = match base {
        None => std::fs::File::create(partial),
        Some(_) => std::fs::OpenOptions::new().write(true).open(partial),
    }
    .map_err(|e| CasError::io("create", partial, e))?;
    file.set_len(manifest.size)
        .map_err(|e| CasError::io("size", partial, e))?;
    let file = Arc::new(file);
    let held = base.map(Layout::of);

    // Where each distinct block goes (a block may repeat).
    let mut places: HashMap<BlockId, (u32, Vec<u64>)> = HashMap::new();
    let mut order = Vec::new();
    let mut offset = 0u64;
    let zeros = [0u8; 64 * 1024];
    for extent in &manifest.extents {
        if held.as_ref().is_some_and(|h| h.holds(offset, extent)) {
            offset += extent.len();
            continue;
        }
        if let (Extent::Zero { z }, Some(_)) = (*extent, &held) {
            // The seed has data here: a new file's zeros are its holes.
            let mut at = offset;
            while at < offset + z {
                let n = (offset + z - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)
                    .map_err(|e| CasError::io("write", partial, e))?;
                at += n as u64;
            }
        }
        if let Extent::Block { b, n } = *extent {
            let entry = places.entry(b).or_insert_with(|| {
                order.push(b);
                (n, Vec::new())
            });
            if entry.0 != n {
                return Err(CasError::BlockSize {
                    block: b,
                    expected: entry.0,
                    actual: n as usize,
                });
            }
            entry.1.push(offset);
        }
        offset += extent.len();
    }
    let places = Arc::new(places);

    let written = std::sync::atomic::AtomicU64::new(0);
    // Writes blocks where the manifest puts them, each stretch of blocks
    // that lie end to end in one system call (a pack's blocks mostly do).
    let write = |blocks: &[(BlockId, Bytes)]| -> Result<(), CasError> {
        let mut runs: Vec<(u64, Bytes)> = Vec::with_capacity(blocks.len());
        for (id, data) in blocks {
            let (n, offsets) = &places[id];
            if data.len() != *n as usize {
                return Err(CasError::BlockSize {
                    block: *id,
                    expected: *n,
                    actual: data.len(),
                });
            }
            runs.extend(offsets.iter().map(|&at| (at, data.clone())));
        }
        runs.sort_unstable_by_key(|(at, _)| *at);
        write_runs(&file, &runs).map_err(|e| CasError::io("write", partial, e))?;
        let len: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
        let before = written.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        if before / WRITEBACK_EVERY != (before + len) / WRITEBACK_EVERY {
            start_writeback(&file);
        }
        Ok(())
    };

    let mut cold = Vec::new();
    let mut cached = Vec::new();
    let mut cached_blocks = 0u64;
    for id in &order {
        match cache.and_then(|c| c.get(id)) {
            Some(data) => {
                cached.push((*id, data));
                cached_blocks += 1;
                if cached.len() == CACHED_PER_WRITE {
                    write(&cached)?;
                    cached.clear();
                }
            }
            None => cold.push(*id),
        }
    }
    write(&cached)?;
    let started = Instant::now();
    let hints = if cold.is_empty() {
        HashMap::new()
    } else {
        store.get_locations(manifest_id, manifest).await
    };
    tracing::debug!(elapsed = ?started.elapsed(), cold = cold.len(), "cache read, locations read");
    let fetched_bytes = store
        .get_blocks_located(&cold, &hints, |blocks| {
            write(&blocks)?;
            // Onto a seed, the file is the local copy kept; a cache file
            // per block would cost more than the pull.
            if let (Some(cache), None) = (cache, base) {
                for (id, data) in &blocks {
                    cache.put(id, data)?;
                }
            }
            Ok(())
        })
        .await?;
    let fetched_blocks = cold.len() as u64;
    tracing::debug!(elapsed = ?started.elapsed(), fetched_bytes, "blocks fetched, checked and written");
    let file = Arc::clone(&file);
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|e| CasError::nats("fsync task", e))?
        .map_err(|e| CasError::io("fsync", partial, e))?;
    tracing::debug!(elapsed = ?started.elapsed(), "fsynced");
    Ok((cached_blocks, fetched_blocks, fetched_bytes))
}
