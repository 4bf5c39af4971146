//! The JSON records stored in etcd (see `docs/design.md`, "etcd key layout").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ParseError;
use crate::term::Term;

/// `{p}/cells/{cell}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRecord {
    pub name: String,
}

/// The smallest `rpl_semi_sync_master_timeout` that counts as lossless: below it a primary
/// that waits that long for an ack falls back to async and acknowledges commits no replica
/// holds. The agents refuse a `semi_sync_timeout` below it at start; the orchestrator reports
/// a primary configured below it.
pub const MIN_LOSSLESS_SEMI_SYNC_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// How a keyspace's primaries acknowledge commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Asynchronous replication.
    #[default]
    None,
    /// Semi-synchronous replication (lossless).
    SemiSync,
}

/// `{p}/keyspaces/{ks}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceRecord {
    pub name: String,
    pub durability: Durability,
}

/// `{p}/shards/{ks}/{shard}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub keyspace: String,
    pub shard: String,
    /// Alias of the current primary, if any.
    #[serde(default)]
    pub primary: Option<String>,
    /// 0 = no primary ever.
    pub term: Term,
    /// When the current term started (ms since the Unix epoch).
    pub term_start_ms: u64,
    /// Set while a reparent is under way (free text naming it).
    #[serde(default)]
    pub reparent_in_progress: Option<String>,
    /// Highest term a recovery reserved (under the lock) before acting with it. A later
    /// recovery must use a higher term, so an orchestrator that lost its lock mid-way can never
    /// have a promotion of its term accepted next to another one's.
    #[serde(default)]
    pub reserved_term: Term,
}

impl ShardRecord {
    /// A fresh shard: no primary, term 0.
    pub fn new(keyspace: impl Into<String>, shard: impl Into<String>) -> Self {
        ShardRecord {
            keyspace: keyspace.into(),
            shard: shard.into(),
            primary: None,
            term: Term::ZERO,
            term_start_ms: 0,
            reparent_in_progress: None,
            reserved_term: Term::ZERO,
        }
    }
}

/// One promotion, kept for good at `{p}/history/{ks}/{shard}/{term:020}`: which server became
/// primary at which term, from which position. Written by the promoted tablet's agent, create-only,
/// before its mysqld is made writable: a term can be given to one tablet only, and every
/// promotion that ever made a mysqld writable is on record (a later repoint cannot erase it).
/// The shard's history is also the reference for errant transactions: during a term only its
/// primary writes, so a transaction past the term's start position written by another server is
/// errant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRecord {
    pub keyspace: String,
    pub shard: String,
    pub term: Term,
    /// Alias of the tablet promoted.
    pub primary: String,
    /// Its writer id: server_id (MariaDB) or server_uuid (MySQL).
    pub writer: String,
    /// Its GTID position when it became primary (replication stopped, before writable).
    pub position: String,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Who asked (the orchestrator's actor name, or `bootstrap` for a first primary).
    pub by: String,
    /// The shard-lock epoch of the request (0 without a lock: a bootstrap).
    #[serde(default)]
    pub lock_epoch: u64,
    /// The primary's agent follows the isolation rule ([`SELF_DEMOTE_PEER_WINDOW`]): it makes
    /// its mysqld read-only before its registration lease can expire unless another tablet of
    /// the shard answers it. Recorded here, durably, because an orchestrator needs it exactly
    /// when that registration is gone. `false` in records of agents that do not.
    #[serde(default)]
    pub self_demotes: bool,
}

/// The role a tablet registers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TabletType {
    Primary,
    #[default]
    Replica,
}

/// Whether the orchestrator may promote a tablet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromotionRule {
    Prefer,
    #[default]
    Neutral,
    MustNot,
}

