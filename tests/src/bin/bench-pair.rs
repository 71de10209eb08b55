//! Benchmark: the cost of fault tolerance, a live primary/backup pair against a plain run.
//!
//! Runs the guest's `hostile` script (`--append twinvm.run=hostile`) two ways, alternating
//! so that noise on the host spreads over both: a plain `twinvm run`, and a `twinvm primary`
//! streaming its log over loopback TCP to a `twinvm backup` that replays it live. It prints
//! the FT overhead (pair / plain wall time of the primary), the log channel's bandwidth, the
//! delay the output rule adds to console output, how far the backup lags behind the primary
//! (sampled from both `--status` files every 200 ms), when the backup finishes after the
//! primary, and the time flow control held the primary's guest back.
//!
//! Nothing is pinned by default: the primary and the backup run at once, each on whatever
//! host CPU the scheduler gives it (two here). A pair run fails (exit status 1, after the
//! figures of the others are printed) if either side exits non-zero, if the backup reports
//! no matched state digests, or if the backup's console differs by one byte from the
//! primary's. Timings are printed, never asserted.

use std::path::Path;
use std::time::{Duration, Instant};

use twinvm_tests::bench::{self, Result, ScratchDir, Stats, StatusSample, Table, Timed};
use twinvm_tests::workspace_bin;

const USAGE: &str = "\
Usage: bench-pair [--runs N] [--cpu N|none] [--backup-cpu N|none] [--rounds N]

Runs the `hostile` guest workload plain and as a live primary/backup pair, N times each
(default 2), alternating, and prints the FT overhead, log bandwidth, output delay, the
backup's lag and flow control figures.
  --runs N              repetitions of (plain, pair) (default 2)
  --cpu N|none          pin the vCPU thread of the plain run and of the primary to host
                        CPU N (default none)
  --backup-cpu N|none   pin the backup's vCPU thread to host CPU N (default none)
  --rounds N            rounds of the workload (twinvm.rounds=N; default: the script's, 20)
";

/// Bound on one run: a guard against hanging forever, never a measurement.
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

/// How often both status files are read while the pair runs.
const SAMPLE: Duration = Duration::from_millis(200);

/// How often the processes are checked for exit.
const POLL: Duration = Duration::from_millis(5);

/// One reading of both status files.
struct Sample {
    primary: Option<StatusSample>,
    backup: Option<StatusSample>,
}

/// What one pair run measured.
struct PairRun {
    /// Primary: spawn -> exit.
    primary_wall: f64,
    /// Backup: spawn -> exit.
    backup_wall: f64,
    /// Backup exit minus primary exit.
    backup_after: f64,
    primary: Stats,
    backup: Option<Stats>,
    /// From the primary's `output rule:` line: bytes, chunks, median and p99 (s).
    rule: Option<(f64, f64, f64, f64)>,
    /// Little's law: mean in-flight entries over the entries sent per second, the mean, and
    /// how many of the primary's distinct reports had entries in flight, of how many.
    ack_latency: Option<(f64, f64, usize, usize)>,
    /// Primary position minus backup position, as read at the same instant.
    lag_raw: Vec<f64>,
    /// For each backup report: seconds since the primary was at the backup's position.
    lag_time: Vec<f64>,
    /// The primary's throttled_s in its last status report.
    throttled: Option<f64>,
    /// State digests the primary recorded and the backup matched.
    digests: (Option<u64>, Option<u64>),
    /// Status samples taken while the primary ran.
    samples: usize,
}

fn path_arg(p: &Path) -> Result<String> {
    Ok(p.to_str().ok_or("non-UTF-8 temp path")?.to_string())
}

/// A plain `twinvm run` to its exit: wall time and stats.
fn plain_run(
    scratch: &ScratchDir,
    n: usize,
    append: &str,
    cpu: Option<&str>,
) -> Result<(f64, Stats)> {
    let stats = scratch.join(&format!("plain-{n}.json"));
    let stats_arg = path_arg(&stats)?;
    let mut args = vec!["run", "--append", append, "--stats", &stats_arg];
    if let Some(c) = cpu {
        args.extend(["--cpu", c]);
    }
    let mut t = Timed::spawn(&args);
    let wall = t.wait_poweroff(&format!("plain run {n}"), RUN_TIMEOUT)?;
    Ok((wall, Stats::read(&stats)?))
}

/// The output rule's figures from the primary's standard error: bytes, chunks, median and
/// p99 delay in seconds.
fn output_rule(stderr: &str) -> Option<(f64, f64, f64, f64)> {
    let line = stderr.lines().find(|l| l.contains("output rule: "))?;
    // "B bytes in C chunks", or since the NIC "B console bytes and F frames in C chunks".
    let bytes = bench::number_before(line, " console bytes")
        .or_else(|| bench::number_before(line, " bytes in "))?;
    let chunks = bench::number_before(line, " chunks held")?;
    let median = line.split_once("median ")?.1.split(',').next()?;
    let p99 = line.split_once("p99 ")?.1;
    Some((
        bytes as f64,
        chunks as f64,
        bench::parse_debug_duration(median)?,
        bench::parse_debug_duration(p99)?,
    ))
}

/// The distinct reports of one side, `(written, field)` in the order written.
fn series(
    samples: &[Sample],
    side: fn(&Sample) -> Option<&StatusSample>,
    key: &str,
) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in samples.iter().filter_map(side) {
        if let Some(v) = s.f(key) {
            if out.last().is_none_or(|&(w, _)| s.written > w) {
                out.push((s.written, v));
            }
        }
    }
    out
}

