use super::*;
use topo::Term;

const NOW_MS: u64 = 1_000_000;

fn record(alias: &str, cell: &str, port: u16, rule: PromotionRule) -> TabletRecord {
    TabletRecord {
        alias: alias.into(),
        cell: cell.into(),
        uid: topo::parse_alias(alias).map(|(_, u)| u).unwrap_or(0),
        keyspace: "ks".into(),
        shard: "0".into(),
        tablet_type: topo::TabletType::Replica,
        mysql_host: "127.0.0.1".into(),
        mysql_port: port,
        mysql_socket: None,
        grpc_addr: String::new(),
        http_addr: None,
        promotion_rule: rule,
        registered_ms: 0,
    }
}

fn port(alias: &str) -> u16 {
    4000 + topo::parse_alias(alias).map(|(_, u)| u as u16).unwrap_or(0)
}

fn primary_health(alias: &str, pos: &str) -> pb::Health {
    pb::Health {
        alias: alias.into(),
        mysql_reachable: true,
        mysql: Some(pb::MysqlStatus {
            server_id: topo::parse_alias(alias).map(|(_, u)| u).unwrap_or(0),
            flavor: "mariadb".into(),
            read_only: false,
            gtid_position: pos.into(),
            ..Default::default()
        }),
        replication: Some(pb::Replication::default()),
        semi_sync: Some(pb::SemiSync {
            primary_enabled: true,
            primary_active: true,
            primary_clients: 2,
            wait_point: "AFTER_SYNC".into(),
            primary_timeout_ms: 30 * 24 * 3600 * 1000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn replica_health(alias: &str, primary: &str, pos: &str, probe_ok: Option<bool>) -> pb::Health {
    pb::Health {
        alias: alias.into(),
        mysql_reachable: true,
        mysql: Some(pb::MysqlStatus {
            server_id: topo::parse_alias(alias).map(|(_, u)| u).unwrap_or(0),
            flavor: "mariadb".into(),
            read_only: true,
            gtid_position: pos.into(),
            ..Default::default()
        }),
        replication: Some(pb::Replication {
            configured: true,
            source_host: "127.0.0.1".into(),
            source_port: port(primary).into(),
            io_state: pb::ThreadState::Running as i32,
            sql_state: pb::ThreadState::Running as i32,
            ..Default::default()
        }),
        semi_sync: Some(pb::SemiSync {
            replica_enabled: true,
            ..Default::default()
        }),
        primary_probe: probe_ok.map(|ok| pb::PrimaryProbe {
            primary_alias: primary.into(),
            reachable: ok,
            error: if ok {
                String::new()
            } else {
                "Connection refused".into()
            },
            probed_at_ms: NOW_MS - 50,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tablet(alias: &str, h: Option<pb::Health>) -> TabletInput {
    TabletInput {
        record: Arc::new(record(alias, "zone1", port(alias), PromotionRule::Neutral)),
        health_age: h.as_ref().map(|_| Duration::from_millis(50)),
        stream_connected: h.is_some(),
        health: h.map(Arc::new),
        position: None,
    }
}

/// The health of tablet `i`, to change it in place.
fn health_mut(s: &mut ShardInput, i: usize) -> &mut pb::Health {
    s.tablets[i]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .expect("the tablet has health")
}

fn shard(primary: Option<&str>, tablets: Vec<TabletInput>) -> ShardInput {
    let mut rec = ShardRecord::new("ks", "0");
    rec.primary = primary.map(str::to_string);
    rec.term = if primary.is_some() {
        Term::new(3)
    } else {
        Term::ZERO
    };
    ShardInput {
        keyspace: "ks".into(),
        shard: "0".into(),
        record: Some(Arc::new(rec)),
        durability: Durability::SemiSync,
        tablets,
        quarantined: BTreeMap::new(),
        now_ms: NOW_MS,
    }
}

fn healthy() -> ShardInput {
    shard(
        Some("z-1"),
        vec![
            tablet("z-1", Some(primary_health("z-1", "0-1-10"))),
            tablet(
                "z-2",
                Some(replica_health("z-2", "z-1", "0-1-10", Some(true))),
            ),
            tablet(
                "z-3",
                Some(replica_health("z-3", "z-1", "0-1-9", Some(true))),
            ),
        ],
    )
}

fn codes(s: &ShardInput) -> Vec<(ProblemCode, Option<String>)> {
    analyze(s, &AnalysisConfig::default())
        .into_iter()
        .map(|p| (p.code, p.tablet))
        .collect()
}

#[test]
fn a_healthy_shard_has_no_problem() {
    assert_eq!(codes(&healthy()), vec![]);
}

#[test]
fn dead_primary_needs_every_reachable_replica_to_confirm() {
    let mut s = healthy();
    // Primary's agent says mysqld is down.
    health_mut(&mut s, 0).mysql_reachable = false;
    // Replicas still reach it: not dead (the orchestrator's view alone is not enough).
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::UnreachablePrimary, "{p:?}");
    assert!(p[0].detail.contains("z-2"), "{}", p[0].detail);
    // One replica confirms, one has not probed yet: wait.
    s.tablets[1] = tablet(
        "z-2",
        Some(replica_health("z-2", "z-1", "0-1-10", Some(false))),
    );
    s.tablets[2] = tablet("z-3", Some(replica_health("z-3", "z-1", "0-1-9", None)));
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::UnreachablePrimary);
    assert!(p[0].detail.contains("waiting"), "{}", p[0].detail);
    // Both confirm.
    s.tablets[2] = tablet(
        "z-3",
        Some(replica_health("z-3", "z-1", "0-1-9", Some(false))),
    );
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::DeadPrimary, "{p:?}");
    assert!(p[0].detail.contains("confirmed by z-2"), "{}", p[0].detail);
}

#[test]
fn a_stale_probe_does_not_confirm() {
    let mut s = healthy();
    s.tablets[0].stream_connected = false;
    for i in [1, 2] {
        let mut h = replica_health(&format!("z-{}", i + 1), "z-1", "0-1-9", Some(false));
        h.primary_probe.as_mut().unwrap().probed_at_ms = NOW_MS - 10_000;
        s.tablets[i] = tablet(&format!("z-{}", i + 1), Some(h));
    }
    assert_eq!(codes(&s)[0].0, ProblemCode::UnreachablePrimary);
}

/// P20: the primary's agent reaches it (it is seen), each replica's probe fails; `lag_ms` per
/// replica (`None`: unknown).
fn cut_off(lags: [Option<u64>; 2]) -> ShardInput {
    let mut s = healthy();
    health_mut(&mut s, 0).etcd_connected = true;
    for (i, lag) in [1, 2].into_iter().zip(lags) {
        let alias = format!("z-{}", i + 1);
        let mut h = replica_health(&alias, "z-1", "0-1-9", Some(false));
        h.primary_probe.as_mut().unwrap().failing_since_ms = NOW_MS - 1200;
        h.lag_ms = lag;
        s.tablets[i] = tablet(&alias, Some(h));
    }
    s
}

/// Tablet `i`'s probe of the primary.
fn probe_mut(s: &mut ShardInput, i: usize) -> &mut pb::PrimaryProbe {
    s.tablets[i]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .and_then(|h| h.primary_probe.as_mut())
        .expect("a probe")
}

#[test]
fn a_primary_every_replica_has_lost_is_isolated() {
    let p = analyze(
        &cut_off([Some(1500), Some(1200)]),
        &AnalysisConfig::default(),
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::IsolatedPrimary);
    assert!(p[0].code.actionable());
    assert!(
        p[0].detail.contains("z-2") && p[0].detail.contains("no heartbeat for 1500 ms"),
        "{}",
        p[0].detail
    );
    // An IO thread that is not running counts as lost, whatever the lag says.
    let mut s = cut_off([Some(1500), Some(100)]);
    health_mut(&mut s, 2).replication.as_mut().unwrap().io_state =
        pb::ThreadState::Connecting as i32;
    assert_eq!(codes(&s)[0].0, ProblemCode::IsolatedPrimary);
}

#[test]
fn isolation_needs_every_replica_to_have_lost_the_primary_for_the_bound() {
    // One replica still gets the heartbeat (its probe failed once): not isolated.
    assert_eq!(codes(&cut_off([Some(1500), Some(150)])), vec![]);
    // Lag unknown with the IO thread running: not isolated.
    assert_eq!(codes(&cut_off([Some(1500), None])), vec![]);
    // A probe that has failed only for a moment (a loaded host): not isolated.
    let mut s = cut_off([Some(1500), Some(1500)]);
    probe_mut(&mut s, 2).failing_since_ms = NOW_MS - 300;
    assert_eq!(codes(&s), vec![]);
    // One replica's probe reaches the primary: not isolated, however high the lags.
    let mut s = cut_off([Some(5000), Some(5000)]);
    probe_mut(&mut s, 2).reachable = true;
    assert!(!codes(&s)
        .iter()
        .any(|(c, _)| *c == ProblemCode::IsolatedPrimary));
    // Under durability none its agent must reach etcd to fence it: else reported only.
    let mut s = cut_off([Some(1500), Some(1500)]);
    s.durability = Durability::None;
    health_mut(&mut s, 0).etcd_connected = false;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::UnreachablePrimary, "{p:?}");
    assert!(p[0].detail.contains("durability none"), "{}", p[0].detail);
}

/// Found by the simulator: with one replica's agent unseen (or its mysqld down), the replicas
/// that confirm may be the isolated ones. Failing over to one of them moved the primary onto
/// the host cut off from everyone, losing what the healthy primary had (durability none) or
/// flapping through three reparents for one failure.
#[test]
fn isolation_is_not_concluded_while_a_replica_cannot_give_its_view() {
    let isolated = |s: &ShardInput| {
        codes(s)
            .iter()
            .any(|(c, _)| *c == ProblemCode::IsolatedPrimary)
    };
    assert!(isolated(&cut_off([Some(1500), Some(1500)])));
    // z-3's agent is unseen: it may still reach the primary.
    let mut s = cut_off([Some(1500), Some(1500)]);
    s.tablets[2].stream_connected = false;
    assert!(!isolated(&s), "{:?}", codes(&s));
    // z-3's mysqld is down: z-2 alone cannot tell its own isolation from the primary's.
    let mut s = cut_off([Some(1500), Some(1500)]);
    let h = health_mut(&mut s, 2);
    h.mysql_reachable = false;
    h.mysql_error = "Connection refused".into();
    assert!(!isolated(&s), "{:?}", codes(&s));
    // A quarantined replica has no say.
    let mut s = cut_off([Some(1500), Some(1500)]);
    s.tablets[2].stream_connected = false;
    s.quarantined.insert("z-3".into(), "errant".into());
    assert!(isolated(&s), "{:?}", codes(&s));
}

#[test]
fn a_primary_whose_writes_block_is_reported_with_what_blocks_them() {
    let mut s = healthy();
    let h = health_mut(&mut s, 0);
    h.write_stalled_ms = 1900;
    h.write_blocked_by = "Waiting for global read lock".into();
    assert_eq!(codes(&s), vec![], "below the bound");
    let h = health_mut(&mut s, 0);
    h.write_stalled_ms = 8000;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::PrimaryWritesStalled);
    assert!(
        !p[0].code.actionable(),
        "reported, never a failover by default"
    );
    assert!(
        p[0].detail.contains("8000 ms") && p[0].detail.contains("Waiting for global read lock"),
        "{}",
        p[0].detail
    );
}

#[test]
fn a_stall_is_failed_over_only_when_opted_in_and_past_its_bound() {
    let mut s = healthy();
    let h = health_mut(&mut s, 0);
    h.write_stalled_ms = 8000;
    h.write_blocked_by = "Waiting for backup lock".into();
    let cfg = AnalysisConfig {
        stalled_failover_after: Some(Duration::from_secs(10)),
        ..AnalysisConfig::default()
    };
    let p = analyze(&s, &cfg);
    assert_eq!(
        p[0].code,
        ProblemCode::PrimaryWritesStalled,
        "below the bound: {p:?}"
    );
    health_mut(&mut s, 0).write_stalled_ms = 10_000;
    let p = analyze(&s, &cfg);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::StalledPrimary);
    assert!(p[0].code.actionable());
    assert!(
        crate::engine::recoverable(p[0].code),
        "an emergency reparent recovers it"
    );
    assert!(
        p[0].detail.contains("Waiting for backup lock")
            && p[0].detail.contains("failover_on_writes_stalled (10s)"),
        "{}",
        p[0].detail
    );
    // The default config never fails over on a stall, however long.
    health_mut(&mut s, 0).write_stalled_ms = 3_600_000;
    assert_eq!(
        analyze(&s, &AnalysisConfig::default())[0].code,
        ProblemCode::PrimaryWritesStalled
    );
}

#[test]
fn semi_sync_drift_on_the_primary_is_reported() {
    let mut s = healthy();
    let ss = health_mut(&mut s, 0).semi_sync.as_mut().unwrap();
    ss.primary_clients = 0;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::PrimarySemiSyncNoAckers);
    assert!(
        p[0].detail.contains("every commit waits"),
        "{}",
        p[0].detail
    );
    let ss = health_mut(&mut s, 0).semi_sync.as_mut().unwrap();
    ss.primary_clients = 2;
    ss.primary_active = false;
    ss.primary_no_tx = 7;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::PrimarySemiSyncFellBack, "{p:?}");
    assert!(p[0].detail.contains("7 commits"), "{}", p[0].detail);
    assert!(!p[0].code.actionable());
}

