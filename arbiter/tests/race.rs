//! Race tests: many claimants (threads, and threads in separate processes) hit the same VM
//! and generation at once, round after round; exactly one wins each round and every
//! claimant agrees on who.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;

use arbiter::client::BlockingClient;
use arbiter::{ErrorCode, Outcome, Token};
use common::Arbiter;

const ROUNDS: usize = 40;
const GENERATION: u64 = 7;
const PROCESSES: usize = 3;
const THREADS_PER_PROCESS: usize = 4;
const PARENT_THREADS: usize = 8;
const CHILD_ENV: &str = "TWINVM_ARBITER_RACE_CHILD";

fn race_vm(round: usize) -> String {
    format!("race-{round}")
}

/// Runs `threads` claimants named `{prefix}-{i}`; each claims every round's VM, the threads
/// of this process meeting at a barrier before each round. Returns
/// `(round, claimant, outcome, holder)` for every claim.
fn run_claimants(
    addr: &str,
    prefix: &str,
    threads: usize,
) -> Vec<(usize, String, Outcome, Option<String>)> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let barrier = barrier.clone();
            let addr = addr.to_owned();
            let me = format!("{prefix}-{i}");
            thread::spawn(move || {
                let client =
                    BlockingClient::new(addr, Some(Token::new(common::TOKEN).unwrap())).unwrap();
                let mut seen = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait();
                    let answer = client
                        .test_and_set(&race_vm(round), &me, GENERATION)
                        .expect("claim answered");
                    assert_eq!(answer.generation, GENERATION);
                    seen.push((round, me.clone(), answer.outcome, answer.holder));
                }
                seen
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("claimant thread"))
        .collect()
}

/// Entry point of the child processes: does nothing unless started by the race test.
#[test]
fn race_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (addr, prefix) = spec.split_once(' ').unwrap();
    // Wait for the parent's "go" so every process starts at once.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let results = run_claimants(addr, prefix, THREADS_PER_PROCESS);
    let mut out = std::io::stdout().lock();
    for (round, claimant, outcome, holder) in results {
        let holder = holder.unwrap_or_else(|| "-".into());
        writeln!(out, "CLAIM {round} {claimant} {outcome:?} {holder}").unwrap();
    }
}

