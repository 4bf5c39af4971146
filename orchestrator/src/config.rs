//! `orchestrator.toml`: parsed strictly (unknown keys refused), durations in humantime,
//! validated at start with the offending key named.
//!
//! ```toml
//! [orchestrator]
//! http_listen = "127.0.0.1:15000"   # /health, /metrics, /api/v1/...
//! health_stale_after = "1500ms"     # a tablet's health older than this is not fresh (agents push >= every 500ms)
//! api_token = "..."                 # legacy: one `operate` token named `api_token` (same as an api_tokens entry)
//! probe_stale_after = "1500ms"      # a replica's probe of the primary older than this confirms nothing
//! isolated_primary_after = "1s"     # every replica lost the primary (probe failing, no heartbeat for this long): fail over
//! writes_stalled_after = "2s"       # a primary whose heartbeat write is pending this long is reported (primary_writes_stalled)
//!
//! [recovery]
//! enabled = true                    # false: analyse and report only, never act
//! lock_ttl = "5s"                   # lease of the shard lock: how long it outlives a dead orchestrator
//! lock_wait = "200ms"               # wait this long for a shard lock held by another instance, then skip
//! action_timeout = "5s"             # bound of every agent action
//! relay_log_wait = "30s"            # emergency reparent: bound on the candidate applying all it received (size it for your largest transaction)
//! catch_up_timeout = "5s"           # emergency reparent: bound on the chosen candidate catching up
//! self_demotion_wait = "15s"        # durability none, old primary silent and unfenceable: wait at most this for its lease to expire (above the agents' etcd.lease_ttl)
//! flap_limit = 3                    # this many emergency reparents of a shard within flap_window ...
//! flap_window = "10m"               # ... stop its automatic recovery until acknowledged
//! planned_wait_timeout = "5s"       # operator reparents: default bound on the candidate reaching the demoted primary's position
//! planned_lock_timeout = "10s"      # operator reparents: default wait for a held shard lock (0s: do not wait; at most 1h)
//! planned_max_lag = "5s"            # planned reparent: default bound on the candidate's lag (more: refused up front)
//! audit_keep = 10000                # per shard: the audit log keeps the newest this many entries ...
//! audit_max_age = "30d"             # ... and none older than this
//! audit_prune_interval = "1m"       # how often each shard's audit log is pruned
//! failover_on_writes_stalled = "30s" # opt-in (unset: never): fail over a primary whose writes stall this long
//!
//! # API tokens (after the [orchestrator] keys): with any token configured, every /api/v1/...
//! # request needs `Authorization: Bearer <token>`; `read` may GET, `operate` may also
//! # POST/DELETE. None configured: the API is open, and http_listen must be a loopback address.
//! [[orchestrator.api_tokens]]
//! name = "ops"                      # [A-Za-z0-9_.-], unique; audit actor `token:ops from <ip>`
//! role = "operate"                  # read | operate
//! token = "..."                     # exactly one of token / token_file
//! [[orchestrator.api_tokens]]
//! name = "grafana"
//! role = "read"
//! token_file = "/etc/myha/grafana.token"  # read at start, surrounding whitespace trimmed
//!
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]
//! prefix = "/myha"
//! dial_timeout = "2s"
//!
//! [log]
//! format = "human"                  # human | json
//! level = "info"
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{EtcdSection, LogSection};
use serde::{Deserialize, Serialize};

use crate::analysis::AnalysisConfig;
use crate::auth::{ApiToken, Role, Secret};
use crate::recovery::{AuditRetention, RecoveryConfig};

/// Why a config is refused: the shared loading and section errors, or a setting of this
/// daemon's whose key is only known at run time (`orchestrator.api_tokens[1].name`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Daemon(#[from] daemon::ConfigError),
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    #[serde(default)]
    pub orchestrator: OrchestratorSection,
    #[serde(default)]
    pub recovery: RecoverySection,
    pub etcd: EtcdSection,
    /// This daemon's certificates for calling the agents' gRPC (required when the agents
    /// have `[tls]`): the cluster CA and a client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<pki::TlsFiles>,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorSection {
    /// `/health`, `/metrics`, `/api/v1/shards`.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// A tablet whose last health message is older than this is not fresh.
    #[serde(default = "default_health_stale_after", with = "humantime_serde")]
    pub health_stale_after: Duration,
    /// Legacy single token, kept working: the same as an `api_tokens` entry named `api_token`
    /// with the `operate` role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    /// A replica's probe of the primary older than this does not confirm a dead primary.
    #[serde(default = "default_probe_stale_after", with = "humantime_serde")]
    pub probe_stale_after: Duration,
    /// A primary its own agent still reaches, but that every replica has lost (their probes of
    /// its mysqld fail and none has received its heartbeat for this long), is failed over (P20).
    #[serde(default = "default_isolated_primary_after", with = "humantime_serde")]
    pub isolated_primary_after: Duration,
    /// A primary whose writes (its agent's heartbeat write) have been pending this long is
    /// reported as `primary_writes_stalled`, with what blocks them.
    #[serde(default = "default_writes_stalled_after", with = "humantime_serde")]
    pub writes_stalled_after: Duration,
    /// Serve the HTTP listener (API, dashboard, `/health`, `/metrics`) over HTTPS with this
    /// certificate and key. Optional: the tokens authenticate callers either way, but on a
    /// shared network without it they travel in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tls: Option<pki::ServerFiles>,
    /// Bearer tokens of the API, each with a role (see [`crate::auth`]). Any token configured
    /// (here or `api_token`): every `/api/v1/...` request needs one. None: the API is open,
    /// which the validation allows on a loopback `http_listen` only. Last: TOML writes arrays
    /// of tables after the section's plain keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_tokens: Vec<ApiTokenConfig>,
}

