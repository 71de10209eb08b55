//! Benchmark of the arbiter with durability on, side by side with the etcd backend: starts
//! the real `twinvm-arbiter` binary (or, if it has not been built, the same server
//! in-process) on loopback with a fresh data directory, and a 3-member etcd cluster
//! (Debian's `etcd`, also on loopback, data in the same parent directory); runs the same
//! phases of concurrent clients, a bounded number of operations each, against both; prints
//! operations per second and latency percentiles, then a summary of claims per second and
//! p99 per backend.
//!
//! ```sh
//! cargo build --release -p twinvm-arbiter
//! cargo run --release -p twinvm-arbiter --example bench -- --clients 32 --ops 200
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::auth::{Auth, Token};
use arbiter::etcd::{EtcdClient, EtcdConfig};
use arbiter::server::{Server, ServerConfig};
use arbiter::store::Store;
use arbiter::{Client, Outcome};
use clap::Parser;

#[path = "../tests/common/etcd_cluster.rs"]
mod etcd_cluster;

/// Benchmark options.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent clients in the concurrent phases.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Operations per client in each phase.
    #[arg(long, default_value_t = 200)]
    ops: usize,
    /// Parent of the data directory (default: the system temp dir); put it on the disk you
    /// want to measure, not on tmpfs.
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// The arbiter binary (default: `twinvm-arbiter` next to this example's directory).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Members of the etcd cluster benchmarked beside the standalone arbiter (0: no etcd).
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
}

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Kills the server child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Throughput and p99 of one phase.
#[derive(Debug, Clone, Copy)]
struct Figures {
    ops_per_sec: f64,
    p99: Duration,
}

fn report(name: &str, clients: usize, elapsed: Duration, mut lat: Vec<Duration>) -> Figures {
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<52} clients {clients:>3}  ops {:>6}  {:>9.0} ops/s  p50 {:>7.0} us  p90 {:>7.0} us  p99 {:>7.0} us  max {:>7.0} us",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        us(percentile(&lat, 0.50)),
        us(percentile(&lat, 0.90)),
        us(percentile(&lat, 0.99)),
        us(*lat.last().unwrap()),
    );
    Figures {
        ops_per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p99: percentile(&lat, 0.99),
    }
}

/// One of the two backends.
#[derive(Debug, Clone)]
enum Backend {
    Standalone(Client),
    Etcd(EtcdClient),
}

impl Backend {
    async fn claim(&self, vm: &str, claimant: &str, generation: u64) -> Outcome {
        match self {
            Backend::Standalone(c) => {
                c.test_and_set(vm, claimant, generation)
                    .await
                    .unwrap()
                    .outcome
            }
            Backend::Etcd(c) => {
                c.test_and_set(vm, claimant, generation)
                    .await
                    .unwrap()
                    .outcome
            }
        }
    }

    async fn re_pair(&self, vm: &str, claimant: &str, generation: u64) -> u64 {
        match self {
            Backend::Standalone(c) => {
                c.re_pair(vm, claimant, generation)
                    .await
                    .unwrap()
                    .generation
            }
            Backend::Etcd(c) => {
                c.re_pair(vm, claimant, generation)
                    .await
                    .unwrap()
                    .generation
            }
        }
    }

    async fn count(&self) -> usize {
        match self {
            Backend::Standalone(c) => c.list().await.unwrap().vms.len(),
            Backend::Etcd(c) => c.list().await.unwrap().vms.len(),
        }
    }
}

