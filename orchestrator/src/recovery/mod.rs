//! Recoveries: what runs under a shard's etcd lock once the engine decided to act.
//!
//! [`run`] is the one entry point the engine calls for every recovery: it takes the shard lock
//! (a short wait; held by another instance means that instance acts), checks flapping against
//! the audit log, refreshes the shard from etcd and from every agent's `FullStatus`
//! ([`refresh`]), re-runs the analysis on those fresh answers and only acts if the same problem
//! is still there. It then dispatches to [`reparent::emergency_reparent`] (dead primary) or
//! [`repair::repair`] (everything else), records a summary, and releases the lock.
//!
//! A recovery talks to agents through [`RecoveryContext`]'s typed RPC helpers: each one is one
//! step, bounded by `action_timeout`, run under [`RecoveryContext::term`], timed, recorded in
//! the context and appended to the shard's audit log (asynchronously, in order, by
//! [`AuditSink`], so the etcd writes never slow the recovery down).

pub mod planned;
pub mod repair;
pub mod reparent;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use myha_proto::agent as pb;
use myha_proto::agent::agent_client::AgentClient;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use topo::{
    AuditEntry, Durability, LockRequest, ShardLock, ShardRecord, TabletRecord, Topo, TopoError,
};

use crate::analysis::{self, AnalysisConfig, Problem, ProblemCode, ShardInput};
use crate::control;
use crate::input;
use crate::problem::Remedy;

/// Audit `action` of an emergency reparent's summary entry (flapping counts the automatic ones).
pub const ACTION_EMERGENCY_REPARENT: &str = "emergency_reparent";
/// Audit `action` of a planned reparent's summary entry.
pub const ACTION_PLANNED_REPARENT: &str = "planned_reparent";
/// Audit actors of operator-requested operations start with this (`operator:<who>@<actor>`).
pub const OPERATOR_ACTOR_PREFIX: &str = "operator:";
/// Audit outcomes.
pub const OUTCOME_OK: &str = "ok";
pub const OUTCOME_FAILED: &str = "failed";
pub const OUTCOME_REFUSED: &str = "refused";
pub const OUTCOME_SKIPPED: &str = "skipped";
pub const OUTCOME_GONE: &str = "gone";

/// Tunables of every recovery (`[recovery]` plus the analysis thresholds).
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryConfig {
    /// `false`: analyse and report only.
    pub enabled: bool,
    pub lock_ttl: Duration,
    pub lock_wait: Duration,
    /// Bound on every agent action (sent as `ActionContext.timeout_ms`).
    pub action_timeout: Duration,
    pub relay_log_wait: Duration,
    pub catch_up_timeout: Duration,
    /// See `[recovery] self_demotion_wait`.
    pub self_demotion_wait: Duration,
    pub flap_limit: u32,
    pub flap_window: Duration,
    /// Bound on each `FullStatus` of the refresh (an agent that does not answer is unseen).
    pub status_timeout: Duration,
    /// Bound on connecting to an agent.
    pub connect_timeout: Duration,
    /// Operator reparents' defaults: `wait_timeout`, `lock_timeout`, `max_lag`.
    pub planned_wait_timeout: Duration,
    pub planned_lock_timeout: Duration,
    pub planned_max_lag: Duration,
    pub analysis: AnalysisConfig,
    /// How much of each shard's audit log is kept in etcd.
    pub audit: AuditRetention,
}

/// The audit log is pruned per shard, at most every `prune_interval`, to the newest `keep`
/// entries and to those younger than `max_age`: unpruned it grows until etcd's space quota
/// stops every write, routing and fencing included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    pub keep: usize,
    pub max_age: Duration,
    pub prune_interval: Duration,
}

impl Default for AuditRetention {
    fn default() -> Self {
        AuditRetention {
            keep: 10_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            lock_ttl: Duration::from_secs(5),
            lock_wait: Duration::from_millis(200),
            action_timeout: Duration::from_secs(5),
            relay_log_wait: Duration::from_secs(30),
            catch_up_timeout: Duration::from_secs(5),
            self_demotion_wait: Duration::from_secs(15),
            flap_limit: 3,
            flap_window: Duration::from_secs(600),
            status_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            planned_wait_timeout: Duration::from_secs(5),
            planned_lock_timeout: Duration::from_secs(10),
            planned_max_lag: Duration::from_secs(5),
            analysis: AnalysisConfig::default(),
            audit: AuditRetention::default(),
        }
    }
}

/// Everything that can go wrong in a recovery, with the context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// An agent answered with an error (stale term, mysqld error, deadline...).
    #[error("{rpc} on {tablet}: {code:?}: {message}")]
    Agent {
        rpc: &'static str,
        tablet: String,
        code: tonic::Code,
        message: String,
        /// Set when the agent refused our fencing token (term, lock epoch), from the status
        /// details: another orchestrator acted at a newer term or under a newer lock.
        stale: Option<pb::StaleTermRefusal>,
    },
    /// An agent did not answer in time.
    #[error("{rpc} on {tablet}: no answer within {after:?}")]
    AgentTimeout {
        rpc: &'static str,
        tablet: String,
        after: Duration,
    },
    /// The registration's gRPC address is unusable.
    #[error("agent of {tablet} at {addr:?}: {reason}")]
    AgentAddress {
        tablet: String,
        addr: String,
        reason: String,
    },
    /// etcd failed (including a lost or held lock).
    #[error("{what}: {source}")]
    Topo {
        what: String,
        #[source]
        source: TopoError,
    },
    /// The tablet is not registered in this shard (as of the refresh).
    #[error("tablet {0} is not registered in this shard")]
    UnknownTablet(String),
    /// The recovery decided not to act; nothing was changed by the refusing step.
    #[error("refused: {0}")]
    Refused(String),
    /// Anything else, in words.
    #[error("{0}")]
    Failed(String),
}

impl RecoveryError {
    /// Wraps a topo error with what was being done.
    pub fn topo(what: impl Into<String>) -> impl FnOnce(TopoError) -> RecoveryError {
        let what = what.into();
        move |source| RecoveryError::Topo { what, source }
    }

    /// The agent's refusal when it refused our fencing token as stale (the structured
    /// refusal of the gRPC contract, never a reading of the message).
    pub fn stale_term(&self) -> Option<&pb::StaleTermRefusal> {
        match self {
            RecoveryError::Agent { stale, .. } => stale.as_ref(),
            _ => None,
        }
    }
}

/// How a recovery attempt ended. Shown by the engine as the shard's last recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Ran to the end.
    Recovered { detail: String },
    /// Decided not to act (e.g. durability cannot be met); the reason is in the audit log.
    Refused { reason: String },
    /// Failed, possibly after changing something; every step is in the audit log.
    Failed { error: String },
    /// After taking the lock and refreshing, the problem was not there any more.
    ProblemGone { detail: String },
    /// Another orchestrator instance holds the shard lock (it acts).
    LockHeld { holder: String },
    /// Not attempted: recoveries disabled or the shard is flapping.
    Skipped { reason: String },
}

