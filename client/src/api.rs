//! One typed caller of the broker's job API.
//!
//! Each endpoint is a type in [`vmlot_schemas::api`] naming its subject,
//! request and response; [`Api::call`] sends any of them. What can go wrong
//! is told apart by [`CallError`]: the broker answered with a refusal, no
//! broker answered (or NATS failed under the request), or the answer could
//! not be read. The short helpers ([`Api::submit`], [`Api::status`], …)
//! fill in the envelope (`version`, ids) around the common calls.

use std::time::{Duration, Instant};

use serde::Serialize;
use vmlot_schemas::api::Reply;
use vmlot_schemas::caller::Caller;
use vmlot_schemas::ledger::{CreditRequest, Transaction};
use vmlot_schemas::market::{Heartbeat, JobRef, JobSpec, JobStatus, MarketView, SubmitJob, Submitted};
use vmlot_schemas::recipe::{BuildProgress, BuildRequest, Built, Recipe};
use vmlot_schemas::{JobId, WIRE_VERSION, subjects};

/// The endpoints, so a caller needs one import.
pub use vmlot_schemas::api::{
    ApiError, Cancel, Credit, Deposit, DepositRequest, Deposited, Endpoint, ImageBuild, ImageList, ImageShow,
    List, Market, Providers, Release, Standings, Status, Stop, Submit,
};

