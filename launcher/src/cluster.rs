//! [`Cluster`]: etcd + N MariaDB (GTID replication from tablet 0, optionally semi-sync) +
//! optionally one `myha-agent` per mysqld, with the topology bootstrapped in etcd.
//!
//! Every process runs on loopback ([`Hosts::Loopback`], the default), or on hosts of its own
//! ([`Hosts::Netns`]): a [`Network`] with one host per etcd member (`etcd`, or `etcd-1`..), per
//! tablet (its alias; mysqld and its agent), per orchestrator (`orchestrator`,
//! `orchestrator-2`, `orchestrator-3`) and per gateway (`gateway`, `gateway-2`), plus the
//! machine's own namespace as host `client`: the test process, its writers and its etcd client
//! run there and reach every process by its host's address. A process's host follows from the
//! address in its config (see [`Cluster::start_orchestrator_with`]); the faults are the
//! network's ([`Cluster::network`]).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use myha_agent::config::{
    AgentConfig, AgentSection, EtcdSection, FlavorName, LogFormat, LogSection, MysqlSection,
    MysqlTls, TabletSection,
};
use myha_proto::agent::{Health, ThreadState};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use tempfile::TempDir;
use topo::{CellRecord, Durability, KeyspaceRecord, LockRequest, PromotionRule, ShardLock, Topo};

use crate::agent::AgentProc;
use crate::certs::{Certs, GATEWAY_IDENTITY, ORCHESTRATOR_IDENTITY};
use crate::error::{HarnessError, Result};
use crate::etcd::{Etcd, EtcdMember, EtcdSecure, EtcdSecurity};
use crate::gateway::{gateway_config, GatewayConfig, GatewayProc};
use crate::mysqld::{absolute, Mysqld, MysqldOptions};
use crate::netns::Network;
use crate::orchestrator::{orchestrator_config, OrchestratorProc};
use crate::sandbox::{SandboxGateway, SandboxState, SandboxTablet, STATE_FILE};
use crate::util::{free_port, poll_until, random_password};

/// Semi-sync ack timeout set on the primary: 30 days in ms (lossless: no async fallback).
pub const SEMI_SYNC_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;

/// A hook to adjust each agent's config before it is written.
pub type AgentConfigHook = Arc<dyn Fn(&mut AgentConfig) + Send + Sync>;

/// A hook to adjust each orchestrator's config before it is written.
pub type OrchestratorConfigHook =
    Arc<dyn Fn(&mut myha_orchestrator::config::OrchestratorConfig) + Send + Sync>;

/// A hook to adjust each gateway's config before it is written.
pub type GatewayConfigHook = Arc<dyn Fn(&mut GatewayConfig) + Send + Sync>;

/// Where a cluster's processes run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hosts {
    /// Every process on 127.0.0.1 (ports differ).
    #[default]
    Loopback,
    /// Each on a host of its own in a network namespace (see the module doc); needs root.
    Netns,
}

/// The host names of a [`Hosts::Netns`] cluster besides its tablets'.
pub const CLIENT_HOST: &str = "client";
const ORCHESTRATOR_HOSTS: [&str; 3] = ["orchestrator", "orchestrator-2", "orchestrator-3"];
const GATEWAY_HOSTS: [&str; 2] = ["gateway", "gateway-2"];

/// The address and namespace of host `name` of `network` (loopback and none without one).
fn place_on(network: Option<&Network>, name: &str) -> Result<(Ipv4Addr, Option<String>)> {
    match network {
        None => Ok((Ipv4Addr::LOCALHOST, None)),
        Some(n) => {
            let h = n.host(name)?;
            Ok((h.addr, h.ns.clone()))
        }
    }
}

/// The name of etcd member `i` of `n` (its host's name and its directory's).
fn etcd_member_name(i: usize, n: usize) -> String {
    if n == 1 {
        "etcd".into()
    } else {
        format!("etcd-{}", i + 1)
    }
}

/// What to start.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Loopback (default) or a host per process.
    pub hosts: Hosts,
    /// etcd members (1, or 3 for quorum faults; more than 1 needs [`Hosts::Netns`]).
    pub etcd_members: usize,
    /// [`Hosts::Netns`] only: make the network under this name, to outlive this process when
    /// the cluster is detached (the sandbox; see [`Network::create_kept`]).
    pub netns_name: Option<String>,
    /// Number of mysqld (tablet 0 is the first primary).
    pub tablets: usize,
    pub durability: Durability,
    pub keyspace: String,
    pub shard: String,
    pub cell: String,
    /// Tablet i gets uid `first_uid + i` and server_id = uid.
    pub first_uid: u32,
    /// `None`: a temp dir removed on drop. `Some(dir)`: created if missing, kept on drop.
    pub base_dir: Option<PathBuf>,
    /// Start one `myha-agent` per mysqld (needs the binary, see [`crate::find_myha_bin`]).
    pub start_agents: bool,
    /// The agents' etcd lease TTL.
    pub lease_ttl: Duration,
    /// The agents' poll interval.
    pub poll_interval: Duration,
    /// etcd key prefix.
    pub prefix: String,
    /// Start every process in its own session (survives the parent: the sandbox).
    pub new_session: bool,
    /// Extra mysqld arguments for every instance.
    pub mysqld_args: Vec<String>,
    /// `MASTER_HEARTBEAT_PERIOD` of the replicas (mysqld runs with slave_net_timeout=4).
    pub heartbeat_period: Duration,
    /// The agents' log level (also settable through the hook).
    pub agent_log_level: String,
    /// Adjusts each agent's config.
    pub agent_config: Option<AgentConfigHook>,
    /// Start one `myha-orchestrator` after the agents ([`Cluster::orchestrator`]); it is
    /// stopped first and detached with the rest. More: [`Cluster::start_orchestrator`].
    pub start_orchestrator: bool,
    /// The orchestrators' log level (also settable through the hook).
    pub orchestrator_log_level: String,
    /// Adjusts each orchestrator's config.
    pub orchestrator_config: Option<OrchestratorConfigHook>,
    /// Start one `myha-gateway` (RW and RO ports for the shard) after the agents and the
    /// orchestrator ([`Cluster::gateway`]); stopped first and detached with the rest. More:
    /// [`Cluster::start_gateway`].
    pub start_gateway: bool,
    /// The gateways' log level (also settable through the hook).
    pub gateway_log_level: String,
    /// Adjusts each gateway's config.
    pub gateway_config: Option<GatewayConfigHook>,
    /// Bound for replication and agent readiness.
    pub ready_timeout: Duration,
    /// Name tablet 0 primary at term 1 in the shard record and make it writable (the default).
    /// `false`: a new shard with no primary (scenario R8): the users and the app database are
    /// created on tablet 0 and replicated to every tablet, then replication is stopped and
    /// reset everywhere (`RESET SLAVE ALL`), every tablet stays read-only with semi-sync's
    /// primary side off, and the shard record names no primary (term 0).
    pub bootstrap_primary: bool,
    /// TLS and authentication on every control-plane link (the default, and what every test
    /// runs). [`Security::Plaintext`] exists to measure what TLS costs, beside it in one run.
    pub security: Security,
}

