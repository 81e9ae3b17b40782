//! The books against the job records: each job's hold, its settled
//! segments each paid once to the provider whose result settled them
//! (pending, then posted; a voided payment's segment ran again), and its
//! escrow, running or refunded; its forfeits ([`super::forfeits`]). Also
//! what is left over once every record is seen (payments, holds and
//! forfeits of jobs that have no record).

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;
use vmlot_schemas::JobId;
use vmlot_schemas::ledger::Account;
use vmlot_schemas::market::JobStatus;

use super::forfeits;
use super::report::Report;
use super::shape::{Effect, Forfeited, Paid, Resolution};

/// Balances by (account, unit), from replaying transactions.
pub type Balances = HashMap<(Account, String), Decimal>;

/// What the replayed transactions say about jobs.
#[derive(Default)]
pub(super) struct JobBooks {
    pub balances: Balances,
    /// Held budgets: job → (user, amount, unit).
    holds: HashMap<JobId, (String, Decimal, String)>,
    /// Payments by job, then (segment, attempt).
    paid: HashMap<JobId, BTreeMap<(u32, u32), Paid>>,
    /// Where each settlement's payment is kept: its id → (job, segment, attempt).
    settlements: HashMap<uuid::Uuid, (JobId, u32, u32)>,
    refunds: HashSet<JobId>,
    /// Forfeits by job.
    forfeits: HashMap<JobId, Vec<Forfeited>>,
}

impl JobBooks {
    /// Keeps what a transaction did; a segment paid twice is a problem.
    pub fn apply(&mut self, report: &mut Report, record: &dyn std::fmt::Display, effect: Effect) {
        match effect {
            Effect::Nothing => {}
            Effect::Hold {
                job,
                user,
                amount,
                unit,
            } => {
                self.holds.insert(job, (user, amount, unit));
            }
            Effect::Refund { job } => {
                self.refunds.insert(job);
            }
            Effect::Paid { job, segment, paid } => {
                let of_job = self.paid.entry(job).or_default();
                if let Some((_, other)) = of_job
                    .iter()
                    .find(|((s, _), other)| *s == segment && other.resolved != Some(false))
                {
                    report.problem(
                        record,
                        format!(
                            "segment {segment} of job {job} paid again (first: {}, not voided)",
                            other.record
                        ),
                    );
                }
                self.settlements.insert(paid.tx, (job, segment, paid.attempt));
                of_job.insert((segment, paid.attempt), paid);
            }
            Effect::Resolved(resolution) => self.resolve(report, record, resolution),
            Effect::Forfeit { job, forfeited } => self.forfeits.entry(job).or_default().push(forfeited),
        }
    }

    /// Where the settlement `tx` was written, if the books have it: the
    /// subject its post or void belongs on.
    pub fn resolution_subject(&self, tx: &uuid::Uuid) -> Option<String> {
        self.settlements
            .get(tx)
            .map(|(job, segment, attempt)| vmlot_schemas::subjects::resolve_tx(job, *segment, *attempt))
    }

    fn resolve(&mut self, report: &mut Report, record: &dyn std::fmt::Display, r: Resolution) {
        let settled = self.settlements.get(&r.resolves).copied();
        let paid =
            settled.and_then(|(job, segment, attempt)| self.paid.get_mut(&job)?.get_mut(&(segment, attempt)));
        let Some(paid) = paid else {
            report.problem(
                record,
                format!("resolves {}, which is not a settlement before it", r.resolves),
            );
            return;
        };
        if paid.provider != r.provider || paid.amount != r.amount {
            report.problem(
                record,
                "moves another provider's or another amount's pending payment",
            );
        }
        if let Some(posted) = paid.resolved {
            let was = if posted { "posted" } else { "voided" };
            report.problem(record, format!("resolves a settlement already {was}"));
            return;
        }
        if settled.map(|(job, ..)| job) != Some(r.job) {
            report.problem(record, "resolves another job's settlement");
        }
        paid.resolved = Some(r.posted);
    }

