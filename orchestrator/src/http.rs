//! The HTTP server: routes and handlers around the pure [`crate::api`], and the task that keeps
//! each shard's last recovery (from the etcd audit log) at hand so that no request waits on
//! etcd for it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use topo::Term;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::future::join_all;
use metrics_exporter_prometheus::PrometheusHandle;
use tabletwatch::TabletWatch;
use topo::Topo;

use crate::api::{
    self, AckRequest, ApiError, AuditJson, ChangeResponse, EngineState, QuarantineChange,
    QuarantineJson, QuarantineListResponse, QuarantineRequest, RecoveriesQuery, RecoveriesResponse,
    ReleaseRequest, ReparentBody, ReparentDefaults, Scope, ToggleRequest,
};
use crate::auth::{self, ApiToken, Caller, Role};
use crate::control::{Control, ControlError};
use crate::engine::{EngineHandle, EngineView};
use crate::operator::{self, OpEvent, Operation};
use crate::recovery::{self, PrimaryPosition};

pub use myha_api::LAST_RECOVERY_SCAN;
/// A shard's last recovery is re-read at least this often.
pub const LAST_RECOVERY_REFRESH: Duration = Duration::from_secs(10);
/// ... and every second for this long after its recovery state or term changed (the audit
/// entries are written asynchronously, shortly after).
pub const LAST_RECOVERY_FOLLOW: Duration = Duration::from_secs(5);

/// Everything the handlers need.
pub struct HttpState {
    pub watch: Arc<TabletWatch>,
    /// Kept alive here; `engine.view()` is the engine's current state.
    pub engine: Arc<EngineHandle>,
    pub control: Control,
    pub topo: Topo,
    pub metrics: PrometheusHandle,
    pub stale_after: Duration,
    /// The API's tokens (`config::OrchestratorConfig::api_tokens`); empty: the API is open.
    pub api_tokens: Vec<ApiToken>,
    /// Each shard's newest recovery in the audit log (see [`spawn_last_recoveries`]).
    pub last_recoveries: Arc<RwLock<BTreeMap<(String, String), AuditJson>>>,
    /// What operator reparents run with (the engine's handles and config).
    pub recovery: recovery::Deps,
}

type St = State<Arc<HttpState>>;

/// Every route of the orchestrator's HTTP API.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/api/v1/shards", get(shards))
        .route("/api/v1/recoveries", get(recoveries))
        .route("/api/v1/recoveries/disable", post(disable))
        .route("/api/v1/recoveries/enable", post(enable))
        .route("/api/v1/shards/{keyspace}/{shard}/ack", post(ack))
        .route("/api/v1/shards/{keyspace}/{shard}/reparent", post(reparent))
        .route("/api/v1/quarantine", get(quarantine_list))
        .route(
            "/api/v1/quarantine/{alias}",
            post(quarantine_add).merge(delete(quarantine_release)),
        )
        .method_not_allowed_fallback(|method: axum::http::Method, uri: Uri| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .fallback(|uri: Uri| async move {
            ApiError::not_found(format!(
                "no such endpoint: {}; see GET /api/v1/shards, GET /api/v1/recoveries, \
                 POST /api/v1/recoveries/disable|enable, POST /api/v1/shards/{{keyspace}}/{{shard}}/ack|reparent, \
                 GET /api/v1/quarantine, POST|DELETE /api/v1/quarantine/{{alias}}",
                uri.path()
            ))
        })
        // After every route and the fallbacks: the layer covers them all.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .with_state(state)
}

/// The role a request needs: reads `read`, anything else (the changes) `operate`.
fn needed_role(method: &Method) -> Role {
    if method == Method::GET || method == Method::HEAD {
        Role::Read
    } else {
        Role::Operate
    }
}

