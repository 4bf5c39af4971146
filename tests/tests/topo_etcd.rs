//! The `topo` crate against a real etcd: registration leases, the shard lock, lock-conditional
//! writes, resilient watches, bootstrap and audit.
//!
//! Each test starts its own etcd (the harness's) on free loopback ports. Bounds are generous:
//! these tests check behaviour, not speed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topo::Term;

use tokio::task::JoinHandle;
use topo::{
    alias, AuditEntry, CellRecord, Durability, KeyspaceRecord, LockRequest, PromotionRule,
    ShardRecord, TabletRecord, TabletType, Topo, TopoError,
};

// ---- etcd ------------------------------------------------------------------------------

/// The harness's etcd in a temp dir (ports below the kernel's ephemeral range, so a restart on
/// the same ports never finds them taken by some outgoing connection); killed on drop.
struct TestEtcd {
    etcd: harness::Etcd,
    _dir: tempfile::TempDir,
}

impl TestEtcd {
    async fn start() -> TestEtcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = harness::Etcd::launch(dir.path(), false)
            .await
            .expect("start etcd");
        TestEtcd { etcd, _dir: dir }
    }

    fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// The harness's TLS material and etcd user (every launched etcd requires both).
    fn access(&self) -> topo::EtcdAccess {
        self.etcd.access().expect("etcd access")
    }

    fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.etcd.client_port()))
    }

    /// SIGKILL, like a crash.
    fn kill(&mut self) {
        self.etcd.kill().expect("kill etcd");
    }

    /// After a crash: SIGKILL, then start again on the same data dir and ports.
    async fn restart(&mut self) {
        if self.etcd.is_running() {
            self.kill();
        }
        self.etcd.start().await.expect("restart etcd");
    }
}

/// A TCP proxy in front of etcd that can cut every connection (and refuse new ones), so that a
/// client falls behind while etcd itself keeps running.
struct Proxy {
    addr: SocketAddr,
    enabled: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let enabled = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (en, cs) = (enabled.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !en.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                cs.lock().unwrap().push(h);
            }
        });
        Proxy {
            addr,
            enabled,
            conns,
            accept,
        }
    }

    /// TLS passes through: etcd's certificate names 127.0.0.1, the proxy's address too.
    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn cut(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

// ---- helpers -------------------------------------------------------------------------

async fn connect(etcd: &TestEtcd, prefix: &str) -> Topo {
    etcd.etcd.topo(prefix).await.expect("connect")
}

fn tablet(cell: &str, uid: u32) -> TabletRecord {
    TabletRecord {
        alias: alias(cell, uid),
        cell: cell.to_string(),
        uid,
        keyspace: "commerce".into(),
        shard: "0".into(),
        tablet_type: TabletType::Replica,
        mysql_host: "127.0.0.1".into(),
        mysql_port: 3306,
        mysql_socket: None,
        grpc_addr: format!("127.0.0.1:{}", 15000 + uid),
        http_addr: None,
        promotion_rule: PromotionRule::Neutral,
        registered_ms: 0,
    }
}

/// Polls `f` every 100 ms until it returns true; panics with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the watched value satisfies `pred`; false after `within`.
async fn wait_until<T>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    within: Duration,
    pred: impl FnMut(&T) -> bool,
) -> bool {
    let ok = matches!(
        tokio::time::timeout(within, rx.wait_for(pred)).await,
        Ok(Ok(_))
    );
    ok
}

async fn tablet_present(t: &Topo, alias: &str) -> bool {
    matches!(t.get_tablet(alias).await, Ok(Some(_)))
}

