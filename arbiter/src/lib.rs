//! The test-and-set arbiter that prevents split brain.
//!
//! `twinvm-arbiter` runs on a third machine. When the primary and the backup of a
//! fault-tolerant VM lose each other, both ask it to test-and-set the VM's current
//! generation; exactly one wins and goes on alone, the other halts. Every decision is on
//! disk before it is answered, so a restarted arbiter never grants a generation twice.
//!
//! * [`protocol`]: the HTTP/JSON wire types and id rules;
//! * [`store`]: the durable state (checksummed, fsync'd append-only log);
//! * [`auth`]: the shared bearer token;
//! * [`server`]: the HTTP server;
//! * [`client`]: the async and blocking client used by the VMM;
//! * [`rules`]: the decisions (won / lost / stale / future generation, re-pair) as pure
//!   functions shared by the store and the etcd backend;
//! * [`etcd`]: the same arbiter on an etcd cluster (transactions on one key per VM).
//!
//! See `arbiter/README.md` for the protocol, the semantics and how to run the service.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod etcd;
pub mod protocol;
pub mod rules;
pub mod server;
pub mod store;

pub use auth::{Auth, Token};
pub use client::{BlockingClient, Client, ClientConfig, ClientError};
pub use etcd::{BlockingEtcdClient, EtcdClient, EtcdConfig, EtcdError};
pub use protocol::{ClaimResponse, Entry, ErrorCode, Outcome};
pub use store::Store;
