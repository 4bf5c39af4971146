//! The routing choices, all pure: a snapshot (or a shard view), an explicit `now` and a policy
//! in, a decision with reasons out. The proxy (`crate::proxy`) acts on exactly these.
//!
//! - [`route`]: where one shard's writes (`rw`) and reads (`ro`) may go now.
//!   - `rw`: the primary named by the shard record, only if the record is the newest word
//!     (no reparent under way, no tablet reports a newer term, the primary's agent knows the
//!     record's term) and the primary's health is fresh, reachable, not fenced and writable.
//!   - `ro`: every other registered tablet that is not quarantined, whose health is fresh,
//!     whose mysqld is reachable and replicates (both threads running) with a measured lag
//!     under `max_replica_lag`.
//!   - A quarantined primary still gets the writes (the shard record decides, and failing over
//!     is the orchestrator's business, not the gateway's); [`ShardRoute::primary_quarantined`]
//!     marks it.
//! - [`compute_routes`]: [`route`] for every shard of a tablettwatch snapshot, plus for every
//!   tablet whether open RO connections to it must be closed ([`ro_close_reason`]): the
//!   immutable [`Routes`] the proxy swaps in atomically.
//! - [`rw_choice`] / [`ro_choice`]: what a new connection gets (a backend, wait, or a refusal
//!   with the text of the MySQL error packet); [`pick`] is the RO selection policy.
//! - [`close_reason`]: whether an open connection must be closed under new routes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tabletwatch::{FleetSnapshot, Health, ShardView, TabletView};
use topo::Term;

/// Bounds for [`route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// A tablet whose last health is older than this gets no traffic.
    pub health_stale_after: Duration,
    /// Replicas lagging this much or more get no new reads.
    pub max_replica_lag: Duration,
    /// Open RO connections to a replica lagging more than this are closed.
    pub ro_hard_lag: Duration,
}

/// A tablet chosen for traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub alias: String,
    /// `host:port` of its mysqld, from the registration.
    pub mysql_addr: String,
    /// Replication lag (replicas).
    pub lag_ms: Option<u64>,
    /// Why this target is used although its own health is not fresh (the primary's agent is
    /// silent and replicas vouch for its mysqld); `None` normally.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// Why writes have nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RwUnavailable {
    NoShardRecord,
    NoPrimaryNamed,
    ReparentInProgress {
        what: String,
    },
    /// A tablet reports a promotion above the record's term, or a term above its reservation:
    /// our view of the record is behind.
    NewerTermReported {
        tablet: String,
        term: Term,
        record_term: Term,
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
        agent_term: Term,
        record_term: Term,
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
    /// `{p}/quarantine/{alias}` exists: the record's reason in words.
    Quarantined {
        reason: String,
    },
    NoHealth {
        stream_error: Option<String>,
    },
    StaleHealth {
        age: Duration,
        max: Duration,
    },
    MysqlUnreachable {
        error: String,
    },
    Fenced {
        reason: String,
    },
    NotReplicating {
        detail: String,
    },
    LagUnknown,
    LagTooHigh {
        lag_ms: u64,
        max_ms: u64,
    },
}

impl Excluded {
    /// Every [`Excluded::kind`], for metrics that exist at 0 from the start.
    pub const KINDS: [&'static str; 8] = [
        "quarantined",
        "no_health",
        "stale_health",
        "mysql_unreachable",
        "fenced",
        "not_replicating",
        "lag_unknown",
        "lag_too_high",
    ];

