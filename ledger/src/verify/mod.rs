//! Reconciliation: replays the whole ledger, and the job records beside
//! it, and names every record that breaks a rule:
//! - every transaction balances, sits on the subject its id and kind call
//!   for, and has the shape of its kind;
//! - every entry has its posting and every posting its entry, each posting
//!   carrying the balance the replay gives;
//! - no account but the operator's goes below zero, and all balances of a
//!   unit sum to zero;
//! - every settled segment is paid exactly once, to the provider whose
//!   result settled it, at its price; no payment for a segment the job
//!   never settled (a cancelled or losing replica);
//! - every job's escrow holds its budget less its payments while it runs,
//!   and is refunded to zero once it ends;
//! - a deposit moves a provider's money from `provider:P` to `deposit:P`
//!   only, a release back only, each naming P and no job; no deposit goes
//!   below zero;
//! - a forfeit takes from `deposit:P` for `user:PAYER` only, carrying its
//!   details (job, segment, attempt, provider, payer, amount, cause) in
//!   agreement with its entries, once per (job, segment, attempt,
//!   provider); the job has a record, its submitter is the payer, and the
//!   cheating is proven: for a minority result the job's record lists P
//!   among those it refused, for a checkpoint that did not restore the
//!   books hold a void of P's payment for that attempt at that segment.
//!
//! The checks live in one module per concept: [`report`] (what a replay
//! says), `shape` (one transaction on its own), `forfeits` (forfeits
//! against the job records and payments), `jobs` (the books against the
//! job records), `replay` (the stream in order); this module reads the
//! streams and feeds them.

use crate::direct::BooksApi;
use vmlot_schemas::market::JobStatus;
use vmlot_schemas::subjects;

use crate::error::LedgerError;
use crate::read::read_raw;

mod forfeits;
mod jobs;
mod replay;
pub mod report;
mod shape;

pub use jobs::Balances;
pub use report::{Problem, Report};

use replay::Replay;

/// Messages handed from the reader to the replay at a time.
const REPLAY_BATCH: usize = 1024;
/// Batches queued between the reader and the replay: bounds the memory a
/// replay slower than the reader can take.
const REPLAY_QUEUE: usize = 64;

/// Replays the whole ledger and the job records. The ledger's messages are
/// decoded and replayed on a thread of their own, in stream order, while
/// the next ones are read: decoding costs about as much as reading, and the
/// two then overlap.
pub async fn verify(api: &BooksApi) -> Result<Report, LedgerError> {
    type Batch = Vec<(u64, String, Vec<u8>)>;
    let (queue, batches) = std::sync::mpsc::sync_channel::<Batch>(REPLAY_QUEUE);
    let replayer = tokio::task::spawn_blocking(move || {
        let mut replay = Replay::default();
        for batch in batches {
            for (seq, subject, payload) in batch {
                replay.message(seq, &subject, &payload);
            }
        }
        replay
    });
    let mut batch: Batch = Vec::with_capacity(REPLAY_BATCH);
    let read = read_raw(
        api,
        subjects::LEDGER_STREAM,
        vec![],
        None,
        false,
        |seq, subject, payload| {
            batch.push((seq, subject.to_string(), payload.to_vec()));
            if batch.len() < REPLAY_BATCH {
                return true;
            }
            // Fails only if the replay thread is gone (it panicked); the
            // join below reports that.
            queue
                .send(std::mem::replace(&mut batch, Vec::with_capacity(REPLAY_BATCH)))
                .is_ok()
        },
    )
    .await;
    if !batch.is_empty() {
        let _ = queue.send(batch);
    }
    drop(queue);
    read?;
    // The job records are read while the replay catches up.
    let mut jobs = Vec::new();
    let mut undecodable = Vec::new();
    let found = api.exists(subjects::JOB_BUCKET_STREAM).await?;
    if found {
        read_raw(
            api,
            subjects::JOB_BUCKET_STREAM,
            vec![subjects::JOB_BUCKET_SUBJECTS.to_string()],
            None,
            true,
            |seq, subject, payload| {
                if payload.is_empty() {
                    return true; // a deleted record (a refused submission)
                }
                match serde_json::from_slice::<JobStatus>(payload) {
                    Ok(status) => jobs.push(status),
                    Err(e) => undecodable.push((
                        format!("{subject} (seq {seq})"),
                        format!("undecodable job record: {e}"),
                    )),
                }
                true
            },
        )
        .await?;
    }
    let mut replay = replayer
        .await
        .map_err(|e| LedgerError::nats("ledger replay", e))?;
    for (record, what) in undecodable {
        replay.report.problem(&record, what);
    }
    for status in &jobs {
        replay.job(status);
    }
    Ok(replay.finish())
}
