//! Every transition of a job's life, and its refusals, without NATS.

use chrono::{DateTime, Utc};
use vmlot_schemas::market::{
    GuestState, JobState, JobStatus, ResultCheck, SegmentCount, SegmentResult, SettledSegment,
};
use vmlot_schemas::{JobId, LotId, Money, ProviderId};

use super::*;
use crate::fixtures::*;

/// What the settle step builds from a payment of `price` for `result`.
fn paid(result: &SegmentResult, price: Money) -> SettledSegment {
    SettledSegment {
        segment: result.segment,
        attempt: result.attempt,
        lot: result.lot,
        provider: result.provider,
        awarded: vec![],
        price,
        guest: result.guest.clone(),
        console: result.console,
        timings: result.timings,
        fetched_bytes: result.fetched_bytes,
        sent_bytes: result.sent_bytes,
        settled_at: Utc::now(),
        finished_at: Some(result.finished_at),
        posted: false,
        unreplicated: false,
        partial_ms: None,
    }
}

/// `status` after its next segment settled with the guest still running (checkpoint `c1`).
fn settled_once(status: JobStatus) -> JobStatus {
    let a = ProviderId::new();
    let s = awarded(&status, &[a], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    settle(&s, paid(&result_of(&s, a, running), money("1"))).unwrap()
}

fn later() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(60)
}

#[test]
fn offer_opens_the_next_attempt_of_the_next_segment() {
    let mut s = settled_once(job(SegmentCount::Count(3)));
    s.attempts = 2;
    let now = Utc::now();
    let id = LotId::new();
    let lot = offer(&s, id, now, WINDOW, 1).unwrap();
    assert_eq!((lot.lot, lot.job, lot.segment, lot.attempt), (id, s.job, 1, 3));
    assert_eq!(lot.checkpoint, s.checkpoint);
    assert_eq!(lot.reserve_price, s.spec.reserve_price);
    assert_eq!(lot.bid_deadline, now + chrono::Duration::seconds(2));
    assert!(
        lot.shards.is_none() && lot.invited.is_empty(),
        "invitations are the offer step's"
    );
}

#[test]
fn offer_is_refused_on_a_final_job_an_ending_job_and_a_live_award() {
    for state in [
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
        JobState::BudgetSpent,
    ] {
        assert_eq!(
            offer(&ended(state), LotId::new(), Utc::now(), WINDOW, 1),
            Err(Refused::Final(state))
        );
    }
    let done = settled_once(unchecked(job(SegmentCount::Count(1))));
    assert_eq!(
        offer(&done, LotId::new(), Utc::now(), WINDOW, 1),
        Err(Refused::Ends(Ending::SegmentsRan(1)))
    );
    let mut broke = job(SegmentCount::UntilHalt);
    broke.spent = money("10");
    assert_eq!(
        offer(&broke, LotId::new(), Utc::now(), WINDOW, 1),
        Err(Refused::Ends(Ending::BudgetSpent))
    );
    let waiting = awarded(&job(SegmentCount::UntilHalt), &[ProviderId::new()], later());
    assert!(matches!(
        offer(&waiting, LotId::new(), Utc::now(), WINDOW, 1),
        Err(Refused::AwardPending { .. })
    ));
}

#[test]
fn award_records_the_winners_and_their_deadline() {
    let mut s = job(SegmentCount::UntilHalt);
    s.waiting_for_providers = true;
    let lot = offered(&s, Utc::now());
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let winners = vec![(a, money("0.4")), (b, money("0.6"))];
    let deadline = later();
    let next = award(&s, &lot, &winners, deadline, Utc::now()).unwrap();
    let open = next.open_lot.as_ref().unwrap();
    assert_eq!(open.lot, lot);
    assert_eq!(open.awarded, winners);
    assert_eq!(open.award_deadline, Some(deadline));
    assert_eq!(next.attempts, 1);
    assert!(!next.waiting_for_providers);
    assert_eq!(live_award(&next, Utc::now()).map(|o| o.lot.lot), Some(lot.lot));
}

#[test]
fn award_is_refused_on_a_final_job_and_for_another_attempt() {
    let s = job(SegmentCount::UntilHalt);
    let lot = offered(&s, Utc::now());
    let winners = vec![(ProviderId::new(), money("0.5"))];
    let mut cancelled = s.clone();
    cancelled.state = JobState::Cancelled;
    assert_eq!(
        award(&cancelled, &lot, &winners, later(), Utc::now()),
        Err(Refused::Final(JobState::Cancelled))
    );
    let mut stale = lot.clone();
    stale.attempt = 5;
    assert_eq!(
        award(&s, &stale, &winners, later(), Utc::now()),
        Err(Refused::NotNextAttempt { next: 1, got: 5 })
    );
    let mut ahead = lot.clone();
    ahead.segment = 2;
    assert_eq!(
        award(&s, &ahead, &winners, later(), Utc::now()),
        Err(Refused::NotNextSegment { next: 0, got: 2 })
    );
    let mut other = lot.clone();
    other.job = JobId::new();
    assert_eq!(
        award(&s, &other, &winners, later(), Utc::now()),
        Err(Refused::OtherJob)
    );
    assert_eq!(award(&s, &lot, &[], later(), Utc::now()), Err(Refused::NoWinner));
}

