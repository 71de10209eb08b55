//! Benchmark: failover as a client sees it.
//!
//! Each run builds its own network of namespaces (`tests/src/netns.rs`: a primary and a
//! backup with the guest's card on TAPs, a client, an arbiter), starts the arbiter, a backup
//! and a primary (`--peer-timeout-ms 2000`) whose guest serves its TCP counter, and keeps ONE
//! client connection to it (a thread of this process in the client namespace) sending a
//! request every 200 ms and checking every answer (`<count> <request>`, the count one more
//! each time). After 10 answers it kills the primary with SIGKILL and goes on until 10
//! answers have come after the kill. Per run it prints the takeover time (kill -> first
//! answer after it), the longest gap between two answers, when the backup printed
//! `-> live-after-failover`, and the backup's replay lag at the kill (primary minus backup
//! position, from both `--status` files just before the kill); then median / min / max.
//!
//! A run fails (exit status 1, after the other runs and the figures) on any anomaly in the
//! answers, a broken connection, or a process that fails (a side exiting early, no takeover).
//! Timings are printed, never asserted.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twinvm_tests::bench::{self, Result, ScratchDir, StatusSample, Table, Timed};
use twinvm_tests::netns::{start_arbiter, Topology, GUEST_IP, PREFIX};
use twinvm_tests::{workspace_bin, BOOT_TIMEOUT};

const USAGE: &str = "\
Usage: bench-failover [--runs N]

Runs N times (default 3): a primary/backup pair with an arbiter in network namespaces, one
client TCP connection to the guest's counter (a request every 200 ms), SIGKILL of the
primary after 10 answers, 10 more answers from the backup. Prints the takeover time, the
client-visible gap, when the backup went live and its replay lag at the kill.
  --runs N   repetitions (default 3)
";

/// Failure detection: silence on the log channel for this long (`--peer-timeout-ms`).
const PEER_TIMEOUT_MS: u64 = 2000;
/// The client's pace.
const INTERVAL: Duration = Duration::from_millis(200);
/// Answers before the kill, and after it.
const ANSWERS_BEFORE: usize = 10;
const ANSWERS_AFTER: usize = 10;
/// Longest wait for one answer: a guard, never a measurement (the backlog can be long).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the main thread looks at the client, the processes and the status files.
const POLL: Duration = Duration::from_millis(5);

fn path_arg(p: &Path) -> Result<String> {
    Ok(p.to_str().ok_or("non-UTF-8 temp path")?.to_string())
}

/// What the client thread reports.
enum Event {
    /// An answer arrived at this instant; `Err` is an anomaly in it.
    Answer(Instant, std::result::Result<u64, String>),
    /// The connection broke or an answer did not come; the thread has stopped.
    Broken(String),
}

