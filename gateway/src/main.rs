//! myha-gateway. For now it DOES NOT PROXY CONNECTIONS: it follows every tablet's health and
//! serves the routing choice the proxy of a later issue will use (`GET /routing`).

mod config;
mod routing;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::Json;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use tabletwatch::{TabletWatch, WatchOptions};
use tracing::{info, warn};

use crate::config::GatewayConfig;
use crate::routing::RoutingPolicy;

const NO_PROXY: &str = "NOT A PROXY YET: this gateway does not accept or proxy MySQL \
connections; it follows every tablet's health and serves the routing choice on /routing";

/// myha-gateway: computes where each shard's reads and writes should go (DOES NOT PROXY
/// CONNECTIONS YET).
#[derive(Parser, Debug)]
#[command(
    version,
    about = "myha-gateway: computes where each shard's writes and reads should go. DOES NOT PROXY CONNECTIONS YET",
    long_about = "myha-gateway: follows every tablet registered in etcd and its agent's health \
stream, and serves /health, /metrics and GET /routing (per shard: the rw primary and the ro \
replicas it would route to, or why none) on [gateway] admin_listen.\n\n\
DOES NOT PROXY CONNECTIONS YET: no MySQL port is opened; applications cannot connect through it."
)]
struct Args {
    /// Path to gateway.toml.
    #[arg(long, short = 'c', env = "MYHA_GATEWAY_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = GatewayConfig::load(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    cfg.log.init();
    let metrics = daemon::install_metrics()?;
    let rt = daemon::runtime()?;
    rt.block_on(run(cfg, metrics, daemon::shutdown_signal()))
}

#[derive(Clone)]
struct AppState {
    watch: Arc<TabletWatch>,
    metrics: PrometheusHandle,
    policy: RoutingPolicy,
}

async fn run(
    cfg: GatewayConfig,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    warn!("{NO_PROXY}");
    let topo = topo::Topo::connect(&cfg.etcd.endpoints, &cfg.etcd.prefix, cfg.etcd.dial_timeout)
        .await
        .with_context(|| format!("etcd {}", cfg.etcd.endpoints.join(",")))?;
    let watch = Arc::new(TabletWatch::start(&topo, WatchOptions::default()));
    let listener = tokio::net::TcpListener::bind(cfg.gateway.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on gateway.admin_listen {}",
                cfg.gateway.admin_listen
            )
        })?;
    let addr = listener.local_addr().context("admin_listen address")?;
    let policy = cfg.routing.policy();
    info!(
        admin = %addr,
        etcd = %cfg.etcd.endpoints.join(","),
        prefix = %cfg.etcd.prefix,
        health_stale_after = ?policy.health_stale_after,
        max_replica_lag = ?policy.max_replica_lag,
        proxying = false,
        "gateway started (routing view only, no proxying)"
    );
    let state = AppState {
        watch,
        metrics,
        policy,
    };
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/routing", get(routing_view))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")?;
    info!("gateway stopped");
    Ok(())
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn routing_view(State(s): State<AppState>) -> Json<routing::RoutingResponse> {
    let snap = s.watch.snapshot();
    Json(routing::routing_response(&snap, Instant::now(), &s.policy))
}
