//! The JetStream block store: one message per block on its own subject
//! (`vmlot.cas.block.<hash>`) in the `VMLOT_BLOCKS` stream, and manifests in
//! the `VMLOT_MANIFESTS` stream, cut into parts (`vmlot.cas.manifest.<id>.<n>`)
//! written in one atomic batch and read with direct gets. (An object store
//! would do, but every read of one creates a consumer on the server: in a
//! busy market that was a quarter of the server's CPU.)
//!
//! 4 KiB blocks are small NATS messages, so nothing here moves one block per
//! request: writes go out as atomic batches of up to 1000 messages (one
//! fsync for the lot under `sync_interval: always`), reads as batched direct
//! gets of up to 1000 subjects. The stream refuses a second message on a
//! block's subject (`discard_new_per_subject`), so a stored block is never
//! overwritten, whoever writes.
//!
//! A store names everything by one hash algorithm, chosen when it is
//! created and kept in the block stream's metadata (`vmlot.block-hash`),
//! so every participant that joins learns it from the store itself.
//! SHA-256 for pools open to strangers (a SHA-1 collision lets whoever
//! stores first decide what a name means for everyone after); SHA-1, the
//! seed's choice, for closed pools. Names, manifests and block writes of
//! the other algorithm are refused. A stream without the key predates the
//! choice and is SHA-1.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{self, message::OutboundMessage, stream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jetstream_extra::batch_fetch::{BatchFetchError, BatchFetchErrorKind, BatchFetchExt};
use jetstream_extra::batch_publish::{BatchPublishError, BatchPublishExt};
use vmlot_schemas::manifest::MAX_MANIFEST_BYTES;
use vmlot_schemas::{BlockId, HashAlgorithm, subjects};

use crate::error::CasError;

/// Server limit on messages in one atomic batch and subjects in one batched get.
pub const MAX_BATCH: usize = 1000;

/// Tuning of a [`BlockStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Batches in flight at once, each way. The server allows 50 open atomic
    /// batches per stream; a handful saturate a link.
    pub concurrency: usize,
    /// Blocks per batch (at most [`MAX_BATCH`]).
    pub batch: usize,
    /// zstd level for blocks written, or none. Names stay the SHA-1 of the
    /// uncompressed content.
    pub compression: Option<i32>,
    /// Replicas of the stream and bucket when this store creates them.
    pub replicas: usize,
    /// Largest manifest accepted, checked before it is read.
    pub max_manifest_bytes: u64,
    /// The algorithm a keeper creates the store with ([`BlockStore::open`]).
    /// A participant joining takes the store's own ([`BlockStore::join`]).
    pub hash: HashAlgorithm,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            batch: MAX_BATCH,
            compression: None,
            replicas: 1,
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            hash: HashAlgorithm::Sha256,
        }
    }
}

/// Handle on the blocks and manifests kept in JetStream.
#[derive(Clone)]
pub struct BlockStore {
    js: jetstream::Context,
    /// Its `hash` is what every name in this store is made with (the
    /// stream's metadata, once opened).
    opts: StoreOptions,
    /// Manifests already read and verified. They are immutable (named by
    /// their hash), so a cached one is always right.
    known_manifests: manifests::KnownManifests,
}

/// The block stream's metadata key naming the store's hash algorithm.
pub const HASH_METADATA: &str = "vmlot.block-hash";

/// The algorithm a block stream's configuration records (SHA-1 when it
/// records none: such a store predates the choice).
fn recorded_hash(config: &stream::Config) -> Result<HashAlgorithm, CasError> {
    match config.metadata.get(HASH_METADATA) {
        None => Ok(HashAlgorithm::Sha1),
        Some(value) => value.parse().map_err(|_| CasError::UnknownHash {
            stream: config.name.clone(),
            value: value.chars().take(40).collect(),
        }),
    }
}

mod encoding;
mod manifests;
mod retry;

use encoding::{EncodedBlock, decode_block, encode_group};
use retry::{Retry, transient};

/// How often, and after what pause, a block or manifest not found is asked
/// for again before it is called missing (a follower a write behind).
const MISSING_RETRIES: u32 = 3;
const MISSING_PAUSE: Duration = Duration::from_millis(300);