    /// Checks one job record against the books.
    pub fn check(&mut self, report: &mut Report, status: &JobStatus) {
        report.jobs += 1;
        let job = status.job;
        let record = format!("job {job}");
        let escrow = self
            .balances
            .get(&(Account::Escrow(job), status.spec.budget.unit.clone()))
            .copied()
            .unwrap_or_default();
        match self.holds.get(&job) {
            Some((user, amount, unit)) => {
                if *user != status.spec.account
                    || *amount != status.spec.budget.amount
                    || *unit != status.spec.budget.unit
                {
                    let what = format!(
                        "held {amount} {unit} of user:{user}, its budget is {}",
                        status.spec.budget
                    );
                    report.problem(&record, what);
                }
            }
            None if !status.settled.is_empty() => {
                report.problem(&record, "segments settled with no budget held");
            }
            None => report.notes.push(format!(
                "{record}: no budget held (submission in progress or refused)"
            )),
        }
        let mut paid_total = Decimal::ZERO;
        let mut paid_of_job = self.paid.remove(&job).unwrap_or_default();
        // Before the voided payments go: a forfeit may rest on one.
        let forfeits = self.forfeits.remove(&job).unwrap_or_default();
        forfeits::check(report, status, forfeits, &paid_of_job);
        // A voided payment went back to the escrow: its segment ran again.
        paid_of_job.retain(|_, paid| paid.resolved != Some(false));
        let mut pending = Vec::new();
        // The settled segments, then the check restore of the last
        // checkpoint (paid like a segment, numbered after the last one).
        for settled in status.payments() {
            match paid_of_job.remove(&(settled.segment, settled.attempt)) {
                None => report.problem(
                    &record,
                    format!(
                        "segment {} (attempt {}) settled but never paid, or its payment voided",
                        settled.segment, settled.attempt
                    ),
                ),
                Some(paid) => {
                    paid_total += paid.amount;
                    // The payment went to the provider whose result settled
                    // the segment, not to another replica of its attempt.
                    if paid.provider != settled.provider {
                        report.problem(
                            &paid.record,
                            format!(
                                "paid {}, but the result of {} settled the segment",
                                paid.provider, settled.provider
                            ),
                        );
                    }
                    if paid.amount != settled.price.amount || paid.lot != settled.lot {
                        report.problem(&paid.record, "price or lot differ from the job's settled segment");
                    }
                    match (settled.posted, paid.resolved) {
                        (true, None) => report.problem(
                            &paid.record,
                            format!(
                                "the job records segment {} posted; the books have it pending",
                                settled.segment
                            ),
                        ),
                        (false, Some(true)) => report.notes.push(format!(
                            "{record}: segment {} is posted, the job record has not caught up yet",
                            settled.segment
                        )),
                        _ => {}
                    }
                    if paid.resolved.is_none() {
                        pending.push(settled.segment);
                    }
                }
            }
        }
        for ((segment, _), paid) in paid_of_job {
            paid_total += paid.amount;
            if status.state.is_final() {
                report.problem(
                    &paid.record,
                    format!("payment for segment {segment}, which the ended job never settled (a cancelled or losing replica)"),
                );
            } else {
                report.notes.push(format!(
                    "{record}: segment {segment} is paid, the job record has not caught up yet"
                ));
            }
        }
        if status.state.is_final() && status.refunded {
            for segment in pending {
                report.problem(
                    &record,
                    format!("ended and refunded with segment {segment}'s payment still pending"),
                );
            }
        }
        let refunded = self.refunds.remove(&job);
        if status.state.is_final() {
            if self.holds.contains_key(&job) && !refunded {
                report.problem(
                    &record,
                    format!("ended ({:?}) but its escrow was never refunded", status.state),
                );
            }
            if !escrow.is_zero() {
                report.problem(
                    &record,
                    format!("ended, yet its escrow holds {escrow} {}", status.spec.budget.unit),
                );
            }
        } else if let Some((_, held, _)) = self.holds.get(&job) {
            if refunded {
                report.problem(&record, "refunded while still running");
            } else if escrow != *held - paid_total {
                report.problem(
                    &record,
                    format!(
                        "escrow holds {escrow}, budget {held} less payments {paid_total} is {}",
                        *held - paid_total
                    ),
                );
            }
        }
        self.holds.remove(&job);
    }

