//! One simulated shard: MariaDB models on a replication network, an agent model beside each,
//! an orchestrator that runs the real emergency reparent step machine
//! ([`myha_orchestrator::recovery::reparent::Emergency`]) over an RPC network, a writer that
//! records every acknowledgement, and a seeded fault schedule. Invariants are checked after every
//! step of the virtual clock.
//!
//! # What is real and what is modelled
//!
//! Real: the emergency reparent (every decision, the term it carries, what it undoes), the
//! agent's term admission ([`myha_agent::fence::TermState::admit`]) and fencing decision
//! ([`myha_agent::fence::decide`]). Modelled: mysqld ([`crate::mariadb`]), the network
//! ([`crate::net`]), the agent's execution of each action on its mysqld, and the orchestrator's
//! detection and refresh: it polls the primary's agent and, after two polls in a row that find
//! its mysqld unreachable, refreshes every agent's status and runs the reparent (the engine's
//! analysis, which also asks the replicas, is not driven here yet). The shard record lives in
//! the driver, written at once (one orchestrator, the lock always held).
//!
//! # Invariants
//!
//! - **Lost write**: when a reparent has promoted a tablet, and at the end of the run, the
//!   record's primary holds every write acknowledged with semi-sync.
//! - **Late acknowledgement**: a write acknowledged by a tablet after a newer term than its own
//!   was recorded must be held by the newer term's primary at the end (a commit whose semi-sync
//!   ack reached the old primary before the term changed may legitimately return late).
//! - **Two primaries**: at every instant at most one tablet can complete a commit (running,
//!   writable and, under semi-sync, with a semi-sync replica connected to it).
//! - **Convergence**: once the faults stop, writes are acknowledged again within
//!   [`ShardSimConfig::converge_within`].
//! - **No endless recovery**: at most one reparent per primary failure, plus one.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use gtid::MariaDbPosition;
use myha_agent::fence::{self, FenceDecision, TermState};
use myha_agent::health::{InstancePoll, InstanceTrack};
use myha_orchestrator::analysis::ShardInput;
use myha_orchestrator::mutants::{self, Mutant};
use myha_orchestrator::recovery::reparent::{Emergency, EmergencyInput, EmergencyOptions};
use myha_orchestrator::recovery::steps::{
    Action, AgentAction, Call, CallId, Now, Reply, StepMachine,
};
use myha_orchestrator::recovery::{FreshShard, PrimaryPosition, RecoveryConfig, RecoveryError};
use myha_proto::agent as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
        }
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
}

/// What the orchestrator is doing.
enum Orch {
    /// Polling the primary; `misses` polls in a row found its mysqld unreachable.
    Watching {
        next_poll: SimTime,
        misses: u32,
        outstanding: Option<(u64, SimTime)>,
    },
    /// Refreshing every agent's status before acting.
    Refreshing {
        asked: BTreeMap<u64, String>,
        answers: BTreeMap<String, pb::Health>,
        deadline: SimTime,
    },
    /// Running the reparent.
    Reparenting(Box<Running>),
}

struct Running {
    machine: Emergency,
    started: SimTime,
    /// Agent RPCs in flight: rpc id -> (call, tablet, give up at).
    rpcs: BTreeMap<u64, (CallId, String, SimTime)>,
    /// Local replies (etcd, sleeps) due at an instant.
    local: Vec<(SimTime, CallId, Reply)>,
}

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
    recovery: RecoveryConfig,
    orch: Orch,
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
    /// The primary's last healthy position as the orchestrator's polls saw it.
    last_primary: Option<PrimaryPosition>,
    report: RunReport,
    /// When the current episode of two writable primaries started (reported once).
    two_primaries_since: Option<SimTime>,
}

