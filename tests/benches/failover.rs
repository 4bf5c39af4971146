//! Unplanned failover benchmark (not a test): `cargo bench -p myha-tests --bench failover --
//! --runs 20 [--faults kill,stop,cut] [--via gateway,direct] [--hosts netns [--rtt 0ms,0.5ms,2ms]]
//! [--security tls,plain]`.
//!
//! For each fault (SIGKILL of the primary's mysqld; SIGSTOP of it; with `--hosts netns`, the
//! primary's host cut from every other host, packets silently dropped) it runs N failovers on a
//! 3-tablet semi_sync shard (etcd + MariaDB + agents + one orchestrator + one gateway, harness defaults, the
//! orchestrator's defaults except a flap limit high enough for N failovers in a row) under the
//! acknowledged-write recorder, and prints min / p50 / p99 / max of:
//! - detection: fault -> the orchestrator decided (it took the shard lock for the emergency
//!   reparent: the lock's `acquired_ms`; fallback: the reparent's audit entry start);
//! - reparent: decision -> the new shard record (seen through an etcd watch);
//! - fault -> first acknowledged write (the recorder writes through the gateway's RW port, as
//!   targets.md measures it, or to the primary the shard record names: `--via`);
//! - acknowledged writes lost, and acks from a deposed primary after its successor's term began;
//!
//! with the anchors of `targets.md` in the same table. Between runs the shard is restored: the old
//! primary's mysqld is restarted (SIGKILL) or resumed (SIGSTOP) and the orchestrator rejoins it;
//! if it does not come back as a healthy replica within a bound (e.g. quarantined because it
//! held a transaction nobody else received), the run starts on a fresh cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Cluster, ClusterOptions, OrchestratorConfig, Writer, WriterOptions};
use myha_tests::bench::{self, Links, Via};
use myha_tests::ha::*;
use topo::LockInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Cut,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "primary mysqld killed (SIGKILL)",
            Fault::Stop => "primary mysqld frozen (SIGSTOP)",
            Fault::Cut => "primary's host cut from every other host (packets dropped)",
        }
    }
    fn goal(self) -> &'static str {
        match self {
            Fault::Kill => "p50 <= 0.5 s, p99 <= 1.0 s",
            Fault::Stop | Fault::Cut => "p99 <= 2.5 s",
        }
    }
    fn anchors(self) -> &'static str {
        match self {
            Fault::Kill => {
                "VTOrc 4.3 / 6.8 / 7.0 s (p50/p99/max, defaults); orchestrator@GitHub 10-13 s; \
                 MaxScale ~10 s; InnoDB Cluster ~5-10 s; Patroni ~30-40 s (quoted)"
            }
            Fault::Stop | Fault::Cut => {
                "VTOrc ~10-17 s; orchestrator ~4-10 s (slave_net_timeout=4), ~60 s MySQL defaults (quoted)"
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    detection: Option<Duration>,
    reparent: Option<Duration>,
    first_ack: Option<Duration>,
    lost: usize,
    deposed: usize,
    late: usize,
    fresh_cluster: bool,
    error: Option<String>,
    slow_steps: String,
}

struct Args {
    runs: usize,
    faults: Vec<Fault>,
    vias: Vec<Via>,
    links: Vec<Links>,
    securities: Vec<harness::Security>,
}

fn args() -> Args {
    let mut runs = 5;
    let mut faults = vec![Fault::Kill, Fault::Stop];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--runs takes a number")
            }
            "--faults" => {
                faults = it
                    .next()
                    .expect("--faults takes kill,stop")
                    .split(',')
                    .map(|f| match f.trim() {
                        "kill" => Fault::Kill,
                        "stop" => Fault::Stop,
                        "cut" => Fault::Cut,
                        other => panic!("unknown fault {other:?} (kill, stop, cut)"),
                    })
                    .collect()
            }
            // `cargo bench` passes --bench; anything else is ignored.
            _ => {}
        }
    }
    let links = Links::from_args();
    if faults.contains(&Fault::Cut) && links.contains(&Links::Loopback) {
        panic!("--faults cut needs --hosts netns (a host to cut)");
    }
    Args {
        runs,
        faults,
        securities: bench::security_from_args(),
        vias: Via::from_args(&[Via::Gateway, Via::Direct]),
        links,
    }
}

