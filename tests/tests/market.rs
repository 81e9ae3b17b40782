//! The market end to end on a real nats-server: broker and providers as
//! real processes, the synthetic driver (a market load stand-in, not a VM).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use rust_decimal::Decimal;
use vmlot_client::api::{Credit, Status};
use vmlot_schemas::caller::Role;
use vmlot_schemas::market::{
    Image, JobRef, JobSpec, JobState, JobStatus, ResultCheck, SegmentCount, SegmentResult, Submitted,
};
use vmlot_schemas::{HypervisorKind, JobId, Money, ProviderId, WIRE_VERSION, subjects};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, payments, wait_for};

fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

async fn synthetic_image(market: &Market) -> Image {
    market.ready(market.providers.len()).await.unwrap();
    market
        .push_synthetic_image("synthetic.seed=market-test")
        .await
        .unwrap()
}

fn spec(image: Image, seconds: u32, segments: u32, r: u32, reserve: &str, budget: &str) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: seconds,
        segments: SegmentCount::Count(segments),
        redundancy: r,
        // Most of these markets have one provider: nobody else could
        // check its checkpoints (results.rs and the ten-segment test do).
        check: ResultCheck::None,
        reserve_price: money(reserve),
        budget: money(budget),
        account: "alice".into(),
    }
}

/// Every result in the results stream, in arrival order.
async fn results_in_order(client: &async_nats::Client) -> Vec<SegmentResult> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(subjects::RESULT_STREAM).await.unwrap();
    let total = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out: Vec<Option<SegmentResult>> = Vec::new();
    while out.len() < total {
        let msg = messages.next().await.unwrap().unwrap();
        // Tests publish garbage here too.
        if let Ok(result) = serde_json::from_slice(&msg.payload) {
            out.push(result);
        } else {
            out.push(None);
        }
    }
    out.into_iter().flatten().collect()
}

