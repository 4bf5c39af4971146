//! Repairs that need no reparent (R1-R9), plus electing the first primary of a new shard and
//! rejoining (or quarantining) a returning old primary.
//!
//! Contract with the engine ([`super::run`]): every remedy of [`crate::problem::PROBLEMS`] but
//! the reports and the emergency reparents is carried out here; [`repair`] runs under the shard lock with a fresh [`RecoveryContext`] whose problem was
//! re-found under the lock. Each agent call is an audited step under `ctx.term()`.
//!
//! Order matters for semi-sync: the analysis only reports the primary side once a replica acks,
//! so replicas are always fixed first and no commit ever waits on a primary with no acker.

use super::steps::AgentAction;
use super::{Done, RecoveryContext, RecoveryError};
use crate::analysis::{self, Candidate, Problem};
use crate::control::Control;
use crate::problem::Remedy;
use topo::Term;
use topo::{Durability, ShardRecord};

fn tablet_of(problem: &Problem) -> Result<&str, RecoveryError> {
    problem
        .tablet
        .as_deref()
        .ok_or_else(|| RecoveryError::Failed(format!("{} names no tablet", problem.code.as_str())))
}

fn primary_of(ctx: &RecoveryContext) -> Result<String, RecoveryError> {
    ctx.fresh
        .record
        .as_ref()
        .and_then(|r| r.primary.clone())
        .ok_or_else(|| RecoveryError::Refused("the shard record names no primary".into()))
}

