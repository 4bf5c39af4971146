//! Who may use the HTTP API: bearer tokens with a role, and the pure decision
//! [`authorize`] `(configured tokens, Authorization header, role needed) -> caller | 401/403`.
//!
//! - No token configured: every request passes as [`Principal::Anonymous`] (the config only
//!   allows that on a loopback `http_listen`, see `config::OrchestratorConfig::validate`).
//! - Tokens configured: every `/api/v1/...` request needs `Authorization: Bearer <token>`;
//!   reads need the `read` or `operate` role, changes need `operate`.
//!
//! The caller's identity ([`Caller::actor`]) is what control records and audit entries name:
//! `token:<name> from <ip>`, or `http-api from <ip>` without authentication. Nothing a client
//! writes in a request body is an identity.

use std::net::IpAddr;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

/// Tokens are config secrets like the agents' passwords: kept out of `Debug` output.
pub use daemon::Secret;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `GET /api/v1/...`: the shard view, the audit log, the quarantine list.
    Read,
    /// Everything `read` may, and the changes (`POST`/`DELETE`).
    Operate,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }

    /// Whether a token of this role may do what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        match needed {
            Role::Read => true,
            Role::Operate => self == Role::Operate,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured token, resolved (its file read) and validated at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub secret: Secret,
}

/// Who a request is, as far as the token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No token is configured: nobody is authenticated.
    Anonymous,
    /// The holder of the configured token `name`.
    Token { name: String, role: Role },
}

/// An authorized caller: the principal and the client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub peer: Option<IpAddr>,
}

