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

type Ran = (Outcome, Vec<StepRecord>, Option<Term>, Option<Problem>);

async fn run_locked(deps: &Deps, job: &Job) -> Ran {
    let (ks, shard) = (job.keyspace.as_str(), job.shard.as_str());
    let code = job.problem.code;
    let audit_now = |action: &str, outcome: &str, detail: String| {
        deps.audit.append(
            ks,
            shard,
            AuditEntry {
                at_ms: topo::now_ms(),
                term: Term::ZERO,
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
    let summary = |term: Term, outcome: &str, detail: String, took: Duration| {
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
            summary(Term::ZERO, OUTCOME_SKIPPED, reason.clone(), t0.elapsed());
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
                Term::ZERO,
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
    let problem = match problem_under_lock(&job.problem, &fresh.problems) {
        Ok(p) => p,
        Err(detail) => {
            tracing::info!(keyspace = ks, shard, %detail, "recovery not needed");
            summary(term, OUTCOME_GONE, detail.clone(), t0.elapsed());
            release(lock).await;
            return (Outcome::ProblemGone { detail }, Vec::new(), None, None);
        }
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
    let result = match machine_for(
        &problem,
        &ctx.fresh,
        ctx.job.last_primary.clone(),
        ctx.cfg(),
        topo::now_ms(),
    ) {
        Some(Ok(mut m)) => steps::drive(&mut m, &ctx).await,
        Some(Err(e)) => Err(e),
        None => Err(RecoveryError::Refused(format!(
            "{} is reported for an operator ({:?}): no automatic recovery",
            problem.code.as_str(),
            problem.code.facts().remedy
        ))),
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
        ctx.newest_term(),
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
