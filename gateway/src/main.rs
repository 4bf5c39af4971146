//! myha-gateway: a lean L4 proxy for MySQL/MariaDB that follows the replication graph.
//!
//! Per configured shard an RW port (to the primary named by the etcd shard record, while it is
//! usable) and an RO port (to a replica whose health is fresh and whose lag is under the bound).
//! It splices bytes only: no authentication termination, no query parsing. Routing is a pure
//! function over the latest tabletwatch snapshot (`routing`), swapped in atomically; the
//! proxy (`proxy`) acts on it. `/health`, `/metrics` and `/routing` are served on
//! `[gateway] admin_listen`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::Json;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use tabletwatch::{TabletWatch, WatchOptions};
use tracing::{info, warn};

use myha_gateway::config::GatewayConfig;
use myha_gateway::proxy::{self, Gateway, ListenerSpec, Port, Settings};
use myha_gateway::routing::{self, ProxyPolicy};

/// myha-gateway: an L4 proxy that sends writes to the shard's primary and reads to replicas
/// under a lag bound.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "myha-gateway: L4 proxy that sends each shard's writes to its primary and reads to replicas under a lag bound",
    long_about = "myha-gateway: a lean L4 proxy for MySQL/MariaDB. For each [[listener]] shard it \
opens an RW port (connections go to the primary named by the etcd shard record, while its agent \
reports it fresh, writable and at the record's term, or, when its agent is silent, while the \
replicas' own probes still reach its mysqld) and an RO port (connections go to a replica \
whose health is fresh and whose lag is under routing.max_replica_lag; otherwise per \
routing.ro_fallback). Bytes are spliced as they are: no authentication termination, no query \
parsing.\n\nDuring a failover new RW connections are held up to routing.buffer_window, then \
sent to the new primary or refused with a MySQL error packet naming the shard and the reason; \
RW connections to a deposed primary are closed as soon as the newer term is seen. Admin: \
/health, /metrics and GET /routing on [gateway] admin_listen. SIGTERM stops accepting and lets \
open connections finish for up to routing.shutdown_grace."
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
    // The control plane (etcd, health streams, routing, admin API) on this thread; connections
    // on their own threads (see `proxy`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(cfg, metrics, daemon::shutdown_signal()))
}

#[derive(Clone)]
struct AppState {
    gateway: Arc<Gateway>,
    metrics: PrometheusHandle,
}

fn listener_specs(cfg: &GatewayConfig) -> Vec<ListenerSpec> {
    let mut out = Vec::new();
    for l in &cfg.listeners {
        for (port, addr) in [(Port::Rw, l.rw), (Port::Ro, l.ro)] {
            if let Some(addr) = addr {
                out.push(ListenerSpec {
                    keyspace: l.keyspace.clone(),
                    shard: l.shard.clone(),
                    port,
                    addr,
                });
            }
        }
    }
    out
}

async fn run(
    cfg: GatewayConfig,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    proxy::describe_metrics();
    let r = &cfg.routing;
    let settings = Settings {
        routing: r.policy(),
        proxy: ProxyPolicy {
            buffer_window: r.buffer_window,
            max_buffered: r.max_buffered,
            ro_policy: r.ro_policy,
            ro_fallback: r.ro_fallback,
        },
        connect_timeout: r.connect_timeout,
        shutdown_grace: r.shutdown_grace,
        max_connections: r.max_connections,
    };
    let specs = listener_specs(&cfg);
    let threads = cfg.gateway.proxy_threads;
    let cpus = cfg.proxy_cpu_plan()?;
    let gateway = Gateway::new(settings, &specs, threads);
    // Ports first: a taken port is a start failure, before anything else runs.
    let listeners = Gateway::bind(&specs)?;
    let proxy_threads = gateway
        .start_proxy_threads(listeners, &cpus)
        .context("starting the proxy threads")?;
    let admin = tokio::net::TcpListener::bind(cfg.gateway.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on gateway.admin_listen {}",
                cfg.gateway.admin_listen
            )
        })?;
    let admin_addr = admin.local_addr().context("admin_listen address")?;
    let topo = cfg
        .etcd
        .connect()
        .await
        .with_context(|| format!("etcd {}", cfg.etcd.endpoints.join(",")))?;
    let tls = daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
    let watch = Arc::new(TabletWatch::start(
        &topo,
        WatchOptions {
            tls,
            ..WatchOptions::default()
        },
    ));
    let routing_task = tokio::spawn(gateway.clone().routing_loop(watch));
    if specs.is_empty() {
        warn!("no [[listener]] configured: serving /routing only, no MySQL port is open");
    }
    info!(
        admin = %admin_addr,
        etcd = %cfg.etcd.endpoints.join(","),
        prefix = %cfg.etcd.prefix,
        listeners = specs.len(),
        proxy_threads = threads,
        proxy_cpus = ?cpus,
        health_stale_after = ?r.health_stale_after,
        max_replica_lag = ?r.max_replica_lag,
        ro_hard_lag = ?r.ro_hard_lag,
        ro_policy = r.ro_policy.as_str(),
        ro_fallback = r.ro_fallback.as_str(),
        buffer_window = ?r.buffer_window,
        "gateway started"
    );
    let state = AppState {
        gateway: gateway.clone(),
        metrics,
    };
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/routing", get(routing_view))
        .with_state(state);
    // The admin API stays up while the proxy drains, then stops.
    let drain = {
        let gateway = gateway.clone();
        async move {
            shutdown.await;
            gateway.shutdown().await;
        }
    };
    axum::serve(admin, app)
        .with_graceful_shutdown(drain)
        .await
        .context("admin HTTP server")?;
    routing_task.abort();
    for t in proxy_threads {
        // They end right after the drain; a panicked one has nothing left to clean up.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    info!("gateway stopped");
    Ok(())
}

async fn render_metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn routing_view(State(s): State<AppState>) -> Json<routing::RoutingResponse> {
    Json(s.gateway.routing_json())
}
