//! `vmlot-provider`: reads its settings (file, environment, flags), picks
//! its drivers, runs [`vmlot_provider::daemon::run`] until SIGINT or SIGTERM.
//! `vmlot-provider doctor` instead checks the host, the settings, the
//! credentials and the NATS server, says what is missing, and exits 1 if
//! anything is ([`vmlot_provider::doctor`]). `vmlot-provider completions
//! SHELL` and `vmlot-provider man-pages DIR` (hidden) print what is
//! generated from this command line ([`vmlot_telemetry::Generate`]).

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use vmlot_provider::config::{ProviderConfig, Settings};
use vmlot_provider::logging::{self, LogFormat};
use vmlot_telemetry::Generate;

#[derive(Parser)]
#[command(
    name = "vmlot-provider",
    version,
    about = "Sells time segments of this machine on the vmlot market",
    after_help = "With no subcommand, runs the provider daemon. Every flag may also come after a subcommand."
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "VMLOT_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(flatten)]
    access: vmlot_identity::Access,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Checks that this host can serve as a provider (QEMU, KVM, Xen, the
    /// icount-stop plugin, disk space, the NATS server, the credentials)
    /// and says what is missing; exits 0 when nothing is (warnings
    /// allowed), 1 otherwise.
    Doctor {
        /// One JSON object instead of lines of text.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// The command line with every top-level flag global, so the daemon's
    /// flags (`--config`, `--nats`, `--creds`, …) mean the same before or
    /// after `doctor`.
    fn command_global() -> clap::Command {
        Self::command().mut_args(|arg| match arg.get_id().as_str() {
            "help" | "version" => arg,
            _ => arg.global(true),
        })
    }

    fn parse_global() -> Self {
        let matches = Self::command_global().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    if let Some(generate) = Generate::requested() {
        generate.run(Cli::command_global(), &mut std::io::stdout())?;
        return Ok(ExitCode::SUCCESS);
    }
    let cli = Cli::parse_global();
    if let Some(Command::Doctor { json }) = cli.command {
        // No log subscriber: the report is the output, not the NATS
        // client's own complaints about a failed connection.
        let report = vmlot_provider::doctor::examine(&cli.nats, &cli.access, &cli.settings).await;
        if json {
            println!("{}", report.json());
        } else {
            print!("{}", report.text());
        }
        return Ok(ExitCode::from(report.exit_code()));
    }
    logging::init(cli.log_format);
    let mut config = ProviderConfig::load(&cli.settings).context("reading the provider's settings")?;
    let drivers = vmlot_provider::setup::drivers(&config)?;
    let (options, creds) = cli.access.options()?;
    // Among strangers a provider is who its credentials say: their name is
    // its id, and the server lets it bid, beat and report only under it.
    if let Some(creds) = &creds {
        let id = vmlot_provider::setup::identity(&creds.caller, cli.settings.id)?;
        config.id = id;
    }
    let client = vmlot_identity::connect_daemon(&cli.nats, options).await?;
    vmlot_provider::daemon::run(client, config, drivers, vmlot_telemetry::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let matches = Cli::command_global()
            .try_get_matches_from(std::iter::once("vmlot-provider").chain(args.iter().copied()))?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn the_daemon_is_the_default_and_flags_go_either_side_of_doctor() {
        let daemon = parse(&["--nats", "nats://a:1", "--slots", "2", "--open"]).unwrap();
        assert!(daemon.command.is_none());
        assert_eq!(
            (daemon.nats.as_str(), daemon.settings.slots),
            ("nats://a:1", Some(2))
        );
        assert!(daemon.access.open);

        for args in [
            &[
                "--config",
                "/etc/p.toml",
                "--slots",
                "3",
                "--creds",
                "/c",
                "doctor",
                "--json",
            ][..],
            &[
                "doctor",
                "--config",
                "/etc/p.toml",
                "--json",
                "--slots",
                "3",
                "--creds",
                "/c",
            ][..],
        ] {
            let cli = parse(args).unwrap();
            assert!(
                matches!(cli.command, Some(Command::Doctor { json: true })),
                "{args:?}"
            );
            assert_eq!(
                cli.settings.config.as_deref(),
                Some(std::path::Path::new("/etc/p.toml"))
            );
            assert_eq!(cli.settings.slots, Some(3));
            assert_eq!(cli.access.creds.as_deref(), Some(std::path::Path::new("/c")));
        }
        let late = parse(&["doctor", "--nats", "nats://b:2", "--open"]).unwrap();
        assert_eq!(late.nats, "nats://b:2");
        assert!(late.access.open);
        assert!(parse(&["--hypervisors", "vmware"]).is_err());
    }

    /// One page for the daemon and one for `doctor`, and completions
    /// that know `doctor` but not the hidden generators.
    #[test]
    fn man_pages_and_completions_for_the_daemon_and_doctor() {
        let dir = tempfile::tempdir().unwrap();
        let man = Generate::ManPages {
            dir: dir.path().to_owned(),
        };
        man.run(Cli::command_global(), &mut std::io::sink()).unwrap();
        let mut pages: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        pages.sort();
        assert_eq!(pages, ["vmlot-provider-doctor.1", "vmlot-provider.1"]);
        let doctor = std::fs::read_to_string(dir.path().join("vmlot-provider-doctor.1")).unwrap();
        assert!(doctor.contains(".TH vmlot-provider-doctor 1"), "{doctor}");
        assert!(
            doctor.contains("VMLOT_PROVIDER_CONFIG"),
            "the global flags on doctor's page"
        );

        let mut bash = Vec::new();
        let completions = Generate::Completions {
            shell: vmlot_telemetry::Shell::Bash,
        };
        completions.run(Cli::command_global(), &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        assert!(bash.contains("doctor") && bash.contains("--idle-load"), "{bash}");
        assert!(!bash.contains("man-pages"), "the generators stay hidden");
    }
}
