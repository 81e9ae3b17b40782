//! `vmlot watch` (and `submit --watch`): a job followed live until it ends.
//!
//! On a terminal: a progress bar (segment k of N, who ran the last one, at
//! what price, how long the job has run, what the open lot is doing) under
//! the last lines of the guest's console. Elsewhere (a pipe, a log file):
//! one line per settled segment followed by the tail of its console. With
//! `--json`: one [`SettledSegment`] per line, nothing else.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmlot_schemas::market::{JobState, JobStatus, SegmentCount, SettledSegment};
use vmlot_schemas::{JobId, ProviderId};

use crate::commands::console::{ConsoleTail, segment_console};
use crate::commands::names::Names;
use crate::context::Context;
use crate::output::{JobDidNotFinish, guest_word, print_json_line, reason_suffix, short, wall_ms};

/// Console lines shown under the bar (and after each segment in line mode).
const TAIL_LINES: usize = 8;
const POLL: Duration = Duration::from_millis(300);

fn total(s: &JobStatus) -> Option<u32> {
    match s.spec.segments {
        SegmentCount::Count(n) => Some(n),
        SegmentCount::UntilHalt => None,
    }
}

/// What the job is doing now, for the bar.
fn activity(s: &JobStatus, names: &HashMap<ProviderId, String>) -> String {
    if s.state.is_final() {
        return format!("{:?}", s.state).to_lowercase();
    }
    if s.waiting_for_providers {
        return "waiting for providers".into();
    }
    match &s.open_lot {
        Some(open) if open.awarded.is_empty() => format!("segment {} bidding", open.lot.segment + 1),
        Some(open) => {
            let who: Vec<String> = open
                .awarded
                .iter()
                .map(|(p, price)| format!("{} at {price}", names.get(p).cloned().unwrap_or_else(|| short(p))))
                .collect();
            let attempt = if open.lot.attempt > 1 {
                format!(" (attempt {})", open.lot.attempt)
            } else {
                String::new()
            };
            format!("segment {} on {}{attempt}", open.lot.segment + 1, who.join(", "))
        }
        None => "offering".into(),
    }
}

/// Follows `job` until it ends; an end other than done is an error (exit code 8).
pub async fn watch(ctx: &Context, job: JobId) -> Result<()> {
    let api = ctx.api().await?;
    let store = ctx.store().await?;
    let mut names = Names::load(&api).await;
    let live = !ctx.json && std::io::stderr().is_terminal();
    let mut bar = live.then(Bar::new);
    let mut tail = ConsoleTail::new(TAIL_LINES);
    let mut shown = 0usize;
    let mut waiting_said = false;
    let status = loop {
        let s = api.status(job).await?;
        for (i, seg) in s.settled.iter().enumerate().skip(shown) {
            // Whole segments so far: a partial one (preempted by its
            // provider's owner) is progress, not one of the job's segments.
            let whole = s.settled[..=i].iter().filter(|x| x.partial_ms.is_none()).count() as u64;
            if ctx.json {
                print_json_line(seg)?;
                continue;
            }
            let console = segment_console(&store, seg).await?;
            tail.push(&console);
            let who = names.of(&api, &seg.provider).await;
            let of = total(&s).map(|n| n.to_string()).unwrap_or_else(|| "?".into());
            match &mut bar {
                Some(bar) => bar.settled(seg, whole, &who, &tail),
                None => {
                    println!(
                        "segment {}/{of} {}: {who} ({}) at {}, {:.1} s, fetched {} B, sent {} B, guest {}",
                        whole + u64::from(seg.partial_ms.is_some()),
                        match seg.partial_ms {
                            Some(ms) => format!("partly run (preempted after {:.1} s)", ms as f64 / 1000.0),
                            None => "settled".to_string(),
                        },
                        short(&seg.provider),
                        seg.price,
                        wall_ms(seg) as f64 / 1000.0,
                        seg.fetched_bytes,
                        seg.sent_bytes,
                        guest_word(&seg.guest),
                    );
                    // This segment's last lines (a partial last line shows
                    // again, finished, under the next segment).
                    if !console.is_empty() {
                        let mut own = ConsoleTail::new(TAIL_LINES);
                        own.push(&console);
                        for line in own.lines() {
                            println!("  | {line}");
                        }
                    }
                }
            }
        }
        shown = s.settled.len();
        if let Some(bar) = &mut bar {
            bar.update(&s, &names.known);
        } else if s.waiting_for_providers && !waiting_said && !ctx.json {
            println!("waiting for providers…");
            waiting_said = true;
        }
        if s.state.is_final() {
            break s;
        }
        tokio::time::sleep(POLL).await;
    };
    if let Some(bar) = bar {
        bar.finish(&status);
    }
    if !ctx.json {
        println!(
            "job {} ended: {:?}{}",
            job,
            status.state,
            reason_suffix(status.end_reason.as_ref())
        );
    }
    if status.state != JobState::Done {
        return Err(JobDidNotFinish(status.state).into());
    }
    Ok(())
}

/// The terminal display: console tail lines above one progress bar.
struct Bar {
    _multi: MultiProgress,
    tail: Vec<ProgressBar>,
    main: ProgressBar,
    last: String,
    sized: bool,
}

impl Bar {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let line_style = ProgressStyle::with_template("  │ {msg}").expect("valid template");
        let tail = (0..TAIL_LINES)
            .map(|_| multi.add(ProgressBar::new(0).with_style(line_style.clone())))
            .collect();
        let main = multi.add(ProgressBar::no_length());
        main.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} segments · {msg}")
                .expect("valid template"),
        );
        main.enable_steady_tick(Duration::from_millis(200));
        Self {
            _multi: multi,
            tail,
            main,
            last: String::new(),
            sized: false,
        }
    }

    fn settled(&mut self, seg: &SettledSegment, whole: u64, who: &str, tail: &ConsoleTail) {
        self.main.set_position(whole);
        self.last = format!(
            "last: {who} at {}, {:.1} s, {} B moved",
            seg.price,
            wall_ms(seg) as f64 / 1000.0,
            seg.fetched_bytes + seg.sent_bytes
        );
        let lines = tail.lines();
        for (i, bar) in self.tail.iter().enumerate() {
            bar.set_message(lines.get(i).cloned().unwrap_or_default());
        }
    }

    fn update(&mut self, s: &JobStatus, names: &HashMap<ProviderId, String>) {
        if !self.sized {
            // The job's age, not the watcher's.
            let age = (chrono::Utc::now() - s.created_at).to_std().unwrap_or_default();
            let main = std::mem::replace(&mut self.main, ProgressBar::hidden());
            self.main = main.with_elapsed(age);
            if let Some(n) = total(s) {
                self.main.set_length(n as u64);
                self.main.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} segment {pos}/{len} · {msg}",
                    )
                    .expect("valid template"),
                );
            }
            self.sized = true;
        }
        let now = activity(s, names);
        let msg = if self.last.is_empty() {
            now
        } else {
            format!("{now} · {}", self.last)
        };
        self.main.set_message(msg);
    }

    /// Leaves the final tail and bar on screen.
    fn finish(self, s: &JobStatus) {
        for bar in &self.tail {
            bar.finish();
        }
        self.main.finish_with_message(format!(
            "{} · {}",
            format!("{:?}", s.state).to_lowercase(),
            self.last
        ));
    }
}
