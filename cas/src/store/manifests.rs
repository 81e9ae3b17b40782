//! Manifests in the store: each under its id in the `VMLOT_MANIFESTS`
//! stream, cut into parts written in one atomic batch (a lone part as a
//! plain publish), as one of the
//! records of [`crate::record`] (whole, compressed, or the edits from a
//! base). Reads follow a record's base through the in-memory manifests, a
//! block cache's copy or the store, and check what they rebuild against
//! the id.

use std::collections::HashMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::OutboundMessage};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use jetstream_extra::batch_fetch::BatchFetchExt;
use jetstream_extra::batch_publish::BatchPublishExt;
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::manifest::MAX_MANIFEST_BYTES;
use vmlot_schemas::subjects::{self, MANIFEST_STREAM};
use vmlot_schemas::{BlockId, Manifest, ManifestError, ManifestId, PackId};

use super::retry::{PartsRefused, Retry, transient, transient_publish};
use super::{BlockStore, MAX_BATCH, MISSING_PAUSE, MISSING_RETRIES, none_stored};
use crate::cache::BlockCache;
use crate::error::CasError;
use crate::locations;
use crate::record::{self, MAX_CHAIN, Record, WRITE_CHAIN};

/// Bytes per manifest message: well under any sensible `max_payload`.
const MANIFEST_PART_BYTES: usize = 256 * 1024;

/// Manifests kept in memory per store handle before the map starts over.
const MANIFEST_CACHE_ENTRIES: usize = 256;

/// A manifest this handle read or wrote, and how many deltas deep its
/// stored record is (`None`: not known, so never used as a delta's base).
#[derive(Clone)]
pub(super) struct Known {
    manifest: Manifest,
    chain: Option<u32>,
    /// The writer whose record it was rebuilt from, when read from the store.
    from: Option<Caller>,
}

/// The manifests a store handle knows, shared by its clones.
pub(super) type KnownManifests = std::sync::Arc<std::sync::Mutex<HashMap<ManifestId, Known>>>;

