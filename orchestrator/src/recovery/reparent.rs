//! Emergency reparent: the primary is dead (confirmed by the orchestrator and every reachable
//! replica); promote the best replica under a new term. Scenarios P1-P3, P7, P8, P9, P11-P13.
//!
//! Runs under the shard lock on a fresh view ([`RecoveryContext::fresh`]):
//! 1. new term = max(shard record term, highest term any reachable agent reports) + 1, so a
//!    half-finished reparent whose candidate already accepted a term is superseded (never two
//!    promotions under one term);
//! 2. a pre-check of the candidate choice on the current positions: a refusal (e.g. semi_sync
//!    durability cannot be met, P8) changes nothing;
//! 3. per reachable replica, in parallel: stop the IO thread and read what it applied and what
//!    it received (final: the primary is dead);
//! 4. errant check of each against the dead primary's last known position, then
//!    [`choose_candidate`] on everything each replica holds, applied or only received (under
//!    AFTER_SYNC a replica acknowledges on receipt, so an acknowledged write may exist only in a
//!    relay log); a refusal here restarts the IO threads and changes nothing else;
//! 5. if the candidate lags the most advanced tablet: that tablet applies everything it received
//!    (so that it is in its binlog), then the candidate catches up from it (bounded by
//!    `catch_up_timeout`), falling back to promoting the most advanced one (unless `must_not`);
//! 6. the candidate applies everything it received, a replication delay lifted (bounded by
//!    `relay_log_wait`, progress audited): never is a received transaction thrown away by the
//!    promotion's reset, and running out of the bound is a refusal, not the promotion of a less
//!    advanced tablet. The other replicas' relay logs may be discarded by their repointing: the
//!    new primary holds all they received;
//! 7. `Promote` under the new term, write the shard record (conditional on the lock), repoint
//!    every other reachable tablet at the new primary in parallel (a failure there is audited,
//!    the promotion stands).
//!
//! The procedure is one step machine, [`Emergency`] (see [`steps`]): it decides and never
//! waits, every agent action carries the term explicitly (the action term until step 1's
//! reservation succeeds, the new term after), and what a refusal undoes derives from its state:
//! the IO threads it stopped are restarted and an operator-requested demotion is undone; once
//! `Promote` was sent nothing is undone. [`super::steps::drive`] drives it against the real agents and
//! etcd (for the runner and for operator requests alike); the simulator drives the same machine against its models.
//!
//! An operator may ask for one whether or not the primary looks dead ([`EmergencyOptions`]):
//! the old primary, when it answers, is demoted first (bounded, best effort) and its final
//! position is what the replicas apply; a requested candidate replaces the choice. The old
//! primary is not repointed here: it is a stale primary claim that the repairs rejoin (or
//! quarantine, when it holds transactions the new primary lacks).

use std::collections::BTreeMap;
use std::time::Duration;

use gtid::GtidSet;
use myha_proto::agent as pb;
use topo::{Durability, PromotionRecord, PromotionRule, ShardRecord, TabletRecord, Term};

use super::steps::{Action, AgentAction, Call, CallId, Emitter, Now, Reply, StepMachine};
use super::{Done, FreshShard, PrimaryPosition, RecoveryConfig, RecoveryError};
use crate::analysis::{
    self, choose_candidate, choose_requested_candidate, Candidate, Choice, Refusal,
};
use crate::mutants::{self, Mutant};

/// How an emergency reparent was asked for. The default is the automatic one (dead primary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmergencyOptions {
    /// The candidate an operator asked for: refused if errant, `must_not`, quarantined or not
    /// answering; caught up from the most advanced replica first when behind (no fallback to
    /// another tablet when that fails).
    pub to: Option<String>,
    /// Operator request: when the old primary's agent answers, `Demote` it first, bounded by
    /// this (best effort: a failure is recorded and ignored). Its answer (the final position)
    /// becomes the errant-check reference and what the replicas apply before choosing. A
    /// refusal before the promotion undoes the demotion.
    pub demote_old_first: Option<Duration>,
    /// Operator request: promote even though replication could not be stopped on enough replicas
    /// to know every acknowledged transaction ([`revocation`]): an unreached replica may hold
    /// the only copy of acknowledged writes, which are then lost. Audited with those tablets.
    pub may_lose_acknowledged_writes: bool,
    /// The old primary is alive and takes writes again once whatever stalls it clears (a
    /// stalled primary): the demotion is not best effort. Under durability none a failed one
    /// refuses the failover (nothing else would stop those writes); under semi_sync it is
    /// noted and the reparent goes on (with every replica's IO thread stopped, no commit there
    /// can be acknowledged, and its agent fences it on the new term).
    pub old_primary_must_be_fenced: bool,
}

impl EmergencyOptions {
    /// A stalled primary (opt-in, [`crate::analysis::ProblemCode::StalledPrimary`]): its agent
    /// sets it read-only first, bounded by `action_timeout` (read_only is set past a global read
    /// lock's holder, and the writes blocked behind that lock then fail with
    /// ER_OPTION_PREVENTS_STATEMENT instead of committing on the deposed primary); its final
    /// position is what the replicas apply. See [`EmergencyOptions::old_primary_must_be_fenced`].
    pub fn stalled_primary(cfg: &RecoveryConfig) -> EmergencyOptions {
        EmergencyOptions {
            demote_old_first: Some(cfg.action_timeout),
            old_primary_must_be_fenced: true,
            ..EmergencyOptions::default()
        }
    }
}

/// Acknowledgements a commit needs under `d` (K): 1 under semi_sync (MariaDB 10.11 has no
/// `wait_for_slave_count`), 0 with no durability.
pub fn acks_required(d: Durability) -> usize {
    match d {
        Durability::SemiSync => 1,
        Durability::None => 0,
    }
}

/// Rule 2 of a lossless reparent (`lossless-reparent.md`; Vitess `haveRevoked`): with K
/// acknowledgements required per commit and R replicas that could acknowledge, only once
/// replication is stopped on at least R - K + 1 of them is the set of acknowledged transactions
/// fixed and known to lie within the reached ones (and the old primary can no longer complete a
/// commit). `Err` names the replicas not reached when fewer were; with K = 0 nothing is needed.
pub fn revocation<'a>(
    replicas: impl IntoIterator<Item = &'a String>,
    reached: &[String],
    acks_required: usize,
) -> Result<(), Vec<String>> {
    let unreached: Vec<String> = replicas
        .into_iter()
        .filter(|a| !reached.contains(a))
        .cloned()
        .collect();
    if acks_required == 0 || unreached.len() < acks_required {
        Ok(())
    } else {
        Err(unreached)
    }
}

/// Records one phase's duration (`myha_orchestrator_reparent_phase_seconds{phase}`).
pub fn phase(name: &'static str, took: Duration) {
    tracing::debug!(
        phase = name,
        took_ms = took.as_secs_f64() * 1000.0,
        "reparent phase"
    );
    metrics::histogram!("myha_orchestrator_reparent_phase_seconds", "phase" => name)
        .record(took.as_secs_f64());
}

/// The term of a new primary: above the record's, above any term a recovery reserved, and above
/// anything an agent accepted.
pub fn next_term(record_term: Term, reserved: Term, highest_reported: Term) -> Term {
    record_term.max(reserved).max(highest_reported).next()
}

/// What a replica's IO thread received from its source (`gtid_io_pos` / `Retrieved_Gtid_Set`),
/// applied or not; `None` without a source or when nothing was received.
pub fn received(h: &pb::Health) -> Option<String> {
    h.replication
        .as_ref()
        .filter(|r| r.configured)
        .map(|r| r.gtid_io_pos.trim().to_string())
        .filter(|p| !p.is_empty())
}

/// The reference for the errant check: the dead primary's last healthy position and its
/// writer id.
#[derive(Debug, Clone)]
pub struct Reference {
    pub position: GtidSet,
    pub writer: String,
}

