//! Writes through a stream leader's election: which refused batches may
//! pass on another try, and how long to keep trying.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use jetstream_extra::batch_publish::{BatchPublishError, BatchPublishErrorKind};

/// Whether a refused batch may succeed if sent again: the request went
/// unanswered (no responders while a stream leader is elected, or a
/// timeout), the server refused a message (a block or part another writer
/// stored first: error 10077, one message per subject), or the batch was
/// abandoned or throttled.
pub(super) fn transient(err: &BatchPublishError) -> bool {
    matches!(
        err.kind(),
        BatchPublishErrorKind::Request
            | BatchPublishErrorKind::Publish
            | BatchPublishErrorKind::BatchPublishIncomplete
            | BatchPublishErrorKind::BatchPublishTooManyInflight
            | BatchPublishErrorKind::Other
    )
}

/// As [`transient`], for a lone message's acknowledged publish: no
/// answer (a timeout, a broken connection, no stream leader yet, which
/// the client reports as no stream) or the server's refusal of the
/// message (another writer's copy stored first).
pub(super) fn transient_publish(err: &PublishError) -> bool {
    matches!(
        err.kind(),
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::Other
    )
}

/// Why a manifest record's parts were not stored, and whether another try
/// may pass (see [`transient`]).
#[derive(Debug)]
pub(super) struct PartsRefused {
    pub(super) transient: bool,
    pub(super) reason: String,
}

impl std::fmt::Display for PartsRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// How long a write keeps trying through a stream leader's election (a
/// cluster notices a lost node and elects within a few seconds).
const WRITE_PATIENCE: Duration = Duration::from_secs(15);

/// Retries with a doubling pause, until [`WRITE_PATIENCE`] has passed.
pub(super) struct Retry {
    started: std::time::Instant,
    pause: Duration,
}

impl Retry {
    pub(super) fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            pause: Duration::from_millis(50),
        }
    }

    /// Whether to try again (after a pause) when the last try failed, and
    /// failed in a way that `may_pass` on another try.
    pub(super) async fn again(&mut self, may_pass: bool) -> bool {
        if !may_pass || self.started.elapsed() + self.pause > WRITE_PATIENCE {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        true
    }
}
