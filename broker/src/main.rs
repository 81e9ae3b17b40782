//! `vmlot-broker`: reads its settings (defaults, `--config FILE`, the
//! environment, flags: [`settings`]), sets up logging, runs
//! [`vmlot_broker::run`] until SIGINT or SIGTERM. `vmlot-broker completions
//! SHELL` and `vmlot-broker man-pages DIR` instead print what is generated
//! from this command line ([`vmlot_telemetry::Generate`]).

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use vmlot_broker::logging::{self, LogFormat};

mod settings;

#[derive(Parser)]
#[command(
    name = "vmlot-broker",
    version,
    about = "The vmlot broker: time-segment lots on NATS",
    after_help = "Settings: the defaults shown, then the TOML file --config names (each key is its flag's name in snake_case: bid_window_ms = 2000, partial_pay = \"none\", min_deposit = \"10 CRD\"; an unknown key is refused), then the environment, then flags, the later winning key by key. --nats, --creds, --tls-ca, --open, --books-creds and --log-format are flags and environment only."
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[command(flatten)]
    settings: settings::Settings,
    #[command(flatten)]
    access: vmlot_identity::Access,
    /// The broker's credentials in the books' account, where the ledger and
    /// the job records live (`vmlot admin init` writes
    /// `creds/broker-books.creds`). Not needed with --open.
    #[arg(long, env = "VMLOT_BOOKS_CREDS")]
    books_creds: Option<std::path::PathBuf>,
    /// Log lines as text or as JSON objects (filter with VMLOT_LOG).
    #[arg(long, env = "VMLOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Some(generate) = vmlot_telemetry::Generate::requested() {
        return Ok(generate.run(Cli::command(), &mut std::io::stdout())?);
    }
    let matches = Cli::command().get_matches();
    let args = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(args.log_format);
    let settings = args
        .settings
        .load(&matches)
        .context("reading the broker's settings")?;
    let (client, creds) = connect(&args.access, &args.nats).await?;
    // The server's INFO says whether it checks identities.
    let open = !client.server_info().auth_required;
    let books = if open {
        if !args.access.open {
            anyhow::bail!(
                "the NATS server at {} checks no credentials: set it up with `vmlot admin init`, or run the broker with --open to accept that anyone may be anyone",
                args.nats
            );
        }
        tracing::warn!(
            "running OPEN (--open): the server checks no identities, so anyone on it may be anyone, and the books share the market's account"
        );
        client.clone()
    } else {
        if let Some(creds) = creds {
            tracing::info!(user = %creds.caller, "connected with credentials");
        }
        let Some(path) = args.books_creds.clone() else {
            anyhow::bail!(
                "the books live in an account of their own: pass --books-creds (creds/broker-books.creds of the deployment)"
            );
        };
        let access = vmlot_identity::Access {
            creds: Some(path),
            ..args.access.clone()
        };
        let (books, creds) = connect(&access, &args.nats).await?;
        if let Some(creds) = creds {
            tracing::info!(user = %creds.caller, "connected to the books' account");
        }
        books
    };
    let config = settings.broker_config(open);
    tracing::info!(block_hash = %config.block_hash, "block store names");
    vmlot_broker::run(client, books, config, vmlot_telemetry::shutdown_signal()).await?;
    Ok(())
}

/// Connects with `access` to `urls`, once the first connection is up.
async fn connect(
    access: &vmlot_identity::Access,
    urls: &str,
) -> anyhow::Result<(async_nats::Client, Option<vmlot_identity::Creds>)> {
    let (options, creds) = access.options()?;
    Ok((vmlot_identity::connect_daemon(urls, options).await?, creds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_telemetry::Generate;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The generated files describe the daemon's own flags, the settings'
    /// among them, and not the hidden generators.
    #[test]
    fn man_page_and_completions_from_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let man = Generate::ManPages {
            dir: dir.path().join("man"),
        };
        man.run(Cli::command(), &mut std::io::sink()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/vmlot-broker.1")).unwrap();
        assert!(page.contains(".TH vmlot-broker 1"), "{page}");
        for flag in [
            r"\-\-config",
            r"\-\-bid\-window\-ms",
            r"\-\-books\-creds",
            "VMLOT_NATS",
        ] {
            assert!(page.contains(flag), "{flag} in the man page");
        }
        let mut bash = Vec::new();
        let completions = Generate::Completions {
            shell: vmlot_telemetry::Shell::Bash,
        };
        completions.run(Cli::command(), &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("--bid-window-ms") && bash.contains("--open"),
            "{bash}"
        );
        assert!(!bash.contains("man-pages"), "the generators stay hidden");
    }
}
