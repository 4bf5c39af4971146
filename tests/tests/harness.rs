//! The harness itself: a real 3-tablet semi-sync cluster, fault injection on mysqld and etcd,
//! and cleanup when a test panics.

use std::time::{Duration, Instant};
use topo::Term;

use harness::{global_status, pid_alive, rss_kib, Cluster, ClusterOptions, Durability};
use mysql_async::prelude::Queryable;

/// Whether to start the agents (set `MYHA_HARNESS_AGENTS=0` to test without them).
fn with_agents() -> bool {
    std::env::var("MYHA_HARNESS_AGENTS")
        .map(|v| v != "0")
        .unwrap_or(true)
}

async fn count_rows(t: &harness::Tablet) -> i64 {
    let mut c = t.app_conn().await.expect("app conn");
    let n: Option<i64> = c
        .query_first("SELECT COUNT(*) FROM t")
        .await
        .expect("count");
    let _ = c.disconnect().await;
    n.unwrap_or(0)
}

async fn semi_sync_clients(t: &harness::Tablet) -> (u64, String) {
    let mut c = t.root_conn().await.expect("root conn");
    let clients = global_status(&mut c, "Rpl_semi_sync_master_clients")
        .await
        .unwrap()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let status = global_status(&mut c, "Rpl_semi_sync_master_status")
        .await
        .unwrap()
        .unwrap_or_default();
    let _ = c.disconnect().await;
    (clients, status)
}