/// Kills the child processes when the test ends, even on failure.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn threads_and_processes_agree_on_one_winner_per_round() {
    let tmp = tempfile::tempdir().unwrap();
    let arbiter = Arbiter::start(&tmp.path().join("data"));

    let mut children = Children(Vec::new());
    for p in 0..PROCESSES {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "race_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{} proc{p}", arbiter.addr))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child claimant process");
        children.0.push(child);
    }
    // Start everyone together: children get "go", parent threads start right away.
    for child in &mut children.0 {
        writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let mut claims = run_claimants(&arbiter.addr, "parent", PARENT_THREADS);
    for child in &mut children.0 {
        let stdout = child.stdout.take().unwrap();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // libtest may print "test race_child_process ... " on the same line first.
            let Some(at) = line.find("CLAIM ") else {
                continue;
            };
            let rest = &line[at + "CLAIM ".len()..];
            let parts: Vec<&str> = rest.split(' ').collect();
            let outcome = match parts[2] {
                "Won" => Outcome::Won,
                "Lost" => Outcome::Lost,
                other => panic!("child saw outcome {other}"),
            };
            let holder = (parts[3] != "-").then(|| parts[3].to_owned());
            claims.push((
                parts[0].parse().unwrap(),
                parts[1].to_owned(),
                outcome,
                holder,
            ));
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "child claimant process failed: {status}");
    }

    let claimants = PROCESSES * THREADS_PER_PROCESS + PARENT_THREADS;
    assert_eq!(
        claims.len(),
        ROUNDS * claimants,
        "every claimant reported every round"
    );
    let mut by_round: BTreeMap<usize, Vec<_>> = BTreeMap::new();
    for (round, claimant, outcome, holder) in claims {
        by_round
            .entry(round)
            .or_default()
            .push((claimant, outcome, holder));
    }
    let client = arbiter.client();
    let mut winners_by_process = BTreeMap::new();
    for (round, claims) in by_round {
        let winners: Vec<&String> = claims
            .iter()
            .filter(|(_, o, _)| *o == Outcome::Won)
            .map(|(c, _, _)| c)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let winner = winners[0].clone();
        for (claimant, outcome, holder) in &claims {
            assert_eq!(
                holder.as_deref(),
                Some(winner.as_str()),
                "round {round}: {claimant} ({outcome:?}) was told the holder is {holder:?}"
            );
        }
        let entry = client.get(&race_vm(round)).unwrap().expect("VM exists");
        assert_eq!(entry.holder.as_deref(), Some(winner.as_str()));
        assert_eq!(entry.generation, GENERATION);
        *winners_by_process
            .entry(winner.split('-').next().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    eprintln!("winners by process: {winners_by_process:?}");
}

#[test]
fn generations_advance_only_through_the_winner() {
    const THREADS: usize = 8;
    const GENERATIONS: u64 = 25;
    let tmp = tempfile::tempdir().unwrap();
    let arbiter = Arbiter::start(&tmp.path().join("data"));
    let vm = "pair-vm";
    let first = 100;

    let barrier = Arc::new(Barrier::new(THREADS));
    let (tx, rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let barrier = barrier.clone();
            let addr = arbiter.addr.clone();
            let tx = tx.clone();
            thread::spawn(move || {
                let client =
                    BlockingClient::new(addr, Some(Token::new(common::TOKEN).unwrap())).unwrap();
                let me = format!("host-{i}");
                for generation in first..first + GENERATIONS {
                    barrier.wait();
                    let answer = client.test_and_set(vm, &me, generation).unwrap();
                    tx.send((generation, me.clone(), answer.clone())).unwrap();
                    // Everyone has answered before the winner re-pairs.
                    barrier.wait();
                    if answer.outcome == Outcome::Won {
                        // A stale claim and a future claim change nothing.
                        let stale = client
                            .test_and_set(vm, "latecomer", generation - 1)
                            .unwrap();
                        assert_eq!(stale.outcome, Outcome::Stale);
                        assert_eq!(stale.holder.as_deref(), Some(me.as_str()));
                        let future = client.test_and_set(vm, "inventor", generation + 1);
                        assert_eq!(
                            future.unwrap_err().code(),
                            Some(ErrorCode::FutureGeneration)
                        );
                        let opened = client.re_pair(vm, &me, generation).unwrap();
                        assert_eq!(opened.generation, generation + 1);
                        // Retrying the re-pair is answered the same.
                        let again = client.re_pair(vm, &me, generation).unwrap();
                        assert_eq!(again.generation, generation + 1);
                        // The old generation can never be won again.
                        let old = client.test_and_set(vm, &me, generation).unwrap();
                        assert_eq!(old.outcome, Outcome::Stale);
                        assert_eq!(old.generation, generation + 1);
                    }
                    barrier.wait();
                    if answer.outcome != Outcome::Won {
                        // A loser cannot re-pair, neither the old nor the new generation.
                        let err = client.re_pair(vm, &me, generation).unwrap_err();
                        assert_eq!(err.code(), Some(ErrorCode::StaleGeneration));
                        let err = client.re_pair(vm, &me, generation + 1).unwrap_err();
                        assert_eq!(err.code(), Some(ErrorCode::NotHolder));
                    }
                    barrier.wait();
                }
            })
        })
        .collect();
    drop(tx);
    for h in handles {
        h.join().expect("claimant thread");
    }
    let mut rounds: BTreeMap<u64, Vec<(String, arbiter::ClaimResponse)>> = BTreeMap::new();
    for (generation, me, answer) in rx {
        rounds.entry(generation).or_default().push((me, answer));
    }
    assert_eq!(rounds.len() as u64, GENERATIONS);
    for (generation, answers) in &rounds {
        assert_eq!(answers.len(), THREADS);
        let winners: Vec<_> = answers
            .iter()
            .filter(|(_, a)| a.outcome == Outcome::Won)
            .collect();
        assert_eq!(winners.len(), 1, "generation {generation}: {answers:?}");
        let winner = &winners[0].0;
        for (me, answer) in answers {
            assert_eq!(answer.generation, *generation);
            assert_eq!(answer.holder.as_ref(), Some(winner), "{me} disagrees");
        }
    }
    let entry = arbiter.client().get(vm).unwrap().unwrap();
    assert_eq!(entry.generation, first + GENERATIONS);
    assert_eq!(entry.holder, None);
    let last_winner = rounds[&(first + GENERATIONS - 1)]
        .iter()
        .find(|(_, a)| a.outcome == Outcome::Won)
        .map(|(me, _)| me.clone());
    assert_eq!(entry.opened_by, last_winner);
}
