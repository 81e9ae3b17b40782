//! More than one broker (issue 16 step 2): brokers share the jobs'
//! partitions by leases in the KV bucket `vmlot-leases`; when one dies,
//! the others take its partitions once its leases lapse and resume its
//! jobs from their records, found through the index of unsettled jobs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use vmlot_schemas::market::{Image, JobSpec, JobState, ResultCheck, SegmentCount, SettledSegment};
use vmlot_schemas::subjects::{self, LEASE_BUCKET, PARTITIONS, partition_of};
use vmlot_schemas::{JobId, Money};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, job_record, wait_for};

fn spec(image: Image, segments: u32) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 1,
        segments: SegmentCount::Count(segments),
        redundancy: 1,
        check: ResultCheck::None,
        reserve_price: Money::new("1".parse().unwrap(), "CRD"),
        budget: Money::new("20".parse().unwrap(), "CRD"),
        account: "alice".into(),
    }
}

/// What a daemon's Prometheus endpoint at `addr` serves now (a plain
/// HTTP/1.0 GET, as a scraper or `curl` makes it).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics endpoint {addr}: {e}"));
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    reply
}

/// The value of the series `line_start` (name and labels) in `metrics`.
fn value(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Who holds each partition now, from the lease bucket.
async fn holders(market: &Market) -> HashMap<u16, String> {
    let books = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let Ok(kv) = books.get_key_value(LEASE_BUCKET).await else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    let mut keys = kv.keys().await.unwrap();
    while let Some(Ok(key)) = keys.next().await {
        if let Some(p) = key.strip_prefix("partition.").and_then(|p| p.parse().ok())
            && let Ok(Some(value)) = kv.get(&key).await
        {
            out.insert(p, String::from_utf8_lossy(&value).into_owned());
        }
    }
    out
}

fn count(holders: &HashMap<u16, String>, id: &str) -> usize {
    holders.values().filter(|h| *h == id).count()
}

/// A market of broker b1 and two synthetic providers.
fn b1_and_two_providers() -> Market {
    let providers: Vec<ProviderSpec> = (0..2)
        .map(|i| ProviderSpec::synthetic(&format!("p{i}"), "0.10"))
        .collect();
    Market::start(
        [fast_broker_args(), vec!["--broker-id".into(), "b1".into()]].concat(),
        &providers,
    )
    .unwrap()
}

/// Waits until the first broker's log has `line` in it.
async fn b1_logged(market: &Market, line: &str, limit_s: u64) {
    wait_for(Duration::from_secs(limit_s), async || {
        market.broker.log().contains(line).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "b1 never logged {line:?}: {e}; b1 is {}, CPU {:?} s\n{}",
            market.broker.state(),
            market.broker.cpu_seconds(),
            market.logs()
        )
    });
}