fn assert_paid_once_per_segment(payments: &[vmlot_schemas::ledger::Settlement], segments: u32) {
    assert_eq!(
        payments.len() as u32,
        segments,
        "one payment per settled segment: {payments:#?}"
    );
    let distinct: HashSet<u32> = payments.iter().map(|p| p.segment).collect();
    assert_eq!(
        distinct,
        (0..segments).collect(),
        "each segment paid exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_segments_with_two_replicas_pay_the_first_result_each_time() {
    let providers = [
        ProviderSpec::synthetic("p1", "0.10"),
        ProviderSpec::synthetic("p2", "0.11"),
        ProviderSpec::synthetic("p3", "0.12"),
    ];
    let market = Market::start(fast_broker_args(), &providers).unwrap();
    let client = market.server.client().await.unwrap();
    let image = synthetic_image(&market).await;
    let checked = JobSpec {
        check: ResultCheck::Continuation,
        ..spec(image, 1, 10, 2, "1.00", "20")
    };
    let job = market.submit(checked).await;
    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert_eq!(done.settled.len(), 10);
    // The last checkpoint was checked, by another provider than its own.
    let check = done.check.as_ref().expect("a check restore ran");
    assert_eq!(check.segment, 10);
    assert_ne!(check.provider, done.settled[9].provider);

    let paid = market.paid(job).await.1;
    // Ten segments and the check restore, each paid once.
    assert_paid_once_per_segment(&paid, 11);
    // Each payment went to the provider whose result for that lot arrived
    // first (stream order), at its own bid (pay-as-bid).
    let mut first: HashMap<vmlot_schemas::LotId, ProviderId> = HashMap::new();
    for r in results_in_order(&client)
        .await
        .into_iter()
        .filter(|r| r.job == job)
    {
        first.entry(r.lot).or_insert(r.provider);
    }
    let price_of: HashMap<ProviderId, Money> = providers
        .iter()
        .map(|p| (ProviderId(p.id), money(&p.min_price)))
        .collect();
    for p in &paid {
        assert_eq!(
            first.get(&p.lot),
            Some(&p.provider),
            "segment {} paid to a later result",
            p.segment
        );
        // Pay-as-bid: the winner's own price. (Which provider wins is not
        // fixed: a replica still finishing the previous lot has no free slot.)
        assert_eq!(p.amount, price_of[&p.provider]);
    }
    let spent: Decimal = paid.iter().map(|p| p.amount.amount).sum();
    assert_eq!(done.spent.amount, spent);
    assert_posts_ride_with_settlements(&market, job, 10).await;
}

/// Each segment's post (of `segments`; the check restore's aside) was
/// written in the same atomic batch as the settlement that made it due:
/// its transaction sits right after that settlement's postings, or after
/// another post of the same batch, in the ledger stream, and the server
/// kept the same batch id on both.
async fn assert_posts_ride_with_settlements(market: &Market, job: JobId, segments: u32) {
    use vmlot_schemas::ledger::{Transaction, TxKind};
    let api = vmlot_ledger::BooksApi::for_server(market.server.client().await.unwrap()).await;
    let mut txs: Vec<(u64, Transaction)> = Vec::new();
    vmlot_ledger::read::read_all(&api, subjects::ledger_tx_job(&job).to_vec(), None, |stored| {
        txs.push((stored.seq, stored.value.unwrap()));
        true
    })
    .await
    .unwrap();
    let books = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let ledger = books.get_stream(subjects::LEDGER_STREAM).await.unwrap();
    let batch_of = async |seq: u64| {
        let msg = ledger.direct_get(seq).await.unwrap();
        msg.headers.get("Nats-Batch-Id").map(|v| v.to_string())
    };
    let summary = || {
        txs.iter()
            .map(|(seq, tx)| {
                format!(
                    "{seq}: {:?} segment {:?}, {} entries",
                    tx.kind,
                    tx.segment,
                    tx.entries.len()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let posts: Vec<usize> = (0..txs.len())
        .filter(|&i| txs[i].1.kind == TxKind::Post && txs[i].1.segment.is_some_and(|s| s < segments))
        .collect();
    assert_eq!(posts.len(), segments as usize, "{}", summary());
    for i in posts {
        let mut at = i;
        // Back through this batch's posts to its settlement.
        let settlement = loop {
            assert!(at > 0, "the post at {} follows nothing:\n{}", txs[i].0, summary());
            let (seq, tx) = &txs[at - 1];
            assert_eq!(
                seq + tx.entries.len() as u64 + 1,
                txs[at].0,
                "the post at {} does not follow a settlement's postings:\n{}",
                txs[i].0,
                summary()
            );
            match tx.kind {
                TxKind::Settlement => break *seq,
                TxKind::Post => at -= 1,
                other => panic!("a {other:?} in a post's batch:\n{}", summary()),
            }
        };
        let batch = batch_of(txs[i].0).await;
        assert!(batch.is_some(), "the post at {} has no batch id", txs[i].0);
        assert_eq!(
            batch,
            batch_of(settlement).await,
            "the post at {} was written on its own, not with the settlement at {settlement}:\n{}",
            txs[i].0,
            summary()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_mid_segment_costs_one_attempt_not_the_job() {
    let cheap = ProviderSpec::synthetic("cheap", "0.10");
    let cheap_id = ProviderId(cheap.id);
    let providers = [cheap, ProviderSpec::synthetic("backup", "0.20")];
    let mut market = Market::start(fast_broker_args(), &providers).unwrap();
    let image = synthetic_image(&market).await;
    let job = market.submit(spec(image, 3, 5, 1, "1.00", "20")).await;

    // Kill the cheap provider while it runs segment 1.
    wait_for(Duration::from_secs(60), async || {
        let s = market.status(job).await;
        let running = s.settled.len() == 1
            && s.open_lot
                .as_ref()
                .is_some_and(|o| o.awarded.iter().any(|(p, _)| *p == cheap_id));
        running.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", market.logs()));
    market.providers[0].kill();

    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert!(
        done.settled[1].attempt >= 2,
        "segment 1 needed another attempt: {:#?}",
        done.settled[1]
    );
    assert!(done.settled[1..].iter().all(|s| s.provider != cheap_id));
    assert_paid_once_per_segment(&market.paid(job).await.1, 5);
}

/// A 6-segment job that `interrupt` disturbs after its second segment
/// still ends done, pays each segment once, refunds, and its books verify.
async fn six_segments_survive(mut market: Market, interrupt: impl FnOnce(&mut Market)) {
    let image = synthetic_image(&market).await;
    let job = market.submit(spec(image, 1, 6, 1, "1.00", "20")).await;
    wait_for(Duration::from_secs(60), async || {
        (market.status(job).await.settled.len() >= 2).then_some(())
    })
    .await
    .unwrap();
    interrupt(&mut market);
    let done = market.wait_final(job, Duration::from_secs(180)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert_paid_once_per_segment(&market.paid(job).await.1, 6);
    market.assert_books_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_job_resumes_where_it_stood() {
    let market = Market::start(fast_broker_args(), &[ProviderSpec::synthetic("p1", "0.10")]).unwrap();
    six_segments_survive(market, |market| {
        market.broker.kill();
        std::thread::sleep(Duration::from_secs(2));
        market.broker.restart().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_stops_when_its_budget_is_spent() {
    let market = Market::start(fast_broker_args(), &[ProviderSpec::synthetic("p1", "1.00")]).unwrap();
    let image = synthetic_image(&market).await;
    let job = market.submit(spec(image, 0, 10, 1, "1.00", "3.5")).await;
    let done = market.wait_final(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::BudgetSpent, "{done:#?}");
    assert_eq!(done.settled.len(), 3);
    assert_eq!(done.spent, money("3.00"));
    assert_paid_once_per_segment(&market.paid(job).await.1, 3);
    market.assert_books_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_changes_nothing() {
    let provider = ProviderSpec::synthetic("p1", "0.10");
    let provider_id = ProviderId(provider.id);
    let market = Market::start(fast_broker_args(), &[provider]).unwrap();
    let client = market.server.client().await.unwrap();
    let api = market.api().await;
    let image = synthetic_image(&market).await;

    // The job API: garbage, wrong types, bad values, unknown ids, from a
    // submitter with valid credentials.
    let alice = vmlot_schemas::caller::Caller::new(Role::Submitter, "alice");
    let alice_client = market.server.client_as(alice.role, &alice.name).await.unwrap();
    for endpoint in ["submit", "status", "cancel"] {
        for body in [
            &b"\xff\x00garbage"[..],
            b"{}",
            b"[1,2,3]",
            b"{\"version\":1,\"job\":42}",
        ] {
            let reply = alice_client
                .request(subjects::api(&alice, endpoint), body.to_vec().into())
                .await
                .unwrap();
            let value: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(
                value["error"]["code"], "bad-request",
                "{endpoint} {body:?}: {value}"
            );
        }
    }
    let bad_specs = [
        spec(image.clone(), 1, 3, 1, "-1", "10"),
        spec(image.clone(), 1, 3, 1, "1", "0"),
        spec(image.clone(), 1, 3, 0, "1", "10"),
        spec(image.clone(), 1, 3, 99, "1", "10"),
        spec(image.clone(), 1, 3, 1, "1", "100000000000000000000"),
        spec(image.clone(), 1, 0, 1, "1", "10"),
        spec(image.clone(), 1, 3, 1, "5", "1"),
    ];
    for bad in bad_specs {
        let refused: Result<Submitted, _> = market.try_submit(bad).await;
        assert_eq!(refused.unwrap_err().code, "bad-request");
    }
    let mut unknown_image = image.clone();
    unknown_image.kernel =
        vmlot_schemas::ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, b"no such kernel");
    let refused: Result<Submitted, _> = market.try_submit(spec(unknown_image, 1, 3, 1, "1", "10")).await;
    assert_eq!(refused.unwrap_err().code, "not-found");
    let unknown: Result<JobStatus, _> = api
        .answer::<Status>(&JobRef {
            version: WIRE_VERSION,
            job: JobId::new(),
        })
        .await
        .unwrap();
    assert_eq!(unknown.unwrap_err().code, "not-found");
    let listed: Vec<JobStatus> = api.list().await.unwrap();
    assert!(listed.is_empty(), "refused submissions left no job behind");

    // A real job runs while the market subjects are attacked.
    let job = market.submit(spec(image, 1, 4, 1, "1.00", "20")).await;
    let first = wait_for(Duration::from_secs(60), async || {
        let s = market.status(job).await;
        s.open_lot.filter(|o| !o.awarded.is_empty()).map(|o| o.lot)
    })
    .await
    .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let intruder = ProviderId::new();
    // Garbage bids and results, a bid for a lot never offered, a bid with a
    // negative price, a bid forged under another provider's subject.
    client
        .publish(
            subjects::bid(&intruder, subjects::partition_of(&job)),
            "garbage".into(),
        )
        .await
        .unwrap();
    let mut forged_bid = vmlot_schemas::market::Bid {
        version: WIRE_VERSION,
        lot: vmlot_schemas::LotId::new(),
        provider: intruder,
        price: money("0.01"),
        hot_bytes: 0,
        slots: 1,
        sent_at: chrono::Utc::now(),
    };
    client
        .publish(
            subjects::bid(&intruder, subjects::partition_of(&job)),
            serde_json::to_vec(&forged_bid).unwrap().into(),
        )
        .await
        .unwrap();
    forged_bid.lot = first.lot;
    forged_bid.price = money("-5");
    client
        .publish(
            subjects::bid(&intruder, subjects::partition_of(&job)),
            serde_json::to_vec(&forged_bid).unwrap().into(),
        )
        .await
        .unwrap();
    client
        .publish(
            subjects::bid(&provider_id, subjects::partition_of(&job)),
            serde_json::to_vec(&forged_bid).unwrap().into(),
        )
        .await
        .unwrap();
    js.publish(
        subjects::result(&intruder, subjects::partition_of(&job)),
        "garbage".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // A result from a provider that was not awarded, claiming the open lot.
    let fake_result = SegmentResult {
        version: WIRE_VERSION,
        lot: first.lot,
        job,
        segment: first.segment,
        attempt: first.attempt,
        provider: intruder,
        guest: vmlot_schemas::market::GuestState::Halted { final_state: None },
        console: None,
        timings: Default::default(),
        fetched_bytes: 0,
        sent_bytes: 0,
        finished_at: chrono::Utc::now(),
        preempted: false,
    };
    js.publish(
        subjects::result(&intruder, subjects::partition_of(&job)),
        serde_json::to_vec(&fake_result).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // The same, forged on the awarded provider's subject but naming the intruder.
    js.publish(
        subjects::result(&provider_id, subjects::partition_of(&job)),
        serde_json::to_vec(&fake_result).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert!(done.settled.iter().all(|s| s.provider == provider_id));
    let paid = market.paid(job).await.1;
    assert_paid_once_per_segment(&paid, 4);

    // Replaying a settled result (same lot, same provider) pays nothing more.
    let replay = results_in_order(&client)
        .await
        .into_iter()
        .find(|r| r.job == job && r.provider == provider_id)
        .unwrap();
    js.publish(
        subjects::result(&provider_id, subjects::partition_of(&job)),
        serde_json::to_vec(&replay).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(payments(&client, job).await.len(), 4);
    let after = market.status(job).await;
    assert_eq!(after.settled.len(), 4);
    assert_eq!(after.spent, done.spent);
    let log = market.broker.log();
    for expected in [
        "refused malformed bid",
        "refused bid",
        "refused malformed result",
        "refused result",
    ] {
        assert!(
            log.contains(expected),
            "broker log should say {expected:?}:\n{log}"
        );
    }
}

/// A lot is published on its hypervisor's subjects only, and a bid on it
/// from a provider whose heartbeat does not offer that hypervisor is
/// refused even when it finds the lot: a QEMU lot never goes to a
/// synthetic (or Xen) provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lots_go_only_to_providers_of_their_hypervisor() {
    let provider = ProviderSpec::synthetic("s1", "0.10");
    let provider_id = ProviderId(provider.id);
    let market = Market::start(fast_broker_args(), &[provider]).unwrap();
    let client = market.server.client().await.unwrap();
    let mut image = synthetic_image(&market).await;
    image.vm.hypervisor = HypervisorKind::Qemu;
    let mut qemu_lots = client.subscribe("vmlot.lot.qemu.>").await.unwrap();
    let mut synthetic_lots = client.subscribe("vmlot.lot.synthetic.>").await.unwrap();
    let job = market.submit(spec(image, 1, 2, 1, "1.00", "10")).await;

    let lot_msg = tokio::time::timeout(Duration::from_secs(20), qemu_lots.next())
        .await
        .unwrap_or_else(|_| panic!("no QEMU lot on a QEMU subject in 20 s:\n{}", market.logs()))
        .unwrap();
    let lot: vmlot_schemas::market::Lot = serde_json::from_slice(&lot_msg.payload).unwrap();
    assert_eq!(lot.job, job);
    // The synthetic provider heartbeats and is idle, yet bids as if it could.
    let bid = vmlot_schemas::market::Bid {
        version: WIRE_VERSION,
        lot: lot.lot,
        provider: provider_id,
        price: money("0.10"),
        hot_bytes: 0,
        slots: 1,
        sent_at: chrono::Utc::now(),
    };
    client
        .publish(
            subjects::bid(&provider_id, subjects::partition_of(&job)),
            serde_json::to_vec(&bid).unwrap().into(),
        )
        .await
        .unwrap();
    let refused = wait_for(Duration::from_secs(10), async || {
        market
            .broker
            .log()
            .contains("does not offer the lot's hypervisor")
            .then_some(())
    })
    .await;
    assert!(
        refused.is_ok(),
        "the unfit bid was not refused:\n{}",
        market.logs()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = market.status(job).await;
    assert!(s.settled.is_empty(), "{s:#?}");
    assert!(
        s.open_lot.as_ref().is_none_or(|o| o.awarded.is_empty()),
        "a QEMU lot was awarded to a synthetic provider: {s:#?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), synthetic_lots.next())
            .await
            .is_err(),
        "a QEMU lot was published on a synthetic subject"
    );
}

// The books: escrow, settlement, refund, queries and reconciliation.

fn vmlot_json(market: &Market, args: &[&str]) -> serde_json::Value {
    let out = market.vmlot(args);
    assert!(
        out.status.success(),
        "vmlot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("vmlot {args:?}: {e}"))
}

async fn balance(market: &Market, account: &str) -> Decimal {
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    books.balance(&account.parse().unwrap(), "CRD").await.unwrap()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_hold_pay_refund_answer_queries_and_verify() {
    let provider = ProviderSpec::synthetic("p1", "0.50");
    let provider_id = ProviderId(provider.id);
    let mut args = fast_broker_args();
    args.extend(["--fee-rate".to_string(), "0.1".to_string()]);
    let market = Market::start(args, &[provider]).unwrap();
    let client = market.server.client().await.unwrap();
    let api = market.api().await;
    let image = synthetic_image(&market).await;

    // Funding: only the operator, only positive amounts, once per request id.
    let credit = |id: uuid::Uuid, amount: &str| {
        serde_json::json!({
            "version": 1, "id": id, "account": "user:alice",
            "amount": {"amount": amount, "unit": "CRD"}, "memo": "",
        })
    };
    let id = uuid::Uuid::new_v4();
    let refused = market
        .submitter("alice")
        .await
        .answer_body::<Credit>(&credit(id, "10"))
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err().code, "forbidden");
    for bad in ["-10", "0", "1e3", "0.000000001", "99999999999999999"] {
        let refused = api.answer_body::<Credit>(&credit(id, bad)).await.unwrap();
        assert_eq!(refused.unwrap_err().code, "bad-request", "credit of {bad}");
    }
    assert_eq!(balance(&market, "user:alice").await, Decimal::ZERO);
    for _ in 0..2 {
        let out = market.vmlot(&["admin", "credit", "alice", "10", "--id", &id.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(
        balance(&market, "user:alice").await,
        dec("10"),
        "one credit per request id"
    );
    let reused = api.answer_body::<Credit>(&credit(id, "11")).await.unwrap();
    assert_eq!(reused.unwrap_err().code, "conflict");

    // A budget beyond the balance is refused, and leaves no job behind.
    let too_big: Result<Submitted, _> = market
        .try_submit(spec(image.clone(), 1, 3, 1, "1.00", "10.01"))
        .await;
    let refusal = too_big.unwrap_err();
    assert_eq!(refusal.code, "insufficient-funds", "{}", refusal.message);
    let listed: Vec<JobStatus> = api.list().await.unwrap();
    assert!(listed.is_empty(), "{listed:#?}");
    assert_eq!(balance(&market, "user:alice").await, dec("10"));

    // A job: its budget into escrow, each segment paid from it, the rest back.
    let submitted: Submitted = market
        .try_submit(spec(image, 1, 3, 1, "1.00", "4"))
        .await
        .unwrap();
    let job = submitted.job;
    assert_eq!(balance(&market, "user:alice").await, dec("6"));
    let done = market.wait_final(job, Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}");
    let paid = market.paid(job).await.1;
    assert_paid_once_per_segment(&paid, 3);
    let price: Decimal = paid.iter().map(|p| p.amount.amount).sum();
    let fee: Decimal = paid
        .iter()
        .map(|p| vmlot_ledger::split_fee(p.amount.amount, dec("0.1")).1)
        .sum();
    assert!(fee > Decimal::ZERO);
    market.wait_refunded(job).await;
    assert_eq!(balance(&market, "user:alice").await, dec("10") - price);
    assert_eq!(balance(&market, &format!("escrow:{job}")).await, Decimal::ZERO);
    assert_eq!(
        balance(&market, &format!("provider:{provider_id}")).await,
        price - fee
    );
    assert_eq!(balance(&market, "operator").await, fee - dec("10"));
    market.assert_books_verify().await;

    // Queries, as an accountant makes them.
    let rows = vmlot_json(&market, &["--json", "ledger", "--account", "alice"]);
    let kinds: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["credit", "hold", "refund"]);
    let rows = vmlot_json(&market, &["--json", "ledger", "--job", &job.to_string()]);
    // Hold, three settlements into pending (escrow, pending), three posts
    // (pending, provider, fee), refund.
    assert_eq!(rows.as_array().unwrap().len(), 2 + 3 * 2 + 3 * 3 + 2, "{rows:#}");
    // Unchecked (one provider, nobody to restore its checkpoints): each
    // payment is posted as soon as it is settled, before the next segment's
    // settlement; the last one before the refund. (results.rs checks when
    // a payment continued by another provider is posted.)
    let first = |kind: &str, segment: u64| {
        rows.as_array()
            .unwrap()
            .iter()
            .position(|r| r["kind"] == kind && r["segment"] == segment)
            .unwrap_or_else(|| panic!("no {kind} of segment {segment}: {rows:#}"))
    };
    let refund = rows
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["kind"] == "refund")
        .unwrap();
    assert!(first("settlement", 0) < first("post", 0), "{rows:#}");
    assert!(first("post", 0) < first("settlement", 1), "{rows:#}");
    assert!(first("post", 1) < first("settlement", 2), "{rows:#}");
    assert!(first("post", 2) < refund, "{rows:#}");
    let rows = vmlot_json(
        &market,
        &["ledger", "--format", "json", "--kind", "post", "--provider", "p1"],
    );
    assert_eq!(rows.as_array().unwrap().len(), 3);
    let pending = vmlot_json(&market, &["--json", "balance", &format!("pending:{provider_id}")]);
    assert_eq!(
        dec(pending[0]["balance"].as_str().unwrap()),
        Decimal::ZERO,
        "all posted"
    );
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let rows = vmlot_json(&market, &["--json", "ledger", "--since", &tomorrow]);
    assert_eq!(rows.as_array().unwrap().len(), 0);
    let rows = vmlot_json(&market, &["--json", "ledger", "--until", &tomorrow, "--totals"]);
    assert_eq!(rows["rows"].as_array().unwrap().len(), 2 + 2 + 3 * 2 + 3 * 3 + 2);
    let csv = market.vmlot(&["ledger", "--format", "csv", "--account", "operator"]);
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert_eq!(csv.lines().count(), 1 + 1 + 3, "{csv}");
    assert!(csv.starts_with("at,tx,kind,account,unit,debit,credit,balance,job,segment\n"));
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let statements = vmlot_json(&market, &["--json", "statement", "alice", "--period", &month]);
    let s = &statements[0];
    assert_eq!(s["opening"], "0");
    assert_eq!(dec(s["closing"].as_str().unwrap()), dec("10") - price);
    assert_eq!(s["entries"].as_array().unwrap().len(), 3);
    let balances = vmlot_json(&market, &["--json", "balance", "alice"]);
    assert_eq!(dec(balances[0]["balance"].as_str().unwrap()), dec("10") - price);

    // The same settlement written again, even naming another provider, is
    // the first one: no second record, no second payment.
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    let mut again = paid[1].clone();
    again.provider = ProviderId::new();
    again.at = chrono::Utc::now();
    let writes = (0..4).map(|_| books.settle(again.clone()));
    for recorded in futures::future::join_all(writes).await {
        match recorded.unwrap() {
            vmlot_ledger::Recorded::Before(tx) => {
                assert_eq!(tx.settlement.unwrap().provider, provider_id)
            }
            vmlot_ledger::Recorded::Now(_) => panic!("a segment was paid twice"),
        }
    }
    assert_eq!(payments(&client, job).await.len(), 3);
    market.assert_books_verify().await;

    // A forged payment for a segment the job never settled is named.
    let mut forged = paid[2].clone();
    forged.segment = 3;
    books.settle(forged.clone()).await.unwrap_err(); // the escrow is empty
    let subject = subjects::settlement_tx(&job, 3, forged.attempt);
    let mut tx = books
        .transaction(&subjects::settlement_tx(&job, 2, forged.attempt))
        .await
        .unwrap()
        .unwrap();
    tx.segment = Some(3);
    tx.id = vmlot_ledger::tx_id(&subject);
    tx.settlement.as_mut().unwrap().segment = 3;
    js.publish(subject.clone(), serde_json::to_vec(&tx).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let out = market.vmlot(&["ledger", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains(&subject), "{text}");
    assert!(text.contains("never settled"), "{text}");
    assert!(text.contains("has no posting"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_a_broker_killed_between_recording_and_paying_a_segment_pays_it_once() {
    let mut market = Market::start(fast_broker_args(), &[ProviderSpec::synthetic("p1", "0.10")]).unwrap();
    // The broker dies right after recording the first settled segment in
    // the job, before its payment is on the books.
    market.broker.set_env("VMLOT_FAULT", Some("crash-before-payment"));
    market.broker.restart().unwrap();
    let image = synthetic_image(&market).await;
    let job = market.submit(spec(image, 1, 4, 1, "1.00", "20")).await;
    wait_for(Duration::from_secs(60), async || {
        market_broker_exited(&mut market).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: the fault never fired\n{}", market.logs()));
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    assert!(
        books.settlement(job, 0, 1).await.unwrap().is_none(),
        "the payment was not written"
    );
    let recorded = vmlot_tests::market::job_record(&market.server.books_client().await.unwrap(), job)
        .await
        .unwrap();
    assert_eq!(
        recorded.settled.iter().map(|s| s.segment).collect::<Vec<_>>(),
        vec![0],
        "the job record holds the settled segment: {recorded:#?}"
    );

    market.broker.set_env("VMLOT_FAULT", None);
    market.broker.restart().unwrap();
    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert_paid_once_per_segment(&market.paid(job).await.1, 4);
    market.assert_paid_once(done.job).await;
    market.assert_books_verify().await;
}

fn market_broker_exited(market: &mut Market) -> bool {
    market.broker.exited()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn books_verify_after_a_nats_restart_mid_job() {
    let market = Market::start(fast_broker_args(), &[ProviderSpec::synthetic("p1", "0.10")]).unwrap();
    six_segments_survive(market, |market| market.server.restart().unwrap()).await;
}
