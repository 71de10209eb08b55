//! Benchmark: machine snapshots of a guest at its shell prompt.
//!
//! Boots the guest once under `twinvm run --snapshot-on-sigusr1`, and at the prompt takes
//! N snapshots (SIGUSR1, one after the other): their size and the time each took (from the
//! delivery point to the file synced). Then restores the last one N times under `twinvm run
//! --restore`, typing a command at once: the time to read and check the file, to put it into
//! a new VM, and from spawning the VMM to the shell's answer, against the cold boot's time to
//! the prompt.
//!
//! It uses the `twinvm` built next to this executable (`target/release/bench-snapshot` runs
//! `target/release/twinvm`) and the guest image of `$TWINVM_GUEST_DIR` or
//! `guest-images/out`. Timings are printed, never asserted.

use std::time::Duration;

use twinvm_tests::bench::{self, Result, ScratchDir, Stats, Table, Timed};
use twinvm_tests::{workspace_bin, BOOT_TIMEOUT, PROMPT};

const USAGE: &str = "\
Usage: bench-snapshot [--runs N] [--cpu N|none]

Boots the guest to its shell once, takes N snapshots there (default 3), restores the last one
N times and prints snapshot size, time to take, time to restore (median, min and max).
  --runs N       snapshots taken and restores (default 3)
  --cpu N|none   pin the vCPU thread to host CPU N (default: not pinned)
";

/// What one snapshot's stderr line says.
struct Taken {
    bytes: f64,
    pages: f64,
    ms: f64,
}

/// One restore.
struct Restored {
    read_s: f64,
    restore_s: f64,
    to_answer: f64,
    wall: f64,
}

fn parse_taken(line: &str) -> Result<Taken> {
    let bytes = bench::number_before(line, " bytes (").ok_or("no size in the snapshot line")?;
    let pages = bench::number_after(line, "bytes (").ok_or("no page count")?;
    let ms = line
        .rsplit(" in ")
        .next()
        .and_then(|r| r.split(" ms").next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or("no time in the snapshot line")?;
    Ok(Taken {
        bytes: bytes as f64,
        pages: pages as f64,
        ms,
    })
}

fn main() -> std::process::ExitCode {
    bench::main_with("bench-snapshot", || {
        let opts = bench::parse_options(3, None, &[], USAGE)?;
        let twinvm = workspace_bin("twinvm");
        println!("== bench-snapshot: snapshots of a guest at its shell prompt ==");
        println!("{}", bench::host_line());
        println!(
            "twinvm: {}; guest image: {}; vCPU {}; {} snapshot(s) and restore(s)",
            twinvm.display(),
            twinvm_tests::guest_dir().display(),
            opts.cpu
                .map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}")),
            opts.runs
        );
        let scratch = ScratchDir::new("bench-snapshot")?;
        let snap = scratch.join("prompt.snap");
        let snap_arg = snap.to_str().ok_or("non-UTF-8 temp path")?.to_string();
        let cpu_arg = opts.cpu.map(|c| c.to_string());
        let mut args = vec!["run", "--snapshot-on-sigusr1", &snap_arg];
        if let Some(c) = &cpu_arg {
            args.extend(["--cpu", c]);
        }

        // Cold boot, then N snapshots at the prompt.
        let mut t = Timed::spawn(&args);
        let (_, seen) = t.watch(&[], PROMPT, BOOT_TIMEOUT)?;
        let boot = seen.last().copied().flatten().ok_or("no prompt time")?;
        println!("cold boot: prompt after {boot:.2} s");
        let mut taken = Vec::new();
        for i in 0..opts.runs {
            t.vm.signal(libc::SIGUSR1);
            let needle = "twinvm: snapshot at position ";
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            let line = loop {
                let err = t.vm.stderr();
                if let Some(l) = err.lines().filter(|l| l.starts_with(needle)).nth(i) {
                    break l.to_string();
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("snapshot {i} not taken: {err}").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let s = parse_taken(&line)?;
            println!(
                "snapshot {}/{}: {:.1} MiB ({} pages stored) in {:.1} ms",
                i + 1,
                opts.runs,
                s.bytes / (1 << 20) as f64,
                s.pages,
                s.ms
            );
            taken.push(s);
        }
        t.vm.type_text("poweroff -f\n");
        t.wait_poweroff("poweroff -f at the shell", Duration::from_secs(300))?;

        // N restores, each typing a command at once and powering off.
        let mut restored = Vec::new();
        for i in 0..opts.runs {
            let stats = scratch.join(&format!("restore-{i}.json"));
            let stats_arg = stats.to_str().ok_or("non-UTF-8 temp path")?.to_string();
            let mut args = vec!["run", "--restore", &snap_arg, "--stats", &stats_arg];
            if let Some(c) = &cpu_arg {
                args.extend(["--cpu", c]);
            }
            let mut r = Timed::spawn(&args);
            r.vm.type_text("echo restored$((6*7)); poweroff -f\n");
            let (_, seen) = r.watch(&[], "restored42", Duration::from_secs(300))?;
            let to_answer = seen.last().copied().flatten().ok_or("no answer time")?;
            let wall = r.wait_poweroff("a restored guest's poweroff", Duration::from_secs(300))?;
            let s = Stats::read(&stats)?;
            let x = Restored {
                read_s: s.f("snapshot_read_s")?,
                restore_s: s.f("restore_s")?,
                to_answer,
                wall,
            };
            println!(
                "restore {}/{}: file read and checked in {:.1} ms, into the VM in {:.1} ms, shell answered {:.2} s after spawn, whole run {:.2} s",
                i + 1,
                opts.runs,
                x.read_s * 1e3,
                x.restore_s * 1e3,
                x.to_answer,
                x.wall
            );
            restored.push(x);
        }

        let mut table = Table::new();
        table.heading("snapshot of a guest at its prompt");
        let mib = |b: f64| b / (1 << 20) as f64;
        table.row(
            "snapshot file size",
            taken.iter().map(|s| mib(s.bytes)).collect(),
            "MiB",
            1,
        );
        table.row(
            "guest pages stored (not all zero)",
            taken.iter().map(|s| s.pages).collect(),
            "",
            0,
        );
        table.row(
            "time to take (delivery point -> file synced)",
            taken.iter().map(|s| s.ms).collect(),
            "ms",
            1,
        );
        table.heading("restore");
        table.row(
            "read and check the file (SHA-256)",
            restored.iter().map(|r| r.read_s * 1e3).collect(),
            "ms",
            1,
        );
        table.row(
            "into a new VM (memory, vCPU, devices)",
            restored.iter().map(|r| r.restore_s * 1e3).collect(),
            "ms",
            1,
        );
        table.row(
            "spawn -> the shell's answer to a typed command",
            restored.iter().map(|r| r.to_answer).collect(),
            "s",
            2,
        );
        table.row("cold boot: spawn -> shell prompt", vec![boot], "s", 2);
        println!("{}", table.render());
        Ok(())
    })
}
