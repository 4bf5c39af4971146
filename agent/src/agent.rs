//! The agent's shared state and its long-running tasks: polling, heartbeat, self-fencing and
//! the etcd link. Every task survives mysqld or etcd being down; none of them ever exits the
//! process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use topo::Term;

use backoff::Backoff;
use flavor::Dialect;
use myha_proto::agent as pb;
use mysql_async::Conn;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use topo::{Durability, Registration, ShardRecord, TabletRecord, TabletType, Topo};
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::fence::{self, FenceDecision, TermState};
use crate::health::{self, FenceStatus, HealthInputs, Identity, Observation};
use crate::mysql::{self, Endpoint, MysqlError};

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Memory of the last Demote, so UndoDemote can restore exactly what it changed.
#[derive(Debug, Clone, Default)]
pub struct DemoteMemo {
    pub read_only_before: bool,
    pub super_read_only_before: bool,
    pub semi_primary_before: bool,
}

/// One statement of an UndoDemote, in the order [`DemoteMemo::undo_steps`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoStep {
    /// The semi-sync primary side on (AFTER_SYNC, no async fallback).
    SemiSyncPrimaryOn,
    ReadOnlyOff,
    /// MySQL: `super_read_only` off, `read_only` kept.
    SuperReadOnlyOff,
}

impl DemoteMemo {
    /// What undoing the demotion does now, in order. Invariant: the semi-sync primary side is
    /// on again before mysqld takes writes. A mysqld restarted since the demotion comes back
    /// with semi-sync off; made writable first, it would acknowledge commits no replica holds
    /// until the next statement (the simulator found that order, `sim::shard` seed 285).
    pub fn undo_steps(
        &self,
        semi_primary_on_now: bool,
        has_super_read_only: bool,
    ) -> Vec<UndoStep> {
        let mut steps = Vec::new();
        if self.semi_primary_before && !semi_primary_on_now {
            steps.push(UndoStep::SemiSyncPrimaryOn);
        }
        if !self.read_only_before {
            steps.push(UndoStep::ReadOnlyOff);
        } else if !self.super_read_only_before && has_super_read_only {
            steps.push(UndoStep::SuperReadOnlyOff);
        }
        steps
    }
}

#[derive(Debug, Default)]
pub struct ActionState {
    pub demote: Option<DemoteMemo>,
}

pub struct Shared {
    pub cfg: AgentConfig,
    pub id: Identity,
    pub endpoint: Endpoint,
    pub health: watch::Sender<Arc<pb::Health>>,
    pub shard: watch::Sender<Option<ShardRecord>>,
    pub durability: Mutex<Option<Durability>>,
    terms: Mutex<TermState>,
    fence: Mutex<FenceStatus>,
    pub etcd_connected: AtomicBool,
    etcd_error: Mutex<String>,
    /// The etcd client once connected (a promotion is recorded through it).
    topo: Mutex<Option<Topo>>,
    /// The tablet's registration once made (the isolation rule reads its lease).
    registration: Mutex<Option<Arc<Registration>>>,
    /// What the isolation loop last learned of the shard's other tablets, while this tablet is
    /// the primary on record (`None` otherwise): the rule is judged from it by the loop and by
    /// every action that would make mysqld writable.
    peer_watch: Mutex<Option<PeerWatch>>,
    dialect: Mutex<Option<Dialect>>,
    /// Mutating actions and fencing run one at a time.
    pub actions: Arc<tokio::sync::Mutex<ActionState>>,
    /// Wakes the poll loop early (after an action changed mysqld).
    pub poke: Notify,
    state_file: PathBuf,
    /// The shard primary's mysqld address as last learned from its etcd record; kept when
    /// the record disappears (a dead host's lease expires) so replicas can keep probing it.
    primary_addr: Mutex<Option<(String, String)>>,
    /// The heartbeat write in flight: (started, µs since the epoch; its connection id).
    heartbeat_inflight: Mutex<Option<(u64, u32)>>,
    probe: Mutex<Option<pb::PrimaryProbe>>,
    /// The mysqld instances seen: `MysqlStatus.started_at_ms`, `Health.mysqld_outage_started_ms`.
    instance: Mutex<health::InstanceTrack>,
    /// Addresses the agent actually listens on (after binding port 0).
    pub grpc_addr: Mutex<String>,
    pub http_addr: Mutex<String>,
    /// The one MySQL connection `FullStatus` polls on, kept between calls (a caller must not
    /// be able to open MySQL connections at will); calls take turns on it.
    pub status_conn: tokio::sync::Mutex<Option<(Conn, Dialect)>>,
    /// Bounds on concurrent RPCs (see [`RpcLimits`]).
    pub limits: RpcLimits,
}

