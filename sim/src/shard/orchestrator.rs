//! The simulated shard's orchestrator: the real engine ([`Engine::handle`] and
//! [`Engine::poll_timeout`]) fed with the health the agents push, and every recovery it starts
//! run as the real runner runs it under the lock: the refresh's answers assembled and analysed
//! by [`FreshShard::assemble`], the problem found again ([`problem_under_lock`]), and the
//! remedy's step machine ([`machine_for`]) driven over the RPC network on virtual time.
//!
//! An operator's planned reparent ([`super::Fault::Switchover`]) runs as the runner runs an
//! operator request (`operator::Requested`): the same refresh under the lock, then the real
//! [`Planned`] machine; the engine's own recovery meanwhile waits for the lock, and is started
//! once the operator's run ends (an operator request that arrives while a recovery runs waits
//! likewise).
//!
//! Modelled here: the health stream (a tablet is connected while its pushes arrive, with a
//! one-second idle timeout like the stream's keep-alive; the streams are the watches', shared
//! with the gateway, so they outlive an orchestrator process), the shard lock (one orchestrator
//! at a time: free, except that a dead orchestrator's lock lives until its lease expires, and a
//! recovery waits for it up to `lock_wait` and ends `LockHeld`; the runner's flapping check
//! under it is left out, the engine's own flapping check reads the audit log), and etcd (the
//! record is written at once after a round trip; audit and quarantines survive an orchestrator;
//! the promotion history is what the agents recorded as they promoted).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myha_orchestrator::control::ControlState;
use myha_orchestrator::engine::{Effect, Engine, EngineOptions, Input as EngineInput};
use myha_orchestrator::recovery::planned::{Planned, PlannedOptions};
use myha_orchestrator::recovery::steps::{Action, Call, CallId, Now, Reply, StepMachine};
use myha_orchestrator::recovery::{
    machine_for, problem_under_lock, FreshReads, FreshShard, Job, Machine, Outcome, RecoveryError,
    Report, SUSPECT_STATUS_TIMEOUT,
};
use myha_proto::agent as pb;
use tabletwatch::{FleetSnapshot, HealthSample, ShardView, StreamState, TabletView};
use topo::{AuditEntry, Term};

use super::{ms, server_of, wall, Request, Response, ShardSim};
use crate::time::SimTime;

/// A stream that carried nothing for this long is down (the stream's keep-alive).
const STREAM_IDLE: Duration = Duration::from_secs(1);
/// One etcd round trip.
const ETCD_RTT: Duration = Duration::from_millis(2);

/// The orchestrator's state.
pub(super) struct Orch {
    /// This shard's own engine; `None` in a fleet, whose one engine the fleet drives
    /// ([`crate::fleet`]): then the engine's inputs wait in `outbox`.
    engine: Option<Engine>,
    pub(crate) outbox: Vec<EngineInput>,
    /// The `Instant` of virtual time zero (the engine measures ages on `Instant`s).
    base: Instant,
    views: BTreeMap<String, TabletView>,
    version: u64,
    /// The shard view of the last snapshot, handed out again while it is unchanged (as
    /// tabletwatch does: the engine tells changes by pointer).
    last_view: Option<Arc<ShardView>>,
    /// A health arrived or a stream changed since the last evaluation.
    dirty: bool,
    control: Arc<ControlState>,
    recovery: Option<Recovery>,
    /// The engine's recovery, waiting for the lock an operator's run holds.
    deferred: Option<Job>,
    /// An operator's planned reparent, waiting for the lock a recovery holds.
    requested: bool,
    audit: Vec<AuditEntry>,

    /// Engine inputs to hand over after the current effects.
    inputs: Vec<EngineInput>,
    /// Real time spent in the decision code: the engine, the re-analysis under the lock, the
    /// step machines.
    pub(crate) decision: Duration,
    /// `SIM_DEBUG` set: every step-machine call and reply goes into the trace (read once).
    trace_calls: bool,
}

