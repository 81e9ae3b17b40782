//! `vmlot deposit put|release AMOUNT UNIT`: a provider (with its own
//! credentials) moves earnings into the deposit the broker may ask of it
//! before awarding lots, or back out.

use clap::Subcommand;
use vmlot_client::api::{Deposit, DepositRequest, Release};
use vmlot_schemas::{Money, WIRE_VERSION};

use crate::context::Context;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum DepositCommand {
    /// Move AMOUNT UNIT of your earnings into your deposit.
    Put(DepositArgs),
    /// Take AMOUNT UNIT of your deposit back into your earnings (only
    /// while you hold no award and no pending payment).
    Release(DepositArgs),
}

#[derive(clap::Args)]
pub struct DepositArgs {
    amount: String,
    unit: String,
    /// Request id: retrying with the same id moves the money once.
    #[arg(long)]
    id: Option<uuid::Uuid>,
}

pub async fn deposit(ctx: &Context, cmd: &DepositCommand) -> anyhow::Result<()> {
    let (args, verb) = match cmd {
        DepositCommand::Put(args) => (args, "put in"),
        DepositCommand::Release(args) => (args, "released"),
    };
    let amount = vmlot_ledger::parse_amount(&args.amount).map_err(anyhow::Error::msg)?;
    let req = DepositRequest {
        version: WIRE_VERSION,
        id: args.id.unwrap_or_else(uuid::Uuid::new_v4),
        amount: Money::new(amount, args.unit.clone()),
    };
    let api = ctx.api().await?;
    let done = match cmd {
        DepositCommand::Put(_) => api.call::<Deposit>(&req).await?,
        DepositCommand::Release(_) => api.call::<Release>(&req).await?,
    };
    if ctx.json {
        print_json(&done)?;
    } else {
        println!(
            "{} {verb}: deposit {}, earnings {} (transaction {})",
            req.amount, done.deposit, done.earnings, done.tx.id
        );
    }
    Ok(())
}
