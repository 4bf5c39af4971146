//! The orchestrator's HTTP API against real processes (harness cluster + `OrchestratorProc`
//! with an `api_token`): the shard view, the bearer token on changes, disable/enable (shard and
//! global) reflected in `/api/v1/shards`, ack, the audit listing, JSON errors, the per-tablet
//! gauges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Cluster, ClusterOptions, OrchestratorProc};
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
    assert_eq!(
        (code, body["error"].as_str()),
        (401, Some("wrong bearer token"))
    );
    // Reads do not.
    assert_eq!(o.get_text("/api/v1/recoveries").await.unwrap().0, 200);

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
