//! The vCPU's architectural state as KVM exposes it, read and written in the order KVM needs.
//!
//! No local APIC state: the guest runs with `nolapic` and the VM has no in-kernel irqchip. No
//! XSAVE area: the guest runs with `noxsave`, so the legacy FXSAVE image (`KVM_GET_FPU`) is
//! the whole of its FPU/SSE state.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// The MSRs a snapshot keeps, where the host's KVM supports them (`KVM_GET_MSR_INDEX_LIST`).
/// EFER, FS.base and GS.base are in the special registers.
pub const SAVED_MSRS: &[(u32, &str)] = &[
    (0x10, "IA32_TSC"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0x277, "IA32_PAT"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SYSCALL_MASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
];

/// The legacy FPU/SSE state (`kvm_fpu`, which kvm-bindings does not serialize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0-ST7 / MM0-MM7, 16 bytes each.
    pub fpr: Vec<[u8; 16]>,
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl FpuState {
    fn of(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> Result<kvm_fpu, SnapshotError> {
        let bad = |what: &str| SnapshotError::Corrupt(format!("FPU state: {what}"));
        Ok(kvm_fpu {
            fpr: self
                .fpr
                .as_slice()
                .try_into()
                .map_err(|_| bad("not 8 x87 registers"))?,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self
                .xmm
                .as_slice()
                .try_into()
                .map_err(|_| bad("not 16 XMM registers"))?,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// Everything KVM holds of the one vCPU that a guest can observe.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// Multiprocessing state (runnable or halted).
    pub mp_state: kvm_mp_state,
    /// General registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE as `KVM_GET_FPU` reports it.
    pub fpu: FpuState,
    /// The XSAVE area (`KVM_GET_XSAVE`), where the host has one: what KVM loads into the
    /// guest's FPU at entry. Restored after `fpu`, so it is what the guest gets.
    pub xsave: Option<kvm_xsave>,
    /// (index, value) of each MSR of [`SAVED_MSRS`] the host supports.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupt shadow, NMI state.
    pub events: kvm_vcpu_events,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The MSRs of [`SAVED_MSRS`] that `kvm` can save and restore.
fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("read the MSR index list"))?;
    let supported = list.as_slice();
    Ok(SAVED_MSRS
        .iter()
        .map(|&(i, _)| i)
        .filter(|i| supported.contains(i))
        .collect())
}

fn msr_name(index: u32) -> String {
    SAVED_MSRS.iter().find(|(i, _)| *i == index).map_or_else(
        || format!("{index:#x}"),
        |(_, n)| format!("{n} ({index:#x})"),
    )
}

impl VcpuState {
    /// Whether an external interrupt can be injected into this state: interrupts enabled
    /// and no `sti`/`mov ss` shadow (what KVM reports as `ready_for_interrupt_injection`).
    pub fn interruptible(&self) -> bool {
        const RFLAGS_IF: u64 = 1 << 9;
        self.regs.rflags & RFLAGS_IF != 0 && self.events.interrupt.shadow == 0
    }

    /// The encoding a preemption point carries in the log.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(|e| SnapshotError::Corrupt(format!("vCPU state: {e}")))
    }

    /// Decodes [`VcpuState::encode`]'s bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        serde_json::from_slice(bytes)
            .map_err(|e| SnapshotError::Corrupt(format!("a preemption point's vCPU state: {e}")))
    }

    /// Reads the vCPU's state. The caller has completed any half-done I/O instruction first
    /// (see `Machine::complete_pending_io`): until then KVM has not written an `in`'s result
    /// nor moved RIP past it.
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, SnapshotError> {
        let indices = supported_msrs(kvm)?;
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::Corrupt(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
        if n != indices.len() {
            return Err(SnapshotError::Msr {
                what: "read",
                msr: msr_name(indices[n.min(indices.len() - 1)]),
            });
        }
        let fpu = vcpu.get_fpu().map_err(kvm_err("read the FPU state"))?;
        tracing::debug!(
            "FPU saved: xmm0 {:02x?} xmm1 {:02x?}, mxcsr {:#x}",
            fpu.xmm[0],
            fpu.xmm[1],
            fpu.mxcsr
        );
        Ok(VcpuState {
            mp_state: vcpu.get_mp_state().map_err(kvm_err("read the MP state"))?,
            regs: vcpu.get_regs().map_err(kvm_err("read registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(kvm_err("read special registers"))?,
            fpu: FpuState::of(&fpu),
            xsave: if kvm.check_extension(Cap::Xsave) {
                Some(vcpu.get_xsave().map_err(kvm_err("read the XSAVE area"))?)
            } else {
                None
            },
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("read vCPU events"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("read debug registers"))?,
        })
    }

    /// Writes the state into a fresh vCPU, in the order KVM's documentation and Firecracker's
    /// restore path require: MP state first, registers before special registers, special
    /// registers (EFER) before MSRs, registers before vCPU events (which may carry a pending
    /// exception whose delivery depends on them).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("write the MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_err("write registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("write special registers"))?;
        vcpu.set_fpu(&self.fpu.to_kvm()?)
            .map_err(kvm_err("write the FPU state"))?;
        // `KVM_SET_FPU` alone was measured not to reach the guest on this project's software
        // KVM: the XSAVE area it enters the guest with stayed in its initial state (its
        // header says x87 and SSE are unused), and a restored guest found zeros in its XMM
        // registers. The XSAVE area read from the original carries both.
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB region) as `KVM_GET_XSAVE` gave
            // it; KVM_SET_XSAVE reads no more than that without KVM_CAP_XSAVE2, which this
            // VMM does not enable.
            unsafe { vcpu.set_xsave(xsave) }.map_err(kvm_err("write the XSAVE area"))?;
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| SnapshotError::Corrupt(format!("MSR list: {e:?}")))?;
            let n = vcpu.set_msrs(&msrs).map_err(kvm_err("write MSRs"))?;
            if n != entries.len() {
                return Err(SnapshotError::Msr {
                    what: "write",
                    msr: msr_name(entries[n].index),
                });
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let back = vcpu.get_fpu().map_err(kvm_err("read the FPU state"))?;
            tracing::debug!(
                "FPU restored: xmm0 {:02x?} (wrote {:02x?}), mxcsr {:#x}",
                back.xmm[0],
                self.fpu.xmm.first(),
                back.mxcsr
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("write vCPU events"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("write debug registers"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_round_trips_and_rejects_wrong_register_counts() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[15][3] = 0xab;
        f.fpr[7][0] = 0xcd;
        let s = FpuState::of(&f);
        let back = s.to_kvm().unwrap();
        assert_eq!(back.xmm, f.xmm);
        assert_eq!(back.fpr, f.fpr);
        assert_eq!((back.fcw, back.mxcsr), (0x37f, 0x1f80));
        let mut short = s.clone();
        short.xmm.pop();
        assert!(matches!(short.to_kvm(), Err(SnapshotError::Corrupt(_))));
    }
}
