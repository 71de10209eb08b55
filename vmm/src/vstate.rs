//! Thin, commented wrappers around the KVM pieces the VMM uses: opening `/dev/kvm`, the VM
//! and its memory slot, the one vCPU, `KVM_INTERRUPT` (which kvm-ioctls does not wrap), and
//! kicking the vCPU out of `KVM_RUN` with a signal.

use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_interrupt, kvm_run, kvm_userspace_memory_region, KVMIO};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::os::fd::FromRawFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::memory::GuestMemory;

// The ioctl number of KVM_INTERRUPT: _IOW(KVMIO, 0x86, struct kvm_interrupt).
mod ioctls {
    #![allow(missing_docs)]
    use super::*;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use ioctls::KVM_INTERRUPT;

/// Where the 3-page TSS that Intel VMX needs is placed: just below 4 GiB, outside RAM.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors setting up KVM.
#[derive(Debug, thiserror::Error)]
pub enum VstateError {
    /// `/dev/kvm` does not exist.
    #[error("{path}: no such device: KVM is not available on this host (is the kvm module loaded, or is this a VM without nested virtualization?)")]
    NoKvm {
        /// The path tried.
        path: String,
    },
    /// `/dev/kvm` exists but cannot be opened.
    #[error("{path}: {source} (twinvm needs read and write access to it: run as root or join the kvm group)")]
    KvmAccess {
        /// The path tried.
        path: String,
        /// The error from open(2).
        source: std::io::Error,
    },
    /// The file is not a KVM device.
    #[error("{path} is not a KVM device (it does not answer KVM_GET_API_VERSION)")]
    NotKvm {
        /// The path tried.
        path: String,
    },
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0} capability, which twinvm needs")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: errno::Error,
    },
}

fn ioctl_err(what: &'static str) -> impl FnOnce(errno::Error) -> VstateError {
    move |source| VstateError::Ioctl { what, source }
}

/// Opens the KVM device at `path` and checks that it offers what twinvm needs.
pub fn open_kvm(path: &Path) -> Result<Kvm, VstateError> {
    let shown = path.display().to_string();
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VstateError::NoKvm { path: shown })
        }
        Err(source) => {
            return Err(VstateError::KvmAccess {
                path: shown,
                source,
            })
        }
    };
    // Reject things that are not a KVM device before handing the fd to kvm-ioctls.
    let kvm = {
        use std::os::fd::IntoRawFd;
        let fd = file.into_raw_fd();
        // SAFETY: `fd` was just opened by us and its ownership is transferred to `Kvm`.
        unsafe { Kvm::from_raw_fd(fd) }
    };
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(VstateError::NotKvm { path: shown });
    }
    if version != 12 {
        return Err(VstateError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::SetTssAddr, "SET_TSS_ADDR"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VstateError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM and registers guest memory as memory slots (one per region), with KVM's
/// dirty-page logging when `log_dirty` is set.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemory, log_dirty: bool) -> Result<VmFd, VstateError> {
    let vm = kvm.create_vm().map_err(ioctl_err("create VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(ioctl_err("set TSS address"))?;
    register_memory(&vm, mem, log_dirty)?;
    Ok(vm)
}

/// Registers every region of `mem` as a memory slot.
fn register_memory(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), VstateError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
        // the caller keeps alive for as long as the VM exists (the machine owns both).
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(ioctl_err("register guest memory"))?;
    }
    Ok(())
}

/// Deletes guest memory's slots and registers them again (with dirty logging if
/// `log_dirty`): KVM drops every mapping it built of them (shadow or EPT page tables) and
/// starts over, as a VM created now would. A snapshot does this so that the machine that took
/// it and one restored from it go on from the same MMU state (see `snapshot`).
pub fn reset_memory_slots(
    vm: &VmFd,
    mem: &GuestMemory,
    log_dirty: bool,
) -> Result<(), VstateError> {
    for (slot, region) in mem.iter().enumerate() {
        let gone = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: 0,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: a size of 0 deletes the slot; KVM stops using the mapping.
        unsafe { vm.set_user_memory_region(gone) }.map_err(ioctl_err("delete a memory slot"))?;
    }
    register_memory(vm, mem, log_dirty)
}

/// Injects an external interrupt with `vector` into a vCPU that has no in-kernel irqchip.
/// The caller must have seen `ready_for_interrupt_injection` at the last exit.
pub fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), VstateError> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `vcpu` is a vCPU fd and `irq` is a correctly sized `kvm_interrupt` that lives
    // across the call; the kernel only reads it.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret == 0 {
        Ok(())
    } else {
        Err(VstateError::Ioctl {
            what: "inject interrupt",
            source: errno::Error::last(),
        })
    }
}

