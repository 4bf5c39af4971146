//! Network faults between real hosts (scenarios P4, P6 and P16 of the fault catalog): every
//! process on a host of its own ([`Hosts::Netns`]: a network namespace on a bridge, see
//! `harness::netns`), the test and its writers on the machine's own namespace (host `client`),
//! and faults that silently drop packets between hosts, as a pulled cable or a dead switch port
//! would. Each failover runs under the acknowledged-write recorder ([`harness::Writer`]), through
//! the gateway's RW port. Needs root (as CI runs). Time bounds are generous; measured times are
//! printed, never asserted tightly.
//!
//! The tests share the machine with everything else: they run one at a time (`SERIAL`).

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topo::Term;

use harness::netns::{Direction, Host};
use harness::{Cluster, ClusterOptions, Hosts, Writer, WriterOptions};
use myha_proto::agent as pb;
use myha_tests::gw;
use myha_tests::ha::*;
use mysql_async::prelude::Queryable;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A 3-tablet semi-sync shard with an orchestrator and a gateway, each process on its own host.
fn netns_options() -> ClusterOptions {
    ClusterOptions {
        hosts: Hosts::Netns,
        start_gateway: true,
        ..ha_options(3)
    }
}

/// The network namespace inode of a process, or of a named namespace.
fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

/// Asserts that `pid` runs in `host`'s namespace.
fn assert_on_host(what: &str, pid: Option<u32>, host: &Host) {
    let pid = pid.unwrap_or_else(|| panic!("{what} is not running"));
    let ns = host.ns.as_deref().expect("a namespace host");
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&format!("/run/netns/{ns}")),
        "{what} (pid {pid}) is not on host {}",
        host.name
    );
}

