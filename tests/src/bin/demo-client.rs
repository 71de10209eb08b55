//! `demo-client`: the client of `scripts/demo`, the failover demonstration.
//!
//! It keeps ONE TCP connection to the guest's counter service (`twinvm-counter`, which
//! answers every line with `<count> <line>`), sends `request-N` every 200 ms, waits for each
//! answer, and prints a timestamped line per answer. Every answer is checked: it must echo
//! the request just sent (an answer to the wrong request means a request was lost or an
//! answer came twice) and its count must be the previous count plus one (a request counted
//! twice or not at all). Across a failover the count must simply carry on.
//!
//! The run ends after `--seconds`, or, once the marker file given by `--marker` exists, after
//! `--after-kill-answers` more answers. The marker holds the wall-clock time (milliseconds
//! since the Unix epoch) at which the demo killed the primary; the summary then gives the
//! takeover time, from that moment to the first answer received after it.
//!
//! Timestamps are wall-clock (`SystemTime`) milliseconds since the epoch, the clock of
//! `date +%s%3N`, so the script's and the client's times compare directly.
//!
//! Exit status: 0 every request was answered once, in order, on the same connection; 1 an
//! anomaly was seen; 2 the connection could not be made or broke; 64 a usage error.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: demo-client [--connect ADDR:PORT] [--seconds N] [--interval-ms N] \
[--marker FILE] [--after-kill-answers N] [--connect-timeout N] [--answer-timeout N] \
[--fast-retransmit 0|1]";

/// Command-line options.
#[derive(Debug)]
struct Options {
    /// The counter service.
    connect: SocketAddr,
    /// Longest run, in seconds.
    seconds: u64,
    /// Pace of the requests.
    interval: Duration,
    /// File whose appearance marks the primary's kill (and holds its time, epoch ms).
    marker: Option<PathBuf>,
    /// Answers to wait for after the marker appears before ending.
    after_kill_answers: u64,
    /// How long to keep trying to connect, in seconds.
    connect_timeout: u64,
    /// Longest wait for one answer before the connection counts as broken, in seconds.
    answer_timeout: u64,
    /// Retransmit at a constant interval, at most a second apart, while the service is
    /// silent (`TCP_THIN_LINEAR_TIMEOUTS`, `TCP_RTO_MAX_MS` 1000) rather than with the
    /// exponential backoff that can leave seconds unused after a takeover.
    fast_retransmit: bool,
}

impl Options {
    fn parse() -> Result<Options, String> {
        let mut o = Options {
            connect: "198.18.0.2:7000".parse().expect("default address"),
            seconds: 120,
            interval: Duration::from_millis(200),
            marker: None,
            after_kill_answers: 20,
            connect_timeout: 30,
            answer_timeout: 60,
            fast_retransmit: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            if a == "-h" || a == "--help" {
                return Err(String::new());
            }
            let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{a} {v:?}: {e}"));
            match a.as_str() {
                "--connect" => o.connect = v.parse().map_err(|e| format!("{a} {v:?}: {e}"))?,
                "--seconds" => o.seconds = num(&v)?,
                "--interval-ms" => o.interval = Duration::from_millis(num(&v)?),
                "--marker" => o.marker = Some(PathBuf::from(v)),
                "--after-kill-answers" => o.after_kill_answers = num(&v)?,
                "--connect-timeout" => o.connect_timeout = num(&v)?,
                "--answer-timeout" => o.answer_timeout = num(&v)?,
                "--fast-retransmit" => o.fast_retransmit = num(&v)? != 0,
                _ => return Err(format!("unknown option {a}")),
            }
        }
        Ok(o)
    }
}

