//! `twinvm`: the command-line front of the VMM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use logchannel::entry::{LogHeader, Position};
use vmm::console::{spawn_stdin_forwarder, TerminalGuard};
use vmm::ft::output::{spawn_output_releaser, Decision, HeldOutput, SharedDecision};
use vmm::ft::Role;
use vmm::machine::{HostEvent, Machine, RunOutcome, SnapshotRequest, VmConfig};
use vmm::rr::{Mode, Recorder, Replayer, RrError};
use vmm::snapshot::{hex, Snapshot};

/// Exit status when the guest powered off.
const EXIT_POWEROFF: u8 = 0;
/// Exit status on a VMM error (the message is on standard error).
const EXIT_ERROR: u8 = 1;
/// Exit status of a side of a pair that lost its peer and was not allowed to go on alone.
const EXIT_HALTED: u8 = 4;
/// Exit status of a replay, or a live backup, whose guest stopped matching the log.
const EXIT_DIVERGED: u8 = 5;
/// Exit status of a side of a pair that lost its peer and whose claim the arbiter refused
/// (a configuration error such as a wrong token): halted at once, without retrying.
const EXIT_ARBITER_REFUSED: u8 = 6;
/// Exit status when the guest reset the machine (reboot, triple fault, or a panic with
/// `panic=-1`).
const EXIT_RESET: u8 = 3;

/// twinvm: a fault-tolerant virtual machine for KVM.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_help = EXIT_HELP)]
struct Cli {
    /// Log filter for the VMM's own messages (standard error), e.g. `info` or `vmm=debug`.
    #[arg(long, global = true, env = "TWINVM_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

const EXIT_HELP: &str = "Exit status: 0 the guest powered off (or a replay reached the recorded stop); 3 the guest rebooted or reset; \
4 halted after losing the peer of a pair without winning the arbiter; \
5 a replay or a live backup diverged from the log (reported with the position and what differed); \
6 halted after losing the peer because the arbiter refused the claim (a wrong token, a bad id, a generation not open); \
128+N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM); 1 an error (one line on stderr).";

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest with its serial console on this terminal (type into the guest's shell;
    /// Ctrl-C stops the VM).
    Run(GuestArgs),
    /// Like `run`, and write every non-deterministic input to a log that `replay` can feed
    /// to a fresh guest.
    Record(RecordArgs),
    /// Run a fresh guest from the kernel, initrd and command line of a log, feeding it the
    /// log's inputs and checking every state digest; the clock and terminal are not used.
    Replay(ReplayArgs),
    /// Print a log's header and entries, one per line.
    Dump(DumpArgs),
    /// Compare two page trails (`--page-trail` of a recording and a replay, or of two
    /// replays) digest by digest: differing registers, FPU registers and page bytes, with
    /// a guess at what each page is. Exit status 0 if they agree, 5 if they differ.
    Diff(DiffArgs),
    /// Run the guest as the primary of a live pair: stream every input to the backup, and
    /// hold console output until the backup has acknowledged the log that produced it.
    Primary(PrimaryArgs),
    /// Run the guest as the backup of a live pair: replay the primary's stream as it comes,
    /// checking every digest; its console output is discarded (or written to a file).
    Backup(BackupArgs),
}

/// The log channel's timing, shared by both sides.
#[derive(Debug, Args)]
struct ChannelArgs {
    /// Silence on the log channel after which the peer counts as failed, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    peer_timeout_ms: u64,
    /// Interval between heartbeats, in milliseconds [default: a quarter of
    /// --peer-timeout-ms].
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// File whose first line is the pair's shared secret (the same on both sides, at least
    /// 16 bytes): each side proves it holds it before any log entry flows. Without it the
    /// log channel is unauthenticated.
    #[arg(long)]
    pair_secret_file: Option<PathBuf>,
}

/// Flow control of a side that streams its log (a primary, or a side re-protected with a
/// new backup).
#[derive(Debug, Args)]
struct LagArgs {
    /// Flow control: most log entries the backup may leave unacknowledged before the guest
    /// is slowed down.
    #[arg(long, default_value_t = 100_000)]
    max_lag_entries: u64,
    /// Flow control: most log bytes the backup may leave unacknowledged.
    #[arg(long, default_value_t = 64 << 20)]
    max_lag_bytes: u64,
    /// Replay-lag bound: the primary is held back while the backup's replay trails it by
    /// more than the positions it runs in this many milliseconds (what a takeover must
    /// replay first).
    #[arg(long, default_value_t = 100)]
    max_replay_lag_ms: u64,
    /// Replay-lag bound in positions (the smaller of the two bounds applies).
    #[arg(long, default_value_t = 20_000)]
    max_replay_lag_positions: u64,
    /// Floor of the time bound, in positions: the primary may always run this far ahead
    /// of the backup's replay (fewer makes it spend its time held on a slow host).
    #[arg(long, default_value_t = 10_000)]
    min_replay_lag_positions: u64,
}

impl LagArgs {
    fn limit(&self) -> vmm::rr::LagLimit {
        vmm::rr::LagLimit {
            entries: self.max_lag_entries,
            bytes: self.max_lag_bytes,
            replay_positions: self.max_replay_lag_positions,
            replay_time: std::time::Duration::from_millis(self.max_replay_lag_ms),
            replay_min_positions: self.min_replay_lag_positions,
        }
    }
}

/// Re-protect: a side that goes on alone takes a new backup (see README: re-protect).
#[derive(Debug, Args)]
struct ReprotectArgs {
    /// Where a new backup will listen (`twinvm backup --join --listen ...`), HOST:PORT: once
    /// this side runs the VM alone (after a failover), it connects there, opens the next
    /// generation at the arbiter, sends its state and streams its log to it. Without it, a
    /// side that goes on alone stays alone.
    #[arg(long, value_name = "HOST:PORT")]
    next_backup: Option<String>,
    /// Pre-copy rounds at most before the guest is stopped for the rest of its memory and
    /// its state (0: stop-and-copy, the whole machine at one delivery point).
    #[arg(long, default_value_t = 8)]
    reprotect_rounds: u32,
    /// A pre-copy round that leaves at most this many dirty pages ends the pre-copy.
    #[arg(long, default_value_t = 256)]
    reprotect_stop_pages: usize,
}

impl ReprotectArgs {
    /// The re-protect configuration of a side whose machine is `cfg`, its vCPU placed
    /// (`cpuid`: the fingerprint of its host CPU, which the new backup must match).
    fn config(
        &self,
        cfg: &VmConfig,
        digest_interval: u64,
        vm_id: &str,
        cpuid: Option<Vec<logchannel::entry::CpuidLeaf>>,
        channel: &ChannelArgs,
        lag: &LagArgs,
    ) -> anyhow::Result<Option<vmm::transfer::ReprotectConfig>> {
        let Some(addr) = &self.next_backup else {
            return Ok(None);
        };
        // The new pair starts from the state sent, not from a snapshot file.
        let header = pair_header(cfg, digest_interval, vm_id, cpuid)?.with_snapshot(None);
        Ok(Some(vmm::transfer::ReprotectConfig {
            addr: resolve(addr)?,
            header,
            channel: channel.config(),
            secret: channel.pair_secret()?,
            lag: lag.limit(),
            image: vmm::snapshot::ImageId::of(
                &cfg.kernel,
                cfg.initrd.as_deref(),
                &cfg.cmdline,
                cfg.mem_mib,
            )?,
            max_rounds: self.reprotect_rounds,
            stop_pages: self.reprotect_stop_pages,
        }))
    }
}

/// Failover: the arbiter both sides of a pair ask when they lose each other.
#[derive(Debug, Args)]
struct FailoverArgs {
    /// The arbiter: HOST:PORT of a twinvm-arbiter, or etcd://HOST:PORT[,HOST:PORT...] for
    /// an etcd cluster. Without it, a side that loses its peer halts.
    #[arg(long)]
    arbiter: Option<String>,
    /// File holding the arbiter's shared secret.
    #[arg(long)]
    arbiter_token_file: Option<PathBuf>,
    /// etcd arbiter: prefix of the keys (one per VM).
    #[arg(long, default_value = arbiter::etcd::DEFAULT_PREFIX)]
    arbiter_etcd_prefix: String,
    /// etcd arbiter: file holding `user:password`, if the cluster has authentication on.
    #[arg(long)]
    arbiter_etcd_credentials_file: Option<PathBuf>,
    /// The pair's generation at the arbiter (both sides the same).
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// The name this side's incarnation at the arbiter starts with [default: primary or
    /// backup]; the host, boot id, process id and a random id follow, so that no two
    /// processes ever claim as one.
    #[arg(long)]
    claimant: Option<String>,
}

impl FailoverArgs {
    /// The arbiter this side claims at when it loses its peer, checked now (it answers, it
    /// takes the token, the pair's generation is open) so that a configuration error is
    /// found before the guest boots. See `vmm::ft::arbiter`.
    fn arbiter(
        &self,
        vm: &str,
        role: Role,
    ) -> anyhow::Result<Option<Box<dyn vmm::machine::Arbiter>>> {
        self.open_arbiter(vm, role, false)
    }

