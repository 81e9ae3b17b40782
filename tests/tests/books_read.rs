//! The books' reader (`vmlot_ledger::BooksApi::read`) over streams long
//! enough that it asks ahead (many batched direct gets in flight), against
//! a real nats-server: every message handed once, in order, with its own
//! subject and payload; a gap in the sequences; a filter; a start time; a
//! reader that stops early; an accountant reading through the exports.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, stream};
use vmlot_ledger::BooksApi;
use vmlot_schemas::caller::Role;
use vmlot_schemas::subjects;
use vmlot_tests::{NatsCluster, NatsServer};

/// Publishes `n` messages on `prefix.<i % 7>`, each payload naming its
/// index (every tenth one padded to 3 KiB), pipelined a thousand at a
/// time; returns them by sequence.
async fn fill(js: &jetstream::Context, prefix: &str, n: usize) -> BTreeMap<u64, (String, Vec<u8>)> {
    let mut stored = BTreeMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let subject = format!("{prefix}.{}", i % 7);
            let mut payload = format!("message {i}").into_bytes();
            if i % 10 == 0 {
                payload.resize(3 << 10, b'x');
            }
            let ack = js.publish(subject.clone(), payload.clone().into()).await.unwrap();
            acks.push((ack, subject, payload));
        }
        for (ack, subject, payload) in acks {
            stored.insert(ack.await.unwrap().sequence, (subject, payload));
        }
    }
    stored
}

/// Reads `stream` (on `filter`, from `start`) with `api` and checks it
/// handed exactly `expected`, in order.
async fn read_exactly(
    api: &BooksApi,
    stream: &str,
    filter: Option<&str>,
    start: Option<chrono::DateTime<chrono::Utc>>,
    expected: &BTreeMap<u64, (String, Vec<u8>)>,
) {
    let mut handed = Vec::new();
    let n = api
        .read(stream, filter, start, |seq, subject, payload| {
            handed.push((seq, subject.to_string(), payload.to_vec()));
            true
        })
        .await
        .unwrap();
    assert_eq!(n as usize, handed.len());
    assert_eq!(handed.len(), expected.len(), "messages handed on {filter:?}");
    for ((seq, subject, payload), (want_seq, (want_subject, want_payload))) in handed.iter().zip(expected) {
        assert_eq!((seq, subject, payload), (want_seq, want_subject, want_payload));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_is_read_whole_once_in_order_with_gaps_filters_and_stops() {
    let server = NatsServer::start().unwrap();
    let client = server.books_client().await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "READTEST".to_string(),
        subjects: vec!["readtest.>".to_string()],
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stored = fill(&js, "readtest", 20_000).await;
    let api = BooksApi::local(client.clone());

    // No gaps: every batch asked ahead.
    read_exactly(&api, "READTEST", None, None, &stored).await;

    // Gaps after the first batch, one a run of three: batches asked
    // ahead by sequence overlap, and nothing is handed twice or lost.
    let stream = js.get_stream("READTEST").await.unwrap();
    for seq in [4_000u64, 4_001, 4_002, 11_111, 19_999] {
        assert!(stream.delete_message(seq).await.unwrap());
        stored.remove(&seq);
    }
    read_exactly(&api, "READTEST", None, None, &stored).await;
    // A gap inside the first batch: read one batch at a time.
    assert!(stream.delete_message(17).await.unwrap());
    stored.remove(&17);
    read_exactly(&api, "READTEST", None, None, &stored).await;

    // A filter: only its subject, every one of them.
    let only_3: BTreeMap<_, _> = stored
        .iter()
        .filter(|(_, (subject, _))| subject == "readtest.3")
        .map(|(s, m)| (*s, m.clone()))
        .collect();
    read_exactly(&api, "READTEST", Some("readtest.3"), None, &only_3).await;

    // A start time: the messages stored after it.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = chrono::Utc::now();
    let newer = fill(&js, "readtest", 2_500).await;
    read_exactly(&api, "READTEST", None, Some(since), &newer).await;

    // A reader that stops early is handed no more.
    let mut seen = 0;
    let n = api
        .read("READTEST", None, None, |_, _, _| {
            seen += 1;
            seen < 2_345
        })
        .await
        .unwrap();
    assert_eq!((n, seen), (2_345, 2_345));

    // A stream that is not there is an error, not an empty read.
    assert!(
        api.read("NO_SUCH_STREAM", None, None, |_, _, _| true)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accountant_reads_a_long_ledger_through_the_exports() {
    let server = NatsServer::start().unwrap();
    let js = jetstream::new(server.books_client().await.unwrap());
    vmlot_ledger::Books::provision(&js, 1).await.unwrap();
    // Raw bytes on ledger subjects: the reader hands payloads undecoded.
    let stored = fill(&js, "vmlot.ledger.tx.readtest", 12_345).await;
    let accountant = server.client_as(Role::Accountant, "audit").await.unwrap();
    let api = BooksApi::for_server(accountant).await;
    read_exactly(&api, subjects::LEDGER_STREAM, None, None, &stored).await;
    let only_5: BTreeMap<_, _> = stored
        .iter()
        .filter(|(_, (subject, _))| subject.ends_with(".5"))
        .map(|(s, m)| (*s, m.clone()))
        .collect();
    read_exactly(
        &api,
        subjects::LEDGER_STREAM,
        Some("vmlot.ledger.tx.readtest.5"),
        None,
        &only_5,
    )
    .await;
}

/// A reader on a server that holds no replica of a replicated stream: its
/// gets, asked ahead, travel to the replicas and back; every message is
/// handed once, in order. (Any replica may answer a get, so batches in
/// flight could be answered by two servers and arrive interleaved; the
/// reader takes each batch's answers in the order asked. Here one replica
/// answered them all: the interleaving itself was not provoked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_away_from_every_replica_reads_a_replicated_stream_in_order() {
    let cluster = NatsCluster::start(5).unwrap();
    let client = cluster.books_client().await.unwrap();
    cluster.wait_jetstream(&client).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "READTEST".to_string(),
        subjects: vec!["readtest.>".to_string()],
        num_replicas: 3,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let stored = fill(&js, "readtest", 30_000).await;
    // Every replica current before the read (a follower behind the leader
    // would end its batch early, as it would a read one batch at a time).
    let mut stream = js.get_stream("READTEST").await.unwrap();
    let hosts = vmlot_tests::market::wait_for(std::time::Duration::from_secs(20), async || {
        let info = stream.info().await.ok()?;
        let cluster = info.cluster.as_ref()?;
        let current = cluster.replicas.len() == 2
            && cluster
                .replicas
                .iter()
                .all(|r| r.current && r.lag.unwrap_or(0) == 0);
        let mut hosts: Vec<String> = cluster.replicas.iter().map(|r| r.name.clone()).collect();
        hosts.extend(cluster.leader.clone());
        (current && hosts.len() == 3).then_some(hosts)
    })
    .await
    .expect("the replicas did not catch up");
    let away = cluster
        .servers
        .iter()
        .find(|s| !hosts.iter().any(|h| h == s.name()))
        .unwrap();
    let reader = vmlot_tests::connect(&away.url(), &away.deployment().books_creds_path())
        .await
        .unwrap();
    read_exactly(&BooksApi::local(reader), "READTEST", None, None, &stored).await;
}
