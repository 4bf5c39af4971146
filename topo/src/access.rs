//! How a client proves itself to a secured etcd ([`EtcdAccess`]: TLS material and a user),
//! the per-endpoint authentication state, and what etcd's refusals mean in words an operator
//! can act on ([`Refusal`]).

use std::sync::atomic::{AtomicBool, Ordering};

use etcd_client::{Client, ConnectOptions};

/// How to reach a secured etcd. The default is plaintext and no user.
#[derive(Clone, Debug, Default)]
pub struct EtcdAccess {
    /// The CA that etcd's server certificate must chain to, and this client's certificate
    /// (for etcd's `--client-cert-auth`). The endpoints must be `https://` (or bare
    /// `host:port`, which then means `https://`).
    pub tls: Option<pki::Material>,
    /// The etcd user to authenticate as (etcd's auth enabled).
    pub user: Option<EtcdUser>,
}

impl EtcdAccess {
    /// Plaintext, no user.
    pub fn plain() -> EtcdAccess {
        EtcdAccess::default()
    }

    pub(crate) fn apply(&self, options: ConnectOptions) -> ConnectOptions {
        // The user is not given to etcd-client here: with it, `Client::connect` authenticates
        // at once and fails when etcd (or one member) is down, while the topology layer
        // connects lazily and must start without etcd. Authentication happens per endpoint on
        // first use instead ([`Authenticator`]); once it succeeded the crate keeps the user
        // and refreshes an expired token by itself.
        let options = options.with_auto_token_refresh(true);
        match &self.tls {
            Some(m) => options.with_tls(m.client_tls()),
            None => options,
        }
    }
}

/// An etcd user name and password. The password never appears in `Debug` output.
#[derive(Clone)]
pub struct EtcdUser {
    name: String,
    password: String,
}

impl EtcdUser {
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> EtcdUser {
        EtcdUser {
            name: name.into(),
            password: password.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"***")
            .finish()
    }
}

/// Which authentication each endpoint's client holds. A client authenticates on its first
/// call and again whenever etcd says its token no longer counts (see [`needs_auth`]).
pub(crate) struct Authenticator {
    pub(crate) user: EtcdUser,
    ready: Vec<AtomicBool>,
    /// One authentication at a time per endpoint (concurrent first calls wait for it).
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Authenticator {
    pub(crate) fn new(user: EtcdUser, endpoints: usize) -> Authenticator {
        Authenticator {
            user,
            ready: (0..endpoints).map(|_| AtomicBool::new(false)).collect(),
            locks: (0..endpoints)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    pub(crate) fn is_ready(&self, i: usize) -> bool {
        self.ready[i].load(Ordering::Acquire)
    }

    /// The next call on endpoint `i` authenticates again.
    pub(crate) fn invalidate(&self, i: usize) {
        self.ready[i].store(false, Ordering::Release);
    }

    /// Authenticates `client` (endpoint `i`) unless it is already (or another task did it
    /// while this one waited).
    pub(crate) async fn authenticate(
        &self,
        i: usize,
        client: &Client,
    ) -> Result<(), etcd_client::Error> {
        if self.is_ready(i) {
            return Ok(());
        }
        let _one = self.locks[i].lock().await;
        if self.is_ready(i) {
            return Ok(());
        }
        // `update_user` sets the user and token on state every clone of this client shares.
        let mut client = client.clone();
        match client
            .update_user(Some((self.user.name.clone(), self.user.password.clone())))
            .await
        {
            Ok(()) => {}
            // etcd without auth: nothing to authenticate; if auth is enabled later, the
            // refusal ("user name is empty") brings us back here.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains(AUTH_NOT_ENABLED) => {
                tracing::warn!(
                    user = %self.user.name,
                    "etcd authentication is not enabled: connecting without the configured user"
                );
            }
            Err(e) => return Err(e),
        }
        self.ready[i].store(true, Ordering::Release);
        Ok(())
    }
}

// etcd's own texts (api/v3rpc/rpctypes), matched rather than codes alone: the Lock and
// Election services lose the code and keep the text.
const AUTH_FAILED: &str = "authentication failed";
const USER_EMPTY: &str = "user name is empty";
const USER_NOT_FOUND: &str = "user name not found";
const PERMISSION_DENIED: &str = "permission denied";
const INVALID_TOKEN: &str = "invalid auth token";
const OLD_REVISION: &str = "revision of auth store is old";
const AUTH_NOT_ENABLED: &str = "authentication is not enabled";

/// What kind of refusal: the TLS handshake, the user and password, or a role's permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Tls,
    Authentication,
    Permission,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Tls => "TLS",
            Refusal::Authentication => "authentication",
            Refusal::Permission => "permission",
        })
    }
}

