//! The mutating actions a reparent needs. Each one: admits the caller's term (refusing a
//! stale one), runs alone (one action at a time per agent), is bounded by its deadline with
//! every step bounded by what is left of it, and is idempotent.

use std::sync::Arc;
use std::time::Duration;
use topo::Term;

use flavor::{Dialect, Scope, SourceSpec};
use myha_proto::agent as pb;
use mysql_async::Conn;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use topo::Durability;
use tracing::info;

use crate::agent::{ActionState, DemoteMemo, Shared, UndoStep};
use crate::fence::StaleTerm;
use crate::health::FenceStatus;
use crate::mysql::{self, MysqlError};

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{action}: {source}")]
    StaleTerm {
        action: &'static str,
        source: StaleTerm,
        /// The refused request's lock epoch (for the structured refusal).
        epoch: u64,
    },
    #[error("{action}: invalid request: {reason}")]
    Invalid {
        action: &'static str,
        reason: String,
    },
    #[error("{action}: refused: {reason}")]
    Refused {
        action: &'static str,
        reason: String,
    },
    #[error("{action}: deadline of {timeout:?} exceeded during step `{step}`")]
    Deadline {
        action: &'static str,
        step: String,
        timeout: Duration,
    },
    #[error("{action}: step `{step}` failed: {source}")]
    Mysql {
        action: &'static str,
        step: String,
        source: Box<MysqlError>,
    },
}

impl From<ActionError> for tonic::Status {
    fn from(e: ActionError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            ActionError::StaleTerm { source, epoch, .. } => {
                myha_proto::stale_term_status(msg, source.refusal(epoch))
            }
            ActionError::Refused { .. } => tonic::Status::failed_precondition(msg),
            ActionError::Invalid { .. } => tonic::Status::invalid_argument(msg),
            ActionError::Deadline { .. } => tonic::Status::deadline_exceeded(msg),
            ActionError::Mysql { source, .. } => match *source {
                MysqlError::Connect { .. } | MysqlError::ConnectTimeout { .. } => {
                    tonic::Status::unavailable(msg)
                }
                _ => tonic::Status::aborted(msg),
            },
        }
    }
}

/// One running action: holds the action lock, a connection, the deadline and the steps so far.
pub struct Exec {
    pub action: &'static str,
    shared: Arc<Shared>,
    pub state: OwnedMutexGuard<ActionState>,
    conn: Conn,
    pub dialect: Dialect,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    pub steps: Vec<String>,
    pub term: u64,
    /// What the IO thread had received, reported in the answer (StopReplication).
    received: String,
}

/// Reads the shard's reserved term and lock holder from etcd (linearizable reads, bounded by
/// `within`): what [`crate::fence::check_caller`] decides on.
async fn caller_view(
    shared: &Arc<Shared>,
    within: Duration,
) -> Result<crate::fence::CallerView, String> {
    let topo = shared
        .topo()
        .ok_or_else(|| "the agent is not connected to etcd".to_string())?
        .with_op_timeout(within.min(Duration::from_secs(2)));
    let (ks, shard) = (&shared.cfg.tablet.keyspace, &shared.cfg.tablet.shard);
    let (record, holder) =
        tokio::join!(topo.get_shard(ks, shard), topo.lock_holder_epoch(ks, shard));
    let reserved = record
        .map_err(|e| e.to_string())?
        .map(|(r, _)| r.term.max(r.reserved_term))
        .unwrap_or(Term::ZERO);
    let holder = holder
        .map_err(|e| e.to_string())?
        .map(|(epoch, info)| (epoch, info.holder));
    Ok(crate::fence::CallerView { reserved, holder })
}