thread_local! {
    /// The `kvm_run` structure of the vCPU armed on this thread, for the kick signal handler;
    /// null when none is armed. Set by [`KickArm::arm_raw`] and cleared when its guard is
    /// dropped, both on this thread. An atomic, so that the handler (which interrupts this
    /// same thread) never sees a torn or reordered value; `const`-initialized without a
    /// destructor, so reading it from a signal handler allocates nothing and cannot panic.
    static KVM_RUN_PTR: AtomicPtr<kvm_run> = const { AtomicPtr::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.load(Ordering::SeqCst);
        if !run.is_null() {
            // SAFETY: the pointer is non-null only while the `KickArm` that stored it on this
            // thread is alive, and `KickArm::arm_raw`'s contract is that the structure stays
            // valid for writes until that guard is dropped (the machine drops the guard
            // before the vCPU whose drop unmaps it). A volatile byte store is
            // async-signal-safe. Setting `immediate_exit` makes a KVM_RUN that is about to
            // start return EINTR at once, closing the race with a signal that arrives just
            // before the ioctl.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// The calling thread's kernel thread id.
fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Kicks an armed vCPU thread out of `KVM_RUN`, from any thread; once the vCPU is disarmed
/// (its [`KickArm`] dropped) a kick does nothing. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VcpuKick {
    /// The vCPU thread's kernel thread id while armed, `None` once disarmed. Kicks send
    /// their signal while holding the lock, so after the disarm has taken it none is sent.
    target: Arc<Mutex<Option<libc::pid_t>>>,
}

impl VcpuKick {
    /// Interrupts the vCPU's `KVM_RUN` (or the next one it enters). Returns whether a signal
    /// was sent: `false` once the vCPU is disarmed.
    pub fn kick(&self) -> bool {
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tid) = *target else {
            return false;
        };
        // SAFETY: tgkill only sends a signal, naming the thread by process and thread id:
        // unlike pthread_kill it is defined for a thread that is gone (ESRCH). While armed
        // the thread is the vCPU's, which has the kick handler installed; were the guard
        // leaked and the id reused, the handler on that other thread of this process finds
        // its own slot, null or its own live vCPU, and no harm is done.
        let r = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::c_long::from(tid),
                libc::c_long::from(kick_signal()),
            )
        };
        r == 0
    }
}

/// The vCPU thread's side of the kick: while it lives, kicks reach this thread and set
/// `immediate_exit` in the armed `kvm_run`; dropping it disarms both, so that no signal is
/// sent and no byte written afterwards. Not `Send`: it must be dropped on the thread that
/// armed it (it clears that thread's slot).
#[derive(Debug)]
pub struct KickArm {
    kick: VcpuKick,
    /// The armed structure (a raw pointer, which also keeps this type `!Send`).
    run: *mut kvm_run,
}

impl KickArm {
    /// Installs the kick handler and arms it for `vcpu` on the calling thread, which must be
    /// the thread that runs the vCPU. At most one vCPU is armed per thread.
    ///
    /// # Safety
    ///
    /// The returned guard must be dropped before `vcpu` is (the vCPU's drop unmaps its
    /// `kvm_run`), and must not be leaked while the vCPU can be dropped.
    pub unsafe fn arm(vcpu: &mut VcpuFd) -> Result<Self, VstateError> {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        // SAFETY: the caller keeps `vcpu`, and so its mapped `kvm_run`, alive for as long as
        // the guard.
        unsafe { Self::arm_raw(run) }
    }

    /// [`KickArm::arm`] for any `kvm_run` structure.
    ///
    /// # Safety
    ///
    /// `run` must point to a `kvm_run` that stays valid for writes until the returned guard
    /// is dropped, and the guard must not be leaked.
    pub unsafe fn arm_raw(run: *mut kvm_run) -> Result<Self, VstateError> {
        register_signal_handler(kick_signal(), kick_handler)
            .map_err(ioctl_err("install kick signal handler"))?;
        KVM_RUN_PTR.with(|p| p.store(run, Ordering::SeqCst));
        Ok(KickArm {
            kick: VcpuKick {
                target: Arc::new(Mutex::new(Some(current_tid()))),
            },
            run,
        })
    }

    /// A handle other threads kick this vCPU with.
    pub fn kicker(&self) -> VcpuKick {
        self.kick.clone()
    }
}

