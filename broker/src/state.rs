//! Job records in the `vmlot-jobs` KV bucket. Every change is a
//! read-modify-write guarded by the entry's revision, so two writers (the
//! job task and a cancel request) never overwrite each other; the market's
//! changes are [`crate::lifecycle`] transitions applied with
//! [`JobStore::transition`]. Beside the records, the [`Index`] of the
//! unsettled ones, which every write here keeps up.

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use vmlot_schemas::JobId;
use vmlot_schemas::market::JobStatus;

use crate::error::BrokerError;
use crate::lifecycle::{self, Ending, Refused};
use crate::unsettled::{self, Index, Verdict};

/// The header in which a KV bucket marks a delete or purge.
const KV_OPERATION: &str = "KV-Operation";

/// Where a record may be read when its stream's leader cannot answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fallback {
    AnyReplica,
    /// Nowhere: the read decides something a write behind would get wrong.
    LeaderOnly,
}

/// Handle on the job bucket.
#[derive(Clone)]
pub struct JobStore {
    kv: kv::Store,
    /// On a cluster, the bucket's stream, whose leader answers reads
    /// ([`JobStore::get`]).
    leader: Option<jetstream::stream::Stream>,
    index: Index,
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    #[error("job not found")]
    NotFound,
    #[error(transparent)]
    Refused(E),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl From<UpdateError<Refused>> for BrokerError {
    fn from(err: UpdateError<Refused>) -> Self {
        match err {
            UpdateError::Broker(b) => b,
            UpdateError::Refused(refused) => BrokerError::Lifecycle(refused),
            UpdateError::NotFound => BrokerError::nats("update job", "job not found"),
        }
    }
}

/// The broker's KV bucket `name` (file storage, one revision kept per
/// key), created if it does not exist yet.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, BrokerError> {
    match js.get_key_value(name).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.to_string(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| BrokerError::nats("create a KV bucket", format!("{name}: {e}"))),
    }
}

impl JobStore {
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, BrokerError> {
        let kv = open_bucket(js, vmlot_schemas::subjects::JOB_BUCKET, replicas).await?;
        let stream = js
            .get_stream(&kv.stream_name)
            .await
            .map_err(|e| BrokerError::nats("job bucket", e))?;
        let copies = stream.cached_info().config.num_replicas;
        let (index, complete) = Index::open(js, replicas).await?;
        let store = Self {
            kv,
            leader: (copies > 1).then_some(stream),
            index,
        };
        if !complete {
            store.fill_index().await?;
        }
        Ok(store)
    }

    /// Gives every unsettled job of the records an entry in the index, once:
    /// the records came before the index (a broker of an earlier version
    /// wrote them). Another broker doing the same at once writes the same
    /// entries; one for a job settled since is found stale when read.
    /// A record that does not decode is left out with a warning (no task
    /// could run its job either); anything the server does not answer
    /// stops the filling, unmarked, for the next start to do again.
    async fn fill_index(&self) -> Result<(), BrokerError> {
        let (mut records, mut open) = (0, 0);
        for job in self.ids().await? {
            // From the leader: a replica a write behind could miss a job.
            let Some((value, _)) = self.entry(&job, Fallback::LeaderOnly).await? else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            records += 1;
            match serde_json::from_slice::<JobStatus>(&value) {
                Ok(status) if unsettled::settled(&status) => {}
                Ok(_) => {
                    self.index.add(&job).await?;
                    open += 1;
                }
                Err(e) => tracing::warn!(%job, error = %e, "an undecodable job record left out of the index"),
            }
        }
        self.index.mark_complete().await?;
        tracing::info!(records, unsettled = open, "unsettled jobs indexed");
        Ok(())
    }

    /// Stores a new job; fails if the id exists. Its index entry is written
    /// first, so an unsettled job never lacks one.
    pub async fn create(&self, status: &JobStatus) -> Result<(), BrokerError> {
        self.index.add(&status.job).await?;
        let bytes = serde_json::to_vec(status).expect("job status serializes");
        self.kv
            .create(status.job.to_string(), bytes.into())
            .await
            .map_err(|e| BrokerError::nats("create job", e))?;
        Ok(())
    }

