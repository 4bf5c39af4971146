//! `myhactl status`: the topology from etcd joined with each agent's fresh health.

use std::time::Duration;

use anyhow::Context;
use myha_proto::agent::{self as pb, agent_client::AgentClient};
use serde::Serialize;
use topo::{ShardRecord, TabletRecord, Topo};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// etcd endpoint(s), comma-separated; default: $MYHA_ETCD, else the sandbox's.
    #[arg(long, env = "MYHA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster prefix in etcd.
    #[arg(long, default_value = "/myha")]
    pub prefix: String,
    /// Sandbox directory to find etcd in when --etcd is not given.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub shards: Vec<ShardReport>,
}

#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub keyspace: String,
    pub shard: String,
    pub primary: Option<String>,
    pub term: u64,
    pub tablets: Vec<TabletReport>,
}

#[derive(Debug, Serialize, Default)]
pub struct SemiSyncReport {
    pub primary: bool,
    pub replica: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct TabletReport {
    pub alias: String,
    pub role: String,
    pub mysql: String,
    pub healthy: bool,
    pub read_only: Option<bool>,
    pub replicating: Option<bool>,
    pub source: Option<String>,
    pub lag_ms: Option<u64>,
    pub gtid_position: Option<String>,
    pub semi_sync: SemiSyncReport,
    /// Why the tablet is not healthy, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Where etcd is: the flag or env, else the sandbox state.
pub fn etcd_endpoints(
    etcd: &[String],
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Vec<String>> {
    if !etcd.is_empty() {
        return Ok(etcd.to_vec());
    }
    let dir = dir
        .map(|d| d.to_path_buf())
        .unwrap_or_else(crate::sandbox::default_dir);
    let state = crate::sandbox::read_state(&dir).with_context(|| {
        format!(
            "no --etcd or MYHA_ETCD given and no sandbox in {}",
            dir.display()
        )
    })?;
    Ok(vec![state.etcd])
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let endpoints = etcd_endpoints(&args.etcd, args.dir.as_deref())?;
    let topo = Topo::connect(&endpoints, &args.prefix, Duration::from_secs(2))
        .await
        .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
    let report = collect(&topo).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

pub async fn collect(topo: &Topo) -> anyhow::Result<Report> {
    let mut shards = Vec::new();
    for ks in topo.list_keyspaces().await? {
        for shard in topo.list_shards(&ks.name).await? {
            let tablets = topo
                .list_tablets(Some(&shard.keyspace), Some(&shard.shard))
                .await?;
            shards.push(shard_report(&shard, tablets).await);
        }
    }
    Ok(Report { shards })
}

async fn shard_report(shard: &ShardRecord, tablets: Vec<TabletRecord>) -> ShardReport {
    let mut reports: Vec<TabletReport> = futures_join(
        tablets
            .iter()
            .map(|t| tablet_report(shard, t))
            .collect::<Vec<_>>(),
    )
    .await;
    // The named primary with no registration: its agent is gone (lease expired).
    if let Some(p) = &shard.primary {
        if !tablets.iter().any(|t| &t.alias == p) {
            reports.push(TabletReport {
                alias: p.clone(),
                role: "primary".into(),
                problem: Some("not registered in etcd: agent down or lease expired".into()),
                ..Default::default()
            });
        }
    }
    reports.sort_by(|a, b| a.alias.cmp(&b.alias));
    ShardReport {
        keyspace: shard.keyspace.clone(),
        shard: shard.shard.clone(),
        primary: shard.primary.clone(),
        term: shard.term,
        tablets: reports,
    }
}

async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futs.len());
    let handles: Vec<_> = futs.into_iter().collect();
    for f in handles {
        out.push(f.await);
    }
    out
}

async fn full_status(grpc_addr: &str) -> anyhow::Result<pb::Health> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await?;
    let h = AgentClient::new(channel)
        .full_status(pb::FullStatusRequest {})
        .await?
        .into_inner();
    Ok(h)
}

async fn tablet_report(shard: &ShardRecord, t: &TabletRecord) -> TabletReport {
    let named_primary = shard.primary.as_deref() == Some(t.alias.as_str());
    let mut r = TabletReport {
        alias: t.alias.clone(),
        role: if named_primary { "primary" } else { "replica" }.into(),
        mysql: format!("{}:{}", t.mysql_host, t.mysql_port),
        ..Default::default()
    };
    match full_status(&t.grpc_addr).await {
        Err(e) => r.problem = Some(format!("agent at {} unreachable: {e:#}", t.grpc_addr)),
        Ok(h) => fill_from_health(&mut r, named_primary, &h),
    }
    r
}

/// Pure: what one agent's health says about its tablet.
pub fn fill_from_health(r: &mut TabletReport, named_primary: bool, h: &pb::Health) {
    if !h.mysql_reachable {
        r.problem = Some(format!("mysqld unreachable: {}", h.mysql_error));
        return;
    }
    let m = h.mysql.clone().unwrap_or_default();
    let rep = h.replication.clone().unwrap_or_default();
    let semi = h.semi_sync.clone().unwrap_or_default();
    let running = pb::ThreadState::Running as i32;
    let replicating = rep.io_state == running && rep.sql_state == running;
    r.read_only = Some(m.read_only);
    r.replicating = Some(replicating);
    r.source = rep
        .configured
        .then(|| format!("{}:{}", rep.source_host, rep.source_port));
    r.lag_ms = h.lag_ms;
    r.gtid_position = Some(m.gtid_position.clone());
    r.semi_sync = SemiSyncReport {
        primary: semi.primary_enabled,
        replica: semi.replica_enabled,
    };
    let problem = if h.fenced {
        Some(format!("fenced: {}", h.fence_reason))
    } else if named_primary {
        if m.read_only {
            Some("primary is read-only".to_string())
        } else if rep.configured {
            Some(format!(
                "primary replicates from {}",
                r.source.clone().unwrap_or_default()
            ))
        } else {
            None
        }
    } else if !replicating {
        let err = [rep.last_io_error.as_str(), rep.last_sql_error.as_str()]
            .into_iter()
            .filter(|e| !e.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Some(if !rep.configured {
            "replica has no replication source".to_string()
        } else if err.is_empty() {
            "replication not running".to_string()
        } else {
            format!("replication not running: {err}")
        })
    } else if !m.read_only {
        Some("replica is writable".to_string())
    } else {
        None
    };
    r.healthy = problem.is_none();
    r.problem = problem;
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_else(|| "-".into())
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if report.shards.is_empty() {
        out.push_str("no shards in the topology\n");
    }
    for s in &report.shards {
        out.push_str(&format!(
            "{}/{}  primary {}  term {}\n",
            s.keyspace,
            s.shard,
            s.primary.as_deref().unwrap_or("(none)"),
            s.term
        ));
        let header = [
            "ALIAS",
            "ROLE",
            "MYSQL",
            "HEALTHY",
            "RO",
            "REPL",
            "SOURCE",
            "LAG_MS",
            "SEMI(P/R)",
            "GTID",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
        for t in &s.tablets {
            let yn = |b: Option<bool>| match b {
                Some(true) => "yes".to_string(),
                Some(false) => "no".to_string(),
                None => "-".to_string(),
            };
            let onoff = |b: bool| if b { "on" } else { "off" };
            rows.push(vec![
                t.alias.clone(),
                t.role.clone(),
                if t.mysql.is_empty() {
                    "-".into()
                } else {
                    t.mysql.clone()
                },
                yn(Some(t.healthy)),
                yn(t.read_only),
                yn(t.replicating),
                opt(&t.source),
                opt(&t.lag_ms),
                format!(
                    "{}/{}",
                    onoff(t.semi_sync.primary),
                    onoff(t.semi_sync.replica)
                ),
                opt(&t.gtid_position),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            out.push_str("  ");
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        for t in &s.tablets {
            if let Some(p) = &t.problem {
                out.push_str(&format!("  ! {}: {p}\n", t.alias));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(read_only: bool, io: pb::ThreadState, configured: bool) -> pb::Health {
        pb::Health {
            mysql_reachable: true,
            mysql: Some(pb::MysqlStatus {
                read_only,
                gtid_position: "0-101-7".into(),
                ..Default::default()
            }),
            replication: Some(pb::Replication {
                configured,
                source_host: "127.0.0.1".into(),
                source_port: 4000,
                io_state: io as i32,
                sql_state: pb::ThreadState::Running as i32,
                last_io_error: "boom".into(),
                ..Default::default()
            }),
            lag_ms: Some(12),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_replica_and_primary() {
        let mut r = TabletReport::default();
        fill_from_health(&mut r, false, &health(true, pb::ThreadState::Running, true));
        assert!(r.healthy, "{:?}", r.problem);
        assert_eq!(r.source.as_deref(), Some("127.0.0.1:4000"));
        assert_eq!(r.lag_ms, Some(12));
        let mut r = TabletReport::default();
        fill_from_health(
            &mut r,
            true,
            &health(false, pb::ThreadState::Stopped, false),
        );
        assert!(r.healthy, "{:?}", r.problem);
        assert_eq!(r.source, None);
    }

    #[test]
    fn problems_are_named() {
        let mut r = TabletReport::default();
        fill_from_health(&mut r, false, &health(true, pb::ThreadState::Stopped, true));
        assert!(!r.healthy);
        assert!(r.problem.unwrap().contains("boom"));
        let mut r = TabletReport::default();
        fill_from_health(&mut r, true, &health(true, pb::ThreadState::Stopped, false));
        assert_eq!(r.problem.as_deref(), Some("primary is read-only"));
        let mut r = TabletReport::default();
        fill_from_health(
            &mut r,
            false,
            &health(false, pb::ThreadState::Running, true),
        );
        assert_eq!(r.problem.as_deref(), Some("replica is writable"));
        let mut r = TabletReport::default();
        let h = pb::Health {
            mysql_reachable: false,
            mysql_error: "refused".into(),
            ..Default::default()
        };
        fill_from_health(&mut r, false, &h);
        assert!(!r.healthy && r.problem.unwrap().contains("refused"));
    }

    #[test]
    fn renders_a_table_with_problems() {
        let report = Report {
            shards: vec![ShardReport {
                keyspace: "commerce".into(),
                shard: "0".into(),
                primary: Some("zone1-101".into()),
                term: 1,
                tablets: vec![TabletReport {
                    alias: "zone1-102".into(),
                    role: "replica".into(),
                    problem: Some("mysqld unreachable: x".into()),
                    ..Default::default()
                }],
            }],
        };
        let text = render(&report);
        assert!(text.contains("commerce/0  primary zone1-101  term 1"));
        assert!(text.contains("! zone1-102: mysqld unreachable"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["shards"][0]["tablets"][0]["semi_sync"]["primary"],
            false
        );
    }
}
