//! A provider's standing and money at stake (issue 14, step 4): adaptive
//! replication leaves a trusted provider's quorum attempts unreplicated
//! at random, paid only once another provider continued from them; a
//! broker that asks for deposits awards no lot to a provider without one,
//! and a provider proven to have cheated (a minority state) forfeits part
//! of its deposit to the submitter. Each provider moves only its own
//! deposit, only from what it has, and a refused request changes nothing.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use vmlot_schemas::api::{Deposit, DepositRequest, Deposited, Endpoint, Release};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::ledger::{Account, CreditRequest, ForfeitCause, TxKind};
use vmlot_schemas::market::{JobSpec, JobState, ResultCheck, SegmentCount};
use vmlot_schemas::{JobId, Money, ProviderId, WIRE_VERSION, subjects};
use vmlot_tests::cheat::{Cheat, Lie};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, wait_for};

fn crd(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

fn quorum_spec(image: vmlot_schemas::market::Image, segments: u32) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 1,
        segments: SegmentCount::Count(segments),
        redundancy: 2,
        check: ResultCheck::Quorum,
        reserve_price: crd("1"),
        budget: crd("20"),
        account: "alice".into(),
    }
}

fn honest(names: &[&str]) -> Vec<ProviderSpec> {
    names
        .iter()
        .map(|name| ProviderSpec {
            slots: 2,
            ..ProviderSpec::synthetic(name, "0.10")
        })
        .collect()
}

async fn books(market: &Market) -> vmlot_ledger::Books {
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    vmlot_ledger::Books::open(&js).await.unwrap()
}

async fn balance(market: &Market, account: Account) -> Decimal {
    books(market).await.balance(&account, "CRD").await.unwrap()
}

async fn assert_books_verify(market: &Market) {
    let api = vmlot_ledger::BooksApi::for_server(market.server.client().await.unwrap()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}\n{}", report.problems, market.logs());
}

/// The operator credits provider `id` `amount` CRD (its buy-in).
async fn credit_provider(market: &Market, id: ProviderId, amount: &str) {
    let request = CreditRequest {
        version: WIRE_VERSION,
        id: uuid::Uuid::new_v4(),
        account: Account::Provider(id),
        amount: crd(amount),
        memo: "buy-in".into(),
    };
    market.api().await.credit(&request).await.unwrap();
}

fn provider(id: ProviderId) -> Caller {
    Caller::new(Role::Provider, id.to_string())
}

fn request(amount: &str) -> DepositRequest {
    DepositRequest {
        version: WIRE_VERSION,
        id: uuid::Uuid::new_v4(),
        amount: crd(amount),
    }
}

