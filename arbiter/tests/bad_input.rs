//! Bad input against the real server: garbage bytes, truncated and huge requests, bad JSON,
//! wrong tokens, unknown VMs and routes. Each gets a clear error status, changes nothing,
//! and the server keeps serving.

mod common;

use arbiter::protocol::{ListResponse, DEFAULT_MAX_BODY_BYTES};
use arbiter::{ErrorCode, Outcome};
use common::{bearer, raw, request, Arbiter};

fn claim_path(vm: &str) -> String {
    format!("/v1/vms/{vm}/test-and-set")
}

/// Asserts the answer has `status` and, for JSON errors, `code`.
fn expect(answer: &common::RawAnswer, status: u16, code: &str, what: &str) {
    assert_eq!(answer.status, Some(status), "{what}: {answer:?}");
    let body: serde_json::Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {answer:?}"));
    assert_eq!(body["error"], code, "{what}: {answer:?}");
    assert!(
        !body["message"].as_str().unwrap_or_default().is_empty(),
        "{what}: no message"
    );
}

struct Fixture {
    _tmp: tempfile::TempDir,
    arbiter: Arbiter,
    before: ListResponse,
}

impl Fixture {
    /// A server holding one VM, `held`, won by `owner` at generation 3.
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let arbiter = Arbiter::start(&tmp.path().join("data"));
        let client = arbiter.client();
        assert_eq!(
            client.test_and_set("held", "owner", 3).unwrap().outcome,
            Outcome::Won
        );
        let before = client.list().unwrap();
        Fixture {
            _tmp: tmp,
            arbiter,
            before,
        }
    }

    /// The state did not change and the server still answers properly.
    fn unchanged(&self, what: &str) {
        let client = self.arbiter.client();
        client.health().unwrap();
        assert_eq!(
            client.list().unwrap(),
            self.before,
            "{what} changed the state"
        );
        let again = client.test_and_set("held", "owner", 3).unwrap();
        assert_eq!(again.outcome, Outcome::Won, "{what}");
    }
}

#[test]
fn garbage_and_truncated_requests_change_nothing() {
    let f = Fixture::new();
    let addr = &f.arbiter.addr;

    // Binary garbage: a 400 or a closed connection, never a hang or a crash.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let answer = raw(addr, &garbage, true);
    assert!(matches!(answer.status, None | Some(400)), "{answer:?}");
    f.unchanged("binary garbage");

    let answer = raw(addr, b"HELLO ARBITER\r\n\r\n", true);
    assert_eq!(answer.status, Some(400), "{answer:?}");
    f.unchanged("a text line");

    // Headers cut off, then the client goes away.
    let answer = raw(
        addr,
        b"POST /v1/vms/held/test-and-set HTTP/1.1\r\nHost: a\r\nAuthor",
        true,
    );
    assert!(matches!(answer.status, None | Some(400)), "{answer:?}");
    f.unchanged("truncated headers");

    // A body shorter than announced, then EOF: the claim is not made.
    let full = request(
        "POST",
        &claim_path("truncated-vm"),
        Some(&bearer()),
        br#"{"claimant":"x","generation":1}"#,
    );
    let answer = raw(addr, &full[..full.len() - 10], true);
    assert!(matches!(answer.status, None | Some(400)), "{answer:?}");
    f.unchanged("a truncated body");
    assert_eq!(f.arbiter.client().get("truncated-vm").unwrap(), None);
}

