//! Hostile input with every role's own valid credentials: each role's user
//! publishes, on every subject its grants let it publish on, garbage and
//! mutations of a well-formed message (fields removed, nulled, negative,
//! huge, of the wrong type), while a real job runs. Nothing crashes, the
//! job settles with the honest provider, nobody's money moves but the
//! job's, and the books verify.

use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::market::{Image, JobSpec, JobState, SegmentCount};
use vmlot_schemas::{Money, ProviderId, WIRE_VERSION, subjects};
use vmlot_tests::market::{Market, ProviderSpec, fast_broker_args};

fn money(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

fn spec(image: Image, segments: u32) -> JobSpec {
    JobSpec {
        image,
        segment_seconds: 1,
        segments: SegmentCount::Count(segments),
        redundancy: 1,
        // One honest provider: nobody else could check its checkpoints.
        check: vmlot_schemas::market::ResultCheck::None,
        reserve_price: money("1"),
        budget: money("5"),
        account: "alice".into(),
    }
}

const HEX: &str = "00112233445566778899aabbccddeeff00112233";
const ENDPOINTS: [&str; 7] = [
    "submit",
    "status",
    "list",
    "cancel",
    "providers",
    "market",
    "credit",
];

/// Every concrete subject `role`'s user may publish on: its grants with
/// the template filled in and each wildcard made concrete.
fn subjects_of(role: Role, name: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for pattern in vmlot_identity::grants(role).publish {
        let s = pattern
            .replace(vmlot_identity::grants::NAME, name)
            .replace(vmlot_identity::grants::KEY, key);
        if s.starts_with("vmlot.api.") && s.ends_with(".>") {
            let base = s.trim_end_matches(".>");
            out.extend(ENDPOINTS.iter().map(|e| format!("{base}.{e}")));
        } else if s.starts_with("vmlot.bid.") || s.starts_with("vmlot.result.") {
            // The last token is a partition: one the broker listens on.
            out.push(s.replace('*', "0"));
        } else {
            out.push(s.replace(".>", &format!(".{HEX}")).replace('*', HEX));
        }
    }
    out
}

/// A well-formed message of the kind `subject` carries, for mutating.
fn sample(subject: &str, provider: ProviderId) -> Value {
    let now = chrono::Utc::now();
    let job_ref = json!({"version": WIRE_VERSION, "job": uuid::Uuid::new_v4()});
    if subject.starts_with("vmlot.bid.") {
        json!({"version": WIRE_VERSION, "lot": uuid::Uuid::new_v4(), "provider": provider,
               "price": {"amount": "0.01", "unit": "CRD"}, "hot_bytes": 0, "slots": 1, "sent_at": now})
    } else if subject.starts_with("vmlot.heartbeat.") {
        json!({"version": WIRE_VERSION, "provider": provider, "name": "eve", "hypervisors": ["synthetic"],
               "arch": "x86_64", "memory_mib": 1024, "slots": 1, "free_slots": 1, "idle": true, "sent_at": now})
    } else if subject.starts_with("vmlot.result.") {
        json!({"version": WIRE_VERSION, "lot": uuid::Uuid::new_v4(), "job": uuid::Uuid::new_v4(),
               "segment": 0, "attempt": 1, "provider": provider, "guest": "halted", "console": null,
               "timings": {}, "fetched_bytes": 0, "sent_bytes": 0, "finished_at": now})
    } else if subject.ends_with(".submit") {
        json!({"version": WIRE_VERSION, "spec": {
            "image": {"vm": {"hypervisor": "synthetic", "arch": "x86_64", "memory_mib": 16, "vcpus": 1, "cmdline": ""},
                      "kernel": HEX, "initrd": null, "disks": []},
            "segment_seconds": 1, "segments": {"count": 2}, "redundancy": 1,
            "reserve_price": {"amount": "1", "unit": "CRD"}, "budget": {"amount": "5", "unit": "CRD"}}})
    } else if subject.ends_with(".credit") {
        // Negative: whatever else a mutation changes, it mints nothing.
        json!({"version": WIRE_VERSION, "id": uuid::Uuid::new_v4(), "account": "user:alice",
               "amount": {"amount": "-1", "unit": "CRD"}, "memo": ""})
    } else if subject.starts_with("$JS.API.DIRECT.GET.") || subject.starts_with(subjects::BOOKS_API) {
        json!({"seq": 1, "batch": 10})
    } else {
        job_ref
    }
}

/// Garbage, then `sample` with each top-level field removed, nulled,
/// negative, huge, a long string, and of the wrong shape.
fn payloads(sample: &Value) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = vec![
        vec![],
        b"\xff\x00garbage".to_vec(),
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"{\"version\":99}".to_vec(),
        vec![b'{'; 64 * 1024],
        serde_json::to_vec(sample).unwrap()[..serde_json::to_vec(sample).unwrap().len() / 2].to_vec(),
    ];
    let Value::Object(fields) = sample else {
        return out;
    };
    for key in fields.keys() {
        let mut removed = fields.clone();
        removed.remove(key);
        out.push(serde_json::to_vec(&removed).unwrap());
        for replacement in [
            Value::Null,
            json!(-1),
            json!(1e300),
            json!("99999999999999999999999999999999"),
            json!("x".repeat(10_000)),
            json!([[[[[]]]]]),
            json!({"a": {"b": {"c": null}}}),
        ] {
            let mut changed = fields.clone();
            changed.insert(key.clone(), replacement);
            out.push(serde_json::to_vec(&changed).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_sends_garbage_and_mutations_on_every_subject_it_may_publish_on() {
    let honest = ProviderSpec::synthetic("honest", "0.10");
    let honest_id = ProviderId(honest.id);
    let market = Market::start(fast_broker_args(), &[honest]).unwrap();
    market.ready(1).await.unwrap();
    let image = market
        .push_synthetic_image("synthetic.seed=hostile")
        .await
        .unwrap();
    // A real job runs through the attack (the harness funds its budget).
    let job = market.submit(spec(image, 6)).await;

    let eve = ProviderId::new();
    let attackers = [
        (Role::Provider, eve.to_string()),
        (Role::Submitter, "mallory".to_string()),
        (Role::Operator, "rogue".to_string()),
        (Role::Accountant, "audit".to_string()),
    ];
    let mut sent = 0;
    for (role, name) in &attackers {
        let creds = vmlot_identity::Creds::load(&market.server.creds(*role, name).unwrap()).unwrap();
        let nats = market.server.client_as(*role, name).await.unwrap();
        for subject in subjects_of(*role, name, &creds.public_key) {
            for payload in payloads(&sample(&subject, eve)) {
                // A reply into the attacker's own inbox, so that request
                // endpoints answer (and the answers are dropped).
                let inbox = nats.new_inbox();
                nats.publish_with_reply(subject.clone(), inbox, payload.into())
                    .await
                    .unwrap();
                sent += 1;
            }
        }
        nats.flush().await.unwrap();
    }
    assert!(sent > 1000, "only {sent} messages sent");

    // The market carried on: the job ran to its end on the honest
    // provider, and nobody else's money moved.
    let done = market.wait_final(job, Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", market.logs());
    assert!(done.settled.iter().all(|s| s.provider == honest_id), "{done:#?}");
    let books = async_nats::jetstream::new(market.server.books_client().await.unwrap());
    let books = vmlot_ledger::Books::open(&books).await.unwrap();
    for account in [
        "user:mallory",
        "user:rogue",
        "user:audit",
        &format!("provider:{eve}"),
    ] {
        assert_eq!(
            books.balance(&account.parse().unwrap(), "CRD").await.unwrap(),
            Decimal::ZERO,
            "{account}"
        );
    }
    let alice = vmlot_tests::market::wait_for(Duration::from_secs(30), async || {
        let s = market.status(job).await;
        s.refunded.then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(
        books
            .balance(&"user:alice".parse().unwrap(), "CRD")
            .await
            .unwrap(),
        Decimal::from(5) - alice.spent.amount,
    );
    let listed = market
        .api_as(&Caller::new(Role::Submitter, "mallory"))
        .await
        .list()
        .await;
    assert!(
        listed.as_ref().map_or(true, |l| l.is_empty()),
        "mallory has jobs: {listed:?}"
    );
    let api = vmlot_ledger::BooksApi::for_server(market.server.client().await.unwrap()).await;
    let report = vmlot_ledger::verify::verify(&api).await.unwrap();
    assert!(report.ok(), "{:#?}\n{}", report.problems, market.logs());
}
