//! [`Etcd`]: one etcd member, alone on loopback ports ([`Etcd::launch`]) or one of a cluster of
//! members, each on a host of its own ([`Etcd::launch_members`]).
//!
//! Every launched etcd is secured as a production one should be ([`EtcdSecurity`]): TLS on
//! the client URLs with client certificates required (`--client-cert-auth`), certificates of
//! the cluster's CA, and authentication on, with a `root` user and a `myha` user whose role
//! may read and write the cluster's prefix only. Peer URLs stay plaintext: they never leave
//! the harness's hosts, and the multi-member tests cut and slow them.
//! Health and leadership are read from a plaintext metrics listener (`--listen-metrics-urls`),
//! which needs neither certificate nor user.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::{EtcdSection, Secret};
use pki::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use topo::etcd_client::{self, Permission};
use topo::{EtcdAccess, EtcdUser, Topo};

use crate::certs::{stem_files, Certs, CTL_IDENTITY};
use crate::cluster::write_secret;
use crate::error::{HarnessError, Result};
use crate::mysqld::absolute;
use crate::process::Proc;
use crate::util::{find_system_program, free_port, random_password};

pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(15);
pub const ETCD_STOP_GRACE: Duration = Duration::from_secs(10);
/// The etcd user the daemons (and the harness acting for them) authenticate as.
pub const ETCD_USER: &str = "myha";
/// Its role: read and write on the cluster's prefix, nothing else.
pub const ETCD_ROLE: &str = "myha";
/// bcrypt's cost for etcd's password hashes. etcd's default (10) costs ~100 ms of etcd's CPU
/// per authentication here (20 logins: 2.3-3.4 s at cost 10, 0.4 s at 4), paid by every
/// client on every member it uses, and tests start many clients on two shared cores. 4 is
/// bcrypt's minimum: test passwords are random and live as long as the test.
const HARNESS_BCRYPT_COST: u32 = 4;

/// How [`Etcd::launch_members_with`] secures a cluster: server certificates of `certs`' CA,
/// and the `myha` user's role on `prefix`.
#[derive(Clone, Copy, Debug)]
pub struct EtcdSecure<'a> {
    pub certs: &'a Certs,
    pub prefix: &'a str,
}

/// What a client of a launched etcd needs, shared by its members: the cluster's CA (which
/// also issues client certificates), the `myha` user's password (in a mode-0600 file, as a
/// daemon gets it) and the `root` user's.
#[derive(Clone)]
pub struct EtcdSecurity {
    inner: Arc<SecurityInner>,
}

struct SecurityInner {
    certs: Certs,
    prefix: String,
    password: Secret,
    password_file: PathBuf,
    root_password: Secret,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("certs", &self.inner.certs)
            .field("prefix", &self.inner.prefix)
            .field("user", &ETCD_USER)
            .field("password_file", &self.inner.password_file)
            .finish_non_exhaustive()
    }
}

impl EtcdSecurity {
    /// New passwords, the `myha` user's written to `dir/etcd-password` (mode 0600).
    fn create(dir: &Path, certs: &Certs, prefix: &str) -> Result<EtcdSecurity> {
        let password = random_password();
        let password_file = write_secret(dir, "etcd-password", &password)?;
        Ok(EtcdSecurity {
            inner: Arc::new(SecurityInner {
                certs: certs.clone(),
                prefix: prefix.to_string(),
                password: password.into(),
                password_file,
                root_password: random_password().into(),
            }),
        })
    }

    /// The CA and its certificates.
    pub fn certs(&self) -> &Certs {
        &self.inner.certs
    }

    /// The prefix the `myha` user may read and write.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The `myha` user's name.
    pub fn user(&self) -> &str {
        ETCD_USER
    }

    /// The file holding the `myha` user's password (what daemons get as `password_file`).
    pub fn password_file(&self) -> &Path {
        &self.inner.password_file
    }

    /// The `myha` user's password (for a test that hands it over some other way).
    pub fn password(&self) -> &Secret {
        &self.inner.password
    }

