//! Repairs that need no reparent (R1-R9), plus electing the first primary of a new shard and
//! rejoining (or quarantining) a returning old primary.
//!
//! Contract with the engine ([`super::run`]): every remedy of [`crate::problem::PROBLEMS`] but
//! the reports and the emergency reparents is a step machine here ([`Sequence`], [`Reconcile`]),
//! planned from the shard as re-read under the shard lock, with the problem re-found there.
//! Each call names its term; each is an audited step.
//!
//! Order matters for semi-sync: the analysis only reports the primary side once a replica acks,
//! so replicas are always fixed first and no commit ever waits on a primary with no acker.

use super::steps::{Action, AgentAction, Call, CallId, Emitter, Now, Reply, StepMachine};
use super::{Done, FreshShard, RecoveryError};
use crate::analysis::{self, Candidate, Problem};
use crate::problem::Remedy;
use topo::Term;
use topo::{Durability, ShardRecord};

fn tablet_of(problem: &Problem) -> Result<&str, RecoveryError> {
    problem
        .tablet
        .as_deref()
        .ok_or_else(|| RecoveryError::Failed(format!("{} names no tablet", problem.code.as_str())))
}

fn primary_of(fresh: &FreshShard) -> Result<String, RecoveryError> {
    fresh
        .record
        .as_ref()
        .and_then(|r| r.primary.clone())
        .ok_or_else(|| RecoveryError::Refused("the shard record names no primary".into()))
}

/// A repair's agent actions, each on a tablet, and its detail.
type Actions = (Vec<(String, AgentAction)>, String);

/// A repair that is a fixed list of calls, decided up front from the problem and the fresh
/// shard (with an explicit `now`): the remedies of a single tablet's setting (R1-R9), electing
/// a first primary, quarantining, clearing a stale mark. The first failure of a step that must
/// succeed ends it with that error; a step that may fail (repointing the other replicas once a
/// primary is in place) is told in the detail instead. Nothing is undone: each call is a fix of
/// its own, made safe by the order of the list, and the next analysis sees what is left.
#[derive(Debug)]
pub struct Sequence {
    term: Term,
    steps: std::collections::VecDeque<Step>,
    done: Done,
    pending: Option<(CallId, Step)>,
    /// The failed steps that may fail, as "tablet: error".
    left: Vec<String>,
    emit: Emitter,
}

/// One call of a [`Sequence`] and whether the sequence goes on when it fails.
#[derive(Debug, Clone)]
struct Step {
    call: Call,
    may_fail: bool,
}

impl Step {
    fn must(call: Call) -> Step {
        Step {
            call,
            may_fail: false,
        }
    }
}

impl Sequence {
    /// The sequence for `remedy`, `None` when the remedy is not a sequence (reconcile, the
    /// reparents, reports); an error when the problem or the shard lacks what the remedy needs.
    /// `term` is the term the calls run under (the shard's action term); a promotion's new
    /// term is decided here. `now_ms` stamps the records written.
    pub fn plan(
        fresh: &FreshShard,
        problem: &Problem,
        remedy: Remedy,
        term: Term,
        now_ms: u64,
    ) -> Option<Result<Sequence, RecoveryError>> {
        let semi = fresh.durability == Durability::SemiSync;
        let one = |tablet: &str, action: AgentAction| vec![(tablet.to_string(), action)];
        let planned = (|| -> Result<Option<Actions>, RecoveryError> {
            Ok(Some(match remedy {
                Remedy::MakePrimaryWritable => {
                    let p = tablet_of(problem)?;
                    // Never writable before lossless: under semi_sync the primary side is
                    // (re)applied first (AFTER_SYNC, no fallback, waiting with no replica),
                    // else the first commits after read_only could be acknowledged with no
                    // replica holding them.
                    let mut v = Vec::new();
                    if semi {
                        v.push((
                            p.to_string(),
                            AgentAction::SetSemiSync {
                                primary: Some(true),
                                replica: None,
                            },
                        ));
                    }
                    v.push((p.to_string(), AgentAction::SetReadOnly { read_only: false }));
                    let how = if semi {
                        "semi-sync primary side made lossless, then "
                    } else {
                        ""
                    };
                    (v, format!("{p}: {how}read_only set back to OFF"))
                }
                Remedy::ResetPrimaryReplication => {
                    let p = tablet_of(problem)?;
                    (
                        one(p, AgentAction::ResetReplication),
                        format!("{p}: replication on the primary stopped and reset"),
                    )
                }
                Remedy::SetPrimarySemiSync(on) => {
                    let p = tablet_of(problem)?;
                    let action = AgentAction::SetSemiSync {
                        primary: Some(on),
                        replica: None,
                    };
                    (
                        one(p, action),
                        format!("{p}: semi-sync primary side {}", onoff(on)),
                    )
                }
                Remedy::SetReplicaSemiSync(on) => {
                    let r = tablet_of(problem)?;
                    let action = AgentAction::SetSemiSync {
                        primary: None,
                        replica: Some(on),
                    };
                    (
                        one(r, action),
                        format!("{r}: semi-sync replica side {}", onoff(on)),
                    )
                }
                Remedy::MakeReplicaReadOnly => {
                    let r = tablet_of(problem)?;
                    (
                        one(r, AgentAction::SetReadOnly { read_only: true }),
                        format!("{r}: read_only set back to ON"),
                    )
                }
                Remedy::RestartReplication => {
                    let r = tablet_of(problem)?;
                    // START SLAVE alone leaves an IO thread that is (re)connecting as it is, to
                    // its own retry (MASTER_CONNECT_RETRY): the problem came back on every pass
                    // (found by the simulator: a lost dump request, 15 repairs in 1.5 s).
                    // Stopping the IO thread first makes the start a fresh connection.
                    (
                        vec![
                            (
                                r.to_string(),
                                AgentAction::StopReplication { io_only: true },
                            ),
                            (
                                r.to_string(),
                                AgentAction::StartReplication { io_only: false },
                            ),
                        ],
                        format!("{r}: replication restarted"),
                    )
                }
                Remedy::RepointAtPrimary => {
                    let r = tablet_of(problem)?;
                    let primary = primary_of(fresh)?;
                    let source = fresh
                        .tablets
                        .get(&primary)
                        .cloned()
                        .ok_or_else(|| RecoveryError::UnknownTablet(primary.clone()))?;
                    let detail = format!(
                        "{r}: repointed at {primary} ({}:{})",
                        source.mysql_host, source.mysql_port
                    );
                    let action = AgentAction::SetReplicationSource {
                        step: "repoint to the primary",
                        source,
                        semi_sync: semi,
                        start_replication: true,
                    };
                    (one(r, action), detail)
                }
                _ => return Ok(None),
            }))
        })();
        let planned = match (planned, remedy) {
            (Ok(None), Remedy::RejoinOrQuarantine) => {
                rejoin_or_quarantine(fresh, problem, term).map(Some)
            }
            (Ok(None), Remedy::QuarantineErrant) => quarantine_errant(problem, term).map(Some),
            (Ok(None), Remedy::ElectPrimary) => elect_primary(fresh, term, now_ms).map(Some),
            (Ok(None), Remedy::ClearStaleMark) => clear_stale_mark(fresh, now_ms).map(Some),
            (Ok(Some((actions, detail))), _) => Ok(Some(Sequence::new(
                term,
                actions
                    .into_iter()
                    .map(|(tablet, action)| Call::Agent {
                        tablet,
                        term,
                        action,
                    })
                    .collect(),
                detail,
            ))),
            (Ok(None), _) => Ok(None),
            (Err(e), _) => Err(e),
        };
        planned.transpose()
    }