async fn tablet_absent(t: &Topo, alias: &str) -> bool {
    matches!(t.get_tablet(alias).await, Ok(None))
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

// ---- registration --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_appears_and_expires_after_its_holder_dies() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;

    let reg = t.register_tablet(tablet("zone1", 101), SECS(2));
    assert!(
        reg.wait_registered(SECS(10)).await,
        "not registered: {:?}",
        *reg.status().borrow()
    );
    let got = t
        .get_tablet("zone1-101")
        .await
        .unwrap()
        .expect("registered tablet");
    assert_eq!(got.grpc_addr, "127.0.0.1:15101");
    assert!(got.registered_ms > 0);
    assert_eq!(
        t.list_tablets(Some("commerce"), Some("0"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        t.list_tablets(Some("commerce2"), None).await.unwrap().len(),
        0
    );
    assert_eq!(
        t.list_tablets(Some("commerce"), Some("-80"))
            .await
            .unwrap()
            .len(),
        0
    );

    // update() rewrites the record under the same lease.
    let mut rec = tablet("zone1", 101);
    rec.tablet_type = TabletType::Primary;
    rec.http_addr = Some("127.0.0.1:8080".into());
    reg.update(rec).await.unwrap();
    let got = t.get_tablet("zone1-101").await.unwrap().unwrap();
    assert_eq!(got.tablet_type, TabletType::Primary);
    assert_eq!(got.http_addr.as_deref(), Some("127.0.0.1:8080"));
    assert!(
        reg.update(tablet("zone1", 999)).await.is_err(),
        "alias must not change"
    );

    // Kept alive well past the TTL.
    tokio::time::sleep(SECS(5)).await;
    assert!(
        tablet_present(&t, "zone1-101").await,
        "registration did not survive its keep-alive"
    );
    assert_eq!(reg.status().borrow().registrations, 1);

    // The holder "dies": no revoke, the key goes when the lease expires.
    reg.abandon();
    assert!(
        tablet_present(&t, "zone1-101").await,
        "key must outlive its holder until the TTL"
    );
    eventually(SECS(15), "the abandoned registration to expire", || {
        tablet_absent(&t, "zone1-101")
    })
    .await;

    // deregister() removes the key at once.
    let reg = t.register_tablet(tablet("zone1", 102), SECS(10));
    assert!(reg.wait_registered(SECS(10)).await);
    assert!(tablet_present(&t, "zone1-102").await);
    reg.deregister().await.unwrap();
    assert!(tablet_absent(&t, "zone1-102").await);

    // Dropping is abandoning (the key expires later, the task is gone).
    let reg = t.register_tablet(tablet("zone1", 103), SECS(2));
    assert!(reg.wait_registered(SECS(10)).await);
    drop(reg);
    eventually(SECS(15), "the dropped registration to expire", || {
        tablet_absent(&t, "zone1-103")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_comes_back_after_etcd_restart() {
    let mut etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;
    let reg = t.register_tablet(tablet("zone1", 201), SECS(2));
    assert!(reg.wait_registered(SECS(10)).await);
    let first_lease = reg.status().borrow().lease_id.expect("lease");
    let mut reachable = t.reachable();
    assert!(*reachable.borrow_and_update());

    etcd.kill();
    let mut status = reg.status();
    assert!(
        wait_until(&mut status, SECS(15), |s| !s.registered).await,
        "registration should notice etcd is gone"
    );
    assert!(reg.status().borrow().last_error.is_some());
    assert!(
        wait_until(&mut reachable, SECS(15), |r| !*r).await,
        "reachable should turn false"
    );

    // Down for longer than the TTL, then back on the same data dir.
    tokio::time::sleep(SECS(3)).await;
    etcd.restart().await;
    assert!(
        reg.wait_registered(SECS(20)).await,
        "not re-registered: {:?}",
        *reg.status().borrow()
    );
    let s = reg.status().borrow().clone();
    assert!(s.registrations >= 2, "{s:?}");
    assert_ne!(s.lease_id, Some(first_lease), "must be under a new lease");
    assert!(tablet_present(&t, "zone1-201").await);
    assert!(
        wait_until(&mut reachable, SECS(15), |r| *r).await,
        "reachable should turn true again"
    );

    // And it stays: the old lease (renewed by etcd's restart) expires without taking the key.
    tokio::time::sleep(SECS(6)).await;
    assert!(
        tablet_present(&t, "zone1-201").await,
        "re-registration must be kept alive"
    );
    assert!(reg.is_registered());
}

// ---- shard lock ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_lock_is_exclusive_and_names_its_holder() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;

    let one = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("orch-one", "emergency reparent").with_ttl(SECS(5)),
        )
        .await
        .expect("first lock");
    assert_eq!(one.info().holder, "orch-one");
    assert!(
        one.key().starts_with("/myha/locks/commerce/0/"),
        "{}",
        one.key()
    );

    // A try-lock fails at once, naming the holder.
    let started = Instant::now();
    match t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("orch-two", "planned reparent"),
        )
        .await
    {
        Err(TopoError::LockHeld { holder, waited, .. }) => {
            assert_eq!(holder.holder, "orch-one");
            assert_eq!(holder.purpose, "emergency reparent");
            assert_eq!(waited, None);
            let msg = TopoError::LockHeld {
                key: "k".into(),
                holder,
                waited,
            }
            .to_string();
            assert!(msg.contains("orch-one"), "{msg}");
        }
        other => panic!("expected LockHeld, got {other:?}"),
    }
    assert!(started.elapsed() < SECS(5));
    // A bounded wait fails too, naming the holder.
    match t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("orch-two", "x").with_wait(Duration::from_millis(500)),
        )
        .await
    {
        Err(TopoError::LockHeld {
            holder,
            waited: Some(_),
            ..
        }) => assert_eq!(holder.holder, "orch-one"),
        other => panic!("expected LockHeld after waiting, got {other:?}"),
    }
    assert_eq!(
        t.get_lock_holder("commerce", "0")
            .await
            .unwrap()
            .unwrap()
            .holder,
        "orch-one"
    );
    // Other shards and keyspaces are independent.
    let other = t
        .lock_shard("commerce", "0-80", LockRequest::new("orch-two", "x"))
        .await
        .expect("other shard");
    let other2 = t
        .lock_shard("commerce2", "0", LockRequest::new("orch-two", "x"))
        .await
        .expect("other keyspace");
    other.release().await.unwrap();
    other2.release().await.unwrap();

    // A waiter gets it once the holder releases.
    let t2 = t.clone();
    let waiter = tokio::spawn(async move {
        t2.lock_shard(
            "commerce",
            "0",
            LockRequest::new("orch-two", "waiting").with_wait(SECS(30)),
        )
        .await
    });
    tokio::time::sleep(SECS(1)).await;
    assert!(!waiter.is_finished(), "waiter must not get a held lock");
    one.release().await.unwrap();
    let two = tokio::time::timeout(SECS(10), waiter)
        .await
        .expect("waiter woke")
        .unwrap()
        .expect("second lock");
    assert_eq!(two.info().holder, "orch-two");
    assert_eq!(
        t.get_lock_holder("commerce", "0")
            .await
            .unwrap()
            .unwrap()
            .holder,
        "orch-two"
    );
    two.release().await.unwrap();
    assert_eq!(t.get_lock_holder("commerce", "0").await.unwrap(), None);

    // Many contenders: never two inside at once.
    let inside = Arc::new(AtomicUsize::new(0));
    let max_inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (t, inside, max_inside) = (t.clone(), inside.clone(), max_inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let req = LockRequest::new(format!("c{i}"), "contend").with_wait(SECS(60));
                let lock = t
                    .lock_shard("commerce", "0", req)
                    .await
                    .expect("contended lock");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                lock.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(SECS(90), task)
            .await
            .expect("contenders finish")
            .unwrap();
    }
    assert_eq!(max_inside.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_holders_lock_is_freed_after_ttl() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;
    let dead = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("dead-orch", "crash").with_ttl(SECS(2)),
        )
        .await
        .unwrap();
    let ttl = dead.ttl();
    dead.abandon(); // keep-alive stops, nothing is revoked: like a crash
    match t
        .lock_shard("commerce", "0", LockRequest::new("next", "x"))
        .await
    {
        Err(TopoError::LockHeld { holder, .. }) => assert_eq!(holder.holder, "dead-orch"),
        other => panic!("expected LockHeld, got {other:?}"),
    }
    let started = Instant::now();
    let next = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("next", "x").with_wait(SECS(20)),
        )
        .await
        .expect("lock freed by lease expiry");
    assert!(
        started.elapsed() <= ttl + SECS(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(next.info().holder, "next");
    next.release().await.unwrap();

    // Dropping a lock (without release) frees it at once (best-effort revoke).
    let dropped = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("dropper", "x").with_ttl(SECS(30)),
        )
        .await
        .unwrap();
    drop(dropped);
    let l = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("after-drop", "x").with_wait(SECS(10)),
        )
        .await
        .expect("lock after drop");
    l.release().await.unwrap();
}

