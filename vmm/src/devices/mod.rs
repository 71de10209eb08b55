//! The user-space device model: every device that can raise an interrupt lives here, in the
//! VMM, so that the VMM alone decides when the guest sees it (DESIGN.md, Determinism 2).
//!
//! Devices sit on the port I/O bus ([`bus::PioBus`]) or the MMIO bus ([`bus::MmioBus`]),
//! which resolve a port or an address to the device's id and offset; the machine dispatches
//! on the id. Interrupt lines
//! from devices go to the 8259 pair ([`pic::PicPair`]), which the vCPU loop asks for a vector
//! at every delivery point.

pub mod bus;
pub mod clock;
pub mod cmos;
pub mod model;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod virtio;

pub use bus::{MmioBus, PioBus};
