//! Primary failures (scenarios P1-P3, P5-P9, P11-P15 of the fault catalog) on real processes:
//! etcd, MariaDB, agents and orchestrators on loopback, each failover under the acknowledged-write
//! recorder ([`harness::Writer`]): zero acknowledged writes lost, and no ack from a deposed
//! primary after its successor's term began. Time bounds are generous; measured times are
//! printed, never asserted tightly.
//!
//! The tests share the machine with everything else: they run one at a time (`SERIAL`).

use std::sync::Arc;
use std::time::{Duration, Instant};
use topo::Term;

use harness::{Cluster, ClusterOptions, OrchestratorConfig, Writer};
use myha_tests::ha::*;
use topo::{LockInfo, PromotionRule, ShardRecord};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- P1 P2 P3: dead primary --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_primary_mysqld_killed() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    // Confirmed by the orchestrator and by both replicas before acting.
    let e = reparent_entry(&c, rec.term).await;
    assert!(
        e.detail.contains("confirmed by")
            && e.detail.contains(&alias_of(&c, 1))
            && e.detail.contains(&alias_of(&c, 2)),
        "the reparent was not confirmed by both replicas: {}",
        audit_line(&e)
    );
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_primary_host_lost_mysqld_and_agent_killed() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    c.tablet(0)
        .agent_proc()
        .unwrap()
        .kill()
        .expect("kill agent");
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    let e = reparent_entry(&c, rec.term).await;
    assert!(
        e.detail.contains("confirmed by"),
        "the reparent was not confirmed by the replicas: {}",
        audit_line(&e)
    );
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_primary_frozen_then_resumed_is_fenced_and_rejoins_or_is_quarantined() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().freeze().expect("SIGSTOP mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    let new_primary = c.tablet_by_alias(rec.primary.as_deref().unwrap()).unwrap();

    // Resume: the old primary must accept no write, its agent fences it (read-only).
    let resumed = Instant::now();
    c.tablet(0).mysqld().thaw().expect("SIGCONT mysqld");
    let fenced = wait_read_only(&c, c.tablet(0), "the resumed old primary read-only").await;
    println!(
        "old primary read-only {:.3} s after SIGCONT",
        fenced.as_secs_f64()
    );
    let direct = try_app_write(c.tablet(0), Duration::from_secs(3)).await;
    assert!(
        direct.is_err(),
        "the deposed primary acknowledged a write after its resume"
    );
    println!("a write on the resumed old primary: {direct:?}");

    expect_rejoin_or_quarantine(&c, c.tablet(0), new_primary, resumed).await;
    w.verify(&c).await;
}

// ---- P5 P6: the primary is fine, only the orchestrator cannot see it ---------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_only_the_primarys_agent_dies_no_failover() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let w = writer(&c).await;
    let p = alias_of(&c, 0);
    w.mark_fault();
    c.tablet(0)
        .agent_proc()
        .unwrap()
        .kill()
        .expect("kill agent");
    expect_no_failover_writes_continue(&c, &w, &p, Some("unreachable_primary")).await;
    // The agent comes back: the problem clears.
    c.tablet(0)
        .agent_proc()
        .unwrap()
        .start()
        .await
        .expect("agent restarts");
    let took = wait_quiet(orch(&c), &c, BOUND).await;
    println!(
        "problem cleared {:.3} s after the agent restarted",
        took.as_secs_f64()
    );
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_orchestrator_cut_off_from_the_primary_only_no_failover() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let w = writer(&c).await;
    let p = alias_of(&c, 0);
    w.mark_fault();
    // Simulation of "the orchestrator is cut off from the primary while the replicas still
    // replicate from it": the orchestrator sees the primary only through its agent (health
    // stream and FullStatus over gRPC). Freezing that agent (SIGSTOP) makes the primary silent
    // to the orchestrator exactly as a network cut between them would: the stream goes quiet
    // (no reset, like a dropped route), FullStatus times out, and the agent's etcd lease expires
    // so its registration disappears. mysqld is untouched: the replicas keep replicating from
    // it and their own probes of it succeed, which is what must stop a failover.
    c.tablet(0)
        .agent_proc()
        .unwrap()
        .freeze()
        .expect("SIGSTOP agent");
    expect_no_failover_writes_continue(&c, &w, &p, Some("unreachable_primary")).await;
    c.tablet(0)
        .agent_proc()
        .unwrap()
        .thaw()
        .expect("SIGCONT agent");
    let took = wait_quiet(orch(&c), &c, BOUND).await;
    println!(
        "problem cleared {:.3} s after the agent resumed",
        took.as_secs_f64()
    );
    w.verify(&c).await;
}

// ---- P7: the primary died before any orchestrator ran ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_primary_killed_before_any_orchestrator_starts() {
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        start_orchestrator: false,
        ..ha_options(3)
    })
    .await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let _o = c.start_orchestrator().await.expect("orchestrator starts");
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    println!(
        "reparented {:.3} s after the orchestrator was started",
        started.elapsed().as_secs_f64()
    );
    w.verify(&c).await;
}

