//! The emergency reparent's step machine driven by scripted replies: the order of its calls,
//! the term each carries, and what is undone on each exit path.

use super::*;
use crate::analysis::ShardInput;
use myha_proto::agent::{MysqlStatus, PrimaryProbe, Replication};
use std::collections::VecDeque;
use std::sync::Arc;
use tabletwatch::testing::tablet_record;

const OLD: &str = "zone1-101";
const R2: &str = "zone1-102";
const R3: &str = "zone1-103";
const WALL0: u64 = 10_000_000;

fn replica(alias: &str, applied: &str, received: &str, lost_since_ms: u64) -> pb::Health {
    pb::Health {
        alias: alias.into(),
        mysql_reachable: true,
        mysql: Some(MysqlStatus {
            gtid_position: applied.into(),
            server_id: 102,
            flavor: "mariadb".into(),
            read_only: true,
            ..Default::default()
        }),
        // Replicating until the primary died: the SQL thread runs, the IO thread reconnects.
        replication: Some(Replication {
            configured: true,
            gtid_io_pos: received.into(),
            io_state: pb::ThreadState::Connecting as i32,
            sql_state: pb::ThreadState::Running as i32,
            ..Default::default()
        }),
        primary_probe: Some(PrimaryProbe {
            primary_alias: OLD.into(),
            addr: "127.0.0.1:3401".into(),
            reachable: false,
            failing_since_ms: lost_since_ms,
            ..Default::default()
        }),
        term: 5,
        etcd_connected: true,
        ..Default::default()
    }
}

/// Primary 101 dead (its agent unseen) at term 5; 102 received more than 103.
fn input(durability: Durability) -> EmergencyInput {
    let mut record = ShardRecord::new("ks", "0");
    record.primary = Some(OLD.into());
    record.term = Term::new(5);
    record.reserved_term = Term::new(5);
    let tablets: BTreeMap<String, TabletRecord> = [OLD, R2, R3]
        .iter()
        .map(|a| (a.to_string(), tablet_record(a, "ks", "0")))
        .collect();
    let lost = WALL0 - 10_000;
    let statuses: BTreeMap<String, pb::Health> = [
        (R2.to_string(), replica(R2, "0-101-10", "0-101-12", lost)),
        (R3.to_string(), replica(R3, "0-101-9", "0-101-9", lost)),
    ]
    .into();
    let fresh = FreshShard {
        record: Some(record.clone()),
        record_revision: 7,
        durability,
        tablets,
        statuses,
        unseen: [(OLD.to_string(), "connection refused".to_string())].into(),
        input: ShardInput {
            keyspace: "ks".into(),
            shard: "0".into(),
            record: Some(Arc::new(record)),
            durability,
            tablets: Vec::new(),
            quarantined: BTreeMap::new(),
            now_ms: WALL0,
        },
        problems: Vec::new(),
        unreadable: Vec::new(),
    };
    EmergencyInput {
        fresh,
        last_primary: Some(PrimaryPosition {
            alias: OLD.into(),
            term: Term::new(5),
            gtid_position: "0-101-12".into(),
            writer: "101".into(),
            flavor: "mariadb",
            seen_ms: WALL0 - 20_000,
        }),
        action_term: Term::new(5),
        cfg: RecoveryConfig::default(),
    }
}

fn ok(position: &str) -> Reply {
    Reply::Action(Ok(pb::ActionResponse {
        gtid_position: position.into(),
        gtid_received: position.into(),
        ..Default::default()
    }))
}

fn timeout(tablet: &str) -> RecoveryError {
    RecoveryError::AgentTimeout {
        rpc: "test",
        tablet: tablet.into(),
        after: Duration::from_secs(1),
    }
}

