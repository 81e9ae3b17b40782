//! Who may do what through the job API. The caller is the role and name
//! the request's subject carries, which the NATS server lets only that
//! user publish on (see `vmlot-identity`): nothing here believes a field of
//! the message. Pure, and tested without NATS.

use vmlot_schemas::api::{
    ApiError, Cancel, Credit, Deposit, Endpoint, List, Market, Providers, Release, Standings, Status, Stop,
    Submit,
};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::market::{JobSpec, JobStatus};

fn refuse(message: String) -> ApiError {
    ApiError {
        code: "forbidden".into(),
        message,
    }
}

/// Whether `caller`'s role may call `endpoint` at all.
pub(crate) fn may_call(caller: &Caller, endpoint: &str) -> Result<(), ApiError> {
    use Role::*;
    let allowed: &[Role] = match endpoint {
        Submit::NAME => &[Submitter],
        Status::NAME | List::NAME => &[Submitter, Operator, Accountant],
        Cancel::NAME | Stop::NAME => &[Submitter, Operator],
        Providers::NAME | Market::NAME | Standings::NAME => &[Submitter, Operator, Accountant],
        Credit::NAME => &[Operator],
        Deposit::NAME | Release::NAME => &[Provider],
        _ => &[],
    };
    if allowed.contains(&caller.role) {
        Ok(())
    } else {
        Err(refuse(format!("a {} may not call {endpoint}", caller.role)))
    }
}

/// The account a submission charges: always the caller's own. A spec that
/// names another account is refused, not quietly rewritten, so a client
/// that meant someone else's money learns it cannot.
pub(crate) fn payer(caller: &Caller, spec: &JobSpec) -> Result<String, ApiError> {
    if spec.account.is_empty() || spec.account == caller.name {
        Ok(caller.name.clone())
    } else {
        Err(refuse(format!(
            "you are {caller} and pay for your own jobs, not {:?}'s",
            spec.account
        )))
    }
}

/// Whether `caller` may see a job: its owner, the operator, the accountants.
pub(crate) fn may_see(caller: &Caller, job: &JobStatus) -> bool {
    match caller.role {
        Role::Operator | Role::Accountant => true,
        Role::Submitter => job.spec.account == caller.name,
        Role::Broker | Role::Provider => false,
    }
}

/// Whether `caller` may cancel a job: its owner or the operator.
pub(crate) fn may_cancel(caller: &Caller, job: &JobStatus) -> bool {
    match caller.role {
        Role::Operator => true,
        Role::Submitter => job.spec.account == caller.name,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::api::ENDPOINTS;

    fn who(role: Role, name: &str) -> Caller {
        Caller::new(role, name)
    }

    #[test]
    fn only_the_operator_credits_and_only_submitters_submit() {
        for role in Role::ALL {
            let c = who(role, "x");
            assert_eq!(
                may_call(&c, Credit::NAME).is_ok(),
                role == Role::Operator,
                "{role}"
            );
            assert_eq!(
                may_call(&c, Submit::NAME).is_ok(),
                role == Role::Submitter,
                "{role}"
            );
        }
    }

    #[test]
    fn providers_only_move_their_deposit_and_the_broker_calls_nothing() {
        for endpoint in ENDPOINTS {
            let provider_may = [Deposit::NAME, Release::NAME].contains(&endpoint);
            assert_eq!(
                may_call(&who(Role::Provider, "x"), endpoint).is_ok(),
                provider_may,
                "provider {endpoint}"
            );
            assert!(
                may_call(&who(Role::Broker, "x"), endpoint).is_err(),
                "broker {endpoint}"
            );
        }
        for role in [Role::Submitter, Role::Operator, Role::Accountant] {
            assert!(may_call(&who(role, "x"), Deposit::NAME).is_err(), "{role}");
        }
        assert!(may_call(&who(Role::Operator, "x"), "nonsense").is_err());
    }
}
