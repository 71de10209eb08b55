//! Helpers for the benchmark binaries (`bench-boot`, `bench-rr`): option parsing, timing a
//! `twinvm` process to the millisecond, reading its `--stats` JSON and its memory from
//! `/proc`, and printing figures as median / min / max tables.
//!
//! Benchmarks never assert timings; they print figures. They fail (exit non-zero) only when
//! the thing measured did not work: a guest that did not boot, a VMM that did not exit
//! cleanly, a replay that did not match its recording.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::Vm;

/// The error type of the benchmarks: a message for the user.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Result of a benchmark step.
pub type Result<T> = std::result::Result<T, Error>;

/// How often a running guest's console and process state are polled. The figures measured
/// are tens of seconds, so this is well below their noise.
const POLL: Duration = Duration::from_millis(5);

/// The options every benchmark takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Repetitions of each measurement.
    pub runs: usize,
    /// Host CPU to pin the vCPU thread to (`twinvm --cpu`), if any.
    pub cpu: Option<usize>,
    /// Extra `name value` options the benchmark declared, in the order given.
    pub extra: Vec<(String, String)>,
}

impl Options {
    /// The value of an extra option, if it was given.
    pub fn extra(&self, name: &str) -> Option<&str> {
        self.extra
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `--runs N`, `--cpu N|none` and the benchmark's own `extra` options (each takes one
/// value) from the command line. `--help` prints `usage` and exits 0; anything unknown is an
/// error that names it.
pub fn parse_options(
    default_runs: usize,
    default_cpu: Option<usize>,
    extra: &[&str],
    usage: &str,
) -> Result<Options> {
    parse_options_from(
        std::env::args().skip(1),
        default_runs,
        default_cpu,
        extra,
        usage,
    )
}

fn parse_options_from(
    args: impl IntoIterator<Item = String>,
    default_runs: usize,
    default_cpu: Option<usize>,
    extra: &[&str],
    usage: &str,
) -> Result<Options> {
    let mut opts = Options {
        runs: default_runs,
        cpu: default_cpu,
        extra: Vec::new(),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        // Both `--name value` and `--name=value`.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if name == "--help" || name == "-h" {
            print!("{usage}");
            std::process::exit(0);
        }
        let known = name == "--runs" || name == "--cpu" || extra.contains(&name.as_str());
        if !known {
            return Err(format!("unknown option {arg:?}\n\n{usage}").into());
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| format!("{name} needs a value\n\n{usage}"))?,
        };
        match name.as_str() {
            "--runs" => {
                opts.runs = value
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .ok_or_else(|| format!("--runs wants a positive number, not {value:?}"))?;
            }
            "--cpu" => {
                opts.cpu = if value == "none" {
                    None
                } else {
                    Some(value.parse().map_err(|_| {
                        format!("--cpu wants a host CPU number or `none`, not {value:?}")
                    })?)
                };
            }
            _ => opts.extra.push((name, value)),
        }
    }
    Ok(opts)
}

/// A scratch directory, removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/twinvm-<name>-<pid>`.
    pub fn new(name: &str) -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("twinvm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(ScratchDir { path })
    }

    /// `dir/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether process `pid` (our child) has exited: it is then a zombie until reaped, or gone.
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z") | Some("X") | None
        ),
        Err(_) => true,
    }
}

/// A `twinvm` process under measurement, with the instant it was started.
pub struct Timed {
    /// The process (killed when dropped).
    pub vm: Vm,
    /// Just before the process was spawned.
    pub t0: Instant,
}

impl Timed {
    /// Spawns `twinvm args`, noting the time first.
    pub fn spawn(args: &[&str]) -> Timed {
        let t0 = Instant::now();
        let vm = Vm::spawn(args);
        Timed { vm, t0 }
    }

    /// Seconds since spawn.
    pub fn since_start(&self, at: Instant) -> f64 {
        at.duration_since(self.t0).as_secs_f64()
    }

    fn failure(&self, what: String) -> Error {
        format!(
            "{what}\n--- console (last 3000 bytes) ---\n{}\n--- stderr ---\n{}",
            tail(&self.vm.console(), 3000),
            self.vm.stderr()
        )
        .into()
    }

