//! Crash tests: SIGKILL the real arbiter during a burst of claims, restart it on the same
//! data directory, and check that nothing answered was lost and no generation was granted
//! twice; and that a torn record at the end of the log is dropped without harm.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::client::ClientConfig;
use arbiter::{Outcome, Token};
use common::Arbiter;

const WORKERS: usize = 6;
const CYCLES: usize = 3;
/// Answered operations to wait for before the kill, per cycle.
const ACKS_BEFORE_KILL: usize = 150;
/// Bound on each worker's operations per cycle.
const MAX_VMS_PER_WORKER: usize = 2000;

/// What the workers know about one VM: the state after the last answered operation, and
/// the state the operation in flight at the kill would have produced, if any.
#[derive(Debug, Clone)]
struct Known {
    acked: Option<(u64, Option<String>)>,
    in_flight: Option<(u64, Option<String>)>,
    /// Generations answered `won`, with their winner.
    won: Vec<(u64, String)>,
}

fn fail_fast() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        attempts: 1,
        ..ClientConfig::default()
    }
}

/// One worker: for fresh VMs, `first` wins generation 1, re-pairs to 2, `second` wins 2.
/// Stops at the first failed call (the arbiter was killed) or when told to.
fn worker(
    addr: String,
    cycle: usize,
    w: usize,
    acks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    known: Arc<Mutex<BTreeMap<String, Known>>>,
) {
    let client = arbiter::BlockingClient::with_config(
        addr,
        Some(Token::new(common::TOKEN).unwrap()),
        fail_fast(),
    )
    .unwrap();
    let first = format!("first-{w}");
    let second = format!("second-{w}");
    let record = |vm: &str, f: &dyn Fn(&mut Known)| {
        let mut known = known.lock().unwrap();
        let k = known.entry(vm.to_owned()).or_insert(Known {
            acked: None,
            in_flight: None,
            won: Vec::new(),
        });
        f(k);
    };
    for i in 0..MAX_VMS_PER_WORKER {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let vm = format!("c{cycle}-w{w}-{i}");
        // Step 1: first claim creates the VM at generation 1.
        record(&vm, &|k| k.in_flight = Some((1, Some(first.clone()))));
        match client.test_and_set(&vm, &first, 1) {
            Ok(a) => {
                assert_eq!(a.outcome, Outcome::Won, "{vm}: {a:?}");
                record(&vm, &|k| {
                    k.acked = Some((1, Some(first.clone())));
                    k.in_flight = None;
                    k.won.push((1, first.clone()));
                });
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => return,
        }
        // Step 2: the winner re-pairs.
        record(&vm, &|k| k.in_flight = Some((2, None)));
        match client.re_pair(&vm, &first, 1) {
            Ok(a) => {
                assert_eq!(a.generation, 2);
                record(&vm, &|k| {
                    k.acked = Some((2, None));
                    k.in_flight = None;
                });
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => return,
        }
        // Step 3: the new pair's claim.
        record(&vm, &|k| k.in_flight = Some((2, Some(second.clone()))));
        match client.test_and_set(&vm, &second, 2) {
            Ok(a) => {
                assert_eq!(a.outcome, Outcome::Won, "{vm}: {a:?}");
                record(&vm, &|k| {
                    k.acked = Some((2, Some(second.clone())));
                    k.in_flight = None;
                    k.won.push((2, second.clone()));
                });
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => return,
        }
    }
}

fn verify(arbiter: &Arbiter, known: &BTreeMap<String, Known>) -> (usize, usize) {
    let client = arbiter.client();
    let (mut answered, mut in_flight) = (0, 0);
    for (vm, k) in known {
        let entry = client.get(vm).unwrap();
        let state = entry.as_ref().map(|e| (e.generation, e.holder.clone()));
        match (&k.acked, &k.in_flight) {
            (Some(acked), None) => {
                assert_eq!(state.as_ref(), Some(acked), "{vm}: answered state lost");
            }
            (acked, Some(flying)) => {
                in_flight += 1;
                assert!(
                    state.as_ref() == acked.as_ref() || state.as_ref() == Some(flying),
                    "{vm}: state {state:?} is neither the answered {acked:?} nor the \
                     in-flight {flying:?}"
                );
            }
            (None, None) => unreachable!(),
        }
        // No generation that was answered `won` can be won by anyone else.
        for (generation, winner) in &k.won {
            answered += 1;
            let intruder = client.test_and_set(vm, "intruder", *generation).unwrap();
            match intruder.outcome {
                Outcome::Lost => assert_eq!(intruder.holder.as_ref(), Some(winner)),
                Outcome::Stale => assert!(intruder.generation > *generation),
                Outcome::Won => panic!("{vm}: generation {generation} granted twice"),
            }
        }
    }
    (answered, in_flight)
}

#[test]
fn sigkill_during_a_burst_loses_nothing_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let known = Arc::new(Mutex::new(BTreeMap::new()));
    for cycle in 0..CYCLES {
        let mut arbiter = Arbiter::start(&data);
        // Everything from earlier cycles survived the earlier kills.
        verify(&arbiter, &known.lock().unwrap());

        let acks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (addr, acks, stop, known) = (
                    arbiter.addr.clone(),
                    acks.clone(),
                    stop.clone(),
                    known.clone(),
                );
                thread::spawn(move || worker(addr, cycle, w, acks, stop, known))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::Relaxed) < ACKS_BEFORE_KILL && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        let acked_at_kill = acks.load(Ordering::Relaxed);
        arbiter.kill(); // SIGKILL in the middle of the burst
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("worker");
        }
        assert!(acked_at_kill >= ACKS_BEFORE_KILL, "burst too slow");

        let arbiter = Arbiter::start(&data);
        let (answered, in_flight) = verify(&arbiter, &known.lock().unwrap());
        eprintln!(
            "cycle {cycle}: {} answered ops, {answered} wins re-checked, {in_flight} in flight at the kill",
            acks.load(Ordering::Relaxed)
        );
        assert!(answered > 0);
    }
}

