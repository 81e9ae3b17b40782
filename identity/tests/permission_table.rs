//! The permission table in `docs/ARCHITECTURE.md` is what `vmlot admin
//! init` really writes: the table is rendered here from the market
//! account's JWT in a fresh deployment (each role's signing key and its
//! template, and what the account imports from the books' account) and
//! must equal the one in the document.

use data_encoding::BASE64URL_NOPAD;
use serde_json::Value;

const BEGIN: &str = "<!-- permissions:begin -->";
const END: &str = "<!-- permissions:end -->";

fn claims(jwt: &str) -> Value {
    let payload = jwt.trim().split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&BASE64URL_NOPAD.decode(payload.as_bytes()).unwrap()).unwrap()
}

fn cell(list: &Value) -> String {
    let items: Vec<String> = list
        .as_array()
        .map(|a| a.iter().map(|s| format!("`{}`", s.as_str().unwrap())).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join("<br>")
    }
}

/// The table, from the account JWT the deployment wrote.
fn rendered(account_jwt: &str) -> String {
    let account = claims(account_jwt);
    let mut out = String::from(
        "| role | may publish | may subscribe | may answer a request it receives |\n|---|---|---|---|\n",
    );
    for key in account["nats"]["signing_keys"].as_array().unwrap() {
        let template = &key["template"];
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            key["role"].as_str().unwrap(),
            cell(&template["pub"]["allow"]),
            cell(&template["sub"]["allow"]),
            if template["resp"].is_null() {
                "no"
            } else {
                "yes, once"
            },
        ));
    }
    out.push_str(
        "\n| the market account imports from `BOOKS` | as the books' subject | answers |\n|---|---|---|\n",
    );
    for import in account["nats"]["imports"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            import["local_subject"].as_str().unwrap(),
            import["subject"].as_str().unwrap(),
            import["type"].as_str().unwrap(),
        ));
    }
    out
}

#[test]
fn the_documented_permission_table_is_the_deployed_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = vmlot_identity::Deployment::create(&dir.path().join("d")).unwrap();
    let jwt = std::fs::read_to_string(d.dir().join("accounts/MARKET.jwt")).unwrap();
    let table = rendered(&jwt);
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ARCHITECTURE.md")).unwrap();
    let start = doc
        .find(BEGIN)
        .expect("ARCHITECTURE.md has the permissions markers")
        + BEGIN.len();
    let documented = doc[start..doc[start..].find(END).unwrap() + start].trim();
    assert_eq!(
        documented,
        table.trim(),
        "docs/ARCHITECTURE.md's permission table differs from what `vmlot admin init` writes; it should read:\n{table}"
    );
    // Users carry no permissions of their own: the role's template decides.
    let user = d.add(vmlot_schemas::caller::Role::Submitter, "alice").unwrap();
    let text = std::fs::read_to_string(user).unwrap();
    let jwt = text.lines().nth(1).unwrap();
    let claims = claims(jwt);
    assert!(
        claims["nats"]["pub"].is_null() && claims["nats"]["sub"].is_null(),
        "{claims}"
    );
    assert_ne!(
        claims["nats"]["bearer_token"],
        Value::Bool(true),
        "a bearer token needs no key"
    );
    assert_eq!(claims["nats"]["tags"][0], "role:submitter");
}

#[test]
fn the_books_export_only_direct_gets() {
    let dir = tempfile::tempdir().unwrap();
    let d = vmlot_identity::Deployment::create(&dir.path().join("d")).unwrap();
    let books = claims(&std::fs::read_to_string(d.dir().join("accounts/BOOKS.jwt")).unwrap());
    let exports = books["nats"]["exports"].as_array().unwrap();
    assert!(!exports.is_empty());
    for e in exports {
        let subject = e["subject"].as_str().unwrap();
        assert!(
            subject.starts_with("$JS.API.DIRECT.GET.") && !subject.contains('>') && !subject.contains('*'),
            "the books export {subject}"
        );
        assert_eq!(e["type"], "service");
    }
    // Only the broker has a user in the books' account.
    assert!(books["nats"]["signing_keys"].is_null(), "{books}");
}
