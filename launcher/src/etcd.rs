//! [`Etcd`]: one etcd member, alone on loopback ports ([`Etcd::launch`]) or one of a cluster of
//! members, each on a host of its own ([`Etcd::launch_members`]).

use std::ffi::OsString;
use std::net::Ipv4Addr;
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

/// Where one member of [`Etcd::launch_members`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    /// The member name (`--name`), also its directory under the cluster's.
    pub name: String,
    /// The address it listens on (client and peer ports).
    pub addr: Ipv4Addr,
    /// The network namespace it runs in (`None`: where the harness runs).
    pub netns: Option<String>,
}

/// One etcd member. Killed (SIGKILL) on drop unless detached.
#[derive(Debug)]
pub struct Etcd {
    name: String,
    dir: PathBuf,
    data_dir: PathBuf,
    addr: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    proc: Proc,
}

impl Etcd {
    /// Starts a single-member etcd in `dir` (created; data in `dir/data`, log `dir/etcd.log`) on
    /// free loopback ports and waits until `/health` answers.
    pub async fn launch(dir: &Path, new_session: bool) -> Result<Etcd> {
        let me = EtcdMember {
            name: "myha".into(),
            addr: Ipv4Addr::LOCALHOST,
            netns: None,
        };
        let mut members = Etcd::launch_members(dir, &[me], new_session).await?;
        members
            .pop()
            .ok_or_else(|| HarnessError::Invalid("no etcd member started".into()))
    }

    /// Starts one etcd cluster of `members` (one member: in `dir` itself; more: each in
    /// `dir/<name>`), all at once (a member is healthy only with a quorum), and waits until each
    /// answers `/health`.
    pub async fn launch_members(
        dir: &Path,
        members: &[EtcdMember],
        new_session: bool,
    ) -> Result<Vec<Etcd>> {
        let etcd = find_system_program("etcd", "MYHA_ETCD")?;
        let dir = absolute(dir)?;
        let ports = members
            .iter()
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<Vec<(u16, u16)>>>()?;
        let initial: Vec<String> = members
            .iter()
            .zip(&ports)
            .map(|(m, (_, peer))| format!("{}=http://{}:{peer}", m.name, m.addr))
            .collect();
        let initial = initial.join(",");
        let single = members.len() == 1;
        let mut out = Vec::new();
        for (m, &(client_port, peer_port)) in members.iter().zip(&ports) {
            let mdir = if single {
                dir.clone()
            } else {
                dir.join(&m.name)
            };
            std::fs::create_dir_all(&mdir)
                .map_err(HarnessError::io(format!("create {}", mdir.display())))?;
            let data_dir = mdir.join("data");
            let client = format!("http://{}:{client_port}", m.addr);
            let peer = format!("http://{}:{peer_port}", m.addr);
            let args: Vec<OsString> = [
                format!("--name={}", m.name),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=myha-harness".into(),
                // Elect a leader quickly after a restart or the leader's loss (default 1 s).
                "--heartbeat-interval=50".into(),
                "--election-timeout=250".into(),
                // Keep the harness quiet and small.
                "--log-level=warn".into(),
                "--logger=zap".into(),
                "--quota-backend-bytes=268435456".into(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect();
            let log = mdir.join("etcd.log");
            let proc = Proc::new(
                format!("etcd {client}"),
                etcd.clone(),
                args,
                log,
                new_session,
            )
            .in_netns(m.netns.as_deref());
            out.push(Etcd {
                name: m.name.clone(),
                dir: mdir,
                data_dir,
                addr: m.addr,
                client_port,
                peer_port,
                proc,
            });
        }
        for e in &out {
            e.proc.spawn()?;
        }
        let ready = futures::future::join_all(out.iter().map(|e| e.wait_ready(ETCD_START_TIMEOUT)));
        ready.await.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(out)
    }

    /// The member name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.addr
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
            match health(self.addr, self.client_port).await {
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

    /// `http://ip:port` (loopback unless on a namespace host).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.addr, self.client_port)
    }

    /// Whether this member is its cluster's raft leader now (`/v3/maintenance/status`: its
    /// member id equals the leader's).
    pub async fn is_leader(&self) -> Result<bool> {
        let body = "{}";
        let req = format!(
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let text = http_text(self.addr, self.client_port, req)
            .await
            .map_err(HarnessError::io(format!(
                "{}: maintenance status",
                self.name
            )))?;
        let json = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            HarnessError::Invalid(format!("{}: maintenance status {json:?}: {e}", self.name))
        })?;
        let me = v["header"]["member_id"].as_str();
        Ok(me.is_some() && me == v["leader"].as_str())
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

/// One HTTP/1.0 request to `addr:port` over a plain TCP connection: the response's text.
async fn http_text(addr: Ipv4Addr, port: u16, request: String) -> std::io::Result<String> {
    let fut = async {
        let mut s = TcpStream::connect((addr, port)).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(1), fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 1 s",
        )),
    }
}

/// One `GET /health` over a plain TCP connection.
async fn health(addr: Ipv4Addr, port: u16) -> std::io::Result<bool> {
    let text = http_text(
        addr,
        port,
        format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await?;
    Ok(text.starts_with("HTTP/1.") && text.contains("\"health\":\"true\""))
}