    /// The operator's certificate files (`myhactl`'s: [`Certs::operator`], issued when the
    /// etcd was launched: its users were created with it).
    pub fn operator_files(&self) -> TlsFiles {
        stem_files(&self.inner.certs.ca_file(), CTL_IDENTITY)
    }

    /// How test code (acting as the operator, with the `myha` user) connects.
    pub fn access(&self) -> Result<EtcdAccess> {
        Ok(EtcdAccess {
            tls: Some(self.inner.certs.operator()?),
            user: Some(EtcdUser::new(ETCD_USER, self.inner.password.expose())),
        })
    }

    /// The `root` user, for changing users and roles.
    fn root_access(&self) -> Result<EtcdAccess> {
        Ok(EtcdAccess {
            tls: Some(self.inner.certs.operator()?),
            user: Some(EtcdUser::new("root", self.inner.root_password.expose())),
        })
    }

    /// A client certificate for a daemon of identity `identity` (its common name), written
    /// as `etcd-client-<identity>.pem` beside the CA.
    pub fn client_files(&self, identity: &str) -> Result<TlsFiles> {
        self.inner
            .certs
            .client(&format!("etcd-client-{identity}"), identity)
    }

    /// The `[etcd]` section of a daemon of identity `identity`: `endpoints`, the prefix,
    /// its own client certificate, the `myha` user and its password file.
    pub fn section(&self, endpoints: Vec<String>, identity: &str) -> Result<EtcdSection> {
        Ok(EtcdSection {
            username: Some(ETCD_USER.into()),
            password_file: Some(self.inner.password_file.clone()),
            tls: Some(self.client_files(identity)?),
            ..EtcdSection::new(endpoints, &self.inner.prefix)
        })
    }

    /// The environment that points `myhactl` at this etcd's certificates and user (with
    /// `MYHA_ETCD` for the endpoints, set by the caller).
    pub fn ctl_env(&self) -> Result<Vec<(&'static str, String)>> {
        let files = self.operator_files();
        let path = |p: &Path| p.display().to_string();
        Ok(vec![
            ("MYHA_CA", path(&files.ca_file)),
            ("MYHA_CERT", path(&files.cert_file)),
            ("MYHA_KEY", path(&files.key_file)),
            ("MYHA_ETCD_USER", ETCD_USER.to_string()),
            ("MYHA_ETCD_PASSWORD_FILE", path(&self.inner.password_file)),
        ])
    }

    /// Creates the users and roles and turns authentication on (a fresh cluster's first
    /// members, once they answer).
    async fn enable_auth(&self, endpoints: &[String]) -> Result<()> {
        let tls = self.inner.certs.operator()?;
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_tls(tls.client_tls());
        let step = |name: &'static str| {
            move |e: etcd_client::Error| {
                HarnessError::Invalid(format!("etcd auth setup: {name}: {e}"))
            }
        };
        let client = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .map_err(step("connect"))?;
        let mut auth = client.auth_client();
        auth.user_add("root", self.inner.root_password.expose(), None)
            .await
            .map_err(step("add user root"))?;
        auth.role_add("root").await.map_err(step("add role root"))?;
        auth.user_grant_role("root", "root")
            .await
            .map_err(step("grant root to root"))?;
        auth.role_add(ETCD_ROLE)
            .await
            .map_err(step("add role myha"))?;
        // Every key of the layout is under `{prefix}/` (not `{prefix}-other/...`).
        let root = topo::Keys::new(&self.inner.prefix).root();
        let range = Permission::read_write(root).with_prefix();
        auth.role_grant_permission(ETCD_ROLE, range)
            .await
            .map_err(step("grant the prefix to role myha"))?;
        auth.user_add(ETCD_USER, self.inner.password.expose(), None)
            .await
            .map_err(step("add user myha"))?;
        auth.user_grant_role(ETCD_USER, ETCD_ROLE)
            .await
            .map_err(step("grant role myha to user myha"))?;
        auth.auth_enable().await.map_err(step("enable auth"))?;
        Ok(())
    }

    /// Connects as `root` (users and roles can be changed through its client; negative
    /// tests do).
    pub async fn root_topo(&self, endpoints: &[String]) -> Result<Topo> {
        Topo::connect_with(
            endpoints,
            &self.inner.prefix,
            Duration::from_secs(2),
            &self.root_access()?,
        )
        .await
        .map_err(HarnessError::topo(format!(
            "connect to {endpoints:?} as root"
        )))
    }
}

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
    /// Plaintext `/health` and `/metrics`.
    metrics_port: u16,
    security: Option<EtcdSecurity>,
    proc: Proc,
}

