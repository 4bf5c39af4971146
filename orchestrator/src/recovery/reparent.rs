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
//! An operator may ask for one whether or not the primary looks dead ([`EmergencyOptions`]):
//! the old primary, when it answers, is demoted first (bounded, best effort) and its final
//! position is what the replicas apply; a requested candidate replaces the choice. The old
//! primary is not repointed here: it is a stale primary claim that the repairs rejoin (or
//! quarantine, when it holds transactions the new primary lacks).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use topo::Term;

use gtid::GtidSet;
use myha_proto::agent as pb;
use topo::{Durability, PromotionRule, ShardRecord, TabletRecord};

use super::{Done, FreshShard, RecoveryContext, RecoveryError, OUTCOME_OK};
use crate::analysis::{
    self, choose_candidate, choose_requested_candidate, Candidate, Choice, Refusal,
};

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
        let held = match received(h).map(|r| GtidSet::parse(applied.flavor(), &r)) {
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

/// The emergency reparent. See the module doc.
pub async fn emergency_reparent(ctx: &RecoveryContext) -> Result<Done, RecoveryError> {
    emergency_reparent_with(ctx, &EmergencyOptions::default()).await
}

/// A stalled primary (opt-in, [`crate::analysis::ProblemCode::StalledPrimary`]): its agent sets
/// it read-only first, bounded by `action_timeout` (read_only is set past a global read lock's
/// holder, and the writes blocked behind that lock then fail with ER_OPTION_PREVENTS_STATEMENT
/// instead of committing on the deposed primary); its final position is what the replicas
/// apply. See [`EmergencyOptions::old_primary_must_be_fenced`].
pub async fn stalled_primary_reparent(ctx: &RecoveryContext) -> Result<Done, RecoveryError> {
    let opts = EmergencyOptions {
        demote_old_first: Some(ctx.cfg().action_timeout),
        old_primary_must_be_fenced: true,
        ..EmergencyOptions::default()
    };
    emergency_reparent_with(ctx, &opts).await
}

/// Best effort after a refusal or failure before the promotion: the old primary demoted by
/// [`EmergencyOptions::demote_old_first`] takes writes again.
async fn undo_first_demotion(ctx: &RecoveryContext, demoted: Option<&str>) {
    if let Some(old) = demoted {
        let _ = ctx.undo_demote(old).await;
    }
}

/// The emergency reparent, as asked (see [`EmergencyOptions`]).
pub async fn emergency_reparent_with(
    ctx: &RecoveryContext,
    opts: &EmergencyOptions,
) -> Result<Done, RecoveryError> {
    let total = Instant::now();
    let fresh = &ctx.fresh;
    let record = fresh
        .record
        .clone()
        .ok_or_else(|| RecoveryError::Refused("the shard has no record".into()))?;
    let old_primary = record
        .primary
        .clone()
        .ok_or_else(|| RecoveryError::Refused("the shard record names no primary".into()))?;
    let new_term = fresh.next_promotion_term();
    let durability = ctx.durability();
    let old_cell = fresh
        .tablets
        .get(&old_primary)
        .map(|t| t.cell.clone())
        .or_else(|| topo::parse_alias(&old_primary).ok().map(|(c, _)| c));
    let mut reference = ctx
        .job
        .last_primary
        .as_ref()
        .filter(|p| p.alias == old_primary)
        .and_then(|p| {
            Some(Reference {
                position: p.gtid_set()?,
                writer: p.writer.clone(),
            })
        });

    // The replicas whose replication is stopped before the choice (every one that answers with
    // its mysqld up: a quarantined one may acknowledge too), and among them the candidates (not
    // quarantined).
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
    // Every registered replica could have acknowledged the old primary's last commits, except
    // those known not to: a stale primary claim (promoted under an older term and never
    // repointed since, so it replicates from nobody) and a replica with its semi-sync side off.
    let replicas: Vec<String> = fresh
        .tablets
        .keys()
        .filter(|a| **a != old_primary)
        .filter(|a| match fresh.statuses.get(*a) {
            Some(h) => {
                let stale_primary = h.promoted_term > 0;
                let no_ack =
                    h.mysql_reachable && h.semi_sync.as_ref().is_some_and(|s| !s.replica_enabled);
                !stale_primary && !no_ack
            }
            None => true,
        })
        .cloned()
        .collect();
    let k = acks_required(durability);
    let why_unreached = |a: &str| -> String {
        match (fresh.unseen.get(a), fresh.statuses.get(a)) {
            (Some(why), _) => format!("{a} (agent: {why})"),
            (None, Some(h)) if !h.mysql_reachable => {
                format!("{a} (mysqld unreachable: {})", h.mysql_error)
            }
            (None, Some(_)) => format!("{a} (its IO thread could not be stopped)"),
            (None, None) => format!("{a} (no answer)"),
        }
    };
    // Checks rule 2 on `reached`; Ok(None) when met, Ok(Some(note)) when forced, Err(why).
    let revoked = |reached: &[String]| -> Result<Option<String>, String> {
        match revocation(&replicas, reached, k) {
            Ok(()) => Ok(None),
            Err(unreached) => {
                let names: Vec<String> = unreached.iter().map(|a| why_unreached(a)).collect();
                let why = format!(
                    "semi_sync: replication must be stopped on at least {} of the {} replicas (R - K + 1, K = {k}) to know every acknowledged transaction; not reached: {}",
                    replicas.len() + 1 - k.min(replicas.len() + 1),
                    replicas.len(),
                    names.join(", ")
                );
                if opts.may_lose_acknowledged_writes {
                    Ok(Some(format!(
                        "FORCED by the operator (may_lose_acknowledged_writes): {why}; acknowledged writes held only there are lost"
                    )))
                } else {
                    Err(why)
                }
            }
        }
    };
    let answering_aliases: Vec<String> = answering.keys().cloned().collect();
    if let Err(why) = revoked(&answering_aliases) {
        ctx.record_step("revocation", None, false, why.clone(), Duration::ZERO);
        return Err(RecoveryError::Refused(format!(
            "{why}; nothing was changed (primary {old_primary} stays in the record at term {}); an operator may force it with may_lose_acknowledged_writes",
            record.term
        )));
    }

    let requested = opts.to.as_deref();
    let why_missing = requested.and_then(|to| {
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
    let choose = |cands: &[Candidate]| match requested {
        Some(to) => choose_requested_candidate(cands, to, why_missing.as_deref(), durability),
        None => choose_candidate(cands, old_cell.as_deref(), durability),
    };

    // Pre-check on the current positions: refuse before changing anything.
    let (pre, _) = candidates(&reachable, &fresh.tablets, reference.as_ref());
    if let Err(refusal) = choose(&pre) {
        let why = match &refusal {
            // Positions may still move while the relay logs apply: decide on the final ones.
            Refusal::Diverged(_) => None,
            r => Some(refusal_text(r)),
        };
        if let Some(why) = why {
            ctx.record_step("choose_candidate", None, false, why.clone(), Duration::ZERO);
            return Err(RecoveryError::Refused(format!(
                "{why}; nothing was changed (primary {old_primary} stays in the record at term {})",
                record.term
            )));
        }
    }

    // Operator request with the old primary answering: read-only first, its final position
    // is what the replicas must reach.
    let mut demoted: Option<&str> = None;
    if let Some(bound) = opts.demote_old_first {
        let answering = fresh
            .statuses
            .get(&old_primary)
            .filter(|h| h.mysql_reachable);
        if let Some(h) = answering {
            match ctx.demote_within(&old_primary, bound).await {
                Ok(r) => {
                    demoted = Some(old_primary.as_str());
                    let flavor = analysis::flavor_of(h);
                    if let Ok(position) = GtidSet::parse(flavor, &r.gtid_position) {
                        reference = Some(Reference {
                            position,
                            writer: analysis::writer_id(h),
                        });
                    }
                }
                Err(e) if opts.old_primary_must_be_fenced && durability == Durability::None => {
                    let why = format!(
                        "durability none: the stalled old primary {old_primary} could not be set read-only ({e}); once its stall clears nothing else stops its clients' writes, so promoting a replica would make two writable primaries; nothing was changed (primary {old_primary} stays in the record at term {})",
                        record.term
                    );
                    return Err(ctx.refuse("fence_old_primary", Some(&old_primary), why));
                }
                Err(e) if opts.old_primary_must_be_fenced => ctx.record_step(
                    "demote_noted",
                    Some(&old_primary),
                    true,
                    format!(
                        "the stalled old primary could not be set read-only ({e}); going on: under semi_sync none of its commits can be acknowledged once the replicas' IO threads stop, and its agent fences it on the new term"
                    ),
                    Duration::ZERO,
                ),
                Err(e) => ctx.record_step(
                    "demote_noted",
                    Some(&old_primary),
                    true,
                    format!("the old primary could not be set read-only ({e}); going on"),
                    Duration::ZERO,
                ),
            }
        }
    }
    if reference.is_none() {
        reference = history_reference(ctx, &record, &old_primary, &answering).await;
    }

    // Reserve the new term before touching anything (a refusal above burns no term): whoever
    // acts on this shard after us uses a higher one, even if we lose the lock mid-way.
    if let Err(e) = ctx.reserve_term(new_term).await {
        undo_first_demotion(ctx, demoted).await;
        return Err(e);
    }
    // Every step from here on carries the reserved term: it is ours alone (reserved under the
    // lock), so an agent that accepted one of our steps refuses anyone acting under an older
    // term, and one that accepted a newer holder's step at this term refuses ours.
    ctx.set_term(new_term);

    // Stop IO everywhere: what each replica received is final from here on.
    let t = Instant::now();
    let finals = futures::future::join_all(
        answering
            .iter()
            .map(|(alias, h)| stop_io(ctx, alias.clone(), h.clone())),
    )
    .await;
    phase("stop_io", t.elapsed());
    let mut final_statuses = BTreeMap::new();
    let mut stopped = Vec::new();
    for (alias, io_stopped, status) in finals {
        if io_stopped {
            stopped.push(alias.clone());
        }
        if let Some(h) = status.filter(|_| reachable.contains_key(&alias)) {
            final_statuses.insert(alias, h);
        }
    }
    match revoked(&stopped) {
        Ok(None) => ctx.record_step(
            "revocation",
            None,
            true,
            format!(
                "replication stopped on {} of {} replicas: every acknowledged transaction is among them",
                stopped.len(),
                replicas.len()
            ),
            // A check, not an action: the stops are steps of their own.
            Duration::ZERO,
        ),
        Ok(Some(forced)) => ctx.record_step("revocation", None, true, forced, Duration::ZERO),
        Err(why) => {
            let refusal = ctx.refuse("revocation", None, why);
            restart_io(ctx, &stopped).await;
            undo_first_demotion(ctx, demoted).await;
            return Err(refusal);
        }
    }
    // Choose.
    let t = Instant::now();
    let (cands, left_out) = candidates(&final_statuses, &fresh.tablets, reference.as_ref());
    for c in cands.iter().filter(|c| c.errant.is_some()) {
        ctx.record_step(
            "errant_check",
            Some(&c.alias),
            false,
            format!(
                "errant transactions {} (not on dead primary {old_primary}): never promoted",
                c.errant.as_deref().unwrap_or_default()
            ),
            Duration::ZERO,
        );
    }
    let choice = match choose(&cands) {
        Ok(c) => c,
        Err(refusal) => {
            let why = refusal_text(&refusal);
            ctx.record_step("choose_candidate", None, false, why.clone(), t.elapsed());
            restart_io(ctx, &stopped).await;
            undo_first_demotion(ctx, demoted).await;
            return Err(RecoveryError::Refused(format!(
                "{why}{}; IO threads restarted, primary {old_primary} stays in the record at term {}",
                if left_out.is_empty() {
                    String::new()
                } else {
                    format!(" (left out: {})", left_out.join("; "))
                },
                record.term
            )));
        }
    };
    ctx.record_step(
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
        t.elapsed(),
    );
    phase("choose", t.elapsed());

    // Catch up from the most advanced tablet if needed: it applies what it received first, so
    // that everything the candidate fetches from it is in its binlog.
    // What a tablet still has to apply: its received position, unless its applied one (from
    // the IO stop's answer) already contains it (then no wait, no RPC).
    let held = |alias: &str| {
        let h = final_statuses.get(alias)?;
        let r = received(h)?;
        let applied = analysis::position(h);
        let done = applied.is_some_and(|a| {
            GtidSet::parse(a.flavor(), &r)
                .ok()
                .and_then(|r| a.contains_set(&r).ok())
                .unwrap_or(false)
        });
        (!done).then(|| (alias.to_string(), r))
    };
    let choice = match &choice.catch_up_from {
        None => choice,
        Some(source) => {
            let t = Instant::now();
            let r = async {
                if let Some((a, r)) = held(source) {
                    ctx.apply_received(&a, &r, ctx.cfg().relay_log_wait).await?;
                }
                catch_up(ctx, &choice, source).await
            }
            .await;
            phase("catch_up", t.elapsed());
            match r {
                Ok(()) => choice,
                Err(e) if requested.is_some() => {
                    let why = format!(
                        "catch-up of the requested candidate {} from {source} failed ({e}): not promoting another tablet than requested",
                        choice.candidate
                    );
                    let refusal = ctx.refuse("catch_up_fallback", Some(source), why);
                    restart_io(ctx, &stopped).await;
                    undo_first_demotion(ctx, demoted).await;
                    return Err(refusal);
                }
                Err(e) => match fallback(ctx, &choice, source, &cands, &e) {
                    Ok(c) => c,
                    Err(e) => {
                        undo_first_demotion(ctx, demoted).await;
                        return Err(e);
                    }
                },
            }
        }
    };

    // The candidate applies everything it received (after a catch-up: a no-op, it waited for
    // the target). The promotion resets replication, which would throw the rest away.
    if choice.catch_up_from.is_none() {
        if let Some((alias, target)) = held(&choice.candidate) {
            let t = Instant::now();
            let r = ctx
                .apply_received(&alias, &target, ctx.cfg().relay_log_wait)
                .await;
            phase("apply_relay_log", t.elapsed());
            if let Err(e) = r {
                let why = format!(
                    "candidate {alias} received up to {target} but did not apply it within relay_log_wait ({:?}): {e}; refusing rather than promote a tablet missing acknowledged transactions",
                    ctx.cfg().relay_log_wait
                );
                let refusal = ctx.refuse("apply_relay_log", Some(&alias), why);
                restart_io(ctx, &stopped).await;
                undo_first_demotion(ctx, demoted).await;
                return Err(refusal);
            }
        }
    }
    let candidate = ctx.tablet(&choice.candidate)?.clone();

    // A deposed primary whose agent is gone cannot fence itself: the candidate's agent fences
    // its mysqld over MySQL. Under durability none nothing else stops its clients' writes, so
    // that comes first and a failure refuses the promotion (unless forced); under semi_sync its
    // commits cannot complete without the replicas stopped above, and it is fenced right after
    // the promotion, off the critical path.
    let agentless = (!fresh.statuses.contains_key(&old_primary))
        .then(|| old_primary_addr(fresh, &old_primary))
        .flatten();
    if let (Some(addr), Durability::None) = (&agentless, durability) {
        // Fenced over MySQL from the candidate, or relied on to have fenced itself (its lease
        // expired while no replica reached it: the isolation rule), whichever is settled
        // first: a cut-off host never answers the fence, and waiting out its bound first
        // would only delay the promotion.
        let t = Instant::now();
        let fence = ctx.fence_server(&candidate.alias, &old_primary, addr, FENCE_BOUND);
        let relied = wait_for_self_demotion(ctx, fresh, &record, &old_primary);
        tokio::pin!(fence, relied);
        let (mut fence_failed, mut not_relied) = (None, None);
        let r = loop {
            tokio::select! {
                f = &mut fence, if fence_failed.is_none() => match f {
                    Ok(_) => break Ok(()),
                    Err(e) => match not_relied.take() {
                        Some(n) => break Err(format!("{e}; nor can it be taken as self-demoted: {n}")),
                        None => fence_failed = Some(e),
                    },
                },
                w = &mut relied, if not_relied.is_none() => match w {
                    Ok(detail) => {
                        let fence = match &fence_failed {
                            Some(e) => format!("its mysqld at {addr} could not be fenced ({e})"),
                            None => format!("its mysqld at {addr} had not answered the fence"),
                        };
                        ctx.record_step(
                            "fence_old_primary",
                            Some(&old_primary),
                            true,
                            format!("{fence}; {detail}"),
                            t.elapsed(),
                        );
                        break Ok(());
                    }
                    Err(n) => match fence_failed.take() {
                        Some(e) => break Err(format!("{e}; nor can it be taken as self-demoted: {n}")),
                        None => not_relied = Some(n),
                    },
                },
            }
        };
        phase("fence_old_primary", t.elapsed());
        if let Err(e) = r {
            let why = format!(
                "durability none: the old primary {old_primary}'s agent is gone and its mysqld at {addr} could not be fenced ({e}); with nothing else to stop its clients' writes, promoting {} would make two writable primaries",
                candidate.alias
            );
            if opts.may_lose_acknowledged_writes {
                ctx.record_step(
                    "fence_old_primary",
                    Some(&old_primary),
                    true,
                    format!("FORCED by the operator (may_lose_acknowledged_writes): {why}"),
                    Duration::ZERO,
                );
            } else {
                let refusal = ctx.refuse("fence_old_primary", Some(&old_primary), why);
                restart_io(ctx, &stopped).await;
                return Err(refusal);
            }
        }
    }

    // Promote under the new term.
    let t = Instant::now();
    ctx.promote(&candidate.alias).await?;
    phase("promote", t.elapsed());

    let t = Instant::now();
    let next = ShardRecord {
        primary: Some(candidate.alias.clone()),
        term: new_term,
        term_start_ms: topo::now_ms(),
        reparent_in_progress: None,
        reserved_term: new_term,
        ..record.clone()
    };
    ctx.write_shard_record(&next).await?;
    phase("write_record", t.elapsed());

    // Repoint everyone else who answered.
    let t = Instant::now();
    let semi = durability == Durability::SemiSync;
    let others: Vec<String> = choice
        .others
        .iter()
        .filter(|a| **a != candidate.alias && final_statuses.contains_key(*a))
        .cloned()
        .collect();
    let fence_after = async {
        if let (Some(addr), Durability::SemiSync) = (&agentless, durability) {
            if let Err(e) = ctx
                .fence_server(&candidate.alias, &old_primary, addr, FENCE_BOUND)
                .await
            {
                ctx.audit(
                    "fence_old_primary_noted",
                    Some(&old_primary),
                    OUTCOME_OK,
                    format!("not fenced ({e}): under semi_sync its commits wait for acks no replica sends any more; fenced by its agent if that returns"),
                    None,
                );
            }
        }
    };
    let ((ok, failed), ()) =
        futures::future::join(ctx.repoint_all(&others, &candidate, semi), fence_after).await;
    phase("repoint", t.elapsed());
    phase("total", total.elapsed());
    let unseen: Vec<&String> = fresh
        .tablets
        .keys()
        .filter(|a| {
            **a != old_primary && **a != candidate.alias && !final_statuses.contains_key(*a)
        })
        .collect();
    Ok(Done {
        detail: format!(
            "promoted {} at term {new_term} (dead primary {old_primary}, term {}): {}; repointed [{}]{}{}",
            candidate.alias,
            record.term,
            choice.reason,
            ok.join(", "),
            if failed.is_empty() {
                String::new()
            } else {
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
        ),
        new_term: Some(new_term),
        new_primary: Some(candidate.alias.clone()),
    })
}

/// Bound on fencing a deposed primary's mysqld over MySQL (a dead host must not hold a
/// failover up for long).
pub const FENCE_BOUND: Duration = Duration::from_secs(2);

/// The mysqld address of the old primary: its registration, else (gone past its lease, P17)
/// what the replicas probe it at.
/// Past [`topo::SELF_DEMOTE_PEER_WINDOW`], what an orchestrator adds before relying on the
/// isolation rule: the agent's tick, its fence and clock skew between the replicas' hosts.
const SELF_DEMOTION_MARGIN: Duration = Duration::from_millis(500);

/// Durability none, the old primary's agent silent and its mysqld not fenceable from here:
/// whether its agent's isolation rule (see [`topo::SELF_DEMOTE_PEER_WINDOW`]) has made it
/// read-only, waiting up to `self_demotion_wait` for what that rests on: its promotion record
/// says its agent follows the rule, its registration is gone from etcd (the lease expired), and
/// every replica has failed to reach it for the rule's window plus a margin. `Ok` with what it
/// rests on, or `Err` with what is missing.
async fn wait_for_self_demotion(
    ctx: &RecoveryContext,
    fresh: &FreshShard,
    record: &ShardRecord,
    old_primary: &str,
) -> Result<String, String> {
    let topo = &ctx.deps.topo;
    match topo
        .get_promotion(&ctx.keyspace, &ctx.shard, record.term)
        .await
    {
        Ok(Some(p)) if p.primary == old_primary && p.self_demotes => {}
        Ok(Some(p)) if p.primary == old_primary => {
            return Err(format!(
            "the promotion record of term {} does not say its agent demotes itself when isolated",
            record.term
        ))
        }
        Ok(_) => {
            return Err(format!(
            "no promotion record of term {} names it: whether its agent demotes itself is unknown",
            record.term
        ))
        }
        Err(e) => return Err(format!("the promotion record of term {}: {e}", record.term)),
    }
    let now = topo::now_ms();
    // The latest of the replicas' "lost it since": the rule's window runs from the last answer.
    let lost_since = fresh
        .statuses
        .iter()
        .filter(|(a, _)| a.as_str() != old_primary)
        .filter_map(|(_, h)| h.primary_probe.as_ref())
        .filter(|p| p.primary_alias == old_primary && !p.reachable && p.failing_since_ms > 0)
        .map(|p| p.failing_since_ms)
        .max()
        .unwrap_or(now);
    // Its agent must have been alive (registered) when the replicas lost it: one already gone
    // (a dead agent, P17) runs no rule, and its mysqld may still take writes.
    match ctx.deps.registrations.last_seen(old_primary) {
        Some(seen) if seen >= lost_since => {}
        seen => {
            return Err(format!(
                "its registration was last seen {}, before the replicas lost it ({lost_since} ms): its agent was already gone, so nothing demotes it",
                seen.map_or("never".to_string(), |s| format!("at {s} ms"))
            ))
        }
    }
    let ready_ms =
        lost_since + (topo::SELF_DEMOTE_PEER_WINDOW + SELF_DEMOTION_MARGIN).as_millis() as u64;
    let waited = Instant::now();
    let bound = ctx.cfg().self_demotion_wait;
    loop {
        let registered = topo.get_tablet(old_primary).await;
        let now = topo::now_ms();
        let gone = matches!(registered, Ok(None));
        if gone && now >= ready_ms {
            return Ok(format!(
                "taken as fenced by its own agent: its registration lease expired and no replica has reached it for {} ms (the isolation rule demotes a primary before its lease runs out once no other tablet answers it for {} ms); waited {} ms for that",
                now.saturating_sub(lost_since),
                topo::SELF_DEMOTE_PEER_WINDOW.as_millis(),
                waited.elapsed().as_millis()
            ));
        }
        if waited.elapsed() >= bound {
            let missing = match registered {
                Ok(Some(_)) => "its registration is still in etcd (its agent still renews its lease: it may reach etcd and still take writes)".to_string(),
                Ok(None) => format!("the replicas lost it only {} ms ago", now.saturating_sub(lost_since)),
                Err(e) => format!("its registration cannot be read: {e}"),
            };
            return Err(format!(
                "after waiting {} ms (recovery.self_demotion_wait): {missing}",
                bound.as_millis()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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

/// The errant-check reference when this orchestrator never saw the dead primary healthy (it just
/// started, P7): the shard's own history. During term T only its primary writes, so beyond the
/// position the term started from, a transaction written by another server is errant. Audited
/// either way, with what the check rests on.
async fn history_reference(
    ctx: &RecoveryContext,
    record: &ShardRecord,
    old_primary: &str,
    answering: &BTreeMap<String, pb::Health>,
) -> Option<Reference> {
    let flavor = answering.values().next().map(analysis::flavor_of)?;
    let got = ctx
        .deps
        .topo
        .get_promotion(&ctx.keyspace, &ctx.shard, record.term)
        .await;
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
    ctx.audit("errant_check", Some(old_primary), OUTCOME_OK, detail, None);
    reference
}

/// Stops the IO thread and returns the replica's status with its final positions: (alias, IO
/// thread stopped, status if usable). Applied and received positions come from the action's
/// answer; `FullStatus` is only asked when the stop failed (a replica that then does not answer
/// is left out).
async fn stop_io(
    ctx: &RecoveryContext,
    alias: String,
    before: pb::Health,
) -> (String, bool, Option<pb::Health>) {
    let status = match ctx.stop_replication(&alias, true).await {
        Ok(r) => {
            let mut h = before;
            if let Some(m) = h.mysql.as_mut() {
                m.gtid_position = r.gtid_position;
            }
            if let Some(rep) = h.replication.as_mut() {
                rep.gtid_io_pos = r.gtid_received;
            }
            return (alias, true, Some(h));
        }
        Err(_) => ctx.full_status(&alias).await,
    };
    match status {
        Ok(h) if h.mysql_reachable => (alias, false, Some(h)),
        Ok(h) => {
            ctx.record_step(
                "read_position",
                Some(&alias),
                false,
                format!("mysqld unreachable: {}", h.mysql_error),
                Duration::ZERO,
            );
            (alias, false, None)
        }
        Err(e) => {
            ctx.record_step(
                "read_position",
                Some(&alias),
                false,
                e.to_string(),
                Duration::ZERO,
            );
            (alias, false, None)
        }
    }
}

/// Best effort after a refusal: the replicas follow the old primary again should it return.
async fn restart_io(ctx: &RecoveryContext, aliases: &[String]) {
    futures::future::join_all(aliases.iter().map(|a| ctx.start_replication(a, true))).await;
}

/// Points the candidate at the most advanced tablet, waits for the target, stops replication.
async fn catch_up(
    ctx: &RecoveryContext,
    choice: &Choice,
    source: &str,
) -> Result<(), RecoveryError> {
    let src = ctx.tablet(source)?.clone();
    ctx.set_replication_source("catch_up_from", &choice.candidate, &src, false, true)
        .await?;
    ctx.wait_for_position(
        "catch_up",
        &choice.candidate,
        &choice.target_position,
        ctx.cfg().catch_up_timeout,
    )
    .await?;
    ctx.stop_replication(&choice.candidate, false).await?;
    Ok(())
}

/// Catch-up failed: promote the most advanced tablet instead, unless it is `must_not`.
fn fallback(
    ctx: &RecoveryContext,
    choice: &Choice,
    source: &str,
    cands: &[Candidate],
    err: &RecoveryError,
) -> Result<Choice, RecoveryError> {
    let src = cands.iter().find(|c| c.alias == source);
    match src {
        Some(c) if c.rule != PromotionRule::MustNot => {
            let detail = format!(
                "catch-up of {} from {source} failed ({err}): promoting {source}, the most advanced, instead",
                choice.candidate
            );
            ctx.record_step(
                "catch_up_fallback",
                Some(source),
                true,
                detail.clone(),
                Duration::ZERO,
            );
            Ok(Choice {
                candidate: source.to_string(),
                catch_up_from: None,
                target_position: choice.target_position.clone(),
                others: cands
                    .iter()
                    .filter(|c| c.alias != source)
                    .map(|c| c.alias.clone())
                    .collect(),
                reason: detail,
            })
        }
        _ => {
            let why = format!(
                "catch-up of {} from {source} failed ({err}) and {source} has promotion rule must_not: refusing to promote a tablet missing transactions",
                choice.candidate
            );
            Err(ctx.refuse("catch_up_fallback", Some(source), why))
        }
    }
}

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
