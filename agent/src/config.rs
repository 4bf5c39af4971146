//! `agent.toml`: parsed strictly (unknown keys refused), durations in humantime, validated at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::invalid;
pub use daemon::ConfigError;
pub use daemon::{EtcdSection, LogFormat, LogSection, Secret};
use serde::{Deserialize, Serialize};
use topo::PromotionRule;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub tablet: TabletSection,
    pub mysql: MysqlSection,
    #[serde(default)]
    pub agent: AgentSection,
    pub etcd: EtcdSection,
    /// The agent's gRPC certificates: with them, every caller must present a certificate of
    /// the cluster CA, and only the identities of `agent.grpc_allowed_clients` may call the
    /// mutating RPCs. Without them gRPC is plaintext, allowed on a loopback `grpc_listen` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<pki::TlsFiles>,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TabletSection {
    pub cell: String,
    pub uid: u32,
    pub keyspace: String,
    pub shard: String,
    #[serde(default = "default_promotion_rule")]
    pub promotion_rule: PromotionRule,
}

fn default_promotion_rule() -> PromotionRule {
    PromotionRule::Neutral
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlavorName {
    #[default]
    Mariadb,
    Mysql,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MysqlSection {
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    /// When set, the agent's own connection uses the socket; `host:port` is still what it advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    pub user: String,
    /// The agent user's password: here, or in a file (`password_file`) or an environment
    /// variable (`password_env`), resolved into this field at load.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub password: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    pub repl_user: String,
    /// The replication user's password (given to `CHANGE MASTER` on this tablet only; never
    /// written to etcd): here, in `repl_password_file` or in `repl_password_env`.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub repl_password: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repl_password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repl_password_env: Option<String>,
    #[serde(default)]
    pub flavor: FlavorName,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_query_timeout", with = "humantime_serde")]
    pub query_timeout: Duration,
    /// Replication over TLS with `[mysql.tls]`'s files (`CHANGE MASTER TO ... MASTER_SSL = 1`);
    /// unset: on when `[mysql.tls]` is given. See [`MysqlSection::replication_tls`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repl_tls: Option<bool>,
    /// `[mysql.tls]`: the agent's TCP connections to mysqld (its own, the probe of the
    /// primary, the fencing of another server) use TLS and verify the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<MysqlTls>,
}

/// `[mysql.tls]`. The paths are also given to this host's mysqld for replication
/// (`MASTER_SSL_CA`...), so they must be absolute and readable by mysqld too.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MysqlTls {
    /// The CA (PEM) the servers' certificates must chain to; the only one trusted.
    pub ca_file: PathBuf,
    /// A client certificate (PEM) and its key, for servers that ask for one: both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The server's certificate must name the host connected to (also
    /// `MASTER_SSL_VERIFY_SERVER_CERT`). Off, only the chain to `ca_file` is checked.
    #[serde(default = "default_true")]
    pub verify_identity: bool,
}

fn default_true() -> bool {
    true
}

impl MysqlTls {
    /// Each file is an absolute, readable, non-empty path (an error names its key); a client
    /// certificate comes with its key.
    fn validate(&self) -> Result<(), ConfigError> {
        let check = |key: &'static str, path: &Path| -> Result<(), ConfigError> {
            if !path.is_absolute() || path.to_str().is_none() {
                return Err(invalid(
                    key,
                    format!(
                        "{}: must be an absolute UTF-8 path (mysqld is given it for replication \
                         and resolves a relative one against its own directory)",
                        path.display()
                    ),
                ));
            }
            match std::fs::read(path) {
                Ok(bytes) if bytes.is_empty() => {
                    Err(invalid(key, format!("{} is empty", path.display())))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(invalid(key, format!("cannot read {}: {e}", path.display()))),
            }
        };
        check("mysql.tls.ca_file", &self.ca_file)?;
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                check("mysql.tls.cert_file", c)?;
                check("mysql.tls.key_file", k)
            }
            (Some(_), None) => Err(invalid(
                "mysql.tls.key_file",
                "missing: mysql.tls.cert_file needs its key",
            )),
            (None, Some(_)) => Err(invalid(
                "mysql.tls.cert_file",
                "missing: mysql.tls.key_file needs its certificate",
            )),
            (None, None) => Ok(()),
        }
    }
}

