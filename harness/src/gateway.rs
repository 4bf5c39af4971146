//! [`GatewayProc`]: the `myha-gateway` binary as a child process with a generated config, plus
//! a small HTTP client for its admin API (`/health`, `/metrics`, `/routing`).
//!
//! The gateway is a binary only, so its config is described here ([`GatewayConfig`]) and written
//! as TOML; settings left `None` keep the gateway's defaults.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::http::DaemonHttp;
use crate::mysqld::absolute;
use crate::process::Proc;
use crate::util::{find_myha_bin, free_port};

pub const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one HTTP call to the admin API.
pub const GATEWAY_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to `shutdown_grace` when waiting for a SIGTERMed gateway to exit.
pub const GATEWAY_STOP_SLACK: Duration = Duration::from_secs(5);

/// One shard's MySQL ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayListener {
    pub keyspace: String,
    pub shard: String,
    pub rw: Option<SocketAddr>,
    pub ro: Option<SocketAddr>,
}

/// A `gateway.toml`. `None` = the gateway's default (see `gateway/src/config.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub admin_listen: SocketAddr,
    pub listeners: Vec<GatewayListener>,
    pub etcd_endpoints: Vec<String>,
    pub prefix: String,
    pub log_level: String,
    pub health_stale_after: Option<Duration>,
    pub max_replica_lag: Option<Duration>,
    pub ro_hard_lag: Option<Duration>,
    /// `least_connections` | `random` | `round_robin`.
    pub ro_policy: Option<String>,
    /// `primary` | `refuse`.
    pub ro_fallback: Option<String>,
    pub buffer_window: Option<Duration>,
    pub max_buffered: Option<usize>,
    pub max_connections: Option<usize>,
    pub connect_timeout: Option<Duration>,
    pub shutdown_grace: Option<Duration>,
    pub proxy_threads: Option<usize>,
    /// `[gateway] proxy_cpus` as a TOML value: `"\"auto\""`, `"[0, 1]"`.
    pub proxy_cpus: Option<String>,
}

fn toml_duration(d: Duration) -> String {
    format!("\"{}ms\"", d.as_millis())
}

fn toml_string(s: &str) -> String {
    format!("{s:?}")
}

impl GatewayConfig {
    /// The TOML the gateway reads.
    pub fn to_toml(&self) -> String {
        let mut t = format!("[gateway]\nadmin_listen = \"{}\"\n", self.admin_listen);
        if let Some(n) = self.proxy_threads {
            t.push_str(&format!("proxy_threads = {n}\n"));
        }
        if let Some(cpus) = &self.proxy_cpus {
            t.push_str(&format!("proxy_cpus = {cpus}\n"));
        }
        t.push_str("\n[routing]\n");
        let durations = [
            ("health_stale_after", self.health_stale_after),
            ("max_replica_lag", self.max_replica_lag),
            ("ro_hard_lag", self.ro_hard_lag),
            ("buffer_window", self.buffer_window),
            ("connect_timeout", self.connect_timeout),
            ("shutdown_grace", self.shutdown_grace),
        ];
        for (k, v) in durations {
            if let Some(v) = v {
                t.push_str(&format!("{k} = {}\n", toml_duration(v)));
            }
        }
        for (k, v) in [
            ("ro_policy", &self.ro_policy),
            ("ro_fallback", &self.ro_fallback),
        ] {
            if let Some(v) = v {
                t.push_str(&format!("{k} = {}\n", toml_string(v)));
            }
        }
        if let Some(m) = self.max_buffered {
            t.push_str(&format!("max_buffered = {m}\n"));
        }
        if let Some(m) = self.max_connections {
            t.push_str(&format!("max_connections = {m}\n"));
        }
        t.push_str(&format!(
            "\n[etcd]\nendpoints = [{}]\nprefix = {}\n\n[log]\nformat = \"human\"\nlevel = {}\n",
            self.etcd_endpoints
                .iter()
                .map(|e| toml_string(e))
                .collect::<Vec<_>>()
                .join(", "),
            toml_string(&self.prefix),
            toml_string(&self.log_level)
        ));
        for l in &self.listeners {
            t.push_str(&format!(
                "\n[[listener]]\nkeyspace = {}\nshard = {}\n",
                toml_string(&l.keyspace),
                toml_string(&l.shard)
            ));
            if let Some(a) = l.rw {
                t.push_str(&format!("rw = \"{a}\"\n"));
            }
            if let Some(a) = l.ro {
                t.push_str(&format!("ro = \"{a}\"\n"));
            }
        }
        t
    }

