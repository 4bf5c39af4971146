//! `myhactl quarantine list|add|release`: the orchestrator's quarantine endpoints
//! (`GET /api/v1/quarantine`, `POST` / `DELETE /api/v1/quarantine/{alias}`). A quarantined
//! tablet is kept out of promotion (orchestrator) and of read routing (gateway) until released;
//! the record lives in etcd, so every orchestrator and gateway of the cluster follows it.

use std::time::{SystemTime, UNIX_EPOCH};

use myha_api::{QuarantineChange, QuarantineJson, QuarantineListResponse};
use serde::Serialize;

use crate::api::{encode, print_change, AnswerError, Api, ApiArgs, ApiError};

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error("printing the answer")]
    Json(#[source] serde_json::Error),
}

#[derive(clap::Subcommand, Debug)]
pub enum QuarantineCommand {
    /// Every quarantined tablet, with why, since when and by whom.
    List(ListArgs),
    /// Keep a tablet out of promotion and read routing (not the shard's primary).
    #[command(after_long_help = ADD_EXAMPLES)]
    Add(AddArgs),
    /// Let a tablet be promoted and routed to again.
    #[command(after_long_help = RELEASE_EXAMPLES)]
    Release(ReleaseArgs),
}

const ADD_EXAMPLES: &str = "\
The gateways stop opening read connections to it and close the open ones; the orchestrator
never promotes it. Refused for an unknown alias and for the shard's primary (move it first
with `myhactl reparent planned`).

Examples:
  myhactl quarantine add zone1-103 --reason 'checksum mismatch on app.orders'";

const RELEASE_EXAMPLES: &str = "\
After a release the orchestrator's repairs treat the tablet like any other: a deposed primary
that still holds transactions the primary lacks is quarantined again, with the reason.

Examples:
  myhactl quarantine release zone1-103
  myhactl quarantine release zone1-101 --reason 'errant transactions removed by hand'";

/// A tablet alias, checked for shape here (usage error, exit 2); whether it exists is the
/// orchestrator's answer.
fn parse_alias(s: &str) -> Result<String, String> {
    topo::parse_alias(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The tablet, e.g. zone1-103.
    #[arg(value_name = "ALIAS", value_parser = parse_alias)]
    pub alias: String,
    /// Why: stored in the record, shown by `quarantine list`, `status` and the gateway.
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// Whom the change is for, a note recorded with the reason as `(on behalf of NAME)`; the
    /// record's `by` and the audit's actor are whom the orchestrator authenticated (the
    /// token's name).
    #[arg(long, value_name = "NAME")]
    pub requester: Option<String>,
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// The tablet, e.g. zone1-103.
    #[arg(value_name = "ALIAS", value_parser = parse_alias)]
    pub alias: String,
    /// Why, for the audit log.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Whom the release is for, a note in the audit detail (`on behalf of NAME`); the audit's
    /// actor is whom the orchestrator authenticated (the token's name).
    #[arg(long, value_name = "NAME")]
    pub requester: Option<String>,
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Serialize)]
struct AddBody<'a> {
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    requester: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct ReleaseBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requester: Option<&'a str>,
}

fn shard_of(q: &QuarantineJson) -> String {
    match (&q.keyspace, &q.shard) {
        (Some(k), Some(s)) => format!("{k}/{s}"),
        _ => "(not registered)".into(),
    }
}

/// `zone1-103 (commerce/0) quarantined: reason`.
pub fn describe(c: &QuarantineChange) -> String {
    let q = &c.tablet;
    let audit = if c.audited {
        ""
    } else {
        " (not audited: the tablet is not registered)"
    };
    match c.action.as_str() {
        "quarantine" => format!(
            "{} ({}) quarantined: {}; kept out of promotion and read routing until released",
            q.alias,
            shard_of(q),
            q.reason
        ),
        "release" => format!(
            "{} ({}) released from quarantine (it was: {}){audit}",
            q.alias,
            shard_of(q),
            q.reason
        ),
        other => format!("{other} {}", q.alias),
    }
}