impl BlockStore {
    /// Opens the store as a participant: its streams must exist (the
    /// broker creates them; participants may not). Waits for them up to
    /// `patience` (`None`: for ever, as a provider waiting for its broker).
    pub async fn join(
        client: async_nats::Client,
        opts: StoreOptions,
        patience: Option<Duration>,
    ) -> Result<Self, CasError> {
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(30));
        let started = std::time::Instant::now();
        let mut hash = None;
        for name in [subjects::BLOCK_STREAM, subjects::MANIFEST_STREAM] {
            loop {
                match js.get_stream(name).await {
                    Ok(stream) => {
                        if name == subjects::BLOCK_STREAM {
                            hash = Some(recorded_hash(&stream.cached_info().config)?);
                        }
                        break;
                    }
                    Err(e) if patience.is_some_and(|p| started.elapsed() >= p) => {
                        return Err(CasError::nats(
                            "open store stream",
                            format!("{name}: {e} (the broker creates it: is one running?)"),
                        ));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        let hash = hash.expect("the block stream was opened");
        Ok(Self::over(js, StoreOptions { hash, ..opts }))
    }

    /// Opens the store as its keeper (the broker, the house's tools),
    /// creating its streams if they are missing.
    pub async fn open(client: async_nats::Client, opts: StoreOptions) -> Result<Self, CasError> {
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(30));
        let mut made = opts.hash;
        for (name, subjects) in [
            (subjects::BLOCK_STREAM, subjects::BLOCK_SUBJECTS),
            (subjects::MANIFEST_STREAM, subjects::MANIFEST_SUBJECTS),
        ] {
            let metadata = if name == subjects::BLOCK_STREAM {
                HashMap::from([(HASH_METADATA.to_string(), opts.hash.name().to_string())])
            } else {
                HashMap::new()
            };
            // One message per subject, and a second is refused: whatever is
            // stored under a content name is never overwritten.
            let created = js
                .get_or_create_stream(stream::Config {
                    name: name.to_string(),
                    subjects: vec![subjects.to_string()],
                    storage: stream::StorageType::File,
                    num_replicas: opts.replicas,
                    max_messages_per_subject: 1,
                    discard: stream::DiscardPolicy::New,
                    discard_new_per_subject: true,
                    allow_direct: true,
                    allow_atomic_publish: true,
                    metadata,
                    ..Default::default()
                })
                .await
                .map_err(|e| CasError::nats("create store stream", format!("{name}: {e}")))?;
            if name == subjects::BLOCK_STREAM {
                made = recorded_hash(&created.cached_info().config)?;
            }
        }
        if made != opts.hash {
            return Err(CasError::HashChanged {
                made,
                asked: opts.hash,
            });
        }
        Ok(Self::over(js, opts))
    }

    /// A handle over streams that exist.
    fn over(js: jetstream::Context, opts: StoreOptions) -> Self {
        let opts = StoreOptions {
            batch: opts.batch.clamp(1, MAX_BATCH),
            ..opts
        };
        Self {
            js,
            opts,
            known_manifests: Default::default(),
        }
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// The algorithm every block and manifest in this store is named by.
    pub fn hash(&self) -> HashAlgorithm {
        self.opts.hash
    }

    /// Refuses a name made by another algorithm than the store's.
    fn check_name(&self, what: impl std::fmt::Display, found: HashAlgorithm) -> Result<(), CasError> {
        if found == self.opts.hash {
            Ok(())
        } else {
            Err(CasError::WrongHash {
                what: what.to_string(),
                found,
                store: self.opts.hash,
            })
        }
    }

    /// The JetStream context this store uses (for tests that plant bad data).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Which of `ids` the store lacks.
    pub async fn missing(&self, ids: &[BlockId]) -> Result<HashSet<BlockId>, CasError> {
        // Groups are owned, not borrowed slices: a closure over `&[BlockId]`
        // is higher-ranked, and rustc then cannot prove callers' futures Send.
        let groups: Vec<Vec<BlockId>> = ids.chunks(self.opts.batch).map(<[BlockId]>::to_vec).collect();
        let present: Vec<HashSet<BlockId>> = futures::stream::iter(groups)
            .map(|group| async move {
                let mut present = HashSet::new();
                self.fetch_group(&group, |id, _| {
                    present.insert(id);
                    Ok(())
                })
                .await?;
                Ok::<_, CasError>(present)
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        let present: HashSet<BlockId> = present.into_iter().flatten().collect();
        Ok(ids.iter().filter(|id| !present.contains(id)).copied().collect())
    }

    /// Writes `blocks` (which the caller found missing) in atomic batches.
    /// Returns the bytes that crossed the wire. A block another writer stored
    /// in the meantime makes its batch fail as a whole; that batch is checked
    /// again and only what is still missing is written.
    pub async fn put_blocks(&self, blocks: &[(BlockId, Bytes)]) -> Result<u64, CasError> {
        for (id, _) in blocks {
            self.check_name(format_args!("block {id}"), id.algorithm())?;
        }
        let groups: Vec<Vec<(BlockId, Bytes)>> = blocks.chunks(self.opts.batch).map(<[_]>::to_vec).collect();
        let sizes: Vec<u64> = futures::stream::iter(groups)
            .map(|group| async move { self.put_group(&group).await })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        Ok(sizes.into_iter().sum())
    }

    async fn put_group(&self, group: &[(BlockId, Bytes)]) -> Result<u64, CasError> {
        let mut pending = encode_group(group.to_vec(), self.opts.compression).await?;
        let mut retry = Retry::new();
        loop {
            let err = match self.publish_batch(&pending).await {
                Ok(bytes) => return Ok(bytes),
                Err(err) => err,
            };
            // A concurrent writer may have stored some of these blocks (the
            // stream keeps one message per block subject and refuses the
            // batch whole), or the stream's leader is being elected.
            if !retry.again(transient(&err)).await {
                return Err(CasError::nats("block batch publish", err));
            }
            let ids: Vec<BlockId> = pending.iter().map(|(id, _)| *id).collect();
            let still_missing = match self.missing(&ids).await {
                Ok(missing) => missing,
                Err(e) if retry.again(true).await => {
                    tracing::debug!(%e, "could not tell which blocks are stored; trying again");
                    continue;
                }
                Err(e) => return Err(e),
            };
            pending.retain(|(id, _)| still_missing.contains(id));
            if pending.is_empty() {
                return Ok(0);
            }
            tracing::debug!(%err, blocks = pending.len(), "retrying block batch");
        }
    }

    async fn publish_batch(&self, encoded: &[(BlockId, EncodedBlock)]) -> Result<u64, BatchPublishError> {
        let mut wire = 0u64;
        let messages: Vec<OutboundMessage> = encoded
            .iter()
            .map(|(id, block)| {
                wire += block.payload.len() as u64;
                OutboundMessage {
                    subject: subjects::block(id).into(),
                    payload: block.payload.clone(),
                    headers: block.headers.clone(),
                }
            })
            .collect();
        self.js
            .batch_publish_all()
            .ack_first(false)
            .publish(futures::stream::iter(messages))
            .await?;
        Ok(wire)
    }

    /// Reads `ids`, verifying every block's hash; any block the store lacks
    /// is an error naming it. Calls `sink` once per block, in no set order.
    /// Returns the bytes that crossed the wire.
    pub async fn get_blocks(
        &self,
        ids: &[BlockId],
        sink: impl Fn(BlockId, Bytes) -> Result<(), CasError> + Sync,
    ) -> Result<u64, CasError> {
        let sink = &sink;
        let groups: Vec<Vec<BlockId>> = ids.chunks(self.opts.batch).map(<[BlockId]>::to_vec).collect();
        let sizes: Vec<u64> = futures::stream::iter(groups)
            .map(|group| async move {
                let mut seen = HashSet::with_capacity(group.len());
                let mut wire = 0u64;
                let mut wanted = group;
                let mut tries = 0;
                loop {
                    self.fetch_group(&wanted, |id, msg| {
                        wire += msg.payload.len() as u64;
                        let data = decode_block(&id, msg)?;
                        let actual = BlockId::of(id.algorithm(), &data);
                        if actual != id {
                            return Err(CasError::CorruptBlock { block: id, actual });
                        }
                        seen.insert(id);
                        sink(id, data)
                    })
                    .await?;
                    wanted.retain(|id| !seen.contains(id));
                    let Some(lost) = wanted.first() else { break };
                    // On a cluster a follower answers direct gets from
                    // what it has applied: a block stored a moment ago
                    // may not be there yet. Ask again before calling it lost.
                    tries += 1;
                    if tries > MISSING_RETRIES {
                        return Err(CasError::MissingBlock(*lost));
                    }
                    tokio::time::sleep(MISSING_PAUSE).await;
                }
                Ok::<_, CasError>(wire)
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        Ok(sizes.into_iter().sum())
    }

    /// One batched direct get of the last message on each block subject.
    async fn fetch_group(
        &self,
        group: &[BlockId],
        mut each: impl FnMut(BlockId, &jetstream::message::StreamMessage) -> Result<(), CasError>,
    ) -> Result<(), CasError> {
        if group.is_empty() {
            return Ok(());
        }
        let wanted: HashMap<String, BlockId> = group.iter().map(|id| (subjects::block(id), *id)).collect();
        let mut messages = self
            .js
            .get_last_messages_for(subjects::BLOCK_STREAM)
            .subjects(wanted.keys().cloned().collect())
            .send()
            .await
            .map_err(|e| CasError::nats("batched direct get", e))?;
        while let Some(msg) = messages.next().await {
            let msg = match msg {
                Ok(msg) => msg,
                // No block of the group is stored.
                Err(e) if none_stored(&e) => break,
                Err(e) => return Err(CasError::nats("batched direct get", e)),
            };
            let Some(id) = wanted.get(msg.subject.as_str()) else {
                return Err(CasError::nats(
                    "batched direct get",
                    format!("unasked subject {}", msg.subject),
                ));
            };
            each(*id, &msg)?;
        }
        Ok(())
    }
}

/// True when a batched direct get failed because none of its subjects
/// holds a message: the server answers status 404, which jetstream-extra
/// reports as [`BatchFetchErrorKind::NoMessages`]. (With async-nats 0.48 the
/// status arrives on the message rather than as a header, and
/// jetstream-extra then ends the stream without an error: the same answer,
/// nothing stored.)
fn none_stored(err: &BatchFetchError) -> bool {
    err.kind() == BatchFetchErrorKind::NoMessages
}
