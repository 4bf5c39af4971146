//! Talking to the orchestrator's HTTP API, shared by every command that does: where the API is
//! (`--orchestrator` / `$MYHA_ORCHESTRATOR`, else the sandbox's), where etcd is (`--etcd` /
//! `$MYHA_ETCD`, else the sandbox's), the bearer token (`--token` / `$MYHA_API_TOKEN`, else
//! the sandbox's own), and the requests themselves with the server's `{"error"}` text carried
//! into our errors so that the operator reads the orchestrator's reason, not just a status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a request may take to connect: the orchestrator is on the operator's network, a
/// longer wait only delays the fallback (audit) or the error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a plain (non-streaming) request: every such endpoint answers from memory or with
/// one etcd round trip.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no orchestrator to ask: give --orchestrator URL or set MYHA_ORCHESTRATOR \
         (the sandbox's is used when there is one in {sandbox_dir})"
    )]
    NoOrchestrator { sandbox_dir: String },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("the orchestrator's API is HTTPS: the CA to trust it by")]
    Security(#[source] crate::security::SecurityError),
    #[error(
        "the orchestrator's API is HTTPS: give the cluster CA with --ca (and --cert, --key) \
         or MYHA_CA (the sandbox's is used when there is one)"
    )]
    NoCa,
    /// The request did not get an answer (connection refused, timeout, reset).
    #[error("{method} {url}: the orchestrator did not answer")]
    Unreachable {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The orchestrator refused: its status and its own reason.
    #[error("{method} {url}: {status}: {message}{hint}")]
    Refused {
        method: &'static str,
        url: String,
        status: StatusCode,
        message: String,
        /// What the operator can do about it (e.g. give a token after a 401).
        hint: &'static str,
    },
    #[error("{method} {url}: reading the answer")]
    Body {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: unexpected answer: {body}")]
    Decode {
        method: &'static str,
        url: String,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no --etcd or MYHA_ETCD given and no sandbox in {dir}; start one with `myhactl sandbox up`"
    )]
    NoEtcd { dir: String },
    #[error("reading the sandbox state in {dir}")]
    Sandbox {
        dir: String,
        #[source]
        source: Box<launcher::HarnessError>,
    },
}

impl ApiError {
    /// The orchestrator could not be asked at all, or could not reach etcd itself (503): a
    /// caller with another way to the same data (etcd) may use it.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } | ApiError::NoOrchestrator { .. } => true,
            ApiError::Refused { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

/// An answer to a change that could not be reported as done.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// A 2xx whose body says it did not happen: never expected, but not to be reported as done.
    #[error("the orchestrator answered without doing it: {0}")]
    NotDone(String),
    #[error("printing the answer")]
    Json(#[source] serde_json::Error),
}

/// Prints the orchestrator's answer to a change, as one JSON line with `json`, else as `text`;
/// an error, printing nothing, when the answer's `ok` is false.
pub fn print_change<T: Serialize>(
    answer: &T,
    ok: bool,
    text: String,
    json: bool,
) -> Result<(), AnswerError> {
    if !ok {
        return Err(AnswerError::NotDone(text));
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(answer).map_err(AnswerError::Json)?
        );
    } else {
        println!("{text}");
    }
    Ok(())
}

/// The bearer token for the orchestrator's API: flattened into every command that speaks to it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TokenArg {
    /// Bearer token, needed when the orchestrator has API tokens (`[orchestrator] api_tokens`):
    /// a `read` token for reads, an `operate` one for changes; default: $MYHA_API_TOKEN, else
    /// the sandbox's when its orchestrator is the one asked.
    #[arg(
        long,
        env = "MYHA_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}

/// Where the orchestrator is and who we are to it: flattened into every command that speaks
/// to its API.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The orchestrator's HTTP API (`host:port` or `http://host:port`); default:
    /// $MYHA_ORCHESTRATOR, else the sandbox's.
    #[arg(long, env = "MYHA_ORCHESTRATOR", value_name = "URL")]
    pub orchestrator: Option<String>,
    #[command(flatten)]
    pub token: TokenArg,
    /// Sandbox directory to find the orchestrator in when neither --orchestrator nor
    /// $MYHA_ORCHESTRATOR is given (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The sandbox directory: the flag, else the default one.
pub fn sandbox_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .unwrap_or_else(crate::sandbox::default_dir)
}

/// Where etcd is: the flag or env, else the sandbox state.
pub fn etcd_endpoints(etcd: &[String], dir: Option<&Path>) -> Result<Vec<String>, ApiError> {
    if !etcd.is_empty() {
        return Ok(etcd.to_vec());
    }
    let dir = sandbox_dir(dir);
    match launcher::SandboxState::read(&dir) {
        Ok(Some(state)) => Ok(vec![state.etcd]),
        Ok(None) => Err(ApiError::NoEtcd {
            dir: dir.display().to_string(),
        }),
        Err(source) => Err(ApiError::Sandbox {
            dir: dir.display().to_string(),
            source: Box::new(source),
        }),
    }
}

