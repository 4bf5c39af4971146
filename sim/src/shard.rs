//! One simulated shard: MariaDB models on a replication network, an agent model beside each,
//! an orchestrator that runs the real engine and recovery step machines (such as
//! [`myha_orchestrator::recovery::reparent::Emergency`]) over an RPC network, a writer that
//! writes where the gateway's real routing function sends writes and records every
//! acknowledgement, and a seeded fault schedule. Invariants are checked after every
//! step of the virtual clock.
//!
//! # What is real and what is modelled
//!
//! Real: the orchestrator's engine, the runner's re-analysis under the lock and every remedy
//! that is a step machine (see the `orchestrator` module's header), the agent's term admission
//! ([`myha_agent::fence::TermState::admit`]), fencing decision ([`myha_agent::fence::decide`]),
//! health publication rule ([`myha_agent::health::push_due`]) and instance tracking.
//! Modelled: mysqld ([`crate::mariadb`]), the network ([`crate::net`]), the agent's execution
//! of each action on its mysqld (including lifting a replication delay for `ApplyReceived`),
//! and the orchestrator's shell (health streams, etcd round trips). The shard record lives in
//! the driver: reads under the lock see a write at once, the watches (the engine's snapshot,
//! the gateway, the agents) after [`ShardSimConfig::watch_delay`]. One orchestrator at a time:
//! it may die ([`Fault::CrashOrchestrator`]) wherever its recovery is, and the next one waits
//! for the dead one's lock lease to expire; several live orchestrators contending for the lock
//! are [`crate::lock`]'s subject.
//!
//! # Invariants
//!
//! - **Lost write**: when a reparent has promoted a tablet, and at the end of the run, the
//!   record's primary holds every write acknowledged with semi-sync.
//! - **Late acknowledgement**: a write acknowledged by a tablet after a newer term than its own
//!   was recorded must be held by the newer term's primary at the end (a commit whose semi-sync
//!   ack reached the old primary before the term changed may legitimately return late).
//! - **Errant primary**: after a reparent and at the end, the record's primary holds none of
//!   the errant transactions written on replicas ([`Fault::ErrantWrite`]; P9, R10).
//! - **Two primaries**: at every instant at most one tablet can complete a commit (running,
//!   writable and, under semi-sync, with a semi-sync replica connected to it).
//! - **Lossless while writable**: under semi-sync, every running writable tablet has its
//!   semi-sync primary side on with no async fallback. A writable tablet without it
//!   acknowledges commits no replica holds to any client connected to it, whether or not the
//!   simulated writer (which follows the record) is among them.
//! - **Convergence**: once the faults stop, writes are acknowledged again within
//!   [`ShardSimConfig::converge_within`].
//! - **No endless recovery**: at most one reparent per primary failure, plus one; and once
//!   the faults stop, no recovery (problem code and tablet) starts more than
//!   `MAX_REPEATS_WHEN_QUIET` times.

use gtid::MariaDbPosition;
use myha_agent::agent::{DemoteMemo, UndoStep};
use myha_agent::fence::{self, FenceDecision, TermState};
use myha_agent::health::{InstancePoll, InstanceTrack};
use myha_orchestrator::mutants::{self, Mutant};
use myha_orchestrator::recovery::steps::AgentAction;
use myha_orchestrator::recovery::RecoveryConfig;
use myha_proto::agent as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};
use topo::{Durability, PromotionRule, ShardRecord, TabletRecord, TabletType, Term};

use crate::mariadb::{
    AdminError, Input, IoRunning, MasterConfig, Message, Output, ProcessState, SemiSyncMaster,
    SemiSyncTimeout, Server, ServerConfig, ServerId, WriteId,
};
use crate::net::{LinkConfig, Network};
use crate::time::SimTime;

/// The orchestrator's node on the RPC network.
const ORCHESTRATOR: u32 = 1;
/// An agent's node: its tablet's server id plus this.
const AGENT_NODE: u32 = 10_000;
const TICK: Duration = Duration::from_millis(1);
/// The id of a delayed health push among an agent's delayed answers.
const PUSH: u64 = u64::MAX;
/// The agent's etcd write of a promotion into the shard history, which the real agent awaits
/// before it makes mysqld writable.
const PROMOTION_RECORD_WRITE: Duration = Duration::from_millis(3);

/// What one run simulates.
#[derive(Debug, Clone)]
pub struct ShardSimConfig {
    pub seed: u64,
    pub tablets: u32,
    pub durability: Durability,
    /// Virtual time simulated.
    pub horizon: Duration,
    /// No fault is injected (and every injected one is healed) after `horizon - quiet`.
    pub quiet: Duration,
    /// Once faults stop, writes must be acknowledged again within this.
    pub converge_within: Duration,
    /// The orchestrator polls the primary this often.
    pub poll_every: Duration,
    /// A client write every this often.
    pub write_every: Duration,
    /// A re-introduced bug (test builds only; see [`myha_orchestrator::mutants`]).
    pub mutant: Option<Mutant>,
    /// Under durability none a deposed primary that comes back writable is fenced by its agent
    /// within one of its polls; two writable primaries for up to this long are that window,
    /// longer is a violation. Under semi-sync no window is allowed.
    pub fence_window: Duration,
    /// Which shard of a fleet this is: shard `ks/{index}`, server ids from
    /// `1000 * index + 101` (0: `ks/0`, servers 101, 102, ...).
    pub index: u32,
    /// A replica configured with `MASTER_DELAY` from the start (an operator's delayed
    /// replica): it receives and acknowledges at once and applies this long after the commit
    /// (scenario P18). Its delay is gone once a reparent repoints it, as with the real agent.
    pub delayed_replica: Option<(ServerId, Duration)>,
    /// The etcd watches (gateway, agents, the engine's snapshot) deliver each shard record
    /// write this long after it (at most; drawn per write, in order per watch). The
    /// orchestrator's reads under the lock are linearizable and never delayed.
    pub watch_delay: Duration,
}

impl ShardSimConfig {
    /// The exploration's mix: every third seed under durability none, and 3 or 4 tablets
    /// (with 3 replicas, K = 1 leaves the candidate an acker even with one replica out of
    /// reach, so the revocation rule is the only guard left).
    pub fn for_seed(seed: u64) -> ShardSimConfig {
        let mut cfg = ShardSimConfig::new(seed);
        if seed % 3 == 2 {
            cfg.durability = Durability::None;
        }
        cfg.tablets = 3 + u32::from((seed / 3) % 2 == 1);
        // Drawn from a stream of their own, so that the links, appliers and faults each seed
        // drew before these existed stay what they were.
        let mut more = StdRng::seed_from_u64(seed ^ 0xde1a_7ed0);
        if more.random_bool(0.2) {
            let r = cfg.first_id() + more.random_range(1..cfg.tablets);
            cfg.delayed_replica = Some((r, Duration::from_millis(more.random_range(500..3_000))));
        }
        cfg.watch_delay = if more.random_bool(0.3) {
            Duration::from_millis(more.random_range(5..150))
        } else {
            Duration::from_millis(2)
        };
        cfg
    }

    pub fn new(seed: u64) -> ShardSimConfig {
        ShardSimConfig {
            seed,
            tablets: 3,
            durability: Durability::SemiSync,
            horizon: Duration::from_secs(12),
            quiet: Duration::from_secs(6),
            converge_within: Duration::from_secs(5),
            poll_every: Duration::from_millis(100),
            write_every: Duration::from_millis(5),
            mutant: None,
            fence_window: Duration::from_millis(300),
            index: 0,
            delayed_replica: None,
            watch_delay: Duration::ZERO,
        }
    }

    /// The first primary's server id.
    pub fn first_id(&self) -> ServerId {
        1000 * self.index + 101
    }

    /// The shard's name in keyspace `ks`.
    pub fn shard_name(&self) -> String {
        self.index.to_string()
    }
}

/// A fault at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Crash(ServerId),
    Restart(ServerId),
    Freeze(ServerId),
    Thaw(ServerId),
    /// The orchestrator and this tablet's agent cannot talk.
    CutAgent(ServerId),
    HealAgent(ServerId),
    /// The replication link between the first primary and this replica is cut both ways.
    CutReplication(ServerId),
    HealReplication(ServerId),
    /// This server's replication links are cut both ways.
    IsolateServer(ServerId),
    RejoinServer(ServerId),
    /// This tablet's agent cannot reach its own mysqld (its connections fail), while mysqld
    /// goes on serving its clients and replicas.
    CutAgentMysql(ServerId),
    HealAgentMysql(ServerId),
    /// An operator asks for a planned reparent to the best replica.
    Switchover,
    /// A client with `SUPER` commits on this tablet's mysqld whatever its `read_only`: on a
    /// replica, an errant transaction (scenarios P9, R10).
    ErrantWrite(ServerId),
    /// The orchestrator process dies: its engine, its running recovery (wherever the step
    /// machine was) and its agent connections are gone; its shard lock lives on in etcd until
    /// the lease expires (`lock_ttl`).
    CrashOrchestrator,
    /// A new orchestrator process starts: a fresh engine, which takes the shard lock once the
    /// dead one's lease has expired.
    RestartOrchestrator,
}

