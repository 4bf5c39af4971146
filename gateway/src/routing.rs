//! The routing choice for one shard: where writes (`rw`) and reads (`ro`) may go now. Pure:
//! a shard view, an explicit `now` and a policy in, a decision with reasons out. The proxy of
//! a later issue will route by exactly this.
//!
//! - `rw`: the primary named by the shard record, only if the record is the newest word
//!   (no reparent under way, no tablet reports a newer term, the primary's agent knows the
//!   record's term) and the primary's health is fresh, reachable, not fenced and writable.
//! - `ro`: every other registered tablet whose health is fresh, whose mysqld is reachable and
//!   replicates (both threads running) with a measured lag under `max_replica_lag`.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;
use tabletwatch::{Health, ShardView, TabletView};

/// Bounds for [`route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// A tablet whose last health is older than this gets no traffic.
    pub health_stale_after: Duration,
    /// Replicas lagging this much or more get no reads.
    pub max_replica_lag: Duration,
}

/// A tablet chosen for traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub alias: String,
    /// `host:port` of its mysqld, from the registration.
    pub mysql_addr: String,
    /// Replication lag (replicas).
    pub lag_ms: Option<u64>,
}

/// Why writes have nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RwUnavailable {
    NoShardRecord,
    NoPrimaryNamed,
    ReparentInProgress {
        what: String,
    },
    /// A tablet reports a term above the record's: our view of the record is behind.
    NewerTermReported {
        tablet: String,
        term: u64,
        record_term: u64,
    },
    NotRegistered {
        alias: String,
    },
    NoHealth {
        alias: String,
        stream_error: Option<String>,
    },
    StaleHealth {
        alias: String,
        age: Duration,
        max: Duration,
    },
    MysqlUnreachable {
        alias: String,
        error: String,
    },
    Fenced {
        alias: String,
        reason: String,
    },
    /// The primary's agent has not seen the record's term yet.
    BehindTerm {
        alias: String,
        agent_term: u64,
        record_term: u64,
    },
    ReadOnly {
        alias: String,
    },
}

impl fmt::Display for RwUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RwUnavailable::NoShardRecord => write!(f, "no shard record"),
            RwUnavailable::NoPrimaryNamed => write!(f, "the shard record names no primary"),
            RwUnavailable::ReparentInProgress { what } => write!(f, "reparent in progress: {what}"),
            RwUnavailable::NewerTermReported { tablet, term, record_term } => write!(
                f,
                "{tablet} reports term {term}, newer than the shard record's {record_term}: the record view is behind"
            ),
            RwUnavailable::NotRegistered { alias } => write!(f, "primary {alias} is not registered"),
            RwUnavailable::NoHealth { alias, stream_error } => match stream_error {
                Some(e) => write!(f, "no health from primary {alias} ({e})"),
                None => write!(f, "no health from primary {alias} yet"),
            },
            RwUnavailable::StaleHealth { alias, age, max } => {
                write!(f, "primary {alias}'s health is {} ms old (max {} ms)", age.as_millis(), max.as_millis())
            }
            RwUnavailable::MysqlUnreachable { alias, error } => write!(f, "primary {alias}'s mysqld is unreachable: {error}"),
            RwUnavailable::Fenced { alias, reason } => write!(f, "primary {alias} is fenced: {reason}"),
            RwUnavailable::BehindTerm { alias, agent_term, record_term } => write!(
                f,
                "primary {alias}'s agent knows term {agent_term}, the shard record is at {record_term}"
            ),
            RwUnavailable::ReadOnly { alias } => write!(f, "primary {alias} is read-only"),
        }
    }
}

/// Why a replica gets no reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    NoHealth { stream_error: Option<String> },
    StaleHealth { age: Duration, max: Duration },
    MysqlUnreachable { error: String },
    Fenced { reason: String },
    NotReplicating { detail: String },
    LagUnknown,
    LagTooHigh { lag_ms: u64, max_ms: u64 },
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::NoHealth {
                stream_error: Some(e),
            } => write!(f, "no health ({e})"),
            Excluded::NoHealth { stream_error: None } => write!(f, "no health yet"),
            Excluded::StaleHealth { age, max } => {
                write!(
                    f,
                    "health is {} ms old (max {} ms)",
                    age.as_millis(),
                    max.as_millis()
                )
            }
            Excluded::MysqlUnreachable { error } => write!(f, "mysqld unreachable: {error}"),
            Excluded::Fenced { reason } => write!(f, "fenced: {reason}"),
            Excluded::NotReplicating { detail } => write!(f, "not replicating: {detail}"),
            Excluded::LagUnknown => write!(f, "replication lag unknown"),
            Excluded::LagTooHigh { lag_ms, max_ms } => {
                write!(f, "lag {lag_ms} ms >= max {max_ms} ms")
            }
        }
    }
}