/// Appends bytes to the log as a crash in the middle of a write could leave them.
fn append_to_log(data: &std::path::Path, bytes: &[u8]) {
    let mut log = OpenOptions::new()
        .append(true)
        .open(data.join(arbiter::store::LOG_FILE))
        .unwrap();
    log.write_all(bytes).unwrap();
    log.sync_all().unwrap();
}

/// A record in the log's current format; `good_crc: false` damages its payload checksum.
fn record_bytes(payload: &str, good_crc: bool) -> Vec<u8> {
    let mut out = Vec::new();
    arbiter::store::encode_frame(payload.as_bytes(), &mut out);
    if !good_crc {
        out[12] ^= 1; // the payload checksum
    }
    out
}

#[test]
fn torn_last_record_is_dropped_and_the_log_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ghost =
        r#"{"op":"put","entry":{"vm":"t-ghost","generation":1,"holder":"ghost","opened_by":null}}"#;
    let damages: [(&str, Vec<u8>); 5] = [
        ("half a record", record_bytes(ghost, true)[..40].to_vec()),
        ("a record failing its checksum", record_bytes(ghost, false)),
        ("half a header", record_bytes(ghost, true)[..5].to_vec()),
        ("zero fill", vec![0; 4096]),
        ("half a record, then zeros", {
            let mut b = record_bytes(ghost, true)[..30].to_vec();
            b.resize(4096, 0);
            b
        }),
    ];
    for (round, (what, damage)) in damages.iter().enumerate() {
        let mut arbiter = Arbiter::start(&data);
        let client = arbiter.client();
        let vm = format!("t-{round}");
        assert_eq!(
            client.test_and_set(&vm, "owner", 1).unwrap().outcome,
            Outcome::Won
        );
        arbiter.kill();

        append_to_log(&data, damage);
        let arbiter = Arbiter::start(&data);
        let client = arbiter.client();
        for r in 0..=round {
            let entry = client
                .get(&format!("t-{r}"))
                .unwrap()
                .expect("answered claim kept");
            assert_eq!(entry.holder.as_deref(), Some("owner"), "after {what}");
        }
        assert_eq!(client.get("t-ghost").unwrap(), None, "{what} was replayed");
        let torn: Vec<_> = fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(
            torn.len(),
            round + 1,
            "dropped bytes are kept for inspection"
        );
        // The arbiter goes on deciding, and what it decides after the repair is readable.
        // (Each round clears t-ghost, retiring its generation, so use a new one.)
        let generation = round as u64 + 1;
        if round > 0 {
            let stale = client
                .test_and_set("t-ghost", "real", round as u64)
                .unwrap();
            assert_eq!(
                stale.outcome,
                Outcome::Stale,
                "a cleared generation stays retired"
            );
        }
        assert_eq!(
            client
                .test_and_set("t-ghost", "real", generation)
                .unwrap()
                .outcome,
            Outcome::Won
        );
        drop(arbiter);
        let arbiter = Arbiter::start(&data);
        let entry = arbiter.client().get("t-ghost").unwrap().unwrap();
        assert_eq!(entry.holder.as_deref(), Some("real"));
        assert_eq!(entry.generation, generation);
        arbiter.client().clear("t-ghost").unwrap().unwrap();
        let list = arbiter.client().list().unwrap();
        assert_eq!(list.vms.len(), round + 1);
    }
}

