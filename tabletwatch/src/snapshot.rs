//! The immutable view of the fleet that [`crate::TabletWatch`] publishes, and pure accessors on
//! it. Nothing here reads a clock: every time-dependent question takes an explicit `now`, so
//! decisions can be written as pure `(snapshot, now) -> decision` functions and tested with
//! hand-made snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myha_proto::agent::{Health, ThreadState};
use topo::{QuarantineRecord, ShardRecord, TabletRecord, Term};

/// One `Health` message as it was received from an agent's `StreamHealth`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSample {
    /// Shared with the analysis inputs built from it.
    pub health: Arc<Health>,
    /// Monotonic time of receipt (what freshness is judged by).
    pub received_at: Instant,
    /// Wall clock of receipt, ms since the Unix epoch (for display and logs).
    pub received_ms: u64,
}

/// Where the `StreamHealth` subscription to one tablet's agent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamState {
    /// Subscribed: health messages flow.
    Connected {
        /// When the subscription was established.
        since: Instant,
        since_ms: u64,
    },
    /// Not subscribed: (re)connecting, or waiting for the next attempt.
    Connecting {
        /// Since when the tablet has had no subscription (first attempt, or the break).
        since: Instant,
        since_ms: u64,
        /// Failed attempts (including the break of an established stream) since the last
        /// established subscription; 0 before the first attempt finished.
        failures: u32,
        /// Why the last attempt failed or the last stream broke; `None` before any failure.
        last_error: Option<String>,
    },
}

impl StreamState {
    pub fn is_connected(&self) -> bool {
        matches!(self, StreamState::Connected { .. })
    }

    /// `"connected"` or `"connecting"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamState::Connected { .. } => "connected",
            StreamState::Connecting { .. } => "connecting",
        }
    }

    /// Why the subscription is down (`None` while connected or before the first failure).
    pub fn last_error(&self) -> Option<&str> {
        match self {
            StreamState::Connected { .. } => None,
            StreamState::Connecting { last_error, .. } => last_error.as_deref(),
        }
    }

    /// How long the stream has been in this state at `now`.
    pub fn duration(&self, now: Instant) -> Duration {
        let since = match self {
            StreamState::Connected { since, .. } | StreamState::Connecting { since, .. } => *since,
        };
        now.saturating_duration_since(since)
    }
}

/// One registered tablet: its etcd record, its latest health and its stream state.
#[derive(Debug, Clone, PartialEq)]
pub struct TabletView {
    pub record: Arc<TabletRecord>,
    /// The latest health received (kept when the stream breaks; judge it with
    /// [`TabletView::is_fresh`]).
    pub last_health: Option<Arc<HealthSample>>,
    pub stream: StreamState,
    /// `{p}/quarantine/{alias}` when the tablet is quarantined: kept out of promotion and of
    /// read routing until an operator releases it.
    pub quarantine: Option<Arc<QuarantineRecord>>,
}

impl TabletView {
    pub fn alias(&self) -> &str {
        &self.record.alias
    }

    /// The quarantine record, when the tablet is quarantined.
    pub fn quarantined(&self) -> Option<&QuarantineRecord> {
        self.quarantine.as_deref()
    }

    /// `mysql_host:mysql_port` from the registration.
    pub fn mysql_addr(&self) -> String {
        format!("{}:{}", self.record.mysql_host, self.record.mysql_port)
    }

    /// The latest health, however old.
    pub fn health(&self) -> Option<&Health> {
        self.last_health.as_deref().map(|s| &*s.health)
    }

    /// The latest health, shared.
    pub fn health_shared(&self) -> Option<&Arc<Health>> {
        self.last_health.as_deref().map(|s| &s.health)
    }

    /// How long ago the latest health was received (`None` without any).
    pub fn health_age(&self, now: Instant) -> Option<Duration> {
        self.last_health
            .as_deref()
            .map(|s| now.saturating_duration_since(s.received_at))
    }

