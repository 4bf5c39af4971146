//! `myhactl audit [keyspace[/shard]] [--limit N]`: the audit log (every recovery, reparent
//! step, switch and ack), newest first. Asked of the orchestrator (`GET /api/v1/recoveries`)
//! when it answers; otherwise read straight from etcd, which holds the log itself — the
//! orchestrator being down is exactly when an operator wants to know what it last did. The
//! output always says which source answered.

use std::time::{Duration, UNIX_EPOCH};

use myha_api::{merge_audit, AuditJson, RecoveriesResponse};
use serde::Serialize;
use topo::{Topo, TopoError};

use crate::api::{encode, orchestrator_url, Api, ApiError};
use crate::scope::Scope;

/// etcd dial bound: a dead etcd should fail the command quickly, not hang it.
const ETCD_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("orchestrator not used ({orchestrator}) and etcd not found either: {etcd}")]
    NoSource {
        /// Why the orchestrator was not used.
        orchestrator: String,
        etcd: String,
    },
    #[error("{orchestrator}reading the audit log from etcd at {endpoints} failed")]
    Etcd {
        /// Why the orchestrator was not used (with a trailing `; `).
        orchestrator: String,
        endpoints: String,
        #[source]
        source: Box<TopoError>,
    },
    #[error("printing the answer")]
    Json(#[source] serde_json::Error),
}

#[derive(clap::Args, Debug)]
#[command(after_long_help = EXAMPLES)]
pub struct AuditArgs {
    /// A keyspace (all its shards) or one shard (keyspace/shard); none: every shard.
    #[arg(value_name = "KEYSPACE[/SHARD]")]
    pub scope: Option<Scope>,
    /// At most this many entries, newest first (1 to 1000).
    #[arg(long, default_value_t = 50, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Machine-readable output: `{source, url, fallback_reason, entries: [...]}`.
    #[arg(long)]
    pub json: bool,
    /// The orchestrator's HTTP API (`host:port` or `http://host:port`); default:
    /// $MYHA_ORCHESTRATOR, else the sandbox's when etcd is the sandbox's.
    #[arg(long, env = "MYHA_ORCHESTRATOR", value_name = "URL")]
    pub orchestrator: Option<String>,
    #[command(flatten)]
    pub token: crate::api::TokenArg,
    /// etcd endpoint(s), comma-separated, read when the orchestrator does not answer;
    /// default: $MYHA_ETCD, else the sandbox's.
    #[arg(long, env = "MYHA_ETCD", value_delimiter = ',', value_name = "URL")]
    pub etcd: Vec<String>,
    /// Cluster prefix in etcd.
    #[arg(long, default_value = "/myha", value_name = "PREFIX")]
    pub prefix: String,
    /// Sandbox directory to find the orchestrator and etcd in.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

const EXAMPLES: &str = "\
Each row: time (UTC), shard, term, actor, action (a reparent's steps, `planned_reparent`,
`emergency_reparent`, a problem code, disable/enable/ack), tablet, outcome, duration, detail.

Examples:
  myhactl audit                            # every shard, last 50 entries
  myhactl audit commerce/0 --limit 200
  myhactl audit commerce --json | jq '.entries[] | select(.outcome != \"ok\")'
  myhactl audit --orchestrator orch1:15000 --etcd http://etcd1:2379";

/// What `--json` prints.
#[derive(Debug, Serialize)]
pub struct AuditReport {
    /// `orchestrator` or `etcd`.
    pub source: &'static str,
    /// The orchestrator's URL or etcd's endpoints, whichever answered.
    pub url: String,
    /// Why etcd was read instead of the orchestrator (`null` when it answered).
    pub fallback_reason: Option<String>,
    /// Newest first.
    pub entries: Vec<AuditJson>,
}

fn query(scope: Option<&Scope>, limit: usize) -> String {
    let mut q = format!("/api/v1/recoveries?limit={limit}");
    if let Some(s) = scope {
        q.push_str(&format!("&keyspace={}", encode(&s.keyspace)));
        if let Some(sh) = &s.shard {
            q.push_str(&format!("&shard={}", encode(sh)));
        }
    }
    q
}

