//! Fault tolerance: the [`Role`] of a side of a pair and the checks it makes at start-up,
//! the output rule on the primary (held output and its releaser), the failover state
//! machine (one entry point for every peer loss), and the arbiter
//! adapters (the claims a side makes when it loses its peer, the incarnation it makes them
//! as, and the checks made when it starts).

pub mod arbiter;
pub mod etcd;
pub mod failover;
pub mod output;
pub mod role;

pub use role::Role;
