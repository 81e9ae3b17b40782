//! `vmlot-bench`: measurements of vmlot against baselines taken in the same
//! run on the same machine (raw SHA-1, raw JetStream, rsync).

mod baseline;
mod brokers;
mod cas;
mod deterministic;
mod farm;
mod ledger;
mod market;
mod rescan;
mod segment;
mod xensave;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "vmlot benchmarks; every figure beside its baseline from the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Settled segments per second with 1, 2, 3… brokers sharing one server's jobs, against its ack rate.
    Brokers(brokers::Args),
    /// Content-addressed transfer of real QEMU checkpoints (from scripts/qemu-checkpoints.py).
    Cas(cas::Args),
    /// Deterministic QEMU segments against plain TCG on the same guest; the canonical digest against SHA-1/SHA-256.
    Deterministic(deterministic::Args),
    /// OS Farm: the seed's table through the store (two pairs of recipes' images against rsync).
    Farm(farm::Args),
    /// Ledger verify and filtered queries over ~1 M records, against a raw read of the same messages.
    Ledger(ledger::Args),
    /// Settled segments per second on the synthetic driver, against JetStream's ack rate.
    Market(market::Args),
    /// A broker's search for its unsettled jobs through their index, against reading every job record, as settled jobs pile up.
    Rescan(rescan::Args),
    /// Per-segment overhead of a real QEMU guest: save, upload, download, restore, against a whole-file copy.
    Segment(segment::Args),
    /// Two `xl save` files: fixed 4 KiB, FastCDC and Xen-record chunking against rsync and raw SHA-1.
    XenSave(xensave::Args),
}

/// The client's allocator (`client/src/main.rs`): the books' benchmark
/// runs `verify` in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMLOT_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().bench {
        Bench::Brokers(args) => brokers::run(args).await,
        Bench::Cas(args) => cas::run(args).await,
        Bench::Deterministic(args) => deterministic::run(args).await,
        Bench::Farm(args) => farm::run(args).await,
        Bench::Ledger(args) => ledger::run(args).await,
        Bench::Market(args) => market::run(args).await,
        Bench::Rescan(args) => rescan::run(args).await,
        Bench::Segment(args) => segment::run(args).await,
        Bench::XenSave(args) => xensave::run(args).await,
    }
}
