//! Benchmark: the guest's network service alone and behind a live backup.
//!
//! In one network of namespaces (`tests/src/netns.rs`: the guest's card on a TAP in the
//! primary's namespace, a backup, a client), the guest's TCP counter (`twinvm.run=counter`)
//! is measured from the client namespace two ways, one after the other: a plain `twinvm run`
//! (the guest alone), and a `twinvm primary` with a `twinvm backup --nic` replaying it live,
//! where every answer's frames wait on the primary until the backup has acknowledged the log
//! behind them (the output rule). Each way: one connection, a warm-up, then N sequential
//! requests, each sent when the previous answer came; the request rate and the latency
//! (p50, p99), the ratios pair / alone, and the log bytes the backup acknowledged per
//! request (the primary's `--status` field `acked_bytes`, read before and after, with the
//! idle guest's own log rate, measured before, shown and subtracted).
//!
//! A run fails (exit status 1, after the figures) on any anomaly in the answers (every one
//! must be `<count> <request>`, the count one more each time) or a process that fails (the
//! backup must end with every state digest matched). Timings are printed, never asserted.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use twinvm_tests::bench::{self, Result, ScratchDir, StatusSample, Table};
use twinvm_tests::netns::{Host, Topology, GUEST_IP, PREFIX};
use twinvm_tests::{workspace_bin, BOOT_TIMEOUT};

const USAGE: &str = "\
Usage: bench-net [--runs N] [--requests N] [--warmup N]

Measures the guest's TCP counter service from a client namespace, the guest alone (twinvm
run --tap) and as a primary with a live backup (--nic): request rate, latency p50/p99, the
ratios pair/alone, and the log bytes acknowledged per request.
  --runs N       repetitions of (alone, pair) (default 1)
  --requests N   measured requests per connection (default 200)
  --warmup N     requests before the measured ones (default 20)
";

/// How long the idle guest's log rate is measured for, before the warm-up.
const IDLE: Duration = Duration::from_secs(3);
/// Longest wait for one answer: a guard, never a measurement.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

fn path_arg(p: &Path) -> Result<String> {
    Ok(p.to_str().ok_or("non-UTF-8 temp path")?.to_string())
}

/// What one way of running measured.
struct Measure {
    /// Measured requests per second of wall time.
    rate: f64,
    /// Latency of each measured request, in milliseconds.
    lat: Vec<f64>,
    /// With a status file: log bytes acknowledged per request, as read; the idle guest's
    /// log rate (B/s); and per request with the idle rate over the same time subtracted.
    bytes: Option<(f64, f64, f64)>,
    /// With a status file: log entries sent per request, as read.
    entries: Option<f64>,
}

/// The requests on one connection: the warm-up then the measured ones, every answer checked.
struct Session {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    sent: u64,
    count: Option<u64>,
}

impl Session {
    fn open(client: &Host) -> Result<Session> {
        let service: SocketAddr = format!("{GUEST_IP}:7000").parse()?;
        let stream = bench::connect_retry(client, service, Duration::from_secs(60))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Session {
            stream,
            reader,
            sent: 0,
            count: None,
        })
    }

    /// One request and its answer; returns the round trip. An anomaly is an error.
    fn request(&mut self) -> Result<Duration> {
        self.sent += 1;
        let request = format!("bench-{}", self.sent);
        let mut line = String::new();
        let t0 = Instant::now();
        self.stream.write_all(format!("{request}\n").as_bytes())?;
        let got = self.reader.read_line(&mut line);
        let rtt = t0.elapsed();
        match got {
            Ok(0) => return Err(format!("connection closed awaiting {request}").into()),
            Ok(_) => {}
            Err(e) => return Err(format!("awaiting the answer to {request}: {e}").into()),
        }
        // A fresh guest's service counts from 1.
        let c = bench::check_counter_answer(&line, &request, self.count.or(Some(0)))
            .map_err(|a| format!("ANOMALY: {a}"))?;
        self.count = Some(c);
        Ok(rtt)
    }
}

/// Measures the service from `client`; `status` is the primary's status file, if any.
fn measure(
    client: &Host,
    status: Option<&Path>,
    requests: usize,
    warmup: usize,
) -> Result<Measure> {
    let mut s = Session::open(client)?;
    let fresh = |p: &Path| bench::fresh_status(p, bench::unix_now(), Duration::from_secs(30));
    let acked = |r: &StatusSample| -> Result<(f64, f64)> {
        Ok((
            r.f("acked_bytes")
                .ok_or("no acked_bytes in the status file")?,
            r.f("sent_seq").ok_or("no sent_seq in the status file")?,
        ))
    };
    // The idle guest's own log (timer interrupts, digests): its rate over IDLE.
    let idle_rate = match status {
        Some(p) => {
            let s0 = fresh(p)?;
            std::thread::sleep(IDLE);
            let s1 = fresh(p)?;
            Some((acked(&s1)?.0 - acked(&s0)?.0) / (s1.written - s0.written))
        }
        None => None,
    };
    for _ in 0..warmup {
        s.request()?;
    }
    let before = status.map(fresh).transpose()?;
    let mut lat = Vec::with_capacity(requests);
    let t0 = Instant::now();
    for _ in 0..requests {
        lat.push(s.request()?.as_secs_f64() * 1000.0);
    }
    let wall = t0.elapsed().as_secs_f64();
    let after = status.map(fresh).transpose()?;
    let n = requests as f64;
    let (bytes, entries) = match (before, after, idle_rate) {
        (Some(b), Some(a), Some(idle)) => {
            let ((b0, e0), (b1, e1)) = (acked(&b)?, acked(&a)?);
            let raw = b1 - b0;
            let net = raw - idle * (a.written - b.written);
            (Some((raw / n, idle, net / n)), Some((e1 - e0) / n))
        }
        _ => (None, None),
    };
    Ok(Measure {
        rate: n / wall,
        lat,
        bytes,
        entries,
    })
}

