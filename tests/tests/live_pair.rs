//! End-to-end: a primary and a backup as separate `twinvm` processes over a real TCP log
//! channel on loopback. The backup replays the primary live and must match it; the primary
//! holds its console output until the backup has acknowledged the log behind it. Both sides
//! start from the cached snapshot of a guest at its prompt (see `twinvm_tests::snapshots`):
//! the primary's log header names it, and the backup restores the same one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinvm_tests::snapshots::prompt_snapshot;
use twinvm_tests::{Vm, BOOT_TIMEOUT};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinvm-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Starts a backup on an ephemeral loopback port; returns it and its address.
fn start_backup(extra: &[&str], console: &Path) -> (Vm, String) {
    let mut args = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--console-log",
        console.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut b = Vm::spawn(&args);
    let addr = b.wait_for_stderr("backup listening on ", Duration::from_secs(30));
    (b, addr.trim().to_string())
}

/// A JSON number field of a status file.
fn status_field(path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get(field)?.as_u64()
}

#[test]
fn backup_replays_the_primary_live_and_matches_it() {
    let console = scratch("backup-hostile.console");
    let snap = prompt_snapshot();
    let restore = ["--restore", snap.to_str().unwrap()];
    let (mut backup, addr) = start_backup(&restore, &console);
    let mut args = vec!["primary", "--backup", &addr];
    args.extend_from_slice(&restore);
    let mut primary = Vm::spawn(&args);
    primary.type_text("twinvm-hostile 20; twinvm-drain; poweroff -f\n");
    primary.wait_for("hostile done hash", 0, BOOT_TIMEOUT);
    let p = primary.wait_exit(Duration::from_secs(300));
    assert_eq!(p.code(), Some(0), "primary: {}", primary.stderr());
    let b = backup.wait_exit(BOOT_TIMEOUT);
    assert_eq!(b.code(), Some(0), "backup: {}", backup.stderr());
    let err = backup.stderr();
    assert!(err.contains("replay complete"), "{err}");
    assert!(!err.contains(" 0 state digests matched"), "{err}");
    let replayed = std::fs::read(&console).unwrap();
    assert!(
        replayed == primary.console().into_bytes(),
        "the backup's console differs from the primary's\n--- primary ---\n{}\n--- backup ---\n{}",
        primary.console(),
        String::from_utf8_lossy(&replayed)
    );
    assert!(
        primary.stderr().contains("output rule:"),
        "{}",
        primary.stderr()
    );
}

#[test]
fn primary_output_waits_for_the_backups_acks() {
    let console = scratch("backup-ticks.console");
    let status = scratch("primary.status");
    // Long failure timeouts: this test stops the backup on purpose.
    let snap = prompt_snapshot();
    let timeouts = [
        "--peer-timeout-ms",
        "120000",
        "--restore",
        snap.to_str().unwrap(),
    ];
    let (mut backup, addr) = start_backup(&timeouts, &console);
    let mut args = vec![
        "primary",
        "--backup",
        &addr,
        "--status",
        status.to_str().unwrap(),
    ];
    args.extend_from_slice(&timeouts);
    // The output rule alone: without a replay-lag bound the primary's guest runs on while
    // its output waits (with the default bound it is held once the stopped backup's replay
    // trails by 10,000-20,000 positions, as VMware FT slows its primary).
    args.extend_from_slice(&[
        "--max-replay-lag-positions",
        "1000000000000",
        "--min-replay-lag-positions",
        "1000000000000",
    ]);
    let mut primary = Vm::spawn(&args);
    let at = 0;
    primary.type_text("for i in $(seq 1 15); do echo tick $i; sleep 1; done; poweroff -f\n");
    primary.wait_for("tick 3\r\n", at, Duration::from_secs(120));

    backup.freeze(true);
    // Output the backup acknowledged before it stopped may still come out; then nothing.
    std::thread::sleep(Duration::from_secs(3));
    let held_len = primary.console_len();
    let pos_before = status_field(&status, "position").expect("primary status");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let pos_after = status_field(&status, "position").expect("primary status");
    let held_len_after = primary.console_len();
    let in_flight = status_field(&status, "in_flight_entries").unwrap_or(0);
    backup.freeze(false);
    assert_eq!(
        held_len,
        held_len_after,
        "the primary's console advanced while its backup was stopped: {}",
        primary.console()
    );
    assert!(
        pos_after > pos_before,
        "the primary's guest did not keep running while output was held ({pos_before} -> {pos_after} in {:?})",
        t0.elapsed()
    );
    assert!(
        in_flight > 0,
        "no unacknowledged entries while the backup was stopped"
    );

    // Acks resume: so does the output, up to the end.
    primary.wait_for("tick 15", held_len, Duration::from_secs(180));
    let p = primary.wait_exit(Duration::from_secs(180));
    assert_eq!(p.code(), Some(0), "primary: {}", primary.stderr());
    let b = backup.wait_exit(BOOT_TIMEOUT);
    assert_eq!(b.code(), Some(0), "backup: {}", backup.stderr());
    let replayed = std::fs::read(&console).unwrap();
    assert!(
        replayed == primary.console().into_bytes(),
        "the backup's console differs from the primary's"
    );
}

