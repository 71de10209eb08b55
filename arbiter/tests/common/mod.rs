//! Helpers shared by the integration tests: start the real `twinvm-arbiter` binary on an
//! ephemeral loopback port, kill it for real, and talk raw HTTP to it.
#![allow(dead_code)]

pub mod etcd_cluster;
pub mod semantics;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arbiter::client::{BlockingClient, ClientConfig};
use arbiter::Token;

/// The token every test arbiter uses.
pub const TOKEN: &str = "test-token-3f9a1c0e5b7d2468ace0";

/// The arbiter binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_twinvm-arbiter")
}

/// Writes the test token to `dir/token` (mode 600) and returns its path.
pub fn write_token(dir: &Path) -> PathBuf {
    let path = dir.join("token");
    fs::write(&path, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A running arbiter child process; killed (SIGKILL) and reaped on drop, even if the test
/// panics. On panic the tail of its stderr is printed.
pub struct Arbiter {
    child: Option<Child>,
    /// `127.0.0.1:port` it listens on.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    stderr_path: PathBuf,
}

impl Arbiter {
    /// Starts an arbiter with `--token-file` on `data_dir`; the token file and stderr log
    /// live in `data_dir`'s parent.
    pub fn start(data_dir: &Path) -> Arbiter {
        let parent = data_dir.parent().unwrap();
        let token = write_token(parent);
        Arbiter::start_with(data_dir, &["--token-file", token.to_str().unwrap()])
            .expect("arbiter should start")
    }

    /// Starts an arbiter on `data_dir` with extra arguments; returns the stderr text if it
    /// exits before listening.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Result<Arbiter, String> {
        let parent = data_dir.parent().unwrap();
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let stderr_path = parent.join(format!("arbiter-stderr-{n}.log"));
        let stderr = fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(binary())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn twinvm-arbiter");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let mut arbiter = Arbiter {
            child: Some(child),
            addr: String::new(),
            data_dir: data_dir.to_owned(),
            stderr_path,
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let addr = line
                    .strip_prefix("listening on ")
                    .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
                arbiter.addr = addr.to_owned();
                Ok(arbiter)
            }
            Err(_) => {
                let status = arbiter.wait_exit(Duration::from_secs(10));
                Err(format!("exited ({status:?}): {}", arbiter.stderr()))
            }
        }
    }

    /// A blocking client with the right token and default retries.
    pub fn client(&self) -> BlockingClient {
        BlockingClient::new(self.addr.clone(), Some(Token::new(TOKEN).unwrap())).unwrap()
    }

    /// A blocking client with the given config.
    pub fn client_with(&self, config: ClientConfig) -> BlockingClient {
        BlockingClient::with_config(self.addr.clone(), Some(Token::new(TOKEN).unwrap()), config)
            .unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the arbiter wrote on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit(Duration::from_secs(20))
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.stderr();
            let tail: String = text
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("--- arbiter stderr (tail) ---\n{tail}\n---");
        }
    }
}

/// A raw HTTP answer: status (if any status line came back) and body.
#[derive(Debug)]
pub struct RawAnswer {
    /// Status code, `None` if the server closed without answering.
    pub status: Option<u16>,
    /// Header block, lower-cased.
    pub headers: String,
    /// Body text.
    pub body: String,
}

/// Sends `bytes` on a fresh connection (write errors ignored: the server may close early),
/// optionally half-closes, and reads the answer until EOF (bounded by a 10 s read timeout).
pub fn raw(addr: &str, bytes: &[u8], half_close: bool) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if let Some(answer) = parse_complete(&buf) {
            return answer;
        }
    }
    parse_complete(&buf).unwrap_or(RawAnswer {
        status: None,
        headers: String::new(),
        body: String::from_utf8_lossy(&buf).into_owned(),
    })
}

fn parse_complete(buf: &[u8]) -> Option<RawAnswer> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let headers = head.to_ascii_lowercase();
    let len: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    if body.len() < len {
        return None;
    }
    Some(RawAnswer {
        status: Some(status),
        headers,
        body: body[..len].to_owned(),
    })
}

/// A complete HTTP/1.1 request with `Connection: close`.
pub fn request(method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: arbiter\r\nConnection: close\r\n");
    if let Some(auth) = auth {
        out.push_str(&format!("Authorization: {auth}\r\n"));
    }
    out.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// `Bearer <TOKEN>`.
pub fn bearer() -> String {
    format!("Bearer {TOKEN}")
}
