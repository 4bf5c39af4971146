//! The vocabulary of recovery step machines and the one async shell that performs them.
//!
//! A recovery procedure written as a step machine ([`StepMachine`]) decides and never waits:
//! given the clock ([`Now`]) and the reply to one of its calls, it returns what to do next
//! ([`Action`]): calls to agents or etcd (several may be outstanding at once: they run in
//! parallel), steps to record, and finally its result. What an exit path must undo is derived
//! from the machine's own state (what it stopped, demoted or promoted), not written per exit.
//!
//! [`drive`] is the production shell: it performs each call over [`AgentApi`] and [`TopoApi`]
//! (implemented by [`RecoveryContext`]: bounded, lock-deadline checked, timed and audited),
//! feeds the replies back as they complete and records the machine's steps. The simulator
//! drives the same machines on virtual time against its models instead.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};
use myha_proto::agent as pb;
use topo::{PromotionRecord, ShardRecord, TabletRecord, Term};

use super::{Done, RecoveryContext, RecoveryError, OUTCOME_OK};

/// Names one outstanding call of a machine (unique within one run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u32);

/// The clock as a machine sees it: monotonic time since the run started (for durations and
/// bounds) and the wall clock in ms (for timestamps compared with other hosts').
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub since_start: Duration,
    pub wall_ms: u64,
}

/// One agent action, sent under an explicit term (the fencing token). Each is one RPC of the
/// agent contract, except `ApplyReceived`, which waits in slices and audits progress.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAction {
    StopReplication {
        io_only: bool,
    },
    StartReplication {
        io_only: bool,
    },
    /// Waits up to `bound` for `position` to be applied (`step` names the recorded step).
    WaitForPosition {
        step: &'static str,
        position: String,
        bound: Duration,
    },
    /// Applies everything received up to `received`, lifting a replication delay, within
    /// `bound` (see [`RecoveryContext::apply_received`]).
    ApplyReceived {
        received: String,
        bound: Duration,
    },
    SetReadOnly {
        read_only: bool,
    },
    /// Points the tablet at `source` (`step` names the recorded step).
    SetReplicationSource {
        step: &'static str,
        source: TabletRecord,
        semi_sync: bool,
        start_replication: bool,
    },
    ResetReplication,
    SetSemiSync {
        primary: Option<bool>,
        replica: Option<bool>,
    },
    /// Promotes with the shard's durability.
    Promote,
    Demote {
        bound: Duration,
    },
    UndoDemote,
    /// Fences the mysqld at `addr` (`host:port`) of `target`, a deposed primary whose own agent
    /// is gone, from this tablet's agent.
    FenceServer {
        target: String,
        addr: String,
        bound: Duration,
    },
}

/// The agents, as a recovery uses them. Every action carries the term it runs under.
pub trait AgentApi {
    fn act(
        &self,
        tablet: &str,
        term: Term,
        action: AgentAction,
    ) -> impl Future<Output = Result<pb::ActionResponse, RecoveryError>> + Send;

    /// `FullStatus` (changes nothing, not a step).
    fn full_status(
        &self,
        tablet: &str,
    ) -> impl Future<Output = Result<pb::Health, RecoveryError>> + Send;
}

/// etcd, as a recovery uses it under the shard lock.
pub trait TopoApi {
    /// Writes the shard record conditional on holding the lock (a step named `step`).
    fn write_shard_record(
        &self,
        step: &'static str,
        term: Term,
        record: &ShardRecord,
    ) -> impl Future<Output = Result<i64, RecoveryError>> + Send;

    /// The promotion record of `term` (the shard's history).
    fn get_promotion(
        &self,
        term: Term,
    ) -> impl Future<Output = Result<Option<PromotionRecord>, RecoveryError>> + Send;

    /// A tablet's registration as etcd has it now (`None`: gone, its lease expired).
    fn get_tablet(
        &self,
        alias: &str,
    ) -> impl Future<Output = Result<Option<TabletRecord>, RecoveryError>> + Send;

    /// When this orchestrator last saw `alias` registered (wall ms), from its watch.
    fn registration_last_seen(&self, alias: &str) -> Option<u64>;

    /// Quarantines `alias` with `reason` under `term` (a step named `quarantine`).
    fn quarantine(
        &self,
        term: Term,
        alias: &str,
        reason: &str,
    ) -> impl Future<Output = Result<(), RecoveryError>> + Send;
}

/// What a machine asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Agent {
        tablet: String,
        term: Term,
        action: AgentAction,
    },
    Status {
        tablet: String,
    },
    WriteShardRecord {
        step: &'static str,
        term: Term,
        record: ShardRecord,
    },
    GetPromotion(Term),
    GetTablet(String),
    RegistrationLastSeen(String),
    Quarantine {
        term: Term,
        alias: String,
        reason: String,
    },
    Sleep(Duration),
}

/// The answer to a [`Call`], same order of variants.
#[derive(Debug)]
pub enum Reply {
    Action(Result<pb::ActionResponse, RecoveryError>),
    Status(Result<Box<pb::Health>, RecoveryError>),
    Written(Result<i64, RecoveryError>),
    Promotion(Result<Option<PromotionRecord>, RecoveryError>),
    Tablet(Result<Option<TabletRecord>, RecoveryError>),
    LastSeen(Option<u64>),
    Quarantined(Result<(), RecoveryError>),
    Slept,
}

