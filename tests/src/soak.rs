//! The determinism soak (issue 10): workloads kept in the guest image
//! (`/usr/share/twinvm/run/soak-*`), each recorded once and replayed several ways: on the
//! CPU twinvm chooses itself, pinned explicitly, and with the host loaded by competing
//! processes. A replay counts as matched when it exits 0, every digest of the log matched,
//! and its console output is the recording's byte for byte.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use logchannel::entry::Entry;
use logchannel::file::LogReader;

use crate::{guest_dir, workspace_bin};

/// One workload of the soak.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its name (the run script is `soak-NAME`, or `NAME` for the image's older ones).
    pub name: &'static str,
    /// Extra `twinvm record` arguments (memory size, the run script).
    pub args: Vec<String>,
    /// Console input typed while it runs (the interactive shell), with a pause before each.
    pub typed: Vec<(Duration, &'static str)>,
}

/// Every workload of the full soak.
pub fn workloads() -> Vec<Workload> {
    let run = |name: &'static str, script: &str, extra: &[&str]| {
        let mut args = vec!["--append".to_string(), format!("twinvm.run={script}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        Workload {
            name,
            args,
            typed: Vec::new(),
        }
    };
    vec![
        run("forks", "soak-forks", &[]),
        run("pipes", "soak-pipes", &[]),
        run("gzip", "soak-gzip", &[]),
        run("tmpfs", "soak-tmpfs", &[]),
        run("mmap", "soak-mmap", &[]),
        run("memory", "soak-memory", &["--mem", "64"]),
        run("timers", "soak-timers", &[]),
        run("mixed", "soak-mixed", &[]),
        run("hostile", "hostile", &[]),
        Workload {
            name: "shell",
            args: Vec::new(),
            typed: vec![
                (
                    Duration::from_secs(0),
                    "echo typed-1; ls /usr/share/twinvm/run | wc -l\n",
                ),
                (
                    Duration::from_secs(2),
                    "for i in 1 2 3; do echo loop $i; done\n",
                ),
                (
                    Duration::from_secs(1),
                    "cat /proc/uptime >/dev/null; echo typed-3\n",
                ),
                (Duration::from_secs(1), "exit\n"),
            ],
        },
    ]
}

/// What one replay showed.
#[derive(Debug, Clone)]
pub struct ReplayResult {
    /// How it was run.
    pub how: &'static str,
    /// Whether it matched (exit 0, every digest, the console).
    pub matched: bool,
    /// Why not, if it did not.
    pub why: String,
}

/// A soak run's per-workload results.
#[derive(Debug, Clone)]
pub struct WorkloadResult {
    /// The workload.
    pub name: &'static str,
    /// Positions of the recording.
    pub digests: usize,
    /// Seconds the recording took.
    pub record_s: f64,
    /// The replays.
    pub replays: Vec<ReplayResult>,
    /// Set if the recording itself failed.
    pub record_error: Option<String>,
}

/// A competing host load: one busy process per host CPU, killed on drop.
pub struct HostLoad(Vec<Child>);

impl HostLoad {
    /// Starts `n` busy processes.
    pub fn start(n: usize) -> HostLoad {
        HostLoad(
            (0..n)
                .filter_map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect(),
        )
    }
}