/// Waits until broker `id` holds every partition.
async fn holding_all(market: &Market, id: &str, limit: Duration) {
    wait_for(limit, async || {
        (count(&holders(market).await, id) == PARTITIONS as usize).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{id} holds every partition: {e}\n{}", market.logs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_brokers_jobs_are_taken_over_by_another_within_seconds() {
    let p0_metrics = format!("127.0.0.1:{}", vmlot_tests::free_port());
    let providers: Vec<ProviderSpec> = (0..3)
        .map(|i| ProviderSpec {
            args: if i == 0 {
                vec!["--metrics-listen".into(), p0_metrics.clone()]
            } else {
                Vec::new()
            },
            ..ProviderSpec::synthetic(&format!("p{i}"), "0.10")
        })
        .collect();
    let mut market = Market::start(
        [fast_broker_args(), vec!["--broker-id".into(), "b1".into()]].concat(),
        &providers,
    )
    .unwrap();
    market.ready(3).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=brokers")
        .await
        .unwrap();

    // Alone, b1 holds every partition; with b2 started they split evenly.
    holding_all(&market, "b1", Duration::from_secs(20)).await;
    let b2_metrics = format!("127.0.0.1:{}", vmlot_tests::free_port());
    market
        .add_broker("b2", &["--metrics-listen".into(), b2_metrics.clone()])
        .unwrap();
    let split = wait_for(Duration::from_secs(40), async || {
        let h = holders(&market).await;
        (count(&h, "b1") == PARTITIONS as usize / 2 && count(&h, "b2") == PARTITIONS as usize / 2)
            .then_some(h)
    })
    .await
    .unwrap_or_else(|e| panic!("the partitions split between b1 and b2: {e}\n{}", market.logs()));

    // Jobs of both (each broker gives a submission it serves an id in its
    // own partitions; NATS spreads the requests), long enough to be under
    // way when b1 dies.
    let mut jobs: Vec<JobId> = Vec::new();
    let of = |jobs: &[JobId], id: &str| -> Vec<JobId> {
        jobs.iter()
            .copied()
            .filter(|j| split.get(&partition_of(j)).is_some_and(|h| h == id))
            .collect()
    };
    while jobs.len() < 16 && (of(&jobs, "b1").len() < 2 || of(&jobs, "b2").len() < 2) {
        jobs.push(market.submit(spec(image.clone(), 12)).await);
    }
    let of_b1 = of(&jobs, "b1");
    assert!(
        of_b1.len() >= 2 && of(&jobs, "b2").len() >= 2,
        "both brokers serve submissions: {jobs:?} over {split:?}"
    );
    // Every job has settled a segment: both brokers run theirs.
    for job in &jobs {
        wait_for(Duration::from_secs(60), async || {
            (!market.status(*job).await.settled.is_empty()).then_some(())
        })
        .await
        .unwrap();
    }

    market.broker.kill();
    let killed = Instant::now();
    let before: HashMap<JobId, usize> = {
        let mut m = HashMap::new();
        for job in &of_b1 {
            m.insert(*job, market.status(*job).await.settled.len());
        }
        m
    };
    // b2 holds every partition within seconds of b1's leases lapsing...
    holding_all(&market, "b2", Duration::from_secs(20)).await;
    let taken = killed.elapsed();
    // ...and b1's jobs go on under b2.
    for job in &of_b1 {
        wait_for(Duration::from_secs(30), async || {
            let s = market.status(*job).await;
            (s.state.is_final() || s.settled.len() > before[job]).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("job {job} moved on under b2: {e}\n{}", market.logs()));
    }
    eprintln!(
        "b1 killed holding {} partitions and {} of {} jobs; b2 held every partition {:.1} s later",
        PARTITIONS / 2,
        of_b1.len(),
        jobs.len(),
        taken.as_secs_f64()
    );
    for job in &jobs {
        let done = market.wait_final(*job, Duration::from_secs(120)).await;
        assert_eq!(done.state, JobState::Done, "{done:#?}");
        assert_eq!(done.settled.len(), 12);
        market.assert_paid_once(done.job).await;
    }
    market.assert_books_verify().await;

    // What an operator watching b2 saw (issue 16 step 5): every job it ran,
    // the lots, bids, awards, settlements and payments behind them, how
    // long settling took, and what it refused.
    let metrics = scrape(&b2_metrics);
    for series in [
        "vmlot_broker_jobs_submitted_total",
        "vmlot_broker_jobs_running",
        "vmlot_broker_jobs_ended_total{state=\"done\"}",
        "vmlot_broker_lots_offered_total",
        "vmlot_broker_bids_total",
        "vmlot_broker_awards_total",
        "vmlot_broker_segments_settled_total{partial=\"no\"}",
        "vmlot_broker_settle_seconds_bucket",
        "vmlot_broker_settle_seconds_count",
        "vmlot_broker_segment_phase_seconds_bucket{phase=\"run\"",
        "vmlot_broker_fetched_bytes_total",
        "vmlot_broker_sent_bytes_total",
        "vmlot_broker_payments_total{kind=\"settle\"}",
        "vmlot_broker_payments_total{kind=\"refund\"}",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(series)),
            "{series} is not in b2's metrics:\n{metrics}"
        );
    }
    // And one provider's: what it saw, bid, won and ran.
    let metrics = scrape(&p0_metrics);
    for series in [
        "vmlot_provider_lots_seen_total",
        "vmlot_provider_bids_total",
        "vmlot_provider_awards_total{taken=\"yes\"}",
        "vmlot_provider_segments_total{end=\"running\"}",
        "vmlot_provider_segment_phase_seconds_bucket{phase=\"fetch\"",
        "vmlot_provider_fetched_bytes_total",
        "vmlot_provider_sent_bytes_total",
        "vmlot_provider_slots_busy",
        "vmlot_provider_owner_idle",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(series)),
            "{series} is not in p0's metrics:\n{metrics}"
        );
    }
    assert_eq!(
        value(&metrics, "vmlot_provider_slots_busy"),
        Some(0.0),
        "{metrics}"
    );
    let metrics = scrape(&b2_metrics);
    // b2 settled at least b1's unfinished segments and all of its own.
    let settled = value(&metrics, "vmlot_broker_segments_settled_total{partial=\"no\"}").unwrap();
    assert!(
        settled >= 12.0 * (jobs.len() - of_b1.len()) as f64,
        "{settled}\n{metrics}"
    );
    assert_eq!(
        value(&metrics, "vmlot_broker_jobs_running"),
        Some(0.0),
        "{metrics}"
    );
}

