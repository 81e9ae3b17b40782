//! Test machinery, compiled only with the `fault-injection` feature (the
//! tests and benchmarks enable it; release builds do not, so they carry
//! neither the switch nor its name): the fault tests kill the broker at an
//! exact step by naming it in `VMLOT_FAULT`, read once.

/// True when the environment asks for fault `point` (`VMLOT_FAULT`).
fn injected(point: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT.get_or_init(|| std::env::var("VMLOT_FAULT").ok()).as_deref() == Some(point)
}

/// Dies on the spot, between writing a settlement and recording it in the
/// job, when `VMLOT_FAULT=crash-after-settlement`.
pub(crate) fn crash_after_settlement() {
    if injected("crash-after-settlement") {
        tracing::error!("fault injected: dying between settlement and the next lot");
        std::process::abort();
    }
}
