//! The chaos harness (issue #11): an arbiter, a primary, a backup and a client in network
//! namespaces, faults injected at points chosen by a seeded generator, and the invariants
//! of fault tolerance checked after each run:
//!
//! 1. **No split brain**: at no instant did two living sides of the pair go on alone for the
//!    VM's generation (`alone` or `live-after-failover` in their status files, sampled every
//!    100 ms), and every `won` in the arbiter's log names one claimant, the side that went on.
//! 2. **The client's requests**: one TCP connection to the guest's counter service, whose
//!    every answer carries the service's running count: each request is answered exactly
//!    once, with the next count (nothing lost, nothing repeated), and the connection
//!    survives the failover.
//! 3. **The console**: the transcript the outside saw (the primary's released output, then
//!    the output of a backup that went live) holds every `tick N` line the guest printed, in
//!    order; the only duplicates allowed are one step back at the failover seam of at most
//!    [`MAX_REPEATED_LINES`] lines (what the primary released in its last round trip, which
//!    the backup cannot know it released: README, output at failover).
//!
//! A run injects some harmless faults (the arbiter killed and restarted with its data, a
//! stranger sending garbage to the backup's log port) and exactly one fault that ends the
//! pair: SIGKILL of the primary or the backup, SIGSTOP of the primary past the peer timeout
//! then SIGCONT, or a cut log link (both ways, or one way in either direction); sometimes
//! the arbiter is down across that fault and comes back later. Then the survivor must carry
//! on. Every process, namespace and TAP is removed when the run ends, also on failure (the
//! helpers' drop guards).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::{
    connect_from, start_arbiter_logged, ArbiterProcess, Host, Topology, GUEST_IP, PREFIX,
};
use crate::{Vm, BOOT_TIMEOUT};

/// The most `tick` lines a backup that went live may print again (one step back at the
/// seam): what its primary may have released in its last round trip before it died.
pub const MAX_REPEATED_LINES: u64 = 20;

/// The peer timeout both sides run with, in ms.
const PEER_TIMEOUT_MS: u64 = 2000;
/// How long a request may wait for its answer: a takeover (detection, the backup's replay
/// backlog, the arbiter, possibly down for a while) on a slow, shared machine.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the survivor has to go on after the pair-ending fault.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Answers the client must get after the pair-ending fault before the run ends.
const ANSWERS_AFTER: u64 = 8;

/// A small deterministic generator (splitmix64): the same seed, the same run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A duration in `lo_ms..=hi_ms` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }
}

/// A fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL of the primary.
    KillPrimary,
    /// SIGKILL of the backup.
    KillBackup,
    /// SIGSTOP of the primary past the peer timeout, then SIGCONT.
    StopPrimary,
    /// The log link down (both ways).
    CutBoth,
    /// Everything the primary sends on the log link dropped.
    CutPrimaryToBackup,
    /// Everything the backup sends on the log link dropped.
    CutBackupToPrimary,
    /// The arbiter killed (SIGKILL) and restarted on its data.
    ArbiterRestart,
    /// The arbiter killed before the pair-ending fault and restarted a while after it.
    ArbiterDownAcross,
    /// A stranger connects to the backup's log port and sends garbage.
    StrayConnection,
}

