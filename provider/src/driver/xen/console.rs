//! A Xen guest's console for one segment. xenconsoled (`--log=guest`)
//! writes each domain's console to `<console_dir>/guest-<name>.log`; a
//! domain name is never reused, so that file holds exactly this segment's
//! output. It is read once the domain is gone and its size has settled,
//! then deleted.
//!
//! Output the guest wrote but xenconsoled had not yet read at save time
//! stays in the console ring page, which is part of the saved memory of a
//! PV guest, and is read out after the restore; the consoles of a job's
//! segments, concatenated, are the console of an uninterrupted run. (A PVH
//! restore clears the console page: up to one ring of unread output can be
//! lost there.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::api::DriverError;
use crate::driver::host::io_err;

/// Where xenconsoled `--log=guest` writes guest consoles by default.
pub const DEFAULT_CONSOLE_DIR: &str = "/var/log/xen/console";

/// xenconsoled drains the ring asynchronously: the log is complete once
/// its size has not changed for this long…
const CONSOLE_SETTLE: Duration = Duration::from_millis(300);
const CONSOLE_POLL: Duration = Duration::from_millis(50);
/// …or, at the latest, after this long.
const CONSOLE_MAX_WAIT: Duration = Duration::from_secs(10);

/// The log xenconsoled keeps for the domain `name`.
pub(crate) fn log_path(console_dir: &Path, name: &str) -> PathBuf {
    console_dir.join(format!("guest-{name}.log"))
}

/// Waits until xenconsoled has stopped appending to `path`.
pub(crate) async fn settle(path: &Path) {
    let size = || std::fs::metadata(path).map(|m| m.len()).ok();
    let started = Instant::now();
    let mut last = size();
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(CONSOLE_POLL).await;
        let now = size();
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= CONSOLE_SETTLE {
            return;
        }
        if started.elapsed() >= CONSOLE_MAX_WAIT {
            tracing::warn!(path = %path.display(), "console log still growing; taken as it stands");
            return;
        }
    }
}

/// The segment's console once the domain is gone: the whole log file,
/// which is then deleted.
pub(crate) async fn take(path: &Path) -> Result<Vec<u8>, DriverError> {
    settle(path).await;
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                path = %path.display(),
                "no console log: is xenconsoled running with --log=guest?"
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(io_err("read", path, e)),
    };
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), "removing console log: {e}");
    }
    Ok(bytes)
}
