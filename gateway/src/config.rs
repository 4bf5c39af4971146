//! `gateway.toml`: parsed strictly (unknown keys refused), durations in humantime, validated
//! at start with the offending key named.
//!
//! ```toml
//! [gateway]
//! admin_listen = "127.0.0.1:15100"  # /health, /metrics, /routing (loopback by default)
//! proxy_threads = 2                 # threads running connections (each owns its connections)
//! proxy_cpus = "none"               # none | auto | [0, 1]: pin proxy thread i to the i-th CPU (like cpu-map)
//!
//! [[listener]]                      # one per shard; at least one of rw / ro
//! keyspace = "commerce"
//! shard = "0"
//! rw = "127.0.0.1:15306"            # writes: the shard's primary
//! ro = "127.0.0.1:15307"            # reads: a replica under the lag bound
//!
//! [routing]
//! health_stale_after = "1500ms"     # a tablet's health older than this is not fresh (agents push >= every 500ms)
//! max_replica_lag = "5s"            # new RO connections only to replicas lagging less than this
//! ro_hard_lag = "30s"               # open RO connections to a replica lagging more than this are closed
//! ro_policy = "least_connections"   # least_connections | random | round_robin
//! ro_fallback = "primary"           # primary | refuse: when no replica qualifies
//! buffer_window = "5s"              # new RW connections wait this long for a usable primary (0: refuse at once)
//! max_buffered = 1000               # held connections beyond this are refused at once
//! max_connections = 10000           # open connections through the gateway beyond this are refused at once
//! connect_timeout = "1s"            # backend connect
//! shutdown_grace = "10s"            # open connections may finish this long after SIGTERM
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
//!
//! A config without any `[[listener]]` is valid: the gateway then only serves `/routing`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use daemon::ConfigError;
use daemon::{invalid, EtcdSection, LogSection};
use serde::{Deserialize, Serialize};

use crate::routing::{RoFallback, RoPolicy};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub routing: RoutingSection,
    pub etcd: EtcdSection,
    /// This daemon's certificates for calling the agents' gRPC (required when the agents
    /// have `[tls]`): the cluster CA and a client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<pki::TlsFiles>,
    #[serde(default)]
    pub log: LogSection,
    /// `[[listener]]`: the MySQL ports, one entry per shard. Last so that it serialises as an
    /// array of tables after the plain sections.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSection>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// `/health`, `/metrics`, `/routing`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Threads that run client connections (the control plane has its own); each connection
    /// lives on one of them. About one per core the gateway may use.
    #[serde(default = "default_proxy_threads")]
    pub proxy_threads: usize,
    /// CPU pinning of the proxy threads: `"none"` (the scheduler places them), `"auto"` (thread
    /// `i` on the `i`-th CPU this process may use) or a list of CPU numbers taken in turn.
    #[serde(default)]
    pub proxy_cpus: ProxyCpus,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuKeyword {
    #[default]
    None,
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProxyCpus {
    Keyword(CpuKeyword),
    List(Vec<usize>),
}

impl Default for ProxyCpus {
    fn default() -> Self {
        ProxyCpus::Keyword(CpuKeyword::None)
    }
}

pub const DEFAULT_PROXY_THREADS: usize = 2;
pub const MAX_PROXY_THREADS: usize = 256;

fn default_proxy_threads() -> usize {
    DEFAULT_PROXY_THREADS
}

pub const DEFAULT_ADMIN_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 15100);

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(DEFAULT_ADMIN_LISTEN)
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            admin_listen: default_admin_listen(),
            proxy_threads: default_proxy_threads(),
            proxy_cpus: ProxyCpus::default(),
        }
    }
}

/// One shard's MySQL ports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub keyspace: String,
    pub shard: String,
    /// Connections here go to the shard's primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw: Option<SocketAddr>,
    /// Connections here go to a replica under the lag bound (or per `ro_fallback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ro: Option<SocketAddr>,
}