impl Outcome {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Recovered { .. } => "recovered",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "failed",
            Outcome::ProblemGone { .. } => "problem_gone",
            Outcome::LockHeld { .. } => "lock_held",
            Outcome::Skipped { .. } => "skipped",
        }
    }

    /// The audit outcome word.
    pub fn audit_outcome(&self) -> &'static str {
        match self {
            Outcome::Recovered { .. } => OUTCOME_OK,
            Outcome::Refused { .. } => OUTCOME_REFUSED,
            Outcome::Failed { .. } => OUTCOME_FAILED,
            Outcome::ProblemGone { .. } => OUTCOME_GONE,
            Outcome::LockHeld { .. } | Outcome::Skipped { .. } => OUTCOME_SKIPPED,
        }
    }

    /// The detail, reason or error.
    pub fn text(&self) -> &str {
        match self {
            Outcome::Recovered { detail } | Outcome::ProblemGone { detail } => detail,
            Outcome::Refused { reason } | Outcome::Skipped { reason } => reason,
            Outcome::Failed { error } => error,
            Outcome::LockHeld { holder } => holder,
        }
    }

    /// Whether retrying soon is pointless (the engine backs off).
    pub fn is_unsuccessful(&self) -> bool {
        matches!(
            self,
            Outcome::Refused { .. } | Outcome::Failed { .. } | Outcome::Skipped { .. }
        )
    }
}

impl From<RecoveryError> for Outcome {
    fn from(e: RecoveryError) -> Outcome {
        match e {
            RecoveryError::Refused(reason) => Outcome::Refused { reason },
            e => Outcome::Failed {
                error: e.to_string(),
            },
        }
    }
}

/// One step of a recovery as recorded (and audited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    pub name: String,
    pub tablet: Option<String>,
    pub ok: bool,
    pub detail: String,
    /// Wall clock at the end of the step.
    pub at_ms: u64,
    pub duration_ms: u64,
}

/// Sees every step of a [`RecoveryContext`] the moment it is recorded (e.g. to stream it to an
/// operator). Called synchronously: it must not block.
#[derive(Clone)]
pub struct StepObserver(Arc<dyn Fn(&StepRecord) + Send + Sync>);

impl StepObserver {
    pub fn new(f: impl Fn(&StepRecord) + Send + Sync + 'static) -> StepObserver {
        StepObserver(Arc::new(f))
    }

    /// Sends a copy of every step on `tx` (a closed receiver is ignored).
    pub fn channel(tx: mpsc::UnboundedSender<StepRecord>) -> StepObserver {
        StepObserver::new(move |s| {
            let _ = tx.send(s.clone());
        })
    }
}

impl std::fmt::Debug for StepObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepObserver")
    }
}

// ---- agent clients ----------------------------------------------------------------------

/// gRPC channels to agents, by address, shared by every recovery. Channels are lazy and
/// reconnect by themselves; a call to a dead agent fails within `connect_timeout`.
#[derive(Clone, Debug)]
pub struct AgentClients {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
}

impl AgentClients {
    pub fn new(connect_timeout: Duration) -> AgentClients {
        AgentClients {
            channels: Arc::default(),
            connect_timeout,
        }
    }