/// The orchestrator's API base URL (`http://host:port`): the flag or env, else the sandbox's
/// when etcd came from the sandbox too (another cluster's etcd with the sandbox's
/// orchestrator would mix two clusters).
pub fn orchestrator_url(
    flag: Option<&str>,
    etcd_given: bool,
    dir: Option<&Path>,
) -> Option<String> {
    if let Some(f) = flag.map(str::trim).filter(|f| !f.is_empty()) {
        return Some(normalize_url(f));
    }
    if etcd_given {
        return None;
    }
    let state = launcher::SandboxState::read(&sandbox_dir(dir)).ok()??;
    state.orchestrator_http.as_deref().map(normalize_url)
}

/// The bearer token to send: the flag (or $MYHA_API_TOKEN), else, when the orchestrator asked
/// is the sandbox's (the same rule as [`orchestrator_url`]), the sandbox orchestrator's own.
pub fn token_for(
    token: Option<&str>,
    orchestrator_flag: Option<&str>,
    etcd_given: bool,
    dir: Option<&Path>,
) -> Option<String> {
    if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
        return Some(t.to_string());
    }
    let from_sandbox = !etcd_given && orchestrator_flag.map(str::trim).is_none_or(str::is_empty);
    if !from_sandbox {
        return None;
    }
    launcher::SandboxState::read(&sandbox_dir(dir))
        .ok()??
        .orchestrator_token()
}

/// `host:port` -> `http://host:port`; no trailing slash.
pub fn normalize_url(u: &str) -> String {
    let u = u.trim().trim_end_matches('/');
    if u.contains("://") {
        u.to_string()
    } else {
        format!("http://{u}")
    }
}

/// An error with its causes, `: `-separated (what `{:#}` of anyhow prints), for errors that
/// end up as text (a fallback reason, a per-tablet problem) rather than in `main`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        // Transport errors often repeat their cause in their own text.
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}

/// Percent-encodes a path segment or query value (everything but RFC 3986's unreserved
/// characters): names are checked for `/` and spaces, not for `&`, `#` or `%`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The error text of a refusal: the server's `{"error": "..."}`, else its body as text.
pub fn server_message(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) if body.trim().is_empty() => "(empty answer)".to_string(),
        Err(_) => body.trim().to_string(),
    }
}

/// What the operator can do about a refusal with this status.
fn hint(status: StatusCode, token_sent: bool) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED if token_sent => " (check --token / MYHA_API_TOKEN)",
        StatusCode::UNAUTHORIZED => " (give --token or set MYHA_API_TOKEN)",
        StatusCode::FORBIDDEN => " (this needs a token with the `operate` role)",
        StatusCode::SERVICE_UNAVAILABLE => " (the orchestrator cannot reach etcd)",
        _ => "",
    }
}

/// A client for one orchestrator.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// The same without a total timeout, for the streaming reparent.
    streaming: reqwest::Client,
}

impl Api {
    /// A client for the orchestrator `args` name (or the sandbox's); an error when none is
    /// known.
    pub fn from_args(args: &ApiArgs) -> Result<Api, ApiError> {
        let base = orchestrator_url(args.orchestrator.as_deref(), false, args.dir.as_deref())
            .ok_or_else(|| ApiError::NoOrchestrator {
                sandbox_dir: sandbox_dir(args.dir.as_deref()).display().to_string(),
            })?;
        let token = token_for(
            args.token.token.as_deref(),
            args.orchestrator.as_deref(),
            false,
            args.dir.as_deref(),
        );
        Api::with_dir(&base, token, args.dir.as_deref())
    }

    /// A client for the orchestrator at `base`; an `https://` one is trusted by the CA of
    /// `--ca` (or the sandbox's).
    pub fn new(base: &str, token: Option<String>) -> Result<Api, ApiError> {
        Api::with_dir(base, token, None)
    }

