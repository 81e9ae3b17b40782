//! Awards and cancels from the broker, on the provider's own subject. An
//! award is answered as soon as it is taken: from then on the attempt is
//! this provider's, and a crash costs only it. The attempt then waits for
//! a slot and runs ([`super::attempt`]); a cancel stops it.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use tracing::Instrument;
use vmlot_schemas::market::{ApiError, Award, CancelAttempt, Reply, ToProvider};

use super::attempt;
use super::span::{LotRef, Step};
use super::state::{Active, Daemon};

/// Answers awards and cancels until shutdown.
pub(super) async fn take_awards(daemon: Arc<Daemon>, mut messages: async_nats::Subscriber) {
    loop {
        let msg = tokio::select! {
            _ = daemon.shutdown.cancelled() => return,
            msg = messages.next() => match msg { Some(m) => m, None => return },
        };
        if vmlot_identity::echo::refuse(&msg.subject, msg.headers.as_ref()) {
            continue;
        }
        let answer: Reply<()> = match serde_json::from_slice::<ToProvider>(&msg.payload) {
            Ok(ToProvider::Award(award)) => {
                let span = LotRef::of(&award.lot).span(Step::Award, &daemon.config.id);
                let taken = span.in_scope(|| take(&daemon, *award));
                crate::metrics::award(taken.is_ok());
                match taken {
                    Ok(()) => Reply::Ok(()),
                    Err(reason) => Reply::Error(ApiError {
                        code: "refused".into(),
                        message: reason,
                    }),
                }
            }
            Ok(ToProvider::Cancel(cancel)) => {
                stop(&daemon, &cancel);
                Reply::Ok(())
            }
            Err(err) => {
                tracing::warn!(%err, "ignored malformed award message");
                Reply::Error(ApiError {
                    code: "bad-request".into(),
                    message: err.to_string(),
                })
            }
        };
        if let Some(reply) = msg.reply {
            let body = serde_json::to_vec(&answer).expect("answer serializes");
            let _ = daemon.client.publish(reply, body.into()).await;
        }
    }
}

/// Takes `award`: checks it is this provider's and still on time, then
/// starts its attempt in a task of the daemon's. A second copy of an award
/// already taken is answered as taken.
fn take(daemon: &Arc<Daemon>, award: Award) -> Result<(), String> {
    let lot = LotRef::of(&award.lot);
    if award.provider != daemon.config.id || award.deadline < Utc::now() {
        tracing::warn!("refused award: not ours or past its deadline");
        return Err("not this provider's award, or past its deadline".into());
    }
    if !daemon.drivers.contains_key(&award.lot.image.vm.hypervisor) {
        return Err(format!("no {:?} driver here", award.lot.image.vm.hypervisor));
    }
    let token = {
        let mut active = daemon.active.lock().expect("active lock");
        if active.contains_key(&lot.lot) {
            return Ok(());
        }
        let token = daemon.shutdown.child_token();
        active.insert(
            lot.lot,
            Active {
                token: token.clone(),
                lot,
            },
        );
        token
    };
    tracing::info!("award taken");
    let span = lot.span(Step::Award, &daemon.config.id);
    let daemon2 = Arc::clone(daemon);
    daemon.tasks.spawn(async move {
        let deadline = (award.deadline - Utc::now()).to_std().unwrap_or_default();
        let permit = async {
            tokio::select! {
                _ = token.cancelled() => None,
                permit = tokio::time::timeout(deadline, Arc::clone(&daemon2.slots).acquire_owned()) => permit.ok().and_then(Result::ok),
            }
        }
        .instrument(span.clone())
        .await;
        if let Some(_permit) = permit {
            crate::metrics::slot(1.0);
            let workdir = daemon2.config.work_dir.join(lot.lot.to_string());
            if let Err(err) = attempt::run(&daemon2, &award, &workdir, token).await {
                tracing::warn!(parent: &span, %err, "segment attempt failed");
                crate::metrics::segment_failed();
            }
            crate::metrics::slot(-1.0);
            let _ = std::fs::remove_dir_all(&workdir);
        } else {
            tracing::warn!(parent: &span, "award cancelled or past its deadline before a slot freed; not run");
        }
        daemon2.active.lock().expect("active lock").remove(&lot.lot);
    });
    Ok(())
}

/// The broker's cancel: stops the attempt if it is under way here.
fn stop(daemon: &Daemon, cancel: &CancelAttempt) {
    let active = daemon.active.lock().expect("active lock");
    match active.get(&cancel.lot) {
        Some(attempt) => {
            let span = attempt.lot.span(Step::Cancel, &daemon.config.id);
            span.in_scope(|| tracing::info!(reason = %cancel.reason, "segment cancelled"));
            attempt.token.cancel();
        }
        None => tracing::debug!(lot = %cancel.lot, "cancel of a lot not under way here"),
    }
}