/// P7 with an errant replica: the orchestrator starts after the primary died, so it never saw
/// the primary's position; the errant check rests on the shard history (term 1 started at a
/// recorded position, written by the primary's server), and the errant replica, the most
/// advanced one, is not promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_errant_replica_is_not_promoted_by_an_orchestrator_that_never_saw_the_primary() {
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        start_orchestrator: false,
        ..ha_options(4)
    })
    .await;
    let old = alias_of(&c, 0);
    let errant = alias_of(&c, 1);
    wait_ok(
        &c,
        "term 1 on record in the shard history",
        BOUND,
        || async {
            match c
                .topo()
                .get_promotion(c.keyspace(), c.shard(), Term::new(1))
                .await
            {
                Ok(Some(p)) if p.primary == old => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let w = writer(&c).await;
    // Its own domain: the errant replica keeps applying the primary's stream, so it stays the
    // most advanced (a superset of every other replica) while holding an errant GTID.
    sql(
        c.tablet(1),
        "SET SESSION gtid_domain_id=9; CREATE DATABASE IF NOT EXISTS errant; \
         CREATE TABLE IF NOT EXISTS errant.t (id INT PRIMARY KEY); INSERT INTO errant.t VALUES (1)",
    )
    .await;
    w.wait_more_acks(10, BOUND).await.expect("writes continue");
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _o = c.start_orchestrator().await.expect("orchestrator starts");
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[&errant]).await;
    assert_ne!(
        rec.primary.as_deref(),
        Some(errant.as_str()),
        "the errant replica was promoted"
    );
    let entries = audit(&c).await;
    audited(&entries, "no errant check from the history", |e| {
        e.action == "errant_check" && e.detail.contains("shard history")
    });
    assert!(
        entries
            .iter()
            .any(|e| e.action == "errant_check" && e.tablet.as_deref() == Some(errant.as_str())),
        "the errant replica was not named by the check:\n{}",
        audit_text(&entries)
    );
    assert_one_promotion_per_term(&c).await;
    w.verify(&c).await;
}

/// Waits until the registration of `alias` expired (its agent is gone past its lease).
async fn wait_unregistered(c: &Cluster, alias: &str) {
    wait_ok(
        c,
        "the dead agent's registration expires",
        BOUND,
        || async move {
            match c.topo().get_tablet(alias).await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// P17, deposed: the primary's agent is gone past its lease, its mysqld serves on, and an
/// operator's emergency reparent deposes it. Nothing can fence it through its agent; the new
/// primary's agent fences it over MySQL (read-only, asked from that mysqld itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p17_a_deposed_primary_without_its_agent_is_fenced_over_mysql() {
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        lease_ttl: ClusterOptions::default().lease_ttl,
        ..ha_options(3)
    })
    .await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let p0 = c.tablet(0);
    p0.agent_proc()
        .expect("agent")
        .kill()
        .expect("kill the primary's agent");
    wait_unregistered(&c, p0.alias()).await;
    assert!(!read_only(p0)
        .await
        .expect("the old primary's mysqld answers"));
    let body = serde_json::json!({"mode": "emergency", "requester": "p17-deposed"});
    let events = reparent_events(&c, &body, BOUND)
        .await
        .expect("reparent stream");
    let done = &events.last().expect("a done event").1;
    assert_eq!(done["ok"], true, "{events:?}");
    let new = done["new_primary"].as_str().unwrap_or_default().to_string();
    assert_ne!(new, p0.alias());
    wait_ok(
        &c,
        "the deposed primary's mysqld is read-only",
        BOUND,
        || async {
            match read_only(p0).await {
                Ok(true) => Ok(()),
                other => Err(format!("read_only: {other:?}")),
            }
        },
    )
    .await;
    let entries = audit(&c).await;
    let fence = entries
        .iter()
        .find(|e| e.action == "fence_old_primary" && e.outcome == "ok")
        .unwrap_or_else(|| panic!("no fence step:\n{}", audit_text(&entries)));
    println!("{}", audit_line(fence));
    assert_eq!(
        fence.tablet.as_deref(),
        Some(new.as_str()),
        "fenced through the new primary's agent"
    );
    assert_one_promotion_per_term(&c).await;
}

/// P17 under durability none: the agentless primary's mysqld dies too; the replicas confirm it,
/// but it cannot be fenced (nothing answers at its address), and under `none` nothing else would
/// stop its clients' writes if it were only cut off: refused with the reason, nothing changed.
/// An operator may force it, naming the risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p17_durability_none_refuses_to_promote_past_an_unfenceable_old_primary() {
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        lease_ttl: ClusterOptions::default().lease_ttl,
        durability: topo::Durability::None,
        ..ha_options(3)
    })
    .await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let p0 = c.tablet(0);
    p0.agent_proc()
        .expect("agent")
        .kill()
        .expect("kill the primary's agent");
    wait_unregistered(&c, p0.alias()).await;
    let since = topo::now_ms();
    p0.mysqld().kill().expect("kill the primary's mysqld");
    let refusal = refused_reparent(&c, since).await;
    println!("{}", audit_line(&refusal));
    assert!(
        refusal.detail.contains("could not be fenced")
            && refusal.detail.contains("durability none"),
        "{}",
        refusal.detail
    );
    let rec = record(&c).await;
    assert_eq!(
        (rec.term, rec.primary.as_deref()),
        (Term::new(1), Some(p0.alias())),
        "nothing changed"
    );
    for i in [1, 2] {
        assert!(
            read_only(c.tablet(i)).await.expect("replica answers"),
            "a replica was made writable"
        );
    }
    let body = serde_json::json!({"mode": "emergency", "may_lose_acknowledged_writes": true, "requester": "p17-none"});
    let events = reparent_events(&c, &body, BOUND)
        .await
        .expect("reparent stream");
    let done = &events.last().expect("a done event").1;
    assert_eq!(done["ok"], true, "{events:?}");
    let forced = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| {
            e["event"] == "step"
                && e["name"] == "fence_old_primary"
                && e["ok"] == true
                && e["detail"].as_str().unwrap_or_default().contains("FORCED")
        })
        .unwrap_or_else(|| panic!("no forced fence step: {events:?}"));
    println!("{forced}");
}