/// Whether etcd's answer means this endpoint's authentication must be done again: the token
/// expired or was lost (a restarted member forgets simple tokens), etcd's users or roles
/// changed since (every token then carries an old auth revision), or auth was enabled after
/// we connected.
pub(crate) fn needs_auth(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            m.contains(INVALID_TOKEN) || m.contains(OLD_REVISION) || m.contains(USER_EMPTY)
        }
        _ => false,
    }
}

/// The refusal `e` is, if it is one, and why in an operator's words. `user` is the configured
/// user; `identity` the common name of the client certificate (which etcd takes as the user
/// when no user authenticated).
pub(crate) fn refusal(
    e: &etcd_client::Error,
    user: Option<&str>,
    identity: Option<&str>,
) -> Option<(Refusal, String)> {
    if let etcd_client::Error::GRpcStatus(s) = e {
        let m = s.message();
        let who = match (user, identity) {
            (Some(u), _) => format!("etcd user {u:?}"),
            (None, Some(cn)) => format!(
                "no etcd user given, so etcd took the client certificate's common name {cn:?} \
                 as the user, and"
            ),
            (None, None) => "no etcd user given, and".to_string(),
        };
        if m.contains(AUTH_FAILED) {
            return Some((
                Refusal::Authentication,
                format!(
                    "etcd refused the user name or password of user {:?} ({m})",
                    user.unwrap_or("")
                ),
            ));
        }
        if m.contains(USER_EMPTY) {
            return Some((
                Refusal::Authentication,
                format!(
                    "etcd has authentication enabled and this client gave no user name and \
                     password ({m})"
                ),
            ));
        }
        if m.contains(USER_NOT_FOUND) {
            return Some((
                Refusal::Authentication,
                format!("etcd does not know {who} ({m})"),
            ));
        }
        if m.contains(INVALID_TOKEN) || m.contains(OLD_REVISION) {
            return Some((
                Refusal::Authentication,
                format!("etcd no longer accepts this client's auth token; it authenticates again on the next call ({m})"),
            ));
        }
        if s.code() == tonic::Code::PermissionDenied || m.contains(PERMISSION_DENIED) {
            return Some((
                Refusal::Permission,
                format!("permission denied: {who} has no role granting this key range ({m})"),
            ));
        }
    }
    tls_failure(e).map(|why| (Refusal::Tls, why))
}

/// Whether `e` is a failed TLS handshake, and why in words: the texts of rustls and of the
/// TLS alerts etcd sends, found anywhere in the error's chain (tonic nests them).
fn tls_failure(e: &etcd_client::Error) -> Option<String> {
    let chain = etcd_error_text(e);
    tls_reason(&chain).map(|why| format!("{why} ({chain})"))
}

/// Whether `e` may hide a TLS refusal: a connection closed or reset under the call, which is
/// how a refused client certificate usually shows (see `tls_probe`).
pub(crate) fn maybe_tls_refusal(e: &etcd_client::Error) -> bool {
    let lower = etcd_error_text(e).to_ascii_lowercase();
    lower.contains("closed") || lower.contains("reset") || lower.contains("broken pipe")
}

