//! Issue 13, point 3: the agents' health checks for load balancers, used by a real HAProxy
//! (`option httpchk`) in front of the tablets' mysqld, across a failover. For users who keep
//! their own proxy instead of myha-gateway.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::{free_port, Cluster};
use myha_tests::bench::Haproxy;
use myha_tests::gw::app_opts;
use myha_tests::ha::*;
use mysql_async::prelude::Queryable;
use serde_json::Value;

/// `GET http://{addr}{path}`: status and JSON body.
async fn check(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"));
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.expect("a JSON body");
    (status, body)
}

/// Through HAProxy's `port`: writes a row when `write` is given, then asks which server
/// answered (`@@server_id`), or says why it could not.
async fn server_id_via(c: &Cluster, port: u16, write: Option<&str>) -> Result<u32, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = mysql_async::Conn::new(app_opts(c, addr))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(v) = write {
        conn.exec_drop("INSERT INTO lb (v) VALUES (?)", (v,))
            .await
            .map_err(|e| e.to_string())?;
    }
    let id: Option<u32> = conn
        .query_first("SELECT @@server_id")
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.disconnect().await;
    id.ok_or_else(|| "no server_id".into())
}

fn haproxy_config(c: &Cluster, rw: u16, ro: u16) -> String {
    let servers = || -> String {
        c.tablets()
            .iter()
            .map(|t| {
                let agent = t.agent_proc().expect("agent");
                format!(
                    "    server {} 127.0.0.1:{} check port {}\n",
                    t.alias(),
                    t.mysqld().port(),
                    agent.http_addr().port()
                )
            })
            .collect()
    };
    format!(
        "global\n    maxconn 256\n\ndefaults\n    mode tcp\n    timeout connect 1s\n    \
         timeout client 30s\n    timeout server 30s\n    timeout check 1s\n    \
         default-server inter 100ms fall 1 rise 1 on-marked-down shutdown-sessions\n\n\
         listen mysql_rw\n    bind 127.0.0.1:{rw}\n    option httpchk GET /primary\n    \
         http-check expect status 200\n{}\n\
         listen mysql_ro\n    bind 127.0.0.1:{ro}\n    balance roundrobin\n    \
         option httpchk GET /replica?max_lag=5s\n    http-check expect status 200\n{}",
        servers(),
        servers()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_follows_the_primary_across_a_failover_by_the_agents_checks() {
    pki::install_crypto_provider();
    let c = start(ha_options(3)).await;
    wait_quiet(orch(&c), &c, BOUND).await;
    let http = |i: usize| c.tablet(i).agent_proc().expect("agent").http_addr();

    // The checks themselves: the primary passes /primary and /read-write, the replicas
    // /replica (within a lag bound) and all three /read-only and /health; each answer says why.
    let (s, b) = check(http(0), "/primary").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["role"].as_str(), b["ok"].as_bool()),
        (Some("primary"), Some(true))
    );
    assert_eq!(check(http(0), "/read-write").await.0, 200);
    let (s, b) = check(http(0), "/replica").await;
    assert_eq!(s, 503, "{b}");
    assert!(
        b["reason"].as_str().unwrap_or("").contains("not a replica"),
        "{b}"
    );
    for i in [1, 2] {
        let (s, b) = check(http(i), "/primary").await;
        assert_eq!(s, 503, "{b}");
        assert!(
            b["reason"]
                .as_str()
                .unwrap_or("")
                .contains("not the primary"),
            "{b}"
        );
        // Right after start a replica's lag may not be measured yet (no heartbeat applied):
        // with max_lag it then answers 503 "lag unknown", so wait for its first measure.
        wait_ok(&c, "the replica check with max_lag", BOUND, || async {
            match check(http(i), "/replica?max_lag=5s").await {
                (200, _) => Ok(()),
                (s, b) => Err(format!("{s}: {b}")),
            }
        })
        .await;
    }
    for i in 0..3 {
        assert_eq!(check(http(i), "/read-only").await.0, 200);
        assert_eq!(check(http(i), "/health").await.0, 200);
    }
    let (s, b) = check(http(1), "/replica?max_lag=soon").await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["reason"].as_str().unwrap_or("").contains("max_lag"),
        "{b}"
    );

    // HAProxy routes by them: writes to the primary, reads to the replicas.
    let mut root = c.tablet(0).root_conn().await.expect("root");
    root.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS `{}`.lb (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(32))",
        c.credentials().database
    ))
    .await
    .expect("create the table");
    drop(root);
    let (rw, ro) = (free_port().expect("port"), free_port().expect("port"));
    let haproxy = Haproxy::start_with(c.dir(), rw, &haproxy_config(&c, rw, ro)).expect("haproxy");
    let ids: Vec<u32> = c.tablets().iter().map(|t| t.mysqld().server_id()).collect();
    wait_ok(
        &c,
        "HAProxy's RW port reaching the primary",
        BOUND,
        || async {
            match server_id_via(&c, rw, Some("before")).await {
                Ok(id) if id == ids[0] => Ok(()),
                Ok(id) => Err(format!("reached server {id}")),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    // HAProxy 2.6 starts every server as up until its first check: wait for the checks to
    // take the primary out of the RO pool, then every read lands on a replica.
    wait_ok(&c, "the RO port reaching only replicas", BOUND, || async {
        for _ in 0..6 {
            match server_id_via(&c, ro, None).await {
                Ok(id) if id == ids[0] => return Err("reached the primary".to_string()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await;

    // The primary's mysqld dies: the orchestrator promotes a replica, whose agent then passes
    // /primary, and HAProxy sends writes there.
    let killed = Instant::now();
    c.tablet(0).mysqld().kill().expect("kill mysqld");
    let new_id = loop {
        let last = match server_id_via(&c, rw, Some("after")).await {
            Ok(id) if id != ids[0] => break id,
            Ok(id) => format!("reached server {id}"),
            Err(e) => e,
        };
        assert!(
            killed.elapsed() < BOUND,
            "no write through HAProxy's RW port within {BOUND:?} of the kill: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = killed.elapsed();
    let primary = c.primary().await.expect("shard record");
    assert_eq!(
        new_id,
        primary.mysqld().server_id(),
        "HAProxy wrote to a tablet the shard record does not name"
    );
    println!(
        "HAProxy (inter 100ms) wrote to the new primary {} {:.3} s after the kill",
        primary.alias(),
        took.as_secs_f64()
    );
    // Reads go to the remaining replica once it replicates from the new primary.
    wait_ok(
        &c,
        "the RO port reaching the remaining replica",
        BOUND,
        || async {
            match server_id_via(&c, ro, None).await {
                Ok(id) if id != new_id && id != ids[0] => Ok(()),
                Ok(id) => Err(format!("reached server {id}")),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    drop(haproxy);
}
