//! Quarantine end to end, real processes (etcd + 3 MariaDB semi_sync + agents + orchestrator
//! with an API token + gateway), driven with `myhactl` as an operator would: `quarantine add`
//! a replica -> the orchestrator lists it and its analysis reports it, the gateway stops
//! routing reads to it (new RO connections land on the other replica, an open one to it is
//! closed) and a planned reparent does not choose it; refusals (no token, the primary, an
//! unknown alias) exit 1 with the orchestrator's reason; the record's `by` and the audit's
//! actor are the token's name, `--requester` only a note on the reason; `quarantine release`
//! -> the repairs repoint it and the gateway routes reads to it again. Every asynchronous effect is polled
//! with a generous bound; timings are printed, never asserted.
//!
//! Needs the binaries: `cargo build -p myha-agent -p myha-orchestrator -p myha-gateway -p myhactl`.

use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};
use topo::Term;

use harness::{Cluster, ClusterOptions, GatewayProc};
use myha_tests::ctl::text;
use myha_tests::{gw, ha};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use serde_json::Value;

const TOKEN: &str = "t0ken-for-quarantine";
/// The audit actor of a change made with [`TOKEN`] (the legacy `api_token`).
const ACTOR: &str = "token:api_token from 127.0.0.1";
/// Bound on every asynchronously updated state (routing, analysis, repairs).
const BOUND: Duration = Duration::from_secs(30);

fn options() -> ClusterOptions {
    ClusterOptions {
        start_gateway: true,
        orchestrator_config: Some(Arc::new(|cfg: &mut harness::OrchestratorConfig| {
            cfg.etcd.lease_ttl = ha::ORCH_LEASE_TTL;
            cfg.recovery.lock_ttl = ha::ORCH_LEASE_TTL;
            cfg.orchestrator.api_token = Some(TOKEN.into());
        })),
        ..ha::ha_options(3)
    }
}

/// `myhactl args` against the cluster's orchestrator (and etcd), with `token` if any.
async fn ctl(c: &Cluster, token: Option<&str>, args: &[&str]) -> Output {
    let bin = harness::find_myha_bin("myhactl").expect("myhactl binary");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env("MYHA_SANDBOX_DIR", "/nonexistent/myha-sandbox")
        .envs(c.ctl_env().expect("myhactl's etcd environment"))
        .env("MYHA_ORCHESTRATOR", ha::orch(c).url(""))
        .env_remove("MYHA_API_TOKEN");
    if let Some(t) = token {
        cmd.env("MYHA_API_TOKEN", t);
    }
    cmd.output().await.expect("run myhactl")
}

/// A connection through the gateway's RO port and the server_id behind it.
async fn ro_conn(c: &Cluster, g: &GatewayProc) -> (u32, Conn) {
    let addr = g.ro_addr().expect("RO listener");
    let mut conn = tokio::time::timeout(Duration::from_secs(15), Conn::new(gw::app_opts(c, addr)))
        .await
        .unwrap_or_else(|_| panic!("no RO connection through {addr} within 15 s"))
        .unwrap_or_else(|e| panic!("RO connect through {addr}: {e}"));
    let id = server_id(&mut conn).await.expect("SELECT @@server_id");
    (id, conn)
}

