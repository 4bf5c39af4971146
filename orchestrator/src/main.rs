//! myha-orchestrator. For now it OBSERVES ONLY: it follows every tablet's health and serves
//! it over HTTP. Failure analysis and automatic recovery (reparenting, repairs) come later.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::Json;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use tabletwatch::{TabletWatch, WatchOptions};
use tracing::{info, warn};

use myha_orchestrator::api;
use myha_orchestrator::config::OrchestratorConfig;

const OBSERVE_ONLY: &str = "OBSERVE ONLY: automatic recovery is not implemented yet; \
this orchestrator follows every tablet's health and reports it, but never analyses failures, \
reparents or repairs anything";

/// myha-orchestrator: follows every tablet's health (OBSERVE ONLY: automatic recovery is not
/// implemented yet).
#[derive(Parser, Debug)]
#[command(
    version,
    about = "myha-orchestrator: follows every tablet's health. OBSERVE ONLY: automatic recovery is not implemented yet",
    long_about = "myha-orchestrator: follows every tablet registered in etcd and its agent's \
health stream, and serves /health, /metrics and GET /api/v1/shards on [orchestrator] http_listen.\n\n\
OBSERVE ONLY: automatic recovery is not implemented yet. It never analyses failures, \
reparents or repairs anything; a failed primary stays failed until an operator acts."
)]
struct Args {
    /// Path to orchestrator.toml.
    #[arg(long, short = 'c', env = "MYHA_ORCHESTRATOR_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = OrchestratorConfig::load(&args.config)?;
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
    stale_after: Duration,
}

async fn run(
    cfg: OrchestratorConfig,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    warn!("{OBSERVE_ONLY}");
    let topo = topo::Topo::connect(&cfg.etcd.endpoints, &cfg.etcd.prefix, cfg.etcd.dial_timeout)
        .await
        .with_context(|| format!("etcd {}", cfg.etcd.endpoints.join(",")))?;
    let watch = Arc::new(TabletWatch::start(&topo, WatchOptions::default()));
    let listener = tokio::net::TcpListener::bind(cfg.orchestrator.http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on orchestrator.http_listen {}",
                cfg.orchestrator.http_listen
            )
        })?;
    let addr = listener.local_addr().context("http_listen address")?;
    info!(
        http = %addr,
        etcd = %cfg.etcd.endpoints.join(","),
        prefix = %cfg.etcd.prefix,
        health_stale_after = ?cfg.orchestrator.health_stale_after,
        observe_only = true,
        "orchestrator started (observe only)"
    );
    let state = AppState {
        watch,
        metrics,
        stale_after: cfg.orchestrator.health_stale_after,
    };
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/api/v1/shards", get(shards))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")?;
    info!("orchestrator stopped");
    Ok(())
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn shards(State(s): State<AppState>) -> Json<api::ShardsResponse> {
    let snap = s.watch.snapshot();
    Json(api::shards_response(&snap, Instant::now(), s.stale_after))
}
