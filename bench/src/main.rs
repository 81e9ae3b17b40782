//! `vmlot-bench`: measurements of vmlot against baselines taken in the same
//! run on the same machine (raw SHA-1, raw JetStream, rsync).

mod cas;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "vmlot benchmarks; every figure beside its baseline from the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Content-addressed transfer of real QEMU checkpoints (from scripts/qemu-checkpoints.py).
    Cas(cas::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Cas(args) => cas::run(args).await,
    }
}
