//! Planned reparent (scenarios S1-S4): an operator moves the primary of a healthy shard to a
//! replica without losing a write. Contract: `docs/design.md`, "Operator reparents".
//!
//! Runs under the shard lock on a fresh view (`RecoveryContext::fresh`) as the step machine
//! [`Planned`], driven by [`super::steps::drive`] (and by the simulator on virtual time), in
//! order, nothing changed before step 4:
//! 1. (the caller took the lock and refreshed);
//! 2. the primary must answer, writable ([`choose_planned`]);
//! 3. the candidate: the requested one or the best replica ([`choose_planned`], pure), refused
//!    with the reason otherwise (S2: the lag is in it);
//! 4. mark the shard record (`reparent_in_progress`, and the new term reserved);
//! 5. `Demote(old)`: read-only, in-flight commits finished, its final position P;
//! 6. `WaitForPosition(candidate, P, wait_timeout)`;
//! 7. `Promote(candidate)` under the new term;
//! 8. the shard record names the candidate at the new term, mark cleared;
//! 9. the old primary and every answering replica replicate from the candidate (a down replica
//!    is skipped: the repairs repoint it when it returns, S3).
//!
//! A failure in 5-7 undoes the demotion (S4): the old primary is writable again and the mark is
//! cleared. When `Promote` was sent, the candidate may have accepted the new term: it is put
//! back under the old primary (read-only, replicating) and the record keeps the old primary at
//! the new term, so that no agent knows a term above the record's.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use topo::Term;

use myha_proto::agent as pb;
use topo::{Durability, PromotionRule, ShardRecord, TabletRecord};

use super::steps::{Action, AgentAction, Call, CallId, Emitter, Now, Reply, StepMachine};
use super::{Done, FreshShard, RecoveryError};
use crate::analysis;
use crate::ranking::{self, Rank};

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedOptions {
    /// The candidate; `None`: the best replica.
    pub to: Option<String>,
    /// Bound on the candidate reaching the demoted primary's position (step 6).
    pub wait_timeout: Duration,
    /// A candidate lagging more than this is refused before anything changes (S2).
    pub max_lag: Duration,
    /// Who asked (in the mark and the audit log).
    pub requester: String,
}

/// Why a planned reparent is refused before anything changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlannedRefusal {
    #[error("the shard record names no primary")]
    NoPrimary,
    #[error("primary {alias} is not usable for a planned reparent: {why}")]
    Primary { alias: String, why: String },
    #[error("{alias} is the primary already")]
    CandidateIsPrimary { alias: String },
    #[error("{alias} is not a registered tablet of this shard")]
    UnknownCandidate { alias: String },
    #[error("{alias} does not answer: {why}")]
    Unreachable { alias: String, why: String },
    #[error("{alias} is not a replica of primary {primary}: {why}")]
    NotReplicating {
        alias: String,
        primary: String,
        why: String,
    },
    #[error("{alias} has promotion rule must_not")]
    MustNot { alias: String },
    #[error("{alias} is quarantined: {reason}")]
    Quarantined { alias: String, reason: String },
    #[error("{alias} lags {lag_ms} ms behind the primary, over the bound of {max_lag_ms} ms")]
    Lagging {
        alias: String,
        lag_ms: u64,
        max_lag_ms: u64,
    },
    #[error("{alias}'s lag is unknown (no heartbeat applied yet) and it has not applied the primary's position {primary_position}")]
    LagUnknown {
        alias: String,
        primary_position: String,
    },
    #[error("no replica can be promoted: {0}")]
    NoCandidate(String),
    #[error("durability semi_sync cannot be met after promoting {candidate}: {why}")]
    SemiSync { candidate: String, why: String },
}

/// What [`choose_planned`] looks at: the fresh shard and the request.
#[derive(Debug, Clone, Copy)]
pub struct PlannedInput<'a> {
    pub record: &'a ShardRecord,
    pub durability: Durability,
    pub tablets: &'a BTreeMap<String, TabletRecord>,
    /// `FullStatus` answers, by alias.
    pub statuses: &'a BTreeMap<String, pb::Health>,
    /// Why each silent agent is unseen.
    pub unseen: &'a BTreeMap<String, String>,
    /// Quarantined tablets and why.
    pub quarantined: &'a BTreeMap<String, String>,
    pub to: Option<&'a str>,
    pub max_lag: Duration,
}

/// The decision of [`choose_planned`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChoice {
    pub primary: String,
    pub candidate: String,
    /// Why this one (for the audit log).
    pub reason: String,
    /// Answering tablets to repoint at the candidate after the promotion, besides the old
    /// primary.
    pub repoint: Vec<String>,
    /// Tablets left alone, with why (down, quarantined).
    pub skipped: Vec<String>,
}

/// A usable candidate as ranked by [`choose_planned`].
#[derive(Debug, Clone)]
struct Eligible {
    alias: String,
    cell_differs: bool,
    rule: PromotionRule,
    lag_ms: Option<u64>,
    position: Option<gtid::GtidSet>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the tablet has a replication source configured (running or not).
fn replicates(h: &pb::Health) -> bool {
    h.replication.as_ref().is_some_and(|r| r.configured)
}

impl PlannedInput<'_> {
    fn answering(&self, alias: &str) -> Result<&pb::Health, String> {
        match self.statuses.get(alias) {
            Some(h) if h.mysql_reachable => Ok(h),
            Some(h) => Err(format!("its mysqld is unreachable: {}", h.mysql_error)),
            None => Err(match self.unseen.get(alias) {
                Some(why) => format!("its agent does not answer: {why}"),
                None => "its agent does not answer".to_string(),
            }),
        }
    }

