//! myhactl: the operator's CLI for myha.

mod sandbox;
mod sql;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "myhactl", version, about = "Operate myha: status, sandbox")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Each shard: primary, term, and every tablet's health.
    Status(status::StatusArgs),
    /// A local cluster (etcd + MariaDB + agents + orchestrator) to try myha on one machine.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// Start etcd, N MariaDB instances, their agents and an orchestrator in the background.
    Up(sandbox::UpArgs),
    /// Stop everything a sandbox started.
    Down(sandbox::DownArgs),
    /// Run SQL as the application user on the current primary (or --tablet).
    Sql(sql::SqlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MYHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myhactl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Status(a) => status::run(a).await,
            Command::Sandbox { command } => match command {
                SandboxCommand::Up(a) => sandbox::up(a).await,
                SandboxCommand::Down(a) => sandbox::down(a).await,
                SandboxCommand::Sql(a) => sql::run(a).await,
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("myhactl: {e:#}");
            ExitCode::from(1)
        }
    }
}
