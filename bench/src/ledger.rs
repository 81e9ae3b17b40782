//! The books at scale: `vmlot_ledger::verify` and the filtered reads of
//! `vmlot_ledger::read` over about a million ledger records, each against
//! a raw read of the same messages (payloads undecoded: what NATS alone
//! delivers) in the same run. The whole stream is read raw two ways, an
//! ordered consumer inside the books' account and the exported direct
//! gets every books reader goes through, and the faster is verify's
//! baseline.
//!
//! The ledger is filled with a valid book (credits, holds, settlements with
//! their details, posts, refunds, providers' deposits, a few releases and
//! forfeits, and the job records beside them: [`book`]) built exactly as
//! `Books::record` builds it — the same transaction and posting values,
//! serialized the same way, on the same subjects, in the same order — but
//! published pipelined instead of one atomic batch at a time: writing a
//! million records through `Books::record` (two reads and one fsynced batch
//! per transaction) would take the better part of an hour.

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use vmlot_ledger::Books;
use vmlot_ledger::read::{self, Filter};
use vmlot_schemas::ledger::{Account, TxKind};
use vmlot_schemas::subjects;
use vmlot_tests::{Fsync, NatsServer};

use crate::baseline::Cpu;

mod book;

use book::Book;

#[derive(clap::Args)]
pub struct Args {
    /// Ledger stream messages to write (transactions and postings both count).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value_t = 200)]
    providers: usize,
    /// Jobs running at once while the book is written (their records interleave).
    #[arg(long, default_value_t = 64)]
    concurrent_jobs: usize,
    /// Acknowledgements in flight while filling.
    #[arg(long, default_value_t = 4096)]
    in_flight: usize,
    /// Pause before the last tenth of the records, so the recent window
    /// lies beyond the readers' clock slack (5 min) from the older records,
    /// as it does on books kept over weeks; 0 to skip (the time-window
    /// query then reads every settlement).
    #[arg(long, default_value_t = 315)]
    recent_pause_s: u64,
    /// Forfeits of each cause (a minority result, a checkpoint that did
    /// not restore) spread over the book, and as many releases: about.
    #[arg(long, default_value_t = 20)]
    forfeits: u64,
}

/// The unit every amount is in.
const UNIT: &str = "CRD";
/// The operator's fee on each settlement (5 %): settlements carry three entries.
const FEE_RATE: Decimal = Decimal::from_parts(5, 0, 0, false, 2);
/// `read.rs`'s slack between a record's time and the stream's receive time.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::minutes(5);

/// Measured on a single-threaded runtime of its own, baselines and all,
/// as `vmlot` runs the commands that read the books (`client/src/main.rs`).
pub async fn run(args: Args) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure(args))
    })
    .await?
}

