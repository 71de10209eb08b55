//! Benchmark: boot the guest image to its shell under `twinvm run`, several times.
//!
//! Each run measures the wall time from spawning the VMM to the shell prompt (and to the
//! kernel's first line, `Run /init`, and the guest's init), the VMM's memory at the prompt
//! (its own overhead = total RSS minus the guest memory's RSS), then powers the guest off and
//! splits the whole run's wall time with the VMM's `--stats`: setup, time inside `KVM_RUN`,
//! idle (VMM asleep while the guest halts), and the rest (exit handling in the VMM, plus
//! process start and exit).
//!
//! It uses the `twinvm` built next to this executable (`target/release/bench-boot` runs
//! `target/release/twinvm`) and the guest image of `$TWINVM_GUEST_DIR` or
//! `guest-images/out`. Timings are printed, never asserted.

use std::time::Duration;

use twinvm_tests::bench::{self, Result, ScratchDir, Stats, Table, Timed};
use twinvm_tests::{rss_split, workspace_bin, BOOT_TIMEOUT, PROMPT};

const USAGE: &str = "\
Usage: bench-boot [--runs N] [--cpu N|none]

Boots the guest to its shell N times (default 3) under `twinvm run` and prints boot time,
the VMM's memory overhead and where the time went (median, min and max over the runs).
  --runs N       number of boots (default 3)
  --cpu N|none   pin the vCPU thread to host CPU N (default: not pinned)
";

/// Console lines noted on the way to the prompt, with their labels.
const MARKS: &[(&str, &str)] = &[
    ("Linux version", "spawn -> kernel's first line"),
    ("Run /init as init process", "spawn -> `Run /init`"),
    ("twinvm-guest: init", "spawn -> `twinvm-guest: init`"),
];

/// Everything measured in one run.
struct Run {
    marks: Vec<Option<f64>>,
    to_prompt: f64,
    wall: f64,
    rss_total_kib: u64,
    rss_guest_kib: u64,
    hwm_kib: u64,
    stats: Stats,
}

fn one_run(scratch: &ScratchDir, i: usize, cpu: Option<usize>) -> Result<Run> {
    let stats_path = scratch.join(&format!("boot-{i}.json"));
    let stats_arg = stats_path
        .to_str()
        .ok_or("non-UTF-8 temp path")?
        .to_string();
    let cpu_arg = cpu.map(|c| c.to_string());
    let mut args = vec!["run", "--stats", &stats_arg];
    if let Some(c) = &cpu_arg {
        args.extend(["--cpu", c]);
    }
    let mut t = Timed::spawn(&args);
    let needles: Vec<&str> = MARKS.iter().map(|m| m.0).collect();
    let (_, mut seen) = t.watch(&needles, PROMPT, BOOT_TIMEOUT)?;
    let to_prompt = seen.pop().flatten().ok_or("prompt time missing")?;
    // At the prompt the guest is idle: read the VMM's memory now.
    let (rss_total_kib, rss_guest_kib) =
        rss_split(t.vm.pid).map_err(|e| format!("reading /proc/{}/smaps: {e}", t.vm.pid))?;
    let (hwm_kib, _) = bench::vm_hwm_rss(t.vm.pid)?;
    t.vm.type_text("poweroff -f\n");
    let wall = t.wait_poweroff("poweroff -f at the shell", Duration::from_secs(300))?;
    let stats = Stats::read(&stats_path)?;
    Ok(Run {
        marks: seen,
        to_prompt,
        wall,
        rss_total_kib,
        rss_guest_kib,
        hwm_kib,
        stats,
    })
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-boot", || {
        let opts = bench::parse_options(3, None, &[], USAGE)?;
        let twinvm = workspace_bin("twinvm");
        println!("== bench-boot: guest boot to shell under `twinvm run` ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; vCPU {}; {} run(s)",
            twinvm.display(),
            twinvm_tests::guest_dir().display(),
            opts.cpu
                .map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}")),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-boot")?;
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            let r = one_run(&scratch, i, opts.cpu)?;
            println!(
                "run {}/{}: prompt after {:.2} s, whole run {:.2} s, {} positions, outcome {}",
                i + 1,
                opts.runs,
                r.to_prompt,
                r.wall,
                r.stats.f("positions")?,
                r.stats.s("outcome")?
            );
            runs.push(r);
        }
        print_table(&runs)
    })
}