    /// Payments and holds of jobs that have no record.
    pub fn leftovers(&mut self, report: &mut Report) {
        for (job, paid) in std::mem::take(&mut self.paid) {
            for ((segment, _), paid) in paid {
                report.problem(
                    &paid.record,
                    format!("pays segment {segment} of job {job}, which has no job record"),
                );
            }
        }
        for (job, forfeits) in std::mem::take(&mut self.forfeits) {
            forfeits::orphans(report, job, forfeits);
        }
        for (job, _) in std::mem::take(&mut self.holds) {
            report.problem(
                &format!("escrow:{job}"),
                "budget held for a job that has no record",
            );
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use chrono::Utc;
    use rust_decimal::Decimal;
    use vmlot_schemas::ledger::Settlement;
    use vmlot_schemas::market::{
        Checkpoint, GuestState, Image, JobSpec, JobState, JobStatus, SegmentCount, SettledSegment,
    };
    use vmlot_schemas::{HypervisorKind, ManifestId, Money, ProviderId, VmConfig, WIRE_VERSION};

    use super::*;
    use crate::verify::shape::{self, tests::settled};

    /// A running job whose segment 0 `settlement` pays, the job record
    /// saying `settled_by` settled it.
    pub fn job_with(settlement: &Settlement, settled_by: ProviderId) -> JobStatus {
        let money = |n| Money::new(Decimal::from(n), "CRD");
        JobStatus {
            version: WIRE_VERSION,
            job: settlement.job,
            spec: JobSpec {
                image: Image {
                    vm: VmConfig {
                        hypervisor: HypervisorKind::Qemu,
                        arch: "x86_64".into(),
                        memory_mib: 64,
                        vcpus: 1,
                        cmdline: String::new(),
                    },
                    kernel: ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, b"k"),
                    initrd: None,
                    disks: vec![],
                },
                segment_seconds: 10,
                segments: SegmentCount::UntilHalt,
                redundancy: 2,
                check: vmlot_schemas::market::ResultCheck::Continuation,
                reserve_price: money(1),
                budget: money(5),
                account: "alice".into(),
            },
            state: JobState::Running,
            checkpoint: Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
                memory: None,
            },
            settled: vec![SettledSegment {
                segment: settlement.segment,
                attempt: settlement.attempt,
                lot: settlement.lot,
                provider: settled_by,
                awarded: vec![settled_by, settlement.provider],
                price: settlement.amount.clone(),
                guest: GuestState::Halted { final_state: None },
                console: None,
                timings: settlement.timings,
                fetched_bytes: 0,
                sent_bytes: 0,
                settled_at: Utc::now(),
                finished_at: None,
                posted: false,
                unreplicated: false,
                partial_ms: None,
            }],
            open_lot: None,
            attempts: 0,
            waiting_for_providers: false,
            spent: money(1),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            end_reason: None,
            refunded: false,
            refused: vec![],
            restore_failures: vec![],
            check: None,
            stop_after: None,
        }
    }

    /// The problems of one job whose segment 0 `paid` pays, as the job
    /// record says `settled_by` settled it.
    fn problems(paid: ProviderId, settled_by: ProviderId) -> Vec<String> {
        let settlement = settled(vmlot_schemas::JobId::new(), paid);
        let status = job_with(&settlement, settled_by);
        let (_, tx) = crate::build::settlement(settlement);
        let (_, effect) = shape::check("the payment", &tx);
        let mut books = JobBooks::default();
        let mut report = Report::default();
        books.apply(&mut report, &"the payment", effect);
        books.check(&mut report, &status);
        report
            .problems
            .into_iter()
            .filter(|p| p.record == "the payment")
            .map(|p| p.what)
            .collect()
    }