#[test]
fn primary_agent_down_but_mysqld_alive_is_not_dead() {
    // P5: the primary's agent died; replicas' probes reach its mysqld.
    let mut s = healthy();
    s.tablets[0] = tablet("z-1", None);
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].code, ProblemCode::UnreachablePrimary);
    assert!(!p[0].code.actionable());
    assert!(p[0].detail.contains("stream is down"), "{}", p[0].detail);
}

#[test]
fn host_loss_is_dead_and_lost_replicas_are_counted() {
    // P2: primary's agent and mysqld gone; P8: one replica gone too.
    let mut s = healthy();
    s.tablets.remove(0);
    s.tablets[0] = tablet(
        "z-2",
        Some(replica_health("z-2", "z-1", "0-1-10", Some(false))),
    );
    s.tablets[1] = tablet(
        "z-3",
        Some(replica_health("z-3", "z-1", "0-1-9", Some(false))),
    );
    assert_eq!(codes(&s)[0].0, ProblemCode::DeadPrimary);
    s.tablets[1].stream_connected = false;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::DeadPrimaryAndSomeReplicas, "{p:?}");
    s.tablets[0].stream_connected = false;
    assert_eq!(codes(&s)[0].0, ProblemCode::DeadPrimaryAndAllReplicas);
}

