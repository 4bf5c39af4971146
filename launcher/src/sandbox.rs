//! The sandbox's state file (`{dir}/sandbox.json`) and tearing a detached cluster down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use topo::Durability;

use crate::agent::AgentProc;
use crate::cluster::Credentials;
use crate::error::{HarnessError, Result};
use crate::mysqld::Mysqld;
use crate::process::CommandLine;
use crate::util::{pid_alive, signal};

/// Name of the state file in the sandbox dir.
pub const STATE_FILE: &str = "sandbox.json";
/// Marker file: the dir was made by `myhactl sandbox up` (so `up` may wipe it).
pub const MARKER_FILE: &str = ".myha-sandbox";

/// Everything about a detached cluster, as written to `{dir}/sandbox.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxState {
    pub dir: PathBuf,
    /// `http://127.0.0.1:port`.
    pub etcd: String,
    pub etcd_pid: Option<u32>,
    pub prefix: String,
    pub cell: String,
    pub keyspace: String,
    pub shard: String,
    pub durability: Durability,
    pub app_user: String,
    pub app_password: String,
    pub database: String,
    pub credentials: Credentials,
    /// The sandbox's `myha-orchestrator` (none in sandboxes made before it had one).
    #[serde(default)]
    pub orchestrator_pid: Option<u32>,
    /// Its HTTP API, `https://127.0.0.1:port` (`127.0.0.1:port`, plain HTTP, in sandboxes made
    /// before the API had TLS).
    #[serde(default)]
    pub orchestrator_http: Option<String>,
    /// The sandbox's `myha-gateway` (none in sandboxes made before it had one).
    #[serde(default)]
    pub gateway_pid: Option<u32>,
    /// Its ports.
    #[serde(default)]
    pub gateway: Option<SandboxGateway>,
    pub tablets: Vec<SandboxTablet>,
    pub created_ms: u64,
    /// The network namespaces the processes run in (`myhactl sandbox up --hosts netns`), by
    /// the name `sandbox down` removes them under; none on loopback.
    #[serde(default)]
    pub network: Option<String>,
    /// The operator's certificate (`myhactl`'s identity) and the cluster CA: what myhactl
    /// presents to etcd and the agents when no `--ca`/`--cert`/`--key` is given (none: a
    /// plaintext sandbox, or one made before).
    #[serde(default)]
    pub operator_tls: Option<pki::TlsFiles>,
    /// The etcd user and the file holding its password (none: etcd without auth).
    #[serde(default)]
    pub etcd_user: Option<String>,
    #[serde(default)]
    pub etcd_password_file: Option<PathBuf>,
}

/// The sandbox gateway's ports, `127.0.0.1:port` each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxGateway {
    /// Writes: the shard's primary.
    pub rw: Option<String>,
    /// Reads: a replica under the lag bound.
    pub ro: Option<String>,
    /// `/health`, `/metrics`, `/routing`.
    pub admin: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxTablet {
    pub alias: String,
    /// `127.0.0.1:port`.
    pub mysql: String,
    pub socket: PathBuf,
    pub mysqld_pid: Option<u32>,
    pub agent_pid: Option<u32>,
    /// `127.0.0.1:port`.
    pub agent_grpc: Option<String>,
    pub agent_http: Option<String>,
    pub dir: PathBuf,
    /// How mysqld was started, for `myhactl sandbox restart` (none in sandboxes made before
    /// restart existed).
    #[serde(default)]
    pub mysqld_command: Option<CommandLine>,
    /// How the agent was started (likewise).
    #[serde(default)]
    pub agent_command: Option<CommandLine>,
}

impl SandboxTablet {
    /// The live processes of this tablet, found in /proc by their arguments (anything naming
    /// the tablet's dir), whatever pid `sandbox.json` recorded: (program, pid).
    pub fn running(&self) -> Vec<(&'static str, u32)> {
        scan(&self.dir)
            .into_iter()
            .map(|(_, prog, pid)| (prog, pid))
            .collect()
    }