    /// The reason as a metric label (`myha_gateway_ro_excluded{reason}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Excluded::Quarantined { .. } => "quarantined",
            Excluded::NoHealth { .. } => "no_health",
            Excluded::StaleHealth { .. } => "stale_health",
            Excluded::MysqlUnreachable { .. } => "mysql_unreachable",
            Excluded::Fenced { .. } => "fenced",
            Excluded::NotReplicating { .. } => "not_replicating",
            Excluded::LagUnknown => "lag_unknown",
            Excluded::LagTooHigh { .. } => "lag_too_high",
        }
    }
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::Quarantined { reason } => write!(f, "quarantined: {reason}"),
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
    if let Some((tablet, term)) = shard.term_ahead_of_record() {
        return Err(RwUnavailable::NewerTermReported {
            tablet: tablet.to_string(),
            term,
            record_term: record.term,
        });
    }
    let max = policy.health_stale_after;
    let Some(t) = shard.tablet(&alias) else {
        // P17: the agent is gone past its lease; its mysqld may serve on.
        let why = RwUnavailable::NotRegistered {
            alias: alias.clone(),
        };
        return vouched_primary(shard, &alias, None, record.term, now, max, why);
    };
    let h = match freshness(t, now, max) {
        Freshness::Fresh(h) => h,
        Freshness::Stale(age) => {
            let why = RwUnavailable::StaleHealth {
                alias: alias.clone(),
                age,
                max,
            };
            return vouched_primary(shard, &alias, Some(t), record.term, now, max, why);
        }
        Freshness::Missing(stream_error) => {
            let why = RwUnavailable::NoHealth {
                alias: alias.clone(),
                stream_error,
            };
            return vouched_primary(shard, &alias, Some(t), record.term, now, max, why);
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
    if h.term < record.term.get() {
        return Err(RwUnavailable::BehindTerm {
            alias,
            agent_term: Term::new(h.term),
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
        degraded: None,
    })
}

/// The record's primary `alias` has no fresh health of its own (`why`): its agent may have
/// died while its mysqld serves on (P5, and P17 once the agent's lease expired and `t`, its
/// registration, is gone: the orchestrator does not fail over then, and writes must go on).
/// Replicas whose own health is fresh and whose direct probe of this primary's mysqld succeeds
/// vouch for it: the target, marked degraded; without a registration, at the address they
/// probe (refused when they disagree on it). A frozen or dead mysqld fails their probes, so new
/// connections are held as before (a failover is coming). Whatever the primary's last health
/// said, however old, still refuses: fenced, behind the record's term, read-only.
fn vouched_primary(
    shard: &ShardView,
    alias: &str,
    t: Option<&TabletView>,
    record_term: Term,
    now: Instant,
    max: Duration,
    why: RwUnavailable,
) -> Result<Target, RwUnavailable> {
    let alias = alias.to_string();
    let vouchers: Vec<(&str, &str)> = shard
        .replicas()
        .filter_map(|r| match freshness(r, now, max) {
            Freshness::Fresh(h) => h
                .primary_probe
                .as_ref()
                .filter(|p| p.primary_alias == alias && p.reachable)
                .map(|p| (r.alias(), p.addr.as_str())),
            _ => None,
        })
        .collect();
    if vouchers.is_empty() {
        return Err(why);
    }
    let names: Vec<&str> = vouchers.iter().map(|(a, _)| *a).collect();
    let mysql_addr = match t {
        Some(t) => t.mysql_addr(),
        None => {
            let addr = vouchers[0].1;
            if addr.is_empty() || vouchers.iter().any(|(_, a)| *a != addr) {
                return Err(why);
            }
            addr.to_string()
        }
    };
    if let Some(last) = t.and_then(|t| t.health()) {
        if last.fenced {
            return Err(RwUnavailable::Fenced {
                alias,
                reason: last.fence_reason.clone(),
            });
        }
        if last.term < record_term.get() {
            return Err(RwUnavailable::BehindTerm {
                alias,
                agent_term: Term::new(last.term),
                record_term,
            });
        }
        if last
            .mysql
            .as_ref()
            .is_some_and(|m| m.read_only || m.super_read_only)
        {
            return Err(RwUnavailable::ReadOnly { alias });
        }
    }
    Ok(Target {
        degraded: Some(format!(
            "{why}; its mysqld at {mysql_addr} answers the probes of {}",
            names.join(", ")
        )),
        mysql_addr,
        lag_ms: None,
        alias,
    })
}

fn replica(t: &TabletView, now: Instant, policy: &RoutingPolicy) -> Result<Target, Excluded> {
    // An operator's (or the repair's) decision outranks any health: first.
    if let Some(q) = t.quarantined() {
        return Err(Excluded::Quarantined {
            reason: q.describe(),
        });
    }
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
        degraded: None,
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

/// A routing snapshot's view of one shard: [`route`] plus what the proxy needs to judge open
/// connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRoute {
    pub keyspace: String,
    pub shard: String,
    /// The shard record's term (0 without a record).
    pub term: Term,
    /// The primary the shard record names.
    pub primary: Option<String>,
    /// The record's primary is quarantined (never expected: the orchestrator does not promote
    /// a quarantined tablet, and the API refuses to quarantine the primary): why. Writes still
    /// follow the record; this only makes the anomaly visible.
    pub primary_quarantined: Option<String>,
    pub routing: Routing,
    /// Every registered tablet: `None` when open RO connections to it may stay, else why they
    /// must be closed ([`ro_close_reason`]). A tablet missing here is not registered.
    pub ro_close: BTreeMap<String, Option<String>>,
}

/// The immutable routing snapshot the proxy works from (swapped in whole, never mutated).
#[derive(Debug, Clone)]
pub struct Routes {
    /// The tabletwatch snapshot it was computed from.
    pub snapshot_version: u64,
    /// Increases with every computation (also on the re-evaluation timer).
    pub seq: u64,
    /// Wall clock of the computation, ms since the epoch.
    pub computed_ms: u64,
    /// The etcd watches were current.
    pub topo_synced: bool,
    /// By `(keyspace, shard)`.
    pub shards: BTreeMap<(String, String), ShardRoute>,
}

impl Routes {
    /// Nothing known yet (before the first snapshot).
    pub fn empty() -> Routes {
        Routes {
            snapshot_version: 0,
            seq: 0,
            computed_ms: 0,
            topo_synced: false,
            shards: BTreeMap::new(),
        }
    }
}

/// Whether open RO connections to `t` must be closed at `now`, and why. Deliberately looser
/// than the bar for new connections: a replica that merely stopped qualifying (lag over
/// `max_replica_lag`, a replication thread reconnecting during a failover, a late health
/// message) keeps its open connections; they are closed only when
/// - it is the shard's primary now (the RO port must not hand out a writable server),
/// - it is quarantined (its data is suspect: errant transactions, or an operator says so),
/// - there is no health for it, its agent fenced it or reports its mysqld unreachable,
/// - its lag may exceed `ro_hard_lag`: the last reported lag plus the age of that report
///   (a silent health stream or stopped replication therefore closes them once the data could
///   be that old), or replication is stopped while the lag cannot be measured.
pub fn ro_close_reason(
    shard: &ShardView,
    t: &TabletView,
    now: Instant,
    policy: &RoutingPolicy,
) -> Option<String> {
    if shard.primary_alias() == Some(t.alias()) {
        return Some("it is the shard's primary now".into());
    }
    if let Some(q) = t.quarantined() {
        return Some(format!("quarantined: {}", q.describe()));
    }
    let (Some(h), Some(age)) = (t.health(), t.health_age(now)) else {
        return Some("no health".into());
    };
    if h.fenced {
        return Some(format!("fenced: {}", h.fence_reason));
    }
    if !h.mysql_reachable {
        return Some(format!("mysqld unreachable: {}", h.mysql_error));
    }
    let hard = millis(policy.ro_hard_lag);
    let age_ms = millis(age);
    match h.lag_ms {
        Some(lag) if lag.saturating_add(age_ms) > hard => Some(format!(
            "lag {lag} ms reported {age_ms} ms ago exceeds ro_hard_lag {hard} ms"
        )),
        Some(_) => None,
        None if tabletwatch::health_replicating(h) != Some(true) => {
            Some("not replicating and its lag cannot be measured".into())
        }
        None if age_ms > hard => Some(format!("no health for {age_ms} ms (ro_hard_lag {hard} ms)")),
        None => None,
    }
}

/// [`route`] and [`ro_close_reason`] for one shard.
pub fn shard_route(shard: &ShardView, now: Instant, policy: &RoutingPolicy) -> ShardRoute {
    ShardRoute {
        keyspace: shard.keyspace.clone(),
        shard: shard.shard.clone(),
        term: shard.term(),
        primary: shard.primary_alias().map(str::to_string),
        primary_quarantined: shard
            .primary()
            .and_then(TabletView::quarantined)
            .map(|q| q.describe()),
        routing: route(shard, now, policy),
        ro_close: shard
            .tablets
            .values()
            .map(|t| {
                (
                    t.alias().to_string(),
                    ro_close_reason(shard, t, now, policy),
                )
            })
            .collect(),
    }
}

/// The shards of `snap` at `now`.
///
/// `scope`: only these shards (a gateway computes the shards it has listeners for, not the
/// whole fleet on every health message); `None`: every shard.
pub fn compute_routes(
    snap: &FleetSnapshot,
    now: Instant,
    now_ms: u64,
    seq: u64,
    policy: &RoutingPolicy,
    scope: Option<&BTreeSet<(String, String)>>,
) -> Routes {
    Routes {
        snapshot_version: snap.version,
        seq,
        computed_ms: now_ms,
        topo_synced: snap.topo_synced,
        shards: snap
            .shards
            .iter()
            .filter(|(k, _)| scope.is_none_or(|only| only.contains(*k)))
            .map(|(k, s)| (k.clone(), shard_route(s, now, policy)))
            .collect(),
    }
}

/// What decides where new connections go: the rw target (alias, term) or none, and the set of
/// ro targets. Lag values and reasons are left out: they change with every health message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteKey {
    pub rw: Option<(String, Term)>,
    pub ro: Vec<String>,
}

impl RouteKey {
    pub fn of(r: &ShardRoute) -> RouteKey {
        RouteKey {
            rw: r
                .routing
                .rw
                .as_ref()
                .ok()
                .map(|t| (t.alias.clone(), r.term)),
            ro: r.routing.ro.iter().map(|t| t.alias.clone()).collect(),
        }
    }
}

/// One shard whose [`RouteKey`] changed between two routing snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub keyspace: String,
    pub shard: String,
    pub before: Option<RouteKey>,
    pub after: Option<RouteKey>,
}

/// The shards whose routing decision changed from `old` to `new` (appeared, vanished, or a
/// different [`RouteKey`]).
pub fn route_changes(old: &Routes, new: &Routes) -> Vec<RouteChange> {
    let mut keys: Vec<&(String, String)> = old.shards.keys().chain(new.shards.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let before = old.shards.get(k).map(RouteKey::of);
            let after = new.shards.get(k).map(RouteKey::of);
            (before != after).then(|| RouteChange {
                keyspace: k.0.clone(),
                shard: k.1.clone(),
                before,
                after,
            })
        })
        .collect()
}

// ---- new connections ------------------------------------------------------------------

/// How replicas are chosen for new RO connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoPolicy {
    /// The replica with the fewest open connections through this gateway (ties rotate).
    #[default]
    LeastConnections,
    Random,
    RoundRobin,
}

/// What RO connections get when no replica qualifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoFallback {
    /// The shard's primary (when it is a usable RW target).
    #[default]
    Primary,
    /// A MySQL error packet.
    Refuse,
}

impl RoPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RoPolicy::LeastConnections => "least_connections",
            RoPolicy::Random => "random",
            RoPolicy::RoundRobin => "round_robin",
        }
    }
}

impl RoFallback {
    pub fn as_str(self) -> &'static str {
        match self {
            RoFallback::Primary => "primary",
            RoFallback::Refuse => "refuse",
        }
    }
}

/// How the proxy treats new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyPolicy {
    /// How long a new connection may be held waiting for a target (RW always; RO only until
    /// the topology has been read once).
    pub buffer_window: Duration,
    /// Held connections at once (beyond: refused at once).
    pub max_buffered: usize,
    pub ro_policy: RoPolicy,
    pub ro_fallback: RoFallback,
}

/// Why a connection was refused, as counted in `myha_gateway_refusals_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// No usable primary within the buffer window.
    NoPrimary,
    /// No replica qualifies and the fallback gives nothing.
    NoReplica,
    /// The shard has no record (and the topology is current).
    UnknownShard,
    /// `max_buffered` connections were held already.
    MaxBuffered,
    /// The chosen backend could not be connected to.
    ConnectFailed,
    /// The gateway is shutting down.
    ShuttingDown,
    /// `max_connections` connections were open through the gateway already.
    MaxConnections,
    /// The proxy thread chosen for it had `HANDOFF_QUEUE` connections waiting already.
    Overloaded,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 8] = [
        RefusalKind::NoPrimary,
        RefusalKind::NoReplica,
        RefusalKind::UnknownShard,
        RefusalKind::MaxBuffered,
        RefusalKind::ConnectFailed,
        RefusalKind::ShuttingDown,
        RefusalKind::MaxConnections,
        RefusalKind::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NoPrimary => "no_primary",
            RefusalKind::NoReplica => "no_replica",
            RefusalKind::UnknownShard => "unknown_shard",
            RefusalKind::MaxBuffered => "max_buffered",
            RefusalKind::ConnectFailed => "connect_failed",
            RefusalKind::ShuttingDown => "shutting_down",
            RefusalKind::MaxConnections => "max_connections",
            RefusalKind::Overloaded => "overloaded",
        }
    }
}

