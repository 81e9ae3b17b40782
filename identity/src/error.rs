//! What can go wrong setting up or reading identities.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already holds a deployment (operator.jwt): refusing to overwrite its keys")]
    Exists(PathBuf),
    #[error("{0} holds no deployment (no operator.jwt): run `vmlot admin init` first")]
    NoDeployment(PathBuf),
    #[error("bad key in {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("bad name {0:?} for a {1}: {2}")]
    Name(String, vmlot_schemas::caller::Role, &'static str),
    #[error(transparent)]
    Unauthenticated(#[from] crate::connect::NoCredentials),
    #[error("bad credentials {path}: {reason}")]
    Creds { path: PathBuf, reason: String },
    #[error("connecting to {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("making the deployment's TLS certificates: {0}")]
    Tls(String),
}

impl IdentityError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| IdentityError::Io { path, source }
    }
}