    fn endpoint(&self, tablet: &TabletRecord) -> Result<Endpoint, RecoveryError> {
        let addr = tablet.grpc_addr.trim();
        let bad = |reason: String| RecoveryError::AgentAddress {
            tablet: tablet.alias.clone(),
            addr: tablet.grpc_addr.clone(),
            reason,
        };
        if addr.is_empty() {
            return Err(bad("the registration has no grpc_addr".into()));
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let ep = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?;
        // No Nagle: a request written in several frames would otherwise wait ~40 ms for the
        // peer's delayed ACK.
        Ok(ep
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(self.connect_timeout)
            .keep_alive_while_idle(true))
    }

    /// A client for the agent of `tablet` (never blocks: a channel not warmed yet connects on
    /// its first call).
    pub fn client(&self, tablet: &TabletRecord) -> Result<AgentClient<Channel>, RecoveryError> {
        let addr = tablet.grpc_addr.trim().to_string();
        if let Some(ch) = self.cached(&addr) {
            return Ok(AgentClient::new(ch));
        }
        let ch = self.endpoint(tablet)?.connect_lazy();
        let ch = self.insert_if_absent(addr, ch);
        Ok(AgentClient::new(ch))
    }

    fn cached(&self, addr: &str) -> Option<Channel> {
        self.channels.lock().ok()?.get(addr).cloned()
    }

    fn insert_if_absent(&self, addr: String, ch: Channel) -> Channel {
        match self.channels.lock() {
            Ok(mut map) => map.entry(addr).or_insert(ch).clone(),
            Err(_) => ch,
        }
    }

    /// Connects to the agent of `tablet` in the background unless a channel exists, so that
    /// the first call of a recovery does not pay for the connection (~40 ms on loopback).
    /// Needs a tokio runtime.
    pub fn warm(&self, tablet: &TabletRecord) {
        let addr = tablet.grpc_addr.trim().to_string();
        if addr.is_empty() || self.cached(&addr).is_some() {
            return;
        }
        let Ok(ep) = self.endpoint(tablet) else {
            return;
        };
        // Reserve the slot with a lazy channel, replaced by the connected one.
        let lazy = ep.connect_lazy();
        self.insert_if_absent(addr.clone(), lazy);
        let channels = self.channels.clone();
        tokio::spawn(async move {
            if let Ok(ch) = ep.connect().await {
                if let Ok(mut map) = channels.lock() {
                    map.insert(addr, ch);
                }
            }
        });
    }

    /// Drops the cached channel of an address (e.g. after the tablet re-registered).
    pub fn forget(&self, grpc_addr: &str) {
        if let Ok(mut map) = self.channels.lock() {
            map.remove(grpc_addr.trim());
        }
    }
}

/// `FullStatus` of one agent, bounded.
pub async fn full_status(
    agents: &AgentClients,
    tablet: &TabletRecord,
    timeout: Duration,
) -> Result<pb::Health, RecoveryError> {
    let mut client = agents.client(tablet)?;
    let started = Instant::now();
    let r = tokio::time::timeout(timeout, client.full_status(pb::FullStatusRequest {})).await;
    tracing::debug!(tablet = %tablet.alias, took_ms = started.elapsed().as_secs_f64() * 1000.0, "FullStatus");
    match r {
        Err(_) => Err(RecoveryError::AgentTimeout {
            rpc: "FullStatus",
            tablet: tablet.alias.clone(),
            after: timeout,
        }),
        Ok(Err(status)) => Err(agent_error("FullStatus", &tablet.alias, &status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

fn agent_error(rpc: &'static str, tablet: &str, s: &tonic::Status) -> RecoveryError {
    let mut message = s.message().to_string();
    if let Some(src) = std::error::Error::source(s) {
        message.push_str(&format!(" ({src})"));
    }
    RecoveryError::Agent {
        rpc,
        tablet: tablet.to_string(),
        code: s.code(),
        message,
        stale: myha_proto::stale_term_refusal(s),
    }
}

// ---- audit sink -------------------------------------------------------------------------

enum AuditMsg {
    Entry {
        keyspace: String,
        shard: String,
        entry: AuditEntry,
    },
    Flush(oneshot::Sender<()>),
}

/// Appends audit entries in the background, in order, so recoveries never wait on etcd
/// writes for their log. An entry that cannot be written (etcd down) is retried a few times,
/// then logged and dropped.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditMsg>,
}

impl std::fmt::Debug for AuditMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditMsg::Entry {
                keyspace,
                shard,
                entry,
            } => {
                write!(f, "audit {keyspace}/{shard} {}", entry.action)
            }
            AuditMsg::Flush(_) => f.write_str("flush"),
        }
    }
}

/// One shard's audit log cut to `retention` (by age, then by count); a failure is logged and
/// retried at the next interval.
async fn prune_audit(topo: &Topo, keyspace: &str, shard: &str, retention: AuditRetention) {
    let cutoff = topo::now_ms().saturating_sub(millis(retention.max_age));
    let by_age = topo.prune_audit_before(keyspace, shard, cutoff).await;
    let by_count = topo.prune_audit(keyspace, shard, retention.keep).await;
    match (by_age, by_count) {
        (Ok(a), Ok(c)) => {
            if a + c > 0 {
                tracing::debug!(
                    keyspace,
                    shard,
                    by_age = a,
                    by_count = c,
                    "audit log pruned"
                );
                metrics::counter!("myha_orchestrator_audit_pruned_total").increment((a + c) as u64);
            }
        }
        (a, c) => tracing::warn!(
            keyspace, shard, by_age = ?a.err(), by_count = ?c.err(),
            "audit log pruning failed; retried later"
        ),
    }
}

impl AuditSink {
    /// Starts the writer task (needs a tokio runtime); it also prunes each shard's log it
    /// writes to, per `retention`.
    pub fn spawn(topo: Topo, retention: AuditRetention) -> AuditSink {
        let (tx, mut rx) = mpsc::channel::<AuditMsg>(4096);
        tokio::spawn(async move {
            let mut pruned_at: HashMap<(String, String), Instant> = HashMap::new();
            while let Some(msg) = rx.recv().await {
                match msg {
                    AuditMsg::Flush(done) => {
                        let _ = done.send(());
                    }
                    AuditMsg::Entry {
                        keyspace,
                        shard,
                        entry,
                    } => {
                        let mut last = None;
                        for attempt in 0..3u32 {
                            match topo.append_audit(&keyspace, &shard, &entry).await {
                                Ok(_) => {
                                    last = None;
                                    break;
                                }
                                Err(e) => {
                                    last = Some(e);
                                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                                }
                            }
                        }
                        if let Some(e) = last {
                            tracing::warn!(
                                keyspace, shard, action = %entry.action, outcome = %entry.outcome,
                                detail = %entry.detail, error = %e,
                                "audit entry could not be written to etcd; dropped"
                            );
                        }
                        let key = (keyspace, shard);
                        let due = pruned_at
                            .get(&key)
                            .is_none_or(|t| t.elapsed() >= retention.prune_interval);
                        if due {
                            prune_audit(&topo, &key.0, &key.1, retention).await;
                            pruned_at.insert(key, Instant::now());
                        }
                    }
                }
            }
        });
        AuditSink { tx }
    }

    /// Queues one entry (`at_ms` 0 means now). Never blocks; a full queue drops the entry
    /// with a warning.
    pub fn append(&self, keyspace: &str, shard: &str, mut entry: AuditEntry) {
        if entry.at_ms == 0 {
            entry.at_ms = topo::now_ms();
        }
        tracing::debug!(
            keyspace, shard, action = %entry.action, tablet = ?entry.tablet,
            outcome = %entry.outcome, detail = %entry.detail, "audit"
        );
        if let Err(e) = self.tx.try_send(AuditMsg::Entry {
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
            entry,
        }) {
            tracing::warn!(keyspace, shard, error = %e, "audit queue full or closed; entry dropped");
        }
    }

    /// Waits (up to `timeout`) until every entry queued before is written or dropped.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        if self.tx.send(AuditMsg::Flush(done)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }
}

// ---- dependencies, jobs, fresh state ----------------------------------------------------

/// What every recovery of this process shares.
#[derive(Clone, Debug)]
pub struct Deps {
    pub topo: Topo,
    pub agents: AgentClients,
    pub audit: AuditSink,
    pub cfg: Arc<RecoveryConfig>,
    /// `orchestrator@{hostname}:{pid}`: lock holder, audit actor, RPC requester.
    pub actor: Arc<str>,
    /// When each tablet's registration was last seen in a current snapshot.
    pub registrations: Arc<RegistrationsSeen>,
}

/// When each tablet's registration was last seen in etcd, by this process's synced watch (ms
/// since the epoch). A registration gone before a primary was lost means its agent was gone
/// then: the isolation rule cannot have demoted it (see `reparent::wait_for_self_demotion`).
#[derive(Debug, Default)]
pub struct RegistrationsSeen {
    seen: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl RegistrationsSeen {
    /// Notes every registration of a snapshot whose watches are current, at `now_ms`.
    pub fn observe(&self, snap: &tabletwatch::FleetSnapshot, now_ms: u64) {
        if !snap.topo_synced {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for shard in snap.shards.values() {
            for alias in shard.tablets.keys() {
                seen.insert(alias.clone(), now_ms);
            }
        }
    }

    /// When `alias` was last seen registered.
    pub fn last_seen(&self, alias: &str) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(alias).copied()
    }
}

impl Deps {
    /// Builds the shared handles (spawns the audit writer).
    pub fn new(topo: Topo, cfg: RecoveryConfig) -> Deps {
        Deps {
            agents: AgentClients::new(cfg.connect_timeout),
            audit: AuditSink::spawn(topo.clone(), cfg.audit),
            topo,
            cfg: Arc::new(cfg),
            actor: actor_name().into(),
            registrations: Arc::default(),
        }
    }
}

/// `orchestrator@{hostname}:{pid}`.
pub fn actor_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("orchestrator@{host}:{}", std::process::id())
}

/// The primary's position as last seen healthy in the snapshots (the reference for the errant
/// check of an emergency reparent: the dead primary cannot be asked any more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrimaryPosition {
    pub alias: String,
    pub term: u64,
    pub gtid_position: String,
    /// Server id (MariaDB) or uuid (MySQL) of the primary: its own writes are never errant.
    pub writer: String,
    pub flavor: &'static str,
    pub seen_ms: u64,
}

