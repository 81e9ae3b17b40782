//! Results you can check (issue 14): a provider with its own valid
//! credentials that runs nothing, bids lowest and answers its awards with
//! lies (the image's kernel or its input as the new state, a halt at once
//! with nothing to show, a state for another machine, a result before the
//! segment could have run) is refused every time and never paid; the jobs
//! finish on honest providers exactly as a job the cheat never touched;
//! its standing shows each refusal by name; the books verify. A state that
//! passes every check but does not restore is paid only into pending, and
//! voided when two providers cannot restore it: the segment runs again.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use vmlot_schemas::ledger::{Account, ForfeitCause};
use vmlot_schemas::market::{JobSpec, JobState, JobStatus, ResultCheck, SegmentCount};
use vmlot_schemas::standing::RefusalKind;
use vmlot_schemas::{Money, ProviderId};
use vmlot_tests::cheat::{Cheat, Lie};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args};

fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

/// Two honest synthetic providers with `slots` each, a cheat with its own
/// credentials, and the spec of a 3-segment job of `segment_seconds` on
/// an image seeded `seed`; the broker runs with `extra` flags.
async fn market_with_a_cheat(
    slots: u32,
    seed: &str,
    segment_seconds: u32,
    extra: &[&str],
) -> (Market, Vec<ProviderId>, Cheat, JobSpec) {
    let honest: Vec<ProviderSpec> = ["honest-a", "honest-b"]
        .iter()
        .map(|name| ProviderSpec {
            slots,
            ..ProviderSpec::synthetic(name, "0.10")
        })
        .collect();
    let honest_ids: Vec<ProviderId> = honest.iter().map(|p| ProviderId(p.id)).collect();
    let args = [fast_broker_args(), extra.iter().map(|s| s.to_string()).collect()].concat();
    let market = Market::start(args, &honest).unwrap();
    market.ready(2).await.unwrap();
    let cheat = Cheat::start(&market.server).await.unwrap();
    let image = market
        .push_synthetic_image(&format!("synthetic.seed={seed} synthetic.state_kib=64"))
        .await
        .unwrap();
    let spec = JobSpec {
        image,
        segment_seconds,
        segments: SegmentCount::Count(3),
        redundancy: 1,
        check: vmlot_schemas::market::ResultCheck::Continuation,
        reserve_price: money("1"),
        budget: money("10"),
        account: "alice".into(),
    };
    (market, honest_ids, cheat, spec)
}

/// Waits for `job` to end, done, and its last payment to be posted (the
/// last payment is posted when the job has ended, before its refund).
async fn done_and_refunded(market: &Market, job: vmlot_schemas::JobId, limit: Duration) -> JobStatus {
    let done = market.wait_final(job, limit).await;
    assert_eq!(
        done.state,
        JobState::Done,
        "{:?}\n{}",
        done.end_reason,
        market.logs()
    );
    market.wait_refunded(job).await
}

