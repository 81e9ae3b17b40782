//! `vmlot statement` and `vmlot balance`: an account over a period, and
//! where every account stands now.

use anyhow::Result;
use rust_decimal::Decimal;
use vmlot_ledger::read;
use vmlot_schemas::ledger::Account;
use vmlot_schemas::subjects;

use crate::commands::accounts::{parse_period, resolve_account};
use crate::context::Context;
use crate::output::{Align, Table, print_json};

/// `vmlot statement`: opening balance, entries, closing balance, per unit.
pub async fn statement(ctx: &Context, account: &str, period: &str) -> Result<()> {
    let account = resolve_account(ctx, account).await?;
    let (from, until) = parse_period(period)?;
    let books = ctx.books().await?;
    let statements = read::statement(&books, &account, from, until).await?;
    if ctx.json {
        return print_json(&statements);
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

/// `vmlot balance`: one account's balances, or every account's.
pub async fn balance(ctx: &Context, account: Option<&str>) -> Result<()> {
    let books = ctx.books().await?;
    let balances: Vec<(Account, String, Decimal)> = match account {
        Some(text) => {
            let account = resolve_account(ctx, text).await?;
            let found = read::balances(&books, &account).await?;
            if found.is_empty() {
                vec![(account, "CRD".to_string(), Decimal::ZERO)]
            } else {
                found.into_iter().map(|(u, b)| (account.clone(), u, b)).collect()
            }
        }
        // Every account but the escrows of ended jobs (zero, and many).
        None => read::last_postings(&books, subjects::LEDGER_POST_ALL)
            .await?
            .into_iter()
            .filter(|p| !(matches!(p.account, Account::Escrow(_)) && p.balance.is_zero()))
            .map(|p| (p.account, p.unit, p.balance))
            .collect(),
    };
    if ctx.json {
        let out: Vec<serde_json::Value> = balances
            .iter()
            .map(|(a, u, b)| serde_json::json!({"account": a, "unit": u, "balance": b.to_string()}))
            .collect();
        return print_json(&out);
    }
    let mut table = Table::new(&[
        ("account", Align::Left),
        ("balance", Align::Right),
        ("unit", Align::Left),
    ]);
    for (account, unit, balance) in &balances {
        table.row([account.to_string(), balance.to_string(), unit.clone()]);
    }
    table.print();
    Ok(())
}