/// The routing choice for one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub rw: Result<Target, RwUnavailable>,
    /// By alias.
    pub ro: Vec<Target>,
    /// Replicas left out, by alias, with why.
    pub ro_excluded: Vec<(String, Excluded)>,
}

impl Routing {
    /// Why reads have nowhere to go (`None` when `ro` is not empty).
    pub fn ro_unavailable(&self) -> Option<String> {
        if !self.ro.is_empty() {
            return None;
        }
        if self.ro_excluded.is_empty() {
            return Some("no replica registered".into());
        }
        let why: Vec<String> = self
            .ro_excluded
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect();
        Some(format!("no eligible replica ({})", why.join("; ")))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The fresh health of a tablet, or why there is none.
enum Freshness<'a> {
    Fresh(&'a Health),
    Stale(Duration),
    /// With the stream's last error, if any.
    Missing(Option<String>),
}

fn freshness(t: &TabletView, now: Instant, max: Duration) -> Freshness<'_> {
    match (t.health(), t.health_age(now)) {
        (Some(h), Some(age)) if age <= max => Freshness::Fresh(h),
        (Some(_), Some(age)) => Freshness::Stale(age),
        _ => Freshness::Missing(t.stream.last_error().map(str::to_string)),
    }
}

fn rw(shard: &ShardView, now: Instant, policy: &RoutingPolicy) -> Result<Target, RwUnavailable> {
    let record = shard
        .record
        .as_deref()
        .ok_or(RwUnavailable::NoShardRecord)?;
    let alias = record
        .primary
        .clone()
        .ok_or(RwUnavailable::NoPrimaryNamed)?;
    if let Some(what) = &record.reparent_in_progress {
        return Err(RwUnavailable::ReparentInProgress { what: what.clone() });
    }
    if let Some((tablet, term)) = shard
        .highest_reported_term()
        .filter(|(_, t)| *t > record.term)
    {
        return Err(RwUnavailable::NewerTermReported {
            tablet: tablet.to_string(),
            term,
            record_term: record.term,
        });
    }
    let t = shard
        .tablet(&alias)
        .ok_or_else(|| RwUnavailable::NotRegistered {
            alias: alias.clone(),
        })?;
    let max = policy.health_stale_after;
    let h = match freshness(t, now, max) {
        Freshness::Fresh(h) => h,
        Freshness::Stale(age) => return Err(RwUnavailable::StaleHealth { alias, age, max }),
        Freshness::Missing(stream_error) => {
            return Err(RwUnavailable::NoHealth {
                alias,
                stream_error,
            })
        }
    };
    if !h.mysql_reachable {
        return Err(RwUnavailable::MysqlUnreachable {
            alias,
            error: h.mysql_error.clone(),
        });
    }
    if h.fenced {
        return Err(RwUnavailable::Fenced {
            alias,
            reason: h.fence_reason.clone(),
        });
    }
    if h.term < record.term {
        return Err(RwUnavailable::BehindTerm {
            alias,
            agent_term: h.term,
            record_term: record.term,
        });
    }
    // Reachable health without a MySQL status cannot say it is writable.
    if h.mysql
        .as_ref()
        .is_none_or(|m| m.read_only || m.super_read_only)
    {
        return Err(RwUnavailable::ReadOnly { alias });
    }
    Ok(Target {
        alias,
        mysql_addr: t.mysql_addr(),
        lag_ms: None,
    })
}

fn replica(t: &TabletView, now: Instant, policy: &RoutingPolicy) -> Result<Target, Excluded> {
    let max = policy.health_stale_after;
    let h = match freshness(t, now, max) {
        Freshness::Fresh(h) => h,
        Freshness::Stale(age) => return Err(Excluded::StaleHealth { age, max }),
        Freshness::Missing(stream_error) => return Err(Excluded::NoHealth { stream_error }),
    };
    if !h.mysql_reachable {
        return Err(Excluded::MysqlUnreachable {
            error: h.mysql_error.clone(),
        });
    }
    if h.fenced {
        return Err(Excluded::Fenced {
            reason: h.fence_reason.clone(),
        });
    }
    if tabletwatch::health_replicating(h) != Some(true) {
        let detail = match &h.replication {
            None => "no replication status".to_string(),
            Some(r) if !r.configured => "no replication source configured".to_string(),
            Some(r) => {
                let mut d = format!("io {:?}, sql {:?}", r.io_state(), r.sql_state());
                for e in [&r.last_io_error, &r.last_sql_error] {
                    if !e.is_empty() {
                        d.push_str(&format!(": {e}"));
                    }
                }
                d
            }
        };
        return Err(Excluded::NotReplicating { detail });
    }
    let lag_ms = h.lag_ms.ok_or(Excluded::LagUnknown)?;
    let max_ms = millis(policy.max_replica_lag);
    if lag_ms >= max_ms {
        return Err(Excluded::LagTooHigh { lag_ms, max_ms });
    }
    Ok(Target {
        alias: t.alias().to_string(),
        mysql_addr: t.mysql_addr(),
        lag_ms: Some(lag_ms),
    })
}

/// Where one shard's writes and reads may go at `now`.
pub fn route(shard: &ShardView, now: Instant, policy: &RoutingPolicy) -> Routing {
    let mut ro = Vec::new();
    let mut ro_excluded = Vec::new();
    for t in shard.replicas() {
        match replica(t, now, policy) {
            Ok(target) => ro.push(target),
            Err(why) => ro_excluded.push((t.alias().to_string(), why)),
        }
    }
    Routing {
        rw: rw(shard, now, policy),
        ro,
        ro_excluded,
    }
}

/// `GET /routing`: every shard's routing choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoutingResponse {
    /// The snapshot's version.
    pub version: u64,
    /// The etcd watches are current (else registrations and shard records may be stale).
    pub topo_synced: bool,
    pub health_stale_after_ms: u64,
    pub max_replica_lag_ms: u64,
    pub shards: Vec<ShardRoutingJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardRoutingJson {
    pub keyspace: String,
    pub shard: String,
    pub term: u64,
    /// Where writes go, or `null`.
    pub rw: Option<Target>,
    /// Why writes have nowhere to go (when `rw` is `null`).
    pub rw_unavailable: Option<String>,
    pub ro: Vec<Target>,
    /// Why reads have nowhere to go (when `ro` is empty).
    pub ro_unavailable: Option<String>,
    pub ro_excluded: Vec<ExcludedJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExcludedJson {
    pub alias: String,
    pub reason: String,
}

/// [`route`] for every shard of the snapshot.
pub fn routing_response(
    snap: &tabletwatch::FleetSnapshot,
    now: Instant,
    policy: &RoutingPolicy,
) -> RoutingResponse {
    RoutingResponse {
        version: snap.version,
        topo_synced: snap.topo_synced,
        health_stale_after_ms: millis(policy.health_stale_after),
        max_replica_lag_ms: millis(policy.max_replica_lag),
        shards: snap
            .shards
            .values()
            .map(|s| {
                let r = route(s, now, policy);
                let ro_unavailable = r.ro_unavailable();
                let (rw, rw_unavailable) = match r.rw {
                    Ok(t) => (Some(t), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                ShardRoutingJson {
                    keyspace: s.keyspace.clone(),
                    shard: s.shard.clone(),
                    term: s.term(),
                    rw,
                    rw_unavailable,
                    ro: r.ro,
                    ro_unavailable,
                    ro_excluded: r
                        .ro_excluded
                        .into_iter()
                        .map(|(alias, e)| ExcludedJson {
                            alias,
                            reason: e.to_string(),
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tabletwatch::testing::*;
    use tabletwatch::{HealthSample, StreamState};
    use topo::ShardRecord;

    const P: &str = "zone1-101";
    const R1: &str = "zone1-102";
    const R2: &str = "zone1-103";

    fn policy() -> RoutingPolicy {
        RoutingPolicy {
            health_stale_after: Duration::from_secs(1),
            max_replica_lag: Duration::from_secs(5),
        }
    }

    struct Fixture {
        t0: Instant,
        record: Option<ShardRecord>,
        tablets: Vec<TabletView>,
    }

    impl Fixture {
        /// Primary P at term 3, replicas R1 (lag 10 ms) and R2 (lag 20 ms), all received at t0.
        fn healthy() -> Fixture {
            let t0 = Instant::now();
            Fixture {
                t0,
                record: Some(shard_record("ks", "0", Some(P), 3)),
                tablets: vec![
                    tablet(tablet_record(P, "ks", "0"), Some(primary_health(P, 3)), t0),
                    tablet(
                        tablet_record(R1, "ks", "0"),
                        Some(replica_health(R1, 3, Some(10))),
                        t0,
                    ),
                    tablet(
                        tablet_record(R2, "ks", "0"),
                        Some(replica_health(R2, 3, Some(20))),
                        t0,
                    ),
                ],
            }
        }

        fn health_mut(&mut self, alias: &str) -> &mut Health {
            let t = self
                .tablets
                .iter_mut()
                .find(|t| t.alias() == alias)
                .expect("tablet");
            let sample = t.last_health.as_mut().expect("health");
            &mut Arc::make_mut(sample).health
        }

        fn route_at(&self, after: Duration) -> Routing {
            let view = shard("ks", "0", self.record.clone(), self.tablets.clone());
            route(&view, self.t0 + after, &policy())
        }

        fn route(&self) -> Routing {
            self.route_at(Duration::ZERO)
        }
    }

    fn aliases(ro: &[Target]) -> Vec<&str> {
        ro.iter().map(|t| t.alias.as_str()).collect()
    }

    fn excluded(r: &Routing, alias: &str) -> Excluded {
        r.ro_excluded
            .iter()
            .find(|(a, _)| a == alias)
            .map(|(_, e)| e.clone())
            .expect("excluded")
    }

    #[test]
    fn healthy_shard_routes_writes_to_the_primary_and_reads_to_both_replicas() {
        let r = Fixture::healthy().route();
        let rw = r.rw.clone().expect("rw");
        assert_eq!(
            rw,
            Target {
                alias: P.into(),
                mysql_addr: "127.0.0.1:3401".into(),
                lag_ms: None
            }
        );
        assert_eq!(aliases(&r.ro), [R1, R2]);
        assert_eq!(r.ro[0].lag_ms, Some(10));
        assert_eq!(r.ro[1].mysql_addr, "127.0.0.1:3403");
        assert!(r.ro_excluded.is_empty());
        assert_eq!(r.ro_unavailable(), None);
    }

    #[test]
    fn no_record_or_no_primary_named() {
        let mut f = Fixture::healthy();
        f.record = None;
        let r = f.route();
        assert_eq!(r.rw, Err(RwUnavailable::NoShardRecord));
        // Without a record every tablet is a candidate replica; the would-be primary is not
        // replicating.
        assert_eq!(aliases(&r.ro), [R1, R2]);
        assert!(matches!(excluded(&r, P), Excluded::NotReplicating { .. }));

        let mut f = Fixture::healthy();
        f.record = Some(shard_record("ks", "0", None, 0));
        assert_eq!(f.route().rw, Err(RwUnavailable::NoPrimaryNamed));
    }

    #[test]
    fn reparent_in_progress_stops_writes_not_reads() {
        let mut f = Fixture::healthy();
        f.record.as_mut().unwrap().reparent_in_progress = Some("planned reparent by ctl".into());
        let r = f.route();
        assert_eq!(
            r.rw,
            Err(RwUnavailable::ReparentInProgress {
                what: "planned reparent by ctl".into()
            })
        );
        assert_eq!(aliases(&r.ro), [R1, R2]);
        assert!(r
            .rw
            .unwrap_err()
            .to_string()
            .contains("reparent in progress"));
    }

    #[test]
    fn a_newer_term_anywhere_means_the_record_view_is_behind() {
        let mut f = Fixture::healthy();
        f.health_mut(R2).term = 4;
        let r = f.route();
        assert_eq!(
            r.rw,
            Err(RwUnavailable::NewerTermReported {
                tablet: R2.into(),
                term: 4,
                record_term: 3
            })
        );
        // Even from stale health: terms only grow.
        let r = f.route_at(Duration::from_secs(60));
        assert!(matches!(r.rw, Err(RwUnavailable::NewerTermReported { .. })));
    }

    #[test]
    fn primary_not_registered() {
        let mut f = Fixture::healthy();
        f.tablets.remove(0);
        let r = f.route();
        assert_eq!(r.rw, Err(RwUnavailable::NotRegistered { alias: P.into() }));
        assert_eq!(aliases(&r.ro), [R1, R2]);
    }

    #[test]
    fn primary_without_health() {
        let mut f = Fixture::healthy();
        f.tablets[0].last_health = None;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::NoHealth {
                alias: P.into(),
                stream_error: None
            })
        );
        f.tablets[0].stream = StreamState::Connecting {
            since: f.t0,
            since_ms: 0,
            failures: 2,
            last_error: Some("connection refused".into()),
        };
        let e = f.route().rw.unwrap_err();
        assert_eq!(
            e,
            RwUnavailable::NoHealth {
                alias: P.into(),
                stream_error: Some("connection refused".into())
            }
        );
        assert!(e.to_string().contains("connection refused"), "{e}");
    }

    #[test]
    fn freshness_boundary() {
        let f = Fixture::healthy();
        // Exactly health_stale_after old is still fresh.
        let r = f.route_at(Duration::from_secs(1));
        assert!(r.rw.is_ok());
        assert_eq!(r.ro.len(), 2);
        let r = f.route_at(Duration::from_millis(1001));
        assert_eq!(
            r.rw,
            Err(RwUnavailable::StaleHealth {
                alias: P.into(),
                age: Duration::from_millis(1001),
                max: Duration::from_secs(1)
            })
        );
        assert!(r.ro.is_empty());
        assert_eq!(
            excluded(&r, R1),
            Excluded::StaleHealth {
                age: Duration::from_millis(1001),
                max: Duration::from_secs(1)
            }
        );
        let why = r.ro_unavailable().unwrap();
        assert!(
            why.contains("zone1-102: health is 1001 ms old (max 1000 ms)"),
            "{why}"
        );
        assert!(why.contains("zone1-103"), "{why}");
    }

    #[test]
    fn stale_health_of_a_disconnected_primary_counts_as_stale_not_missing() {
        let mut f = Fixture::healthy();
        f.tablets[0].stream = StreamState::Connecting {
            since: f.t0,
            since_ms: 0,
            failures: 1,
            last_error: Some("health stream broke".into()),
        };
        // Fresh last health from a broken stream is still fresh (the bound decides).
        assert!(f.route().rw.is_ok());
        assert!(matches!(
            f.route_at(Duration::from_secs(2)).rw,
            Err(RwUnavailable::StaleHealth { .. })
        ));
    }

    #[test]
    fn primary_mysqld_unreachable() {
        let mut f = Fixture::healthy();
        let h = f.health_mut(P);
        h.mysql_reachable = false;
        h.mysql = None;
        h.mysql_error = "Can't connect to server".into();
        let e = f.route().rw.unwrap_err();
        assert_eq!(
            e,
            RwUnavailable::MysqlUnreachable {
                alias: P.into(),
                error: "Can't connect to server".into()
            }
        );
    }

    #[test]
    fn fenced_primary_gets_no_writes() {
        let mut f = Fixture::healthy();
        let h = f.health_mut(P);
        h.fenced = true;
        h.fence_reason = "zone1-102 is primary at term 4".into();
        assert!(matches!(f.route().rw, Err(RwUnavailable::Fenced { .. })));
    }

    #[test]
    fn primary_agent_behind_the_record_term() {
        let mut f = Fixture::healthy();
        f.health_mut(P).term = 2;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::BehindTerm {
                alias: P.into(),
                agent_term: 2,
                record_term: 3
            })
        );
    }

    #[test]
    fn read_only_primary_gets_no_writes() {
        let mut f = Fixture::healthy();
        f.health_mut(P).mysql.as_mut().unwrap().read_only = true;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::ReadOnly { alias: P.into() })
        );
        let mut f = Fixture::healthy();
        f.health_mut(P).mysql.as_mut().unwrap().super_read_only = true;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::ReadOnly { alias: P.into() })
        );
        let mut f = Fixture::healthy();
        f.health_mut(P).mysql = None;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::ReadOnly { alias: P.into() })
        );
    }

