//! virtio-net (device ID 1): one receive queue (0) and one transmit queue (1), every frame
//! preceded by a 12-byte `virtio_net_hdr_v1`, no offloads.
//!
//! The device never touches the host network: transmitted frames collect until the owner
//! takes them ([`Net::take_tx_frames`]) to hold under the output rule, and received frames
//! enter only when the owner calls [`Net::deliver_rx`] at a delivery point (see the module
//! documentation of [`super`]).

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::chain::{self, Buffer, ChainError, Direction};
use super::device::{ActivateError, Interrupt, QueueSnapshot, VirtioDevice};
use crate::memory::GuestMemory;

/// The virtio device ID of a network card.
pub const DEVICE_ID: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which precedes every frame in both directions.
pub const NET_HDR_LEN: usize = 12;
/// Longest frame accepted in either direction, header excluded (a 64 KiB GSO frame plus an
/// Ethernet and a VLAN header, as Firecracker and Cloud Hypervisor allow).
pub const MAX_FRAME_LEN: usize = 65550;

/// The features offered: VERSION_1, MAC and STATUS.
pub const FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;

/// Errors of the network device's owner-facing calls.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A frame longer than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is longer than {MAX_FRAME_LEN}")]
    FrameTooLarge(usize),
    /// An empty frame.
    #[error("empty frame")]
    EmptyFrame,
    /// The next receive buffer cannot hold the frame (the driver posts buffers too small for
    /// it); the buffer stays available, the frame should be dropped.
    #[error("receive buffer of {have} bytes cannot hold header and frame ({need} bytes)")]
    RxBufferTooSmall {
        /// Header plus frame.
        need: usize,
        /// The buffer's capacity.
        have: usize,
    },
    /// The driver's available ring is inconsistent (e.g. its index runs more than a queue
    /// ahead); nothing was consumed.
    #[error("receive queue: {0}")]
    Queue(String),
    /// Writing the frame into guest memory failed after its buffers had been checked.
    #[error("writing the frame into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// The outcome of [`Net::deliver_rx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxResult {
    /// The frame is in the guest, the used ring updated and the interrupt raised (unless the
    /// driver suppressed it).
    Delivered,
    /// No receive buffer is available: keep the frame and retry at a later delivery point.
    NoBuffer,
    /// The driver has not activated the device: drop the frame, as a card without a driver
    /// does.
    NotActivated,
}

/// Counters of what the device did, for statistics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames taken from the transmit queue.
    pub tx_frames: u64,
    /// Transmit chains rejected as malformed.
    pub tx_bad_chains: u64,
    /// Frames written into the receive queue.
    pub rx_frames: u64,
    /// Receive chains rejected as malformed.
    pub rx_bad_chains: u64,
}

/// What a snapshot keeps of the card (its transmitted frames are taken by the owner first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The MAC address.
    pub mac: [u8; 6],
    /// The features the driver accepted at activation.
    pub acked_features: u64,
    /// The receive and transmit queues of an activated card.
    pub active: Option<(QueueSnapshot, QueueSnapshot)>,
    /// Frames and chains handled so far.
    pub counters: (u64, u64, u64, u64),
}

/// The state of an activated device.
#[derive(Debug)]
struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

/// A virtio network card.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    active: Option<Active>,
    acked_features: u64,
    tx_frames: Vec<Vec<u8>>,
    counters: NetCounters,
}

/// Adds a used element for `head` with `len` bytes written; warns if the ring cannot take it.
fn put_used(q: &mut Queue, mem: &GuestMemory, head: u16, len: u32, which: &str) {
    if let Err(e) = q.add_used(mem, head, len) {
        tracing::warn!("virtio-net {which}: cannot return chain {head} to the used ring: {e}");
    }
}