    /// A health was received at most `max_age` before `now`.
    pub fn is_fresh(&self, now: Instant, max_age: Duration) -> bool {
        self.health_age(now).is_some_and(|age| age <= max_age)
    }

    /// The latest health if it is fresh.
    pub fn fresh_health(&self, now: Instant, max_age: Duration) -> Option<&Health> {
        self.health().filter(|_| self.is_fresh(now, max_age))
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_connected()
    }

    /// Whether the agent could reach its mysqld (`None` without health).
    pub fn mysql_reachable(&self) -> Option<bool> {
        self.health().map(|h| h.mysql_reachable)
    }

    /// mysqld's `read_only` (`None` without health or when mysqld was unreachable).
    pub fn read_only(&self) -> Option<bool> {
        health_read_only(self.health()?)
    }

    /// Both replication threads run (`None` without health or when mysqld was unreachable).
    pub fn replicating(&self) -> Option<bool> {
        health_replicating(self.health()?)
    }

    /// Replication lag from the primary's heartbeat (`None` when not measurable).
    pub fn lag_ms(&self) -> Option<u64> {
        self.health()?.lag_ms
    }

    /// The highest term the agent knows (`None` without health).
    pub fn term(&self) -> Option<Term> {
        self.health().map(|h| Term::new(h.term))
    }

    /// The agent fenced its mysqld (`None` without health).
    pub fn fenced(&self) -> Option<bool> {
        self.health().map(|h| h.fenced)
    }
}

/// `read_only` of a health message (`None` when mysqld was unreachable).
pub fn health_read_only(h: &Health) -> Option<bool> {
    if !h.mysql_reachable {
        return None;
    }
    h.mysql.as_ref().map(|m| m.read_only)
}

/// Both replication threads run (`None` when mysqld was unreachable).
pub fn health_replicating(h: &Health) -> Option<bool> {
    if !h.mysql_reachable {
        return None;
    }
    Some(h.replication.as_ref().is_some_and(|r| {
        r.configured
            && r.io_state() == ThreadState::Running
            && r.sql_state() == ThreadState::Running
    }))
}

/// One shard: its record (if it exists) and the tablets registered for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardView {
    pub keyspace: String,
    pub shard: String,
    /// `None` when tablets are registered for a shard without a record.
    pub record: Option<Arc<ShardRecord>>,
    /// By alias.
    pub tablets: BTreeMap<String, TabletView>,
}

impl ShardView {
    /// The primary the shard record names.
    pub fn primary_alias(&self) -> Option<&str> {
        self.record.as_deref()?.primary.as_deref()
    }

    /// The shard record's term (0 without a record).
    pub fn term(&self) -> Term {
        self.record.as_deref().map_or(Term::ZERO, |r| r.term)
    }

    pub fn tablet(&self, alias: &str) -> Option<&TabletView> {
        self.tablets.get(alias)
    }

    /// The tablet the shard record names as primary, if it is registered.
    pub fn primary(&self) -> Option<&TabletView> {
        self.tablets.get(self.primary_alias()?)
    }

    /// Every registered tablet the shard record does not name as primary, by alias.
    pub fn replicas(&self) -> impl Iterator<Item = &TabletView> + '_ {
        let primary = self.primary_alias();
        self.tablets
            .values()
            .filter(move |t| Some(t.alias()) != primary)
    }

    /// The tablet whose latest health reports the highest term, with that term (`None` when
    /// no tablet has health). Ties go to the first alias.
    pub fn highest_reported_term(&self) -> Option<(&str, Term)> {
        self.tablets
            .values()
            .filter_map(|t| Some((t.alias(), t.term()?)))
            .fold(None, |best: Option<(&str, Term)>, (a, term)| match best {
                Some((_, b)) if b >= term => best,
                _ => Some((a, term)),
            })
    }

    /// A tablet whose health says the record view is behind, with the term it reports: it was
    /// promoted under a term above the record's, or it knows a term above both the record's and
    /// the record's reservation. A term up to the reservation is not news: a reparent in progress
    /// (or one that stopped) acts under its reserved term before it writes a new primary, and the
    /// record's primary still holds the shard until it does.
    pub fn term_ahead_of_record(&self) -> Option<(&str, Term)> {
        let rec = self.record.as_deref()?;
        let known = rec.term.max(rec.reserved_term);
        self.tablets
            .values()
            .filter_map(|t| {
                let h = t.health()?;
                let (promoted, term) = (Term::new(h.promoted_term), Term::new(h.term));
                if promoted > rec.term {
                    Some((t.alias(), promoted))
                } else if term > known {
                    Some((t.alias(), term))
                } else {
                    None
                }
            })
            .fold(None, |best: Option<(&str, Term)>, (a, term)| match best {
                Some((_, b)) if b >= term => best,
                _ => Some((a, term)),
            })
    }
}