#[test]
fn mismatched_pair_is_refused_by_both_sides() {
    let console = scratch("refused.console");
    let (mut backup, addr) = start_backup(&["--mem", "128"], &console);
    let mut primary = Vm::spawn(&["primary", "--backup", &addr]);
    let p = primary.wait_exit(Duration::from_secs(60));
    let b = backup.wait_exit(Duration::from_secs(60));
    assert_eq!(p.code(), Some(1), "{}", primary.stderr());
    assert_eq!(b.code(), Some(1), "{}", backup.stderr());
    assert!(
        primary.stderr().contains("refused the log"),
        "{}",
        primary.stderr()
    );
    assert!(primary.stderr().contains("mem_mib"), "{}", primary.stderr());
    assert!(
        backup.stderr().contains("refused the primary"),
        "{}",
        backup.stderr()
    );
}

/// With `--pair-secret-file` on both sides, strangers on the backup's port (a port scan,
/// garbage, a primary with the wrong secret) are logged with their address and why and
/// dropped; the backup keeps listening and pairs with its real primary.
#[test]
fn backup_outlives_strangers_and_pairs_only_with_its_authenticated_primary() {
    use std::io::Write;
    let secret = scratch("pair.secret");
    std::fs::write(&secret, "e2e pair secret 0123456789abcdef\n").unwrap();
    let wrong = scratch("wrong.secret");
    std::fs::write(&wrong, "not the pair secret 0123456789ab\n").unwrap();
    let console = scratch("auth.console");
    let secret_arg = ["--pair-secret-file", secret.to_str().unwrap()];
    let (mut backup, addr) = start_backup(&secret_arg, &console);

    drop(std::net::TcpStream::connect(&addr).unwrap()); // a port scan
    backup.wait_for_stderr("closed during the handshake", Duration::from_secs(30));
    let mut garbage = std::net::TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    backup.wait_for_stderr("why=garbage", Duration::from_secs(30));
    let mut impostor = Vm::spawn(&[
        "primary",
        "--backup",
        &addr,
        "--pair-secret-file",
        wrong.to_str().unwrap(),
    ]);
    let i = impostor.wait_exit(Duration::from_secs(60));
    assert_eq!(i.code(), Some(1), "{}", impostor.stderr());
    assert!(
        impostor.stderr().contains("authentication failed"),
        "{}",
        impostor.stderr()
    );
    backup.wait_for_stderr("why=wrong pair secret", Duration::from_secs(30));
    assert!(backup.exited().is_none(), "{}", backup.stderr());

    let mut primary = Vm::spawn(&["primary", "--backup", &addr, secret_arg[0], secret_arg[1]]);
    backup.wait_for_stderr("backup accepted its primary", Duration::from_secs(60));
    primary.wait_for_stderr("primary connected to its backup", Duration::from_secs(60));
    let err = backup.stderr();
    assert_eq!(err.matches("dropped a connection").count(), 3, "{err}");
}
