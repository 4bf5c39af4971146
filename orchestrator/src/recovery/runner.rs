//! Running one recovery: the one lock-run-release path, shared by automatic and
//! operator-requested recoveries, with the flapping check and the re-analysis under the lock.

use super::*;
use topo::Term;

/// What a recovery attempt did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub keyspace: String,
    pub shard: String,
    pub problem: Problem,
    pub outcome: Outcome,
    pub steps: Vec<StepRecord>,
    /// The term written to the shard record, when the recovery changed it.
    pub new_term: Option<Term>,
    pub started_ms: u64,
    pub duration_ms: u64,
}

/// What a successful dispatch returns: the detail, and the new term and primary, if any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Done {
    pub detail: String,
    pub new_term: Option<Term>,
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

/// The problem to act on under the lock: `wanted` (what the engine saw) as the fresh analysis
/// finds it again, or why there is nothing to do (every problem found now, for the audit).
pub fn problem_under_lock(wanted: &Problem, fresh: &[Problem]) -> Result<Problem, String> {
    if let Some(p) = same_problem(wanted, fresh) {
        return Ok(p.clone());
    }
    let now: Vec<String> = fresh
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
    Err(format!(
        "problem gone after lock: {} {} no longer found (now: {})",
        wanted.code.as_str(),
        wanted.tablet.as_deref().unwrap_or(""),
        if now.is_empty() {
            "none".to_string()
        } else {
            now.join(", ")
        }
    ))
}

/// A recovery's step machine, as [`machine_for`] gives it.
pub type Machine = Box<dyn steps::StepMachine + Send>;

/// The step machine that carries out `problem`'s remedy (from the problem table) on the shard
/// as re-read under the lock, starting at [`FreshShard::action_term`]: the emergency reparents,
/// term reconciliation, and the repairs that are a sequence of calls ([`repair::Sequence`]).
/// `None` for the reports, which no machine carries out. `now_ms` is the wall clock the plan
/// stamps records with. The runner and the simulator dispatch through this one function.
pub fn machine_for(
    problem: &Problem,
    fresh: &FreshShard,
    last_primary: Option<PrimaryPosition>,
    cfg: &RecoveryConfig,
    now_ms: u64,
) -> Option<Result<Machine, RecoveryError>> {
    let remedy = problem.code.facts().remedy;
    let emergency = |opts: reparent::EmergencyOptions| -> Machine {
        let input = reparent::EmergencyInput {
            fresh: fresh.clone(),
            last_primary: last_primary.clone(),
            action_term: fresh.action_term(),
            cfg: cfg.clone(),
        };
        Box::new(reparent::Emergency::new(input, opts))
    };
    match remedy {
        Remedy::EmergencyReparent => Some(Ok(emergency(reparent::EmergencyOptions::default()))),
        Remedy::DemoteThenEmergencyReparent => Some(Ok(emergency(
            reparent::EmergencyOptions::stalled_primary(cfg),
        ))),
        Remedy::ReconcileTerms => Some(Ok(Box::new(repair::Reconcile::new(
            fresh.clone(),
            fresh.action_term(),
        )))),
        _ => repair::Sequence::plan(fresh, problem, remedy, fresh.action_term(), now_ms)
            .map(|r| r.map(|s| Box::new(s) as Machine)),
    }
}

/// How a run waits for the shard lock.
#[derive(Debug, Clone, Copy)]
pub enum LockWait {
    /// Up to this long (automatic recoveries: a holder past it is another instance, which acts).
    Bounded(Duration),
    /// Operator requests: a try first; when held, [`RunPlan::on_waiting`] names the holder and
    /// the run waits up to `timeout`, counted from `since` (the request's arrival).
    TryThenWait { timeout: Duration, since: Instant },
}

/// What a run carries out once the shard is re-read under the lock.
pub struct Intent {
    pub job: Job,
    /// The problem as re-found (or, for an operator request, as named by the request).
    pub problem: Problem,
    /// The step machine; an error is the run's result without any call made.
    pub machine: Result<Machine, RecoveryError>,
    /// Sees every step as it is recorded.
    pub observer: Option<StepObserver>,
}

/// A run that drove its machine.
#[derive(Debug)]
pub struct Ran {
    pub problem: Problem,
    pub result: Result<Done, RecoveryError>,
    pub steps: Vec<StepRecord>,
    /// The newest term a step was audited under (at least the action term).
    pub newest_term: Term,
    /// The record's primary and term as read under the lock.
    pub old_primary: Option<String>,
    pub old_term: Term,
    /// From the lock taken to the machine's end.
    pub took: Duration,
}

