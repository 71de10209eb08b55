//! Fault tolerance: the arbiter adapter (the claims a side of a pair makes when it loses its
//! peer, the incarnation it makes them as, and the checks made when it starts).

pub mod arbiter;
pub mod etcd;
