//! Who is who in a vmlot market, with NATS decentralized authentication:
//! one operator signs the accounts, each account's per-role signing keys
//! sign its users, and the server checks every connection against that
//! chain, so a participant is whoever its credentials say and can do only
//! what its role's template allows.
//!
//! - [`grants`]: each role's permissions (pure; the table in
//!   `docs/ARCHITECTURE.md` is checked against it).
//! - [`deployment`]: a deployment's keys, the server's configuration, and
//!   new users' credentials.
//! - [`creds`]: reading a credentials file (who it names, its inbox).
//! - [`connect`]: how a program connects: credentials, TLS, or open; how
//!   a daemon waits for its first connection.
//! - [`tls`]: the deployment's CA and the server's certificate.
//! - [`echo`]: telling a message the server handed back from one its
//!   subject's owner published.

pub mod connect;
pub mod creds;
pub mod deployment;
pub mod echo;
pub mod error;
pub mod grants;
pub mod tls;

pub use connect::{Access, connect_daemon};
pub use creds::Creds;
pub use deployment::Deployment;
pub use error::IdentityError;
pub use grants::{Grants, grants};
