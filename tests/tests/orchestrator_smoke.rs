//! Smoke test of the orchestrator's emergency reparent against real processes: a 3-tablet
//! semi-sync shard, the orchestrator binary started as a child process, the primary's mysqld
//! SIGKILLed. Within 10 s the shard record must name a new primary at term 2; it must then take
//! writes, the remaining replica must replicate from it, and the audit log must hold the steps.
//!
//! Prints the measured times (fault -> new shard record, fault -> first acknowledged write).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use topo::Term;

use harness::{Cluster, ClusterOptions, Tablet};
use mysql_async::prelude::Queryable;
use topo::{AuditEntry, Durability};

const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// Bound on the new primary's first acknowledged write, from its shard record.
const WRITE_BOUND: Duration = Duration::from_secs(15);

/// The orchestrator as a child process; killed on drop.
struct Orchestrator {
    child: tokio::process::Child,
    log: std::path::PathBuf,
    port: u16,
}

impl Orchestrator {
    async fn start(cluster: &Cluster, dir: &Path) -> Orchestrator {
        let bin = harness::find_myha_bin("myha-orchestrator").expect("myha-orchestrator built");
        let config = dir.join("orchestrator.toml");
        let port = harness::free_port().expect("free port");
        std::fs::write(
            &config,
            format!(
                "[orchestrator]\nhttp_listen = \"127.0.0.1:{port}\"\n\n{}\n{}\n\
                 [log]\nlevel = \"info\"\n",
                cluster
                    .etcd_section_toml(harness::certs::ORCHESTRATOR_IDENTITY)
                    .expect("[etcd] section"),
                // The agents require a client certificate on gRPC.
                harness::certs::tls_section_toml(&cluster.certs().orchestrator_files()),
            ),
        )
        .expect("write orchestrator.toml");
        let log = dir.join("orchestrator.log");
        let out = std::fs::File::create(&log).expect("create orchestrator.log");
        let err = out.try_clone().expect("dup log");
        let child = tokio::process::Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env("MYHA_LOG", "info,myha_orchestrator=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("start myha-orchestrator");
        let o = Orchestrator { child, log, port };
        // Up once its engine runs and its analysis of the shard covers every tablet, with no
        // problem: the fault comes after a clean view, not after a fixed pause.
        let start = Instant::now();
        // reqwest is built without a default TLS provider (see pki::install_crypto_provider).
        pki::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        let mut last = String::new();
        loop {
            if o.log_text().contains("recovery engine started") {
                let shards = http
                    .get(format!("http://127.0.0.1:{}/api/v1/shards", o.port))
                    .send()
                    .await;
                let v = match shards {
                    Ok(r) => r.json::<serde_json::Value>().await.ok(),
                    Err(e) => {
                        last = e.to_string();
                        None
                    }
                };
                if let Some(v) = v {
                    let shard = &v["shards"][0];
                    if shard["problems"] == serde_json::json!([])
                        && shard["tablets"].as_array().is_some_and(|t| {
                            t.len() == cluster.tablets().len()
                                && t.iter().all(|t| t["fresh"] == true)
                        })
                    {
                        return o;
                    }
                    last = v.to_string();
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "orchestrator not up with a clean view of the shard: {last}\n{}",
                o.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn exec(t: &Tablet, sql: &str) -> Result<(), String> {
    let mut c = t.app_conn().await.map_err(|e| e.to_string())?;
    c.query_drop(sql).await.map_err(|e| format!("{sql}: {e}"))?;
    let _ = c.disconnect().await;
    Ok(())
}

async fn slave_status(t: &Tablet) -> Option<HashMap<String, Option<String>>> {
    let mut c = t.root_conn().await.ok()?;
    let st = harness::slave_status(&mut c).await.ok().flatten();
    let _ = c.disconnect().await;
    st
}

fn col(st: &HashMap<String, Option<String>>, name: &str) -> String {
    st.get(name).cloned().flatten().unwrap_or_default()
}

async fn count_rows(t: &Tablet) -> Option<i64> {
    let mut c = t.root_conn().await.ok()?;
    let n: Option<i64> = c.query_first("SELECT COUNT(*) FROM app.smoke").await.ok()?;
    let _ = c.disconnect().await;
    n
}

fn audit_text(entries: &[AuditEntry]) -> String {
    entries
        .iter()
        .rev()
        .map(|e| {
            format!(
                "  {} t{} {} {} {} [{} ms] {}",
                e.at_ms,
                e.term,
                e.action,
                e.tablet.as_deref().unwrap_or("-"),
                e.outcome,
                e.duration_ms.unwrap_or(0),
                e.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_is_replaced_by_an_emergency_reparent() {
    let cluster = Cluster::start(ClusterOptions {
        tablets: 3,
        durability: Durability::SemiSync,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let (ks, shard) = (cluster.keyspace().to_string(), cluster.shard().to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let orch = Orchestrator::start(&cluster, dir.path()).await;

    let old = cluster.tablet(0);
    exec(
        old,
        "CREATE TABLE app.smoke (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
    )
    .await
    .expect("create table on the primary");
    for i in 0..10 {
        exec(old, &format!("INSERT INTO app.smoke (v) VALUES ({i})"))
            .await
            .expect("write on the primary");
    }
    let before = cluster
        .topo()
        .get_shard(&ks, &shard)
        .await
        .expect("etcd")
        .expect("record")
        .0;
    assert_eq!(
        (before.primary.as_deref(), before.term),
        (Some(old.alias()), Term::new(1))
    );

    // The fault.
    let fault = Instant::now();
    old.mysqld().kill().expect("SIGKILL the primary's mysqld");

    // A new primary in the shard record, at term 2.
    let record = loop {
        let rec = cluster
            .topo()
            .get_shard(&ks, &shard)
            .await
            .ok()
            .flatten()
            .map(|(r, _)| r);
        if let Some(r) = rec.filter(|r| r.primary.as_deref() != Some(old.alias())) {
            break r;
        }
        assert!(
            fault.elapsed() < FAILOVER_BOUND,
            "no new primary within {FAILOVER_BOUND:?}\n--- audit ---\n{}\n--- orchestrator log ---\n{}",
            audit_text(&cluster.topo().list_audit(&ks, Some(&shard), 0).await.unwrap_or_default()),
            orch.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let to_record = fault.elapsed();
    assert_eq!(record.term, Term::new(2), "{record:?}");
    let new_alias = record.primary.clone().expect("a primary");
    let new = cluster
        .tablet_by_alias(&new_alias)
        .expect("a tablet of the cluster");
    let other = cluster
        .tablets()
        .iter()
        .find(|t| t.alias() != old.alias() && t.alias() != new_alias)
        .expect("the third tablet");

    // It takes writes (semi-sync: acknowledged by the repointed replica, so the first one may
    // wait for the repoint). An attempt that failed committed nothing and is retried; one
    // still waiting is waited for to the end of the bound, never abandoned and retried (it
    // may still commit, and the row count below must be exact).
    let write_deadline = Instant::now() + WRITE_BOUND;
    let write = loop {
        let left = write_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, exec(new, "INSERT INTO app.smoke (v) VALUES (100)")).await
        {
            Ok(Ok(())) => break fault.elapsed(),
            Ok(Err(_)) if Instant::now() < write_deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!(
                "new primary {new_alias} not writable within {WRITE_BOUND:?} of its record: \
                 {other:?}\n{}",
                orch.log_text()
            ),
        }
    };
    println!(
        "FAILOVER: fault -> new shard record (detection + promotion): {} ms; fault -> first acknowledged write on {new_alias}: {} ms",
        to_record.as_millis(),
        write.as_millis()
    );

    // The remaining replica replicates from the new primary and has the write.
    let start = Instant::now();
    loop {
        let st = slave_status(other).await;
        let ok = st.as_ref().is_some_and(|s| {
            col(s, "Master_Port") == new.mysqld().port().to_string()
                && col(s, "Slave_IO_Running") == "Yes"
                && col(s, "Slave_SQL_Running") == "Yes"
        });
        if ok && count_rows(other).await == Some(11) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} does not replicate from {new_alias}: {st:?}",
            other.alias()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count_rows(new).await,
        Some(11),
        "no acknowledged write lost"
    );

    // The audit log holds every step and the summary.
    let start = Instant::now();
    let entries = loop {
        let entries = cluster
            .topo()
            .list_audit(&ks, Some(&shard), 0)
            .await
            .expect("audit log");
        let has = |action: &str, tablet: Option<&str>| {
            entries.iter().any(|e| {
                e.action == action
                    && e.outcome == "ok"
                    && tablet.is_none_or(|t| e.tablet.as_deref() == Some(t))
            })
        };
        if has("emergency_reparent", None)
            && has("stop_io_thread", Some(new_alias.as_str()))
            && has("stop_io_thread", Some(other.alias()))
            && has("promote", Some(new_alias.as_str()))
            && has("write_shard_record", Some(new_alias.as_str()))
            && has("repoint", Some(other.alias()))
        {
            break entries;
        }
        // Steps are audited in the background, after they took effect.
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "audit log incomplete:\n{}",
            audit_text(&entries)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let summary = entries
        .iter()
        .find(|e| e.action == "emergency_reparent" && e.outcome == "ok")
        .expect("summary");
    assert_eq!(summary.term, Term::new(2));
    assert!(summary.detail.contains(&new_alias), "{}", summary.detail);
    assert!(
        entries
            .iter()
            .filter(|e| e.action != "emergency_reparent")
            .all(|e| e.duration_ms.is_some() || e.action == "errant_check"),
        "every step has its duration:\n{}",
        audit_text(&entries)
    );
    let log = orch.log_text();
    let detection = log
        .lines()
        .find(|l| l.contains("recovery decided"))
        .unwrap_or("(no decision line)");
    println!("AUDIT:\n{}", audit_text(&entries));
    println!("DECISION: {detection}");
    for l in log
        .lines()
        .filter(|l| l.contains("reparent phase") || l.contains("FullStatus"))
    {
        println!("PHASE: {l}");
    }
    assert_eq!(
        log.matches("recovery decided").count(),
        1,
        "one reparent decided:\n{log}"
    );
}
