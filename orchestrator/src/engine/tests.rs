use super::*;

fn p(code: ProblemCode, tablet: Option<&str>) -> Problem {
    Problem {
        code,
        tablet: tablet.map(str::to_string),
        detail: format!("{} seen", code.as_str()),
    }
}

fn open_gate() -> Gate {
    Gate {
        synced: true,
        config_enabled: true,
        disabled: None,
        flapping: None,
        durability_known: true,
        running: false,
        settling: false,
        primary_suspect: None,
        replica_grace: Duration::from_millis(500),
        mark_grace: Duration::from_secs(5),
    }
}

#[test]
fn urgency_follows_the_rules() {
    use ProblemCode as P;
    let order = [
        P::DeadPrimary,
        P::DeadPrimaryAndSomeReplicas,
        P::NoPrimary,
        P::StaleTabletClaimingPrimary,
        P::ErrantGtid,
        P::PrimaryReplicating,
        P::PrimaryReadOnly,
        P::PrimarySemiSyncMustNotBeSet,
        P::ReplicaWritable,
        P::ReplicaWrongSource,
        P::ReplicaNotReplicating,
        P::ReplicaSemiSyncMustBeSet,
        P::ReplicaSemiSyncMustNotBeSet,
        P::PrimarySemiSyncMustBeSet,
    ];
    let ranks: Vec<u8> = order
        .iter()
        .map(|c| urgency(*c).expect("actionable"))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
    // Semi-sync: replica side before primary side when enabling, primary first when disabling.
    assert!(urgency(P::ReplicaSemiSyncMustBeSet) < urgency(P::PrimarySemiSyncMustBeSet));
    assert!(urgency(P::PrimarySemiSyncMustNotBeSet) < urgency(P::ReplicaSemiSyncMustNotBeSet));
    for c in [
        P::DeadPrimaryAndAllReplicas,
        P::UnreachablePrimary,
        P::ReplicaMysqlUnreachable,
        P::ReplicaAgentUnreachable,
        P::Quarantined,
    ] {
        assert_eq!(urgency(c), None, "{c:?} is reported only");
        assert!(!recoverable(c));
        assert!(!c.actionable(), "{c:?}: analysis agrees");
    }
    for c in order {
        assert!(c.actionable(), "{c:?}: analysis agrees it is actionable");
    }
}

#[test]
fn most_urgent_picks_the_dead_primary_first() {
    use ProblemCode as P;
    let problems = vec![
        p(P::Quarantined, Some("zone1-104")),
        p(P::ReplicaAgentUnreachable, Some("zone1-103")),
        p(P::DeadPrimaryAndSomeReplicas, Some("zone1-101")),
    ];
    assert_eq!(
        most_urgent(&problems).map(|p| p.code),
        Some(P::DeadPrimaryAndSomeReplicas)
    );
    // Reported-only problems are never picked.
    let problems = vec![
        p(P::UnreachablePrimary, Some("zone1-101")),
        p(P::DeadPrimaryAndAllReplicas, Some("zone1-101")),
        p(P::ReplicaMysqlUnreachable, Some("zone1-102")),
    ];
    assert_eq!(most_urgent(&problems), None);
    // Among recoverable ones the rank decides, not the order.
    let mut problems: Vec<Problem> = [P::PrimarySemiSyncMustBeSet, P::ReplicaSemiSyncMustBeSet]
        .into_iter()
        .map(|c| p(c, Some("zone1-102")))
        .collect();
    problems.push(p(P::DeadPrimary, Some("zone1-101")));
    assert_eq!(most_urgent(&problems).map(|p| p.code), Some(P::DeadPrimary));
    let repairs: Vec<Problem> = [P::PrimarySemiSyncMustBeSet, P::ReplicaSemiSyncMustBeSet]
        .into_iter()
        .map(|c| p(c, Some("zone1-102")))
        .collect();
    assert_eq!(
        most_urgent(&repairs).map(|p| p.code),
        Some(P::ReplicaSemiSyncMustBeSet),
        "replica side first"
    );
}

#[test]
fn decide_recovers_when_nothing_stands_in_the_way() {
    let now = Instant::now();
    let problems = vec![p(ProblemCode::DeadPrimary, Some("zone1-101"))];
    assert_eq!(
        decide(&problems, None, &open_gate(), now),
        Decision::Recover(problems[0].clone())
    );
    assert_eq!(decide(&[], None, &open_gate(), now), Decision::Nothing);
    let reported = vec![p(ProblemCode::UnreachablePrimary, Some("zone1-101"))];
    assert_eq!(
        decide(&reported, None, &open_gate(), now),
        Decision::Nothing
    );
}

