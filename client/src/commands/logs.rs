//! `vmlot logs`: the guest's console across a job's settled segments.
//!
//! Only settled segments are read: a segment's console is the one its
//! winning result carried, so output of a failed, timed-out or cancelled
//! attempt (or of a losing replica) never appears. Joined in segment order,
//! the consoles are byte for byte what an uninterrupted run prints.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use vmlot_schemas::JobId;
use vmlot_schemas::market::{JobState, SettledSegment};

use crate::commands::console::segment_console;
use crate::context::Context;
use crate::output::JobDidNotFinish;

/// How often `--follow` asks for the job's status.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

fn print_segment(json: bool, seg: &SettledSegment, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let line = json!({
            "segment": seg.segment,
            "attempt": seg.attempt,
            "provider": seg.provider,
            "console": seg.console,
            "bytes": bytes.len(),
            "text": String::from_utf8_lossy(bytes),
        });
        writeln!(out, "{line}")?;
    } else {
        out.write_all(bytes)?;
    }
    out.flush()
}

/// Prints the console of every settled segment in order; with `follow`,
/// keeps printing segments as they settle until the job ends (exit code 8
/// if it ended other than done).
///
/// Plain mode writes the console bytes as they are, so the output of a
/// whole job is exactly the guest's console. `--json` prints one object per
/// segment: `{segment, attempt, provider, console, bytes, text}` (`text`
/// with invalid UTF-8 replaced by U+FFFD).
pub async fn logs(ctx: &Context, job: JobId, follow: bool) -> Result<()> {
    let api = ctx.api().await?;
    let store = ctx.store().await?;
    let mut shown = 0usize;
    loop {
        let status = api.status(job).await?;
        for seg in &status.settled[shown..] {
            let bytes = segment_console(&store, seg).await?;
            match print_segment(ctx.json, seg, &bytes) {
                Ok(()) => {}
                // A reader that has seen enough (`| head`) is no error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        shown = status.settled.len();
        if !follow {
            return Ok(());
        }
        if status.state.is_final() {
            if status.state != JobState::Done {
                return Err(JobDidNotFinish(status.state).into());
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}