async fn measure(args: Args) -> Result<()> {
    // JetStream's default sync interval, not the harness's usual
    // `sync_interval: always`: fsyncing every write holds a pipelined fill
    // to a few hundred messages a second here (a million records would
    // take most of an hour). What is measured is reads, which never fsync.
    let server = NatsServer::start_with(Fsync::Default)?;
    // The books are written inside their own account, as the broker does,
    // and read as an accountant does: through that account's exports.
    let js = jetstream::new(server.books_client().await?);
    let books = vmlot_ledger::BooksApi::imported(server.client().await?);
    println!(
        "nats-server with JetStream's default sync interval (reads only are measured; see below); every read on a single-threaded runtime, as `vmlot` reads the books; {} users, {} providers, fee {FEE_RATE}, target {} ledger records (a record = one stream message: a transaction or a posting)",
        args.users, args.providers, args.records
    );
    Books::provision(&js, 1).await?;
    let jobs = js
        .create_key_value(kv::Config {
            bucket: subjects::JOB_BUCKET.to_string(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await?;

    let started = Instant::now();
    let mut book = Book::new(&args);
    let fill = book.fill(&js, &jobs, &args).await?;
    let fill_s = started.elapsed().as_secs_f64();
    // What the fill left for the kernel to write back is written now, so
    // the reads below do not share the disk with it.
    let synced = std::process::Command::new("sync").status()?;
    ensure!(synced.success(), "sync: {synced}");
    let stored = js
        .get_stream(subjects::LEDGER_STREAM)
        .await?
        .info()
        .await?
        .state
        .clone();
    ensure!(
        stored.messages == fill.records,
        "stream holds {} messages, {} written",
        stored.messages,
        fill.records
    );
    println!(
        "filled in {fill_s:.1} s ({:.0} msg/s): {} records ({} transactions, {} postings; {} credits, {} holds, {} settlements, {} posts, {} voids, {} refunds, {} deposits, {} releases, {} forfeits: {} minority, {} unrestorable), {:.1} MB; {} job records ({} still running)",
        fill.records as f64 / fill_s,
        fill.records,
        fill.transactions,
        fill.records - fill.transactions,
        fill.of(TxKind::Credit),
        fill.of(TxKind::Hold),
        fill.of(TxKind::Settlement),
        fill.of(TxKind::Post),
        fill.of(TxKind::Void),
        fill.of(TxKind::Refund),
        fill.of(TxKind::Deposit),
        fill.of(TxKind::Release),
        fill.of(TxKind::Forfeit),
        fill.minority,
        fill.unrestorable,
        stored.bytes as f64 / 1e6,
        book.jobs.len(),
        book.jobs.iter().filter(|s| !s.state.is_final()).count(),
    );

    // The whole stream, raw, two ways: an ordered consumer inside the
    // books' account, and the batched direct gets a books reader has
    // (through the exports, asked ahead as verify asks). The faster is
    // the baseline of verify.
    let consumer = raw(&js, &server, vec![], None, false).await?;
    let direct = raw_direct(&books, &server).await?;
    ensure!(
        direct.messages == consumer.messages,
        "direct gets read {} messages, the consumer {}",
        direct.messages,
        consumer.messages
    );
    let all = if direct.secs < consumer.secs {
        &direct
    } else {
        &consumer
    };
    println!(
        "\n| read | messages | wall s | msg/s | raw read of the same messages, s | ratio to raw | CPU s: nats-server / reader |\n|---|---|---|---|---|---|---|"
    );
    row(
        "raw read, whole stream: ordered consumer in the books' account",
        consumer.messages,
        consumer.secs,
        all.secs,
        consumer.cpu,
    );
    row(
        "raw read, whole stream: direct gets through the exports (a books reader's way)",
        direct.messages,
        direct.secs,
        all.secs,
        direct.cpu,
    );

    let (t, c) = (Instant::now(), Cpu::now(&server));
    let report = vmlot_ledger::verify::verify(&books).await?;
    let (verify_s, verify_cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    if !report.ok() {
        for p in report.problems.iter().take(20) {
            eprintln!("problem: {}: {}", p.record, p.what);
        }
        bail!("verify found {} problems in a valid book", report.problems.len());
    }
    ensure!(
        report.transactions + report.postings == fill.records && report.jobs == book.jobs.len() as u64,
        "verify read {} transactions, {} postings, {} jobs",
        report.transactions,
        report.postings,
        report.jobs
    );
    row(
        &format!(
            "`verify` (0 problems, {} jobs, {} notes)",
            report.jobs,
            report.notes.len()
        ),
        all.messages,
        verify_s,
        all.secs,
        verify_cpu,
    );

    // Filtered reads, each beside a raw read of the same subjects from the
    // same start.
    let provider = Account::Provider(book.busiest_provider());
    let user = Account::User(book.users[book.users.len() / 2].clone());
    let job = book.jobs[book.jobs.len() / 2].job;
    let recent = fill.window_start;
    // (name, filter, the subjects it reads, where the read starts)
    let queries: Vec<Query> = vec![
        (
            "`query` by provider (its postings)".into(),
            Filter {
                provider: match provider {
                    Account::Provider(p) => Some(p),
                    _ => None,
                },
                ..Default::default()
            },
            vec![subjects::postings_of(&provider)],
            None,
        ),
        (
            "`query` by user (its postings)".into(),
            Filter {
                account: Some(user.clone()),
                ..Default::default()
            },
            vec![subjects::postings_of(&user)],
            None,
        ),
        (
            "`query` by job (its transactions)".into(),
            Filter {
                job: Some(job),
                ..Default::default()
            },
            {
                let mut of_job = subjects::ledger_tx_job(&job).to_vec();
                of_job.push(subjects::forfeits_of_job(&job));
                of_job
            },
            None,
        ),
        (
            "`query` settlements since the last 10 % of the fill".into(),
            Filter {
                kind: Some(TxKind::Settlement),
                since: Some(recent),
                ..Default::default()
            },
            vec![subjects::ledger_tx_kind(TxKind::Settlement)],
            Some(recent - CLOCK_SLACK),
        ),
        (
            "`query` forfeits (a kind, no window)".into(),
            Filter {
                kind: Some(TxKind::Forfeit),
                ..Default::default()
            },
            vec![subjects::ledger_tx_kind(TxKind::Forfeit)],
            None,
        ),
    ];
    let every_settlement = Filter {
        kind: Some(TxKind::Settlement),
        ..Default::default()
    };
    let mut worst_query = 0f64;
    for (name, filter, filters, start) in queries {
        let base = raw(&js, &server, filters, start, false).await?;
        let (t, c) = (Instant::now(), Cpu::now(&server));
        let rows = read::query(&books, &filter).await?;
        let (s, cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
        worst_query = worst_query.max(s);
        ensure!(!rows.is_empty(), "{name}: no rows");
        row(
            &format!("{name}: {} rows", rows.len()),
            base.messages,
            s,
            base.secs,
            cpu,
        );
    }
    // Not a filtered read but a whole kind: a fifth of the ledger, bound by
    // its size, not held to the filtered-query target.
    let base = raw(
        &js,
        &server,
        vec![subjects::ledger_tx_kind(TxKind::Settlement)],
        None,
        false,
    )
    .await?;
    let (t, c) = (Instant::now(), Cpu::now(&server));
    let rows = read::query(&books, &every_settlement).await?;
    let (s, cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    row(
        &format!(
            "`query` every settlement (a whole kind, no window): {} rows",
            rows.len()
        ),
        base.messages,
        s,
        base.secs,
        cpu,
    );
    drop(rows);
    let (from, until) = (fill.began, Utc::now());
    let base = raw(
        &js,
        &server,
        vec![subjects::postings_of(&provider)],
        Some(from - CLOCK_SLACK),
        false,
    )
    .await?;
    let (t, c) = (Instant::now(), Cpu::now(&server));
    let statements = read::statement(&books, &provider, from, until).await?;
    let (s, cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    worst_query = worst_query.max(s);
    let entries: usize = statements.iter().map(|s| s.entries.len()).sum();
    ensure!(
        statements.len() == 1 && statements[0].closing == book.balance(&provider),
        "statement of {provider} does not close at its balance"
    );
    row(
        &format!("`statement` of that provider over the fill: {entries} entries"),
        base.messages,
        s,
        base.secs,
        cpu,
    );
    let base = raw(&js, &server, vec![subjects::postings_of(&provider)], None, true).await?;
    let (t, c) = (Instant::now(), Cpu::now(&server));
    let balances = read::balances(&books, &provider).await?;
    let (s, cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    ensure!(
        balances.get(UNIT) == Some(&book.balance(&provider)),
        "balance of {provider}"
    );
    row("`balances` of that provider", base.messages, s, base.secs, cpu);
    let base = raw(&js, &server, vec![subjects::LEDGER_POST_ALL.into()], None, true).await?;
    let (t, c) = (Instant::now(), Cpu::now(&server));
    let lasts = read::last_postings(&books, subjects::LEDGER_POST_ALL).await?;
    let (s, cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    ensure!(
        lasts.len() == book.balances.len(),
        "last postings of every account"
    );
    row(
        "`last_postings` of every account (every balance)",
        base.messages,
        s,
        base.secs,
        cpu,
    );

    // A tampered record: one posting more on the provider's subject, its
    // balance off by a cent. verify must name it.
    let subject = subjects::posting(&provider, UNIT);
    let last = lasts
        .iter()
        .find(|p| p.account == provider)
        .context("provider's last posting")?;
    let mut bad = last.clone();
    bad.balance += Decimal::new(1, 2);
    let ack = js
        .publish(subject.clone(), serde_json::to_vec(&bad)?.into())
        .await?
        .await?;
    let (t, c) = (Instant::now(), Cpu::now(&server));
    let tampered = vmlot_ledger::verify::verify(&books).await?;
    let (tampered_s, tampered_cpu) = (t.elapsed().as_secs_f64(), Cpu::now(&server).since(c));
    let named = format!("{subject} (seq {})", ack.sequence);
    ensure!(
        tampered.problems.iter().any(|p| p.record == named),
        "verify missed the tampered posting {named}: {:?}",
        tampered.problems
    );
    row(
        &format!(
            "`verify` again, one posting tampered ({} problems, the posting named)",
            tampered.problems.len()
        ),
        all.messages + 1,
        tampered_s,
        all.secs,
        tampered_cpu,
    );

    println!(
        "\nverify of {} records: {verify_s:.2} s and {tampered_s:.2} s (target < 10 s: {}); slowest filtered read {worst_query:.3} s (target < 1 s: {})",
        fill.records,
        if verify_s.max(tampered_s) < 10.0 {
            "met"
        } else {
            "NOT met"
        },
        if worst_query < 1.0 { "met" } else { "NOT met" },
    );
    println!(
        "CPU seconds: nats-server {:.1}, this process {:.1}",
        server.cpu_seconds().unwrap_or(0.0),
        vmlot_tests::own_cpu_seconds().unwrap_or(0.0)
    );
    Ok(())
}

/// A named query, the subjects it reads and where its read starts.
type Query = (String, Filter, Vec<String>, Option<DateTime<Utc>>);

fn row(name: &str, messages: u64, secs: f64, raw_secs: f64, cpu: Cpu) {
    println!(
        "| {name} | {messages} | {secs:.3} | {:.0} | {raw_secs:.3} | {:.2} | {:.2} / {:.2} |",
        messages as f64 / secs,
        secs / raw_secs,
        cpu.server,
        cpu.own,
    );
}

/// The whole ledger read the way a books reader reads it (the exported
/// batched direct gets, asked ahead), payloads only counted.
async fn raw_direct(books: &vmlot_ledger::BooksApi, server: &NatsServer) -> Result<RawRead> {
    let (t, c) = (Instant::now(), Cpu::now(server));
    let mut bytes = 0usize;
    let messages = books
        .read(subjects::LEDGER_STREAM, None, None, |_, _, payload| {
            bytes += payload.len();
            true
        })
        .await?;
    std::hint::black_box(bytes);
    Ok(RawRead {
        messages,
        secs: t.elapsed().as_secs_f64(),
        cpu: Cpu::now(server).since(c),
    })
}

struct RawRead {
    messages: u64,
    secs: f64,
    cpu: Cpu,
}

/// The baseline: what NATS alone delivers to a reader inside the books'
/// account, an ordered pull consumer on the same filters and start (the
/// way every ledger read went before the books moved out of participants'
/// reach), payloads only counted. The readers measured against it go
/// through the books' exported direct gets, as an accountant does.
async fn raw(
    js: &jetstream::Context,
    server: &NatsServer,
    filters: Vec<String>,
    start: Option<DateTime<Utc>>,
    last_per_subject: bool,
) -> Result<RawRead> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let (t, c) = (Instant::now(), Cpu::now(server));
    let mut bytes = 0usize;
    let stream = js.get_stream_no_info(subjects::LEDGER_STREAM).await?;
    let deliver_policy = match (start, last_per_subject) {
        (_, true) => consumer::DeliverPolicy::LastPerSubject,
        (Some(t), false) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                t.timestamp_nanos_opt().unwrap_or(0),
            ))?,
        },
        (None, false) => consumer::DeliverPolicy::All,
    };
    let mut config = consumer::pull::OrderedConfig {
        deliver_policy,
        max_batch: 10_000,
        ..Default::default()
    };
    match filters.len() {
        0 => {}
        1 => config.filter_subject = filters[0].clone(),
        _ => config.filter_subjects = filters,
    }
    let mut consumer = stream.create_consumer(config).await?;
    let mut messages = 0u64;
    if consumer.info().await?.num_pending > 0 {
        let mut delivered = consumer.messages().await?;
        while let Some(msg) = delivered.next().await {
            let msg = msg?;
            let left = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending;
            bytes += msg.payload.len();
            messages += 1;
            if left == 0 {
                break;
            }
        }
    }
    std::hint::black_box(bytes);
    Ok(RawRead {
        messages,
        secs: t.elapsed().as_secs_f64(),
        cpu: Cpu::now(server).since(c),
    })
}