impl Fault {
    /// The fault this one ends, if it is a heal.
    pub fn heals(self) -> Option<Fault> {
        match self {
            Fault::Restart(id) => Some(Fault::Crash(id)),
            Fault::Thaw(id) => Some(Fault::Freeze(id)),
            Fault::HealAgent(id) => Some(Fault::CutAgent(id)),
            Fault::HealReplication(id) => Some(Fault::CutReplication(id)),
            Fault::RejoinServer(id) => Some(Fault::IsolateServer(id)),
            Fault::HealAgentMysql(id) => Some(Fault::CutAgentMysql(id)),
            Fault::RestartOrchestrator => Some(Fault::CrashOrchestrator),
            _ => None,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// A broken invariant, with when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub at: SimTime,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ms: {}: {}",
            self.at.as_millis(),
            self.invariant,
            self.detail
        )
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub violations: Vec<Violation>,
    /// Every fault, recovery outcome and record change, with when.
    pub trace: Vec<String>,
    pub acked: usize,
    pub reparents: usize,
    pub refusals: usize,
    pub final_term: u64,
    /// Windows in which a deposed primary under durability none was writable while its agent
    /// could not reach its mysqld (a known gap, see `check_one_primary`).
    pub unfenceable_windows: usize,
    /// Operators' planned reparents that completed, and that ended otherwise (refused before
    /// anything changed, or undone).
    pub switchovers: usize,
    pub switchover_refusals: usize,
    /// Orchestrator crashes while a recovery held the shard lock (refreshing or running its
    /// step machine), and while idle or waiting for the lock.
    pub crashes_holding_lock: usize,
    pub crashes_otherwise: usize,
    /// Replication delays the agents lifted for an emergency reparent (P18).
    pub delays_lifted: usize,
    /// Errant transactions committed on replicas.
    pub errant_writes: usize,
}

/// A request from the orchestrator to an agent, or the agent's answer.
#[derive(Debug, Clone)]
enum Rpc {
    Request {
        id: u64,
        term: Term,
        /// The action's own bound (`ActionContext.timeout_ms`).
        timeout: Duration,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
    /// A health message of the agent's stream.
    Health(Box<pb::Health>),
}

#[derive(Debug, Clone)]
enum Request {
    Act(Box<AgentAction>),
    FullStatus,
}

/// An agent's error, as the gRPC status carries it.
#[derive(Debug, Clone)]
struct AgentError {
    code: tonic::Code,
    message: String,
    stale: Option<pb::StaleTermRefusal>,
}

#[derive(Debug, Clone)]
enum Response {
    Act(Result<pb::ActionResponse, AgentError>),
    Status(Box<pb::Health>),
}

/// An action waiting for a position on its mysqld.
#[derive(Debug, Clone)]
struct Wait {
    id: u64,
    target: MariaDbPosition,
    deadline: SimTime,
    term: Term,
}

/// The agent beside one mysqld.
#[derive(Debug, Clone)]
struct Agent {
    alias: String,
    server: ServerId,
    terms: TermState,
    waits: Vec<Wait>,
    /// FullStatus answers delayed by a frozen mysqld (the agent's query timeout).
    delayed: Vec<(SimTime, u64, Box<pb::Health>)>,
    next_fence_check: SimTime,
    /// The agent's record of its mysqld's instances (the real `InstanceTrack`), fed by its
    /// polls every 100 ms.
    instance: InstanceTrack,
    /// Its latest probe of the record's primary's mysqld.
    probe: Option<pb::PrimaryProbe>,
    /// The statements of an action still to run, one at a time, and the RPC answered after
    /// the last one.
    script: Option<Script>,
    /// What the last Demote changed (the real agent's `DemoteMemo`), for UndoDemote; cleared
    /// by a promotion or a repoint.
    demote: Option<DemoteMemo>,
    /// The health the agent last published (the real publication rule,
    /// [`myha_agent::health::push_due`]) and when its stream last sent one: the stream sends
    /// each publication and re-sends the current one every `health_interval`.
    published: Option<Box<pb::Health>>,
    last_sent: SimTime,
}

/// The agent's `health_interval` (its default): the publication rule's refresh and the
/// stream's re-send period.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// An action whose statements take their time: each a round trip to mysqld (or, for the
/// promotion's history record, to etcd).
#[derive(Debug, Clone)]
struct Script {
    rpc: u64,
    term: Term,
    /// The next statement runs then.
    next_at: SimTime,
    stmts: VecDeque<Stmt>,
    /// Its success makes the tablet a primary under `term`.
    promotes: bool,
}

#[derive(Debug, Clone, Copy)]
enum Stmt {
    ReadOnly(bool),
    SemiSyncPrimary(bool),
}

/// How often one recovery (problem code and tablet) may start once the faults are over.
const MAX_REPEATS_WHEN_QUIET: usize = 5;

/// One statement's round trip.
const STATEMENT: Duration = Duration::from_millis(1);

/// The simulated shard.
pub struct ShardSim {
    cfg: ShardSimConfig,
    now: SimTime,
    servers: BTreeMap<ServerId, Server>,
    agents: BTreeMap<ServerId, Agent>,
    tablets: BTreeMap<String, TabletRecord>,
    repl: Network<Message>,
    rpc: Network<Rpc>,
    record: ShardRecord,
    /// The record's etcd `mod_revision` (bumped by every write).
    /// The gateway's routing bounds (its defaults).
    gateway_policy: myha_gateway::routing::RoutingPolicy,
    /// Every recovery the engine started: when, and its problem code and tablet.
    pub(crate) recoveries: Vec<(SimTime, String)>,
    /// The shard's promotion history (`topo`'s create-only `PromotionRecord`s), written by
    /// the agents as they promote, read by the orchestrator's errant checks.
    pub(crate) history: BTreeMap<Term, topo::PromotionRecord>,
    record_revision: i64,
    recovery: RecoveryConfig,
    orch: orchestrator::Orch,
    next_rpc: u64,
    faults: VecDeque<(SimTime, Fault)>,
    // The writer.
    next_write: WriteId,
    next_write_at: SimTime,
    /// Acknowledged writes: id -> (server, semi-sync, at).
    acked: BTreeMap<WriteId, (ServerId, bool, SimTime)>,
    last_ack: SimTime,
    late_acks: Vec<(WriteId, ServerId, Term, SimTime)>,
    primary_failures: usize,
    /// When the first primary failure was injected.
    first_primary_failure: Option<SimTime>,
    /// When each server last came back (thawed or restarted).
    resumed: BTreeMap<ServerId, SimTime>,
    /// When each server's mysqld last (re)started (absent: since the beginning).
    started: BTreeMap<ServerId, SimTime>,
    /// Agents cut from their own mysqld.
    agent_mysql_cut: BTreeSet<ServerId>,
    /// When each server was last unable to serve (down, frozen or isolated).
    last_unavailable: BTreeMap<ServerId, SimTime>,
    report: RunReport,
    /// When the current episode of two writable primaries started (reported once).
    two_primaries_since: Option<SimTime>,
    /// When the current window of an unfenceable deposed primary started.
    unfenceable_since: Option<SimTime>,
    /// Servers writable without lossless semi-sync, as last reported (once per window).
    not_lossless: BTreeSet<ServerId>,
    /// The shard record as the watches show it (see [`ShardSimConfig::watch_delay`]), and the
    /// writes still on their way to them.
    watched: ShardRecord,
    watch_queue: VecDeque<(SimTime, ShardRecord)>,
    watch_rng: StdRng,
    /// Errant transactions injected: write id, the server they were committed on, and when.
    errant: Vec<(WriteId, ServerId, SimTime)>,
    /// The orchestrator process is dead ([`Fault::CrashOrchestrator`]).
    orch_down: bool,
    /// A dead orchestrator's shard lock lives until its lease expires.
    pub(crate) lock_free_at: SimTime,
}

/// Errant writes' ids start here, apart from the writer's (whose acknowledgements count).
const ERRANT_BASE: WriteId = 1 << 40;

fn alias(id: ServerId) -> String {
    format!("zone1-{id}")
}

/// A server's host address.
fn host(id: ServerId) -> String {
    format!("10.{}.{}.{}", id / 65_536, (id / 256) % 256, id % 256)
}

fn server_of(alias: &str) -> Option<ServerId> {
    alias.strip_prefix("zone1-")?.parse().ok()
}

fn ms(t: SimTime) -> u64 {
    t.as_millis()
}

/// The wall clock (ms since the epoch) at virtual time zero, as the agents and the orchestrator
/// read it; the mysqlds started this long before.
const WALL_BASE_MS: u64 = 1_800_000_000_000;
const FIRST_START_AGO_MS: u64 = 3_600_000;

/// The wall clock at `t`.
fn wall(t: SimTime) -> u64 {
    WALL_BASE_MS + ms(t)
}

/// The wall clock (ms since the epoch) at `t`, as the simulated hosts read it.
pub(crate) fn wall_ms(t: SimTime) -> u64 {
    wall(t)
}

impl ShardSim {
    /// A shard of `cfg.tablets` tablets (101 primary, the rest replicas, all replicating with
    /// semi-sync under that durability) and its seeded fault schedule.
    pub fn new(cfg: ShardSimConfig) -> ShardSim {
        ShardSim::build(cfg, None)
    }

    /// One shard of a fleet whose one engine measures time from `base`.
    pub(crate) fn in_fleet(cfg: ShardSimConfig, base: Instant) -> ShardSim {
        ShardSim::build(cfg, Some(base))
    }

    fn build(cfg: ShardSimConfig, base: Option<Instant>) -> ShardSim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let semi = cfg.durability == Durability::SemiSync;
        let first = cfg.first_id();
        let shard_name = cfg.shard_name();
        let ids: Vec<ServerId> = (first..first + cfg.tablets).collect();
        let mut servers = BTreeMap::new();
        let mut agents = BTreeMap::new();
        let mut tablets = BTreeMap::new();
        for &id in &ids {
            let mut c = ServerConfig::new(id, 0);
            c.semi_sync_slave = semi;
            c.slave_net_timeout = Duration::from_secs(2);
            // A slow applier on some replicas, so that what they received and what they applied
            // differ when the primary fails.
            if id != first && rng.random_bool(0.4) {
                c.apply_delay = Duration::from_micros(rng.random_range(4_000..9_000));
            }
            c.heartbeat_period = Duration::from_millis(500);
            c.semi_sync_master = SemiSyncMaster {
                enabled: false,
                wait_for_slave_count: 1,
                timeout: SemiSyncTimeout::Never,
            };
            servers.insert(id, Server::new(c, SimTime::ZERO));
            let a = alias(id);
            agents.insert(
                id,
                Agent {
                    alias: a.clone(),
                    server: id,
                    terms: TermState {
                        known_term: Term::new(1),
                        promoted_term: if id == first {
                            Term::new(1)
                        } else {
                            Term::ZERO
                        },
                        known_epoch: 0,
                    },
                    waits: Vec::new(),
                    delayed: Vec::new(),
                    next_fence_check: SimTime::ZERO,
                    instance: InstanceTrack::default(),
                    probe: None,
                    script: None,
                    demote: None,
                    published: None,
                    last_sent: SimTime::ZERO,
                },
            );
            tablets.insert(
                a.clone(),
                TabletRecord {
                    alias: a,
                    cell: "zone1".into(),
                    uid: id,
                    keyspace: "ks".into(),
                    shard: shard_name.clone(),
                    tablet_type: if id == first {
                        TabletType::Primary
                    } else {
                        TabletType::Replica
                    },
                    mysql_host: host(id),
                    mysql_port: 3306,
                    mysql_socket: None,
                    grpc_addr: format!("{}:16000", host(id)),
                    http_addr: None,
                    promotion_rule: PromotionRule::Neutral,
                    registered_ms: 0,
                },
            );
        }
        // The initial topology, as a bootstrap leaves it.
        let now = SimTime::ZERO;
        if let Some(p) = servers.get_mut(&first) {
            let _ = p.set_read_only(false, now);
            if semi {
                let _ = p.set_semi_sync_master(
                    SemiSyncMaster {
                        enabled: true,
                        wait_for_slave_count: 1,
                        timeout: SemiSyncTimeout::Never,
                    },
                    now,
                );
            }
        }
        for &id in &ids[1..] {
            if let Some(s) = servers.get_mut(&id) {
                let mut m = MasterConfig::new(first);
                if let Some((_, delay)) = cfg.delayed_replica.filter(|(r, _)| *r == id) {
                    m.master_delay = delay;
                }
                let _ = s.change_master(m, now);
                let _ = s.start_slave(now);
            }
        }
        let mut record = ShardRecord::new("ks", shard_name.clone());
        record.primary = Some(alias(first));
        record.term = Term::new(1);
        record.reserved_term = Term::new(1);

