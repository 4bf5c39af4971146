//! `orchestrator.toml`: parsed strictly (unknown keys refused), durations in humantime,
//! validated at start with the offending key named.
//!
//! ```toml
//! [orchestrator]
//! http_listen = "127.0.0.1:15000"   # /health, /metrics, /api/v1/shards
//! health_stale_after = "1500ms"     # a tablet's health older than this is not fresh (agents push >= every 500ms)
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
pub struct OrchestratorConfig {
    #[serde(default)]
    pub orchestrator: OrchestratorSection,
    pub etcd: EtcdSection,
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
}

pub const DEFAULT_HTTP_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 15000);
pub const DEFAULT_HEALTH_STALE_AFTER: Duration = Duration::from_millis(1500);

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(DEFAULT_HTTP_LISTEN)
}
fn default_health_stale_after() -> Duration {
    DEFAULT_HEALTH_STALE_AFTER
}

impl Default for OrchestratorSection {
    fn default() -> Self {
        OrchestratorSection {
            http_listen: default_http_listen(),
            health_stale_after: default_health_stale_after(),
        }
    }
}

impl OrchestratorConfig {
    pub fn load(path: &Path) -> Result<OrchestratorConfig, ConfigError> {
        let cfg: OrchestratorConfig = daemon::load_toml(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<OrchestratorConfig, ConfigError> {
        let cfg: OrchestratorConfig = daemon::parse_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[cfg(test)]
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        daemon::require_positive(&[(
            "orchestrator.health_stale_after",
            self.orchestrator.health_stale_after,
        )])?;
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
    }

    #[test]
    fn full_config_parses_and_round_trips() {
        let text = r#"
[orchestrator]
http_listen = "0.0.0.0:16000"
health_stale_after = "2s 500ms"

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
        let e = err("[etcd]\nendpoints = []\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err("[etcd]\nendpoints = [\"\"]\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nlevel = \"[[\"\n"));
        assert!(e.contains("`log.level`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nformat = \"xml\"\n"));
        assert!(e.contains("format") || e.contains("xml"), "{e}");
    }

    #[test]
    fn missing_etcd_is_named() {
        let e = err("[orchestrator]\n");
        assert!(e.contains("etcd"), "{e}");
    }
}