/// A refused connection: the metric's reason and the text of the error packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// Starts with `myha-gateway: ` and names the shard.
    pub message: String,
}

impl Refusal {
    fn new(kind: RefusalKind, message: String) -> Refusal {
        Refusal {
            kind,
            message: format!("myha-gateway: {message}"),
        }
    }

    /// The chosen backend did not accept the connection.
    pub fn connect_failed(
        keyspace: &str,
        shard: &str,
        what: &str,
        target: &Target,
        error: &str,
    ) -> Refusal {
        Refusal::new(
            RefusalKind::ConnectFailed,
            format!(
                "no {what} for {keyspace}/{shard}: cannot connect to {} ({}): {error}",
                target.alias, target.mysql_addr
            ),
        )
    }

    /// The gateway's connection cap is reached.
    pub fn max_connections(keyspace: &str, shard: &str, max: usize) -> Refusal {
        Refusal::new(
            RefusalKind::MaxConnections,
            format!(
                "{keyspace}/{shard}: too many connections through this gateway ({max}: routing.max_connections)"
            ),
        )
    }

    /// The proxy thread the connection would go to has too many waiting already.
    pub fn overloaded(keyspace: &str, shard: &str, queued: usize) -> Refusal {
        Refusal::new(
            RefusalKind::Overloaded,
            format!(
                "{keyspace}/{shard}: the gateway is overloaded ({queued} new connections already wait for a proxy thread)"
            ),
        )
    }

    /// The gateway stops.
    pub fn shutting_down(keyspace: &str, shard: &str) -> Refusal {
        Refusal::new(
            RefusalKind::ShuttingDown,
            format!("{keyspace}/{shard}: the gateway is shutting down"),
        )
    }
}

/// `5s`, `1500ms`: durations in error texts.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One new connection's situation.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub keyspace: &'a str,
    pub shard: &'a str,
    /// The shard in the current routing snapshot (`None`: nothing known about it).
    pub route: Option<&'a ShardRoute>,
    /// The snapshot's etcd watches were current.
    pub topo_synced: bool,
    /// How long it has been held so far (`None`: it has not been held).
    pub held_for: Option<Duration>,
    /// Fewer than `max_buffered` connections are held now.
    pub hold_room: bool,
}

impl Ask<'_> {
    /// Whether it may (go on) wait(ing), given it has to.
    fn may_hold(&self, p: &ProxyPolicy) -> Result<(), HoldDenied> {
        let waited = self.held_for.unwrap_or(Duration::ZERO);
        if waited >= p.buffer_window {
            return Err(HoldDenied::WindowOver);
        }
        if self.held_for.is_none() && !self.hold_room {
            return Err(HoldDenied::Full);
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("{}/{}", self.keyspace, self.shard)
    }
}

enum HoldDenied {
    WindowOver,
    Full,
}

fn hold_denied_text(d: HoldDenied, p: &ProxyPolicy) -> (RefusalKind, String) {
    match d {
        HoldDenied::WindowOver if p.buffer_window.is_zero() => (
            RefusalKind::NoPrimary,
            "not held: buffer_window is 0".into(),
        ),
        HoldDenied::WindowOver => (
            RefusalKind::NoPrimary,
            format!("buffer window {} expired", fmt_duration(p.buffer_window)),
        ),
        HoldDenied::Full => (
            RefusalKind::MaxBuffered,
            format!(
                "max_buffered {} connections are held already",
                p.max_buffered
            ),
        ),
    }
}

/// What a new RW connection gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RwChoice {
    Route(Target),
    /// Wait for the next routing snapshot (or the end of the window); why.
    Hold(String),
    Refuse(Refusal),
}

/// A new (or held) RW connection: the primary when it is usable; otherwise held up to the
/// buffer window (room permitting), then refused naming the shard and the reason. A shard
/// without a record while the topology is current is refused at once.
pub fn rw_choice(ask: &Ask<'_>, p: &ProxyPolicy) -> RwChoice {
    let no_record = Err(RwUnavailable::NoShardRecord);
    let rw = ask.route.map_or(&no_record, |r| &r.routing.rw);
    match rw {
        Ok(t) => RwChoice::Route(t.clone()),
        Err(RwUnavailable::NoShardRecord) if ask.topo_synced => RwChoice::Refuse(Refusal::new(
            RefusalKind::UnknownShard,
            format!("no primary for {}: no shard record", ask.name()),
        )),
        Err(why) => match ask.may_hold(p) {
            Ok(()) => RwChoice::Hold(why.to_string()),
            Err(d) => {
                let (kind, end) = hold_denied_text(d, p);
                RwChoice::Refuse(Refusal::new(
                    kind,
                    format!("no primary for {}: {why} ({end})", ask.name()),
                ))
            }
        },
    }
}

/// What a new RO connection gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoChoice {
    Replica(Target),
    /// No replica qualifies: the primary, per `ro_fallback = "primary"`.
    Primary(Target),
    /// The topology has not been read yet: wait for the next routing snapshot; why.
    Hold(String),
    Refuse(Refusal),
}

/// The index into `candidates` that a new RO connection goes to (`candidates` not empty):
/// `round_robin` and `random` take `spin` (a counter, a random number) modulo the count;
/// `least_connections` takes the fewest `open` connections, `spin` rotating among ties (so
/// short sequential connections spread too).
pub fn pick(
    candidates: &[&Target],
    open: &dyn Fn(&str) -> usize,
    policy: RoPolicy,
    spin: u64,
) -> usize {
    let n = candidates.len().max(1) as u64;
    match policy {
        RoPolicy::RoundRobin | RoPolicy::Random => (spin % n) as usize,
        RoPolicy::LeastConnections => {
            let counts: Vec<usize> = candidates.iter().map(|t| open(&t.alias)).collect();
            let min = counts.iter().copied().min().unwrap_or(0);
            let tied: Vec<usize> = (0..counts.len()).filter(|i| counts[*i] == min).collect();
            tied.get((spin % tied.len().max(1) as u64) as usize)
                .copied()
                .unwrap_or(0)
        }
    }
}

/// A new RO connection: a replica from `ro` (minus `exclude`: backends that failed to connect
/// for this connection) chosen by `ro_policy`; none: per `ro_fallback`, the primary or a
/// refusal. Before the topology has been read once it is held like an RW connection.
pub fn ro_choice(
    ask: &Ask<'_>,
    p: &ProxyPolicy,
    open: &dyn Fn(&str) -> usize,
    exclude: &[String],
    spin: u64,
) -> RoChoice {
    let Some(route) = ask.route else {
        if !ask.topo_synced && ask.may_hold(p).is_ok() {
            return RoChoice::Hold("the topology has not been read yet".into());
        }
        let why = if ask.topo_synced {
            "no shard record and no tablet"
        } else {
            "the topology could not be read"
        };
        return RoChoice::Refuse(Refusal::new(
            RefusalKind::NoReplica,
            format!("no replica for {}: {why}", ask.name()),
        ));
    };
    let routing = &route.routing;
    let candidates: Vec<&Target> = routing
        .ro
        .iter()
        .filter(|t| !exclude.contains(&t.alias))
        .collect();
    if !candidates.is_empty() {
        let i = pick(&candidates, open, p.ro_policy, spin);
        return RoChoice::Replica(candidates[i].clone());
    }
    if !ask.topo_synced && ask.may_hold(p).is_ok() {
        return RoChoice::Hold("the topology has not been read yet".into());
    }
    let why = match routing.ro_unavailable() {
        Some(why) => why,
        None => format!(
            "every eligible replica refused the connection ({})",
            exclude.join(", ")
        ),
    };
    let refuse = |text: String| {
        RoChoice::Refuse(Refusal::new(
            RefusalKind::NoReplica,
            format!("no replica for {}: {text}", ask.name()),
        ))
    };
    match (p.ro_fallback, &routing.rw) {
        (RoFallback::Refuse, _) => refuse(why),
        (RoFallback::Primary, Ok(t)) if !exclude.contains(&t.alias) => RoChoice::Primary(t.clone()),
        (RoFallback::Primary, Ok(t)) => refuse(format!(
            "{why}; the primary {} refused the connection too",
            t.alias
        )),
        (RoFallback::Primary, Err(e)) => refuse(format!("{why}; no primary to fall back to: {e}")),
    }
}