    fn recorded<'a>(&self, cl: &'a Option<CommandLine>, what: &str) -> Result<&'a CommandLine> {
        cl.as_ref().ok_or_else(|| {
            HarnessError::Sandbox(format!(
                "{STATE_FILE} does not record how {what} of {} was started (a sandbox made by an \
                 older myhactl); recreate it with `myhactl sandbox down` and `myhactl sandbox up`",
                self.alias
            ))
        })
    }

    /// Starts the tablet's mysqld again, detached (new session, output appended to its
    /// `mysqld.log`), with the command line recorded at `sandbox up`, and returns its pid
    /// once it accepts connections within `timeout` (else an error naming the log, and the
    /// new process is killed). The caller makes sure it is not running already.
    pub async fn start_mysqld(&self, timeout: Duration) -> Result<u32> {
        let cl = self.recorded(&self.mysqld_command, "mysqld")?;
        let addr: std::net::SocketAddrV4 = self.mysql.parse().map_err(|_| {
            HarnessError::Sandbox(format!("{}: bad mysql address {}", self.alias, self.mysql))
        })?;
        let m = Mysqld::from_command_line(
            format!("mysqld {}", self.alias),
            &self.dir,
            *addr.ip(),
            addr.port(),
            cl,
            true,
        )?;
        m.start_within(timeout).await?;
        m.detach();
        m.pid().ok_or_else(|| {
            HarnessError::Sandbox(format!(
                "mysqld of {} exited right after its start",
                self.alias
            ))
        })
    }

    /// Starts the tablet's agent again, detached, with the recorded command line (its config
    /// is still `{dir}/agent.toml`); returns its pid once it answers `FullStatus`.
    pub async fn start_agent(&self) -> Result<u32> {
        let cl = self.recorded(&self.agent_command, "the agent")?;
        let a = AgentProc::from_command_line(&self.dir, cl, true)?;
        a.start().await?;
        a.detach();
        a.pid().ok_or_else(|| {
            HarnessError::Sandbox(format!(
                "the agent of {} exited right after its start",
                self.alias
            ))
        })
    }
}

impl SandboxState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// The bearer token for the sandbox's orchestrator API, from the config the sandbox gave
    /// it (`{dir}/orchestrator/orchestrator.toml`, see `Cluster::start_orchestrator`): none on
    /// loopback (an open API), the harness's `operate` token on `--hosts netns` (an API off
    /// loopback needs one). `None` too when that config cannot be read.
    pub fn orchestrator_token(&self) -> Option<String> {
        let path = self.dir.join("orchestrator").join("orchestrator.toml");
        let cfg = myha_orchestrator::config::OrchestratorConfig::load(&path).ok()?;
        cfg.client_token().map(str::to_string)
    }

    /// Reads `{dir}/sandbox.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<SandboxState>> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(HarnessError::Io {
                    what: format!("read {}", path.display()),
                    source: e,
                })
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            HarnessError::Sandbox(format!(
                "{} is not a sandbox state file: {e}",
                path.display()
            ))
        })
    }

    /// Writes the state file atomically (write + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| HarnessError::Sandbox(format!("serialise state: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")
            .map_err(HarnessError::io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(HarnessError::io(format!("rename to {}", path.display())))
    }

    /// What `myhactl sandbox up --json` prints: exactly `dir, etcd, orchestrator_http,
    /// gateway{rw, ro, admin} (null without a gateway), keyspace, shard, app_user, app_password,
    /// database, tablets[{alias, mysql, socket, mysqld_pid, agent_pid, agent_grpc}]`.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir,
            "etcd": self.etcd,
            "orchestrator_http": self.orchestrator_http,
            "gateway": self.gateway.as_ref().map(|g| serde_json::json!({
                "rw": g.rw,
                "ro": g.ro,
                "admin": g.admin,
            })),
            "keyspace": self.keyspace,
            "shard": self.shard,
            "network": self.network,
            "app_user": self.app_user,
            "app_password": self.app_password,
            "database": self.database,
            "tablets": self.tablets.iter().map(|t| serde_json::json!({
                "alias": t.alias,
                "mysql": t.mysql,
                "socket": t.socket,
                "mysqld_pid": t.mysqld_pid,
                "agent_pid": t.agent_pid,
                "agent_grpc": t.agent_grpc,
                "agent_http": t.agent_http,
            })).collect::<Vec<_>>(),
        })
    }

    /// Every process of the sandbox: (what, program name, pid), the gateway and the
    /// orchestrator first, then agents, etcd last.
    pub fn processes(&self) -> Vec<(String, &'static str, u32)> {
        let mut out = Vec::new();
        if let Some(pid) = self.gateway_pid {
            out.push(("myha-gateway".to_string(), "myha-gateway", pid));
        }
        if let Some(pid) = self.orchestrator_pid {
            out.push(("myha-orchestrator".to_string(), "myha-orchestrator", pid));
        }
        for t in &self.tablets {
            if let Some(pid) = t.agent_pid {
                out.push((format!("myha-agent {}", t.alias), "myha-agent", pid));
            }
        }
        for t in &self.tablets {
            if let Some(pid) = t.mysqld_pid {
                out.push((format!("mysqld {}", t.alias), "mariadbd", pid));
            }
        }
        if let Some(pid) = self.etcd_pid {
            out.push((format!("etcd {}", self.etcd), "etcd", pid));
        }
        out
    }

    /// The processes that still run and are still ours (see [`is_ours`]).
    pub fn running(&self) -> Vec<(String, u32)> {
        self.processes()
            .into_iter()
            .filter(|(_, prog, pid)| is_ours(*pid, prog, &self.dir))
            .map(|(what, _, pid)| (what, pid))
            .collect()
    }
}