fn options(links: Links, security: harness::Security) -> ClusterOptions {
    ClusterOptions {
        security,
        hosts: links.hosts(),
        tablets: 3,
        start_orchestrator: true,
        start_gateway: true,
        gateway_log_level: "warn".into(),
        orchestrator_log_level: "warn".into(),
        agent_log_level: "warn".into(),
        orchestrator_config: Some(Arc::new(|cfg: &mut OrchestratorConfig| {
            // N failovers in a row are the point here, not flapping protection.
            cfg.recovery.flap_limit = 1_000_000;
        })),
        ..ClusterOptions::default()
    }
}

async fn fresh_cluster(links: Links, security: harness::Security) -> Cluster {
    let c = Cluster::start(options(links, security))
        .await
        .expect("cluster starts");
    links.shape(&c);
    wait_quiet(orch(&c), &c, BOUND).await;
    c
}

/// The shard is back to 3 healthy tablets with no problem reported.
async fn restored(c: &Cluster, bound: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if shard_healthy(c, &[]).await.is_ok() {
            let s = shard_json(orch(c), c).await;
            if problems(&s).is_empty() && c.tablets().iter().all(|t| t.mysqld().is_running()) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn one_run(c: &Cluster, fault: Fault, via: Via, links: Links) -> Run {
    let mut run = Run::default();
    let opts = WriterOptions {
        via: match via {
            Via::Direct => None,
            Via::Gateway => c.gateway().and_then(|g| g.rw_addr()),
        },
        ..WriterOptions::default()
    };
    let w = match Writer::start(c, opts).await {
        Ok(w) => w,
        Err(e) => {
            run.error = Some(format!("writer: {e}"));
            return run;
        }
    };
    if let Err(e) = w.wait_more_acks(50, BOUND).await {
        run.error = Some(format!("no acks before the fault: {e}"));
        return run;
    }
    let before = record(c).await;
    let old = before.primary.clone().unwrap_or_default();
    let Some(victim) = c.tablet_by_alias(&old) else {
        run.error = Some(format!("primary {old} unknown"));
        return run;
    };
    // Decision: the first emergency-reparent lock taken after the fault.
    let locks = c
        .topo()
        .watch_prefix(&c.topo().keys().lock_prefix(c.keyspace(), c.shard()));
    let mut lock_rx = locks.subscribe();
    locks.wait_synced(Duration::from_secs(2)).await;
    let mut rec_rx = c.topo().watch_shard(c.keyspace(), c.shard());

    // The fault is marked once in effect (see `ha::expect_failover`); a kill or a freeze is
    // instant, the cut's rules take a moment to install, during which the old primary may
    // still acknowledge: marked after them.
    let mut fault_mark = w.mark_fault();
    let r = match fault {
        Fault::Kill => victim.mysqld().kill(),
        Fault::Stop => victim.mysqld().freeze(),
        Fault::Cut => match c.net() {
            Ok(net) => net
                .isolate(&old, harness::netns::Direction::Both)
                .map_err(|e| harness::HarnessError::Invalid(e.to_string())),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = r {
        run.error = Some(format!("fault: {e}"));
        return run;
    }
    if fault == Fault::Cut {
        fault_mark = w.mark_fault();
    }
    let decision = tokio::time::timeout(BOUND, async {
        loop {
            let hit = lock_rx.borrow_and_update().values().find_map(|v| {
                serde_json::from_slice::<LockInfo>(v)
                    .ok()
                    .filter(|i| i.purpose.starts_with("emergency reparent"))
                    .filter(|i| i.acquired_ms + 5 >= fault_mark.at_ms)
            });
            if let Some(i) = hit {
                return Some(i.acquired_ms);
            }
            if lock_rx.changed().await.is_err() {
                return None;
            }
        }
    });
    let new_record = tokio::time::timeout(BOUND, async {
        loop {
            let seen = rec_rx.borrow_and_update().clone();
            if let Some(r) = seen.filter(|r| {
                r.term > before.term && r.primary.is_some() && r.primary != before.primary
            }) {
                return Some((r, topo::now_ms()));
            }
            if rec_rx.changed().await.is_err() {
                return None;
            }
        }
    });
    let (decision, new_record) = tokio::join!(decision, new_record);
    let decision_ms = decision.ok().flatten();
    let record_seen = new_record.ok().flatten();
    match w.wait_ack_after(fault_mark.at, BOUND).await {
        Ok((_, d)) => run.first_ack = Some(d),
        Err(e) => run.error = Some(format!("no ack after the fault: {e}")),
    }
    let decision_ms = match decision_ms {
        Some(ms) => Some(ms),
        // Fallback: the start of the reparent's summary entry.
        None => audit(c)
            .await
            .iter()
            .filter(|e| e.action == "emergency_reparent" && e.at_ms >= fault_mark.at_ms)
            .map(|e| e.at_ms.saturating_sub(e.duration_ms.unwrap_or(0)))
            .min(),
    };
    run.detection = decision_ms.map(|d| Duration::from_millis(d.saturating_sub(fault_mark.at_ms)));
    if let (Some(d), Some((_, seen_ms))) = (decision_ms, &record_seen) {
        run.reparent = Some(Duration::from_millis(seen_ms.saturating_sub(d)));
    }
    if record_seen.is_none() && run.error.is_none() {
        run.error = Some("no new shard record".into());
    }
    // Where the reparent's time went: its slow steps (>= 100 ms) from the audit log.
    let slow: Vec<String> = audit(c)
        .await
        .iter()
        .filter(|e| e.at_ms >= fault_mark.at_ms && e.duration_ms.unwrap_or(0) >= 100)
        .filter(|e| e.action != "emergency_reparent")
        .map(|e| {
            format!(
                "{} on {:?} {} ms ({})",
                e.action,
                e.tablet,
                e.duration_ms.unwrap_or(0),
                e.detail.chars().take(200).collect::<String>()
            )
        })
        .collect();
    if !slow.is_empty() {
        run.slow_steps = slow.join(", ");
    }
    // Restore the victim (resume it first so that the check can reach a primary).
    let _ = match fault {
        Fault::Kill => victim.mysqld().start().await,
        Fault::Stop => victim.mysqld().thaw(),
        Fault::Cut => {
            // Healing removes the links' delays with the cut: shape them again.
            let healed = c.net().and_then(|n| n.heal_all());
            links.shape(c);
            healed
        }
    };
    match w.check(c).await {
        Ok(r) => {
            run.lost = r.lost.len();
            run.deposed = r.deposed_acks.len();
            run.late = r.late_acks.len();
            if !r.is_safe() {
                eprintln!("UNSAFE RUN:\n{r}");
            }
        }
        Err(e) => run.error = Some(format!("writer check: {e}")),
    }
    run
}

fn stats(v: &[Option<Duration>]) -> String {
    bench::stats_with(v, bench::secs)
}

fn table(
    fault: Fault,
    via: Via,
    links: Links,
    security: harness::Security,
    runs: &[Run],
) -> String {
    let counts = |f: fn(&Run) -> usize| {
        let mut v: Vec<usize> = runs.iter().map(f).collect();
        v.sort();
        let total: usize = v.iter().sum();
        format!(
            "{} | {} | {} | {} (total {total})",
            v.first().unwrap_or(&0),
            v.get(v.len() / 2).unwrap_or(&0),
            v.last().unwrap_or(&0),
            v.last().unwrap_or(&0)
        )
    };
    let mut out = String::new();
    out.push_str(&format!(
        "\n### {}, {} - {} runs, 3-tablet semi_sync shard, {}, {}\n\n",
        fault.name(),
        via.name(),
        runs.len(),
        links.name(),
        bench::security_name(security)
    ));
    out.push_str("| measure | min | p50 | p99 | max | myha goal | anchors |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| detection (fault -> orchestrator decided) | {} | | |\n",
        stats(&runs.iter().map(|r| r.detection).collect::<Vec<_>>())
    ));
    out.push_str(&format!(
        "| reparent (decision -> new shard record) | {} | | ~50 ms of promotion SQL on loopback (platform notes) |\n",
        stats(&runs.iter().map(|r| r.reparent).collect::<Vec<_>>())
    ));
    out.push_str(&format!(
        "| fault -> first acknowledged write | {} | {} | {} |\n",
        stats(&runs.iter().map(|r| r.first_ack).collect::<Vec<_>>()),
        fault.goal(),
        fault.anchors()
    ));
    out.push_str(&format!(
        "| acknowledged writes lost | {} | 0 | Redis Sentinel/Jepsen: 56 % of acked writes; VTOrc #21092 |\n",
        counts(|r| r.lost)
    ));
    out.push_str(&format!(
        "| acks from a deposed primary after the new term, write not on the new primary (split brain) | {} | 0 | orchestrator #854/#482; GitHub 2018-10-21 |\n",
        counts(|r| r.deposed)
    ));
    out.push_str(&format!(
        "| late acks from a deposed primary, write already on the new primary (frozen after the replica's ack) | {} | | |\n",
        counts(|r| r.late)
    ));
    let fresh = runs.iter().filter(|r| r.fresh_cluster).count();
    let errors: Vec<String> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.error.as_ref().map(|e| format!("run {}: {e}", i + 1)))
        .collect();
    out.push_str(&format!(
        "\n{fresh} of {} runs needed a fresh cluster (the old primary did not rejoin in time).\n",
        runs.len()
    ));
    if !errors.is_empty() {
        out.push_str(&format!("errors:\n{}\n", errors.join("\n")));
    }
    out
}

fn main() {
    let args = args();
    let rt = bench::runtime();
    let mut tables = Vec::new();
    rt.block_on(async {
        let mut combos = Vec::new();
        for &l in &args.links {
            for &v in &args.vias {
                for &f in &args.faults {
                    for &s in &args.securities {
                        combos.push((l, v, f, s));
                    }
                }
            }
        }
        for (links, via, fault, security) in combos {
            let mut runs = Vec::new();
            let mut cluster = Some(fresh_cluster(links, security).await);
            let mut fresh = true;
            for i in 0..args.runs {
                let c = match cluster.take() {
                    Some(c) => c,
                    None => {
                        fresh = true;
                        fresh_cluster(links, security).await
                    }
                };
                let mut run = one_run(&c, fault, via, links).await;
                run.fresh_cluster = fresh && i > 0;
                fresh = false;
                let f = |d: Option<Duration>| {
                    d.map(|d| format!("{:.3}", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into())
                };
                println!(
                    "{} {} run {}/{}: detection {} s, reparent {} s, first ack {} s, lost {}, deposed acks {}, late acks {}{}",
                    via.short(),
                    match fault {
                        Fault::Kill => "kill",
                        Fault::Stop => "stop",
                        Fault::Cut => "cut",
                    },
                    i + 1,
                    args.runs,
                    f(run.detection),
                    f(run.reparent),
                    f(run.first_ack),
                    run.lost,
                    run.deposed,
                    run.late,
                    run.error
                        .as_ref()
                        .map(|e| format!(" ERROR: {e}"))
                        .unwrap_or_default()
                );
                if !run.slow_steps.is_empty() {
                    println!("  slow steps: {}", run.slow_steps);
                }
                runs.push(run);
                if i + 1 < args.runs {
                    if restored(&c, Duration::from_secs(20)).await {
                        cluster = Some(c);
                    } else {
                        let s = shard_json(orch(&c), &c).await;
                        println!(
                            "  (old primary did not rejoin in time: next run on a fresh cluster; problems: {:?})",
                            problems(&s)
                        );
                        drop(c);
                    }
                }
            }
            let t = table(fault, via, links, security, &runs);
            println!("{t}");
            tables.push(t);
        }
    });
    println!(
        "\n## Unplanned failover (myha failover bench)\n{}",
        tables.join("\n")
    );
}
