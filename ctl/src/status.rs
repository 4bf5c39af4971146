//! `myhactl status`: the topology from etcd joined with each agent's fresh health, and each
//! shard's problems, recovery state and last recovery from the orchestrator's HTTP API (found
//! by `--orchestrator` / `$MYHA_ORCHESTRATOR`, else the sandbox's). When the orchestrator
//! cannot be asked, the problems are myhactl's own per-tablet checks and the last recovery is
//! read from etcd's audit log, and the output says so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use myha_api::{AuditJson, ProblemJson, RecoveryJson};
use myha_proto::agent::{self as pb, agent_client::AgentClient};
use serde::{Deserialize, Serialize};
use topo::{ShardRecord, TabletRecord, Topo};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// etcd endpoint(s), comma-separated; default: $MYHA_ETCD, else the sandbox's.
    #[arg(long, env = "MYHA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster prefix in etcd.
    #[arg(long, default_value = "/myha")]
    pub prefix: String,
    /// Sandbox directory to find etcd (and the orchestrator) in when --etcd is not given.
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// The orchestrator's HTTP API (`host:port` or `http://host:port`); default:
    /// $MYHA_ORCHESTRATOR, else the sandbox's when etcd is the sandbox's.
    #[arg(long, env = "MYHA_ORCHESTRATOR")]
    pub orchestrator: Option<String>,
    #[command(flatten)]
    pub token: crate::api::TokenArg,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub orchestrator: OrchestratorReport,
    pub shards: Vec<ShardReport>,
}

/// Where the problems and recovery state came from.
#[derive(Debug, Serialize, Default, Clone, PartialEq)]
pub struct OrchestratorReport {
    /// The API asked (`null`: none known).
    pub url: Option<String>,
    /// It answered `GET /api/v1/shards`.
    pub reachable: bool,
    /// Why not (or that none was given).
    pub error: Option<String>,
    /// Its engine has analysed the shards (until then `problems` are empty for lack of
    /// analysis); `null` when not reachable or not said.
    pub analysed: Option<bool>,
    /// Recoveries enabled globally (`null` when not reachable).
    pub recoveries_enabled: Option<bool>,
    pub recoveries_disabled_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub keyspace: String,
    pub shard: String,
    pub primary: Option<String>,
    pub term: u64,
    /// The orchestrator's analysis (empty: healthy); when it is unreachable, myhactl's own
    /// per-tablet checks (code `tablet_unhealthy`). See `problems_source`.
    pub problems: Vec<ProblemJson>,
    /// `orchestrator` or `myhactl`.
    pub problems_source: &'static str,
    /// The orchestrator's recovery state of the shard (`null` when not reachable).
    pub recovery: Option<RecoveryJson>,
    /// The newest recovery in the shard's audit log (`null`: none).
    pub last_recovery: Option<AuditJson>,
    /// `orchestrator`, `etcd` (orchestrator unreachable), or `unknown` (neither answered).
    pub last_recovery_source: &'static str,
    pub tablets: Vec<TabletReport>,
}