#[test]
fn repairs_are_detected() {
    let mut s = healthy();
    health_mut(&mut s, 0).mysql.as_mut().unwrap().read_only = true;
    health_mut(&mut s, 1).mysql.as_mut().unwrap().read_only = false;
    health_mut(&mut s, 2).replication.as_mut().unwrap().io_state = pb::ThreadState::Stopped as i32;
    let c = codes(&s);
    assert!(
        c.contains(&(ProblemCode::PrimaryReadOnly, Some("z-1".into()))),
        "{c:?}"
    );
    assert!(
        c.contains(&(ProblemCode::ReplicaWritable, Some("z-2".into()))),
        "{c:?}"
    );
    assert!(
        c.contains(&(ProblemCode::ReplicaNotReplicating, Some("z-3".into()))),
        "{c:?}"
    );

    let mut s = healthy();
    health_mut(&mut s, 1)
        .replication
        .as_mut()
        .unwrap()
        .source_port = port("z-3").into();
    health_mut(&mut s, 0).replication = Some(pb::Replication {
        configured: true,
        source_host: "127.0.0.1".into(),
        source_port: port("z-2").into(),
        ..Default::default()
    });
    let c = codes(&s);
    assert!(
        c.contains(&(ProblemCode::ReplicaWrongSource, Some("z-2".into()))),
        "{c:?}"
    );
    assert!(
        c.contains(&(ProblemCode::PrimaryReplicating, Some("z-1".into()))),
        "{c:?}"
    );
}