/// Everything [`crate::TabletWatch`] knows at one moment. Immutable: a new one is published
/// on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSnapshot {
    /// Increases with every published snapshot (0 = the empty initial one).
    pub version: u64,
    /// When this snapshot was built.
    pub taken_at: Instant,
    /// Every etcd watch (tablets, shards, quarantine) is current. While false the
    /// registrations, shard records and quarantines may be out of date (etcd unreachable, or
    /// not read yet).
    pub topo_synced: bool,
    /// By `(keyspace, shard)`: every shard with a record or a registered tablet. A shard
    /// whose inputs did not change since the previous snapshot keeps the same `Arc`, so that
    /// a consumer can tell the changed shards apart with [`Arc::ptr_eq`] (the engine analyses
    /// only those).
    pub shards: BTreeMap<(String, String), Arc<ShardView>>,
}

impl FleetSnapshot {
    /// Nothing known yet.
    pub fn empty(now: Instant) -> FleetSnapshot {
        FleetSnapshot {
            version: 0,
            taken_at: now,
            topo_synced: false,
            shards: BTreeMap::new(),
        }
    }

    pub fn shard(&self, keyspace: &str, shard: &str) -> Option<&ShardView> {
        self.shards
            .get(&(keyspace.to_string(), shard.to_string()))
            .map(|v| &**v)
    }

    /// Every registered tablet, by shard then alias.
    pub fn tablets(&self) -> impl Iterator<Item = &TabletView> + '_ {
        self.shards.values().flat_map(|s| s.tablets.values())
    }

    pub fn tablet(&self, alias: &str) -> Option<&TabletView> {
        self.shards.values().find_map(|s| s.tablets.get(alias))
    }

    pub fn tablet_count(&self) -> usize {
        self.shards.values().map(|s| s.tablets.len()).sum()
    }
}

/// Builders for hand-made snapshots (tests of pure decision functions, here and in the
/// daemons).
pub mod testing {
    use super::*;
    use myha_proto::agent::{MysqlStatus, Replication};
    use topo::{PromotionRule, TabletType};

    /// A registration of `alias` (`cell-uid`) in `keyspace/shard`, mysqld on 127.0.0.1:(3300 + uid % 1000).
    pub fn tablet_record(alias: &str, keyspace: &str, shard: &str) -> TabletRecord {
        let (cell, uid) = topo::parse_alias(alias).unwrap_or_else(|_| ("zone1".into(), 0));
        TabletRecord {
            alias: alias.to_string(),
            cell,
            uid,
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
            tablet_type: TabletType::Replica,
            mysql_host: "127.0.0.1".into(),
            mysql_port: 3300 + (uid % 1000) as u16,
            mysql_socket: None,
            grpc_addr: format!("127.0.0.1:{}", 16000 + (uid % 1000)),
            http_addr: None,
            promotion_rule: PromotionRule::Neutral,
            registered_ms: 0,
        }
    }

    /// A healthy primary's health at `term`: reachable, writable, no replication.
    pub fn primary_health(alias: &str, term: u64) -> Health {
        Health {
            alias: alias.to_string(),
            mysql_reachable: true,
            mysql: Some(MysqlStatus {
                read_only: false,
                ..Default::default()
            }),
            replication: Some(Replication::default()),
            term,
            promoted_term: term,
            etcd_connected: true,
            ..Default::default()
        }
    }

