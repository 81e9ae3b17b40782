//! Reading a stream of the books with batched direct gets: the one read
//! that cannot write. A consumer lets its creator choose where the server
//! delivers (a push consumer's deliver subject could be the ledger's own),
//! so readers outside the broker get no consumer API at all: accountants
//! and the operator reach the books' direct gets and stream info through
//! the `BOOKS` account's exports, imported under [`subjects::BOOKS_API`];
//! the broker, inside that account, uses `$JS.API` itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use async_nats::header::{self, HeaderName};
use async_nats::{Client, StatusCode, Subscriber};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use vmlot_schemas::subjects;

use crate::error::LedgerError;

/// Messages asked for per direct get of a whole-stream read.
const BATCH: usize = 1000;
/// Messages and bytes asked for per direct get of a filtered read, one at
/// a time: the server counts what matches after the start at every get
/// (for a kind's subjects, a walk over all of them), so fewer, larger
/// batches (every settlement of 1 M records: 2.2 s instead of 3.7 s).
const FILTERED_BATCH: usize = 10_000;
const FILTERED_BYTES: usize = 8 << 20;
/// No bound of bytes (the server's default is its client buffer's size),
/// for batches asked ahead, which must not be cut short. A whole-stream
/// read asks ahead only after a first batch of [`BATCH`] messages came
/// within [`FILTERED_BYTES`]; a batch that then outgrew what the server
/// buffers for a client would end the read with an error, never a hole.
const UNBOUNDED: u64 = 1 << 62;
/// Direct gets a whole-stream read has asked for and not yet read the
/// answers of: enough that the server always has the next one to answer
/// (4 read 1 M ledger records about 10 % slower than 16), few enough that
/// their messages (`IN_FLIGHT` × [`BATCH`]) stay well below what a
/// subscription holds before the client drops messages (65 536 by
/// default) and their bytes below what the server lets wait for a
/// client (64 MiB by default; a ledger record is under 2 KiB).
const IN_FLIGHT: usize = 16;
/// Longest wait for the next message of a batch.
const PATIENCE: Duration = Duration::from_secs(10);
/// The server's "end of batch" status.
const EOB: u16 = 204;
/// No responders: nothing behind the subject (no such stream here).
const NO_STREAM: u16 = 503;
/// Headers of a direct get's answer.
const SEQUENCE: HeaderName = header::NATS_SEQUENCE;
const SUBJECT: HeaderName = header::NATS_SUBJECT;
const NUM_PENDING: HeaderName = HeaderName::from_static("Nats-Num-Pending");
/// The server's "too many results" answer to a multi-last get.
const TOO_MANY: u16 = 413;

/// Where a reader reaches the books' streams: a NATS connection and the
/// JetStream API prefix under which the direct gets answer.
#[derive(Clone, Debug)]
pub struct BooksApi {
    client: Client,
    prefix: String,
}

/// One stored message, as answered (its subject read from the answer's
/// headers when asked for: not copied per message).
struct Stored {
    seq: u64,
    /// Messages matching the request after this one.
    pending: Option<u64>,
    answer: async_nats::Message,
}

impl Stored {
    fn subject(&self) -> &str {
        header_of(&self.answer, SUBJECT).unwrap_or_default()
    }
}