impl PrimaryPosition {
    /// From a health of the primary with mysqld reachable.
    pub fn from_health(alias: &str, term: u64, h: &pb::Health, now_ms: u64) -> Option<Self> {
        let m = h.mysql.as_ref().filter(|_| h.mysql_reachable)?;
        Some(PrimaryPosition {
            alias: alias.to_string(),
            term,
            gtid_position: m.gtid_position.clone(),
            writer: analysis::writer_id(h),
            flavor: match analysis::flavor_of(h) {
                gtid::Flavor::MySql => "mysql",
                _ => "mariadb",
            },
            seen_ms: now_ms,
        })
    }

    pub fn gtid_set(&self) -> Option<gtid::GtidSet> {
        let flavor = if self.flavor == "mysql" {
            gtid::Flavor::MySql
        } else {
            gtid::Flavor::MariaDb
        };
        gtid::GtidSet::parse(flavor, &self.gtid_position).ok()
    }
}

/// One recovery the engine asks for.
#[derive(Debug, Clone)]
pub struct Job {
    pub keyspace: String,
    pub shard: String,
    /// The problem as the engine saw it in the snapshot.
    pub problem: Problem,
    /// Quarantined tablets (alias -> reason), from the control cache.
    pub quarantined: BTreeMap<String, String>,
    /// The primary's last healthy position from the snapshots, if known.
    pub last_primary: Option<PrimaryPosition>,
}

/// The shard as re-read under the lock: etcd records and every agent's `FullStatus`.
#[derive(Debug, Clone)]
pub struct FreshShard {
    pub record: Option<ShardRecord>,
    /// etcd `mod_revision` of the record (0 without one).
    pub record_revision: i64,
    pub durability: Durability,
    /// Registered tablets, by alias.
    pub tablets: BTreeMap<String, TabletRecord>,
    /// Answers of the agents that answered, by alias.
    pub statuses: BTreeMap<String, pb::Health>,
    /// Why each silent agent is unseen, by alias.
    pub unseen: BTreeMap<String, String>,
    /// The analysis input built from the above.
    pub input: ShardInput,
    /// `analyze(input)`.
    pub problems: Vec<Problem>,
    /// Tablet records under the prefix that could not be decoded, skipped.
    pub unreadable: Vec<topo::Unreadable>,
}

impl FreshShard {
    /// The record's term (0 without a record).
    pub fn record_term(&self) -> u64 {
        self.record.as_ref().map_or(0, |r| r.term)
    }

    /// The highest term any answering agent reports (its known term or promoted term).
    pub fn highest_reported_term(&self) -> u64 {
        self.statuses
            .values()
            .map(|h| h.term.max(h.promoted_term))
            .max()
            .unwrap_or(0)
    }

    /// A term every answering agent accepts: max(record, reported).
    pub fn action_term(&self) -> u64 {
        self.record_term().max(self.highest_reported_term())
    }

    /// The term a new promotion must use: above the record's, any reservation, and anything an
    /// agent reports.
    pub fn next_promotion_term(&self) -> u64 {
        let reserved = self.record.as_ref().map_or(0, |r| r.reserved_term);
        reparent::next_term(self.record_term(), reserved, self.highest_reported_term())
    }
}

/// A primary already suspected dead gets this long to answer the refresh: a frozen mysqld
/// keeps its agent's `FullStatus` waiting for the agent's own query timeout, and the reparent
/// must not wait for that. One that answers alive in time cancels the reparent.
/// How often [`RecoveryContext::apply_received`] audits the progress of a long apply.
pub const APPLY_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// An action is only sent while the shard lock's local lease deadline is at least this far away:
/// the RPC must reach the agent before another orchestrator could take the lock.
pub const LOCK_DEADLINE_MARGIN: Duration = Duration::from_millis(200);

pub const SUSPECT_STATUS_TIMEOUT: Duration = Duration::from_millis(150);

/// Re-reads the shard record, keyspace and registrations from etcd, and asks every registered
/// tablet's agent for `FullStatus` in parallel (each bounded by `status_timeout`, the
/// `suspect`'s by [`SUSPECT_STATUS_TIMEOUT`]).
pub async fn refresh(
    deps: &Deps,
    keyspace: &str,
    shard: &str,
    quarantined: &BTreeMap<String, String>,
    suspect: Option<&str>,
) -> Result<FreshShard, RecoveryError> {
    let topo = &deps.topo;
    let (rec, tablets, ks) = tokio::join!(
        topo.get_shard(keyspace, shard),
        topo.list_tablets_reporting(Some(keyspace), Some(shard)),
        topo.get_keyspace(keyspace),
    );
    let rec = rec.map_err(RecoveryError::topo("read the shard record"))?;
    // One corrupt or unknown-variant tablet record (of this shard or any other) must not stop
    // this shard's recovery: it is skipped, and reported with every recovery it is seen in.
    let (tablets, unreadable) = tablets.map_err(RecoveryError::topo("list the shard's tablets"))?;
    let ks = ks
        .map_err(RecoveryError::topo("read the keyspace record"))?
        .ok_or_else(|| {
            RecoveryError::Refused(format!(
                "keyspace record {keyspace} does not exist: durability unknown"
            ))
        })?;
    let tablets: BTreeMap<String, TabletRecord> =
        tablets.into_iter().map(|t| (t.alias.clone(), t)).collect();
    let answers = futures::future::join_all(tablets.values().map(|t| async {
        let bound = if suspect == Some(t.alias.as_str()) {
            SUSPECT_STATUS_TIMEOUT.min(deps.cfg.status_timeout)
        } else {
            deps.cfg.status_timeout
        };
        (t.alias.clone(), full_status(&deps.agents, t, bound).await)
    }))
    .await;
    let mut statuses = BTreeMap::new();
    let mut unseen = BTreeMap::new();
    for (alias, r) in answers {
        match r {
            Ok(h) => {
                statuses.insert(alias, h);
            }
            Err(e) => {
                unseen.insert(alias, e.to_string());
            }
        }
    }
    let (record, record_revision) = match rec {
        Some((r, rev)) => (Some(r), rev),
        None => (None, 0),
    };
    let input = input::fresh_input(
        keyspace,
        shard,
        record.clone(),
        ks.durability,
        tablets.values().cloned().collect(),
        &statuses,
        quarantined.clone(),
        topo::now_ms(),
    );
    let problems = analysis::analyze(&input, &deps.cfg.analysis);
    Ok(FreshShard {
        record,
        record_revision,
        durability: ks.durability,
        tablets,
        statuses,
        unseen,
        input,
        problems,
        unreadable,
    })
}

// ---- the context ------------------------------------------------------------------------

