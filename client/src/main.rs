//! `vmlot`: the command-line client. Thin: it parses arguments and calls the
//! same library functions the tests use.

use std::process::ExitCode;

use clap::Parser;

mod books;
mod cli;
mod fetch;
mod logs;
mod market;
mod store;
mod watch;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMLOT_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    match cli.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vmlot: {err:#}");
            cli::exit_code(&err)
        }
    }
}