        let repl_link = LinkConfig {
            delay: Duration::from_micros(300),
            jitter: Duration::from_micros(rng.random_range(0..=400)),
            loss: if rng.random_bool(0.3) { 0.002 } else { 0.0 },
        };
        let rpc_link = LinkConfig {
            delay: Duration::from_micros(rng.random_range(200..=2_000)),
            jitter: Duration::from_micros(rng.random_range(0..=1_000)),
            loss: 0.0,
        };
        let mut repl = Network::new(rng.random(), repl_link)
            .unwrap_or_else(|e| unreachable!("a loss in 0..=1 is valid: {e}"));
        // Replicas at different distances from the first primary, so that what they received
        // differs when it fails.
        for &id in &ids[1..] {
            let link = LinkConfig {
                delay: Duration::from_micros(rng.random_range(300..4_000)),
                ..repl_link
            };
            repl.set_link_both(first, id, link)
                .unwrap_or_else(|e| unreachable!("a loss in 0..=1 is valid: {e}"));
        }
        let rpc = Network::new(rng.random(), rpc_link)
            .unwrap_or_else(|e| unreachable!("a loss of 0 is valid: {e}"));
        let faults = schedule(&cfg, &mut rng, &ids);
        let recovery = RecoveryConfig {
            relay_log_wait: Duration::from_secs(5),
            // A dead orchestrator's lock outlives it this long (the real default is 5 s; 2 s
            // leaves the runs room to converge after a crash late in the schedule).
            lock_ttl: Duration::from_secs(2),
            ..RecoveryConfig::default()
        };
        let mut sim = ShardSim {
            now,
            servers,
            agents,
            tablets,
            repl,
            rpc,
            record: record.clone(),
            orch: orchestrator::Orch::new(&cfg, &recovery, base),
            recovery,
            record_revision: 1,
            history: BTreeMap::new(),
            recoveries: Vec::new(),
            gateway_policy: myha_gateway::config::RoutingSection::default().policy(),
            next_rpc: 0,
            faults: faults.into(),
            next_write: 1,
            next_write_at: SimTime::from_millis(50),
            acked: BTreeMap::new(),
            last_ack: SimTime::ZERO,
            late_acks: Vec::new(),
            primary_failures: 0,
            first_primary_failure: None,
            resumed: BTreeMap::new(),
            started: BTreeMap::new(),
            agent_mysql_cut: BTreeSet::new(),
            last_unavailable: BTreeMap::new(),
            report: RunReport::default(),
            two_primaries_since: None,
            unfenceable_since: None,
            not_lossless: BTreeSet::new(),
            watched: record.clone(),
            watch_queue: VecDeque::new(),
            watch_rng: StdRng::seed_from_u64(cfg.seed ^ 0x3a7c_4e11),
            errant: Vec::new(),
            orch_down: false,
            lock_free_at: SimTime::ZERO,
            cfg,
        };
        // The bootstrap's promotion of the first primary, at the empty position.
        sim.history.insert(
            Term::new(1),
            topo::PromotionRecord {
                keyspace: "ks".into(),
                shard: sim.cfg.shard_name(),
                term: Term::new(1),
                primary: alias(first),
                writer: first.to_string(),
                position: String::new(),
                at_ms: wall(SimTime::ZERO),
                by: "bootstrap".into(),
                lock_epoch: 0,
                self_demotes: false,
            },
        );
        // In a fleet the agents' polls are not in step (each started at its own moment).
        if base.is_some() {
            for (id, a) in sim.agents.iter_mut() {
                let phase = (u64::from(*id).wrapping_mul(2_654_435_761) >> 11) % 100;
                a.next_fence_check = SimTime::from_millis(phase);
            }
        }
        sim.flush_outputs();
        sim
    }

    /// The fault schedule this run injects.
    pub fn faults(&self) -> Vec<(SimTime, Fault)> {
        self.faults.iter().copied().collect()
    }

    /// The same run (same seed, same links, same appliers) with another fault schedule: a
    /// shrunk or hand-written one.
    pub fn with_faults(mut self, mut faults: Vec<(SimTime, Fault)>) -> ShardSim {
        faults.sort_by_key(|(t, _)| *t);
        self.faults = faults.into();
        self
    }

    /// Runs to the horizon and checks the end-of-run invariants.
    pub fn run(mut self) -> RunReport {
        mutants::set(self.cfg.mutant);
        let end = SimTime::ZERO + self.cfg.horizon;
        while self.now < end {
            self.now += TICK;
            self.step();
        }
        self.finish();
        self.report.acked = self.acked.len();
        self.report.final_term = self.record.term.get();
        mutants::set(None);
        self.report
    }

    /// One tick of virtual time (a fleet drives its shards this way).
    pub(crate) fn advance(&mut self) {
        self.now += TICK;
        self.step();
    }

    /// The end-of-run invariants and the report (after the last [`ShardSim::advance`]).
    pub(crate) fn conclude(mut self) -> RunReport {
        self.finish();
        self.report.acked = self.acked.len();
        self.report.final_term = self.record.term.get();
        self.report
    }

    pub(crate) fn now(&self) -> SimTime {
        self.now
    }

    pub(crate) fn record(&self) -> &ShardRecord {
        &self.record
    }

    pub(crate) fn recovery_config(&self) -> &RecoveryConfig {
        &self.recovery
    }

    /// Real time this shard's decision code took (see the orchestrator module).
    pub(crate) fn decision_time(&self) -> Duration {
        self.orch.decision
    }

    /// The engine's inputs this shard left for the fleet's engine.
    pub(crate) fn take_engine_inputs(&mut self) -> Vec<myha_orchestrator::engine::Input> {
        std::mem::take(&mut self.orch.outbox)
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.report.violations.push(Violation {
            at: self.now,
            invariant,
            detail,
        });
    }

    fn trace(&mut self, what: String) {
        let line = format!("{:>6} ms  {what}", ms(self.now));
        self.report.trace.push(line);
    }

