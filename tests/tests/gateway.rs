//! myha-gateway as a proxy, with real processes (etcd + 3 MariaDB semi_sync + agents +
//! orchestrator + gateway): roles and ports, the error packet, reads by lag (G2), fallbacks
//! (G3), a silent health stream (G4), held connections, graceful shutdown, and failover under
//! a writer through the RW port (G1). Timings are printed, never asserted tighter than a
//! generous bound. Half-close and the kill switch are unit-tested against local sockets in
//! `gateway/src/proxy.rs`; routing decisions branch by branch in `gateway/src/routing.rs`.
//!
//! Needs the binaries: `cargo build -p myha-agent -p myha-orchestrator -p myha-gateway`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use topo::Term;

use harness::{Cluster, ClusterOptions, GatewayConfig, GatewayProc, Tablet};
use myha_gateway::routing::RoFallback;
use myha_tests::gw;
use myha_tests::ha::{self, BOUND};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde_json::Value;

/// One cluster at a time: each is big for a small machine, and timings stay meaningful.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on a client connect through the gateway (held connections included).
const CONNECT_BOUND: Duration = Duration::from_secs(15);

/// A connection as the application user through `addr`, bounded.
async fn connect(c: &Cluster, addr: SocketAddr) -> Result<Conn, String> {
    match tokio::time::timeout(CONNECT_BOUND, Conn::new(gw::app_opts(c, addr))).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no connection through {addr} within {CONNECT_BOUND:?}"
        )),
    }
}

/// The server error a refused connect through `addr` gets: (code, message).
async fn refused(c: &Cluster, addr: SocketAddr) -> (u16, String) {
    match tokio::time::timeout(CONNECT_BOUND, Conn::new(gw::app_opts(c, addr))).await {
        Ok(Err(mysql_async::Error::Server(e))) => (e.code, e.message),
        Ok(Err(e)) => panic!("connect through {addr}: expected a server error, got {e}"),
        Ok(Ok(_)) => panic!("connect through {addr}: expected a refusal, got a connection"),
        Err(_) => panic!("connect through {addr}: no answer within {CONNECT_BOUND:?}"),
    }
}

/// (server_id, read_only) of the server behind `conn`.
async fn whoami(conn: &mut Conn) -> Result<(u32, bool), String> {
    let row: Option<(u32, u8)> = tokio::time::timeout(
        Duration::from_secs(5),
        conn.query_first("SELECT @@server_id, @@read_only"),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    let (id, ro) = row.ok_or("no row")?;
    Ok((id, ro != 0))
}

fn alias_of(c: &Cluster, server_id: u32) -> String {
    c.tablets()
        .iter()
        .find(|t| t.uid() == server_id)
        .map(|t| t.alias().to_string())
        .unwrap_or_else(|| format!("server_id {server_id}"))
}

fn gw_rw(g: &GatewayProc) -> SocketAddr {
    g.rw_addr().expect("RW listener")
}

fn gw_ro(g: &GatewayProc) -> SocketAddr {
    g.ro_addr().expect("RO listener")
}

/// `CHANGE MASTER TO MASTER_DELAY=secs` on a replica (retried: the orchestrator may restart
/// replication between our statements).
async fn set_delay(t: &Tablet, secs: u32) {
    let mut last = String::new();
    for _ in 0..10 {
        let attempt = async {
            let mut c = t.root_conn().await.map_err(|e| e.to_string())?;
            for s in [
                "STOP SLAVE".to_string(),
                format!("CHANGE MASTER TO MASTER_DELAY={secs}"),
                "START SLAVE".to_string(),
            ] {
                c.query_drop(&s).await.map_err(|e| format!("{s}: {e}"))?;
            }
            let _ = c.disconnect().await;
            Ok::<_, String>(())
        };
        match attempt.await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{}: MASTER_DELAY={secs}: {last}", t.alias());
}

/// Opens RO connections through `addr` until one lands on each of `want` (bounded); returns
/// them by server_id. Every connection must be to a read-only server.
async fn ro_conns_on(c: &Cluster, addr: SocketAddr, want: &[u32]) -> Vec<(u32, Conn)> {
    let mut out: Vec<(u32, Conn)> = Vec::new();
    for _ in 0..(want.len() * 6) {
        let mut conn = connect(c, addr).await.unwrap_or_else(|e| panic!("{e}"));
        let (id, ro) = whoami(&mut conn).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ro,
            "RO port reached a writable server ({})",
            alias_of(c, id)
        );
        assert!(
            want.contains(&id),
            "RO port reached {} (want {want:?})",
            alias_of(c, id)
        );
        if !out.iter().any(|(i, _)| *i == id) {
            out.push((id, conn));
        }
        if out.len() == want.len() {
            return out;
        }
    }
    panic!(
        "RO connections did not reach every one of {want:?}: got {:?}",
        out.iter().map(|(i, _)| *i).collect::<Vec<_>>()
    );
}

/// The sum of the samples of metric `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let n = l.split(['{', ' ']).next().unwrap_or("");
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Average time of `n` point selects on `conn`.
async fn point_selects(conn: &mut Conn, n: u32) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        let v: Option<String> = conn
            .exec_first("SELECT v FROM kv WHERE id = ?", (i % 100 + 1,))
            .await
            .expect("point select");
        assert!(v.is_some());
    }
    start.elapsed() / n
}

