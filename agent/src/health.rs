//! One poll of mysqld and its translation into the `Health` message. The translation is pure.

use std::time::Duration;

use flavor::{Dialect, ReplicaStatus, SemiSyncStatus, ServerVariables, ThreadState};
use myha_proto::agent as pb;
use mysql_async::Conn;
use topo::ShardRecord;

use crate::fence::TermState;
use crate::mysql::{self, MysqlError};

/// What one poll read from mysqld.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub dialect: Dialect,
    pub vars: ServerVariables,
    pub semi: SemiSyncStatus,
    pub replica: ReplicaStatus,
    /// Microseconds since the epoch from the local copy of the primary's heartbeat row.
    pub heartbeat_ts_us: Option<u64>,
}

/// MySQL error codes meaning "the heartbeat table is not there (yet)".
const ER_BAD_DB: u16 = 1049;
const ER_NO_SUCH_TABLE: u16 = 1146;

pub const HEARTBEAT_READ: &str = "SELECT ts_us FROM _myha.heartbeat WHERE id = 1";

pub async fn observe(
    conn: &mut Conn,
    dialect: Dialect,
    timeout: Duration,
) -> Result<Observation, MysqlError> {
    let rows = mysql::query_rows(conn, &dialect.variables_query(), timeout).await?;
    let vars = dialect.parse_variables(&rows)?;
    let rows = mysql::query_rows(conn, dialect.semi_sync_status_query(), timeout).await?;
    let semi = dialect.parse_semi_sync_status(&rows)?;
    let rows = mysql::query_rows(conn, dialect.replica_status_query(), timeout).await?;
    let replica = dialect.parse_replica_status(rows.first())?;
    let heartbeat_ts_us = match mysql::query_scalar(conn, HEARTBEAT_READ, timeout).await {
        Ok(v) => v.and_then(|s| s.parse::<u64>().ok()),
        Err(e) if matches!(e.server_code(), Some(ER_BAD_DB | ER_NO_SUCH_TABLE)) => None,
        Err(e) => return Err(e),
    };
    Ok(Observation {
        dialect,
        vars,
        semi,
        replica,
        heartbeat_ts_us,
    })
}

/// Static facts about this tablet that go into every health message.
#[derive(Debug, Clone)]
pub struct Identity {
    pub alias: String,
    pub keyspace: String,
    pub shard: String,
    pub cell: String,
    pub mysql_addr: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceStatus {
    pub fenced: bool,
    pub reason: String,
}

/// What the agent remembers about its mysqld's instances across polls: when the current one
/// started (kept stable: `Uptime` has whole seconds, so each poll's estimate moves by up to
/// 1 s) and when the outage that preceded it began. An orchestrator uses both to tell a replica
/// that went down after its primary was lost (its relay log discarded by the restart) from one
/// that was down already while the primary lived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceTrack {
    /// Start of the ongoing run of failed polls.
    failing_since: Option<u64>,
    /// The current instance's start, ms since the epoch; 0 unknown.
    pub started_at_ms: u64,
    /// When the outage before the current instance began; 0 when this agent did not see one
    /// (it started after, or the restart fell between two polls).
    pub outage_started_ms: u64,
}

/// What one poll says about the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstancePoll {
    /// mysqld did not answer.
    Failed,
    /// mysqld answered, with its start estimate when `Uptime` was read.
    Answered(Option<u64>),
}

impl InstanceTrack {
    /// A start estimate further than this from the known one is a new instance (a restart):
    /// `Uptime`'s whole seconds make two estimates of one start differ by up to 1 s. A mysqld
    /// that crashes within about a second of its own start and restarts is not told apart.
    pub const NEW_INSTANCE_MS: u64 = 1_100;

    /// Folds in a poll made at `polled_ms`. Failures of an instance that then answers again
    /// with the same start (a query timeout, a refused connection under load) are forgotten.
    pub fn observe(&mut self, polled_ms: u64, poll: InstancePoll) {
        match poll {
            InstancePoll::Failed => {
                self.failing_since.get_or_insert(polled_ms);
            }
            InstancePoll::Answered(started) => {
                if let Some(s) = started.filter(|s| *s > 0) {
                    let known = self.started_at_ms;
                    // A new instance: the first seen, or a start further from the known one
                    // than two estimates of one start can differ (each up to 1 s late).
                    if known == 0 || s.abs_diff(known) > Self::NEW_INSTANCE_MS {
                        if known != 0 {
                            self.outage_started_ms = self.failing_since.unwrap_or(0);
                        }
                        self.started_at_ms = s;
                    }
                }
                self.failing_since = None;
            }
        }
    }
}