/// Candidates from final statuses, each ranked on what it applied joined with what it received.
/// A tablet without a parseable position is left out (and reported in the second value).
pub fn candidates(
    statuses: &BTreeMap<String, pb::Health>,
    tablets: &BTreeMap<String, TabletRecord>,
    reference: Option<&Reference>,
) -> (Vec<Candidate>, Vec<String>) {
    let mut out = Vec::new();
    let mut left_out = Vec::new();
    for (alias, h) in statuses {
        let Some(rec) = tablets.get(alias) else {
            left_out.push(format!("{alias}: not registered"));
            continue;
        };
        let Some(applied) = analysis::position(h).filter(|_| h.mysql_reachable) else {
            left_out.push(format!("{alias}: no readable GTID position"));
            continue;
        };
        let held = match received(h)
            .filter(|_| !mutants::active(Mutant::RankOnApplied))
            .map(|r| GtidSet::parse(applied.flavor(), &r))
        {
            None => Ok(applied.clone()),
            Some(Ok(r)) => applied.union(&r).map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.to_string()),
        };
        let position = match held {
            Ok(p) => p,
            Err(e) => {
                // Unknown received transactions could be the only copy of acknowledged writes.
                left_out.push(format!("{alias}: unreadable received position ({e})"));
                continue;
            }
        };
        let errant = reference.and_then(|r| analysis::errant(&position, &r.position, &r.writer));
        out.push(Candidate {
            alias: alias.clone(),
            cell: rec.cell.clone(),
            rule: rec.promotion_rule,
            position,
            applied,
            errant,
        });
    }
    (out, left_out)
}

fn refusal_text(r: &Refusal) -> String {
    r.to_string()
}

/// What an emergency reparent starts from: the shard as re-read under the lock, the dead
/// primary's last healthy position as this orchestrator saw it, the term of actions before the
/// new one is reserved, and the tunables.
#[derive(Debug, Clone)]
pub struct EmergencyInput {
    pub fresh: FreshShard,
    pub last_primary: Option<PrimaryPosition>,
    pub action_term: Term,
    pub cfg: RecoveryConfig,
}

/// What the start of the run derived from its input (fixed for the run).
#[derive(Debug, Clone)]
struct Plan {
    record: ShardRecord,
    old_primary: String,
    new_term: Term,
    durability: Durability,
    old_cell: Option<String>,
    /// The replicas whose replication is stopped before the choice (every one that answers
    /// with its mysqld up: a quarantined one may acknowledge too).
    answering: BTreeMap<String, pb::Health>,
    /// Among them the candidates (not quarantined).
    reachable: BTreeMap<String, pb::Health>,
    /// Every registered replica that could have acknowledged the old primary's last commits.
    replicas: Vec<String>,
    /// Acknowledgements per commit (K).
    k: usize,
    /// Why the requested candidate cannot be promoted, if it cannot.
    why_missing: Option<String>,
    /// The old primary's mysqld address when its agent is gone (it cannot fence itself).
    agentless: Option<String>,
    /// Replicas whose mysqld restarted after the old primary was lost, with why: the restart
    /// discarded their relay log (`relay_log_recovery`), so what they acknowledged may be gone
    /// and they cannot vouch for it; the revocation counts them as not reached.
    relay_lost: BTreeMap<String, String>,
}

/// The outstanding calls, by what they are for.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    Demote,
    History,
    Reserve,
    StopIo(String),
    ReadStatus(String),
    CatchUpApplySource,
    CatchUpRepoint,
    CatchUpWait,
    CatchUpStop,
    ApplyCandidate,
    Fence,
    SelfDemotion,
    Promote,
    WriteRecord,
    Repoint(String),
    FenceAfter,
    Undo,
}

/// The race between fencing an agentless old primary over MySQL and relying on its agent's
/// isolation rule (durability none): whichever is settled first.
#[derive(Debug, Clone, Default)]
struct FenceRace {
    started: Duration,
    fence_failed: Option<String>,
    not_relied: Option<String>,
    /// Set once the replicas' "lost it since" is known: (ready at wall ms, lost since, waiting
    /// since).
    wait: Option<(u64, u64, Duration)>,
}

/// The emergency reparent as a step machine (see the module doc for its steps). Undo derives
/// from the state: replication restarted where it was stopped, an operator-requested demotion
/// undone; nothing is undone once the promotion was sent.
#[derive(Debug)]
pub struct Emergency {
    input: EmergencyInput,
    opts: EmergencyOptions,
    em: Emitter,
    term: Term,
    pending: BTreeMap<CallId, Pending>,
    plan: Option<Plan>,
    reference: Option<Reference>,
    demoted: bool,
    stopped: Vec<String>,
    /// What the answering replicas that are not candidates (quarantined) received, from their
    /// IO stop: under semi-sync they may have acknowledged it.
    received_elsewhere: BTreeMap<String, String>,
    final_statuses: BTreeMap<String, pb::Health>,
    cands: Vec<Candidate>,
    choice: Option<Choice>,
    candidate: Option<TabletRecord>,
    /// The promotion was sent: past the point of no return.
    committed: bool,
    /// Start of the current timed phase.
    phase_started: Duration,
    fence: FenceRace,
    repointed: Vec<String>,
    repoint_failed: Vec<(String, String)>,
    /// The error to return once the undo calls are answered.
    undoing: Option<RecoveryError>,
    finished: bool,
}

impl Emergency {
    pub fn new(input: EmergencyInput, opts: EmergencyOptions) -> Emergency {
        let term = input.action_term;
        Emergency {
            input,
            opts,
            em: Emitter::default(),
            term,
            pending: BTreeMap::new(),
            plan: None,
            reference: None,
            demoted: false,
            stopped: Vec::new(),
            received_elsewhere: BTreeMap::new(),
            final_statuses: BTreeMap::new(),
            cands: Vec::new(),
            choice: None,
            candidate: None,
            committed: false,
            phase_started: Duration::ZERO,
            fence: FenceRace::default(),
            repointed: Vec::new(),
            repoint_failed: Vec::new(),
            undoing: None,
            finished: false,
        }
    }

    /// The tablet promoted, once chosen.
    pub fn candidate(&self) -> Option<&str> {
        self.choice.as_ref().map(|c| c.candidate.as_str())
    }

    fn call(&mut self, call: Call, why: Pending) -> CallId {
        let id = self.em.call(call);
        self.pending.insert(id, why);
        id
    }

    fn agent(&mut self, tablet: &str, action: AgentAction, why: Pending) -> CallId {
        let call = Call::Agent {
            tablet: tablet.to_string(),
            term: self.term,
            action,
        };
        self.call(call, why)
    }

    fn record(&mut self, name: &'static str, tablet: Option<&str>, ok: bool, detail: String) {
        self.em
            .record(self.term, name, tablet, ok, detail, Duration::ZERO)
    }

    fn refuse(&mut self, name: &'static str, tablet: Option<&str>, why: String) -> RecoveryError {
        self.em.refuse(self.term, name, tablet, why)
    }

    fn phase(&mut self, name: &'static str, now: Now) {
        let took = now.since_start.saturating_sub(self.phase_started);
        self.em.out.push(Action::Phase(name, took));
    }

    fn finish(&mut self, r: Result<Done, RecoveryError>) {
        for id in std::mem::take(&mut self.pending).into_keys() {
            self.em.out.push(Action::Cancel(id));
        }
        self.finished = true;
        self.em.out.push(Action::Done(r));
    }

    /// Ends the run with `e`, first undoing what the state says was done (best effort).
    fn fail(&mut self, e: RecoveryError) {
        if self.committed {
            return self.finish(Err(e));
        }
        for alias in self.stopped.clone() {
            if let Some(why) = self.relay_log_at_risk(&alias) {
                self.record("restart_io", Some(&alias), false, why);
                continue;
            }
            self.agent(
                &alias,
                AgentAction::StartReplication { io_only: true },
                Pending::Undo,
            );
        }
        if self.demoted {
            let old = self.plan().old_primary.clone();
            self.agent(&old, AgentAction::UndoDemote, Pending::Undo);
        }
        if self.pending.is_empty() {
            self.finish(Err(e));
        } else {
            self.undoing = Some(e);
        }
    }

