//! myha's topology layer over etcd: the key layout and records of `docs/design.md`, tablet
//! registration under a lease, the shard lock and lock-conditional writes, resilient watches,
//! and the audit log.
//!
//! Every etcd call is bounded by [`Topo::op_timeout`]; background tasks (registration,
//! lock keep-alive, watches) retry with bounded backoff and never panic.

mod access;
mod client;
mod error;
mod keys;
mod lease;
mod lock;
mod records;
mod registration;
mod term;
mod tls_probe;
mod watch;

pub use access::{EtcdAccess, EtcdUser, Refusal};
pub use client::{Result, Topo, Unreadable, DEFAULT_OP_TIMEOUT};
pub use error::{ParseError, TopoError};
pub use keys::{prefix_range_end, validate_name, Keys, DEFAULT_PREFIX};
pub use lock::{lease_left, LockRequest, ShardLock, DEFAULT_LOCK_TTL};
pub use records::SELF_DEMOTE_PEER_WINDOW;
pub use records::{
    alias, now_ms, parse_alias, AuditEntry, CellRecord, Durability, KeyspaceRecord, LockInfo,
    PromotionRecord, PromotionRule, QuarantineRecord, ShardRecord, TabletRecord, TabletType,
    MIN_LOSSLESS_SEMI_SYNC_TIMEOUT,
};
pub use registration::{Registration, RegistrationStatus};
pub use term::Term;
pub use watch::{PrefixWatch, Snapshot};

/// Re-exported so callers can use [`Topo::client`] without naming the crate version.
pub use etcd_client;
