//! What each role may publish and subscribe to: the templates of the
//! account's per-role signing keys. The server fills `{{name()}}` with the
//! user's name and `{{subject()}}` with its public key at connect time, so
//! one template fences every user of a role to its own subjects. Pure: the
//! permission table in `docs/ARCHITECTURE.md` is checked against it.

use vmlot_schemas::caller::Role;
use vmlot_schemas::subjects::{self, js};

/// The user's name, filled in by the server.
pub const NAME: &str = "{{name()}}";
/// The user's public key, filled in by the server.
pub const KEY: &str = "{{subject()}}";

/// One role's permissions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grants {
    /// Subjects the role may publish on (requests included).
    pub publish: Vec<String>,
    /// Subjects the role may subscribe to.
    pub subscribe: Vec<String>,
    /// May answer one request per message it receives, on the reply
    /// subject the requester chose (a provider answering an award).
    pub respond: bool,
}

/// Reading and writing the content-addressed store: its two streams' info,
/// their direct gets, and publishing packs, and block pointers and
/// manifest records under the user's own role and name (a stranger cannot
/// take the name of what another is about to store; readers check every
/// block and manifest against its name).
fn store(role: Role) -> Vec<String> {
    let mut v = vec![
        subjects::blocks_of(role, NAME),
        subjects::PACK_SUBJECTS.to_string(),
        subjects::manifests_of(role, NAME),
    ];
    for stream in [subjects::BLOCK_STREAM, subjects::MANIFEST_STREAM] {
        v.push(js::stream_info(stream));
        v.extend(js::direct_get(stream));
    }
    v
}

/// One service the books' account exports to the market account: the
/// subject inside the books' account, the subject participants publish
/// on, and whether the answer may come in several messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BooksExport {
    pub subject: String,
    pub local: String,
    pub streamed: bool,
}

/// What the books' account exports: the batched direct gets of the ledger
/// stream and of the job records' stream. A direct get only reads, and its
/// answer travels back into the market account, never into the books'.
/// (No consumer API: a consumer's creator chooses where the server
/// delivers. No stream info: the JetStream API behind an import answers
/// for the importing account, not the books'.)
pub fn books_exports() -> Vec<BooksExport> {
    let mut v = Vec::new();
    for stream in [subjects::LEDGER_STREAM, subjects::JOB_BUCKET_STREAM] {
        v.push(BooksExport {
            subject: format!("$JS.API.DIRECT.GET.{stream}"),
            local: format!("{}.DIRECT.GET.{stream}", subjects::BOOKS_API),
            streamed: true,
        });
    }
    v
}

/// Reading the books and the job records in order, through the exports.
fn books_read() -> Vec<String> {
    books_exports().into_iter().map(|e| e.local).collect()
}

/// The role's permissions.
pub fn grants(role: Role) -> Grants {
    let inbox = format!("{}.>", subjects::inbox_of(KEY));
    let api = format!("{}.>", subjects::api_of(role, NAME));
    match role {
        Role::Broker => Grants {
            publish: vec![">".into()],
            subscribe: vec![">".into()],
            respond: false,
        },
        Role::Provider => Grants {
            publish: [
                vec![
                    subjects::bid_of(NAME),
                    subjects::result_of(NAME),
                    subjects::heartbeat_of(NAME),
                    api.clone(),
                ],
                store(role),
            ]
            .concat(),
            subscribe: vec![subjects::ALL_LOTS.to_string(), subjects::award_of(NAME), inbox],
            respond: true,
        },
        Role::Submitter => Grants {
            publish: [vec![api], store(role)].concat(),
            subscribe: vec![inbox],
            respond: false,
        },
        Role::Operator => Grants {
            publish: [vec![api], store(role), books_read()].concat(),
            subscribe: vec![inbox],
            respond: false,
        },
        Role::Accountant => Grants {
            publish: [vec![api], books_read()].concat(),
            subscribe: vec![inbox],
            respond: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_broker_reaches_everything() {
        for role in Role::ALL {
            let g = grants(role);
            let everything = g.publish.iter().chain(&g.subscribe).any(|s| s == ">");
            assert_eq!(everything, role == Role::Broker, "{role}");
        }
    }

    #[test]
    fn no_participant_may_publish_into_the_books_or_the_job_records() {
        for role in Role::ALL.into_iter().filter(|r| *r != Role::Broker) {
            for s in grants(role).publish {
                assert!(
                    !s.starts_with("vmlot.ledger")
                        && !s.starts_with("$KV.")
                        && !s.contains("STREAM.DELETE")
                        && !s.contains("CONSUMER"),
                    "{role} may publish {s}"
                );
            }
        }
    }

    #[test]
    fn a_provider_is_fenced_to_its_own_name() {
        let g = grants(Role::Provider);
        assert!(g.publish.contains(&"vmlot.bid.{{name()}}.*".to_string()));
        assert!(!g.subscribe.iter().any(|s| s.starts_with("vmlot.bid")));
        assert!(g.subscribe.contains(&"vmlot.award.{{name()}}".to_string()));
        assert!(g.subscribe.contains(&"_INBOX.{{subject()}}.>".to_string()));
    }

    #[test]
    fn store_writes_carry_the_writers_own_role_and_name() {
        for role in Role::ALL.into_iter().filter(|r| *r != Role::Broker) {
            for s in grants(role)
                .publish
                .iter()
                .filter(|s| s.starts_with("vmlot.cas.block") || s.starts_with("vmlot.cas.manifest"))
            {
                assert!(
                    s.contains(&format!(".{}.{{{{name()}}}}", role.as_str())),
                    "{role} may publish {s}"
                );
            }
        }
    }
}
