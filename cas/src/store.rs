//! The JetStream block store: blocks in packs (`vmlot.cas.pack.<id>`, many
//! blocks to a message, `store/packs.rs`) with a pointer per block and
//! writer (`vmlot.cas.block.<hash>.<role>.<name>`), both in the
//! `VMLOT_BLOCKS` stream, and manifests in the `VMLOT_MANIFESTS` stream,
//! each writer's record cut into parts
//! (`vmlot.cas.manifest.<id>.<role>.<name>.<n>`) written in one atomic batch
//! and read with direct gets, beside the packs that hold their blocks
//! (`vmlot.cas.manifest.<id>.<role>.<name>.where`). (An object store would
//! do, but every read of one creates a consumer on the server: in a busy
//! market that was a quarter of the server's CPU.)
//!
//! Nothing here moves one block per request: writes go out as atomic
//! batches of up to 1000 messages (one fsync for the lot under
//! `sync_interval: always`), reads as batched direct gets. The stream
//! refuses a second message on a subject (`discard_new_per_subject`), so a
//! stored block, pointer or pack is never overwritten, whoever writes.
//!
//! A name is a hash, so anyone can compute it before its honest writer
//! stores it (a replica running the same deterministic segment does). The
//! writer's role and name in each pointer and manifest subject, which the
//! server fences to the user's own, keep a stranger from taking a name
//! for everyone: a writer learns what is stored only from its own and the
//! house's (the broker role's) pointers and records, and a reader tries
//! every writer's and keeps only what hashes to the name.
//!
//! A store names everything by one hash algorithm, chosen when it is
//! created and kept in the block stream's metadata (`vmlot.block-hash`),
//! so every participant that joins learns it from the store itself.
//! SHA-256 for pools open to strangers (a SHA-1 collision lets whoever
//! stores first decide what a name means for everyone after); SHA-1, the
//! seed's choice, for closed pools. Names, manifests and block writes of
//! the other algorithm are refused. A stream without the key predates the
//! choice and is SHA-1.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use jetstream_extra::batch_fetch::{BatchFetchError, BatchFetchErrorKind, BatchFetchExt};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::manifest::MAX_MANIFEST_BYTES;
use vmlot_schemas::{HashAlgorithm, subjects};

use crate::error::CasError;

/// Server limit on messages in one atomic batch and subjects in one batched get.
pub const MAX_BATCH: usize = 1000;

/// Tuning of a [`BlockStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Batches in flight at once, each way. The server allows 50 open atomic
    /// batches per stream; a handful saturate a link.
    pub concurrency: usize,
    /// Messages per batch, each way (2 to [`MAX_BATCH`]): blocks asked for, or packs and their pointers written.
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
    /// Who this handle writes as: the role and name its credentials give
    /// (the server refuses a write under any other). Pointers and manifest
    /// records carry it; what it trusts to be stored is its own and the
    /// house's.
    pub writer: Caller,
}

/// The house's writer in a deployment: the broker's user (the farm and
/// the house's tools use its credentials too).
pub fn house() -> Caller {
    Caller::new(Role::Broker, "broker")
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
            writer: house(),
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
mod packs;
mod retry;

pub use packs::{Located, Written};

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
            (
                subjects::BLOCK_STREAM,
                vec![subjects::BLOCK_SUBJECTS, subjects::PACK_SUBJECTS],
            ),
            (subjects::MANIFEST_STREAM, vec![subjects::MANIFEST_SUBJECTS]),
        ] {
            let subjects: Vec<String> = subjects.into_iter().map(String::from).collect();
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
                    subjects: subjects.clone(),
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
            // A store made before packs lacks their subjects: add them.
            let mut config = created.cached_info().config.clone();
            if subjects.iter().any(|s| !config.subjects.contains(s)) {
                for s in &subjects {
                    if !config.subjects.contains(s) {
                        config.subjects.push(s.clone());
                    }
                }
                js.update_stream(config)
                    .await
                    .map_err(|e| CasError::nats("update store stream", format!("{name}: {e}")))?;
            }
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
            batch: opts.batch.clamp(2, MAX_BATCH),
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

    /// The last message on every subject of `stream` matching one of
    /// `filters` (wildcards allowed), in batched direct gets. The server
    /// answers at most 1 024 messages to one get and refuses more (413):
    /// then the filters are halved and asked again, so only a single
    /// filter matching more than that is an error.
    fn last_matching<'a>(
        &'a self,
        stream: &'static str,
        op: &'static str,
        filters: Vec<String>,
    ) -> futures::future::BoxFuture<'a, Result<Vec<jetstream::message::StreamMessage>, CasError>> {
        Box::pin(async move {
            if filters.is_empty() {
                return Ok(Vec::new());
            }
            let mut messages = self
                .js
                .get_last_messages_for(stream)
                .subjects(filters.clone())
                .send()
                .await
                .map_err(|e| CasError::nats(op, e))?;
            let mut out = Vec::new();
            while let Some(msg) = messages.next().await {
                match msg {
                    Ok(msg) => out.push(msg),
                    // None of the subjects holds a message.
                    Err(e) if none_stored(&e) => break,
                    Err(e) if e.kind() == BatchFetchErrorKind::TooManySubjects && filters.len() > 1 => {
                        drop(messages);
                        let mut first = filters;
                        let second = first.split_off(first.len() / 2);
                        let mut out = self.last_matching(stream, op, first).await?;
                        out.extend(self.last_matching(stream, op, second).await?);
                        return Ok(out);
                    }
                    Err(e) if e.kind() == BatchFetchErrorKind::TooManySubjects => {
                        return Err(CasError::nats(
                            op,
                            format!("more than the server answers at once stored under {}", filters[0]),
                        ));
                    }
                    Err(e) => return Err(CasError::nats(op, e)),
                }
            }
            Ok(out)
        })
    }

    /// One batched direct get of the last message on each subject of the
    /// block stream that `wanted` names, each handed to `each` with what
    /// it stands for; a subject with no message is left out.
    async fn last_messages<K>(
        &self,
        op: &'static str,
        wanted: &HashMap<String, K>,
        mut each: impl FnMut(&K, jetstream::message::StreamMessage) -> Result<(), CasError>,
    ) -> Result<(), CasError> {
        if wanted.is_empty() {
            return Ok(());
        }
        let mut messages = self
            .js
            .get_last_messages_for(subjects::BLOCK_STREAM)
            .subjects(wanted.keys().cloned().collect())
            .send()
            .await
            .map_err(|e| CasError::nats(op, e))?;
        while let Some(msg) = messages.next().await {
            let msg = match msg {
                Ok(msg) => msg,
                // None of the subjects holds a message.
                Err(e) if none_stored(&e) => break,
                Err(e) => return Err(CasError::nats(op, e)),
            };
            let Some(key) = wanted.get(msg.subject.as_str()) else {
                return Err(CasError::nats(op, format!("unasked subject {}", msg.subject)));
            };
            each(key, msg)?;
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
