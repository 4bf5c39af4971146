//! The orchestrator HTTP API's wire types: the JSON the orchestrator answers with and the audit
//! helpers its clients share. `myhactl` (and any other client) depends on this crate, not on the
//! orchestrator's internals; the orchestrator builds these values from its engine and snapshot.
//!
//! The endpoints are listed in the orchestrator's `api` module. Changing a field here changes
//! the contract: add fields, do not rename or remove them.

use serde::{Deserialize, Serialize};
use topo::{AuditEntry, QuarantineRecord, TabletRecord, Term};

/// Audit `action` of an emergency reparent's summary entry (flapping counts the automatic ones).
pub const ACTION_EMERGENCY_REPARENT: &str = "emergency_reparent";
/// Audit `action` of a planned reparent's summary entry.
pub const ACTION_PLANNED_REPARENT: &str = "planned_reparent";

/// Every problem code the orchestrator reports (`ProblemJson::code`), in its analysis order.
/// The orchestrator's unit tests check that this is exactly its `ProblemCode` list.
pub const PROBLEM_CODES: [&str; 26] = [
    "dead_primary",
    "dead_primary_and_some_replicas",
    "dead_primary_and_all_replicas",
    "unreachable_primary",
    "isolated_primary",
    "primary_writes_stalled",
    "stalled_primary",
    "no_primary",
    "primary_read_only",
    "primary_replicating",
    "primary_semi_sync_must_be_set",
    "primary_semi_sync_must_not_be_set",
    "primary_semi_sync_no_ackers",
    "primary_semi_sync_fell_back",
    "replica_semi_sync_must_be_set",
    "replica_semi_sync_must_not_be_set",
    "replica_writable",
    "replica_not_replicating",
    "replica_wrong_source",
    "errant_gtid",
    "stale_tablet_claiming_primary",
    "replica_mysql_unreachable",
    "replica_agent_unreachable",
    "quarantined",
    "reparent_in_progress",
    "term_ahead_of_record",
];

/// How many of a shard's newest audit entries are searched for its last recovery.
pub const LAST_RECOVERY_SCAN: usize = 200;