/// Authorizes every `/api/...` request ([`auth::authorize`]) and hands the handlers the
/// [`Caller`]. `/health` and `/metrics` pass without a token: liveness probes and Prometheus
/// scrape them without credentials, and they change nothing and carry no secret.
async fn authenticate(State(s): St, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/api/") {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(p)| p.ip());
    let needed = needed_role(req.method());
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    match auth::authorize(&s.api_tokens, header, needed) {
        Ok(principal) => {
            req.extensions_mut().insert(Caller { principal, peer });
            next.run(req).await
        }
        Err(e) => {
            let status = e.status();
            metrics::counter!(
                "myha_orchestrator_api_refused_total",
                "status" => status.as_str().to_string()
            )
            .increment(1);
            // The reason, never the token; a 403 names the token, a 401 has none to name.
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(method = %req.method(), path, %peer, status = status.as_u16(), reason = %e, "API request refused");
            api::ApiError::from(e).into_response()
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves (with the client's address known to
/// the handlers, for the audit trail); over HTTPS with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        Some(config) => {
            use axum::serve::ListenerExt;
            // `tap_io` makes the listener's address (`SocketAddr`) the connection info.
            let listener = TlsListener::start(listener, config).tap_io(|_| {});
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
    }
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTPS listener: [`pki::accept::TlsIncoming`] (each handshake in a task of its own,
/// bounded by [`TLS_HANDSHAKE_TIMEOUT`]) as axum's listener; failed handshakes are counted.
struct TlsListener(pki::accept::TlsIncoming);

impl TlsListener {
    fn start(
        listener: tokio::net::TcpListener,
        config: Arc<tokio_rustls::rustls::ServerConfig>,
    ) -> TlsListener {
        TlsListener(pki::accept::TlsIncoming::start(
            listener,
            config,
            TLS_HANDSHAKE_TIMEOUT,
            |peer, why| {
                if why.is_refusal() {
                    metrics::counter!("myha_orchestrator_api_tls_failures_total").increment(1);
                }
                tracing::debug!(%peer, reason = %why, "API TLS handshake failed");
            },
        ))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.next().await {
            Some(c) => c,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.0.local_addr())
    }
}

/// Readiness (a Kubernetes readiness probe, a load balancer): 200 once the watches have synced
/// the topology from etcd and the engine has analysed it, 503 before, with the reason as JSON.
/// `/health` stays liveness: the process answers.
async fn ready(State(s): St) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    let synced = s.watch.snapshot().topo_synced;
    let analysed = engine_state(&s).analysed;
    let (ok, reason) = match (synced, analysed) {
        (true, true) => (true, "topology synced from etcd and analysed"),
        (false, _) => (false, "the topology is not synced from etcd yet"),
        (true, false) => (false, "the topology is synced but not analysed yet"),
    };
    let code = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            serde_json::json!({ "ready": ok, "topo_synced": synced, "analysed": analysed, "reason": reason }),
        ),
    )
}

async fn render_metrics(State(s): St) -> String {
    let snap = s.watch.snapshot();
    let mut text = s.metrics.render();
    text.push_str(&api::tablet_metrics(&snap, Instant::now(), s.stale_after));
    text
}

fn engine_state(s: &HttpState) -> EngineState {
    let view = s.engine.view();
    let last = s
        .last_recoveries
        .read()
        .map(|m| m.clone())
        .unwrap_or_default();
    EngineState::from_view(&view, &last)
}

async fn shards(State(s): St) -> Json<api::ShardsResponse> {
    let snap = s.watch.snapshot();
    let engine = engine_state(&s);
    Json(api::shards_response(
        &snap,
        Instant::now(),
        s.stale_after,
        &engine,
    ))
}

fn query<T: serde::de::DeserializeOwned + Default>(uri: &Uri) -> Result<T, ApiError> {
    if uri.query().is_none_or(str::is_empty) {
        return Ok(T::default());
    }
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("query string: {}", e.body_text())))
}

fn topo_err(e: topo::TopoError) -> ApiError {
    ApiError::unavailable(format!("etcd: {e}"))
}

async fn recoveries(State(s): St, uri: Uri) -> Result<Json<RecoveriesResponse>, ApiError> {
    let filter = query::<RecoveriesQuery>(&uri)?.validate()?;
    let shards: Vec<(String, String)> = match (&filter.keyspace, &filter.shard) {
        (Some(k), Some(sh)) => vec![(k.clone(), sh.clone())],
        (Some(k), None) => s
            .topo
            .list_shards(k)
            .await
            .map_err(topo_err)?
            .into_iter()
            .map(|r| (r.keyspace, r.shard))
            .collect(),
        (None, _) => {
            let mut all = Vec::new();
            for ks in s.topo.list_keyspaces().await.map_err(topo_err)? {
                for r in s.topo.list_shards(&ks.name).await.map_err(topo_err)? {
                    all.push((r.keyspace, r.shard));
                }
            }
            all
        }
    };
    let lists = join_all(shards.into_iter().map(|(ks, shard)| {
        let topo = s.topo.clone();
        let limit = filter.limit;
        async move {
            let r = topo.list_audit(&ks, Some(&shard), limit).await;
            r.map(|entries| (ks, shard, entries))
        }
    }))
    .await;
    let lists = lists
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(topo_err)?;
    Ok(Json(RecoveriesResponse {
        recoveries: api::merge_audit(&lists, filter.limit),
    }))
}

