//! Benchmark: the cost of record and replay, on one replay-hostile workload.
//!
//! Runs the guest's `hostile` script (`--append twinvm.run=hostile`: clocks, the RTC,
//! randomness, sleeps, fork) three ways, side by side and alternating so that noise on the
//! host spreads over all three: a plain `twinvm run`, a `twinvm record --log`, and a
//! `twinvm replay --log` of that very recording. It prints wall times and their ratios, the
//! log's size per second and per 1000 positions, and what the state digests cost.
//!
//! Every replay must exit 0 (all digests matched, guest powered off) and print the same
//! workload hashes as its recording; a replay that does not is a failed benchmark (exit
//! status 1), though the figures of the other runs are still printed. Timings are printed,
//! never asserted.

use std::time::Duration;

use twinvm_tests::bench::{self, Result, ScratchDir, Stats, Table, Timed};
use twinvm_tests::workspace_bin;

const USAGE: &str = "\
Usage: bench-rr [--runs N] [--cpu N|none] [--rounds N]

Runs the `hostile` guest workload plain, recorded and replayed, N times each (default 2),
alternating, and prints record/plain and replay/record ratios, log bytes and digest cost.
  --runs N       repetitions of (plain, record, replay) (default 2)
  --cpu N|none   pin the vCPU thread to host CPU N in all three (default 1: on this
                 project's software KVM the guest's CPUID shows the host CPU's APIC ID, so
                 a replay must run on the CPU its recording ran on)
  --rounds N     rounds of the workload (twinvm.rounds=N; default: the script's, 20)
";

/// Bound on one run: a guard against hanging forever, never a measurement.
const RUN_TIMEOUT: Duration = Duration::from_secs(1800);

/// One finished `twinvm` process.
struct Done {
    wall: f64,
    code: Option<i32>,
    stats: Option<Stats>,
    hashes: Vec<String>,
    stderr: String,
}

/// The workload's hash lines (`round N hash X`, `hostile done hash X`) from a console.
fn hash_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("round ") || l.starts_with("hostile done hash"))
        .map(str::to_string)
        .collect()
}

/// Runs `twinvm args --stats FILE [--cpu N]` to its exit.
fn run(scratch: &ScratchDir, name: &str, args: &[&str], cpu: Option<usize>) -> Result<Done> {
    let stats_path = scratch.join(&format!("{name}.json"));
    let _ = std::fs::remove_file(&stats_path);
    let stats_arg = stats_path
        .to_str()
        .ok_or("non-UTF-8 temp path")?
        .to_string();
    let cpu_arg = cpu.map(|c| c.to_string());
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--stats", &stats_arg]);
    if let Some(c) = &cpu_arg {
        all.extend(["--cpu", c]);
    }
    let mut t = Timed::spawn(&all);
    let (wall, code) = t.wait_exit(RUN_TIMEOUT)?;
    let stats = if stats_path.exists() {
        Some(Stats::read(&stats_path)?)
    } else {
        None
    };
    Ok(Done {
        wall,
        code,
        stats,
        hashes: hash_lines(&t.vm.console()),
        stderr: t.vm.stderr(),
    })
}

/// A plain run or a recording must power the guest off (exit status 0).
fn check_ok(what: &str, d: &Done) -> Result<Stats> {
    if d.code != Some(0) {
        return Err(format!(
            "{what}: twinvm exited with status {:?}, not 0\n--- stderr ---\n{}",
            d.code, d.stderr
        )
        .into());
    }
    if !d.hashes.iter().any(|l| l.starts_with("hostile done hash")) {
        // Seen here: the guest powers off before its last console bytes are sent. Not a
        // failure of what is measured, but worth saying.
        println!(
            "note: {what}: no `hostile done hash` line on the console (its last output was lost at power-off; {} hash lines)",
            d.hashes.len()
        );
    }
    d.stats
        .clone()
        .ok_or_else(|| format!("{what}: no --stats file written").into())
}

