//! Gateway throughput benchmark (not a test): `cargo bench -p myha-tests --bench gateway --
//! [--time 15] [--threads 1,4] [--tests oltp_point_select,oltp_read_only]`; needs `sysbench` and
//! `haproxy` (installed by `scripts/dev setup`).
//!
//! A 2-tablet semi_sync shard (primary + one replica, agents, no orchestrator) and two
//! myha-gateways whose RO ports can only route to that replica: one with the defaults (proxy
//! threads placed by the scheduler) and one with `proxy_cpus = "auto"` (each proxy thread pinned
//! to a CPU, like HAProxy's `cpu-map`). sysbench runs each test at each thread count against the
//! replica four ways in the same run, interleaved: directly, through each gateway's RO port, and
//! through HAProxy 2.x in `mode tcp` (distribution defaults) in front of the same replica.
//! It prints QPS, average and p95 latency and the ratio to direct, with the goals of targets.md:
//! >= 0.80 x direct at 1 thread, and above HAProxy at every thread count.

use std::collections::BTreeMap;
use std::time::Duration;

use harness::{free_port, Cluster, ClusterOptions, GatewayProc};
use myha_gateway::config::{CpuKeyword, ProxyCpus};
use myha_tests::bench::{self, Haproxy, SysbenchResult, SysbenchTarget};
use myha_tests::gw;

const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Direct,
    Gateway,
    GatewayPinned,
    Haproxy,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Gateway => "myha-gateway (RO port)",
            Via::GatewayPinned => "myha-gateway, proxy_cpus=auto",
            Via::Haproxy => "HAProxy mode tcp",
        }
    }
}

fn run(target: &SysbenchTarget, test: &str, threads: u32, time: u32) -> SysbenchResult {
    let extra = [
        format!("--threads={threads}"),
        format!("--time={time}"),
        "--report-interval=0".to_string(),
        "--percentile=95".to_string(),
        // Only selects: the replica is read-only.
        "--skip-trx=on".to_string(),
    ];
    let out = bench::sysbench(target, test, "run", TABLES, TABLE_SIZE, &extra)
        .unwrap_or_else(|e| panic!("{e}"));
    let r = bench::parse_sysbench(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.errors, 0, "sysbench {test} via {target:?}: errors\n{out}");
    r
}