    /// Whether `alias` may be promoted in place of `primary`; its ranking data if so.
    fn eligible(
        &self,
        alias: &str,
        primary: &str,
        primary_addr: &str,
        primary_cell: Option<&str>,
        primary_pos: Option<&gtid::GtidSet>,
    ) -> Result<Eligible, PlannedRefusal> {
        if alias == primary {
            return Err(PlannedRefusal::CandidateIsPrimary {
                alias: alias.into(),
            });
        }
        let Some(rec) = self.tablets.get(alias) else {
            return Err(PlannedRefusal::UnknownCandidate {
                alias: alias.into(),
            });
        };
        if let Some(reason) = self.quarantined.get(alias) {
            return Err(PlannedRefusal::Quarantined {
                alias: alias.into(),
                reason: reason.clone(),
            });
        }
        let h = self
            .answering(alias)
            .map_err(|why| PlannedRefusal::Unreachable {
                alias: alias.into(),
                why,
            })?;
        if rec.promotion_rule == PromotionRule::MustNot {
            return Err(PlannedRefusal::MustNot {
                alias: alias.into(),
            });
        }
        let rep = h.replication.clone().unwrap_or_default();
        let source = format!("{}:{}", rep.source_host, rep.source_port);
        let not_replicating = |why: String| PlannedRefusal::NotReplicating {
            alias: alias.into(),
            primary: primary.into(),
            why,
        };
        if !rep.configured {
            return Err(not_replicating("it has no replication source".into()));
        }
        if source != primary_addr {
            return Err(not_replicating(format!(
                "it replicates from {source}, not from the primary at {primary_addr}"
            )));
        }
        if !analysis::replicating(h) {
            let errors = [rep.last_io_error.as_str(), rep.last_sql_error.as_str()]
                .into_iter()
                .filter(|e| !e.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(not_replicating(format!(
                "its replication threads are not both running{}",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {errors}")
                }
            )));
        }
        let position = analysis::position(h);
        match h.lag_ms {
            Some(lag) if lag > millis(self.max_lag) => {
                return Err(PlannedRefusal::Lagging {
                    alias: alias.into(),
                    lag_ms: lag,
                    max_lag_ms: millis(self.max_lag),
                })
            }
            Some(_) => {}
            None => {
                let caught_up = match (&position, primary_pos) {
                    (Some(p), Some(pp)) => p.contains_set(pp).unwrap_or(false),
                    _ => false,
                };
                if !caught_up {
                    return Err(PlannedRefusal::LagUnknown {
                        alias: alias.into(),
                        primary_position: primary_pos.map(|p| p.to_string()).unwrap_or_default(),
                    });
                }
            }
        }
        Ok(Eligible {
            alias: alias.into(),
            cell_differs: primary_cell.is_some_and(|c| c != rec.cell),
            rule: rec.promotion_rule,
            lag_ms: h.lag_ms,
            position,
        })
    }
}

/// Steps 2 and 3: checks the primary and picks the candidate. Pure.
///
/// The candidate is `to`, or the best replica: answering, replicating from the primary (IO and
/// SQL running), not quarantined, not `must_not`, lag within `max_lag` (unknown lag only when it
/// has applied the primary's position); the best by [`crate::ranking`] (`prefer` over
/// `neutral`, then the primary's cell, then holding what the others hold, then least lag,
/// then the alias). With semi_sync
/// durability someone other than the candidate (the old primary counts) must be able to ack.
pub fn choose_planned(input: &PlannedInput<'_>) -> Result<PlannedChoice, PlannedRefusal> {
    let primary = input
        .record
        .primary
        .clone()
        .ok_or(PlannedRefusal::NoPrimary)?;
    let bad_primary = |why: String| PlannedRefusal::Primary {
        alias: primary.clone(),
        why,
    };
    let Some(p_rec) = input.tablets.get(&primary) else {
        return Err(bad_primary(
            "it is not registered (agent gone, lease expired)".into(),
        ));
    };
    let ph = input.answering(&primary).map_err(bad_primary)?;
    let pm = ph.mysql.clone().unwrap_or_default();
    if pm.read_only {
        return Err(bad_primary("it is read-only".into()));
    }
    if ph.replication.as_ref().is_some_and(|r| r.configured) {
        return Err(bad_primary(
            "it replicates from someone (repair it first)".into(),
        ));
    }
    let primary_addr = format!("{}:{}", p_rec.mysql_host, p_rec.mysql_port);
    let primary_pos = analysis::position(ph);
    let check = |alias: &str| {
        input.eligible(
            alias,
            &primary,
            &primary_addr,
            Some(p_rec.cell.as_str()),
            primary_pos.as_ref(),
        )
    };
    let chosen = match input.to {
        Some(to) => check(to)?,
        None => {
            let mut ok = Vec::new();
            let mut excluded = Vec::new();
            for alias in input.tablets.keys().filter(|a| **a != primary) {
                match check(alias) {
                    Ok(e) => ok.push(e),
                    Err(r) => excluded.push(r.to_string()),
                }
            }
            best(ok).ok_or_else(|| {
                PlannedRefusal::NoCandidate(if excluded.is_empty() {
                    "the shard has no replica".into()
                } else {
                    excluded.join("; ")
                })
            })?
        }
    };
    // Who could ack the new primary's writes: every answering, non-quarantined tablet but the
    // candidate that is repointed (the old primary included: it becomes a replica).
    let ackers: Vec<&String> = input
        .tablets
        .keys()
        .filter(|a| **a != chosen.alias)
        .filter(|a| !input.quarantined.contains_key(*a))
        .filter(|a| match input.answering(a) {
            Ok(h) => **a == primary || replicates(h),
            Err(_) => false,
        })
        .collect();
    if input.durability == Durability::SemiSync && ackers.is_empty() {
        return Err(PlannedRefusal::SemiSync {
            candidate: chosen.alias.clone(),
            why: "no other tablet (the old primary included) answers and could acknowledge its writes".into(),
        });
    }
    let mut repoint = Vec::new();
    let mut skipped = Vec::new();
    for alias in input
        .tablets
        .keys()
        .filter(|a| **a != primary && **a != chosen.alias)
    {
        if let Some(reason) = input.quarantined.get(alias) {
            skipped.push(format!("{alias}: quarantined ({reason})"));
            continue;
        }
        match input.answering(alias) {
            // A tablet with no source at all is a deposed primary the repairs have not vetted
            // yet (it may hold transactions no one acknowledged: the errant check comes
            // first) or a new one: the repairs rejoin it, not the reparent.
            Ok(h) if !replicates(h) => skipped.push(format!(
                "{alias}: no replication source configured (a deposed primary or a new tablet: the repairs vet and repoint it)"
            )),
            Ok(_) => repoint.push(alias.clone()),
            Err(why) => skipped.push(format!("{alias}: {why}")),
        }
    }
    let reason = format!(
        "{}{} ({:?}, {} cell, lag {}, position {})",
        chosen.alias,
        if input.to.is_some() {
            " as requested"
        } else {
            ", the best replica"
        },
        chosen.rule,
        if chosen.cell_differs {
            "another"
        } else {
            "the primary's"
        },
        chosen
            .lag_ms
            .map(|l| format!("{l} ms"))
            .unwrap_or_else(|| "unknown, caught up".into()),
        chosen
            .position
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "unknown".into()),
    );
    Ok(PlannedChoice {
        primary,
        candidate: chosen.alias,
        reason,
        repoint,
        skipped,
    })
}

/// The best of the eligible by [`crate::ranking`]: rule, the primary's cell, holding what every
/// other eligible replica holds, least lag, alias.
///
/// With the primary live, the positions are read at different instants while writes go on: a
/// replica lagging 5 s whose health came later can show more than one lagging 0 s. So a
/// position counts only against replicas lagging no less ([`lag_key`]): progress breaks ties
/// between equal lags and never outranks a smaller lag. For GTID sets that form a chain (no
/// errant replica is eligible) the winner is the least lag, then the most advanced, then the
/// alias, as before the ranking was shared.
fn best(ok: Vec<Eligible>) -> Option<Eligible> {
    let lacks = |e: &Eligible| {
        ok.iter()
            .filter(|o| lag_key(o) <= lag_key(e))
            .any(|o| match (&e.position, &o.position) {
                (Some(mine), Some(theirs)) => !mine.contains_set(theirs).unwrap_or(false),
                (None, Some(_)) => true,
                _ => false,
            })
    };
    let ranks: Vec<Rank> = ok
        .iter()
        .map(|e| Rank::new(&e.alias, e.rule, e.cell_differs, lacks(e), lag_key(e)))
        .collect();
    ranking::best(ok.into_iter().zip(ranks), |(_, r)| r.clone()).map(|(e, _)| e)
}

