//! What can go wrong in the farm, per operation.

use std::path::{Path, PathBuf};

/// A build that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{program} could not run: {error} (is it installed? `make deps` installs mmdebstrap)")]
    Spawn { program: String, error: String },
    #[error("the {step} step failed ({status}); its last lines:\n{tail}")]
    Step {
        step: &'static str,
        status: String,
        tail: String,
    },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the recipe cannot be built: {0}")]
    Recipe(String),
    #[error("storing the image: {0}")]
    Store(#[from] vmlot_cas::CasError),
}

impl BuildError {
    pub fn io(what: &'static str, path: &Path, error: std::io::Error) -> Self {
        BuildError::Io {
            what,
            path: path.to_path_buf(),
            error,
        }
    }
}

/// The farm could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    #[error("NATS: {what}: {error}")]
    Nats { what: &'static str, error: String },
    #[error("the block store: {0}")]
    Store(#[from] vmlot_cas::CasError),
    #[error("the boot kit: {0}")]
    Kit(String),
}

impl FarmError {
    pub fn nats(what: &'static str, error: impl std::fmt::Display) -> Self {
        FarmError::Nats {
            what,
            error: error.to_string(),
        }
    }
}