/// Heals every cut; the old primary (tablet 0) then rejoins under `rec`'s primary or is
/// quarantined with a reason.
async fn heal_and_expect_rejoin_or_quarantine(c: &Cluster, rec: &topo::ShardRecord) {
    let healed = Instant::now();
    c.net().expect("network").heal_all().expect("heal");
    let new_primary = c
        .tablet_by_alias(rec.primary.as_deref().expect("a primary"))
        .expect("a tablet");
    expect_rejoin_or_quarantine(c, c.tablet(0), new_primary, healed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_runs_on_its_own_host_and_a_killed_primary_is_replaced() {
    let _serial = SERIAL.lock().await;
    let c = start(netns_options()).await;
    let net = c.net().expect("network");
    for t in c.tablets() {
        let h = net.host(t.alias()).expect("tablet host");
        assert_on_host(&format!("mysqld {}", t.alias()), t.mysqld().pid(), h);
        let a = t.agent_proc().expect("agent");
        assert_on_host(&format!("agent {}", t.alias()), a.pid(), h);
        assert_eq!(t.mysqld().ip(), h.addr);
        assert_eq!(a.grpc_addr().ip(), h.addr);
    }
    assert_on_host("etcd", c.etcd().pid(), net.host("etcd").unwrap());
    assert_on_host(
        "orchestrator",
        orch(&c).pid(),
        net.host("orchestrator").unwrap(),
    );
    assert_on_host(
        "gateway",
        c.gateway().unwrap().pid(),
        net.host("gateway").unwrap(),
    );
    // Replication runs between host addresses.
    let mut rc = c.tablet(1).root_conn().await.expect("replica conn");
    let st = harness::slave_status(&mut rc).await.unwrap().unwrap();
    assert_eq!(
        col(&st, "Master_Host"),
        c.tablet(0).mysqld().ip().to_string()
    );

    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    w.verify(&c).await;
}

/// One insert of a [`LocalClient`]: when it was sent and how it ended (ms since the epoch).
#[derive(Debug, Clone)]
struct LocalInsert {
    id: u64,
    sent_ms: u64,
    /// `Some(Ok(ms))` acknowledged at ms, `Some(Err((ms, error)))` failed at ms, `None` still
    /// waiting.
    outcome: Option<Result<u64, (u64, String)>>,
}

/// A client on a tablet's own host, writing straight to its mysqld one insert at a time (no
/// timeout: a commit that waits forever shows as waiting), so that it stays on the primary's
/// side of a cut. Runs on a thread inside the host's namespace, with a runtime of its own.
struct LocalClient {
    log: Arc<Mutex<Vec<LocalInsert>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl LocalClient {
    fn start(c: &Cluster, i: usize) -> LocalClient {
        let t = c.tablet(i);
        let host = c.net().unwrap().host(t.alias()).unwrap().clone();
        let creds = c.credentials().clone();
        let (ip, port) = (t.mysqld().ip(), t.mysqld().port());
        let log = Arc::new(Mutex::new(Vec::<LocalInsert>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            host.run_in(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let opts = mysql_async::OptsBuilder::default()
                        .ip_or_hostname(ip.to_string())
                        .tcp_port(port)
                        .user(Some(creds.app_user.clone()))
                        .pass(Some(creds.app_password.clone()))
                        .db_name(Some(creds.database.clone()))
                        .prefer_socket(false);
                    let mut id = 1_000_000_000u64;
                    while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                        let mut conn = match mysql_async::Conn::new(opts.clone()).await {
                            Ok(conn) => conn,
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        let _ = conn
                            .query_drop(
                                "CREATE TABLE IF NOT EXISTS local_writes \
                                 (id BIGINT PRIMARY KEY, sent_ms BIGINT)",
                            )
                            .await;
                        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                            id += 1;
                            let sent_ms = topo::now_ms();
                            let k = {
                                let mut l = log2.lock().unwrap();
                                l.push(LocalInsert {
                                    id,
                                    sent_ms,
                                    outcome: None,
                                });
                                l.len() - 1
                            };
                            let r = conn
                                .query_drop(format!(
                                    "INSERT INTO local_writes VALUES ({id}, {sent_ms})"
                                ))
                                .await;
                            let failed = r.is_err();
                            log2.lock().unwrap()[k].outcome = Some(
                                r.map(|()| topo::now_ms())
                                    .map_err(|e| (topo::now_ms(), e.to_string())),
                            );
                            if failed {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            })
            .expect("thread on the host");
        });
        LocalClient { log, stop }
    }

    fn inserts(&self) -> Vec<LocalInsert> {
        self.log.lock().unwrap().clone()
    }

    async fn wait_acks(&self, n: usize) {
        let start = Instant::now();
        while self
            .inserts()
            .iter()
            .filter(|i| matches!(i.outcome, Some(Ok(_))))
            .count()
            < n
        {
            assert!(start.elapsed() < BOUND, "the local client got no acks");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the local client saw: acks after `after_ms`, and a summary line.
fn local_summary(
    inserts: &[LocalInsert],
    after_ms: u64,
    now_ms: u64,
) -> (Vec<LocalInsert>, String) {
    let late: Vec<LocalInsert> = inserts
        .iter()
        .filter(|i| matches!(i.outcome, Some(Ok(at)) if at >= after_ms))
        .cloned()
        .collect();
    let acked = inserts
        .iter()
        .filter(|i| matches!(i.outcome, Some(Ok(_))))
        .count();
    // The first few of each kind: a fenced primary refuses every later insert the same way.
    let errors: Vec<String> = inserts
        .iter()
        .filter_map(|i| match &i.outcome {
            Some(Err((at, e))) => Some(format!(
                "insert {} failed {:+.3} s from the new term's start, after {:.3} s: {e}",
                i.id,
                (*at as f64 - after_ms as f64) / 1000.0,
                at.saturating_sub(i.sent_ms) as f64 / 1000.0
            )),
            _ => None,
        })
        .take(3)
        .collect();
    let waiting: Vec<String> = inserts
        .iter()
        .filter(|i| i.outcome.is_none())
        .map(|i| {
            format!(
                "insert {} waiting for {:.3} s",
                i.id,
                now_ms.saturating_sub(i.sent_ms) as f64 / 1000.0
            )
        })
        .collect();
    (
        late,
        format!(
            "{} sent, {acked} acknowledged; {}; {}",
            inserts.len(),
            if waiting.is_empty() {
                "none waiting".into()
            } else {
                waiting.join(", ")
            },
            if errors.is_empty() {
                "no errors".into()
            } else {
                errors.join("; ")
            }
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_primary_host_cut_from_everything_is_replaced_and_acknowledges_nothing_after() {
    let _serial = SERIAL.lock().await;
    let c = start(netns_options()).await;
    let net = c.net().expect("network");
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let old = alias_of(&c, 0);
    let local = LocalClient::start(&c, 0);
    local.wait_acks(5).await;

    net.isolate(&old, Direction::Both)
        .expect("isolate the primary's host");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    let new_primary = c
        .tablet_by_alias(rec.primary.as_deref().expect("a primary"))
        .expect("a tablet");
    let e = reparent_entry(&c, rec.term).await;
    println!("reparent: {}", audit_line(&e));

    // The client on the primary's side: semi-sync leaves its commits waiting for an ack no
    // replica can send. Nothing may be acknowledged once the new term began.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (late, summary) = local_summary(&local.inserts(), rec.term_start_ms, topo::now_ms());
    println!("client on the cut primary's host, 3 s after the new term: {summary}");
    assert!(
        late.is_empty(),
        "the cut primary acknowledged writes after the new term began: {late:?}"
    );
    // It is still writable on its side (it cannot know yet), but nothing commits there.
    println!("cut primary: {}", sql_state(c.tablet(0)).await);

    // Heal: its agent sees the newer term and fences it; it rejoins or is quarantined.
    let healed = Instant::now();
    net.heal_all().expect("heal");
    let fenced = wait_read_only(&c, c.tablet(0), "the healed old primary read-only").await;
    println!(
        "old primary read-only {:.3} s after the heal",
        fenced.as_secs_f64()
    );
    expect_rejoin_or_quarantine(&c, c.tablet(0), new_primary, healed).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (late, summary) = local_summary(&local.inserts(), rec.term_start_ms, topo::now_ms());
    println!("client on the old primary's host after the heal: {summary}");
    assert!(
        late.is_empty(),
        "the deposed primary acknowledged writes after the new term began: {late:?}"
    );
    drop(local);
    w.verify(&c).await;
}

/// A writer through the gateway, the primary's host cut from `others` (both ways), then no
/// failover for the window, writes continuing on the primary (and `problem` reported, if
/// given); healed, the shard stays as it was and is healthy.
async fn expect_cut_without_failover(opts: ClusterOptions, others: &[&str], problem: Option<&str>) {
    let c = start(opts).await;
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let p = alias_of(&c, 0);
    c.net()
        .expect("network")
        .cut(&p, others, Direction::Both)
        .unwrap_or_else(|e| panic!("cut primary | {others:?}: {e}"));
    w.mark_fault();
    expect_no_failover_writes_continue(&c, &w, &p, problem).await;
    c.net().unwrap().heal_all().expect("heal");
    let took = wait_quiet(orch(&c), &c, BOUND).await;
    println!("no problem left {:.3} s after the heal", took.as_secs_f64());
    wait_shard_healthy(&c, &[], BOUND).await;
    assert_eq!(record(&c).await.term, Term::new(1), "no new term");
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_orchestrator_host_cut_from_the_primary_host_no_failover() {
    let _serial = SERIAL.lock().await;
    expect_cut_without_failover(
        netns_options(),
        &["orchestrator"],
        Some("unreachable_primary"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_primary_host_cut_from_etcd_keeps_serving() {
    let _serial = SERIAL.lock().await;
    // Its agent's lease expires (its registration goes) but the orchestrator, the replicas and
    // the clients still reach it: not isolated, so it neither fails over nor demotes itself.
    expect_cut_without_failover(netns_options(), &["etcd"], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_under_durability_none_the_primary_cut_from_etcd_does_not_demote_itself() {
    let _serial = SERIAL.lock().await;
    // Its lease runs out, but its replicas answer: the isolation rule keeps it writable.
    let opts = ClusterOptions {
        durability: harness::Durability::None,
        ..netns_options()
    };
    expect_cut_without_failover(opts, &["etcd"], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_etcd_and_the_orchestrator_but_not_its_replicas_keeps_serving() {
    let _serial = SERIAL.lock().await;
    // The replicas still replicate from it and say so: unreachable, not dead.
    expect_cut_without_failover(
        netns_options(),
        &["etcd", "orchestrator"],
        Some("unreachable_primary"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p20_primary_cut_from_its_replicas_and_clients_only_is_replaced_and_fenced_by_its_agent() {
    let _serial = SERIAL.lock().await;
    let c = start(netns_options()).await;
    let net = c.net().expect("network");
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let old = alias_of(&c, 0);
    let (r1, r2) = (alias_of(&c, 1), alias_of(&c, 2));
    // Its agent still reaches etcd and the orchestrator; mysqld serves nobody but local clients.
    net.cut(
        &old,
        &[&r1, &r2, "gateway", harness::CLIENT_HOST],
        Direction::Both,
    )
    .expect("cut primary | replicas, gateway, client");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    // Fenced by its own agent, which still sees etcd, before any heal.
    wait_read_only(&c, c.tablet(0), "the cut old primary read-only").await;
    println!(
        "old primary read-only within {:.3} s of the new term's start, still cut",
        topo::now_ms().saturating_sub(rec.term_start_ms) as f64 / 1000.0
    );
    heal_and_expect_rejoin_or_quarantine(&c, &rec).await;
    w.verify(&c).await;
}

// ---- etcd faults: a minority, the leader, the quorum, a gateway cut from it -------------

/// [`netns_options`] with three etcd members, one per host.
fn three_etcd_options() -> ClusterOptions {
    ClusterOptions {
        etcd_members: 3,
        ..netns_options()
    }
}

/// The host name of the etcd member that leads now.
async fn etcd_leader(c: &Cluster) -> String {
    let start = Instant::now();
    loop {
        for e in c.etcd_members() {
            if e.is_leader().await.unwrap_or(false) {
                return c
                    .net()
                    .unwrap()
                    .host_at(e.ip())
                    .expect("an etcd host")
                    .name
                    .clone();
            }
        }
        assert!(start.elapsed() < BOUND, "no etcd leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bug this found: one etcd client balanced round-robin over every member kept sending a
/// share of its calls to a member that was silently cut off, each waiting out its timeout (with
/// three members, the third read after the cut failed). Now a client moves to the next member
/// on the first failure and retries reads there; a lease keep-alive stream that goes silent
/// moves too, while the lease is still valid, so the lock held here must survive the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_client_cut_from_the_member_it_uses_keeps_reading_and_keeps_its_lock() {
    let _serial = SERIAL.lock().await;
    let net = harness::netns::Network::create_with_machine(
        &["etcd-1", "etcd-2", "etcd-3"],
        harness::CLIENT_HOST,
    )
    .expect("network");
    let members: Vec<harness::EtcdMember> = ["etcd-1", "etcd-2", "etcd-3"]
        .iter()
        .map(|n| {
            let h = net.host(n).unwrap();
            harness::EtcdMember {
                name: n.to_string(),
                addr: h.addr,
                netns: h.ns.clone(),
            }
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = harness::Etcd::launch_members(dir.path(), &members, false)
        .await
        .expect("three etcd members");
    let endpoints: Vec<String> = etcd.iter().map(harness::Etcd::endpoint).collect();
    let access = etcd[0].access().expect("etcd access");
    let topo = topo::Topo::connect_with(&endpoints, "/myha", Duration::from_secs(2), &access)
        .await
        .expect("connect");
    topo.create_shard("ks", "0").await.expect("create shard");
    let lock = topo
        .lock_shard(
            "ks",
            "0",
            topo::LockRequest::new("test", "hold across the cut").with_ttl(Duration::from_secs(3)),
        )
        .await
        .expect("lock");
    // Cut this client (the machine) from the member it uses; that member keeps its peers.
    let used = topo.endpoint().to_string();
    let member = etcd
        .iter()
        .find(|e| e.endpoint() == used)
        .expect("the endpoint in use is a member");
    let host = net.host_at(member.ip()).expect("its host").name.clone();
    net.cut(harness::CLIENT_HOST, &[&host], Direction::Both)
        .expect("cut client | member in use");
    let cut = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut reads = 0;
    while cut.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let r = topo.get_shard("ks", "0").await;
        slowest = slowest.max(t.elapsed());
        reads += 1;
        assert!(
            r.is_ok(),
            "read {reads}, {:.3} s after the cut from {host}: {r:?}",
            cut.elapsed().as_secs_f64()
        );
        assert!(
            !lock.is_lost(),
            "the shard lock was lost {:.3} s after the cut from {host}: {:?}",
            cut.elapsed().as_secs_f64(),
            lock.lost().borrow().clone()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "cut from {host} ({used}): {reads} reads in 8 s, all answered, the slowest in {:.3} s; \
         now on {}; the lock held",
        slowest.as_secs_f64(),
        topo.endpoint()
    );
    assert_ne!(topo.endpoint(), used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_etcd_leader_host_changes_nothing_a_failover_still_happens() {
    let _serial = SERIAL.lock().await;
    let c = start(three_etcd_options()).await;
    let net = c.net().expect("network");
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let leader = etcd_leader(&c).await;
    net.isolate(&leader, Direction::Both)
        .expect("isolate the etcd leader");
    let cut = Instant::now();
    // The two others elect a new leader; nothing else notices.
    let next = etcd_leader(&c).await;
    assert_ne!(next, leader);
    println!(
        "etcd leader {leader} cut; {next} leads {:.3} s later",
        cut.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        record(&c).await.term,
        Term::new(1),
        "no failover for an etcd member"
    );
    wait_quiet(orch(&c), &c, BOUND).await;
    // With the leader still cut away, a dead primary is replaced as usual.
    let old = alias_of(&c, 0);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    net.heal_all().expect("heal");
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_etcd_quorum_lost_no_reparent_and_the_reason_shown_then_recovery() {
    let _serial = SERIAL.lock().await;
    let c = start(three_etcd_options()).await;
    let net = c.net().expect("network");
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let old = alias_of(&c, 0);
    // Two of three members cut from everyone (and each other): the third has no quorum.
    net.isolate("etcd-1", Direction::Both).expect("cut etcd-1");
    net.isolate("etcd-2", Direction::Both).expect("cut etcd-2");
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();

    let reason = expect_no_promotion_without_etcd(&c, Duration::from_secs(6)).await;
    println!("without an etcd quorum, the orchestrator said: {reason}");

    let back = Instant::now();
    net.heal_all().expect("heal");
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    println!(
        "recovered {:.3} s after the quorum returned",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_from_etcd_keeps_routing_from_its_last_snapshot() {
    let _serial = SERIAL.lock().await;
    let c = start(netns_options()).await;
    let g = c.gateway().expect("gateway");
    let w = gw::writer_through_rw(&c, g).await;
    let p = alias_of(&c, 0);
    c.net()
        .unwrap()
        .cut("gateway", &["etcd"], Direction::Both)
        .expect("cut gateway | etcd");
    w.mark_fault();
    // Nothing changed in the shard: writes keep flowing through the gateway to the primary.
    expect_no_failover_writes_continue(&c, &w, &p, None).await;
    let routing = g.routing().await.expect("routing while cut");
    println!("gateway routing while cut from etcd: {routing}");
    c.net().unwrap().heal_all().expect("heal");
    gw::wait_shard_routes(&c, g).await;
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p22_an_isolated_primary_under_durability_none_demotes_itself_before_it_is_replaced() {
    let _serial = SERIAL.lock().await;
    let c = start(ClusterOptions {
        durability: harness::Durability::None,
        ..netns_options()
    })
    .await;
    let net = c.net().expect("network");
    let w = gw::writer_through_rw(&c, c.gateway().expect("gateway")).await;
    let old = alias_of(&c, 0);
    // A client on the primary's own host, writing straight to it: under none nothing but the
    // isolation rule stops its writes once the host is cut off.
    let local = LocalClient::start(&c, 0);
    local.wait_acks(5).await;
    let cut_ms = topo::now_ms();
    net.isolate(&old, Direction::Both)
        .expect("isolate the primary's host");
    w.mark_fault();
    // Read-only by its own agent while still cut off (seen over the socket, not the network).
    let took = wait_read_only(&c, c.tablet(0), "the isolated primary to demote itself").await;
    let demoted_ms = topo::now_ms();
    println!(
        "isolated primary read-only {:.3} s after the cut (its agent's isolation rule)",
        took.as_secs_f64()
    );
    let rec = expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    assert!(
        demoted_ms <= rec.term_start_ms,
        "the new term began {} ms before the old primary was seen read-only",
        demoted_ms - rec.term_start_ms
    );
    // The audit says what the promotion relied on (audited() panics with the log otherwise).
    let relied = |e: &topo::AuditEntry| e.detail.contains("taken as fenced by its own agent");
    let entries = wait_audit(
        &c,
        "the reparent relying on the self-demotion",
        BOUND,
        |a| a.iter().any(relied),
    )
    .await;
    audited(
        &entries,
        "the reparent relying on the self-demotion",
        relied,
    );

    // The window in which the isolated primary acknowledged writes: from the cut to its last
    // ack; none after it was read-only, none after the new term began.
    let inserts = local.inserts();
    let last_ack = inserts
        .iter()
        .filter_map(|i| match i.outcome {
            Some(Ok(at)) => Some(at),
            _ => None,
        })
        .max()
        .unwrap_or(cut_ms);
    let (late, summary) = local_summary(&inserts, rec.term_start_ms, topo::now_ms());
    println!(
        "client on the isolated primary's host: {summary}; it acknowledged writes for {} ms \
         after the cut; read-only {} ms after the cut; new term {} ms after the cut",
        last_ack.saturating_sub(cut_ms),
        demoted_ms.saturating_sub(cut_ms),
        rec.term_start_ms.saturating_sub(cut_ms)
    );
    assert!(
        late.is_empty(),
        "acknowledged after the new term began: {late:?}"
    );
    assert!(
        last_ack <= demoted_ms,
        "an ack {} ms after the old primary was seen read-only",
        last_ack - demoted_ms
    );

    heal_and_expect_rejoin_or_quarantine(&c, &rec).await;
    drop(local);
    // Under none, writes the old primary acknowledged but had not shipped are lost by design;
    // what must never happen is an ack from it after the new term began.
    let report = w.check(&c).await.expect("writer check");
    println!("{report}");
    assert!(report.deposed_acks.is_empty(), "{report}");
}

/// Asks tablet 0's agent, at the shard's term and as the holder of the shard lock of `epoch`, to
/// make its mysqld writable (what the orchestrator's `primary_read_only` repair does).
async fn ask_writable(c: &Cluster, term: u64, epoch: u64) -> Result<(), tonic::Status> {
    let mut a = c
        .tablet(0)
        .agent_proc()
        .expect("agent started")
        .client()
        .await
        .expect("agent gRPC reachable");
    a.set_read_only(pb::SetReadOnlyRequest {
        ctx: Some(pb::ActionContext {
            term,
            timeout_ms: 5_000,
            requester: "partition test (as the primary_read_only repair)".into(),
            lock_epoch: epoch,
        }),
        read_only: false,
        super_read_only: false,
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_primary_that_demoted_itself_is_not_made_writable_again_while_isolated() {
    let _serial = SERIAL.lock().await;
    // The primary's host cut from etcd and from its replicas, while a caller (here the test on
    // the client host; in production an orchestrator that still reaches it) asks its agent to
    // make it writable again, as the primary_read_only repair would once it sees the primary
    // read-only. No orchestrator runs, so nothing fails over meanwhile.
    let c = start(ClusterOptions {
        start_orchestrator: false,
        start_gateway: false,
        ..netns_options()
    })
    .await;
    let term = record(&c).await.term;
    let old = alias_of(&c, 0);
    let replicas = [alias_of(&c, 1), alias_of(&c, 2)];
    // The primary's agent learns its peers from etcd (again every second while it knows none):
    // all registered, then a second and a half for it to have read them before the cut.
    wait_ok(&c, "every tablet registered", BOUND, || async {
        match c.topo().list_tablets(None, None).await {
            Ok(l) if l.len() == 3 => Ok(()),
            Ok(l) => Err(format!("{} registered", l.len())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The test acts as the lock holder (from the client host, which keeps reaching etcd).
    let lock = c.lock_shard("partition test").await.expect("shard lock");
    let mut others: Vec<&str> = replicas.iter().map(String::as_str).collect();
    others.push("etcd");
    let net = c.net().expect("network");
    net.cut(&old, &others, Direction::Both)
        .expect("cut the primary from etcd and its replicas");
    let took = wait_read_only(&c, c.tablet(0), "the isolated primary to demote itself").await;
    println!(
        "primary cut from etcd and its replicas: read-only {:.3} s after the cut",
        took.as_secs_f64()
    );
    let err = ask_writable(&c, term.get(), lock.epoch())
        .await
        .expect_err("made writable again while isolated");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    // Two rules refuse it, each naming itself: the agent cannot confirm in etcd that the
    // caller holds the shard lock (checked first, for every action), and the isolation rule.
    assert!(
        err.message().contains("isolation rule holds")
            || err
                .message()
                .contains("etcd cannot confirm that the caller"),
        "the refusal names its rule: {}",
        err.message()
    );
    println!("refused: {}", err.message());
    // Read from the server itself (its socket, through no cut) for a while: still read-only.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        assert!(
            read_only(c.tablet(0)).await.expect("read_only"),
            "the isolated primary became writable {:.3} s after the refusal",
            watch.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Healed: the lease is renewed and the peers answer, so the rule no longer holds and the
    // same request is carried out.
    net.heal_all().expect("heal");
    let healed = Instant::now();
    wait_ok(
        &c,
        "the agent to accept the request once healed",
        BOUND,
        || async {
            ask_writable(&c, term.get(), lock.epoch())
                .await
                .map_err(|e| e.message().to_string())
        },
    )
    .await;
    println!(
        "healed: made writable {:.3} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    assert!(!read_only(c.tablet(0)).await.expect("read_only"));
}

// ---- P10: the preferred candidate behind a slow link ---------------------------------------

/// A netns shard whose tablet 2 has promotion rule `prefer`, with `catch_up_timeout`.
async fn preferred_candidate(catch_up_timeout: Duration) -> Cluster {
    let prefer = 103;
    let c = start(ClusterOptions {
        agent_config: Some(Arc::new(
            move |cfg: &mut myha_agent::config::AgentConfig| {
                if cfg.tablet.uid == prefer {
                    cfg.tablet.promotion_rule = topo::PromotionRule::Prefer;
                }
            },
        )),
        ..ClusterOptions {
            hosts: Hosts::Netns,
            start_gateway: true,
            ..ha_options_with(3, move |cfg| {
                cfg.recovery.catch_up_timeout = catch_up_timeout
            })
        }
    })
    .await;
    assert_eq!(c.tablet(2).uid(), prefer);
    c
}

/// Writes 1 KB rows through the gateway as fast as they are acknowledged while the preferred
/// candidate (tablet 2) receives the replication streams from the tablets `from` over a link of
/// 1 Mbit/s (everything else to it at full speed): it falls behind; then the primary is
/// killed (and the fault marked). Returns the writer.
async fn kill_primary_with_the_candidate_behind(c: &Cluster, from: &[usize]) -> Writer {
    let g = c.gateway().expect("gateway");
    gw::wait_shard_routes(c, g).await;
    wait_quiet(orch(c), c, BOUND).await;
    let w = Writer::start(
        c,
        WriterOptions {
            via: g.rw_addr(),
            connect_timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(120),
            payload_len: 1000,
            pause: Duration::ZERO,
            ..WriterOptions::default()
        },
    )
    .await
    .expect("writer");
    w.wait_more_acks(50, BOUND).await.expect("writes");
    let ports: Vec<u16> = from.iter().map(|i| c.tablet(*i).mysqld().port()).collect();
    c.net()
        .unwrap()
        .throttle(c.tablet(2).alias(), &ports, 1000)
        .expect("a slow link to the preferred candidate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("before the kill: {}", sql_state(c.tablet(2)).await);
    println!("most advanced:   {}", sql_state(c.tablet(1)).await);
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    w.mark_fault();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_preferred_candidate_behind_a_slow_link_is_caught_up_and_promoted() {
    let _serial = SERIAL.lock().await;
    // Slow from the primary only: the catch-up from the other replica is quick.
    let c = preferred_candidate(Duration::from_secs(5)).await;
    let w = kill_primary_with_the_candidate_behind(&c, &[0]).await;
    let rec = expect_failover(&c, &w, &alias_of(&c, 0), Term::new(1), &[]).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    let entries = audit(&c).await;
    assert_eq!(
        rec.primary.as_deref(),
        Some(c.tablet(2).alias()),
        "the preferred candidate was not promoted:\n{}",
        audit_text(&entries)
    );
    audited(
        &entries,
        "the catch-up from the most advanced replica",
        |e| e.action == "catch_up" && e.outcome == "ok" && e.term == Term::new(2),
    );
    w.verify(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_when_the_catch_up_over_a_slow_link_times_out_the_most_advanced_is_promoted() {
    let _serial = SERIAL.lock().await;
    // Slow from both: catching up what it missed at 1 Mbit/s takes seconds, not 500 ms.
    let c = preferred_candidate(Duration::from_millis(500)).await;
    let w = kill_primary_with_the_candidate_behind(&c, &[0, 1]).await;
    let old = alias_of(&c, 0);
    let (rec, _) = wait_new_primary(&c, &old, Term::new(1), BOUND).await;
    assert_eq!(rec.term, Term::new(2), "exactly one new term: {rec:?}");
    let entries = audit(&c).await;
    assert_eq!(
        rec.primary.as_deref(),
        Some(c.tablet(1).alias()),
        "the most advanced replica was not promoted:\n{}",
        audit_text(&entries)
    );
    audited(&entries, "the fallback to the most advanced replica", |e| {
        e.action == "catch_up_fallback" && e.outcome == "ok" && e.term == Term::new(2)
    });
    // The new primary's only semi-sync acker is the slow one, still receiving seconds of
    // backlog: writes wait for it. Healed, they flow.
    c.net().unwrap().heal_all().expect("heal");
    expect_failover(&c, &w, &old, Term::new(1), &[]).await;
    w.verify(&c).await;
}
