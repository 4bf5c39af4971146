//! The orchestrator's HTTP API. Everything here is pure: the handlers in `main.rs` gather the
//! inputs (the tabletwatch snapshot, the engine's state, etcd reads) and these functions turn
//! them into JSON, parse and validate requests, check the bearer token, and render the
//! per-tablet metrics.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | liveness (`ok`) |
//! | GET | `/metrics` | Prometheus text |
//! | GET | `/api/v1/shards` | [`ShardsResponse`]: every shard, its tablets, problems, recovery state |
//! | GET | `/api/v1/recoveries?keyspace=&shard=&limit=` | [`RecoveriesResponse`]: audit entries, newest first |
//! | POST | `/api/v1/recoveries/disable` | [`ToggleRequest`] (body or query): none = global |
//! | POST | `/api/v1/recoveries/enable` | idem |
//! | POST | `/api/v1/shards/{keyspace}/{shard}/ack` | [`AckRequest`]: acknowledge the shard's last recovery |
//! | POST | `/api/v1/shards/{keyspace}/{shard}/reparent` | [`ReparentBody`]: an operator reparent, answered as ndjson events ([`crate::operator`]) |
//! | GET | `/api/v1/quarantine` | [`QuarantineListResponse`]: every quarantined tablet |
//! | POST | `/api/v1/quarantine/{alias}` | [`QuarantineRequest`]: quarantine a registered non-primary tablet -> [`QuarantineChange`] |
//! | DELETE | `/api/v1/quarantine/{alias}` | [`ReleaseRequest`] (optional): release it (404 if not quarantined) -> [`QuarantineChange`] |
//!
//! With API tokens configured (`[orchestrator] api_tokens`, or the legacy `api_token`), every
//! `/api/v1/...` request needs `Authorization: Bearer <token>`: GETs a `read` or `operate`
//! token, POST/DELETE an `operate` one (401 without a known token, 403 for a `read` token on a
//! change; see [`crate::auth`]). `/health` and `/metrics` stay open: liveness probes and
//! Prometheus scrape them without credentials, and they carry no secret and change nothing.
//! The actor recorded for a change is the authenticated caller ([`crate::auth::Caller::actor`]);
//! a body's `requester` is only a note, recorded as `(on behalf of <requester>)`.
//! Every error is `{"error": "..."}` with a 4xx/5xx status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use topo::Term;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tabletwatch::{FleetSnapshot, ShardView, StreamState, TabletView};
use topo::{QuarantineRecord, ShardRecord, TabletRecord};

use crate::analysis::Problem;
use crate::auth::AuthError;
use crate::engine::{EngineView, RecoveryResult, ShardStatus};

pub use myha_api::{
    is_recovery_action, last_recovery, merge_audit, AttemptJson, AuditJson, ChangeResponse,
    InProgressJson, ProblemJson, QuarantineChange, QuarantineJson, QuarantineListResponse,
    RecoveriesResponse, RecoveryJson, ShardJson, ShardsResponse, TabletJson,
};

impl From<&Problem> for ProblemJson {
    fn from(p: &Problem) -> Self {
        ProblemJson {
            code: p.code.as_str().to_string(),
            tablet: p.tablet.clone(),
            detail: p.detail.clone(),
        }
    }
}

impl From<&RecoveryResult> for AttemptJson {
    fn from(r: &RecoveryResult) -> Self {
        AttemptJson {
            problem: r.problem.as_str().to_string(),
            tablet: r.tablet.clone(),
            outcome: r.outcome.label().to_string(),
            detail: r.outcome.text().to_string(),
            started_ms: r.started_ms,
            duration_ms: r.duration_ms,
            new_term: r.new_term,
        }
    }
}

/// A shard's recovery state as the API shows it.
pub fn recovery_json(s: &ShardStatus) -> RecoveryJson {
    {
        RecoveryJson {
            in_progress: s.recovery.as_ref().map(|r| InProgressJson {
                what: r.problem.as_str().to_string(),
                tablet: r.tablet.clone(),
                detail: r.detail.clone(),
                since_ms: r.since_ms,
                running_ms: r.running_ms,
            }),
            enabled: s.recoveries_enabled,
            disabled_reason: s.disabled_reason.clone(),
            flapping: s.flapping.is_some(),
            flapping_detail: s.flapping.as_ref().map(|f| f.reason(&s.keyspace, &s.shard)),
            next: s.next.as_ref().map(ProblemJson::from),
            waiting: s.waiting.clone(),
            last_attempt: s.last_recovery.as_ref().map(AttemptJson::from),
        }
    }
}

impl EngineState {
    /// The engine's view, with each shard's last recovery from `last_recoveries` (the audit
    /// log, see [`last_recovery`]).
    pub fn from_view(
        view: &EngineView,
        last_recoveries: &BTreeMap<(String, String), AuditJson>,
    ) -> EngineState {
        EngineState {
            analysed: view.version > 0,
            recoveries_enabled: view.recoveries_enabled,
            recoveries_disabled_reason: view.disabled_reason.clone(),
            shards: view
                .shards
                .iter()
                .map(|s| {
                    let key = (s.keyspace.clone(), s.shard.clone());
                    let state = ShardState {
                        problems: s.problems.iter().map(ProblemJson::from).collect(),
                        recovery: recovery_json(s),
                        last_recovery: last_recoveries.get(&key).cloned(),
                    };
                    (key, state)
                })
                .collect(),
        }
    }
}