/// One recovery under the shard lock: the fresh shard, the term actions run under, and the
/// steps so far. Every typed RPC helper is one step: bounded, timed, recorded and audited.
#[derive(Debug)]
pub struct RecoveryContext {
    pub deps: Deps,
    pub keyspace: String,
    pub shard: String,
    /// The problem being recovered, as re-found under the lock.
    pub problem: Problem,
    pub job: Job,
    pub fresh: FreshShard,
    lock: ShardLock,
    term: AtomicU64,
    steps: Mutex<Vec<StepRecord>>,
    started: Instant,
    observer: Option<StepObserver>,
}

impl RecoveryContext {
    pub fn new(deps: Deps, job: Job, problem: Problem, fresh: FreshShard, lock: ShardLock) -> Self {
        let term = fresh.action_term();
        RecoveryContext {
            deps,
            keyspace: job.keyspace.clone(),
            shard: job.shard.clone(),
            problem,
            job,
            fresh,
            lock,
            term: AtomicU64::new(term),
            steps: Mutex::default(),
            started: Instant::now(),
            observer: None,
        }
    }

    /// Every step recorded from now on is also given to `observer`.
    pub fn with_observer(mut self, observer: StepObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn cfg(&self) -> &RecoveryConfig {
        &self.deps.cfg
    }

    /// The term agent actions run under. Starts at [`FreshShard::action_term`].
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// Changes the term of the following actions (e.g. the new term of a reparent).
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::SeqCst);
    }

    /// The held shard lock (for lock-conditional writes: [`ShardLock::update_shard`]).
    pub fn lock(&self) -> &ShardLock {
        &self.lock
    }

    pub fn durability(&self) -> Durability {
        self.fresh.durability
    }

    /// When the recovery started (after the lock was taken).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A registered tablet of the shard.
    pub fn tablet(&self, alias: &str) -> Result<&TabletRecord, RecoveryError> {
        self.fresh
            .tablets
            .get(alias)
            .ok_or_else(|| RecoveryError::UnknownTablet(alias.to_string()))
    }

    /// The fresh `FullStatus` of a tablet (None: its agent did not answer).
    pub fn status(&self, alias: &str) -> Option<&pb::Health> {
        self.fresh.statuses.get(alias)
    }

    /// The `ActionContext` of an action now.
    pub fn action_context(&self, timeout: Duration) -> pb::ActionContext {
        pb::ActionContext {
            term: self.term(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            requester: self.deps.actor.to_string(),
            lock_epoch: self.lock.epoch(),
        }
    }

    /// The steps recorded so far.
    pub fn steps(&self) -> Vec<StepRecord> {
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Appends one entry to the shard's audit log (queued; see [`AuditSink`]).
    pub fn audit(
        &self,
        action: &str,
        tablet: Option<&str>,
        outcome: &str,
        detail: impl Into<String>,
        duration: Option<Duration>,
    ) {
        self.deps.audit.append(
            &self.keyspace,
            &self.shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term: self.term(),
                actor: self.deps.actor.to_string(),
                action: action.to_string(),
                tablet: tablet.map(str::to_string),
                outcome: outcome.to_string(),
                detail: detail.into(),
                duration_ms: duration.map(millis),
            },
        );
    }

    /// Records (and audits) a step that already ran.
    pub fn record_step(
        &self,
        name: &str,
        tablet: Option<&str>,
        ok: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        let detail = detail.into();
        let outcome = if ok { OUTCOME_OK } else { OUTCOME_FAILED };
        self.audit(name, tablet, outcome, detail.clone(), Some(duration));
        let record = StepRecord {
            name: name.to_string(),
            tablet: tablet.map(str::to_string),
            ok,
            detail,
            at_ms: topo::now_ms(),
            duration_ms: millis(duration),
        };
        if let Some(o) = &self.observer {
            (o.0)(&record);
        }
        if let Ok(mut s) = self.steps.lock() {
            s.push(record);
        }
    }

    /// Records `name` as a failed step with `why` and returns the refusal carrying it.
    pub fn refuse(&self, name: &str, tablet: Option<&str>, why: String) -> RecoveryError {
        self.record_step(name, tablet, false, why.clone(), Duration::ZERO);
        RecoveryError::Refused(why)
    }

    /// Runs `fut` as one step named `name`: timed, recorded and audited. `describe` turns a
    /// success into the step's detail.
    pub async fn step<T, F>(
        &self,
        name: &str,
        tablet: Option<&str>,
        fut: F,
        describe: impl FnOnce(&T) -> String,
    ) -> Result<T, RecoveryError>
    where
        F: Future<Output = Result<T, RecoveryError>>,
    {
        let started = Instant::now();
        let r = fut.await;
        let took = started.elapsed();
        match &r {
            Ok(v) => self.record_step(name, tablet, true, describe(v), took),
            Err(e) => self.record_step(name, tablet, false, e.to_string(), took),
        }
        r
    }

    /// One agent action as a step: the client, the bound, the error mapping.
    async fn action<Fut>(
        &self,
        rpc: &'static str,
        step: &str,
        alias: &str,
        timeout: Duration,
        call: impl FnOnce(AgentClient<Channel>, pb::ActionContext) -> Fut,
    ) -> Result<pb::ActionResponse, RecoveryError>
    where
        Fut: Future<Output = Result<tonic::Response<pb::ActionResponse>, tonic::Status>>,
    {
        let fut = self.call_agent(rpc, alias, timeout, call);
        self.step(step, Some(alias), fut, |r: &pb::ActionResponse| {
            format!(
                "{} (term {}, position {})",
                r.steps.join("; "),
                r.term,
                r.gtid_position
            )
        })
        .await
    }

    /// One agent action, not recorded: the client, the bound, the error mapping.
    async fn call_agent<Fut>(
        &self,
        rpc: &'static str,
        alias: &str,
        timeout: Duration,
        call: impl FnOnce(AgentClient<Channel>, pb::ActionContext) -> Fut,
    ) -> Result<pb::ActionResponse, RecoveryError>
    where
        Fut: Future<Output = Result<tonic::Response<pb::ActionResponse>, tonic::Status>>,
    {
        // Never act for a lock we may no longer hold: another instance may own the shard now.
        // The local lease deadline is checked right before sending, since the keep-alive task
        // only notices a loss after a round trip (a freeze past the TTL wakes both at once).
        if let Err(e) = self.lock.check_deadline(LOCK_DEADLINE_MARGIN) {
            let why =
                format!("shard lock not certainly held before {rpc} on {alias}: {e}; stopping");
            self.record_step(
                "lock_deadline",
                Some(alias),
                false,
                why.clone(),
                Duration::ZERO,
            );
            return Err(RecoveryError::Refused(why));
        }
        let client = self.deps.agents.client(self.tablet(alias)?)?;
        let ctx = self.action_context(timeout);
        // The agent bounds the action itself; our bound only covers a silent agent.
        let bound = timeout + Duration::from_millis(500);
        match tokio::time::timeout(bound, call(client, ctx)).await {
            Err(_) => Err(RecoveryError::AgentTimeout {
                rpc,
                tablet: alias.to_string(),
                after: bound,
            }),
            Ok(Err(status)) => Err(agent_error(rpc, alias, &status)),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }

    /// Applies everything `alias` received (`received`, its IO thread stopped), lifting a
    /// replication delay, within `bound` (`relay_log_wait`). Waits in slices of
    /// [`APPLY_PROGRESS_EVERY`] and audits the applied position after each one, so that a large
    /// transaction's progress shows; one `apply_relay_log` step records the outcome.
    pub async fn apply_received(
        &self,
        alias: &str,
        received: &str,
        bound: Duration,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let started = Instant::now();
        let mut slices = 0u32;
        let r = loop {
            let left = bound.saturating_sub(started.elapsed());
            let slice = left.min(APPLY_PROGRESS_EVERY);
            let pos = received.to_string();
            let r = self
                .call_agent("WaitForPosition", alias, slice, |mut c, ctx| async move {
                    c.wait_for_position(pb::WaitForPositionRequest {
                        ctx: Some(ctx),
                        gtid_position: pos,
                        lift_delay: true,
                    })
                    .await
                })
                .await;
            slices += 1;
            let timed_out = matches!(&r, Err(RecoveryError::Agent { code, .. }) if *code == tonic::Code::DeadlineExceeded)
                || matches!(&r, Err(RecoveryError::AgentTimeout { .. }));
            if !timed_out || started.elapsed() + Duration::from_millis(10) >= bound {
                break r;
            }
            let at = self
                .full_status(alias)
                .await
                .ok()
                .and_then(|h| h.mysql.map(|m| m.gtid_position))
                .unwrap_or_else(|| "unknown".into());
            self.record_step(
                "apply_relay_log_progress",
                Some(alias),
                true,
                format!(
                    "applying what it received: at {at}, target {received}, {:.1} s of {:?}",
                    started.elapsed().as_secs_f64(),
                    bound
                ),
                started.elapsed(),
            );
        };
        let took = started.elapsed();
        match &r {
            Ok(v) => self.record_step(
                "apply_relay_log",
                Some(alias),
                true,
                format!(
                    "applied everything received up to {received}: {} (position {}, {slices} wait(s))",
                    v.steps.join("; "),
                    v.gtid_position
                ),
                took,
            ),
            Err(e) => self.record_step(
                "apply_relay_log",
                Some(alias),
                false,
                format!("not applied within {bound:?}: {e}"),
                took,
            ),
        }
        r
    }

    /// `FullStatus`, bounded by `status_timeout`; not a step (it changes nothing).
    pub async fn full_status(&self, alias: &str) -> Result<pb::Health, RecoveryError> {
        full_status(
            &self.deps.agents,
            self.tablet(alias)?,
            self.cfg().status_timeout,
        )
        .await
    }

    pub async fn stop_replication(
        &self,
        alias: &str,
        io_only: bool,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let scope = scope(io_only);
        let name = if io_only {
            "stop_io_thread"
        } else {
            "stop_replication"
        };
        let t = self.cfg().action_timeout;
        self.action("StopReplication", name, alias, t, |mut c, ctx| async move {
            c.stop_replication(pb::StopReplicationRequest {
                ctx: Some(ctx),
                scope,
            })
            .await
        })
        .await
    }

    pub async fn start_replication(
        &self,
        alias: &str,
        io_only: bool,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let scope = scope(io_only);
        let name = if io_only {
            "start_io_thread"
        } else {
            "start_replication"
        };
        let t = self.cfg().action_timeout;
        self.action(
            "StartReplication",
            name,
            alias,
            t,
            |mut c, ctx| async move {
                c.start_replication(pb::StartReplicationRequest {
                    ctx: Some(ctx),
                    scope,
                })
                .await
            },
        )
        .await
    }

    /// Waits up to `timeout` for `gtid_position` to be applied.
    pub async fn wait_for_position(
        &self,
        step: &str,
        alias: &str,
        gtid_position: &str,
        timeout: Duration,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let pos = gtid_position.to_string();
        self.action(
            "WaitForPosition",
            step,
            alias,
            timeout,
            |mut c, ctx| async move {
                c.wait_for_position(pb::WaitForPositionRequest {
                    ctx: Some(ctx),
                    gtid_position: pos,
                    lift_delay: false,
                })
                .await
            },
        )
        .await
    }

    pub async fn set_read_only(
        &self,
        alias: &str,
        read_only: bool,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        let name = if read_only {
            "set_read_only_on"
        } else {
            "set_read_only_off"
        };
        self.action("SetReadOnly", name, alias, t, |mut c, ctx| async move {
            c.set_read_only(pb::SetReadOnlyRequest {
                ctx: Some(ctx),
                read_only,
                super_read_only: read_only,
            })
            .await
        })
        .await
    }

    /// Asks `via`'s agent to fence the mysqld at `addr` (`host:port`) of `target`, a deposed
    /// primary whose own agent is gone: read-only, client sessions killed. Bounded by `bound`.
    pub async fn fence_server(
        &self,
        via: &str,
        target: &str,
        addr: &str,
        bound: Duration,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u32>().ok()?)))
            .ok_or_else(|| RecoveryError::Failed(format!("bad mysqld address {addr:?}")))?;
        let target = target.to_string();
        self.action(
            "FenceServer",
            "fence_old_primary",
            via,
            bound,
            |mut c, ctx| async move {
                c.fence_server(pb::FenceServerRequest {
                    ctx: Some(ctx),
                    host,
                    port,
                    alias: target,
                })
                .await
            },
        )
        .await
    }

    /// Points `alias` at `source` (a tablet of the shard).
    pub async fn set_replication_source(
        &self,
        step: &str,
        alias: &str,
        source: &TabletRecord,
        semi_sync: bool,
        start_replication: bool,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        let host = source.mysql_host.clone();
        let port = u32::from(source.mysql_port);
        self.action(
            "SetReplicationSource",
            step,
            alias,
            t,
            |mut c, ctx| async move {
                c.set_replication_source(pb::SetReplicationSourceRequest {
                    ctx: Some(ctx),
                    host,
                    port,
                    semi_sync,
                    start_replication,
                })
                .await
            },
        )
        .await
    }

    /// Points every tablet of `targets` at `source` (replication started, semi-sync replica side
    /// per `semi_sync`) in parallel, one `repoint` step each: (repointed, "alias: error" of the
    /// failed ones). A failure is not an error of the reparent: the new primary is in place and
    /// the repairs finish the rest.
    pub async fn repoint_all(
        &self,
        targets: &[String],
        source: &TabletRecord,
        semi_sync: bool,
    ) -> (Vec<String>, Vec<String>) {
        let results = futures::future::join_all(targets.iter().map(|a| async move {
            let r = self
                .set_replication_source("repoint", a, source, semi_sync, true)
                .await;
            (a.clone(), r)
        }))
        .await;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for (a, r) in results {
            match r {
                Ok(_) => ok.push(a),
                Err(e) => failed.push(format!("{a}: {e}")),
            }
        }
        (ok, failed)
    }

    pub async fn reset_replication(
        &self,
        alias: &str,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        self.action(
            "ResetReplication",
            "reset_replication",
            alias,
            t,
            |mut c, ctx| async move {
                c.reset_replication(pb::ResetReplicationRequest { ctx: Some(ctx) })
                    .await
            },
        )
        .await
    }

    /// Sets either side of semi-sync (`None` leaves it).
    pub async fn set_semi_sync(
        &self,
        alias: &str,
        primary: Option<bool>,
        replica: Option<bool>,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        self.action(
            "SetSemiSync",
            "set_semi_sync",
            alias,
            t,
            |mut c, ctx| async move {
                c.set_semi_sync(pb::SetSemiSyncRequest {
                    ctx: Some(ctx),
                    primary,
                    replica,
                })
                .await
            },
        )
        .await
    }

    /// Promotes under [`RecoveryContext::term`] with the shard's durability.
    pub async fn promote(&self, alias: &str) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        let durability = match self.durability() {
            Durability::None => pb::Durability::None,
            Durability::SemiSync => pb::Durability::SemiSync,
        } as i32;
        self.action("Promote", "promote", alias, t, |mut c, ctx| async move {
            c.promote(pb::PromoteRequest {
                ctx: Some(ctx),
                durability,
            })
            .await
        })
        .await
    }

    pub async fn demote(&self, alias: &str) -> Result<pb::ActionResponse, RecoveryError> {
        self.demote_within(alias, self.cfg().action_timeout).await
    }

    /// `Demote` bounded by `t` instead of `action_timeout`.
    pub async fn demote_within(
        &self,
        alias: &str,
        t: Duration,
    ) -> Result<pb::ActionResponse, RecoveryError> {
        self.action("Demote", "demote", alias, t, |mut c, ctx| async move {
            c.demote(pb::DemoteRequest { ctx: Some(ctx) }).await
        })
        .await
    }

    pub async fn undo_demote(&self, alias: &str) -> Result<pb::ActionResponse, RecoveryError> {
        let t = self.cfg().action_timeout;
        self.action(
            "UndoDemote",
            "undo_demote",
            alias,
            t,
            |mut c, ctx| async move {
                c.undo_demote(pb::UndoDemoteRequest { ctx: Some(ctx) })
                    .await
            },
        )
        .await
    }

    /// Reserves `term` in the shard record (conditional on the lock) before acting with it.
    pub async fn reserve_term(&self, term: u64) -> Result<(), RecoveryError> {
        let mut record = self
            .fresh
            .record
            .clone()
            .unwrap_or_else(|| ShardRecord::new(self.keyspace.clone(), self.shard.clone()));
        record.reserved_term = record.reserved_term.max(term);
        self.write_shard_record(&record).await.map(drop)
    }

    /// Writes the shard record, conditional on holding the lock (a step).
    pub async fn write_shard_record(&self, record: &ShardRecord) -> Result<i64, RecoveryError> {
        self.write_shard_record_as("write_shard_record", record)
            .await
    }

    /// [`RecoveryContext::write_shard_record`] as a step named `step`.
    pub async fn write_shard_record_as(
        &self,
        step: &str,
        record: &ShardRecord,
    ) -> Result<i64, RecoveryError> {
        let fut = async {
            self.lock
                .update_shard(record)
                .await
                .map_err(RecoveryError::topo("write the shard record under the lock"))
        };
        self.step(step, record.primary.as_deref(), fut, |rev| {
            format!(
                "primary {} term {}{} (etcd revision {rev})",
                record.primary.as_deref().unwrap_or("none"),
                record.term,
                record
                    .reparent_in_progress
                    .as_deref()
                    .map(|m| format!(", reparent in progress: {m}"))
                    .unwrap_or_default()
            )
        })
        .await
    }

    /// Gives the lock back (to release it).
    pub fn into_lock(self) -> ShardLock {
        self.lock
    }
}