struct Recovery {
    job: Job,
    started: SimTime,
    stage: Stage,
    /// An operator's planned reparent (the runner's `operator::Requested` plan), not the
    /// engine's: no re-analysis, the `Planned` machine, and the engine is not told.
    operator: bool,
}

enum Stage {
    /// Waiting for the shard lock, which a dead orchestrator's lease holds
    /// ([`ShardSim::lock_free_at`]); given up at `give_up` (the runner's `lock_wait`, an
    /// operator's `planned_lock_timeout`) as [`Outcome::LockHeld`].
    Locking { give_up: SimTime },
    /// The refresh: `FullStatus` asked of every tablet.
    Refreshing {
        asked: BTreeMap<u64, (String, SimTime)>,
        answers: BTreeMap<String, pb::Health>,
        unseen: BTreeMap<String, String>,
    },
    /// The remedy's step machine.
    Running(Box<Running>),
}

struct Running {
    machine: Machine,
    problem: myha_orchestrator::analysis::Problem,
    /// When the machine started (its `Now::since_start`).
    started: SimTime,
    /// Agent RPCs in flight: rpc id -> (call, tablet, give up at).
    rpcs: BTreeMap<u64, (CallId, String, SimTime)>,
    /// Local replies (etcd, sleeps) due at an instant.
    local: Vec<(SimTime, CallId, Reply)>,
}

impl Orch {
    pub(super) fn new(
        sim_cfg: &super::ShardSimConfig,
        cfg: &myha_orchestrator::recovery::RecoveryConfig,
        base: Option<Instant>,
    ) -> Orch {
        let mut control = ControlState {
            synced: true,
            ..ControlState::default()
        };
        control.keyspaces.insert("ks".into(), sim_cfg.durability);
        Orch {
            engine: base.is_none().then(|| engine(cfg)),
            outbox: Vec::new(),
            base: base.unwrap_or_else(Instant::now),
            views: BTreeMap::new(),
            version: 0,
            last_view: None,
            dirty: true,
            control: Arc::new(control),
            recovery: None,
            deferred: None,
            requested: false,
            audit: Vec::new(),
            inputs: Vec::new(),
            decision: Duration::ZERO,
            trace_calls: std::env::var_os("SIM_DEBUG").is_some(),
        }
    }

    pub(crate) fn instant(&self, t: SimTime) -> Instant {
        self.base + Duration::from_micros(t.as_micros())
    }
}

/// The real engine with the simulator's recovery configuration.
pub(crate) fn engine(cfg: &myha_orchestrator::recovery::RecoveryConfig) -> Engine {
    Engine::new(
        Arc::new(cfg.clone()),
        Arc::from("orchestrator@sim"),
        EngineOptions::default(),
    )
}

impl ShardSim {
    /// A health pushed by an agent's stream.
    pub(super) fn orchestrator_health(&mut self, h: Box<pb::Health>) {
        let now = self.now;
        let at = self.orch.instant(now);
        let Some(record) = self.tablets.get(&h.alias).cloned() else {
            return;
        };
        let view = self
            .orch
            .views
            .entry(h.alias.clone())
            .or_insert_with(|| TabletView {
                record: Arc::new(record),
                last_health: None,
                stream: StreamState::Connecting {
                    since: at,
                    since_ms: wall(now),
                    failures: 0,
                    last_error: None,
                },
                quarantine: None,
            });
        if !view.stream.is_connected() {
            view.stream = StreamState::Connected {
                since: at,
                since_ms: wall(now),
            };
        }
        view.last_health = Some(Arc::new(HealthSample {
            health: Arc::new(*h),
            received_at: at,
            received_ms: wall(now),
        }));
        self.orch.dirty = true;
    }

