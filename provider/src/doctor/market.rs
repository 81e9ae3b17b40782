//! The doctor's checks of what the daemon connects with: its settings, its
//! credentials (a provider's), and the NATS server they open.

use std::path::Path;
use std::time::Duration;

use async_nats::ConnectErrorKind;
use vmlot_identity::{Access, Creds};
use vmlot_schemas::ProviderId;

use super::{Check, Status};
use crate::config::{ProviderConfig, Settings};

/// How long the NATS server has to accept the connection (TCP, TLS, the
/// credentials' challenge, a PING answered).
pub const NATS_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings load (file, environment, flags) and name drivers this
/// build has. On failure the other checks use the defaults.
pub(super) fn settings_check(settings: &Settings) -> (Check, ProviderConfig) {
    let config = match ProviderConfig::load(settings) {
        Ok(config) => config,
        Err(e) => {
            let check = Check::new(
                "settings",
                Status::Missing,
                format!("{e}: fix the file, variable or flag (the checks below use the defaults)"),
            );
            return (check, ProviderConfig::default());
        }
    };
    let source = match &settings.config {
        Some(path) => format!("{} read", path.display()),
        None => "no settings file (--config): defaults, environment and flags".to_string(),
    };
    let check = match crate::setup::drivers(&config) {
        Ok(_) => {
            let offers: Vec<&str> = config.hypervisors.iter().map(|k| k.as_str()).collect();
            Check::new(
                "settings",
                Status::Ok,
                format!(
                    "{source}; offers {}, {} slot(s) of up to {} MiB",
                    offers.join(", "),
                    config.slots,
                    config.memory_mib
                ),
            )
        }
        Err(e) => Check::new("settings", Status::Missing, format!("{source}; {e}")),
    };
    (check, config)
}

/// The credentials file names a provider (its name a provider id, equal
/// to the settings' id if one is set), as the daemon requires.
pub(super) fn credentials(access: &Access, settings_id: Option<ProviderId>) -> Check {
    const NAME: &str = "credentials";
    let Some(path) = &access.creds else {
        return if access.open {
            Check::new(
                NAME,
                Status::Warning,
                "--open: no credentials, for a server that asks for none (anyone on it may be anyone); \
                 the provider's id is its settings' id",
            )
        } else {
            Check::new(
                NAME,
                Status::Missing,
                "none given: pass --creds FILE or set VMLOT_CREDS (a provider's, from `vmlot admin add provider`)",
            )
        };
    };
    let creds = match Creds::load(path) {
        Ok(creds) => creds,
        Err(e) => return Check::new(NAME, Status::Missing, e.to_string()),
    };
    match crate::setup::identity(&creds.caller, settings_id) {
        Ok(id) => Check::new(
            NAME,
            Status::Ok,
            format!("{} names provider {id}", path.display()),
        ),
        Err(e) => Check::new(
            NAME,
            Status::Missing,
            format!(
                "{}: {e}; use a provider's credentials (`vmlot admin add provider`)",
                path.display()
            ),
        ),
    }
}

/// The NATS server accepts a connection with these credentials and CA
/// within [`NATS_TIMEOUT`].
pub(super) async fn nats(urls: &str, access: &Access) -> Check {
    const NAME: &str = "nats";
    if let Some(ca) = &access.tls_ca
        && let Err(e) = std::fs::metadata(ca)
    {
        return Check::new(NAME, Status::Missing, format!("the TLS CA {}: {e}", ca.display()));
    }
    let options = match access.options() {
        Ok((options, _)) => options,
        Err(e) => return Check::new(NAME, Status::Missing, format!("cannot connect to {urls}: {e}")),
    };
    let addrs: Result<Vec<async_nats::ServerAddr>, _> = urls.split(',').map(|u| u.trim().parse()).collect();
    let addrs = match addrs {
        Ok(addrs) => addrs,
        Err(e) => {
            return Check::new(
                NAME,
                Status::Missing,
                format!("bad server URL in {urls:?}: {e} (want nats://HOST:PORT, comma-separated)"),
            );
        }
    };
    let connect = options.connection_timeout(NATS_TIMEOUT).connect(addrs);
    let client = match tokio::time::timeout(NATS_TIMEOUT + Duration::from_secs(1), connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            let why = connect_failure(e.kind(), &e.to_string(), urls, access.tls_ca.as_deref());
            return Check::new(NAME, Status::Missing, why);
        }
        Err(_) => {
            let why = connect_failure(
                ConnectErrorKind::TimedOut,
                "timed out",
                urls,
                access.tls_ca.as_deref(),
            );
            return Check::new(NAME, Status::Missing, why);
        }
    };
    let info = client.server_info();
    let server = format!(
        "connected to {urls} (nats-server {} {})",
        info.version, info.server_name
    );
    match &access.tls_ca {
        Some(ca) => Check::new(
            NAME,
            Status::Ok,
            format!("{server}, TLS checked against {}", ca.display()),
        ),
        None if info.tls_required => Check::new(NAME, Status::Ok, format!("{server}, TLS (system roots)")),
        None => Check::new(
            NAME,
            Status::Warning,
            format!(
                "{server}, without TLS: the market's traffic crosses the network in clear; \
                 pass the deployment's CA with --tls-ca (VMLOT_TLS_CA)"
            ),
        ),
    }
}

