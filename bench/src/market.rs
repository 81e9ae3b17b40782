//! Market throughput: settled segments per second with the synthetic driver
//! (zero-length segments, a stand-in, never a VM), many providers as tasks
//! in this process, the broker as its own process (so its memory can be
//! read), against the acknowledged-publish rate of the same JetStream
//! server measured in the same run. The whole run is made twice, on a
//! server with the deployment's accounts, credentials and TLS (how vmlot
//! runs) and on one with none of them (`--open`), and the two are set side
//! by side: what security costs.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::message::OutboundMessage;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use rust_decimal::Decimal;
use vmlot_schemas::ledger::TxKind;
use vmlot_schemas::market::{JobSpec, ResultCheck, SegmentCount};
use vmlot_schemas::{Money, subjects};
use vmlot_tests::in_process::InProcessOptions;
use vmlot_tests::market::{Market, ProviderSpec};
use vmlot_tests::{Auth, Fsync, NatsServer};

/// One market run's load: the providers, the jobs and how they are run
/// (shared by `market` and `brokers`).
#[derive(clap::Args)]
pub struct Load {
    #[arg(long, default_value_t = 200)]
    pub providers: usize,
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    #[arg(long, default_value_t = 2)]
    pub segments: u32,
    #[arg(long, default_value_t = 200)]
    pub bid_window_ms: u64,
    /// How each job's results are checked (`vmlot submit --check`):
    /// `continuation` adds a check restore per job, `quorum` runs each
    /// segment on two providers.
    #[arg(long, default_value = "continuation", value_parser = parse_check)]
    pub check: ResultCheck,
    /// The broker's `--trust-after` (adaptive replication of quorum
    /// attempts; 0 replicates every one); the broker's default when unset.
    #[arg(long)]
    pub trust_after: Option<u64>,
    /// User accounts the jobs are submitted from, in turn, each funded and
    /// with its own connection. One account's holds are written one after
    /// another (each a compare-and-set on its balance), so with one
    /// submitter the submissions bound the run; a market has many.
    #[arg(long, default_value_t = 1)]
    pub submitters: usize,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    load: Load,
    /// Secured and open runs each, alternating (secured first): one pair
    /// on a shared 2-core machine says little, the median of a few does.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn parse_check(s: &str) -> Result<ResultCheck, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown check {s:?}: none, continuation or quorum"))
}

/// Lots each job settles: its segments, and its check restore when
/// checked by continuation (under a quorum, only a job whose last segment
/// went unreplicated has one: counted after the run).
fn lots_per_job(args: &Load) -> usize {
    args.segments as usize + usize::from(args.check == ResultCheck::Continuation)
}

/// Providers running each segment.
fn redundancy(args: &Load) -> u32 {
    if args.check == ResultCheck::Quorum { 2 } else { 1 }
}

/// The run's set-up in one line, printed first.
pub fn describe(args: &Load) {
    println!(
        "nats-server with sync_interval: always; {} providers, {} jobs from {} account(s) × {} segments of 0 s, r = {}, check {:?}, bid window {} ms",
        args.providers,
        args.jobs,
        args.submitters.max(1),
        args.segments,
        redundancy(args),
        args.check,
        args.bid_window_ms
    );
}

