//! When a result reached the NATS server, and whether results the server
//! has stored are still on their way to this broker. On a cluster, the
//! election of a results consumer's new leader (its node died) holds
//! delivery back for seconds: a result stored before its attempt's
//! deadline is owed a look even though it arrives after it, and one
//! stored after the deadline is late however it is delivered.

use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use vmlot_schemas::{JobId, subjects};

use crate::shared::Shared;

/// How long past its deadline an attempt waits for results still
/// undelivered (the consumer behind, or not answering). A NATS node's
/// loss is noticed and a new consumer leader elected within a few
/// seconds.
pub(super) const GRACE: Duration = Duration::from_secs(10);

/// How often, in the grace, the consumer is asked again.
pub(super) const GRACE_STEP: Duration = Duration::from_secs(1);

/// When `msg` was stored in the results stream (its stream timestamp),
/// not when it was delivered here.
pub(super) fn received_at(msg: &jetstream::Message) -> DateTime<Utc> {
    msg.info()
        .ok()
        .and_then(|info| {
            let nanos = info.published.unix_timestamp_nanos();
            DateTime::from_timestamp((nanos / 1_000_000_000) as i64, (nanos % 1_000_000_000) as u32)
        })
        .unwrap_or_else(Utc::now)
}

/// Whether the results consumer of `job`'s partition has messages stored
/// but not yet dealt with (not delivered, or delivered and not acked: a
/// broker that died holding them), or cannot say (its leader is being
/// elected): a result of this attempt may be among them.
pub(super) async fn undelivered(shared: &Shared, job: &JobId) -> bool {
    let js = jetstream::new(shared.client.clone());
    let name = subjects::results_consumer(subjects::partition_of(job));
    let info = async {
        let stream = js.get_stream(subjects::RESULT_STREAM).await.ok()?;
        let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(&name).await.ok()?;
        consumer
            .info()
            .await
            .ok()
            .map(|info| info.num_pending + info.num_ack_pending as u64)
    };
    match tokio::time::timeout(GRACE_STEP, info).await {
        Ok(Some(pending)) => pending > 0,
        Ok(None) | Err(_) => true,
    }
}