/// Says in words why connecting to `urls` failed, from the error's kind
/// (and, for I/O errors, its text): unreachable, TLS, or the credentials.
pub fn connect_failure(kind: ConnectErrorKind, error: &str, urls: &str, tls_ca: Option<&Path>) -> String {
    let tls_hint = match tls_ca {
        Some(ca) => format!(
            "the server's certificate must chain to {} and name the host in the URL",
            ca.display()
        ),
        None => "pass the deployment's CA with --tls-ca (VMLOT_TLS_CA)".to_string(),
    };
    let lower = error.to_ascii_lowercase();
    let refused = "the server refused the credentials: they belong to another deployment, \
                   or were revoked or expired; ask the operator for new ones (`vmlot admin add provider`)";
    match kind {
        ConnectErrorKind::AuthorizationViolation => format!("{refused} ({error})"),
        ConnectErrorKind::Authentication => format!(
            "the credentials could not answer the server's challenge ({error}): is the seed in the file intact?"
        ),
        ConnectErrorKind::Tls => format!("TLS failed with {urls} ({error}): {tls_hint}"),
        ConnectErrorKind::Dns => format!("could not reach the server: {urls} does not resolve ({error})"),
        ConnectErrorKind::ServerParse => format!("bad server URL {urls:?} ({error})"),
        ConnectErrorKind::TimedOut => format!(
            "could not reach the server at {urls}: no answer within {}s (a firewall, or the wrong host?)",
            NATS_TIMEOUT.as_secs()
        ),
        _ if lower.contains("tls") || lower.contains("certificate") => {
            format!("TLS failed with {urls} ({error}): {tls_hint}")
        }
        _ if lower.contains("authorization") || lower.contains("authentication") => {
            format!("{refused} ({error})")
        }
        _ => format!(
            "could not reach the server at {urls} ({error}): is nats-server running there and the port open?"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_failures_say_which_step_failed() {
        let url = "nats://127.0.0.1:1";
        let io = connect_failure(
            ConnectErrorKind::Io,
            "IO error: Connection refused (os error 111)",
            url,
            None,
        );
        assert!(io.starts_with("could not reach the server"), "{io}");
        let timed = connect_failure(ConnectErrorKind::TimedOut, "timed out", url, None);
        assert!(timed.starts_with("could not reach the server"), "{timed}");
        let ca = Path::new("/etc/vmlot/ca.pem");
        let tls = connect_failure(ConnectErrorKind::Tls, "TLS error: UnknownIssuer", url, Some(ca));
        assert!(
            tls.starts_with("TLS failed") && tls.contains("/etc/vmlot/ca.pem"),
            "{tls}"
        );
        let tls_io = connect_failure(ConnectErrorKind::Io, "IO error: tls handshake eof", url, None);
        assert!(
            tls_io.starts_with("TLS failed") && tls_io.contains("--tls-ca"),
            "{tls_io}"
        );
        let denied = connect_failure(
            ConnectErrorKind::AuthorizationViolation,
            "authorization violation",
            url,
            None,
        );
        assert!(
            denied.starts_with("the server refused the credentials"),
            "{denied}"
        );
    }
}
