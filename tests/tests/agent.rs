//! The agent against real MariaDB and etcd processes: every action, health under injected
//! faults, lease expiry, self-fencing, and bad input.

use std::time::{Duration, Instant};
use topo::Term;

use harness::{Cluster, ClusterOptions};
use myha_proto::agent::{self as pb, agent_client::AgentClient};
use mysql_async::prelude::Queryable;
use tonic::transport::Channel;
use tonic::Code;
use topo::{ShardLock, ShardRecord};

const GENEROUS: Duration = Duration::from_secs(15);

/// An action context of a caller holding a shard lock of epoch `lock_epoch`. The agents admit
/// an action only from the lock's holder in etcd: each test takes the lock
/// ([`Cluster::lock_shard`]) and sends its epoch.
fn ctx_epoch(term: u64, lock_epoch: u64) -> Option<pb::ActionContext> {
    Some(pb::ActionContext {
        term,
        timeout_ms: 10_000,
        requester: format!("agent-test (epoch {lock_epoch})"),
        lock_epoch,
    })
}

/// Takes the shard lock as an orchestrator does before it acts: the lock (held until dropped
/// or released) and its epoch, for [`ctx_epoch`].
async fn act_as_holder(c: &Cluster) -> (ShardLock, u64) {
    let lock = c.lock_shard("agent-test").await.expect("shard lock");
    let epoch = lock.epoch();
    (lock, epoch)
}

/// `@@read_only` asked from the tablet's mysqld itself.
/// Stops tablet `i`'s IO thread and waits until its SQL thread has applied all it received.
async fn drain_relay_log(c: &Cluster, i: usize) {
    let mut conn = c.tablet(i).root_conn().await.expect("root conn");
    conn.query_drop("STOP SLAVE IO_THREAD")
        .await
        .expect("stop the IO thread");
    let st = harness::slave_status(&mut conn)
        .await
        .expect("slave status")
        .expect("a replica");
    let received = st.get("Gtid_IO_Pos").cloned().flatten().unwrap_or_default();
    let applied: Option<i64> = conn
        .query_first(format!("SELECT MASTER_GTID_WAIT('{received}', 10)"))
        .await
        .expect("MASTER_GTID_WAIT");
    assert_eq!(
        applied,
        Some(0),
        "{} did not apply {received}",
        c.tablet(i).alias()
    );
}

async fn mysqld_read_only(c: &Cluster, i: usize) -> bool {
    let mut conn = c.tablet(i).root_conn().await.expect("root conn");
    let v: Option<u8> = conn
        .query_first("SELECT @@global.read_only")
        .await
        .expect("read_only");
    let _ = conn.disconnect().await;
    v == Some(1)
}

async fn client(c: &Cluster, i: usize) -> AgentClient<Channel> {
    c.tablet(i)
        .agent_proc()
        .expect("agent started")
        .client()
        .await
        .expect("agent gRPC reachable")
}

/// Follows the agent's health stream until `pred` holds; returns how long that took.
async fn wait_health(
    agent: &mut AgentClient<Channel>,
    what: &str,
    bound: Duration,
    pred: impl Fn(&pb::Health) -> bool,
) -> (Duration, pb::Health) {
    let start = Instant::now();
    let mut stream = agent
        .stream_health(pb::StreamHealthRequest {})
        .await
        .expect("stream health")
        .into_inner();
    loop {
        let left = bound.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(h))) if pred(&h) => return (start.elapsed(), h),
            Ok(Ok(Some(_))) => {}
            Ok(other) => panic!("health stream ended while waiting for {what}: {other:?}"),
            Err(_) => panic!("{what}: not seen within {bound:?}"),
        }
    }
}

fn running(h: &pb::Health) -> (bool, bool) {
    let r = h.replication.clone().unwrap_or_default();
    (
        r.io_state == pb::ThreadState::Running as i32,
        r.sql_state == pb::ThreadState::Running as i32,
    )
}

fn read_only(h: &pb::Health) -> Option<bool> {
    h.mysql.as_ref().map(|m| m.read_only)
}

/// Tablet `i`'s `SHOW SLAVE STATUS` column `name` (empty when NULL or missing).
async fn slave_col(c: &Cluster, i: usize, name: &str) -> String {
    let mut conn = c.tablet(i).root_conn().await.expect("root conn");
    let st = harness::slave_status(&mut conn)
        .await
        .expect("slave status")
        .unwrap_or_default();
    let _ = conn.disconnect().await;
    st.get(name).cloned().flatten().unwrap_or_default()
}

/// Tablet `i` replicates over TLS, verifying its source's certificate with the cluster's CA.
async fn assert_replicates_over_tls(c: &Cluster, i: usize) {
    let alias = c.tablet(i).alias();
    assert_eq!(
        slave_col(c, i, "Master_SSL_Allowed").await,
        "Yes",
        "{alias}"
    );
    assert_eq!(
        slave_col(c, i, "Master_SSL_Verify_Server_Cert").await,
        "Yes",
        "{alias}"
    );
    assert_eq!(
        slave_col(c, i, "Master_SSL_CA_File").await,
        c.certs().ca_file().display().to_string(),
        "{alias}"
    );
}

/// Waits until tablet `i`'s IO thread fails with `errno`; returns its error text.
async fn wait_io_error(c: &Cluster, i: usize, errno: &str) -> String {
    let deadline = Instant::now() + GENEROUS;
    loop {
        let (got, running) = (
            slave_col(c, i, "Last_IO_Errno").await,
            slave_col(c, i, "Slave_IO_Running").await,
        );
        if got == errno && running != "Yes" {
            return slave_col(c, i, "Last_IO_Error").await;
        }
        assert!(
            Instant::now() < deadline,
            "{}: IO thread {running}, error {got}, not {errno}",
            c.tablet(i).alias()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write_row(c: &Cluster, i: usize, v: &str) -> Result<(), mysql_async::Error> {
    let mut conn = c.tablet(i).app_conn().await.expect("app conn");
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64))",
    )
    .await?;
    conn.exec_drop("INSERT INTO t (v) VALUES (?)", (v,)).await
}