    /// Polls the console until `last` appears, noting when each of `marks` (and `last`)
    /// first appeared, in seconds since spawn; a mark that never appears is `None`. Returns
    /// the console offset just past `last` and the times of the marks (in order) then `last`.
    pub fn watch(
        &mut self,
        marks: &[&str],
        last: &str,
        timeout: Duration,
    ) -> Result<(usize, Vec<Option<f64>>)> {
        let mut seen: Vec<Option<f64>> = vec![None; marks.len() + 1];
        let deadline = self.t0 + timeout;
        loop {
            let now = Instant::now();
            let console = self.vm.console();
            for (i, m) in marks.iter().enumerate() {
                if seen[i].is_none() && console.contains(m) {
                    seen[i] = Some(self.since_start(now));
                }
            }
            if let Some(i) = console.find(last) {
                seen[marks.len()] = Some(self.since_start(now));
                return Ok((i + last.len(), seen));
            }
            if has_exited(self.vm.pid) {
                return Err(self.failure(format!("twinvm exited before printing {last:?}")));
            }
            if now > deadline {
                return Err(self.failure(format!("no {last:?} on the console after {timeout:?}")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the process to exit; returns its wall time since spawn in seconds and its
    /// exit code (`None` if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(f64, Option<i32>)> {
        let deadline = Instant::now() + timeout;
        let end = loop {
            let now = Instant::now();
            if has_exited(self.vm.pid) {
                break now;
            }
            if now > deadline {
                return Err(self.failure(format!("twinvm did not exit within {timeout:?}")));
            }
            std::thread::sleep(POLL);
        };
        let status = self.vm.wait_exit(Duration::from_secs(10));
        Ok((self.since_start(end), status.code()))
    }

    /// [`Timed::wait_exit`], and an error unless the exit status was 0 (guest powered off).
    pub fn wait_poweroff(&mut self, what: &str, timeout: Duration) -> Result<f64> {
        let (wall, code) = self.wait_exit(timeout)?;
        if code != Some(0) {
            return Err(self.failure(format!(
                "{what}: twinvm exited with status {code:?}, not 0 (guest powered off)"
            )));
        }
        Ok(wall)
    }
}

/// The last `n` bytes of `s` (at a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The JSON object `twinvm --stats FILE` writes when the guest ends.
#[derive(Debug, Clone)]
pub struct Stats {
    json: serde_json::Value,
    path: PathBuf,
}

impl Stats {
    /// Reads and parses a stats file.
    pub fn read(path: &Path) -> Result<Stats> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading stats {}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("parsing stats {}: {e}", path.display()))?;
        if !json.is_object() {
            return Err(format!("stats {} is not a JSON object", path.display()).into());
        }
        Ok(Stats {
            json,
            path: path.to_path_buf(),
        })
    }

    /// A numeric field.
    pub fn f(&self, key: &str) -> Result<f64> {
        self.json
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("stats {} have no number {key:?}", self.path.display()).into())
    }

    /// A string field.
    pub fn s(&self, key: &str) -> Result<String> {
        self.json
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("stats {} have no string {key:?}", self.path.display()).into())
    }
}

/// `(VmHWM, VmRSS)` of a process in KiB, from /proc/PID/status.
pub fn vm_hwm_rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status").into())
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Median, minimum and maximum of `v` (NaN for an empty slice).
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

/// A table of figures, one row per figure: its median, min and max over the runs.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Row>,
}

#[derive(Debug)]
enum Row {
    Figure {
        label: String,
        values: Vec<f64>,
        unit: String,
        decimals: usize,
    },
    Heading(String),
}

impl Table {
    /// An empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// Adds a figure measured once per run.
    pub fn row(&mut self, label: &str, values: Vec<f64>, unit: &str, decimals: usize) {
        self.rows.push(Row::Figure {
            label: label.to_string(),
            values,
            unit: unit.to_string(),
            decimals,
        });
    }

    /// Adds a sub-heading.
    pub fn heading(&mut self, text: &str) {
        self.rows.push(Row::Heading(text.to_string()));
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| match r {
                Row::Figure { label, .. } => label.len(),
                Row::Heading(_) => 0,
            })
            .max()
            .unwrap_or(0)
            .max(6);
        let num = |x: f64, d: usize| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.d$}")
            }
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "  {:<width$}  {:>12}  {:>12}  {:>12}  unit",
            "figure", "median", "min", "max"
        );
        for r in &self.rows {
            match r {
                Row::Heading(h) => {
                    let _ = writeln!(out, "  -- {h}");
                }
                Row::Figure {
                    label,
                    values,
                    unit,
                    decimals,
                } => {
                    let (med, min, max) = summary(values);
                    let line = format!(
                        "  {label:<width$}  {:>12}  {:>12}  {:>12}  {unit}",
                        num(med, *decimals),
                        num(min, *decimals),
                        num(max, *decimals)
                    );
                    let _ = writeln!(out, "{}", line.trim_end());
                }
            }
        }
        out
    }
}

/// A one-line description of the host, for the header of a benchmark's output.
pub fn host_line() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".to_string());
    let kvm = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .iter()
        .find(|m| Path::new(&format!("/sys/module/{m}")).exists())
        .copied()
        .unwrap_or("unknown");
    format!("host: {cpus} CPUs, KVM module {kvm}, load average {load} at start")
}