    #[test]
    fn a_segment_is_paid_to_the_provider_whose_result_settled_it() {
        let (winner, loser) = (ProviderId::new(), ProviderId::new());
        assert!(problems(winner, winner).is_empty());
        assert_eq!(
            problems(loser, winner),
            [format!(
                "paid {loser}, but the result of {winner} settled the segment"
            )],
            "a losing replica paid"
        );
    }

    /// The books `txs` replayed in order after `status`'s hold, each named
    /// `tx N` (the hold is `tx 0`): the books, and what the replay found.
    pub(crate) fn replay(
        status: &JobStatus,
        txs: &[vmlot_schemas::ledger::Transaction],
    ) -> (JobBooks, Report) {
        let mut books = JobBooks::default();
        let mut report = Report::default();
        let (_, hold) = crate::build::hold(status.job, &status.spec.account, &status.spec.budget);
        for (i, tx) in std::iter::once(&hold).chain(txs).enumerate() {
            let record = format!("tx {i}");
            let (problems, effect) = shape::check(&record, tx);
            assert!(problems.is_empty(), "{problems:?}");
            books.apply(&mut report, &record, effect);
            for e in &tx.entries {
                *books
                    .balances
                    .entry((e.account.clone(), tx.unit.clone()))
                    .or_default() += e.signed();
            }
        }
        (books, report)
    }

    /// The problems the books `txs` (in order) show against `status`.
    fn check_all(status: &JobStatus, txs: &[vmlot_schemas::ledger::Transaction]) -> Vec<String> {
        let (mut books, mut report) = replay(status, txs);
        books.check(&mut report, status);
        report.problems.into_iter().map(|p| p.what).collect()
    }

    #[test]
    fn pending_posted_and_voided_payments_are_told_apart() {
        let provider = ProviderId::new();
        let settlement = settled(vmlot_schemas::JobId::new(), provider);
        let (_, paid) = crate::build::settlement(settlement.clone());
        let (_, post) = crate::build::post(&settlement, Decimal::ZERO);
        let (_, void) = crate::build::void(&settlement, "did not restore");
        assert_eq!(post.resolves, Some(paid.id));
        let mut status = job_with(&settlement, provider);

        // Pending, and the job says so; posted, and the job says so.
        let none: [String; 0] = [];
        assert_eq!(check_all(&status, std::slice::from_ref(&paid)), none);
        assert_eq!(check_all(&status, &[paid.clone(), post.clone()]), none);
        status.settled[0].posted = true;
        assert_eq!(check_all(&status, &[paid.clone(), post.clone()]), none);
        // The job says posted, the books say pending.
        let problems = check_all(&status, std::slice::from_ref(&paid));
        assert!(problems[0].contains("the books have it pending"), "{problems:?}");
        // Voided, yet the job keeps the segment.
        status.settled[0].posted = false;
        let problems = check_all(&status, &[paid.clone(), void.clone()]);
        assert!(problems[0].contains("its payment voided"), "{problems:?}");
        // Resolved twice, or resolving nothing.
        let problems = check_all(&status, &[paid.clone(), void, post.clone()]);
        assert!(
            problems.iter().any(|p| p.contains("already voided")),
            "{problems:?}"
        );
        let problems = check_all(&status, std::slice::from_ref(&post));
        assert!(problems[0].contains("not a settlement before it"), "{problems:?}");
        // A job ended and refunded with a payment still pending.
        status.state = JobState::Done;
        status.refunded = true;
        let problems = check_all(&status, std::slice::from_ref(&paid));
        assert!(
            problems.iter().any(|p| p.contains("still pending")),
            "{problems:?}"
        );
    }
}
