//! `vmlot admin`: the operator's commands. A credit goes through the
//! broker, which alone writes the books.

use anyhow::Result;
use clap::Subcommand;
use vmlot_schemas::ledger::CreditRequest;
use vmlot_schemas::{Money, WIRE_VERSION};

use crate::commands::accounts::resolve_account;
use crate::context::Context;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum AdminCommand {
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
        #[arg(long, env = "VMLOT_OPERATOR_TOKEN", hide_env_values = true)]
        operator_token: String,
    },
}

/// `vmlot admin …`.
pub async fn admin(ctx: &Context, command: &AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Credit {
            account,
            amount,
            unit,
            memo,
            id,
            operator_token,
        } => {
            let account = resolve_account(ctx, account).await?;
            let amount = vmlot_ledger::parse_amount(amount).map_err(anyhow::Error::msg)?;
            let req = CreditRequest {
                version: WIRE_VERSION,
                id: id.unwrap_or_else(uuid::Uuid::new_v4),
                account: account.clone(),
                amount: Money::new(amount, unit.clone()),
                memo: memo.clone(),
                operator_token: operator_token.clone(),
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
