//! The chaos run (issue 16 step 3): jobs (synthetic, and real QEMU ones)
//! on a 3-node JetStream cluster with two brokers and several providers,
//! while a driver SIGKILLs and restarts providers, brokers and a NATS node
//! at random, one at a time. At the end every job is done, every console
//! is exact (a synthetic job's equals a job of the same image run before
//! the storm; a QEMU job's equals the guest run by QEMU itself), no
//! segment is paid twice, and the books verify. The figures are printed
//! as a table for `docs/BENCHMARKS.md`.
//!
//! Two sizes: `make chaos` (`VMLOT_CHAOS_SIZE=full`: 100 synthetic jobs,
//! 2 QEMU jobs, a storm of 5 minutes) and the one `.ci/run` runs
//! (`VMLOT_CHAOS_SIZE=ci`). `VMLOT_CHAOS_SEED` replays a run's choices.
//! Not part of `cargo test --workspace` (feature `chaos`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmlot_schemas::market::{Image, JobSpec, JobState, JobStatus, ResultCheck, SegmentCount};
use vmlot_schemas::{JobId, Money};
use vmlot_tests::market::{Market, ProviderSpec, QemuProviderSpec};
use vmlot_tests::vm::{
    SEGMENT_SECONDS, Timed, VmMarket, assert_console_exact, broker_args, qemu_image, reference_console,
};

/// How big a run is.
struct Size {
    synthetic_jobs: usize,
    segments: u32,
    qemu_jobs: usize,
    /// How long the driver kills at most (it stops early once every job
    /// has ended).
    storm: Duration,
}

impl Size {
    fn from_env() -> Self {
        match std::env::var("VMLOT_CHAOS_SIZE").as_deref() {
            Ok("full") => Self {
                synthetic_jobs: 100,
                segments: 8,
                qemu_jobs: 2,
                storm: Duration::from_secs(300),
            },
            Ok("ci") | Err(_) => Self {
                synthetic_jobs: 30,
                segments: 6,
                qemu_jobs: 1,
                storm: Duration::from_secs(120),
            },
            Ok(other) => panic!("VMLOT_CHAOS_SIZE={other:?}: full or ci"),
        }
    }
}

/// What the driver can kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Provider,
    Broker,
    NatsNode,
}

fn crd(amount: &str) -> Money {
    Money::new(amount.parse().unwrap(), "CRD")
}

