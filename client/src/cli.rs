//! Command-line shape of `vmlot` and its exit codes.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use vmlot_schemas::JobId;

/// Exit code when data failed verification (tampered, missing or refused).
pub const EXIT_INTEGRITY: u8 = 3;
/// Exit code when NATS could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;

#[derive(Parser)]
#[command(name = "vmlot", version, about = "Client of the vmlot VM time-segment market")]
pub struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "VMLOT_NATS",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// Print JSON instead of a human table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Move files through the content-addressed store.
    #[command(subcommand)]
    Store(crate::store::StoreCommand),
    /// Push an image's files and write its description (JSON) for `submit --image`.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Submit a job: push the image, hold the budget, start the segments.
    Submit(Box<crate::market::SubmitArgs>),
    /// A job's state and its settled segments.
    Status { job: JobId },
    /// Follow a job live until it ends: progress bar and console tail.
    Watch { job: JobId },
    /// The guest's console across the job's settled segments, in order.
    Logs {
        job: JobId,
        /// Keep printing segments as they settle, until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Write the job's last checkpoint (machine state, disks) and a manifest.json to a directory.
    Fetch {
        job: JobId,
        #[arg(short, long)]
        output: std::path::PathBuf,
        /// Also for a job that ended other than done (cancelled, budget spent, failed).
        #[arg(long)]
        any_state: bool,
    },
    /// Cancel a job.
    Cancel { job: JobId },
    /// Providers seen recently.
    Providers,
    /// Open lots and running jobs.
    Market,
    /// The books: lines filtered by account, job, provider, kind and time;
    /// `ledger verify` replays them all.
    Ledger(Box<crate::books::LedgerArgs>),
    /// An account's statement for a period: opening balance, entries, closing balance.
    Statement {
        /// NAME or user:NAME, provider:ID-or-NAME, escrow:JOB, operator.
        account: String,
        /// YYYY-MM (a month), YYYY or YYYY-MM-DD.
        #[arg(long)]
        period: String,
    },
    /// Balances: one account's, or every account's.
    Balance { account: Option<String> },
    /// Operator commands.
    #[command(subcommand)]
    Admin(crate::books::AdminCommand),
}

#[derive(Subcommand)]
pub enum ImageCommand {
    Push {
        #[command(flatten)]
        files: crate::market::ImageArgs,
        /// Where to write the description (default: stdout).
        #[arg(short, long)]
        output: Option<std::path::PathBuf>,
    },
}

impl Cli {
    pub async fn run(&self) -> Result<()> {
        use crate::market;
        match &self.command {
            Command::Store(cmd) => cmd.run(self).await,
            Command::Image(ImageCommand::Push { files, output }) => {
                let image = market::push_image(self, files).await?;
                let text = serde_json::to_string_pretty(&image)?;
                match output {
                    Some(path) => std::fs::write(path, text + "\n")?,
                    None => println!("{text}"),
                }
                Ok(())
            }
            Command::Submit(args) => market::submit(self, args).await,
            Command::Status { job } => market::show_status(self, *job).await,
            Command::Watch { job } => crate::watch::watch(self, &self.connect().await?, *job).await,
            Command::Logs { job, follow } => crate::logs::logs(self, *job, *follow).await,
            Command::Fetch {
                job,
                output,
                any_state,
            } => crate::fetch::fetch(self, *job, output, *any_state).await,
            Command::Cancel { job } => market::cancel(self, *job).await,
            Command::Providers => market::providers(self).await,
            Command::Market => market::market(self).await,
            Command::Ledger(args) => crate::books::ledger(self, args).await,
            Command::Statement { account, period } => crate::books::statement(self, account, period).await,
            Command::Balance { account } => crate::books::balance(self, account.as_deref()).await,
            Command::Admin(cmd) => crate::books::admin(self, cmd).await,
        }
    }

    pub async fn connect(&self) -> Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nats
            .split(',')
            .map(|u| u.trim().parse())
            .collect::<Result<_, _>>()?;
        async_nats::ConnectOptions::new()
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(addrs)
            .await
            .map_err(|e| anyhow::Error::new(Unreachable(format!("cannot reach NATS at {}: {e}", self.nats))))
    }
}

/// NATS could not be reached (exit code [`EXIT_UNREACHABLE`]).
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Exit code when the broker refused the request.
pub const EXIT_REFUSED: u8 = 5;
/// Exit code when the job, lot or provider named does not exist.
pub const EXIT_NOT_FOUND: u8 = 6;
/// Exit code of `watch`, `logs --follow` and `fetch` when the job is not
/// done (still running, or ended other than done).
pub const EXIT_JOB_NOT_DONE: u8 = 8;

/// Scripts can tell a refused (tampered, missing) object from an outage.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<Unreachable>().is_some() {
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    if let Some(refused) = err.downcast_ref::<crate::market::Refused>() {
        return ExitCode::from(if refused.0.code == "not-found" {
            EXIT_NOT_FOUND
        } else {
            EXIT_REFUSED
        });
    }
    if err.downcast_ref::<crate::books::BooksDoNotVerify>().is_some() {
        return ExitCode::from(EXIT_INTEGRITY);
    }
    if err.downcast_ref::<crate::market::JobDidNotFinish>().is_some() {
        return ExitCode::from(EXIT_JOB_NOT_DONE);
    }
    match err.downcast_ref::<vmlot_cas::CasError>() {
        Some(
            vmlot_cas::CasError::CorruptBlock { .. }
            | vmlot_cas::CasError::MissingBlock(_)
            | vmlot_cas::CasError::BlockSize { .. }
            | vmlot_cas::CasError::BlockEncoding { .. }
            | vmlot_cas::CasError::MissingManifest(_)
            | vmlot_cas::CasError::Manifest { .. },
        ) => ExitCode::from(EXIT_INTEGRITY),
        _ => ExitCode::FAILURE,
    }
}
