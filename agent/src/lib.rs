//! myha-agent: one per mysqld. Polls it, reports health over gRPC, registers in etcd under a
//! lease, executes reparent actions under the shard term, and fences its mysqld when a newer
//! term names another primary.

pub mod actions;
pub mod agent;
pub mod checks;
pub mod config;
pub mod fence;
pub mod health;
pub mod mysql;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use myha_proto::agent::agent_server::AgentServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tracing::info;

use crate::agent::Shared;
use crate::config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] agent::StateError),
    #[error("cannot create state_dir {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC TLS: {0}")]
    Tls(#[from] config::ConfigError),
    #[error("gRPC TLS server: {0}")]
    TlsServer(#[from] pki::PkiError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { what, addr, source })
}

/// Runs the agent until `shutdown` resolves. Neither mysqld nor etcd being down stops it.
pub async fn run(
    cfg: AgentConfig,
    metrics: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    std::fs::create_dir_all(&cfg.agent.state_dir).map_err(|source| RunError::StateDir {
        path: cfg.agent.state_dir.clone(),
        source,
    })?;
    let tls = daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
    let grpc = bind("grpc_listen", cfg.agent.grpc_listen).await?;
    let http = bind("http_listen", cfg.agent.http_listen).await?;
    let host = cfg.agent.advertise_host.clone();
    let grpc_addr = grpc.local_addr().map_err(RunError::Http)?;
    let http_addr = http.local_addr().map_err(RunError::Http)?;
    let shared = Shared::new(cfg)?;
    shared.set_grpc_addr(format!("{host}:{}", grpc_addr.port()));
    shared.set_http_addr(format!("{host}:{}", http_addr.port()));
    info!(alias = %shared.id.alias, grpc = %grpc_addr, http = %http_addr, mysql = %shared.endpoint.addr(), "agent starting");

    tokio::spawn(agent::poll_loop(shared.clone()));
    tokio::spawn(agent::heartbeat_loop(shared.clone()));
    tokio::spawn(agent::fence_loop(shared.clone()));
    tokio::spawn(agent::etcd_loop(shared.clone()));
    tokio::spawn(agent::probe_loop(shared.clone()));
    tokio::spawn(agent::isolation_loop(shared.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/health", get(|s, q| lb_check(s, q, LbPath::Health)))
        .route("/primary", get(|s, q| lb_check(s, q, LbPath::Primary)))
        .route("/read-write", get(|s, q| lb_check(s, q, LbPath::Primary)))
        .route("/replica", get(|s, q| lb_check(s, q, LbPath::Replica)))
        .route("/read-only", get(|s, q| lb_check(s, q, LbPath::ReadOnly)))
        .with_state(shared.clone());
    let http_server = axum::serve(http, app).with_graceful_shutdown(wait_stop(stop_rx.clone()));

    let svc = service::AgentService {
        shared: shared.clone(),
    };
    // With TLS the handshakes are ours (`pki::accept`), so that each refused one is logged
    // with its reason and counted: the refused client usually sees only "connection closed".
    let router = tonic::transport::Server::builder().add_service(AgentServer::new(svc));
    type Serving = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    >;
    let grpc_server: Serving = match &tls {
        Some(m) => {
            info!(identity = %m.identity, allowed = ?shared.cfg.agent.grpc_allowed_clients, "gRPC with TLS: a certificate of the cluster CA required, reparent actions from the allowed identities only");
            let incoming = pki::accept::TlsIncoming::start(
                grpc,
                m.server_config()?,
                GRPC_HANDSHAKE_TIMEOUT,
                |peer, why| {
                    if why.is_refusal() {
                        metrics::counter!("myha_agent_rpcs_refused_total", "kind" => "tls_handshake")
                            .increment(1);
                        tracing::warn!(%peer, reason = %why, "gRPC TLS handshake refused");
                    } else {
                        tracing::debug!(%peer, reason = %why, "gRPC connection closed in its TLS handshake");
                    }
                },
            );
            Box::pin(router.serve_with_incoming_shutdown(incoming, wait_stop(stop_rx)))
        }
        None => {
            tracing::warn!(
                grpc = %grpc_addr,
                "gRPC without TLS (no [tls]): anyone who can reach this loopback port can call reparent actions"
            );
            Box::pin(router.serve_with_incoming_shutdown(grpc_incoming(grpc), wait_stop(stop_rx)))
        }
    };

    let (g, h) = tokio::join!(grpc_server, http_server);
    g?;
    h.map_err(RunError::Http)?;
    info!("agent stopped");
    Ok(())
}

/// How long a gRPC client may take over its TLS handshake.
const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC connections, with Nagle's algorithm off. `Server::tcp_nodelay` does not apply to a
/// listener of our own (`serve_with_incoming`): without this, a response written in more than
/// one piece waited for the orchestrator's delayed ACK (about 40 ms on Linux) in the middle of
/// a reparent (seen when `Promote`'s answer grew by one step note: 14 ms in the agent, 58 ms at
/// the orchestrator, every time; whether a response is written in pieces depends on its size).
pub fn grpc_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[derive(Clone, Copy)]
enum LbPath {
    Health,
    Primary,
    Replica,
    ReadOnly,
}

/// The load balancers' checks ([`checks`]): 200 or 503 with the verdict as JSON; 400 for a
/// malformed `max_lag`. Judged on the last poll, which must be at most three poll intervals
/// (at least 1 s) old.
async fn lb_check(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    path: LbPath,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let max_lag = match query.get("max_lag").map(|v| checks::parse_max_lag(v)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(why)) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "ok": false, "reason": why })),
            )
                .into_response()
        }
    };
    let check = match path {
        LbPath::Health => checks::Check::Health,
        LbPath::Primary => checks::Check::Primary,
        LbPath::Replica => checks::Check::Replica { max_lag },
        LbPath::ReadOnly => checks::Check::ReadOnly { max_lag },
    };
    let h = shared.health.borrow().clone();
    let stale_after = (shared.cfg.agent.poll_interval * 3).max(Duration::from_secs(1));
    let verdict = checks::judge(check, &h, topo::now_ms(), stale_after);
    let code = if verdict.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(verdict)).into_response()
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn grpc_connections_are_accepted_with_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = grpc_incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(
            accepted.nodelay().expect("read TCP_NODELAY"),
            "Nagle's algorithm is on for the agent's gRPC connections"
        );
    }
}