impl Exec {
    pub async fn begin(
        shared: &Arc<Shared>,
        action: &'static str,
        ctx: Option<&pb::ActionContext>,
    ) -> Result<Exec, ActionError> {
        let started = Instant::now();
        let ctx = ctx.cloned().unwrap_or_default();
        let timeout = if ctx.timeout_ms == 0 {
            shared.cfg.agent.action_timeout
        } else {
            Duration::from_millis(ctx.timeout_ms)
        };
        let deadline = started + timeout;
        let deadline_err = |step: &str| ActionError::Deadline {
            action,
            step: step.to_string(),
            timeout,
        };
        let state = tokio::time::timeout_at(deadline, shared.actions.clone().lock_owned())
            .await
            .map_err(|_| deadline_err("wait for the previous action to finish"))?;
        // Only the shard lock's holder named in etcd acts, and a term more than one ahead must
        // be reserved there (`fence::check_caller`). The linearizable reads run while the
        // MySQL connection is opened, so they cost the failover path nothing when etcd answers
        // faster than mysqld's handshake.
        let known = shared.terms().known_term;
        let term = Term::new(ctx.term);
        let left = deadline.saturating_duration_since(Instant::now());
        let (view, conn) = tokio::join!(
            caller_view(shared, left),
            tokio::time::timeout_at(deadline, shared.connect())
        );
        let view = view.map_err(|why| ActionError::Refused {
            action,
            reason: format!(
                "etcd cannot confirm that the caller (lock epoch {}) holds the shard lock: {why}",
                ctx.lock_epoch
            ),
        })?;
        crate::fence::check_caller(term, ctx.lock_epoch, known, &view)
            .map_err(|reason| ActionError::Refused { action, reason })?;
        if term > known.next() {
            info!(
                action,
                term = ctx.term,
                epoch = ctx.lock_epoch,
                "term jump confirmed in etcd"
            );
        }
        // Admit only once we run: a term may have moved on while we queued.
        shared
            .update_terms(|t| t.admit(term, ctx.lock_epoch))
            .map_err(|source| ActionError::StaleTerm {
                action,
                source,
                epoch: ctx.lock_epoch,
            })?;
        let (conn, dialect) = conn
            .map_err(|_| deadline_err("connect to mysqld"))?
            .map_err(|source| ActionError::Mysql {
                action,
                step: "connect to mysqld".into(),
                source: Box::new(source),
            })?;
        info!(action, term = ctx.term, epoch = ctx.lock_epoch, requester = %ctx.requester, "action started");
        Ok(Exec {
            action,
            shared: shared.clone(),
            state,
            conn,
            dialect,
            started,
            deadline,
            timeout,
            steps: Vec::new(),
            term: ctx.term,
            received: String::new(),
        })
    }

