//! Benchmark: guest time against host time under `twinvm run`, `record` and `replay`.
//!
//! Runs the guest image's `time` workload (sleeps, a CPU-bound awk loop, a printing shell
//! loop, file I/O; `twinvm.run=time`) and compares, between its first and last `clock` line,
//! the guest's elapsed CLOCK_MONOTONIC, CLOCK_REALTIME and /proc/uptime with the host's
//! elapsed time as seen on the console (drift = guest / host - 1). For the replay the host
//! time is the replay's own pace: its drift says how much faster or slower than the
//! recording the replay ran, while the guest's values are the recorded ones (checked). Also
//! prints boot time to the first clock line and the step counters of `--stats`.
//!
//! Uses the `twinvm` built next to this executable and the guest image of
//! `$TWINVM_GUEST_DIR` or `guest-images/out`. Timings are printed, never asserted.

use std::time::Duration;

use twinvm_tests::bench::{self, Result, ScratchDir, Stats, Table};
use twinvm_tests::timecheck::{drift, run_timed, samples, Drift, TimedRun};

const USAGE: &str = "\
Usage: bench-time [--runs N] [--cpu N|none] [--rounds R]

Runs the guest's `time` workload under run, record and replay N times (default 1) and prints
the drift of guest time against host time for each, side by side.
  --runs N       repetitions (default 1)
  --cpu N|none   pin the vCPU thread to host CPU N (default: not pinned)
  --rounds R     rounds of the workload, about 12 s each (default 5)
";

const TIMEOUT: Duration = Duration::from_secs(1200);

struct Measured {
    drift: Drift,
    first_clock: f64,
    wall: f64,
    stats: Option<Stats>,
}

fn measure(what: &str, r: &TimedRun, stats: Option<Stats>) -> Result<Measured> {
    if r.code != Some(0) {
        return Err(format!(
            "{what} exited with {:?}: {}",
            r.code,
            bench::tail(&r.stderr, 2000)
        )
        .into());
    }
    let s = samples(r);
    let d = drift(&s).ok_or_else(|| format!("{what}: fewer than two clock lines"))?;
    Ok(Measured {
        drift: d,
        first_clock: s[0].host,
        wall: r.wall,
        stats,
    })
}

/// The guest's run time as the stats file has it: time in the guest plus time idle.
fn x_wall(s: &Stats) -> Result<f64> {
    Ok(s.f("in_guest_s")? + s.f("idle_s")?)
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-time", || {
        let opts = bench::parse_options(1, None, &["--rounds"], USAGE)?;
        let rounds = opts.extra("--rounds").unwrap_or("5").to_string();
        let append = format!("twinvm.run=time twinvm.rounds={rounds}");
        println!("== bench-time: guest time vs host time (run, record, replay) ==");
        println!("{}", bench::host_line());
        println!(
            "guest image: {}; workload rounds {rounds}; vCPU {}; {} run(s)",
            twinvm_tests::guest_dir().display(),
            opts.cpu
                .map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}")),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-time")?;
        let cpu = opts.cpu.map(|c| c.to_string());
        let mut by_mode: [Vec<Measured>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for i in 0..opts.runs {
            let log = scratch.join(&format!("time-{i}.log"));
            let log = log.to_str().ok_or("non-UTF-8 temp path")?.to_string();
            let mut recorded = Vec::new();
            for (m, mode) in ["run", "record", "replay"].iter().enumerate() {
                let stats = scratch.join(&format!("{mode}-{i}.json"));
                let stats = stats.to_str().ok_or("non-UTF-8 temp path")?.to_string();
                let mut args: Vec<&str> = vec![mode];
                match *mode {
                    "replay" => args.extend(["--log", &log]),
                    "record" => args.extend(["--log", &log, "--append", &append]),
                    _ => args.extend(["--append", &append]),
                }
                if *mode != "replay" {
                    args.extend(["--stats", &stats]);
                    if let Some(c) = &cpu {
                        args.extend(["--cpu", c]);
                    }
                }
                let r = run_timed(&args, TIMEOUT);
                let st = if *mode == "replay" {
                    None
                } else {
                    Some(Stats::read(std::path::Path::new(&stats))?)
                };
                let got = measure(mode, &r, st)?;
                match *mode {
                    "record" => recorded = r.console.clone(),
                    "replay" if r.console != recorded => {
                        return Err("the replay's console differs from the recording's".into())
                    }
                    _ => {}
                }
                println!(
                    "run {}/{} {mode:>6}: host {:.1} s, guest monotonic {:.1} s, drift {:+.2}% (realtime {:+.2}%, uptime {:+.2}%), whole run {:.1} s",
                    i + 1,
                    opts.runs,
                    got.drift.host,
                    got.drift.mono,
                    got.drift.mono_pct(),
                    got.drift.real_pct(),
                    got.drift.uptime_pct(),
                    got.wall
                );
                by_mode[m].push(got);
            }
        }
        let mut t = Table::new();
        for (m, mode) in ["run", "record", "replay"].iter().enumerate() {
            let v = &by_mode[m];
            let col = |f: &dyn Fn(&Measured) -> f64| v.iter().map(f).collect::<Vec<f64>>();
            t.heading(&format!("twinvm {mode}"));
            t.row(
                "drift, CLOCK_MONOTONIC",
                col(&|x| x.drift.mono_pct()),
                "%",
                2,
            );
            t.row(
                "drift, CLOCK_REALTIME",
                col(&|x| x.drift.real_pct()),
                "%",
                2,
            );
            t.row(
                "drift, /proc/uptime",
                col(&|x| x.drift.uptime_pct()),
                "%",
                2,
            );
            t.row(
                "worst |guest - host| between two clock lines",
                col(&|x| x.drift.worst_step * 1000.0),
                "ms",
                0,
            );
            t.row(
                "host time, first -> last clock line",
                col(&|x| x.drift.host),
                "s",
                1,
            );
            t.row("spawn -> first clock line", col(&|x| x.first_clock), "s", 1);
            t.row("whole run", col(&|x| x.wall), "s", 1);
            if v.iter().all(|x| x.stats.is_some()) {
                for key in [
                    "positions",
                    "step_exits",
                    "step_episodes",
                    "injected",
                    "preempts",
                    "preempt_pages",
                ] {
                    let vals: Result<Vec<f64>> = v
                        .iter()
                        .map(|x| x.stats.as_ref().map_or(Ok(f64::NAN), |s| s.f(key)))
                        .collect();
                    t.row(key, vals?, "", 0);
                }
                // Preemption points (issue 15): how often, how big, what each costs the
                // guest (the primary's time to capture and log one).
                let per = |f: &dyn Fn(&Stats) -> Result<f64>| -> Result<Vec<f64>> {
                    v.iter()
                        .map(|x| x.stats.as_ref().map_or(Ok(f64::NAN), f))
                        .collect()
                };
                t.row(
                    "preemption points per second of run",
                    per(&|s| Ok(s.f("preempts")? / x_wall(s)?))?,
                    "/s",
                    1,
                );
                t.row(
                    "bytes logged per preemption point",
                    per(&|s| Ok(s.f("preempt_bytes")? / s.f("preempts")?.max(1.0)))?,
                    "B",
                    0,
                );
                t.row(
                    "pause per preemption point",
                    per(&|s| Ok(s.f("preempt_s")? * 1000.0 / s.f("preempts")?.max(1.0)))?,
                    "ms",
                    2,
                );
            }
        }
        print!("{}", t.render());
        Ok(())
    })
}
