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
