//! `myhactl` as an operator runs it: sandbox up (with its orchestrator), status, sql, down —
//! real processes throughout.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn myhactl(args: &[&str], env_dir: &Path) -> Output {
    let bin = harness::find_myha_bin("myhactl").expect("myhactl binary");
    Command::new(bin)
        .args(args)
        .env("MYHA_SANDBOX_DIR", env_dir)
        .env_remove("MYHA_ETCD")
        .env_remove("MYHA_ORCHESTRATOR")
        .output()
        .expect("run myhactl")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Stops the sandbox even when an assertion fails half-way.
struct Down<'a>(&'a Path);
impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = myhactl(
            &["sandbox", "down", "--dir", &self.0.to_string_lossy()],
            self.0,
        );
    }
}

#[test]
fn sandbox_up_status_sql_down() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sb");
    let d = dir.to_string_lossy().to_string();

    let out = myhactl(&["sandbox", "up", "--dir", &d, "--json"], &dir);
    let _down = Down(&dir);
    assert!(out.status.success(), "{}", text(&out));
    let up: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    for key in [
        "dir",
        "etcd",
        "orchestrator_http",
        "keyspace",
        "shard",
        "app_user",
        "app_password",
        "database",
        "tablets",
    ] {
        assert!(!up[key].is_null(), "missing `{key}` in {up}");
    }
    let tablets = up["tablets"].as_array().unwrap();
    assert_eq!(tablets.len(), 3);
    for t in tablets {
        for key in [
            "alias",
            "mysql",
            "socket",
            "mysqld_pid",
            "agent_pid",
            "agent_grpc",
        ] {
            assert!(!t[key].is_null(), "missing `{key}` in {t}");
        }
        let pid = t["mysqld_pid"].as_u64().unwrap() as u32;
        assert!(
            harness::pid_alive(pid),
            "mysqld {pid} runs after `up` returned"
        );
    }

    // The sandbox's orchestrator answers.
    let orch = up["orchestrator_http"].as_str().unwrap().to_string();
    assert_eq!(http_get(&orch, "/health").0, 200);
    let (code, body) = http_get(&orch, "/api/v1/shards");
    assert_eq!(code, 200, "{body}");
    let shards: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(shards["shards"].is_array(), "{shards}");

    // A second `up` on the same dir is refused, saying how to stop the first.
    let again = myhactl(&["sandbox", "up", "--dir", &d], &dir);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("sandbox down"), "{}", text(&again));

    // SQL through the sandbox helper goes to the primary and replicates.
    let out = myhactl(
        &[
            "sandbox",
            "sql",
            "--dir",
            &d,
            "CREATE TABLE demo (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
            "INSERT INTO demo (v) VALUES (1), (2), (3)",
            "SELECT COUNT(*) AS n FROM demo",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\n3\n"),
        "{}",
        text(&out)
    );

    // Status: one writable primary, two replicating read-only replicas with live lag figures,
    // and the orchestrator (found through the sandbox) sees no problem.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = myhactl(&["status", "--json"], &dir);
        assert!(out.status.success(), "{}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ts = v["shards"][0]["tablets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = ts.len() == 3
            && v["orchestrator"]["reachable"] == true
            && v["orchestrator"]["analysed"] == true
            && v["shards"][0]["problems"] == serde_json::json!([])
            && ts.iter().all(|t| t["healthy"] == true)
            && ts
                .iter()
                .filter(|t| t["role"] == "replica")
                .all(|t| t["lag_ms"].is_u64());
        if ready {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed a healthy shard: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let shard = &status["shards"][0];
    assert_eq!(shard["keyspace"], "commerce");
    assert_eq!(shard["problems_source"], "orchestrator");
    assert!(shard.get("last_recovery").is_some(), "{shard}");
    assert_eq!(shard["term"], 1);
    let primary = shard["primary"].as_str().unwrap();
    let tablets = shard["tablets"].as_array().unwrap();
    let roles: Vec<&str> = tablets
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "primary").count(),
        1,
        "{status:#}"
    );
    for t in tablets {
        let is_primary = t["alias"] == primary;
        assert_eq!(t["read_only"], !is_primary, "{t}");
        assert_eq!(t["replicating"], !is_primary, "{t}");
        assert_eq!(t["semi_sync"]["primary"], is_primary, "{t}");
        assert_eq!(t["semi_sync"]["replica"], !is_primary, "{t}");
        assert!(
            t["gtid_position"].as_str().unwrap().starts_with("0-101-"),
            "{t}"
        );
        if !is_primary {
            assert_eq!(
                t["source"],
                tablets.iter().find(|x| x["alias"] == primary).unwrap()["mysql"]
            );
            assert!(t["lag_ms"].as_u64().unwrap() < 5_000, "{t}");
        }
    }
    // The human table says the same.
    let out = myhactl(&["status"], &dir);
    let human = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        human.contains(&format!("commerce/0  primary {primary}  term 1")),
        "{human}"
    );
    assert!(human.contains("problems: none"), "{human}");

    // With the orchestrator unreachable, status says so and still answers.
    let out = Command::new(harness::find_myha_bin("myhactl").unwrap())
        .args(["status", "--json", "--orchestrator", "127.0.0.1:1"])
        .env("MYHA_SANDBOX_DIR", &dir)
        .env_remove("MYHA_ETCD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["orchestrator"]["reachable"], false, "{v}");
    assert_eq!(v["shards"][0]["last_recovery_source"], "etcd", "{v}");
    assert!(v["shards"][0]["problems"].is_array(), "{v}");

    let mut pids: Vec<u32> = tablets_pids(&up);
    let orch_pid = std::fs::read_to_string(dir.join("sandbox.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["orchestrator_pid"].as_u64())
        .expect("orchestrator_pid in sandbox.json") as u32;
    assert!(harness::pid_alive(orch_pid));
    pids.push(orch_pid);
    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| harness::pid_alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes survived `sandbox down`"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = myhactl(&["sandbox", "down", "--dir", &d], &dir);
    assert!(
        !out.status.success(),
        "down without a sandbox fails: {}",
        text(&out)
    );
    let out = myhactl(&["status"], &dir);
    assert!(!out.status.success());
    assert!(text(&out).contains("no sandbox"), "{}", text(&out));
}

fn tablets_pids(up: &Value) -> Vec<u32> {
    up["tablets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| [t["mysqld_pid"].as_u64(), t["agent_pid"].as_u64()])
        .flatten()
        .map(|p| p as u32)
        .collect()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}