    fn remaining(&self, step: &str) -> Result<Duration, ActionError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.deadline_err(step));
        }
        Ok(left)
    }

    fn deadline_err(&self, step: &str) -> ActionError {
        ActionError::Deadline {
            action: self.action,
            step: step.to_string(),
            timeout: self.timeout,
        }
    }

    fn map_err(&self, step: &str, source: MysqlError) -> ActionError {
        match source {
            MysqlError::QueryTimeout { .. } => self.deadline_err(step),
            source => ActionError::Mysql {
                action: self.action,
                step: step.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// Refuses an action that would make mysqld writable while the isolation rule holds,
    /// judged now from the isolation loop's last probe of the peers (at most a tick old).
    pub fn refuse_writable_if_isolated(&self) -> Result<(), ActionError> {
        match self.shared.isolation_holds() {
            Some(reason) => Err(ActionError::Refused {
                action: self.action,
                reason: format!("not made writable while the isolation rule holds: {reason}"),
            }),
            None => Ok(()),
        }
    }

    /// Runs one statement as a named step.
    pub async fn sql(&mut self, step: &str, sql: &str) -> Result<(), ActionError> {
        let left = self.remaining(step)?;
        mysql::exec(&mut self.conn, sql, left)
            .await
            .map_err(|e| self.map_err(step, e))?;
        self.steps.push(step.to_string());
        Ok(())
    }

    pub async fn sqls(&mut self, step: &str, sqls: &[String]) -> Result<(), ActionError> {
        let left = self.remaining(step)?;
        for s in sqls {
            mysql::exec(&mut self.conn, s, left)
                .await
                .map_err(|e| self.map_err(step, e))?;
        }
        self.steps.push(step.to_string());
        Ok(())
    }

    pub async fn scalar(&mut self, step: &str, sql: &str) -> Result<Option<String>, ActionError> {
        let left = self.remaining(step)?;
        mysql::query_scalar(&mut self.conn, sql, left)
            .await
            .map_err(|e| self.map_err(step, e))
    }

    /// Stops replication threads without MariaDB's 2 s wait on an IO thread blocked on a frozen
    /// source: its session is killed first (closing its socket), then the regular stop runs.
    pub async fn stop_threads(&mut self, step: &str, scope: Scope) -> Result<(), ActionError> {
        if let Some(q) = self.dialect.io_thread_sessions_query() {
            let left = self.remaining(step)?;
            let rows = mysql::query_rows(&mut self.conn, q, left)
                .await
                .map_err(|e| self.map_err(step, e))?;
            let ids: Vec<u64> = rows
                .iter()
                .filter_map(|r| r.get("ID").cloned().flatten())
                .filter_map(|v| v.parse::<u64>().ok())
                .collect();
            for id in &ids {
                let kill = self.dialect.kill_connection(*id);
                match mysql::exec(&mut self.conn, &kill, left).await {
                    // 1094: the thread ended by itself meanwhile.
                    Err(e) if e.server_code() != Some(1094) => return Err(self.map_err(step, e)),
                    _ => {}
                }
            }
            // A STOP issued while the killed thread is still exiting can miss its wake-up and
            // wait a full 2 s round: let the thread go first (bounded; STOP follows regardless).
            let started = tokio::time::Instant::now();
            let gone_by = started + Duration::from_millis(250);
            let mut lingering = Vec::new();
            while !ids.is_empty() {
                let left = self.remaining(step)?;
                let still = mysql::query_rows(&mut self.conn, q, left)
                    .await
                    .map_err(|e| self.map_err(step, e))?;
                if still.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= gone_by {
                    lingering = still;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(state) = lingering
                .first()
                .map(|r| r.get("STATE").cloned().flatten().unwrap_or_default())
            {
                self.note(format!(
                    "killed IO thread still exiting after {:?} (state: {state})",
                    started.elapsed()
                ));
            }
            // A killed IO thread leaves its blocking read and goes on to reconnect (or stop); a
            // STOP that arrives while it is still in that read can wait a full 2 s round, one
            // that arrives after is immediate. Measured here: 2 s in ~20 % of frozen-source
            // failovers without this wait, none with it. Neither the PROCESSLIST row (gone at
            // once) nor SHOW SLAVE STATUS (still "Yes" / "Waiting for master to send event"
            // for over 600 ms) tells when the thread is out of the read, so on MariaDB 10.11
            // this loop in practice runs to its bound. Measured on an idle replica: STOP sent
            // in the same session right after the KILL took 2.0 s in 8 of 8 tries, 0.5-50 ms
            // after it ~1 ms in 56 of 56; a shorter bound is safe only if the IO thread is
            // scheduled within it, which a loaded host does not promise.
            if !ids.is_empty() {
                let until = tokio::time::Instant::now() + Duration::from_millis(250);
                loop {
                    let st = self.replica_status().await?;
                    if st.io_state == flavor::ThreadState::Stopped && scope == Scope::IoOnly {
                        self.note(format!("{step}: IO thread killed and stopped"));
                        return Ok(());
                    }
                    if st.io_state != flavor::ThreadState::Running {
                        break;
                    }
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let sql = self.dialect.stop_replication(scope);
        self.sql(step, &sql).await
    }

    pub async fn replica_status(&mut self) -> Result<flavor::ReplicaStatus, ActionError> {
        let step = "read replication status";
        let left = self.remaining(step)?;
        let rows = mysql::query_rows(&mut self.conn, self.dialect.replica_status_query(), left)
            .await
            .map_err(|e| self.map_err(step, e))?;
        self.dialect
            .parse_replica_status(rows.first())
            .map_err(|e| self.map_err(step, e.into()))
    }

    pub async fn variables(&mut self) -> Result<flavor::ServerVariables, ActionError> {
        let step = "read server variables";
        let left = self.remaining(step)?;
        let rows = mysql::query_rows(&mut self.conn, &self.dialect.variables_query(), left)
            .await
            .map_err(|e| self.map_err(step, e))?;
        self.dialect
            .parse_variables(&rows)
            .map_err(|e| self.map_err(step, e.into()))
    }

    pub fn note(&mut self, step: impl Into<String>) {
        self.steps.push(step.into());
    }

    /// Ends the action: reads the position, wakes the poller, reports.
    pub async fn finish(mut self) -> Result<pb::ActionResponse, ActionError> {
        let gtid_position = self.variables().await?.gtid_position;
        let term = self.shared.terms().known_term;
        let duration = self.started.elapsed();
        info!(action = self.action, steps = ?self.steps, ?duration, "action done");
        metrics::counter!("myha_agent_actions_total", "action" => self.action, "outcome" => "ok")
            .increment(1);
        metrics::histogram!("myha_agent_action_seconds", "action" => self.action)
            .record(duration.as_secs_f64());
        self.shared.poke.notify_one();
        Ok(pb::ActionResponse {
            steps: self.steps,
            gtid_position,
            term: term.get(),
            duration_us: duration.as_micros() as u64,
            gtid_received: self.received,
        })
    }
}

fn scope(s: i32) -> Scope {
    if s == pb::ReplicationScope::IoOnly as i32 {
        Scope::IoOnly
    } else {
        Scope::Both
    }
}

pub async fn stop_replication(
    shared: &Arc<Shared>,
    req: pb::StopReplicationRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "StopReplication", req.ctx.as_ref()).await?;
    let sc = scope(req.scope);
    let st = x.replica_status().await?;
    if !st.configured {
        x.note("no replication configured: nothing to stop");
    } else {
        let step = x.dialect.stop_replication(sc).to_lowercase();
        x.stop_threads(&step, sc).await?;
        // Read after the stop: nothing more can arrive, so this is final for a dead source.
        x.received = x.replica_status().await?.gtid_io_pos;
    }
    x.finish().await
}

pub async fn start_replication(
    shared: &Arc<Shared>,
    req: pb::StartReplicationRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "StartReplication", req.ctx.as_ref()).await?;
    let st = x.replica_status().await?;
    if !st.configured {
        return Err(ActionError::Refused {
            action: x.action,
            reason: "no replication source configured".into(),
        });
    }
    let sql = x.dialect.start_replication(scope(req.scope));
    x.sql(&sql.to_lowercase(), &sql).await?;
    x.finish().await
}

pub async fn wait_for_position(
    shared: &Arc<Shared>,
    req: pb::WaitForPositionRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "WaitForPosition", req.ctx.as_ref()).await?;
    let flavor = x.dialect.flavor;
    if let Err(e) = gtid::GtidSet::parse(flavor, &req.gtid_position) {
        return Err(ActionError::Invalid {
            action: x.action,
            reason: format!("gtid_position: {e}"),
        });
    }
    if req.lift_delay {
        lift_delay(&mut x).await?;
    }
    let step = format!("wait until {} is applied", req.gtid_position);
    // Leave a little of the deadline to answer in.
    let left = x
        .remaining(&step)?
        .saturating_sub(Duration::from_millis(50));
    let sql = x
        .dialect
        .wait_for_position(&req.gtid_position, left.as_secs_f64());
    let v = x.scalar(&step, &sql).await?;
    if !x.dialect.wait_reached(v.as_deref()) {
        let at = x.variables().await?.gtid_position;
        return Err(ActionError::Deadline {
            action: x.action,
            step: format!("{step} (still at {at})"),
            timeout: x.timeout,
        });
    }
    x.note(step);
    x.finish().await
}

/// A delayed replica (MASTER_DELAY) holds received transactions it will apply only later; a
/// reparent that needs them applies them now. The SQL thread is restarted without the delay, from
/// where it stopped in the relay log, which is kept (see [`flavor::Dialect::lift_apply_delay`]:
/// a plain `CHANGE MASTER TO MASTER_DELAY = 0` would delete it under GTID mode). The delay is not
/// restored here: a reparent promotes or repoints this replica next, and the tablet's own
/// configuration sets it again.
async fn lift_delay(x: &mut Exec) -> Result<(), ActionError> {
    let st = x.replica_status().await?;
    if !st.configured || st.sql_delay_secs == 0 {
        return Ok(());
    }
    if st.io_state != flavor::ThreadState::Stopped {
        return Err(ActionError::Refused {
            action: x.action,
            reason: format!(
                "lifting the replication delay ({} s) needs the IO thread stopped; it is {:?}",
                st.sql_delay_secs, st.io_state
            ),
        });
    }
    x.stop_threads("stop the SQL thread to lift the delay", Scope::Both)
        .await?;
    // Read after the stop: where the SQL thread will resume.
    let at = x.replica_status().await?;
    if at.relay_log_file.is_empty() || at.relay_log_pos == 0 {
        return Err(ActionError::Refused {
            action: x.action,
            reason: format!(
                "cannot lift the replication delay without losing the relay log: no relay log position (`{}`:{})",
                at.relay_log_file, at.relay_log_pos
            ),
        });
    }
    let sql = x
        .dialect
        .lift_apply_delay(&at.relay_log_file, at.relay_log_pos);
    x.sql(
        &format!(
            "lift the replication delay of {} s, keeping the relay log from {}:{}",
            st.sql_delay_secs, at.relay_log_file, at.relay_log_pos
        ),
        &sql,
    )
    .await?;
    let sql = x.dialect.start_sql_thread();
    x.sql("start the SQL thread", sql).await
}

/// Never reset replication past a received-but-unapplied transaction (replication stopped): the
/// reset discards the relay log, and one of its transactions may be the only copy of an
/// acknowledged write. The caller applies it first (WaitForPosition on the received position).
/// Returns the server variables it read (the executed position among them).
async fn refuse_unapplied_relay_log(x: &mut Exec) -> Result<flavor::ServerVariables, ActionError> {
    let received = x.replica_status().await?.gtid_io_pos;
    let vars = x.variables().await?;
    let executed = vars.gtid_position.clone();
    let reason = match unapplied(x.dialect, &received, &executed) {
        Ok(None) => return Ok(vars),
        Ok(Some(missing)) => format!(
            "the relay log holds received transactions not applied yet ({missing}; received {received}, applied {executed}): apply them first"
        ),
        Err(e) => format!("cannot tell whether the relay log holds unapplied transactions: {e}"),
    };
    Err(ActionError::Refused {
        action: x.action,
        reason,
    })
}

/// A replica's relay log that holds transactions not yet applied: promoting or resetting it would
/// throw them away, and one of them may be the only copy of an acknowledged write. `None` when
/// everything received is applied.
pub fn unapplied(
    dialect: Dialect,
    received: &str,
    executed: &str,
) -> Result<Option<String>, String> {
    if received.trim().is_empty() {
        return Ok(None);
    }
    let parse = |what: &str, s: &str| {
        gtid::GtidSet::parse(dialect.flavor, s).map_err(|e| format!("{what} `{s}`: {e}"))
    };
    let r = parse("received position", received)?;
    let e = parse("executed position", executed)?;
    if e.contains_set(&r).map_err(|e| e.to_string())? {
        return Ok(None);
    }
    let missing = r.difference(&e).map_err(|e| e.to_string())?;
    Ok(Some(missing.to_string()))
}

pub async fn set_read_only(
    shared: &Arc<Shared>,
    req: pb::SetReadOnlyRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "SetReadOnly", req.ctx.as_ref()).await?;
    if !req.read_only {
        x.refuse_writable_if_isolated()?;
    }
    let sqls = x.dialect.set_read_only(req.read_only, req.super_read_only);
    let step = if req.read_only {
        "set read_only on"
    } else {
        "set read_only off"
    };
    x.sqls(step, &sqls).await?;
    x.finish().await
}

pub async fn set_replication_source(
    shared: &Arc<Shared>,
    req: pb::SetReplicationSourceRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "SetReplicationSource", req.ctx.as_ref()).await?;
    let port = u16::try_from(req.port).ok().filter(|p| *p != 0);
    let (host, port) = match (req.host.trim(), port) {
        ("", _) | (_, None) => {
            return Err(ActionError::Invalid {
                action: x.action,
                reason: format!(
                    "source `{}:{}` needs a host and a port 1-65535",
                    req.host, req.port
                ),
            })
        }
        (h, Some(p)) => (h.to_string(), p),
    };
    let st = x.replica_status().await?;
    let vars = x.variables().await?;
    let same_source = st.configured && st.source_host == host && st.source_port == u32::from(port);
    let running = st.replicating();
    if same_source
        && (running || !req.start_replication)
        && vars.semi_sync_replica_enabled == req.semi_sync
        && !vars.semi_sync_primary_enabled
    {
        x.note(format!("already replicating from {host}:{port}"));
    } else {
        if st.configured {
            x.stop_threads("stop replication", Scope::Both).await?;
        }
        if vars.semi_sync_primary_enabled {
            let sqls = x.dialect.set_semi_sync_primary(false, 0);
            x.sqls("disable semi-sync primary side", &sqls).await?;
        }
        let sql = x.dialect.set_semi_sync_replica(req.semi_sync);
        x.sql(
            if req.semi_sync {
                "enable semi-sync replica side"
            } else {
                "disable semi-sync replica side"
            },
            &sql,
        )
        .await?;
        let spec = SourceSpec {
            host: host.clone(),
            port,
            user: shared.cfg.mysql.repl_user.clone(),
            password: shared.cfg.mysql.repl_password.expose().to_string(),
            connect_retry_secs: 1,
            heartbeat_period_secs: 0.5,
        };
        let tls = shared.cfg.mysql.replication_tls();
        let sqls = x.dialect.change_source_tls(&spec, tls.as_ref());
        x.sqls(&format!("point replication at {host}:{port}"), &sqls)
            .await?;
        if req.start_replication {
            let sql = x.dialect.start_replication(Scope::Both);
            x.sql("start replication", &sql).await?;
        }
    }
    // A tablet replicating from someone is no longer a promoted primary.
    shared.update_terms(|t| t.promoted_term = Term::ZERO);
    shared.set_fence_status(FenceStatus::default());
    x.state.demote = None;
    x.finish().await
}

pub async fn reset_replication(
    shared: &Arc<Shared>,
    req: pb::ResetReplicationRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "ResetReplication", req.ctx.as_ref()).await?;
    let st = x.replica_status().await?;
    if st.configured {
        x.stop_threads("stop replication", Scope::Both).await?;
        refuse_unapplied_relay_log(&mut x).await?;
        let sql = x.dialect.reset_replication_all().to_string();
        x.sql("reset replication", &sql).await?;
    } else {
        x.note("no replication configured: nothing to reset");
    }
    x.finish().await
}

pub async fn set_semi_sync(
    shared: &Arc<Shared>,
    req: pb::SetSemiSyncRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "SetSemiSync", req.ctx.as_ref()).await?;
    if req.primary.is_none() && req.replica.is_none() {
        return Err(ActionError::Invalid {
            action: x.action,
            reason: "set `primary` and/or `replica`".into(),
        });
    }
    // Replica side first: a primary enabled before its replicas ack would block every commit.
    if let Some(on) = req.replica {
        let sql = x.dialect.set_semi_sync_replica(on);
        x.sql(&format!("semi-sync replica side {}", onoff(on)), &sql)
            .await?;
        let st = x.replica_status().await?;
        // The replica flag only takes effect when the IO thread reconnects.
        if st.configured && st.io_state != flavor::ThreadState::Stopped {
            x.stop_threads("stop IO thread", Scope::IoOnly).await?;
            let start = x.dialect.start_replication(Scope::IoOnly);
            x.sql("start IO thread", &start).await?;
        }
    }
    if let Some(on) = req.primary {
        let sqls = x.dialect.set_semi_sync_primary(on, semi_timeout_ms(shared));
        x.sqls(&format!("semi-sync primary side {}", onoff(on)), &sqls)
            .await?;
    }
    x.finish().await
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn semi_timeout_ms(shared: &Shared) -> u64 {
    u64::try_from(shared.cfg.agent.semi_sync_timeout.as_millis()).unwrap_or(u64::MAX)
}

pub async fn promote(
    shared: &Arc<Shared>,
    req: pb::PromoteRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "Promote", req.ctx.as_ref()).await?;
    // One term, one primary: a promotion at a term the shard record already gave to another
    // tablet comes from an orchestrator that lost the shard (e.g. frozen past its lock).
    let owner = shared
        .shard
        .borrow()
        .clone()
        .filter(|s| s.term >= Term::new(x.term))
        .and_then(|s| s.primary.map(|p| (p, s.term)))
        .filter(|(p, _)| *p != shared.id.alias);
    if let Some((p, t)) = owner {
        return Err(ActionError::Refused {
            action: x.action,
            reason: format!(
                "term {} is not newer than term {t}, which belongs to primary {p}",
                x.term
            ),
        });
    }
    let durability = match pb::Durability::try_from(req.durability) {
        Ok(pb::Durability::None) => Durability::None,
        Ok(pb::Durability::SemiSync) => Durability::SemiSync,
        _ => shared.durability().ok_or_else(|| ActionError::Refused {
            action: "Promote",
            reason: "durability not given and the keyspace record is not known yet".into(),
        })?,
    };
    // The promotion goes on record (one etcd write) while replication is reset and semi-sync set,
    // from the position read once replication is stopped and the relay log found applied (the
    // reparent applied it before sending Promote): the one the term starts from. The write is
    // awaited before mysqld becomes writable. Without etcd nothing is changed at all.
    let Some(topo) = shared.topo() else {
        return Err(ActionError::Refused {
            action: "Promote",
            reason: format!("{RECORD_STEP}: not connected to etcd; not made writable"),
        });
    };
    let st = x.replica_status().await?;
    let recording = if st.configured {
        x.stop_threads("stop replication", Scope::Both).await?;
        // Replication stopped and everything received applied: the position the term starts
        // from. Its record is written while the reset and the semi-sync steps run.
        let vars = refuse_unapplied_relay_log(&mut x).await?;
        let recording = start_recording_promotion(shared, topo, &x, &req, &vars);
        let sql = x.dialect.reset_replication_all().to_string();
        x.sql("reset replication", &sql).await?;
        recording
    } else {
        x.note("no replication configured");
        let vars = x.variables().await?;
        start_recording_promotion(shared, topo, &x, &req, &vars)
    };
    let sql = x.dialect.set_semi_sync_replica(false);
    x.sql("semi-sync replica side off", &sql).await?;
    let semi = durability == Durability::SemiSync;
    let sqls = x
        .dialect
        .set_semi_sync_primary(semi, semi_timeout_ms(shared));
    x.sqls(
        if semi {
            "semi-sync primary side on (AFTER_SYNC, no async fallback)"
        } else {
            "semi-sync primary side off"
        },
        &sqls,
    )
    .await?;
    finish_recording_promotion(&mut x, recording).await?;
    let sqls = x.dialect.set_read_only(false, false);
    x.sqls("set read_only off", &sqls).await?;
    let term = x.term;
    shared.update_terms(|t| t.promoted_term = t.promoted_term.max(Term::new(term)));
    shared.set_fence_status(FenceStatus::default());
    x.state.demote = None;
    x.note(format!("promoted under term {term}"));
    x.finish().await
}

