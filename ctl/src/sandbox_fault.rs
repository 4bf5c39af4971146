//! `myhactl sandbox fault <kill|stop|cont> <primary|ALIAS>`: a signal to one tablet's mysqld of
//! the sandbox (its pid from `{dir}/sandbox.json`; `primary` is the tablet the etcd shard record
//! names now), to watch the failover happen. A killed mysqld stays down until `myhactl sandbox
//! restart` starts it again (see `sandbox_restart`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use launcher::{SandboxState, SandboxTablet};
use topo::Topo;

/// How long etcd may take to answer (connect, and each read).
const ETCD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a SIGKILLed mysqld may take to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("no sandbox in {dir} (no {file}); start one with `myhactl sandbox up`")]
    NoSandbox { dir: PathBuf, file: &'static str },
    #[error(transparent)]
    Harness(#[from] launcher::HarnessError),
    #[error("the sandbox's etcd at {etcd}: {reason}")]
    Etcd { etcd: String, reason: String },
    #[error("{keyspace}/{shard} has no primary in etcd right now")]
    NoPrimary { keyspace: String, shard: String },
    #[error("no tablet {alias} in the sandbox (tablets: {known})")]
    NoTablet { alias: String, known: String },
    #[error("the sandbox has no mysqld pid for {0}")]
    NoPid(String),
    #[error("mysqld of {alias} (pid {pid}) is not running")]
    NotRunning { alias: String, pid: u32 },
    #[error("sending {signal} to pid {pid}: {reason}")]
    Signal {
        signal: &'static str,
        pid: u32,
        reason: String,
    },
    #[error("mysqld of {alias} (pid {pid}) still runs {waited:?} after SIGKILL")]
    Survived {
        alias: String,
        pid: u32,
        waited: Duration,
    },
}

/// What to do to the mysqld.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: the process dies at once (a crash).
    Kill,
    /// SIGSTOP: the process freezes (connections open, nothing answers).
    Stop,
    /// SIGCONT: a frozen process runs again.
    Cont,
}