    /// The record of `job` and its revision. (A boxed `'static` future, like
    /// [`JobStore::update`]: rustc's `Send` inference fails on the borrowing
    /// `async fn` inside the spawned job tasks.)
    pub fn get(
        &self,
        job: &JobId,
    ) -> futures::future::BoxFuture<'static, Result<Option<(JobStatus, u64)>, BrokerError>> {
        let this = self.clone();
        let job = *job;
        Box::pin(async move {
            let Some((value, revision)) = this.entry(&job, Fallback::AnyReplica).await? else {
                return Ok(None);
            };
            if value.is_empty() {
                return Ok(None);
            }
            let status = serde_json::from_slice(&value)
                .map_err(|e| BrokerError::nats("decode job record", format!("{job}: {e}")))?;
            Ok(Some((status, revision)))
        })
    }

    /// The stored value of `job`'s key and its revision. On a cluster it is
    /// read from the bucket's leader: a KV read is a direct get, which a
    /// follower answers from what it has applied, so a record read there
    /// may be a write behind (a job just created not found; a revision a
    /// compare-and-set then refuses over and over). The bucket keeps its
    /// direct gets for the books' readers, who reach nothing else. With
    /// no leader to ask, `fallback` says whether any replica's copy will do.
    async fn entry(
        &self,
        job: &JobId,
        fallback: Fallback,
    ) -> Result<Option<(bytes::Bytes, u64)>, BrokerError> {
        let Some(stream) = &self.leader else {
            let entry = self
                .kv
                .entry(job.to_string())
                .await
                .map_err(|e| BrokerError::nats("read job", e))?;
            return Ok(entry.map(|e| (e.value, e.revision)));
        };
        let subject = format!("{}{job}", self.kv.prefix);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(msg) => {
                // A delete or purge marker: no record.
                let removed = msg
                    .headers
                    .get(KV_OPERATION)
                    .is_some_and(|op| op.as_str() != "PUT");
                Ok(Some((
                    if removed { Default::default() } else { msg.payload },
                    msg.sequence,
                )))
            }
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) if fallback == Fallback::LeaderOnly => {
                Err(BrokerError::nats("read job from the leader", e))
            }
            // No leader yet (a node died and the stream is electing one):
            // any replica's copy. It may be a write behind, which is fine
            // for a read, and `update`'s compare-and-set refuses a write
            // built on it.
            Err(e) => {
                tracing::debug!(%job, error = %e, "no leader read; reading a replica");
                let entry = self
                    .kv
                    .entry(job.to_string())
                    .await
                    .map_err(|e| BrokerError::nats("read job", e))?;
                Ok(entry.map(|e| (e.value, e.revision)))
            }
        }
    }

    /// Applies `change` to the current record and writes it back if nobody
    /// wrote in between; retries on a lost race. (Written as a boxed `Send`
    /// future: rustc cannot prove the plain `async fn` with a generic
    /// closure `Send` inside spawned tasks.)
    pub fn update<E, F>(
        &self,
        job: &JobId,
        mut change: F,
    ) -> futures::future::BoxFuture<'static, Result<JobStatus, UpdateError<E>>>
    where
        E: Send + 'static,
        F: FnMut(&mut JobStatus) -> Result<(), E> + Send + 'static,
    {
        let this = self.clone();
        let job = *job;
        Box::pin(async move {
            loop {
                let Some((mut status, revision)) = this.get(&job).await? else {
                    return Err(UpdateError::NotFound);
                };
                let was_settled = unsettled::settled(&status);
                change(&mut status).map_err(UpdateError::Refused)?;
                status.updated_at = chrono::Utc::now();
                let bytes = serde_json::to_vec(&status).expect("job status serializes");
                match this.kv.update(job.to_string(), bytes.into(), revision).await {
                    Ok(_) => {
                        if !was_settled && unsettled::settled(&status) {
                            this.unindex(&job).await;
                        }
                        return Ok(status);
                    }
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(BrokerError::nats("write job", e).into()),
                }
            }
        })
    }

    /// Applies the [`lifecycle`] transition `step` to the stored record and
    /// returns the record written. A refusal writes nothing and comes back
    /// as [`UpdateError::Refused`].
    pub fn transition<F>(
        &self,
        job: &JobId,
        step: F,
    ) -> futures::future::BoxFuture<'static, Result<JobStatus, UpdateError<Refused>>>
    where
        F: Fn(&JobStatus) -> Result<JobStatus, Refused> + Send + 'static,
    {
        self.update(job, move |status| {
            *status = step(status)?;
            Ok(())
        })
    }

    /// Ends `job` for `ending` ([`lifecycle::end`]); a job that already
    /// ended keeps its state.
    pub async fn end(&self, job: &JobId, ending: Ending) -> Result<(), BrokerError> {
        tracing::info!(state = ?ending.state(), reason = %ending, "job ended");
        match self
            .transition(job, move |s| lifecycle::end(s, ending.clone()))
            .await
        {
            Ok(_) | Err(UpdateError::Refused(Refused::Final(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every job record, oldest first: every key of the bucket is listed
    /// and its record read.
    pub async fn all(&self) -> Result<Vec<JobStatus>, BrokerError> {
        let mut out = Vec::new();
        for job in self.ids().await? {
            if let Some((status, _)) = self.get(&job).await? {
                out.push(status);
            }
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    /// The id of every job with a key in the bucket.
    async fn ids(&self) -> Result<Vec<JobId>, BrokerError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| BrokerError::nats("list jobs", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| BrokerError::nats("list jobs", e))?;
            out.extend(key.parse::<JobId>().ok());
        }
        Ok(out)
    }

    /// Jobs not yet in a final state.
    pub async fn running(&self) -> Result<Vec<JobStatus>, BrokerError> {
        Ok(self
            .unsettled_where(None, |_| true)
            .await?
            .into_iter()
            .filter(|s| !s.state.is_final())
            .collect())
    }

    /// Jobs of `partitions` not yet settled ([`unsettled::settled`]), oldest
    /// first.
    pub async fn unsettled_in(&self, partitions: &[u16]) -> Result<Vec<JobStatus>, BrokerError> {
        let listed = match partitions {
            [p] => Some(*p),
            _ => None,
        };
        self.unsettled_where(listed, |p| partitions.contains(&p)).await
    }

    /// The unsettled jobs of the partitions `wanted` picks, oldest first:
    /// the index's entries (of partition `listed` alone, when given) and
    /// their records, nothing else. An entry found stale is purged.
    async fn unsettled_where(
        &self,
        listed: Option<u16>,
        wanted: impl Fn(u16) -> bool,
    ) -> Result<Vec<JobStatus>, BrokerError> {
        let mut out = Vec::new();
        for (_, job) in self
            .index
            .entries(listed)
            .await?
            .into_iter()
            .filter(|(p, _)| wanted(*p))
        {
            let record = self.get(&job).await?.map(|(status, _)| status);
            let age = match record {
                Some(_) => None,
                None => self.index.age(&job).await?,
            };
            match unsettled::verdict(record.as_ref(), || age) {
                Verdict::Open => out.extend(record),
                Verdict::Unborn => {}
                Verdict::Stale if record.is_some() || self.surely_absent(&job).await => {
                    self.unindex(&job).await
                }
                // A replica's read said no record: kept until the leader says so.
                Verdict::Stale => {}
            }
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    /// Whether `job` has no record (none, or one removed), by a read that
    /// cannot be a write behind.
    async fn surely_absent(&self, job: &JobId) -> bool {
        match self.entry(job, Fallback::LeaderOnly).await {
            Ok(None) => true,
            Ok(Some((value, _))) => value.is_empty(),
            Err(_) => false,
        }
    }

    /// Purges `job`'s index entry. Failing, it stays behind, stale, until a
    /// reader of the index finds it so.
    async fn unindex(&self, job: &JobId) {
        if let Err(err) = self.index.remove(job).await {
            tracing::warn!(%job, %err, "could not purge a settled job's index entry");
        }
    }

    /// Removes a job that never started (its submission was refused), and
    /// then its index entry.
    pub async fn remove(&self, job: &JobId) -> Result<(), BrokerError> {
        self.kv
            .purge(job.to_string())
            .await
            .map_err(|e| BrokerError::nats("remove job", e))?;
        self.unindex(job).await;
        Ok(())
    }
}