pub async fn run(args: Args) -> Result<()> {
    describe(&args.load);
    let (mut secured, mut open) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        println!("\n## Round {round}, secured: operator, accounts and users (JWT, nkeys), TLS\n");
        secured.push(run_once(&args.load, Auth::Secured, 1).await?);
        println!("\n## Round {round}, open: no accounts, no credentials, no TLS (--open)\n");
        open.push(run_once(&args.load, Auth::Open, 1).await?);
    }
    println!(
        "\n## Secured against open, same run: medians of {} rounds each\n",
        secured.len()
    );
    println!("| | secured | open | secured / open | per round, secured / open |");
    println!("|---|---|---|---|---|");
    let rows: [Row; 9] = [
        (
            "JetStream acked publishes, pipelined, msg/s",
            |o| o.ceiling_pipelined,
            0,
        ),
        (
            "JetStream acked publishes, one at a time, msg/s",
            |o| o.ceiling_sequential,
            0,
        ),
        (
            "JetStream atomic batches of 3, 16 in flight, batches/s",
            |o| o.batch_ceiling,
            0,
        ),
        ("settled segments/s", |o| o.rate, 1),
        (
            "% of the atomic-batch bound (batches/s over ledger batches per lot)",
            |o| 100.0 * o.rate * o.batches_per_lot / o.batch_ceiling,
            1,
        ),
        ("settle latency p50, ms", |o| o.p50_ms, 0),
        ("settle latency p99, ms", |o| o.p99_ms, 0),
        (
            "nats-server CPU µs per settled segment",
            |o| o.server_us_per_segment,
            0,
        ),
        (
            "broker CPU µs per settled segment",
            |o| o.broker_us_per_segment,
            0,
        ),
    ];
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    for (name, value, digits) in rows {
        let (a, b) = (median(secured.iter().map(value)), median(open.iter().map(value)));
        let rounds: Vec<String> = secured
            .iter()
            .zip(&open)
            .map(|(s, o)| format!("{:.2}", ratio(value(s), value(o))))
            .collect();
        println!(
            "| {name} | {a:.digits$} | {b:.digits$} | {:.2} | {} |",
            ratio(a, b),
            rounds.join(", ")
        );
    }
    Ok(())
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A line of the side-by-side table: its name, what it reads, decimals.
type Row = (&'static str, fn(&Outcome) -> f64, usize);

/// What one run measured, for the side-by-side table.
pub struct Outcome {
    pub ceiling_pipelined: f64,
    pub ceiling_sequential: f64,
    /// Atomic batches of three messages committed per second into one
    /// stream, 16 in flight ([`batch_ceiling`]).
    pub batch_ceiling: f64,
    /// Ledger transactions per settled lot: each one atomic batch into
    /// the one ledger stream.
    pub batches_per_lot: f64,
    /// Settled lots per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub server_us_per_segment: f64,
    /// Summed over every broker of the run.
    pub broker_us_per_segment: f64,
}

/// One run on a fresh server: its JetStream ceiling, then `brokers`
/// brokers (`b1`, `b2`, …) sharing the jobs, waited for until they have
/// split the partitions evenly, then the providers and the jobs.
pub async fn run_once(args: &Load, auth: Auth, brokers: usize) -> Result<Outcome> {
    let server = NatsServer::start_as(Fsync::Always, auth)?;
    let client = server.client().await?;

    let (ceiling_pipelined, ceiling_sequential) = ack_ceiling(&client).await?;
    println!(
        "JetStream acknowledged publishes, 256 B: pipelined {ceiling_pipelined:.0} msg/s, one at a time {ceiling_sequential:.0} msg/s"
    );
    let (batch_ceiling, batch_sequential) = batch_ceiling(&client).await?;
    println!(
        "JetStream atomic batches of 3 × 256 B into one stream: {batch_ceiling:.0} batches/s with 16 in flight, {batch_sequential:.0} one at a time"
    );

    // The market harness the tests use: the broker as its own process (so
    // its memory can be read), the providers as tasks of this process.
    let mut broker_args: Vec<String> = vec![
        "--bid-window-ms".into(),
        args.bid_window_ms.to_string(),
        "--transfer-allowance-s".into(),
        "30".into(),
        // One submitter sends every job: the per-account quotas are raised
        // to the benchmark's size.
        "--max-jobs-in-flight".into(),
        args.jobs.to_string(),
        "--max-requests-per-second".into(),
        "100000".into(),
        // Named, so the lease bucket says which broker holds what
        // (`Market::add_broker` names the others).
        "--broker-id".into(),
        "b1".into(),
    ];
    if let Some(n) = args.trust_after {
        broker_args.extend(["--trust-after".into(), n.to_string()]);
    }
    let mut market = Market::on(server, broker_args, &[])?;
    // Every broker up and the partitions split before any job exists.
    let split = crate::brokers::start_and_split(&mut market, brokers).await?;
    let api = market.api().await;
    let providers: Vec<ProviderSpec> = (0..args.providers)
        .map(|i| {
            ProviderSpec::synthetic(
                &format!("p{i:03}"),
                &Decimal::new(10 + (i as i64 % 50), 2).to_string(),
            )
        })
        .collect();
    market
        .add_in_process_providers(&providers, &InProcessOptions::default())
        .await?;
    // Wait for every provider to be listed.
    market
        .ready_within(args.providers, Duration::from_secs(60))
        .await?;
    // 64 KiB of state: the market's own cost is what is measured here,
    // not hashing big states (bench-cas measures that).
    let image = market
        .push_synthetic_image("synthetic.seed=bench synthetic.state_kib=64")
        .await?;
    // The submitters fund their jobs: with one, its account is the busiest
    // on the books.
    let names = submitter_names(args.submitters);
    let per_submitter = args.jobs.div_ceil(names.len()) as u64;
    let mut submitters = Vec::new();
    for name in &names {
        vmlot_tests::market::fund(&api, name, &(per_submitter * 100).to_string()).await?;
        // A submission waits up to a minute: the server stalls for seconds
        // when 200 providers store their first checkpoints at once, and a
        // submission that waits through it is slow, not lost (its time is
        // in the run's rate).
        let api = market.submitter(name).await.with_timeout(Duration::from_secs(60));
        submitters.push((api, name.clone()));
    }
    let limit = Duration::from_secs(600);
    let expected = (args.jobs * lots_per_job(args)) as u64;
    // The counter is made before the clock starts, so that only the
    // market is timed. The house's view of the books, inside their own
    // account.
    let counter_made = Instant::now();
    let js = jetstream::new(market.server.books_client().await?);
    // Progress from the number of settlement transactions on the books, as
    // a consumer that is never pulled from counts them (`num_pending`):
    // cheap, unlike listing every job. (The ledger stream's whole message
    // count also holds the credit, the holds and every posting.)
    let mut settlements = js
        .get_stream(subjects::LEDGER_STREAM)
        .await?
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: subjects::ledger_tx_kind(TxKind::Settlement),
            inactive_threshold: limit * 2,
            ..Default::default()
        })
        .await?;
    if counter_made.elapsed() > Duration::from_secs(1) {
        println!(
            "note: the settlement counter took {:.1} s to make",
            counter_made.elapsed().as_secs_f64()
        );
    }
    let market_js = jetstream::new(client.clone());
    let stored_before = stored(&[&market_js, &js]).await?;
    let ledger_before = js
        .get_stream(subjects::LEDGER_STREAM)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let cpu_before = Cpu::now(&market);
    let started = Instant::now();
    // Submitted 16 at a time, as many clients would (one account's holds
    // are written one after another: more at once only wait longer, and
    // 64 into one account waited past the request timeout on a slow day;
    // 64 spread over 50 accounts did too, on 2026-12-05).
    let spec = JobSpec {
        image: image.clone(),
        segment_seconds: 0,
        segments: SegmentCount::Count(args.segments),
        redundancy: redundancy(args),
        check: args.check,
        reserve_price: Money::new(Decimal::ONE, "CRD"),
        budget: Money::new(Decimal::from(100), "CRD"),
        account: "bench".into(),
    };
    let submissions = futures::stream::iter(0..args.jobs)
        .map(|i| {
            let (api, account) = submitters[i % submitters.len()].clone();
            let spec = JobSpec {
                account,
                ..spec.clone()
            };
            async move {
                let submitted = api.submit(spec).await.context("submit")?;
                anyhow::Ok(submitted.job)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let jobs = submissions.into_iter().collect::<Result<Vec<_>>>()?;
    let submitted_s = started.elapsed().as_secs_f64();
    let peak_rss = peak_rss_kib(&market);
    let mut last_report = Instant::now();
    loop {
        let paid = settlements.info().await?.num_pending;
        if paid >= expected {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{:.0} s: {paid} of {expected} lots paid",
                started.elapsed().as_secs_f64(),
            );
            last_report = Instant::now();
        }
        if started.elapsed() > limit {
            bail!("jobs not done after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = Cpu::now(&market).since(&cpu_before);
    let stored_after = stored(&[&market_js, &js]).await?;
    let (transactions_run, batches_run) = ledger_batches(&js, ledger_before + 1).await?;
    let broker_rss = peak_rss_kib(&market).max(peak_rss);
    // Listing reads every job record one by one: at 10 000 jobs it can
    // outlast the request timeout, and it is only a note. Under a quorum,
    // adaptive replication gives an unreplicated last segment a check
    // restore: its jobs are waited for to the end, and counted.
    let mut checks = 0;
    loop {
        match api.list().await {
            Ok(list) => {
                let not_ended = list.iter().filter(|s| !s.state.is_final()).count();
                if not_ended > 0 && args.check == ResultCheck::Quorum && started.elapsed() < limit {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                if not_ended > 0 {
                    println!("note: {not_ended} jobs still closing when the last segment was paid");
                }
                if args.check == ResultCheck::Quorum {
                    let segments: Vec<_> = list.iter().flat_map(|s| &s.settled).collect();
                    let alone = segments.iter().filter(|s| s.unreplicated).count();
                    checks = list.iter().filter(|s| s.check.is_some()).count();
                    println!(
                        "quorum: {} of {} segments replicated, {alone} left to one trusted provider (adaptive replication); {checks} check restores",
                        segments.len() - alone,
                        segments.len()
                    );
                }
            }
            Err(vmlot_client::CallError::Refused(e)) => println!("note: job list refused: {}", e.message),
            Err(e) => println!("note: job list not read ({:#})", anyhow::Error::from(e)),
        }
        break;
    }
    // Under a quorum the run ends when the last job has (its checks included).
    let (wall, cpu) = if args.check == ResultCheck::Quorum {
        (
            started.elapsed().as_secs_f64(),
            Cpu::now(&market).since(&cpu_before),
        )
    } else {
        (wall, cpu)
    };
    let payments =
        vmlot_ledger::read::settlements(&vmlot_ledger::BooksApi::for_server(client.clone()).await).await?;
    let settled = payments.len();
    let mut latencies: Vec<f64> = payments
        .iter()
        .map(|p| (p.at - p.finished_at).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let rate = settled as f64 / wall;
    println!(
        "submitted {} jobs in {submitted_s:.1} s; all ended after {wall:.1} s",
        args.jobs
    );
    println!("settled lots (segments and check restores): {settled} ({rate:.1}/s)");
    println!(
        "ratio to pipelined acked publishes: {:.4}; to one-at-a-time acked publishes: {:.3}",
        rate / ceiling_pipelined,
        rate / ceiling_sequential
    );
    println!(
        "settle latency (result published → payment recorded): p50 {:.0} ms, p99 {:.0} ms",
        pct(0.5),
        pct(0.99)
    );
    // What bounds the rate: each settled lot costs the server this many
    // durable writes, and it makes at most its pipelined ceiling of them.
    let writes: Vec<(String, u64)> = stored_after
        .iter()
        .map(|(name, after)| {
            (
                name.clone(),
                after - stored_before.get(name).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let per_lot = writes.iter().map(|(_, n)| *n).sum::<u64>() as f64 / settled.max(1) as f64;
    let mut by_stream = writes.clone();
    by_stream.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    println!(
        "stored messages (durable writes) per settled lot: {per_lot:.1} ({}); at the pipelined ceiling that allows {:.0} lots/s, of which this run made {:.1} %",
        by_stream
            .iter()
            .map(|(name, n)| format!("{name} {:.2}", *n as f64 / settled.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", "),
        ceiling_pipelined / per_lot,
        100.0 * rate * per_lot / ceiling_pipelined
    );
    // What the profile shows bounds it (BENCHMARKS.md, 2026-12-06): every
    // ledger transaction is an atomic batch, and nats-server commits a
    // single-replica file stream's batches one after another, each
    // through a temporary store of its own made, fsynced and removed.
    let batches_per_lot = batches_run as f64 / settled.max(1) as f64;
    println!(
        "ledger transactions per settled lot: {:.2}, in {batches_per_lot:.2} atomic batches into the one ledger stream; at the atomic-batch rate above that allows {:.0} lots/s, of which this run made {:.1} %",
        transactions_run as f64 / settled.max(1) as f64,
        batch_ceiling / batches_per_lot,
        100.0 * rate * batches_per_lot / batch_ceiling
    );
    if brokers > 1 {
        crate::brokers::report_split(&mut market, &split, &jobs).await?;
    }
    println!("broker peak RSS (VmHWM): {:.1} MiB", broker_rss as f64 / 1024.0);
    println!(
        "CPU seconds while jobs ran: nats-server {:.1}, {}, this process (providers, client) {:.1}; {:.0} µs of server CPU per settled segment",
        cpu.server,
        cpu.brokers_line(),
        cpu.this,
        cpu.server * 1e6 / settled.max(1) as f64
    );
    market.in_process.stop().await;
    // A run that did not settle what it submitted measured something else:
    // it fails rather than print a figure with a warning.
    let expected = args.jobs * lots_per_job(args) + checks;
    if settled != expected {
        anyhow::bail!("expected {expected} settled lots, counted {settled}: the run is not a measurement");
    }
    Ok(Outcome {
        ceiling_pipelined,
        ceiling_sequential,
        batch_ceiling,
        batches_per_lot,
        rate,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        server_us_per_segment: cpu.server * 1e6 / settled.max(1) as f64,
        broker_us_per_segment: cpu.broker() * 1e6 / settled.max(1) as f64,
    })
}

/// The highest peak resident memory (`VmHWM`) of the market's brokers, KiB.
fn peak_rss_kib(market: &Market) -> u64 {
    let brokers = std::iter::once(&market.broker).chain(&market.brokers);
    brokers.filter_map(|b| b.peak_rss_kib()).max().unwrap_or(0)
}

/// CPU seconds used so far by the server, each broker and this process.
struct Cpu {
    server: f64,
    /// The first broker's, then each added one's.
    brokers: Vec<f64>,
    this: f64,
}

impl Cpu {
    fn now(market: &Market) -> Cpu {
        let brokers = std::iter::once(&market.broker).chain(&market.brokers);
        Cpu {
            server: market.server.cpu_seconds().unwrap_or(0.0),
            brokers: brokers.map(|b| b.cpu_seconds().unwrap_or(0.0)).collect(),
            this: vmlot_tests::own_cpu_seconds().unwrap_or(0.0),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            server: self.server - before.server,
            brokers: self
                .brokers
                .iter()
                .zip(&before.brokers)
                .map(|(a, b)| a - b)
                .collect(),
            this: self.this - before.this,
        }
    }

    /// Every broker's CPU seconds together.
    fn broker(&self) -> f64 {
        self.brokers.iter().sum()
    }

    /// The brokers' CPU seconds: their sum, and with several, each one's.
    fn brokers_line(&self) -> String {
        let sum = format!("{:.1}", self.broker());
        if self.brokers.len() < 2 {
            return format!("broker {sum}");
        }
        let each: Vec<String> = (self.brokers.iter().enumerate())
            .map(|(i, s)| format!("b{} {s:.1}", i + 1))
            .collect();
        format!("brokers {sum} ({})", each.join(", "))
    }
}

/// Acknowledged publishes of 256-byte messages: pipelined (256 in flight)
/// and one at a time, msg/s.
async fn ack_ceiling(client: &async_nats::Client) -> Result<(f64, f64)> {
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "ACK_CEILING".into(),
        subjects: vec!["ack.ceiling".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let body = bytes::Bytes::from(vec![7u8; 256]);
    let n = 20_000;
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        acks.push(js.publish("ack.ceiling", body.clone()).await?.into_future());
        if acks.len() >= 256 {
            acks.next().await.context("ack")??;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let pipelined = n as f64 / started.elapsed().as_secs_f64();
    let m = 500;
    let started = Instant::now();
    for _ in 0..m {
        js.publish("ack.ceiling", body.clone()).await?.await?;
    }
    let sequential = m as f64 / started.elapsed().as_secs_f64();
    js.delete_stream("ACK_CEILING").await?;
    Ok((pipelined, sequential))
}

/// Atomic batches of three 256-byte messages (a ledger transaction and two
/// postings' worth) committed into one stream that allows them: 16
/// batches in flight, then one at a time, batches/s.
async fn batch_ceiling(client: &async_nats::Client) -> Result<(f64, f64)> {
    use jetstream_extra::batch_publish::BatchPublishExt;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "BATCH_CEILING".into(),
        subjects: vec!["batch.ceiling.>".into()],
        storage: stream::StorageType::File,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await?;
    let body = bytes::Bytes::from(vec![7u8; 256]);
    let batch = |i: usize| {
        let js = js.clone();
        let messages: Vec<OutboundMessage> = (0..3)
            .map(|k| OutboundMessage {
                subject: format!("batch.ceiling.{i}.{k}").into(),
                payload: body.clone(),
                headers: None,
            })
            .collect();
        async move {
            js.batch_publish_all()
                .ack_first(false)
                .timeout(Duration::from_secs(30))
                .publish(futures::stream::iter(messages))
                .await
                .context("atomic batch")
        }
    };
    let n = 1_000;
    let started = Instant::now();
    let mut commits = futures::stream::iter(0..n).map(batch).buffer_unordered(16);
    while let Some(done) = commits.next().await {
        done?;
    }
    let in_flight = n as f64 / started.elapsed().as_secs_f64();
    let m = 200;
    let started = Instant::now();
    for i in n..n + m {
        batch(i).await?;
    }
    let sequential = m as f64 / started.elapsed().as_secs_f64();
    js.delete_stream("BATCH_CEILING").await?;
    Ok((in_flight, sequential))
}

/// The transactions on the books from stream sequence `from` on, and the
/// atomic batches they were written in: a transaction that is not the
/// first message of its batch (`Nats-Batch-Sequence` past 1) rode in
/// another's (a post with the settlement that made it due).
async fn ledger_batches(books: &jetstream::Context, from: u64) -> Result<(u64, u64)> {
    let mut consumer = books
        .get_stream(subjects::LEDGER_STREAM)
        .await?
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::LEDGER_TX_ALL.into(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            ..Default::default()
        })
        .await?;
    let total = consumer.info().await?.num_pending;
    let mut messages = consumer.messages().await?;
    let (mut transactions, mut batches) = (0u64, 0u64);
    while transactions < total {
        let Some(msg) = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .context("the ledger's transactions stopped coming")?
        else {
            bail!("the ledger's transactions ended early")
        };
        let msg = msg?;
        transactions += 1;
        let seq = msg.headers.as_ref().and_then(|h| h.get("Nats-Batch-Sequence"));
        if seq.is_none_or(|s| s.as_str() == "1") {
            batches += 1;
        }
    }
    Ok((transactions, batches))
}

/// The submitting accounts' names: `bench` alone, or `bench-1` … `bench-n`.
fn submitter_names(n: usize) -> Vec<String> {
    match n {
        0 | 1 => vec!["bench".to_string()],
        n => (1..=n).map(|i| format!("bench-{i}")).collect(),
    }
}

/// The last sequence of every stream the contexts see, by name: the
/// messages each has stored so far (every publish, KV update and batch
/// message is one, whatever was later replaced or expired).
async fn stored(contexts: &[&jetstream::Context]) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for js in contexts {
        let mut streams = js.streams();
        while let Some(info) = streams.next().await {
            let info = info.context("list streams")?;
            out.insert(info.config.name.clone(), info.state.last_sequence);
        }
    }
    Ok(out)
}
