//! End-to-end failover in network namespaces: an arbiter, a primary and a backup with the
//! guest's card on TAPs, and a client keeping one TCP connection to the guest's counter
//! service. The primary is killed with SIGKILL mid-stream; the backup wins the arbiter's
//! test-and-set, goes live, announces the guest's MAC, and the same connection carries on.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use twinvm_tests::netns::{connect_from, Host, Topology, GUEST_IP, PREFIX};
use twinvm_tests::{workspace_bin, Vm, BOOT_TIMEOUT};

/// The arbiter process, killed when dropped.
struct Arbiter(Child);

impl Drop for Arbiter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_arbiter(host: &Host, dir: &std::path::Path) -> (Arbiter, String, String) {
    let token = dir.join("arbiter.token");
    std::fs::write(&token, "failover-test-secret-0123456789").unwrap();
    let addr = format!("{}:7500", host.addr);
    let child = Command::new("ip")
        .args(["netns", "exec", &host.netns])
        .arg(workspace_bin("twinvm-arbiter"))
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir.join("arbiter-data"))
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the arbiter");
    (Arbiter(child), addr, token.to_str().unwrap().to_string())
}

fn ask(reader: &mut BufReader<std::net::TcpStream>, s: &mut std::net::TcpStream, req: &str) -> u64 {
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).expect("answer");
    let (count, echoed) = line.trim_end().split_once(' ').expect("`<n> <line>`");
    assert_eq!(echoed, req, "answer {line:?}");
    count.parse().expect("count")
}

#[test]
fn killing_the_primary_hands_the_tcp_connection_to_the_backup() {
    let mut topo = Topology::new();
    let primary = topo.host("primary", 11, true);
    let backup = topo.host("backup", 12, true);
    let client = topo.host("client", 1, false);
    let arb = topo.host("arbiter", 13, false);
    let dir = std::env::temp_dir().join(format!("twinvm-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_arbiter, arb_addr, token) = start_arbiter(&arb, &dir);
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=counter");
    let listen = format!("{}:7300", backup.addr);
    let common = [
        "--tap",
        "tap0",
        "--arbiter",
        &arb_addr,
        "--arbiter-token-file",
        &token,
        "--peer-timeout-ms",
        "2000",
        "--append",
        &append,
    ];
    let console = dir.join("backup.console");
    let mut b_args = vec![
        "backup",
        "--listen",
        &listen,
        "--console-log",
        console.to_str().unwrap(),
    ];
    b_args.extend_from_slice(&common);
    let mut bvm = Vm::spawn_in(Some(&backup.netns), &b_args);
    bvm.wait_for_stderr("backup listening on", Duration::from_secs(30));
    let mut p_args = vec!["primary", "--backup", &listen];
    p_args.extend_from_slice(&common);
    let mut pvm = Vm::spawn_in(Some(&primary.netns), &p_args);
    pvm.wait_for("twinvm-counter: listening", 0, BOOT_TIMEOUT);

    let service: SocketAddr = format!("{GUEST_IP}:7000").parse().unwrap();
    let mut s = connect_from(&client, service, Duration::from_secs(30)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for i in 1..=20u64 {
        assert_eq!(ask(&mut reader, &mut s, &format!("before-{i}")), i);
    }

    pvm.signal(libc::SIGKILL);
    let killed = Instant::now();
    let st = pvm.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), None, "the primary was killed by a signal");

    // The same connection, against the backup now: every request answered once, the count
    // carrying on from the primary's.
    let mut first_answer = None;
    for i in 21..=40u64 {
        assert_eq!(ask(&mut reader, &mut s, &format!("after-{i}")), i);
        first_answer.get_or_insert_with(|| killed.elapsed());
    }
    let takeover = first_answer.unwrap();
    eprintln!("takeover: first answer from the backup {takeover:.2?} after the kill");
    let err = bvm.stderr();
    assert!(err.contains("-> live-after-failover"), "{err}");
    assert!(err.contains("won generation 1"), "{err}");
    bvm.signal(libc::SIGTERM);
    bvm.wait_exit(Duration::from_secs(60));
}
