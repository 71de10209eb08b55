//! The interface between the virtio-mmio transport and a device model, and the interrupt
//! output the two share.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

/// Bit of the interrupt status register: a used ring was updated.
pub const INT_USED_RING: u32 = 1 << 0;
/// Bit of the interrupt status register: the device configuration changed.
pub const INT_CONFIG: u32 = 1 << 1;

/// The interrupt output of one virtio device: the interrupt status register the driver reads
/// and acknowledges, and an edge flag the vCPU loop takes and turns into an edge on the 8259.
///
/// Cloning shares the state: the transport keeps one handle, the activated device another.
/// Nothing here signals KVM or wakes a thread; the flag waits until the loop asks.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Debug, Default)]
struct InterruptState {
    /// The interrupt status register (`INT_USED_RING | INT_CONFIG`).
    status: AtomicU32,
    /// Set on every signal, cleared by `take_irq`.
    edge: AtomicBool,
}

impl Interrupt {
    /// Signals that the device put buffers in a used ring.
    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    /// Signals that the device configuration changed (or that the device needs a reset).
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bits: u32) {
        self.0.status.fetch_or(bits, Ordering::AcqRel);
        self.0.edge.store(true, Ordering::Release);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.0.status.load(Ordering::Acquire)
    }

    /// A driver write of the interrupt acknowledge register: clears `bits` in the status.
    pub fn ack(&self, bits: u32) {
        self.0.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether the device signalled since the last call; clears the flag. Each `true` is one
    /// edge for the interrupt controller.
    pub fn take_irq(&self) -> bool {
        self.0.edge.swap(false, Ordering::AcqRel)
    }

    /// The interrupt status register and whether an edge waits to be taken (for a snapshot).
    pub fn state(&self) -> (u32, bool) {
        (
            self.0.status.load(Ordering::Acquire),
            self.0.edge.load(Ordering::Acquire),
        )
    }

    /// Puts back a snapshot's interrupt status and edge.
    pub fn restore(&self, status: u32, edge: bool) {
        self.0.status.store(status, Ordering::Release);
        self.0.edge.store(edge, Ordering::Release);
    }

    /// Clears the status register and any edge not yet taken (device reset).
    pub fn reset(&self) {
        self.0.status.store(0, Ordering::Release);
        self.0.edge.store(false, Ordering::Release);
    }
}

/// One virtqueue's configuration and ring positions, for a snapshot (virtio-queue's
/// `QueueState`, which has no serde of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver marked it ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl QueueSnapshot {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }

    /// A queue in this state, checked by virtio-queue (sizes, alignment).
    pub fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("queue state: {e}"))
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues from the device's.
    #[error("device has {expected} queues, activation passed {got}")]
    QueueCount {
        /// The device's number of queues.
        expected: usize,
        /// The number passed.
        got: usize,
    },
    /// The driver accepted a feature combination the device cannot work with.
    #[error("unusable features {0:#x}")]
    Features(u64),
}

/// A virtio device model behind a transport.
///
/// Every method runs on the vCPU thread inside a VM exit (or an explicit call of the vCPU
/// loop); none may block, spawn work or look at the clock (see the module documentation).
pub trait VirtioDevice {
    /// The virtio device ID (1 for a network card).
    fn device_type(&self) -> u32;

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// The maximum size of each of the device's queues; the length is the number of queues.
    /// Each size must be a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes beyond
    /// the configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device: the driver set DRIVER_OK with `acked_features` accepted and `queues`
    /// (one per entry of [`queue_max_sizes`](Self::queue_max_sizes), ready and checked against
    /// `mem`) configured. The device signals through `interrupt`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;

    /// Whether the device has been activated (and not reset since).
    fn is_activated(&self) -> bool;

    /// The driver notified queue `queue_index` (an index below the number of queues). Ignored
    /// by a device that is not activated.
    fn notify(&mut self, queue_index: usize);

    /// Returns the device to its state before activation: it drops its queues, memory and
    /// interrupt handle and ignores everything until activated again.
    fn reset(&mut self);

    /// The device's own state, for a snapshot (the transport keeps its registers itself).
    type State: serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug + Clone;

    /// The device's state now.
    fn save_state(&self) -> Self::State;

    /// Puts the device in a snapshot's state; an activated one works on `mem` and signals
    /// through `interrupt` (the transport's). An error says what in the state is unusable.
    fn restore_state(
        &mut self,
        state: &Self::State,
        mem: GuestMemory,
        interrupt: Interrupt,
    ) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_ack_and_edge() {
        let i = Interrupt::default();
        let shared = i.clone();
        assert!(!i.take_irq());
        shared.signal_used();
        assert_eq!(i.status(), INT_USED_RING);
        assert!(i.take_irq());
        assert!(!i.take_irq(), "an edge is taken once");
        shared.signal_config();
        assert_eq!(i.status(), INT_USED_RING | INT_CONFIG);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG);
        i.reset();
        assert_eq!(i.status(), 0);
        assert!(!i.take_irq());
    }
}

#[cfg(test)]
mod send_tests {
    /// The machine may move its devices to the vCPU thread.
    #[test]
    fn transport_and_tap_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<super::super::MmioTransport<super::super::Net>>();
        assert_send::<crate::tap::Tap>();
    }
}
