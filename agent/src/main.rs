use std::path::PathBuf;

use clap::Parser;
use myha_agent::config::AgentConfig;

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
    cfg.log.init();
    let metrics = daemon::install_metrics()?;
    let rt = daemon::runtime()?;
    rt.block_on(myha_agent::run(cfg, metrics, daemon::shutdown_signal()))?;
    Ok(())
}
