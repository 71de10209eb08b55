//! Thin, commented wrappers around the KVM pieces the VMM uses: opening `/dev/kvm`, the VM
//! and its memory slot, the one vCPU, `KVM_INTERRUPT` (which kvm-ioctls does not wrap), and
//! kicking the vCPU out of `KVM_RUN` with a signal.

use std::cell::Cell;
use std::path::Path;

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
    Ok(vm)
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
    /// The `kvm_run` page of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by `VcpuKick::arm` on this thread to the vCPU's
            // mmapped `kvm_run`, which stays mapped until `disarm`; a byte store is
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

/// Kicks the vCPU thread it was made on out of `KVM_RUN`, from any thread.
#[derive(Debug, Clone, Copy)]
pub struct VcpuKick {
    thread: libc::pthread_t,
}

impl VcpuKick {
    /// Installs the kick handler and arms it for `vcpu` on the calling thread, which must be
    /// the thread that runs the vCPU.
    pub fn arm(vcpu: &mut VcpuFd) -> Result<Self, VstateError> {
        register_signal_handler(kick_signal(), kick_handler)
            .map_err(ioctl_err("install kick signal handler"))?;
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run));
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Ok(VcpuKick { thread })
    }

    /// Disarms the handler on the calling thread (the vCPU's), before the vCPU is dropped.
    pub fn disarm() {
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Interrupts the vCPU's `KVM_RUN` (or the next one it enters).
    pub fn kick(&self) {
        // SAFETY: `thread` is the vCPU thread, which outlives every kicker (the machine joins
        // helper threads before it exits); the signal has a handler installed.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
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