/// A replica's lag as the ranking's backlog; unknown lag ranks last.
fn lag_key(e: &Eligible) -> u64 {
    e.lag_ms.unwrap_or(u64::MAX)
}

/// The text of the mark (step 4).
pub fn mark_text(candidate: &str, requester: &str) -> String {
    format!("planned reparent to {candidate} by {requester}")
}

/// What the start of the run derived from the fresh shard (fixed for the run).
#[derive(Debug, Clone)]
struct Plan {
    /// The record as read under the lock.
    record: ShardRecord,
    /// The record as marked (step 4).
    marked: ShardRecord,
    choice: PlannedChoice,
    old: TabletRecord,
    candidate: TabletRecord,
    new_term: Term,
    semi: bool,
}

/// The outstanding calls, by what they are for.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    Mark,
    Demote,
    Wait,
    Promote,
    WriteRecord,
    Repoint(String),
    /// One call of the undo sequence (see [`Planned::undo_calls`]).
    Undo,
}

/// The planned reparent as a step machine: every step of the module doc in order, in this one
/// type. What a failure undoes follows from the state (`demote_sent`, `promote_sent`), never
/// from the exit path: the candidate put back under the old primary once `Promote` was sent,
/// then the old primary made writable again, then the mark cleared (the term kept at the new
/// one when an agent may know it). The undo calls run one after the other, in that order, so
/// that the candidate is read-only before the old primary takes writes again.
#[derive(Debug)]
pub struct Planned {
    fresh: FreshShard,
    action_term: Term,
    opts: PlannedOptions,
    /// Bound on the old primary's demotion (`action_timeout`).
    demote_bound: Duration,
    em: Emitter,
    pending: BTreeMap<CallId, Pending>,
    plan: Option<Plan>,
    position: String,
    demote_sent: bool,
    promote_sent: bool,
    /// The undo calls not sent yet, and the error to return once they are answered.
    undo: VecDeque<Call>,
    undoing: Option<RecoveryError>,
    repointed: Vec<String>,
    repoint_failed: Vec<String>,
    finished: bool,
}

impl Planned {
    /// `action_term`: the term of every call before the promotion (the fresh shard's
    /// [`FreshShard::action_term`]).
    pub fn new(
        fresh: FreshShard,
        action_term: Term,
        opts: PlannedOptions,
        demote_bound: Duration,
    ) -> Planned {
        Planned {
            fresh,
            action_term,
            opts,
            demote_bound,
            em: Emitter::default(),
            pending: BTreeMap::new(),
            plan: None,
            position: String::new(),
            demote_sent: false,
            promote_sent: false,
            undo: VecDeque::new(),
            undoing: None,
            repointed: Vec::new(),
            repoint_failed: Vec::new(),
            finished: false,
        }
    }

    fn plan(&self) -> &Plan {
        // Every caller runs after `begin` set it (a run without a plan finished in `begin`).
        self.plan.as_ref().expect("plan set at start")
    }

    fn agent(&mut self, tablet: &str, term: Term, action: AgentAction, why: Pending) {
        let id = self.em.call(Call::Agent {
            tablet: tablet.to_string(),
            term,
            action,
        });
        self.pending.insert(id, why);
    }

    fn finish(&mut self, r: Result<Done, RecoveryError>) {
        for id in std::mem::take(&mut self.pending).into_keys() {
            self.em.out.push(Action::Cancel(id));
        }
        self.finished = true;
        self.em.out.push(Action::Done(r));
    }

    /// Steps 1-4: the choice (pure), then the mark.
    fn begin(&mut self) {
        let term = self.action_term;
        let Some(record) = self.fresh.record.clone() else {
            return self.finish(Err(RecoveryError::Refused(
                "the shard has no record".into(),
            )));
        };
        if let Some(stale) = &record.reparent_in_progress {
            // We hold the lock: whoever set it is gone. Our own mark replaces it.
            self.em.record(
                term,
                "stale_reparent_mark",
                None,
                true,
                format!("found a stale reparent mark ({stale}) under the lock: replaced by ours"),
                Duration::ZERO,
            );
        }
        let fresh = &self.fresh;
        let input = PlannedInput {
            record: &record,
            durability: fresh.durability,
            tablets: &fresh.tablets,
            statuses: &fresh.statuses,
            unseen: &fresh.unseen,
            quarantined: &fresh.input.quarantined,
            to: self.opts.to.as_deref(),
            max_lag: self.opts.max_lag,
        };
        let choice = match choose_planned(&input) {
            Ok(c) => c,
            Err(r) => {
                let why = r.to_string();
                let to = self.opts.to.clone();
                self.em.record(
                    term,
                    "choose_candidate",
                    to.as_deref(),
                    false,
                    why.clone(),
                    Duration::ZERO,
                );
                return self.finish(Err(RecoveryError::Refused(format!(
                    "{why}; nothing was changed (primary {} stays at term {})",
                    record.primary.as_deref().unwrap_or("none"),
                    record.term
                ))));
            }
        };
        self.em.record(
            term,
            "choose_candidate",
            Some(&choice.candidate),
            true,
            choice.reason.clone(),
            Duration::ZERO,
        );
        let tablet = |alias: &str| {
            self.fresh
                .tablets
                .get(alias)
                .cloned()
                .ok_or_else(|| RecoveryError::UnknownTablet(alias.to_string()))
        };
        let (old, candidate) = match (tablet(&choice.primary), tablet(&choice.candidate)) {
            (Ok(o), Ok(c)) => (o, c),
            (Err(e), _) | (_, Err(e)) => return self.finish(Err(e)),
        };
        let new_term = self.fresh.next_promotion_term();
        // 4. Mark (and reserve the new term) before touching anything.
        let marked = ShardRecord {
            reparent_in_progress: Some(mark_text(&candidate.alias, &self.opts.requester)),
            reserved_term: record.reserved_term.max(new_term),
            ..record.clone()
        };
        let id = self.em.call(Call::WriteShardRecord {
            step: "mark_reparent",
            term,
            record: marked.clone(),
        });
        self.pending.insert(id, Pending::Mark);
        self.plan = Some(Plan {
            record,
            marked,
            choice,
            old,
            candidate,
            new_term,
            semi: self.fresh.durability == Durability::SemiSync,
        });
    }

