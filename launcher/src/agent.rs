//! [`AgentProc`]: the `myha-agent` binary as a child process with a generated config.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use myha_agent::config::AgentConfig;
use myha_proto::agent::agent_client::AgentClient;
use myha_proto::agent::{FullStatusRequest, Health};
use tonic::transport::Channel;

use crate::error::{HarnessError, Result};
use crate::mysqld::absolute;
use crate::process::{CommandLine, Proc};
use crate::util::find_myha_bin;

pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);

/// One `myha-agent`. Its config is written to `{dir}/agent.toml`, output goes to
/// `{dir}/agent.log`. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct AgentProc {
    alias: String,
    dir: PathBuf,
    config_path: PathBuf,
    config: AgentConfig,
    proc: Proc,
}

impl AgentProc {
    /// Writes the config and starts the agent, returning once it answers `FullStatus`
    /// (whatever it says about mysqld). `config.agent.grpc_listen`/`http_listen` must be
    /// concrete ports (the caller picks them, see [`crate::free_port`]).
    pub async fn launch(config: AgentConfig, dir: &Path, new_session: bool) -> Result<AgentProc> {
        let a = AgentProc::create(config, dir, new_session)?;
        a.start().await?;
        Ok(a)
    }

    /// Writes the config without starting.
    pub fn create(config: AgentConfig, dir: &Path, new_session: bool) -> Result<AgentProc> {
        let bin = find_myha_bin("myha-agent")?;
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        if config.agent.grpc_listen.port() == 0 || config.agent.http_listen.port() == 0 {
            return Err(HarnessError::Invalid(
                "agent config: grpc_listen and http_listen need concrete ports".into(),
            ));
        }
        let alias = config.alias();
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config.to_toml())
            .map_err(HarnessError::io(format!("write {}", config_path.display())))?;
        let args: Vec<OsString> = vec!["--config".into(), config_path.clone().into_os_string()];
        let log = dir.join("agent.log");
        // Plain log files: no colour codes.
        let proc = Proc::new(format!("myha-agent {alias}"), bin, args, log, new_session)
            .with_env("NO_COLOR", "1");
        Ok(AgentProc {
            alias,
            dir,
            config_path,
            config,
            proc,
        })
    }

    /// A handle on the agent that `cl` (from [`AgentProc::command_line`]) starts with the
    /// config already in `{dir}/agent.toml`, not started: `myhactl sandbox restart` starts a
    /// sandbox's agent again with the very command line the harness first used.
    pub fn from_command_line(dir: &Path, cl: &CommandLine, new_session: bool) -> Result<AgentProc> {
        let dir = absolute(dir)?;
        let config_path = dir.join("agent.toml");
        let config = AgentConfig::load(&config_path).map_err(|e| {
            HarnessError::Invalid(format!("agent config {}: {e}", config_path.display()))
        })?;
        let alias = config.alias();
        Ok(AgentProc {
            proc: Proc::from_command_line(format!("myha-agent {alias}"), cl, new_session),
            alias,
            dir,
            config_path,
            config,
        })
    }

    /// Runs it inside network namespace `ns` (a host of [`crate::netns::Network`]) from the next
    /// start on; `None` leaves it where the harness runs.
    pub fn in_netns(mut self, ns: Option<&str>) -> Self {
        self.proc = self.proc.in_netns(ns);
        self
    }

    /// The command line every (re)start uses (`None` if not UTF-8).
    pub fn command_line(&self) -> Option<CommandLine> {
        self.proc.command_line()
    }

    /// Starts it, also again after a kill/stop (an error if running).
    pub async fn start(&self) -> Result<()> {
        let started = Instant::now();
        self.proc.spawn()?;
        let mut last;
        loop {
            self.proc.check_alive()?;
            match self.full_status().await {
                Ok(_) => {
                    tracing::debug!(agent = %self.alias, elapsed = ?started.elapsed(), "agent answers");
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > AGENT_START_TIMEOUT {
                return Err(self.proc.start_error(format!(
                    "no FullStatus answer after {AGENT_START_TIMEOUT:?}: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts it without waiting for it to answer (an error if running): for a caller that may
    /// be cut from the agent's host.
    pub fn spawn(&self) -> Result<()> {
        self.proc.spawn().map(drop)
    }

    /// A gRPC client (connects now, 1 s bound). With the agent's `[tls]`, it presents the
    /// cluster's orchestrator certificate (test code calls reparent actions in the
    /// orchestrator's place).
    pub async fn client(&self) -> Result<AgentClient<Channel>> {
        let tls = match &self.config.tls {
            Some(t) => Some(crate::certs::orchestrator_material(&t.ca_file)?),
            None => None,
        };
        self.client_as(tls.as_ref()).await
    }

    /// A gRPC client presenting `tls` (`None`: plaintext), for negative tests.
    pub async fn client_as(&self, tls: Option<&pki::Material>) -> Result<AgentClient<Channel>> {
        let addr = self.grpc_addr().to_string();
        let endpoint = pki::grpc_endpoint(&addr, tls)
            .map_err(|e| HarnessError::Invalid(format!("agent {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| HarnessError::Agent {
            what: format!("{}: connect {addr}", self.proc.name()),
            message: error_chain(&e),
        })?;
        Ok(AgentClient::new(channel))
    }

    /// One `FullStatus` call.
    pub async fn full_status(&self) -> Result<Health> {
        let mut c = self.client().await?;
        c.full_status(FullStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| HarnessError::Agent {
                what: format!("{}: FullStatus", self.proc.name()),
                message: format!("{:?}: {}", s.code(), s.message()),
            })
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.config.agent.grpc_listen
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.config.agent.http_listen
    }

    pub fn config(&self) -> &AgentConfig {
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

    /// SIGTERM, wait for the exit (SIGKILL after 10 s).
    pub async fn stop(&self) -> Result<()> {
        self.proc.stop(AGENT_STOP_GRACE).await.map(drop)
    }

    /// Starts again with the same config (stopping first if running).
    pub async fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.start().await
    }

    pub(crate) fn detach(&self) {
        self.proc.detach();
    }
}

/// An error with its sources (a TLS handshake failure is several levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
