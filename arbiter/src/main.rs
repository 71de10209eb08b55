//! `twinvm-arbiter`: the test-and-set service that keeps a twinvm pair from split brain.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arbiter::auth::{Auth, Token};
use arbiter::server::{Server, ServerConfig};
use arbiter::store::Store;
use clap::Parser;
use tracing::info;

const AFTER_HELP: &str = "\
Protocol: HTTP/1.1 with JSON bodies, e.g.
  curl -H \"Authorization: Bearer $(cat token)\" -H 'Content-Type: application/json' \\
       -d '{\"claimant\":\"host-a\",\"generation\":1}' \\
       http://arbiter:7420/v1/vms/vm1/test-and-set
Routes: POST /v1/vms/{vm}/test-and-set, POST /v1/vms/{vm}/re-pair, GET /v1/vms/{vm},
        GET /v1/vms, DELETE /v1/vms/{vm}, GET /v1/health (no token needed).

Running as a service (systemd; see arbiter/twinvm-arbiter.service and arbiter/README.md):
  install -m 755 target/release/twinvm-arbiter /usr/local/bin/
  install -d -m 700 /etc/twinvm && openssl rand -hex 32 > /etc/twinvm/arbiter.token
  chmod 600 /etc/twinvm/arbiter.token
  cp arbiter/twinvm-arbiter.service /etc/systemd/system/
  systemctl daemon-reload && systemctl enable --now twinvm-arbiter
Every decision is fsync'd to --data-dir before it is answered. SIGTERM or Ctrl-C stops
the service gracefully. Log verbosity: RUST_LOG (default info), logs go to stderr.";

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "twinvm-arbiter",
    version,
    about = "Durable test-and-set arbiter for twinvm fault-tolerant VM pairs",
    after_help = AFTER_HELP
)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout and in --port-file).
    #[arg(long, default_value = "0.0.0.0:7420")]
    listen: SocketAddr,

    /// Directory holding the decision log (created if missing).
    #[arg(long, default_value = "/var/lib/twinvm-arbiter")]
    data_dir: PathBuf,

    /// File holding the shared bearer token clients must send (required unless
    /// --insecure-no-auth).
    #[arg(long, required_unless_present = "insecure_no_auth")]
    token_file: Option<PathBuf>,

    /// Accept requests without a token. Anyone who can reach the port can then claim VMs.
    #[arg(long, conflicts_with = "token_file")]
    insecure_no_auth: bool,

    /// Write the bound address (`ip:port`) to this file once listening (atomically).
    #[arg(long)]
    port_file: Option<PathBuf>,

    /// Largest accepted request body in bytes.
    #[arg(long, default_value_t = arbiter::protocol::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,

    /// Most connections served at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

fn write_port_file(path: &Path, addr: SocketAddr) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C will stop gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let auth = match (&args.token_file, args.insecure_no_auth) {
        (Some(path), false) => Auth::Token(Token::from_file(path)?),
        (None, true) => Auth::Disabled,
        _ => bail!("give either --token-file or --insecure-no-auth"),
    };
    let store = {
        let dir = args.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .context("store task")?
            .with_context(|| format!("opening the store in {}", args.data_dir.display()))?
    };
    let mut config = ServerConfig::new(args.listen, auth);
    config.max_body_bytes = args.max_body_bytes;
    config.max_connections = args.max_connections.max(1);
    let server = Server::bind(config, Arc::new(store)).await?;
    let addr = server.local_addr()?;
    if let Some(path) = &args.port_file {
        write_port_file(path, addr)?;
    }
    info!(%addr, data_dir = %args.data_dir.display(), "twinvm-arbiter listening");
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}")?;
        stdout.flush()?;
    }
    server.serve(shutdown_signal()).await?;
    info!("stopped");
    Ok(())
}