fn control_err(e: ControlError) -> ApiError {
    match e {
        ControlError::Invalid(m) => ApiError::bad_request(m),
        ControlError::Contended { .. } => {
            ApiError::new(axum::http::StatusCode::CONFLICT, e.to_string())
        }
        ControlError::Decode { .. } => ApiError::internal(e.to_string()),
        ControlError::Etcd { .. } | ControlError::Timeout { .. } | ControlError::Topo(_) => {
            ApiError::unavailable(e.to_string())
        }
    }
}

/// 404 unless the shard has a record.
async fn require_shard(s: &HttpState, keyspace: &str, shard: &str) -> Result<(), ApiError> {
    match s.topo.get_shard(keyspace, shard).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::not_found(format!(
            "no shard {keyspace}/{shard} in the topology"
        ))),
        Err(topo::TopoError::InvalidArgument(m)) => Err(ApiError::bad_request(m)),
        Err(e) => Err(topo_err(e)),
    }
}

async fn toggle(
    s: &HttpState,
    disabled: bool,
    caller: &Caller,
    uri: &Uri,
    body: &Bytes,
) -> Result<Json<ChangeResponse>, ApiError> {
    let from_body: ToggleRequest = api::parse_body(body)?;
    let from_query: ToggleRequest = query(uri)?;
    let (scope, reason) = api::toggle_scope(from_body, from_query)?;
    let by = caller.actor();
    let reason_text = reason.clone().unwrap_or_else(|| "no reason given".into());
    match &scope {
        Scope::Global => {
            s.control
                .set_global(disabled, &reason_text, &by)
                .await
                .map_err(control_err)?;
        }
        Scope::Shard { keyspace, shard } => {
            require_shard(s, keyspace, shard).await?;
            s.control
                .set_shard(keyspace, shard, disabled, &reason_text, &by)
                .await
                .map_err(control_err)?;
        }
    }
    let action = if disabled { "disable" } else { "enable" };
    tracing::warn!(%scope, reason = %reason_text, %by, "recoveries {action}d through the API");
    Ok(Json(ChangeResponse {
        ok: true,
        action: action.into(),
        scope: scope.to_string(),
        reason,
    }))
}

async fn disable(
    State(s): St,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    body: Bytes,
) -> Response {
    toggle(&s, true, &caller, &uri, &body).await.into_response()
}

async fn enable(
    State(s): St,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    body: Bytes,
) -> Response {
    toggle(&s, false, &caller, &uri, &body)
        .await
        .into_response()
}

