//! No acknowledged write lost when the newest acknowledged transactions exist only in a replica's
//! relay log (scenario P18 of the fault catalog), on real processes: etcd, MariaDB, agents and an
//! orchestrator on loopback, the replication link starved for real with an iptables rule
//! ([`harness::net::LinkDrop`]). Under AFTER_SYNC a replica acknowledges on receipt, so the
//! emergency reparent must rank on what replicas received and apply it before promoting.
//!
//! The tests share the machine with everything else: they run one at a time (`SERIAL`).

use std::time::{Duration, Instant};
use topo::Term;

use harness::net::{local_ports_to, LinkDrop};
use harness::{global_var, slave_status, Tablet};
use myha_tests::ha::*;
use mysql_async::prelude::Queryable;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on a failover that must first apply a large relay log (never a timing assertion).
const APPLY_BOUND: Duration = Duration::from_secs(90);

/// (received, applied) of a replica, read from its mysqld.
async fn positions(t: &Tablet) -> (String, String) {
    let mut c = t.root_conn().await.expect("root conn");
    let st = slave_status(&mut c)
        .await
        .expect("slave status")
        .unwrap_or_default();
    let applied = global_var(&mut c, "gtid_slave_pos")
        .await
        .expect("gtid_slave_pos")
        .unwrap_or_default();
    let _ = c.disconnect().await;
    (col(&st, "Gtid_IO_Pos"), applied)
}