/// The newest `limit` entries of the scope, straight from etcd, merged as the orchestrator
/// merges them.
async fn from_etcd(
    topo: &Topo,
    scope: Option<&Scope>,
    limit: usize,
) -> Result<Vec<AuditJson>, TopoError> {
    let shards: Vec<(String, String)> = match scope {
        Some(Scope {
            keyspace,
            shard: Some(shard),
        }) => vec![(keyspace.clone(), shard.clone())],
        Some(Scope {
            keyspace,
            shard: None,
        }) => topo
            .list_shards(keyspace)
            .await?
            .into_iter()
            .map(|r| (r.keyspace, r.shard))
            .collect(),
        None => {
            let mut all = Vec::new();
            for ks in topo.list_keyspaces().await? {
                for r in topo.list_shards(&ks.name).await? {
                    all.push((r.keyspace, r.shard));
                }
            }
            all
        }
    };
    let mut lists = Vec::with_capacity(shards.len());
    for (ks, shard) in shards {
        let entries = topo.list_audit(&ks, Some(&shard), limit).await?;
        lists.push((ks, shard, entries));
    }
    Ok(merge_audit(&lists, limit))
}

pub async fn run(args: AuditArgs) -> Result<(), AuditError> {
    let limit = usize::from(args.limit);
    let url = orchestrator_url(
        args.orchestrator.as_deref(),
        !args.etcd.is_empty(),
        args.dir.as_deref(),
    );
    let fallback_reason = match &url {
        None => "no orchestrator given (--orchestrator or MYHA_ORCHESTRATOR)".to_string(),
        Some(u) => {
            let token = crate::api::token_for(
                args.token.token.as_deref(),
                args.orchestrator.as_deref(),
                !args.etcd.is_empty(),
                args.dir.as_deref(),
            );
            let api = Api::new(u, token)?;
            match api
                .get::<RecoveriesResponse>(&query(args.scope.as_ref(), limit))
                .await
            {
                Ok(r) => {
                    return print(
                        &AuditReport {
                            source: "orchestrator",
                            url: api.base().to_string(),
                            fallback_reason: None,
                            entries: r.recoveries,
                        },
                        args.json,
                    )
                }
                // Only an orchestrator that cannot answer sends us to etcd; one that refuses
                // the request would refuse it for a reason etcd cannot fix.
                Err(e) if e.is_unavailable() => crate::api::chain(&e),
                Err(e) => return Err(e.into()),
            }
        }
    };
    let endpoints = crate::api::etcd_endpoints(&args.etcd, args.dir.as_deref()).map_err(|e| {
        AuditError::NoSource {
            orchestrator: fallback_reason.clone(),
            etcd: crate::api::chain(&e),
        }
    })?;
    let etcd_text = endpoints.join(",");
    let etcd_err = |source: TopoError| AuditError::Etcd {
        orchestrator: format!("orchestrator not used ({fallback_reason}); "),
        endpoints: etcd_text.clone(),
        source: Box::new(source),
    };
    let security =
        crate::security::resolve(args.dir.as_deref()).map_err(|e| AuditError::NoSource {
            orchestrator: fallback_reason.clone(),
            etcd: crate::api::chain(&e),
        })?;
    let topo = Topo::connect_with(
        &endpoints,
        &args.prefix,
        ETCD_DIAL_TIMEOUT,
        &security.etcd_access(),
    )
    .await
    .map_err(etcd_err)?;
    let entries = from_etcd(&topo, args.scope.as_ref(), limit)
        .await
        .map_err(etcd_err)?;
    print(
        &AuditReport {
            source: "etcd",
            url: etcd_text.clone(),
            fallback_reason: Some(fallback_reason),
            entries,
        },
        args.json,
    )
}

fn print(report: &AuditReport, json: bool) -> Result<(), AuditError> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).map_err(AuditError::Json)?
        );
    } else {
        print!("{}", render(report));
    }
    Ok(())
}

/// `2024-05-01T10:00:00.123Z`.
fn time(at_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at_ms)).to_string()
}