fn scope(io_only: bool) -> i32 {
    if io_only {
        pb::ReplicationScope::IoOnly as i32
    } else {
        pb::ReplicationScope::Both as i32
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---- running one recovery ---------------------------------------------------------------

/// What a recovery attempt did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub keyspace: String,
    pub shard: String,
    pub problem: Problem,
    pub outcome: Outcome,
    pub steps: Vec<StepRecord>,
    /// The term written to the shard record, when the recovery changed it.
    pub new_term: Option<u64>,
    pub started_ms: u64,
    pub duration_ms: u64,
}

/// What a successful dispatch returns: the detail, and the new term and primary, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Done {
    pub detail: String,
    pub new_term: Option<u64>,
    pub new_primary: Option<String>,
}

/// The problem in `problems` that is "the same" as `wanted`: same code (any dead-primary
/// variant for a dead primary) and same tablet.
pub fn same_problem<'a>(wanted: &Problem, problems: &'a [Problem]) -> Option<&'a Problem> {
    problems.iter().find(|p| {
        let code_matches = if wanted.code.is_dead_primary() {
            p.code.is_dead_primary()
        } else {
            p.code == wanted.code
        };
        code_matches && p.tablet == wanted.tablet
    })
}

/// Runs one recovery: lock, flapping check, refresh, re-analysis, action, summary, unlock.
pub async fn run(deps: Deps, job: Job) -> Report {
    let started = Instant::now();
    let started_ms = topo::now_ms();
    let (outcome, steps, new_term, problem) = run_locked(&deps, &job).await;
    let report = Report {
        keyspace: job.keyspace.clone(),
        shard: job.shard.clone(),
        problem: problem.unwrap_or_else(|| job.problem.clone()),
        outcome,
        steps,
        new_term,
        started_ms,
        duration_ms: millis(started.elapsed()),
    };
    metrics::counter!(
        "myha_orchestrator_recoveries_total",
        "problem" => report.problem.code.as_str(),
        "outcome" => report.outcome.label()
    )
    .increment(1);
    report
}