// ---- open connections -------------------------------------------------------------------

/// What an open connection was routed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnRole {
    /// RW port, to the primary.
    Rw,
    /// RO port, to a replica.
    RoReplica,
    /// RO port, to the primary (`ro_fallback = "primary"`).
    RoPrimary,
}

impl ConnRole {
    /// The listener it came through: `rw` or `ro` (metric label).
    pub fn port(self) -> &'static str {
        match self {
            ConnRole::Rw => "rw",
            ConnRole::RoReplica | ConnRole::RoPrimary => "ro",
        }
    }
}

/// Whether an open connection to `backend`, routed as `role` when the shard record was at
/// `opened_term`, must be closed under `route` (`None`: the shard is unknown to the snapshot,
/// which never closes anything):
/// - to a primary (RW, RO fallback): once the record's term is above `opened_term` and names
///   another tablet (the backend is deposed: G1);
/// - to a replica: per [`ro_close_reason`], or when the tablet is no longer registered.
pub fn close_reason(
    role: ConnRole,
    backend: &str,
    opened_term: Term,
    route: Option<&ShardRoute>,
) -> Option<String> {
    let route = route?;
    match role {
        ConnRole::Rw | ConnRole::RoPrimary => {
            (route.term > opened_term && route.primary.as_deref() != Some(backend)).then(|| {
                format!(
                "term {} names {} as primary (the connection was opened under term {opened_term})",
                route.term,
                route.primary.as_deref().unwrap_or("no tablet")
            )
            })
        }
        ConnRole::RoReplica => match route.ro_close.get(backend) {
            None => Some("the tablet is no longer registered".into()),
            Some(why) => why.clone(),
        },
    }
}

// ---- GET /routing -----------------------------------------------------------------------

/// `GET /routing`: the routing snapshot in use, with the proxy's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoutingResponse {
    /// The tabletwatch snapshot's version.
    pub version: u64,
    /// Increases with every computation (snapshots and the re-evaluation timer).
    pub seq: u64,
    /// Wall clock of the computation, ms since the epoch.
    pub computed_ms: u64,
    /// The etcd watches are current (else registrations and shard records may be stale).
    pub topo_synced: bool,
    pub health_stale_after_ms: u64,
    pub max_replica_lag_ms: u64,
    pub ro_hard_lag_ms: u64,
    pub ro_policy: &'static str,
    pub ro_fallback: &'static str,
    pub buffer_window_ms: u64,
    pub max_buffered: usize,
    /// Connections held now, all shards.
    pub held: usize,
    pub shards: Vec<ShardRoutingJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardRoutingJson {
    pub keyspace: String,
    pub shard: String,
    pub term: Term,
    /// The primary the shard record names.
    pub primary: Option<String>,
    /// Why the record's primary is quarantined (`null` normally): writes still go to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_quarantined: Option<String>,
    /// Where writes go, or `null`.
    pub rw: Option<Target>,
    /// Why writes have nowhere to go (when `rw` is `null`).
    pub rw_unavailable: Option<String>,
    pub ro: Vec<Target>,
    /// Why reads have nowhere to go (when `ro` is empty).
    pub ro_unavailable: Option<String>,
    pub ro_excluded: Vec<ExcludedJson>,
    /// The shard's MySQL ports, when it has a `[[listener]]`.
    pub listeners: Option<ListenersJson>,
    /// Connections held now for this shard.
    pub held: usize,
    /// Open connections through this gateway, by backend.
    pub backends: Vec<BackendJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExcludedJson {
    pub alias: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenersJson {
    pub rw: Option<String>,
    pub ro: Option<String>,
}

/// Open connections to one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendJson {
    pub alias: String,
    /// Through the RW port.
    pub rw_open: usize,
    /// Through the RO port (to a replica, or to the primary as the fallback).
    pub ro_open: usize,
}

/// What the proxy adds to one shard of [`RoutingResponse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardConnections {
    pub listeners: Option<ListenersJson>,
    pub held: usize,
    pub backends: Vec<BackendJson>,
}

/// How many replicas of `route` are left out of `ro`, per [`Excluded::kind`] (every kind, 0
/// included), for `myha_gateway_ro_excluded{keyspace,shard,reason}`.
pub fn excluded_counts(route: &ShardRoute) -> BTreeMap<&'static str, usize> {
    let mut counts: BTreeMap<&'static str, usize> =
        Excluded::KINDS.iter().map(|k| (*k, 0)).collect();
    for (_, e) in &route.routing.ro_excluded {
        *counts.entry(e.kind()).or_default() += 1;
    }
    counts
}

