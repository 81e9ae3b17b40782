//! A deployment: the operator's keys, its accounts, and the part of the
//! nats-server configuration that makes the server check them. Users are
//! added by signing a JWT with the role's signing key: nothing on the
//! server changes, so a new participant joins a running market.
//!
//! On disk (`dir`): `operator.jwt`; `keys/` the seeds (secret, mode
//! 0600); `accounts/` the account JWTs; `auth.conf` for the server to
//! `include` (it turns TLS on); `tls/` the deployment's CA (`ca.pem`, for
//! clients) and the server's certificate and key; `creds/ROLE-NAME.creds`
//! the users' credentials
//! (`creds/broker-books.creds`: the broker's user in the books' account).
//!
//! Accounts: `SYS` (the server's), `MARKET` (every participant, the
//! market's subjects and the block store) and `BOOKS` (the ledger stream
//! and the job records; only the broker has a user there; `MARKET`
//! imports their info and direct gets under `vmlot.books`).

use std::path::{Path, PathBuf};

use nats_io_jwt::{
    Account, Export, ExportType, Exports, Import, Imports, KeyPair, Operator, OperatorLimits, Permission,
    RenamingSubject, ResponsePermission, ResponseType, SigningKeys, SigningKeysItem, StringList, Subject,
    SystemAccount, TagList, Token, User, UserPermissionLimits, UserScope,
};
use vmlot_schemas::caller::{Role, valid_name};

use crate::grants::{BooksExport, books_exports, grants};
use crate::{IdentityError, creds};

/// The operator's name in its JWT.
pub const OPERATOR: &str = "vmlot";
/// The account every market participant and the market's streams live in.
pub const MARKET: &str = "MARKET";
/// The server's own account (monitoring, the resolver).
pub const SYSTEM: &str = "SYS";
/// The account the books (ledger stream, job records) live in: only the
/// broker has a user in it; the market account imports read-only views.
pub const BOOKS: &str = "BOOKS";
/// The broker's user in [`BOOKS`]: `creds/broker-books.creds`.
pub const BOOKS_USER: &str = "books";

/// A deployment's directory.
#[derive(Clone, Debug)]
pub struct Deployment {
    dir: PathBuf,
}

impl Deployment {
    /// Creates a new deployment in `dir` (made if missing): fresh operator,
    /// accounts and signing keys, the server's `auth.conf`, and the
    /// broker's credentials. Refuses a directory that already holds one.
    pub fn create(dir: &Path) -> Result<Self, IdentityError> {
        let hosts: Vec<String> = crate::tls::DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
        Self::create_for(dir, &hosts)
    }