macro_rules! string_enum {
    ($ty:ident, $what:literal, $( $variant:ident => $s:literal ),+ $(,)?) => {
        impl $ty {
            /// All accepted spellings, in declaration order.
            pub const ALLOWED: &'static [&'static str] = &[$($s),+];

            /// The canonical (serialized) spelling.
            pub fn as_str(&self) -> &'static str {
                match self { $( $ty::$variant => $s ),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = ParseError;

            fn from_str(s: &str) -> Result<Self, ParseError> {
                match s.trim() {
                    $( $s => Ok($ty::$variant), )+
                    _ => Err(ParseError {
                        what: $what,
                        value: s.to_string(),
                        expected: format!("one of {}", $ty::ALLOWED.join(", ")),
                    }),
                }
            }
        }
    };
}

string_enum!(Durability, "durability", None => "none", SemiSync => "semi_sync");
string_enum!(TabletType, "tablet type", Primary => "primary", Replica => "replica");
string_enum!(PromotionRule, "promotion rule", Prefer => "prefer", Neutral => "neutral", MustNot => "must_not");

/// `{p}/tablets/{alias}`, registered under the agent's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TabletRecord {
    /// `{cell}-{uid}`.
    pub alias: String,
    pub cell: String,
    pub uid: u32,
    pub keyspace: String,
    pub shard: String,
    pub tablet_type: TabletType,
    pub mysql_host: String,
    pub mysql_port: u16,
    #[serde(default)]
    pub mysql_socket: Option<String>,
    /// `host:port` of the agent's gRPC server.
    pub grpc_addr: String,
    /// `host:port` of the agent's HTTP server (/metrics, /health).
    #[serde(default)]
    pub http_addr: Option<String>,
    pub promotion_rule: PromotionRule,
    /// When this registration was made (ms since the Unix epoch).
    pub registered_ms: u64,
}

/// The contract between a primary's agent and an orchestrator that can neither see nor fence
/// that primary (Patroni's rule: a leader demotes itself before the lease others rely on can
/// expire). The agent of a writable primary makes its mysqld read-only once both hold:
/// - its registration lease is about to run out (etcd has not answered its renewals), and
/// - no other tablet of its shard has answered it for this window.
///
/// So an orchestrator may take such a primary as fenced once its registration is gone from
/// etcd (the lease expired: etcd's clock, no local one) and every replica has failed to reach
/// it for this window plus a margin: by then its agent, if alive, has demoted it. That is what
/// lets durability `none`, where nothing else stops an isolated primary's writes, fail over a
/// silent host safely, at the cost of waiting for the lease. Not covered: an agent that is itself
/// dead while its mysqld still serves clients that no replica can reach (a double fault).
pub const SELF_DEMOTE_PEER_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Value of the owner key of a shard lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Who holds it (free text, e.g. `orchestrator@host:pid`).
    pub holder: String,
    /// Why (e.g. `emergency reparent`).
    pub purpose: String,
    pub acquired_ms: u64,
}

/// One line of a shard's audit log, `{p}/audit/{ks}/{shard}/{ms:020}-{seq}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub term: Term,
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub tablet: Option<String>,
    pub outcome: String,
    pub detail: String,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

/// `{p}/quarantine/{alias}`: the tablet is kept out of promotion (orchestrator) and routing
/// (gateway) until the key is deleted (released). Written by the orchestrator's repair when a
/// deposed primary holds transactions the current primary lacks, or by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub reason: String,
    /// When it was quarantined (ms since the Unix epoch).
    pub at_ms: u64,
    /// The shard's term when it was quarantined.
    pub term: Term,
    /// Who quarantined it (an operator's name or address); absent for the orchestrator's own
    /// repairs and for records written before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl QuarantineRecord {
    /// The record in words, for analysis problems and routing exclusions.
    pub fn describe(&self) -> String {
        let by = self
            .by
            .as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default();
        format!(
            "{} (quarantined{by} at term {}, {} ms)",
            self.reason, self.term, self.at_ms
        )
    }
}

/// `{cell}-{uid}`, e.g. `zone1-101`.
pub fn alias(cell: &str, uid: u32) -> String {
    format!("{cell}-{uid}")
}