/// Runs `body`; on error prints it and returns a failing exit code. The processes a failed
/// benchmark started are killed as their handles drop while the error propagates.
pub fn main_with(name: &str, body: impl FnOnce() -> Result<()>) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: FAILED: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything a process wrote on standard output so far, byte for byte (not lossily as
/// [`Vm::console`] gives it): for comparing consoles exactly.
pub fn console_bytes(vm: &Vm) -> Vec<u8> {
    vm.out.lock().map(|o| o.clone()).unwrap_or_default()
}

/// Waits until the process's standard error contains `needle`; returns the rest of that
/// line. An error carrying its console and standard error if it exits first or `timeout`
/// passes (unlike [`Vm::wait_for_stderr`], which panics).
pub fn wait_stderr(t: &Timed, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let err = t.vm.stderr();
        if let Some(i) = err.find(needle) {
            let rest = &err[i + needle.len()..];
            return Ok(rest.lines().next().unwrap_or("").to_string());
        }
        if has_exited(t.vm.pid) {
            return Err(t.failure(format!("twinvm exited before printing {needle:?}")));
        }
        if Instant::now() > deadline {
            return Err(t.failure(format!("no {needle:?} on stderr after {timeout:?}")));
        }
        std::thread::sleep(POLL);
    }
}

/// The unsigned integer written just before `needle` in `text`
/// (`"..., 12 state digests matched"` with `" state digests matched"` gives 12).
pub fn number_before(text: &str, needle: &str) -> Option<u64> {
    let (before, _) = text.split_once(needle)?;
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The unsigned integer written just after `needle` in `text`.
pub fn number_after(text: &str, needle: &str) -> Option<u64> {
    let (_, after) = text.split_once(needle)?;
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A [`Duration`] as its `Debug` format prints it (`1.23ms`, `456.00µs`, `2.10s`, `0ns`),
/// in seconds.
pub fn parse_debug_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    // Longest suffixes first: "ms" and "ns" also end in "s".
    for (unit, scale) in [
        ("ns", 1e-9),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
    ] {
        if let Some(num) = s.strip_suffix(unit) {
            return num.trim().parse::<f64>().ok().map(|x| x * scale);
        }
    }
    None
}

/// A `twinvm --status FILE` report: its JSON and when it was written (the file's mtime;
/// twinvm writes a temporary file and renames it, so the mtime is that of the write).
#[derive(Debug, Clone)]
pub struct StatusSample {
    /// When the file was written, in seconds since the Unix epoch.
    pub written: f64,
    /// Its contents.
    pub json: serde_json::Value,
}

impl StatusSample {
    /// Reads a status file; `None` if it does not exist (yet) or does not parse.
    pub fn read(path: &Path) -> Option<StatusSample> {
        use std::io::Read as _;
        // Metadata and contents from the same open file, so that both are of one write.
        let mut f = std::fs::File::open(path).ok()?;
        let written = f
            .metadata()
            .ok()?
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        let json = serde_json::from_str(&text).ok()?;
        Some(StatusSample { written, json })
    }

    /// A numeric field.
    pub fn f(&self, key: &str) -> Option<f64> {
        self.json.get(key).and_then(serde_json::Value::as_f64)
    }

    /// A string field.
    pub fn s(&self, key: &str) -> Option<&str> {
        self.json.get(key).and_then(serde_json::Value::as_str)
    }
}

/// The time now in seconds since the Unix epoch, the clock of [`StatusSample::written`].
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(f64::NAN)
}

/// Linear interpolation of `y` at `x` over `series`, points `(x, y)` with `x` increasing;
/// `None` outside the series' range (or for an empty one).
pub fn interpolate(series: &[(f64, f64)], x: f64) -> Option<f64> {
    let i = series.iter().position(|&(sx, _)| sx >= x)?;
    let (x1, y1) = series[i];
    if x1 == x {
        return Some(y1);
    }
    let (x0, y0) = *series.get(i.checked_sub(1)?)?;
    Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
}

/// The `p`-th quantile (0..=1) of `v` by nearest rank, as twinvm computes its own; NaN for
/// an empty slice.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// Spawns `twinvm args` inside network namespace `netns` (see [`Vm::spawn_in`]), noting the
/// time first.
pub fn spawn_timed_in(netns: &str, args: &[&str]) -> Timed {
    let t0 = Instant::now();
    let vm = Vm::spawn_in(Some(netns), args);
    Timed { vm, t0 }
}

