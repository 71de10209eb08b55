//! The host CPU a vCPU runs on, where it matters (DESIGN.md, Determinism 6).
//!
//! On hardware VMX/SVM every guest `CPUID` exits to KVM, which answers from the VMM's table
//! ([`crate::cpuid`]): the same on every host, so nothing here matters. On a host that runs
//! guest `CPUID` natively (the software KVM of this project's machines runs guest user code
//! on the host CPU and has no CPUID faulting), a guest program reads the *host* CPU's
//! answers, including the initial APIC ID of whichever host CPU the vCPU thread is on, and a
//! statically linked C library stores them at every program start. There a recording names
//! the `CPUID` fingerprint of its host CPU in the log header, its vCPU thread is pinned so
//! that it cannot migrate, and a replay or backup runs on a host CPU with the same
//! fingerprint (chosen automatically) or refuses, naming the leaves that differ.
//!
//! [`probe_cpuid_trap`] finds out at start-up which case applies, by running a few
//! instructions of guest *user* code that execute `CPUID` in a throw-away VM.

use std::sync::OnceLock;

use kvm_bindings::{kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use logchannel::entry::{cpuid_diff, CpuidLeaf};
use vm_memory::{Bytes, GuestAddress};

use crate::memory;
use crate::vstate;

/// Errors of host CPU selection.
#[derive(Debug, thiserror::Error)]
pub enum HostCpuError {
    /// A KVM call of the probe failed.
    #[error("probing whether guest CPUID is trapped: {0}")]
    Probe(String),
    /// Pinning a thread failed.
    #[error("cannot pin to host CPU {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// The error.
        source: std::io::Error,
    },
    /// The CPU given with `--cpu` answers CPUID differently from the recording's.
    #[error("host CPU {cpu} answers CPUID differently from the recording's host CPU, so guest programs would read other values and the replay would diverge: {diffs}")]
    Mismatch {
        /// The CPU.
        cpu: usize,
        /// The differing leaves.
        diffs: String,
    },
    /// No CPU this process may run on answers CPUID like the recording's.
    #[error("no host CPU this process may run on ({cpus:?}) answers CPUID like the recording's host CPU, so guest programs would read other values and the replay would diverge; closest is CPU {closest}: {diffs}")]
    NoMatch {
        /// The CPUs tried.
        cpus: Vec<usize>,
        /// The one with the fewest differing leaves.
        closest: usize,
        /// Its differing leaves.
        diffs: String,
    },
    /// The recording and this host disagree on whether CPUID is trapped.
    #[error("{0}")]
    TrapMismatch(String),
}

/// Whether guest `CPUID` exits to KVM on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidTrap {
    /// Guest `CPUID` exits: the VMM's table answers, the same on every host.
    Trapped,
    /// Guest (user) `CPUID` runs natively and returns the host CPU's own values.
    Native,
}

impl std::fmt::Display for CpuidTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuidTrap::Trapped => "guest CPUID is trapped: the VMM's CPUID table answers",
            CpuidTrap::Native => "guest CPUID runs natively on this host (no trap): guest programs read the host CPU's values, so the vCPU is pinned and both sides of a replay run on host CPUs with the same CPUID fingerprint",
        })
    }
}

/// Vendor string words the probe's CPUID table puts in leaf 0 ("TwinVMprobe!").
const MARKER: [u32; 3] = [
    u32::from_le_bytes(*b"Twin"),
    u32::from_le_bytes(*b"VMpr"),
    u32::from_le_bytes(*b"obe!"),
];

/// The probe's port: the guest writes what its CPUID returned here.
const PROBE_PORT: u16 = 0x80;

/// What guest user code saw for one `CPUID` leaf, beside the VMM's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserCpuid {
    /// The leaf (sub-leaf 0).
    pub leaf: u32,
    /// EAX, EBX, ECX, EDX as the guest saw them.
    pub saw: [u32; 4],
    /// The same in the VMM's table.
    pub table: [u32; 4],
}

