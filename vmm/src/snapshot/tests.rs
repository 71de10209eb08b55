//! The file format: what is written reads back, and every kind of damage is a clear error.

use super::*;
use crate::devices::serial::SerialConsole;

pub(crate) fn state(mem_mib: u64) -> SnapshotState {
    SnapshotState {
        image: ImageId {
            kernel_sha256: [1; 32],
            initrd_sha256: [2; 32],
            cmdline: "console=ttyS0".into(),
            mem_mib,
        },
        layout: BootLayout {
            entry: 0x100_0000,
            kernel_end: 0x200_0000,
            initrd_addr: 0x300_0000,
            initrd_size: 0x1000,
        },
        vcpu: VcpuState {
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                rax: 42,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: vcpu::FpuState {
                fpr: vec![[0; 16]; 8],
                fcw: 0x37f,
                fsw: 0,
                ftwx: 0,
                last_opcode: 0,
                last_ip: 0,
                last_dp: 0,
                xmm: vec![[7; 16]; 16],
                mxcsr: 0x1f80,
            },
            xsave: None,
            msrs: vec![(0xc000_0082, 0xffff_ffff_8180_0000)],
            events: Default::default(),
            debugregs: Default::default(),
        },
        devices: DeviceState {
            pic: PicPair::new(),
            pit: Pit::new(),
            cmos: crate::devices::cmos::Cmos::new().state(),
            serial: SerialConsole::new().state(),
            clock: Clock::new(),
            nic: None,
        },
        vmm: VmmState {
            position: 1234,
            halted: true,
            mono_ns: 5_000_000_000,
            console_hash: 99,
            console_bytes: 7,
            stepping: false,
            step_budget: 500,
            stepping_pushf: false,
            pending_input: b"ls\n".to_vec(),
            dirty_since_digest: vec![3, 5],
            log: None,
        },
    }
}

pub(crate) fn memory(mib: u64) -> GuestMemory {
    let mem = crate::memory::create_guest_memory(mib).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"world", GuestAddress((mib << 20) - 5))
        .unwrap();
    mem
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinvm-snap-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn written(name: &str) -> (PathBuf, WriteStats) {
    let path = temp(name);
    let stats = write(&path, &state(64), &memory(64)).unwrap();
    (path, stats)
}

#[test]
fn a_snapshot_reads_back_with_its_state_and_memory() {
    let (path, stats) = written("roundtrip.snap");
    assert_eq!(stats.pages_total, 64 << 8);
    assert_eq!(stats.pages_stored, 2, "only pages that are not all zero");
    assert_eq!(
        stats.bytes,
        std::fs::metadata(&path).unwrap().len(),
        "the figure is the file's size"
    );
    let snap = Snapshot::open(&path).unwrap();
    assert_eq!(snap.sha256, stats.sha256);
    assert_eq!(read_identity(&path).unwrap(), stats.sha256);
    assert_eq!(snap.state.vmm.position, 1234);
    assert_eq!(snap.state.vmm.pending_input, b"ls\n");
    assert_eq!(snap.state.vcpu.regs.rax, 42);
    assert_eq!(
        snap.state.vcpu.msrs,
        vec![(0xc000_0082, 0xffff_ffff_8180_0000)]
    );
    assert_eq!(snap.state.devices.pic, PicPair::new());
    let mem = crate::memory::create_guest_memory(64).unwrap();
    snap.write_memory(&mem).unwrap();
    let mut b = [0u8; 5];
    mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
    assert_eq!(&b, b"hello");
    mem.read_slice(&mut b, GuestAddress((64 << 20) - 5))
        .unwrap();
    assert_eq!(&b, b"world");
    // Memory of another size is refused.
    let other = crate::memory::create_guest_memory(128).unwrap();
    assert!(matches!(
        snap.write_memory(&other),
        Err(SnapshotError::Mismatch(_))
    ));
}