    pub(super) fn orchestrator_tick(&mut self) {
        let now = self.now;
        let at = self.orch.instant(now);
        // Streams that went quiet are down.
        for v in self.orch.views.values_mut() {
            let quiet = v
                .last_health
                .as_ref()
                .is_none_or(|h| at.duration_since(h.received_at) > STREAM_IDLE);
            if v.stream.is_connected() && quiet {
                v.stream = StreamState::Connecting {
                    since: at,
                    since_ms: wall(now),
                    failures: 1,
                    last_error: Some("keep-alive timeout".into()),
                };
                self.orch.dirty = true;
            }
        }
        self.recovery_tick();
        let Some(engine) = self.orch.engine.as_ref() else {
            return;
        };
        let due = engine.poll_timeout().is_none_or(|t| t <= at);
        if self.orch.dirty || due {
            self.orch.dirty = false;
            self.evaluate();
        }
    }

    /// Whether a health arrived or a stream changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.orch.dirty)
    }

    /// The shard as the orchestrator's watches show it now.
    pub(crate) fn shard_view(&self) -> ShardView {
        let mut tablets = BTreeMap::new();
        for (alias, record) in &self.tablets {
            let view = self
                .orch
                .views
                .get(alias)
                .cloned()
                .unwrap_or_else(|| TabletView {
                    record: Arc::new(record.clone()),
                    last_health: None,
                    stream: StreamState::Connecting {
                        since: self.orch.base,
                        since_ms: wall(SimTime::ZERO),
                        failures: 0,
                        last_error: None,
                    },
                    quarantine: None,
                });
            tablets.insert(alias.clone(), view);
        }
        ShardView {
            keyspace: "ks".into(),
            shard: self.cfg.shard_name(),
            // The record as the watches (the engine's, the gateway's) show it.
            record: Some(Arc::new(self.watched.clone())),
            tablets,
        }
    }

    /// The shard view, in the `Arc` of the last one while it is unchanged.
    pub(crate) fn shared_view(&mut self) -> Arc<ShardView> {
        let view = self.shard_view();
        match &self.orch.last_view {
            Some(old) if **old == view => old.clone(),
            _ => {
                let view = Arc::new(view);
                self.orch.last_view = Some(view.clone());
                view
            }
        }
    }

    fn snapshot(&mut self) -> Arc<FleetSnapshot> {
        self.orch.version += 1;
        let view = self.shared_view();
        Arc::new(FleetSnapshot {
            version: self.orch.version,
            taken_at: self.orch.instant(self.now),
            topo_synced: true,
            shards: [(("ks".to_string(), self.cfg.shard_name()), view)].into(),
        })
    }

    /// The control state the engine reads (keyspace durability, quarantines).
    pub(crate) fn control(&self) -> Arc<ControlState> {
        self.orch.control.clone()
    }

    fn evaluate(&mut self) {
        let snapshot = self.snapshot();
        let input = EngineInput::Evaluate {
            snapshot,
            control: self.orch.control.clone(),
            now_ms: wall(self.now),
        };
        self.engine_input(input);
    }

    /// Hands `input` to the engine and performs its effects (and whatever they feed back);
    /// in a fleet, leaves it for the fleet's engine.
    fn engine_input(&mut self, input: EngineInput) {
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let at = self.orch.instant(self.now);
            let Some(engine) = self.orch.engine.as_mut() else {
                // In a fleet: the fleet's engine takes it.
                self.orch.outbox.push(input);
                self.orch.outbox.append(&mut self.orch.inputs);
                continue;
            };
            let timer = crate::time::CpuTimer::start();
            let effects = engine.handle(input, at);
            self.orch.decision += timer.elapsed();
            for e in effects {
                self.perform_effect(e);
            }
            queue.extend(std::mem::take(&mut self.orch.inputs).into_iter().rev());
        }
    }

    pub(crate) fn perform_effect(&mut self, effect: Effect) {
        match effect {
            Effect::StartRecovery(job) => self.start_recovery(job),
            Effect::LoadAudit {
                keyspace,
                shard,
                term,
            } => {
                let result = Ok(self.orch.audit.clone());
                self.orch.inputs.push(EngineInput::Audit {
                    keyspace,
                    shard,
                    term,
                    result,
                });
            }
            Effect::AppendAudit { entry, .. } => self.orch.audit.push(entry),
            Effect::WarmAgent(_) | Effect::Publish(_) => {}
        }
    }

    fn start_recovery(&mut self, job: Job) {
        let operator_holds = self.orch.recovery.as_ref().is_some_and(|r| r.operator);
        if self.orch.recovery.is_some() && (!operator_holds || self.orch.deferred.is_some()) {
            // The engine runs one recovery per shard; a second one means it lost track.
            self.violate(
                "engine",
                format!(
                    "a second recovery started while one runs: {:?}",
                    job.problem
                ),
            );
            return;
        }
        self.trace(format!(
            "engine: recover {} {}: {}{}",
            job.problem.code.as_str(),
            job.problem.tablet.as_deref().unwrap_or(""),
            job.problem.detail,
            if operator_holds {
                " (waits for the lock an operator's reparent holds)"
            } else {
                ""
            }
        ));
        let what = format!(
            "{} {}",
            job.problem.code.as_str(),
            job.problem.tablet.as_deref().unwrap_or("")
        );
        self.recoveries.push((self.now, what));
        if operator_holds {
            self.orch.deferred = Some(job);
        } else {
            self.begin_refresh(job, false);
        }
    }

    /// An operator asks for a planned reparent to the best replica (what `myhactl reparent`
    /// sends by default); it waits while a recovery holds the lock.
    pub(super) fn operator_switchover(&mut self) {
        if self.orch.recovery.is_some() {
            self.trace("operator: planned reparent waits for the lock".into());
            self.orch.requested = true;
            return;
        }
        let primary = self.record.primary.clone();
        let problem = myha_orchestrator::analysis::Problem {
            code: myha_orchestrator::analysis::ProblemCode::ReparentInProgress,
            tablet: primary,
            detail: "planned reparent requested by operator@sim".into(),
        };
        let job = Job {
            keyspace: "ks".into(),
            shard: self.cfg.shard_name(),
            problem,
            quarantined: self
                .orch
                .control
                .quarantine
                .iter()
                .map(|(a, q)| (a.clone(), q.reason.clone()))
                .collect(),
            last_primary: None,
        };
        self.trace("operator: planned reparent".into());
        self.begin_refresh(job, true);
    }

    /// Takes the lock, then the refresh under it.
    fn begin_refresh(&mut self, job: Job, operator: bool) {
        let stage = if self.now < self.lock_free_at {
            let wait = if operator {
                self.recovery.planned_lock_timeout
            } else {
                self.recovery.lock_wait
            };
            Stage::Locking {
                give_up: self.now + wait,
            }
        } else {
            self.ask_statuses(&job)
        };
        self.orch.recovery = Some(Recovery {
            job,
            started: self.now,
            stage,
            operator,
        });
    }

    /// The refresh under the lock: `FullStatus` asked of every tablet.
    fn ask_statuses(&mut self, job: &Job) -> Stage {
        let suspect = job
            .problem
            .code
            .is_dead_primary()
            .then(|| job.problem.tablet.clone())
            .flatten();
        let aliases: Vec<String> = self.tablets.keys().cloned().collect();
        let mut asked = BTreeMap::new();
        for a in aliases {
            let bound = if suspect.as_deref() == Some(a.as_str()) {
                SUSPECT_STATUS_TIMEOUT.min(self.recovery.status_timeout)
            } else {
                self.recovery.status_timeout
            };
            let id = self.send_rpc(&a, Term::ZERO, bound, Request::FullStatus);
            asked.insert(id, (a, self.now + bound));
        }
        Stage::Refreshing {
            asked,
            answers: BTreeMap::new(),
            unseen: BTreeMap::new(),
        }
    }

    /// The orchestrator process died; whether it held the shard lock then (a recovery past
    /// taking it). Its engine, recovery and queued inputs are gone; what it wrote to etcd
    /// (audit, quarantines) stays.
    pub(super) fn orchestrator_crashed(&mut self) -> bool {
        let held = match self.orch.recovery.as_ref() {
            Some(rec) => {
                let stage = match &rec.stage {
                    Stage::Locking { .. } => "waiting for the lock",
                    Stage::Refreshing { .. } => "refreshing",
                    Stage::Running(_) => "running its step machine",
                };
                let what = format!(
                    "the orchestrator dies {stage} for {} {}",
                    rec.job.problem.code.as_str(),
                    rec.job.problem.tablet.as_deref().unwrap_or("")
                );
                let held = !matches!(rec.stage, Stage::Locking { .. });
                self.trace(what);
                held
            }
            None => {
                self.trace("the orchestrator dies idle".into());
                false
            }
        };
        self.orch.engine = None;
        self.orch.recovery = None;
        self.orch.deferred = None;
        self.orch.requested = false;
        self.orch.inputs.clear();
        self.orch.outbox.clear();
        held
    }

    /// A new orchestrator process: a fresh engine over the same etcd (record, audit,
    /// quarantines). The health streams are the watches' (shared with the gateway, which
    /// never stopped), so the new engine sees what arrived while it was down.
    pub(super) fn orchestrator_restarted(&mut self) {
        self.trace("a new orchestrator starts".into());
        self.orch.engine = Some(engine(&self.recovery));
        self.orch.last_view = None;
        self.orch.dirty = true;
    }

    fn recovery_tick(&mut self) {
        let now = self.now;
        let Some(rec) = self.orch.recovery.as_mut() else {
            return;
        };
        match &mut rec.stage {
            Stage::Locking { give_up } => {
                let give_up = *give_up;
                if now >= self.lock_free_at {
                    let job = rec.job.clone();
                    let stage = self.ask_statuses(&job);
                    if let Some(rec) = self.orch.recovery.as_mut() {
                        rec.stage = stage;
                    }
                } else if now >= give_up {
                    let holder = format!(
                        "a dead orchestrator, whose lease expires at {} ms",
                        ms(self.lock_free_at)
                    );
                    self.recovery_done(None, Outcome::LockHeld { holder }, None);
                }
            }
            Stage::Refreshing { asked, unseen, .. } => {
                let late: Vec<u64> = asked
                    .iter()
                    .filter(|(_, (_, by))| now >= *by)
                    .map(|(id, _)| *id)
                    .collect();
                for id in late {
                    if let Some((a, _)) = asked.remove(&id) {
                        unseen.insert(a, "no answer within status_timeout".into());
                    }
                }
                if asked.is_empty() {
                    self.refresh_answered();
                }
            }
            Stage::Running(run) => {
                let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut run.local)
                    .into_iter()
                    .partition(|(t, _, _)| *t <= now);
                run.local = rest;
                let mut replies: Vec<(CallId, Reply)> =
                    due.into_iter().map(|(_, id, r)| (id, r)).collect();
                let expired: Vec<u64> = run
                    .rpcs
                    .iter()
                    .filter(|(_, (_, _, give_up))| now >= *give_up)
                    .map(|(id, _)| *id)
                    .collect();
                for rpc in expired {
                    if let Some((call, tablet, _)) = run.rpcs.remove(&rpc) {
                        replies.push((
                            call,
                            Reply::Action(Err(RecoveryError::AgentTimeout {
                                rpc: "sim",
                                tablet,
                                after: Duration::ZERO,
                            })),
                        ));
                    }
                }
                for (id, r) in replies {
                    self.machine_reply(id, r);
                }
            }
        }
    }
    /// Every agent asked in the refresh answered or timed out.
    fn refresh_answered(&mut self) {
        let Some(Stage::Refreshing {
            answers, unseen, ..
        }) = self.orch.recovery.as_mut().map(|r| &mut r.stage)
        else {
            return;
        };
        let answers = std::mem::take(answers);
        let unseen = std::mem::take(unseen);
        self.refreshed(answers, unseen);
    }

    /// The refresh is complete: the runner's re-analysis under the lock, then the remedy.
    fn refreshed(
        &mut self,
        answers: BTreeMap<String, pb::Health>,
        unseen: BTreeMap<String, String>,
    ) {
        let Some(rec) = self.orch.recovery.as_ref() else {
            return;
        };
        let job = rec.job.clone();
        let operator = rec.operator;
        let timer = crate::time::CpuTimer::start();
        let fresh = FreshShard::assemble(
            FreshReads {
                keyspace: "ks",
                shard: &self.cfg.shard_name(),
                record: Some((self.record.clone(), self.record_revision)),
                durability: self.cfg.durability,
                tablets: self.tablets.clone(),
                unreadable: Vec::new(),
            },
            answers,
            unseen,
            &job.quarantined,
            wall(self.now),
            &self.recovery.analysis,
        );
        if operator {
            self.orch.decision += timer.elapsed();
            let opts = PlannedOptions {
                to: None,
                wait_timeout: self.recovery.planned_wait_timeout,
                max_lag: self.recovery.planned_max_lag,
                requester: "operator@sim".into(),
            };
            let term = fresh.action_term();
            let timeout = self.recovery.action_timeout;
            let machine: Machine = Box::new(Planned::new(fresh, term, opts, timeout));
            return self.run_machine(machine, job.problem);
        }
        let problem = match problem_under_lock(&job.problem, &fresh.problems) {
            Ok(p) => p,
            Err(detail) => {
                self.trace(format!("orchestrator: {detail}"));
                return self.recovery_done(None, Outcome::ProblemGone { detail }, None);
            }
        };
        self.orch.decision += timer.elapsed();
        let machine = match machine_for(
            &problem,
            &fresh,
            job.last_primary.clone(),
            &self.recovery,
            wall(self.now),
        ) {
            Some(Ok(m)) => m,
            Some(Err(e)) => return self.recovery_done(Some(problem), Outcome::from(e), None),
            // A report: the engine does not dispatch those, so reaching here is a bug worth
            // seeing in the trace, not a recovery.
            None => {
                let error = format!(
                    "{}: {:?} is reported for an operator, no machine carries it out",
                    problem.code.as_str(),
                    problem.code.facts().remedy
                );
                return self.recovery_done(Some(problem), Outcome::Failed { error }, None);
            }
        };
        if problem.code.is_dead_primary() {
            self.trace(format!(
                "orchestrator: emergency reparent: {}",
                problem.detail
            ));
        }
        self.run_machine(machine, problem);
    }

    /// Starts the remedy's step machine.
    fn run_machine(&mut self, machine: Machine, problem: myha_orchestrator::analysis::Problem) {
        let now = self.now;
        if let Some(rec) = self.orch.recovery.as_mut() {
            rec.stage = Stage::Running(Box::new(Running {
                machine,
                problem,
                started: now,
                rpcs: BTreeMap::new(),
                local: Vec::new(),
            }));
        }
        let actions = match self.orch.recovery.as_mut().map(|r| &mut r.stage) {
            Some(Stage::Running(run)) => {
                let n = Now {
                    since_start: Duration::ZERO,
                    wall_ms: wall(now),
                };
                let timer = crate::time::CpuTimer::start();
                let actions = run.machine.start(n);
                self.orch.decision += timer.elapsed();
                actions
            }
            _ => Vec::new(),
        };
        self.perform(actions);
    }

    fn recovery_done(
        &mut self,
        problem: Option<myha_orchestrator::analysis::Problem>,
        outcome: Outcome,
        new_term: Option<Term>,
    ) {
        let Some(rec) = self.orch.recovery.take() else {
            return;
        };
        if rec.operator {
            // The operator's run is not the engine's; the lock is free again.
            match &outcome {
                Outcome::Recovered { .. } => self.report.switchovers += 1,
                other => {
                    self.report.switchover_refusals += 1;
                    self.trace(format!("operator: planned reparent ended: {other:?}"));
                }
            }
            if let Some(job) = self.orch.deferred.take() {
                self.begin_refresh(job, false);
            }
            return;
        }
        let report = Report {
            keyspace: rec.job.keyspace.clone(),
            shard: rec.job.shard.clone(),
            problem: problem.unwrap_or(rec.job.problem),
            outcome,
            steps: Vec::new(),
            new_term,
            started_ms: wall(rec.started),
            duration_ms: ms(self.now) - ms(rec.started),
        };
        self.engine_input(EngineInput::Done(report));
        if self.orch.recovery.is_none() && self.orch.requested {
            self.orch.requested = false;
            self.operator_switchover();
        }
    }

    pub(super) fn orchestrator_response(&mut self, id: u64, body: Response) {
        let Some(rec) = self.orch.recovery.as_mut() else {
            return;
        };
        match &mut rec.stage {
            Stage::Locking { .. } => {}
            Stage::Refreshing {
                asked,
                answers,
                unseen,
            } => {
                let Some((a, _)) = asked.remove(&id) else {
                    return;
                };
                match body {
                    Response::Status(h) => {
                        answers.insert(a, *h);
                    }
                    Response::Act(_) => {
                        unseen.insert(a, "unexpected answer".into());
                    }
                }
                if asked.is_empty() {
                    self.refresh_answered();
                }
            }
            Stage::Running(run) => {
                let Some((call, tablet, _)) = run.rpcs.remove(&id) else {
                    return;
                };
                let reply = match body {
                    Response::Status(h) => Reply::Status(Ok(h)),
                    Response::Act(Ok(r)) => Reply::Action(Ok(r)),
                    Response::Act(Err(e)) => Reply::Action(Err(RecoveryError::Agent {
                        rpc: "sim",
                        tablet,
                        code: e.code,
                        message: e.message,
                        stale: e.stale,
                    })),
                };
                self.machine_reply(call, reply);
            }
        }
    }

    fn machine_now(&self) -> Now {
        let started = match self.orch.recovery.as_ref().map(|r| &r.stage) {
            Some(Stage::Running(run)) => run.started,
            _ => self.now,
        };
        Now {
            since_start: self.now.saturating_since(started),
            wall_ms: wall(self.now),
        }
    }

    fn machine_reply(&mut self, id: CallId, reply: Reply) {
        let now = self.machine_now();
        if self.orch.trace_calls {
            self.trace(format!("  reply {id:?}: {reply:?}"));
        }
        let actions = match self.orch.recovery.as_mut().map(|r| &mut r.stage) {
            Some(Stage::Running(run)) => {
                let timer = crate::time::CpuTimer::start();
                let actions = run.machine.on_reply(id, reply, now);
                self.orch.decision += timer.elapsed();
                actions
            }
            _ => return,
        };
        self.perform(actions);
    }

    fn running(&mut self) -> Option<&mut Running> {
        match self.orch.recovery.as_mut().map(|r| &mut r.stage) {
            Some(Stage::Running(run)) => Some(run),
            _ => None,
        }
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Call(id, call) => self.perform_call(id, call),
                Action::Cancel(id) => {
                    if let Some(run) = self.running() {
                        run.rpcs.retain(|_, (c, _, _)| *c != id);
                        run.local.retain(|(_, c, _)| *c != id);
                    }
                }
                Action::Record {
                    name, ok, detail, ..
                } => {
                    if !ok || name == "choose_candidate" {
                        self.trace(format!("  step {name} ok={ok}: {detail}"));
                    }
                }
                Action::Audit { .. } | Action::Phase(..) => {}
                Action::Done(result) => {
                    let problem = self.running().map(|r| r.problem.clone());
                    let emergency = problem.as_ref().is_some_and(|p| p.code.is_dead_primary());
                    match result {
                        Ok(done) => {
                            if emergency {
                                self.report.reparents += 1;
                            }
                            self.trace(format!("orchestrator: {}", done.detail));
                            if let Some(p) = done.new_primary.as_deref().and_then(server_of) {
                                self.check_no_loss(p, "after the reparent");
                                self.check_no_errant_primary(p, "after the reparent");
                            }
                            let outcome = Outcome::Recovered {
                                detail: done.detail,
                            };
                            self.recovery_done(problem, outcome, done.new_term);
                        }
                        Err(e) => {
                            if emergency {
                                self.report.refusals += 1;
                            }
                            self.trace(format!("orchestrator: recovery did not succeed: {e}"));
                            self.recovery_done(problem, Outcome::from(e), None);
                        }
                    }
                    return;
                }
            }
        }
    }

    fn perform_call(&mut self, id: CallId, call: Call) {
        let now = self.now;
        if self.orch.trace_calls {
            self.trace(format!("  call {id:?}: {call:?}"));
        }
        match call {
            Call::Agent {
                tablet,
                term,
                action,
            } => {
                use myha_orchestrator::recovery::steps::AgentAction as A;
                let timeout = match &action {
                    A::WaitForPosition { bound, .. }
                    | A::ApplyReceived { bound, .. }
                    | A::Demote { bound }
                    | A::FenceServer { bound, .. } => *bound,
                    _ => self.recovery.action_timeout,
                };
                let rpc = self.send_rpc(&tablet, term, timeout, Request::Act(Box::new(action)));
                let give_up = now + timeout + Duration::from_millis(500);
                if let Some(run) = self.running() {
                    run.rpcs.insert(rpc, (id, tablet, give_up));
                }
            }
            Call::Status { tablet } => {
                let timeout = self.recovery.status_timeout;
                let rpc = self.send_rpc(&tablet, Term::ZERO, timeout, Request::FullStatus);
                if let Some(run) = self.running() {
                    run.rpcs.insert(rpc, (id, tablet, now + timeout));
                }
            }
            Call::WriteShardRecord { record, .. } => {
                let emergency = self
                    .orch
                    .recovery
                    .as_ref()
                    .is_some_and(|r| r.job.problem.code.is_dead_primary());
                if record.primary != self.record.primary && emergency {
                    let decided = self.orch.recovery.as_ref().map(|r| r.started);
                    self.check_needless_failover(decided.unwrap_or(now));
                }
                if record.term != self.record.term || record.primary != self.record.primary {
                    self.trace(format!(
                        "record: primary {:?} term {}",
                        record.primary, record.term
                    ));
                }
                self.write_record(record);
                let rev = self.record_revision;
                self.local(now + ETCD_RTT, id, Reply::Written(Ok(rev)));
            }
            Call::GetPromotion(term) => {
                let p = self.history.get(&term).cloned();
                self.local(now + ETCD_RTT, id, Reply::Promotion(Ok(p)))
            }
            Call::GetTablet(a) => {
                let t = self.tablets.get(&a).cloned();
                self.local(now + ETCD_RTT, id, Reply::Tablet(Ok(t)))
            }
            Call::RegistrationLastSeen(_) => self.local(now, id, Reply::LastSeen(Some(wall(now)))),
            Call::Quarantine {
                term,
                alias,
                reason,
            } => {
                self.trace(format!("orchestrator: quarantine {alias}: {reason}"));
                let record = topo::QuarantineRecord {
                    reason,
                    at_ms: wall(now),
                    term,
                    by: None,
                };
                let mut control = (*self.orch.control).clone();
                control.quarantine.insert(alias.clone(), record.clone());
                self.orch.control = Arc::new(control);
                if let Some(v) = self.orch.views.get_mut(&alias) {
                    v.quarantine = Some(Arc::new(record));
                }
                self.local(now + ETCD_RTT, id, Reply::Quarantined(Ok(())));
            }
            Call::Sleep(d) => self.local(now + d, id, Reply::Slept),
        }
    }

    fn local(&mut self, at: SimTime, id: CallId, reply: Reply) {
        if let Some(run) = self.running() {
            run.local.push((at, id, reply));
        }
    }
}
