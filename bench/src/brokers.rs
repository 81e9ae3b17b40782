//! More than one broker (issue 16 step 2): the market benchmark's run
//! (`market::run_once`) with 1, 2, 3… brokers sharing one server's jobs by
//! partition leases, each count on a fresh secured server, against that
//! server's acknowledged-publish rate measured first. The brokers are
//! started and waited for until they have split the 16 partitions evenly
//! before any job is submitted; a submission starts on whichever broker
//! NATS handed it to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use vmlot_schemas::JobId;
use vmlot_schemas::subjects::{LEASE_BUCKET, PARTITIONS, partition_of};
use vmlot_tests::Auth;
use vmlot_tests::market::{Market, wait_for};

use crate::market::{self, Outcome, median};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    load: market::Load,
    /// Broker counts, one run each on a fresh server.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    brokers: Vec<usize>,
    /// Rounds of every broker count, the counts taking turns within a
    /// round (the machine's drift spread over them); medians reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(args: Args) -> Result<()> {
    if args.brokers.contains(&0) {
        bail!("--brokers: each count is at least 1");
    }
    market::describe(&args.load);
    println!(
        "brokers sharing the jobs: {:?}, each count on a fresh secured server",
        args.brokers
    );
    let mut outcomes: Vec<Vec<Outcome>> = args.brokers.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds.max(1) {
        for (i, &n) in args.brokers.iter().enumerate() {
            println!("\n## Round {round}, {n} broker(s), secured (JWT, nkeys, TLS)\n");
            outcomes[i].push(market::run_once(&args.load, Auth::Secured, n).await?);
        }
    }
    println!(
        "\n## Brokers side by side, same run: medians of {} rounds each\n",
        args.rounds.max(1)
    );
    println!(
        "| brokers | JetStream acked publishes, pipelined, msg/s | settled segments/s | % of that ceiling | settle latency p50 / p99, ms | broker CPU µs per settled segment, all brokers | nats-server CPU µs per settled segment | settled segments/s per round |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (&n, runs) in args.brokers.iter().zip(&outcomes) {
        let m = |f: fn(&Outcome) -> f64| median(runs.iter().map(f));
        let rounds: Vec<String> = runs.iter().map(|o| format!("{:.1}", o.rate)).collect();
        println!(
            "| {n} | {:.0} | {:.1} | {:.2} | {:.0} / {:.0} | {:.0} | {:.0} | {} |",
            m(|o| o.ceiling_pipelined),
            m(|o| o.rate),
            m(|o| 100.0 * o.rate / o.ceiling_pipelined),
            m(|o| o.p50_ms),
            m(|o| o.p99_ms),
            m(|o| o.broker_us_per_segment),
            m(|o| o.server_us_per_segment),
            rounds.join(", ")
        );
    }
    Ok(())
}

/// The lease bucket now: who holds each partition, and which brokers
/// have a live `member.<id>` entry.
struct Leases {
    holders: HashMap<u16, String>,
    members: HashSet<String>,
}

impl Leases {
    async fn read(market: &Market) -> Result<Leases> {
        let books = async_nats::jetstream::new(market.server.books_client().await?);
        let mut leases = Leases {
            holders: HashMap::new(),
            members: HashSet::new(),
        };
        let Ok(kv) = books.get_key_value(LEASE_BUCKET).await else {
            return Ok(leases);
        };
        let mut keys = kv.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(id) = key.strip_prefix("member.") {
                leases.members.insert(id.to_string());
            } else if let Some(p) = key.strip_prefix("partition.").and_then(|p| p.parse().ok())
                && let Some(value) = kv.get(&key).await?
            {
                leases
                    .holders
                    .insert(p, String::from_utf8_lossy(&value).into_owned());
            }
        }
        Ok(leases)
    }
}

/// Partitions per broker, by name.
fn counts(holders: &HashMap<u16, String>) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for holder in holders.values() {
        *counts.entry(holder.as_str()).or_default() += 1;
    }
    counts
}

fn show(counts: &BTreeMap<&str, usize>) -> String {
    let each: Vec<String> = counts.iter().map(|(b, n)| format!("{b} {n}")).collect();
    each.join(", ")
}

/// Starts brokers `b2`…`bn` beside the market's first (`b1`) and waits
/// until all `n` are members and the partitions are split evenly: every
/// partition held, none holding more than ⌈16 / n⌉. Who holds which.
pub async fn start_and_split(market: &mut Market, n: usize) -> Result<HashMap<u16, String>> {
    for i in 2..=n {
        market.add_broker(&format!("b{i}"), &[])?;
    }
    let market = &*market;
    let share = (PARTITIONS as usize).div_ceil(n);
    let ids: Vec<String> = (1..=n).map(|i| format!("b{i}")).collect();
    let started = Instant::now();
    let split = wait_for(Duration::from_secs(90), async || {
        let leases = Leases::read(market).await.ok()?;
        let even = leases.holders.len() == PARTITIONS as usize
            && counts(&leases.holders).values().all(|&c| c <= share)
            && ids.iter().all(|id| leases.members.contains(id));
        even.then_some(leases.holders)
    })
    .await;
    let split = match split {
        Ok(split) => split,
        Err(e) => bail!("{n} brokers did not split the partitions: {e}\n{}", market.logs()),
    };
    println!(
        "{n} broker(s) hold the {PARTITIONS} partitions {} ({:.1} s after the last started)",
        show(&counts(&split)),
        started.elapsed().as_secs_f64()
    );
    Ok(split)
}

/// After the run: which broker started how many of `jobs` (by the holder
/// of each job's partition at the split), and whether the split held.
pub async fn report_split(market: &mut Market, split: &HashMap<u16, String>, jobs: &[JobId]) -> Result<()> {
    let mut started: BTreeMap<&str, usize> = BTreeMap::new();
    for job in jobs {
        let holder = split.get(&partition_of(job)).map_or("none", String::as_str);
        *started.entry(holder).or_default() += 1;
    }
    println!(
        "jobs per broker (the holder of each job's partition): {}",
        show(&started)
    );
    let after = Leases::read(market).await?.holders;
    if &after != split {
        println!(
            "note: the partitions moved during the run: {} before, {} after",
            show(&counts(split)),
            show(&counts(&after))
        );
    }
    for broker in std::iter::once(&mut market.broker).chain(&mut market.brokers) {
        if broker.exited() {
            bail!(
                "broker {} exited during the run:\n{}",
                broker.name(),
                broker.log()
            );
        }
    }
    Ok(())
}