    /// [`FailoverArgs::arbiter`] for a backup that joins a live side: the arbiter must
    /// answer and take the token; the generation comes with the live side's state.
    fn open_arbiter(
        &self,
        vm: &str,
        role: Role,
        joining: bool,
    ) -> anyhow::Result<Option<Box<dyn vmm::machine::Arbiter>>> {
        let Some(addr) = &self.arbiter else {
            return Ok(None);
        };
        let name = self.claimant.clone().unwrap_or_else(|| role.to_string());
        if joining {
            eprintln!("twinvm: {role}: joining: the arbiter at {addr} answers; the generation comes from the live side");
        }
        if addr.starts_with(arbiter::etcd::SCHEME) {
            let settings = vmm::ft::etcd::EtcdSettings {
                url: addr.clone(),
                prefix: self.arbiter_etcd_prefix.clone(),
                credentials_file: self.arbiter_etcd_credentials_file.clone(),
                vm: vm.to_string(),
                generation: self.generation,
                name,
            };
            if joining {
                return Ok(Some(Box::new(vmm::ft::etcd::EtcdArbiter::connect_joining(
                    &settings,
                )?)));
            }
            let arbiter = vmm::ft::etcd::EtcdArbiter::connect(&settings)?;
            eprintln!(
                "twinvm: {role}: generation {} of VM {vm:?} is open at the etcd arbiter {addr}; this side is {}",
                self.generation,
                arbiter.claimant()
            );
            return Ok(Some(Box::new(arbiter)));
        }
        let settings = vmm::ft::arbiter::ArbiterSettings {
            addr: addr.clone(),
            token_file: self.arbiter_token_file.clone(),
            vm: vm.to_string(),
            generation: self.generation,
            name,
        };
        if joining {
            return Ok(Some(Box::new(
                vmm::ft::arbiter::HttpArbiter::connect_joining(&settings)?,
            )));
        }
        let arbiter = vmm::ft::arbiter::HttpArbiter::connect(&settings)?;
        eprintln!(
            "twinvm: {role}: generation {} of VM {vm:?} is open at the arbiter {addr}; this side is {}",
            self.generation,
            arbiter.claimant()
        );
        Ok(Some(Box::new(arbiter)))
    }
}

impl ChannelArgs {
    /// The heartbeat interval: as given, or a quarter of the peer timeout, so that three
    /// heartbeats in a row may be late or lost before a healthy peer counts as failed.
    fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.unwrap_or(self.peer_timeout_ms / 4).max(1)
    }

