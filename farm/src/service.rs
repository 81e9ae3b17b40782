//! OS Farm as a NATS micro service (`vmlot-farm`): `image-build`,
//! `image-list` and `image-show`, under the job API's prefix, so the caller
//! is whoever the subject names (only that user may publish on it). A
//! recipe built before is answered from the index at once; a new one is
//! queued, built by one builder at a time, stored, indexed and answered,
//! its progress sent line by line on the request's reply subject first.
//! Two requests for one recipe share its build.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmlot_schemas::api::{ApiError, Endpoint, ImageBuild, ImageList, ImageShow, Reply};
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::recipe::{BuildProgress, BuildRequest, Built, ImageRecord, RecipeId, RecipeRef};
use vmlot_schemas::subjects;

use crate::error::FarmError;
use crate::farm::Farm;

/// Builds waiting or running at once, in all.
pub const MAX_QUEUED: usize = 8;
/// Builds one caller may have waiting or running.
pub const MAX_PER_CALLER: usize = 2;

/// What a build tells the requests waiting on it.
#[derive(Clone, Debug)]
enum Event {
    Progress(BuildProgress),
    Done(Box<Result<ImageRecord, ApiError>>),
}

/// Builds waiting or running, by recipe: who asked, and the channel its
/// progress and answer go out on.
#[derive(Default)]
struct InFlight {
    builds: HashMap<RecipeId, (Caller, broadcast::Sender<Event>)>,
}

struct Shared {
    farm: Farm,
    client: async_nats::Client,
    in_flight: Mutex<InFlight>,
    queue: mpsc::Sender<(RecipeId, BuildRequest)>,
}

fn error(code: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        code: code.into(),
        message: message.into(),
    }
}

/// Serves until `shutdown`; every task it starts is in `tasks`.
pub async fn serve(
    client: async_nats::Client,
    farm: Farm,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), FarmError> {
    let svc = client
        .service_builder()
        .description("vmlot OS Farm: VM images named by their recipe, built on demand")
        .start(subjects::FARM_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| FarmError::nats("start the farm service", e))?;
    let group = svc.group(subjects::API_PREFIX);
    let (queue, builds) = mpsc::channel(MAX_QUEUED);
    let shared = Arc::new(Shared {
        farm,
        client,
        in_flight: Mutex::new(InFlight::default()),
        queue,
    });
    tasks.spawn(builder(Arc::clone(&shared), builds, shutdown.clone()));
    for name in vmlot_schemas::api::FARM_ENDPOINTS {
        let endpoint = group
            .endpoint_builder()
            .name(name)
            .add(subjects::api_endpoint(name))
            .await
            .map_err(|e| FarmError::nats("add an endpoint", e))?;
        let shared = Arc::clone(&shared);
        let stop = shutdown.clone().cancelled_owned();
        tasks.spawn(async move {
            endpoint
                .take_until(stop)
                .for_each_concurrent(32, |request| {
                    let shared = Arc::clone(&shared);
                    async move { answer(&shared, name, request).await }
                })
                .await;
        });
    }
    shutdown.cancelled().await;
    let _ = svc.stop().await;
    Ok(())
}

async fn answer(shared: &Arc<Shared>, name: &str, request: service::Request) {
    let Some(reply) = request.message.reply.clone() else {
        return;
    };
    // Answers go only into an inbox, never onto a subject a caller chose.
    if !reply.starts_with(subjects::INBOX_PREFIX) {
        tracing::warn!(endpoint = name, %reply, "request not answered: its reply subject is not an inbox");
        return;
    }
    let caller = subjects::api_caller(&request.message.subject);
    let payload = request.message.payload.clone();
    let body = match (caller, name) {
        (None, _) => encode::<()>(Err(error("bad-request", "no caller in the subject"))),
        (Some(caller), _) if !may_use(&caller) => encode::<()>(Err(error(
            "forbidden",
            format!("{caller}: only submitters and operators use the farm"),
        ))),
        (Some(caller), n) if n == ImageBuild::NAME => {
            encode(build(shared, &caller, &payload, reply.as_str()).await)
        }
        (Some(_), n) if n == ImageList::NAME => encode(
            shared
                .farm
                .index
                .all()
                .await
                .map_err(|e| error("internal", e.to_string())),
        ),
        (Some(_), n) if n == ImageShow::NAME => encode(show(shared, &payload).await),
        (Some(_), n) => encode::<()>(Err(error("bad-request", format!("no endpoint {n}")))),
    };
    if let Err(e) = request.respond(Ok(body.into())).await {
        tracing::warn!(endpoint = name, %e, "could not answer");
    }
}

fn may_use(caller: &Caller) -> bool {
    matches!(caller.role, Role::Submitter | Role::Operator)
}

fn encode<T: serde::Serialize>(reply: Result<T, ApiError>) -> Vec<u8> {
    let reply = match reply {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e),
    };
    serde_json::to_vec(&reply).expect("a reply serializes")
}

