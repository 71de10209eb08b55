//! End-to-end networking: the guest's virtio-net card on a TAP in the `primary` namespace,
//! reached from the `client` namespace; and a primary/backup pair whose guest serves TCP,
//! with the backup replaying every received frame and the primary holding every
//! transmitted frame until the backup has acknowledged the log behind it.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use twinvm_tests::netns::{connect_from, Host, Topology, GUEST_IP, PREFIX};
use twinvm_tests::{Vm, BOOT_TIMEOUT, PROMPT};

fn guest_args() -> String {
    format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=counter")
}

fn service() -> SocketAddr {
    format!("{GUEST_IP}:7000").parse().unwrap()
}

/// Connects to the guest's counter service from `client`, retrying while the guest boots.
fn connect(client: &Host) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match connect_from(client, service(), Duration::from_secs(5)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("cannot reach the guest's service: {e}"),
        }
    }
}

/// Sends `n` requests on one connection and checks each answer is `<count> <request>` with
/// the count going up by one each time; returns the last count.
fn requests(stream: &mut std::net::TcpStream, from: usize, n: usize) -> u64 {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut last = None;
    for i in from..from + n {
        let req = format!("request-{i}");
        writeln!(stream, "{req}").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).expect("answer");
        let (count, echoed) = line.trim_end().split_once(' ').expect("`<n> <line>`");
        let count: u64 = count.parse().expect("count");
        assert_eq!(echoed, req, "answer {line:?}");
        if let Some(prev) = last {
            assert_eq!(count, prev + 1, "the count must go up by one: {line:?}");
        }
        last = Some(count);
    }
    last.unwrap()
}

#[test]
fn guest_on_a_tap_answers_ping_and_tcp_from_the_client_namespace() {
    let mut topo = Topology::new();
    let primary = topo.host("primary", 11, true);
    let client = topo.host("client", 1, false);
    let append = guest_args();
    let mut vm = Vm::spawn_in(
        Some(&primary.netns),
        &["run", "--tap", "tap0", "--append", &append],
    );
    vm.wait_for("twinvm-counter: listening", 0, BOOT_TIMEOUT);
    let ping = Topology::exec(
        &client,
        &["busybox", "ping", "-c", "3", "-W", "10", GUEST_IP],
    );
    assert!(
        ping.status.success(),
        "ping from the client failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let mut s = connect(&client);
    let last = requests(&mut s, 0, 20);
    assert_eq!(last, 20, "a fresh service counts from 1");
    drop(s);
    // A second connection sees the state the first left.
    let mut s = connect(&client);
    assert_eq!(requests(&mut s, 20, 5), 25);
    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{}", vm.stderr());
}

fn status_u64(path: &PathBuf, field: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v.get(field)?.as_u64()
}

#[test]
fn pair_with_a_nic_replays_every_frame_and_holds_frames_until_acked() {
    let mut topo = Topology::new();
    let primary = topo.host("primary", 11, true);
    let backup = topo.host("backup", 12, false);
    let client = topo.host("client", 1, false);
    let append = guest_args();
    let dir = std::env::temp_dir().join(format!("twinvm-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = dir.join("backup.console");
    let status = dir.join("primary.status");
    let timeouts = ["--peer-timeout-ms", "120000"];
    let listen = format!("{}:7300", backup.addr);
    let mut b_args = vec![
        "backup",
        "--listen",
        &listen,
        "--nic",
        "--console-log",
        console.to_str().unwrap(),
        "--append",
        &append,
    ];
    b_args.extend_from_slice(&timeouts);
    let mut bvm = Vm::spawn_in(Some(&backup.netns), &b_args);
    bvm.wait_for_stderr("backup listening on", Duration::from_secs(30));
    let mut p_args = vec![
        "primary",
        "--backup",
        &listen,
        "--tap",
        "tap0",
        "--status",
        status.to_str().unwrap(),
        "--append",
        &append,
    ];
    p_args.extend_from_slice(&timeouts);
    let mut pvm = Vm::spawn_in(Some(&primary.netns), &p_args);
    pvm.wait_for("twinvm-counter: listening", 0, BOOT_TIMEOUT);

    let mut s = connect(&client);
    assert_eq!(requests(&mut s, 0, 30), 30);

    // Stop the backup: the guest still gets the request and answers, but the answer's
    // frames stay on the primary until the backup acknowledges the log.
    bvm.freeze(true);
    let before = status_u64(&status, "position").unwrap_or(0);
    writeln!(s, "held-request").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let early = reader.read_line(&mut line);
    assert!(
        early.is_err() || line.is_empty(),
        "an answer left the primary while its backup could not acknowledge: {line:?}"
    );
    let after = status_u64(&status, "position").unwrap_or(0);
    bvm.freeze(false);
    assert!(
        after > before,
        "the primary's guest stopped running ({before} -> {after})"
    );
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    line.clear();
    reader
        .read_line(&mut line)
        .expect("the held answer after the backup resumed");
    assert_eq!(line.trim_end(), "31 held-request");
    assert_eq!(requests(&mut s, 31, 10), 41);
    drop(reader);
    drop(s);

    pvm.signal(libc::SIGTERM);
    let p = pvm.wait_exit(Duration::from_secs(120));
    assert_eq!(
        p.code(),
        Some(128 + libc::SIGTERM),
        "primary: {}",
        pvm.stderr()
    );
    let b = bvm.wait_exit(BOOT_TIMEOUT);
    let berr = bvm.stderr();
    assert_eq!(b.code(), Some(0), "backup: {berr}");
    assert!(berr.contains("state digests matched"), "{berr}");
    assert!(!berr.contains(" 0 state digests matched"), "{berr}");
    let replayed = std::fs::read(&console).unwrap();
    assert!(
        replayed == pvm.console().into_bytes(),
        "the backup's console differs from the primary's"
    );
}

/// Issue 15: a CPU-bound program in the guest (a loop that never leaves user mode, so never
/// exits to the VMM) does not stop the guest's TCP service: received frames and timer ticks
/// reach the guest at preemption points while the loop runs, and the counter answers.
#[test]
fn a_cpu_bound_guest_program_does_not_stop_its_tcp_service() {
    let mut topo = Topology::new();
    let primary = topo.host("primary", 11, true);
    let client = topo.host("client", 1, false);
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.svc=counter");
    let mut vm = Vm::spawn_in(
        Some(&primary.netns),
        &["run", "--tap", "tap0", "--append", &append],
    );
    let at = vm.wait_for(PROMPT, 0, BOOT_TIMEOUT);
    let mut stream = connect(&client);
    let before = requests(&mut stream, 0, 3);
    vm.type_text("timeout 30 sh -c 'while :; do :; done'; echo busy-done-$?\n");
    // The typed line comes back once the shell has read it; the loop starts right after.
    let at = vm.wait_for("busy-done-$?", at, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let after = requests(&mut stream, 3, 10);
    let took = t0.elapsed();
    assert_eq!(after, before + 10, "answers lost or repeated");
    let console = vm.console();
    assert!(
        !console.get(at..).unwrap_or("").contains("busy-done-"),
        "the busy loop had ended before the answers came ({took:?}):\n{console}"
    );
    // The loop itself ends by its timer.
    vm.wait_for("busy-done-143", at, Duration::from_secs(120));
    vm.type_text("poweroff -f\n");
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
}
