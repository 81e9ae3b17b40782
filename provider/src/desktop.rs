//! The machine owner at the desktop: someone is using a graphical session
//! when systemd-logind says one is active and not idle (`IdleHint=no`).
//! The desktop environment sets that hint from input: it turns idle after
//! the environment's own idle delay without a key or pointer event (GNOME:
//! 5 minutes by default), so this is input idle time as the desktop itself
//! counts it, for every kind of session (X11, Wayland) alike.
//!
//! Read through `loginctl` (bounded by `timeout`), at most every
//! [`REFRESH`]: a machine without logind, or with no graphical session,
//! has nobody at the desktop. The parsing is pure ([`session_ids`],
//! [`in_use`]); only [`Desktop::in_use`] runs anything.
//!
//! Not run against a live desktop session: the machines this was written
//! and tested on have none (no logind running).

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an answer stands: each asks `loginctl` twice or more.
pub const REFRESH: Duration = Duration::from_secs(10);
/// Longest a `loginctl` call may take (it waits up to 25 s for D-Bus).
const LOGINCTL_TIMEOUT: &str = "2";

/// The session ids in `loginctl list-sessions --no-legend` (the first
/// column of each line).
pub fn session_ids(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|id| id.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(str::to_string)
        .collect()
}

/// Whether a session's `loginctl show-session ID -p Type -p Active -p
/// IdleHint` says someone uses it: a graphical session, active, not idle.
pub fn in_use(properties: &str) -> bool {
    let value = |key: &str| {
        properties
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
    };
    matches!(value("Type"), Some("x11" | "wayland" | "mir"))
        && value("Active") == Some("yes")
        && value("IdleHint") == Some("no")
}

/// Runs `loginctl ARGS` under `timeout`: its output, or `None` when it is
/// missing, fails or takes too long.
fn loginctl(args: &[&str]) -> Option<String> {
    let out = Command::new("timeout")
        .arg(LOGINCTL_TIMEOUT)
        .arg("loginctl")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asks logind now: true when a graphical session is in use.
fn someone_at_the_desktop() -> bool {
    let Some(listing) = loginctl(&["list-sessions", "--no-legend"]) else {
        return false;
    };
    session_ids(&listing).iter().any(|id| {
        loginctl(&["show-session", id, "-p", "Type", "-p", "Active", "-p", "IdleHint"])
            .is_some_and(|props| in_use(&props))
    })
}

/// The desktop's answer, asked at most every [`REFRESH`].
#[derive(Default)]
pub struct Desktop {
    last: Mutex<Option<(Instant, bool)>>,
}

impl Desktop {
    /// True while someone uses a graphical session of this machine.
    pub fn in_use(&self) -> bool {
        let mut last = self.last.lock().expect("desktop lock");
        if let Some((at, answer)) = *last
            && at.elapsed() < REFRESH
        {
            return answer;
        }
        let answer = someone_at_the_desktop();
        *last = Some((Instant::now(), answer));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_listed_by_their_first_column() {
        let listing = "      2 1000 alice seat0 tty2\n     c1  120 gdm   seat0 tty1\n";
        assert_eq!(session_ids(listing), ["2", "c1"]);
        assert!(session_ids("").is_empty());
    }

    #[test]
    fn only_an_active_graphical_session_not_idle_is_in_use() {
        assert!(in_use("Type=wayland\nActive=yes\nIdleHint=no\n"));
        assert!(in_use("IdleHint=no\nType=x11\nActive=yes\n"));
        assert!(!in_use("Type=wayland\nActive=yes\nIdleHint=yes\n"));
        assert!(!in_use("Type=x11\nActive=no\nIdleHint=no\n"));
        // A text console or an ssh login is not the desktop: the owner's
        // programs there count through their CPU time.
        assert!(!in_use("Type=tty\nActive=yes\nIdleHint=no\n"));
        assert!(!in_use(""));
    }

    #[test]
    fn an_answer_stands_for_its_refresh_time() {
        let desktop = Desktop::default();
        let first = desktop.in_use();
        let asked = desktop.last.lock().unwrap().unwrap().0;
        assert_eq!(desktop.in_use(), first);
        assert_eq!(
            desktop.last.lock().unwrap().unwrap().0,
            asked,
            "asked logind again"
        );
    }
}
