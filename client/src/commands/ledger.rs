//! `vmlot ledger` and `vmlot ledger verify`: the books' lines filtered by
//! account, job, provider, kind and time (a table, CSV or JSON, with
//! totals), and the replay that checks every rule. They read the ledger
//! stream directly; only the broker writes it.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use rust_decimal::Decimal;
use vmlot_ledger::read::{self, Filter, Row};
use vmlot_schemas::JobId;
use vmlot_schemas::ledger::{Account, TxKind};

use crate::commands::accounts::{parse_time, resolve_account, resolve_provider};
use crate::context::Context;
use crate::output::{Align, BooksDoNotVerify, Table, print_json};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LedgerArgs {
    #[command(subcommand)]
    pub command: Option<LedgerCommand>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Output format (`--json` also selects JSON).
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Print debits and credits per account after the lines.
    #[arg(long)]
    pub totals: bool,
}

#[derive(Args, Default)]
pub struct FilterArgs {
    /// Only this account: NAME or user:NAME, provider:ID-or-NAME, pending:ID, deposit:ID, escrow:JOB, operator.
    #[arg(long)]
    pub account: Option<String>,
    /// Only this job's transactions.
    #[arg(long)]
    pub job: Option<JobId>,
    /// Only this provider's earnings (its id or name).
    #[arg(long)]
    pub provider: Option<String>,
    /// Only this kind: credit, hold, settlement, post, void, refund, deposit, release, forfeit.
    #[arg(long)]
    pub kind: Option<TxKind>,
    /// From this time on: RFC 3339 or a date (midnight UTC).
    #[arg(long)]
    pub since: Option<String>,
    /// Before this time: RFC 3339 or a date (midnight UTC).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Replay the whole ledger and the job records; exit 3 naming every
    /// record that breaks a rule.
    Verify,
}

async fn filter_of(ctx: &Context, args: &FilterArgs) -> Result<Filter> {
    Ok(Filter {
        account: match &args.account {
            Some(a) => Some(resolve_account(ctx, a).await?),
            None => None,
        },
        job: args.job,
        provider: match &args.provider {
            Some(p) => Some(resolve_provider(ctx, p).await?),
            None => None,
        },
        kind: args.kind,
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
    })
}

/// `vmlot ledger` (and `ledger verify`).
pub async fn ledger(ctx: &Context, args: &LedgerArgs) -> Result<()> {
    if let Some(LedgerCommand::Verify) = args.command {
        return verify(ctx).await;
    }
    let filter = filter_of(ctx, &args.filter).await?;
    let books = ctx.books().await?;
    let rows = read::query(&books, &filter).await?;
    let totals = read::totals(&rows);
    let format = if ctx.json { Format::Json } else { args.format };
    match format {
        Format::Json => {
            let totals: Vec<serde_json::Value> = totals
                .iter()
                .map(|((account, unit), (debits, credits))| {
                    serde_json::json!({
                        "account": account, "unit": unit,
                        "debits": debits.to_string(), "credits": credits.to_string(),
                        "net": (credits - debits).to_string(),
                    })
                })
                .collect();
            let out = if args.totals {
                serde_json::json!({ "rows": rows, "totals": totals })
            } else {
                serde_json::to_value(&rows)?
            };
            print_json(&out)?;
        }
        Format::Csv => {
            println!("at,tx,kind,account,unit,debit,credit,balance,job,segment");
            for r in &rows {
                println!(
                    "{},{},{},{},{},{},{},{},{},{}",
                    r.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    r.tx,
                    r.kind.as_str(),
                    r.account,
                    r.unit,
                    r.debit,
                    r.credit,
                    r.balance.map(|b| b.to_string()).unwrap_or_default(),
                    r.job.map(|j| j.to_string()).unwrap_or_default(),
                    r.segment.map(|s| s.to_string()).unwrap_or_default(),
                );
            }
            if args.totals {
                println!();
                println!("account,unit,debits,credits,net");
                for ((account, unit), (debits, credits)) in &totals {
                    println!("{account},{unit},{debits},{credits},{}", credits - debits);
                }
            }
        }
        Format::Table => {
            print_rows(&rows);
            if args.totals || rows.len() > 1 {
                print_totals(&totals);
            }
        }
    }
    Ok(())
}

fn print_rows(rows: &[Row]) {
    let mut table = Table::new(&[
        ("time", Align::Left),
        ("kind", Align::Left),
        ("account", Align::Left),
        ("debit", Align::Right),
        ("credit", Align::Right),
        ("balance", Align::Right),
        ("unit", Align::Left),
        ("job/segment", Align::Left),
    ]);
    let blank_zero = |d: Decimal| if d.is_zero() { String::new() } else { d.to_string() };
    for r in rows {
        table.row([
            r.at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            r.kind.as_str().to_string(),
            r.account.to_string(),
            blank_zero(r.debit),
            blank_zero(r.credit),
            r.balance.map(|b| b.to_string()).unwrap_or_default(),
            r.unit.clone(),
            match (r.job, r.segment) {
                (Some(j), Some(s)) => format!("{j}/{s}"),
                (Some(j), None) => j.to_string(),
                _ => String::new(),
            },
        ]);
    }
    table.print();
}

fn print_totals(totals: &BTreeMap<(Account, String), (Decimal, Decimal)>) {
    println!();
    let mut table = Table::new(&[
        ("totals by account", Align::Left),
        ("debits", Align::Right),
        ("credits", Align::Right),
        ("net", Align::Right),
        ("unit", Align::Left),
    ]);
    for ((account, unit), (debits, credits)) in totals {
        table.row([
            account.to_string(),
            debits.to_string(),
            credits.to_string(),
            (credits - debits).to_string(),
            unit.clone(),
        ]);
    }
    table.print();
}

/// `vmlot ledger verify`: exit code 3 naming every problem found.
async fn verify(ctx: &Context) -> Result<()> {
    let books = ctx.books().await?;
    let started = std::time::Instant::now();
    let report = vmlot_ledger::verify::verify(&books).await?;
    let took = started.elapsed();
    if ctx.json {
        print_json(&report)?;
    } else {
        println!(
            "replayed {} transactions, {} postings, {} job records in {:.2} s",
            report.transactions,
            report.postings,
            report.jobs,
            took.as_secs_f64()
        );
        for note in &report.notes {
            println!("note: {note}");
        }
        for p in &report.problems {
            println!("PROBLEM {}: {}", p.record, p.what);
        }
        if report.ok() {
            println!(
                "ledger verify: OK (every transaction balances, every settled segment paid once, every forfeit backed by a proven cheat, escrows of ended jobs empty, balances equal the replay)"
            );
        }
    }
    if !report.ok() {
        return Err(BooksDoNotVerify(report.problems.len()).into());
    }
    Ok(())
}