    fn with_dir(base: &str, token: Option<String>, dir: Option<&Path>) -> Result<Api, ApiError> {
        let base = normalize_url(base);
        let ca = if base.starts_with("https://") {
            let security = crate::security::resolve(dir).map_err(ApiError::Security)?;
            let pem = security.tls.map(|m| m.ca_pem).ok_or(ApiError::NoCa)?;
            Some(reqwest::Certificate::from_pem(&pem).map_err(ApiError::Client)?)
        } else {
            None
        };
        pki::install_crypto_provider();
        let builder = || {
            let b = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                // A proxy from the environment would sit between the operator and an
                // orchestrator that is nearly always on a private address.
                .no_proxy();
            match &ca {
                Some(ca) => b.tls_certs_only([ca.clone()]),
                None => b,
            }
        };
        let base = base.as_str();
        Ok(Api {
            base: normalize_url(base),
            token: token.filter(|t| !t.trim().is_empty()),
            http: builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .map_err(ApiError::Client)?,
            streaming: builder().build().map_err(ApiError::Client)?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path` with the bearer token, answering JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let url = self.url(path);
        let req = self.authorized(self.http.get(&url));
        self.json_answer("GET", url, req).await
    }

    /// `POST path` with a JSON body and the bearer token, answering JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let url = self.url(path);
        let req = self.authorized(self.http.post(&url)).json(body);
        self.json_answer("POST", url, req).await
    }

    /// `DELETE path` with a JSON body and the bearer token, answering JSON.
    pub async fn delete<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let url = self.url(path);
        let req = self.authorized(self.http.delete(&url)).json(body);
        self.json_answer("DELETE", url, req).await
    }

    /// `POST path` with a JSON body and the bearer token, for a streamed answer: the response
    /// once its status is a success (its body not read), else the refusal.
    pub async fn post_stream<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, ApiError> {
        let url = self.url(path);
        let req = self.authorized(self.streaming.post(&url)).json(body);
        let resp = req.send().await.map_err(|source| ApiError::Unreachable {
            method: "POST",
            url: url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(self.refused("POST", url, status, &body))
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t.trim()),
            None => req,
        }
    }

    fn refused(
        &self,
        method: &'static str,
        url: String,
        status: StatusCode,
        body: &str,
    ) -> ApiError {
        ApiError::Refused {
            method,
            url,
            status,
            message: server_message(body),
            hint: hint(status, self.token.is_some()),
        }
    }

    async fn json_answer<T: DeserializeOwned>(
        &self,
        method: &'static str,
        url: String,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let resp = req.send().await.map_err(|source| ApiError::Unreachable {
            method,
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|source| ApiError::Body {
            method,
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(self.refused(method, url, status, &body));
        }
        serde_json::from_str(&body).map_err(|source| ApiError::Decode {
            method,
            url,
            body: body.chars().take(500).collect(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        assert_eq!(normalize_url("127.0.0.1:15000/"), "http://127.0.0.1:15000");
        assert_eq!(normalize_url("https://o:1"), "https://o:1");
        assert_eq!(
            orchestrator_url(Some("o:1"), true, None).as_deref(),
            Some("http://o:1")
        );
        // Another cluster's etcd: never the sandbox's orchestrator.
        let d = tempfile::tempdir().unwrap();
        assert_eq!(orchestrator_url(None, true, Some(d.path())), None);
        assert_eq!(orchestrator_url(None, false, Some(d.path())), None);
    }

    #[test]
    fn refusals_carry_the_servers_reason() {
        assert_eq!(
            server_message(r#"{"error":"no shard x/0"}"#),
            "no shard x/0"
        );
        assert_eq!(server_message("plain text\n"), "plain text");
        assert_eq!(server_message(""), "(empty answer)");
        let api = Api::new("o:1", None).unwrap();
        let e = api.refused(
            "POST",
            "http://o:1/x".into(),
            StatusCode::UNAUTHORIZED,
            r#"{"error":"needs a token"}"#,
        );
        let text = e.to_string();
        assert!(text.contains("401 Unauthorized: needs a token"), "{text}");
        assert!(text.contains("--token"), "{text}");
        assert!(!e.is_unavailable());
        let e = api.refused("GET", "u".into(), StatusCode::SERVICE_UNAVAILABLE, "{}");
        assert!(e.is_unavailable());
        let e = api.refused(
            "POST",
            "u".into(),
            StatusCode::FORBIDDEN,
            r#"{"error":"the token `grafana` has the `read` role"}"#,
        );
        assert!(e
            .to_string()
            .ends_with("`read` role (this needs a token with the `operate` role)"));
        assert!(!e.is_unavailable());
    }

    #[test]
    fn an_answer_that_did_not_happen_is_an_error() {
        let e =
            print_change(&serde_json::json!({"ok": false}), false, "x".into(), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the orchestrator answered without doing it: x"
        );
    }

    #[test]
    fn the_token_is_the_flag_else_the_sandboxs() {
        let d = tempfile::tempdir().unwrap();
        let dir = Some(d.path());
        assert_eq!(
            token_for(Some(" t "), None, false, dir).as_deref(),
            Some("t")
        );
        // No sandbox there: nothing to fall back on.
        assert_eq!(token_for(None, None, false, dir), None);
        assert_eq!(token_for(Some(" "), None, false, dir), None);
        // Another orchestrator (or another cluster's etcd): never the sandbox's token.
        assert_eq!(token_for(None, Some("o:1"), false, dir), None);
        assert_eq!(token_for(None, None, true, dir), None);
    }

    #[test]
    fn encodes_names() {
        assert_eq!(encode("commerce"), "commerce");
        assert_eq!(encode("-80"), "-80");
        assert_eq!(encode("a&b#c%"), "a%26b%23c%25");
    }

    #[test]
    fn no_sandbox_no_etcd() {
        let d = tempfile::tempdir().unwrap();
        let e = etcd_endpoints(&[], Some(d.path())).unwrap_err();
        assert!(e.to_string().contains("no --etcd"), "{e}");
        assert_eq!(
            etcd_endpoints(&["http://e:1".into()], Some(d.path())).unwrap(),
            vec!["http://e:1".to_string()]
        );
    }
}