impl Caller {
    /// The identity recorded as actor (control records' `by`, audit entries, the operator
    /// reparent's requester): `token:<name> from <ip>`, or `http-api from <ip>` when no
    /// authentication is configured.
    pub fn actor(&self) -> String {
        let who = match &self.principal {
            Principal::Anonymous => "http-api".to_string(),
            Principal::Token { name, .. } => format!("token:{name}"),
        };
        match self.peer {
            Some(ip) => format!("{who} from {ip}"),
            None => who,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no token, a malformed header, or a token that is none of the configured ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: a valid token whose role does not allow the request.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }
}

/// Compares `got` with `want` in time that depends only on `want`'s length (the configured
/// secret's, constant), not on where the first difference is nor on `got`'s length.
fn constant_time_eq(got: &[u8], want: &[u8]) -> bool {
    let mut diff = u8::from(got.len() != want.len());
    for (i, w) in want.iter().enumerate() {
        diff |= got.get(i).copied().unwrap_or(0) ^ w;
    }
    diff == 0
}

/// The decision for one request: `tokens` configured, the request's `Authorization` header
/// (`None`: absent), the role the request needs. Pure.
pub fn authorize(
    tokens: &[ApiToken],
    authorization: Option<&str>,
    needed: Role,
) -> Result<Principal, AuthError> {
    if tokens.is_empty() {
        return Ok(Principal::Anonymous);
    }
    let Some(value) = authorization else {
        return Err(AuthError::Unauthenticated(
            "this orchestrator requires a bearer token ([orchestrator] api_tokens): send \
             `Authorization: Bearer <token>`"
                .into(),
        ));
    };
    let Some((scheme, presented)) = value.trim().split_once(' ') else {
        return Err(AuthError::Unauthenticated(
            "the Authorization header is not `Bearer <token>`".into(),
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Unauthenticated(format!(
            "the Authorization scheme is `{scheme}`, not `Bearer`"
        )));
    }
    let presented = presented.trim().as_bytes();
    // Every token is compared (no early exit), so the time does not say which one matched.
    // The config refuses two tokens with the same secret: at most one matches.
    let mut found = None;
    for t in tokens {
        if constant_time_eq(presented, t.secret.expose().as_bytes()) {
            found = Some(t);
        }
    }
    let Some(t) = found else {
        return Err(AuthError::Unauthenticated(
            "wrong bearer token: it is none of this orchestrator's api_tokens".into(),
        ));
    };
    if !t.role.allows(needed) {
        return Err(AuthError::Forbidden(format!(
            "the token `{}` has the `{}` role; this request changes something and needs a token \
             with the `{needed}` role",
            t.name, t.role
        )));
    }
    Ok(Principal::Token {
        name: t.name.clone(),
        role: t.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<ApiToken> {
        vec![
            ApiToken {
                name: "ops".into(),
                role: Role::Operate,
                secret: "op-secret".into(),
            },
            ApiToken {
                name: "grafana".into(),
                role: Role::Read,
                secret: "read-secret".into(),
            },
        ]
    }

    fn unauthenticated(r: Result<Principal, AuthError>) -> String {
        match r {
            Err(e @ AuthError::Unauthenticated(_)) => {
                assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
                e.to_string()
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }

    #[test]
    fn without_tokens_everything_passes_anonymously() {
        for needed in [Role::Read, Role::Operate] {
            assert_eq!(authorize(&[], None, needed), Ok(Principal::Anonymous));
            assert_eq!(
                authorize(&[], Some("Bearer whatever"), needed),
                Ok(Principal::Anonymous)
            );
        }
    }

    #[test]
    fn a_token_is_needed_for_reads_and_changes() {
        let t = tokens();
        for needed in [Role::Read, Role::Operate] {
            let e = unauthenticated(authorize(&t, None, needed));
            assert!(e.contains("Authorization: Bearer"), "{e}");
            let e = unauthenticated(authorize(&t, Some("Basic b3A="), needed));
            assert!(e.contains("`Basic`"), "{e}");
            let e = unauthenticated(authorize(&t, Some("op-secret"), needed));
            assert!(e.contains("not `Bearer <token>`"), "{e}");
            let e = unauthenticated(authorize(&t, Some("Bearer op-secre"), needed));
            assert!(e.starts_with("wrong bearer token"), "{e}");
            let e = unauthenticated(authorize(&t, Some("Bearer op-secret2"), needed));
            assert!(e.starts_with("wrong bearer token"), "{e}");
            unauthenticated(authorize(&t, Some("Bearer "), needed));
        }
    }

    #[test]
    fn roles_decide_what_a_token_may_do() {
        let t = tokens();
        let ops = Principal::Token {
            name: "ops".into(),
            role: Role::Operate,
        };
        assert_eq!(
            authorize(&t, Some("Bearer op-secret"), Role::Operate),
            Ok(ops.clone())
        );
        assert_eq!(
            authorize(&t, Some("bearer  op-secret "), Role::Read),
            Ok(ops)
        );
        let grafana = Principal::Token {
            name: "grafana".into(),
            role: Role::Read,
        };
        assert_eq!(
            authorize(&t, Some("Bearer read-secret"), Role::Read),
            Ok(grafana)
        );
        let e = authorize(&t, Some("Bearer read-secret"), Role::Operate).unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        let text = e.to_string();
        assert!(
            text.contains("`grafana`")
                && text.contains("`read` role")
                && text.contains("`operate`"),
            "{text}"
        );
        // The secret is never in a message.
        assert!(!text.contains("read-secret"), "{text}");
    }

    #[test]
    fn the_actor_is_the_authenticated_identity() {
        let peer = Some("10.1.2.3".parse().unwrap());
        let c = Caller {
            principal: Principal::Token {
                name: "ops".into(),
                role: Role::Operate,
            },
            peer,
        };
        assert_eq!(c.actor(), "token:ops from 10.1.2.3");
        let c = Caller {
            principal: Principal::Anonymous,
            peer,
        };
        assert_eq!(c.actor(), "http-api from 10.1.2.3");
        let c = Caller {
            principal: Principal::Anonymous,
            peer: None,
        };
        assert_eq!(c.actor(), "http-api");
    }

    #[test]
    fn comparison_and_debug() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        let t = &tokens()[0];
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("op-secret") && dbg.contains("***"), "{dbg}");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert!(Role::Operate.allows(Role::Read) && !Role::Read.allows(Role::Operate));
    }
}
