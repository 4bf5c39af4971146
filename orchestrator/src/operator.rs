//! Operator-requested reparents (`POST /api/v1/shards/{keyspace}/{shard}/reparent`, issue 4):
//! run by the orchestrator that receives the request, under the shard lock, with the same
//! [`RecoveryContext`] machinery as the automatic recoveries. Contract: `docs/design.md`,
//! "Operator reparents".
//!
//! [`run`] is the whole operation, through the same lock-run-release path as the automatic
//! recoveries ([`recovery::locked_run`]): the shard lock (a try first; when held, a
//! [`OpEvent::WaitingLock`] naming the holder, then a wait up to `lock_timeout`), the quarantine
//! list and a fresh refresh under the lock, then the [`planned::Planned`] or
//! [`reparent::Emergency`] step machine driven by `steps::drive`, one summary audit entry (`planned_reparent` /
//! `emergency_reparent`, actor `operator:<who>@<orchestrator>`), the lock released. Every step
//! is sent as an [`OpEvent::Step`] the moment it is recorded, and the last event is always one
//! [`OpEvent::Done`]. The caller spawns it: a client that goes away does not cancel it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use topo::Term;

use serde::Serialize;
use tokio::sync::mpsc;
use topo::{AuditEntry, LockRequest};

use crate::analysis::{Problem, ProblemCode};
use crate::api::{ReparentMode, ReparentRequest};
use crate::control::{self, Control};
use crate::recovery::planned::{self, PlannedOptions};
use crate::recovery::reparent::{self, EmergencyOptions};
use crate::recovery::{
    self, millis, Deps, FreshShard, Intent, Job, LockWait, Machine, Outcome, PrimaryPosition,
    RecoveryError, RunEnd, RunPlan, StepObserver, StepRecord, ACTION_EMERGENCY_REPARENT,
    ACTION_PLANNED_REPARENT, OPERATOR_ACTOR_PREFIX, OUTCOME_FAILED, OUTCOME_OK, OUTCOME_REFUSED,
};

/// How long the old primary gets to be set read-only before an emergency reparent on request.
pub const EMERGENCY_DEMOTE_BOUND: Duration = Duration::from_secs(1);

/// One operation to run.
#[derive(Debug, Clone)]
pub struct Operation {
    pub keyspace: String,
    pub shard: String,
    pub request: ReparentRequest,
    /// The primary's last healthy position from this orchestrator's snapshots (the errant
    /// check's reference of an emergency reparent whose old primary does not answer).
    pub last_primary: Option<PrimaryPosition>,
    /// The primary as the request found it: its `FullStatus` gets a short bound in an emergency.
    pub suspect: Option<String>,
}

/// Why an operation did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// Decided not to act: nothing was changed (or what was changed was rolled back).
    Refused,
    /// The shard lock stayed held past `lock_timeout`.
    LockHeld,
    /// Something failed; the steps say what was changed.
    Failed,
}

/// The last event of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpDone {
    pub ok: bool,
    pub mode: ReparentMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<FailKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub old_primary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_primary: Option<String>,
    /// The shard's term at the end (the new one on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<Term>,
    /// Failures: whether a demotion was rolled back (the old primary is writable again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undone: Option<bool>,
    /// `lock_held`: who holds the lock, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// From the request's arrival to the end.
    pub total_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What an operation streams, one JSON object per line (`event` names the kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum OpEvent {
    /// The shard lock is held: the operation waits (up to `lock_timeout`).
    WaitingLock { holder: String, purpose: String },
    /// One step, as recorded (and audited).
    Step(StepRecord),
    /// The end, always last.
    Done(OpDone),
}

impl OpEvent {
    /// The event as one ndjson line (with its `\n`).
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"error\":\"{e}\"}}"));
        s.push('\n');
        s
    }
}

/// `operator:<who>@<orchestrator actor>`.
pub fn operator_actor(requester: &str, actor: &str) -> String {
    format!("{OPERATOR_ACTOR_PREFIX}{requester}@{actor}")
}

/// The lock purpose of an operation (with the requester's note, if any).
pub fn lock_purpose(req: &ReparentRequest) -> String {
    format!(
        "{} reparent{} requested by {}",
        req.mode.as_str(),
        req.to
            .as_deref()
            .map(|t| format!(" to {t}"))
            .unwrap_or_default(),
        req.requested_by()
    )
}

fn metric(mode: ReparentMode, outcome: &'static str) {
    metrics::counter!(
        "myha_orchestrator_operator_reparents_total",
        "mode" => mode.as_str(),
        "outcome" => outcome
    )
    .increment(1);
}