async fn ack(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((keyspace, shard)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<ChangeResponse>, ApiError> {
    let req: AckRequest = api::parse_body(&body)?;
    require_shard(&s, &keyspace, &shard).await?;
    let by = caller.actor();
    s.control
        .ack(&keyspace, &shard, &by)
        .await
        .map_err(control_err)?;
    let reason = req.reason.filter(|r| !r.trim().is_empty());
    tracing::warn!(keyspace, shard, reason = ?reason, %by, "recoveries acknowledged through the API");
    Ok(Json(ChangeResponse {
        ok: true,
        action: "ack".into(),
        scope: format!("{keyspace}/{shard}"),
        reason,
    }))
}

// ---- quarantine --------------------------------------------------------------------------

/// `GET /api/v1/quarantine`: read from etcd (not the watched copy), so that an answer right
/// after a change through any orchestrator includes it.
async fn quarantine_list(State(s): St) -> Result<Json<QuarantineListResponse>, ApiError> {
    let (records, tablets) =
        tokio::join!(s.control.list_quarantine(), s.topo.list_tablets(None, None));
    let records = records.map_err(control_err)?;
    let tablets = tablets
        .map_err(topo_err)?
        .into_iter()
        .map(|t| (t.alias.clone(), t))
        .collect();
    Ok(Json(api::quarantine_list(&records, &tablets)))
}

/// The tablet's registration and its shard's record (either may be missing).
async fn tablet_and_shard(
    s: &HttpState,
    alias: &str,
) -> Result<(Option<topo::TabletRecord>, Option<topo::ShardRecord>), ApiError> {
    let Some(t) = s.topo.get_tablet(alias).await.map_err(topo_err)? else {
        return Ok((None, None));
    };
    let rec = s
        .topo
        .get_shard(&t.keyspace, &t.shard)
        .await
        .map_err(topo_err)?
        .map(|(r, _)| r);
    Ok((Some(t), rec))
}

/// `POST /api/v1/quarantine/{alias}`. The primary check and the write are not atomic: a
/// reparent to this tablet finishing in between would leave a quarantined primary, which the
/// analysis and the gateway report (nothing promotes it again meanwhile).
async fn quarantine_add(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(alias): Path<String>,
    body: Bytes,
) -> Result<Json<QuarantineChange>, ApiError> {
    let req: QuarantineRequest = api::parse_body(&body)?;
    let reason = req.validate()?;
    let by = caller.actor();
    api::check_alias(&alias)?;
    let (tablet, record) = tablet_and_shard(&s, &alias).await?;
    let (keyspace, shard, term) = api::quarantine_target(&alias, tablet.as_ref(), record.as_ref())?;
    let rec = s
        .control
        .quarantine_by(&keyspace, &shard, &alias, &reason, term, &by)
        .await
        .map_err(control_err)?;
    tracing::warn!(tablet = %alias, keyspace, shard, reason, %by, "tablet quarantined through the API");
    Ok(Json(QuarantineChange {
        ok: true,
        action: "quarantine".into(),
        tablet: QuarantineJson::new(&alias, &rec, tablet.as_ref()),
        audited: true,
    }))
}

/// `DELETE /api/v1/quarantine/{alias}`: 404 when it is not quarantined. The repairs then treat
/// the tablet like any other (a deposed primary that still holds errant transactions is
/// quarantined again by the next `stale_tablet_claiming_primary` repair, with the reason).
async fn quarantine_release(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path(alias): Path<String>,
    body: Bytes,
) -> Result<Json<QuarantineChange>, ApiError> {
    let req: ReleaseRequest = api::parse_body(&body)?;
    let reason = req.validate()?;
    let by = caller.actor();
    api::check_alias(&alias)?;
    let (tablet, record) = tablet_and_shard(&s, &alias).await?;
    let shard = tablet.as_ref().map(|t| {
        (
            t.keyspace.as_str(),
            t.shard.as_str(),
            record.as_ref().map_or(Term::ZERO, |r| r.term),
        )
    });
    let Some(rec) = s
        .control
        .release_quarantine_by(&alias, shard, reason.as_deref(), &by)
        .await
        .map_err(control_err)?
    else {
        return Err(ApiError::not_found(format!("{alias} is not quarantined")));
    };
    if shard.is_none() {
        tracing::warn!(tablet = %alias, "released tablet is not registered: no shard to audit the release on");
    }
    tracing::warn!(tablet = %alias, %by, "tablet released from quarantine through the API");
    Ok(Json(QuarantineChange {
        ok: true,
        action: "release".into(),
        tablet: QuarantineJson::new(&alias, &rec, tablet.as_ref()),
        audited: shard.is_some(),
    }))
}

// ---- operator reparents -----------------------------------------------------------------

/// `POST /api/v1/shards/{keyspace}/{shard}/reparent`: validates (400/404 before anything
/// runs), then spawns the operation and streams its events as ndjson. The operation runs to
/// its end even if the client goes away.
async fn reparent(
    State(s): St,
    Extension(caller): Extension<Caller>,
    Path((keyspace, shard)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ReparentBody = api::parse_body(&body)?;
    let cfg = &s.recovery.cfg;
    let defaults = ReparentDefaults {
        wait_timeout: cfg.planned_wait_timeout,
        lock_timeout: cfg.planned_lock_timeout,
        max_lag: cfg.planned_max_lag,
    };
    let req = body.validate(defaults, &caller.actor())?;
    let record = match s.topo.get_shard(&keyspace, &shard).await {
        Ok(Some((r, _))) => r,
        Ok(None) => {
            return Err(ApiError::not_found(format!(
                "no shard {keyspace}/{shard} in the topology"
            )))
        }
        Err(topo::TopoError::InvalidArgument(m)) => return Err(ApiError::bad_request(m)),
        Err(e) => return Err(topo_err(e)),
    };
    if let Some(to) = &req.to {
        match s.topo.get_tablet(to).await.map_err(topo_err)? {
            None => {
                return Err(ApiError::not_found(format!(
                    "no tablet {to} is registered (unknown alias, or its agent is down)"
                )))
            }
            Some(t) if t.keyspace != keyspace || t.shard != shard => {
                return Err(ApiError::bad_request(format!(
                    "tablet {to} belongs to {}/{}, not {keyspace}/{shard}",
                    t.keyspace, t.shard
                )))
            }
            Some(_) => {}
        }
    }
    let last_primary = {
        let snap = s.watch.snapshot();
        snap.shard(&keyspace, &shard).and_then(|v| {
            let p = v.primary()?;
            PrimaryPosition::from_health(p.alias(), v.term(), p.health()?, topo::now_ms())
        })
    };
    let mode = req.mode;
    let op = Operation {
        keyspace: keyspace.clone(),
        shard: shard.clone(),
        request: req,
        last_primary,
        suspect: record.primary.clone(),
    };
    tracing::warn!(keyspace, shard, mode = mode.as_str(), to = ?op.request.to, requester = %op.request.requested_by(), "operator reparent requested through the API");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<OpEvent>();
    let deps = s.recovery.clone();
    tokio::spawn(operator::run(deps, op, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        Some((
            Ok::<Bytes, std::convert::Infallible>(Bytes::from(ev.line())),
            rx,
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(format!("building the response: {e}")))
}

// ---- each shard's last recovery ---------------------------------------------------------

/// What, when it changes, means a shard's audit log probably grew.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    term: Term,
    running: bool,
    last_attempt_ms: Option<u64>,
}

#[derive(Debug)]
struct Tracked {
    signature: Signature,
    loaded_at: Option<Instant>,
    follow_until: Instant,
}

fn signatures(
    view: &EngineView,
    snap: &tabletwatch::FleetSnapshot,
) -> Vec<((String, String), Signature)> {
    view.shards
        .iter()
        .map(|s| {
            let term = snap
                .shard(&s.keyspace, &s.shard)
                .map_or(Term::ZERO, |v| v.term());
            (
                (s.keyspace.clone(), s.shard.clone()),
                Signature {
                    term,
                    running: s.recovery.is_some(),
                    last_attempt_ms: s
                        .last_recovery
                        .as_ref()
                        .map(|r| r.started_ms + r.duration_ms),
                },
            )
        })
        .collect()
}

/// Keeps `state.last_recoveries` current: each shard's audit log is read when first seen,
/// every second for a while after its term or recovery state changed, and every
/// [`LAST_RECOVERY_REFRESH`] otherwise. Stops when the state is dropped.
pub fn spawn_last_recoveries(state: &Arc<HttpState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tracked: HashMap<(String, String), Tracked> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = weak.upgrade() else { return };
            let now = Instant::now();
            let sigs = signatures(&s.engine.view(), &s.watch.snapshot());
            let keys: Vec<_> = sigs.iter().map(|(k, _)| k.clone()).collect();
            tracked.retain(|k, _| keys.contains(k));
            let mut due = Vec::new();
            for (key, sig) in sigs {
                let t = tracked.entry(key.clone()).or_insert_with(|| Tracked {
                    signature: sig.clone(),
                    loaded_at: None,
                    follow_until: now,
                });
                if t.signature != sig {
                    t.signature = sig;
                    t.follow_until = now + LAST_RECOVERY_FOLLOW;
                }
                let stale = t
                    .loaded_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= LAST_RECOVERY_REFRESH);
                if stale || now < t.follow_until {
                    due.push(key);
                }
            }
            let loads = join_all(due.into_iter().map(|(ks, shard)| {
                let topo = s.topo.clone();
                async move {
                    let r = topo.list_audit(&ks, Some(&shard), LAST_RECOVERY_SCAN).await;
                    ((ks, shard), r)
                }
            }))
            .await;
            let mut found = Vec::new();
            for (key, r) in loads {
                match r {
                    Ok(entries) => {
                        if let Some(t) = tracked.get_mut(&key) {
                            t.loaded_at = Some(now);
                        }
                        let last =
                            api::last_recovery(&entries).map(|e| AuditJson::new(&key.0, &key.1, e));
                        found.push((key, last));
                    }
                    Err(e) => {
                        tracing::debug!(keyspace = %key.0, shard = %key.1, error = %e, "reading the audit log for the last recovery");
                    }
                }
            }
            let mut map = match s.last_recoveries.write() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            map.retain(|k, _| keys.contains(k));
            for (key, last) in found {
                match last {
                    Some(l) => {
                        map.insert(key, l);
                    }
                    None => {
                        map.remove(&key);
                    }
                }
            }
        }
    });
}
