//! What a replay of the books reports: every broken rule with the record
//! that breaks it, notes, and the balances the replay arrived at.

use std::collections::BTreeMap;

use serde::Serialize;

/// One broken rule, and the record that breaks it.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// The record: a subject and stream sequence, or a job.
    pub record: String,
    pub what: String,
}

/// What a replay found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub transactions: u64,
    pub postings: u64,
    pub jobs: u64,
    /// Broken rules; the books verify when this is empty.
    pub problems: Vec<Problem>,
    /// Not wrong, but worth knowing (a broker catching up after a crash).
    pub notes: Vec<String>,
    /// Every account's balance per unit, from the replay.
    pub balances: BTreeMap<String, BTreeMap<String, String>>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Names a broken rule.
    pub(super) fn problem(&mut self, record: &dyn std::fmt::Display, what: impl Into<String>) {
        self.problems.push(Problem {
            record: record.to_string(),
            what: what.into(),
        });
    }
}

/// A ledger message, named only when a problem is reported.
pub(super) struct Rec<'a>(pub &'a str, pub u64);

impl std::fmt::Display for Rec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (seq {})", self.0, self.1)
    }
}
