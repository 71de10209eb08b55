//! The twinvm VMM: guest memory, the vCPU loop, the 64-bit Linux boot, the user-space device
//! model, and (later) record, replay, the output rule and failover.

#![deny(missing_docs)]

pub mod devices;
pub mod boot;
pub mod memory;
pub mod vstate;
pub mod cpuid;
pub mod machine;
pub mod console;