#[test]
fn semi_sync_replicas_first_then_primary() {
    let mut s = healthy();
    health_mut(&mut s, 0)
        .semi_sync
        .as_mut()
        .unwrap()
        .primary_enabled = false;
    for i in [1, 2] {
        health_mut(&mut s, i)
            .semi_sync
            .as_mut()
            .unwrap()
            .replica_enabled = false;
    }
    let c = codes(&s);
    assert!(c.contains(&(ProblemCode::ReplicaSemiSyncMustBeSet, Some("z-2".into()))));
    assert!(
        !c.iter()
            .any(|(code, _)| *code == ProblemCode::PrimarySemiSyncMustBeSet),
        "primary side must wait for an acking replica: {c:?}"
    );
    health_mut(&mut s, 1)
        .semi_sync
        .as_mut()
        .unwrap()
        .replica_enabled = true;
    let c = codes(&s);
    assert!(
        c.contains(&(ProblemCode::PrimarySemiSyncMustBeSet, Some("z-1".into()))),
        "{c:?}"
    );
    // Not lossless: a short timeout could fall back to async.
    let mut s = healthy();
    health_mut(&mut s, 0)
        .semi_sync
        .as_mut()
        .unwrap()
        .primary_timeout_ms = 10_000;
    assert!(codes(&s).contains(&(ProblemCode::PrimarySemiSyncMustBeSet, Some("z-1".into()))));
    // Durability none: everything off.
    let mut s = healthy();
    s.durability = Durability::None;
    let c = codes(&s);
    assert!(c.contains(&(ProblemCode::PrimarySemiSyncMustNotBeSet, Some("z-1".into()))));
    assert!(c.contains(&(ProblemCode::ReplicaSemiSyncMustNotBeSet, Some("z-3".into()))));
}

