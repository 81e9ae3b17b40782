//! `vmlot-provider doctor` as a service manager runs it before the daemon:
//! the built binary against a real, secured NATS server. With a provider's
//! credentials and the deployment's CA it passes (QEMU and NATS ok); with
//! a closed port, a submitter's credentials, another deployment's
//! credentials or no CA it fails, saying which.

use std::path::Path;
use std::process::Command;

use vmlot_schemas::caller::Role;
use vmlot_tests::{NatsServer, free_port, workspace_binary};

/// Runs `vmlot-provider doctor` with `args` and the directories under
/// `dir`: its exit code and its report.
fn doctor(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_binary("vmlot-provider").unwrap())
        .arg("doctor")
        .args(args)
        .args(["--hypervisors", "qemu", "--cache-bytes", "1073741824"])
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        // Only what the test passes: none of the caller's settings.
        .env_remove("VMLOT_CREDS")
        .env_remove("VMLOT_TLS_CA")
        .env_remove("VMLOT_OPEN")
        .env_remove("VMLOT_PROVIDER_CONFIG")
        .output()
        .expect("running vmlot-provider doctor");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().expect("doctor exits by itself");
    (code, report)
}

/// The report's line for check `name` (`status name detail`).
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
}

fn status<'a>(report: &'a str, name: &str) -> &'a str {
    line(report, name).split_whitespace().next().unwrap()
}

#[test]
fn doctor_passes_a_good_host_and_names_what_is_missing() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let provider = server
        .creds(Role::Provider, &uuid::Uuid::new_v4().to_string())
        .unwrap();
    let submitter = server.creds(Role::Submitter, "alice").unwrap();
    let ca = server.tls_ca();
    let (ca, url) = (ca.to_str().unwrap(), server.url());

    // A provider's credentials, the deployment's CA, a running server.
    let (code, report) = doctor(
        dir.path(),
        &[
            "--nats",
            &url,
            "--creds",
            provider.to_str().unwrap(),
            "--tls-ca",
            ca,
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(status(&report, "qemu"), "ok", "{report}");
    assert_eq!(status(&report, "nats"), "ok", "{report}");
    assert_eq!(status(&report, "credentials"), "ok", "{report}");
    assert!(report.contains("ready to serve"), "{report}");

    // Nobody listening on the port.
    let closed = format!("nats://127.0.0.1:{}", free_port());
    let (code, report) = doctor(
        dir.path(),
        &[
            "--nats",
            &closed,
            "--creds",
            provider.to_str().unwrap(),
            "--tls-ca",
            ca,
        ],
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(status(&report, "nats"), "missing", "{report}");
    assert!(
        line(&report, "nats").contains("could not reach the server"),
        "{report}"
    );
    assert_eq!(status(&report, "credentials"), "ok", "{report}");

    // A submitter's credentials: the server takes them, the provider cannot.
    let (code, report) = doctor(
        dir.path(),
        &[
            "--nats",
            &url,
            "--creds",
            submitter.to_str().unwrap(),
            "--tls-ca",
            ca,
        ],
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(status(&report, "credentials"), "missing", "{report}");
    assert!(
        line(&report, "credentials").contains("not a provider's"),
        "{report}"
    );
    assert_eq!(status(&report, "nats"), "ok", "{report}");

    // Credentials of another deployment: the server refuses them.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = vmlot_identity::Deployment::create(&elsewhere.path().join("deploy")).unwrap();
    let foreign = other
        .add(Role::Provider, &uuid::Uuid::new_v4().to_string())
        .unwrap();
    let (code, report) = doctor(
        dir.path(),
        &[
            "--nats",
            &url,
            "--creds",
            foreign.to_str().unwrap(),
            "--tls-ca",
            ca,
        ],
    );
    assert_eq!(code, 1, "{report}");
    assert!(
        line(&report, "nats").contains("refused the credentials"),
        "{report}"
    );

    // Without the deployment's CA the server's certificate is unknown.
    let (code, report) = doctor(
        dir.path(),
        &["--nats", &url, "--creds", provider.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "nats").contains("TLS failed"), "{report}");
    assert!(line(&report, "nats").contains("--tls-ca"), "{report}");

    // Nothing was written: the directories the daemon would make are not there.
    assert!(!dir.path().join("work").exists() && !dir.path().join("cache").exists());
}
