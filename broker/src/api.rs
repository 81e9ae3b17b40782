//! The job API: a NATS micro service (`vmlot-broker`, discoverable with
//! `$SRV.PING`, with stats) whose endpoints are those of
//! [`vmlot_schemas::api`], each served through its [`Endpoint`] type: the
//! payload decoded as the endpoint's request, the answer its response in a
//! [`Reply`]. The caller is read off the request's subject
//! (`vmlot.api.<role>.<name>.<endpoint>`, which only that user may publish
//! on) and [`crate::access`] decides what it may do. Every request is
//! decoded and validated before it touches state; a refusal is a
//! `{"error": {"code", "message"}}` reply and changes nothing.

use std::future::Future;
use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmlot_schemas::api::{
    ApiError, Cancel, Credit, Deposit, DepositRequest, Deposited, ENDPOINTS, Endpoint, List, Market,
    Providers, Release, Reply, Standings, Status, Stop, Submit,
};
use vmlot_schemas::caller::Caller;
use vmlot_schemas::market::{
    Checkpoint, Heartbeat, JobRef, JobStatus, MarketView, ResultCheck, SegmentCount, SubmitJob, Submitted,
};
use vmlot_schemas::standing::Standing;
use vmlot_schemas::{HypervisorKind, Money, WIRE_VERSION, subjects};

use vmlot_ledger::LedgerError;
use vmlot_schemas::ledger::{Account, CreditRequest, Transaction};

use crate::state::UpdateError;
use crate::{BrokerError, Shared, access, deposit, lifecycle, verify};

/// The most replicas a job may ask for.
pub const MAX_REDUNDANCY: u32 = 16;
/// The longest segment: a week.
pub const MAX_SEGMENT_SECONDS: u32 = 7 * 24 * 3600;
/// No price or budget beyond this is believed.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xE8D4_A510, 0xE8, 0, false, 0); // 1e15

/// Requests of one endpoint handled at once.
const API_CONCURRENCY: usize = 64;

/// A running API; [`Api::stop`] ends its endpoint tasks.
pub struct Api {
    service: service::Service,
}

impl Api {
    pub async fn stop(self) {
        let _ = self.service.stop().await;
    }
}

fn error(code: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        code: code.into(),
        message: message.into(),
    }
}

pub(crate) async fn start(shared: Arc<Shared>) -> Result<Api, BrokerError> {
    let service = shared
        .client
        .service_builder()
        .description("vmlot broker: submit and follow VM time-segment jobs")
        .start(subjects::API_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| BrokerError::nats("start API service", e))?;
    let group = service.group(subjects::API_PREFIX);
    // One entry per endpoint of the API: one more in `ENDPOINTS` and this
    // array no longer has its length.
    let served: [&str; ENDPOINTS.len()] = [
        serve::<Submit>(&group, &shared).await?,
        serve::<Status>(&group, &shared).await?,
        serve::<List>(&group, &shared).await?,
        serve::<Cancel>(&group, &shared).await?,
        serve::<Stop>(&group, &shared).await?,
        serve::<Providers>(&group, &shared).await?,
        serve::<Market>(&group, &shared).await?,
        serve::<Standings>(&group, &shared).await?,
        serve::<Credit>(&group, &shared).await?,
        serve::<Deposit>(&group, &shared).await?,
        serve::<Release>(&group, &shared).await?,
    ];
    debug_assert_eq!(served, ENDPOINTS, "every endpoint served, in order");
    Ok(Api { service })
}

/// An endpoint the broker answers: how its payload becomes its request,
/// and what it does with one.
trait Serve: Endpoint + 'static {
    /// The request in `payload`; refused as `bad-request` when malformed.
    fn decode(payload: &[u8]) -> Result<Self::Request, ApiError> {
        decode(payload)
    }

    /// Answers one decoded request from `caller`.
    fn serve(
        shared: &Arc<Shared>,
        caller: &Caller,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Response, ApiError>> + Send;
}