/// What a machine wants done.
#[derive(Debug)]
pub enum Action {
    /// Start a call; its reply comes back with this id.
    Call(CallId, Call),
    /// The call's reply is no longer wanted (the shell drops it).
    Cancel(CallId),
    /// Record (and audit) a step that already ran.
    Record {
        term: Term,
        name: &'static str,
        tablet: Option<String>,
        ok: bool,
        detail: String,
        duration: Duration,
    },
    /// Append an audit entry that is not a step.
    Audit {
        term: Term,
        name: &'static str,
        tablet: Option<String>,
        outcome: &'static str,
        detail: String,
    },
    /// One phase's duration (`myha_orchestrator_reparent_phase_seconds{phase}`).
    Phase(&'static str, Duration),
    /// The run is over; no call of it is wanted any more.
    Done(Result<Done, RecoveryError>),
}

/// A recovery procedure that decides and never waits.
pub trait StepMachine {
    /// The first actions (must be called once, first).
    fn start(&mut self, now: Now) -> Vec<Action>;
    /// The reply to call `id`.
    fn on_reply(&mut self, id: CallId, reply: Reply, now: Now) -> Vec<Action>;
    /// The term the machine's actions run under now.
    fn term(&self) -> Term;
}

impl<T: StepMachine + ?Sized> StepMachine for Box<T> {
    fn start(&mut self, now: Now) -> Vec<Action> {
        (**self).start(now)
    }

    fn on_reply(&mut self, id: CallId, reply: Reply, now: Now) -> Vec<Action> {
        (**self).on_reply(id, reply, now)
    }

    fn term(&self) -> Term {
        (**self).term()
    }
}

/// Helpers a machine uses to emit actions with fresh ids.
#[derive(Debug, Default)]
pub struct Emitter {
    next: u32,
    pub out: Vec<Action>,
}

impl Emitter {
    pub fn call(&mut self, call: Call) -> CallId {
        let id = CallId(self.next);
        self.next += 1;
        self.out.push(Action::Call(id, call));
        id
    }

    pub fn record(
        &mut self,
        term: Term,
        name: &'static str,
        tablet: Option<&str>,
        ok: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        self.out.push(Action::Record {
            term,
            name,
            tablet: tablet.map(str::to_string),
            ok,
            detail: detail.into(),
            duration,
        });
    }

    pub fn audit(&mut self, term: Term, name: &'static str, tablet: Option<&str>, detail: String) {
        self.out.push(Action::Audit {
            term,
            name,
            tablet: tablet.map(str::to_string),
            outcome: OUTCOME_OK,
            detail,
        });
    }

    /// Records `name` as a failed step with `why`; the refusal carrying it.
    pub fn refuse(
        &mut self,
        term: Term,
        name: &'static str,
        tablet: Option<&str>,
        why: String,
    ) -> RecoveryError {
        self.record(term, name, tablet, false, why.clone(), Duration::ZERO);
        RecoveryError::Refused(why)
    }

    pub fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }
}

async fn perform<C: AgentApi + TopoApi>(ctx: &C, call: Call) -> Reply {
    match call {
        Call::Agent {
            tablet,
            term,
            action,
        } => Reply::Action(ctx.act(&tablet, term, action).await),
        Call::Status { tablet } => Reply::Status(ctx.full_status(&tablet).await.map(Box::new)),
        Call::WriteShardRecord { step, term, record } => {
            Reply::Written(ctx.write_shard_record(step, term, &record).await)
        }
        Call::GetPromotion(term) => Reply::Promotion(ctx.get_promotion(term).await),
        Call::GetTablet(alias) => Reply::Tablet(ctx.get_tablet(&alias).await),
        Call::RegistrationLastSeen(alias) => Reply::LastSeen(ctx.registration_last_seen(&alias)),
        Call::Quarantine {
            term,
            alias,
            reason,
        } => Reply::Quarantined(ctx.quarantine(term, &alias, &reason).await),
        Call::Sleep(d) => {
            tokio::time::sleep(d).await;
            Reply::Slept
        }
    }
}

/// Runs `m` to its end against the real agents and etcd. Every call carries the machine's term;
/// the context's [`RecoveryContext::newest_term`] follows from the steps recorded under it.
pub async fn drive<M: StepMachine>(
    m: &mut M,
    ctx: &RecoveryContext,
) -> Result<Done, RecoveryError> {
    let started = Instant::now();
    let now = || Now {
        since_start: started.elapsed(),
        wall_ms: topo::now_ms(),
    };
    let mut running = FuturesUnordered::new();
    let mut handles: HashMap<CallId, AbortHandle> = HashMap::new();
    let mut actions = std::collections::VecDeque::from(m.start(now()));
    let result = loop {
        let mut done = None;
        while let Some(a) = actions.pop_front() {
            match a {
                Action::Call(id, call) => {
                    let (handle, reg) = AbortHandle::new_pair();
                    handles.insert(id, handle);
                    running.push(Abortable::new(
                        async move { (id, perform(ctx, call).await) },
                        reg,
                    ));
                }
                Action::Cancel(id) => {
                    if let Some(h) = handles.remove(&id) {
                        h.abort();
                    }
                }
                Action::Record {
                    term,
                    name,
                    tablet,
                    ok,
                    detail,
                    duration,
                } => ctx.record_step_at(term, name, tablet.as_deref(), ok, detail, duration),
                Action::Audit {
                    term,
                    name,
                    tablet,
                    outcome,
                    detail,
                } => ctx.audit_at(term, name, tablet.as_deref(), outcome, detail, None),
                Action::Phase(name, took) => super::reparent::phase(name, took),
                Action::Done(r) => {
                    done = Some(r);
                    break;
                }
            }
        }
        if let Some(r) = done {
            break r;
        }
        match running.next().await {
            Some(Ok((id, reply))) => {
                if handles.remove(&id).is_some() {
                    actions.extend(m.on_reply(id, reply, now()));
                }
            }
            // Cancelled.
            Some(Err(_)) => {}
            None => {
                break Err(RecoveryError::Failed(
                    "recovery step machine stalled: no call outstanding and no result".into(),
                ))
            }
        }
    };
    result
}
