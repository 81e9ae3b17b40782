//! `vmlot`: the command-line client. Thin: it parses arguments, builds the
//! [`context::Context`] from the global options and hands it to one
//! command; the commands call the same library the tests use
//! (`vmlot_client::api`).
//!
//! Layers, each importing only those below it: `cli` (what clap parses) →
//! `commands` (one module per command or group) → `output` (JSON or text,
//! tables, exit codes) → `context` (the NATS connection and what is built
//! on it). `vmlot completions SHELL` and `vmlot man-pages DIR` (hidden)
//! print what is generated from `cli` instead ([`vmlot_telemetry::Generate`]).

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod context;
mod output;

use cli::{Cli, Command, ImageCommand};
use commands::{
    admin, balances, deposit, fetch, image, ledger, logs, market, recipe, run_local, status, submit, watch,
};

/// `vmlot ledger verify` takes a million small messages apart: glibc's
/// allocator was a third of its CPU (freeing on another thread than the
/// one that allocated takes its arenas' locks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if let Some(generate) = vmlot_telemetry::Generate::requested() {
        return match generate.run(<Cli as clap::CommandFactory>::command(), &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("vmlot: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMLOT_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Reading the books, one thread; anything else (transfers hash and
    // check blocks as they come), a worker per core.
    let runtime = if cli.command.reads_the_books() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(&cli)),
        Err(err) => Err(anyhow::Error::new(err).context("start the async runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vmlot: {err:#}");
            output::exit_code(&err)
        }
    }
}

/// Runs the command `cli` names.
async fn run(cli: &Cli) -> anyhow::Result<()> {
    let ctx = &cli.context();
    match &cli.command {
        Command::Store(cmd) => cmd.run(ctx).await,
        Command::Image(ImageCommand::Push { files, output }) => {
            image::push(ctx, files, output.as_deref()).await
        }
        Command::Image(ImageCommand::Build(args)) => recipe::build_command(ctx, args).await,
        Command::Image(ImageCommand::Ls) => recipe::list(ctx).await,
        Command::Image(ImageCommand::Show { recipe_id }) => recipe::show(ctx, recipe_id).await,
        Command::Submit(args) => submit::submit(ctx, args).await,
        Command::Status { job } => status::status(ctx, *job).await,
        Command::Watch { job } => watch::watch(ctx, *job).await,
        Command::Logs { job, follow } => logs::logs(ctx, *job, *follow).await,
        Command::Fetch {
            job,
            output,
            any_state,
        } => fetch::fetch(ctx, *job, output, *any_state).await,
        Command::RunLocal { dir, accel } => run_local::run_local(dir, accel).await,
        Command::Cancel { job } => status::cancel(ctx, *job).await,
        Command::Stop { job } => status::stop(ctx, *job).await,
        Command::Providers => market::providers(ctx).await,
        Command::Standing => market::standing(ctx).await,
        Command::Market => market::market(ctx).await,
        Command::Ledger(args) => ledger::ledger(ctx, args).await,
        Command::Statement { account, period } => balances::statement(ctx, account, period).await,
        Command::Balance { account } => balances::balance(ctx, account.as_deref()).await,
        Command::Deposit(cmd) => deposit::deposit(ctx, cmd).await,
        Command::Admin(cmd) => admin::admin(ctx, cmd).await,
    }
}