/// The number before ` state digests matched` on the replay's standard error.
fn digests_matched(stderr: &str) -> Option<u64> {
    let (before, _) = stderr.split_once(" state digests matched")?;
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The figures of one repetition.
struct Rep {
    plain: Stats,
    plain_wall: f64,
    record: Stats,
    record_wall: f64,
    replay: Option<(Stats, f64)>,
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-rr", || {
        let opts = bench::parse_options(2, Some(1), &["--rounds"], USAGE)?;
        let mut append = "twinvm.run=hostile".to_string();
        if let Some(r) = opts.extra("--rounds") {
            let n: u32 = r
                .parse()
                .map_err(|_| format!("--rounds wants a number, not {r:?}"))?;
            append.push_str(&format!(" twinvm.rounds={n}"));
        }
        let twinvm = workspace_bin("twinvm");
        println!("== bench-rr: plain vs record vs replay, workload `{append}` ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; vCPU {}; {} repetition(s) of plain, record, replay",
            twinvm.display(),
            twinvm_tests::guest_dir().display(),
            opts.cpu
                .map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}")),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-rr")?;
        let log = scratch.join("hostile.twinlog");
        let log_arg = log.to_str().ok_or("non-UTF-8 temp path")?.to_string();
        let mut reps = Vec::new();
        let mut failures = Vec::new();
        for i in 0..opts.runs {
            let n = i + 1;
            let plain = run(
                &scratch,
                &format!("plain-{n}"),
                &["run", "--append", &append],
                opts.cpu,
            )?;
            let plain_stats = check_ok(&format!("plain run {n}"), &plain)?;
            println!(
                "rep {n}: plain  {:8.2} s, exit {:?}",
                plain.wall, plain.code
            );
            let _ = std::fs::remove_file(&log);
            let rec = run(
                &scratch,
                &format!("record-{n}"),
                &["record", "--log", &log_arg, "--append", &append],
                opts.cpu,
            )?;
            let rec_stats = check_ok(&format!("recording {n}"), &rec)?;
            println!("rep {n}: record {:8.2} s, exit {:?}", rec.wall, rec.code);
            let rep = run(
                &scratch,
                &format!("replay-{n}"),
                &["replay", "--log", &log_arg],
                opts.cpu,
            )?;
            let same_console = rep.hashes == rec.hashes;
            let matched = digests_matched(&rep.stderr);
            let ok = rep.code == Some(0) && same_console && rep.stats.is_some();
            println!(
                "rep {n}: replay {:8.2} s, exit {:?}: {}; {} state digests matched; workload hashes {} the recording's ({} lines)",
                rep.wall,
                rep.code,
                if ok { "REPLAY OK" } else { "REPLAY FAILED" },
                matched.map_or("?".to_string(), |m| m.to_string()),
                if same_console { "identical to" } else { "DIFFER from" },
                rec.hashes.len()
            );
            if !ok {
                failures.push(format!(
                    "replay {n}: exit {:?}, hashes {}\n--- stderr ---\n{}",
                    rep.code,
                    if same_console { "identical" } else { "differ" },
                    bench::tail(&rep.stderr, 3000)
                ));
            }
            reps.push(Rep {
                plain: plain_stats,
                plain_wall: plain.wall,
                record: rec_stats,
                record_wall: rec.wall,
                replay: if ok {
                    rep.stats.map(|s| (s, rep.wall))
                } else {
                    None
                },
            });
        }
        print_table(&reps)?;
        println!();
        if failures.is_empty() {
            println!(
                "replays: all {} exited 0 with every digest matched and identical workload output",
                opts.runs
            );
            Ok(())
        } else {
            println!(
                "replays: {} of {} FAILED (left out of the replay figures above)",
                failures.len(),
                opts.runs
            );
            Err(failures.join("\n").into())
        }
    })
}

