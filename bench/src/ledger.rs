//! The books at scale: `vmlot_ledger::verify` and the filtered reads of
//! `vmlot_ledger::read` over about a million ledger records, each against
//! a raw read of the same messages (an ordered consumer handing over the
//! payloads undecoded: what NATS alone delivers) in the same run.
//!
//! The ledger is filled with a valid book (credits, holds, settlements with
//! their details, refunds, and the job records beside them) built exactly
//! as `Books::record` builds it — the same transaction and posting values,
//! serialized the same way, on the same subjects, in the same order — but
//! published pipelined instead of one atomic batch at a time: writing a
//! million records through `Books::record` (two reads and one fsynced batch
//! per transaction) would take the better part of an hour.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rust_decimal::Decimal;
use vmlot_ledger::Books;
use vmlot_ledger::read::{self, Filter};
use vmlot_schemas::ledger::{Account, Settlement, Transaction, TxKind};
use vmlot_schemas::market::{
    Checkpoint, GuestState, Image, JobSpec, JobState, JobStatus, SegmentCount, SegmentResult, SegmentTimings,
    SettledSegment,
};
use vmlot_schemas::{
    HypervisorKind, JobId, LotId, ManifestId, Money, ProviderId, VmConfig, WIRE_VERSION, subjects,
};
use vmlot_tests::{Fsync, NatsServer};

use crate::baseline::Cpu;

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
}

/// The unit every amount is in.
const UNIT: &str = "CRD";
/// The operator's fee on each settlement (5 %): settlements carry three entries.
const FEE_RATE: Decimal = Decimal::from_parts(5, 0, 0, false, 2);
/// `read.rs`'s slack between a record's time and the stream's receive time.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::minutes(5);

