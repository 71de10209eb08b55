//! The short, seeded chaos run of the default test suite (issue #11): one run of the chaos
//! harness (`twinvm_tests::chaos`, `scripts/chaos` for more) with a fixed seed, which must
//! break no invariant. `TWINVM_CHAOS_SEED` and `TWINVM_CHAOS_RUNS` change the seed and the
//! number of runs.

use twinvm_tests::chaos::{run_once, Summary};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_seeded_chaos_run_breaks_no_invariant() {
    let seed = env_u64("TWINVM_CHAOS_SEED", 4);
    let runs = env_u64("TWINVM_CHAOS_RUNS", 1);
    let mut summary = Summary::default();
    for k in 0..runs {
        let s = seed.wrapping_add(k);
        eprintln!("chaos run {} of {runs}, seed {s}", k + 1);
        let r = run_once(s, &mut |m| eprintln!("  {m}"));
        eprintln!(
            "  -> {} answers, survivor {:?}, takeover {:?}, {} line(s) repeated",
            r.answers, r.survivor, r.takeover, r.repeated_lines
        );
        for n in &r.notes {
            eprintln!("  note: {n}");
        }
        summary.add(&r);
    }
    eprint!("{summary}");
    assert!(summary.violations.is_empty(), "{summary}");
}
