//! [`Mysqld`]: one `mariadbd` on a loopback port with its own datadir.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use crate::error::{HarnessError, Result};
use crate::process::{CommandLine, Proc};
use crate::template::{copy_dir, template_datadir, INNODB_LOG_FILE_SIZE};
use crate::util::{find_system_program, free_port};

/// How long a start may take before it is an error.
pub const MYSQLD_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take before SIGKILL.
pub const MYSQLD_STOP_GRACE: Duration = Duration::from_secs(30);

/// Unix socket paths are limited to 108 bytes.
const MAX_SOCKET_PATH: usize = 107;

/// What a [`Mysqld`] is made of.
#[derive(Debug, Clone)]
pub struct MysqldOptions {
    /// Name used in logs and errors, e.g. `mysqld zone1-101`.
    pub name: String,
    /// The instance's directory (created): holds `data/`, the socket, pid file and `mysqld.log`.
    pub dir: PathBuf,
    pub server_id: u32,
    /// `None` picks a free port.
    pub port: Option<u16>,
    /// Pass `--rpl-semi-sync-slave-enabled=ON` (replica side only; survives restarts).
    pub semi_sync_replica: bool,
    /// Extra `--option=value` arguments, appended last (they win).
    pub extra_args: Vec<String>,
    /// Start in a new session (survives the parent; for the sandbox).
    pub new_session: bool,
    /// The address it listens on and clients connect to (loopback unless on a host of a
    /// [`crate::netns::Network`]).
    pub addr: Ipv4Addr,
    /// The network namespace it runs in (`None`: where the harness runs). In a namespace it
    /// listens on every address of its host (its own and the host's loopback, which its agent
    /// uses), and `addr` is the host's.
    pub netns: Option<String>,
    /// TLS for clients and replicas: `--ssl-cert`, `--ssl-key`, `--ssl-ca` (the certificate
    /// must name `addr`: replicas and agents verify it).
    pub tls: Option<pki::TlsFiles>,
}

impl MysqldOptions {
    pub fn new(name: impl Into<String>, dir: impl Into<PathBuf>, server_id: u32) -> Self {
        MysqldOptions {
            name: name.into(),
            dir: dir.into(),
            server_id,
            port: None,
            semi_sync_replica: false,
            extra_args: Vec::new(),
            new_session: false,
            addr: Ipv4Addr::LOCALHOST,
            netns: None,
            tls: None,
        }
    }
}

/// One `mariadbd`. Every start is `--read-only=ON`. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct Mysqld {
    name: String,
    dir: PathBuf,
    datadir: PathBuf,
    port: u16,
    /// Where clients connect over TCP.
    addr: Ipv4Addr,
    socket: PathBuf,
    log: PathBuf,
    server_id: u32,
    proc: Proc,
}

impl Mysqld {
    /// Prepares the datadir (a copy of the cached template) and starts; returns once it
    /// accepts connections.
    pub async fn launch(opts: MysqldOptions) -> Result<Mysqld> {
        let m = Mysqld::create(opts).await?;
        m.start().await?;
        Ok(m)
    }