pub async fn run(args: Args) -> Result<()> {
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
        "nats-server with JetStream's default sync interval (reads only are measured; see below); {} users, {} providers, fee {FEE_RATE}, target {} ledger records (a record = one stream message: a transaction or a posting)",
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
        "filled in {fill_s:.1} s ({:.0} msg/s): {} records ({} transactions, {} postings; {} credits, {} holds, {} settlements, {} posts, {} voids, {} refunds), {:.1} MB; {} job records ({} still running)",
        fill.records as f64 / fill_s,
        fill.records,
        fill.transactions,
        fill.records - fill.transactions,
        fill.by_kind[0],
        fill.by_kind[1],
        fill.by_kind[2],
        fill.by_kind[3],
        fill.by_kind[4],
        fill.by_kind[5],
        stored.bytes as f64 / 1e6,
        book.jobs.len(),
        book.jobs.iter().filter(|s| !s.state.is_final()).count(),
    );

    // The whole stream, raw: the baseline of verify.
    let all = raw(&js, &server, vec![], None, false).await?;
    println!(
        "\n| read | messages | wall s | msg/s | raw read of the same messages, s | ratio to raw | CPU s: nats-server / reader |\n|---|---|---|---|---|---|---|"
    );
    row(
        "raw read, whole stream (baseline)",
        all.messages,
        all.secs,
        all.secs,
        all.cpu,
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
            subjects::ledger_tx_job(&job).to_vec(),
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

/// The book's random choices, from a seeded generator: the same book every run.
struct Dice(StdRng);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0.gen_range(0..n)
    }

    fn uuid(&mut self) -> uuid::Uuid {
        let mut bytes = [0u8; 16];
        self.0.fill_bytes(&mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    fn manifest(&mut self) -> ManifestId {
        ManifestId::of(
            vmlot_schemas::HashAlgorithm::Sha256,
            &self.0.next_u64().to_le_bytes(),
        )
    }
}

/// A job being written: its record, and what is left to write.
struct Running {
    status: JobStatus,
    segments: u32,
    price: Decimal,
    held: bool,
    /// The last settlement, pending until the next one (or the refund) posts it.
    pending: Option<Settlement>,
}

#[derive(Default)]
struct Fill {
    records: u64,
    transactions: u64,
    by_kind: [u64; 6],
    began: DateTime<Utc>,
    /// When the last tenth of the records began.
    window_start: DateTime<Utc>,
}

/// The book being written, with the running balance of every posting subject.
struct Book {
    rng: Dice,
    users: Vec<String>,
    providers: Vec<ProviderId>,
    balances: HashMap<String, Decimal>,
    settlements_of: HashMap<ProviderId, u64>,
    jobs: Vec<JobStatus>,
    image: Image,
}

impl Book {
    fn new(args: &Args) -> Self {
        let mut rng = Dice(StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15));
        let providers = (0..args.providers).map(|_| ProviderId(rng.uuid())).collect();
        let image = Image {
            vm: VmConfig {
                hypervisor: HypervisorKind::Qemu,
                arch: "x86_64".into(),
                memory_mib: 128,
                vcpus: 1,
                cmdline: "console=ttyS0 quiet loglevel=1 panic=-1".into(),
            },
            kernel: rng.manifest(),
            initrd: Some(rng.manifest()),
            disks: vec![],
        };
        Self {
            users: (0..args.users).map(|i| format!("u{i:04}")).collect(),
            providers,
            balances: HashMap::new(),
            settlements_of: HashMap::new(),
            jobs: Vec::new(),
            image,
            rng,
        }
    }

    fn balance(&self, account: &Account) -> Decimal {
        self.balances
            .get(&subjects::posting(account, UNIT))
            .copied()
            .unwrap_or_default()
    }

    fn busiest_provider(&self) -> ProviderId {
        self.settlements_of
            .iter()
            .max_by_key(|(p, n)| (**n, **p))
            .map(|(p, _)| *p)
            .unwrap_or(self.providers[0])
    }

    /// The messages `Books::record` writes for `tx` on `subject`: the
    /// transaction, then one posting per entry carrying the balance it leaves.
    fn record(&mut self, subject: String, tx: &Transaction) -> Vec<(String, Bytes)> {
        assert!(tx.malformed().is_none(), "{subject}: {:?}", tx.malformed());
        let mut out = Vec::with_capacity(tx.entries.len() + 1);
        out.push((
            subject,
            Bytes::from(serde_json::to_vec(tx).expect("transaction serializes")),
        ));
        for entry in &tx.entries {
            let posting_subject = subjects::posting(&entry.account, &tx.unit);
            let balance = self.balances.entry(posting_subject.clone()).or_default();
            let after = *balance + entry.signed();
            assert!(
                !(after.is_sign_negative() && !after.is_zero() && !entry.account.may_go_negative()),
                "{} below zero",
                entry.account
            );
            *balance = after;
            let posting = vmlot_ledger::build::posting(tx, entry, after);
            out.push((
                posting_subject,
                serde_json::to_vec(&posting).expect("posting serializes").into(),
            ));
        }
        out
    }

    fn credit(&mut self, user: &str, amount: Decimal) -> Vec<(String, Bytes)> {
        let request = self.rng.uuid();
        let (subject, tx) = vmlot_ledger::build::credit(
            &request,
            &Account::User(user.to_string()),
            &Money::new(amount, UNIT),
            "bench top-up",
        );
        self.record(subject, &tx)
    }

    fn new_job(&mut self) -> Running {
        let user = self.users[self.rng.below(self.users.len() as u64) as usize].clone();
        let segments = 1 + self.rng.below(15) as u32;
        let price = Decimal::new(10 + self.rng.below(51) as i64, 2);
        let now = Utc::now();
        let spec = JobSpec {
            image: self.image.clone(),
            segment_seconds: 60,
            segments: SegmentCount::Count(segments),
            redundancy: 1 + self.rng.below(2) as u32,
            check: vmlot_schemas::market::ResultCheck::Continuation,
            reserve_price: Money::new(Decimal::new(60, 2), UNIT),
            budget: Money::new(Decimal::from(10), UNIT),
            account: user,
        };
        Running {
            status: JobStatus {
                version: WIRE_VERSION,
                job: JobId(self.rng.uuid()),
                spec,
                state: JobState::Running,
                checkpoint: Checkpoint {
                    machine_state: None,
                    disks: vec![],
                    stored_bytes: 20 << 20,
                },
                settled: Vec::new(),
                open_lot: None,
                attempts: 0,
                waiting_for_providers: false,
                spent: Money::new(Decimal::ZERO, UNIT),
                created_at: now,
                updated_at: now,
                end_reason: None,
                refunded: false,
                refused: Vec::new(),
                restore_failures: Vec::new(),
                check: None,
            },
            segments,
            price,
            held: false,
            pending: None,
        }
    }

    /// The next transactions of `job`, as the broker writes them: its hold;
    /// a settlement, with the post of the one before (whose checkpoint it
    /// continued from); or the last post and the refund (then `true`: the
    /// job has ended).
    fn step(&mut self, job: &mut Running, out: &mut Vec<(String, Bytes)>) -> (Vec<TxKind>, bool) {
        let status = &mut job.status;
        let id = status.job;
        let user = Account::User(status.spec.account.clone());
        if !job.held {
            job.held = true;
            let budget = status.spec.budget.amount;
            if self.balance(&user) < budget {
                out.extend(self.credit(&status.spec.account, Decimal::from(500)));
            }
            let (subject, tx) = vmlot_ledger::build::hold(id, &status.spec.account, &status.spec.budget);
            out.extend(self.record(subject, &tx));
            return (vec![TxKind::Hold], false);
        }
        let segment = status.settled.len() as u32;
        if segment < job.segments {
            let provider = self.providers[self.rng.below(self.providers.len() as u64) as usize];
            *self.settlements_of.entry(provider).or_default() += 1;
            let lot = LotId(self.rng.uuid());
            let attempt = self.rng.below(3) as u32;
            let last = segment + 1 == job.segments;
            let guest = if last {
                GuestState::Halted { final_state: None }
            } else {
                GuestState::Running {
                    checkpoint: Checkpoint {
                        machine_state: Some(self.rng.manifest()),
                        disks: vec![self.rng.manifest()],
                        stored_bytes: (20 << 20) + self.rng.below(1 << 20),
                    },
                }
            };
            let timings = SegmentTimings {
                fetch_ms: self.rng.below(2000),
                start_ms: 40 + self.rng.below(100),
                run_ms: 60_000,
                save_ms: 500 + self.rng.below(300),
                upload_ms: self.rng.below(1500),
            };
            let now = Utc::now();
            let result = SegmentResult {
                version: WIRE_VERSION,
                lot,
                job: id,
                segment,
                attempt,
                provider,
                guest: guest.clone(),
                console: Some(self.rng.manifest()),
                timings,
                fetched_bytes: self.rng.below(20 << 20),
                sent_bytes: self.rng.below(4 << 20),
                finished_at: now,
            };
            let payment = Settlement {
                job: id,
                segment,
                lot,
                attempt,
                provider,
                payer: status.spec.account.clone(),
                amount: Money::new(job.price, UNIT),
                at: now,
                guest: result.guest.clone(),
                console: result.console,
                timings: result.timings,
                fetched_bytes: result.fetched_bytes,
                sent_bytes: result.sent_bytes,
                finished_at: result.finished_at,
            };
            let mut kinds = vec![TxKind::Settlement];
            let (subject, tx) = vmlot_ledger::build::settlement(payment.clone());
            out.extend(self.record(subject, &tx));
            if let Some(before) = job.pending.replace(payment) {
                let (subject, tx) = vmlot_ledger::build::post(&before, FEE_RATE);
                out.extend(self.record(subject, &tx));
                status.settled[before.segment as usize].posted = true;
                kinds.push(TxKind::Post);
            }
            let mut awarded = vec![provider];
            if status.spec.redundancy > 1 {
                awarded.push(self.providers[self.rng.below(self.providers.len() as u64) as usize]);
            }
            status.settled.push(SettledSegment {
                segment,
                attempt,
                lot,
                provider,
                awarded,
                price: Money::new(job.price, UNIT),
                guest: result.guest,
                console: result.console,
                timings,
                fetched_bytes: result.fetched_bytes,
                sent_bytes: result.sent_bytes,
                settled_at: now,
                posted: false,
            });
            status.spent.amount += job.price;
            status.attempts = 0;
            status.updated_at = now;
            if let GuestState::Running { checkpoint } = &status.settled[segment as usize].guest {
                status.checkpoint = checkpoint.clone();
            }
            return (kinds, false);
        }
        let mut kinds = Vec::new();
        if let Some(last) = job.pending.take() {
            let (subject, tx) = vmlot_ledger::build::post(&last, FEE_RATE);
            out.extend(self.record(subject, &tx));
            status.settled[last.segment as usize].posted = true;
            kinds.push(TxKind::Post);
        }
        // As `Books::refund` does: whatever the escrow holds.
        let left = self.balance(&Account::Escrow(id));
        let (subject, tx) = vmlot_ledger::build::refund(id, &status.spec.account, UNIT, left);
        out.extend(self.record(subject, &tx));
        status.state = JobState::Done;
        status.end_reason = Some("the guest halted".into());
        status.refunded = true;
        status.updated_at = Utc::now();
        kinds.push(TxKind::Refund);
        (kinds, true)
    }

    /// Writes the book: every user funded, then jobs `concurrent_jobs` at a
    /// time, one transaction of a random running job after another, until
    /// `records` messages; the jobs still running then stay running. Then
    /// every job's record.
    async fn fill(&mut self, js: &jetstream::Context, jobs: &kv::Store, args: &Args) -> Result<Fill> {
        let mut fill = Fill {
            began: Utc::now(),
            window_start: Utc::now(),
            ..Default::default()
        };
        let mut acks = FuturesUnordered::new();
        let mut out = Vec::new();
        let users = self.users.clone();
        let mut active: Vec<Running> = Vec::new();
        let mut user_iter = users.iter();
        let window_at = args.records - args.records / 10;
        let mut window_set = false;
        while fill.records < args.records {
            let kinds = if let Some(user) = user_iter.next() {
                out.extend(self.credit(user, Decimal::from(200)));
                vec![TxKind::Credit]
            } else {
                while active.len() < args.concurrent_jobs {
                    let job = self.new_job();
                    active.push(job);
                }
                let i = self.rng.below(active.len() as u64) as usize;
                let mut job = active.swap_remove(i);
                let (kinds, ended) = self.step(&mut job, &mut out);
                if kinds == [TxKind::Hold] && out.len() > 3 {
                    // A top-up written before the hold.
                    fill.by_kind[0] += 1;
                    fill.transactions += 1;
                }
                if ended {
                    self.jobs.push(job.status);
                } else {
                    active.push(job);
                }
                kinds
            };
            for kind in &kinds {
                fill.by_kind[TxKind::ALL.iter().position(|k| k == kind).expect("a kind")] += 1;
                fill.transactions += 1;
            }
            fill.records += out.len() as u64;
            if !window_set && fill.records >= window_at {
                window_set = true;
                while let Some(ack) = acks.next().await {
                    ack?;
                }
                if args.recent_pause_s > 0 {
                    println!(
                        "{} records written; pausing {} s before the last tenth",
                        fill.records, args.recent_pause_s
                    );
                    tokio::time::sleep(std::time::Duration::from_secs(args.recent_pause_s)).await;
                }
                fill.window_start = Utc::now();
            }
            for (subject, payload) in out.drain(..) {
                acks.push(js.publish(subject, payload).await?.into_future());
                while acks.len() >= args.in_flight {
                    acks.next().await.context("ack")??;
                }
            }
        }
        // Jobs still running: budget held, some segments paid, no refund.
        for job in active {
            if job.held {
                self.jobs.push(job.status);
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        futures::stream::iter(&self.jobs)
            .map(|status| async move {
                let payload = serde_json::to_vec(status)?;
                jobs.put(status.job.to_string(), payload.into()).await?;
                anyhow::Ok(())
            })
            .buffer_unordered(args.in_flight)
            .try_collect::<()>()
            .await?;
        Ok(fill)
    }
}