async fn done(market: &Market, job: JobId) -> vmlot_schemas::market::JobStatus {
    let status = market.wait_final(job, Duration::from_secs(240)).await;
    assert_eq!(
        status.state,
        JobState::Done,
        "{:?}\n{}",
        status.end_reason,
        market.logs()
    );
    market.wait_refunded(job).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_providers_quorum_attempts_go_unreplicated_at_random_and_wait_for_a_continuation() {
    // Trusted after 2 agreements in a row, then replicated with
    // probability 2 / run: over 12 segments, that no attempt goes
    // unreplicated has a chance below one in a million.
    let args = [fast_broker_args(), vec!["--trust-after".into(), "2".into()]].concat();
    let specs = honest(&["honest-a", "honest-b"]);
    let ids: Vec<ProviderId> = specs.iter().map(|p| ProviderId(p.id)).collect();
    let market = Market::start(args, &specs).unwrap();
    market.ready(2).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=adaptive synthetic.state_kib=64")
        .await
        .unwrap();
    let job = market.submit(quorum_spec(image, 12)).await;
    let done = done(&market, job).await;

    // The first attempts are always replicated: nobody has a run yet.
    let settled = &done.settled;
    assert_eq!(settled.len(), 12);
    assert!(
        settled[..2]
            .iter()
            .all(|s| !s.unreplicated && s.awarded.len() >= 2),
        "{settled:#?}"
    );
    let alone: Vec<u32> = settled
        .iter()
        .filter(|s| s.unreplicated)
        .map(|s| s.segment)
        .collect();
    assert!(!alone.is_empty(), "no attempt went unreplicated: {settled:#?}");
    for s in settled.iter().filter(|s| s.unreplicated) {
        assert_eq!(s.awarded, vec![s.provider], "one provider, told nothing");
    }
    assert!(done.payments().all(|s| s.posted));
    // Agreements are what the run counts (two per replicated segment),
    // and nobody was refused.
    let replicated = settled.iter().filter(|s| !s.unreplicated).count() as u64;
    let api = market.api().await;
    let standing = wait_for(Duration::from_secs(10), async || {
        let standing = api.standing().await.ok()?;
        let ours: Vec<_> = standing
            .into_iter()
            .filter(|s| ids.contains(&s.provider))
            .collect();
        (ours.iter().map(|s| s.agreed).sum::<u64>() == 2 * replicated).then_some(ours)
    })
    .await
    .expect("two agreements counted per replicated segment");
    for s in &standing {
        assert_eq!((s.refused_total(), s.streak), (0, s.agreed), "{s:#?}");
    }
    // An unreplicated last segment gets a check restore from the other provider.
    if settled.last().is_some_and(|s| s.unreplicated) {
        let check = done.check.as_ref().expect("the last checkpoint was checked");
        assert_ne!(check.provider, settled.last().unwrap().provider);
    }
    assert_books_verify(&market).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_a_deposit_wins_nothing_and_a_minority_forfeits_to_the_submitter() {
    let args = [
        fast_broker_args(),
        ["--min-deposit", "1 CRD", "--forfeit", "0.4", "--trust-after", "0"]
            .map(String::from)
            .to_vec(),
    ]
    .concat();
    let specs = honest(&["honest-a", "honest-b"]);
    let ids: Vec<ProviderId> = specs.iter().map(|p| ProviderId(p.id)).collect();
    let market = Market::start(args, &specs).unwrap();
    market.ready(2).await.unwrap();
    let cheat = Cheat::start(&market.server).await.unwrap();
    for id in &ids {
        assert_eq!(market.stake(*id, "1.5").await.unwrap(), crd("1.5").amount);
    }
    let image = market
        .push_synthetic_image("synthetic.seed=deposit synthetic.state_kib=64")
        .await
        .unwrap();

    // The cheat bids lowest on every lot, but holds no deposit: it is
    // awarded nothing, and the job runs on the honest providers.
    let first = market.submit(quorum_spec(image.clone(), 2)).await;
    cheat.target(first, Lie::Forged);
    let first = done(&market, first).await;
    assert!(
        first.settled.iter().all(|s| !s.awarded.contains(&cheat.id)),
        "{first:#?}"
    );
    assert!(cheat.told().is_empty(), "{:?}", cheat.told());

    // With a deposit it wins, lies, is the minority, and forfeits.
    market.stake(cheat.id, "1.5").await.unwrap();
    let job = market.submit(quorum_spec(image, 3)).await;
    cheat.target(job, Lie::Forged);
    let done = done(&market, job).await;
    assert!(cheat.told().contains(&(job, Lie::Forged)), "{:?}", cheat.told());
    assert_eq!(done.refused, vec![cheat.id]);
    let lied = done
        .settled
        .iter()
        .find(|s| s.awarded.contains(&cheat.id))
        .expect("the cheat was awarded a segment");
    let forfeit = books(&market)
        .await
        .transaction(&subjects::forfeit_tx(&job, lied.segment, lied.attempt, &cheat.id))
        .await
        .unwrap()
        .expect("the forfeit is on the books");
    let detail = forfeit.forfeit.as_deref().expect("its details");
    assert_eq!(
        (detail.cause, &detail.payer, &detail.amount),
        (ForfeitCause::Minority, &"alice".to_string(), &crd("0.4"))
    );
    assert_eq!(
        balance(&market, Account::Deposit(cheat.id)).await,
        crd("1.1").amount
    );
    for id in &ids {
        assert_eq!(balance(&market, Account::Deposit(*id)).await, crd("1.5").amount);
    }
    assert_books_verify(&market).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_moves_only_its_own_deposit_and_only_what_it_has() {
    let args = [
        fast_broker_args(),
        ["--min-deposit", "1 CRD"].map(String::from).to_vec(),
    ]
    .concat();
    let market = Market::start(args, &[]).unwrap();
    market.ready(0).await.unwrap();
    let (mallory, victim) = (ProviderId::new(), ProviderId::new());
    credit_provider(&market, mallory, "1").await;
    credit_provider(&market, victim, "1").await;
    market.stake(victim, "2").await.unwrap();
    let unchanged = async || {
        assert_eq!(balance(&market, Account::Deposit(victim)).await, crd("2").amount);
        assert_eq!(balance(&market, Account::Provider(victim)).await, crd("1").amount);
        assert_eq!(balance(&market, Account::Deposit(mallory)).await, Decimal::ZERO);
        assert_eq!(
            balance(&market, Account::Provider(mallory)).await,
            crd("1").amount
        );
    };
    unchanged().await;
    let api = market.api_as(&provider(mallory)).await;

    // More than it has, a bad amount, and a release of a deposit it does
    // not hold: refused by the broker, by name.
    let refused = |answer: vmlot_client::api::Answer<Deposited>| answer.unwrap_err().code;
    let over = api.answer::<Deposit>(&request("5")).await.unwrap();
    assert_eq!(refused(over), "insufficient-funds");
    for bad in ["0", "-1"] {
        let answer = api.answer::<Deposit>(&request(bad)).await.unwrap();
        assert_eq!(refused(answer), "bad-request", "{bad}");
    }
    let too_many_places = serde_json::json!({
        "version": WIRE_VERSION, "id": uuid::Uuid::new_v4(),
        "amount": {"amount": "0.000000001", "unit": "CRD"},
    });
    let answer = api.answer_body::<Deposit>(&too_many_places).await.unwrap();
    assert_eq!(refused(answer), "bad-request");
    let answer = api.answer::<Release>(&request("1")).await.unwrap();
    assert_eq!(refused(answer), "insufficient-funds");
    unchanged().await;

    // A request id used once moves money once; reused for another amount
    // it is refused.
    let once = request("0.25");
    let first = api.call::<Deposit>(&once).await.unwrap();
    let again = api.call::<Deposit>(&once).await.unwrap();
    assert_eq!((first.tx.kind, &first.tx), (TxKind::Deposit, &again.tx));
    assert_eq!(again.deposit.amount, crd("0.25").amount);
    let reused = DepositRequest {
        amount: crd("0.5"),
        ..once.clone()
    };
    assert_eq!(refused(api.answer::<Deposit>(&reused).await.unwrap()), "conflict");
    let back = DepositRequest {
        id: uuid::Uuid::new_v4(),
        ..once
    };
    let released = api.call::<Release>(&back).await.unwrap();
    assert_eq!(
        (released.deposit.amount, released.earnings.amount),
        (Decimal::ZERO, crd("1").amount)
    );
    unchanged().await;

    // The victim's deposit is the victim's: mallory cannot send on its
    // subject (the server refuses), and submitters call neither endpoint.
    let as_victim = subjects::api(&provider(victim), Release::NAME);
    let body = serde_json::to_vec(&request("2")).unwrap();
    let sneaked = tokio::time::timeout(
        Duration::from_secs(2),
        api.nats().request(as_victim.clone(), body.into()),
    )
    .await;
    assert!(
        !matches!(sneaked, Ok(Ok(_))),
        "mallory reached the victim's subject"
    );
    let alice = market.submitter("alice").await;
    let answer = alice.answer::<Release>(&request("1")).await.unwrap();
    assert_eq!(refused(answer), "forbidden");
    unchanged().await;
    assert_books_verify(&market).await;
}
