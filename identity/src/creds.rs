//! A NATS credentials file: the user's JWT (signed by its account, so it
//! cannot be edited) and its private seed. From the JWT a participant
//! learns who the market takes it for: its role, its name and the inbox
//! where its replies arrive.

use std::path::{Path, PathBuf};

use data_encoding::BASE64URL_NOPAD;
use serde::Deserialize;
use vmlot_schemas::caller::{Caller, Role};
use vmlot_schemas::subjects;

use crate::IdentityError;

/// The tag a user's JWT carries its role in: `role:<role>`.
pub const ROLE_TAG: &str = "role:";

const JWT_BEGIN: &str = "-----BEGIN NATS USER JWT-----";
const JWT_END: &str = "------END NATS USER JWT------";
const SEED_BEGIN: &str = "-----BEGIN USER NKEY SEED-----";
const SEED_END: &str = "------END USER NKEY SEED------";

/// A user's credentials.
#[derive(Clone, Debug)]
pub struct Creds {
    pub path: PathBuf,
    pub jwt: String,
    /// The user's public key (the JWT's subject).
    pub public_key: String,
    /// Who the user is in the market.
    pub caller: Caller,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    nats: NatsClaims,
}

#[derive(Default, Deserialize)]
struct NatsClaims {
    #[serde(default)]
    tags: Vec<String>,
}

impl Creds {
    /// Reads and decodes the credentials file at `path`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(IdentityError::io(path))?;
        Self::parse(path, &text)
    }

    /// Decodes credentials already read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, IdentityError> {
        let bad = |reason: &str| IdentityError::Creds {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let jwt = between(text, JWT_BEGIN, JWT_END).ok_or_else(|| bad("no user JWT"))?;
        between(text, SEED_BEGIN, SEED_END).ok_or_else(|| bad("no user seed"))?;
        let payload = jwt
            .split('.')
            .nth(1)
            .ok_or_else(|| bad("the JWT has no claims"))?;
        let payload = BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .map_err(|_| bad("the JWT's claims are not base64url"))?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|e| bad(&format!("the JWT's claims: {e}")))?;
        let role = claims
            .nats
            .tags
            .iter()
            .find_map(|t| t.strip_prefix(ROLE_TAG))
            .ok_or_else(|| bad("the JWT has no role tag (not made by `vmlot admin add`)"))?;
        let role: Role = role
            .parse()
            .map_err(|e: vmlot_schemas::caller::UnknownRole| bad(&e.to_string()))?;
        let name = claims.name.ok_or_else(|| bad("the JWT names no user"))?;
        if !vmlot_schemas::caller::valid_name(&name) {
            return Err(bad("the JWT's user name is not a valid participant name"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            jwt: jwt.to_string(),
            public_key: claims.sub,
            caller: Caller::new(role, name),
        })
    }

    /// Where this user's replies arrive (and where only it may listen).
    pub fn inbox_prefix(&self) -> String {
        subjects::inbox_of(&self.public_key)
    }
}

/// The credentials file text for `jwt` and `seed`, as `nsc` writes it.
pub fn format(jwt: &str, seed: &str) -> String {
    format!(
        "{JWT_BEGIN}\n{jwt}\n{JWT_END}\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         {SEED_BEGIN}\n{seed}\n{SEED_END}\n\n\
         *************************************************************\n"
    )
}

fn between<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let start = text.find(begin)? + begin.len();
    let len = text[start..].find(end)?;
    Some(text[start..start + len].trim()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let p = Path::new("x.creds");
        assert!(Creds::parse(p, "").is_err());
        let no_claims = format("abc", "SUA");
        assert!(
            Creds::parse(p, &no_claims)
                .unwrap_err()
                .to_string()
                .contains("claims")
        );
    }
}