/// One primary/backup pair to the exit of both, sampling their status files meanwhile.
/// `Ok(Err(why))` is a run that completed but failed its checks.
fn pair_run(
    scratch: &ScratchDir,
    n: usize,
    append: &str,
    cpu: Option<&str>,
    backup_cpu: Option<&str>,
) -> Result<std::result::Result<PairRun, String>> {
    let [console, p_stats, b_stats, p_status, b_status] = [
        "backup.console",
        "primary.json",
        "backup.json",
        "primary.status",
        "backup.status",
    ]
    .map(|f| scratch.join(&format!("pair-{n}-{f}")));
    for p in [&console, &p_stats, &b_stats, &p_status, &b_status] {
        let _ = std::fs::remove_file(p);
    }
    let [console_a, p_stats_a, b_stats_a, p_status_a, b_status_a] =
        [&console, &p_stats, &b_stats, &p_status, &b_status].map(|p| path_arg(p));
    let (console_a, p_stats_a, b_stats_a, p_status_a, b_status_a) =
        (console_a?, p_stats_a?, b_stats_a?, p_status_a?, b_status_a?);

    let mut b_args = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--console-log",
        &console_a,
        "--stats",
        &b_stats_a,
        "--status",
        &b_status_a,
        "--append",
        append,
    ];
    if let Some(c) = backup_cpu {
        b_args.extend(["--cpu", c]);
    }
    let mut backup = Timed::spawn(&b_args);
    let addr = bench::wait_stderr(&backup, "backup listening on ", Duration::from_secs(60))?;
    let addr = addr.trim().to_string();
    let mut p_args = vec![
        "primary",
        "--backup",
        &addr,
        "--stats",
        &p_stats_a,
        "--status",
        &p_status_a,
        "--append",
        append,
    ];
    if let Some(c) = cpu {
        p_args.extend(["--cpu", c]);
    }
    let mut primary = Timed::spawn(&p_args);

    // Both to their exit; the status files every SAMPLE while the primary runs.
    let mut samples = Vec::new();
    let mut next_sample = primary.t0;
    let (mut p_end, mut b_end) = (None, None);
    let deadline = primary.t0 + RUN_TIMEOUT;
    while p_end.is_none() || b_end.is_none() {
        let now = Instant::now();
        if p_end.is_none() && bench::has_exited(primary.vm.pid) {
            p_end = Some(now);
        }
        if b_end.is_none() && bench::has_exited(backup.vm.pid) {
            b_end = Some(now);
        }
        if p_end.is_none() && now >= next_sample {
            samples.push(Sample {
                primary: StatusSample::read(&p_status),
                backup: StatusSample::read(&b_status),
            });
            next_sample += SAMPLE;
        }
        if now > deadline {
            return Err(format!(
                "pair run {n}: primary and backup did not both exit within {RUN_TIMEOUT:?}\n--- primary stderr ---\n{}\n--- backup stderr ---\n{}",
                bench::tail(&primary.vm.stderr(), 3000),
                bench::tail(&backup.vm.stderr(), 3000)
            )
            .into());
        }
        std::thread::sleep(POLL);
    }
    let (p_end, b_end) = (p_end.expect("exited"), b_end.expect("exited"));
    let p_code = primary.vm.wait_exit(Duration::from_secs(10)).code();
    let b_code = backup.vm.wait_exit(Duration::from_secs(10)).code();
    let p_err = primary.vm.stderr();
    let b_err = backup.vm.stderr();
    let primary_console = bench::console_bytes(&primary.vm);
    let backup_console = std::fs::read(&console).unwrap_or_default();
    let matched = bench::number_before(&b_err, " state digests matched");
    let recorded = bench::number_before(&p_err, " digests, ");
    let complete = b_err.contains("replay complete");

    let mut why = Vec::new();
    if p_code != Some(0) {
        why.push(format!("primary exited with status {p_code:?}, not 0"));
    }
    if b_code != Some(0) {
        why.push(format!("backup exited with status {b_code:?}, not 0"));
    }
    if !complete || matched.unwrap_or(0) == 0 {
        why.push(format!(
            "the backup did not report matched state digests (replay complete: {complete}, digests matched: {matched:?})"
        ));
    }
    let same = primary_console == backup_console;
    let first_diff = primary_console
        .iter()
        .zip(&backup_console)
        .position(|(a, b)| a != b)
        .unwrap_or(primary_console.len().min(backup_console.len()));
    println!(
        "rep {n}: pair   {:8.2} s primary (exit {p_code:?}), backup exit {b_code:?} {:+.2} s after it; {} state digests matched of {} recorded; backup console {} the primary's ({} bytes){}",
        primary.since_start(p_end),
        b_end.duration_since(p_end).as_secs_f64(),
        matched.map_or("?".to_string(), |m| m.to_string()),
        recorded.map_or("?".to_string(), |m| m.to_string()),
        if same { "identical to" } else { "DIFFERS from" },
        primary_console.len(),
        if why.is_empty() && same { ": PAIR OK" } else { ": PAIR FAILED" }
    );
    if !same {
        why.push(format!(
            "the backup's console ({} bytes) differs from the primary's ({} bytes) from byte {first_diff}",
            backup_console.len(),
            primary_console.len()
        ));
    }
    if !why.is_empty() {
        return Ok(Err(format!(
            "pair run {n}: {}\n--- primary stderr ---\n{}\n--- backup stderr ---\n{}",
            why.join("; "),
            bench::tail(&p_err, 3000),
            bench::tail(&b_err, 3000)
        )));
    }
    if !String::from_utf8_lossy(&primary_console).contains("hostile done hash") {
        println!(
            "note: pair run {n}: no `hostile done hash` line on the console (its last output was lost at power-off)"
        );
    }

    // The backup's lag: both files as read at the same instant. A report is rewritten at an
    // exit once a second has passed, so it lags its process by at most the exits of about a
    // second (a file unchanged for longer means no exits: the position did not move).
    let lag_raw: Vec<f64> = samples
        .iter()
        .filter_map(|s| {
            let (p, b) = (s.primary.as_ref()?, s.backup.as_ref()?);
            Some(p.f("position")? - b.f("position")?)
        })
        .collect();
    let p_pos = series(&samples, |s| s.primary.as_ref(), "position");
    let b_pos = series(&samples, |s| s.backup.as_ref(), "position");
    let p_by_pos: Vec<(f64, f64)> = p_pos.iter().map(|&(t, p)| (p, t)).collect();
    let mut lag_time = Vec::new();
    for &(t, pos) in &b_pos {
        if let Some(tp) = bench::interpolate(&p_by_pos, pos) {
            lag_time.push(t - tp);
        }
    }

    // The output rule's delay, estimated from the status files alone (Little's law): the
    // mean number of entries sent but not acknowledged, over the entries sent per second,
    // is the mean time an entry waits for its ack, which is what held output waits for.
    let sent = series(&samples, |s| s.primary.as_ref(), "sent_seq");
    let in_flight = series(&samples, |s| s.primary.as_ref(), "in_flight_entries");
    let ack_latency = match (sent.first(), sent.last()) {
        (Some(&(t0, s0)), Some(&(t1, s1))) if t1 > t0 && s1 > s0 && !in_flight.is_empty() => {
            let mean = in_flight.iter().map(|&(_, v)| v).sum::<f64>() / in_flight.len() as f64;
            let busy = in_flight.iter().filter(|&&(_, v)| v > 0.0).count();
            Some((mean / ((s1 - s0) / (t1 - t0)), mean, busy, in_flight.len()))
        }
        _ => None,
    };
    let throttled = StatusSample::read(&p_status).and_then(|s| s.f("throttled_s"));
    let primary_stats = Stats::read(&p_stats)?;
    let backup_stats = Stats::read(&b_stats).ok();
    Ok(Ok(PairRun {
        primary_wall: primary.since_start(p_end),
        backup_wall: backup.since_start(b_end),
        backup_after: b_end.duration_since(p_end).as_secs_f64(),
        primary: primary_stats,
        backup: backup_stats,
        rule: output_rule(&p_err),
        ack_latency,
        lag_raw,
        lag_time,
        throttled,
        digests: (recorded, matched),
        samples: samples.len(),
    }))
}

