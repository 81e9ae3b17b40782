//! A power cut (issue 16 step 4): nats-server runs in a QEMU guest with its
//! JetStream store on a virtio disk (`make nats-guest`,
//! `vmlot_tests::nats_guest`), the market runs against it, and the guest
//! is SIGKILLed mid-job, its disk kept, then booted again on it. Every
//! settlement, ledger record and job record the server had acknowledged is
//! there afterwards, and the jobs finish: `sync_interval: always` is why
//! (an acknowledged write is on the guest's disk, not in its page cache),
//! this test is what proves it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use vmlot_schemas::ledger::Settlement;
use vmlot_schemas::market::{Image, JobSpec, JobState, JobStatus, ResultCheck, SegmentCount, SettledSegment};
use vmlot_schemas::{JobId, Money, subjects};
use vmlot_tests::NatsServer;
use vmlot_tests::kept::{assert_streams_kept, ledger_messages, stream_marks};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, payments, wait_for};
use vmlot_tests::vm::Timed;

/// Segments of each job under way at the cut.
const SEGMENTS: u32 = 8;

fn spec(image: Image, account: &str, segments: u32) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 2,
        segments: SegmentCount::Count(segments),
        redundancy: 1,
        // Three providers: payments wait pending until another provider
        // continues the checkpoint, so the books hold pending, posted and
        // (at each job's end) a check restore's records.
        check: ResultCheck::Continuation,
        reserve_price: Money::new("1.00".parse().unwrap(), "CRD"),
        budget: Money::new("20".parse().unwrap(), "CRD"),
        account: account.into(),
    }
}