/// The guest alone: `twinvm run --tap tap0` in the primary's namespace.
fn alone(
    primary_host: &Host,
    client: &Host,
    append: &str,
    requests: usize,
    warmup: usize,
) -> Result<Measure> {
    let mut vm = bench::spawn_timed_in(
        &primary_host.netns,
        &["run", "--tap", "tap0", "--append", append],
    );
    vm.watch(&[], "twinvm-counter: listening", BOOT_TIMEOUT)?;
    let m = measure(client, None, requests, warmup)?;
    vm.vm.signal(libc::SIGTERM);
    let (_, code) = vm.wait_exit(Duration::from_secs(60))?;
    if code != Some(128 + libc::SIGTERM) {
        return Err(format!(
            "the guest alone: twinvm exited with {code:?} on SIGTERM\n{}",
            vm.vm.stderr()
        )
        .into());
    }
    Ok(m)
}

/// The pair: a backup with `--nic` in the backup's namespace, the primary on the TAP.
fn pair(
    scratch: &ScratchDir,
    n: usize,
    hosts: (&Host, &Host, &Host),
    append: &str,
    requests: usize,
    warmup: usize,
) -> Result<Measure> {
    let (primary_host, backup_host, client) = hosts;
    let [status, b_console] =
        ["primary.status", "backup.console"].map(|f| scratch.join(&format!("pair-{n}-{f}")));
    let (status_a, b_console_a) = (path_arg(&status)?, path_arg(&b_console)?);
    let listen = format!("{}:7300", backup_host.addr);
    // No failover here: a long timeout, as in tests/tests/network.rs.
    let timeouts = ["--peer-timeout-ms", "120000"];
    let mut b_args = vec![
        "backup",
        "--listen",
        &listen,
        "--nic",
        "--console-log",
        &b_console_a,
        "--append",
        append,
    ];
    b_args.extend_from_slice(&timeouts);
    let mut backup = bench::spawn_timed_in(&backup_host.netns, &b_args);
    bench::wait_stderr(&backup, "backup listening on", Duration::from_secs(30))?;
    let mut p_args = vec![
        "primary", "--backup", &listen, "--tap", "tap0", "--status", &status_a, "--append", append,
    ];
    p_args.extend_from_slice(&timeouts);
    let mut primary = bench::spawn_timed_in(&primary_host.netns, &p_args);
    primary.watch(&[], "twinvm-counter: listening", BOOT_TIMEOUT)?;
    let m = measure(client, Some(&status), requests, warmup)?;
    primary.vm.signal(libc::SIGTERM);
    let (_, p_code) = primary.wait_exit(Duration::from_secs(120))?;
    let (_, b_code) = backup.wait_exit(BOOT_TIMEOUT)?;
    let b_err = backup.vm.stderr();
    let matched = bench::number_before(&b_err, " state digests matched");
    if p_code != Some(128 + libc::SIGTERM) || b_code != Some(0) || matched.unwrap_or(0) == 0 {
        return Err(format!(
            "the pair: primary exited {p_code:?} on SIGTERM, backup {b_code:?}, state digests matched {matched:?}\n--- primary stderr ---\n{}\n--- backup stderr ---\n{}",
            bench::tail(&primary.vm.stderr(), 3000),
            bench::tail(&b_err, 3000)
        )
        .into());
    }
    println!(
        "  pair: the backup ended with status 0, {} state digests matched",
        matched.unwrap_or(0)
    );
    Ok(m)
}