/// The default answer: every call succeeds (an IO stop answers the replica's own positions).
fn success(call: &Call) -> Reply {
    match call {
        Call::Agent {
            tablet,
            action: AgentAction::StopReplication { io_only: true },
            ..
        } => match tablet.as_str() {
            R2 => Reply::Action(Ok(pb::ActionResponse {
                gtid_position: "0-101-10".into(),
                gtid_received: "0-101-12".into(),
                ..Default::default()
            })),
            _ => Reply::Action(Ok(pb::ActionResponse {
                gtid_position: "0-101-9".into(),
                gtid_received: "0-101-9".into(),
                ..Default::default()
            })),
        },
        Call::Agent { .. } => ok("0-101-12"),
        Call::Status { tablet } => Reply::Status(Err(timeout(tablet))),
        Call::WriteShardRecord { .. } => Reply::Written(Ok(8)),
        Call::GetPromotion(_) => Reply::Promotion(Ok(None)),
        Call::GetTablet(_) => Reply::Tablet(Ok(None)),
        Call::RegistrationLastSeen(_) => Reply::LastSeen(Some(WALL0)),
        Call::Quarantine { .. } => Reply::Quarantined(Ok(())),
        Call::Sleep(_) => Reply::Slept,
    }
}

/// Every call succeeds except the agent actions `fails` picks, which time out.
fn failing(fails: impl Fn(&AgentAction) -> bool) -> impl FnMut(&Call) -> Reply {
    move |c| match c {
        Call::Agent { tablet, action, .. } if fails(action) => Reply::Action(Err(timeout(tablet))),
        c => success(c),
    }
}

struct Run {
    result: Result<Done, RecoveryError>,
    calls: Vec<Call>,
    steps: Vec<(String, bool, String)>,
    cancelled: usize,
}

