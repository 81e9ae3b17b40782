//! The books' types on their own: accounts, kinds and transactions as
//! written, and what makes a transaction malformed.

use super::*;

#[test]
fn accounts_round_trip_through_their_written_form() {
    for text in [
        "operator".to_string(),
        "user:alice-2_b".to_string(),
        format!("provider:{}", ProviderId::new()),
        format!("pending:{}", ProviderId::new()),
        format!("deposit:{}", ProviderId::new()),
        format!("escrow:{}", JobId::new()),
    ] {
        let account: Account = text.parse().unwrap();
        assert_eq!(account.to_string(), text);
        let json = serde_json::to_string(&account).unwrap();
        assert_eq!(serde_json::from_str::<Account>(&json).unwrap(), account);
    }
    for bad in [
        "",
        "user:",
        "user:a.b",
        "user:a b",
        "user:*",
        "provider:x",
        "deposit:",
        "deposit:x",
        "bank:1",
        "Operator",
    ] {
        assert!(bad.parse::<Account>().is_err(), "{bad:?} accepted");
    }
    assert!(!valid_user_name(&"a".repeat(65)));
}

#[test]
fn only_the_operator_may_go_negative() {
    let p = ProviderId::new();
    assert!(Account::Operator.may_go_negative());
    for account in [
        Account::User("alice".into()),
        Account::Provider(p),
        Account::Pending(p),
        Account::Deposit(p),
        Account::Escrow(JobId::new()),
    ] {
        assert!(!account.may_go_negative(), "{account}");
    }
}

#[test]
fn kinds_and_causes_are_written_by_name() {
    for kind in TxKind::ALL {
        assert_eq!(kind.as_str().parse::<TxKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.as_str()));
    }
    for kind in [TxKind::Deposit, TxKind::Release, TxKind::Forfeit] {
        assert_eq!(kind.subject_token(), kind.as_str());
    }
    let err = "bonus".parse::<TxKind>().unwrap_err();
    assert!(err.contains("deposit, release or forfeit"), "{err}");
    for cause in [ForfeitCause::Unrestorable, ForfeitCause::Minority] {
        let json = serde_json::to_string(&cause).unwrap();
        assert_eq!(json, format!("\"{cause}\""));
        assert_eq!(serde_json::from_str::<ForfeitCause>(&json).unwrap(), cause);
    }
}

#[test]
fn a_forfeit_rides_in_its_transaction_and_old_records_still_decode() {
    let (job, provider) = (JobId::new(), ProviderId::new());
    let mut forfeit = tx(vec![
        Entry::debit(Account::Deposit(provider), Decimal::ONE),
        Entry::credit(Account::User("alice".into()), Decimal::ONE),
    ]);
    forfeit.kind = TxKind::Forfeit;
    forfeit.forfeit = Some(Box::new(Forfeit {
        job,
        segment: 2,
        attempt: 1,
        provider,
        payer: "alice".into(),
        amount: Money::new(Decimal::ONE, "CRD"),
        cause: ForfeitCause::Minority,
    }));
    let json = serde_json::to_string(&forfeit).unwrap();
    assert!(json.contains("\"cause\":\"minority\""), "{json}");
    assert_eq!(serde_json::from_str::<Transaction>(&json).unwrap(), forfeit);

    // Written before forfeits existed: no `forfeit` field at all.
    let old = tx(vec![
        Entry::debit(Account::Operator, Decimal::ONE),
        Entry::credit(Account::User("alice".into()), Decimal::ONE),
    ]);
    let json = serde_json::to_string(&old).unwrap();
    assert!(!json.contains("forfeit"), "{json}");
    assert_eq!(serde_json::from_str::<Transaction>(&json).unwrap(), old);
}

fn tx(entries: Vec<Entry>) -> Transaction {
    Transaction {
        version: 1,
        id: uuid::Uuid::nil(),
        kind: TxKind::Credit,
        at: Utc::now(),
        unit: "CRD".into(),
        entries,
        job: None,
        segment: None,
        provider: None,
        memo: String::new(),
        settlement: None,
        resolves: None,
        forfeit: None,
    }
}

#[test]
fn a_transaction_must_balance_with_sane_amounts() {
    let d = |s: &str| Decimal::from_str(s).unwrap();
    let alice = || Account::User("alice".into());
    assert_eq!(
        tx(vec![
            Entry::debit(Account::Operator, d("5")),
            Entry::credit(alice(), d("5.00"))
        ])
        .malformed(),
        None
    );
    assert!(
        tx(vec![
            Entry::debit(Account::Operator, d("5")),
            Entry::credit(alice(), d("4"))
        ])
        .malformed()
        .unwrap()
        .contains("unbalanced")
    );
    assert!(
        tx(vec![
            Entry::debit(Account::Operator, d("-5")),
            Entry::credit(alice(), d("-5"))
        ])
        .malformed()
        .unwrap()
        .contains("negative")
    );
    assert!(
        tx(vec![
            Entry::debit(alice(), d("1")),
            Entry::credit(alice(), d("1"))
        ])
        .malformed()
        .unwrap()
        .contains("twice")
    );
    assert!(
        tx(vec![
            Entry::debit(Account::Operator, d("0.000000001")),
            Entry::credit(alice(), d("0.000000001"))
        ])
        .malformed()
        .unwrap()
        .contains("decimal places")
    );
    assert!(tx(vec![]).malformed().is_some());
}