    /// Prepares the datadir and command line without starting.
    pub async fn create(opts: MysqldOptions) -> Result<Mysqld> {
        let mariadbd = find_system_program("mariadbd", "MYHA_MARIADBD")?;
        let dir = absolute(&opts.dir)?;
        let Paths {
            datadir,
            socket,
            pid_file,
            log,
        } = Paths::of(&dir);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HarnessError::Invalid(format!(
                "{}: socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter base dir",
                opts.name,
                socket.display()
            )));
        }
        if datadir.exists() {
            return Err(HarnessError::Invalid(format!(
                "{}: datadir {} already exists",
                opts.name,
                datadir.display()
            )));
        }
        let template = template_datadir(&mariadbd).await?;
        let (t, d) = (template.clone(), datadir.clone());
        tokio::task::spawn_blocking(move || copy_dir(&t, &d))
            .await
            .map_err(|e| HarnessError::Invalid(format!("copy task: {e}")))??;
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut args: Vec<OsString> = [
            "--no-defaults".to_string(),
            "--user=root".into(),
            format!("--datadir={}", datadir.display()),
            format!("--port={port}"),
            format!(
                "--bind-address={}",
                if opts.netns.is_some() {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    opts.addr
                }
            ),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", pid_file.display()),
            format!("--log-error={}", log.display()),
            format!("--server-id={}", opts.server_id),
            "--log-bin=mysql-bin".into(),
            "--relay-log=relay-bin".into(),
            "--log-slave-updates".into(),
            "--gtid-strict-mode=1".into(),
            "--binlog-format=ROW".into(),
            "--read-only=ON".into(),
            "--skip-name-resolve".into(),
            "--performance-schema=OFF".into(),
            // Fast to start, small in memory.
            "--innodb-buffer-pool-size=32M".into(),
            format!("--innodb-log-file-size={INNODB_LOG_FILE_SIZE}"),
            "--innodb-log-buffer-size=2M".into(),
            "--innodb-temp-data-file-path=ibtmp1:1M:autoextend".into(),
            "--innodb-buffer-pool-load-at-startup=OFF".into(),
            "--innodb-buffer-pool-dump-at-shutdown=OFF".into(),
            "--innodb-adaptive-hash-index=OFF".into(),
            // A process kill loses nothing with 2 (the OS holds the write); only a machine
            // crash would, which these instances do not model.
            "--innodb-flush-log-at-trx-commit=2".into(),
            "--key-buffer-size=1M".into(),
            "--aria-pagecache-buffer-size=1M".into(),
            "--query-cache-size=0".into(),
            "--query-cache-type=0".into(),
            "--host-cache-size=0".into(),
            "--table-open-cache=400".into(),
            "--table-definition-cache=400".into(),
            "--max-connections=200".into(),
            // A silent source is noticed in seconds, not the default 60 s.
            "--slave-net-timeout=4".into(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        if opts.semi_sync_replica {
            args.push("--rpl-semi-sync-slave-enabled=ON".into());
        }
        if let Some(t) = &opts.tls {
            for (option, path) in [
                ("--ssl-cert", &t.cert_file),
                ("--ssl-key", &t.key_file),
                ("--ssl-ca", &t.ca_file),
            ] {
                let mut arg = OsString::from(format!("{option}="));
                arg.push(absolute(path)?);
                args.push(arg);
            }
        }
        args.extend(opts.extra_args.iter().map(OsString::from));
        let proc = Proc::new(
            opts.name.clone(),
            mariadbd,
            args,
            log.clone(),
            opts.new_session,
        )
        .in_netns(opts.netns.as_deref());
        Ok(Mysqld {
            name: opts.name,
            dir,
            datadir,
            port,
            addr: opts.addr,
            socket,
            log,
            server_id: opts.server_id,
            proc,
        })
    }

    /// A handle on the mysqld that `cl` (from [`Mysqld::command_line`]) starts, in `dir`
    /// on `port`, not started: `myhactl sandbox restart` starts a sandbox's mysqld again with
    /// the very command line the harness first used, read back from `sandbox.json`.
    pub fn from_command_line(
        name: impl Into<String>,
        dir: &Path,
        addr: Ipv4Addr,
        port: u16,
        cl: &CommandLine,
        new_session: bool,
    ) -> Result<Mysqld> {
        let name = name.into();
        let dir = absolute(dir)?;
        let Paths {
            datadir, socket, ..
        } = Paths::of(&dir);
        // The command line is the truth; the server id is only kept for `server_id()`.
        let server_id = cl
            .args
            .iter()
            .find_map(|a| a.strip_prefix("--server-id="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                HarnessError::Invalid(format!(
                    "{name}: the recorded command line has no --server-id=N"
                ))
            })?;
        if !datadir.is_dir() {
            return Err(HarnessError::Invalid(format!(
                "{name}: datadir {} does not exist",
                datadir.display()
            )));
        }
        Ok(Mysqld {
            proc: Proc::from_command_line(name.clone(), cl, new_session),
            name,
            dir,
            datadir,
            port,
            addr,
            socket,
            log: cl.log.clone(),
            server_id,
        })
    }

    /// The command line every (re)start uses (`None` if not UTF-8).
    pub fn command_line(&self) -> Option<CommandLine> {
        self.proc.command_line()
    }

    /// Starts and waits until it accepts connections (an error if already running).
    pub async fn start(&self) -> Result<()> {
        self.start_within(MYSQLD_START_TIMEOUT).await
    }

    /// [`Mysqld::start`] with another bound on the wait for connections.
    pub async fn start_within(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        self.proc.spawn()?;
        self.wait_ready(timeout).await?;
        tracing::debug!(mysqld = %self.name, port = self.port, elapsed = ?started.elapsed(), "mysqld ready");
        Ok(())
    }

    /// Waits until root can run `SELECT 1` over the socket; fails early (with the log tail)
    /// when the process exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last_err = String::new();
        loop {
            self.proc.check_alive()?;
            if self.socket.exists() {
                match tokio::time::timeout(Duration::from_secs(2), self.root_conn()).await {
                    Ok(Ok(mut c)) => match c.query_drop("SELECT 1").await {
                        Ok(()) => {
                            let _ = c.disconnect().await;
                            return Ok(());
                        }
                        Err(e) => last_err = e.to_string(),
                    },
                    Ok(Err(e)) => last_err = e.to_string(),
                    Err(_) => last_err = "connect timed out".into(),
                }
            }
            if start.elapsed() > timeout {
                return Err(self
                    .proc
                    .start_error(format!("not ready after {timeout:?}: {last_err}")));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Clean shutdown (SIGTERM), waits for the exit; SIGKILL after 30 s.
    pub async fn stop(&self) -> Result<()> {
        self.proc.stop(MYSQLD_STOP_GRACE).await.map(drop)
    }

    /// Starts again on the same datadir and port (stopping cleanly first if running).
    pub async fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.start().await
    }

    crate::process::signal_controls!();

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `ip:port` (loopback unless on a namespace host).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }

    /// The address clients connect to.
    pub fn ip(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `root@localhost` (no password) over the unix socket: works before any user exists.
    pub async fn root_conn(&self) -> Result<Conn> {
        let opts = OptsBuilder::default()
            .socket(Some(self.socket.display().to_string()))
            .user(Some("root"))
            .prefer_socket(true);
        Conn::new(opts).await.map_err(HarnessError::mysql(format!(
            "{}: connect as root via socket",
            self.name
        )))
    }

    /// A TCP connection to [`Mysqld::addr`] as `user`.
    pub async fn conn(&self, user: &str, password: &str, db: Option<&str>) -> Result<Conn> {
        let opts = OptsBuilder::default()
            .ip_or_hostname(self.addr.to_string())
            .tcp_port(self.port)
            .user(Some(user))
            .pass(Some(password))
            .db_name(db)
            .prefer_socket(false);
        Conn::new(opts).await.map_err(HarnessError::mysql(format!(
            "{}: connect as {user} to {}",
            self.name,
            self.addr()
        )))
    }

    /// Leave the process running when this handle is dropped.
    pub(crate) fn detach(&self) {
        self.proc.detach();
    }
}

/// Where a mysqld keeps its files under its dir: one definition for a first start and for a
/// handle made from a recorded command line.
struct Paths {
    datadir: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn of(dir: &Path) -> Paths {
        Paths {
            datadir: dir.join("data"),
            socket: dir.join("mysqld.sock"),
            pid_file: dir.join("mysqld.pid"),
            log: dir.join("mysqld.log"),
        }
    }
}

pub(crate) fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .map_err(HarnessError::io("current_dir"))?
            .join(p))
    }
}