#[test]
fn errant_and_stale_primary_claims() {
    let mut s = healthy();
    health_mut(&mut s, 2).mysql.as_mut().unwrap().gtid_position = "0-3-11".into();
    let p = analyze(&s, &AnalysisConfig::default());
    let e = p
        .iter()
        .find(|p| p.code == ProblemCode::ErrantGtid)
        .expect("errant");
    assert_eq!(e.tablet.as_deref(), Some("z-3"));
    assert!(e.detail.contains("0-3-11"), "{}", e.detail);
    // Ahead of a slightly older primary health with the primary's own transactions: not errant.
    let mut s = healthy();
    health_mut(&mut s, 1).mysql.as_mut().unwrap().gtid_position = "0-1-12".into();
    assert!(codes(&s).is_empty(), "{:?}", codes(&s));
    // An old primary from term 2 that is not replicating.
    let mut s = healthy();
    let h = health_mut(&mut s, 2);
    h.promoted_term = 2;
    h.replication = Some(pb::Replication::default());
    assert!(codes(&s).contains(&(ProblemCode::StaleTabletClaimingPrimary, Some("z-3".into()))));
}

#[test]
fn no_primary_is_reported() {
    let s = shard(
        None,
        vec![tablet("z-1", Some(replica_health("z-1", "z-9", "", None)))],
    );
    assert_eq!(codes(&s), vec![(ProblemCode::NoPrimary, None)]);
}

#[test]
fn quarantined_tablets_are_reported_and_skipped() {
    let mut s = healthy();
    health_mut(&mut s, 2).mysql.as_mut().unwrap().read_only = false;
    s.quarantined.insert("z-3".into(), "errant 0-3-11".into());
    assert_eq!(
        codes(&s),
        vec![(ProblemCode::Quarantined, Some("z-3".into()))]
    );
}

fn cand(alias: &str, cell: &str, rule: PromotionRule, pos: &str) -> Candidate {
    Candidate {
        alias: alias.into(),
        cell: cell.into(),
        rule,
        position: GtidSet::parse(Flavor::MariaDb, pos).unwrap(),
        applied: GtidSet::parse(Flavor::MariaDb, pos).unwrap(),
        errant: None,
    }
}

/// A candidate that received up to `held` and applied up to `applied`.
fn cand_unapplied(alias: &str, held: &str, applied: &str) -> Candidate {
    Candidate {
        applied: GtidSet::parse(Flavor::MariaDb, applied).unwrap(),
        ..cand(alias, "zone1", PromotionRule::Neutral, held)
    }
}

#[test]
fn candidates_rank_on_what_they_received_not_on_what_they_applied() {
    // P18: z-2 (delayed) received up to 8115 but applied 18; z-3 applied all it got, 1491.
    let c = vec![
        cand_unapplied("z-2", "0-101-8115", "0-101-18"),
        cand("z-3", "zone1", PromotionRule::Neutral, "0-101-1491"),
    ];
    let ch = choose_candidate(&c, Some("zone1"), Durability::SemiSync).unwrap();
    assert_eq!(ch.candidate, "z-2");
    assert_eq!(ch.catch_up_from, None);
    assert_eq!(ch.target_position, "0-101-8115");
}

#[test]
fn among_equals_the_one_with_less_to_apply_is_chosen() {
    let c = vec![
        cand_unapplied("z-2", "0-101-67", "0-101-65"),
        cand_unapplied("z-3", "0-101-67", "0-101-66"),
    ];
    let ch = choose_candidate(&c, Some("zone1"), Durability::SemiSync).unwrap();
    assert_eq!(ch.candidate, "z-3", "it finishes applying first");
    assert_eq!(ch.catch_up_from, None);
}

#[test]
fn candidate_is_the_most_advanced_clean_one() {
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Neutral, "0-1-9"),
        cand("z-3", "zone1", PromotionRule::Neutral, "0-1-10"),
    ];
    let ch = choose_candidate(&c, Some("zone1"), Durability::SemiSync).unwrap();
    assert_eq!(ch.candidate, "z-3");
    assert_eq!(ch.catch_up_from, None);
    assert_eq!(ch.others, vec!["z-2".to_string()]);
}

#[test]
fn errant_most_advanced_is_skipped() {
    let mut errant = cand("z-3", "zone1", PromotionRule::Neutral, "0-3-11");
    errant.errant = Some("0-3-11..11".into());
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Neutral, "0-1-10"),
        errant,
    ];
    let ch = choose_candidate(&c, None, Durability::None).unwrap();
    assert_eq!(ch.candidate, "z-2");
    assert_eq!(ch.catch_up_from, None, "an errant tablet is never a source");
}