/// Answers requests to `E` on `group` until shutdown; returns its name.
async fn serve<E: Serve>(group: &service::Group, shared: &Arc<Shared>) -> Result<&'static str, BrokerError> {
    let mut endpoint = group
        .endpoint_builder()
        .name(E::NAME)
        .add(subjects::api_endpoint(E::NAME))
        .await
        .map_err(|e| BrokerError::nats("API endpoint", e))?;
    let shared = Arc::clone(shared);
    let stop = shared.shutdown.clone().cancelled_owned();
    shared.clone().tasks.spawn(async move {
        // Requests wait on fsynced writes: one at a time, a busy market's
        // submissions would queue behind each other's disk flushes.
        endpoint
            .by_ref()
            .take_until(stop)
            .for_each_concurrent(API_CONCURRENCY, |request| {
                let shared = Arc::clone(&shared);
                async move {
                    // The broker may publish anywhere: it answers only into
                    // an inbox, never onto a subject a caller chose to have
                    // written (a stream's, say) with the broker's hand.
                    let to_inbox = request
                        .message
                        .reply
                        .as_ref()
                        .is_some_and(|r| r.starts_with(subjects::INBOX_PREFIX));
                    if !to_inbox {
                        tracing::warn!(endpoint = E::NAME, reply = ?request.message.reply, "request not answered: its reply subject is not an inbox");
                        return;
                    }
                    let reply = handle::<E>(&shared, &request.message.subject, &request.message.payload).await;
                    if let Err(err) = request.respond(Ok(reply.into())).await {
                        tracing::warn!(endpoint = E::NAME, %err, "could not reply");
                    }
                }
            })
            .await;
    });
    Ok(E::NAME)
}

/// One request to `E` on `subject`: its caller checked, decoded,
/// answered, encoded as a [`Reply`].
async fn handle<E: Serve>(shared: &Arc<Shared>, subject: &str, payload: &[u8]) -> Vec<u8> {
    let Some(caller) = subjects::api_caller(subject) else {
        crate::metrics::refused("request", "bad-request");
        return encode::<()>(Err(error(
            "bad-request",
            format!("{subject}: no caller in the subject"),
        )));
    };
    if shared.rates.check_key(&caller).is_err() {
        crate::metrics::refused("request", "rate-limited");
        return encode::<()>(Err(error(
            "rate-limited",
            format!(
                "{caller}: more than {} requests a second; slow down",
                shared.config.quotas.requests_per_second
            ),
        )));
    }
    let reply = match access::may_call(&caller, E::NAME).and_then(|()| E::decode(payload)) {
        Ok(request) => E::serve(shared, &caller, request).await,
        Err(refused) => Err(refused),
    };
    if let Err(e) = &reply {
        crate::metrics::refused("request", &e.code);
        if e.code == "forbidden" {
            tracing::warn!(%caller, endpoint = E::NAME, reason = %e.message, "refused");
        }
    }
    encode(reply)
}

fn encode<T: Serialize>(reply: Result<T, ApiError>) -> Vec<u8> {
    let reply = match reply {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e),
    };
    serde_json::to_vec(&reply).expect("reply serializes")
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(payload).map_err(|e| error("bad-request", format!("malformed request: {e}")))
}

impl Serve for Submit {
    async fn serve(shared: &Arc<Shared>, caller: &Caller, request: SubmitJob) -> Result<Submitted, ApiError> {
        submit(shared, caller, request).await
    }
}

impl Serve for Status {
    async fn serve(shared: &Arc<Shared>, caller: &Caller, request: JobRef) -> Result<JobStatus, ApiError> {
        status(shared, caller, request).await
    }
}

impl Serve for List {
    /// Takes nothing: whatever it is sent is ignored.
    fn decode(_: &[u8]) -> Result<(), ApiError> {
        Ok(())
    }

    async fn serve(shared: &Arc<Shared>, caller: &Caller, (): ()) -> Result<Vec<JobStatus>, ApiError> {
        let all = shared.jobs.all().await.map_err(internal)?;
        Ok(all.into_iter().filter(|j| access::may_see(caller, j)).collect())
    }
}

impl Serve for Cancel {
    async fn serve(shared: &Arc<Shared>, caller: &Caller, request: JobRef) -> Result<JobStatus, ApiError> {
        cancel(shared, caller, request).await
    }
}

impl Serve for Stop {
    async fn serve(shared: &Arc<Shared>, caller: &Caller, request: JobRef) -> Result<JobStatus, ApiError> {
        stop(shared, caller, request).await
    }
}