impl Drop for HostLoad {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a finished `twinvm` printed.
struct Output {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `twinvm` with `args`; each line of `typed` is typed after the shell's next prompt
/// (and its pause), as a person would.
fn twinvm(args: &[String], typed: &[(Duration, &str)]) -> std::io::Result<Output> {
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let mut child = Command::new(workspace_bin("twinvm"))
        .args(args)
        .env("TWINVM_GUEST_DIR", guest_dir())
        .stdin(if typed.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().expect("piped");
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    if let Some(mut stdin) = child.stdin.take() {
        let typed: Vec<(Duration, String)> =
            typed.iter().map(|(d, s)| (*d, s.to_string())).collect();
        let seen = out.clone();
        std::thread::spawn(move || {
            let prompts = |n: usize| {
                let deadline = Instant::now() + Duration::from_secs(600);
                while Instant::now() < deadline {
                    let o = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if o.windows(crate::PROMPT.len())
                        .filter(|w| *w == crate::PROMPT.as_bytes())
                        .count()
                        >= n
                    {
                        return true;
                    }
                    drop(o);
                    std::thread::sleep(Duration::from_millis(100));
                }
                false
            };
            for (i, (pause, line)) in typed.into_iter().enumerate() {
                if !prompts(i + 1) {
                    break;
                }
                std::thread::sleep(pause);
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    let status = child.wait()?;
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let stdout = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Output {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Records `w` into `dir` and replays it `replays` times (the first on the CPU twinvm picks,
/// the second pinned to the recording's CPU explicitly, the others with the host loaded).
pub fn soak_one(w: &Workload, dir: &Path, replays: usize) -> WorkloadResult {
    let log = dir.join(format!("{}.log", w.name));
    let mut args = vec![
        "record".to_string(),
        "--log".to_string(),
        log.display().to_string(),
        "--digest-interval".to_string(),
        "1000".to_string(),
    ];
    args.extend(w.args.iter().cloned());
    let t0 = Instant::now();
    let rec = match twinvm(&args, &w.typed) {
        Ok(o) => o,
        Err(e) => return failed(w, format!("cannot run twinvm: {e}")),
    };
    let record_s = t0.elapsed().as_secs_f64();
    let rec_err = rec.stderr.clone();
    if rec.code != Some(0) {
        return failed(
            w,
            format!("record exited {:?}: {}", rec.code, last_line(&rec_err)),
        );
    }
    let cpu = rec_err
        .split("pinned to host CPU ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .map(str::to_string);
    let digests = match LogReader::open(&log) {
        Ok(r) => r.filter(|e| matches!(e, Ok(Entry::Digest(_)))).count(),
        Err(e) => return failed(w, format!("cannot read the log: {e}")),
    };
    let mut results = Vec::new();
    for i in 0..replays {
        let mut args = vec![
            "replay".to_string(),
            "--log".to_string(),
            log.display().to_string(),
        ];
        let how = match i {
            0 => "auto CPU",
            1 => "pinned",
            _ => "host loaded",
        };
        if i == 1 {
            if let Some(c) = &cpu {
                args.extend(["--cpu".to_string(), c.clone()]);
            }
        }
        let _load = (i >= 2).then(|| HostLoad::start(2));
        let r = match twinvm(&args, &[]) {
            Ok(o) => o,
            Err(e) => {
                results.push(ReplayResult {
                    how,
                    matched: false,
                    why: format!("cannot run twinvm: {e}"),
                });
                continue;
            }
        };
        let err = r.stderr.clone();
        let why = if r.code != Some(0) {
            format!("exit {:?}: {}", r.code, first_divergence(&err))
        } else if !err.contains(&format!("{digests} state digests matched")) {
            format!("not every digest matched: {}", last_line(&err))
        } else if r.stdout != rec.stdout {
            "console output differs from the recording".to_string()
        } else {
            String::new()
        };
        results.push(ReplayResult {
            how,
            matched: why.is_empty(),
            why,
        });
    }
    WorkloadResult {
        name: w.name,
        digests,
        record_s,
        replays: results,
        record_error: None,
    }
}

fn failed(w: &Workload, why: String) -> WorkloadResult {
    WorkloadResult {
        name: w.name,
        digests: 0,
        record_s: 0.0,
        replays: Vec::new(),
        record_error: Some(why),
    }
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

fn first_divergence(s: &str) -> String {
    match s.find("replay diverged") {
        Some(i) => s[i..].lines().take(4).collect::<Vec<_>>().join(" | "),
        None => last_line(s).to_string(),
    }
}

/// A scratch directory for a soak's logs (kept for inspection).
pub fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("twinvm-soak-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}
