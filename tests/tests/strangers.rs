//! A market among strangers: each test acts as an attacker, either with no
//! credentials or with its own valid ones (a registered but malicious
//! submitter or provider), tries what the issue lists (mint money, spend
//! another's, rewrite the books and job records, impersonate a provider,
//! read sealed bids), and checks that the server or the broker refused it
//! and that nothing changed: balances, job records, streams, and the books
//! still verify.

use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt;
use rust_decimal::Decimal;
use vmlot_client::api::{Cancel, Credit, Status, Stop, Submit};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::market::{Image, JobRef, JobSpec, SegmentCount, SubmitJob};
use vmlot_schemas::{Money, ProviderId, WIRE_VERSION, subjects};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args, wait_for};

fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

fn spec(image: Image, account: &str, segments: u32, budget: &str) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 1,
        segments: SegmentCount::Count(segments),
        redundancy: 1,
        // One honest provider: nobody else could check its checkpoints.
        check: vmlot_schemas::market::ResultCheck::None,
        reserve_price: money("1"),
        budget: money(budget),
        account: account.into(),
    }
}

async fn balance(market: &Market, account: &str) -> Decimal {
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&js).await.unwrap();
    books.balance(&account.parse().unwrap(), "CRD").await.unwrap()
}

/// Messages in `stream` of the books' account (the house's view).
async fn messages_in(market: &Market, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn assert_books_verify(market: &Market) {
    let api = vmlot_ledger::BooksApi::for_server(market.server.client().await.unwrap()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}\n{}", report.problems, market.logs());
}

/// Waits until the server has logged a permission violation naming
/// `subject`: the refusal was the server's, not a message lost.
async fn refused_by_server(market: &Market, what: &str, subject: &str) {
    let seen = wait_for(Duration::from_secs(5), async || {
        let log = market.server.log();
        log.lines()
            .any(|l| l.contains(what) && l.contains("Violation") && l.contains(subject))
            .then_some(())
    })
    .await;
    assert!(
        seen.is_ok(),
        "the server logged no {what} violation on {subject}:\n{}",
        market.server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_nobody_connects() {
    let market = Market::start(fast_broker_args(), &[]).unwrap();
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(market.server.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous client connected");

    // TLS is on: valid credentials without the deployment's CA do not
    // connect (the server's certificate is not one the client trusts), and
    // with it the connection is encrypted.
    let creds = market.server.creds(Role::Submitter, "alice").unwrap();
    let untrusting = vmlot_identity::Access {
        creds: Some(creds.clone()),
        ..Default::default()
    };
    let plain = untrusting
        .options()
        .unwrap()
        .0
        .connection_timeout(Duration::from_secs(3))
        .connect(market.server.url())
        .await;
    assert!(plain.is_err(), "connected without trusting the deployment's CA");
    let trusting = vmlot_identity::Access {
        creds: Some(creds),
        tls_ca: Some(market.server.tls_ca()),
        ..Default::default()
    };
    let client = trusting
        .options()
        .unwrap()
        .0
        .connect(market.server.url())
        .await
        .unwrap();
    assert!(
        client.server_info().tls_required,
        "the server does not require TLS"
    );

    // Credentials from another deployment (another operator's keys) are
    // not this market's.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = vmlot_identity::Deployment::create(&elsewhere.path().join("d")).unwrap();
    let forged = other.add(Role::Operator, "house").unwrap();
    let access = vmlot_identity::Access {
        creds: Some(forged),
        ..Default::default()
    };
    let stranger = access
        .options()
        .unwrap()
        .0
        .connection_timeout(Duration::from_secs(3))
        .connect(market.server.url())
        .await;
    assert!(stranger.is_err(), "a foreign operator's user connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_cannot_mint_spend_anothers_or_touch_the_books() {
    let provider = ProviderSpec::synthetic("p1", "0.10");
    let market = Market::start(fast_broker_args(), &[provider]).unwrap();
    market.ready(1).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=strangers")
        .await
        .unwrap();
    market.fund("alice", "20").await.unwrap();
    let job = market.submit(spec(image.clone(), "alice", 3, "5")).await;
    market.wait_final(job, Duration::from_secs(60)).await;
    // The escrow's refund follows the end: the snapshot is taken after it.
    let done = wait_for(Duration::from_secs(30), async || {
        let status = market.status(job).await;
        status.refunded.then_some(status)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: job {job} never refunded\n{}", market.logs()));
    let alice_after_job = balance(&market, "user:alice").await;
    let record_before =
        vmlot_tests::market::read_job_record(&market.server.books_client().await.unwrap(), job)
            .await
            .unwrap();
    let ledger_before = messages_in(&market, subjects::LEDGER_STREAM).await;

    let mallory = Caller::new(Role::Submitter, "mallory");
    let api = market.api_as(&mallory).await;
    let nats = api.nats().clone();

    // Mint: the credit endpoint answers only an operator.
    let credit = serde_json::json!({
        "version": WIRE_VERSION, "id": uuid::Uuid::new_v4(), "account": "user:mallory",
        "amount": {"amount": "1000000", "unit": "CRD"}, "memo": "",
    });
    let refused = api.answer_body::<Credit>(&credit).await.unwrap().unwrap_err();
    assert_eq!(refused.code, "forbidden", "{refused:?}");
    // Nor can mallory send as the operator: the subject is fenced to its name.
    let as_operator = subjects::api(&Caller::new(Role::Operator, "house"), "credit");
    let sneaked = tokio::time::timeout(
        Duration::from_secs(2),
        nats.request(as_operator.clone(), serde_json::to_vec(&credit).unwrap().into()),
    )
    .await;
    assert!(
        !matches!(sneaked, Ok(Ok(_))),
        "a submitter's request reached the operator's subject"
    );
    refused_by_server(&market, "Publish", &as_operator).await;

    // Spend another's: a job naming alice's account is refused.
    let theirs = api
        .answer::<Submit>(&SubmitJob {
            version: WIRE_VERSION,
            spec: spec(image, "alice", 1, "5"),
        })
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(theirs.code, "forbidden", "{theirs:?}");

    // Another's job: not shown, not listed, not cancelled.
    let job_ref = JobRef {
        version: WIRE_VERSION,
        job,
    };
    let unseen = api.answer::<Status>(&job_ref).await.unwrap().unwrap_err();
    assert_eq!(unseen.code, "not-found");
    let uncancelled = api.answer::<Cancel>(&job_ref).await.unwrap().unwrap_err();
    assert_eq!(uncancelled.code, "not-found");
    let unstopped = api.answer::<Stop>(&job_ref).await.unwrap().unwrap_err();
    assert_eq!(unstopped.code, "not-found");
    assert!(api.list().await.unwrap().is_empty(), "mallory listed alice's job");

    // Rewrite the books and the job record, delete the streams: the server
    // refuses every publish outside mallory's grants.
    let posting = subjects::posting(&"user:mallory".parse().unwrap(), "CRD");
    let forged = serde_json::json!({"balance": "1000000"});
    nats.publish(posting.clone(), serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap();
    let record_subject = format!("$KV.{}.{job}", subjects::JOB_BUCKET);
    nats.publish(record_subject.clone(), b"{}".to_vec().into())
        .await
        .unwrap();
    let delete = format!("$JS.API.STREAM.DELETE.{}", subjects::LEDGER_STREAM);
    let deleted = tokio::time::timeout(Duration::from_secs(2), nats.request(delete.clone(), "".into())).await;
    assert!(!matches!(deleted, Ok(Ok(_))), "the stream API answered mallory");
    nats.flush().await.unwrap();
    refused_by_server(&market, "Publish", &posting).await;
    refused_by_server(&market, "Publish", &record_subject).await;
    refused_by_server(&market, "Publish", &delete).await;
    // Nor can mallory take the lease of alice's job's partition, or poke
    // the broker holding it: the lease still names the broker.
    let partition = subjects::partition_of(&job);
    let lease = format!("$KV.{}.partition.{partition}", subjects::LEASE_BUCKET);
    let poke = subjects::broker_poke(partition);
    for subject in [&lease, &poke] {
        nats.publish(subject.clone(), b"mallory".to_vec().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    refused_by_server(&market, "Publish", &lease).await;
    refused_by_server(&market, "Publish", &poke).await;
    let books = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let holder = books
        .get_key_value(subjects::LEASE_BUCKET)
        .await
        .unwrap()
        .get(format!("partition.{partition}"))
        .await
        .unwrap()
        .expect("the broker holds the job's partition");
    assert_ne!(&holder[..], b"mallory", "mallory took the lease");

    // Sealed bids: mallory cannot listen to bids or awards.
    let bids = nats.subscribe(subjects::ALL_BIDS).await.unwrap();
    nats.flush().await.unwrap();
    refused_by_server(&market, "Subscription", subjects::ALL_BIDS).await;
    drop(bids);

    // Nothing changed.
    assert_eq!(balance(&market, "user:mallory").await, Decimal::ZERO);
    assert_eq!(balance(&market, "user:alice").await, alice_after_job);
    assert_eq!(messages_in(&market, subjects::LEDGER_STREAM).await, ledger_before);
    let record_after =
        vmlot_tests::market::read_job_record(&market.server.books_client().await.unwrap(), job)
            .await
            .unwrap();
    assert_eq!(record_after, record_before, "the job record changed");
    assert_eq!(market.status(job).await, done);
    assert_books_verify(&market).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_cannot_impersonate_another_or_read_its_bids() {
    let honest = ProviderSpec::synthetic("honest", "0.10");
    let honest_id = ProviderId(honest.id);
    let market = Market::start(fast_broker_args(), &[honest]).unwrap();
    market.ready(1).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=impostor")
        .await
        .unwrap();

    // Eve is a registered provider, with her own valid credentials.
    let eve = ProviderId::new();
    let nats = market
        .server
        .client_as(Role::Provider, &eve.to_string())
        .await
        .unwrap();
    // Listening for everyone's bids and the honest provider's awards.
    let mut bids = nats.subscribe(subjects::ALL_BIDS).await.unwrap();
    let mut awards = nats.subscribe(subjects::award(&honest_id)).await.unwrap();
    nats.flush().await.unwrap();
    refused_by_server(&market, "Subscription", subjects::ALL_BIDS).await;
    refused_by_server(&market, "Subscription", &subjects::award(&honest_id)).await;

    // Heartbeats, bids and results in the honest provider's name; a forged
    // award to it.
    let ghost = ProviderId::new();
    for subject in [
        subjects::heartbeat(&ghost),
        subjects::heartbeat(&honest_id),
        subjects::bid(&honest_id, 0),
        subjects::result(&honest_id, 0),
        subjects::award(&honest_id),
        // Its own standing, made spotless.
        subjects::standing_entry(&eve),
    ] {
        nats.publish(subject.clone(), b"{}".to_vec().into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        refused_by_server(&market, "Publish", &subject).await;
    }
    // The same through the server's own hand: eve stores a heartbeat in
    // the ghost's name as a "block" (anyone may write one under their own
    // name) and asks for it
    // back with the ghost's heartbeat subject as the reply subject, so the
    // server itself publishes it there. The answer carries the stream's
    // headers, and the broker refuses any market message that does.
    let forged = vmlot_schemas::market::Heartbeat {
        version: WIRE_VERSION,
        provider: ghost,
        name: "ghost".into(),
        hypervisors: vec![],
        arch: "x86_64".into(),
        memory_mib: 1024,
        slots: 1,
        free_slots: 1,
        idle: true,
        sent_at: chrono::Utc::now(),
    };
    let parked = format!("vmlot.cas.block.{}.provider.{eve}", "0".repeat(40));
    nats.request(parked.clone(), serde_json::to_vec(&forged).unwrap().into())
        .await
        .unwrap();
    let get = format!("$JS.API.DIRECT.GET.{}", subjects::BLOCK_STREAM);
    let body = serde_json::json!({ "last_by_subj": parked });
    nats.publish_with_reply(
        get,
        subjects::heartbeat(&ghost),
        serde_json::to_vec(&body).unwrap().into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    let reflected = wait_for(Duration::from_secs(3), async || {
        market
            .logs()
            .contains("refused a message the server echoed")
            .then_some(())
    })
    .await;
    assert!(
        reflected.is_ok(),
        "no refusal of the echoed heartbeat:\n{}",
        market.logs()
    );
    let listed = market.api().await.providers().await.unwrap();
    assert!(
        listed.iter().all(|h| h.provider != ghost),
        "a heartbeat in another's name was believed: {listed:#?}"
    );

    // A real job runs meanwhile; eve sees none of its bids or awards.
    market.fund("alice", "10").await.unwrap();
    let job = market.submit(spec(image, "alice", 2, "5")).await;
    let done = market.wait_final(job, Duration::from_secs(60)).await;
    assert!(done.settled.iter().all(|s| s.provider == honest_id), "{done:#?}");
    let peek = async {
        tokio::select! {
            b = bids.next() => b.is_some(),
            a = awards.next() => a.is_some(),
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(500), peek)
            .await
            .is_err(),
        "eve read a bid or an award"
    );

    // Her own results subject is hers to publish on, but the results
    // stream is bounded: a result over 1 MiB is refused by the server and
    // nothing is stored.
    let house = async_nats::jetstream::new(market.server.client().await.unwrap());
    let results = async || {
        let mut stream = house.get_stream(subjects::RESULT_STREAM).await.unwrap();
        stream.info().await.unwrap().state.messages
    };
    let before = results().await;
    let js = async_nats::jetstream::new(nats.clone());
    let huge = vec![b'x'; (1 << 20) + 1];
    let stored = js
        .publish(subjects::result(&eve, 0), huge.into())
        .await
        .unwrap()
        .await;
    assert!(stored.is_err(), "a result over 1 MiB was stored: {stored:?}");
    assert_eq!(results().await, before);
    assert_books_verify(&market).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accountant_reads_the_books_and_cannot_write_them() {
    let provider = ProviderSpec::synthetic("p1", "0.10");
    let market = Market::start(fast_broker_args(), &[provider]).unwrap();
    market.ready(1).await.unwrap();
    market.fund("alice", "7").await.unwrap();
    let ledger_before = messages_in(&market, subjects::LEDGER_STREAM).await;

    // The accountant reads the books through the books' account's export.
    let nats = market.server.client_as(Role::Accountant, "audit").await.unwrap();
    let books = vmlot_ledger::BooksApi::for_server(nats.clone()).await;
    let balances = vmlot_ledger::read::balances(&books, &"user:alice".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(balances.get("CRD"), Some(&Decimal::from(7)), "{balances:?}");

    // Mint or spend: the API refuses an accountant.
    let api = market.api_as(&Caller::new(Role::Accountant, "audit")).await;
    let credit = serde_json::json!({
        "version": WIRE_VERSION, "id": uuid::Uuid::new_v4(), "account": "user:audit",
        "amount": {"amount": "1000", "unit": "CRD"}, "memo": "",
    });
    let refused = api.answer_body::<Credit>(&credit).await.unwrap().unwrap_err();
    assert_eq!(refused.code, "forbidden", "{refused:?}");

    // A consumer on the books (its creator would choose where the server
    // delivers) is not in any participant's grants.
    let create = format!(
        "{}.CONSUMER.CREATE.{}",
        subjects::BOOKS_API,
        subjects::LEDGER_STREAM
    );
    let push = serde_json::json!({
        "stream_name": subjects::LEDGER_STREAM,
        "config": {"deliver_subject": subjects::posting(&"user:audit".parse().unwrap(), "CRD")},
    });
    nats.publish(create.clone(), serde_json::to_vec(&push).unwrap().into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    refused_by_server(&market, "Publish", &create).await;

    // A direct get answered onto the ledger's subjects, the job records'
    // and the stream API: the answer lands in the market account, where
    // none of them is.
    let get = format!("{}.DIRECT.GET.{}", subjects::BOOKS_API, subjects::LEDGER_STREAM);
    for aim in [
        subjects::posting(&"user:audit".parse().unwrap(), "CRD"),
        format!("$KV.{}.x", subjects::JOB_BUCKET),
        format!("$JS.API.STREAM.DELETE.{}", subjects::LEDGER_STREAM),
        format!("$JS.API.STREAM.DELETE.{}", subjects::BLOCK_STREAM),
    ] {
        nats.publish_with_reply(get.clone(), aim, b"{\"seq\":1}".to_vec().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();

    // A submitter may not read the books at all.
    let bob = market.server.client_as(Role::Submitter, "bob").await.unwrap();
    bob.publish(get.clone(), b"{\"seq\":1}".to_vec().into())
        .await
        .unwrap();
    bob.flush().await.unwrap();
    refused_by_server(&market, "Publish", &get).await;

    // Nothing changed: the books, the block store, alice's balance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages_in(&market, subjects::LEDGER_STREAM).await, ledger_before);
    assert_eq!(balance(&market, "user:alice").await, Decimal::from(7));
    assert_eq!(balance(&market, "user:audit").await, Decimal::ZERO);
    let store = async_nats::jetstream::new(market.server.client().await.unwrap());
    assert!(
        store.get_stream(subjects::BLOCK_STREAM).await.is_ok(),
        "the block store was deleted"
    );
    assert_books_verify(&market).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_is_held_to_its_quotas_and_its_request_rate() {
    let mut args = fast_broker_args();
    for (flag, value) in [
        ("--max-jobs-in-flight", "2"),
        ("--max-redundancy", "1"),
        ("--max-memory-mib", "64"),
        ("--max-requests-per-second", "5"),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    let market = Market::start(args, &[ProviderSpec::synthetic("p1", "0.10")]).unwrap();
    market.ready(1).await.unwrap();
    let image = market.push_synthetic_image("synthetic.seed=quota").await.unwrap();
    market.fund("alice", "100").await.unwrap();
    let alice = market.api_as(&Caller::new(Role::Submitter, "alice")).await;
    let submit = |spec: JobSpec| {
        let alice = alice.clone();
        async move {
            alice
                .answer::<Submit>(&SubmitJob {
                    version: WIRE_VERSION,
                    spec,
                })
                .await
                .unwrap()
        }
    };
    // Two long jobs fill alice's quota of jobs in flight; a third is
    // refused, and holds nothing.
    let first = submit(spec(image.clone(), "alice", 500, "10")).await.unwrap().job;
    let second = submit(spec(image.clone(), "alice", 500, "10")).await.unwrap().job;
    let third = submit(spec(image.clone(), "alice", 1, "10")).await.unwrap_err();
    assert_eq!(third.code, "quota-exceeded", "{third:?}");
    assert_eq!(balance(&market, "user:alice").await, Decimal::from(80));
    // Per-job limits: redundancy and memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut redundant = spec(image.clone(), "alice", 1, "10");
    redundant.redundancy = 2;
    let mut big = spec(image.clone(), "alice", 1, "10");
    big.image.vm.memory_mib = 65;
    for over in [redundant, big] {
        let refused = submit(over).await.unwrap_err();
        assert_eq!(refused.code, "quota-exceeded", "{refused:?}");
    }

    // Mallory floods the API: past its rate it is refused, and alice is
    // still answered.
    let mallory = market.api_as(&Caller::new(Role::Submitter, "mallory")).await;
    let flood = futures::future::join_all((0..40).map(|_| mallory.list())).await;
    let limited = flood
        .iter()
        .filter(|r| matches!(r, Err(vmlot_client::CallError::Refused(e)) if e.code == "rate-limited"))
        .count();
    assert!(
        limited >= 20,
        "only {limited} of 40 requests refused as over the rate"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = alice.list().await.unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Ending a job gives its slot back.
    let cancelled = alice
        .answer::<Cancel>(&JobRef {
            version: WIRE_VERSION,
            job: first,
        })
        .await
        .unwrap();
    assert!(cancelled.is_ok(), "{cancelled:?}");
    market.wait_final(first, Duration::from_secs(30)).await;
    let again = wait_for(Duration::from_secs(10), async || {
        submit(spec(image.clone(), "alice", 1, "10")).await.ok()
    })
    .await;
    assert!(
        again.is_ok(),
        "a slot freed by a cancelled job was not given back"
    );
    let _ = alice
        .answer::<Cancel>(&JobRef {
            version: WIRE_VERSION,
            job: second,
        })
        .await;
    market.wait_final(second, Duration::from_secs(30)).await;
    assert_books_verify(&market).await;
}