/// Answers calls in the order they were made, 1 ms apart.
fn run(mut m: Emergency, mut answer: impl FnMut(&Call) -> Reply) -> Run {
    let mut now = Now {
        since_start: Duration::ZERO,
        wall_ms: WALL0,
    };
    let mut queue: VecDeque<(CallId, Call)> = VecDeque::new();
    let mut calls = Vec::new();
    let mut steps = Vec::new();
    let mut cancelled = 0;
    let mut actions = m.start(now);
    for _ in 0..10_000 {
        for a in actions.drain(..) {
            match a {
                Action::Call(id, c) => {
                    calls.push(c.clone());
                    queue.push_back((id, c));
                }
                Action::Cancel(id) => {
                    cancelled += 1;
                    queue.retain(|(i, _)| *i != id);
                }
                Action::Record {
                    name, ok, detail, ..
                } => steps.push((name.to_string(), ok, detail)),
                Action::Audit { .. } | Action::Phase(..) => {}
                Action::Done(result) => {
                    return Run {
                        result,
                        calls,
                        steps,
                        cancelled,
                    }
                }
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

fn agent_calls(calls: &[Call]) -> Vec<(String, Term, String)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Agent {
                tablet,
                term,
                action,
            } => {
                let kind = format!("{action:?}");
                let kind = kind.split([' ', '{', '(']).next().unwrap_or("").to_string();
                Some((tablet.clone(), *term, kind))
            }
            _ => None,
        })
        .collect()
}

fn has(calls: &[(String, Term, String)], tablet: &str, kind: &str) -> bool {
    calls.iter().any(|(t, _, k)| t == tablet && k == kind)
}

#[test]
fn reserves_the_term_then_stops_applies_promotes_records_and_repoints() {
    let r = run(
        Emergency::new(input(Durability::SemiSync), EmergencyOptions::default()),
        success,
    );
    let done = r.result.expect("recovered");
    assert_eq!(done.new_term, Some(Term::new(6)));
    assert_eq!(done.new_primary.as_deref(), Some(R2), "{}", done.detail);
    // The reservation is the first call: the record keeps its primary and term.
    match &r.calls[0] {
        Call::WriteShardRecord { record, term, .. } => {
            assert_eq!(record.primary.as_deref(), Some(OLD));
            assert_eq!(record.term, Term::new(5));
            assert_eq!(record.reserved_term, Term::new(6));
            assert_eq!(*term, Term::new(5));
        }
        c => panic!("first call {c:?}"),
    }
    let agents = agent_calls(&r.calls);
    assert!(
        agents.iter().all(|(_, t, _)| *t == Term::new(6)),
        "every agent action after the reservation carries the new term: {agents:?}"
    );
    let kinds: Vec<&str> = agents.iter().map(|(_, _, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "StopReplication",
            "StopReplication",
            "ApplyReceived",
            "Promote",
            "SetReplicationSource",
            "FenceServer"
        ],
        "{agents:?}"
    );
    assert!(
        has(&agents, R2, "ApplyReceived"),
        "the candidate applies what it received"
    );
    assert!(has(&agents, R3, "SetReplicationSource"));
    // The record written after the promotion names the new primary at the new term.
    let last_write = r
        .calls
        .iter()
        .rev()
        .find_map(|c| match c {
            Call::WriteShardRecord { record, .. } => Some(record.clone()),
            _ => None,
        })
        .expect("record written");
    assert_eq!(last_write.primary.as_deref(), Some(R2));
    assert_eq!(last_write.term, Term::new(6));
    assert!(
        !agents.iter().any(|(_, _, k)| k == "StartReplication"),
        "nothing undone"
    );
}

#[test]
fn an_unreached_replica_refuses_and_only_what_was_stopped_is_restarted() {
    let r = run(
        Emergency::new(input(Durability::SemiSync), EmergencyOptions::default()),
        |c| match c {
            Call::Agent {
                tablet,
                action: AgentAction::StopReplication { .. },
                ..
            } if tablet == R3 => Reply::Action(Err(timeout(R3))),
            c => success(c),
        },
    );
    let e = r.result.expect_err("refused");
    assert!(e.to_string().contains("not reached: zone1-103"), "{e}");
    let agents = agent_calls(&r.calls);
    assert!(has(&agents, R2, "StartReplication"), "{agents:?}");
    assert!(!has(&agents, R3, "StartReplication"), "{agents:?}");
    assert!(!agents.iter().any(|(_, _, k)| k == "Promote"));
    assert!(r.steps.iter().any(|(n, ok, _)| n == "revocation" && !ok));
}

#[test]
fn a_relay_log_not_applied_in_time_refuses_and_restarts_every_stopped_replica() {
    let r = run(
        Emergency::new(input(Durability::SemiSync), EmergencyOptions::default()),
        failing(|a| matches!(a, AgentAction::ApplyReceived { .. })),
    );
    let e = r.result.expect_err("refused");
    assert!(e.to_string().contains("relay_log_wait"), "{e}");
    let agents = agent_calls(&r.calls);
    assert!(has(&agents, R2, "StartReplication") && has(&agents, R3, "StartReplication"));
    assert!(!agents.iter().any(|(_, _, k)| k == "Promote"));
}

#[test]
fn a_refusal_leaves_the_io_thread_stopped_where_the_sql_thread_is_not_running() {
    // 103's SQL thread stopped on an error: starting its IO thread again would discard its
    // relay log (MariaDB GTID), possibly the only copy of acknowledged writes.
    let mut input = input(Durability::SemiSync);
    if let Some(rep) = input
        .fresh
        .statuses
        .get_mut(R3)
        .and_then(|h| h.replication.as_mut())
    {
        rep.sql_state = pb::ThreadState::Stopped as i32;
        rep.last_sql_error = "Error 1950: out-of-order sequence number".into();
    }
    let r = run(
        Emergency::new(input, EmergencyOptions::default()),
        failing(|a| matches!(a, AgentAction::ApplyReceived { .. })),
    );
    assert!(r.result.is_err());
    let agents = agent_calls(&r.calls);
    assert!(has(&agents, R2, "StartReplication"), "{agents:?}");
    assert!(!has(&agents, R3, "StartReplication"), "{agents:?}");
    assert!(
        r.steps
            .iter()
            .any(|(n, ok, d)| n == "restart_io" && !ok && d.contains("relay log")),
        "{:?}",
        r.steps
    );
}

#[test]
fn a_quarantined_replica_that_received_more_than_every_candidate_refuses() {
    // 103 is quarantined (errant) and received 0-101-15, beyond 102's 0-101-12: under
    // semi-sync it may hold the only copy of what it acknowledged.
    // A fourth tablet, 104, so that 102 keeps an acker without 103.
    let mut input = input(Durability::SemiSync);
    let r4 = "zone1-104";
    input
        .fresh
        .tablets
        .insert(r4.into(), tablet_record(r4, "ks", "0"));
    input
        .fresh
        .statuses
        .insert(r4.into(), replica(r4, "0-101-9", "0-101-9", WALL0 - 10_000));
    input
        .fresh
        .input
        .quarantined
        .insert(R3.into(), "errant transactions 0-103-4".into());
    let r = run(
        Emergency::new(input, EmergencyOptions::default()),
        |c| match c {
            Call::Agent {
                tablet,
                action: AgentAction::StopReplication { io_only: true },
                ..
            } if tablet == R3 => Reply::Action(Ok(pb::ActionResponse {
                gtid_position: "0-103-4".into(),
                gtid_received: "0-101-15".into(),
                ..Default::default()
            })),
            c => success(c),
        },
    );
    let e = r.result.expect_err("refused");
    assert!(e.to_string().contains("zone1-103 received 0-101-15"), "{e}");
    let agents = agent_calls(&r.calls);
    assert!(!agents.iter().any(|(_, _, k)| k == "Promote"), "{agents:?}");
}

#[test]
fn nothing_is_undone_once_the_promotion_was_sent() {
    let r = run(
        Emergency::new(input(Durability::SemiSync), EmergencyOptions::default()),
        failing(|a| matches!(a, AgentAction::Promote)),
    );
    assert!(r.result.is_err());
    let agents = agent_calls(&r.calls);
    assert_eq!(
        agents.last().map(|a| a.2.as_str()),
        Some("Promote"),
        "{agents:?}"
    );
    assert!(
        !r.calls
            .iter()
            .skip(1)
            .any(|c| matches!(c, Call::WriteShardRecord { .. })),
        "no record names a primary whose promotion is unknown"
    );
}

#[test]
fn a_failed_reservation_changes_nothing() {
    let r = run(
        Emergency::new(input(Durability::SemiSync), EmergencyOptions::default()),
        |c| match c {
            Call::WriteShardRecord { .. } => {
                Reply::Written(Err(RecoveryError::Failed("lock lost".into())))
            }
            c => success(c),
        },
    );
    assert!(r.result.is_err());
    assert!(agent_calls(&r.calls).is_empty(), "{:?}", r.calls);
}

#[test]
fn durability_none_fences_first_and_a_fence_that_wins_cancels_the_wait() {
    let r = run(
        Emergency::new(input(Durability::None), EmergencyOptions::default()),
        success,
    );
    r.result.expect("recovered");
    let agents = agent_calls(&r.calls);
    let fence = agents
        .iter()
        .position(|a| a.2 == "FenceServer")
        .expect("fenced");
    let promote = agents
        .iter()
        .position(|a| a.2 == "Promote")
        .expect("promoted");
    assert!(fence < promote, "{agents:?}");
    assert_eq!(r.cancelled, 1, "the self-demotion wait is dropped");
}

#[test]
fn durability_none_relies_on_self_demotion_when_the_fence_fails() {
    let mut reads = 0;
    let r = run(
        Emergency::new(input(Durability::None), EmergencyOptions::default()),
        |c| match c {
            Call::Agent {
                action: AgentAction::FenceServer { .. },
                tablet,
                ..
            } => Reply::Action(Err(timeout(tablet))),
            Call::GetPromotion(t) => Reply::Promotion(Ok(Some(PromotionRecord {
                keyspace: "ks".into(),
                shard: "0".into(),
                term: *t,
                primary: OLD.into(),
                position: "0-101-1".into(),
                writer: "101".into(),
                at_ms: 0,
                by: "test".into(),
                lock_epoch: 1,
                self_demotes: true,
            }))),
            // Still registered twice, then its lease expires.
            Call::GetTablet(a) => {
                reads += 1;
                if reads <= 2 {
                    Reply::Tablet(Ok(Some(tablet_record(a, "ks", "0"))))
                } else {
                    Reply::Tablet(Ok(None))
                }
            }
            c => success(c),
        },
    );
    r.result.expect("recovered");
    let fenced = r
        .steps
        .iter()
        .find(|(n, _, _)| n == "fence_old_primary")
        .expect("fence step");
    assert!(
        fenced.1 && fenced.2.contains("taken as fenced by its own agent"),
        "{fenced:?}"
    );
    assert!(
        r.calls
            .iter()
            .filter(|c| matches!(c, Call::Sleep(_)))
            .count()
            == 2
    );
}

#[test]
fn durability_none_refuses_when_neither_fence_nor_self_demotion_holds() {
    let r = run(
        Emergency::new(input(Durability::None), EmergencyOptions::default()),
        failing(|a| matches!(a, AgentAction::FenceServer { .. })),
    );
    let e = r.result.expect_err("refused");
    let text = e.to_string();
    assert!(
        text.contains("two writable primaries") && text.contains("no promotion record"),
        "{text}"
    );
    let agents = agent_calls(&r.calls);
    assert!(!agents.iter().any(|a| a.2 == "Promote"));
    assert!(has(&agents, R2, "StartReplication") && has(&agents, R3, "StartReplication"));
}

#[test]
fn a_replica_restarted_after_the_primary_was_lost_cannot_vouch_for_what_it_acknowledged() {
    let mut i = input(Durability::SemiSync);
    if let Some(m) = i.fresh.statuses.get_mut(R3).and_then(|h| h.mysql.as_mut()) {
        // Restarted 1 s ago; the primary was last seen healthy 20 s ago.
        m.started_at_ms = WALL0 - 1_000;
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    let e = r.result.expect_err("refused");
    let text = e.to_string();
    assert!(
        text.contains("not reached: zone1-103 (its mysqld restarted")
            && text.contains("nothing was changed"),
        "{text}"
    );
    assert!(agent_calls(&r.calls).is_empty(), "refused before acting");

    // One that restarted long before the primary was lost is reached like any other.
    let mut i = input(Durability::SemiSync);
    if let Some(m) = i.fresh.statuses.get_mut(R3).and_then(|h| h.mysql.as_mut()) {
        m.started_at_ms = WALL0 - 100_000;
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    r.result.expect("recovered");

    // Nor one whose outage began while the primary was still alive (P8): the primary went on
    // sending to the others what its relay log lost.
    let mut i = input(Durability::SemiSync);
    if let Some(h) = i.fresh.statuses.get_mut(R3) {
        h.mysqld_outage_started_ms = WALL0 - 30_000;
        if let Some(m) = h.mysql.as_mut() {
            m.started_at_ms = WALL0 - 1_000;
        }
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    r.result.expect("recovered");

    // But when no other replica received what the primary held when it was last seen, the
    // primary did not live on long enough to send the others what that relay log lost: the
    // replica went down just before the primary did (found by the simulator, seed 379).
    let mut i = input(Durability::SemiSync);
    if let Some(h) = i.fresh.statuses.get_mut(R3) {
        h.mysqld_outage_started_ms = WALL0 - 21_000;
        if let Some(m) = h.mysql.as_mut() {
            m.started_at_ms = WALL0 - 1_000;
        }
    }
    if let Some(r) = i
        .fresh
        .statuses
        .get_mut(R2)
        .and_then(|h| h.replication.as_mut())
    {
        r.gtid_io_pos = "0-101-11".into();
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    let text = r.result.expect_err("refused").to_string();
    assert!(
        text.contains("not reached: zone1-103 (its mysqld restarted")
            && text.contains("no other replica received"),
        "{text}"
    );

    // A sighting within the clock margin of the outage does not count as after it, even when
    // another replica holds that position: the hosts' clocks may disagree by that much.
    let mut i = input(Durability::SemiSync);
    if let Some(h) = i.fresh.statuses.get_mut(R3) {
        h.mysqld_outage_started_ms = WALL0 - 20_100;
        if let Some(m) = h.mysql.as_mut() {
            m.started_at_ms = WALL0 - 1_000;
        }
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    r.result.expect_err("refused within the margin");
    // This orchestrator last saw the primary an hour ago, but the replicas' probes reached it
    // until 10 s ago: a replica restarted for maintenance half an hour ago is reached.
    let mut i = input(Durability::SemiSync);
    if let Some(p) = i.last_primary.as_mut() {
        p.seen_ms = WALL0 - 3_600_000;
    }
    if let Some(h) = i.fresh.statuses.get_mut(R3) {
        h.mysqld_outage_started_ms = WALL0 - 1_800_000;
        if let Some(m) = h.mysql.as_mut() {
            m.started_at_ms = WALL0 - 1_799_000;
        }
    }
    let r = run(Emergency::new(i, EmergencyOptions::default()), success);
    r.result.expect("recovered");
}
