//! Prints what guest user code sees for CPUID leaves 0 and 1 on each host CPU, beside the
//! VMM's table, and the verdict of `probe_cpuid_trap`.
fn main() {
    let kvm = vmm::vstate::open_kvm(std::path::Path::new("/dev/kvm")).expect("kvm");
    for c in vmm::hostcpu::allowed_cpus() {
        vmm::hostcpu::pin_current_thread(c).unwrap();
        for u in vmm::hostcpu::probe_user_cpuid(&kvm, &[0, 1, 7]).unwrap() {
            println!(
                "cpu {c} leaf {:#x}: guest saw {:08x?}, table {:08x?}",
                u.leaf, u.saw, u.table
            );
        }
        println!("cpu {c}: {:?}", vmm::hostcpu::probe_cpuid_trap(&kvm));
    }
}
