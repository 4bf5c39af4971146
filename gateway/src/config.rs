//! `gateway.toml`: parsed strictly (unknown keys refused), durations in humantime, validated
//! at start with the offending key named.
//!
//! ```toml
//! [gateway]
//! admin_listen = "127.0.0.1:15100"  # /health, /metrics, /routing
//!
//! [routing]
//! health_stale_after = "1500ms"     # a tablet's health older than this is not fresh (agents push >= every 500ms)
//! max_replica_lag = "5s"            # replicas lagging this much or more get no reads
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

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use daemon::ConfigError;
use daemon::{EtcdSection, LogSection};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub routing: RoutingSection,
    pub etcd: EtcdSection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// `/health`, `/metrics`, `/routing`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
}

pub const DEFAULT_ADMIN_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 15100);

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(DEFAULT_ADMIN_LISTEN)
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            admin_listen: default_admin_listen(),
        }
    }
}

/// What [`crate::routing::route`] is allowed to pick.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// A tablet whose last health message is older than this gets no traffic.
    #[serde(default = "default_health_stale_after", with = "humantime_serde")]
    pub health_stale_after: Duration,
    /// Replicas whose lag is this or more get no reads.
    #[serde(default = "default_max_replica_lag", with = "humantime_serde")]
    pub max_replica_lag: Duration,
}

pub const DEFAULT_HEALTH_STALE_AFTER: Duration = Duration::from_millis(1500);
pub const DEFAULT_MAX_REPLICA_LAG: Duration = Duration::from_secs(5);

fn default_health_stale_after() -> Duration {
    DEFAULT_HEALTH_STALE_AFTER
}
fn default_max_replica_lag() -> Duration {
    DEFAULT_MAX_REPLICA_LAG
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            health_stale_after: default_health_stale_after(),
            max_replica_lag: default_max_replica_lag(),
        }
    }
}

impl RoutingSection {
    pub fn policy(&self) -> crate::routing::RoutingPolicy {
        crate::routing::RoutingPolicy {
            health_stale_after: self.health_stale_after,
            max_replica_lag: self.max_replica_lag,
        }
    }
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let cfg: GatewayConfig = daemon::load_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        let cfg: GatewayConfig = daemon::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[cfg(test)]
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        daemon::require_positive(&[
            (
                "routing.health_stale_after",
                self.routing.health_stale_after,
            ),
            ("routing.max_replica_lag", self.routing.max_replica_lag),
        ])?;
        self.etcd.validate()?;
        self.log.validate()
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
        let cfg = GatewayConfig::parse(MINIMAL).expect("parses");
        assert_eq!(cfg.gateway.admin_listen, "127.0.0.1:15100".parse().unwrap());
        assert_eq!(cfg.routing.health_stale_after, Duration::from_millis(1500));
        assert_eq!(cfg.routing.max_replica_lag, Duration::from_secs(5));
        assert_eq!(cfg.etcd.prefix, "/myha");
        assert_eq!(cfg.log, LogSection::default());
        let p = cfg.routing.policy();
        assert_eq!(
            (p.health_stale_after, p.max_replica_lag),
            (Duration::from_millis(1500), Duration::from_secs(5))
        );
    }

    #[test]
    fn full_config_parses_and_round_trips() {
        let text = r#"
[gateway]
admin_listen = "0.0.0.0:16100"

[routing]
health_stale_after = "3s"
max_replica_lag = "500ms"

[etcd]
endpoints = ["http://10.0.0.1:2379"]
prefix = "/prod"
dial_timeout = "1s"

[log]
format = "json"
level = "warn"
"#;
        let cfg = GatewayConfig::parse(text).expect("parses");
        assert_eq!(cfg.routing.max_replica_lag, Duration::from_millis(500));
        assert_eq!(cfg.gateway.admin_listen.port(), 16100);
        assert_eq!(GatewayConfig::parse(&cfg.to_toml()).expect("reparses"), cfg);
    }

    fn err(text: &str) -> String {
        GatewayConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(&format!(
            "[gateway]\nlisten_rw = \"127.0.0.1:1\"\n{MINIMAL}"
        ));
        assert!(e.contains("listen_rw"), "{e}");
        let e = err(&format!("[routing]\nmax_lag = \"1s\"\n{MINIMAL}"));
        assert!(e.contains("max_lag"), "{e}");
        let e = err(&format!("{MINIMAL}prefx = \"/x\"\n"));
        assert!(e.contains("prefx"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err(&format!(
            "[routing]\nmax_replica_lag = \"a while\"\n{MINIMAL}"
        ));
        assert!(e.contains("max_replica_lag"), "{e}");
        let e = err(&format!("[routing]\nmax_replica_lag = \"0s\"\n{MINIMAL}"));
        assert!(e.contains("`routing.max_replica_lag`"), "{e}");
        let e = err(&format!(
            "[routing]\nhealth_stale_after = \"0s\"\n{MINIMAL}"
        ));
        assert!(e.contains("`routing.health_stale_after`"), "{e}");
        let e = err(&format!("[gateway]\nadmin_listen = \"15100\"\n{MINIMAL}"));
        assert!(e.contains("admin_listen"), "{e}");
        let e = err(&format!("{MINIMAL}prefix = \"\"\n"));
        assert!(e.contains("`etcd.prefix`"), "{e}");
        let e = err("[etcd]\nendpoints = []\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err(&format!("{MINIMAL}dial_timeout = \"0s\"\n"));
        assert!(e.contains("`etcd.dial_timeout`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nlevel = \"[[\"\n"));
        assert!(e.contains("`log.level`"), "{e}");
    }

    #[test]
    fn missing_etcd_is_named() {
        let e = err("[gateway]\n");
        assert!(e.contains("etcd"), "{e}");
    }
}