    fn config(&self) -> logchannel::transport::ChannelConfig {
        logchannel::transport::ChannelConfig {
            heartbeat_interval: std::time::Duration::from_millis(self.heartbeat_ms()),
            peer_timeout: std::time::Duration::from_millis(self.peer_timeout_ms),
            handshake_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn pair_secret(&self) -> anyhow::Result<Option<logchannel::transport::PairSecret>> {
        let Some(path) = &self.pair_secret_file else {
            tracing::warn!(
                "the log channel is unauthenticated (no --pair-secret-file): any host that \
                 reaches it can pose as the peer"
            );
            return Ok(None);
        };
        Ok(Some(logchannel::transport::PairSecret::from_file(path)?))
    }
}

#[derive(Debug, Args)]
struct PrimaryArgs {
    /// The backup's log channel address, HOST:PORT.
    #[arg(long)]
    backup: String,
    /// How long to keep trying to reach the backup, in seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    #[command(flatten)]
    lag: LagArgs,
    #[command(flatten)]
    reprotect: ReprotectArgs,
    /// Positions between two state digests.
    #[arg(long, default_value_t = 2000)]
    digest_interval: u64,
    /// The VM's identity (both sides must agree).
    #[arg(long, default_value = "twinvm")]
    vm_id: String,
    #[command(flatten)]
    channel: ChannelArgs,
    #[command(flatten)]
    failover: FailoverArgs,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// Address to listen on for the primary's log channel, HOST:PORT (port 0: any free port;
    /// the address is printed on standard error).
    #[arg(long)]
    listen: String,
    /// Test only: flip a bit of guest memory at this position (the backup must diverge,
    /// report it and exit with status 5).
    #[arg(long, hide = true)]
    test_corrupt_at: Option<u64>,
    /// Test only: acknowledge the primary's entries (and report them replayed) without
    /// running a guest, to measure what a live pair costs the primary alone. Such a backup
    /// cannot take over: it exits when the primary is gone.
    #[arg(long, hide = true)]
    test_ack_without_replay: bool,
    /// Write the backup guest's console output to this file (it is discarded otherwise).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Join a live side (re-protect): the side that connects sends the running machine's
    /// state first (this backup does not boot), and its arbiter generation; then its log.
    #[arg(long)]
    join: bool,
    /// Test only: a joining backup vanishes (exits with an error, its socket closed with the
    /// transfer unread) once the live side has accepted it, so that the live side sees its
    /// new backup vanish mid-transfer. (Vanishing after some of the transfer would race: the
    /// channel acknowledges on receipt, so the live side may have sent it all by then.)
    #[arg(long, hide = true, requires = "join")]
    test_vanish_on_join: bool,
    #[command(flatten)]
    lag: LagArgs,
    #[command(flatten)]
    reprotect: ReprotectArgs,
    /// The VM's identity (both sides must agree).
    #[arg(long, default_value = "twinvm")]
    vm_id: String,
    #[command(flatten)]
    channel: ChannelArgs,
    #[command(flatten)]
    failover: FailoverArgs,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args)]
struct DiffArgs {
    /// The first page trail directory (A).
    a: PathBuf,
    /// The second page trail directory (B).
    b: PathBuf,
    /// Compare only the digest at this position.
    #[arg(long)]
    pos: Option<u64>,
    /// Most differing byte ranges shown per page.
    #[arg(long, default_value_t = 8)]
    max_ranges: usize,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// The log file.
    #[arg(long)]
    log: PathBuf,
    /// Print only entries at or after this position.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Print only entries at or before this position.
    #[arg(long, default_value_t = u64::MAX)]
    to: u64,
}

#[derive(Debug, Args)]
struct RecordArgs {
    /// The log file to write.
    #[arg(long)]
    log: PathBuf,
    /// Positions (synchronous exits) between two state digests; 0 for only the final one.
    #[arg(long, default_value_t = 2000)]
    digest_interval: u64,
    /// The VM's identity, written in the log header.
    #[arg(long, default_value = "twinvm")]
    vm_id: String,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The log file to replay.
    #[arg(long)]
    log: PathBuf,
    /// Guest kernel (must be the one recorded) [default: GUEST_DIR/vmlinux].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (must be the one recorded) [default: GUEST_DIR/initramfs.cpio].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Directory of the guest image [env: TWINVM_GUEST_DIR].
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Pin the vCPU thread to this host CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write the run's counters and timings as JSON to this file when the guest ends.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Test only: flip a bit of guest memory at this position (the replay must diverge).
    #[arg(long, hide = true)]
    test_corrupt_at: Option<u64>,
    /// The snapshot the recording starts from (the log names it), or one taken in this
    /// recording (`record --snapshot-at`), from whose position the replay then starts.
    #[command(flatten)]
    snapshot: SnapshotArgs,
    #[command(flatten)]
    trail: TrailArgs,
}

/// The page trail (see `vmm::trail`): record, replay, primary and backup.
#[derive(Debug, Args)]
struct TrailArgs {
    /// Keep the bytes of every page hashed at the last digests in this directory, for
    /// `twinvm diff` (see README: seeing a divergence).
    #[arg(long)]
    page_trail: Option<PathBuf>,
    /// How many digests the page trail keeps: the last ones, or the first ones from
    /// `--page-trail-from`.
    #[arg(long, default_value_t = 8)]
    page_trail_keep: usize,
    /// Keep the page trail's digests from this position on (e.g. a little before where
    /// another run diverged).
    #[arg(long)]
    page_trail_from: Option<u64>,
}

impl TrailArgs {
    fn config(&self) -> Option<(PathBuf, usize, Option<u64>)> {
        self.page_trail
            .clone()
            .map(|d| (d, self.page_trail_keep, self.page_trail_from))
    }
}

/// What to boot. Without options, the image that guest-images/build.sh made.
#[derive(Debug, Args)]
struct GuestArgs {
    /// Guest kernel: an uncompressed x86-64 vmlinux ELF [default: GUEST_DIR/vmlinux].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio) [default: GUEST_DIR/initramfs.cpio].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: the contents of GUEST_DIR/cmdline].
    #[arg(long)]
    cmdline: Option<String>,
    /// Extra words appended to the kernel command line, e.g. `twinvm.run=hello`.
    #[arg(long)]
    append: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Directory of the guest image [env: TWINVM_GUEST_DIR; default: guest-images/out of
    /// this source tree].
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Pin the vCPU thread to this host CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Write the run's counters and timings as JSON to this file when the guest ends.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Keep this file updated (about once a second) with the VM's role and progress (JSON).
    #[arg(long)]
    status: Option<PathBuf>,
    /// Give the guest a virtio-net card on this TAP device (an existing one, or a new one
    /// is created; needs CAP_NET_ADMIN). Implies --nic.
    #[arg(long)]
    tap: Option<String>,
    /// Give the guest a virtio-net card (without --tap it is connected to nothing: what a
    /// backup or a replay needs to match a primary that has one).
    #[arg(long)]
    nic: bool,
    /// The card's MAC address, aa:bb:cc:dd:ee:ff [default: 52:54:00:74:77:01].
    #[arg(long, value_parser = parse_mac_arg)]
    mac: Option<[u8; 6]>,
    /// Preemption quantum in milliseconds: a guest run that lasts this long without an exit
    /// (a CPU-bound program) is interrupted there to deliver what is due, its timer tick
    /// included; a recording logs the vCPU state and dirtied pages at that point. 0: never
    /// (a CPU-bound guest program then keeps its interrupts waiting until it exits).
    #[arg(long, default_value_t = 10)]
    preempt_ms: u64,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    #[command(flatten)]
    trail: TrailArgs,
}

/// Snapshots: start from one, take one (see README: snapshots).
#[derive(Debug, Args)]
struct SnapshotArgs {
    /// Start the guest from this snapshot instead of booting it. The kernel, initrd,
    /// command line (with --nic/--append) and --mem must be those it was taken with.
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,
    /// Take a snapshot at the delivery point at position POS (synchronous exits), write it
    /// to FILE, and go on.
    #[arg(long, num_args = 2, value_names = ["POS", "FILE"])]
    snapshot_at: Option<Vec<String>>,
    /// On every SIGUSR1, take a snapshot at the next delivery point and write it to FILE
    /// (replacing the last one).
    #[arg(long, value_name = "FILE")]
    snapshot_on_sigusr1: Option<PathBuf>,
}

impl SnapshotArgs {
    /// The snapshot to start from, read and checked.
    fn restore(&self) -> anyhow::Result<Option<Arc<Snapshot>>> {
        let Some(path) = &self.restore else {
            return Ok(None);
        };
        let snap = Snapshot::open(path)?;
        tracing::info!(
            "read snapshot {} (position {}, sha256 {}) in {:.1} ms",
            path.display(),
            snap.state.vmm.position,
            hex(&snap.sha256),
            snap.read_time.as_secs_f64() * 1e3
        );
        Ok(Some(Arc::new(snap)))
    }