async fn server_id(conn: &mut Conn) -> Result<u32, String> {
    let row: Option<u32> = tokio::time::timeout(
        Duration::from_secs(5),
        conn.query_first("SELECT @@server_id"),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    row.ok_or_else(|| "no row".to_string())
}

/// Polls the orchestrator's view of the shard until `pred` holds.
async fn wait_shard(c: &Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = ha::shard_json(ha::orch(c), c).await;
        if pred(&s) {
            return s;
        }
        assert!(
            start.elapsed() < BOUND,
            "{what}: never true within {BOUND:?}: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn has_problem(s: &Value, code: &str, tablet: &str) -> bool {
    ha::problems(s)
        .iter()
        .any(|(c, t, _)| c == code && t.as_deref() == Some(tablet))
}

/// The sum of the samples of metric `name` whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_keeps_a_replica_out_of_reads_and_promotion_until_released() {
    let c = ha::start(options()).await;
    let g = c.gateway().expect("gateway");
    let [p, r1, r2] = [c.tablet(0), c.tablet(1), c.tablet(2)];
    let shard = format!("{}/{}", c.keyspace(), c.shard());
    gw::wait_routes(&c, g, p.alias(), &[r1.alias(), r2.alias()], BOUND).await;

    // An open RO connection on r2 (the one to be quarantined), opened before the change.
    let mut on_r2 = None;
    for _ in 0..20 {
        let (id, conn) = ro_conn(&c, g).await;
        if id == r2.uid() {
            on_r2 = Some(conn);
            break;
        }
    }
    let mut on_r2 = on_r2.expect("an RO connection on r2 within 20 tries");

    // ---- refusals: exit 1 with the orchestrator's reason; nothing changes.
    let reason = "test: suspect data after a disk error";
    let out = ctl(
        &c,
        None,
        &["quarantine", "add", r2.alias(), "--reason", reason],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("401"), "{}", text(&out));
    let out = ctl(
        &c,
        Some(TOKEN),
        &["quarantine", "add", p.alias(), "--reason", "x"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is the primary of"), "{}", text(&out));
    let out = ctl(
        &c,
        Some(TOKEN),
        &["quarantine", "add", "zone1-999", "--reason", "x"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no tablet zone1-999 is registered"),
        "{}",
        text(&out)
    );
    let out = ctl(&c, Some(TOKEN), &["quarantine", "add", "not-an-alias"]).await;
    assert_eq!(out.status.code(), Some(2), "usage error: {}", text(&out));
    let out = ctl(&c, Some(TOKEN), &["quarantine", "release", r2.alias()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is not quarantined"), "{}", text(&out));

    // ---- quarantine r2.
    let t_add = Instant::now();
    let out = ctl(
        &c,
        Some(TOKEN),
        &[
            "quarantine",
            "add",
            r2.alias(),
            "--reason",
            reason,
            "--requester",
            "alice",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("quarantined: test: suspect data"),
        "{}",
        text(&out)
    );

    // Reads need a token too.
    let out = ctl(&c, None, &["quarantine", "list", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("401"), "{}", text(&out));
    let out = ctl(&c, Some(TOKEN), &["quarantine", "list", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    let entries = list["quarantine"].as_array().expect("array").clone();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["alias"], r2.alias());
    // `--requester` is a note on the reason; `by` is who the token says.
    let recorded = format!("{reason} (on behalf of alice)");
    assert_eq!(entries[0]["reason"], recorded.as_str());
    assert_eq!(entries[0]["by"], ACTOR);
    assert_eq!(entries[0]["shard"], c.shard());
    assert_eq!(entries[0]["term"], 1);

    // The orchestrator's analysis reports it; its tablet carries the reason.
    wait_shard(&c, "quarantined problem for r2", |s| {
        has_problem(s, "quarantined", r2.alias())
            && s["tablets"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["alias"] == r2.alias()
                        && t["quarantined"]
                            .as_str()
                            .is_some_and(|q| q.contains(reason))
                })
            })
    })
    .await;

    // The gateway: reads only to r1, r2 excluded with the reason, the open connection closed.
    let s = gw::wait_routes(&c, g, p.alias(), &[r1.alias()], BOUND).await;
    println!(
        "gateway stopped routing reads to {} {:.1} s after `quarantine add`",
        r2.alias(),
        t_add.elapsed().as_secs_f64()
    );
    let excluded = s["ro_excluded"].as_array().cloned().unwrap_or_default();
    assert!(
        excluded.iter().any(|e| e["alias"] == r2.alias()
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("quarantined: ") && r.contains(reason))),
        "{s}"
    );
    let start = Instant::now();
    loop {
        match server_id(&mut on_r2).await {
            Err(e) => {
                println!("open RO connection to r2 closed: {e}");
                break;
            }
            Ok(id) => assert_eq!(id, r2.uid()),
        }
        assert!(
            start.elapsed() < BOUND,
            "the open RO connection to the quarantined replica was never closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..8 {
        let (id, _conn) = ro_conn(&c, g).await;
        assert_eq!(
            id,
            r1.uid(),
            "a new RO connection reached the quarantined replica"
        );
    }
    let m = g.metrics().await.expect("gateway metrics");
    assert_eq!(
        metric(&m, "myha_gateway_ro_excluded", &[("reason", "quarantined")]),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "myha_gateway_closed_by_routing_total",
            &[("role", "ro")]
        ) >= 1.0,
        "{m}"
    );

    // `status` shows it (from etcd, and the orchestrator's problem).
    let out = ctl(&c, Some(TOKEN), &["status"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("quarantined {}", r2.alias())),
        "{}",
        text(&out)
    );

    // Audited on the shard.
    ha::wait_audit(&c, "quarantine_added", BOUND, |a| {
        a.iter().any(|e| {
            e.action == "quarantine_added"
                && e.tablet.as_deref() == Some(r2.alias())
                && e.actor == ACTOR
                && e.detail == recorded
        })
    })
    .await;

    // ---- promotion: refused as the explicit candidate, passed over by the planned choice.
    let out = ctl(
        &c,
        Some(TOKEN),
        &["reparent", "planned", &shard, "--to", r2.alias()],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("quarantined"), "{}", text(&out));
    let out = ctl(&c, Some(TOKEN), &["reparent", "planned", &shard]).await;
    assert!(out.status.success(), "{}", text(&out));
    let rec = ha::wait_record(&c, "planned reparent to r1", BOUND, |r| {
        r.primary.as_deref() == Some(r1.alias()) && r.term == Term::new(2)
    })
    .await
    .0;
    assert_eq!(rec.primary.as_deref(), Some(r1.alias()), "{}", text(&out));
    gw::wait_routes(&c, g, r1.alias(), &[p.alias()], BOUND).await;
    // Still quarantined (and still reported).
    wait_shard(&c, "r2 still quarantined after the reparent", |s| {
        has_problem(s, "quarantined", r2.alias())
    })
    .await;

    // ---- release: the repairs treat it as any other replica (it is repointed to the new
    // primary, the reparent having left it alone), and reads reach it again.
    let t_release = Instant::now();
    let out = ctl(
        &c,
        Some(TOKEN),
        &[
            "quarantine",
            "release",
            r2.alias(),
            "--reason",
            "disk checked",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("released from quarantine"),
        "{}",
        text(&out)
    );
    let out = ctl(&c, Some(TOKEN), &["quarantine", "list"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no quarantined tablets"),
        "{}",
        text(&out)
    );
    gw::wait_routes(&c, g, r1.alias(), &[p.alias(), r2.alias()], BOUND).await;
    println!(
        "{} routed again {:.1} s after `quarantine release`",
        r2.alias(),
        t_release.elapsed().as_secs_f64()
    );
    ha::wait_ok(&c, "r2 replicates from the new primary", BOUND, || {
        ha::replicates_from(r2, r1)
    })
    .await;
    // The repoint may take r2 out of `ro` for a moment (replication restarted): routed again
    // after it, then connections are kept open so that least_connections must reach r2.
    gw::wait_routes(&c, g, r1.alias(), &[p.alias(), r2.alias()], BOUND).await;
    let start = Instant::now();
    let mut open = Vec::new();
    loop {
        let (id, conn) = ro_conn(&c, g).await;
        open.push(conn);
        if id == r2.uid() {
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "no RO connection reached r2 after its release ({} tried)",
            open.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(open);
    wait_shard(&c, "no quarantined problem", |s| {
        !has_problem(s, "quarantined", r2.alias())
    })
    .await;
    let a = ha::wait_audit(&c, "quarantine_released", BOUND, |a| {
        a.iter().any(|e| {
            e.action == "quarantine_released"
                && e.tablet.as_deref() == Some(r2.alias())
                && e.detail.contains("disk checked")
                && e.detail.contains(reason)
        })
    })
    .await;
    println!("{}", ha::audit_text(&a));
}
