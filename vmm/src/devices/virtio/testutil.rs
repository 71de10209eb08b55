//! A minimal virtio driver for the unit tests: it negotiates through the register window and
//! lays out descriptor tables and rings in real guest memory, as the Linux driver would.

use vm_memory::{Bytes, GuestAddress};

use super::device::VirtioDevice;
use super::mmio::{reg, MmioTransport};
use crate::memory::{create_guest_memory, GuestMemory};

/// Queue size the driver picks.
pub const QSIZE: u16 = 16;
/// Where queue `q`'s structures start: descriptor table at +0, avail ring at +0x1000, used
/// ring at +0x2000.
const QUEUE_BASE: u64 = 0x10_0000;
/// Where test buffers may go.
pub const BUF_BASE: u64 = 0x20_0000;

/// `VIRTQ_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;

/// 64 MiB of guest memory.
pub fn memory() -> GuestMemory {
    create_guest_memory(64).expect("guest memory")
}

/// A register read.
pub fn r32<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// A register write.
pub fn w32<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// The device features, read through both selectors.
pub fn device_features<D: VirtioDevice>(t: &mut MmioTransport<D>) -> u64 {
    w32(t, reg::DEVICE_FEATURES_SEL, 0);
    let lo = r32(t, reg::DEVICE_FEATURES);
    w32(t, reg::DEVICE_FEATURES_SEL, 1);
    let hi = r32(t, reg::DEVICE_FEATURES);
    u64::from(hi) << 32 | u64::from(lo)
}

/// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns the status read back.
pub fn negotiate<D: VirtioDevice>(t: &mut MmioTransport<D>, features: u64) -> u32 {
    w32(t, reg::STATUS, 1);
    w32(t, reg::STATUS, 1 | 2);
    w32(t, reg::DRIVER_FEATURES_SEL, 0);
    w32(t, reg::DRIVER_FEATURES, features as u32);
    w32(t, reg::DRIVER_FEATURES_SEL, 1);
    w32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, reg::STATUS, 1 | 2 | 8);
    r32(t, reg::STATUS)
}

/// The driver side of the rings.
pub struct Driver {
    /// Guest memory.
    pub mem: GuestMemory,
    avail_idx: Vec<u16>,
}

impl Driver {
    /// A driver for `queues` queues on `mem`.
    pub fn new(mem: GuestMemory, queues: usize) -> Self {
        Driver {
            mem,
            avail_idx: vec![0; queues],
        }
    }

    /// Descriptor table of queue `q`.
    pub fn desc_table(q: usize) -> u64 {
        QUEUE_BASE + q as u64 * 0x1_0000
    }

    /// Available ring of queue `q`.
    pub fn avail_ring(q: usize) -> u64 {
        Self::desc_table(q) + 0x1000
    }

    /// Used ring of queue `q`.
    pub fn used_ring(q: usize) -> u64 {
        Self::desc_table(q) + 0x2000
    }

    /// Zeroes the rings and sets up every queue through the window (status must have
    /// FEATURES_OK).
    pub fn setup_queues<D: VirtioDevice>(&mut self, t: &mut MmioTransport<D>) {
        for q in 0..self.avail_idx.len() {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(Self::desc_table(q)))
                .unwrap();
            self.avail_idx[q] = 0;
            w32(t, reg::QUEUE_SEL, q as u32);
            assert!(r32(t, reg::QUEUE_NUM_MAX) >= u32::from(QSIZE));
            w32(t, reg::QUEUE_NUM, u32::from(QSIZE));
            w32(t, reg::QUEUE_DESC_LOW, Self::desc_table(q) as u32);
            w32(t, reg::QUEUE_DESC_HIGH, 0);
            w32(t, reg::QUEUE_AVAIL_LOW, Self::avail_ring(q) as u32);
            w32(t, reg::QUEUE_AVAIL_HIGH, 0);
            w32(t, reg::QUEUE_USED_LOW, Self::used_ring(q) as u32);
            w32(t, reg::QUEUE_USED_HIGH, 0);
            w32(t, reg::QUEUE_READY, 1);
            assert_eq!(r32(t, reg::QUEUE_READY), 1);
        }
    }

    /// The whole bring-up: negotiate every offered feature, set up the queues, DRIVER_OK.
    pub fn bring_up<D: VirtioDevice>(&mut self, t: &mut MmioTransport<D>) {
        let features = device_features(t);
        assert_eq!(negotiate(t, features) & 8, 8, "FEATURES_OK accepted");
        self.setup_queues(t);
        w32(t, reg::STATUS, 1 | 2 | 8 | 4);
        assert_eq!(r32(t, reg::STATUS), 1 | 2 | 8 | 4);
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(Self::desc_table(q) + 16 * u64::from(i)))
            .unwrap();
    }

    /// Puts chain `head` in queue `q`'s available ring and publishes it.
    pub fn offer(&mut self, q: usize, head: u16) {
        let idx = self.avail_idx[q];
        let slot = Self::avail_ring(q) + 4 + 2 * u64::from(idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.mem
            .write_obj(
                self.avail_idx[q].to_le(),
                GuestAddress(Self::avail_ring(q) + 2),
            )
            .unwrap();
    }

    /// Sets queue `q`'s available ring flags (1: no interrupt).
    pub fn set_avail_flags(&self, q: usize, flags: u16) {
        self.mem
            .write_obj(flags.to_le(), GuestAddress(Self::avail_ring(q)))
            .unwrap();
    }

    /// Queue `q`'s used index.
    pub fn used_idx(&self, q: usize) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(Self::used_ring(q) + 2))
                .unwrap(),
        )
    }

    /// Element `n` of queue `q`'s used ring: (id, len).
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let at = Self::used_ring(q) + 4 + 8 * u64::from(n % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Writes `data` at `addr`.
    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
