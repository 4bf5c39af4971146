//! [`HarnessError`]: every failure names the process or step, and start failures carry the
//! log file and its last lines.

use std::path::PathBuf;
use std::time::Duration;

/// Result of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A process did not come up (exited, or not ready in time).
    #[error("{process} failed to start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    Start {
        process: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{what}: {source}")]
    Mysql {
        what: String,
        #[source]
        source: mysql_async::Error,
    },

    #[error("{what}: {source}")]
    Topo {
        what: String,
        #[source]
        source: topo::TopoError,
    },

    #[error("{what}: {message}")]
    Agent { what: String, message: String },

    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),

    /// An HTTP call to a daemon failed or answered unexpectedly.
    #[error("{what}: {message}")]
    Http { what: String, message: String },

    #[error("`{name}` not found; searched: {searched}. {hint}")]
    BinaryNotFound {
        name: String,
        searched: String,
        hint: String,
    },

    #[error("timed out after {after:?} waiting for {what}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Timeout {
        what: String,
        after: Duration,
        detail: Option<String>,
    },

    #[error("{process}: {message}")]
    Process { process: String, message: String },

    #[error("sandbox: {0}")]
    Sandbox(String),

    #[error("{0}")]
    Invalid(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }

    pub fn mysql(what: impl Into<String>) -> impl FnOnce(mysql_async::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Mysql { what, source }
    }

    pub(crate) fn topo(what: impl Into<String>) -> impl FnOnce(topo::TopoError) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Topo { what, source }
    }
}
