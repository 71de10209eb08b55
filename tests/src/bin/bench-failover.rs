//! Benchmark: failover as a client sees it, and what the replay-lag bound costs.
//!
//! Each run builds its own network of namespaces (`tests/src/netns.rs`: a primary and a
//! backup with the guest's card on TAPs, a client, an arbiter), starts the arbiter, a backup
//! and a primary (`--peer-timeout-ms`, default 2000) whose guest serves its TCP counter, and
//! keeps ONE client connection to it (a thread of this process in the client namespace)
//! sending a request every 200 ms and checking every answer (`<count> <request>`, the count
//! one more each time), and a `ping -i 0.2` to the guest. A run:
//!
//! 1. a few paced answers, then a **burst** of back-to-back requests for a few seconds on the
//!    same connection: the pair's request rate;
//! 2. paced answers again, then SIGKILL of the primary (of the backup for the `ack` setting,
//!    whose backup runs no guest and so cannot take over), with the backup's replay lag
//!    (positions, from the primary's `--status` file) just before;
//! 3. paced answers until the survivor answers, then the same burst: the request rate of the
//!    same guest running alone (no recording, no backup), the "plain" reference measured in
//!    the same run on the same host.
//!
//! During the gap the client socket's TCP counters are read every few milliseconds
//! (`TCP_INFO`, what `ss -ti` shows: retransmissions, rto, backoff), and `ss -tin` is run in
//! the client's namespace when the backup goes live and printed: how much of the gap after
//! go-live is the client's retransmission backoff.
//!
//! Runs are spread round-robin over settings of the replay-lag bound (`--settings`), each
//! `LAG[:TCP][*COUNT]`: `LAG` is `--max-replay-lag-ms` in ms, `Np` (a bound of N positions),
//! `off` (no replay bound) or
//! `ack` (the default bound with a backup that acknowledges without replaying, which shows
//! the primary's own cost); `TCP` is `std` (the client socket as it comes) or `fast`
//! (`TCP_THIN_LINEAR_TIMEOUTS` and `TCP_RTO_MAX_MS` 1000 on it: retransmissions of a thin
//! stream at a constant interval, at most a second apart; and `TCP_USER_TIMEOUT`, as
//! otherwise the kernel gives the connection up after about 15 such retransmissions).
//!
//! A run fails (exit status 1, after the other runs and the figures) on any anomaly in the
//! answers, a broken connection, or a process that fails (a side exiting early, no takeover).
//! Timings are printed, never asserted.

use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use twinvm_tests::bench::{self, Result, ScratchDir, StatusSample, Timed};
use twinvm_tests::netns::{start_arbiter, Host, Topology, GUEST_IP, PREFIX};
use twinvm_tests::{workspace_bin, BOOT_TIMEOUT};

const USAGE: &str = "\
Usage: bench-failover [--runs N] [--settings LIST] [--peer-timeout-ms MS]

A primary/backup pair with an arbiter in network namespaces, one client TCP connection to
the guest's counter (a request every 200 ms, and bursts of back-to-back requests), a ping,
SIGKILL of the primary, the backup carrying on. Prints takeover (kill -> the client's next
answer), kill -> live, the backlog at the kill, ping loss, the client's TCP counters in the
gap, and the pair's request rate against the same guest alone, per setting.
  --runs N              repetitions when --settings gives no counts (default 3)
  --settings LIST       comma-separated LAG[:TCP][*COUNT]; LAG: --max-replay-lag-ms, Np
                        (N positions), `off`
                        or `ack` (a backup that acks without replaying: the primary's own
                        cost; the backup is killed instead); TCP: `std` or `fast` (client
                        socket with linear retransmission timeouts and a 1 s RTO cap);
                        default `100:fast`. Example: 100:fast*10,100:std*2,50*2,1000*2,ack*2
  --peer-timeout-ms MS  failure detection (default 2000; heartbeats at a quarter of it)
  --max-minutes M       start no new run after M minutes (the figures cover the runs done)
";