    #[test]
    fn replica_without_health() {
        let mut f = Fixture::healthy();
        f.tablets[1].last_health = None;
        f.tablets[1].stream = StreamState::Connecting {
            since: f.t0,
            since_ms: 0,
            failures: 1,
            last_error: Some("refused".into()),
        };
        let r = f.route();
        assert_eq!(aliases(&r.ro), [R2]);
        assert_eq!(
            excluded(&r, R1),
            Excluded::NoHealth {
                stream_error: Some("refused".into())
            }
        );
        assert!(r.rw.is_ok());
    }

    #[test]
    fn replica_mysqld_unreachable_or_fenced() {
        let mut f = Fixture::healthy();
        let h = f.health_mut(R1);
        h.mysql_reachable = false;
        h.mysql_error = "gone".into();
        let h = f.health_mut(R2);
        h.fenced = true;
        h.fence_reason = "newer term".into();
        let r = f.route();
        assert!(r.ro.is_empty());
        assert_eq!(
            excluded(&r, R1),
            Excluded::MysqlUnreachable {
                error: "gone".into()
            }
        );
        assert_eq!(
            excluded(&r, R2),
            Excluded::Fenced {
                reason: "newer term".into()
            }
        );
    }

    #[test]
    fn replica_not_replicating() {
        use myha_proto::agent::ThreadState;
        let mut f = Fixture::healthy();
        let repl = f.health_mut(R1).replication.as_mut().unwrap();
        repl.io_state = ThreadState::Connecting as i32;
        repl.last_io_error = "error reconnecting to master".into();
        f.health_mut(R2).replication.as_mut().unwrap().configured = false;
        let r = f.route();
        assert!(r.ro.is_empty());
        match excluded(&r, R1) {
            Excluded::NotReplicating { detail } => {
                assert!(
                    detail.contains("Connecting") && detail.contains("error reconnecting"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            excluded(&r, R2),
            Excluded::NotReplicating {
                detail: "no replication source configured".into()
            }
        );

        let mut f = Fixture::healthy();
        f.health_mut(R1).replication = None;
        f.health_mut(R2).replication.as_mut().unwrap().sql_state = ThreadState::Stopped as i32;
        let r = f.route();
        assert_eq!(
            excluded(&r, R1),
            Excluded::NotReplicating {
                detail: "no replication status".into()
            }
        );
        assert!(matches!(excluded(&r, R2), Excluded::NotReplicating { .. }));
    }

    #[test]
    fn replica_lag_bounds() {
        let mut f = Fixture::healthy();
        f.health_mut(R1).lag_ms = None;
        f.health_mut(R2).lag_ms = Some(5000);
        let r = f.route();
        assert!(r.ro.is_empty());
        assert_eq!(excluded(&r, R1), Excluded::LagUnknown);
        assert_eq!(
            excluded(&r, R2),
            Excluded::LagTooHigh {
                lag_ms: 5000,
                max_ms: 5000
            }
        );
        assert!(excluded(&r, R2)
            .to_string()
            .contains("5000 ms >= max 5000 ms"));
        f.health_mut(R2).lag_ms = Some(4999);
        assert_eq!(aliases(&f.route().ro), [R2]);
        f.health_mut(R2).lag_ms = Some(0);
        assert_eq!(aliases(&f.route().ro), [R2]);
    }

    #[test]
    fn primary_is_never_a_read_target() {
        // Even a primary that looks like a healthy replica is not in `ro`.
        let mut f = Fixture::healthy();
        *f.health_mut(P) = replica_health(P, 3, Some(1));
        let r = f.route();
        assert_eq!(aliases(&r.ro), [R1, R2]);
        assert!(r.ro_excluded.iter().all(|(a, _)| a != P));
        assert_eq!(r.rw, Err(RwUnavailable::ReadOnly { alias: P.into() }));
    }

    #[test]
    fn shard_with_only_a_primary_has_no_reads() {
        let mut f = Fixture::healthy();
        f.tablets.truncate(1);
        let r = f.route();
        assert!(r.rw.is_ok());
        assert!(r.ro.is_empty() && r.ro_excluded.is_empty());
        assert_eq!(r.ro_unavailable().as_deref(), Some("no replica registered"));
    }

    #[test]
    fn reasons_read_well() {
        let cases: Vec<(RwUnavailable, &str)> = vec![
            (RwUnavailable::NoShardRecord, "no shard record"),
            (RwUnavailable::NoPrimaryNamed, "names no primary"),
            (
                RwUnavailable::NotRegistered { alias: P.into() },
                "zone1-101 is not registered",
            ),
            (
                RwUnavailable::NoHealth {
                    alias: P.into(),
                    stream_error: None,
                },
                "no health from primary zone1-101 yet",
            ),
            (
                RwUnavailable::StaleHealth {
                    alias: P.into(),
                    age: Duration::from_millis(2500),
                    max: Duration::from_secs(1),
                },
                "2500 ms old (max 1000 ms)",
            ),
            (
                RwUnavailable::MysqlUnreachable {
                    alias: P.into(),
                    error: "x".into(),
                },
                "unreachable: x",
            ),
            (
                RwUnavailable::Fenced {
                    alias: P.into(),
                    reason: "y".into(),
                },
                "fenced: y",
            ),
            (
                RwUnavailable::BehindTerm {
                    alias: P.into(),
                    agent_term: 1,
                    record_term: 2,
                },
                "knows term 1",
            ),
            (RwUnavailable::ReadOnly { alias: P.into() }, "read-only"),
            (
                RwUnavailable::NewerTermReported {
                    tablet: R1.into(),
                    term: 5,
                    record_term: 4,
                },
                "zone1-102 reports term 5",
            ),
        ];
        for (e, want) in cases {
            assert!(e.to_string().contains(want), "{e} should contain {want}");
        }
        assert_eq!(Excluded::LagUnknown.to_string(), "replication lag unknown");
        assert_eq!(
            Excluded::NoHealth { stream_error: None }.to_string(),
            "no health yet"
        );
    }

    #[test]
    fn late_sample_is_fresh() {
        // A sample received after `now` was read (the snapshot is newer than `now`) has age 0.
        let mut f = Fixture::healthy();
        let later = f.t0 + Duration::from_millis(10);
        for t in &mut f.tablets {
            let s = t.last_health.as_mut().unwrap();
            *s = Arc::new(HealthSample {
                received_at: later,
                ..(**s).clone()
            });
        }
        let r = f.route();
        assert!(r.rw.is_ok());
        assert_eq!(r.ro.len(), 2);
    }

    #[test]
    fn routing_response_covers_every_shard() {
        let f = Fixture::healthy();
        let mut snap = tabletwatch::FleetSnapshot::empty(f.t0);
        snap.version = 3;
        snap.shards.insert(
            ("ks".into(), "0".into()),
            shard("ks", "0", f.record.clone(), f.tablets.clone()),
        );
        snap.shards
            .insert(("ks".into(), "1".into()), shard("ks", "1", None, vec![]));
        let resp = routing_response(&snap, f.t0, &policy());
        assert_eq!((resp.version, resp.topo_synced), (3, false));
        assert_eq!(
            (resp.health_stale_after_ms, resp.max_replica_lag_ms),
            (1000, 5000)
        );
        let [a, b] = &resp.shards[..] else {
            panic!("{resp:?}")
        };
        assert_eq!(a.rw.as_ref().map(|t| t.alias.as_str()), Some(P));
        assert_eq!(
            (
                a.rw_unavailable.as_ref(),
                a.ro.len(),
                a.ro_unavailable.as_ref()
            ),
            (None, 2, None)
        );
        assert_eq!(b.rw, None);
        assert_eq!(b.rw_unavailable.as_deref(), Some("no shard record"));
        assert_eq!(b.ro_unavailable.as_deref(), Some("no replica registered"));
        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(json["shards"][0]["rw"]["mysql_addr"], "127.0.0.1:3401");
        assert_eq!(json["shards"][0]["ro"][1]["lag_ms"], 20);
        assert_eq!(json["shards"][1]["rw"], serde_json::Value::Null);
    }
}
