//! The short version of the determinism soak (`scripts/soak` runs all of it): one workload
//! of the soak that the project's own tests did not run before, recorded and replayed twice
//! (on the CPU twinvm picks, and pinned explicitly); every digest must match and the console
//! must be the recording's byte for byte.

use twinvm_tests::soak::{scratch, soak_one, workloads};

#[test]
fn the_mixed_workload_replays_exactly_on_the_chosen_cpu_and_pinned() {
    let w = workloads()
        .into_iter()
        .find(|w| w.name == "mixed")
        .expect("the mixed workload");
    let r = soak_one(&w, &scratch(), 2);
    assert!(r.record_error.is_none(), "{:?}", r.record_error);
    assert!(
        r.digests >= 10,
        "too few digests to check anything: {}",
        r.digests
    );
    for x in &r.replays {
        assert!(x.matched, "replay ({}) did not match: {}", x.how, x.why);
    }
    assert_eq!(r.replays.len(), 2);
}
