//! The orchestrator's HTTP API against real processes (harness cluster + `OrchestratorProc`
//! with an `api_token`): the shard view, the bearer token on every API request, disable/enable
//! (shard and global) reflected in `/api/v1/shards`, ack, the audit listing, JSON errors, the
//! per-tablet gauges. Then authentication: `read` and `operate` tokens (401 without a known
//! token, 403 for a `read` token on a change, the orchestrator serving legitimate clients all
//! along), the audit actor being the token's name whatever the body claims, and an open API
//! on a non-loopback address refused at start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{ApiRole, ApiTokenConfig, Cluster, ClusterOptions, OrchestratorProc};
use serde_json::{json, Value};

const TOKEN: &str = "t0ken-for-tests";

async fn wait_shard(o: &OrchestratorProc, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = o.shards().await.expect("GET /api/v1/shards");
        let shard = v["shards"][0].clone();
        if ok(&shard) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: never true in {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_controls_and_reports() {
    let started = Instant::now();
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        start_orchestrator: true,
        orchestrator_config: Some(Arc::new(|cfg: &mut harness::OrchestratorConfig| {
            cfg.orchestrator.api_token = Some(TOKEN.into());
        })),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    println!("cluster up in {:?}", started.elapsed());
    let o = c.orchestrator().expect("orchestrator started");
    assert_eq!(o.get_text("/health").await.unwrap(), (200, "ok\n".into()));

    // A healthy shard: analysed, no problems, recoveries enabled, nothing recovered yet.
    let v = wait_shard(o, "healthy shard", |s| {
        s["problems"] == json!([]) && s["tablets"].as_array().is_some_and(|t| t.len() == 2)
    })
    .await;
    assert_eq!(v["analysed"], true, "{v:#}");
    assert_eq!(v["recoveries_enabled"], true, "{v:#}");
    let s = &v["shards"][0];
    assert_eq!(s["recovery"]["enabled"], true, "{s:#}");
    assert_eq!(s["recovery"]["in_progress"], Value::Null);
    assert_eq!(s["last_recovery"], Value::Null);

    // Changes need the token.
    let shard = json!({"keyspace": c.keyspace(), "shard": c.shard(), "reason": "maintenance"});
    let (code, body) = o
        .post_json_with_token("/api/v1/recoveries/disable", &shard, None)
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (code, body) = o
        .post_json_with_token("/api/v1/recoveries/disable", &shard, Some("wrong"))
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("wrong bearer token")),
        "{body}"
    );
    // Reads too (the legacy `api_token` is an `operate` token); /health and /metrics do not.
    let (code, body) = o
        .get_text_with_token("/api/v1/recoveries", None)
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    assert_eq!(o.get_text("/api/v1/recoveries").await.unwrap().0, 200);
    assert_eq!(
        o.get_text_with_token("/metrics", None).await.unwrap().0,
        200
    );

    // Disable one shard: the shard view says so, with the reason; the audit log has it.
    let (code, body) = o
        .post_json("/api/v1/recoveries/disable", &shard)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["scope"], format!("{}/{}", c.keyspace(), c.shard()));
    let v = wait_shard(o, "shard disabled", |s| s["recovery"]["enabled"] == false).await;
    let reason = v["shards"][0]["recovery"]["disabled_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("maintenance"), "{v:#}");
    let audit = o
        .get_json(&format!(
            "/api/v1/recoveries?keyspace={}&shard={}&limit=5",
            c.keyspace(),
            c.shard()
        ))
        .await
        .unwrap();
    let first = &audit["recoveries"][0];
    assert_eq!(first["action"], "recoveries_disabled", "{audit:#}");
    assert_eq!(first["shard"], c.shard(), "{audit:#}");

    // Enable again (query string instead of a body).
    let (code, body) = o
        .post_json(
            &format!(
                "/api/v1/recoveries/enable?keyspace={}&shard={}",
                c.keyspace(),
                c.shard()
            ),
            &Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    wait_shard(o, "shard enabled", |s| s["recovery"]["enabled"] == true).await;

    // Global disable and enable.
    let (code, _) = o
        .post_json("/api/v1/recoveries/disable", &json!({"reason": "freeze"}))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = o.shards().await.unwrap();
        if v["recoveries_enabled"] == false && v["shards"][0]["recovery"]["enabled"] == false {
            assert!(
                v["recoveries_disabled_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("freeze")),
                "{v:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "global disable not shown: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = o
        .post_json("/api/v1/recoveries/enable", &json!({}))
        .await
        .unwrap();
    assert_eq!(code, 200);
    wait_shard(o, "enabled again", |s| s["recovery"]["enabled"] == true).await;

    // Ack: audited; unknown shards are 404.
    let (code, body) = o
        .post_json(
            &format!("/api/v1/shards/{}/{}/ack", c.keyspace(), c.shard()),
            &json!({"reason": "checked"}),
        )
        .await
        .unwrap();
    assert_eq!(
        (code, body["action"].as_str()),
        (200, Some("ack")),
        "{body}"
    );
    let (code, body) = o
        .post_json("/api/v1/shards/nope/0/ack", &Value::Null)
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nope/0"), "{body}");
    let audit = o.get_json("/api/v1/recoveries?limit=10").await.unwrap();
    let actions: Vec<&str> = audit["recoveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["ack", "recoveries_enabled", "recoveries_disabled"],
        "newest first: {audit:#}"
    );

    // Bad requests are JSON errors with a 4xx status.
    let (code, body) = o
        .post_json(
            "/api/v1/recoveries/disable",
            &json!({"keyspace": "commerce"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("without shard"));
    let (code, body) = o.get_text("/api/v1/recoveries?limit=0").await.unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());

    // Per-tablet gauges.
    let (code, metrics) = o.get_text("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for t in c.tablets() {
        let labels = format!(
            "{{tablet=\"{}\",keyspace=\"{}\",shard=\"{}\"}}",
            t.alias(),
            c.keyspace(),
            c.shard()
        );
        assert!(
            metrics.contains(&format!(
                "myha_orchestrator_tablet_stream_connected{labels} 1"
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                "myha_orchestrator_tablet_mysql_reachable{labels} 1"
            )),
            "{metrics}"
        );
    }
    // The replica's lag is known once it has applied a heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = o.get_text("/metrics").await.unwrap();
        if metrics.contains("myha_orchestrator_tablet_lag_ms{tablet=\"zone1-102\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no lag gauge: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("test done in {:?}", started.elapsed());
}

const OPS: &str = "ops-t0ken-for-tests";
const GRAFANA: &str = "grafana-t0ken-for-tests";

/// The audit entries of the cluster's shard for the operator changes this test makes (newest
/// first), read with the `read` token.
async fn audit(o: &OrchestratorProc, c: &Cluster) -> Vec<Value> {
    let (code, body) = o
        .get_text_with_token(
            &format!(
                "/api/v1/recoveries?keyspace={}&shard={}&limit=20",
                c.keyspace(),
                c.shard()
            ),
            Some(GRAFANA),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["recoveries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            [
                "recoveries_disabled",
                "quarantine_added",
                "quarantine_released",
            ]
            .contains(&e["action"].as_str().unwrap_or_default())
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_have_roles_and_the_audit_names_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let grafana_file = dir.path().join("grafana.token");
    std::fs::write(&grafana_file, format!("{GRAFANA}\n")).unwrap();
    let c = Cluster::start(ClusterOptions {
        tablets: 2,
        start_orchestrator: true,
        orchestrator_config: Some(Arc::new(move |cfg: &mut harness::OrchestratorConfig| {
            cfg.orchestrator.api_tokens = vec![
                ApiTokenConfig {
                    name: "ops".into(),
                    role: ApiRole::Operate,
                    token: Some(OPS.into()),
                    token_file: None,
                },
                ApiTokenConfig {
                    name: "grafana".into(),
                    role: ApiRole::Read,
                    token: None,
                    token_file: Some(grafana_file.clone()),
                },
            ];
        })),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let o = c.orchestrator().expect("orchestrator started");
    assert_eq!(o.client_token(), Some(OPS));
    let replica = c.tablet(1).alias().to_string();

    // Liveness and scraping need no token.
    assert_eq!(
        o.get_text_with_token("/health", None).await.unwrap(),
        (200, "ok\n".into())
    );
    assert_eq!(
        o.get_text_with_token("/metrics", None).await.unwrap().0,
        200
    );

    // Reads: a `read` (from its file) or `operate` token; none or a wrong one is 401.
    for token in [GRAFANA, OPS] {
        let (code, body) = o
            .get_text_with_token("/api/v1/shards", Some(token))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
    }
    for (token, want) in [
        (None, "Authorization: Bearer"),
        (Some("wrong"), "wrong bearer token"),
    ] {
        for path in ["/api/v1/shards", "/api/v1/quarantine", "/api/v1/nosuch"] {
            let (code, body) = o.get_text_with_token(path, token).await.unwrap();
            assert_eq!(code, 401, "{path} {token:?}: {body}");
            let err = serde_json::from_str::<Value>(&body).unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(err.contains(want), "{path} {token:?}: {body}");
        }
    }

    // Changes: the `read` token is 403 naming the token and the role needed, a wrong one 401;
    // nothing changes.
    let disable = json!({"keyspace": c.keyspace(), "shard": c.shard(), "reason": "by grafana?"});
    let (code, body) = o
        .post_json_with_token("/api/v1/recoveries/disable", &disable, Some(GRAFANA))
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    let err = body["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("`grafana`") && err.contains("`read` role") && err.contains("`operate` role"),
        "{body}"
    );
    assert!(
        !err.contains(GRAFANA),
        "the secret is never in an answer: {body}"
    );
    let quarantine = format!("/api/v1/quarantine/{replica}");
    let (code, body) = o
        .post_json_with_token(&quarantine, &json!({"reason": "x"}), Some("wrong"))
        .await
        .unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, body) = o
        .send_json_with_token(
            reqwest::Method::DELETE,
            &quarantine,
            &json!({}),
            Some(GRAFANA),
        )
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        audit(o, &c).await.is_empty(),
        "refused requests changed nothing"
    );

    // The `operate` token works, and the actor is its name, whatever the body claims.
    let (code, body) = o
        .post_json_with_token("/api/v1/recoveries/disable", &disable, Some(OPS))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = o
        .post_json_with_token(
            &quarantine,
            &json!({"reason": "disk errors", "requester": "mallory"}),
            Some(OPS),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["tablet"]["by"], "token:ops from 127.0.0.1", "{body}");
    assert_eq!(
        body["tablet"]["reason"], "disk errors (on behalf of mallory)",
        "the requester is a note: {body}"
    );
    let (code, body) = o
        .send_json_with_token(
            reqwest::Method::DELETE,
            &quarantine,
            &json!({"reason": "checked", "requester": "mallory"}),
            Some(OPS),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = o
        .get_text_with_token("/api/v1/quarantine", Some(GRAFANA))
        .await
        .unwrap();
    assert_eq!((code, body.contains(&replica)), (200, false), "{body}");
    let entries = audit(o, &c).await;
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default(),
                e["actor"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("quarantine_released", "token:ops from 127.0.0.1"),
            ("quarantine_added", "token:ops from 127.0.0.1"),
            ("recoveries_disabled", "token:ops from 127.0.0.1"),
        ],
        "{entries:#?}"
    );
    assert!(
        entries[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("checked, on behalf of mallory")),
        "{entries:#?}"
    );

    // Still serving everyone legitimate after the refusals.
    let (code, body) = o
        .post_json_with_token(
            "/api/v1/recoveries/enable",
            &json!({"keyspace": c.keyspace(), "shard": c.shard()}),
            Some(OPS),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    wait_shard(o, "enabled again", |s| s["recovery"]["enabled"] == true).await;
    let (code, metrics) = o.get_text("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for status in ["401", "403"] {
        assert!(
            metrics.contains(&format!(
                "myha_orchestrator_api_refused_total{{status=\"{status}\"}}"
            )),
            "{metrics}"
        );
    }
    // No secret reached the log.
    let log = std::fs::read_to_string(o.log_path()).unwrap();
    assert!(log.contains("API request refused"), "{log}");
    for secret in [OPS, GRAFANA] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// `myha-orchestrator --config` with `text` (written to `dir`): its exit status and output,
/// within 20 s.
async fn run_orchestrator(
    dir: &std::path::Path,
    text: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    let bin = harness::find_myha_bin("myha-orchestrator").expect("myha-orchestrator built");
    let path = dir.join("orchestrator.toml");
    std::fs::write(&path, text).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(bin)
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the orchestrator exits on a refused config")
    .expect("run myha-orchestrator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_off_loopback_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = harness::free_port().unwrap();
    // etcd is never reached: the config is refused first.
    let tail = "\n[etcd]\nendpoints = [\"http://127.0.0.1:9\"]\n";
    for listen in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let text = format!("[orchestrator]\nhttp_listen = \"{listen}\"\n{tail}");
        for args in [&[][..], &["--check-config"][..]] {
            let (code, out) = run_orchestrator(dir.path(), &text, args).await;
            assert!(
                code.is_some_and(|c| c != 0),
                "{listen} {args:?}: {code:?} {out}"
            );
            assert!(
                out.contains("`orchestrator.http_listen`")
                    && out.contains("not a loopback address")
                    && out.contains("orchestrator.api_tokens"),
                "{listen} {args:?}: {out}"
            );
        }
        // It never listened.
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{listen}: something listens on {port}"
        );
    }
    // With a token the same address is accepted (checked, not started).
    let text = format!(
        "[orchestrator]\nhttp_listen = \"0.0.0.0:{port}\"\n\
         [[orchestrator.api_tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"{OPS}\"\n{tail}"
    );
    let (code, out) = run_orchestrator(dir.path(), &text, &["--check-config"]).await;
    assert_eq!(code, Some(0), "{out}");
    // A bad token entry is named by its key, its secret never printed.
    let text = format!(
        "[orchestrator]\nhttp_listen = \"127.0.0.1:{port}\"\n\
         [[orchestrator.api_tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"{OPS}\"\n\
         [[orchestrator.api_tokens]]\nname = \"ops2\"\nrole = \"read\"\ntoken = \"{OPS}\"\n{tail}"
    );
    let (code, out) = run_orchestrator(dir.path(), &text, &[]).await;
    assert!(code.is_some_and(|c| c != 0), "{out}");
    assert!(out.contains("`orchestrator.api_tokens[1].token`"), "{out}");
    assert!(!out.contains(OPS), "{out}");
}
