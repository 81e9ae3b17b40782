//! `vmlot providers` and `vmlot market`: who is on the market, and what
//! it is doing now.

use anyhow::Result;

use crate::context::Context;
use crate::output::{Align, Table, print_json};

/// `vmlot providers`: providers heard from recently.
pub async fn providers(ctx: &Context) -> Result<()> {
    let list = ctx.api().await?.providers().await?;
    if ctx.json {
        return print_json(&list);
    }
    let mut table = Table::new(&[
        ("provider", Align::Left),
        ("name", Align::Left),
        ("hypervisors", Align::Left),
        ("memory", Align::Right),
        ("slots", Align::Right),
        ("idle", Align::Left),
    ]);
    for p in list {
        let kinds: Vec<&str> = p.hypervisors.iter().map(|h| h.as_str()).collect();
        table.row([
            p.provider.to_string(),
            p.name,
            kinds.join(","),
            p.memory_mib.to_string(),
            format!("{}/{}", p.free_slots, p.slots),
            p.idle.to_string(),
        ]);
    }
    table.print();
    Ok(())
}

/// `vmlot standing`: what the broker made of each provider's results.
pub async fn standing(ctx: &Context) -> Result<()> {
    let list = ctx.api().await?.standing().await?;
    if ctx.json {
        return print_json(&list);
    }
    let mut table = Table::new(&[
        ("provider", Align::Left),
        ("valid", Align::Right),
        ("agreed", Align::Right),
        ("streak", Align::Right),
        ("refused", Align::Right),
        ("by reason", Align::Left),
        ("last refusal", Align::Left),
    ]);
    for s in list {
        let reasons: Vec<String> = s.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
        table.row([
            s.provider.to_string(),
            s.valid.to_string(),
            s.agreed.to_string(),
            s.streak.to_string(),
            s.refused_total().to_string(),
            reasons.join(", "),
            s.last_refusal.clone().unwrap_or_default(),
        ]);
    }
    table.print();
    Ok(())
}

/// `vmlot market`: open lots, running jobs, live providers.
pub async fn market(ctx: &Context) -> Result<()> {
    let view = ctx.api().await?.market().await?;
    if ctx.json {
        return print_json(&view);
    }
    println!(
        "running jobs {}, providers {}, open lots {}",
        view.running_jobs,
        view.providers.len(),
        view.open_lots.len()
    );
    for open in view.open_lots {
        println!(
            "  lot {} job {} segment {} attempt {} reserve {} awarded {}",
            open.lot.lot,
            open.lot.job,
            open.lot.segment,
            open.lot.attempt,
            open.lot.reserve_price,
            open.awarded.len()
        );
    }
    Ok(())
}