pub struct HealthInputs<'a> {
    pub id: &'a Identity,
    pub poll: &'a Result<Observation, String>,
    pub terms: &'a TermState,
    pub shard: Option<&'a ShardRecord>,
    pub fence: &'a FenceStatus,
    pub etcd_connected: bool,
    pub now_us: u64,
}

fn thread_state(s: ThreadState) -> i32 {
    (match s {
        ThreadState::Stopped => pb::ThreadState::Stopped,
        ThreadState::Connecting => pb::ThreadState::Connecting,
        ThreadState::Running => pb::ThreadState::Running,
    }) as i32
}

pub fn build(i: HealthInputs<'_>) -> pb::Health {
    let is_primary = i
        .shard
        .and_then(|s| s.primary.as_deref())
        .is_some_and(|p| p == i.id.alias);
    let mut h = pb::Health {
        alias: i.id.alias.clone(),
        keyspace: i.id.keyspace.clone(),
        shard: i.id.shard.clone(),
        cell: i.id.cell.clone(),
        tablet_type: if is_primary {
            pb::TabletType::Primary
        } else {
            pb::TabletType::Replica
        } as i32,
        polled_at_ms: i.now_us / 1000,
        term: i.terms.known_term.get(),
        promoted_term: i.terms.promoted_term.get(),
        fenced: i.fence.fenced,
        fence_reason: i.fence.reason.clone(),
        etcd_connected: i.etcd_connected,
        mysql_addr: i.id.mysql_addr.clone(),
        ..Default::default()
    };
    match i.poll {
        Err(e) => {
            h.mysql_reachable = false;
            h.mysql_error = e.clone();
        }
        Ok(o) => {
            h.mysql_reachable = true;
            h.mysql = Some(pb::MysqlStatus {
                server_id: o.vars.server_id,
                server_uuid: o.vars.server_uuid.clone(),
                version: o.vars.version.clone(),
                flavor: o.dialect.name().to_string(),
                read_only: o.vars.read_only,
                super_read_only: o.vars.super_read_only,
                gtid_position: o.vars.gtid_position.clone(),
                gtid_binlog_pos: o.vars.gtid_binlog_pos.clone(),
                gtid_slave_pos: o.vars.gtid_slave_pos.clone(),
                gtid_binlog_state: o.vars.gtid_binlog_state.clone(),
                started_at_ms: o.semi.uptime_s.map_or(0, |up| {
                    (i.now_us / 1000).saturating_sub(up.saturating_mul(1000))
                }),
            });
            let r = &o.replica;
            h.replication = Some(pb::Replication {
                configured: r.configured,
                source_host: r.source_host.clone(),
                source_port: r.source_port,
                io_state: thread_state(r.io_state),
                sql_state: thread_state(r.sql_state),
                last_io_errno: r.last_io_errno,
                last_io_error: r.last_io_error.clone(),
                last_sql_errno: r.last_sql_errno,
                last_sql_error: r.last_sql_error.clone(),
                gtid_io_pos: r.gtid_io_pos.clone(),
                using_gtid: r.using_gtid,
                seconds_behind: r.seconds_behind,
            });
            h.semi_sync = Some(pb::SemiSync {
                primary_enabled: o.vars.semi_sync_primary_enabled,
                replica_enabled: o.vars.semi_sync_replica_enabled,
                primary_active: o.semi.primary_active,
                primary_clients: o.semi.primary_clients,
                primary_yes_tx: o.semi.primary_yes_tx,
                primary_no_tx: o.semi.primary_no_tx,
                primary_timeout_ms: o.vars.semi_sync_timeout_ms,
                wait_point: o.vars.semi_sync_wait_point.clone(),
                wait_no_replica: o.vars.semi_sync_wait_no_replica,
                replica_active: o.semi.replica_active,
            });
            // Lag only means something where a source is configured: on the primary the row is
            // its own, and its age says how long ago the last heartbeat was written.
            if r.configured {
                h.lag_ms = o
                    .heartbeat_ts_us
                    .map(|ts| i.now_us.saturating_sub(ts) / 1000);
            }
        }
    }
    h
}

