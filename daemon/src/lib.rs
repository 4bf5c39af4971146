//! What every myha daemon shares: the `[etcd]` and `[log]` config sections, strict TOML loading
//! that names the offending key, logging and metrics setup, the runtime and the shutdown signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

pub fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Parses TOML text; serde's message names the unknown, missing or malformed key. The message
/// gives the line and column but never quotes the line: it may hold a password or a token
/// (a misspelled `passwrd = "..."` is an unknown key whose value would otherwise be echoed).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut message = e.message().trim_end().to_string();
        let at = e.span().map(|span| {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            // The key of that line (the text before `=`): key names are no secret.
            let line_text = text[line_start..].lines().next().unwrap_or("");
            let key = line_text
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty());
            if key.is_some_and(|k| {
                let k = k.to_ascii_lowercase();
                ["password", "passwd", "token", "secret"]
                    .iter()
                    .any(|w| k.contains(w))
            }) {
                // serde quotes an invalid value: not this one.
                message = mask_quoted(&message);
            }
            match key {
                Some(k) => format!("line {line}, column {column}, key `{k}`: "),
                None => format!("line {line}, column {column}: "),
            }
        });
        ConfigError::Parse {
            path: PathBuf::new(),
            message: format!("{}{message}", at.unwrap_or_default()),
        }
    })
}

/// `message` with every double-quoted part replaced by `"***"`.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push_str("***\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// Reads and parses a config file; errors carry the path.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text).map_err(|e| match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// Refuses a zero duration, naming its key.
pub fn require_positive(durations: &[(&'static str, Duration)]) -> Result<(), ConfigError> {
    match durations.iter().find(|(_, d)| d.is_zero()) {
        Some((key, _)) => Err(invalid(key, "must be greater than zero")),
        None => Ok(()),
    }
}

/// A password or token from a config file: kept out of `Debug` output (configs are printed in
/// errors and traces) and serialised as written. Read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it (a connection, a statement that
    /// is itself redacted before any log).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Where a secret comes from: the config itself (`inline`), a file (`file`: its content, the
/// trailing newline trimmed; read at start, so a mode-0600 file owned by the daemon's user
/// keeps it out of the world-readable config), or an environment variable (`env`, e.g. set by
/// systemd's `LoadCredential`/`EnvironmentFile`). At most one; none is the empty secret. The
/// keys name the three settings in errors.
pub struct SecretSource<'a> {
    pub keys: [&'static str; 3],
    pub inline: &'a Secret,
    pub file: Option<&'a Path>,
    pub env: Option<&'a str>,
}

impl SecretSource<'_> {
    pub fn resolve(&self) -> Result<Secret, ConfigError> {
        let [inline_key, file_key, env_key] = self.keys;
        let given = [
            !self.inline.is_empty(),
            self.file.is_some(),
            self.env.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(invalid(
                file_key,
                format!("give at most one of `{inline_key}`, `{file_key}` and `{env_key}`"),
            ));
        }
        if let Some(path) = self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(file_key, format!("cannot read {}: {e}", path.display())))?;
            return Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = self.env {
            return match std::env::var(var) {
                Ok(v) => Ok(Secret(v)),
                Err(e) => Err(invalid(env_key, format!("environment variable {var}: {e}"))),
            };
        }
        Ok(self.inline.clone())
    }
}

/// `[etcd]`: where the topology lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_dial_timeout", with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// TTL of the leases this daemon holds (its registration, its locks): how long they outlive it.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
}

fn default_prefix() -> String {
    topo::DEFAULT_PREFIX.into()
}
fn default_dial_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

impl EtcdSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "must list at least one endpoint"));
        }
        if let Some(e) = self
            .endpoints
            .iter()
            .find(|e| e.trim().is_empty() || e.contains(char::is_whitespace))
        {
            return Err(invalid(
                "etcd.endpoints",
                format!("{e:?} is not an endpoint (host:port or http://host:port)"),
            ));
        }
        if !self.prefix.starts_with('/') {
            return Err(invalid("etcd.prefix", "must start with '/'"));
        }
        require_positive(&[("etcd.dial_timeout", self.dial_timeout)])?;
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "etcd.lease_ttl",
                "must be at least 1s (etcd leases have 1 s granularity)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// `[log]`; `$MYHA_LOG` (a tracing filter) overrides `level` at run time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Human,
            level: default_level(),
        }
    }
}

impl LogSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|_| {
                invalid(
                    "log.level",
                    format!("`{}` is not a level or filter", self.level),
                )
            })
    }

    /// Installs the global subscriber.
    pub fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_env("MYHA_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&self.level));
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        match self.format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Human => builder.init(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("installing the metrics recorder: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("starting the tokio runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Installs the Prometheus recorder; the daemon serves `handle.render()` at its own `/metrics`.
pub fn install_metrics() -> Result<metrics_exporter_prometheus::PrometheusHandle, StartError> {
    Ok(metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?)
}

/// Two workers: the daemons are I/O-bound and share small machines with mysqld.
pub fn runtime() -> Result<tokio::runtime::Runtime, StartError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        etcd: EtcdSection,
        #[serde(default)]
        log: LogSection,
    }

    fn parse(text: &str) -> Result<Cfg, ConfigError> {
        let c: Cfg = parse_toml(text)?;
        c.etcd.validate()?;
        c.log.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults() {
        let c = parse("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap();
        assert_eq!(c.etcd.prefix, "/myha");
        assert_eq!(c.etcd.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.log, LogSection::default());
    }

    #[test]
    fn a_parse_error_names_the_key_and_place_but_never_quotes_the_line() {
        // A misspelled password key: unknown, and its value must not reach the error (logs).
        let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\npasswrd = \"s3cret-value\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("passwrd") && e.contains("line 3"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        // A secret-looking key's invalid value is masked too.
        assert_eq!(
            mask_quoted(r#"invalid type: string "s3cret", expected a sequence"#),
            r#"invalid type: string "***", expected a sequence"#
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[etcd]\nendpoints = []\n", "etcd.endpoints"),
            (
                "[etcd]\nendpoints = [\"x\"]\nprefix = \"myha\"\n",
                "etcd.prefix",
            ),
            (
                "[etcd]\nendpoints = [\"x\"]\nlease_ttl = \"500ms\"\n",
                "etcd.lease_ttl",
            ),
            (
                "[etcd]\nendpoints = [\"x\"]\ndial_timeout = \"0s\"\n",
                "etcd.dial_timeout",
            ),
            (
                "[etcd]\nendpoints = [\"x\"]\ndial_timeout = \"soon\"\n",
                "dial_timeout",
            ),
            (
                "[etcd]\nendpoints = [\"x\"]\nendpoint = \"y\"\n",
                "endpoint",
            ),
            (
                "[etcd]\nendpoints = [\"x\"]\n[log]\nlevel = \"=\"\n",
                "log.level",
            ),
            (
                "[log]\nformat = \"xml\"\n[etcd]\nendpoints = [\"x\"]\n",
                "xml",
            ),
            ("[log]\n", "etcd"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?}: expected `{key}` in {e}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let e = load_toml::<Cfg>(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
    }
}
