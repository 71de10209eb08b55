//! End-to-end record and replay on this machine's KVM: a workload that is hostile to replay
//! (it reads the clocks, the RTC and /dev/urandom, sleeps, forks, and prints a running hash
//! of what it saw), typed at the shell of a guest restored from the cached prompt snapshot
//! (see `twinvm_tests::snapshots`; booting is tested in boot.rs), recorded once and
//! replayed from the same snapshot; damaged logs are refused.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use logchannel::entry::Entry;
use logchannel::file::{rewrite_entry, LogReader};
use twinvm_tests::snapshots::prompt_snapshot;
use twinvm_tests::twinvm_typing;

/// One recording shared by the tests of this file (it takes a guest boot).
struct Recording {
    log: PathBuf,
    console: Vec<u8>,
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinvm-rr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn twinvm(args: &[&str]) -> Output {
    twinvm_typing(args, "")
}

/// The workload, typed at the prompt: the console is drained before the guest powers off.
const HOSTILE: &str = "twinvm-hostile 20; echo hostile exit $?; twinvm-drain; poweroff -f\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn recording() -> &'static Recording {
    static REC: OnceLock<Recording> = OnceLock::new();
    REC.get_or_init(|| {
        let log = scratch("hostile.log");
        let snap = prompt_snapshot();
        let out = twinvm_typing(
            &[
                "record",
                "--restore",
                snap.to_str().unwrap(),
                "--log",
                log.to_str().unwrap(),
                "--digest-interval",
                "2000",
            ],
            HOSTILE,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "record failed: {}",
            text(&out.stderr)
        );
        let console = text(&out.stdout);
        assert!(
            console.contains("hostile done hash"),
            "the workload did not finish:\n{console}"
        );
        assert!(console.contains("hostile exit 0"), "{console}");
        Recording {
            log,
            console: out.stdout,
        }
    })
}

fn replay(log: &Path) -> Output {
    let snap = prompt_snapshot();
    twinvm(&[
        "replay",
        "--restore",
        snap.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ])
}

/// Entries of a log, in order.
fn entries(log: &Path) -> Vec<Entry> {
    LogReader::open(log)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The "log entry N" a divergence report names.
fn diverged_entry(stderr: &str) -> u64 {
    let at = stderr
        .find("log entry ")
        .unwrap_or_else(|| panic!("no divergence report in: {stderr}"));
    stderr[at + 10..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn replays_match_the_recording_byte_for_byte_and_digest_for_digest() {
    let rec = recording();
    let digests = entries(&rec.log)
        .iter()
        .filter(|e| matches!(e, Entry::Digest(_)))
        .count();
    assert!(digests >= 3, "too few digests to check anything: {digests}");
    for round in 0..2 {
        let out = replay(&rec.log);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "replay {round} failed: {err}");
        assert!(
            out.stdout == rec.console,
            "replay {round}: console differs from the recording\n--- recorded ---\n{}\n--- replayed ---\n{}",
            text(&rec.console),
            text(&out.stdout)
        );
        assert!(
            err.contains(&format!("{digests} state digests matched")),
            "replay {round}: {err}"
        );
    }
}

/// Flips one bit in entry `index` (through `f`, checksum fixed up), replays, and checks that
/// the replay stops with a divergence at or after that entry.
fn assert_flip_detected(name: &str, pick: impl Fn(&Entry) -> bool, f: impl FnOnce(&mut Entry)) {
    let rec = recording();
    let all = entries(&rec.log);
    let candidates: Vec<usize> = (0..all.len()).filter(|&i| pick(&all[i])).collect();
    assert!(!candidates.is_empty(), "{name}: no entry to flip");
    // One from the middle of the run.
    let index = candidates[candidates.len() / 2] as u64;
    let copy = scratch(&format!("flip-{name}.log"));
    std::fs::copy(&rec.log, &copy).unwrap();
    rewrite_entry(&copy, index, f).unwrap();
    let out = replay(&copy);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{name}: replay did not end as diverged (status 5): {err}"
    );
    assert!(err.contains("replay diverged at position"), "{name}: {err}");
    let at = diverged_entry(&err);
    assert!(
        at >= index,
        "{name}: divergence reported at entry {at}, before the flipped entry {index}: {err}"
    );
}

#[test]
fn a_flipped_injection_vector_is_caught() {
    assert_flip_detected(
        "inject",
        |e| matches!(e, Entry::Inject { .. }),
        |e| {
            if let Entry::Inject { vector, .. } = e {
                *vector ^= 1;
            }
        },
    );
}

#[test]
fn a_flipped_interrupt_line_is_caught() {
    // Bit 0 of the line turns a timer tick (IRQ 0) into IRQ 1: the tick the recording
    // delivered never comes, which the replay must notice.
    assert_flip_detected(
        "irq-line",
        |e| matches!(e, Entry::IrqLine { line: 0, .. }),
        |e| {
            if let Entry::IrqLine { line, .. } = e {
                *line ^= 1;
            }
        },
    );
}

#[test]
fn a_flipped_digest_is_caught() {
    assert_flip_detected(
        "digest",
        |e| matches!(e, Entry::Digest(d) if !d.pages.is_empty()),
        |e| {
            if let Entry::Digest(d) = e {
                d.pages[0].1 ^= 1;
            }
        },
    );
}

#[test]
fn a_truncated_log_is_a_clear_error() {
    let rec = recording();
    let bytes = std::fs::read(&rec.log).unwrap();
    // Cut inside a frame, a third of the way in.
    let cut = scratch("cut.log");
    std::fs::write(&cut, &bytes[..bytes.len() / 3 + 3]).unwrap();
    let out = replay(&cut);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // Besides the note saying which host CPU the replay runs on (CPUID placement), one line.
    let lines = err
        .lines()
        .filter(|l| !l.starts_with("twinvm: guest CPUID is not trapped"))
        .count();
    assert_eq!(lines, 1, "one error line expected: {err}");
    assert!(
        err.contains("truncated") || err.contains("Truncated"),
        "{err}"
    );
    assert!(
        err.contains("offset"),
        "the error must name the offset: {err}"
    );
}

#[test]
fn replay_refuses_another_image() {
    let rec = recording();
    let other = scratch("other-initrd.cpio");
    std::fs::write(&other, b"not the recorded initramfs").unwrap();
    let snap = prompt_snapshot();
    let out = twinvm(&[
        "replay",
        "--restore",
        snap.to_str().unwrap(),
        "--log",
        rec.log.to_str().unwrap(),
        "--initrd",
        other.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not the one recorded"), "{err}");
}

#[test]
fn a_missing_or_garbage_log_is_a_clear_error() {
    let out = replay(Path::new("/nonexistent/twinvm.log"));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("twinvm: error: "), "{err}");
    let garbage = scratch("garbage.log");
    std::fs::write(&garbage, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let out = replay(&garbage);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("magic") || err.contains("Magic"), "{err}");
}
