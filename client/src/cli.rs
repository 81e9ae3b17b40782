//! The command line of `vmlot`: global options and the commands, as clap
//! parses them. Each command's own arguments live with the command; this
//! module only names them, and `main` dispatches. `vmlot_telemetry::Generate`
//! holds the hidden commands that print completions and man pages made
//! from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vmlot_schemas::JobId;

use crate::commands::{admin, deposit, image, ledger, recipe, store, submit};
use crate::context::Context;

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
    #[command(flatten)]
    pub access: vmlot_identity::Access,
    /// On an open server (--open), who to call the broker as: ROLE/NAME.
    #[arg(long = "as", global = true, env = "VMLOT_AS")]
    pub open_as: Option<vmlot_schemas::caller::Caller>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// What the commands get from the global options.
    pub fn context(&self) -> Context {
        Context::new(
            self.nats.clone(),
            self.json,
            self.access.clone(),
            self.open_as.clone(),
        )
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Move files through the content-addressed store.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Images: push an image's files, or ask OS Farm to build a recipe's.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Submit a job: push the image, hold the budget, start the segments.
    Submit(Box<submit::SubmitArgs>),
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
    /// Write the job's last checkpoint (machine state, disks), the kernel and
    /// initrd it boots from and a manifest.json to a directory: a bundle
    /// `vmlot run-local` resumes.
    Fetch {
        job: JobId,
        #[arg(short, long)]
        output: PathBuf,
        /// Also for a job still running (its latest checkpoint) or one that
        /// ended other than done (cancelled, budget spent, failed).
        #[arg(long)]
        any_state: bool,
    },
    /// Resume a fetched bundle on this machine's QEMU, outside the market,
    /// the console on standard output, until the guest powers off.
    RunLocal {
        dir: PathBuf,
        /// auto (KVM if it works here), kvm or tcg; a state saved under
        /// one accelerator restores most safely under the same. A
        /// deterministic (quorum) job's state restores only under TCG with
        /// an instruction-count clock, which auto and tcg then mean.
        #[arg(long, default_value = "auto")]
        accel: String,
    },
    /// Cancel a job.
    Cancel { job: JobId },
    /// End a job after the segment it runs now, keeping that checkpoint.
    Stop { job: JobId },
    /// Providers seen recently.
    Providers,
    /// Each provider's standing: results valid, and refused by reason.
    Standing,
    /// Open lots and running jobs.
    Market,
    /// The books: lines filtered by account, job, provider, kind and time;
    /// `ledger verify` replays them all.
    Ledger(Box<ledger::LedgerArgs>),
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
    /// A provider's deposit: put earnings in, or release them.
    #[command(subcommand)]
    Deposit(deposit::DepositCommand),
    /// Operator commands.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

impl Command {
    /// Whether the command reads the books: a stream of many small
    /// messages on one connection, which a single-threaded runtime takes
    /// apart faster (its connection's reader and the command's reader
    /// never wake each other across threads: `ledger verify` of 1 M
    /// records 16 % faster, `docs/BENCHMARKS.md`).
    pub fn reads_the_books(&self) -> bool {
        matches!(
            self,
            Command::Ledger(_) | Command::Statement { .. } | Command::Balance { .. }
        )
    }
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Push an image's files and write its description (JSON) for `submit --image`.
    Push {
        #[command(flatten)]
        files: image::ImageArgs,
        /// Where to write the description (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Ask OS Farm for a recipe's image: built now, or the one built before.
    Build(recipe::RecipeArgs),
    /// The images OS Farm has built.
    Ls,
    /// One image, by its recipe's id.
    Show { recipe_id: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use vmlot_telemetry::Generate;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// One man page per command, nested ones too, and completions that
    /// know the commands but not the hidden generators.
    #[test]
    fn man_pages_and_completions_from_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let man = Generate::ManPages {
            dir: dir.path().to_owned(),
        };
        man.run(Cli::command(), &mut std::io::sink()).unwrap();
        for page in ["vmlot", "vmlot-submit", "vmlot-store-push", "vmlot-ledger-verify"] {
            let text = std::fs::read_to_string(dir.path().join(format!("{page}.1"))).unwrap();
            assert!(text.contains(&format!(".TH {page} 1")), "{page}: {text}");
        }
        for hidden in ["vmlot-help.1", "vmlot-completions.1", "vmlot-man-pages.1"] {
            assert!(!dir.path().join(hidden).exists(), "{hidden}");
        }
        let mut bash = Vec::new();
        let completions = Generate::Completions {
            shell: vmlot_telemetry::Shell::Bash,
        };
        completions.run(Cli::command(), &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("run-local") && bash.contains("--any-state"),
            "{bash}"
        );
        assert!(!bash.contains("man-pages"), "the generators stay hidden");
    }
}