impl Serve for Providers {
    /// Takes nothing: whatever it is sent is ignored.
    fn decode(_: &[u8]) -> Result<(), ApiError> {
        Ok(())
    }

    async fn serve(shared: &Arc<Shared>, _: &Caller, (): ()) -> Result<Vec<Heartbeat>, ApiError> {
        Ok(shared.live_providers())
    }
}

impl Serve for Market {
    /// Takes nothing: whatever it is sent is ignored.
    fn decode(_: &[u8]) -> Result<(), ApiError> {
        Ok(())
    }

    async fn serve(shared: &Arc<Shared>, _: &Caller, (): ()) -> Result<MarketView, ApiError> {
        market(shared).await
    }
}

impl Serve for Standings {
    /// Takes nothing: whatever it is sent is ignored.
    fn decode(_: &[u8]) -> Result<(), ApiError> {
        Ok(())
    }

    async fn serve(shared: &Arc<Shared>, _: &Caller, (): ()) -> Result<Vec<Standing>, ApiError> {
        shared.standings.all().await.map_err(internal)
    }
}

impl Serve for Credit {
    async fn serve(
        shared: &Arc<Shared>,
        _: &Caller,
        request: CreditRequest,
    ) -> Result<Transaction, ApiError> {
        credit(shared, request).await
    }
}

impl Serve for Deposit {
    async fn serve(
        shared: &Arc<Shared>,
        caller: &Caller,
        req: DepositRequest,
    ) -> Result<Deposited, ApiError> {
        let provider = provider_of(caller)?;
        deposit::put(shared, provider, req).await.map_err(refused)
    }
}

impl Serve for Release {
    async fn serve(
        shared: &Arc<Shared>,
        caller: &Caller,
        req: DepositRequest,
    ) -> Result<Deposited, ApiError> {
        let provider = provider_of(caller)?;
        deposit::release(shared, provider, req).await.map_err(refused)
    }
}

/// The provider a caller's credentials name (a provider's name is its id).
fn provider_of(caller: &Caller) -> Result<vmlot_schemas::ProviderId, ApiError> {
    caller
        .name
        .parse()
        .map_err(|_| error("forbidden", format!("{caller} is not a provider id")))
}

fn refused(err: deposit::DepositError) -> ApiError {
    error(err.code(), err.to_string())
}

fn internal(err: BrokerError) -> ApiError {
    error("unavailable", err.to_string())
}

fn check_version(version: u32) -> Result<(), ApiError> {
    if version != WIRE_VERSION {
        return Err(error(
            "bad-request",
            format!("version {version} not supported (speaks {WIRE_VERSION})"),
        ));
    }
    Ok(())
}

fn check_money(what: &str, m: &Money) -> Result<(), ApiError> {
    if !m.unit_is_valid() {
        return Err(error(
            "bad-request",
            format!("{what}: unit {:?} is not 3-8 upper-case letters", m.unit),
        ));
    }
    if m.amount <= Decimal::ZERO {
        return Err(error("bad-request", format!("{what} must be positive, got {m}")));
    }
    if m.amount.scale() > vmlot_schemas::ledger::MAX_SCALE {
        return Err(error(
            "bad-request",
            format!(
                "{what} {m} has more than {} decimal places",
                vmlot_schemas::ledger::MAX_SCALE
            ),
        ));
    }
    if m.amount > MAX_AMOUNT {
        return Err(error(
            "bad-request",
            format!("{what} {m} is beyond any believable amount"),
        ));
    }
    Ok(())
}