#[test]
fn no_bids_leave_the_job_waiting_for_providers() {
    let s = awarded(&job(SegmentCount::UntilHalt), &[ProviderId::new()], Utc::now());
    let next = wait_for_providers(&s).unwrap();
    assert!(next.waiting_for_providers);
    assert!(next.open_lot.is_none());
    assert_eq!(next.attempts, s.attempts, "the attempt stays counted");
    assert_eq!(
        wait_for_providers(&next),
        Ok(next.clone()),
        "waiting again changes nothing"
    );
    assert_eq!(
        wait_for_providers(&ended(JobState::Cancelled)),
        Err(Refused::Final(JobState::Cancelled))
    );
}

#[test]
fn a_result_of_the_open_attempt_from_an_awarded_provider_is_owed_its_price() {
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let s = awarded(&job(SegmentCount::UntilHalt), &[a, b], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    assert_eq!(
        check_result(&s, &result_of(&s, b, running.clone())),
        Ok(money("0.5"))
    );
}

#[test]
fn a_result_for_another_attempt_or_from_a_stranger_is_refused() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let good = result_of(&s, a, GuestState::Halted { final_state: None });
    let stranger = ProviderId::new();
    assert_eq!(
        check_result(
            &s,
            &result_of(&s, stranger, GuestState::Halted { final_state: None })
        ),
        Err(Refused::NotAwarded(stranger))
    );
    for wrong in [
        SegmentResult {
            attempt: good.attempt + 1,
            ..good.clone()
        },
        SegmentResult {
            segment: good.segment + 1,
            ..good.clone()
        },
        SegmentResult {
            lot: LotId::new(),
            ..good.clone()
        },
        SegmentResult {
            job: JobId::new(),
            ..good.clone()
        },
    ] {
        assert_eq!(check_result(&s, &wrong), Err(Refused::NotOpen));
    }
    let closed = withdraw_lot(&s).unwrap();
    assert_eq!(check_result(&closed, &good), Err(Refused::NoOpenLot));
    let mut cancelled = s.clone();
    cancelled.state = JobState::Cancelled;
    assert_eq!(
        check_result(&cancelled, &good),
        Err(Refused::Final(JobState::Cancelled))
    );
}

#[test]
fn an_accepted_result_settles_the_segment_and_advances_the_checkpoint() {
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let s = awarded(&job(SegmentCount::UntilHalt), &[a, b], later());
    let next_cp = checkpoint(b"c1");
    let result = result_of(
        &s,
        b,
        GuestState::Running {
            checkpoint: next_cp.clone(),
        },
    );
    let next = settle(&s, paid(&result, money("0.5"))).unwrap();
    assert_eq!(next.state, JobState::Running);
    assert_eq!(next.checkpoint, next_cp);
    assert_eq!(next.spent, money("0.5"));
    assert_eq!(next.settled.len(), 1);
    assert_eq!(next.settled[0].provider, b);
    assert_eq!(
        next.settled[0].awarded,
        vec![a, b],
        "every replica awarded is kept"
    );
    assert!(next.open_lot.is_none());
    assert_eq!(next.attempts, 0);
    assert!(!next.waiting_for_providers);
    let lot = offered(&next, Utc::now());
    assert_eq!(
        (lot.segment, lot.attempt),
        (1, 1),
        "the next segment, first attempt"
    );
    assert_eq!(lot.checkpoint, next_cp);
}

#[test]
fn a_settlement_applied_twice_or_out_of_order_is_refused() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let payment = paid(&result_of(&s, a, running), money("0.5"));
    let next = settle(&s, payment.clone()).unwrap();
    assert_eq!(settle(&next, payment.clone()), Err(Refused::AlreadySettled(0)));
    let ahead = SettledSegment {
        segment: 3,
        ..payment
    };
    assert_eq!(
        settle(&s, ahead),
        Err(Refused::NotNextSegment { next: 0, got: 3 })
    );
}

