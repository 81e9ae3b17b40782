//! `vmlot status` and `vmlot cancel`: a job's record, with its settled
//! segments as a table naming their providers.

use std::collections::HashMap;

use anyhow::Result;
use vmlot_schemas::market::{JobStatus, SegmentCount};
use vmlot_schemas::{JobId, ProviderId};

use crate::commands::names::provider_names;
use crate::context::Context;
use crate::output::{Align, Table, guest_word, human_bytes, print_json, reason_suffix, short, wall_ms};

/// `vmlot status`: the job's record, with provider names where the broker knows them.
pub async fn status(ctx: &Context, job: JobId) -> Result<()> {
    let api = ctx.api().await?;
    let status = api.status(job).await?;
    let names = if ctx.json {
        Default::default()
    } else {
        provider_names(&api).await
    };
    print_status(ctx, &status, &names)
}

/// `vmlot cancel`: the job's record as it ends.
pub async fn cancel(ctx: &Context, job: JobId) -> Result<()> {
    let status = ctx.api().await?.cancel(job).await?;
    print_status(ctx, &status, &HashMap::new())
}

/// `vmlot stop JOB`: the job ends after the segment it runs now.
pub async fn stop(ctx: &Context, job: JobId) -> Result<()> {
    let status = ctx.api().await?.stop(job).await?;
    if !ctx.json
        && let Some(after) = status.stop_after
    {
        println!("job {job} stops after segment {after}; `vmlot fetch` then writes that checkpoint");
    }
    print_status(ctx, &status, &HashMap::new())
}

fn print_status(ctx: &Context, s: &JobStatus, names: &HashMap<ProviderId, String>) -> Result<()> {
    if ctx.json {
        return print_json(s);
    }
    let total = match s.spec.segments {
        SegmentCount::Count(n) => n.to_string(),
        SegmentCount::UntilHalt => "until halt".into(),
    };
    println!("job       {}", s.job);
    println!("state     {:?}{}", s.state, reason_suffix(s.end_reason.as_ref()));
    let partials = s.settled.len() as u32 - s.full_segments();
    let partials = match partials {
        0 => String::new(),
        n => format!(" (and {n} partial: preempted by a provider's owner)"),
    };
    println!("segments  {} of {}{partials}", s.full_segments(), total);
    println!("spent     {} of {}", s.spent, s.spec.budget);
    if s.waiting_for_providers {
        println!("waiting   for providers (no bid on the last offer)");
    }
    if let Some(open) = &s.open_lot {
        let what = if open.lot.check {
            "check restore".to_string()
        } else {
            format!("segment {}", open.lot.segment)
        };
        println!(
            "open lot  {what} attempt {} ({} awarded)",
            open.lot.attempt,
            open.awarded.len()
        );
    }
    if s.settled.is_empty() {
        return Ok(());
    }
    // Wall time is the provider's: fetch + start + run + save + upload.
    println!();
    let mut table = Table::new(&[
        ("seg", Align::Right),
        ("try", Align::Right),
        ("provider", Align::Left),
        ("price", Align::Right),
        ("wall s", Align::Right),
        ("run s", Align::Right),
        ("fetched", Align::Right),
        ("sent", Align::Right),
        ("guest", Align::Left),
    ]);
    let seconds = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);
    let (mut fetched, mut sent, mut wall) = (0u64, 0u64, 0u64);
    // The check restore of the last checkpoint is paid like a segment.
    for seg in s.payments() {
        let is_check = s.check.as_ref().is_some_and(|c| std::ptr::eq(c, seg));
        let who = match names.get(&seg.provider) {
            Some(name) => format!("{name} ({})", short(&seg.provider)),
            None => seg.provider.to_string(),
        };
        table.row([
            if is_check {
                "check".to_string()
            } else {
                seg.segment.to_string()
            },
            seg.attempt.to_string(),
            who,
            seg.price.to_string(),
            seconds(wall_ms(seg)),
            seconds(seg.timings.run_ms),
            human_bytes(seg.fetched_bytes),
            human_bytes(seg.sent_bytes),
            match seg.partial_ms {
                Some(ms) => format!("{}, preempted after {} s", guest_word(&seg.guest), seconds(ms)),
                None => guest_word(&seg.guest),
            },
        ]);
        fetched += seg.fetched_bytes;
        sent += seg.sent_bytes;
        wall += wall_ms(seg);
    }
    table.row([
        "all".to_string(),
        String::new(),
        String::new(),
        s.spent.to_string(),
        seconds(wall),
        String::new(),
        human_bytes(fetched),
        human_bytes(sent),
        String::new(),
    ]);
    table.print();
    Ok(())
}
