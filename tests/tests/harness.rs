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
