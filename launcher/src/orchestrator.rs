//! [`OrchestratorProc`]: the `myha-orchestrator` binary as a child process with a generated
//! config, plus a small HTTP client for its API.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use myha_orchestrator::auth::Role;
use myha_orchestrator::config::{ApiTokenConfig, OrchestratorConfig};

use crate::error::{HarnessError, Result};
use crate::http::DaemonHttp;
use crate::mysqld::absolute;
use crate::process::Proc;
use crate::util::{find_myha_bin, free_port, random_password};

pub const ORCHESTRATOR_START_TIMEOUT: Duration = Duration::from_secs(20);
pub const ORCHESTRATOR_STOP_GRACE: Duration = Duration::from_secs(10);
/// Bound on one HTTP call of [`OrchestratorProc::get_json`] / [`OrchestratorProc::post_json`].
pub const ORCHESTRATOR_HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The config the harness gives an orchestrator: etcd as `etcd` says,
/// `http_listen` on a fresh port of `ip`, human logs at `log_level`; every other setting at
/// its default (adjust the returned value before [`OrchestratorProc::launch`]). On an `ip`
/// other than loopback (a host of a network of namespaces) the API gets a random `operate`
/// token named [`HARNESS_TOKEN_NAME`], since the orchestrator refuses an open API there; the
/// [`OrchestratorProc`] helpers send it.
pub fn orchestrator_config(
    etcd: &daemon::EtcdSection,
    log_level: &str,
    ip: Ipv4Addr,
) -> Result<OrchestratorConfig> {
    // Built from text so that sections added later keep their defaults here.
    let text = format!(
        "{etcd}\n[log]\nformat = \"human\"\nlevel = {log_level:?}\n",
        etcd = etcd.to_toml(),
    );
    let mut cfg = OrchestratorConfig::parse(&text)
        .map_err(|e| HarnessError::Invalid(format!("orchestrator config: {e}")))?;
    cfg.orchestrator.http_listen = (ip, free_port()?).into();
    if !ip.is_loopback() {
        cfg.orchestrator.api_tokens.push(harness_token());
    }
    Ok(cfg)
}

/// A random `operate` token named [`HARNESS_TOKEN_NAME`] (the [`OrchestratorProc`] helpers
/// send it).
pub(crate) fn harness_token() -> ApiTokenConfig {
    ApiTokenConfig {
        name: HARNESS_TOKEN_NAME.into(),
        role: Role::Operate,
        token: Some(random_password().into()),
        token_file: None,
    }
}

/// The name of the token [`orchestrator_config`] gives an orchestrator off loopback.
pub const HARNESS_TOKEN_NAME: &str = "harness";

/// One `myha-orchestrator`. Its config is written to `{dir}/orchestrator.toml`, output goes to
/// `{dir}/orchestrator.log`. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct OrchestratorProc {
    dir: PathBuf,
    config_path: PathBuf,
    config: OrchestratorConfig,
    proc: Proc,
    http: DaemonHttp,
}

impl OrchestratorProc {
    /// Writes the config and starts the orchestrator, returning once `/health` answers.
    /// `config.orchestrator.http_listen` must be a concrete port (see [`orchestrator_config`]).
    pub async fn launch(
        config: OrchestratorConfig,
        dir: &Path,
        new_session: bool,
    ) -> Result<OrchestratorProc> {
        let o = OrchestratorProc::create(config, dir, new_session)?;
        o.start().await?;
        Ok(o)
    }

