//! The machine: guest memory, the one vCPU, the device model, and the vCPU loop.
//!
//! The loop counts every *synchronous* exit (one caused by a guest instruction: port I/O,
//! MMIO, HLT, interrupt window, shutdown); that count is the execution position every later
//! part of twinvm uses (DESIGN.md, Determinism 3). Exits caused by a kick signal are not
//! counted. Interrupts are injected only right after a synchronous exit (a *delivery point*),
//! never after a kick, so that where an interrupt lands is a function of the position alone.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::{self, BootError, BootLayout};
use crate::cpuid::{self, CpuidError};
use crate::devices::pic::{Chip, PicPair};
use crate::devices::pit::Pit;
use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::{cmos::Cmos, PioBus};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::{self, VcpuKick, VstateError};

/// ISA line of the PIT's channel 0.
pub const PIT_IRQ: u8 = 0;

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
}

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
    /// Pinning the vCPU thread.
    #[error("cannot pin the vCPU thread to host CPU {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// The error.
        source: std::io::Error,
    },
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
    /// Interrupt-window exits.
    pub window_exits: u64,
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
}

/// Device ids on the port I/O bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Pic(Chip),
    Elcr,
    Pit,
    Port61,
    Cmos,
    Serial,
}

/// The host clocks the device model reads in a live run.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    fn new() -> Self {
        HostClock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the machine was created (monotonic).
    pub fn mono_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Nanoseconds since the Unix epoch (wall clock).
    pub fn wall_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

/// The legacy PC devices and the bus that reaches them.
#[derive(Debug)]
pub struct Devices {
    bus: PioBus<Dev>,
    /// The interrupt controllers.
    pub pic: PicPair,
    /// The interval timer.
    pub pit: Pit,
    /// The RTC and CMOS RAM.
    pub cmos: Cmos,
    /// The console UART.
    pub serial: SerialConsole,
}

impl Devices {
    fn new() -> Self {
        let mut bus = PioBus::new();
        let layout = [
            (0x20, 2, Dev::Pic(Chip::Master)),
            (0xa0, 2, Dev::Pic(Chip::Slave)),
            (0x4d0, 2, Dev::Elcr),
            (0x40, 4, Dev::Pit),
            (0x61, 1, Dev::Port61),
            (0x70, 2, Dev::Cmos),
            (COM1_BASE, COM1_LEN, Dev::Serial),
        ];
        for (base, len, dev) in layout {
            // The layout is fixed and has no overlaps (checked by the unit test below).
            bus.insert(base, len, dev).expect("fixed device layout");
        }
        Devices {
            bus,
            pic: PicPair::new(),
            pit: Pit::new(),
            cmos: Cmos::new(),
            serial: SerialConsole::new(),
        }
    }

    /// Whether a read of `port` depends on time (and so must be logged when recording).
    pub fn is_time_dependent(&self, port: u16) -> bool {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pit, off)) => off < 3,
            Some((Dev::Port61, _)) => true,
            Some((Dev::Cmos, 1)) => true,
            _ => false,
        }
    }

    /// One byte-wide guest read of `port`. Unclaimed ports float high, as on a PC.
    fn read_byte(&mut self, port: u16, clock: &HostClock) -> u8 {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pic(chip), off)) => self.pic.read(chip, off),
            Some((Dev::Elcr, off)) => self.pic.read_elcr(off),
            Some((Dev::Pit, off)) => self.pit.read(off, clock.mono_ns()),
            Some((Dev::Port61, _)) => self.pit.read_port61(clock.mono_ns()),
            Some((Dev::Cmos, off)) => self.cmos.read(off, clock.wall_ns()),
            Some((Dev::Serial, off)) => self.serial.read(off),
            None => 0xff,
        }
    }

    /// One byte-wide guest write of `port`.
    fn write_byte(&mut self, port: u16, val: u8, clock: &HostClock) {
        match self.bus.resolve(u64::from(port)) {
            Some((Dev::Pic(chip), off)) => self.pic.write(chip, off, val),
            Some((Dev::Elcr, off)) => self.pic.write_elcr(off, val),
            Some((Dev::Pit, off)) => self.pit.write(off, val, clock.mono_ns()),
            Some((Dev::Port61, _)) => self.pit.write_port61(val, clock.mono_ns()),
            Some((Dev::Cmos, off)) => self.cmos.write(off, val, clock.wall_ns()),
            Some((Dev::Serial, off)) => self.serial.write(off, val),
            None => {}
        }
    }

    /// A port access of `size` bytes: the devices here are all 8 bits wide, so a wider
    /// access reaches consecutive ports, as the ISA bus splits it.
    fn pio(&mut self, port: u16, size: usize, is_in: bool, data: &mut [u8], clock: &HostClock) {
        for access in data.chunks_mut(size.max(1)) {
            for (i, b) in access.iter_mut().enumerate() {
                let p = port.wrapping_add(i as u16);
                if is_in {
                    *b = self.read_byte(p, clock);
                } else {
                    self.write_byte(p, *b, clock);
                }
            }
        }
        // A UART interrupt condition (THR empty, data ready) becomes an edge on its line at
        // the same position as the access that caused it.
        if self.serial.take_irq() {
            self.pic.pulse(COM1_IRQ);
        }
    }
}

