//! `myhactl recoveries disable|enable [keyspace/shard]` and `myhactl ack <keyspace/shard>`:
//! the orchestrator's control endpoints (`POST /api/v1/recoveries/{disable,enable}`,
//! `POST /api/v1/shards/{ks}/{shard}/ack`). The orchestrator writes the control records in
//! etcd, so every orchestrator of the cluster follows the change, not only the one asked.

use myha_api::ChangeResponse;
use serde::Serialize;

use crate::api::{encode, print_change, AnswerError, Api, ApiArgs, ApiError};
use crate::scope::ShardRef;

#[derive(Debug, thiserror::Error)]
pub enum RecoveriesError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Answer(#[from] AnswerError),
}

#[derive(clap::Subcommand, Debug)]
pub enum RecoveriesCommand {
    /// Stop automatic recovery, of one shard or (without a shard) everywhere.
    #[command(after_long_help = DISABLE_EXAMPLES)]
    Disable(ToggleArgs),
    /// Let automatic recovery act again, on one shard or (without a shard) everywhere.
    #[command(after_long_help = ENABLE_EXAMPLES)]
    Enable(ToggleArgs),
}

const DISABLE_EXAMPLES: &str = "\
A shard is recovered automatically only when recovery is enabled both globally and for the
shard. The change is stored in etcd: every orchestrator of the cluster follows it.

Examples:
  myhactl recoveries disable commerce/0 --reason 'disk replacement on zone1-101'
  myhactl recoveries disable --reason 'etcd upgrade'      # every shard
  myhactl recoveries disable commerce/0 --json";

const ENABLE_EXAMPLES: &str = "\
Enabling globally does not enable a shard disabled on its own: enable it by name.

Examples:
  myhactl recoveries enable commerce/0
  myhactl recoveries enable --reason 'etcd upgrade done'";

#[derive(clap::Args, Debug)]
pub struct ToggleArgs {
    /// The shard (keyspace/shard, e.g. commerce/0); none: globally, for every shard.
    #[arg(value_name = "KEYSPACE/SHARD")]
    pub shard: Option<ShardRef>,
    /// Why, for the control record and the audit log.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct AckArgs {
    /// The shard (keyspace/shard, e.g. commerce/0).
    #[arg(value_name = "KEYSPACE/SHARD")]
    pub shard: ShardRef,
    /// Why, for the orchestrator's log.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Print the orchestrator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Body of disable/enable: both names for one shard, neither for all.
#[derive(Debug, Serialize)]
struct ToggleBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    keyspace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct AckBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// `recoveries disabled for commerce/0 (reason: ...)`.
pub fn describe(r: &ChangeResponse) -> String {
    let reason = r
        .reason
        .as_deref()
        .map(|x| format!(" (reason: {x})"))
        .unwrap_or_default();
    let scope = if r.scope == "global" {
        "globally, for every shard".to_string()
    } else {
        format!("for {}", r.scope)
    };
    match r.action.as_str() {
        "disable" => format!("automatic recoveries disabled {scope}{reason}"),
        "enable" => format!("automatic recoveries enabled {scope}{reason}"),
        "ack" => format!(
            "acknowledged {}: its flapping count starts again from now{reason}",
            r.scope
        ),
        other => format!("{other} {}{reason}", r.scope),
    }
}

fn print(r: &ChangeResponse, json: bool) -> Result<(), RecoveriesError> {
    Ok(print_change(r, r.ok, describe(r), json)?)
}

pub async fn toggle(cmd: RecoveriesCommand) -> Result<(), RecoveriesError> {
    let (args, action) = match cmd {
        RecoveriesCommand::Disable(a) => (a, "disable"),
        RecoveriesCommand::Enable(a) => (a, "enable"),
    };
    let api = Api::from_args(&args.api)?;
    let body = ToggleBody {
        keyspace: args.shard.as_ref().map(|s| s.keyspace.as_str()),
        shard: args.shard.as_ref().map(|s| s.shard.as_str()),
        reason: args.reason.as_deref(),
    };
    let answer: ChangeResponse = api
        .post(&format!("/api/v1/recoveries/{action}"), &body)
        .await?;
    print(&answer, args.json)
}

pub async fn ack(args: AckArgs) -> Result<(), RecoveriesError> {
    let api = Api::from_args(&args.api)?;
    let path = format!(
        "/api/v1/shards/{}/{}/ack",
        encode(&args.shard.keyspace),
        encode(&args.shard.shard)
    );
    let answer: ChangeResponse = api
        .post(
            &path,
            &AckBody {
                reason: args.reason.as_deref(),
            },
        )
        .await?;
    print(&answer, args.json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(action: &str, scope: &str, reason: Option<&str>) -> ChangeResponse {
        ChangeResponse {
            ok: true,
            action: action.into(),
            scope: scope.into(),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn answers_read_as_sentences() {
        assert_eq!(
            describe(&change("disable", "commerce/0", Some("maintenance"))),
            "automatic recoveries disabled for commerce/0 (reason: maintenance)"
        );
        assert_eq!(
            describe(&change("enable", "global", None)),
            "automatic recoveries enabled globally, for every shard"
        );
        assert!(describe(&change("ack", "commerce/0", None)).starts_with("acknowledged commerce/0"));
    }

    #[test]
    fn bodies_follow_the_contract() {
        let b = ToggleBody {
            keyspace: None,
            shard: None,
            reason: Some("x"),
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"reason": "x"})
        );
        let b = AckBody { reason: None };
        assert_eq!(serde_json::to_value(&b).unwrap(), serde_json::json!({}));
    }
}