#[test]
fn must_not_is_an_intermediate_source_only_and_prefer_wins() {
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Neutral, "0-1-9"),
        cand("z-3", "zone1", PromotionRule::MustNot, "0-1-10"),
    ];
    let ch = choose_candidate(&c, None, Durability::SemiSync).unwrap();
    assert_eq!(ch.candidate, "z-2");
    assert_eq!(ch.catch_up_from.as_deref(), Some("z-3"));
    assert_eq!(ch.target_position, "0-1-10");
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Prefer, "0-1-8"),
        cand("z-3", "zone1", PromotionRule::Neutral, "0-1-10"),
        cand("z-4", "zone2", PromotionRule::Neutral, "0-1-10"),
    ];
    let ch = choose_candidate(&c, Some("zone1"), Durability::SemiSync).unwrap();
    assert_eq!(
        (ch.candidate.as_str(), ch.catch_up_from.as_deref()),
        ("z-2", Some("z-3"))
    );
    // Without a preference, the old primary's cell wins among equals.
    let c = vec![
        cand("z-3", "zone2", PromotionRule::Neutral, "0-1-10"),
        cand("z-4", "zone1", PromotionRule::Neutral, "0-1-10"),
    ];
    assert_eq!(
        choose_candidate(&c, Some("zone1"), Durability::None)
            .unwrap()
            .candidate,
        "z-4"
    );
    // A `prefer` tablet in another cell beats a neutral one in the old primary's cell, as in a
    // planned reparent (`recovery::planned`'s `prefer_beats_lag_and_the_cell`).
    let c = vec![
        cand("z-3", "zone1", PromotionRule::Neutral, "0-1-10"),
        cand("z-4", "zone2", PromotionRule::Prefer, "0-1-10"),
    ];
    assert_eq!(
        choose_candidate(&c, Some("zone1"), Durability::None)
            .unwrap()
            .candidate,
        "z-4"
    );
}

#[test]
fn refusals_carry_reasons() {
    let c = vec![cand("z-2", "zone1", PromotionRule::Neutral, "0-1-10")];
    let e = choose_candidate(&c, None, Durability::SemiSync).unwrap_err();
    assert!(matches!(e, Refusal::Durability { .. }), "{e}");
    assert!(e.to_string().contains("semi_sync"), "{e}");
    assert!(choose_candidate(&c, None, Durability::None).is_ok());
    let c = vec![cand("z-2", "zone1", PromotionRule::MustNot, "0-1-10")];
    assert!(matches!(
        choose_candidate(&c, None, Durability::None),
        Err(Refusal::NoCandidate(_))
    ));
    assert!(matches!(
        choose_candidate(&[], None, Durability::None),
        Err(Refusal::NoCandidate(_))
    ));
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Neutral, "0-2-10"),
        cand("z-3", "zone1", PromotionRule::Neutral, "0-3-10"),
    ];
    assert!(matches!(
        choose_candidate(&c, None, Durability::None),
        Err(Refusal::Diverged(_))
    ));
}

#[test]
fn binlog_state_shows_what_positions_hide() {
    // The old primary wrote 0-101-40 unreplicated; the new primary wrote 0-102-40.. on top of
    // 0-101-39. Positions (0-101-40 vs 0-102-41) look like a subset; binlog states do not.
    let missing = binlog_state_missing("0-101-40", "0-101-39,0-102-41").unwrap();
    assert_eq!(missing, vec!["0-101-40".to_string()]);
    assert!(binlog_state_missing("0-101-39", "0-101-39,0-102-41")
        .unwrap()
        .is_empty());
    assert!(
        binlog_state_missing("0-101-39,0-103-5", "0-101-39,0-103-5,0-102-41")
            .unwrap()
            .is_empty()
    );
    assert!(binlog_state_missing("", "0-1-1").unwrap().is_empty());
    assert!(binlog_state_missing("0-x-1", "0-1-1").is_err());
}

#[test]
fn a_diverged_replica_is_reported_not_restarted() {
    let mut s = healthy();
    let r = health_mut(&mut s, 2).replication.as_mut().unwrap();
    r.io_state = pb::ThreadState::Stopped as i32;
    r.last_io_errno = 1236;
    r.last_io_error = "connecting slave requested to start from GTID 0-101-40, which is not in the master's binlog".into();
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::ErrantGtid);
    // Quarantined (out of reads and promotion), never restarted.
    assert!(p[0].code.actionable());
}

fn mark(s: &mut ShardInput, text: &str) {
    if let Some(r) = s.record.as_mut().map(Arc::make_mut) {
        r.reparent_in_progress = Some(text.into());
    }
}