/// Runs a tiny guest that enters user mode (CPL 3, long mode) with `iretq`, as an OS does,
/// and there executes `CPUID` for each of `leaves` and writes EAX, EBX, ECX and EDX to a
/// port (IOPL 3 lets it). Returns what the guest saw, and the VMM's table for the same
/// leaves (the table's leaf 0 carries a marker vendor string).
pub fn probe_user_cpuid(kvm: &Kvm, leaves: &[u32]) -> Result<Vec<UserCpuid>, HostCpuError> {
    let err = |what: &str, e: &dyn std::fmt::Display| HostCpuError::Probe(format!("{what}: {e}"));
    let mem =
        memory::create_guest_memory(memory::MIN_MEM_MIB).map_err(|e| err("guest memory", &e))?;
    let vm = vstate::create_vm(kvm, &mem, false).map_err(|e| err("VM", &e))?;
    // Kernel mode (0x1000): enter user mode as an OS does, with `iretq` to 0x2000.
    // mov esp,0x8000; push 0x2b (ss); push 0x7000 (rsp); push 0x3002 (rflags: IOPL 3);
    // push 0x23 (cs); push 0x2000 (rip); iretq
    let kernel: [u8; 27] = [
        0xbc, 0x00, 0x80, 0x00, 0x00, 0x6a, 0x2b, 0x68, 0x00, 0x70, 0x00, 0x00, 0x68, 0x02, 0x30,
        0x00, 0x00, 0x6a, 0x23, 0x68, 0x00, 0x20, 0x00, 0x00, 0x48, 0xcf, 0xf4,
    ];
    // User mode (0x2000), per leaf: mov eax,LEAF; xor ecx,ecx; cpuid; mov esi,edx;
    // mov dx,0x80; out dx,eax; mov eax,ebx; out dx,eax; mov eax,ecx; out dx,eax;
    // mov eax,esi; out dx,eax; then jmp $.
    let mut user = Vec::new();
    for &leaf in leaves {
        user.push(0xb8);
        user.extend_from_slice(&leaf.to_le_bytes());
        user.extend_from_slice(&[0x31, 0xc9, 0x0f, 0xa2, 0x89, 0xd6]);
        user.extend_from_slice(&[0x66, 0xba, 0x80, 0x00, 0xef]);
        user.extend_from_slice(&[0x89, 0xd8, 0xef, 0x89, 0xc8, 0xef, 0x89, 0xf0, 0xef]);
    }
    user.extend_from_slice(&[0xeb, 0xfe]);
    let write = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| err("writing the probe", &e))
    };
    write(&kernel, 0x1000)?;
    write(&user, 0x2000)?;
    // Identity map of the first GiB with 2 MiB user pages: PML4 0x9000, PDPT 0xa000, PD 0xb000.
    write(&(0xa000u64 | 7).to_le_bytes(), 0x9000)?;
    write(&(0xb000u64 | 7).to_le_bytes(), 0xa000)?;
    for i in 0..512u64 {
        write(&((i << 21) | 0x87).to_le_bytes(), 0xb000 + i * 8)?;
    }
    // GDT at 0x500: null, null, kernel code/data, user code/data, TSS at 0x600.
    let tss = 0x600u64;
    let gdt: [u64; 8] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x0000_8900_0000_0067 | ((tss & 0xff_ffff) << 16) | ((tss >> 24) << 56),
        0,
    ];
    for (i, d) in gdt.iter().enumerate() {
        write(&d.to_le_bytes(), 0x500 + i as u64 * 8)?;
    }
    let vcpu = vm.create_vcpu(0).map_err(|e| err("vCPU", &e))?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| err("supported CPUID", &e))?;
    let mut entries = crate::cpuid::filter(supported.as_slice());
    for e in entries.iter_mut().filter(|e| e.function == 0) {
        (e.ebx, e.edx, e.ecx) = (MARKER[0], MARKER[1], MARKER[2]);
    }
    let table = CpuId::from_entries(&entries).map_err(|e| err("CPUID table", &format!("{e:?}")))?;
    vcpu.set_cpuid2(&table).map_err(|e| err("set CPUID", &e))?;
    let mut s = vcpu.get_sregs().map_err(|e| err("get sregs", &e))?;
    let code_seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 11,
        present: 1,
        dpl: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_seg = kvm_segment {
        selector: 0x18,
        type_: 3,
        l: 0,
        db: 1,
        ..code_seg
    };
    s.cs = code_seg;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data_seg, data_seg, data_seg, data_seg, data_seg);
    s.gdt.base = 0x500;
    s.gdt.limit = 63;
    s.tr = kvm_segment {
        base: tss,
        limit: 0x67,
        selector: 0x30,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.cr0 = 0x8000_0011;
    s.cr3 = 0x9000;
    s.cr4 = 0x20;
    s.efer = 0x500;
    vcpu.set_sregs(&s).map_err(|e| err("set sregs", &e))?;
    let regs = kvm_regs {
        rip: 0x1000,
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| err("set regs", &e))?;
    let mut vcpu = vcpu;
    let mut words = Vec::new();
    let mut exits = 0;
    while words.len() < leaves.len() * 4 {
        exits += 1;
        if exits > 64 + leaves.len() * 4 {
            return Err(HostCpuError::Probe(
                "the probe guest never reported its CPUID".into(),
            ));
        }
        match vcpu.run().map_err(|e| err("KVM_RUN", &e))? {
            VcpuExit::IoOut(PROBE_PORT, data) if data.len() == 4 => {
                words.push(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            VcpuExit::Intr => continue,
            other => return Err(err("unexpected exit", &format!("{other:?}"))),
        }
    }
    Ok(leaves
        .iter()
        .enumerate()
        .map(|(i, &leaf)| {
            let saw = [
                words[i * 4],
                words[i * 4 + 1],
                words[i * 4 + 2],
                words[i * 4 + 3],
            ];
            let t = entries
                .iter()
                .find(|e| e.function == leaf && e.index == 0)
                .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx]);
            UserCpuid {
                leaf,
                saw,
                table: t,
            }
        })
        .collect())
}