/// Boundaries (ms) of the buckets through which `lag_ms`, `write_stalled_ms` and
/// `seconds_behind` (as ms) count for [`push_due`]: doubling from 250 ms, plus the defaults
/// elsewhere that fall between two doublings, so that a default threshold is crossed on the
/// poll that crosses it rather than up to a refresh later. Above the last one, buckets keep
/// doubling. The thresholds compared against these values and their defaults:
/// - orchestrator `isolated_primary_after` (replica lag, 1 s) and `writes_stalled_after`
///   (2 s): doublings;
/// - gateway `routing.max_replica_lag` (5 s) and `routing.ro_hard_lag` (30 s; it also ages the
///   lag by the time since the health was received): the extra 5 s and 30 s;
/// - orchestrator `planned_max_lag` (5 s): the extra 5 s, though a planned reparent compares
///   fresh `FullStatus` answers, never the pushed health;
/// - orchestrator `stalled_failover_after` has no default (off).
///
/// A configured threshold off these boundaries is crossed at most one refresh (the agent's
/// `health_interval`) late, since lag that moves within its bucket still goes out once per
/// refresh.
///
/// Below 250 ms is one bucket, zero included: a caught-up replica's lag jitters between 0 and
/// about one heartbeat interval (100 ms) with the poll's phase against the heartbeat write,
/// and a healthy primary's poll now and then catches the heartbeat write in flight for a few
/// ms; pushing on "0 vs non-zero" would push on that jitter, and nothing compares these
/// values against anything below 250 ms.
pub const LAG_BUCKET_BOUNDARIES_MS: [u64; 11] = [
    250, 500, 1_000, 2_000, 4_000, 5_000, 8_000, 16_000, 30_000, 32_000, 64_000,
];

/// The bucket of a lag-like duration in ms: 0 below the first boundary, then one more per
/// boundary reached, and one more per doubling above the last boundary.
pub fn lag_bucket(ms: u64) -> u32 {
    let reached: u32 = LAG_BUCKET_BOUNDARIES_MS
        .iter()
        .map(|b| u32::from(ms >= *b))
        .sum();
    let top = LAG_BUCKET_BOUNDARIES_MS[LAG_BUCKET_BOUNDARIES_MS.len() - 1];
    reached + (ms / top).checked_ilog2().unwrap_or(0)
}

/// `h` with what is not material for [`push_due`] taken out: poll and probe times, the
/// positions and transaction counters that move with every write, and lag-like durations
/// replaced by their bucket (`None` kept apart from every `Some`).
fn material(h: &pb::Health) -> pb::Health {
    let mut m = h.clone();
    m.polled_at_ms = 0;
    m.lag_ms = m.lag_ms.map(|l| u64::from(lag_bucket(l)));
    m.write_stalled_ms = u64::from(lag_bucket(m.write_stalled_ms));
    if let Some(s) = m.mysql.as_mut() {
        s.gtid_position.clear();
        s.gtid_binlog_pos.clear();
        s.gtid_slave_pos.clear();
        s.gtid_binlog_state.clear();
    }
    if let Some(r) = m.replication.as_mut() {
        r.gtid_io_pos.clear();
        r.seconds_behind = r
            .seconds_behind
            .map(|s| u64::from(lag_bucket(s.saturating_mul(1000))));
    }
    if let Some(s) = m.semi_sync.as_mut() {
        s.primary_yes_tx = 0;
        s.primary_no_tx = 0;
    }
    // `consecutive_failures` stays material: while the probe fails, each failed probe goes out
    // at once (about one per poll, during a fault only). Detection speed matters more than
    // message counts then: the orchestrator confirms a lost primary from these probes, each
    // fresh one re-analyses the shard, and `probed_at_ms` on it stays one poll old.
    if let Some(p) = m.primary_probe.as_mut() {
        p.probed_at_ms = 0;
        p.rtt_us = 0;
    }
    m
}