/// What [`crate::routing`] may pick, and how the proxy treats connections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    /// A tablet whose last health message is older than this gets no new connections.
    #[serde(default = "default_health_stale_after", with = "humantime_serde")]
    pub health_stale_after: Duration,
    /// Replicas whose lag is this or more get no new reads.
    #[serde(default = "default_max_replica_lag", with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// Open RO connections to a replica lagging more than this are closed.
    #[serde(default = "default_ro_hard_lag", with = "humantime_serde")]
    pub ro_hard_lag: Duration,
    #[serde(default)]
    pub ro_policy: RoPolicy,
    #[serde(default)]
    pub ro_fallback: RoFallback,
    /// How long a new RW connection may wait for a usable primary (0: refused at once).
    #[serde(default = "default_buffer_window", with = "humantime_serde")]
    pub buffer_window: Duration,
    /// Connections held at once (beyond: refused at once).
    #[serde(default = "default_max_buffered")]
    pub max_buffered: usize,
    /// Connections open through the gateway at once, held or spliced (beyond: refused at once
    /// with an error packet, before any backend is touched).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Bound on connecting to a backend mysqld.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// After SIGTERM, open connections may finish for this long before they are closed.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

pub const DEFAULT_HEALTH_STALE_AFTER: Duration = Duration::from_millis(1500);
pub const DEFAULT_MAX_REPLICA_LAG: Duration = Duration::from_secs(5);
pub const DEFAULT_RO_HARD_LAG: Duration = Duration::from_secs(30);
pub const DEFAULT_BUFFER_WINDOW: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BUFFERED: usize = 1000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn default_health_stale_after() -> Duration {
    DEFAULT_HEALTH_STALE_AFTER
}
fn default_max_replica_lag() -> Duration {
    DEFAULT_MAX_REPLICA_LAG
}
fn default_ro_hard_lag() -> Duration {
    DEFAULT_RO_HARD_LAG
}
fn default_buffer_window() -> Duration {
    DEFAULT_BUFFER_WINDOW
}
fn default_max_buffered() -> usize {
    DEFAULT_MAX_BUFFERED
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            health_stale_after: default_health_stale_after(),
            max_replica_lag: default_max_replica_lag(),
            ro_hard_lag: default_ro_hard_lag(),
            ro_policy: RoPolicy::default(),
            ro_fallback: RoFallback::default(),
            buffer_window: default_buffer_window(),
            max_buffered: default_max_buffered(),
            max_connections: default_max_connections(),
            connect_timeout: default_connect_timeout(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

impl RoutingSection {
    pub fn policy(&self) -> crate::routing::RoutingPolicy {
        crate::routing::RoutingPolicy {
            health_stale_after: self.health_stale_after,
            max_replica_lag: self.max_replica_lag,
            ro_hard_lag: self.ro_hard_lag,
        }
    }
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let cfg: GatewayConfig = daemon::load_toml(path)?;
        cfg.validate()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        Ok(cfg)
    }

    /// `gateway.toml` text, parsed and validated as [`GatewayConfig::load`] does.
    pub fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        let cfg: GatewayConfig = daemon::parse_toml(text)?;
        cfg.validate()?;
        daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
        Ok(cfg)
    }

    /// The config as `gateway.toml` text (what the harness and the playbook tests write).
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The first listener's RW port.
    pub fn rw(&self) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|l| l.rw)
    }

    /// The first listener's RO port.
    pub fn ro(&self) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|l| l.ro)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.routing;
        daemon::require_positive(&[
            ("routing.health_stale_after", r.health_stale_after),
            ("routing.max_replica_lag", r.max_replica_lag),
            ("routing.ro_hard_lag", r.ro_hard_lag),
            ("routing.connect_timeout", r.connect_timeout),
        ])?;
        if r.max_connections == 0 {
            return Err(invalid(
                "routing.max_connections",
                "must be at least 1 (0 would refuse every connection)",
            ));
        }
        if r.ro_hard_lag < r.max_replica_lag {
            return Err(invalid(
                "routing.ro_hard_lag",
                format!(
                    "{:?} is below routing.max_replica_lag {:?}: connections would be closed to replicas that still get new ones",
                    r.ro_hard_lag, r.max_replica_lag
                ),
            ));
        }
        if !(1..=MAX_PROXY_THREADS).contains(&self.gateway.proxy_threads) {
            return Err(invalid(
                "gateway.proxy_threads",
                format!(
                    "{} is out of range 1..={MAX_PROXY_THREADS}",
                    self.gateway.proxy_threads
                ),
            ));
        }
        self.proxy_cpu_plan()?;
        self.validate_listeners()?;
        self.etcd.validate()?;
        self.log.validate()
    }

    /// The CPU of each proxy thread (empty: not pinned), checked against the CPUs this process
    /// may use, so that `--check-config` on the target host catches a CPU it does not have.
    pub fn proxy_cpu_plan(&self) -> Result<Vec<usize>, ConfigError> {
        const KEY: &str = "gateway.proxy_cpus";
        let cpus: Vec<usize> = match &self.gateway.proxy_cpus {
            ProxyCpus::Keyword(CpuKeyword::None) => return Ok(Vec::new()),
            ProxyCpus::Keyword(CpuKeyword::Auto) => crate::affinity::allowed_cpus()
                .map_err(|e| invalid(KEY, format!("cannot read this process's CPU affinity: {e}")))?
                .into_iter()
                .collect(),
            ProxyCpus::List(list) => {
                if list.is_empty() {
                    return Err(invalid(
                        KEY,
                        "an empty list pins nothing: use \"none\" or name at least one CPU",
                    ));
                }
                let allowed = crate::affinity::allowed_cpus().map_err(|e| {
                    invalid(KEY, format!("cannot read this process's CPU affinity: {e}"))
                })?;
                if let Some(cpu) = list.iter().find(|c| !allowed.contains(c)) {
                    let have: Vec<String> = allowed.iter().map(|c| c.to_string()).collect();
                    return Err(invalid(
                        KEY,
                        format!(
                            "CPU {cpu} is not one this process may run on ({})",
                            have.join(",")
                        ),
                    ));
                }
                list.clone()
            }
        };
        Ok(crate::affinity::plan(&cpus, self.gateway.proxy_threads))
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let mut shards = BTreeSet::new();
        let mut addrs = BTreeSet::from([self.gateway.admin_listen]);
        for (i, l) in self.listeners.iter().enumerate() {
            let n = i + 1;
            if l.keyspace.trim().is_empty() {
                return Err(invalid(
                    "listener.keyspace",
                    format!("listener #{n}: must not be empty"),
                ));
            }
            if l.shard.trim().is_empty() {
                return Err(invalid(
                    "listener.shard",
                    format!("listener #{n} ({}): must not be empty", l.keyspace),
                ));
            }
            let name = format!("{}/{}", l.keyspace, l.shard);
            if l.rw.is_none() && l.ro.is_none() {
                return Err(invalid(
                    "listener.rw",
                    format!("listener #{n} ({name}): give rw, ro or both"),
                ));
            }
            if !shards.insert((l.keyspace.as_str(), l.shard.as_str())) {
                return Err(invalid(
                    "listener.shard",
                    format!("listener #{n}: {name} has another [[listener]] already"),
                ));
            }
            for (key, addr) in [("listener.rw", l.rw), ("listener.ro", l.ro)] {
                let Some(addr) = addr else { continue };
                if addr.port() == 0 {
                    return Err(invalid(
                        key,
                        format!("listener #{n} ({name}): {addr} needs a concrete port"),
                    ));
                }
                if !addrs.insert(addr) {
                    return Err(invalid(
                        key,
                        format!(
                            "listener #{n} ({name}): {addr} is used twice (listeners and gateway.admin_listen need distinct addresses)"
                        ),
                    ));
                }
            }
        }
        Ok(())
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
    fn proxy_cpus_are_none_auto_or_an_allowed_list() {
        let cfg = GatewayConfig::parse(MINIMAL).expect("parses");
        assert_eq!(cfg.gateway.proxy_cpus, ProxyCpus::Keyword(CpuKeyword::None));
        assert!(cfg.proxy_cpu_plan().expect("plan").is_empty());
        let allowed: Vec<usize> = crate::affinity::allowed_cpus()
            .expect("affinity")
            .into_iter()
            .collect();
        let cfg = GatewayConfig::parse(&format!(
            "[gateway]\nproxy_threads = 3\nproxy_cpus = \"auto\"\n{MINIMAL}"
        ))
        .expect("auto parses");
        assert_eq!(
            cfg.proxy_cpu_plan().expect("plan"),
            crate::affinity::plan(&allowed, 3)
        );
        let first = allowed[0];
        let cfg = GatewayConfig::parse(&format!("[gateway]\nproxy_cpus = [{first}]\n{MINIMAL}"))
            .expect("a list parses");
        assert_eq!(cfg.proxy_cpu_plan().expect("plan"), vec![first, first]);
        let roundtrip = GatewayConfig::parse(&cfg.to_toml()).expect("serialised form parses");
        assert_eq!(roundtrip, cfg);
        for bad in ["\"all\"", "[]", "[100000]", "-1"] {
            let e = err(&format!("[gateway]\nproxy_cpus = {bad}\n{MINIMAL}"));
            assert!(e.contains("proxy_cpus"), "{bad}: {e}");
        }
        let missing = (0..1024)
            .find(|c| !allowed.contains(c))
            .expect("some CPU is absent");
        let e = err(&format!("[gateway]\nproxy_cpus = [{missing}]\n{MINIMAL}"));
        assert!(
            e.contains("`gateway.proxy_cpus`") && e.contains(&format!("CPU {missing}")),
            "{e}"
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = GatewayConfig::parse(MINIMAL).expect("parses");
        assert_eq!(cfg.gateway.admin_listen, "127.0.0.1:15100".parse().unwrap());
        assert_eq!(cfg.gateway.proxy_threads, 2);
        assert!(cfg.listeners.is_empty());
        let r = &cfg.routing;
        assert_eq!(r.health_stale_after, Duration::from_millis(1500));
        assert_eq!(r.max_replica_lag, Duration::from_secs(5));
        assert_eq!(r.ro_hard_lag, Duration::from_secs(30));
        assert_eq!(r.ro_policy, RoPolicy::LeastConnections);
        assert_eq!(r.ro_fallback, RoFallback::Primary);
        assert_eq!(r.buffer_window, Duration::from_secs(5));
        assert_eq!(r.max_buffered, 1000);
        assert_eq!(r.connect_timeout, Duration::from_secs(1));
        assert_eq!(r.shutdown_grace, Duration::from_secs(10));
        assert_eq!(cfg.etcd.prefix, "/myha");
        assert_eq!(cfg.log, LogSection::default());
        let p = cfg.routing.policy();
        assert_eq!(
            (p.health_stale_after, p.max_replica_lag, p.ro_hard_lag),
            (
                Duration::from_millis(1500),
                Duration::from_secs(5),
                Duration::from_secs(30)
            )
        );
    }

    const FULL: &str = r#"
[gateway]
admin_listen = "0.0.0.0:16100"
proxy_threads = 4

[[listener]]
keyspace = "commerce"
shard = "0"
rw = "127.0.0.1:15306"
ro = "127.0.0.1:15307"

[[listener]]
keyspace = "commerce"
shard = "80-"
ro = "127.0.0.1:15308"

[routing]
health_stale_after = "3s"
max_replica_lag = "500ms"
ro_hard_lag = "10s"
ro_policy = "round_robin"
ro_fallback = "refuse"
buffer_window = "0s"
max_buffered = 0
connect_timeout = "250ms"
shutdown_grace = "0s"

[etcd]
endpoints = ["http://10.0.0.1:2379"]
prefix = "/prod"
dial_timeout = "1s"

[log]
format = "json"
level = "warn"
"#;

    #[test]
    fn full_config_parses_and_round_trips() {
        let cfg = GatewayConfig::parse(FULL).expect("parses");
        assert_eq!(cfg.routing.max_replica_lag, Duration::from_millis(500));
        assert_eq!(cfg.routing.ro_policy, RoPolicy::RoundRobin);
        assert_eq!(cfg.routing.ro_fallback, RoFallback::Refuse);
        assert_eq!(cfg.routing.buffer_window, Duration::ZERO);
        assert_eq!(cfg.routing.max_buffered, 0);
        assert_eq!(cfg.gateway.admin_listen.port(), 16100);
        assert_eq!(cfg.gateway.proxy_threads, 4);
        assert_eq!(cfg.listeners.len(), 2);
        assert_eq!(
            cfg.listeners[0].rw,
            Some("127.0.0.1:15306".parse().unwrap())
        );
        assert_eq!(cfg.listeners[1].rw, None);
        assert_eq!(cfg.listeners[1].shard, "80-");
        let text = cfg.to_toml();
        assert_eq!(
            GatewayConfig::parse(&text).expect("reparses"),
            cfg,
            "{text}"
        );
        let random = FULL.replace("round_robin", "random");
        assert_eq!(
            GatewayConfig::parse(&random).unwrap().routing.ro_policy,
            RoPolicy::Random
        );
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
        let e = err(&format!(
            "{MINIMAL}[[listener]]\nkeyspace = \"k\"\nshard = \"0\"\nrw = \"127.0.0.1:1\"\nport = 3\n"
        ));
        assert!(e.contains("port"), "{e}");
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
        let e = err(&format!("[routing]\nconnect_timeout = \"0s\"\n{MINIMAL}"));
        assert!(e.contains("`routing.connect_timeout`"), "{e}");
        let e = err(&format!("[routing]\nro_hard_lag = \"1s\"\n{MINIMAL}"));
        assert!(e.contains("`routing.ro_hard_lag`"), "{e}");
        let e = err(&format!("[routing]\nro_policy = \"fastest\"\n{MINIMAL}"));
        assert!(e.contains("ro_policy") && e.contains("fastest"), "{e}");
        let e = err(&format!("[routing]\nro_fallback = \"any\"\n{MINIMAL}"));
        assert!(e.contains("ro_fallback"), "{e}");
        let e = err(&format!("[routing]\nmax_buffered = -1\n{MINIMAL}"));
        assert!(e.contains("max_buffered"), "{e}");
        let e = err(&format!("[gateway]\nadmin_listen = \"15100\"\n{MINIMAL}"));
        assert!(e.contains("admin_listen"), "{e}");
        let e = err(&format!("[gateway]\nproxy_threads = 0\n{MINIMAL}"));
        assert!(e.contains("`gateway.proxy_threads`"), "{e}");
        let e = err(&format!("[gateway]\nproxy_threads = 1000\n{MINIMAL}"));
        assert!(e.contains("`gateway.proxy_threads`"), "{e}");
        let e = err(&format!("{MINIMAL}prefix = \"\"\n"));
        assert!(e.contains("`etcd.prefix`"), "{e}");
        let e = err("[etcd]\nendpoints = []\n");
        assert!(e.contains("`etcd.endpoints`"), "{e}");
        let e = err(&format!("{MINIMAL}dial_timeout = \"0s\"\n"));
        assert!(e.contains("`etcd.dial_timeout`"), "{e}");
        let e = err(&format!("{MINIMAL}[log]\nlevel = \"[[\"\n"));
        assert!(e.contains("`log.level`"), "{e}");
    }

    fn listener(body: &str) -> String {
        format!("{MINIMAL}[[listener]]\n{body}\n")
    }

    #[test]
    fn bad_listeners_are_named() {
        let e = err(&listener("keyspace = \"ks\"\nshard = \"0\""));
        assert!(e.contains("`listener.rw`") && e.contains("ks/0"), "{e}");
        let e = err(&listener(
            "keyspace = \"\"\nshard = \"0\"\nrw = \"127.0.0.1:1\"",
        ));
        assert!(e.contains("`listener.keyspace`"), "{e}");
        let e = err(&listener(
            "keyspace = \"ks\"\nshard = \" \"\nrw = \"127.0.0.1:1\"",
        ));
        assert!(e.contains("`listener.shard`"), "{e}");
        let e = err(&listener("shard = \"0\"\nrw = \"127.0.0.1:1\""));
        assert!(e.contains("keyspace"), "{e}");
        let e = err(&listener(
            "keyspace = \"ks\"\nshard = \"0\"\nrw = \"127.0.0.1:1\"\nro = \"127.0.0.1:1\"",
        ));
        assert!(
            e.contains("`listener.ro`") && e.contains("used twice"),
            "{e}"
        );
        let e = err(&listener(
            "keyspace = \"ks\"\nshard = \"0\"\nrw = \"127.0.0.1:15100\"",
        ));
        assert!(
            e.contains("`listener.rw`") && e.contains("admin_listen"),
            "{e}"
        );
        let e = err(&listener(
            "keyspace = \"ks\"\nshard = \"0\"\nrw = \"127.0.0.1:0\"",
        ));
        assert!(
            e.contains("`listener.rw`") && e.contains("concrete port"),
            "{e}"
        );
        let e = err(&listener(
            "keyspace = \"ks\"\nshard = \"0\"\nro = \"localhost:3306\"",
        ));
        assert!(e.contains("ro"), "{e}");
        let two = format!(
            "{}[[listener]]\nkeyspace = \"ks\"\nshard = \"0\"\nro = \"127.0.0.1:2\"\n",
            listener("keyspace = \"ks\"\nshard = \"0\"\nrw = \"127.0.0.1:1\"")
        );
        let e = err(&two);
        assert!(
            e.contains("`listener.shard`") && e.contains("listener #2"),
            "{e}"
        );
    }

    #[test]
    fn missing_etcd_is_named() {
        let e = err("[gateway]\n");
        assert!(e.contains("etcd"), "{e}");
    }
}