/// What myhactl reads from the orchestrator's `GET /api/v1/shards` (unknown fields ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct OrchShards {
    #[serde(default)]
    pub analysed: Option<bool>,
    #[serde(default)]
    pub recoveries_enabled: Option<bool>,
    #[serde(default)]
    pub recoveries_disabled_reason: Option<String>,
    pub shards: Vec<OrchShard>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OrchShard {
    pub keyspace: String,
    pub shard: String,
    #[serde(default)]
    pub problems: Vec<ProblemJson>,
    #[serde(default)]
    pub recovery: Option<RecoveryJson>,
    #[serde(default)]
    pub last_recovery: Option<AuditJson>,
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
    /// Why it is quarantined (from etcd), when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Locate(#[from] crate::api::ApiError),
    #[error("connecting to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: topo::TopoError,
    },
    #[error("reading the topology from etcd")]
    Topo(#[from] topo::TopoError),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    #[error("printing the report")]
    Json(#[source] serde_json::Error),
}

/// The agent's `FullStatus` could not be had (shown per tablet, never fatal).
#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("{0}")]
    Address(String),
    #[error("cannot connect")]
    Connect(#[source] tonic::transport::Error),
    /// Not a `#[source]`: tonic's own text of a status is a debug dump; code and message say it.
    #[error("FullStatus: {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
}

pub async fn run(args: StatusArgs) -> Result<(), StatusError> {
    let endpoints = crate::api::etcd_endpoints(&args.etcd, args.dir.as_deref())?;
    let orch_url = crate::api::orchestrator_url(
        args.orchestrator.as_deref(),
        !args.etcd.is_empty(),
        args.dir.as_deref(),
    );
    let token = crate::api::token_for(
        args.token.token.as_deref(),
        args.orchestrator.as_deref(),
        !args.etcd.is_empty(),
        args.dir.as_deref(),
    );
    let security = crate::security::resolve(args.dir.as_deref())?;
    let access = security.etcd_access();
    let topo = Topo::connect_with(&endpoints, &args.prefix, Duration::from_secs(2), &access)
        .await
        .map_err(|source| StatusError::Connect {
            endpoints: endpoints.join(","),
            source,
        })?;
    // The orchestrator is asked while the agents are.
    let orch_fut = async {
        match &orch_url {
            Some(u) => Some(
                match crate::api::Api::new(u, token.clone()) {
                    Ok(api) => api.get::<OrchShards>("/api/v1/shards").await,
                    Err(e) => Err(e),
                }
                .map_err(|e| crate::api::chain(&e)),
            ),
            None => None,
        }
    };
    let (report, orch) = tokio::join!(collect(&topo, &security), orch_fut);
    let mut report = report?;
    let orch = match orch {
        Some(r) => r,
        None => Err("no orchestrator given (--orchestrator or MYHA_ORCHESTRATOR)".to_string()),
    };
    join_orchestrator(&mut report, orch_url, orch);
    if !report.orchestrator.reachable {
        fill_last_recovery_from_etcd(&topo, &mut report).await;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(StatusError::Json)?
        );
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

pub async fn collect(
    topo: &Topo,
    security: &crate::security::Security,
) -> Result<Report, StatusError> {
    let quarantine = topo.list_quarantine().await?;
    let mut shards = Vec::new();
    for ks in topo.list_keyspaces().await? {
        for shard in topo.list_shards(&ks.name).await? {
            let tablets = topo
                .list_tablets(Some(&shard.keyspace), Some(&shard.shard))
                .await?;
            let mut report = shard_report(&shard, tablets, security).await;
            for t in &mut report.tablets {
                t.quarantined = quarantine.get(&t.alias).map(|q| q.describe());
            }
            shards.push(report);
        }
    }
    Ok(Report {
        orchestrator: OrchestratorReport::default(),
        shards,
    })
}

/// Pure: the orchestrator's answer (or why there is none) joined into the report. Without
/// one, each shard's problems are the tablets' own problems.
pub fn join_orchestrator(
    report: &mut Report,
    url: Option<String>,
    orch: Result<OrchShards, String>,
) {
    match orch {
        Ok(o) => {
            report.orchestrator = OrchestratorReport {
                url,
                reachable: true,
                error: None,
                analysed: o.analysed,
                recoveries_enabled: o.recoveries_enabled,
                recoveries_disabled_reason: o.recoveries_disabled_reason.clone(),
            };
            for s in &mut report.shards {
                s.problems_source = "orchestrator";
                s.last_recovery_source = "orchestrator";
                // A shard the orchestrator does not know (yet): nothing to show.
                if let Some(os) = o
                    .shards
                    .iter()
                    .find(|os| os.keyspace == s.keyspace && os.shard == s.shard)
                {
                    s.problems = os.problems.clone();
                    s.recovery = os.recovery.clone();
                    s.last_recovery = os.last_recovery.clone();
                }
            }
        }
        Err(e) => {
            report.orchestrator = OrchestratorReport {
                url,
                reachable: false,
                error: Some(e),
                ..Default::default()
            };
            for s in &mut report.shards {
                s.problems_source = "myhactl";
                s.last_recovery_source = "unknown";
                s.problems = s
                    .tablets
                    .iter()
                    .filter_map(|t| {
                        Some(ProblemJson {
                            code: "tablet_unhealthy".into(),
                            tablet: Some(t.alias.clone()),
                            detail: t.problem.clone()?,
                        })
                    })
                    .collect();
            }
        }
    }
}

/// The newest recovery of every shard, from etcd's audit log (when the orchestrator cannot
/// say), chosen as the orchestrator chooses it.
async fn fill_last_recovery_from_etcd(topo: &Topo, report: &mut Report) {
    for s in &mut report.shards {
        let scan = myha_api::LAST_RECOVERY_SCAN;
        if let Ok(entries) = topo.list_audit(&s.keyspace, Some(&s.shard), scan).await {
            s.last_recovery =
                myha_api::last_recovery(&entries).map(|e| AuditJson::new(&s.keyspace, &s.shard, e));
            s.last_recovery_source = "etcd";
        }
    }
}

async fn shard_report(
    shard: &ShardRecord,
    tablets: Vec<TabletRecord>,
    security: &crate::security::Security,
) -> ShardReport {
    let mut reports: Vec<TabletReport> = futures_join(
        tablets
            .iter()
            .map(|t| tablet_report(shard, t, security))
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
        term: shard.term.get(),
        problems: Vec::new(),
        problems_source: "myhactl",
        recovery: None,
        last_recovery: None,
        last_recovery_source: "unknown",
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

/// One agent's `FullStatus`, over TLS with the operator's certificate when there is one
/// (agents require a client certificate of the cluster CA).
async fn full_status(
    grpc_addr: &str,
    security: &crate::security::Security,
) -> Result<pb::Health, AgentError> {
    let endpoint = security
        .agent_endpoint(grpc_addr, Duration::from_secs(1), Duration::from_secs(3))
        .map_err(AgentError::Address)?;
    let channel = endpoint.connect().await.map_err(AgentError::Connect)?;
    let h = AgentClient::new(channel)
        .full_status(pb::FullStatusRequest {})
        .await
        .map_err(AgentError::Rpc)?
        .into_inner();
    Ok(h)
}

async fn tablet_report(
    shard: &ShardRecord,
    t: &TabletRecord,
    security: &crate::security::Security,
) -> TabletReport {
    let named_primary = shard.primary.as_deref() == Some(t.alias.as_str());
    let mut r = TabletReport {
        alias: t.alias.clone(),
        role: if named_primary { "primary" } else { "replica" }.into(),
        mysql: format!("{}:{}", t.mysql_host, t.mysql_port),
        ..Default::default()
    };
    match full_status(&t.grpc_addr, security).await {
        Err(e) => {
            r.problem = Some(format!(
                "agent at {} unreachable: {}",
                t.grpc_addr,
                crate::api::chain(&e)
            ))
        }
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

/// `2024-05-01T10:00:00Z (3m 12s ago)`.
pub(crate) fn when(at_ms: u64, now_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(at_ms);
    let ago = Duration::from_secs(now_ms.saturating_sub(at_ms) / 1000);
    let ago = if ago.is_zero() {
        "just now".to_string()
    } else {
        format!("{} ago", humantime::format_duration(ago))
    };
    format!("{} ({ago})", humantime::format_rfc3339_seconds(at))
}

fn render_orchestrator(o: &OrchestratorReport) -> String {
    let url = o.url.as_deref().unwrap_or("(none)");
    if o.reachable {
        let mut line = format!("orchestrator {url}");
        if o.analysed == Some(false) {
            line.push_str(": starting, nothing analysed yet");
        }
        if o.recoveries_enabled == Some(false) {
            line.push_str(&format!(
                ": RECOVERIES DISABLED globally ({})",
                o.recoveries_disabled_reason
                    .as_deref()
                    .unwrap_or("no reason given")
            ));
        }
        line + "\n"
    } else {
        format!(
            "orchestrator {url} NOT REACHABLE ({}): problems below are myhactl's own checks, last recoveries read from etcd\n",
            o.error.as_deref().unwrap_or("unknown error")
        )
    }
}

fn render_recovery(r: &RecoveryJson, now_ms: u64) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(p) = &r.in_progress {
        parts.push(format!(
            "IN PROGRESS: {}{} since {}",
            p.what,
            p.tablet
                .as_deref()
                .map(|t| format!(" on {t}"))
                .unwrap_or_default(),
            when(p.since_ms, now_ms)
        ));
    }
    if !r.enabled {
        parts.push(format!(
            "disabled ({})",
            r.disabled_reason.as_deref().unwrap_or("no reason given")
        ));
    }
    if r.flapping {
        parts.push(format!(
            "flapping: {}",
            r.flapping_detail
                .as_deref()
                .unwrap_or("held back until acknowledged")
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

pub fn render(report: &Report) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    render_at(report, now_ms)
}

pub fn render_at(report: &Report, now_ms: u64) -> String {
    let mut out = String::new();
    out.push_str(&render_orchestrator(&report.orchestrator));
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
        if let Some(r) = s.recovery.as_ref().and_then(|r| render_recovery(r, now_ms)) {
            out.push_str(&format!("  recovery: {r}\n"));
        }
        // From etcd, so shown whether or not the orchestrator answered; its own `quarantined`
        // problem says the same, so only one of them is printed.
        for t in &s.tablets {
            if let Some(q) = &t.quarantined {
                let named = s
                    .problems
                    .iter()
                    .any(|p| p.code == "quarantined" && p.tablet.as_ref() == Some(&t.alias));
                if !named {
                    out.push_str(&format!("  quarantined {}: {q}\n", t.alias));
                }
            }
        }
        if s.problems.is_empty() {
            out.push_str("  problems: none\n");
        } else {
            for p in &s.problems {
                match &p.tablet {
                    Some(t) => out.push_str(&format!("  ! {} {t}: {}\n", p.code, p.detail)),
                    None => out.push_str(&format!("  ! {}: {}\n", p.code, p.detail)),
                }
            }
        }
        // Tablet problems the orchestrator's list does not already name.
        if s.problems_source == "orchestrator" {
            for t in &s.tablets {
                if let Some(p) = &t.problem {
                    if !s
                        .problems
                        .iter()
                        .any(|x| x.tablet.as_ref() == Some(&t.alias))
                    {
                        out.push_str(&format!("  ! {}: {p}\n", t.alias));
                    }
                }
            }
        }
        let from = if s.last_recovery_source == "etcd" {
            " (from etcd)"
        } else {
            ""
        };
        match &s.last_recovery {
            Some(a) => out.push_str(&format!(
                "  last recovery{from}: {} {}{} by {}: {}{}{}\n",
                when(a.at_ms, now_ms),
                a.action,
                a.tablet
                    .as_deref()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default(),
                a.actor,
                a.outcome,
                a.duration_ms
                    .map(|d| format!(" in {d} ms"))
                    .unwrap_or_default(),
                if a.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", a.detail)
                }
            )),
            None if s.last_recovery_source == "unknown" => {
                out.push_str("  last recovery: unknown (neither the orchestrator nor etcd said)\n")
            }
            None => out.push_str(&format!("  last recovery{from}: none\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use topo::Term;

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

    fn shard_with(tablets: Vec<TabletReport>) -> ShardReport {
        ShardReport {
            keyspace: "commerce".into(),
            shard: "0".into(),
            primary: Some("zone1-101".into()),
            term: 1,
            problems: Vec::new(),
            problems_source: "myhactl",
            recovery: None,
            last_recovery: None,
            last_recovery_source: "unknown",
            tablets,
        }
    }

    fn unhealthy(alias: &str, problem: &str) -> TabletReport {
        TabletReport {
            alias: alias.into(),
            role: "replica".into(),
            problem: Some(problem.into()),
            ..Default::default()
        }
    }

    fn audit() -> AuditJson {
        AuditJson {
            keyspace: "commerce".into(),
            shard: "0".into(),
            at_ms: 1_700_000_000_000,
            term: Term::new(2),
            actor: "orchestrator@h:1".into(),
            action: "emergency_reparent".into(),
            tablet: Some("zone1-102".into()),
            outcome: "ok".into(),
            detail: "zone1-101 dead".into(),
            duration_ms: Some(840),
        }
    }

    #[test]
    fn renders_a_table_with_problems() {
        let mut report = Report {
            orchestrator: OrchestratorReport::default(),
            shards: vec![shard_with(vec![unhealthy(
                "zone1-102",
                "mysqld unreachable: x",
            )])],
        };
        join_orchestrator(&mut report, None, Err("no orchestrator given".into()));
        let text = render_at(&report, 1_700_000_060_000);
        assert!(text.contains("commerce/0  primary zone1-101  term 1"));
        assert!(
            text.contains("! tablet_unhealthy zone1-102: mysqld unreachable"),
            "{text}"
        );
        assert!(
            text.contains("NOT REACHABLE (no orchestrator given)"),
            "{text}"
        );
        assert!(text.contains("last recovery: unknown"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["shards"][0]["tablets"][0]["semi_sync"]["primary"],
            false
        );
        assert_eq!(json["shards"][0]["problems"][0]["code"], "tablet_unhealthy");
        assert_eq!(json["shards"][0]["problems_source"], "myhactl");
        assert_eq!(json["orchestrator"]["reachable"], false);

        // From etcd after all.
        report.shards[0].last_recovery = Some(audit());
        report.shards[0].last_recovery_source = "etcd";
        let text = render_at(&report, 1_700_000_060_000);
        assert!(
            text.contains("last recovery (from etcd): 2023-11-14T22:13:20Z (1m ago) emergency_reparent zone1-102 by orchestrator@h:1: ok in 840 ms (zone1-101 dead)"),
            "{text}"
        );
    }

    #[test]
    fn quarantined_tablets_are_shown_once() {
        let mut t = unhealthy("zone1-103", "x");
        t.problem = None;
        t.healthy = true;
        t.quarantined = Some("checksum mismatch (quarantined by alice at term 2, 5 ms)".into());
        let mut report = Report {
            orchestrator: OrchestratorReport::default(),
            shards: vec![shard_with(vec![t])],
        };
        join_orchestrator(&mut report, None, Err("no orchestrator given".into()));
        let text = render_at(&report, 0);
        assert!(
            text.contains("  quarantined zone1-103: checksum mismatch (quarantined by alice"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["shards"][0]["tablets"][0]["quarantined"]
            .as_str()
            .is_some_and(|q| q.starts_with("checksum mismatch")));
        // The orchestrator's problem names it already: not twice.
        report.shards[0].problems = vec![ProblemJson {
            code: "quarantined".into(),
            tablet: Some("zone1-103".into()),
            detail: "checksum mismatch".into(),
        }];
        let text = render_at(&report, 0);
        assert!(
            text.contains("! quarantined zone1-103: checksum mismatch"),
            "{text}"
        );
        assert!(!text.contains("  quarantined zone1-103:"), "{text}");
    }

    #[test]
    fn orchestrator_answer_is_joined() {
        let mut report = Report {
            orchestrator: OrchestratorReport::default(),
            shards: vec![
                shard_with(vec![unhealthy("zone1-103", "replication not running")]),
                ShardReport {
                    shard: "80-".into(),
                    ..shard_with(vec![])
                },
            ],
        };
        let answer: OrchShards = serde_json::from_value(serde_json::json!({
            "version": 3,
            "analysed": true,
            "recoveries_enabled": false,
            "recoveries_disabled_reason": "maintenance",
            "shards": [{
                "keyspace": "commerce", "shard": "0", "tablets": [],
                "problems": [{"code": "dead_primary", "tablet": "zone1-101", "detail": "gone"}],
                "recovery": {"in_progress": {"what": "emergency_reparent", "tablet": null, "since_ms": 1_700_000_000_000u64},
                             "enabled": false, "disabled_reason": "globally disabled: maintenance",
                             "flapping": true, "flapping_detail": "3 recoveries in 10m"},
                "last_recovery": audit(),
            }]
        }))
        .unwrap();
        join_orchestrator(&mut report, Some("http://127.0.0.1:1".into()), Ok(answer));
        assert!(report.orchestrator.reachable);
        assert_eq!(report.orchestrator.analysed, Some(true));
        assert_eq!(report.orchestrator.recoveries_enabled, Some(false));
        let s = &report.shards[0];
        assert_eq!(s.problems[0].code, "dead_primary");
        assert_eq!(
            s.last_recovery.as_ref().unwrap().action,
            "emergency_reparent"
        );
        // The orchestrator does not know 80-: no problems, no recovery.
        assert!(report.shards[1].problems.is_empty());
        assert!(report.shards[1].recovery.is_none());
        let text = render_at(&report, 1_700_000_002_000);
        for want in [
            "orchestrator http://127.0.0.1:1: RECOVERIES DISABLED globally (maintenance)",
            "recovery: IN PROGRESS: emergency_reparent since 2023-11-14T22:13:20Z (2s ago); disabled (globally disabled: maintenance); flapping: 3 recoveries in 10m",
            "! dead_primary zone1-101: gone",
            "! zone1-103: replication not running",
            "last recovery: 2023-11-14T22:13:20Z (2s ago) emergency_reparent",
            "problems: none",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["shards"][0]["problems"][0]["tablet"], "zone1-101");
        assert_eq!(json["shards"][1]["problems"], serde_json::json!([]));
        assert_eq!(json["shards"][1]["last_recovery"], serde_json::Value::Null);
    }
}
