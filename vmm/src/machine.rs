//! The machine: guest memory, the one vCPU, the device model, and the vCPU loop.
//!
//! The loop counts every *synchronous* exit (one caused by a guest instruction: port I/O,
//! MMIO, HLT, interrupt window, shutdown); that count is the execution position every later
//! part of twinvm uses (DESIGN.md, Determinism 3). Exits caused by a kick signal are not
//! counted. Interrupts are injected only right after a synchronous exit (a *delivery point*),
//! never after a kick, so that where an interrupt lands is a function of the position alone.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use logchannel::entry::{Digest, EndReason, Entry, Position};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{self, BootError, BootLayout};
use crate::cpuid::{self, CpuidError};
pub use crate::devices::model::{Devices, HostClock};
use crate::devices::serial::SerialConsole;
use crate::devices::MmioBus;
use crate::dirty::{reset_vmm_dirty, DirtyTracker, PAGE_SIZE};
use crate::ft::Role;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::rr::{Mode, RrError};
use crate::snapshot::{ImageId, Snapshot, SnapshotError, VcpuState};
use crate::vcpu;
use crate::vcpu::exit::{Exit, MmioAccess, Run};
use crate::vcpu::stepper::{scrub_tf, At, Stepper};
use crate::vstate::{self, KickArm, VcpuKick, VstateError};

/// ISA line of the PIT's channel 0.
pub const PIT_IRQ: u8 = 0;

pub use crate::vcpu::stepper::MAX_STEPS;

/// Quanta a run of guest kernel code may last before it is preempted (see
/// `Machine::maybe_preempt`).
const KERNEL_QUANTA: u32 = 10_000;

/// Pages one preemption entry carries (a log entry's payload is at most 1 MiB).
const PREEMPT_PAGES_PER_ENTRY: usize = 200;

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The vmlinux ELF.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The KVM device.
    pub kvm_path: PathBuf,
    /// Host CPU to pin the vCPU thread to. The guest's CPUID on a software KVM reports the
    /// APIC ID of the host CPU it runs on, so a replay must run where the recording ran.
    pub cpu: Option<usize>,
    /// Positions between two state digests when recording (0: none but the final one).
    pub digest_interval: u64,
    /// A file the loop rewrites about once a second with its role and progress (JSON).
    pub status_file: Option<PathBuf>,
    /// The role reported there.
    pub role: Role,
    /// The TAP the NIC receives from and sends to in a live run (the NIC itself is present
    /// when the command line announces it; see [`crate::nic`]). A backup is given its TAP,
    /// opened at start-up, with [`Machine::set_standby_tap`].
    pub tap: Option<String>,
    /// Test only: at this position, flip one byte of guest memory behind the guest's back,
    /// so that the next digest must report a divergence.
    pub corrupt_at: Option<u64>,
    /// Keep the bytes of every page hashed at each of the last N digests in this directory
    /// (see [`crate::trail`]).
    pub page_trail: Option<(PathBuf, usize, Option<u64>)>,
    /// Preemption (DESIGN.md, Determinism 4): a run of the guest that lasts this long without
    /// a synchronous exit is kicked, and an interrupt that is due is delivered there (a
    /// recording logs the vCPU state and dirtied pages at that point). `None`: never.
    pub preempt_quantum: Option<Duration>,
    /// Start from this snapshot instead of booting (its image must be this config's).
    pub restore: Option<Arc<Snapshot>>,
    /// Take a snapshot at this delivery point.
    pub snapshot_at: Option<SnapshotRequest>,
    /// Where a snapshot asked for while running ([`HostEvent::Snapshot`], SIGUSR1) goes.
    pub snapshot_on_signal: Option<PathBuf>,
}

/// A snapshot to take at a position (`--snapshot-at POS FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The position of the delivery point.
    pub pos: Position,
    /// The file to write.
    pub path: PathBuf,
}

/// Told of every role change of the machine.
pub type RoleListener = Box<dyn FnMut(Role) + Send>;

pub use crate::ft::failover::{Arbiter, Claim};