/// Runs one operation to its end (see the module doc) through the one lock-run-release path,
/// [`recovery::locked_run`]. Events go to `events` (a closed receiver is ignored: the
/// operation goes on). Returns the final event's content.
pub async fn run(deps: Deps, op: Operation, events: mpsc::UnboundedSender<OpEvent>) -> OpDone {
    let started = Instant::now();
    let actor = operator_actor(&op.request.requester, &deps.actor);
    let deps = Deps {
        actor: Arc::from(actor.as_str()),
        ..deps
    };
    let req = op.request.clone();
    let (ks, shard) = (op.keyspace.clone(), op.shard.clone());
    let run = Requested {
        deps: &deps,
        op: &op,
        events: &events,
        started,
    };
    let end = recovery::locked_run(&deps, &ks, &shard, &run).await;
    let ran = matches!(end, RunEnd::Ran(_));
    let fail = |kind: FailKind, error: String, old: Option<String>| OpDone {
        ok: false,
        mode: req.mode,
        kind: Some(kind),
        error: Some(error),
        old_primary: old,
        new_primary: None,
        term: None,
        undone: Some(false),
        holder: None,
        purpose: None,
        total_ms: 0,
        detail: None,
    };
    let mut done = match end {
        RunEnd::LockHeld(holder) => {
            let mut d = fail(
                FailKind::LockHeld,
                run.lock_held_text(&holder),
                op.suspect.clone(),
            );
            d.holder = Some(holder.holder);
            d.purpose = Some(holder.purpose);
            d
        }
        RunEnd::NoLock(_) | RunEnd::Before(_) | RunEnd::Refresh(_) | RunEnd::Declined { .. } => {
            fail(
                FailKind::Failed,
                run.stopped_text(&end).unwrap_or_default(),
                op.suspect.clone(),
            )
        }
        RunEnd::Ran(ran) => match &ran.result {
            Ok(d) => OpDone {
                ok: true,
                mode: req.mode,
                kind: None,
                error: None,
                old_primary: ran.old_primary.clone(),
                new_primary: d.new_primary.clone(),
                term: Some(d.new_term.unwrap_or(ran.old_term)),
                undone: None,
                holder: None,
                purpose: None,
                total_ms: 0,
                detail: Some(d.detail.clone()),
            },
            Err(e) => {
                let kind = match e {
                    RecoveryError::Refused(_) => FailKind::Refused,
                    _ => FailKind::Failed,
                };
                let mut d = fail(kind, error_text(e), ran.old_primary.clone());
                d.undone = Some(undone(&ran.steps));
                d
            }
        },
    };
    // The term at the end, as the record says (a rolled-back promotion may have raised it).
    if ran && !done.ok {
        done.term = deps
            .topo
            .get_shard(&ks, &shard)
            .await
            .ok()
            .flatten()
            .map(|(r, _)| r.term);
    }
    done.total_ms = millis(started.elapsed());
    metric(
        req.mode,
        match (done.ok, done.kind) {
            (true, _) => "ok",
            (_, Some(FailKind::Refused)) => "refused",
            (_, Some(FailKind::LockHeld)) => "lock_held",
            _ => "failed",
        },
    );
    if done.ok {
        tracing::info!(keyspace = %ks, shard = %shard, mode = req.mode.as_str(), requester = %req.requester, old = ?done.old_primary, new = ?done.new_primary, term = ?done.term, total_ms = done.total_ms, "operator reparent done");
    } else {
        tracing::warn!(keyspace = %ks, shard = %shard, mode = req.mode.as_str(), requester = %req.requester, kind = ?done.kind, error = ?done.error, undone = ?done.undone, total_ms = done.total_ms, "operator reparent did not succeed");
    }
    let _ = events.send(OpEvent::Done(done.clone()));
    done
}

/// Whether a demotion was rolled back, from the steps (both machines undo it the same way).
fn undone(steps: &[StepRecord]) -> bool {
    steps.iter().any(|s| s.name == "undo_demote" && s.ok)
}

fn error_text(e: &RecoveryError) -> String {
    match e {
        RecoveryError::Refused(r) => r.clone(),
        e => e.to_string(),
    }
}

/// One operator request, as [`recovery::locked_run`] runs it.
struct Requested<'a> {
    deps: &'a Deps,
    op: &'a Operation,
    events: &'a mpsc::UnboundedSender<OpEvent>,
    started: Instant,
}