    fn request(&self) -> anyhow::Result<Option<SnapshotRequest>> {
        let Some(v) = &self.snapshot_at else {
            return Ok(None);
        };
        let [pos, path] = v.as_slice() else {
            bail!("--snapshot-at takes a position and a file");
        };
        let pos: u64 = pos
            .parse()
            .with_context(|| format!("--snapshot-at: {pos:?} is not a position (a number)"))?;
        Ok(Some(SnapshotRequest {
            pos: Position(pos),
            path: PathBuf::from(path),
        }))
    }
}

fn parse_mac_arg(s: &str) -> Result<[u8; 6], String> {
    vmm::nic::parse_mac(s)
        .ok_or_else(|| format!("{s:?} is not a MAC address like 52:54:00:12:34:56"))
}

fn default_guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TWINVM_GUEST_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out")
}

/// `dir/name`, or an error that says how to get the guest image.
fn from_guest_dir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "no guest {name} at {}: build the guest image with guest-images/build.sh, or pass --kernel/--initrd/--cmdline",
            p.display()
        );
    }
    Ok(p)
}

/// SHA-256 of a file.
fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    Ok(vmm::snapshot::sha256_file(path)?)
}

impl GuestArgs {
    fn to_config(&self) -> anyhow::Result<VmConfig> {
        let dir = self.guest_dir.clone().unwrap_or_else(default_guest_dir);
        let from_dir = |name: &str| from_guest_dir(&dir, name);
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => from_dir("vmlinux")?,
        };
        let initrd = match &self.initrd {
            Some(i) => i.clone(),
            None => from_dir("initramfs.cpio")?,
        };
        let mut cmdline = match &self.cmdline {
            Some(c) => c.clone(),
            None => {
                let p = from_dir("cmdline")?;
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .to_string()
            }
        };
        if self.nic || self.tap.is_some() || self.mac.is_some() {
            cmdline.push(' ');
            cmdline.push_str(&vmm::nic::cmdline_words(self.mac));
        }
        if let Some(extra) = &self.append {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        Ok(VmConfig {
            kernel,
            initrd: Some(initrd),
            cmdline,
            mem_mib: self.mem,
            kvm_path: self.kvm.clone(),
            cpu: self.cpu,
            digest_interval: 0,
            status_file: self.status.clone(),
            role: Role::Alone,
            tap: self.tap.clone(),
            corrupt_at: None,
            page_trail: self.trail.config(),
            preempt_quantum: (self.preempt_ms > 0)
                .then(|| std::time::Duration::from_millis(self.preempt_ms)),
            restore: self.snapshot.restore()?,
            snapshot_at: self.snapshot.request()?,
            snapshot_on_signal: self.snapshot.snapshot_on_sigusr1.clone(),
        })
    }
}

impl ReplayArgs {
    /// The configuration to replay: files from the options or the guest directory, checked
    /// against the log's hashes; command line and memory from the log.
    fn to_config(&self, header: &LogHeader) -> anyhow::Result<VmConfig> {
        let dir = self.guest_dir.clone().unwrap_or_else(default_guest_dir);
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => from_guest_dir(&dir, "vmlinux")?,
        };
        let initrd = match &self.initrd {
            Some(i) => i.clone(),
            None => from_guest_dir(&dir, "initramfs.cpio")?,
        };
        for (what, path, want) in [
            ("kernel", &kernel, &header.kernel_sha256),
            ("initrd", &initrd, &header.initrd_sha256),
        ] {
            let got = sha256_file(path)?;
            if &got != want {
                return Err(RrError::ImageMismatch(format!(
                    "{what} {} is not the one recorded in {} (sha256 {}, the log has {}): replay refuses to run a different image",
                    path.display(),
                    self.log.display(),
                    hex(&got),
                    hex(want)
                ))
                .into());
            }
        }
        Ok(VmConfig {
            kernel,
            initrd: Some(initrd),
            cmdline: header.cmdline.clone(),
            mem_mib: u64::from(header.mem_mib),
            kvm_path: self.kvm.clone(),
            cpu: self.cpu,
            digest_interval: header.digest_interval,
            status_file: None,
            role: Role::Replaying,
            tap: None,
            corrupt_at: self.test_corrupt_at,
            page_trail: self.trail.config(),
            // A replay takes its preemption points from the log.
            preempt_quantum: None,
            restore: None,
            snapshot_at: self.snapshot.request()?,
            snapshot_on_signal: self.snapshot.snapshot_on_sigusr1.clone(),
        })
    }
}