    /// Writes the config without starting.
    pub fn create(
        config: OrchestratorConfig,
        dir: &Path,
        new_session: bool,
    ) -> Result<OrchestratorProc> {
        let bin = find_myha_bin("myha-orchestrator")?;
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        if config.orchestrator.http_listen.port() == 0 {
            return Err(HarnessError::Invalid(
                "orchestrator config: http_listen needs a concrete port".into(),
            ));
        }
        let config_path = dir.join("orchestrator.toml");
        std::fs::write(&config_path, config.to_toml())
            .map_err(HarnessError::io(format!("write {}", config_path.display())))?;
        let args: Vec<OsString> = vec!["--config".into(), config_path.clone().into_os_string()];
        let log = dir.join("orchestrator.log");
        let proc =
            Proc::new("myha-orchestrator", bin, args, log, new_session).with_env("NO_COLOR", "1");
        // An HTTPS API's certificate is one of the cluster CA's, which `[tls]` names.
        let https_ca = match (&config.orchestrator.api_tls, &config.tls) {
            (None, _) => None,
            (Some(_), Some(tls)) => Some(std::fs::read(&tls.ca_file).map_err(HarnessError::io(
                format!("read the cluster CA {}", tls.ca_file.display()),
            ))?),
            (Some(_), None) => {
                return Err(HarnessError::Invalid(
                    "orchestrator config: api_tls without [tls] (the CA to trust it by)".into(),
                ))
            }
        };
        let http = DaemonHttp::new(
            config.orchestrator.http_listen,
            ORCHESTRATOR_HTTP_TIMEOUT,
            https_ca.as_deref(),
        )?;
        Ok(OrchestratorProc {
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
        self.http
            .start(&self.proc, ORCHESTRATOR_START_TIMEOUT)
            .await
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        self.http.url(path)
    }

    /// The environment that points `myhactl` at this orchestrator's API: `MYHA_ORCHESTRATOR`
    /// (its URL, `https://` when it serves TLS) and, with `[tls]`, `MYHA_CA`/`MYHA_CERT`/
    /// `MYHA_KEY` (the cluster CA trusts the API; the token is the caller's business).
    pub fn ctl_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("MYHA_ORCHESTRATOR", self.url(""))];
        if let Some(t) = &self.config.tls {
            env.push(("MYHA_CA", t.ca_file.display().to_string()));
            env.push(("MYHA_CERT", t.cert_file.display().to_string()));
            env.push(("MYHA_KEY", t.key_file.display().to_string()));
        }
        env
    }

    /// The token the helpers send ([`OrchestratorConfig::client_token`]: `api_token`, else
    /// the first inline `operate` token, ...); `None` when the config has no inline token.
    pub fn client_token(&self) -> Option<&str> {
        self.config.client_token()
    }

    /// `GET path` with the client token (if any): (status, body text).
    pub async fn get_text(&self, path: &str) -> Result<(u16, String)> {
        self.http.get_text_as(path, self.client_token()).await
    }

    /// `GET path` with the given bearer token (none: no header): (status, body text).
    pub async fn get_text_with_token(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        self.http.get_text_as(path, token).await
    }

    /// `GET path` with the client token (if any), which must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        self.http.get_json_as(path, self.client_token()).await
    }

    /// `POST path` with a JSON body, sending the client token (if any) as a bearer token:
    /// (status, JSON answer; `Null` when the body is empty or not JSON).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        self.post_json_with_token(path, body, self.client_token())
            .await
    }

    /// `POST path` with a JSON body and the given bearer token (none: no header).
    pub async fn post_json_with_token(
        &self,
        path: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> Result<(u16, serde_json::Value)> {
        self.send_json_with_token(reqwest::Method::POST, path, body, token)
            .await
    }

    /// `method path` with a JSON body and the given bearer token (none: no header), e.g.
    /// `DELETE /api/v1/quarantine/{alias}`: (status, JSON answer; `Null` when not JSON).
    pub async fn send_json_with_token(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
        token: Option<&str>,
    ) -> Result<(u16, serde_json::Value)> {
        let url = self.url(path);
        let what = format!("{method} {url}");
        let mut req = self.http.client().request(method, &url).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(DaemonHttp::err(what.clone()))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(DaemonHttp::err(format!("{what}: body")))?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// `POST path` with a JSON body (and the client token), answered as a stream of lines
    /// (ndjson, e.g. `/api/v1/shards/{ks}/{shard}/reparent`): the whole exchange bounded by
    /// `timeout`. Dropping the answer closes the connection.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<LineStream> {
        let url = self.url(path);
        let mut req = self.http.client().post(&url).json(body).timeout(timeout);
        if let Some(t) = self.client_token() {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(DaemonHttp::err(format!("POST {url}")))?;
        Ok(LineStream {
            what: format!("POST {url}"),
            status: resp.status().as_u16(),
            content_type: resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            resp,
            buf: Vec::new(),
            done: false,
        })
    }

    /// `GET /api/v1/shards`.
    pub async fn shards(&self) -> Result<serde_json::Value> {
        self.get_json("/api/v1/shards").await
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.config.orchestrator.http_listen
    }

    pub fn config(&self) -> &OrchestratorConfig {
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
        self.proc.stop(ORCHESTRATOR_STOP_GRACE).await.map(drop)
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

/// A streamed HTTP answer read line by line (see [`OrchestratorProc::post_stream`]).
#[derive(Debug)]
pub struct LineStream {
    what: String,
    status: u16,
    content_type: String,
    resp: reqwest::Response,
    buf: Vec<u8>,
    done: bool,
}

impl LineStream {
    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The next complete line (without its newline) as soon as it arrives; `None` at the end
    /// (a last line without newline is returned first).
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) => self.done = true,
                Err(e) => {
                    return Err(HarnessError::Http {
                        what: self.what.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }
}