/// Average time of connect + handshake + `SELECT 1` + close through `addr`, `n` times.
async fn connects(c: &Cluster, addr: SocketAddr, n: u32) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let mut conn = connect(c, addr).await.unwrap_or_else(|e| panic!("{e}"));
        conn.query_drop("SELECT 1").await.expect("select 1");
        let _ = conn.disconnect().await;
    }
    start.elapsed() / n
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn cluster_options() -> ClusterOptions {
    ClusterOptions {
        // Agents frozen for a few seconds below must keep their registration.
        lease_ttl: Duration::from_secs(10),
        gateway_config: Some(Arc::new(|g: &mut GatewayConfig| {
            g.routing.max_replica_lag = Duration::from_secs(1);
            g.routing.ro_hard_lag = Duration::from_secs(4);
        })),
        start_gateway: true,
        ..ha::ha_options(3)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_by_role_lag_and_health() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let c = ha::start(cluster_options()).await;
    let g = c.gateway().expect("gateway");
    let [p, r1, r2] = [c.tablet(0), c.tablet(1), c.tablet(2)];
    let (pid, r1id, r2id) = (p.uid(), r1.uid(), r2.uid());
    gw::wait_routes(&c, g, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;

    // A second gateway on the same cluster: RO refuses instead of falling back, short buffer
    // window, a listener for a shard that does not exist, short shutdown grace.
    let mut cfg2 = c.gateway_config().expect("config");
    cfg2.routing.ro_fallback = RoFallback::Refuse;
    cfg2.routing.buffer_window = Duration::from_millis(500);
    cfg2.routing.shutdown_grace = Duration::from_secs(3);
    cfg2.listeners.push(harness::GatewayListener {
        keyspace: c.keyspace().into(),
        shard: "-80".into(),
        rw: Some(([127, 0, 0, 1], harness::free_port().unwrap()).into()),
        ro: None,
    });
    let g2 = c.start_gateway_with(cfg2).await.expect("second gateway");
    gw::wait_routes(&c, &g2, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;

    // ---- roles: RW reaches the primary, RO the replicas (spread by least connections).
    let mut rw = connect(&c, gw_rw(g)).await.expect("RW connect");
    assert_eq!(
        whoami(&mut rw).await.unwrap(),
        (pid, false),
        "RW port reaches the writable primary"
    );
    let ro = ro_conns_on(&c, gw_ro(g), &[r1id, r2id]).await;
    let s = g.shard_routing(c.keyspace(), c.shard()).await.unwrap();
    let backends = s["backends"].as_array().cloned().unwrap_or_default();
    for alias in [r1.alias(), r2.alias()] {
        assert!(
            backends
                .iter()
                .any(|b| b["alias"] == alias && b["ro_open"].as_u64() >= Some(1)),
            "/routing counts the RO connection to {alias}: {s}"
        );
    }
    assert!(
        backends
            .iter()
            .any(|b| b["alias"] == p.alias() && b["rw_open"] == 1),
        "{s}"
    );
    drop(ro);

    // ---- proxy overhead: point selects and connection setup, direct vs through the gateway.
    let mut pc = p.app_conn().await.expect("primary");
    pc.query_drop("CREATE TABLE kv (id INT PRIMARY KEY, v VARCHAR(64))")
        .await
        .expect("create kv");
    pc.query_drop(format!(
        "INSERT INTO kv VALUES {}",
        (1..=100)
            .map(|i| format!("({i}, 'value {i}')"))
            .collect::<Vec<_>>()
            .join(",")
    ))
    .await
    .expect("fill kv");
    c.wait_replicated(BOUND).await.expect("replicated");
    let mut direct = r1.app_conn().await.expect("direct");
    let mut via = loop {
        let mut conn = connect(&c, gw_ro(g)).await.unwrap();
        if whoami(&mut conn).await.unwrap().0 == r1id {
            break conn;
        }
    };
    point_selects(&mut direct, 300).await;
    point_selects(&mut via, 300).await;
    let (mut d_sum, mut g_sum) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..3 {
        d_sum += point_selects(&mut direct, 1000).await;
        g_sum += point_selects(&mut via, 1000).await;
    }
    let (d, gv) = (d_sum / 3, g_sum / 3);
    let direct_addr: SocketAddr = r1.mysqld().addr().parse().unwrap();
    let (cd, cg) = (
        connects(&c, direct_addr, 30).await,
        connects(&c, gw_ro(g), 30).await,
    );
    println!(
        "point select (mysql_async, 1 client; binaries as built): direct {} / query, through the gateway {} / query ({:.2} x direct QPS, +{} per query); connect+select+close: direct {}, gateway {}",
        us(d),
        us(gv),
        d.as_secs_f64() / gv.as_secs_f64(),
        us(gv.saturating_sub(d)),
        us(cd),
        us(cg)
    );
    drop((direct, via));

    // ---- a shard without a record: the MySQL error packet at greeting position.
    let unknown = g2.config().listeners[1].rw.unwrap();
    let (code, msg) = refused(&c, unknown).await;
    assert_eq!(code, 1105, "{msg}");
    assert!(
        msg.contains("myha-gateway: no primary for commerce/-80: no shard record"),
        "{msg}"
    );
    println!("unknown shard refused: ERROR {code}: {msg}");
    if let Some(cli) = mariadb_cli(&c, unknown) {
        // MariaDB's client reads the `#SQLSTATE` marker of a greeting-position error: the
        // message arrives clean.
        assert!(
            cli.contains("1105")
                && cli.contains("myha-gateway: no primary for commerce/-80")
                && !cli.contains("#HY000"),
            "{cli}"
        );
        println!("mariadb CLI shows: {cli}");
    }

    // ---- G2: a replica over the lag bound gets no new RO connections; its open ones stay
    // until ro_hard_lag, then close; it is used again once it recovers.
    let mut ro = ro_conns_on(&c, gw_ro(g), &[r1id, r2id]).await;
    set_delay(r1, 2).await;
    let (crossed, dropped) = lag_reaction(&c, g, r1, 1000).await;
    println!(
        "G2: {} lag >= 1000 ms seen by its agent after {:.2} s; out of the gateway's ro set {} ms later",
        r1.alias(),
        crossed.as_secs_f64(),
        dropped.as_millis() as i64 - crossed.as_millis() as i64
    );
    for _ in 0..6 {
        let mut conn = connect(&c, gw_ro(g)).await.unwrap();
        let (id, _) = whoami(&mut conn).await.unwrap();
        assert_eq!(
            id,
            r2id,
            "a new RO connection reached {} over the bound",
            alias_of(&c, id)
        );
    }
    for (id, conn) in &mut ro {
        assert_eq!(
            whoami(conn).await.map(|w| w.0),
            Ok(*id),
            "open RO connections stay under ro_hard_lag"
        );
    }
    set_delay(r1, 8).await;
    let start = Instant::now();
    let (_, mut on_r1) = ro.remove(ro.iter().position(|(id, _)| *id == r1id).unwrap());
    loop {
        if whoami(&mut on_r1).await.is_err() {
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "the RO connection to {} stayed open past ro_hard_lag",
            r1.alias()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "G2: open RO connection to {} closed {:.1} s after MASTER_DELAY=8 (ro_hard_lag 4 s)",
        r1.alias(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        whoami(&mut ro[0].1).await.map(|w| w.0),
        Ok(r2id),
        "the other replica's RO connection stays"
    );
    set_delay(r1, 0).await;
    let start = Instant::now();
    gw::wait_routes(&c, g, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;
    println!(
        "G2: {} back in the ro set {:.1} s after MASTER_DELAY=0",
        r1.alias(),
        start.elapsed().as_secs_f64()
    );
    ro_conns_on(&c, gw_ro(g), &[r1id, r2id]).await;
    let m = g.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "myha_gateway_closed_by_routing_total",
            &[("role", "ro")]
        ) >= 1.0,
        "{m}"
    );

    // ---- G4 + G3: both replicas' agents go silent: after health_stale_after they get no new
    // RO connections; the first gateway falls back to the primary, the second refuses.
    let frozen = Instant::now();
    for t in [r1, r2] {
        t.agent_proc().unwrap().freeze().unwrap();
    }
    let s = gw::wait_no_replicas(&c, g, "no replica (agents silent)", BOUND).await;
    println!(
        "G4: replicas out of the ro set {:.2} s after their agents froze (health_stale_after 1.5 s): {}",
        frozen.elapsed().as_secs_f64(),
        s["ro_unavailable"]
    );
    let mut fb = connect(&c, gw_ro(g)).await.expect("RO fallback");
    assert_eq!(
        whoami(&mut fb).await.unwrap(),
        (pid, false),
        "G3: RO falls back to the primary"
    );
    drop(fb);
    gw::wait_no_replicas(&c, &g2, "no replica (agents silent)", BOUND).await;
    let (code, msg) = refused(&c, gw_ro(&g2)).await;
    assert_eq!(code, 1105);
    assert!(
        msg.contains("myha-gateway: no replica for commerce/0: no eligible replica")
            && msg.contains("health is"),
        "{msg}"
    );
    println!("G3 refuse: ERROR {code}: {msg}");
    for t in [r1, r2] {
        t.agent_proc().unwrap().thaw().unwrap();
    }
    gw::wait_routes(&c, g, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;

    // ---- no usable primary (its agent silent, and no replica left to vouch for its mysqld:
    // their agents are silent too): new RW connections are held, then refused after the buffer
    // window (second gateway, 500 ms) or routed once the primary is usable again (first
    // gateway, 5 s).
    let agents: Vec<_> = [p, r1, r2]
        .iter()
        .map(|t| t.agent_proc().unwrap())
        .collect();
    for a in &agents {
        a.freeze().unwrap();
    }
    for gw in [g, &g2] {
        gw.wait_shard_routing(
            c.keyspace(),
            c.shard(),
            "no rw (primary agent silent)",
            BOUND,
            |s| s["rw"].is_null(),
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    let (code, msg) = refused(&c, gw_rw(&g2)).await;
    let waited = start.elapsed();
    assert_eq!(code, 1105);
    assert!(
        msg.contains("myha-gateway: no primary for commerce/0: primary zone1-101's health is")
            && msg.contains("(buffer window 500ms expired)"),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_millis(400),
        "refused after {waited:?}, before the buffer window"
    );
    println!(
        "held {} ms then refused: ERROR {code}: {msg}",
        waited.as_millis()
    );
    let addr = gw_rw(g);
    let opts = gw::app_opts(&c, addr);
    let held = tokio::spawn(async move {
        let start = Instant::now();
        let mut conn = Conn::new(opts).await.map_err(|e| e.to_string())?;
        let who = whoami(&mut conn).await?;
        Ok::<_, String>((who, start.elapsed()))
    });
    let h = g
        .wait_shard_routing(c.keyspace(), c.shard(), "a held connection", BOUND, |s| {
            s["held"] == 1
        })
        .await
        .unwrap();
    assert_eq!(h["rw"], Value::Null);
    let m = g.metrics().await.unwrap();
    assert_eq!(metric(&m, "myha_gateway_held_connections", &[]), 1.0, "{m}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for a in &agents {
        a.thaw().unwrap();
    }
    let (who, took) = tokio::time::timeout(BOUND, held)
        .await
        .expect("held connection answered")
        .unwrap()
        .expect("held connection routed");
    assert_eq!(who, (pid, false), "the held connection reached the primary");
    println!(
        "held RW connection routed to the primary after {} ms (agent thawed after ~300 ms)",
        took.as_millis()
    );
    let m = g2.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "myha_gateway_refusals_total",
            &[("reason", "no_primary")]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "myha_gateway_refusals_total",
            &[("reason", "no_replica")]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "myha_gateway_refusals_total",
            &[("reason", "unknown_shard")]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "myha_gateway_routing_changes_total", &[]) >= 1.0,
        "{m}"
    );
    let m = g.metrics().await.unwrap();
    for (direction, role) in [
        ("to_client", "rw"),
        ("to_backend", "rw"),
        ("to_client", "ro"),
        ("to_backend", "ro"),
    ] {
        assert!(
            metric(
                &m,
                "myha_gateway_bytes_total",
                &[("direction", direction), ("role", role)]
            ) > 0.0,
            "{direction} {role}: {m}"
        );
    }
    assert!(
        metric(
            &m,
            "myha_gateway_connections_total",
            &[
                ("keyspace", "commerce"),
                ("shard", "0"),
                ("role", "ro"),
                ("backend", r1.alias())
            ]
        ) >= 1.0,
        "{m}"
    );

    // ---- graceful shutdown (second gateway, shutdown_grace 3 s): no new connections, open
    // ones keep working during the grace, then are closed; the process exits cleanly.
    gw::wait_routes(&c, &g2, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;
    let mut a = connect(&c, gw_rw(&g2)).await.unwrap();
    let mut b = connect(&c, gw_ro(&g2)).await.unwrap();
    whoami(&mut a).await.unwrap();
    whoami(&mut b).await.unwrap();
    g2.terminate().expect("SIGTERM");
    let stopping = Instant::now();
    // The listener closes once the gateway has handled the signal: well within the grace
    // (the exit comes no earlier than 2.5 s, asserted below), not only when it exits.
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(gw_rw(&g2)),
        )
        .await;
        if matches!(attempt, Ok(Err(_))) {
            break;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(2),
            "the RW port still accepts {:?} after SIGTERM: {attempt:?}",
            stopping.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "RW port refusing {} ms after SIGTERM",
        stopping.elapsed().as_millis()
    );
    assert_eq!(
        whoami(&mut a).await.unwrap().0,
        pid,
        "open connections work during the grace"
    );
    let _ = a.disconnect().await;
    assert!(whoami(&mut b).await.is_ok());
    while g2.is_running() {
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "the gateway did not exit after its grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = stopping.elapsed();
    assert!(
        whoami(&mut b).await.is_err(),
        "the connection left open was closed at the end of the grace"
    );
    assert!(
        exited >= Duration::from_millis(2500),
        "exited after {exited:?}, before shutdown_grace"
    );
    let status = g2.last_exit().expect("exit status");
    assert!(status.success(), "gateway exit: {status}");
    println!(
        "graceful shutdown: exited {:.1} s after SIGTERM (grace 3 s), status {status}",
        exited.as_secs_f64()
    );
    println!("gateway test done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The `mariadb` client's answer to a connect through `addr` (None when it is not installed).
fn mariadb_cli(c: &Cluster, addr: SocketAddr) -> Option<String> {
    let creds = c.credentials();
    let out = std::process::Command::new("mariadb")
        .args([
            "--protocol=tcp",
            &format!("-h{}", addr.ip()),
            &format!("-P{}", addr.port()),
            &format!("-u{}", creds.app_user),
            &format!("-p{}", creds.app_password),
            "--connect-timeout=10",
            "-e",
            "SELECT 1",
        ])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
}

/// Polls the agent of `t` and the gateway until the agent reports lag >= `bound_ms` and the
/// gateway excludes `t` from reads for its lag; returns when each was first seen (from now).
async fn lag_reaction(
    c: &Cluster,
    g: &GatewayProc,
    t: &Tablet,
    bound_ms: u64,
) -> (Duration, Duration) {
    let start = Instant::now();
    let agent = t.agent_proc().unwrap();
    let (mut crossed, mut dropped) = (None, None);
    while crossed.is_none() || dropped.is_none() {
        assert!(
            start.elapsed() < BOUND,
            "{}: lag over {bound_ms} ms not seen/acted on (agent {crossed:?}, gateway {dropped:?})",
            t.alias()
        );
        if crossed.is_none() {
            if let Ok(h) = agent.full_status().await {
                if h.lag_ms.is_some_and(|l| l >= bound_ms) {
                    crossed = Some(start.elapsed());
                }
            }
        }
        if dropped.is_none() {
            if let Ok(s) = g.shard_routing(c.keyspace(), c.shard()).await {
                let over = s["ro_excluded"].as_array().is_some_and(|ex| {
                    ex.iter().any(|e| {
                        e["alias"] == t.alias()
                            && e["reason"].as_str().is_some_and(|r| r.contains(">= max"))
                    })
                });
                if over {
                    dropped = Some(start.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (crossed.unwrap_or_default(), dropped.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_failover_under_a_writer_through_the_rw_port() {
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let c = ha::start(cluster_options()).await;
    let g = c.gateway().expect("gateway");
    let p0 = c.tablet(0);
    let w = gw::writer_through_rw(&c, g).await;
    assert!(
        w.acks().iter().all(|a| a.tablet == p0.alias()),
        "acks from the primary"
    );

    // ---- fault 1: the primary's mysqld is SIGKILLed under the writer.
    let mut idle = connect(&c, gw_rw(g)).await.unwrap();
    let rec = ha::record(&c).await;
    // Marked once the primary is dead: an insert sent after the mark cannot be acknowledged by
    // it, so the first ack after the mark is the new primary's.
    p0.mysqld().kill().expect("kill primary mysqld");
    let fault = w.mark_fault();
    // New RW connections opened now are held, then reach the new primary.
    let opts = gw::app_opts(&c, gw_rw(g));
    let held = tokio::spawn(async move {
        let start = Instant::now();
        let mut conn = Conn::new(opts).await.map_err(|e| e.to_string())?;
        let who = whoami(&mut conn).await?;
        Ok::<_, String>((who, start.elapsed()))
    });
    let (rec1, applied) = wait_rw_applied(&c, g, p0.alias(), Term::new(rec.term.get())).await;
    let p1 = c.tablet_by_alias(rec1.primary.as_deref().unwrap()).unwrap();
    let (who, took) = tokio::time::timeout(BOUND, held)
        .await
        .expect("held connection answered")
        .unwrap()
        .expect("held connection routed");
    assert_eq!(
        who,
        (p1.uid(), false),
        "the held connection reached the new primary"
    );
    let (ack, unavail) = w
        .wait_ack_after(fault.at, BOUND)
        .await
        .expect("writes resume");
    assert_eq!(ack.tablet, p1.alias(), "{ack:?}");
    assert!(
        whoami(&mut idle).await.is_err(),
        "the RW connection to the dead primary is gone"
    );
    println!(
        "G1 (SIGKILL): term {} primary {} ; gateway applied it {} ms after the record changed; held connection routed after {:.2} s; first ack through the RW port {:.2} s after the fault",
        rec1.term,
        p1.alias(),
        applied.as_millis(),
        took.as_secs_f64(),
        unavail.as_secs_f64()
    );

    // ---- fault 2: the new primary's mysqld is frozen (SIGSTOP): its TCP connections stay
    // open, so only the gateway closing them at the new term unblocks their clients. First
    // the old primary comes back and rejoins (semi_sync needs an acker besides the candidate).
    p0.mysqld()
        .start()
        .await
        .expect("restart the old primary's mysqld");
    let rejoined = ha::wait_shard_healthy(&c, &[], BOUND).await;
    ha::wait_quiet(ha::orch(&c), &c, BOUND).await;
    println!(
        "{} rejoined as a replica {:.1} s after its restart",
        p0.alias(),
        rejoined.as_secs_f64()
    );
    w.wait_more_acks(20, BOUND)
        .await
        .expect("writes on the new primary");
    let mut blocked = connect(&c, gw_rw(g)).await.unwrap();
    assert_eq!(whoami(&mut blocked).await.unwrap().0, p1.uid());
    p1.mysqld().freeze().expect("freeze");
    let fault2 = w.mark_fault();
    let frozen_at = Instant::now();
    let stuck = tokio::spawn(async move {
        let r: Result<Option<(u32, String)>, _> =
            blocked.query_first("SELECT @@server_id, NOW(6)").await;
        (r.map_err(|e| e.to_string()), Instant::now())
    });
    let (rec2, _) = ha::wait_new_primary(&c, p1.alias(), rec1.term, BOUND).await;
    let seen_at = Instant::now();
    let (r, ended) = tokio::time::timeout(BOUND, stuck)
        .await
        .expect("the query on the frozen primary ended")
        .unwrap();
    assert!(
        r.is_err(),
        "a query on a frozen primary cannot succeed: {r:?} (frozen at {:?}, answered at {:?}; {})",
        frozen_at,
        ended,
        p1.alias()
    );
    println!(
        "G1 (SIGSTOP): term {} primary {}; the RW connection to the frozen {} was closed {:.2} s after the freeze ({} ms after the test saw the new record): {}",
        rec2.term,
        rec2.primary.as_deref().unwrap_or("-"),
        p1.alias(),
        ended.duration_since(frozen_at).as_secs_f64(),
        ended.saturating_duration_since(seen_at).as_millis(),
        r.unwrap_err()
    );
    let (ack2, unavail2) = w
        .wait_ack_after(fault2.at, BOUND)
        .await
        .expect("writes resume");
    assert_eq!(Some(ack2.tablet.as_str()), rec2.primary.as_deref());
    println!(
        "G1 (SIGSTOP): first ack through the RW port {:.2} s after the freeze",
        unavail2.as_secs_f64()
    );
    p1.mysqld().thaw().expect("thaw");
    let m = g.metrics().await.unwrap();
    assert!(
        metric(
            &m,
            "myha_gateway_closed_by_routing_total",
            &[("role", "rw")]
        ) >= 1.0,
        "{m}"
    );
    w.wait_more_acks(20, BOUND).await.expect("more writes");
    let report = w.verify(&c).await;
    assert!(report.acked >= 90, "{report}");
    assert!(
        report.deposed_acks.is_empty() && report.lost.is_empty(),
        "{report}"
    );
    // Through the gateway not even a durable late ack: the connection to the frozen primary
    // was closed before it could answer.
    assert!(report.late_acks.is_empty(), "{report}");
    println!("G1 done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// Polls the shard record and the gateway (every ~5 ms) until the record names a new primary
/// (term above `old_term`, not `old_primary`, no reparent marked) and the gateway routes writes
/// to it at that term; returns the record and how long after the test first saw it the gateway
/// routed to it (0 when the gateway was first).
async fn wait_rw_applied(
    c: &Cluster,
    g: &GatewayProc,
    old_primary: &str,
    old_term: Term,
) -> (topo::ShardRecord, Duration) {
    let start = Instant::now();
    let mut seen: Option<(topo::ShardRecord, Instant)> = None;
    let mut gateway_at: Option<(String, Term, Instant)> = None;
    loop {
        assert!(
            start.elapsed() < BOUND,
            "no new primary routed by the gateway within {BOUND:?}: record {seen:?}, gateway {gateway_at:?}\n{}",
            ha::diagnostics(c).await
        );
        if seen.is_none() {
            let r = ha::record(c).await;
            if r.term > old_term
                && r.primary.is_some()
                && r.primary.as_deref() != Some(old_primary)
                && r.reparent_in_progress.is_none()
            {
                seen = Some((r, Instant::now()));
            }
        }
        if gateway_at.is_none() {
            if let Ok(s) = g.shard_routing(c.keyspace(), c.shard()).await {
                let term = Term::new(s["term"].as_u64().unwrap_or(0));
                if let Some(a) = s["rw"]["alias"].as_str().filter(|a| *a != old_primary) {
                    if term > old_term {
                        gateway_at = Some((a.to_string(), term, Instant::now()));
                    }
                }
            }
        }
        if let (Some((r, at)), Some((a, term, gat))) = (&seen, &gateway_at) {
            assert_eq!((Some(a.as_str()), *term), (r.primary.as_deref(), r.term));
            return (r.clone(), gat.saturating_duration_since(*at));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// S1 through the gateway: a planned reparent under a writer on the RW port while a client keeps
/// opening new RW connections. No new connection is refused (they are held while the reparent
/// is marked, then routed), the ones opened after the reparent reach the new primary, the
/// writer loses nothing and no deposed primary acknowledges anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_switchover_through_the_gateway() {
    let _serial = SERIAL.lock().await;
    let c = ha::start(cluster_options()).await;
    let g = c.gateway().expect("gateway");
    let p0 = c.tablet(0);
    let w = gw::writer_through_rw(&c, g).await;

    // New connections, one after the other, for the whole switchover.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = gw::app_opts(&c, gw_rw(g));
    let opener = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(Instant, Result<u32, String>)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let opened = Instant::now();
                let r = match tokio::time::timeout(CONNECT_BOUND, Conn::new(opts.clone())).await {
                    Ok(Ok(mut conn)) => {
                        let who = whoami(&mut conn).await.map(|(id, _)| id);
                        let _ = conn.disconnect().await;
                        who
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no connection within {CONNECT_BOUND:?}")),
                };
                seen.push((opened, r));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old = ha::record(&c).await;
    let requested = Instant::now();
    let events = ha::reparent_events(&c, &serde_json::json!({"mode": "planned"}), BOUND)
        .await
        .expect("planned reparent");
    let finished = Instant::now();
    let done = &events.last().expect("events").1;
    assert_eq!(done["event"], "done", "{events:?}");
    assert_eq!(done["ok"], true, "{events:?}");
    let new_alias = done["new_primary"]
        .as_str()
        .expect("new primary")
        .to_string();
    let new = c.tablet_by_alias(&new_alias).expect("a tablet");
    assert_ne!(new_alias, p0.alias());
    assert_eq!(done["term"], old.term.next().get(), "{done}");
    let (ack, _) = w
        .wait_ack_after(finished, BOUND)
        .await
        .expect("writes resume after the switchover");
    assert_eq!(ack.tablet, new_alias, "{ack:?}");
    // Connections opened after `settled` are judged: the gateway applies the record the
    // reparent wrote a moment after `done` (new connections are held by the reparent mark
    // meanwhile), so a bound of 100 ms would judge its watch latency, not its routing.
    let settled = finished + Duration::from_secs(1);
    tokio::time::sleep_until((settled + Duration::from_millis(500)).into()).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = opener.await.expect("opener task");

    let refused: Vec<&(Instant, Result<u32, String>)> =
        seen.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        refused.is_empty(),
        "new RW connections got errors during the switchover: {refused:?}"
    );
    let during = seen
        .iter()
        .filter(|(at, _)| *at >= requested && *at <= finished)
        .count();
    let after: Vec<u32> = seen
        .iter()
        .filter(|(at, _)| *at > settled)
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    assert!(!after.is_empty(), "connections opened after the switchover");
    assert!(
        after.iter().all(|id| *id == new.uid()),
        "connections opened after the switchover reach {new_alias} (server_id {}): {after:?}",
        new.uid()
    );
    let mut at: Vec<Instant> = w.acks().iter().map(|a| a.acked_at).collect();
    at.sort();
    let gap = at
        .windows(2)
        .filter(|p| p[1] >= requested && p[0] <= finished + Duration::from_secs(1))
        .map(|p| p[1].duration_since(p[0]))
        .max()
        .unwrap_or_default();
    ha::wait_shard_healthy(&c, &[], BOUND).await;
    let report = w.verify(&c).await;
    assert!(
        report.lost.is_empty() && report.deposed_acks.is_empty(),
        "{report}"
    );
    println!(
        "S1 through the gateway: {} -> {new_alias} term {} in {} ms (orchestrator total_ms {}); {} new connections, {during} opened during it, none refused; longest gap between acks {} ms; {} acks, none lost",
        p0.alias(),
        old.term.next(),
        finished.duration_since(requested).as_millis(),
        done["total_ms"],
        seen.len(),
        gap.as_millis(),
        report.acked
    );
}

/// P5 through the gateway: only the primary's agent dies. The orchestrator does not fail over,
/// and the gateway keeps routing new RW connections to the primary (marked degraded in
/// `/routing`) because the replicas' own probes still reach its mysqld; once the agent is
/// back, the route is normal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_a_dead_primary_agent_does_not_stop_new_writes() {
    let _serial = SERIAL.lock().await;
    let c = ha::start(cluster_options()).await;
    let g = c.gateway().expect("gateway");
    let p0 = c.tablet(0);
    gw::wait_shard_routes(&c, g).await;
    let agent = p0.agent_proc().expect("agent");
    agent.kill().expect("kill the primary's agent");
    let killed = Instant::now();
    let degraded = loop {
        let s = g.shard_routing(c.keyspace(), c.shard()).await.unwrap();
        if let Some(d) = s["rw"]["degraded"].as_str() {
            assert_eq!(s["rw"]["alias"], p0.alias(), "{s}");
            break d.to_string();
        }
        assert!(
            killed.elapsed() < BOUND,
            "the route never became degraded: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(degraded.contains("probes of"), "{degraded}");
    let mut conn = connect(&c, gw_rw(g)).await.expect("a new RW connection");
    assert_eq!(whoami(&mut conn).await.unwrap(), (p0.uid(), false));
    conn.query_drop("CREATE TABLE IF NOT EXISTS p5 (id INT PRIMARY KEY)")
        .await
        .expect("write through the gateway with the primary's agent dead");
    conn.query_drop("REPLACE INTO p5 VALUES (1)").await.unwrap();
    assert_eq!(ha::record(&c).await.term, Term::new(1), "no failover");
    println!(
        "P5 through the gateway: route degraded {:.2} s after the agent died ({degraded}); a new RW connection wrote to {}",
        killed.elapsed().as_secs_f64(),
        p0.alias()
    );
    agent.start().await.expect("agent back");
    let back = Instant::now();
    loop {
        let s = g.shard_routing(c.keyspace(), c.shard()).await.unwrap();
        if s["rw"]["alias"] == p0.alias() && s["rw"].get("degraded").is_none() {
            break;
        }
        assert!(back.elapsed() < BOUND, "the route stayed degraded: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// P17 through the gateway: only the primary's agent dies, and stays dead past its etcd lease
/// (the harness's default lease), so its registration is gone. The gateway keeps routing new RW
/// connections to the primary's mysqld at the address the replicas probe (degraded, with the
/// reason), with no failover; when that mysqld then dies too, the replicas alone confirm it and
/// the shard fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p17_a_primary_agent_dead_past_its_lease_does_not_stop_new_writes() {
    let _serial = SERIAL.lock().await;
    let c = ha::start(ClusterOptions {
        lease_ttl: ClusterOptions::default().lease_ttl,
        ..cluster_options()
    })
    .await;
    let g = c.gateway().expect("gateway");
    let p0 = c.tablet(0);
    gw::wait_shard_routes(&c, g).await;
    p0.agent_proc()
        .expect("agent")
        .kill()
        .expect("kill the primary's agent");
    let killed = Instant::now();
    while c
        .topo()
        .get_tablet(p0.alias())
        .await
        .expect("etcd")
        .is_some()
    {
        assert!(killed.elapsed() < BOUND, "the registration never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = killed.elapsed();
    // Well past the lease (and the gateway's 5 s buffer window): writes still go through.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = g.shard_routing(c.keyspace(), c.shard()).await.unwrap();
    let degraded = s["rw"]["degraded"].as_str().unwrap_or_default().to_string();
    assert!(
        s["rw"]["alias"] == p0.alias() && degraded.contains("is not registered"),
        "{s}"
    );
    let mut conn = connect(&c, gw_rw(g)).await.expect("a new RW connection");
    assert_eq!(whoami(&mut conn).await.unwrap(), (p0.uid(), false));
    conn.query_drop("CREATE TABLE IF NOT EXISTS p17 (id INT PRIMARY KEY)")
        .await
        .expect("write through the gateway with the primary's agent gone");
    conn.query_drop("REPLACE INTO p17 VALUES (1)")
        .await
        .unwrap();
    let _ = conn.disconnect().await;
    assert_eq!(ha::record(&c).await.term, Term::new(1), "no failover");
    println!(
        "P17: registration gone {:.2} s after the agent died; {:.2} s after: {degraded}",
        expired.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );

    // The agentless primary's mysqld dies too: the replicas alone confirm it.
    p0.mysqld().kill().expect("kill the primary's mysqld");
    let died = Instant::now();
    let (rec, _) = ha::wait_new_primary(&c, p0.alias(), Term::new(1), BOUND).await;
    let new = c
        .tablet_by_alias(rec.primary.as_deref().unwrap_or_default())
        .expect("a tablet");
    println!(
        "P17: new primary {} at term {} {:.3} s after the agentless primary's mysqld died",
        new.alias(),
        rec.term,
        died.elapsed().as_secs_f64()
    );
    let mut conn = connect(&c, gw_rw(g)).await.expect("a new RW connection");
    assert_eq!(whoami(&mut conn).await.unwrap(), (new.uid(), false));
    conn.query_drop("REPLACE INTO p17 VALUES (2)")
        .await
        .expect("write on the new primary");
}

/// The gateway's connection cap: with `max_connections = 3`, a fourth connection is refused at
/// once with an error that names the key; once one closes, a new one is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused_with_the_reason() {
    let _serial = SERIAL.lock().await;
    let c = ha::start(ClusterOptions {
        gateway_config: Some(Arc::new(|g: &mut GatewayConfig| {
            g.routing.max_connections = 3;
        })),
        ..cluster_options()
    })
    .await;
    let g = c.gateway().expect("gateway");
    gw::wait_shard_routes(&c, g).await;
    let mut open = Vec::new();
    for addr in [gw_rw(g), gw_ro(g), gw_ro(g)] {
        let mut conn = connect(&c, addr).await.expect("under the cap");
        conn.query_drop("SELECT 1").await.expect("query");
        open.push(conn);
    }
    let (code, message) = refused(&c, gw_rw(g)).await;
    println!("the fourth connection: {code} {message}");
    assert!(
        message.contains("too many connections through this gateway (3: routing.max_connections)"),
        "{message}"
    );
    let _ = open.pop().expect("one").disconnect().await;
    let start = Instant::now();
    loop {
        match connect(&c, gw_rw(g)).await {
            Ok(mut conn) => {
                conn.query_drop("SELECT 1").await.expect("query");
                break;
            }
            Err(e) => assert!(
                start.elapsed() < BOUND,
                "no connection after one closed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