/// The client thread with its connection; stopped and joined when dropped.
struct Client {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// Starts sending a request every [`INTERVAL`] on `stream`, reporting each answer.
    fn start(stream: TcpStream) -> Result<(Client, Receiver<Event>)> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut previous = None;
            let mut next = Instant::now();
            let mut line = String::new();
            for n in 1u64.. {
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                if stop2.load(Ordering::Acquire) {
                    return;
                }
                next = Instant::now() + INTERVAL;
                let request = format!("request-{n}");
                if let Err(e) = writer.write_all(format!("{request}\n").as_bytes()) {
                    let _ = tx.send(Event::Broken(format!("sending {request}: {e}")));
                    return;
                }
                line.clear();
                let event = match reader.read_line(&mut line) {
                    Ok(0) => Event::Broken(format!("connection closed awaiting {request}")),
                    Ok(_) => {
                        // A fresh service counts from 1.
                        let expected_previous = previous.or(Some(0));
                        let r = bench::check_counter_answer(&line, &request, expected_previous);
                        if let Ok(c) = r {
                            previous = Some(c);
                        }
                        Event::Answer(Instant::now(), r)
                    }
                    Err(e) => Event::Broken(format!("awaiting the answer to {request}: {e}")),
                };
                let broken = matches!(event, Event::Broken(_));
                if tx.send(event).is_err() || broken {
                    return;
                }
            }
        });
        Ok((
            Client {
                stream,
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one run measured, in milliseconds (lag in positions).
struct Run {
    takeover: f64,
    gap: f64,
    lost_peer: Option<f64>,
    live_after: f64,
    lag: Option<f64>,
    lag_age: Option<f64>,
    boot: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn failure(what: String, primary: &Timed, backup: &Timed) -> bench::Error {
    format!(
        "{what}\n--- primary stderr ---\n{}\n--- backup stderr ---\n{}",
        bench::tail(&primary.vm.stderr(), 3000),
        bench::tail(&backup.vm.stderr(), 3000)
    )
    .into()
}

/// One run: `Ok(Err(why))` is a run that went through but whose client saw an anomaly.
fn run(n: usize, scratch: &ScratchDir) -> Result<std::result::Result<Run, String>> {
    // Dropped in reverse order: the client, the VMs, the arbiter, then the namespaces.
    let mut topo = Topology::new();
    let primary_host = topo.host("primary", 11, true);
    let backup_host = topo.host("backup", 12, true);
    let client_host = topo.host("client", 1, false);
    let arbiter_host = topo.host("arbiter", 13, false);
    let dir = scratch.join(&format!("run-{n}"));
    std::fs::create_dir_all(&dir)?;
    let arbiter =
        start_arbiter(&arbiter_host, &dir).map_err(|e| format!("starting twinvm-arbiter: {e}"))?;
    let (arb_addr, token) = (arbiter.addr.clone(), arbiter.token.clone());
    let [p_status, b_status, b_console] =
        ["primary.status", "backup.status", "backup.console"].map(|f| dir.join(f));
    let (p_status_a, b_status_a, b_console_a) = (
        path_arg(&p_status)?,
        path_arg(&b_status)?,
        path_arg(&b_console)?,
    );
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=counter");
    let listen = format!("{}:7300", backup_host.addr);
    let timeout = PEER_TIMEOUT_MS.to_string();
    let common = [
        "--tap",
        "tap0",
        "--arbiter",
        &arb_addr,
        "--arbiter-token-file",
        &token,
        "--peer-timeout-ms",
        &timeout,
        "--append",
        &append,
    ];
    let mut b_args = vec![
        "backup",
        "--listen",
        &listen,
        "--console-log",
        &b_console_a,
        "--status",
        &b_status_a,
    ];
    b_args.extend_from_slice(&common);
    let mut backup = bench::spawn_timed_in(&backup_host.netns, &b_args);
    bench::wait_stderr(&backup, "backup listening on", Duration::from_secs(30))?;
    let mut p_args = vec!["primary", "--backup", &listen, "--status", &p_status_a];
    p_args.extend_from_slice(&common);
    let mut primary = bench::spawn_timed_in(&primary_host.netns, &p_args);
    let (_, seen) = primary.watch(&[], "twinvm-counter: listening", BOOT_TIMEOUT)?;
    let boot = seen[0].unwrap_or(f64::NAN);

    let service: SocketAddr = format!("{GUEST_IP}:7000").parse()?;
    let stream = bench::connect_retry(&client_host, service, Duration::from_secs(60))?;
    let (client, events) = Client::start(stream)?;

    let mut answers: Vec<Instant> = Vec::new();
    let mut anomalies: Vec<String> = Vec::new();
    let mut kill: Option<Instant> = None;
    let mut lag = None;
    let mut lag_age = None;
    let (mut lost_peer, mut live_after) = (None, None);
    let mut after = 0usize;
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while after < ANSWERS_AFTER || live_after.is_none() {
        match events.recv_timeout(POLL) {
            Ok(Event::Answer(at, r)) => {
                if let Err(a) = r {
                    anomalies.push(a);
                }
                answers.push(at);
                if kill.is_some_and(|k| at >= k) {
                    after += 1;
                }
            }
            Ok(Event::Broken(why)) => {
                return Err(failure(
                    format!(
                        "run {n}: the client's connection broke after {} answers: {why}",
                        answers.len()
                    ),
                    &primary,
                    &backup,
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(failure(
                    format!("run {n}: the client thread stopped"),
                    &primary,
                    &backup,
                ))
            }
        }
        if kill.is_none() && answers.len() >= ANSWERS_BEFORE {
            // Both reports as they stand just before the kill (each up to ~1 s old).
            let now = bench::unix_now();
            let p = StatusSample::read(&p_status);
            let b = StatusSample::read(&b_status);
            if let (Some(p), Some(b)) = (&p, &b) {
                if let (Some(pp), Some(bp)) = (p.f("position"), b.f("position")) {
                    lag = Some(pp - bp);
                    lag_age = Some(1000.0 * (now - p.written.min(b.written)));
                }
            }
            primary.vm.signal(libc::SIGKILL);
            kill = Some(Instant::now());
        }
        if let Some(k) = kill {
            let err = backup.vm.stderr();
            if lost_peer.is_none() && err.contains("lost its peer") {
                lost_peer = Some(k.elapsed());
            }
            if live_after.is_none() && err.contains("-> live-after-failover") {
                live_after = Some(k.elapsed());
            }
        }
        if bench::has_exited(backup.vm.pid) {
            return Err(failure(
                format!(
                    "run {n}: the backup exited ({} answers, {after} after the kill)",
                    answers.len()
                ),
                &primary,
                &backup,
            ));
        }
        if Instant::now() > deadline {
            return Err(failure(
                format!(
                    "run {n}: no takeover within {BOOT_TIMEOUT:?} ({} answers, {after} after the kill, backup live: {})",
                    answers.len(),
                    live_after.is_some()
                ),
                &primary,
                &backup,
            ));
        }
    }
    drop(client);
    let kill = kill.expect("killed");
    let p_code = primary.vm.wait_exit(Duration::from_secs(30));
    let first_after = answers
        .iter()
        .find(|&&a| a >= kill)
        .expect("answers after the kill");
    let gap = answers
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let b_err = backup.vm.stderr();
    let r = Run {
        takeover: ms(first_after.duration_since(kill)),
        gap: ms(gap),
        lost_peer: lost_peer.map(ms),
        live_after: ms(live_after.expect("live")),
        lag,
        lag_age,
        boot,
    };
    let won = b_err.lines().find(|l| l.contains(" won ")).unwrap_or("?");
    println!(
        "run {n}: boot {:.1} s; {} answers ({} after the kill); takeover {:.0} ms, longest gap {:.0} ms, backup lost its peer {} ms and went live {:.0} ms after the kill; lag at the kill {} positions (reports {} ms old); primary {p_code}; backup: {}; {}",
        r.boot,
        answers.len(),
        after,
        r.takeover,
        r.gap,
        r.lost_peer.map_or("?".into(), |v| format!("{v:.0}")),
        r.live_after,
        r.lag.map_or("?".into(), |v| format!("{v:.0}")),
        r.lag_age.map_or("?".into(), |v| format!("{v:.0}")),
        won.trim_start_matches("twinvm: "),
        if anomalies.is_empty() {
            "0 anomalies: RUN OK".to_string()
        } else {
            format!("{} ANOMALIES: RUN FAILED", anomalies.len())
        }
    );
    // The live backup is stopped like any VM: SIGTERM, exit status 128+15.
    backup.vm.signal(libc::SIGTERM);
    let b_code = backup.wait_exit(Duration::from_secs(60))?.1;
    if b_code != Some(128 + libc::SIGTERM) {
        anomalies.push(format!(
            "the live backup exited with status {b_code:?} on SIGTERM, not {}",
            128 + libc::SIGTERM
        ));
    }
    drop(topo);
    if anomalies.is_empty() {
        Ok(Ok(r))
    } else {
        Ok(Err(format!("run {n}: {}", anomalies.join("; "))))
    }
}

fn print_table(runs: &[Run]) {
    let col = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> {
        runs.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect()
    };
    let mut t = Table::new();
    t.heading(
        "failover, SIGKILL of the primary (client: one TCP connection, a request every 200 ms)",
    );
    t.row(
        "detection timeout (--peer-timeout-ms)",
        col(&|_| Some(PEER_TIMEOUT_MS as f64)),
        "ms",
        0,
    );
    t.row(
        "takeover: kill -> first answer after it",
        col(&|r| Some(r.takeover)),
        "ms",
        0,
    );
    t.row(
        "client-visible gap (longest between answers)",
        col(&|r| Some(r.gap)),
        "ms",
        0,
    );
    t.row(
        "kill -> backup `lost its peer` (backlog replayed)",
        col(&|r| r.lost_peer),
        "ms",
        0,
    );
    t.row(
        "kill -> backup `-> live-after-failover`",
        col(&|r| Some(r.live_after)),
        "ms",
        0,
    );
    t.row(
        "live -> first answer (client's TCP retransmission)",
        col(&|r| Some(r.takeover - r.live_after)),
        "ms",
        0,
    );
    t.row(
        "backup's replay lag at the kill",
        col(&|r| r.lag),
        "positions",
        0,
    );
    t.row(
        "  age of the older status report read",
        col(&|r| r.lag_age),
        "ms",
        0,
    );
    t.row(
        "boot: spawn -> counter listening",
        col(&|r| Some(r.boot)),
        "s",
        1,
    );
    println!();
    print!("{}", t.render());
    println!(
        "  A killed primary's socket is closed by its kernel, so the backup notices at once, not after the {PEER_TIMEOUT_MS} ms timeout:\n  the takeover is the backup's replay backlog plus the client's TCP retransmission backoff."
    );
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-failover", || {
        let opts = bench::parse_options(3, None, &[], USAGE)?;
        println!("== bench-failover: SIGKILL of the primary under one client TCP connection ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; {} run(s); --peer-timeout-ms {PEER_TIMEOUT_MS}; {ANSWERS_BEFORE} answers before the kill, {ANSWERS_AFTER} after",
            workspace_bin("twinvm").display(),
            twinvm_tests::guest_dir().display(),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-failover")?;
        let mut runs = Vec::new();
        let mut failures = Vec::new();
        for i in 0..opts.runs {
            match run(i + 1, &scratch) {
                Ok(Ok(r)) => runs.push(r),
                Ok(Err(why)) => failures.push(why),
                Err(e) => {
                    println!(
                        "run {}: FAILED: {}",
                        i + 1,
                        e.to_string().lines().next().unwrap_or("")
                    );
                    failures.push(e.to_string());
                }
            }
        }
        print_table(&runs);
        println!();
        if failures.is_empty() {
            println!(
                "runs: all {} OK: every request answered once, in order, on one connection across the failover",
                opts.runs
            );
            Ok(())
        } else {
            println!(
                "runs: {} of {} FAILED (left out of the figures above)",
                failures.len(),
                opts.runs
            );
            Err(failures.join("\n").into())
        }
    })
}
