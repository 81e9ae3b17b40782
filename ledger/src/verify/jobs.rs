//! The books against the job records: each job's hold, its settled
//! segments each paid once to the provider whose result settled them, and
//! its escrow, running or refunded. Also what is left over once every
//! record is seen (payments and holds of jobs that have no record).

use std::collections::{BTreeMap, HashMap, HashSet};

use rust_decimal::Decimal;
use vmlot_schemas::JobId;
use vmlot_schemas::ledger::Account;
use vmlot_schemas::market::JobStatus;

use super::report::Report;
use super::shape::{Effect, Paid};

/// Balances by (account, unit), from replaying transactions.
pub type Balances = HashMap<(Account, String), Decimal>;

/// What the replayed transactions say about jobs.
#[derive(Default)]
pub(super) struct JobBooks {
    pub balances: Balances,
    /// Held budgets: job → (user, amount, unit).
    holds: HashMap<JobId, (String, Decimal, String)>,
    paid: HashMap<JobId, BTreeMap<u32, Paid>>,
    refunds: HashSet<JobId>,
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
                if let Some(first) = self.paid.entry(job).or_default().insert(segment, paid) {
                    report.problem(
                        record,
                        format!(
                            "segment {segment} of job {job} paid again (first: {})",
                            first.record
                        ),
                    );
                }
            }
        }
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
        for settled in &status.settled {
            match paid_of_job.remove(&settled.segment) {
                None => report.problem(
                    &record,
                    format!("segment {} settled but never paid", settled.segment),
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
                    if paid.amount != settled.price.amount
                        || paid.lot != settled.lot
                        || paid.attempt != settled.attempt
                    {
                        report.problem(&paid.record, "price or lot differ from the job's settled segment");
                    }
                }
            }
        }
        for (segment, paid) in paid_of_job {
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
            for (segment, paid) in paid {
                report.problem(
                    &paid.record,
                    format!("pays segment {segment} of job {job}, which has no job record"),
                );
            }
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
mod tests {
    use chrono::Utc;
    use rust_decimal::Decimal;
    use vmlot_schemas::ledger::Settlement;
    use vmlot_schemas::market::{
        Checkpoint, GuestState, Image, JobSpec, JobState, JobStatus, SegmentCount, SettledSegment,
    };
    use vmlot_schemas::{HypervisorKind, ManifestId, Money, ProviderId, VmConfig, WIRE_VERSION};

    use super::*;
    use crate::verify::shape::{self, tests::settled};

    fn job_with(settlement: &Settlement, settled_by: ProviderId) -> JobStatus {
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
                reserve_price: money(1),
                budget: money(5),
                account: "alice".into(),
            },
            state: JobState::Running,
            checkpoint: Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
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
        }
    }

    /// The problems of one job whose segment 0 `paid` pays, as the job
    /// record says `settled_by` settled it.
    fn problems(paid: ProviderId, settled_by: ProviderId) -> Vec<String> {
        let settlement = settled(vmlot_schemas::JobId::new(), paid);
        let status = job_with(&settlement, settled_by);
        let (_, tx) = crate::build::settlement(settlement, Decimal::ZERO);
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
}