async fn wait_semi_sync_clients(t: &harness::Tablet, want: u64, timeout: Duration) {
    let start = Instant::now();
    loop {
        let (clients, status) = semi_sync_clients(t).await;
        if clients >= want && status == "ON" {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "semi-sync clients {clients} status {status}, want {want} ON"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tablet_semi_sync_cluster_survives_faults() {
    let agents = with_agents();
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        tablets: 3,
        durability: Durability::SemiSync,
        start_agents: agents,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    eprintln!(
        "3-tablet semi_sync cluster up in {:?} (agents: {agents}) at {}",
        started.elapsed(),
        cluster.dir().display()
    );
    for t in cluster.tablets() {
        let pid = t.mysqld().pid().expect("mysqld runs");
        let agent_rss = t.agent().and_then(|a| a.pid()).and_then(rss_kib);
        eprintln!(
            "{} mysqld pid {pid} RSS {} KiB, agent RSS {agent_rss:?} KiB",
            t.alias(),
            rss_kib(pid).unwrap_or(0)
        );
    }

    // Topology: tablet 0 is primary at term 1.
    let (shard, _) = cluster
        .topo()
        .get_shard("commerce", "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shard.primary.as_deref(), Some("zone1-101"));
    assert_eq!(shard.term, Term::new(1));
    let primary = cluster.primary().await.expect("primary");
    assert_eq!(primary.alias(), "zone1-101");

    // A write as `app` on the primary reaches both replicas, acked by semi-sync.
    let mut pc = primary.app_conn().await.expect("app conn to primary");
    pc.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(32))")
        .await
        .unwrap();
    pc.query_drop("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .await
        .unwrap();
    cluster
        .wait_replicated(Duration::from_secs(10))
        .await
        .expect("replicated");
    for t in &cluster.tablets()[1..] {
        assert_eq!(count_rows(t).await, 2, "{}", t.alias());
        let mut c = t.app_conn().await.unwrap();
        let err = c.query_drop("INSERT INTO t VALUES (9, 'x')").await;
        assert!(err.is_err(), "replica {} must be read-only", t.alias());
    }
    let (clients, status) = semi_sync_clients(primary).await;
    assert_eq!((clients, status.as_str()), (2, "ON"));
    let mut rc = primary.root_conn().await.unwrap();
    let yes: u64 = global_status(&mut rc, "Rpl_semi_sync_master_yes_tx")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(yes >= 2, "yes_tx {yes}");
    let _ = rc.disconnect().await;

    if agents {
        for t in cluster.tablets() {
            let h = t.full_status().await.expect("FullStatus");
            assert!(h.mysql_reachable, "{}: {}", t.alias(), h.mysql_error);
        }
    }

    // SIGKILL a replica's mysqld; the primary keeps committing with the other ack.
    let victim = cluster.tablet(1);
    let old_pid = victim.mysqld().pid().unwrap();
    let t0 = Instant::now();
    victim.mysqld().kill().unwrap();
    assert!(!victim.mysqld().is_running());
    assert!(!pid_alive(old_pid));
    pc.query_drop("INSERT INTO t VALUES (3, 'three')")
        .await
        .unwrap();
    victim
        .mysqld()
        .restart()
        .await
        .expect("restart after SIGKILL");
    eprintln!("replica SIGKILL + restart: {:?}", t0.elapsed());
    assert_ne!(victim.mysqld().pid().unwrap(), old_pid);
    cluster
        .wait_replicated(Duration::from_secs(15))
        .await
        .expect("caught up after restart");
    assert_eq!(count_rows(victim).await, 3);
    wait_semi_sync_clients(primary, 2, Duration::from_secs(10)).await;

    // Clean stop and start of the other replica.
    let other = cluster.tablet(2);
    other.mysqld().stop().await.unwrap();
    assert!(!other.mysqld().is_running());
    other.mysqld().start().await.unwrap();
    cluster
        .wait_replicated(Duration::from_secs(15))
        .await
        .unwrap();

    // SIGSTOP/SIGCONT of a replica: writes still commit (the other replica acks).
    other.mysqld().freeze().unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        pc.query_drop("INSERT INTO t VALUES (4, 'four')"),
    )
    .await
    .expect("write not blocked by one frozen replica")
    .unwrap();
    other.mysqld().thaw().unwrap();
    cluster
        .wait_replicated(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(count_rows(other).await, 4);

    // etcd: SIGKILL and restart on the same ports and data.
    let etcd = cluster.etcd();
    let endpoint = etcd.endpoint();
    etcd.kill().unwrap();
    assert!(!etcd.is_running());
    let t0 = Instant::now();
    etcd.restart().await.expect("etcd restart");
    eprintln!("etcd restart: {:?}", t0.elapsed());
    assert_eq!(etcd.endpoint(), endpoint);
    let (shard, _) = cluster
        .topo()
        .get_shard("commerce", "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shard.primary.as_deref(), Some("zone1-101"));

    if agents {
        // Killed and restarted agent answers again.
        let a = cluster.tablet(2).agent_proc().unwrap();
        a.kill().unwrap();
        a.restart().await.expect("agent restart");
        cluster
            .wait_agents_healthy(Duration::from_secs(20))
            .await
            .expect("agents healthy");
    }
    let _ = pc.disconnect().await;
    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    assert!(!dir.exists(), "temp dir removed on drop");
}

#[test]
fn processes_are_killed_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cluster = Cluster::start(ClusterOptions {
                tablets: 1,
                durability: Durability::None,
                start_agents: false,
                ..ClusterOptions::default()
            })
            .await
            .expect("cluster starts");
            let pids = vec![
                cluster.etcd().pid().unwrap(),
                cluster.tablet(0).mysqld().pid().unwrap(),
            ];
            tx.send((pids, cluster.dir().to_path_buf())).unwrap();
            panic!("deliberate panic with a live cluster");
        })
    });
    assert!(handle.join().is_err(), "the thread panicked");
    let (pids, dir) = rx.recv().expect("cluster started before the panic");
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} still alive after the panic");
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_cluster_outlives_its_handle_until_sandbox_down() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("sb");
    let cluster = Cluster::start(ClusterOptions {
        tablets: 1,
        durability: Durability::None,
        start_agents: false,
        base_dir: Some(dir.clone()),
        new_session: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let state = cluster.detach().expect("detach");
    let pids: Vec<u32> = state.running().into_iter().map(|(_, p)| p).collect();
    assert_eq!(pids.len(), 2, "etcd and mysqld run after detach: {state:?}");
    assert!(dir.join(harness::sandbox::STATE_FILE).exists());
    let report = harness::sandbox::down(&dir, Duration::from_secs(20))
        .await
        .expect("down");
    assert!(
        report.iter().all(|s| s.outcome == "terminated"),
        "{report:?}"
    );
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} survived down");
    }
    assert!(!dir.join(harness::sandbox::STATE_FILE).exists());
}