impl Fault {
    fn signal(self) -> &'static str {
        match self {
            Fault::Kill => "KILL",
            Fault::Stop => "STOP",
            Fault::Cont => "CONT",
        }
    }

    fn signo(self) -> libc::c_int {
        match self {
            Fault::Kill => libc::SIGKILL,
            Fault::Stop => libc::SIGSTOP,
            Fault::Cont => libc::SIGCONT,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct FaultArgs {
    /// kill (SIGKILL), stop (SIGSTOP, freeze) or cont (SIGCONT, thaw).
    #[arg(value_enum)]
    pub fault: Fault,
    /// `primary` (the tablet the shard record in etcd names now) or a tablet alias, e.g.
    /// zone1-102.
    #[arg(value_name = "primary|ALIAS")]
    pub target: String,
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The state of the sandbox in `dir` (an error naming the dir when there is none).
pub fn read_state(dir: &Path) -> Result<SandboxState, FaultError> {
    SandboxState::read(dir)?.ok_or_else(|| FaultError::NoSandbox {
        dir: dir.to_path_buf(),
        file: launcher::sandbox::STATE_FILE,
    })
}

/// Connects to the sandbox's etcd.
pub async fn connect_topo(state: &SandboxState) -> Result<Topo, FaultError> {
    let etcd_err = |reason: String| FaultError::Etcd {
        etcd: state.etcd.clone(),
        reason,
    };
    let access = crate::security::from_sandbox(state)
        .map_err(|e| etcd_err(crate::api::chain(&e)))?
        .etcd_access();
    match tokio::time::timeout(
        ETCD_TIMEOUT,
        Topo::connect_with([state.etcd.as_str()], &state.prefix, ETCD_TIMEOUT, &access),
    )
    .await
    {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(etcd_err(e.to_string())),
        Err(_) => Err(etcd_err(format!("no answer within {ETCD_TIMEOUT:?}"))),
    }
}

/// The primary the shard record names now, and its term.
pub async fn current_primary(
    topo: &Topo,
    state: &SandboxState,
) -> Result<(String, u64), FaultError> {
    let etcd_err = |reason: String| FaultError::Etcd {
        etcd: state.etcd.clone(),
        reason,
    };
    let record =
        match tokio::time::timeout(ETCD_TIMEOUT, topo.get_shard(&state.keyspace, &state.shard))
            .await
        {
            Ok(Ok(Some((r, _)))) => r,
            Ok(Ok(None)) => {
                return Err(etcd_err(format!(
                    "no shard record for {}/{}",
                    state.keyspace, state.shard
                )))
            }
            Ok(Err(e)) => return Err(etcd_err(e.to_string())),
            Err(_) => return Err(etcd_err(format!("no answer within {ETCD_TIMEOUT:?}"))),
        };
    match record.primary {
        Some(p) => Ok((p, record.term.get())),
        None => Err(FaultError::NoPrimary {
            keyspace: state.keyspace.clone(),
            shard: state.shard.clone(),
        }),
    }
}

/// The sandbox tablet called `alias`.
pub fn tablet<'a>(state: &'a SandboxState, alias: &str) -> Result<&'a SandboxTablet, FaultError> {
    state
        .tablets
        .iter()
        .find(|t| t.alias == alias)
        .ok_or_else(|| FaultError::NoTablet {
            alias: alias.to_string(),
            known: state
                .tablets
                .iter()
                .map(|t| t.alias.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Sends `fault`'s signal to `pid`.
fn send_signal(fault: Fault, pid: u32) -> Result<(), FaultError> {
    let err = |reason: String| FaultError::Signal {
        signal: fault.signal(),
        pid,
        reason,
    };
    let raw = libc::pid_t::try_from(pid).map_err(|_| err("pid out of range".into()))?;
    // SAFETY: kill(2) has no memory effects; the pid was checked to be this sandbox's mariadbd.
    if unsafe { libc::kill(raw, fault.signo()) } == 0 {
        Ok(())
    } else {
        Err(err(std::io::Error::last_os_error().to_string()))
    }
}

pub async fn run(args: FaultArgs) -> Result<(), FaultError> {
    let dir = args.dir.unwrap_or_else(crate::sandbox::default_dir);
    let state = read_state(&dir)?;
    let (alias, role) = if args.target == "primary" {
        let topo = connect_topo(&state).await?;
        let (alias, term) = current_primary(&topo, &state).await?;
        let role = format!(
            ", the primary of {}/{} at term {term},",
            state.keyspace, state.shard
        );
        (alias, role)
    } else {
        (args.target.clone(), String::new())
    };
    let t = tablet(&state, &alias)?;
    let pid = t
        .mysqld_pid
        .ok_or_else(|| FaultError::NoPid(alias.clone()))?;
    // Only a live mariadbd of this sandbox is signalled, never a recycled pid.
    if !launcher::sandbox::is_ours(pid, "mariadbd", &state.dir) {
        return Err(FaultError::NotRunning { alias, pid });
    }
    send_signal(args.fault, pid)?;
    match args.fault {
        Fault::Kill => {
            let start = Instant::now();
            while launcher::pid_alive(pid) {
                if start.elapsed() > KILL_WAIT {
                    return Err(FaultError::Survived {
                        alias,
                        pid,
                        waited: KILL_WAIT,
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            println!(
                "killed mysqld of {alias} (pid {pid}){role} with SIGKILL; it stays down until `myhactl sandbox restart {alias}`"
            );
        }
        Fault::Stop => println!(
            "froze mysqld of {alias} (pid {pid}){role} with SIGSTOP; thaw it with `myhactl sandbox fault cont {alias}`"
        ),
        Fault::Cont => println!("thawed mysqld of {alias} (pid {pid}){role} with SIGCONT"),
    }
    Ok(())
}
