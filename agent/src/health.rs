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

/// Equal apart from the poll and probe times: used to push only on change.
pub fn same_content(a: &pb::Health, b: &pb::Health) -> bool {
    let mut a = a.clone();
    a.polled_at_ms = b.polled_at_ms;
    if let (Some(pa), Some(pb)) = (a.primary_probe.as_mut(), b.primary_probe.as_ref()) {
        pa.probed_at_ms = pb.probed_at_ms;
        pa.rtt_us = pb.rtt_us;
    }
    a == *b
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

    #[test]
    fn content_comparison_ignores_poll_time() {
        let poll = Ok(obs(false, None));
        let mk = |now| {
            build(HealthInputs {
                id: &id(),
                poll: &poll,
                terms: &TermState::default(),
                shard: None,
                fence: &FenceStatus::default(),
                etcd_connected: true,
                now_us: now,
            })
        };
        assert!(same_content(&mk(1_000), &mk(9_000)));
        let mut other = mk(1_000);
        other.term = 9;
        assert!(!same_content(&mk(1_000), &other));
    }
}