/// The argv of a process, from /proc/PID/cmdline.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is alive, runs `program` (argv[0]'s file name) and names something under
/// `dir` in its arguments: a recycled pid is never signalled.
pub fn is_ours(pid: u32, program: &str, dir: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Some(argv) = cmdline(pid) else {
        return false;
    };
    let prog_ok = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == program);
    let dir = format!("{}/", dir.display().to_string().trim_end_matches('/'));
    prog_ok && argv.iter().skip(1).any(|a| a.contains(&dir))
}

/// Our programs, in the order [`down`] stops them: the gateway (the clients' entry point), the
/// orchestrator (it would otherwise recover from the rest going away), then agents (they would
/// react to their mysqld going away), mysqld, etcd.
const PROGRAMS: [&str; 5] = [
    "myha-gateway",
    "myha-orchestrator",
    "myha-agent",
    "mariadbd",
    "etcd",
];

/// Every live process running one of our programs with `dir` in its arguments (also finds
/// processes restarted under a new pid).
fn scan(dir: &Path) -> Vec<(String, &'static str, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        for prog in PROGRAMS {
            if is_ours(pid, prog, dir) {
                out.push((format!("{prog} (found by scan)"), prog, pid));
            }
        }
    }
    out
}

/// What [`down`] did to one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub what: String,
    pub pid: u32,
    /// `terminated` (exited on SIGTERM), `killed` (needed SIGKILL), `not running`, or
    /// `still running` (survived SIGKILL: should not happen).
    pub outcome: &'static str,
}

/// Stops the sandbox in `dir`: SIGTERM to every process that is still ours (gateway,
/// orchestrator, agents, mysqld, then etcd), SIGKILL what is left after the grace period, then removes the state
/// file. An error when `dir` has no state file.
pub async fn down(dir: &Path, grace: Duration) -> Result<Vec<Stopped>> {
    let state = SandboxState::read(dir)?.ok_or_else(|| {
        HarnessError::Sandbox(format!("no sandbox in {} (no {STATE_FILE})", dir.display()))
    })?;
    // The state names the dir as it was started; also match the given spelling.
    let mut procs = state.processes();
    for (what, prog, pid) in scan(&state.dir).into_iter().chain(scan(dir)) {
        if !procs.iter().any(|(_, _, p)| *p == pid) {
            procs.push((what, prog, pid));
        }
    }
    let mut report = Vec::new();
    let mut live = Vec::new();
    for (what, prog, pid) in procs {
        if is_ours(pid, prog, &state.dir) || is_ours(pid, prog, dir) {
            live.push((what, prog, pid));
        } else {
            report.push(Stopped {
                what,
                pid,
                outcome: "not running",
            });
        }
    }
    for group in PROGRAMS {
        let members: Vec<_> = live
            .iter()
            .filter(|(_, p, _)| *p == group)
            .cloned()
            .collect();
        for (_, _, pid) in &members {
            let _ = signal(*pid, libc::SIGTERM);
            let _ = signal(*pid, libc::SIGCONT);
        }
        let start = Instant::now();
        while start.elapsed() < grace && members.iter().any(|(_, _, pid)| pid_alive(*pid)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (what, _, pid) in members {
            let outcome = if !pid_alive(pid) {
                "terminated"
            } else {
                let _ = signal(pid, libc::SIGKILL);
                let t = Instant::now();
                while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if pid_alive(pid) {
                    "still running"
                } else {
                    "killed"
                }
            };
            report.push(Stopped { what, pid, outcome });
        }
    }
    if let Some(net) = &state.network {
        crate::netns::remove_kept(net)?;
    }
    let path = SandboxState::path(dir);
    std::fs::remove_file(&path).map_err(HarnessError::io(format!("remove {}", path.display())))?;
    Ok(report)
}

/// An exclusive `flock` on the sandbox directory, held while `up`, `down` or `restart` works on it
/// (released on drop; not inherited by the started processes: the fd is close-on-exec).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Creates `dir` if needed and locks it; an error naming the dir when another `up`/`down`/
/// `restart` holds it.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(HarnessError::io(format!("create {}", dir.display())))?;
    let file =
        std::fs::File::open(dir).map_err(HarnessError::io(format!("open {}", dir.display())))?;
    // SAFETY: flock(2) on an fd we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(HarnessError::Sandbox(format!(
            "another `myhactl sandbox up`, `down` or `restart` is working on {} right now",
            dir.display()
        )));
    }
    Ok(DirLock { _file: file })
}