#[test]
fn decide_skips_with_reasons_recorded_once_and_waits_silently() {
    let now = Instant::now();
    let problems = vec![p(ProblemCode::DeadPrimary, Some("zone1-101"))];
    let wait = |g: Gate, ep: Option<&Episode>| match decide(&problems, ep, &g, now) {
        Decision::Wait { reason, record, .. } => (reason, record),
        other => panic!("expected a wait, got {other:?}"),
    };
    let (r, rec) = wait(
        Gate {
            running: true,
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("running") && !rec, "{r}");
    let (r, rec) = wait(
        Gate {
            synced: false,
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("not current") && !rec, "{r}");
    let (r, rec) = wait(
        Gate {
            config_enabled: false,
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("enabled = false") && rec, "{r}");
    let (r, rec) = wait(
        Gate {
            disabled: Some("recoveries disabled globally by bob".into()),
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("bob") && rec, "{r}");
    let (r, rec) = wait(
        Gate {
            flapping: Some("shard ks/0 is flapping: ... ack".into()),
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("flapping") && rec, "{r}");
    let (r, rec) = wait(
        Gate {
            durability_known: false,
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("durability unknown") && rec, "{r}");
    let (r, rec) = wait(
        Gate {
            settling: true,
            ..open_gate()
        },
        None,
    );
    assert!(r.contains("snapshot") && !rec, "{r}");
    // Backoff after unsuccessful attempts.
    let mut ep = Episode::new(now);
    ep.failures = 2;
    ep.retry_at = Some(now + Duration::from_millis(500));
    let (r, rec) = wait(open_gate(), Some(&ep));
    assert!(r.contains("retrying in 500 ms after 2") && !rec, "{r}");
    ep.retry_at = Some(now);
    assert!(matches!(
        decide(&problems, Some(&ep), &open_gate(), now),
        Decision::Recover(_)
    ));
}

#[test]
fn backoff_doubles_up_to_the_max() {
    let (min, max) = (Duration::from_millis(250), Duration::from_secs(5));
    let got: Vec<u64> = (1..=7)
        .map(|n| backoff(n, min, max).as_millis() as u64)
        .collect();
    assert_eq!(got, [250, 500, 1000, 2000, 4000, 5000, 5000]);
    assert_eq!(backoff(0, min, max), min);
    assert_eq!(backoff(u32::MAX, min, max), max);
}

#[test]
fn episodes_of_an_unseen_primary_share_one_key() {
    use ProblemCode as P;
    let k = episode_key(&p(P::UnreachablePrimary, Some("zone1-101")));
    for c in [
        P::DeadPrimary,
        P::DeadPrimaryAndSomeReplicas,
        P::DeadPrimaryAndAllReplicas,
    ] {
        assert_eq!(episode_key(&p(c, Some("zone1-101"))), k);
    }
    assert_ne!(episode_key(&p(P::DeadPrimary, Some("zone1-102"))), k);
    assert_ne!(
        episode_key(&p(P::ReplicaWritable, Some("zone1-102"))),
        episode_key(&p(P::ReplicaNotReplicating, Some("zone1-102")))
    );
    assert_eq!(episode_key(&p(P::NoPrimary, None)), "no_primary:");
}

#[test]
fn the_same_problem_survives_a_variant_change_of_a_dead_primary() {
    use ProblemCode as P;
    let wanted = p(P::DeadPrimaryAndSomeReplicas, Some("zone1-101"));
    let now = vec![p(P::DeadPrimary, Some("zone1-101"))];
    assert_eq!(
        recovery::same_problem(&wanted, &now).map(|p| p.code),
        Some(P::DeadPrimary)
    );
    let gone = vec![p(P::UnreachablePrimary, Some("zone1-101"))];
    assert_eq!(recovery::same_problem(&wanted, &gone), None);
    let other = vec![p(P::DeadPrimary, Some("zone1-102"))];
    assert_eq!(recovery::same_problem(&wanted, &other), None);
    let wanted = p(P::ReplicaWritable, Some("zone1-102"));
    assert!(recovery::same_problem(&wanted, &[p(P::ReplicaWritable, Some("zone1-102"))]).is_some());
    assert!(recovery::same_problem(&wanted, &[p(P::ReplicaWritable, Some("zone1-103"))]).is_none());
}

#[test]
fn a_suspect_primary_holds_everything_but_the_dead_primary_recovery() {
    let now = Instant::now();
    let gate = Gate {
        primary_suspect: Some("zone1-102 cannot reach zone1-101".into()),
        ..open_gate()
    };
    let dead = vec![p(ProblemCode::DeadPrimary, Some("zone1-101"))];
    assert!(matches!(
        decide(&dead, None, &gate, now),
        Decision::Recover(_)
    ));
    let replica = vec![p(ProblemCode::ReplicaNotReplicating, Some("zone1-102"))];
    if recoverable(ProblemCode::ReplicaNotReplicating) {
        match decide(&replica, None, &gate, now) {
            Decision::Wait { reason, record, .. } => {
                assert!(reason.contains("suspect") && !record, "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Stopped replication is repaired only once it lasted the grace period.
        let mut ep = Episode::new(now);
        match decide(
            &replica,
            Some(&ep),
            &open_gate(),
            now + Duration::from_millis(100),
        ) {
            Decision::Wait { reason, .. } => {
                assert!(reason.contains("repaired after 500 ms"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        ep.first_seen = now;
        assert!(matches!(
            decide(
                &replica,
                Some(&ep),
                &open_gate(),
                now + Duration::from_millis(500)
            ),
            Decision::Recover(_)
        ));
    }
}

#[test]
fn the_primary_is_suspect_when_a_replica_probe_fails() {
    use crate::analysis::{ShardInput, TabletInput};
    use myha_proto::agent as pb;
    use tabletwatch::testing::{primary_health, replica_health, shard_record, tablet_record};
    let now_ms = 1_000_000;
    let tin = |alias: &str, h: pb::Health| TabletInput {
        record: Arc::new(tablet_record(alias, "ks", "0")),
        health: Some(Arc::new(h)),
        health_age: Some(Duration::from_millis(10)),
        stream_connected: true,
        position: None,
    };
    let probe = |reachable: bool, at: u64| pb::PrimaryProbe {
        primary_alias: "zone1-101".into(),
        reachable,
        error: if reachable { "" } else { "Connection refused" }.into(),
        probed_at_ms: at,
        ..Default::default()
    };
    let mut r2 = replica_health("zone1-102", 1, None);
    r2.primary_probe = Some(probe(true, now_ms - 20));
    let mut r3 = replica_health("zone1-103", 1, None);
    r3.primary_probe = Some(probe(true, now_ms - 20));
    let mut input = ShardInput {
        keyspace: "ks".into(),
        shard: "0".into(),
        record: Some(Arc::new(shard_record("ks", "0", Some("zone1-101"), 1))),
        durability: topo::Durability::SemiSync,
        tablets: vec![
            tin("zone1-101", primary_health("zone1-101", 1)),
            tin("zone1-102", r2),
            tin("zone1-103", r3),
        ],
        quarantined: Default::default(),
        now_ms,
    };
    let cfg = analysis::AnalysisConfig::default();
    assert_eq!(primary_suspect(&input, &cfg), None);
    input.tablets[2]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .unwrap()
        .primary_probe = Some(probe(false, now_ms - 20));
    let why = primary_suspect(&input, &cfg).expect("suspect");
    assert!(
        why.contains("zone1-103") && why.contains("Connection refused"),
        "{why}"
    );
    // A stale probe says nothing.
    input.tablets[2]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .unwrap()
        .primary_probe = Some(probe(false, now_ms - 5_000));
    assert_eq!(primary_suspect(&input, &cfg), None);
}

#[test]
fn a_reparent_mark_is_left_alone_for_the_lock_ttl_then_checked_under_the_lock() {
    let now = Instant::now();
    let gate = open_gate();
    let marked = vec![p(ProblemCode::ReparentInProgress, None)];
    assert!(recoverable(ProblemCode::ReparentInProgress));
    // Just seen: an operation holds the lock and clears it soon.
    let ep = Episode::new(now - Duration::from_millis(300));
    match decide(&marked, Some(&ep), &gate, now) {
        Decision::Wait { reason, record, .. } => {
            assert!(
                reason.contains("reparent is in progress") && !record,
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Not seen before at all: also a wait.
    assert!(matches!(
        decide(&marked, None, &gate, now),
        Decision::Wait { .. }
    ));
    // Left for longer than the lock TTL: take the lock and look (a stale mark is cleared).
    let ep = Episode::new(now - Duration::from_secs(6));
    assert_eq!(
        decide(&marked, Some(&ep), &gate, now),
        Decision::Recover(marked[0].clone())
    );
    // A dead primary still goes first.
    let both = vec![
        p(ProblemCode::ReparentInProgress, None),
        p(ProblemCode::DeadPrimary, Some("zone1-101")),
    ];
    assert!(matches!(
        decide(&both, Some(&ep), &gate, now),
        Decision::Recover(Problem {
            code: ProblemCode::DeadPrimary,
            ..
        })
    ));
}

#[test]
fn what_a_reparent_in_flight_repoints_itself_gets_the_replica_grace() {
    let now = Instant::now();
    let gate = open_gate();
    for code in [
        ProblemCode::ReplicaNotReplicating,
        ProblemCode::ReplicaWrongSource,
        ProblemCode::StaleTabletClaimingPrimary,
    ] {
        let problems = vec![p(code, Some("zone1-101"))];
        let young = Episode::new(now - Duration::from_millis(100));
        match decide(&problems, Some(&young), &gate, now) {
            Decision::Wait { reason, record, .. } => {
                assert!(
                    reason.contains("repaired after 500 ms") && !record,
                    "{reason}"
                )
            }
            other => panic!("{code:?}: {other:?}"),
        }
        let old = Episode::new(now - Duration::from_millis(600));
        assert!(
            matches!(
                decide(&problems, Some(&old), &gate, now),
                Decision::Recover(_)
            ),
            "{code:?}"
        );
    }
    // Not the others (a writable replica is fixed at once).
    let problems = vec![p(ProblemCode::ReplicaWritable, Some("zone1-102"))];
    let young = Episode::new(now);
    assert!(matches!(
        decide(&problems, Some(&young), &gate, now),
        Decision::Recover(_)
    ));
}

/// A shard whose record names no primary, one tablet registered and not yet heard from.
fn no_primary_snapshot(now: Instant) -> Arc<FleetSnapshot> {
    use tabletwatch::{StreamState, TabletView};
    let record = tabletwatch::testing::tablet_record("zone1-101", "ks", "0");
    let tablet = TabletView {
        record: Arc::new(record),
        last_health: None,
        stream: StreamState::Connecting {
            since: now,
            since_ms: 1_000,
            failures: 0,
            last_error: None,
        },
        quarantine: None,
    };
    let view = ShardView {
        keyspace: "ks".into(),
        shard: "0".into(),
        record: Some(Arc::new(topo::ShardRecord::new("ks", "0"))),
        tablets: [("zone1-101".to_string(), tablet)].into(),
    };
    Arc::new(FleetSnapshot {
        version: 1,
        taken_at: now,
        topo_synced: true,
        shards: [(("ks".to_string(), "0".to_string()), Arc::new(view))].into(),
    })
}

fn evaluate(
    e: &mut Engine,
    snap: &Arc<FleetSnapshot>,
    ctl: &ControlState,
    now: Instant,
) -> Vec<Effect> {
    e.handle(
        Input::Evaluate {
            snapshot: snap.clone(),
            control: Arc::new(ctl.clone()),
            now_ms: 1_000,
        },
        now,
    )
}

/// An engine with the default configuration and options, and its tick.
fn test_engine() -> (Engine, Duration) {
    let opts = EngineOptions::default();
    let tick = opts.tick;
    let e = Engine::new(
        Arc::new(RecoveryConfig::default()),
        Arc::from("orchestrator@test:1"),
        opts,
    );
    (e, tick)
}

#[test]
fn the_core_returns_its_effects_audits_a_skip_once_and_starts_one_recovery() {
    let (mut e, tick) = test_engine();
    assert_eq!(
        e.poll_timeout(),
        None,
        "no timeout before the first evaluation"
    );
    let t0 = Instant::now();
    let snap = no_primary_snapshot(t0);
    // Durability unknown: the recovery is skipped, said once in the audit.
    let mut ctl = ControlState {
        synced: true,
        ..ControlState::default()
    };
    let fx = evaluate(&mut e, &snap, &ctl, t0);
    let skips: Vec<&AuditEntry> = fx
        .iter()
        .filter_map(|f| match f {
            Effect::AppendAudit { entry, .. } => Some(entry),
            _ => None,
        })
        .collect();
    assert_eq!(skips.len(), 1, "{fx:?}");
    assert_eq!(skips[0].outcome, recovery::OUTCOME_SKIPPED);
    assert!(
        skips[0].detail.contains("durability unknown"),
        "{}",
        skips[0].detail
    );
    assert!(fx
        .iter()
        .any(|f| matches!(f, Effect::LoadAudit { term, .. } if term.is_zero())));
    assert!(fx
        .iter()
        .any(|f| matches!(f, Effect::WarmAgent(t) if t.alias == "zone1-101")));
    assert!(matches!(fx.last(), Some(Effect::Publish(v)) if v.shards[0].waiting.is_some()));
    assert!(!fx.iter().any(|f| matches!(f, Effect::StartRecovery(_))));
    // A shard with a problem is looked at again within a tick.
    let wake = e.poll_timeout().expect("a timeout");
    assert!(wake > t0 && wake <= t0 + tick, "{:?}", wake - t0);

    // Woken again: the skip is not audited twice, the audit read is not asked twice.
    let fx = evaluate(&mut e, &snap, &ctl, wake);
    assert!(
        !fx.iter()
            .any(|f| matches!(f, Effect::AppendAudit { .. } | Effect::LoadAudit { .. })),
        "{fx:?}"
    );
    // The audit read comes back empty: no flapping. Folding it in asks for nothing.
    let fx = e.handle(
        Input::Audit {
            keyspace: "ks".into(),
            shard: "0".into(),
            term: Term::ZERO,
            result: Ok(Vec::new()),
        },
        wake,
    );
    assert!(fx.is_empty(), "{fx:?}");

    // Durability known: one recovery is started, and only one while it runs.
    ctl.keyspaces
        .insert("ks".into(), topo::Durability::SemiSync);
    let t1 = wake + tick;
    let fx = evaluate(&mut e, &snap, &ctl, t1);
    let jobs: Vec<&Job> = fx
        .iter()
        .filter_map(|f| match f {
            Effect::StartRecovery(j) => Some(j),
            _ => None,
        })
        .collect();
    assert_eq!(jobs.len(), 1, "{fx:?}");
    assert_eq!(jobs[0].problem.code, ProblemCode::NoPrimary);
    let fx = evaluate(&mut e, &snap, &ctl, t1 + tick);
    assert!(
        !fx.iter().any(|f| matches!(f, Effect::StartRecovery(_))),
        "{fx:?}"
    );
    assert!(matches!(fx.last(), Some(Effect::Publish(v)) if v.shards[0].recovery.is_some()));
}

/// A healthy shard `ks/<n>`: a primary and a replica, each heard from at `at`.
fn healthy_view(n: &str, at: Instant) -> Arc<ShardView> {
    use tabletwatch::testing::*;
    let (p, r) = (format!("zone1-{n}01"), format!("zone1-{n}02"));
    let primary = tablet_record(&p, "ks", n);
    let mut rh = replica_health(&r, 1, Some(0));
    if let Some(rep) = rh.replication.as_mut() {
        rep.source_host = primary.mysql_host.clone();
        rep.source_port = u32::from(primary.mysql_port);
    }
    Arc::new(shard(
        "ks",
        n,
        Some(shard_record("ks", n, Some(&p), 1)),
        vec![
            tablet(primary, Some(primary_health(&p, 1)), at),
            tablet(tablet_record(&r, "ks", n), Some(rh), at),
        ],
    ))
}

fn fleet(version: u64, at: Instant, views: &[&Arc<ShardView>]) -> Arc<FleetSnapshot> {
    Arc::new(FleetSnapshot {
        version,
        taken_at: at,
        topo_synced: true,
        shards: views
            .iter()
            .map(|v| ((v.keyspace.clone(), v.shard.clone()), Arc::clone(v)))
            .collect(),
    })
}

fn published(fx: &[Effect]) -> Option<&EngineView> {
    fx.iter().find_map(|f| match f {
        Effect::Publish(v) => Some(v),
        _ => None,
    })
}

/// Issue 11, point 6: an evaluation analyses only the shards whose view changed (by `Arc`)
/// or fell due, and publishes a view only when a status changed or a tick passed; an
/// unchanged status keeps its `Arc` in the published view.
#[test]
fn evaluations_analyse_only_changed_shards() {
    let (mut e, tick) = test_engine();
    let t0 = Instant::now();
    let ctl = Arc::new(ControlState {
        synced: true,
        keyspaces: [("ks".to_string(), topo::Durability::None)].into(),
        ..ControlState::default()
    });
    let eval = |e: &mut Engine, snap: &Arc<FleetSnapshot>, now: Instant| {
        e.handle(
            Input::Evaluate {
                snapshot: snap.clone(),
                control: ctl.clone(),
                now_ms: 1_000,
            },
            now,
        )
    };
    let (a, b, c) = (
        healthy_view("1", t0),
        healthy_view("2", t0),
        healthy_view("3", t0),
    );
    let fx = eval(&mut e, &fleet(1, t0, &[&a, &b, &c]), t0);
    assert_eq!(e.analyses(), 3);
    let v1 = published(&fx)
        .expect("the first evaluation publishes")
        .clone();
    assert_eq!(v1.shards.len(), 3);
    assert!(v1.shards.iter().all(|s| s.problems.is_empty()), "{v1:?}");
    // Each shard's audit log is read (for flapping); the answers make them due again.
    for f in &fx {
        if let Effect::LoadAudit {
            keyspace,
            shard,
            term,
        } = f
        {
            e.handle(
                Input::Audit {
                    keyspace: keyspace.clone(),
                    shard: shard.clone(),
                    term: *term,
                    result: Ok(Vec::new()),
                },
                t0,
            );
        }
    }
    let t1 = t0 + Duration::from_millis(5);
    let fx = eval(&mut e, &fleet(2, t1, &[&a, &b, &c]), t1);
    assert_eq!(e.analyses(), 6, "{fx:?}");
    assert!(
        published(&fx).is_none(),
        "the statuses are unchanged: {fx:?}"
    );

    // A new snapshot with the same views: nothing analysed, nothing warmed, no publication
    // before the tick.
    let t1 = t0 + Duration::from_millis(10);
    let fx = eval(&mut e, &fleet(3, t1, &[&a, &b, &c]), t1);
    assert_eq!(e.analyses(), 6, "{fx:?}");
    assert!(fx.is_empty(), "{fx:?}");

    // Shard 2's replica stops being heard from (a new view): only it is analysed, and the
    // view published shows its problem beside the other shards' unchanged statuses.
    let t2 = t0 + Duration::from_millis(20);
    let mut b2 = (*b).clone();
    if let Some(t) = b2.tablets.get_mut("zone1-202") {
        t.stream = tabletwatch::StreamState::Connecting {
            since: t2,
            since_ms: 1_000,
            failures: 1,
            last_error: Some("reset".into()),
        };
    }
    let b2 = Arc::new(b2);
    let fx = eval(&mut e, &fleet(4, t2, &[&a, &b2, &c]), t2);
    assert_eq!(e.analyses(), 7);
    let v3 = published(&fx).expect("a changed status is published");
    let s2 = v3.shard("ks", "2").expect("shard 2");
    assert!(
        s2.problems
            .iter()
            .any(|p| p.code == ProblemCode::ReplicaAgentUnreachable),
        "{:?}",
        s2.problems
    );
    assert!(Arc::ptr_eq(&v1.shards[0], &v3.shards[0]));
    assert!(Arc::ptr_eq(&v1.shards[2], &v3.shards[2]));
    assert!(!Arc::ptr_eq(&v1.shards[1], &v3.shards[1]));

    // Shard 3 goes away: the rest is analysed again once and the view has two shards.
    let t3 = t0 + Duration::from_millis(30);
    let fx = eval(&mut e, &fleet(5, t3, &[&a, &b2]), t3);
    assert_eq!(e.analyses(), 9);
    let v4 = published(&fx).expect("a shard gone is published");
    assert_eq!(v4.shards.len(), 2);

    // Past the tick the shard with a problem falls due (its problem's age matters) and the
    // view is published again for its time; the healthy shard is not analysed.
    let t4 = t3 + tick + Duration::from_millis(1);
    let fx = eval(&mut e, &fleet(6, t4, &[&a, &b2]), t4);
    assert_eq!(e.analyses(), 10, "{fx:?}");
    assert!(published(&fx).is_some());
}
