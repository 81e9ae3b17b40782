//! The owner comes first (issue 15 step 3), as the broker sees it: a
//! provider whose machine's owner needs the machine back saves the guest
//! early and says so; the broker takes that checkpoint as progress, pays
//! it by its `--partial-pay` setting for the time it ran by the broker's
//! clock, and offers the rest of the segment to another provider.
//!
//! Here a stranger with its own valid credentials abuses it: it "runs" a
//! second and claims an hour. The provider side (a CPU hog beside a real
//! QEMU guest) is `market_qemu.rs`'s.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use vmlot_schemas::market::{JobSpec, JobState, ResultCheck, SegmentCount};
use vmlot_schemas::{Money, ProviderId};
use vmlot_tests::cheat::{Cheat, Lie, PREEMPTED_CLAIM_MS};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, payments};

fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

/// Runs a 2-segment job of 4 s segments whose first segment the stranger
/// takes and "preempts", on a broker paying partial segments by `pay`;
/// checks what every setting must show and returns the stranger's
/// settlement amount and the milliseconds it was paid for.
async fn preempted_by_a_stranger(pay: &str) -> (Decimal, u64) {
    let honest: Vec<ProviderSpec> = ["honest-a", "honest-b"]
        .iter()
        .map(|name| ProviderSpec::synthetic(name, "0.10"))
        .collect();
    let honest_ids: Vec<ProviderId> = honest.iter().map(|p| ProviderId(p.id)).collect();
    let args = [fast_broker_args(), vec!["--partial-pay".into(), pay.into()]].concat();
    let market = Market::start(args, &honest).unwrap();
    market.ready(2).await.unwrap();
    let cheat = Cheat::start(&market.server).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=preempt synthetic.state_kib=64")
        .await
        .unwrap();
    let spec = JobSpec {
        image,
        segment_seconds: 4,
        segments: SegmentCount::Count(2),
        redundancy: 1,
        check: ResultCheck::Continuation,
        reserve_price: money("1"),
        budget: money("10"),
        account: "alice".into(),
    };
    let job = market.submit(spec).await;
    cheat.target_at(job, Lie::Preempted, 0);

    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(
        done.state,
        JobState::Done,
        "{:?}\n{}",
        done.end_reason,
        market.logs()
    );
    let done = market.wait_refunded(job).await;
    assert_eq!(cheat.told(), vec![(job, Lie::Preempted)]);

    // The stranger's partial segment is progress, not one of the job's
    // two segments: the rest of segment 1 and segment 2 ran on honest
    // providers, then the check restore.
    assert_eq!(done.full_segments(), 2, "{done:#?}");
    assert_eq!(done.settled.len(), 3, "{done:#?}");
    let partial = &done.settled[0];
    assert_eq!(partial.provider, cheat.id);
    let paid_ms = partial.partial_ms.expect("settled as a partial segment");
    // Paid for the wall clock since its award, not the hour it claimed.
    assert!(
        paid_ms < 4_000,
        "claimed {PREEMPTED_CLAIM_MS} ms, paid for {paid_ms}"
    );
    assert!(
        done.settled[1..]
            .iter()
            .all(|s| honest_ids.contains(&s.provider) && s.partial_ms.is_none()),
        "{done:#?}"
    );
    assert!(done.refused.is_empty(), "a partial segment is no cheat by itself");
    assert!(done.payments().all(|s| s.posted));

    // The books hold the partial's settlement at the job's price for it,
    // and verify.
    let client = market.server.client().await.unwrap();
    let settlements = payments(&client, job).await;
    let theirs: Vec<_> = settlements.iter().filter(|p| p.provider == cheat.id).collect();
    assert_eq!(theirs.len(), 1, "{settlements:#?}");
    assert_eq!(theirs[0].partial_ms, Some(paid_ms));
    assert_eq!(theirs[0].amount, partial.price);
    let api = vmlot_ledger::BooksApi::for_server(client.clone()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    let account = format!("provider:{}", cheat.id).parse().unwrap();
    assert_eq!(
        books.balance(&account, "CRD").await.unwrap(),
        theirs[0].amount.amount
    );
    (theirs[0].amount.amount, paid_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_segment_is_paid_pro_rata_for_the_wall_clock_not_the_claim() {
    let (amount, ms) = preempted_by_a_stranger("pro-rata").await;
    // The stranger's bid is 0.01 for the 4 s lot.
    let share = Decimal::from_str("0.01").unwrap() * Decimal::from(ms) / Decimal::from(4_000);
    assert_eq!(
        amount,
        share
            .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::ToZero)
            .normalize()
    );
    assert!(amount > Decimal::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_pays_no_partial_segments_pays_the_stranger_nothing() {
    let (amount, _) = preempted_by_a_stranger("none").await;
    assert_eq!(amount, Decimal::ZERO);
}
