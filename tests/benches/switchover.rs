//! Planned reparent (switchover) benchmark (not a test): `cargo bench -p myha-tests --bench
//! switchover -- [--runs 20] [--via direct,gateway] [--hosts netns [--rtt 0ms,0.5ms,2ms]]`.
//!
//! A 3-tablet semi_sync shard (etcd + MariaDB + agents + one orchestrator + one gateway). An
//! acknowledged-write recorder inserts a row every 2 ms, either directly on the primary the shard
//! record names (`direct`) or through the gateway's RW port (`gateway`), while N planned
//! reparents run one after the other through the orchestrator's API (candidate chosen by the
//! orchestrator). For each switchover it measures the write unavailability the client saw (the
//! longest gap between two consecutive acknowledged writes from the request to the first ack
//! after it completed), the reparent's own duration (`total_ms`) and each step's (`duration_ms`
//! of its step events), and prints min / p50 / p99 / max with the goals of targets.md, then
//! checks that no acknowledged write was lost.

use std::time::{Duration, Instant};

use harness::{Cluster, ClusterOptions, Writer, WriterOptions};
use myha_tests::bench::{self, Links, Via};
use myha_tests::ha::*;
use serde_json::{json, Value};

#[derive(Debug, Default)]
struct Run {
    unavailability: Option<Duration>,
    total: Option<Duration>,
    /// Each step's duration (the orchestrator's `duration_ms`), in order.
    steps: Vec<(String, Duration)>,
    error: Option<String>,
}

/// One planned reparent through the API, read to its `done` event: that event and the steps'
/// durations (by step name, the slowest tablet's when a step ran on several).
async fn switchover(c: &Cluster) -> Result<(Value, Vec<(String, Duration)>), String> {
    let events = reparent_events(c, &json!({"mode": "planned"}), Duration::from_secs(60)).await?;
    let mut steps: Vec<(String, Duration)> = Vec::new();
    for (_, v) in events.iter().filter(|(_, v)| v["event"] == "step") {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let took = Duration::from_millis(v["duration_ms"].as_u64().unwrap_or(0));
        match steps.iter_mut().find(|(n, _)| *n == name) {
            Some((_, d)) => *d = (*d).max(took),
            None => steps.push((name, took)),
        }
    }
    match events.last() {
        Some((_, v)) if v["event"] == "done" && v["ok"] == true => Ok((v.clone(), steps)),
        Some((_, v)) if v["event"] == "done" => Err(format!("refused or failed: {v}")),
        _ => Err(format!("stream ended without a done event: {events:?}")),
    }
}

async fn one_run(c: &Cluster, w: &Writer) -> Run {
    let mut run = Run::default();
    if let Err(e) = w.wait_more_acks(20, BOUND).await {
        run.error = Some(format!("no acks before the switchover: {e}"));
        return run;
    }
    let requested = Instant::now();
    match switchover(c).await {
        Ok((done, steps)) => {
            run.total = done["total_ms"].as_u64().map(Duration::from_millis);
            run.steps = steps;
        }
        Err(e) => {
            run.error = Some(e);
            return run;
        }
    }
    let finished = Instant::now();
    if let Err(e) = w.wait_ack_after(finished, BOUND).await {
        run.error = Some(format!("no ack after the switchover: {e}"));
        return run;
    }
    let mut at: Vec<Instant> = w.acks().iter().map(|a| a.acked_at).collect();
    at.sort();
    // From the last ack before the request to the first ack after the reparent completed.
    let first = at.iter().rposition(|t| *t < requested).unwrap_or(0);
    let last = at
        .iter()
        .position(|t| *t > finished)
        .unwrap_or(at.len().saturating_sub(1));
    run.unavailability = at[first..=last]
        .windows(2)
        .map(|p| p[1].duration_since(p[0]))
        .max();
    run
}