/// Whether guest user code's `CPUID` is answered from the VMM's table: the probe guest
/// ([`probe_user_cpuid`]) must see the table's leaves 0 and 1 exactly (a host that traps
/// leaf 0 but fills in leaf 1 from the host CPU counts as native).
pub fn probe_cpuid_trap(kvm: &Kvm) -> Result<CpuidTrap, HostCpuError> {
    let seen = probe_user_cpuid(kvm, &[0, 1])?;
    Ok(if seen.iter().all(|u| u.saw == u.table) {
        CpuidTrap::Trapped
    } else {
        CpuidTrap::Native
    })
}

/// `CPUID` executed on the calling thread's CPU.
fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // `CPUID` is available on every x86-64 CPU and has no side effects.
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The sub-leaves of `leaf` worth reading (where the leaf has any).
fn subleaves(leaf: u32) -> Vec<u32> {
    match leaf {
        // Deterministic cache parameters: until the cache type is 0 (no more caches).
        4 | 0x8000_001d => {
            let mut v = vec![0];
            v.extend((1..16).take_while(|&i| cpuid(leaf, i)[0] & 0x1f != 0));
            v
        }
        // Leaves whose sub-leaf 0 EAX says how many more there are.
        7 | 0x14 | 0x17 | 0x18 | 0x1d | 0x20 | 0x23 => (0..=cpuid(leaf, 0)[0].min(15)).collect(),
        // Topology: until the level type is 0.
        0xb | 0x1f | 0x8000_0026 => {
            let mut v = vec![0];
            v.extend((1..8).take_while(|&i| (cpuid(leaf, i)[2] >> 8) & 0xff != 0));
            v
        }
        // XSAVE state components and other indexed leaves.
        0xd => (0..64).collect(),
        0xf | 0x10 | 0x12 | 0x8000_0020 => (0..8).collect(),
        _ => vec![0],
    }
}

