//! The `vmlot store` commands as a user runs them: real binary, real server.

use std::process::{Command, Output};

use vmlot_tests::{NatsServer, workspace_binary};

/// `vmlot` as a submitter with its own credentials.
fn vmlot(server: &NatsServer, args: &[&str]) -> Output {
    let creds = server
        .creds(vmlot_schemas::caller::Role::Submitter, "alice")
        .unwrap();
    Command::new(workspace_binary("vmlot").unwrap())
        .env("VMLOT_NATS", server.url())
        .env("VMLOT_TLS_CA", vmlot_tests::tls_ca_beside(&creds).unwrap())
        .env("VMLOT_CREDS", creds)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn push_pull_have_and_exit_codes() {
    let server = NatsServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(server.provision_store()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.img");
    let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();

    let out = vmlot(
        &server,
        &["--json", "store", "push", "--kind", "disk", src.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pushed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = pushed["manifest"].as_str().unwrap().to_string();
    assert_eq!(pushed["size"], data.len());

    let cache = dir.path().join("cache");
    let dest = dir.path().join("copy.img");
    let out = vmlot(
        &server,
        &[
            "store",
            "pull",
            &manifest,
            "-o",
            dest.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    let out = vmlot(
        &server,
        &[
            "--json",
            "store",
            "have",
            &manifest,
            "--cache",
            cache.to_str().unwrap(),
        ],
    );
    let have: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(have["cold_blocks"], 0);
    assert!(have["hot_blocks"].as_u64().unwrap() > 0);

    // An unknown manifest, and a SHA-1 name in this SHA-256 store: refused
    // data, exit code 3, a message naming it.
    for (unknown, says) in [("0".repeat(64), "not in the store"), ("0".repeat(40), "sha1")] {
        let out = vmlot(
            &server,
            &[
                "store",
                "pull",
                &unknown,
                "-o",
                dir.path().join("x").to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(3));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&unknown) && stderr.contains(says), "{stderr}");
    }

    // A malformed id is a usage error.
    let out = vmlot(&server, &["store", "pull", "not-an-id", "-o", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unreachable_server_is_exit_code_4() {
    let port = vmlot_tests::free_port();
    let out = Command::new(workspace_binary("vmlot").unwrap())
        .env("VMLOT_NATS", format!("nats://127.0.0.1:{port}"))
        .args(["--open", "store", "have", &"0".repeat(40), "--cache", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