#[test]
fn a_truncated_snapshot_is_an_error_at_every_length() {
    let (path, _) = written("truncated.snap");
    let bytes = std::fs::read(&path).unwrap();
    // Cut in the preamble, the state, the bitmap, the pages and the checksum.
    for cut in [
        0,
        5,
        9,
        12,
        40,
        bytes.len() / 2,
        bytes.len() - 4097,
        bytes.len() - 1,
    ] {
        let p = temp(&format!("cut-{cut}.snap"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = Snapshot::open(&p).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Truncated { .. }
                    | SnapshotError::NotASnapshot { .. }
                    | SnapshotError::Corrupt(_)
            ),
            "cut at {cut}: {e}"
        );
        if cut > 40 {
            assert!(
                matches!(e, SnapshotError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_fails_the_checksum() {
    let (path, _) = written("corrupt.snap");
    let bytes = std::fs::read(&path).unwrap();
    for at in [30, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        let p = temp(&format!("flip-{at}.snap"));
        std::fs::write(&p, &b).unwrap();
        let e = Snapshot::open(&p).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::Checksum { .. } | SnapshotError::Truncated { .. }
            ),
            "flip at {at}: {e}"
        );
        assert!(e.to_string().contains("snapshot"), "{e}");
    }
}

#[test]
fn another_version_or_a_foreign_file_is_named() {
    let (path, _) = written("version.snap");
    let mut b = std::fs::read(&path).unwrap();
    b[8..10].copy_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
    let p = temp("v2.snap");
    std::fs::write(&p, &b).unwrap();
    match Snapshot::open(&p).unwrap_err() {
        SnapshotError::Version {
            found, supported, ..
        } => assert_eq!((found, supported), (SNAPSHOT_VERSION + 1, SNAPSHOT_VERSION)),
        e => panic!("{e}"),
    }
    let p = temp("foreign.snap");
    std::fs::write(&p, b"TWINVMLG\x02\x00 a log, not a snapshot").unwrap();
    assert!(matches!(
        Snapshot::open(&p).unwrap_err(),
        SnapshotError::NotASnapshot { .. }
    ));
    assert!(matches!(
        read_identity(&p).unwrap_err(),
        SnapshotError::NotASnapshot { .. }
    ));
}

#[test]
fn another_image_is_refused_with_every_difference() {
    let snap = state(64).image;
    let mut ours = snap.clone();
    assert!(snap.check(&ours).is_ok());
    ours.kernel_sha256 = [9; 32];
    ours.mem_mib = 128;
    let e = snap.check(&ours).unwrap_err().to_string();
    assert!(e.contains("kernel sha256"), "{e}");
    assert!(e.contains("pass --mem 64"), "{e}");
    // A snapshot with a NIC needs a VMM with one.
    let mut with_nic = snap.clone();
    with_nic.cmdline = format!("console=ttyS0 {}", crate::nic::cmdline_words(None));
    let e = with_nic.check(&snap).unwrap_err().to_string();
    assert!(e.contains("restore it with --nic"), "{e}");
}

#[test]
fn device_states_restore_what_they_saved() {
    let mut serial = SerialConsole::new();
    serial.write(1, 0x01); // IER: data-ready interrupts
    assert_eq!(serial.enqueue_input(b"abc"), 3);
    let s = serial.state();
    assert!(s.irq_pending);
    assert_eq!(s.in_buffer, b"abc");
    let mut back = SerialConsole::from_state(&s).unwrap();
    assert_eq!(back.state(), s);
    assert!(back.take_irq(), "the untaken edge is restored");
    assert!(!back.take_irq());
    assert_eq!(back.read(0), b'a');
    let mut taken = s.clone();
    taken.irq_pending = false;
    let back = SerialConsole::from_state(&taken).unwrap();
    assert!(
        !back.take_irq(),
        "no extra edge where the loop had taken it"
    );
    let mut cmos = crate::devices::cmos::Cmos::new();
    cmos.write(0, 0x0b, crate::devices::cmos::RtcNow::default());
    let c = cmos.state();
    assert_eq!(crate::devices::cmos::Cmos::from_state(&c).unwrap(), cmos);
    let mut bad = c.clone();
    bad.ram.pop();
    assert!(crate::devices::cmos::Cmos::from_state(&bad).is_none());
}
