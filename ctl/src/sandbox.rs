//! `myhactl sandbox up|down`: a local cluster (etcd + MariaDB + agents + one orchestrator + one
//! gateway) in the background, described by `{dir}/sandbox.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use launcher::{Cluster, ClusterOptions, Durability, SandboxState};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Number of MariaDB instances (the first is the primary).
    #[arg(long, default_value_t = 3)]
    pub tablets: usize,
    /// Print the endpoints and credentials as JSON.
    #[arg(long)]
    pub json: bool,
    /// `loopback`: every process on 127.0.0.1. `netns`: each process on a host of its own (a
    /// network namespace on a private bridge, 10.99.n.0/24, reachable from this machine only),
    /// so that network faults between hosts can be tried; needs root and iproute2.
    #[arg(long, value_enum, default_value_t = HostsArg::Loopback)]
    pub hosts: HostsArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostsArg {
    Loopback,
    Netns,
}

/// A short name for the sandbox's network, from its directory (several sandboxes, several
/// networks): `sb` and 8 hex digits.
fn network_name(dir: &Path) -> String {
    // FNV-1a: stable across runs and builds (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("sb{h:08x}")
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `$MYHA_SANDBOX_DIR`, else `$HOME/.myha/sandbox`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MYHA_SANDBOX_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".myha").join("sandbox")
}

/// The state of the sandbox in `dir` (an error when there is none).
pub fn read_state(dir: &Path) -> anyhow::Result<SandboxState> {
    SandboxState::read(dir)?.with_context(|| {
        format!(
            "no sandbox in {} (no {}); start one with `myhactl sandbox up`",
            dir.display(),
            launcher::sandbox::STATE_FILE
        )
    })
}

fn resolve_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = dir.unwrap_or_else(default_dir);
    if dir.is_absolute() {
        Ok(dir)
    } else {
        Ok(std::env::current_dir()
            .context("current directory")?
            .join(dir))
    }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.tablets == 0 {
        anyhow::bail!("--tablets must be at least 1");
    }
    let dir = resolve_dir(args.dir)?;
    let _lock = launcher::sandbox::lock_dir(&dir)?;
    launcher::sandbox::prepare_dir(&dir)?;
    let started = Instant::now();
    let (hosts, netns_name) = match args.hosts {
        HostsArg::Loopback => (launcher::Hosts::Loopback, None),
        HostsArg::Netns => (launcher::Hosts::Netns, Some(network_name(&dir))),
    };
    let cluster = Cluster::start(ClusterOptions {
        hosts,
        netns_name,
        tablets: args.tablets,
        durability: Durability::SemiSync,
        base_dir: Some(dir.clone()),
        start_agents: true,
        start_orchestrator: true,
        start_gateway: true,
        lease_ttl: Duration::from_secs(5),
        new_session: true,
        ..ClusterOptions::default()
    })
    .await
    .with_context(|| format!("starting the sandbox in {}", dir.display()))?;
    let state = cluster.detach()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state.summary_json())?);
        return Ok(());
    }
    print!("{}", render_up(&state, started.elapsed()));
    Ok(())
}

fn render_up(s: &SandboxState, took: Duration) -> String {
    let mut out = String::new();
    let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "sandbox up in {:.1}s: {}\n",
        took.as_secs_f64(),
        s.dir.display()
    ));
    out.push_str(&format!(
        "  etcd      {} (prefix {}, pid {})\n",
        s.etcd,
        s.prefix,
        pid(s.etcd_pid)
    ));
    out.push_str(&format!(
        "  orch.     http://{} (pid {})\n",
        s.orchestrator_http.as_deref().unwrap_or("-"),
        pid(s.orchestrator_pid)
    ));
    if let Some(g) = &s.gateway {
        out.push_str(&format!(
            "  gateway   rw {} ro {} admin http://{} (pid {})\n",
            g.rw.as_deref().unwrap_or("-"),
            g.ro.as_deref().unwrap_or("-"),
            g.admin,
            pid(s.gateway_pid)
        ));
    }
    out.push_str(&format!(
        "  shard     {}/{} ({}), primary {}\n",
        s.keyspace,
        s.shard,
        s.durability,
        s.tablets.first().map(|t| t.alias.as_str()).unwrap_or("-")
    ));
    out.push_str(&format!(
        "  app user  {} password {} database {}\n",
        s.app_user, s.app_password, s.database
    ));
    out.push_str("  tablets:\n");
    for t in &s.tablets {
        out.push_str(&format!(
            "    {:<10} mysql {:<16} agent {:<16} (mysqld pid {}, agent pid {})\n",
            t.alias,
            t.mysql,
            t.agent_grpc.as_deref().unwrap_or("-"),
            pid(t.mysqld_pid),
            pid(t.agent_pid)
        ));
    }
    let connect = |addr: &str| {
        let port = addr.rsplit(':').next().unwrap_or("");
        format!(
            "mariadb --protocol=tcp -h127.0.0.1 -P{port} -u{} -p{} {}",
            s.app_user, s.app_password, s.database
        )
    };
    match s
        .gateway
        .as_ref()
        .map(|g| (g.rw.as_deref(), g.ro.as_deref()))
    {
        Some((rw, ro)) => {
            if let Some(rw) = rw {
                out.push_str(&format!(
                    "writes:   {}  (gateway RW port: the primary)\n",
                    connect(rw)
                ));
            }
            if let Some(ro) = ro {
                out.push_str(&format!(
                    "reads:    {}  (gateway RO port: a replica)\n",
                    connect(ro)
                ));
            }
        }
        None => {
            if let Some(t) = s.tablets.first() {
                out.push_str(&format!("connect:  {}\n", connect(&t.mysql)));
            }
        }
    }
    out.push_str(&format!(
        "status:   myhactl status --dir {}\nstop:     myhactl sandbox down --dir {}\n",
        s.dir.display(),
        s.dir.display()
    ));
    out
}

pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    let dir = resolve_dir(args.dir)?;
    if SandboxState::read(&dir)?.is_none() {
        anyhow::bail!(
            "no sandbox running in {} (no {})",
            dir.display(),
            launcher::sandbox::STATE_FILE
        );
    }
    let _lock = launcher::sandbox::lock_dir(&dir)?;
    if SandboxState::read(&dir)?.is_none() {
        anyhow::bail!(
            "no sandbox running in {} (no {})",
            dir.display(),
            launcher::sandbox::STATE_FILE
        );
    }
    let report = launcher::sandbox::down(&dir, Duration::from_secs(30)).await?;
    let mut stuck = Vec::new();
    for s in &report {
        println!("{:<24} pid {:<8} {}", s.what, s.pid, s.outcome);
        if s.outcome == "still running" {
            stuck.push(format!("{} (pid {})", s.what, s.pid));
        }
    }
    if !stuck.is_empty() {
        anyhow::bail!("could not stop: {}", stuck.join(", "));
    }
    println!(
        "sandbox in {} stopped (data left in place; the next `up` there wipes it)",
        dir.display()
    );
    Ok(())
}
