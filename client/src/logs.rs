//! `vmlot logs`: the guest's console across a job's settled segments.
//!
//! Only settled segments are read: a segment's console is the one its
//! winning result carried, so output of a failed, timed-out or cancelled
//! attempt (or of a losing replica) never appears. Joined in segment order,
//! the consoles are byte for byte what an uninterrupted run prints.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use vmlot_cas::{BlockStore, StoreOptions, pull_file};
use vmlot_schemas::market::{JobState, JobStatus, SettledSegment};
use vmlot_schemas::{JobId, ManifestId};

use crate::cli::Cli;
use crate::market::{JobDidNotFinish, job_status};

/// How often `--follow` asks for the job's status.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// A console manifest's bytes, every block verified.
pub async fn console_bytes(store: &BlockStore, id: &ManifestId) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("console");
    pull_file(store, None, id, &path)
        .await
        .with_context(|| format!("reading console {id}"))?;
    Ok(std::fs::read(&path)?)
}

/// The console of one settled segment (empty when the guest printed nothing).
pub async fn segment_console(store: &BlockStore, seg: &SettledSegment) -> Result<Vec<u8>> {
    match &seg.console {
        Some(id) => console_bytes(store, id).await,
        None => Ok(Vec::new()),
    }
}

fn print_segment(cli: &Cli, seg: &SettledSegment, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if cli.json {
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
pub async fn logs(cli: &Cli, job: JobId, follow: bool) -> Result<()> {
    let client = cli.connect().await?;
    let store = BlockStore::open(client.clone(), StoreOptions::default()).await?;
    let mut shown = 0usize;
    loop {
        let status: JobStatus = job_status(&client, job).await?;
        for seg in &status.settled[shown..] {
            let bytes = segment_console(&store, seg).await?;
            match print_segment(cli, seg, &bytes) {
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
