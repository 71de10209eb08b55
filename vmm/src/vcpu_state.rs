//! The vCPU's architectural state as one value: what a preemption point carries from the
//! primary to the backup (DESIGN.md, Determinism 4), in a serde encoding of its own.
//!
//! What is in it is what guest code can change without a synchronous exit: the general and
//! special registers (segments, control registers, EFER, descriptor tables), the x87/SSE
//! state, the MSRs the guest kernel writes at run time (the `swapgs` base, the syscall and
//! sysenter entry points, PAT, TSC_AUX) and the pending events (exceptions, NMI, the
//! interrupt shadow).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// The MSRs carried: those Linux writes after boot, or that differ per task.
pub const MSRS: [u32; 10] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Errors reading, writing or decoding a vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM set {set} of {given} MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        given: usize,
    },
    /// The host's extended state does not fit `kvm_xsave` (needs `KVM_GET_XSAVE2`).
    #[error("the host's XSAVE state needs {0} bytes, more than KVM_SET_XSAVE takes")]
    XsaveSize(i32),
    /// The bytes are not a vCPU state of this version.
    #[error("a vCPU state that cannot be decoded: {0}")]
    Decode(String),
}

/// The x87/SSE state of `KVM_GET_FPU` (kvm-bindings gives `kvm_fpu` no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(s: &FpuState) -> Self {
        kvm_fpu {
            fpr: s.fpr,
            fcw: s.fcw,
            fsw: s.fsw,
            ftwx: s.ftwx,
            last_opcode: s.last_opcode,
            last_ip: s.last_ip,
            last_dp: s.last_dp,
            xmm: s.xmm,
            mxcsr: s.mxcsr,
            ..Default::default()
        }
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: FpuState,
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
    /// The whole extended state (the AVX upper halves included: guest user code here sees
    /// the host's CPUID and XCR0, and uses AVX natively, though `KVM_GET_FPU` does not show
    /// it), where KVM has `KVM_GET_XSAVE`.
    xsave: Option<kvm_xsave>,
    xcrs: Option<kvm_xcrs>,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { what, source }
}

impl VcpuState {
    /// Reads the state of `vcpu`, which is not running.
    pub fn capture(vcpu: &VcpuFd) -> Result<Self, VcpuStateError> {
        let regs = vcpu.get_regs().map_err(ioctl("read registers"))?;
        let sregs = vcpu.get_sregs().map_err(ioctl("read special registers"))?;
        let fpu = vcpu.get_fpu().map_err(ioctl("read the FPU state"))?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(ioctl("read the pending events"))?;
        let entries: Vec<kvm_msr_entry> = MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuStateError::Ioctl {
            what: "build the MSR list",
            source: kvm_ioctls::Error::new({
                let _ = e;
                libc::E2BIG
            }),
        })?;
        // KVM reads MSRs in order up to the first it does not know: those it read are kept.
        let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("read MSRs"))?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        let xsave = vcpu.get_xsave().ok();
        let xcrs = vcpu.get_xcrs().ok();
        Ok(VcpuState {
            regs,
            sregs,
            fpu: FpuState::from(&fpu),
            msrs,
            events,
            xsave,
            xcrs,
        })
    }

    /// Writes this state into `vcpu` of `vm`, which is not running.
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("write special registers"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs {
            set: 0,
            given: entries.len(),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(ioctl("write MSRs"))?;
        if n != entries.len() {
            return Err(VcpuStateError::Msrs {
                set: n,
                given: entries.len(),
            });
        }
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(ioctl("write the FPU state"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(ioctl("write XCRs"))?;
        }
        if let Some(xsave) = &self.xsave {
            // KVM_CAP_XSAVE2 gives the size KVM_SET_XSAVE reads (0 or less: the 4 KiB of
            // `kvm_xsave`).
            let size = vm.check_extension_int(Cap::Xsave2);
            if size > std::mem::size_of::<kvm_xsave>() as i32 {
                return Err(VcpuStateError::XsaveSize(size));
            }
            // SAFETY: KVM reads at most the size checked above, which fits in `xsave`.
            unsafe { vcpu.set_xsave(xsave) }.map_err(ioctl("write the XSAVE state"))?;
        }
        vcpu.set_regs(&self.regs)
            .map_err(ioctl("write registers"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl("write the pending events"))?;
        Ok(())
    }

    /// Whether an external interrupt can be injected into this state: interrupts enabled
    /// and no `sti`/`mov ss` shadow (what KVM reports as `ready_for_interrupt_injection`).
    pub fn interruptible(&self) -> bool {
        self.regs.rflags & RFLAGS_IF != 0 && self.events.interrupt.shadow == 0
    }

    /// The guest's instruction pointer.
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The encoding carried in the log.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a vCPU state always serializes")
    }

    /// Decodes [`VcpuState::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, VcpuStateError> {
        serde_json::from_slice(bytes).map_err(|e| VcpuStateError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_garbage_is_an_error() {
        let mut regs = kvm_regs {
            rip: 0x40_1000,
            rflags: 0x202,
            ..Default::default()
        };
        regs.rax = 7;
        let s = VcpuState {
            regs,
            sregs: kvm_sregs::default(),
            fpu: FpuState::from(&kvm_fpu {
                mxcsr: 0x1f80,
                ..Default::default()
            }),
            msrs: vec![(0xc000_0102, 0xffff_8880_0000_0000)],
            events: kvm_vcpu_events::default(),
            xsave: None,
            xcrs: None,
        };
        let back = VcpuState::decode(&s.encode()).unwrap();
        assert_eq!(back.regs.rax, 7);
        assert_eq!(back.rip(), 0x40_1000);
        assert_eq!(back.fpu, s.fpu);
        assert_eq!(back.msrs, s.msrs);
        assert!(back.interruptible());
        let mut shadowed = back;
        shadowed.events.interrupt.shadow = 1;
        assert!(!shadowed.interruptible());
        assert!(VcpuState::decode(b"{\"regs\":").is_err());
    }
}
