//! [`Etcd`]: a single-member etcd on loopback ports.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{HarnessError, Result};
use crate::mysqld::absolute;
use crate::process::Proc;
use crate::util::{find_system_program, free_port};

pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(15);
pub const ETCD_STOP_GRACE: Duration = Duration::from_secs(10);

/// One etcd member. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct Etcd {
    dir: PathBuf,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Proc,
}

impl Etcd {
    /// Starts etcd in `dir` (created; data in `dir/data`, log `dir/etcd.log`) on free ports and
    /// waits until `/health` answers.
    pub async fn launch(dir: &Path, new_session: bool) -> Result<Etcd> {
        let etcd = find_system_program("etcd", "MYHA_ETCD")?;
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        let data_dir = dir.join("data");
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let name = "myha";
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<OsString> = [
            format!("--name={name}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={name}={peer}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=myha-harness".into(),
            // Keep the harness quiet and small.
            // A single member: elect itself quickly after a restart (default 1 s).
            "--heartbeat-interval=50".into(),
            "--election-timeout=250".into(),
            "--log-level=warn".into(),
            "--logger=zap".into(),
            "--quota-backend-bytes=268435456".into(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let log = dir.join("etcd.log");
        let proc = Proc::new(format!("etcd {client}"), etcd, args, log, new_session);
        let e = Etcd {
            dir,
            data_dir,
            client_port,
            peer_port,
            proc,
        };
        e.start().await?;
        Ok(e)
    }

    /// Starts it, also again after a kill/stop (an error if running).
    pub async fn start(&self) -> Result<()> {
        self.proc.spawn()?;
        self.wait_ready(ETCD_START_TIMEOUT).await
    }

    /// Waits until `GET /health` says `"health":"true"`; fails early if the process exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut last;
        loop {
            self.proc.check_alive()?;
            match health(self.client_port).await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "unhealthy".into(),
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > timeout {
                return Err(self
                    .proc
                    .start_error(format!("not healthy after {timeout:?}: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log()
    }

    crate::process::signal_controls!();

    /// SIGTERM, wait for the exit (SIGKILL after 10 s).
    pub async fn stop(&self) -> Result<()> {
        self.proc.stop(ETCD_STOP_GRACE).await.map(drop)
    }

    /// Starts again with the same ports and data dir (stopping first if running).
    pub async fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop().await?;
        }
        self.start().await
    }

    pub(crate) fn detach(&self) {
        self.proc.detach();
    }
}

/// One `GET /health` over a plain TCP connection.
async fn health(port: u16) -> std::io::Result<bool> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        Ok(text.starts_with("HTTP/1.") && text.contains("\"health\":\"true\""))
    };
    match tokio::time::timeout(Duration::from_secs(1), fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "health timed out",
        )),
    }
}
