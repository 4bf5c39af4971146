use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use myha_agent::config::{AgentConfig, LogFormat};

/// myha-agent: watches one mysqld, reports its health, executes reparent actions, fences.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path to agent.toml.
    #[arg(long, short = 'c', env = "MYHA_AGENT_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = AgentConfig::load(&args.config)?;
    if args.check_config {
        println!("{}: ok ({})", args.config.display(), cfg.alias());
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYHA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(myha_agent::run(cfg, metrics, shutdown_signal()))?;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