/// Makes `dir` ready for a new sandbox: refuses when a sandbox runs there or when it is a
/// non-empty directory that no sandbox made; wipes a stopped sandbox's leftovers (the
/// directory itself stays, so a [`DirLock`] on it stays valid). Hold [`lock_dir`] around it.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    if let Some(state) = SandboxState::read(dir)? {
        let running = state.running();
        if !running.is_empty() {
            let pids: Vec<String> = running.iter().map(|(_, p)| p.to_string()).collect();
            return Err(HarnessError::Sandbox(format!(
                "a sandbox is already running in {} ({} processes: pids {}); stop it with `myhactl sandbox down --dir {}`",
                dir.display(),
                running.len(),
                pids.join(" "),
                dir.display()
            )));
        }
    }
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            if !dir.join(MARKER_FILE).exists() {
                return Err(HarnessError::Sandbox(format!(
                    "{} is not empty and was not made by `myhactl sandbox up`; choose another --dir",
                    dir.display()
                )));
            }
            let strays = scan(dir);
            if !strays.is_empty() {
                let pids: Vec<String> = strays
                    .iter()
                    .map(|(w, _, p)| format!("{w} pid {p}"))
                    .collect();
                return Err(HarnessError::Sandbox(format!(
                    "processes of an old sandbox still run in {}: {}; stop them first",
                    dir.display(),
                    pids.join(", ")
                )));
            }
            let entries = std::fs::read_dir(dir)
                .map_err(HarnessError::io(format!("read {}", dir.display())))?;
            for e in entries {
                let e = e.map_err(HarnessError::io(format!("read {}", dir.display())))?;
                let p = e.path();
                let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(HarnessError::io(format!(
                    "wipe old sandbox: remove {}",
                    p.display()
                )))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(HarnessError::io(format!("create {}", dir.display())))?;
    std::fs::write(dir.join(MARKER_FILE), "made by myhactl sandbox up\n").map_err(HarnessError::io(
        format!("write {}", dir.join(MARKER_FILE).display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path) -> SandboxState {
        SandboxState {
            dir: dir.to_path_buf(),
            etcd: "http://127.0.0.1:1".into(),
            etcd_pid: Some(u32::MAX - 3),
            prefix: "/myha".into(),
            cell: "zone1".into(),
            keyspace: "commerce".into(),
            shard: "0".into(),
            durability: Durability::SemiSync,
            app_user: "app".into(),
            app_password: "pw".into(),
            database: "app".into(),
            credentials: Credentials::generate(),
            orchestrator_pid: Some(u32::MAX - 5),
            orchestrator_http: Some("127.0.0.1:3".into()),
            gateway_pid: Some(u32::MAX - 6),
            gateway: Some(SandboxGateway {
                rw: Some("127.0.0.1:5".into()),
                ro: Some("127.0.0.1:6".into()),
                admin: "127.0.0.1:7".into(),
            }),
            tablets: vec![SandboxTablet {
                alias: "zone1-101".into(),
                mysql: "127.0.0.1:2".into(),
                socket: dir.join("zone1-101/mysqld.sock"),
                mysqld_pid: Some(u32::MAX - 4),
                agent_pid: None,
                agent_grpc: None,
                agent_http: None,
                dir: dir.join("zone1-101"),
                mysqld_command: Some(CommandLine {
                    program: "/usr/sbin/mariadbd".into(),
                    args: vec!["--server-id=101".into()],
                    env: vec![],
                    env_removed: vec![],
                    log: dir.join("zone1-101/mysqld.log"),
                }),
                agent_command: None,
            }],
            created_ms: 1,
            network: None,
            operator_tls: None,
            etcd_user: None,
            etcd_password_file: None,
        }
    }

    #[test]
    fn summary_has_exactly_the_documented_keys() {
        let d = tempfile::tempdir().unwrap();
        let v = state(d.path()).summary_json();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "app_password",
                "app_user",
                "database",
                "dir",
                "etcd",
                "gateway",
                "keyspace",
                "network",
                "orchestrator_http",
                "shard",
                "tablets"
            ]
        );
        let mut gkeys: Vec<_> = v["gateway"].as_object().unwrap().keys().cloned().collect();
        gkeys.sort();
        assert_eq!(gkeys, ["admin", "ro", "rw"]);
        let mut tkeys: Vec<_> = v["tablets"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        tkeys.sort();
        assert_eq!(
            tkeys,
            [
                "agent_grpc",
                "agent_http",
                "agent_pid",
                "alias",
                "mysql",
                "mysqld_pid",
                "socket"
            ]
        );
    }

    #[test]
    fn state_round_trips_and_dead_pids_are_not_running() {
        let d = tempfile::tempdir().unwrap();
        let s = state(d.path());
        s.write(&SandboxState::path(d.path())).unwrap();
        let back = SandboxState::read(d.path()).unwrap().unwrap();
        assert_eq!(back, s);
        assert!(back.running().is_empty());
        assert_eq!(back.processes()[0].1, "myha-gateway");
        assert_eq!(back.processes()[1].1, "myha-orchestrator");
        // A state file from before the orchestrator and the gateway still reads.
        let mut v = serde_json::to_value(&s).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("orchestrator_pid");
        o.remove("orchestrator_http");
        o.remove("gateway_pid");
        o.remove("gateway");
        // ... and one from before restart: it reads, and restart says what is missing.
        for t in o["tablets"].as_array_mut().unwrap() {
            let t = t.as_object_mut().unwrap();
            t.remove("mysqld_command");
            t.remove("agent_command");
        }
        let old: SandboxState = serde_json::from_value(v).unwrap();
        assert_eq!(old.tablets[0].mysqld_command, None);
        let err = old.tablets[0]
            .recorded(&old.tablets[0].mysqld_command, "mysqld")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("older myhactl") && err.contains("zone1-101"),
            "{err}"
        );
        assert!(old.summary_json()["gateway"].is_null());
        assert_eq!((old.orchestrator_pid, old.orchestrator_http), (None, None));
        assert_eq!((old.gateway_pid, old.gateway), (None, None));
    }

    #[test]
    fn own_process_is_not_ours_without_the_dir() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_ours(std::process::id(), "etcd", d.path()));
    }

    #[tokio::test]
    async fn down_without_sandbox_is_an_error_and_stale_state_is_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let err = down(d.path(), Duration::from_millis(10))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no sandbox"), "{err}");
        state(d.path())
            .write(&SandboxState::path(d.path()))
            .unwrap();
        let report = down(d.path(), Duration::from_millis(10)).await.unwrap();
        assert!(
            report.iter().all(|s| s.outcome == "not running"),
            "{report:?}"
        );
        assert!(!SandboxState::path(d.path()).exists());
    }

    #[test]
    fn prepare_refuses_foreign_dirs_and_wipes_old_sandboxes() {
        let d = tempfile::tempdir().unwrap();
        let foreign = d.path().join("foreign");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("precious"), "x").unwrap();
        assert!(prepare_dir(&foreign).is_err());
        assert!(foreign.join("precious").exists());

        let sb = d.path().join("sb");
        let lock = lock_dir(&sb).unwrap();
        assert!(lock_dir(&sb).is_err(), "second lock refused");
        prepare_dir(&sb).unwrap();
        std::fs::write(sb.join("old.log"), "x").unwrap();
        prepare_dir(&sb).unwrap();
        assert!(!sb.join("old.log").exists());
        assert!(sb.join(MARKER_FILE).exists());
        drop(lock);
        lock_dir(&sb).unwrap();
    }
}