impl Requested<'_> {
    fn action(&self) -> &'static str {
        match self.op.request.mode {
            ReparentMode::Planned => ACTION_PLANNED_REPARENT,
            ReparentMode::Emergency => ACTION_EMERGENCY_REPARENT,
        }
    }

    fn summary(&self, term: Term, tablet: Option<String>, outcome: &str, detail: String) {
        self.deps.audit.append(
            &self.op.keyspace,
            &self.op.shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term,
                actor: self.deps.actor.to_string(),
                action: self.action().to_string(),
                tablet,
                outcome: outcome.to_string(),
                detail,
                duration_ms: Some(millis(self.started.elapsed())),
            },
        )
    }

    fn lock_held_text(&self, holder: &topo::LockInfo) -> String {
        format!(
            "the shard lock of {}/{} is held by {} ({}) since {} ms; waited {:?} (lock_timeout)",
            self.op.keyspace,
            self.op.shard,
            holder.holder,
            holder.purpose,
            holder.acquired_ms,
            self.op.request.lock_timeout
        )
    }

    /// Why a run that stopped before its machine did not happen (`None` for the others).
    fn stopped_text(&self, end: &RunEnd) -> Option<String> {
        match end {
            RunEnd::LockHeld(h) => Some(self.lock_held_text(h)),
            RunEnd::NoLock(e) => Some(format!("no reparent without the shard lock: {e}")),
            RunEnd::Before(outcome) | RunEnd::Declined { outcome, .. } => {
                Some(outcome.text().to_string())
            }
            RunEnd::Refresh(e) => {
                Some(format!("refresh under the lock (nothing was changed): {e}"))
            }
            RunEnd::Ran(_) => None,
        }
    }
}

