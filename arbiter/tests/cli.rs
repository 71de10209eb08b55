//! The binary's command line and lifecycle: help, refusing to run without a token, graceful
//! SIGTERM, one arbiter per data directory, `--insecure-no-auth`, `--port-file`.

mod common;

use std::process::Command;
use std::time::Duration;

use arbiter::Outcome;
use common::{binary, raw, request, Arbiter};

#[test]
fn help_says_how_to_run_it() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "--data-dir",
        "--token-file",
        "--insecure-no-auth",
        "--port-file",
        "systemd",
        "test-and-set",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn refuses_to_run_without_a_usable_token() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));

    let empty = tmp.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let err = Arbiter::start_with(&data, &["--token-file", empty.to_str().unwrap()])
        .err()
        .expect("an empty token must be refused");
    assert!(err.contains("token is empty"), "{err}");

    let missing = tmp.path().join("no-such-token");
    let err = Arbiter::start_with(&data, &["--token-file", missing.to_str().unwrap()])
        .err()
        .expect("a missing token file must be refused");
    assert!(err.contains("cannot read token file"), "{err}");
}

#[test]
fn sigterm_stops_gracefully_and_state_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port_file = tmp.path().join("port");
    let token = common::write_token(tmp.path());
    let mut arbiter = Arbiter::start_with(
        &data,
        &[
            "--token-file",
            token.to_str().unwrap(),
            "--port-file",
            port_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    let written = std::fs::read_to_string(&port_file).unwrap();
    assert_eq!(written.trim(), arbiter.addr, "--port-file matches stdout");
    let client = arbiter.client();
    assert_eq!(
        client.test_and_set("vm", "a", 1).unwrap().outcome,
        Outcome::Won
    );

    // A second arbiter cannot use the same data directory while the first runs.
    let err = Arbiter::start_with(&data, &["--token-file", token.to_str().unwrap()])
        .err()
        .expect("second arbiter on the same directory");
    assert!(err.contains("in use by another arbiter"), "{err}");

    let status = arbiter.terminate().expect("exits after SIGTERM");
    // Killed by the signal would be a failure status; the graceful path exits 0.
    assert!(status.success(), "graceful exit, got {status}");

    let arbiter = Arbiter::start(&data);
    let entry = arbiter.client().get("vm").unwrap().unwrap();
    assert_eq!(entry.holder.as_deref(), Some("a"));
    assert_eq!(
        arbiter.client().test_and_set("vm", "b", 1).unwrap().outcome,
        Outcome::Lost
    );
}

#[test]
fn insecure_no_auth_accepts_anyone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let arbiter = Arbiter::start_with(&data, &["--insecure-no-auth"]).unwrap();
    assert!(arbiter.stderr().contains("authentication is disabled"));
    let answer = raw(
        &arbiter.addr,
        &request(
            "POST",
            "/v1/vms/open/test-and-set",
            None,
            br#"{"claimant":"anyone","generation":1}"#,
        ),
        false,
    );
    assert_eq!(answer.status, Some(200), "{answer:?}");
    let client = arbiter::BlockingClient::new(arbiter.addr.clone(), None).unwrap();
    assert_eq!(
        client.get("open").unwrap().unwrap().holder.as_deref(),
        Some("anyone")
    );
}

#[test]
fn client_retries_until_the_arbiter_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut arbiter = Arbiter::start(&data);
    let addr = arbiter.addr.clone();
    arbiter.client().test_and_set("vm", "a", 1).unwrap();
    arbiter.kill();

    // Nothing listens: a bounded number of attempts, then Unavailable.
    let config = arbiter::ClientConfig {
        attempts: 3,
        backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let client = arbiter::BlockingClient::with_config(
        addr,
        Some(arbiter::Token::new(common::TOKEN).unwrap()),
        config,
    )
    .unwrap();
    match client.test_and_set("vm", "a", 1) {
        Err(arbiter::ClientError::Unavailable { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // Back on another port: the retried claim is answered the same (idempotent).
    let arbiter = Arbiter::start(&data);
    let again = arbiter.client().test_and_set("vm", "a", 1).unwrap();
    assert_eq!(again.outcome, Outcome::Won);
    assert_eq!(again.holder.as_deref(), Some("a"));
}
