//! Snapshots end to end (issue #14): a guest restored from a snapshot goes on exactly as the
//! original did from the same position (every later state digest matches the recording's),
//! a recording that starts from a snapshot names it and its replay insists on it, and a
//! damaged or foreign snapshot is one clear error line.

use std::path::{Path, PathBuf};
use std::process::Output;

use twinvm_tests::snapshots::prompt_snapshot;
use twinvm_tests::twinvm_typing;
use vmm::snapshot::Snapshot;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinvm-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `twinvm ARGS`, typing `input` at its console (then closing it), to the end.
fn twinvm(args: &[&str], input: &str) -> Output {
    twinvm_typing(args, input)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What the guest is asked to do from its prompt: compute something (so the output is the
/// guest's, not the terminal's echo), wait for the console to drain, power off.
const WORK: &str =
    "echo snap$((6*7))ok; ls /usr/share/twinvm/run | wc -l; twinvm-drain; poweroff -f\n";

fn digests_matched(stderr: &str) -> u64 {
    let at = stderr
        .find(" state digests matched")
        .unwrap_or_else(|| panic!("no digest count in: {stderr}"));
    stderr[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_replay_from_a_snapshot_matches_the_recording_digest_for_digest() {
    let prompt = prompt_snapshot();
    let p0 = Snapshot::open(&prompt).unwrap().state.vmm.position;

    // Recorded from the prompt snapshot, taking another snapshot on the way, at a position
    // that is not a digest point (so it carries the pages dirtied since the last digest).
    // The workload takes about 9,000 positions here; the snapshot comes a third of the way.
    let log = scratch("from-prompt.log");
    let stats = scratch("from-prompt.json");
    let mid = scratch("mid.snap");
    let mid_pos = p0 + 3001;
    assert_ne!(mid_pos % 500, 0);
    let rec = twinvm(
        &[
            "record",
            "--restore",
            s(&prompt),
            "--log",
            s(&log),
            "--digest-interval",
            "500",
            "--stats",
            s(&stats),
            "--snapshot-at",
            &mid_pos.to_string(),
            s(&mid),
        ],
        WORK,
    );
    let rec_err = text(&rec.stderr);
    assert_eq!(rec.status.code(), Some(0), "record failed: {rec_err}");
    let rec_console = text(&rec.stdout);
    assert!(rec_console.contains("snap42ok"), "{rec_console}");
    assert!(
        rec_err.contains(&format!("snapshot at position {mid_pos} written")),
        "{rec_err}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let end = v["positions"].as_u64().unwrap();
    assert!(
        end > mid_pos + 1000,
        "the recording ran from position {p0} to {end}"
    );

    // Replayed from the prompt snapshot: the same console, every digest matched.
    let rep = twinvm(&["replay", "--restore", s(&prompt), "--log", s(&log)], "");
    let rep_err = text(&rep.stderr);
    assert_eq!(rep.status.code(), Some(0), "replay failed: {rep_err}");
    assert_eq!(text(&rep.stdout), rec_console, "replayed console differs");
    let all = digests_matched(&rep_err);
    assert!(all >= 10, "too few digests to check anything: {rep_err}");

    // Replayed from the snapshot taken in the middle: every digest after it matches, and
    // the console goes on where the recording's was.
    let half = twinvm(&["replay", "--restore", s(&mid), "--log", s(&log)], "");
    let half_err = text(&half.stderr);
    assert_eq!(
        half.status.code(),
        Some(0),
        "replay from the middle failed: {half_err}"
    );
    assert!(
        half_err.contains(&format!("replaying from the snapshot's position {mid_pos}")),
        "{half_err}"
    );
    let later = digests_matched(&half_err);
    assert!(
        later >= 2 && later < all,
        "a replay from position {mid_pos} matched {later} of {all} digests: {half_err}"
    );
    let tail = text(&half.stdout);
    assert!(
        rec_console.ends_with(&tail),
        "the console from the middle is not the end of the recording's\n--- recorded ---\n{rec_console}\n--- from the middle ---\n{tail}"
    );

    // Without the snapshot the log starts from, or with one that is neither it nor taken
    // in it, the replay refuses to start.
    let none = twinvm(&["replay", "--log", s(&log)], "");
    let err = text(&none.stderr);
    assert_eq!(none.status.code(), Some(1), "{err}");
    assert!(err.contains("was recorded from snapshot"), "{err}");

    let other = scratch("other.snap");
    let live = twinvm(
        &[
            "run",
            "--restore",
            s(&prompt),
            "--snapshot-at",
            &(p0 + 10).to_string(),
            s(&other),
        ],
        "poweroff -f\n",
    );
    assert_eq!(live.status.code(), Some(0), "{}", text(&live.stderr));
    let refused = twinvm(&["replay", "--restore", s(&other), "--log", s(&log)], "");
    let err = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("replay refuses to start from it"), "{err}");
}

/// Runs `twinvm run` with `args` against a snapshot that must be refused before anything
/// runs; returns its one error line.
fn refused(args: &[&str]) -> String {
    let out = twinvm(args, "");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("twinvm: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: one error line expected: {err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0].to_string()
}

#[test]
fn a_damaged_or_foreign_snapshot_is_one_clear_error() {
    let prompt = prompt_snapshot();
    let bytes = std::fs::read(&prompt).unwrap();

    let cut = scratch("cut.snap");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = refused(&["run", "--restore", s(&cut)]);
    assert!(e.contains("is truncated"), "{e}");

    let flipped = scratch("flipped.snap");
    let mut b = bytes.clone();
    let at = b.len() * 2 / 3;
    b[at] ^= 0x01;
    std::fs::write(&flipped, &b).unwrap();
    let e = refused(&["run", "--restore", s(&flipped)]);
    assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");

    let version = scratch("version.snap");
    let mut b = bytes.clone();
    b[8] = b[8].wrapping_add(1);
    std::fs::write(&version, &b).unwrap();
    let e = refused(&["run", "--restore", s(&version)]);
    assert!(e.contains("format version"), "{e}");

    let e = refused(&["run", "--restore", "/nonexistent/twinvm.snap"]);
    assert!(e.contains("/nonexistent/twinvm.snap"), "{e}");

    // The right file for another VM: other memory, a NIC, another command line, another
    // initramfs.
    let p = s(&prompt);
    let e = refused(&["run", "--restore", p, "--mem", "512"]);
    assert!(e.contains("pass --mem 256"), "{e}");
    let e = refused(&["run", "--restore", p, "--nic"]);
    assert!(e.contains("the snapshot was taken without one"), "{e}");
    let e = refused(&["run", "--restore", p, "--append", "twinvm.run=hello"]);
    assert!(e.contains("kernel command line"), "{e}");
    let initrd = scratch("other.cpio");
    std::fs::write(&initrd, b"another initramfs").unwrap();
    let e = refused(&["run", "--restore", p, "--initrd", s(&initrd)]);
    assert!(e.contains("initrd sha256"), "{e}");
}
