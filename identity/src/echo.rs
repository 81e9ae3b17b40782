//! Messages the server published on a requester's behalf. A JetStream
//! direct get answers on whatever reply subject the requester names, so a
//! participant allowed to store a message (a block, say) and read it back
//! can have the server publish it on a subject the participant may not
//! publish on itself: another provider's heartbeat, result or award. Such
//! an answer always carries the stream's headers (`Nats-Stream`,
//! `Nats-Sequence`), which no market message needs, so every receiver of
//! market messages refuses a message carrying one.

use async_nats::HeaderMap;

/// Headers the server puts on a stored message it hands back.
pub const STREAM_HEADERS: [&str; 2] = ["Nats-Stream", "Nats-Sequence"];

/// True when `headers` mark a message as a stored one the server handed
/// back (not published by the subject's owner).
pub fn echoed(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| STREAM_HEADERS.iter().any(|name| h.get(*name).is_some()))
}

/// [`echoed`], logged as a refusal: what every receiver of market
/// messages calls before reading one.
pub fn refuse(subject: &str, headers: Option<&HeaderMap>) -> bool {
    let echoed = echoed(headers);
    if echoed {
        tracing::warn!(%subject, "refused a message the server echoed (a stored message handed back on another's subject)");
    }
    echoed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_message_handed_back_is_echoed() {
        let mut h = HeaderMap::new();
        assert!(!echoed(None));
        assert!(!echoed(Some(&h)));
        h.insert("Nats-Msg-Id", "x");
        assert!(!echoed(Some(&h)));
        h.insert("Nats-Stream", "VMLOT_BLOCKS");
        assert!(echoed(Some(&h)));
    }
}