impl Fault {
    /// The faults that end the pair (one per run).
    pub const ENDING: [Fault; 6] = [
        Fault::KillPrimary,
        Fault::KillBackup,
        Fault::StopPrimary,
        Fault::CutBoth,
        Fault::CutPrimaryToBackup,
        Fault::CutBackupToPrimary,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "SIGKILL primary",
            Fault::KillBackup => "SIGKILL backup",
            Fault::StopPrimary => "SIGSTOP primary past the timeout",
            Fault::CutBoth => "log link cut both ways",
            Fault::CutPrimaryToBackup => "log link cut primary->backup",
            Fault::CutBackupToPrimary => "log link cut backup->primary",
            Fault::ArbiterRestart => "arbiter killed and restarted",
            Fault::ArbiterDownAcross => "arbiter down across the ending fault",
            Fault::StrayConnection => "stray connection with garbage",
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct RunReport {
    /// The run's seed.
    pub seed: u64,
    /// The faults injected, in order.
    pub faults: Vec<Fault>,
    /// Broken invariants, one line each (goal: none).
    pub violations: Vec<String>,
    /// Requests answered.
    pub answers: u64,
    /// Which side went on, and in what role.
    pub survivor: Option<(String, String)>,
    /// From the pair-ending fault to the first answer after it.
    pub takeover: Option<Duration>,
    /// Lines repeated at the failover seam.
    pub repeated_lines: u64,
    /// Things worth knowing that break no invariant.
    pub notes: Vec<String>,
}

/// Runs and what they found, for the summary.
#[derive(Debug, Default)]
pub struct Summary {
    /// Runs done.
    pub runs: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<Fault, u64>,
    /// Violations, with the seed of their run.
    pub violations: Vec<(u64, String)>,
}

impl Summary {
    /// Adds a run.
    pub fn add(&mut self, r: &RunReport) {
        self.runs += 1;
        for f in &r.faults {
            *self.faults.entry(*f).or_default() += 1;
        }
        self.violations
            .extend(r.violations.iter().map(|v| (r.seed, v.clone())));
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "chaos: {} run(s)", self.runs)?;
        writeln!(f, "faults injected:")?;
        for (k, n) in &self.faults {
            writeln!(f, "  {n:4}  {}", k.name())?;
        }
        writeln!(f, "invariant violations: {}", self.violations.len())?;
        for (seed, v) in &self.violations {
            writeln!(f, "  seed {seed}: {v}")?;
        }
        Ok(())
    }
}

/// A side of the pair.
struct Side {
    name: &'static str,
    vm: Vm,
    status: PathBuf,
    /// Killed by the harness (its end is not checked).
    killed: bool,
}

/// The role in a status file, if it can be read.
fn role_of(status: &Path) -> Option<String> {
    let text = std::fs::read_to_string(status).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v.get("role")?.as_str()?.to_string())
}

/// Whether process `pid` still exists and has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Roles in which a side runs the VM for the outside on its own (granted by the arbiter).
fn goes_on_alone(role: &str) -> bool {
    role == "alone" || role == "live-after-failover"
}