    fn step(&mut self) {
        let now = self.now;
        while self.faults.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, f)) = self.faults.pop_front() {
                self.inject(f);
            }
        }
        while self.watch_queue.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, r)) = self.watch_queue.pop_front() {
                self.watched = r;
            }
        }
        for s in self.servers.values_mut() {
            s.handle_timeout(now);
        }
        // A server is unavailable while it is down, frozen or isolated, or while no running
        // server can reach it (the replicas cannot tell that from its isolation).
        for (id, s) in &self.servers {
            let reached = self.servers.values().any(|o| {
                o.id() != *id
                    && o.process_state() == ProcessState::Running
                    && self.repl.is_connected(*id, o.id())
                    && self.repl.is_connected(o.id(), *id)
            });
            if s.process_state() != ProcessState::Running || !reached {
                self.last_unavailable.insert(*id, now);
            }
        }
        while let Some((from, to, m)) = self.repl.poll_deliver(now) {
            if let Some(s) = self.servers.get_mut(&to) {
                s.handle(Input::Message { from, message: m }, now);
            }
        }
        self.flush_outputs();
        while let Some((_, to, m)) = self.rpc.poll_deliver(now) {
            if to == ORCHESTRATOR {
                match m {
                    Rpc::Response { id, body } => self.orchestrator_response(id, body),
                    Rpc::Health(h) => self.orchestrator_health(h),
                    Rpc::Request { .. } => {}
                }
            } else if let Rpc::Request {
                id,
                term,
                timeout,
                body,
            } = m
            {
                self.agent_request(to - AGENT_NODE, id, term, timeout, body);
            }
        }
        self.agents_tick();
        self.flush_outputs();
        self.orchestrator_tick();
        self.writer_tick();
        self.flush_outputs();
        self.check_one_primary();
        self.check_lossless();
    }

    /// A write of the shard record to etcd: the next reads see it at once, the watches
    /// after their delay (in write order).
    pub(crate) fn write_record(&mut self, record: ShardRecord) {
        self.record = record.clone();
        self.record_revision += 1;
        let delay = if self.cfg.watch_delay.is_zero() {
            Duration::ZERO
        } else {
            let max = u64::try_from(self.cfg.watch_delay.as_micros()).unwrap_or(u64::MAX);
            Duration::from_micros(self.watch_rng.random_range(0..=max))
        };
        let after = self.watch_queue.back().map_or(self.now, |(t, _)| *t);
        let at = (self.now + delay).max(after);
        if at <= self.now {
            self.watched = record;
        } else {
            self.watch_queue.push_back((at, record));
        }
    }

    // ----- Faults -----

    fn inject(&mut self, f: Fault) {
        let now = self.now;
        self.trace(format!("fault {f}"));
        let primary = self.record.primary.as_deref().and_then(server_of);
        match f {
            Fault::Crash(id) => {
                if Some(id) == primary {
                    self.primary_failures += 1;
                    self.first_primary_failure.get_or_insert(now);
                }
                if let Some(s) = self.servers.get_mut(&id) {
                    let _ = s.crash(now);
                }
                if let Some(a) = self.agents.get_mut(&id) {
                    a.waits.clear();
                }
            }
            Fault::Restart(id) => {
                if let Some(s) = self.servers.get_mut(&id) {
                    // Replication starts again where it was configured (skip-slave-start off).
                    let _ = s.restart(now, true);
                }
                self.resumed.insert(id, now);
                self.started.insert(id, now);
            }
            Fault::Freeze(id) => {
                if Some(id) == primary {
                    self.primary_failures += 1;
                    self.first_primary_failure.get_or_insert(now);
                }
                if let Some(s) = self.servers.get_mut(&id) {
                    let _ = s.freeze(now);
                }
            }
            Fault::Thaw(id) => {
                if let Some(s) = self.servers.get_mut(&id) {
                    let _ = s.thaw(now);
                }
                self.resumed.insert(id, now);
            }
            Fault::CutAgent(id) => self.rpc.partition(ORCHESTRATOR, AGENT_NODE + id),
            Fault::HealAgent(id) => self.rpc.heal(ORCHESTRATOR, AGENT_NODE + id),
            Fault::CutReplication(id) => self.repl.partition(self.cfg.first_id(), id),
            Fault::HealReplication(id) => self.repl.heal(self.cfg.first_id(), id),
            Fault::IsolateServer(id) => self.repl.isolate(id),
            Fault::RejoinServer(id) => self.repl.rejoin(id),
            Fault::CutAgentMysql(id) => {
                self.agent_mysql_cut.insert(id);
            }
            Fault::HealAgentMysql(id) => {
                self.agent_mysql_cut.remove(&id);
            }
            Fault::Switchover if self.orch_down => {
                self.trace("operator: no orchestrator answers".into());
                self.report.switchover_refusals += 1;
            }
            Fault::Switchover => self.operator_switchover(),
            Fault::ErrantWrite(id) if Some(id) == primary => {
                // On the primary the same write is an ordinary one (the writer's own are).
                self.trace(format!("{id} is the primary now: no errant write"));
            }
            Fault::ErrantWrite(id) => {
                let w = ERRANT_BASE + self.errant.len() as WriteId;
                self.errant.push((w, id, now));
                self.report.errant_writes += 1;
                if let Some(s) = self.servers.get_mut(&id) {
                    s.handle(Input::SuperWrite { write_id: w }, now);
                }
            }
            Fault::CrashOrchestrator => {
                if !self.orch_down {
                    self.orch_down = true;
                    let held = self.orchestrator_crashed();
                    if held {
                        self.report.crashes_holding_lock += 1;
                    } else {
                        self.report.crashes_otherwise += 1;
                    }
                    if held {
                        self.lock_free_at = now + self.recovery.lock_ttl;
                        self.trace(format!(
                            "the dead orchestrator's shard lock lives until {} ms",
                            ms(self.lock_free_at)
                        ));
                    }
                }
            }
            Fault::RestartOrchestrator => {
                if self.orch_down {
                    self.orch_down = false;
                    self.orchestrator_restarted();
                }
            }
        }
        self.flush_outputs();
    }

    // ----- Servers' outputs -----

    fn flush_outputs(&mut self) {
        let now = self.now;
        let mut acks = Vec::new();
        for (id, s) in self.servers.iter_mut() {
            while let Some(o) = s.poll_output() {
                match o {
                    Output::Send { to, message } => {
                        self.repl.send(*id, to, message, now);
                    }
                    Output::Ack {
                        write_id,
                        semi_sync,
                        at,
                        ..
                    } if write_id < ERRANT_BASE => acks.push((write_id, *id, semi_sync, at)),
                    Output::Ack { .. } => {}
                    Output::WriteFailed { .. } => {}
                }
            }
        }
        for (write_id, id, semi_sync, at) in acks {
            let own = self
                .agents
                .get(&id)
                .map_or(Term::ZERO, |a| a.terms.promoted_term);
            // Under durability none a deposed primary that comes back commits what its
            // clients had sent until its agent fences it: the mode's window, not a violation.
            let resumed = self.resumed.get(&id).copied().unwrap_or(SimTime::ZERO);
            let in_window = self.cfg.durability == Durability::None
                && at.saturating_since(resumed) <= self.cfg.fence_window;
            if self.record.term > own && !in_window {
                self.late_acks.push((write_id, id, self.record.term, at));
            }
            self.acked.insert(write_id, (id, semi_sync, at));
            self.last_ack = self.last_ack.max(at);
        }
    }

    // ----- The writer -----

    /// A client write every `write_every` through the gateway: where the gateway's real routing
    /// function ([`myha_gateway::routing::route`], default policy) sends writes now, over the
    /// shard as the watches show it (the gateway follows the same record and health streams as
    /// the orchestrator). No write while it has nowhere to route them (the gateway holds
    /// them).
    fn writer_tick(&mut self) {
        if self.now < self.next_write_at {
            return;
        }
        self.next_write_at = self.now + self.cfg.write_every;
        let view = self.shard_view();
        let at = self.orch.instant(self.now);
        let routed = myha_gateway::routing::route(&view, at, &self.gateway_policy).rw;
        let Some(p) = routed.ok().and_then(|t| server_of(&t.alias)) else {
            return;
        };
        let id = self.next_write;
        self.next_write += 1;
        let now = self.now;
        if let Some(s) = self.servers.get_mut(&p) {
            s.handle(Input::ClientWrite { write_id: id }, now);
        }
    }

    // ----- Invariants -----

    /// A tablet can complete a commit: running, writable, and under semi-sync with a
    /// semi-sync replica connected to it.
    fn can_commit(&self, id: ServerId) -> bool {
        let Some(s) = self.servers.get(&id) else {
            return false;
        };
        if s.process_state() != ProcessState::Running {
            return false;
        }
        let st = s.snapshot();
        if st.read_only {
            return false;
        }
        if !(st.semi_sync_master.enabled && st.semi_sync_master_active) {
            return true;
        }
        self.servers.values().any(|r| {
            r.id() != id && r.process_state() == ProcessState::Running && {
                let rs = r.snapshot();
                rs.semi_sync_slave
                    && rs
                        .slave
                        .as_ref()
                        .is_some_and(|sl| sl.source == id && sl.io_running == IoRunning::Yes)
                    && self.repl.is_connected(id, r.id())
                    && self.repl.is_connected(r.id(), id)
            }
        })
    }

    fn check_one_primary(&mut self) {
        let mut able: Vec<ServerId> = self
            .servers
            .keys()
            .copied()
            .filter(|id| self.can_commit(*id))
            .collect();
        // Known gap (durability none only): a deposed primary whose own agent cannot reach
        // its mysqld while mysqld serves its clients cannot be fenced by that agent, and the
        // emergency reparent, which saw the agent answer, relied on it. The window is counted
        // and traced, not a violation, while the agent stays cut off; once it reaches its
        // mysqld again the fence window applies as usual.
        if self.cfg.durability == Durability::None && able.len() > 1 {
            let record = self.record.primary.as_deref().and_then(server_of);
            let unfenceable: Vec<ServerId> = able
                .iter()
                .copied()
                .filter(|id| Some(*id) != record && self.agent_mysql_cut.contains(id))
                .collect();
            if !unfenceable.is_empty() {
                if self.unfenceable_since.is_none() {
                    self.unfenceable_since = Some(self.now);
                    self.report.unfenceable_windows += 1;
                    self.trace(format!(
                        "deposed {unfenceable:?} writable while its agent cannot reach its mysqld (known gap, durability none)"
                    ));
                }
                able.retain(|id| !unfenceable.contains(id));
                // The fence window restarts when the agent gets its mysqld back.
                self.two_primaries_since = None;
            } else {
                self.unfenceable_since = None;
            }
        }
        if able.len() > 1 {
            let since = *self.two_primaries_since.get_or_insert(self.now);
            let window = match self.cfg.durability {
                Durability::SemiSync => Duration::ZERO,
                Durability::None => self.cfg.fence_window,
            };
            if self.now - since == window {
                self.violate(
                    "two primaries",
                    format!(
                        "tablets {able:?} can all complete commits (record: {:?} at term {})",
                        self.record.primary, self.record.term
                    ),
                );
            }
        } else {
            self.two_primaries_since = None;
        }
    }

    /// Under semi-sync no running tablet is writable without its semi-sync primary side on and
    /// waiting for an ack without end (reported once per window and tablet).
    fn check_lossless(&mut self) {
        if self.cfg.durability != Durability::SemiSync {
            return;
        }
        let now = self.now;
        let unsafe_now: BTreeSet<ServerId> = self
            .servers
            .iter()
            .filter(|(_, s)| s.process_state() == ProcessState::Running)
            .filter(|(_, s)| {
                let st = s.snapshot();
                let lossless = st.semi_sync_master.enabled
                    && st.semi_sync_master.timeout == SemiSyncTimeout::Never;
                !st.read_only && !lossless
            })
            .map(|(id, _)| *id)
            .collect();
        let new: Vec<ServerId> = unsafe_now.difference(&self.not_lossless).copied().collect();
        for id in new {
            self.violate(
                "lossless while writable",
                format!(
                    "server {id} is writable at {} ms with its semi-sync primary side off (or able to fall back to async): commits on it are acknowledged without any replica",
                    ms(now)
                ),
            );
        }
        self.not_lossless = unsafe_now;
    }

    /// Every write acknowledged with semi-sync is on `primary`.
    fn check_no_loss(&mut self, primary: ServerId, when: &str) {
        if self.cfg.durability != Durability::SemiSync {
            return;
        }
        let Some(p) = self.servers.get(&primary) else {
            return;
        };
        let lost: Vec<WriteId> = self
            .acked
            .iter()
            .filter(|(_, (_, semi, _))| *semi)
            .map(|(w, _)| *w)
            .filter(|w| !p.holds(*w))
            .collect();
        if !lost.is_empty() {
            let n = lost.len();
            let first: Vec<WriteId> = lost.into_iter().take(5).collect();
            self.violate(
                "lost write",
                format!(
                    "{when}: {n} acknowledged write(s) not on primary {primary}, first {first:?}"
                ),
            );
        }
    }

    /// No primary holds an errant transaction (scenarios P9, R10: a replica with one is kept
    /// out of promotion; the writes it holds would replicate to every tablet, and whatever
    /// the primary wrote at the same sequence numbers would break its replicas).
    pub(crate) fn check_no_errant_primary(&mut self, primary: ServerId, when: &str) {
        let Some(p) = self.servers.get(&primary) else {
            return;
        };
        let held: Vec<(WriteId, ServerId)> = self
            .errant
            .iter()
            .filter(|(w, _, _)| p.holds(*w))
            .map(|(w, s, _)| (*w, *s))
            .collect();
        if !held.is_empty() {
            self.violate(
                "errant primary",
                format!(
                    "{when}: primary {primary} holds errant transaction(s) {held:?} (write id, server)"
                ),
            );
        }
    }

    /// A reparent that deposes the record's primary, decided at `decided`, must have had a
    /// reason: the primary's mysqld was down, frozen, or out of every running server's reach
    /// at some point from a second before the decision until now (scenarios P5, P6: a primary only the orchestrator, or only
    /// its own agent, cannot see is not failed over).
    fn check_needless_failover(&mut self, decided: SimTime) {
        let Some(p) = self.record.primary.as_deref().and_then(server_of) else {
            return;
        };
        let since = decided.saturating_sub(Duration::from_secs(1));
        let unavailable = self.last_unavailable.get(&p).is_some_and(|t| *t >= since);
        if !unavailable {
            self.violate(
                "needless failover",
                format!(
                    "primary {p} was running and reachable from {} ms to {} ms, and is deposed",
                    ms(since),
                    ms(self.now)
                ),
            );
        }
    }

    /// Why the shard need not converge: under semi-sync with K = 1 a primary that stays down
    /// plus a replica whose mysqld restarted after the primary failed (its relay log, possibly
    /// the only copy of acknowledged writes, discarded) is a double failure; refusing to
    /// promote is the lossless answer, and an operator may force it.
    fn convergence_waiver(&self) -> Option<String> {
        let failed = self.first_primary_failure?;
        let p = self.record.primary.as_deref().and_then(server_of)?;
        if self.servers.get(&p)?.process_state() != ProcessState::Down {
            return None;
        }
        if self.cfg.durability != Durability::SemiSync {
            // An errant write on a replica after the primary failed, typically on the
            // candidate while it still applies its relay log: its SQL thread stops on the
            // dead primary's transaction at the same sequence number (error 1950), so it can
            // never apply what it received, and the reparent refuses rather than promote a
            // less advanced tablet. The emergency reparent's errant check compares positions,
            // which this write hides behind the dead primary's higher sequence numbers.
            let late: BTreeSet<ServerId> = self
                .errant
                .iter()
                .filter(|(_, _, t)| *t >= failed)
                .map(|(_, s, _)| *s)
                .collect();
            return (!late.is_empty()).then(|| {
                format!(
                    "primary {p} stays down and {late:?} took errant transactions after it failed at {} ms (a double failure: refusing beats promoting a less advanced tablet)",
                    ms(failed)
                )
            });
        }
        let restarted: Vec<ServerId> = self
            .started
            .iter()
            .filter(|(id, t)| **id != p && **t >= failed)
            .map(|(id, _)| *id)
            .collect();
        if !restarted.is_empty() {
            return Some(format!(
                "primary {p} stays down and {restarted:?} restarted after it failed at {} ms (a double failure K = 1 does not survive without risking acknowledged writes)",
                ms(failed)
            ));
        }
        // A replica with errant transactions is never promoted, and what it received (and
        // acknowledged) may be beyond every other replica: refusing is the lossless answer.
        let errant: BTreeSet<ServerId> = self.errant.iter().map(|(_, s, _)| *s).collect();
        (!errant.is_empty()).then(|| {
            format!(
                "primary {p} stays down and {errant:?} took errant transactions (never promoted; a double failure K = 1 does not survive without risking acknowledged writes)"
            )
        })
    }

    fn finish(&mut self) {
        let primary = self.record.primary.as_deref().and_then(server_of);
        if let Some(p) = primary {
            self.check_no_loss(p, "end of run");
            self.check_no_errant_primary(p, "end of run");
            let late: Vec<_> = self
                .late_acks
                .iter()
                .filter(|(w, _, _, _)| self.servers.get(&p).is_some_and(|s| !s.holds(*w)))
                .cloned()
                .collect();
            for (w, id, term, at) in late {
                self.violate(
                    "late acknowledgement",
                    format!(
                        "write {w} acknowledged by {id} at {} ms after term {term} was recorded, and not on the primary {p}",
                        ms(at)
                    ),
                );
            }
        }
        let quiet_from = SimTime::ZERO + self.cfg.horizon.saturating_sub(self.cfg.quiet);
        let deadline = quiet_from + self.cfg.converge_within;
        let waiver = self.convergence_waiver();
        if self.last_ack < deadline.min(self.now) && self.now >= deadline && waiver.is_some() {
            let why = waiver.unwrap_or_default();
            self.trace(format!("convergence not required: {why}"));
        } else if self.last_ack < deadline.min(self.now) && self.now >= deadline {
            let last = ms(self.last_ack);
            self.violate(
                "convergence",
                format!(
                    "no write acknowledged since {last} ms; faults stopped at {} ms (record: {:?} at term {})",
                    ms(quiet_from),
                    self.record.primary,
                    self.record.term
                ),
            );
        }
        // A remedy the engine starts again and again once the faults are over never fixes what
        // it is for (say, a replica restarted into the same replication error every pass).
        let mut again: BTreeMap<&str, usize> = BTreeMap::new();
        for (at, what) in &self.recoveries {
            if *at >= quiet_from {
                *again.entry(what.as_str()).or_default() += 1;
            }
        }
        let looping: Vec<String> = again
            .into_iter()
            .filter(|(_, n)| *n > MAX_REPEATS_WHEN_QUIET)
            .map(|(what, n)| format!("{what} {n} times"))
            .collect();
        if !looping.is_empty() {
            self.violate(
                "endless recovery",
                format!(
                    "after the faults stopped at {} ms: {}",
                    ms(quiet_from),
                    looping.join("; ")
                ),
            );
        }
        if self.report.reparents > self.primary_failures + 1 {
            self.violate(
                "endless recovery",
                format!(
                    "{} reparents for {} primary failures",
                    self.report.reparents, self.primary_failures
                ),
            );
        }
    }

    // ----- Agents -----

    fn send_to_orchestrator(&mut self, server: ServerId, id: u64, body: Response) {
        let now = self.now;
        self.rpc.send(
            AGENT_NODE + server,
            ORCHESTRATOR,
            Rpc::Response { id, body },
            now,
        );
    }

    fn health(&mut self, id: ServerId) -> (Box<pb::Health>, bool) {
        let now = self.now;
        let agent = self.agents.get(&id).cloned();
        let terms = agent.map(|a| a.terms).unwrap_or_default();
        // The agent's record is its watch's.
        let is_primary = self.watched.primary.as_deref() == Some(alias(id).as_str());
        let mut h = pb::Health {
            alias: alias(id),
            keyspace: "ks".into(),
            shard: self.cfg.shard_name(),
            cell: "zone1".into(),
            tablet_type: if is_primary {
                pb::TabletType::Primary
            } else {
                pb::TabletType::Replica
            } as i32,
            polled_at_ms: wall(now),
            term: terms.known_term.get(),
            promoted_term: terms.promoted_term.get(),
            etcd_connected: true,
            ..Default::default()
        };
        let instance = self
            .agents
            .get(&id)
            .map(|a| a.instance.clone())
            .unwrap_or_default();
        let started_at_ms = instance.started_at_ms;
        h.mysqld_outage_started_ms = instance.outage_started_ms;
        if !is_primary {
            h.primary_probe = self.agents.get(&id).and_then(|a| a.probe.clone());
        }
        if self.agent_mysql_cut.contains(&id) {
            h.mysql_error = "Lost connection to server during query (2013)".into();
            return (Box::new(h), false);
        }
        let Some(s) = self.servers.get_mut(&id) else {
            return (Box::new(h), false);
        };
        match s.status(now) {
            Ok(st) => {
                h.mysql_reachable = true;
                h.mysql = Some(pb::MysqlStatus {
                    gtid_position: st.gtid_current_pos.to_string(),
                    gtid_binlog_pos: st.gtid_binlog_pos.to_string(),
                    gtid_binlog_state: st.gtid_binlog_state.clone(),
                    gtid_slave_pos: st.gtid_slave_pos.to_string(),
                    server_id: id,
                    flavor: "mariadb".into(),
                    read_only: st.read_only,
                    started_at_ms,
                    ..Default::default()
                });
                h.replication = Some(match &st.slave {
                    Some(sl) => {
                        let source = self.tablets.get(&alias(sl.source));
                        pb::Replication {
                            configured: true,
                            source_host: source.map(|t| t.mysql_host.clone()).unwrap_or_default(),
                            source_port: source.map_or(0, |t| u32::from(t.mysql_port)),
                            gtid_io_pos: sl.gtid_io_pos.to_string(),
                            using_gtid: true,
                            io_state: match sl.io_running {
                                IoRunning::No => pb::ThreadState::Stopped,
                                IoRunning::Connecting => pb::ThreadState::Connecting,
                                IoRunning::Yes => pb::ThreadState::Running,
                            } as i32,
                            sql_state: if sl.sql_running {
                                pb::ThreadState::Running as i32
                            } else {
                                pb::ThreadState::Stopped as i32
                            },
                            last_io_errno: sl.last_io_error.as_ref().map_or(0, |e| e.code()),
                            last_io_error: sl
                                .last_io_error
                                .as_ref()
                                .map(|e| e.to_string())
                                .unwrap_or_default(),
                            last_sql_errno: u32::from(sl.last_sql_error.is_some()) * 1950,
                            last_sql_error: sl
                                .last_sql_error
                                .as_ref()
                                .map(|e| e.to_string())
                                .unwrap_or_default(),
                            seconds_behind: sl.seconds_behind_master,
                        }
                    }
                    None => pb::Replication::default(),
                });
                // As the agent measures it: the heartbeat row's age, where a source is set.
                if st.slave.is_some() {
                    h.lag_ms = st
                        .applied_commit_at
                        .map(|t| now.saturating_since(t).as_millis() as u64);
                }
                let master = st.semi_sync_master;
                h.semi_sync = Some(pb::SemiSync {
                    replica_enabled: st.semi_sync_slave,
                    primary_enabled: master.enabled,
                    primary_active: st.semi_sync_master_active,
                    primary_clients: st.semi_sync_master_clients as u32,
                    primary_timeout_ms: match master.timeout {
                        SemiSyncTimeout::Never => u64::from(u32::MAX),
                        SemiSyncTimeout::After(d) => d.as_millis() as u64,
                    },
                    wait_point: "AFTER_SYNC".into(),
                    wait_no_replica: Some(true),
                    ..Default::default()
                });
                (Box::new(h), false)
            }
            Err(AdminError::Frozen) => {
                h.mysql_error = "query timeout (mysqld does not answer)".into();
                (Box::new(h), true)
            }
            Err(e) => {
                h.mysql_error = e.to_string();
                (Box::new(h), false)
            }
        }
    }

    fn agent_request(
        &mut self,
        server: ServerId,
        id: u64,
        term: Term,
        timeout: Duration,
        body: Request,
    ) {
        match body {
            Request::FullStatus => {
                let (h, delayed) = self.health(server);
                if delayed {
                    // The agent's query waits for its timeout, then answers unreachable.
                    let at = self.now + Duration::from_millis(300);
                    if let Some(a) = self.agents.get_mut(&server) {
                        a.delayed.push((at, id, h));
                    }
                } else {
                    self.send_to_orchestrator(server, id, Response::Status(h));
                }
            }
            Request::Act(action) => {
                if matches!(*action, AgentAction::UndoDemote) {
                    self.trace(format!("agent {}: undo demote", alias(server)));
                }
                let r = self.agent_act(server, id, term, timeout, *action);
                if let Some(r) = r {
                    self.send_to_orchestrator(server, id, Response::Act(r));
                }
            }
        }
    }

    fn refused(code: tonic::Code, message: String) -> AgentError {
        AgentError {
            code,
            message,
            stale: None,
        }
    }

    /// Executes one action; `None` when it answers later (a wait).
    fn agent_act(
        &mut self,
        server: ServerId,
        id: u64,
        term: Term,
        timeout: Duration,
        action: AgentAction,
    ) -> Option<Result<pb::ActionResponse, AgentError>> {
        let now = self.now;
        let Some(agent) = self.agents.get_mut(&server) else {
            return Some(Err(Self::refused(tonic::Code::NotFound, "no agent".into())));
        };
        if let Err(stale) = agent.terms.admit(term, 1) {
            return Some(Err(AgentError {
                code: tonic::Code::FailedPrecondition,
                message: stale.to_string(),
                stale: Some(stale.refusal(1)),
            }));
        }
        let fence_remote = matches!(action, AgentAction::FenceServer { .. });
        if self.agent_mysql_cut.contains(&server) && !fence_remote {
            return Some(Err(Self::refused(
                tonic::Code::Unavailable,
                "mysqld: Lost connection to server during query (2013)".into(),
            )));
        }
        let Some(s) = self.servers.get_mut(&server) else {
            return Some(Err(Self::refused(
                tonic::Code::NotFound,
                "no server".into(),
            )));
        };
        let mysql = |e: AdminError| Self::refused(tonic::Code::Unavailable, format!("mysqld: {e}"));
        let r: Result<(), AgentError> = match &action {
            AgentAction::StopReplication { io_only: true } => s.stop_slave_io(now).map_err(mysql),
            AgentAction::StopReplication { io_only: false } => s.stop_slave(now).map_err(mysql),
            AgentAction::StartReplication { .. } => s.start_slave(now).map_err(mysql),
            AgentAction::WaitForPosition { position, .. }
            | AgentAction::ApplyReceived {
                received: position, ..
            } => {
                let target = match MariaDbPosition::parse(position) {
                    Ok(t) => t,
                    Err(e) => {
                        return Some(Err(Self::refused(
                            tonic::Code::InvalidArgument,
                            e.to_string(),
                        )))
                    }
                };
                // ApplyReceived lifts a replication delay first, as the agent's `lift_delay`
                // does: only with the IO thread stopped, then the SQL thread alone restarted
                // without the delay, the relay log kept.
                if matches!(action, AgentAction::ApplyReceived { .. }) {
                    let delayed = match s.status(now) {
                        Ok(st) => st.slave.filter(|sl| !sl.sql_delay.is_zero()),
                        Err(e) => return Some(Err(mysql(e))),
                    };
                    if let Some(sl) = delayed {
                        if sl.io_running != IoRunning::No {
                            return Some(Err(Self::refused(
                                tonic::Code::FailedPrecondition,
                                format!(
                                    "lifting the replication delay ({} ms) needs the IO thread stopped; it is {:?}",
                                    sl.sql_delay.as_millis(),
                                    sl.io_running
                                ),
                            )));
                        }
                        let lifted = s
                            .stop_slave(now)
                            .and_then(|_| s.lift_master_delay(now))
                            .and_then(|_| s.start_slave_sql(now));
                        if let Err(e) = lifted {
                            return Some(Err(mysql(e)));
                        }
                        self.report.delays_lifted += 1;
                    }
                }
                match s.status(now) {
                    Ok(_) => {
                        agent.waits.push(Wait {
                            id,
                            target,
                            deadline: now + timeout,
                            term,
                        });
                        return None;
                    }
                    Err(e) => Err(mysql(e)),
                }
            }
            AgentAction::SetReadOnly { read_only } => {
                s.set_read_only(*read_only, now).map_err(mysql)
            }
            AgentAction::SetReplicationSource {
                source,
                semi_sync,
                start_replication,
                ..
            } => {
                let src = server_of(&source.alias).unwrap_or(0);
                s.stop_slave(now)
                    .and_then(|_| s.set_semi_sync_slave(*semi_sync, now))
                    .and_then(|_| s.change_master(MasterConfig::new(src), now))
                    .and_then(|_| {
                        if *start_replication {
                            s.start_slave(now)
                        } else {
                            Ok(())
                        }
                    })
                    .map_err(mysql)
                    .map(|()| agent.demote = None)
            }
            AgentAction::ResetReplication => s
                .stop_slave(now)
                .and_then(|_| s.reset_slave_all(now))
                .map_err(mysql),
            AgentAction::SetSemiSync { primary, replica } => {
                let mut r = Ok(());
                if let Some(p) = primary {
                    r = r.and_then(|_| {
                        s.set_semi_sync_master(
                            SemiSyncMaster {
                                enabled: *p,
                                wait_for_slave_count: 1,
                                timeout: SemiSyncTimeout::Never,
                            },
                            now,
                        )
                    });
                }
                if let Some(on) = replica {
                    // As the agent does: the flag takes effect when the IO thread reconnects,
                    // so a running IO thread is stopped first and started again after.
                    let restart = s
                        .status(now)
                        .ok()
                        .and_then(|st| st.slave)
                        .is_some_and(|sl| sl.io_running != IoRunning::No);
                    if restart {
                        r = r.and_then(|_| s.stop_slave_io(now));
                    }
                    r = r.and_then(|_| s.set_semi_sync_slave(*on, now));
                    if restart {
                        r = r.and_then(|_| s.start_slave(now));
                    }
                }
                r.map_err(mysql)
            }
            AgentAction::Promote => {
                // As the agent does: refuse while the relay log holds unapplied transactions
                // (the reset would discard them), then stop and reset replication, semi-sync
                // per durability, writable.
                let semi = self.cfg.durability == Durability::SemiSync;
                match s.status(now) {
                    Ok(st)
                        if st.slave.as_ref().is_some_and(|sl| sl.relay_log_events > 0)
                            && !mutants::active(Mutant::PromoteBeforeApplied) =>
                    {
                        Err(Self::refused(
                            tonic::Code::FailedPrecondition,
                            "the relay log holds unapplied transactions: not promoted".into(),
                        ))
                    }
                    Ok(st) if mutants::active(Mutant::WritableBeforeSemiSync) => {
                        // Writable first; the semi-sync primary side and the answer after the
                        // history record write (see `agents_tick`).
                        let mut r = Ok(());
                        if st.slave.is_some() {
                            r = s.stop_slave(now).and_then(|_| s.reset_slave_all(now));
                        }
                        let r = r
                            .and_then(|_| s.set_semi_sync_slave(false, now))
                            .and_then(|_| s.set_read_only(false, now))
                            .map_err(mysql);
                        if r.is_ok() {
                            agent.demote = None;
                            agent.script = Some(Script {
                                rpc: id,
                                term,
                                next_at: now + PROMOTION_RECORD_WRITE,
                                stmts: [Stmt::SemiSyncPrimary(semi)].into(),
                                promotes: true,
                            });
                            return None;
                        }
                        r
                    }
                    Ok(st) => {
                        let mut r = Ok(());
                        if st.slave.is_some() {
                            r = s.stop_slave(now).and_then(|_| s.reset_slave_all(now));
                        }
                        r.and_then(|_| s.set_semi_sync_slave(false, now))
                            .and_then(|_| {
                                s.set_semi_sync_master(
                                    SemiSyncMaster {
                                        enabled: semi,
                                        wait_for_slave_count: 1,
                                        timeout: SemiSyncTimeout::Never,
                                    },
                                    now,
                                )
                            })
                            .and_then(|_| s.set_read_only(false, now))
                            .map_err(mysql)
                    }
                    Err(e) => Err(mysql(e)),
                }
                .map(|()| {
                    agent.terms.promoted_term = term;
                    agent.demote = None;
                })
            }
            AgentAction::Demote { .. } => match s.status(now) {
                Ok(st) => {
                    // A repeated Demote keeps what the first one saw.
                    agent.demote.get_or_insert(DemoteMemo {
                        read_only_before: st.read_only,
                        super_read_only_before: st.read_only,
                        semi_primary_before: st.semi_sync_master.enabled,
                    });
                    s.set_read_only(true, now).map_err(mysql)
                }
                Err(e) => Err(mysql(e)),
            },
            AgentAction::UndoDemote => {
                // As the agent does: only a demotion it made, undone by the real plan
                // (`DemoteMemo::undo_steps`), one statement at a time.
                let Some(memo) = agent.demote.clone() else {
                    return Some(Err(Self::refused(
                        tonic::Code::FailedPrecondition,
                        "no demotion to undo (none since the last promote or repoint)".into(),
                    )));
                };
                match s.status(now) {
                    Ok(st) => {
                        let stmts: VecDeque<Stmt> = memo
                            .undo_steps(st.semi_sync_master.enabled, false)
                            .into_iter()
                            .filter_map(|step| match step {
                                UndoStep::SemiSyncPrimaryOn => Some(Stmt::SemiSyncPrimary(true)),
                                UndoStep::ReadOnlyOff => Some(Stmt::ReadOnly(false)),
                                // MariaDB has no super_read_only (never planned for it).
                                UndoStep::SuperReadOnlyOff => None,
                            })
                            .collect();
                        agent.demote = None;
                        agent.script = Some(Script {
                            rpc: id,
                            term,
                            next_at: now,
                            stmts,
                            promotes: false,
                        });
                        return None;
                    }
                    Err(e) => Err(mysql(e)),
                }
            }
            AgentAction::FenceServer { target, .. } => {
                let r = server_of(target)
                    .and_then(|t| self.servers.get_mut(&t))
                    .map(|t| t.set_read_only(true, now));
                match r {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(mysql(e)),
                    None => Err(Self::refused(
                        tonic::Code::NotFound,
                        "no such server".into(),
                    )),
                }
            }
        };
        if r.is_ok() && matches!(action, AgentAction::Promote) {
            self.record_promotion(server, term);
        }
        Some(r.map(|()| self.action_response(server, term)))
    }

    /// The agent's history record of its promotion (create-only: one term, one tablet), with
    /// the position it became primary at.
    fn record_promotion(&mut self, server: ServerId, term: Term) {
        let now = self.now;
        let position = match self.servers.get_mut(&server).map(|s| s.status(now)) {
            Some(Ok(st)) => st.gtid_current_pos.to_string(),
            _ => return,
        };
        self.history.entry(term).or_insert(topo::PromotionRecord {
            keyspace: "ks".into(),
            shard: self.cfg.shard_name(),
            term,
            primary: alias(server),
            writer: server.to_string(),
            position,
            at_ms: wall(now),
            by: "orchestrator@sim".into(),
            lock_epoch: 1,
            self_demotes: false,
        });
    }

    fn action_response(&mut self, server: ServerId, term: Term) -> pb::ActionResponse {
        let now = self.now;
        let (pos, received) = match self.servers.get_mut(&server).map(|s| s.status(now)) {
            Some(Ok(st)) => (
                st.gtid_current_pos.to_string(),
                st.slave
                    .map(|sl| sl.gtid_io_pos.to_string())
                    .unwrap_or_default(),
            ),
            _ => (String::new(), String::new()),
        };
        pb::ActionResponse {
            term: term.get(),
            gtid_position: pos,
            gtid_received: received,
            ..Default::default()
        }
    }

    /// The next statement of the agent's script when it is due; the answer after the last (or
    /// after the first that fails).
    fn run_script(&mut self, id: ServerId) {
        let now = self.now;
        let Some(script) = self.agents.get_mut(&id).and_then(|a| a.script.as_mut()) else {
            return;
        };
        if script.next_at > now {
            return;
        }
        let stmt = script.stmts.pop_front();
        script.next_at = now + STATEMENT;
        let mut r = Ok(());
        if let Some(stmt) = stmt {
            r = match self.servers.get_mut(&id) {
                Some(s) => match stmt {
                    Stmt::ReadOnly(on) => s.set_read_only(on, now),
                    Stmt::SemiSyncPrimary(on) => s.set_semi_sync_master(
                        SemiSyncMaster {
                            enabled: on,
                            wait_for_slave_count: 1,
                            timeout: SemiSyncTimeout::Never,
                        },
                        now,
                    ),
                }
                .map_err(|e| Self::refused(tonic::Code::Unavailable, format!("mysqld: {e}"))),
                None => Err(Self::refused(tonic::Code::NotFound, "no server".into())),
            };
        }
        let done = r.is_err()
            || self
                .agents
                .get(&id)
                .and_then(|a| a.script.as_ref())
                .is_none_or(|s| s.stmts.is_empty());
        if !done {
            return;
        }
        let Some(script) = self.agents.get_mut(&id).and_then(|a| a.script.take()) else {
            return;
        };
        let r = r.map(|()| {
            if script.promotes {
                if let Some(a) = self.agents.get_mut(&id) {
                    a.terms.promoted_term = script.term;
                }
                self.record_promotion(id, script.term);
            }
            self.action_response(id, script.term)
        });
        self.send_to_orchestrator(id, script.rpc, Response::Act(r));
    }

    /// Waits, delayed status answers, and the fencing decision every 100 ms.
    fn agents_tick(&mut self) {
        let now = self.now;
        let ids: Vec<ServerId> = self.agents.keys().copied().collect();
        for id in ids {
            // Waits.
            let waits = self
                .agents
                .get_mut(&id)
                .map(|a| std::mem::take(&mut a.waits))
                .unwrap_or_default();
            let mut keep = Vec::new();
            for w in waits {
                let at = self
                    .servers
                    .get_mut(&id)
                    .and_then(|s| s.status(now).ok())
                    .map(|st| st.gtid_current_pos);
                if at.as_ref().is_some_and(|p| p.contains(&w.target)) {
                    let r = self.action_response(id, w.term);
                    self.send_to_orchestrator(id, w.id, Response::Act(Ok(r)));
                } else if now >= w.deadline {
                    let e = Self::refused(
                        tonic::Code::DeadlineExceeded,
                        format!("position {} not reached in time", w.target),
                    );
                    self.send_to_orchestrator(id, w.id, Response::Act(Err(e)));
                } else {
                    keep.push(w);
                }
            }
            if let Some(a) = self.agents.get_mut(&id) {
                a.waits = keep;
            }
            self.run_script(id);
            // Delayed FullStatus answers.
            let due: Vec<(SimTime, u64, Box<pb::Health>)> = match self.agents.get_mut(&id) {
                Some(a) => {
                    let (due, rest) = std::mem::take(&mut a.delayed)
                        .into_iter()
                        .partition(|(t, _, _)| *t <= now);
                    a.delayed = rest;
                    due
                }
                None => Vec::new(),
            };
            for (_, rpc, h) in due {
                if rpc == PUSH {
                    let now = self.now;
                    self.rpc
                        .send(AGENT_NODE + id, ORCHESTRATOR, Rpc::Health(h), now);
                } else {
                    self.send_to_orchestrator(id, rpc, Response::Status(h));
                }
            }
            // The fencing decision on the shard record as its watch sees it.
            let record = self.watched.clone();
            let Some(a) = self.agents.get_mut(&id) else {
                continue;
            };
            if now < a.next_fence_check {
                continue;
            }
            a.next_fence_check = now + Duration::from_millis(100);
            let alias = a.alias.clone();
            a.terms.observe_shard(&alias, &record);
            let terms = a.terms.clone();
            let server = a.server;
            let cut = self.agent_mysql_cut.contains(&server);
            let status = match self.servers.get_mut(&server) {
                Some(s) if !cut => Some(s.status(now)),
                _ => None,
            };
            let writable = match &status {
                Some(Ok(st)) => Some(!st.read_only),
                _ => None,
            };
            // Its mysqld's start as `Uptime` gives it (whole seconds, so the estimate jitters).
            let poll = match &status {
                Some(Ok(_)) => {
                    let started = self
                        .started
                        .get(&server)
                        .map_or(WALL_BASE_MS - FIRST_START_AGO_MS, |t| wall(*t));
                    let up_s = wall(now).saturating_sub(started) / 1000;
                    InstancePoll::Answered(Some(wall(now).saturating_sub(up_s * 1000)))
                }
                _ => InstancePoll::Failed,
            };
            if let Some(a) = self.agents.get_mut(&id) {
                a.instance.observe(wall(now), poll);
            }
            if let FenceDecision::Fence { reason } =
                fence::decide(&alias, &terms, Some(&record), writable)
            {
                if let Some(s) = self.servers.get_mut(&server) {
                    let _ = s.set_read_only(true, now);
                }
                self.trace(format!("agent {alias} fences its mysqld: {reason}"));
            }
            self.probe_primary(id);
            self.push_health(id);
        }
    }

    /// A replica's agent probes the record's primary's mysqld over the hosts' network, as the
    /// agent's prober does: a connection and a query, failing on a down, frozen or unreachable
    /// server.
    fn probe_primary(&mut self, id: ServerId) {
        let now = self.now;
        let Some(p) = self.watched.primary.clone() else {
            return;
        };
        let Some(ps) = server_of(&p) else {
            return;
        };
        if ps == id {
            if let Some(a) = self.agents.get_mut(&id) {
                a.probe = None;
            }
            return;
        }
        let up = self
            .servers
            .get(&ps)
            .is_some_and(|s| s.process_state() == ProcessState::Running);
        let reachable = up && self.repl.is_connected(id, ps) && self.repl.is_connected(ps, id);
        let addr = self
            .tablets
            .get(&p)
            .map(|t| format!("{}:{}", t.mysql_host, t.mysql_port))
            .unwrap_or_default();
        let Some(a) = self.agents.get_mut(&id) else {
            return;
        };
        let before = a.probe.take().filter(|b| b.primary_alias == p);
        let failures = if reachable {
            0
        } else {
            before.as_ref().map_or(0, |b| b.consecutive_failures) + 1
        };
        let failing_since_ms = match (&before, reachable) {
            (_, true) => 0,
            (Some(b), false) if b.failing_since_ms != 0 => b.failing_since_ms,
            _ => wall(now),
        };
        a.probe = Some(pb::PrimaryProbe {
            primary_alias: p,
            addr,
            reachable,
            error: if reachable {
                String::new()
            } else if up {
                "connect timeout".into()
            } else {
                "Connection refused".into()
            },
            consecutive_failures: failures,
            probed_at_ms: wall(now),
            rtt_us: if reachable { 300 } else { 0 },
            failing_since_ms,
        });
    }

    /// The agent publishes its poll's health when the real rule says so, and its stream sends
    /// it (a frozen mysqld's poll ends at the query timeout, later); otherwise the stream
    /// re-sends the last publication once `health_interval` has passed since it last sent.
    fn push_health(&mut self, id: ServerId) {
        let now = self.now;
        let (h, delayed) = self.health(id);
        let Some(a) = self.agents.get_mut(&id) else {
            return;
        };
        let due = a
            .published
            .as_deref()
            .is_none_or(|last| myha_agent::health::push_due(last, &h, HEALTH_INTERVAL));
        let h = if due {
            a.published = Some(h.clone());
            h
        } else if now.saturating_since(a.last_sent) >= HEALTH_INTERVAL {
            match a.published.clone() {
                Some(p) => p,
                None => return,
            }
        } else {
            return;
        };
        a.last_sent = now;
        if delayed && due {
            let at = self.now + Duration::from_millis(300);
            if let Some(a) = self.agents.get_mut(&id) {
                a.delayed.push((at, PUSH, h));
            }
        } else {
            let now = self.now;
            self.rpc
                .send(AGENT_NODE + id, ORCHESTRATOR, Rpc::Health(h), now);
        }
    }

    // ----- The orchestrator -----

    fn send_rpc(&mut self, tablet: &str, term: Term, timeout: Duration, body: Request) -> u64 {
        let id = self.next_rpc;
        self.next_rpc += 1;
        let now = self.now;
        if let Some(s) = server_of(tablet) {
            self.rpc.send(
                ORCHESTRATOR,
                AGENT_NODE + s,
                Rpc::Request {
                    id,
                    term,
                    timeout,
                    body,
                },
                now,
            );
        }
        id
    }
}