/// Wall-clock milliseconds since the Unix epoch.
fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `HH:MM:SS.mmm` (UTC) of an epoch time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// Connects, retrying while the service is not reachable yet, up to `timeout`.
fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                println!("[client] connect {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// `TCP_RTO_MAX_MS` (Linux 6.15), not in every libc yet.
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Makes the socket's retransmissions after a silence come at a constant interval (a thin
/// stream's first six, `TCP_THIN_LINEAR_TIMEOUTS`) and never more than a second apart
/// (`TCP_RTO_MAX_MS`), so the first one after the backup goes live comes soon.
fn fast_retransmit(s: &TcpStream) -> std::io::Result<()> {
    // With retransmissions a second apart the kernel would give the connection up after
    // about 15 of them (15 s): TCP_USER_TIMEOUT keeps it for 5 minutes.
    for (opt, v) in [
        (libc::TCP_THIN_LINEAR_TIMEOUTS, 1),
        (TCP_RTO_MAX_MS, 1000),
        (libc::TCP_USER_TIMEOUT, 300_000),
    ] {
        twinvm_tests::bench::setsockopt_int(s, opt, v)?;
    }
    Ok(())
}

/// The kill time written in the marker file, if the marker exists (the time it was first
/// seen if its contents are not a number).
fn marker_time(path: &Option<PathBuf>) -> Option<u64> {
    let path = path.as_ref()?;
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().parse().unwrap_or_else(|_| epoch_ms()))
}

/// What the run saw.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    answers: u64,
    anomalies: u64,
    /// Longest time between two answers: (ms, epoch ms of the answer that ended it).
    longest_gap: (u64, u64),
    /// The count of the first answer, and of the last.
    first_count: Option<u64>,
    last_count: Option<u64>,
    /// The kill time (from the marker), and the first answer received after it.
    kill: Option<u64>,
    first_after_kill: Option<(u64, u64)>,
    answers_after_kill: u64,
    /// Why the connection ended early, if it did.
    broken: Option<String>,
}

fn main() -> ExitCode {
    let o = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("demo-client: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    let stream = match connect(o.connect, Duration::from_secs(o.connect_timeout)) {
        Ok(s) => s,
        Err(e) => {
            println!("[client] could not connect to {}: {e}", o.connect);
            return ExitCode::from(2);
        }
    };
    let _ = stream.set_nodelay(true);
    if o.fast_retransmit {
        match fast_retransmit(&stream) {
            Ok(()) => println!(
                "[client] retransmissions at a constant interval, at most 1 s apart (TCP_THIN_LINEAR_TIMEOUTS, TCP_RTO_MAX_MS 1000, TCP_USER_TIMEOUT 300 s)"
            ),
            Err(e) => println!("[client] fast retransmission not available here: {e}"),
        }
    }
    if let Err(e) = stream.set_read_timeout(Some(Duration::from_secs(o.answer_timeout))) {
        println!("[client] set_read_timeout: {e}");
        return ExitCode::from(2);
    }
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!(
        "[client] {} connected {local} -> {}; one request every {} ms on this one connection",
        clock(epoch_ms()),
        o.connect,
        o.interval.as_millis()
    );
    let t = run(&o, stream);
    summary(&o, &t)
}