    /// A healthy replica's health at `term`: reachable, read-only, both threads running.
    pub fn replica_health(alias: &str, term: u64, lag_ms: Option<u64>) -> Health {
        Health {
            alias: alias.to_string(),
            mysql_reachable: true,
            mysql: Some(MysqlStatus {
                read_only: true,
                ..Default::default()
            }),
            replication: Some(Replication {
                configured: true,
                io_state: ThreadState::Running as i32,
                sql_state: ThreadState::Running as i32,
                ..Default::default()
            }),
            lag_ms,
            term,
            etcd_connected: true,
            ..Default::default()
        }
    }

    /// A connected tablet whose `health` was received at `received_at`.
    pub fn tablet(
        record: TabletRecord,
        health: Option<Health>,
        received_at: Instant,
    ) -> TabletView {
        TabletView {
            record: Arc::new(record),
            last_health: health.map(|health| {
                Arc::new(HealthSample {
                    health: Arc::new(health),
                    received_at,
                    received_ms: 0,
                })
            }),
            stream: StreamState::Connected {
                since: received_at,
                since_ms: 0,
            },
            quarantine: None,
        }
    }

    /// `view` quarantined by an operator for `reason` at term 1.
    pub fn quarantined(mut view: TabletView, reason: &str) -> TabletView {
        view.quarantine = Some(Arc::new(QuarantineRecord {
            reason: reason.to_string(),
            at_ms: 1,
            term: Term::new(1),
            by: Some("test".into()),
        }));
        view
    }

    /// A shard view with `record` (when given) and `tablets`.
    pub fn shard(
        keyspace: &str,
        shard: &str,
        record: Option<ShardRecord>,
        tablets: Vec<TabletView>,
    ) -> ShardView {
        ShardView {
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
            record: record.map(Arc::new),
            tablets: tablets
                .into_iter()
                .map(|t| (t.alias().to_string(), t))
                .collect(),
        }
    }