impl MysqlSection {
    /// The TLS of `CHANGE MASTER` on this tablet: `[mysql.tls]`'s files unless `repl_tls` is
    /// false. `None`: the agent names no TLS option (the server keeps what it was given).
    pub fn replication_tls(&self) -> Option<flavor::SourceTls> {
        let tls = self.tls.as_ref().filter(|_| self.repl_tls != Some(false))?;
        // Paths were checked to be UTF-8 at load.
        let text = |p: &Path| p.to_string_lossy().into_owned();
        Some(flavor::SourceTls {
            ca_file: text(&tls.ca_file),
            client_cert: tls
                .cert_file
                .as_deref()
                .zip(tls.key_file.as_deref())
                .map(|(c, k)| (text(c), text(k))),
            verify_server_cert: tls.verify_identity,
        })
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        match &self.tls {
            Some(tls) => tls.validate(),
            None if self.repl_tls == Some(true) => Err(invalid(
                "mysql.repl_tls",
                "true needs [mysql.tls] (at least ca_file: the CA the source's certificate \
                 must chain to)",
            )),
            None => Ok(()),
        }
    }

    /// Reads each password from where the config says (the config itself, a file or the
    /// environment) into `password` / `repl_password`; the file and variable settings are
    /// cleared, as they are now folded in.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        self.password = daemon::SecretSource {
            keys: [
                "mysql.password",
                "mysql.password_file",
                "mysql.password_env",
            ],
            inline: &self.password,
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
        .resolve()?;
        self.repl_password = daemon::SecretSource {
            keys: [
                "mysql.repl_password",
                "mysql.repl_password_file",
                "mysql.repl_password_env",
            ],
            inline: &self.repl_password,
            file: self.repl_password_file.as_deref(),
            env: self.repl_password_env.as_deref(),
        }
        .resolve()?;
        self.password_file = None;
        self.password_env = None;
        self.repl_password_file = None;
        self.repl_password_env = None;
        Ok(())
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_query_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// Host put in the etcd registration for the gRPC and MySQL addresses.
    #[serde(default = "default_host")]
    pub advertise_host: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Semi-sync ack timeout set on promotion; huge so the primary never falls back to async.
    #[serde(default = "default_semi_sync_timeout", with = "humantime_serde")]
    pub semi_sync_timeout: Duration,
    /// Default bound for an action whose request carries no timeout.
    #[serde(default = "default_action_timeout", with = "humantime_serde")]
    pub action_timeout: Duration,
    /// How long a replica waits for the primary's mysqld to answer its probe (every poll).
    /// A frozen mysqld accepts TCP but never answers: this bounds how fast that is seen.
    #[serde(default = "default_primary_probe_timeout", with = "humantime_serde")]
    pub primary_probe_timeout: Duration,
    /// The identities (certificate common names) allowed to call the mutating RPCs
    /// (reparent actions): the orchestrators'. Any certificate of the cluster CA may read
    /// (`StreamHealth`, `FullStatus`). Required with `[tls]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_allowed_clients: Vec<String>,
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_health_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15999))
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15998))
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/myha-agent")
}
fn default_semi_sync_timeout() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_action_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_primary_probe_timeout() -> Duration {
    Duration::from_millis(300)
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            poll_interval: default_poll_interval(),
            health_interval: default_health_interval(),
            heartbeat_interval: default_heartbeat_interval(),
            grpc_listen: default_grpc_listen(),
            http_listen: default_http_listen(),
            advertise_host: default_host(),
            state_dir: default_state_dir(),
            semi_sync_timeout: default_semi_sync_timeout(),
            action_timeout: default_action_timeout(),
            primary_probe_timeout: default_primary_probe_timeout(),
            grpc_allowed_clients: Vec::new(),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = daemon::load_toml(path)?;
        cfg.validate()?;
        cfg.mysql.resolve_secrets()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = daemon::parse_toml(text)?;
        cfg.validate()?;
        cfg.mysql.resolve_secrets()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn alias(&self) -> String {
        topo::alias(&self.tablet.cell, self.tablet.uid)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.tablet.cell) || self.tablet.cell.contains('-') {
            return Err(invalid(
                "tablet.cell",
                "must be non-empty letters, digits or '_' (the alias is cell-uid)",
            ));
        }
        if !name_ok(&self.tablet.keyspace) {
            return Err(invalid(
                "tablet.keyspace",
                "must be non-empty letters, digits, '_' or '-'",
            ));
        }
        if !name_ok(&self.tablet.shard) {
            return Err(invalid(
                "tablet.shard",
                "must be non-empty letters, digits, '_' or '-'",
            ));
        }
        if self.mysql.port == 0 {
            return Err(invalid("mysql.port", "must be 1-65535"));
        }
        if self.mysql.user.is_empty() {
            return Err(invalid("mysql.user", "must not be empty"));
        }
        if self.mysql.repl_user.is_empty() {
            return Err(invalid("mysql.repl_user", "must not be empty"));
        }
        self.mysql.validate_tls()?;
        daemon::require_positive(&[
            ("mysql.connect_timeout", self.mysql.connect_timeout),
            ("mysql.query_timeout", self.mysql.query_timeout),
            ("agent.poll_interval", self.agent.poll_interval),
            ("agent.health_interval", self.agent.health_interval),
            ("agent.heartbeat_interval", self.agent.heartbeat_interval),
            ("agent.action_timeout", self.agent.action_timeout),
            ("agent.semi_sync_timeout", self.agent.semi_sync_timeout),
            (
                "agent.primary_probe_timeout",
                self.agent.primary_probe_timeout,
            ),
        ])?;
        // Below the lossless threshold the orchestrator would report the primary as not
        // lossless and the repair would set the same value again, forever.
        if self.agent.semi_sync_timeout < topo::MIN_LOSSLESS_SEMI_SYNC_TIMEOUT {
            return Err(invalid(
                "agent.semi_sync_timeout",
                format!(
                    "{:?} is below the lossless minimum of {:?}: a primary waiting that long for an ack falls back to async and acknowledges commits no replica holds",
                    self.agent.semi_sync_timeout,
                    topo::MIN_LOSSLESS_SEMI_SYNC_TIMEOUT
                ),
            ));
        }
        match &self.tls {
            // Plaintext gRPC carries the reparent actions: whoever reaches the port could
            // promote a replica. Only this host may reach a loopback port.
            None if !self.agent.grpc_listen.ip().is_loopback() => {
                return Err(invalid(
                    "tls",
                    format!(
                        "agent.grpc_listen {} is not a loopback address: give [tls] (ca_file, \
                         cert_file, key_file) so that callers need a certificate of the cluster CA",
                        self.agent.grpc_listen
                    ),
                ))
            }
            Some(_) if self.agent.grpc_allowed_clients.is_empty() => {
                return Err(invalid(
                    "agent.grpc_allowed_clients",
                    "must name the identities (certificate common names) of the orchestrators \
                     allowed to call reparent actions",
                ))
            }
            _ => {}
        }
        if let Some(bad) = self
            .agent
            .grpc_allowed_clients
            .iter()
            .find(|c| c.trim().is_empty() || c.trim() != c.as_str())
        {
            return Err(invalid(
                "agent.grpc_allowed_clients",
                format!("{bad:?} is not an identity (a certificate common name)"),
            ));
        }
        self.etcd.validate()?;
        self.log.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tablet]