/// One `[[orchestrator.api_tokens]]` entry, as written (the secret inline or in a file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// Who holds it: the audit names `token:<name>`. `[A-Za-z0-9_.-]`, unique.
    pub name: String,
    pub role: Role,
    /// The secret itself (exactly one of `token` and `token_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the secret, read at start (surrounding whitespace trimmed), so that
    /// the secret can stay out of a world-readable config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// The name the legacy `api_token` goes by.
pub const LEGACY_TOKEN_NAME: &str = "api_token";
const MAX_TOKEN_NAME: usize = 64;

/// Whether the API on `ip` is reachable from this machine only (`0.0.0.0` and `::` are every
/// address, not loopback; `::ffff:127.0.0.1` is).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// A token's name: it is written into audit actors (`token:<name> from <ip>`), so a plain word.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOKEN_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{name:?} is not a token name: 1 to {MAX_TOKEN_NAME} characters of \
                 [A-Za-z0-9_.-]"
            ),
        ))
    }
}

/// A secret must be something a client can send as `Bearer <token>`: one non-empty word.
/// The message never quotes it.
fn check_secret(key: &str, secret: &str, hint: &str) -> Result<(), ConfigError> {
    if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            key,
            format!("must be non-empty and without whitespace ({hint})"),
        ));
    }
    Ok(())
}

fn default_isolated_primary_after() -> Duration {
    AnalysisConfig::default().isolated_primary_after
}
fn default_writes_stalled_after() -> Duration {
    AnalysisConfig::default().writes_stalled_after
}

/// `[recovery]`: what the orchestrator may do and how long each step may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecoverySection {
    /// `false`: analyse and report, never act.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// TTL of the shard lock's lease.
    #[serde(default = "default_lock_ttl", with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// How long to wait for a shard lock held by someone else before skipping.
    #[serde(default = "default_lock_wait", with = "humantime_serde")]
    pub lock_wait: Duration,
    /// Bound on every agent action.
    #[serde(default = "default_action_timeout", with = "humantime_serde")]
    pub action_timeout: Duration,
    /// Bound on the candidate (and a catch-up source) applying everything it received during an
    /// emergency reparent. Running out of it is a refusal (never a less advanced promotion), so
    /// it must fit the largest transaction's apply time; it costs nothing when the relay log is
    /// applied already. 30 s as Vitess's `--wait-replicas-timeout`.
    #[serde(default = "default_relay_log_wait", with = "humantime_serde")]
    pub relay_log_wait: Duration,
    /// Bound on the chosen candidate catching up from the most advanced replica.
    #[serde(default = "default_catch_up_timeout", with = "humantime_serde")]
    pub catch_up_timeout: Duration,
    /// Durability `none`, an old primary whose agent is silent and whose mysqld cannot be
    /// fenced over MySQL: the emergency reparent waits at most this long for that primary's
    /// registration lease to expire (then its agent, if alive, has demoted it:
    /// `topo::SELF_DEMOTE_PEER_WINDOW`), else refuses. Above the agents' `etcd.lease_ttl`.
    #[serde(default = "default_self_demotion_wait", with = "humantime_serde")]
    pub self_demotion_wait: Duration,
    /// Emergency reparents within `flap_window` that make a shard flapping.
    #[serde(default = "default_flap_limit")]
    pub flap_limit: u32,
    #[serde(default = "default_flap_window", with = "humantime_serde")]
    pub flap_window: Duration,
    /// Operator reparents: default `wait_timeout` (the candidate reaching the position).
    #[serde(default = "default_planned_wait_timeout", with = "humantime_serde")]
    pub planned_wait_timeout: Duration,
    /// Operator reparents: default `lock_timeout` (waiting for a held shard lock).
    #[serde(default = "default_planned_lock_timeout", with = "humantime_serde")]
    pub planned_lock_timeout: Duration,
    /// Planned reparents: default `max_lag` of the candidate.
    #[serde(default = "default_planned_max_lag", with = "humantime_serde")]
    pub planned_max_lag: Duration,
    /// Per shard, the audit log keeps its newest `audit_keep` entries ...
    #[serde(default = "default_audit_keep")]
    pub audit_keep: usize,
    /// ... none older than this ...
    #[serde(default = "default_audit_max_age", with = "humantime_serde")]
    pub audit_max_age: Duration,
    /// ... pruned at most this often per shard.
    #[serde(default = "default_audit_prune_interval", with = "humantime_serde")]
    pub audit_prune_interval: Duration,
    /// Opt-in: a primary whose writes have been stalled this long (its heartbeat write pending:
    /// a global read lock, a stalled disk, semi-sync waiting for acks) is failed over
    /// (`stalled_primary`). Unset, the default: stalls are reported only
    /// (`primary_writes_stalled`), never failed over.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub failover_on_writes_stalled: Option<Duration>,
}

