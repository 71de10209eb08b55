//! Test hosts on one machine: network namespaces made by the test, joined by a bridge in a
//! "switch" namespace, addresses from 198.18.0.0/15 (DESIGN.md, Test topology). Everything
//! is removed when the [`Topology`] is dropped, also when a test fails.
//!
//! Each host namespace has `eth0` (a veth into the switch's bridge). A host that runs a
//! guest (`with_tap`) has instead a bridge `br0` holding `eth0` and the guest's TAP `tap0`,
//! with the host's address on `br0`, so the guest is on the same segment as every host.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The prefix length of the test segment.
pub const PREFIX: u8 = 24;
/// The guest's address on the test segment.
pub const GUEST_IP: &str = "198.18.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host of a topology.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub netns: String,
    /// Its address on the segment.
    pub addr: String,
}

/// Namespaces, veths, bridges and TAPs of one test.
#[derive(Debug)]
pub struct Topology {
    id: u32,
    switch: String,
    hosts: Vec<Host>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// A switch namespace with its bridge; hosts are added with [`Topology::host`].
    pub fn new() -> Topology {
        let id = SEQ.fetch_add(1, Ordering::Relaxed);
        let switch = format!("tw{}-{id}-sw", std::process::id());
        ip(&["netns", "add", &switch]);
        let t = Topology {
            id,
            switch,
            hosts: Vec::new(),
        };
        ip(&["-n", &t.switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &t.switch, "link", "set", "br0", "up"]);
        t
    }

    /// Adds host `name` with address 198.18.0.`octet`; with `with_tap`, also the guest's
    /// TAP `tap0` bridged to the segment.
    pub fn host(&mut self, name: &str, octet: u8, with_tap: bool) -> Host {
        let n = self.hosts.len();
        let netns = format!("{}-{name}", self.switch.trim_end_matches("-sw"));
        ip(&["netns", "add", &netns]);
        let host = Host {
            netns: netns.clone(),
            addr: format!("198.18.0.{octet}"),
        };
        self.hosts.push(host.clone());
        // Interface names are at most 15 bytes.
        let outer = format!("tw{}h{n}p{}", self.id % 100, std::process::id() % 10_000);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &outer, "netns", &self.switch]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &outer,
            "master",
            "br0",
            "up",
        ]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let cidr = format!("{}/{PREFIX}", host.addr);
        if with_tap {
            ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", &netns, "link", "set", "eth0", "master", "br0", "up"]);
            ip(&["-n", &netns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
            ip(&["-n", &netns, "link", "set", "tap0", "master", "br0", "up"]);
            ip(&["-n", &netns, "addr", "add", &cidr, "dev", "br0"]);
            ip(&["-n", &netns, "link", "set", "br0", "up"]);
        } else {
            ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        }
        host
    }

    /// A direct link `lc0` between hosts `a` and `b` (a veth pair), with addresses
    /// 198.19.0.1 on `a` and 198.19.0.2 on `b`: a private path for the log channel that a
    /// test can cut without cutting either host off the segment.
    pub fn direct_link(&mut self, a: &Host, b: &Host) -> (String, String) {
        ip(&[
            "-n", &a.netns, "link", "add", "lc0", "type", "veth", "peer", "name", "lc0", "netns",
            &b.netns,
        ]);
        ip(&["-n", &a.netns, "addr", "add", "198.19.0.1/30", "dev", "lc0"]);
        ip(&["-n", &b.netns, "addr", "add", "198.19.0.2/30", "dev", "lc0"]);
        ip(&["-n", &a.netns, "link", "set", "lc0", "up"]);
        ip(&["-n", &b.netns, "link", "set", "lc0", "up"]);
        ("198.19.0.1".to_string(), "198.19.0.2".to_string())
    }

    /// Runs a command inside `host`'s namespace.
    pub fn exec(host: &Host, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &host.netns])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }

    /// Drops (`on`) or stops dropping everything `host` sends to `to`, with a blackhole
    /// route: a one-way cut (what `to` sends still arrives).
    pub fn blackhole(host: &Host, to: &str, on: bool) {
        let dst = format!("{to}/32");
        ip(&[
            "-n",
            &host.netns,
            "route",
            if on { "add" } else { "del" },
            "blackhole",
            &dst,
        ]);
    }

    /// Takes a link of `host` down or up (to cut it off).
    pub fn set_link(host: &Host, dev: &str, up: bool) {
        ip(&[
            "-n",
            &host.netns,
            "link",
            "set",
            dev,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, bridges and TAPs with it.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.netns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
    }
}

/// Connects to `addr` from inside `host`'s namespace: the connecting thread enters the
/// namespace (setns affects only that thread), so the socket lives there.
pub fn connect_from(
    host: &Host,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let path = format!("/run/netns/{}", host.netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .expect("connect thread")
    })
}

/// A `twinvm-arbiter` process in a test namespace, killed when dropped.
#[derive(Debug)]
pub struct ArbiterProcess {
    child: Child,
    /// Its address, HOST:PORT.
    pub addr: String,
    /// Its token file.
    pub token: String,
}

impl Drop for ArbiterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `twinvm-arbiter` on port 7500 of `host`, with its data and token in `dir`. The
/// token file is written (mode 0600) only if missing, so an arbiter restarted on the same
/// `dir` keeps its token and its decisions.
pub fn start_arbiter(host: &Host, dir: &Path) -> std::io::Result<ArbiterProcess> {
    start_arbiter_logged(host, dir, None)
}

/// [`start_arbiter`], appending the arbiter's log (its decisions, at level info, without
/// colours) to `log` if given.
pub fn start_arbiter_logged(
    host: &Host,
    dir: &Path,
    log: Option<&Path>,
) -> std::io::Result<ArbiterProcess> {
    let token = dir.join("arbiter.token");
    if !token.exists() {
        std::fs::write(&token, format!("twinvm-test-secret-{}", std::process::id()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    let addr = format!("{}:7500", host.addr);
    let child = Command::new("ip")
        .args(["netns", "exec", &host.netns])
        .arg(crate::workspace_bin("twinvm-arbiter"))
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir.join("arbiter-data"))
        .arg("--token-file")
        .arg(&token)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(match log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Stdio::null(),
        })
        .spawn()?;
    let token = token
        .to_str()
        .ok_or_else(|| std::io::Error::other("non-UTF-8 temp path"))?
        .to_string();
    Ok(ArbiterProcess { child, addr, token })
}