/// The writer id of a server: what its GTIDs are tagged with.
pub fn writer_id(dialect: &flavor::Dialect, v: &flavor::ServerVariables) -> String {
    match dialect.flavor {
        flavor::Flavor::MySql => v.server_uuid.clone(),
        _ => v.server_id.to_string(),
    }
}

/// The shard-history write of a promotion in flight, and the `at_ms` it was sent with.
type Recording = (
    tokio::task::JoinHandle<topo::Result<topo::PromotionRecord>>,
    u64,
);

const RECORD_STEP: &str = "record the promotion in the shard history";

/// Starts recording the promotion in the shard's history (create-only: one term, one tablet),
/// from the position in `v`. Without etcd the promotion is refused before anything changes
/// (see `promote`): a primary whose promotion is not on record could not be told apart from a
/// stale one, and an agent cut from etcd could not learn of its own deposition either.
fn start_recording_promotion(
    shared: &Arc<Shared>,
    topo: topo::Topo,
    x: &Exec,
    req: &pb::PromoteRequest,
    v: &flavor::ServerVariables,
) -> Recording {
    let rec = topo::PromotionRecord {
        keyspace: shared.id.keyspace.clone(),
        shard: shared.id.shard.clone(),
        term: Term::new(x.term),
        primary: shared.id.alias.clone(),
        writer: writer_id(&x.dialect, v),
        position: v.gtid_position.clone(),
        at_ms: topo::now_ms(),
        by: req
            .ctx
            .as_ref()
            .map(|c| c.requester.clone())
            .unwrap_or_default(),
        lock_epoch: req.ctx.as_ref().map_or(0, |c| c.lock_epoch),
        // This agent runs the isolation rule (agent::isolation_loop) whenever it is primary.
        self_demotes: true,
    };
    let at_ms = rec.at_ms;
    (
        tokio::spawn(async move { topo.record_promotion(&rec).await }),
        at_ms,
    )
}