/// How many RPCs of each kind the agent serves at once; one more is refused at once
/// (`RESOURCE_EXHAUSTED`) rather than queued without bound. Actions run one at a time anyway
/// (`Shared::actions`): the bound is on those waiting their turn. The numbers leave room for
/// several orchestrators and gateways (one health stream each) and a reparent's bursts.
#[derive(Debug)]
pub struct RpcLimits {
    pub actions: Arc<tokio::sync::Semaphore>,
    pub status: Arc<tokio::sync::Semaphore>,
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl RpcLimits {
    pub const ACTIONS: usize = 16;
    pub const STATUS: usize = 8;
    pub const STREAMS: usize = 64;

    pub fn new(actions: usize, status: usize, streams: usize) -> RpcLimits {
        RpcLimits {
            actions: Arc::new(tokio::sync::Semaphore::new(actions)),
            status: Arc::new(tokio::sync::Semaphore::new(status)),
            streams: Arc::new(tokio::sync::Semaphore::new(streams)),
        }
    }
}

impl Default for RpcLimits {
    fn default() -> RpcLimits {
        RpcLimits::new(RpcLimits::ACTIONS, RpcLimits::STATUS, RpcLimits::STREAMS)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update of plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(cfg: AgentConfig) -> Result<Arc<Shared>, StateError> {
        let alias = cfg.alias();
        let mysql_addr = format!("{}:{}", cfg.agent.advertise_host, cfg.mysql.port);
        let id = Identity {
            alias,
            keyspace: cfg.tablet.keyspace.clone(),
            shard: cfg.tablet.shard.clone(),
            cell: cfg.tablet.cell.clone(),
            mysql_addr,
        };
        let state_file = cfg.agent.state_dir.join("agent-state.json");
        let terms = load_terms(&state_file)?;
        let endpoint = Endpoint::new(&cfg.mysql);
        let initial = health::build(HealthInputs {
            id: &id,
            poll: &Err("not polled yet".into()),
            terms: &terms,
            shard: None,
            fence: &FenceStatus::default(),
            etcd_connected: false,
            now_us: now_us(),
        });
        Ok(Arc::new(Shared {
            cfg,
            id,
            endpoint,
            health: watch::channel(Arc::new(initial)).0,
            shard: watch::channel(None).0,
            durability: Mutex::new(None),
            terms: Mutex::new(terms),
            fence: Mutex::new(FenceStatus::default()),
            etcd_connected: AtomicBool::new(false),
            etcd_error: Mutex::new("not connected yet".into()),
            topo: Mutex::new(None),
            registration: Mutex::new(None),
            peer_watch: Mutex::new(None),
            dialect: Mutex::new(None),
            actions: Arc::new(tokio::sync::Mutex::new(ActionState::default())),
            poke: Notify::new(),
            state_file,
            primary_addr: Mutex::new(None),
            heartbeat_inflight: Mutex::new(None),
            probe: Mutex::new(None),
            instance: Mutex::new(health::InstanceTrack::default()),
            grpc_addr: Mutex::new(String::new()),
            http_addr: Mutex::new(String::new()),
            status_conn: tokio::sync::Mutex::new(None),
            limits: RpcLimits::default(),
        }))
    }

    /// The etcd client, once connected.
    pub fn topo(&self) -> Option<Topo> {
        lock(&self.topo).clone()
    }

    pub fn terms(&self) -> TermState {
        lock(&self.terms).clone()
    }

    /// Why the isolation rule holds now (see [`isolation_loop`]), or `None`: its lease is
    /// within the margin of running out and no other tablet has answered for the window.
    /// While it holds, nothing may make this mysqld writable (an orchestrator that still
    /// reaches it would otherwise undo the self-demotion the others rely on).
    pub fn isolation_holds(&self) -> Option<String> {
        let watch = (*lock(&self.peer_watch))?;
        let lease_left = lock(&self.registration)
            .as_ref()
            .and_then(|r| r.lease_valid_until())
            .map_or(Duration::ZERO, |until| {
                until.saturating_duration_since(Instant::now())
            });
        let input = fence::Isolation {
            lease_left,
            peers_silent_for: watch.has_peers.then(|| watch.last_answer.elapsed()),
        };
        let margin = isolation_margin(self.cfg.etcd.lease_ttl);
        match fence::decide_isolation(&input, margin, topo::SELF_DEMOTE_PEER_WINDOW) {
            FenceDecision::Fence { reason } => Some(reason),
            FenceDecision::Keep => None,
        }
    }

    /// Applies `f` to the term state and persists it when it changed.
    pub fn update_terms<R>(&self, f: impl FnOnce(&mut TermState) -> R) -> R {
        let mut t = lock(&self.terms);
        let before = t.clone();
        let r = f(&mut t);
        if *t != before {
            save_terms(&self.state_file, &t);
        }
        r
    }

    pub fn fence_status(&self) -> FenceStatus {
        lock(&self.fence).clone()
    }

    pub fn set_fence_status(&self, s: FenceStatus) {
        *lock(&self.fence) = s;
    }

    pub fn dialect(&self) -> Option<Dialect> {
        *lock(&self.dialect)
    }

    pub fn set_dialect(&self, d: Dialect) {
        *lock(&self.dialect) = Some(d);
    }

    pub fn set_durability(&self, d: Durability) {
        *lock(&self.durability) = Some(d);
    }

    pub fn durability(&self) -> Option<Durability> {
        *lock(&self.durability)
    }

    pub fn set_primary_addr(&self, alias: String, addr: String) {
        *lock(&self.primary_addr) = Some((alias, addr));
    }

    pub fn probe(&self) -> Option<pb::PrimaryProbe> {
        lock(&self.probe).clone()
    }

    pub fn set_grpc_addr(&self, a: String) {
        *lock(&self.grpc_addr) = a;
    }

    pub fn set_http_addr(&self, a: String) {
        *lock(&self.http_addr) = a;
    }

    /// Opens a connection and learns the dialect on first contact.
    pub async fn connect(&self) -> Result<(Conn, Dialect), MysqlError> {
        let mut conn = self.endpoint.connect().await?;
        let dialect = match self.dialect() {
            Some(d) => d,
            None => {
                let d = mysql::detect_dialect(&mut conn, self.endpoint.query_timeout).await?;
                self.set_dialect(d);
                d
            }
        };
        Ok((conn, dialect))
    }

    /// Builds a health message from a poll result and the agent's current knowledge.
    pub fn health_from(&self, poll: &Result<Observation, String>) -> pb::Health {
        let shard = self.shard.borrow().clone();
        let mut h = health::build(HealthInputs {
            id: &self.id,
            poll,
            terms: &self.terms(),
            shard: shard.as_ref(),
            fence: &self.fence_status(),
            etcd_connected: self.etcd_connected.load(Ordering::Relaxed),
            now_us: now_us(),
        });
        if h.tablet_type != pb::TabletType::Primary as i32 {
            h.primary_probe = self.probe();
        }
        {
            let mut track = lock(&self.instance);
            let seen = match (poll, h.mysql.as_ref()) {
                (Ok(_), Some(m)) => {
                    health::InstancePoll::Answered(Some(m.started_at_ms).filter(|s| *s > 0))
                }
                (Ok(_), None) => health::InstancePoll::Answered(None),
                (Err(_), _) => health::InstancePoll::Failed,
            };
            track.observe(h.polled_at_ms, seen);
            if let Some(m) = h.mysql.as_mut() {
                m.started_at_ms = track.started_at_ms;
            }
            h.mysqld_outage_started_ms = track.outage_started_ms;
        }
        if !h.etcd_connected {
            h.etcd_error = lock(&self.etcd_error).clone();
        }
        h
    }

    /// Publishes `h` when [`health::push_due`] says so: at once on a material change, else
    /// once per `health_interval` while positions or lag move. The stream re-sends the current
    /// health every `health_interval` in between.
    pub fn publish(&self, h: pb::Health) {
        let refresh = self.cfg.agent.health_interval;
        self.health.send_if_modified(|cur| {
            if health::push_due(cur, &h, refresh) {
                *cur = Arc::new(h);
                true
            } else {
                false
            }
        });
    }

    pub fn tablet_record(&self, shard: Option<&ShardRecord>) -> TabletRecord {
        let is_primary = shard
            .and_then(|s| s.primary.as_deref())
            .is_some_and(|p| p == self.id.alias);
        TabletRecord {
            alias: self.id.alias.clone(),
            cell: self.cfg.tablet.cell.clone(),
            uid: self.cfg.tablet.uid,
            keyspace: self.cfg.tablet.keyspace.clone(),
            shard: self.cfg.tablet.shard.clone(),
            tablet_type: if is_primary {
                TabletType::Primary
            } else {
                TabletType::Replica
            },
            mysql_host: self.cfg.agent.advertise_host.clone(),
            mysql_port: self.cfg.mysql.port,
            mysql_socket: self
                .cfg
                .mysql
                .socket
                .as_ref()
                .map(|p| p.display().to_string()),
            grpc_addr: lock(&self.grpc_addr).clone(),
            http_addr: Some(lock(&self.http_addr).clone()),
            promotion_rule: self.cfg.tablet.promotion_rule,
            registered_ms: now_us() / 1000,
        }
    }
}

/// The persisted term state cannot be read: starting with zero terms would forget the term this
/// mysqld was promoted under, and a deposed primary would then never fence itself.
#[derive(Debug, thiserror::Error)]
#[error(
    "agent state {path} is unreadable ({reason}): refusing to start, since forgetting the term this \
     mysqld was promoted under would stop a deposed primary from fencing itself; restore the file, \
     or remove it once this mysqld is known to be read-only and not the primary"
)]
pub struct StateError {
    pub path: PathBuf,
    pub reason: String,
}