/// The list as a table, newest last as stored (by alias). Pure.
pub fn render_list(l: &QuarantineListResponse, now_ms: u64) -> String {
    if l.quarantine.is_empty() {
        return "no quarantined tablets\n".into();
    }
    let mut out = String::new();
    for q in &l.quarantine {
        out.push_str(&format!(
            "{}  {}  term {}  since {}  by {}\n    {}\n",
            q.alias,
            shard_of(q),
            q.term,
            crate::status::when(q.at_ms, now_ms),
            q.by.as_deref().unwrap_or("orchestrator (repair)"),
            q.reason
        ));
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `POST` (add) or `DELETE` (release) `/api/v1/quarantine/{alias}` with `body`, and its answer
/// printed.
async fn change<B: Serialize>(
    api: &ApiArgs,
    release: bool,
    alias: &str,
    body: &B,
    json: bool,
) -> Result<(), QuarantineError> {
    let api = Api::from_args(api)?;
    let path = format!("/api/v1/quarantine/{}", encode(alias));
    let c: QuarantineChange = if release {
        api.delete(&path, body).await?
    } else {
        api.post(&path, body).await?
    };
    Ok(print_change(&c, c.ok, describe(&c), json)?)
}

pub async fn run(cmd: QuarantineCommand) -> Result<(), QuarantineError> {
    match cmd {
        QuarantineCommand::List(a) => {
            let api = Api::from_args(&a.api)?;
            let l: QuarantineListResponse = api.get("/api/v1/quarantine").await?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&l).map_err(QuarantineError::Json)?
                );
            } else {
                print!("{}", render_list(&l, now_ms()));
            }
            Ok(())
        }
        QuarantineCommand::Add(a) => {
            let body = AddBody {
                reason: &a.reason,
                requester: a.requester.as_deref(),
            };
            change(&a.api, false, &a.alias, &body, a.json).await
        }
        QuarantineCommand::Release(a) => {
            let body = ReleaseBody {
                reason: a.reason.as_deref(),
                requester: a.requester.as_deref(),
            };
            change(&a.api, true, &a.alias, &body, a.json).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topo::Term;

    fn q(by: Option<&str>, registered: bool) -> QuarantineJson {
        QuarantineJson {
            alias: "zone1-103".into(),
            keyspace: registered.then(|| "commerce".to_string()),
            shard: registered.then(|| "0".to_string()),
            reason: "checksum mismatch".into(),
            at_ms: 1_000,
            term: Term::new(4),
            by: by.map(str::to_string),
        }
    }

    #[test]
    fn answers_read_as_sentences() {
        let c = QuarantineChange {
            ok: true,
            action: "quarantine".into(),
            tablet: q(Some("alice"), true),
            audited: true,
        };
        assert_eq!(
            describe(&c),
            "zone1-103 (commerce/0) quarantined: checksum mismatch; kept out of promotion and read routing until released"
        );
        let c = QuarantineChange {
            action: "release".into(),
            tablet: q(None, false),
            audited: false,
            ..c
        };
        let d = describe(&c);
        assert!(
            d.starts_with("zone1-103 ((not registered)) released") && d.contains("not audited"),
            "{d}"
        );
    }

    #[test]
    fn lists_render_every_record() {
        let none = QuarantineListResponse { quarantine: vec![] };
        assert_eq!(render_list(&none, 0), "no quarantined tablets\n");
        let l = QuarantineListResponse {
            quarantine: vec![q(None, true), q(Some("alice"), false)],
        };
        let text = render_list(&l, 61_000);
        assert!(text.contains("zone1-103  commerce/0  term 4"), "{text}");
        assert!(text.contains("by orchestrator (repair)"), "{text}");
        assert!(
            text.contains("by alice") && text.contains("1m ago"),
            "{text}"
        );
        assert!(text.contains("    checksum mismatch\n"), "{text}");
    }

    #[test]
    fn bodies_follow_the_contract() {
        let b = AddBody {
            reason: "x",
            requester: None,
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"reason": "x"})
        );
        let b = ReleaseBody {
            reason: None,
            requester: Some("bob"),
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"requester": "bob"})
        );
        assert!(parse_alias("zone1-103").is_ok());
        assert!(parse_alias("zone1").is_err());
    }
}