impl Drop for KickArm {
    fn drop(&mut self) {
        // First no new signal, then no write: a signal already sent and delivered before the
        // slot is cleared writes into a structure that is still valid (the caller of `arm`
        // drops the vCPU only after this guard).
        *self.kick.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
        KVM_RUN_PTR.with(|p| {
            // Only our own arming: another guard armed later on this thread stays armed.
            let _ = p.compare_exchange(
                self.run,
                std::ptr::null_mut(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        });
    }
}

/// Clears a pending kick on the vCPU before the next `KVM_RUN`.
pub fn clear_kick(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(0);
}

/// A port I/O exit, read from the vCPU's `kvm_run` page.
#[derive(Debug)]
pub struct PioExit<'a> {
    /// The port.
    pub port: u16,
    /// Bytes per access (1, 2 or 4).
    pub size: usize,
    /// Whether the guest reads (`in`) rather than writes (`out`).
    pub is_in: bool,
    /// `size * count` bytes: the data written, or the buffer to fill for a read. A string
    /// instruction (`rep ins`/`rep outs`) brings several accesses in one exit.
    pub data: &'a mut [u8],
}

/// The details of the port I/O exit that `KVM_RUN` just returned. The caller must have seen
/// `VcpuExit::IoIn` or `VcpuExit::IoOut` from the last `run()`.
pub fn pio_exit(vcpu: &mut VcpuFd) -> PioExit<'_> {
    let run = vcpu.get_kvm_run();
    debug_assert_eq!(run.exit_reason, kvm_bindings::KVM_EXIT_IO);
    // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the active member of the union.
    let io = unsafe { run.__bindgen_anon_1.io };
    let len = io.size as usize * io.count as usize;
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: for a KVM_EXIT_IO exit KVM puts the data inside the vCPU's mmapped run area at
    // `data_offset`, `size * count` bytes long (kvm-ioctls relies on the same layout). The
    // slice borrows `vcpu` mutably, so it cannot outlive the mapping or alias another access.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
    PioExit {
        port: io.port,
        size: usize::from(io.size),
        is_in: u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A `kvm_run` that outlives every guard of a test, so that the test can look at what a
    /// kick wrote (or did not write) after its owner is gone.
    fn leaked_run() -> *mut kvm_run {
        Box::into_raw(Box::<kvm_run>::default())
    }

    fn immediate_exit(run: *mut kvm_run) -> u8 {
        // SAFETY: `run` comes from `leaked_run` and is never freed.
        unsafe { std::ptr::read_volatile(&(*run).immediate_exit) }
    }

    fn clear(run: *mut kvm_run) {
        // SAFETY: as above; no handler writes concurrently (kicks target this thread only
        // when it is armed, and the signal is delivered before tgkill returns to it).
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 0) };
    }

    /// Stands for the machine: the guard is its first field, dropped before the vCPU.
    struct Owner {
        arm: KickArm,
    }

    #[test]
    fn a_kick_after_the_owner_is_dropped_is_a_no_op() {
        let run = leaked_run();
        // SAFETY: `run` is never freed, and the guard is dropped (with `owner`) below.
        let owner = Owner {
            arm: unsafe { KickArm::arm_raw(run) }.unwrap(),
        };
        let kick = owner.arm.kicker();
        // A signal to the calling thread is delivered before the system call returns.
        assert!(kick.kick());
        assert_eq!(immediate_exit(run), 1, "an armed kick sets immediate_exit");
        clear(run);
        drop(owner);
        assert!(!kick.kick(), "no signal after the owner is gone");
        assert!(!kick.clone().kick());
        assert_eq!(immediate_exit(run), 0, "no write after the owner is gone");
        // A signal that arrives anyway (sent before the disarm, delivered late) writes nothing.
        // SAFETY: raise only sends the (handled) kick signal to this thread.
        unsafe { libc::raise(kick_signal()) };
        assert_eq!(immediate_exit(run), 0);
    }

    #[test]
    fn kicks_reach_the_armed_thread_until_it_drops_its_owner_and_ends() {
        let run = leaked_run() as usize;
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let vcpu_thread = std::thread::spawn(move || {
            let run = run as *mut kvm_run;
            // SAFETY: `run` is never freed; the guard is dropped on this thread below.
            let owner = Owner {
                arm: unsafe { KickArm::arm_raw(run) }.unwrap(),
            };
            tx.send(owner.arm.kicker()).unwrap();
            // Wait (as KVM_RUN would) until a kick from the other thread lands.
            let deadline = Instant::now() + Duration::from_secs(10);
            while immediate_exit(run) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let kicked = immediate_exit(run) == 1;
            clear(run);
            drop(owner);
            done_rx.recv().unwrap();
            kicked
        });
        let kick = rx.recv().unwrap();
        assert!(kick.kick());
        done_tx.send(()).unwrap();
        assert!(
            vcpu_thread.join().unwrap(),
            "the kick reached the vCPU thread"
        );
        // The vCPU thread is gone: kicking it now must neither signal nor write.
        assert!(!kick.kick());
        assert_eq!(immediate_exit(run as *mut kvm_run), 0);
    }

    #[test]
    fn dropping_an_older_guard_leaves_a_newer_one_armed() {
        let (a, b) = (leaked_run(), leaked_run());
        // SAFETY: both structures are never freed and both guards are dropped below.
        let first = unsafe { KickArm::arm_raw(a) }.unwrap();
        // SAFETY: as above.
        let second = unsafe { KickArm::arm_raw(b) }.unwrap();
        let kick = second.kicker();
        drop(first);
        assert!(kick.kick());
        assert_eq!((immediate_exit(a), immediate_exit(b)), (0, 1));
        drop(second);
    }
}