fn header_of(answer: &async_nats::Message, name: HeaderName) -> Option<&str> {
    answer.headers.as_ref()?.get(name).map(|v| v.as_str())
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
    ///
    /// A filtered read asks for one batch at a time, each from the message
    /// after the last one received. A read of the whole stream asks ahead
    /// ([`IN_FLIGHT`] batches, by sequence), so the server answers the
    /// next batches while the reader takes this one: batch k is asked for
    /// the first [`BATCH`] messages from sequence `s + k·BATCH`, and since
    /// no more than [`BATCH`] messages lie between two such starts, each
    /// batch holds every message up to the next one's start. A gap in the
    /// sequences (messages removed) makes two batches overlap: a message
    /// received twice is handed once, and the read goes on one batch at a
    /// time (asking ahead would mostly fetch messages twice).
    ///
    /// Each batch is answered on a reply subject of its own, and a batch's
    /// answers are taken only once every earlier batch has ended: on a
    /// cluster each replica of the stream answers direct gets, so two
    /// batches in flight may be answered by two servers at once and arrive
    /// interleaved (one server answers its gets in the order asked).
    pub async fn read(
        &self,
        stream: &str,
        filter: Option<&str>,
        start: Option<DateTime<Utc>>,
        mut each: impl FnMut(u64, &str, &[u8]) -> bool,
    ) -> Result<u64, LedgerError> {
        let (inbox, mut sub) = self.inbox().await?;
        let subject = format!("{}.DIRECT.GET.{stream}", self.prefix);
        let mut ahead = filter.is_none_or(|f| f == ">");
        // The first get is bounded in bytes, as every get one at a time.
        let mut body = json!({
            "batch": if ahead { BATCH } else { FILTERED_BATCH },
            "max_bytes": FILTERED_BYTES,
        });
        if let Some(filter) = filter.filter(|_| !ahead) {
            body["next_by_subj"] = json!(filter);
        }
        match start {
            Some(t) => body["start_time"] = json!(t.to_rfc3339_opts(SecondsFormat::Nanos, true)),
            None => body["seq"] = json!(1),
        }
        // Batches are numbered in the order asked; `current` is the one
        // whose answers are taken, later ones' wait in `early`.
        let (mut next_batch, mut current) = (0u64, 0u64);
        let mut early: BTreeMap<u64, VecDeque<Reply>> = BTreeMap::new();
        self.ask(&subject, &format!("{inbox}.{next_batch}"), &body)
            .await?;
        next_batch += 1;
        if let Some(o) = body.as_object_mut() {
            o.remove("start_time");
        }
        // Answers still to come, the lowest sequence not yet handed, where
        // the next batch asked ahead starts, and the messages still to
        // hand (known from the first one).
        let (mut asked, mut next_seq, mut ask_from) = (1usize, 0u64, 0u64);
        let mut left: Option<u64> = None;
        let mut handed = 0;
        // The first answer's first sequence and size, until it ends.
        let (mut first_seq, mut contiguous) = (0u64, 0u64);
        loop {
            let (batch, reply) = self.reply(stream, &inbox, &mut sub).await?;
            if batch != current {
                early.entry(batch).or_default().push_back(reply);
                continue;
            }
            let mut replies = VecDeque::from([reply]);
            while let Some(reply) = replies.pop_front() {
                match reply {
                    Reply::Message(m) => {
                        if m.seq < next_seq {
                            ahead = false;
                            continue;
                        }
                        if handed == 0 {
                            first_seq = m.seq;
                        }
                        next_seq = m.seq + 1;
                        handed += 1;
                        if contiguous != u64::MAX {
                            contiguous = handed;
                        }
                        let left = left.get_or_insert(m.pending.unwrap_or(u64::MAX).saturating_add(1));
                        *left -= 1;
                        if !each(m.seq, m.subject(), &m.answer.payload) || *left == 0 {
                            return Ok(handed);
                        }
                    }
                    Reply::End { more } => {
                        if handed == contiguous {
                            // The first answer: ask ahead only where it
                            // came whole (not cut short by its bytes) and
                            // its sequences have no gaps. Asked ahead, a
                            // batch must never be cut short by size (the
                            // next one starts where it should have ended):
                            // no bound of bytes.
                            ahead &= handed == BATCH as u64 && next_seq.saturating_sub(first_seq) == handed;
                            contiguous = u64::MAX;
                            if ahead {
                                body["max_bytes"] = json!(UNBOUNDED);
                            }
                        }
                        asked -= 1;
                        current += 1;
                        replies.extend(early.remove(&current).unwrap_or_default());
                        let Some(left) = left.filter(|_| more && next_seq > 0) else {
                            return Ok(handed);
                        };
                        if !ahead {
                            if asked == 0 {
                                body["batch"] = json!(FILTERED_BATCH);
                                body["max_bytes"] = json!(FILTERED_BYTES);
                                body["seq"] = json!(next_seq);
                                self.ask(&subject, &format!("{inbox}.{next_batch}"), &body)
                                    .await?;
                                next_batch += 1;
                                asked += 1;
                            }
                            continue;
                        }
                        // Ask ahead, not past the last message known to be
                        // wanted (unless nothing else is asked for).
                        ask_from = ask_from.max(next_seq);
                        while asked < IN_FLIGHT && (asked == 0 || ask_from < next_seq.saturating_add(left)) {
                            body["seq"] = json!(ask_from);
                            self.ask(&subject, &format!("{inbox}.{next_batch}"), &body)
                                .await?;
                            next_batch += 1;
                            ask_from += BATCH as u64;
                            asked += 1;
                        }
                    }
                }
            }
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
        let subject = format!("{}.DIRECT.GET.{stream}", self.prefix);
        let body = json!({ "batch": BATCH, "multi_last": [filter] });
        self.ask(&subject, &format!("{inbox}.0"), &body).await?;
        let mut last: Vec<(u64, String, bytes::Bytes)> = Vec::new();
        loop {
            match self.reply(stream, &inbox, &mut sub).await.map(|(_, reply)| reply) {
                Ok(Reply::Message(m)) => {
                    last.push((m.seq, m.subject().to_string(), m.answer.payload.clone()))
                }
                Ok(Reply::End { .. }) => break,
                Err(BatchError::TooMany) => {
                    let mut by_subject: HashMap<String, (u64, bytes::Bytes)> = HashMap::new();
                    // More subjects than one get answers for: the whole
                    // stream read ahead, what is not under `filter` left
                    // out (every posting of 1 M records: 8.3-10.7 s, as
                    // against 10.3-12.8 s for a filtered read).
                    // (Each kept payload copied: as received, it would
                    // keep the whole read buffer it came in.)
                    self.read(stream, None, None, |seq, subject, payload| {
                        if subjects::filter_matches(filter, subject) {
                            let kept = (seq, bytes::Bytes::copy_from_slice(payload));
                            match by_subject.get_mut(subject) {
                                Some(last) => *last = kept,
                                None => {
                                    by_subject.insert(subject.to_string(), kept);
                                }
                            }
                        }
                        true
                    })
                    .await?;
                    last = by_subject
                        .into_iter()
                        .map(|(subject, (seq, payload))| (seq, subject, payload))
                        .collect();
                    break;
                }
                Err(BatchError::Ledger(e)) => return Err(e),
            }
        }
        last.sort_unstable_by_key(|(seq, ..)| *seq);
        let mut handed = 0;
        for (seq, subject, payload) in last {
            handed += 1;
            if !each(seq, &subject, &payload) {
                break;
            }
        }
        Ok(handed)
    }

    /// A fresh inbox and a subscription to the reply subjects under it
    /// (`<inbox>.<batch>`).
    async fn inbox(&self) -> Result<(String, Subscriber), LedgerError> {
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| LedgerError::nats("books reader", e))?;
        Ok((inbox, sub))
    }

    /// Sends one direct get to `subject`, its answers to `inbox`.
    async fn ask(&self, subject: &str, inbox: &str, body: &Value) -> Result<(), LedgerError> {
        self.client
            .publish_with_reply(subject.to_string(), inbox.to_string(), body.to_string().into())
            .await
            .map_err(|e| LedgerError::nats("direct get", e))
    }

    /// The next answer to the direct gets asked on `sub`'s inbox, and the
    /// batch it answers (the last token of its subject): a message, or the
    /// end of one get's answer.
    async fn reply(
        &self,
        stream: &str,
        inbox: &str,
        sub: &mut Subscriber,
    ) -> Result<(u64, Reply), BatchError> {
        // Most answers are already there: a timer only when one is awaited.
        let msg = match sub.next().now_or_never() {
            Some(msg) => msg,
            None => tokio::time::timeout(PATIENCE, sub.next()).await.map_err(|_| {
                LedgerError::nats(
                    "direct get",
                    "no answer (is the stream there, and may this user read it?)",
                )
            })?,
        }
        .ok_or_else(|| LedgerError::nats("direct get", "connection closed"))?;
        let batch = msg
            .subject
            .strip_prefix(inbox)
            .and_then(|b| b.strip_prefix('.'))
            .and_then(|b| b.parse::<u64>().ok())
            .ok_or_else(|| LedgerError::nats("direct get", format!("an answer on {}", msg.subject)))?;
        let reply = Self::take_apart(stream, msg)?;
        Ok((batch, reply))
    }

    /// One answer to a direct get: a message, or the end of its batch.
    fn take_apart(stream: &str, msg: async_nats::Message) -> Result<Reply, BatchError> {
        let pending = header_of(&msg, NUM_PENDING).and_then(|p| p.parse::<u64>().ok());
        match msg.status {
            None => {
                let seq = header_of(&msg, SEQUENCE).and_then(|s| s.parse().ok());
                let (Some(seq), Some(_)) = (seq, header_of(&msg, SUBJECT)) else {
                    return Err(
                        LedgerError::nats("direct get", "an answer without sequence or subject").into(),
                    );
                };
                Ok(Reply::Message(Stored {
                    seq,
                    pending,
                    answer: msg,
                }))
            }
            Some(StatusCode::NOT_FOUND) => Ok(Reply::End { more: false }),
            Some(s) if s.as_u16() == EOB => Ok(Reply::End {
                more: pending != Some(0),
            }),
            Some(s) if s.as_u16() == TOO_MANY => Err(BatchError::TooMany),
            Some(s) if s.as_u16() == NO_STREAM => {
                Err(LedgerError::nats("direct get", format!("no stream {stream} to read")).into())
            }
            Some(s) => Err(LedgerError::nats(
                "direct get",
                format!("{s} {}", msg.description.clone().unwrap_or_default()),
            )
            .into()),
        }
    }
}

/// One answer to a batched direct get.
// Taken apart as soon as returned; boxing the message would cost an
// allocation per message read.
#[allow(clippy::large_enum_variant)]
enum Reply {
    Message(Stored),
    /// The end of one get's answer: whether more match after it.
    End {
        more: bool,
    },
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
