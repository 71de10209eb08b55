//! The twinvm VMM: guest memory, the vCPU loop, the 64-bit Linux boot, the user-space device
//! model, and (later) record, replay, the output rule and failover.

#![deny(missing_docs)]

pub mod boot;
pub mod console;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod ft;
pub mod hostcpu;
pub mod machine;
pub mod memory;
pub mod nic;
pub mod preempt;
pub mod rr;
pub mod signals;
pub mod snapshot;
pub mod tap;
pub mod trail;
pub mod transfer;
pub mod vcpu;
pub mod vstate;