/// Splits `zone1-101` into `("zone1", 101)`. The cell may itself contain dashes: the uid is
/// what follows the last one.
pub fn parse_alias(alias: &str) -> Result<(String, u32), ParseError> {
    let err = || ParseError {
        what: "tablet alias",
        value: alias.to_string(),
        expected: "{cell}-{uid} with a non-empty cell and a decimal u32 uid, e.g. zone1-101"
            .to_string(),
    };
    let (cell, uid) = alias.rsplit_once('-').ok_or_else(err)?;
    if cell.is_empty()
        || cell.contains('/')
        || uid.is_empty()
        || !uid.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(err());
    }
    let uid = uid.parse::<u32>().map_err(|_| err())?;
    Ok((cell.to_string(), uid))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tablet() -> TabletRecord {
        TabletRecord {
            alias: alias("zone1", 101),
            cell: "zone1".into(),
            uid: 101,
            keyspace: "commerce".into(),
            shard: "0".into(),
            tablet_type: TabletType::Replica,
            mysql_host: "127.0.0.1".into(),
            mysql_port: 3307,
            mysql_socket: Some("/tmp/mysqld.sock".into()),
            grpc_addr: "127.0.0.1:15999".into(),
            http_addr: None,
            promotion_rule: PromotionRule::MustNot,
            registered_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn enums_serialize_as_design_says() {
        assert_eq!(
            serde_json::to_string(&Durability::None).unwrap(),
            "\"none\""
        );
        assert_eq!(
            serde_json::to_string(&Durability::SemiSync).unwrap(),
            "\"semi_sync\""
        );
        assert_eq!(
            serde_json::to_string(&TabletType::Primary).unwrap(),
            "\"primary\""
        );
        assert_eq!(
            serde_json::to_string(&TabletType::Replica).unwrap(),
            "\"replica\""
        );
        assert_eq!(
            serde_json::to_string(&PromotionRule::Prefer).unwrap(),
            "\"prefer\""
        );
        assert_eq!(
            serde_json::to_string(&PromotionRule::Neutral).unwrap(),
            "\"neutral\""
        );
        assert_eq!(
            serde_json::to_string(&PromotionRule::MustNot).unwrap(),
            "\"must_not\""
        );
        for s in Durability::ALLOWED {
            let d: Durability = s.parse().unwrap();
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{s}\""));
            assert_eq!(d.to_string(), *s);
        }
        for s in PromotionRule::ALLOWED {
            let p: PromotionRule = s.parse().unwrap();
            assert_eq!(
                serde_json::from_str::<PromotionRule>(&format!("\"{s}\"")).unwrap(),
                p
            );
        }
        for s in TabletType::ALLOWED {
            let t: TabletType = s.parse().unwrap();
            assert_eq!(t.as_str(), *s);
        }
    }

    #[test]
    fn from_str_errors_name_allowed_values() {
        let e = "semisync".parse::<Durability>().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("durability"), "{msg}");
        assert!(msg.contains("\"semisync\""), "{msg}");
        assert!(msg.contains("none, semi_sync"), "{msg}");
        let msg = "master".parse::<TabletType>().unwrap_err().to_string();
        assert!(msg.contains("primary, replica"), "{msg}");
        let msg = "never".parse::<PromotionRule>().unwrap_err().to_string();
        assert!(msg.contains("prefer, neutral, must_not"), "{msg}");
        assert_eq!(
            " semi_sync ".parse::<Durability>().unwrap(),
            Durability::SemiSync
        );
        assert!("SemiSync".parse::<Durability>().is_err());
    }

    #[test]
    fn record_round_trips() {
        let t = tablet();
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("\"tablet_type\":\"replica\""), "{json}");
        assert!(json.contains("\"promotion_rule\":\"must_not\""), "{json}");
        assert_eq!(serde_json::from_str::<TabletRecord>(&json).unwrap(), t);

        let ks = KeyspaceRecord {
            name: "commerce".into(),
            durability: Durability::SemiSync,
        };
        let json = serde_json::to_string(&ks).unwrap();
        assert_eq!(json, r#"{"name":"commerce","durability":"semi_sync"}"#);
        assert_eq!(serde_json::from_str::<KeyspaceRecord>(&json).unwrap(), ks);

        let mut sh = ShardRecord::new("commerce", "-80");
        assert_eq!(sh.term, Term::ZERO);
        assert_eq!(sh.primary, None);
        sh.primary = Some("zone1-101".into());
        sh.term = Term::new(3);
        sh.term_start_ms = 42;
        sh.reparent_in_progress = Some("ers by orch".into());
        let json = serde_json::to_string(&sh).unwrap();
        assert_eq!(serde_json::from_str::<ShardRecord>(&json).unwrap(), sh);

        let cell = CellRecord {
            name: "zone1".into(),
        };
        assert_eq!(serde_json::to_string(&cell).unwrap(), r#"{"name":"zone1"}"#);

        let li = LockInfo {
            holder: "orch-1".into(),
            purpose: "ers".into(),
            acquired_ms: 5,
        };
        let json = serde_json::to_string(&li).unwrap();
        assert_eq!(serde_json::from_str::<LockInfo>(&json).unwrap(), li);

        let a = AuditEntry {
            at_ms: 1,
            term: Term::new(2),
            actor: "orch".into(),
            action: "promote".into(),
            tablet: Some("zone1-102".into()),
            outcome: "ok".into(),
            detail: "gtid caught up".into(),
            duration_ms: Some(120),
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<AuditEntry>(&json).unwrap(), a);
    }

    #[test]
    fn optional_fields_may_be_missing() {
        let json = r#"{"keyspace":"ks","shard":"0","term":0,"term_start_ms":0}"#;
        let sh: ShardRecord = serde_json::from_str(json).unwrap();
        assert_eq!(sh, ShardRecord::new("ks", "0"));
        let json = r#"{"alias":"z-1","cell":"z","uid":1,"keyspace":"ks","shard":"0",
            "tablet_type":"primary","mysql_host":"h","mysql_port":1,"grpc_addr":"g",
            "promotion_rule":"prefer","registered_ms":0}"#;
        let t: TabletRecord = serde_json::from_str(json).unwrap();
        assert_eq!(t.mysql_socket, None);
        assert_eq!(t.http_addr, None);
        assert!(
            serde_json::from_str::<KeyspaceRecord>(r#"{"name":"a","durability":"x"}"#).is_err()
        );
    }

    #[test]
    fn quarantine_record_reads_old_values_and_describes_itself() {
        let old: QuarantineRecord =
            serde_json::from_str(r#"{"reason":"errant","at_ms":5,"term":3}"#).unwrap();
        assert_eq!(old.by, None);
        assert_eq!(old.describe(), "errant (quarantined at term 3, 5 ms)");
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("by"), "{json}");
        let q = QuarantineRecord {
            by: Some("alice".into()),
            ..old
        };
        assert_eq!(
            q.describe(),
            "errant (quarantined by alice at term 3, 5 ms)"
        );
        let back: QuarantineRecord =
            serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
        assert_eq!(back, q);
    }

    #[test]
    fn aliases() {
        assert_eq!(alias("zone1", 101), "zone1-101");
        assert_eq!(
            parse_alias("zone1-101").unwrap(),
            ("zone1".to_string(), 101)
        );
        assert_eq!(
            parse_alias("us-east-1-7").unwrap(),
            ("us-east-1".to_string(), 7)
        );
        assert_eq!(
            parse_alias(&alias("c", u32::MAX)).unwrap(),
            ("c".to_string(), u32::MAX)
        );
        for bad in [
            "zone1",
            "-101",
            "zone1-",
            "zone1-abc",
            "zone1-4294967296",
            "zone1-+1",
            "a/b-1",
            "",
        ] {
            let e = parse_alias(bad).unwrap_err();
            assert!(e.to_string().contains("zone1-101"), "{bad}: {e}");
        }
    }
}