/// Repairs `problem` by `remedy` (its code's, from the problem table).
pub async fn repair(
    ctx: &RecoveryContext,
    problem: &Problem,
    remedy: Remedy,
) -> Result<Done, RecoveryError> {
    let semi = ctx.durability() == Durability::SemiSync;
    let done = |detail: String| Done {
        detail,
        ..Done::default()
    };
    match remedy {
        Remedy::ElectPrimary => elect_primary(ctx).await,
        Remedy::MakePrimaryWritable => {
            let p = tablet_of(problem)?;
            // Never writable before lossless: under semi_sync the primary side is (re)applied
            // first (AFTER_SYNC, no fallback, waiting with no replica), else the first commits
            // after read_only could be acknowledged with no replica holding them.
            let semi = ctx.durability() == Durability::SemiSync;
            if semi {
                ctx.act(
                    p,
                    AgentAction::SetSemiSync {
                        primary: Some(true),
                        replica: None,
                    },
                )
                .await?;
            }
            ctx.act(p, AgentAction::SetReadOnly { read_only: false })
                .await?;
            Ok(done(format!(
                "{p}: {}read_only set back to OFF",
                if semi {
                    "semi-sync primary side made lossless, then "
                } else {
                    ""
                }
            )))
        }
        Remedy::ResetPrimaryReplication => {
            let p = tablet_of(problem)?;
            ctx.act(p, AgentAction::ResetReplication).await?;
            Ok(done(format!(
                "{p}: replication on the primary stopped and reset"
            )))
        }
        Remedy::SetPrimarySemiSync(on) => {
            let p = tablet_of(problem)?;
            ctx.act(
                p,
                AgentAction::SetSemiSync {
                    primary: Some(on),
                    replica: None,
                },
            )
            .await?;
            Ok(done(format!("{p}: semi-sync primary side {}", onoff(on))))
        }
        Remedy::SetReplicaSemiSync(on) => {
            let r = tablet_of(problem)?;
            ctx.act(
                r,
                AgentAction::SetSemiSync {
                    primary: None,
                    replica: Some(on),
                },
            )
            .await?;
            Ok(done(format!("{r}: semi-sync replica side {}", onoff(on))))
        }
        Remedy::MakeReplicaReadOnly => {
            let r = tablet_of(problem)?;
            ctx.act(r, AgentAction::SetReadOnly { read_only: true })
                .await?;
            Ok(done(format!("{r}: read_only set back to ON")))
        }
        Remedy::RestartReplication => {
            let r = tablet_of(problem)?;
            ctx.act(r, AgentAction::StartReplication { io_only: false })
                .await?;
            Ok(done(format!("{r}: replication restarted")))
        }
        Remedy::RepointAtPrimary => {
            let r = tablet_of(problem)?;
            let primary = primary_of(ctx)?;
            let source = ctx.tablet(&primary)?.clone();
            ctx.act(
                r,
                AgentAction::SetReplicationSource {
                    step: "repoint to the primary",
                    source: source.clone(),
                    semi_sync: semi,
                    start_replication: true,
                },
            )
            .await?;
            Ok(done(format!(
                "{r}: repointed at {primary} ({}:{})",
                source.mysql_host, source.mysql_port
            )))
        }
        Remedy::RejoinOrQuarantine => rejoin_or_quarantine(ctx, problem).await,
        Remedy::QuarantineErrant => quarantine_errant(ctx, problem).await,
        Remedy::ReconcileTerms => reconcile_terms(ctx).await,
        Remedy::ClearStaleMark => clear_stale_mark(ctx).await,
        Remedy::Report | Remedy::EmergencyReparent | Remedy::DemoteThenEmergencyReparent => {
            Err(RecoveryError::Refused(format!(
                "no repair for {}: {remedy:?} is not a repair",
                problem.code.as_str()
            )))
        }
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
async fn reconcile_terms(ctx: &RecoveryContext) -> Result<Done, RecoveryError> {
    let fresh = &ctx.fresh;
    let rec = fresh
        .record
        .clone()
        .ok_or_else(|| RecoveryError::Refused("the shard has no record".into()))?;
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
                return Err(ctx.refuse(
                    "reconcile_terms",
                    Some(alias),
                    format!(
                        "{alias} claims term {} above the record's {}, but it is not the only writable tablet (writable: [{}]){}: not adopted, an operator must decide",
                        h.promoted_term,
                        rec.term,
                        writable.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "),
                        if replicating { ", and it replicates from a source" } else { "" }
                    ),
                ));
            }
            next.primary = Some((*alias).clone());
            next.term = Term::new(h.promoted_term);
            next.term_start_ms = topo::now_ms();
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
            return Err(ctx.refuse(
                "reconcile_terms",
                None,
                format!(
                    "several tablets claim promotions above the record's term {}: {}: not adopted, an operator must decide",
                    rec.term,
                    many.iter()
                        .map(|(a, h)| format!("{a} (term {})", h.promoted_term))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    };
    ctx.write_shard_record_as("reconcile_terms", &next).await?;
    Ok(Done {
        detail,
        new_term: (next.term != rec.term).then_some(next.term),
        new_primary: (next.primary != rec.primary)
            .then(|| next.primary.clone())
            .flatten(),
    })
}

/// Quarantines `alias` with `reason` as one step.
async fn quarantine_step(
    ctx: &RecoveryContext,
    alias: &str,
    reason: &str,
) -> Result<(), RecoveryError> {
    let control = Control::new(ctx.deps.topo.clone());
    ctx.step(
        "quarantine",
        Some(alias),
        async {
            control
                .quarantine(alias, reason, ctx.term())
                .await
                .map_err(|e| RecoveryError::Failed(e.to_string()))
        },
        |_| reason.to_string(),
    )
    .await
    .map(drop)
}

/// A replica holding transactions the primary never had (P9): its data is not the shard's, so it
/// must not serve reads nor be promoted. Quarantined with the analysis' reason (the gateway then
/// leaves it out of read routing; only an operator lifts it, after resolving the transactions).
/// Nothing is changed on its mysqld: the transactions stay there for the operator to inspect.
async fn quarantine_errant(
    ctx: &RecoveryContext,
    problem: &Problem,
) -> Result<Done, RecoveryError> {
    let alias = tablet_of(problem)?;
    let reason = format!(
        "{}; quarantined: out of read routing and never promoted until an operator resolves them",
        problem.detail
    );
    quarantine_step(ctx, alias, &reason).await?;
    Ok(Done {
        detail: format!("{alias}: {reason}"),
        ..Done::default()
    })
}

/// A tablet promoted under an older term came back (P3, R9). It rejoins as a replica of the
/// current primary when everything it has is also on the primary; otherwise its extra
/// transactions would be lost or replicated nowhere, so it is quarantined with the reason.
async fn rejoin_or_quarantine(
    ctx: &RecoveryContext,
    problem: &Problem,
) -> Result<Done, RecoveryError> {
    let stale = tablet_of(problem)?;
    let primary = primary_of(ctx)?;
    let (Some(sh), Some(ph)) = (ctx.status(stale), ctx.status(&primary)) else {
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
    if !extra.is_empty() {
        let reason = format!(
            "{stale} (promoted under term {}) holds transactions {extra} that primary {primary} does not have; \
             quarantined: it must not replicate or be promoted until an operator resolves them",
            sh.promoted_term
        );
        // Read-only first: the agent fences it already, this makes sure.
        ctx.act(stale, AgentAction::SetReadOnly { read_only: true })
            .await?;
        quarantine_step(ctx, stale, &reason).await?;
        return Ok(Done {
            detail: reason,
            ..Done::default()
        });
    }
    let source = ctx.tablet(&primary)?.clone();
    ctx.act(stale, AgentAction::SetReadOnly { read_only: true })
        .await?;
    ctx.act(
        stale,
        AgentAction::SetReplicationSource {
            step: "rejoin as a replica",
            source,
            semi_sync: ctx.durability() == Durability::SemiSync,
            start_replication: true,
        },
    )
    .await?;
    Ok(Done {
        detail: format!(
            "{stale} (promoted under term {}) rejoined as a replica of {primary}: its position {stale_pos} is contained in {primary_pos}",
            sh.promoted_term
        ),
        ..Done::default()
    })
}

/// R8: a shard with no primary gets one, chosen like an emergency candidate among the tablets
/// whose agents answered; the others replicate from it.
async fn elect_primary(ctx: &RecoveryContext) -> Result<Done, RecoveryError> {
    let mut candidates = Vec::new();
    for (alias, h) in &ctx.fresh.statuses {
        if !h.mysql_reachable || ctx.job.quarantined.contains_key(alias) {
            continue;
        }
        let Ok(t) = ctx.tablet(alias) else { continue };
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
    let choice = analysis::choose_candidate(&candidates, None, ctx.durability())
        .map_err(|r| RecoveryError::Refused(r.to_string()))?;
    let term = ctx.fresh.next_promotion_term();
    ctx.reserve_term(term).await?;
    ctx.set_term(term);
    ctx.act(&choice.candidate, AgentAction::Promote).await?;
    let mut record = ctx
        .fresh
        .record
        .clone()
        .unwrap_or_else(|| ShardRecord::new(ctx.keyspace.clone(), ctx.shard.clone()));
    record.primary = Some(choice.candidate.clone());
    record.term = term;
    record.reserved_term = term;
    record.term_start_ms = topo::now_ms();
    ctx.write_shard_record(&record).await?;
    let source = ctx.tablet(&choice.candidate)?.clone();
    let semi = ctx.durability() == Durability::SemiSync;
    let mut repointed = Vec::new();
    for other in &choice.others {
        match ctx
            .act(
                other,
                AgentAction::SetReplicationSource {
                    step: "replicate from the elected primary",
                    source: source.clone(),
                    semi_sync: semi,
                    start_replication: true,
                },
            )
            .await
        {
            Ok(_) => repointed.push(other.clone()),
            // The primary is in place; a replica left behind is a repair of its own next round.
            Err(e) => tracing::warn!(tablet = %other, error = %e, "not repointed"),
        }
    }
    Ok(Done {
        detail: format!(
            "elected {} as primary at term {term} ({}); replicas: {}",
            choice.candidate,
            choice.reason,
            if repointed.is_empty() {
                "none".to_string()
            } else {
                repointed.join(", ")
            }
        ),
        new_term: Some(term),
        new_primary: Some(choice.candidate.clone()),
    })
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
async fn clear_stale_mark(ctx: &RecoveryContext) -> Result<Done, RecoveryError> {
    let record = ctx
        .fresh
        .record
        .clone()
        .ok_or_else(|| RecoveryError::Refused("the shard has no record".into()))?;
    let Some(mark) = record.reparent_in_progress.clone() else {
        return Err(RecoveryError::Refused(
            "no reparent mark in the shard record any more".into(),
        ));
    };
    let next = cleared_record(&record, ctx.fresh.action_term(), topo::now_ms());
    ctx.set_term(next.term);
    let strays = stray_writables(record.primary.as_deref(), &ctx.fresh.statuses);
    for alias in &strays {
        ctx.act(alias, AgentAction::SetReadOnly { read_only: true })
            .await?;
    }
    ctx.write_shard_record_as("clear_stale_reparent_mark", &next)
        .await?;
    Ok(Done {
        detail: format!(
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
        ),
        new_term: (next.term != record.term).then_some(next.term),
        new_primary: None,
    })
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
}
