//! End-to-end failover in network namespaces: an arbiter, a primary and a backup with the
//! guest's card on TAPs, and a client keeping one TCP connection to the guest's counter
//! service. The primary is killed with SIGKILL mid-stream; the backup wins the arbiter's
//! test-and-set, goes live, announces the guest's MAC, and the same connection carries on.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use twinvm_tests::netns::{
    connect_from, start_arbiter, ArbiterProcess, Host, Topology, GUEST_IP, PREFIX,
};
use twinvm_tests::{Vm, BOOT_TIMEOUT, PROMPT};

fn ask(reader: &mut BufReader<std::net::TcpStream>, s: &mut std::net::TcpStream, req: &str) -> u64 {
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).expect("answer");
    let (count, echoed) = line.trim_end().split_once(' ').expect("`<n> <line>`");
    assert_eq!(echoed, req, "answer {line:?}");
    count.parse().expect("count")
}

/// An arbiter, a primary, a backup and a client, with the guest's counter service up and
/// one client connection open.
struct Pair {
    topo: Topology,
    primary_host: Host,
    client: Host,
    arb: Host,
    dir: std::path::PathBuf,
    arbiter: Option<ArbiterProcess>,
    primary: Vm,
    backup: Vm,
}

/// Starts the pair; with `direct`, the log channel runs over a private link `lc0` between
/// the primary and the backup (which a test can cut) instead of the shared segment.
fn start_pair(name: &str, direct: bool) -> Pair {
    start_pair_with(name, direct, &[], "counter")
}

/// [`start_pair`], with extra arguments for the backup and the guest's run script.
fn start_pair_with(name: &str, direct: bool, backup_extra: &[&str], run: &str) -> Pair {
    start_pair_guest(
        name,
        direct,
        backup_extra,
        &format!("twinvm.run={run}"),
        "twinvm-counter: listening",
    )
}

