//! How `vmlot` speaks: JSON or text for people, tables, byte counts, and
//! the exit code each failure maps to, so scripts can tell a refused
//! request from an outage without reading the message.

use std::process::ExitCode;

use comfy_table::{CellAlignment, ContentArrangement, Table as Grid, presets};
use serde::Serialize;
use vmlot_client::CallError;
use vmlot_schemas::ProviderId;
use vmlot_schemas::market::{GuestState, JobState, SettledSegment};

use crate::context::Unreachable;

/// Exit code when data failed verification (tampered, missing or refused).
pub const EXIT_INTEGRITY: u8 = 3;
/// Exit code when NATS could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;
/// Exit code when the broker refused the request.
pub const EXIT_REFUSED: u8 = 5;
/// Exit code when the job, lot or provider named does not exist.
pub const EXIT_NOT_FOUND: u8 = 6;
/// Exit code of `watch`, `logs --follow` and `fetch` when the job is not
/// done (still running, or ended other than done).
pub const EXIT_JOB_NOT_DONE: u8 = 8;

/// The job is not done: still running, or ended other than done (exit code 8).
#[derive(Debug, thiserror::Error)]
pub struct JobDidNotFinish(pub JobState);

impl std::fmt::Display for JobDidNotFinish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            JobState::Running => f.write_str("the job is still running"),
            state => write!(f, "job ended {state:?}"),
        }
    }
}

/// The books do not verify (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("the books do not verify: {0} problem(s)")]
pub struct BooksDoNotVerify(pub usize);

/// The exit code for a failed command.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<Unreachable>().is_some() {
        return ExitCode::from(EXIT_UNREACHABLE);
    }
    if let Some(CallError::Refused(refused)) = err.downcast_ref::<CallError>() {
        return ExitCode::from(if refused.code == "not-found" {
            EXIT_NOT_FOUND
        } else {
            EXIT_REFUSED
        });
    }
    if err.downcast_ref::<BooksDoNotVerify>().is_some() {
        return ExitCode::from(EXIT_INTEGRITY);
    }
    if err.downcast_ref::<JobDidNotFinish>().is_some() {
        return ExitCode::from(EXIT_JOB_NOT_DONE);
    }
    match err.downcast_ref::<vmlot_cas::CasError>() {
        Some(
            vmlot_cas::CasError::CorruptBlock { .. }
            | vmlot_cas::CasError::MissingBlock(_)
            | vmlot_cas::CasError::BlockSize { .. }
            | vmlot_cas::CasError::BlockEncoding { .. }
            | vmlot_cas::CasError::MissingManifest(_)
            | vmlot_cas::CasError::WrongHash { .. }
            | vmlot_cas::CasError::Manifest { .. },
        ) => ExitCode::from(EXIT_INTEGRITY),
        _ => ExitCode::FAILURE,
    }
}

/// Prints `value` as indented JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as JSON on one line (streams of records, one per line).
pub fn print_json_line(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Which side of its column a value sits on.
#[derive(Clone, Copy)]
pub enum Align {
    Left,
    Right,
}

/// A plain table for people: a header line, then rows; no borders,
/// columns two spaces apart, trailing blanks trimmed.
pub struct Table {
    grid: Grid,
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        let mut grid = Grid::new();
        grid.load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(columns.iter().map(|(name, _)| *name));
        for (column, (_, align)) in grid.column_iter_mut().zip(columns) {
            column.set_padding((0, 2));
            column.set_cell_alignment(match align {
                Align::Left => CellAlignment::Left,
                Align::Right => CellAlignment::Right,
            });
        }
        Self { grid }
    }

    /// Adds a row, one value per column.
    pub fn row(&mut self, cells: impl IntoIterator<Item = impl Into<String>>) -> &mut Self {
        self.grid
            .add_row(cells.into_iter().map(Into::into).collect::<Vec<String>>());
        self
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        for line in self.grid.lines() {
            println!("{}", line.trim_end());
        }
    }
}

/// Bytes for people: B, KiB, MiB, GiB.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// The first 8 hex digits of a provider id.
pub fn short(id: &ProviderId) -> String {
    id.to_string().chars().take(8).collect()
}

/// Wall time a provider spent on a segment: fetch, start, run, save, upload.
pub fn wall_ms(seg: &SettledSegment) -> u64 {
    let t = &seg.timings;
    t.fetch_ms + t.start_ms + t.run_ms + t.save_ms + t.upload_ms
}

/// How a segment left the guest, in a word or two.
pub fn guest_word(g: &GuestState) -> String {
    match g {
        GuestState::Running { .. } => "running".into(),
        GuestState::Halted { .. } => "halted".into(),
        GuestState::Crashed { reason, .. } => format!("crashed: {reason}"),
        GuestState::RestoreFailed { reason } => format!("did not restore: {reason}"),
    }
}

/// ` (reason)` after a state, or nothing.
pub fn reason_suffix(reason: Option<&String>) -> String {
    reason.map(|r| format!(" ({r})")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Table {
        fn text(&self) -> Vec<String> {
            self.grid.lines().map(|l| l.trim_end().to_string()).collect()
        }
    }

    #[test]
    fn tables_are_plain_columns_two_spaces_apart() {
        let mut table = Table::new(&[
            ("seg", Align::Right),
            ("provider", Align::Left),
            ("guest", Align::Left),
        ]);
        table.row(["0", "p1 (0123abcd)", "running"]);
        table.row(["12", "p2", "halted"]);
        assert_eq!(
            table.text(),
            [
                "seg  provider       guest",
                "  0  p1 (0123abcd)  running",
                " 12  p2             halted",
            ]
        );
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 << 20), "5.00 MiB");
    }
}