/// A broker that stalls past its lease in the middle of settling a
/// segment (its task deaf to the partition's loss, as one stuck in a
/// request to a lost NATS node is), while another broker takes the job
/// over and settles the segment under a new attempt, pays nothing for it
/// when it wakes: the job's record, not the attempt's number, fences the
/// payment (the chaos run found two payments for one segment this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stalled_past_its_lease_pays_nothing_for_a_segment_settled_since() {
    let mut market = b1_and_two_providers();
    market
        .broker
        .set_env("VMLOT_FAULT", Some("stall-before-settlement"));
    market.broker.restart().unwrap();
    market.ready(2).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=stalled-broker")
        .await
        .unwrap();
    holding_all(&market, "b1", Duration::from_secs(20)).await;
    let job = market.submit(spec(image, 3)).await;

    // b1 checks the first segment's result, and stalls before settling it.
    b1_logged(&market, "fault injected: stalling before settlement", 60).await;
    market.broker.freeze();
    market.add_broker("b2", &[]).unwrap();
    // b2 takes b1's partitions once its leases lapse, and settles the
    // segment itself: b1's attempt is past its deadline, so a new one.
    holding_all(&market, "b2", Duration::from_secs(30)).await;
    let books = market.server.books_client().await.unwrap();
    let first = wait_for(Duration::from_secs(30), async || {
        job_record(&books, job).await.unwrap().settled.first().cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("b2 settled segment 0: {e}\n{}", market.logs()));
    assert!(first.attempt > 1, "{first:#?}");

    // b1 wakes, finds the attempt it held closed in the job's record, and
    // pays nothing.
    market.broker.thaw();
    b1_logged(
        &market,
        "the attempt is no longer open in the job's record; not paid",
        30,
    )
    .await;
    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}");
    assert_eq!(done.settled.len(), 3);
    // Its payment was pending when first read (posted once the next
    // segment's provider restored its checkpoint); all else stays.
    let first = SettledSegment {
        posted: true,
        ..first
    };
    assert_eq!(done.settled[0], first, "segment 0 stays as b2 settled it");
    market.assert_paid_once(done.job).await;
    market.assert_books_verify().await;
}