/// Writes the counters of a finished run as one JSON object.
fn write_stats(
    path: &Path,
    s: &vmm::machine::RunStats,
    log_bytes: u64,
    outcome: RunOutcome,
) -> anyhow::Result<()> {
    let secs = |d: std::time::Duration| d.as_secs_f64();
    let json = serde_json::json!({
        "outcome": format!("{outcome:?}"),
        "positions": s.sync_exits,
        "pio_exits": s.pio_exits,
        "mmio_exits": s.mmio_exits,
        "hlt_exits": s.hlt_exits,
        "step_exits": s.step_exits,
        "step_episodes": s.step_episodes,
        "injected": s.injected,
        "kicks": s.kicks,
        "in_guest_s": secs(s.in_guest),
        "idle_s": secs(s.idle),
        "setup_s": secs(s.setup),
        "digests": s.digests,
        "digest_s": secs(s.digest_time),
        "digest_pages": s.digest_pages,
        "preempts": s.preempts,
        "preempt_pages": s.preempt_pages,
        "preempt_bytes": s.preempt_bytes,
        "preempt_s": secs(s.preempt_time),
        "log_bytes": log_bytes,
        "snapshot_bytes": s.snapshot.map(|f| f.bytes),
        "snapshot_pages": s.snapshot.map(|f| f.pages_stored),
        "snapshot_s": s.snapshot.map(|f| secs(f.took)),
        "restore_s": s.restore.map(secs),
        "snapshot_read_s": s.restore_read.map(secs),
        "reprotects": s.reprotects.iter().map(|r| serde_json::json!({
            "generation": r.generation,
            "position": r.pos,
            "pages_per_round": r.rounds(),
            "pause_s": secs(r.pause),
            "total_s": secs(r.total),
            "bytes": r.bytes,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))
}

fn run(cfg: &VmConfig, mode: Mode, stats: Option<&Path>) -> anyhow::Result<RunOutcome> {
    let interactive = !mode.is_replay();
    run_boxed(
        cfg,
        mode,
        stats,
        Box::new(std::io::stdout()),
        interactive,
        |_| Ok(()),
    )
}

fn run_boxed(
    cfg: &VmConfig,
    mode: Mode,
    stats: Option<&Path>,
    console: Box<dyn std::io::Write + Send>,
    interactive: bool,
    prepare: impl FnOnce(&mut Machine) -> anyhow::Result<()>,
) -> anyhow::Result<RunOutcome> {
    let mut machine = Machine::new(cfg, console, mode)?;
    prepare(&mut machine)?;
    let handle = machine.handle();
    // A second SIGINT or SIGTERM while the first stop is pending exits at once.
    vmm::signals::spawn_stop_on_signals(handle.clone()).context("starting the signal thread")?;
    if cfg.snapshot_on_signal.is_some() {
        vmm::signals::spawn_snapshot_on_sigusr1(handle.clone())
            .context("starting the SIGUSR1 thread")?;
    }
    // A replay never reads the terminal: its console input comes from the log (a live
    // backup forwards the terminal, but the machine ignores it until it goes live).
    let _term = interactive.then(TerminalGuard::new);
    if interactive {
        spawn_stdin_forwarder(handle).context("starting the console input thread")?;
    }
    let (outcome, log_bytes) = machine.run()?;
    let s = machine.stats();
    if let Some(path) = stats {
        write_stats(path, s, log_bytes, outcome)?;
    }
    match machine.mode() {
        Mode::Replay(r) => eprintln!(
            "twinvm: replay complete: {} log entries, {} state digests matched, {} positions",
            r.consumed(),
            r.digests_matched,
            s.sync_exits
        ),
        _ if log_bytes > 0 => eprintln!(
            "twinvm: recorded {} positions, {} digests, {} log bytes",
            s.sync_exits, s.digests, log_bytes
        ),
        _ => {}
    }
    tracing::info!(
        "guest ended ({outcome:?}) at position {}: {} PIO, {} HLT, {} single-step exits in {} episodes, {} interrupts injected, {} kicks, {} preemption points ({} pages); {:.2?} in KVM_RUN, {:.2?} idle, {:.2?} setup",
        s.sync_exits, s.pio_exits, s.hlt_exits, s.step_exits, s.step_episodes, s.injected, s.kicks, s.preempts, s.preempt_pages, s.in_guest, s.idle, s.setup
    );
    Ok(outcome)
}

/// Where a recording's (or a primary's) vCPU runs: see `vmm::hostcpu`.
fn place_recording(cfg: &mut VmConfig) -> anyhow::Result<vmm::hostcpu::Placement> {
    let kvm = vmm::vstate::open_kvm(&cfg.kvm_path)?;
    let placement = vmm::hostcpu::for_recording(&kvm, cfg.cpu)?;
    cfg.cpu = placement.cpu;
    report_placement(&placement);
    Ok(placement)
}

fn report_placement(p: &vmm::hostcpu::Placement) {
    match (p.trap, p.cpu) {
        (vmm::hostcpu::CpuidTrap::Native, Some(cpu)) => eprintln!(
            "twinvm: guest CPUID is not trapped on this host: the vCPU runs pinned to host CPU {cpu}, whose CPUID fingerprint the log header carries"
        ),
        _ => tracing::info!("{}", p.trap),
    }
}

fn record(args: &RecordArgs) -> anyhow::Result<RunOutcome> {
    let mut cfg = args.guest.to_config()?;
    cfg.digest_interval = args.digest_interval;
    let placement = place_recording(&mut cfg)?;
    let header = LogHeader::new(
        sha256_file(&cfg.kernel)?,
        sha256_file(cfg.initrd.as_deref().expect("record always has an initrd"))?,
        cfg.cmdline.clone(),
        u32::try_from(cfg.mem_mib).context("memory size")?,
        cfg.digest_interval,
        args.vm_id.clone(),
    )
    .with_cpuid(placement.cpuid)
    .with_snapshot(cfg.restore.as_ref().map(|s| s.sha256));
    let recorder = Recorder::create(&args.log, &header)?;
    run(
        &cfg,
        Mode::Record(Box::new(recorder)),
        args.guest.stats.as_deref(),
    )
}

/// The header both sides of a live pair compute from their own image and options.
fn pair_header(
    cfg: &VmConfig,
    digest_interval: u64,
    vm_id: &str,
    cpuid: Option<Vec<logchannel::entry::CpuidLeaf>>,
) -> anyhow::Result<LogHeader> {
    Ok(LogHeader::new(
        sha256_file(&cfg.kernel)?,
        sha256_file(cfg.initrd.as_deref().context("no initrd")?)?,
        cfg.cmdline.clone(),
        u32::try_from(cfg.mem_mib).context("memory size")?,
        digest_interval,
        vm_id,
    )
    .with_cpuid(cpuid)
    .with_snapshot(cfg.restore.as_ref().map(|s| s.sha256)))
}

fn resolve(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr:?}"))?
        .next()
        .with_context(|| format!("address {addr:?} resolves to nothing"))
}

/// The network a side of a pair would run the VM with, checked at start-up (see
/// `vmm::ft::role::check_network`).
fn check_network(guest: &GuestArgs, role: Role, may_go_live: bool) -> anyhow::Result<()> {
    let nic = guest.nic || guest.tap.is_some() || guest.mac.is_some();
    match vmm::ft::role::check_network(role, nic, guest.tap.is_some(), may_go_live)? {
        vmm::ft::role::NetworkCheck::Fine => {}
        vmm::ft::role::NetworkCheck::Warn(w) => {
            tracing::warn!("{w}");
            eprintln!("twinvm: WARNING: {w}");
        }
    }
    Ok(())
}

fn primary(args: &PrimaryArgs) -> anyhow::Result<RunOutcome> {
    check_network(&args.guest, Role::Primary, args.failover.arbiter.is_some())?;
    let arbiter = args.failover.arbiter(&args.vm_id, Role::Primary)?;
    let mut cfg = args.guest.to_config()?;
    cfg.digest_interval = args.digest_interval;
    cfg.role = Role::Primary;
    let placement = place_recording(&mut cfg)?;
    let header = pair_header(&cfg, args.digest_interval, &args.vm_id, placement.cpuid)?;
    let addr = resolve(&args.backup)?;
    let secret = args.channel.pair_secret()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.connect_timeout);
    let sender = loop {
        match logchannel::transport::LogSender::connect_with_secret(
            addr,
            header.clone(),
            args.channel.config(),
            secret.clone(),
        ) {
            Ok(s) => break s,
            Err(e @ logchannel::transport::TransportError::Connect { .. })
                if std::time::Instant::now() < deadline =>
            {
                tracing::debug!("backup not reachable yet: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    };
    eprintln!("twinvm: primary connected to its backup at {addr}");
    let sender = Arc::new(sender);
    let (tx, rx) = std::sync::mpsc::channel();
    let (tap_tx, tap_rx) = std::sync::mpsc::channel();
    let decision = SharedDecision::default();
    let releaser = spawn_output_releaser(sender.clone(), rx, tap_rx, decision.clone());
    let recorder = Recorder::live(sender.clone(), args.lag.limit());
    let reprotect = args.reprotect.config(
        &cfg,
        args.digest_interval,
        &args.vm_id,
        header.cpuid.clone(),
        &args.channel,
        &args.lag,
    )?;
    let out = HeldOutput::new(sender.clone(), tx);
    let frames = out.clone();
    let decided = decision.clone();
    let watched = sender.clone();
    let machine_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = machine_done.clone();
    let result = run_boxed(
        &cfg,
        Mode::Record(Box::new(recorder)),
        args.guest.stats.as_deref(),
        Box::new(out),
        true,
        move |m| {
            let writer = m.hold_frames(Box::new(frames))?;
            let _ = tap_tx.send(writer);
            // A lost or diverged backup must reach the vCPU loop even while the guest is
            // halted and nothing else wakes it.
            let handle = m.handle();
            std::thread::Builder::new()
                .name("peer-watch".into())
                .spawn(move || {
                    vmm::hostcpu::unpin_current_thread();
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        if watched
                            .wait_failure(std::time::Duration::from_millis(250))
                            .is_some()
                        {
                            handle.send(HostEvent::PeerLost);
                            break;
                        }
                    }
                })
                .context("starting the peer watch thread")?;
            let d = decided;
            m.set_failover(
                arbiter,
                None,
                Some(Box::new(move |role: Role| d.follow(role))),
            );
            if let Some(r) = reprotect {
                m.set_reprotect(r);
            }
            Ok(())
        },
    );
    machine_done.store(true, std::sync::atomic::Ordering::Release);
    if result.is_err() {
        decision.set(Decision::Halted);
    }
    // The machine (and its HeldOutput) is gone: the releaser drains what is held.
    let delays = releaser.join().unwrap_or_default();
    if !delays.delays.is_empty() {
        eprintln!(
            "twinvm: output rule: {} console bytes and {} frames in {} chunks held for the backup's ack: median {:.2?}, p99 {:.2?}",
            delays.bytes,
            delays.frames,
            delays.delays.len(),
            delays.percentile(0.5),
            delays.percentile(0.99)
        );
    }
    result
}

fn backup(args: &BackupArgs) -> anyhow::Result<RunOutcome> {
    check_network(&args.guest, Role::Backup, args.failover.arbiter.is_some())?;
    let mut cfg = args.guest.to_config()?;
    cfg.role = Role::Backup;
    // Everything the live side needs is opened now, before this side can win the arbiter:
    // the TAP stays open, unread, until the backup goes live.
    let standby = match &cfg.tap {
        Some(name) => Some(
            vmm::tap::Tap::open(name)
                .with_context(|| format!("the backup's TAP {name}, which it would go live on"))?,
        ),
        None => None,
    };
    if args.join && args.guest.snapshot.restore.is_some() {
        bail!("--join starts from the live side's state: it takes no --restore");
    }
    let mut arbiter = args
        .failover
        .open_arbiter(&args.vm_id, Role::Backup, args.join)?;
    let kvm = vmm::vstate::open_kvm(&cfg.kvm_path)?;
    let trap = vmm::hostcpu::probe_cpuid_trap(&kvm)?;
    // Our header is computed once, before listening (hashing the image takes seconds in a
    // debug build on a loaded host, and a primary's handshake times out while the check
    // runs); the digest interval is the primary's. Only whether CPUID is trapped is
    // compared; the fingerprint picks the CPU.
    let base = pair_header(
        &cfg,
        0,
        &args.vm_id,
        (trap == vmm::hostcpu::CpuidTrap::Native).then(Vec::new),
    )?;
    let listener =
        logchannel::transport::LogListener::bind(resolve(&args.listen)?, args.channel.config())?
            .with_pair_secret(args.channel.pair_secret()?);
    eprintln!("twinvm: backup listening on {}", listener.local_addr());
    let chosen = std::cell::RefCell::new(None);
    // Strangers (scans, garbage, wrong secret, silence) are logged and dropped; a
    // primary whose header does not match, or whose host CPU this host cannot match,
    // ends the wait with an error.
    let check = |theirs: &logchannel::LogHeader| {
        let mut ours = base.clone();
        ours.digest_interval = theirs.digest_interval;
        ours.check_matches(theirs)?;
        let placement = vmm::hostcpu::for_replay(&kvm, theirs.cpuid.as_deref(), cfg.cpu)
            .map_err(|e| format!("the backup's host: {e}"))?;
        *chosen.borrow_mut() = Some(placement);
        Ok(())
    };
    let mut rx = listener.wait_for_primary(check, None)?;
    eprintln!("twinvm: backup accepted its primary at {}", rx.peer());
    if args.join {
        // The live side sends its machine first: nothing runs until all of it is here and
        // checked (a peer that vanishes, garbage, a truncated state: an error, nothing lost
        // on the live side, which goes on alone).
        let stop = std::sync::atomic::AtomicBool::new(false);
        // A dead live side is found by the channel's heartbeats; this bounds a live one
        // that says nothing (it takes the new backup up at its next delivery point).
        let timeout =
            std::time::Duration::from_millis(args.channel.peer_timeout_ms.saturating_mul(5))
                .max(std::time::Duration::from_secs(10));
        if args.test_vanish_on_join {
            bail!("test: the joining backup vanishes before the transfer, as asked (--test-vanish-on-join)");
        }
        let got = vmm::transfer::receive(&mut rx, timeout, &stop)
            .with_context(|| format!("joining the live side at {}", rx.peer()))?;
        if let Some(a) = arbiter.as_mut() {
            a.join_generation(got.generation).map_err(|e| {
                anyhow::anyhow!("the live side's generation {}: {e}", got.generation)
            })?;
        }
        eprintln!(
            "twinvm: joined the live side at position {}: generation {}, {} pre-copied pages and a state of {} bytes received in {:.1} ms",
            got.snapshot.state.vmm.position,
            got.generation,
            got.pages,
            got.snapshot.stored_bytes(),
            got.took.as_secs_f64() * 1e3
        );
        cfg.restore = Some(Arc::new(got.snapshot));
    }
    if args.test_ack_without_replay {
        return ack_without_replay(rx);
    }
    cfg.corrupt_at = args.test_corrupt_at;
    if let Some(p) = chosen.into_inner() {
        cfg.cpu = p.cpu;
        report_placement(&p);
    }
    cfg.digest_interval = rx.header().digest_interval;
    let reprotect = match &args.reprotect.next_backup {
        Some(_) => {
            // The new backup of this side must match the CPU its vCPU runs on.
            let placed = vmm::hostcpu::for_recording(&kvm, cfg.cpu)?;
            args.reprotect.config(
                &cfg,
                cfg.digest_interval,
                &args.vm_id,
                placed.cpuid,
                &args.channel,
                &args.lag,
            )?
        }
        None => None,
    };
    let console: Box<dyn std::io::Write + Send> = match &args.console_log {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::sink()),
    };
    run_boxed(
        &cfg,
        Mode::Replay(Box::new(Replayer::live(rx))),
        args.guest.stats.as_deref(),
        console,
        true,
        move |m| {
            if let Some(tap) = standby {
                m.set_standby_tap(tap)?;
            }
            m.set_failover(arbiter, Some(Box::new(std::io::stdout())), None);
            if let Some(r) = reprotect {
                m.set_reprotect(r);
            }
            Ok(())
        },
    )
}

/// The hidden `backup --test-ack-without-replay`: takes every entry and reports it
/// replayed at once, so the primary pays for the log channel, the output rule and the
/// acks but never waits for a replay. Ends with an error when the primary's stream ends.
fn ack_without_replay(mut rx: logchannel::transport::LogReceiver) -> anyhow::Result<RunOutcome> {
    eprintln!("twinvm: test: acknowledging without replaying");
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(10)) {
            Ok(Some(e)) => {
                rx.set_replayed(e.pos());
                // A primary held back for the replay waits for this: tell it at once.
                if matches!(e, logchannel::entry::Entry::Heartbeat { .. }) {
                    rx.flush_progress();
                }
            }
            Ok(None) => rx.flush_progress(),
            Err(e) => bail!(
                "the primary's stream ended after {} entries: {e}",
                rx.received()
            ),
        }
    }
}

fn replay(args: &ReplayArgs) -> anyhow::Result<RunOutcome> {
    let mut replayer = Replayer::open(&args.log)?;
    let mut cfg = args.to_config(replayer.header())?;
    let header = replayer.header().clone();
    let log = args.log.display();
    match (header.snapshot_sha256, args.snapshot.restore()?) {
        (None, None) => {}
        (Some(want), None) => bail!(
            "{log} was recorded from snapshot {}: replay it with --restore and that snapshot",
            hex(&want)
        ),
        // The snapshot the recording starts from.
        (Some(want), Some(snap)) if snap.sha256 == want => cfg.restore = Some(snap),
        // A snapshot taken in this recording (or in a replay of it): the replay starts at
        // its position.
        (_, Some(snap))
            if snap
                .state
                .vmm
                .log
                .is_some_and(|p| p.header_sha256 == header.sha256()) =>
        {
            let point = snap.state.vmm.log.expect("checked");
            replayer.skip_to(point.entries, Position(snap.state.vmm.position))?;
            eprintln!(
                "twinvm: replaying from the snapshot's position {} (log entry {})",
                snap.state.vmm.position, point.entries
            );
            cfg.restore = Some(snap);
        }
        (want, Some(snap)) => {
            let starts = match want {
                Some(h) => format!("from snapshot {}", hex(&h)),
                None => "from a boot".to_string(),
            };
            return Err(RrError::ImageMismatch(format!(
                "snapshot {} (sha256 {}) is neither the one {log} was recorded from ({log} starts {starts}) nor one taken in that recording: replay refuses to start from it",
                snap.path.display(),
                hex(&snap.sha256),
            ))
            .into());
        }
    }
    let kvm = vmm::vstate::open_kvm(&cfg.kvm_path)?;
    let placement = vmm::hostcpu::for_replay(&kvm, replayer.header().cpuid.as_deref(), cfg.cpu)?;
    cfg.cpu = placement.cpu;
    report_placement(&placement);
    run(
        &cfg,
        Mode::Replay(Box::new(replayer)),
        args.stats.as_deref(),
    )
}

fn dump(args: &DumpArgs) -> anyhow::Result<()> {
    let mut reader = logchannel::file::LogReader::open(&args.log)?;
    let h = reader.header().clone();
    println!(
        "header: vm {:?}, kernel {}, initrd {}, {} MiB, digest every {} positions, cmdline {:?}",
        h.vm_id,
        hex(&h.kernel_sha256),
        hex(&h.initrd_sha256),
        h.mem_mib,
        h.digest_interval,
        h.cmdline
    );
    for (index, e) in (&mut reader).enumerate() {
        let e = e?;
        let pos = e.pos().get();
        if (args.from..=args.to).contains(&pos) {
            match &e {
                logchannel::entry::Entry::Digest(d) => println!(
                    "{index} @{pos} digest: rip {:#x}, {} pages",
                    d.regs
                        .iter()
                        .find(|(n, _)| n == "rip")
                        .map(|r| r.1)
                        .unwrap_or(0),
                    d.pages.len()
                ),
                other => println!("{index} @{pos} {}", vmm::rr::describe(other)),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Command::Run(args) => args
            .to_config()
            .and_then(|cfg| run(&cfg, Mode::Live, args.stats.as_deref())),
        Command::Record(args) => record(args),
        Command::Replay(args) => replay(args),
        Command::Primary(args) => primary(args),
        Command::Backup(args) => backup(args),
        Command::Diff(args) => {
            return match vmm::trail::diff(&args.a, &args.b, args.pos, args.max_ranges) {
                Ok((report, differs)) => {
                    print!("{report}");
                    ExitCode::from(if differs {
                        EXIT_DIVERGED
                    } else {
                        EXIT_POWEROFF
                    })
                }
                Err(e) => {
                    eprintln!("twinvm: error: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Dump(args) => {
            return match dump(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("twinvm: error: {e:#}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
    };
    let outcome = Outcome::from(result);
    outcome.report();
    ExitCode::from(outcome.exit_status())
}

/// How a guest-running command ended; [`Outcome::exit_status`] is the one place that maps
/// it to the process's exit status (documented in `EXIT_HELP`).
#[derive(Debug)]
enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// A replay reached the recorded operator's stop.
    ReplayStopped,
    /// The guest reset (reboot, triple fault, panic).
    Reset,
    /// Stopped by signal N.
    Signal(i32),
    /// A side of a pair lost its peer and did not win the arbiter: its guest is halted.
    Halted(String),
    /// A replay or a live backup stopped matching the log.
    Diverged(String),
    /// A side of a pair lost its peer and the arbiter refused its claim: its guest is halted.
    ArbiterRefused(String),
    /// Anything else that went wrong.
    Error(anyhow::Error),
}

impl From<anyhow::Result<RunOutcome>> for Outcome {
    fn from(r: anyhow::Result<RunOutcome>) -> Self {
        use vmm::machine::MachineError;
        match r {
            Ok(RunOutcome::PowerOff) => Outcome::PowerOff,
            Ok(RunOutcome::Reset) => Outcome::Reset,
            Ok(RunOutcome::Stopped(0)) => Outcome::ReplayStopped,
            Ok(RunOutcome::Stopped(sig)) => Outcome::Signal(sig),
            Err(e) => match e.downcast_ref::<MachineError>() {
                Some(h @ MachineError::Halted { .. }) => Outcome::Halted(h.to_string()),
                Some(r @ MachineError::ArbiterRefused { .. }) => {
                    Outcome::ArbiterRefused(r.to_string())
                }
                Some(d @ MachineError::Rr(RrError::Divergence { .. })) => {
                    Outcome::Diverged(d.to_string())
                }
                _ => Outcome::Error(e),
            },
        }
    }
}

impl Outcome {
    fn exit_status(&self) -> u8 {
        match self {
            Outcome::PowerOff | Outcome::ReplayStopped => EXIT_POWEROFF,
            Outcome::Error(_) => EXIT_ERROR,
            Outcome::Reset => EXIT_RESET,
            Outcome::Halted(_) => EXIT_HALTED,
            Outcome::Diverged(_) => EXIT_DIVERGED,
            Outcome::ArbiterRefused(_) => EXIT_ARBITER_REFUSED,
            Outcome::Signal(sig) => 128u8.saturating_add(*sig as u8),
        }
    }

    fn report(&self) {
        match self {
            Outcome::PowerOff => eprintln!("twinvm: guest powered off"),
            Outcome::ReplayStopped => {
                eprintln!("twinvm: stopped where the recorded run was stopped")
            }
            Outcome::Reset => eprintln!("twinvm: guest reset (reboot or triple fault)"),
            Outcome::Signal(sig) => eprintln!("twinvm: stopped by signal {sig}"),
            Outcome::Halted(why) => eprintln!("twinvm: {why}"),
            Outcome::Diverged(what) => eprintln!("twinvm: error: {what}"),
            Outcome::ArbiterRefused(what) => eprintln!("twinvm: {what}"),
            Outcome::Error(e) => eprintln!("twinvm: error: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_arbiter_refusal_halts_with_its_own_status() {
        let refused = Outcome::from(Err(anyhow::Error::from(
            vmm::machine::MachineError::ArbiterRefused {
                pos: 7,
                reason: "peer silent".into(),
                what: "generation 1".into(),
                why: "401".into(),
            },
        )));
        assert!(matches!(refused, Outcome::ArbiterRefused(_)), "{refused:?}");
        assert_eq!(refused.exit_status(), EXIT_ARBITER_REFUSED);
        let statuses = [
            EXIT_POWEROFF,
            EXIT_ERROR,
            EXIT_RESET,
            EXIT_HALTED,
            EXIT_DIVERGED,
            EXIT_ARBITER_REFUSED,
        ];
        for (i, a) in statuses.iter().enumerate() {
            assert!(!statuses[i + 1..].contains(a), "status {a} used twice");
        }
        assert!(EXIT_HELP.contains("6 halted after losing the peer because the arbiter refused"));
    }
}