    /// The first listener's RW port.
    pub fn rw(&self) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|l| l.rw)
    }

    /// The first listener's RO port.
    pub fn ro(&self) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|l| l.ro)
    }
}

/// The config the harness gives a gateway: etcd at `etcd_endpoints` under `prefix`, one
/// listener for `keyspace/shard` with RW and RO ports, admin on fresh ports of `ip`, human
/// logs at `log_level`, every routing setting at the gateway's default.
pub fn gateway_config(
    etcd_endpoints: &[String],
    prefix: &str,
    log_level: &str,
    keyspace: &str,
    shard: &str,
    ip: Ipv4Addr,
) -> Result<GatewayConfig> {
    let port = || -> Result<SocketAddr> { Ok((ip, free_port()?).into()) };
    Ok(GatewayConfig {
        admin_listen: port()?,
        listeners: vec![GatewayListener {
            keyspace: keyspace.into(),
            shard: shard.into(),
            rw: Some(port()?),
            ro: Some(port()?),
        }],
        etcd_endpoints: etcd_endpoints.to_vec(),
        prefix: prefix.into(),
        log_level: log_level.into(),
        health_stale_after: None,
        max_replica_lag: None,
        ro_hard_lag: None,
        ro_policy: None,
        ro_fallback: None,
        buffer_window: None,
        max_buffered: None,
        max_connections: None,
        connect_timeout: None,
        shutdown_grace: None,
        proxy_threads: None,
        proxy_cpus: None,
    })
}

/// One `myha-gateway`. Its config is written to `{dir}/gateway.toml`, output goes to
/// `{dir}/gateway.log`. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct GatewayProc {
    dir: PathBuf,
    config_path: PathBuf,
    config: GatewayConfig,
    proc: Proc,
    http: DaemonHttp,
}

impl GatewayProc {
    /// Writes the config and starts the gateway, returning once `/health` answers (the MySQL
    /// ports are open by then: the gateway binds them first).
    pub async fn launch(
        config: GatewayConfig,
        dir: &Path,
        new_session: bool,
    ) -> Result<GatewayProc> {
        let g = GatewayProc::create(config, dir, new_session)?;
        g.start().await?;
        Ok(g)
    }