/// The seeded fault schedule: the primary crashes or freezes once, and possibly a replica fails
/// or is cut off around it; everything is healed before the quiet period.
fn schedule(cfg: &ShardSimConfig, rng: &mut StdRng, ids: &[ServerId]) -> Vec<(SimTime, Fault)> {
    let mut out = Vec::new();
    let quiet_from = cfg.horizon.saturating_sub(cfg.quiet).as_millis() as u64;
    let t_fail = rng.random_range(300..1_500u64);
    let primary = ids[0];
    let heal_at = |rng: &mut StdRng, from: u64| -> u64 {
        (from + rng.random_range(100..3_000u64)).min(quiet_from.saturating_sub(1))
    };
    if rng.random_bool(0.75) {
        out.push((t_fail, Fault::Crash(primary)));
        if rng.random_bool(0.5) {
            let h = heal_at(rng, t_fail);
            out.push((h, Fault::Restart(primary)));
        }
    } else {
        out.push((t_fail, Fault::Freeze(primary)));
        let h = heal_at(rng, t_fail);
        out.push((h, Fault::Thaw(primary)));
    }
    // Two distinct replicas where there are (`a` fails or is cut off from the orchestrator,
    // `b` stopped receiving shortly before the failure), so that the one holding the newest
    // acknowledged writes is sometimes the one the orchestrator cannot reach.
    let replicas = &ids[1..];
    let ai = rng.random_range(0..replicas.len());
    let a = replicas[ai];
    let b = replicas[(ai + 1) % replicas.len()];
    if rng.random_bool(0.5) {
        let at = t_fail.saturating_sub(100) + rng.random_range(0..200u64);
        let h = heal_at(rng, at);
        match rng.random_range(0..3u32) {
            0 => {
                out.push((at, Fault::Crash(a)));
                out.push((h, Fault::Restart(a)));
            }
            1 => {
                out.push((at, Fault::Freeze(a)));
                out.push((h, Fault::Thaw(a)));
            }
            _ => {
                out.push((at, Fault::CutAgent(a)));
                out.push((h, Fault::HealAgent(a)));
            }
        }
    }
    if rng.random_bool(0.4) {
        let at = t_fail.saturating_sub(rng.random_range(20..300u64));
        let h = heal_at(rng, t_fail);
        out.push((at, Fault::CutReplication(b)));
        out.push((h, Fault::HealReplication(b)));
    }
    if rng.random_bool(0.2) {
        let r = replicas[rng.random_range(0..replicas.len())];
        let at = t_fail.saturating_sub(300) + rng.random_range(0..300u64);
        let h = heal_at(rng, at);
        out.push((at, Fault::IsolateServer(r)));
        out.push((h, Fault::RejoinServer(r)));
    }
    // The orchestrator cut off from the primary's agent around its failure (the host's link to
    // the control plane): only the agent's own fencing can stop a deposed primary that resumes.
    if rng.random_bool(0.3) {
        let at = t_fail.saturating_sub(200) + rng.random_range(0..400u64);
        let h = heal_at(rng, at + 1_000);
        out.push((at, Fault::CutAgent(primary)));
        out.push((h, Fault::HealAgent(primary)));
    }
    // An agent cut from its own mysqld, which goes on serving: the primary's (its agent
    // reports it unreachable, its replicas still reach it) or a replica's.
    if rng.random_bool(0.25) {
        let who = if rng.random_bool(0.7) {
            primary
        } else {
            replicas[rng.random_range(0..replicas.len())]
        };
        let at = rng.random_range(100..quiet_from / 2);
        let h = heal_at(rng, at);
        out.push((at, Fault::CutAgentMysql(who)));
        out.push((h, Fault::HealAgentMysql(who)));
    }
    // An operator's planned reparent in some runs: before the failure, as it strikes, while
    // it is being handled, or after. Drawn from its own stream so that the faults above stay what each
    // seed drew before switchovers were simulated.
    let mut op = StdRng::seed_from_u64(cfg.seed ^ 0x5717_c40e);
    if op.random_bool(0.4) && quiet_from > 1_700 {
        // Half of them just before the failure, so that it strikes mid-way (undo paths).
        let at = if op.random_bool(0.5) {
            t_fail.saturating_sub(op.random_range(0..40u64))
        } else {
            op.random_range(200..quiet_from - 1_500)
        };
        out.push((at, Fault::Switchover));
    }
    // Later additions, each from a stream of its own for the same reason.
    // An errant transaction on a replica, long enough before the faults stop for the
    // repairs to see it.
    let mut errant = StdRng::seed_from_u64(cfg.seed ^ 0xe77a_9700);
    if errant.random_bool(0.15) && quiet_from > 1_200 {
        let r = replicas[errant.random_range(0..replicas.len())];
        let at = errant.random_range(100..quiet_from - 1_000);
        out.push((at, Fault::ErrantWrite(r)));
    }
    // Scenario P18: the delayed replica is the one that received the newest writes (the
    // others stopped receiving just before the primary failed), so the reparent must lift its
    // delay and apply what it received.
    if let Some((d, _)) = cfg.delayed_replica {
        let mut p18 = StdRng::seed_from_u64(cfg.seed ^ 0x0918_d31a);
        if p18.random_bool(0.6) {
            let at = t_fail.saturating_sub(p18.random_range(20..200u64));
            let h = heal_at(&mut p18, t_fail);
            for &r in replicas.iter().filter(|r| **r != d) {
                out.push((at, Fault::CutReplication(r)));
                out.push((h, Fault::HealReplication(r)));
            }
        }
    }
    // The orchestrator dies, mostly while it handles the primary's failure (its recovery
    // stops wherever the step machine is; nothing undoes it), and a new one starts.
    let mut crash = StdRng::seed_from_u64(cfg.seed ^ 0x0c4a_5e00);
    if crash.random_bool(0.25) {
        let at = if crash.random_bool(0.8) {
            t_fail + crash.random_range(0..400u64)
        } else {
            crash.random_range(100..quiet_from / 2)
        };
        let back = (at + crash.random_range(50..1_500u64)).min(quiet_from.saturating_sub(1));
        out.push((at, Fault::CrashOrchestrator));
        out.push((back.max(at), Fault::RestartOrchestrator));
    }
    out.sort_by_key(|(t, _)| *t);
    out.into_iter()
        .map(|(t, f)| (SimTime::from_millis(t), f))
        .collect()
}