/// The JSON of `routes`; `conns` gives each configured shard's listeners and connections.
pub fn routing_response(
    routes: &Routes,
    policy: &RoutingPolicy,
    proxy: &ProxyPolicy,
    held: usize,
    conns: &BTreeMap<(String, String), ShardConnections>,
) -> RoutingResponse {
    let mut keys: Vec<&(String, String)> = routes.shards.keys().chain(conns.keys()).collect();
    keys.sort();
    keys.dedup();
    RoutingResponse {
        version: routes.snapshot_version,
        seq: routes.seq,
        computed_ms: routes.computed_ms,
        topo_synced: routes.topo_synced,
        health_stale_after_ms: millis(policy.health_stale_after),
        max_replica_lag_ms: millis(policy.max_replica_lag),
        ro_hard_lag_ms: millis(policy.ro_hard_lag),
        ro_policy: proxy.ro_policy.as_str(),
        ro_fallback: proxy.ro_fallback.as_str(),
        buffer_window_ms: millis(proxy.buffer_window),
        max_buffered: proxy.max_buffered,
        held,
        shards: keys
            .into_iter()
            .map(|k| {
                let c = conns.get(k).cloned().unwrap_or_default();
                let Some(s) = routes.shards.get(k) else {
                    return ShardRoutingJson {
                        keyspace: k.0.clone(),
                        shard: k.1.clone(),
                        term: Term::ZERO,
                        primary: None,
                        primary_quarantined: None,
                        rw: None,
                        rw_unavailable: Some(RwUnavailable::NoShardRecord.to_string()),
                        ro: vec![],
                        ro_unavailable: Some("no shard record and no tablet".into()),
                        ro_excluded: vec![],
                        listeners: c.listeners,
                        held: c.held,
                        backends: c.backends,
                    };
                };
                let r = &s.routing;
                let (rw, rw_unavailable) = match &r.rw {
                    Ok(t) => (Some(t.clone()), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                ShardRoutingJson {
                    keyspace: s.keyspace.clone(),
                    shard: s.shard.clone(),
                    term: s.term,
                    primary: s.primary.clone(),
                    primary_quarantined: s.primary_quarantined.clone(),
                    rw,
                    rw_unavailable,
                    ro: r.ro.clone(),
                    ro_unavailable: r.ro_unavailable(),
                    ro_excluded: r
                        .ro_excluded
                        .iter()
                        .map(|(alias, e)| ExcludedJson {
                            alias: alias.clone(),
                            reason: e.to_string(),
                        })
                        .collect(),
                    listeners: c.listeners,
                    held: c.held,
                    backends: c.backends,
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
            ro_hard_lag: Duration::from_secs(30),
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
            Arc::make_mut(&mut Arc::make_mut(sample).health)
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
                lag_ms: None,
                degraded: None,
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
    fn a_reserved_term_reported_by_replicas_keeps_the_primary() {
        // A reparent reserved term 4 and stopped replication under it (then refused, or is
        // still choosing): the record's primary still holds the shard.
        let mut f = Fixture::healthy();
        if let Some(r) = f.record.as_mut() {
            r.reserved_term = Term::new(4);
        }
        f.health_mut(R1).term = 4;
        f.health_mut(R2).term = 4;
        assert_eq!(f.route().rw.expect("rw").alias, P);
        // Past the reservation, the view is behind.
        f.health_mut(R2).term = 5;
        assert!(matches!(
            f.route().rw,
            Err(RwUnavailable::NewerTermReported { term, .. }) if term == Term::new(5)
        ));
        // A promotion under the reserved term is a new primary the record does not show yet.
        f.health_mut(R2).term = 4;
        f.health_mut(R1).promoted_term = 4;
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::NewerTermReported {
                tablet: R1.into(),
                term: Term::new(4),
                record_term: Term::new(3)
            })
        );
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
                term: Term::new(4),
                record_term: Term::new(3)
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

    /// The replicas' probe of P: reachable or not.
    fn probe(f: &mut Fixture, replica: &str, reachable: bool) {
        f.health_mut(replica).primary_probe = Some(myha_proto::agent::PrimaryProbe {
            primary_alias: P.into(),
            reachable,
            ..Default::default()
        });
    }

    /// P's agent went silent (its last health 2 s old) while R1 and R2 report at `t0 + 2 s`.
    fn silent_primary_agent(f: &mut Fixture) -> Routing {
        let later = f.t0 + Duration::from_secs(2);
        for t in f.tablets.iter_mut().filter(|t| t.alias() != P) {
            Arc::make_mut(t.last_health.as_mut().expect("health")).received_at = later;
        }
        f.route_at(Duration::from_secs(2))
    }

    #[test]
    fn an_unregistered_primary_is_vouched_for_at_the_address_the_replicas_probe() {
        // P17: the primary's agent is gone past its lease (no registration); replicas reach
        // its mysqld.
        let mut f = Fixture::healthy();
        f.tablets.remove(0);
        probe(&mut f, R1, true);
        probe(&mut f, R2, true);
        for r in [R1, R2] {
            f.health_mut(r).primary_probe.as_mut().unwrap().addr = "10.9.9.9:3306".into();
        }
        let rw = f.route().rw.expect("rw at the probed address");
        assert_eq!(
            (rw.alias.as_str(), rw.mysql_addr.as_str()),
            (P, "10.9.9.9:3306")
        );
        let why = rw.degraded.expect("marked degraded");
        assert!(
            why.contains("is not registered") && why.contains("zone1-102, zone1-103"),
            "{why}"
        );
        // Replicas that disagree on where it is vouch for nothing.
        f.health_mut(R2).primary_probe.as_mut().unwrap().addr = "10.9.9.8:3306".into();
        assert_eq!(
            f.route().rw,
            Err(RwUnavailable::NotRegistered { alias: P.into() })
        );
    }

    #[test]
    fn a_silent_primary_agent_is_vouched_for_by_the_replicas_probes() {
        // P5: only the primary's agent died; replicas still reach its mysqld.
        let mut f = Fixture::healthy();
        probe(&mut f, R1, true);
        probe(&mut f, R2, false);
        let rw = silent_primary_agent(&mut f)
            .rw
            .expect("rw through the vouching replica");
        assert_eq!(rw.alias, P);
        let why = rw.degraded.expect("marked degraded");
        assert!(
            why.contains("health is 2000 ms old") && why.contains("probes of zone1-102"),
            "{why}"
        );
        assert!(!why.contains("zone1-103"), "{why}");

        // Nobody reaches it (frozen or dead mysqld): held as before.
        let mut f = Fixture::healthy();
        probe(&mut f, R1, false);
        probe(&mut f, R2, false);
        assert!(matches!(
            silent_primary_agent(&mut f).rw,
            Err(RwUnavailable::StaleHealth { .. })
        ));

        // A probe of another primary vouches for nothing.
        let mut f = Fixture::healthy();
        probe(&mut f, R1, true);
        f.health_mut(R1)
            .primary_probe
            .as_mut()
            .unwrap()
            .primary_alias = R2.into();
        assert!(silent_primary_agent(&mut f).rw.is_err());

        // What its last health said still refuses: fenced, read-only, behind the term.
        let mut f = Fixture::healthy();
        probe(&mut f, R1, true);
        f.health_mut(P).fenced = true;
        assert!(matches!(
            silent_primary_agent(&mut f).rw,
            Err(RwUnavailable::Fenced { .. })
        ));
        let mut f = Fixture::healthy();
        probe(&mut f, R1, true);
        f.health_mut(P).term = 2;
        assert!(matches!(
            silent_primary_agent(&mut f).rw,
            Err(RwUnavailable::BehindTerm { .. })
        ));
        let mut f = Fixture::healthy();
        probe(&mut f, R1, true);
        f.health_mut(P).mysql.as_mut().unwrap().read_only = true;
        assert!(matches!(
            silent_primary_agent(&mut f).rw,
            Err(RwUnavailable::ReadOnly { .. })
        ));
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
                agent_term: Term::new(2),
                record_term: Term::new(3)
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
                    agent_term: Term::new(1),
                    record_term: Term::new(2),
                },
                "knows term 1",
            ),
            (RwUnavailable::ReadOnly { alias: P.into() }, "read-only"),
            (
                RwUnavailable::NewerTermReported {
                    tablet: R1.into(),
                    term: Term::new(5),
                    record_term: Term::new(4),
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
    fn routing_response_covers_every_shard_and_the_connections() {
        let f = Fixture::healthy();
        let mut snap = tabletwatch::FleetSnapshot::empty(f.t0);
        snap.version = 3;
        snap.shards.insert(
            ("ks".into(), "0".into()),
            Arc::new(shard("ks", "0", f.record.clone(), f.tablets.clone())),
        );
        snap.shards.insert(
            ("ks".into(), "1".into()),
            Arc::new(shard("ks", "1", None, vec![])),
        );
        let routes = compute_routes(&snap, f.t0, 42, 7, &policy(), None);
        let mut conns = BTreeMap::new();
        conns.insert(
            ("ks".to_string(), "0".to_string()),
            ShardConnections {
                listeners: Some(ListenersJson {
                    rw: Some("127.0.0.1:1".into()),
                    ro: None,
                }),
                held: 2,
                backends: vec![BackendJson {
                    alias: P.into(),
                    rw_open: 3,
                    ro_open: 1,
                }],
            },
        );
        // A configured shard the snapshot does not know.
        conns.insert(
            ("other".to_string(), "0".to_string()),
            ShardConnections::default(),
        );
        let resp = routing_response(&routes, &policy(), &proxy(), 2, &conns);
        assert_eq!(
            (resp.version, resp.seq, resp.computed_ms, resp.topo_synced),
            (3, 7, 42, false)
        );
        assert_eq!(
            (
                resp.health_stale_after_ms,
                resp.max_replica_lag_ms,
                resp.ro_hard_lag_ms,
                resp.buffer_window_ms,
                resp.held
            ),
            (1000, 5000, 30000, 5000, 2)
        );
        let [a, b, c] = &resp.shards[..] else {
            panic!("{resp:?}")
        };
        assert_eq!(a.rw.as_ref().map(|t| t.alias.as_str()), Some(P));
        assert_eq!(a.primary.as_deref(), Some(P));
        assert_eq!(
            (
                a.rw_unavailable.as_ref(),
                a.ro.len(),
                a.ro_unavailable.as_ref()
            ),
            (None, 2, None)
        );
        assert_eq!((a.held, a.backends[0].rw_open), (2, 3));
        assert_eq!(b.rw, None);
        assert_eq!(b.rw_unavailable.as_deref(), Some("no shard record"));
        assert_eq!(b.ro_unavailable.as_deref(), Some("no replica registered"));
        assert_eq!((c.keyspace.as_str(), c.term), ("other", Term::ZERO));
        assert_eq!(c.rw_unavailable.as_deref(), Some("no shard record"));
        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(json["shards"][0]["rw"]["mysql_addr"], "127.0.0.1:3401");
        assert_eq!(json["shards"][0]["ro"][1]["lag_ms"], 20);
        assert_eq!(json["shards"][0]["listeners"]["rw"], "127.0.0.1:1");
        assert_eq!(json["shards"][0]["backends"][0]["ro_open"], 1);
        assert_eq!(json["shards"][1]["rw"], serde_json::Value::Null);
        assert_eq!(json["ro_policy"], "least_connections");
        assert_eq!(json["ro_fallback"], "primary");
    }

    // ---- routing snapshots and open connections ----

    fn proxy() -> ProxyPolicy {
        ProxyPolicy {
            buffer_window: Duration::from_secs(5),
            max_buffered: 10,
            ro_policy: RoPolicy::LeastConnections,
            ro_fallback: RoFallback::Primary,
        }
    }

    impl Fixture {
        fn view(&self) -> ShardView {
            shard("ks", "0", self.record.clone(), self.tablets.clone())
        }

        fn shard_route_at(&self, after: Duration) -> ShardRoute {
            shard_route(&self.view(), self.t0 + after, &policy())
        }

        fn close_at(&self, alias: &str, after: Duration) -> Option<String> {
            let view = self.view();
            ro_close_reason(
                &view,
                view.tablet(alias).unwrap(),
                self.t0 + after,
                &policy(),
            )
        }
    }

    #[test]
    fn open_ro_connections_stay_while_the_replica_is_merely_not_eligible() {
        let mut f = Fixture::healthy();
        assert_eq!(f.close_at(R1, Duration::ZERO), None);
        // Over max_replica_lag (no new connections) but under ro_hard_lag: stays.
        f.health_mut(R1).lag_ms = Some(10_000);
        assert!(f.route().ro.iter().all(|t| t.alias != R1));
        assert_eq!(f.close_at(R1, Duration::ZERO), None);
        // An IO thread reconnecting (a failover): not eligible, open connections stay.
        f.health_mut(R1).replication.as_mut().unwrap().io_state =
            myha_proto::agent::ThreadState::Connecting as i32;
        assert_eq!(f.close_at(R1, Duration::ZERO), None);
        // Stale health (1 s bound) is not enough either.
        assert_eq!(f.close_at(R2, Duration::from_secs(5)), None);
    }

    #[test]
    fn open_ro_connections_close_past_the_hard_bound() {
        let mut f = Fixture::healthy();
        f.health_mut(R1).lag_ms = Some(30_001);
        let why = f.close_at(R1, Duration::ZERO).expect("closed");
        assert!(
            why.contains("30001 ms") && why.contains("ro_hard_lag 30000 ms"),
            "{why}"
        );
        // Exactly the bound stays.
        f.health_mut(R1).lag_ms = Some(30_000);
        assert_eq!(f.close_at(R1, Duration::ZERO), None);
        // A silent stream: last lag + age of the report.
        f.health_mut(R1).lag_ms = Some(1000);
        assert_eq!(f.close_at(R1, Duration::from_secs(29)), None);
        assert!(f.close_at(R1, Duration::from_millis(29_001)).is_some());
        // No lag measurable: closed only once nothing was heard for the bound.
        f.health_mut(R1).lag_ms = None;
        assert_eq!(f.close_at(R1, Duration::from_secs(30)), None);
        let why = f.close_at(R1, Duration::from_millis(30_001)).unwrap();
        assert!(why.contains("no health for 30001 ms"), "{why}");
        // Stopped replication without a measurable lag: closed at once.
        f.health_mut(R1).replication.as_mut().unwrap().sql_state =
            myha_proto::agent::ThreadState::Stopped as i32;
        let why = f.close_at(R1, Duration::ZERO).unwrap();
        assert!(why.contains("not replicating"), "{why}");
    }

    #[test]
    fn open_ro_connections_close_on_fence_unreachable_promotion_or_no_health() {
        let mut f = Fixture::healthy();
        f.health_mut(R1).fenced = true;
        f.health_mut(R1).fence_reason = "newer term".into();
        assert_eq!(
            f.close_at(R1, Duration::ZERO).as_deref(),
            Some("fenced: newer term")
        );
        let h = f.health_mut(R2);
        h.mysql_reachable = false;
        h.mysql_error = "refused".into();
        assert_eq!(
            f.close_at(R2, Duration::ZERO).as_deref(),
            Some("mysqld unreachable: refused")
        );

        let mut f = Fixture::healthy();
        f.record = Some(shard_record("ks", "0", Some(R1), 4));
        assert_eq!(
            f.close_at(R1, Duration::ZERO).as_deref(),
            Some("it is the shard's primary now")
        );
        f.tablets[2].last_health = None;
        assert_eq!(f.close_at(R2, Duration::ZERO).as_deref(), Some("no health"));
    }

    #[test]
    fn shard_route_judges_every_tablet() {
        let mut f = Fixture::healthy();
        f.health_mut(R2).lag_ms = Some(40_000);
        let r = f.shard_route_at(Duration::ZERO);
        assert_eq!((r.term, r.primary.as_deref()), (Term::new(3), Some(P)));
        assert_eq!(r.routing, f.route());
        assert_eq!(r.ro_close.len(), 3);
        assert_eq!(r.ro_close[R1], None);
        assert!(r.ro_close[R2].is_some());
        assert_eq!(
            r.ro_close[P].as_deref(),
            Some("it is the shard's primary now")
        );
    }

    fn routes_of(f: &Fixture, seq: u64) -> Routes {
        let mut snap = tabletwatch::FleetSnapshot::empty(f.t0);
        snap.topo_synced = true;
        snap.shards
            .insert(("ks".into(), "0".into()), Arc::new(f.view()));
        compute_routes(&snap, f.t0, 0, seq, &policy(), None)
    }

    #[test]
    fn compute_routes_can_be_scoped() {
        let f = Fixture::healthy();
        let mut snap = tabletwatch::FleetSnapshot::empty(f.t0);
        snap.shards
            .insert(("ks".into(), "0".into()), Arc::new(f.view()));
        snap.shards.insert(
            ("ks".into(), "1".into()),
            Arc::new(shard("ks", "1", None, vec![])),
        );
        let only = BTreeSet::from([("ks".to_string(), "1".to_string())]);
        let r = compute_routes(&snap, f.t0, 0, 1, &policy(), Some(&only));
        assert_eq!(
            r.shards.keys().collect::<Vec<_>>(),
            [&("ks".to_string(), "1".to_string())]
        );
        assert_eq!(
            compute_routes(&snap, f.t0, 0, 1, &policy(), None)
                .shards
                .len(),
            2
        );
    }

    #[test]
    fn route_changes_ignore_lag_values_but_see_targets_and_terms() {
        let mut f = Fixture::healthy();
        let a = routes_of(&f, 1);
        assert!(route_changes(&a, &a).is_empty());
        f.health_mut(R1).lag_ms = Some(11);
        assert!(route_changes(&a, &routes_of(&f, 2)).is_empty());
        f.health_mut(R1).lag_ms = Some(9_000);
        let c = route_changes(&a, &routes_of(&f, 3));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].after.as_ref().unwrap().ro, [R2]);
        let mut f = Fixture::healthy();
        f.record = Some(shard_record("ks", "0", Some(P), 4));
        for t in &mut f.tablets {
            Arc::make_mut(&mut Arc::make_mut(t.last_health.as_mut().unwrap()).health).term = 4;
        }
        let c = route_changes(&a, &routes_of(&f, 4));
        assert_eq!(
            c[0].before.as_ref().unwrap().rw,
            Some((P.into(), Term::new(3)))
        );
        assert_eq!(
            c[0].after.as_ref().unwrap().rw,
            Some((P.into(), Term::new(4)))
        );
        let empty = Routes::empty();
        let c = route_changes(&empty, &a);
        assert_eq!((c.len(), c[0].before.is_none()), (1, true));
        assert_eq!(route_changes(&a, &empty)[0].after, None);
    }

    fn target(alias: &str) -> Target {
        Target {
            alias: alias.into(),
            mysql_addr: format!("addr-{alias}"),
            lag_ms: Some(0),
            degraded: None,
        }
    }

    #[test]
    fn pick_policies() {
        let ts = [target("a"), target("b"), target("c")];
        let c: Vec<&Target> = ts.iter().collect();
        let none = |_: &str| 0usize;
        for spin in 0..6 {
            assert_eq!(
                pick(&c, &none, RoPolicy::RoundRobin, spin),
                spin as usize % 3
            );
            assert_eq!(pick(&c, &none, RoPolicy::Random, spin), spin as usize % 3);
        }
        // Least connections: the minimum; spin rotates among ties only.
        let open = |a: &str| match a {
            "a" => 2,
            "b" => 0,
            _ => 1,
        };
        for spin in 0..4 {
            assert_eq!(pick(&c, &open, RoPolicy::LeastConnections, spin), 1);
        }
        let tie = |a: &str| usize::from(a == "b");
        let picks: Vec<usize> = (0..4)
            .map(|s| pick(&c, &tie, RoPolicy::LeastConnections, s))
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        let one = [&ts[1]];
        assert_eq!(pick(&one, &none, RoPolicy::Random, u64::MAX), 0);
    }

    fn ask<'a>(route: Option<&'a ShardRoute>) -> Ask<'a> {
        Ask {
            keyspace: "ks",
            shard: "0",
            route,
            topo_synced: true,
            held_for: None,
            hold_room: true,
        }
    }

    #[test]
    fn rw_choice_routes_holds_and_refuses() {
        let f = Fixture::healthy();
        let r = f.shard_route_at(Duration::ZERO);
        assert_eq!(
            rw_choice(&ask(Some(&r)), &proxy()),
            RwChoice::Route(target_p())
        );

        let mut f = Fixture::healthy();
        f.record.as_mut().unwrap().reparent_in_progress = Some("planned".into());
        let r = f.shard_route_at(Duration::ZERO);
        let a = ask(Some(&r));
        assert!(
            matches!(rw_choice(&a, &proxy()), RwChoice::Hold(ref w) if w.contains("reparent in progress")),
        );
        let held = Ask {
            held_for: Some(Duration::from_millis(4999)),
            hold_room: false, // already held: room does not matter any more
            ..a
        };
        assert!(matches!(rw_choice(&held, &proxy()), RwChoice::Hold(_)));
        let over = Ask {
            held_for: Some(Duration::from_secs(5)),
            ..a
        };
        let RwChoice::Refuse(refusal) = rw_choice(&over, &proxy()) else {
            panic!()
        };
        assert_eq!(refusal.kind, RefusalKind::NoPrimary);
        assert_eq!(
            refusal.message,
            "myha-gateway: no primary for ks/0: reparent in progress: planned (buffer window 5s expired)"
        );
        let full = Ask {
            hold_room: false,
            ..a
        };
        let RwChoice::Refuse(refusal) = rw_choice(&full, &proxy()) else {
            panic!()
        };
        assert_eq!(refusal.kind, RefusalKind::MaxBuffered);
        assert!(
            refusal.message.contains("max_buffered 10"),
            "{}",
            refusal.message
        );
        let no_window = ProxyPolicy {
            buffer_window: Duration::ZERO,
            ..proxy()
        };
        let RwChoice::Refuse(refusal) = rw_choice(&a, &no_window) else {
            panic!()
        };
        assert!(
            refusal.message.ends_with("(not held: buffer_window is 0)"),
            "{}",
            refusal.message
        );
    }

    fn target_p() -> Target {
        Target {
            alias: P.into(),
            mysql_addr: "127.0.0.1:3401".into(),
            lag_ms: None,
            degraded: None,
        }
    }

    #[test]
    fn rw_choice_for_unknown_shards() {
        // Topology current and no record: refused at once.
        let RwChoice::Refuse(r) = rw_choice(&ask(None), &proxy()) else {
            panic!()
        };
        assert_eq!(r.kind, RefusalKind::UnknownShard);
        assert_eq!(
            r.message,
            "myha-gateway: no primary for ks/0: no shard record"
        );
        // Not read yet: held (the gateway just started).
        let a = Ask {
            topo_synced: false,
            ..ask(None)
        };
        assert!(matches!(rw_choice(&a, &proxy()), RwChoice::Hold(_)));
        let a = Ask {
            held_for: Some(Duration::from_secs(6)),
            ..a
        };
        let RwChoice::Refuse(r) = rw_choice(&a, &proxy()) else {
            panic!()
        };
        assert_eq!(r.kind, RefusalKind::NoPrimary);
    }

    #[test]
    fn ro_choice_replicas_then_fallback() {
        let none = |_: &str| 0usize;
        let f = Fixture::healthy();
        let r = f.shard_route_at(Duration::ZERO);
        let a = ask(Some(&r));
        let p = proxy();
        let RoChoice::Replica(t) = ro_choice(&a, &p, &none, &[], 0) else {
            panic!()
        };
        assert_eq!(t.alias, R1);
        let RoChoice::Replica(t) = ro_choice(&a, &p, &none, &[], 1) else {
            panic!()
        };
        assert_eq!(t.alias, R2);
        let busy = |a: &str| usize::from(a == R1) * 5;
        let RoChoice::Replica(t) = ro_choice(&a, &p, &busy, &[], 0) else {
            panic!()
        };
        assert_eq!(t.alias, R2);
        // A replica that refused this connection is skipped.
        let RoChoice::Replica(t) = ro_choice(&a, &p, &none, &[R1.to_string()], 0) else {
            panic!()
        };
        assert_eq!(t.alias, R2);
        // Both refused: the primary (fallback).
        let both = [R1.to_string(), R2.to_string()];
        assert_eq!(
            ro_choice(&a, &p, &none, &both, 0),
            RoChoice::Primary(target_p())
        );
        let all = [R1.to_string(), R2.to_string(), P.to_string()];
        let RoChoice::Refuse(x) = ro_choice(&a, &p, &none, &all, 0) else {
            panic!()
        };
        assert!(
            x.message.contains("refused the connection too"),
            "{}",
            x.message
        );
    }

    #[test]
    fn ro_choice_without_eligible_replicas_per_fallback() {
        let none = |_: &str| 0usize;
        let mut f = Fixture::healthy();
        f.health_mut(R1).lag_ms = Some(6000);
        f.health_mut(R2).lag_ms = Some(7000);
        let r = f.shard_route_at(Duration::ZERO);
        let a = ask(Some(&r));
        // G3, fallback primary.
        assert_eq!(
            ro_choice(&a, &proxy(), &none, &[], 0),
            RoChoice::Primary(target_p())
        );
        // G3, refuse.
        let refuse = ProxyPolicy {
            ro_fallback: RoFallback::Refuse,
            ..proxy()
        };
        let RoChoice::Refuse(x) = ro_choice(&a, &refuse, &none, &[], 0) else {
            panic!()
        };
        assert_eq!(x.kind, RefusalKind::NoReplica);
        assert!(
            x.message
                .starts_with("myha-gateway: no replica for ks/0: no eligible replica (")
                && x.message.contains("zone1-102: lag 6000 ms >= max 5000 ms"),
            "{}",
            x.message
        );
        // Fallback primary, but no primary either.
        f.health_mut(P).mysql.as_mut().unwrap().read_only = true;
        let r = f.shard_route_at(Duration::ZERO);
        let RoChoice::Refuse(x) = ro_choice(&ask(Some(&r)), &proxy(), &none, &[], 0) else {
            panic!()
        };
        assert!(
            x.message
                .contains("no primary to fall back to: primary zone1-101 is read-only"),
            "{}",
            x.message
        );
    }

    #[test]
    fn ro_choice_before_the_topology_is_read_holds() {
        let none = |_: &str| 0usize;
        let a = Ask {
            topo_synced: false,
            ..ask(None)
        };
        assert!(matches!(
            ro_choice(&a, &proxy(), &none, &[], 0),
            RoChoice::Hold(_)
        ));
        let late = Ask {
            held_for: Some(Duration::from_secs(5)),
            ..a
        };
        let RoChoice::Refuse(x) = ro_choice(&late, &proxy(), &none, &[], 0) else {
            panic!()
        };
        assert!(x.message.contains("could not be read"), "{}", x.message);
        let RoChoice::Refuse(x) = ro_choice(&ask(None), &proxy(), &none, &[], 0) else {
            panic!()
        };
        assert!(
            x.message.contains("no shard record and no tablet"),
            "{}",
            x.message
        );
        // Known shard, nothing eligible yet, not synced: held too.
        let mut f = Fixture::healthy();
        f.tablets.truncate(1);
        let r = f.shard_route_at(Duration::ZERO);
        let a = Ask {
            topo_synced: false,
            ..ask(Some(&r))
        };
        assert!(matches!(
            ro_choice(&a, &proxy(), &none, &[], 0),
            RoChoice::Hold(_)
        ));
    }

    #[test]
    fn open_connections_to_a_deposed_primary_close_on_a_newer_term() {
        let f = Fixture::healthy();
        let r = f.shard_route_at(Duration::ZERO);
        for role in [ConnRole::Rw, ConnRole::RoPrimary] {
            assert_eq!(close_reason(role, P, Term::new(3), Some(&r)), None);
            // Opened under an older term on the same primary: stays.
            assert_eq!(close_reason(role, P, Term::new(2), Some(&r)), None);
            // Another tablet than the record's primary, opened under an older term: closed.
            let why = close_reason(role, R1, Term::new(2), Some(&r)).expect("closed");
            assert!(why.contains("term 3 names zone1-101"), "{why}");
            // Same term: nothing rose, nothing to do.
            assert_eq!(close_reason(role, R1, Term::new(3), Some(&r)), None);
            assert_eq!(close_reason(role, R1, Term::new(2), None), None);
        }
        let mut f = Fixture::healthy();
        f.record = Some(shard_record("ks", "0", None, 4));
        let r = f.shard_route_at(Duration::ZERO);
        let why = close_reason(ConnRole::Rw, P, Term::new(3), Some(&r)).unwrap();
        assert!(why.contains("names no tablet"), "{why}");
    }

    #[test]
    fn open_connections_to_replicas_follow_ro_close() {
        let mut f = Fixture::healthy();
        f.health_mut(R2).lag_ms = Some(31_000);
        let r = f.shard_route_at(Duration::ZERO);
        assert_eq!(
            close_reason(ConnRole::RoReplica, R1, Term::new(3), Some(&r)),
            None
        );
        assert!(close_reason(ConnRole::RoReplica, R2, Term::new(3), Some(&r)).is_some());
        assert_eq!(
            close_reason(ConnRole::RoReplica, "zone1-999", Term::new(3), Some(&r)).as_deref(),
            Some("the tablet is no longer registered")
        );
        assert_eq!(ConnRole::RoPrimary.port(), "ro");
        assert_eq!(ConnRole::Rw.port(), "rw");
    }

    #[test]
    fn refusal_texts_and_names() {
        let r = Refusal::connect_failed("ks", "0", "primary", &target("a"), "refused");
        assert_eq!(r.kind, RefusalKind::ConnectFailed);
        assert_eq!(
            r.message,
            "myha-gateway: no primary for ks/0: cannot connect to a (addr-a): refused"
        );
        assert!(Refusal::shutting_down("ks", "0")
            .message
            .contains("shutting down"));
        let names: Vec<&str> = RefusalKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "no_primary",
                "no_replica",
                "unknown_shard",
                "max_buffered",
                "connect_failed",
                "shutting_down",
                "max_connections",
                "overloaded"
            ]
        );
        assert!(Refusal::max_connections("ks", "0", 3)
            .message
            .contains("too many connections through this gateway (3: routing.max_connections)"));
        assert_eq!(fmt_duration(Duration::from_secs(5)), "5s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(RoPolicy::RoundRobin.as_str(), "round_robin");
        assert_eq!(RoFallback::Refuse.as_str(), "refuse");
    }

    // ---- quarantine ----

    impl Fixture {
        fn quarantine(&mut self, alias: &str, reason: &str) {
            let i = self
                .tablets
                .iter()
                .position(|t| t.alias() == alias)
                .expect("tablet");
            self.tablets[i] = quarantined(self.tablets[i].clone(), reason);
        }
    }

    #[test]
    fn a_quarantined_replica_gets_no_reads_whatever_its_health() {
        let mut f = Fixture::healthy();
        f.quarantine(R1, "errant 0-102-7");
        let r = f.route();
        assert_eq!(aliases(&r.ro), [R2]);
        let e = excluded(&r, R1);
        assert_eq!(e.kind(), "quarantined");
        let text = e.to_string();
        assert!(
            text.starts_with("quarantined: errant 0-102-7") && text.contains("by test"),
            "{text}"
        );
        // Quarantine outranks every health reason (it is listed as quarantined, not stale).
        let r = f.route_at(Duration::from_secs(10));
        assert_eq!(excluded(&r, R1).kind(), "quarantined");
        assert_eq!(excluded(&r, R2).kind(), "stale_health");
        // Writes are unaffected.
        assert_eq!(f.route().rw.map(|t| t.alias), Ok(P.to_string()));
    }

    #[test]
    fn open_ro_connections_to_a_quarantined_replica_are_closed() {
        let mut f = Fixture::healthy();
        f.quarantine(R2, "operator: disk errors");
        let why = f.close_at(R2, Duration::ZERO).expect("closed");
        assert!(
            why.starts_with("quarantined: operator: disk errors"),
            "{why}"
        );
        assert_eq!(f.close_at(R1, Duration::ZERO), None);
        let r = f.shard_route_at(Duration::ZERO);
        let why = close_reason(ConnRole::RoReplica, R2, Term::new(3), Some(&r)).expect("closed");
        assert!(why.contains("disk errors"), "{why}");
        assert_eq!(
            close_reason(ConnRole::RoReplica, R1, Term::new(3), Some(&r)),
            None
        );
        // The primary stays "the shard's primary" first (both close; that reason is the
        // one that explains a promotion).
        f.quarantine(P, "odd");
        assert_eq!(
            f.close_at(P, Duration::ZERO).as_deref(),
            Some("it is the shard's primary now")
        );
    }

    #[test]
    fn a_quarantined_primary_keeps_the_writes_but_is_marked() {
        let mut f = Fixture::healthy();
        assert_eq!(f.shard_route_at(Duration::ZERO).primary_quarantined, None);
        f.quarantine(P, "should never happen");
        let r = f.shard_route_at(Duration::ZERO);
        assert_eq!(r.routing.rw.as_ref().map(|t| t.alias.as_str()), Ok(P));
        let why = r.primary_quarantined.clone().expect("marked");
        assert!(why.starts_with("should never happen"), "{why}");
        for role in [ConnRole::Rw, ConnRole::RoPrimary] {
            assert_eq!(close_reason(role, P, Term::new(3), Some(&r)), None);
        }
        let mut routes = routes_of(&f, 1);
        routes.shards.insert(("ks".into(), "0".into()), r);
        let resp = routing_response(&routes, &policy(), &proxy(), 0, &BTreeMap::new());
        let json = serde_json::to_value(&resp).unwrap();
        assert!(json["shards"][0]["primary_quarantined"]
            .as_str()
            .is_some_and(|s| s.starts_with("should never happen")));
        // Absent (not null) when the primary is not quarantined.
        let resp = routing_response(
            &routes_of(&Fixture::healthy(), 2),
            &policy(),
            &proxy(),
            0,
            &BTreeMap::new(),
        );
        let json = serde_json::to_value(&resp).unwrap();
        assert!(
            json["shards"][0].get("primary_quarantined").is_none(),
            "{json}"
        );
    }

    #[test]
    fn quarantine_shows_in_routing_json_metrics_and_refusals() {
        let mut f = Fixture::healthy();
        f.quarantine(R1, "errant");
        f.health_mut(R2).lag_ms = Some(9_000);
        let r = f.shard_route_at(Duration::ZERO);
        let counts = excluded_counts(&r);
        assert_eq!(counts.len(), Excluded::KINDS.len());
        assert_eq!(
            (
                counts["quarantined"],
                counts["lag_too_high"],
                counts["no_health"]
            ),
            (1, 1, 0)
        );

        let routes = Routes {
            shards: BTreeMap::from([(("ks".to_string(), "0".to_string()), r.clone())]),
            ..routes_of(&f, 1)
        };
        let resp = routing_response(&routes, &policy(), &proxy(), 0, &BTreeMap::new());
        let ex = &resp.shards[0].ro_excluded;
        assert!(
            ex.iter()
                .any(|e| e.alias == R1 && e.reason.starts_with("quarantined: errant")),
            "{ex:?}"
        );

        // Nothing eligible: the refusal names the quarantine.
        let refuse = ProxyPolicy {
            ro_fallback: RoFallback::Refuse,
            ..proxy()
        };
        let none = |_: &str| 0;
        let RoChoice::Refuse(x) = ro_choice(&ask(Some(&r)), &refuse, &none, &[], 0) else {
            panic!()
        };
        assert_eq!(x.kind, RefusalKind::NoReplica);
        assert!(
            x.message.contains("zone1-102: quarantined: errant"),
            "{}",
            x.message
        );
        // With the primary fallback, reads go to the primary.
        assert!(matches!(
            ro_choice(&ask(Some(&r)), &proxy(), &none, &[], 0),
            RoChoice::Primary(t) if t.alias == P
        ));
    }

    #[test]
    fn quarantine_and_release_are_routing_changes() {
        let mut f = Fixture::healthy();
        let before = routes_of(&f, 1);
        f.quarantine(R1, "x");
        let during = routes_of(&f, 2);
        let changes = route_changes(&before, &during);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].after.as_ref().map(|k| k.ro.clone()),
            Some(vec![R2.to_string()])
        );
        let released = routes_of(&Fixture::healthy(), 3);
        assert_eq!(route_changes(&during, &released).len(), 1);
    }
}