/// Samples both sides' status files until `stop`; returns the instants (ms into the run)
/// at which two living sides both went on alone.
fn spawn_sampler(
    sides: [(u32, PathBuf); 2],
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let live: Vec<String> = sides
                .iter()
                .filter(|(pid, _)| alive(*pid))
                .filter_map(|(_, st)| role_of(st))
                .filter(|r| goes_on_alone(r))
                .collect();
            if live.len() > 1 && seen.len() < 5 {
                seen.push(format!(
                    "two sides went on alone at once at {:.1?} into the run: {live:?}",
                    t0.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

/// What the client saw.
#[derive(Debug, Default)]
struct ClientLog {
    /// When each answer came.
    answers: Vec<Instant>,
    violations: Vec<String>,
    done: bool,
}

/// The client: one connection, requests `q-1`, `q-2`, ... one at a time; answer `i` must be
/// `"<i> q-<i>"` (the guest's service counts every line it served).
fn spawn_client(
    client: Host,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<ClientLog>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let fail = |why: String| {
            let mut l = log.lock().unwrap();
            l.violations.push(why);
            l.done = true;
        };
        let service: SocketAddr = format!("{GUEST_IP}:7000").parse().expect("address");
        // The ticker script says the service is listening as it starts it: a refused
        // connection is tried again for a while.
        let deadline = Instant::now() + Duration::from_secs(120);
        let s = loop {
            match connect_from(&client, service, Duration::from_secs(60)) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return fail(format!("client: cannot connect to the guest: {e}")),
            }
        };
        let _ = s.set_read_timeout(Some(ANSWER_TIMEOUT));
        let mut w: TcpStream = match s.try_clone() {
            Ok(w) => w,
            Err(e) => return fail(format!("client: {e}")),
        };
        let mut r = BufReader::new(s);
        let mut i = 1u64;
        while !stop.load(Ordering::Acquire) {
            let req = format!("q-{i}");
            if let Err(e) = writeln!(w, "{req}") {
                return fail(format!("client: the connection broke sending {req}: {e}"));
            }
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => {
                    return fail(format!(
                        "client: the connection closed before {req}'s answer"
                    ))
                }
                Err(e) => {
                    return fail(format!(
                        "client: no answer to {req} ({e}; waited up to {ANSWER_TIMEOUT:?})"
                    ))
                }
                Ok(_) => {}
            }
            let want = format!("{i} {req}");
            if line.trim_end() != want {
                return fail(format!(
                    "client: answer {:?} to {req}, want {want:?} (lost or repeated answer)",
                    line.trim_end()
                ));
            }
            log.lock().unwrap().answers.push(Instant::now());
            i += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        log.lock().unwrap().done = true;
    })
}

/// The numbers of every complete `tick N` line in a transcript, in order (a fragment that
/// does not end a line, where the backup joined mid-line, is skipped).
pub fn ticks(transcript: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut rest = transcript;
    while let Some(i) = rest.find("tick ") {
        rest = &rest[i + 5..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let end = &rest[digits.len()..];
        if !digits.is_empty() && (end.starts_with('\n') || end.starts_with("\r\n")) {
            if let Ok(n) = digits.parse() {
                out.push(n);
            }
        }
    }
    out
}

/// Checks a transcript's ticks: from 1, every line, in order, at most one step back of at
/// most [`MAX_REPEATED_LINES`]. Returns the lines repeated, or what is wrong.
pub fn check_ticks(seen: &[u64]) -> Result<u64, String> {
    let Some(&first) = seen.first() else {
        return Err("no tick lines on the console".into());
    };
    if first != 1 {
        return Err(format!("the console starts at tick {first}, not 1"));
    }
    let mut back = Vec::new();
    for w in seen.windows(2) {
        if w[1] <= w[0] {
            back.push((w[0], w[1]));
        } else if w[1] != w[0] + 1 {
            return Err(format!(
                "console lines lost between tick {} and tick {}",
                w[0], w[1]
            ));
        }
    }
    match back[..] {
        [] => Ok(0),
        [(from, to)] if from + 1 - to <= MAX_REPEATED_LINES => Ok(from + 1 - to),
        [(from, to)] => Err(format!(
            "{} console lines repeated (tick {from} then tick {to}), more than {MAX_REPEATED_LINES}",
            from + 1 - to
        )),
        _ => Err(format!("more than one step back on the console: {back:?}")),
    }
}

/// The claimants the arbiter's log says won a test-and-set for `generation`.
pub fn arbiter_winners(log: &str, generation: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines().filter(|l| l.contains("test-and-set")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .map(|v| v.trim_matches('"').to_string())
        };
        if field("outcome").as_deref() == Some("Won")
            && field("generation").and_then(|g| g.parse().ok()) == Some(generation)
        {
            if let Some(c) = field("claimant") {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The claimant a side named on standard error at start-up.
fn claimant_of(stderr: &str) -> Option<String> {
    let i = stderr.find("this side is ")?;
    Some(stderr[i + 13..].lines().next()?.trim().to_string())
}

/// Writes the pair's shared secret.
fn write_secret(dir: &Path, seed: u64) -> std::io::Result<PathBuf> {
    let p = dir.join("pair.secret");
    std::fs::write(&p, format!("twinvm-chaos-pair-secret-{seed:016x}\n"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

/// Connects to the backup's log port from `from` and sends garbage.
fn stray_connection(from: &Host, to: &str, rng: &mut Rng) -> String {
    let addr: SocketAddr = format!("{to}:7300").parse().expect("address");
    match connect_from(from, addr, Duration::from_secs(5)) {
        Ok(mut s) => {
            let garbage: Vec<u8> = (0..rng.range(1, 600))
                .map(|_| rng.next_u64() as u8)
                .collect();
            let sent = s.write_all(&garbage).is_ok();
            std::thread::sleep(Duration::from_millis(200));
            format!(
                "{} bytes of garbage {}",
                garbage.len(),
                if sent { "sent" } else { "refused" }
            )
        }
        Err(e) => format!("not connected ({e})"),
    }
}

/// Raises a stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Progress messages.
pub type Say<'a> = &'a mut dyn FnMut(&str);

/// One run with `seed`: starts everything, injects, checks, cleans up.
pub fn run_once(seed: u64, say: Say<'_>) -> RunReport {
    let mut report = RunReport {
        seed,
        ..RunReport::default()
    };
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let mut topo = Topology::new();
    let primary_host = topo.host("primary", 11, true);
    let backup_host = topo.host("backup", 12, true);
    let client = topo.host("client", 1, false);
    let arb_host = topo.host("arbiter", 13, false);
    let (p_lc, b_lc) = topo.direct_link(&primary_host, &backup_host);
    let dir = std::env::temp_dir().join(format!("twinvm-chaos-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let arb_log = dir.join("arbiter.log");
    let start_arb = || start_arbiter_logged(&arb_host, &dir, Some(&arb_log)).expect("arbiter");
    let mut arbiter: Option<ArbiterProcess> = Some(start_arb());
    let secret = write_secret(&dir, seed).expect("pair secret");
    let secret = secret.to_str().expect("UTF-8 path").to_string();
    let token = arbiter
        .as_ref()
        .map(|a| a.token.clone())
        .unwrap_or_default();
    let arb_addr = arbiter.as_ref().map(|a| a.addr.clone()).unwrap_or_default();
    let append = format!("twinvm.ip={GUEST_IP}/{PREFIX} twinvm.run=ticker");
    let timeout = PEER_TIMEOUT_MS.to_string();
    let common = [
        "--tap",
        "tap0",
        "--arbiter",
        &arb_addr,
        "--arbiter-token-file",
        &token,
        "--pair-secret-file",
        &secret,
        "--peer-timeout-ms",
        &timeout,
        "--append",
        &append,
    ];
    let b_status = dir.join("backup.status");
    let p_status = dir.join("primary.status");
    let b_console = dir.join("backup.console");
    let mut b_args = vec![
        "backup",
        "--listen",
        "0.0.0.0:7300",
        "--console-log",
        b_console.to_str().expect("UTF-8 path"),
        "--status",
        b_status.to_str().expect("UTF-8 path"),
    ];
    b_args.extend_from_slice(&common);
    let mut backup = Side {
        name: "backup",
        vm: Vm::spawn_in(Some(&backup_host.netns), &b_args),
        status: b_status,
        killed: false,
    };
    backup
        .vm
        .wait_for_stderr("backup listening on", Duration::from_secs(60));
    // Strangers may come before the primary does.
    if rng.chance(1, 2) {
        let what = stray_connection(&client, &backup_host.addr, &mut rng);
        say(&format!("stray connection before the primary: {what}"));
        report.faults.push(Fault::StrayConnection);
    }
    let backup_lc = format!("{b_lc}:7300");
    let mut p_args = vec![
        "primary",
        "--backup",
        &backup_lc,
        "--status",
        p_status.to_str().expect("UTF-8 path"),
    ];
    p_args.extend_from_slice(&common);
    let mut primary = Side {
        name: "primary",
        vm: Vm::spawn_in(Some(&primary_host.netns), &p_args),
        status: p_status,
        killed: false,
    };
    primary
        .vm
        .wait_for("twinvm-counter: listening", 0, BOOT_TIMEOUT);
    say(&format!("pair up after {:.0?}", t0.elapsed()));
    let stop = Arc::new(AtomicBool::new(false));
    // The sampler and the client stop also when the run panics.
    let _stop_guard = StopOnDrop(stop.clone());
    let sampler = spawn_sampler(
        [
            (primary.vm.pid, primary.status.clone()),
            (backup.vm.pid, backup.status.clone()),
        ],
        stop.clone(),
        t0,
    );
    let client_log = Arc::new(Mutex::new(ClientLog::default()));
    let client_thread = spawn_client(client.clone(), stop.clone(), client_log.clone());
    // Faults start once the client is served.
    let first = Instant::now() + Duration::from_secs(300);
    while Instant::now() < first {
        let l = client_log.lock().unwrap();
        if !l.answers.is_empty() || l.done {
            break;
        }
        drop(l);
        std::thread::sleep(Duration::from_millis(100));
    }

    // Harmless faults, then the one that ends the pair.
    for _ in 0..rng.range(0, 2) {
        std::thread::sleep(rng.millis(2000, 10_000));
        if rng.chance(1, 2) {
            drop(arbiter.take());
            std::thread::sleep(rng.millis(100, 3000));
            arbiter = Some(start_arb());
            say("arbiter killed and restarted");
            report.faults.push(Fault::ArbiterRestart);
        } else {
            let what = stray_connection(&client, &backup_host.addr, &mut rng);
            say(&format!("stray connection: {what}"));
            report.faults.push(Fault::StrayConnection);
        }
    }
    std::thread::sleep(rng.millis(3000, 12_000));
    let ending = Fault::ENDING[rng.range(0, Fault::ENDING.len() as u64 - 1) as usize];
    let arbiter_down_for = rng.chance(1, 3).then(|| rng.millis(1000, 8000));
    if arbiter_down_for.is_some() {
        drop(arbiter.take());
        report.faults.push(Fault::ArbiterDownAcross);
    }
    let answered_before = client_log.lock().unwrap().answers.len();
    let fault_at = Instant::now();
    say(&format!(
        "{} after {answered_before} answers{}",
        ending.name(),
        match arbiter_down_for {
            Some(d) => format!(" (the arbiter down until {d:.1?} after it)"),
            None => String::new(),
        }
    ));
    report.faults.push(ending);
    let mut stopped_until: Option<Instant> = None;
    match ending {
        Fault::KillPrimary => {
            primary.vm.signal(libc::SIGKILL);
            primary.killed = true;
        }
        Fault::KillBackup => {
            backup.vm.signal(libc::SIGKILL);
            backup.killed = true;
        }
        Fault::StopPrimary => {
            primary.vm.freeze(true);
            stopped_until =
                Some(fault_at + Duration::from_millis(2 * PEER_TIMEOUT_MS) + rng.millis(0, 6000));
        }
        Fault::CutBoth => Topology::set_link(&primary_host, "lc0", false),
        Fault::CutPrimaryToBackup => Topology::blackhole(&primary_host, &b_lc, true),
        Fault::CutBackupToPrimary => Topology::blackhole(&backup_host, &p_lc, true),
        _ => unreachable!("not an ending fault"),
    }

    // Until the survivor has answered enough, with the arbiter back and the primary
    // continued on schedule.
    let deadline = fault_at + SETTLE_TIMEOUT;
    loop {
        if let (Some(d), None) = (arbiter_down_for, &arbiter) {
            if fault_at.elapsed() >= d {
                arbiter = Some(start_arb());
                say("arbiter restarted");
            }
        }
        if stopped_until.is_some_and(|t| Instant::now() >= t) {
            primary.vm.freeze(false);
            stopped_until = None;
            say("primary continued (SIGCONT)");
        }
        let (after, done) = {
            let l = client_log.lock().unwrap();
            (
                l.answers.len().saturating_sub(answered_before) as u64,
                l.done,
            )
        };
        if (after >= ANSWERS_AFTER || done) && stopped_until.is_none() && arbiter.is_some() {
            break;
        }
        if Instant::now() > deadline {
            report.violations.push(format!(
                "only {after} answers in {SETTLE_TIMEOUT:?} after the fault: the VM did not go on"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the losing side settle (halt) before looking.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle
        && [&primary, &backup]
            .iter()
            .filter(|s| alive(s.vm.pid))
            .count()
            > 1
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Release);
    let _ = client_thread.join();
    let split = sampler.join().unwrap_or_default();
    report.violations.extend(split);
    {
        let l = client_log.lock().unwrap();
        report.answers = l.answers.len() as u64;
        report.takeover = l
            .answers
            .get(answered_before)
            .map(|t| t.duration_since(fault_at));
        report.violations.extend(l.violations.iter().cloned());
    }

    // Who went on, and the arbiter's word on it.
    let mut survivors = Vec::new();
    for side in [&mut primary, &mut backup] {
        let role = role_of(&side.status).unwrap_or_default();
        match side.vm.exited() {
            None if goes_on_alone(&role) => survivors.push((side.name.to_string(), role)),
            None => report.notes.push(format!(
                "the {} still runs as {role:?} though it did not go on",
                side.name
            )),
            Some(st) if !side.killed && st.code() != Some(4) => report.violations.push(format!(
                "the {} ended with {st} (a side that loses halts with status 4): {}",
                side.name,
                crate::bench::tail(&side.vm.stderr(), 1500)
            )),
            Some(_) => {}
        }
    }
    let log = std::fs::read_to_string(&arb_log).unwrap_or_default();
    let winners = arbiter_winners(&log, 1);
    match (&survivors[..], &winners[..]) {
        ([(name, role)], [winner]) => {
            let side = if name == "primary" { &primary } else { &backup };
            let claimant = claimant_of(&side.vm.stderr()).unwrap_or_default();
            if &claimant != winner {
                report.violations.push(format!(
                    "the {name} went on ({role}) as {claimant:?}, but the arbiter gave the generation to {winner:?}"
                ));
            }
            report.survivor = Some((name.clone(), role.clone()));
        }
        (s, w) => report.violations.push(format!(
            "want exactly one side going on and one winner at the arbiter: sides {s:?}, winners {w:?}"
        )),
    }

    // The console the outside saw.
    let transcript = primary.vm.console() + &backup.vm.console();
    match check_ticks(&ticks(&transcript)) {
        Ok(n) => report.repeated_lines = n,
        Err(e) => report.violations.push(format!("console: {e}")),
    }
    if !report.violations.is_empty() {
        let keep = dir.with_extension("failed");
        let _ = std::fs::remove_dir_all(&keep);
        for (side, what) in [(&primary, "primary"), (&backup, "backup")] {
            let _ = std::fs::write(dir.join(format!("{what}.stderr")), side.vm.stderr());
            let _ = std::fs::write(dir.join(format!("{what}.stdout")), side.vm.console());
        }
        if std::fs::rename(&dir, &keep).is_ok() {
            say(&format!("kept the run's files in {}", keep.display()));
        }
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The survivor ends; the guards remove the rest.
    for side in [&mut primary, &mut backup] {
        if side.vm.exited().is_none() {
            side.vm.freeze(false);
            side.vm.signal(libc::SIGTERM);
        }
    }
    for side in [&mut primary, &mut backup] {
        let end = Instant::now() + Duration::from_secs(60);
        while side.vm.exited().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(arbiter);
    drop(topo);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_transcripts() {
        assert_eq!(check_ticks(&[1, 2, 3, 4]), Ok(0));
        assert_eq!(check_ticks(&[1, 2, 3, 2, 3, 4]), Ok(2));
        assert!(check_ticks(&[1, 2, 4]).is_err());
        assert!(check_ticks(&[2, 3]).is_err());
        assert!(check_ticks(&[1, 2, 1, 2, 1, 2]).is_err());
        assert!(check_ticks(&[]).is_err());
        assert_eq!(ticks("tick 1\r\ntick 2\r\ntic"), vec![1, 2]);
        assert_eq!(ticks("tick 1\r\nk 3\r\ntick 2\n"), vec![1, 2]);
    }

    #[test]
    fn arbiter_log_winners() {
        let log = "2026-12-02T03:00:00Z  INFO twinvm_arbiter::server: test-and-set vm=twinvm claimant=backup@h:1 generation=1 outcome=Won holder=Some(\"backup@h:1\")\n\
                   2026-12-02T03:00:01Z  INFO twinvm_arbiter::server: test-and-set vm=twinvm claimant=primary@h:2 generation=1 outcome=Lost holder=Some(\"backup@h:1\")\n\
                   2026-12-02T03:00:02Z  INFO twinvm_arbiter::server: test-and-set vm=twinvm claimant=backup@h:1 generation=1 outcome=Won holder=Some(\"backup@h:1\")\n";
        assert_eq!(arbiter_winners(log, 1), vec!["backup@h:1".to_string()]);
        assert!(arbiter_winners(log, 2).is_empty());
    }

    #[test]
    fn the_generator_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.range(3, 9), b.range(3, 9));
        }
        assert!((0..1000)
            .map(|_| a.range(3, 9))
            .all(|x| (3..=9).contains(&x)));
    }
}