#[test]
fn a_marked_reparent_holds_the_primary_and_replica_fixes() {
    let mut s = healthy();
    // Mid planned reparent: the primary demoted, the candidate promoted and writable, the
    // third replica stopped for its repoint.
    let h = |s: &mut ShardInput, i: usize| health_mut(s, i).clone();
    let mut p = h(&mut s, 0);
    p.mysql.as_mut().unwrap().read_only = true;
    s.tablets[0].health = Some(Arc::new(p));
    let mut c = h(&mut s, 1);
    c.mysql.as_mut().unwrap().read_only = false;
    c.replication = Some(pb::Replication::default());
    c.promoted_term = 4;
    s.tablets[1].health = Some(Arc::new(c));
    let mut r = h(&mut s, 2);
    r.replication.as_mut().unwrap().sql_state = pb::ThreadState::Stopped as i32;
    s.tablets[2].health = Some(Arc::new(r));
    // Unmarked, a promotion above the record's term is a record behind the tablets (X2).
    assert_eq!(codes(&s), vec![(ProblemCode::TermAheadOfRecord, None)]);
    let mut promoted_unmarked = s.clone();
    health_mut(&mut promoted_unmarked, 1).promoted_term = 0;
    let unmarked = codes(&promoted_unmarked);
    assert!(
        unmarked.contains(&(ProblemCode::PrimaryReadOnly, Some("z-1".into()))),
        "{unmarked:?}"
    );
    mark(&mut s, "planned reparent to z-2 by ops");
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(
        p.iter().map(|p| p.code).collect::<Vec<_>>(),
        vec![ProblemCode::ReparentInProgress],
        "{p:?}"
    );
    assert_eq!(p[0].tablet, None);
    assert!(
        p[0].detail.contains("planned reparent to z-2 by ops"),
        "{}",
        p[0].detail
    );
    for code in [
        ProblemCode::PrimaryReadOnly,
        ProblemCode::ReplicaWritable,
        ProblemCode::ReplicaWrongSource,
        ProblemCode::ReplicaNotReplicating,
        ProblemCode::StaleTabletClaimingPrimary,
    ] {
        assert!(code.facts().held_while_reparenting, "{code:?}");
    }
}

#[test]
fn a_marked_reparent_still_reports_a_dead_primary_and_what_needs_an_operator() {
    let mut s = healthy();
    mark(&mut s, "planned reparent to z-2 by ops");
    health_mut(&mut s, 0).mysql_reachable = false;
    for i in [1, 2] {
        s.tablets[i] = tablet(
            &format!("z-{}", i + 1),
            Some(replica_health(
                &format!("z-{}", i + 1),
                "z-1",
                "0-1-9",
                Some(false),
            )),
        );
    }
    let c = codes(&s);
    assert_eq!(c[0].0, ProblemCode::DeadPrimary, "{c:?}");
    assert!(
        c.contains(&(ProblemCode::ReparentInProgress, None)),
        "{c:?}"
    );
    // Reported-only problems stay visible.
    let mut s = healthy();
    mark(&mut s, "x");
    health_mut(&mut s, 2).mysql_reachable = false;
    let c = codes(&s);
    assert!(
        c.contains(&(ProblemCode::ReplicaMysqlUnreachable, Some("z-3".into()))),
        "{c:?}"
    );
    assert!(
        !ProblemCode::ReplicaMysqlUnreachable
            .facts()
            .held_while_reparenting
    );
    assert!(!ProblemCode::ErrantGtid.facts().held_while_reparenting);
    assert!(!ProblemCode::DeadPrimary.facts().held_while_reparenting);
}

