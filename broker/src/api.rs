//! The job API: a NATS micro service (`vmlot-broker`, discoverable with
//! `$SRV.PING`, with stats) whose endpoints live under `vmlot.api.*`. Every
//! request is decoded and validated before it touches state; a refusal is
//! a `{"error": {"code", "message"}}` reply and changes nothing.

use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use chrono::Utc;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmlot_schemas::market::{
    ApiError, Checkpoint, JobRef, JobState, JobStatus, MarketView, Reply, SegmentCount, SubmitJob, Submitted,
};
use vmlot_schemas::{HypervisorKind, JobId, Money, WIRE_VERSION, subjects};

use vmlot_ledger::LedgerError;
use vmlot_schemas::ledger::{Account, CreditRequest, Transaction};

use crate::state::UpdateError;
use crate::{BrokerError, Shared, verify};

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
    for name in [
        "submit",
        "status",
        "list",
        "cancel",
        "providers",
        "market",
        "credit",
    ] {
        let mut endpoint = group
            .endpoint(name)
            .await
            .map_err(|e| BrokerError::nats("API endpoint", e))?;
        let shared = Arc::clone(&shared);
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
                        let reply = handle(&shared, name, &request.message.payload).await;
                        if let Err(err) = request.respond(Ok(reply.into())).await {
                            tracing::warn!(endpoint = name, %err, "could not reply");
                        }
                    }
                })
                .await;
        });
    }
    Ok(Api { service })
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

async fn handle(shared: &Arc<Shared>, endpoint: &str, payload: &[u8]) -> Vec<u8> {
    match endpoint {
        "submit" => encode(submit(shared, payload).await),
        "status" => encode(status(shared, payload).await),
        "list" => encode(shared.jobs.all().await.map_err(internal)),
        "cancel" => encode(cancel(shared, payload).await),
        "providers" => encode(Ok::<_, ApiError>(shared.live_providers())),
        "market" => encode(market(shared).await),
        "credit" => encode(credit(shared, payload).await),
        _ => encode::<()>(Err(error("not-found", "no such endpoint"))),
    }
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
    if spec.segment_seconds > MAX_SEGMENT_SECONDS {
        return Err(error(
            "bad-request",
            format!("segment length must be at most {MAX_SEGMENT_SECONDS} s"),
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

async fn submit(shared: &Arc<Shared>, payload: &[u8]) -> Result<Submitted, ApiError> {
    let req: SubmitJob = decode(payload)?;
    validate(&req)?;
    let image = &req.spec.image;
    let parts: Vec<_> = std::iter::once(image.kernel)
        .chain(image.initrd)
        .chain(image.disks.iter().copied())
        .collect();
    let stored_bytes = verify::stored_bytes(&shared.store, &parts)
        .await
        .map_err(|e| error("not-found", format!("image is not in the store: {e}")))?;
    let now = Utc::now();
    let job = JobId::new();
    let status = JobStatus {
        version: WIRE_VERSION,
        job,
        spent: Money::new(Decimal::ZERO, req.spec.budget.unit.clone()),
        checkpoint: Checkpoint {
            machine_state: None,
            disks: image.disks.clone(),
            stored_bytes,
        },
        spec: req.spec,
        state: JobState::Running,
        settled: Vec::new(),
        open_lot: None,
        attempts: 0,
        waiting_for_providers: false,
        created_at: now,
        updated_at: now,
        end_reason: None,
        refunded: false,
    };
    // The record first, then the hold: a broker that dies between the two
    // finds the job on restart and holds its budget then (never money in
    // an escrow with no job).
    let (user, budget) = (status.spec.account.clone(), status.spec.budget.clone());
    shared.jobs.create(&status).await.map_err(internal)?;
    match shared.books.hold(job, &user, &budget).await {
        Ok(_) => {}
        Err(short @ LedgerError::InsufficientFunds { .. }) => {
            shared.jobs.remove(&job).await.map_err(internal)?;
            return Err(error("insufficient-funds", short.to_string()));
        }
        // Unknown whether the hold was written: the job task holds it
        // (or finds it held) when it starts.
        Err(e) => tracing::warn!(%job, %e, "could not hold the budget yet; the job task will"),
    }
    tracing::info!(%job, "job submitted");
    shared.spawn_job(job, None);
    Ok(Submitted { job })
}

async fn status(shared: &Arc<Shared>, payload: &[u8]) -> Result<JobStatus, ApiError> {
    let req: JobRef = decode(payload)?;
    check_version(req.version)?;
    match shared.jobs.get(&req.job).await.map_err(internal)? {
        Some((status, _)) => Ok(status),
        None => Err(error("not-found", format!("no job {}", req.job))),
    }
}

async fn cancel(shared: &Arc<Shared>, payload: &[u8]) -> Result<JobStatus, ApiError> {
    let req: JobRef = decode(payload)?;
    check_version(req.version)?;
    let updated = shared
        .jobs
        .update(&req.job, move |s| {
            if s.state.is_final() {
                return Err(error("conflict", format!("job already ended ({:?})", s.state)));
            }
            s.state = JobState::Cancelled;
            s.end_reason = Some("cancelled by the submitter".into());
            Ok(())
        })
        .await;
    let status = match updated {
        Ok(status) => status,
        Err(UpdateError::NotFound) => return Err(error("not-found", format!("no job {}", req.job))),
        Err(UpdateError::Refused(e)) => return Err(e),
        Err(UpdateError::Broker(e)) => return Err(internal(e)),
    };
    if let Some(token) = shared.running.lock().expect("running lock").get(&req.job) {
        token.cancel();
    }
    Ok(status)
}

/// The operator funds a user account. Only a request carrying the
/// broker's operator token is obeyed (and NATS permissions should let only
/// the operator publish on this endpoint's subject).
async fn credit(shared: &Arc<Shared>, payload: &[u8]) -> Result<Transaction, ApiError> {
    let req: CreditRequest = decode(payload)?;
    check_version(req.version)?;
    let authorized = shared
        .config
        .operator_token
        .as_deref()
        .is_some_and(|token| constant_time_eq(token.as_bytes(), req.operator_token.as_bytes()));
    if !authorized {
        return Err(error("forbidden", "only the operator may credit accounts"));
    }
    check_money("credit", &req.amount)?;
    if req.amount.amount <= Decimal::ZERO {
        return Err(error("bad-request", "a credit must be positive"));
    }
    if !matches!(req.account, Account::User(_)) {
        return Err(error("bad-request", "only user accounts are credited"));
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn market(shared: &Arc<Shared>) -> Result<MarketView, ApiError> {
    let running = shared.jobs.running().await.map_err(internal)?;
    Ok(MarketView {
        running_jobs: running.len() as u32,
        open_lots: running.into_iter().filter_map(|s| s.open_lot).collect(),
        providers: shared.live_providers(),
    })
}