/// See [`ClusterOptions::security`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Security {
    #[default]
    Tls,
    Plaintext,
}

impl Security {
    pub fn is_tls(self) -> bool {
        self == Security::Tls
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            hosts: Hosts::Loopback,
            etcd_members: 1,
            netns_name: None,
            tablets: 3,
            durability: Durability::SemiSync,
            keyspace: "commerce".into(),
            shard: "0".into(),
            cell: "zone1".into(),
            first_uid: 101,
            base_dir: None,
            start_agents: true,
            lease_ttl: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            prefix: "/myha".into(),
            new_session: false,
            mysqld_args: Vec::new(),
            heartbeat_period: Duration::from_secs(1),
            agent_log_level: "info".into(),
            agent_config: None,
            start_orchestrator: false,
            orchestrator_log_level: "info".into(),
            orchestrator_config: None,
            start_gateway: false,
            gateway_log_level: "info".into(),
            gateway_config: None,
            ready_timeout: Duration::from_secs(30),
            bootstrap_primary: true,
            security: Security::Tls,
        }
    }
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("hosts", &self.hosts)
            .field("etcd_members", &self.etcd_members)
            .field("tablets", &self.tablets)
            .field("durability", &self.durability)
            .field("keyspace", &self.keyspace)
            .field("shard", &self.shard)
            .field("cell", &self.cell)
            .field("first_uid", &self.first_uid)
            .field("base_dir", &self.base_dir)
            .field("start_agents", &self.start_agents)
            .field("bootstrap_primary", &self.bootstrap_primary)
            .field("start_orchestrator", &self.start_orchestrator)
            .field("start_gateway", &self.start_gateway)
            .field("lease_ttl", &self.lease_ttl)
            .field("prefix", &self.prefix)
            .field("new_session", &self.new_session)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

/// MySQL users created on the first primary (random passwords).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub agent_user: String,
    pub agent_password: String,
    pub repl_user: String,
    pub repl_password: String,
    pub app_user: String,
    pub app_password: String,
    /// The application database (`app`).
    pub database: String,
}

impl Credentials {
    pub fn generate() -> Credentials {
        Credentials {
            agent_user: "myha_agent".into(),
            agent_password: random_password(),
            repl_user: "myha_repl".into(),
            repl_password: random_password(),
            app_user: "app".into(),
            app_password: random_password(),
            database: "app".into(),
        }
    }
}

/// One mysqld and (optionally) its agent.
#[derive(Debug)]
pub struct Tablet {
    index: usize,
    alias: String,
    cell: String,
    uid: u32,
    dir: PathBuf,
    mysqld: Mysqld,
    agent: Option<AgentProc>,
    creds: Arc<Credentials>,
}

impl Tablet {
    pub fn index(&self) -> usize {
        self.index
    }
    /// `{cell}-{uid}`.
    pub fn alias(&self) -> &str {
        &self.alias
    }
    pub fn cell(&self) -> &str {
        &self.cell
    }
    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// `{cluster dir}/{alias}`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn mysqld(&self) -> &Mysqld {
        &self.mysqld
    }
    /// The agent, when agents were started.
    pub fn agent(&self) -> Option<&AgentProc> {
        self.agent.as_ref()
    }
    /// The agent, or an error saying none was started.
    pub fn agent_proc(&self) -> Result<&AgentProc> {
        self.agent.as_ref().ok_or_else(|| {
            HarnessError::Invalid(format!(
                "{}: no agent started (start_agents: false)",
                self.alias
            ))
        })
    }
    /// `root@localhost` over the socket.
    pub async fn root_conn(&self) -> Result<Conn> {
        self.mysqld.root_conn().await
    }
    /// `myha_agent` over TCP.
    pub async fn admin_conn(&self) -> Result<Conn> {
        self.mysqld
            .conn(&self.creds.agent_user, &self.creds.agent_password, None)
            .await
    }
    /// `app` over TCP, default database `app`.
    pub async fn app_conn(&self) -> Result<Conn> {
        self.mysqld
            .conn(
                &self.creds.app_user,
                &self.creds.app_password,
                Some(&self.creds.database),
            )
            .await
    }
    /// `FullStatus` from the agent.
    pub async fn full_status(&self) -> Result<Health> {
        self.agent_proc()?.full_status().await
    }
}