#[test]
fn a_requested_candidate_is_caught_up_or_refused_with_the_reason() {
    let c = vec![
        cand("z-2", "zone1", PromotionRule::Neutral, "0-1-9"),
        cand("z-3", "zone1", PromotionRule::Neutral, "0-1-10"),
    ];
    // Behind the most advanced: promoted after catching up from it.
    let ch = choose_requested_candidate(&c, "z-2", None, Durability::SemiSync).unwrap();
    assert_eq!(ch.candidate, "z-2");
    assert_eq!(ch.catch_up_from.as_deref(), Some("z-3"));
    assert_eq!(ch.target_position, "0-1-10");
    assert_eq!(ch.others, vec!["z-3".to_string()]);
    assert!(ch.reason.contains("requested"), "{}", ch.reason);
    let ch = choose_requested_candidate(&c, "z-3", None, Durability::SemiSync).unwrap();
    assert_eq!(ch.catch_up_from, None);
    // Not among the answering candidates: the caller's reason is given.
    let e = choose_requested_candidate(&c, "z-4", Some("it is quarantined (x)"), Durability::None)
        .unwrap_err();
    assert!(
        e.to_string().contains("z-4") && e.to_string().contains("quarantined (x)"),
        "{e}"
    );
    // must_not and errant are refused.
    let mut must_not = c.clone();
    must_not[0].rule = PromotionRule::MustNot;
    let e = choose_requested_candidate(&must_not, "z-2", None, Durability::None).unwrap_err();
    assert!(e.to_string().contains("must_not"), "{e}");
    let mut errant = c.clone();
    errant[0].errant = Some("0-2-1".into());
    let e = choose_requested_candidate(&errant, "z-2", None, Durability::None).unwrap_err();
    assert!(e.to_string().contains("errant"), "{e}");
    // Alone under semi_sync: nobody could ack.
    let alone = vec![c[1].clone()];
    let e = choose_requested_candidate(&alone, "z-3", None, Durability::SemiSync).unwrap_err();
    assert!(matches!(e, Refusal::Durability { .. }), "{e}");
    assert!(choose_requested_candidate(&alone, "z-3", None, Durability::None).is_ok());
}

#[test]
fn a_term_the_record_does_not_account_for_holds_every_other_fix() {
    fn health(s: &mut ShardInput, i: usize) -> &mut pb::Health {
        s.tablets[i]
            .health
            .as_mut()
            .map(Arc::make_mut)
            .expect("health")
    }
    // A replica knows a term above the record's and above its reservation.
    let mut s = healthy();
    health(&mut s, 1).term = 5;
    // Something else is wrong too (a writable replica): held, only X2 is reported.
    health(&mut s, 2).mysql.as_mut().unwrap().read_only = false;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].code, ProblemCode::TermAheadOfRecord);
    assert!(p[0].detail.contains("z-2 knows term 5"), "{}", p[0].detail);
    assert!(p[0].code.actionable());
    // Within the reservation (a reparent acting under its reserved term): not news.
    if let Some(r) = s.record.as_mut().map(Arc::make_mut) {
        r.reserved_term = Term::new(5);
    }
    assert!(!codes(&s)
        .iter()
        .any(|(c, _)| *c == ProblemCode::TermAheadOfRecord));
    // A promotion above the record's term is, whatever the reservation.
    health(&mut s, 1).promoted_term = 4;
    let p = analyze(&s, &AnalysisConfig::default());
    assert_eq!(p[0].code, ProblemCode::TermAheadOfRecord);
    assert!(
        p[0].detail.contains("z-2 promoted under term 4"),
        "{}",
        p[0].detail
    );
}

#[test]
fn a_primary_that_would_not_wait_without_replicas_is_not_lossless() {
    let mut s = healthy();
    let semi = s.tablets[0]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .and_then(|h| h.semi_sync.as_mut())
        .expect("semi-sync status");
    semi.wait_no_replica = Some(false);
    let p = analyze(&s, &AnalysisConfig::default());
    let must = p
        .iter()
        .find(|p| p.code == ProblemCode::PrimarySemiSyncMustBeSet)
        .unwrap_or_else(|| panic!("{p:?}"));
    assert!(
        must.detail.contains("wait with no replica off"),
        "{}",
        must.detail
    );
    // Known on: lossless again.
    s.tablets[0]
        .health
        .as_mut()
        .map(Arc::make_mut)
        .and_then(|h| h.semi_sync.as_mut())
        .expect("semi-sync status")
        .wait_no_replica = Some(true);
    assert_eq!(codes(&s), vec![]);
}

#[test]
fn an_errant_transaction_behind_the_primarys_position_is_found_in_the_binlog_states() {
    let health = |state: &str| pb::Health {
        mysql: Some(pb::MysqlStatus {
            flavor: "mariadb".into(),
            gtid_binlog_state: state.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Replica 103 wrote 0-103-356; the primary has since written 0-101-360, so the positions
    // (0-103-356 against 0-101-360) look like a replica merely behind.
    let replica = health("0-101-355,0-103-356");
    let primary = health("0-101-360");
    assert_eq!(
        errant_in_binlog_state(&replica, &primary, "101").as_deref(),
        Some("0-103-356")
    );
    // What the primary wrote after its own health was taken is not errant.
    let ahead = health("0-101-365");
    assert_eq!(errant_in_binlog_state(&ahead, &primary, "101"), None);
    // Unknown states: no verdict.
    assert_eq!(errant_in_binlog_state(&health(""), &primary, "101"), None);
    assert_eq!(errant_in_binlog_state(&replica, &health(""), "101"), None);
}