#[test]
fn huge_requests_get_413() {
    let f = Fixture::new();
    let addr = &f.arbiter.addr;

    // Announced too large: refused before the body is read.
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: a\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n",
        claim_path("huge-vm"),
        bearer(),
        10 * 1024 * 1024
    );
    let answer = raw(addr, head.as_bytes(), false);
    expect(&answer, 413, "payload_too_large", "declared 10 MiB");
    f.unchanged("declared 10 MiB");

    // Chunked, no length announced: cut off at the limit.
    let mut chunked = format!(
        "POST {} HTTP/1.1\r\nHost: a\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        claim_path("huge-vm"),
        bearer()
    )
    .into_bytes();
    let piece = vec![b' '; 4096];
    for _ in 0..(DEFAULT_MAX_BODY_BYTES / piece.len() + 1) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(&piece);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw(addr, &chunked, false);
    expect(&answer, 413, "payload_too_large", "chunked over the limit");
    f.unchanged("chunked over the limit");

    // Exactly at the limit is fine (valid JSON padded with spaces); one byte more is not.
    let json = br#"{"claimant":"padded","generation":1}"#;
    let mut body = json.to_vec();
    body.resize(DEFAULT_MAX_BODY_BYTES, b' ');
    let answer = raw(
        addr,
        &request("POST", &claim_path("padded-vm"), Some(&bearer()), &body),
        false,
    );
    assert_eq!(answer.status, Some(200), "{answer:?}");
    body.push(b' ');
    let answer = raw(
        addr,
        &request("POST", &claim_path("padded-vm-2"), Some(&bearer()), &body),
        false,
    );
    expect(&answer, 413, "payload_too_large", "limit + 1");
    let client = f.arbiter.client();
    assert!(client.get("padded-vm").unwrap().is_some());
    assert_eq!(client.get("padded-vm-2").unwrap(), None);
    assert_eq!(client.get("huge-vm").unwrap(), None);

    // Headers far over the buffer: a 4xx, connection closed, server fine.
    let big_header = format!(
        "GET /v1/vms HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw(addr, big_header.as_bytes(), false);
    assert!(
        matches!(answer.status, None | Some(400..=499)),
        "{answer:?}"
    );
    f.arbiter.client().health().unwrap();
}