/// Validates a submission; everything a job needs is checked here, before
/// any state exists.
fn validate(req: &SubmitJob) -> Result<(), ApiError> {
    check_version(req.version)?;
    let spec = &req.spec;
    if spec.redundancy == 0 || spec.redundancy > MAX_REDUNDANCY {
        return Err(error(
            "bad-request",
            format!("redundancy must be 1..={MAX_REDUNDANCY}"),
        ));
    }
    if spec.check == ResultCheck::Quorum {
        if (spec.redundancy as usize) < crate::quorum::QUORUM {
            return Err(error(
                "bad-request",
                format!(
                    "a quorum check needs redundancy {} or more",
                    crate::quorum::QUORUM
                ),
            ));
        }
        if spec.image.vm.hypervisor == HypervisorKind::Qemu && spec.image.vm.vcpus != 1 {
            return Err(error(
                "bad-request",
                "a quorum check on QEMU runs deterministic segments, with one vCPU",
            ));
        }
        if !crate::quorum::comparable(spec.image.vm.hypervisor) {
            return Err(error(
                "bad-request",
                format!(
                    "a quorum check compares deterministic states; {:?} states cannot be compared yet",
                    spec.image.vm.hypervisor
                ),
            ));
        }
    }
    if spec.segment_seconds > MAX_SEGMENT_SECONDS {
        return Err(error(
            "bad-request",
            format!("segment length must be at most {MAX_SEGMENT_SECONDS} s"),
        ));
    }
    if spec.image.vm.hypervisor == HypervisorKind::Synthetic && !cfg!(feature = "synthetic") {
        return Err(error(
            "bad-request",
            "synthetic jobs are for load tests: this broker is built without the `synthetic` feature",
        ));
    }
    if spec.segment_seconds == 0 && spec.image.vm.hypervisor != HypervisorKind::Synthetic {
        return Err(error(
            "bad-request",
            "zero-length segments are for the synthetic driver only",
        ));
    }
    if let SegmentCount::Count(n) = spec.segments
        && !(1..=1_000_000).contains(&n)
    {
        return Err(error("bad-request", "segment count must be 1..=1000000"));
    }
    check_money("reserve price", &spec.reserve_price)?;
    check_money("budget", &spec.budget)?;
    if spec.reserve_price.unit != spec.budget.unit {
        return Err(error(
            "bad-request",
            "reserve price and budget must be in the same unit",
        ));
    }
    if spec.budget.amount < spec.reserve_price.amount {
        return Err(error(
            "bad-request",
            "budget is below one segment's reserve price",
        ));
    }
    if !vmlot_schemas::ledger::valid_user_name(&spec.account) {
        return Err(error(
            "bad-request",
            "account must be 1-64 letters, digits, _ or -",
        ));
    }
    let vm = &spec.image.vm;
    if !(16..=1 << 20).contains(&vm.memory_mib) || !(1..=64).contains(&vm.vcpus) {
        return Err(error(
            "bad-request",
            "memory must be 16 MiB..1 TiB and vCPUs 1..=64",
        ));
    }
    if vm.arch.is_empty()
        || vm.arch.len() > 32
        || !vm.arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(error("bad-request", "arch must be 1-32 letters, digits or _"));
    }
    if vm.cmdline.len() > 4096 {
        return Err(error("bad-request", "kernel command line over 4096 bytes"));
    }
    Ok(())
}

async fn submit(shared: &Arc<Shared>, caller: &Caller, mut req: SubmitJob) -> Result<Submitted, ApiError> {
    req.spec.account = access::payer(caller, &req.spec)?;
    validate(&req)?;
    let image = &req.spec.image;
    let parts: Vec<_> = std::iter::once(image.kernel)
        .chain(image.initrd)
        .chain(image.disks.iter().copied())
        .collect();
    let stored_bytes = verify::stored_bytes(&shared.store, &parts)
        .await
        .map_err(|e| error("not-found", format!("image is not in the store: {e}")))?;
    shared
        .config
        .quotas
        .admit(&req.spec, stored_bytes)
        .map_err(|over| error("quota-exceeded", over.to_string()))?;
    let job = shared.new_job_id();
    // A slot of the account's jobs in flight, taken before anything is
    // written and given back if the submission fails.
    shared
        .in_flight
        .lock()
        .expect("in-flight lock")
        .take(&req.spec.account, job, shared.config.quotas.jobs_in_flight)
        .map_err(|over| error("quota-exceeded", over.to_string()))?;
    let release = || shared.in_flight.lock().expect("in-flight lock").release(&job);
    let now = Utc::now();
    let start = Checkpoint {
        machine_state: None,
        disks: image.disks.clone(),
        stored_bytes,
        memory: None,
    };
    let status = JobStatus::submitted(job, req.spec, start, now);
    // The record first, then the hold: a broker that dies between the two
    // finds the job on restart and holds its budget then (never money in
    // an escrow with no job).
    let (user, budget) = (status.spec.account.clone(), status.spec.budget.clone());
    if let Err(e) = shared.jobs.create(&status).await {
        release();
        return Err(internal(e));
    }
    match shared.books.hold(job, &user, &budget).await {
        Ok(_) => {}
        Err(short @ LedgerError::InsufficientFunds { .. }) => {
            release();
            shared.jobs.remove(&job).await.map_err(internal)?;
            return Err(error("insufficient-funds", short.to_string()));
        }
        // Unknown whether the hold was written: the job task holds it
        // (or finds it held) when it starts.
        Err(e) => tracing::warn!(%job, %e, "could not hold the budget yet; the job task will"),
    }
    tracing::info!(%job, "job submitted");
    crate::metrics::job_submitted();
    if let Err(err) = shared.look_again(job).await {
        // Its partition's holder finds it on its next rescan.
        tracing::warn!(%job, %err, "could not start the job yet");
    }
    Ok(Submitted { job })
}