impl Etcd {
    /// Starts a single-member etcd in `dir` (created; data in `dir/data`, log `dir/etcd.log`,
    /// a CA of its own in `dir/tls`) on free loopback ports, secured for the default prefix
    /// (see [`EtcdSecurity`]), and waits until `/health` answers.
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

    /// As [`Etcd::launch_members_with`], secured with a CA of its own in `dir/tls` for the
    /// default prefix.
    pub async fn launch_members(
        dir: &Path,
        members: &[EtcdMember],
        new_session: bool,
    ) -> Result<Vec<Etcd>> {
        let certs = Certs::create(&absolute(dir)?.join("tls"))?;
        let secure = EtcdSecure {
            certs: &certs,
            prefix: topo::DEFAULT_PREFIX,
        };
        Etcd::launch_members_with(dir, members, new_session, Some(secure)).await
    }

    /// Starts one etcd cluster of `members` (one member: in `dir` itself; more: each in
    /// `dir/<name>`), all at once (a member is healthy only with a quorum), and waits until each
    /// answers `/health`; then, when `secure`, creates the users and turns authentication on
    /// (see [`EtcdSecurity`]). Without `secure`: plaintext, no users (to measure what security
    /// costs).
    pub async fn launch_members_with(
        dir: &Path,
        members: &[EtcdMember],
        new_session: bool,
        secure: Option<EtcdSecure<'_>>,
    ) -> Result<Vec<Etcd>> {
        let etcd = find_system_program("etcd", "MYHA_ETCD")?;
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir)
            .map_err(HarnessError::io(format!("create {}", dir.display())))?;
        let security = secure
            .as_ref()
            .map(|s| EtcdSecurity::create(&dir, s.certs, s.prefix))
            .transpose()?;
        let ports = members
            .iter()
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<Result<Vec<(u16, u16, u16)>>>()?;
        let initial: Vec<String> = members
            .iter()
            .zip(&ports)
            .map(|(m, (_, peer, _))| format!("{}=http://{}:{peer}", m.name, m.addr))
            .collect();
        let initial = initial.join(",");
        let single = members.len() == 1;
        let mut out = Vec::new();
        for (m, &(client_port, peer_port, metrics_port)) in members.iter().zip(&ports) {
            let mdir = if single {
                dir.clone()
            } else {
                dir.join(&m.name)
            };
            std::fs::create_dir_all(&mdir)
                .map_err(HarnessError::io(format!("create {}", mdir.display())))?;
            let data_dir = mdir.join("data");
            let scheme = if security.is_some() { "https" } else { "http" };
            let client = format!("{scheme}://{}:{client_port}", m.addr);
            let peer = format!("http://{}:{peer_port}", m.addr);
            let metrics = format!("http://{}:{metrics_port}", m.addr);
            let mut tls_args = Vec::new();
            if let Some(secure) = &secure {
                let name = format!("etcd-{}", m.name);
                let tls = secure.certs.server(&name, &name, &[m.addr.to_string()])?;
                tls_args = vec![
                    format!("--cert-file={}", tls.cert_file.display()),
                    format!("--key-file={}", tls.key_file.display()),
                    format!("--trusted-ca-file={}", tls.ca_file.display()),
                    "--client-cert-auth".into(),
                    format!("--bcrypt-cost={HARNESS_BCRYPT_COST}"),
                ];
            }
            let args: Vec<OsString> = [
                format!("--name={}", m.name),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-metrics-urls={metrics}"),
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
            .chain(tls_args)
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
                metrics_port,
                security: security.clone(),
                proc,
            });
        }
        for e in &out {
            e.proc.spawn()?;
        }
        let ready = futures::future::join_all(out.iter().map(|e| e.wait_ready(ETCD_START_TIMEOUT)));
        ready.await.into_iter().collect::<Result<Vec<()>>>()?;
        if let Some(security) = &security {
            let endpoints: Vec<String> = out.iter().map(Etcd::endpoint).collect();
            security.enable_auth(&endpoints).await?;
        }
        Ok(out)
    }

    /// Its certificates and users (`None`: a plaintext etcd without users).
    pub fn security(&self) -> Option<&EtcdSecurity> {
        self.security.as_ref()
    }

    /// How test code connects to it (the operator's certificate, the `myha` user).
    pub fn access(&self) -> Result<EtcdAccess> {
        match &self.security {
            Some(s) => s.access(),
            None => Ok(EtcdAccess::plain()),
        }
    }

    /// The `[etcd]` section of a daemon of identity `identity` (the common name of its
    /// client certificate) reaching `endpoints` (this member's cluster) under `prefix`.
    pub fn daemon_section(
        &self,
        endpoints: Vec<String>,
        prefix: &str,
        identity: &str,
    ) -> Result<EtcdSection> {
        let mut section = match &self.security {
            Some(s) => s.section(endpoints, identity)?,
            None => EtcdSection::new(endpoints, prefix),
        };
        section.prefix = prefix.to_string();
        Ok(section)
    }

    /// [`Etcd::daemon_section`] as config text (`[etcd]` and `[etcd.tls]`), for a test that
    /// writes a daemon's config by hand.
    pub fn daemon_section_toml(
        &self,
        endpoints: Vec<String>,
        prefix: &str,
        identity: &str,
    ) -> Result<String> {
        Ok(self.daemon_section(endpoints, prefix, identity)?.to_toml())
    }

    /// The environment that points `myhactl` at this etcd: `MYHA_ETCD` (this member) and,
    /// when secured, the operator's certificate and the `myha` user.
    pub fn ctl_env(&self) -> Result<Vec<(&'static str, String)>> {
        let mut env = vec![("MYHA_ETCD", self.endpoint())];
        if let Some(s) = &self.security {
            env.extend(s.ctl_env()?);
        }
        Ok(env)
    }

    /// Connects to this member (only) under `prefix`, as [`Etcd::access`] says.
    pub async fn topo(&self, prefix: &str) -> Result<Topo> {
        Topo::connect_with(
            [self.endpoint()],
            prefix,
            Duration::from_secs(2),
            &self.access()?,
        )
        .await
        .map_err(HarnessError::topo(format!(
            "connect to {}",
            self.endpoint()
        )))
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
            match health(self.addr, self.metrics_port).await {
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

    /// `https://ip:port` (`http://` when not secured; loopback unless on a namespace host).
    pub fn endpoint(&self) -> String {
        let scheme = if self.security.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}", self.addr, self.client_port)
    }

    /// Whether this member is its cluster's raft leader now (its metric
    /// `etcd_server_is_leader`, on the plaintext metrics listener).
    pub async fn is_leader(&self) -> Result<bool> {
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let text = http_text(self.addr, self.metrics_port, req)
            .await
            .map_err(HarnessError::io(format!("{}: metrics", self.name)))?;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("etcd_server_is_leader "))
            .ok_or_else(|| {
                HarnessError::Invalid(format!(
                    "{}: no etcd_server_is_leader in its metrics",
                    self.name
                ))
            })?;
        Ok(value.trim() == "1")
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The plaintext `/health` and `/metrics` listener's port.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
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
