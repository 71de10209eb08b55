//! The arbiter as both sides of a pair see it when they start and when they claim (issue #11,
//! findings 3 and 7): every process claims as its own incarnation, so two sides never both
//! win under one name, and a pair is refused before its guest boots when the arbiter will
//! not take its token or its generation is already held (after a failover, by a survivor
//! that may still run). Runs the real `twinvm-arbiter` on 127.0.0.1; no guest boots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinvm_tests::workspace_bin;
use vmm::ft::arbiter::{ArbiterSettings, HttpArbiter};
use vmm::machine::{Arbiter, Claim};

/// A `twinvm-arbiter` on a free port of 127.0.0.1, killed when dropped.
struct LocalArbiter {
    child: Child,
    addr: String,
    token: PathBuf,
    dir: PathBuf,
}

impl LocalArbiter {
    fn start(name: &str) -> LocalArbiter {
        let dir = std::env::temp_dir().join(format!("twinvm-arb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "the-right-token-0123456789\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let port_file = dir.join("port");
        let child = Command::new(workspace_bin("twinvm-arbiter"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--token-file")
            .arg(&token)
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn twinvm-arbiter");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&port_file) {
                if !a.trim().is_empty() {
                    break a.trim().to_string();
                }
            }
            assert!(Instant::now() < deadline, "the arbiter did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        LocalArbiter {
            child,
            addr,
            token,
            dir,
        }
    }

    fn settings(&self, name: &str, generation: u64) -> ArbiterSettings {
        ArbiterSettings {
            addr: self.addr.clone(),
            token_file: Some(self.token.clone()),
            vm: "twinvm".into(),
            generation,
            name: name.into(),
        }
    }
}

impl Drop for LocalArbiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `twinvm` with `args` to its end (at most `limit`), returning its status and stderr.
fn twinvm(args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(workspace_bin("twinvm"))
        .args(args)
        .env("TWINVM_GUEST_DIR", twinvm_tests::guest_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twinvm");
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = err.join().unwrap();
    (status.and_then(|s| s.code()), err)
}

fn pair_args<'a>(
    side: &'a str,
    arb: &'a str,
    token: &'a Path,
    generation: &'a str,
) -> Vec<&'a str> {
    let mut v = match side {
        // Nothing listens on port 9: an old primary would keep trying to reach it.
        "primary" => vec!["primary", "--backup", "127.0.0.1:9"],
        _ => vec!["backup", "--listen", "127.0.0.1:0"],
    };
    v.extend([
        "--arbiter",
        arb,
        "--arbiter-token-file",
        token.to_str().unwrap(),
        "--generation",
        generation,
    ]);
    v
}

#[test]
fn two_sides_with_the_same_name_never_both_win() {
    let arb = LocalArbiter::start("names");
    // The same name, as two pairs (or a misconfigured pair) left at the default would have.
    let mut a = HttpArbiter::new(&arb.settings("primary", 1)).unwrap();
    let mut b = HttpArbiter::new(&arb.settings("primary", 1)).unwrap();
    assert_ne!(a.claimant(), b.claimant());
    let first = a.claim();
    let second = b.claim();
    assert_eq!(first, Claim::Won);
    match second {
        Claim::Lost(holder) => assert!(holder.contains(a.claimant()), "{holder}"),
        other => panic!("the second side got {other:?}"),
    }
    // Asking again is answered the same (retries are safe).
    assert_eq!(a.claim(), Claim::Won);
    assert!(matches!(b.claim(), Claim::Lost(_)));
}

#[test]
fn a_new_pair_on_a_generation_held_after_a_failover_is_refused_at_start() {
    let arb = LocalArbiter::start("held");
    // The state a failover leaves: the surviving backup holds generation 1 (and runs on).
    let mut survivor = HttpArbiter::connect(&arb.settings("backup", 1)).unwrap();
    assert_eq!(survivor.claim(), Claim::Won);
    // A fresh pair started with the same (default) generation must not boot a second copy.
    for side in ["backup", "primary"] {
        let (status, err) = twinvm(
            &pair_args(side, &arb.addr, &arb.token, "1"),
            Duration::from_secs(20),
        );
        assert_eq!(status, Some(1), "{side}: {err}");
        assert!(
            err.contains(&format!(
                "generation 1 of VM \"twinvm\" is held by {}",
                survivor.claimant()
            )),
            "{side}: {err}"
        );
        assert!(!err.contains("listening on"), "{side} started: {err}");
    }
    // A pair above it is refused too until the holder re-pairs or the VM is cleared (the
    // arbiter would answer its claim with 409).
    let (status, err) = twinvm(
        &pair_args("backup", &arb.addr, &arb.token, "2"),
        Duration::from_secs(20),
    );
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("generation 2 of VM \"twinvm\" is not open"),
        "{err}"
    );
}

#[test]
fn a_wrong_arbiter_token_is_an_error_before_the_guest_boots() {
    let arb = LocalArbiter::start("token");
    let wrong = arb.dir.join("wrong-token");
    std::fs::write(&wrong, "not-the-token-at-all-xxxxxxxx\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, err) = twinvm(
        &pair_args("backup", &arb.addr, &wrong, "1"),
        Duration::from_secs(20),
    );
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("refuses this side's token") && err.contains("wrong-token"),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
    // An arbiter that does not answer at all is an error too, naming it.
    let (status, err) = twinvm(
        &pair_args("backup", "127.0.0.1:9", &arb.token, "1"),
        Duration::from_secs(30),
    );
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("the arbiter at 127.0.0.1:9 does not answer"),
        "{err}"
    );
}

/// Issue #11, finding 10: whatever the live side needs is opened and checked at start-up,
/// before the side can win the arbiter. A backup that may go live and gives the guest a card
/// without a TAP, or a primary that does the same, is refused; so is a backup whose TAP
/// cannot be opened (it used to find out only at go-live, after winning: nobody ran the VM).
#[test]
fn a_side_that_could_go_live_without_its_network_is_refused_at_start() {
    let arb = LocalArbiter::start("net");
    for side in ["backup", "primary"] {
        let mut args = pair_args(side, &arb.addr, &arb.token, "1");
        args.push("--nic");
        let (status, err) = twinvm(&args, Duration::from_secs(60));
        assert_eq!(status, Some(1), "{side}: {err}");
        assert!(
            err.contains(&format!(
                "the {side} gives the guest a network card (--nic/--mac) but no TAP (--tap)"
            )),
            "{side}: {err}"
        );
        assert!(!err.contains("listening on"), "{side}: {err}");
    }
    // Without an arbiter a backup never goes live: it may match its primary's card alone.
    let (status, err) = twinvm(
        &["backup", "--listen", "127.0.0.1:0", "--nic"],
        Duration::from_secs(5),
    );
    assert_eq!(
        status, None,
        "the backup should wait for its primary: {err}"
    );
    assert!(err.contains("backup listening on"), "{err}");
}

#[test]
fn a_backup_whose_tap_cannot_be_opened_fails_before_it_listens() {
    let arb = LocalArbiter::start("tap");
    let mut args = pair_args("backup", &arb.addr, &arb.token, "1");
    // Longer than IFNAMSIZ allows: no TAP can have this name.
    args.extend(["--tap", "twinvm-no-such-tap-name"]);
    let (status, err) = twinvm(&args, Duration::from_secs(60));
    assert_eq!(status, Some(1), "{err}");
    assert!(
        err.contains("the backup's TAP twinvm-no-such-tap-name"),
        "{err}"
    );
    assert!(!err.contains("listening on"), "{err}");
}