/// A running cluster. Dropping it SIGKILLs every process (agents, mysqld, etcd) and removes the
/// temp dir, also while unwinding from a panic; see [`Cluster::keep_dir`] and
/// [`Cluster::detach`].
pub struct Cluster {
    opts: ClusterOptions,
    dir: PathBuf,
    creds: Arc<Credentials>,
    /// The cluster's CA and certificates (`<dir>/tls`).
    certs: Certs,
    topo: Topo,
    tablets: Vec<Tablet>,
    /// At least one member.
    etcd: Vec<Etcd>,
    /// The one started by [`ClusterOptions::start_orchestrator`].
    orchestrator: Option<OrchestratorProc>,
    /// The one started by [`ClusterOptions::start_gateway`].
    gateway: Option<GatewayProc>,
    keep_dir: AtomicBool,
    detached: bool,
    /// The hosts ([`Hosts::Netns`]); dropped after the processes are killed.
    network: Option<Network>,
    // Last: removed after the processes are gone.
    temp: Option<TempDir>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("etcd", &self.etcd_endpoints())
            .field(
                "tablets",
                &self.tablets.iter().map(|t| t.alias()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn sql_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Runs statements in order, naming the one that failed.
async fn exec_all(conn: &mut Conn, who: &str, stmts: &[String]) -> Result<()> {
    for s in stmts {
        conn.query_drop(s.as_str())
            .await
            .map_err(HarnessError::mysql(format!("{who}: `{}`", redact(s))))?;
    }
    Ok(())
}

/// Writes `value` to `dir/name`, readable by this user only (0600); returns the path.
pub fn write_secret(dir: &Path, name: &str, value: &str) -> Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let io = |e: std::io::Error| HarnessError::Io {
        what: format!("write the secret {}", path.display()),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    f.write_all(value.as_bytes()).map_err(io)?;
    Ok(path)
}

/// Hides passwords in a statement put into an error.
fn redact(stmt: &str) -> String {
    flavor::redact_secrets(stmt)
}

/// `SHOW SLAVE STATUS` as column -> value (NULL as None); `None` when no source is configured.
pub async fn slave_status(conn: &mut Conn) -> Result<Option<HashMap<String, Option<String>>>> {
    let row: Option<Row> = conn
        .query_first("SHOW SLAVE STATUS")
        .await
        .map_err(HarnessError::mysql("SHOW SLAVE STATUS"))?;
    Ok(row.map(row_to_map))
}

/// A row as column -> value.
pub fn row_to_map(row: Row) -> HashMap<String, Option<String>> {
    let cols: Vec<String> = row
        .columns_ref()
        .iter()
        .map(|c| c.name_str().into_owned())
        .collect();
    let values = row.unwrap();
    cols.into_iter()
        .zip(values)
        .map(|(c, v)| {
            let v = match v {
                mysql_async::Value::NULL => None,
                mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                other => Some(other.as_sql(true).trim_matches('\'').to_string()),
            };
            (c, v)
        })
        .collect()
}

/// One `SHOW GLOBAL STATUS LIKE name` value.
pub async fn global_status(conn: &mut Conn, name: &str) -> Result<Option<String>> {
    let row: Option<(String, String)> = conn
        .query_first(format!("SHOW GLOBAL STATUS LIKE {}", sql_quote(name)))
        .await
        .map_err(HarnessError::mysql(format!(
            "SHOW GLOBAL STATUS LIKE '{name}'"
        )))?;
    Ok(row.map(|(_, v)| v))
}

/// One global variable (`SELECT @@global.name`), as text.
pub async fn global_var(conn: &mut Conn, name: &str) -> Result<Option<String>> {
    let v: Option<Option<String>> = conn
        .query_first(format!("SELECT @@global.{name}"))
        .await
        .map_err(HarnessError::mysql(format!("SELECT @@global.{name}")))?;
    Ok(v.flatten())
}

/// Both replication threads run and `pos` is applied (waits up to 0.2 s for it).
async fn replica_caught_up(c: &mut Conn, pos: &str) -> Result<bool> {
    let st = slave_status(c)
        .await?
        .ok_or_else(|| HarnessError::Invalid("no replication source configured".into()))?;
    if !thread_running(&st, "Slave_IO_Running") || !thread_running(&st, "Slave_SQL_Running") {
        let io = st
            .get("Last_IO_Error")
            .cloned()
            .flatten()
            .unwrap_or_default();
        let sql = st
            .get("Last_SQL_Error")
            .cloned()
            .flatten()
            .unwrap_or_default();
        return Err(HarnessError::Invalid(format!(
            "replication threads not running; io error: {io}; sql error: {sql}"
        )));
    }
    let r: Option<i64> = c
        .query_first(format!("SELECT MASTER_GTID_WAIT({}, 0.2)", sql_quote(pos)))
        .await
        .map_err(HarnessError::mysql("MASTER_GTID_WAIT"))?;
    Ok(r == Some(0))
}

fn thread_running(status: &HashMap<String, Option<String>>, col: &str) -> bool {
    status.get(col).cloned().flatten().as_deref() == Some("Yes")
}

impl Cluster {
    /// Starts everything and returns when replication (and the agents, if asked) are healthy;
    /// with agents and a primary, once the primary agent's heartbeat table (its only DDL) is on
    /// every replica.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        let started = Instant::now();
        if opts.tablets == 0 {
            return Err(HarnessError::Invalid(
                "a cluster needs at least one tablet".into(),
            ));
        }
        let (temp, dir) = match &opts.base_dir {
            Some(d) => {
                let d = absolute(d)?;
                std::fs::create_dir_all(&d)
                    .map_err(HarnessError::io(format!("create {}", d.display())))?;
                (None, d)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("myha-")
                    .tempdir()
                    .map_err(HarnessError::io("create temp dir"))?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let aliases: Vec<String> = (0..opts.tablets)
            .map(|i| topo::alias(&opts.cell, opts.first_uid + i as u32))
            .collect();
        for sub in std::iter::once("etcd").chain(aliases.iter().map(String::as_str)) {
            if dir.join(sub).exists() {
                return Err(HarnessError::Invalid(format!(
                    "{} already exists: use an empty base dir",
                    dir.join(sub).display()
                )));
            }
        }
        let creds = Arc::new(Credentials::generate());
        let certs = Certs::create(&dir.join("tls"))?;
        let semi = opts.durability == Durability::SemiSync;
        let n_etcd = opts.etcd_members;
        if n_etcd == 0 || (n_etcd > 1 && opts.hosts != Hosts::Netns) {
            return Err(HarnessError::Invalid(format!(
                "etcd_members: {n_etcd}; one, or more on hosts: netns (one host per member)"
            )));
        }
        let network = match opts.hosts {
            Hosts::Loopback => None,
            Hosts::Netns => {
                let mut names: Vec<String> =
                    (0..n_etcd).map(|i| etcd_member_name(i, n_etcd)).collect();
                names.extend(aliases.iter().cloned());
                names.extend(ORCHESTRATOR_HOSTS.iter().map(|s| s.to_string()));
                names.extend(GATEWAY_HOSTS.iter().map(|s| s.to_string()));
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                Some(match &opts.netns_name {
                    Some(kept) => Network::create_kept(kept, &names, CLIENT_HOST)?,
                    None => Network::create_with_machine(&names, CLIENT_HOST)?,
                })
            }
        };
        let place = |host: &str| place_on(network.as_ref(), host);

        // etcd and every mysqld in parallel.
        let members = (0..n_etcd)
            .map(|i| {
                let name = etcd_member_name(i, n_etcd);
                let (addr, netns) = place(&name)?;
                Ok(EtcdMember {
                    name: if n_etcd == 1 { "myha".into() } else { name },
                    addr,
                    netns,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let etcd_dir = dir.join("etcd");
        let secure = opts.security.is_tls().then_some(EtcdSecure {
            certs: &certs,
            prefix: &opts.prefix,
        });
        let etcd_fut = Etcd::launch_members_with(&etcd_dir, &members, opts.new_session, secure);
        let mysqld_opts = aliases
            .iter()
            .enumerate()
            .map(|(i, alias)| {
                let mut m = MysqldOptions::new(
                    format!("mysqld {alias}"),
                    dir.join(alias),
                    opts.first_uid + i as u32,
                );
                // Replica side only where a replica runs: the first primary acks nobody.
                m.semi_sync_replica = semi && i > 0;
                m.extra_args = opts.mysqld_args.clone();
                m.new_session = opts.new_session;
                (m.addr, m.netns) = place(alias)?;
                // Replication and the agents' TCP connections run over TLS and verify that
                // the certificate names the address they connect to.
                if opts.security.is_tls() {
                    let name = format!("mysqld-{alias}");
                    m.tls = Some(certs.server(&name, &name, &[m.addr.to_string()])?);
                }
                Ok(m)
            })
            .collect::<Result<Vec<_>>>()?;
        let mysqld_futs = mysqld_opts.into_iter().map(Mysqld::launch);
        let (etcd, mysqlds) = tokio::join!(etcd_fut, join_all(mysqld_futs));
        let etcd = etcd?;
        let mysqlds = mysqlds.into_iter().collect::<Result<Vec<_>>>()?;
        tracing::info!(elapsed = ?started.elapsed(), "etcd and mysqld up");

        let tablets: Vec<Tablet> = mysqlds
            .into_iter()
            .enumerate()
            .map(|(i, mysqld)| Tablet {
                index: i,
                alias: aliases[i].clone(),
                cell: opts.cell.clone(),
                uid: opts.first_uid + i as u32,
                dir: dir.join(&aliases[i]),
                mysqld,
                agent: None,
                creds: creds.clone(),
            })
            .collect();

        // MySQL users on the primary and the topology, in parallel.
        let (sql, topo) = tokio::join!(
            bootstrap_primary_sql(&tablets[0], &creds, opts.security.is_tls()),
            bootstrap_topology(&etcd, &opts, &aliases[0])
        );
        sql?;
        let topo = topo?;

        let mut cluster = Cluster {
            opts,
            dir,
            creds,
            certs,
            topo,
            tablets,
            etcd,
            orchestrator: None,
            gateway: None,
            keep_dir: AtomicBool::new(false),
            detached: false,
            network,
            temp,
        };
        cluster.bootstrap_replication().await?;
        tracing::info!(elapsed = ?started.elapsed(), "replication up");
        if cluster.opts.start_agents {
            cluster.start_agents().await?;
            tracing::info!(elapsed = ?started.elapsed(), "agents healthy");
            if cluster.opts.bootstrap_primary {
                cluster
                    .wait_heartbeat_replicated(cluster.opts.ready_timeout)
                    .await?;
                tracing::info!(elapsed = ?started.elapsed(), "heartbeat table replicated");
            }
        }
        if cluster.opts.start_orchestrator {
            cluster.orchestrator = Some(cluster.start_orchestrator().await?);
            tracing::info!(elapsed = ?started.elapsed(), "orchestrator up");
        }
        if cluster.opts.start_gateway {
            cluster.gateway = Some(cluster.start_gateway().await?);
            tracing::info!(elapsed = ?started.elapsed(), "gateway up");
        }
        Ok(cluster)
    }

    /// Replicas from the empty GTID position, semi-sync per durability, primary writable.
    async fn bootstrap_replication(&self) -> Result<()> {
        let semi = self.opts.durability == Durability::SemiSync;
        let primary = &self.tablets[0];
        let replicas = &self.tablets[1..];
        let heartbeat = self.opts.heartbeat_period.as_secs_f64().max(0.001);
        let timeout = self.opts.ready_timeout;
        // Over TLS, verifying the primary's certificate, as the agents repoint replicas: the
        // replication user requires it.
        let ssl = if self.opts.security.is_tls() {
            format!(
                ", MASTER_SSL=1, MASTER_SSL_CA={}, MASTER_SSL_VERIFY_SERVER_CERT=1",
                sql_quote(&self.certs.ca_file().to_string_lossy())
            )
        } else {
            String::new()
        };
        let results = join_all(replicas.iter().map(|r| {
            let stmts = vec![
                "SET GLOBAL gtid_slave_pos=''".to_string(),
                format!(
                    "CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={}, MASTER_USER={}, \
                     MASTER_PASSWORD={}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, \
                     MASTER_HEARTBEAT_PERIOD={heartbeat}{ssl}",
                    primary.mysqld.ip(),
                    primary.mysqld.port(),
                    sql_quote(&self.creds.repl_user),
                    sql_quote(&self.creds.repl_password)
                ),
                format!(
                    "SET GLOBAL rpl_semi_sync_slave_enabled={}",
                    if semi { "ON" } else { "OFF" }
                ),
                "SET GLOBAL slave_net_timeout=4".to_string(),
                "START SLAVE".to_string(),
            ];
            async move {
                let mut c = r.root_conn().await?;
                exec_all(&mut c, r.alias(), &stmts).await?;
                let _ = c.disconnect().await;
                Ok::<_, HarnessError>(())
            }
        }))
        .await;
        results.into_iter().collect::<Result<Vec<_>>>()?;
        self.wait_replicated(timeout).await?;
        if !self.opts.bootstrap_primary {
            // A shard with no primary: identical read-only tablets, none replicating.
            let results = join_all(replicas.iter().map(|r| async move {
                let mut c = r.root_conn().await?;
                exec_all(
                    &mut c,
                    r.alias(),
                    &["STOP SLAVE".into(), "RESET SLAVE ALL".into()],
                )
                .await?;
                let _ = c.disconnect().await;
                Ok::<_, HarnessError>(())
            }))
            .await;
            return results.into_iter().collect::<Result<Vec<_>>>().map(drop);
        }

        let mut pc = primary.root_conn().await?;
        if semi && !replicas.is_empty() {
            exec_all(
                &mut pc,
                primary.alias(),
                &[
                    "SET GLOBAL rpl_semi_sync_master_wait_point='AFTER_SYNC'".into(),
                    format!("SET GLOBAL rpl_semi_sync_master_timeout={SEMI_SYNC_TIMEOUT_MS}"),
                    "SET GLOBAL rpl_semi_sync_master_wait_no_slave=ON".into(),
                    "SET GLOBAL rpl_semi_sync_master_enabled=ON".into(),
                ],
            )
            .await?;
            let want = replicas.len() as u64;
            let clients = self
                .wait_semi_sync_clients(&mut pc, want, Duration::from_secs(2))
                .await;
            if clients.is_err() {
                // The replicas' semi-sync flag is read when the IO thread connects: reconnect.
                for r in replicas {
                    let mut c = r.root_conn().await?;
                    exec_all(
                        &mut c,
                        r.alias(),
                        &[
                            "STOP SLAVE IO_THREAD".into(),
                            "START SLAVE IO_THREAD".into(),
                        ],
                    )
                    .await?;
                }
                self.wait_semi_sync_clients(&mut pc, want, timeout).await?;
            }
        } else if semi {
            tracing::warn!(
                "semi_sync with a single tablet: the primary side stays off (no replica could ack)"
            );
        }
        exec_all(
            &mut pc,
            primary.alias(),
            &["SET GLOBAL read_only=OFF".into()],
        )
        .await?;
        let _ = pc.disconnect().await;
        Ok(())
    }

    async fn wait_semi_sync_clients(
        &self,
        pc: &mut Conn,
        want: u64,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let clients: u64 = global_status(pc, "Rpl_semi_sync_master_clients")
                .await?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let status = global_status(pc, "Rpl_semi_sync_master_status").await?;
            if clients >= want && status.as_deref() == Some("ON") {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("{want} semi-sync clients on {}", self.tablets[0].alias()),
                    after: timeout,
                    detail: Some(format!("clients={clients} status={status:?}")),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running tablet other than the current primary (per the shard record,
    /// else tablet 0) runs both replication threads and has applied the primary's
    /// `gtid_binlog_pos`.
    pub async fn wait_replicated(&self, timeout: Duration) -> Result<()> {
        let primary = self.primary().await.unwrap_or(&self.tablets[0]);
        let mut pc = primary.root_conn().await?;
        let pos = global_var(&mut pc, "gtid_binlog_pos")
            .await?
            .unwrap_or_default();
        let _ = pc.disconnect().await;
        let others = self
            .tablets
            .iter()
            .filter(|t| t.alias != primary.alias && t.mysqld.is_running());
        let results = join_all(others.map(|t| {
            let pos = pos.clone();
            async move {
                let mut c = t.root_conn().await?;
                let start = Instant::now();
                loop {
                    let last = match replica_caught_up(&mut c, &pos).await {
                        Ok(true) => break,
                        Ok(false) => format!("gtid_slave_pos not yet at {pos}"),
                        Err(e) => e.to_string(),
                    };
                    if start.elapsed() > timeout {
                        return Err(HarnessError::Timeout {
                            what: format!("{} to run replication and apply {pos}", t.alias),
                            after: timeout,
                            detail: Some(last),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = c.disconnect().await;
                Ok::<_, HarnessError>(())
            }
        }))
        .await;
        results.into_iter().collect::<Result<Vec<_>>>().map(drop)
    }

    /// Waits until the first primary's agent has created its heartbeat table and written a
    /// heartbeat, and every running replica has applied that. The agent creates the table
    /// (`CREATE DATABASE`, `CREATE TABLE`: DDL) on its first heartbeat; a replica whose mysqld is
    /// SIGKILLed while it applies a DDL can come back with the DDL in its binlog but not in its
    /// `gtid_slave_pos` (MariaDB records a DDL's GTID after binlogging it, outside the DDL), and
    /// its SQL thread then stops on error 1950 ("out-of-order sequence number") re-applying it.
    /// So no DDL of the cluster's own is on its way to a replica when [`Cluster::start`] returns
    /// and a test starts killing replicas; from then on the agents only write rows.
    async fn wait_heartbeat_replicated(&self, timeout: Duration) -> Result<()> {
        let primary = &self.tablets[0];
        poll_until(
            &format!("the heartbeat of {}'s agent", primary.alias),
            timeout,
            Duration::from_millis(20),
            || async {
                let mut c = primary.root_conn().await?;
                let exists: Option<i64> = c
                    .query_first(
                        "SELECT COUNT(*) FROM information_schema.tables \
                         WHERE table_schema = '_myha' AND table_name = 'heartbeat'",
                    )
                    .await
                    .map_err(HarnessError::mysql("look for _myha.heartbeat"))?;
                let rows = if exists == Some(1) {
                    c.query_first("SELECT COUNT(*) FROM _myha.heartbeat")
                        .await
                        .map_err(HarnessError::mysql("count _myha.heartbeat"))?
                } else {
                    None
                };
                let _ = c.disconnect().await;
                Ok(rows.filter(|n: &i64| *n > 0).map(drop))
            },
        )
        .await?;
        self.wait_replicated(timeout).await
    }

    /// The address and namespace of host `name` (loopback and none without a network).
    fn place(&self, name: &str) -> Result<(Ipv4Addr, Option<String>)> {
        place_on(self.network.as_ref(), name)
    }

    /// The namespace of the host that has `ip` (none on loopback); an error when no host of
    /// the network has it.
    fn netns_of(&self, ip: IpAddr) -> Result<Option<String>> {
        let Some(n) = &self.network else {
            return Ok(None);
        };
        let host = match ip {
            IpAddr::V4(v4) => n.host_at(v4),
            IpAddr::V6(_) => None,
        };
        host.map(|h| h.ns.clone()).ok_or_else(|| {
            HarnessError::Invalid(format!("{ip} is no host of this cluster's network"))
        })
    }

    /// The first of `hosts` whose directory under the cluster's does not exist yet: where the
    /// next orchestrator or gateway goes.
    fn next_slot(&self, hosts: &[&'static str]) -> Result<&'static str> {
        hosts
            .iter()
            .copied()
            .find(|h| !self.dir.join(h).exists())
            .ok_or_else(|| HarnessError::Invalid(format!("all of {hosts:?} are taken")))
    }

    /// The hosts ([`Hosts::Netns`]), to cut, isolate or slow them.
    pub fn network(&self) -> Option<&Network> {
        self.network.as_ref()
    }

    /// The network, or an error saying the cluster runs on loopback.
    pub fn net(&self) -> Result<&Network> {
        self.network.as_ref().ok_or_else(|| {
            HarnessError::Invalid("this cluster runs on loopback (hosts: Loopback)".into())
        })
    }

    /// Every etcd member's client URL.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.iter().map(Etcd::endpoint).collect()
    }

    /// Every etcd member.
    pub fn etcd_members(&self) -> &[Etcd] {
        &self.etcd
    }

    /// The `[etcd]` section of a daemon of identity `identity` (its client certificate's
    /// common name): every member, the cluster's prefix, and (secured, the default) the
    /// certificate, the `myha` user and its password file; other settings at their defaults.
    pub fn etcd_section(&self, identity: &str) -> Result<EtcdSection> {
        self.etcd[0].daemon_section(self.etcd_endpoints(), &self.opts.prefix, identity)
    }

    /// [`Cluster::etcd_section`] as config text, for a test that writes a config by hand.
    pub fn etcd_section_toml(&self, identity: &str) -> Result<String> {
        Ok(self.etcd_section(identity)?.to_toml())
    }

    /// The environment that points `myhactl` at this cluster's etcd (`MYHA_ETCD`, and when
    /// secured `MYHA_CA`, `MYHA_CERT`, `MYHA_KEY`, `MYHA_ETCD_USER`,
    /// `MYHA_ETCD_PASSWORD_FILE`).
    pub fn ctl_env(&self) -> Result<Vec<(&'static str, String)>> {
        let mut env = self.etcd[0].ctl_env()?;
        for (var, value) in &mut env {
            if *var == "MYHA_ETCD" {
                *value = self.etcd_endpoints().join(",");
            }
        }
        Ok(env)
    }

    /// The config the harness gives tablet `i`'s agent (fresh ports each call).
    pub fn agent_config(&self, i: usize) -> Result<AgentConfig> {
        let t = &self.tablets[i];
        let tls = self.opts.security.is_tls();
        let ip = t.mysqld.ip();
        // The passwords go to files only the daemon's user reads, as on a real host: the
        // config holds their paths (and every test runs the agent's file-reading path).
        let secrets = t.dir.join("agent-secrets");
        let password_file = write_secret(&secrets, "mysql.password", &self.creds.agent_password)?;
        let repl_password_file =
            write_secret(&secrets, "mysql.repl_password", &self.creds.repl_password)?;
        let mut cfg = AgentConfig {
            tablet: TabletSection {
                cell: t.cell.clone(),
                uid: t.uid,
                keyspace: self.opts.keyspace.clone(),
                shard: self.opts.shard.clone(),
                promotion_rule: PromotionRule::Neutral,
            },
            mysql: MysqlSection {
                host: "127.0.0.1".into(),
                port: t.mysqld.port(),
                socket: Some(t.mysqld.socket().to_path_buf()),
                user: self.creds.agent_user.clone(),
                password: Default::default(),
                password_file: Some(password_file),
                password_env: None,
                repl_user: self.creds.repl_user.clone(),
                repl_password: Default::default(),
                repl_password_file: Some(repl_password_file),
                repl_password_env: None,
                flavor: FlavorName::Mariadb,
                connect_timeout: Duration::from_millis(500),
                query_timeout: Duration::from_secs(1),
                // On by default with [mysql.tls]: every repoint replicates over TLS.
                repl_tls: None,
                // The agent's own connection uses the socket; its probe of the primary and its
                // fencing of another server go over TCP, with TLS verifying the server's name.
                tls: tls.then(|| MysqlTls {
                    ca_file: self.certs.ca_file(),
                    cert_file: None,
                    key_file: None,
                    verify_identity: true,
                }),
            },
            agent: AgentSection {
                poll_interval: self.opts.poll_interval,
                grpc_listen: (ip, free_port()?).into(),
                http_listen: (ip, free_port()?).into(),
                advertise_host: ip.to_string(),
                state_dir: t.dir.join("agent-state"),
                semi_sync_timeout: Duration::from_millis(SEMI_SYNC_TIMEOUT_MS),
                grpc_allowed_clients: if tls {
                    vec![ORCHESTRATOR_IDENTITY.into()]
                } else {
                    Vec::new()
                },
                ..AgentSection::default()
            },
            // gRPC over TLS, as every control-plane link of a launched cluster.
            tls: if tls {
                Some(self.certs.agent(t.alias(), &[ip.to_string()])?)
            } else {
                None
            },
            etcd: EtcdSection {
                lease_ttl: self.opts.lease_ttl,
                ..self.etcd_section(&format!("agent-{}", t.alias))?
            },
            log: LogSection {
                format: LogFormat::Human,
                level: self.opts.agent_log_level.clone(),
            },
        };
        if let Some(hook) = &self.opts.agent_config {
            hook(&mut cfg);
        }
        Ok(cfg)
    }

    /// Starts the agents that are not started yet and waits until they are healthy.
    pub async fn start_agents(&mut self) -> Result<()> {
        let mut configs = Vec::new();
        for i in 0..self.tablets.len() {
            if self.tablets[i].agent.is_none() {
                configs.push((i, self.agent_config(i)?));
            }
        }
        let new_session = self.opts.new_session;
        let mut agents = Vec::new();
        for (i, cfg) in configs {
            let ns = self.netns_of(cfg.agent.grpc_listen.ip())?;
            let dir = self.tablets[i].dir.clone();
            agents.push((
                i,
                AgentProc::create(cfg, &dir, new_session)?.in_netns(ns.as_deref()),
            ));
        }
        let launched = join_all(agents.into_iter().map(|(i, a)| async move {
            let r = a.start().await.map(|()| a);
            (i, r)
        }))
        .await;
        let mut first_err = None;
        for (i, r) in launched {
            match r {
                Ok(a) => self.tablets[i].agent = Some(a),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        self.wait_agents_healthy(self.opts.ready_timeout).await
    }

    /// Waits until every running agent reports mysqld reachable (replicas: both threads
    /// running) and every agent is registered in etcd.
    pub async fn wait_agents_healthy(&self, timeout: Duration) -> Result<()> {
        let primary = self.primary().await.map(|t| t.alias.clone()).ok();
        let results = join_all(self.tablets.iter().filter_map(|t| {
            let agent = t.agent.as_ref().filter(|a| a.is_running())?;
            let is_primary = primary.as_deref() == Some(t.alias.as_str());
            let has_primary = primary.is_some();
            Some(async move {
                let what = format!("agent {} to report healthy", t.alias);
                poll_until(&what, timeout, Duration::from_millis(50), || async {
                    let h = agent.full_status().await?;
                    if !h.mysql_reachable {
                        return Err(HarnessError::Invalid(format!(
                            "mysql unreachable: {}",
                            h.mysql_error
                        )));
                    }
                    // With no primary (bootstrap_primary: false) nobody replicates yet.
                    if !is_primary && has_primary {
                        let r = h.replication.unwrap_or_default();
                        if r.io_state() != ThreadState::Running
                            || r.sql_state() != ThreadState::Running
                        {
                            return Err(HarnessError::Invalid(format!(
                                "replication io={:?} sql={:?} {}",
                                r.io_state(),
                                r.sql_state(),
                                r.last_io_error
                            )));
                        }
                    }
                    let registered = self
                        .topo
                        .get_tablet(&t.alias)
                        .await
                        .map_err(HarnessError::topo("read tablet record"))?
                        .is_some();
                    if !registered {
                        return Err(HarnessError::Invalid("not registered in etcd".into()));
                    }
                    Ok(Some(()))
                })
                .await
                .map_err(|e| match e {
                    HarnessError::Timeout {
                        what,
                        after,
                        detail,
                    } => HarnessError::Timeout {
                        what,
                        after,
                        detail: Some(format!(
                            "{}\n--- last lines of {} ---\n{}",
                            detail.unwrap_or_default(),
                            agent.log_path().display(),
                            crate::util::log_tail(agent.log_path(), 20)
                        )),
                    },
                    other => other,
                })
            })
        }))
        .await;
        results.into_iter().collect::<Result<Vec<_>>>().map(drop)
    }

    /// The config the harness gives an orchestrator of this cluster (fresh port each call, on
    /// the next orchestrator's host): this cluster's etcd and prefix, then
    /// [`ClusterOptions::orchestrator_config`].
    pub fn orchestrator_config(&self) -> Result<myha_orchestrator::config::OrchestratorConfig> {
        let (ip, _) = self.place(self.next_slot(&ORCHESTRATOR_HOSTS)?)?;
        let mut cfg = orchestrator_config(
            &self.etcd_section(ORCHESTRATOR_IDENTITY)?,
            &self.opts.orchestrator_log_level,
            ip,
        )?;
        if self.opts.security.is_tls() {
            cfg.tls = Some(self.certs.orchestrator_files());
            // The API over HTTPS with a server certificate for its address, and always
            // behind a token (off loopback `orchestrator_config` has given it one already).
            let port = cfg.orchestrator.http_listen.port();
            let api = self.certs.server(
                &format!("orchestrator-api-{port}"),
                "myha-orchestrator-api",
                &[ip.to_string()],
            )?;
            cfg.orchestrator.api_tls = Some(pki::ServerFiles {
                cert_file: api.cert_file,
                key_file: api.key_file,
            });
            if cfg.orchestrator.api_tokens.is_empty() && cfg.orchestrator.api_token.is_none() {
                cfg.orchestrator
                    .api_tokens
                    .push(crate::orchestrator::harness_token());
            }
        }
        if let Some(hook) = &self.opts.orchestrator_config {
            hook(&mut cfg);
        }
        Ok(cfg)
    }

    /// Starts a `myha-orchestrator` with [`Cluster::orchestrator_config`] in
    /// `{dir}/orchestrator` (`orchestrator-2`, ... for further ones) and returns once its
    /// `/health` answers. The caller owns it: dropping the handle kills it.
    pub async fn start_orchestrator(&self) -> Result<OrchestratorProc> {
        let cfg = self.orchestrator_config()?;
        self.start_orchestrator_with(cfg).await
    }

    /// As [`Cluster::start_orchestrator`], with a config of the caller's. It runs on the host
    /// that has its `http_listen` address.
    pub async fn start_orchestrator_with(
        &self,
        cfg: myha_orchestrator::config::OrchestratorConfig,
    ) -> Result<OrchestratorProc> {
        let ns = self.netns_of(cfg.orchestrator.http_listen.ip())?;
        let dir = (1..)
            .map(|n| match n {
                1 => self.dir.join("orchestrator"),
                n => self.dir.join(format!("orchestrator-{n}")),
            })
            .find(|d| !d.exists())
            .unwrap_or_else(|| self.dir.join("orchestrator"));
        let o = OrchestratorProc::create(cfg, &dir, self.opts.new_session)?.in_netns(ns.as_deref());
        o.start().await?;
        Ok(o)
    }

    /// The orchestrator started by [`ClusterOptions::start_orchestrator`].
    pub fn orchestrator(&self) -> Option<&OrchestratorProc> {
        self.orchestrator.as_ref()
    }

    /// The config the harness gives a gateway of this cluster (fresh ports each call): this
    /// cluster's etcd and prefix, RW and RO listeners for its shard, then
    /// [`ClusterOptions::gateway_config`].
    pub fn gateway_config(&self) -> Result<GatewayConfig> {
        let (ip, _) = self.place(self.next_slot(&GATEWAY_HOSTS)?)?;
        let mut cfg = gateway_config(
            &self.etcd_section(GATEWAY_IDENTITY)?,
            &self.opts.gateway_log_level,
            &self.opts.keyspace,
            &self.opts.shard,
            ip,
        )?;
        if self.opts.security.is_tls() {
            cfg.tls = Some(self.certs.gateway_files());
        }
        if let Some(hook) = &self.opts.gateway_config {
            hook(&mut cfg);
        }
        Ok(cfg)
    }

    /// Starts a `myha-gateway` with [`Cluster::gateway_config`] in `{dir}/gateway`
    /// (`gateway-2`, ... for further ones) and returns once its admin API answers. The caller
    /// owns it: dropping the handle kills it.
    pub async fn start_gateway(&self) -> Result<GatewayProc> {
        let cfg = self.gateway_config()?;
        self.start_gateway_with(cfg).await
    }

    /// As [`Cluster::start_gateway`], with a config of the caller's. It runs on the host that
    /// has its `admin_listen` address.
    pub async fn start_gateway_with(&self, cfg: GatewayConfig) -> Result<GatewayProc> {
        let ns = self.netns_of(cfg.gateway.admin_listen.ip())?;
        let dir = (1..)
            .map(|n| match n {
                1 => self.dir.join("gateway"),
                n => self.dir.join(format!("gateway-{n}")),
            })
            .find(|d| !d.exists())
            .unwrap_or_else(|| self.dir.join("gateway"));
        let g = GatewayProc::create(cfg, &dir, self.opts.new_session)?.in_netns(ns.as_deref());
        g.start().await?;
        Ok(g)
    }

    /// The gateway started by [`ClusterOptions::start_gateway`].
    pub fn gateway(&self) -> Option<&GatewayProc> {
        self.gateway.as_ref()
    }

    pub fn topo(&self) -> &Topo {
        &self.topo
    }

    /// Takes the shard's lock in etcd as `holder` (waiting up to 10 s for another holder), as
    /// an orchestrator does before it acts. The agents admit a mutating action only from the
    /// lock's holder named in etcd, so a test that calls them directly holds the lock and
    /// sends its [`ShardLock::epoch`]; release it before an orchestrator needs to act.
    pub async fn lock_shard(&self, holder: &str) -> Result<ShardLock> {
        let request = LockRequest::new(holder, "act on the agents directly")
            .with_ttl(Duration::from_secs(30))
            .with_wait(Duration::from_secs(10));
        self.topo
            .lock_shard(&self.opts.keyspace, &self.opts.shard, request)
            .await
            .map_err(HarnessError::topo(format!(
                "lock {}/{} as {holder}",
                self.opts.keyspace, self.opts.shard
            )))
    }
    /// The first etcd member (the only one unless [`ClusterOptions::etcd_members`] > 1).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd[0]
    }
    pub fn tablets(&self) -> &[Tablet] {
        &self.tablets
    }
    /// Tablet `i` (panics when out of range, like indexing).
    pub fn tablet(&self, i: usize) -> &Tablet {
        &self.tablets[i]
    }
    pub fn tablet_by_alias(&self, alias: &str) -> Option<&Tablet> {
        self.tablets.iter().find(|t| t.alias == alias)
    }
    /// The tablet the shard record names as primary now.
    pub async fn primary(&self) -> Result<&Tablet> {
        let (rec, _) = self
            .topo
            .get_shard(&self.opts.keyspace, &self.opts.shard)
            .await
            .map_err(HarnessError::topo("read shard record"))?
            .ok_or_else(|| HarnessError::Invalid("no shard record".into()))?;
        let alias = rec
            .primary
            .ok_or_else(|| HarnessError::Invalid("the shard record names no primary".into()))?;
        self.tablet_by_alias(&alias).ok_or_else(|| {
            HarnessError::Invalid(format!("primary {alias} is not a tablet of this cluster"))
        })
    }
    /// Tablet 0, the primary the cluster was bootstrapped with.
    pub fn initial_primary(&self) -> &Tablet {
        &self.tablets[0]
    }
    /// The cluster's CA and certificates.
    pub fn certs(&self) -> &Certs {
        &self.certs
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }
    pub fn keyspace(&self) -> &str {
        &self.opts.keyspace
    }
    pub fn shard(&self) -> &str {
        &self.opts.shard
    }
    /// The cluster's directory (temp dir or base dir).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep the directory (logs, datadirs) when dropped; processes are still killed.
    /// (`MYHA_KEEP_DIR=1` in the environment does the same for every cluster.)
    pub fn keep_dir(&self) {
        self.keep_dir.store(true, Ordering::SeqCst);
    }

    /// The sandbox description of this cluster (pids as of now).
    pub fn sandbox_state(&self) -> SandboxState {
        SandboxState {
            dir: self.dir.clone(),
            etcd: self.etcd[0].endpoint(),
            etcd_pid: self.etcd[0].pid(),
            prefix: self.opts.prefix.clone(),
            cell: self.opts.cell.clone(),
            keyspace: self.opts.keyspace.clone(),
            shard: self.opts.shard.clone(),
            durability: self.opts.durability,
            app_user: self.creds.app_user.clone(),
            app_password: self.creds.app_password.clone(),
            database: self.creds.database.clone(),
            credentials: (*self.creds).clone(),
            orchestrator_pid: self.orchestrator.as_ref().and_then(OrchestratorProc::pid),
            // `https://host:port` when the API serves TLS (myhactl reads the scheme).
            orchestrator_http: self.orchestrator.as_ref().map(|o| o.url("")),
            gateway_pid: self.gateway.as_ref().and_then(GatewayProc::pid),
            gateway: self.gateway.as_ref().map(|g| SandboxGateway {
                rw: g.rw_addr().map(|a| a.to_string()),
                ro: g.ro_addr().map(|a| a.to_string()),
                admin: g.admin_addr().to_string(),
            }),
            tablets: self
                .tablets
                .iter()
                .map(|t| SandboxTablet {
                    alias: t.alias.clone(),
                    mysql: t.mysqld.addr(),
                    socket: t.mysqld.socket().to_path_buf(),
                    mysqld_pid: t.mysqld.pid(),
                    agent_pid: t.agent.as_ref().and_then(AgentProc::pid),
                    agent_grpc: t.agent.as_ref().map(|a| a.grpc_addr().to_string()),
                    agent_http: t.agent.as_ref().map(|a| a.http_addr().to_string()),
                    dir: t.dir.clone(),
                    mysqld_command: t.mysqld.command_line(),
                    agent_command: t.agent.as_ref().and_then(AgentProc::command_line),
                })
                .collect(),
            created_ms: topo::now_ms(),
            network: None,
            operator_tls: self.etcd[0].security().map(EtcdSecurity::operator_files),
            etcd_user: self.etcd[0].security().map(|s| s.user().to_string()),
            etcd_password_file: self.etcd[0]
                .security()
                .map(|s| s.password_file().to_path_buf()),
        }
    }

    /// Leaves every process running and the directory in place, writes `{dir}/sandbox.json`
    /// and returns what it wrote. Start the cluster with `new_session: true` for the
    /// processes to survive this process's exit cleanly.
    pub fn detach(mut self) -> Result<SandboxState> {
        let mut state = self.sandbox_state();
        // The processes live in the network's namespaces: it stays with them.
        state.network = self.network.take().map(Network::detach);
        state.write(&self.dir.join(STATE_FILE))?;
        for e in &self.etcd {
            e.detach();
        }
        if let Some(g) = &self.gateway {
            g.detach();
        }
        if let Some(o) = &self.orchestrator {
            o.detach();
        }
        for t in &self.tablets {
            t.mysqld.detach();
            if let Some(a) = &t.agent {
                a.detach();
            }
        }
        self.detached = true;
        self.keep_dir.store(true, Ordering::SeqCst);
        Ok(state)
    }

    /// Stops everything cleanly: the gateway, the orchestrator and agents (SIGTERM), mysqld
    /// (clean shutdown), etcd.
    pub async fn shutdown(self) -> Result<()> {
        if let Some(g) = &self.gateway {
            g.stop().await?;
        }
        if let Some(o) = &self.orchestrator {
            o.stop().await?;
        }
        for t in &self.tablets {
            if let Some(a) = &t.agent {
                a.stop().await?;
            }
        }
        let stops = join_all(self.tablets.iter().map(|t| t.mysqld.stop())).await;
        stops.into_iter().collect::<Result<Vec<_>>>()?;
        let stops = join_all(self.etcd.iter().map(Etcd::stop)).await;
        stops.into_iter().collect::<Result<Vec<_>>>().map(drop)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.detached {
            // The gateway (clients' entry point) and the orchestrator first: the orchestrator
            // would otherwise react to the rest going away.
            if let Some(g) = &self.gateway {
                let _ = g.kill();
            }
            if let Some(o) = &self.orchestrator {
                let _ = o.kill();
            }
            for t in &self.tablets {
                if let Some(a) = &t.agent {
                    let _ = a.kill();
                }
            }
            for t in &self.tablets {
                let _ = t.mysqld.kill();
            }
            for e in &self.etcd {
                let _ = e.kill();
            }
        }
        let keep_env = std::env::var_os("MYHA_KEEP_DIR").is_some_and(|v| !v.is_empty() && v != "0");
        if self.keep_dir.load(Ordering::SeqCst) || keep_env {
            if let Some(t) = self.temp.take() {
                let kept = t.keep();
                tracing::info!(dir = %kept.display(), "cluster dir kept");
            }
        }
    }
}

/// Users and the app database on the first primary (still read-only; root may write).
async fn bootstrap_primary_sql(primary: &Tablet, creds: &Credentials, tls: bool) -> Result<()> {
    let mut stmts = Vec::new();
    let q = sql_quote;
    for host in ["%", "localhost"] {
        let h = q(host);
        stmts.push(format!(
            "CREATE USER {}@{h} IDENTIFIED BY {}",
            q(&creds.agent_user),
            q(&creds.agent_password)
        ));
        // Exactly the documented least-privilege set (docs/mysql-grants.md): every test that
        // drives the agent proves it is enough.
        let dialect = flavor::Dialect::MARIADB_10_11;
        stmts.extend(dialect.agent_grants(&format!("{}@{h}", q(&creds.agent_user))));
        stmts.push(format!(
            "CREATE USER {}@{h} IDENTIFIED BY {}",
            q(&creds.repl_user),
            q(&creds.repl_password)
        ));
        // REQUIRE SSL: a replica pointed at a primary without TLS is refused.
        stmts.extend(dialect.replication_grants(&format!("{}@{h}", q(&creds.repl_user)), tls));
        stmts.push(format!(
            "CREATE USER {}@{h} IDENTIFIED BY {}",
            q(&creds.app_user),
            q(&creds.app_password)
        ));
        stmts.push(format!(
            "GRANT ALL ON `{}`.* TO {}@{h}",
            creds.database.replace('`', "``"),
            q(&creds.app_user)
        ));
    }
    stmts.push(format!(
        "CREATE DATABASE IF NOT EXISTS `{}`",
        creds.database.replace('`', "``")
    ));
    let mut c = primary.root_conn().await?;
    exec_all(&mut c, primary.alias(), &stmts).await?;
    let _ = c.disconnect().await;
    Ok(())
}

/// Cell, keyspace (with durability), shard, and (unless `bootstrap_primary` is off) tablet 0 as
/// primary at term 1.
async fn bootstrap_topology(etcd: &[Etcd], opts: &ClusterOptions, primary: &str) -> Result<Topo> {
    let endpoints: Vec<String> = etcd.iter().map(Etcd::endpoint).collect();
    let access = etcd[0].access()?;
    let topo = Topo::connect_with(&endpoints, &opts.prefix, Duration::from_secs(2), &access)
        .await
        .map_err(HarnessError::topo(format!("connect to {endpoints:?}")))?;
    topo.put_cell(&CellRecord {
        name: opts.cell.clone(),
    })
    .await
    .map_err(HarnessError::topo("put cell"))?;
    topo.put_keyspace(&KeyspaceRecord {
        name: opts.keyspace.clone(),
        durability: opts.durability,
    })
    .await
    .map_err(HarnessError::topo("put keyspace"))?;
    topo.create_shard(&opts.keyspace, &opts.shard)
        .await
        .map_err(HarnessError::topo("create shard"))?;
    if opts.bootstrap_primary {
        let rec = topo
            .bootstrap_primary(&opts.keyspace, &opts.shard, primary)
            .await
            .map_err(HarnessError::topo("bootstrap primary"))?;
        tracing::debug!(?rec, "shard bootstrapped");
    }
    Ok(topo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords() {
        let s = "CREATE USER 'a'@'%' IDENTIFIED BY 'secret'";
        assert_eq!(redact(s), "CREATE USER 'a'@'%' IDENTIFIED BY '***'");
        let s = "CHANGE MASTER TO MASTER_USER='r', MASTER_PASSWORD='pw', MASTER_USE_GTID=slave_pos";
        assert_eq!(
            redact(s),
            "CHANGE MASTER TO MASTER_USER='r', MASTER_PASSWORD='***', MASTER_USE_GTID=slave_pos"
        );
        assert_eq!(redact("START SLAVE"), "START SLAVE");
        // A quote inside the password (the rule used to stop at the first one, leaking the
        // rest).
        let s = format!("CREATE USER 'a'@'%' IDENTIFIED BY {}", sql_quote("x'tail"));
        assert_eq!(redact(&s), "CREATE USER 'a'@'%' IDENTIFIED BY '***'");
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(sql_quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