    /// Calls that must all succeed, ending with `detail`.
    fn new(term: Term, calls: Vec<Call>, detail: String) -> Sequence {
        Sequence::of(
            term,
            calls.into_iter().map(Step::must).collect(),
            Done {
                detail,
                ..Done::default()
            },
        )
    }

    fn of(term: Term, steps: Vec<Step>, done: Done) -> Sequence {
        Sequence {
            term,
            steps: steps.into(),
            done,
            pending: None,
            left: Vec::new(),
            emit: Emitter::default(),
        }
    }

    fn next(&mut self) -> Vec<Action> {
        match self.steps.pop_front() {
            Some(step) => {
                let id = self.emit.call(step.call.clone());
                self.pending = Some((id, step));
            }
            None => {
                let mut done = std::mem::take(&mut self.done);
                if !self.left.is_empty() {
                    done.detail = format!(
                        "{}; not done (the repairs finish it): {}",
                        done.detail,
                        self.left.join("; ")
                    );
                }
                self.emit.out.push(Action::Done(Ok(done)));
            }
        }
        self.emit.take()
    }
}

/// The tablet a call acts on, for the detail of a step that failed.
fn call_tablet(call: &Call) -> &str {
    match call {
        Call::Agent { tablet, .. } | Call::Status { tablet } => tablet,
        Call::Quarantine { alias, .. } | Call::GetTablet(alias) => alias,
        Call::RegistrationLastSeen(alias) => alias,
        Call::WriteShardRecord { step, .. } => step,
        Call::GetPromotion(_) | Call::Sleep(_) => "",
    }
}

impl StepMachine for Sequence {
    fn start(&mut self, _now: Now) -> Vec<Action> {
        self.next()
    }

    fn on_reply(&mut self, id: CallId, reply: Reply, _now: Now) -> Vec<Action> {
        let Some((_, step)) = self.pending.take_if(|(pending, _)| *pending == id) else {
            return Vec::new();
        };
        let error = match reply {
            Reply::Action(Ok(_)) | Reply::Quarantined(Ok(())) | Reply::Written(Ok(_)) => {
                return self.next()
            }
            Reply::Action(Err(e)) | Reply::Quarantined(Err(e)) | Reply::Written(Err(e)) => e,
            other => RecoveryError::Failed(format!(
                "repair: unexpected reply {other:?} to a repair step"
            )),
        };
        if step.may_fail {
            self.left
                .push(format!("{}: {error}", call_tablet(&step.call)));
            return self.next();
        }
        vec![Action::Done(Err(error))]
    }

