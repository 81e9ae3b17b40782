//! The shape of one transaction, checked on its own: the entries its kind
//! calls for, a settlement's record agreeing with the entries that pay
//! it, a deposit or release moving one provider's money between its own
//! two accounts, and a forfeit's record agreeing with the entries that
//! take it. Pure: it says what is wrong and what the transaction does, and
//! the replay keeps the account.

use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, ForfeitCause, Side, Transaction, TxKind};
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

/// A forfeit, as the replay keeps it until the job records are checked.
pub(super) struct Forfeited {
    pub segment: u32,
    pub attempt: u32,
    /// Whose deposit it took.
    pub provider: ProviderId,
    /// The user it went to.
    pub payer: String,
    pub cause: ForfeitCause,
    /// The ledger record that took it, for problem reports.
    pub record: String,
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
    /// A cheating provider's deposit taken for a job's submitter.
    Forfeit { job: JobId, forfeited: Forfeited },
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
pub(super) fn check(record: &(impl std::fmt::Display + ?Sized), tx: &Transaction) -> (Vec<String>, Effect) {
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
            matches!(debits[..], [Account::Operator])
                && matches!(credits[..], [Account::User(_) | Account::Provider(_)])
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
        TxKind::Deposit => {
            matches!((&debits[..], &credits[..]), ([Account::Provider(p)], [Account::Deposit(q)]) if p == q)
        }
        TxKind::Release => {
            matches!((&debits[..], &credits[..]), ([Account::Deposit(p)], [Account::Provider(q)]) if p == q)
        }
        TxKind::Forfeit => {
            matches!(
                (&debits[..], &credits[..]),
                ([Account::Deposit(_)], [Account::User(_)])
            )
        }
    };
    if !shape_ok {
        let what = format!("the entries do not have the shape of a {:?}", tx.kind);
        return (vec![what], Effect::Nothing);
    }
    if tx.forfeit.is_some() && tx.kind != TxKind::Forfeit {
        let what = format!("a {} carrying a forfeit's details", tx.kind.as_str());
        return (vec![what], Effect::Nothing);
    }
    match (tx.kind, debits[0]) {
        (TxKind::Deposit | TxKind::Release, _) => return (deposit_or_release(tx), Effect::Nothing),
        (TxKind::Forfeit, Account::Deposit(provider)) => {
            return forfeit(record, tx, *provider, credits[0], amount_of(debits[0]));
        }
        _ => {}
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
        // Checked above.
        TxKind::Deposit | TxKind::Release | TxKind::Forfeit => (vec![], Effect::Nothing),
    }
}

/// A deposit or release (its entries' shape checked): names the provider
/// whose two accounts it moves money between, and no job.
fn deposit_or_release(tx: &Transaction) -> Vec<String> {
    let moved = tx.entries.iter().find_map(|e| match e.account {
        Account::Deposit(p) => Some(p),
        _ => None,
    });
    let mut problems = Vec::new();
    if tx.provider.is_none() || tx.provider != moved {
        problems.push("names a provider other than the one whose deposit it moves".to_string());
    }
    if tx.job.is_some() || tx.segment.is_some() {
        problems.push(format!("a {} names a job", tx.kind.as_str()));
    }
    problems
}

/// A forfeit (its entries' shape checked) taking `amount` from the deposit
/// of `provider` for `to`: its details present and agreeing with them.
fn forfeit(
    record: &(impl std::fmt::Display + ?Sized),
    tx: &Transaction,
    provider: ProviderId,
    to: &Account,
    amount: Decimal,
) -> (Vec<String>, Effect) {
    let Some(f) = tx.forfeit.as_deref() else {
        return (vec!["a forfeit without its details".into()], Effect::Nothing);
    };
    let mut problems = Vec::new();
    if tx.provider != Some(provider) {
        problems.push("names a provider other than the one whose deposit it moves".into());
    }
    if f.provider != provider {
        problems.push("takes the deposit of a provider other than the one its details name".into());
    }
    if !matches!(to, Account::User(user) if *user == f.payer) {
        problems.push("pays a user other than the payer its details name".into());
    }
    if tx.job != Some(f.job) || tx.segment != Some(f.segment) {
        problems.push("details name another job or segment".into());
    }
    if f.amount.amount != amount || f.amount.unit != tx.unit {
        problems.push("the deposit is debited other than the forfeited amount".into());
    }
    let forfeited = Forfeited {
        segment: f.segment,
        attempt: f.attempt,
        provider: f.provider,
        payer: f.payer.clone(),
        cause: f.cause,
        record: record.to_string(),
    };
    (
        problems,
        Effect::Forfeit {
            job: f.job,
            forfeited,
        },
    )
}