cell = "zone1"
uid = 101
keyspace = "commerce"
shard = "0"

[mysql]
port = 3307
user = "myha_agent"
repl_user = "myha_repl"

[etcd]
endpoints = ["http://127.0.0.1:2379"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = AgentConfig::parse(MINIMAL).expect("parses");
        assert_eq!(cfg.agent.poll_interval, Duration::from_millis(100));
        assert_eq!(cfg.tablet.promotion_rule, PromotionRule::Neutral);
        assert_eq!(cfg.alias(), "zone1-101");
        assert_eq!(cfg.mysql.flavor, FlavorName::Mariadb);
    }

    /// MINIMAL with `extra` added to its `[mysql]` section.
    fn with_mysql(extra: &str) -> String {
        MINIMAL.replace(
            "repl_user = \"myha_repl\"\n",
            &format!("repl_user = \"myha_repl\"\n{extra}\n"),
        )
    }

    #[test]
    fn grpc_off_loopback_needs_tls_and_tls_needs_an_allow_list() {
        let off_loopback = format!("{MINIMAL}\n[agent]\ngrpc_listen = \"0.0.0.0:15999\"\n");
        let e = AgentConfig::parse(&off_loopback).unwrap_err().to_string();
        assert!(e.contains("`tls`") && e.contains("0.0.0.0:15999"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pki::issue::Authority::new("test CA").expect("CA");
        let files = ca
            .issue(&pki::issue::Leaf::server("agent-zone1-101", &["127.0.0.1"]))
            .expect("issue")
            .write(dir.path(), "agent", &ca)
            .expect("write");
        let tls = format!(
            "\n[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            files.ca_file, files.cert_file, files.key_file
        );
        let e = AgentConfig::parse(&format!("{off_loopback}{tls}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.grpc_allowed_clients"), "{e}");
        let good = format!(
            "{MINIMAL}\n[agent]\ngrpc_listen = \"0.0.0.0:15999\"\ngrpc_allowed_clients = [\"myha-orchestrator\"]\n{tls}"
        );
        let cfg = AgentConfig::parse(&good).expect("TLS config parses");
        assert_eq!(cfg.agent.grpc_allowed_clients, ["myha-orchestrator"]);
        // A missing file is named by its key at load (and so by --check-config).
        let missing = good.replace(
            &format!("{:?}", files.ca_file),
            &format!("{:?}", dir.path().join("nope.pem")),
        );
        let e = AgentConfig::parse(&missing).unwrap_err().to_string();
        assert!(e.contains("tls.ca_file") && e.contains("nope.pem"), "{e}");
        // The round trip keeps [tls] and the allow-list.
        assert_eq!(AgentConfig::parse(&cfg.to_toml()).expect("round trip"), cfg);
    }

    #[test]
    fn passwords_come_from_the_config_a_file_or_the_environment_and_never_show() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file, with a comma\n").expect("write");
        std::env::set_var("MYHA_TEST_REPL_PW", "from-env");
        let cfg = AgentConfig::parse(&with_mysql(&format!(
            "password_file = {:?}\nrepl_password_env = \"MYHA_TEST_REPL_PW\"",
            file.display().to_string()
        )))
        .expect("parses");
        assert_eq!(cfg.mysql.password.expose(), "from-file, with a comma");
        assert_eq!(cfg.mysql.repl_password.expose(), "from-env");
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("from-file") && !shown.contains("from-env"),
            "{shown}"
        );
        let inline = AgentConfig::parse(&with_mysql("password = \"inline\"")).expect("parses");
        assert_eq!(inline.mysql.password.expose(), "inline");
        // At most one source; a file that cannot be read and an unset variable are named.
        let e = AgentConfig::parse(&with_mysql(&format!(
            "password = \"x\"\npassword_file = {:?}",
            file.display().to_string()
        )))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`mysql.password_file`") && e.contains("at most one"),
            "{e}"
        );
        let e = AgentConfig::parse(&with_mysql("repl_password_file = \"/nonexistent/pw\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mysql.repl_password_file`") && e.contains("/nonexistent/pw"),
            "{e}"
        );
        let e = AgentConfig::parse(&with_mysql("password_env = \"MYHA_TEST_UNSET_VARIABLE\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mysql.password_env`"), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = AgentConfig::parse(MINIMAL).expect("parses");
        let again = AgentConfig::parse(&cfg.to_toml()).expect("reparses");
        assert_eq!(cfg, again);
    }

    /// MINIMAL with a `[mysql.tls]` section of `body` (and `extra` in `[mysql]`).
    fn with_mysql_tls(extra: &str, body: &str) -> String {
        format!("{}\n[mysql.tls]\n{body}\n", with_mysql(extra))
    }

    #[test]
    fn mysql_tls_turns_replication_tls_on_and_its_files_are_checked_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "-----BEGIN CERTIFICATE-----\n").expect("write");
            p.display().to_string()
        };
        let (ca, cert, key) = (file("ca.pem"), file("c.pem"), file("k.pem"));
        let cfg =
            AgentConfig::parse(&with_mysql_tls("", &format!("ca_file = {ca:?}"))).expect("parses");
        let tls = cfg.mysql.tls.as_ref().expect("tls");
        assert!(tls.verify_identity, "verify_identity defaults to true");
        assert_eq!(
            cfg.mysql.replication_tls(),
            Some(flavor::SourceTls {
                ca_file: ca.clone(),
                client_cert: None,
                verify_server_cert: true,
            })
        );
        let again = AgentConfig::parse(&cfg.to_toml()).expect("reparses");
        assert_eq!(cfg, again);

        let cfg = AgentConfig::parse(&with_mysql_tls(
            "repl_tls = false",
            &format!(
                "ca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}\nverify_identity = false"
            ),
        ))
        .expect("parses");
        assert_eq!(cfg.mysql.replication_tls(), None, "repl_tls = false");
        assert!(!cfg.mysql.tls.as_ref().expect("tls").verify_identity);
        let cfg = AgentConfig::parse(&with_mysql_tls(
            "",
            &format!("ca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = {key:?}"),
        ))
        .expect("parses");
        assert_eq!(
            cfg.mysql.replication_tls().and_then(|t| t.client_cert),
            Some((cert.clone(), key.clone()))
        );
        // Without [mysql.tls] nothing changes.
        assert_eq!(
            AgentConfig::parse(MINIMAL).unwrap().mysql.replication_tls(),
            None
        );

        let err = |extra: &str, body: Option<&str>| {
            let text = match body {
                Some(b) => with_mysql_tls(extra, b),
                None => with_mysql(extra),
            };
            AgentConfig::parse(&text).unwrap_err().to_string()
        };
        let e = err("", Some("ca_file = \"/nonexistent/ca.pem\""));
        assert!(
            e.contains("`mysql.tls.ca_file`") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let e = err("", Some("ca_file = \"ca.pem\""));
        assert!(
            e.contains("`mysql.tls.ca_file`") && e.contains("absolute"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = err(
            "",
            Some(&format!("ca_file = {:?}", empty.display().to_string())),
        );
        assert!(
            e.contains("`mysql.tls.ca_file`") && e.contains("empty"),
            "{e}"
        );
        let e = err("", Some(&format!("ca_file = {ca:?}\ncert_file = {cert:?}")));
        assert!(e.contains("`mysql.tls.key_file`"), "{e}");
        let e = err(
            "",
            Some(&format!(
                "ca_file = {ca:?}\ncert_file = {cert:?}\nkey_file = \"/nonexistent/k.pem\""
            )),
        );
        assert!(e.contains("`mysql.tls.key_file`"), "{e}");
        let e = err("", Some(&format!("ca_file = {ca:?}\nkey_file = {key:?}")));
        assert!(e.contains("`mysql.tls.cert_file`"), "{e}");
        let e = err("repl_tls = true", None);
        assert!(e.contains("`mysql.repl_tls`"), "{e}");
        let e = err("", Some(&format!("ca_file = {ca:?}\nverify = false")));
        assert!(e.contains("verify"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("uid = 101", "uid = 101\nuuid = 3");
        let err = AgentConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("uuid"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = format!("{MINIMAL}\n[agent]\npoll_interval = \"fast\"\n");
        let err = AgentConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("poll_interval"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let text = MINIMAL.replace("repl_user = \"myha_repl\"\n", "");
        let err = AgentConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("repl_user"), "{err}");
    }

    #[test]
    fn zero_interval_is_refused_with_key() {
        let text = format!("{MINIMAL}\n[agent]\npoll_interval = \"0s\"\n");
        let err = AgentConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("agent.poll_interval"), "{err}");
    }

    #[test]
    fn bad_promotion_rule_is_refused() {
        let text = MINIMAL.replace(
            "shard = \"0\"",
            "shard = \"0\"\npromotion_rule = \"always\"",
        );
        let err = AgentConfig::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("always") || err.contains("promotion_rule"),
            "{err}"
        );
    }
}
