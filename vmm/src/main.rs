//! `twinvm`: the command-line front of the VMM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::console::{spawn_stdin_forwarder, TerminalGuard};
use vmm::machine::{HostEvent, Machine, RunOutcome, VmConfig};

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
    log: String,
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
}

fn default_guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TWINVM_GUEST_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/out")
}

impl GuestArgs {
    fn to_config(&self) -> anyhow::Result<VmConfig> {
        let dir = self.guest_dir.clone().unwrap_or_else(default_guest_dir);
        let from_dir = |name: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            if !p.exists() {
                bail!(
                    "no guest {name} at {}: build the guest image with guest-images/build.sh, or pass --kernel/--initrd/--cmdline",
                    p.display()
                );
            }
            Ok(p)
        };
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
        })
    }
}

fn run(args: &GuestArgs) -> anyhow::Result<RunOutcome> {
    let cfg = args.to_config()?;
    let mut machine = Machine::new(&cfg, Box::new(std::io::stdout()))?;
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
    let _term = TerminalGuard::new();
    spawn_stdin_forwarder(handle).context("starting the console input thread")?;
    let outcome = machine.run()?;
    let s = machine.stats();
    tracing::info!(
        "guest ended ({outcome:?}) at position {}: {} PIO, {} HLT, {} window exits, {} interrupts injected, {} kicks; {:.2?} in KVM_RUN, {:.2?} idle, {:.2?} setup",
        s.sync_exits, s.pio_exits, s.hlt_exits, s.window_exits, s.injected, s.kicks, s.in_guest, s.idle, s.setup
    );
    Ok(outcome)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Command::Run(args) => run(args),
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
