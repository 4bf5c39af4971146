//! A fleet on one virtual clock: many simulated shards ([`ShardSim`], each with its own
//! MariaDB models, agents, networks and writer) and one real engine over all of them, as one
//! orchestrator runs it (issue 11, point 6). A fraction of the primaries is killed at one
//! instant; the run measures, per killed shard, the virtual time until the record names a new
//! primary, and the real time the decision code took (the engine's evaluations over the whole
//! fleet snapshot, the re-analysis under the lock, the step machines).
//!
//! The engine sees one fleet snapshot, rebuilt from the shards whose health or streams changed
//! since the last evaluation, and evaluates whenever one did or its `poll_timeout` falls due;
//! its effects go to the shard they name. Every shard keeps checking its own invariants.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myha_orchestrator::control::ControlState;
use myha_orchestrator::engine::{Effect, Engine, Input};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tabletwatch::{FleetSnapshot, ShardView};

use crate::shard::{orchestrator_engine, Fault, ShardSim, ShardSimConfig, Violation};
use crate::time::SimTime;

/// What a fleet run simulates.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub seed: u64,
    pub shards: u32,
    pub tablets: u32,
    /// The fraction of primaries killed (their mysqld crashes) at `kill_at`.
    pub kill_fraction: f64,
    pub kill_at: Duration,
    pub horizon: Duration,
    /// Each shard's writer writes this often.
    pub write_every: Duration,
}

impl FleetConfig {
    pub fn new(shards: u32) -> FleetConfig {
        FleetConfig {
            seed: 1,
            shards,
            tablets: 3,
            kill_fraction: 0.1,
            kill_at: Duration::from_secs(1),
            horizon: Duration::from_secs(4),
            write_every: Duration::from_millis(20),
        }
    }
}

/// What a fleet run measured.
#[derive(Debug, Clone, Default)]
pub struct FleetReport {
    pub shards: u32,
    pub tablets: u32,
    pub killed: usize,
    /// Virtual time from the kill to a new primary in the record, per recovered shard, sorted.
    pub recovery: Vec<Duration>,
    /// Killed shards whose record still names the dead primary at the end.
    pub unrecovered: Vec<String>,
    /// Virtual time simulated.
    pub simulated: Duration,
    /// Real time in the decision code, in all.
    pub decision: Duration,
    /// The part of it in the engine's evaluations (the rest: the recoveries' re-analysis
    /// under the lock and step machines).
    pub engine: Duration,
    /// Real time of the whole run (models included).
    pub wall: Duration,
    /// The engine's evaluations of the fleet snapshot.
    pub evaluations: u64,
    /// Shards the engine analysed in those evaluations (only changed or due ones are).
    pub analyses: u64,
    /// Every shard's broken invariants.
    pub violations: Vec<(String, Violation)>,
    pub acked: usize,
}

impl FleetReport {
    /// The `q` quantile (0..=1) of the recovery times.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.recovery.is_empty() {
            return None;
        }
        let i = ((self.recovery.len() as f64 - 1.0) * q).round() as usize;
        self.recovery.get(i).copied()
    }

    /// Decision-code CPU per simulated second, as a share of one core.
    pub fn decision_share(&self) -> f64 {
        self.decision.as_secs_f64() / self.simulated.as_secs_f64().max(1e-9)
    }
}