/// [`start_pair_with`], with the guest's own command-line words (`twinvm.run=...` or none,
/// for an interactive shell) and what the primary's console shows when the guest is ready.
fn start_pair_guest(
    name: &str,
    direct: bool,
    backup_extra: &[&str],
    guest: &str,
    ready: &str,
) -> Pair {
    let mut topo = Topology::new();
    let primary = topo.host("primary", 11, true);
    let backup = topo.host("backup", 12, true);
    let client = topo.host("client", 1, false);
    let arb = topo.host("arbiter", 13, false);
    let listen_ip = if direct {
        topo.direct_link(&primary, &backup).1
    } else {
        backup.addr.clone()
    };
    let dir = std::env::temp_dir().join(format!("twinvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let arbiter = start_arbiter(&arb, &dir).expect("start the arbiter");
    let (arb_addr, token) = (arbiter.addr.clone(), arbiter.token.clone());
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} {guest}");
    let listen = format!("{listen_ip}:7300");
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
    b_args.extend_from_slice(backup_extra);
    let mut bvm = Vm::spawn_in(Some(&backup.netns), &b_args);
    bvm.wait_for_stderr("backup listening on", Duration::from_secs(30));
    let mut p_args = vec!["primary", "--backup", &listen];
    p_args.extend_from_slice(&common);
    let mut pvm = Vm::spawn_in(Some(&primary.netns), &p_args);
    pvm.wait_for(ready, 0, BOOT_TIMEOUT);
    Pair {
        topo,
        primary_host: primary,
        client,
        arb,
        dir,
        arbiter: Some(arbiter),
        primary: pvm,
        backup: bvm,
    }
}

/// One client connection to the guest's counter service.
struct Session {
    s: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl Session {
    fn open(client: &Host) -> Session {
        let service: SocketAddr = format!("{GUEST_IP}:7000").parse().unwrap();
        let s = connect_from(client, service, Duration::from_secs(30)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let reader = BufReader::new(s.try_clone().unwrap());
        Session { s, reader }
    }

    /// Sends requests `from..=to` and checks each count is the request's number.
    fn requests(&mut self, tag: &str, from: u64, to: u64) {
        for i in from..=to {
            assert_eq!(ask(&mut self.reader, &mut self.s, &format!("{tag}-{i}")), i);
        }
    }
}

#[test]
fn killing_the_backup_lets_the_primary_go_on_alone() {
    let mut pair = start_pair("backup-dies", false);
    let mut session = Session::open(&pair.client);
    session.requests("before", 1, 10);
    pair.backup.signal(libc::SIGKILL);
    pair.backup.wait_exit(Duration::from_secs(30));
    // Output flows again once the primary has the arbiter's answer.
    session.requests("after", 11, 20);
    let err = pair.primary.stderr();
    assert!(err.contains("primary -> alone"), "{err}");
    pair.primary.signal(libc::SIGTERM);
    pair.primary.wait_exit(Duration::from_secs(60));
    drop(pair.topo);
}

#[test]
fn cutting_the_log_channel_leaves_exactly_one_side_running() {
    let mut pair = start_pair("split", true);
    let mut session = Session::open(&pair.client);
    session.requests("before", 1, 10);
    // Cut the log channel only: both sides still reach the arbiter and the network.
    Topology::set_link(&pair.primary_host, "lc0", false);
    // The loser halts (exit status 4); the winner goes on and keeps answering.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (winner, loser) = loop {
        if let Some(st) = pair.primary.exited() {
            break ("backup", ("primary", st, pair.primary.stderr()));
        }
        if let Some(st) = pair.backup.exited() {
            break ("primary", ("backup", st, pair.backup.stderr()));
        }
        assert!(
            Instant::now() < deadline,
            "neither side halted after the cut"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (loser_name, st, loser_err) = loser;
    assert_eq!(
        st.code(),
        Some(4),
        "{loser_name} should halt with status 4: {loser_err}"
    );
    assert!(loser_err.contains("halted"), "{loser_err}");
    session.requests("after", 11, 20);
    let still = if winner == "primary" {
        &mut pair.primary
    } else {
        &mut pair.backup
    };
    assert!(
        still.exited().is_none(),
        "the winner ({winner}) must still run"
    );
    eprintln!("split brain settled: {winner} went on, {loser_name} halted");
}

#[test]
fn without_the_arbiters_answer_nobody_goes_on_alone() {
    let mut pair = start_pair("no-arbiter", false);
    let mut session = Session::open(&pair.client);
    session.requests("before", 1, 10);
    // The arbiter goes away, then the primary dies.
    drop(pair.arbiter.take());
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait_exit(Duration::from_secs(30));
    // The backup replays what it has, notices the loss, and finds no arbiter: it must
    // wait, with its guest paused, rather than go live.
    pair.backup
        .wait_for_stderr("the arbiter did not answer", BOOT_TIMEOUT);
    session
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    writeln!(session.s, "during-11").unwrap();
    let mut line = String::new();
    let r = session.reader.read_line(&mut line);
    assert!(
        r.is_err() || line.is_empty(),
        "the backup answered without the arbiter's answer: {line:?}"
    );
    assert!(
        pair.backup.exited().is_none(),
        "the backup must wait, not exit"
    );
    let err = pair.backup.stderr();
    assert!(!err.contains("live-after-failover"), "{err}");
    // The arbiter comes back (same data): the backup wins and answers the waiting request.
    let arbiter = start_arbiter(&pair.arb, &pair.dir).expect("restart the arbiter");
    pair.arbiter = Some(arbiter);
    session
        .s
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    line.clear();
    session
        .reader
        .read_line(&mut line)
        .expect("answer after the arbiter returned");
    assert_eq!(line.trim_end(), "11 during-11");
    session.requests("after", 12, 15);
    assert!(pair.backup.stderr().contains("-> live-after-failover"));
}

#[test]
fn a_diverged_backup_reports_it_and_the_primary_goes_on_alone_at_once() {
    // The backup flips a bit of its guest's memory mid-boot: its next digest differs.
    let status = std::env::temp_dir().join(format!(
        "twinvm-diverge-{}/backup.status",
        std::process::id()
    ));
    std::fs::create_dir_all(status.parent().unwrap()).unwrap();
    let status_arg = status.to_str().unwrap().to_string();
    let mut pair = start_pair_with(
        "diverge",
        false,
        &["--test-corrupt-at", "50000", "--status", &status_arg],
        "counter",
    );
    let st = pair.backup.wait_exit(Duration::from_secs(30));
    let berr = pair.backup.stderr();
    assert_eq!(st.code(), Some(5), "the backup ends as diverged: {berr}");
    assert!(berr.contains("replay diverged at position 50000"), "{berr}");
    assert!(
        berr.contains("page gfn 0x1 (gpa 0x1000)"),
        "the flipped page is named: {berr}"
    );
    assert!(berr.contains("told the primary"), "{berr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status).unwrap()).unwrap();
    assert_eq!(json["state"], "diverged", "{json}");
    assert_eq!(json["divergence"]["position"], 50000, "{json}");
    // The primary learned it from the backup (not from a timeout) and went on alone.
    let perr = pair.primary.stderr();
    assert!(
        perr.contains("diverged from the log at position 50000"),
        "{perr}"
    );
    assert!(perr.contains("primary -> alone"), "{perr}");
    let mut session = Session::open(&pair.client);
    session.requests("alone", 1, 10);
    pair.primary.signal(libc::SIGTERM);
    pair.primary.wait_exit(Duration::from_secs(60));
}

#[test]
fn killing_the_primary_hands_the_tcp_connection_to_the_backup() {
    let mut pair = start_pair("primary-dies", false);
    let mut session = Session::open(&pair.client);
    session.requests("before", 1, 20);

    pair.primary.signal(libc::SIGKILL);
    let killed = Instant::now();
    let st = pair.primary.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), None, "the primary was killed by a signal");

    // The same connection, against the backup now: every request answered once, the count
    // carrying on from the primary's.
    session.requests("after", 21, 21);
    let takeover = killed.elapsed();
    session.requests("after", 22, 40);
    eprintln!("takeover: first answer from the backup {takeover:.2?} after the kill");
    let err = pair.backup.stderr();
    assert!(err.contains("-> live-after-failover"), "{err}");
    assert!(err.contains("won generation 1"), "{err}");
    pair.backup.signal(libc::SIGTERM);
    pair.backup.wait_exit(Duration::from_secs(60));
}

/// The numbers of every complete `tick N` line in a transcript, in order. The transcript the
/// outside saw is the primary's output followed by the backup's, which may join in the middle
/// of a line: a fragment that does not end a `tick N` line is skipped.
fn ticks(transcript: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut rest = transcript;
    while let Some(i) = rest.find("tick ") {
        rest = &rest[i + 5..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        // The guest's tty writes "\r\n" for "\n" (ONLCR).
        let end = &rest[digits.len()..];
        if !digits.is_empty() && (end.starts_with('\n') || end.starts_with("\r\n")) {
            out.push(digits.parse().expect("digits"));
        }
    }
    out
}

#[test]
fn console_output_survives_the_failover_at_least_once_and_in_order() {
    let mut pair = start_pair_with("console", false, &[], "ticker");
    // "tick 21" is on the console only once "tick 20" and its line end are.
    pair.primary.wait_for("tick 21", 0, BOOT_TIMEOUT);
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait_exit(Duration::from_secs(30));
    let primary = pair.primary.console();
    let last = *ticks(&primary).last().expect("ticks before the kill");
    pair.backup
        .wait_for_stderr("-> live-after-failover", BOOT_TIMEOUT);
    pair.backup
        .wait_for(&format!("tick {}", last + 11), 0, BOOT_TIMEOUT);
    let err = pair.backup.stderr();
    assert!(err.contains("going live: emitting"), "{err}");
    // What the outside saw: every line from 1 on, in order, with one step back at the seam
    // of at most what the primary printed in its last moments (the bound the README states).
    let seen = ticks(&(primary + &pair.backup.console()));
    let mut back = Vec::new();
    for w in seen.windows(2) {
        if w[1] <= w[0] {
            back.push(w[0] + 1 - w[1]);
        } else {
            assert_eq!(
                w[1],
                w[0] + 1,
                "line(s) lost between {} and {}: {seen:?}",
                w[0],
                w[1]
            );
        }
    }
    assert_eq!(seen[0], 1, "{seen:?}");
    assert!(
        back.len() <= 1,
        "more than one step back: {back:?} in {seen:?}"
    );
    let repeated = back.first().copied().unwrap_or(0);
    assert!(
        repeated <= 20,
        "the backup repeated {repeated} lines: {seen:?}"
    );
    eprintln!("console across the failover: the primary printed up to tick {last}; {repeated} line(s) repeated");
    pair.backup.signal(libc::SIGTERM);
    pair.backup.wait_exit(Duration::from_secs(60));
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The numbers after `marker` on one line of `console`.
fn numbers_after(console: &str, marker: &str) -> Option<Vec<i64>> {
    let i = console.find(marker)?;
    let line = console[i + marker.len()..].lines().next()?;
    line.split_whitespace()
        .take_while(|w| !w.starts_with("end-"))
        .map(|w| w.parse().ok())
        .collect()
}

#[test]
fn a_guest_that_set_its_rtc_reads_it_on_after_failover() {
    // An interactive shell (typed commands), with the counter service in the background.
    let mut pair = start_pair_guest("rtc", false, &[], "twinvm.svc=counter", PROMPT);
    // The guest sets its clock a day ahead and writes it to the RTC while the backup
    // replays it: the backup's RTC model sees the writes with its replay clock stopped.
    let ahead = 86_400;
    let at = pair.primary.console_len();
    // `$((1+1))`: the shell's echo of the typed line does not match what it prints.
    pair.primary.type_text(&format!(
        "date -s @{} >/dev/null && hwclock -w -u && echo rtc-set-$((1+1))\n",
        unix_now() + ahead
    ));
    pair.primary
        .wait_for("rtc-set-2\r\n", at, Duration::from_secs(300));
    pair.primary.signal(libc::SIGKILL);
    let killed = Instant::now();
    pair.primary.wait_exit(Duration::from_secs(30));
    pair.backup
        .wait_for_stderr("-> live-after-failover", BOOT_TIMEOUT);
    let takeover = killed.elapsed().as_secs() as i64;
    let at = pair.backup.console_len();
    pair.backup.type_text(
        "echo rtc-now-$((2+2)) $(cat /sys/class/rtc/rtc0/since_epoch) $(date +%s) end-$((3+3))\n",
    );
    pair.backup.wait_for(" end-6", at, Duration::from_secs(300));
    let console = pair.backup.console();
    let asked = unix_now();
    let got = numbers_after(&console[at..], "rtc-now-4 ")
        .unwrap_or_else(|| panic!("no RTC reading on the survivor's console: {console}"));
    let [rtc, sys] = got[..] else {
        panic!("expected the RTC and the system time: {got:?} in {console}");
    };
    // The guest's clock carries on from the replayed time, never ahead of the host's: behind
    // it by the takeover, by the time the guest sat idle before the kill (the backup's clock
    // starts where the guest last read it) and by the console's delay on a loaded host
    // (measured: 7 s behind with a 2 s takeover at load 11). The bug was decades off.
    let want = asked + ahead;
    let (ahead_slack, behind_slack) = (5, 60);
    for (what, t) in [("RTC", rtc), ("system time", sys)] {
        assert!(
            t <= want + ahead_slack && t >= want - takeover - behind_slack,
            "the survivor's {what} reads {t}, want {want} (takeover {takeover} s; {} s off)",
            t - want
        );
    }
    assert!(
        (rtc - sys).abs() <= 2,
        "RTC {rtc} and system time {sys} disagree"
    );
    eprintln!(
        "after failover: RTC {} s, system time {} s from the host's + 1 day (takeover {takeover} s)",
        rtc - want,
        sys - want
    );
    pair.backup.signal(libc::SIGTERM);
    pair.backup.wait_exit(Duration::from_secs(60));
}

/// A request to the arbiter's HTTP API from inside `from`'s namespace (curl, with the
/// token; `body` as JSON if given): the JSON answer.
fn arbiter_request(
    from: &Host,
    arbiter: &ArbiterProcess,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let token = std::fs::read_to_string(&arbiter.token).unwrap();
    let auth = format!("Authorization: Bearer {}", token.trim());
    let url = format!("http://{}/v1/vms/twinvm{path}", arbiter.addr);
    let body = body.map(|b| b.to_string());
    let mut args = vec!["curl", "-sS", "--max-time", "10", "-H", &auth];
    if let Some(b) = &body {
        args.extend(["-H", "Content-Type: application/json", "-d", b]);
    }
    args.push(&url);
    let out = Topology::exec(from, &args);
    assert!(out.status.success(), "curl: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The arbiter's entry for the VM, read from inside `from`'s namespace.
fn arbiter_entry(from: &Host, arbiter: &ArbiterProcess) -> serde_json::Value {
    arbiter_request(from, arbiter, "", None)
}

/// A test-and-set asked of the arbiter from inside `from`'s namespace: its outcome.
fn arbiter_claim(from: &Host, arbiter: &ArbiterProcess, claimant: &str, generation: u64) -> String {
    let body = serde_json::json!({ "claimant": claimant, "generation": generation });
    let v = arbiter_request(from, arbiter, "/test-and-set", Some(body));
    v["outcome"].as_str().unwrap_or_default().to_string()
}

/// Issue #14, items 3 and 4: the primary is killed (SIGKILL), the backup goes live, a new
/// backup joins it (`backup --join`: the live side re-pairs at the arbiter, sends its
/// memory in pre-copy rounds and its state, then its log), and the new primary is killed in
/// turn, three times over, with one client connection carrying on throughout, its counter
/// continuous, and the arbiter's generation rising at each re-protect. A joining backup with
/// the wrong pair secret is refused first and the live side carries on; an old generation's
/// claim is refused as stale; the last backup's replay checks its digests from the state
/// transfer on.
#[test]
fn chained_failovers_with_a_new_backup_joining_each_time() {
    let mut topo = Topology::new();
    let hosts = [topo.host("a", 11, true), topo.host("b", 12, true)];
    let client = topo.host("client", 1, false);
    let arb = topo.host("arbiter", 13, false);
    let dir = std::env::temp_dir().join(format!("twinvm-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let arbiter = start_arbiter(&arb, &dir).expect("start the arbiter");
    let secret = dir.join("pair.secret");
    std::fs::write(&secret, "twinvm-chain-pair-secret-0123456789\n").unwrap();
    let wrong = dir.join("wrong.secret");
    std::fs::write(&wrong, "not-the-pair-secret-but-long-enough\n").unwrap();
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=counter");
    let listen: Vec<String> = hosts.iter().map(|h| format!("{}:7300", h.addr)).collect();
    // Side `i` (on host i) has its next backup on the other host.
    let args = |role: &[&str], i: usize, secret: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = role.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--tap",
                "tap0",
                "--arbiter",
                &arbiter.addr,
                "--arbiter-token-file",
                &arbiter.token,
                // A SIGKILL closes the socket, seen at once; the timeout only bounds a silent
                // peer, and 2 s gave false losses on this loaded 2-core host (see README).
                "--peer-timeout-ms",
                "6000",
                "--pair-secret-file",
                secret.to_str().unwrap(),
                "--next-backup",
                &listen[1 - i],
                "--append",
                &append,
            ]
            .map(String::from),
        );
        v
    };
    let spawn = |i: usize, v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        Vm::spawn_in(Some(&hosts[i].netns), &v)
    };
    let mut backup = spawn(1, args(&["backup", "--listen", &listen[1]], 1, &secret));
    backup.wait_for_stderr("backup listening on", Duration::from_secs(30));
    let mut primary = spawn(0, args(&["primary", "--backup", &listen[1]], 0, &secret));
    primary.wait_for("twinvm-counter: listening", 0, BOOT_TIMEOUT);
    let mut session = Session::open(&client);
    let mut n = 0u64;
    let mut more = |session: &mut Session, tag: &str, k: u64| {
        session.requests(tag, n + 1, n + k);
        n += k;
    };
    more(&mut session, "paired", 5);
    // `primary` runs on host p, `backup` on the other.
    let mut p = 0usize;
    let mut generations = vec![arbiter_entry(&client, &arbiter)["generation"]
        .as_u64()
        .unwrap_or(1)];
    for round in 1..=3u64 {
        primary.signal(libc::SIGKILL);
        primary.wait_exit(Duration::from_secs(30));
        backup.wait_for_stderr("-> live-after-failover", BOOT_TIMEOUT);
        more(&mut session, &format!("live{round}"), 3);
        let (live, dead) = (1 - p, p);
        if round == 1 {
            // A joining backup with the wrong pair secret: refused at the handshake; the
            // live side goes on alone, unharmed, and keeps waiting for a real one.
            let mut stranger = spawn(
                dead,
                args(
                    &["backup", "--join", "--listen", &listen[dead]],
                    dead,
                    &wrong,
                ),
            );
            backup.wait_for_stderr("re-protect: the new backup at", Duration::from_secs(60));
            more(&mut session, "stranger", 3);
            assert!(
                !backup.stderr().contains("re-protected at position"),
                "{}",
                backup.stderr()
            );
            stranger.signal(libc::SIGKILL);
            stranger.wait_exit(Duration::from_secs(30));
            // A joining backup that vanishes once the live side has started its transfer (it
            // exits with the transfer unread): the live side lets it go, claims the
            // generation it had opened for it, and goes on alone.
            let mut vanisher = spawn(
                dead,
                args(
                    &[
                        "backup",
                        "--join",
                        "--listen",
                        &listen[dead],
                        "--test-vanish-on-join",
                    ],
                    dead,
                    &secret,
                ),
            );
            let st = vanisher.wait_exit(Duration::from_secs(300));
            assert_eq!(st.code(), Some(1), "{}", vanisher.stderr());
            backup.wait_for_stderr("re-protect failed", Duration::from_secs(60));
            backup.wait_for_stderr("re-protect: won generation", Duration::from_secs(60));
            more(&mut session, "vanished", 3);
            assert!(backup.exited().is_none(), "{}", backup.stderr());
        }
        // The backup that joins in round 1 re-protects with stop-and-copy in round 2 (the
        // whole machine at one delivery point); the others with pre-copy rounds.
        let mut role = vec!["backup", "--join", "--listen", &listen[dead]];
        if round == 1 {
            role.extend(["--reprotect-rounds", "0"]);
        }
        let mut joiner = spawn(dead, args(&role, dead, &secret));
        let line = backup.wait_for_stderr("re-protected at position", Duration::from_secs(300));
        eprintln!("round {round}: re-protected at position{line}");
        if round == 2 {
            assert!(line.contains("pages per round ["), "{line}");
            assert!(!line.contains("round [0, "), "{line}");
            let rounds = line.split("pages per round [").nth(1).unwrap_or_default();
            assert!(
                !rounds.split(']').next().unwrap_or_default().contains(','),
                "stop-and-copy is one round: {line}"
            );
        }
        joiner.wait_for_stderr("joined the live side at position", Duration::from_secs(60));
        more(&mut session, &format!("reprotected{round}"), 3);
        let g = arbiter_entry(&client, &arbiter)["generation"]
            .as_u64()
            .unwrap();
        assert!(
            g > *generations.last().unwrap(),
            "generation {g} after re-protect {round}: {generations:?}"
        );
        generations.push(g);
        assert!(joiner.exited().is_none(), "{}", joiner.stderr());
        // The new pair's roles: the live side is the primary, the joiner its backup.
        primary = backup;
        backup = joiner;
        p = live;
    }
    // An old generation's holder that comes back is refused.
    assert_eq!(
        arbiter_claim(&client, &arbiter, "old-holder@test", generations[0]),
        "stale"
    );
    // The last pair ends cleanly: the backup replays to the primary's stop, every digest
    // matched since it joined.
    primary.signal(libc::SIGTERM);
    primary.wait_exit(Duration::from_secs(120));
    let st = backup.wait_exit(Duration::from_secs(120));
    let err = backup.stderr();
    assert!(st.success(), "the last backup: {st}: {err}");
    let matched: u64 = err
        .split("state digests matched")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no digest count: {err}"));
    assert!(matched > 0, "{err}");
    eprintln!(
        "chained failovers: {} requests on one connection, generations {generations:?}, the last backup matched {matched} digests",
        n
    );
    let _ = p;
    drop(topo);
}