/// How [`locked_run`] ended. Every variant but the first two ended under the lock.
#[derive(Debug)]
pub enum RunEnd {
    /// The lock stayed held by someone else.
    LockHeld(topo::LockInfo),
    /// The lock could not be taken.
    NoLock(TopoError),
    /// [`RunPlan::before_refresh`] stopped the run (nothing was changed).
    Before(Outcome),
    /// The refresh under the lock failed (nothing was changed).
    Refresh(RecoveryError),
    /// [`RunPlan::intent`] found nothing to do; `term`: the record's.
    Declined {
        outcome: Outcome,
        term: Term,
    },
    Ran(Box<Ran>),
}

/// One kind of run (an automatic recovery, an operator request): what [`locked_run`] asks of
/// it at each stage. The path itself (lock, refresh, context, machine, summary, release) is
/// the same for all of them.
pub trait RunPlan: Sync {
    fn lock_request(&self) -> LockRequest;
    fn lock_wait(&self) -> LockWait;
    /// A [`LockWait::TryThenWait`] run found the lock held and waits now.
    fn on_waiting(&self, _holder: &topo::LockInfo) {}
    /// Whether the lock and refresh durations are reparent phases (metrics).
    fn timed_phases(&self) -> bool {
        false
    }
    /// Under the lock, before the refresh: the quarantine list the refresh uses, or the outcome
    /// that stops the run.
    fn before_refresh(
        &self,
        deps: &Deps,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, Outcome>> + Send;
    /// The tablet whose `FullStatus` gets a short bound in the refresh (a suspected dead primary).
    fn suspect(&self) -> Option<&str>;
    /// What to carry out on the fresh shard, or why nothing.
    fn intent(&self, fresh: &FreshShard) -> Result<Intent, Outcome>;
    /// Audits the end (called once, before the lock is released when it was taken);
    /// `under_lock`: how long the lock has been held (zero when it was not taken).
    fn finish(&self, end: &RunEnd, under_lock: Duration);
}

/// The one lock-run-release path of every recovery, automatic or requested: take the shard
/// lock ([`RunPlan::lock_wait`]), run [`RunPlan::before_refresh`], refresh the shard under the
/// lock, ask [`RunPlan::intent`], drive the machine through a [`RecoveryContext`] that holds
/// the lock, let [`RunPlan::finish`] audit the end, release the lock. The lock is a guard: on
/// any exit not through here (a panic, the task dropped) [`ShardLock`]'s drop frees it.
pub async fn locked_run<P: RunPlan>(deps: &Deps, ks: &str, shard: &str, plan: &P) -> RunEnd {
    let lock_started = Instant::now();
    let lock = match take_lock(deps, ks, shard, plan).await {
        Ok(l) => l,
        Err(end) => {
            plan.finish(&end, Duration::ZERO);
            return end;
        }
    };
    if plan.timed_phases() {
        reparent::phase("lock", lock_started.elapsed());
    }
    let t0 = Instant::now();
    let stop = |end: RunEnd, lock: ShardLock| async move {
        plan.finish(&end, t0.elapsed());
        release_lock(lock, ks, shard).await;
        end
    };
    let quarantined = match plan.before_refresh(deps).await {
        Ok(q) => q,
        Err(outcome) => return stop(RunEnd::Before(outcome), lock).await,
    };
    let fresh = match refresh(deps, ks, shard, &quarantined, plan.suspect()).await {
        Ok(f) => f,
        Err(e) => return stop(RunEnd::Refresh(e), lock).await,
    };
    if plan.timed_phases() {
        reparent::phase("refresh", t0.elapsed());
    }
    let intent = match plan.intent(&fresh) {
        Ok(i) => i,
        Err(outcome) => {
            let term = fresh.record_term();
            return stop(RunEnd::Declined { outcome, term }, lock).await;
        }
    };
    let old_primary = fresh.record.as_ref().and_then(|r| r.primary.clone());
    let old_term = fresh.record_term();
    let mut ctx = RecoveryContext::new(
        deps.clone(),
        intent.job,
        intent.problem.clone(),
        fresh,
        lock,
    );
    if let Some(o) = intent.observer {
        ctx = ctx.with_observer(o);
    }
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
    let result = match intent.machine {
        Ok(mut m) => steps::drive(&mut m, &ctx).await,
        Err(e) => Err(e),
    };
    let ran = Ran {
        problem: intent.problem,
        result,
        steps: ctx.steps(),
        newest_term: ctx.newest_term(),
        old_primary,
        old_term,
        took: ctx.started().elapsed(),
    };
    stop(RunEnd::Ran(Box::new(ran)), ctx.into_lock()).await
}

/// The lock as `plan` waits for it.
async fn take_lock<P: RunPlan>(
    deps: &Deps,
    ks: &str,
    shard: &str,
    plan: &P,
) -> Result<ShardLock, RunEnd> {
    let req = plan.lock_request();
    let taken = match plan.lock_wait() {
        LockWait::Bounded(wait) => deps.topo.lock_shard(ks, shard, req.with_wait(wait)).await,
        LockWait::TryThenWait { timeout, since } => {
            match deps.topo.lock_shard(ks, shard, req.clone()).await {
                Err(TopoError::LockHeld { holder, .. }) => {
                    plan.on_waiting(&holder);
                    let left = timeout.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        return Err(RunEnd::LockHeld(holder));
                    }
                    deps.topo.lock_shard(ks, shard, req.with_wait(left)).await
                }
                r => r,
            }
        }
    };
    match taken {
        Ok(l) => Ok(l),
        Err(TopoError::LockHeld { holder, .. }) => Err(RunEnd::LockHeld(holder)),
        Err(e) => Err(RunEnd::NoLock(e)),
    }
}

