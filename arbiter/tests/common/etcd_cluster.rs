//! A real etcd cluster on loopback for the tests and the benchmark: `n` members of Debian's
//! `etcd` (package `etcd-server`, installed by `scripts/install-deps`) on 127.0.0.1 with
//! distinct free ports and data directories in a temporary directory. Members can be
//! killed (SIGKILL) and restarted on the same ports and data. Every member is killed and
//! reaped, and the directory removed, when the cluster is dropped, even if a test panics.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbiter::etcd::{BlockingEtcdClient, Credentials, EtcdConfig, EtcdError};

/// The etcd binary: `$TWINVM_ETCD` if set, else `etcd` on `PATH`, else `/usr/bin/etcd`.
/// Panics with instructions if there is none: the tests never skip silently.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TWINVM_ETCD") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not installed: the etcd arbiter tests need a real etcd server. \
                 Run scripts/install-deps (it installs Debian's etcd-server package), or set \
                 TWINVM_ETCD to an etcd binary."
            )
        })
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; see the module documentation.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    binary: PathBuf,
    extra_args: Vec<String>,
    // Last, so that the members are killed before their directories are removed.
    dir: tempfile::TempDir,
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold every listener until all ports are picked so that they are distinct.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdCluster {
    /// Starts `n` members in a new temporary directory and waits (at most 30 s) until the
    /// cluster answers a linearizable read.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_in(n, &std::env::temp_dir())
    }

    /// Like [`EtcdCluster::start`], with the temporary directory under `parent`.
    pub fn start_in(n: usize, parent: &Path) -> EtcdCluster {
        EtcdCluster::start_with(n, parent, &[])
    }

    /// Like [`EtcdCluster::start_in`], with extra arguments for every member.
    pub fn start_with(n: usize, parent: &Path, extra_args: &[&str]) -> EtcdCluster {
        let binary = etcd_binary();
        let dir = tempfile::Builder::new()
            .prefix("twinvm-etcd-")
            .tempdir_in(parent)
            .expect("temporary directory");
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "twinvm-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            token,
            binary,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_ready(None, Duration::from_secs(30));
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        assert!(m.child.is_none(), "member {i} is running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.members[i].child = Some(child);
    }

    /// `127.0.0.1:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://127.0.0.1:p1,127.0.0.1:p2,...`, as given to the VMM's `--arbiter`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// A configuration for every member, with short timeouts fit for tests.
    pub fn config(&self, credentials: Option<Credentials>) -> EtcdConfig {
        let mut config = EtcdConfig::new(self.endpoints());
        config.credentials = credentials;
        config.connect_timeout = Duration::from_millis(500);
        config.request_timeout = Duration::from_millis(1500);
        config.attempts = 3;
        config
    }

    /// A blocking client of every member.
    pub fn client(&self, credentials: Option<Credentials>) -> BlockingEtcdClient {
        BlockingEtcdClient::connect(self.config(credentials)).expect("connect to etcd")
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its ports and data directory.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Waits (bounded by `limit`) until a linearizable read through every endpoint
    /// succeeds; panics with the members' logs otherwise.
    pub fn wait_ready(&self, credentials: Option<Credentials>, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last: Option<EtcdError> = None;
        for _ in 0..1000 {
            if Instant::now() > deadline {
                break;
            }
            let mut config = self.config(credentials.clone());
            config.attempts = 1;
            let ok = BlockingEtcdClient::connect(config).and_then(|c| c.get("ready-probe"));
            match ok {
                Ok(_) => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the etcd cluster did not become ready within {limit:?}: {last:?}\n{}",
            self.logs()
        );
    }

    /// The last lines of every member's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text = fs::read_to_string(&m.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ({}):\n", m.name, m.log.display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("etcd logs:\n{}", self.logs());
        }
    }
}
