//! Payments for settled segments. Each is written to its own subject,
//! `vmlot.ledger.pay.<job>.<segment>`, with `Nats-Expected-Last-Subject-Sequence: 0`:
//! the stream refuses a second payment for a segment, whoever retries and
//! however late, and `Nats-Msg-Id` (the deterministic payment id) makes a
//! retried publish inside the dedupe window an acknowledged no-op.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use vmlot_schemas::market::SegmentPayment;
use vmlot_schemas::{JobId, subjects};

use crate::BrokerError;

/// Namespace of payment ids (UUID v5 over "job/segment").
const PAYMENT_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d1f_5a4e_9b2c_4c1d_8e7f_a0b1_c2d3_e4f5);

/// The payment id of a segment: the same on every retry.
pub fn payment_id(job: &JobId, segment: u32) -> uuid::Uuid {
    uuid::Uuid::new_v5(&PAYMENT_NAMESPACE, format!("{job}/{segment}").as_bytes())
}

/// What a payment attempt found.
#[derive(Debug)]
pub enum Paid {
    /// This call wrote it.
    Now(SegmentPayment),
    /// It was already written (perhaps to another provider, by a broker that
    /// crashed before recording it): that one stands.
    Before(SegmentPayment),
}

impl Paid {
    pub fn payment(&self) -> &SegmentPayment {
        match self {
            Paid::Now(p) | Paid::Before(p) => p,
        }
    }
}

/// Writes `payment` unless its segment is already paid.
pub async fn pay(js: &jetstream::Context, payment: SegmentPayment) -> Result<Paid, BrokerError> {
    let subject = subjects::payment(&payment.job, payment.segment);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", payment.id.to_string().as_str());
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let body = serde_json::to_vec(&payment).expect("payment serializes");
    let ack = match js.publish_with_headers(subject, headers, body.into()).await {
        Ok(ack) => ack.await,
        Err(e) => return Err(BrokerError::nats("publish payment", e)),
    };
    match ack {
        Ok(ack) if !ack.duplicate => Ok(Paid::Now(payment)),
        Ok(_) => existing(js, payment.job, payment.segment)
            .await?
            .map(Paid::Before)
            .ok_or_else(|| BrokerError::nats("payment", "duplicate ack but no record")),
        Err(err) => match existing(js, payment.job, payment.segment).await? {
            Some(before) => Ok(Paid::Before(before)),
            None => Err(BrokerError::nats("publish payment", err)),
        },
    }
}

/// The payment of a segment, if one was written.
pub async fn existing(
    js: &jetstream::Context,
    job: JobId,
    segment: u32,
) -> Result<Option<SegmentPayment>, BrokerError> {
    let stream = js
        .get_stream_no_info(subjects::LEDGER_STREAM)
        .await
        .map_err(|e| BrokerError::nats("ledger stream", e))?;
    match stream
        .direct_get_last_for_subject(subjects::payment(&job, segment))
        .await
    {
        Ok(msg) => serde_json::from_slice(&msg.payload)
            .map(Some)
            .map_err(|e| BrokerError::nats("decode payment", e)),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(BrokerError::nats("read payment", e)),
    }
}

/// Every payment in the ledger, in order.
pub async fn all(js: &jetstream::Context) -> Result<Vec<SegmentPayment>, BrokerError> {
    let mut stream = js
        .get_stream(subjects::LEDGER_STREAM)
        .await
        .map_err(|e| BrokerError::nats("ledger stream", e))?;
    let total = stream
        .info()
        .await
        .map_err(|e| BrokerError::nats("ledger info", e))?
        .state
        .messages;
    let mut out = Vec::with_capacity(total as usize);
    if total == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "vmlot.ledger.pay.>".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError::nats("ledger reader", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BrokerError::nats("ledger reader", e))?;
    while (out.len() as u64) < total {
        let Some(msg) = messages.next().await else { break };
        let msg = msg.map_err(|e| BrokerError::nats("ledger read", e))?;
        match serde_json::from_slice::<SegmentPayment>(&msg.payload) {
            Ok(p) => out.push(p),
            Err(e) => tracing::warn!(subject = %msg.subject, %e, "undecodable ledger record"),
        }
        if msg.info().map(|i| i.pending == 0).unwrap_or(false) {
            break;
        }
    }
    Ok(out)
}
