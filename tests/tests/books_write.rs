//! The books' writer (`vmlot_ledger::Books`) under a burst, against a real
//! nats-server: writes that wait for one handle go out together (group
//! commit), one account's transactions chained inside one atomic batch;
//! a hold the balance no longer covers is refused while the others of its
//! group are written; a retry finds what was written; two handles (two
//! brokers) racing for one account never spend its balance twice.

use std::collections::HashSet;
use std::str::FromStr;

use async_nats::jetstream;
use rust_decimal::Decimal;
use vmlot_ledger::{Books, LedgerError, Recorded};
use vmlot_schemas::ledger::Account;
use vmlot_schemas::{JobId, Money, subjects};
use vmlot_tests::NatsServer;

fn crd(s: &str) -> Money {
    Money::new(Decimal::from_str(s).unwrap(), "CRD")
}

/// `jobs` holds of 1 CRD each from `alice`, all at once through `books`:
/// the answers, in the order of `jobs`.
async fn hold_all(books: &Books, jobs: &[JobId]) -> Vec<Result<Recorded, LedgerError>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, &job) in jobs.iter().enumerate() {
        let books = books.clone();
        tasks.spawn(async move { (i, books.hold(job, "alice", &crd("1")).await) });
    }
    let mut answers: Vec<Option<Result<Recorded, LedgerError>>> = jobs.iter().map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, answer) = done.unwrap();
        answers[i] = Some(answer);
    }
    answers.into_iter().map(Option::unwrap).collect()
}

/// A server with the books provisioned, and `alice` credited `credit`.
async fn books_with_alice(credit: &str) -> (NatsServer, jetstream::Context, Books) {
    let server = NatsServer::start().unwrap();
    let js = jetstream::new(server.books_client().await.unwrap());
    let books = Books::provision(&js, 1).await.unwrap();
    let alice = Account::User("alice".into());
    books
        .credit(uuid::Uuid::new_v4(), &alice, &crd(credit), "test")
        .await
        .unwrap();
    (server, js, books)
}

async fn alice(books: &Books) -> Decimal {
    books
        .balance(&Account::User("alice".into()), "CRD")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_holds_goes_out_in_a_few_batches_and_spends_the_balance_once() {
    let (_server, js, books) = books_with_alice("150").await;
    let ledger = js.get_stream(subjects::LEDGER_STREAM).await.unwrap();

    let jobs: Vec<JobId> = (0..200).map(|_| JobId::new()).collect();
    let answers = hold_all(&books, &jobs).await;
    let mut held = Vec::new();
    for (job, answer) in jobs.iter().zip(&answers) {
        match answer {
            Ok(Recorded::Now(_)) => held.push(*job),
            Err(LedgerError::InsufficientFunds { account, .. }) => {
                assert_eq!(*account, Account::User("alice".into()));
            }
            other => panic!("hold of {job}: {other:?}"),
        }
    }
    assert_eq!(held.len(), 150, "exactly what the credit covers is held");
    assert_eq!(alice(&books).await, Decimal::ZERO);
    let mut batches = HashSet::new();
    for job in &jobs {
        let escrow = books.balance(&Account::Escrow(*job), "CRD").await.unwrap();
        if held.contains(job) {
            assert_eq!(escrow, Decimal::ONE, "job {job}'s escrow");
            let tx = ledger
                .direct_get_last_for_subject(subjects::hold_tx(job))
                .await
                .unwrap();
            let batch = tx.headers.get("Nats-Batch-Id").map(|v| v.to_string());
            batches.insert(batch.expect("every hold is written in an atomic batch"));
        } else {
            assert_eq!(escrow, Decimal::ZERO, "a refused hold moves nothing");
            assert!(
                books
                    .transaction(&subjects::hold_tx(job))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
    // One at a time, each hold would be a batch of its own (150).
    assert!(
        batches.len() <= 30,
        "150 holds waiting together went out in {} batches",
        batches.len()
    );

    // A retry of the whole burst writes nothing and finds each hold.
    let last = ledger.get_info().await.unwrap().state.last_sequence;
    let again = hold_all(&books, &held).await;
    for answer in again {
        assert!(matches!(answer, Ok(Recorded::Before(_))), "{answer:?}");
    }
    assert_eq!(ledger.get_info().await.unwrap().state.last_sequence, last);
    assert_eq!(alice(&books).await, Decimal::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_racing_for_one_account_spend_it_once() {
    let (server, _js, first) = books_with_alice("60").await;
    // A second connection and handle: another broker's writer.
    let second = Books::open(&jetstream::new(server.books_client().await.unwrap()))
        .await
        .unwrap();
    let jobs: Vec<JobId> = (0..80).map(|_| JobId::new()).collect();
    let (a, b) = tokio::join!(hold_all(&first, &jobs[..40]), hold_all(&second, &jobs[40..]));
    let written = a
        .iter()
        .chain(&b)
        .filter(|answer| match answer {
            Ok(Recorded::Now(_)) => true,
            Err(LedgerError::InsufficientFunds { .. }) => false,
            other => panic!("{other:?}"),
        })
        .count();
    assert_eq!(written, 60);
    assert_eq!(alice(&first).await, Decimal::ZERO);
    let mut escrows = Decimal::ZERO;
    for job in &jobs {
        escrows += first.balance(&Account::Escrow(*job), "CRD").await.unwrap();
    }
    assert_eq!(escrows, Decimal::from(60));
}
