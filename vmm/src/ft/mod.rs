//! Fault tolerance: the [`Role`] of a side of a pair and the checks it makes at start-up,
//! the arbiter adapter (the claims a side makes when it loses its peer, the incarnation it
//! makes them as, and the checks made when it starts).

pub mod arbiter;
pub mod etcd;
pub mod role;

pub use role::Role;
