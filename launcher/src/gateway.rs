//! [`GatewayProc`]: the `myha-gateway` binary as a child process with a generated config, plus
//! a small HTTP client for its admin API (`/health`, `/metrics`, `/routing`).
//!
//! The config is the gateway's own type ([`GatewayConfig`], re-exported), written as TOML.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::http::DaemonHttp;
use crate::mysqld::absolute;
use crate::process::Proc;
use crate::util::{find_myha_bin, free_port};
use daemon::{LogFormat, LogSection};
pub use myha_gateway::config::{GatewayConfig, ListenerSection as GatewayListener};

pub const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one HTTP call to the admin API.
pub const GATEWAY_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to `shutdown_grace` when waiting for a SIGTERMed gateway to exit.
pub const GATEWAY_STOP_SLACK: Duration = Duration::from_secs(5);

/// The config the harness gives a gateway: etcd as `etcd` says, one
/// listener for `keyspace/shard` with RW and RO ports, admin on fresh ports of `ip`, human
/// logs at `log_level`, every routing setting at the gateway's default.
pub fn gateway_config(
    etcd: &daemon::EtcdSection,
    log_level: &str,
    keyspace: &str,
    shard: &str,
    ip: Ipv4Addr,
) -> Result<GatewayConfig> {
    let port = || -> Result<SocketAddr> { Ok((ip, free_port()?).into()) };
    let mut cfg = GatewayConfig::parse(&etcd.to_toml())
        .map_err(|e| HarnessError::Invalid(format!("gateway config: {e}")))?;
    cfg.gateway.admin_listen = port()?;
    cfg.log = LogSection {
        format: LogFormat::Human,
        level: log_level.into(),
    };
    cfg.listeners = vec![GatewayListener {
        keyspace: keyspace.into(),
        shard: shard.into(),
        rw: Some(port()?),
        ro: Some(port()?),
    }];
    Ok(cfg)
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
        if config.gateway.admin_listen.port() == 0 {
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
            .with_env("MYHA_LOG", config.log.level.clone());
        let http = DaemonHttp::new(config.gateway.admin_listen, GATEWAY_HTTP_TIMEOUT, None)?;
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
        self.config.gateway.admin_listen
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

    /// SIGTERM, wait for the exit (SIGKILL after `routing.shutdown_grace` + 5 s).
    /// Returns whether it exited on its own.
    pub async fn stop(&self) -> Result<bool> {
        let grace = self.config.routing.shutdown_grace + GATEWAY_STOP_SLACK;
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