    fn term(&self) -> Term {
        self.term
    }
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// X2: brings the shard record up to the terms the tablets report, without ever making a tablet
/// writable. One writable tablet that claims a promotion above the record (and replicates from
/// nobody) while every other answering tablet is read-only is the primary: the record adopts it
/// at its promotion term. Without such a claim only the reservation is raised (nothing changes
/// hands). Several claims, or a claimant that is not the only writable tablet: refused, with
/// what was seen.
pub fn reconcile_terms(fresh: &FreshShard, now_ms: u64) -> Result<(ShardRecord, Done), Refusal> {
    let rec = fresh.record.clone().ok_or_else(|| Refusal {
        tablet: None,
        why: "the shard has no record".into(),
    })?;
    let highest = fresh.highest_reported_term();
    let claims: Vec<(&String, &myha_proto::agent::Health)> = fresh
        .statuses
        .iter()
        .filter(|(_, h)| h.promoted_term > rec.term.get())
        .collect();
    let writable: Vec<&String> = fresh
        .statuses
        .iter()
        .filter(|(_, h)| h.mysql_reachable && h.mysql.as_ref().is_some_and(|m| !m.read_only))
        .map(|(a, _)| a)
        .collect();
    let mut next = rec.clone();
    next.reserved_term = rec.reserved_term.max(highest);
    let detail = match claims.as_slice() {
        [] => format!(
            "no tablet claims a promotion above term {}: reservation raised to {} (primary {} unchanged)",
            rec.term,
            next.reserved_term,
            rec.primary.as_deref().unwrap_or("none")
        ),
        [(alias, h)] => {
            let replicating = h.replication.as_ref().is_some_and(|r| r.configured);
            if writable.as_slice() != [*alias] || replicating {
                return Err(Refusal {
                    tablet: Some((*alias).clone()),
                    why: format!(
                        "{alias} claims term {} above the record's {}, but it is not the only writable tablet (writable: [{}]){}: not adopted, an operator must decide",
                        h.promoted_term,
                        rec.term,
                        writable.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
                        if replicating { ", and it replicates from a source" } else { "" }
                    ),
                });
            }
            next.primary = Some((*alias).clone());
            next.term = Term::new(h.promoted_term);
            next.term_start_ms = now_ms;
            next.reparent_in_progress = None;
            format!(
                "{alias}, the only writable tablet, was promoted under term {} above the record's {} (primary {}): adopted as primary at term {}, reservation {}",
                h.promoted_term,
                rec.term,
                rec.primary.as_deref().unwrap_or("none"),
                next.term,
                next.reserved_term
            )
        }
        many => {
            return Err(Refusal {
                tablet: None,
                why: format!(
                    "several tablets claim promotions above the record's term {}: {}: not adopted, an operator must decide",
                    rec.term,
                    many.iter()
                        .map(|(a, h)| format!("{a} (term {})", h.promoted_term))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        }
    };
    let done = Done {
        detail,
        new_term: (next.term != rec.term).then_some(next.term),
        new_primary: (next.primary != rec.primary)
            .then(|| next.primary.clone())
            .flatten(),
    };
    Ok((next, done))
}

/// Why a repair decided up front does not act, and about which tablet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub tablet: Option<String>,
    pub why: String,
}

/// X2 as a step machine: [`reconcile_terms`] decided at its start, then one shard-record write
/// conditional on the lock (step `reconcile_terms`), or the refusal recorded as that step.
#[derive(Debug)]
pub struct Reconcile {
    fresh: FreshShard,
    term: Term,
    done: Option<Done>,
    pending: Option<CallId>,
    emit: Emitter,
}

impl Reconcile {
    pub fn new(fresh: FreshShard, term: Term) -> Reconcile {
        Reconcile {
            fresh,
            term,
            done: None,
            pending: None,
            emit: Emitter::default(),
        }
    }
}

impl StepMachine for Reconcile {
    fn start(&mut self, now: Now) -> Vec<Action> {
        match reconcile_terms(&self.fresh, now.wall_ms) {
            Ok((record, done)) => {
                self.done = Some(done);
                let id = self.emit.call(Call::WriteShardRecord {
                    step: "reconcile_terms",
                    term: self.term,
                    record,
                });
                self.pending = Some(id);
            }
            Err(r) => {
                let e = self
                    .emit
                    .refuse(self.term, "reconcile_terms", r.tablet.as_deref(), r.why);
                self.emit.out.push(Action::Done(Err(e)));
            }
        }
        self.emit.take()
    }

    fn on_reply(&mut self, id: CallId, reply: Reply, _now: Now) -> Vec<Action> {
        if self.pending != Some(id) {
            return Vec::new();
        }
        self.pending = None;
        let result = match reply {
            Reply::Written(Ok(_)) => Ok(self.done.take().unwrap_or_default()),
            Reply::Written(Err(e)) => Err(e),
            other => Err(RecoveryError::Failed(format!(
                "reconcile_terms: unexpected reply {other:?} to a record write"
            ))),
        };
        vec![Action::Done(result)]
    }

    fn term(&self) -> Term {
        self.term
    }
}

/// A replica holding transactions the primary never had (P9): its data is not the shard's, so it
/// must not serve reads nor be promoted. Quarantined with the analysis' reason (the gateway then
/// leaves it out of read routing; only an operator lifts it, after resolving the transactions).
/// Nothing is changed on its mysqld: the transactions stay there for the operator to inspect.
fn quarantine_errant(problem: &Problem, term: Term) -> Result<Sequence, RecoveryError> {
    let alias = tablet_of(problem)?;
    let reason = format!(
        "{}; quarantined: out of read routing and never promoted until an operator resolves them",
        problem.detail
    );
    let call = Call::Quarantine {
        term,
        alias: alias.to_string(),
        reason: reason.clone(),
    };
    Ok(Sequence::new(
        term,
        vec![call],
        format!("{alias}: {reason}"),
    ))
}

/// A tablet promoted under an older term came back (P3, R9). It rejoins as a replica of the
/// current primary when everything it has is also on the primary; otherwise its extra
/// transactions would be lost or replicated nowhere, so it is quarantined with the reason.
fn rejoin_or_quarantine(
    fresh: &FreshShard,
    problem: &Problem,
    term: Term,
) -> Result<Sequence, RecoveryError> {
    let stale = tablet_of(problem)?;
    let primary = primary_of(fresh)?;
    let (Some(sh), Some(ph)) = (fresh.statuses.get(stale), fresh.statuses.get(&primary)) else {
        return Err(RecoveryError::Refused(format!(
            "need fresh status of both {stale} and the primary {primary}"
        )));
    };
    let (Some(stale_pos), Some(primary_pos)) = (analysis::position(sh), analysis::position(ph))
    else {
        return Err(RecoveryError::Refused(format!(
            "cannot read GTID positions of {stale} or {primary}"
        )));
    };
    // MariaDB binlog states compare per (domain, server); positions alone can hide a
    // transaction the primary never had behind its own higher sequence numbers.
    let states = (
        sh.mysql
            .as_ref()
            .map(|m| m.gtid_binlog_state.as_str())
            .unwrap_or(""),
        ph.mysql
            .as_ref()
            .map(|m| m.gtid_binlog_state.as_str())
            .unwrap_or(""),
    );
    let extra = if analysis::flavor_of(sh) == gtid::Flavor::MariaDb && !states.1.is_empty() {
        analysis::binlog_state_missing(states.0, states.1)
            .map_err(|e| RecoveryError::Failed(format!("comparing binlog states: {e}")))?
            .join(",")
    } else {
        stale_pos
            .difference(&primary_pos)
            .map_err(|e| RecoveryError::Failed(format!("comparing positions: {e}")))?
            .to_string()
    };
    // Read-only first in both cases: the agent fences it already, this makes sure.
    let read_only = Call::Agent {
        tablet: stale.to_string(),
        term,
        action: AgentAction::SetReadOnly { read_only: true },
    };
    if !extra.is_empty() {
        let reason = format!(
            "{stale} (promoted under term {}) holds transactions {extra} that primary {primary} does not have; \
             quarantined: it must not replicate or be promoted until an operator resolves them",
            sh.promoted_term
        );
        let quarantine = Call::Quarantine {
            term,
            alias: stale.to_string(),
            reason: reason.clone(),
        };
        return Ok(Sequence::new(term, vec![read_only, quarantine], reason));
    }
    let source = fresh
        .tablets
        .get(&primary)
        .cloned()
        .ok_or_else(|| RecoveryError::UnknownTablet(primary.clone()))?;
    let rejoin = Call::Agent {
        tablet: stale.to_string(),
        term,
        action: AgentAction::SetReplicationSource {
            step: "rejoin as a replica",
            source,
            semi_sync: fresh.durability == Durability::SemiSync,
            start_replication: true,
        },
    };
    let detail = format!(
        "{stale} (promoted under term {}) rejoined as a replica of {primary}: its position {stale_pos} is contained in {primary_pos}",
        sh.promoted_term
    );
    Ok(Sequence::new(term, vec![read_only, rejoin], detail))
}

/// R8: a shard with no primary gets one, chosen like an emergency candidate among the tablets
/// whose agents answered (quarantined ones never); the others replicate from it. The new term
/// is reserved in the record (under the action term) before any agent hears of it; the
/// promotion and the record naming the primary carry it; a replica not repointed is left to
/// the repairs.
fn elect_primary(
    fresh: &FreshShard,
    action_term: Term,
    now_ms: u64,
) -> Result<Sequence, RecoveryError> {
    let mut candidates = Vec::new();
    for (alias, h) in &fresh.statuses {
        if !h.mysql_reachable || fresh.input.quarantined.contains_key(alias) {
            continue;
        }
        let Some(t) = fresh.tablets.get(alias) else {
            continue;
        };
        let Some(position) = analysis::position(h) else {
            continue;
        };
        candidates.push(Candidate {
            alias: alias.clone(),
            cell: t.cell.clone(),
            rule: t.promotion_rule,
            applied: position.clone(),
            position,
            errant: None,
        });
    }
    let choice = analysis::choose_candidate(&candidates, None, fresh.durability)
        .map_err(|r| RecoveryError::Refused(r.to_string()))?;
    let term = fresh.next_promotion_term();
    let base = fresh.record.clone().unwrap_or_else(|| {
        ShardRecord::new(fresh.input.keyspace.clone(), fresh.input.shard.clone())
    });
    let reserved = ShardRecord {
        reserved_term: base.reserved_term.max(term),
        ..base.clone()
    };
    let record = ShardRecord {
        primary: Some(choice.candidate.clone()),
        term,
        reserved_term: term,
        term_start_ms: now_ms,
        ..base
    };
    let source = fresh
        .tablets
        .get(&choice.candidate)
        .cloned()
        .ok_or_else(|| RecoveryError::UnknownTablet(choice.candidate.clone()))?;
    let semi = fresh.durability == Durability::SemiSync;
    let mut steps = vec![
        Step::must(Call::WriteShardRecord {
            step: "write_shard_record",
            term: action_term,
            record: reserved,
        }),
        Step::must(Call::Agent {
            tablet: choice.candidate.clone(),
            term,
            action: AgentAction::Promote,
        }),
        Step::must(Call::WriteShardRecord {
            step: "write_shard_record",
            term,
            record,
        }),
    ];
    steps.extend(choice.others.iter().map(|other| Step {
        call: Call::Agent {
            tablet: other.clone(),
            term,
            action: AgentAction::SetReplicationSource {
                step: "replicate from the elected primary",
                source: source.clone(),
                semi_sync: semi,
                start_replication: true,
            },
        },
        may_fail: true,
    }));
    let detail = format!(
        "elected {} as primary at term {term} ({}); replicas: {}",
        choice.candidate,
        choice.reason,
        if choice.others.is_empty() {
            "none".to_string()
        } else {
            choice.others.join(", ")
        }
    );
    let done = Done {
        detail,
        new_term: Some(term),
        new_primary: Some(choice.candidate.clone()),
    };
    Ok(Sequence::of(term, steps, done))
}

/// The shard record once a stale reparent mark is cleared: no mark, and a term at least
/// `action_term` (the highest term any agent reported), so that a promotion which never
/// reached the record cannot leave an agent ahead of it (gateways refuse RW while a tablet
/// reports a newer term than the record's). Pure.
pub fn cleared_record(record: &ShardRecord, action_term: Term, now_ms: u64) -> ShardRecord {
    let term = record.term.max(action_term);
    ShardRecord {
        reparent_in_progress: None,
        term,
        term_start_ms: if term != record.term {
            now_ms
        } else {
            record.term_start_ms
        },
        reserved_term: record.reserved_term.max(term),
        ..record.clone()
    }
}

/// Tablets other than `primary` whose mysqld answers writable: a promotion an interrupted
/// reparent left behind. Pure.
pub fn stray_writables(
    primary: Option<&str>,
    statuses: &std::collections::BTreeMap<String, myha_proto::agent::Health>,
) -> Vec<String> {
    statuses
        .iter()
        .filter(|(a, h)| {
            Some(a.as_str()) != primary
                && h.mysql_reachable
                && h.mysql.as_ref().is_some_and(|m| !m.read_only)
        })
        .map(|(a, _)| a.clone())
        .collect()
}

/// A reparent mark found under the lock is stale: whoever set it held the lock for the whole
/// operation and clears the mark before releasing it, so it died (or lost etcd) mid-way. The
/// engine only gets here after the mark stayed for `lock_ttl`. Any tablet other than the
/// record's primary left writable is set read-only first, then the mark is cleared (with the
/// term raised to what the agents report); the usual repairs take it from there (e.g. a
/// demoted primary is set writable again, R1).
fn clear_stale_mark(fresh: &FreshShard, now_ms: u64) -> Result<Sequence, RecoveryError> {
    let record = fresh
        .record
        .clone()
        .ok_or_else(|| RecoveryError::Refused("the shard has no record".into()))?;
    let Some(mark) = record.reparent_in_progress.clone() else {
        return Err(RecoveryError::Refused(
            "no reparent mark in the shard record any more".into(),
        ));
    };
    let next = cleared_record(&record, fresh.action_term(), now_ms);
    // Every call runs under the term the cleared record states.
    let strays = stray_writables(record.primary.as_deref(), &fresh.statuses);
    let mut calls: Vec<Call> = strays
        .iter()
        .map(|alias| Call::Agent {
            tablet: alias.clone(),
            term: next.term,
            action: AgentAction::SetReadOnly { read_only: true },
        })
        .collect();
    let detail = format!(
        "cleared a stale reparent mark ({mark}): the shard lock was free, so whoever set it is gone{}{}",
        if strays.is_empty() {
            String::new()
        } else {
            format!("; set read-only first: {}", strays.join(", "))
        },
        if next.term != record.term {
            format!("; term raised {} -> {} (an agent reported it)", record.term, next.term)
        } else {
            String::new()
        }
    );
    let done = Done {
        detail,
        new_term: (next.term != record.term).then_some(next.term),
        new_primary: None,
    };
    let term = next.term;
    calls.push(Call::WriteShardRecord {
        step: "clear_stale_reparent_mark",
        term,
        record: next,
    });
    Ok(Sequence::of(
        term,
        calls.into_iter().map(Step::must).collect(),
        done,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(term: Term, reserved: Term) -> ShardRecord {
        let mut r = ShardRecord::new("ks", "0");
        r.primary = Some("z-1".into());
        r.term = term;
        r.term_start_ms = 100;
        r.reserved_term = reserved;
        r.reparent_in_progress = Some("planned reparent to z-2 by ops".into());
        r
    }

    #[test]
    fn a_stale_mark_is_cleared_keeping_the_term_unless_an_agent_is_ahead() {
        let t = Term::new;
        let r = cleared_record(&marked(t(3), t(4)), t(3), 999);
        assert_eq!(r.reparent_in_progress, None);
        assert_eq!(
            (r.term, r.term_start_ms, r.reserved_term),
            (t(3), 100, t(4))
        );
        assert_eq!(r.primary.as_deref(), Some("z-1"));
        // The interrupted reparent promoted its candidate under term 4 before dying.
        let r = cleared_record(&marked(t(3), t(4)), t(4), 999);
        assert_eq!(
            (r.term, r.term_start_ms, r.reserved_term),
            (t(4), 999, t(4))
        );
        assert_eq!(r.primary.as_deref(), Some("z-1"));
        let r = cleared_record(&marked(t(3), t(0)), t(5), 999);
        assert_eq!((r.term, r.reserved_term), (t(5), t(5)));
    }

    fn fresh(durability: Durability) -> FreshShard {
        use tabletwatch::testing::tablet_record;
        let mut record = ShardRecord::new("ks", "0");
        record.primary = Some("z-1".into());
        record.term = Term::new(4);
        FreshShard::assemble(
            super::super::FreshReads {
                keyspace: "ks",
                shard: "0",
                record: Some((record, 3)),
                durability,
                tablets: ["z-1", "z-2"]
                    .iter()
                    .map(|a| (a.to_string(), tablet_record(a, "ks", "0")))
                    .collect(),
                unreadable: Vec::new(),
            },
            Default::default(),
            Default::default(),
            &Default::default(),
            1_000,
            &Default::default(),
        )
    }

    fn problem(code: crate::analysis::ProblemCode, tablet: &str) -> Problem {
        Problem {
            code,
            tablet: Some(tablet.into()),
            detail: "seen".into(),
        }
    }

    /// Drives a sequence with `answer` for each call; the calls made and the result.
    fn drive(
        mut m: Sequence,
        mut answer: impl FnMut(&Call) -> Reply,
    ) -> (Vec<Call>, Result<Done, RecoveryError>) {
        let now = Now {
            since_start: std::time::Duration::ZERO,
            wall_ms: 0,
        };
        let mut calls = Vec::new();
        let mut todo: std::collections::VecDeque<Action> = m.start(now).into();
        while let Some(a) = todo.pop_front() {
            match a {
                Action::Call(id, call) => {
                    let reply = answer(&call);
                    calls.push(call);
                    todo.extend(m.on_reply(id, reply, now));
                }
                Action::Done(r) => return (calls, r),
                _ => {}
            }
        }
        panic!("the sequence stalled after {calls:?}");
    }

    fn ok(_: &Call) -> Reply {
        Reply::Action(Ok(Default::default()))
    }

    #[test]
    fn a_read_only_primary_gets_lossless_semi_sync_before_writes_under_its_term() {
        use crate::analysis::ProblemCode;
        let f = fresh(Durability::SemiSync);
        let p = problem(ProblemCode::PrimaryReadOnly, "z-1");
        let m = Sequence::plan(&f, &p, Remedy::MakePrimaryWritable, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, ok);
        let expect = |action| Call::Agent {
            tablet: "z-1".into(),
            term: Term::new(4),
            action,
        };
        assert_eq!(
            calls,
            vec![
                expect(AgentAction::SetSemiSync {
                    primary: Some(true),
                    replica: None
                }),
                expect(AgentAction::SetReadOnly { read_only: false }),
            ]
        );
        assert!(r
            .expect("done")
            .detail
            .contains("read_only set back to OFF"));
        // Under durability none: writable at once.
        let f = fresh(Durability::None);
        let m = Sequence::plan(&f, &p, Remedy::MakePrimaryWritable, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        assert_eq!(drive(m, ok).0.len(), 1);
    }

    #[test]
    fn a_failed_action_ends_the_sequence_with_its_error() {
        use crate::analysis::ProblemCode;
        let f = fresh(Durability::SemiSync);
        let p = problem(ProblemCode::PrimaryReadOnly, "z-1");
        let m = Sequence::plan(&f, &p, Remedy::MakePrimaryWritable, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, |_| {
            Reply::Action(Err(RecoveryError::Refused("mysqld: gone".into())))
        });
        assert_eq!(calls.len(), 1, "nothing after the first failure");
        assert!(matches!(r, Err(RecoveryError::Refused(m)) if m.contains("gone")));
    }

    #[test]
    fn restarting_replication_stops_the_io_thread_first_so_a_stuck_connect_is_retried() {
        use crate::analysis::ProblemCode;
        let f = fresh(Durability::SemiSync);
        let p = problem(ProblemCode::ReplicaNotReplicating, "z-2");
        let m = Sequence::plan(&f, &p, Remedy::RestartReplication, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, ok);
        let actions: Vec<(&str, &AgentAction)> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Agent { tablet, action, .. } => Some((tablet.as_str(), action)),
                _ => None,
            })
            .collect();
        assert!(
            matches!(
                actions[..],
                [
                    ("z-2", AgentAction::StopReplication { io_only: true }),
                    ("z-2", AgentAction::StartReplication { io_only: false })
                ]
            ),
            "{calls:?}"
        );
        assert!(r.is_ok());
    }

    #[test]
    fn repointing_names_the_record_primary_and_refuses_without_one() {
        use crate::analysis::ProblemCode;
        let f = fresh(Durability::SemiSync);
        let p = problem(ProblemCode::ReplicaWrongSource, "z-2");
        let m = Sequence::plan(&f, &p, Remedy::RepointAtPrimary, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, ok);
        let [Call::Agent {
            tablet,
            action:
                AgentAction::SetReplicationSource {
                    source, semi_sync, ..
                },
            ..
        }] = &calls[..]
        else {
            panic!("one repoint: {calls:?}")
        };
        assert_eq!(
            (tablet.as_str(), source.alias.as_str(), *semi_sync),
            ("z-2", "z-1", true)
        );
        assert!(r.is_ok());
        let mut f = fresh(Durability::SemiSync);
        if let Some(r) = f.record.as_mut() {
            r.primary = None;
        }
        assert!(matches!(
            Sequence::plan(&f, &p, Remedy::RepointAtPrimary, Term::new(4), 0),
            Some(Err(RecoveryError::Refused(_)))
        ));
        // The remedies that are not sequences are left to their own machines.
        assert!(Sequence::plan(&f, &p, Remedy::ReconcileTerms, Term::new(4), 0).is_none());
        assert!(Sequence::plan(&f, &p, Remedy::EmergencyReparent, Term::new(4), 0).is_none());
    }

    #[test]
    fn a_returning_old_primary_rejoins_when_contained_and_is_quarantined_otherwise() {
        use crate::analysis::ProblemCode;
        use myha_proto::agent::{Health, MysqlStatus};
        let at = |pos: &str, promoted: u64| Health {
            mysql_reachable: true,
            promoted_term: promoted,
            mysql: Some(MysqlStatus {
                gtid_position: pos.into(),
                flavor: "mariadb".into(),
                read_only: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut f = fresh(Durability::SemiSync);
        // z-1 is the record's primary; z-2 the old one returning.
        f.statuses = [
            ("z-1".to_string(), at("0-1-20", 4)),
            ("z-2".to_string(), at("0-1-15", 3)),
        ]
        .into();
        let p = problem(ProblemCode::StaleTabletClaimingPrimary, "z-2");
        let m = Sequence::plan(&f, &p, Remedy::RejoinOrQuarantine, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, ok);
        assert!(
            matches!(
                &calls[..],
                [
                    Call::Agent { action: AgentAction::SetReadOnly { read_only: true }, .. },
                    Call::Agent { action: AgentAction::SetReplicationSource { source, .. }, .. },
                ] if source.alias == "z-1"
            ),
            "{calls:?}"
        );
        assert!(r
            .expect("done")
            .detail
            .contains("rejoined as a replica of z-1"));
        // It holds a transaction the primary never had: read-only, then quarantined.
        f.statuses.insert("z-2".into(), at("0-3-25", 3));
        let m = Sequence::plan(&f, &p, Remedy::RejoinOrQuarantine, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, |c| match c {
            Call::Quarantine { .. } => Reply::Quarantined(Ok(())),
            _ => Reply::Action(Ok(Default::default())),
        });
        assert!(
            matches!(
                &calls[..],
                [
                    Call::Agent { action: AgentAction::SetReadOnly { read_only: true }, .. },
                    Call::Quarantine { alias, term, .. },
                ] if alias == "z-2" && *term == Term::new(4)
            ),
            "{calls:?}"
        );
        assert!(r.expect("done").detail.contains("quarantined"));
    }

    #[test]
    fn reconcile_adopts_the_only_writable_claimant_in_one_conditional_write() {
        use myha_proto::agent::{Health, MysqlStatus};
        let claim = |promoted: u64, read_only: bool| Health {
            mysql_reachable: true,
            promoted_term: promoted,
            term: promoted,
            mysql: Some(MysqlStatus {
                read_only,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut f = fresh(Durability::SemiSync);
        f.statuses = [
            ("z-1".to_string(), claim(4, true)),
            ("z-2".to_string(), claim(5, false)),
        ]
        .into();
        let mut m = Reconcile::new(f.clone(), Term::new(5));
        let now = Now {
            since_start: std::time::Duration::ZERO,
            wall_ms: 777,
        };
        let start = m.start(now);
        let [Action::Call(id, Call::WriteShardRecord { step, term, record })] = &start[..] else {
            panic!("one record write: {start:?}")
        };
        assert_eq!((*step, *term), ("reconcile_terms", Term::new(5)));
        assert_eq!(record.primary.as_deref(), Some("z-2"));
        assert_eq!((record.term, record.term_start_ms), (Term::new(5), 777));
        let end = m.on_reply(*id, Reply::Written(Ok(9)), now);
        let [Action::Done(Ok(done))] = &end[..] else {
            panic!("done: {end:?}")
        };
        assert_eq!(done.new_primary.as_deref(), Some("z-2"));
        assert_eq!(done.new_term, Some(Term::new(5)));

        // Two writable tablets: refused as a recorded step, nothing written.
        f.statuses.insert("z-1".into(), claim(4, false));
        let mut m = Reconcile::new(f, Term::new(5));
        let start = m.start(now);
        assert!(
            matches!(&start[..], [Action::Record { ok: false, .. }, Action::Done(Err(RecoveryError::Refused(w)))] if w.contains("not the only writable")),
            "{start:?}"
        );
    }

    #[test]
    fn stray_writables_are_the_non_primaries_that_accept_writes() {
        use myha_proto::agent::{Health, MysqlStatus};
        let h = |read_only: bool, reachable: bool| Health {
            mysql_reachable: reachable,
            mysql: Some(MysqlStatus {
                read_only,
                ..Default::default()
            }),
            ..Default::default()
        };
        let statuses: std::collections::BTreeMap<String, Health> = [
            ("z-1".to_string(), h(false, true)),
            ("z-2".to_string(), h(false, true)),
            ("z-3".to_string(), h(true, true)),
            ("z-4".to_string(), h(false, false)),
        ]
        .into();
        assert_eq!(stray_writables(Some("z-1"), &statuses), vec!["z-2"]);
        assert_eq!(stray_writables(None, &statuses), vec!["z-1", "z-2"]);
    }

    fn health(pos: &str, read_only: bool, promoted: u64) -> myha_proto::agent::Health {
        myha_proto::agent::Health {
            mysql_reachable: true,
            promoted_term: promoted,
            term: promoted,
            mysql: Some(myha_proto::agent::MysqlStatus {
                gtid_position: pos.into(),
                flavor: "mariadb".into(),
                read_only,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A shard whose record names no primary, both tablets read-only at `z1`/`z2`.
    fn primaryless(z1: &str, z2: &str) -> FreshShard {
        let mut f = fresh(Durability::SemiSync);
        if let Some(r) = f.record.as_mut() {
            r.primary = None;
        }
        f.statuses = [
            ("z-1".to_string(), health(z1, true, 0)),
            ("z-2".to_string(), health(z2, true, 0)),
        ]
        .into();
        f
    }

    fn no_primary() -> Problem {
        Problem {
            code: crate::analysis::ProblemCode::NoPrimary,
            tablet: None,
            detail: "no primary".into(),
        }
    }

    #[test]
    fn the_first_primary_is_reserved_then_promoted_then_recorded_under_the_new_term() {
        let f = primaryless("0-1-20", "0-1-15");
        let m = Sequence::plan(&f, &no_primary(), Remedy::ElectPrimary, Term::new(4), 777)
            .expect("a sequence")
            .expect("planned");
        // The replica's repoint fails: the primary stands, the detail says what is left.
        let (calls, r) = drive(m, |c| match c {
            Call::WriteShardRecord { .. } => Reply::Written(Ok(1)),
            Call::Agent {
                action: AgentAction::SetReplicationSource { .. },
                ..
            } => Reply::Action(Err(RecoveryError::Refused("agent: busy".into()))),
            _ => Reply::Action(Ok(Default::default())),
        });
        let t = Term::new;
        match &calls[..] {
            [Call::WriteShardRecord {
                term: reserve_under,
                record: reserved,
                ..
            }, Call::Agent {
                tablet: promoted,
                term: promote_under,
                action: AgentAction::Promote,
            }, Call::WriteShardRecord {
                term: record_under,
                record,
                ..
            }, Call::Agent {
                tablet: repointed,
                term: repoint_under,
                action: AgentAction::SetReplicationSource { source, .. },
            }] => {
                // Reserved under the term every agent already accepts, nobody named yet.
                assert_eq!(*reserve_under, t(4));
                assert_eq!(
                    (reserved.primary.as_deref(), reserved.reserved_term),
                    (None, t(5))
                );
                assert_eq!((promoted.as_str(), *promote_under), ("z-1", t(5)));
                assert_eq!(*record_under, t(5));
                assert_eq!(
                    (record.primary.as_deref(), record.term, record.term_start_ms),
                    (Some("z-1"), t(5), 777)
                );
                assert_eq!(
                    (repointed.as_str(), *repoint_under, source.alias.as_str()),
                    ("z-2", t(5), "z-1")
                );
            }
            other => panic!("reserve, promote, record, repoint: {other:?}"),
        }
        let done = r.expect("the election stands without the repoint");
        assert_eq!(
            (done.new_term, done.new_primary.as_deref()),
            (Some(t(5)), Some("z-1"))
        );
        assert!(
            done.detail.contains("not done") && done.detail.contains("z-2: "),
            "{}",
            done.detail
        );

        // A failed promotion ends it: no record names a primary that was not promoted.
        let m = Sequence::plan(&f, &no_primary(), Remedy::ElectPrimary, Term::new(4), 777)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, |c| match c {
            Call::WriteShardRecord { .. } => Reply::Written(Ok(1)),
            _ => Reply::Action(Err(RecoveryError::Refused("mysqld: gone".into()))),
        });
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(r.is_err());
    }

    #[test]
    fn a_quarantined_tablet_is_never_elected() {
        let mut f = primaryless("0-1-20", "0-1-15");
        // Under semi_sync the one tablet left could have no acker (refused); durability none
        // isolates the choice.
        f.durability = Durability::None;
        f.input
            .quarantined
            .insert("z-1".into(), "errant transactions".into());
        let m = Sequence::plan(&f, &no_primary(), Remedy::ElectPrimary, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, |c| match c {
            Call::WriteShardRecord { .. } => Reply::Written(Ok(1)),
            _ => Reply::Action(Ok(Default::default())),
        });
        assert!(
            calls.iter().any(|c| matches!(c, Call::Agent { tablet, action: AgentAction::Promote, .. } if tablet == "z-2")),
            "{calls:?}"
        );
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Agent { tablet, .. } if tablet == "z-1")),
            "the quarantined tablet was acted on: {calls:?}"
        );
        assert_eq!(r.expect("done").new_primary.as_deref(), Some("z-2"));
    }

    #[test]
    fn a_stale_mark_is_cleared_after_strays_are_fenced_under_the_cleared_term() {
        let mut f = fresh(Durability::SemiSync);
        if let Some(r) = f.record.as_mut() {
            r.reparent_in_progress = Some("planned reparent to z-2 by ops".into());
        }
        // The dead orchestrator promoted z-2 under term 5 before the record said so.
        f.statuses = [
            ("z-1".to_string(), health("0-1-20", false, 4)),
            ("z-2".to_string(), health("0-1-20", false, 5)),
        ]
        .into();
        let m = Sequence::plan(
            &f,
            &problem(crate::analysis::ProblemCode::ReparentInProgress, "z-1"),
            Remedy::ClearStaleMark,
            Term::new(5),
            900,
        )
        .expect("a sequence")
        .expect("planned");
        let (calls, r) = drive(m, |c| match c {
            Call::WriteShardRecord { .. } => Reply::Written(Ok(1)),
            _ => Reply::Action(Ok(Default::default())),
        });
        match &calls[..] {
            [Call::Agent {
                tablet,
                term,
                action: AgentAction::SetReadOnly { read_only: true },
            }, Call::WriteShardRecord {
                step: "clear_stale_reparent_mark",
                term: written_under,
                record,
            }] => {
                assert_eq!((tablet.as_str(), *term), ("z-2", Term::new(5)));
                assert_eq!(*written_under, Term::new(5));
                assert_eq!(record.reparent_in_progress, None);
                assert_eq!(
                    (record.primary.as_deref(), record.term, record.term_start_ms),
                    (Some("z-1"), Term::new(5), 900)
                );
            }
            other => panic!("fence the stray, then clear: {other:?}"),
        }
        assert_eq!(r.expect("done").new_term, Some(Term::new(5)));

        // The mark is gone already: refused, nothing planned.
        let f = fresh(Durability::SemiSync);
        let planned = Sequence::plan(
            &f,
            &problem(crate::analysis::ProblemCode::ReparentInProgress, "z-1"),
            Remedy::ClearStaleMark,
            Term::new(4),
            0,
        );
        assert!(matches!(planned, Some(Err(RecoveryError::Refused(_)))));
    }

    #[test]
    fn an_errant_replica_is_quarantined_in_one_call_with_the_analysis_reason() {
        let f = fresh(Durability::SemiSync);
        let p = problem(crate::analysis::ProblemCode::ErrantGtid, "z-2");
        let m = Sequence::plan(&f, &p, Remedy::QuarantineErrant, Term::new(4), 0)
            .expect("a sequence")
            .expect("planned");
        let (calls, r) = drive(m, |_| Reply::Quarantined(Ok(())));
        assert!(
            matches!(&calls[..], [Call::Quarantine { term, alias, reason }]
                if *term == Term::new(4) && alias == "z-2" && reason.starts_with("seen; quarantined")),
            "{calls:?}"
        );
        assert!(r.expect("done").detail.starts_with("z-2: seen"));
    }
}