fn default_audit_keep() -> usize {
    AuditRetention::default().keep
}
fn default_audit_max_age() -> Duration {
    AuditRetention::default().max_age
}
fn default_audit_prune_interval() -> Duration {
    AuditRetention::default().prune_interval
}

fn default_true() -> bool {
    true
}
fn default_lock_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_lock_wait() -> Duration {
    Duration::from_millis(200)
}
fn default_action_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_relay_log_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_catch_up_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_self_demotion_wait() -> Duration {
    Duration::from_secs(15)
}
fn default_flap_limit() -> u32 {
    3
}
fn default_flap_window() -> Duration {
    Duration::from_secs(600)
}
fn default_planned_wait_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_planned_lock_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_planned_max_lag() -> Duration {
    Duration::from_secs(5)
}

/// Upper bound of `recovery.planned_lock_timeout` (and of a request's `lock_timeout`).
pub const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for RecoverySection {
    fn default() -> Self {
        RecoverySection {
            enabled: true,
            lock_ttl: default_lock_ttl(),
            lock_wait: default_lock_wait(),
            action_timeout: default_action_timeout(),
            relay_log_wait: default_relay_log_wait(),
            catch_up_timeout: default_catch_up_timeout(),
            self_demotion_wait: default_self_demotion_wait(),
            flap_limit: default_flap_limit(),
            flap_window: default_flap_window(),
            planned_wait_timeout: default_planned_wait_timeout(),
            planned_lock_timeout: default_planned_lock_timeout(),
            planned_max_lag: default_planned_max_lag(),
            audit_keep: default_audit_keep(),
            audit_max_age: default_audit_max_age(),
            audit_prune_interval: default_audit_prune_interval(),
            failover_on_writes_stalled: None,
        }
    }
}

pub const DEFAULT_HTTP_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 15000);
pub const DEFAULT_HEALTH_STALE_AFTER: Duration = Duration::from_millis(1500);
pub const DEFAULT_PROBE_STALE_AFTER: Duration = Duration::from_millis(1500);

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(DEFAULT_HTTP_LISTEN)
}
fn default_health_stale_after() -> Duration {
    DEFAULT_HEALTH_STALE_AFTER
}
fn default_probe_stale_after() -> Duration {
    DEFAULT_PROBE_STALE_AFTER
}

impl Default for OrchestratorSection {
    fn default() -> Self {
        OrchestratorSection {
            http_listen: default_http_listen(),
            health_stale_after: default_health_stale_after(),
            api_token: None,
            probe_stale_after: default_probe_stale_after(),
            isolated_primary_after: default_isolated_primary_after(),
            writes_stalled_after: default_writes_stalled_after(),
            api_tls: None,
            api_tokens: Vec::new(),
        }
    }
}

impl OrchestratorConfig {
    pub fn load(path: &Path) -> Result<OrchestratorConfig, ConfigError> {
        let cfg: OrchestratorConfig = daemon::load_toml(path)?;
        cfg.validate()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        cfg.api_tls_config()?;
        Ok(cfg)
    }

    /// Parses and validates a config text (what [`OrchestratorConfig::load`] does to a file).
    pub fn parse(text: &str) -> Result<OrchestratorConfig, ConfigError> {
        let cfg: OrchestratorConfig = daemon::parse_toml(text)?;
        cfg.validate()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        cfg.api_tls_config()?;
        Ok(cfg)
    }

