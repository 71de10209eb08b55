//! `chaos`: runs the chaos harness (see `twinvm_tests::chaos`) for a number of runs from a
//! printed seed, then prints runs, faults injected by kind and invariant violations. Exit
//! status 0 when no invariant was broken. Needs root (namespaces, TAPs) and /dev/kvm; run it
//! through `scripts/chaos`, which builds everything first.

use anyhow::{bail, Result};
use clap::Parser;
use twinvm_tests::chaos::{run_once, Summary};

/// Chaos runs of a twinvm pair with its arbiter and a client.
#[derive(Debug, Parser)]
struct Args {
    /// The first run's seed [default: from the clock]; run k uses seed + k.
    #[arg(long)]
    seed: Option<u64>,
    /// How many runs (each boots a pair: a few minutes on a slow host).
    #[arg(long, default_value_t = 3)]
    runs: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    println!(
        "chaos: seed {seed}, {} run(s) (repeat with --seed {seed} --runs {})",
        args.runs, args.runs
    );
    let mut summary = Summary::default();
    for k in 0..args.runs {
        let s = seed.wrapping_add(k);
        println!("run {}/{} (seed {s})", k + 1, args.runs);
        let r = run_once(s, &mut |m| println!("  {m}"));
        println!(
            "  -> {} answers, survivor {:?}, takeover {:?}, {} line(s) repeated, {} violation(s)",
            r.answers,
            r.survivor,
            r.takeover,
            r.repeated_lines,
            r.violations.len()
        );
        for n in &r.notes {
            println!("  note: {n}");
        }
        for v in &r.violations {
            println!("  VIOLATION: {v}");
        }
        summary.add(&r);
    }
    print!("{summary}");
    if !summary.violations.is_empty() {
        bail!("{} invariant violation(s)", summary.violations.len());
    }
    Ok(())
}
