//! What the servers had acknowledged at a fault (a NATS node killed, a
//! power cut), read before it, and the checks that it is all still there
//! after it: the kept streams' marks and the books' messages.

use std::collections::HashMap;

use bytes::Bytes;
use vmlot_schemas::subjects;

use crate::market::Market;

/// Streams whose messages are never removed while a test runs (no
/// deletes, no purges, nothing ages out): what they held at a fault must
/// all be there after it.
pub const KEPT: [&str; 4] = [
    subjects::BLOCK_STREAM,
    subjects::MANIFEST_STREAM,
    subjects::RESULT_STREAM,
    subjects::LEDGER_STREAM,
];

/// Each kept stream's message count and last sequence now.
pub async fn stream_marks(market: &Market) -> HashMap<String, (u64, u64)> {
    let marks: HashMap<String, (u64, u64)> = market
        .streams()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| KEPT.contains(&i.config.name.as_str()))
        .map(|i| (i.config.name, (i.state.messages, i.state.last_sequence)))
        .collect();
    assert_eq!(marks.len(), KEPT.len(), "{marks:?}");
    marks
}

/// No kept stream holds fewer messages or ends at a lower sequence than
/// `marks` (read before `fault`) say.
pub async fn assert_streams_kept(market: &Market, marks: &HashMap<String, (u64, u64)>, fault: &str) {
    for info in market.streams().await.unwrap() {
        let Some((messages, last)) = marks.get(&info.config.name) else {
            continue;
        };
        assert!(
            info.state.messages >= *messages && info.state.last_sequence >= *last,
            "{} held {messages} messages to sequence {last} at the {fault}, now {} to {}",
            info.config.name,
            info.state.messages,
            info.state.last_sequence
        );
    }
}

/// The books' messages (sequence, subject, payload) from sequence `from`
/// on, read through `books` (a connection to the books' account) from the
/// stream's leader.
pub async fn ledger_messages(books: &async_nats::Client, from: u64) -> Vec<(u64, String, Bytes)> {
    let js = async_nats::jetstream::new(books.clone());
    let mut stream = js
        .get_stream(subjects::LEDGER_STREAM)
        .await
        .unwrap_or_else(|e| panic!("the books' stream {}: {e}", subjects::LEDGER_STREAM));
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in from.max(state.first_sequence)..=state.last_sequence {
        let msg = stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|e| panic!("ledger message {seq}: {e}"));
        out.push((msg.sequence, msg.subject.to_string(), msg.payload));
    }
    out
}
