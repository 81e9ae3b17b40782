//! `vmlot admin`: the operator's commands. `init` sets up a deployment's
//! identities (keys, the server's authentication, the broker's
//! credentials), `add` issues a participant's credentials, both on the
//! operator's machine with no NATS needed; a credit goes through the
//! broker, which alone writes the books, and only from an operator.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use vmlot_identity::Deployment;
use vmlot_schemas::caller::Role;
use vmlot_schemas::ledger::CreditRequest;
use vmlot_schemas::{Money, WIRE_VERSION};

use crate::commands::accounts::resolve_account;
use crate::context::Context;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Set up a deployment in DIR: operator, accounts and signing keys, a
    /// CA and the server's TLS certificate, the server's `auth.conf`
    /// (include it in nats-server.conf) and the broker's credentials.
    Init {
        #[arg(long, env = "VMLOT_DEPLOYMENT", default_value = "vmlot-deployment")]
        dir: PathBuf,
        /// A name or address clients reach the server by, for its
        /// certificate (repeat; default localhost, 127.0.0.1, 10.0.2.2).
        #[arg(long = "tls-host")]
        tls_hosts: Vec<String>,
    },
    /// Issue credentials to a new participant (written to
    /// DIR/creds/ROLE-NAME.creds and printed as its path). A provider's
    /// name is its id: a new UUID when none is given.
    Add {
        /// provider, submitter, operator, accountant (or broker).
        role: Role,
        /// The participant's name (1-64 of A-Z a-z 0-9 _ -); for a provider, its id.
        name: Option<String>,
        #[arg(long, env = "VMLOT_DEPLOYMENT", default_value = "vmlot-deployment")]
        dir: PathBuf,
    },
    /// Fund a user account (operator only).
    Credit {
        /// NAME or user:NAME.
        account: String,
        /// A plain decimal, e.g. 100 or 12.50.
        amount: String,
        #[arg(long, default_value = "CRD")]
        unit: String,
        #[arg(long, default_value = "")]
        memo: String,
        /// The request's id: retrying with the same id credits once (default: a new one).
        #[arg(long)]
        id: Option<uuid::Uuid>,
    },
}

/// `vmlot admin …`.
pub async fn admin(ctx: &Context, command: &AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Init { dir, tls_hosts } => {
            let d = if tls_hosts.is_empty() {
                Deployment::create(dir)?
            } else {
                Deployment::create_for(dir, tls_hosts)?
            };
            println!("deployment in {}", d.dir().display());
            println!(
                "  server: include {} in nats-server.conf",
                d.auth_conf().display()
            );
            println!(
                "  broker: --creds {} --books-creds {}",
                d.creds_path(Role::Broker, "broker").display(),
                d.books_creds_path().display()
            );
            println!("  everyone: --tls-ca {}", d.tls_ca().display());
            Ok(())
        }
        AdminCommand::Add { role, name, dir } => {
            let d = Deployment::open(dir)?;
            let name = match (name, role) {
                (Some(n), _) => n.clone(),
                (None, Role::Provider) => vmlot_schemas::ProviderId::new().to_string(),
                (None, _) => anyhow::bail!("a {role} needs a name"),
            };
            println!("{}", d.add(*role, &name)?.display());
            Ok(())
        }
        AdminCommand::Credit {
            account,
            amount,
            unit,
            memo,
            id,
        } => {
            let account = resolve_account(ctx, account).await?;
            let amount = vmlot_ledger::parse_amount(amount).map_err(anyhow::Error::msg)?;
            let req = CreditRequest {
                version: WIRE_VERSION,
                id: id.unwrap_or_else(uuid::Uuid::new_v4),
                account: account.clone(),
                amount: Money::new(amount, unit.clone()),
                memo: memo.clone(),
            };
            let tx = ctx.api().await?.credit(&req).await?;
            if ctx.json {
                print_json(&tx)?;
            } else {
                println!("credited {amount} {unit} to {account} (transaction {})", tx.id);
            }
            Ok(())
        }
    }
}
