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

/// What the reader hands the replay thread: ledger messages in stream
/// order (sequence, subject, payload), then the job records' payloads.
enum Read {
    Ledger(Batch),
    Jobs(Vec<(u64, String, Vec<u8>)>),
}

/// Ledger messages copied out of the connection's buffers, all into one
/// buffer: two allocations per [`REPLAY_BATCH`] messages, not two per
/// message (made on the reader's thread and freed on the replay's, they
/// cost the allocator more than the copy).
struct Batch {
    /// Sequence, and where the subject ends and the payload ends in `bytes`.
    messages: Vec<(u64, usize, usize)>,
    bytes: Vec<u8>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            messages: Vec::with_capacity(REPLAY_BATCH),
            bytes: Vec::with_capacity(REPLAY_BATCH * 640),
        }
    }

    fn push(&mut self, seq: u64, subject: &str, payload: &[u8]) {
        self.bytes.extend_from_slice(subject.as_bytes());
        let subject_end = self.bytes.len();
        self.bytes.extend_from_slice(payload);
        self.messages.push((seq, subject_end, self.bytes.len()));
    }

    fn replay(&self, replay: &mut Replay) {
        let mut start = 0;
        for &(seq, subject_end, end) in &self.messages {
            // Copied from a `&str`: always UTF-8.
            let subject = std::str::from_utf8(&self.bytes[start..subject_end]).unwrap_or_default();
            replay.message(seq, subject, &self.bytes[subject_end..end]);
            start = end;
        }
    }
}

/// Replays the whole ledger and the job records. The messages are decoded
/// and replayed on a thread of their own, in stream order, while the next
/// ones are read: the read (the server's direct gets, and the client
/// taking their answers apart) is the longer part, and the two overlap.
/// Each payload is copied out of the connection's read buffer as it is
/// received: a payload kept as it came would keep its whole 64 KiB buffer
/// alive until replayed, and the client would allocate a new one for
/// every few dozen messages (measured: the copy reads 1 M records
/// faster).
pub async fn verify(api: &BooksApi) -> Result<Report, LedgerError> {
    let (queue, reads) = std::sync::mpsc::sync_channel::<Read>(REPLAY_QUEUE);
    let replayer = tokio::task::spawn_blocking(move || {
        let mut replay = Replay::default();
        for read in reads {
            match read {
                Read::Ledger(batch) => batch.replay(&mut replay),
                Read::Jobs(records) => replay_jobs(&mut replay, records),
            }
        }
        replay
    });
    let mut batch = Batch::new();
    let read = api
        .read(subjects::LEDGER_STREAM, None, None, |seq, subject, payload| {
            batch.push(seq, subject, payload);
            if batch.messages.len() < REPLAY_BATCH {
                return true;
            }
            // Fails only if the replay thread is gone (it panicked); the
            // join below reports that.
            queue
                .send(Read::Ledger(std::mem::replace(&mut batch, Batch::new())))
                .is_ok()
        })
        .await;
    if !batch.messages.is_empty() {
        let _ = queue.send(Read::Ledger(batch));
    }
    // The job records are read while the replay catches up, and decoded
    // on its thread.
    let jobs = match read {
        Ok(_) => read_jobs(api).await?,
        Err(e) => return Err(e),
    };
    let _ = queue.send(Read::Jobs(jobs));
    drop(queue);
    let replay = replayer
        .await
        .map_err(|e| LedgerError::nats("ledger replay", e))?;
    Ok(replay.finish())
}

/// The job records' payloads (each job's last), undecoded; none when there
/// is no bucket.
async fn read_jobs(api: &BooksApi) -> Result<Vec<(u64, String, Vec<u8>)>, LedgerError> {
    let mut records = Vec::new();
    if api.exists(subjects::JOB_BUCKET_STREAM).await? {
        read_raw(
            api,
            subjects::JOB_BUCKET_STREAM,
            vec![subjects::JOB_BUCKET_SUBJECTS.to_string()],
            None,
            true,
            |seq, subject, payload| {
                // An empty one is a deleted record (a refused submission).
                if !payload.is_empty() {
                    records.push((seq, subject.to_string(), payload.to_vec()));
                }
                true
            },
        )
        .await?;
    }
    Ok(records)
}

/// Decodes the job records and checks each against the replayed books.
fn replay_jobs(replay: &mut Replay, records: Vec<(u64, String, Vec<u8>)>) {
    let mut jobs = Vec::new();
    for (seq, subject, payload) in records {
        match serde_json::from_slice::<JobStatus>(&payload) {
            Ok(status) => jobs.push(status),
            Err(e) => replay.report.problem(
                &format!("{subject} (seq {seq})"),
                format!("undecodable job record: {e}"),
            ),
        }
    }
    for status in &jobs {
        replay.job(status);
    }
}
