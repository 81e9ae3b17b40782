//! How every vmlot program presents itself to NATS: its credentials (and
//! so its inbox, the one place its replies may come), the CA that signs the
//! server's certificate, or, only when asked for by name, nothing at all.

use std::path::PathBuf;
use std::time::Duration;

use crate::{Creds, IdentityError};

/// What a program connects with: `--creds`, `--tls-ca` and `--open` (and
/// their environment variables), flattened into each binary's flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Access {
    /// The user's NATS credentials file (from `vmlot admin add`).
    #[arg(long, env = "VMLOT_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// The CA certificate the server's TLS certificate must chain to;
    /// given, the connection must be TLS.
    #[arg(long, env = "VMLOT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Connect with no credentials, to a server that asks for none: anyone
    /// on it may then be anyone (a developer's machine, a closed pool).
    #[arg(long, env = "VMLOT_OPEN", global = true)]
    pub open: bool,
}

/// Neither credentials nor `--open`: refused rather than guessed.
#[derive(Debug, thiserror::Error)]
#[error(
    "no credentials: pass --creds FILE (from `vmlot admin add`), or --open for a server without authentication"
)]
pub struct NoCredentials;

impl Access {
    /// The connect options: credentials and the inbox they allow, TLS.
    /// Returns who the credentials name, if any.
    pub fn options(&self) -> Result<(async_nats::ConnectOptions, Option<Creds>), IdentityError> {
        let mut opts = async_nats::ConnectOptions::new();
        let creds = match (&self.creds, self.open) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(IdentityError::io(path))?;
                let creds = Creds::parse(path, &text)?;
                opts = opts
                    .credentials(&text)
                    .map_err(|e| IdentityError::Creds {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                    .custom_inbox_prefix(creds.inbox_prefix());
                Some(creds)
            }
            (None, true) => None,
            (None, false) => return Err(IdentityError::Unauthenticated(NoCredentials)),
        };
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok((opts, creds))
    }
}

/// Connects a daemon to the comma-separated `urls` with `options`: it
/// retries until a server answers (and reconnects for ever after), and
/// returns once the first connection is up, so the server's INFO (whether
/// it checks identities) is known.
pub async fn connect_daemon(
    urls: &str,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, IdentityError> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::Connect {
            urls: urls.to_string(),
            reason: format!("bad server address: {e}"),
        })?;
    let client = options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .map_err(|e| IdentityError::Connect {
            urls: urls.to_string(),
            reason: e.to_string(),
        })?;
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(client)
}