/// What the engine knows about one shard, as the API shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ShardState {
    pub problems: Vec<ProblemJson>,
    pub recovery: RecoveryJson,
    pub last_recovery: Option<AuditJson>,
}

/// What the engine knows, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineState {
    /// The engine has published (else nothing was analysed yet).
    pub analysed: bool,
    pub recoveries_enabled: bool,
    pub recoveries_disabled_reason: Option<String>,
    /// By `(keyspace, shard)`; a shard missing here shows no problems and default recovery
    /// state.
    pub shards: BTreeMap<(String, String), ShardState>,
}

impl Default for EngineState {
    fn default() -> Self {
        EngineState {
            analysed: false,
            recoveries_enabled: true,
            recoveries_disabled_reason: None,
            shards: BTreeMap::new(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn tablet_json(
    shard: &ShardView,
    t: &TabletView,
    now: Instant,
    stale_after: Duration,
) -> TabletJson {
    let h = t.health();
    let failures = match &t.stream {
        StreamState::Connecting { failures, .. } => *failures,
        StreamState::Connected { .. } => 0,
    };
    TabletJson {
        alias: t.alias().to_string(),
        is_primary: shard.primary_alias() == Some(t.alias()),
        mysql_addr: t.mysql_addr(),
        grpc_addr: t.record.grpc_addr.clone(),
        stream: t.stream.as_str().to_string(),
        stream_error: t.stream.last_error().map(str::to_string),
        stream_failures: failures,
        stream_state_ms: millis(t.stream.duration(now)),
        last_health_age_ms: t.health_age(now).map(millis),
        last_health_received_ms: t.last_health.as_deref().map(|s| s.received_ms),
        fresh: t.is_fresh(now, stale_after),
        mysql_reachable: t.mysql_reachable(),
        mysql_error: h.and_then(|h| non_empty(&h.mysql_error)),
        read_only: t.read_only(),
        replicating: t.replicating(),
        lag_ms: t.lag_ms(),
        term: t.term(),
        fenced: t.fenced(),
        fence_reason: h.and_then(|h| non_empty(&h.fence_reason)),
        quarantined: t.quarantined().map(QuarantineRecord::describe),
    }
}

pub fn shards_response(
    snap: &FleetSnapshot,
    now: Instant,
    stale_after: Duration,
    engine: &EngineState,
) -> ShardsResponse {
    ShardsResponse {
        version: snap.version,
        topo_synced: snap.topo_synced,
        health_stale_after_ms: millis(stale_after),
        analysed: engine.analysed,
        recoveries_enabled: engine.recoveries_enabled,
        recoveries_disabled_reason: engine.recoveries_disabled_reason.clone(),
        shards: snap
            .shards
            .iter()
            .map(|(key, s)| {
                let state = engine.shards.get(key).cloned().unwrap_or_default();
                ShardJson {
                    keyspace: s.keyspace.clone(),
                    shard: s.shard.clone(),
                    has_record: s.record.is_some(),
                    primary: s.primary_alias().map(str::to_string),
                    term: s.term(),
                    term_start_ms: s.record.as_deref().map(|r| r.term_start_ms),
                    reparent_in_progress: s
                        .record
                        .as_deref()
                        .and_then(|r| r.reparent_in_progress.clone()),
                    problems: state.problems,
                    recovery: state.recovery,
                    last_recovery: state.last_recovery,
                    tablets: s
                        .tablets
                        .values()
                        .map(|t| tablet_json(s, t, now, stale_after))
                        .collect(),
                }
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and authentication

/// An API error: its status and `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    /// etcd (or another dependency) could not answer.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: &self.message,
        })
        .unwrap_or_else(|_| "{\"error\":\"unprintable error\"}".into())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"myha-orchestrator\""),
            );
        }
        resp
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        ApiError::new(e.status(), e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Parses an optional JSON body (empty or `null` = all defaults); unknown fields are refused.
pub fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

/// Body and query string of `POST /api/v1/recoveries/{disable,enable}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToggleRequest {
    pub keyspace: Option<String>,
    pub shard: Option<String>,
    pub reason: Option<String>,
}

/// Where a disable/enable applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Shard { keyspace: String, shard: String },
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Shard { keyspace, shard } => write!(f, "{keyspace}/{shard}"),
        }
    }
}

fn non_blank(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn valid_name(what: &str, v: &str) -> Result<(), ApiError> {
    topo::validate_name(what, v).map_err(ApiError::bad_request)
}

/// The scope and reason of a disable/enable: fields from the body, else from the query.
/// Both keyspace and shard, or neither (= global).
pub fn toggle_scope(
    body: ToggleRequest,
    query: ToggleRequest,
) -> Result<(Scope, Option<String>), ApiError> {
    let keyspace = non_blank(body.keyspace).or(non_blank(query.keyspace));
    let shard = non_blank(body.shard).or(non_blank(query.shard));
    let reason = non_blank(body.reason).or(non_blank(query.reason));
    let scope = match (keyspace, shard) {
        (None, None) => Scope::Global,
        (Some(keyspace), Some(shard)) => {
            valid_name("keyspace", &keyspace)?;
            valid_name("shard", &shard)?;
            Scope::Shard { keyspace, shard }
        }
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "keyspace given without shard: give both for one shard, or neither for all",
            ))
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "shard given without keyspace: give both for one shard, or neither for all",
            ))
        }
    };
    Ok((scope, reason))
}

/// Body of `POST /api/v1/shards/{keyspace}/{shard}/ack` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// Why, for the audit log.
    pub reason: Option<String>,
}

/// What kind of operator reparent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReparentMode {
    Planned,
    Emergency,
}