/// Runs `seeds` seeds from `first`; the failing runs with their reports.
pub fn explore(
    first: u64,
    seeds: u64,
    tweak: impl Fn(&mut ShardSimConfig),
) -> Vec<(u64, RunReport)> {
    (first..first + seeds)
        .filter_map(|seed| {
            let mut cfg = ShardSimConfig::for_seed(seed);
            tweak(&mut cfg);
            let r = ShardSim::new(cfg).run();
            (!r.violations.is_empty()).then_some((seed, r))
        })
        .collect()
}

/// The smallest fault schedule (greedy, one fault at a time) under which `cfg`'s run still breaks
/// the invariant its first violation names; with that run's report. `None` when the run keeps
/// every invariant.
pub fn shrink(cfg: &ShardSimConfig) -> Option<(Vec<(SimTime, Fault)>, RunReport)> {
    let mut report = ShardSim::new(cfg.clone()).run();
    let invariant = report.violations.first()?.invariant;
    let mut faults = ShardSim::new(cfg.clone()).faults();
    loop {
        let mut changed = false;
        let mut i = 0;
        while i < faults.len() {
            // A fault goes with the heal that ends it (a lone heal is never removed): removing
            // a restart alone would turn any run into a convergence failure.
            if faults[i].1.heals().is_some() {
                i += 1;
                continue;
            }
            let mut fewer = faults.clone();
            let injury = fewer.remove(i).1;
            if let Some(h) = fewer[i..]
                .iter()
                .position(|(_, f)| f.heals() == Some(injury))
            {
                fewer.remove(i + h);
            }
            let r = ShardSim::new(cfg.clone()).with_faults(fewer.clone()).run();
            if r.violations.iter().any(|v| v.invariant == invariant) {
                faults = fewer;
                report = r;
                changed = true;
            } else {
                i += 1;
            }
        }
        if !changed {
            return Some((faults, report));
        }
    }
}

/// A schedule as the Rust a pinned test replays it with (`ShardSim::with_faults`).
pub fn schedule_code(faults: &[(SimTime, Fault)]) -> String {
    let lines: Vec<String> = faults
        .iter()
        .map(|(t, f)| {
            format!(
                "    (SimTime::from_millis({}), Fault::{f:?}),",
                t.as_millis()
            )
        })
        .collect();
    format!("vec![\n{}\n]", lines.join("\n"))
}

mod orchestrator;
pub(crate) use orchestrator::engine as orchestrator_engine;
#[cfg(test)]
mod tests;