fn print_table(runs: &[Run]) -> Result<()> {
    let col = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let stat = |key: &str| -> Result<Vec<f64>> { runs.iter().map(|r| r.stats.f(key)).collect() };
    let mib = |kib: u64| kib as f64 / 1024.0;

    let wall = col(&|r| r.wall);
    let setup = stat("setup_s")?;
    let in_guest = stat("in_guest_s")?;
    let idle = stat("idle_s")?;
    let handling: Vec<f64> = (0..runs.len())
        .map(|i| wall[i] - setup[i] - in_guest[i] - idle[i])
        .collect();
    let pct = |v: &[f64]| -> Vec<f64> { v.iter().zip(&wall).map(|(x, w)| 100.0 * x / w).collect() };
    let positions = stat("positions")?;

    let mut t = Table::new();
    t.heading("boot (wall time from spawning twinvm)");
    for (i, (_, label)) in MARKS.iter().enumerate() {
        let v: Vec<f64> = runs.iter().filter_map(|r| r.marks[i]).collect();
        if v.len() == runs.len() {
            t.row(label, v, "s", 2);
        } else {
            t.row(
                &format!("{label} (seen in {}/{} runs)", v.len(), runs.len()),
                v,
                "s",
                2,
            );
        }
    }
    t.row(
        "spawn -> shell prompt (boot-to-shell)",
        col(&|r| r.to_prompt),
        "s",
        2,
    );
    let init_to_prompt: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.marks[1].map(|m| r.to_prompt - m))
        .collect();
    t.row("`Run /init` -> shell prompt", init_to_prompt, "s", 2);

    t.heading("memory at the shell prompt");
    t.row(
        "VMM overhead (total RSS - guest RSS)",
        col(&|r| mib(r.rss_total_kib - r.rss_guest_kib)),
        "MiB",
        1,
    );
    t.row(
        "guest memory resident",
        col(&|r| mib(r.rss_guest_kib)),
        "MiB",
        1,
    );
    t.row("total RSS", col(&|r| mib(r.rss_total_kib)), "MiB", 1);
    t.row("VmHWM (peak RSS)", col(&|r| mib(r.hwm_kib)), "MiB", 1);

    t.heading("whole run (boot, shell, `poweroff -f`), split by --stats");
    t.row("wall, spawn -> exit", wall.clone(), "s", 2);
    t.row("VMM setup (setup_s)", setup.clone(), "s", 3);
    t.row(
        "in KVM_RUN: guest + host KVM (in_guest_s)",
        in_guest.clone(),
        "s",
        2,
    );
    t.row(
        "VMM exit handling + process start/exit (rest)",
        handling.clone(),
        "s",
        2,
    );
    t.row(
        "idle: VMM asleep, guest halted (idle_s)",
        idle.clone(),
        "s",
        2,
    );
    t.row("  setup share", pct(&setup), "% wall", 2);
    t.row("  in KVM_RUN share", pct(&in_guest), "% wall", 1);
    t.row("  exit handling share", pct(&handling), "% wall", 1);
    t.row("  idle share", pct(&idle), "% wall", 1);
    let per_exit =
        |v: &[f64]| -> Vec<f64> { v.iter().zip(&positions).map(|(x, p)| 1e6 * x / p).collect() };
    t.row(
        "  KVM_RUN time per synchronous exit",
        per_exit(&in_guest),
        "us",
        1,
    );
    t.row(
        "  VMM handling time per synchronous exit",
        per_exit(&handling),
        "us",
        1,
    );

    t.heading("exits and interrupts (whole run)");
    t.row("positions (synchronous exits)", positions.clone(), "", 0);
    for (key, label) in [
        ("pio_exits", "PIO exits"),
        ("mmio_exits", "MMIO exits"),
        ("hlt_exits", "HLT exits"),
        ("step_exits", "single-step exits"),
        ("step_episodes", "single-step episodes"),
        ("injected", "interrupts injected"),
        ("kicks", "kicks (signal exits, not positions)"),
    ] {
        t.row(label, stat(key)?, "", 0);
    }
    println!();
    print!("{}", t.render());
    Ok(())
}