    /// A shard record naming `primary` at `term`.
    pub fn shard_record(
        keyspace: &str,
        shard: &str,
        primary: Option<&str>,
        term: u64,
    ) -> ShardRecord {
        ShardRecord {
            primary: primary.map(str::to_string),
            term: Term::new(term),
            term_start_ms: 1,
            ..ShardRecord::new(keyspace, shard)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn freshness_is_judged_against_the_given_now() {
        let t0 = Instant::now();
        let rec = tablet_record("zone1-101", "ks", "0");
        let t = tablet(rec.clone(), Some(primary_health("zone1-101", 1)), t0);
        let max = Duration::from_secs(1);
        assert!(t.is_fresh(t0, max));
        assert!(
            t.is_fresh(t0 + max, max),
            "exactly max_age old is still fresh"
        );
        assert!(!t.is_fresh(t0 + max + Duration::from_millis(1), max));
        assert_eq!(
            t.health_age(t0 + Duration::from_millis(250)),
            Some(Duration::from_millis(250))
        );
        // A `now` before receipt (snapshot taken after `now` was read) counts as age 0.
        assert!(t0
            .checked_sub(Duration::from_millis(5))
            .is_none_or(|early| t.is_fresh(early, max)));
        assert!(t.fresh_health(t0, max).is_some());
        assert!(t.fresh_health(t0 + 2 * max, max).is_none());

        let none = tablet(rec, None, t0);
        assert!(!none.is_fresh(t0, max));
        assert_eq!(none.health_age(t0), None);
        assert_eq!(none.mysql_reachable(), None);
        assert_eq!(none.read_only(), None);
        assert_eq!(none.replicating(), None);
        assert_eq!(none.term(), None);
    }

    #[test]
    fn health_accessors() {
        let t0 = Instant::now();
        let p = tablet(
            tablet_record("zone1-101", "ks", "0"),
            Some(primary_health("zone1-101", 3)),
            t0,
        );
        assert_eq!(p.mysql_reachable(), Some(true));
        assert_eq!(p.read_only(), Some(false));
        assert_eq!(p.replicating(), Some(false));
        assert_eq!(p.lag_ms(), None);
        assert_eq!(p.term(), Some(Term::new(3)));
        assert_eq!(p.fenced(), Some(false));
        assert_eq!(p.mysql_addr(), "127.0.0.1:3401");

        let r = tablet(
            tablet_record("zone1-102", "ks", "0"),
            Some(replica_health("zone1-102", 3, Some(40))),
            t0,
        );
        assert_eq!(r.read_only(), Some(true));
        assert_eq!(r.replicating(), Some(true));
        assert_eq!(r.lag_ms(), Some(40));

        let mut h = replica_health("zone1-103", 3, None);
        h.replication.as_mut().unwrap().sql_state = ThreadState::Stopped as i32;
        assert_eq!(health_replicating(&h), Some(false));
        h.replication = None;
        assert_eq!(health_replicating(&h), Some(false));
        h.mysql_reachable = false;
        assert_eq!(health_replicating(&h), None);
        assert_eq!(
            health_read_only(&h),
            None,
            "unreachable mysqld has no read_only"
        );
    }

    #[test]
    fn stream_state_accessors() {
        let t0 = Instant::now();
        let c = StreamState::Connected {
            since: t0,
            since_ms: 0,
        };
        assert!(c.is_connected());
        assert_eq!(c.as_str(), "connected");
        assert_eq!(c.last_error(), None);
        assert_eq!(
            c.duration(t0 + Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        let d = StreamState::Connecting {
            since: t0,
            since_ms: 0,
            failures: 2,
            last_error: Some("connection refused".into()),
        };
        assert!(!d.is_connected());
        assert_eq!(d.as_str(), "connecting");
        assert_eq!(d.last_error(), Some("connection refused"));
    }

    #[test]
    fn shard_accessors() {
        let t0 = Instant::now();
        let s = shard(
            "ks",
            "0",
            Some(shard_record("ks", "0", Some("zone1-101"), 4)),
            vec![
                tablet(
                    tablet_record("zone1-101", "ks", "0"),
                    Some(primary_health("zone1-101", 4)),
                    t0,
                ),
                tablet(
                    tablet_record("zone1-102", "ks", "0"),
                    Some(replica_health("zone1-102", 5, None)),
                    t0,
                ),
                tablet(tablet_record("zone1-103", "ks", "0"), None, t0),
            ],
        );
        assert_eq!(s.primary_alias(), Some("zone1-101"));
        assert_eq!(s.term(), Term::new(4));
        assert_eq!(s.primary().map(TabletView::alias), Some("zone1-101"));
        let replicas: Vec<&str> = s.replicas().map(TabletView::alias).collect();
        assert_eq!(replicas, ["zone1-102", "zone1-103"]);
        assert_eq!(s.highest_reported_term(), Some(("zone1-102", Term::new(5))));

        let bare = shard("ks", "1", None, vec![]);
        assert_eq!(bare.primary_alias(), None);
        assert_eq!(bare.term(), Term::ZERO);
        assert!(bare.primary().is_none());
        assert_eq!(bare.highest_reported_term(), None);

        let mut snap = FleetSnapshot::empty(t0);
        assert_eq!(snap.tablet_count(), 0);
        snap.shards.insert(("ks".into(), "0".into()), Arc::new(s));
        snap.shards
            .insert(("ks".into(), "1".into()), Arc::new(bare));
        assert_eq!(snap.tablet_count(), 3);
        assert!(snap.tablet("zone1-103").is_some());
        assert!(snap.tablet("zone1-999").is_none());
        assert!(snap.shard("ks", "1").is_some());
        assert!(snap.shard("ks", "2").is_none());
        assert_eq!(snap.tablets().count(), 3);
    }
}
