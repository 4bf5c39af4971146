//! Several orchestrators contending for one shard's lock in the etcd model: the safety of the
//! lock and of the fencing token, which the shard simulation (one orchestrator, the lock always
//! free) leaves out.
//!
//! # What is real and what is modelled
//!
//! Real: the lease gate every action under the lock passes ([`topo::lease_left`] with the
//! orchestrator's [`LOCK_DEADLINE_MARGIN`]) and the agent's admission of a term and lock epoch
//! ([`myha_agent::fence::TermState::admit`]). Modelled: etcd ([`crate::etcd`], with `topo`'s
//! lock recipe [`ShardLockRecipe`]) behind the network model; each orchestrator's lease
//! (granted, kept alive every third of its TTL, its local deadline the send time of the last
//! answered keep-alive plus the TTL, as `topo::lease` keeps it), its way to the lock (enter,
//! then wait until no older contender is left), and its work under the lock: it reads the
//! shard record's term, then acts on random agents at that term, now and then reserving the
//! next term first with a write conditional on the lock (a reparent), and releases the lock
//! after a while (one recovery's run). Faults: an orchestrator frozen (also right after it
//! passed the gate and before its request leaves: the check-then-send race no lease check can
//! close), cut from etcd, or with slow links to the agents.
//!
//! # Invariants
//!
//! - **Acted without the lock**: when an orchestrator passes the gate and commits to an action,
//!   etcd (the ground truth) names it the holder.
//! - **Deposed holder obeyed**: an agent never applies an action of a lock holder after one of
//!   a later holder (holders ordered by the etcd revision that created their lock key): the
//!   later holder's view of the shard is never undone by a request its predecessor sent.
//! - **Progress**: once faults stop, some orchestrator holds the lock and its actions are
//!   applied within [`LockSimConfig::converge_within`].

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use myha_agent::fence::TermState;
use myha_orchestrator::mutants::{self, Mutant};
use myha_orchestrator::recovery::LOCK_DEADLINE_MARGIN;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use topo::Term;

use crate::etcd::{Contender, Etcd, EtcdConfig, LeaseId, LockError, ShardLockRecipe};
use crate::net::{LinkConfig, Network, NodeId};
use crate::shard::Violation;
use crate::time::SimTime;

const ETCD: NodeId = 1;
const ORCH: NodeId = 100;
const AGENT: NodeId = 200;
const TICK: Duration = Duration::from_millis(1);
const LOCKS: &str = "/myha/locks/ks/0/";
const RECORD: &str = "/myha/shards/ks/0";

/// The mutants this simulation catches (the shard simulation catches the others).
pub const MUTANTS: [Mutant; 2] = [Mutant::EqualTermOtherHolder, Mutant::SkipLeaseDeadline];

/// What one run simulates.
#[derive(Debug, Clone)]
pub struct LockSimConfig {
    pub seed: u64,
    pub orchestrators: u32,
    pub agents: u32,
    pub horizon: Duration,
    /// No fault starts after `horizon - quiet`, and every fault has ended by then.
    pub quiet: Duration,
    pub converge_within: Duration,
    /// The lock's lease TTL (etcd raises it to its 2 s minimum).
    pub ttl: Duration,
    pub mutant: Option<Mutant>,
}