/// Waits for the history write (within the action's deadline) before mysqld becomes writable;
/// a term already given to another tablet refuses the promotion.
async fn finish_recording_promotion(
    x: &mut Exec,
    (recording, at_ms): Recording,
) -> Result<(), ActionError> {
    let refuse = |reason: String| ActionError::Refused {
        action: "Promote",
        reason,
    };
    let left = x.remaining(RECORD_STEP)?;
    match tokio::time::timeout(left, recording).await {
        Err(_) => Err(x.deadline_err(RECORD_STEP)),
        Ok(Err(e)) => Err(refuse(format!("{RECORD_STEP}: {e}; not made writable"))),
        Ok(Ok(Err(e))) => Err(refuse(format!("{RECORD_STEP}: {e}; not made writable"))),
        Ok(Ok(Ok(r))) if r.at_ms != at_ms => {
            x.note(format!("promotion of term {} already on record", r.term));
            Ok(())
        }
        Ok(Ok(Ok(r))) => {
            x.note(format!(
                "promotion recorded: term {} from position {}",
                r.term, r.position
            ));
            Ok(())
        }
    }
}

/// Fences another mysqld (a deposed primary whose agent is gone) over MySQL with this agent's
/// credentials; its session is killed before read-only is set, so a commit waiting for acks
/// cannot hold `SET GLOBAL read_only` up.
pub async fn fence_server(
    shared: &Arc<Shared>,
    req: pb::FenceServerRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "FenceServer", req.ctx.as_ref()).await?;
    let port = u16::try_from(req.port).map_err(|_| ActionError::Invalid {
        action: "FenceServer",
        reason: format!("port {} out of range", req.port),
    })?;
    if req.host.is_empty() {
        return Err(ActionError::Invalid {
            action: "FenceServer",
            reason: "no host".into(),
        });
    }
    let step = format!("fence {} at {}:{port}", req.alias, req.host);
    let left = x.remaining(&step)?;
    let ep = shared.endpoint.towards(&req.host, port, left);
    let dialect = x.dialect;
    let fenced = async {
        let mut c = ep.connect().await?;
        let killed = crate::agent::fence_over(&mut c, dialect, left).await;
        let _ = c.disconnect().await;
        killed
    };
    match tokio::time::timeout(left, fenced).await {
        Err(_) => Err(x.deadline_err(&step)),
        Ok(Err(e)) => Err(x.map_err(&step, e)),
        Ok(Ok(killed)) => {
            x.note(format!(
                "{step}: read-only, {killed} client session(s) killed"
            ));
            x.finish().await
        }
    }
}

