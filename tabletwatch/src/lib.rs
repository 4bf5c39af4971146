//! tabletwatch: follows every tablet's health.
//!
//! [`TabletWatch`] watches the tablet registrations (`{p}/tablets/`), shard records
//! (`{p}/shards/`) and quarantines (`{p}/quarantine/`, attached to each tablet's view) in etcd
//! through topo's resilient watches and keeps, for every registered tablet, a gRPC
//! `StreamHealth` subscription to its agent (reconnecting with backoff when it breaks, dropped
//! when the tablet deregisters). It publishes an immutable [`FleetSnapshot`] on every change.
//!
//! The snapshot holds data, not judgements: freshness and every other time-dependent question
//! take an explicit `now` ([`TabletView::is_fresh`] etc.), so the orchestrator's and gateway's
//! decisions are pure `(snapshot, now) -> decision` functions.
//!
//! Metrics (through the `metrics` facade): `myha_tabletwatch_health_messages_total{tablet}`,
//! `myha_tabletwatch_stream_reconnects_total{tablet}`, `myha_tabletwatch_tablets`,
//! `myha_tabletwatch_streams_connected`, `myha_tabletwatch_topo_synced`.

mod snapshot;
mod stream;
mod watcher;

pub use snapshot::{
    health_read_only, health_replicating, testing, FleetSnapshot, HealthSample, ShardView,
    StreamState, TabletView,
};
pub use watcher::{QuarantineMap, ShardMap, TabletMap, TabletWatch, TopoInputs, WatchOptions};

/// Re-exported: the health message type.
pub use myha_proto::agent::Health;
