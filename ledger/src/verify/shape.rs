//! The shape of one transaction, checked on its own: the entries its kind
//! calls for, and a settlement's record agreeing with the entries that pay
//! it. Pure: it says what is wrong and what the transaction does, and the
//! replay keeps the account.

use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, Side, Transaction, TxKind};
use vmlot_schemas::{JobId, LotId, ProviderId};

/// A payment for a settled segment, as the replay keeps it until the job
/// records are checked.
pub(super) struct Paid {
    /// The settlement transaction's id (what a post or void names).
    pub tx: uuid::Uuid,
    pub provider: ProviderId,
    pub amount: Decimal,
    pub lot: LotId,
    pub attempt: u32,
    /// The ledger record that paid it, for problem reports.
    pub record: String,
    /// Posted (`Some(true)`), voided (`Some(false)`) or still pending.
    pub resolved: Option<bool>,
}

/// What a transaction does that the job checks need.
pub(super) enum Effect {
    /// Nothing to keep (a credit, or a transaction too broken to read).
    Nothing,
    /// A job's budget held from `user`.
    Hold {
        job: JobId,
        user: String,
        amount: Decimal,
        unit: String,
    },
    /// A job's escrow refunded.
    Refund { job: JobId },
    /// A segment paid (pending until resolved).
    Paid { job: JobId, segment: u32, paid: Paid },
    /// A pending payment posted or voided.
    Resolved(Resolution),
}

/// A post or void, as the replay keeps it to match with its settlement.
pub(super) struct Resolution {
    /// The settlement it resolves.
    pub resolves: uuid::Uuid,
    pub posted: bool,
    pub job: JobId,
    pub provider: ProviderId,
    pub amount: Decimal,
}

