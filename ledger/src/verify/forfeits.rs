//! The books' forfeits against the job records: a provider's deposit is
//! taken only for cheating the record or the books prove, and only for
//! the job's submitter. A minority result is proven by the job's record
//! (the provider among those it refused); a checkpoint that did not
//! restore, by the books (a void of that provider's payment for the same
//! attempt at the same segment). One forfeit per (job, segment, attempt,
//! provider) follows from its subject, which the replay checks.

use std::collections::BTreeMap;

use vmlot_schemas::ledger::ForfeitCause;
use vmlot_schemas::market::JobStatus;

use super::report::Report;
use super::shape::{Forfeited, Paid};

/// Checks the forfeits for the job of `status` against its record and
/// against `paid`, its payments by (segment, attempt) with their
/// resolutions (the voided ones too).
pub(super) fn check(
    report: &mut Report,
    status: &JobStatus,
    forfeits: Vec<Forfeited>,
    paid: &BTreeMap<(u32, u32), Paid>,
) {
    let job = status.job;
    for f in forfeits {
        if f.payer != status.spec.account {
            report.problem(
                &f.record,
                format!(
                    "gives user:{} the deposit of {}, but user:{} submitted job {job}",
                    f.payer, f.provider, status.spec.account
                ),
            );
        }
        match f.cause {
            ForfeitCause::Minority => {
                if !status.refused.contains(&f.provider) {
                    report.problem(
                        &f.record,
                        format!(
                            "forfeit for a minority result, but job {job} does not list {} among the providers it refused",
                            f.provider
                        ),
                    );
                }
            }
            ForfeitCause::Unrestorable => {
                let voided = paid
                    .get(&(f.segment, f.attempt))
                    .is_some_and(|p| p.provider == f.provider && p.resolved == Some(false));
                if !voided {
                    report.problem(
                        &f.record,
                        format!(
                            "forfeit for a checkpoint that did not restore, but the books hold no void of {}'s payment for segment {} (attempt {}) of job {job}",
                            f.provider, f.segment, f.attempt
                        ),
                    );
                }
            }
        }
    }
}

/// Forfeits for a job that has no record.
pub(super) fn orphans(report: &mut Report, job: vmlot_schemas::JobId, forfeits: Vec<Forfeited>) {
    for f in forfeits {
        report.problem(
            &f.record,
            format!(
                "forfeits the deposit of {} for job {job}, which has no job record",
                f.provider
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use vmlot_schemas::ledger::{ForfeitCause, Transaction, TxKind};
    use vmlot_schemas::market::JobStatus;
    use vmlot_schemas::{JobId, ProviderId};

    use crate::verify::jobs::tests::{job_with, replay};
    use crate::verify::shape::tests::{forfeited, settled};

    /// The problems of the forfeits among `txs` (replayed in order, after
    /// the job's hold) against `status`, and against no record at all.
    fn check_all(status: &JobStatus, txs: &[Transaction]) -> (Vec<String>, Vec<String>) {
        let replay = |with_record: bool| {
            let (mut books, mut report) = replay(status, txs);
            // `tx N` is txs[N - 1]: the hold is `tx 0`.
            let forfeits: Vec<String> = (1..=txs.len())
                .filter(|&i| txs[i - 1].kind == TxKind::Forfeit)
                .map(|i| format!("tx {i}"))
                .collect();
            if with_record {
                books.check(&mut report, status);
            }
            books.leftovers(&mut report);
            report
                .problems
                .into_iter()
                .filter(|p| forfeits.contains(&p.record))
                .map(|p| p.what)
                .collect::<Vec<_>>()
        };
        (replay(true), replay(false))
    }

    #[test]
    fn a_minority_forfeit_needs_the_provider_refused_by_the_job() {
        let (winner, cheat) = (ProviderId::new(), ProviderId::new());
        let settlement = settled(JobId::new(), winner);
        let mut status = job_with(&settlement, winner);
        let (_, paid) = crate::build::settlement(settlement.clone());
        let (_, forfeit) = crate::build::forfeit(&forfeited(status.job, cheat, ForfeitCause::Minority));
        let txs = [paid, forfeit];

        let (problems, orphaned) = check_all(&status, &txs);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("does not list"), "{problems:?}");
        assert!(orphaned[0].contains("which has no job record"), "{orphaned:?}");

        status.refused.push(cheat);
        let (problems, _) = check_all(&status, &txs);
        assert!(problems.is_empty(), "{problems:?}");

        // Refused, but the deposit goes to someone else than the submitter.
        status.spec.account = "bob".into();
        let (problems, _) = check_all(&status, &txs);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("but user:bob submitted"), "{problems:?}");
    }

    #[test]
    fn an_unrestorable_forfeit_needs_a_void_of_that_providers_payment() {
        let (cheat, other) = (ProviderId::new(), ProviderId::new());
        let settlement = settled(JobId::new(), cheat);
        let mut status = job_with(&settlement, other);
        // The voided attempt ran again (attempt 2), settled by another.
        status.settled[0].attempt = 2;
        let mut again = settlement.clone();
        again.attempt = 2;
        again.provider = other;
        status.settled[0].lot = again.lot;
        let (_, paid) = crate::build::settlement(settlement.clone());
        let (_, void) = crate::build::void(&settlement, "did not restore");
        let (_, post) = crate::build::post(&settlement, Decimal::ZERO);
        let (_, paid_again) = crate::build::settlement(again.clone());
        let f = forfeited(status.job, cheat, ForfeitCause::Unrestorable);
        let (_, forfeit) = crate::build::forfeit(&f);

        let none: Vec<String> = vec![];
        let txs = [paid.clone(), void.clone(), paid_again.clone(), forfeit.clone()];
        assert_eq!(check_all(&status, &txs).0, none);

        // Posted, not voided: the checkpoint did restore.
        let (problems, _) = check_all(&status, &[paid.clone(), post, forfeit.clone()]);
        assert!(
            problems.iter().any(|p| p.contains("hold no void of")),
            "{problems:?}"
        );
        // Still pending; and never paid at all.
        let (problems, _) = check_all(&status, &[paid.clone(), forfeit.clone()]);
        assert!(
            problems.iter().any(|p| p.contains("hold no void of")),
            "{problems:?}"
        );
        let (problems, _) = check_all(&status, std::slice::from_ref(&forfeit));
        assert!(
            problems.iter().any(|p| p.contains("hold no void of")),
            "{problems:?}"
        );
        // Another provider's payment voided, or another attempt's.
        let mut wrong = f.clone();
        wrong.provider = other;
        let (_, forfeit_other) = crate::build::forfeit(&wrong);
        let (problems, _) = check_all(
            &status,
            &[paid.clone(), void.clone(), paid_again.clone(), forfeit_other],
        );
        assert!(
            problems.iter().any(|p| p.contains("hold no void of")),
            "{problems:?}"
        );
        let mut wrong = f;
        wrong.attempt = 2;
        let (_, forfeit_attempt) = crate::build::forfeit(&wrong);
        let (problems, _) = check_all(&status, &[paid, void, paid_again, forfeit_attempt]);
        assert!(
            problems.iter().any(|p| p.contains("hold no void of")),
            "{problems:?}"
        );
    }
}
