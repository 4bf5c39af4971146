//! Errors of the topology layer.

use std::time::Duration;

use crate::access::Refusal;
use crate::records::LockInfo;

/// A string that could not be parsed into one of the topology enums or an alias.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: expected {expected}")]
pub struct ParseError {
    /// What was being parsed, e.g. `durability`.
    pub what: &'static str,
    /// The offending input.
    pub value: String,
    /// What is allowed, e.g. `one of none, semi_sync`.
    pub expected: String,
}

/// Everything that can go wrong talking to etcd through [`crate::Topo`].
#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    /// etcd answered with an error (or the transport failed).
    #[error("etcd {op} on {key:?} failed: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd refused this client: the TLS handshake failed, or its user and password, or its
    /// role's permissions. Retrying does not help until the certificates, the user, the
    /// password or the role are fixed.
    #[error("etcd refused {op} on {key:?} {reason}")]
    Refused {
        op: &'static str,
        key: String,
        kind: Refusal,
        /// `at <endpoint> (<kind>): <why>` (one string: the variant stays small, as errors
        /// holding it are returned everywhere).
        reason: String,
    },
    /// etcd did not answer within the operation timeout.
    #[error("etcd {op} on {key:?} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    /// A value stored in etcd is not the JSON we expect.
    #[error("cannot decode the value of {key:?}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded (should not happen).
    #[error("cannot encode the value for {key:?}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The key does not exist.
    #[error("{key:?} not found")]
    NotFound { key: String },
    /// A name or argument is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Parsing an enum or alias failed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The shard lock is held by someone else (try-lock, or the wait timed out).
    #[error("shard lock {key:?} is held by {holder} ({purpose}, since {acquired_ms} ms){}",
        match .waited { Some(w) => format!(", waited {w:?}"), None => String::new() },
        holder = .holder.holder, purpose = .holder.purpose, acquired_ms = .holder.acquired_ms)]
    LockHeld {
        /// The lock prefix (`{p}/locks/{ks}/{shard}`).
        key: String,
        /// The current owner.
        holder: LockInfo,
        /// How long we waited, `None` for a try-lock.
        waited: Option<Duration>,
    },
    /// The lock (its lease or its key) is gone: lock-conditional writes are refused.
    #[error("shard lock {key:?} lost: {reason}")]
    LockLost { key: String, reason: String },
    /// A conditional write lost a race or its precondition does not hold.
    #[error("conflict on {key:?}: {detail}")]
    Conflict { key: String, detail: String },
    /// A lease could not be kept alive.
    #[error("lease {lease_id:x} lost: {reason}")]
    LeaseLost { lease_id: i64, reason: String },
    /// A background task is gone.
    #[error("{0} stopped")]
    Stopped(&'static str),
}

impl TopoError {
    /// The kind of refusal, when etcd refused this client (TLS, authentication, permission).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            TopoError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// True when the error means etcd could not be reached (timeout, transport, unavailable):
    /// retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            TopoError::Timeout { .. } => true,
            TopoError::Etcd { source, .. } => is_unavailable(source),
            _ => false,
        }
    }
}

/// True when an etcd-client error is a connectivity problem rather than an answer.
pub(crate) fn is_unavailable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
                | tonic::Code::Internal
        ),
        _ => false,
    }
}
