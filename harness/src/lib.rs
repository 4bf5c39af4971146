//! The test harness: everything [`launcher`] starts (real etcd, MariaDB and myha daemons),
//! re-exported, plus what only tests and benchmarks need: the [`writer`] that issues writes
//! through the gateway or at the recorded primary and records every acknowledgement, so a test
//! can prove that no acknowledged write was lost. No production binary depends on this crate.

pub use launcher::*;

pub mod writer;

pub use writer::{Ack, DeposedAck, FaultMark, Writer, WriterOptions, WriterReport};
