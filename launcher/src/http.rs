//! [`DaemonHttp`]: the HTTP side of a daemon the harness runs (the orchestrator's API, the
//! gateway's admin listener): one client with bounded timeouts, `GET` helpers, and waiting for
//! `/health` after a start.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::process::Proc;

#[derive(Debug)]
pub(crate) struct DaemonHttp {
    addr: SocketAddr,
    client: reqwest::Client,
    /// `https` when the daemon serves TLS, else `http`.
    scheme: &'static str,
}

impl DaemonHttp {
    /// A client for `addr` whose every call is bounded by `timeout`; over HTTPS trusting only
    /// the CA in `https_ca` (PEM) when given.
    pub(crate) fn new(
        addr: SocketAddr,
        timeout: Duration,
        https_ca: Option<&[u8]>,
    ) -> Result<DaemonHttp> {
        pki::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(1));
        if let Some(ca) = https_ca {
            let ca = reqwest::Certificate::from_pem(ca)
                .map_err(|e| HarnessError::Invalid(format!("HTTPS CA: {e}")))?;
            builder = builder.tls_certs_only([ca]).https_only(true);
        }
        let client = builder
            .build()
            .map_err(|e| HarnessError::Invalid(format!("HTTP client: {e}")))?;
        Ok(DaemonHttp {
            addr,
            client,
            scheme: if https_ca.is_some() { "https" } else { "http" },
        })
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `http(s)://addr{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Maps a client error to the harness's, with what was being done.
    pub(crate) fn err(what: String) -> impl FnOnce(reqwest::Error) -> HarnessError {
        move |e| HarnessError::Http {
            what,
            message: e.to_string(),
        }
    }

    /// `GET path`: (status, body text).
    pub(crate) async fn get_text(&self, path: &str) -> Result<(u16, String)> {
        self.get_text_as(path, None).await
    }

    /// `GET path` with `token` as a bearer token (none: no header): (status, body text).
    pub(crate) async fn get_text_as(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        let url = self.url(path);
        let mut req = self.client.get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(Self::err(format!("GET {url}")))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(Self::err(format!("GET {url}: body")))?;
        Ok((status, body))
    }

    /// `GET path`, which must answer 200 with JSON.
    pub(crate) async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        self.get_json_as(path, None).await
    }

    /// `GET path` with `token` as a bearer token, which must answer 200 with JSON.
    pub(crate) async fn get_json_as(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<serde_json::Value> {
        let (status, body) = self.get_text_as(path, token).await?;
        if status != 200 {
            return Err(HarnessError::Http {
                what: format!("GET {}", self.url(path)),
                message: format!("status {status}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|e| HarnessError::Http {
            what: format!("GET {}", self.url(path)),
            message: format!("not JSON ({e}): {body}"),
        })
    }

    /// Spawns `proc` and waits until `/health` answers 200; fails early if the process exits,
    /// and with the last answer after `timeout`.
    pub(crate) async fn start(&self, proc: &Proc, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        proc.spawn()?;
        let mut last;
        loop {
            proc.check_alive()?;
            match self.get_text("/health").await {
                Ok((200, _)) => {
                    tracing::debug!(elapsed = ?started.elapsed(), addr = %self.addr, "daemon answers");
                    return Ok(());
                }
                Ok((status, body)) => last = format!("/health answered {status}: {body}"),
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > timeout {
                return Err(
                    proc.start_error(format!("/health not answering after {timeout:?}: {last}"))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
