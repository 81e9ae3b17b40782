//! The market on a 3-node JetStream cluster (issue 16 step 1): the broker
//! keeps every stream and bucket it, the block store and the books create
//! on all three nodes (`--replicas 3`), with the deployment's accounts and
//! TLS on each node; the broker, the providers and the `vmlot` CLI are
//! given all three URLs. One node is SIGKILLed while jobs run, the market
//! goes on without it, and it comes back on its own store: the jobs end
//! done, each segment paid once, the books verify, nothing the servers had
//! acknowledged before the kill is missing, and every stream is whole on
//! all three nodes again.
//!
//! The tests take turns (one lock): three servers, the market's processes
//! and a QEMU guest share what may be a two-core machine.

use std::collections::HashMap;
use std::time::Duration;

use vmlot_schemas::market::{Image, JobSpec, JobState, ResultCheck, SegmentCount};
use vmlot_schemas::{JobId, Money, subjects};
use vmlot_tests::kept::{assert_streams_kept, ledger_messages, stream_marks};
use vmlot_tests::market::{Market, ProviderSpec, QemuProviderSpec, fast_broker_args, wait_for};
use vmlot_tests::vm::{
    SEGMENT_SECONDS, Timed, VmMarket, assert_console_exact, qemu_image, reference_console,
};

/// Nodes, and so copies of every stream.
const NODES: usize = 3;

/// Every stream the market keeps: the store's, the results', the books',
/// the index of unsettled jobs, and the two KV buckets' (JetStream names a
/// bucket's stream `KV_<bucket>`).
const STREAMS: [&str; 7] = [
    subjects::BLOCK_STREAM,
    subjects::MANIFEST_STREAM,
    subjects::RESULT_STREAM,
    subjects::LEDGER_STREAM,
    subjects::JOB_BUCKET_STREAM,
    subjects::UNSETTLED_STREAM,
    "KV_vmlot-standing",
];

/// One market at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn crd(amount: &str) -> Money {
    Money::new(amount.parse().unwrap(), "CRD")
}

fn synthetic_job(image: Image, account: &str) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 2,
        segments: SegmentCount::Count(4),
        redundancy: 1,
        // Three providers: another one checks each job's last checkpoint.
        check: ResultCheck::Continuation,
        reserve_price: crd("1.00"),
        budget: crd("20"),
        account: account.into(),
    }
}