/// Checks the entries of `tx` against its kind, and a settlement's record
/// against its entries. Returns the problems found and what `tx` does.
pub(super) fn check(record: &str, tx: &Transaction) -> (Vec<String>, Effect) {
    let debits: Vec<&Account> = tx
        .entries
        .iter()
        .filter(|e| e.side == Side::Debit)
        .map(|e| &e.account)
        .collect();
    let credits: Vec<&Account> = tx
        .entries
        .iter()
        .filter(|e| e.side == Side::Credit)
        .map(|e| &e.account)
        .collect();
    let amount_of = |account: &Account| {
        tx.entries
            .iter()
            .find(|e| &e.account == account)
            .map(|e| e.amount)
            .unwrap_or_default()
    };
    let job_escrow = tx.job.map(Account::Escrow);
    let shape_ok = match tx.kind {
        TxKind::Credit => {
            matches!(debits[..], [Account::Operator]) && matches!(credits[..], [Account::User(_)])
        }
        TxKind::Hold => {
            matches!(debits[..], [Account::User(_)])
                && credits.len() == 1
                && Some(credits[0]) == job_escrow.as_ref()
        }
        TxKind::Refund => {
            debits.len() == 1
                && Some(debits[0]) == job_escrow.as_ref()
                && matches!(credits[..], [Account::User(_)])
        }
        TxKind::Settlement => {
            debits.len() == 1
                && Some(debits[0]) == job_escrow.as_ref()
                && matches!(credits[..], [Account::Pending(_)])
        }
        TxKind::Post => {
            let pending = match debits[..] {
                [Account::Pending(p)] => Some(*p),
                _ => None,
            };
            pending.is_some()
                && credits
                    .iter()
                    .all(|a| matches!(a, Account::Provider(_) | Account::Operator))
                && credits
                    .iter()
                    .filter(|a| matches!(a, Account::Provider(p) if Some(*p) == pending))
                    .count()
                    == 1
        }
        TxKind::Void => {
            matches!(debits[..], [Account::Pending(_)])
                && credits.len() == 1
                && Some(credits[0]) == job_escrow.as_ref()
        }
    };
    if !shape_ok {
        let what = format!("the entries do not have the shape of a {:?}", tx.kind);
        return (vec![what], Effect::Nothing);
    }
    let Some(job) = tx.job else {
        return (vec![], Effect::Nothing);
    };
    match tx.kind {
        TxKind::Hold => match debits[0] {
            Account::User(user) => {
                let effect = Effect::Hold {
                    job,
                    user: user.clone(),
                    amount: amount_of(debits[0]),
                    unit: tx.unit.clone(),
                };
                (vec![], effect)
            }
            _ => (vec![], Effect::Nothing),
        },
        TxKind::Refund => (vec![], Effect::Refund { job }),
        TxKind::Credit => (vec![], Effect::Nothing),
        TxKind::Settlement => {
            let Some(s) = tx.settlement.as_deref() else {
                return (vec!["a settlement without its details".into()], Effect::Nothing);
            };
            let mut problems = Vec::new();
            if !matches!(credits[..], [Account::Pending(p)] if *p == s.provider)
                || tx.provider != Some(s.provider)
            {
                problems.push("pays a provider other than the one its details name".into());
            }
            if s.job != job || Some(s.segment) != tx.segment {
                problems.push("details name another job or segment".into());
            }
            if s.amount.amount != amount_of(debits[0]) || s.amount.unit != tx.unit {
                problems.push("the escrow is debited other than the settled price".into());
            }
            let paid = Paid {
                tx: tx.id,
                provider: s.provider,
                amount: s.amount.amount,
                lot: s.lot,
                attempt: s.attempt,
                record: record.to_string(),
                resolved: None,
            };
            let effect = Effect::Paid {
                job,
                segment: s.segment,
                paid,
            };
            (problems, effect)
        }
        TxKind::Post | TxKind::Void => {
            let (Some(resolves), [Account::Pending(provider)]) = (tx.resolves, &debits[..]) else {
                return (
                    vec!["a post or void that names no settlement".into()],
                    Effect::Nothing,
                );
            };
            let mut problems = Vec::new();
            if tx.provider != Some(*provider) {
                problems.push("resolves a provider's pending payment other than the one it names".into());
            }
            let resolution = Resolution {
                resolves,
                posted: tx.kind == TxKind::Post,
                job,
                provider: *provider,
                amount: amount_of(debits[0]),
            };
            (problems, Effect::Resolved(resolution))
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use chrono::Utc;
    use vmlot_schemas::ledger::Settlement;
    use vmlot_schemas::market::{GuestState, SegmentTimings};
    use vmlot_schemas::{JobId, LotId, Money, ProviderId};

    use super::*;

    /// The books' record of segment 0 of `job`, paid 1 CRD to `provider`.
    pub fn settled(job: JobId, provider: ProviderId) -> Settlement {
        Settlement {
            job,
            segment: 0,
            lot: LotId::new(),
            attempt: 1,
            provider,
            payer: "alice".into(),
            amount: Money::new(Decimal::ONE, "CRD"),
            at: Utc::now(),
            guest: GuestState::Halted { final_state: None },
            console: None,
            timings: SegmentTimings::default(),
            fetched_bytes: 0,
            sent_bytes: 0,
            finished_at: Utc::now(),
        }
    }

    #[test]
    fn a_settlement_pays_the_provider_its_record_names() {
        let (job, provider) = (JobId::new(), ProviderId::new());
        let (_, tx) = crate::build::settlement(settled(job, provider));
        let (problems, effect) = check("rec", &tx);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(matches!(effect, Effect::Paid { segment: 0, ref paid, .. } if paid.provider == provider));

        let mut forged = tx.clone();
        forged.settlement.as_mut().unwrap().provider = ProviderId::new();
        let (problems, _) = check("rec", &forged);
        assert_eq!(problems, ["pays a provider other than the one its details name"]);

        let mut forged = tx.clone();
        forged.settlement.as_mut().unwrap().segment = 1;
        let (problems, _) = check("rec", &forged);
        assert_eq!(problems, ["details name another job or segment"]);

        let mut bare = tx;
        bare.settlement = None;
        let (problems, effect) = check("rec", &bare);
        assert_eq!(problems, ["a settlement without its details"]);
        assert!(matches!(effect, Effect::Nothing));
    }
}