#[tokio::test]
async fn a_mysqld_that_cannot_start_reports_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = harness::MysqldOptions::new("mysqld broken", dir.path().join("m"), 7);
    opts.extra_args = vec!["--no-such-option-here=1".into()];
    let err = harness::Mysqld::launch(opts).await.unwrap_err().to_string();
    assert!(err.contains("mysqld broken failed to start"), "{err}");
    assert!(err.contains("mysqld.log"), "{err}");
    assert!(err.contains("no-such-option-here"), "{err}");
}

/// `Cluster::start` returns with no DDL of the cluster's own still on its way to the replicas:
/// the primary's agent has created its heartbeat table and every replica has applied that
/// (and a heartbeat row). Before, the table's creation was replicated while a test was already
/// killing replicas, and a replica SIGKILLed amid it came back with its SQL thread stopped on
/// error 1950 (`replica_killed_right_after_cluster_start_stress` with `MYHA_STRESS_AIM=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_start_returns_with_the_agents_ddl_replicated() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    for t in &cluster.tablets()[1..] {
        let mut c = t.root_conn().await.unwrap();
        let tables: Option<i64> = c
            .query_first(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = '_myha' AND table_name = 'heartbeat'",
            )
            .await
            .unwrap();
        assert_eq!(tables, Some(1), "{}: no _myha.heartbeat yet", t.alias());
        let rows: Option<i64> = c
            .query_first("SELECT COUNT(*) FROM _myha.heartbeat")
            .await
            .unwrap();
        assert_eq!(rows, Some(1), "{}: no heartbeat row yet", t.alias());
        let _ = c.disconnect().await;
    }
}

/// One `SELECT @@global.name` over root's socket connection.
async fn gvar(c: &mut mysql_async::Conn, name: &str) -> String {
    harness::global_var(c, name)
        .await
        .unwrap_or_else(|e| Some(format!("<{e}>")))
        .unwrap_or_default()
}

/// The bytes appended to `path` since offset `from`, as text.
fn log_since(path: &std::path::Path, from: u64) -> String {
    let all = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&all[(from as usize).min(all.len())..]).into_owned()
}