/// Another's job is answered as no job at all: its existence is theirs.
async fn status(shared: &Arc<Shared>, caller: &Caller, req: JobRef) -> Result<JobStatus, ApiError> {
    check_version(req.version)?;
    match shared.jobs.get(&req.job).await.map_err(internal)? {
        Some((status, _)) if access::may_see(caller, &status) => Ok(status),
        _ => Err(error("not-found", format!("no job {}", req.job))),
    }
}

async fn cancel(shared: &Arc<Shared>, caller: &Caller, req: JobRef) -> Result<JobStatus, ApiError> {
    let status = end(shared, caller, &req, "cancel", lifecycle::cancel).await?;
    if let Err(err) = shared.look_again(req.job).await {
        // The job's task sees the cancel at its next step.
        tracing::warn!(job = %req.job, %err, "could not stop the job's task yet");
    }
    Ok(status)
}

/// `stop`: the job task sees the limit when the running segment settles.
async fn stop(shared: &Arc<Shared>, caller: &Caller, req: JobRef) -> Result<JobStatus, ApiError> {
    end(shared, caller, &req, "stop", lifecycle::stop).await
}

/// Applies `transition` to the job `req` names, for a caller who may end
/// it (its owner or the operator).
async fn end(
    shared: &Arc<Shared>,
    caller: &Caller,
    req: &JobRef,
    verb: &str,
    transition: fn(&JobStatus) -> Result<JobStatus, lifecycle::Refused>,
) -> Result<JobStatus, ApiError> {
    check_version(req.version)?;
    match shared.jobs.get(&req.job).await.map_err(internal)? {
        Some((status, _)) if access::may_cancel(caller, &status) => {}
        Some((status, _)) if access::may_see(caller, &status) => {
            return Err(error(
                "forbidden",
                format!("a {} may not {verb} job {}", caller.role, req.job),
            ));
        }
        _ => return Err(error("not-found", format!("no job {}", req.job))),
    }
    match shared.jobs.transition(&req.job, transition).await {
        Ok(status) => Ok(status),
        Err(UpdateError::NotFound) => Err(error("not-found", format!("no job {}", req.job))),
        Err(UpdateError::Refused(e)) => Err(error("conflict", e.to_string())),
        Err(UpdateError::Broker(e)) => Err(internal(e)),
    }
}

/// The operator funds a user account ([`access::may_call`] lets only an
/// operator's identity here; no secret travels in the request).
async fn credit(shared: &Arc<Shared>, req: CreditRequest) -> Result<Transaction, ApiError> {
    check_version(req.version)?;
    check_money("credit", &req.amount)?;
    if req.amount.amount <= Decimal::ZERO {
        return Err(error("bad-request", "a credit must be positive"));
    }
    // A provider is credited to fund its deposit before it has earned.
    if !matches!(req.account, Account::User(_) | Account::Provider(_)) {
        return Err(error(
            "bad-request",
            "only user and provider accounts are credited",
        ));
    }
    if req.memo.len() > 256 {
        return Err(error("bad-request", "memo over 256 bytes"));
    }
    let recorded = shared
        .books
        .credit(req.id, &req.account, &req.amount, &req.memo)
        .await
        .map_err(|e| match e {
            LedgerError::Malformed(m) => error("bad-request", m),
            other => error("unavailable", other.to_string()),
        })?;
    let tx = recorded.tx().clone();
    // The same request id twice credits once; a different credit under a
    // reused id is refused rather than silently answered with the first.
    if tx
        .entries
        .iter()
        .any(|e| e.account == req.account && e.amount != req.amount.amount)
        || tx.unit != req.amount.unit
    {
        return Err(error(
            "conflict",
            format!("credit {} was already used for another amount", req.id),
        ));
    }
    tracing::info!(account = %req.account, amount = %req.amount, "account credited");
    Ok(tx)
}