/// Five jobs of four 2 s segments on three synthetic providers. Once a
/// few segments have settled, the node the most of the market's processes
/// are connected to is SIGKILLed: they must fail over. The market settles more segments
/// without it; `vmlot` (given every URL) still answers; then the node
/// restarts on its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_jobs_finish_across_a_nats_node_killed_and_restarted() {
    let _turn = TURN.lock().await;
    let _timed = Timed::start("synthetic jobs, a node killed");
    let providers: Vec<ProviderSpec> = [("p1", "0.10"), ("p2", "0.11"), ("p3", "0.12")]
        .iter()
        .map(|(name, price)| ProviderSpec {
            slots: 2,
            ..ProviderSpec::synthetic(name, price)
        })
        .collect();
    let mut market = Market::start_on_cluster(NODES, fast_broker_args(), &providers)
        .await
        .unwrap();
    market.ready(providers.len()).await.unwrap();
    assert_replicated(&market).await;
    let image = market
        .push_synthetic_image("synthetic.seed=cluster-test")
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for i in 0..5 {
        jobs.push(
            market
                .submit(synthetic_job(image.clone(), &format!("c{i}")))
                .await,
        );
    }
    let settled_before = wait_for(Duration::from_secs(90), async || {
        let n = settled(&market, &jobs).await;
        (n >= 4).then_some(n)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: jobs not under way\n{}", market.logs()));

    let (victim, clients) = node_with_most_clients(&market);
    let leads = leaderships(&market, &victim).await;
    eprintln!("killing {victim}: clients {clients:?}; leader of {leads:?}");
    assert!(
        clients.iter().any(|c| c != "test"),
        "no process of the market on {victim} to fail over: {clients:?}"
    );
    let acked = Acked::read(&market).await;
    market.node_mut(&victim).kill();

    // The market goes on with two nodes of three.
    wait_for(Duration::from_secs(90), async || {
        (settled(&market, &jobs).await >= settled_before + 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: nothing settled with {victim} down\n{}", market.logs()));
    let out = market.vmlot(&["--json", "status", &jobs[0].to_string()]);
    assert!(
        out.status.success(),
        "vmlot with {victim} down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    market.node_mut(&victim).restart().unwrap();

    for job in &jobs {
        let done = market.wait_final(*job, Duration::from_secs(150)).await;
        assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
        assert_eq!(done.settled.len(), 4);
        assert!(done.check.is_some(), "the last checkpoint was checked: {done:#?}");
        market.assert_paid_once(done.job).await;
    }
    market.assert_books_verify().await;
    acked.assert_kept(&market).await;
    assert_whole_again(&market).await;
}

/// A QEMU job (the test guest, two providers) on the cluster: while its
/// second segment runs, the node that leads the block stream (where that
/// segment's checkpoint goes) is SIGKILLed; the segment's result settles
/// with the node down; the node restarts. The joined console is byte for
/// byte the uninterrupted run's, each segment paid once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_job_prints_its_exact_console_across_a_nats_node_killed_and_restarted() {
    let _turn = TURN.lock().await;
    let reference = reference_console().await;
    let _timed = Timed::start("QEMU job, a node killed");
    let specs = [
        QemuProviderSpec::new("q1", "0.10"),
        QemuProviderSpec::new("q2", "0.20"),
    ];
    // A lost attempt is offered again 4 + 15 s after its award.
    let mut m = VmMarket::start_on_cluster(NODES, 15).await;
    for spec in &specs {
        m.market.add_qemu_provider(spec).unwrap();
    }
    m.market.ready(specs.len()).await.unwrap();
    assert_replicated(&m.market).await;
    let image = m.push_image(&qemu_image(&[]));
    let job = m.submit(&image, SEGMENT_SECONDS, "until-halt", "1");

    let (provider, lot) = m
        .until(job, "segment 1 awarded", |s| {
            s.open_lot
                .as_ref()
                .filter(|o| o.lot.segment == 1 && !o.awarded.is_empty())
                .map(|o| (o.awarded[0].0, o.lot.lot))
        })
        .await;
    let name = &specs.iter().find(|s| s.id == provider.0).unwrap().name;
    let guest = m.market.work_dir(name).join(lot.to_string());
    let needle = guest.display().to_string();
    wait_for(Duration::from_secs(60), async || {
        (!vmlot_tests::market::processes_mentioning(&needle).is_empty()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("QEMU of segment 1 never started: {e}\n{}", m.market.logs()));

    let victim = leader_of(&m.market, subjects::BLOCK_STREAM).await;
    let clients = m.market.clients_on(&victim).unwrap();
    let leads = leaderships(&m.market, &victim).await;
    eprintln!("killing {victim}: clients {clients:?}; leader of {leads:?}");
    let acked = Acked::read(&m.market).await;
    m.market.node_mut(&victim).kill();

    // Segment 1's checkpoint is pushed and its result settles without the node.
    m.until(job, "segment 1 settled with a node down", |s| {
        (s.settled.len() >= 2).then_some(())
    })
    .await;
    let status = m.vmlot_ok(&["--json", "status", &job.to_string()]);
    assert!(!status.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    m.market.node_mut(&victim).restart().unwrap();

    let done = m.wait_final(job).await;
    let logs = m.vmlot_ok(&["logs", &job.to_string()]);
    assert_console_exact(&logs, reference, &done, "vmlot logs");
    m.assert_paid_once(done.job).await;
    m.market.assert_books_verify().await;
    acked.assert_kept(&m.market).await;
    assert_whole_again(&m.market).await;
}

/// Segments settled so far across `jobs`.
async fn settled(market: &Market, jobs: &[JobId]) -> usize {
    let mut n = 0;
    for job in jobs {
        n += market.status(*job).await.settled.len();
    }
    n
}

/// The node the most processes of the market (broker, providers) are
/// connected to now, and who is connected to it.
fn node_with_most_clients(market: &Market) -> (String, Vec<String>) {
    market
        .nodes()
        .map(|n| (n.name().to_string(), market.clients_on(n.name()).unwrap()))
        .max_by_key(|(_, clients)| clients.iter().filter(|c| *c != "test").count())
        .unwrap()
}

/// The server that leads `stream` now.
async fn leader_of(market: &Market, stream: &str) -> String {
    let infos = market.streams().await.unwrap();
    let info = infos.iter().find(|i| i.config.name == stream).unwrap();
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_else(|| panic!("{stream} has no leader: {:#?}", info.cluster))
}

/// The streams `node` leads now.
async fn leaderships(market: &Market, node: &str) -> Vec<String> {
    market
        .streams()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.cluster.as_ref().and_then(|c| c.leader.as_deref()) == Some(node))
        .map(|i| i.config.name)
        .collect()
}

/// Every stream the market keeps is there, configured for a copy on each node.
async fn assert_replicated(market: &Market) {
    let infos = market.streams().await.unwrap();
    let replicas: HashMap<&str, usize> = infos
        .iter()
        .map(|i| (i.config.name.as_str(), i.config.num_replicas))
        .collect();
    for stream in STREAMS {
        assert_eq!(
            replicas.get(stream),
            Some(&NODES),
            "{stream}'s replicas (every stream: {replicas:?})"
        );
    }
    assert!(
        replicas.values().all(|r| *r == NODES),
        "a stream with fewer copies than nodes: {replicas:?}"
    );
}

/// Every stream has its copies again: a leader, and each other node's
/// copy online and current (the restarted node has caught up).
async fn assert_whole_again(market: &Market) {
    assert_replicated(market).await;
    let whole = wait_for(Duration::from_secs(60), async || {
        let infos = market.streams().await.ok()?;
        infos
            .iter()
            .all(|i| {
                i.cluster.as_ref().is_some_and(|c| {
                    c.leader.is_some()
                        && c.replicas.len() == NODES - 1
                        && c.replicas.iter().all(|p| p.current && !p.offline)
                })
            })
            .then_some(())
    })
    .await;
    if whole.is_err() {
        let infos = market.streams().await.unwrap();
        let clusters: Vec<_> = infos.iter().map(|i| (&i.config.name, &i.cluster)).collect();
        panic!("streams not whole on every node again: {clusters:#?}");
    }
}

/// What the servers had acknowledged just before the kill: each kept
/// stream's message count and last sequence, and every message of the
/// books.
struct Acked {
    counts: HashMap<String, (u64, u64)>,
    ledger: Vec<(u64, String, bytes::Bytes)>,
}

impl Acked {
    async fn read(market: &Market) -> Self {
        let counts = stream_marks(market).await;
        Self {
            counts,
            ledger: ledger_messages(&market.server.books_client().await.unwrap(), 1).await,
        }
    }

    /// Nothing of it is missing now, and the books' messages are the same
    /// bytes at the same sequences.
    async fn assert_kept(&self, market: &Market) {
        assert_streams_kept(market, &self.counts, "kill").await;
        let now = ledger_messages(&market.server.books_client().await.unwrap(), 1).await;
        assert!(!self.ledger.is_empty(), "no books written before the kill");
        assert!(now.len() > self.ledger.len(), "no books written after the kill");
        assert!(
            now.starts_with(&self.ledger),
            "the books acknowledged before the kill changed: {} messages then, the first {} now the same",
            self.ledger.len(),
            now.iter().zip(&self.ledger).take_while(|(a, b)| a == b).count()
        );
    }
}