#[test]
fn a_result_for_an_attempt_no_longer_open_settles_nothing() {
    // A task holding an older copy of the record (its broker stalled past
    // its lease) settles attempt 1 after another task withdrew it, or
    // after it opened attempt 2: refused, so nothing is paid for it.
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a, ProviderId::new()], later());
    let payment = paid(
        &result_of(&s, a, GuestState::Halted { final_state: None }),
        money("0.5"),
    );
    let withdrawn = withdraw_lot(&s).unwrap();
    assert_eq!(settle(&withdrawn, payment.clone()), Err(Refused::NotOpen));
    let b = ProviderId::new();
    let second = awarded(&withdrawn, &[b], later());
    assert_eq!(second.open_lot.as_ref().unwrap().lot.attempt, 2);
    assert_eq!(settle(&second, payment), Err(Refused::NotOpen));
    let settled = settle(
        &second,
        paid(
            &result_of(&second, b, GuestState::Halted { final_state: None }),
            money("0.5"),
        ),
    )
    .unwrap();
    assert_eq!(settled.settled[0].awarded, vec![b]);
    assert_eq!(settled.settled[0].attempt, 2);
}

#[test]
fn the_guest_halting_ends_the_job_done() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let next = settle(
        &s,
        paid(
            &result_of(&s, a, GuestState::Halted { final_state: None }),
            money("0.5"),
        ),
    )
    .unwrap();
    assert_eq!(next.state, JobState::Done);
    assert_eq!(next.end_reason.as_deref(), Some("guest halted"));
    assert_eq!(next.checkpoint, s.checkpoint, "no checkpoint after a halt");
    assert_eq!(
        offer(&next, LotId::new(), Utc::now(), WINDOW, 1),
        Err(Refused::Final(JobState::Done))
    );
}

#[test]
fn the_guest_crashing_fails_the_job() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let crashed = GuestState::Crashed {
        reason: "oops".into(),
        final_state: None,
    };
    let next = settle(&s, paid(&result_of(&s, a, crashed), money("0.5"))).unwrap();
    assert_eq!(next.state, JobState::Failed);
    assert_eq!(next.end_reason.as_deref(), Some("guest crashed: oops"));
}

/// `job` with results checked only for what they claim.
fn unchecked(mut status: JobStatus) -> JobStatus {
    status.spec.check = ResultCheck::None;
    status
}

#[test]
fn the_segment_count_reached_ends_the_job_done() {
    let a = ProviderId::new();
    let s = awarded(&unchecked(job(SegmentCount::Count(1))), &[a], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let next = settle(&s, paid(&result_of(&s, a, running), money("0.5"))).unwrap();
    assert_eq!(
        next.state,
        JobState::Running,
        "settling does not end it by itself"
    );
    let ending = ending(&next).unwrap();
    assert_eq!(ending, Ending::SegmentsRan(1));
    let done = end(&next, ending).unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.end_reason.as_deref(), Some("all 1 segments ran"));
}

#[test]
fn a_segment_paid_after_a_cancel_is_recorded_and_the_job_stays_cancelled() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let result = result_of(
        &s,
        a,
        GuestState::Running {
            checkpoint: checkpoint(b"c1"),
        },
    );
    let cancelled = cancel(&s).unwrap();
    let next = settle(&cancelled, paid(&result, money("0.5"))).unwrap();
    assert_eq!(next.state, JobState::Cancelled);
    assert_eq!(next.settled.len(), 1);
    assert_eq!(next.spent, money("0.5"));
    assert_eq!(next.checkpoint, s.checkpoint, "an ended job does not advance");
}

#[test]
fn the_deadline_passing_opens_a_new_attempt() {
    let a = ProviderId::new();
    let fresh = job(SegmentCount::UntilHalt);
    assert_eq!(deadline_passed(&fresh, Utc::now()), Err(Refused::NoOpenLot));
    let due = later();
    let s = awarded(&fresh, &[a], due);
    assert!(matches!(
        deadline_passed(&s, Utc::now()),
        Err(Refused::AwardPending { deadline, .. }) if deadline == due
    ));
    let after = due + chrono::Duration::seconds(1);
    let next = deadline_passed(&s, after).unwrap();
    assert!(next.open_lot.is_none());
    let lot = offer(&next, LotId::new(), after, WINDOW, 1).unwrap();
    assert_eq!((lot.segment, lot.attempt), (0, 2));
    // A record straight from the store still holding the timed-out lot is
    // offered anew too.
    assert_eq!(offer(&s, LotId::new(), after, WINDOW, 1).unwrap().attempt, 2);
    let mut cancelled = s.clone();
    cancelled.state = JobState::Cancelled;
    assert_eq!(
        deadline_passed(&cancelled, after),
        Err(Refused::Final(JobState::Cancelled))
    );
}