async fn market(shared: &Arc<Shared>) -> Result<MarketView, ApiError> {
    let running = shared.jobs.running().await.map_err(internal)?;
    Ok(MarketView {
        running_jobs: running.len() as u32,
        open_lots: running.into_iter().filter_map(|s| s.open_lot).collect(),
        providers: shared.live_providers(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::market::{Image, JobSpec};
    use vmlot_schemas::{ManifestId, VmConfig};

    fn submission(hypervisor: HypervisorKind, segment_seconds: u32) -> SubmitJob {
        let money = |amount: u32| Money::new(Decimal::from(amount), "CRD");
        SubmitJob {
            version: WIRE_VERSION,
            spec: JobSpec {
                image: Image {
                    vm: VmConfig {
                        hypervisor,
                        arch: "x86_64".into(),
                        memory_mib: 64,
                        vcpus: 1,
                        cmdline: String::new(),
                    },
                    kernel: ManifestId::of(vmlot_schemas::HashAlgorithm::Sha256, b"kernel"),
                    initrd: None,
                    disks: vec![],
                },
                segment_seconds,
                segments: SegmentCount::Count(2),
                redundancy: 1,
                check: ResultCheck::Continuation,
                reserve_price: money(1),
                budget: money(10),
                account: "alice".into(),
            },
        }
    }

    #[test]
    fn zero_length_segments_are_for_the_synthetic_driver_only() {
        assert_eq!(validate(&submission(HypervisorKind::Qemu, 10)), Ok(()));
        let refused = validate(&submission(HypervisorKind::Qemu, 0)).unwrap_err();
        assert_eq!(refused.code, "bad-request");
        assert_eq!(
            refused.message,
            "zero-length segments are for the synthetic driver only"
        );
    }

    #[test]
    fn synthetic_jobs_only_with_the_synthetic_feature() {
        for seconds in [0, 10] {
            let answer = validate(&submission(HypervisorKind::Synthetic, seconds));
            if cfg!(feature = "synthetic") {
                assert_eq!(answer, Ok(()));
            } else {
                let refused = answer.unwrap_err();
                assert_eq!(refused.code, "bad-request");
                assert!(refused.message.contains("`synthetic` feature"), "{refused:?}");
            }
        }
    }

    #[test]
    fn a_quorum_needs_two_replicas_and_states_the_broker_can_compare() {
        let quorum = |hypervisor, redundancy| {
            let mut req = submission(hypervisor, 10);
            req.spec.check = ResultCheck::Quorum;
            req.spec.redundancy = redundancy;
            validate(&req)
        };
        let alone = quorum(HypervisorKind::Synthetic, 1).unwrap_err();
        assert_eq!(alone.message, "a quorum check needs redundancy 2 or more");
        let xen = quorum(HypervisorKind::Xen, 2).unwrap_err();
        assert!(
            xen.message.contains("Xen states cannot be compared yet"),
            "{xen:?}"
        );
        assert_eq!(quorum(HypervisorKind::Qemu, 2), Ok(()));
        let mut two_vcpus = submission(HypervisorKind::Qemu, 10);
        two_vcpus.spec.check = ResultCheck::Quorum;
        two_vcpus.spec.redundancy = 2;
        two_vcpus.spec.image.vm.vcpus = 2;
        assert!(validate(&two_vcpus).unwrap_err().message.contains("one vCPU"));
        if cfg!(feature = "synthetic") {
            assert_eq!(quorum(HypervisorKind::Synthetic, 2), Ok(()));
        }
    }
}