async fn count_rows(c: &Cluster, i: usize, v: &str) -> u64 {
    let mut conn = c.tablet(i).app_conn().await.expect("app conn");
    conn.exec_first::<u64, _, _>("SELECT COUNT(*) FROM app.t WHERE v = ?", (v,))
        .await
        .expect("count")
        .unwrap_or(0)
}

/// Names `primary` at `term` in the shard record, under the shard lock the caller holds.
async fn write_shard_record(lock: &ShardLock, c: &Cluster, primary: &str, term: u64) {
    let mut rec = ShardRecord::new(c.keyspace(), c.shard());
    rec.primary = Some(primary.to_string());
    rec.term = Term::new(term);
    rec.term_start_ms = topo::now_ms();
    lock.update_shard(&rec).await.expect("update shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_against_a_real_cluster() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let (lock, epoch) = act_as_holder(&c).await;
    let ctx = |term| ctx_epoch(term, epoch);
    let (p, r1, r2) = (0, 1, 2);
    let mut a_p = client(&c, p).await;
    let mut a_r1 = client(&c, r1).await;
    let mut a_r2 = client(&c, r2).await;

    // Bootstrap state as the agents see it. The role comes from the shard record, which the
    // agent reads from etcd in the background (its registration can be visible first).
    let (_, h) = wait_health(&mut a_p, "the primary role", GENEROUS, |h| {
        h.tablet_type == pb::TabletType::Primary as i32
    })
    .await;
    assert_eq!((h.term, h.promoted_term), (1, 1));
    assert_eq!(read_only(&h), Some(false));
    assert!(h.semi_sync.as_ref().unwrap().primary_enabled);
    let h = a_r1
        .full_status(pb::FullStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.tablet_type, pb::TabletType::Replica as i32);
    assert_eq!(running(&h), (true, true));
    assert_eq!(h.mysql.as_ref().unwrap().flavor, "mariadb");

    // A stale term is refused with both terms named.
    let err = a_r1
        .stop_replication(pb::StopReplicationRequest {
            ctx: ctx(0),
            scope: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("stale term 0 < known term 1"),
        "{}",
        err.message()
    );
    // The contract's structured refusal: callers read the details, not the message.
    assert_eq!(
        myha_proto::stale_term_refusal(&err),
        Some(pb::StaleTermRefusal {
            requested_term: 0,
            requested_epoch: epoch,
            known_term: 1,
            known_epoch: 0,
        }),
        "{err:?}"
    );

    // Stop IO only, twice (idempotent), then start again.
    for _ in 0..2 {
        a_r1.stop_replication(pb::StopReplicationRequest {
            ctx: ctx(1),
            scope: pb::ReplicationScope::IoOnly as i32,
        })
        .await
        .expect("stop io");
    }
    let (_, h) = wait_health(&mut a_r1, "IO stopped, SQL running", GENEROUS, |h| {
        running(h) == (false, true)
    })
    .await;
    assert!(h.replication.unwrap().configured);
    a_r1.start_replication(pb::StartReplicationRequest {
        ctx: ctx(1),
        scope: 0,
    })
    .await
    .expect("start");
    wait_health(&mut a_r1, "replicating again", GENEROUS, |h| {
        running(h) == (true, true)
    })
    .await;

    // WaitForPosition: reached, not reached within its deadline, and malformed.
    write_row(&c, p, "first").await.expect("write on primary");
    let pos = a_p
        .full_status(pb::FullStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .mysql
        .unwrap()
        .gtid_position;
    let r = a_r2
        .wait_for_position(pb::WaitForPositionRequest {
            ctx: ctx(1),
            gtid_position: pos.clone(),
            ..Default::default()
        })
        .await
        .expect("position reached")
        .into_inner();
    // The reply is the replica's position when the wait ended: at least `pos`, and possibly
    // past it (the primary's heartbeat keeps writing).
    let reached = gtid::MariaDbPosition::parse(&r.gtid_position).expect("reply parses");
    let wanted = gtid::MariaDbPosition::parse(&pos).expect("position parses");
    assert!(
        reached.contains(&wanted),
        "WaitForPosition answered {} for a wait on {pos}",
        r.gtid_position
    );
    let err = a_r2
        .wait_for_position(pb::WaitForPositionRequest {
            ctx: Some(pb::ActionContext {
                term: 1,
                timeout_ms: 300,
                requester: String::new(),
                lock_epoch: epoch,
            }),
            gtid_position: "0-101-999999".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("still at"), "{}", err.message());
    let err = a_r2
        .wait_for_position(pb::WaitForPositionRequest {
            ctx: ctx(1),
            gtid_position: "0-x-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // SetReadOnly both ways on a replica.
    a_r2.set_read_only(pb::SetReadOnlyRequest {
        ctx: ctx(1),
        read_only: false,
        super_read_only: false,
    })
    .await
    .expect("read_only off");
    wait_health(&mut a_r2, "writable", GENEROUS, |h| {
        read_only(h) == Some(false)
    })
    .await;
    a_r2.set_read_only(pb::SetReadOnlyRequest {
        ctx: ctx(1),
        read_only: true,
        super_read_only: true,
    })
    .await
    .expect("read_only on");
    wait_health(&mut a_r2, "read-only", GENEROUS, |h| {
        read_only(h) == Some(true)
    })
    .await;

    // Semi-sync replica side off then on (the IO thread is restarted so it takes effect).
    a_r2.set_semi_sync(pb::SetSemiSyncRequest {
        ctx: ctx(1),
        primary: None,
        replica: Some(false),
    })
    .await
    .expect("semi off");
    wait_health(&mut a_r2, "semi-sync replica off", GENEROUS, |h| {
        !h.semi_sync.as_ref().unwrap().replica_enabled
    })
    .await;
    a_r2.set_semi_sync(pb::SetSemiSyncRequest {
        ctx: ctx(1),
        primary: None,
        replica: Some(true),
    })
    .await
    .expect("semi on");
    let err = a_r2
        .set_semi_sync(pb::SetSemiSyncRequest {
            ctx: ctx(1),
            primary: None,
            replica: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Demote then UndoDemote leaves the primary writable again.
    let r = a_p
        .demote(pb::DemoteRequest { ctx: ctx(1) })
        .await
        .expect("demote")
        .into_inner();
    assert!(!r.gtid_position.is_empty());
    assert!(
        write_row(&c, p, "refused").await.is_err(),
        "a demoted primary takes no write"
    );
    a_p.demote(pb::DemoteRequest { ctx: ctx(1) })
        .await
        .expect("demote again (idempotent)");
    a_p.undo_demote(pb::UndoDemoteRequest { ctx: ctx(1) })
        .await
        .expect("undo demote");
    write_row(&c, p, "after-undo")
        .await
        .expect("writable after undo");
    let err = a_p
        .undo_demote(pb::UndoDemoteRequest { ctx: ctx(1) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "nothing left to undo");
    assert_eq!(
        myha_proto::stale_term_refusal(&err),
        None,
        "a refusal for another reason is no stale-term refusal: {err:?}"
    );

    // ResetReplication forgets the source; SetReplicationSource brings it back.
    a_r2.reset_replication(pb::ResetReplicationRequest { ctx: ctx(1) })
        .await
        .expect("reset");
    wait_health(&mut a_r2, "no source", GENEROUS, |h| {
        !h.replication.as_ref().unwrap().configured
    })
    .await;
    a_r2.reset_replication(pb::ResetReplicationRequest { ctx: ctx(1) })
        .await
        .expect("reset again (idempotent)");
    let err = a_r2
        .start_replication(pb::StartReplicationRequest {
            ctx: ctx(1),
            scope: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let primary_port = c.tablet(p).mysqld().port();
    a_r2.set_replication_source(pb::SetReplicationSourceRequest {
        ctx: ctx(1),
        host: "127.0.0.1".into(),
        port: primary_port.into(),
        semi_sync: true,
        start_replication: true,
    })
    .await
    .expect("repoint");
    wait_health(&mut a_r2, "replicating from the primary", GENEROUS, |h| {
        running(h) == (true, true)
    })
    .await;
    let r = a_r2
        .set_replication_source(pb::SetReplicationSourceRequest {
            ctx: ctx(1),
            host: "127.0.0.1".into(),
            port: primary_port.into(),
            semi_sync: true,
            start_replication: true,
        })
        .await
        .expect("repoint again")
        .into_inner();
    assert!(
        r.steps.iter().any(|s| s.starts_with("already replicating")),
        "{:?}",
        r.steps
    );

    // A reparent by hand with the actions: demote, catch up, promote under term 2, repoint.
    let demoted = a_p
        .demote(pb::DemoteRequest { ctx: ctx(1) })
        .await
        .unwrap()
        .into_inner();
    a_r1.wait_for_position(pb::WaitForPositionRequest {
        ctx: ctx(1),
        gtid_position: demoted.gtid_position.clone(),
        ..Default::default()
    })
    .await
    .expect("candidate caught up");
    let promoted = a_r1
        .promote(pb::PromoteRequest {
            ctx: ctx(2),
            durability: pb::Durability::SemiSync as i32,
        })
        .await
        .expect("promote")
        .into_inner();
    assert_eq!(promoted.term, 2);
    a_r1.promote(pb::PromoteRequest {
        ctx: ctx(2),
        durability: pb::Durability::SemiSync as i32,
    })
    .await
    .expect("promote again (idempotent)");
    let new_port = c.tablet(r1).mysqld().port();
    for a in [&mut a_r2, &mut a_p] {
        a.set_replication_source(pb::SetReplicationSourceRequest {
            ctx: ctx(2),
            host: "127.0.0.1".into(),
            port: new_port.into(),
            semi_sync: true,
            start_replication: true,
        })
        .await
        .expect("repoint to the new primary");
    }
    write_shard_record(&lock, &c, c.tablet(r1).alias(), 2).await;
    write_row(&c, r1, "on-new-primary")
        .await
        .expect("write on the new primary");
    for i in [p, r2] {
        let deadline = Instant::now() + GENEROUS;
        while count_rows(&c, i, "on-new-primary").await != 1 {
            assert!(Instant::now() < deadline, "row did not reach tablet {i}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A replica's semi-sync registration may be counted a poll after the role changed.
    let (_, h) = wait_health(
        &mut a_r1,
        "new primary role with a semi-sync replica",
        GENEROUS,
        |h| {
            h.tablet_type == pb::TabletType::Primary as i32
                && h.semi_sync.as_ref().is_some_and(|s| s.primary_clients >= 1)
        },
    )
    .await;
    assert_eq!((h.term, h.promoted_term), (2, 2));
    let (_, h) = wait_health(&mut a_p, "old primary is a replica", GENEROUS, |h| {
        h.tablet_type == pb::TabletType::Replica as i32 && running(h) == (true, true)
    })
    .await;
    assert_eq!(h.promoted_term, 0);
    assert!(!h.fenced, "a repointed old primary is not fenced");
    // The repoints replicate over TLS (the replication user requires it): the old primary was
    // never a replica before, so only the agent's CHANGE MASTER gave it these settings.
    for i in [p, r2] {
        assert_replicates_over_tls(&c, i).await;
    }
    // Term 2 belongs to the new primary: nobody else can be promoted under it. Known to r2's
    // agent once its etcd watch delivered the record (it then probes that primary); before,
    // it would only know the term from the repoint, not whose it is.
    wait_health(
        &mut a_r2,
        "the record naming the new primary",
        GENEROUS,
        |h| {
            h.primary_probe
                .as_ref()
                .is_some_and(|p| p.primary_alias == "zone1-102")
        },
    )
    .await;
    let err = a_r2
        .promote(pb::PromoteRequest {
            ctx: ctx(2),
            durability: pb::Durability::SemiSync as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("belongs to primary zone1-102"),
        "{}",
        err.message()
    );
    // Everyone now refuses term 1.
    for a in [&mut a_p, &mut a_r1, &mut a_r2] {
        let err = a
            .set_read_only(pb::SetReadOnlyRequest {
                ctx: ctx(1),
                read_only: true,
                super_read_only: true,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflects_faults_within_two_poll_intervals() {
    // A slow poll makes "two poll intervals" a meaningful bound; the extra second covers the
    // poll's own queries and the stream's setup on a loaded machine.
    let poll = Duration::from_secs(1);
    let bound = 2 * poll + Duration::from_secs(1);
    let c = Cluster::start(ClusterOptions {
        poll_interval: poll,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let mut a = client(&c, 1).await;
    wait_health(&mut a, "replicating", GENEROUS, |h| {
        running(h) == (true, true)
    })
    .await;
    let mut root = c.tablet(1).admin_conn().await.unwrap();

    root.query_drop("SET GLOBAL read_only = OFF").await.unwrap();
    let (took, _) = wait_health(&mut a, "read_only flipped", bound, |h| {
        read_only(h) == Some(false)
    })
    .await;
    println!("read_only flip seen after {took:?}");

    root.query_drop("STOP SLAVE").await.unwrap();
    let (took, _) = wait_health(&mut a, "replication stopped", bound, |h| {
        running(h) == (false, false)
    })
    .await;
    println!("replication stop seen after {took:?}");

    // Lag grows while nothing is applied, from the primary's heartbeat row.
    let (_, h) = wait_health(&mut a, "lag grows", GENEROUS, |h| {
        h.lag_ms.unwrap_or(0) > 1_000
    })
    .await;
    println!("lag with replication stopped: {:?} ms", h.lag_ms);
    root.query_drop("START SLAVE").await.unwrap();
    let (_, h) = wait_health(&mut a, "lag back under 1 s", GENEROUS, |h| {
        running(h) == (true, true) && h.lag_ms.is_some_and(|l| l < 1_000)
    })
    .await;
    println!("lag after restart: {:?} ms", h.lag_ms);

    c.tablet(1).mysqld().kill().unwrap();
    let (took, h) = wait_health(&mut a, "mysqld unreachable", bound, |h| !h.mysql_reachable).await;
    println!("mysqld kill seen after {took:?}: {}", h.mysql_error);
    assert!(!h.mysql_error.is_empty());
    assert!(
        c.tablet(1).agent_proc().unwrap().is_running(),
        "the agent never exits for mysqld"
    );

    c.tablet(1).mysqld().restart().await.unwrap();
    wait_health(&mut a, "mysqld back", GENEROUS, |h| h.mysql_reachable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_a_dead_agent_and_etcd_loss_is_survived() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let alias = c.tablet(2).alias().to_string();
    assert!(c.topo().get_tablet(&alias).await.unwrap().is_some());

    // etcd down: agents keep running and serving; registration returns when etcd does.
    c.etcd().kill().unwrap();
    let mut a = client(&c, 1).await;
    wait_health(&mut a, "etcd link lost", GENEROUS, |h| !h.etcd_connected).await;
    let h = a
        .full_status(pb::FullStatusRequest {})
        .await
        .expect("serves without etcd")
        .into_inner();
    assert!(h.mysql_reachable);
    c.etcd().restart().await.unwrap();
    wait_health(&mut a, "etcd link back", Duration::from_secs(30), |h| {
        h.etcd_connected
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.topo().get_tablet(&alias).await.ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "registration did not come back after etcd restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGKILL an agent: its registration goes when the lease (2 s) expires.
    c.tablet(2).agent_proc().unwrap().kill().unwrap();
    let start = Instant::now();
    while c.topo().get_tablet(&alias).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "registration outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "dead agent's registration removed after {:?}",
        start.elapsed()
    );
    assert!(c
        .topo()
        .get_tablet(c.tablet(1).alias())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_fencing_on_a_newer_term() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut a_p = client(&c, 0).await;
    write_row(&c, 0, "before").await.expect("write");

    // Starve the primary of semi-sync acks so the next commit blocks, unacknowledged.
    for i in [1, 2] {
        c.tablet(i)
            .admin_conn()
            .await
            .unwrap()
            .query_drop("STOP SLAVE")
            .await
            .unwrap();
    }
    let mut idle = c.tablet(0).app_conn().await.unwrap();
    let mut blocked_conn = c.tablet(0).app_conn().await.unwrap();
    let blocked = tokio::spawn(async move {
        blocked_conn
            .exec_drop("INSERT INTO t (v) VALUES (?)", ("blocked",))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !blocked.is_finished(),
        "the commit should wait for a semi-sync ack"
    );

    // Another tablet becomes primary at term 2: the old primary's agent must fence.
    let start = Instant::now();
    let lock = c.lock_shard("agent-test").await.expect("shard lock");
    write_shard_record(&lock, &c, c.tablet(1).alias(), 2).await;
    lock.release().await.expect("release");
    let (took, h) = wait_health(&mut a_p, "fenced", GENEROUS, |h| {
        h.fenced && read_only(h) == Some(true)
    })
    .await;
    println!(
        "fenced {took:?} after the new term was written: {}",
        h.fence_reason
    );
    assert!(h.fence_reason.contains("zone1-102"), "{}", h.fence_reason);
    assert_eq!(h.term, 2);

    let r = tokio::time::timeout(GENEROUS, blocked)
        .await
        .expect("blocked write ended")
        .unwrap();
    assert!(
        r.is_err(),
        "a write blocked on acks must not be acknowledged after fencing: {r:?}"
    );
    println!(
        "blocked write ended after {:?}: {:?}",
        start.elapsed(),
        r.unwrap_err()
    );
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "idle client connections are killed"
    );
    let mut fresh = c.tablet(0).app_conn().await.unwrap();
    let e = fresh
        .query_drop("INSERT INTO t (v) VALUES ('after')")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("read-only") || e.to_string().contains("read_only"),
        "{e}"
    );

    // Flipping it writable again behind the agent's back is undone. Read from mysqld itself:
    // the agent's last published health still says read-only from the first fence. Each
    // check on a fresh session (the re-fence kills every client session).
    let mut root = c.tablet(0).admin_conn().await.unwrap();
    root.query_drop("SET GLOBAL read_only = OFF").await.unwrap();
    drop(root);
    let deadline = Instant::now() + GENEROUS;
    loop {
        let ro = async {
            let mut conn = c.tablet(0).admin_conn().await.ok()?;
            let v: Option<u8> = conn.query_first("SELECT @@global.read_only").await.ok()?;
            let _ = conn.disconnect().await;
            v
        }
        .await;
        if ro == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read_only was not set back on within {GENEROUS:?} (last: {ro:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A restarted agent remembers the term it was promoted under and still fences.
    c.tablet(0).agent_proc().unwrap().kill().unwrap();
    // The re-fence above killed every client session, ours included.
    let mut root = c.tablet(0).admin_conn().await.unwrap();
    root.query_drop("SET GLOBAL read_only = OFF").await.unwrap();
    c.tablet(0).agent_proc().unwrap().restart().await.unwrap();
    let mut a_p = client(&c, 0).await;
    wait_health(&mut a_p, "fenced after restart", GENEROUS, |h| {
        h.fenced && read_only(h) == Some(true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_unreachable_etcd_are_reported_not_fatal() {
    let c = Cluster::start(ClusterOptions {
        tablets: 1,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let mut cfg = c.agent_config(0).unwrap();
    // A password file with the wrong password (the harness gives agents their passwords in
    // files).
    cfg.mysql.password_file = Some(
        harness::write_secret(&c.dir().join("bad-agent-secrets"), "password", "wrong").unwrap(),
    );
    cfg.tablet.uid = 901;
    cfg.etcd.endpoints = vec!["https://127.0.0.1:1".into()];
    let dir = c.dir().join("bad-agent");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = harness::AgentProc::launch(cfg, &dir, false)
        .await
        .expect("agent starts anyway");
    let mut a = bad.client().await.unwrap();
    let (_, h) = wait_health(&mut a, "access denied reported", GENEROUS, |h| {
        !h.mysql_reachable && h.mysql_error.contains("Access denied")
    })
    .await;
    assert!(!h.etcd_connected);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(bad.is_running(), "the agent keeps running");
}

#[test]
fn check_config_names_the_bad_key() {
    let bin = harness::find_myha_bin("myha-agent").expect("agent binary");
    let dir = tempfile::tempdir().unwrap();
    let good = r#"
[tablet]
cell = "zone1"
uid = 1
keyspace = "ks"
shard = "0"
[mysql]
port = 4000
user = "u"
repl_user = "r"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
"#;
    let cases = [
        (good.to_string(), true, "ok"),
        (good.replace("uid = 1", "uid = 1\nuuid = 2"), false, "uuid"),
        (
            format!("{good}[agent]\npoll_interval = \"soon\"\n"),
            false,
            "poll_interval",
        ),
        (good.replace("repl_user = \"r\"\n", ""), false, "repl_user"),
        (
            good.replace("shard = \"0\"", "shard = \"0\"\npromotion_rule = \"maybe\""),
            false,
            "maybe",
        ),
        (
            format!("{good}[agent]\nsemi_sync_timeout = \"10s\"\n"),
            false,
            "agent.semi_sync_timeout",
        ),
    ];
    for (text, ok, needle) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), ok, "{all}");
        assert!(all.contains(needle), "expected `{needle}` in: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_a_taken_alias_is_refused_and_says_why() {
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let alias = c.tablet(0).alias().to_string();
    let original = c
        .topo()
        .get_tablet(&alias)
        .await
        .unwrap()
        .expect("registered");
    // Same alias as tablet 0, but watching tablet 1's mysqld: a configuration mistake.
    let mut cfg = c.agent_config(1).unwrap();
    cfg.tablet.uid = c.tablet(0).uid();
    let dir = c.dir().join("dup-agent");
    std::fs::create_dir_all(&dir).unwrap();
    let dup = harness::AgentProc::launch(cfg, &dir, false)
        .await
        .expect("agent starts");
    let mut a = dup.client().await.unwrap();
    let (_, h) = wait_health(&mut a, "alias conflict reported", GENEROUS, |h| {
        h.etcd_error.contains("already registered")
    })
    .await;
    assert!(!h.etcd_connected);
    assert!(
        h.etcd_error.contains(&original.mysql_port.to_string()),
        "{}",
        h.etcd_error
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = c
        .topo()
        .get_tablet(&alias)
        .await
        .unwrap()
        .expect("still registered");
    assert_eq!(
        now.mysql_port, original.mysql_port,
        "the original registration is untouched"
    );
    assert_eq!(now.grpc_addr, original.grpc_addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_replication_from_a_frozen_source_does_not_wait() {
    // MariaDB's STOP SLAVE waits in 2 s rounds for an IO thread blocked on a frozen source;
    // the agent kills that thread's session first. Measured here: ~10 ms instead of 2.0 s.
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let (_lock, epoch) = act_as_holder(&c).await;
    let ctx = |term| ctx_epoch(term, epoch);
    let mut a1 = client(&c, 1).await;
    let mut a2 = client(&c, 2).await;
    wait_health(&mut a1, "replicating", GENEROUS, |h| {
        running(h) == (true, true)
    })
    .await;
    c.tablet(0).mysqld().freeze().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    a1.stop_replication(pb::StopReplicationRequest {
        ctx: ctx(1),
        scope: pb::ReplicationScope::IoOnly as i32,
    })
    .await
    .expect("stop IO");
    let io_only = start.elapsed();
    let start = Instant::now();
    a2.reset_replication(pb::ResetReplicationRequest { ctx: ctx(1) })
        .await
        .expect("reset");
    let reset = start.elapsed();
    c.tablet(0).mysqld().thaw().unwrap();
    println!("stop IO from a frozen source: {io_only:?}; stop + reset: {reset:?}");
    assert!(io_only < Duration::from_millis(1500), "{io_only:?}");
    assert!(reset < Duration::from_millis(1500), "{reset:?}");
    let (_, h) = wait_health(&mut a1, "IO stopped, SQL running", GENEROUS, |h| {
        running(h) == (false, true)
    })
    .await;
    assert!(h.replication.unwrap().configured);
}

/// P18 at the agent: a replica whose relay log holds received transactions it has not applied
/// (here a MASTER_DELAY) refuses `Promote`, whose reset would throw them away; `WaitForPosition`
/// with `lift_delay` applies them now, relay log kept, and `Promote` then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_refuses_a_relay_log_not_applied_and_lift_delay_applies_it() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let (_lock, epoch) = act_as_holder(&c).await;
    let ctx = |term| ctx_epoch(term, epoch);
    let mut a_r1 = client(&c, 1).await;
    write_row(&c, 0, "before").await.expect("primary write");
    c.wait_replicated(GENEROUS)
        .await
        .expect("the table replicated");
    let mut root = c.tablet(1).root_conn().await.expect("root");
    for stmt in [
        "STOP SLAVE",
        "CHANGE MASTER TO MASTER_DELAY = 60",
        "START SLAVE",
    ] {
        root.query_drop(stmt).await.expect(stmt);
    }
    for i in 0..20 {
        write_row(&c, 0, &format!("delayed-{i}"))
            .await
            .expect("primary write");
    }
    // The fault in effect: the delayed replica has received the writes (it applies them in 60 s).
    let mut p = c.tablet(0).root_conn().await.expect("root");
    let written: String = p
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .expect("primary position")
        .unwrap_or_default();
    let written = gtid::MariaDbPosition::parse(&written).expect("position parses");
    let start = Instant::now();
    loop {
        let st = harness::slave_status(&mut root)
            .await
            .expect("slave status")
            .unwrap_or_default();
        let io = st.get("Gtid_IO_Pos").cloned().flatten().unwrap_or_default();
        if gtid::MariaDbPosition::parse(&io).is_ok_and(|io| io.contains(&written)) {
            break;
        }
        assert!(
            start.elapsed() < GENEROUS,
            "the delayed replica did not receive {written}: at {io}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = a_r1
        .stop_replication(pb::StopReplicationRequest {
            ctx: ctx(1),
            scope: pb::ReplicationScope::IoOnly as i32,
        })
        .await
        .expect("stop IO")
        .into_inner();
    println!(
        "after the IO stop: applied {}, received {}",
        stopped.gtid_position, stopped.gtid_received
    );
    let received = gtid::MariaDbPosition::parse(&stopped.gtid_received).expect("received parses");
    let applied = gtid::MariaDbPosition::parse(&stopped.gtid_position).expect("applied parses");
    assert!(
        !applied.contains(&received),
        "the delayed replica applied everything it received"
    );
    let err = a_r1
        .promote(pb::PromoteRequest {
            ctx: ctx(2),
            durability: pb::Durability::SemiSync as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("received transactions not applied"),
        "{}",
        err.message()
    );
    assert_eq!(
        count_rows(&c, 1, "delayed-19").await,
        0,
        "nothing applied yet"
    );
    let r = a_r1
        .wait_for_position(pb::WaitForPositionRequest {
            ctx: ctx(2),
            gtid_position: stopped.gtid_received.clone(),
            lift_delay: true,
        })
        .await
        .expect("applied with the delay lifted")
        .into_inner();
    println!("lift_delay: {:?}", r.steps);
    assert!(
        r.steps
            .iter()
            .any(|s| s.contains("lift the replication delay of 60 s")),
        "{:?}",
        r.steps
    );
    assert_eq!(
        count_rows(&c, 1, "delayed-19").await,
        1,
        "the relay log was applied"
    );
    a_r1.promote(pb::PromoteRequest {
        ctx: ctx(2),
        durability: pb::Durability::SemiSync as i32,
    })
    .await
    .expect("promoted once everything received is applied");
}

/// An agent whose persisted term state cannot be read refuses to start (naming the file)
/// rather than start with zero terms: a deposed primary that forgot its promotion term would
/// never fence itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_term_state_stops_the_agent_from_starting() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let a = c.tablet(1).agent_proc().expect("agent");
    a.kill().expect("kill the agent");
    let state = c
        .tablet(1)
        .dir()
        .join("agent-state")
        .join("agent-state.json");
    // A torn write, as an unsynced file can be after a crash.
    std::fs::write(&state, b"{\"known_term\":7,\"promo").expect("write the state file");
    let err = a.start().await.expect_err("the agent must refuse to start");
    // The whole log: with RUST_BACKTRACE set, a backtrace follows the message and the error's
    // tail may show only that.
    let log = std::fs::read_to_string(c.tablet(1).dir().join("agent.log")).expect("agent log");
    let line = log
        .lines()
        .find(|l| l.contains("refusing to start"))
        .unwrap_or_else(|| panic!("no refusal in the agent's log ({err}):\n{log}"));
    println!("{line}");
    assert!(line.contains("agent-state.json"), "{line}");
    std::fs::remove_file(&state).expect("remove the state file");
    a.start()
        .await
        .expect("without a state file the agent starts");
}

/// P21 and issue 12 on the agent side: only the shard lock's holder named in etcd acts (a
/// deposed holder at an equal term is refused, and so is everyone when nobody holds the lock),
/// and every promotion is recorded in the shard history before mysqld becomes writable, one
/// tablet per term: a second promotion of a term is refused and leaves its mysqld read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_lock_holder_is_refused_and_every_promotion_is_on_record() {
    let c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let (r1, r2) = (1, 2);
    let mut a_r1 = client(&c, r1).await;
    let mut a_r2 = client(&c, r2).await;
    let (ks, shard) = (c.keyspace().to_string(), c.shard().to_string());

    // The bootstrap term is recorded by the agent of the primary the record names.
    let deadline = Instant::now() + GENEROUS;
    let first = loop {
        if let Some(p) = c
            .topo()
            .get_promotion(&ks, &shard, Term::new(1))
            .await
            .expect("history")
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "term 1 never recorded in the shard history"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first.primary, c.tablet(0).alias());
    assert_eq!(first.writer, c.tablet(0).uid().to_string());
    assert!(!first.position.is_empty(), "{first:?}");

    // Holders in turn: A acts; once B holds the lock, A (deposed, at an equal term) is refused
    // with both epochs named, and B acts.
    let a = c.lock_shard("holder A").await.expect("lock A");
    let epoch_a = a.epoch();
    a_r1.stop_replication(pb::StopReplicationRequest {
        ctx: ctx_epoch(1, epoch_a),
        ..Default::default()
    })
    .await
    .expect("stop replication by holder A");
    a.release().await.expect("release A");
    let lock = c.lock_shard("holder B").await.expect("lock B");
    let epoch_b = lock.epoch();
    assert!(epoch_b > epoch_a, "epochs {epoch_a} then {epoch_b}");
    let err = a_r1
        .start_replication(pb::StartReplicationRequest {
            ctx: ctx_epoch(1, epoch_a),
            ..Default::default()
        })
        .await
        .expect_err("a deposed lock holder at an equal term");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "lock epoch {epoch_a} is not the shard lock's holder in etcd (epoch {epoch_b}, holder B)"
        )),
        "{}",
        err.message()
    );
    a_r1.start_replication(pb::StartReplicationRequest {
        ctx: ctx_epoch(1, epoch_b),
        ..Default::default()
    })
    .await
    .expect("the holder at an equal term");

    // As an emergency reparent would first: r1 applies everything it received (Promote refuses
    // a relay log with unapplied transactions, and the primary's heartbeats keep arriving).
    drain_relay_log(&c, r1).await;
    // A promotion is on record before mysqld is writable.
    a_r1.promote(pb::PromoteRequest {
        ctx: ctx_epoch(2, epoch_b),
        durability: pb::Durability::SemiSync as i32,
    })
    .await
    .expect("promote r1 at term 2");
    let rec = c
        .topo()
        .get_promotion(&ks, &shard, Term::new(2))
        .await
        .expect("history")
        .expect("term 2 on record");
    assert_eq!(rec.primary, c.tablet(r1).alias());
    assert_eq!(rec.writer, c.tablet(r1).uid().to_string());
    assert_eq!(rec.lock_epoch, epoch_b);
    assert!(!mysqld_read_only(&c, r1).await, "r1 is writable");
    // Idempotent repeat.
    a_r1.promote(pb::PromoteRequest {
        ctx: ctx_epoch(2, epoch_b),
        durability: pb::Durability::SemiSync as i32,
    })
    .await
    .expect("promote r1 again");
    // Another tablet at the same term (a stale caller): refused, read-only stays on. Its agent
    // does not know term 2 from the shard record (nobody wrote it): only the history stops it.
    let err = a_r2
        .promote(pb::PromoteRequest {
            ctx: ctx_epoch(2, epoch_b),
            durability: pb::Durability::SemiSync as i32,
        })
        .await
        .expect_err("a second promotion of term 2");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "term 2 was already given to {}",
            c.tablet(r1).alias()
        )),
        "{}",
        err.message()
    );
    assert!(mysqld_read_only(&c, r2).await, "r2 stayed read-only");
    let history = c
        .topo()
        .promotion_history(&ks, &shard)
        .await
        .expect("history");
    let terms: Vec<(u64, String)> = history
        .iter()
        .map(|p| (p.term.get(), p.primary.clone()))
        .collect();
    assert_eq!(
        terms,
        vec![
            (1, c.tablet(0).alias().to_string()),
            (2, c.tablet(r1).alias().to_string())
        ]
    );

    // Nobody holds the lock: even the last holder's epoch is refused, and says so.
    lock.release().await.expect("release B");
    let err = a_r1
        .set_read_only(pb::SetReadOnlyRequest {
            ctx: ctx_epoch(2, epoch_b),
            read_only: true,
            super_read_only: true,
        })
        .await
        .expect_err("an action while nobody holds the lock");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("nobody holds the shard lock"),
        "{}",
        err.message()
    );
    assert!(!mysqld_read_only(&c, r1).await, "r1 is still writable");
}

/// Issue 12, point 1: `FullStatus` polls on one kept MySQL connection (a caller cannot make
/// the agent open connections at will) and still tells a dead mysqld and a restarted one;
/// waiting actions are bounded (one more is refused at once, not queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_status_keeps_one_connection_and_waiting_actions_are_bounded() {
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        ..Default::default()
    })
    .await
    .expect("cluster");
    let (_lock, epoch) = act_as_holder(&c).await;
    let ctx = |term| ctx_epoch(term, epoch);
    let mut a = client(&c, 1).await;
    let mut root = c.tablet(1).root_conn().await.expect("root conn");
    let connections = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let before = connections(
        harness::global_status(&mut root, "Connections")
            .await
            .unwrap(),
    );
    for _ in 0..30 {
        let h = a
            .full_status(pb::FullStatusRequest {})
            .await
            .expect("full status")
            .into_inner();
        assert!(h.mysql_reachable, "{}", h.mysql_error);
    }
    let after = connections(
        harness::global_status(&mut root, "Connections")
            .await
            .unwrap(),
    );
    // The agent's own loops may reconnect meanwhile; one connection per call would be 30.
    assert!(
        after - before <= 5,
        "30 FullStatus calls opened {} MySQL connections",
        after - before
    );
    drop(root);

    // The kept connection dies with its mysqld: the answer says unreachable, and once mysqld
    // is back a new connection is made.
    c.tablet(1).mysqld().kill().unwrap();
    let h = a
        .full_status(pb::FullStatusRequest {})
        .await
        .expect("answers")
        .into_inner();
    assert!(!h.mysql_reachable, "a killed mysqld reported reachable");
    c.tablet(1).mysqld().restart().await.unwrap();
    let h = a
        .full_status(pb::FullStatusRequest {})
        .await
        .expect("answers")
        .into_inner();
    assert!(h.mysql_reachable, "{}", h.mysql_error);

    // Waits on a position never reached hold their permits: at most RpcLimits::ACTIONS at once.
    let limit = myha_agent::agent::RpcLimits::ACTIONS;
    let mut waits = Vec::new();
    for _ in 0..limit {
        let mut a = client(&c, 1).await;
        waits.push(tokio::spawn(async move {
            a.wait_for_position(pb::WaitForPositionRequest {
                ctx: Some(pb::ActionContext {
                    term: 1,
                    timeout_ms: 4_000,
                    requester: "agent-test".into(),
                    lock_epoch: epoch,
                }),
                gtid_position: "0-101-999999".into(),
                ..Default::default()
            })
            .await
        }));
    }
    // Every wait has reached the agent (a refused one would end at once).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let err = a
        .set_read_only(pb::SetReadOnlyRequest {
            ctx: ctx(1),
            read_only: true,
            super_read_only: false,
        })
        .await
        .expect_err("one action more than the bound");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("at most"), "{}", err.message());
    for w in waits {
        let r = w.await.expect("join");
        assert_eq!(r.expect_err("never reached").code(), Code::DeadlineExceeded);
    }
    // The bound frees with them; FullStatus was never blocked by the actions.
    a.set_read_only(pb::SetReadOnlyRequest {
        ctx: ctx(1),
        read_only: true,
        super_read_only: false,
    })
    .await
    .expect("served once the waits ended");
}

/// Replication and the agents' TCP connections to mysqld run over TLS, enforced and verified:
/// the replication user requires TLS (a replica pointed without it is refused), an agent user
/// that requires TLS still serves an agent with `[mysql.tls]` but not one without, and a
/// server certificate that does not name the address connected to is refused by replicas and
/// agents alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_agent_connections_run_over_verified_tls() {
    // Tablet 2's agent gets no [mysql.tls]: the plaintext control.
    let c = Cluster::start(ClusterOptions {
        agent_config: Some(std::sync::Arc::new(
            |cfg: &mut myha_agent::config::AgentConfig| {
                if cfg.tablet.uid == 103 {
                    cfg.mysql.tls = None;
                }
            },
        )),
        ..Default::default()
    })
    .await
    .expect("cluster");
    let (_lock, epoch) = act_as_holder(&c).await;
    let ctx = |term| ctx_epoch(term, epoch);
    let (p, r1, r2) = (0, 1, 2);
    let creds = c.credentials().clone();
    let ca = c.certs().ca_file().display().to_string();
    let root = |i: usize, stmts: Vec<String>| {
        let t = c.tablet(i);
        async move {
            let mut conn = t.root_conn().await.expect("root conn");
            for s in stmts {
                conn.query_drop(&s)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {s}: {e}", t.alias()));
            }
            let _ = conn.disconnect().await;
        }
    };

    // The harness set the replicas up over TLS, and the replication user requires it.
    for i in [r1, r2] {
        assert_replicates_over_tls(&c, i).await;
    }
    let mut conn = c.tablet(p).root_conn().await.expect("root conn");
    let create: Option<String> = conn
        .query_first(format!("SHOW CREATE USER '{}'@'%'", creds.repl_user))
        .await
        .expect("show create user");
    assert!(
        create
            .as_deref()
            .unwrap_or_default()
            .contains("REQUIRE SSL"),
        "{create:?}"
    );
    drop(conn);

    // A replica pointed at the primary without TLS is refused; with it again, it replicates.
    root(
        r1,
        vec![
            "STOP SLAVE".into(),
            "CHANGE MASTER TO MASTER_SSL = 0".into(),
            "START SLAVE".into(),
        ],
    )
    .await;
    let e = wait_io_error(&c, r1, "1045").await;
    assert!(e.contains("Access denied"), "{e}");
    root(
        r1,
        vec![
            "STOP SLAVE".into(),
            format!(
                "CHANGE MASTER TO MASTER_SSL = 1, MASTER_SSL_CA = '{ca}', \
                 MASTER_SSL_VERIFY_SERVER_CERT = 1"
            ),
            "START SLAVE".into(),
        ],
    )
    .await;
    c.wait_replicated(GENEROUS)
        .await
        .expect("replicating again");

    // The agent's user requires TLS over TCP (its own connection uses the socket): the agent
    // with [mysql.tls] still fences another server, the one without is refused.
    root(
        p,
        vec![format!("ALTER USER '{}'@'%' REQUIRE SSL", creds.agent_user)],
    )
    .await;
    c.wait_replicated(GENEROUS).await.expect("replicated");
    let fence = |i: usize| pb::FenceServerRequest {
        ctx: ctx(1),
        host: "127.0.0.1".into(),
        port: c.tablet(i).mysqld().port().into(),
        alias: c.tablet(i).alias().into(),
    };
    client(&c, r1)
        .await
        .fence_server(fence(r2))
        .await
        .expect("fenced over TLS");
    let err = client(&c, r2)
        .await
        .fence_server(fence(r1))
        .await
        .expect_err("a plaintext agent is refused");
    assert!(err.message().contains("Access denied"), "{err:?}");

    // The primary's certificate re-issued without its address (named `localhost` only) and
    // reloaded: the agent's TLS connection and a replica's IO thread refuse it.
    let stem = format!("mysqld-{}", c.tablet(p).alias());
    let cert = c.certs().dir().join(format!("{stem}.pem"));
    let cl = c.tablet(p).mysqld().command_line().expect("command line");
    assert!(
        cl.args.contains(&format!("--ssl-cert={}", cert.display())),
        "the harness names mysqld's certificate {stem}: {:?}",
        cl.args
    );
    c.certs()
        .issue(&stem, &pki::issue::Leaf::server(&stem, &["localhost"]))
        .expect("issue");
    root(p, vec!["FLUSH SSL".into()]).await;
    let err = client(&c, r1)
        .await
        .fence_server(fence(p))
        .await
        .expect_err("a certificate not naming 127.0.0.1 is refused");
    assert!(
        err.message().to_lowercase().contains("certificate"),
        "{err:?}"
    );
    assert!(!mysqld_read_only(&c, p).await, "the primary was not fenced");
    root(
        r1,
        vec![
            "STOP SLAVE IO_THREAD".into(),
            "START SLAVE IO_THREAD".into(),
        ],
    )
    .await;
    let e = wait_io_error(&c, r1, "2026").await;
    assert!(e.contains("SSL"), "{e}");
}