impl ReparentMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReparentMode::Planned => "planned",
            ReparentMode::Emergency => "emergency",
        }
    }
}

/// Body of `POST /api/v1/shards/{keyspace}/{shard}/reparent`, as sent (durations in humantime).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReparentBody {
    pub mode: Option<String>,
    pub to: Option<String>,
    pub wait_timeout: Option<String>,
    pub lock_timeout: Option<String>,
    pub max_lag: Option<String>,
    /// A note only (see [`on_behalf_of`]): who the caller says it acts for.
    pub requester: Option<String>,
    /// Emergency only: promote even when an unreached replica may hold the only copy of
    /// acknowledged writes (see `recovery::reparent::revocation`).
    pub may_lose_acknowledged_writes: Option<bool>,
}

/// A validated reparent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReparentRequest {
    pub mode: ReparentMode,
    pub to: Option<String>,
    pub wait_timeout: Duration,
    pub lock_timeout: Duration,
    pub max_lag: Duration,
    /// Who asked: the authenticated caller ([`crate::auth::Caller::actor`]), never a name
    /// from the body. The audit actor is `operator:<requester>@<orchestrator>`.
    pub requester: String,
    /// The body's `requester`, a note: in the reparent mark and the lock purpose.
    pub on_behalf_of: Option<String>,
    /// Emergency only: see [`ReparentBody::may_lose_acknowledged_writes`].
    pub may_lose_acknowledged_writes: bool,
}

impl ReparentRequest {
    /// The requester with the note, for the texts people read (the mark, the lock purpose).
    pub fn requested_by(&self) -> String {
        annotate(&self.requester, self.on_behalf_of.as_deref())
    }
}

/// A body's `requester`: not an identity (the caller is who its token says; a body can claim
/// anything), only a note recorded as `(on behalf of <requester>)` next to the reason. It
/// lets a shared `operate` token (a deploy tool, a team's) say which person it acts for.
pub fn on_behalf_of(requester: Option<String>) -> Result<Option<String>, ApiError> {
    let note = non_blank(requester);
    if note
        .as_deref()
        .is_some_and(|r| r.chars().any(char::is_control) || r.len() > 200)
    {
        return Err(ApiError::bad_request(
            "requester must be printable and at most 200 bytes",
        ));
    }
    Ok(note)
}

/// `text (on behalf of <note>)`, or `text` without a note.
pub fn annotate(text: &str, note: Option<&str>) -> String {
    match note {
        Some(n) => format!("{text} (on behalf of {n})"),
        None => text.to_string(),
    }
}

/// The defaults of a reparent request (`[recovery] planned_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReparentDefaults {
    pub wait_timeout: Duration,
    pub lock_timeout: Duration,
    pub max_lag: Duration,
}

fn duration_field(
    name: &str,
    v: Option<String>,
    default: Duration,
    allow_zero: bool,
) -> Result<Duration, ApiError> {
    let Some(text) = non_blank(v) else {
        return Ok(default);
    };
    let d = humantime::parse_duration(&text).map_err(|e| {
        ApiError::bad_request(format!(
            "{name}: {text:?} is not a duration ({e}); e.g. \"5s\", \"500ms\""
        ))
    })?;
    if d.is_zero() && !allow_zero {
        return Err(ApiError::bad_request(format!(
            "{name} must be greater than zero"
        )));
    }
    if d > crate::config::MAX_LOCK_TIMEOUT {
        return Err(ApiError::bad_request(format!("{name} must be at most 1h")));
    }
    Ok(d)
}

impl ReparentBody {
    /// Validates the body: a mode, a well-formed alias, durations (defaults for the missing
    /// ones). `caller` is the authenticated actor, the request's requester.
    pub fn validate(
        self,
        defaults: ReparentDefaults,
        caller: &str,
    ) -> Result<ReparentRequest, ApiError> {
        let mode = match non_blank(self.mode).as_deref() {
            Some("planned") => ReparentMode::Planned,
            Some("emergency") => ReparentMode::Emergency,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "mode must be \"planned\" or \"emergency\", not {other:?}"
                )))
            }
            None => {
                return Err(ApiError::bad_request(
                    "mode is required: \"planned\" or \"emergency\"",
                ))
            }
        };
        let to = non_blank(self.to);
        if let Some(a) = &to {
            topo::parse_alias(a).map_err(|e| ApiError::bad_request(format!("to: {e}")))?;
        }
        let on_behalf_of = on_behalf_of(self.requester)?;
        let may_lose_acknowledged_writes = self.may_lose_acknowledged_writes.unwrap_or(false);
        if may_lose_acknowledged_writes && mode != ReparentMode::Emergency {
            return Err(ApiError::bad_request(
                "may_lose_acknowledged_writes applies to emergency reparents only",
            ));
        }
        Ok(ReparentRequest {
            mode,
            to,
            wait_timeout: duration_field(
                "wait_timeout",
                self.wait_timeout,
                defaults.wait_timeout,
                false,
            )?,
            lock_timeout: duration_field(
                "lock_timeout",
                self.lock_timeout,
                defaults.lock_timeout,
                true,
            )?,
            max_lag: duration_field("max_lag", self.max_lag, defaults.max_lag, false)?,
            requester: caller.to_string(),
            on_behalf_of,
            may_lose_acknowledged_writes,
        })
    }
}