    /// Writes the config without starting.
    pub fn create(config: GatewayConfig, dir: &Path, new_session: bool) -> Result<GatewayProc> {
        let bin = find_myha_bin("myha-gateway")?;
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        if config.admin_listen.port() == 0 {
            return Err(HarnessError::Invalid(
                "gateway config: admin_listen needs a concrete port".into(),
            ));
        }
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config.to_toml())
            .map_err(HarnessError::io(format!("write {}", config_path.display())))?;
        let args: Vec<OsString> = vec!["--config".into(), config_path.clone().into_os_string()];
        let log = dir.join("gateway.log");
        let proc = Proc::new("myha-gateway", bin, args, log, new_session)
            .with_env("NO_COLOR", "1")
            // The gateway's own level comes from its config, not from the test's environment.
            .with_env("MYHA_LOG", config.log_level.clone());
        let http = DaemonHttp::new(config.admin_listen, GATEWAY_HTTP_TIMEOUT)?;
        Ok(GatewayProc {
            dir,
            config_path,
            config,
            proc,
            http,
        })
    }

    /// Runs it inside network namespace `ns` (a host of [`crate::netns::Network`]) from the next
    /// start on; `None` leaves it where the harness runs.
    pub fn in_netns(mut self, ns: Option<&str>) -> Self {
        self.proc = self.proc.in_netns(ns);
        self
    }

    /// Starts it, also again after a kill/stop (an error if running).
    pub async fn start(&self) -> Result<()> {
        self.http.start(&self.proc, GATEWAY_START_TIMEOUT).await
    }

    /// `http://admin{path}`.
    pub fn url(&self, path: &str) -> String {
        self.http.url(path)
    }

    /// `GET path`: (status, body text).
    pub async fn get_text(&self, path: &str) -> Result<(u16, String)> {
        self.http.get_text(path).await
    }

    /// `GET path`, which must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        self.http.get_json(path).await
    }

    /// `GET /routing`.
    pub async fn routing(&self) -> Result<serde_json::Value> {
        self.get_json("/routing").await
    }

    /// One shard of `GET /routing` (`Null` when absent).
    pub async fn shard_routing(&self, keyspace: &str, shard: &str) -> Result<serde_json::Value> {
        let v = self.routing().await?;
        Ok(v["shards"]
            .as_array()
            .and_then(|ss| {
                ss.iter()
                    .find(|s| s["keyspace"] == keyspace && s["shard"] == shard)
            })
            .cloned()
            .unwrap_or(serde_json::Value::Null))
    }

    /// Polls `/routing` (every 20 ms) until `pred` holds for `keyspace/shard`; returns that
    /// shard's JSON.
    pub async fn wait_shard_routing(
        &self,
        keyspace: &str,
        shard: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        let mut last;
        loop {
            self.proc.check_alive()?;
            match self.shard_routing(keyspace, shard).await {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => last = s.to_string(),
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("gateway routing of {keyspace}/{shard}: {what}"),
                    after: timeout,
                    detail: Some(last),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = self.get_text("/metrics").await?;
        if status != 200 {
            return Err(HarnessError::Http {
                what: format!("GET {}", self.url("/metrics")),
                message: format!("status {status}"),
            });
        }
        Ok(body)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.config.admin_listen
    }

    /// The first listener's RW port.
    pub fn rw_addr(&self) -> Option<SocketAddr> {
        self.config.rw()
    }

    /// The first listener's RO port.
    pub fn ro_addr(&self) -> Option<SocketAddr> {
        self.config.ro()
    }

    fn listener(&self, keyspace: &str, shard: &str) -> Option<&GatewayListener> {
        self.config
            .listeners
            .iter()
            .find(|l| l.keyspace == keyspace && l.shard == shard)
    }

    /// The RW port of `keyspace/shard`'s listener.
    pub fn rw_port(&self, keyspace: &str, shard: &str) -> Option<u16> {
        self.listener(keyspace, shard)?.rw.map(|a| a.port())
    }

    /// The RO port of `keyspace/shard`'s listener.
    pub fn ro_port(&self, keyspace: &str, shard: &str) -> Option<u16> {
        self.listener(keyspace, shard)?.ro.map(|a| a.port())
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log()
    }

    crate::process::signal_controls!();

    /// SIGTERM, without waiting (the gateway drains for `shutdown_grace`, then exits).
    pub fn terminate(&self) -> Result<()> {
        self.proc.signal(libc::SIGTERM)
    }

    /// SIGTERM, wait for the exit (SIGKILL after `shutdown_grace` (default 10 s) + 5 s).
    /// Returns whether it exited on its own.
    pub async fn stop(&self) -> Result<bool> {
        let grace = self
            .config
            .shutdown_grace
            .unwrap_or(Duration::from_secs(10))
            + GATEWAY_STOP_SLACK;
        self.proc.stop(grace).await
    }

    /// How the last run ended, if it did.
    pub fn last_exit(&self) -> Option<std::process::ExitStatus> {
        self.proc.last_exit()
    }

    /// Starts again with the same config (stopping first if running).
    pub async fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.start().await
    }

    /// Leave the process running when this handle is dropped.
    pub fn detach(&self) {
        self.proc.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_has_the_set_keys_only() {
        let mut c = GatewayConfig {
            admin_listen: "127.0.0.1:1".parse().unwrap(),
            listeners: vec![GatewayListener {
                keyspace: "ks".into(),
                shard: "0".into(),
                rw: Some("127.0.0.1:2".parse().unwrap()),
                ro: None,
            }],
            etcd_endpoints: vec!["http://127.0.0.1:3".into()],
            prefix: "/p".into(),
            log_level: "info".into(),
            health_stale_after: None,
            max_replica_lag: Some(Duration::from_millis(1500)),
            ro_hard_lag: None,
            ro_policy: Some("round_robin".into()),
            ro_fallback: None,
            buffer_window: None,
            max_buffered: Some(3),
            max_connections: Some(7),
            connect_timeout: None,
            shutdown_grace: None,
            proxy_threads: Some(3),
            proxy_cpus: Some("\"auto\"".into()),
        };
        let t = c.to_toml();
        assert!(t.contains("max_replica_lag = \"1500ms\""), "{t}");
        assert!(t.contains("ro_policy = \"round_robin\""), "{t}");
        assert!(t.contains("max_buffered = 3"), "{t}");
        assert!(t.contains("max_connections = 7"), "{t}");
        assert!(
            t.starts_with("[gateway]\nadmin_listen = \"127.0.0.1:1\"\nproxy_threads = 3\nproxy_cpus = \"auto\"\n\n[routing]\n"),
            "{t}"
        );
        assert!(!t.contains("buffer_window"), "{t}");
        assert!(
            t.contains("[[listener]]\nkeyspace = \"ks\"\nshard = \"0\"\nrw = \"127.0.0.1:2\"\n"),
            "{t}"
        );
        assert!(!t.contains("ro = "), "{t}");
        assert_eq!(c.rw(), Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(c.ro(), None);
        c.listeners.clear();
        assert!(!c.to_toml().contains("[[listener]]"));
    }
}