async fn show(shared: &Shared, payload: &[u8]) -> Result<ImageRecord, ApiError> {
    let asked: RecipeRef = serde_json::from_slice(payload)
        .map_err(|e| error("bad-request", format!("malformed request: {e}")))?;
    shared
        .farm
        .index
        .get(&asked.recipe_id)
        .await
        .map_err(|e| error("internal", e.to_string()))?
        .ok_or_else(|| error("not-found", format!("no image of recipe {}", asked.recipe_id)))
}

/// A build request: answered from the index, or joined to its recipe's
/// build, or queued; progress goes to `reply` until the answer.
async fn build(
    shared: &Arc<Shared>,
    caller: &Caller,
    payload: &[u8],
    reply: &str,
) -> Result<Built, ApiError> {
    let asked: <ImageBuild as Endpoint>::Request = serde_json::from_slice(payload)
        .map_err(|e| error("bad-request", format!("malformed request: {e}")))?;
    asked
        .recipe
        .validate()
        .map_err(|e| error("bad-recipe", e.to_string()))?;
    let id = asked.recipe.id();
    if let Some(image) = shared
        .farm
        .index
        .get(&id)
        .await
        .map_err(|e| error("internal", e.to_string()))?
    {
        tracing::info!(recipe = %id, %caller, "built before: answered from the index");
        let image = shared
            .farm
            .rekit(image)
            .await
            .map_err(|e| error("internal", e.to_string()))?;
        return Ok(Built { image, built: false });
    }
    let mut events = {
        let mut in_flight = shared.in_flight.lock().expect("in-flight lock");
        match in_flight.builds.get(&id) {
            Some((_, tx)) => tx.subscribe(),
            None => {
                let mine = in_flight.builds.values().filter(|(c, _)| c == caller).count();
                if mine >= MAX_PER_CALLER {
                    return Err(error(
                        "busy",
                        format!("{caller} has {mine} builds waiting or running; at most {MAX_PER_CALLER}"),
                    ));
                }
                let request = BuildRequest {
                    version: asked.version,
                    recipe: asked.recipe.canonical(),
                };
                if shared.queue.try_send((id, request)).is_err() {
                    return Err(error(
                        "busy",
                        format!("{MAX_QUEUED} builds are waiting; try again later"),
                    ));
                }
                let (tx, rx) = broadcast::channel(256);
                in_flight.builds.insert(id, (caller.clone(), tx));
                rx
            }
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(subjects::PROGRESS_HEADER, "1");
    loop {
        match events.recv().await {
            Ok(Event::Progress(p)) => {
                let body = serde_json::to_vec(&p).expect("progress serializes");
                // Progress is best effort: a slow caller misses lines, not the answer.
                let _ = shared
                    .client
                    .publish_with_headers(reply.to_string(), headers.clone(), body.into())
                    .await;
            }
            Ok(Event::Done(result)) => return (*result).map(|image| Built { image, built: true }),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => {
                return Err(error(
                    "internal",
                    "the build ended without an answer (the farm is stopping)",
                ));
            }
        }
    }
}

/// Builds the queued recipes one at a time until `shutdown`.
async fn builder(
    shared: Arc<Shared>,
    mut builds: mpsc::Receiver<(RecipeId, BuildRequest)>,
    shutdown: CancellationToken,
) {
    loop {
        let (id, request) = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = builds.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        let tx = {
            let in_flight = shared.in_flight.lock().expect("in-flight lock");
            in_flight.builds.get(&id).map(|(_, tx)| tx.clone())
        };
        let Some(tx) = tx else { continue };
        let span = tracing::info_span!("build", recipe = %id);
        let started = Instant::now();
        let progress = {
            let tx = tx.clone();
            move |step: &str, line: &str| {
                tracing::debug!(step, line);
                let _ = tx.send(Event::Progress(BuildProgress {
                    recipe_id: id,
                    step: step.to_string(),
                    line: line.to_string(),
                }));
            }
        };
        // A build that ended between a request's look at the index and its
        // queueing: answer what it made rather than build the recipe again.
        if let Ok(Some(image)) = shared.farm.index.get(&id).await {
            finish(&shared, &id, &tx, Ok(image));
            continue;
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => Err(error("internal", "the farm is stopping")),
            r = tracing::Instrument::instrument(shared.farm.make(&request.recipe, &id, &progress), span.clone()) => r.map_err(|e| {
                tracing::warn!(parent: &span, error = %e, "build failed");
                error("build-failed", e.to_string())
            }),
        };
        if let Ok(image) = &result {
            tracing::info!(parent: &span, seconds = started.elapsed().as_secs_f64(), disk = %image.disk.manifest, sent_blocks = image.disk.sent_blocks, "image built and indexed");
        }
        finish(&shared, &id, &tx, result);
    }
}

/// A recipe's build is over: no longer in flight, its answer to every
/// request waiting on it.
fn finish(
    shared: &Shared,
    id: &RecipeId,
    tx: &broadcast::Sender<Event>,
    result: Result<ImageRecord, ApiError>,
) {
    shared.in_flight.lock().expect("in-flight lock").builds.remove(id);
    let _ = tx.send(Event::Done(Box::new(result)));
}