/// Sends requests and checks answers until the end condition; returns what it saw.
fn run(o: &Options, stream: TcpStream) -> Tally {
    let mut t = Tally::default();
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            t.broken = Some(format!("try_clone: {e}"));
            return t;
        }
    };
    let mut reader = BufReader::new(stream);
    let start = Instant::now();
    let end = start + Duration::from_secs(o.seconds);
    let mut last_answer: Option<u64> = None;
    let mut next_send = Instant::now();
    let mut line = String::new();
    while Instant::now() < end {
        if t.kill.is_none() {
            t.kill = marker_time(&o.marker);
        }
        if t.kill.is_some() && t.answers_after_kill >= o.after_kill_answers {
            break;
        }
        let now = Instant::now();
        if now < next_send {
            std::thread::sleep(next_send - now);
        }
        next_send = Instant::now() + o.interval;

        t.requests += 1;
        let n = t.requests;
        let request = format!("request-{n}");
        let sent = epoch_ms();
        if let Err(e) = writer.write_all(format!("{request}\n").as_bytes()) {
            t.broken = Some(format!("sending {request}: {e}"));
            break;
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                t.broken = Some(format!(
                    "the service closed the connection (waiting for the answer to {request})"
                ));
                break;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                t.broken = Some(format!(
                    "no answer to {request} within {} s",
                    o.answer_timeout
                ));
                break;
            }
            Err(e) => {
                t.broken = Some(format!("reading the answer to {request}: {e}"));
                break;
            }
        }
        let got = epoch_ms();
        t.answers += 1;
        if t.kill.is_none() {
            // The kill may have happened while this answer was awaited.
            t.kill = marker_time(&o.marker);
        }
        let answer = line.trim_end();
        let mut notes = Vec::new();
        let parsed = answer
            .split_once(' ')
            .and_then(|(c, l)| c.parse::<u64>().ok().map(|c| (c, l)));
        match parsed {
            None => notes.push(format!("ANOMALY: malformed answer {answer:?}")),
            Some((count, echoed)) => {
                if echoed != request {
                    notes.push(format!(
                        "ANOMALY: answer to {echoed:?}, expected {request:?} (a request lost or answered twice)"
                    ));
                }
                if let Some(prev) = t.last_count {
                    if count != prev + 1 {
                        notes.push(format!(
                            "ANOMALY: count {count} after {prev} (expected {}: {})",
                            prev + 1,
                            if count <= prev {
                                "a request counted twice"
                            } else {
                                "a request counted but not answered"
                            }
                        ));
                    }
                }
                t.first_count.get_or_insert(count);
                t.last_count = Some(count);
            }
        }
        t.anomalies += notes.len() as u64;
        let gap = last_answer.map(|l| got.saturating_sub(l));
        if let Some(g) = gap {
            if g > t.longest_gap.0 {
                t.longest_gap = (g, got);
            }
        }
        if let Some(k) = t.kill {
            if got >= k {
                t.answers_after_kill += 1;
                if t.first_after_kill.is_none() {
                    t.first_after_kill = Some((got, n));
                    notes.push(format!(
                        "first answer since the kill at {} (t={k}), {} ms after it",
                        clock(k),
                        got - k
                    ));
                }
            }
        }
        if gap.is_some_and(|g| g > 3 * o.interval.as_millis() as u64) {
            notes.push(format!("after a gap of {} ms", gap.unwrap_or(0)));
        }
        println!(
            "[client] {} t={got} {request:<12} -> {answer:<20} rtt {:>5} ms{}{}",
            clock(got),
            got - sent,
            if notes.is_empty() { "" } else { "  <- " },
            notes.join("; ")
        );
        last_answer = Some(got);
    }
    t
}

/// Prints the summary; the exit code follows from it.
fn summary(o: &Options, t: &Tally) -> ExitCode {
    println!("[client] ---- summary ----");
    println!("[client] requests sent      {}", t.requests);
    println!("[client] answers received   {}", t.answers);
    if let (Some(a), Some(b)) = (t.first_count, t.last_count) {
        println!("[client] counts             {a} .. {b}");
    }
    println!("[client] anomalies          {}", t.anomalies);
    println!(
        "[client] longest gap        {} ms between two answers (ended at {}, t={})",
        t.longest_gap.0,
        clock(t.longest_gap.1),
        t.longest_gap.1
    );
    match (t.kill, t.first_after_kill) {
        (Some(k), Some((got, n))) => println!(
            "[client] takeover           {} ms from the kill (t={k}) to the first answer after it (request-{n}, t={got})",
            got - k
        ),
        (Some(k), None) => println!("[client] takeover           none: no answer after the kill (t={k})"),
        (None, _) => {
            if o.marker.is_some() {
                println!("[client] takeover           the marker never appeared");
            }
        }
    }
    let verdict = match &t.broken {
        Some(why) => {
            println!("[client] connection         BROKEN: {why}");
            ExitCode::from(2)
        }
        None => {
            println!("[client] connection         intact to the end");
            if t.anomalies > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    };
    if t.broken.is_none() && t.anomalies == 0 {
        println!("[client] verdict            OK: every request answered once, in order, on one connection");
    } else {
        println!("[client] verdict            FAILED");
    }
    verdict
}