fn main() {
    let runs: usize = bench::arg_parsed("--runs", 20);
    let vias = Via::from_args(&[Via::Direct, Via::Gateway]);
    let links = Links::from_args();
    let securities = bench::security_from_args();
    let rt = bench::runtime();
    let mut out = String::new();
    rt.block_on(async {
        let combos: Vec<(Links, Via, harness::Security)> = links
            .iter()
            .flat_map(|l| vias.iter().map(move |v| (*l, *v)))
            .flat_map(|(l, v)| securities.iter().map(move |s| (l, v, *s)))
            .collect();
        for (links, via, security) in combos {
            let c = Cluster::start(ClusterOptions {
                security,
                hosts: links.hosts(),
                tablets: 3,
                start_orchestrator: true,
                start_gateway: true,
                orchestrator_log_level: "warn".into(),
                agent_log_level: "warn".into(),
                gateway_log_level: "warn".into(),
                ..ClusterOptions::default()
            })
            .await
            .expect("cluster starts");
            links.shape(&c);
            wait_quiet(orch(&c), &c, BOUND).await;
            let gateway_rw = c
                .gateway()
                .and_then(|g| g.rw_addr())
                .expect("gateway RW port");
            let w = Writer::start(
                &c,
                WriterOptions {
                    pause: Duration::from_millis(2),
                    via: (via == Via::Gateway).then_some(gateway_rw),
                    ..WriterOptions::default()
                },
            )
            .await
            .expect("writer");
            let mut results = Vec::new();
            for i in 0..runs {
                let r = one_run(&c, &w).await;
                println!(
                    "{} switchover {}/{runs}: unavailability {} ms, reparent {} ms{}",
                    via.short(),
                    i + 1,
                    r.unavailability.map_or("-".into(), |d| d.as_millis().to_string()),
                    r.total.map_or("-".into(), |d| d.as_millis().to_string()),
                    r.error
                        .as_ref()
                        .map(|e| format!(" ERROR: {e}"))
                        .unwrap_or_default()
                );
                results.push(r);
                wait_shard_healthy(&c, &[], BOUND).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let report = w.verify(&c).await;
            let errors: Vec<String> = results
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.error.as_ref().map(|e| format!("run {}: {e}", i + 1)))
                .collect();
            out.push_str(&format!(
                "\n### planned reparent, {} - {runs} switchovers, 3-tablet semi_sync shard, writes every 2 ms, {}, {}\n\n",
                via.name(),
                links.name(),
                bench::security_name(security)
            ));
            out.push_str("| measure | min | p50 | p99 | max | myha goal | anchor |\n|---|---|---|---|---|---|---|\n");
            out.push_str(&format!(
                "| write unavailability (longest gap between acks) | {} | p50 <= 200 ms, p99 <= 500 ms | vtgate buffers up to 10 s per request; buffering off by default |\n",
                bench::stats_with(
                    &results.iter().map(|r| r.unavailability).collect::<Vec<_>>(),
                    bench::millis
                )
            ));
            out.push_str(&format!(
                "| reparent (request -> done, orchestrator's total_ms) | {} | | |\n",
                bench::stats_with(
                    &results.iter().map(|r| r.total).collect::<Vec<_>>(),
                    bench::millis
                )
            ));
            // Where the reparent's time goes: each step's duration across the runs.
            let mut names: Vec<&str> = Vec::new();
            for r in &results {
                for (n, _) in &r.steps {
                    if !names.contains(&n.as_str()) {
                        names.push(n);
                    }
                }
            }
            for name in names {
                let took: Vec<Option<Duration>> = results
                    .iter()
                    .map(|r| r.steps.iter().find(|(n, _)| n == name).map(|(_, d)| *d))
                    .collect();
                out.push_str(&format!(
                    "| step `{name}` (slowest tablet) | {} | | |\n",
                    bench::stats_with(&took, bench::millis)
                ));
            }
            out.push_str(&format!(
                "| acknowledged writes lost / acks from a deposed primary | {} / {} (of {} acked) | | | | 0 | |\n",
                report.lost.len(),
                report.deposed_acks.len(),
                report.acked
            ));
            if !errors.is_empty() {
                out.push_str(&format!("\nerrors:\n{}\n", errors.join("\n")));
            }
        }
    });
    println!("{out}");
}
