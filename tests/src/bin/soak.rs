//! `soak`: the determinism soak (see `twinvm_tests::soak`). Records every workload once and
//! replays it `--replays` times (auto CPU, pinned, host loaded); prints k/N per workload
//! and the total, and exits 1 unless every replay matched.
//!
//! Usage: soak [--replays N] [--only NAME[,NAME...]]

use std::process::ExitCode;

use twinvm_tests::soak::{scratch, soak_one, workloads};

fn main() -> ExitCode {
    let mut replays = 3usize;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--replays", Some(n)) => match n.parse() {
                Ok(n) if n >= 1 => replays = n,
                _ => return usage(&format!("--replays {n}: a whole number from 1")),
            },
            ("--only", Some(list)) => only = Some(list.split(',').map(str::to_string).collect()),
            _ => return usage(&format!("unknown argument {a}")),
        }
    }
    let all = workloads();
    let chosen: Vec<_> = match &only {
        Some(names) => {
            if let Some(bad) = names
                .iter()
                .find(|n| !all.iter().any(|w| w.name == n.as_str()))
            {
                return usage(&format!("no workload {bad}"));
            }
            all.into_iter()
                .filter(|w| names.iter().any(|n| n == w.name))
                .collect()
        }
        None => all,
    };
    let dir = scratch();
    println!(
        "soak: {} workloads, {replays} replays each, logs in {}",
        chosen.len(),
        dir.display()
    );
    let (mut ok, mut total) = (0usize, 0usize);
    let mut rows = Vec::new();
    for w in &chosen {
        let r = soak_one(w, &dir, replays);
        let k = r.replays.iter().filter(|x| x.matched).count();
        let n = replays;
        ok += k;
        total += n;
        let detail = match &r.record_error {
            Some(e) => format!("recording failed: {e}"),
            None => r
                .replays
                .iter()
                .filter(|x| !x.matched)
                .map(|x| format!("{}: {}", x.how, x.why))
                .collect::<Vec<_>>()
                .join("; "),
        };
        let row = format!(
            "{:<8} {k}/{n} replays matched every digest ({} digests, record {:.0} s) {detail}",
            r.name, r.digests, r.record_s
        );
        println!("{row}");
        rows.push(row);
    }
    println!("soak total: {ok}/{total} replays matched");
    if ok == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("soak: {msg}\nusage: soak [--replays N] [--only NAME[,NAME...]]");
    ExitCode::from(2)
}