/// Errors of the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// KVM setup.
    #[error(transparent)]
    Vstate(#[from] VstateError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPUID setup.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// The network card.
    #[error(transparent)]
    Nic(#[from] crate::nic::NicError),
    /// A TAP was given but the command line does not announce the NIC.
    #[error("a TAP was given but the kernel command line does not announce the NIC ({0})")]
    NoNic(String),
    /// This side lost the arbiter's test-and-set after losing its peer: its guest is halted.
    #[error("halted at position {pos}: the peer was lost ({reason}) and {what}")]
    Halted {
        /// Where.
        pos: u64,
        /// How the peer was lost.
        reason: String,
        /// The arbiter's answer, or why there was none to ask.
        what: String,
    },
    /// The arbiter refused this side's claim after it lost its peer (a configuration
    /// error, such as a wrong token): its guest is halted.
    #[error("halted at position {pos}: the peer was lost ({reason}) and the arbiter refused {what}: {why}")]
    ArbiterRefused {
        /// Where.
        pos: u64,
        /// How the peer was lost.
        reason: String,
        /// What was claimed.
        what: String,
        /// The arbiter's refusal.
        why: String,
    },
    /// Pinning the vCPU thread.
    #[error(transparent)]
    HostCpu(#[from] crate::hostcpu::HostCpuError),
    /// KVM could not emulate a guest instruction.
    #[error("KVM internal error (suberror {suberror}) at position {pos}, guest RIP {rip:#x}: the host's KVM could not emulate a guest instruction")]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// Guest RIP.
        rip: u64,
        /// Position.
        pos: u64,
    },
    /// VM entry failed.
    #[error("VM entry failed (hardware reason {0:#x})")]
    FailEntry(u64),
    /// An exit the VMM does not handle.
    #[error("unexpected VM exit {what} at position {pos}")]
    UnexpectedExit {
        /// What came.
        what: String,
        /// Position.
        pos: u64,
    },
    /// Recording or replaying.
    #[error(transparent)]
    Rr(#[from] RrError),
    /// The page trail's directory.
    #[error("{0}")]
    Trail(String),
    /// A preemption point could not be taken or applied.
    #[error("preemption point at position {pos}: {what}")]
    Preempt {
        /// Position.
        pos: u64,
        /// What failed.
        what: String,
    },
    /// Taking or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A re-protect could not go on, and this side could not go on alone either.
    #[error("re-protect: {0}")]
    Reprotect(String),
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed at position {pos}: {source}")]
    Run {
        /// Position.
        pos: u64,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// How a guest run ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest halted with interrupts disabled (Linux's power-off without ACPI).
    PowerOff,
    /// The guest reset the machine (a triple fault: Linux's `reboot=t`, or a panic).
    Reset,
    /// The host asked the VMM to stop (a signal number, or 0 for another reason).
    Stopped(i32),
}

/// Events from the host side to the vCPU loop.
#[derive(Debug)]
pub enum HostEvent {
    /// Bytes typed at the console.
    Input(Vec<u8>),
    /// The console input reached end of file.
    InputClosed,
    /// Stop the guest (the signal that asked, or 0).
    Stop(i32),
    /// Frames are waiting on the NIC's TAP.
    NetReady,
    /// The log channel failed: the loop checks its peer (a halted guest would not).
    PeerLost,
    /// Take a snapshot at the next delivery point (to [`VmConfig::snapshot_on_signal`]).
    Snapshot,
    /// A new backup accepted this live side's handshake: re-protect (see
    /// [`crate::transfer`]).
    BackupJoined(crate::transfer::Joined),
    /// A pre-copy round of a re-protect has sent its pages: a halted guest's loop takes
    /// the next step.
    TransferRound,
}

/// Counters of one run, for benchmarks and the closing log line.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Synchronous exits (the position).
    pub sync_exits: u64,
    /// Port I/O exits.
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// HLT exits.
    pub hlt_exits: u64,
    /// Interrupt-window exits (none are requested; see `prepare_entry`).
    pub window_exits: u64,
    /// Single-step exits taken to reach a point where an interrupt can be injected.
    pub step_exits: u64,
    /// Times single-stepping was started.
    pub step_episodes: u64,
    /// Returns from `KVM_RUN` caused by a kick.
    pub kicks: u64,
    /// Interrupts injected.
    pub injected: u64,
    /// Time spent inside `KVM_RUN` (the guest running, plus the host kernel's share).
    pub in_guest: Duration,
    /// Time the vCPU thread slept waiting for a timer or input while the guest was halted.
    pub idle: Duration,
    /// Time from creating the machine to the first `KVM_RUN`.
    pub setup: Duration,
    /// State digests taken.
    pub digests: u64,
    /// Time spent taking them.
    pub digest_time: Duration,
    /// Dirty pages hashed for them.
    pub digest_pages: u64,
    /// Preemption points: kicks at which an interrupt was delivered (recorded with the
    /// vCPU state, or applied from the log in replay).
    pub preempts: u64,
    /// Pages those points carried.
    pub preempt_pages: u64,
    /// Bytes of state and pages they logged (or applied).
    pub preempt_bytes: u64,
    /// Time they took (capture and logging, or applying).
    pub preempt_time: Duration,
    /// The snapshot taken in this run, if any.
    pub snapshot: Option<SnapshotFigures>,
    /// Time to put a snapshot's memory, vCPU and devices into this machine, if it was
    /// restored (reading and checking the file comes before).
    pub restore: Option<Duration>,
    /// Time it took to read and check the snapshot file.
    pub restore_read: Option<Duration>,
    /// Each re-protect this side made (a new backup joined it).
    pub reprotects: Vec<crate::transfer::ReprotectFigures>,
}

/// Figures of a snapshot taken.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotFigures {
    /// File size.
    pub bytes: u64,
    /// Guest pages stored.
    pub pages_stored: u64,
    /// Time from the delivery point to the file synced.
    pub took: Duration,
}

/// A live backup's output that its primary may not have released yet (DESIGN.md: output at
/// failover): console bytes and transmitted frames its replay produced, from the primary's
/// last reported release point on. Going live, the backup emits all of it: output is then
/// at least once, never lost, and duplicated at most by what the primary released in the
/// last round trip before it died.
#[derive(Debug, Default)]
struct ReplayedOutput {
    console: VecDeque<u8>,
    /// Offset in the guest's console stream of `console[0]`.
    console_base: u64,
    /// Frames, and the number of frames before the first one.
    frames: SharedFrames,
}

/// Transmitted frames kept by a live backup, and how many came before the first one.
type SharedFrames = Arc<std::sync::Mutex<(VecDeque<Vec<u8>>, u64)>>;

impl ReplayedOutput {
    /// Drops what the primary has released (`console` bytes, `frames` frames in all).
    fn trim(&mut self, console: u64, frames: u64) {
        let n = console
            .saturating_sub(self.console_base)
            .min(self.console.len() as u64);
        self.console.drain(..n as usize);
        self.console_base += n;
        let mut f = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let (q, base) = &mut *f;
        let n = frames.saturating_sub(*base).min(q.len() as u64);
        q.drain(..n as usize);
        *base += n;
    }
}

/// A live backup's transmitted frames, kept for [`ReplayedOutput`].
struct KeepFrames(SharedFrames);

impl crate::nic::FrameSink for KeepFrames {
    fn frame(&mut self, frame: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .push_back(frame);
    }
}

/// A handle other threads use to stop the vCPU loop.
#[derive(Debug, Clone)]
pub struct MachineHandle {
    events: Sender<HostEvent>,
    kick: VcpuKick,
    /// Raised on a stop request, for waits that do not read the event channel.
    stop: Arc<AtomicBool>,
}

impl MachineHandle {
    /// Sends an event to the loop and kicks the vCPU so that it is seen soon.
    pub fn send(&self, ev: HostEvent) {
        let stop = matches!(ev, HostEvent::Stop(_));
        if stop {
            self.stop.store(true, Ordering::Release);
        }
        // A snapshot is taken at the next delivery point: a guest running user code without
        // exits is kicked so that the loop sees the request before its next exit.
        let kick = stop || matches!(ev, HostEvent::Snapshot);
        // The loop may be gone already; then there is nothing to tell it.
        let _ = self.events.send(ev);
        if kick {
            self.kick.kick();
        }
    }
}

/// A booted machine, ready to run on the thread that created it.
pub struct Machine {
    // Field order is drop order: the kick is disarmed before the vCPU unmaps the `kvm_run`
    // it writes to, and the vCPU and VM go before the memory they map.
    _kick_arm: KickArm,
    vcpu: VcpuFd,
    vm: VmFd,
    kvm: Kvm,
    mem: GuestMemory,
    mode: Mode,
    digest_interval: u64,
    devices: Devices,
    clock: HostClock,
    layout: BootLayout,
    stats: RunStats,
    console_out: Box<dyn Write + Send>,
    events: Receiver<HostEvent>,
    handle: MachineHandle,
    pending_input: VecDeque<u8>,
    created: Instant,
    /// Single-step delivery: whether the vCPU is being stepped towards an interruptible
    /// instruction, and the budget of the delivery under way.
    stepper: Stepper,
    /// A running hash of every console byte the guest wrote, and their count: part of every
    /// digest, so a replay whose output strays is caught even if its memory converges.
    console_hash: u64,
    console_bytes: u64,
    status_file: Option<PathBuf>,
    role: Role,
    status_written: Option<Instant>,
    /// The network card, if the command line announces one.
    nic: Option<crate::nic::Nic>,
    /// The MMIO bus: the network card's window.
    mmio_bus: MmioBus<MmioDev>,
    /// Decides failover; without one, losing the peer halts.
    arbiter: Option<Box<dyn Arbiter>>,
    /// Where console output goes once a backup goes live.
    live_console: Option<Box<dyn Write + Send>>,
    /// Told of every role change.
    role_listener: Option<RoleListener>,
    /// Where a replay diverged, for the status file.
    divergence: Option<serde_json::Value>,
    /// Test only: flip a byte of guest memory at this position (see [`VmConfig`]).
    corrupt_at: Option<u64>,
    /// Keeps the bytes behind the last digests (`--page-trail`).
    trail: Option<crate::trail::TrailWriter>,
    /// A live backup's output not yet known to be released by its primary.
    replayed_output: Option<ReplayedOutput>,
    /// Pages dirtied since the last digest and since the last shared point.
    dirty: DirtyTracker,
    /// Kicks runs that outlast the preemption quantum (`None`: preemption is off).
    watchdog: Option<crate::preempt::Watchdog>,
    /// When the last synchronous exit happened.
    since_exit: Instant,
    /// In a replay that applied a preemption point, the hash of every guest page as last
    /// seen (see [`DigestPages`]).
    baseline: Option<Vec<u64>>,
    /// The guest image, when a snapshot is to be taken or was restored.
    image: Option<ImageId>,
    /// The snapshot to take.
    snapshot_at: Option<SnapshotRequest>,
    /// Where a snapshot asked for while running goes, and whether one was asked for.
    snapshot_on_signal: Option<PathBuf>,
    snapshot_wanted: bool,
    /// A restored machine starts at its snapshot's delivery point: whether the guest had
    /// halted there.
    resume_halted: Option<bool>,
    /// Where a new backup will listen once this side runs alone (`--next-backup`).
    reprotect: Option<Arc<crate::transfer::ReprotectConfig>>,
    /// Stops the thread that waits for that backup.
    connector_cancel: Option<Arc<AtomicBool>>,
    /// A new backup that joined, not yet taken up at a delivery point.
    joined: Option<crate::transfer::Joined>,
    /// A re-protect under way (pre-copy rounds).
    joining: Option<Joining>,
    /// The output rule a re-protected side started for itself.
    output_rule: Option<crate::transfer::OutputRule>,
    /// A halted guest's wait at a delivery point ended for a re-protect step: the delivery
    /// point is done again from its start (nothing of it has reached a log yet).
    redo_delivery: bool,
}

/// A re-protect under way: the channel to the new backup, the generation opened for it,
/// the round in flight.
struct Joining {
    sender: Arc<logchannel::transport::LogSender>,
    since: Instant,
    generation: u64,
    round: Option<crate::transfer::Round>,
    rounds: u32,
    figures: crate::transfer::ReprotectFigures,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("layout", &self.layout)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Creates the VM, loads the guest and sets up the vCPU, on the calling thread (which
    /// must be the one that calls [`Machine::run`]). Console output goes to `console_out`.
    pub fn new(
        cfg: &VmConfig,
        console_out: Box<dyn Write + Send>,
        mode: Mode,
    ) -> Result<Self, MachineError> {
        let created = Instant::now();
        if let Some(cpu) = cfg.cpu {
            crate::hostcpu::pin_current_thread(cpu)?;
        }
        let kvm = vstate::open_kvm(&cfg.kvm_path)?;
        let mem = memory::create_guest_memory(cfg.mem_mib)?;
        let image = if cfg.restore.is_some()
            || cfg.snapshot_at.is_some()
            || cfg.snapshot_on_signal.is_some()
        {
            Some(ImageId::of(
                &cfg.kernel,
                cfg.initrd.as_deref(),
                &cfg.cmdline,
                cfg.mem_mib,
            )?)
        } else {
            None
        };
        let restore_t0 = Instant::now();
        let layout = match (&cfg.restore, &image) {
            (Some(snap), Some(image)) => {
                snap.state.image.check(image)?;
                // Fresh memory is all zero: the snapshot's pages are all there is to write.
                snap.write_memory(&mem)?;
                snap.state.layout
            }
            _ => boot::load_guest(&mem, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?,
        };
        let vm = vstate::create_vm(&kvm, &mem, mode.wants_digests())?;
        // Pages the loader wrote are the same on every side (the image hashes are in the
        // log header): digests start from a clean bitmap.
        crate::dirty::reset_vmm_dirty(&mem);
        let mut vcpu = vm.create_vcpu(0).map_err(|source| VstateError::Ioctl {
            what: "create vCPU",
            source,
        })?;
        cpuid::configure(&kvm, &vcpu)?;
        match &cfg.restore {
            Some(snap) => snap.state.vcpu.restore(&vcpu)?,
            None => boot::setup_vcpu_regs(&vcpu, &layout)?,
        }
        // SAFETY: the guard is the first field of the machine, so it is dropped (disarmed)
        // before `vcpu`, on this thread (it is not `Send`); it is never leaked on its own.
        let kick_arm = unsafe { KickArm::arm(&mut vcpu)? };
        let kick = kick_arm.kicker();
        let watchdog = match cfg.preempt_quantum {
            Some(q) if !q.is_zero() => Some(
                crate::preempt::Watchdog::start(kick.clone(), q).map_err(|e| {
                    MachineError::Preempt {
                        pos: 0,
                        what: format!("starting the watchdog thread: {e}"),
                    }
                })?,
            ),
            _ => None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut mode = mode;
        mode.attach_stop_flag(stop.clone());
        let nic = match crate::nic::from_cmdline(&cfg.cmdline) {
            Some(mac) => {
                let tap = if mode.is_replay() {
                    None
                } else {
                    cfg.tap.as_deref()
                };
                let nic = crate::nic::Nic::new(&mem, mac, tap, None)?;
                let wake = tx.clone();
                nic.spawn_watcher(move || wake.send(HostEvent::NetReady).is_ok())
                    .map_err(|e| crate::nic::NicError::Transport(format!("TAP watcher: {e}")))?;
                Some(nic)
            }
            None if cfg.tap.is_some() => {
                return Err(MachineError::NoNic(crate::nic::cmdline_words(None)))
            }
            None => None,
        };
        let dirty = DirtyTracker::new(&mem);
        let mut machine = Machine {
            _kick_arm: kick_arm,
            vcpu,
            vm,
            kvm,
            mem,
            clock: HostClock::new(mode.is_replay()),
            mode,
            digest_interval: cfg.digest_interval,
            devices: Devices::new(),
            layout,
            stats: RunStats::default(),
            console_out,
            events: rx,
            handle: MachineHandle {
                events: tx,
                kick,
                stop,
            },
            pending_input: VecDeque::new(),
            created,
            stepper: Stepper::new(),
            console_hash: 0,
            console_bytes: 0,
            mmio_bus: mmio_bus(nic.is_some()),
            nic,
            arbiter: None,
            live_console: None,
            role_listener: None,
            divergence: None,
            corrupt_at: cfg.corrupt_at,
            replayed_output: None,
            dirty,
            watchdog,
            since_exit: Instant::now(),
            baseline: None,
            trail: match &cfg.page_trail {
                Some((dir, keep, from)) => Some(
                    crate::trail::TrailWriter::new(dir, *keep, *from)
                        .map_err(|e| MachineError::Trail(e.to_string()))?,
                ),
                None => None,
            },
            status_file: cfg.status_file.clone(),
            role: cfg.role,
            status_written: None,
            image,
            snapshot_at: cfg.snapshot_at.clone(),
            snapshot_on_signal: cfg.snapshot_on_signal.clone(),
            snapshot_wanted: false,
            resume_halted: None,
            reprotect: None,
            connector_cancel: None,
            joined: None,
            joining: None,
            output_rule: None,
            redo_delivery: false,
        };
        if let Some(snap) = &cfg.restore {
            machine.restore_from(snap)?;
            machine.stats.restore = Some(restore_t0.elapsed());
            machine.stats.restore_read = Some(snap.read_time);
        }
        if machine.mode.primary_released().is_some() {
            let out = ReplayedOutput::default();
            if let Some(nic) = &mut machine.nic {
                nic.set_frame_sink(Box::new(KeepFrames(out.frames.clone())));
            }
            machine.replayed_output = Some(out);
        }
        Ok(machine)
    }

    /// Gives a backup's card the TAP it connects to if it goes live (opened at start-up,
    /// before the backup can claim at the arbiter).
    pub fn set_standby_tap(&mut self, tap: crate::tap::Tap) -> Result<(), MachineError> {
        match &mut self.nic {
            Some(nic) => {
                nic.set_standby(tap);
                Ok(())
            }
            None => Err(MachineError::NoNic(crate::nic::cmdline_words(None))),
        }
    }

    /// A handle to stop the loop or feed it console input from other threads.
    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Where the guest was loaded.
    pub fn layout(&self) -> &BootLayout {
        &self.layout
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The counters so far.
    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    /// The current position: synchronous exits so far.
    pub fn position(&self) -> Position {
        Position(self.stats.sync_exits)
    }

    /// The record/replay mode (for its counters).
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Runs the guest until it powers off, resets, is stopped, or fails; then ends the log
    /// (recording) or checks its end (replay). Returns the outcome and, when recording, the
    /// log's size in bytes.
    pub fn run(&mut self) -> Result<(RunOutcome, u64), MachineError> {
        let mut result = self.run_loop();
        if let Err(MachineError::Rr(RrError::Interrupted)) = result {
            // A replay waiting for its primary was asked to stop.
            let mut sig = 0;
            while let Ok(ev) = self.events.try_recv() {
                if let HostEvent::Stop(s) = ev {
                    sig = s;
                }
            }
            result = Ok(RunOutcome::Stopped(sig));
        }
        let pos = self.position();
        if let Some(req) = &self.snapshot_at {
            eprintln!(
                "twinvm: no snapshot written to {}: the guest ended at position {pos}, {} position {}",
                req.path.display(),
                if req.pos < pos { "past" } else { "before" },
                req.pos
            );
        }
        if let Err(MachineError::Rr(RrError::Divergence {
            pos: at,
            entry,
            what,
        })) = &result
        {
            self.divergence = Some(serde_json::json!({
                "position": at,
                "log_entry": entry,
                "what": what,
            }));
            if self.mode.report_divergence(Position(*at), what) {
                eprintln!("twinvm: told the primary that this backup diverged at position {at}");
            }
        }
        let end = match &result {
            Ok(RunOutcome::PowerOff) => Some(EndReason::PowerOff),
            Ok(RunOutcome::Reset) => Some(EndReason::Reset),
            // A stop that the replayed log asked for was checked where it happened.
            Ok(RunOutcome::Stopped(0)) if self.mode.is_replay() => None,
            // A replay stopped by a signal has nothing to check.
            Ok(RunOutcome::Stopped(_)) if self.mode.is_replay() => None,
            Ok(RunOutcome::Stopped(_)) => Some(EndReason::Stopped),
            Err(e) if !self.mode.is_replay() => Some(EndReason::Error(e.to_string())),
            Err(_) => None,
        };
        let mut finished = Ok(());
        if let Some(reason) = end {
            // The guest's state where it powered off or reset is a function of the log, so
            // it gets a final digest; a stop may come in the middle of guest execution (a
            // kick), where there is nothing exact to compare.
            if matches!(reason, EndReason::PowerOff | EndReason::Reset) {
                finished = self.digest_now(pos);
            }
            if finished.is_ok() {
                // A dead channel here settles failover like any other peer loss.
                finished = self.rr(|m| m.end(pos, reason.clone()));
            }
            // A live primary's guest is done: everything it produced waits for the backup's
            // acks, and a backup lost meanwhile is settled through the arbiter too.
            if finished.is_ok() && result.is_ok() {
                finished = self.rr(|m| m.drain());
            }
        }
        let state = match &result {
            Ok(o) => format!("ended: {o:?}"),
            Err(MachineError::Rr(RrError::Divergence { .. })) => "diverged".to_string(),
            Err(_) => "failed".to_string(),
        };
        self.write_status_now(pos, &state);
        if let Some(c) = self.connector_cancel.take() {
            c.store(true, Ordering::Release);
        }
        self.joining = None;
        self.joined = None;
        let bytes = match std::mem::replace(&mut self.mode, Mode::Live) {
            Mode::Record(r) => r.finish(),
            other => {
                self.mode = other;
                Ok(0)
            }
        };
        self.finish_output_rule();
        // How the guest ended comes first: a side halted by the arbiter must say so, not
        // report the dead channel its recorder could not finish on.
        let outcome = result?;
        finished?;
        Ok((outcome, bytes?))
    }

    fn run_loop(&mut self) -> Result<RunOutcome, MachineError> {
        self.stats.setup = self.created.elapsed();
        // Position 0 is a delivery point too: nothing can be pending yet, but the window
        // request is set up the same way as after every exit. A restored machine starts at
        // its snapshot's delivery point, as the original went on from it.
        let halted = self.resume_halted.take().unwrap_or(false);
        if let Some(outcome) = self.delivery_point(halted)? {
            return Ok(outcome);
        }
        loop {
            if self.mode.is_replay() {
                // The primary may have preempted its guest after this position's exit: then
                // the state it had there comes from the log instead of running to it.
                if let Some(outcome) = self.replay_preemptions()? {
                    return Ok(outcome);
                }
            }
            vstate::clear_kick(&mut self.vcpu);
            let t0 = Instant::now();
            if let Some(w) = &self.watchdog {
                w.entering();
            }
            let exit = self.vcpu.run();
            if let Some(w) = &self.watchdog {
                w.left();
            }
            let ran = t0.elapsed();
            self.stats.in_guest += ran;
            let exit = match vcpu::exit::classify(exit) {
                Ok(Run::Kick) => None,
                Ok(Run::Mmio(access)) => {
                    mmio_access(&self.mmio_bus, &mut self.nic, access);
                    Some(Exit::Mmio)
                }
                Ok(Run::Exit(exit)) => Some(exit),
                Err(source) => {
                    return Err(MachineError::Run {
                        pos: self.stats.sync_exits,
                        source,
                    })
                }
            };
            let Some(exit) = exit else {
                // A kick: not a synchronous exit, so not an ordinary delivery point. A stop
                // request is acted on here; and a run that lasted the preemption quantum
                // becomes a preemption point if an interrupt is due and can be taken.
                self.stats.kicks += 1;
                if let Some(outcome) = self.drain_events()? {
                    return Ok(outcome);
                }
                if let Some(outcome) = self.maybe_preempt(ran)? {
                    return Ok(outcome);
                }
                continue;
            };
            self.stats.sync_exits += 1;
            self.since_exit = Instant::now();
            let halted = match self.on_exit(exit)? {
                AfterExit::Go { halted } => halted,
                AfterExit::End(outcome) => return Ok(outcome),
            };
            self.flush_console();
            if let Some(nic) = &mut self.nic {
                // Frames the guest sent at this position.
                nic.flush_tx();
            }
            self.devices.raise_lines(self.nic.as_mut());
            if let Some(outcome) = self.delivery_point(halted)? {
                return Ok(outcome);
            }
        }
    }

    /// Handles one synchronous exit: one handler per kind, each doing what the instruction
    /// asked of the machine. Returns whether the guest halted, or how the run ends.
    fn on_exit(&mut self, exit: Exit) -> Result<AfterExit, MachineError> {
        match exit {
            Exit::Pio => {
                self.stats.pio_exits += 1;
                self.on_pio()?;
                Ok(AfterExit::Go { halted: false })
            }
            Exit::Mmio => {
                // Completed by the MMIO bus when the exit was classified.
                self.stats.mmio_exits += 1;
                Ok(AfterExit::Go { halted: false })
            }
            Exit::Hlt => {
                self.stats.hlt_exits += 1;
                if self.vcpu.get_kvm_run().if_flag == 0 {
                    // `hlt` with interrupts off: nothing can wake the guest (Linux's
                    // power-off without ACPI).
                    self.flush_console();
                    return Ok(AfterExit::End(RunOutcome::PowerOff));
                }
                Ok(AfterExit::Go { halted: true })
            }
            Exit::Window => {
                self.stats.window_exits += 1;
                Ok(AfterExit::Go { halted: false })
            }
            Exit::Step => {
                self.stats.step_exits += 1;
                if self.stepper.stepped() {
                    self.scrub_pushed_tf()?;
                }
                Ok(AfterExit::Go { halted: false })
            }
            Exit::Shutdown => {
                self.flush_console();
                Ok(AfterExit::End(RunOutcome::Reset))
            }
            Exit::Internal => {
                self.flush_console();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the run structure's union.
                let suberror =
                    unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Err(MachineError::Internal {
                    suberror,
                    rip,
                    pos: self.stats.sync_exits,
                })
            }
            Exit::FailEntry(reason) => Err(MachineError::FailEntry(reason)),
            Exit::Other(what) => Err(MachineError::UnexpectedExit {
                what,
                pos: self.stats.sync_exits,
            }),
        }
    }

    /// A port access: the device on the port bus answers; a time-dependent read goes
    /// through the log (recorded, or answered from it in a replay).
    fn on_pio(&mut self) -> Result<(), MachineError> {
        let (port, is_in) = {
            let pio = vstate::pio_exit(&mut self.vcpu);
            (pio.port, pio.is_in)
        };
        if is_in && self.devices.is_time_dependent(port) && self.mode.is_replay() {
            // A live backup learns here if its primary is gone, before the device answers
            // from a clock that has not started yet.
            let pos = self.position();
            self.rr(|m| m.prefetch(pos))?;
        }
        let pio = vstate::pio_exit(&mut self.vcpu);
        self.devices
            .pio(pio.port, pio.size, pio.is_in, pio.data, &self.clock);
        if pio.is_in && self.devices.is_time_dependent(pio.port) {
            // The answer goes through the log (a lost peer settles failover first, like
            // every other hook), then back into the exit's data.
            let port = pio.port;
            let mut data = pio.data.to_vec();
            let pos = self.position();
            self.rr(|m| m.time_read(pos, port, &mut data))?;
            vstate::pio_exit(&mut self.vcpu).data.copy_from_slice(&data);
            self.devices.observe_time_read(port, &data);
        }
        Ok(())
    }

    /// Lets KVM finish the instruction of the last exit (an `in`'s value into RAX and RIP
    /// past it, a string instruction's next round) and refresh the run structure's flags,
    /// without running the guest: `KVM_RUN` with `immediate_exit` set completes pending
    /// I/O and returns EINTR before entering the guest (KVM API, `immediate_exit`). Until
    /// then the registers KVM reports are those of before the instruction.
    fn complete_pending_io(&mut self) -> Result<(), MachineError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = match self.vcpu.run() {
            Ok(VcpuExit::Intr) => Ok(None),
            Ok(other) => Ok(Some(format!("{other:?}"))),
            Err(e) => Err(e),
        };
        vstate::clear_kick(&mut self.vcpu);
        let pos = self.position();
        match r {
            Ok(None) => Ok(()),
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(MachineError::Run {
                pos: pos.get(),
                source,
            }),
            Ok(Some(what)) => Err(MachineError::UnexpectedExit {
                what: format!("{what} while completing the last exit's I/O"),
                pos: pos.get(),
            }),
        }
    }

    /// The machine's state at this delivery point, as a snapshot writes it. Takes what the
    /// devices transmitted first (a snapshot has no output in flight), completes the last
    /// exit's I/O, and reads the dirty log into the pages the next digest carries.
    pub fn snapshot_state(
        &mut self,
        pos: Position,
        halted: bool,
    ) -> Result<crate::snapshot::SnapshotState, MachineError> {
        use crate::snapshot::{DeviceState, SnapshotState, VcpuState, VmmState};
        let (stepping, step_budget, stepping_pushf) = self.stepper.state();
        self.flush_console();
        if let Some(nic) = &mut self.nic {
            nic.flush_tx();
        }
        let image = self.image.clone().ok_or_else(|| {
            SnapshotError::Unsupported("the guest image's identity was not computed".into())
        })?;
        self.complete_pending_io()?;
        if self.mode.wants_digests() {
            self.carry_dirty_pages()?;
        }
        Ok(SnapshotState {
            image,
            layout: self.layout,
            vcpu: VcpuState::save(&self.kvm, &self.vcpu)?,
            devices: DeviceState {
                pic: self.devices.pic.clone(),
                pit: self.devices.pit.clone(),
                cmos: self.devices.cmos.state(),
                serial: self.devices.serial.state(),
                clock: self.devices.clock.clone(),
                nic: self.nic.as_ref().map(|n| n.transport.state()),
            },
            vmm: VmmState {
                position: pos.get(),
                halted,
                mono_ns: if self.mode.is_replay() {
                    self.devices.clock.seen_ns()
                } else {
                    self.clock.mono_ns()
                },
                console_hash: self.console_hash,
                console_bytes: self.console_bytes,
                stepping,
                step_budget,
                stepping_pushf,
                pending_input: self.pending_input.iter().copied().collect(),
                dirty_since_digest: self.dirty.since_digest(&self.mem),
                log: self.mode.log_point(),
            },
        })
    }

    /// Drops KVM's mappings of guest memory, as a VM restored from a snapshot starts without
    /// them: on this project's software KVM, which writes of a page the dirty log records
    /// was measured to depend on the mappings built before (a replay whose VM was reset at
    /// a position logged pages its recording, not reset, had not). The machine that takes a
    /// snapshot, the one restored from it and every replay of the log that records it then
    /// go on from the same state.
    fn reset_mmu(&mut self) -> Result<(), MachineError> {
        let log_dirty = self.mode.wants_digests();
        if log_dirty {
            // Deleting a slot drops its dirty log: what it holds goes to the next digest.
            self.carry_dirty_pages()?;
        }
        vstate::reset_memory_slots(&self.vm, &self.mem, log_dirty)?;
        Ok(())
    }

    /// Moves the pages dirtied since the last digest from KVM's dirty log (and vm-memory's
    /// bitmap) into the set the next digest covers.
    fn carry_dirty_pages(&mut self) -> Result<(), MachineError> {
        self.dirty
            .collect(&self.vm, &self.mem)
            .map_err(RrError::Kvm)?;
        Ok(())
    }

    /// Writes a snapshot of the machine at this delivery point to `path`.
    fn take_snapshot(
        &mut self,
        pos: Position,
        halted: bool,
        path: &Path,
    ) -> Result<(), MachineError> {
        let t0 = Instant::now();
        let state = self.snapshot_state(pos, halted)?;
        let w = crate::snapshot::write(path, &state, &self.mem)?;
        if self.mode.is_replay() && !self.mode.snapshot_logged_at(pos) {
            eprintln!(
                "twinvm: note: this snapshot was taken in a replay where the recording took none; on a host whose dirty log depends on the VM's mapping history (this project's software KVM), a replay from it may report pages its recording did not log (see README: snapshots)"
            );
        }
        self.rr(|m| m.snapshot_taken(pos, w.sha256))?;
        let took = t0.elapsed();
        eprintln!(
            "twinvm: snapshot at position {pos} written to {}: {} bytes ({} of {} pages stored) in {:.1} ms, sha256 {}",
            path.display(),
            w.bytes,
            w.pages_stored,
            w.pages_total,
            took.as_secs_f64() * 1e3,
            crate::snapshot::hex(&w.sha256)
        );
        self.stats.snapshot = Some(SnapshotFigures {
            bytes: w.bytes,
            pages_stored: w.pages_stored,
            took,
        });
        Ok(())
    }

    /// Puts the devices and the VMM's own state of a fresh machine in a snapshot's (memory
    /// and the vCPU's registers are written before the machine is assembled).
    fn restore_from(&mut self, snap: &Snapshot) -> Result<(), MachineError> {
        let st = &snap.state;
        self.devices.pic = st.devices.pic.clone();
        self.devices.pit = st.devices.pit.clone();
        self.devices.cmos = crate::devices::cmos::Cmos::from_state(&st.devices.cmos)
            .ok_or_else(|| SnapshotError::Corrupt("the CMOS RAM is not 128 bytes".into()))?;
        self.devices.serial =
            SerialConsole::from_state(&st.devices.serial).map_err(SnapshotError::Corrupt)?;
        self.devices.clock = st.devices.clock.clone();
        match (&mut self.nic, &st.devices.nic) {
            (Some(nic), Some(s)) => nic
                .transport
                .restore(s)
                .map_err(|e| SnapshotError::Corrupt(format!("virtio-net: {e}")))?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(SnapshotError::Mismatch(
                    "this VMM has a NIC, the snapshot's guest had none".into(),
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(SnapshotError::Mismatch(
                    "the snapshot's guest had a NIC: restore it with --nic or --tap".into(),
                )
                .into())
            }
        }
        let v = &st.vmm;
        // The guest's monotonic time goes on from where it stood: the time the snapshot
        // spent on disk is not the guest's. (The RTC follows the host's wall clock.)
        self.clock = HostClock::starting_at(v.mono_ns, self.mode.is_replay());
        self.stats.sync_exits = v.position;
        self.console_hash = v.console_hash;
        self.console_bytes = v.console_bytes;
        self.stepper = Stepper::restored(v.step_budget, v.stepping_pushf);
        // A replay's console input comes from the log only.
        if !self.mode.is_replay() {
            self.pending_input = v.pending_input.iter().copied().collect();
        }
        self.dirty.mark(&self.mem, &v.dirty_since_digest);
        self.resume_halted = Some(v.halted);
        self.set_stepping(v.stepping)?;
        // Writing memory marked every stored page in vm-memory's bitmap; the digests of the
        // original did not see those writes.
        reset_vmm_dirty(&self.mem);
        // The run structure's flags (`ready_for_interrupt_injection`, `if_flag`) are read at
        // the first delivery point: KVM fills them in at a KVM_RUN.
        self.complete_pending_io()?;
        if tracing::enabled!(tracing::Level::DEBUG) {
            if let Ok(f) = self.vcpu.get_fpu() {
                tracing::debug!(
                    "FPU after the first KVM_RUN: xmm0 {:02x?} xmm1 {:02x?}, mxcsr {:#x}",
                    f.xmm[0],
                    f.xmm[1],
                    f.mxcsr
                );
            }
        }
        Ok(())
    }

    /// Lets this side, once it runs the VM alone, take a new backup (re-protect): see
    /// [`crate::transfer`]. The guest image's identity goes into the state it sends.
    pub fn set_reprotect(&mut self, cfg: crate::transfer::ReprotectConfig) {
        self.image = Some(cfg.image.clone());
        self.reprotect = Some(Arc::new(cfg));
        if matches!(self.role, Role::Alone | Role::LiveAfterFailover) {
            self.start_connector();
        }
    }

    /// Starts waiting for a new backup, if this side may take one and is not waiting yet.
    fn start_connector(&mut self) {
        let Some(cfg) = self.reprotect.clone() else {
            return;
        };
        if let Some(c) = self.connector_cancel.take() {
            c.store(true, Ordering::Release);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let handle = self.handle.clone();
        let addr = cfg.addr;
        match crate::transfer::spawn_connector(cfg, cancel.clone(), move |j| {
            handle.send(HostEvent::BackupJoined(j))
        }) {
            Ok(_) => {
                eprintln!("twinvm: re-protect: waiting for a new backup at {addr}");
                self.connector_cancel = Some(cancel);
            }
            Err(e) => eprintln!("twinvm: re-protect: cannot start the connector thread: {e}"),
        }
    }

    /// At a delivery point: takes up a new backup that joined (opens the next generation at
    /// the arbiter, starts the first pre-copy round), starts the next round when one has
    /// ended, and stops for the rest when the rounds have converged (or at once, without
    /// rounds). A failure on the way lets the new backup go: this side goes on alone.
    fn reprotect_step(&mut self, pos: Position, halted: bool) -> Result<(), MachineError> {
        if let Some(j) = self.joined.take() {
            self.begin_reprotect(j, pos)?;
        }
        let Some(j) = &mut self.joining else {
            return Ok(());
        };
        if j.round.as_ref().is_some_and(|r| !r.is_done()) {
            return Ok(());
        }
        if let Some(r) = j.round.take() {
            match r.join() {
                Ok((pages, bytes)) => {
                    j.figures.push_round(pages);
                    j.figures.bytes += bytes;
                    j.rounds += 1;
                }
                Err(e) => return self.abandon_reprotect(&e.to_string()),
            }
        }
        let cfg = self.reprotect.clone().expect("a re-protect has its config");
        let rounds = self.joining.as_ref().map_or(0, |j| j.rounds);
        if cfg.max_rounds == 0 {
            return self.finish_reprotect(pos, halted, None);
        }
        // What the guest dirtied while the last round was sent.
        self.carry_dirty_pages()?;
        let dirty = self.dirty.take_since_common(&self.mem);
        if rounds >= cfg.max_rounds || dirty.len() <= cfg.stop_pages {
            return self.finish_reprotect(pos, halted, Some(dirty));
        }
        let Some(j) = &mut self.joining else {
            return Ok(());
        };
        let wake = self.handle.clone();
        match crate::transfer::Round::start(
            j.sender.clone(),
            self.mem.clone(),
            pos,
            rounds,
            dirty,
            move || wake.send(HostEvent::TransferRound),
        ) {
            Ok(r) => j.round = Some(r),
            Err(e) => return self.abandon_reprotect(&format!("starting a pre-copy round: {e}")),
        }
        Ok(())
    }

    /// A new backup joined: the next generation is opened for the new pair, and the first
    /// pre-copy round (every page) starts from a clean dirty log.
    fn begin_reprotect(
        &mut self,
        j: crate::transfer::Joined,
        pos: Position,
    ) -> Result<(), MachineError> {
        let since = Instant::now();
        let peer = j.0.peer();
        let Some(arbiter) = self.arbiter.as_mut() else {
            eprintln!(
                "twinvm: re-protect: no arbiter (--arbiter): the new backup at {peer} is let go"
            );
            return Ok(());
        };
        let was = arbiter.describe();
        let generation = match arbiter.re_pair() {
            Ok(g) => g,
            Err(e) => {
                // Nothing changed at the arbiter: this side goes on alone as it was.
                eprintln!("twinvm: re-protect: {e}; the new backup at {peer} is let go");
                self.start_connector();
                return Ok(());
            }
        };
        eprintln!(
            "twinvm: re-protect: the new backup at {peer} joined at position {pos}; re-paired {was}: generation {generation} is open for the new pair"
        );
        // The dirty log from here on is what the rounds send again.
        self.carry_dirty_pages()?;
        let _ = self.dirty.take_since_digest(&self.mem);
        let cfg = self.reprotect.clone().expect("a re-protect has its config");
        let mut joining = Joining {
            sender: j.0,
            since,
            generation,
            round: None,
            rounds: 0,
            figures: crate::transfer::ReprotectFigures {
                generation,
                ..Default::default()
            },
        };
        if cfg.max_rounds > 0 {
            let npages: u64 = self.mem.iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE;
            let wake = self.handle.clone();
            match crate::transfer::Round::start(
                joining.sender.clone(),
                self.mem.clone(),
                pos,
                0,
                (0..npages).collect(),
                move || wake.send(HostEvent::TransferRound),
            ) {
                Ok(r) => joining.round = Some(r),
                Err(e) => {
                    self.joining = Some(joining);
                    return self.abandon_reprotect(&format!("starting the first round: {e}"));
                }
            }
        }
        self.joining = Some(joining);
        Ok(())
    }

    /// The stop: the guest stays at this delivery point while the pages dirtied since the
    /// last round (`dirty`; `None`: stop-and-copy, every page) and the machine's state go to
    /// the new backup; then this side streams its log from here, a primary with the output
    /// rule.
    fn finish_reprotect(
        &mut self,
        pos: Position,
        halted: bool,
        dirty: Option<Vec<u64>>,
    ) -> Result<(), MachineError> {
        let t0 = Instant::now();
        let Some(mut j) = self.joining.take() else {
            return Ok(());
        };
        let cfg = self.reprotect.clone().expect("a re-protect has its config");
        let mut state = self.snapshot_state(pos, halted)?;
        // Completing the last exit may have written memory: the last pages are read after it.
        let mut last = dirty.unwrap_or_default();
        let pages = if cfg.max_rounds == 0 {
            crate::snapshot::Pages::NonZero
        } else {
            self.carry_dirty_pages()?;
            last.extend(self.dirty.take_since_common(&self.mem));
            last.sort_unstable();
            last.dedup();
            crate::snapshot::Pages::Only(&last)
        };
        // Both machines start the next digest's pages from here.
        state.vmm.dirty_since_digest = Vec::new();
        let (bytes, w) = crate::snapshot::encode(&state, &self.mem, pages)?;
        if let Err(e) = crate::transfer::send_state(&j.sender, pos, j.generation, &bytes) {
            self.joining = Some(j);
            return self.abandon_reprotect(&e.to_string());
        }
        j.figures.push_round(w.pages_stored);
        j.figures.bytes += w.bytes;
        j.figures.pos = pos;
        // From here the log goes to the new backup, and output waits for its acks.
        self.mode = Mode::Record(Box::new(crate::rr::Recorder::live_from(
            j.sender.clone(),
            cfg.lag,
            pos,
        )));
        // The restored machine starts without KVM's mappings and with a clean dirty log.
        self.reset_mmu()?;
        let _ = self.dirty.take_since_digest(&self.mem);
        self.baseline = None;
        self.replayed_output = None;
        let handle = self.handle.clone();
        let (rule, held) = crate::transfer::OutputRule::start(j.sender.clone(), move || {
            handle.send(HostEvent::PeerLost)
        })
        .map_err(|e| MachineError::Reprotect(format!("starting the output rule's threads: {e}")))?;
        let tap = self.hold_frames(Box::new(held.clone()))?;
        rule.set_tap(tap);
        self.console_out = Box::new(held);
        // The rule of an earlier re-protect lets out what it holds (this side went on alone
        // since) before anything of the new one.
        if let Some(old) = self.output_rule.replace(rule) {
            old.finish();
        }
        j.figures.pause = t0.elapsed();
        j.figures.total = j.since.elapsed();
        let f = j.figures;
        eprintln!(
            "twinvm: re-protected at position {pos}: generation {}, guest paused {:.1} ms, {:.1} ms in all since the new backup joined, pages per round {:?} ({} bytes sent)",
            f.generation,
            f.pause.as_secs_f64() * 1e3,
            f.total.as_secs_f64() * 1e3,
            f.rounds(),
            f.bytes
        );
        self.stats.reprotects.push(f);
        self.set_role(Role::Primary);
        Ok(())
    }

    /// A re-protect failed before the new pair started (the new backup vanished, a send
    /// failed): it is let go, and this side goes on alone. If the next generation was opened
    /// for it, this side claims that one (nobody else can hold it: the new backup never had
    /// a machine to go live with).
    fn abandon_reprotect(&mut self, why: &str) -> Result<(), MachineError> {
        let Some(j) = self.joining.take() else {
            return Ok(());
        };
        drop(j.round);
        eprintln!(
            "twinvm: re-protect failed ({why}): the new backup at {} is let go; this side goes on alone",
            j.sender.peer()
        );
        drop(j.sender);
        let pos = self.position();
        let reason = format!("the joining backup failed: {why}");
        match crate::ft::failover::settle(self.role, self.arbiter.as_deref_mut(), &self.handle.stop)
        {
            Ok(won) => eprintln!(
                "twinvm: re-protect: won {} after {:.0?}",
                won.what, won.after
            ),
            Err(crate::ft::failover::NotWon::Interrupted) => {
                return Err(RrError::Interrupted.into())
            }
            Err(crate::ft::failover::NotWon::Halted(what)) => {
                self.set_role(Role::Halted);
                return Err(MachineError::Halted {
                    pos: pos.get(),
                    reason,
                    what,
                });
            }
            Err(crate::ft::failover::NotWon::Refused { what, why }) => {
                self.set_role(Role::Halted);
                return Err(MachineError::ArbiterRefused {
                    pos: pos.get(),
                    reason,
                    what,
                    why,
                });
            }
        }
        self.start_connector();
        Ok(())
    }

    /// At the end of a run: the output rule of a re-protect lets out what it may.
    fn finish_output_rule(&mut self) {
        let Some(rule) = self.output_rule.take() else {
            return;
        };
        self.flush_console();
        self.console_out = Box::new(std::io::sink());
        if let Some(nic) = &mut self.nic {
            nic.set_frame_sink(Box::new(crate::nic::DropFrames));
        }
        let d = rule.finish();
        if !d.delays.is_empty() {
            eprintln!(
                "twinvm: output rule (since the last re-protect): {} console bytes and {} frames held for the backup's ack: median {:.2?}, p99 {:.2?}",
                d.bytes,
                d.frames,
                d.percentile(0.5),
                d.percentile(0.99)
            );
        }
    }

    /// Sets what decides failover, where a backup's console goes once it is live, and who is
    /// told of role changes.
    pub fn set_failover(
        &mut self,
        arbiter: Option<Box<dyn Arbiter>>,
        live_console: Option<Box<dyn Write + Send>>,
        role_listener: Option<RoleListener>,
    ) {
        self.arbiter = arbiter;
        self.live_console = live_console;
        self.role_listener = role_listener;
    }

    /// Runs a record/replay hook; if it finds the live peer gone, settles failover first
    /// (go on alone, or halt) and runs the hook again in the new mode.
    fn rr<T>(
        &mut self,
        mut f: impl FnMut(&mut Mode) -> Result<T, RrError>,
    ) -> Result<T, MachineError> {
        match f(&mut self.mode) {
            Err(e) if self.mode.is_peer_loss(&e) => {
                self.failover(&e)?;
                f(&mut self.mode).map_err(MachineError::from)
            }
            r => r.map_err(MachineError::from),
        }
    }

    fn set_role(&mut self, role: Role) {
        tracing::info!(
            "role: {} -> {role} at position {}",
            self.role,
            self.position()
        );
        eprintln!(
            "twinvm: role {} -> {role} at position {}",
            self.role,
            self.position()
        );
        self.role = role;
        if let Some(rule) = &self.output_rule {
            rule.decision.follow(role);
        }
        if matches!(role, Role::Alone | Role::LiveAfterFailover) {
            self.start_connector();
        }
        if let Some(l) = &mut self.role_listener {
            l(role);
        }
        let pos = self.position();
        self.write_status_now(pos, "running");
    }

    /// The peer is gone: the failover state machine ([`crate::ft::failover::settle`]) asks
    /// the arbiter whether this side goes on. The winner goes on alone (a backup goes live
    /// first); the loser halts at once.
    fn failover(&mut self, lost: &RrError) -> Result<(), MachineError> {
        use crate::ft::failover::{settle, NotWon};
        let pos = self.position();
        let reason = lost.to_string();
        eprintln!(
            "twinvm: {} lost its peer at position {pos}: {reason}",
            self.role
        );
        let won = match settle(self.role, self.arbiter.as_deref_mut(), &self.handle.stop) {
            Ok(won) => won,
            Err(NotWon::Interrupted) => return Err(RrError::Interrupted.into()),
            Err(NotWon::Halted(what)) => {
                self.set_role(Role::Halted);
                return Err(MachineError::Halted {
                    pos: pos.get(),
                    reason,
                    what,
                });
            }
            Err(NotWon::Refused { what, why }) => {
                self.set_role(Role::Halted);
                return Err(MachineError::ArbiterRefused {
                    pos: pos.get(),
                    reason,
                    what,
                    why,
                });
            }
        };
        eprintln!(
            "twinvm: won {} after {:.0?}; going on alone at position {pos}",
            won.what, won.after
        );
        // What the primary last said it had released, before the channel is let go.
        if let (Some(out), Some((c, f))) = (&mut self.replayed_output, self.mode.primary_released())
        {
            out.trim(c, f);
        }
        self.mode = Mode::Live;
        if won.role == Role::LiveAfterFailover {
            self.go_live()?;
        }
        self.set_role(won.role);
        Ok(())
    }

    /// A backup becomes the machine: the clock runs, its console is shown, its card opens
    /// the TAP and announces the guest's MAC address so the network delivers here.
    fn go_live(&mut self) -> Result<(), MachineError> {
        // Every time-dependent answer so far came from the log and the clock stood at 0; the
        // live clock carries on from the last time the guest read, so its time never goes
        // back.
        self.clock = HostClock::starting_at(self.devices.clock.seen_ns(), false);
        if let Some(out) = self.live_console.take() {
            self.console_out = out;
        }
        if let Some(nic) = &mut self.nic {
            // The TAP was opened when the backup started (see `set_standby_tap`).
            if nic.go_live()? {
                let wake = self.handle.events.clone();
                nic.spawn_watcher(move || wake.send(HostEvent::NetReady).is_ok())
                    .map_err(|e| crate::nic::NicError::Transport(format!("TAP watcher: {e}")))?;
                nic.announce();
            }
        }
        self.emit_unreleased_output();
        Ok(())
    }

    /// A backup that just went live emits what its replay produced after the point its
    /// primary last said it had released (see [`ReplayedOutput`]).
    fn emit_unreleased_output(&mut self) {
        let Some(mut out) = self.replayed_output.take() else {
            return;
        };
        let console: Vec<u8> = out.console.drain(..).collect();
        let frames: Vec<Vec<u8>> = out
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .drain(..)
            .collect();
        eprintln!(
            "twinvm: going live: emitting {} console bytes and {} frames the primary had not released (from console byte {})",
            console.len(),
            frames.len(),
            out.console_base
        );
        if !console.is_empty() {
            if let Err(e) = self
                .console_out
                .write_all(&console)
                .and_then(|()| self.console_out.flush())
            {
                tracing::debug!("console output dropped: {e}");
            }
        }
        if let Some(nic) = &mut self.nic {
            nic.send_frames(frames);
        }
    }

    /// Gives the guest the frames its card has room for (live and recording).
    fn deliver_frames(&mut self, pos: Position) -> Result<(), MachineError> {
        let Some(nic) = &mut self.nic else {
            return Ok(());
        };
        nic.poll_tap();
        while let Some(frame) = self.nic.as_mut().and_then(|n| n.next_rx()) {
            let Some(nic) = &mut self.nic else {
                break;
            };
            match nic.transport.device_mut().deliver_rx(&self.mem, &frame) {
                Ok(crate::devices::virtio::net::RxResult::Delivered) => {
                    // A frame whose entry cannot reach the backup settles failover here,
                    // before the guest runs on it: output that depends on it is released
                    // only if this side goes on alone.
                    self.rr(|m| m.net_rx(pos, &frame))?;
                }
                Ok(other) => {
                    tracing::debug!("received frame dropped: {other:?}");
                }
                Err(e) => tracing::warn!("received frame of {} bytes dropped: {e}", frame.len()),
            }
        }
        self.devices.raise_lines(self.nic.as_mut());
        Ok(())
    }

    /// Lets the primary's output rule hold transmitted frames: replaces the card's frame
    /// sink and returns a writer on its TAP for whoever releases them.
    pub fn hold_frames(
        &mut self,
        sink: Box<dyn crate::nic::FrameSink>,
    ) -> Result<Option<crate::nic::TapWriter>, MachineError> {
        let Some(nic) = &mut self.nic else {
            return Ok(None);
        };
        let writer = nic
            .tap_writer()
            .transpose()
            .map_err(|source| crate::nic::NicError::Dup {
                name: "of the NIC".to_string(),
                source,
            })?;
        nic.set_frame_sink(sink);
        Ok(writer)
    }

    /// Writes what the UART transmitted to the console.
    fn flush_console(&mut self) {
        if self.devices.serial.has_output() {
            let bytes = self.devices.serial.take_output();
            self.console_hash =
                hash_bytes(&[&self.console_hash.to_le_bytes()[..], &bytes].concat());
            self.console_bytes += bytes.len() as u64;
            if let Some(out) = &mut self.replayed_output {
                out.console.extend(&bytes);
            }
            if let Err(e) = self
                .console_out
                .write_all(&bytes)
                .and_then(|()| self.console_out.flush())
            {
                tracing::debug!("console output dropped: {e}");
            }
        }
    }

    /// Takes host events without blocking; returns an outcome if a stop was asked for.
    fn drain_events(&mut self) -> Result<Option<RunOutcome>, MachineError> {
        while let Ok(ev) = self.events.try_recv() {
            if let Some(outcome) = self.take_event(ev) {
                return Ok(Some(outcome));
            }
        }
        Ok(None)
    }

    fn take_event(&mut self, ev: HostEvent) -> Option<RunOutcome> {
        match ev {
            // A replay takes its console input from the log, never from the terminal.
            HostEvent::Input(_) if self.mode.is_replay() => None,
            HostEvent::Input(bytes) => {
                self.pending_input.extend(bytes);
                None
            }
            HostEvent::InputClosed
            | HostEvent::NetReady
            | HostEvent::PeerLost
            | HostEvent::TransferRound => None,
            HostEvent::Snapshot => {
                if self.snapshot_on_signal.is_some() {
                    self.snapshot_wanted = true;
                } else {
                    eprintln!("twinvm: a snapshot was asked for, but no file was given (--snapshot-on-sigusr1)");
                }
                None
            }
            HostEvent::Stop(sig) => {
                self.flush_console();
                Some(RunOutcome::Stopped(sig))
            }
            HostEvent::BackupJoined(j) => {
                if self.role.is_live() && !self.mode.is_paired() && self.joining.is_none() {
                    self.joined = Some(j);
                } else {
                    eprintln!(
                        "twinvm: re-protect: a new backup at {} joined, but this side is {} now: let go",
                        j.0.peer(),
                        self.role
                    );
                }
                None
            }
        }
    }

    /// The work done at a delivery point (right after a synchronous exit): a digest if one
    /// is due, then asynchronous sources raise their lines (from the host, or from the log
    /// in replay), then a pending interrupt is injected if the guest can take it, or an
    /// interrupt window is requested. A live guest that halted with nothing to take waits
    /// here for the next timer deadline or console input.
    fn delivery_point(&mut self, halted: bool) -> Result<Option<RunOutcome>, MachineError> {
        loop {
            let r = self.delivery_point_once(halted)?;
            if !std::mem::take(&mut self.redo_delivery) {
                return Ok(r);
            }
        }
    }

    /// Whether a re-protect has a step to take (a new backup joined, or a round ended).
    fn reprotect_due(&self) -> bool {
        self.joined.is_some()
            || self
                .joining
                .as_ref()
                .is_some_and(|j| j.round.as_ref().is_none_or(|r| r.is_done()))
    }

    fn delivery_point_once(&mut self, halted: bool) -> Result<Option<RunOutcome>, MachineError> {
        let pos = self.position();
        if self.corrupt_at == Some(pos.get()) {
            self.corrupt_guest_memory(pos);
        }
        self.mode.progress(pos);
        if let (Some(out), Some((c, f))) = (&mut self.replayed_output, self.mode.primary_released())
        {
            out.trim(c, f);
        }
        self.rr(|m| m.check_peer())?;
        // A re-protect's rounds, and its stop, come where a snapshot would be taken: the new
        // backup starts from this delivery point as a restored machine does.
        self.reprotect_step(pos, halted)?;
        // Snapshots come before the digest (their entry comes first at a delivery point) and
        // after the progress report: a live backup may wait for its next entry here, and its
        // primary may be waiting for that report. A replay whose recording took a snapshot
        // here does what taking it did to the VM.
        let logged = self.rr(|m| m.snapshot_here(pos))?.is_some();
        let mut taken = false;
        if self.snapshot_at.as_ref().is_some_and(|r| r.pos == pos) {
            if let Some(req) = self.snapshot_at.take() {
                self.take_snapshot(pos, halted, &req.path)?;
                taken = true;
            }
        }
        if std::mem::take(&mut self.snapshot_wanted) {
            if let Some(path) = self.snapshot_on_signal.clone() {
                self.take_snapshot(pos, halted, &path)?;
                taken = true;
            }
        }
        if logged || (taken && !self.mode.is_replay()) {
            self.reset_mmu()?;
        }
        if pos > Position::ZERO && pos.is_multiple_of(self.digest_interval) {
            self.digest_now(pos)?;
        }
        let stop = self.handle.stop.clone();
        self.rr(|m| m.throttle(pos, &stop))?;
        self.write_status(pos);
        if self.rr(|m| m.stopped_here(pos))? {
            return Ok(Some(RunOutcome::Stopped(0)));
        }
        self.deliver(pos, halted, None)
    }

    /// The delivery itself, at an ordinary delivery point or a preemption point: lines
    /// raised (from the host, or from the log in replay), then the pending interrupt injected
    /// or the guest stepped towards a point where it can take it. `ready` overrides what the
    /// last exit said about injecting (at a preemption point the state is the one captured
    /// or applied there).
    fn deliver(
        &mut self,
        pos: Position,
        halted: bool,
        ready: Option<bool>,
    ) -> Result<Option<RunOutcome>, MachineError> {
        loop {
            if let Some(outcome) = self.drain_events()? {
                return Ok(Some(outcome));
            }
            // A halted guest's wait ends for a re-protect's next step, which is taken at the
            // start of a delivery point, as in a running guest (this one is done again:
            // the live side has logged nothing of it).
            if halted && !self.mode.is_paired() && self.reprotect_due() {
                self.redo_delivery = true;
                return Ok(None);
            }
            // A halted guest waits here: a lost peer wakes it (HostEvent::PeerLost).
            self.rr(|m| m.check_peer())?;
            if self.mode.is_replay() {
                while let Some(e) = self.rr(|m| m.next_async(pos))? {
                    self.apply_logged_input(pos, e)?;
                }
                if self.mode.is_replay() {
                    break;
                }
                // The backup just went live: carry on as a live machine.
                continue;
            }
            let now = self.clock.mono_ns();
            // The timer may not starve the other lines: while one of them waits to be
            // delivered, IRQ 0 is not raised (its rises coalesce in the PIT, and the guest's
            // clocksource loses no time by it). A tick the guest has not taken yet is
            // coalesced by the PIC. "Waits" includes a line held back by an IRQ 0 in
            // service: a guest whose timer handler outlasts its tick (single-stepped towards
            // the window of the waiting line) would otherwise be given IRQ 0 again at every
            // window, and the other line never (seen: a console line longer than the UART's
            // FIFO was never read).
            let others_wait = self.devices.pic.others_waiting(PIT_IRQ);
            if !others_wait && self.devices.pit.poll_irq(now) {
                self.devices.pic.pulse(PIT_IRQ);
                self.rr(|m| m.irq_line(pos, PIT_IRQ))?;
            }
            if !self.pending_input.is_empty() {
                let (a, _) = self.pending_input.as_slices();
                let n = self.devices.serial.enqueue_input(a);
                if n > 0 {
                    let taken: Vec<u8> = self.pending_input.drain(..n).collect();
                    self.rr(|m| m.console_in(pos, &taken))?;
                }
                self.devices.raise_lines(self.nic.as_mut());
            }
            self.deliver_frames(pos)?;
            if !halted || self.devices.pic.has_interrupt() {
                break;
            }
            // Halted with nothing to deliver: sleep until the timer is due or input comes.
            let t0 = Instant::now();
            let wait = self
                .devices
                .pit
                .next_irq_deadline()
                .map(|d| Duration::from_nanos(d.saturating_sub(now)));
            let got = match wait {
                Some(w) => self.events.recv_timeout(w),
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            self.stats.idle += t0.elapsed();
            match got {
                Ok(ev) => {
                    if let Some(outcome) = self.take_event(ev) {
                        return Ok(Some(outcome));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The machine holds a sender itself, so the channel never disconnects.
                Err(RecvTimeoutError::Disconnected) => {}
            }
        }
        self.prepare_entry(pos, ready)?;
        if self.rr(|m| m.stopped_here(pos))? {
            return Ok(Some(RunOutcome::Stopped(0)));
        }
        Ok(None)
    }

    /// Whether something waits to be delivered that a preemption point would deliver: a
    /// timer tick that is due, console input, received frames, or a pending PIC request.
    fn delivery_due(&mut self) -> bool {
        let now = self.clock.mono_ns();
        self.devices.pic.has_interrupt()
            || self
                .devices
                .pit
                .next_irq_deadline()
                .is_some_and(|d| d <= now)
            || !self.pending_input.is_empty()
            || self.nic.as_mut().is_some_and(|n| n.rx_waiting())
    }

    /// After a kick: if the run lasted the quantum, something is due and the guest can take
    /// an interrupt where it stopped, this is a preemption point. A recording logs the vCPU
    /// state and the pages dirtied since the last shared point (so that its replay need not
    /// reach this instruction, which no exit marks), then lines are raised and the interrupt
    /// injected as at any delivery point, at the same position.
    fn maybe_preempt(&mut self, ran: Duration) -> Result<Option<RunOutcome>, MachineError> {
        let Some(quantum) = self.watchdog.as_ref().map(|w| w.quantum()) else {
            return Ok(None);
        };
        if self.mode.is_replay()
            || ran < quantum
            || self.vcpu.get_kvm_run().ready_for_interrupt_injection == 0
            || !self.delivery_due()
        {
            return Ok(None);
        }
        let pos = self.position();
        // Guest kernel code exits often (its slow paths here take port I/O, halts and
        // single steps); a run of it that outlasts a quantum ends by itself soon, and
        // preempting it would cost a preemption point (some forty pages) at nearly every
        // tick of a boot. User code is what can run without end: it is preempted after one
        // quantum, the kernel only after KERNEL_QUANTA of them (a busy-wait on `jiffies`).
        let user = self
            .vcpu
            .get_sregs()
            .map(|s| s.cs.selector & 3 == 3)
            .map_err(|e| MachineError::Preempt {
                pos: pos.get(),
                what: format!("reading special registers: {e}"),
            })?;
        if !user && self.since_exit.elapsed() < quantum * KERNEL_QUANTA {
            return Ok(None);
        }
        let t0 = Instant::now();
        let ready = if self.mode.is_recording() {
            let err = |what: String| MachineError::Preempt {
                pos: pos.get(),
                what,
            };
            let state = VcpuState::save(&self.kvm, &self.vcpu).map_err(|e| err(e.to_string()))?;
            self.dirty.collect(&self.vm, &self.mem).map_err(err)?;
            let mut pages = Vec::new();
            for gfn in self.dirty.take_since_common(&self.mem) {
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                self.mem
                    .read_slice(&mut buf, GuestAddress(gfn * PAGE_SIZE))
                    .map_err(|e| err(format!("reading guest page {gfn:#x}: {e}")))?;
                pages.push((gfn, buf));
            }
            let vcpu = state.encode().map_err(|e| err(e.to_string()))?;
            self.stats.preempt_pages += pages.len() as u64;
            self.stats.preempt_bytes += (vcpu.len() + pages.len() * PAGE_SIZE as usize) as u64;
            // An entry's payload is bounded (1 MiB): pages beyond one entry's share go first.
            while pages.len() > PREEMPT_PAGES_PER_ENTRY {
                let rest = pages.split_off(PREEMPT_PAGES_PER_ENTRY);
                let entry = Entry::PreemptPages {
                    pos,
                    pages: std::mem::replace(&mut pages, rest),
                };
                self.rr(|m| m.preempt(&entry))?;
            }
            let entry = Entry::Preempt { pos, vcpu, pages };
            self.rr(|m| m.preempt(&entry))?;
            state.interruptible()
        } else {
            true
        };
        self.stats.preempts += 1;
        self.stats.preempt_time += t0.elapsed();
        self.deliver(pos, false, Some(ready))
    }

    /// In replay, before entering the guest at `pos`: every preemption point the log has
    /// here is applied (the vCPU state, then the pages), and the delivery logged after it
    /// follows, as the primary did it.
    fn replay_preemptions(&mut self) -> Result<Option<RunOutcome>, MachineError> {
        let pos = self.position();
        while let Some(entry) = self.rr(|m| m.next_preempt(pos))? {
            let t0 = Instant::now();
            let err = |what: String| MachineError::Preempt {
                pos: pos.get(),
                what,
            };
            let (vcpu, pages) = match entry {
                Entry::Preempt { vcpu, pages, .. } => (Some(vcpu), pages),
                Entry::PreemptPages { pages, .. } => (None, pages),
                _ => unreachable!("next_preempt returns preemption entries only"),
            };
            for (gfn, bytes) in &pages {
                if bytes.len() != PAGE_SIZE as usize {
                    return Err(err(format!(
                        "page {gfn:#x} has {} bytes in the log",
                        bytes.len()
                    )));
                }
                self.mem
                    .write_slice(bytes, GuestAddress(gfn * PAGE_SIZE))
                    .map_err(|e| err(format!("writing guest page {gfn:#x}: {e}")))?;
            }
            self.stats.preempt_pages += pages.len() as u64;
            self.stats.preempt_bytes += (pages.len() * PAGE_SIZE as usize) as u64;
            let Some(vcpu) = vcpu else {
                // More pages of the same point follow.
                self.stats.preempt_time += t0.elapsed();
                continue;
            };
            let state = VcpuState::decode(&vcpu).map_err(|e| err(e.to_string()))?;
            // The exit at `pos` must be finished before its result is replaced: KVM would
            // otherwise apply it to the restored state at the next entry.
            self.complete_pending_io()?;
            // What KVM's dirty log holds so far belongs to the digest's set; re-registering
            // the memory below would drop it.
            self.dirty.collect(&self.vm, &self.mem).map_err(err)?;
            // The guest's page tables may be among those pages, written behind the back of
            // a shadow MMU (this host's software KVM): its cached translations go.
            vstate::reset_memory_slots(&self.vm, &self.mem, self.mode.wants_digests())
                .map_err(|e| err(e.to_string()))?;
            state.restore(&self.vcpu).map_err(|e| err(e.to_string()))?;
            if self.baseline.is_none() {
                self.baseline = Some(page_hashes(&self.mem).map_err(err)?);
            }
            self.stats.preempts += 1;
            self.stats.preempt_bytes += vcpu.len() as u64;
            self.stats.preempt_time += t0.elapsed();
            if let Some(outcome) = self.deliver(pos, false, Some(state.interruptible()))? {
                return Ok(Some(outcome));
            }
            if !self.mode.is_replay() {
                // Went live while delivering: the rest is the live machine's.
                break;
            }
        }
        Ok(None)
    }

    /// Rewrites the status file, if one is configured (atomically: a new file renamed over
    /// the old one).
    fn write_status_now(&mut self, pos: Position, state: &str) {
        let Some(path) = &self.status_file else {
            return;
        };
        let mut v = serde_json::Map::new();
        v.insert("role".into(), self.role.as_str().into());
        v.insert("state".into(), state.into());
        v.insert("position".into(), pos.get().into());
        v.insert("injected".into(), self.stats.injected.into());
        v.insert("console_bytes".into(), self.console_bytes.into());
        if let Some(d) = &self.divergence {
            v.insert("divergence".into(), d.clone());
        }
        if let Some(r) = self.stats.reprotects.last() {
            v.insert(
                "last_reprotect".into(),
                serde_json::json!({
                    "generation": r.generation,
                    "position": r.pos,
                    "pages_per_round": r.rounds(),
                    "pause_s": r.pause.as_secs_f64(),
                    "total_s": r.total.as_secs_f64(),
                    "bytes": r.bytes,
                }),
            );
            v.insert("reprotects".into(), self.stats.reprotects.len().into());
        }
        v.extend(self.mode.status_fields());
        let mut json = serde_json::Value::Object(v).to_string();
        json.push('\n');
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!("status file {}: {e}", path.display());
        }
        self.status_written = Some(Instant::now());
    }

    fn write_status(&mut self, pos: Position) {
        if self.status_file.is_some()
            && self
                .status_written
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.write_status_now(pos, "running");
        }
    }

    /// Test only ([`VmConfig::corrupt_at`]): flips the low bit of one byte of guest memory
    /// at 0x1000 (a page Linux leaves alone after boot), through vm-memory, so that the VMM's
    /// dirty bitmap puts the page in the next digest.
    fn corrupt_guest_memory(&mut self, pos: Position) {
        let at = GuestAddress(0x1000);
        if let Ok(b) = self.mem.read_obj::<u8>(at) {
            let _ = self.mem.write_obj(b ^ 1, at);
            eprintln!(
                "twinvm: test switch: flipped a bit of guest memory at {:#x}, position {pos}",
                at.0
            );
        }
    }

    /// Applies an asynchronous input the log has at `pos`, exactly as the recording did.
    fn apply_logged_input(&mut self, pos: Position, e: Entry) -> Result<(), MachineError> {
        match e {
            Entry::IrqLine { line, .. } if line < 16 => self.devices.pic.pulse(line),
            Entry::NetRx { frame, .. } => {
                let delivered = match &mut self.nic {
                    Some(nic) => matches!(
                        nic.transport.device_mut().deliver_rx(&self.mem, &frame),
                        Ok(crate::devices::virtio::net::RxResult::Delivered)
                    ),
                    None => false,
                };
                if !delivered {
                    return Err(RrError::Divergence {
                        pos: pos.get(),
                        entry: self.replay_index(),
                        what: format!(
                            "the guest's card could not take a logged {}-byte frame: its receive ring is not in the recorded state",
                            frame.len()
                        ),
                    }
                    .into());
                }
                self.devices.raise_lines(self.nic.as_mut());
            }
            Entry::ConsoleIn { bytes, .. } => {
                let n = self.devices.serial.enqueue_input(&bytes);
                if n != bytes.len() {
                    return Err(RrError::Divergence {
                        pos: pos.get(),
                        entry: self.replay_index(),
                        what: format!(
                            "the UART took {n} of {} logged input bytes: its receive FIFO is not in the recorded state",
                            bytes.len()
                        ),
                    }
                    .into());
                }
                self.devices.raise_lines(self.nic.as_mut());
            }
            other => {
                return Err(RrError::Divergence {
                    pos: pos.get(),
                    entry: self.replay_index(),
                    what: format!("unexpected {}", crate::rr::describe(&other)),
                }
                .into())
            }
        }
        Ok(())
    }

    fn replay_index(&self) -> u64 {
        match &self.mode {
            Mode::Replay(r) => r.consumed().saturating_sub(1),
            _ => 0,
        }
    }

    /// Takes a state digest at `pos` (recording), or checks the logged one (replay).
    fn digest_now(&mut self, pos: Position) -> Result<(), MachineError> {
        let t0 = Instant::now();
        // Output not yet taken from the UART counts as written.
        self.flush_console();
        let (vcpu, vm, mem, tracker) = (&self.vcpu, &self.vm, &self.mem, &mut self.dirty);
        let baseline = &mut self.baseline;
        let console = [
            ("console_bytes", self.console_bytes),
            ("console_hash", self.console_hash),
        ];
        let mut pages = 0u64;
        let trail = &mut self.trail;
        let r = self.mode.digest(pos, |recorded| {
            let keep = trail.as_ref().is_some_and(|t| t.wants(pos.get()));
            let sel = DigestPages {
                tracker,
                recorded,
                baseline: baseline.as_mut(),
            };
            let (d, snap) = state_digest(vcpu, vm, mem, sel, pos, &console, keep)?;
            pages = d.pages.len() as u64;
            if let (Some(t), Some(snap)) = (trail.as_mut(), snap) {
                // Written before the comparison, so a mismatching digest's bytes are kept.
                if let Err(e) = t.write(&snap) {
                    tracing::warn!("{e}");
                }
            }
            Ok(d)
        });
        match r {
            Err(e) if self.mode.is_peer_loss(&e) => {
                // No digest to compare or send: settle failover; a live machine takes none.
                return self.failover(&e);
            }
            r => r?,
        }
        self.stats.digests += 1;
        self.stats.digest_pages += pages;
        self.stats.digest_time += t0.elapsed();
        Ok(())
    }

    /// Injects the PIC's pending interrupt if the vCPU can take it now. If it cannot
    /// (interrupts disabled, or the one-instruction shadow of `sti`), the guest is
    /// single-stepped until it can: each step is a synchronous exit, so the interrupt lands at
    /// the first instruction that can take it, the same one in a recording and its replay.
    ///
    /// KVM's interrupt-window exit would do the same in one exit on hardware, but on the
    /// software KVM of this project's hosts it was measured to arrive a variable number of
    /// instructions after interrupts were enabled (replays diverged with identical exit
    /// counts); it is not used. Single-stepping stops short of an instruction that returns to
    /// user mode (where this host delivers the step's #DB to the guest instead), and after
    /// [`MAX_STEPS`] steps; the interrupt then waits for the next ordinary exit.
    fn prepare_entry(&mut self, pos: Position, ready: Option<bool>) -> Result<(), MachineError> {
        let mut vector = None;
        let mut step = false;
        if self.devices.pic.has_interrupt() {
            let ready = ready.unwrap_or(self.vcpu.get_kvm_run().ready_for_interrupt_injection != 0);
            if ready {
                vector = self.devices.pic.ack();
            } else {
                step = self.can_step()?;
            }
        }
        self.rr(|m| m.inject(pos, vector))?;
        if let Some(v) = vector {
            vstate::inject_interrupt(&self.vcpu, v)?;
            self.stats.injected += 1;
            let steps = self.stepper.injected();
            if steps > 0 {
                tracing::trace!(
                    "vector {v:#x} injected at position {pos} after {steps} single steps"
                );
            }
        }
        self.set_stepping(step)
    }

    /// Whether to single-step the next guest instruction towards a pending interrupt: the
    /// [`Stepper`] decides from the privilege level, the bytes at RIP and, for an `iret`,
    /// the frame it would pop.
    fn can_step(&mut self) -> Result<bool, MachineError> {
        if self.stepper.budget_left() == 0 {
            return Ok(false);
        }
        let sregs = self.vcpu.get_sregs().map_err(|source| VstateError::Ioctl {
            what: "read special registers",
            source,
        })?;
        let cpl = (sregs.cs.selector & 3) as u8;
        let insn = if cpl == 0 { self.next_insn()? } else { None };
        let at = At { cpl, insn };
        let (vcpu, mem) = (&self.vcpu, &self.mem);
        let verdict = self.stepper.decide(at, || iret_goes_to_user(vcpu, mem))?;
        Ok(verdict.is_ok())
    }

    /// The guest's general registers.
    fn regs(&self) -> Result<kvm_bindings::kvm_regs, MachineError> {
        self.vcpu.get_regs().map_err(|source| {
            VstateError::Ioctl {
                what: "read registers",
                source,
            }
            .into()
        })
    }

    /// The guest physical address of guest virtual address `gva`, if it is mapped.
    fn guest_phys(&self, gva: u64) -> Option<GuestAddress> {
        guest_phys(&self.vcpu, gva)
    }

    /// Reads the first bytes of the instruction at the guest's RIP (kernel mode only).
    fn next_insn(&self) -> Result<Option<[u8; 3]>, MachineError> {
        let rip = self.regs()?.rip;
        let mut insn = [0u8; 3];
        Ok(self
            .guest_phys(rip)
            .and_then(|a| self.mem.read_slice(&mut insn, a).ok())
            .map(|()| insn))
    }

    /// After single-stepping a `pushf`, clears the trap flag it pushed: KVM sets RFLAGS.TF
    /// to step, and `pushf` would otherwise hand it to the guest, which would later restore
    /// it with `popf` and take a debug trap of its own.
    fn scrub_pushed_tf(&mut self) -> Result<(), MachineError> {
        let rsp = self.regs()?.rsp;
        if let Some(addr) = self.guest_phys(rsp) {
            if let Some(scrubbed) = self.mem.read_obj::<u64>(addr).ok().and_then(scrub_tf) {
                let _ = self.mem.write_obj(scrubbed, addr);
            }
        }
        Ok(())
    }

    /// Turns KVM's single-stepping on or off, if that changes it.
    fn set_stepping(&mut self, on: bool) -> Result<(), MachineError> {
        if on == self.stepper.is_on() {
            return Ok(());
        }
        let dbg = kvm_bindings::kvm_guest_debug {
            control: if on {
                kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP
            } else {
                0
            },
            ..Default::default()
        };
        self.vcpu
            .set_guest_debug(&dbg)
            .map_err(|source| VstateError::Ioctl {
                what: "set single-step",
                source,
            })?;
        let (_, episode) = self.stepper.set_on(on);
        if episode {
            self.stats.step_episodes += 1;
        }
        Ok(())
    }
}

/// The hash of every page of guest memory, indexed by frame number.
fn page_hashes(mem: &GuestMemory) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for region in mem.iter() {
        let base = region.start_addr().0 / PAGE_SIZE;
        let n = region.len() / PAGE_SIZE;
        out.resize((base + n) as usize, 0);
        for gfn in base..base + n {
            mem.read_slice(&mut buf, GuestAddress(gfn * PAGE_SIZE))
                .map_err(|e| format!("reading guest page {gfn:#x}: {e}"))?;
            out[gfn as usize] = hash_bytes(&buf);
        }
    }
    Ok(out)
}

/// A 64-bit hash of `bytes` (FNV-1a over 64-bit words, with a final mix). Not
/// cryptographic: it only has to make an accidental match of two different pages unlikely.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The vCPU's registers, a hash of its FPU/SSE state, and a hash of every page dirtied since
/// the last digest (KVM's dirty log, which also resets it, together with the pages the VMM
/// wrote itself, and `carried`: pages found dirty when a snapshot read the log). `extra`
/// adds named values of the VMM's own (the console output hash).
#[allow(clippy::too_many_arguments)]
pub fn state_digest(
    vcpu: &VcpuFd,
    vm: &VmFd,
    mem: &GuestMemory,
    sel: DigestPages<'_>,
    pos: Position,
    extra: &[(&str, u64)],
    keep: bool,
) -> Result<(Digest, Option<crate::trail::Snapshot>), RrError> {
    let kvm_err = |what: &str, e: kvm_ioctls::Error| RrError::Kvm(format!("{what}: {e}"));
    let r = vcpu
        .get_regs()
        .map_err(|e| kvm_err("reading registers", e))?;
    let s = vcpu
        .get_sregs()
        .map_err(|e| kvm_err("reading special registers", e))?;
    let f = vcpu
        .get_fpu()
        .map_err(|e| kvm_err("reading FPU state", e))?;
    let mut regs: Vec<(String, u64)> = [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rsp", r.rsp),
        ("rbp", r.rbp),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
        ("rip", r.rip),
        ("rflags", r.rflags),
        ("cr0", s.cr0),
        ("cr2", s.cr2),
        ("cr3", s.cr3),
        ("cr4", s.cr4),
        ("efer", s.efer),
        ("cs", u64::from(s.cs.selector)),
        ("ss", u64::from(s.ss.selector)),
        ("ds", u64::from(s.ds.selector)),
        ("es", u64::from(s.es.selector)),
        ("fs", u64::from(s.fs.selector)),
        ("gs", u64::from(s.gs.selector)),
        ("fs_base", s.fs.base),
        ("gs_base", s.gs.base),
        ("gdt_base", s.gdt.base),
        ("idt_base", s.idt.base),
        ("tr_base", s.tr.base),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|(n, v)| (n.to_string(), v))
    .collect();
    regs.sort();
    let fpu_hash = hash_bytes(&fpu_digest_bytes(&f, s.cs.selector & 3 == 3));

    sel.tracker.collect(vm, mem).map_err(RrError::Kvm)?;
    let mut gfns = sel.tracker.take_since_digest(mem);
    if let (Some(recorded), Some(_)) = (sel.recorded, &sel.baseline) {
        gfns.extend_from_slice(recorded);
        gfns.sort_unstable();
        gfns.dedup();
    }
    let mut pages = Vec::new();
    let mut kept = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut baseline = sel.baseline;
    for gfn in gfns {
        let gpa = gfn * PAGE_SIZE;
        mem.read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| RrError::Kvm(format!("reading guest page {gpa:#x}: {e}")))?;
        let hash = hash_bytes(&buf);
        if let Some(b) = baseline.as_deref_mut() {
            let unchanged = b.get(gfn as usize) == Some(&hash);
            if let Some(slot) = b.get_mut(gfn as usize) {
                *slot = hash;
            }
            // Marked dirty here only, its bytes as they were: not a difference.
            let theirs = sel.recorded.is_some_and(|r| r.binary_search(&gfn).is_ok());
            if unchanged && !theirs {
                continue;
            }
        }
        pages.push((gfn, hash));
        if keep {
            kept.push(buf.clone());
        }
    }
    let snap = keep.then(|| crate::trail::Snapshot {
        pos: pos.get(),
        cpl: (s.cs.selector & 3) as u8,
        regs: regs.iter().cloned().collect(),
        fpu: crate::trail::fpu_fields(&f),
        gfns: pages.iter().map(|p| p.0).collect(),
        pages: kept,
    });
    Ok((
        Digest {
            pos,
            regs,
            fpu_hash,
            pages,
        },
        snap,
    ))
}

/// Which pages a digest hashes: those dirtied since the last digest (`tracker`), and, in a
/// replay that has applied a preemption point (`baseline` set), also the recording's own
/// list (`recorded`).
///
/// Why: KVM's dirty log is a superset of the pages written (a shadow MMU marks a page dirty
/// when it maps it writable, prefetching included), equal on both sides only while both
/// MMUs have the same history. A replay that applies a preemption point skips a stretch of
/// the guest's execution and drops KVM's cached translations, so from then on its set can
/// hold pages the recording's does not, with unchanged bytes. The replay then hashes the
/// recording's pages and its own, and leaves out a page of its own whose bytes are those it
/// last had (`baseline`: the hash of every page, taken when the first preemption point is
/// applied and kept current at each digest); a page it changed on its own still shows.
pub struct DigestPages<'a> {
    /// Pages dirtied since the last digest.
    pub tracker: &'a mut DirtyTracker,
    /// In replay, the recorded digest's frame numbers (sorted).
    pub recorded: Option<&'a [u64]>,
    /// The hash of every page as last seen, indexed by frame number.
    pub baseline: Option<&'a mut Vec<u64>>,
}

/// The FPU/SSE state a digest covers: all of it where the guest runs user code (CPL 3),
/// only the control registers (x87 control word, MXCSR) where it runs its kernel.
///
/// The guest kernel never uses the x87 or SSE data registers itself (it is built without
/// them, and with `noxsave`), and Linux restores a task's FPU registers lazily, on the way
/// back to user mode: in kernel mode the data registers are either the current task's, saved
/// with FXSAVE before anything else can see them, or dead leftovers that the next restore
/// overwrites. Recordings replayed on one CPU showed XMM0-7 differing at CPL 0 with every
/// register and page equal, differences that vanished later and never reached memory or
/// output (see the README's determinism section). Whatever of them the guest can observe
/// reaches a page (the FXSAVE area at a context switch) or user mode, where the next
/// digest's pages and CPL 3 digests catch it.
fn fpu_digest_bytes(f: &kvm_bindings::kvm_fpu, user_mode: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    if user_mode {
        for reg in f.fpr.iter() {
            out.extend_from_slice(reg);
        }
        for reg in f.xmm.iter() {
            out.extend_from_slice(reg);
        }
        out.extend_from_slice(&f.fsw.to_le_bytes());
        out.push(f.ftwx);
    }
    out.extend_from_slice(&f.fcw.to_le_bytes());
    out.extend_from_slice(&f.mxcsr.to_le_bytes());
    out
}

/// The guest physical address of guest virtual address `gva`, if it is mapped.
fn guest_phys(vcpu: &VcpuFd, gva: u64) -> Option<GuestAddress> {
    match vcpu.translate_gva(gva) {
        Ok(t) if t.valid != 0 => Some(GuestAddress(t.physical_address)),
        _ => None,
    }
}

/// Whether the `iret` about to run returns to user mode: the CS it pops (at RSP + 8) has a
/// non-zero privilege level. When the frame cannot be read, assume it does.
fn iret_goes_to_user(vcpu: &VcpuFd, mem: &GuestMemory) -> Result<bool, MachineError> {
    let rsp = vcpu
        .get_regs()
        .map_err(|source| VstateError::Ioctl {
            what: "read registers",
            source,
        })?
        .rsp;
    Ok(guest_phys(vcpu, rsp.wrapping_add(8))
        .and_then(|a| mem.read_obj::<u64>(a).ok())
        .is_none_or(|cs| cs & 3 != 0))
}

/// What the loop does after a synchronous exit.
#[derive(Debug)]
enum AfterExit {
    /// On to the delivery point; `halted` if the guest executed `hlt` with interrupts on.
    Go {
        /// The guest halted.
        halted: bool,
    },
    /// The run ends.
    End(RunOutcome),
}

/// Device ids on the MMIO bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MmioDev {
    /// The virtio-mmio network card.
    Nic,
}

/// The MMIO bus of a machine: the network card's window, if it has one.
fn mmio_bus(nic: bool) -> MmioBus<MmioDev> {
    let mut bus = MmioBus::new();
    if nic {
        // One fixed window on an empty bus: cannot overlap.
        bus.insert(
            crate::nic::NIC_MMIO_BASE,
            crate::nic::NIC_MMIO_LEN,
            MmioDev::Nic,
        )
        .expect("fixed MMIO layout");
    }
    bus
}

/// Completes an MMIO access through the bus: the device at its address answers; a read of
/// an address no device claims returns all ones (an empty bus floats high), a write to one
/// is dropped. (A free function: the access borrows the vCPU's run structure.)
fn mmio_access(bus: &MmioBus<MmioDev>, nic: &mut Option<crate::nic::Nic>, access: MmioAccess<'_>) {
    match (bus.resolve(access.addr()), nic.as_mut(), access) {
        (Some((MmioDev::Nic, offset)), Some(n), MmioAccess::Read { data, .. }) => {
            n.transport.read(offset, data)
        }
        (Some((MmioDev::Nic, offset)), Some(n), MmioAccess::Write { data, .. }) => {
            n.transport.write(offset, data)
        }
        (_, _, MmioAccess::Read { data, .. }) => data.fill(0xff),
        (_, _, MmioAccess::Write { .. }) => {}
    }
}
