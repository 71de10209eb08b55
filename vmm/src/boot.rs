//! The direct 64-bit Linux boot (the x86 boot protocol's 64-bit entry, as Firecracker does
//! it): the vmlinux ELF at its physical addresses, the initrd at the top of low memory, the
//! command line and the zero page, a flat GDT and identity page tables, and the vCPU's
//! registers set to enter the kernel in long mode with RSI pointing at the zero page.
//!
//! Guest physical layout (all below 1 MiB except the kernel and initrd):
//!
//! | address | what |
//! |---|---|
//! | 0x500 | GDT: null, null, code 0x10, data 0x18 |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | initial stack pointer |
//! | 0x9000 / 0xa000 / 0xb000 | PML4 / PDPT / PD: identity map of the first 1 GiB, 2 MiB pages |
//! | 0x20000 | kernel command line |
//! | 0x9fc00..0x100000 | EBDA, VGA, BIOS: not RAM in the e820 map |
//! | 0x100000.. | the kernel's PT_LOAD segments, at their physical addresses |
//! | top of RAM (below 896 MiB) | the initrd, page aligned |

use std::fs::File;
use std::io::Read;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest physical address of the zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// PD of the boot page tables.
pub const PD_ADDR: u64 = 0xb000;
/// Guest physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted, including the terminating NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area: RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Highest address (exclusive) the initrd may reach: Linux's default `initrd_addr_max`
/// (0x37ffffff) rounded up, the end of the kernel's low direct map on 32-bit, which the
/// 64-bit kernel honours for loaders that do not say otherwise.
pub const INITRD_MAX_END: u64 = 0x3800_0000;
/// Code segment selector the boot protocol requires (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector the boot protocol requires (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;

const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 4096;
const ELF_MACHINE_X86_64: u16 = 62;

/// Errors booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel file is not an x86-64 vmlinux ELF.
    #[error("kernel {path} is not an x86-64 vmlinux ELF image: {why}")]
    NotVmlinux {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The kernel's segments do not fit in guest memory.
    #[error("cannot load kernel {path}: {why}")]
    KernelLoad {
        /// The file.
        path: String,
        /// What failed.
        why: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of usable memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory: {avail} bytes free between the kernel's end ({kernel_end:#x}) and {limit:#x}; give the guest more memory (--mem)")]
    InitrdTooBig {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// Space available.
        avail: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {msg}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The error.
        msg: String,
    },
    /// Setting the vCPU's registers failed.
    #[error("setting vCPU {what}: {source}")]
    Vcpu {
        /// Which registers.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

fn guest_write<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    val: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what,
            msg: e.to_string(),
        })
}

/// What the loader placed where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootLayout {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// End of the kernel image in guest memory.
    pub kernel_end: u64,
    /// Where the initrd starts.
    pub initrd_addr: u64,
    /// Its size.
    pub initrd_size: u64,
}

/// Checks the ELF identification of a kernel file before loading it, so that a wrong file
/// gets an error that says what it is.
fn check_vmlinux(path: &Path, file: &mut File) -> Result<(), BootError> {
    let shown = path.display().to_string();
    let mut head = [0u8; 0x210];
    let n = file
        .read(&mut head)
        .map_err(|source| BootError::KernelRead {
            path: shown.clone(),
            source,
        })?;
    let not = |why: &str| BootError::NotVmlinux {
        path: shown.clone(),
        why: why.to_string(),
    };
    if n < 64 {
        return Err(not(&format!("the file is only {n} bytes long")));
    }
    if &head[..4] != b"\x7fELF" {
        if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
            return Err(not(
                "it is a bzImage; twinvm boots the uncompressed vmlinux ELF (guest-images builds one)",
            ));
        }
        return Err(not("no ELF magic at the start of the file"));
    }
    if head[4] != 2 {
        return Err(not("it is a 32-bit ELF"));
    }
    if head[5] != 1 {
        return Err(not("it is a big-endian ELF"));
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if machine != ELF_MACHINE_X86_64 {
        return Err(not(&format!(
            "its ELF machine is {machine}, not x86-64 ({ELF_MACHINE_X86_64})"
        )));
    }
    Ok(())
}

/// Loads the kernel, the initrd and the command line, and writes the zero page, GDT and page
/// tables. Returns where everything went.
pub fn load_guest(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootLayout, BootError> {
    let kshown = kernel.display().to_string();
    let mut kfile = File::open(kernel).map_err(|source| BootError::KernelRead {
        path: kshown.clone(),
        source,
    })?;
    check_vmlinux(kernel, &mut kfile)?;
    let loaded =
        Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::KernelLoad {
                path: kshown.clone(),
                why: e.to_string(),
            }
        })?;
    let entry = loaded.kernel_load.raw_value();
    let kernel_end = loaded.kernel_end;

    let mem_end = mem.last_addr().raw_value() + 1;
    let (initrd_addr, initrd_size) = match initrd {
        Some(path) => load_initrd(mem, path, kernel_end, mem_end)?,
        None => (0, 0),
    };

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| {
        BootError::Cmdline(format!(
            "{e} (it is {} bytes; at most {} fit)",
            cmdline.len(),
            CMDLINE_MAX - 1
        ))
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    write_zero_page(mem, cmdline.len(), initrd_addr, initrd_size, mem_end)?;
    write_gdt(mem)?;
    write_page_tables(mem)?;
    Ok(BootLayout {
        entry,
        kernel_end,
        initrd_addr,
        initrd_size,
    })
}

fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    mem_end: u64,
) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let read_err = |source| BootError::InitrdRead {
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let limit = mem_end.min(INITRD_MAX_END);
    let lowest = kernel_end.next_multiple_of(PAGE_SIZE);
    let avail = limit.saturating_sub(lowest);
    if size > avail {
        return Err(BootError::InitrdTooBig {
            path: shown,
            size,
            avail,
            kernel_end,
            limit,
        });
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitrdRead {
            path: shown.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemory,
    cmdline_len: usize,
    initrd_addr: u64,
    initrd_size: u64,
    mem_end: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd_addr as u32;
    params.hdr.ramdisk_size = initrd_size as u32;
    let e820 = [
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem_end - HIMEM_START,
            r#type: E820_RAM,
        },
    ];
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;
    guest_write(mem, "zero page", params, ZERO_PAGE_ADDR)
}

/// A GDT descriptor from flags, base and limit (the x86 packing).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

const CODE64_FLAGS: u16 = 0xa09b; // present, DPL 0, code exec/read accessed, L, G
const DATA_FLAGS: u16 = 0xc093; // present, DPL 0, data read/write accessed, D/B, G

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    let gdt: [u64; 4] = [
        0,
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
    ];
    guest_write(mem, "GDT", gdt, GDT_ADDR)
}

fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_2M: u64 = 0x80;
    guest_write(mem, "PML4", PDPT_ADDR | PRESENT_RW, PML4_ADDR)?;
    guest_write(mem, "PDPT", PD_ADDR | PRESENT_RW, PDPT_ADDR)?;
    for i in 0..512u64 {
        guest_write(mem, "PD", (i << 21) | PRESENT_RW | PAGE_2M, PD_ADDR + i * 8)?;
    }
    Ok(())
}

fn segment(selector: u16, flags: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the vCPU's registers for the 64-bit entry: long mode with paging on the boot page
/// tables, flat segments, RIP at the entry point, RSI at the zero page.
pub fn setup_vcpu_regs(vcpu: &VcpuFd, layout: &BootLayout) -> Result<(), BootError> {
    let verr = |what| move |source| BootError::Vcpu { what, source };
    let mut sregs = vcpu.get_sregs().map_err(verr("special registers"))?;
    let code = segment(BOOT_CS, CODE64_FLAGS);
    let data = segment(BOOT_DS, DATA_FLAGS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (4 * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(verr("special registers"))?;

    let regs = kvm_regs {
        rip: layout.entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(verr("general registers"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(verr("FPU state"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_boot_protocol() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(BOOT_CS, CODE64_FLAGS);
        assert_eq!((cs.l, cs.db, cs.present, cs.type_, cs.s), (1, 0, 1, 0xb, 1));
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("twinvm-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn wrong_kernel_files_are_named() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let text = temp_file("text", &[b'x'; 4096]);
        let e = load_guest(&mem, &text, None, "").unwrap_err().to_string();
        assert!(
            e.contains("not an x86-64 vmlinux ELF image: no ELF magic"),
            "{e}"
        );

        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = temp_file("bz", &bz);
        let e = load_guest(&mem, &bz, None, "").unwrap_err().to_string();
        assert!(e.contains("bzImage"), "{e}");

        let mut arm = vec![0u8; 0x1000];
        arm[..4].copy_from_slice(b"\x7fELF");
        arm[4] = 2;
        arm[5] = 1;
        arm[18] = 183; // aarch64
        let arm = temp_file("arm", &arm);
        let e = load_guest(&mem, &arm, None, "").unwrap_err().to_string();
        assert!(e.contains("ELF machine is 183"), "{e}");

        let missing = std::env::temp_dir().join("twinvm-no-such-kernel");
        let e = load_guest(&mem, &missing, None, "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read kernel"), "{e}");
        for p in [text, bz, arm] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn zero_page_and_tables_are_written() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        write_zero_page(&mem, 10, 0x300_0000, 0x1000, 64 << 20).unwrap();
        write_gdt(&mem).unwrap();
        write_page_tables(&mem).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].size }, (64 << 20) - HIMEM_START);
        let pd1: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pd1, (1 << 21) | 0x83);
        let cs: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 16)).unwrap();
        assert_eq!(cs, 0x00af_9b00_0000_ffff);
    }
}