fn print_table(reps: &[Rep]) -> Result<()> {
    let ok: Vec<&Rep> = reps.iter().filter(|r| r.replay.is_some()).collect();
    let replay = |r: &Rep| r.replay.as_ref().expect("filtered").clone();
    let f = |s: &Stats, k: &str| s.f(k);
    let mut t = Table::new();

    t.heading("wall time, spawn -> exit");
    t.row(
        "plain `twinvm run`",
        reps.iter().map(|r| r.plain_wall).collect(),
        "s",
        2,
    );
    t.row(
        "`twinvm record`",
        reps.iter().map(|r| r.record_wall).collect(),
        "s",
        2,
    );
    t.row(
        "`twinvm replay`",
        ok.iter().map(|r| replay(r).1).collect(),
        "s",
        2,
    );

    t.heading("ratios (per repetition)");
    t.row(
        "record / plain",
        reps.iter().map(|r| r.record_wall / r.plain_wall).collect(),
        "x",
        3,
    );
    t.row(
        "replay / record",
        ok.iter().map(|r| replay(r).1 / r.record_wall).collect(),
        "x",
        3,
    );
    t.row(
        "replay / plain",
        ok.iter().map(|r| replay(r).1 / r.plain_wall).collect(),
        "x",
        3,
    );

    for (name, getter) in [
        (
            "plain",
            &(|r: &Rep| Some(r.plain.clone())) as &dyn Fn(&Rep) -> Option<Stats>,
        ),
        ("record", &|r: &Rep| Some(r.record.clone())),
        ("replay", &|r: &Rep| r.replay.as_ref().map(|x| x.0.clone())),
    ] {
        let ss: Vec<Stats> = reps.iter().filter_map(getter).collect();
        let col = |k: &str| -> Result<Vec<f64>> { ss.iter().map(|s| f(s, k)).collect() };
        t.heading(&format!("{name}: where the time went, counters"));
        t.row("in KVM_RUN (in_guest_s)", col("in_guest_s")?, "s", 2);
        t.row("idle, guest halted (idle_s)", col("idle_s")?, "s", 2);
        t.row("setup (setup_s)", col("setup_s")?, "s", 3);
        t.row("positions", col("positions")?, "", 0);
        t.row("interrupts injected", col("injected")?, "", 0);
        t.row("single-step exits", col("step_exits")?, "", 0);
    }

    let rec_col = |k: &str| -> Result<Vec<f64>> { reps.iter().map(|r| f(&r.record, k)).collect() };
    let log_bytes = rec_col("log_bytes")?;
    let rec_pos = rec_col("positions")?;
    let rec_wall: Vec<f64> = reps.iter().map(|r| r.record_wall).collect();
    let rec_guest = rec_col("in_guest_s")?;
    t.heading("the log (recording)");
    t.row(
        "log size",
        log_bytes.iter().map(|b| b / 1024.0).collect(),
        "KiB",
        1,
    );
    t.row(
        "log bytes / recording wall s",
        log_bytes
            .iter()
            .zip(&rec_wall)
            .map(|(b, w)| b / w)
            .collect(),
        "B/s",
        0,
    );
    t.row(
        "log bytes / s in KVM_RUN",
        log_bytes
            .iter()
            .zip(&rec_guest)
            .map(|(b, w)| b / w)
            .collect(),
        "B/s",
        0,
    );
    t.row(
        "log bytes per 1000 positions",
        log_bytes
            .iter()
            .zip(&rec_pos)
            .map(|(b, p)| 1000.0 * b / p)
            .collect(),
        "B",
        0,
    );

    for (name, ss) in [
        (
            "recording",
            reps.iter()
                .map(|r| (r.record.clone(), r.record_wall))
                .collect::<Vec<_>>(),
        ),
        ("replay", ok.iter().map(|r| replay(r)).collect::<Vec<_>>()),
    ] {
        let digests: Vec<f64> = ss
            .iter()
            .map(|(s, _)| f(s, "digests"))
            .collect::<Result<_>>()?;
        let dsec: Vec<f64> = ss
            .iter()
            .map(|(s, _)| f(s, "digest_s"))
            .collect::<Result<_>>()?;
        let pages: Vec<f64> = ss
            .iter()
            .map(|(s, _)| f(s, "digest_pages"))
            .collect::<Result<_>>()?;
        let per = |v: &[f64], scale: f64| -> Vec<f64> {
            v.iter()
                .zip(&digests)
                .map(|(x, d)| if *d > 0.0 { scale * x / d } else { f64::NAN })
                .collect()
        };
        t.heading(&format!("state digests ({name})"));
        t.row("digests taken", digests.clone(), "", 0);
        t.row("time in digests (digest_s)", dsec.clone(), "s", 3);
        t.row(
            "digest time / wall",
            dsec.iter()
                .zip(&ss)
                .map(|(d, (_, w))| 100.0 * d / w)
                .collect(),
            "% wall",
            2,
        );
        t.row("time per digest", per(&dsec, 1000.0), "ms", 2);
        t.row("pages hashed per digest", per(&pages, 1.0), "pages", 1);
    }
    println!();
    print!("{}", t.render());
    Ok(())
}