fn synthetic_job(image: Image, segments: u32, account: String) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 1,
        segments: SegmentCount::Count(segments),
        redundancy: 1,
        // Another provider restores each job's last checkpoint.
        check: ResultCheck::Continuation,
        reserve_price: crd("1.00"),
        budget: crd("30"),
        account,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_ends_done_exact_and_paid_once_through_a_storm_of_kills() {
    let size = Size::from_env();
    let seed: u64 = std::env::var("VMLOT_CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("VMLOT_CHAOS_SEED is a number"))
        .unwrap_or_else(rand::random);
    eprintln!("chaos: seed {seed} (VMLOT_CHAOS_SEED={seed} replays the driver's choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Made before the market starts, so it does not share the CPU with it.
    let qemu_reference = if size.qemu_jobs > 0 {
        Some(reference_console().await)
    } else {
        None
    };
    let _timed = Timed::start("chaos run");

    // The cluster, brokers b1 and b2, four synthetic providers and two QEMU ones.
    let synthetic: Vec<ProviderSpec> = (0..4)
        .map(|i| ProviderSpec {
            slots: 2,
            ..ProviderSpec::synthetic(&format!("s{i}"), &format!("0.1{i}"))
        })
        .collect();
    // A lost QEMU attempt is offered again 4 + 20 s after its award.
    let args = [broker_args(300, 20), vec!["--broker-id".into(), "b1".into()]].concat();
    let market = Market::start_on_cluster(3, args, &synthetic).await.unwrap();
    let mut m = VmMarket::on(market);
    m.patience = Duration::from_secs(900);
    m.market.add_broker("b2", &[]).unwrap();
    let qemu = [
        QemuProviderSpec::new("q1", "0.10"),
        QemuProviderSpec::new("q2", "0.20"),
    ];
    if size.qemu_jobs > 0 {
        for spec in &qemu {
            m.market.add_qemu_provider(spec).unwrap();
        }
    }
    let providers = m.market.providers.len();
    m.market.ready(providers).await.unwrap();

    // One synthetic job run before the storm: the console every job of its
    // image must print.
    let image = m
        .market
        .push_synthetic_image("synthetic.seed=chaos")
        .await
        .unwrap();
    let calm = m
        .market
        .submit(synthetic_job(image.clone(), size.segments, "calm".into()))
        .await;
    let calm = m.market.wait_final(calm, Duration::from_secs(120)).await;
    assert_eq!(calm.state, JobState::Done, "{calm:#?}\n{}", m.market.logs());
    let synthetic_console = m.vmlot_ok(&["logs", &calm.job.to_string()]);
    let printed = String::from_utf8_lossy(&synthetic_console);
    assert_eq!(
        printed.matches("synthetic: segment ").count(),
        size.segments as usize,
        "the calm run's console: {printed}"
    );

    // The jobs, spread over ten submitters (each has a quota of jobs in flight).
    let started = Instant::now();
    let mut synthetic_jobs = Vec::new();
    for i in 0..size.synthetic_jobs {
        let spec = synthetic_job(image.clone(), size.segments, format!("c{}", i % 10));
        synthetic_jobs.push(m.market.submit(spec).await);
    }
    let qemu_image_file = (size.qemu_jobs > 0).then(|| m.push_image(&qemu_image(&[])));
    let mut qemu_jobs = Vec::new();
    for _ in 0..size.qemu_jobs {
        let image = qemu_image_file.as_ref().unwrap();
        qemu_jobs.push(m.submit(image, SEGMENT_SECONDS, "until-halt", "1"));
    }
    let all: Vec<JobId> = synthetic_jobs.iter().chain(&qemu_jobs).copied().collect();

    // The storm: one victim at a time, killed, then restarted a moment later.
    let mut kills: BTreeMap<Victim, u32> = BTreeMap::new();
    let storm_end = Instant::now() + size.storm;
    // A NATS node is killed again only once the last one has had time to
    // catch up (two nodes of three down would stop the cluster, not test it).
    let mut nats_calm_until = Instant::now();
    while Instant::now() < storm_end {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2_000..6_000))).await;
        if ended(&m.market, &all).await == all.len() {
            break;
        }
        let mut victim = match rng.gen_range(0..10) {
            0..5 => Victim::Provider,
            5..8 => Victim::Broker,
            _ => Victim::NatsNode,
        };
        if victim == Victim::NatsNode && Instant::now() < nats_calm_until {
            victim = Victim::Provider;
        }
        let down = Duration::from_millis(rng.gen_range(500..5_000));
        match victim {
            Victim::Provider => {
                let i = rng.gen_range(0..m.market.providers.len());
                let p = &mut m.market.providers[i];
                eprintln!("chaos: kill provider {} for {down:?}", p.name());
                p.kill();
                tokio::time::sleep(down).await;
                p.restart().unwrap();
            }
            Victim::Broker => {
                let which = rng.gen_range(0..2);
                let b = if which == 0 {
                    &mut m.market.broker
                } else {
                    &mut m.market.brokers[0]
                };
                eprintln!("chaos: kill broker {} for {down:?}", b.name());
                b.kill();
                tokio::time::sleep(down).await;
                b.restart().unwrap();
            }
            Victim::NatsNode => {
                let name = format!("n{}", rng.gen_range(1..=3));
                let down = down + Duration::from_secs(3);
                eprintln!("chaos: kill NATS node {name} for {down:?}");
                m.market.node_mut(&name).kill();
                tokio::time::sleep(down).await;
                m.market.node_mut(&name).restart().unwrap();
                nats_calm_until = Instant::now() + Duration::from_secs(20);
            }
        }
        *kills.entry(victim).or_default() += 1;
    }
    let storm = started.elapsed();
    eprintln!("chaos: storm over after {storm:?}: {kills:?}");

    // Every job done, its console exact, each segment paid once.
    let mut finals: Vec<JobStatus> = Vec::new();
    for job in &all {
        let done = m.market.wait_final(*job, Duration::from_secs(900)).await;
        assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", m.market.logs());
        finals.push(done);
    }
    let elapsed = started.elapsed();
    for done in &finals {
        let console = m.vmlot_ok(&["logs", &done.job.to_string()]);
        if qemu_jobs.contains(&done.job) {
            assert_console_exact(&console, qemu_reference.unwrap(), done, "vmlot logs");
        } else {
            assert_eq!(
                String::from_utf8_lossy(&console),
                String::from_utf8_lossy(&synthetic_console),
                "job {}'s console differs from the calm run's",
                done.job
            );
            assert_eq!(done.settled.len(), size.segments as usize);
        }
        m.market.assert_paid_once(done.job).await;
    }
    m.market.assert_books_verify().await;
    assert!(
        kills.values().sum::<u32>() >= 3,
        "the storm killed almost nothing: {kills:?}"
    );

    // The figures.
    let lots: usize = finals.iter().map(|s| s.payments().count()).sum();
    let lost: u32 = finals
        .iter()
        .flat_map(|s| s.payments())
        .map(|settled| settled.attempt - 1)
        .sum();
    let count = |v: Victim| kills.get(&v).copied().unwrap_or(0);
    println!(
        "\n| jobs (synthetic + QEMU) | segments settled (with check restores) | providers killed | brokers killed | NATS nodes killed | attempts lost | storm | all done after |\n\
         |---|---|---|---|---|---|---|---|\n\
         | {} + {} | {lots} | {} | {} | {} | {lost} | {:.0} s | {:.0} s |\n\nseed {seed}",
        synthetic_jobs.len(),
        qemu_jobs.len(),
        count(Victim::Provider),
        count(Victim::Broker),
        count(Victim::NatsNode),
        storm.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
}

/// How many of `jobs` have ended (the broker answering for each).
async fn ended(market: &Market, jobs: &[JobId]) -> usize {
    let mut n = 0;
    for job in jobs {
        if market.status(*job).await.state.is_final() {
            n += 1;
        }
    }
    n
}