/// The client's pace.
const INTERVAL: Duration = Duration::from_millis(200);
/// Paced answers before the burst, between the burst and the kill, and after the takeover.
const ANSWERS_BEFORE: usize = 5;
const ANSWERS_SETTLE: usize = 5;
const ANSWERS_AFTER: usize = 5;
/// Length of a burst of back-to-back requests.
const BURST: Duration = Duration::from_secs(4);
/// Longest wait for one answer: a guard, never a measurement (the backlog can be long).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(150);
/// How often the main thread looks at the client, the processes and the status files.
const POLL: Duration = Duration::from_millis(5);
/// `TCP_RTO_MAX_MS` (Linux 6.15), not in every libc yet.
const TCP_RTO_MAX_MS: libc::c_int = 44;

fn path_arg(p: &Path) -> Result<String> {
    Ok(p.to_str().ok_or("non-UTF-8 temp path")?.to_string())
}

/// The replay-lag bound of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    /// `--max-replay-lag-ms` (the positions bounds at their defaults).
    Ms(u64),
    /// A bound of exactly this many positions (`--max-replay-lag-positions` and
    /// `--min-replay-lag-positions`).
    Pos(u64),
    /// No replay-lag bound.
    Off,
    /// The default bound, with a backup that acknowledges without replaying.
    AckOnly,
}

/// One setting: the bound and the client socket's retransmission behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setting {
    lag: Lag,
    fast_tcp: bool,
}

impl Setting {
    fn label(&self) -> String {
        let lag = match self.lag {
            Lag::Ms(ms) => format!("{ms} ms"),
            Lag::Pos(p) => format!("{p} positions"),
            Lag::Off => "off".to_string(),
            Lag::AckOnly => "ack-only backup".to_string(),
        };
        format!(
            "{lag}, client TCP {}",
            if self.fast_tcp { "fast" } else { "std" }
        )
    }

    /// The primary's flags for the bound.
    fn primary_args(&self) -> Vec<String> {
        match self.lag {
            Lag::Ms(ms) => vec!["--max-replay-lag-ms".into(), ms.to_string()],
            Lag::Pos(p) => vec![
                "--max-replay-lag-positions".into(),
                p.to_string(),
                "--min-replay-lag-positions".into(),
                p.to_string(),
            ],
            Lag::Off => vec![
                "--max-replay-lag-ms".into(),
                "1000000000".into(),
                "--max-replay-lag-positions".into(),
                "1000000000000".into(),
            ],
            Lag::AckOnly => vec![],
        }
    }
}

/// Parses `--settings`: the settings in run order (round-robin over the list).
fn parse_settings(list: &str, runs: usize) -> Result<Vec<Setting>> {
    let mut groups = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (spec, count) = match item.split_once('*') {
            Some((s, c)) => (
                s,
                c.parse::<usize>()
                    .ok()
                    .filter(|&c| c > 0)
                    .ok_or_else(|| format!("bad count in setting {item:?}"))?,
            ),
            None => (item, runs),
        };
        let (lag, tcp) = spec.split_once(':').unwrap_or((spec, "fast"));
        let lag = match lag {
            "off" => Lag::Off,
            "ack" => Lag::AckOnly,
            p if p.ends_with('p') => Lag::Pos(
                p.trim_end_matches('p')
                    .parse()
                    .map_err(|_| format!("setting {item:?}: {p:?} is not a count of positions"))?,
            ),
            ms => Lag::Ms(
                ms.parse()
                    .map_err(|_| format!("setting {item:?}: {ms:?} is not ms, `off` or `ack`"))?,
            ),
        };
        let fast_tcp = match tcp {
            "fast" => true,
            "std" => false,
            t => return Err(format!("setting {item:?}: TCP {t:?} is not `fast` or `std`").into()),
        };
        groups.push((Setting { lag, fast_tcp }, count));
    }
    if groups.is_empty() {
        return Err("--settings is empty".into());
    }
    let mut order = Vec::new();
    while groups.iter().any(|g| g.1 > 0) {
        for g in groups.iter_mut().filter(|g| g.1 > 0) {
            order.push(g.0);
            g.1 -= 1;
        }
    }
    Ok(order)
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
    burst: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The socket's `TCP_INFO` (what `ss -ti` prints).
fn tcp_info(s: &TcpStream) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (r == 0).then_some(info)
    }
}