/// Waits until the status file `path` has been rewritten after `after` (seconds since the
/// Unix epoch, the clock of [`StatusSample::written`]) and returns that report. An error
/// if `timeout` passes first (twinvm rewrites it at an exit once a second has passed).
pub fn fresh_status(path: &Path, after: f64, timeout: Duration) -> Result<StatusSample> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = StatusSample::read(path) {
            if s.written > after {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{} was not rewritten within {timeout:?}", path.display()).into());
        }
        std::thread::sleep(POLL);
    }
}

/// Connects to `addr` from inside `host`'s namespace, retrying every half second while it
/// is not reachable yet, up to `timeout`.
pub fn connect_retry(
    host: &crate::netns::Host,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match crate::netns::connect_from(host, addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connecting to {addr} from {}: {e}", host.netns).into())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Checks one answer of the guest's counter service (`twinvm.run=counter`, which answers
/// each line with `<count> <line>`) to `request`: it must echo the request and, if
/// `previous` is known, count one more than it. Returns the count, or the anomaly.
pub fn check_counter_answer(
    answer: &str,
    request: &str,
    previous: Option<u64>,
) -> std::result::Result<u64, String> {
    let answer = answer.trim_end_matches(['\r', '\n']);
    let (count, echoed) = answer
        .split_once(' ')
        .and_then(|(c, l)| c.parse::<u64>().ok().map(|c| (c, l)))
        .ok_or_else(|| format!("malformed answer {answer:?} to {request:?}"))?;
    if echoed != request {
        return Err(format!(
            "answer {answer:?} to {request:?}: it echoes another request (one lost or answered twice)"
        ));
    }
    if let Some(p) = previous {
        if count != p + 1 {
            return Err(format!(
                "answer {answer:?} to {request:?}: count {count} after {p}, expected {}",
                p + 1
            ));
        }
    }
    Ok(count)
}

/// Sets an integer `IPPROTO_TCP` socket option on `s` (the fast-retransmission settings of
/// `demo-client` and `bench-failover`).
pub fn setsockopt_int(
    s: &std::net::TcpStream,
    opt: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `s` owns a valid socket, and `v` is a c_int that lives across the call, whose
    // size is the length passed.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn summary_of_odd_even_and_empty() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(summary(&[]).0.is_nan());
    }

    #[test]
    fn options_parse() {
        let o = parse_options_from(
            args(&["--runs", "5", "--cpu=none", "--rounds", "3"]),
            2,
            Some(1),
            &["--rounds"],
            "",
        )
        .unwrap();
        assert_eq!(o.runs, 5);
        assert_eq!(o.cpu, None);
        assert_eq!(o.extra("--rounds"), Some("3"));
        assert!(parse_options_from(args(&["--runs", "0"]), 2, None, &[], "").is_err());
        assert!(parse_options_from(args(&["--bogus"]), 2, None, &[], "").is_err());
        assert!(parse_options_from(args(&["--runs"]), 2, None, &[], "").is_err());
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }

    #[test]
    fn own_process_is_running() {
        assert!(!has_exited(std::process::id()));
    }

    #[test]
    fn numbers_and_durations_from_stderr_lines() {
        let l = "twinvm: output rule: 5120 bytes in 77 chunks held for the backup's ack: median 1.25ms, p99 40.00µs";
        assert_eq!(number_before(l, " bytes in "), Some(5120));
        assert_eq!(number_after(l, " bytes in "), Some(77));
        assert_eq!(number_before(l, "nothing"), None);
        assert_eq!(parse_debug_duration("1.25ms"), Some(1.25e-3));
        assert!((parse_debug_duration("40.00µs").unwrap() - 40e-6).abs() < 1e-12);
        assert_eq!(parse_debug_duration("2.50s"), Some(2.5));
        assert_eq!(parse_debug_duration("0ns"), Some(0.0));
        assert_eq!(parse_debug_duration("fast"), None);
    }

    #[test]
    fn interpolation_and_quantiles() {
        let s = [(0.0, 0.0), (1.0, 10.0), (3.0, 30.0)];
        assert_eq!(interpolate(&s, 0.5), Some(5.0));
        assert_eq!(interpolate(&s, 2.0), Some(20.0));
        assert_eq!(interpolate(&s, 3.0), Some(30.0));
        assert_eq!(interpolate(&s, -1.0), None);
        assert_eq!(interpolate(&s, 4.0), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.99), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn counter_answers_checked() {
        assert_eq!(check_counter_answer("7 req-7\n", "req-7", Some(6)), Ok(7));
        assert_eq!(check_counter_answer("1 req-1", "req-1", None), Ok(1));
        assert!(check_counter_answer("8 req-7", "req-7", Some(6)).is_err());
        assert!(check_counter_answer("7 req-6", "req-7", Some(6)).is_err());
        assert!(check_counter_answer("req-7", "req-7", None).is_err());
    }
}
