//! The broker's job API, one typed definition per endpoint: its name (and so
//! its subject, `vmlot.api.<role>.<caller>.<name>`: the caller is whoever
//! the subject names, which NATS lets only that caller publish on), what it
//! takes and what it answers. The
//! broker serves these and the client library calls them; neither spells a
//! subject or a payload type of its own.
//!
//! Every answer travels as [`Reply`]: the value, or an [`ApiError`] with a
//! stable code.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::caller::Caller;
use crate::ledger::{CreditRequest, Transaction};
use crate::market::{Heartbeat, JobRef, JobStatus, MarketView, SubmitJob, Submitted};
use crate::money::Money;
use crate::recipe::{BuildRequest, Built, ImageRecord, RecipeRef};
use crate::standing::Standing;
use crate::subjects;

pub use crate::market::{ApiError, Reply};

/// One endpoint of the job API.
pub trait Endpoint {
    /// The endpoint's name in the micro service, and its subject's last token.
    const NAME: &'static str;
    /// What a caller sends.
    type Request: Serialize + DeserializeOwned + Send + Sync;
    /// What the broker answers, inside [`Reply::Ok`].
    type Response: Serialize + DeserializeOwned + Send + Sync;

    /// The subject `caller`'s requests are sent on.
    fn subject(caller: &Caller) -> String {
        subjects::api(caller, Self::NAME)
    }
}

/// Defines an endpoint type and its [`Endpoint`] impl.
macro_rules! endpoint {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $req:ty => $resp:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $ty;

        impl Endpoint for $ty {
            const NAME: &'static str = $name;
            type Request = $req;
            type Response = $resp;
        }
    };
}

endpoint!(
    /// Submit a job; its budget is held in escrow before the answer.
    Submit, "submit", SubmitJob => Submitted
);
endpoint!(
    /// One job's record.
    Status, "status", JobRef => JobStatus
);
endpoint!(
    /// Every job's record.
    List, "list", () => Vec<JobStatus>
);
endpoint!(
    /// Cancel a running job; answers its record as it ends.
    Cancel, "cancel", JobRef => JobStatus
);
endpoint!(
    /// End a running job after the segment it runs now (or before the
    /// next one, if none runs), keeping that segment's checkpoint; answers
    /// its record.
    Stop, "stop", JobRef => JobStatus
);
endpoint!(
    /// Providers heard from recently.
    Providers, "providers", () => Vec<Heartbeat>
);
endpoint!(
    /// Open lots, running jobs and live providers.
    Market, "market", () => MarketView
);
endpoint!(
    /// What the broker made of each provider's results: valid ones, and
    /// refusals by reason.
    Standings, "standing", () => Vec<Standing>
);
endpoint!(
    /// Fund a user account (operator only).
    Credit, "credit", CreditRequest => Transaction
);

endpoint!(
    /// A provider moves part of its earnings into its deposit (the
    /// broker may ask for one before it awards lots, and forfeits part of
    /// it to a submitter the provider is proven to have cheated).
    Deposit, "deposit", DepositRequest => Deposited
);
endpoint!(
    /// A provider takes its deposit (or part of it) back into its
    /// earnings: only while it holds no award and no pending payment.
    Release, "release", DepositRequest => Deposited
);

endpoint!(
    /// OS Farm: build a recipe's image, or answer the one built before.
    /// Lines of [`crate::recipe::BuildProgress`] come first on the reply subject, each
    /// with the header [`subjects::PROGRESS_HEADER`].
    ImageBuild, "image-build", BuildRequest => Built
);
endpoint!(
    /// OS Farm: every image it has built.
    ImageList, "image-list", () => Vec<ImageRecord>
);
endpoint!(
    /// OS Farm: one image, by its recipe's id.
    ImageShow, "image-show", RecipeRef => ImageRecord
);

/// provider → broker: how much to move into (or out of) its deposit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    pub version: u32,
    /// Chosen by the caller: retrying with the same id moves the money once.
    pub id: uuid::Uuid,
    pub amount: Money,
}

/// What a deposit or release did, and where the provider's money stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Deposited {
    pub tx: Transaction,
    /// The deposit's balance after it, in the request's unit.
    pub deposit: Money,
    /// The provider's posted earnings after it, in the request's unit.
    pub earnings: Money,
}

/// Every endpoint's name, in the order the service registers them.
pub const ENDPOINTS: [&str; 11] = [
    Submit::NAME,
    Status::NAME,
    List::NAME,
    Cancel::NAME,
    Stop::NAME,
    Providers::NAME,
    Market::NAME,
    Standings::NAME,
    Credit::NAME,
    Deposit::NAME,
    Release::NAME,
];

/// OS Farm's endpoints (served by `vmlot-farm`, not the broker).
pub const FARM_ENDPOINTS: [&str; 3] = [ImageBuild::NAME, ImageList::NAME, ImageShow::NAME];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_subjects_are_under_the_api_prefix() {
        let op = Caller::new(crate::caller::Role::Operator, "root");
        assert_eq!(Credit::subject(&op), "vmlot.api.operator.root.credit");
        let mut names = [ENDPOINTS.as_slice(), FARM_ENDPOINTS.as_slice()].concat();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            ENDPOINTS.len() + FARM_ENDPOINTS.len(),
            "endpoint names are unique"
        );
    }
}