/// Runs `clients` tasks of `ops` operations each; `op(client, i)` is one operation.
async fn phase<F, Fut>(name: &str, clients: usize, ops: usize, client: &Backend, op: F) -> Figures
where
    F: Fn(Backend, usize, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, op) = (client.clone(), op.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(ops);
                for i in 0..ops {
                    let t = Instant::now();
                    op(client.clone(), c, i).await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    report(name, clients, started.elapsed(), all)
}

/// The phases, the same for every backend; returns the figures of the summary: sequential,
/// parallel and contended claims.
async fn run_phases(label: &str, client: &Backend, clients: usize, ops: usize) -> [Figures; 3] {
    let name = |what: &str| format!("{label}: {what}");
    let sequential = phase(
        &name("claim, new VM"),
        1,
        ops,
        client,
        |c, _, i| async move {
            assert_eq!(c.claim(&format!("seq-{i}"), "a", 1).await, Outcome::Won);
        },
    )
    .await;
    let parallel = phase(
        &name("claim, new VM"),
        clients,
        ops,
        client,
        |c, n, i| async move {
            assert_eq!(c.claim(&format!("par-{n}-{i}"), "a", 1).await, Outcome::Won);
        },
    )
    .await;
    let contended = phase(
        &name("claim, all on one VM"),
        clients,
        ops,
        client,
        |c, n, _| async move {
            let outcome = c.claim("hot", &format!("c{n}"), 1).await;
            assert!(matches!(outcome, Outcome::Won | Outcome::Lost));
        },
    )
    .await;
    phase(
        &name("re-pair + claim of the new generation"),
        clients,
        ops / 2,
        client,
        |c, n, i| async move {
            let vm = format!("par-{n}-{i}");
            let g = c.re_pair(&vm, "a", 1).await;
            assert_eq!(c.claim(&vm, "b", g).await, Outcome::Won);
        },
    )
    .await;
    println!("{label}: entries at the end: {}", client.count().await);
    [sequential, parallel, contended]
}

/// Raw cost of a small append + fdatasync in the data directory, for reference.
fn fsync_reference(dir: &std::path::Path) -> Duration {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        f.write_all(&[0u8; 128]).unwrap();
        f.sync_data().unwrap();
    }
    let per = started.elapsed() / n;
    let _ = std::fs::remove_file(path);
    per
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let parent = args.data_parent.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("arbiter-bench-")
        .tempdir_in(&parent)?;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data)?;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, TOKEN)?;
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    println!(
        "data dir {} (append+fdatasync of 128 B there: {:.0} us)",
        data.display(),
        fsync_reference(&data).as_secs_f64() * 1e6
    );

    let default_bin = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("twinvm-arbiter"));
    let bin = args
        .server_bin
        .clone()
        .or(default_bin)
        .filter(|b| b.exists());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Keep the in-process server (if used) on its own runtime, apart from the clients.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut _guard = None;
    let addr = match &bin {
        Some(bin) => {
            let mut child = Command::new(bin)
                .args(["--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&data)
                .arg("--token-file")
                .arg(&token_file)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().unwrap();
            _guard = Some(ChildGuard(child));
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .ok_or_else(|| anyhow::anyhow!("server said {line:?}"))?
                .to_owned();
            println!("server: {} (separate process) on {addr}", bin.display());
            addr
        }
        None => {
            let store = Arc::new(Store::open(&data)?);
            let config = ServerConfig::new("127.0.0.1:0".parse()?, Auth::Token(Token::new(TOKEN)?));
            let server = server_runtime.block_on(Server::bind(config, store))?;
            let addr = server.local_addr()?.to_string();
            server_runtime.spawn(server.serve(std::future::pending()));
            println!(
                "server: in-process (no twinvm-arbiter binary found; build it with \
                 `cargo build --release -p twinvm-arbiter` to bench the real process) on {addr}"
            );
            addr
        }
    };
    let standalone = Backend::Standalone(Client::new(addr, Some(Token::new(TOKEN)?)));
    let (clients, ops) = (args.clients.max(1), args.ops.max(1));
    let mut summary = Vec::new();
    runtime.block_on(async {
        if let Backend::Standalone(c) = &standalone {
            c.health().await.expect("server answers");
        }
        summary.push((
            "twinvm-arbiter",
            run_phases("standalone", &standalone, clients, ops).await,
        ));
    });
    drop(_guard);

    if args.etcd_members > 0 {
        let cluster = etcd_cluster::EtcdCluster::start_in(args.etcd_members, &parent);
        println!(
            "etcd: {} members of {} on {} (data in {})",
            args.etcd_members,
            etcd_cluster::etcd_binary().display(),
            cluster.url(),
            cluster.dir().display()
        );
        runtime.block_on(async {
            let etcd = Backend::Etcd(
                EtcdClient::connect(EtcdConfig::new(cluster.endpoints()))
                    .await
                    .expect("connect to etcd"),
            );
            summary.push(("etcd", run_phases("etcd", &etcd, clients, ops).await));
        });
    }

    println!();
    println!(
        "{:<16} {:>22} {:>30} {:>30}",
        "backend", "1 client: claims/s, p99", "parallel: claims/s, p99", "one VM: claims/s, p99"
    );
    for (backend, figures) in summary {
        let cell = |f: Figures| {
            format!(
                "{:>8.0} /s {:>8.1} ms",
                f.ops_per_sec,
                f.p99.as_secs_f64() * 1e3
            )
        };
        println!(
            "{backend:<16} {:>22} {:>30} {:>30}",
            cell(figures[0]),
            cell(figures[1]),
            cell(figures[2])
        );
    }
    Ok(())
}