/// Sequence number of a single-domain MariaDB position (`0-101-8115` -> 8115).
fn seq(pos: &str) -> u64 {
    pos.rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The replication connection of `replica` to `primary`'s port, dropped one way (the primary's
/// data never arrives, nor its reset when it dies).
fn starve(replica: &Tablet, primary: &Tablet) -> LinkDrop {
    let pid = replica.mysqld().pid().expect("replica mysqld runs");
    let ports = local_ports_to(pid, primary.mysqld().port()).expect("read /proc");
    assert_eq!(
        ports.len(),
        1,
        "{}'s connections to the primary's port: {ports:?}",
        replica.alias()
    );
    LinkDrop::one_way(primary.mysqld().port(), ports[0]).expect("iptables rule")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p18_delayed_replica_holds_the_newest_acknowledged_writes() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let (primary, delayed, starved) = (c.tablet(0), c.tablet(1), c.tablet(2));
    // The delayed replica receives (and acknowledges) at once and applies 30 s later.
    for stmt in [
        "STOP SLAVE",
        "CHANGE MASTER TO MASTER_DELAY = 30",
        "START SLAVE",
    ] {
        sql(delayed, stmt).await;
    }
    let w = writer(&c).await;
    // The other replica stops receiving: its link from the primary silently drops data.
    let cut = starve(starved, primary);
    println!("dropping {}", cut.describe());
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.wait_more_acks(50, BOUND)
        .await
        .expect("acks continue, from the delayed replica's receipts");
    let (d_recv, d_applied) = positions(delayed).await;
    let (s_recv, s_applied) = positions(starved).await;
    primary.mysqld().kill().expect("kill the primary's mysqld");
    w.mark_fault();
    println!(
        "at the kill: {} received {d_recv} applied {d_applied}; {} received {s_recv} applied {s_applied}; {} acks",
        delayed.alias(),
        starved.alias(),
        w.acked()
    );
    // The fault is in effect: the only replica with the newest writes has not applied them, and
    // the other one has applied more than the delayed one but received less.
    assert!(
        seq(&d_recv) > seq(&d_applied) + 20,
        "the delayed replica applied what it received"
    );
    assert!(
        seq(&s_recv) < seq(&d_recv) && seq(&s_applied) > seq(&d_applied),
        "the starved replica is not the less advanced receiver and the better applier"
    );

    let rec = expect_failover(&c, &w, primary.alias(), Term::new(1), &[]).await;
    // Zero acknowledged writes lost (asserted inside), whoever was promoted.
    w.verify(&c).await;
    assert_eq!(
        rec.primary.as_deref(),
        Some(delayed.alias()),
        "the replica holding every acknowledged write is promoted"
    );
    let entries = audit(&c).await;
    let applied = entries
        .iter()
        .find(|e| e.action == "apply_relay_log" && e.tablet.as_deref() == Some(delayed.alias()))
        .unwrap_or_else(|| panic!("no apply_relay_log step:\n{}", audit_text(&entries)));
    println!("{}", audit_line(applied));
    assert!(
        applied.outcome == "ok"
            && applied
                .detail
                .contains("lift the replication delay of 30 s"),
        "the delay was not lifted for the catch-up: {}",
        audit_line(applied)
    );
    drop(cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p18_large_acknowledged_transaction_received_but_not_applied_survives() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let primary = c.tablet(0);
    const ROWS: u64 = 1_000_000;
    sql(
        primary,
        "CREATE TABLE app.p18_big (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
    )
    .await;
    c.wait_replicated(BOUND).await.expect("table replicated");
    // A slow applier, made certain: a global read lock on both replicas holds their SQL threads
    // (not their IO threads, which receive and acknowledge) until 4 s after the kill, longer
    // than any apply bound of the code this replaced (2 s).
    let mut locks = Vec::new();
    for r in [c.tablet(1), c.tablet(2)] {
        let mut l = r.root_conn().await.expect("root conn");
        l.query_drop("FLUSH TABLES WITH READ LOCK")
            .await
            .expect("FLUSH TABLES WITH READ LOCK");
        locks.push(l);
    }
    let mut conn = primary.root_conn().await.expect("root conn");
    let t = Instant::now();
    conn.query_drop(format!(
        "INSERT INTO app.p18_big SELECT seq, seq FROM app.seq_1_to_{ROWS}"
    ))
    .await
    .expect("the large insert is acknowledged");
    let took = t.elapsed();
    primary
        .mysqld()
        .kill()
        .expect("kill the primary right after the ack");
    let killed = Instant::now();
    let mut at_kill = Vec::new();
    for r in [c.tablet(1), c.tablet(2)] {
        at_kill.push(format!("{}: {:?}", r.alias(), positions(r).await));
    }
    println!(
        "{ROWS} rows acknowledged after {:.1} s; primary killed; (received, applied): {}",
        took.as_secs_f64(),
        at_kill.join(", ")
    );
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(killed.elapsed())).await;
    for mut l in locks {
        l.query_drop("UNLOCK TABLES").await.expect("UNLOCK TABLES");
    }

    let (rec, _) = wait_new_primary(&c, primary.alias(), Term::new(1), APPLY_BOUND).await;
    let new = c
        .tablet_by_alias(rec.primary.as_deref().unwrap_or_default())
        .expect("the new primary is a tablet");
    let mut conn = new.root_conn().await.expect("root conn");
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM app.p18_big")
        .await
        .expect("count");
    println!(
        "new primary {} at term {} {:.1} s after the kill with {n:?} of {ROWS} rows",
        new.alias(),
        rec.term,
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(n, Some(ROWS), "the acknowledged transaction was lost");
    let entries = audit(&c).await;
    let progress = entries
        .iter()
        .filter(|e| e.action == "apply_relay_log_progress")
        .count();
    println!("{progress} progress entries while applying");
    if let Some(e) = entries.iter().find(|e| e.action == "apply_relay_log") {
        println!("{}", audit_line(e));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p19_replica_down_then_primary_killed_refuses_until_an_operator_forces_it() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(4)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let w = writer(&c).await;
    let (old, down) = (alias_of(&c, 0), alias_of(&c, 3));
    c.tablet(3).mysqld().kill().expect("kill a replica");
    wait_problem(o, &c, "replica_mysql_unreachable", Some(&down), BOUND).await;
    w.wait_more_acks(10, BOUND)
        .await
        .expect("writes continue with two acking replicas");
    let before = record(&c).await;
    c.tablet(0).mysqld().kill().expect("kill the primary");
    let fault = w.mark_fault();

    // Refused: the unreached replica may hold the only copy of an acknowledged write.
    let refusal = refused_reparent(&c, fault.at_ms).await;
    println!("refusal: {}", audit_line(&refusal));
    assert!(
        refusal.detail.contains("not reached") && refusal.detail.contains(&down),
        "the refusal does not name the unreached replica: {}",
        refusal.detail
    );
    assert!(
        refusal.detail.contains("may_lose_acknowledged_writes"),
        "the refusal does not say how to force it: {}",
        refusal.detail
    );
    assert_record_stays(&c, &before, Duration::from_secs(4)).await;
    for i in [1, 2] {
        assert!(
            read_only(c.tablet(i)).await.expect("replica answers"),
            "a replica was made writable"
        );
    }

    // An operator forces it, naming the risk: done, and audited with the tablet not reached.
    let body = serde_json::json!({"mode": "emergency", "may_lose_acknowledged_writes": true, "requester": "p19"});
    let events = reparent_events(&c, &body, APPLY_BOUND)
        .await
        .expect("reparent stream");
    let done = &events.last().expect("a done event").1;
    assert_eq!(done["ok"], true, "{events:?}");
    let new = done["new_primary"].as_str().unwrap_or_default().to_string();
    assert!([alias_of(&c, 1), alias_of(&c, 2)].contains(&new), "{done}");
    let forced = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| e["event"] == "step" && e["name"] == "revocation")
        .unwrap_or_else(|| panic!("no revocation step: {events:?}"));
    println!("{forced}");
    let detail = forced["detail"].as_str().unwrap_or_default();
    assert!(
        forced["ok"] == true && detail.contains("FORCED") && detail.contains(&down),
        "{forced}"
    );
    let entries = audit(&c).await;
    assert!(
        entries.iter().any(|e| e.action == "revocation"
            && e.detail.contains("FORCED")
            // The authenticated token (the harness's) and the caller's address, not the
            // body's `requester`.
            && e.actor.starts_with("operator:token:harness from 127.0.0.1@")),
        "the forced revocation is not audited with the operator:\n{}",
        audit_text(&entries)
    );
    let rec = record(&c).await;
    assert_eq!(rec.primary.as_deref(), Some(new.as_str()));
    assert_ne!(rec.primary.as_deref(), Some(old.as_str()));
    w.verify(&c).await;
}

/// X1: one corrupt tablet record (of a tablet in no shard in use) must not stop the fleet's
/// recoveries: it is skipped and audited, and the shard fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x1_a_corrupt_tablet_record_does_not_stop_a_failover() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let key = c.topo().keys().tablet("zone9-999");
    c.topo()
        .client()
        .kv_client()
        .put(key.as_str(), "{not json", None)
        .await
        .expect("write garbage into etcd");
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill the primary");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "{rec:?}");
    let entries = audit(&c).await;
    let skipped = audited(&entries, "the corrupt record is not reported", |e| {
        e.action == "unreadable_record"
    });
    assert!(
        skipped.detail.contains("zone9-999"),
        "{}",
        audit_line(skipped)
    );
    w.verify(&c).await;
}

/// X2: the shard record goes back to an older term (an etcd restored from a snapshot) after a
/// failover. The tablets report the newer term; the analysis holds every other fix (acting on
/// the stale record would fail over again, or worse) and the record is reconciled to the one
/// writable tablet that claims the newest promotion, at its term. Never a second writable tablet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x2_a_record_restored_to_an_older_term_is_reconciled_to_the_real_primary() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options(3)).await;
    let o = orch(&c);
    wait_quiet(o, &c, BOUND).await;
    let key = c.topo().keys().shard(c.keyspace(), c.shard());
    let before = c
        .topo()
        .client()
        .kv_client()
        .get(key.as_str(), None)
        .await
        .expect("read the shard record")
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .expect("a shard record");
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill the primary");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    let new = rec.primary.clone().expect("a new primary");
    println!("failed over to {new} at term {}", rec.term);
    // The restore: the record as it was at term 1.
    let restored_ms = topo::now_ms();
    c.topo()
        .client()
        .kv_client()
        .put(key.as_str(), before, None)
        .await
        .expect("restore the old record");
    let (detail, _) = wait_problem(o, &c, "term_ahead_of_record", None, BOUND).await;
    println!("reported: {detail}");
    let (fixed, _) = wait_record(&c, "the record reconciled", BOUND, |r| {
        r.primary.as_deref() == Some(new.as_str()) && r.term == rec.term
    })
    .await;
    println!("reconciled: {fixed:?}");
    // The audit entries land a moment after the record write they describe.
    let entries = wait_audit(&c, "the reconcile step", BOUND, |a| {
        a.iter()
            .any(|e| e.at_ms >= restored_ms && e.action == "reconcile_terms" && e.outcome == "ok")
    })
    .await;
    let since: Vec<&topo::AuditEntry> = entries.iter().filter(|e| e.at_ms >= restored_ms).collect();
    assert!(
        !since.iter().any(|e| e.action == "emergency_reparent"),
        "a second failover on the stale record:\n{}",
        audit_text(&entries)
    );
    for i in [1, 2] {
        let t = c.tablet(i);
        if t.alias() != new {
            assert!(
                read_only(t).await.expect("replica answers"),
                "{} writable",
                t.alias()
            );
        }
    }
    w.wait_more_acks(20, BOUND)
        .await
        .expect("writes flow again");
    w.verify(&c).await;
}

/// Point 9 of the safety work: the audit log is pruned (here to 5 entries per shard, after
/// every entry) instead of growing until etcd's space quota stops every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_pruned_to_its_configured_size() {
    let _serial = SERIAL.lock().await;
    let c = start(ha_options_with(
        3,
        |cfg: &mut harness::OrchestratorConfig| {
            cfg.recovery.audit_keep = 5;
            cfg.recovery.audit_prune_interval = Duration::ZERO;
        },
    ))
    .await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let w = writer(&c).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill the primary");
    w.mark_fault();
    // A failover writes well over 5 entries (each step, the summary).
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    let n = wait_ok(&c, "the audit log pruned to 5 entries", BOUND, || async {
        let a = audit(&c).await;
        if a.len() <= 5 && a.iter().any(|e| e.term == rec.term) {
            Ok(())
        } else {
            Err(format!("{} entries:\n{}", a.len(), audit_text(&a)))
        }
    })
    .await;
    println!(
        "audit log at most 5 entries {:.3} s after the failover",
        n.as_secs_f64()
    );
    w.verify(&c).await;
}