#[test]
fn output_rule_line_both_formats() {
    let old = "twinvm: output rule: 7866 bytes in 7866 chunks held for the backup's ack: median 416.00µs, p99 10.09ms";
    let new = "twinvm: output rule: 7866 console bytes and 0 frames in 7866 chunks held for the backup's ack: median 1.00ms, p99 2.00s";
    let o = output_rule(old).unwrap();
    assert_eq!((o.0, o.1), (7866.0, 7866.0));
    assert!((o.3 - 0.01009).abs() < 1e-9);
    let n = output_rule(new).unwrap();
    assert_eq!((n.0, n.1, n.3), (7866.0, 7866.0, 2.0));
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-pair", || {
        let opts = bench::parse_options(2, None, &["--backup-cpu", "--rounds"], USAGE)?;
        let mut append = "twinvm.run=hostile".to_string();
        if let Some(r) = opts.extra("--rounds") {
            let n: u32 = r
                .parse()
                .map_err(|_| format!("--rounds wants a number, not {r:?}"))?;
            append.push_str(&format!(" twinvm.rounds={n}"));
        }
        let backup_cpu: Option<usize> = match opts.extra("--backup-cpu") {
            None | Some("none") => None,
            Some(c) => Some(c.parse().map_err(|_| {
                format!("--backup-cpu wants a host CPU number or `none`, not {c:?}")
            })?),
        };
        let cpu = opts.cpu.map(|c| c.to_string());
        let backup_cpu_arg = backup_cpu.map(|c| c.to_string());
        let twinvm = workspace_bin("twinvm");
        println!("== bench-pair: plain vs live primary/backup pair, workload `{append}` ==");
        println!("{}", bench::host_line());
        let pin =
            |c: Option<usize>| c.map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}"));
        println!(
            "twinvm: {}; guest image: {}; {} repetition(s) of plain, pair",
            twinvm.display(),
            twinvm_tests::guest_dir().display(),
            opts.runs
        );
        println!(
            "vCPU threads: plain and primary {}, backup {}; the primary and the backup run at the same time, over loopback TCP, sharing the host's {} CPUs",
            pin(opts.cpu),
            pin(backup_cpu),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let scratch = ScratchDir::new("bench-pair")?;
        let mut plains = Vec::new();
        let mut pairs = Vec::new();
        let mut failures = Vec::new();
        for i in 0..opts.runs {
            let n = i + 1;
            let (wall, stats) = plain_run(&scratch, n, &append, cpu.as_deref())?;
            println!("rep {n}: plain  {wall:8.2} s, exit Some(0)");
            plains.push((wall, stats));
            match pair_run(
                &scratch,
                n,
                &append,
                cpu.as_deref(),
                backup_cpu_arg.as_deref(),
            )? {
                Ok(p) => pairs.push((n - 1, p)),
                Err(why) => failures.push(why),
            }
        }
        print_table(&plains, &pairs)?;
        println!();
        if failures.is_empty() {
            println!(
                "pairs: all {} exited 0, the backup matched every state digest it reported and its console equals the primary's byte for byte",
                opts.runs
            );
            Ok(())
        } else {
            println!(
                "pairs: {} of {} FAILED (left out of the figures above)",
                failures.len(),
                opts.runs
            );
            Err(failures.join("\n").into())
        }
    })
}