/// Whether the driver wants an interrupt for new used buffers on `q`: not if it set
/// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags (EVENT_IDX is not offered).
fn wants_interrupt(q: &Queue, mem: &GuestMemory) -> bool {
    match mem.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Pops every chain now available on `q` (at most one queue's worth: the available index is
/// read once).
fn pop_all<'m>(
    q: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Vec<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    Ok(q.iter(mem)?.collect())
}

impl Net {
    /// A card with MAC address `mac`, not yet activated by the guest.
    pub fn new(mac: [u8; 6]) -> Self {
        Net {
            mac,
            active: None,
            acked_features: 0,
            tx_frames: Vec::new(),
            counters: NetCounters::default(),
        }
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the device did so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Takes the frames the guest transmitted since the last call, in order, without their
    /// virtio-net headers. Frames survive a device reset: the guest completed them before it.
    pub fn take_tx_frames(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx_frames)
    }

    /// Whether transmitted frames wait to be taken.
    pub fn has_tx_frames(&self) -> bool {
        !self.tx_frames.is_empty()
    }

    /// Whether the driver has a receive buffer available now (read from guest memory, so the
    /// answer is the same on primary and backup at the same position). A `true` does not
    /// promise [`RxResult::Delivered`]: the buffer may turn out malformed or too small.
    pub fn rx_ready(&self) -> bool {
        let Some(a) = &self.active else {
            return false;
        };
        match a.rx.avail_idx(&a.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != a.rx.next_avail(),
            Err(_) => false,
        }
    }

    /// Writes `frame`, preceded by a `virtio_net_hdr_v1` (no offloads, `num_buffers` 1), into
    /// the next well-formed available receive chain, through `mem` (the guest memory the
    /// device was activated with) so its dirty bitmap records the pages. Malformed chains
    /// met before that one are returned to the guest with length 0 as part of the delivery.
    ///
    /// Only [`RxResult::Delivered`] changes anything the guest can see (guest memory, the
    /// used ring, the interrupt status): that outcome is what the primary logs and the backup
    /// replays, with the same frame against the same guest memory, so both make the same
    /// change. Any other outcome leaves the queue exactly as it was, because the backup never
    /// sees a frame that was not delivered. Malformed chains that no delivery passes over are
    /// returned when the guest notifies the receive queue (see [`Net::notify`]).
    ///
    /// Call only at a delivery point. On `Err` the frame cannot be delivered and should be
    /// dropped; on [`RxResult::NoBuffer`] it should be kept and retried.
    pub fn deliver_rx(&mut self, mem: &GuestMemory, frame: &[u8]) -> Result<RxResult, NetError> {
        if frame.len() > MAX_FRAME_LEN {
            return Err(NetError::FrameTooLarge(frame.len()));
        }
        if frame.is_empty() {
            return Err(NetError::EmptyFrame);
        }
        let Some(a) = &mut self.active else {
            return Ok(RxResult::NotActivated);
        };
        let need = NET_HDR_LEN + frame.len();
        let queue_size = a.rx.size();
        // Look ahead without committing: walking a chain only reads guest memory, and the
        // available index is put back unless the frame is delivered.
        let start = a.rx.next_avail();
        let mut skipped = Vec::new();
        let found = match a.rx.iter(mem) {
            Ok(it) => {
                let mut found = None;
                // One pass reads the available index once, so this ends within one queue.
                for chain in it {
                    let head = chain.head_index();
                    match chain::walk(mem, chain, queue_size, Direction::DeviceWrites, usize::MAX) {
                        Ok(buffers) => {
                            found = Some((head, buffers));
                            break;
                        }
                        Err(e) => skipped.push((head, e)),
                    }
                }
                found
            }
            Err(e) => return Err(NetError::Queue(e.to_string())),
        };
        let Some((head, buffers)) = found else {
            a.rx.set_next_avail(start);
            return Ok(RxResult::NoBuffer);
        };
        let have: usize = buffers.iter().map(|b| b.len as usize).sum();
        if have < need {
            // Leave every chain available (a smaller frame may fit).
            a.rx.set_next_avail(start);
            return Err(NetError::RxBufferTooSmall { need, have });
        }
        let mut hdr = [0u8; NET_HDR_LEN];
        // num_buffers (the last field) is 1 without VIRTIO_NET_F_MRG_RXBUF.
        hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
        // `walk` checked that every buffer lies in guest memory and the vCPU is not running,
        // so this cannot fail; if it did, nothing is returned to the guest.
        if let Err(e) = scatter(mem, &buffers, &[&hdr, frame]) {
            a.rx.set_next_avail(start);
            return Err(e.into());
        }
        for (bad, e) in skipped {
            tracing::warn!("virtio-net rx: {e}; chain returned unused");
            self.counters.rx_bad_chains += 1;
            if !matches!(e, ChainError::BadHead { .. }) {
                put_used(&mut a.rx, mem, bad, 0, "rx");
            }
        }
        put_used(&mut a.rx, mem, head, need as u32, "rx");
        self.counters.rx_frames += 1;
        if wants_interrupt(&a.rx, mem) {
            a.interrupt.signal_used();
        }
        Ok(RxResult::Delivered)
    }

    /// Returns the malformed chains at the head of the receive queue to the guest (length
    /// 0), up to the first well-formed one, which stays available. Runs on the guest's own
    /// notify of the receive queue, a synchronous exit that the primary and the backup
    /// execute at the same position with the same guest memory, so a chain the guest got
    /// wrong is handed back identically on both sides and never blocks the queue for good.
    fn return_bad_rx_chains(&mut self) {
        let Some(a) = &mut self.active else {
            return;
        };
        let mem = &a.mem;
        let queue_size = a.rx.size();
        let start = a.rx.next_avail();
        let mut bad = Vec::new();
        match a.rx.iter(mem) {
            Ok(it) => {
                for chain in it {
                    let head = chain.head_index();
                    match chain::walk(mem, chain, queue_size, Direction::DeviceWrites, usize::MAX) {
                        Ok(_) => break,
                        Err(e) => bad.push((head, e)),
                    }
                }
            }
            Err(e) => {
                tracing::warn!("virtio-net rx: {e}");
                return;
            }
        }
        // Consume exactly the malformed chains: the well-formed one that stopped the walk
        // (if any) stays available.
        a.rx.set_next_avail(start.wrapping_add(bad.len() as u16));
        if bad.is_empty() {
            return;
        }
        for (head, e) in bad {
            tracing::warn!("virtio-net rx: {e}; chain returned unused");
            self.counters.rx_bad_chains += 1;
            if !matches!(e, ChainError::BadHead { .. }) {
                put_used(&mut a.rx, mem, head, 0, "rx");
            }
        }
        if wants_interrupt(&a.rx, mem) {
            a.interrupt.signal_used();
        }
    }

    /// Takes every available chain off the transmit queue: gathers each frame, returns the
    /// chain as used and raises the interrupt once at the end.
    fn process_tx(&mut self) {
        let Some(a) = &mut self.active else {
            return;
        };
        let mem = &a.mem;
        let chains = match pop_all(&mut a.tx, mem) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("virtio-net tx: {e}");
                return;
            }
        };
        if chains.is_empty() {
            return;
        }
        let queue_size = a.tx.size();
        for chain in chains {
            let head = chain.head_index();
            let frame = chain::walk(
                mem,
                chain,
                queue_size,
                Direction::DeviceReads,
                NET_HDR_LEN + MAX_FRAME_LEN,
            )
            .map_err(|e| e.to_string())
            .and_then(|buffers| gather(mem, &buffers).map_err(|e| e.to_string()));
            match frame {
                Ok(frame) if frame.len() > NET_HDR_LEN => {
                    self.tx_frames.push(frame[NET_HDR_LEN..].to_vec());
                    self.counters.tx_frames += 1;
                }
                Ok(frame) => {
                    tracing::warn!(
                        "virtio-net tx: chain {head} of {} bytes holds no frame after the header; dropped",
                        frame.len()
                    );
                    self.counters.tx_bad_chains += 1;
                }
                Err(e) => {
                    tracing::warn!("virtio-net tx: {e}; chain dropped");
                    self.counters.tx_bad_chains += 1;
                }
            }
            // The device writes nothing into a transmit chain: the used length is 0.
            put_used(&mut a.tx, mem, head, 0, "tx");
        }
        if wants_interrupt(&a.tx, mem) {
            a.interrupt.signal_used();
        }
    }
}