#[test]
fn cancel_ends_a_running_job_only() {
    let s = awarded(&job(SegmentCount::UntilHalt), &[ProviderId::new()], later());
    let next = cancel(&s).unwrap();
    assert_eq!(next.state, JobState::Cancelled);
    assert_eq!(next.end_reason.as_deref(), Some("cancelled by the submitter"));
    assert!(next.open_lot.is_some(), "its providers are told to stop first");
    assert_eq!(cancel(&next), Err(Refused::Final(JobState::Cancelled)));
    assert_eq!(
        Refused::Final(JobState::Cancelled).to_string(),
        "job already ended (Cancelled)"
    );
    let stopped = withdraw_lot(&next).unwrap();
    assert!(stopped.open_lot.is_none());
    assert_eq!(withdraw_lot(&stopped), Err(Refused::NoOpenLot));
}

#[test]
fn the_budget_spent_ends_the_job() {
    let a = ProviderId::new();
    let mut s = job(SegmentCount::UntilHalt);
    s.spent = money("9.5");
    assert_eq!(ending(&s), None);
    assert_eq!(remaining(&s), money("0.5"));
    let s = awarded(&s, &[a], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let next = settle(&s, paid(&result_of(&s, a, running), money("0.5"))).unwrap();
    assert_eq!(ending(&next), Some(Ending::BudgetSpent));
    let spent = end(&next, Ending::BudgetSpent).unwrap();
    assert_eq!(spent.state, JobState::BudgetSpent);
    assert_eq!(spent.end_reason.as_deref(), Some("budget spent"));
    assert_eq!(
        end(&spent, Ending::BudgetSpent),
        Err(Refused::Final(JobState::BudgetSpent))
    );

    let no_fit = end(
        &awarded(&job(SegmentCount::UntilHalt), &[a], later()),
        Ending::NoBidFits,
    )
    .unwrap();
    assert_eq!(no_fit.state, JobState::BudgetSpent);
    assert_eq!(
        no_fit.end_reason.as_deref(),
        Some("no bid fits the remaining budget")
    );
    assert!(no_fit.open_lot.is_none());
}

#[test]
fn a_budget_never_held_fails_the_job() {
    let next = end(
        &job(SegmentCount::UntilHalt),
        Ending::Unfunded("insufficient funds".into()),
    )
    .unwrap();
    assert_eq!(next.state, JobState::Failed);
    assert_eq!(next.end_reason.as_deref(), Some("insufficient funds"));
}

#[test]
fn only_an_ended_job_is_refunded_and_only_once() {
    assert_eq!(
        refunded(&job(SegmentCount::UntilHalt)),
        Err(Refused::StillRunning)
    );
    let next = refunded(&ended(JobState::Done)).unwrap();
    assert!(next.refunded);
    assert_eq!(refunded(&next), Err(Refused::AlreadyRefunded));
}

#[test]
fn a_refused_provider_is_never_awarded_the_job_again_nor_heard() {
    let (cheat, honest) = (ProviderId::new(), ProviderId::new());
    let s = awarded(&job(SegmentCount::UntilHalt), &[cheat, honest], later());
    assert!(!all_awarded_refused(&s));
    let s = refuse_provider(&s, cheat).unwrap();
    assert_eq!(s.refused, vec![cheat]);
    assert_eq!(refuse_provider(&s, cheat), Err(Refused::AlreadyRefused(cheat)));
    // The honest replica can still settle; the refused one cannot.
    assert!(!all_awarded_refused(&s));
    assert_eq!(
        check_result(
            &s,
            &result_of(&s, cheat, GuestState::Halted { final_state: None })
        ),
        Err(Refused::Excluded(cheat))
    );
    assert!(
        check_result(
            &s,
            &result_of(&s, honest, GuestState::Halted { final_state: None })
        )
        .is_ok()
    );
    let s = refuse_provider(&s, honest).unwrap();
    assert!(all_awarded_refused(&s));
    // The next attempt cannot go to either.
    let s = withdraw_lot(&s).unwrap();
    let lot = offered(&s, Utc::now());
    assert_eq!(
        award(&s, &lot, &[(cheat, money("0.1"))], later(), Utc::now()),
        Err(Refused::Excluded(cheat))
    );
    assert!(
        award(
            &s,
            &lot,
            &[(ProviderId::new(), money("0.1"))],
            later(),
            Utc::now()
        )
        .is_ok()
    );
    assert!(matches!(
        refuse_provider(&ended(JobState::Done), cheat),
        Err(Refused::Final(JobState::Done))
    ));
}

#[test]
fn a_halted_guests_final_state_is_the_jobs_last_checkpoint() {
    let a = ProviderId::new();
    let s = awarded(&job(SegmentCount::UntilHalt), &[a], later());
    let last = checkpoint(b"final disks");
    let halted = GuestState::Halted {
        final_state: Some(last.clone()),
    };
    let next = settle(&s, paid(&result_of(&s, a, halted), money("0.5"))).unwrap();
    assert_eq!(next.state, JobState::Done);
    assert_eq!(next.checkpoint, last);
}

#[test]
fn an_award_records_when_it_was_made() {
    let s = job(SegmentCount::UntilHalt);
    let lot = offered(&s, Utc::now());
    let at = Utc::now() - chrono::Duration::seconds(3);
    let next = award(&s, &lot, &[(ProviderId::new(), money("0.5"))], later(), at).unwrap();
    assert_eq!(next.open_lot.unwrap().awarded_at, Some(at));
}

#[test]
fn a_payment_is_due_once_the_next_segment_continued_from_its_checkpoint_or_the_job_ended() {
    let one = settled_once(job(SegmentCount::UntilHalt));
    assert!(
        due_posts(&one).is_empty(),
        "nothing restored segment 0's checkpoint yet"
    );
    let two = settled_once(one);
    let due: Vec<u32> = due_posts(&two).iter().map(|s| s.segment).collect();
    assert_eq!(due, [0]);
    let posted_0 = posted(&two, 0).unwrap();
    assert!(posted_0.settled[0].posted && !posted_0.settled[1].posted);
    assert!(due_posts(&posted_0).is_empty());
    assert_eq!(posted(&posted_0, 0), Err(Refused::NotPending(0)), "posted twice");
    assert_eq!(posted(&posted_0, 7), Err(Refused::NotPending(7)), "never settled");
    // Once the job ended, its last payment is due too.
    let ended = cancel(&posted_0).unwrap();
    let due: Vec<u32> = due_posts(&ended).iter().map(|s| s.segment).collect();
    assert_eq!(due, [1]);
    assert!(posted(&ended, 1).unwrap().settled.iter().all(|s| s.posted));
}

#[test]
fn a_checkpoint_two_providers_cannot_restore_voids_its_payment_and_the_job_goes_back() {
    let one = settled_once(job(SegmentCount::Count(5)));
    let two = settled_once(one.clone());
    let maker = two.settled[1].provider;
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let reported = restore_failed(&two, a).unwrap();
    assert_eq!(restore_failed(&reported, a), Err(Refused::AlreadyReported(a)));
    assert!(
        void_due(&reported, 2).is_none(),
        "one provider's word is not enough"
    );
    // Not awarded the checkpoint it could not restore.
    let lot = offered(&reported, Utc::now());
    assert_eq!(
        award(&reported, &lot, &[(a, money("1"))], later(), Utc::now()),
        Err(Refused::Excluded(a))
    );
    let reported = restore_failed(&reported, b).unwrap();
    let due = void_due(&reported, 2).expect("two providers failed");
    assert_eq!((due.segment, due.attempt), (1, two.settled[1].attempt));

    let voided = void(&reported, 1).unwrap();
    assert_eq!(voided.settled.len(), 1, "segment 1 runs again");
    assert_eq!(voided.checkpoint, one.checkpoint, "from its input");
    assert_eq!(voided.spent, one.spent);
    assert!(voided.restore_failures.is_empty());
    assert_eq!(voided.refused, vec![maker]);
    assert_eq!(
        voided.attempts, two.settled[1].attempt,
        "the next attempt has a subject of its own"
    );
    assert_eq!(offered(&voided, Utc::now()).segment, 1);
    assert_eq!(void(&voided, 1), Err(Refused::NotPending(1)), "voided twice");

    // A posted segment is never voided; nor is one whose guest ended.
    let posted_1 = posted(&reported, 1).unwrap();
    assert!(void_due(&posted_1, 2).is_none());
    assert_eq!(void(&posted_1, 1), Err(Refused::NotPending(1)));
    // Voiding segment 0 goes back to the image.
    let first = restore_failed(&restore_failed(&one, a).unwrap(), b).unwrap();
    let back = void(&first, 0).unwrap();
    assert!(back.settled.is_empty() && back.checkpoint.machine_state.is_none());
    assert_eq!(back.checkpoint.disks, one.spec.image.disks);
    // A restore failure settles nothing.
    let failed = paid(
        &result_of(
            &awarded(&one, &[a], later()),
            a,
            GuestState::RestoreFailed { reason: "x".into() },
        ),
        money("1"),
    );
    assert_eq!(
        settle(&awarded(&one, &[a], later()), failed),
        Err(Refused::NothingRan)
    );
}

#[test]
fn a_run_of_segments_by_one_provider_is_posted_only_when_another_continues_it() {
    let s = job(SegmentCount::UntilHalt);
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let running = |name: &[u8]| GuestState::Running {
        checkpoint: checkpoint(name),
    };
    let settle_by = |s: &JobStatus, p: ProviderId, name: &[u8]| {
        let s = awarded(s, &[p], later());
        settle(&s, paid(&result_of(&s, p, running(name)), money("1"))).unwrap()
    };
    let s = settle_by(&s, a, b"c1");
    let s = settle_by(&s, a, b"c2");
    let s = settle_by(&s, a, b"c3");
    assert!(
        due_posts(&s).is_empty(),
        "a continuing from its own checkpoints proves nothing"
    );
    let s = settle_by(&s, b, b"c4");
    let due: Vec<u32> = due_posts(&s).iter().map(|x| x.segment).collect();
    assert_eq!(due, [0, 1, 2], "b restored c3, which descends from a's run");
    // Unchecked, every payment is due at once.
    let s = settle_by(&unchecked(job(SegmentCount::UntilHalt)), a, b"c1");
    assert_eq!(due_posts(&s).len(), 1);
}

#[test]
fn the_last_checkpoint_is_checked_by_another_provider_before_the_job_ends() {
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let s = awarded(&job(SegmentCount::Count(1)), &[a], later());
    let c1 = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let ran = settle(&s, paid(&result_of(&s, a, c1), money("1"))).unwrap();
    assert!(check_due(&ran));
    assert_eq!(ending(&ran), None, "the check restore comes first");
    assert!(due_posts(&ran).is_empty());
    let lot = offer(&ran, LotId::new(), Utc::now(), WINDOW, 1).unwrap();
    assert!(lot.check);
    assert_eq!((lot.segment, lot.segment_seconds), (1, 1));
    assert_eq!(lot.checkpoint, ran.checkpoint);
    assert_eq!(checked_provider(&ran, &lot), Some(a));
    assert_eq!(
        award(&ran, &lot, &[(a, money("0.1"))], later(), Utc::now()),
        Err(Refused::OwnCheckpoint(a)),
        "nobody checks its own checkpoint"
    );
    let checking = award(&ran, &lot, &[(b, money("0.1"))], later(), Utc::now()).unwrap();
    let c2 = GuestState::Running {
        checkpoint: checkpoint(b"c2"),
    };
    let check = paid(&result_of(&checking, b, c2), money("0.1"));
    let done = settle(&checking, check.clone()).unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(
        done.checkpoint, ran.checkpoint,
        "the job's state is its last segment's"
    );
    assert_eq!(done.settled.len(), 1);
    assert_eq!(done.check.as_ref().map(|c| c.provider), Some(b));
    assert_eq!(done.spent, money("1.1"), "the segment and its check");
    assert!(
        done.end_reason.as_deref().unwrap().contains("restored on"),
        "{:?}",
        done.end_reason
    );
    assert_eq!(settle(&done, check), Err(Refused::AlreadySettled(1)), "a repeat");
    let due: Vec<u32> = due_posts(&done).iter().map(|x| x.segment).collect();
    assert_eq!(due, [0, 1], "the checked segment and the check itself");
    let posted_all = posted(&posted(&done, 0).unwrap(), 1).unwrap();
    assert!(posted_all.payments().all(|p| p.posted));
    assert!(!check_due(&posted_all), "checked once");

    // The check restore failing on two providers voids the last segment.
    let failed = restore_failed(&restore_failed(&checking, b).unwrap(), ProviderId::new()).unwrap();
    let voided = void(&failed, void_due(&failed, 2).unwrap().segment).unwrap();
    assert!(voided.settled.is_empty() && !check_due(&voided));
    assert!(!offer(&voided, LotId::new(), Utc::now(), WINDOW, 1).unwrap().check);

    // Unchecked, the job ends when its segments ran.
    let s = awarded(&unchecked(job(SegmentCount::Count(1))), &[a], later());
    let c1 = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let ran = settle(&s, paid(&result_of(&s, a, c1), money("1"))).unwrap();
    assert!(!check_due(&ran));
    assert_eq!(ending(&ran), Some(Ending::SegmentsRan(1)));
}

#[test]
fn a_quorum_keeps_standby_bidders_and_awards_them_one_by_one_to_break_a_tie() {
    let mut s = job(SegmentCount::Count(3));
    s.spec.check = ResultCheck::Quorum;
    let (a, b, c, d, refused) = (
        ProviderId::new(),
        ProviderId::new(),
        ProviderId::new(),
        ProviderId::new(),
        ProviderId::new(),
    );
    s.refused.push(refused);
    let s = awarded(&s, &[a, b], later());
    let bidders = [
        (a, money("0.1")),
        (c, money("0.3")),
        (refused, money("0.2")),
        (d, money("0.4")),
    ];
    let s = standby(&s, &bidders).unwrap();
    let open = s.open_lot.as_ref().unwrap();
    assert_eq!(
        open.standby,
        [(c, money("0.3")), (d, money("0.4"))],
        "in order, without winners or refused providers"
    );
    assert_eq!(
        add_replica(&s, d, later()).map(|_| ()),
        Ok(()),
        "any standby bidder"
    );
    let far = later() + chrono::Duration::seconds(60);
    let tied = add_replica(&s, c, far).unwrap();
    let open = tied.open_lot.as_ref().unwrap();
    assert_eq!(open.awarded.last(), Some(&(c, money("0.3"))), "at its own price");
    assert_eq!(open.standby, [(d, money("0.4"))]);
    assert_eq!(open.award_deadline, Some(far), "the deadline moves out for it");
    assert_eq!(add_replica(&tied, c, far), Err(Refused::NotAwarded(c)), "once");
    assert_eq!(add_replica(&tied, refused, far), Err(Refused::Excluded(refused)));
    // The tie-breaker's result is one of the open attempt's.
    let result = result_of(&tied, c, GuestState::Halted { final_state: None });
    assert_eq!(check_result(&tied, &result), Ok(money("0.3")));
    let dropped = drop_standby(&tied, d).unwrap();
    assert!(dropped.open_lot.unwrap().standby.is_empty());
    assert_eq!(drop_standby(&tied, c), Err(Refused::NotAwarded(c)));
    // Payments of a quorum are posted as they settle: the replicas agreed.
    let paid_now = settle(&tied, paid(&result, money("0.3"))).unwrap();
    assert_eq!(due_posts(&paid_now).len(), 1);
}

#[test]
fn an_unreplicated_quorum_attempt_is_paid_once_another_provider_continues_it() {
    let mut s = job(SegmentCount::Count(4));
    s.spec.check = ResultCheck::Quorum;
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let running = |tag: &[u8]| GuestState::Running {
        checkpoint: checkpoint(tag),
    };
    // Only a quorum job's attempt with one winner goes unreplicated.
    let mut open = job(SegmentCount::Count(4));
    open = awarded(&open, &[a], later());
    assert_eq!(unreplicated(&open), Err(Refused::NotQuorum));
    assert_eq!(
        unreplicated(&awarded(&s, &[a, b], later())),
        Err(Refused::NoOpenLot)
    );
    // Segment 0 by `a` alone, unreplicated: it waits.
    let s0 = unreplicated(&awarded(&s, &[a], later())).unwrap();
    assert!(s0.open_lot.as_ref().unwrap().unreplicated);
    let s0 = settle(&s0, paid(&result_of(&s0, a, running(b"c1")), money("1"))).unwrap();
    assert!(s0.settled[0].unreplicated);
    assert!(awaits_continuation(&s0, &s0.settled[0]));
    assert!(due_posts(&s0).is_empty(), "nobody compared it");
    // Segment 1 by `a` alone again: still nobody else restored it.
    let s1 = unreplicated(&awarded(&s0, &[a], later())).unwrap();
    let s1 = settle(&s1, paid(&result_of(&s1, a, running(b"c2")), money("1"))).unwrap();
    assert!(due_posts(&s1).is_empty());
    // Segment 2 replicated on `a` and `b`, which agreed: both earlier
    // checkpoints were restored by another provider; the agreed one is
    // paid at once.
    let s2 = awarded(&s1, &[a, b], later());
    let s2 = settle(&s2, paid(&result_of(&s2, a, running(b"c3")), money("1"))).unwrap();
    assert!(!s2.settled[2].unreplicated);
    let due: Vec<u32> = due_posts(&s2).iter().map(|x| x.segment).collect();
    assert_eq!(due, [0, 1, 2]);
    // The last segment unreplicated: its checkpoint gets a check restore.
    let mut s3 = s2.clone();
    for x in s3.settled.iter_mut() {
        x.posted = true;
    }
    let s3 = unreplicated(&awarded(&s3, &[a], later())).unwrap();
    let s3 = settle(&s3, paid(&result_of(&s3, a, running(b"c4")), money("1"))).unwrap();
    assert!(due_posts(&s3).is_empty());
    assert!(check_due(&s3), "an unchecked last checkpoint is checked");
    // A replicated last segment is not.
    let replicated = awarded(&s2, &[a, b], later());
    let replicated = settle(
        &replicated,
        paid(&result_of(&replicated, b, running(b"c4")), money("1")),
    )
    .unwrap();
    assert!(!check_due(&replicated));
}

#[test]
fn stop_ends_the_job_after_the_segment_running_now() {
    let a = ProviderId::new();
    let running = |tag: &[u8]| GuestState::Running {
        checkpoint: checkpoint(tag),
    };
    let idle = settled_once(unchecked(job(SegmentCount::UntilHalt)));
    // Nothing runs: no further segment.
    let stopped = stop(&idle).unwrap();
    assert_eq!(stopped.stop_after, Some(1));
    assert_eq!(ending(&stopped), Some(Ending::Stopped(1)));
    assert_eq!(stop(&stopped), Ok(stopped.clone()), "a repeat changes nothing");
    assert_eq!(
        offer(&stopped, LotId::new(), Utc::now(), WINDOW, 1),
        Err(Refused::Ends(Ending::Stopped(1)))
    );
    // A segment runs: it settles, then the job ends with its checkpoint.
    let busy = awarded(&idle, &[a], later());
    let stopping = stop(&busy).unwrap();
    assert_eq!((stopping.stop_after, ending(&stopping)), (Some(2), None));
    let ran = settle(
        &stopping,
        paid(&result_of(&stopping, a, running(b"c2")), money("1")),
    )
    .unwrap();
    assert_eq!(ending(&ran), Some(Ending::Stopped(2)));
    assert_eq!(ran.checkpoint, checkpoint(b"c2"));
    // A lot that was taking bids when the job stopped is not awarded.
    let lot = offer(&idle, LotId::new(), Utc::now(), WINDOW, 1).unwrap();
    let bidding = stop(&idle).unwrap();
    assert_eq!(
        award(&bidding, &lot, &[(a, money("1"))], later(), Utc::now()),
        Err(Refused::Ends(Ending::Stopped(1)))
    );
    // Under a continuation check the last checkpoint is checked first.
    let checked = stop(&settled_once(job(SegmentCount::UntilHalt))).unwrap();
    assert!(check_due(&checked) && ending(&checked).is_none());
    assert_eq!(stop(&ended(JobState::Done)), Err(Refused::Final(JobState::Done)));
}

/// `status`'s open attempt settled by `provider` as a partial segment
/// that ran `ran_ms` (its guest saved as checkpoint `name`).
fn settled_partial(status: &JobStatus, provider: ProviderId, ran_ms: u64, name: &[u8]) -> JobStatus {
    let running = GuestState::Running {
        checkpoint: checkpoint(name),
    };
    let payment = SettledSegment {
        partial_ms: Some(ran_ms),
        ..paid(&result_of(status, provider, running), money("0.2"))
    };
    settle(status, payment).unwrap()
}

#[test]
fn a_partial_segment_is_progress_but_not_one_of_the_jobs_segments() {
    let (a, b, c) = (ProviderId::new(), ProviderId::new(), ProviderId::new());
    let mut s = unchecked(job(SegmentCount::Count(1)));
    s.spec.segment_seconds = 30;
    let s = awarded(&s, &[a], later());
    let s = settled_partial(&s, a, 12_000, b"p1");
    // The job goes on from the early checkpoint, with the rest of the segment.
    assert_eq!(s.checkpoint, checkpoint(b"p1"));
    assert_eq!(s.full_segments(), 0);
    assert_eq!(
        ending(&s),
        None,
        "one partial segment is not the job's one segment"
    );
    let lot = offered(&s, Utc::now());
    assert_eq!((lot.segment, lot.attempt, lot.segment_seconds), (1, 1, 18));
    assert_eq!(lot.checkpoint, checkpoint(b"p1"));
    assert_eq!(preempted_by(&s), Some(a));
    // Preempted again: the rest of the rest.
    let s = awarded(&s, &[b], later());
    let s = settled_partial(&s, b, 10_500, b"p2");
    assert_eq!(offered(&s, Utc::now()).segment_seconds, 8);
    assert_eq!(preempted_by(&s), Some(b));
    // A whole segment at last: the count is reached, the next starts afresh.
    let s = awarded(&s, &[c], later());
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let s = settle(&s, paid(&result_of(&s, c, running), money("0.5"))).unwrap();
    assert_eq!((s.full_segments(), s.partial_ms()), (1, 0));
    assert_eq!(preempted_by(&s), None);
    assert_eq!(ending(&s), Some(Ending::SegmentsRan(1)));
    assert_eq!(s.spent, money("0.9"));
    assert_eq!(s.settled.len(), 3);
}

#[test]
fn a_stop_counts_whole_segments_and_a_check_follows_the_last_whole_one() {
    let (a, b) = (ProviderId::new(), ProviderId::new());
    let mut s = job(SegmentCount::Count(3));
    s.spec.segment_seconds = 30;
    let s = awarded(&s, &[a], later());
    let s = settled_partial(&s, a, 5_000, b"p1");
    // Stopped while the rest of segment 1 runs: it ends after that one.
    let s = awarded(&s, &[b], later());
    let s = stop(&s).unwrap();
    assert_eq!(s.stop_after, Some(1));
    let running = GuestState::Running {
        checkpoint: checkpoint(b"c1"),
    };
    let s = settle(&s, paid(&result_of(&s, b, running), money("0.5"))).unwrap();
    assert!(check_due(&s), "the last whole segment's checkpoint is checked");
    let check = offered(&s, Utc::now());
    assert!(check.check);
    assert_eq!(check.segment, 2);
}