/// P21 at the lock: a holder whose process is frozen past the TTL (here: its only runtime
/// thread blocked, so no task runs, as under SIGSTOP) wakes up with the keep-alive's flag still
/// saying "held": the keep-alive notices only after a round trip to etcd, and an action taken at
/// once would go out under a lock that another holder may own. The local lease deadline (from
/// when the last renewal was sent) says so at once, and a later holder has a higher epoch.
#[tokio::test(flavor = "current_thread")]
async fn a_lock_frozen_past_its_ttl_is_known_lost_before_the_keep_alive_notices() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;
    let frozen = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("frozen-orch", "reparent").with_ttl(SECS(2)),
        )
        .await
        .unwrap();
    let ttl = frozen.ttl();
    frozen
        .check_deadline(Duration::from_millis(200))
        .expect("held right after taking it");
    assert!(frozen.remaining().is_some_and(|r| r <= ttl));
    // Freeze: nothing on this runtime runs (the keep-alive included) for longer than the TTL.
    std::thread::sleep(ttl + SECS(2));
    // At the moment of waking, before any other task ran: the old check still says held.
    assert!(
        !frozen.is_lost(),
        "the keep-alive cannot have noticed yet: this is the window the deadline closes"
    );
    assert_eq!(frozen.remaining(), None);
    let err = frozen
        .check_deadline(Duration::from_millis(200))
        .expect_err("past the local lease deadline");
    assert!(
        err.to_string().contains("local lease deadline has passed"),
        "{err}"
    );
    // etcd agrees: another holder gets the lock, with a higher epoch.
    let next = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("next", "x").with_wait(SECS(10)),
        )
        .await
        .expect("the frozen holder's lease expired");
    assert!(
        next.epoch() > frozen.epoch(),
        "{} <= {}",
        next.epoch(),
        frozen.epoch()
    );
    next.check_deadline(Duration::from_millis(200))
        .expect("the new holder holds it");
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_shard_needs_the_lock() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;
    assert!(t.create_shard("commerce", "0").await.unwrap());
    let lock = t
        .lock_shard(
            "commerce",
            "0",
            LockRequest::new("orch", "reparent").with_ttl(SECS(5)),
        )
        .await
        .unwrap();
    let (mut rec, rev) = t.get_shard("commerce", "0").await.unwrap().unwrap();
    rec.primary = Some("zone1-101".into());
    rec.term = rec.term.next();
    rec.reparent_in_progress = Some("test".into());
    let new_rev = lock.update_shard_if(&rec, rev).await.unwrap();
    let (got, got_rev) = t.get_shard("commerce", "0").await.unwrap().unwrap();
    assert_eq!(got, rec);
    assert_eq!(got_rev, new_rev);
    // A stale expected revision is a conflict, not a lost lock.
    match lock.update_shard_if(&rec, rev).await {
        Err(TopoError::Conflict { .. }) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    // Writing another shard's record under this lock is refused.
    assert!(matches!(
        lock.update_shard(&ShardRecord::new("commerce", "-80"))
            .await,
        Err(TopoError::InvalidArgument(_))
    ));
    lock.append_audit(&AuditEntry {
        at_ms: 0,
        term: rec.term,
        actor: "orch".into(),
        action: "promote".into(),
        tablet: Some("zone1-101".into()),
        outcome: "ok".into(),
        detail: String::new(),
        duration_ms: Some(5),
    })
    .await
    .unwrap();

    // The lock's lease is revoked behind its back.
    let mut lease = t.client().lease_client();
    lease.revoke(lock.lease_id()).await.unwrap();
    rec.reparent_in_progress = None;
    match lock.update_shard(&rec).await {
        Err(TopoError::LockLost { .. }) => {}
        other => panic!("expected LockLost, got {other:?}"),
    }
    let (still, _) = t.get_shard("commerce", "0").await.unwrap().unwrap();
    assert_eq!(
        still.reparent_in_progress.as_deref(),
        Some("test"),
        "write under a lost lock must not land"
    );
    let mut lost = lock.lost();
    assert!(
        wait_until(&mut lost, SECS(10), |l| l.is_some()).await,
        "lost() must report the revoked lease"
    );
    assert!(lock.is_lost());
    assert!(matches!(lock.check(), Err(TopoError::LockLost { .. })));
    // The lock is free for others.
    let again = t
        .lock_shard("commerce", "0", LockRequest::new("orch-2", "x"))
        .await
        .expect("free after revoke");
    again.release().await.unwrap();
    let _ = lock.release().await;
}