/// Runs one recovery the engine asked for (lock, flapping check, refresh, re-analysis,
/// action, summary, unlock) through [`locked_run`].
pub async fn run(deps: Deps, job: Job) -> Report {
    let started = Instant::now();
    let started_ms = topo::now_ms();
    let auto = Automatic {
        deps: &deps,
        job: &job,
    };
    let end = locked_run(&deps, &job.keyspace, &job.shard, &auto).await;
    let (outcome, steps, new_term, problem) = match end {
        RunEnd::LockHeld(holder) => (
            Outcome::LockHeld {
                holder: format!("{} ({})", holder.holder, holder.purpose),
            },
            Vec::new(),
            None,
            None,
        ),
        RunEnd::NoLock(e) => (
            Outcome::Failed {
                error: no_lock_reason(&e),
            },
            Vec::new(),
            None,
            None,
        ),
        RunEnd::Before(outcome) | RunEnd::Declined { outcome, .. } => {
            (outcome, Vec::new(), None, None)
        }
        RunEnd::Refresh(e) => (Outcome::of_error(&e), Vec::new(), None, None),
        RunEnd::Ran(ran) => {
            let ran = *ran;
            let outcome = Outcome::of_result(&ran.result);
            let new_term = ran.result.ok().and_then(|d| d.new_term);
            (outcome, ran.steps, new_term, Some(ran.problem))
        }
    };
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

fn no_lock_reason(e: &TopoError) -> String {
    format!("no recovery without the shard lock: {e}")
}

/// An automatic recovery of the problem the engine saw.
struct Automatic<'a> {
    deps: &'a Deps,
    job: &'a Job,
}

impl Automatic<'_> {
    fn action(&self) -> &'static str {
        action_name(self.job.problem.code)
    }

    fn audit(&self, term: Term, outcome: &str, detail: String, took: Option<Duration>) {
        self.deps.audit.append(
            &self.job.keyspace,
            &self.job.shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term,
                actor: self.deps.actor.to_string(),
                action: self.action().to_string(),
                tablet: self.job.problem.tablet.clone(),
                outcome: outcome.to_string(),
                detail,
                duration_ms: took.map(millis),
            },
        )
    }
}