    /// The HTTPS server config of `[orchestrator.api_tls]`, if any (its files read and
    /// checked; errors name the key).
    pub fn api_tls_config(
        &self,
    ) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>, ConfigError> {
        self.orchestrator
            .api_tls
            .as_ref()
            .map(|f| {
                f.server_config([
                    "orchestrator.api_tls.cert_file",
                    "orchestrator.api_tls.key_file",
                ])
                .map_err(|e| match e {
                    pki::PkiError::File { key, message } => invalid(key, message),
                    other => invalid("orchestrator.api_tls", other.to_string()),
                })
            })
            .transpose()
    }

    /// The config as `orchestrator.toml` text (what the harness writes).
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.recovery;
        daemon::require_positive(&[
            (
                "orchestrator.health_stale_after",
                self.orchestrator.health_stale_after,
            ),
            (
                "orchestrator.probe_stale_after",
                self.orchestrator.probe_stale_after,
            ),
            (
                "orchestrator.isolated_primary_after",
                self.orchestrator.isolated_primary_after,
            ),
            (
                "orchestrator.writes_stalled_after",
                self.orchestrator.writes_stalled_after,
            ),
            ("recovery.lock_wait", r.lock_wait),
            ("recovery.action_timeout", r.action_timeout),
            ("recovery.relay_log_wait", r.relay_log_wait),
            ("recovery.catch_up_timeout", r.catch_up_timeout),
            ("recovery.self_demotion_wait", r.self_demotion_wait),
            ("recovery.flap_window", r.flap_window),
            ("recovery.planned_wait_timeout", r.planned_wait_timeout),
            ("recovery.planned_max_lag", r.planned_max_lag),
            ("recovery.audit_max_age", r.audit_max_age),
        ])?;
        if r.audit_keep == 0 {
            return Err(invalid(
                "recovery.audit_keep",
                "must be at least 1 (the audit log explains every decision)",
            ));
        }
        if r.planned_lock_timeout > MAX_LOCK_TIMEOUT {
            return Err(invalid(
                "recovery.planned_lock_timeout",
                "must be at most 1h (0s: do not wait for a held lock)",
            ));
        }
        if r.lock_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "recovery.lock_ttl",
                "must be at least 1s (etcd leases have 1 s granularity)",
            ));
        }
        if let Some(b) = r.failover_on_writes_stalled {
            if b < self.orchestrator.writes_stalled_after {
                return Err(invalid(
                    "recovery.failover_on_writes_stalled",
                    format!(
                        "must be at least orchestrator.writes_stalled_after ({}): a stall is reported before it is failed over (leave it out to never fail over on a stall)",
                        humantime::format_duration(self.orchestrator.writes_stalled_after)
                    ),
                ));
            }
        }
        if r.flap_limit == 0 {
            return Err(invalid("recovery.flap_limit", "must be at least 1"));
        }
        let tokens = self.api_tokens()?;
        let listen = self.orchestrator.http_listen;
        if tokens.is_empty() && !is_loopback(listen.ip()) {
            // Anyone who reaches an open API can disable recoveries, quarantine tablets and
            // move primaries: an open API is for this machine only.
            return Err(invalid(
                "orchestrator.http_listen",
                format!(
                    "{listen} is not a loopback address and no API token is configured: \
                     configure `orchestrator.api_tokens` (or `orchestrator.api_token`), or bind \
                     to 127.0.0.1"
                ),
            ));
        }
        self.etcd.validate()?;
        self.log.validate()?;
        Ok(())
    }

    /// Every configured token, validated, token files read: the legacy `api_token` first
    /// (named [`LEGACY_TOKEN_NAME`], role `operate`), then `api_tokens` in order. Errors name
    /// the key, e.g. `orchestrator.api_tokens[1].token_file`, never a secret.
    pub fn api_tokens(&self) -> Result<Vec<ApiToken>, ConfigError> {
        let o = &self.orchestrator;
        let mut out: Vec<ApiToken> = Vec::new();
        // Secret -> the key of the token that has it, to refuse a duplicate by name.
        let mut keys: BTreeMap<String, String> = BTreeMap::new();
        let mut add = |key: String, name: &str, role: Role, secret: Secret| {
            if let Some(first) = keys.get(secret.expose()) {
                return Err(invalid(
                    key,
                    format!(
                        "the same secret as `{first}`: each token must identify one client \
                         (the audit names it)"
                    ),
                ));
            }
            keys.insert(secret.expose().to_string(), key);
            out.push(ApiToken {
                name: name.to_string(),
                role,
                secret,
            });
            Ok(())
        };
        if let Some(t) = &o.api_token {
            let key = "orchestrator.api_token";
            check_secret(key, t.expose(), "or leave it out: no token")?;
            add(key.to_string(), LEGACY_TOKEN_NAME, Role::Operate, t.clone())?;
        }
        for (i, t) in o.api_tokens.iter().enumerate() {
            let at = format!("orchestrator.api_tokens[{i}]");
            check_name(&format!("{at}.name"), &t.name)?;
            let taken = (o.api_token.is_some() && t.name == LEGACY_TOKEN_NAME)
                || o.api_tokens[..i].iter().any(|p| p.name == t.name);
            if taken {
                return Err(invalid(
                    format!("{at}.name"),
                    format!(
                        "`{}` is the name of another token (`api_token` counts as one named \
                         `{LEGACY_TOKEN_NAME}`): names identify the caller in the audit",
                        t.name
                    ),
                ));
            }
            let (key, secret) = match (&t.token, &t.token_file) {
                (Some(s), None) => (format!("{at}.token"), s.clone()),
                (None, Some(path)) => {
                    let key = format!("{at}.token_file");
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        invalid(key.clone(), format!("cannot read {}: {e}", path.display()))
                    })?;
                    (key, Secret::new(text.trim()))
                }
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(at, "give exactly one of `token` and `token_file`"))
                }
            };
            check_secret(&key, secret.expose(), "a token is a single word")?;
            add(key, &t.name, t.role, secret)?;
        }
        Ok(out)
    }

    /// The token a client on this machine uses with this config (the harness, a sandbox's
    /// myhactl): `api_token`, else the first inline `operate` token, else the first inline
    /// token; `None` without an inline token.
    pub fn client_token(&self) -> Option<&str> {
        let o = &self.orchestrator;
        let inline = |role: Option<Role>| {
            o.api_tokens
                .iter()
                .filter(|t| role.is_none_or(|r| t.role == r))
                .find_map(|t| t.token.as_ref())
        };
        o.api_token
            .as_ref()
            .or_else(|| inline(Some(Role::Operate)))
            .or_else(|| inline(None))
            .map(Secret::expose)
    }

    /// The analysis thresholds.
    pub fn analysis(&self) -> AnalysisConfig {
        AnalysisConfig {
            health_stale_after: self.orchestrator.health_stale_after,
            probe_stale_after: self.orchestrator.probe_stale_after,
            isolated_primary_after: self.orchestrator.isolated_primary_after,
            writes_stalled_after: self.orchestrator.writes_stalled_after,
            stalled_failover_after: self.recovery.failover_on_writes_stalled,
            ..AnalysisConfig::default()
        }
    }

    /// Everything a recovery needs to know.
    pub fn recovery_config(&self) -> RecoveryConfig {
        let r = &self.recovery;
        RecoveryConfig {
            enabled: r.enabled,
            lock_ttl: r.lock_ttl,
            lock_wait: r.lock_wait,
            action_timeout: r.action_timeout,
            relay_log_wait: r.relay_log_wait,
            catch_up_timeout: r.catch_up_timeout,
            self_demotion_wait: r.self_demotion_wait,
            flap_limit: r.flap_limit,
            flap_window: r.flap_window,
            planned_wait_timeout: r.planned_wait_timeout,
            planned_lock_timeout: r.planned_lock_timeout,
            planned_max_lag: r.planned_max_lag,
            analysis: self.analysis(),
            audit: AuditRetention {
                keep: r.audit_keep,
                max_age: r.audit_max_age,
                prune_interval: r.audit_prune_interval,
            },
            ..RecoveryConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = OrchestratorConfig::parse(MINIMAL).expect("parses");
        assert_eq!(
            cfg.orchestrator.http_listen,
            "127.0.0.1:15000".parse().unwrap()
        );
        assert_eq!(
            cfg.orchestrator.health_stale_after,
            Duration::from_millis(1500)
        );
        assert_eq!(cfg.etcd.prefix, "/myha");
        assert_eq!(cfg.etcd.dial_timeout, Duration::from_secs(2));
        assert_eq!(cfg.log, LogSection::default());
        let r = &cfg.recovery;
        assert!(r.enabled);
        assert_eq!(
            (r.lock_ttl, r.lock_wait, r.action_timeout),
            (
                Duration::from_secs(5),
                Duration::from_millis(200),
                Duration::from_secs(5)
            )
        );
        assert_eq!(
            (r.relay_log_wait, r.catch_up_timeout),
            (Duration::from_secs(30), Duration::from_secs(5))
        );
        assert_eq!((r.flap_limit, r.flap_window), (3, Duration::from_secs(600)));
        assert_eq!(
            (
                r.planned_wait_timeout,
                r.planned_lock_timeout,
                r.planned_max_lag
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(10),
                Duration::from_secs(5)
            )
        );
        let rc = cfg.recovery_config();
        assert_eq!(rc.planned_lock_timeout, Duration::from_secs(10));
        assert_eq!(rc.analysis.probe_stale_after, Duration::from_millis(1500));
        assert_eq!(rc.lock_ttl, Duration::from_secs(5));
    }

    #[test]
    fn full_config_parses_and_round_trips() {
        let text = r#"
[orchestrator]
http_listen = "0.0.0.0:16000"
health_stale_after = "2s 500ms"
probe_stale_after = "1s"
api_token = "s3cret"

[recovery]
enabled = false
lock_ttl = "3s"
lock_wait = "100ms"
action_timeout = "2s"
relay_log_wait = "1s"
catch_up_timeout = "3s"
flap_limit = 5
flap_window = "1h"
planned_wait_timeout = "2s"
planned_lock_timeout = "0s"
planned_max_lag = "500ms"

[etcd]
endpoints = ["http://10.0.0.1:2379", "10.0.0.2:2379"]
prefix = "/prod"
dial_timeout = "750ms"

[log]
format = "json"
level = "debug,h2=info"
"#;
        let cfg = OrchestratorConfig::parse(text).expect("parses");
        assert_eq!(
            cfg.orchestrator.health_stale_after,
            Duration::from_millis(2500)
        );
        assert_eq!(cfg.log.format, daemon::LogFormat::Json);
        assert_eq!(
            cfg.orchestrator.api_token.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(cfg.recovery.planned_lock_timeout, Duration::ZERO);
        assert_eq!(cfg.recovery.planned_max_lag, Duration::from_millis(500));
        assert_eq!(
            OrchestratorConfig::parse(&cfg.to_toml()).expect("reparses"),
            cfg
        );
    }

    fn err(text: &str) -> String {
        OrchestratorConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(&format!("{MINIMAL}prefx = \"/x\"\n"));
        assert!(e.contains("prefx"), "{e}");
        let e = err(&format!(
            "[orchestrator]\nlisten = \"127.0.0.1:1\"\n{MINIMAL}"
        ));
        assert!(e.contains("listen"), "{e}");
        let e = err(&format!("{MINIMAL}[analysis]\nenabled = true\n"));
        assert!(e.contains("analysis"), "{e}");
        let e = err(&format!("[recovery]\nflap_limt = 3\n{MINIMAL}"));
        assert!(e.contains("flap_limt"), "{e}");
    }

    #[test]
    fn bad_recovery_values_are_named() {
        for (text, key) in [
            ("lock_ttl = \"500ms\"", "`recovery.lock_ttl`"),
            ("lock_wait = \"0s\"", "`recovery.lock_wait`"),
            ("action_timeout = \"0s\"", "`recovery.action_timeout`"),
            ("relay_log_wait = \"0s\"", "`recovery.relay_log_wait`"),
            ("catch_up_timeout = \"0s\"", "`recovery.catch_up_timeout`"),
            ("flap_window = \"0s\"", "`recovery.flap_window`"),
            ("flap_limit = 0", "`recovery.flap_limit`"),
            (
                "planned_wait_timeout = \"0s\"",
                "`recovery.planned_wait_timeout`",
            ),
            ("planned_max_lag = \"0s\"", "`recovery.planned_max_lag`"),
            (
                "planned_lock_timeout = \"2h\"",
                "`recovery.planned_lock_timeout`",
            ),
            (
                // Below orchestrator.writes_stalled_after (2 s by default).
                "failover_on_writes_stalled = \"1s\"",
                "`recovery.failover_on_writes_stalled`",
            ),
        ] {
            let e = err(&format!("[recovery]\n{text}\n{MINIMAL}"));
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = err(&format!(
            "[recovery]\nrelay_log_wait = \"later\"\n{MINIMAL}"
        ));
        assert!(e.contains("relay_log_wait"), "{e}");
        let e = err(&format!(
            "[orchestrator]\nprobe_stale_after = \"0s\"\n{MINIMAL}"
        ));
        assert!(e.contains("`orchestrator.probe_stale_after`"), "{e}");
    }

    #[test]
    fn the_stall_failover_is_off_unless_asked_for() {
        let cfg = OrchestratorConfig::parse(MINIMAL).expect("minimal");
        assert_eq!(cfg.recovery.failover_on_writes_stalled, None);
        assert_eq!(cfg.analysis().stalled_failover_after, None);
        let cfg = OrchestratorConfig::parse(&format!(
            "[recovery]\nfailover_on_writes_stalled = \"30s\"\n{MINIMAL}"
        ))
        .expect("opted in");
        assert_eq!(
            cfg.analysis().stalled_failover_after,
            Some(Duration::from_secs(30))
        );
        let again = OrchestratorConfig::parse(&cfg.to_toml()).expect("round trip");
        assert_eq!(again, cfg);
    }

    #[test]
    fn bad_values_are_named() {
        let e = err(&format!(
            "[orchestrator]\nhealth_stale_after = \"soon\"\n{MINIMAL}"
        ));
        assert!(e.contains("health_stale_after"), "{e}");
        let e = err(&format!(
            "[orchestrator]\nhealth_stale_after = \"0s\"\n{MINIMAL}"
        ));
        assert!(e.contains("`orchestrator.health_stale_after`"), "{e}");
        let e = err(&format!(
            "[orchestrator]\nhttp_listen = \"localhost\"\n{MINIMAL}"
        ));
        assert!(e.contains("http_listen"), "{e}");
        let e = err(&format!("{MINIMAL}dial_timeout = \"0ms\"\n"));
        assert!(e.contains("`etcd.dial_timeout`"), "{e}");
        let e = err(&format!("{MINIMAL}prefix = \"myha\"\n"));
        assert!(e.contains("`etcd.prefix`"), "{e}");
        let e = err(&format!("[orchestrator]\napi_token = \" \"\n{MINIMAL}"));
        assert!(e.contains("`orchestrator.api_token`"), "{e}");
        let e = err("[etcd]\nendpoints = []\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err("[etcd]\nendpoints = [\"\"]\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nlevel = \"[[\"\n"));
        assert!(e.contains("`log.level`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nformat = \"xml\"\n"));
        assert!(e.contains("format") || e.contains("xml"), "{e}");
    }

    /// A token file in the temp dir, removed on drop.
    struct TokenFile(PathBuf);

    impl TokenFile {
        fn new(name: &str, content: &str) -> TokenFile {
            let path =
                std::env::temp_dir().join(format!("myha-{}-{name}.token", std::process::id()));
            std::fs::write(&path, content).unwrap();
            TokenFile(path)
        }
    }

    impl Drop for TokenFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tokens_text(listen: &str, entries: &str) -> String {
        format!("[orchestrator]\nhttp_listen = {listen:?}\n{entries}\n{MINIMAL}")
    }

    #[test]
    fn api_tokens_parse_resolve_and_round_trip() {
        let file = TokenFile::new("grafana", "  file-secret\n");
        let text = tokens_text(
            "0.0.0.0:15000",
            &format!(
                r#"api_token = "legacy-secret"
[[orchestrator.api_tokens]]
name = "ops"
role = "operate"
token = "ops-secret"
[[orchestrator.api_tokens]]
name = "grafana.ro_1"
role = "read"
token_file = {:?}
"#,
                file.0
            ),
        );
        let cfg = OrchestratorConfig::parse(&text).expect("parses");
        let tokens = cfg.api_tokens().expect("resolves");
        let summary: Vec<(&str, Role, &str)> = tokens
            .iter()
            .map(|t| (t.name.as_str(), t.role, t.secret.expose()))
            .collect();
        assert_eq!(
            summary,
            [
                ("api_token", Role::Operate, "legacy-secret"),
                ("ops", Role::Operate, "ops-secret"),
                ("grafana.ro_1", Role::Read, "file-secret"),
            ]
        );
        assert_eq!(cfg.client_token(), Some("legacy-secret"));
        assert_eq!(
            OrchestratorConfig::parse(&cfg.to_toml()).expect("reparses"),
            cfg
        );
        // Secrets stay out of Debug output (the config and the resolved tokens).
        let dbg = format!("{cfg:?} {tokens:?}");
        for secret in ["legacy-secret", "ops-secret", "file-secret"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
        // Without the legacy token, the harness uses the first inline operate token.
        let mut cfg = cfg;
        cfg.orchestrator.api_token = None;
        assert_eq!(cfg.client_token(), Some("ops-secret"));
        cfg.orchestrator.api_tokens.remove(0);
        assert_eq!(cfg.client_token(), None);
    }

    #[test]
    fn bad_api_tokens_are_named_by_key() {
        let ok = "[[orchestrator.api_tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken = \"a\"\n";
        let missing = std::env::temp_dir().join("myha-no-such-dir/none.token");
        let empty = TokenFile::new("empty", " \n");
        for (entry, key, what) in [
            (
                "name = \"\"\nrole = \"read\"\ntoken = \"b\"".to_string(),
                "`orchestrator.api_tokens[1].name`",
                "not a token name",
            ),
            (
                "name = \"a b\"\nrole = \"read\"\ntoken = \"b\"".to_string(),
                "`orchestrator.api_tokens[1].name`",
                "[A-Za-z0-9_.-]",
            ),
            (
                "name = \"ops\"\nrole = \"read\"\ntoken = \"b\"".to_string(),
                "`orchestrator.api_tokens[1].name`",
                "name of another token",
            ),
            (
                "name = \"r\"\nrole = \"read\"".to_string(),
                "`orchestrator.api_tokens[1]`",
                "exactly one of `token` and `token_file`",
            ),
            (
                format!("name = \"r\"\nrole = \"read\"\ntoken = \"b\"\ntoken_file = {missing:?}"),
                "`orchestrator.api_tokens[1]`",
                "exactly one of",
            ),
            (
                format!("name = \"r\"\nrole = \"read\"\ntoken_file = {missing:?}"),
                "`orchestrator.api_tokens[1].token_file`",
                "cannot read",
            ),
            (
                format!("name = \"r\"\nrole = \"read\"\ntoken_file = {:?}", empty.0),
                "`orchestrator.api_tokens[1].token_file`",
                "non-empty",
            ),
            (
                "name = \"r\"\nrole = \"read\"\ntoken = \"two words\"".to_string(),
                "`orchestrator.api_tokens[1].token`",
                "without whitespace",
            ),
            (
                "name = \"r\"\nrole = \"read\"\ntoken = \"a\"".to_string(),
                "`orchestrator.api_tokens[1].token`",
                "same secret as `orchestrator.api_tokens[0].token`",
            ),
        ] {
            let text = tokens_text(
                "127.0.0.1:15000",
                &format!("{ok}[[orchestrator.api_tokens]]\n{entry}\n"),
            );
            let e = err(&text);
            assert!(e.contains(key) && e.contains(what), "{entry}: {e}");
        }
        // The legacy token's name is taken when it is set.
        let e = err(&tokens_text(
            "127.0.0.1:15000",
            "api_token = \"x\"\n[[orchestrator.api_tokens]]\nname = \"api_token\"\nrole = \"read\"\ntoken = \"y\"\n",
        ));
        assert!(e.contains("`orchestrator.api_tokens[0].name`"), "{e}");
        let e = err(&tokens_text(
            "127.0.0.1:15000",
            "api_token = \"x\"\n[[orchestrator.api_tokens]]\nname = \"n\"\nrole = \"read\"\ntoken = \"x\"\n",
        ));
        assert!(
            e.contains("`orchestrator.api_tokens[0].token`")
                && e.contains("`orchestrator.api_token`"),
            "{e}"
        );
        // serde names a bad role and an unknown field.
        let e = err(&tokens_text(
            "127.0.0.1:15000",
            "[[orchestrator.api_tokens]]\nname = \"n\"\nrole = \"admin\"\ntoken = \"x\"\n",
        ));
        assert!(e.contains("admin") && e.contains("operate"), "{e}");
        let e = err(&tokens_text(
            "127.0.0.1:15000",
            "[[orchestrator.api_tokens]]\nname = \"n\"\nrole = \"read\"\nsecret = \"x\"\n",
        ));
        assert!(e.contains("secret"), "{e}");
    }

    #[test]
    fn an_open_api_must_be_on_loopback() {
        for listen in [
            "0.0.0.0:15000",
            "[::]:15000",
            "10.0.0.5:15000",
            "[fe80::1]:1",
        ] {
            let e = err(&tokens_text(listen, ""));
            assert!(
                e.contains("`orchestrator.http_listen`")
                    && e.contains("not a loopback address")
                    && e.contains("orchestrator.api_tokens")
                    && e.contains("127.0.0.1"),
                "{listen}: {e}"
            );
        }
        for listen in [
            "127.0.0.1:15000",
            "127.0.0.2:1",
            "[::1]:15000",
            "[::ffff:127.0.0.1]:1",
        ] {
            OrchestratorConfig::parse(&tokens_text(listen, ""))
                .unwrap_or_else(|e| panic!("{listen}: {e}"));
        }
        // Any token, legacy or not, of any role, makes a non-loopback address acceptable.
        for tokens in [
            "api_token = \"x\"\n",
            "[[orchestrator.api_tokens]]\nname = \"g\"\nrole = \"read\"\ntoken = \"x\"\n",
        ] {
            OrchestratorConfig::parse(&tokens_text("0.0.0.0:15000", tokens))
                .unwrap_or_else(|e| panic!("{tokens}: {e}"));
        }
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
        assert!(!is_loopback("::".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
    }

    #[test]
    fn missing_etcd_is_named() {
        let e = err("[orchestrator]\n");
        assert!(e.contains("etcd"), "{e}");
    }
}
