//! Test machinery, compiled only with the `fault-injection` feature (the
//! tests and benchmarks enable it; release builds do not, so they carry
//! neither the switch nor its name): the fault tests kill the broker at an
//! exact step by naming it in `VMLOT_FAULT`, read once.

/// True when the environment asks for fault `point` (`VMLOT_FAULT`).
fn injected(point: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("VMLOT_FAULT").ok()).as_deref() == Some(point)
}

/// Dies on the spot, between recording a settled segment in its job and
/// paying it, when `VMLOT_FAULT=crash-before-payment`.
pub(crate) fn crash_before_payment() {
    if injected("crash-before-payment") {
        tracing::error!("fault injected: dying between recording a settlement and paying it");
        std::process::abort();
    }
}

/// Stalls the first settlement this broker makes, after its result was
/// checked and before it is recorded, for [`STALL`], deaf to shutdown and
/// to the loss of the job's partition (as a task stuck in a request to a
/// lost NATS node is), when `VMLOT_FAULT=stall-before-settlement`.
pub(crate) async fn stall_before_settlement() {
    static STALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if injected("stall-before-settlement") && !STALLED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tracing::error!(
            seconds = STALL.as_secs(),
            "fault injected: stalling before settlement"
        );
        tokio::time::sleep(STALL).await;
        tracing::error!("fault injected: stall over");
    }
}

/// How long [`stall_before_settlement`] stalls.
const STALL: std::time::Duration = std::time::Duration::from_secs(15);
