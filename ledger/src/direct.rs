//! Reading a stream of the books with batched direct gets: the one read
//! that cannot write. A consumer lets its creator choose where the server
//! delivers (a push consumer's deliver subject could be the ledger's own),
//! so readers outside the broker get no consumer API at all: accountants
//! and the operator reach the books' direct gets and stream info through
//! the `BOOKS` account's exports, imported under [`subjects::BOOKS_API`];
//! the broker, inside that account, uses `$JS.API` itself.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::{Client, StatusCode, Subscriber};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use vmlot_schemas::subjects;

use crate::error::LedgerError;

/// Messages asked for per direct get.
const BATCH: usize = 1000;
/// Longest wait for the next message of a batch.
const PATIENCE: Duration = Duration::from_secs(10);
/// The server's "end of batch" status.
const EOB: u16 = 204;
/// No responders: nothing behind the subject (no such stream here).
const NO_STREAM: u16 = 503;
/// The server's "too many results" answer to a multi-last get.
const TOO_MANY: u16 = 413;

/// Where a reader reaches the books' streams: a NATS connection and the
/// JetStream API prefix under which the direct gets answer.
#[derive(Clone, Debug)]
pub struct BooksApi {
    client: Client,
    prefix: String,
}

/// One stored message.
struct Stored {
    seq: u64,
    subject: String,
    payload: bytes::Bytes,
    /// Messages matching the request after this one.
    pending: Option<u64>,
}

