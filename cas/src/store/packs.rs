//! Blocks in the store, written in packs ([`crate::pack`]): each pack is
//! one message on `vmlot.cas.pack.<random id>`, and each of its blocks
//! gets a pointer on a subject of its own and its writer's
//! (`vmlot.cas.block.<hash>.<role>.<name>`, the pack id's 16 bytes as its
//! payload: a batched direct get takes a message without payload for the
//! end of the batch), all in one atomic batch, so
//! a pointer never names a pack that is not there. The pointers are what a
//! writer asks to learn which blocks the store holds (without their bytes:
//! its own and the house's only, since anyone may point anywhere) and what
//! a reader with only names follows (every writer's, the writer's own and
//! the house's first, until one leads to bytes that hash to the name); a
//! reader given a manifest's locations ([`crate::locations`]) fetches the
//! packs straight away. A block stored whole (planted by a test) is read
//! as it is.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::message::OutboundMessage;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jetstream_extra::batch_publish::{BatchPublishError, BatchPublishExt};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::subjects::{self, BLOCK_STREAM};
use vmlot_schemas::{BlockId, PackId};

use super::encoding::{Stored, decode_block, pointer};
use super::retry::{Retry, transient};
use super::{BlockStore, MISSING_PAUSE, MISSING_RETRIES};
use crate::error::CasError;
use crate::pack::{self, Pack};

/// Rounds of packs a writer fetches to check another writer's blocks
/// before it stores its own copy of those still unchecked.
const CHECK_ROUNDS: usize = 3;

/// Packs asked for in one batched direct get (each up to
/// [`pack::PACK_TARGET_BYTES`] and a block).
const PACKS_PER_GET: usize = 8;

/// Where a present block is: stored whole on its subject, or in a pack.
pub type Located = HashMap<BlockId, Option<PackId>>;

/// What a write of blocks did.
#[derive(Debug, Default)]
pub struct Written {
    /// Bytes of packs that crossed the wire.
    pub wire: u64,
    /// The pack each block written went into.
    pub packs: HashMap<BlockId, PackId>,
}

/// One pack ready to go, with its blocks' names.
struct Unit {
    id: PackId,
    bytes: Bytes,
    blocks: Vec<BlockId>,
}

impl BlockStore {
    /// Which of `ids` the store holds, and where, by this handle's own
    /// pointers and the house's; the pointers are read, never the blocks'
    /// bytes. (A stranger's pointer may name anything: a writer that
    /// believed one would leave its block unwritten.)
    pub async fn locate(&self, ids: &[BlockId]) -> Result<Located, CasError> {
        let writer = self.opts.writer.clone();
        self.locate_by(ids, &[writer]).await
    }