/// One job done before the cut and three more under way; the guest is
/// SIGKILLed right after the server acknowledged a ledger write, and
/// booted again on its disk. The broker and the providers keep running
/// across the cut (they reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_server_acknowledged_survives_a_power_cut_and_the_jobs_finish() {
    let _timed = Timed::start("power cut");
    let booting = Instant::now();
    let server = NatsServer::start_in_guest().unwrap();
    eprintln!("NATS guest up in {:.1} s", booting.elapsed().as_secs_f64());
    let providers: Vec<ProviderSpec> = [("p1", "0.10"), ("p2", "0.11"), ("p3", "0.12")]
        .iter()
        .map(|(name, price)| ProviderSpec {
            slots: 2,
            ..ProviderSpec::synthetic(name, price)
        })
        .collect();
    let mut market = Market::on(server, fast_broker_args(), &providers).unwrap();
    market.ready(providers.len()).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=powercut")
        .await
        .unwrap();

    // A job that ends (and is refunded) before the cut: its record no
    // longer changes, so after the cut it must be the same bytes at the
    // same revision.
    let short = market.submit(spec(image.clone(), "early", 2)).await;
    let done = market.wait_final(short, Duration::from_secs(90)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    market.wait_refunded(short).await;

    let mut jobs = Vec::new();
    for i in 0..3 {
        jobs.push(
            market
                .submit(spec(image.clone(), &format!("cut{i}"), SEGMENTS))
                .await,
        );
    }
    // Every job under way, some segments settled (and so paid), none done.
    wait_for(Duration::from_secs(90), async || {
        let mut settled = 0;
        for job in &jobs {
            let status = market.status(*job).await;
            if status.settled.is_empty() {
                return None;
            }
            settled += status.settled.len();
        }
        (settled >= 5).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: jobs not under way\n{}", market.logs()));

    let books = market.server.books_client().await.unwrap();
    let all: Vec<JobId> = std::iter::once(short).chain(jobs.iter().copied()).collect();
    let mut acked = Acked::read(&market, &books, &all).await;
    // Cut the power right after the server acknowledged one more ledger
    // write: that record is in the guest's page cache and on its disk only
    // if the server synced it before it answered.
    let fresh = acked.catch_up(&books).await;
    market.server.kill();
    let cut = Instant::now();
    let running = acked
        .records
        .values()
        .filter(|(_, _, s)| !s.state.is_final())
        .count();
    eprintln!(
        "power cut {} ms after ledger message {fresh} was acknowledged: {} ledger messages, \
         {} settlements, {} job records ({running} of them running) acknowledged before it",
        acked.last_write.elapsed().as_millis(),
        acked.ledger.len(),
        acked.settlements.len(),
        acked.records.len(),
    );
    assert_eq!(running, jobs.len(), "jobs ended before the cut");

    market.server.restart().unwrap();
    eprintln!(
        "NATS guest booted again on its disk {:.1} s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert_eq!(market.server.guest_boots(), 2);
    assert_eq!(
        market.server.log().matches("Server is ready").count(),
        2,
        "two boots' nats-server logs on the console:\n{}",
        market.server.log()
    );
    // At once, before the market wrote much: nothing acknowledged is missing.
    acked.assert_kept(&market, &books).await;

    for job in &jobs {
        let done = market.wait_final(*job, Duration::from_secs(150)).await;
        assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
        assert_eq!(done.settled.len(), SEGMENTS as usize);
        assert!(done.check.is_some(), "the last checkpoint was checked: {done:#?}");
        market.assert_paid_once(done.job).await;
    }
    market.assert_paid_once(short).await;
    market.assert_books_verify().await;
    // And at the end: the books only grew, every record only moved on.
    acked.assert_kept(&market, &books).await;
    // The cut was the server's alone: nothing of the market was restarted.
    assert!(!market.broker.exited(), "the broker died\n{}", market.logs());
    for p in &mut market.providers {
        assert!(!p.exited(), "provider {} died", p.name());
    }
}

/// What the server had acknowledged before the cut.
struct Acked {
    /// Every message of the books (sequence, subject, payload).
    ledger: Vec<(u64, String, Bytes)>,
    /// The settlements (payments) of the jobs.
    settlements: Vec<Settlement>,
    /// Each job's record: its revision, its bytes, and what they say.
    records: HashMap<JobId, (u64, Bytes, JobStatus)>,
    /// Each kept stream's message count and last sequence.
    counts: HashMap<String, (u64, u64)>,
    /// When the newest ledger message was read back (acknowledged before).
    last_write: Instant,
}

impl Acked {
    async fn read(market: &Market, books: &async_nats::Client, jobs: &[JobId]) -> Self {
        let counts = stream_marks(market).await;
        let market_nats = market.api().await.nats().clone();
        let mut settlements = Vec::new();
        for job in jobs {
            settlements.extend(payments(&market_nats, *job).await);
        }
        let mut records = HashMap::new();
        for job in jobs {
            records.insert(*job, record(books, *job).await);
        }
        let ledger = ledger_messages(books, 1).await;
        assert!(!ledger.is_empty(), "no books written before the cut");
        assert!(!settlements.is_empty(), "nothing paid before the cut");
        Self {
            ledger,
            settlements,
            records,
            counts,
            last_write: Instant::now(),
        }
    }

    /// Waits for the next ledger message the market writes and adds the
    /// new ones; the newest one's sequence.
    async fn catch_up(&mut self, books: &async_nats::Client) -> u64 {
        let known = self.ledger.last().map_or(0, |(seq, _, _)| *seq);
        let js = jetstream::new(books.clone());
        let mut stream = js.get_stream(subjects::LEDGER_STREAM).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = stream.info().await.unwrap().state.last_sequence;
            if last > known {
                break;
            }
            assert!(Instant::now() < deadline, "no ledger write for 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.ledger.extend(ledger_messages(books, known + 1).await);
        self.last_write = Instant::now();
        self.ledger.last().unwrap().0
    }

    /// Nothing of it is missing or changed now: the books' messages are
    /// the same bytes at the same sequences, every settlement is there as
    /// it was, no stream holds less, and each job's record is the same
    /// revision and bytes or a later revision that only moved on (its
    /// settled segments the same, more perhaps; a job that had ended,
    /// untouched).
    async fn assert_kept(&self, market: &Market, books: &async_nats::Client) {
        let now = ledger_messages(books, 1).await;
        assert!(
            now.starts_with(&self.ledger),
            "the books acknowledged before the cut changed: {} messages then (to sequence {}), \
             now {} (to {}), the first {} the same",
            self.ledger.len(),
            self.ledger.last().unwrap().0,
            now.len(),
            now.last().map_or(0, |m| m.0),
            now.iter().zip(&self.ledger).take_while(|(a, b)| a == b).count()
        );

        let market_nats = market.api().await.nats().clone();
        let mut paid: Vec<Settlement> = Vec::new();
        for job in self.records.keys() {
            paid.extend(payments(&market_nats, *job).await);
        }
        for settlement in &self.settlements {
            assert!(
                paid.contains(settlement),
                "settlement of job {} segment {} acknowledged before the cut is gone or changed: \
                 {settlement:#?}\nnow: {paid:#?}",
                settlement.job,
                settlement.segment
            );
        }

        assert_streams_kept(market, &self.counts, "cut").await;

        for (job, (revision, bytes, then)) in &self.records {
            let (now_revision, now_bytes, now) = record(books, *job).await;
            assert!(
                now_revision >= *revision,
                "job {job}'s record went back from revision {revision} to {now_revision}:\n\
                 then {then:#?}\nnow {now:#?}"
            );
            if now_revision == *revision || then.state.is_final() {
                assert_eq!(
                    (now_revision, &now_bytes),
                    (*revision, bytes),
                    "job {job}'s record, acknowledged before the cut, changed"
                );
                continue;
            }
            // A settled segment stays as it was, except that its payment,
            // pending then, may have been posted since.
            let moved_on = then.settled.len() <= now.settled.len()
                && then.settled.iter().zip(&now.settled).all(|(a, b)| {
                    (a.posted <= b.posted)
                        && SettledSegment {
                            posted: b.posted,
                            ..a.clone()
                        } == *b
                });
            assert!(
                moved_on,
                "job {job} lost or changed settled segments:\nthen {:#?}\nnow {:#?}",
                then.settled, now.settled
            );
            assert_eq!(
                (&now.spec, now.created_at),
                (&then.spec, then.created_at),
                "job {job}'s record is another's"
            );
            assert!(now.spent.amount >= then.spent.amount, "job {job} spent less");
        }
    }
}

/// A job's record in the books' KV bucket: its revision, bytes and content.
async fn record(books: &async_nats::Client, job: JobId) -> (u64, Bytes, JobStatus) {
    let js = jetstream::new(books.clone());
    let kv = js
        .get_key_value(subjects::JOB_BUCKET)
        .await
        .unwrap_or_else(|e| panic!("the job records' bucket {}: {e}", subjects::JOB_BUCKET));
    let entry = kv
        .entry(job.to_string())
        .await
        .unwrap_or_else(|e| panic!("job {job}'s record: {e}"))
        .unwrap_or_else(|| panic!("no record of job {job}"));
    let status: JobStatus = serde_json::from_slice(&entry.value)
        .unwrap_or_else(|e| panic!("job {job}'s record does not decode: {e}"));
    (entry.revision, entry.value, status)
}