impl RunPlan for Automatic<'_> {
    fn lock_request(&self) -> LockRequest {
        let p = &self.job.problem;
        let purpose = if p.code.is_dead_primary() {
            format!("emergency reparent ({})", p.detail)
        } else {
            format!("repair {}", p.code.as_str())
        };
        LockRequest::new(self.deps.actor.to_string(), purpose).with_ttl(self.deps.cfg.lock_ttl)
    }

    fn lock_wait(&self) -> LockWait {
        LockWait::Bounded(self.deps.cfg.lock_wait)
    }

    fn timed_phases(&self) -> bool {
        self.job.problem.code.is_dead_primary()
    }

    async fn before_refresh(&self, deps: &Deps) -> Result<BTreeMap<String, String>, Outcome> {
        let (ks, shard) = (self.job.keyspace.as_str(), self.job.shard.as_str());
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
                return Err(Outcome::Skipped {
                    reason: f.reason(ks, shard),
                })
            }
            Ok(None) => {}
            Err(e) => {
                // Not knowing is not a reason to leave a dead primary dead: act, and say so.
                tracing::warn!(keyspace = ks, shard, error = %e, "flapping check failed; proceeding");
            }
        }
        Ok(self.job.quarantined.clone())
    }

    fn suspect(&self) -> Option<&str> {
        let p = &self.job.problem;
        p.code
            .is_dead_primary()
            .then_some(p.tablet.as_deref())
            .flatten()
    }

    fn intent(&self, fresh: &FreshShard) -> Result<Intent, Outcome> {
        let problem = problem_under_lock(&self.job.problem, &fresh.problems)
            .map_err(|detail| Outcome::ProblemGone { detail })?;
        let machine = match machine_for(
            &problem,
            fresh,
            self.job.last_primary.clone(),
            &self.deps.cfg,
            topo::now_ms(),
        ) {
            Some(m) => m,
            None => Err(RecoveryError::Refused(format!(
                "{} is reported for an operator ({:?}): no automatic recovery",
                problem.code.as_str(),
                problem.code.facts().remedy
            ))),
        };
        Ok(Intent {
            job: self.job.clone(),
            problem,
            machine,
            observer: None,
        })
    }

    fn finish(&self, end: &RunEnd, under_lock: Duration) {
        let (ks, shard) = (self.job.keyspace.as_str(), self.job.shard.as_str());
        let code = self.job.problem.code;
        match end {
            RunEnd::LockHeld(holder) => {
                tracing::debug!(
                    keyspace = ks, shard, problem = code.as_str(), holder = %holder.holder,
                    purpose = %holder.purpose, "shard lock held by another instance; it acts"
                );
            }
            RunEnd::NoLock(e) => {
                let reason = no_lock_reason(e);
                tracing::warn!(keyspace = ks, shard, problem = code.as_str(), %reason, "recovery not started");
                self.audit(Term::ZERO, OUTCOME_FAILED, reason, None);
            }
            RunEnd::Before(outcome) => {
                self.audit(
                    Term::ZERO,
                    outcome.audit_outcome(),
                    outcome.text().to_string(),
                    Some(under_lock),
                );
            }
            RunEnd::Refresh(e) => {
                let outcome = Outcome::of_error(e);
                self.audit(
                    Term::ZERO,
                    outcome.audit_outcome(),
                    format!("refresh under the lock: {}", outcome.text()),
                    Some(under_lock),
                );
            }
            RunEnd::Declined { outcome, term } => {
                tracing::info!(
                    keyspace = ks,
                    shard,
                    detail = outcome.text(),
                    "recovery not needed"
                );
                self.audit(
                    *term,
                    outcome.audit_outcome(),
                    outcome.text().to_string(),
                    Some(under_lock),
                );
            }
            RunEnd::Ran(ran) => {
                let outcome = Outcome::of_result(&ran.result);
                let problem = &ran.problem;
                self.audit(
                    ran.newest_term,
                    outcome.audit_outcome(),
                    format!("{}: {}", problem.detail, outcome.text()),
                    Some(ran.took),
                );
                let took = ran.took;
                match &outcome {
                    Outcome::Recovered { .. } => tracing::info!(
                        keyspace = ks,
                        shard,
                        problem = problem.code.as_str(),
                        detail = outcome.text(),
                        ?took,
                        "recovered"
                    ),
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
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(code: ProblemCode, tablet: Option<&str>) -> Problem {
        Problem {
            code,
            tablet: tablet.map(str::to_string),
            detail: String::new(),
        }
    }

    #[test]
    fn the_problem_under_the_lock_is_the_same_one_or_says_what_is_there_now() {
        let wanted = problem(ProblemCode::DeadPrimary, Some("z-1"));
        // Any dead-primary variant of the same tablet is the same problem.
        let now = [problem(
            ProblemCode::DeadPrimaryAndSomeReplicas,
            Some("z-1"),
        )];
        assert_eq!(
            problem_under_lock(&wanted, &now).map(|p| p.code),
            Ok(ProblemCode::DeadPrimaryAndSomeReplicas)
        );
        let now = [problem(ProblemCode::UnreachablePrimary, Some("z-1"))];
        let gone = problem_under_lock(&wanted, &now).expect_err("gone");
        assert!(gone.contains("unreachable_primary (z-1)"), "{gone}");
        assert!(problem_under_lock(&wanted, &[])
            .expect_err("gone")
            .ends_with("(now: none)"));
    }
}
