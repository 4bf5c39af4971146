//! tabletwatch, myha-orchestrator and myha-gateway against a real cluster (etcd + 3 MariaDB +
//! agents): convergence, a killed agent, a read_only flip, and the daemons' HTTP views.
//!
//! Needs the binaries: `cargo build -p myha-agent -p myha-orchestrator -p myha-gateway`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};
use topo::Term;

use harness::{find_myha_bin, free_port, Cluster, ClusterOptions, ConfigDaemon};
use mysql_async::prelude::Queryable;
use serde_json::Value;
use tabletwatch::{FleetSnapshot, TabletWatch, WatchOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The clusters of this file's tests are big for a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KS: &str = "commerce";
const SHARD: &str = "0";
const PRIMARY: &str = "zone1-101";
const REPLICA: &str = "zone1-102";
const VICTIM: &str = "zone1-103";

async fn start_cluster() -> Cluster {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    eprintln!(
        "cluster up in {:?} at {}",
        started.elapsed(),
        cluster.dir().display()
    );
    cluster
}

async fn wait(
    w: &TabletWatch,
    what: &str,
    timeout: Duration,
    pred: impl FnMut(&FleetSnapshot) -> bool,
) -> (std::sync::Arc<FleetSnapshot>, Duration) {
    let t0 = Instant::now();
    match w.wait_for(timeout, pred).await {
        Some(s) => (s, t0.elapsed()),
        None => panic!(
            "timed out after {timeout:?} waiting for {what}; last snapshot: {:#?}",
            w.snapshot()
        ),
    }
}

async fn set_read_only(cluster: &Cluster, alias: &str, on: bool) {
    let t = cluster.tablet_by_alias(alias).expect("tablet");
    let mut c = t.root_conn().await.expect("root conn");
    c.query_drop(format!(
        "SET GLOBAL read_only={}",
        if on { "ON" } else { "OFF" }
    ))
    .await
    .expect("set read_only");
    let _ = c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabletwatch_follows_a_real_cluster() {
    let _serial = SERIAL.lock().await;
    let cluster = start_cluster().await;
    // As the gateway does: the cluster's gateway certificate (agents require one).
    let w = TabletWatch::start(
        cluster.topo(),
        WatchOptions {
            tls: Some(
                cluster
                    .certs()
                    .load("gateway")
                    .expect("gateway certificate"),
            ),
            ..WatchOptions::default()
        },
    );
    let fresh = Duration::from_secs(2);

    // Converges to 3 connected tablets with fresh health, the record naming the primary.
    let (snap, took) = wait(
        &w,
        "3 tablets with fresh health",
        Duration::from_secs(15),
        |s| {
            let now = Instant::now();
            s.topo_synced
                && s.shard(KS, SHARD).is_some_and(|sh| {
                    sh.primary_alias() == Some(PRIMARY)
                        && sh.term() == Term::new(1)
                        && sh.tablets.len() == 3
                        && sh
                            .tablets
                            .values()
                            .all(|t| t.is_connected() && t.is_fresh(now, fresh))
                })
        },
    )
    .await;
    eprintln!("converged in {took:?} (snapshot v{})", snap.version);
    let sh = snap.shard(KS, SHARD).unwrap();
    let p = sh.primary().expect("primary registered");
    assert_eq!(
        (p.mysql_reachable(), p.read_only(), p.replicating()),
        (Some(true), Some(false), Some(false))
    );
    for r in sh.replicas() {
        assert_eq!(
            (r.mysql_reachable(), r.read_only(), r.replicating()),
            (Some(true), Some(true), Some(true)),
            "{}",
            r.alias()
        );
    }

    // How old does health get between pushes? (The agents push on change and at least every
    // health_interval = 1 s.) Sampled every 20 ms for 3 s.
    let mut max_age: BTreeMap<String, Duration> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let s = w.snapshot();
        let now = Instant::now();
        for t in s.tablets() {
            let age = t.health_age(now).unwrap_or(Duration::MAX);
            let m = max_age.entry(t.alias().to_string()).or_default();
            *m = (*m).max(age);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("max health age over 3 s: {max_age:?}");
    for (alias, age) in &max_age {
        assert!(
            *age < fresh,
            "{alias}: health got {age:?} old while everything was healthy"
        );
    }

    // A read_only flip on a replica shows within ~1 s (bound 5 s), and the flip back too.
    set_read_only(&cluster, REPLICA, false).await;
    let (_, took) = wait(
        &w,
        "read_only=OFF on the replica",
        Duration::from_secs(5),
        |s| s.tablet(REPLICA).and_then(|t| t.read_only()) == Some(false),
    )
    .await;
    eprintln!("read_only OFF visible after {took:?}");
    set_read_only(&cluster, REPLICA, true).await;
    let (_, took) = wait(
        &w,
        "read_only=ON on the replica",
        Duration::from_secs(5),
        |s| s.tablet(REPLICA).and_then(|t| t.read_only()) == Some(true),
    )
    .await;
    eprintln!("read_only ON visible after {took:?}");

    // SIGKILL one agent: its stream goes down at once, with the error; its last health stays.
    let victim = cluster.tablet_by_alias(VICTIM).unwrap();
    victim.agent_proc().unwrap().kill().expect("kill agent");
    let (snap, took) = wait(
        &w,
        "the victim's stream down",
        Duration::from_secs(5),
        |s| {
            s.tablet(VICTIM)
                .is_some_and(|t| !t.is_connected() && t.stream.last_error().is_some())
        },
    )
    .await;
    let t = snap.tablet(VICTIM).unwrap();
    eprintln!("stream down after {took:?}: {:?}", t.stream);
    assert!(t.health().is_some(), "the last health is kept");
    assert!(
        snap.tablet(PRIMARY).unwrap().is_connected()
            && snap.tablet(REPLICA).unwrap().is_connected()
    );

    // Its registration disappears when the lease (2 s) expires.
    let (snap, took) = wait(
        &w,
        "the victim deregistered",
        Duration::from_secs(15),
        |s| s.tablet(VICTIM).is_none(),
    )
    .await;
    eprintln!(
        "registration gone after {took:?} more (lease ttl {:?})",
        cluster.options().lease_ttl
    );
    assert_eq!(snap.tablet_count(), 2);
    assert!(snap.shard(KS, SHARD).unwrap().record.is_some());

    // Restarted, it registers again and its health flows again.
    victim
        .agent_proc()
        .unwrap()
        .start()
        .await
        .expect("agent restarts");
    let (_, took) = wait(&w, "the victim back", Duration::from_secs(15), |s| {
        let now = Instant::now();
        s.tablet(VICTIM).is_some_and(|t| {
            t.is_connected() && t.is_fresh(now, fresh) && t.replicating() == Some(true)
        })
    })
    .await;
    eprintln!("victim followed again {took:?} after its restart");
}

// ---- the daemons --------------------------------------------------------------------------

/// A tiny HTTP/1.1 GET: (status, body).
async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text}")))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Polls `GET path` until `pred` holds; returns the JSON.
async fn poll_json(
    d: &ConfigDaemon,
    addr: &str,
    path: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    let mut last = Value::Null;
    while t0.elapsed() < timeout {
        d.check_alive().unwrap_or_else(|e| panic!("{e}"));
        if let Ok((200, body)) = http_get(addr, path).await {
            if let Ok(v) = serde_json::from_str::<Value>(&body) {
                if pred(&v) {
                    return v;
                }
                last = v;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{}: GET {path} not as expected after {timeout:?}; last: {}\n--- log ---\n{}",
        d.name(),
        serde_json::to_string_pretty(&last).unwrap_or_default(),
        d.log_tail(30)
    );
}

fn run_bin(name: &str, args: &[&str]) -> (bool, String) {
    let bin = find_myha_bin(name).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bin).args(args).output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tablet<'a>(shard: &'a Value, alias: &str) -> &'a Value {
    shard["tablets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["alias"] == alias))
        .unwrap_or(&Value::Null)
}

fn shard0(v: &Value) -> &Value {
    v["shards"]
        .as_array()
        .and_then(|ss| {
            ss.iter()
                .find(|s| s["keyspace"] == KS && s["shard"] == SHARD)
        })
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_and_gateway_serve_the_snapshot() {
    let _serial = SERIAL.lock().await;
    // The command-line contract first (no cluster needed).
    for flag in ["-h", "--help"] {
        let (ok, help) = run_bin("myha-orchestrator", &[flag]);
        assert!(
            ok && help.contains("recovers") && help.contains("--check-config"),
            "{help}"
        );
        let (ok, help) = run_bin("myha-gateway", &[flag]);
        assert!(
            ok && help.contains("L4 proxy") && help.contains("--check-config"),
            "{help}"
        );
    }

    let cluster = start_cluster().await;
    let dir = cluster.dir().join("daemons");
    std::fs::create_dir_all(&dir).unwrap();
    // Each daemon's [etcd]: TLS with its own certificate, the etcd user and its password file.
    let orch_etcd = cluster
        .etcd_section_toml(harness::certs::ORCHESTRATOR_IDENTITY)
        .unwrap();
    let gw_etcd = cluster
        .etcd_section_toml(harness::certs::GATEWAY_IDENTITY)
        .unwrap();
    // Each daemon's [tls]: its certificate for the agents' gRPC (they require one).
    let tls_toml = |f: pki::TlsFiles| harness::certs::tls_section_toml(&f);
    let orch_etcd = format!(
        "{orch_etcd}\n{}",
        tls_toml(cluster.certs().orchestrator_files())
    );
    let gw_etcd = format!("{gw_etcd}\n{}", tls_toml(cluster.certs().gateway_files()));

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        format!("[orchestrator]\nhealth_stale_after = \"0s\"\n{orch_etcd}"),
    )
    .unwrap();
    let (ok, out) = run_bin(
        "myha-orchestrator",
        &["--config", bad.to_str().unwrap(), "--check-config"],
    );
    assert!(
        !ok && out.contains("orchestrator.health_stale_after"),
        "{out}"
    );

    let orch_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let orch_cfg = dir.join("orchestrator.toml");
    std::fs::write(
        &orch_cfg,
        format!(
            "[orchestrator]\nhttp_listen = \"{orch_addr}\"\n\n{orch_etcd}\n[log]\nlevel = \"info\"\n"
        ),
    )
    .unwrap();
    let (ok, out) = run_bin(
        "myha-orchestrator",
        &["--config", orch_cfg.to_str().unwrap(), "--check-config"],
    );
    assert!(ok, "{out}");

    let gw_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let gw_rw = format!("127.0.0.1:{}", free_port().unwrap());
    let gw_cfg = dir.join("gateway.toml");
    std::fs::write(
        &gw_cfg,
        format!(
            "[gateway]\nadmin_listen = \"{gw_addr}\"\n\n[routing]\nmax_replica_lag = \"5s\"\n\n{gw_etcd}\n[log]\nformat = \"json\"\n\n[[listener]]\nkeyspace = \"{KS}\"\nshard = \"{SHARD}\"\nrw = \"{gw_rw}\"\n"
        ),
    )
    .unwrap();
    let (ok, out) = run_bin(
        "myha-gateway",
        &["--config", gw_cfg.to_str().unwrap(), "--check-config"],
    );
    assert!(ok, "{out}");

    let t0 = Instant::now();
    let orch =
        ConfigDaemon::start_built("myha-orchestrator", &orch_cfg, dir.join("orchestrator.log"))
            .expect("start myha-orchestrator");
    let gw = ConfigDaemon::start_built("myha-gateway", &gw_cfg, dir.join("gateway.log"))
        .expect("start myha-gateway");

    // Orchestrator: /health, then /api/v1/shards with the whole shard.
    poll_json(
        &orch,
        &orch_addr,
        "/api/v1/shards",
        Duration::from_secs(15),
        |_| true,
    )
    .await;
    let (status, body) = http_get(&orch_addr, "/health").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let v = poll_json(
        &orch,
        &orch_addr,
        "/api/v1/shards",
        Duration::from_secs(15),
        |v| {
            let s = shard0(v);
            s["tablets"].as_array().is_some_and(|ts| {
                ts.len() == 3
                    && ts
                        .iter()
                        .all(|t| t["stream"] == "connected" && t["last_health_age_ms"].is_u64())
            })
        },
    )
    .await;
    eprintln!(
        "orchestrator shows 3 connected tablets {:?} after start",
        t0.elapsed()
    );
    assert_eq!(v["topo_synced"], true);
    let s = shard0(&v);
    assert_eq!(
        (s["primary"].as_str(), s["term"].as_u64()),
        (Some(PRIMARY), Some(1))
    );
    let p = tablet(s, PRIMARY);
    assert_eq!(
        (
            &p["is_primary"],
            &p["mysql_reachable"],
            &p["read_only"],
            &p["replicating"]
        ),
        (
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::Bool(false),
            &Value::Bool(false)
        )
    );
    for alias in [REPLICA, VICTIM] {
        let r = tablet(s, alias);
        assert_eq!(
            (&r["read_only"], &r["replicating"]),
            (&Value::Bool(true), &Value::Bool(true)),
            "{alias}: {r}"
        );
        assert!(
            r["lag_ms"].as_u64().is_some_and(|l| l < 5000),
            "{alias}: {r}"
        );
        assert!(
            r["mysql_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{r}"
        );
    }

    // Metrics: the exporter renders tabletwatch's counters and gauges.
    let (status, metrics) = http_get(&orch_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for want in [
        "myha_tabletwatch_health_messages_total{tablet=\"zone1-101\"}",
        "myha_tabletwatch_tablets 3",
        "myha_tabletwatch_streams_connected 3",
        "myha_tabletwatch_topo_synced 1",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}:\n{metrics}");
    }

    // Gateway: writes to the primary, reads to both replicas.
    let v = poll_json(&gw, &gw_addr, "/routing", Duration::from_secs(15), |v| {
        let s = shard0(v);
        s["rw"]["alias"] == PRIMARY && s["ro"].as_array().is_some_and(|ro| ro.len() == 2)
    })
    .await;
    eprintln!("gateway routes rw+ro {:?} after start", t0.elapsed());
    let s = shard0(&v);
    let (status, body) = http_get(&gw_addr, "/health").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    assert_eq!(s["rw_unavailable"], Value::Null);
    assert_eq!(s["ro_unavailable"], Value::Null);
    let (status, metrics) = http_get(&gw_addr, "/metrics").await.unwrap();
    assert!(
        status == 200 && metrics.contains("myha_tabletwatch_health_messages_total"),
        "{metrics}"
    );
    assert_eq!(s["listeners"]["rw"], gw_rw.as_str(), "{s}");
    // The RW port proxies to the primary (the app user, over TCP: never the unix socket).
    let creds = cluster.credentials();
    let port: u16 = gw_rw.rsplit(':').next().unwrap().parse().unwrap();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(creds.app_user.clone()))
        .pass(Some(creds.app_password.clone()))
        .prefer_socket(false);
    let mut conn = tokio::time::timeout(Duration::from_secs(10), mysql_async::Conn::new(opts))
        .await
        .expect("connect through the gateway in time")
        .expect("connect through the gateway");
    let id: Option<u32> = conn.query_first("SELECT @@server_id").await.unwrap();
    let primary_uid = cluster.tablet_by_alias(PRIMARY).unwrap().uid();
    assert_eq!(id, Some(primary_uid), "the RW port reaches the primary");
    let _ = conn.disconnect().await;

    // Stable: over 3 s the gateway never drops the healthy primary or a replica.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let v = get_json(&gw_addr, "/routing").await;
        let s = shard0(&v);
        assert_eq!(s["rw"]["alias"], PRIMARY, "rw flapped: {s}");
        assert_eq!(s["ro"].as_array().map(Vec::len), Some(2), "ro flapped: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The primary's agent dies: the orchestrator shows its stream down, the gateway keeps
    // routing writes to the primary (degraded, with the reason), reads still go to the replicas.
    let killed_at = Instant::now();
    cluster
        .tablet_by_alias(PRIMARY)
        .unwrap()
        .agent_proc()
        .unwrap()
        .kill()
        .unwrap();
    let v = poll_json(
        &orch,
        &orch_addr,
        "/api/v1/shards",
        Duration::from_secs(10),
        |v| tablet(shard0(v), PRIMARY)["stream"] == "connecting",
    )
    .await;
    eprintln!(
        "orchestrator: primary stream down {:?} after the kill: {}",
        killed_at.elapsed(),
        tablet(shard0(&v), PRIMARY)["stream_error"]
    );
    // The replicas' probes still reach its mysqld (P5, P17): writes keep going to it, the route
    // marked degraded with the reason.
    let v = poll_json(&gw, &gw_addr, "/routing", Duration::from_secs(10), |v| {
        shard0(v)["rw"]["degraded"].is_string()
    })
    .await;
    let s = shard0(&v);
    eprintln!(
        "gateway: rw degraded {:?} after the kill: {}",
        killed_at.elapsed(),
        s["rw"]["degraded"]
    );
    assert_eq!(s["rw"]["alias"], PRIMARY, "{s}");
    assert!(
        s["rw"]["degraded"]
            .as_str()
            .is_some_and(|r| r.contains(PRIMARY) && r.contains("probes of")),
        "{s}"
    );
    assert_eq!(s["ro"].as_array().map(Vec::len), Some(2), "{s}");

    // The orchestrator took no action: a primary whose agent is gone but whose mysqld the
    // replicas still reach is not dead (P5). The gateway logged its port and the change.
    orch.check_alive().unwrap_or_else(|e| panic!("{e}"));
    gw.check_alive().unwrap_or_else(|e| panic!("{e}"));
    let log = orch.log_text();
    assert!(!log.contains("emergency_reparent"), "{log}");
    let log = gw.log_text();
    assert!(
        log.contains("listening") && log.contains(&gw_rw) && log.contains("routing changed"),
        "{log}"
    );
    eprintln!("daemons test done in {:?}", t0.elapsed());
}