type Ran = (Outcome, Vec<StepRecord>, Option<u64>, Option<Problem>);

async fn run_locked(deps: &Deps, job: &Job) -> Ran {
    let (ks, shard) = (job.keyspace.as_str(), job.shard.as_str());
    let code = job.problem.code;
    let audit_now = |action: &str, outcome: &str, detail: String| {
        deps.audit.append(
            ks,
            shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term: 0,
                actor: deps.actor.to_string(),
                action: action.to_string(),
                tablet: job.problem.tablet.clone(),
                outcome: outcome.to_string(),
                detail,
                duration_ms: None,
            },
        )
    };
    let purpose = if code.is_dead_primary() {
        format!("emergency reparent ({})", job.problem.detail)
    } else {
        format!("repair {}", code.as_str())
    };
    let req = LockRequest::new(deps.actor.to_string(), purpose)
        .with_ttl(deps.cfg.lock_ttl)
        .with_wait(deps.cfg.lock_wait);
    let lock_started = Instant::now();
    let lock = match deps.topo.lock_shard(ks, shard, req).await {
        Ok(l) => l,
        Err(TopoError::LockHeld { holder, .. }) => {
            tracing::debug!(
                keyspace = ks, shard, problem = code.as_str(), holder = %holder.holder,
                purpose = %holder.purpose, "shard lock held by another instance; it acts"
            );
            return (
                Outcome::LockHeld {
                    holder: format!("{} ({})", holder.holder, holder.purpose),
                },
                Vec::new(),
                None,
                None,
            );
        }
        Err(e) => {
            let reason = format!("no recovery without the shard lock: {e}");
            tracing::warn!(keyspace = ks, shard, problem = code.as_str(), %reason, "recovery not started");
            audit_now(action_name(code), OUTCOME_FAILED, reason.clone());
            return (Outcome::Failed { error: reason }, Vec::new(), None, None);
        }
    };
    if code.is_dead_primary() {
        reparent::phase("lock", lock_started.elapsed());
    }
    let (outcome, steps, new_term, problem) = under_lock(deps, job, lock).await;
    (outcome, steps, new_term, problem)
}