/// Every `CPUID` leaf and sub-leaf a guest program can read, as the CPU the calling thread
/// runs on answers them.
fn read_fingerprint() -> Vec<CpuidLeaf> {
    let mut out = Vec::new();
    for base in [0u32, 0x8000_0000] {
        let max = cpuid(base, 0)[0];
        if max < base {
            continue;
        }
        for leaf in base..=max.min(base + 0x3f) {
            for subleaf in subleaves(leaf) {
                out.push(CpuidLeaf {
                    leaf,
                    subleaf,
                    regs: cpuid(leaf, subleaf),
                });
            }
        }
    }
    out
}

/// The CPUs the process could run on before a thread of it was first pinned.
static UNPINNED: OnceLock<CpuMask> = OnceLock::new();

/// A `cpu_set_t`, as plain data that may be shared between threads.
#[derive(Clone, Copy)]
struct CpuMask(libc::cpu_set_t);

/// The calling thread's CPU set.
fn current_mask() -> Option<CpuMask> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(CpuMask(set))
    }
}

/// Gives the calling thread the CPUs the process had before its vCPU thread was pinned
/// (nothing if it never was). For the VMM's other threads (signals, console input, the
/// preemption watchdog, the TAP watcher, the output releaser, the peer watcher): spawned by
/// the pinned vCPU thread they would inherit its one CPU and compete with the guest there,
/// so that a watchdog could not kick a guest that holds the CPU. Best effort: a failure
/// leaves the thread where it is.
pub fn unpin_current_thread() {
    if let Some(CpuMask(set)) = UNPINNED.get() {
        // SAFETY: sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of `set`, a
        // plain-data set filled by sched_getaffinity.
        let ret =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
        if ret != 0 {
            tracing::debug!(
                "cannot unpin a helper thread: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Pins the calling thread to host CPU `cpu`. The CPUs it had before are remembered for
/// [`unpin_current_thread`].
pub fn pin_current_thread(cpu: usize) -> Result<(), HostCpuError> {
    if let Some(before) = current_mask() {
        UNPINNED.get_or_init(|| before);
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it (CPU_SET
    // ignores a CPU beyond the set's size), and sched_setaffinity reads
    // `size_of::<cpu_set_t>()` bytes of it.
    let ret = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if ret != 0 {
        return Err(HostCpuError::Pin {
            cpu,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The host CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET only reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The host CPU the calling thread runs on now.
pub fn current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments and only returns a number.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).unwrap_or(0)
}

/// The `CPUID` fingerprint of host CPU `cpu`, read on a short-lived thread pinned there.
pub fn fingerprint_of(cpu: usize) -> Result<Vec<CpuidLeaf>, HostCpuError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_current_thread(cpu)?;
            Ok(read_fingerprint())
        })
        .join()
        .unwrap_or_else(|_| Err(HostCpuError::Probe("fingerprint thread panicked".into())))
    })
}

/// Picks the host CPU for a replay of a recording whose host CPU answered `CPUID` as
/// `want`: `requested` if given (and it matches), otherwise the first allowed CPU that
/// matches, preferring `prefer` (where the caller runs now).
pub fn choose(
    want: &[CpuidLeaf],
    requested: Option<usize>,
    prefer: usize,
) -> Result<usize, HostCpuError> {
    if let Some(cpu) = requested {
        let diffs = cpuid_diff(want, &fingerprint_of(cpu)?);
        if !diffs.is_empty() {
            return Err(HostCpuError::Mismatch {
                cpu,
                diffs: diffs.join("; "),
            });
        }
        return Ok(cpu);
    }
    let mut cpus = allowed_cpus();
    cpus.sort_by_key(|&c| c != prefer);
    let mut closest: Option<(usize, Vec<String>)> = None;
    for &cpu in &cpus {
        let diffs = cpuid_diff(want, &fingerprint_of(cpu)?);
        if diffs.is_empty() {
            return Ok(cpu);
        }
        if closest.as_ref().is_none_or(|(_, d)| diffs.len() < d.len()) {
            closest = Some((cpu, diffs));
        }
    }
    let (closest, diffs) = closest.unwrap_or((0, vec!["no CPU to try".into()]));
    cpus.sort();
    Err(HostCpuError::NoMatch {
        cpus,
        closest,
        diffs: diffs.join("; "),
    })
}

/// Where a vCPU runs and what its log header says about `CPUID`.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The host CPU to pin the vCPU thread to (`None`: no need to pin).
    pub cpu: Option<usize>,
    /// The fingerprint for the log header (`None` where CPUID is trapped).
    pub cpuid: Option<Vec<CpuidLeaf>>,
    /// Which case applies.
    pub trap: CpuidTrap,
}

/// The placement of a recording (or a primary, or a plain run that needs none): where CPUID
/// runs natively, the vCPU is pinned to `requested` or to the CPU the caller runs on now.
pub fn for_recording(kvm: &Kvm, requested: Option<usize>) -> Result<Placement, HostCpuError> {
    let trap = probe_cpuid_trap(kvm)?;
    Ok(match trap {
        CpuidTrap::Trapped => Placement {
            cpu: requested,
            cpuid: None,
            trap,
        },
        CpuidTrap::Native => {
            let cpu = requested.unwrap_or_else(current_cpu);
            Placement {
                cpu: Some(cpu),
                cpuid: Some(fingerprint_of(cpu)?),
                trap,
            }
        }
    })
}

/// The placement of a replay (or a backup) of a log whose header says `recorded`.
pub fn for_replay(
    kvm: &Kvm,
    recorded: Option<&[CpuidLeaf]>,
    requested: Option<usize>,
) -> Result<Placement, HostCpuError> {
    let trap = probe_cpuid_trap(kvm)?;
    match (trap, recorded) {
        (CpuidTrap::Trapped, None) => Ok(Placement {
            cpu: requested,
            cpuid: None,
            trap,
        }),
        (CpuidTrap::Native, Some(want)) => {
            let cpu = choose(want, requested, current_cpu())?;
            Ok(Placement {
                cpu: Some(cpu),
                cpuid: Some(want.to_vec()),
                trap,
            })
        }
        (CpuidTrap::Native, None) => Err(HostCpuError::TrapMismatch(
            "the log was recorded where guest CPUID is trapped (the VMM's table), but here it runs natively and guest programs would read this host CPU's values: the replay would diverge".into(),
        )),
        (CpuidTrap::Trapped, Some(_)) => Err(HostCpuError::TrapMismatch(
            "the log was recorded where guest CPUID runs natively (its programs read that host CPU's values), but here CPUID is trapped and they would read the VMM's table: the replay would diverge".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread spawned by a pinned thread inherits its one CPU; unpinned, it gets the CPUs
    /// the process had.
    #[test]
    fn helper_threads_of_a_pinned_thread_are_unpinned() {
        let all = allowed_cpus();
        let cpu = *all.last().unwrap();
        let (inherited, unpinned) = std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            std::thread::spawn(|| {
                let inherited = allowed_cpus();
                unpin_current_thread();
                (inherited, allowed_cpus())
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inherited, vec![cpu]);
        assert_eq!(unpinned, all);
    }

    #[test]
    fn fingerprint_is_stable_on_one_cpu_and_names_differences() {
        let cpu = allowed_cpus()[0];
        let a = fingerprint_of(cpu).unwrap();
        let b = fingerprint_of(cpu).unwrap();
        assert!(a.len() > 4, "leaf 0, 1 and extended leaves at least");
        assert_eq!(cpuid_diff(&a, &b), Vec::<String>::new());
        let mut c = a.clone();
        let l1 = c.iter_mut().find(|l| l.leaf == 1).unwrap();
        l1.regs[1] ^= 0x0100_0000;
        let d = cpuid_diff(&a, &c);
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("leaf 0x1.0: ebx"), "{d:?}");
        assert_eq!(choose(&a, Some(cpu), cpu).unwrap(), cpu);
        assert!(matches!(
            choose(&c, Some(cpu), cpu),
            Err(HostCpuError::Mismatch { .. })
        ));
    }
}