/// Whether an audit action names a whole recovery (the summary an attempt ends with, or a
/// skipped one): `emergency_reparent`, `planned_reparent` or a problem code. Steps, acks and
/// switches are not.
pub fn is_recovery_action(action: &str) -> bool {
    action == ACTION_EMERGENCY_REPARENT
        || action == ACTION_PLANNED_REPARENT
        || PROBLEM_CODES.contains(&action)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardsResponse {
    /// The snapshot's version (increases with every change).
    pub version: u64,
    /// The etcd watches are current (else registrations and shard records may be stale).
    pub topo_synced: bool,
    /// What `fresh` was judged with.
    pub health_stale_after_ms: u64,
    /// The engine has analysed at least once (else `problems` are empty for lack of analysis).
    pub analysed: bool,
    /// Automatic recovery is on (`[recovery] enabled` and not disabled globally); else why not.
    pub recoveries_enabled: bool,
    pub recoveries_disabled_reason: Option<String>,
    pub shards: Vec<ShardJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardJson {
    pub keyspace: String,
    pub shard: String,
    /// The shard record exists (else only tablets registered for it are known).
    pub has_record: bool,
    /// The primary the shard record names.
    pub primary: Option<String>,
    pub term: Term,
    pub term_start_ms: Option<u64>,
    pub reparent_in_progress: Option<String>,
    /// What the analysis finds wrong now, most urgent first (empty: healthy).
    pub problems: Vec<ProblemJson>,
    /// Whether and how the orchestrator may recover this shard now.
    pub recovery: RecoveryJson,
    /// The newest audit entry of the shard (`null`: none known).
    pub last_recovery: Option<AuditJson>,
    pub tablets: Vec<TabletJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemJson {
    /// e.g. `dead_primary`, `replica_not_replicating` (see `analysis::ProblemCode`).
    pub code: String,
    /// The tablet it is about; `null` for shard-wide problems.
    pub tablet: Option<String>,
    pub detail: String,
}

/// A recovery running now (in this orchestrator process).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgressJson {
    /// The problem it recovers, e.g. `dead_primary`.
    pub what: String,
    /// The tablet it is about, if one.
    pub tablet: Option<String>,
    #[serde(default)]
    pub detail: String,
    /// When it started, ms since the epoch.
    pub since_ms: u64,
    #[serde(default)]
    pub running_ms: u64,
}

/// How this orchestrator process's last attempt on the shard ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptJson {
    /// The problem it was for.
    pub problem: String,
    pub tablet: Option<String>,
    /// `recovered`, `refused`, `failed`, `problem_gone`, `lock_held` or `skipped`.
    pub outcome: String,
    /// The outcome's detail, reason or error.
    pub detail: String,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// The term written (emergency reparent).
    pub new_term: Option<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryJson {
    pub in_progress: Option<InProgressJson>,
    /// The orchestrator would recover this shard now (not disabled, not flapping).
    pub enabled: bool,
    /// Why not, when not enabled (`[recovery] enabled = false`, global or shard disable,
    /// flapping).
    pub disabled_reason: Option<String>,
    /// Automatic recovery stopped after too many reparents, until acknowledged
    /// (`POST /api/v1/shards/{keyspace}/{shard}/ack`).
    pub flapping: bool,
    /// The flapping reason, when flapping.
    pub flapping_detail: Option<String>,
    /// The problem the orchestrator would recover next.
    pub next: Option<ProblemJson>,
    /// Why the next problem was not acted on at the last evaluation (skip, backoff, hold).
    pub waiting: Option<String>,
    /// This process's last attempt (lost on restart; `last_recovery` is from the audit log).
    pub last_attempt: Option<AttemptJson>,
}

impl Default for RecoveryJson {
    fn default() -> Self {
        RecoveryJson {
            in_progress: None,
            enabled: true,
            disabled_reason: None,
            flapping: false,
            flapping_detail: None,
            next: None,
            waiting: None,
            last_attempt: None,
        }
    }
}

/// The newest recovery among a shard's audit entries (given newest first).
pub fn last_recovery(entries: &[AuditEntry]) -> Option<&AuditEntry> {
    entries.iter().find(|e| is_recovery_action(&e.action))
}

/// One audit entry with the shard it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditJson {
    pub keyspace: String,
    pub shard: String,
    pub at_ms: u64,
    pub term: Term,
    pub actor: String,
    pub action: String,
    pub tablet: Option<String>,
    pub outcome: String,
    pub detail: String,
    pub duration_ms: Option<u64>,
}

impl AuditJson {
    pub fn new(keyspace: &str, shard: &str, e: &AuditEntry) -> AuditJson {
        AuditJson {
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
            at_ms: e.at_ms,
            term: e.term,
            actor: e.actor.clone(),
            action: e.action.clone(),
            tablet: e.tablet.clone(),
            outcome: e.outcome.clone(),
            detail: e.detail.clone(),
            duration_ms: e.duration_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TabletJson {
    pub alias: String,
    /// The shard record names it as primary.
    pub is_primary: bool,
    pub mysql_addr: String,
    pub grpc_addr: String,
    /// `connected` or `connecting`.
    pub stream: String,
    /// Why the stream is down (while connecting after a failure).
    pub stream_error: Option<String>,
    /// Failed attempts since the stream was last up.
    pub stream_failures: u32,
    /// How long the stream has been in its state.
    pub stream_state_ms: u64,
    /// Age of the last health message; `null` when none was ever received.
    pub last_health_age_ms: Option<u64>,
    /// Wall clock of the last health message's receipt, ms since the epoch.
    pub last_health_received_ms: Option<u64>,
    /// The last health is at most `health_stale_after_ms` old.
    pub fresh: bool,
    pub mysql_reachable: Option<bool>,
    pub mysql_error: Option<String>,
    pub read_only: Option<bool>,
    pub replicating: Option<bool>,
    pub lag_ms: Option<u64>,
    /// The highest term the agent knows.
    pub term: Option<Term>,
    pub fenced: Option<bool>,
    pub fence_reason: Option<String>,
    /// Why it is quarantined (kept out of promotion and read routing); `null`: it is not.
    pub quarantined: Option<String>,
}

/// Answer of the mutating endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResponse {
    pub ok: bool,
    /// e.g. `disable`, `enable`, `ack`.
    pub action: String,
    /// `global` or `keyspace/shard`.
    pub scope: String,
    pub reason: Option<String>,
}

// ---- quarantine ----------------------------------------------------------------------

/// One quarantined tablet in `GET /api/v1/quarantine`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineJson {
    pub alias: String,
    /// Its shard, from its registration (`null`: not registered now, e.g. its agent is down).
    pub keyspace: Option<String>,
    pub shard: Option<String>,
    pub reason: String,
    pub at_ms: u64,
    /// The shard's term when it was quarantined.
    pub term: Term,
    /// Who quarantined it: the authenticated caller (`token:<name> from <ip>`, or
    /// `http-api from <ip>` without API authentication); `null`: the orchestrator's own repair.
    pub by: Option<String>,
}

impl QuarantineJson {
    pub fn new(alias: &str, rec: &QuarantineRecord, tablet: Option<&TabletRecord>) -> Self {
        QuarantineJson {
            alias: alias.to_string(),
            keyspace: tablet.map(|t| t.keyspace.clone()),
            shard: tablet.map(|t| t.shard.clone()),
            reason: rec.reason.clone(),
            at_ms: rec.at_ms,
            term: rec.term,
            by: rec.by.clone(),
        }
    }
}

/// `GET /api/v1/quarantine`, by alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineListResponse {
    pub quarantine: Vec<QuarantineJson>,
}

/// Answer of `POST` / `DELETE /api/v1/quarantine/{alias}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineChange {
    pub ok: bool,
    /// `quarantine` or `release`.
    pub action: String,
    /// The record written, or the one removed.
    pub tablet: QuarantineJson,
    /// Whether an audit entry was written (a release of an unregistered tablet has no shard
    /// to audit on).
    pub audited: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveriesResponse {
    /// Newest first.
    pub recoveries: Vec<AuditJson>,
}

/// Every shard's newest entries (each list newest first) merged into one list, newest first,
/// at most `limit` long. Ties keep the order of `per_shard`.
pub fn merge_audit(
    per_shard: &[(String, String, Vec<AuditEntry>)],
    limit: usize,
) -> Vec<AuditJson> {
    let mut all: Vec<AuditJson> = per_shard
        .iter()
        .flat_map(|(ks, shard, entries)| entries.iter().map(|e| AuditJson::new(ks, shard, e)))
        .collect();
    all.sort_by_key(|a| std::cmp::Reverse(a.at_ms));
    all.truncate(limit);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, action: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            term: Term::new(1),
            actor: "test".into(),
            action: action.into(),
            tablet: None,
            outcome: "ok".into(),
            detail: String::new(),
            duration_ms: None,
        }
    }

    #[test]
    fn the_last_recovery_skips_steps_and_acks() {
        let entries = [
            entry(5, "promote"),
            entry(4, "ack"),
            entry(3, "replica_not_replicating"),
            entry(2, ACTION_EMERGENCY_REPARENT),
        ];
        assert_eq!(last_recovery(&entries).map(|e| e.at_ms), Some(3));
        assert_eq!(last_recovery(&entries[..2]).map(|e| e.at_ms), None);
        assert!(is_recovery_action(ACTION_PLANNED_REPARENT));
        assert!(!is_recovery_action("dead_primary_x"));
    }
}
