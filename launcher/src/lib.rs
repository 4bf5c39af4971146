//! Starts real etcd, MariaDB (`mariadbd`) and myha daemons on free loopback ports, in temp
//! dirs or a given base dir, and injects faults (SIGKILL, SIGSTOP/SIGCONT, clean stop,
//! restart). Used by `myhactl sandbox`, the test harness (crate `harness`, which adds the
//! test-only writer) and the benchmarks. Production code: `myhactl` links it, so nothing
//! here exists only for tests.
//!
//! - [`Etcd`], [`Mysqld`], [`AgentProc`], [`OrchestratorProc`], [`GatewayProc`]: one process
//!   each; every method that signals takes `&self`, so a [`Cluster`] can be shared (e.g. in an
//!   `Arc`) between tasks.
//! - [`Cluster::start`]: etcd + N mysqld (GTID replication from tablet 0, semi-sync per
//!   durability) + topology bootstrap + optionally one agent per mysqld and one orchestrator
//!   ([`ClusterOptions::start_orchestrator`], or [`Cluster::start_orchestrator`] for more) and
//!   one gateway ([`ClusterOptions::start_gateway`], or [`Cluster::start_gateway`]).
//! - Dropping a handle SIGKILLs its processes (also while unwinding from a panic);
//!   [`Cluster::detach`] leaves them running for the sandbox, [`sandbox::down`] stops them.

mod agent;
pub mod certs;
mod cluster;
mod config_daemon;
pub mod delay;
mod error;
mod etcd;
mod gateway;
mod http;
mod mysqld;
pub mod net;
pub mod netns;
mod orchestrator;
mod process;
pub mod sandbox;
mod template;
mod util;

pub use agent::{AgentProc, AGENT_START_TIMEOUT, AGENT_STOP_GRACE};
pub use cluster::{
    global_status, global_var, row_to_map, slave_status, write_secret, AgentConfigHook, Cluster,
    ClusterOptions, Credentials, GatewayConfigHook, Hosts, OrchestratorConfigHook, Security,
    Tablet, CLIENT_HOST, SEMI_SYNC_TIMEOUT_MS,
};
pub use config_daemon::ConfigDaemon;
pub use error::{HarnessError, Result};
pub use etcd::{
    Etcd, EtcdMember, EtcdSecure, EtcdSecurity, ETCD_START_TIMEOUT, ETCD_STOP_GRACE, ETCD_USER,
};
pub use gateway::{
    gateway_config, GatewayConfig, GatewayListener, GatewayProc, GATEWAY_HTTP_TIMEOUT,
    GATEWAY_START_TIMEOUT, GATEWAY_STOP_SLACK,
};
/// Re-exported for [`ClusterOptions::orchestrator_config`] (API tokens included).
pub use myha_orchestrator::auth::Role as ApiRole;
/// Re-exported for [`ClusterOptions::orchestrator_config`].
pub use myha_orchestrator::config::{ApiTokenConfig, OrchestratorConfig};
pub use mysqld::{Mysqld, MysqldOptions, MYSQLD_START_TIMEOUT, MYSQLD_STOP_GRACE};
pub use orchestrator::{
    orchestrator_config, OrchestratorProc, HARNESS_TOKEN_NAME, ORCHESTRATOR_HTTP_TIMEOUT,
    ORCHESTRATOR_START_TIMEOUT, ORCHESTRATOR_STOP_GRACE,
};
pub use process::CommandLine;
pub use sandbox::{SandboxGateway, SandboxState, SandboxTablet};
pub use util::{
    find_myha_bin, free_port, log_tail, pid_alive, pid_stopped, random_password, rss_kib,
};

/// Re-exported for [`ClusterOptions::durability`].
pub use topo::Durability;
