//! myha-orchestrator: follows every tablet's health, analyses every shard continuously and
//! recovers (emergency reparent under the shard lock; repairs), and serves its state over HTTP.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use metrics_exporter_prometheus::PrometheusHandle;
use tabletwatch::{TabletWatch, WatchOptions};
use tracing::{info, warn};

use myha_orchestrator::auth::ApiToken;
use myha_orchestrator::config::OrchestratorConfig;
use myha_orchestrator::control::{Control, ControlWatch};
use myha_orchestrator::{engine, http, recovery};

/// myha-orchestrator: follows every tablet's health, analyses every shard and recovers.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "myha-orchestrator: follows every tablet's health, analyses every shard and recovers failures",
    long_about = "myha-orchestrator: follows every tablet registered in etcd and its agent's \
health stream, analyses every shard on every change (and at least every 100 ms), and recovers: \
a dead primary (confirmed by the replicas' own probes) is replaced by an emergency reparent \
under the shard's etcd lock and a new term. Several instances may run: the shard lock \
arbitrates. Automatic recovery can be disabled in [recovery] or at run time (globally or per \
shard, stored in etcd); a flapping shard stops recovering until acknowledged.\n\n\
Serves /health, /metrics and /api/v1/... on [orchestrator] http_listen; with API tokens \
configured ([orchestrator] api_tokens) every /api/v1/ request needs a bearer token, without \
any the API must be bound to a loopback address."
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
    // Token files are read once, here; `load` has checked them already.
    let api_tokens = cfg.api_tokens()?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    cfg.log.init();
    let metrics = daemon::install_metrics()?;
    let rt = daemon::runtime()?;
    rt.block_on(run(cfg, api_tokens, metrics, daemon::shutdown_signal()))
}

async fn run(
    cfg: OrchestratorConfig,
    api_tokens: Vec<ApiToken>,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let topo = cfg
        .etcd
        .connect()
        .await
        .with_context(|| format!("etcd {}", cfg.etcd.endpoints.join(",")))?;
    let tls = daemon::load_tls(cfg.tls.as_ref(), daemon::TLS_KEYS)?;
    if let Some(m) = &tls {
        info!(identity = %m.identity, "calling the agents over TLS");
    }
    let watch = Arc::new(TabletWatch::start(
        &topo,
        WatchOptions {
            tls: tls.clone(),
            ..WatchOptions::default()
        },
    ));
    let control = ControlWatch::start(&topo);
    let recovery_cfg = cfg.recovery_config();
    if !recovery_cfg.enabled {
        warn!("[recovery] enabled = false: problems are analysed and reported, never recovered");
    }
    let deps = recovery::Deps::with_tls(topo.clone(), recovery_cfg, tls);
    let engine = Arc::new(engine::start(
        watch.subscribe(),
        control.subscribe(),
        deps.clone(),
        engine::EngineOptions::default(),
    ));
    let listener = tokio::net::TcpListener::bind(cfg.orchestrator.http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on orchestrator.http_listen {}",
                cfg.orchestrator.http_listen
            )
        })?;
    let addr = listener.local_addr().context("http_listen address")?;
    let api_tls = cfg.api_tls_config()?;
    // Names and roles only: a secret never reaches a log.
    let auth = if api_tokens.is_empty() {
        "none: the API is open (loopback only)".to_string()
    } else {
        api_tokens
            .iter()
            .map(|t| format!("{} ({})", t.name, t.role))
            .collect::<Vec<_>>()
            .join(", ")
    };
    info!(
        http = %addr,
        https = api_tls.is_some(),
        api_tokens = %auth,
        etcd = %cfg.etcd.endpoints.join(","),
        prefix = %cfg.etcd.prefix,
        health_stale_after = ?cfg.orchestrator.health_stale_after,
        recovery_enabled = cfg.recovery.enabled,
        "orchestrator started"
    );
    let state = Arc::new(http::HttpState {
        watch,
        engine,
        control: Control::new(topo.clone()),
        topo,
        metrics,
        stale_after: cfg.orchestrator.health_stale_after,
        api_tokens,
        last_recoveries: Default::default(),
        recovery: deps,
    });
    http::spawn_last_recoveries(&state);
    http::serve(listener, http::router(state), api_tls, shutdown)
        .await
        .context("HTTP server")?;
    // The control watches live as long as the server.
    drop(control);
    info!("orchestrator stopped");
    Ok(())
}