#[cfg(test)]
pub(super) mod tests {
    use chrono::Utc;
    use vmlot_schemas::ledger::{Entry, Forfeit, Settlement};
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
            partial_ms: None,
        }
    }

    /// A forfeit of 1 CRD of `provider`'s deposit to alice, for segment 0
    /// (attempt 1) of `job`.
    pub fn forfeited(job: JobId, provider: ProviderId, cause: ForfeitCause) -> Forfeit {
        Forfeit {
            job,
            segment: 0,
            attempt: 1,
            provider,
            payer: "alice".into(),
            amount: Money::new(Decimal::ONE, "CRD"),
            cause,
        }
    }

    fn problems_of(tx: &Transaction) -> Vec<String> {
        check("rec", tx).0
    }

    #[test]
    fn a_deposit_and_a_release_move_one_providers_money_between_its_accounts() {
        let (p, q) = (ProviderId::new(), ProviderId::new());
        let crd = Money::new(Decimal::TWO, "CRD");
        let (_, deposit) = crate::build::deposit(&uuid::Uuid::new_v4(), p, &crd);
        let (_, release) = crate::build::release(&uuid::Uuid::new_v4(), p, &crd);
        for tx in [&deposit, &release] {
            assert!(tx.malformed().is_none());
            let (problems, effect) = check("rec", tx);
            assert!(problems.is_empty(), "{problems:?}");
            assert!(matches!(effect, Effect::Nothing));
        }
        assert_eq!(
            deposit.entries,
            [
                Entry::debit(Account::Provider(p), Decimal::TWO),
                Entry::credit(Account::Deposit(p), Decimal::TWO)
            ]
        );
        assert_eq!(
            release.entries,
            [
                Entry::debit(Account::Deposit(p), Decimal::TWO),
                Entry::credit(Account::Provider(p), Decimal::TWO)
            ]
        );

        // Into another provider's deposit; the wrong way round; to the operator.
        for (debit, credit) in [
            (Account::Provider(p), Account::Deposit(q)),
            (Account::Deposit(p), Account::Provider(p)),
            (Account::Provider(p), Account::Operator),
        ] {
            let mut forged = deposit.clone();
            forged.entries = vec![
                Entry::debit(debit, Decimal::TWO),
                Entry::credit(credit, Decimal::TWO),
            ];
            assert_eq!(
                problems_of(&forged),
                ["the entries do not have the shape of a Deposit"]
            );
        }
        let mut forged = release.clone();
        forged.entries[1].account = Account::Provider(q);
        assert_eq!(
            problems_of(&forged),
            ["the entries do not have the shape of a Release"]
        );

        let mut forged = deposit.clone();
        forged.provider = Some(q);
        assert_eq!(
            problems_of(&forged),
            ["names a provider other than the one whose deposit it moves"]
        );
        let mut forged = release;
        forged.job = Some(JobId::new());
        assert_eq!(problems_of(&forged), ["a release names a job"]);
        let mut forged = deposit;
        forged.forfeit = Some(Box::new(forfeited(JobId::new(), p, ForfeitCause::Minority)));
        assert_eq!(problems_of(&forged), ["a deposit carrying a forfeit's details"]);
    }

    #[test]
    fn the_operator_credits_users_and_providers_only() {
        let p = ProviderId::new();
        let crd = Money::new(Decimal::TWO, "CRD");
        for (account, ok) in [
            (Account::User("alice".into()), true),
            (Account::Provider(p), true),
            (Account::Deposit(p), false),
            (Account::Pending(p), false),
            (Account::Escrow(JobId::new()), false),
        ] {
            let (_, tx) = crate::build::credit(&uuid::Uuid::new_v4(), &account, &crd, "");
            assert_eq!(problems_of(&tx).is_empty(), ok, "{account}");
        }
    }

    #[test]
    fn a_forfeit_takes_what_its_record_names_from_whom_it_names() {
        let (job, p) = (JobId::new(), ProviderId::new());
        let (_, tx) = crate::build::forfeit(&forfeited(job, p, ForfeitCause::Unrestorable));
        assert!(tx.memo.contains("unrestorable") && tx.memo.contains("did not restore"));
        assert_eq!(
            tx.entries,
            [
                Entry::debit(Account::Deposit(p), Decimal::ONE),
                Entry::credit(Account::User("alice".into()), Decimal::ONE)
            ]
        );
        let (problems, effect) = check("rec", &tx);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(matches!(
            effect,
            Effect::Forfeit { job: j, ref forfeited }
                if j == job && forfeited.provider == p && forfeited.attempt == 1
                    && forfeited.cause == ForfeitCause::Unrestorable
        ));

        let mut forged = tx.clone();
        forged.entries[1].account = Account::Operator;
        assert_eq!(
            problems_of(&forged),
            ["the entries do not have the shape of a Forfeit"]
        );
        let mut forged = tx.clone();
        forged.entries[0].account = Account::Provider(p);
        assert_eq!(
            problems_of(&forged),
            ["the entries do not have the shape of a Forfeit"]
        );

        let forge = |change: &dyn Fn(&mut Forfeit)| {
            let mut forged = tx.clone();
            change(forged.forfeit.as_mut().unwrap());
            problems_of(&forged)
        };
        assert_eq!(
            forge(&|f| f.provider = ProviderId::new()),
            ["takes the deposit of a provider other than the one its details name"]
        );
        assert_eq!(
            forge(&|f| f.payer = "bob".into()),
            ["pays a user other than the payer its details name"]
        );
        assert_eq!(forge(&|f| f.segment = 4), ["details name another job or segment"]);
        assert_eq!(
            forge(&|f| f.job = JobId::new()),
            ["details name another job or segment"]
        );
        assert_eq!(
            forge(&|f| f.amount = Money::new(Decimal::TWO, "CRD")),
            ["the deposit is debited other than the forfeited amount"]
        );
        assert_eq!(
            forge(&|f| f.amount.unit = "EUR".into()),
            ["the deposit is debited other than the forfeited amount"]
        );
        let mut forged = tx.clone();
        forged.provider = None;
        assert_eq!(
            problems_of(&forged),
            ["names a provider other than the one whose deposit it moves"]
        );
        let mut bare = tx;
        bare.forfeit = None;
        let (problems, effect) = check("rec", &bare);
        assert_eq!(problems, ["a forfeit without its details"]);
        assert!(matches!(effect, Effect::Nothing));
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
