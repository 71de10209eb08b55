//! `twinvm`: the command-line front of the VMM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use logchannel::entry::LogHeader;
use sha2::{Digest as _, Sha256};
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::console::{spawn_stdin_forwarder, TerminalGuard};
use vmm::machine::{HostEvent, Machine, RunOutcome, VmConfig};
use vmm::rr::{Mode, Recorder, Replayer, RrError};

/// Exit status when the guest powered off.
const EXIT_POWEROFF: u8 = 0;
/// Exit status on a VMM error (the message is on standard error).
const EXIT_ERROR: u8 = 1;
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

const EXIT_HELP: &str = "Exit status: 0 the guest powered off; 3 the guest rebooted or reset; \
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
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(h.finalize().into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
    let json = format!(
        concat!(
            "{{\"outcome\":\"{:?}\",\"positions\":{},\"pio_exits\":{},\"mmio_exits\":{},",
            "\"hlt_exits\":{},\"step_exits\":{},\"step_episodes\":{},\"injected\":{},",
            "\"kicks\":{},\"in_guest_s\":{:.6},\"idle_s\":{:.6},\"setup_s\":{:.6},",
            "\"digests\":{},\"digest_s\":{:.6},\"digest_pages\":{},\"log_bytes\":{}}}\n"
        ),
        outcome,
        s.sync_exits,
        s.pio_exits,
        s.mmio_exits,
        s.hlt_exits,
        s.step_exits,
        s.step_episodes,
        s.injected,
        s.kicks,
        secs(s.in_guest),
        secs(s.idle),
        secs(s.setup),
        s.digests,
        secs(s.digest_time),
        s.digest_pages,
        log_bytes
    );
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

fn run(cfg: &VmConfig, mode: Mode, stats: Option<&Path>) -> anyhow::Result<RunOutcome> {
    let replay = mode.is_replay();
    let mut machine = Machine::new(cfg, Box::new(std::io::stdout()), mode)?;
    let handle = machine.handle();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let sig_handle = handle.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                sig_handle.send(HostEvent::Stop(sig));
            }
        })
        .context("starting the signal thread")?;
    // A replay never reads the terminal: its console input comes from the log.
    let _term = (!replay).then(TerminalGuard::new);
    if !replay {
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
        "guest ended ({outcome:?}) at position {}: {} PIO, {} HLT, {} single-step exits in {} episodes, {} interrupts injected, {} kicks; {:.2?} in KVM_RUN, {:.2?} idle, {:.2?} setup",
        s.sync_exits, s.pio_exits, s.hlt_exits, s.step_exits, s.step_episodes, s.injected, s.kicks, s.in_guest, s.idle, s.setup
    );
    Ok(outcome)
}

fn record(args: &RecordArgs) -> anyhow::Result<RunOutcome> {
    let mut cfg = args.guest.to_config()?;
    cfg.digest_interval = args.digest_interval;
    let header = LogHeader::new(
        sha256_file(&cfg.kernel)?,
        sha256_file(cfg.initrd.as_deref().expect("record always has an initrd"))?,
        cfg.cmdline.clone(),
        u32::try_from(cfg.mem_mib).context("memory size")?,
        cfg.digest_interval,
        args.vm_id.clone(),
    );
    let recorder = Recorder::create(&args.log, &header)?;
    run(&cfg, Mode::Record(recorder), args.guest.stats.as_deref())
}

fn replay(args: &ReplayArgs) -> anyhow::Result<RunOutcome> {
    let replayer = Replayer::open(&args.log)?;
    let cfg = args.to_config(replayer.header())?;
    run(&cfg, Mode::Replay(replayer), args.stats.as_deref())
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
    match result {
        Ok(RunOutcome::PowerOff) => {
            eprintln!("twinvm: guest powered off");
            ExitCode::from(EXIT_POWEROFF)
        }
        Ok(RunOutcome::Reset) => {
            eprintln!("twinvm: guest reset (reboot or triple fault)");
            ExitCode::from(EXIT_RESET)
        }
        Ok(RunOutcome::Stopped(sig)) => {
            eprintln!("twinvm: stopped by signal {sig}");
            ExitCode::from(128 + sig as u8)
        }
        Err(e) => {
            eprintln!("twinvm: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
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
}