fn main() {
    let time: u32 = bench::arg_parsed("--time", 15);
    let threads: Vec<u32> = bench::arg("--threads")
        .unwrap_or_else(|| "1,4".into())
        .split(',')
        .map(|t| t.trim().parse().expect("--threads takes numbers, e.g. 1,4"))
        .collect();
    let tests: Vec<String> = bench::arg("--tests")
        .unwrap_or_else(|| "oltp_point_select,oltp_read_only".into())
        .split(',')
        .map(|t| t.trim().to_string())
        .collect();
    let rt = bench::runtime();
    let c = rt.block_on(async {
        Cluster::start(ClusterOptions {
            tablets: 2,
            agent_log_level: "warn".into(),
            start_gateway: true,
            ..ClusterOptions::default()
        })
        .await
        .expect("cluster starts")
    });
    let creds = c.credentials().clone();
    let at = |port: u16| SysbenchTarget {
        host: "127.0.0.1".into(),
        port,
        user: creds.app_user.clone(),
        password: creds.app_password.clone(),
        db: creds.database.clone(),
    };
    let primary = c.initial_primary();
    let replica = c
        .tablets()
        .iter()
        .find(|t| t.alias() != primary.alias())
        .expect("a replica");
    println!(
        "preparing {TABLES} tables x {TABLE_SIZE} rows on {} (primary)",
        primary.alias()
    );
    bench::sysbench(
        &at(primary.mysqld().port()),
        "oltp_point_select",
        "prepare",
        TABLES,
        TABLE_SIZE,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        c.wait_replicated(Duration::from_secs(120))
            .await
            .expect("replica caught up");
    });
    let gw = c.gateway().expect("cluster started with a gateway");
    let gw_ro = gw.ro_port(c.keyspace(), c.shard()).expect("RO listener");
    let dir = tempfile::tempdir().expect("tempdir");
    let haproxy = Haproxy::start(
        dir.path(),
        free_port().expect("port"),
        &replica.mysqld().addr(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The same gateway config, on other ports, with its proxy threads pinned.
    let mut pinned_cfg = gw.config().clone();
    pinned_cfg.gateway.admin_listen = ([127, 0, 0, 1], free_port().expect("port")).into();
    for l in &mut pinned_cfg.listeners {
        l.rw = Some(([127, 0, 0, 1], free_port().expect("port")).into());
        l.ro = Some(([127, 0, 0, 1], free_port().expect("port")).into());
    }
    pinned_cfg.gateway.proxy_cpus = ProxyCpus::Keyword(CpuKeyword::Auto);
    let pinned = rt.block_on(async {
        let g = GatewayProc::launch(pinned_cfg, &dir.path().join("gateway-pinned"), false)
            .await
            .expect("pinned gateway starts");
        // Only the replica can take reads: the same routing as the default gateway's.
        gw::wait_routes(
            &c,
            &g,
            primary.alias(),
            &[replica.alias()],
            Duration::from_secs(30),
        )
        .await;
        g
    });
    let pinned_ro = pinned
        .ro_port(c.keyspace(), c.shard())
        .expect("RO listener");
    let targets = [
        (Via::Direct, at(replica.mysqld().port())),
        (Via::Gateway, at(gw_ro)),
        (Via::GatewayPinned, at(pinned_ro)),
        (Via::Haproxy, at(haproxy.port)),
    ];
    // Every path works and the gateway's RO port reaches the replica, before measuring.
    for (via, t) in &targets {
        let r = run(t, "oltp_point_select", 1, 2);
        println!("warm-up {:<24} {:>9.0} QPS", via.name(), r.qps);
    }

    let mut results: BTreeMap<(String, u32, Via), SysbenchResult> = BTreeMap::new();
    for test in &tests {
        for &n in &threads {
            for (via, t) in &targets {
                let r = run(t, test, n, time);
                println!(
                    "{test} {n} thread(s) {:<24} {:>9.0} QPS  avg {:.3} ms  p95 {:.3} ms",
                    via.name(),
                    r.qps,
                    r.avg_ms,
                    r.p95_ms
                );
                results.insert((test.clone(), n, *via), r);
            }
        }
    }

    println!(
        "\n### sysbench against one MariaDB 10.11 replica, {TABLES} tables x {TABLE_SIZE} rows, {time} s per run, loopback, 2 cores shared by client, proxy and server\n"
    );
    println!("| test | threads | path | QPS | avg ms | p95 ms | x direct | goal |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for test in &tests {
        for &n in &threads {
            let direct = results[&(test.clone(), n, Via::Direct)];
            let hap = results[&(test.clone(), n, Via::Haproxy)];
            for via in [Via::Direct, Via::Gateway, Via::GatewayPinned, Via::Haproxy] {
                let r = results[&(test.clone(), n, via)];
                let goal = match via {
                    Via::Gateway | Via::GatewayPinned if n == 1 => ">= 0.80 x direct, > HAProxy",
                    Via::Gateway | Via::GatewayPinned => "> HAProxy",
                    _ => "",
                };
                println!(
                    "| {test} | {n} | {} | {:.0} | {:.3} | {:.3} | {:.2} | {goal} |",
                    via.name(),
                    r.qps,
                    r.avg_ms,
                    r.p95_ms,
                    r.qps / direct.qps
                );
            }
            for via in [Via::Gateway, Via::GatewayPinned] {
                let gw = results[&(test.clone(), n, via)];
                let ratio = gw.qps / direct.qps;
                let above = gw.qps > hap.qps;
                let met = above && (n != 1 || ratio >= 0.80);
                verdicts.push(format!(
                    "{test}, {n} thread(s), {}: {:.2} x direct, {:.2} x HAProxy: {}",
                    via.name(),
                    ratio,
                    gw.qps / hap.qps,
                    if met { "goal met" } else { "GOAL MISSED" }
                ));
            }
        }
    }
    println!(
        "\nanchors (targets.md, same machine type): direct 10.9k QPS at 1 thread, 57-63k at 4; HAProxy 7.5k (0.69 x) and 26.3k (0.44 x)."
    );
    for v in verdicts {
        println!("{v}");
    }
    drop(haproxy);
    drop(pinned);
}
