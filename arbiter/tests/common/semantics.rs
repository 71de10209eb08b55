//! The semantics table of `arbiter/README.md` as data: one sequence of claims, re-pairs and
//! clears on a fresh VM, each with the answer every backend must give. The tests run it
//! against the standalone `twinvm-arbiter` and against etcd, so both backends are held to
//! the same expectations.
#![allow(dead_code)]

use arbiter::etcd::BlockingEtcdClient;
use arbiter::{BlockingClient, ClaimResponse, Entry, ErrorCode, Outcome};

/// One request.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// test-and-set(claimant, generation)
    Claim(&'static str, u64),
    /// re-pair(claimant, generation)
    RePair(&'static str, u64),
    /// operator clear
    Clear,
}

/// The answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `won`, with this holder.
    Won(&'static str),
    /// `lost`, with this holder.
    Lost(&'static str),
    /// `stale`, with the current (or retired) generation and its holder.
    Stale(u64, Option<&'static str>),
    /// Refused with this error code.
    Refused(ErrorCode),
    /// re-pair answered this new generation.
    RePaired(u64),
    /// clear removed an entry of this generation (`None`: nothing to clear).
    Cleared(Option<u64>),
}

/// A row of the table.
pub struct Step {
    /// The request.
    pub op: Op,
    /// The answer.
    pub expect: Expect,
    /// The rule it checks.
    pub rule: &'static str,
}

const fn step(op: Op, expect: Expect, rule: &'static str) -> Step {
    Step { op, expect, rule }
}

use Expect::*;
use Op::*;

/// The table, run in order on one fresh VM.
pub const TABLE: &[Step] = &[
    step(
        Claim("a", 5),
        Won("a"),
        "unknown VM: created at the asked generation",
    ),
    step(
        Claim("a", 5),
        Won("a"),
        "the holder asking again wins again",
    ),
    step(
        Claim("b", 5),
        Lost("a"),
        "current generation held by another: lost",
    ),
    step(
        Claim("b", 4),
        Stale(5, Some("a")),
        "older generation: stale",
    ),
    step(
        Claim("b", 6),
        Refused(ErrorCode::FutureGeneration),
        "newer generation: refused",
    ),
    step(
        RePair("b", 5),
        Refused(ErrorCode::NotHolder),
        "re-pair by a non-holder",
    ),
    step(
        RePair("a", 4),
        Refused(ErrorCode::StaleGeneration),
        "re-pair from an old generation",
    ),
    step(
        RePair("a", 6),
        Refused(ErrorCode::FutureGeneration),
        "re-pair from a future generation",
    ),
    step(
        RePair("a", 5),
        RePaired(6),
        "the holder opens the next generation",
    ),
    step(
        RePair("a", 5),
        RePaired(6),
        "re-pair asked again: same answer",
    ),
    step(
        Claim("a", 5),
        Stale(6, None),
        "the re-paired generation is stale",
    ),
    step(
        RePair("a", 6),
        Refused(ErrorCode::NotHolder),
        "an unclaimed generation has no holder",
    ),
    step(
        Claim("c", 6),
        Won("c"),
        "the new generation is won by its first claimant",
    ),
    step(Claim("a", 6), Lost("c"), "and lost by the next"),
    step(
        RePair("a", 5),
        RePaired(6),
        "the opener asking again still gets its answer",
    ),
    step(
        RePair("b", 5),
        Refused(ErrorCode::StaleGeneration),
        "anyone else: stale",
    ),
    step(Clear, Cleared(Some(6)), "clear removes the entry"),
    step(Clear, Cleared(None), "clear of a cleared VM: nothing"),
    step(
        Claim("a", 6),
        Stale(6, None),
        "cleared: the retired generation is stale",
    ),
    step(
        Claim("a", 1),
        Stale(6, None),
        "cleared: older generations are stale",
    ),
    step(
        RePair("c", 6),
        Refused(ErrorCode::UnknownVm),
        "cleared: re-pair of an unknown VM",
    ),
    step(
        Claim("d", 7),
        Won("d"),
        "cleared: a generation above the retired one recreates it",
    ),
    step(Claim("c", 7), Lost("d"), "recreated: lost by the next"),
];

/// The entry the VM must have after the table.
pub fn final_entry(vm: &str) -> Entry {
    Entry {
        vm: vm.to_owned(),
        generation: 7,
        holder: Some("d".to_owned()),
        opened_by: None,
    }
}

/// What a backend answered, in the table's terms.
pub trait Backend {
    /// test-and-set; `Err(Some(code))` for a refusal, `Err(None)` for any other error.
    fn claim(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, Option<ErrorCode>>;
    /// re-pair: the new generation.
    fn re_pair(&self, vm: &str, claimant: &str, generation: u64) -> Result<u64, Option<ErrorCode>>;
    /// clear: the removed entry.
    fn clear(&self, vm: &str) -> Option<Entry>;
    /// get.
    fn get(&self, vm: &str) -> Option<Entry>;
}

impl Backend for BlockingClient {
    fn claim(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, Option<ErrorCode>> {
        self.test_and_set(vm, claimant, generation)
            .map_err(|e| e.code())
    }
    fn re_pair(&self, vm: &str, claimant: &str, generation: u64) -> Result<u64, Option<ErrorCode>> {
        BlockingClient::re_pair(self, vm, claimant, generation)
            .map(|r| r.generation)
            .map_err(|e| e.code())
    }
    fn clear(&self, vm: &str) -> Option<Entry> {
        BlockingClient::clear(self, vm).expect("clear")
    }
    fn get(&self, vm: &str) -> Option<Entry> {
        BlockingClient::get(self, vm).expect("get")
    }
}

impl Backend for BlockingEtcdClient {
    fn claim(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, Option<ErrorCode>> {
        self.test_and_set(vm, claimant, generation)
            .map_err(|e| e.code())
    }
    fn re_pair(&self, vm: &str, claimant: &str, generation: u64) -> Result<u64, Option<ErrorCode>> {
        BlockingEtcdClient::re_pair(self, vm, claimant, generation)
            .map(|r| r.generation)
            .map_err(|e| e.code())
    }
    fn clear(&self, vm: &str) -> Option<Entry> {
        BlockingEtcdClient::clear(self, vm).expect("clear")
    }
    fn get(&self, vm: &str) -> Option<Entry> {
        BlockingEtcdClient::get(self, vm).expect("get")
    }
}

/// Runs the table on `vm` (which must be new to `backend`), panicking at the first answer
/// that differs, naming the backend, the row and its rule.
pub fn run_table(name: &str, backend: &dyn Backend, vm: &str) {
    for (row, s) in TABLE.iter().enumerate() {
        let got = match s.op {
            Claim(claimant, generation) => match backend.claim(vm, claimant, generation) {
                Ok(r) => {
                    assert_eq!(r.vm, vm, "{name} row {row}");
                    let holder = r.holder.as_deref();
                    match r.outcome {
                        Outcome::Won => {
                            assert_eq!(r.generation, generation, "{name} row {row}");
                            Won(leak(holder.expect("won has a holder")))
                        }
                        Outcome::Lost => {
                            assert_eq!(r.generation, generation, "{name} row {row}");
                            Lost(leak(holder.expect("lost has a holder")))
                        }
                        Outcome::Stale => Stale(r.generation, holder.map(leak)),
                    }
                }
                Err(Some(code)) => Refused(code),
                Err(None) => panic!("{name} row {row} ({}): failed", s.rule),
            },
            RePair(claimant, generation) => match backend.re_pair(vm, claimant, generation) {
                Ok(g) => RePaired(g),
                Err(Some(code)) => Refused(code),
                Err(None) => panic!("{name} row {row} ({}): failed", s.rule),
            },
            Clear => Cleared(backend.clear(vm).map(|e| e.generation)),
        };
        assert_eq!(got, s.expect, "{name}, row {row} {:?}: {}", s.op, s.rule);
    }
    assert_eq!(
        backend.get(vm),
        Some(final_entry(vm)),
        "{name}: final entry"
    );
}

fn leak(s: &str) -> &'static str {
    // The table's names are static; map answers back onto them.
    ["a", "b", "c", "d"]
        .into_iter()
        .find(|n| *n == s)
        .unwrap_or_else(|| panic!("unexpected holder {s:?}"))
}
