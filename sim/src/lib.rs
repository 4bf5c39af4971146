//! myha's deterministic simulator (issue 11): in-memory models of MariaDB replication, etcd
//! and the network on one virtual clock ([`time::SimTime`]) and one seeded RNG, so that a run
//! is a pure function of its seed and a violation can be replayed.
//!
//! Test-only: no production binary depends on this crate.

pub mod etcd;
pub mod fleet;
pub mod lock;
pub mod mariadb;
pub mod net;
pub mod shard;
pub mod time;