impl BlockStore {
    /// Stores a manifest (once: an existing one is left as it is), whole.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<ManifestId, CasError> {
        self.put_manifest_over(manifest, None).await
    }

    /// Stores a manifest (once: an existing one is left as it is), as the
    /// edits from `base` when that record is smaller than the whole one
    /// and the base's own chain of deltas is known and short.
    pub async fn put_manifest_over(
        &self,
        manifest: &Manifest,
        base: Option<&ManifestId>,
    ) -> Result<ManifestId, CasError> {
        self.check_name("the manifest", manifest.hash)?;
        let id = manifest.id();
        if self.trusted_head(&id).await?.is_some() {
            // Stored before, by this writer or the house: its depth is not
            // known here. (A stranger's record of the same id is not
            // believed: it may be garbage that no reader can rebuild.)
            self.remember(id, manifest.clone(), None);
            return Ok(id);
        }
        let base = base
            .filter(|b| **b != id)
            .and_then(|b| self.known(b).map(|k| (*b, k)))
            .filter(|(_, k)| k.chain.is_some_and(|c| c < WRITE_CHAIN));
        let owned = manifest.clone();
        let (record, chain) = tokio::task::spawn_blocking(move || {
            let base = base
                .as_ref()
                .map(|(b, k)| (*b, &k.manifest, k.chain.unwrap_or(0)));
            let record = record::encode_best(&owned, base.map(|(b, m, _)| (b, m)));
            let chain = if record.starts_with(record::DELTA_MAGIC) {
                base.map_or(0, |(_, _, c)| c + 1)
            } else {
                0
            };
            (record, chain)
        })
        .await
        .map_err(|e| CasError::nats("manifest encoding", e))?;
        self.put_manifest_bytes(&id, &record).await?;
        self.remember(id, manifest.clone(), Some(chain));
        Ok(id)
    }

    /// Writes raw bytes under a manifest id as this handle's writer, all
    /// parts in one atomic batch. Only tests planting bad manifests should
    /// call this directly.
    pub async fn put_manifest_bytes(&self, id: &ManifestId, bytes: &[u8]) -> Result<(), CasError> {
        let parts: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[][..]]
        } else {
            bytes.chunks(MANIFEST_PART_BYTES).collect()
        };
        let messages = || -> Vec<OutboundMessage> {
            parts
                .iter()
                .enumerate()
                .map(|(n, part)| {
                    let headers = (n == 0).then(|| {
                        let mut h = HeaderMap::new();
                        h.insert(subjects::MANIFEST_PARTS_HEADER, parts.len().to_string().as_str());
                        h.insert(subjects::MANIFEST_SIZE_HEADER, bytes.len().to_string().as_str());
                        h
                    });
                    OutboundMessage {
                        subject: subjects::manifest_part(id, &self.opts.writer, n as u32).into(),
                        payload: Bytes::copy_from_slice(part),
                        headers,
                    }
                })
                .collect()
        };
        let mut retry = Retry::new();
        loop {
            let err = match self.publish_parts(messages()).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            // This writer stored the same manifest before (the stream
            // keeps one message per part subject and refused this batch
            // whole), or the stream's leader is being elected.
            match self.trusted_head(id).await {
                Ok(Some(_)) => {
                    tracing::debug!(%id, %err, "manifest already stored");
                    return Ok(());
                }
                Ok(None) | Err(_) if retry.again(err.transient).await => {
                    tracing::debug!(%id, %err, "retrying manifest batch");
                }
                Ok(None) => return Err(CasError::nats("manifest batch publish", err)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes a manifest record's parts: several in one atomic batch, one
    /// alone as a plain acknowledged publish. A lone message is as atomic
    /// either way, and nats-server commits a single-replica file stream's
    /// atomic batch through a temporary store of its own, made, fsynced
    /// and removed (four more fsyncs than the message's own; the profile
    /// in BENCHMARKS.md, 2026-12-06), one batch after another.
    async fn publish_parts(&self, mut parts: Vec<OutboundMessage>) -> Result<(), PartsRefused> {
        if parts.len() > 1 {
            return self
                .js
                .batch_publish_all()
                .ack_first(false)
                .publish(futures::stream::iter(parts))
                .await
                .map(drop)
                .map_err(|e| PartsRefused {
                    transient: transient(&e),
                    reason: e.to_string(),
                });
        }
        let Some(part) = parts.pop() else {
            return Ok(());
        };
        let refused = |e: jetstream::context::PublishError| PartsRefused {
            transient: transient_publish(&e),
            reason: e.to_string(),
        };
        let ack = match part.headers {
            Some(headers) => {
                self.js
                    .publish_with_headers(part.subject, headers, part.payload)
                    .await
            }
            None => self.js.publish(part.subject, part.payload).await,
        }
        .map_err(refused)?;
        ack.await.map(drop).map_err(refused)
    }

    /// Leaves beside manifest `id` which pack holds each of its blocks
    /// (`at`), for readers to fetch whole packs, under this handle's
    /// writer. Once: a record this writer left before stays as it is. It is
    /// only a hint, so a record that cannot be written is let go.
    pub async fn put_locations(&self, id: &ManifestId, manifest: &Manifest, at: &HashMap<BlockId, PackId>) {
        let owned = (manifest.clone(), at.clone());
        let Ok(Some(bytes)) =
            tokio::task::spawn_blocking(move || locations::encode(&owned.0, &owned.1)).await
        else {
            return;
        };
        let written = async {
            self.js
                .publish(subjects::manifest_locations(id, &self.opts.writer), bytes)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        if let Err(e) = written.await {
            // Most often: already stored (one message per subject).
            tracing::debug!(manifest = %id, error = %e, "locations not written");
        }
    }

    /// Which pack holds each of `manifest`'s blocks, as a writer of
    /// manifest `id` left it: this handle's own record first, then that of
    /// the writer whose manifest record this handle rebuilt, the house's,
    /// and the others'; the first that fits the manifest is taken (readers
    /// check every block, so a lie costs a fetch, never a wrong byte).
    /// Empty when no record fits.
    pub async fn get_locations(&self, id: &ManifestId, manifest: &Manifest) -> HashMap<BlockId, PackId> {
        // First the record of the writer whose manifest record was rebuilt
        // (or the last one stored): one direct get. Every writer's only if
        // that one does not fit.
        let first = match self.known(id).and_then(|k| k.from) {
            Some(writer) => subjects::manifest_locations(id, &writer),
            None => subjects::manifest_locations_any(id),
        };
        if let Ok(Some(msg)) = self.latest(first).await
            && msg.payload.len() <= locations::MAX_LOCATIONS_BYTES
        {
            let manifest = manifest.clone();
            let decoded =
                tokio::task::spawn_blocking(move || locations::decode(&manifest, &msg.payload)).await;
            match decoded {
                Ok(Ok(at)) => return at,
                Ok(Err(reason)) => {
                    tracing::debug!(manifest = %id, %reason, "ignoring a manifest's locations")
                }
                Err(_) => {}
            }
        }
        let Ok(records) = self
            .last_matching(
                MANIFEST_STREAM,
                "locations get",
                vec![subjects::manifest_locations_any(id)],
            )
            .await
        else {
            return HashMap::new();
        };
        let rebuilt_from = self.known(id).and_then(|k| k.from);
        let mut records: Vec<(u8, String, Bytes)> = records
            .into_iter()
            .filter(|msg| msg.payload.len() <= locations::MAX_LOCATIONS_BYTES)
            .filter_map(|msg| {
                let writer = subjects::manifest_writer(&msg.subject)?;
                let trust = match self.trust(&writer) {
                    2 => 3,
                    _ if Some(&writer) == rebuilt_from.as_ref() => 2,
                    t => t,
                };
                Some((trust, msg.subject.to_string(), msg.payload))
            })
            .collect();
        records.sort_by(|a, b| (b.0, &a.1).cmp(&(a.0, &b.1)));
        let manifest = manifest.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            for (_, subject, payload) in records {
                match locations::decode(&manifest, &payload) {
                    Ok(at) => return at,
                    Err(reason) => tracing::debug!(%subject, %reason, "ignoring a manifest's locations"),
                }
            }
            HashMap::new()
        })
        .await;
        decoded.unwrap_or_default()
    }

    /// Reads and checks a manifest: size limit before reading, then the
    /// record rebuilt (its base read first) and checked against the id.
    pub async fn get_manifest(&self, id: &ManifestId) -> Result<Manifest, CasError> {
        self.get_manifest_via(id, None).await
    }

    /// As [`get_manifest`](Self::get_manifest), taking the manifest (or a
    /// delta's base) from `cache` when it holds it, and keeping there what
    /// was read.
    pub async fn get_manifest_via(
        &self,
        id: &ManifestId,
        cache: Option<&BlockCache>,
    ) -> Result<Manifest, CasError> {
        self.resolve(*id, cache, 0).await.map(|k| k.manifest)
    }

    fn resolve<'a>(
        &'a self,
        id: ManifestId,
        cache: Option<&'a BlockCache>,
        depth: u32,
    ) -> BoxFuture<'a, Result<Known, CasError>> {
        Box::pin(async move {
            if let Some(known) = self.known(&id) {
                return Ok(known);
            }
            self.check_name(format_args!("manifest {id}"), id.algorithm())?;
            let refuse = |source| CasError::Manifest { id, source };
            if let Some(bytes) = cache.and_then(|c| c.manifest_bytes(&id)) {
                match Manifest::decode(&bytes, &id) {
                    Ok(manifest) => {
                        self.remember(id, manifest.clone(), None);
                        return Ok(Known {
                            manifest,
                            chain: None,
                            from: None,
                        });
                    }
                    Err(e) => tracing::warn!(manifest = %id, error = %e, "ignoring a bad cached manifest"),
                }
            }
            if depth >= MAX_CHAIN {
                return Err(refuse(ManifestError::Garbled(format!(
                    "a chain of more than {MAX_CHAIN} manifest deltas"
                ))));
            }
            // The record stored last under this id first (one direct get,
            // one block read by the server); then, if it does not rebuild
            // to the id, every writer's, the most trusted first (a stranger
            // may have stored garbage under the name, before or after its
            // honest writer). Asking for every writer's at once makes the
            // server walk its blocks from the newest copy to the oldest.
            let mut first_refusal = None;
            let mut rebuilt = None;
            let latest = self.latest(subjects::manifest_part_any(&id, 0)).await?;
            let tried = latest.as_ref().map(|m| m.subject.to_string());
            if let Some((writer, head)) =
                latest.and_then(|m| Some((subjects::manifest_writer(&m.subject)?, m)))
            {
                match self.rebuild(id, &writer, head, cache, depth).await {
                    Ok(found) => rebuilt = Some((writer, found)),
                    Err(e) => {
                        tracing::debug!(manifest = %id, %writer, error = %e, "passing over a manifest record");
                        first_refusal = Some(e);
                    }
                }
            }
            if rebuilt.is_none() {
                for (writer, head) in self.heads(&id).await? {
                    if Some(head.subject.as_str()) == tried.as_deref() {
                        continue;
                    }
                    match self.rebuild(id, &writer, head, cache, depth).await {
                        Ok(found) => {
                            rebuilt = Some((writer, found));
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(manifest = %id, %writer, error = %e, "passing over a manifest record");
                            first_refusal.get_or_insert(e);
                        }
                    }
                }
            }
            let Some((writer, (manifest, chain))) = rebuilt else {
                return Err(first_refusal.unwrap_or(CasError::MissingManifest(id)));
            };
            if let Some(cache) = cache {
                cache.put_manifest(&id, &manifest)?;
            }
            self.remember_from(id, manifest.clone(), chain, Some(writer.clone()));
            Ok(Known {
                manifest,
                chain,
                from: Some(writer),
            })
        })
    }

    /// Rebuilds manifest `id` from `writer`'s record (part 0 is `head`):
    /// its base first when it is a delta, then checked against the id.
    async fn rebuild(
        &self,
        id: ManifestId,
        writer: &Caller,
        head: jetstream::message::StreamMessage,
        cache: Option<&BlockCache>,
        depth: u32,
    ) -> Result<(Manifest, Option<u32>), CasError> {
        let refuse = |source| CasError::Manifest { id, source };
        let stored = self.read_parts(&id, writer, head).await?;
        let max = self.opts.max_manifest_bytes.min(MAX_MANIFEST_BYTES);
        Ok(match record::decode(&stored, max).map_err(refuse)? {
            Record::Whole(bytes) => (Manifest::decode(&bytes, &id).map_err(refuse)?, Some(0)),
            Record::Delta(delta) => {
                if delta.base == id {
                    return Err(refuse(ManifestError::Garbled("a delta on itself".into())));
                }
                let base = self.resolve(delta.base, cache, depth + 1).await?;
                let rebuilt = delta.apply(&base.manifest).map_err(refuse)?;
                let bytes = rebuilt.canonical_bytes();
                if bytes.len() as u64 > max {
                    return Err(refuse(ManifestError::TooLarge {
                        size: bytes.len() as u64,
                        max,
                    }));
                }
                let manifest = Manifest::decode(&bytes, &id).map_err(refuse)?;
                (manifest, base.chain.map(|c| c + 1))
            }
        })
    }

    fn known(&self, id: &ManifestId) -> Option<Known> {
        self.known_manifests
            .lock()
            .expect("manifest cache lock")
            .get(id)
            .cloned()
    }

    fn remember(&self, id: ManifestId, manifest: Manifest, chain: Option<u32>) {
        self.remember_from(id, manifest, chain, None);
    }

    fn remember_from(&self, id: ManifestId, manifest: Manifest, chain: Option<u32>, from: Option<Caller>) {
        let mut known = self.known_manifests.lock().expect("manifest cache lock");
        if known.len() >= MANIFEST_CACHE_ENTRIES {
            known.clear();
        }
        let (chain, from) = match known.get(&id) {
            Some(k) => (
                if k.chain.is_some() && chain.is_none() {
                    k.chain
                } else {
                    chain
                },
                from.or_else(|| k.from.clone()),
            ),
            None => (chain, from),
        };
        known.insert(
            id,
            Known {
                manifest,
                chain,
                from,
            },
        );
    }

    /// The last message stored on a subject of the manifests' stream that
    /// `filter` matches (one direct get, wildcards allowed), if any.
    async fn latest(&self, filter: String) -> Result<Option<jetstream::message::StreamMessage>, CasError> {
        let stream = self
            .js
            .get_stream_no_info(MANIFEST_STREAM)
            .await
            .map_err(|e| CasError::nats("manifest stream", e))?;
        match stream.direct_get_last_for_subject(filter).await {
            Ok(msg) => Ok(Some(msg)),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(CasError::nats("manifest get", e)),
        }
    }

    /// Part 0 of this writer's or the house's record of manifest `id`, if
    /// either is stored.
    async fn trusted_head(
        &self,
        id: &ManifestId,
    ) -> Result<Option<jetstream::message::StreamMessage>, CasError> {
        let mut filters = vec![subjects::manifest_part_house(id, 0)];
        if self.opts.writer.role != Role::Broker {
            filters.push(subjects::manifest_part(id, &self.opts.writer, 0));
        }
        let heads = self
            .last_matching(MANIFEST_STREAM, "manifest get", filters)
            .await?;
        Ok(heads.into_iter().next())
    }

    /// Part 0 of every writer's record of manifest `id`, this handle's own
    /// first, then the house's, then the others' in subject order; asked
    /// again before the manifest is called missing, as a block is.
    async fn heads(
        &self,
        id: &ManifestId,
    ) -> Result<Vec<(Caller, jetstream::message::StreamMessage)>, CasError> {
        let mut tries = 0;
        loop {
            let found = self
                .last_matching(
                    MANIFEST_STREAM,
                    "manifest get",
                    vec![subjects::manifest_part_any(id, 0)],
                )
                .await?;
            let mut heads: Vec<(u8, Caller, jetstream::message::StreamMessage)> = found
                .into_iter()
                .filter_map(|msg| {
                    let writer = subjects::manifest_writer(&msg.subject)?;
                    Some((self.trust(&writer), writer, msg))
                })
                .collect();
            if heads.is_empty() && tries < MISSING_RETRIES {
                tries += 1;
                tokio::time::sleep(MISSING_PAUSE).await;
                continue;
            }
            heads.sort_by(|a, b| (b.0, a.2.subject.as_str()).cmp(&(a.0, b.2.subject.as_str())));
            return Ok(heads.into_iter().map(|(_, w, m)| (w, m)).collect());
        }
    }

    /// `writer`'s record of manifest `id`, its parts joined: size limit
    /// before reading, then the parts.
    async fn read_parts(
        &self,
        id: &ManifestId,
        writer: &Caller,
        head: jetstream::message::StreamMessage,
    ) -> Result<Vec<u8>, CasError> {
        let refuse = |source| CasError::Manifest { id: *id, source };
        let header = |name: &str| -> Result<u64, CasError> {
            head.headers
                .get(name)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .ok_or_else(|| {
                    refuse(ManifestError::Garbled(format!(
                        "part 0 lacks a valid {name} header"
                    )))
                })
        };
        let (size, parts) = (
            header(subjects::MANIFEST_SIZE_HEADER)?,
            header(subjects::MANIFEST_PARTS_HEADER)?,
        );
        let max = self.opts.max_manifest_bytes.min(MAX_MANIFEST_BYTES);
        if size > max {
            return Err(refuse(ManifestError::TooLarge { size, max }));
        }
        if parts == 0 || parts != size.div_ceil(MANIFEST_PART_BYTES as u64).max(1) {
            return Err(refuse(ManifestError::Garbled(format!(
                "{parts} parts for {size} bytes"
            ))));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        bytes.extend_from_slice(&head.payload);
        let rest: Vec<String> = (1..parts as u32)
            .map(|n| subjects::manifest_part(id, writer, n))
            .collect();
        for group in rest.chunks(MAX_BATCH) {
            let mut got: HashMap<String, Bytes> = HashMap::with_capacity(group.len());
            let mut messages = self
                .js
                .get_last_messages_for(subjects::MANIFEST_STREAM)
                .subjects(group.to_vec())
                .send()
                .await
                .map_err(|e| CasError::nats("manifest parts get", e))?;
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(msg) => {
                        got.insert(msg.subject.to_string(), msg.payload);
                    }
                    Err(e) if none_stored(&e) => break,
                    Err(e) => return Err(CasError::nats("manifest parts get", e)),
                }
            }
            for subject in group {
                let part = got
                    .remove(subject)
                    .ok_or_else(|| refuse(ManifestError::Garbled(format!("{subject} is missing"))))?;
                bytes.extend_from_slice(&part);
                if bytes.len() as u64 > size {
                    return Err(refuse(ManifestError::Garbled(
                        "parts exceed the stated size".into(),
                    )));
                }
            }
        }
        Ok(bytes)
    }
}