/// The cheat's standing shows exactly `refused`, the honest providers'
/// no refusal; once `control` is refunded the books verify and the cheat
/// holds nothing, pending or posted. Every standing.
async fn assert_refused_and_books_verify(
    market: &Market,
    honest_ids: &[ProviderId],
    cheat: &Cheat,
    refused: BTreeMap<RefusalKind, u64>,
    control: vmlot_schemas::JobId,
) -> Vec<vmlot_schemas::standing::Standing> {
    let standing = market.api().await.standing().await.unwrap();
    let of = |p: &ProviderId| standing.iter().find(|s| s.provider == *p).cloned();
    let cheat_standing = of(&cheat.id).expect("the cheat has a standing");
    assert_eq!(cheat_standing.refused, refused, "{cheat_standing:#?}");
    assert!(honest_ids.iter().filter_map(of).all(|s| s.refused_total() == 0));
    market.wait_refunded(control).await;
    let api = vmlot_ledger::BooksApi::for_server(market.server.client().await.unwrap()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    for kind in ["provider", "pending"] {
        let account = format!("{kind}:{}", cheat.id).parse().unwrap();
        assert_eq!(
            books.balance(&account, "CRD").await.unwrap(),
            Decimal::ZERO,
            "{kind}"
        );
    }
    standing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_does_not_run_its_segments_is_never_paid() {
    let (market, honest_ids, cheat, spec) = market_with_a_cheat(3, "checkable", 3, &[]).await;

    // A job the cheat leaves alone: what every job should come to.
    let control = market.submit(spec.clone()).await;
    let lies = [
        Lie::KernelAsState,
        Lie::InputUnchanged,
        Lie::HaltedAtOnce,
        Lie::OtherMemorySize,
        Lie::TooEarly,
        Lie::BeforeTheReply,
    ];
    let mut cheated = Vec::new();
    for lie in lies {
        let job = market.submit(spec.clone()).await;
        cheat.target(job, lie);
        cheated.push((job, lie));
    }

    let limit = Duration::from_secs(180);
    let reference = market.wait_final(control, limit).await;
    assert_eq!(reference.state, JobState::Done, "{}", market.logs());
    for (job, lie) in &cheated {
        market.wait_final(*job, limit).await;
        let done = market.wait_refunded(*job).await;
        assert_eq!(
            done.state,
            JobState::Done,
            "{lie:?}: {:?}\n{}",
            done.end_reason,
            market.logs()
        );
        assert!(
            cheat.told().contains(&(*job, *lie)),
            "the cheat never got to tell {lie:?} on job {job}: {:?}",
            cheat.told()
        );
        // Refused and kept off the job; every segment settled by the honest.
        assert_eq!(done.refused, vec![cheat.id], "{lie:?}");
        assert_eq!(done.settled.len(), 3);
        assert!(
            done.settled.iter().all(|s| honest_ids.contains(&s.provider)),
            "{lie:?}"
        );
        // The job came to what the untouched one came to: same consoles,
        // same final state (the synthetic guest is deterministic).
        let consoles =
            |s: &vmlot_schemas::market::JobStatus| s.settled.iter().map(|x| x.console).collect::<Vec<_>>();
        assert_eq!(consoles(&done), consoles(&reference), "{lie:?}");
        assert_eq!(done.checkpoint, reference.checkpoint, "{lie:?}");
        // Never paid.
        let paid = market.paid(*job).await.1;
        assert_eq!(paid.len(), 4, "three segments and the check restore");
        assert!(paid.iter().all(|p| p.provider != cheat.id), "{lie:?}: {paid:#?}");
    }

    // The cheat's standing names every refusal; the honest have none.
    let refused = BTreeMap::from([
        (RefusalKind::Unchanged, 2),
        (RefusalKind::NoFinalState, 1),
        (RefusalKind::WrongKind, 1),
        (RefusalKind::TooEarly, 2),
    ]);
    let standing = assert_refused_and_books_verify(&market, &honest_ids, &cheat, refused, control).await;
    let valid = |p: &ProviderId| standing.iter().find(|s| s.provider == *p).map_or(0, |s| s.valid);
    assert_eq!(valid(&cheat.id), 0);
    let honest_valid: u64 = honest_ids.iter().map(valid).sum();
    assert_eq!(honest_valid, 7 * 4, "{standing:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_does_not_restore_is_voided_and_its_segment_runs_again() {
    // Everyone stakes a deposit of 1.5; each proven cheat forfeits 0.3 of
    // it to the submitter.
    let deposits = ["--min-deposit", "1 CRD", "--forfeit", "0.3"];
    let (market, honest_ids, cheat, spec) = market_with_a_cheat(2, "voided", 2, &deposits).await;
    for id in honest_ids.iter().chain([&cheat.id]) {
        market.stake(*id, "1.5").await.unwrap();
    }
    let control = market.submit(spec.clone()).await;
    // Caught by the next segment's providers; and, on the last segment,
    // by the check restore's.
    let first = market.submit(spec.clone()).await;
    cheat.target(first, Lie::Unrestorable);
    let last = market.submit(spec).await;
    cheat.target_at(last, Lie::Unrestorable, 2);

    let limit = Duration::from_secs(240);
    let reference = market.wait_final(control, limit).await;
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    for job in [first, last] {
        let done = done_and_refunded(&market, job, limit).await;
        assert!(
            cheat.told().contains(&(job, Lie::Unrestorable)),
            "{:?}",
            cheat.told()
        );
        // Every segment settled by the honest, from the same states as the
        // untouched job; the cheat is off the job; the last checkpoint was
        // checked by another honest provider than its own.
        assert!(
            done.settled.iter().all(|s| honest_ids.contains(&s.provider)),
            "{done:#?}"
        );
        let check = done.check.as_ref().expect("checked");
        assert!(honest_ids.contains(&check.provider) && check.provider != done.settled[2].provider);
        let consoles =
            |s: &vmlot_schemas::market::JobStatus| s.settled.iter().map(|x| x.console).collect::<Vec<_>>();
        assert_eq!(consoles(&done), consoles(&reference));
        assert_eq!(done.checkpoint, reference.checkpoint);
        assert_eq!(done.refused, vec![cheat.id]);
        assert!(done.payments().all(|s| s.posted));

        // The cheat's settlement was written, into pending, and voided: the
        // segment was paid again. Three segments, the check, the void.
        let paid = market.paid(job).await.1;
        assert_eq!(paid.len(), 5, "{paid:#?}");
        let voided: Vec<_> = paid.iter().filter(|p| p.provider == cheat.id).collect();
        assert_eq!(voided.len(), 1, "{paid:#?}");
        let void = books
            .transaction(&vmlot_schemas::subjects::resolve_tx(
                &job,
                voided[0].segment,
                voided[0].attempt,
            ))
            .await
            .unwrap()
            .expect("the cheat's payment was resolved");
        assert_eq!(void.kind, vmlot_schemas::ledger::TxKind::Void, "{void:#?}");
        // And the cheat's deposit paid the submitter for it.
        let forfeit = books
            .transaction(&vmlot_schemas::subjects::forfeit_tx(
                &job,
                voided[0].segment,
                voided[0].attempt,
                &cheat.id,
            ))
            .await
            .unwrap()
            .expect("the cheat forfeited part of its deposit");
        let detail = forfeit.forfeit.as_deref().expect("its details");
        assert_eq!(
            (detail.cause, detail.payer.as_str(), &detail.amount),
            (ForfeitCause::Unrestorable, "alice", &money("0.3"))
        );
        // Each honest payment for a segment was posted only once another
        // provider had restored a checkpoint descending from it (by the
        // books: a voided continuation counts, its provider said it
        // restored); the check's own payment with the job's end.
        let segments = done.settled.len() as u32;
        for p in paid
            .iter()
            .filter(|p| p.provider != cheat.id && p.segment < segments)
        {
            let post = books
                .transaction(&vmlot_schemas::subjects::resolve_tx(&job, p.segment, p.attempt))
                .await
                .unwrap()
                .expect("posted");
            assert_eq!(post.kind, vmlot_schemas::ledger::TxKind::Post);
            let continued = paid
                .iter()
                .filter(|later| later.segment > p.segment && later.provider != p.provider)
                .map(|later| later.at)
                .min()
                .expect("another provider continued every segment");
            assert!(
                post.at >= continued,
                "segment {} posted before it was continued",
                p.segment
            );
        }
    }
    let refused = BTreeMap::from([(RefusalKind::Unrestorable, 2)]);
    assert_refused_and_books_verify(&market, &honest_ids, &cheat, refused, control).await;
    let deposit = |id: ProviderId| {
        let books = &books;
        async move { books.balance(&Account::Deposit(id), "CRD").await.unwrap() }
    };
    assert_eq!(deposit(cheat.id).await, money("0.9").amount, "two forfeits");
    for id in &honest_ids {
        assert_eq!(deposit(*id).await, money("1.5").amount);
    }
}

/// Under a quorum check (r = 2, deterministic synthetic states), each
/// segment settles on two replicas that agree. A provider whose state
/// passes every check and restores, but is not what the segment computes,
/// disagrees with its honest partner: a third replica breaks the tie, the
/// forger is the minority, refused and paid nothing, and the job ends as
/// one it never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_quorum_a_forged_state_is_the_minority_and_unpaid() {
    let (market, honest_ids, cheat, spec) = market_with_a_cheat(3, "quorum", 2, &[]).await;
    let spec = JobSpec {
        redundancy: 2,
        check: ResultCheck::Quorum,
        ..spec
    };
    let control = market.submit(spec.clone()).await;
    let job = market.submit(spec).await;
    cheat.target(job, Lie::Forged);

    let limit = Duration::from_secs(180);
    let reference = market.wait_final(control, limit).await;
    assert_eq!(reference.state, JobState::Done, "{}", market.logs());
    let done = done_and_refunded(&market, job, limit).await;
    assert!(cheat.told().contains(&(job, Lie::Forged)), "{:?}", cheat.told());
    assert!(done.check.is_none(), "a quorum needs no check restore");

    // Every segment settled by an honest replica another one agreed with;
    // the one the forger ran needed a third replica.
    assert!(
        done.settled.iter().all(|s| honest_ids.contains(&s.provider)),
        "{done:#?}"
    );
    assert!(done.settled.iter().all(|s| s.awarded.len() >= 2), "{done:#?}");
    let forged = done
        .settled
        .iter()
        .find(|s| s.awarded.contains(&cheat.id))
        .expect("the forger was awarded a segment");
    assert_eq!(forged.awarded.len(), 3, "a tie-breaker: {forged:#?}");
    assert_eq!(done.refused, vec![cheat.id]);
    let consoles =
        |s: &vmlot_schemas::market::JobStatus| s.settled.iter().map(|x| x.console).collect::<Vec<_>>();
    assert_eq!(consoles(&done), consoles(&reference));
    assert_eq!(done.checkpoint, reference.checkpoint);
    assert!(done.payments().all(|s| s.posted));

    // One payment per segment, none to the forger, nothing pending.
    let paid = market.paid(job).await.1;
    assert_eq!(paid.len(), 3, "{paid:#?}");
    assert!(paid.iter().all(|p| p.provider != cheat.id), "{paid:#?}");
    let refused = BTreeMap::from([(RefusalKind::Minority, 1)]);
    let standing = assert_refused_and_books_verify(&market, &honest_ids, &cheat, refused, control).await;
    let cheat_valid = standing
        .iter()
        .find(|s| s.provider == cheat.id)
        .map_or(0, |s| s.valid);
    assert_eq!(cheat_valid, 0);
}
