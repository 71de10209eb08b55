//! Guest time against host time: runs the `time` workload of the guest image
//! (`twinvm.run=time`, see `guest-images/initramfs/usr/share/twinvm/run/time`) under a
//! `twinvm` mode, timestamps every console line as it arrives, and compares the guest's
//! clocks (`clock LABEL mono .. real .. uptime ..` lines) with the host's. Used by
//! `tests/guest_time.rs` and `bench-time`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{guest_dir, workspace_bin};

/// One console line and when the host saw it (seconds since the process was spawned).
#[derive(Debug, Clone)]
pub struct Line {
    /// Host time, in seconds since spawning `twinvm`.
    pub at: f64,
    /// The line, without its line ending.
    pub text: String,
}

/// A finished `twinvm` process.
#[derive(Debug)]
pub struct TimedRun {
    /// Console lines, timestamped.
    pub lines: Vec<Line>,
    /// Everything the guest printed, byte for byte.
    pub console: Vec<u8>,
    /// The VMM's standard error.
    pub stderr: String,
    /// Exit code.
    pub code: Option<i32>,
    /// Wall time from spawn to exit, in seconds.
    pub wall: f64,
}

/// Runs `twinvm ARGS` to its end (with `timeout` as a guard), timestamping console lines.
pub fn run_timed(args: &[&str], timeout: Duration) -> TimedRun {
    run_timed_typing(args, "", timeout)
}

/// [`run_timed`], typing `input` at the guest's console first (a guest restored at its
/// prompt is given its workload this way).
pub fn run_timed_typing(args: &[&str], input: &str, timeout: Duration) -> TimedRun {
    let t0 = Instant::now();
    let mut child = Command::new(workspace_bin("twinvm"))
        .args(args)
        .env("TWINVM_GUEST_DIR", guest_dir())
        .stdin(if input.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twinvm");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        // A VMM that fails at once has closed its end: its status says why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<(f64, Vec<u8>)>();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if tx
                .send((t0.elapsed().as_secs_f64(), chunk[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = t0 + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for twinvm") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    reader.join().expect("console reader");
    let stderr = err_reader.join().expect("stderr reader");
    let mut console = Vec::new();
    let mut lines = Vec::new();
    let mut partial = Vec::new();
    for (at, bytes) in rx.try_iter() {
        console.extend_from_slice(&bytes);
        for b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&partial)
                    .trim_end_matches('\r')
                    .to_string();
                lines.push(Line { at, text });
                partial.clear();
            } else {
                partial.push(b);
            }
        }
    }
    assert!(
        status.is_some(),
        "twinvm {args:?} did not finish within {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{stderr}",
        String::from_utf8_lossy(&console)
    );
    TimedRun {
        lines,
        console,
        stderr,
        code: status.and_then(|s| s.code()),
        wall,
    }
}

/// One `clock` line of the guest: its clocks, and when the host saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The line's label (`start`, `r1-slept`, ..., `end`).
    pub label: String,
    /// Host seconds since spawn.
    pub host: f64,
    /// Guest CLOCK_MONOTONIC, seconds.
    pub mono: f64,
    /// Guest CLOCK_REALTIME, seconds since the epoch.
    pub real: f64,
    /// Guest /proc/uptime, seconds.
    pub uptime: f64,
}

/// Parses `clock LABEL mono A real B uptime C` from a console line.
pub fn parse_sample(line: &Line) -> Option<Sample> {
    // The line may carry console noise (escape sequences) in front of the `clock` word.
    let at = line.text.find("clock ")?;
    let mut it = line.text[at..].split_whitespace().skip(1);
    let label = it.next()?.to_string();
    let mut num = |key: &str| -> Option<f64> {
        if it.next()? != key {
            return None;
        }
        it.next()?.parse().ok()
    };
    Some(Sample {
        label,
        mono: num("mono")?,
        real: num("real")?,
        uptime: num("uptime")?,
        host: line.at,
    })
}

/// Every `clock` sample of a run, in order.
pub fn samples(run: &TimedRun) -> Vec<Sample> {
    run.lines.iter().filter_map(parse_sample).collect()
}

/// Guest elapsed time against host elapsed time between the first and the last sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    /// Host seconds between the samples.
    pub host: f64,
    /// CLOCK_MONOTONIC seconds between them.
    pub mono: f64,
    /// CLOCK_REALTIME seconds.
    pub real: f64,
    /// /proc/uptime seconds.
    pub uptime: f64,
    /// The largest |guest - host| over any two consecutive samples, in seconds (monotonic).
    pub worst_step: f64,
}

impl Drift {
    /// (guest / host - 1) in percent, for the monotonic clock.
    pub fn mono_pct(&self) -> f64 {
        100.0 * (self.mono / self.host - 1.0)
    }

    /// The same for CLOCK_REALTIME.
    pub fn real_pct(&self) -> f64 {
        100.0 * (self.real / self.host - 1.0)
    }

    /// The same for /proc/uptime.
    pub fn uptime_pct(&self) -> f64 {
        100.0 * (self.uptime / self.host - 1.0)
    }
}

/// The drift over `samples` (at least two).
pub fn drift(samples: &[Sample]) -> Option<Drift> {
    let (a, b) = (samples.first()?, samples.last()?);
    if samples.len() < 2 || b.host <= a.host {
        return None;
    }
    let worst_step = samples
        .windows(2)
        .map(|w| ((w[1].mono - w[0].mono) - (w[1].host - w[0].host)).abs())
        .fold(0.0, f64::max);
    Some(Drift {
        host: b.host - a.host,
        mono: b.mono - a.mono,
        real: b.real - a.real,
        uptime: b.uptime - a.uptime,
        worst_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clock_lines_and_computes_drift() {
        let l = |at: f64, text: &str| Line {
            at,
            text: text.to_string(),
        };
        let a = parse_sample(&l(
            10.0,
            "clock start mono 5.000000000 real 1796168879.000000000 uptime 5.00",
        ))
        .unwrap();
        let b = parse_sample(&l(
            20.0,
            "\u{1b}[0mclock end mono 15.100000000 real 1796168889.100000000 uptime 15.10",
        ))
        .unwrap();
        assert_eq!(a.label, "start");
        assert_eq!(b.label, "end");
        assert!(parse_sample(&l(1.0, "awk 12")).is_none());
        let d = drift(&[a, b]).unwrap();
        assert!((d.mono_pct() - 1.0).abs() < 1e-6);
        assert!((d.real_pct() - 1.0).abs() < 1e-4);
        assert!((d.worst_step - 0.1).abs() < 1e-6);
    }
}
