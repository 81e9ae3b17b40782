//! When a daemon stops: SIGINT or SIGTERM, whichever comes first.

use tokio::signal::unix::{SignalKind, signal};

/// Completes at the first SIGINT or SIGTERM (only SIGINT where SIGTERM's
/// handler cannot be installed).
pub async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated => {}
    }
}