#[test]
fn damage_before_a_valid_record_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut arbiter = Arbiter::start(&data);
    arbiter.client().test_and_set("kept", "owner", 1).unwrap();
    arbiter.kill();
    let bad = r#"{"op":"put","entry":{"vm":"bad","generation":1,"holder":"x","opened_by":null}}"#;
    let good = r#"{"op":"put","entry":{"vm":"good","generation":1,"holder":"y","opened_by":null}}"#;
    let mut bytes = record_bytes(bad, false);
    bytes.extend(record_bytes(good, true));
    append_to_log(&data, &bytes);
    let token = common::write_token(tmp.path());
    let err = Arbiter::start_with(&data, &["--token-file", token.to_str().unwrap()])
        .err()
        .expect("a damaged log must not be silently truncated");
    assert!(err.contains("damaged"), "{err}");
}

/// A log of format 1 (the format before per-record magic) with `payloads`, and where each
/// record starts.
fn format_1_log(payloads: &[String]) -> (Vec<u8>, Vec<usize>) {
    let mut log = b"TWINARB1".to_vec();
    let mut starts = Vec::new();
    for p in payloads {
        starts.push(log.len());
        log.extend_from_slice(&(p.len() as u32).to_le_bytes());
        log.extend_from_slice(&crc32fast::hash(p.as_bytes()).to_le_bytes());
        log.extend_from_slice(p.as_bytes());
    }
    (log, starts)
}

fn grants(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"op":"put","entry":{{"vm":"vm-{i}","generation":1,"holder":"owner-{i}","opened_by":null}}}}"#
            )
        })
        .collect()
}

/// A damaged length field in the middle of a log must not turn the acknowledged grants
/// after it into a "torn tail" that is compacted away: the arbiter refuses to start and
/// names the offset. (Format 1 logs, which earlier arbiters wrote and this one reads.)
#[test]
fn a_damaged_length_in_the_middle_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir(&data).unwrap();
    let (mut log, starts) = format_1_log(&grants(4));
    log[starts[1] + 2] = 0x7f; // length now far past the end of the file
    fs::write(data.join(arbiter::store::LOG_FILE), &log).unwrap();
    let token = common::write_token(tmp.path());
    let err = Arbiter::start_with(&data, &["--token-file", token.to_str().unwrap()])
        .err()
        .expect("grants after a damaged length must not be dropped");
    assert!(
        err.contains("damaged") && err.contains(&format!("at byte {} ", starts[1])),
        "{err}"
    );
    // The log is left as it was, for the operator.
    assert_eq!(fs::read(data.join(arbiter::store::LOG_FILE)).unwrap(), log);
}

/// Zeros after the last record (a crash after the file grew, before its data landed)
/// are not a record: the arbiter starts with every grant and drops only the zeros.
#[test]
fn zeros_after_the_last_record_are_dropped_and_every_grant_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir(&data).unwrap();
    let (mut log, _) = format_1_log(&grants(3));
    log.resize(log.len() + 512, 0);
    fs::write(data.join(arbiter::store::LOG_FILE), &log).unwrap();
    let arbiter = Arbiter::start(&data);
    let client = arbiter.client();
    for i in 0..3 {
        let entry = client.get(&format!("vm-{i}")).unwrap().expect("grant kept");
        assert_eq!(entry.holder, Some(format!("owner-{i}")));
        let intruder = client
            .test_and_set(&format!("vm-{i}"), "intruder", 1)
            .unwrap();
        assert_eq!(intruder.outcome, Outcome::Lost);
    }
}