    /// [`Deployment::create`] with a server certificate for `hosts` (the
    /// names and addresses clients reach the server by).
    pub fn create_for(dir: &Path, hosts: &[String]) -> Result<Self, IdentityError> {
        if dir.join("operator.jwt").exists() {
            return Err(IdentityError::Exists(dir.to_path_buf()));
        }
        for sub in ["keys", "accounts", "creds", "tls"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(IdentityError::io(dir.join(sub)))?;
        }
        let d = Self {
            dir: dir.to_path_buf(),
        };
        let operator = KeyPair::new_operator();
        let operator_signing = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let market = KeyPair::new_account();
        let books = KeyPair::new_account();
        d.write_seed("operator", &operator)?;
        d.write_seed("operator-signing", &operator_signing)?;
        d.write_seed(SYSTEM, &system)?;
        d.write_seed(MARKET, &market)?;
        d.write_seed(BOOKS, &books)?;

        let operator_jwt = Token::new(operator.public_key())
            .name(OPERATOR)
            .claims(Operator {
                signing_keys: Some(SigningKeys::from(&operator_signing)),
                system_account: Some(SystemAccount(system.public_key())),
                ..Default::default()
            })
            .sign(&operator);
        d.write("operator.jwt", &operator_jwt, false)?;

        let system_jwt = Token::new(system.public_key())
            .name(SYSTEM)
            .claims(Account {
                limits: Some(OperatorLimits {
                    disk_storage: 0,
                    mem_storage: 0,
                    streams: 0,
                    consumer: 0,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .sign(&operator_signing);
        d.write(format!("accounts/{SYSTEM}.jwt"), &system_jwt, false)?;

        let books_jwt = Token::new(books.public_key())
            .name(BOOKS)
            .claims(Account {
                exports: Some(Exports(books_exports().into_iter().map(export).collect())),
                limits: Some(OperatorLimits::default()),
                ..Default::default()
            })
            .sign(&operator_signing);
        d.write(format!("accounts/{BOOKS}.jwt"), &books_jwt, false)?;

        let mut scopes = Vec::new();
        for role in Role::ALL {
            let key = KeyPair::new_account();
            d.write_seed(&role_key(role), &key)?;
            scopes.push(SigningKeysItem::UserScope(scope(role, &key)));
        }
        let market_jwt = Token::new(market.public_key())
            .name(MARKET)
            .claims(Account {
                signing_keys: Some(SigningKeys(scopes)),
                imports: Some(Imports(
                    books_exports()
                        .into_iter()
                        .map(|e| import(&books.public_key(), e))
                        .collect(),
                )),
                limits: Some(OperatorLimits::default()),
                ..Default::default()
            })
            .sign(&operator_signing);
        d.write(format!("accounts/{MARKET}.jwt"), &market_jwt, false)?;

        let tls = crate::tls::generate(hosts)?;
        d.write("tls/ca.pem", &tls.ca_cert, false)?;
        d.write("tls/ca-key.pem", &tls.ca_key, true)?;
        d.write("tls/server-cert.pem", &tls.server_cert, false)?;
        d.write("tls/server-key.pem", &tls.server_key, true)?;
        let abs = std::path::absolute(dir).map_err(IdentityError::io(dir))?;
        let conf = format!(
            "# vmlot deployment: NATS decentralized authentication and TLS (written by `vmlot admin init`).\n\
             tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  timeout: 5\n}}\n\
             operator: \"{operator_jwt}\"\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: \"{system_jwt}\"\n  {mkt}: \"{market_jwt}\"\n  {bks}: \"{books_jwt}\"\n}}\n",
            sys = system.public_key(),
            mkt = market.public_key(),
            bks = books.public_key(),
            cert = abs.join("tls/server-cert.pem").display(),
            key = abs.join("tls/server-key.pem").display(),
        );
        d.write("auth.conf", &conf, false)?;
        d.add(Role::Broker, "broker")?;
        d.add_books_keeper()?;
        Ok(d)
    }

    /// The deployment already in `dir`.
    pub fn open(dir: &Path) -> Result<Self, IdentityError> {
        if !dir.join("operator.jwt").exists() {
            return Err(IdentityError::NoDeployment(dir.to_path_buf()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server configuration's authentication part, for `include`.
    pub fn auth_conf(&self) -> PathBuf {
        self.dir.join("auth.conf")
    }

    /// The CA certificate clients check the server's against (`--tls-ca`).
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// Where `role`'s user `name` keeps its credentials.
    pub fn creds_path(&self, role: Role, name: &str) -> PathBuf {
        self.dir.join("creds").join(format!("{role}-{name}.creds"))
    }

    /// Issues credentials to a new user `name` of `role` and writes them to
    /// [`Deployment::creds_path`] (again: new keys, the old file replaced;
    /// the old credentials stay valid). A provider's name is its id, a
    /// UUID; other names are 1-64 of `A-Z a-z 0-9 _ -`.
    pub fn add(&self, role: Role, name: &str) -> Result<PathBuf, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::Name(
                name.into(),
                role,
                "want 1-64 of A-Z a-z 0-9 _ -",
            ));
        }
        if role == Role::Provider && name.parse::<vmlot_schemas::ProviderId>().is_err() {
            return Err(IdentityError::Name(
                name.into(),
                role,
                "a provider's name is its id, a UUID",
            ));
        }
        let market = self.public_key(MARKET)?;
        let signer = self.seed(&role_key(role))?;
        let user = KeyPair::new_user();
        let jwt = Token::new(user.public_key())
            .name(name)
            .claims(User {
                issuer_account: Some(market),
                bearer_token: false,
                tags: Some(TagList(vec![format!("{}{role}", creds::ROLE_TAG)])),
                // A scoped user must carry no limits of its own (the server
                // compares them with Go's zero values): the template's apply.
                data: 0,
                payload: 0,
                subs: 0,
                ..Default::default()
            })
            .sign(&signer);
        self.write_creds(self.creds_path(role, name), &jwt, &user)
    }

    /// Issues the broker's user in the books' account (signed by that
    /// account's own key, unrestricted inside it) and writes it to
    /// [`Deployment::books_creds_path`].
    pub fn add_books_keeper(&self) -> Result<PathBuf, IdentityError> {
        let books = self.seed(BOOKS)?;
        let user = KeyPair::new_user();
        let jwt = Token::new(user.public_key())
            .name(BOOKS_USER)
            .claims(User {
                bearer_token: false,
                tags: Some(TagList(vec![format!("{}{}", creds::ROLE_TAG, Role::Broker)])),
                ..Default::default()
            })
            .sign(&books);
        self.write_creds(self.books_creds_path(), &jwt, &user)
    }

    /// Writes `user`'s credentials (its signed `jwt` and its seed) to
    /// `path`, a secret file under the deployment.
    fn write_creds(&self, path: PathBuf, jwt: &str, user: &KeyPair) -> Result<PathBuf, IdentityError> {
        let seed = user.seed().map_err(|e| IdentityError::Key {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        self.write(
            path.strip_prefix(&self.dir).expect("under the deployment"),
            &creds::format(jwt, &seed),
            true,
        )?;
        Ok(path)
    }

    /// Where the broker's user in the books' account keeps its credentials.
    pub fn books_creds_path(&self) -> PathBuf {
        self.creds_path(Role::Broker, BOOKS_USER)
    }

    fn public_key(&self, name: &str) -> Result<String, IdentityError> {
        Ok(self.seed(name)?.public_key())
    }

    fn seed(&self, name: &str) -> Result<KeyPair, IdentityError> {
        let path = self.dir.join("keys").join(format!("{name}.nk"));
        let seed = std::fs::read_to_string(&path).map_err(IdentityError::io(&path))?;
        KeyPair::from_seed(seed.trim()).map_err(|e| IdentityError::Key {
            path,
            reason: e.to_string(),
        })
    }

    fn write_seed(&self, name: &str, key: &KeyPair) -> Result<(), IdentityError> {
        let seed = key.seed().map_err(|e| IdentityError::Key {
            path: self.dir.join("keys"),
            reason: e.to_string(),
        })?;
        self.write(format!("keys/{name}.nk"), &seed, true)
    }

    fn write(&self, rel: impl AsRef<Path>, text: &str, secret: bool) -> Result<(), IdentityError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(rel);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(IdentityError::io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(IdentityError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(IdentityError::io(&path))
    }
}

/// The seed file of `role`'s signing key in the market account.
fn role_key(role: Role) -> String {
    format!("{MARKET}-{role}")
}

/// `role`'s signing key with its permission template.
fn scope(role: Role, key: &KeyPair) -> UserScope {
    let g = grants(role);
    UserScope {
        key: Some(key.public_key()),
        role: Some(role.to_string()),
        description: Some(format!("vmlot {role}s")),
        template: Some(UserPermissionLimits {
            pub_: Some(allow(g.publish)),
            sub: Some(allow(g.subscribe)),
            resp: g.respond.then_some(ResponsePermission {
                max: Some(1),
                ttl: Some(0),
            }),
            bearer_token: false,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn export(e: BooksExport) -> Export {
    Export {
        account_token_position: None,
        advertise: None,
        allow_trace: None,
        description: None,
        info_url: None,
        name: Some(e.local.clone()),
        response_threshold: None,
        response_type: Some(if e.streamed {
            ResponseType::Stream
        } else {
            ResponseType::Singleton
        }),
        revocations: None,
        service_latency: None,
        subject: Some(Subject(e.subject)),
        token_req: false,
        type_: Some(ExportType::Service),
    }
}

fn import(books: &str, e: BooksExport) -> Import {
    Import {
        account: Some(books.to_string()),
        allow_trace: None,
        local_subject: Some(RenamingSubject(e.local.clone())),
        name: Some(e.local),
        share: None,
        subject: Some(Subject(e.subject)),
        to: None,
        token: None,
        type_: Some(ExportType::Service),
    }
}

fn allow(subjects: Vec<String>) -> Permission {
    Permission {
        allow: Some(StringList(subjects)),
        deny: None,
    }
}