/// A handle other threads use to stop the vCPU loop.
#[derive(Debug, Clone)]
pub struct MachineHandle {
    events: Sender<HostEvent>,
    kick: VcpuKick,
}

impl MachineHandle {
    /// Sends an event to the loop and kicks the vCPU so that it is seen soon.
    pub fn send(&self, ev: HostEvent) {
        let stop = matches!(ev, HostEvent::Stop(_));
        // The loop may be gone already; then there is nothing to tell it.
        let _ = self.events.send(ev);
        if stop {
            self.kick.kick();
        }
    }
}

/// A booted machine, ready to run on the thread that created it.
pub struct Machine {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemory,
    devices: Devices,
    clock: HostClock,
    layout: BootLayout,
    stats: RunStats,
    console_out: Box<dyn Write + Send>,
    events: Receiver<HostEvent>,
    handle: MachineHandle,
    pending_input: VecDeque<u8>,
    created: Instant,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("layout", &self.layout)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn pin_current_thread(cpu: usize) -> Result<(), MachineError> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    let ret = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if ret != 0 {
        return Err(MachineError::Pin {
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Machine {
    /// Creates the VM, loads the guest and sets up the vCPU, on the calling thread (which
    /// must be the one that calls [`Machine::run`]). Console output goes to `console_out`.
    pub fn new(cfg: &VmConfig, console_out: Box<dyn Write + Send>) -> Result<Self, MachineError> {
        let created = Instant::now();
        if let Some(cpu) = cfg.cpu {
            pin_current_thread(cpu)?;
        }
        let kvm = vstate::open_kvm(&cfg.kvm_path)?;
        let mem = memory::create_guest_memory(cfg.mem_mib)?;
        let layout = boot::load_guest(&mem, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
        let vm = vstate::create_vm(&kvm, &mem, false)?;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|source| VstateError::Ioctl {
                what: "create vCPU",
                source,
            })?;
        cpuid::configure(&kvm, &vcpu)?;
        boot::setup_vcpu_regs(&vcpu, &layout)?;
        let kick = VcpuKick::arm(&mut vcpu)?;
        let (tx, rx) = std::sync::mpsc::channel();
        Ok(Machine {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            mem,
            devices: Devices::new(),
            clock: HostClock::new(),
            layout,
            stats: RunStats::default(),
            console_out,
            events: rx,
            handle: MachineHandle { events: tx, kick },
            pending_input: VecDeque::new(),
            created,
        })
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
    pub fn position(&self) -> u64 {
        self.stats.sync_exits
    }

    /// Runs the guest until it powers off, resets, is stopped, or fails.
    pub fn run(&mut self) -> Result<RunOutcome, MachineError> {
        self.stats.setup = self.created.elapsed();
        // Position 0 is a delivery point too: nothing can be pending yet, but the window
        // request is set up the same way as after every exit.
        if let Some(outcome) = self.delivery_point(false)? {
            return Ok(outcome);
        }
        loop {
            vstate::clear_kick(&mut self.vcpu);
            let t0 = Instant::now();
            let exit = self.vcpu.run();
            self.stats.in_guest += t0.elapsed();
            let exit = match exit {
                Ok(VcpuExit::Intr) => None,
                Ok(exit) => Some(Self::classify(exit)),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(source) => {
                    return Err(MachineError::Run {
                        pos: self.stats.sync_exits,
                        source,
                    })
                }
            };
            let Some(exit) = exit else {
                // A kick: not a synchronous exit, so not a delivery point. Only a stop
                // request is acted on here.
                self.stats.kicks += 1;
                if let Some(outcome) = self.drain_events()? {
                    return Ok(outcome);
                }
                continue;
            };
            self.stats.sync_exits += 1;
            let halted = match exit {
                Exit::Pio => {
                    self.stats.pio_exits += 1;
                    let pio = vstate::pio_exit(&mut self.vcpu);
                    self.devices
                        .pio(pio.port, pio.size, pio.is_in, pio.data, &self.clock);
                    false
                }
                Exit::Mmio => {
                    self.stats.mmio_exits += 1;
                    false
                }
                Exit::Hlt => {
                    self.stats.hlt_exits += 1;
                    if self.vcpu.get_kvm_run().if_flag == 0 {
                        self.flush_console();
                        return Ok(RunOutcome::PowerOff);
                    }
                    true
                }
                Exit::Window => {
                    self.stats.window_exits += 1;
                    false
                }
                Exit::Shutdown => {
                    self.flush_console();
                    return Ok(RunOutcome::Reset);
                }
                Exit::Internal => {
                    self.flush_console();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the run structure's union.
                    let suberror =
                        unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(MachineError::Internal {
                        suberror,
                        rip,
                        pos: self.stats.sync_exits,
                    });
                }
                Exit::FailEntry(reason) => return Err(MachineError::FailEntry(reason)),
                Exit::Other(what) => {
                    return Err(MachineError::UnexpectedExit {
                        what,
                        pos: self.stats.sync_exits,
                    })
                }
            };
            self.flush_console();
            if let Some(outcome) = self.delivery_point(halted)? {
                return Ok(outcome);
            }
        }
    }

    /// Reduces a `VcpuExit` (which borrows the vCPU) to what the loop needs. MMIO is answered
    /// here, while the data buffer is at hand: nothing is mapped there yet, so reads float
    /// high and writes are dropped.
    fn classify(exit: VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Exit::Pio,
            VcpuExit::MmioRead(addr, data) => {
                tracing::trace!("MMIO read of unmapped {addr:#x}");
                data.fill(0xff);
                Exit::Mmio
            }
            VcpuExit::MmioWrite(addr, _) => {
                tracing::trace!("MMIO write to unmapped {addr:#x}");
                Exit::Mmio
            }
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::IrqWindowOpen => Exit::Window,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::Internal,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
            other => Exit::Other(format!("{other:?}")),
        }
    }

    /// Writes what the UART transmitted to the console.
    fn flush_console(&mut self) {
        if self.devices.serial.has_output() {
            let bytes = self.devices.serial.take_output();
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
            HostEvent::Input(bytes) => {
                self.pending_input.extend(bytes);
                None
            }
            HostEvent::InputClosed => None,
            HostEvent::Stop(sig) => {
                self.flush_console();
                Some(RunOutcome::Stopped(sig))
            }
        }
    }

    /// The work done at a delivery point (right after a synchronous exit): asynchronous
    /// sources raise their lines, then a pending interrupt is injected if the guest can take
    /// it, or an interrupt window is requested. A halted guest with nothing to take waits
    /// here for the next timer deadline or console input.
    fn delivery_point(&mut self, halted: bool) -> Result<Option<RunOutcome>, MachineError> {
        loop {
            if let Some(outcome) = self.drain_events()? {
                return Ok(Some(outcome));
            }
            let now = self.clock.mono_ns();
            if self.devices.pit.poll_irq(now) {
                self.devices.pic.pulse(PIT_IRQ);
            }
            if !self.pending_input.is_empty() {
                let (a, _) = self.pending_input.as_slices();
                let n = self.devices.serial.enqueue_input(a);
                self.pending_input.drain(..n);
                if self.devices.serial.take_irq() {
                    self.devices.pic.pulse(COM1_IRQ);
                }
            }
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
        self.prepare_entry()?;
        Ok(None)
    }

    /// Injects the PIC's pending interrupt if the vCPU can take it now, or asks KVM for an
    /// exit as soon as it can.
    fn prepare_entry(&mut self) -> Result<(), MachineError> {
        let run = self.vcpu.get_kvm_run();
        run.request_interrupt_window = 0;
        if !self.devices.pic.has_interrupt() {
            return Ok(());
        }
        if run.ready_for_interrupt_injection != 0 {
            if let Some(vector) = self.devices.pic.ack() {
                vstate::inject_interrupt(&self.vcpu, vector)?;
                self.stats.injected += 1;
            }
        } else {
            run.request_interrupt_window = 1;
        }
        Ok(())
    }
}

/// A VM exit reduced to what the loop acts on.
#[derive(Debug)]
enum Exit {
    Pio,
    Mmio,
    Hlt,
    Window,
    Shutdown,
    Internal,
    FailEntry(u64),
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_layout_is_consistent() {
        let d = Devices::new();
        assert!(d.is_time_dependent(0x40));
        assert!(d.is_time_dependent(0x42));
        assert!(!d.is_time_dependent(0x43));
        assert!(d.is_time_dependent(0x61));
        assert!(d.is_time_dependent(0x71));
        assert!(!d.is_time_dependent(0x70));
        assert!(!d.is_time_dependent(0x3f8));
        assert!(!d.is_time_dependent(0x20));
    }

    #[test]
    fn wide_access_splits_into_ports_and_unclaimed_ports_float_high() {
        let mut d = Devices::new();
        let clock = HostClock::new();
        let mut data = [0u8; 2];
        // A 16-bit read at 0x20 reads IRR (0x20) and IMR (0x21).
        d.pic.write(Chip::Master, 1, 0x5a);
        d.pio(0x20, 2, true, &mut data, &clock);
        assert_eq!(data, [0x00, 0x5a]);
        let mut data = [0u8; 4];
        d.pio(0x1234, 4, true, &mut data, &clock);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn serial_interrupt_becomes_a_pic_edge() {
        let mut d = Devices::new();
        let clock = HostClock::new();
        // Program the PIC as Linux does, then enable THRE interrupts on the UART.
        for (port, val) in [(0x20u16, 0x11u8), (0x21, 0x30), (0x21, 4), (0x21, 1), (0x21, 0)] {
            d.pio(port, 1, false, &mut [val], &clock);
        }
        d.pio(0x3f9, 1, false, &mut [0x02], &clock);
        assert!(d.pic.has_interrupt());
        assert_eq!(d.pic.ack(), Some(0x34));
    }
}