fn alias(id: ServerId) -> String {
    format!("zone1-{id}")
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

impl ShardSim {
    /// A shard of `cfg.tablets` tablets (101 primary, the rest replicas, all replicating with
    /// semi-sync under that durability) and its seeded fault schedule.
    pub fn new(cfg: ShardSimConfig) -> ShardSim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let semi = cfg.durability == Durability::SemiSync;
        let ids: Vec<ServerId> = (101..101 + cfg.tablets).collect();
        let mut servers = BTreeMap::new();
        let mut agents = BTreeMap::new();
        let mut tablets = BTreeMap::new();
        for &id in &ids {
            let mut c = ServerConfig::new(id, 0);
            c.semi_sync_slave = semi;
            c.slave_net_timeout = Duration::from_secs(2);
            // A slow applier on some replicas, so that what they received and what they applied
            // differ when the primary fails.
            if id != 101 && rng.random_bool(0.4) {
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
                        promoted_term: if id == 101 { Term::new(1) } else { Term::ZERO },
                        known_epoch: 0,
                    },
                    waits: Vec::new(),
                    delayed: Vec::new(),
                    next_fence_check: SimTime::ZERO,
                    instance: InstanceTrack::default(),
                },
            );
            tablets.insert(
                a.clone(),
                TabletRecord {
                    alias: a,
                    cell: "zone1".into(),
                    uid: id,
                    keyspace: "ks".into(),
                    shard: "0".into(),
                    tablet_type: if id == 101 {
                        TabletType::Primary
                    } else {
                        TabletType::Replica
                    },
                    mysql_host: format!("10.0.0.{}", id - 100),
                    mysql_port: 3306,
                    mysql_socket: None,
                    grpc_addr: format!("10.0.0.{}:16000", id - 100),
                    http_addr: None,
                    promotion_rule: PromotionRule::Neutral,
                    registered_ms: 0,
                },
            );
        }
        // The initial topology, as a bootstrap leaves it.
        let now = SimTime::ZERO;
        if let Some(p) = servers.get_mut(&101) {
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
                let _ = s.change_master(MasterConfig::new(101), now);
                let _ = s.start_slave(now);
            }
        }
        let mut record = ShardRecord::new("ks", "0");
        record.primary = Some(alias(101));
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
            repl.set_link_both(101, id, link)
                .unwrap_or_else(|e| unreachable!("a loss in 0..=1 is valid: {e}"));
        }
        let rpc = Network::new(rng.random(), rpc_link)
            .unwrap_or_else(|e| unreachable!("a loss of 0 is valid: {e}"));
        let faults = schedule(&cfg, &mut rng, &ids);
        let recovery = RecoveryConfig {
            relay_log_wait: Duration::from_secs(5),
            ..RecoveryConfig::default()
        };
        let mut sim = ShardSim {
            now,
            servers,
            agents,
            tablets,
            repl,
            rpc,
            record,
            recovery,
            orch: Orch::Watching {
                next_poll: SimTime::from_millis(100),
                misses: 0,
                outstanding: None,
            },
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
            last_primary: None,
            report: RunReport::default(),
            two_primaries_since: None,
            cfg,
        };
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
        for s in self.servers.values_mut() {
            s.handle_timeout(now);
        }
        while let Some((from, to, m)) = self.repl.poll_deliver(now) {
            if let Some(s) = self.servers.get_mut(&to) {
                s.handle(Input::Message { from, message: m }, now);
            }
        }
        self.flush_outputs();
        while let Some((_, to, m)) = self.rpc.poll_deliver(now) {
            if to == ORCHESTRATOR {
                if let Rpc::Response { id, body } = m {
                    self.orchestrator_response(id, body);
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
            Fault::CutReplication(id) => self.repl.partition(101, id),
            Fault::HealReplication(id) => self.repl.heal(101, id),
            Fault::IsolateServer(id) => self.repl.isolate(id),
            Fault::RejoinServer(id) => self.repl.rejoin(id),
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
                    } => acks.push((write_id, *id, semi_sync, at)),
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

    /// A client write every `write_every` to the primary the record names (what the gateway
    /// routes to).
    fn writer_tick(&mut self) {
        if self.now < self.next_write_at {
            return;
        }
        self.next_write_at = self.now + self.cfg.write_every;
        let Some(p) = self.record.primary.as_deref().and_then(server_of) else {
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
        let able: Vec<ServerId> = self
            .servers
            .keys()
            .copied()
            .filter(|id| self.can_commit(*id))
            .collect();
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

    /// Why the shard need not converge: under semi-sync with K = 1 a primary that stays down
    /// plus a replica whose mysqld restarted after the primary failed (its relay log, possibly
    /// the only copy of acknowledged writes, discarded) is a double failure; refusing to
    /// promote is the lossless answer, and an operator may force it.
    fn convergence_waiver(&self) -> Option<String> {
        if self.cfg.durability != Durability::SemiSync {
            return None;
        }
        let failed = self.first_primary_failure?;
        let p = self.record.primary.as_deref().and_then(server_of)?;
        if self.servers.get(&p)?.process_state() != ProcessState::Down {
            return None;
        }
        let restarted: Vec<ServerId> = self
            .started
            .iter()
            .filter(|(id, t)| **id != p && **t >= failed)
            .map(|(id, _)| *id)
            .collect();
        (!restarted.is_empty()).then(|| {
            format!(
                "primary {p} stays down and {restarted:?} restarted after it failed at {} ms (a double failure K = 1 does not survive without risking acknowledged writes)",
                ms(failed)
            )
        })
    }

    fn finish(&mut self) {
        let primary = self.record.primary.as_deref().and_then(server_of);
        if let Some(p) = primary {
            self.check_no_loss(p, "end of run");
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
        let mut h = pb::Health {
            alias: alias(id),
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
        let Some(s) = self.servers.get_mut(&id) else {
            return (Box::new(h), false);
        };
        match s.status(now) {
            Ok(st) => {
                h.mysql_reachable = true;
                h.mysql = Some(pb::MysqlStatus {
                    gtid_position: st.gtid_current_pos.to_string(),
                    server_id: id,
                    flavor: "mariadb".into(),
                    read_only: st.read_only,
                    started_at_ms,
                    ..Default::default()
                });
                h.replication = Some(match &st.slave {
                    Some(sl) => pb::Replication {
                        configured: true,
                        gtid_io_pos: sl.gtid_io_pos.to_string(),
                        io_state: if sl.io_running == IoRunning::No {
                            pb::ThreadState::Stopped as i32
                        } else {
                            pb::ThreadState::Running as i32
                        },
                        sql_state: if sl.sql_running {
                            pb::ThreadState::Running as i32
                        } else {
                            pb::ThreadState::Stopped as i32
                        },
                        ..Default::default()
                    },
                    None => pb::Replication::default(),
                });
                h.semi_sync = Some(pb::SemiSync {
                    replica_enabled: st.semi_sync_slave,
                    primary_enabled: st.semi_sync_master.enabled,
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
                    r = r.and_then(|_| s.set_semi_sync_slave(*on, now));
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
                .map(|()| agent.terms.promoted_term = term)
            }
            AgentAction::Demote { .. } => s.set_read_only(true, now).map_err(mysql),
            AgentAction::UndoDemote => s.set_read_only(false, now).map_err(mysql),
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
        Some(r.map(|()| self.action_response(server, term)))
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
                self.send_to_orchestrator(id, rpc, Response::Status(h));
            }
            // The fencing decision on the shard record as its watch sees it.
            let record = self.record.clone();
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
            let status = self.servers.get_mut(&server).map(|s| s.status(now));
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

    fn orchestrator_tick(&mut self) {
        let now = self.now;
        match &mut self.orch {
            Orch::Watching {
                next_poll,
                outstanding,
                ..
            } => {
                if let Some((_, give_up)) = *outstanding {
                    if now >= give_up {
                        // No answer from the primary's agent: not a sign its mysqld is dead
                        // (P5); keep watching.
                        *outstanding = None;
                    }
                }
                if now >= *next_poll && outstanding.is_none() {
                    *next_poll = now + self.cfg.poll_every;
                    let Some(p) = self.record.primary.clone() else {
                        return;
                    };
                    let status_timeout = self.recovery.status_timeout;
                    let id = self.send_rpc(&p, Term::ZERO, status_timeout, Request::FullStatus);
                    if let Orch::Watching { outstanding, .. } = &mut self.orch {
                        *outstanding = Some((id, now + status_timeout));
                    }
                }
            }
            Orch::Refreshing { deadline, .. } => {
                if now >= *deadline {
                    self.start_reparent();
                }
            }
            Orch::Reparenting(run) => {
                let mut replies = Vec::new();
                let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut run.local)
                    .into_iter()
                    .partition(|(t, _, _)| *t <= now);
                run.local = rest;
                for (_, id, r) in due {
                    replies.push((id, r));
                }
                let expired: Vec<u64> = run
                    .rpcs
                    .iter()
                    .filter(|(_, (_, _, give_up))| now >= *give_up)
                    .map(|(id, _)| *id)
                    .collect();
                for rpc in expired {
                    if let Some((call, tablet, _)) = run.rpcs.remove(&rpc) {
                        replies.push((
                            call,
                            Reply::Action(Err(RecoveryError::AgentTimeout {
                                rpc: "sim",
                                tablet,
                                after: Duration::ZERO,
                            })),
                        ));
                    }
                }
                for (id, r) in replies {
                    self.machine_reply(id, r);
                }
            }
        }
    }

    fn orchestrator_response(&mut self, id: u64, body: Response) {
        match &mut self.orch {
            Orch::Watching {
                misses,
                outstanding,
                ..
            } => {
                if outstanding.is_some_and(|(o, _)| o == id) {
                    *outstanding = None;
                    if let Response::Status(h) = body {
                        if h.mysql_reachable {
                            *misses = 0;
                            if let Some(m) = h.mysql.as_ref().filter(|m| !m.read_only) {
                                self.last_primary = Some(PrimaryPosition {
                                    alias: h.alias.clone(),
                                    term: self.record.term,
                                    gtid_position: m.gtid_position.clone(),
                                    writer: m.server_id.to_string(),
                                    flavor: "mariadb",
                                    seen_ms: wall(self.now),
                                });
                            }
                            let read_only = h.mysql.as_ref().is_some_and(|m| m.read_only);
                            if read_only && h.promoted_term == self.record.term.get() {
                                self.repair_read_only_primary();
                            }
                        } else {
                            *misses += 1;
                            if *misses >= 2 {
                                self.start_refresh();
                            }
                        }
                    }
                }
            }
            Orch::Refreshing { asked, answers, .. } => {
                if let (Some(a), Response::Status(h)) = (asked.remove(&id), body) {
                    answers.insert(a, *h);
                    if asked.is_empty() {
                        self.start_reparent();
                    }
                }
            }
            Orch::Reparenting(run) => {
                let Some((call, tablet, _)) = run.rpcs.remove(&id) else {
                    return;
                };
                let reply = match body {
                    Response::Status(h) => Reply::Status(Ok(h)),
                    Response::Act(Ok(r)) => Reply::Action(Ok(r)),
                    Response::Act(Err(e)) => Reply::Action(Err(RecoveryError::Agent {
                        rpc: "sim",
                        tablet,
                        code: e.code,
                        message: e.message,
                        stale: e.stale,
                    })),
                };
                self.machine_reply(call, reply);
            }
        }
    }

    /// Stand-in for the engine's `PrimaryReadOnly` repair (repairs are not step machines yet,
    /// so the real one cannot be driven here): the record's primary, restarted with myha's
    /// `read_only=ON`, gets semi-sync (per durability) and writes back, under the record's term,
    /// as `repair::repair` does.
    fn repair_read_only_primary(&mut self) {
        let Some(p) = self.record.primary.clone() else {
            return;
        };
        self.trace(format!(
            "orchestrator: primary {p} is read-only; setting it writable"
        ));
        let term = self.record.term;
        let t = self.recovery.action_timeout;
        if self.cfg.durability == Durability::SemiSync {
            let on = AgentAction::SetSemiSync {
                primary: Some(true),
                replica: None,
            };
            self.send_rpc(&p, term, t, Request::Act(Box::new(on)));
        }
        let writable = AgentAction::SetReadOnly { read_only: false };
        self.send_rpc(&p, term, t, Request::Act(Box::new(writable)));
    }

    fn start_refresh(&mut self) {
        self.trace(format!(
            "orchestrator: primary {:?} unreachable twice; refreshing the shard",
            self.record.primary
        ));
        let aliases: Vec<String> = self.tablets.keys().cloned().collect();
        let timeout = self.recovery.status_timeout;
        let mut asked = BTreeMap::new();
        for a in aliases {
            let id = self.send_rpc(&a, Term::ZERO, timeout, Request::FullStatus);
            asked.insert(id, a);
        }
        self.orch = Orch::Refreshing {
            asked,
            answers: BTreeMap::new(),
            deadline: self.now + timeout,
        };
    }

    fn start_reparent(&mut self) {
        let watching = self.watching();
        let Orch::Refreshing { asked, answers, .. } = std::mem::replace(&mut self.orch, watching)
        else {
            return;
        };
        let primary = self.record.primary.clone();
        if answers
            .get(primary.as_deref().unwrap_or_default())
            .is_some_and(|h| h.mysql_reachable)
        {
            self.trace("orchestrator: the primary answers again; nothing to do".into());
            return;
        }
        let unseen: BTreeMap<String, String> = asked
            .values()
            .map(|a| (a.clone(), "no answer within status_timeout".to_string()))
            .collect();
        let fresh = FreshShard {
            record: Some(self.record.clone()),
            record_revision: 1,
            durability: self.cfg.durability,
            tablets: self.tablets.clone(),
            statuses: answers,
            unseen,
            input: ShardInput {
                keyspace: "ks".into(),
                shard: "0".into(),
                record: Some(self.record.clone()),
                durability: self.cfg.durability,
                tablets: Vec::new(),
                quarantined: BTreeMap::new(),
                now_ms: wall(self.now),
            },
            problems: Vec::new(),
            unreadable: Vec::new(),
        };
        let input = EmergencyInput {
            action_term: fresh.action_term(),
            fresh,
            last_primary: self.last_primary.clone(),
            cfg: self.recovery.clone(),
        };
        let mut machine = Emergency::new(input, EmergencyOptions::default());
        let actions = machine.start(self.now_for_machine());
        self.orch = Orch::Reparenting(Box::new(Running {
            machine,
            started: self.now,
            rpcs: BTreeMap::new(),
            local: Vec::new(),
        }));
        self.trace("orchestrator: emergency reparent started".into());
        self.perform(actions);
    }

    fn watching(&self) -> Orch {
        Orch::Watching {
            next_poll: self.now + self.cfg.poll_every,
            misses: 0,
            outstanding: None,
        }
    }

    fn now_for_machine(&self) -> Now {
        let started = match &self.orch {
            Orch::Reparenting(r) => r.started,
            _ => self.now,
        };
        Now {
            since_start: self.now.saturating_since(started),
            wall_ms: wall(self.now),
        }
    }

    fn machine_reply(&mut self, id: CallId, reply: Reply) {
        let now = self.now_for_machine();
        let actions = match &mut self.orch {
            Orch::Reparenting(run) => run.machine.on_reply(id, reply, now),
            _ => return,
        };
        self.perform(actions);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Call(id, call) => self.perform_call(id, call),
                Action::Cancel(id) => {
                    if let Orch::Reparenting(run) = &mut self.orch {
                        run.rpcs.retain(|_, (c, _, _)| *c != id);
                        run.local.retain(|(_, c, _)| *c != id);
                    }
                }
                Action::Record {
                    name, ok, detail, ..
                } => {
                    if !ok || name == "choose_candidate" {
                        self.trace(format!("  step {name} ok={ok}: {detail}"));
                    }
                }
                Action::Audit { .. } | Action::Phase(..) => {}
                Action::Done(result) => {
                    self.orch = self.watching();
                    match result {
                        Ok(done) => {
                            self.report.reparents += 1;
                            self.trace(format!("orchestrator: {}", done.detail));
                            if let Some(p) = done.new_primary.as_deref().and_then(server_of) {
                                self.check_no_loss(p, "after the reparent");
                            }
                        }
                        Err(e) => {
                            self.report.refusals += 1;
                            self.trace(format!("orchestrator: reparent did not happen: {e}"));
                            // Back off before looking again (the engine's backoff).
                            if let Orch::Watching { next_poll, .. } = &mut self.orch {
                                *next_poll = self.now + Duration::from_secs(1);
                            }
                        }
                    }
                    return;
                }
            }
        }
    }

    fn perform_call(&mut self, id: CallId, call: Call) {
        let now = self.now;
        let etcd_rtt = Duration::from_millis(2);
        match call {
            Call::Agent {
                tablet,
                term,
                action,
            } => {
                let timeout = match &action {
                    AgentAction::WaitForPosition { bound, .. }
                    | AgentAction::ApplyReceived { bound, .. }
                    | AgentAction::Demote { bound }
                    | AgentAction::FenceServer { bound, .. } => *bound,
                    _ => self.recovery.action_timeout,
                };
                let rpc = self.send_rpc(&tablet, term, timeout, Request::Act(Box::new(action)));
                let give_up = now + timeout + Duration::from_millis(500);
                if let Orch::Reparenting(run) = &mut self.orch {
                    run.rpcs.insert(rpc, (id, tablet, give_up));
                }
            }
            Call::Status { tablet } => {
                let timeout = self.recovery.status_timeout;
                let rpc = self.send_rpc(&tablet, Term::ZERO, timeout, Request::FullStatus);
                if let Orch::Reparenting(run) = &mut self.orch {
                    run.rpcs.insert(rpc, (id, tablet, now + timeout));
                }
            }
            Call::WriteShardRecord { record, .. } => {
                if record.term != self.record.term || record.primary != self.record.primary {
                    self.trace(format!(
                        "record: primary {:?} term {}",
                        record.primary, record.term
                    ));
                }
                self.record = record;
                self.local(now + etcd_rtt, id, Reply::Written(Ok(1)));
            }
            Call::GetPromotion(_) => self.local(now + etcd_rtt, id, Reply::Promotion(Ok(None))),
            Call::GetTablet(a) => {
                let t = self.tablets.get(&a).cloned();
                self.local(now + etcd_rtt, id, Reply::Tablet(Ok(t)))
            }
            Call::RegistrationLastSeen(_) => self.local(now, id, Reply::LastSeen(Some(wall(now)))),
            Call::Sleep(d) => self.local(now + d, id, Reply::Slept),
        }
    }

    fn local(&mut self, at: SimTime, id: CallId, reply: Reply) {
        if let Orch::Reparenting(run) = &mut self.orch {
            run.local.push((at, id, reply));
        }
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

#[cfg(test)]
mod tests;