/// Runs the fleet to its horizon.
pub fn run(cfg: &FleetConfig) -> FleetReport {
    let wall = Instant::now();
    let base = Instant::now();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<u32> = (0..cfg.shards).collect();
    order.shuffle(&mut rng);
    let killed_n = ((f64::from(cfg.shards) * cfg.kill_fraction).round() as usize).max(1);
    let killed: std::collections::BTreeSet<u32> = order.into_iter().take(killed_n).collect();
    let kill_at = SimTime::ZERO + cfg.kill_at;
    let mut shards: Vec<ShardSim> = (0..cfg.shards)
        .map(|i| {
            let mut c =
                ShardSimConfig::new(cfg.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(i)));
            c.index = i;
            c.tablets = cfg.tablets;
            c.horizon = cfg.horizon;
            c.quiet = cfg.horizon.saturating_sub(cfg.kill_at);
            // Writes must flow again for the last second of the run.
            c.converge_within = cfg
                .horizon
                .saturating_sub(cfg.kill_at)
                .saturating_sub(Duration::from_secs(1));
            c.write_every = cfg.write_every;
            let first = c.first_id();
            let faults = if killed.contains(&i) {
                vec![(kill_at, Fault::Crash(first))]
            } else {
                Vec::new()
            };
            ShardSim::in_fleet(c, base).with_faults(faults)
        })
        .collect();
    let Some(recovery_cfg) = shards.first().map(|s| s.recovery_config().clone()) else {
        return FleetReport::default();
    };
    let mut engine = orchestrator_engine(&recovery_cfg);
    let mut decision = Duration::ZERO;
    let mut evaluations = 0u64;
    let mut views: BTreeMap<(String, String), Arc<ShardView>> = shards
        .iter_mut()
        .map(|s| {
            let v = s.shared_view();
            ((v.keyspace.clone(), v.shard.clone()), v)
        })
        .collect();
    let index: BTreeMap<String, usize> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| (s.record().shard.clone(), i))
        .collect();
    let dead: BTreeMap<usize, Option<String>> = killed
        .iter()
        .map(|i| (*i as usize, shards[*i as usize].record().primary.clone()))
        .collect();
    let mut recovered: BTreeMap<usize, Duration> = BTreeMap::new();
    let end = SimTime::ZERO + cfg.horizon;
    let mut version = 0u64;
    let mut now = SimTime::ZERO;
    let mut controls: Vec<Arc<ControlState>> = shards.iter().map(ShardSim::control).collect();
    let mut control = merged_control(&shards);
    while now < end {
        let mut dirty = false;
        for s in shards.iter_mut() {
            s.advance();
            if s.take_dirty() {
                let v = s.shared_view();
                views.insert((v.keyspace.clone(), v.shard.clone()), v);
                dirty = true;
            }
        }
        now = shards.first().map_or(end, ShardSim::now);
        let at = base + Duration::from_micros(now.as_micros());
        let due = engine.poll_timeout().is_none_or(|t| t <= at);
        if dirty || due {
            version += 1;
            evaluations += 1;
            let snapshot = Arc::new(FleetSnapshot {
                version,
                taken_at: at,
                topo_synced: true,
                shards: views.clone(),
            });
            // A new control state makes the engine analyse every shard again, as a real
            // control watch's change does: it is merged again only when a shard's changed.
            if shards
                .iter()
                .zip(&controls)
                .any(|(s, c)| !Arc::ptr_eq(&s.control(), c))
            {
                controls = shards.iter().map(ShardSim::control).collect();
                control = merged_control(&shards);
            }
            // The snapshot outlives the engine's call, as the real shell's watch keeps it:
            // freeing the old views is not decision time.
            let keep = snapshot.clone();
            let input = Input::Evaluate {
                snapshot,
                control: control.clone(),
                now_ms: wall_ms(now),
            };
            feed(&mut engine, &mut shards, &index, input, at, &mut decision);
            drop(keep);
        }
        // Whatever the shards' recoveries handed back (reports, audit reads).
        let mut inputs = Vec::new();
        for s in shards.iter_mut() {
            inputs.extend(s.take_engine_inputs());
        }
        for input in inputs {
            feed(&mut engine, &mut shards, &index, input, at, &mut decision);
        }
        for (i, old) in &dead {
            if !recovered.contains_key(i) && shards[*i].record().primary != *old {
                recovered.insert(*i, now.saturating_since(kill_at));
            }
        }
    }
    let mut report = FleetReport {
        shards: cfg.shards,
        tablets: cfg.shards * cfg.tablets,
        killed: dead.len(),
        simulated: cfg.horizon,
        evaluations,
        analyses: engine.analyses(),
        ..FleetReport::default()
    };
    report.recovery = recovered.values().copied().collect();
    report.recovery.sort();
    let engine_time = decision;
    for (i, s) in shards.into_iter().enumerate() {
        decision += s.decision_time();
        let name = s.record().shard.clone();
        if dead.contains_key(&i) && !recovered.contains_key(&i) {
            report.unrecovered.push(name.clone());
        }
        let r = s.conclude();
        report.acked += r.acked;
        report
            .violations
            .extend(r.violations.into_iter().map(|v| (name.clone(), v)));
    }
    report.engine = engine_time;
    report.decision = decision;
    report.wall = wall.elapsed();
    report
}

fn wall_ms(t: SimTime) -> u64 {
    crate::shard::wall_ms(t)
}

/// One control state for the fleet: the keyspace's durability and every shard's quarantines.
fn merged_control(shards: &[ShardSim]) -> Arc<ControlState> {
    let Some(first) = shards.first() else {
        return Arc::new(ControlState::default());
    };
    let mut c = (*first.control()).clone();
    for s in &shards[1..] {
        let other = s.control();
        for (a, q) in &other.quarantine {
            c.quarantine.insert(a.clone(), q.clone());
        }
    }
    Arc::new(c)
}

/// Hands `input` to the engine and each effect to the shard it names.
fn feed(
    engine: &mut Engine,
    shards: &mut [ShardSim],
    index: &BTreeMap<String, usize>,
    input: Input,
    at: Instant,
    decision: &mut Duration,
) {
    let timer = crate::time::CpuTimer::start();
    let effects = engine.handle(input, at);
    *decision += timer.elapsed();
    for e in effects {
        let shard = match &e {
            Effect::StartRecovery(job) => Some(job.shard.as_str()),
            Effect::LoadAudit { shard, .. } | Effect::AppendAudit { shard, .. } => {
                Some(shard.as_str())
            }
            Effect::WarmAgent(_) | Effect::Publish(_) => None,
        };
        if let Some(i) = shard.and_then(|s| index.get(s)) {
            shards[*i].perform_effect(e);
        }
    }
}

#[cfg(test)]
mod tests;