// ---- P8: primary and one replica down, semi_sync cannot be met ---------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_primary_killed_with_a_replica_down_refuses_under_semi_sync() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    let down = alias_of(&c, 2);
    c.tablet(2).mysqld().kill().expect("kill a replica");
    let replica_down = Instant::now();
    wait_problem(o, &c, "replica_mysql_unreachable", Some(&down), BOUND).await;
    w.wait_more_acks(10, BOUND)
        .await
        .expect("writes continue with one acking replica");
    // The scenario is a primary that kept running well after the replica went down, so that
    // the other replica received everything before the crash. The orchestrator only lets the
    // restarted replica vouch when the primary was seen alive more than its clock margin
    // (500 ms, skew between hosts) after the replica's outage; killing the primary within
    // that margin is a different scenario, where refusing for good is the correct outcome.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(replica_down.elapsed())).await;
    w.wait_more_acks(10, BOUND)
        .await
        .expect("writes continue with one acking replica");
    let before = record(&c).await;
    c.tablet(0).mysqld().kill().expect("kill the primary");
    let fault = w.mark_fault();

    // Refused: the survivor would have no replica to acknowledge its writes.
    let (detail, _) =
        wait_problem(o, &c, "dead_primary_and_some_replicas", Some(&old), BOUND).await;
    println!("reported: dead_primary_and_some_replicas: {detail}");
    let refusal = refused_reparent(&c, fault.at_ms).await;
    println!("refusal: {}", audit_line(&refusal));
    assert!(
        refusal.detail.contains("semi_sync"),
        "the refusal does not name the durability policy: {}",
        refusal.detail
    );
    let left = NO_FAILOVER_WINDOW.saturating_sub(fault.at.elapsed());
    assert_record_stays(&c, &before, left).await;
    assert!(
        read_only(c.tablet(1)).await.expect("survivor answers"),
        "the surviving replica was made writable"
    );
    let shard = shard_json(o, &c).await;
    let text = serde_json::to_string(&shard).unwrap();
    assert!(
        text.contains("semi_sync"),
        "the API does not show why the shard was not recovered: {text}"
    );

    // The replica returns: the policy can be met again, recovery proceeds.
    c.tablet(2)
        .mysqld()
        .start()
        .await
        .expect("replica restarts");
    let rec = expect_failover(&c, &w, &old, before.term, &[]).await;
    assert_eq!(
        rec.term,
        before.term.next(),
        "exactly one new term: {rec:?}"
    );
    w.verify(&c).await;
}

// ---- P9: the most advanced replica has an errant GTID ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_errant_most_advanced_replica_is_not_promoted() {
    let _serial = SERIAL.lock().await;
    // 4 tablets: once the errant replica is out, two clean ones remain, so semi_sync can be met.
    let c = start(ClusterOptions {
        start_gateway: true,
        ..ha_options(4)
    })
    .await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let g = c.gateway().expect("gateway");
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    let errant = alias_of(&c, 1);
    let clean = [alias_of(&c, 2), alias_of(&c, 3)];
    myha_tests::gw::wait_routes(&c, g, &old, &[&errant, &clean[0], &clean[1]], BOUND).await;
    // A transaction the primary never had, in its own domain so that the replica keeps
    // applying the primary's stream: it stays a superset of every other replica (the most
    // advanced) while holding an errant GTID.
    sql(
        c.tablet(1),
        "SET SESSION gtid_domain_id=9; CREATE DATABASE IF NOT EXISTS errant; \
         CREATE TABLE IF NOT EXISTS errant.t (id INT PRIMARY KEY); INSERT INTO errant.t VALUES (1)",
    )
    .await;
    // Quarantined with the reason (its data is not the shard's), and so out of read routing.
    let (detail, _) = wait_problem(o, &c, "quarantined", Some(&errant), BOUND).await;
    println!("reported: quarantined: {detail}");
    assert!(detail.contains("errant transactions"), "{detail}");
    let routes = myha_tests::gw::wait_routes(&c, g, &old, &[&clean[0], &clean[1]], BOUND).await;
    println!("read routing without the errant replica: {}", routes["ro"]);
    w.wait_more_acks(10, BOUND).await.expect("writes continue");
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[&errant]).await;
    assert_ne!(
        rec.primary.as_deref(),
        Some(errant.as_str()),
        "the errant replica was promoted"
    );
    // Still reported once the recovery is over (right after it the analysis may show only the
    // recovered problem for a round).
    let (detail, _) =
        wait_any_problem(o, &c, &["errant_gtid", "quarantined"], Some(&errant), BOUND).await;
    println!("after the failover the errant replica is reported: {detail}");
    w.verify(&c).await;
}

// ---- P11: the most advanced replica is must_not ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_must_not_most_advanced_is_only_an_intermediate_source() {
    let _serial = SERIAL.lock().await;
    let must_not = 102;
    let c = start(ClusterOptions {
        start_orchestrator: false,
        agent_config: Some(Arc::new(
            move |cfg: &mut myha_agent::config::AgentConfig| {
                if cfg.tablet.uid == must_not {
                    cfg.tablet.promotion_rule = PromotionRule::MustNot;
                }
            },
        )),
        ..ha_options(3)
    })
    .await;
    let mn = alias_of(&c, 1);
    assert_eq!(c.tablet(1).uid(), must_not);
    let w = writer(&c).await;
    // The other replica stops receiving: only the must_not one (it acks semi-sync) gets the
    // next writes. No orchestrator runs yet, so nothing restarts its IO thread.
    sql(c.tablet(2), "STOP SLAVE IO_THREAD").await;
    w.wait_more_acks(50, BOUND)
        .await
        .expect("writes acked by the must_not replica");
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let _o = c.start_orchestrator().await.expect("orchestrator starts");
    let rec = expect_failover(&c, &w, &alias_of(&c, 0), Term::new(1), &[]).await;
    assert_eq!(
        rec.primary.as_deref(),
        Some(alias_of(&c, 2).as_str()),
        "the only eligible candidate was not promoted"
    );
    let r = w.check(&c).await.expect("writer check");
    assert!(
        r.records
            .iter()
            .all(|rec| rec.primary.as_deref() != Some(mn.as_str())),
        "the must_not replica was named primary: {r}"
    );
    w.verify(&c).await;
}