impl LockSimConfig {
    pub fn new(seed: u64) -> LockSimConfig {
        LockSimConfig {
            seed,
            orchestrators: 2 + u32::from(seed % 3 == 2),
            agents: 3,
            horizon: Duration::from_secs(30),
            quiet: Duration::from_secs(8),
            converge_within: Duration::from_secs(6),
            ttl: Duration::from_secs(2),
            mutant: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct LockReport {
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    /// Times an orchestrator came to hold the lock.
    pub acquisitions: u32,
    /// Actions the agents applied, and refused as stale (term or holder).
    pub applied: u32,
    pub refused: u32,
    /// Actions the lease gate stopped.
    pub gated: u32,
    /// Terms reserved under the lock.
    pub reserved: u32,
}

#[derive(Debug, Clone)]
enum Msg {
    Grant {
        ttl: Duration,
        sent: SimTime,
    },
    Granted {
        lease: LeaseId,
        ttl: Duration,
        sent: SimTime,
    },
    KeepAlive {
        lease: LeaseId,
        sent: SimTime,
    },
    KeptAlive {
        ok: bool,
        sent: SimTime,
    },
    Enter {
        lease: LeaseId,
    },
    Entered(Result<Contender, LockError>),
    /// Whether the contender holds the lock; with the record's term when it does.
    Holds {
        contender: Contender,
    },
    Holding(Option<Term>),
    Reserve {
        contender: Contender,
        term: Term,
    },
    Reserved(Result<Term, LockError>),
    Release {
        contender: Contender,
    },
    Act {
        op: u64,
        term: Term,
        epoch: u64,
    },
    Answer,
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// Not contending until then.
    Idle {
        until: SimTime,
    },
    /// Asked for a lease, or entered the contest, at `since` (unanswered for a second: again).
    Granting {
        since: SimTime,
    },
    Entering {
        since: SimTime,
    },
    /// Asks whether it holds at `next`.
    Waiting {
        next: SimTime,
    },
    /// Holds the lock (by its own account) until `release_at`, acting at `term`.
    Holding {
        term: Term,
        release_at: SimTime,
        next_act: SimTime,
        reserving: bool,
    },
}

#[derive(Debug)]
struct Orch {
    node: NodeId,
    stage: Stage,
    lease: Option<(LeaseId, Duration)>,
    /// The local lease deadline (send time of the last answered keep-alive plus the TTL).
    valid_until: SimTime,
    next_keep_alive: SimTime,
    contender: Option<Contender>,
    frozen_until: SimTime,
    /// Messages that arrived while frozen.
    inbox: Vec<Msg>,
    /// An action decided before a freeze, sent at the thaw: (agent, message).
    held_back: Option<(NodeId, Msg)>,
}

struct Agent {
    terms: TermState,
    /// The epoch of the latest holder whose action this agent applied.
    last_holder: u64,
}

/// Runs one seeded schedule.
pub fn run(cfg: &LockSimConfig) -> LockReport {
    mutants::set(cfg.mutant);
    let mut sim = LockSim::new(cfg.clone());
    sim.run();
    mutants::set(None);
    sim.report
}

/// The first seed in `seeds` whose run breaks an invariant.
pub fn first_violation(
    mutant: Option<Mutant>,
    seeds: std::ops::Range<u64>,
) -> Option<(u64, Violation)> {
    seeds.into_iter().find_map(|seed| {
        let mut cfg = LockSimConfig::new(seed);
        cfg.mutant = mutant;
        run(&cfg).violations.into_iter().next().map(|v| (seed, v))
    })
}

struct LockSim {
    cfg: LockSimConfig,
    now: SimTime,
    rng: StdRng,
    base: Instant,
    etcd: Etcd,
    recipe: ShardLockRecipe,
    net: Network<Msg>,
    orchs: Vec<Orch>,
    agents: BTreeMap<NodeId, Agent>,
    /// op -> the sender's epoch, as the ground truth knows it.
    next_op: u64,
    /// Faults: when, what.
    faults: Vec<(SimTime, Fault)>,
    /// The first action applied once faults stopped.
    applied_after_faults: Option<SimTime>,
    report: LockReport,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Freeze(usize, Duration),
    CutEtcd(usize, Duration),
    SlowAgents(usize, Duration, Duration),
}

impl LockSim {
    fn new(cfg: LockSimConfig) -> LockSim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let net = Network::new(cfg.seed ^ 0x5eed, LinkConfig::LAN).expect("valid link");
        let etcd = Etcd::new(EtcdConfig::default(), SimTime::ZERO);
        let orchs = (0..cfg.orchestrators)
            .map(|i| Orch {
                node: ORCH + i,
                stage: Stage::Idle {
                    until: SimTime::from_millis(rng.random_range(0..200)),
                },
                lease: None,
                valid_until: SimTime::ZERO,
                next_keep_alive: SimTime::ZERO,
                contender: None,
                frozen_until: SimTime::ZERO,
                inbox: Vec::new(),
                held_back: None,
            })
            .collect();
        let agents = (0..cfg.agents)
            .map(|j| {
                (
                    AGENT + j,
                    Agent {
                        terms: TermState {
                            known_term: Term::new(1),
                            promoted_term: Term::ZERO,
                            known_epoch: 0,
                        },
                        last_holder: 0,
                    },
                )
            })
            .collect();
        // Faults, all over by `horizon - quiet`.
        let until = cfg.horizon.saturating_sub(cfg.quiet).as_millis() as u64;
        let mut faults = Vec::new();
        let n = rng.random_range(3..9);
        for _ in 0..n {
            let at = rng.random_range(500..until.max(501));
            let o = rng.random_range(0..cfg.orchestrators as usize);
            let room = until.saturating_sub(at).max(1);
            let d = Duration::from_millis(rng.random_range(300..=5_000).min(room));
            let f = match rng.random_range(0..3) {
                0 => Fault::Freeze(o, d),
                1 => Fault::CutEtcd(o, d),
                _ => Fault::SlowAgents(o, d, Duration::from_millis(rng.random_range(100..2_500))),
            };
            faults.push((SimTime::from_millis(at), f));
        }
        faults.sort_by_key(|(t, _)| *t);
        LockSim {
            cfg,
            now: SimTime::ZERO,
            rng,
            base: Instant::now(),
            etcd,
            recipe: ShardLockRecipe::new(LOCKS),
            net,
            orchs,
            agents,
            next_op: 0,
            faults,
            applied_after_faults: None,
            report: LockReport::default(),
        }
    }

    fn trace(&mut self, what: String) {
        self.report
            .trace
            .push(format!("{:>6} ms  {what}", self.now.as_millis()));
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.trace(format!("VIOLATION {invariant}: {detail}"));
        self.report.violations.push(Violation {
            at: self.now,
            invariant,
            detail,
        });
    }

    fn instant(&self, t: SimTime) -> Instant {
        self.base + Duration::from_micros(t.as_micros())
    }

    fn run(&mut self) {
        // Writes the first record (term 1) as a bootstrap would.
        self.etcd
            .put(RECORD, b"1".to_vec(), None, SimTime::ZERO)
            .expect("a put without a lease");
        let end = SimTime::ZERO + self.cfg.horizon;
        let mut heal: Vec<(SimTime, Fault)> = Vec::new();
        while self.now < end && self.report.violations.is_empty() {
            let now = self.now;
            while self.faults.first().is_some_and(|(t, _)| *t <= now) {
                let (_, f) = self.faults.remove(0);
                self.inject(f);
                heal.push((now + fault_length(f), f));
            }
            heal.retain(|(t, f)| {
                if *t <= now {
                    self.heal(*f);
                    false
                } else {
                    true
                }
            });
            self.etcd.handle_timeout(now);
            while let Some((from, to, m)) = self.net.poll_deliver(now) {
                self.deliver(from, to, m);
            }
            for i in 0..self.orchs.len() {
                self.orch_tick(i);
            }
            self.now += TICK;
        }
        let quiet_from = self.quiet_from();
        let by = quiet_from + self.cfg.converge_within;
        let late = self.applied_after_faults.is_none_or(|t| t > by);
        if self.report.violations.is_empty() && late {
            self.violate(
                "progress",
                format!(
                    "no action applied between {} ms (faults over) and {} ms",
                    quiet_from.as_millis(),
                    by.as_millis()
                ),
            );
        }
    }

    /// When the faults are over.
    fn quiet_from(&self) -> SimTime {
        SimTime::ZERO + self.cfg.horizon.saturating_sub(self.cfg.quiet)
    }

    fn inject(&mut self, f: Fault) {
        self.trace(format!("fault {f:?}"));
        match f {
            Fault::Freeze(o, d) => {
                let now = self.now;
                let orch = &mut self.orchs[o];
                orch.frozen_until = orch.frozen_until.max(now + d);
            }
            Fault::CutEtcd(o, _) => self.net.partition(ETCD, ORCH + o as NodeId),
            Fault::SlowAgents(o, _, delay) => {
                for j in 0..self.cfg.agents {
                    let link = LinkConfig {
                        delay,
                        ..LinkConfig::LAN
                    };
                    self.net
                        .set_link(ORCH + o as NodeId, AGENT + j, link)
                        .expect("valid link");
                }
            }
        }
    }

    fn heal(&mut self, f: Fault) {
        self.trace(format!("healed {f:?}"));
        match f {
            Fault::Freeze(..) => {}
            Fault::CutEtcd(o, _) => self.net.heal(ETCD, ORCH + o as NodeId),
            Fault::SlowAgents(o, ..) => {
                for j in 0..self.cfg.agents {
                    self.net
                        .set_link(ORCH + o as NodeId, AGENT + j, LinkConfig::LAN)
                        .expect("valid link");
                }
            }
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, m: Msg) {
        let now = self.now;
        self.net.send(from, to, m, now);
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, m: Msg) {
        if to == ETCD {
            self.etcd_request(from, m);
        } else if to >= AGENT {
            self.agent_request(from, to, m);
        } else if let Some(o) = self.orchs.iter_mut().find(|o| o.node == to) {
            o.inbox.push(m);
        }
    }

    // ----- etcd -----

    fn etcd_request(&mut self, from: NodeId, m: Msg) {
        let now = self.now;
        let answer = match m {
            Msg::Grant { ttl, sent } => {
                let l = self.etcd.grant(ttl, now);
                Msg::Granted {
                    lease: l.id,
                    ttl: l.ttl,
                    sent,
                }
            }
            Msg::KeepAlive { lease, sent } => Msg::KeptAlive {
                ok: self.etcd.keep_alive(lease, now).is_ok(),
                sent,
            },
            Msg::Enter { lease } => {
                Msg::Entered(
                    self.recipe
                        .enter(&mut self.etcd, lease, b"orch".to_vec(), now),
                )
            }
            Msg::Holds { contender } => {
                let holds = self.recipe.holds(&mut self.etcd, &contender, now);
                Msg::Holding(holds.then(|| self.record_term()))
            }
            Msg::Reserve { contender, term } => {
                let value = term.get().to_string().into_bytes();
                let r = self
                    .recipe
                    .write_under_lock(&mut self.etcd, &contender, RECORD, value, None, now)
                    .map(|_| term);
                Msg::Reserved(r)
            }
            Msg::Release { contender } => {
                let _ = self.recipe.release(&mut self.etcd, &contender, now);
                return;
            }
            _ => return,
        };
        self.send(ETCD, from, answer);
    }

    fn record_term(&mut self) -> Term {
        let now = self.now;
        let kv = self.etcd.get(RECORD, now).kv;
        let t = kv
            .and_then(|kv| String::from_utf8(kv.value).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(1);
        Term::new(t)
    }

    /// The epoch of the orchestrator `node`'s lock key if etcd names it the holder now.
    fn holder_epoch(&mut self, node: NodeId) -> Option<u64> {
        let now = self.now;
        let contender = self
            .orchs
            .iter()
            .find(|o| o.node == node)
            .and_then(|o| o.contender.clone())?;
        self.recipe
            .holds(&mut self.etcd, &contender, now)
            .then(|| u64::try_from(contender.epoch).unwrap_or(0))
    }

    // ----- Agents -----

    fn agent_request(&mut self, from: NodeId, to: NodeId, m: Msg) {
        let Msg::Act { op, term, epoch } = m else {
            return;
        };
        let Some(agent) = self.agents.get_mut(&to) else {
            return;
        };
        match agent.terms.admit(term, epoch) {
            Err(stale) => {
                self.report.refused += 1;
                self.trace(format!("agent {to}: op {op} from {from} refused: {stale}"));
            }
            Ok(_) => {
                let last = agent.last_holder;
                agent.last_holder = last.max(epoch);
                self.report.applied += 1;
                if self.now >= self.quiet_from() && self.applied_after_faults.is_none() {
                    self.applied_after_faults = Some(self.now);
                }
                if epoch < last {
                    self.violate(
                        "deposed holder obeyed",
                        format!(
                            "agent {to} applied op {op} of the holder of epoch {epoch} (orchestrator {from}, term {term}) after an action of the later holder of epoch {last}"
                        ),
                    );
                }
            }
        }
        self.send(to, from, Msg::Answer);
    }

    // ----- Orchestrators -----

    fn orch_tick(&mut self, i: usize) {
        let now = self.now;
        if self.orchs[i].frozen_until > now {
            return;
        }
        if let Some((to, m)) = self.orchs[i].held_back.take() {
            let node = self.orchs[i].node;
            self.trace(format!(
                "orchestrator {node}: thawed, sends what it decided before"
            ));
            self.send(node, to, m);
        }
        let inbox = std::mem::take(&mut self.orchs[i].inbox);
        for m in inbox {
            self.orch_message(i, m);
        }
        let node = self.orchs[i].node;
        // Keep-alives while a lease is held.
        if let Some((lease, ttl)) = self.orchs[i].lease {
            if now >= self.orchs[i].next_keep_alive {
                self.orchs[i].next_keep_alive = now + ttl / 3;
                self.send(node, ETCD, Msg::KeepAlive { lease, sent: now });
            }
        }
        match self.orchs[i].stage.clone() {
            Stage::Granting { since } | Stage::Entering { since }
                if now >= since + Duration::from_secs(1) =>
            {
                self.drop_lock(i);
            }
            Stage::Holding {
                next_act,
                reserving: true,
                ..
            } if now >= next_act + Duration::from_secs(1) => {
                self.trace(format!("orchestrator {node}: reservation unanswered"));
                self.drop_lock(i);
            }
            Stage::Idle { until } if now >= until => {
                self.orchs[i].stage = Stage::Granting { since: now };
                let ttl = self.cfg.ttl;
                self.send(node, ETCD, Msg::Grant { ttl, sent: now });
            }
            Stage::Waiting { next } if now >= next => {
                if let Some(contender) = self.orchs[i].contender.clone() {
                    self.orchs[i].stage = Stage::Waiting {
                        next: now + Duration::from_millis(100),
                    };
                    self.send(node, ETCD, Msg::Holds { contender });
                }
            }
            Stage::Holding {
                term,
                release_at,
                next_act,
                reserving,
            } if !reserving => {
                if now >= release_at {
                    self.release(i, "run over");
                } else if now >= next_act {
                    self.act(i, term, release_at);
                }
            }
            _ => {}
        }
    }

    fn orch_message(&mut self, i: usize, m: Msg) {
        let now = self.now;
        let node = self.orchs[i].node;
        match m {
            Msg::Granted { lease, ttl, sent } => {
                if !matches!(self.orchs[i].stage, Stage::Granting { .. }) {
                    return;
                }
                let o = &mut self.orchs[i];
                o.lease = Some((lease, ttl));
                o.valid_until = sent + ttl;
                o.next_keep_alive = now + ttl / 3;
                o.stage = Stage::Entering { since: now };
                self.send(node, ETCD, Msg::Enter { lease });
            }
            Msg::KeptAlive { ok, sent } => {
                let Some((_, ttl)) = self.orchs[i].lease else {
                    return;
                };
                if ok {
                    let o = &mut self.orchs[i];
                    o.valid_until = o.valid_until.max(sent + ttl);
                } else {
                    self.trace(format!(
                        "orchestrator {node}: lease lost (keep-alive refused)"
                    ));
                    self.drop_lock(i);
                }
            }
            Msg::Entered(r) => {
                if !matches!(self.orchs[i].stage, Stage::Entering { .. }) {
                    return;
                }
                match r {
                    Ok(c) => {
                        self.orchs[i].contender = Some(c);
                        self.orchs[i].stage = Stage::Waiting { next: now };
                    }
                    Err(_) => self.drop_lock(i),
                }
            }
            Msg::Holding(Some(term)) => {
                if !matches!(self.orchs[i].stage, Stage::Waiting { .. }) {
                    return;
                }
                let run = Duration::from_millis(self.rng.random_range(200..3_000));
                self.report.acquisitions += 1;
                let epoch = self.orchs[i].contender.as_ref().map_or(0, |c| c.epoch);
                self.trace(format!(
                    "orchestrator {node}: holds the lock (epoch {epoch}), record term {term}"
                ));
                self.orchs[i].stage = Stage::Holding {
                    term,
                    release_at: now + run,
                    next_act: now,
                    reserving: false,
                };
            }
            Msg::Holding(None) => {}
            Msg::Reserved(r) => {
                let Stage::Holding {
                    release_at,
                    reserving: true,
                    ..
                } = self.orchs[i].stage
                else {
                    return;
                };
                match r {
                    Ok(term) => {
                        self.report.reserved += 1;
                        self.trace(format!("orchestrator {node}: reserved term {term}"));
                        self.orchs[i].stage = Stage::Holding {
                            term,
                            release_at,
                            next_act: now,
                            reserving: false,
                        };
                    }
                    Err(e) => {
                        self.trace(format!("orchestrator {node}: reserve refused: {e}"));
                        self.drop_lock(i);
                    }
                }
            }
            _ => {}
        }
    }

    /// One step under the lock: the gate, then a reservation or an action.
    fn act(&mut self, i: usize, term: Term, release_at: SimTime) {
        let now = self.now;
        let node = self.orchs[i].node;
        let gate = topo::lease_left(
            self.instant(self.orchs[i].valid_until),
            self.instant(now),
            LOCK_DEADLINE_MARGIN,
        );
        if let Err(left) = gate {
            self.report.gated += 1;
            self.trace(format!(
                "orchestrator {node}: lease gate stops it ({left:?} left); gives the lock up"
            ));
            return self.release(i, "lease gate");
        }
        let Some(epoch) = self.holder_epoch(node) else {
            let mine = self.orchs[i].contender.as_ref().map_or(0, |c| c.epoch);
            return self.violate(
                "acted without the lock",
                format!(
                    "orchestrator {node} passed the lease gate (local deadline {} ms) at term {term} while etcd does not name it the holder (its key of epoch {mine})",
                    self.orchs[i].valid_until.as_millis()
                ),
            );
        };
        if self.rng.random_bool(0.15) {
            let Some(contender) = self.orchs[i].contender.clone() else {
                return;
            };
            self.orchs[i].stage = Stage::Holding {
                term,
                release_at,
                next_act: now,
                reserving: true,
            };
            let next = Term::new(term.get() + 1);
            self.send(
                node,
                ETCD,
                Msg::Reserve {
                    contender,
                    term: next,
                },
            );
            return;
        }
        let to = AGENT + self.rng.random_range(0..self.cfg.agents);
        let op = self.next_op;
        self.next_op += 1;
        let m = Msg::Act { op, term, epoch };
        self.orchs[i].stage = Stage::Holding {
            term,
            release_at,
            next_act: now + Duration::from_millis(self.rng.random_range(10..80)),
            reserving: false,
        };
        // The check-then-send race: a pause between the gate and the send.
        if self.rng.random_bool(0.01) {
            let d = Duration::from_millis(self.rng.random_range(1_000..5_000));
            if now + d < self.quiet_from() {
                self.trace(format!(
                    "orchestrator {node}: paused {} ms after the gate, before op {op} to {to} leaves",
                    d.as_millis()
                ));
                let o = &mut self.orchs[i];
                o.frozen_until = o.frozen_until.max(now + d);
                o.held_back = Some((to, m));
                return;
            }
        }
        self.send(node, to, m);
    }

    /// Releases the lock (delete the key, revoke the lease) and idles a while.
    fn release(&mut self, i: usize, why: &str) {
        let node = self.orchs[i].node;
        if let Some(contender) = self.orchs[i].contender.clone() {
            self.trace(format!("orchestrator {node}: releases the lock ({why})"));
            self.send(node, ETCD, Msg::Release { contender });
        }
        self.drop_lock(i);
    }

    /// Forgets the lease and the lock; contends again after a pause.
    fn drop_lock(&mut self, i: usize) {
        let pause = Duration::from_millis(self.rng.random_range(50..1_500));
        let o = &mut self.orchs[i];
        o.lease = None;
        o.contender = None;
        o.stage = Stage::Idle {
            until: self.now + pause,
        };
    }
}

fn fault_length(f: Fault) -> Duration {
    match f {
        Fault::Freeze(_, d) | Fault::CutEtcd(_, d) | Fault::SlowAgents(_, d, _) => d,
    }
}