/// Stress (run by hand, bounded by `MYHA_STRESS_CYCLES`, default 60): writes flow on the primary
/// (semi-sync, AFTER_SYNC) while a replica's mysqld is SIGKILLed and restarted over and over
/// (the two replicas in turn). After each restart the replica must run both replication
/// threads and catch up with the primary; a stopped SQL thread (error 1950, "out-of-order
/// sequence number": its `gtid_slave_pos` behind its own binlog after the crash) is recorded
/// with the replica's GTID state and log, repaired and counted. Extra mysqld arguments:
/// `MYHA_STRESS_MYSQLD_ARGS` (space-separated); `MYHA_STRESS_DDL=1` mixes DDL into the writes,
/// `MYHA_STRESS_BIG=1` makes every write a 256 KiB row (longer commits on the replica),
/// `MYHA_STRESS_SEMI_SQL=1` starts the replicas without the semi-sync startup flag and turns their
/// semi-sync side on with SQL after each restart, `MYHA_STRESS_STOP=1` stops mysqld cleanly
/// (SIGTERM) instead of killing it.
///
/// Measured on MariaDB 10.11.19 (100 kills each unless said): row writes only, 0 failures in 60;
/// with DDL, 14 (startup flag) and 18 (flag off, semi-sync set by SQL) failures, one kind with
/// the same GTID in the binlog (a `DROP TABLE` binlogged, its GTID not recorded), the other with
/// the replica's own server id (DDL-log recovery binlogging the interrupted `DROP TABLE` again);
/// clean stops with DDL, 0 in 50. No restart logged a binlog truncation. DDL mode fails by
/// design: MariaDB's limitation, kept as a probe (a repair of 1950 would make it pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress: run by hand"]
async fn replica_sigkill_restart_stress() {
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let cycles: usize = std::env::var("MYHA_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let extra: Vec<String> = std::env::var("MYHA_STRESS_MYSQLD_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let ddl = std::env::var("MYHA_STRESS_DDL").is_ok_and(|v| v == "1");
    let big = std::env::var("MYHA_STRESS_BIG").is_ok_and(|v| v == "1");
    let semi_sql = std::env::var("MYHA_STRESS_SEMI_SQL").is_ok_and(|v| v == "1");
    let clean_stop = std::env::var("MYHA_STRESS_STOP").is_ok_and(|v| v == "1");
    let mut extra = extra;
    if semi_sql {
        extra.push("--rpl-semi-sync-slave-enabled=OFF".into());
    }
    let cluster = Arc::new(
        Cluster::start(ClusterOptions {
            tablets: 3,
            durability: Durability::SemiSync,
            mysqld_args: extra.clone(),
            ..ClusterOptions::default()
        })
        .await
        .expect("cluster starts"),
    );
    eprintln!(
        "stress: {cycles} cycles, extra mysqld args {extra:?}, ddl {ddl}, big {big}, dir {}",
        cluster.dir().display()
    );
    {
        let mut c = cluster.tablet(1).root_conn().await.unwrap();
        let engine: Option<String> = c
            .query_first(
                "SELECT engine FROM information_schema.tables \
                 WHERE table_schema='mysql' AND table_name='gtid_slave_pos'",
            )
            .await
            .unwrap();
        eprintln!("mysql.gtid_slave_pos engine: {engine:?}");
        for v in [
            "sync_binlog",
            "innodb_flush_log_at_trx_commit",
            "rpl_semi_sync_slave_enabled",
            "init_rpl_role",
            "relay_log_recovery",
        ] {
            eprintln!("  {v} = {}", gvar(&mut c, v).await);
        }
    }
    let primary = cluster.tablet(0);
    let mut pc = primary.app_conn().await.unwrap();
    pc.query_drop("CREATE TABLE s (id BIGINT PRIMARY KEY, v MEDIUMTEXT)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, cluster) = (stop.clone(), written.clone(), cluster.clone());
        tokio::spawn(async move {
            let mut c = cluster.tablet(0).app_conn().await.unwrap();
            let mut id = 0u64;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                let q = if ddl && id.is_multiple_of(40) {
                    format!("CREATE TABLE d{id} (i INT PRIMARY KEY)")
                } else if ddl && id % 40 == 20 && id > 40 {
                    format!("DROP TABLE d{}", id - 20)
                } else if big {
                    format!("INSERT INTO s VALUES ({id}, REPEAT('x', 262144))")
                } else {
                    format!("INSERT INTO s VALUES ({id}, 'row {id}')")
                };
                c.query_drop(q).await.expect("write on the primary");
                written.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let mut failures: Vec<String> = Vec::new();
    let mut truncations = 0usize;
    let mut restart_times = Vec::new();
    for cycle in 0..cycles {
        assert!(!writer.is_finished(), "the writer stopped");
        let victim = cluster.tablet(1 + cycle % 2);
        let pause = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let log = victim.mysqld().log_path().to_path_buf();
        let log_len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if clean_stop {
            victim.mysqld().stop().await.unwrap();
        } else {
            victim.mysqld().kill().unwrap();
        }
        let t0 = Instant::now();
        victim
            .mysqld()
            .start()
            .await
            .expect("restart after SIGKILL");
        restart_times.push(t0.elapsed());
        if semi_sql {
            let mut c = victim.root_conn().await.unwrap();
            for q in [
                "SET GLOBAL rpl_semi_sync_slave_enabled = ON",
                "STOP SLAVE IO_THREAD",
                "START SLAVE IO_THREAD",
            ] {
                c.query_drop(q).await.unwrap();
            }
            let _ = c.disconnect().await;
        }
        // Caught up with the primary's position of now, both threads running.
        let mut rc = primary.root_conn().await.unwrap();
        let target = gvar(&mut rc, "gtid_binlog_pos").await;
        let _ = rc.disconnect().await;
        let mut vc = victim.root_conn().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            let st = harness::slave_status(&mut vc).await.unwrap().unwrap();
            let get = |k: &str| st.get(k).cloned().flatten().unwrap_or_default();
            if get("Last_SQL_Errno") != "0" {
                break Err(format!(
                    "SQL thread error {}: {}",
                    get("Last_SQL_Errno"),
                    get("Last_SQL_Error")
                ));
            }
            if get("Slave_SQL_Running") == "Yes" && get("Slave_IO_Running") == "Yes" {
                let r: Option<i64> = vc
                    .query_first(format!("SELECT MASTER_GTID_WAIT('{target}', 0.5)"))
                    .await
                    .unwrap();
                if r == Some(0) {
                    break Ok(());
                }
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "not caught up with {target} in 30 s: io {} ({}), sql {}",
                    get("Slave_IO_Running"),
                    get("Last_IO_Error"),
                    get("Slave_SQL_Running")
                ));
            }
        };
        let new_log = log_since(&log, log_len);
        if new_log.to_lowercase().contains("truncat") {
            truncations += 1;
        }
        if let Err(e) = outcome {
            let rows: Vec<(u32, u64, u32, u64)> = vc
                .query(
                    "SELECT domain_id, sub_id, server_id, seq_no FROM mysql.gtid_slave_pos \
                     ORDER BY sub_id DESC LIMIT 4",
                )
                .await
                .unwrap_or_default();
            let report = format!(
                "cycle {cycle} {}: {e}\n  gtid_slave_pos {} gtid_binlog_pos {} gtid_current_pos {}\n  \
                 mysql.gtid_slave_pos (newest) {rows:?}\n  log since the kill:\n{new_log}",
                victim.alias(),
                gvar(&mut vc, "gtid_slave_pos").await,
                gvar(&mut vc, "gtid_binlog_pos").await,
                gvar(&mut vc, "gtid_current_pos").await,
            );
            eprintln!("FAILURE {report}");
            failures.push(report);
            // Repair to go on measuring: the failed transaction's effect is already there
            // (its GTID is in the binlog), so skip it.
            for q in [
                "STOP SLAVE",
                "SET GLOBAL sql_slave_skip_counter = 1",
                "START SLAVE",
            ] {
                vc.query_drop(q).await.unwrap();
            }
        }
        let _ = vc.disconnect().await;
        // Both replicas acking again before the next kill (a second one down blocks writes).
        wait_semi_sync_clients(primary, 2, Duration::from_secs(30)).await;
        if cycle % 10 == 9 {
            eprintln!(
                "stress: {} cycles, {} failures, {} writes",
                cycle + 1,
                failures.len(),
                written.load(Ordering::SeqCst)
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let _ = pc.disconnect().await;
    restart_times.sort();
    eprintln!(
        "stress done: {cycles} cycles, {} failures ({} with 1950), {} restarts logged a binlog \
         truncation, {} writes, restart median {:?} max {:?}",
        failures.len(),
        failures.iter().filter(|f| f.contains("error 1950")).count(),
        truncations,
        written.load(Ordering::SeqCst),
        restart_times[restart_times.len() / 2],
        restart_times.last().unwrap()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Stress (run by hand, `MYHA_STRESS_CYCLES`, default 40 fresh clusters): the opening of
/// `three_tablet_semi_sync_cluster_survives_faults`, many times over. A replica's mysqld is
/// SIGKILLed at a random moment within 400 ms of `Cluster::start` returning, while writes go
/// on, then restarted; it must run both replication threads and catch up. A replica killed
/// while applying a DDL (MariaDB: the DDL is binlogged before `gtid_slave_pos` records it) comes
/// back with its SQL thread stopped on error 1950, so no DDL may still be on its way to the
/// replicas when `Cluster::start` returns (the primary's agent creates its heartbeat table).
/// `MYHA_STRESS_AIM=1`: kill the moment the replica's SQL thread is seen running the agent's DDL
/// with the replica's binlog ahead of its `gtid_slave_pos` instead, when seen within 3 s.
/// Measured with `MYHA_STRESS_AIM=1`: before the launcher waited for the agent's DDL, 5 of 30
/// clusters failed with CI's very error (GTID 0-101-17, 12 kills landed amid the DDL); after,
/// 0 of 20 (the DDL is never in flight any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress: run by hand"]
async fn replica_killed_right_after_cluster_start_stress() {
    use rand::Rng;
    let cycles: usize = std::env::var("MYHA_STRESS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let aim = std::env::var("MYHA_STRESS_AIM").is_ok_and(|v| v == "1");
    let mut aimed = 0usize;
    let mut failures = Vec::new();
    for cycle in 0..cycles {
        let cluster = Cluster::start(ClusterOptions::default())
            .await
            .expect("cluster starts");
        let primary = cluster.tablet(0);
        let mut pc = primary.app_conn().await.unwrap();
        pc.query_drop("CREATE TABLE t (id INT PRIMARY KEY)")
            .await
            .unwrap();
        pc.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
        cluster
            .wait_replicated(Duration::from_secs(10))
            .await
            .unwrap();
        let victim = cluster.tablet(1);
        let delay = if aim {
            // Aim at the agent's DDL: kill while the replica's SQL thread runs a statement
            // creating something in `_myha` and its binlog is ahead of its `gtid_slave_pos`
            // (binlogged, not yet recorded), if that is ever seen.
            let mut vc = victim.root_conn().await.unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let n: Option<i64> = vc
                    .query_first(
                        "SELECT COUNT(*) FROM information_schema.processlist \
                         WHERE command = 'Slave_SQL' AND info LIKE 'CREATE %\\_myha%' \
                         AND @@gtid_binlog_pos <> @@gtid_slave_pos",
                    )
                    .await
                    .unwrap();
                if n.unwrap_or(0) > 0 {
                    aimed += 1;
                    break;
                }
            }
            drop(vc);
            0
        } else {
            rand::rng().random_range(0..400)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        victim.mysqld().kill().unwrap();
        pc.query_drop("INSERT INTO t VALUES (2)").await.unwrap();
        victim
            .mysqld()
            .start()
            .await
            .expect("restart after SIGKILL");
        if let Err(e) = cluster.wait_replicated(Duration::from_secs(15)).await {
            eprintln!("FAILURE cycle {cycle} (kill {delay} ms after the writes): {e}");
            failures.push(format!("cycle {cycle}: {e}"));
        }
        let _ = pc.disconnect().await;
        if cycle % 10 == 9 {
            eprintln!("stress: {} cycles, {} failures", cycle + 1, failures.len());
        }
    }
    eprintln!(
        "stress done: {cycles} clusters, {} failures ({} with 1950), {aimed} kills amid the \
         agent's DDL",
        failures.len(),
        failures
            .iter()
            .filter(|f| f.contains("out-of-order"))
            .count()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