impl Client {
    /// Starts sending a request every [`INTERVAL`] (back to back while `burst` is raised)
    /// on `stream`, reporting each answer.
    fn start(stream: TcpStream) -> Result<(Client, Receiver<Event>)> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let burst = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (stop2, burst2) = (stop.clone(), burst.clone());
        let thread = std::thread::spawn(move || {
            let mut previous = None;
            let mut next = Instant::now();
            let mut line = String::new();
            for n in 1u64.. {
                let now = Instant::now();
                if next > now && !burst2.load(Ordering::Acquire) {
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
                burst,
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

/// `ping -i 0.2` to the guest from the client's namespace; its replies' sequence numbers.
struct Ping {
    child: Child,
}

impl Ping {
    fn start(host: &Host) -> Result<Ping> {
        let child = Command::new("ip")
            .args(["netns", "exec", &host.netns, "busybox", "ping", "-i", "0.2"])
            .arg(GUEST_IP)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting ping: {e}"))?;
        Ok(Ping { child })
    }

    /// Stops it; returns (requests sent, replies missing), from the reply sequence numbers.
    fn finish(mut self) -> (u64, u64) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        let seqs: Vec<u64> = out
            .lines()
            .filter_map(|l| bench::number_after(l, "seq="))
            .collect();
        let sent = out
            .lines()
            .find_map(|l| bench::number_before(l, " packets transmitted"))
            .unwrap_or_else(|| seqs.iter().max().map_or(0, |m| m + 1));
        let mut got = seqs.clone();
        got.sort_unstable();
        got.dedup();
        // Replies missing up to the last one seen (the one in flight at the end not counted).
        let last = got.last().copied().unwrap_or(0);
        (sent, (last + 1).saturating_sub(got.len() as u64))
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run measured, in milliseconds (lag in positions, rates per second).
#[derive(Debug, Default, Clone)]
struct Run {
    setting: Option<Setting>,
    takeover: f64,
    gap: f64,
    lost_peer: Option<f64>,
    live_after: f64,
    lag: Option<f64>,
    lag_age: Option<f64>,
    held_share: Option<f64>,
    holds: Option<f64>,
    ping_lost: f64,
    pair_rate: f64,
    alone_rate: f64,
    /// TCP counters of the client socket when the survivor went live.
    rto_at_live: Option<f64>,
    backoff_at_live: Option<f64>,
    retrans_before_live: Option<f64>,
    retrans_after_live: Option<f64>,
    /// Live -> the client's first retransmission after it (its backoff).
    live_to_retrans: Option<f64>,
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

/// The phases of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    PairBurst,
    Settle,
    Killed,
    AloneBurst,
}

/// One run: `Ok(Err(why))` is a run that went through but whose client saw an anomaly.
fn run(
    n: usize,
    setting: Setting,
    peer_timeout_ms: u64,
    scratch: &ScratchDir,
) -> Result<std::result::Result<Run, String>> {
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
    let timeout = peer_timeout_ms.to_string();
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
    let ack_only = setting.lag == Lag::AckOnly;
    let mut b_args = vec![
        "backup",
        "--listen",
        &listen,
        "--console-log",
        &b_console_a,
        "--status",
        &b_status_a,
    ];
    if ack_only {
        b_args.push("--test-ack-without-replay");
    }
    b_args.extend_from_slice(&common);
    let mut backup = bench::spawn_timed_in(&backup_host.netns, &b_args);
    bench::wait_stderr(&backup, "backup listening on", Duration::from_secs(30))?;
    let lag_args = setting.primary_args();
    let mut p_args = vec!["primary", "--backup", &listen, "--status", &p_status_a];
    p_args.extend(lag_args.iter().map(String::as_str));
    p_args.extend_from_slice(&common);
    let mut primary = bench::spawn_timed_in(&primary_host.netns, &p_args);
    let (_, seen) = primary.watch(&[], "twinvm-counter: listening", BOOT_TIMEOUT)?;
    let boot = seen[0].unwrap_or(f64::NAN);

    let service: SocketAddr = format!("{GUEST_IP}:7000").parse()?;
    let stream = bench::connect_retry(&client_host, service, Duration::from_secs(60))?;
    if setting.fast_tcp {
        twinvm_tests::bench::setsockopt_int(&stream, libc::TCP_THIN_LINEAR_TIMEOUTS, 1)
            .map_err(|e| format!("TCP_THIN_LINEAR_TIMEOUTS: {e}"))?;
        twinvm_tests::bench::setsockopt_int(&stream, TCP_RTO_MAX_MS, 1000)
            .map_err(|e| format!("TCP_RTO_MAX_MS: {e}"))?;
        // With retransmissions a second apart the kernel would give the connection up
        // after about 15 of them; keep it for as long as the answer timeout.
        twinvm_tests::bench::setsockopt_int(
            &stream,
            libc::TCP_USER_TIMEOUT,
            ANSWER_TIMEOUT.as_millis() as i32,
        )
        .map_err(|e| format!("TCP_USER_TIMEOUT: {e}"))?;
    }
    let (client, events) = Client::start(stream)?;
    let ping = Ping::start(&client_host)?;

    // The side killed, and the survivor whose stderr says when it went on.
    let (killed_is_primary, live_mark) = if ack_only {
        (false, "-> alone")
    } else {
        (true, "-> live-after-failover")
    };
    let mut answers: Vec<Instant> = Vec::new();
    let mut anomalies: Vec<String> = Vec::new();
    let mut phase = Phase::Before;
    let mut phase_answers = 0usize;
    let mut burst_start = Instant::now();
    let mut burst_count = 0usize;
    let mut pair_rate = f64::NAN;
    let mut alone_rate = f64::NAN;
    let mut kill: Option<Instant> = None;
    let mut r = Run {
        setting: Some(setting),
        boot,
        ..Run::default()
    };
    let (mut lost_peer, mut live_after) = (None, None);
    let mut after = 0usize;
    // TCP counters in the gap: (when, total retransmissions) samples; those at go-live.
    let mut retrans_at_live: Option<u32> = None;
    let mut last_total = None;
    let mut first_retrans_after_live: Option<Instant> = None;
    let mut ss_at_live = String::new();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut done = false;
    while !done {
        match events.recv_timeout(POLL) {
            Ok(Event::Answer(at, res)) => {
                if let Err(a) = res {
                    anomalies.push(a);
                }
                answers.push(at);
                phase_answers += 1;
                if matches!(phase, Phase::PairBurst | Phase::AloneBurst) {
                    burst_count += 1;
                }
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
        let burst_rate =
            |start: Instant, count: usize| count as f64 / start.elapsed().as_secs_f64();
        match phase {
            Phase::Before if phase_answers >= ANSWERS_BEFORE => {
                phase = Phase::PairBurst;
                burst_start = Instant::now();
                burst_count = 0;
                client.burst.store(true, Ordering::Release);
            }
            Phase::PairBurst if burst_start.elapsed() >= BURST => {
                client.burst.store(false, Ordering::Release);
                pair_rate = burst_rate(burst_start, burst_count);
                phase = Phase::Settle;
                phase_answers = 0;
            }
            Phase::Settle if phase_answers >= ANSWERS_SETTLE => {
                // The primary's report as it stands just before the kill (up to ~1 s old).
                let now = bench::unix_now();
                if let Some(p) = StatusSample::read(&p_status) {
                    r.lag = p.f("replay_lag_positions");
                    r.lag_age = Some(1000.0 * (now - p.written));
                    let up = primary.since_start(Instant::now());
                    r.held_share = p.f("replay_throttled_s").map(|s| s / up);
                    r.holds = p.f("replay_holds");
                }
                if killed_is_primary {
                    primary.vm.signal(libc::SIGKILL);
                } else {
                    backup.vm.signal(libc::SIGKILL);
                }
                kill = Some(Instant::now());
                phase = Phase::Killed;
            }
            Phase::Killed => {
                let k = kill.expect("killed");
                let survivor = if killed_is_primary { &backup } else { &primary };
                let err = survivor.vm.stderr();
                if lost_peer.is_none() && err.contains("lost its peer") {
                    lost_peer = Some(k.elapsed());
                }
                if live_after.is_none() && err.contains(live_mark) {
                    live_after = Some(k.elapsed());
                    retrans_at_live = last_total;
                    if let Some(i) = tcp_info(&client.stream) {
                        r.rto_at_live = Some(i.tcpi_rto as f64 / 1000.0);
                        r.backoff_at_live = Some(i.tcpi_backoff as f64);
                    }
                    let out = Command::new("ip")
                        .args(["netns", "exec", &client_host.netns, "ss", "-tin", "dst"])
                        .arg(GUEST_IP)
                        .output();
                    ss_at_live = out
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                }
                if after == 0 {
                    if let Some(i) = tcp_info(&client.stream) {
                        let total = i.tcpi_total_retrans;
                        if live_after.is_some()
                            && first_retrans_after_live.is_none()
                            && retrans_at_live.is_some_and(|t| total > t)
                        {
                            first_retrans_after_live = Some(Instant::now());
                        }
                        last_total = Some(total);
                    }
                }
                if after >= ANSWERS_AFTER && live_after.is_some() {
                    phase = Phase::AloneBurst;
                    burst_start = Instant::now();
                    burst_count = 0;
                    client.burst.store(true, Ordering::Release);
                }
            }
            Phase::AloneBurst if burst_start.elapsed() >= BURST => {
                client.burst.store(false, Ordering::Release);
                alone_rate = burst_rate(burst_start, burst_count);
                done = true;
            }
            _ => {}
        }
        let survivor_pid = if killed_is_primary || kill.is_none() {
            backup.vm.pid
        } else {
            primary.vm.pid
        };
        if bench::has_exited(survivor_pid) {
            return Err(failure(
                format!(
                    "run {n}: the {} exited ({} answers, {after} after the kill)",
                    if survivor_pid == backup.vm.pid {
                        "backup"
                    } else {
                        "primary"
                    },
                    answers.len()
                ),
                &primary,
                &backup,
            ));
        }
        if kill.is_none() && bench::has_exited(primary.vm.pid) {
            return Err(failure(
                format!("run {n}: the primary exited before the kill"),
                &primary,
                &backup,
            ));
        }
        if Instant::now() > deadline {
            return Err(failure(
                format!(
                    "run {n}: no takeover within {BOOT_TIMEOUT:?} ({} answers, {after} after the kill, survivor live: {})",
                    answers.len(),
                    live_after.is_some()
                ),
                &primary,
                &backup,
            ));
        }
    }
    let final_info = tcp_info(&client.stream);
    drop(client);
    let (ping_sent, ping_lost) = ping.finish();
    let kill = kill.expect("killed");
    let first_after = answers
        .iter()
        .find(|&&a| a >= kill)
        .expect("answers after the kill");
    let gap = answers
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let survivor_err = if killed_is_primary {
        backup.vm.stderr()
    } else {
        primary.vm.stderr()
    };
    r.takeover = ms(first_after.duration_since(kill));
    r.gap = ms(gap);
    r.lost_peer = lost_peer.map(ms);
    r.live_after = ms(live_after.expect("live"));
    r.ping_lost = ping_lost as f64;
    r.pair_rate = pair_rate;
    r.alone_rate = alone_rate;
    if let (Some(at_live), Some(info)) = (retrans_at_live, final_info) {
        r.retrans_after_live = Some(info.tcpi_total_retrans.saturating_sub(at_live) as f64);
        r.retrans_before_live = Some(at_live as f64);
    }
    r.live_to_retrans = first_retrans_after_live.map(|t| ms(t.duration_since(kill)) - r.live_after);
    let won = survivor_err
        .lines()
        .find(|l| l.contains(" won "))
        .unwrap_or("?");
    let opt = |v: Option<f64>, d: usize| v.map_or("?".into(), |v| format!("{v:.d$}"));
    println!(
        "run {n} [{}]: boot {:.1} s; {} answers ({} after the kill); takeover {:.0} ms, longest gap {:.0} ms; survivor lost its peer {} ms and went on {:.0} ms after the kill; backlog at the kill {} positions (report {} ms old); replay holds {} ({}% of the time); ping {ping_sent} sent, {ping_lost} missing; client TCP at go-live: rto {} ms, backoff {}, {} retransmissions before and {} after go-live, live -> next retransmission {} ms; rate pair {:.1}/s, alone {:.1}/s; {}; {}",
        setting.label(),
        r.boot,
        answers.len(),
        after,
        r.takeover,
        r.gap,
        opt(r.lost_peer, 0),
        r.live_after,
        opt(r.lag, 0),
        opt(r.lag_age, 0),
        opt(r.holds, 0),
        opt(r.held_share.map(|s| 100.0 * s), 1),
        opt(r.rto_at_live, 0),
        opt(r.backoff_at_live, 0),
        opt(r.retrans_before_live, 0),
        opt(r.retrans_after_live, 0),
        opt(r.live_to_retrans, 0),
        r.pair_rate,
        r.alone_rate,
        won.trim_start_matches("twinvm: "),
        if anomalies.is_empty() {
            "0 anomalies: RUN OK".to_string()
        } else {
            format!("{} ANOMALIES: RUN FAILED", anomalies.len())
        }
    );
    for l in ss_at_live.lines().filter(|l| !l.trim().is_empty()) {
        println!("    ss -tin at go-live: {}", l.trim());
    }
    // The survivor is stopped like any VM: SIGTERM, exit status 128+15.
    let survivor = if killed_is_primary {
        &mut backup
    } else {
        &mut primary
    };
    survivor.vm.signal(libc::SIGTERM);
    let s_code = survivor.wait_exit(Duration::from_secs(60))?.1;
    if s_code != Some(128 + libc::SIGTERM) {
        anomalies.push(format!(
            "the survivor exited with status {s_code:?} on SIGTERM, not {}",
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

/// p50 / p95 / max (nearest rank) of the present values, as text.
fn pct(v: &[f64], decimals: usize) -> [String; 3] {
    let v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let f = |x: f64| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.decimals$}")
        }
    };
    [
        f(bench::quantile(&v, 0.5)),
        f(bench::quantile(&v, 0.95)),
        f(bench::quantile(&v, 1.0)),
    ]
}

fn print_tables(runs: &[Run], peer_timeout_ms: u64) {
    let mut settings: Vec<Setting> = Vec::new();
    for r in runs {
        let s = r.setting.expect("setting");
        if !settings.contains(&s) {
            settings.push(s);
        }
    }
    type Figure = (&'static str, &'static str, usize, fn(&Run) -> Option<f64>);
    let figures: [Figure; 14] = [
        ("takeover: kill -> client's next answer", "ms", 0, |r| {
            Some(r.takeover)
        }),
        (
            "client-visible gap (longest between answers)",
            "ms",
            0,
            |r| Some(r.gap),
        ),
        ("kill -> `lost its peer` (backlog replayed)", "ms", 0, |r| {
            r.lost_peer
        }),
        ("kill -> live", "ms", 0, |r| Some(r.live_after)),
        ("live -> first answer", "ms", 0, |r| {
            Some(r.takeover - r.live_after)
        }),
        ("live -> client's next retransmission", "ms", 0, |r| {
            r.live_to_retrans
        }),
        ("client rto at go-live (TCP_INFO)", "ms", 0, |r| {
            r.rto_at_live
        }),
        ("client backoff at go-live", "", 0, |r| r.backoff_at_live),
        ("client retransmissions before go-live", "", 0, |r| {
            r.retrans_before_live
        }),
        (
            "backlog at the kill (replay_lag_positions)",
            "pos",
            0,
            |r| r.lag,
        ),
        ("ping replies missing (every 200 ms)", "", 0, |r| {
            Some(r.ping_lost)
        }),
        ("pair request rate (burst)", "/s", 1, |r| Some(r.pair_rate)),
        ("alone request rate (same guest, after)", "/s", 1, |r| {
            Some(r.alone_rate)
        }),
        ("pair / alone", "x", 2, |r| Some(r.pair_rate / r.alone_rate)),
    ];
    println!();
    for s in &settings {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.setting == Some(*s)).collect();
        println!(
            "  -- replay-lag bound {}: {} run(s), --peer-timeout-ms {peer_timeout_ms}{}",
            s.label(),
            mine.len(),
            if s.lag == Lag::AckOnly {
                " (the BACKUP is killed: 'takeover' is the primary going on alone)"
            } else {
                ""
            }
        );
        println!(
            "  {:<46}  {:>9}  {:>9}  {:>9}  unit",
            "figure", "p50", "p95", "max"
        );
        for (label, unit, d, f) in &figures {
            let v: Vec<f64> = mine.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect();
            let [a, b, c] = pct(&v, *d);
            println!("  {label:<46}  {a:>9}  {b:>9}  {c:>9}  {unit}");
        }
        println!();
    }
    println!("  -- trade-off (medians; the rate pair/alone measured in the same runs, both guests on the same 2 cores)");
    println!(
        "  {:<34}  {:>4}  {:>11}  {:>11}  {:>11}  {:>9}  {:>8}  {:>7}",
        "replay-lag bound",
        "runs",
        "takeover p50",
        "p95",
        "kill->live",
        "backlog",
        "held",
        "pair/alone"
    );
    for s in &settings {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.setting == Some(*s)).collect();
        let col = |f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> {
            mine.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect()
        };
        let t = pct(&col(&|r| Some(r.takeover)), 0);
        let l = pct(&col(&|r| Some(r.live_after)), 0);
        let b = pct(&col(&|r| r.lag), 0);
        let h = pct(&col(&|r| r.held_share.map(|x| 100.0 * x)), 1);
        let ratio = pct(&col(&|r| Some(r.pair_rate / r.alone_rate)), 2);
        println!(
            "  {:<34}  {:>4}  {:>9} ms  {:>8} ms  {:>8} ms  {:>9}  {:>7}%  {:>7}x",
            s.label(),
            mine.len(),
            t[0],
            t[1],
            l[0],
            b[0],
            h[0],
            ratio[0]
        );
    }
    println!(
        "  (takeover: SIGKILL of the primary -> the client's next answer; a killed primary's socket is closed by its kernel, so the\n  backup notices at once: takeover = backlog replay + go-live + the client's retransmission + the guest's answer;\n  held: share of the primary's run time held back for the backup's replay; goal: p95 takeover <= 2 x {peer_timeout_ms} ms)"
    );
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-failover", || {
        let opts = bench::parse_options(
            3,
            None,
            &["--settings", "--peer-timeout-ms", "--max-minutes"],
            USAGE,
        )?;
        let settings = parse_settings(opts.extra("--settings").unwrap_or("100:fast"), opts.runs)?;
        let peer_timeout_ms: u64 = match opts.extra("--peer-timeout-ms") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("--peer-timeout-ms wants milliseconds, not {v:?}"))?,
            None => 2000,
        };
        println!("== bench-failover: SIGKILL of the primary under one client TCP connection ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; {} run(s); --peer-timeout-ms {peer_timeout_ms}; {ANSWERS_BEFORE} answers, a {BURST:?} burst, {ANSWERS_SETTLE} answers, the kill, {ANSWERS_AFTER} answers, a {BURST:?} burst",
            workspace_bin("twinvm").display(),
            twinvm_tests::guest_dir().display(),
            settings.len()
        );
        let budget = match opts.extra("--max-minutes") {
            Some(v) => Some(Duration::from_secs_f64(
                60.0 * v
                    .parse::<f64>()
                    .map_err(|_| format!("--max-minutes wants minutes, not {v:?}"))?,
            )),
            None => None,
        };
        let started = Instant::now();
        let scratch = ScratchDir::new("bench-failover")?;
        let mut runs = Vec::new();
        let mut failures = Vec::new();
        for (i, s) in settings.iter().enumerate() {
            if budget.is_some_and(|b| started.elapsed() > b) {
                println!(
                    "--max-minutes reached: {} of {} runs done",
                    i,
                    settings.len()
                );
                break;
            }
            match run(i + 1, *s, peer_timeout_ms, &scratch) {
                Ok(Ok(r)) => runs.push(r),
                Ok(Err(why)) => failures.push(why),
                Err(e) => {
                    println!(
                        "run {} [{}]: FAILED: {}",
                        i + 1,
                        s.label(),
                        e.to_string().lines().next().unwrap_or("")
                    );
                    failures.push(e.to_string());
                }
            }
        }
        print_tables(&runs, peer_timeout_ms);
        println!();
        if failures.is_empty() {
            println!(
                "runs: all {} OK: every request answered once, in order, on one connection across the failover",
                runs.len()
            );
            Ok(())
        } else {
            println!(
                "runs: {} of {} FAILED (left out of the figures above)",
                failures.len(),
                settings.len()
            );
            Err(failures.join("\n").into())
        }
    })
}
