//! The index of unsettled jobs: one empty message per job not yet settled
//! (still running, or ended with its escrow not yet refunded), on
//! `vmlot.unsettled.<partition>.<job>` in a stream of its own beside the
//! job records. A broker taking a partition, the rescan between lease
//! rounds and the market view read this index and the records it names,
//! instead of listing every job record ever written: their cost follows
//! the jobs in flight, not the market's history.
//!
//! An entry is written before its job's record and purged (no marker left)
//! after the record that settles the job ([`crate::state::JobStore`]), so
//! every unsettled job has one. An entry may outlive its job (a broker that
//! died between the record and the purge, a record whose creation failed):
//! its reader finds it stale ([`verdict`]) and purges it. A bucket of job
//! records older than the index is indexed once, from its records, and the
//! index then says so with [`subjects::UNSETTLED_INDEXED`].

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use vmlot_schemas::JobId;
use vmlot_schemas::market::JobStatus;
use vmlot_schemas::subjects;

use crate::error::BrokerError;

/// How long an entry without a job record is left alone: its submission
/// may be between its two writes.
pub const UNBORN_GRACE: Duration = Duration::from_secs(600);

/// What to do with an entry, given its job's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The job is unsettled: it needs a task.
    Open,
    /// The job is settled, or its record never came: purge the entry.
    Stale,
    /// No record yet, but the entry is young: leave it.
    Unborn,
}

/// True once nothing more happens to a job's money: it ended and its
/// escrow's rest went back.
pub fn settled(status: &JobStatus) -> bool {
    status.state.is_final() && status.refunded
}

/// The verdict on an entry whose job's record is `record`; `age` (the
/// entry's) is asked only when there is no record.
pub fn verdict(record: Option<&JobStatus>, age: impl FnOnce() -> Option<Duration>) -> Verdict {
    match record {
        Some(status) if settled(status) => Verdict::Stale,
        Some(_) => Verdict::Open,
        None => match age() {
            Some(age) if age < UNBORN_GRACE => Verdict::Unborn,
            // Old, or gone since the listing: nothing to wait for.
            _ => Verdict::Stale,
        },
    }
}

/// Handle on the index's stream.
#[derive(Clone)]
pub struct Index {
    js: jetstream::Context,
    stream: stream::Stream,
}

impl Index {
    /// The index, created if it does not exist yet, and whether it already
    /// holds every unsettled job ([`Index::mark_complete`]).
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<(Self, bool), BrokerError> {
        let stream = js
            .get_or_create_stream(stream::Config {
                name: subjects::UNSETTLED_STREAM.to_string(),
                subjects: vec![subjects::UNSETTLED_SUBJECTS.to_string()],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("the unsettled jobs' index", e))?;
        let index = Self {
            js: js.clone(),
            stream,
        };
        let complete = index.written_at(subjects::UNSETTLED_INDEXED).await?.is_some();
        Ok((index, complete))
    }

    /// Says that every unsettled job has its entry.
    pub async fn mark_complete(&self) -> Result<(), BrokerError> {
        self.publish(subjects::UNSETTLED_INDEXED.to_string()).await
    }

    /// Writes `job`'s entry (again, if it has one: one is kept per job).
    pub async fn add(&self, job: &JobId) -> Result<(), BrokerError> {
        self.publish(subjects::unsettled_entry(job)).await
    }

    async fn publish(&self, subject: String) -> Result<(), BrokerError> {
        self.js
            .publish(subject, bytes::Bytes::new())
            .await
            .map_err(|e| BrokerError::nats("write to the unsettled jobs' index", e))?
            .await
            .map_err(|e| BrokerError::nats("write to the unsettled jobs' index", e))?;
        Ok(())
    }

    /// Purges `job`'s entry; nothing if it has none.
    pub async fn remove(&self, job: &JobId) -> Result<(), BrokerError> {
        self.stream
            .purge()
            .filter(subjects::unsettled_entry(job))
            .await
            .map_err(|e| BrokerError::nats("purge from the unsettled jobs' index", e))?;
        Ok(())
    }

    /// Every entry of the partitions `partitions` names (all when none):
    /// its partition and job, each once. (The listing comes in pages, the
    /// later ones counted from the end of a sorted list that entries
    /// written meanwhile have shifted: an entry may come twice, and one
    /// may be missed until the next listing.)
    pub async fn entries(&self, partition: Option<u16>) -> Result<BTreeSet<(u16, JobId)>, BrokerError> {
        let listing = |e| BrokerError::nats("list the unsettled jobs", e);
        let filter = match partition {
            Some(p) => subjects::unsettled_of_partition(p),
            None => subjects::UNSETTLED_ENTRIES.to_string(),
        };
        let subjects: Vec<(String, usize)> = self
            .stream
            .info_with_subjects(filter)
            .await
            .map_err(listing)?
            .try_collect()
            .await
            .map_err(listing)?;
        Ok(subjects
            .iter()
            .filter_map(|(subject, _)| subjects::unsettled_job(subject))
            .collect())
    }

    /// How long ago `job`'s entry was written, by the server's clock (the
    /// index's last write stands for its now: never later than the
    /// server's, so an entry is never taken for older than it is); none
    /// if it has none.
    pub async fn age(&self, job: &JobId) -> Result<Option<Duration>, BrokerError> {
        let Some(at) = self.written_at(&subjects::unsettled_entry(job)).await? else {
            return Ok(None);
        };
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| BrokerError::nats("read the unsettled jobs' index", e))?;
        let nanos = info.state.last_timestamp.unix_timestamp_nanos() - at;
        Ok(Some(Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))))
    }

    /// When the server stored the message on `subject` (nanoseconds since
    /// the epoch, its clock); none if there is none.
    async fn written_at(&self, subject: &str) -> Result<Option<i128>, BrokerError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Ok(Some(msg.time.unix_timestamp_nanos())),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BrokerError::nats("read the unsettled jobs' index", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::market::JobState;

    fn job(state: JobState, refunded: bool) -> JobStatus {
        let mut status = crate::fixtures::job(vmlot_schemas::market::SegmentCount::Count(3));
        status.state = state;
        status.refunded = refunded;
        status
    }

    #[test]
    fn a_job_is_open_until_it_ended_and_was_refunded() {
        let never = || panic!("the age of an entry whose job has a record is not asked");
        assert_eq!(
            verdict(Some(&job(JobState::Running, false)), never),
            Verdict::Open
        );
        assert_eq!(verdict(Some(&job(JobState::Done, false)), never), Verdict::Open);
        assert_eq!(verdict(Some(&job(JobState::Failed, false)), never), Verdict::Open);
        assert_eq!(verdict(Some(&job(JobState::Done, true)), never), Verdict::Stale);
        assert_eq!(
            verdict(Some(&job(JobState::Cancelled, true)), never),
            Verdict::Stale
        );
    }

    #[test]
    fn an_entry_without_a_record_waits_for_it_a_while() {
        assert_eq!(verdict(None, || Some(Duration::from_secs(1))), Verdict::Unborn);
        assert_eq!(verdict(None, || Some(UNBORN_GRACE)), Verdict::Stale);
        // Purged since it was listed.
        assert_eq!(verdict(None, || None), Verdict::Stale);
    }
}
