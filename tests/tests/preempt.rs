//! Issue 15: a guest program that computes without exits still gets its interrupts. On this
//! host guest user code runs natively and a busy loop never exits to the VMM; without
//! preemption `timeout 3 sh -c 'while :; do :; done'` never ends. Here it ends by its timer
//! under `record`, the recording holds preemption points, and the replay (which applies
//! them instead of running to them) matches every digest and every console byte; the same
//! in a live pair, whose backup replays the primary's preemption points as they come.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use logchannel::entry::Entry;
use logchannel::file::LogReader;
use twinvm_tests::{guest_dir, workspace_bin, Vm, BOOT_TIMEOUT, PROMPT};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinvm-preempt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Typed at the shell: a loop that never leaves user mode, ended only by `timeout`'s timer
/// (its SIGALRM, then the SIGTERM it sends, both need timer interrupts); then a CPU-bound
/// awk computation with a result to compare; then the guest's clocks around it.
const BUSY: &str = "s=$(cat /proc/uptime); timeout 3 sh -c 'while :; do :; done'; echo \"busy-ended-$?\"; awk 'BEGIN{x=0; for(i=0;i<3000000;i++) x=(x*31+i)%1000003; print \"awk-result-\" x}'; echo \"uptime $s -> $(cat /proc/uptime)\"; poweroff -f\n";

fn preempt_points(log: &std::path::Path) -> usize {
    LogReader::open(log)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| matches!(e, Entry::Preempt { .. }))
        .count()
}

#[test]
fn a_busy_loop_ends_by_its_timer_and_its_recording_replays_exactly() {
    let log = scratch("busy.log");
    let mut vm = Vm::spawn(&["record", "--log", log.to_str().unwrap()]);
    let at = vm.wait_for(PROMPT, 0, BOOT_TIMEOUT);
    let t0 = Instant::now();
    vm.type_text(BUSY);
    let at = vm.wait_for("busy-ended-", at, Duration::from_secs(120));
    let took = t0.elapsed();
    vm.wait_for("awk-result-", at, Duration::from_secs(120));
    let status = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "record: {}", vm.stderr());
    let console = vm.console();
    // `timeout` ends the loop with SIGTERM: 143 from the shell.
    assert!(
        console.contains("busy-ended-143"),
        "the busy loop did not end by its timer:\n{console}"
    );
    // Three seconds of guest time, plus the typing and the shell: far below the minutes it
    // would take if the loop were ended only by exits it does not make.
    assert!(
        took < Duration::from_secs(60),
        "the 3-second busy loop took {took:?}"
    );
    let points = preempt_points(&log);
    assert!(
        points > 0,
        "no preemption point in the recording of a busy loop"
    );

    let out = Command::new(workspace_bin("twinvm"))
        .args(["replay", "--log", log.to_str().unwrap()])
        .env("TWINVM_GUEST_DIR", guest_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "replay: {stderr}");
    assert!(stderr.contains("state digests matched"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        console,
        "the replay's console differs from the recording's ({points} preemption points)"
    );
}

#[test]
fn a_live_backup_follows_its_primarys_preemption_points() {
    let console_file = scratch("backup.console");
    let mut backup = Vm::spawn(&[
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--console-log",
        console_file.to_str().unwrap(),
        "--status",
        scratch("backup.status").to_str().unwrap(),
    ]);
    let addr = backup
        .wait_for_stderr("backup listening on ", Duration::from_secs(30))
        .trim()
        .to_string();
    let mut primary = Vm::spawn(&["primary", "--backup", &addr]);
    let at = primary.wait_for(PROMPT, 0, BOOT_TIMEOUT);
    primary.type_text(BUSY);
    primary.wait_for("awk-result-", at, Duration::from_secs(180));
    let p = primary.wait_exit(Duration::from_secs(180));
    assert_eq!(p.code(), Some(0), "primary: {}", primary.stderr());
    let b = backup.wait_exit(BOOT_TIMEOUT);
    assert_eq!(b.code(), Some(0), "backup: {}", backup.stderr());
    let console = primary.console();
    assert!(console.contains("busy-ended-143"), "{console}");
    let replayed = std::fs::read(&console_file).unwrap();
    assert!(
        replayed == console.into_bytes(),
        "the backup's console differs from the primary's"
    );
}