/// The source line, then an aligned table (the detail, free text, last and unpadded).
pub fn render(report: &AuditReport) -> String {
    let mut out = match &report.fallback_reason {
        None => format!("source: orchestrator {}\n", report.url),
        Some(why) => format!(
            "source: etcd {} (orchestrator not used: {why})\n",
            report.url
        ),
    };
    if report.entries.is_empty() {
        out.push_str("no audit entries\n");
        return out;
    }
    let header = [
        "TIME (UTC)",
        "SHARD",
        "TERM",
        "ACTOR",
        "ACTION",
        "TABLET",
        "OUTCOME",
        "DURATION",
        "DETAIL",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for e in &report.entries {
        rows.push(vec![
            time(e.at_ms),
            format!("{}/{}", e.keyspace, e.shard),
            e.term.to_string(),
            e.actor.clone(),
            e.action.clone(),
            e.tablet.clone().unwrap_or_else(|| "-".into()),
            e.outcome.clone(),
            e.duration_ms
                .map(|d| format!("{d} ms"))
                .unwrap_or_else(|| "-".into()),
            // One row per entry whatever the detail holds.
            e.detail.replace(['\n', '\r'], " "),
        ]);
    }
    let last = header.len() - 1;
    let widths: Vec<usize> = (0..last)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (c, v) in r.iter().enumerate() {
            if c == last {
                line.push_str(v);
            } else {
                // Numbers right-aligned, text left-aligned.
                let w = widths[c];
                if c == 2 || c == 7 {
                    line.push_str(&format!("{v:>w$}  "));
                } else {
                    line.push_str(&format!("{v:<w$}  "));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use topo::Term;

    fn entry(at_ms: u64, action: &str, detail: &str) -> AuditJson {
        AuditJson {
            keyspace: "commerce".into(),
            shard: "0".into(),
            at_ms,
            term: Term::new(5),
            actor: "operator:alice@orchestrator@h:1".into(),
            action: action.into(),
            tablet: Some("zone1-102".into()),
            outcome: "ok".into(),
            detail: detail.into(),
            duration_ms: Some(143),
        }
    }

    #[test]
    fn table_with_source() {
        let report = AuditReport {
            source: "etcd",
            url: "http://127.0.0.1:2379".into(),
            fallback_reason: Some("GET x: refused".into()),
            entries: vec![
                entry(
                    1_700_000_000_123,
                    "planned_reparent",
                    "zone1-101 -> zone1-102",
                ),
                AuditJson {
                    tablet: None,
                    duration_ms: None,
                    ..entry(1_700_000_000_000, "demote", "a\nb")
                },
            ],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "source: etcd http://127.0.0.1:2379 (orchestrator not used: GET x: refused)"
        );
        assert!(lines[1].starts_with("TIME (UTC)"), "{text}");
        assert!(
            lines[2].starts_with("2023-11-14T22:13:20.123Z  commerce/0     5  operator:alice"),
            "{text}"
        );
        assert!(
            lines[2].ends_with("143 ms  zone1-101 -> zone1-102"),
            "{text}"
        );
        assert!(lines[3].ends_with("-  a b"), "{text}");
        // Columns line up: the action starts at the same place on every row.
        let col = lines[1].find("ACTION").unwrap();
        assert_eq!(lines[2].find("planned_reparent"), Some(col), "{text}");
        assert_eq!(lines[3].find("demote"), Some(col), "{text}");

        let empty = AuditReport {
            source: "orchestrator",
            url: "http://o:1".into(),
            fallback_reason: None,
            entries: vec![],
        };
        assert_eq!(
            render(&empty),
            "source: orchestrator http://o:1\nno audit entries\n"
        );
    }

    #[test]
    fn query_names_the_scope() {
        assert_eq!(query(None, 50), "/api/v1/recoveries?limit=50");
        let s: Scope = "commerce/-80".parse().unwrap();
        assert_eq!(
            query(Some(&s), 7),
            "/api/v1/recoveries?limit=7&keyspace=commerce&shard=-80"
        );
    }
}
