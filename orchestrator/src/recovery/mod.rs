//! Recoveries: what runs under a shard's etcd lock once the engine decided to act.
//!
//! [`run`] is the one entry point the engine calls for every recovery: it takes the shard lock
//! (a short wait; held by another instance means that instance acts), checks flapping against
//! the audit log, refreshes the shard from etcd and from every agent's `FullStatus`
//! ([`refresh()`]), re-runs the analysis on those fresh answers and only acts if the same problem
//! is still there. It then drives the remedy's step machine ([`runner::machine_for`]: the
//! emergency reparents, [`repair::Reconcile`], [`repair::Sequence`] for every other repair),
//! records a summary under the newest term the run acted under, and releases the lock.
//!
//! A recovery talks to agents through [`RecoveryContext`]'s typed RPC helpers: each one is one
//! step, bounded by `action_timeout`, run under the term it names, timed, recorded in
//! the context and appended to the shard's audit log (asynchronously, in order, by
//! [`AuditSink`], so the etcd writes never slow the recovery down).
//!
//! Layout: this file holds the configuration, the errors and the outcomes; [`clients`] the
//! agents' channels and calls, [`audit`] the audit sink, [`refresh`] what recoveries share and
//! the fresh shard read under the lock, [`context`] one recovery's steps, [`runner`] the one
//! lock-run-release path; [`steps`] the vocabulary of step machines (calls, replies, the
//! `AgentApi`/`TopoApi` traits) and the one shell that drives them; [`reparent`] (a step
//! machine), [`planned`] and [`repair`] the procedures.

pub mod planned;
pub mod repair;
pub mod reparent;
pub mod steps;

mod audit;
mod clients;
mod context;
mod refresh;
mod runner;

pub use audit::*;
pub use clients::*;
pub use context::*;
pub use refresh::*;
pub use runner::*;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
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

pub use myha_api::{ACTION_EMERGENCY_REPARENT, ACTION_PLANNED_REPARENT};
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

impl Outcome {
    /// A refusal is `Refused`, any other error `Failed`.
    pub fn of_error(e: &RecoveryError) -> Outcome {
        match e {
            RecoveryError::Refused(reason) => Outcome::Refused {
                reason: reason.clone(),
            },
            e => Outcome::Failed {
                error: e.to_string(),
            },
        }
    }

    /// How a driven machine's result reads as an outcome.
    pub fn of_result(r: &Result<Done, RecoveryError>) -> Outcome {
        match r {
            Ok(done) => Outcome::Recovered {
                detail: done.detail.clone(),
            },
            Err(e) => Outcome::of_error(e),
        }
    }
}

impl From<RecoveryError> for Outcome {
    fn from(e: RecoveryError) -> Outcome {
        Outcome::of_error(&e)
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
