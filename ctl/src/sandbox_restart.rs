//! `myhactl sandbox restart <primary|ALIAS>`: starts a tablet's mysqld again after `sandbox
//! fault kill` (or any crash), with the command line `sandbox up` recorded in
//! `{dir}/sandbox.json` (same datadir, ports, socket), and the tablet's agent too when it is
//! gone. The orchestrator's repairs then repoint the tablet at the current primary, or
//! quarantine it with the reason when it holds errant transactions.

use std::path::PathBuf;
use std::time::Duration;

use crate::sandbox_fault::{connect_topo, current_primary, read_state, tablet, FaultError};

/// How long the restarted mysqld may take to accept connections (crash recovery included).
const MYSQLD_READY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error(transparent)]
    Sandbox(#[from] FaultError),
    #[error(transparent)]
    Harness(#[from] launcher::HarnessError),
    #[error(
        "mysqld of {alias} is still running (pid {pid}): nothing to restart (`myhactl sandbox fault kill {alias}` crashes it)"
    )]
    Running { alias: String, pid: u32 },
    #[error(
        "mysqld of {alias} (pid {pid}) is frozen (SIGSTOP), not down: thaw it with `myhactl sandbox fault cont {alias}`"
    )]
    Frozen { alias: String, pid: u32 },
    #[error("starting mysqld of {alias} again")]
    Mysqld {
        alias: String,
        #[source]
        source: launcher::HarnessError,
    },
    #[error("mysqld of {alias} runs again (pid {pid}), but starting its agent failed")]
    Agent {
        alias: String,
        pid: u32,
        #[source]
        source: launcher::HarnessError,
    },
    #[error("recording the new pids in {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: launcher::HarnessError,
    },
}

#[derive(clap::Args, Debug)]
pub struct RestartArgs {
    /// `primary` (the tablet the shard record in etcd names now) or a tablet alias, e.g.
    /// zone1-101.
    #[arg(value_name = "primary|ALIAS")]
    pub target: String,
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: RestartArgs) -> Result<(), RestartError> {
    let dir = args.dir.unwrap_or_else(crate::sandbox::default_dir);
    // A sandbox must exist before the lock (which would create the dir).
    read_state(&dir)?;
    // Not concurrently with `up`/`down`/another restart: the pids written back must be the
    // ones running.
    let _lock = launcher::sandbox::lock_dir(&dir)?;
    let mut state = read_state(&dir)?;
    let alias = if args.target == "primary" {
        let topo = connect_topo(&state).await?;
        current_primary(&topo, &state).await?.0
    } else {
        args.target.clone()
    };
    let t = tablet(&state, &alias)?.clone();

    // Whatever sandbox.json says, /proc decides what runs: a mysqld started by hand on the
    // tablet's datadir counts too, and two on one datadir must never be.
    let running = t.running();
    let pid_of = |prog: &str| {
        running
            .iter()
            .find(|(p, _)| *p == prog)
            .map(|(_, pid)| *pid)
    };
    if let Some(pid) = pid_of("mariadbd") {
        return Err(if launcher::pid_stopped(pid) {
            RestartError::Frozen { alias, pid }
        } else {
            RestartError::Running { alias, pid }
        });
    }
    let agent_alive = pid_of("myha-agent");

    let mysqld_pid = t
        .start_mysqld(MYSQLD_READY)
        .await
        .map_err(|source| RestartError::Mysqld {
            alias: alias.clone(),
            source,
        })?;
    let agent_pid = match agent_alive {
        Some(pid) => pid,
        None => t
            .start_agent()
            .await
            .map_err(|source| RestartError::Agent {
                alias: alias.clone(),
                pid: mysqld_pid,
                source,
            })?,
    };
    if let Some(rec) = state.tablets.iter_mut().find(|r| r.alias == alias) {
        rec.mysqld_pid = Some(mysqld_pid);
        rec.agent_pid = Some(agent_pid);
    }
    let path = launcher::SandboxState::path(&dir);
    state
        .write(&path)
        .map_err(|source| RestartError::Record { path, source })?;

    println!(
        "restarted mysqld of {alias} (pid {mysqld_pid}, {}): it accepts connections, read-only",
        t.mysql
    );
    match agent_alive {
        Some(pid) => println!("its agent was alive (pid {pid}): only mysqld was restarted"),
        None => println!("its agent was gone: restarted it too (pid {agent_pid})"),
    }
    println!(
        "the orchestrator's repairs now repoint it at the current primary (or quarantine it, with the reason, if it holds errant transactions); watch with `myhactl status`"
    );
    Ok(())
}