/// The jobs the index of unsettled jobs names now, and whether it says it
/// holds every one (none when there is no index).
async fn indexed(market: &Market) -> Option<(Vec<JobId>, bool)> {
    let books = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let stream = books.get_stream(subjects::UNSETTLED_STREAM).await.ok()?;
    let listed: Vec<(String, usize)> = stream
        .info_with_subjects(subjects::UNSETTLED_SUBJECTS)
        .await
        .unwrap()
        .map(|s| s.unwrap())
        .collect()
        .await;
    let complete = listed.iter().any(|(s, _)| s == subjects::UNSETTLED_INDEXED);
    let mut jobs: Vec<JobId> = listed
        .iter()
        .filter_map(|(s, _)| subjects::unsettled_job(s).map(|(_, job)| job))
        .collect();
    // (A listing in pages may name an entry twice.)
    jobs.sort();
    jobs.dedup();
    Some((jobs, complete))
}

/// A broker finds the jobs it must run (after a restart, on taking a
/// partition, on its rescans) through the index of unsettled jobs, never
/// by reading every job record ever written: a settled job leaves the
/// index, a restarted broker resumes a running job found there, job
/// records older than the index are indexed from once, and an entry left
/// behind for a settled job is purged by the next rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_finds_its_jobs_through_the_index_of_unsettled_jobs() {
    let mut market = b1_and_two_providers();
    market.ready(2).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=unsettled-index")
        .await
        .unwrap();
    let short = market.submit(spec(image.clone(), 2)).await;
    let long = market.submit(spec(image, 15)).await;
    let indexed_now = indexed(&market).await.expect("the index exists");
    assert!(
        indexed_now.1,
        "a new market's index holds every job: {indexed_now:?}"
    );

    // The short job settles and leaves the index; the long one is in it.
    market.wait_refunded(short).await;
    let only_long = wait_for(Duration::from_secs(10), async || {
        (indexed(&market).await? == (vec![long], true)).then_some(())
    })
    .await;
    if let Err(e) = only_long {
        let now = indexed(&market).await;
        panic!("only the running job indexed: {e}: {now:?}\n{}", market.logs());
    }

    // The broker dies while the long job runs, and its index with it: the
    // records are now as an earlier version left them.
    market.broker.kill();
    let books_client = market.server.books_client().await.unwrap();
    let before = job_record(&books_client, long).await.unwrap().settled.len();
    let books = async_nats::jetstream::new(books_client);
    books.delete_stream(subjects::UNSETTLED_STREAM).await.unwrap();
    market.broker.restart().unwrap();
    // Its log goes on from before: once at the first start (nothing to
    // index), once now.
    wait_for(Duration::from_secs(30), async || {
        (market.broker.log().matches("unsettled jobs indexed").count() == 2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("indexed again at the restart: {e}\n{}", market.logs()));
    // (Most of its fifteen segments are still to run.)
    let refilled = indexed(&market).await.expect("the index again");
    assert_eq!(
        refilled,
        (vec![long], true),
        "the running job, and it alone, indexed from the records"
    );
    // The restarted broker goes on with it.
    wait_for(Duration::from_secs(30), async || {
        let s = market.status(long).await;
        (s.state.is_final() || s.settled.len() > before).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the long job moved on after the restart: {e}\n{}", market.logs()));

    // An entry left behind for a settled job goes at the next rescan; one
    // whose job has no record yet (a submission between its two writes)
    // stays through it.
    let unborn = JobId::new();
    for job in [short, unborn] {
        books
            .publish(subjects::unsettled_entry(&job), bytes::Bytes::new())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for(Duration::from_secs(40), async || {
        (!indexed(&market).await?.0.contains(&short)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the stale entry purged: {e}\n{}", market.logs()));
    let kept = indexed(&market).await.unwrap();
    assert!(
        kept.0.contains(&unborn),
        "a young entry without a record kept: {kept:?}"
    );

    let done = market.wait_final(long, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}");
    assert_eq!(done.settled.len(), 15);
    market.wait_refunded(long).await;
    let emptied = wait_for(Duration::from_secs(10), async || {
        (indexed(&market).await? == (vec![unborn], true)).then_some(())
    })
    .await;
    if let Err(e) = emptied {
        let now = indexed(&market).await;
        panic!("nothing but the young entry indexed once settled: {e}: {now:?}");
    }
    market.assert_paid_once(long).await;
    market.assert_books_verify().await;
}