    /// What a failure must undo, derived from the state, in the order it must happen.
    fn undo_calls(&self, now: Now) -> Vec<Call> {
        let plan = self.plan();
        // Once Promote was sent the candidate may know the new term, so every undo call carries
        // it (an older term would be refused); before that, nobody was asked to act under it.
        let term = if self.promote_sent {
            plan.new_term
        } else {
            self.action_term
        };
        let agent = |tablet: &str, action| Call::Agent {
            tablet: tablet.to_string(),
            term,
            action,
        };
        let mut calls = Vec::new();
        if self.promote_sent {
            // It may be writable under the new term: read-only, and a replica of the old
            // primary, before the old primary takes writes again.
            let cand = &plan.candidate.alias;
            calls.push(agent(cand, AgentAction::SetReadOnly { read_only: true }));
            calls.push(agent(
                cand,
                AgentAction::SetReplicationSource {
                    step: "undo_promote",
                    source: plan.old.clone(),
                    semi_sync: plan.semi,
                    start_replication: true,
                },
            ));
        }
        if self.demote_sent {
            calls.push(agent(&plan.old.alias, AgentAction::UndoDemote));
        }
        let restored = if self.promote_sent {
            ShardRecord {
                term: plan.new_term,
                term_start_ms: now.wall_ms,
                reparent_in_progress: None,
                reserved_term: plan.record.reserved_term.max(plan.new_term),
                ..plan.record.clone()
            }
        } else {
            // No agent was asked to act under the new term: its reservation is given back.
            ShardRecord {
                reparent_in_progress: None,
                ..plan.record.clone()
            }
        };
        // Without the lock (lost) this fails; the next lock holder clears the stale mark.
        calls.push(Call::WriteShardRecord {
            step: "clear_reparent_mark",
            term,
            record: restored,
        });
        calls
    }

    /// Ends the run with `e` after the undo the state calls for (each call best effort).
    fn fail(&mut self, e: RecoveryError, now: Now) {
        self.undo = self.undo_calls(now).into();
        self.undoing = Some(e);
        self.next_undo();
    }

    fn next_undo(&mut self) {
        match self.undo.pop_front() {
            Some(call) => {
                let id = self.em.call(call);
                self.pending.insert(id, Pending::Undo);
            }
            None => {
                let e = self
                    .undoing
                    .take()
                    .unwrap_or_else(|| RecoveryError::Failed("undone".into()));
                self.finish(Err(e));
            }
        }
    }

    fn on_marked(&mut self, r: Result<i64, RecoveryError>, now: Now) {
        if let Err(e) = r {
            // The write may have happened (a timeout): make sure no mark stays.
            return self.fail(e, now);
        }
        // 5. Demote: from here a failure makes the old primary writable again.
        let old = self.plan().old.alias.clone();
        self.demote_sent = true;
        let bound = self.demote_bound;
        self.agent(
            &old,
            self.action_term,
            AgentAction::Demote { bound },
            Pending::Demote,
        );
    }

    fn on_demoted(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        let position = match r {
            Ok(d) => d.gtid_position,
            Err(e) => return self.fail(e, now),
        };
        if position.trim().is_empty() {
            let old = self.plan().old.alias.clone();
            return self.fail(
                RecoveryError::Failed(format!("Demote of {old} answered no GTID position")),
                now,
            );
        }
        self.position = position.clone();
        // 6. The candidate applies everything the old primary committed.
        let cand = self.plan().candidate.alias.clone();
        let bound = self.opts.wait_timeout;
        self.agent(
            &cand,
            self.action_term,
            AgentAction::WaitForPosition {
                step: "wait_for_position",
                position,
                bound,
            },
            Pending::Wait,
        );
    }

    fn on_caught_up(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        if let Err(e) = r {
            return self.fail(e, now);
        }
        // 7. From Promote on, every call names the new term (the candidate may know it).
        let (cand, new_term) = (self.plan().candidate.alias.clone(), self.plan().new_term);
        self.promote_sent = true;
        self.agent(&cand, new_term, AgentAction::Promote, Pending::Promote);
    }

    fn on_promoted(&mut self, r: Result<pb::ActionResponse, RecoveryError>, now: Now) {
        if let Err(e) = r {
            return self.fail(e, now);
        }
        // 8. The new primary in the record, mark cleared. Past this point nothing is undone.
        let plan = self.plan();
        let next = ShardRecord {
            primary: Some(plan.candidate.alias.clone()),
            term: plan.new_term,
            term_start_ms: now.wall_ms,
            reparent_in_progress: None,
            reserved_term: plan.marked.reserved_term.max(plan.new_term),
            ..plan.record.clone()
        };
        let id = self.em.call(Call::WriteShardRecord {
            step: "write_shard_record",
            term: plan.new_term,
            record: next,
        });
        self.pending.insert(id, Pending::WriteRecord);
    }

    fn on_written(&mut self, r: Result<i64, RecoveryError>) {
        let plan = self.plan().clone();
        if let Err(e) = r {
            return self.finish(Err(RecoveryError::Failed(format!(
                "{} was promoted at term {} but the shard record could not be written ({e}); \
                 the mark stays until the next lock holder clears it",
                plan.candidate.alias, plan.new_term
            ))));
        }
        // 9. Everyone else replicates from the new primary, in parallel.
        let mut targets = vec![plan.old.alias.clone()];
        targets.extend(plan.choice.repoint.iter().cloned());
        for t in targets {
            self.agent(
                &t,
                plan.new_term,
                AgentAction::SetReplicationSource {
                    step: "repoint",
                    source: plan.candidate.clone(),
                    semi_sync: plan.semi,
                    start_replication: true,
                },
                Pending::Repoint(t.clone()),
            );
        }
    }

    fn on_repointed(&mut self, alias: String, r: Result<pb::ActionResponse, RecoveryError>) {
        match r {
            Ok(_) => self.repointed.push(alias),
            Err(e) => self.repoint_failed.push(format!("{alias}: {e}")),
        }
        if self
            .pending
            .values()
            .any(|p| matches!(p, Pending::Repoint(_)))
        {
            return;
        }
        let plan = self.plan().clone();
        // In the order asked (old primary first), whatever order the answers came in.
        let order = |a: &String| {
            std::iter::once(&plan.old.alias)
                .chain(plan.choice.repoint.iter())
                .position(|t| t == a)
        };
        self.repointed.sort_by_key(order);
        let detail = format!(
            "{} -> {} at term {} (was {}): caught up to {}; repointed [{}]{}{}",
            plan.old.alias,
            plan.candidate.alias,
            plan.new_term,
            plan.record.term,
            self.position,
            self.repointed.join(", "),
            if self.repoint_failed.is_empty() {
                String::new()
            } else {
                format!(
                    "; repoint failed (the repairs finish it): {}",
                    self.repoint_failed.join("; ")
                )
            },
            if plan.choice.skipped.is_empty() {
                String::new()
            } else {
                format!(
                    "; skipped (repointed by the repairs when they return): {}",
                    plan.choice.skipped.join("; ")
                )
            }
        );
        self.finish(Ok(Done {
            detail,
            new_term: Some(plan.new_term),
            new_primary: Some(plan.candidate.alias.clone()),
        }))
    }
}