impl RunPlan for Requested<'_> {
    fn lock_request(&self) -> LockRequest {
        LockRequest::new(self.deps.actor.to_string(), lock_purpose(&self.op.request))
            .with_ttl(self.deps.cfg.lock_ttl)
    }

    fn lock_wait(&self) -> LockWait {
        LockWait::TryThenWait {
            timeout: self.op.request.lock_timeout,
            since: self.started,
        }
    }

    fn on_waiting(&self, holder: &topo::LockInfo) {
        let _ = self.events.send(OpEvent::WaitingLock {
            holder: holder.holder.clone(),
            purpose: holder.purpose.clone(),
        });
    }

    async fn before_refresh(&self, deps: &Deps) -> Result<BTreeMap<String, String>, Outcome> {
        match Control::new(deps.topo.clone()).list_quarantine().await {
            Ok(q) => Ok(q
                .iter()
                .map(|(a, r)| (a.clone(), control::quarantine_text(r)))
                .collect()),
            Err(e) => Err(Outcome::Failed {
                error: format!("cannot read the quarantine list (nothing was changed): {e}"),
            }),
        }
    }

    fn suspect(&self) -> Option<&str> {
        match self.op.request.mode {
            ReparentMode::Emergency => self.op.suspect.as_deref(),
            ReparentMode::Planned => None,
        }
    }

    fn intent(&self, fresh: &FreshShard) -> Result<Intent, Outcome> {
        let req = &self.op.request;
        let old_primary = fresh.record.as_ref().and_then(|r| r.primary.clone());
        let problem = Problem {
            code: match req.mode {
                ReparentMode::Planned => ProblemCode::ReparentInProgress,
                ReparentMode::Emergency => ProblemCode::DeadPrimary,
            },
            tablet: old_primary.clone(),
            detail: lock_purpose(req),
        };
        let last_primary = self
            .op
            .last_primary
            .clone()
            .filter(|p| Some(&p.alias) == old_primary.as_ref());
        let job = Job {
            keyspace: self.op.keyspace.clone(),
            shard: self.op.shard.clone(),
            problem: problem.clone(),
            quarantined: fresh.input.quarantined.clone(),
            last_primary: last_primary.clone(),
        };
        // Every call before the promotion runs under the fresh shard's action term.
        let action_term = fresh.action_term();
        let machine: Machine = match req.mode {
            ReparentMode::Planned => Box::new(planned::Planned::new(
                fresh.clone(),
                action_term,
                PlannedOptions {
                    to: req.to.clone(),
                    wait_timeout: req.wait_timeout,
                    max_lag: req.max_lag,
                    requester: req.requested_by(),
                },
                self.deps.cfg.action_timeout,
            )),
            ReparentMode::Emergency => Box::new(reparent::Emergency::new(
                reparent::EmergencyInput {
                    fresh: fresh.clone(),
                    last_primary,
                    action_term,
                    cfg: (*self.deps.cfg).clone(),
                },
                EmergencyOptions {
                    to: req.to.clone(),
                    demote_old_first: Some(EMERGENCY_DEMOTE_BOUND),
                    may_lose_acknowledged_writes: req.may_lose_acknowledged_writes,
                    old_primary_must_be_fenced: false,
                },
            )),
        };
        let events = self.events.clone();
        Ok(Intent {
            job,
            problem,
            machine: Ok(machine),
            observer: Some(StepObserver::new(move |s| {
                let _ = events.send(OpEvent::Step(s.clone()));
            })),
        })
    }

    fn finish(&self, end: &RunEnd, _under_lock: Duration) {
        match end {
            RunEnd::Ran(ran) => {
                let tablet = ran.old_primary.clone();
                match &ran.result {
                    Ok(d) => self.summary(
                        d.new_term.unwrap_or(ran.old_term),
                        tablet,
                        OUTCOME_OK,
                        d.detail.clone(),
                    ),
                    Err(e) => {
                        let outcome = match e {
                            RecoveryError::Refused(_) => OUTCOME_REFUSED,
                            _ => OUTCOME_FAILED,
                        };
                        let error = error_text(e);
                        let text = if undone(&ran.steps) {
                            format!("{error}; the demotion was undone (the old primary takes writes again)")
                        } else {
                            error
                        };
                        self.summary(ran.newest_term, tablet, outcome, text);
                    }
                }
            }
            other => {
                if let Some(text) = self.stopped_text(other) {
                    self.summary(Term::ZERO, None, OUTCOME_FAILED, text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mode: ReparentMode, to: Option<&str>) -> ReparentRequest {
        ReparentRequest {
            mode,
            to: to.map(str::to_string),
            wait_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(10),
            max_lag: Duration::from_secs(5),
            requester: "token:ops from 10.0.0.1".into(),
            on_behalf_of: None,
            may_lose_acknowledged_writes: false,
        }
    }

    #[test]
    fn events_are_one_json_object_per_line_as_the_contract_says() {
        let w = OpEvent::WaitingLock {
            holder: "orchestrator@h:1".into(),
            purpose: "repair primary_read_only".into(),
        };
        assert_eq!(
            w.line(),
            "{\"event\":\"waiting_lock\",\"holder\":\"orchestrator@h:1\",\"purpose\":\"repair primary_read_only\"}\n"
        );
        let s = OpEvent::Step(StepRecord {
            name: "demote".into(),
            tablet: Some("zone1-101".into()),
            ok: true,
            detail: "read_only on".into(),
            at_ms: 7,
            duration_ms: 12,
        });
        let v: serde_json::Value = serde_json::from_str(&s.line()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event": "step", "name": "demote", "tablet": "zone1-101", "ok": true,
                "detail": "read_only on", "at_ms": 7, "duration_ms": 12})
        );
        let ok = OpEvent::Done(OpDone {
            ok: true,
            mode: ReparentMode::Planned,
            kind: None,
            error: None,
            old_primary: Some("zone1-101".into()),
            new_primary: Some("zone1-102".into()),
            term: Some(Term::new(5)),
            undone: None,
            holder: None,
            purpose: None,
            total_ms: 143,
            detail: Some("...".into()),
        });
        let v: serde_json::Value = serde_json::from_str(&ok.line()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event": "done", "ok": true, "mode": "planned", "old_primary": "zone1-101",
                "new_primary": "zone1-102", "term": 5, "total_ms": 143, "detail": "..."})
        );
        let held = OpEvent::Done(OpDone {
            ok: false,
            mode: ReparentMode::Emergency,
            kind: Some(FailKind::LockHeld),
            error: Some("held by x (y)".into()),
            old_primary: Some("zone1-101".into()),
            new_primary: None,
            term: Some(Term::new(4)),
            undone: Some(false),
            holder: Some("x".into()),
            purpose: Some("y".into()),
            total_ms: 1000,
            detail: None,
        });
        let v: serde_json::Value = serde_json::from_str(&held.line()).unwrap();
        assert_eq!(v["kind"], "lock_held");
        assert_eq!(v["mode"], "emergency");
        assert_eq!(v["undone"], false);
        assert_eq!(
            (v["holder"].as_str(), v["purpose"].as_str()),
            (Some("x"), Some("y"))
        );
        assert!(held.line().ends_with("}\n") && held.line().matches('\n').count() == 1);
    }

    #[test]
    fn the_actor_and_the_lock_purpose_name_the_operator() {
        assert_eq!(
            operator_actor("alice", "orchestrator@h:1"),
            "operator:alice@orchestrator@h:1"
        );
        assert!(operator_actor("a", "b").starts_with(OPERATOR_ACTOR_PREFIX));
        assert_eq!(
            lock_purpose(&request(ReparentMode::Planned, Some("zone1-102"))),
            "planned reparent to zone1-102 requested by token:ops from 10.0.0.1"
        );
        let noted = ReparentRequest {
            on_behalf_of: Some("alice".into()),
            ..request(ReparentMode::Emergency, None)
        };
        assert_eq!(
            lock_purpose(&noted),
            "emergency reparent requested by token:ops from 10.0.0.1 (on behalf of alice)"
        );
    }
}
