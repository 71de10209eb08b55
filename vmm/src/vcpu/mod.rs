//! The vCPU side of the data path, free of KVM where it can be: what an exit is
//! ([`exit`]: a kick, an MMIO access for the bus, or a synchronous exit that counts as a
//! position) and single-step delivery ([`stepper`]). The run loop itself is
//! `machine::Machine::run_loop`.

pub mod exit;
pub mod stepper;