    /// Which of `ids` the store holds by the pointers of `writers` or the
    /// house's: what the broker asks of a result's blocks, whose producer
    /// must have stored them (or found them stored by the house).
    pub async fn locate_by(&self, ids: &[BlockId], writers: &[Caller]) -> Result<Located, CasError> {
        let writers: Vec<&Caller> = writers.iter().filter(|w| w.role != Role::Broker).collect();
        let per_block = writers.len() + 1;
        let group = (self.opts.batch / per_block).max(1);
        let groups: Vec<Vec<String>> = ids
            .chunks(group)
            .map(|chunk| {
                chunk
                    .iter()
                    .flat_map(|id| {
                        writers
                            .iter()
                            .map(|w| subjects::block(id, w))
                            .chain(std::iter::once(subjects::block_house(id)))
                    })
                    .collect()
            })
            .collect();
        let found: Vec<Located> = futures::stream::iter(groups)
            .map(|filters| async move {
                let mut found = Located::new();
                for msg in self
                    .last_matching(BLOCK_STREAM, "batched direct get", filters)
                    .await?
                {
                    let Some((id, _)) = pointer_of(&msg.subject) else {
                        continue;
                    };
                    let place = match decode_block(&id, &msg)? {
                        Stored::Whole(_) => None,
                        Stored::InPack(pack) => Some(pack),
                    };
                    // The writer's own pointer first, then the house's.
                    found.entry(id).or_insert(place);
                }
                Ok::<_, CasError>(found)
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// As [`locate`](Self::locate), and also the blocks that another
    /// writer's pointers place in a pack: each such pack is fetched and the
    /// blocks in it checked here, so whatever this writer takes as stored
    /// it has either stored itself, or had from the house, or seen the bytes
    /// of. (Fetching a pack costs the server a read; storing the blocks
    /// again costs it a durable write of the pack and a pointer each. A
    /// lying pointer costs a fetch.)
    pub async fn locate_checked(&self, ids: &[BlockId]) -> Result<Located, CasError> {
        // Every writer's pointers in one question per block: this writer's
        // and the house's say where a block is; the others' are leads.
        let mut found = Located::new();
        let mut others: HashMap<BlockId, Vec<PackId>> = HashMap::new();
        for p in self.pointers(ids, (self.opts.batch / 2).max(1)).await? {
            if self.trust(&p.writer) > 0 {
                let place = match p.stored? {
                    Stored::Whole(_) => None,
                    Stored::InPack(pack) => Some(pack),
                };
                found.entry(p.id).or_insert(place);
            } else if let Ok(Stored::InPack(pack)) = p.stored {
                others.entry(p.id).or_default().push(pack);
            }
        }
        others.retain(|id, _| !found.contains_key(id));
        // One pack per block and round, so that many writers' copies cost
        // one fetch: the pack the most of the remaining blocks point into
        // (an honest copy holds them all), the first in id order among
        // equals; a block its pack fails goes to its next pack, for at most
        // CHECK_ROUNDS rounds (then it is stored again).
        for _ in 0..CHECK_ROUNDS {
            let mut named: HashMap<PackId, usize> = HashMap::new();
            for places in others.values() {
                for place in places {
                    *named.entry(*place).or_default() += 1;
                }
            }
            let mut by_pack: HashMap<PackId, HashSet<BlockId>> = HashMap::new();
            for (id, places) in others.iter_mut() {
                let best = places
                    .iter()
                    .enumerate()
                    .max_by(|(_, a), (_, b)| {
                        named[*a]
                            .cmp(&named[*b])
                            .then_with(|| b.to_string().cmp(&a.to_string()))
                    })
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    by_pack.entry(places.swap_remove(i)).or_default().insert(*id);
                }
            }
            if by_pack.is_empty() {
                break;
            }
            let chosen: HashMap<BlockId, PackId> = by_pack
                .iter()
                .flat_map(|(pack, blocks)| blocks.iter().map(|b| (*b, *pack)))
                .collect();
            let taken = self.take_from_packs(by_pack, &|_| Ok(())).await?;
            for id in taken.got {
                found.insert(id, chosen.get(&id).copied());
                others.remove(&id);
            }
            others.retain(|_, places| !places.is_empty());
        }
        Ok(found)
    }

    /// Which of `ids` no writer at all points at: what the broker asks of
    /// a result's new blocks (whether they are what their names say is for
    /// the restore of the next segment to find, and it blames the result's
    /// producer).
    pub async fn missing_anywhere(&self, ids: &[BlockId]) -> Result<HashSet<BlockId>, CasError> {
        let mut missing: HashSet<BlockId> = ids.iter().copied().collect();
        for p in self.pointers(ids, (self.opts.batch / 4).max(1)).await? {
            if p.stored.is_ok() {
                missing.remove(&p.id);
            }
        }
        Ok(missing)
    }

    /// Which of `ids` the store lacks, by this handle's own pointers and
    /// the house's.
    pub async fn missing(&self, ids: &[BlockId]) -> Result<HashSet<BlockId>, CasError> {
        let writer = self.opts.writer.clone();
        self.missing_by(ids, &[writer]).await
    }

    /// Which of `ids` neither `writers` nor the house has stored.
    pub async fn missing_by(
        &self,
        ids: &[BlockId],
        writers: &[Caller],
    ) -> Result<HashSet<BlockId>, CasError> {
        let present = self.locate_by(ids, writers).await?;
        Ok(ids
            .iter()
            .filter(|id| !present.contains_key(id))
            .copied()
            .collect())
    }

    /// Writes `blocks` (which the caller found missing) in packs, several
    /// packs and their pointers to an atomic batch. A block this writer
    /// stored in the meantime (another of its pushes, or a try whose answer
    /// was lost) makes its batch fail as a whole; that batch is checked
    /// again and only what is still missing is written.
    pub async fn put_blocks(&self, blocks: &[(BlockId, Bytes)]) -> Result<Written, CasError> {
        for (id, _) in blocks {
            self.check_name(format_args!("block {id}"), id.algorithm())?;
        }
        let groups = batches(blocks, self.opts.batch);
        let written: Vec<Written> = futures::stream::iter(groups)
            .map(|group| async move { self.put_group(group).await })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        let mut all = Written::default();
        for w in written {
            all.wire += w.wire;
            all.packs.extend(w.packs);
        }
        Ok(all)
    }

    async fn put_group(&self, mut pending: Vec<(BlockId, Bytes)>) -> Result<Written, CasError> {
        let mut retry = Retry::new();
        loop {
            let units = self.pack_units(pending.clone()).await?;
            let err = match self.publish_units(&units).await {
                Ok(wire) => {
                    let packs = units
                        .iter()
                        .flat_map(|u| u.blocks.iter().map(|b| (*b, u.id)))
                        .collect();
                    return Ok(Written { wire, packs });
                }
                Err(err) => err,
            };
            // This writer may have stored some of these blocks already (the
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
                return Ok(Written::default());
            }
            tracing::debug!(%err, blocks = pending.len(), "retrying block batch");
        }
    }

    /// Packs `blocks` (CPU work, off the async workers).
    async fn pack_units(&self, blocks: Vec<(BlockId, Bytes)>) -> Result<Vec<Unit>, CasError> {
        let (hash, level, batch) = (self.opts.hash, self.opts.compression, self.opts.batch);
        tokio::task::spawn_blocking(move || {
            pack::plan(&blocks, batch - 1)
                .into_iter()
                .map(|range| {
                    let part = &blocks[range];
                    Ok(Unit {
                        id: PackId::new(),
                        bytes: pack::encode(hash, part, level)?,
                        blocks: part.iter().map(|(id, _)| *id).collect(),
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| CasError::nats("pack blocks", e))?
    }

    async fn publish_units(&self, units: &[Unit]) -> Result<u64, BatchPublishError> {
        let mut wire = 0u64;
        let mut messages = Vec::new();
        for unit in units {
            wire += unit.bytes.len() as u64;
            messages.push(OutboundMessage {
                subject: subjects::pack(&unit.id).into(),
                payload: unit.bytes.clone(),
                headers: None,
            });
            let pointer = pointer(&unit.id);
            for block in &unit.blocks {
                messages.push(OutboundMessage {
                    subject: subjects::block(block, &self.opts.writer).into(),
                    payload: pointer.clone(),
                    headers: None,
                });
            }
        }
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
        let each =
            |blocks: Vec<(BlockId, Bytes)>| blocks.into_iter().try_for_each(|(id, data)| sink(id, data));
        self.get_blocks_located(ids, &HashMap::new(), each).await
    }

    /// As [`get_blocks`](Self::get_blocks), fetching first the packs that
    /// `hints` (a manifest's locations) name for its blocks; what a hint
    /// misplaces is then looked up by its name. Calls `sink` with the
    /// wanted blocks of each pack together (a writer can write a pack's
    /// neighbouring blocks at once), or with one block stored whole.
    pub async fn get_blocks_located(
        &self,
        ids: &[BlockId],
        hints: &HashMap<BlockId, PackId>,
        sink: impl Fn(Vec<(BlockId, Bytes)>) -> Result<(), CasError> + Sync,
    ) -> Result<u64, CasError> {
        let mut wanted: HashSet<BlockId> = ids.iter().copied().collect();
        let mut by_pack: HashMap<PackId, HashSet<BlockId>> = HashMap::new();
        for id in &wanted {
            if let Some(pack) = hints.get(id) {
                by_pack.entry(*pack).or_default().insert(*id);
            }
        }
        let mut wire = 0;
        if !by_pack.is_empty() {
            // A hint that misplaces a block leaves it for its name to find.
            let taken = self.take_from_packs(by_pack, &sink).await?;
            wire += taken.wire;
            wanted.retain(|id| !taken.got.contains(id));
        }
        let rest: Vec<BlockId> = ids.iter().filter(|id| wanted.contains(id)).copied().collect();
        let sink = &sink;
        let sizes: Vec<u64> = futures::stream::iter(rest.chunks(self.opts.batch).map(<[BlockId]>::to_vec))
            .map(|group| async move { self.get_named(group, sink).await })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        Ok(wire + sizes.into_iter().sum::<u64>())
    }

    /// Blocks read by their names: every writer's pointer to each (this
    /// handle's own first, then the house's, then the others' in subject
    /// order), whole blocks checked at once, the rest through the packs
    /// the pointers name; a pointer that leads to no good bytes is passed
    /// over for the block's next one. A block none of whose pointers leads
    /// to it is an error naming the last refusal; one with no pointer at
    /// all is asked for again, then called missing.
    async fn get_named(
        &self,
        mut wanted: Vec<BlockId>,
        sink: &(impl Fn(Vec<(BlockId, Bytes)>) -> Result<(), CasError> + Sync),
    ) -> Result<u64, CasError> {
        let mut wire = 0u64;
        let mut tries = 0;
        loop {
            let mut candidates: HashMap<BlockId, Vec<(u8, String, Stored)>> = HashMap::new();
            let mut refused: HashMap<BlockId, CasError> = HashMap::new();
            for p in self.pointers(&wanted, wanted.len().max(1)).await? {
                match p.stored {
                    Ok(stored) => {
                        let trust = self.trust(&p.writer);
                        candidates
                            .entry(p.id)
                            .or_default()
                            .push((trust, p.subject, stored));
                    }
                    Err(e) => {
                        refused.insert(p.id, e);
                    }
                }
            }
            for list in candidates.values_mut() {
                // Popped from the end: the most trusted last, and among
                // equals the first subject last.
                list.sort_by(|a, b| (a.0, &b.1).cmp(&(b.0, &a.1)));
            }
            let mut seen = HashSet::with_capacity(wanted.len());
            loop {
                let mut by_pack: HashMap<PackId, HashSet<BlockId>> = HashMap::new();
                for (id, list) in candidates.iter_mut() {
                    let Some((_, subject, stored)) = list.pop() else {
                        continue;
                    };
                    match stored {
                        Stored::Whole(data) => {
                            wire += data.len() as u64;
                            let actual = BlockId::of(id.algorithm(), &data);
                            if actual == *id {
                                seen.insert(*id);
                                sink(vec![(*id, data)])?;
                            } else {
                                tracing::debug!(%subject, "a block stored whole under another's name");
                                refused.insert(*id, CasError::CorruptBlock { block: *id, actual });
                            }
                        }
                        Stored::InPack(pack) => {
                            by_pack.entry(pack).or_default().insert(*id);
                        }
                    }
                }
                if !by_pack.is_empty() {
                    let taken = self.take_from_packs(by_pack, sink).await?;
                    wire += taken.wire;
                    seen.extend(taken.got);
                    refused.extend(taken.refused);
                }
                candidates.retain(|id, list| !seen.contains(id) && !list.is_empty());
                if candidates.is_empty() {
                    break;
                }
            }
            wanted.retain(|id| !seen.contains(id));
            if let Some(id) = wanted.iter().find(|id| refused.contains_key(id)) {
                return Err(refused.remove(id).expect("a refusal"));
            }
            let Some(lost) = wanted.first() else { break };
            // On a cluster a follower answers direct gets from what it has
            // applied: a block stored a moment ago may not be there yet.
            // Ask again before calling it lost.
            tries += 1;
            if tries > MISSING_RETRIES {
                return Err(CasError::MissingBlock(*lost));
            }
            tokio::time::sleep(MISSING_PAUSE).await;
        }
        Ok(wire)
    }

    /// Every writer's pointer to each of `ids`, `per_get` blocks' worth of
    /// filters to a batched direct get: the one read behind locating,
    /// checking and reading blocks by name.
    async fn pointers(&self, ids: &[BlockId], per_get: usize) -> Result<Vec<Pointer>, CasError> {
        let mut all = Vec::new();
        for group in ids.chunks(per_get) {
            let filters = group.iter().map(subjects::block_any).collect();
            for msg in self
                .last_matching(BLOCK_STREAM, "batched direct get", filters)
                .await?
            {
                let Some((id, writer)) = pointer_of(&msg.subject) else {
                    continue;
                };
                all.push(Pointer {
                    id,
                    writer,
                    stored: decode_block(&id, &msg),
                    subject: msg.subject.to_string(),
                });
            }
        }
        Ok(all)
    }

    /// How far this handle trusts what `writer` stored: its own most, then
    /// the house's, then anyone's.
    pub(super) fn trust(&self, writer: &Caller) -> u8 {
        if *writer == self.opts.writer {
            2
        } else if writer.role == Role::Broker {
            1
        } else {
            0
        }
    }

    /// Fetches the packs named and hands `sink` the wanted blocks in each,
    /// checked. A pack that is bad or lacks a block said to be in it is
    /// passed over, its refusal kept for each block it failed.
    async fn take_from_packs(
        &self,
        by_pack: HashMap<PackId, HashSet<BlockId>>,
        sink: &(impl Fn(Vec<(BlockId, Bytes)>) -> Result<(), CasError> + Sync),
    ) -> Result<Taken, CasError> {
        let packs: Vec<(PackId, HashSet<BlockId>)> = by_pack.into_iter().collect();
        let done: Vec<Taken> = futures::stream::iter(packs.chunks(PACKS_PER_GET).map(<[_]>::to_vec))
            .map(|group| async move {
                let wanted: HashMap<String, (PackId, HashSet<BlockId>)> = group
                    .into_iter()
                    .map(|(pack, blocks)| (subjects::pack(&pack), (pack, blocks)))
                    .collect();
                let mut taken = Taken::default();
                let mut answered = HashSet::new();
                self.last_messages("pack get", &wanted, |(pack_id, blocks), msg| {
                    answered.insert(*pack_id);
                    taken.wire += msg.payload.len() as u64;
                    let pack = match Pack::parse(*pack_id, self.opts.hash, msg.payload) {
                        Ok(pack) => pack,
                        Err(e) => {
                            tracing::debug!(error = %e, "passing over a bad pack");
                            let reason = match e {
                                CasError::BadPack { reason, .. } => reason,
                                other => other.to_string(),
                            };
                            for block in blocks {
                                let pack = *pack_id;
                                let reason = reason.clone();
                                taken.refused.insert(*block, CasError::BadPack { pack, reason });
                            }
                            return Ok(());
                        }
                    };
                    let mut good = Vec::with_capacity(blocks.len());
                    for block in blocks {
                        match pack.open(block) {
                            Some(Ok(data)) => {
                                good.push((*block, data));
                                taken.got.insert(*block);
                            }
                            Some(Err(e)) => {
                                taken.refused.insert(*block, e);
                            }
                            None => {
                                tracing::debug!(%block, pack = %pack_id, "a block not in the pack said to hold it");
                                taken.refused.insert(
                                    *block,
                                    CasError::NotInPack {
                                        block: *block,
                                        pack: *pack_id,
                                    },
                                );
                            }
                        }
                    }
                    if good.is_empty() {
                        return Ok(());
                    }
                    sink(good)
                })
                .await?;
                for (pack, blocks) in wanted.values() {
                    if !answered.contains(pack) {
                        for block in blocks {
                            taken.refused.insert(*block, CasError::MissingPack { block: *block, pack: *pack });
                        }
                    }
                }
                Ok::<_, CasError>(taken)
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        let mut all = Taken::default();
        for t in done {
            all.wire += t.wire;
            all.got.extend(t.got);
            all.refused.extend(t.refused);
        }
        Ok(all)
    }
}

/// What fetching packs gave: bytes on the wire, the blocks handed over,
/// and why each other block asked for was not.
#[derive(Default)]
struct Taken {
    wire: u64,
    got: HashSet<BlockId>,
    refused: HashMap<BlockId, CasError>,
}

/// One writer's pointer to a block, as read.
struct Pointer {
    id: BlockId,
    writer: Caller,
    subject: String,
    /// What its subject holds, or why that is no block and no pointer.
    stored: Result<Stored, CasError>,
}

/// The block and writer a pointer's subject names.
fn pointer_of(subject: &str) -> Option<(BlockId, Caller)> {
    let id = subject
        .strip_prefix("vmlot.cas.block.")?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    Some((id, subjects::block_writer(subject)?))
}

/// Cuts `blocks` into packs and the packs into batches of at most `limit`
/// messages (each pack and one pointer per block). The packs are cut again
/// the same way when each batch is written ([`BlockStore::pack_units`]).
fn batches(blocks: &[(BlockId, Bytes)], limit: usize) -> Vec<Vec<(BlockId, Bytes)>> {
    let mut out: Vec<Vec<(BlockId, Bytes)>> = Vec::new();
    let mut messages = 0;
    for range in pack::plan(blocks, limit - 1) {
        let cost = range.len() + 1;
        if out.is_empty() || messages + cost > limit {
            out.push(Vec::new());
            messages = 0;
        }
        messages += cost;
        out.last_mut().expect("a batch").extend_from_slice(&blocks[range]);
    }
    out
}