// ---- P12 P13: several orchestrators -------------------------------------------------------

/// Waits until an orchestrator holds the shard lock for an emergency reparent.
async fn wait_reparent_lock(rx: &mut tokio::sync::watch::Receiver<topo::Snapshot>) -> LockInfo {
    tokio::time::timeout(BOUND, async {
        loop {
            let hit = rx.borrow_and_update().values().find_map(|v| {
                serde_json::from_slice::<LockInfo>(v)
                    .ok()
                    .filter(|i| i.purpose.starts_with("emergency reparent"))
            });
            if let Some(i) = hit {
                return i;
            }
            rx.changed().await.expect("lock watch");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("no orchestrator took the shard lock for a reparent within {BOUND:?}")
    })
}

/// The first audit entry (seen through `rx`, a watch of the shard's audit prefix) that `pred`
/// accepts, within [`BOUND`].
async fn wait_audited(
    rx: &mut tokio::sync::watch::Receiver<topo::Snapshot>,
    pred: impl Fn(&topo::AuditEntry) -> bool,
) -> Result<topo::AuditEntry, tokio::time::error::Elapsed> {
    tokio::time::timeout(BOUND, async {
        loop {
            let hit = rx.borrow_and_update().values().find_map(|v| {
                serde_json::from_slice::<topo::AuditEntry>(v)
                    .ok()
                    .filter(|e| pred(e))
            });
            if let Some(e) = hit {
                return e;
            }
            rx.changed().await.expect("audit watch");
        }
    })
    .await
}

/// Never two promotions of the same term, checked on the durable record of every promotion (the
/// shard history, written create-only by each promoted agent before its mysqld became writable;
/// a later repoint cannot erase it, unlike an agent's current `promoted_term`): the terms on
/// record follow each other in time, the shard record's primary is the one on record for its
/// term, and every promotion an agent reports is on record with that agent.
async fn assert_one_promotion_per_term(c: &Cluster) {
    let history = c
        .topo()
        .promotion_history(c.keyspace(), c.shard())
        .await
        .expect("read the shard history");
    let lines: Vec<String> = history
        .iter()
        .map(|p| {
            format!(
                "term {} -> {} at {} by {}",
                p.term, p.primary, p.at_ms, p.by
            )
        })
        .collect();
    println!("promotions on record:\n  {}", lines.join("\n  "));
    for pair in history.windows(2) {
        assert!(
            pair[0].term < pair[1].term && pair[0].at_ms <= pair[1].at_ms,
            "promotions out of order: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    let rec = record(c).await;
    if rec.term > Term::ZERO {
        let on_record = history.iter().find(|p| p.term == rec.term);
        assert_eq!(
            on_record.map(|p| p.primary.as_str()),
            rec.primary.as_deref(),
            "the shard record's primary at term {} is not the one on record",
            rec.term
        );
    }
    for t in c.tablets() {
        let Some(a) = t.agent().filter(|a| a.is_running()) else {
            continue;
        };
        if let Ok(h) = a.full_status().await {
            if h.promoted_term > 0 {
                let p = history
                    .iter()
                    .find(|p| p.term == Term::new(h.promoted_term));
                assert_eq!(
                    p.map(|p| p.primary.as_str()),
                    Some(t.alias()),
                    "{} reports a promotion under term {} that is not on record as its own",
                    t.alias(),
                    h.promoted_term
                );
            }
        }
    }
}

/// P12 after the first orchestrator was stopped holding the lock: a second one finishes after
/// the lease expires, with exactly one new term in the shard record.
async fn second_orchestrator_finishes(
    c: &Cluster,
    w: &Writer,
    old: &str,
    stopped_at: Instant,
) -> ShardRecord {
    let mid = record(c).await;
    println!("shard record when the first orchestrator stopped: {mid:?}");
    let _b = c.start_orchestrator().await.expect("second orchestrator");
    let (rec, _) = wait_record(
        c,
        "the second orchestrator to finish",
        BOUND + ORCH_LEASE_TTL,
        |r| {
            r.term > Term::new(1)
                && r.primary.as_deref() != Some(old)
                && r.reparent_in_progress.is_none()
        },
    )
    .await;
    wait_shard_healthy(c, &[old], BOUND).await;
    println!(
        "finished {:.3} s after the first orchestrator stopped: {rec:?}",
        stopped_at.elapsed().as_secs_f64()
    );
    assert_record_stays(c, &rec, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen: Vec<Term> = w.records().iter().map(|r| r.term).collect();
    assert_eq!(
        seen,
        vec![Term::new(1), rec.term],
        "the shard record went through more than one new term"
    );
    assert_one_promotion_per_term(c).await;
    let entries = audit(c).await;
    let ok: Vec<_> = entries
        .iter()
        .filter(|e| e.action == "emergency_reparent" && e.outcome == "ok")
        .collect();
    assert!(
        ok.len() <= 1,
        "more than one successful emergency reparent:\n{}",
        audit_text(&entries)
    );
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p12_orchestrator_killed_midway_another_finishes_with_one_new_term() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let a = orch(&c);
    wait_quiet(a, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    let locks = c
        .topo()
        .watch_prefix(&c.topo().keys().lock_prefix(c.keyspace(), c.shard()));
    let mut rx = locks.subscribe();
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    // As soon as the first orchestrator holds the shard lock for the reparent: SIGKILL it.
    let info = wait_reparent_lock(&mut rx).await;
    a.kill().expect("SIGKILL the first orchestrator");
    let killed_at = Instant::now();
    println!("killed {} holding the lock: {}", info.holder, info.purpose);
    second_orchestrator_finishes(&c, &w, &old, killed_at).await;
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p12_orchestrator_frozen_midway_and_resumed_after_takeover_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let a = orch(&c);
    wait_quiet(a, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    let locks = c
        .topo()
        .watch_prefix(&c.topo().keys().lock_prefix(c.keyspace(), c.shard()));
    let mut rx = locks.subscribe();
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let audit_watch = c
        .topo()
        .watch_prefix(&c.topo().keys().audit_prefix(c.keyspace(), c.shard()));
    let mut audit_rx = audit_watch.subscribe();
    // The first orchestrator stops (SIGSTOP) mid-reparent, at the first step it audits (its
    // steps are audited asynchronously, so it may be a step or two further): its lease
    // expires, the second one takes over and finishes.
    let info = wait_reparent_lock(&mut rx).await;
    let step = wait_audited(&mut audit_rx, |e| {
        e.actor == info.holder && e.action != "emergency_reparent"
    })
    .await
    .expect("the first orchestrator audits a reparent step");
    a.freeze().expect("SIGSTOP the first orchestrator");
    let frozen_at = Instant::now();
    println!(
        "froze {} holding the lock ({}) after its step: {}",
        info.holder,
        info.purpose,
        audit_line(&step)
    );
    let rec = second_orchestrator_finishes(&c, &w, &old, frozen_at).await;

    // The first one resumes with its stale view and lost lock: it must change nothing.
    let acked_before = w.acked();
    a.thaw().expect("SIGCONT the first orchestrator");
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(5) {
        let r = record(&c).await;
        assert!(
            r.term == rec.term && r.primary == rec.primary,
            "the resumed orchestrator changed the shard record: {r:?}\n{}",
            diagnostics(&c).await
        );
        if let Err(e) = shard_healthy(&c, &[&old]).await {
            panic!(
                "after the first orchestrator resumed: {e}\n{}",
                diagnostics(&c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_one_promotion_per_term(&c).await;
    let entries = audit(&c).await;
    let by_a: Vec<String> = entries
        .iter()
        .filter(|e| e.actor == info.holder)
        .map(audit_line)
        .collect();
    println!("what the resumed orchestrator did:\n{}", by_a.join("\n"));
    assert!(
        w.acked() > acked_before,
        "writes continue on the new primary"
    );
    w.verify(&c).await;
}

/// Holds the row `blocker.id = 1` locked on a replica (an open `SELECT ... FOR UPDATE`), so that
/// its SQL thread waits on the next replicated change of that row. Dropping the connection
/// (or `ROLLBACK`) lets it go.
async fn hold_row_lock(t: &harness::Tablet) -> mysql_async::Conn {
    use mysql_async::prelude::Queryable;
    let mut conn = t.root_conn().await.expect("root conn");
    conn.query_drop("BEGIN").await.expect("begin");
    conn.query_drop("SELECT * FROM app.p21_blocker WHERE id = 1 FOR UPDATE")
        .await
        .expect("lock the row");
    conn
}

/// P21: an orchestrator frozen mid-reparent past its lock TTL, while a second one takes the lock
/// and acts under the same term (the primary came back, so it repairs instead of failing over):
/// once thawed, the first sends nothing (its local lease deadline has passed) and would be
/// refused anyway (its lock epoch is older than the second one's at that term). It changes
/// nothing: no second writable mysqld, no promotion on record, the record untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p21_stale_orchestrator_thawed_after_another_acted_at_the_same_term_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let a = orch(&c);
    wait_quiet(a, &c, BOUND).await;
    let (primary, r1, r2) = (c.tablet(0), c.tablet(1), c.tablet(2));
    sql(
        primary,
        "CREATE TABLE IF NOT EXISTS app.p21_blocker (id INT PRIMARY KEY, v INT NOT NULL)",
    )
    .await;
    sql(primary, "INSERT INTO app.p21_blocker VALUES (1, 0)").await;
    for r in [r1, r2] {
        wait_ok(&c, "the blocker row replicated", BOUND, || async move {
            let mut conn = r.root_conn().await.map_err(|e| e.to_string())?;
            use mysql_async::prelude::Queryable;
            let n: Option<u64> = conn
                .query_first("SELECT COUNT(*) FROM app.p21_blocker")
                .await
                .map_err(|e| e.to_string())?;
            let _ = conn.disconnect().await;
            (n == Some(1))
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
    }
    let w = writer(&c).await;
    // Both replicas receive (and acknowledge) the change of the locked row, and cannot apply it.
    let locks = [hold_row_lock(r1).await, hold_row_lock(r2).await];
    sql(primary, "UPDATE app.p21_blocker SET v = v + 1 WHERE id = 1").await;
    w.wait_more_acks(20, BOUND).await.expect("acks continue");

    let lock_watch = c
        .topo()
        .watch_prefix(&c.topo().keys().lock_prefix(c.keyspace(), c.shard()));
    let mut lock_rx = lock_watch.subscribe();
    let audit_watch = c
        .topo()
        .watch_prefix(&c.topo().keys().audit_prefix(c.keyspace(), c.shard()));
    let mut audit_rx = audit_watch.subscribe();
    primary
        .mysqld()
        .freeze()
        .expect("SIGSTOP the primary's mysqld");
    w.mark_fault();
    let info = wait_reparent_lock(&mut lock_rx).await;
    // The first orchestrator waits for a replica to apply what it received: freeze it there.
    let step = wait_audited(&mut audit_rx, |e| {
        e.actor == info.holder && e.action == "apply_relay_log_progress"
    })
    .await
    .expect("the first orchestrator waits for a relay log to apply");
    a.freeze().expect("SIGSTOP the first orchestrator");
    // The replicas may apply now: the wait the first orchestrator sent just before it froze
    // succeeds while it is frozen, and its next step on waking is the promotion.
    drop(locks);
    println!(
        "froze {} mid-reparent after: {}",
        info.holder,
        audit_line(&step)
    );
    let mid = record(&c).await;
    println!("shard record: {mid:?}");
    // The primary comes back; a second orchestrator takes the lock once the first one's lease
    // expired, and repairs the replicas (their IO threads were stopped) under the same term.
    primary
        .mysqld()
        .thaw()
        .expect("SIGCONT the primary's mysqld");
    let _b = c.start_orchestrator().await.expect("second orchestrator");
    for r in [r1, r2] {
        wait_ok(
            &c,
            "the second orchestrator restarts replication",
            BOUND + ORCH_LEASE_TTL,
            || async move {
                let mut conn = r.root_conn().await.map_err(|e| e.to_string())?;
                let st = harness::slave_status(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                let _ = conn.disconnect().await;
                (col(&st, "Slave_IO_Running") == "Yes")
                    .then_some(())
                    .ok_or_else(|| format!("IO thread {}", col(&st, "Slave_IO_Running")))
            },
        )
        .await;
    }
    let by_b: Vec<String> = audit(&c)
        .await
        .iter()
        .filter(|e| e.actor != info.holder)
        .map(audit_line)
        .collect();
    println!("the second orchestrator:\n  {}", by_b.join("\n  "));
    wait_shard_healthy(&c, &[], BOUND).await;
    let rec = record(&c).await;
    assert_eq!(rec.primary.as_deref(), Some(primary.alias()));
    let thawed_ms = topo::now_ms();
    a.thaw().expect("SIGCONT the first orchestrator");
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(5) {
        let r = record(&c).await;
        assert!(
            r.term == rec.term && r.primary == rec.primary,
            "the thawed orchestrator changed the shard record: {r:?}"
        );
        for t in [r1, r2] {
            if let Ok(false) = read_only(t).await {
                panic!(
                    "{} is writable next to the primary {} after the first orchestrator thawed\n{}",
                    t.alias(),
                    primary.alias(),
                    audit_text(&audit(&c).await)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let entries = audit(&c).await;
    let after: Vec<&topo::AuditEntry> = entries
        .iter()
        .filter(|e| e.actor == info.holder && e.at_ms >= thawed_ms)
        .collect();
    println!(
        "what the thawed orchestrator did:\n  {}",
        after
            .iter()
            .map(|e| audit_line(e))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    // The outcome of the wait sent before the freeze is recorded on waking; anything else that
    // succeeded went out after the lock was gone.
    let acted: Vec<String> = after
        .iter()
        .filter(|e| {
            e.outcome == "ok"
                && e.action != "apply_relay_log_progress"
                && e.action != "apply_relay_log"
        })
        .map(|e| audit_line(e))
        .collect();
    assert!(
        acted.is_empty(),
        "the thawed orchestrator still acted:\n  {}",
        acted.join("\n  ")
    );
    assert!(
        after.iter().any(|e| e.action == "lock_deadline"),
        "the thawed orchestrator did not stop on its lease deadline"
    );
    let history = c
        .topo()
        .promotion_history(c.keyspace(), c.shard())
        .await
        .expect("history");
    assert_eq!(
        history.iter().map(|p| p.term.get()).collect::<Vec<_>>(),
        vec![1],
        "a promotion went on record: {history:?}"
    );
    assert_one_promotion_per_term(&c).await;
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p13_two_orchestrators_exactly_one_reparent() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let b = c.start_orchestrator().await.expect("second orchestrator");
    wait_quiet(orch(&c), &c, BOUND).await;
    wait_quiet(&b, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    assert_record_stays(&c, &rec, Duration::from_secs(3)).await;
    // The summary is audited in the background: wait for it, then count.
    reparent_entry(&c, rec.term).await;
    let entries = audit(&c).await;
    let ok: Vec<_> = entries
        .iter()
        .filter(|e| e.action == "emergency_reparent" && e.outcome == "ok")
        .collect();
    assert_eq!(
        ok.len(),
        1,
        "exactly one successful emergency reparent:\n{}",
        audit_text(&entries)
    );
    let actors: std::collections::BTreeSet<&str> = entries
        .iter()
        .filter(|e| e.term == Term::new(2) && !e.action.is_empty())
        .map(|e| e.actor.as_str())
        .collect();
    println!("actors at term 2: {actors:?}");
    let r = w.verify(&c).await;
    assert_eq!(
        r.records.iter().map(|r| r.term.get()).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

// ---- P14: fails again right after; flapping stops ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_second_failure_reparents_again_and_flapping_stops_until_acknowledged() {
    let _serial = SERIAL.lock().await;
    // 5 tablets: three successive primaries die and two tablets still remain (semi_sync met).
    let c = start(ha_options_with(5, |cfg: &mut OrchestratorConfig| {
        cfg.recovery.flap_limit = 2;
        cfg.recovery.flap_window = Duration::from_secs(600);
    }))
    .await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let w = writer(&c).await;

    // First failure.
    let p1 = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill");
    w.mark_fault();
    let r1 = expect_failover(&c, &w, &p1, Term::new(1), &[]).await;

    // The new primary fails right away: a second reparent, no cool-down.
    let p2 = r1.primary.clone().unwrap();
    c.tablet_by_alias(&p2)
        .unwrap()
        .mysqld()
        .kill()
        .expect("kill");
    w.mark_fault();
    let r2 = expect_failover(&c, &w, &p2, r1.term, &[&p1]).await;
    assert_eq!(r2.term, r1.term.next());

    // A third failure within the window: flapping (limit 2) stops automatic recovery.
    let p3 = r2.primary.clone().unwrap();
    c.tablet_by_alias(&p3)
        .unwrap()
        .mysqld()
        .kill()
        .expect("kill");
    let fault = w.mark_fault();
    let start = Instant::now();
    let shard = loop {
        let s = shard_json(o, &c).await;
        if s["recovery"]["flapping"] == true {
            break s;
        }
        if start.elapsed() > BOUND {
            panic!(
                "the shard is not reported flapping: {s}\n{}",
                diagnostics(&c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let why = shard["recovery"]["flapping_detail"]
        .as_str()
        .or(shard["recovery"]["disabled_reason"].as_str())
        .unwrap_or_default()
        .to_string();
    println!("flapping: {why}");
    assert!(
        why.contains("flapping") && why.contains("ack"),
        "the reason does not say why and what to do: {shard}"
    );
    let left = NO_FAILOVER_WINDOW.saturating_sub(fault.at.elapsed());
    assert_record_stays(&c, &r2, left).await;

    // Acknowledged: recovery proceeds.
    let (status, body) = o
        .post_json(
            &format!("/api/v1/shards/{}/{}/ack", c.keyspace(), c.shard()),
            &serde_json::json!({"reason": "p14 test"}),
        )
        .await
        .expect("POST ack");
    assert_eq!(status, 200, "ack answered {status}: {body}");
    let (r3, _) = wait_new_primary(&c, &p3, r2.term, BOUND).await;
    assert_eq!(r3.term, r2.term.next());
    wait_shard_healthy(&c, &[&p1, &p2, &p3], BOUND).await;
    w.verify(&c).await;
}

// ---- P15: etcd unavailable while the primary dies -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_no_reparent_without_etcd_then_recovery_when_it_returns() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    let before = record(&c).await;
    c.etcd().kill().expect("kill etcd");
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();

    // No promotion while etcd is down: the replicas stay read-only replicas of the dead primary.
    let down_for = Duration::from_secs(6);
    let reason = expect_no_promotion_without_etcd(&c, down_for).await;
    println!("while etcd was down, the orchestrator said: {reason}");

    c.etcd().start().await.expect("etcd restarts");
    let back = Instant::now();
    // The orchestrator may already have recovered by the time this is read: the record is
    // either the one from before etcd died or the failover's, one term later.
    let rec = record(&c).await;
    assert!(
        (rec.primary == before.primary && rec.term == before.term)
            || (rec.primary != before.primary && rec.term == before.term.next()),
        "the shard record changed while etcd was down: {rec:?} (before: {before:?})"
    );
    let rec = expect_failover(&c, &w, &old, before.term, &[]).await;
    println!(
        "recovered {:.3} s after etcd returned",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(
        rec.term,
        before.term.next(),
        "exactly one new term: {rec:?}"
    );
    w.verify(&c).await;
}

// ---- write-path trouble: the primary answers, its writes block --------------------------

/// A primary that answers pings and reads while every write blocks (a global read lock held;
/// a stalled disk looks the same) is reported with what blocks the writes, and not failed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_writes_block_is_reported_with_the_reason_not_failed_over() {
    use mysql_async::prelude::Queryable;
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let primary = alias_of(&c, 0);
    let before = record(&c).await;
    let mut lock = c.tablet(0).root_conn().await.expect("root conn");
    lock.query_drop("FLUSH TABLES WITH READ LOCK")
        .await
        .expect("FLUSH TABLES WITH READ LOCK");
    let locked = Instant::now();
    let (detail, _) = wait_problem(o, &c, "primary_writes_stalled", Some(&primary), BOUND).await;
    println!(
        "reported {:.2} s after the lock: {detail}",
        locked.elapsed().as_secs_f64()
    );
    // MariaDB 10.4+ implements the global read lock with backup locks.
    assert!(
        detail.contains("Waiting for backup lock")
            || detail.contains("Waiting for global read lock"),
        "the report does not say what blocks: {detail}"
    );
    assert_record_stays(&c, &before, Duration::from_secs(3)).await;
    lock.query_drop("UNLOCK TABLES")
        .await
        .expect("UNLOCK TABLES");
    wait_quiet(o, &c, BOUND).await;
}

/// The stall failover opted in (`[recovery] failover_on_writes_stalled`; the test above shows the
/// default never fails over): a primary under a global read lock whose writes stay blocked past
/// the bound is failed over. Its agent sets it read-only first, past the lock's holder, so the
/// writes queued behind the lock fail with ER_OPTION_PREVENTS_STATEMENT (1290) when it is
/// released instead of committing on the deposed primary (asked of its mysqld); the writer loses
/// no acknowledged write and gets no ack from the old primary after the new term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_writes_stay_blocked_is_failed_over_when_the_operator_opted_in() {
    use mysql_async::prelude::Queryable;
    let _serial = SERIAL.lock().await;
    let bound = Duration::from_secs(3);
    let c = start(ha_options_with(3, move |cfg: &mut OrchestratorConfig| {
        cfg.recovery.failover_on_writes_stalled = Some(bound);
    }))
    .await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let old = alias_of(&c, 0);
    let before = record(&c).await;
    sql(
        c.tablet(0),
        "CREATE TABLE app.stall_probe (id INT PRIMARY KEY)",
    )
    .await;
    let w = Writer::start(
        &c,
        harness::WriterOptions {
            attempt_timeout: Duration::from_secs(1),
            ..harness::WriterOptions::default()
        },
    )
    .await
    .expect("writer starts");
    w.wait_more_acks(20, BOUND)
        .await
        .expect("acks before the stall");

    let mut lock = c.tablet(0).root_conn().await.expect("root conn");
    lock.query_drop("FLUSH TABLES WITH READ LOCK")
        .await
        .expect("FLUSH TABLES WITH READ LOCK");
    w.mark_fault();
    // An application write queued behind the lock on the old primary.
    let mut app = c.tablet(0).app_conn().await.expect("app conn");
    let queued = tokio::spawn(async move {
        let r = app
            .query_drop("INSERT INTO app.stall_probe VALUES (1)")
            .await;
        r.map_err(|e| e.to_string())
    });
    let rec = expect_failover(&c, &w, &old, before.term, &[]).await;
    assert_eq!(rec.term, before.term.next(), "{rec:?}");
    let entries = audit(&c).await;
    let summary = audited(&entries, "no emergency reparent", |e| {
        e.action == "emergency_reparent" && e.outcome == "ok" && e.term == rec.term
    });
    assert!(
        summary.detail.contains("failover_on_writes_stalled"),
        "not the stall failover: {}",
        summary.detail
    );
    audited(&entries, "the old primary was not demoted first", |e| {
        e.action == "demote" && e.outcome == "ok" && e.tablet.as_deref() == Some(&old)
    });
    assert!(
        read_only(c.tablet(0))
            .await
            .expect("the old primary answers"),
        "the deposed primary is writable"
    );
    assert!(
        !queued.is_finished(),
        "the queued write did not wait for the lock"
    );
    lock.query_drop("UNLOCK TABLES")
        .await
        .expect("UNLOCK TABLES");
    let queued = tokio::time::timeout(BOUND, queued)
        .await
        .expect("the queued write returns once the lock is released")
        .expect("task");
    let err =
        queued.expect_err("the write queued behind the lock committed on the deposed primary");
    println!("the queued write, once the lock was released: {err}");
    assert!(err.contains("1290") || err.contains("read-only"), "{err}");
    let mut root = c.tablet(0).root_conn().await.expect("root conn");
    let rows: Vec<i64> = root
        .query("SELECT id FROM app.stall_probe")
        .await
        .expect("read the probe table");
    assert!(
        rows.is_empty(),
        "committed on the deposed primary: {rows:?}"
    );
    wait_quiet(o, &c, BOUND).await;
    w.verify(&c).await;
    assert_one_promotion_per_term(&c).await;
}

/// The stall failover under durability none, when the stalled primary cannot be set read-only:
/// an open transaction holding the heartbeat row's lock stalls the heartbeat write (reads go on)
/// and makes `SET GLOBAL read_only` wait for it too, as a commit stuck on a stalled disk would.
/// Nothing else would stop the old primary's writes once the stall clears, so the failover is
/// refused with the reason and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_none_refuses_the_stall_failover_when_the_stalled_primary_cannot_be_fenced() {
    use mysql_async::prelude::Queryable;
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        durability: topo::Durability::None,
        ..ha_options_with(3, |cfg: &mut OrchestratorConfig| {
            cfg.recovery.failover_on_writes_stalled = Some(Duration::from_secs(3));
        })
    })
    .await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let old = alias_of(&c, 0);
    let before = record(&c).await;
    let since = topo::now_ms();
    let mut lock = c.tablet(0).root_conn().await.expect("root conn");
    lock.query_drop("BEGIN").await.expect("BEGIN");
    lock.query_drop("UPDATE _myha.heartbeat SET ts_us = ts_us WHERE id = 1")
        .await
        .expect("lock the heartbeat row");
    let (detail, _) = wait_problem(o, &c, "stalled_primary", Some(&old), BOUND).await;
    println!("reported: {detail}");
    let refusal = refused_reparent(&c, since).await;
    println!("{}", audit_line(&refusal));
    assert!(
        refusal.detail.contains("could not be set read-only")
            && refusal.detail.contains("durability none")
            && refusal.detail.contains(&old),
        "{}",
        refusal.detail
    );
    let rec = record(&c).await;
    assert_eq!(
        (rec.term, rec.primary.as_deref()),
        (before.term, Some(old.as_str())),
        "nothing changed"
    );
    for i in [1, 2] {
        assert!(
            read_only(c.tablet(i)).await.expect("replica answers"),
            "a replica was made writable"
        );
    }
    lock.query_drop("ROLLBACK").await.expect("ROLLBACK");
    wait_quiet(o, &c, BOUND).await;
    assert!(
        !read_only(c.tablet(0)).await.expect("the primary answers"),
        "the primary stays read-only after the refusal"
    );
    assert_record_stays(&c, &before, Duration::from_secs(2)).await;
}

/// Semi-sync drift is reported: a semi-sync primary with no replica connected to acknowledge
/// (every commit now waits) raises `primary_semi_sync_no_ackers` (recoveries are disabled so
/// that the repairs do not restart the replicas first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semi_sync_primary_without_ackers_is_reported() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let shard = serde_json::json!({"keyspace": c.keyspace(), "shard": c.shard(), "reason": "test"});
    let (code, body) = o
        .post_json("/api/v1/recoveries/disable", &shard)
        .await
        .expect("disable");
    assert_eq!(code, 200, "{body}");
    for i in [1, 2] {
        sql(c.tablet(i), "STOP SLAVE").await;
    }
    let primary = alias_of(&c, 0);
    let (detail, _) =
        wait_problem(o, &c, "primary_semi_sync_no_ackers", Some(&primary), BOUND).await;
    println!("reported: {detail}");
    assert!(detail.contains("every commit waits"), "{detail}");
    for i in [1, 2] {
        sql(c.tablet(i), "START SLAVE").await;
    }
    let (code, body) = o
        .post_json("/api/v1/recoveries/enable", &shard)
        .await
        .expect("enable");
    assert_eq!(code, 200, "{body}");
    wait_quiet(o, &c, BOUND).await;
}
