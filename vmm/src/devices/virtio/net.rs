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
use super::device::{ActivateError, Interrupt, VirtioDevice};
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
    /// the next available receive chain, through `mem` (the guest memory the device was
    /// activated with) so its dirty bitmap records the pages. Chains that turn out malformed
    /// are returned to the guest with length 0 and the next one is tried.
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
        let mut returned_bad = false;
        let result = loop {
            let chain = match a.rx.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => break Err(NetError::Queue(e.to_string())),
            };
            let Some(chain) = chain else {
                break Ok(RxResult::NoBuffer);
            };
            let head = chain.head_index();
            let buffers =
                match chain::walk(mem, chain, queue_size, Direction::DeviceWrites, usize::MAX) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!("virtio-net rx: {e}; chain returned unused");
                        self.counters.rx_bad_chains += 1;
                        if !matches!(e, ChainError::BadHead { .. }) {
                            put_used(&mut a.rx, mem, head, 0, "rx");
                        }
                        returned_bad = true;
                        // Each pass consumes one available entry, so this ends within one queue.
                        continue;
                    }
                };
            let have: usize = buffers.iter().map(|b| b.len as usize).sum();
            if have < need {
                // Leave the chain available for a smaller frame.
                a.rx.set_next_avail(a.rx.next_avail().wrapping_sub(1));
                break Err(NetError::RxBufferTooSmall { need, have });
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            // num_buffers (the last field) is 1 without VIRTIO_NET_F_MRG_RXBUF.
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            match scatter(mem, &buffers, &[&hdr, frame]) {
                Ok(()) => {
                    put_used(&mut a.rx, mem, head, need as u32, "rx");
                    self.counters.rx_frames += 1;
                    break Ok(RxResult::Delivered);
                }
                Err(e) => {
                    put_used(&mut a.rx, mem, head, 0, "rx");
                    returned_bad = true;
                    break Err(e.into());
                }
            }
        };
        let used = returned_bad || matches!(result, Ok(RxResult::Delivered));
        if used && wants_interrupt(&a.rx, mem) {
            a.interrupt.signal_used();
        }
        result
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
            // New receive buffers: the owner asks `rx_ready` at its next delivery point.
            RX_QUEUE => {}
            _ => tracing::warn!("virtio-net: notify of absent queue {queue_index}"),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}