impl BooksApi {
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self {
            client,
            prefix: prefix.into(),
        }
    }

    /// Inside the account that holds the books (the broker's, or a server
    /// that checks no identities): the plain JetStream API.
    pub fn local(client: Client) -> Self {
        Self::new(client, "$JS.API")
    }

    /// A participant's view: the books' exports as imported into the market.
    pub fn imported(client: Client) -> Self {
        Self::new(client, subjects::BOOKS_API)
    }

    /// [`BooksApi::imported`] when the server checks identities (the books
    /// live in an account of their own), else [`BooksApi::local`].
    /// (Waits for the first connection: until then the server's INFO,
    /// which says so, is not known.)
    pub async fn for_server(client: Client) -> Self {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if client.server_info().auth_required {
            Self::imported(client)
        } else {
            Self::local(client)
        }
    }

    /// Whether `stream` is there to read (a direct get answers). Through
    /// an import, a missing stream answers nothing at all, hence the
    /// short wait.
    pub async fn exists(&self, stream: &str) -> Result<bool, LedgerError> {
        let subject = format!("{}.DIRECT.GET.{stream}", self.prefix);
        let body = json!({ "seq": 1 }).to_string();
        match tokio::time::timeout(Duration::from_secs(2), self.client.request(subject, body.into())).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(false),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Ok(false),
            Ok(Err(e)) => Err(LedgerError::nats("direct get", e)),
            Err(_) => Ok(false),
        }
    }

    /// Hands every message of `stream` on `filter` (all if `None`) from
    /// `start` on, in order, to `each` (sequence, subject, payload) until
    /// it returns false or the read has handed every message that matched
    /// when it began (the first answer says how many follow it). Returns
    /// how many were handed.
    pub async fn read(
        &self,
        stream: &str,
        filter: Option<&str>,
        start: Option<DateTime<Utc>>,
        mut each: impl FnMut(u64, &str, &[u8]) -> bool,
    ) -> Result<u64, LedgerError> {
        let (inbox, mut sub) = self.inbox().await?;
        let mut body = json!({ "batch": BATCH, "next_by_subj": filter.unwrap_or(">") });
        match start {
            Some(t) => body["start_time"] = json!(t.to_rfc3339_opts(SecondsFormat::Nanos, true)),
            None => body["seq"] = json!(1),
        }
        let mut handed = 0;
        // Messages still to hand: known from the first answer.
        let mut left: Option<u64> = None;
        loop {
            let (batch, more) = self.batch(stream, &inbox, &mut sub, &body).await?;
            let Some(last) = batch.last().map(|m| m.seq) else {
                return Ok(handed);
            };
            for m in batch {
                handed += 1;
                let left = left.get_or_insert(m.pending.unwrap_or(u64::MAX).saturating_add(1));
                *left -= 1;
                if !each(m.seq, &m.subject, &m.payload) || *left == 0 {
                    return Ok(handed);
                }
            }
            if !more {
                return Ok(handed);
            }
            if let Some(o) = body.as_object_mut() {
                o.remove("start_time");
            }
            body["seq"] = json!(last + 1);
        }
    }

    /// The last message of every subject under `filter`, in stream order.
    /// One multi-last get when the server allows as many answers; else a
    /// full read that keeps each subject's last.
    pub async fn last_per_subject(
        &self,
        stream: &str,
        filter: &str,
        mut each: impl FnMut(u64, &str, &[u8]) -> bool,
    ) -> Result<u64, LedgerError> {
        let (inbox, mut sub) = self.inbox().await?;
        let body = json!({ "batch": BATCH, "multi_last": [filter] });
        let mut last: BTreeMap<u64, Stored> = BTreeMap::new();
        match self.batch(stream, &inbox, &mut sub, &body).await {
            Ok((batch, _)) => last.extend(batch.into_iter().map(|m| (m.seq, m))),
            Err(BatchError::TooMany) => {
                let mut by_subject: BTreeMap<String, Stored> = BTreeMap::new();
                self.read(stream, Some(filter), None, |seq, subject, payload| {
                    by_subject.insert(
                        subject.to_string(),
                        Stored {
                            seq,
                            subject: subject.to_string(),
                            payload: bytes::Bytes::copy_from_slice(payload),
                            pending: None,
                        },
                    );
                    true
                })
                .await?;
                last.extend(by_subject.into_values().map(|m| (m.seq, m)));
            }
            Err(BatchError::Ledger(e)) => return Err(e),
        }
        let mut handed = 0;
        for m in last.into_values() {
            handed += 1;
            if !each(m.seq, &m.subject, &m.payload) {
                break;
            }
        }
        Ok(handed)
    }

    async fn inbox(&self) -> Result<(String, Subscriber), LedgerError> {
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| LedgerError::nats("books reader", e))?;
        Ok((inbox, sub))
    }

    /// One batched direct get: its messages and whether more match.
    async fn batch(
        &self,
        stream: &str,
        inbox: &str,
        sub: &mut Subscriber,
        body: &Value,
    ) -> Result<(Vec<Stored>, bool), BatchError> {
        let subject = format!("{}.DIRECT.GET.{stream}", self.prefix);
        self.client
            .publish_with_reply(subject, inbox.to_string(), body.to_string().into())
            .await
            .map_err(|e| LedgerError::nats("direct get", e))?;
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(PATIENCE, sub.next())
                .await
                .map_err(|_| {
                    LedgerError::nats(
                        "direct get",
                        "no answer (is the stream there, and may this user read it?)",
                    )
                })?
                .ok_or_else(|| LedgerError::nats("direct get", "connection closed"))?;
            let header = |name: &str| {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            match msg.status {
                None => {
                    let seq = header("Nats-Sequence").and_then(|s| s.parse().ok());
                    let subject = header("Nats-Subject");
                    let (Some(seq), Some(subject)) = (seq, subject) else {
                        return Err(
                            LedgerError::nats("direct get", "an answer without sequence or subject").into(),
                        );
                    };
                    out.push(Stored {
                        seq,
                        subject,
                        pending: header("Nats-Num-Pending").and_then(|p| p.parse().ok()),
                        payload: msg.payload,
                    });
                }
                Some(StatusCode::NOT_FOUND) => return Ok((out, false)),
                Some(s) if s.as_u16() == EOB => {
                    let pending = header("Nats-Num-Pending").and_then(|p| p.parse::<u64>().ok());
                    return Ok((out, pending != Some(0)));
                }
                Some(s) if s.as_u16() == TOO_MANY => return Err(BatchError::TooMany),
                Some(s) if s.as_u16() == NO_STREAM => {
                    return Err(
                        LedgerError::nats("direct get", format!("no stream {stream} to read")).into(),
                    );
                }
                Some(s) => {
                    return Err(LedgerError::nats(
                        "direct get",
                        format!("{s} {}", msg.description.unwrap_or_default()),
                    )
                    .into());
                }
            }
        }
    }
}

enum BatchError {
    TooMany,
    Ledger(LedgerError),
}

impl From<LedgerError> for BatchError {
    fn from(e: LedgerError) -> Self {
        BatchError::Ledger(e)
    }
}

impl From<BatchError> for LedgerError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::TooMany => LedgerError::nats("direct get", "too many results"),
            BatchError::Ledger(e) => e,
        }
    }
}
