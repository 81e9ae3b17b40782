//! Providers' standing in the `vmlot-standing` KV bucket: each result an
//! awarded provider sends is counted valid or refused (by reason), with a
//! revision-checked read-modify-write so two job tasks counting for one
//! provider never lose a count. Counting is best effort: a failure is
//! logged and never holds up a settlement.

use async_nats::jetstream::{self, kv};
use chrono::Utc;
use futures::StreamExt;
use vmlot_schemas::ProviderId;
use vmlot_schemas::standing::{RefusalKind, Standing};
use vmlot_schemas::subjects::STANDING_BUCKET;

use crate::error::BrokerError;
use crate::state::open_bucket;

/// Tries before a count is given up (each try lost a race to another writer).
const TRIES: usize = 8;

/// Handle on the standing bucket.
#[derive(Clone)]
pub struct Standings {
    kv: kv::Store,
}

/// What a result came to.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    Valid,
    /// Valid, and other replicas agreed with it.
    Agreed,
    Refused(RefusalKind, &'a str),
}

impl Standings {
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, BrokerError> {
        let kv = open_bucket(js, STANDING_BUCKET, replicas).await?;
        Ok(Standings { kv })
    }

    /// Counts one result of `provider`; logs instead of failing.
    pub async fn count(&self, provider: ProviderId, outcome: Outcome<'_>) {
        if let Err(err) = self.try_count(provider, outcome).await {
            tracing::warn!(%provider, %err, "standing not updated");
        }
    }

    async fn try_count(&self, provider: ProviderId, outcome: Outcome<'_>) -> Result<(), BrokerError> {
        let key = provider.to_string();
        for _ in 0..TRIES {
            let entry = self
                .kv
                .entry(&key)
                .await
                .map_err(|e| BrokerError::nats("read standing", e))?;
            let (mut standing, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice(&e.value).unwrap_or_else(|_| Standing::new(provider)),
                    Some(e.revision),
                ),
                _ => (Standing::new(provider), None),
            };
            match outcome {
                Outcome::Valid => standing.count_valid(Utc::now()),
                Outcome::Agreed => standing.count_agreed(Utc::now()),
                Outcome::Refused(kind, why) => standing.count_refused(kind, why, Utc::now()),
            }
            let bytes = serde_json::to_vec(&standing).expect("standing serializes");
            let written = match revision {
                Some(rev) => self.kv.update(&key, bytes.into(), rev).await.is_ok(),
                None => self.kv.create(&key, bytes.into()).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(BrokerError::nats(
            "update standing",
            "too many concurrent writers",
        ))
    }

    /// `provider`'s standing (a fresh one if it has none).
    pub async fn get(&self, provider: ProviderId) -> Result<Standing, BrokerError> {
        let bytes = self
            .kv
            .get(provider.to_string())
            .await
            .map_err(|e| BrokerError::nats("read standing", e))?;
        Ok(bytes
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| Standing::new(provider)))
    }

    /// Every provider's standing, by provider id.
    pub async fn all(&self) -> Result<Vec<Standing>, BrokerError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| BrokerError::nats("list standing", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| BrokerError::nats("list standing", e))?;
            if let Some(bytes) = self
                .kv
                .get(&key)
                .await
                .map_err(|e| BrokerError::nats("read standing", e))?
                && let Ok(standing) = serde_json::from_slice::<Standing>(&bytes)
            {
                out.push(standing);
            }
        }
        out.sort_by_key(|s| s.provider.to_string());
        Ok(out)
    }
}