/// Every record of `records` (by alias) with the shard its registration names. Pure.
pub fn quarantine_list(
    records: &BTreeMap<String, QuarantineRecord>,
    registered: &BTreeMap<String, TabletRecord>,
) -> QuarantineListResponse {
    QuarantineListResponse {
        quarantine: records
            .iter()
            .map(|(a, r)| QuarantineJson::new(a, r, registered.get(a)))
            .collect(),
    }
}

/// Body of `POST /api/v1/quarantine/{alias}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineRequest {
    /// Why (required: the record is what everyone reads to understand the exclusion).
    pub reason: Option<String>,
    /// A note only (see [`on_behalf_of`]); the record's `by` is the authenticated caller.
    pub requester: Option<String>,
}

impl QuarantineRequest {
    /// The reason to record (with the requester note); 400 without a reason.
    pub fn validate(self) -> Result<String, ApiError> {
        let reason = non_blank(self.reason).ok_or_else(|| {
            ApiError::bad_request(
                "a reason is required: it is what operators and the gateway's /routing show",
            )
        })?;
        let note = on_behalf_of(self.requester)?;
        Ok(annotate(&reason, note.as_deref()))
    }
}

/// Body of `DELETE /api/v1/quarantine/{alias}` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Why, for the audit log.
    pub reason: Option<String>,
    /// A note only (see [`on_behalf_of`]); the audit's actor is the authenticated caller.
    pub requester: Option<String>,
}

impl ReleaseRequest {
    /// The reason to audit (with the requester note), if any.
    pub fn validate(self) -> Result<Option<String>, ApiError> {
        let note = on_behalf_of(self.requester)?;
        Ok(match (non_blank(self.reason), note) {
            // The audit detail puts the reason in parentheses already.
            (Some(r), Some(n)) => Some(format!("{r}, on behalf of {n}")),
            (Some(r), None) => Some(r),
            (None, Some(n)) => Some(format!("on behalf of {n}")),
            (None, None) => None,
        })
    }
}

/// 400 unless `alias` is `{cell}-{uid}`.
pub fn check_alias(alias: &str) -> Result<(), ApiError> {
    topo::parse_alias(alias)
        .map(drop)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Whether `alias` may be quarantined, given its registration and its shard's record: the
/// shard and term to record and audit it under. Pure.
/// - unknown (not registered): 404: a typo must not silently quarantine nothing;
/// - the shard record's primary: 409: quarantine removes a tablet from promotion and reads,
///   the primary must be moved first (a planned reparent), not hidden behind a record the
///   gateway would route writes to anyway.
pub fn quarantine_target(
    alias: &str,
    tablet: Option<&TabletRecord>,
    record: Option<&ShardRecord>,
) -> Result<(String, String, Term), ApiError> {
    check_alias(alias)?;
    let t = tablet.ok_or_else(|| {
        ApiError::not_found(format!(
            "no tablet {alias} is registered (unknown alias, or its agent is down)"
        ))
    })?;
    let term = record.map_or(Term::ZERO, |r| r.term);
    if let Some(r) = record.filter(|r| r.primary.as_deref() == Some(alias)) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{alias} is the primary of {}/{} (term {}): move the primary first                  (myhactl reparent planned {}/{}), then quarantine it",
                r.keyspace, r.shard, r.term, r.keyspace, r.shard
            ),
        ));
    }
    Ok((t.keyspace.clone(), t.shard.clone(), term))
}

/// Query of `GET /api/v1/recoveries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveriesQuery {
    pub keyspace: Option<String>,
    pub shard: Option<String>,
    /// A string so that a bad value gets our error message.
    pub limit: Option<String>,
}

pub const DEFAULT_RECOVERIES_LIMIT: usize = 50;
pub const MAX_RECOVERIES_LIMIT: usize = 1000;

/// Which audit entries `GET /api/v1/recoveries` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveriesFilter {
    /// `None`: every keyspace.
    pub keyspace: Option<String>,
    /// `None`: every shard (of the keyspace, or of all).
    pub shard: Option<String>,
    pub limit: usize,
}

