//! Helpers shared by the end-to-end tests and benchmarks: finding the built `twinvm` binary
//! and the guest image, and driving a real `twinvm` process through its serial console.
//!
//! Every process started here is killed when its handle is dropped, so a failing test leaves
//! no guest behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub mod bench;
pub mod chaos;
pub mod netns;
pub mod snapshots;
pub mod soak;
pub mod timecheck;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory of the target profile the running test was built in (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a binary built in this workspace (`twinvm`, `twinvm-arbiter`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = profile_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// The guest image directory: `$TWINVM_GUEST_DIR`, or `guest-images/out`.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("TWINVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("guest-images/out"));
    assert!(
        dir.join("vmlinux").exists() && dir.join("initramfs.cpio").exists(),
        "no guest image in {}: build it with guest-images/build.sh (scripts/test does)",
        dir.display()
    );
    dir
}

/// The prompt of the guest's interactive shell.
pub const PROMPT: &str = "twinvm# ";

/// Generous bound for a guest boot on the software KVM here (about a minute when the machine
/// is quiet); only a guard against hanging forever, never a measurement.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A running `twinvm` process with its console captured.
pub struct Vm {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// When the process was started.
    pub started: Instant,
    /// Its process id.
    pub pid: u32,
}

fn capture(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Vm {
    /// Starts `twinvm` with `args`, its console on pipes.
    pub fn spawn(args: &[&str]) -> Vm {
        Self::spawn_in(None, args)
    }

    /// Starts `twinvm` with `args` inside network namespace `netns` (through `ip netns
    /// exec`, which execs twinvm in place: the pid is twinvm's).
    pub fn spawn_in(netns: Option<&str>, args: &[&str]) -> Vm {
        let bin = workspace_bin("twinvm");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .args(args)
            .env("TWINVM_GUEST_DIR", guest_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twinvm");
        let out = capture(child.stdout.take().unwrap());
        let err = capture(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let pid = child.id();
        Vm {
            child: Some(child),
            stdin,
            out,
            err,
            started: Instant::now(),
            pid,
        }
    }

    /// Everything the guest printed so far, lossily as text.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything the VMM printed on standard error so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until the console output, from byte `from` on, contains `needle`; returns the
    /// offset just past it. Panics with the console so far if `timeout` passes first or the
    /// process exits.
    pub fn wait_for(&mut self, needle: &str, from: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                if out.len() > from {
                    if let Some(i) = find(&out[from..], needle.as_bytes()) {
                        return from + i + needle.len();
                    }
                }
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "twinvm exited ({status}) before printing {needle:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {needle:?} on the console after {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the VMM's standard error contains `needle`; returns the rest of the line
    /// after it. Panics after `timeout` or if the process exits first.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let err = self.stderr();
            if let Some(i) = err.find(needle) {
                let rest = &err[i + needle.len()..];
                return rest.lines().next().unwrap_or("").to_string();
            }
            if let Some(status) = self.try_wait() {
                // Let the capture thread take the last bytes (the error line comes last).
                std::thread::sleep(Duration::from_millis(300));
                let err = self.stderr();
                panic!("twinvm exited ({status}) before printing {needle:?} on stderr:\n{err}");
            }
            if Instant::now() > deadline {
                panic!("no {needle:?} on stderr after {timeout:?}:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the VMM process.
    pub fn freeze(&self, frozen: bool) {
        self.signal(if frozen { libc::SIGSTOP } else { libc::SIGCONT });
    }

    /// Bytes of console output so far.
    pub fn console_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Types `text` at the guest's console.
    pub fn type_text(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write to twinvm");
        stdin.flush().expect("flush");
    }

    /// Sends a signal to the VMM process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.try_wait()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                // Let the capture threads take the last bytes.
                std::thread::sleep(Duration::from_millis(100));
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "twinvm did not exit within {timeout:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Runs `twinvm ARGS` to its end, typing `input` at its console first (then closing it), and
/// returns its status and output.
pub fn twinvm_typing(args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(workspace_bin("twinvm"))
        .args(args)
        .env("TWINVM_GUEST_DIR", guest_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twinvm");
    let mut stdin = child.stdin.take().unwrap();
    // A VMM that fails at once has closed its end: its status says why.
    let _ = std::io::Write::write_all(&mut stdin, input.as_bytes());
    drop(stdin);
    child.wait_with_output().expect("wait for twinvm")
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Resident set size of a process and the resident part of its largest mapping (the guest
/// memory), in KiB, from /proc/PID/smaps.
pub fn rss_split(pid: u32) -> std::io::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut total = 0u64;
    let mut largest = (0u64, 0u64); // (size, rss)
    let mut cur_size = 0u64;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => cur_size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += rss;
                if cur_size > largest.0 {
                    largest = (cur_size, rss);
                }
            }
            _ => {}
        }
    }
    Ok((total, largest.1))
}