fn action_name(code: ProblemCode) -> &'static str {
    if code.is_dead_primary() {
        ACTION_EMERGENCY_REPARENT
    } else {
        code.as_str()
    }
}

/// Releases a shard lock at the end of an operation; a failure is only logged (the lock
/// expires with its lease).
pub async fn release_lock(lock: ShardLock, keyspace: &str, shard: &str) {
    if let Err(e) = lock.release().await {
        tracing::warn!(keyspace, shard, error = %e, "releasing the shard lock (it expires with its lease)");
    }
}

async fn under_lock(deps: &Deps, job: &Job, lock: ShardLock) -> Ran {
    let (ks, shard) = (job.keyspace.as_str(), job.shard.as_str());
    let code = job.problem.code;
    let action = action_name(code);
    let release = |lock: ShardLock| release_lock(lock, ks, shard);
    let summary = |term: u64, outcome: &str, detail: String, took: Duration| {
        deps.audit.append(
            ks,
            shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term,
                actor: deps.actor.to_string(),
                action: action.to_string(),
                tablet: job.problem.tablet.clone(),
                outcome: outcome.to_string(),
                detail,
                duration_ms: Some(millis(took)),
            },
        )
    };
    let t0 = Instant::now();
    // Flapping, from the audit log (every instance agrees on it).
    match control::Control::new(deps.topo.clone())
        .flapping(
            ks,
            shard,
            deps.cfg.flap_limit,
            deps.cfg.flap_window,
            topo::now_ms(),
        )
        .await
    {
        Ok(Some(f)) => {
            let reason = f.reason(ks, shard);
            summary(0, OUTCOME_SKIPPED, reason.clone(), t0.elapsed());
            release(lock).await;
            return (Outcome::Skipped { reason }, Vec::new(), None, None);
        }
        Ok(None) => {}
        Err(e) => {
            // Not knowing is not a reason to leave a dead primary dead: act, and say so.
            tracing::warn!(keyspace = ks, shard, error = %e, "flapping check failed; proceeding");
        }
    }
    let suspect = job
        .problem
        .code
        .is_dead_primary()
        .then_some(job.problem.tablet.as_deref())
        .flatten();
    let fresh = match refresh(deps, ks, shard, &job.quarantined, suspect).await {
        Ok(f) => f,
        Err(e) => {
            let outcome = Outcome::from(e);
            summary(
                0,
                outcome.audit_outcome(),
                format!("refresh under the lock: {}", outcome.text()),
                t0.elapsed(),
            );
            release(lock).await;
            return (outcome, Vec::new(), None, None);
        }
    };
    if code.is_dead_primary() {
        reparent::phase("refresh", t0.elapsed());
    }
    let term = fresh.record_term();
    let Some(problem) = same_problem(&job.problem, &fresh.problems).cloned() else {
        let now: Vec<String> = fresh
            .problems
            .iter()
            .map(|p| {
                format!(
                    "{}{}",
                    p.code.as_str(),
                    p.tablet
                        .as_deref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        let detail = format!(
            "problem gone after lock: {} {} no longer found (now: {})",
            code.as_str(),
            job.problem.tablet.as_deref().unwrap_or(""),
            if now.is_empty() {
                "none".to_string()
            } else {
                now.join(", ")
            }
        );
        tracing::info!(keyspace = ks, shard, %detail, "recovery not needed");
        summary(term, OUTCOME_GONE, detail.clone(), t0.elapsed());
        release(lock).await;
        return (Outcome::ProblemGone { detail }, Vec::new(), None, None);
    };
    let ctx = RecoveryContext::new(deps.clone(), job.clone(), problem.clone(), fresh, lock);
    for u in &ctx.fresh.unreadable {
        ctx.audit(
            "unreadable_record",
            None,
            OUTCOME_SKIPPED,
            format!(
                "{}: {}: skipped; this recovery acts on the records that can be read",
                u.key, u.error
            ),
            None,
        );
    }
    let result = match problem.code.facts().remedy {
        Remedy::DemoteThenEmergencyReparent => reparent::stalled_primary_reparent(&ctx).await,
        Remedy::EmergencyReparent => reparent::emergency_reparent(&ctx).await,
        remedy => repair::repair(&ctx, &problem, remedy).await,
    };
    let took = ctx.started().elapsed();
    let (outcome, new_term) = match result {
        Ok(done) => (
            Outcome::Recovered {
                detail: done.detail,
            },
            done.new_term,
        ),
        Err(e) => (Outcome::from(e), None),
    };
    summary(
        ctx.term(),
        outcome.audit_outcome(),
        format!("{}: {}", problem.detail, outcome.text()),
        took,
    );
    match &outcome {
        Outcome::Recovered { .. } => {
            tracing::info!(
                keyspace = ks,
                shard,
                problem = problem.code.as_str(),
                detail = outcome.text(),
                ?took,
                "recovered"
            )
        }
        _ => tracing::warn!(
            keyspace = ks,
            shard,
            problem = problem.code.as_str(),
            outcome = outcome.label(),
            detail = outcome.text(),
            ?took,
            "recovery did not succeed"
        ),
    }
    let steps = ctx.steps();
    release(ctx.into_lock()).await;
    (outcome, steps, new_term, Some(problem))
}