impl RecoveriesQuery {
    pub fn validate(self) -> Result<RecoveriesFilter, ApiError> {
        let keyspace = non_blank(self.keyspace);
        let shard = non_blank(self.shard);
        if shard.is_some() && keyspace.is_none() {
            return Err(ApiError::bad_request("shard given without keyspace"));
        }
        if let Some(k) = &keyspace {
            valid_name("keyspace", k)?;
        }
        if let Some(s) = &shard {
            valid_name("shard", s)?;
        }
        let limit = match non_blank(self.limit) {
            None => DEFAULT_RECOVERIES_LIMIT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_RECOVERIES_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "limit `{l}` is not a number from 1 to {MAX_RECOVERIES_LIMIT}"
                    )))
                }
            },
        };
        Ok(RecoveriesFilter {
            keyspace,
            shard,
            limit,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per-tablet health gauges in Prometheus text format, computed from the snapshot at render
/// time (so a tablet that is gone leaves no stale series):
/// - `myha_orchestrator_tablet_mysql_reachable`: 1 when the tablet's health is fresh and says
///   mysqld answers, else 0;
/// - `myha_orchestrator_tablet_lag_ms`: the replica's lag per its fresh health (absent when
///   unknown or stale);
/// - `myha_orchestrator_tablet_stream_connected`: 1 while the health stream is up.
pub fn tablet_metrics(snap: &FleetSnapshot, now: Instant, stale_after: Duration) -> String {
    let mut reachable = String::new();
    let mut lag = String::new();
    let mut stream = String::new();
    for s in snap.shards.values() {
        for t in s.tablets.values() {
            let labels = format!(
                "tablet=\"{}\",keyspace=\"{}\",shard=\"{}\"",
                label(t.alias()),
                label(&s.keyspace),
                label(&s.shard)
            );
            let fresh = t.fresh_health(now, stale_after);
            let up = fresh.is_some_and(|h| h.mysql_reachable);
            reachable.push_str(&format!(
                "myha_orchestrator_tablet_mysql_reachable{{{labels}}} {}\n",
                u8::from(up)
            ));
            if let Some(l) = fresh.and_then(|h| h.lag_ms) {
                lag.push_str(&format!(
                    "myha_orchestrator_tablet_lag_ms{{{labels}}} {l}\n"
                ));
            }
            stream.push_str(&format!(
                "myha_orchestrator_tablet_stream_connected{{{labels}}} {}\n",
                u8::from(t.stream.is_connected())
            ));
        }
    }
    let mut out = String::new();
    for (name, help, body) in [
        (
            "myha_orchestrator_tablet_mysql_reachable",
            "1 when the tablet's fresh health says its mysqld answers",
            reachable,
        ),
        (
            "myha_orchestrator_tablet_lag_ms",
            "Replication lag of the tablet per its fresh health, in ms",
            lag,
        ),
        (
            "myha_orchestrator_tablet_stream_connected",
            "1 while the orchestrator's health stream from the tablet's agent is up",
            stream,
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        out.push_str(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use myha_api::ACTION_PLANNED_REPARENT;
    use std::sync::Arc;
    use tabletwatch::testing::*;
    use tabletwatch::HealthSample;
    use topo::AuditEntry;

    #[test]
    fn snapshot_translates_to_json() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(1500);
        let stale = Duration::from_secs(1);
        let p = tablet(
            tablet_record("zone1-101", "ks", "0"),
            Some(primary_health("zone1-101", 2)),
            t0 + Duration::from_millis(1200),
        );
        let mut r = tablet(
            tablet_record("zone1-102", "ks", "0"),
            Some(replica_health("zone1-102", 2, Some(30))),
            t0,
        );
        r.stream = StreamState::Connecting {
            since: t0 + Duration::from_millis(500),
            since_ms: 0,
            failures: 3,
            last_error: Some("connect to 127.0.0.1:1: refused".into()),
        };
        let mut unreachable = replica_health("zone1-103", 2, None);
        unreachable.mysql_reachable = false;
        unreachable.mysql = None;
        unreachable.replication = None;
        unreachable.mysql_error = "Connection refused".into();
        let mut u = tablet(tablet_record("zone1-103", "ks", "0"), None, t0);
        u.last_health = Some(Arc::new(HealthSample {
            health: Arc::new(unreachable),
            received_at: now,
            received_ms: 42,
        }));
        let none = tablet(tablet_record("zone1-201", "other", "-80"), None, t0);

        let mut snap = FleetSnapshot::empty(t0);
        snap.version = 7;
        snap.topo_synced = true;
        snap.shards.insert(
            ("ks".into(), "0".into()),
            std::sync::Arc::new(shard(
                "ks",
                "0",
                Some(shard_record("ks", "0", Some("zone1-101"), 2)),
                vec![p, r, u],
            )),
        );
        snap.shards.insert(
            ("other".into(), "-80".into()),
            std::sync::Arc::new(shard("other", "-80", None, vec![none])),
        );

        let mut engine = EngineState::default();
        engine.shards.insert(
            ("ks".into(), "0".into()),
            ShardState {
                problems: vec![ProblemJson {
                    code: "replica_not_replicating".into(),
                    tablet: Some("zone1-102".into()),
                    detail: "io thread stopped".into(),
                }],
                recovery: RecoveryJson {
                    in_progress: Some(InProgressJson {
                        what: "replica_not_replicating".into(),
                        tablet: Some("zone1-102".into()),
                        detail: "io thread stopped".into(),
                        since_ms: 5,
                        running_ms: 1,
                    }),
                    ..RecoveryJson::default()
                },
                last_recovery: Some(AuditJson::new("ks", "0", &audit(4, "fix_replica"))),
            },
        );
        let resp = shards_response(&snap, now, stale, &engine);
        assert_eq!(
            (resp.version, resp.topo_synced, resp.health_stale_after_ms),
            (7, true, 1000)
        );
        assert_eq!(resp.shards.len(), 2);
        let ks = &resp.shards[0];
        assert_eq!(
            (ks.keyspace.as_str(), ks.shard.as_str(), ks.term),
            ("ks", "0", Term::new(2))
        );
        assert_eq!(ks.primary.as_deref(), Some("zone1-101"));
        assert!(ks.has_record);
        let [p, r, u] = &ks.tablets[..] else {
            panic!("3 tablets: {:?}", ks.tablets)
        };
        assert!(p.is_primary && !r.is_primary);
        assert_eq!(p.stream, "connected");
        assert_eq!(p.last_health_age_ms, Some(300));
        assert!(p.fresh);
        assert_eq!(
            (p.mysql_reachable, p.read_only, p.replicating),
            (Some(true), Some(false), Some(false))
        );
        assert_eq!(r.stream, "connecting");
        assert_eq!(
            r.stream_error.as_deref(),
            Some("connect to 127.0.0.1:1: refused")
        );
        assert_eq!((r.stream_failures, r.stream_state_ms), (3, 1000));
        assert_eq!(r.last_health_age_ms, Some(1500));
        assert!(!r.fresh);
        assert_eq!(
            (r.read_only, r.replicating, r.lag_ms),
            (Some(true), Some(true), Some(30))
        );
        assert_eq!(
            (u.mysql_reachable, u.read_only, u.replicating),
            (Some(false), None, None)
        );
        assert_eq!(u.mysql_error.as_deref(), Some("Connection refused"));
        assert_eq!(u.last_health_received_ms, Some(42));
        let other = &resp.shards[1];
        assert!(!other.has_record);
        assert_eq!(
            (other.primary.as_ref(), other.term, other.term_start_ms),
            (None, Term::ZERO, None)
        );
        let n = &other.tablets[0];
        assert_eq!(
            (n.last_health_age_ms, n.fresh, n.mysql_reachable, n.term),
            (None, false, None, None)
        );

        assert!(resp.recoveries_enabled);
        assert_eq!(ks.problems[0].code, "replica_not_replicating");
        assert_eq!(
            ks.recovery.in_progress.as_ref().map(|p| p.what.as_str()),
            Some("replica_not_replicating")
        );
        assert_eq!(ks.last_recovery.as_ref().map(|r| r.at_ms), Some(4));
        // A shard the engine has nothing on: no problems, recoveries enabled.
        assert!(other.problems.is_empty());
        assert_eq!(other.recovery, RecoveryJson::default());
        assert!(other.last_recovery.is_none());

        let json = serde_json::to_value(&resp).unwrap();
        assert_eq!(json["shards"][0]["tablets"][1]["lag_ms"], 30);
        assert_eq!(json["shards"][0]["problems"][0]["tablet"], "zone1-102");
        assert_eq!(json["shards"][0]["recovery"]["enabled"], true);
        assert_eq!(json["shards"][0]["last_recovery"]["shard"], "0");
        assert_eq!(json["shards"][1]["problems"], serde_json::json!([]));
        assert_eq!(json["shards"][1]["last_recovery"], serde_json::Value::Null);
        assert_eq!(
            json["shards"][1]["tablets"][0]["last_health_age_ms"],
            serde_json::Value::Null
        );
    }

    fn audit(at_ms: u64, action: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            term: Term::new(2),
            actor: "orchestrator@h:1".into(),
            action: action.into(),
            tablet: Some("zone1-102".into()),
            outcome: "ok".into(),
            detail: String::new(),
            duration_ms: Some(12),
        }
    }

    #[test]
    fn problems_translate() {
        let p = Problem {
            code: crate::analysis::ProblemCode::DeadPrimary,
            tablet: Some("zone1-101".into()),
            detail: "gone".into(),
        };
        let j = ProblemJson::from(&p);
        assert_eq!(
            (j.code.as_str(), j.tablet.as_deref(), j.detail.as_str()),
            ("dead_primary", Some("zone1-101"), "gone")
        );
    }

    #[test]
    fn auth_refusals_are_api_errors() {
        let e = ApiError::from(AuthError::Forbidden("read only".into()));
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::FORBIDDEN, "read only")
        );
        let e = ApiError::from(AuthError::Unauthenticated("no token".into()));
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e
            .into_response()
            .headers()
            .contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn errors_are_json_with_a_status() {
        let e = ApiError::bad_request("bad \"x\"");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v, serde_json::json!({"error": "bad \"x\""}));
        let r = ApiError::unauthorized("no").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
    }

    fn toggle(ks: Option<&str>, shard: Option<&str>, reason: Option<&str>) -> ToggleRequest {
        ToggleRequest {
            keyspace: ks.map(str::to_string),
            shard: shard.map(str::to_string),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn toggle_scopes() {
        let none = ToggleRequest::default();
        assert_eq!(
            toggle_scope(none.clone(), none.clone()).unwrap(),
            (Scope::Global, None)
        );
        let (scope, reason) = toggle_scope(
            toggle(Some("ks"), Some("-80"), Some(" maint ")),
            none.clone(),
        )
        .unwrap();
        assert_eq!(scope.to_string(), "ks/-80");
        assert_eq!(reason.as_deref(), Some("maint"));
        // The query fills in what the body lacks; the body wins.
        let (scope, reason) = toggle_scope(
            toggle(None, None, Some("body")),
            toggle(Some("ks"), Some("0"), Some("query")),
        )
        .unwrap();
        assert_eq!(
            scope,
            Scope::Shard {
                keyspace: "ks".into(),
                shard: "0".into()
            }
        );
        assert_eq!(reason.as_deref(), Some("body"));
        let e = toggle_scope(toggle(Some("ks"), None, None), none.clone()).unwrap_err();
        assert!(e.message.contains("without shard"), "{e}");
        let e = toggle_scope(none.clone(), toggle(None, Some("0"), None)).unwrap_err();
        assert!(e.message.contains("without keyspace"), "{e}");
        let e = toggle_scope(toggle(Some("k/s"), Some("0"), None), none).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bodies_parse_strictly() {
        let t: ToggleRequest = parse_body(b"").unwrap();
        assert_eq!(t, ToggleRequest::default());
        let t: ToggleRequest = parse_body(b" null\n").unwrap();
        assert_eq!(t, ToggleRequest::default());
        let t: ToggleRequest = parse_body(br#"{"keyspace":"ks","shard":"0"}"#).unwrap();
        assert_eq!(t.shard.as_deref(), Some("0"));
        let e = parse_body::<ToggleRequest>(br#"{"keyspce":"ks"}"#).unwrap_err();
        assert!(e.message.contains("keyspce"), "{e}");
        let e = parse_body::<AckRequest>(b"{").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn recoveries_query() {
        let f = RecoveriesQuery::default().validate().unwrap();
        assert_eq!(
            f,
            RecoveriesFilter {
                keyspace: None,
                shard: None,
                limit: DEFAULT_RECOVERIES_LIMIT
            }
        );
        let q = RecoveriesQuery {
            keyspace: Some("ks".into()),
            shard: Some("0".into()),
            limit: Some("3".into()),
        };
        assert_eq!(q.validate().unwrap().limit, 3);
        for bad in ["0", "x", "1001", "-1"] {
            let q = RecoveriesQuery {
                limit: Some(bad.into()),
                ..Default::default()
            };
            let e = q.validate().unwrap_err();
            assert!(e.message.contains(bad), "{e}");
        }
        let q = RecoveriesQuery {
            shard: Some("0".into()),
            ..Default::default()
        };
        assert!(q
            .validate()
            .unwrap_err()
            .message
            .contains("without keyspace"));
    }

    #[test]
    fn audit_merges_newest_first() {
        let per_shard = vec![
            (
                "ks".to_string(),
                "-80".to_string(),
                vec![audit(30, "c"), audit(10, "a")],
            ),
            ("ks".to_string(), "80-".to_string(), vec![audit(20, "b")]),
        ];
        let all = merge_audit(&per_shard, 10);
        let order: Vec<(&str, u64)> = all.iter().map(|a| (a.shard.as_str(), a.at_ms)).collect();
        assert_eq!(order, [("-80", 30), ("80-", 20), ("-80", 10)]);
        assert_eq!(merge_audit(&per_shard, 2).len(), 2);
        let json = serde_json::to_value(&all[0]).unwrap();
        assert_eq!(json["action"], "c");
        assert_eq!(json["duration_ms"], 12);
    }

    #[test]
    fn tablet_gauges_follow_the_snapshot() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(100);
        let stale = Duration::from_secs(1);
        let p = tablet(
            tablet_record("zone1-101", "ks", "0"),
            Some(primary_health("zone1-101", 2)),
            t0,
        );
        let r = tablet(
            tablet_record("zone1-102", "ks", "0"),
            Some(replica_health("zone1-102", 2, Some(30))),
            t0,
        );
        let mut gone = tablet(tablet_record("zone1-103", "ks", "0"), None, t0);
        gone.stream = StreamState::Connecting {
            since: t0,
            since_ms: 0,
            failures: 1,
            last_error: None,
        };
        let mut snap = FleetSnapshot::empty(t0);
        snap.shards.insert(
            ("ks".into(), "0".into()),
            std::sync::Arc::new(shard(
                "ks",
                "0",
                Some(shard_record("ks", "0", Some("zone1-101"), 2)),
                vec![p, r, gone],
            )),
        );
        let text = tablet_metrics(&snap, now, stale);
        let l = |a: &str| format!("{{tablet=\"{a}\",keyspace=\"ks\",shard=\"0\"}}");
        for want in [
            format!(
                "myha_orchestrator_tablet_mysql_reachable{} 1",
                l("zone1-101")
            ),
            format!(
                "myha_orchestrator_tablet_mysql_reachable{} 0",
                l("zone1-103")
            ),
            format!("myha_orchestrator_tablet_lag_ms{} 30", l("zone1-102")),
            format!(
                "myha_orchestrator_tablet_stream_connected{} 1",
                l("zone1-102")
            ),
            format!(
                "myha_orchestrator_tablet_stream_connected{} 0",
                l("zone1-103")
            ),
            "# TYPE myha_orchestrator_tablet_lag_ms gauge".to_string(),
        ] {
            assert!(text.contains(&want), "{want} in\n{text}");
        }
        assert!(
            !text.contains(&format!("lag_ms{}", l("zone1-103"))),
            "{text}"
        );
        // Stale health: not reachable, no lag.
        let later = tablet_metrics(&snap, t0 + Duration::from_secs(5), stale);
        assert!(later.contains(&format!("mysql_reachable{} 0", l("zone1-101"))));
        assert!(!later.contains(&format!("lag_ms{}", l("zone1-102"))));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    fn defaults() -> ReparentDefaults {
        ReparentDefaults {
            wait_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(10),
            max_lag: Duration::from_secs(5),
        }
    }

    fn reparent_body(json: &str) -> Result<ReparentRequest, ApiError> {
        parse_body::<ReparentBody>(json.as_bytes())?
            .validate(defaults(), "token:ops from 127.0.0.1")
    }

    #[test]
    fn reparent_requests_are_validated_before_anything_runs() {
        let r = reparent_body(r#"{"mode": "planned"}"#).unwrap();
        assert_eq!(
            r,
            ReparentRequest {
                mode: ReparentMode::Planned,
                to: None,
                wait_timeout: Duration::from_secs(5),
                lock_timeout: Duration::from_secs(10),
                max_lag: Duration::from_secs(5),
                requester: "token:ops from 127.0.0.1".into(),
                on_behalf_of: None,
                may_lose_acknowledged_writes: false,
            }
        );
        let r = reparent_body(r#"{"mode": "emergency", "may_lose_acknowledged_writes": true}"#)
            .unwrap();
        assert!(r.may_lose_acknowledged_writes);
        let e = reparent_body(r#"{"mode": "planned", "may_lose_acknowledged_writes": true}"#)
            .unwrap_err();
        assert!(
            format!("{e:?}").contains("emergency reparents only"),
            "{e:?}"
        );
        let r = reparent_body(
            r#"{"mode": "emergency", "to": "zone1-102", "wait_timeout": "1s 500ms",
                "lock_timeout": "0s", "max_lag": "250ms", "requester": "alice"}"#,
        )
        .unwrap();
        assert_eq!(r.mode, ReparentMode::Emergency);
        assert_eq!(r.to.as_deref(), Some("zone1-102"));
        assert_eq!(
            (r.wait_timeout, r.lock_timeout, r.max_lag),
            (
                Duration::from_millis(1500),
                Duration::ZERO,
                Duration::from_millis(250)
            )
        );
        // The body's requester is a note; the requester is the authenticated caller.
        assert_eq!(r.requester, "token:ops from 127.0.0.1");
        assert_eq!(r.on_behalf_of.as_deref(), Some("alice"));
        assert_eq!(
            r.requested_by(),
            "token:ops from 127.0.0.1 (on behalf of alice)"
        );
        for (body, want) in [
            ("", "mode is required"),
            (r#"{"to": "zone1-102"}"#, "mode is required"),
            (r#"{"mode": "switchover"}"#, "\"switchover\""),
            (
                r#"{"mode": "planned", "to": "nodash"}"#,
                "to: invalid tablet alias",
            ),
            (
                r#"{"mode": "planned", "wait_timeout": "soon"}"#,
                "wait_timeout: \"soon\" is not a duration",
            ),
            (
                r#"{"mode": "planned", "wait_timeout": "0s"}"#,
                "wait_timeout must be greater than zero",
            ),
            (
                r#"{"mode": "planned", "max_lag": "0s"}"#,
                "max_lag must be greater than zero",
            ),
            (
                r#"{"mode": "planned", "lock_timeout": "2h"}"#,
                "lock_timeout must be at most 1h",
            ),
            (
                r#"{"mode": "planned", "force": true}"#,
                "unknown field `force`",
            ),
            (
                r#"{"mode": "planned", "requester": "a\u0007b"}"#,
                "requester must be printable",
            ),
        ] {
            let e = reparent_body(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}: {e}");
            assert!(e.message.contains(want), "{body}: {e}");
        }
        assert!(is_recovery_action(ACTION_PLANNED_REPARENT));
    }

    fn registered(alias: &str) -> TabletRecord {
        tablet_record(alias, "ks", "0")
    }

    #[test]
    fn quarantine_targets_are_checked() {
        let rec = shard_record("ks", "0", Some("zone1-101"), 4);
        let r = quarantine_target("zone1-102", Some(&registered("zone1-102")), Some(&rec));
        assert_eq!(
            r.unwrap(),
            ("ks".to_string(), "0".to_string(), Term::new(4))
        );
        let e =
            quarantine_target("zone1-101", Some(&registered("zone1-101")), Some(&rec)).unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert!(
            e.message.contains("primary of ks/0") && e.message.contains("reparent planned ks/0"),
            "{e}"
        );
        let e = quarantine_target("zone1-109", None, None).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(
            e.message.contains("no tablet zone1-109 is registered"),
            "{e}"
        );
        let e = quarantine_target("zone1", None, None).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        // A shard without a record yet: term 0.
        let r = quarantine_target("zone1-102", Some(&registered("zone1-102")), None);
        assert_eq!(r.unwrap().2, Term::ZERO);
    }

    #[test]
    fn quarantine_requests_need_a_reason() {
        let e = QuarantineRequest::default().validate().unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("reason is required"), "{e}");
        // A requester is no identity: it only annotates the reason.
        let req: QuarantineRequest =
            parse_body(br#"{"reason":" disk errors ","requester":"alice"}"#).unwrap();
        assert_eq!(req.validate().unwrap(), "disk errors (on behalf of alice)");
        let req: QuarantineRequest = parse_body(br#"{"reason":"x","requester":" "}"#).unwrap();
        assert_eq!(req.validate().unwrap(), "x");
        assert!(parse_body::<QuarantineRequest>(br#"{"reasn":"x"}"#).is_err());
        let rel: ReleaseRequest = parse_body(b"").unwrap();
        assert_eq!(rel, ReleaseRequest::default());
        assert_eq!(rel.validate().unwrap(), None);
        let rel: ReleaseRequest = parse_body(br#"{"requester":"bob"}"#).unwrap();
        assert_eq!(rel.validate().unwrap().as_deref(), Some("on behalf of bob"));
        let rel: ReleaseRequest = parse_body(br#"{"reason":"checked","requester":"bob"}"#).unwrap();
        assert_eq!(
            rel.validate().unwrap().as_deref(),
            Some("checked, on behalf of bob")
        );
    }

    #[test]
    fn quarantine_lists_name_the_shard_when_registered() {
        let records = BTreeMap::from([
            (
                "zone1-102".to_string(),
                QuarantineRecord {
                    reason: "errant".into(),
                    at_ms: 5,
                    term: Term::new(3),
                    by: None,
                },
            ),
            (
                "zone1-109".to_string(),
                QuarantineRecord {
                    reason: "gone".into(),
                    at_ms: 6,
                    term: Term::new(3),
                    by: Some("alice".into()),
                },
            ),
        ]);
        let tablets = BTreeMap::from([("zone1-102".to_string(), registered("zone1-102"))]);
        let json = serde_json::to_value(quarantine_list(&records, &tablets)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"quarantine": [
                {"alias": "zone1-102", "keyspace": "ks", "shard": "0", "reason": "errant",
                 "at_ms": 5, "term": 3, "by": null},
                {"alias": "zone1-109", "keyspace": null, "shard": null, "reason": "gone",
                 "at_ms": 6, "term": 3, "by": "alice"},
            ]})
        );
    }
}
