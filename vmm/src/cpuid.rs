//! The guest's CPUID table: what KVM supports, minus every feature that would let the guest
//! read host state the log cannot reproduce (TSC, RDRAND/RDSEED, kvmclock) or that the
//! deterministic device model does not provide (x2APIC, TSC deadline), and minus the
//! instructions this project's guest kernel is built to do without.
//!
//! On real KVM hosts this table is what the guest sees. On the software KVM of the
//! development machines `KVM_SET_CPUID2` is accepted but ignored (HOST-KVM.md), so the same
//! choices are also made on the kernel command line (`clearcpuid=`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

/// (leaf, register, bit, name) of every feature bit cleared.
const CLEARED: &[(u32, Reg, u32, &str)] = &[
    (1, Reg::Edx, 4, "tsc"),
    (1, Reg::Ecx, 12, "fma"),
    (1, Reg::Ecx, 13, "cx16"),
    (1, Reg::Ecx, 17, "pcid"),
    (1, Reg::Ecx, 21, "x2apic"),
    (1, Reg::Ecx, 23, "popcnt"),
    (1, Reg::Ecx, 24, "tsc-deadline"),
    (1, Reg::Ecx, 26, "xsave"),
    (1, Reg::Ecx, 27, "osxsave"),
    (1, Reg::Ecx, 28, "avx"),
    (1, Reg::Ecx, 30, "rdrand"),
    (0x8000_0001, Reg::Ecx, 5, "abm"),
    (0x8000_0001, Reg::Edx, 27, "rdtscp"),
    (0x8000_0007, Reg::Edx, 8, "invariant-tsc"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ecx,
    Edx,
}

/// Errors building the CPUID table.
#[derive(Debug, thiserror::Error)]
#[error("CPUID: {what}: {msg}")]
pub struct CpuidError {
    what: &'static str,
    msg: String,
}

/// Filters KVM's supported CPUID entries as described in the module documentation.
pub fn filter(entries: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = entries
        .iter()
        // KVM's paravirtual leaves (kvmclock and friends) go entirely.
        .filter(|e| !(0x4000_0000..0x4000_0100).contains(&e.function))
        .copied()
        .collect();
    for e in &mut out {
        for &(leaf, reg, bit, _) in CLEARED {
            if e.function == leaf {
                match reg {
                    Reg::Ecx => e.ecx &= !(1 << bit),
                    Reg::Edx => e.edx &= !(1 << bit),
                }
            }
        }
        match e.function {
            // One vCPU, APIC ID 0.
            1 => e.ebx &= 0x00ff_ffff,
            // Structured extended features (SMEP, SMAP, FSGSBASE, RDSEED, AVX2, ...): none.
            7 => {
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // No XSAVE state components beyond x87 and SSE.
            0xd if e.index == 0 => {
                e.eax &= 0x3;
                e.edx = 0;
            }
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    out
}

/// Builds the filtered table from KVM's supported CPUID and sets it on `vcpu`.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), CpuidError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| CpuidError {
            what: "reading KVM's supported CPUID",
            msg: e.to_string(),
        })?;
    let filtered = CpuId::from_entries(&filter(cpuid.as_slice())).map_err(|e| CpuidError {
        what: "building the CPUID table",
        msg: e.to_string(),
    })?;
    vcpu.set_cpuid2(&filtered).map_err(|e| CpuidError {
        what: "setting the vCPU's CPUID",
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_clears_time_and_random_features_and_pv_leaves() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0300_0800,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: u32::MAX,
                ..Default::default()
            },
        ];
        let s = filter(&entries);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].edx & (1 << 4), 0, "tsc");
        assert_eq!(s[0].ecx & (1 << 30), 0, "rdrand");
        assert_eq!(s[0].ecx & (1 << 21), 0, "x2apic");
        assert_ne!(s[0].ecx & (1 << 0), 0, "sse3 stays");
        assert_eq!(s[0].ebx >> 24, 0, "APIC id");
        assert_eq!(s[1].ebx, 0, "leaf 7");
    }
}
