//! The orchestrator HTTP API's input, as its handlers take it: every request body through
//! `api::parse_body` and the validation its handler runs next, the query strings through
//! axum's `Query` (as `http::query` does), the `Authorization` header through
//! `auth::authorize`; and the answers `myhactl` decodes (the `myha-api` types).

use std::time::Duration;

use axum::extract::Query;
use axum::http::Uri;
use myha_api::{
    AuditJson, ChangeResponse, QuarantineChange, QuarantineJson, QuarantineListResponse,
    RecoveriesResponse, ShardsResponse, TabletJson,
};
use myha_orchestrator::api::{
    parse_body, toggle_scope, AckRequest, ApiError, QuarantineRequest, RecoveriesQuery,
    ReleaseRequest, ReparentBody, ReparentDefaults, ToggleRequest,
};
use myha_orchestrator::auth::{authorize, ApiToken, Principal, Role};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The caller a handler passes to the reparent validation.
const CALLER: &str = "token:ops from 127.0.0.1";

pub fn http_bodies(data: &[u8]) -> bool {
    let mut accepted = false;
    accepted |= body::<ToggleRequest>(data, |b| {
        toggle_scope(b, ToggleRequest::default()).map(drop)
    });
    accepted |= body::<AckRequest>(data, |_| Ok(()));
    accepted |= body::<ReparentBody>(data, |b| {
        let defaults = ReparentDefaults {
            wait_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(10),
            max_lag: Duration::from_secs(5),
        };
        let req = b.validate(defaults, CALLER)?;
        assert_eq!(
            req.requester, CALLER,
            "the requester is the caller, never the body"
        );
        let _ = req.requested_by();
        Ok(())
    });
    accepted |= body::<QuarantineRequest>(data, |b| b.validate().map(drop));
    accepted |= body::<ReleaseRequest>(data, |b| b.validate().map(drop));
    let text = String::from_utf8_lossy(data);
    accepted |= query_strings(&text);
    accepted |= authorization(&text);
    for ok in [
        answer::<ShardsResponse>(data),
        answer::<TabletJson>(data),
        answer::<AuditJson>(data),
        answer::<ChangeResponse>(data),
        answer::<QuarantineJson>(data),
        answer::<QuarantineListResponse>(data),
        answer::<QuarantineChange>(data),
        answer::<RecoveriesResponse>(data),
    ] {
        accepted |= ok;
    }
    accepted
}

/// A request body as the handler reads it, then its validation; a refusal at either step is
/// an error whose JSON body carries its message.
fn body<T>(data: &[u8], validate: impl FnOnce(T) -> Result<(), ApiError>) -> bool
where
    T: DeserializeOwned + Default,
{
    match parse_body::<T>(data) {
        Ok(b) => {
            if let Err(e) = validate(b) {
                check_error(&e);
            }
            true
        }
        Err(e) => {
            check_error(&e);
            false
        }
    }
}

/// What a client gets: a 4xx with `{"error": message}`, valid JSON whatever the message holds.
fn check_error(e: &ApiError) {
    assert!(e.status.is_client_error(), "{e}");
    let body: serde_json::Value = serde_json::from_str(&e.body()).expect("error bodies are JSON");
    assert_eq!(body["error"].as_str(), Some(e.message.as_str()));
}

/// The input as the query string of `GET /api/v1/recoveries` and of the disable/enable
/// endpoints, decoded as `http::query` does.
fn query_strings(text: &str) -> bool {
    let Ok(uri) = format!("/api/v1/recoveries?{text}").parse::<Uri>() else {
        return false;
    };
    let mut accepted = false;
    match Query::<RecoveriesQuery>::try_from_uri(&uri) {
        Ok(Query(q)) => {
            accepted = true;
            match q.validate() {
                Ok(f) => assert!((1..=1000).contains(&f.limit), "limit {}", f.limit),
                Err(e) => check_error(&e),
            }
        }
        Err(e) => assert!(!e.body_text().is_empty()),
    }
    match Query::<ToggleRequest>::try_from_uri(&uri) {
        Ok(Query(q)) => {
            accepted = true;
            if let Err(e) = toggle_scope(ToggleRequest::default(), q) {
                check_error(&e);
            }
        }
        Err(e) => assert!(!e.body_text().is_empty()),
    }
    accepted
}

/// The first line as an `Authorization` header against two configured tokens: only the exact
/// secret authenticates, and no refusal quotes a configured secret the header did not hold.
fn authorization(text: &str) -> bool {
    const OPS: &str = "s3cret-ops-token";
    const READ: &str = "r34d-only-token";
    let tokens = [
        ApiToken {
            name: "ops".into(),
            role: Role::Operate,
            secret: OPS.into(),
        },
        ApiToken {
            name: "grafana".into(),
            role: Role::Read,
            secret: READ.into(),
        },
    ];
    let header = text.split('\n').next().unwrap_or_default();
    let presented = header
        .trim()
        .split_once(' ')
        .map(|(_, t)| t.trim())
        .unwrap_or_default();
    let mut accepted = false;
    for needed in [Role::Read, Role::Operate] {
        match authorize(&tokens, Some(header), needed) {
            Ok(Principal::Token { name, .. }) => {
                let secret = if name == "ops" { OPS } else { READ };
                assert_eq!(presented, secret, "{header:?} authenticated as {name}");
                accepted = true;
            }
            Ok(Principal::Anonymous) => panic!("tokens are configured: nobody is anonymous"),
            Err(e) => {
                let message = e.to_string();
                for secret in [OPS, READ] {
                    assert!(
                        header.contains(secret) || !message.contains(secret),
                        "{message:?}"
                    );
                }
            }
        }
    }
    accepted
}

/// An answer `myhactl` decodes: what decodes encodes back to the same value.
fn answer<T>(data: &[u8]) -> bool
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return false;
    };
    let json = serde_json::to_vec(&v).expect("encodes");
    assert_eq!(serde_json::from_slice::<T>(&json).ok().as_ref(), Some(&v));
    true
}