fn print_table(plains: &[(f64, Stats)], pairs: &[(usize, PairRun)]) -> Result<()> {
    let mut t = Table::new();
    let col =
        |f: &dyn Fn(&PairRun) -> f64| -> Vec<f64> { pairs.iter().map(|(_, p)| f(p)).collect() };
    let opt = |x: Option<f64>| x.unwrap_or(f64::NAN);
    let p_stat =
        |k: &str| -> Result<Vec<f64>> { pairs.iter().map(|(_, p)| p.primary.f(k)).collect() };
    let plain_stat = |k: &str| -> Result<Vec<f64>> { plains.iter().map(|(_, s)| s.f(k)).collect() };

    t.heading("wall time");
    t.row(
        "plain `twinvm run`, spawn -> exit",
        plains.iter().map(|p| p.0).collect(),
        "s",
        2,
    );
    t.row(
        "primary with backup, spawn -> exit",
        col(&|p| p.primary_wall),
        "s",
        2,
    );
    t.row("backup, spawn -> exit", col(&|p| p.backup_wall), "s", 2);

    t.heading("FT overhead (each pair over the plain run before it)");
    t.row(
        "pair / plain (primary wall)",
        pairs
            .iter()
            .map(|(i, p)| p.primary_wall / plains[*i].0)
            .collect(),
        "x",
        3,
    );
    t.row(
        "plain: in KVM_RUN (in_guest_s)",
        plain_stat("in_guest_s")?,
        "s",
        2,
    );
    t.row(
        "primary: in KVM_RUN (in_guest_s)",
        p_stat("in_guest_s")?,
        "s",
        2,
    );
    t.row("plain: idle (idle_s)", plain_stat("idle_s")?, "s", 2);
    t.row("primary: idle (idle_s)", p_stat("idle_s")?, "s", 2);
    t.row("plain: positions", plain_stat("positions")?, "", 0);
    t.row("primary: positions", p_stat("positions")?, "", 0);
    t.row(
        "backup: positions",
        col(&|p| opt(p.backup.as_ref().and_then(|s| s.f("positions").ok()))),
        "",
        0,
    );

    let log_bytes = p_stat("log_bytes")?;
    let positions = p_stat("positions")?;
    let walls = col(&|p| p.primary_wall);
    t.heading("log channel (primary -> backup, loopback TCP)");
    t.row(
        "log bytes",
        log_bytes.iter().map(|b| b / 1024.0).collect(),
        "KiB",
        1,
    );
    t.row(
        "log bytes / primary wall s",
        log_bytes.iter().zip(&walls).map(|(b, w)| b / w).collect(),
        "B/s",
        0,
    );
    t.row(
        "log bytes per 1000 positions",
        log_bytes
            .iter()
            .zip(&positions)
            .map(|(b, p)| 1000.0 * b / p)
            .collect(),
        "B",
        0,
    );
    t.row(
        "state digests recorded",
        col(&|p| opt(p.digests.0.map(|d| d as f64))),
        "",
        0,
    );
    t.row(
        "state digests matched by the backup",
        col(&|p| opt(p.digests.1.map(|d| d as f64))),
        "",
        0,
    );

    t.heading("output rule (console held until the backup acks)");
    t.row(
        "console bytes held",
        col(&|p| opt(p.rule.map(|r| r.0))),
        "B",
        0,
    );
    t.row("chunks held", col(&|p| opt(p.rule.map(|r| r.1))), "", 0);
    t.row(
        "delay per chunk, median (primary's line)",
        col(&|p| opt(p.rule.map(|r| 1000.0 * r.2))),
        "ms",
        3,
    );
    t.row(
        "delay per chunk, p99 (primary's line)",
        col(&|p| opt(p.rule.map(|r| 1000.0 * r.3))),
        "ms",
        3,
    );
    t.row(
        "mean ack wait, status files (Little's law)",
        col(&|p| opt(p.ack_latency.map(|a| 1000.0 * a.0))),
        "ms",
        3,
    );
    t.row(
        "  mean entries in flight",
        col(&|p| opt(p.ack_latency.map(|a| a.1))),
        "",
        1,
    );
    t.row(
        "  primary reports with entries in flight",
        col(&|p| opt(p.ack_latency.map(|a| a.2 as f64))),
        "",
        0,
    );
    t.row(
        "  primary reports (distinct)",
        col(&|p| opt(p.ack_latency.map(|a| a.3 as f64))),
        "",
        0,
    );

    t.heading("backup lag (status files sampled every 200 ms, each rewritten ~1/s)");
    t.row(
        "status samples while the primary ran",
        col(&|p| p.samples as f64),
        "",
        0,
    );
    t.row(
        "lag, as read: median",
        col(&|p| bench::quantile(&p.lag_raw, 0.5)),
        "positions",
        0,
    );
    t.row(
        "lag, as read: max",
        col(&|p| bench::quantile(&p.lag_raw, 1.0)),
        "positions",
        0,
    );
    t.row(
        "lag in time: median",
        col(&|p| bench::quantile(&p.lag_time, 0.5)),
        "s",
        2,
    );
    t.row(
        "lag in time: max",
        col(&|p| bench::quantile(&p.lag_time, 1.0)),
        "s",
        2,
    );
    t.row(
        "backup exit after primary exit",
        col(&|p| p.backup_after),
        "s",
        3,
    );

    t.heading("flow control");
    t.row(
        "primary throttled (throttled_s)",
        col(&|p| opt(p.throttled)),
        "s",
        3,
    );
    println!();
    print!("{}", t.render());
    println!(
        "  (lag, as read: primary minus backup position in the two files read at the same instant (each written at\n   an exit, at most ~1/s); lag in time: how long before each backup report the primary had been at the\n   backup's position (interpolated between the primary's reports); Little's law: mean unacknowledged\n   entries in the primary's reports / entries sent per second: 0 when no report caught an entry in flight)"
    );
    Ok(())
}