/// What a TLS error text means, in words; `None` when it is no TLS failure.
pub(crate) fn tls_reason(text: &str) -> Option<&'static str> {
    let lower = text.to_ascii_lowercase();
    let why = if lower.contains("certificaterequired") || lower.contains("certificate required") {
        "etcd requires a client certificate and this client gave none"
    } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        "etcd's server certificate is not signed by the CA this client trusts"
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        "etcd's server certificate does not name the address this client connects to"
    } else if lower.contains("expired") && lower.contains("certificate") {
        "a certificate has expired (etcd's, or this client's as etcd says)"
    } else if lower.contains("unknownca")
        || lower.contains("unknown ca")
        || lower.contains("badcertificate")
        || lower.contains("bad certificate")
    {
        "etcd rejected this client's certificate (not signed by a CA etcd trusts, expired, or \
         not for client authentication)"
    } else if lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
        || lower.contains("invalid content type")
    {
        "etcd did not answer with TLS: is the endpoint http:// rather than https://?"
    } else if lower.contains("http2 error") && lower.contains("frame") && lower.contains("tls") {
        "etcd answered with TLS to a plaintext connection: use an https:// endpoint"
    } else if lower.contains("handshake")
        || lower.contains("certificate")
        || lower.contains("alert")
    {
        "TLS handshake failed"
    } else {
        return None;
    };
    Some(why)
}

/// An etcd-client error with the causes it hides: its `Display` of a transport error is
/// "transport error: transport error" and it has no `source()`, so the inner errors (the TLS
/// alert, the refused connection) are read here.
pub(crate) fn etcd_error_text(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    match e {
        etcd_client::Error::TransportError(t) => chain_onto("transport error".into(), t),
        // The status's own `Display` is a debug dump of itself and its source.
        etcd_client::Error::GRpcStatus(s) => match s.source() {
            Some(inner) => chain_onto(s.message().to_string(), inner),
            None => s.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// `head`, then `e` and each of its sources not already said.
fn chain_onto(mut head: String, e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = Some(e);
    while let Some(s) = cur {
        let text = s.to_string();
        if !head.contains(&text) {
            head.push_str(": ");
            head.push_str(&text);
        }
        cur = s.source();
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, m: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, m))
    }

    #[test]
    fn refusals_name_the_cause() {
        let wrong = status(
            tonic::Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        let (kind, why) = refusal(&wrong, Some("myha"), None).unwrap();
        assert_eq!(kind, Refusal::Authentication);
        assert!(
            why.contains("user name or password of user \"myha\""),
            "{why}"
        );

        let denied = status(
            tonic::Code::PermissionDenied,
            "etcdserver: permission denied",
        );
        let (kind, why) = refusal(&denied, None, Some("myhactl")).unwrap();
        assert_eq!(kind, Refusal::Permission);
        assert!(why.contains("common name \"myhactl\""), "{why}");

        let empty = status(
            tonic::Code::InvalidArgument,
            "etcdserver: user name is empty",
        );
        assert!(needs_auth(&empty));
        let (_, why) = refusal(&empty, None, None).unwrap();
        assert!(why.contains("gave no user name and password"), "{why}");

        let old = status(
            tonic::Code::InvalidArgument,
            "etcdserver: revision of auth store is old",
        );
        assert!(needs_auth(&old));
        assert!(!needs_auth(&wrong));

        let other = status(tonic::Code::Unavailable, "etcdserver: leader changed");
        assert!(refusal(&other, Some("myha"), None).is_none());
    }

    #[test]
    fn the_password_stays_out_of_debug() {
        let u = EtcdUser::new("myha", "s3cret");
        let d = format!(
            "{:?}",
            EtcdAccess {
                tls: None,
                user: Some(u)
            }
        );
        assert!(d.contains("myha") && !d.contains("s3cret"), "{d}");
    }
}