    /// MariaDB with GTID: starting the IO thread of a replica whose SQL thread is not running
    /// discards its relay log and fetches again from `gtid_slave_pos` (orchestrator avoids the
    /// same restart for this reason). With the primary lost, that relay log may hold the only
    /// copy of acknowledged writes (a quarantined errant replica's, stopped on error 1950, for
    /// one), so such a replica is left with replication stopped, and the reason recorded.
    fn relay_log_at_risk(&self, alias: &str) -> Option<String> {
        let h = self.plan.as_ref()?.answering.get(alias)?;
        let rep = h.replication.as_ref()?;
        let sql_running = rep.sql_state == pb::ThreadState::Running as i32;
        (analysis::flavor_of(h) == gtid::Flavor::MariaDb && !sql_running).then(|| {
            format!(
                "IO thread left stopped: its SQL thread is not running{}, and starting the IO thread would discard its relay log (MariaDB GTID), which may hold the only copy of acknowledged writes",
                if rep.last_sql_error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rep.last_sql_error)
                }
            )
        })
    }

    fn plan(&self) -> &Plan {
        // Every caller runs after `start` set it (a run without a plan finished in `start`).
        self.plan.as_ref().expect("plan set at start")
    }

    fn why_unreached(&self, a: &str) -> String {
        if let Some(why) = self.plan.as_ref().and_then(|p| p.relay_lost.get(a)) {
            return format!("{a} ({why})");
        }
        let fresh = &self.input.fresh;
        match (fresh.unseen.get(a), fresh.statuses.get(a)) {
            (Some(why), _) => format!("{a} (agent: {why})"),
            (None, Some(h)) if !h.mysql_reachable => {
                format!("{a} (mysqld unreachable: {})", h.mysql_error)
            }
            (None, Some(_)) => format!("{a} (its IO thread could not be stopped)"),
            (None, None) => format!("{a} (no answer)"),
        }
    }

    /// Rule 2 on `reached`: Ok(None) when met, Ok(Some(note)) when forced, Err(why).
    fn revoked(&self, reached: &[String]) -> Result<Option<String>, String> {
        let plan = self.plan();
        let (replicas, k) = (&plan.replicas, plan.k);
        if mutants::active(Mutant::SkipRevocation) {
            return Ok(None);
        }
        let reached: Vec<String> = reached
            .iter()
            .filter(|a| !plan.relay_lost.contains_key(*a))
            .cloned()
            .collect();
        match revocation(replicas, &reached, k) {
            Ok(()) => Ok(None),
            Err(unreached) => {
                let names: Vec<String> = unreached.iter().map(|a| self.why_unreached(a)).collect();
                let why = format!(
                    "semi_sync: replication must be stopped on at least {} of the {} replicas (R - K + 1, K = {k}) to know every acknowledged transaction; not reached: {}",
                    replicas.len() + 1 - k.min(replicas.len() + 1),
                    replicas.len(),
                    names.join(", ")
                );
                if self.opts.may_lose_acknowledged_writes {
                    Ok(Some(format!(
                        "FORCED by the operator (may_lose_acknowledged_writes): {why}; acknowledged writes held only there are lost"
                    )))
                } else {
                    Err(why)
                }
            }
        }
    }

    fn choose(&self, cands: &[Candidate]) -> Result<Choice, Refusal> {
        let plan = self.plan();
        match self.opts.to.as_deref() {
            Some(to) => {
                choose_requested_candidate(cands, to, plan.why_missing.as_deref(), plan.durability)
            }
            None => choose_candidate(cands, plan.old_cell.as_deref(), plan.durability),
        }
    }

    /// What a tablet still has to apply: its received position, unless its applied one (from
    /// the IO stop's answer) already contains it (then no wait, no RPC).
    fn held(&self, alias: &str) -> Option<String> {
        let h = self.final_statuses.get(alias)?;
        let r = received(h)?;
        let applied = analysis::position(h);
        let done = applied.is_some_and(|a| {
            GtidSet::parse(a.flavor(), &r)
                .ok()
                .and_then(|r| a.contains_set(&r).ok())
                .unwrap_or(false)
        });
        (!done).then_some(r)
    }

    /// Derives the plan and runs the checks that refuse before anything is changed.
    fn begin(&mut self, now: Now) {
        let fresh = &self.input.fresh;
        let Some(record) = fresh.record.clone() else {
            return self.finish(Err(RecoveryError::Refused(
                "the shard has no record".into(),
            )));
        };
        let Some(old_primary) = record.primary.clone() else {
            return self.finish(Err(RecoveryError::Refused(
                "the shard record names no primary".into(),
            )));
        };
        let durability = fresh.durability;
        let old_cell = fresh
            .tablets
            .get(&old_primary)
            .map(|t| t.cell.clone())
            .or_else(|| topo::parse_alias(&old_primary).ok().map(|(c, _)| c));
        self.reference = self
            .input
            .last_primary
            .as_ref()
            .filter(|p| p.alias == old_primary)
            .and_then(|p| {
                Some(Reference {
                    position: p.gtid_set()?,
                    writer: p.writer.clone(),
                })
            });
        let answering: BTreeMap<String, pb::Health> = fresh
            .statuses
            .iter()
            .filter(|(a, h)| **a != old_primary && h.mysql_reachable)
            .map(|(a, h)| (a.clone(), h.clone()))
            .collect();
        let reachable: BTreeMap<String, pb::Health> = answering
            .iter()
            .filter(|(a, _)| !fresh.input.quarantined.contains_key(*a))
            .map(|(a, h)| (a.clone(), h.clone()))
            .collect();
        // Every registered replica could have acknowledged the old primary's last commits,
        // except those known not to: a stale primary claim (promoted under an older term and
        // never repointed since, so it replicates from nobody) and a replica with its
        // semi-sync side off.
        let replicas: Vec<String> = fresh
            .tablets
            .keys()
            .filter(|a| **a != old_primary)
            .filter(|a| match fresh.statuses.get(*a) {
                Some(h) => {
                    let stale_primary = h.promoted_term > 0;
                    let no_ack = h.mysql_reachable
                        && h.semi_sync.as_ref().is_some_and(|s| !s.replica_enabled);
                    !stale_primary && !no_ack
                }
                None => true,
            })
            .cloned()
            .collect();
        let why_missing = self.opts.to.as_deref().and_then(|to| {
            if let Some(q) = fresh.input.quarantined.get(to) {
                Some(format!("it is quarantined ({q})"))
            } else if to == old_primary {
                Some("it is the primary being replaced".to_string())
            } else if !fresh.tablets.contains_key(to) {
                Some("it is not registered in this shard".to_string())
            } else {
                match fresh.statuses.get(to) {
                    None => Some(format!(
                        "its agent does not answer: {}",
                        fresh
                            .unseen
                            .get(to)
                            .map(String::as_str)
                            .unwrap_or("no answer")
                    )),
                    Some(h) if !h.mysql_reachable => {
                        Some(format!("its mysqld is unreachable: {}", h.mysql_error))
                    }
                    Some(_) => None,
                }
            }
        });
        let agentless = (!fresh.statuses.contains_key(&old_primary))
            .then(|| old_primary_addr(fresh, &old_primary))
            .flatten();
        let relay_lost = relay_lost(
            &answering,
            self.input
                .last_primary
                .as_ref()
                .filter(|p| p.alias == old_primary),
            &old_primary,
        );
        self.plan = Some(Plan {
            new_term: if mutants::active(Mutant::ReuseTerm) {
                record.term
            } else {
                fresh.next_promotion_term()
            },
            record,
            old_primary,
            durability,
            old_cell,
            answering,
            reachable,
            replicas,
            k: acks_required(durability),
            why_missing,
            agentless,
            relay_lost,
        });
        let plan = self.plan().clone();

        let answering_aliases: Vec<String> = plan.answering.keys().cloned().collect();
        if let Err(why) = self.revoked(&answering_aliases) {
            self.record("revocation", None, false, why.clone());
            return self.finish(Err(RecoveryError::Refused(format!(
                "{why}; nothing was changed (primary {} stays in the record at term {}); an operator may force it with may_lose_acknowledged_writes",
                plan.old_primary, plan.record.term
            ))));
        }
        // Pre-check on the current positions: refuse before changing anything.
        let (pre, _) = candidates(
            &plan.reachable,
            &self.input.fresh.tablets,
            self.reference.as_ref(),
        );
        if let Err(refusal) = self.choose(&pre) {
            // Positions may still move while the relay logs apply: decide on the final ones.
            if !matches!(refusal, Refusal::Diverged(_)) {
                let why = refusal_text(&refusal);
                self.record("choose_candidate", None, false, why.clone());
                return self.finish(Err(RecoveryError::Refused(format!(
                    "{why}; nothing was changed (primary {} stays in the record at term {})",
                    plan.old_primary, plan.record.term
                ))));
            }
        }
        // Operator request with the old primary answering: read-only first, its final
        // position is what the replicas must reach.
        if let Some(bound) = self.opts.demote_old_first {
            let answers = self
                .input
                .fresh
                .statuses
                .get(&plan.old_primary)
                .is_some_and(|h| h.mysql_reachable);
            if answers {
                self.agent(
                    &plan.old_primary,
                    AgentAction::Demote { bound },
                    Pending::Demote,
                );
                return;
            }
        }
        self.after_demote(now)
    }

    fn on_demoted(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        let plan = self.plan().clone();
        let old = plan.old_primary.as_str();
        match r {
            Ok(r) => {
                self.demoted = true;
                if let Some(h) = self.input.fresh.statuses.get(old) {
                    let flavor = analysis::flavor_of(h);
                    if let Ok(position) = GtidSet::parse(flavor, &r.gtid_position) {
                        self.reference = Some(Reference {
                            position,
                            writer: analysis::writer_id(h),
                        });
                    }
                }
            }
            Err(e)
                if self.opts.old_primary_must_be_fenced && plan.durability == Durability::None =>
            {
                let why = format!(
                    "durability none: the stalled old primary {old} could not be set read-only ({e}); once its stall clears nothing else stops its clients' writes, so promoting a replica would make two writable primaries; nothing was changed (primary {old} stays in the record at term {})",
                    plan.record.term
                );
                let refusal = self.refuse("fence_old_primary", Some(old), why);
                return self.finish(Err(refusal));
            }
            Err(e) if self.opts.old_primary_must_be_fenced => self.record(
                "demote_noted",
                Some(old),
                true,
                format!(
                    "the stalled old primary could not be set read-only ({e}); going on: under semi_sync none of its commits can be acknowledged once the replicas' IO threads stop, and its agent fences it on the new term"
                ),
            ),
            Err(e) => self.record(
                "demote_noted",
                Some(old),
                true,
                format!("the old primary could not be set read-only ({e}); going on"),
            ),
        }
        self.after_demote(now)
    }

    /// The errant-check reference when this orchestrator never saw the dead primary healthy
    /// (it just started, P7): the shard's own history.
    fn after_demote(&mut self, now: Now) {
        if self.reference.is_none() && !self.plan().answering.is_empty() {
            let term = self.plan().record.term;
            self.call(Call::GetPromotion(term), Pending::History);
            return;
        }
        self.reserve(now)
    }

    /// During term T only its primary writes, so beyond the position the term started from, a
    /// transaction written by another server is errant. Audited either way, with what the check
    /// rests on.
    fn on_history(&mut self, got: Result<Option<PromotionRecord>, RecoveryError>, now: Now) {
        let plan = self.plan().clone();
        let old_primary = plan.old_primary.as_str();
        let record = &plan.record;
        let Some(flavor) = plan.answering.values().next().map(analysis::flavor_of) else {
            return self.reserve(now);
        };
        let (reference, detail) = match got {
            Ok(Some(p)) if p.primary == old_primary => match GtidSet::parse(flavor, &p.position) {
                Ok(position) => (
                    Some(Reference {
                        position,
                        writer: p.writer.clone(),
                    }),
                    format!(
                        "the dead primary {old_primary}'s last position is unknown to this orchestrator; reference from the shard history: term {} started at {} (writer {}): a transaction past it not written by {old_primary} is errant",
                        p.term, p.position, p.writer
                    ),
                ),
                Err(e) => (
                    None,
                    format!("the shard history's start position of term {} cannot be read ({e}): errant check skipped (divergence is still refused)", p.term),
                ),
            },
            Ok(Some(p)) => (
                None,
                format!(
                    "the shard history gives term {} to {}, not to {old_primary}: errant check skipped (divergence is still refused)",
                    p.term, p.primary
                ),
            ),
            Ok(None) => (
                None,
                format!("the dead primary {old_primary}'s last position is unknown to this orchestrator and term {} has no promotion on record: errant check skipped (divergence is still refused)", record.term),
            ),
            Err(e) => (
                None,
                format!("the shard history cannot be read ({e}): errant check skipped (divergence is still refused)"),
            ),
        };
        self.em
            .audit(self.term, "errant_check", Some(old_primary), detail);
        self.reference = reference;
        self.reserve(now)
    }

    /// Reserves the new term before touching anything (a refusal above burns no term):
    /// whoever acts on this shard after us uses a higher one, even if we lose the lock mid-way.
    fn reserve(&mut self, _now: Now) {
        let plan = self.plan();
        let mut record = plan.record.clone();
        record.reserved_term = record.reserved_term.max(plan.new_term);
        let call = Call::WriteShardRecord {
            step: "write_shard_record",
            term: self.term,
            record,
        };
        self.call(call, Pending::Reserve);
    }

    fn on_reserved(&mut self, r: Result<i64, RecoveryError>, now: Now) {
        if let Err(e) = r {
            return self.fail(e);
        }
        // Every step from here on carries the reserved term: it is ours alone (reserved under
        // the lock), so an agent that accepted one of our steps refuses anyone acting under an
        // older term, and one that accepted a newer holder's step at this term refuses ours.
        self.term = self.plan().new_term;
        // Stop IO everywhere: what each replica received is final from here on.
        self.phase_started = now.since_start;
        let answering: Vec<String> = self.plan().answering.keys().cloned().collect();
        for alias in &answering {
            self.agent(
                alias,
                AgentAction::StopReplication { io_only: true },
                Pending::StopIo(alias.clone()),
            );
        }
        if answering.is_empty() {
            self.after_stop(now);
        }
    }

    /// Applied and received positions come from the stop's answer; `FullStatus` is only asked
    /// when the stop failed (a replica that then does not answer is left out).
    fn on_stopped(&mut self, alias: String, r: Result<pb::ActionResponse, RecoveryError>) {
        match r {
            Ok(r) => {
                self.stopped.push(alias.clone());
                if let Some(before) = self.plan().reachable.get(&alias) {
                    let mut h = before.clone();
                    if let Some(m) = h.mysql.as_mut() {
                        m.gtid_position = r.gtid_position;
                    }
                    if let Some(rep) = h.replication.as_mut() {
                        rep.gtid_io_pos = r.gtid_received;
                    }
                    self.final_statuses.insert(alias, h);
                } else if !r.gtid_received.is_empty() {
                    self.received_elsewhere.insert(alias, r.gtid_received);
                }
            }
            Err(_) => {
                let call = Call::Status {
                    tablet: alias.clone(),
                };
                self.call(call, Pending::ReadStatus(alias));
            }
        }
    }

    fn on_status(&mut self, alias: String, r: Result<Box<pb::Health>, RecoveryError>) {
        match r {
            Ok(h) if h.mysql_reachable => {
                if self.plan().reachable.contains_key(&alias) {
                    self.final_statuses.insert(alias, *h);
                } else if let Some(r) = received(&h) {
                    self.received_elsewhere.insert(alias, r);
                }
            }
            Ok(h) => self.record(
                "read_position",
                Some(&alias),
                false,
                format!("mysqld unreachable: {}", h.mysql_error),
            ),
            Err(e) => self.record("read_position", Some(&alias), false, e.to_string()),
        }
    }

    fn after_stop(&mut self, now: Now) {
        self.phase("stop_io", now);
        self.stopped.sort();
        let plan = self.plan().clone();
        match self.revoked(&self.stopped) {
            Ok(None) => {
                let detail = format!(
                    "replication stopped on {} of {} replicas: every acknowledged transaction is among them",
                    self.stopped.len(),
                    plan.replicas.len()
                );
                // A check, not an action: the stops are steps of their own.
                self.record("revocation", None, true, detail)
            }
            Ok(Some(forced)) => self.record("revocation", None, true, forced),
            Err(why) => {
                let refusal = self.refuse("revocation", None, why);
                return self.fail(refusal);
            }
        }
        // Choose.
        self.phase_started = now.since_start;
        let (cands, left_out) = candidates(
            &self.final_statuses,
            &self.input.fresh.tablets,
            self.reference.as_ref(),
        );
        for c in cands.iter().filter(|c| c.errant.is_some()) {
            self.record(
                "errant_check",
                Some(&c.alias),
                false,
                format!(
                    "errant transactions {} (not on dead primary {}): never promoted",
                    c.errant.as_deref().unwrap_or_default(),
                    plan.old_primary
                ),
            );
        }
        let choice = match self.choose(&cands) {
            Ok(c) => c,
            Err(refusal) => {
                let why = refusal_text(&refusal);
                self.record("choose_candidate", None, false, why.clone());
                return self.fail(RecoveryError::Refused(format!(
                    "{why}{}; IO threads restarted, primary {} stays in the record at term {}",
                    if left_out.is_empty() {
                        String::new()
                    } else {
                        format!(" (left out: {})", left_out.join("; "))
                    },
                    plan.old_primary,
                    plan.record.term
                )));
            }
        };
        if let Some(why) = self.received_beyond_target(&cands, &choice) {
            self.record("choose_candidate", None, false, why.clone());
            return self.fail(RecoveryError::Refused(format!(
                "{why}; IO threads restarted, primary {} stays in the record at term {}",
                plan.old_primary, plan.record.term
            )));
        }
        self.record(
            "choose_candidate",
            Some(&choice.candidate),
            true,
            format!(
                "{}{}",
                choice.reason,
                choice
                    .catch_up_from
                    .as_ref()
                    .map(|s| format!("; catch up from {s} first"))
                    .unwrap_or_default()
            ),
        );
        self.phase("choose", now);
        self.cands = cands;
        let catch_up_from = choice.catch_up_from.clone();
        self.choice = Some(choice);
        match catch_up_from {
            // Catch up from the most advanced tablet: it applies what it received first, so
            // that everything the candidate fetches from it is in its binlog.
            Some(source) => {
                self.phase_started = now.since_start;
                match self.held(&source) {
                    Some(received) => {
                        let bound = self.input.cfg.relay_log_wait;
                        self.agent(
                            &source,
                            AgentAction::ApplyReceived { received, bound },
                            Pending::CatchUpApplySource,
                        );
                    }
                    None => self.catch_up_repoint(now),
                }
            }
            None => self.apply_candidate(now),
        }
    }

    fn choice(&self) -> &Choice {
        self.choice.as_ref().expect("chosen before")
    }

    /// Under semi-sync, a replica that can acknowledge but cannot be promoted (quarantined, or
    /// holding errant transactions) may hold the only copy of acknowledged writes in what it
    /// received: the choice's target (what the candidate will hold, the most advanced clean
    /// replica's position) must contain it, or the promotion would lose them. Nothing can
    /// fetch them from such a replica (an errant one's SQL thread is typically stopped on the
    /// primary's transaction at its errant sequence number, so they are not in its binlog):
    /// the answer is a refusal, with what is missing where.
    fn received_beyond_target(&self, cands: &[Candidate], choice: &Choice) -> Option<String> {
        let plan = self.plan();
        if plan.durability != Durability::SemiSync {
            return None;
        }
        let flavor = cands.first().map(|c| c.position.flavor())?;
        let target = GtidSet::parse(flavor, &choice.target_position).ok()?;
        let errant = cands.iter().filter(|c| c.errant.is_some()).filter_map(|c| {
            Some((
                c.alias.clone(),
                received(self.final_statuses.get(&c.alias)?)?,
            ))
        });
        let quarantined = self
            .received_elsewhere
            .iter()
            .map(|(a, r)| (a.clone(), r.clone()));
        let beyond: Vec<String> = errant
            .chain(quarantined)
            .filter(|(a, _)| plan.replicas.contains(a) && !plan.relay_lost.contains_key(a))
            .filter_map(|(a, r)| {
                let got = GtidSet::parse(flavor, &r).ok()?;
                (!target.contains_set(&got).unwrap_or(false)).then(|| format!("{a} received {r}"))
            })
            .collect();
        (!beyond.is_empty()).then(|| {
            format!(
                "durability semi_sync: {} (quarantined or errant, so never promoted, and it may have acknowledged what it received), beyond the most advanced clean replica's {}: promoting {} would lose those writes; refusing (an operator may force it)",
                beyond.join("; "),
                choice.target_position,
                choice.candidate
            )
        })
    }

    /// Points the candidate at the most advanced tablet; then waits for the target and stops
    /// replication.
    fn catch_up_repoint(&mut self, now: Now) {
        let choice = self.choice().clone();
        let source = choice.catch_up_from.clone().unwrap_or_default();
        match self.input.fresh.tablets.get(&source).cloned() {
            Some(src) => {
                self.agent(
                    &choice.candidate,
                    AgentAction::SetReplicationSource {
                        step: "catch_up_from",
                        source: src,
                        semi_sync: false,
                        start_replication: true,
                    },
                    Pending::CatchUpRepoint,
                );
            }
            None => self.catch_up_failed(RecoveryError::UnknownTablet(source), now),
        }
    }

    fn on_catch_up(
        &mut self,
        step: Pending,
        r: Result<pb::ActionResponse, RecoveryError>,
        now: Now,
    ) {
        if let Err(e) = r {
            return self.catch_up_failed(e, now);
        }
        let choice = self.choice().clone();
        match step {
            Pending::CatchUpApplySource => self.catch_up_repoint(now),
            Pending::CatchUpRepoint => {
                let bound = self.input.cfg.catch_up_timeout;
                self.agent(
                    &choice.candidate,
                    AgentAction::WaitForPosition {
                        step: "catch_up",
                        position: choice.target_position.clone(),
                        bound,
                    },
                    Pending::CatchUpWait,
                );
            }
            Pending::CatchUpWait => {
                self.agent(
                    &choice.candidate,
                    AgentAction::StopReplication { io_only: false },
                    Pending::CatchUpStop,
                );
            }
            _ => {
                self.phase("catch_up", now);
                self.apply_candidate(now)
            }
        }
    }

    /// Catch-up failed: refused for a requested candidate; otherwise the most advanced tablet
    /// is promoted instead, unless it is `must_not`.
    fn catch_up_failed(&mut self, err: RecoveryError, now: Now) {
        self.phase("catch_up", now);
        let choice = self.choice().clone();
        let source = choice.catch_up_from.clone().unwrap_or_default();
        if self.opts.to.is_some() {
            let why = format!(
                "catch-up of the requested candidate {} from {source} failed ({err}): not promoting another tablet than requested",
                choice.candidate
            );
            let refusal = self.refuse("catch_up_fallback", Some(&source), why);
            return self.fail(refusal);
        }
        let src = self.cands.iter().find(|c| c.alias == source);
        match src {
            Some(c) if c.rule != PromotionRule::MustNot => {
                let detail = format!(
                    "catch-up of {} from {source} failed ({err}): promoting {source}, the most advanced, instead",
                    choice.candidate
                );
                self.record("catch_up_fallback", Some(&source), true, detail.clone());
                let others = self
                    .cands
                    .iter()
                    .filter(|c| c.alias != source)
                    .map(|c| c.alias.clone())
                    .collect();
                self.choice = Some(Choice {
                    candidate: source.clone(),
                    catch_up_from: None,
                    target_position: choice.target_position.clone(),
                    others,
                    reason: detail,
                });
                self.apply_candidate(now)
            }
            _ => {
                let why = format!(
                    "catch-up of {} from {source} failed ({err}) and {source} has promotion rule must_not: refusing to promote a tablet missing transactions",
                    choice.candidate
                );
                let refusal = self.refuse("catch_up_fallback", Some(&source), why);
                self.fail(refusal)
            }
        }
    }

    /// The candidate applies everything it received (after a catch-up: a no-op, it waited for
    /// the target). The promotion resets replication, which would throw the rest away.
    fn apply_candidate(&mut self, now: Now) {
        let choice = self.choice().clone();
        if choice.catch_up_from.is_none() && !mutants::active(Mutant::PromoteBeforeApplied) {
            if let Some(received) = self.held(&choice.candidate) {
                self.phase_started = now.since_start;
                let bound = self.input.cfg.relay_log_wait;
                self.agent(
                    &choice.candidate,
                    AgentAction::ApplyReceived { received, bound },
                    Pending::ApplyCandidate,
                );
                return;
            }
        }
        self.fence_or_promote(now)
    }

    fn on_applied(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        self.phase("apply_relay_log", now);
        if let Err(e) = r {
            let alias = self.choice().candidate.clone();
            let target = self.held(&alias).unwrap_or_default();
            let why = format!(
                "candidate {alias} received up to {target} but did not apply it within relay_log_wait ({:?}): {e}; refusing rather than promote a tablet missing acknowledged transactions",
                self.input.cfg.relay_log_wait
            );
            let refusal = self.refuse("apply_relay_log", Some(&alias), why);
            return self.fail(refusal);
        }
        self.fence_or_promote(now)
    }

    /// A deposed primary whose agent is gone cannot fence itself: the candidate's agent fences
    /// its mysqld over MySQL. Under durability none nothing else stops its clients' writes,
    /// so that comes first and a failure refuses the promotion (unless forced); under
    /// semi_sync its commits cannot complete without the replicas stopped above, and it is
    /// fenced right after the promotion, off the critical path.
    fn fence_or_promote(&mut self, now: Now) {
        let alias = self.choice().candidate.clone();
        let Some(candidate) = self.input.fresh.tablets.get(&alias).cloned() else {
            return self.fail(RecoveryError::UnknownTablet(alias));
        };
        self.candidate = Some(candidate);
        let plan = self.plan().clone();
        match (&plan.agentless, plan.durability) {
            (Some(addr), Durability::None) => {
                // Fenced over MySQL from the candidate, or relied on to have fenced itself (its
                // lease expired while no replica reached it: the isolation rule), whichever is
                // settled first: a cut-off host never answers the fence, and waiting out its
                // bound first would only delay the promotion.
                self.fence = FenceRace {
                    started: now.since_start,
                    ..FenceRace::default()
                };
                self.phase_started = now.since_start;
                self.agent(
                    &alias,
                    AgentAction::FenceServer {
                        target: plan.old_primary.clone(),
                        addr: addr.clone(),
                        bound: FENCE_BOUND,
                    },
                    Pending::Fence,
                );
                self.call(Call::GetPromotion(plan.record.term), Pending::SelfDemotion);
            }
            _ => self.promote(now),
        }
    }

    fn on_fence(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        match r {
            Ok(_) => self.fence_settled(Ok(()), now),
            Err(e) => match self.fence.not_relied.take() {
                Some(n) => self.fence_settled(
                    Err(format!("{e}; nor can it be taken as self-demoted: {n}")),
                    now,
                ),
                None => self.fence.fence_failed = Some(e.to_string()),
            },
        }
    }

    /// Durability none, the old primary's agent silent and its mysqld not fenceable from here:
    /// whether its agent's isolation rule (see [`topo::SELF_DEMOTE_PEER_WINDOW`]) has made it
    /// read-only, waiting up to `self_demotion_wait` for what that rests on: its promotion
    /// record says its agent follows the rule, its registration is gone from etcd (the lease
    /// expired), and every replica has failed to reach it for the rule's window plus a margin.
    fn on_self_demotion(&mut self, reply: Reply, now: Now) {
        let plan = self.plan().clone();
        let old_primary = plan.old_primary.as_str();
        let term = plan.record.term;
        let verdict: Option<Result<String, String>> = match reply {
            Reply::Promotion(got) => match got {
                Ok(Some(p)) if p.primary == old_primary && p.self_demotes => {
                    self.call(
                        Call::RegistrationLastSeen(old_primary.to_string()),
                        Pending::SelfDemotion,
                    );
                    None
                }
                Ok(Some(p)) if p.primary == old_primary => Some(Err(format!(
                    "the promotion record of term {term} does not say its agent demotes itself when isolated"
                ))),
                Ok(_) => Some(Err(format!(
                    "no promotion record of term {term} names it: whether its agent demotes itself is unknown"
                ))),
                Err(e) => Some(Err(format!("the promotion record of term {term}: {e}"))),
            },
            Reply::LastSeen(seen) => {
                // The latest of the replicas' "lost it since": the rule's window runs from the
                // last answer.
                let lost_since = self
                    .input
                    .fresh
                    .statuses
                    .iter()
                    .filter(|(a, _)| a.as_str() != old_primary)
                    .filter_map(|(_, h)| h.primary_probe.as_ref())
                    .filter(|p| {
                        p.primary_alias == old_primary && !p.reachable && p.failing_since_ms > 0
                    })
                    .map(|p| p.failing_since_ms)
                    .max()
                    .unwrap_or(now.wall_ms);
                // Its agent must have been alive (registered) when the replicas lost it: one
                // already gone (a dead agent, P17) runs no rule, and its mysqld may still take
                // writes.
                match seen {
                    Some(seen) if seen >= lost_since => {
                        let ready_ms = lost_since
                            + (topo::SELF_DEMOTE_PEER_WINDOW + SELF_DEMOTION_MARGIN).as_millis()
                                as u64;
                        self.fence.wait = Some((ready_ms, lost_since, now.since_start));
                        self.call(
                            Call::GetTablet(old_primary.to_string()),
                            Pending::SelfDemotion,
                        );
                        None
                    }
                    seen => Some(Err(format!(
                        "its registration was last seen {}, before the replicas lost it ({lost_since} ms): its agent was already gone, so nothing demotes it",
                        seen.map_or("never".to_string(), |s| format!("at {s} ms"))
                    ))),
                }
            }
            Reply::Tablet(registered) => {
                let (ready_ms, lost_since, waited) = self.fence.wait.unwrap_or_default();
                let gone = matches!(registered, Ok(None));
                let waited_for = now.since_start.saturating_sub(waited);
                let bound = self.input.cfg.self_demotion_wait;
                if gone && now.wall_ms >= ready_ms {
                    Some(Ok(format!(
                        "taken as fenced by its own agent: its registration lease expired and no replica has reached it for {} ms (the isolation rule demotes a primary before its lease runs out once no other tablet answers it for {} ms); waited {} ms for that",
                        now.wall_ms.saturating_sub(lost_since),
                        topo::SELF_DEMOTE_PEER_WINDOW.as_millis(),
                        waited_for.as_millis()
                    )))
                } else if waited_for >= bound {
                    let missing = match registered {
                        Ok(Some(_)) => "its registration is still in etcd (its agent still renews its lease: it may reach etcd and still take writes)".to_string(),
                        Ok(None) => format!("the replicas lost it only {} ms ago", now.wall_ms.saturating_sub(lost_since)),
                        Err(e) => format!("its registration cannot be read: {e}"),
                    };
                    Some(Err(format!(
                        "after waiting {} ms (recovery.self_demotion_wait): {missing}",
                        bound.as_millis()
                    )))
                } else {
                    self.call(
                        Call::Sleep(SELF_DEMOTION_POLL),
                        Pending::SelfDemotion,
                    );
                    None
                }
            }
            Reply::Slept => {
                self.call(
                    Call::GetTablet(old_primary.to_string()),
                    Pending::SelfDemotion,
                );
                None
            }
            _ => Some(Err("unexpected reply while waiting for self-demotion".into())),
        };
        match verdict {
            None => {}
            Some(Ok(detail)) => {
                let addr = plan.agentless.clone().unwrap_or_default();
                let fence = match &self.fence.fence_failed {
                    Some(e) => format!("its mysqld at {addr} could not be fenced ({e})"),
                    None => format!("its mysqld at {addr} had not answered the fence"),
                };
                let took = now.since_start.saturating_sub(self.fence.started);
                self.em.record(
                    self.term,
                    "fence_old_primary",
                    Some(old_primary),
                    true,
                    format!("{fence}; {detail}"),
                    took,
                );
                self.fence_settled(Ok(()), now)
            }
            Some(Err(n)) => match self.fence.fence_failed.take() {
                Some(e) => self.fence_settled(
                    Err(format!("{e}; nor can it be taken as self-demoted: {n}")),
                    now,
                ),
                None => self.fence.not_relied = Some(n),
            },
        }
    }

    fn fence_settled(&mut self, r: Result<(), String>, now: Now) {
        // Whichever side is still running is not wanted any more.
        let losers: Vec<CallId> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Fence | Pending::SelfDemotion))
            .map(|(id, _)| *id)
            .collect();
        for id in losers {
            self.pending.remove(&id);
            self.em.out.push(Action::Cancel(id));
        }
        self.phase("fence_old_primary", now);
        if let Err(e) = r {
            let plan = self.plan().clone();
            let old_primary = plan.old_primary.as_str();
            let why = format!(
                "durability none: the old primary {old_primary}'s agent is gone and its mysqld at {} could not be fenced ({e}); with nothing else to stop its clients' writes, promoting {} would make two writable primaries",
                plan.agentless.as_deref().unwrap_or_default(),
                self.choice().candidate
            );
            if self.opts.may_lose_acknowledged_writes {
                self.record(
                    "fence_old_primary",
                    Some(old_primary),
                    true,
                    format!("FORCED by the operator (may_lose_acknowledged_writes): {why}"),
                );
            } else {
                let refusal = self.refuse("fence_old_primary", Some(old_primary), why);
                return self.fail(refusal);
            }
        }
        self.promote(now)
    }

    /// Promote under the new term: from here on nothing is undone.
    fn promote(&mut self, now: Now) {
        self.phase_started = now.since_start;
        self.committed = true;
        let alias = self.choice().candidate.clone();
        self.agent(&alias, AgentAction::Promote, Pending::Promote);
    }

    fn on_promoted(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        if let Err(e) = r {
            return self.finish(Err(e));
        }
        self.phase("promote", now);
        self.phase_started = now.since_start;
        let plan = self.plan();
        let next = ShardRecord {
            primary: Some(self.choice().candidate.clone()),
            term: plan.new_term,
            term_start_ms: now.wall_ms,
            reparent_in_progress: None,
            reserved_term: plan.new_term,
            ..plan.record.clone()
        };
        let call = Call::WriteShardRecord {
            step: "write_shard_record",
            term: self.term,
            record: next,
        };
        self.call(call, Pending::WriteRecord);
    }

    /// Repoints everyone else who answered (a failure there is audited, the promotion
    /// stands); under semi_sync an agentless old primary is fenced meanwhile.
    fn on_written(&mut self, r: Result<i64, RecoveryError>, now: Now) {
        if let Err(e) = r {
            return self.finish(Err(e));
        }
        self.phase("write_record", now);
        self.phase_started = now.since_start;
        let plan = self.plan().clone();
        let candidate = self
            .candidate
            .clone()
            .expect("candidate set before promote");
        let semi = plan.durability == Durability::SemiSync;
        let others: Vec<String> = self
            .choice()
            .others
            .iter()
            .filter(|a| **a != candidate.alias && self.final_statuses.contains_key(*a))
            .cloned()
            .collect();
        for a in &others {
            self.agent(
                a,
                AgentAction::SetReplicationSource {
                    step: "repoint",
                    source: candidate.clone(),
                    semi_sync: semi,
                    start_replication: true,
                },
                Pending::Repoint(a.clone()),
            );
        }
        if let (Some(addr), Durability::SemiSync) = (&plan.agentless, plan.durability) {
            self.agent(
                &candidate.alias,
                AgentAction::FenceServer {
                    target: plan.old_primary.clone(),
                    addr: addr.clone(),
                    bound: FENCE_BOUND,
                },
                Pending::FenceAfter,
            );
        }
        self.maybe_done(now);
    }

    fn maybe_done(&mut self, now: Now) {
        if !self.pending.is_empty() {
            return;
        }
        self.phase("repoint", now);
        let total = now.since_start;
        self.em.out.push(Action::Phase("total", total));
        let plan = self.plan().clone();
        let choice = self.choice().clone();
        let candidate = choice.candidate.as_str();
        // In the order they were asked for, whatever order they answered in.
        let order = |a: &str| choice.others.iter().position(|o| o == a);
        self.repointed.sort_by_key(|a| order(a));
        self.repoint_failed.sort_by_key(|(a, _)| order(a));
        let unseen: Vec<&String> = self
            .input
            .fresh
            .tablets
            .keys()
            .filter(|a| {
                **a != plan.old_primary && *a != candidate && !self.final_statuses.contains_key(*a)
            })
            .collect();
        let detail = format!(
            "promoted {candidate} at term {} (dead primary {}, term {}): {}; repointed [{}]{}{}",
            plan.new_term,
            plan.old_primary,
            plan.record.term,
            choice.reason,
            self.repointed.join(", "),
            if self.repoint_failed.is_empty() {
                String::new()
            } else {
                let failed: Vec<String> = self
                    .repoint_failed
                    .iter()
                    .map(|(a, e)| format!("{a}: {e}"))
                    .collect();
                format!("; repoint failed: {}", failed.join("; "))
            },
            if unseen.is_empty() {
                String::new()
            } else {
                format!(
                    "; not reachable (repointed when they return): {}",
                    unseen
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        self.finish(Ok(Done {
            detail,
            new_term: Some(plan.new_term),
            new_primary: Some(candidate.to_string()),
        }))
    }
}

impl StepMachine for Emergency {
    fn start(&mut self, now: Now) -> Vec<Action> {
        self.begin(now);
        self.em.take()
    }

    fn on_reply(&mut self, id: CallId, reply: Reply, now: Now) -> Vec<Action> {
        let Some(why) = self.pending.remove(&id) else {
            return Vec::new();
        };
        if self.finished {
            return Vec::new();
        }
        match (why, reply) {
            (Pending::Undo, _) => {
                if self.pending.is_empty() {
                    let e = self
                        .undoing
                        .take()
                        .unwrap_or_else(|| RecoveryError::Failed("undone".into()));
                    self.finish(Err(e));
                }
            }
            (Pending::Demote, Reply::Action(r)) => self.on_demoted(r, now),
            (Pending::History, Reply::Promotion(r)) => self.on_history(r, now),
            (Pending::Reserve, Reply::Written(r)) => self.on_reserved(r, now),
            (Pending::StopIo(a), Reply::Action(r)) => {
                self.on_stopped(a, r);
                self.after_stops_if_done(now);
            }
            (Pending::ReadStatus(a), Reply::Status(r)) => {
                self.on_status(a, r);
                self.after_stops_if_done(now);
            }
            (
                p @ (Pending::CatchUpApplySource
                | Pending::CatchUpRepoint
                | Pending::CatchUpWait
                | Pending::CatchUpStop),
                Reply::Action(r),
            ) => self.on_catch_up(p, r, now),
            (Pending::ApplyCandidate, Reply::Action(r)) => self.on_applied(r, now),
            (Pending::Fence, Reply::Action(r)) => self.on_fence(r, now),
            (Pending::SelfDemotion, reply) => self.on_self_demotion(reply, now),
            (Pending::Promote, Reply::Action(r)) => self.on_promoted(r, now),
            (Pending::WriteRecord, Reply::Written(r)) => self.on_written(r, now),
            (Pending::Repoint(a), Reply::Action(r)) => {
                match r {
                    Ok(_) => self.repointed.push(a),
                    Err(e) => self.repoint_failed.push((a, e.to_string())),
                }
                self.maybe_done(now);
            }
            (Pending::FenceAfter, Reply::Action(r)) => {
                if let Err(e) = r {
                    let plan = self.plan().clone();
                    self.em.audit(
                        self.term,
                        "fence_old_primary_noted",
                        Some(&plan.old_primary),
                        format!("not fenced ({e}): under semi_sync its commits wait for acks no replica sends any more; fenced by its agent if that returns"),
                    );
                }
                self.maybe_done(now);
            }
            (why, reply) => self.fail(RecoveryError::Failed(format!(
                "emergency reparent: unexpected reply {reply:?} to {why:?}"
            ))),
        }
        self.em.take()
    }

    fn term(&self) -> Term {
        self.term
    }
}

impl Emergency {
    fn after_stops_if_done(&mut self, now: Now) {
        let stopping = self
            .pending
            .values()
            .any(|p| matches!(p, Pending::StopIo(_) | Pending::ReadStatus(_)));
        if !stopping {
            self.after_stop(now);
        }
    }
}

/// Bound on fencing a deposed primary's mysqld over MySQL (a dead host must not hold a
/// failover up for long).
pub const FENCE_BOUND: Duration = Duration::from_secs(2);

/// Past [`topo::SELF_DEMOTE_PEER_WINDOW`], what an orchestrator adds before relying on the
/// isolation rule: the agent's tick, its fence and clock skew between the replicas' hosts.
const SELF_DEMOTION_MARGIN: Duration = Duration::from_millis(500);

/// How often the old primary's registration is re-read while waiting for its self-demotion.
const SELF_DEMOTION_POLL: Duration = Duration::from_millis(100);

/// Replicas that cannot vouch for what they acknowledged: their mysqld restarted after the old
/// primary was last known alive, so the restart discarded their relay log
/// (`relay_log_recovery=1`) and the acknowledged transactions it held, while the primary was no
/// longer there to send them again.
///
/// One whose outage began while the primary was still alive (its agent saw it) is reached when
/// the primary is known to have sent the others what it lost (P8): the primary's position as
/// this orchestrator last saw it healthy, after that outage began, is held (received or applied)
/// by another answering replica that did not restart. A replica that was down could not
/// acknowledge anything the primary wrote later, so everything it may have acknowledged is in
/// that position. Without such a sighting, or when no other replica holds it (the outage
/// began just before the primary was lost, with the other replicas behind), it is not
/// reached. Both cases found by the simulator: a replica crashing right after the primary
/// froze, and one crashing 5 ms before the primary did, each with the other replica cut off
/// from the primary shortly before.
fn relay_lost(
    answering: &BTreeMap<String, pb::Health>,
    last_primary: Option<&PrimaryPosition>,
    old_primary: &str,
) -> BTreeMap<String, String> {
    // The last moment the primary is known to have been alive: this orchestrator's last healthy
    // sight of it, or a replica's last successful probe (just before its probe started failing,
    // or its latest one while it still succeeds), whichever is latest. Every such moment is
    // before the primary was lost, so the latest one flags the fewest replicas and stays safe.
    let seen = last_primary.map(|p| (p.seen_ms, "was last seen healthy by this orchestrator"));
    let probed = answering
        .values()
        .filter_map(|h| h.primary_probe.as_ref())
        .filter(|p| p.primary_alias == old_primary)
        .filter_map(|p| match (p.reachable, p.failing_since_ms) {
            (true, _) => Some(p.probed_at_ms),
            (false, since) if since > 0 => Some(since),
            _ => None,
        })
        .max()
        .map(|t| (t, "last answered a replica's probe"));
    let Some((lost_ms, how)) = seen.into_iter().chain(probed).max_by_key(|(t, _)| *t) else {
        return BTreeMap::new();
    };
    // Restarted after the primary was last known alive. Its agent saw when the outage began;
    // when it did not see one (it started with its mysqld, or the restart fell between two
    // polls), the start alone decides, past `Uptime`'s whole-second granularity (a mysqld
    // started just before the loss must not look restarted after it).
    let restarted = |h: &pb::Health| {
        let started = h.mysql.as_ref().map_or(0, |m| m.started_at_ms);
        if h.mysqld_outage_started_ms > 0 {
            started > lost_ms
        } else {
            started > lost_ms + UPTIME_GRANULARITY_MS
        }
    };
    // Whether a replica other than `alias`, not restarted, holds what the primary held when
    // this orchestrator last saw it, provided that sighting came after `outage` began.
    let sent_on = |alias: &str, outage: u64| -> Option<String> {
        let p = last_primary.filter(|p| outage > 0 && p.seen_ms > outage + CLOCK_MARGIN_MS)?;
        let target = p.gtid_set()?;
        answering
            .iter()
            .filter(|(a, h)| a.as_str() != alias && !restarted(h))
            .find(|(_, h)| {
                let applied = analysis::position(h);
                let got = received(h).and_then(|r| GtidSet::parse(target.flavor(), &r).ok());
                let held = match (applied, got) {
                    (Some(a), Some(g)) => a.union(&g).ok(),
                    (a, g) => a.or(g),
                };
                held.is_some_and(|h| h.contains_set(&target).unwrap_or(false))
            })
            .map(|(a, _)| a.clone())
    };
    answering
        .iter()
        .filter(|(_, h)| restarted(h))
        .filter_map(|(alias, h)| {
            let started = h.mysql.as_ref().map_or(0, |m| m.started_at_ms);
            let outage = h.mysqld_outage_started_ms;
            if outage > 0 && outage < lost_ms {
                // Down while the primary was alive (P8): reached if the primary is known to
                // have sent the others what its relay log lost.
                if sent_on(alias, outage).is_some() {
                    return None;
                }
                let seen = last_primary.map_or(0, |p| p.seen_ms);
                return Some((
                    alias.clone(),
                    format!(
                        "its mysqld restarted at {started} ms (down since {outage} ms, while the primary was alive), after the primary {how} at {lost_ms} ms; no other replica received what the primary held when this orchestrator last saw it healthy{}: the restart discarded its relay log, so acknowledged transactions only it held may be gone",
                        if seen > outage {
                            format!(" at {seen} ms")
                        } else {
                            " after that outage began".to_string()
                        }
                    ),
                ));
            }
            Some((
                alias.clone(),
                format!(
                    "its mysqld restarted at {started} ms, after the primary {how} at {lost_ms} ms: the restart discarded its relay log, so acknowledged transactions it held may be gone"
                ),
            ))
        })
        .collect()
}

/// The orchestrator's sighting of the primary (the primary host's poll time) is compared with
/// a replica's outage start (the replica host's clock): a sighting counts as after the outage
/// only past this margin for clock skew between hosts and the poll's own duration.
const CLOCK_MARGIN_MS: u64 = 500;

/// `Uptime` counts whole seconds: a start estimated from it is up to this late.
const UPTIME_GRANULARITY_MS: u64 = 1_000;

/// The mysqld address of the old primary: its registration, else (gone past its lease, P17)
/// what the replicas probe it at.
fn old_primary_addr(fresh: &FreshShard, old_primary: &str) -> Option<String> {
    if let Some(t) = fresh.tablets.get(old_primary) {
        return Some(format!("{}:{}", t.mysql_host, t.mysql_port));
    }
    fresh
        .statuses
        .values()
        .filter_map(|h| h.primary_probe.as_ref())
        .find(|p| p.primary_alias == old_primary && !p.addr.is_empty())
        .map(|p| p.addr.clone())
}

#[cfg(test)]
mod machine_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use myha_proto::agent::{MysqlStatus, Replication};
    use tabletwatch::testing::tablet_record;

    #[test]
    fn new_term_supersedes_everything_seen() {
        let t = Term::new;
        assert_eq!(next_term(t(1), t(0), t(0)), t(2));
        assert_eq!(next_term(t(1), t(1), t(1)), t(2));
        // A dead orchestrator's candidate accepted term 2 but the record still says 1.
        assert_eq!(next_term(t(1), t(0), t(2)), t(3));
        // A frozen orchestrator reserved term 2 and nobody has seen it used yet.
        assert_eq!(next_term(t(1), t(2), t(1)), t(3));
        assert_eq!(next_term(t(5), t(0), t(3)), t(6));
        assert_eq!(next_term(t(u64::MAX), t(0), t(0)), t(u64::MAX));
    }

    fn health(pos: &str, io_pos: &str, configured: bool) -> pb::Health {
        pb::Health {
            mysql_reachable: true,
            mysql: Some(MysqlStatus {
                gtid_position: pos.into(),
                server_id: 102,
                flavor: "mariadb".into(),
                ..Default::default()
            }),
            replication: Some(Replication {
                configured,
                gtid_io_pos: io_pos.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn revocation_needs_r_minus_k_plus_one_replicas() {
        let r: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let reached = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // K = 1 (MariaDB semi-sync): every replica.
        assert_eq!(revocation(&r, &reached(&["a", "b", "c"]), 1), Ok(()));
        assert_eq!(
            revocation(&r, &reached(&["a", "c"]), 1),
            Err(vec!["b".to_string()])
        );
        // K = 2: one may be missing, not two.
        assert_eq!(revocation(&r, &reached(&["a", "c"]), 2), Ok(()));
        assert_eq!(
            revocation(&r, &reached(&["a"]), 2),
            Err(vec!["b".to_string(), "c".to_string()])
        );
        // No durability: nothing to revoke.
        assert_eq!(revocation(&r, &[], 0), Ok(()));
        assert_eq!(acks_required(Durability::SemiSync), 1);
        assert_eq!(acks_required(Durability::None), 0);
    }

    #[test]
    fn received_is_the_io_threads_position_only() {
        assert_eq!(
            received(&health("0-101-5", "0-101-9", true)).as_deref(),
            Some("0-101-9")
        );
        assert_eq!(received(&health("0-101-5", "", true)), None);
        assert_eq!(
            received(&health("0-101-5", "0-101-9", false)),
            None,
            "without a source the received position means nothing"
        );
    }

    #[test]
    fn candidates_hold_what_they_received_beside_what_they_applied() {
        let mut tablets = BTreeMap::new();
        for a in ["zone1-102", "zone1-103"] {
            tablets.insert(a.to_string(), tablet_record(a, "ks", "0"));
        }
        let statuses: BTreeMap<String, pb::Health> = [
            (
                "zone1-102".to_string(),
                health("0-101-18", "0-101-8115", true),
            ),
            ("zone1-103".to_string(), health("0-101-1491", "", true)),
        ]
        .into();
        let (c, left_out) = candidates(&statuses, &tablets, None);
        assert!(left_out.is_empty(), "{left_out:?}");
        assert_eq!(c[0].position.to_string(), "0-101-8115");
        assert_eq!(c[0].applied.to_string(), "0-101-18");
        assert_eq!(c[1].position.to_string(), "0-101-1491");
        let mut bad = statuses.clone();
        bad.insert("zone1-103".into(), health("0-101-5", "junk", true));
        let (c, left_out) = candidates(&bad, &tablets, None);
        assert_eq!(c.len(), 1);
        assert!(
            left_out[0].contains("unreadable received position"),
            "{left_out:?}"
        );
    }

    #[test]
    fn candidates_carry_rules_cells_and_errant_sets() {
        let mut tablets = BTreeMap::new();
        for a in ["zone1-102", "zone1-103", "zone2-104"] {
            tablets.insert(a.to_string(), tablet_record(a, "ks", "0"));
        }
        if let Some(t) = tablets.get_mut("zone1-103") {
            t.promotion_rule = PromotionRule::MustNot;
        }
        let statuses: BTreeMap<String, pb::Health> = [
            ("zone1-102".to_string(), health("0-101-10", "", true)),
            (
                "zone1-103".to_string(),
                health("0-101-12,1-103-2", "", true),
            ),
            ("zone2-104".to_string(), health("garbage", "", true)),
            ("zone9-999".to_string(), health("0-101-1", "", true)),
        ]
        .into();
        let reference = Reference {
            position: GtidSet::parse(gtid::Flavor::MariaDb, "0-101-11").expect("parses"),
            writer: "101".into(),
        };
        let (c, left_out) = candidates(&statuses, &tablets, Some(&reference));
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].alias, "zone1-102");
        assert_eq!(c[0].errant, None);
        assert_eq!(c[1].rule, PromotionRule::MustNot);
        assert_eq!(
            c[1].errant.as_deref(),
            Some("1-103-1..2"),
            "its own domain is errant; 0-101-12 is the primary's own write"
        );
        assert_eq!(left_out.len(), 2, "{left_out:?}");
        let (c, _) = candidates(&statuses, &tablets, None);
        assert!(
            c.iter().all(|c| c.errant.is_none()),
            "no reference, no errant check"
        );
    }
}
