//! Blocks in the store, written in packs ([`crate::pack`]): each pack is
//! one message on `vmlot.cas.pack.<random id>`, and each of its blocks
//! gets a pointer on its own subject (`vmlot.cas.block.<hash>`, header
//! `Vmlot-Encoding: pack`, the pack's id as its payload: a batched direct
//! get takes a message without payload for the end of the batch), all in one
//! atomic batch, so a pointer never names a pack that is not there. The
//! pointers are what a writer asks to learn which blocks the store holds
//! (without their bytes) and what a reader with only names follows; a
//! reader given a manifest's locations ([`crate::locations`]) fetches the
//! packs straight away. A block stored whole (written before packs, or
//! planted by a test) is read as it is.

use std::collections::{HashMap, HashSet};

use async_nats::HeaderMap;
use async_nats::jetstream::message::OutboundMessage;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use jetstream_extra::batch_publish::{BatchPublishError, BatchPublishExt};
use vmlot_schemas::{BlockId, PackId, subjects};

use super::encoding::{Stored, decode_block};
use super::retry::{Retry, transient};
use super::{BlockStore, MISSING_PAUSE, MISSING_RETRIES};
use crate::error::CasError;
use crate::pack::{self, Pack};

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
    /// Which of `ids` the store holds, and where; the pointers are read,
    /// never the blocks' bytes.
    pub async fn locate(&self, ids: &[BlockId]) -> Result<Located, CasError> {
        let groups: Vec<Vec<BlockId>> = ids.chunks(self.opts.batch).map(<[BlockId]>::to_vec).collect();
        let found: Vec<Located> = futures::stream::iter(groups)
            .map(|group| async move {
                let mut found = Located::new();
                self.fetch_group(&group, |id, msg| {
                    let place = match decode_block(&id, msg)? {
                        Stored::Whole(_) => None,
                        Stored::InPack(pack) => Some(pack),
                    };
                    found.insert(id, place);
                    Ok(())
                })
                .await?;
                Ok::<_, CasError>(found)
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Which of `ids` the store lacks.
    pub async fn missing(&self, ids: &[BlockId]) -> Result<HashSet<BlockId>, CasError> {
        let present = self.locate(ids).await?;
        Ok(ids
            .iter()
            .filter(|id| !present.contains_key(id))
            .copied()
            .collect())
    }

    /// Writes `blocks` (which the caller found missing) in packs, several
    /// packs and their pointers to an atomic batch. A block another writer
    /// stored in the meantime makes its batch fail as a whole; that batch
    /// is checked again and only what is still missing is written.
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
            let pointer = Bytes::from(unit.id.to_string());
            let mut headers = HeaderMap::new();
            headers.insert(subjects::BLOCK_ENCODING_HEADER, super::encoding::PACK);
            for block in &unit.blocks {
                messages.push(OutboundMessage {
                    subject: subjects::block(block).into(),
                    payload: pointer.clone(),
                    headers: Some(headers.clone()),
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
        self.get_blocks_located(ids, &HashMap::new(), sink).await
    }

    /// As [`get_blocks`](Self::get_blocks), fetching first the packs that
    /// `hints` (a manifest's locations) name for its blocks; what a hint
    /// misplaces is then looked up by its name.
    pub async fn get_blocks_located(
        &self,
        ids: &[BlockId],
        hints: &HashMap<BlockId, PackId>,
        sink: impl Fn(BlockId, Bytes) -> Result<(), CasError> + Sync,
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
            let (bytes, got) = self.take_from_packs(by_pack, &sink, false).await?;
            wire += bytes;
            wanted.retain(|id| !got.contains(id));
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

    /// Blocks read by their names: whole ones at once, the rest through
    /// the packs their pointers name.
    async fn get_named(
        &self,
        mut wanted: Vec<BlockId>,
        sink: &(impl Fn(BlockId, Bytes) -> Result<(), CasError> + Sync),
    ) -> Result<u64, CasError> {
        let mut wire = 0u64;
        let mut tries = 0;
        loop {
            let mut seen = HashSet::with_capacity(wanted.len());
            let mut by_pack: HashMap<PackId, HashSet<BlockId>> = HashMap::new();
            self.fetch_group(&wanted, |id, msg| {
                match decode_block(&id, msg)? {
                    Stored::Whole(data) => {
                        wire += msg.payload.len() as u64;
                        let actual = BlockId::of(id.algorithm(), &data);
                        if actual != id {
                            return Err(CasError::CorruptBlock { block: id, actual });
                        }
                        seen.insert(id);
                        sink(id, data)?;
                    }
                    Stored::InPack(pack) => {
                        by_pack.entry(pack).or_default().insert(id);
                    }
                }
                Ok(())
            })
            .await?;
            if !by_pack.is_empty() {
                let (bytes, got) = self.take_from_packs(by_pack, sink, true).await?;
                wire += bytes;
                seen.extend(got);
            }
            wanted.retain(|id| !seen.contains(id));
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

    /// Fetches the packs named and hands `sink` the wanted blocks in each,
    /// checked. `strict`: a pack that is bad or lacks a block its pointer
    /// says it holds is an error naming it; otherwise (a hint) the block is
    /// left for its name to find. Returns the bytes fetched and the blocks
    /// handed over.
    async fn take_from_packs(
        &self,
        by_pack: HashMap<PackId, HashSet<BlockId>>,
        sink: &(impl Fn(BlockId, Bytes) -> Result<(), CasError> + Sync),
        strict: bool,
    ) -> Result<(u64, HashSet<BlockId>), CasError> {
        let packs: Vec<(PackId, HashSet<BlockId>)> = by_pack.into_iter().collect();
        let done: Vec<(u64, HashSet<BlockId>)> = futures::stream::iter(packs.chunks(PACKS_PER_GET).map(<[_]>::to_vec))
            .map(|group| async move {
                let wanted: HashMap<String, (PackId, HashSet<BlockId>)> = group
                    .into_iter()
                    .map(|(pack, blocks)| (subjects::pack(&pack), (pack, blocks)))
                    .collect();
                let mut wire = 0u64;
                let mut got = HashSet::new();
                self.last_messages("pack get", &wanted, |(pack_id, blocks), msg| {
                    wire += msg.payload.len() as u64;
                    let pack = match Pack::parse(*pack_id, self.opts.hash, msg.payload) {
                        Ok(pack) => pack,
                        Err(e) if strict => return Err(e),
                        Err(e) => {
                            tracing::debug!(error = %e, "a manifest's locations name a bad pack");
                            return Ok(());
                        }
                    };
                    for block in blocks {
                        match pack.open(block) {
                            Some(Ok(data)) => {
                                sink(*block, data)?;
                                got.insert(*block);
                            }
                            Some(Err(e)) if strict => return Err(e),
                            None if strict => {
                                return Err(CasError::NotInPack {
                                    block: *block,
                                    pack: *pack_id,
                                });
                            }
                            Some(Err(_)) | None => {
                                tracing::debug!(%block, pack = %pack_id, "a manifest's locations misplace a block");
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
                Ok::<_, CasError>((wire, got))
            })
            .buffer_unordered(self.opts.concurrency)
            .try_collect()
            .await?;
        let mut wire = 0;
        let mut got = HashSet::new();
        for (w, g) in done {
            wire += w;
            got.extend(g);
        }
        Ok((wire, got))
    }
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