/// Why a call to the job API did not return its value. The cause, where
/// there is one, is the error's source (`{:#}` prints the chain).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The broker answered and refused; `code` is stable (`not-found`,
    /// `bad-request`, `insufficient-funds`, …).
    #[error("refused ({}): {}", .0.code, .0.message)]
    Refused(ApiError),
    /// No broker answered: none is running, it did not answer in time, or
    /// the NATS connection failed under the request.
    #[error("request {endpoint}: is a broker running?")]
    NoBroker {
        endpoint: &'static str,
        #[source]
        source: async_nats::RequestError,
    },
    /// No farm answered a build: none is running, or it fell silent.
    #[error("request {endpoint}: {reason} (is `vmlot-farm` running?)")]
    NoFarm { endpoint: &'static str, reason: String },
    /// The request could not be encoded.
    #[error("request {endpoint}: cannot encode it")]
    Encode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Something answered, but not with a reply of this endpoint.
    #[error("request {endpoint}: undecodable broker reply")]
    BadReply {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl CallError {
    /// The broker's refusal, if that is what this is.
    pub fn refusal(&self) -> Option<&ApiError> {
        match self {
            CallError::Refused(err) => Some(err),
            _ => None,
        }
    }
}

/// What the broker said: its value or its refusal. The outer error of
/// [`Api::answer`] is the call's own failure (no broker, bad reply).
pub type Answer<T> = Result<T, ApiError>;

/// Why [`Api::wait_final`] returned without a final record.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The broker refused the status request (e.g. the job does not exist).
    #[error("status of job {job}: refused ({}): {}", .error.code, .error.message)]
    Refused { job: JobId, error: ApiError },
    /// The job was still running (or no broker answered) when time ran out.
    #[error("job {job} did not end within {limit:?}")]
    TimedOut {
        job: JobId,
        limit: Duration,
        /// The last record read, if any was.
        last: Option<Box<JobStatus>>,
    },
}

/// How often [`Api::wait_final`] asks for a job's record.
pub const WAIT_POLL: Duration = Duration::from_millis(200);

/// A handle on the job API over one NATS connection, as one caller;
/// cheap to clone.
#[derive(Clone)]
pub struct Api {
    client: async_nats::Client,
    /// Who the calls are from: the role and name the connection's
    /// credentials carry (the server lets it publish only under them).
    caller: Caller,
    /// `None`: the connection's own request timeout.
    timeout: Option<Duration>,
}

impl Api {
    /// Calls from `caller` go out on `client`, with its request timeout.
    pub fn new(client: async_nats::Client, caller: Caller) -> Self {
        Self {
            client,
            caller,
            timeout: None,
        }
    }

    /// Who the calls are from.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The same, each call waiting at most `timeout` for the broker.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The NATS connection the calls go out on.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Calls endpoint `E`: its value, or why not.
    pub async fn call<E: Endpoint>(&self, request: &E::Request) -> Result<E::Response, CallError> {
        self.answer::<E>(request).await?.map_err(CallError::Refused)
    }

    /// Calls endpoint `E`; a refusal is an answer, not an error.
    pub async fn answer<E: Endpoint>(&self, request: &E::Request) -> Result<Answer<E::Response>, CallError> {
        self.answer_body::<E>(request).await
    }

    /// Sends any body to endpoint `E` and reads its reply: for callers that
    /// must send what the request type cannot hold (tests of hostile input).
    pub async fn answer_body<E: Endpoint>(
        &self,
        body: &impl Serialize,
    ) -> Result<Answer<E::Response>, CallError> {
        let endpoint = E::NAME;
        let payload = serde_json::to_vec(body).map_err(|source| CallError::Encode { endpoint, source })?;
        let mut request = async_nats::Request::new().payload(payload.into());
        if let Some(timeout) = self.timeout {
            request = request.timeout(Some(timeout));
        }
        let reply = self
            .client
            .send_request(E::subject(&self.caller), request)
            .await
            .map_err(|source| CallError::NoBroker { endpoint, source })?;
        match serde_json::from_slice::<Reply<E::Response>>(&reply.payload) {
            Ok(Reply::Ok(value)) => Ok(Ok(value)),
            Ok(Reply::Error(err)) => Ok(Err(err)),
            Err(source) => Err(CallError::BadReply { endpoint, source }),
        }
    }

    /// Submits a job; its budget is held before the answer.
    pub async fn submit(&self, spec: JobSpec) -> Result<Submitted, CallError> {
        self.call::<Submit>(&SubmitJob {
            version: WIRE_VERSION,
            spec,
        })
        .await
    }

    /// A job's record.
    pub async fn status(&self, job: JobId) -> Result<JobStatus, CallError> {
        self.call::<Status>(&job_ref(job)).await
    }

    /// Cancels a running job; its record as it ends.
    pub async fn cancel(&self, job: JobId) -> Result<JobStatus, CallError> {
        self.call::<Cancel>(&job_ref(job)).await
    }

    /// Ends a job after its current segment, keeping that checkpoint.
    pub async fn stop(&self, job: JobId) -> Result<JobStatus, CallError> {
        self.call::<Stop>(&job_ref(job)).await
    }

    /// Every job's record.
    pub async fn list(&self) -> Result<Vec<JobStatus>, CallError> {
        self.call::<List>(&()).await
    }

    /// Providers heard from recently.
    pub async fn providers(&self) -> Result<Vec<Heartbeat>, CallError> {
        self.call::<Providers>(&()).await
    }

    /// What the broker made of each provider's results.
    pub async fn standing(&self) -> Result<Vec<vmlot_schemas::standing::Standing>, CallError> {
        self.call::<Standings>(&()).await
    }

    /// Open lots, running jobs and live providers.
    pub async fn market(&self) -> Result<MarketView, CallError> {
        self.call::<Market>(&()).await
    }

    /// Funds an account (operator only).
    pub async fn credit(&self, request: &CreditRequest) -> Result<Transaction, CallError> {
        self.call::<Credit>(request).await
    }

    /// Asks OS Farm for `recipe`'s image: built now, or the one built
    /// before. Each line of the build's progress goes to `progress` as it
    /// comes; `quiet` is the longest the farm may stay silent.
    pub async fn build_image(
        &self,
        recipe: Recipe,
        mut progress: impl FnMut(&BuildProgress),
        quiet: Duration,
    ) -> Result<Built, CallError> {
        use futures::StreamExt;
        let endpoint = ImageBuild::NAME;
        let body = BuildRequest {
            version: vmlot_schemas::recipe::RECIPE_VERSION,
            recipe,
        };
        let payload = serde_json::to_vec(&body).map_err(|source| CallError::Encode { endpoint, source })?;
        let no_farm = |reason: String| CallError::NoFarm { endpoint, reason };
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| no_farm(format!("cannot subscribe to its inbox: {e}")))?;
        self.client
            .publish_with_reply(ImageBuild::subject(&self.caller), inbox, payload.into())
            .await
            .map_err(|e| no_farm(format!("cannot send it: {e}")))?;
        loop {
            let message = match tokio::time::timeout(quiet, answers.next()).await {
                Err(_) => return Err(no_farm(format!("nothing heard for {quiet:?}"))),
                Ok(None) => return Err(no_farm("the connection closed".into())),
                Ok(Some(message)) => message,
            };
            if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Err(no_farm("no one serves it".into()));
            }
            let is_progress = message
                .headers
                .as_ref()
                .is_some_and(|h| h.get(subjects::PROGRESS_HEADER).is_some());
            if is_progress {
                if let Ok(line) = serde_json::from_slice::<BuildProgress>(&message.payload) {
                    progress(&line);
                }
                continue;
            }
            return match serde_json::from_slice::<Reply<Built>>(&message.payload) {
                Ok(Reply::Ok(built)) => Ok(built),
                Ok(Reply::Error(err)) => Err(CallError::Refused(err)),
                Err(source) => Err(CallError::BadReply { endpoint, source }),
            };
        }
    }

    /// Polls the job's record every [`WAIT_POLL`] until it is final. A
    /// status call no broker answers is asked again (a broker may be
    /// restarting); a refusal ends the wait.
    pub async fn wait_final(&self, job: JobId, limit: Duration) -> Result<JobStatus, WaitError> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            match self.status(job).await {
                Ok(status) if status.state.is_final() => return Ok(status),
                Ok(status) => last = Some(Box::new(status)),
                // Over the caller's request rate, or the broker's store
                // between leaders: asked again after the pause.
                Err(CallError::Refused(error))
                    if error.code == "rate-limited" || error.code == "unavailable" => {}
                Err(CallError::Refused(error)) => return Err(WaitError::Refused { job, error }),
                Err(_) => {}
            }
            if Instant::now() > deadline {
                return Err(WaitError::TimedOut { job, limit, last });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

fn job_ref(job: JobId) -> JobRef {
    JobRef {
        version: WIRE_VERSION,
        job,
    }
}
