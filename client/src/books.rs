//! The accountant's commands: `ledger` (filtered lines, totals, CSV/JSON),
//! `ledger verify`, `statement`, `balance`, and the operator's `admin credit`.
//! They read the ledger stream directly; only a credit goes through the
//! broker, which alone writes the books.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use clap::{Args, Subcommand, ValueEnum};
use rust_decimal::Decimal;
use vmlot_ledger::read::{self, Filter, Row};
use vmlot_schemas::ledger::{Account, CreditRequest, Transaction, TxKind};
use vmlot_schemas::market::Heartbeat;
use vmlot_schemas::{JobId, Money, WIRE_VERSION};

use crate::cli::Cli;
use crate::market::request;

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
    /// Only this account: NAME or user:NAME, provider:ID-or-NAME, escrow:JOB, operator.
    #[arg(long)]
    pub account: Option<String>,
    /// Only this job's transactions.
    #[arg(long)]
    pub job: Option<JobId>,
    /// Only this provider's earnings (its id or name).
    #[arg(long)]
    pub provider: Option<String>,
    /// Only this kind: credit, hold, settlement, refund.
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

/// A time as typed: RFC 3339, or a date meaning its midnight UTC.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .with_context(|| format!("{text:?} is neither RFC 3339 nor YYYY-MM-DD"))?;
    Ok(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight")))
}

/// A period as typed: `2026-11` (a month), `2026` (a year) or `2026-11-25` (a day).
pub fn parse_period(text: &str) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let midnight = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"));
    let parts: Vec<&str> = text.split('-').collect();
    let num = |s: &str| s.parse::<u32>().with_context(|| format!("bad period {text:?}"));
    let (from, until) = match parts[..] {
        [y] => {
            let y = num(y)? as i32;
            (
                NaiveDate::from_ymd_opt(y, 1, 1),
                NaiveDate::from_ymd_opt(y + 1, 1, 1),
            )
        }
        [y, m] => {
            let (y, m) = (num(y)? as i32, num(m)?);
            let from = NaiveDate::from_ymd_opt(y, m, 1);
            (
                from,
                from.and_then(|d| d.checked_add_months(chrono::Months::new(1))),
            )
        }
        [_, _, _] => {
            let d = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
            (d, d.and_then(|d| d.succ_opt()))
        }
        _ => (None, None),
    };
    match (from, until) {
        (Some(f), Some(u)) => Ok((midnight(f), midnight(u))),
        _ => bail!("bad period {text:?}: want YYYY, YYYY-MM or YYYY-MM-DD"),
    }
}

/// An account as typed. A bare name is a user; `provider:NAME` is looked
/// up among the providers the broker has seen.
async fn resolve_account(cli: &Cli, text: &str) -> Result<Account> {
    if let Ok(account) = text.parse::<Account>() {
        return Ok(account);
    }
    if let Some(name) = text.strip_prefix("provider:") {
        return Ok(Account::Provider(resolve_provider(cli, name).await?));
    }
    if vmlot_schemas::ledger::valid_user_name(text) {
        return Ok(Account::User(text.to_string()));
    }
    bail!(vmlot_schemas::ledger::BadAccount(text.to_string()))
}

async fn resolve_provider(cli: &Cli, text: &str) -> Result<vmlot_schemas::ProviderId> {
    if let Ok(id) = text.parse() {
        return Ok(id);
    }
    let client = cli.connect().await?;
    let live: Vec<Heartbeat> = request(&client, "providers", &()).await?;
    match live.iter().filter(|p| p.name == text).collect::<Vec<_>>()[..] {
        [one] => Ok(one.provider),
        [] => bail!("no provider named {text:?} is on the market now; give its id"),
        _ => bail!("several providers are named {text:?}; give its id"),
    }
}

async fn filter_of(cli: &Cli, args: &FilterArgs) -> Result<Filter> {
    Ok(Filter {
        account: match &args.account {
            Some(a) => Some(resolve_account(cli, a).await?),
            None => None,
        },
        job: args.job,
        provider: match &args.provider {
            Some(p) => Some(resolve_provider(cli, p).await?),
            None => None,
        },
        kind: args.kind,
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
    })
}

async fn jetstream(cli: &Cli) -> Result<async_nats::jetstream::Context> {
    Ok(async_nats::jetstream::new(cli.connect().await?))
}

pub async fn ledger(cli: &Cli, args: &LedgerArgs) -> Result<()> {
    if let Some(LedgerCommand::Verify) = args.command {
        return verify(cli).await;
    }
    let filter = filter_of(cli, &args.filter).await?;
    let js = jetstream(cli).await?;
    let rows = read::query(&js, &filter).await?;
    let totals = read::totals(&rows);
    let format = if cli.json { Format::Json } else { args.format };
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
            println!("{}", serde_json::to_string_pretty(&out)?);
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
    println!(
        "{:<20}  {:<10}  {:<45}  {:>14}  {:>14}  {:>14}  {:<4}  job/segment",
        "time", "kind", "account", "debit", "credit", "balance", "unit"
    );
    for r in rows {
        let blank_zero = |d: Decimal| if d.is_zero() { String::new() } else { d.to_string() };
        println!(
            "{:<20}  {:<10}  {:<45}  {:>14}  {:>14}  {:>14}  {:<4}  {}",
            r.at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.kind.as_str(),
            r.account.to_string(),
            blank_zero(r.debit),
            blank_zero(r.credit),
            r.balance.map(|b| b.to_string()).unwrap_or_default(),
            r.unit,
            match (r.job, r.segment) {
                (Some(j), Some(s)) => format!("{j}/{s}"),
                (Some(j), None) => j.to_string(),
                _ => String::new(),
            }
        );
    }
}