impl StepMachine for Planned {
    fn start(&mut self, _now: Now) -> Vec<Action> {
        self.begin();
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
            (Pending::Undo, _) => self.next_undo(),
            (Pending::Mark, Reply::Written(r)) => self.on_marked(r, now),
            (Pending::Demote, Reply::Action(r)) => self.on_demoted(r, now),
            (Pending::Wait, Reply::Action(r)) => self.on_caught_up(r, now),
            (Pending::Promote, Reply::Action(r)) => self.on_promoted(r, now),
            (Pending::WriteRecord, Reply::Written(r)) => self.on_written(r),
            (Pending::Repoint(a), Reply::Action(r)) => self.on_repointed(a, r),
            (why, reply) => self.fail(
                RecoveryError::Failed(format!(
                    "planned reparent: unexpected reply {reply:?} to {why:?}"
                )),
                now,
            ),
        }
        self.em.take()
    }

    fn term(&self) -> Term {
        match &self.plan {
            Some(p) if self.promote_sent => p.new_term,
            _ => self.action_term,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use myha_proto::agent::{MysqlStatus, Replication};
    use tabletwatch::testing::tablet_record;

    const P: &str = "zone1-101";

    fn port(alias: &str) -> u16 {
        4000 + topo::parse_alias(alias).map(|(_, u)| u as u16).unwrap_or(0)
    }

    fn rec(alias: &str, cell: &str, rule: PromotionRule) -> TabletRecord {
        let mut t = tablet_record(alias, "ks", "0");
        t.cell = cell.into();
        t.mysql_host = "127.0.0.1".into();
        t.mysql_port = port(alias);
        t.promotion_rule = rule;
        t
    }

    fn primary_health(pos: &str) -> pb::Health {
        pb::Health {
            mysql_reachable: true,
            mysql: Some(MysqlStatus {
                flavor: "mariadb".into(),
                read_only: false,
                gtid_position: pos.into(),
                ..Default::default()
            }),
            replication: Some(Replication::default()),
            ..Default::default()
        }
    }

    fn replica_health(pos: &str, lag_ms: Option<u64>) -> pb::Health {
        pb::Health {
            mysql_reachable: true,
            mysql: Some(MysqlStatus {
                flavor: "mariadb".into(),
                read_only: true,
                gtid_position: pos.into(),
                ..Default::default()
            }),
            replication: Some(Replication {
                configured: true,
                source_host: "127.0.0.1".into(),
                source_port: port(P).into(),
                io_state: pb::ThreadState::Running as i32,
                sql_state: pb::ThreadState::Running as i32,
                ..Default::default()
            }),
            lag_ms,
            ..Default::default()
        }
    }

    /// Primary zone1-101 at 0-101-10; replicas zone1-102 (lag 20), zone1-103 (lag 10),
    /// zone2-104 (lag 5, another cell).
    struct Shard {
        record: ShardRecord,
        durability: Durability,
        tablets: BTreeMap<String, TabletRecord>,
        statuses: BTreeMap<String, pb::Health>,
        unseen: BTreeMap<String, String>,
        quarantined: BTreeMap<String, String>,
        max_lag: Duration,
    }

    impl Shard {
        fn new() -> Shard {
            let mut record = ShardRecord::new("ks", "0");
            record.primary = Some(P.into());
            record.term = Term::new(3);
            let tablets = [
                rec(P, "zone1", PromotionRule::Neutral),
                rec("zone1-102", "zone1", PromotionRule::Neutral),
                rec("zone1-103", "zone1", PromotionRule::Neutral),
                rec("zone2-104", "zone2", PromotionRule::Neutral),
            ]
            .into_iter()
            .map(|t| (t.alias.clone(), t))
            .collect();
            let statuses = [
                (P.to_string(), primary_health("0-101-10")),
                ("zone1-102".into(), replica_health("0-101-9", Some(20))),
                ("zone1-103".into(), replica_health("0-101-10", Some(10))),
                ("zone2-104".into(), replica_health("0-101-10", Some(5))),
            ]
            .into();
            Shard {
                record,
                durability: Durability::SemiSync,
                tablets,
                statuses,
                unseen: BTreeMap::new(),
                quarantined: BTreeMap::new(),
                max_lag: Duration::from_secs(5),
            }
        }

        fn choose(&self, to: Option<&str>) -> Result<PlannedChoice, PlannedRefusal> {
            choose_planned(&PlannedInput {
                record: &self.record,
                durability: self.durability,
                tablets: &self.tablets,
                statuses: &self.statuses,
                unseen: &self.unseen,
                quarantined: &self.quarantined,
                to,
                max_lag: self.max_lag,
            })
        }

        fn status(&mut self, alias: &str) -> &mut pb::Health {
            self.statuses.get_mut(alias).expect("tablet")
        }

        fn rule(&mut self, alias: &str, rule: PromotionRule) {
            self.tablets.get_mut(alias).expect("tablet").promotion_rule = rule;
        }
    }

    #[test]
    fn the_best_replica_is_in_the_primarys_cell_then_least_lagging() {
        let c = Shard::new().choose(None).expect("a candidate");
        assert_eq!(c.primary, P);
        assert_eq!(c.candidate, "zone1-103", "{c:?}");
        assert_eq!(c.repoint, vec!["zone1-102", "zone2-104"]);
        assert!(c.skipped.is_empty());
        assert!(c.reason.contains("lag 10 ms"), "{}", c.reason);
    }

    #[test]
    fn a_tablet_with_no_replication_source_is_left_to_the_repairs() {
        // Found by the simulator: a deposed primary, fenced by its agent but not yet vetted
        // by the repairs (it held transactions nobody acknowledged), was repointed by a
        // planned reparent before the errant check could quarantine it.
        let mut s = Shard::new();
        s.status("zone1-102").replication = None;
        let c = s.choose(None).expect("a candidate");
        assert_eq!(c.candidate, "zone1-103");
        assert_eq!(c.repoint, vec!["zone2-104"], "{c:?}");
        assert_eq!(c.skipped.len(), 1, "{c:?}");
        assert!(
            c.skipped[0].starts_with("zone1-102: no replication source"),
            "{c:?}"
        );
    }

    #[test]
    fn prefer_beats_lag_and_the_cell() {
        let mut s = Shard::new();
        s.rule("zone1-102", PromotionRule::Prefer);
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-102");
        s.rule("zone2-104", PromotionRule::Prefer);
        s.rule("zone1-102", PromotionRule::Neutral);
        // The emergency reparent ranks the same way (one ranking, `crate::ranking`): before
        // it did, a planned reparent put the cell first and the two disagreed.
        assert_eq!(
            s.choose(None).unwrap().candidate,
            "zone2-104",
            "prefer first, even in another cell"
        );
    }

    #[test]
    fn equal_lag_goes_to_the_most_advanced_then_the_alias() {
        let mut s = Shard::new();
        s.status("zone1-102").lag_ms = Some(10);
        s.status("zone1-102").mysql.as_mut().unwrap().gtid_position = "0-101-11".into();
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-102");
        s.status("zone1-102").mysql.as_mut().unwrap().gtid_position = "0-101-10".into();
        assert_eq!(
            s.choose(None).unwrap().candidate,
            "zone1-102",
            "alias order"
        );
        s.status("zone1-103").mysql.as_mut().unwrap().gtid_position = "0-101-12".into();
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-103");
    }

    #[test]
    fn a_later_snapshot_of_a_lagging_replica_does_not_outrank_a_smaller_lag() {
        // zone1-103 (lag 10) shows more than zone2-104 (lag 5) because its health was read
        // later; 104 is moved into the primary's cell so that only lag and position differ.
        let mut s = Shard::new();
        s.tablets.get_mut("zone2-104").expect("tablet").cell = "zone1".into();
        s.status("zone2-104").mysql.as_mut().unwrap().gtid_position = "0-101-9".into();
        assert_eq!(
            s.choose(None).unwrap().candidate,
            "zone2-104",
            "least lag first; progress only among equal lags"
        );
    }

    #[test]
    fn the_requested_candidate_is_taken_even_if_another_is_better() {
        let c = Shard::new().choose(Some("zone2-104")).unwrap();
        assert_eq!(c.candidate, "zone2-104");
        assert_eq!(c.repoint, vec!["zone1-102", "zone1-103"]);
        assert!(c.reason.contains("as requested"), "{}", c.reason);
    }

    #[test]
    fn refused_when_the_candidate_is_the_primary() {
        assert_eq!(
            Shard::new().choose(Some(P)),
            Err(PlannedRefusal::CandidateIsPrimary { alias: P.into() })
        );
    }

    #[test]
    fn refused_when_the_candidate_is_not_registered() {
        assert_eq!(
            Shard::new().choose(Some("zone1-199")),
            Err(PlannedRefusal::UnknownCandidate {
                alias: "zone1-199".into()
            })
        );
    }

    #[test]
    fn refused_when_the_candidate_is_not_replicating_from_the_primary() {
        let mut s = Shard::new();
        s.status("zone1-102")
            .replication
            .as_mut()
            .unwrap()
            .sql_state = pb::ThreadState::Stopped as i32;
        s.status("zone1-102")
            .replication
            .as_mut()
            .unwrap()
            .last_sql_error = "Duplicate entry".into();
        let e = s.choose(Some("zone1-102")).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::NotReplicating { why, .. } if why.contains("Duplicate entry")),
            "{e}"
        );
        // Replicating from someone else.
        let mut s = Shard::new();
        s.status("zone1-102")
            .replication
            .as_mut()
            .unwrap()
            .source_port = port("zone1-103").into();
        let e = s.choose(Some("zone1-102")).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::NotReplicating { why, .. } if why.contains("not from the primary")),
            "{e}"
        );
        // No source at all.
        let mut s = Shard::new();
        s.status("zone1-102").replication = Some(Replication::default());
        let e = s.choose(Some("zone1-102")).unwrap_err();
        assert!(
            e.to_string()
                .contains("zone1-102 is not a replica of primary zone1-101"),
            "{e}"
        );
    }

    #[test]
    fn refused_when_the_candidate_is_must_not() {
        let mut s = Shard::new();
        s.rule("zone1-103", PromotionRule::MustNot);
        assert_eq!(
            s.choose(Some("zone1-103")),
            Err(PlannedRefusal::MustNot {
                alias: "zone1-103".into()
            })
        );
        // Left out of the automatic pick.
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-102");
    }

    #[test]
    fn refused_when_the_candidate_is_quarantined() {
        let mut s = Shard::new();
        s.quarantined
            .insert("zone1-103".into(), "errant 0-103-1".into());
        assert_eq!(
            s.choose(Some("zone1-103")),
            Err(PlannedRefusal::Quarantined {
                alias: "zone1-103".into(),
                reason: "errant 0-103-1".into()
            })
        );
        let c = s.choose(None).unwrap();
        assert_eq!(c.candidate, "zone1-102");
        assert_eq!(c.repoint, vec!["zone2-104"]);
        assert_eq!(c.skipped.len(), 1, "{c:?}");
    }

    #[test]
    fn refused_when_the_candidate_does_not_answer() {
        let mut s = Shard::new();
        s.statuses.remove("zone1-103");
        s.unseen
            .insert("zone1-103".into(), "connection refused".into());
        let e = s.choose(Some("zone1-103")).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::Unreachable { why, .. } if why.contains("connection refused")),
            "{e}"
        );
        let mut s = Shard::new();
        s.status("zone1-103").mysql_reachable = false;
        s.status("zone1-103").mysql_error = "Can't connect".into();
        let e = s.choose(Some("zone1-103")).unwrap_err();
        assert!(e.to_string().contains("mysqld is unreachable"), "{e}");
        // A down replica is skipped, not a reason to refuse (S3).
        let c = s.choose(None).unwrap();
        assert_eq!(c.candidate, "zone1-102");
        assert_eq!(c.repoint, vec!["zone2-104"]);
        assert!(c.skipped[0].starts_with("zone1-103: "), "{c:?}");
    }

    #[test]
    fn refused_when_the_candidate_lags_with_the_lag_in_the_reason() {
        let mut s = Shard::new();
        s.status("zone1-103").lag_ms = Some(12_345);
        let e = s.choose(Some("zone1-103")).unwrap_err();
        assert_eq!(
            e,
            PlannedRefusal::Lagging {
                alias: "zone1-103".into(),
                lag_ms: 12_345,
                max_lag_ms: 5000
            }
        );
        assert!(e.to_string().contains("12345 ms"), "{e}");
        // Everyone lagging: no candidate, every lag shown.
        for a in ["zone1-102", "zone2-104"] {
            s.status(a).lag_ms = Some(9000);
        }
        let e = s.choose(None).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, PlannedRefusal::NoCandidate(_))
                && text.contains("12345 ms")
                && text.contains("9000 ms"),
            "{text}"
        );
    }

    #[test]
    fn unknown_lag_is_accepted_only_when_caught_up() {
        let mut s = Shard::new();
        s.status("zone1-102").lag_ms = None;
        let e = s.choose(Some("zone1-102")).unwrap_err();
        assert!(matches!(e, PlannedRefusal::LagUnknown { .. }), "{e}");
        s.status("zone1-102").mysql.as_mut().unwrap().gtid_position = "0-101-10".into();
        let c = s.choose(Some("zone1-102")).unwrap();
        assert!(c.reason.contains("unknown, caught up"), "{}", c.reason);
    }

    #[test]
    fn refused_when_semi_sync_could_not_be_acknowledged() {
        let mut s = Shard::new();
        for a in ["zone1-102", "zone2-104"] {
            s.tablets.remove(a);
            s.statuses.remove(a);
        }
        // Two tablets: the old primary acks once it replicates.
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-103");
        // ... unless it is quarantined.
        s.quarantined.insert(P.into(), "operator".into());
        let e = s.choose(None).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::SemiSync { candidate, .. } if candidate == "zone1-103"),
            "{e}"
        );
        s.durability = Durability::None;
        assert_eq!(s.choose(None).unwrap().candidate, "zone1-103");
    }

    #[test]
    fn refused_when_the_primary_is_not_usable() {
        let mut s = Shard::new();
        s.status(P).mysql.as_mut().unwrap().read_only = true;
        let e = s.choose(None).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::Primary { why, .. } if why.contains("read-only")),
            "{e}"
        );
        let mut s = Shard::new();
        s.statuses.remove(P);
        let e = s.choose(None).unwrap_err();
        assert!(
            matches!(&e, PlannedRefusal::Primary { why, .. } if why.contains("does not answer")),
            "{e}"
        );
        let mut s = Shard::new();
        s.record.primary = None;
        assert_eq!(s.choose(None), Err(PlannedRefusal::NoPrimary));
    }

    #[test]
    fn no_replica_at_all_is_a_refusal() {
        let mut s = Shard::new();
        s.tablets.retain(|a, _| a == P);
        assert_eq!(
            s.choose(None),
            Err(PlannedRefusal::NoCandidate(
                "the shard has no replica".into()
            ))
        );
    }

    // The step machine, driven by scripted replies.

    const CAND: &str = "zone1-103";

    impl Shard {
        fn fresh(&self) -> FreshShard {
            FreshShard::assemble(
                super::super::FreshReads {
                    keyspace: "ks",
                    shard: "0",
                    record: Some((self.record.clone(), 3)),
                    durability: self.durability,
                    tablets: self.tablets.clone(),
                    unreadable: Vec::new(),
                },
                self.statuses.clone(),
                self.unseen.clone(),
                &self.quarantined,
                1_000,
                &Default::default(),
            )
        }

        fn machine(&self, to: Option<&str>) -> Planned {
            Planned::new(
                self.fresh(),
                self.record.term,
                PlannedOptions {
                    to: to.map(str::to_string),
                    wait_timeout: Duration::from_secs(5),
                    max_lag: self.max_lag,
                    requester: "alice".into(),
                },
                Duration::from_secs(5),
            )
        }
    }

    /// One call as made: what, and how many calls were outstanding when it was made.
    #[derive(Debug)]
    struct Made {
        call: Call,
        outstanding: usize,
    }

    struct Run {
        result: Result<Done, RecoveryError>,
        made: Vec<Made>,
        steps: Vec<(String, bool)>,
    }

    impl Run {
        /// The agent calls as (tablet, term, kind).
        fn agents(&self) -> Vec<(String, u64, String)> {
            self.made
                .iter()
                .filter_map(|m| match &m.call {
                    Call::Agent {
                        tablet,
                        term,
                        action,
                    } => {
                        let kind = format!("{action:?}");
                        let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
                        Some((tablet.clone(), term.get(), kind))
                    }
                    _ => None,
                })
                .collect()
        }

        fn writes(&self) -> Vec<(&'static str, u64, ShardRecord)> {
            self.made
                .iter()
                .filter_map(|m| match &m.call {
                    Call::WriteShardRecord { step, term, record } => {
                        Some((*step, term.get(), record.clone()))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    fn timeout(tablet: &str) -> RecoveryError {
        RecoveryError::AgentTimeout {
            rpc: "test",
            tablet: tablet.into(),
            after: Duration::from_secs(1),
        }
    }

    /// Every call succeeds (`Demote` answers the primary's position), except those `fails`
    /// picks, which time out.
    fn answering(fails: impl Fn(&Call) -> bool) -> impl FnMut(&Call) -> Reply {
        move |c| match c {
            Call::Agent { tablet, .. } if fails(c) => Reply::Action(Err(timeout(tablet))),
            Call::WriteShardRecord { .. } if fails(c) => Reply::Written(Err(timeout("etcd"))),
            Call::Agent { .. } => Reply::Action(Ok(pb::ActionResponse {
                gtid_position: "0-101-10".into(),
                ..Default::default()
            })),
            Call::WriteShardRecord { .. } => Reply::Written(Ok(9)),
            c => panic!("a planned reparent makes no {c:?}"),
        }
    }

    fn is_agent(c: &Call, tablet: &str, kind: &str) -> bool {
        matches!(c, Call::Agent { tablet: t, action, .. }
            if t == tablet && format!("{action:?}").starts_with(kind))
    }

    /// Answers the outstanding calls in the order they were made, 1 ms apart.
    fn run(mut m: Planned, mut answer: impl FnMut(&Call) -> Reply) -> Run {
        let mut now = Now {
            since_start: Duration::ZERO,
            wall_ms: 50_000,
        };
        let mut queue: VecDeque<(CallId, Call)> = VecDeque::new();
        let mut made = Vec::new();
        let mut steps = Vec::new();
        let mut actions = m.start(now);
        for _ in 0..1_000 {
            for a in actions.drain(..) {
                match a {
                    Action::Call(id, c) => {
                        made.push(Made {
                            call: c.clone(),
                            outstanding: queue.len(),
                        });
                        queue.push_back((id, c));
                    }
                    Action::Cancel(id) => queue.retain(|(i, _)| *i != id),
                    Action::Record { name, ok, .. } => steps.push((name.to_string(), ok)),
                    Action::Done(result) => {
                        assert!(queue.is_empty(), "done with calls outstanding: {queue:?}");
                        return Run {
                            result,
                            made,
                            steps,
                        };
                    }
                    Action::Audit { .. } | Action::Phase(..) => {}
                }
            }
            let (id, call) = queue
                .pop_front()
                .expect("a call outstanding while not done");
            now.since_start += Duration::from_millis(1);
            now.wall_ms += 1;
            actions = m.on_reply(id, answer(&call), now);
        }
        panic!("the machine did not finish");
    }

    #[test]
    fn marks_demotes_waits_promotes_records_then_repoints_in_parallel() {
        let s = Shard::new();
        let r = run(s.machine(None), answering(|_| false));
        let done = r.result.as_ref().expect("done");
        assert_eq!(
            (done.new_term, done.new_primary.as_deref()),
            (Some(Term::new(4)), Some(CAND))
        );
        assert!(
            done.detail.starts_with(
                "zone1-101 -> zone1-103 at term 4 (was 3): caught up to 0-101-10; repointed [zone1-101, zone1-102, zone2-104]"
            ),
            "{}",
            done.detail
        );
        let agents = r.agents();
        let expect: Vec<(String, u64, String)> = [
            (P, 3, "Demote"),
            (CAND, 3, "WaitForPosition"),
            (CAND, 4, "Promote"),
            (P, 4, "SetReplicationSource"),
            ("zone1-102", 4, "SetReplicationSource"),
            ("zone2-104", 4, "SetReplicationSource"),
        ]
        .iter()
        .map(|(t, n, k)| (t.to_string(), *n, k.to_string()))
        .collect();
        assert_eq!(agents, expect);
        let writes = r.writes();
        assert_eq!(writes.len(), 2, "{writes:?}");
        let (step, term, marked) = &writes[0];
        assert_eq!((*step, *term), ("mark_reparent", 3));
        assert_eq!(
            marked.reparent_in_progress.as_deref(),
            Some("planned reparent to zone1-103 by alice")
        );
        assert_eq!(
            (marked.primary.as_deref(), marked.term, marked.reserved_term),
            (Some(P), Term::new(3), Term::new(4)),
            "the mark reserves the new term and changes nothing else"
        );
        let (step, term, next) = &writes[1];
        assert_eq!((*step, *term), ("write_shard_record", 4));
        assert_eq!(
            (
                next.primary.as_deref(),
                next.term,
                next.reparent_in_progress.as_deref()
            ),
            (Some(CAND), Term::new(4), None)
        );
        assert_eq!(
            next.term_start_ms, 50_004,
            "stamped when the promotion answered"
        );
        // The three repoints are outstanding together; everything before runs alone.
        let outstanding: Vec<usize> = r.made.iter().map(|m| m.outstanding).collect();
        assert_eq!(outstanding, [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(
            r.steps,
            [("choose_candidate".to_string(), true)],
            "the machine records only its decisions; the shell records each call"
        );
    }

    #[test]
    fn a_wait_that_fails_makes_the_old_primary_writable_again_and_gives_the_term_back() {
        let s = Shard::new();
        let r = run(
            s.machine(None),
            answering(|c| is_agent(c, CAND, "WaitForPosition")),
        );
        let e = r.result.as_ref().expect_err("failed");
        assert!(matches!(e, RecoveryError::AgentTimeout { .. }), "{e}");
        let agents = r.agents();
        assert_eq!(
            agents.last(),
            Some(&(P.to_string(), 3, "UndoDemote".to_string()))
        );
        assert!(!agents.iter().any(|(_, _, k)| k == "Promote"), "{agents:?}");
        let writes = r.writes();
        let (step, term, restored) = writes.last().expect("the mark is cleared");
        assert_eq!((*step, *term), ("clear_reparent_mark", 3));
        assert_eq!(
            restored, &s.record,
            "nobody acted at term 4: its reservation is given back"
        );
    }

    #[test]
    fn a_failed_promotion_puts_the_candidate_back_before_the_old_primary_takes_writes() {
        let s = Shard::new();
        let r = run(s.machine(None), answering(|c| is_agent(c, CAND, "Promote")));
        assert!(r.result.is_err());
        let undo: Vec<(String, u64, String)> = r.agents().into_iter().skip(3).collect();
        let expect: Vec<(String, u64, String)> = [
            (CAND, 4, "SetReadOnly"),
            (CAND, 4, "SetReplicationSource"),
            (P, 4, "UndoDemote"),
        ]
        .iter()
        .map(|(t, n, k)| (t.to_string(), *n, k.to_string()))
        .collect();
        assert_eq!(
            undo, expect,
            "the candidate may know term 4: every undo call names it"
        );
        // One after the other: the candidate is read-only before the old primary is writable.
        let undo_made: Vec<&Made> = r.made.iter().skip(4).collect();
        assert!(
            undo_made.iter().all(|m| m.outstanding == 0),
            "{undo_made:?}"
        );
        match &r.made[4].call {
            Call::Agent {
                action: AgentAction::SetReplicationSource { .. },
                ..
            }
            | Call::Agent {
                action: AgentAction::SetReadOnly { .. },
                ..
            } => {}
            c => panic!("{c:?}"),
        }
        let (step, term, restored) = r.writes().last().cloned().expect("cleared");
        assert_eq!((step, term), ("clear_reparent_mark", 4));
        assert_eq!(
            (
                restored.primary.as_deref(),
                restored.term,
                restored.reparent_in_progress
            ),
            (Some(P), Term::new(4), None),
            "the old primary stays, at the term the candidate may know"
        );
    }

    #[test]
    fn a_mark_that_cannot_be_written_is_cleared_and_nothing_else_is_sent() {
        let s = Shard::new();
        let r = run(
            s.machine(None),
            answering(
                |c| matches!(c, Call::WriteShardRecord { step, .. } if *step == "mark_reparent"),
            ),
        );
        assert!(r.result.is_err());
        assert!(r.agents().is_empty(), "{:?}", r.agents());
        let steps: Vec<&str> = r.writes().iter().map(|w| w.0).collect();
        assert_eq!(steps, ["mark_reparent", "clear_reparent_mark"]);
    }

    #[test]
    fn after_the_promotion_nothing_is_undone() {
        let s = Shard::new();
        let r = run(
            s.machine(None),
            answering(|c| {
                matches!(c, Call::WriteShardRecord { step, .. } if *step == "write_shard_record")
                    || is_agent(c, "zone1-102", "SetReplicationSource")
            }),
        );
        let e = r.result.as_ref().expect_err("failed").to_string();
        assert!(
            e.contains("zone1-103 was promoted at term 4") && e.contains("mark stays"),
            "{e}"
        );
        let agents = r.agents();
        assert_eq!(
            agents.last().map(|a| a.2.as_str()),
            Some("Promote"),
            "{agents:?}"
        );
        // A repoint that fails leaves the promotion standing.
        let r = run(
            s.machine(None),
            answering(|c| is_agent(c, "zone1-102", "SetReplicationSource")),
        );
        let done = r.result.expect("done");
        assert!(
            done.detail.contains("repointed [zone1-101, zone2-104]; repoint failed (the repairs finish it): zone1-102"),
            "{}",
            done.detail
        );
    }

    #[test]
    fn a_demotion_without_a_position_is_undone() {
        let s = Shard::new();
        let mut inner = answering(|_| false);
        let r = run(s.machine(None), move |c| {
            if is_agent(c, P, "Demote") {
                Reply::Action(Ok(pb::ActionResponse::default()))
            } else {
                inner(c)
            }
        });
        let e = r.result.as_ref().expect_err("failed").to_string();
        assert_eq!(e, "Demote of zone1-101 answered no GTID position");
        let kinds: Vec<String> = r.agents().into_iter().map(|a| a.2).collect();
        assert_eq!(kinds, ["Demote", "UndoDemote"]);
    }

    #[test]
    fn a_refusal_sends_nothing_and_says_what_stays() {
        let s = Shard::new();
        let r = run(s.machine(Some(P)), answering(|_| false));
        let e = r.result.as_ref().expect_err("refused");
        assert!(
            matches!(&e, RecoveryError::Refused(why) if why.contains("is the primary already")
                && why.ends_with("nothing was changed (primary zone1-101 stays at term 3)")),
            "{e}"
        );
        assert!(r.made.is_empty(), "{:?}", r.made);
        assert_eq!(r.steps, [("choose_candidate".to_string(), false)]);
    }
}