pub async fn demote(
    shared: &Arc<Shared>,
    req: pb::DemoteRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "Demote", req.ctx.as_ref()).await?;
    let vars = x.variables().await?;
    // A repeated Demote must not overwrite what the first one saw.
    if x.state.demote.is_none() {
        x.state.demote = Some(DemoteMemo {
            read_only_before: vars.read_only,
            super_read_only_before: vars.super_read_only,
            semi_primary_before: vars.semi_sync_primary_enabled,
        });
    }
    if vars.read_only && (vars.super_read_only || !x.dialect.has_super_read_only()) {
        x.note("already read-only");
    } else {
        // SET GLOBAL read_only waits for commits in flight, so the position read after it is final.
        let sqls = x.dialect.set_read_only(true, true);
        x.sqls("set read_only on (waits for in-flight commits)", &sqls)
            .await?;
    }
    x.finish().await
}

pub async fn undo_demote(
    shared: &Arc<Shared>,
    req: pb::UndoDemoteRequest,
) -> Result<pb::ActionResponse, ActionError> {
    let mut x = Exec::begin(shared, "UndoDemote", req.ctx.as_ref()).await?;
    let Some(memo) = x.state.demote.clone() else {
        return Err(ActionError::Refused {
            action: x.action,
            reason: "no demotion to undo (none since the last promote or repoint)".into(),
        });
    };
    if !memo.read_only_before {
        x.refuse_writable_if_isolated()?;
    }
    let vars = x.variables().await?;
    let steps = memo.undo_steps(
        vars.semi_sync_primary_enabled,
        x.dialect.has_super_read_only(),
    );
    if !steps.iter().any(|s| *s != UndoStep::SemiSyncPrimaryOn) {
        x.note("was read-only before the demotion: left read-only");
    }
    for step in steps {
        match step {
            UndoStep::SemiSyncPrimaryOn => {
                let sqls = x
                    .dialect
                    .set_semi_sync_primary(true, semi_timeout_ms(shared));
                x.sqls("semi-sync primary side on", &sqls).await?;
            }
            UndoStep::ReadOnlyOff => {
                let sqls = x.dialect.set_read_only(false, false);
                x.sqls("set read_only off", &sqls).await?;
            }
            UndoStep::SuperReadOnlyOff => {
                x.sql(
                    "set super_read_only off",
                    "SET GLOBAL super_read_only = OFF",
                )
                .await?;
            }
        }
    }
    x.state.demote = None;
    x.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unapplied_names_what_the_relay_log_still_holds() {
        let d = Dialect::MARIADB_10_11;
        assert_eq!(unapplied(d, "", "0-101-5"), Ok(None), "nothing received");
        assert_eq!(unapplied(d, "0-101-5", "0-101-5"), Ok(None));
        assert_eq!(
            unapplied(d, "0-101-5", "0-101-7,1-102-3"),
            Ok(None),
            "applied more than received (e.g. earlier sources)"
        );
        assert_eq!(
            unapplied(d, "0-101-8115", "0-101-18"),
            Ok(Some("0-101-19..8115".into()))
        );
        assert!(unapplied(d, "garbage", "0-101-1").is_err());
        let m = Dialect::MYSQL_8_0;
        let u = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        assert_eq!(
            unapplied(m, &format!("{u}:1-57"), &format!("{u}:1-50")),
            Ok(Some(format!("{u}:51-57")))
        );
    }
}