fn p(m: &Measure, q: f64) -> f64 {
    bench::quantile(&m.lat, q)
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-net", || {
        let opts = bench::parse_options(1, None, &["--requests", "--warmup"], USAGE)?;
        let num = |name: &str, default: usize| -> Result<usize> {
            match opts.extra(name) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0 || name == "--warmup")
                    .ok_or_else(|| format!("{name} wants a positive number, not {v:?}").into()),
            }
        };
        let requests = num("--requests", 200)?;
        let warmup = num("--warmup", 20)?;
        let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=counter");
        println!("== bench-net: the guest's TCP counter from a client namespace, alone vs primary with backup ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; {} repetition(s) of alone, pair; one connection each: {warmup} warm-up then {requests} sequential requests",
            workspace_bin("twinvm").display(),
            twinvm_tests::guest_dir().display(),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-net")?;
        let mut topo = Topology::new();
        let primary_host = topo.host("primary", 11, true);
        let backup_host = topo.host("backup", 12, false);
        let client = topo.host("client", 1, false);
        let mut results = Vec::new();
        for i in 0..opts.runs {
            let n = i + 1;
            let a = alone(&primary_host, &client, &append, requests, warmup)
                .map_err(|e| format!("rep {n}, guest alone: {e}"))?;
            println!(
                "rep {n}: alone {:8.1} req/s, latency p50 {:.2} ms, p99 {:.2} ms; {requests} answers checked",
                a.rate,
                p(&a, 0.5),
                p(&a, 0.99)
            );
            let b = pair(
                &scratch,
                n,
                (&primary_host, &backup_host, &client),
                &append,
                requests,
                warmup,
            )
            .map_err(|e| format!("rep {n}, pair: {e}"))?;
            println!(
                "rep {n}: pair  {:8.1} req/s, latency p50 {:.2} ms, p99 {:.2} ms; {requests} answers checked; {} B acked per request ({} net of the idle guest's {} B/s), {} log entries per request",
                b.rate,
                p(&b, 0.5),
                p(&b, 0.99),
                b.bytes.map_or("?".into(), |x| format!("{:.0}", x.0)),
                b.bytes.map_or("?".into(), |x| format!("{:.0}", x.2)),
                b.bytes.map_or("?".into(), |x| format!("{:.0}", x.1)),
                b.entries.map_or("?".into(), |x| format!("{x:.1}"))
            );
            results.push((a, b));
        }
        drop(topo);

        let med = |f: &dyn Fn(&(Measure, Measure)) -> f64| -> f64 {
            bench::summary(&results.iter().map(f).collect::<Vec<_>>()).0
        };
        println!();
        println!(
            "  {:<26}  {:>10}  {:>10}  {:>10}",
            "figure (median of reps)", "alone", "pair", "pair/alone"
        );
        for (label, fa, fb) in [
            (
                "requests/s",
                &(|r: &(Measure, Measure)| r.0.rate) as &dyn Fn(&(Measure, Measure)) -> f64,
                &(|r: &(Measure, Measure)| r.1.rate) as &dyn Fn(&(Measure, Measure)) -> f64,
            ),
            ("latency p50 (ms)", &|r| p(&r.0, 0.5), &|r| p(&r.1, 0.5)),
            ("latency p99 (ms)", &|r| p(&r.0, 0.99), &|r| p(&r.1, 0.99)),
        ] {
            let (a, b) = (med(fa), med(fb));
            println!("  {label:<26}  {a:>10.2}  {b:>10.2}  {:>9.2}x", b / a);
        }
        let col = |f: &dyn Fn(&(Measure, Measure)) -> Option<f64>| -> Vec<f64> {
            results.iter().map(|r| f(r).unwrap_or(f64::NAN)).collect()
        };
        let mut t = Table::new();
        t.heading("guest alone");
        t.row("requests/s", col(&|r| Some(r.0.rate)), "req/s", 1);
        t.row("latency p50", col(&|r| Some(p(&r.0, 0.5))), "ms", 2);
        t.row("latency p99", col(&|r| Some(p(&r.0, 0.99))), "ms", 2);
        t.heading("primary with backup (--nic)");
        t.row("requests/s", col(&|r| Some(r.1.rate)), "req/s", 1);
        t.row("latency p50", col(&|r| Some(p(&r.1, 0.5))), "ms", 2);
        t.row("latency p99", col(&|r| Some(p(&r.1, 0.99))), "ms", 2);
        t.row(
            "rate pair / alone",
            col(&|r| Some(r.1.rate / r.0.rate)),
            "x",
            3,
        );
        t.row(
            "p50 pair / alone",
            col(&|r| Some(p(&r.1, 0.5) / p(&r.0, 0.5))),
            "x",
            3,
        );
        t.row(
            "p99 pair / alone",
            col(&|r| Some(p(&r.1, 0.99) / p(&r.0, 0.99))),
            "x",
            3,
        );
        t.heading("log channel (primary's status file, acked_bytes)");
        t.row(
            "log bytes acked per request, as read",
            col(&|r| r.1.bytes.map(|b| b.0)),
            "B",
            0,
        );
        t.row(
            "idle guest's log rate",
            col(&|r| r.1.bytes.map(|b| b.1)),
            "B/s",
            0,
        );
        t.row(
            "log bytes per request, net of idle",
            col(&|r| r.1.bytes.map(|b| b.2)),
            "B",
            0,
        );
        t.row(
            "log entries sent per request, as read",
            col(&|r| r.1.entries),
            "",
            1,
        );
        println!();
        print!("{}", t.render());
        println!(
            "  (latency: one request's round trip from the client namespace, the next sent when its answer came;\n   net of idle: minus the idle rate over the time between the two status reports read)"
        );
        println!();
        println!(
            "reps: all {} OK: every answer checked (count +1 each time), the backup matched every state digest",
            opts.runs
        );
        Ok(())
    })
}