/// The persisted terms; a missing file is a tablet never promoted (all zero).
pub fn load_terms(path: &PathBuf) -> Result<TermState, StateError> {
    let err = |reason: String| StateError {
        path: path.clone(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TermState::default()),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Writes the terms durably: a temporary file, fsynced, renamed over the state file, and the
/// directory fsynced, so that after a crash the file holds the old or the new state, never a
/// torn or empty one.
fn save_terms(path: &PathBuf, t: &TermState) {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let write = (|| -> std::io::Result<()> {
        let bytes = serde_json::to_vec(t).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = write {
        warn!(file = %path.display(), error = %e, "cannot persist agent term state");
    }
}

/// A heartbeat write pending this long is looked at: what does it wait for?
const WRITE_STALL_LOOK_AFTER_US: u64 = 500_000;

/// Primary only: how long the heartbeat write has been pending, and past
/// [`WRITE_STALL_LOOK_AFTER_US`] what it waits for (its PROCESSLIST state: "Waiting for global
/// read lock", "Waiting for semi-sync ACK from slave", a commit or disk wait...).
pub(crate) async fn report_write_stall(
    shared: &Shared,
    c: &mut Conn,
    h: &mut pb::Health,
    timeout: Duration,
) {
    if h.tablet_type != pb::TabletType::Primary as i32 {
        return;
    }
    let Some((since, id)) = *lock(&shared.heartbeat_inflight) else {
        return;
    };
    let age_us = now_us().saturating_sub(since);
    h.write_stalled_ms = age_us / 1000;
    if age_us < WRITE_STALL_LOOK_AFTER_US {
        return;
    }
    let q = format!("SELECT STATE FROM information_schema.PROCESSLIST WHERE ID = {id}");
    h.write_blocked_by = match mysql::query_scalar(c, &q, timeout).await {
        Ok(Some(state)) if !state.trim().is_empty() => state,
        Ok(_) => "no state shown".into(),
        Err(e) => format!("state unknown: {e}"),
    };
}

/// Polls mysqld every `poll_interval` (or at once when poked) and publishes health.
pub async fn poll_loop(shared: Arc<Shared>) {
    let mut conn: Option<(Conn, Dialect)> = None;
    let interval = shared.cfg.agent.poll_interval;
    let timeout = shared.endpoint.query_timeout;
    loop {
        let started = tokio::time::Instant::now();
        if conn.is_none() {
            match shared.connect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    debug!(error = %e, "mysqld unreachable");
                    shared.publish(shared.health_from(&Err(e.to_string())));
                }
            }
        }
        if let Some((c, dialect)) = conn.as_mut() {
            let result = health::observe(c, *dialect, timeout).await;
            metrics::histogram!("myha_agent_poll_seconds").record(started.elapsed().as_secs_f64());
            let poll = result.map_err(|e| e.to_string());
            let mut h = shared.health_from(&poll);
            if poll.is_ok() {
                report_write_stall(&shared, c, &mut h, timeout).await;
            } else {
                // The connection may be half-dead; start afresh next round.
                conn = None;
            }
            record_metrics(&h);
            shared.publish(h);
        } else {
            metrics::gauge!("myha_agent_mysql_reachable").set(0.0);
        }
        let sleep = interval.saturating_sub(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shared.poke.notified() => {}
        }
    }
}

fn record_metrics(h: &pb::Health) {
    metrics::gauge!("myha_agent_mysql_reachable").set(if h.mysql_reachable { 1.0 } else { 0.0 });
    if let Some(lag) = h.lag_ms {
        metrics::gauge!("myha_agent_replication_lag_ms").set(lag as f64);
    }
    if let Some(m) = &h.mysql {
        metrics::gauge!("myha_agent_read_only").set(if m.read_only { 1.0 } else { 0.0 });
    }
    metrics::gauge!("myha_agent_term").set(h.term as f64);
    metrics::gauge!("myha_agent_fenced").set(if h.fenced { 1.0 } else { 0.0 });
}

/// Writes the heartbeat row while this tablet is the shard's writable primary.
///
/// Runs on its own connection with no statement timeout: under lossless semi-sync a write
/// with no acking replica blocks, and it must block here, alone, rather than pile up new
/// sessions or stall polling. Fencing kills this connection like any other.
pub async fn heartbeat_loop(shared: Arc<Shared>) {
    let interval = shared.cfg.agent.heartbeat_interval;
    let mut conn: Option<Conn> = None;
    let mut table_ready = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let h = shared.health.borrow().clone();
        let writable_primary = h.tablet_type == pb::TabletType::Primary as i32
            && h.mysql_reachable
            && h.mysql.as_ref().is_some_and(|m| !m.read_only)
            && !h.replication.as_ref().is_some_and(|r| r.configured);
        if !writable_primary {
            continue;
        }
        if conn.is_none() {
            match shared.endpoint.connect().await {
                Ok(c) => {
                    conn = Some(c);
                    table_ready = false;
                }
                Err(e) => {
                    debug!(error = %e, "heartbeat: cannot connect");
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let result = async {
            if !table_ready {
                // DDL is binlogged even when nothing is created (IF NOT EXISTS): only when the
                // table is missing, so a demoted primary never writes a transaction of its own.
                let exists = mysql::query_scalar(
                    c,
                    "SELECT COUNT(*) FROM information_schema.tables \
                     WHERE table_schema = '_myha' AND table_name = 'heartbeat'",
                    Duration::from_secs(30),
                )
                .await?;
                if exists.as_deref() != Some("1") {
                    mysql::exec(c, "CREATE DATABASE IF NOT EXISTS _myha", Duration::from_secs(30))
                        .await?;
                    mysql::exec(
                        c,
                        "CREATE TABLE IF NOT EXISTS _myha.heartbeat (id TINYINT UNSIGNED NOT NULL PRIMARY KEY, \
                         ts_us BIGINT UNSIGNED NOT NULL, server_id INT UNSIGNED NOT NULL, \
                         term BIGINT UNSIGNED NOT NULL) ENGINE=InnoDB",
                        Duration::from_secs(30),
                    )
                    .await?;
                }
                table_ready = true;
            }
            // The agent's user bypasses read_only (MariaDB: READ_ONLY ADMIN), and the health this
            // loop decided on may be a poll old: the write itself checks read_only, after its
            // locks, so a write racing a Demote either finishes before read_only is set (and is
            // in the position Demote reports) or writes nothing (no GTID, nothing to lose).
            let sql = format!(
                "INSERT INTO _myha.heartbeat (id, ts_us, server_id, term) \
                 SELECT 1, {}, @@server_id, {} FROM DUAL WHERE @@global.read_only = 0 \
                 ON DUPLICATE KEY UPDATE ts_us = VALUES(ts_us), server_id = VALUES(server_id), term = VALUES(term)",
                now_us(),
                h.term
            );
            // Generous bound: only to notice a connection that died under us. While it runs, the
            // poll reports how long it has been pending (a write stall).
            *lock(&shared.heartbeat_inflight) = Some((now_us(), c.id()));
            let r = mysql::exec(c, &sql, Duration::from_secs(3600)).await;
            *lock(&shared.heartbeat_inflight) = None;
            r
        }
        .await;
        match result {
            Ok(()) => metrics::counter!("myha_agent_heartbeats_written_total").increment(1),
            Err(e) => {
                debug!(error = %e, "heartbeat write failed");
                conn = None;
            }
        }
    }
}

/// Re-evaluates the fencing decision on every health or shard change, and every poll interval
/// (a failed attempt must be retried even when nothing observable changed), and fences when told.
pub async fn fence_loop(shared: Arc<Shared>) {
    let mut health_rx = shared.health.subscribe();
    let mut shard_rx = shared.shard.subscribe();
    let every = shared.cfg.agent.poll_interval;
    loop {
        tokio::select! {
            r = health_rx.changed() => if r.is_err() { return },
            r = shard_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(every) => {}
        }
        let h = shared.health.borrow().clone();
        let shard = shard_rx.borrow().clone();
        let writable = h
            .mysql_reachable
            .then(|| h.mysql.as_ref().map(|m| !m.read_only))
            .flatten();
        if let FenceDecision::Fence { reason } =
            fence::decide(&shared.id.alias, &shared.terms(), shard.as_ref(), writable)
        {
            warn!(%reason, "fencing mysqld");
            fence_for(&shared, reason, "myha_agent_fences_total").await;
        }
    }
}

/// The isolation rule's margin before the lease's end: the fence (kill, read-only) must be
/// done before etcd can expire the registration.
fn isolation_margin(lease_ttl: Duration) -> Duration {
    (lease_ttl / 5).max(Duration::from_millis(300))
}

/// When another tablet of the shard last answered this primary's agent.
#[derive(Debug, Clone, Copy)]
struct PeerWatch {
    last_answer: Instant,
    /// Whether the shard may have another tablet (one on record, or the list never read).
    has_peers: bool,
}

/// How often a primary's agent checks that another tablet of its shard answers.
const ISOLATION_TICK: Duration = Duration::from_millis(100);
/// Bound on one answer from another tablet's agent.
const PEER_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How often the list of the shard's other tablets is read again from etcd.
const PEERS_REFRESH: Duration = Duration::from_secs(10);
/// How often while that list is empty: a primary named before its replicas registered must
/// learn of them soon, or it would never apply the rule (nobody to be replaced by, it thinks).
const PEERS_REFRESH_EMPTY: Duration = Duration::from_secs(1);

/// The isolation rule ([`topo::SELF_DEMOTE_PEER_WINDOW`]): while this tablet is the primary on
/// record, checks every tick that another tablet of its shard answers (a TCP connect to its
/// agent) and what is left of the registration lease, and fences mysqld when both are gone and
/// it is writable. It keeps watching once read-only, so that an action asked to make it
/// writable while the rule holds is refused ([`Shared::isolation_holds`]).
pub async fn isolation_loop(shared: Arc<Shared>) {
    let (ks, sh) = (shared.id.keyspace.clone(), shared.id.shard.clone());
    let mut peers: Vec<String> = Vec::new();
    let mut peers_read: Option<Instant> = None;
    let mut last_answer = Instant::now();
    loop {
        tokio::time::sleep(ISOLATION_TICK).await;
        let h = shared.health.borrow().clone();
        let shard = shared.shard.borrow().clone();
        let named = shard
            .as_ref()
            .is_some_and(|s| s.primary.as_deref() == Some(shared.id.alias.as_str()));
        if !(named && shared.terms().promoted_term > Term::ZERO) {
            last_answer = Instant::now();
            *lock(&shared.peer_watch) = None;
            continue;
        }
        let refresh = if peers.is_empty() {
            PEERS_REFRESH_EMPTY
        } else {
            PEERS_REFRESH
        };
        if peers_read.is_none_or(|t| t.elapsed() >= refresh) {
            if let Some(topo) = shared.topo() {
                let quick = topo.with_op_timeout(PEER_PROBE_TIMEOUT);
                if let Ok(list) = quick.list_tablets(Some(&ks), Some(&sh)).await {
                    peers = list
                        .into_iter()
                        .filter(|t| t.alias != shared.id.alias && !t.grpc_addr.is_empty())
                        .map(|t| t.grpc_addr)
                        .collect();
                    peers_read = Some(Instant::now());
                }
            }
        }
        let answers = futures::future::join_all(peers.iter().map(|addr| async move {
            matches!(
                tokio::time::timeout(PEER_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await,
                Ok(Ok(_))
            )
        }))
        .await;
        if answers.iter().any(|ok| *ok) {
            last_answer = Instant::now();
        }
        *lock(&shared.peer_watch) = Some(PeerWatch {
            last_answer,
            // Never read (etcd unreachable since this tablet became primary): others may exist,
            // and none answered; only a list read empty means nobody could take over.
            has_peers: !peers.is_empty() || peers_read.is_none(),
        });
        let writable = h.mysql_reachable && h.mysql.as_ref().is_some_and(|m| !m.read_only);
        if let (true, Some(reason)) = (writable, shared.isolation_holds()) {
            warn!(%reason, "self-demotion (isolation rule): fencing mysqld");
            fence_for(&shared, reason, "myha_agent_self_demotions_total").await;
        }
    }
}

/// Fences mysqld (one action at a time) for `reason`, counted in `counter` and kept as the
/// fence status; a failure is logged and left to the caller's next round.
async fn fence_for(shared: &Shared, reason: String, counter: &'static str) {
    let _guard = shared.actions.lock().await;
    match fence_mysqld(shared).await {
        Ok(killed) => {
            info!(killed, %reason, "mysqld fenced: read-only, client connections killed");
            metrics::counter!(counter).increment(1);
            shared.set_fence_status(FenceStatus {
                fenced: true,
                reason,
            });
        }
        Err(e) => warn!(error = %e, "fencing failed; will retry"),
    }
    shared.poke.notify_one();
}

/// Kills client sessions, sets read_only (super_read_only where it exists), kills again.
///
/// Kill first: a commit waiting for a semi-sync ack holds the commit lock, and
/// `SET GLOBAL read_only` waits for it, so clients must go before read_only can be set.
pub async fn fence_mysqld(shared: &Shared) -> Result<usize, MysqlError> {
    let (mut c, dialect) = shared.connect().await?;
    fence_over(&mut c, dialect, shared.endpoint.query_timeout).await
}

/// Fences the server `c` is connected to (this agent's mysqld, or another one: a deposed primary
/// whose agent is gone): kill, read-only, kill again. Returns the sessions killed.
pub async fn fence_over(c: &mut Conn, dialect: Dialect, t: Duration) -> Result<usize, MysqlError> {
    let mut killed = kill_clients(c, dialect, t).await?;
    for sql in dialect.set_read_only(true, true) {
        mysql::exec(c, &sql, Duration::from_secs(10)).await?;
    }
    killed += kill_clients(c, dialect, t).await?;
    Ok(killed)
}

async fn kill_clients(c: &mut Conn, dialect: Dialect, t: Duration) -> Result<usize, MysqlError> {
    let rows = mysql::query_rows(c, dialect.processlist_query(), t).await?;
    let ids = dialect.killable_sessions(&rows, &[]);
    let mut killed = 0;
    for id in ids {
        match mysql::exec(c, &dialect.kill_connection(id), t).await {
            Ok(()) => killed += 1,
            // 1094 Unknown thread id: it ended by itself meanwhile.
            Err(e) if e.server_code() == Some(1094) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(killed)
}

/// Keeps the etcd side alive forever: connect, register under a lease, watch the shard record.
pub async fn etcd_loop(shared: Arc<Shared>) {
    let cfg = &shared.cfg.etcd;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let topo = loop {
        match cfg.connect().await {
            Ok(t) => break t,
            Err(e) => {
                *lock(&shared.etcd_error) = e.to_string();
                warn!(error = %e, "etcd unreachable; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    info!(endpoints = ?cfg.endpoints, "connected to etcd");
    *lock(&shared.topo) = Some(topo.clone());
    let ks = shared.cfg.tablet.keyspace.clone();
    let shard_name = shared.cfg.tablet.shard.clone();
    let mut shard_rx = topo.watch_shard(&ks, &shard_name);
    let initial_shard = shard_rx.borrow().clone();
    let registration =
        Arc::new(topo.register_tablet(shared.tablet_record(initial_shard.as_ref()), cfg.lease_ttl));
    *lock(&shared.registration) = Some(registration.clone());
    let mut reg_rx = registration.status();
    let mut reachable = topo.reachable();
    let mut last_type = None;
    // The term whose promotion is known to be on record (checked once per term, not per round).
    let mut on_record: Option<Term> = None;
    loop {
        let shard = shard_rx.borrow_and_update().clone();
        if let Some(s) = &shard {
            shared.update_terms(|t| t.observe_shard(&shared.id.alias, s));
            if let Some(p) = s.primary.as_deref().filter(|p| *p != shared.id.alias) {
                if let Ok(Some(t)) = topo.get_tablet(p).await {
                    shared.set_primary_addr(
                        p.to_string(),
                        format!("{}:{}", t.mysql_host, t.mysql_port),
                    );
                }
            }
        }
        let record = shared.tablet_record(shard.as_ref());
        if last_type != Some(record.tablet_type) {
            match registration.update(record.clone()).await {
                Ok(()) => last_type = Some(record.tablet_type),
                Err(e) => debug!(error = %e, "tablet record update deferred"),
            }
        }
        // After the record is published (the new role is not held up by an etcd read).
        if let Some(s) = shard
            .as_ref()
            .filter(|s| s.primary.as_deref() == Some(shared.id.alias.as_str()))
            .filter(|s| on_record != Some(s.term))
        {
            if record_bootstrap_promotion(&shared, &topo, s).await {
                on_record = Some(s.term);
            }
        }
        shared.shard.send_replace(shard);
        let status = reg_rx.borrow_and_update().clone();
        let connected = status.registered && *reachable.borrow_and_update();
        shared.etcd_connected.store(connected, Ordering::Relaxed);
        *lock(&shared.etcd_error) = if connected {
            String::new()
        } else {
            status
                .last_error
                .unwrap_or_else(|| "etcd unreachable".to_string())
        };
        if shared.durability().is_none() {
            if let Ok(Some(k)) = topo.get_keyspace(&ks).await {
                shared.set_durability(k.durability);
            }
        }
        shared.poke.notify_one();
        tokio::select! {
            r = shard_rx.changed() => if r.is_err() { break },
            r = reg_rx.changed() => if r.is_err() { break },
            r = reachable.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    warn!("etcd watch ended; the agent keeps serving without topology updates");
}

/// A shard record naming this tablet at a term with no promotion on record (the first primary,
/// set by a bootstrap, not by a Promote): records it, with this mysqld's writer id and position,
/// so that the shard's history covers every term. Best effort, retried on the next round; returns
/// whether the term is on record.
async fn record_bootstrap_promotion(shared: &Shared, topo: &Topo, s: &ShardRecord) -> bool {
    let (ks, sh) = (&shared.id.keyspace, &shared.id.shard);
    match topo.get_promotion(ks, sh, s.term).await {
        Ok(Some(_)) => return true,
        Ok(None) => {}
        Err(e) => {
            debug!(error = %e, "reading the promotion history");
            return false;
        }
    }
    let vars = match shared.connect().await {
        Ok((mut conn, dialect)) => {
            let rows = mysql::query_rows(
                &mut conn,
                &dialect.variables_query(),
                Duration::from_secs(2),
            )
            .await;
            let _ = conn.disconnect().await;
            match rows.map(|r| dialect.parse_variables(&r).map(|v| (dialect, v))) {
                Ok(Ok(v)) => v,
                _ => return false,
            }
        }
        Err(_) => return false,
    };
    let (dialect, v) = vars;
    let rec = topo::PromotionRecord {
        keyspace: ks.clone(),
        shard: sh.clone(),
        term: s.term,
        primary: shared.id.alias.clone(),
        writer: crate::actions::writer_id(&dialect, &v),
        position: v.gtid_position.clone(),
        at_ms: s.term_start_ms,
        by: "bootstrap (recorded by the agent of the primary the shard record names)".into(),
        lock_epoch: 0,
        self_demotes: true,
    };
    match topo.record_promotion(&rec).await {
        Ok(r) => {
            info!(term = r.term.get(), primary = %r.primary, "promotion history: recorded the bootstrap term");
            true
        }
        Err(e) => {
            warn!(error = %e, "promotion history: cannot record the bootstrap term");
            false
        }
    }
}

/// Where this replica should probe the primary: its etcd record's address, else (record gone
/// or not read yet) the replication source, which is the primary while it replicates from it.
fn probe_target(shared: &Shared) -> Option<(String, String)> {
    let shard = shared.shard.borrow().clone()?;
    let primary = shard.primary.filter(|p| *p != shared.id.alias)?;
    if let Some((alias, addr)) = lock(&shared.primary_addr).clone() {
        if alias == primary {
            return Some((alias, addr));
        }
    }
    let h = shared.health.borrow().clone();
    let r = h.replication.as_ref().filter(|r| r.configured)?;
    Some((primary, format!("{}:{}", r.source_host, r.source_port)))
}

/// Replicas only: keeps a connection to the primary's mysqld and pings it every poll interval.
/// A refused connection (dead mysqld) fails at once; a frozen one times out after
/// `primary_probe_timeout`. A server error still proves the server is alive.
pub async fn probe_loop(shared: Arc<Shared>) {
    let every = shared.cfg.agent.poll_interval;
    let timeout = shared.cfg.agent.primary_probe_timeout;
    let mut conn: Option<(String, Conn)> = None;
    let mut failures: u32 = 0;
    let mut failing_since_ms: u64 = 0;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some((alias, addr)) = probe_target(&shared) else {
            conn = None;
            *lock(&shared.probe) = None;
            continue;
        };
        if conn.as_ref().is_some_and(|(a, _)| *a != addr) {
            conn = None;
            failures = 0;
            failing_since_ms = 0;
        }
        let started = tokio::time::Instant::now();
        let result: Result<(), MysqlError> = async {
            if conn.is_none() {
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| MysqlError::ConnectTimeout {
                        addr: addr.clone(),
                        timeout,
                    })?;
                let c = shared
                    .endpoint
                    .towards(&host, port, timeout)
                    .connect()
                    .await?;
                conn = Some((addr.clone(), c));
            }
            let Some((_, c)) = conn.as_mut() else {
                return Ok(());
            };
            mysql::exec(c, "DO 1", timeout).await
        }
        .await;
        let (reachable, error) = match &result {
            Ok(()) => (true, String::new()),
            Err(e) if e.server_answered() => (true, e.to_string()),
            Err(e) => (false, e.to_string()),
        };
        if result.is_err() {
            conn = None;
        }
        failures = if reachable {
            0
        } else {
            failures.saturating_add(1)
        };
        // The run began when this attempt started: it was already failing then.
        failing_since_ms = match (reachable, failing_since_ms) {
            (true, _) => 0,
            (false, 0) => (now_us() / 1000).saturating_sub(started.elapsed().as_millis() as u64),
            (false, since) => since,
        };
        let probe = pb::PrimaryProbe {
            primary_alias: alias,
            addr: addr.clone(),
            reachable,
            error,
            consecutive_failures: failures,
            probed_at_ms: now_us() / 1000,
            rtt_us: started.elapsed().as_micros() as u64,
            failing_since_ms,
        };
        let changed = {
            let mut cur = lock(&shared.probe);
            let changed = cur.as_ref().is_none_or(|c| {
                c.reachable != probe.reachable
                    || c.primary_alias != probe.primary_alias
                    || c.consecutive_failures != probe.consecutive_failures
            });
            *cur = Some(probe);
            changed
        };
        if changed {
            shared.poke.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memo(read_only: bool, super_read_only: bool, semi: bool) -> DemoteMemo {
        DemoteMemo {
            read_only_before: read_only,
            super_read_only_before: super_read_only,
            semi_primary_before: semi,
        }
    }

    #[test]
    fn semi_sync_is_back_on_before_the_undone_primary_takes_writes() {
        // Restarted since the demotion: semi-sync came back off.
        assert_eq!(
            memo(false, false, true).undo_steps(false, false),
            vec![UndoStep::SemiSyncPrimaryOn, UndoStep::ReadOnlyOff]
        );
        assert_eq!(
            memo(false, false, true).undo_steps(true, false),
            vec![UndoStep::ReadOnlyOff],
            "still on: nothing to restore"
        );
        assert_eq!(
            memo(false, false, false).undo_steps(false, true),
            vec![UndoStep::ReadOnlyOff],
            "durability none: semi-sync stays off"
        );
    }

    #[test]
    fn a_tablet_read_only_before_the_demotion_stays_read_only() {
        assert!(memo(true, true, false).undo_steps(false, true).is_empty());
        assert_eq!(
            memo(true, false, false).undo_steps(false, true),
            vec![UndoStep::SuperReadOnlyOff],
            "MySQL: read_only kept, super_read_only back off"
        );
        assert!(
            memo(true, false, false).undo_steps(false, false).is_empty(),
            "MariaDB has no super_read_only"
        );
    }
}
