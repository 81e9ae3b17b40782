//! `vmlot watch` (and `submit --watch`): a job followed live until it ends.
//!
//! On a terminal: a progress bar (segment k of N, who ran the last one, at
//! what price, how long the job has run, what the open lot is doing) under
//! the last lines of the guest's console. Elsewhere (a pipe, a log file):
//! one line per settled segment followed by the tail of its console. With
//! `--json`: one [`SettledSegment`] per line, nothing else.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmlot_cas::{BlockStore, StoreOptions};
use vmlot_schemas::market::{GuestState, Heartbeat, JobState, JobStatus, SegmentCount, SettledSegment};
use vmlot_schemas::{JobId, ProviderId};

use crate::cli::Cli;
use crate::logs::segment_console;
use crate::market::{JobDidNotFinish, job_status, request};

/// Console lines shown under the bar (and after each segment in line mode).
const TAIL_LINES: usize = 8;
const POLL: Duration = Duration::from_millis(300);

/// The last lines of a console fed to it piece by piece; a segment may end
/// in the middle of a line, which the next one finishes.
#[derive(Default)]
pub struct ConsoleTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    max: usize,
}

impl ConsoleTail {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            ..Default::default()
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                let text = String::from_utf8_lossy(&line);
                self.lines.push_back(text.trim_end_matches('\r').to_string());
                if self.lines.len() > self.max {
                    self.lines.pop_front();
                }
            } else {
                self.partial.push(b);
            }
        }
    }

    /// The last `max` lines, an unfinished one last.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            out.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        let skip = out.len().saturating_sub(self.max);
        out.split_off(skip)
    }
}

/// Provider names from the broker's heartbeats, asked again when an
/// unknown provider shows up.
struct Names {
    known: HashMap<ProviderId, String>,
}

impl Names {
    async fn of(&mut self, client: &async_nats::Client, id: &ProviderId) -> String {
        if !self.known.contains_key(id) {
            self.known.extend(provider_names(client).await);
        }
        match self.known.get(id) {
            Some(name) => name.clone(),
            None => short(id),
        }
    }
}

/// Names of the providers the broker has heard from recently (empty if it
/// does not answer: names are a courtesy, never a reason to fail).
pub async fn provider_names(client: &async_nats::Client) -> HashMap<ProviderId, String> {
    match request::<_, Vec<Heartbeat>>(client, "providers", &()).await {
        Ok(list) => list.into_iter().map(|h| (h.provider, h.name)).collect(),
        Err(_) => HashMap::new(),
    }
}

/// The first 8 hex digits of a provider id.
pub fn short(id: &ProviderId) -> String {
    id.to_string().chars().take(8).collect()
}

fn total(s: &JobStatus) -> Option<u32> {
    match s.spec.segments {
        SegmentCount::Count(n) => Some(n),
        SegmentCount::UntilHalt => None,
    }
}

/// Wall time a provider spent on a segment: fetch, start, run, save, upload.
pub fn wall_ms(seg: &SettledSegment) -> u64 {
    let t = &seg.timings;
    t.fetch_ms + t.start_ms + t.run_ms + t.save_ms + t.upload_ms
}

fn guest_word(g: &GuestState) -> String {
    match g {
        GuestState::Running { .. } => "running".into(),
        GuestState::Halted => "halted".into(),
        GuestState::Crashed { reason } => format!("crashed: {reason}"),
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
pub async fn watch(cli: &Cli, client: &async_nats::Client, job: JobId) -> Result<()> {
    let store = BlockStore::open(client.clone(), StoreOptions::default()).await?;
    let mut names = Names {
        known: provider_names(client).await,
    };
    let live = !cli.json && std::io::stderr().is_terminal();
    let mut bar = live.then(Bar::new);
    let mut tail = ConsoleTail::new(TAIL_LINES);
    let mut shown = 0usize;
    let mut waiting_said = false;
    let status = loop {
        let s = job_status(client, job).await?;
        for seg in &s.settled[shown..] {
            if cli.json {
                println!("{}", serde_json::to_string(seg)?);
                continue;
            }
            let console = segment_console(&store, seg).await?;
            tail.push(&console);
            let who = names.of(client, &seg.provider).await;
            let of = total(&s).map(|n| n.to_string()).unwrap_or_else(|| "?".into());
            match &mut bar {
                Some(bar) => bar.settled(seg, &who, &tail),
                None => {
                    println!(
                        "segment {}/{of} settled: {who} ({}) at {}, {:.1} s, fetched {} B, sent {} B, guest {}",
                        seg.segment + 1,
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
        } else if s.waiting_for_providers && !waiting_said && !cli.json {
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
    if !cli.json {
        println!(
            "job {} ended: {:?}{}",
            job,
            status.state,
            status
                .end_reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
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

    fn settled(&mut self, seg: &SettledSegment, who: &str, tail: &ConsoleTail) {
        self.main.set_position(seg.segment as u64 + 1);
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

#[cfg(test)]
mod tests {
    use super::ConsoleTail;

    #[test]
    fn the_tail_joins_lines_split_across_segments_and_keeps_the_last_ones() {
        let mut tail = ConsoleTail::new(3);
        tail.push(b"one\ntwo\nthr");
        assert_eq!(tail.lines(), ["one", "two", "thr"]);
        tail.push(b"ee\r\nfour\n");
        assert_eq!(tail.lines(), ["two", "three", "four"]);
        tail.push(b"");
        tail.push(b"five");
        assert_eq!(tail.lines(), ["three", "four", "five"]);
    }
}
