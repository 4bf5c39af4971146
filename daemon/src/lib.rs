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

/// `message` with every quoted value replaced by `***`: double-quoted parts always, and the
/// backtick-quoted value of serde's `invalid type: integer `…`` / `invalid value: …` (a
/// number, float or boolean given for a secret). Other backtick parts (field names in
/// `unknown field `x`, expected one of …`) are names, not values, and stay.
fn mask_quoted(message: &str) -> String {
    let values_in_backticks =
        message.starts_with("invalid type:") || message.starts_with("invalid value:");
    let mut out = String::with_capacity(message.len());
    let mut inside: Option<char> = None;
    for c in message.chars() {
        match inside {
            Some(q) if c == q => {
                out.push_str("***");
                out.push(c);
                inside = None;
            }
            Some(_) => {}
            None if c == '"' || (c == '`' && values_in_backticks) => {
                out.push(c);
                inside = Some(c);
            }
            None => out.push(c),
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

/// The keys of a daemon's `[tls]` section (its gRPC certificates), for errors.
pub const TLS_KEYS: pki::TlsKeys = ["tls.ca_file", "tls.cert_file", "tls.key_file"];

/// Loads a TLS section (see [`pki::TlsFiles::load`]), mapping a bad file to a config error
/// naming its key (`keys`).
pub fn load_tls(
    tls: Option<&pki::TlsFiles>,
    keys: pki::TlsKeys,
) -> Result<Option<pki::Material>, ConfigError> {
    tls.map(|t| {
        t.load(keys).map_err(|e| match e {
            pki::PkiError::File { key, message } => invalid(key, message),
            other => invalid(keys[1], other.to_string()),
        })
    })
    .transpose()
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
    /// The etcd user, when etcd has authentication enabled; its password is `password`,
    /// the content of `password_file` or the variable `password_env` (exactly one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub password: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// `[etcd.tls]`: the CA that etcd's certificate must chain to, and this daemon's client
    /// certificate (etcd's `--client-cert-auth`). Needs `https://` endpoints. Last: a table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<pki::TlsFiles>,
}

/// The keys of `[etcd.tls]`, for errors.
pub const ETCD_TLS_KEYS: pki::TlsKeys = [
    "etcd.tls.ca_file",
    "etcd.tls.cert_file",
    "etcd.tls.key_file",
];

/// Connecting to etcd as an `[etcd]` section says failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConnectError {
    /// A file the section names (certificate, key, password) is missing or bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// etcd refused (TLS, user, password) or the endpoints are malformed.
    #[error(transparent)]
    Topo(#[from] topo::TopoError),
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
    /// `endpoints` under `prefix`, plaintext and without a user; every other setting at its
    /// default (for tools that write configs).
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdSection {
        EtcdSection {
            endpoints,
            prefix: prefix.to_string(),
            dial_timeout: default_dial_timeout(),
            lease_ttl: default_lease_ttl(),
            username: None,
            password: Secret::default(),
            password_file: None,
            password_env: None,
            tls: None,
        }
    }

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
        self.validate_security()?;
        // Read the files now, so that a missing certificate or password file fails the
        // start (and `--check-config`) naming its key, not the first connection.
        self.access().map(drop)
    }

    /// The user, password and TLS settings fit together (files not read).
    fn validate_security(&self) -> Result<(), ConfigError> {
        let password_given = [
            (!self.password.is_empty(), "etcd.password"),
            (self.password_file.is_some(), "etcd.password_file"),
            (self.password_env.is_some(), "etcd.password_env"),
        ];
        match &self.username {
            Some(u) if u.trim().is_empty() => {
                return Err(invalid("etcd.username", "must not be empty"));
            }
            Some(_) => {
                if !password_given.iter().any(|(given, _)| *given) {
                    return Err(invalid(
                        "etcd.username",
                        "needs a password: set one of `etcd.password`, `etcd.password_file` \
                         and `etcd.password_env`",
                    ));
                }
            }
            None => {
                if let Some((_, key)) = password_given.iter().find(|(given, _)| *given) {
                    return Err(invalid(
                        key,
                        "a password without `etcd.username`: set the user it belongs to",
                    ));
                }
            }
        }
        let http = self.endpoints.iter().find(|e| e.starts_with("http://"));
        let https = self.endpoints.iter().find(|e| e.starts_with("https://"));
        match (&self.tls, http, https) {
            (Some(_), Some(e), _) => Err(invalid(
                "etcd.endpoints",
                format!(
                    "{e} is plaintext while [etcd.tls] is set: use https:// (or host:port) \
                     endpoints"
                ),
            )),
            (None, _, Some(e)) => Err(invalid(
                "etcd.tls",
                format!(
                    "{e} is https:// but there is no [etcd.tls] section naming the CA to \
                     verify etcd with (ca_file) and this daemon's certificate (cert_file, \
                     key_file)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The TLS material and user to reach etcd with, read from the files this section names
    /// (errors name the key of the file at fault).
    pub fn access(&self) -> Result<topo::EtcdAccess, ConfigError> {
        let tls = load_tls(self.tls.as_ref(), ETCD_TLS_KEYS)?;
        let password = SecretSource {
            keys: ["etcd.password", "etcd.password_file", "etcd.password_env"],
            inline: &self.password,
            file: self.password_file.as_deref(),
            env: self.password_env.as_deref(),
        }
        .resolve()?;
        let user = match &self.username {
            Some(name) if password.is_empty() => {
                return Err(invalid(
                    "etcd.password",
                    format!("the password of etcd user {name:?} is empty"),
                ))
            }
            Some(name) => Some(topo::EtcdUser::new(name, password.expose())),
            None => None,
        };
        Ok(topo::EtcdAccess { tls, user })
    }

    /// This section as config text (`[etcd]`, and `[etcd.tls]` when set), for tools that
    /// write a daemon's config.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct Wrapper<'a> {
            etcd: &'a EtcdSection,
        }
        // Serialising plain data with string keys cannot fail.
        toml::to_string(&Wrapper { etcd: self }).unwrap_or_default()
    }

    /// Connects to etcd as this section says: every daemon's one way in (files are read
    /// again here, so a restarted connection picks up a rotated password file).
    pub async fn connect(&self) -> Result<topo::Topo, EtcdConnectError> {
        let access = self.access()?;
        Ok(
            topo::Topo::connect_with(&self.endpoints, &self.prefix, self.dial_timeout, &access)
                .await?,
        )
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

/// `filter` with each comma-separated directive trimmed (empty ones dropped), as env_logger
/// reads it: tracing-subscriber 0.3.23 parses a directive's trimmed text but slices the
/// untrimmed one with those offsets, so a directive with leading whitespace names the wrong
/// target (`" warn"` is the target ` warn` at trace level: nothing is logged).
fn filter_directives(filter: &str) -> String {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

impl LogSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        // tracing-subscriber's directive parser panics on some non-ASCII text (it slices at a
        // byte inside a character: found by fuzzing); levels and targets are ASCII anyway.
        if !self.level.is_ascii() {
            return Err(invalid(
                "log.level",
                "must be ASCII: a level (info, debug, ...) or a tracing filter",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(filter_directives(&self.level))
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
        // $MYHA_LOG only when ASCII (see `validate`); otherwise the configured level.
        let filter = std::env::var("MYHA_LOG")
            .ok()
            .filter(|v| v.is_ascii())
            .and_then(|v| tracing_subscriber::EnvFilter::try_new(filter_directives(&v)).ok())
            .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(filter_directives(&self.level)));
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
        assert_eq!(
            mask_quoted("invalid type: integer `31415`, expected a string"),
            "invalid type: integer `***`, expected a string"
        );
        assert_eq!(
            mask_quoted("unknown field `passwrd`, expected one of `password`"),
            "unknown field `passwrd`, expected one of `password`"
        );
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_quoted_either() {
        // A numeric (or boolean, or float) password: serde quotes such a value in backticks,
        // not double quotes, and the error reaches the logs and `--check-config`'s output.
        for value in ["31415926535", "2.71828182", "true", "-4242424242"] {
            let text = format!(
                "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nusername = \"myha\"\n\
                 password = {value}\n"
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("password") && e.contains("line 4"), "{e}");
            assert!(!e.contains(value), "the value leaked: {e}");
            assert!(e.contains("expected a string"), "the reason is kept: {e}");
        }
        // Other keys keep their value in the error: it helps and is no secret.
        let text = "[etcd]\nendpoints = [\"x\"]\nlease_ttl = 31415926535\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("31415926535"), "{e}");
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

    /// `" warn"` validated as the target ` warn` at trace level, which logs nothing.
    #[test]
    fn spaces_around_log_directives_mean_what_they_say() {
        let level = |l: &str| LogSection {
            format: LogFormat::Human,
            level: l.into(),
        };
        assert_eq!(filter_directives(" warn "), "warn");
        assert_eq!(
            filter_directives("info, ,myha_agent=debug "),
            "info,myha_agent=debug"
        );
        assert_eq!(
            tracing_subscriber::EnvFilter::try_new(filter_directives(" warn"))
                .map(|f| f.to_string())
                .ok(),
            Some("warn".to_string())
        );
        assert!(level("info, myha_agent=debug").validate().is_ok());
    }

    #[test]
    fn a_non_ascii_log_level_is_refused_not_a_panic() {
        // The fuzzer's input: tracing-subscriber panicked on it ("not a char boundary").
        let text = "[etcd]\nendpoints = [\"x\"]\n[log]\nlevel = \"  in\u{fffd}[agent]o\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("log.level") && e.contains("ASCII"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let e = load_toml::<Cfg>(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
    }

    /// A CA, a client certificate and a password file in a temp dir, and the `[etcd]` text
    /// naming them (`extra` lines added to `[etcd]`).
    struct EtcdFiles {
        dir: tempfile::TempDir,
        tls: pki::TlsFiles,
        password_file: PathBuf,
    }

    impl EtcdFiles {
        fn new() -> EtcdFiles {
            let dir = tempfile::tempdir().unwrap();
            let ca = pki::issue::Authority::new("etcd test CA").unwrap();
            let tls = ca
                .issue(&pki::issue::Leaf::client("myha-orchestrator"))
                .unwrap()
                .write(dir.path(), "client", &ca)
                .unwrap();
            let password_file = dir.path().join("etcd-password");
            std::fs::write(&password_file, "pw-from-file\n").unwrap();
            EtcdFiles {
                dir,
                tls,
                password_file,
            }
        }

        fn text(&self, extra: &str, tls: bool) -> String {
            let mut t = format!("[etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\n{extra}");
            if tls {
                t += &format!(
                    "[etcd.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                    self.tls.ca_file, self.tls.cert_file, self.tls.key_file
                );
            }
            t
        }
    }

    #[test]
    fn etcd_tls_and_user_resolve_from_files() {
        let f = EtcdFiles::new();
        let extra = format!(
            "username = \"myha\"\npassword_file = {:?}\n",
            f.password_file
        );
        let c = parse(&f.text(&extra, true)).unwrap();
        let access = c.etcd.access().unwrap();
        assert_eq!(access.tls.as_ref().unwrap().identity, "myha-orchestrator");
        assert_eq!(access.user.as_ref().unwrap().name(), "myha");
        // The password is read, and stays out of every Debug output.
        let debug = format!("{:?} {:?}", c.etcd, access);
        assert!(!debug.contains("pw-from-file"), "{debug}");

        // Inline (masked in Debug) and from the environment.
        let c = parse(&f.text("username = \"myha\"\npassword = \"inline-pw\"\n", true)).unwrap();
        assert!(!format!("{:?}", c.etcd).contains("inline-pw"));
        std::env::set_var("MYHA_TEST_ETCD_PW", "env-pw");
        let c = parse(&f.text(
            "username = \"myha\"\npassword_env = \"MYHA_TEST_ETCD_PW\"\n",
            true,
        ))
        .unwrap();
        assert!(c.etcd.access().unwrap().user.is_some());

        // Plaintext without a user stays as it was.
        let c = parse("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap();
        let access = c.etcd.access().unwrap();
        assert!(access.tls.is_none() && access.user.is_none());
    }

    #[test]
    fn etcd_section_round_trips_through_its_toml() {
        let f = EtcdFiles::new();
        let extra = format!(
            "username = \"myha\"\npassword_file = {:?}\n",
            f.password_file
        );
        let c = parse(&f.text(&extra, true)).unwrap();
        let text = c.etcd.to_toml();
        assert!(text.contains("[etcd.tls]"), "{text}");
        assert_eq!(parse(&text).unwrap().etcd, c.etcd);
        // An inline password is written back (it was in the config), never a resolved one.
        assert!(!text.contains("pw-from-file"), "{text}");
    }

    #[test]
    fn etcd_security_errors_name_the_key() {
        let f = EtcdFiles::new();
        let pw_file = format!("password_file = {:?}\n", f.password_file);
        let missing_ca = f
            .text("", true)
            .replace(&format!("{:?}", f.tls.ca_file), "\"/nonexistent/ca.pem\"");
        let key_as_cert = f.text("", true).replace(
            &format!("cert_file = {:?}", f.tls.cert_file),
            &format!("cert_file = {:?}", f.tls.key_file),
        );
        let cases = [
            (
                f.text("username = \"myha\"\n", true),
                "etcd.username",
                "needs a password",
            ),
            (
                f.text("username = \"\"\npassword = \"x\"\n", true),
                "etcd.username",
                "must not be empty",
            ),
            (
                f.text("password = \"secret-value\"\n", true),
                "etcd.password",
                "without `etcd.username`",
            ),
            (f.text(&pw_file, true), "etcd.password_file", "without"),
            (
                f.text(
                    &format!("username = \"myha\"\npassword = \"secret-value\"\n{pw_file}"),
                    true,
                ),
                "etcd.password_file",
                "at most one",
            ),
            (
                f.text(
                    "username = \"myha\"\npassword_file = \"/nonexistent/pw\"\n",
                    true,
                ),
                "etcd.password_file",
                "cannot read /nonexistent/pw",
            ),
            (
                f.text(
                    "username = \"myha\"\npassword_env = \"MYHA_TEST_NO_SUCH_VAR\"\n",
                    true,
                ),
                "etcd.password_env",
                "MYHA_TEST_NO_SUCH_VAR",
            ),
            (f.text("", false), "etcd.tls", "no [etcd.tls]"),
            (
                f.text("", true)
                    .replace("https://127.0.0.1:2379", "http://127.0.0.1:2379"),
                "etcd.endpoints",
                "plaintext while [etcd.tls] is set",
            ),
            (
                missing_ca,
                "etcd.tls.ca_file",
                "cannot read /nonexistent/ca.pem",
            ),
            (key_as_cert, "etcd.tls.cert_file", "CERTIFICATE"),
            (
                f.text("", true).replace("ca_file", "ca_fil"),
                "ca_fil",
                "unknown field",
            ),
        ];
        for (text, key, words) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains(words),
                "{text}\nexpected `{key}` and {words:?} in: {e}"
            );
            assert!(!e.contains("secret-value"), "{e}");
        }
        drop(f.dir);
    }
}