// ---- watches -------------------------------------------------------------------------

async fn put(t: &Topo, key: &str, value: &str) {
    let mut kv = t.client().kv_client();
    kv.put(key, value, None).await.expect("put");
}

async fn delete(t: &Topo, key: &str) {
    let mut kv = t.client().kv_client();
    kv.delete(key, None).await.expect("delete");
}

fn content(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

async fn converges(w: &topo::PrefixWatch, want: BTreeMap<String, Vec<u8>>, what: &str) {
    let mut rx = w.subscribe();
    assert!(
        wait_until(&mut rx, SECS(20), |m| **m == want).await,
        "watch did not converge ({what}): have {:?}",
        keys_of(&w.current())
    );
}

fn keys_of(m: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    m.iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prefix_converges_after_restart_and_compaction() {
    let mut etcd = TestEtcd::start().await;
    let writer = connect(&etcd, "/myha").await;
    let proxy = Proxy::start(etcd.client_addr()).await;
    let watcher = Topo::connect_with([proxy.endpoint()], "/myha", SECS(2), &etcd.access())
        .await
        .unwrap();

    // Keys under /myha: the harness's etcd user may read and write its prefix only.
    put(&writer, "/myha/w/commerce/a", "1").await;
    let w = watcher.watch_prefix("/myha/w/commerce/");
    assert!(w.wait_synced(SECS(10)).await);
    converges(&w, content(&[("/myha/w/commerce/a", "1")]), "initial read").await;
    put(&writer, "/myha/w/commerce/b", "2").await;
    put(&writer, "/myha/w/commerce2/x", "not mine").await;
    put(&writer, "/myha/w/commerce", "not mine either").await;
    put(&writer, "/myha/w/commerce/a", "1bis").await;
    converges(
        &w,
        content(&[("/myha/w/commerce/a", "1bis"), ("/myha/w/commerce/b", "2")]),
        "live events",
    )
    .await;

    // An idle watch stays up (its liveness probes are answered).
    let mut synced = w.synced();
    synced.borrow_and_update();
    tokio::time::sleep(SECS(8)).await;
    assert!(
        !synced.has_changed().unwrap(),
        "an idle, healthy watch must not reconnect"
    );

    // etcd restarts; changes made after it is back are seen.
    etcd.restart().await;
    put(&writer, "/myha/w/commerce/c", "3").await;
    delete(&writer, "/myha/w/commerce/a").await;
    converges(
        &w,
        content(&[("/myha/w/commerce/b", "2"), ("/myha/w/commerce/c", "3")]),
        "after restart",
    )
    .await;

    // The watcher is cut off while history moves on and is compacted.
    proxy.cut();
    let mut synced = w.synced();
    assert!(
        wait_until(&mut synced, SECS(20), |s| !*s).await,
        "watch should notice the broken stream"
    );
    put(&writer, "/myha/w/commerce/d", "4").await;
    delete(&writer, "/myha/w/commerce/b").await;
    for i in 0..20 {
        put(&writer, "/myha/w/commerce/churn", &i.to_string()).await;
    }
    delete(&writer, "/myha/w/commerce/churn").await;
    let rev = writer.current_revision().await.unwrap();
    writer.compact(rev).await.unwrap();
    tokio::time::sleep(SECS(1)).await;
    proxy.restore();
    converges(
        &w,
        content(&[("/myha/w/commerce/c", "3"), ("/myha/w/commerce/d", "4")]),
        "after compaction",
    )
    .await;
    assert!(w.wait_synced(SECS(10)).await);
    put(&writer, "/myha/w/commerce/e", "5").await;
    converges(
        &w,
        content(&[
            ("/myha/w/commerce/c", "3"),
            ("/myha/w/commerce/d", "4"),
            ("/myha/w/commerce/e", "5"),
        ]),
        "live after compaction",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_watches_follow_shard_and_tablets() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await;
    let mut shard = t.watch_shard("commerce", "0");
    let mut tablets = t.watch_tablets();
    assert!(t.create_shard("commerce", "0").await.unwrap());
    assert!(t.create_shard("commerce", "0-80").await.unwrap());
    assert!(
        wait_until(&mut shard, SECS(10), |s| s
            .as_ref()
            .is_some_and(|s| s.term == Term::ZERO))
        .await,
        "shard record seen"
    );
    t.bootstrap_primary("commerce", "0-80", "zone1-109")
        .await
        .unwrap();
    t.bootstrap_primary("commerce", "0", "zone1-101")
        .await
        .unwrap();
    assert!(
        wait_until(&mut shard, SECS(10), |s| s
            .as_ref()
            .is_some_and(|s| s.term == Term::new(1)))
        .await,
        "bootstrap seen"
    );
    assert_eq!(
        shard.borrow().as_ref().unwrap().primary.as_deref(),
        Some("zone1-101")
    );

    let reg = t.register_tablet(tablet("zone1", 101), SECS(5));
    assert!(
        wait_until(&mut tablets, SECS(10), |m| m.contains_key("zone1-101")).await,
        "tablet seen"
    );
    assert_eq!(tablets.borrow().get("zone1-101").unwrap().uid, 101);
    reg.deregister().await.unwrap();
    assert!(
        wait_until(&mut tablets, SECS(10), |m| m.is_empty()).await,
        "deregistration seen"
    );

    let shards = t.watch_shards("commerce");
    let mut shards2 = shards.clone();
    assert!(
        wait_until(&mut shards2, SECS(10), |m| m.len() == 2).await,
        "both shards seen"
    );

    // A corrupt write keeps the last readable record in the view (a shard must not drop out of
    // routing). Ordered behind it, a change to the other shard shows the garbage was seen.
    let key = t.keys().shard("commerce", "0");
    t.client()
        .kv_client()
        .put(key.as_str(), "{garbage", None)
        .await
        .unwrap();
    let other = ShardRecord {
        term: Term::new(7),
        ..t.get_shard("commerce", "0-80").await.unwrap().unwrap().0
    };
    t.client()
        .kv_client()
        .put(
            t.keys().shard("commerce", "0-80"),
            serde_json::to_vec(&other).unwrap(),
            None,
        )
        .await
        .unwrap();
    assert!(
        wait_until(&mut shards2, SECS(10), |m| m
            .get("0-80")
            .is_some_and(|s| s.term == Term::new(7)))
        .await,
        "the later write seen"
    );
    let kept = shards2.borrow().get("0").cloned();
    assert_eq!(
        kept.map(|s| (s.term, s.primary)),
        Some((Term::new(1), Some("zone1-101".to_string()))),
        "the corrupt record dropped the shard"
    );
}

// ---- bootstrap, CRUD, audit ----------------------------------------------------------

/// The actions of the newest `limit` (0: all) audit entries of commerce/0, newest first.
async fn actions(t: &Topo, limit: usize) -> Vec<String> {
    t.list_audit("commerce", Some("0"), limit)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_primary_sets_term_one_once() {
    let etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha/").await;
    assert_eq!(t.keys().prefix(), "/myha");
    t.put_cell(&CellRecord {
        name: "zone1".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        t.list_cells().await.unwrap(),
        vec![CellRecord {
            name: "zone1".into()
        }]
    );
    t.put_keyspace(&KeyspaceRecord {
        name: "commerce".into(),
        durability: Durability::SemiSync,
    })
    .await
    .unwrap();
    t.put_keyspace(&KeyspaceRecord {
        name: "commerce2".into(),
        durability: Durability::None,
    })
    .await
    .unwrap();
    assert_eq!(
        t.get_keyspace("commerce")
            .await
            .unwrap()
            .unwrap()
            .durability,
        Durability::SemiSync
    );
    assert_eq!(t.get_keyspace("nope").await.unwrap(), None);
    assert_eq!(t.list_keyspaces().await.unwrap().len(), 2);
    assert!(t
        .put_keyspace(&KeyspaceRecord {
            name: "a/b".into(),
            durability: Durability::None
        })
        .await
        .is_err());

    assert!(t.create_shard("commerce", "0").await.unwrap());
    assert!(
        !t.create_shard("commerce", "0").await.unwrap(),
        "second create is a no-op"
    );
    assert!(t.create_shard("commerce2", "0").await.unwrap());
    assert_eq!(
        t.list_shards("commerce").await.unwrap().len(),
        1,
        "commerce2 must not leak into commerce"
    );

    let rec = t
        .bootstrap_primary("commerce", "0", "zone1-101")
        .await
        .unwrap();
    assert_eq!(rec.term, Term::new(1));
    assert_eq!(rec.primary.as_deref(), Some("zone1-101"));
    assert!(rec.term_start_ms > 0);
    let (stored, _) = t.get_shard("commerce", "0").await.unwrap().unwrap();
    assert_eq!(stored, rec);
    match t.bootstrap_primary("commerce", "0", "zone1-102").await {
        Err(TopoError::Conflict { detail, .. }) => {
            assert!(detail.contains("zone1-101"), "{detail}")
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    assert_eq!(
        t.get_shard("commerce", "0").await.unwrap().unwrap().0.term,
        Term::new(1)
    );
    assert!(t
        .bootstrap_primary("commerce", "-80", "not an alias")
        .await
        .is_err());
    // A missing shard is created by bootstrap.
    let rec = t
        .bootstrap_primary("commerce", "80-", "zone1-201")
        .await
        .unwrap();
    assert_eq!(
        (rec.term, rec.keyspace.as_str(), rec.shard.as_str()),
        (Term::new(1), "commerce", "80-")
    );

    // Audit: newest first, per shard or keyspace-wide, prunable.
    for i in 0..5u64 {
        let e = AuditEntry {
            at_ms: 1_000 + i / 2, // several entries in the same millisecond
            term: Term::new(1),
            actor: "test".into(),
            action: format!("step{i}"),
            tablet: None,
            outcome: "ok".into(),
            detail: String::new(),
            duration_ms: None,
        };
        let key = t.append_audit("commerce", "0", &e).await.unwrap();
        assert!(
            key.starts_with("/myha/audit/commerce/0/0000000000000000100"),
            "{key}"
        );
    }
    let other = AuditEntry {
        action: "other-shard".into(),
        ..t.list_audit("commerce", Some("0"), 1).await.unwrap()[0].clone()
    };
    t.append_audit("commerce", "80-", &other).await.unwrap();
    t.append_audit("commerce2", "0", &other).await.unwrap();
    let newest = actions(&t, 3).await;
    assert_eq!(newest, ["step4", "step3", "step2"]);
    let all = t.list_audit("commerce", None, 0).await.unwrap();
    assert_eq!(all.len(), 6, "keyspace-wide, without commerce2");
    assert_eq!(all[0].action, "other-shard");
    assert_eq!(t.prune_audit("commerce", "0", 2).await.unwrap(), 3);
    let left = actions(&t, 0).await;
    assert_eq!(left, ["step4", "step3"]);
    assert_eq!(t.prune_audit("commerce", "0", 5).await.unwrap(), 0);
    // By age: everything written before 1002 ms goes, other shards stay.
    assert_eq!(
        t.prune_audit_before("commerce", "0", 1002).await.unwrap(),
        1
    );
    let left = actions(&t, 0).await;
    assert_eq!(left, ["step4"]);
    assert_eq!(
        t.list_audit("commerce", Some("80-"), 0)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_bounded_when_etcd_is_gone() {
    let mut etcd = TestEtcd::start().await;
    let t = connect(&etcd, "/myha").await.with_op_timeout(SECS(1));
    etcd.kill();
    let started = Instant::now();
    let e = t.get_shard("commerce", "0").await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(started.elapsed() < SECS(5), "took {:?}", started.elapsed());
    let e = t
        .lock_shard("commerce", "0", LockRequest::new("x", "y"))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(started.elapsed() < SECS(10), "took {:?}", started.elapsed());
    // Connecting to a dead etcd is not an error (the connection is lazy).
    let lazy = Topo::connect_with(
        [etcd.endpoint()],
        "/myha",
        Duration::from_millis(300),
        &etcd.access(),
    )
    .await
    .unwrap();
    assert!(!*lazy.reachable().borrow());
}
