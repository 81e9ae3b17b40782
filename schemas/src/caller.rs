//! Who is asking: a participant's role and name, as its credentials give
//! them. Among strangers nobody says who they are in a message's body: the
//! caller is read off the subject a request arrives on, and NATS lets each
//! user publish only under its own role and name (see `vmlot-identity`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a participant may do in the market.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the market (the one trusted participant besides NATS).
    Broker,
    /// Sells time segments of its machine.
    Provider,
    /// Buys segments for its jobs with its own money.
    Submitter,
    /// Funds accounts and sees every job (the house's own people).
    Operator,
    /// Reads the books.
    Accountant,
}

impl Role {
    /// Every role, in the order the permission table lists them.
    pub const ALL: [Role; 5] = [
        Role::Broker,
        Role::Provider,
        Role::Submitter,
        Role::Operator,
        Role::Accountant,
    ];

    /// The role's subject token and written name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Provider => "provider",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Accountant => "accountant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role that is not one of [`Role::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}: want broker, provider, submitter, operator or accountant")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// True when `name` may name a participant: 1 to 64 of `A-Z a-z 0-9 _ -`,
/// so it is one subject token and one ledger account name.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An authenticated participant: its role and its name within the role (a
/// provider's name is its [`crate::ProviderId`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    pub role: Role,
    pub name: String,
}

impl Caller {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// A caller not written `ROLE/NAME`.
#[derive(Debug, thiserror::Error)]
#[error("bad caller {0:?}: want ROLE/NAME (e.g. submitter/alice)")]
pub struct BadCaller(pub String);

impl FromStr for Caller {
    type Err = BadCaller;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCaller(s.to_string());
        let (role, name) = s.split_once('/').ok_or_else(bad)?;
        let role: Role = role.parse().map_err(|_| bad())?;
        if !valid_name(name) {
            return Err(bad());
        }
        Ok(Caller::new(role, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_round_trip_and_hostile_names_are_refused() {
        let c: Caller = "submitter/alice".parse().unwrap();
        assert_eq!(c, Caller::new(Role::Submitter, "alice"));
        assert_eq!(c.to_string().parse::<Caller>().unwrap(), c);
        for bad in [
            "alice",
            "king/alice",
            "submitter/",
            "submitter/a.b",
            "submitter/*",
            "submitter/>",
        ] {
            assert!(bad.parse::<Caller>().is_err(), "{bad}");
        }
        assert!(!valid_name(&"x".repeat(65)));
    }
}