#[test]
fn malformed_bodies_and_ids_get_400_with_a_message() {
    let f = Fixture::new();
    let addr = &f.arbiter.addr;
    let cases: [(&str, &[u8]); 9] = [
        ("not JSON", b"claimant=x&generation=1"),
        ("truncated JSON", br#"{"claimant":"x","gener"#),
        ("empty body", b""),
        ("missing generation", br#"{"claimant":"x"}"#),
        (
            "generation as a string",
            br#"{"claimant":"x","generation":"1"}"#,
        ),
        (
            "negative generation",
            br#"{"claimant":"x","generation":-1}"#,
        ),
        (
            "unknown field",
            br#"{"claimant":"x","generation":1,"force":true}"#,
        ),
        ("bad claimant id", br#"{"claimant":"x y","generation":1}"#),
        (
            "invalid UTF-8",
            b"{\"claimant\":\"\xff\xfe\",\"generation\":1}",
        ),
    ];
    for (what, body) in cases {
        for path in [claim_path("new-vm"), "/v1/vms/held/re-pair".to_owned()] {
            let answer = raw(addr, &request("POST", &path, Some(&bearer()), body), false);
            expect(&answer, 400, "bad_request", what);
        }
    }
    let body = br#"{"claimant":"x","generation":1}"#;
    for bad_vm in ["a%20b", "a:b%2Fc", &"v".repeat(129)] {
        let answer = raw(
            addr,
            &request("POST", &claim_path(bad_vm), Some(&bearer()), body),
            false,
        );
        expect(&answer, 400, "bad_request", bad_vm);
    }
    let answer = raw(
        addr,
        &request("POST", "/v1/vms//test-and-set", Some(&bearer()), body),
        false,
    );
    expect(&answer, 400, "bad_request", "empty VM id");
    f.unchanged("malformed bodies");
    assert_eq!(f.arbiter.client().get("new-vm").unwrap(), None);
}

#[test]
fn wrong_or_missing_token_gets_401() {
    let f = Fixture::new();
    let addr = &f.arbiter.addr;
    let body = br#"{"claimant":"thief","generation":3}"#;
    let wrong_same_length = format!("Bearer {}", "x".repeat(common::TOKEN.len()));
    let tokens: [(&str, Option<&str>); 5] = [
        ("no token", None),
        ("wrong token", Some("Bearer not-the-token")),
        ("wrong token, same length", Some(&wrong_same_length)),
        ("basic auth", Some("Basic dGhpZWY6c2VjcmV0")),
        ("empty bearer", Some("Bearer ")),
    ];
    for (what, auth) in tokens {
        for (method, path, body) in [
            ("POST", claim_path("held"), &body[..]),
            ("POST", claim_path("thief-vm"), &body[..]),
            ("POST", "/v1/vms/held/re-pair".to_owned(), &body[..]),
            ("GET", "/v1/vms/held".to_owned(), &b""[..]),
            ("GET", "/v1/vms".to_owned(), &b""[..]),
            ("DELETE", "/v1/vms/held".to_owned(), &b""[..]),
        ] {
            let answer = raw(addr, &request(method, &path, auth, body), false);
            expect(
                &answer,
                401,
                "unauthorized",
                &format!("{what}: {method} {path}"),
            );
            assert!(
                answer.headers.contains("www-authenticate: bearer"),
                "{answer:?}"
            );
        }
    }
    f.unchanged("unauthenticated requests");
    assert_eq!(f.arbiter.client().get("thief-vm").unwrap(), None);

    // The client library reports it as a rejection, not as an outage.
    let thief = arbiter::BlockingClient::new(
        f.arbiter.addr.clone(),
        Some(arbiter::Token::new("nope").unwrap()),
    )
    .unwrap();
    let err = thief.test_and_set("held", "thief", 3).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    // Health needs no token.
    let answer = raw(addr, &request("GET", "/v1/health", None, b""), false);
    assert_eq!(answer.status, Some(200));
}

#[test]
fn unknown_vms_routes_and_methods() {
    let f = Fixture::new();
    let addr = &f.arbiter.addr;
    let auth = Some(bearer());
    let auth = auth.as_deref();
    let answer = raw(addr, &request("GET", "/v1/vms/nobody", auth, b""), false);
    expect(&answer, 404, "unknown_vm", "get unknown VM");
    let answer = raw(addr, &request("DELETE", "/v1/vms/nobody", auth, b""), false);
    expect(&answer, 404, "unknown_vm", "clear unknown VM");
    let answer = raw(
        addr,
        &request(
            "POST",
            "/v1/vms/nobody/re-pair",
            auth,
            br#"{"claimant":"x","generation":1}"#,
        ),
        false,
    );
    expect(&answer, 404, "unknown_vm", "re-pair unknown VM");
    for path in [
        "/",
        "/v2/vms",
        "/v1/vms/held/steal",
        "/v1/vms/held/re-pair/x",
    ] {
        let answer = raw(addr, &request("GET", path, auth, b""), false);
        expect(&answer, 404, "not_found", path);
    }
    for (method, path, allow) in [
        ("PUT", "/v1/vms", "GET"),
        ("POST", "/v1/vms/held", "GET, DELETE"),
        ("GET", "/v1/vms/held/test-and-set", "POST"),
        ("DELETE", "/v1/vms/held/re-pair", "POST"),
    ] {
        let answer = raw(addr, &request(method, path, auth, b""), false);
        expect(&answer, 405, "method_not_allowed", path);
        assert!(answer
            .headers
            .contains(&format!("allow: {}", allow.to_ascii_lowercase())));
    }
    let client = f.arbiter.client();
    assert_eq!(client.get("nobody").unwrap(), None);
    assert_eq!(client.clear("nobody").unwrap(), None);
    let err = client.re_pair("nobody", "x", 1).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownVm));
    // Invalid ids are refused by the client before anything is sent.
    assert!(matches!(
        client.test_and_set("a/b", "x", 1),
        Err(arbiter::ClientError::InvalidArgument(_))
    ));
    f.unchanged("unknown VMs and routes");
}