/// Whether the agent must publish `new`, given `last`, the health it last published; `refresh`
/// is its `health_interval`. Pure: the time comes from the messages' `polled_at_ms`.
///
/// - At once when anything material differs: everything but the poll and probe times, the
///   GTID positions (`MysqlStatus` gtid_position, gtid_binlog_pos, gtid_slave_pos,
///   gtid_binlog_state; `Replication` gtid_io_pos) and the semi-sync transaction counters
///   (primary_yes_tx, primary_no_tx), with `lag_ms`, `write_stalled_ms` and `seconds_behind`
///   counted only by their [`lag_bucket`] (and `None` vs `Some`). So mysqld stopping to
///   answer, read_only, the replication threads, errors, terms, fencing, the probe's verdict and
///   each failed probe go out on the poll that sees them.
/// - Otherwise, when something else changed (the primary's heartbeat moves positions and lag on
///   every poll), once `refresh` has passed since `last` was polled: positions, lag and probe
///   times on the subscribers are never older than about a refresh. Probe times count as such
///   a change: the orchestrator ages a probe by its `probed_at_ms` (`probe_stale_after`,
///   1.5 s), not by when it received it.
/// - Never when nothing but the poll time changed: the stream re-sends the current health every
///   `health_interval` anyway.
///
/// A wall clock stepped back (`new` polled before `last`) counts as a refresh due: otherwise
/// positions would stay unpublished until the clock caught up.
pub fn push_due(last: &pb::Health, new: &pb::Health, refresh: Duration) -> bool {
    if material(last) != material(new) {
        return true;
    }
    let mut unchanged = last.clone();
    unchanged.polled_at_ms = new.polled_at_ms;
    if unchanged == *new {
        return false;
    }
    new.polled_at_ms
        .checked_sub(last.polled_at_ms)
        .is_none_or(|age| Duration::from_millis(age) >= refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_keeps_its_start_and_remembers_the_outage_before_it() {
        let mut t = InstanceTrack::default();
        // Started long ago; Uptime's whole seconds make the estimate jitter.
        t.observe(100_000, InstancePoll::Answered(Some(40_000)));
        t.observe(100_100, InstancePoll::Answered(Some(40_900)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (40_000, 0));
        // A transient failure of the same instance is forgotten.
        t.observe(100_200, InstancePoll::Failed);
        t.observe(100_300, InstancePoll::Answered(Some(40_000)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (40_000, 0));
        // Down from 101_000, a new instance started at 105_000: the outage is remembered.
        t.observe(101_000, InstancePoll::Failed);
        t.observe(101_100, InstancePoll::Failed);
        t.observe(105_500, InstancePoll::Answered(Some(105_000)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (105_000, 101_000));
        // A later transient failure does not move it.
        t.observe(106_000, InstancePoll::Failed);
        t.observe(106_100, InstancePoll::Answered(Some(105_300)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (105_000, 101_000));
        // A crash and restart 1.5 s after the previous start is a new instance.
        t.observe(106_500, InstancePoll::Failed);
        t.observe(106_700, InstancePoll::Answered(Some(106_500)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (106_500, 106_500));
        // A restart between two polls: no outage seen.
        t.observe(200_100, InstancePoll::Answered(Some(200_000)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (200_000, 0));
        // Answers without Uptime change nothing but end a run of failures.
        t.observe(200_200, InstancePoll::Failed);
        t.observe(200_300, InstancePoll::Answered(None));
        t.observe(300_000, InstancePoll::Answered(Some(299_000)));
        assert_eq!((t.started_at_ms, t.outage_started_ms), (299_000, 0));
    }
    use topo::Term;

    fn id() -> Identity {
        Identity {
            alias: "zone1-102".into(),
            keyspace: "commerce".into(),
            shard: "0".into(),
            cell: "zone1".into(),
            mysql_addr: "127.0.0.1:4000".into(),
        }
    }

    fn obs(configured: bool, ts: Option<u64>) -> Observation {
        Observation {
            dialect: Dialect::MARIADB_10_11,
            vars: ServerVariables {
                server_id: 102,
                read_only: true,
                gtid_position: "0-101-9".into(),
                ..Default::default()
            },
            semi: SemiSyncStatus::default(),
            replica: ReplicaStatus {
                configured,
                io_state: ThreadState::Running,
                sql_state: ThreadState::Running,
                ..Default::default()
            },
            heartbeat_ts_us: ts,
        }
    }

    fn shard(primary: &str) -> ShardRecord {
        let mut s = ShardRecord::new("commerce", "0");
        s.primary = Some(primary.into());
        s.term = Term::new(3);
        s
    }

    #[test]
    fn replica_lag_comes_from_the_heartbeat_row() {
        let poll = Ok(obs(true, Some(1_000_000)));
        let h = build(HealthInputs {
            id: &id(),
            poll: &poll,
            terms: &TermState {
                known_term: Term::new(3),
                promoted_term: Term::ZERO,
                known_epoch: 0,
            },
            shard: Some(&shard("zone1-101")),
            fence: &FenceStatus::default(),
            etcd_connected: true,
            now_us: 1_250_000,
        });
        assert_eq!(h.lag_ms, Some(250));
        assert_eq!(h.tablet_type, pb::TabletType::Replica as i32);
        assert!(h.mysql_reachable);
        assert_eq!(h.mysql.as_ref().unwrap().gtid_position, "0-101-9");
        assert_eq!(h.term, 3);
    }

    #[test]
    fn no_lag_without_a_source_or_a_row() {
        for (configured, ts) in [(false, Some(5)), (true, None)] {
            let poll = Ok(obs(configured, ts));
            let h = build(HealthInputs {
                id: &id(),
                poll: &poll,
                terms: &TermState::default(),
                shard: Some(&shard("zone1-102")),
                fence: &FenceStatus::default(),
                etcd_connected: true,
                now_us: 10,
            });
            assert_eq!(h.lag_ms, None);
            assert_eq!(h.tablet_type, pb::TabletType::Primary as i32);
        }
    }

    #[test]
    fn unreachable_mysqld_carries_the_error() {
        let poll = Err("connect to 127.0.0.1:4000: Connection refused".to_string());
        let h = build(HealthInputs {
            id: &id(),
            poll: &poll,
            terms: &TermState::default(),
            shard: None,
            fence: &FenceStatus::default(),
            etcd_connected: false,
            now_us: 10,
        });
        assert!(!h.mysql_reachable);
        assert!(h.mysql_error.contains("refused"));
        assert!(h.mysql.is_none());
    }

    /// A healthy replica's health polled at `at_ms`: replicating, lag 40 ms, probing its
    /// primary.
    fn replica_at(at_ms: u64) -> pb::Health {
        let poll = Ok(obs(true, Some(at_ms * 1000 - 40_000)));
        let mut h = build(HealthInputs {
            id: &id(),
            poll: &poll,
            terms: &TermState::default(),
            shard: Some(&shard("zone1-101")),
            fence: &FenceStatus::default(),
            etcd_connected: true,
            now_us: at_ms * 1000,
        });
        h.primary_probe = Some(pb::PrimaryProbe {
            primary_alias: "zone1-101".into(),
            addr: "127.0.0.1:4001".into(),
            reachable: true,
            probed_at_ms: at_ms - 30,
            rtt_us: 250,
            ..Default::default()
        });
        h
    }

    const REFRESH: Duration = Duration::from_millis(500);
    const T0: u64 = 1_700_000_000_000;

    /// What the primary's heartbeat changes on every poll: positions, counters, lag within its
    /// bucket, probe times.
    fn heartbeat_moved(h: &mut pb::Health, n: u64) {
        let m = h.mysql.as_mut().unwrap();
        m.gtid_position = format!("0-101-{}", 9 + n);
        m.gtid_slave_pos = m.gtid_position.clone();
        m.gtid_binlog_pos = m.gtid_position.clone();
        m.gtid_binlog_state = m.gtid_position.clone();
        h.replication.as_mut().unwrap().gtid_io_pos = format!("0-101-{}", 10 + n);
        h.semi_sync.as_mut().unwrap().primary_yes_tx += n;
        h.semi_sync.as_mut().unwrap().primary_no_tx += n;
        h.lag_ms = Some(40 + n * 7 % 150);
        let p = h.primary_probe.as_mut().unwrap();
        p.probed_at_ms += 1;
        p.rtt_us += n;
    }

    #[test]
    fn a_material_change_pushes_on_the_poll_that_sees_it() {
        let last = replica_at(T0);
        type Change = Box<dyn Fn(&mut pb::Health)>;
        let changes: Vec<(&str, Change)> = vec![
            (
                "mysqld stops answering",
                Box::new(|h| {
                    h.mysql_reachable = false;
                    h.mysql_error = "connection refused".into();
                    h.mysql = None;
                    h.replication = None;
                    h.semi_sync = None;
                    h.lag_ms = None;
                }),
            ),
            (
                "read_only flips",
                Box::new(|h| h.mysql.as_mut().unwrap().read_only = false),
            ),
            (
                "IO thread connecting",
                Box::new(|h| {
                    h.replication.as_mut().unwrap().io_state = pb::ThreadState::Connecting as i32
                }),
            ),
            (
                "SQL thread stops with an error",
                Box::new(|h| {
                    let r = h.replication.as_mut().unwrap();
                    r.sql_state = pb::ThreadState::Stopped as i32;
                    r.last_sql_errno = 1062;
                    r.last_sql_error = "Duplicate entry".into();
                }),
            ),
            ("a newer term", Box::new(|h| h.term += 1)),
            (
                "fenced",
                Box::new(|h| {
                    h.fenced = true;
                    h.fence_reason = "term 4 names zone1-103".into();
                }),
            ),
            ("etcd lost", Box::new(|h| h.etcd_connected = false)),
            (
                "becomes the primary",
                Box::new(|h| h.tablet_type = pb::TabletType::Primary as i32),
            ),
            (
                "semi-sync falls back",
                Box::new(|h| h.semi_sync.as_mut().unwrap().primary_active = true),
            ),
            (
                "probe fails",
                Box::new(|h| {
                    let p = h.primary_probe.as_mut().unwrap();
                    p.reachable = false;
                    p.consecutive_failures = 1;
                    p.failing_since_ms = T0;
                }),
            ),
            (
                "probe of another primary",
                Box::new(|h| h.primary_probe.as_mut().unwrap().primary_alias = "zone1-103".into()),
            ),
            ("probe gone", Box::new(|h| h.primary_probe = None)),
            ("lag unmeasurable", Box::new(|h| h.lag_ms = None)),
            (
                "a write stall reaches the first bucket",
                Box::new(|h| h.write_stalled_ms = 250),
            ),
        ];
        for (what, change) in changes {
            let mut new = replica_at(T0 + 100);
            heartbeat_moved(&mut new, 1);
            change(&mut new);
            assert!(push_due(&last, &new, REFRESH), "{what}");
        }
    }

    #[test]
    fn each_failed_probe_goes_out_at_once() {
        let mut last = replica_at(T0);
        let p = last.primary_probe.as_mut().unwrap();
        (p.reachable, p.consecutive_failures, p.failing_since_ms) = (false, 1, T0 - 30);
        let mut new = last.clone();
        new.polled_at_ms += 100;
        let p = new.primary_probe.as_mut().unwrap();
        (p.consecutive_failures, p.probed_at_ms) = (2, p.probed_at_ms + 100);
        assert!(push_due(&last, &new, REFRESH));
    }

    /// Fails with the old rule (push whenever the content apart from poll and probe times
    /// differs), which pushed every poll of a replica of a primary writing its heartbeat.
    #[test]
    fn moving_positions_wait_for_the_refresh_then_go_out() {
        let last = replica_at(T0);
        for n in 1..5 {
            let mut new = replica_at(T0 + n * 100);
            heartbeat_moved(&mut new, n);
            assert!(!push_due(&last, &new, REFRESH), "{n} polls later");
        }
        let mut new = replica_at(T0 + 500);
        heartbeat_moved(&mut new, 5);
        assert!(push_due(&last, &new, REFRESH));
    }

    #[test]
    fn probe_times_alone_go_out_once_per_refresh() {
        let last = replica_at(T0);
        let mut new = last.clone();
        new.polled_at_ms += 400;
        new.primary_probe.as_mut().unwrap().probed_at_ms += 400;
        assert!(!push_due(&last, &new, REFRESH));
        new.polled_at_ms += 100;
        new.primary_probe.as_mut().unwrap().probed_at_ms += 100;
        assert!(push_due(&last, &new, REFRESH));
    }

    #[test]
    fn lag_crossing_a_bucket_boundary_pushes_at_once() {
        for (from, to) in [
            (240, 260),
            (990, 1_000),
            (1_000, 999),
            (1_999, 2_000),
            (4_900, 5_000),
            (29_999, 30_000),
            (64_000, 130_000),
        ] {
            let mut last = replica_at(T0);
            last.lag_ms = Some(from);
            let mut new = replica_at(T0 + 100);
            new.lag_ms = Some(to);
            assert!(push_due(&last, &new, REFRESH), "{from} -> {to}");
            // The same for seconds_behind (seconds) and a primary's write stall.
            let (mut last_w, mut new_w) = (last.clone(), new.clone());
            last_w.write_stalled_ms = from;
            new_w.write_stalled_ms = to;
            new_w.lag_ms = last_w.lag_ms;
            assert!(push_due(&last_w, &new_w, REFRESH), "stall {from} -> {to}");
        }
        let mut last = replica_at(T0);
        last.replication.as_mut().unwrap().seconds_behind = Some(0);
        let mut new = replica_at(T0 + 100);
        new.replication.as_mut().unwrap().seconds_behind = Some(1);
        assert!(push_due(&last, &new, REFRESH));
        new.replication.as_mut().unwrap().seconds_behind = None;
        assert!(push_due(&last, &new, REFRESH));
    }

    #[test]
    fn lag_within_its_bucket_waits_for_the_refresh() {
        for (from, to) in [
            (0, 40),
            (40, 249),
            (250, 499),
            (2_000, 3_999),
            (8_000, 15_000),
        ] {
            let mut last = replica_at(T0);
            last.lag_ms = Some(from);
            last.write_stalled_ms = from;
            let mut new = replica_at(T0 + 100);
            new.lag_ms = Some(to);
            new.write_stalled_ms = to;
            assert!(!push_due(&last, &new, REFRESH), "{from} -> {to}");
            new.polled_at_ms = T0 + 500;
            assert!(
                push_due(&last, &new, REFRESH),
                "{from} -> {to} after the refresh"
            );
        }
    }

    /// A stall counts from 250 ms: a routine heartbeat write caught in flight (a few ms) is
    /// not a change worth a push.
    #[test]
    fn a_write_stall_pushes_from_its_first_bucket() {
        let mut last = replica_at(T0);
        last.tablet_type = pb::TabletType::Primary as i32;
        let mut new = last.clone();
        new.polled_at_ms += 100;
        new.write_stalled_ms = 4;
        assert!(!push_due(&last, &new, REFRESH));
        new.write_stalled_ms = 250;
        assert!(push_due(&last, &new, REFRESH));
        // Back to none pending, from the first bucket on: at once too.
        assert!(push_due(&new, &last, REFRESH));
    }

    #[test]
    fn identical_content_never_pushes() {
        let last = replica_at(T0);
        for later in [100, 500, 60_000] {
            let mut new = last.clone();
            new.polled_at_ms += later;
            assert!(!push_due(&last, &new, REFRESH), "{later} ms later");
        }
    }

    #[test]
    fn a_clock_stepped_back_does_not_hold_positions_back() {
        let last = replica_at(T0);
        let mut new = replica_at(T0 - 60_000);
        heartbeat_moved(&mut new, 1);
        assert!(push_due(&last, &new, REFRESH));
    }

    #[test]
    fn buckets_double_from_250_ms_with_the_default_thresholds_between() {
        let b = lag_bucket;
        assert_eq!((b(0), b(249), b(250), b(499), b(500)), (0, 0, 1, 1, 2));
        assert_eq!((b(999), b(1_000), b(2_000), b(4_000)), (2, 3, 4, 5));
        assert_eq!((b(4_999), b(5_000), b(7_999), b(8_000)), (5, 6, 6, 7));
        assert_eq!((b(29_999), b(30_000), b(32_000), b(64_000)), (8, 9, 10, 11));
        assert_eq!((b(127_999), b(128_000), b(256_000)), (11, 12, 13));
        assert_eq!(b(u64::MAX), 11 + (u64::MAX / 64_000).ilog2());
    }
}
