//! Virtio devices on the virtio-mmio transport: the transport ([`mmio::MmioTransport`]), the
//! interface a device model implements ([`device::VirtioDevice`]), descriptor chain checking
//! ([`chain`]) and the network device ([`net::Net`]).
//!
//! # Determinism
//!
//! A virtio device is a second processor that reads and writes guest memory. If it ran on its
//! own thread, or woke on a timer or on a host file descriptor becoming readable, the moment at
//! which the guest sees its writes would depend on host scheduling, and the backup could not
//! reproduce it (DESIGN.md, Determinism 4). So these devices do nothing on their own:
//!
//! - **All device work happens on the vCPU thread, inside a VM exit.** A guest access to the
//!   register window ([`mmio::MmioTransport::read`]/[`write`](mmio::MmioTransport::write)) is
//!   handled to completion before the vCPU resumes: a queue notify on the transmit queue pops
//!   every available chain, copies the frames out, fills the used ring and raises the
//!   interrupt, all within the MMIO exit that wrote the notify register. The guest-visible
//!   effects of a guest action are therefore a function of guest state at that exit alone,
//!   identical on primary and backup.
//! - **Input enters only at delivery points, by explicit call of the owner.** A received frame
//!   is written into the guest by [`net::Net::deliver_rx`], which the vCPU loop calls at a
//!   delivery point, where it also logs the frame and the position (the backup makes the same
//!   call at the same position). The device never reads the TAP itself; it holds no fds.
//! - **Interrupts are flags, not eventfds.** The device sets a bit in the interrupt status
//!   register and an edge flag ([`device::Interrupt::take_irq`]); the owner turns the flag into
//!   an edge on the user-space 8259, which injects only at a delivery point. Nothing is ever
//!   signalled to KVM directly (no irqfd, no ioeventfd).
//! - **Output is collected, not sent.** Transmitted frames gather in the device until the owner
//!   takes them ([`net::Net::take_tx_frames`]) and holds them under the output rule.
//! - **Every DMA write goes through vm-memory's `Bytes` API**, so the guest memory's dirty
//!   bitmap sees the pages the device wrote (received frames, used rings), which KVM's dirty log
//!   does not; the state digests need both.
//! - **Bad guest input never stops the device.** A malformed descriptor chain is returned to the
//!   guest as used with length 0 and a warning, and the device carries on; a device the guest
//!   has not activated ignores notifies and received frames.
//!
//! Features that would make the device's behaviour depend on timing or on hidden host state are
//! not offered: no `VIRTIO_F_EVENT_IDX` (interrupt suppression follows only the avail ring's
//! `VRING_AVAIL_F_NO_INTERRUPT` flag, read at the exit), no offloads (checksum, TSO), no
//! mergeable receive buffers.

pub mod chain;
pub mod device;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod testutil;

pub use device::{Interrupt, VirtioDevice};
pub use mmio::MmioTransport;
pub use net::Net;