fn print_totals(totals: &BTreeMap<(Account, String), (Decimal, Decimal)>) {
    println!();
    println!(
        "{:<45}  {:>14}  {:>14}  {:>14}  unit",
        "totals by account", "debits", "credits", "net"
    );
    for ((account, unit), (debits, credits)) in totals {
        println!(
            "{:<45}  {debits:>14}  {credits:>14}  {:>14}  {unit}",
            account.to_string(),
            credits - debits
        );
    }
}

/// Exit code 3 when the books do not verify (see [`crate::cli::EXIT_INTEGRITY`]).
#[derive(Debug)]
pub struct BooksDoNotVerify(pub usize);

impl std::fmt::Display for BooksDoNotVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the books do not verify: {} problem(s)", self.0)
    }
}

impl std::error::Error for BooksDoNotVerify {}

async fn verify(cli: &Cli) -> Result<()> {
    let js = jetstream(cli).await?;
    let started = std::time::Instant::now();
    let report = vmlot_ledger::verify::verify(&js).await?;
    let took = started.elapsed();
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
                "ledger verify: OK (every transaction balances, every settled segment paid once, escrows of ended jobs empty, balances equal the replay)"
            );
        }
    }
    if !report.ok() {
        return Err(BooksDoNotVerify(report.problems.len()).into());
    }
    Ok(())
}

pub async fn statement(cli: &Cli, account: &str, period: &str) -> Result<()> {
    let account = resolve_account(cli, account).await?;
    let (from, until) = parse_period(period)?;
    let js = jetstream(cli).await?;
    let statements = read::statement(&js, &account, from, until).await?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&statements)?);
        return Ok(());
    }
    println!(
        "statement of {account} for {period} ({} to {})",
        from.format("%Y-%m-%d"),
        until.format("%Y-%m-%d")
    );
    if statements.is_empty() {
        println!("  no entries, balance 0");
    }
    for s in &statements {
        println!("  opening balance  {:>14} {}", s.opening, s.unit);
        for r in &s.entries {
            let amount = r.credit - r.debit;
            println!(
                "  {}  {:<10}  {:>+14}  {:>14}  {}",
                r.at.format("%Y-%m-%d %H:%M:%S"),
                r.kind.as_str(),
                amount,
                r.balance.unwrap_or_default(),
                match (r.job, r.segment) {
                    (Some(j), Some(seg)) => format!("job {j} segment {seg}"),
                    (Some(j), None) => format!("job {j}"),
                    _ => String::new(),
                }
            );
        }
        println!(
            "  {} entries: debits {} credits {}",
            s.entries.len(),
            s.debits,
            s.credits
        );
        println!("  closing balance  {:>14} {}", s.closing, s.unit);
    }
    Ok(())
}

pub async fn balance(cli: &Cli, account: Option<&str>) -> Result<()> {
    let js = jetstream(cli).await?;
    let balances: Vec<(Account, String, Decimal)> = match account {
        Some(text) => {
            let account = resolve_account(cli, text).await?;
            let found = read::balances(&js, &account).await?;
            if found.is_empty() {
                vec![(account, "CRD".to_string(), Decimal::ZERO)]
            } else {
                found.into_iter().map(|(u, b)| (account.clone(), u, b)).collect()
            }
        }
        // Every account but the escrows of ended jobs (zero, and many).
        None => read::last_postings(&js, vmlot_schemas::subjects::LEDGER_POST_ALL)
            .await?
            .into_iter()
            .filter(|p| !(matches!(p.account, Account::Escrow(_)) && p.balance.is_zero()))
            .map(|p| (p.account, p.unit, p.balance))
            .collect(),
    };
    if cli.json {
        let out: Vec<serde_json::Value> = balances
            .iter()
            .map(|(a, u, b)| serde_json::json!({"account": a, "unit": u, "balance": b.to_string()}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<45}  {:>16}  unit", "account", "balance");
    for (account, unit, balance) in &balances {
        println!("{:<45}  {balance:>16}  {unit}", account.to_string());
    }
    Ok(())
}

pub async fn admin(cli: &Cli, command: &AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Credit {
            account,
            amount,
            unit,
            memo,
            id,
            operator_token,
        } => {
            let account = resolve_account(cli, account).await?;
            let amount = vmlot_ledger::parse_amount(amount).map_err(anyhow::Error::msg)?;
            let req = CreditRequest {
                version: WIRE_VERSION,
                id: id.unwrap_or_else(uuid::Uuid::new_v4),
                account: account.clone(),
                amount: Money::new(amount, unit.clone()),
                memo: memo.clone(),
                operator_token: operator_token.clone(),
            };
            let client = cli.connect().await?;
            let tx: Transaction = request(&client, "credit", &req).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&tx)?);
            } else {
                println!("credited {amount} {unit} to {account} (transaction {})", tx.id);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    #[test]
    fn periods_and_times_parse_as_people_type_them() {
        let (f, u) = parse_period("2026-11").unwrap();
        assert_eq!(f.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(u.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        let (f, u) = parse_period("2026-12").unwrap();
        assert_eq!((f.month(), u.year(), u.month()), (12, 2027, 1));
        let (f, u) = parse_period("2026-11-25").unwrap();
        assert_eq!((f.day(), u.day()), (25, 26));
        assert_eq!(parse_period("2026").unwrap().1.year(), 2027);
        for bad in ["2026-13", "nov", "2026-11-31", "2026-1-2-3", ""] {
            assert!(parse_period(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_time("2026-11-25").unwrap().to_rfc3339(),
            "2026-11-25T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-25T10:00:00+02:00").unwrap().to_rfc3339(),
            "2026-11-25T08:00:00+00:00"
        );
        assert!(parse_time("yesterday").is_err());
    }
}
