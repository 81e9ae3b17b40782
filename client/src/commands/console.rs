//! A guest's console as the store holds it: one manifest per settled
//! segment, read back with every block verified, and the last lines of a
//! console fed to it segment by segment (`watch` shows them).

use std::collections::VecDeque;

use anyhow::{Context as _, Result};
use vmlot_cas::{BlockStore, pull_file};
use vmlot_schemas::ManifestId;
use vmlot_schemas::market::SettledSegment;

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
