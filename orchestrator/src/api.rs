//! `GET /api/v1/shards`: the current snapshot as JSON. The translation is pure.

use std::time::{Duration, Instant};

use serde::Serialize;
use tabletwatch::{FleetSnapshot, ShardView, StreamState, TabletView};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardsResponse {
    /// The snapshot's version (increases with every change).
    pub version: u64,
    /// The etcd watches are current (else registrations and shard records may be stale).
    pub topo_synced: bool,
    /// What `fresh` was judged with.
    pub health_stale_after_ms: u64,
    pub shards: Vec<ShardJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardJson {
    pub keyspace: String,
    pub shard: String,
    /// The shard record exists (else only tablets registered for it are known).
    pub has_record: bool,
    /// The primary the shard record names.
    pub primary: Option<String>,
    pub term: u64,
    pub term_start_ms: Option<u64>,
    pub reparent_in_progress: Option<String>,
    pub tablets: Vec<TabletJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TabletJson {
    pub alias: String,
    /// The shard record names it as primary.
    pub is_primary: bool,
    pub mysql_addr: String,
    pub grpc_addr: String,
    /// `connected` or `connecting`.
    pub stream: &'static str,
    /// Why the stream is down (while connecting after a failure).
    pub stream_error: Option<String>,
    /// Failed attempts since the stream was last up.
    pub stream_failures: u32,
    /// How long the stream has been in its state.
    pub stream_state_ms: u64,
    /// Age of the last health message; `null` when none was ever received.
    pub last_health_age_ms: Option<u64>,
    /// Wall clock of the last health message's receipt, ms since the epoch.
    pub last_health_received_ms: Option<u64>,
    /// The last health is at most `health_stale_after_ms` old.
    pub fresh: bool,
    pub mysql_reachable: Option<bool>,
    pub mysql_error: Option<String>,
    pub read_only: Option<bool>,
    pub replicating: Option<bool>,
    pub lag_ms: Option<u64>,
    /// The highest term the agent knows.
    pub term: Option<u64>,
    pub fenced: Option<bool>,
    pub fence_reason: Option<String>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn tablet_json(
    shard: &ShardView,
    t: &TabletView,
    now: Instant,
    stale_after: Duration,
) -> TabletJson {
    let h = t.health();
    let failures = match &t.stream {
        StreamState::Connecting { failures, .. } => *failures,
        StreamState::Connected { .. } => 0,
    };
    TabletJson {
        alias: t.alias().to_string(),
        is_primary: shard.primary_alias() == Some(t.alias()),
        mysql_addr: t.mysql_addr(),
        grpc_addr: t.record.grpc_addr.clone(),
        stream: t.stream.as_str(),
        stream_error: t.stream.last_error().map(str::to_string),
        stream_failures: failures,
        stream_state_ms: millis(t.stream.duration(now)),
        last_health_age_ms: t.health_age(now).map(millis),
        last_health_received_ms: t.last_health.as_deref().map(|s| s.received_ms),
        fresh: t.is_fresh(now, stale_after),
        mysql_reachable: t.mysql_reachable(),
        mysql_error: h.and_then(|h| non_empty(&h.mysql_error)),
        read_only: t.read_only(),
        replicating: t.replicating(),
        lag_ms: t.lag_ms(),
        term: t.term(),
        fenced: t.fenced(),
        fence_reason: h.and_then(|h| non_empty(&h.fence_reason)),
    }
}

pub fn shards_response(
    snap: &FleetSnapshot,
    now: Instant,
    stale_after: Duration,
) -> ShardsResponse {
    ShardsResponse {
        version: snap.version,
        topo_synced: snap.topo_synced,
        health_stale_after_ms: millis(stale_after),
        shards: snap
            .shards
            .values()
            .map(|s| ShardJson {
                keyspace: s.keyspace.clone(),
                shard: s.shard.clone(),
                has_record: s.record.is_some(),
                primary: s.primary_alias().map(str::to_string),
                term: s.term(),
                term_start_ms: s.record.as_deref().map(|r| r.term_start_ms),
                reparent_in_progress: s
                    .record
                    .as_deref()
                    .and_then(|r| r.reparent_in_progress.clone()),
                tablets: s
                    .tablets
                    .values()
                    .map(|t| tablet_json(s, t, now, stale_after))
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tabletwatch::testing::*;
    use tabletwatch::HealthSample;

    #[test]
    fn snapshot_translates_to_json() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(1500);
        let stale = Duration::from_secs(1);
        let p = tablet(
            tablet_record("zone1-101", "ks", "0"),
            Some(primary_health("zone1-101", 2)),
            t0 + Duration::from_millis(1200),
        );
        let mut r = tablet(
            tablet_record("zone1-102", "ks", "0"),
            Some(replica_health("zone1-102", 2, Some(30))),
            t0,
        );
        r.stream = StreamState::Connecting {
            since: t0 + Duration::from_millis(500),
            since_ms: 0,
            failures: 3,
            last_error: Some("connect to 127.0.0.1:1: refused".into()),
        };
        let mut unreachable = replica_health("zone1-103", 2, None);
        unreachable.mysql_reachable = false;
        unreachable.mysql = None;
        unreachable.replication = None;
        unreachable.mysql_error = "Connection refused".into();
        let mut u = tablet(tablet_record("zone1-103", "ks", "0"), None, t0);
        u.last_health = Some(Arc::new(HealthSample {
            health: unreachable,
            received_at: now,
            received_ms: 42,
        }));
        let none = tablet(tablet_record("zone1-201", "other", "-80"), None, t0);

        let mut snap = FleetSnapshot::empty(t0);
        snap.version = 7;
        snap.topo_synced = true;
        snap.shards.insert(
            ("ks".into(), "0".into()),
            shard(
                "ks",
                "0",
                Some(shard_record("ks", "0", Some("zone1-101"), 2)),
                vec![p, r, u],
            ),
        );
        snap.shards.insert(
            ("other".into(), "-80".into()),
            shard("other", "-80", None, vec![none]),
        );

        let resp = shards_response(&snap, now, stale);
        assert_eq!(
            (resp.version, resp.topo_synced, resp.health_stale_after_ms),
            (7, true, 1000)
        );
        assert_eq!(resp.shards.len(), 2);
        let ks = &resp.shards[0];
        assert_eq!(
            (ks.keyspace.as_str(), ks.shard.as_str(), ks.term),
            ("ks", "0", 2)
        );
        assert_eq!(ks.primary.as_deref(), Some("zone1-101"));
        assert!(ks.has_record);
        let [p, r, u] = &ks.tablets[..] else {
            panic!("3 tablets: {:?}", ks.tablets)
        };
        assert!(p.is_primary && !r.is_primary);
        assert_eq!(p.stream, "connected");
        assert_eq!(p.last_health_age_ms, Some(300));
        assert!(p.fresh);
        assert_eq!(
            (p.mysql_reachable, p.read_only, p.replicating),
            (Some(true), Some(false), Some(false))
        );
        assert_eq!(r.stream, "connecting");
        assert_eq!(
            r.stream_error.as_deref(),
            Some("connect to 127.0.0.1:1: refused")
        );
        assert_eq!((r.stream_failures, r.stream_state_ms), (3, 1000));
        assert_eq!(r.last_health_age_ms, Some(1500));
        assert!(!r.fresh);
        assert_eq!(
            (r.read_only, r.replicating, r.lag_ms),
            (Some(true), Some(true), Some(30))
        );
        assert_eq!(
            (u.mysql_reachable, u.read_only, u.replicating),
            (Some(false), None, None)
        );
        assert_eq!(u.mysql_error.as_deref(), Some("Connection refused"));
        assert_eq!(u.last_health_received_ms, Some(42));
        let other = &resp.shards[1];
        assert!(!other.has_record);
        assert_eq!(
            (other.primary.as_ref(), other.term, other.term_start_ms),
            (None, 0, None)
        );
        let n = &other.tablets[0];
        assert_eq!(
            (n.last_health_age_ms, n.fresh, n.mysql_reachable, n.term),
            (None, false, None, None)
        );

        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(json["shards"][0]["tablets"][1]["lag_ms"], 30);
        assert_eq!(
            json["shards"][1]["tablets"][0]["last_health_age_ms"],
            serde_json::Value::Null
        );
    }
}
