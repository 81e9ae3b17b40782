//! The providers' deposits in the synthetic book: put in from earnings,
//! a few released, a few forfeited where the job records and the books
//! prove the cheating.

use bytes::Bytes;
use chrono::Utc;
use rust_decimal::Decimal;
use vmlot_schemas::Money;
use vmlot_schemas::ProviderId;
use vmlot_schemas::ledger::{Account, Forfeit, ForfeitCause, Settlement, TxKind};
use vmlot_schemas::market::{GuestState, ResultCheck};

use super::{Book, FEE_RATE, Running, UNIT, start};

/// What each provider keeps in its deposit: put in as soon as its
/// earnings allow, topped up again whenever they allow after it shrank.
const DEPOSIT: Decimal = Decimal::from_parts(100, 0, 0, false, 2);
/// What a forfeit takes (at most what the deposit holds), as the broker's
/// forfeit setting would.
const FORFEIT: Decimal = Decimal::from_parts(50, 0, 0, false, 2);
/// What a provider takes back when it releases part of its deposit.
const RELEASE: Decimal = Decimal::from_parts(25, 0, 0, false, 2);

/// Rare events the fill spreads over the book: each is owed once every
/// so many settlements, and written at the next chance that allows it.
#[derive(Default)]
pub(super) struct Owed {
    every: u64,
    settlements: u64,
    minority: u64,
    unrestorable: u64,
    release: u64,
}

impl Owed {
    /// Each owed once every `every` settlements.
    pub fn every(every: u64) -> Self {
        Self {
            every,
            ..Default::default()
        }
    }

    /// One more settlement: what falls due with it.
    pub fn settled(&mut self) {
        self.settlements += 1;
        if self.settlements.is_multiple_of(self.every) {
            self.minority += 1;
            self.release += 1;
        }
        if self.settlements % self.every == self.every / 2 {
            self.unrestorable += 1;
        }
    }
}

impl Book {
    /// Posts `settlement`, then tops up its provider's deposit to
    /// [`DEPOSIT`] if its earnings now allow.
    pub(super) fn post(
        &mut self,
        settlement: &Settlement,
        out: &mut Vec<(String, Bytes)>,
        kinds: &mut Vec<TxKind>,
    ) {
        self.write(vmlot_ledger::build::post(settlement, FEE_RATE), out, kinds);
        let p = settlement.provider;
        let short = DEPOSIT - self.balance(&Account::Deposit(p));
        if short > Decimal::ZERO && self.balance(&Account::Provider(p)) >= short {
            let request = self.rng.uuid();
            let deposit = vmlot_ledger::build::deposit(&request, p, &Money::new(short, UNIT));
            self.write(deposit, out, kinds);
        }
    }

    /// What `provider` forfeits: [`FORFEIT`], at most what its deposit
    /// holds (nothing when it holds nothing).
    pub(super) fn forfeit_of(&self, provider: ProviderId) -> Option<Money> {
        let held = self.balance(&Account::Deposit(provider));
        (held > Decimal::ZERO).then(|| Money::new(held.min(FORFEIT), UNIT))
    }

    /// A release owed: a provider with a full deposit and no pending
    /// payment (as the broker asks) takes [`RELEASE`] of it back.
    pub(super) fn maybe_release(&mut self, out: &mut Vec<(String, Bytes)>, kinds: &mut Vec<TxKind>) {
        if self.owed.release == 0 {
            return;
        }
        let p = self.providers[self.rng.below(self.providers.len() as u64) as usize];
        if self.balance(&Account::Deposit(p)) >= DEPOSIT && self.balance(&Account::Pending(p)).is_zero() {
            self.owed.release -= 1;
            let request = self.rng.uuid();
            let release = vmlot_ledger::build::release(&request, p, &Money::new(RELEASE, UNIT));
            self.write(release, out, kinds);
        }
    }

    /// Where a forfeit for a checkpoint that did not restore is owed and
    /// `job`'s pending payment went to a provider with a deposit: that
    /// payment voided, the deposit forfeited, and the segment left to run
    /// again as the next attempt, from the checkpoint before (then `true`).
    pub(super) fn maybe_unrestorable(
        &mut self,
        job: &mut Running,
        out: &mut Vec<(String, Bytes)>,
        kinds: &mut Vec<TxKind>,
    ) -> bool {
        if self.owed.unrestorable == 0 {
            return false;
        }
        let Some(before) = job.pending.take() else {
            return false;
        };
        let Some(amount) = self.forfeit_of(before.provider) else {
            job.pending = Some(before);
            return false;
        };
        self.owed.unrestorable -= 1;
        self.write(vmlot_ledger::build::void(&before, "did not restore"), out, kinds);
        let forfeit = Forfeit {
            job: before.job,
            segment: before.segment,
            attempt: before.attempt,
            provider: before.provider,
            payer: job.status.spec.account.clone(),
            amount,
            cause: ForfeitCause::Unrestorable,
        };
        self.write(vmlot_ledger::build::forfeit(&forfeit), out, kinds);
        let status = &mut job.status;
        let voided = status.settled.pop();
        assert!(voided.is_some_and(|s| (s.segment, s.attempt) == (before.segment, before.attempt)));
        status.spent.amount -= before.amount.amount;
        status.checkpoint = match status.settled.last().map(|s| &s.guest) {
            Some(GuestState::Running { checkpoint }) => checkpoint.clone(),
            _ => start(),
        };
        status.updated_at = Utc::now();
        job.retry = Some(before.attempt + 1);
        true
    }

    /// Under a quorum of three where a minority forfeit is owed: the last
    /// replica's state differed, so the job refuses it and its deposit is
    /// forfeited (when it holds one).
    pub(super) fn maybe_minority(
        &mut self,
        job: &mut Running,
        segment: u32,
        attempt: u32,
        awarded: &[ProviderId],
        out: &mut Vec<(String, Bytes)>,
        kinds: &mut Vec<TxKind>,
    ) {
        if job.status.spec.check != ResultCheck::Quorum || self.owed.minority == 0 {
            return;
        }
        let id = job.status.job;
        if job.status.spec.check == ResultCheck::Quorum && self.owed.minority > 0 {
            let minority = awarded[awarded.len() - 1];
            if let Some(amount) = self.forfeit_of(minority) {
                self.owed.minority -= 1;
                job.status.refused.push(minority);
                let forfeit = Forfeit {
                    job: id,
                    segment,
                    attempt,
                    provider: minority,
                    payer: job.status.spec.account.clone(),
                    amount,
                    cause: ForfeitCause::Minority,
                };
                self.write(vmlot_ledger::build::forfeit(&forfeit), out, kinds);
            }
        }
    }
}