/// Reads the bytes of `buffers` into one vector.
fn gather(mem: &GuestMemory, buffers: &[Buffer]) -> Result<Vec<u8>, GuestMemoryError> {
    let total: usize = buffers.iter().map(|b| b.len as usize).sum();
    let mut out = vec![0u8; total];
    let mut at = 0;
    for b in buffers {
        let len = b.len as usize;
        mem.read_slice(&mut out[at..at + len], b.addr)?;
        at += len;
    }
    Ok(out)
}

/// Writes the concatenation of `parts` across `buffers` (which must hold it), through the
/// `Bytes` API so that the dirty bitmap sees every page.
fn scatter(mem: &GuestMemory, buffers: &[Buffer], parts: &[&[u8]]) -> Result<(), GuestMemoryError> {
    let mut bufs = buffers.iter();
    let (mut addr, mut room) = match bufs.next() {
        Some(b) => (b.addr, b.len as usize),
        None => (GuestAddress(0), 0),
    };
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            while room == 0 {
                // The caller checked the capacity; running out here is a bug, reported as an
                // out-of-range access rather than a panic.
                let b = bufs
                    .next()
                    .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
                addr = b.addr;
                room = b.len as usize;
            }
            let n = room.min(part.len());
            mem.write_slice(&part[..n], addr)?;
            addr = GuestAddress(addr.0 + n as u64);
            room -= n;
            part = &part[n..];
        }
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; ... }: only the fields of the
        // offered features.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The modern interface makes the MAC read-only (VIRTIO_NET_F_CTRL_MAC_ADDR is not
        // offered).
        tracing::warn!(
            "virtio-net: {}-byte config write at {offset:#x} ignored (read-only)",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        if acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ActivateError::Features(acked_features));
        }
        self.acked_features = acked_features;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn notify(&mut self, queue_index: usize) {
        match queue_index {
            TX_QUEUE => self.process_tx(),
            // New receive buffers: malformed ones at the head go back now; the owner asks
            // `rx_ready` at its next delivery point.
            RX_QUEUE => self.return_bad_rx_chains(),
            _ => tracing::warn!("virtio-net: notify of absent queue {queue_index}"),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    type State = NetState;

    fn save_state(&self) -> NetState {
        let c = self.counters;
        NetState {
            mac: self.mac,
            acked_features: self.acked_features,
            active: self
                .active
                .as_ref()
                .map(|a| (QueueSnapshot::of(&a.rx), QueueSnapshot::of(&a.tx))),
            counters: (c.tx_frames, c.tx_bad_chains, c.rx_frames, c.rx_bad_chains),
        }
    }

    fn restore_state(
        &mut self,
        s: &NetState,
        mem: GuestMemory,
        interrupt: Interrupt,
    ) -> Result<(), String> {
        if s.mac != self.mac {
            return Err(format!(
                "the snapshot's card has MAC {}, this one {}",
                crate::nic::format_mac(&s.mac),
                crate::nic::format_mac(&self.mac)
            ));
        }
        self.acked_features = s.acked_features;
        self.active = match &s.active {
            Some((rx, tx)) => Some(Active {
                mem,
                rx: rx.to_queue()?,
                tx: tx.to_queue()?,
                interrupt,
            }),
            None => None,
        };
        let (tx_frames, tx_bad_chains, rx_frames, rx_bad_chains) = s.counters;
        self.counters = NetCounters {
            tx_frames,
            tx_bad_chains,
            rx_frames,
            rx_bad_chains,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;

    use super::super::device::{INT_CONFIG, INT_USED_RING};
    use super::super::mmio::{reg, MmioTransport};
    use super::super::testutil::*;
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const RX: usize = RX_QUEUE;
    const TX: usize = TX_QUEUE;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// A transport with an activated card, and its driver.
    fn up() -> (MmioTransport<Net>, Driver) {
        let mem = memory();
        let mut t = MmioTransport::new(Net::new(MAC), mem.clone()).unwrap();
        let mut d = Driver::new(mem, 2);
        d.bring_up(&mut t);
        assert!(t.device().is_activated());
        (t, d)
    }

    /// Offers a one-descriptor transmit chain (header + `f`) at descriptor `i`.
    fn offer_tx(t: &mut MmioTransport<Net>, d: &mut Driver, i: u16, f: &[u8]) {
        let addr = BUF_BASE + 0x1_0000 * u64::from(i);
        let mut buf = vec![0u8; NET_HDR_LEN];
        buf.extend_from_slice(f);
        d.put(addr, &buf);
        d.set_desc(TX, i, addr, buf.len() as u32, 0, 0);
        d.offer(TX, i);
        w32(t, reg::QUEUE_NOTIFY, TX as u32);
    }

    /// Offers a one-descriptor receive chain of `len` bytes at descriptor `i`.
    fn offer_rx(d: &mut Driver, i: u16, len: u32) -> u64 {
        let addr = BUF_BASE + 0x80_0000 + 0x1_0000 * u64::from(i);
        d.set_desc(RX, i, addr, len, F_WRITE, 0);
        d.offer(RX, i);
        addr
    }

    #[test]
    fn identity_features_and_config_space_reads_the_mac() {
        let mut t = MmioTransport::new(Net::new(MAC), memory()).unwrap();
        assert_eq!(r32(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 1);
        assert_eq!(device_features(&mut t), FEATURES);
        let mut mac = [0u8; 6];
        t.read(reg::CONFIG, &mut mac);
        assert_eq!(mac, MAC);
        // Byte, word and offset reads, as the Linux driver does them.
        let mut b = [0u8; 1];
        t.read(reg::CONFIG + 5, &mut b);
        assert_eq!(b[0], MAC[5]);
        let mut w = [0u8; 2];
        t.read(reg::CONFIG + 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), VIRTIO_NET_S_LINK_UP as u16);
        let mut past = [0xaa; 4];
        t.read(reg::CONFIG + 0x40, &mut past);
        assert_eq!(past, [0; 4], "beyond the config reads zero");
        // The MAC is read-only.
        negotiate(&mut t, FEATURES);
        t.write(reg::CONFIG, &[0; 6]);
        t.read(reg::CONFIG, &mut mac);
        assert_eq!(mac, MAC);
    }

    #[test]
    fn features_ok_refused_for_unoffered_features_or_without_version_1() {
        let mut t = MmioTransport::new(Net::new(MAC), memory()).unwrap();
        // VIRTIO_NET_F_CSUM (bit 0) is not offered.
        assert_eq!(negotiate(&mut t, FEATURES | 1) & 8, 0);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(negotiate(&mut t, 1 << VIRTIO_NET_F_MAC) & 8, 0);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1) & 8, 8);
        assert_eq!(t.acked_features(), 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn tx_chain_split_over_two_descriptors_comes_out_byte_exact() {
        let (mut t, mut d) = up();
        let f = frame(100);
        // Descriptor 0: the header and the first 20 bytes; descriptor 1: the rest.
        let mut first = vec![0u8; NET_HDR_LEN];
        first.extend_from_slice(&f[..20]);
        d.put(BUF_BASE, &first);
        d.put(BUF_BASE + 0x5000, &f[20..]);
        d.set_desc(TX, 0, BUF_BASE, first.len() as u32, F_NEXT, 1);
        d.set_desc(TX, 1, BUF_BASE + 0x5000, 80, 0, 0);
        d.offer(TX, 0);
        assert!(!t.take_irq());
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);

        assert!(t.device().has_tx_frames());
        assert_eq!(t.device_mut().take_tx_frames(), vec![f]);
        assert!(t.device_mut().take_tx_frames().is_empty());
        assert_eq!(d.used_idx(TX), 1);
        assert_eq!(d.used_elem(TX, 0), (0, 0));
        assert!(t.take_irq());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
        w32(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(t.device().counters().tx_frames, 1);
    }

    #[test]
    fn tx_takes_every_available_chain_and_respects_no_interrupt() {
        let (mut t, mut d) = up();
        d.set_avail_flags(TX, VRING_AVAIL_F_NO_INTERRUPT as u16);
        // Three chains published before one notify.
        for i in 0..3u16 {
            let addr = BUF_BASE + 0x1000 * u64::from(i);
            let mut buf = vec![0u8; NET_HDR_LEN];
            buf.extend_from_slice(&frame(60 + usize::from(i)));
            d.put(addr, &buf);
            d.set_desc(TX, i, addr, buf.len() as u32, 0, 0);
            d.offer(TX, i);
        }
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        let frames = t.device_mut().take_tx_frames();
        assert_eq!(frames, vec![frame(60), frame(61), frame(62)]);
        assert_eq!(d.used_idx(TX), 3);
        assert!(!t.take_irq(), "the driver suppressed the interrupt");
        // Many more chains than the queue holds, in turns: the ring wraps.
        d.set_avail_flags(TX, 0);
        for n in 0..(3 * QSIZE) {
            offer_tx(&mut t, &mut d, n % QSIZE, &frame(64));
            assert!(t.take_irq());
        }
        assert_eq!(
            t.device_mut().take_tx_frames().len(),
            3 * usize::from(QSIZE)
        );
        assert_eq!(d.used_idx(TX), 3 + 3 * QSIZE);
    }

    #[test]
    fn rx_into_two_descriptor_chain_lands_byte_exact_with_header() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        assert!(!t.device().rx_ready());
        // An 8-byte first buffer splits even the header.
        d.set_desc(RX, 3, BUF_BASE, 8, F_WRITE | F_NEXT, 7);
        d.set_desc(RX, 7, BUF_BASE + 0x3000, 2000, F_WRITE, 0);
        d.offer(RX, 3);
        assert!(t.device().rx_ready());
        let f = frame(1514);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &f).unwrap(),
            RxResult::Delivered
        );
        let mut got = d.get(BUF_BASE, 8);
        got.extend(d.get(BUF_BASE + 0x3000, NET_HDR_LEN - 8 + f.len()));
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers
        assert_eq!(&got[..NET_HDR_LEN], &hdr);
        assert_eq!(&got[NET_HDR_LEN..], &f[..]);
        assert_eq!(d.used_idx(RX), 1);
        assert_eq!(d.used_elem(RX, 0), (3, (NET_HDR_LEN + f.len()) as u32));
        assert!(t.take_irq());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
        assert!(!t.device().rx_ready());
        assert_eq!(t.device().counters().rx_frames, 1);
    }

    #[test]
    fn rx_writes_are_seen_by_the_dirty_bitmap() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        let addr = offer_rx(&mut d, 0, 2048);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        // The region's own bitmap (the machine reads it the same way for its digests).
        let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
        let bitmap = mapping.bitmap();
        bitmap.reset();
        t.device_mut().deliver_rx(&mem, &frame(100)).unwrap();
        assert!(bitmap.dirty_at(addr as usize), "frame page");
        let used = Driver::used_ring(RX) as usize;
        assert!(bitmap.dirty_at(used), "used ring page");
        assert!(!bitmap.dirty_at(addr as usize + 0x10_0000));
    }

    #[test]
    fn rx_without_buffers_is_no_buffer_then_delivers_once_offered() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::NoBuffer
        );
        assert!(!t.take_irq());
        assert_eq!(d.used_idx(RX), 0);
        offer_rx(&mut d, 0, 2048);
        w32(&mut t, reg::QUEUE_NOTIFY, RX as u32);
        assert!(
            !t.take_irq(),
            "a notify of the rx queue does nothing by itself"
        );
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::Delivered
        );
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::NoBuffer
        );
    }

    #[test]
    fn rx_refuses_bad_frames_and_small_buffers_without_consuming() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        offer_rx(&mut d, 0, 100);
        let too_big = vec![0u8; MAX_FRAME_LEN + 1];
        assert!(matches!(
            t.device_mut().deliver_rx(&mem, &too_big),
            Err(NetError::FrameTooLarge(_))
        ));
        assert!(matches!(
            t.device_mut().deliver_rx(&mem, &[]),
            Err(NetError::EmptyFrame)
        ));
        let err = t.device_mut().deliver_rx(&mem, &frame(200)).unwrap_err();
        assert!(
            matches!(
                err,
                NetError::RxBufferTooSmall {
                    need: 212,
                    have: 100
                }
            ),
            "{err}"
        );
        assert!(t.device().rx_ready(), "the buffer is still available");
        assert_eq!(d.used_idx(RX), 0);
        assert!(!t.take_irq());
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(88)).unwrap(),
            RxResult::Delivered
        );
        assert_eq!(d.used_elem(RX, 0), (0, 100));
    }

    #[test]
    fn malformed_tx_chains_are_returned_empty_and_the_device_keeps_working() {
        let (mut t, mut d) = up();
        let end_of_memory = 64 << 20;
        // 0: a buffer beyond guest memory.
        d.set_desc(TX, 0, end_of_memory - 8, 64, 0, 0);
        // 1 -> 2 -> 1: a loop.
        d.put(BUF_BASE, &[0u8; 64]);
        d.set_desc(TX, 1, BUF_BASE, 32, F_NEXT, 2);
        d.set_desc(TX, 2, BUF_BASE, 32, F_NEXT, 1);
        // 3 -> 999: next index out of range.
        d.set_desc(TX, 3, BUF_BASE, 32, F_NEXT, 999);
        // 4: device-writable where the device must only read.
        d.set_desc(TX, 4, BUF_BASE, 32, F_WRITE, 0);
        // 5: longer than any frame.
        d.set_desc(
            TX,
            5,
            BUF_BASE,
            (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32,
            0,
            0,
        );
        // 6: only a header, no frame.
        d.set_desc(TX, 6, BUF_BASE, NET_HDR_LEN as u32, 0, 0);
        for head in 0..7 {
            d.offer(TX, head);
        }
        // A head beyond the queue: cannot even be returned.
        d.offer(TX, 500);
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        assert!(t.device_mut().take_tx_frames().is_empty());
        assert_eq!(t.device().counters().tx_bad_chains, 8);
        assert_eq!(d.used_idx(TX), 7);
        for n in 0..7 {
            assert_eq!(d.used_elem(TX, n), (u32::from(n), 0));
        }
        assert!(t.take_irq());
        // And a good frame after all that.
        offer_tx(&mut t, &mut d, 8, &frame(70));
        assert_eq!(t.device_mut().take_tx_frames(), vec![frame(70)]);
        assert_eq!(d.used_idx(TX), 8);
    }

    #[test]
    fn malformed_rx_chains_are_skipped_and_the_frame_lands_in_the_next_good_one() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        // 0: device-readable buffer in the receive queue.
        d.set_desc(RX, 0, BUF_BASE, 2048, 0, 0);
        // 1: beyond guest memory.
        d.set_desc(RX, 1, 1 << 40, 2048, F_WRITE, 0);
        // 2 -> 2: a loop.
        d.set_desc(RX, 2, BUF_BASE, 2048, F_WRITE | F_NEXT, 2);
        // 3 -> 16: next index just past the queue.
        d.set_desc(RX, 3, BUF_BASE, 2048, F_WRITE | F_NEXT, QSIZE);
        for head in 0..4 {
            d.offer(RX, head);
        }
        let good = offer_rx(&mut d, 4, 2048);
        let f = frame(300);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &f).unwrap(),
            RxResult::Delivered
        );
        assert_eq!(t.device().counters().rx_bad_chains, 4);
        assert_eq!(d.used_idx(RX), 5);
        for n in 0..4 {
            assert_eq!(d.used_elem(RX, n), (u32::from(n), 0));
        }
        assert_eq!(d.used_elem(RX, 4), (4, 312));
        assert_eq!(d.get(good + NET_HDR_LEN as u64, f.len()), f);
        assert!(t.take_irq());
        // Only bad chains: a frame changes nothing; the guest's notify returns them.
        d.set_desc(RX, 5, 1 << 40, 2048, F_WRITE, 0);
        d.offer(RX, 5);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &f).unwrap(),
            RxResult::NoBuffer
        );
        assert_eq!(d.used_idx(RX), 5);
        assert!(!t.take_irq());
        w32(&mut t, reg::QUEUE_NOTIFY, RX as u32);
        assert_eq!(d.used_idx(RX), 6);
        assert_eq!(d.used_elem(RX, 5), (5, 0));
        assert!(t.take_irq(), "the returned chain is signalled");
    }

    /// The guest-visible state of a card: its receive used ring (index and every element),
    /// its interrupt status, and the bytes of every receive buffer area.
    fn visible_rx_state(t: &mut MmioTransport<Net>, d: &Driver) -> Vec<u8> {
        let mut v = d.get(Driver::used_ring(RX), 4 + 8 * usize::from(QSIZE));
        v.extend(r32(t, reg::INTERRUPT_STATUS).to_le_bytes());
        v.extend(d.get(BUF_BASE, 0x4000));
        v.extend(d.get(BUF_BASE + 0x80_0000, 0x1_0000 * 4));
        v
    }

    #[test]
    fn a_frame_that_is_not_delivered_changes_nothing_the_guest_sees() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        // Malformed chains only (posted without a notify): the frame is refused and nothing
        // is consumed or signalled.
        d.set_desc(RX, 0, 1 << 40, 2048, F_WRITE, 0);
        d.set_desc(RX, 1, BUF_BASE, 2048, 0, 0);
        d.offer(RX, 0);
        d.offer(RX, 1);
        let before = visible_rx_state(&mut t, &d);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::NoBuffer
        );
        assert!(!t.take_irq());
        assert_eq!(visible_rx_state(&mut t, &d), before);
        // Malformed chains then one too small for the frame: still nothing.
        offer_rx(&mut d, 2, 64);
        let before = visible_rx_state(&mut t, &d);
        assert!(matches!(
            t.device_mut().deliver_rx(&mem, &frame(200)),
            Err(NetError::RxBufferTooSmall { .. })
        ));
        assert!(!t.take_irq());
        assert_eq!(visible_rx_state(&mut t, &d), before);
        assert_eq!(t.device().counters().rx_bad_chains, 0);
        // A frame that fits is delivered past the malformed chains, which go back with it.
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(40)).unwrap(),
            RxResult::Delivered
        );
        assert_eq!(d.used_idx(RX), 3);
        assert_eq!(d.used_elem(RX, 0), (0, 0));
        assert_eq!(d.used_elem(RX, 1), (1, 0));
        assert_eq!(d.used_elem(RX, 2), (2, 52));
        assert!(t.take_irq());
    }

    #[test]
    fn the_rx_notify_returns_malformed_chains_at_the_head_only() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        d.set_desc(RX, 0, 1 << 40, 2048, F_WRITE, 0);
        d.set_desc(RX, 1, BUF_BASE, 2048, F_WRITE | F_NEXT, 1);
        d.offer(RX, 0);
        d.offer(RX, 1);
        let good = offer_rx(&mut d, 2, 2048);
        d.set_desc(RX, 3, 1 << 40, 2048, F_WRITE, 0);
        d.offer(RX, 3);
        w32(&mut t, reg::QUEUE_NOTIFY, RX as u32);
        // 0 and 1 are back; 2 (good) and 3 (behind it) stay available.
        assert_eq!(d.used_idx(RX), 2);
        assert_eq!(d.used_elem(RX, 0), (0, 0));
        assert_eq!(d.used_elem(RX, 1), (1, 0));
        assert!(t.take_irq());
        assert_eq!(t.device().counters().rx_bad_chains, 2);
        assert!(t.device().rx_ready());
        // A notify with a good chain at the head changes nothing.
        w32(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        w32(&mut t, reg::QUEUE_NOTIFY, RX as u32);
        assert_eq!(d.used_idx(RX), 2);
        assert!(!t.take_irq());
        let f = frame(100);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &f).unwrap(),
            RxResult::Delivered
        );
        assert_eq!(d.used_elem(RX, 2), (2, 112));
        assert_eq!(d.get(good + NET_HDR_LEN as u64, f.len()), f);
        // The malformed chain behind it goes back at the next notify.
        w32(&mut t, reg::QUEUE_NOTIFY, RX as u32);
        assert_eq!(d.used_idx(RX), 4);
        assert_eq!(d.used_elem(RX, 3), (3, 0));
        assert!(!t.device().rx_ready());
    }

    /// The same guest on two cards (a primary and a backup replaying it): the primary also
    /// receives frames that its malformed or small buffers cannot take, which are never
    /// logged, so the backup never sees them. What the guest sees must stay identical.
    #[test]
    fn undelivered_frames_on_the_primary_do_not_make_the_backup_diverge() {
        let (mut tp, mut dp) = up();
        let (mut tb, mut db) = up();
        let (mp, mb) = (dp.mem.clone(), db.mem.clone());
        // The guest's actions, applied to both sides at the same positions.
        type Step = fn(&mut MmioTransport<Net>, &mut Driver);
        let guest: [Step; 4] = [
            |_, d| {
                d.set_desc(RX, 0, 1 << 40, 2048, F_WRITE, 0);
                d.offer(RX, 0);
            },
            |_, d| {
                offer_rx(d, 1, 100);
            },
            |t, _| w32(t, reg::QUEUE_NOTIFY, RX as u32),
            |_, d| {
                d.set_desc(RX, 2, BUF_BASE, 64, F_WRITE | F_NEXT, 2);
                d.offer(RX, 2);
            },
        ];
        for step in guest {
            step(&mut tp, &mut dp);
            step(&mut tb, &mut db);
            // Frames only the primary's host received, none of them delivered.
            for len in [200, 500, 1500] {
                let r = tp.device_mut().deliver_rx(&mp, &frame(len));
                assert!(!matches!(r, Ok(RxResult::Delivered)), "{r:?}");
            }
            assert_eq!(tp.take_irq(), tb.take_irq());
            assert_eq!(
                visible_rx_state(&mut tp, &dp),
                visible_rx_state(&mut tb, &db)
            );
        }
        // A logged frame: both deliver it the same way.
        let f = frame(70);
        for (t, m) in [(&mut tp, &mp), (&mut tb, &mb)] {
            assert_eq!(
                t.device_mut().deliver_rx(m, &f).unwrap(),
                RxResult::Delivered
            );
        }
        assert_eq!(tp.take_irq(), tb.take_irq());
        assert_eq!(
            visible_rx_state(&mut tp, &dp),
            visible_rx_state(&mut tb, &db)
        );
        assert_eq!(dp.used_idx(RX), 2);
    }

    #[test]
    fn inactive_device_ignores_notifies_and_frames() {
        let mem = memory();
        let mut t = MmioTransport::new(Net::new(MAC), mem.clone()).unwrap();
        let mut d = Driver::new(mem.clone(), 2);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::NotActivated
        );
        assert!(!t.device().rx_ready());
        // Queues set up and a chain offered, but no DRIVER_OK.
        negotiate(&mut t, FEATURES);
        d.setup_queues(&mut t);
        let mut buf = vec![0u8; NET_HDR_LEN];
        buf.extend_from_slice(&frame(60));
        d.put(BUF_BASE, &buf);
        d.set_desc(TX, 0, BUF_BASE, buf.len() as u32, 0, 0);
        d.offer(TX, 0);
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        assert!(!t.device().has_tx_frames());
        assert_eq!(d.used_idx(TX), 0);
        assert!(!t.take_irq());
        // DRIVER_OK: the chain offered earlier goes out at the next notify.
        w32(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        assert_eq!(t.device_mut().take_tx_frames(), vec![frame(60)]);
    }

    #[test]
    fn reset_clears_state_and_the_device_comes_back() {
        let (mut t, mut d) = up();
        let mem = d.mem.clone();
        offer_tx(&mut t, &mut d, 0, &frame(60));
        offer_rx(&mut d, 0, 2048);
        assert!(t.take_irq());
        assert_ne!(r32(&mut t, reg::INTERRUPT_STATUS), 0);

        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        for q in 0..2 {
            w32(&mut t, reg::QUEUE_SEL, q);
            assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        }
        assert!(!t.device().is_activated());
        assert!(!t.device().rx_ready());
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(60)).unwrap(),
            RxResult::NotActivated
        );
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        assert!(!t.take_irq());
        // Frames the guest completed before the reset are still the owner's.
        assert_eq!(t.device_mut().take_tx_frames(), vec![frame(60)]);

        // A fresh bring-up on fresh rings works from index 0 again.
        d.bring_up(&mut t);
        offer_tx(&mut t, &mut d, 0, &frame(61));
        assert_eq!(t.device_mut().take_tx_frames(), vec![frame(61)]);
        assert_eq!(d.used_idx(TX), 1);
        offer_rx(&mut d, 0, 2048);
        assert_eq!(
            t.device_mut().deliver_rx(&mem, &frame(62)).unwrap(),
            RxResult::Delivered
        );
    }

    #[test]
    fn driver_ok_with_rings_outside_memory_sets_needs_reset() {
        let mem = memory();
        let mut t = MmioTransport::new(Net::new(MAC), mem.clone()).unwrap();
        let mut d = Driver::new(mem, 2);
        negotiate(&mut t, FEATURES);
        d.setup_queues(&mut t);
        w32(&mut t, reg::QUEUE_SEL, 1);
        w32(&mut t, reg::QUEUE_READY, 0);
        w32(&mut t, reg::QUEUE_USED_HIGH, 0x10);
        w32(&mut t, reg::QUEUE_READY, 1);
        w32(&mut t, reg::STATUS, 1 | 2 | 8 | 4);
        assert_eq!(r32(&mut t, reg::STATUS) & 0x40, 0x40, "DEVICE_NEEDS_RESET");
        assert!(!t.device().is_activated());
        assert!(t.take_irq());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
        // A reset and a correct bring-up recover.
        w32(&mut t, reg::STATUS, 0);
        d.bring_up(&mut t);
        assert!(t.device().is_activated());
    }
}
