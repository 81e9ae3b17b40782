//! The broker's search for the jobs it must run (at its start, on taking
//! a partition, at each rescan between lease rounds) as the market's
//! history grows: read through the index of unsettled jobs
//! (`JobStore::unsettled_in`), against the way it was read before the
//! index, which `vmlot list` still uses (`JobStore::all`: every key of the
//! job bucket listed and every record read), in the same run on the same
//! records. The bucket is filled with a fixed number of unsettled jobs
//! (created as a submission creates them: entry, then record) and a
//! growing number of settled ones, and both reads are timed at each size.

use std::time::Instant;

use anyhow::{Result, ensure};
use async_nats::jetstream;
use chrono::Utc;
use rust_decimal::Decimal;
use vmlot_broker::state::JobStore;
use vmlot_schemas::market::{Checkpoint, Image, JobSpec, JobState, JobStatus, ResultCheck, SegmentCount};
use vmlot_schemas::subjects::{self, PARTITIONS};
use vmlot_schemas::{HypervisorKind, JobId, ManifestId, Money, VmConfig};
use vmlot_tests::{Fsync, NatsServer};

use crate::baseline::Cpu;

#[derive(clap::Args)]
pub struct Args {
    /// Jobs not yet settled, the same at every size.
    #[arg(long, default_value_t = 500)]
    unsettled: usize,
    /// Settled jobs in the bucket at each measured size, ascending.
    #[arg(long, value_delimiter = ',', default_value = "0,10000,100000")]
    settled: Vec<usize>,
    /// Acknowledgements in flight while filling.
    #[arg(long, default_value_t = 4096)]
    in_flight: usize,
}

pub async fn run(args: Args) -> Result<()> {
    ensure!(
        args.settled.windows(2).all(|w| w[0] <= w[1]),
        "--settled: sizes ascending"
    );
    // JetStream's default sync interval: what is measured is reads.
    let server = NatsServer::start_with(Fsync::Default)?;
    let js = jetstream::new(server.books_client().await?);
    let store = JobStore::open(&js, 1).await?;
    println!(
        "nats-server with JetStream's default sync interval (reads only are measured); {} unsettled jobs, settled jobs growing to {:?}; one broker holding all {PARTITIONS} partitions",
        args.unsettled, args.settled
    );
    for _ in 0..args.unsettled {
        store.create(&job(JobState::Running, false)).await?;
    }
    println!(
        "\n| settled jobs in the bucket | unsettled jobs | before the index: every record read, s | records read | through the index, s | records read | before / index | CPU s before: nats-server / broker | CPU s index: nats-server / broker |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let all: Vec<u16> = (0..PARTITIONS).collect();
    let mut filled = 0;
    for &size in &args.settled {
        fill(&js, size - filled, args.in_flight).await?;
        filled = size;

        let cpu = Cpu::now(&server);
        let started = Instant::now();
        let every = store.all().await?;
        let before_s = started.elapsed().as_secs_f64();
        let before_cpu = cpu.stop(&server);
        let old: Vec<JobId> = every
            .iter()
            .filter(|s| !(s.state.is_final() && s.refunded))
            .map(|s| s.job)
            .collect();

        let cpu = Cpu::now(&server);
        let started = Instant::now();
        let indexed = store.unsettled_in(&all).await?;
        let index_s = started.elapsed().as_secs_f64();
        let index_cpu = cpu.stop(&server);

        let new: Vec<JobId> = indexed.iter().map(|s| s.job).collect();
        ensure!(
            old == new && new.len() == args.unsettled,
            "both ways find the {} unsettled jobs: {} before, {} through the index",
            args.unsettled,
            old.len(),
            new.len()
        );
        println!(
            "| {size} | {} | {before_s:.3} | {} | {index_s:.3} | {} | {:.1} | {:.2} / {:.2} | {:.2} / {:.2} |",
            args.unsettled,
            every.len(),
            indexed.len(),
            before_s / index_s,
            before_cpu.0,
            before_cpu.1,
            index_cpu.0,
            index_cpu.1,
        );
    }
    Ok(())
}

/// `n` more settled jobs' records, published pipelined on their KV subjects
/// (as the bucket's `put` writes them; settled jobs have no index entry).
async fn fill(js: &jetstream::Context, n: usize, in_flight: usize) -> Result<()> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        let status = job(JobState::Done, true);
        let subject = format!("$KV.{}.{}", subjects::JOB_BUCKET, status.job);
        let ack = js.publish(subject, serde_json::to_vec(&status)?.into()).await?;
        acks.push(std::future::IntoFuture::into_future(ack));
        if acks.len() >= in_flight {
            futures::StreamExt::next(&mut acks).await.transpose()?;
        }
    }
    while futures::StreamExt::next(&mut acks).await.transpose()?.is_some() {}
    Ok(())
}

/// A job record in `state`, its escrow refunded or not.
fn job(state: JobState, refunded: bool) -> JobStatus {
    let crd = |amount: i64| Money::new(Decimal::from(amount), "CRD");
    let spec = JobSpec {
        image: Image {
            vm: VmConfig {
                hypervisor: HypervisorKind::Qemu,
                arch: "x86_64".into(),
                memory_mib: 128,
                vcpus: 1,
                cmdline: String::new(),
            },
            kernel: ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, b"kernel"),
            initrd: None,
            disks: vec![],
        },
        segment_seconds: 60,
        segments: SegmentCount::Count(3),
        redundancy: 1,
        check: ResultCheck::Continuation,
        reserve_price: crd(1),
        budget: crd(10),
        account: "alice".into(),
    };
    let start = Checkpoint {
        machine_state: None,
        disks: vec![],
        stored_bytes: 20 << 20,
        memory: None,
    };
    JobStatus {
        state,
        refunded,
        ..JobStatus::submitted(JobId::new(), spec, start, Utc::now())
    }
}
