//! The engine: one task that evaluates the fleet on every snapshot change (and at least every
//! `tick`), decides which problem to recover, and starts recovery tasks ([`recovery::run`]).
//! An evaluation analyses only the shards whose view changed since the last one (tabletwatch
//! keeps an unchanged shard's `Arc`, compared by pointer) or whose memory fell due (a tick
//! while a problem, a recovery or a hold lasts; a health turning stale); the others cost a
//! pointer comparison. The view for the API is published when a status changed, or a tick
//! after the last publication.
//!
//! The decision is pure ([`decide`]): `(problems, shard memory, control, now) -> Decision`.
//! Around it, [`Engine`] is the sans-IO core: `handle(input, now) -> effects` plus
//! [`Engine::poll_timeout`], keeping per-shard memory (problem episodes, the running recovery,
//! backoff, the primary's last healthy position, flapping from the audit log). It reads no
//! clock and starts no task: the thin async shell ([`start`]) feeds it snapshots, control
//! states and results, performs its [`Effect`]s (start a recovery, read or append the audit
//! log, warm an agent channel, publish the [`EngineView`] for the HTTP API) and sleeps until
//! its timeout. The simulator drives the same core with a virtual clock.
//!
//! Rules:
//! - the most urgent actionable problem first ([`urgency`]): dead primary, no primary, stale
//!   primary claims, primary fixes, replica fixes, semi-sync replica side before primary side;
//! - at most one recovery per shard in this process; several instances are arbitrated by the
//!   shard lock (a held lock means another instance acts);
//! - a skipped recovery (disabled, flapping, durability unknown) is logged and audited once per
//!   problem episode (an episode lasts while the analysis keeps reporting the problem);
//! - after an unsuccessful attempt the same episode is retried with a backoff (250 ms doubling
//!   to 5 s); after any attempt the shard is held until the snapshot reflects it (every
//!   tablet's health received after the attempt, and the new term if one was written) or 2 s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use topo::Term;

use serde::Serialize;
use tabletwatch::{FleetSnapshot, ShardView};
use tokio::sync::{mpsc, watch};
use topo::{AuditEntry, TabletRecord};

use crate::analysis::{self, Problem, ProblemCode};
use crate::control::{self, ControlState, Flapping};
use crate::input;
use crate::recovery::{self, Deps, Job, Outcome, PrimaryPosition, RecoveryConfig, Report};

/// The engine's published state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineView {
    /// Increases with every publication.
    pub version: u64,
    /// Wall clock of this publication (ms since the epoch).
    pub updated_ms: u64,
    /// The tabletwatch snapshot analysed.
    pub snapshot_version: u64,
    /// tabletwatch's etcd watches are current.
    pub topo_synced: bool,
    /// The control/quarantine/keyspace watches are current.
    pub control_synced: bool,
    /// `[recovery] enabled` and not disabled globally.
    pub recoveries_enabled: bool,
    /// Why not, when not.
    pub disabled_reason: Option<String>,
    /// Who acts: `orchestrator@host:pid`.
    pub actor: String,
    /// Every shard, by keyspace then shard. A shard not analysed again since the previous
    /// view keeps its `Arc` (publishing is O(shards) pointer copies, not deep copies).
    pub shards: Vec<Arc<ShardStatus>>,
}

impl EngineView {
    pub fn shard(&self, keyspace: &str, shard: &str) -> Option<&ShardStatus> {
        self.shards
            .iter()
            .find(|s| s.keyspace == keyspace && s.shard == shard)
            .map(|s| &**s)
    }

    fn empty(actor: &str) -> EngineView {
        EngineView {
            version: 0,
            updated_ms: 0,
            snapshot_version: 0,
            topo_synced: false,
            control_synced: false,
            recoveries_enabled: false,
            disabled_reason: Some("engine not started yet".into()),
            actor: actor.to_string(),
            shards: Vec::new(),
        }
    }
}

/// One shard as the engine sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardStatus {
    pub keyspace: String,
    pub shard: String,
    /// Every problem found, most urgent first (analysis order).
    pub problems: Vec<Problem>,
    /// The problem the engine would recover next (most urgent actionable one).
    pub next: Option<Problem>,
    /// The recovery running in this process, if any.
    pub recovery: Option<RecoveryInProgress>,
    /// Automatic recovery of this shard is allowed (enabled, not flapping).
    pub recoveries_enabled: bool,
    /// Why not, when not.
    pub disabled_reason: Option<String>,
    /// Set while the shard is flapping (auto-recovery stopped until `ack`).
    pub flapping: Option<Flapping>,
    /// Why the next problem was not acted on at the last evaluation (skip, backoff, hold).
    pub waiting: Option<String>,
    /// The last recovery attempt of this process on the shard.
    pub last_recovery: Option<RecoveryResult>,
}

/// A recovery running now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryInProgress {
    pub problem: ProblemCode,
    pub tablet: Option<String>,
    pub detail: String,
    /// Wall clock of the start.
    pub since_ms: u64,
    pub running_ms: u64,
}

/// How a recovery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryResult {
    pub problem: ProblemCode,
    pub tablet: Option<String>,
    pub outcome: Outcome,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// The term written, when the recovery changed it (emergency reparent).
    pub new_term: Option<Term>,
    /// Steps taken (each one is also in the audit log).
    pub steps: Vec<recovery::StepRecord>,
}

/// The engine's timing.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// Re-evaluate at least this often.
    pub tick: Duration,
    /// Hold a shard after an attempt at most this long, waiting for the snapshot to catch up.
    pub settle_max: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Reload a shard's reparent history from the audit log this often.
    pub flap_reload: Duration,
    /// See [`Gate::replica_grace`].
    pub replica_grace: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            tick: Duration::from_millis(100),
            settle_max: Duration::from_secs(2),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            flap_reload: Duration::from_secs(60),
            replica_grace: Duration::from_millis(500),
        }
    }
}

/// The running engine. Dropping it stops the engine (running recoveries finish).
#[derive(Debug)]
pub struct EngineHandle {
    view: watch::Receiver<Arc<EngineView>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EngineHandle {
    /// The latest view.
    pub fn view(&self) -> Arc<EngineView> {
        self.view.borrow().clone()
    }

    /// Follows the views.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EngineView>> {
        self.view.clone()
    }
}

/// Starts the engine task.
pub fn start(
    snapshots: watch::Receiver<Arc<FleetSnapshot>>,
    control: watch::Receiver<Arc<ControlState>>,
    deps: Deps,
    opts: EngineOptions,
) -> EngineHandle {
    describe_metrics();
    let (tx, view) = watch::channel(Arc::new(EngineView::empty(&deps.actor)));
    let task = tokio::spawn(run(snapshots, control, deps, opts, tx));
    EngineHandle { view, task }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "myha_orchestrator_recoveries_total",
        "Recovery attempts by problem and outcome (recovered, refused, failed, problem_gone, lock_held, skipped)"
    );
    metrics::describe_histogram!(
        "myha_orchestrator_detection_latency_seconds",
        metrics::Unit::Seconds,
        "From the first snapshot showing a problem's root symptom to the decision to recover it"
    );
    metrics::describe_histogram!(
        "myha_orchestrator_reparent_phase_seconds",
        metrics::Unit::Seconds,
        "Duration of each phase of an emergency reparent (label phase)"
    );
}

// ---- pure decision ----------------------------------------------------------------------

/// Rank of an actionable problem (lower is more urgent); `None` for problems reported only.
/// The ranks are in [`crate::problem::PROBLEMS`].
pub fn urgency(code: ProblemCode) -> Option<u8> {
    code.facts().urgency
}

/// Whether this orchestrator has a recovery for `code`.
pub fn recoverable(code: ProblemCode) -> bool {
    urgency(code).is_some()
}

/// The most urgent problem this orchestrator can recover (ties: analysis order).
pub fn most_urgent(problems: &[Problem]) -> Option<&Problem> {
    problems
        .iter()
        .filter(|p| recoverable(p.code))
        .min_by_key(|p| urgency(p.code).unwrap_or(u8::MAX))
}

/// The key of a problem episode: the problem's root symptom. Every dead-primary variant and
/// an unreachable primary share one (the primary unseen), so detection latency runs from the
/// first moment the primary was not seen.
pub fn episode_key(p: &Problem) -> String {
    let root = p.code.facts().episode_root.unwrap_or(p.code.as_str());
    format!("{root}:{}", p.tablet.as_deref().unwrap_or(""))
}

/// The engine's per-episode memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub first_seen: Instant,
    /// Attempts that did not succeed in this episode (drives the backoff).
    pub failures: u32,
    pub retry_at: Option<Instant>,
    /// Detection latency recorded (once per episode).
    pub decided: bool,
    /// Skip reasons already recorded in this episode.
    pub skips: BTreeSet<String>,
    /// The problem's code at the last evaluation: when it changes within the episode (e.g. a
    /// down replica of a dead primary's shard returns), the backoff starts over.
    pub code: Option<ProblemCode>,
}

impl Episode {
    fn new(now: Instant) -> Episode {
        Episode {
            first_seen: now,
            failures: 0,
            retry_at: None,
            decided: false,
            skips: BTreeSet::new(),
            code: None,
        }
    }
}

/// What the engine knows besides the problems when deciding for one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    /// The etcd watches (tablets, shard records, control, keyspaces) are current: before, a
    /// shard may look like it has no record or no primary.
    pub synced: bool,
    /// `[recovery] enabled`.
    pub config_enabled: bool,
    /// Disabled globally or for the shard, with why.
    pub disabled: Option<String>,
    pub flapping: Option<String>,
    /// The keyspace's durability is known.
    pub durability_known: bool,
    /// A recovery of this shard runs in this process.
    pub running: bool,
    /// Held after an attempt until the snapshot catches up.
    pub settling: bool,
    /// A replica cannot reach the primary although the orchestrator still sees it: only a
    /// dead-primary recovery may run until that is settled (a replica's broken replication
    /// is then a symptom, not the problem).
    pub primary_suspect: Option<String>,
    /// How long a replica's stopped replication must last before it is repaired (its IO
    /// thread notices a dead primary before the primary's death is confirmed). A wrong source
    /// or a stale primary claim waits as long: a reparent that just wrote the shard record (an
    /// operator's, or another instance's) repoints those itself moments later.
    pub replica_grace: Duration,
    /// How long a reparent mark must stay before the engine takes the lock to check it
    /// (`lock_ttl`: the lock of a dead holder expires by then; a live one keeps the lock and
    /// the attempt just finds it held).
    pub mark_grace: Duration,
}

/// What to do with one shard now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing recoverable.
    Nothing,
    /// Start a recovery of this problem.
    Recover(Problem),
    /// Not now; record the reason once per episode (`record`), or just wait (backoff, hold,
    /// running).
    Wait {
        problem: Problem,
        reason: String,
        record: bool,
    },
}

/// The decision for one shard. Pure.
pub fn decide(
    problems: &[Problem],
    episode: Option<&Episode>,
    gate: &Gate,
    now: Instant,
) -> Decision {
    let Some(p) = most_urgent(problems) else {
        return Decision::Nothing;
    };
    let wait = |reason: String, record: bool| Decision::Wait {
        problem: p.clone(),
        reason,
        record,
    };
    if gate.running {
        return wait("a recovery of this shard is running".into(), false);
    }
    if !gate.synced {
        return wait(
            "the etcd watches are not current (etcd unreachable or not read yet): no recovery on possibly stale records".into(),
            false,
        );
    }
    if !gate.config_enabled {
        return wait(
            "automatic recovery is disabled in the configuration ([recovery] enabled = false)"
                .into(),
            true,
        );
    }
    if let Some(r) = &gate.disabled {
        return wait(r.clone(), true);
    }
    if let Some(r) = &gate.flapping {
        return wait(r.clone(), true);
    }
    if !gate.durability_known {
        return wait(
            "the keyspace record is not known yet: durability unknown".into(),
            true,
        );
    }
    // A record behind the tablets names the wrong primary to suspect: reconciling it first.
    if !p.code.facts().while_primary_suspect {
        if let Some(why) = &gate.primary_suspect {
            return wait(
                format!("the primary is suspect ({why}): waiting for the dead-primary analysis"),
                false,
            );
        }
        if p.code == ProblemCode::ReparentInProgress {
            let age = episode.map_or(Duration::ZERO, |ep| {
                now.saturating_duration_since(ep.first_seen)
            });
            if age < gate.mark_grace {
                return wait(
                    format!(
                        "a reparent is in progress ({} ms so far); a mark older than {} ms with the shard lock free is cleared",
                        age.as_millis(),
                        gate.mark_grace.as_millis()
                    ),
                    false,
                );
            }
        }
        if let (Some(what), Some(ep)) = (p.code.facts().grace, episode) {
            let age = now.saturating_duration_since(ep.first_seen);
            if age < gate.replica_grace {
                return wait(
                    format!(
                        "{what} for {} ms, repaired after {} ms",
                        age.as_millis(),
                        gate.replica_grace.as_millis()
                    ),
                    false,
                );
            }
        }
    }
    if gate.settling {
        return wait(
            "waiting for the snapshot to reflect the last recovery".into(),
            false,
        );
    }
    if let Some(at) = episode.and_then(|e| e.retry_at).filter(|at| *at > now) {
        return wait(
            format!(
                "retrying in {} ms after {} unsuccessful attempt(s)",
                at.saturating_duration_since(now).as_millis(),
                episode.map_or(0, |e| e.failures)
            ),
            false,
        );
    }
    Decision::Recover(p.clone())
}

/// Why the primary the orchestrator still sees is suspect: a replica's own fresh probe of it
/// fails. Pure.
pub fn primary_suspect(
    input: &analysis::ShardInput,
    cfg: &analysis::AnalysisConfig,
) -> Option<String> {
    let primary = input.record.as_ref()?.primary.as_deref()?;
    let probe_max = u64::try_from(cfg.probe_stale_after.as_millis()).unwrap_or(u64::MAX);
    let failing: Vec<String> = input
        .tablets
        .iter()
        .filter(|t| t.alias() != primary)
        .filter_map(|t| {
            let probe = t.fresh_health(cfg)?.primary_probe.as_ref()?;
            (probe.primary_alias == primary
                && !probe.reachable
                && input.now_ms.saturating_sub(probe.probed_at_ms) <= probe_max)
                .then(|| format!("{} cannot reach {primary}: {}", t.alias(), probe.error))
        })
        .collect();
    (!failing.is_empty()).then(|| failing.join("; "))
}

/// Backoff after `failures` unsuccessful attempts.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    backoff::Backoff::after_failures(failures, min, max)
}

// ---- the task ---------------------------------------------------------------------------

#[derive(Debug)]
struct Running {
    problem: Problem,
    since: Instant,
    since_ms: u64,
}

#[derive(Debug)]
struct Hold {
    after: Instant,
    until_term: Option<Term>,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct FlapCache {
    /// Successful emergency reparent summaries (only those).
    reparents: Vec<AuditEntry>,
    loaded_at: Option<Instant>,
    loaded_term: Term,
    loading: bool,
    stale: bool,
}

/// The last analysis of one shard, reused while its view is unchanged and nothing
/// time-dependent is due. The engine keeps one per shard of the last snapshot, in its order.
#[derive(Debug)]
struct Slot {
    key: ShardKey,
    /// An unchanged status keeps its `Arc` (and does not make the view be published again).
    /// `None` only between a slot's creation and its first analysis.
    status: Option<Arc<ShardStatus>>,
    /// What the engine remembers of the shard (kept in the slot: no lookup by key per
    /// analysis).
    mem: ShardMem,
}

/// What an evaluation compares for every shard, apart from the [`Slot`]s and small, so that
/// walking a fleet of unchanged shards reads one compact array.
#[derive(Debug)]
struct Seen {
    /// The view analysed: an unchanged shard keeps its `Arc` from snapshot to snapshot
    /// ([`FleetSnapshot::shards`]), so a pointer comparison tells whether it changed (a false
    /// "changed" only costs one analysis). A weak reference keeps the allocation, so that its
    /// address cannot be reused by another view, without keeping an old view's contents alive.
    view: Weak<ShardView>,
    /// Analyse again from this moment on even if the view is unchanged.
    due: Instant,
    synced: bool,
}

#[derive(Debug, Default)]
struct ShardMem {
    episodes: HashMap<String, Episode>,
    running: Option<Running>,
    hold: Option<Hold>,
    last: Option<RecoveryResult>,
    last_primary: Option<PrimaryPosition>,
    /// The GTID positions parsed from the tablets' last health messages.
    positions: Vec<(Weak<myha_proto::agent::Health>, Arc<gtid::GtidSet>)>,
    /// The health message `last_primary` was taken from.
    last_primary_from: Weak<myha_proto::agent::Health>,
    flap: FlapCache,
    /// The tablet records whose agent channels were warmed.
    warmed: Vec<Weak<TabletRecord>>,
}

type ShardKey = (String, String);

/// What the engine core is told.
#[derive(Debug)]
pub enum Input {
    /// The current snapshot and control state, on a change or at [`Engine::poll_timeout`]:
    /// every shard whose inputs changed or whose memo is due is analysed again.
    Evaluate {
        snapshot: Arc<FleetSnapshot>,
        control: Arc<ControlState>,
        /// Wall clock (ms since the epoch) for records and the audit.
        now_ms: u64,
    },
    /// A recovery the core started ([`Effect::StartRecovery`]) ended.
    Done(Report),
    /// A read of a shard's audit log the core asked for ([`Effect::LoadAudit`]) ended.
    Audit {
        keyspace: String,
        shard: String,
        /// The shard term the read was asked at.
        term: Term,
        result: Result<Vec<AuditEntry>, String>,
    },
}

/// What the shell must do for the core, in order.
#[derive(Debug)]
pub enum Effect {
    /// Run [`recovery::run`] for the job and hand its report back as [`Input::Done`].
    StartRecovery(Job),
    /// Read the shard's audit log (for the flapping check) and hand it back as
    /// [`Input::Audit`] with the same term.
    LoadAudit {
        keyspace: String,
        shard: String,
        term: Term,
    },
    /// Append an entry to the shard's audit log (a skipped recovery).
    AppendAudit {
        keyspace: String,
        shard: String,
        entry: AuditEntry,
    },
    /// Open the agent's channel ahead of need, so that a recovery does not pay the connect.
    WarmAgent(Arc<TabletRecord>),
    /// The new view for the API.
    Publish(EngineView),
}

/// The engine's sans-IO core. Invariant: it changes only in [`Engine::handle`], and every
/// effect it wants is returned from there, in the order it must be performed.
#[derive(Debug)]
pub struct Engine {
    cfg: Arc<RecoveryConfig>,
    actor: Arc<str>,
    opts: EngineOptions,
    /// The memory of shards gone from the snapshot while a recovery of them runs.
    orphans: BTreeMap<ShardKey, ShardMem>,
    /// One per shard of the last snapshot evaluated, in its order: an evaluation of a snapshot
    /// with the same shards walks both in step, so that an unchanged shard costs a pointer
    /// comparison and the evaluation O(changed shards) analyses.
    slots: Vec<Slot>,
    /// Parallel to `slots`.
    seen: Vec<Seen>,
    /// The view must be published at the next evaluation (a status or the header changed).
    publish: bool,
    last_publish: Option<Instant>,
    /// `(topo_synced, control_synced)` of the last view published.
    last_header: Option<(bool, bool)>,
    loads_in_flight: usize,
    /// Shards analysed (memo misses), in all.
    analyses: u64,
    version: u64,
    last_control: Option<Arc<ControlState>>,
    /// When the last [`Input::Evaluate`] ran and the least `due` of the memos it left.
    last_eval: Option<Instant>,
    next_due: Option<Instant>,
    effects: Vec<Effect>,
}

const MAX_AUDIT_LOADS: usize = 8;

/// The least gap between two evaluations the core asks for: a memo due at once (a health
/// already stale) must not make the shell spin.
const MIN_EVAL_GAP: Duration = Duration::from_millis(5);

impl Engine {
    pub fn new(cfg: Arc<RecoveryConfig>, actor: Arc<str>, opts: EngineOptions) -> Engine {
        Engine {
            cfg,
            actor,
            opts,
            orphans: BTreeMap::new(),
            slots: Vec::new(),
            seen: Vec::new(),
            publish: true,
            last_publish: None,
            last_header: None,
            loads_in_flight: 0,
            analyses: 0,
            version: 0,
            last_control: None,
            last_eval: None,
            next_due: None,
            effects: Vec::new(),
        }
    }

    /// Takes one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        match input {
            Input::Evaluate {
                snapshot,
                control,
                now_ms,
            } => {
                if let Some(view) = self.evaluate(&snapshot, &control, now, now_ms) {
                    self.effects.push(Effect::Publish(view));
                }
            }
            Input::Done(report) => self.fold(Event::Done(report), now),
            Input::Audit {
                keyspace,
                shard,
                term,
                result,
            } => self.fold(Event::Audit((keyspace, shard), term, result), now),
        }
        std::mem::take(&mut self.effects)
    }

    /// How many times a shard was analysed (its memo missed), in all: with an unchanged fleet
    /// an evaluation analyses nothing.
    pub fn analyses(&self) -> u64 {
        self.analyses
    }

    /// When the core wants the next [`Input::Evaluate`] even if nothing changes: the first
    /// memo to fall due (a tablet's health turning stale, a backoff ending), at most `tick`
    /// after the last evaluation, at least [`MIN_EVAL_GAP`] after it. `None` before the first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let last = self.last_eval?;
        let tick = last + self.opts.tick;
        Some(
            self.next_due
                .map_or(tick, |d| d.min(tick))
                .max(last + MIN_EVAL_GAP),
        )
    }
}

enum Event {
    Done(Report),
    Audit(ShardKey, Term, Result<Vec<AuditEntry>, String>),
}

/// The shell: feeds the core and performs its effects. Every wait is here.
async fn run(
    mut snapshots: watch::Receiver<Arc<FleetSnapshot>>,
    mut control: watch::Receiver<Arc<ControlState>>,
    deps: Deps,
    opts: EngineOptions,
    tx: watch::Sender<Arc<EngineView>>,
) {
    let (events, mut rx) = mpsc::unbounded_channel();
    let mut engine = Engine::new(deps.cfg.clone(), deps.actor.clone(), opts);
    tracing::info!(
        actor = %deps.actor,
        enabled = deps.cfg.enabled,
        "recovery engine started"
    );
    let mut snapshots_open = true;
    let mut control_open = true;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        deps.registrations.observe(&snap, topo::now_ms());
        let ctl = control.borrow_and_update().clone();
        let input = Input::Evaluate {
            snapshot: snap,
            control: ctl,
            now_ms: topo::now_ms(),
        };
        perform(&deps, &events, &tx, engine.handle(input, Instant::now()));
        let wake = engine
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + engine.opts.tick);
        tokio::select! {
            r = snapshots.changed(), if snapshots_open => if r.is_err() { snapshots_open = false },
            r = control.changed(), if control_open => if r.is_err() { control_open = false },
            Some(input) = rx.recv() => perform(&deps, &events, &tx, engine.handle(input, Instant::now())),
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        // Drain whatever else arrived, so reports are folded in before the next evaluation.
        while let Ok(input) = rx.try_recv() {
            perform(&deps, &events, &tx, engine.handle(input, Instant::now()));
        }
    }
}

fn perform(
    deps: &Deps,
    events: &mpsc::UnboundedSender<Input>,
    tx: &watch::Sender<Arc<EngineView>>,
    effects: Vec<Effect>,
) {
    for effect in effects {
        match effect {
            Effect::StartRecovery(job) => {
                let deps = deps.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    let report = recovery::run(deps, job).await;
                    let _ = events.send(Input::Done(report));
                });
            }
            Effect::LoadAudit {
                keyspace,
                shard,
                term,
            } => {
                let topo = deps.topo.clone();
                let events = events.clone();
                tokio::spawn(async move {
                    let result = topo
                        .list_audit(&keyspace, Some(&shard), control::AUDIT_SCAN)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = events.send(Input::Audit {
                        keyspace,
                        shard,
                        term,
                        result,
                    });
                });
            }
            Effect::AppendAudit {
                keyspace,
                shard,
                entry,
            } => deps.audit.append(&keyspace, &shard, entry),
            Effect::WarmAgent(tablet) => deps.agents.warm(&tablet),
            Effect::Publish(view) => {
                tx.send_replace(Arc::new(view));
            }
        }
    }
}

impl Engine {
    fn fold(&mut self, ev: Event, now: Instant) {
        let key = match &ev {
            Event::Audit(key, ..) => key.clone(),
            Event::Done(r) => (r.keyspace.clone(), r.shard.clone()),
        };
        self.invalidate(&key, now);
        let cfg = self.cfg.clone();
        let opts = self.opts.clone();
        match ev {
            Event::Audit(key, term, result) => {
                self.loads_in_flight = self.loads_in_flight.saturating_sub(1);
                let Some(mem) = self.mem_mut(&key) else {
                    return;
                };
                mem.flap.loading = false;
                match result {
                    Ok(entries) => {
                        mem.flap.reparents = entries
                            .into_iter()
                            .filter(control::counts_for_flapping)
                            .collect();
                        mem.flap.loaded_at = Some(now);
                        mem.flap.loaded_term = term;
                        mem.flap.stale = false;
                    }
                    Err(e) => {
                        tracing::debug!(keyspace = %key.0, shard = %key.1, error = %e, "reading the audit log for flapping");
                        // Retry at the next reload period.
                        mem.flap.loaded_at = Some(now);
                    }
                }
            }
            Event::Done(report) => {
                let key = (report.keyspace.clone(), report.shard.clone());
                let Some(mem) = self.mem_mut(&key) else {
                    return;
                };
                mem.running = None;
                mem.flap.stale = true;
                let settle = if matches!(report.outcome, Outcome::LockHeld { .. }) {
                    cfg.lock_wait
                } else {
                    opts.settle_max
                };
                mem.hold = Some(Hold {
                    after: now,
                    until_term: report.new_term,
                    deadline: now + settle,
                });
                let ep_key = episode_key(&report.problem);
                if let Some(ep) = mem.episodes.get_mut(&ep_key) {
                    if report.outcome.is_unsuccessful() {
                        ep.failures += 1;
                        ep.retry_at =
                            Some(now + backoff(ep.failures, opts.backoff_min, opts.backoff_max));
                    } else {
                        ep.retry_at = None;
                    }
                }
                mem.last = Some(RecoveryResult {
                    problem: report.problem.code,
                    tablet: report.problem.tablet.clone(),
                    outcome: report.outcome,
                    started_ms: report.started_ms,
                    duration_ms: report.duration_ms,
                    new_term: report.new_term,
                    steps: report.steps,
                });
            }
        }
    }

    /// Marks the shard's slot due at `now` (its memory changed: a recovery ended, its audit
    /// log was read).
    fn invalidate(&mut self, key: &ShardKey, now: Instant) {
        if let Ok(i) = self.slots.binary_search_by(|s| s.key.cmp(key)) {
            if let Some(s) = self.seen.get_mut(i) {
                s.due = now;
            }
        }
    }

    /// The memory of a shard of the last snapshot, or of one gone while a recovery runs.
    fn mem_mut(&mut self, key: &ShardKey) -> Option<&mut ShardMem> {
        match self.slots.binary_search_by(|s| s.key.cmp(key)) {
            Ok(i) => self.slots.get_mut(i).map(|s| &mut s.mem),
            Err(_) => self.orphans.get_mut(key),
        }
    }

    /// Analyses the shards that changed or fell due; returns the view to publish when a
    /// status or the header changed, or `tick` after the last publication.
    fn evaluate(
        &mut self,
        snap: &FleetSnapshot,
        ctl: &Arc<ControlState>,
        now: Instant,
        now_ms: u64,
    ) -> Option<EngineView> {
        self.version += 1;
        self.last_eval = Some(now);
        self.next_due = None;
        if !self
            .last_control
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, ctl))
        {
            for s in &mut self.seen {
                s.due = now;
            }
            self.last_control = Some(ctl.clone());
            self.publish = true;
        }
        let global_disabled = if !self.cfg.enabled {
            Some(
                "automatic recovery is disabled in the configuration ([recovery] enabled = false)"
                    .to_string(),
            )
        } else {
            ctl.global
                .as_ref()
                .filter(|g| g.disabled)
                .map(|_| ctl.disabled_reason("", "").unwrap_or_default())
        };
        let synced = snap.topo_synced && ctl.synced;
        // The same shards as the last snapshot (the common case): walk both in step.
        let mut todo = Vec::new();
        let mut same_shards =
            self.slots.len() == snap.shards.len() && self.seen.len() == snap.shards.len();
        if same_shards {
            for (i, ((key, view), seen)) in snap.shards.iter().zip(&self.seen).enumerate() {
                if std::ptr::eq(seen.view.as_ptr(), Arc::as_ptr(view)) {
                    if now < seen.due && seen.synced == synced {
                        self.next_due = Some(self.next_due.map_or(seen.due, |d| d.min(seen.due)));
                        continue;
                    }
                } else if self.slots.get(i).is_none_or(|s| s.key != *key) {
                    same_shards = false;
                    break;
                }
                todo.push(i);
            }
        }
        if !same_shards {
            // A shard came or went (rare): every shard is analysed again. The memory of a
            // shard gone from the snapshot is dropped, unless a recovery of it runs.
            let mut old: BTreeMap<ShardKey, ShardMem> =
                self.slots.drain(..).map(|s| (s.key, s.mem)).collect();
            old.append(&mut self.orphans);
            self.seen.clear();
            for (key, view) in &snap.shards {
                self.slots.push(Slot {
                    key: key.clone(),
                    status: None,
                    mem: old.remove(key).unwrap_or_default(),
                });
                self.seen.push(Seen {
                    view: Arc::downgrade(view),
                    due: now,
                    synced,
                });
            }
            self.orphans = old
                .into_iter()
                .filter(|(_, m)| m.running.is_some())
                .collect();
            todo = (0..snap.shards.len()).collect();
            self.publish = true;
        }
        let mut views = snap.shards.iter();
        let mut at = 0;
        for i in todo {
            let Some((key, view)) = views.nth(i - at) else {
                break;
            };
            at = i + 1;
            self.analyses += 1;
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            let mut mem = std::mem::take(&mut slot.mem);
            let status = self.evaluate_shard(&mut mem, key, view, ctl, synced, now, now_ms);
            let due = self.due(&mem, view, &status, now);
            self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
            let Some(slot) = self.slots.get_mut(i) else {
                break;
            };
            slot.mem = mem;
            if slot.status.as_deref() != Some(&status) {
                slot.status = Some(Arc::new(status));
                self.publish = true;
            }
            if let Some(seen) = self.seen.get_mut(i) {
                *seen = Seen {
                    view: Arc::downgrade(view),
                    due,
                    synced,
                };
            }
        }
        let header = (snap.topo_synced, ctl.synced);
        let header_due = self.last_header != Some(header)
            || self.last_publish.is_none_or(|t| now >= t + self.opts.tick);
        if !(self.publish || header_due) {
            return None;
        }
        self.publish = false;
        self.last_publish = Some(now);
        self.last_header = Some(header);
        Some(EngineView {
            version: self.version,
            updated_ms: now_ms,
            snapshot_version: snap.version,
            topo_synced: snap.topo_synced,
            control_synced: ctl.synced,
            recoveries_enabled: global_disabled.is_none(),
            disabled_reason: global_disabled,
            actor: self.actor.to_string(),
            shards: self.slots.iter().filter_map(|s| s.status.clone()).collect(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn evaluate_shard(
        &mut self,
        mem: &mut ShardMem,
        key: &ShardKey,
        view: &ShardView,
        ctl: &ControlState,
        synced: bool,
        now: Instant,
        now_ms: u64,
    ) -> ShardStatus {
        let cfg = self.cfg.clone();
        let (ks, shard) = (key.0.as_str(), key.1.as_str());
        let durability = ctl.durability(ks);
        let quarantined = ctl.quarantined(view.tablets.keys().map(String::as_str));
        let mut input = input::shard_input(
            view,
            now,
            now_ms,
            durability.unwrap_or_default(),
            &quarantined,
        );
        // Each health message's GTID position is parsed once: a shard is analysed on every
        // message of any of its tablets, and the others' positions are the ones parsed before.
        let mut positions = Vec::with_capacity(input.tablets.len());
        for t in &mut input.tablets {
            let Some(h) = &t.health else { continue };
            let cached = mem
                .positions
                .iter()
                .find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(h)))
                .map(|(_, p)| p.clone());
            let parsed = cached.or_else(|| analysis::position(h).map(Arc::new));
            if let Some(p) = &parsed {
                positions.push((Arc::downgrade(h), p.clone()));
            }
            t.position = parsed;
        }
        mem.positions = positions;
        let problems = analysis::analyze(&input, &cfg.analysis);
        // Warm the channels of tablets registered (or re-registered) since the last analysis.
        let warmed = view.tablets.values().all(|t| {
            mem.warmed
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&t.record)))
        });
        if !warmed || mem.warmed.len() != view.tablets.len() {
            for t in view.tablets.values() {
                self.effects.push(Effect::WarmAgent(t.record.clone()));
            }
            mem.warmed = view
                .tablets
                .values()
                .map(|t| Arc::downgrade(&t.record))
                .collect();
        }
        self.maybe_load_audit(mem, key, view.term(), now);

        // The primary's last healthy position (the errant-check reference of a reparent),
        // taken again only from a health message not taken yet.
        if let (Some(alias), Some(p)) = (view.primary_alias(), view.primary()) {
            let fresh = p.is_fresh(now, cfg.analysis.health_stale_after);
            if let Some(h) = p.health_shared().filter(|_| fresh) {
                let taken = std::ptr::eq(mem.last_primary_from.as_ptr(), Arc::as_ptr(h))
                    && mem
                        .last_primary
                        .as_ref()
                        .is_some_and(|l| l.alias == alias && l.term == view.term());
                if !taken {
                    if let Some(pos) = PrimaryPosition::from_health(alias, view.term(), h, now_ms) {
                        mem.last_primary = Some(pos);
                        mem.last_primary_from = Arc::downgrade(h);
                    }
                }
            }
        }

        // Episodes: start new ones, end those whose problem is gone.
        let current: BTreeSet<String> = problems.iter().map(episode_key).collect();
        mem.episodes.retain(|k, _| current.contains(k));
        for p in &problems {
            let ep = mem
                .episodes
                .entry(episode_key(p))
                .or_insert_with(|| Episode::new(now));
            if ep.code != Some(p.code) {
                if ep.code.is_some() {
                    ep.failures = 0;
                    ep.retry_at = None;
                }
                ep.code = Some(p.code);
            }
        }

        // The hold after an attempt ends once the snapshot reflects it.
        if let Some(h) = &mem.hold {
            let term_ok = h.until_term.is_none_or(|t| view.term() >= t);
            let health_ok = view.tablets.values().all(|t| {
                !t.is_connected()
                    || t.last_health
                        .as_deref()
                        .is_some_and(|s| s.received_at >= h.after)
            });
            if now >= h.deadline || (term_ok && health_ok) {
                mem.hold = None;
            }
        }

        let flapping = control::flapping(
            &mem.flap.reparents,
            ctl.acked_at_ms(ks, shard),
            now_ms,
            cfg.flap_limit,
            cfg.flap_window,
        );
        let disabled = ctl.disabled_reason(ks, shard);
        let gate = Gate {
            synced,
            config_enabled: cfg.enabled,
            disabled: disabled.clone(),
            flapping: flapping.as_ref().map(|f| f.reason(ks, shard)),
            durability_known: durability.is_some(),
            running: mem.running.is_some(),
            settling: mem.hold.is_some(),
            // Only a recoverable problem reads the gate ([`decide`]).
            primary_suspect: most_urgent(&problems)
                .and_then(|_| primary_suspect(&input, &cfg.analysis)),
            replica_grace: self.opts.replica_grace,
            mark_grace: cfg.lock_ttl,
        };
        let next = most_urgent(&problems).cloned();
        let episode = next
            .as_ref()
            .and_then(|p| mem.episodes.get(&episode_key(p)));
        let decision = decide(&problems, episode, &gate, now);
        let mut waiting = None;
        match decision {
            Decision::Nothing => {}
            Decision::Wait {
                problem,
                reason,
                record,
            } => {
                let ep_key = episode_key(&problem);
                if record {
                    if let Some(ep) = mem.episodes.get_mut(&ep_key) {
                        if ep.skips.insert(reason.clone()) {
                            tracing::info!(keyspace = ks, shard, problem = problem.code.as_str(), tablet = ?problem.tablet, %reason, "recovery skipped");
                            self.effects.push(Effect::AppendAudit {
                                keyspace: ks.to_string(),
                                shard: shard.to_string(),
                                entry: AuditEntry {
                                    at_ms: now_ms,
                                    term: view.term(),
                                    actor: self.actor.to_string(),
                                    action: skip_action(problem.code).to_string(),
                                    tablet: problem.tablet.clone(),
                                    outcome: recovery::OUTCOME_SKIPPED.to_string(),
                                    detail: format!("{}: {reason}", problem.detail),
                                    duration_ms: None,
                                },
                            });
                        }
                    }
                }
                waiting = Some(reason);
            }
            Decision::Recover(problem) => {
                let ep_key = episode_key(&problem);
                if let Some(ep) = mem.episodes.get_mut(&ep_key) {
                    if !ep.decided {
                        ep.decided = true;
                        let latency = now.saturating_duration_since(ep.first_seen);
                        metrics::histogram!(
                            "myha_orchestrator_detection_latency_seconds",
                            "problem" => problem.code.as_str()
                        )
                        .record(latency.as_secs_f64());
                        tracing::info!(
                            keyspace = ks, shard, problem = problem.code.as_str(), tablet = ?problem.tablet,
                            detail = %problem.detail, detection_ms = latency.as_millis() as u64,
                            "recovery decided"
                        );
                    } else {
                        tracing::info!(
                            keyspace = ks,
                            shard,
                            problem = problem.code.as_str(),
                            attempt = ep.failures + 1,
                            "recovery retried"
                        );
                    }
                }
                mem.running = Some(Running {
                    problem: problem.clone(),
                    since: now,
                    since_ms: now_ms,
                });
                let job = Job {
                    keyspace: ks.to_string(),
                    shard: shard.to_string(),
                    problem,
                    quarantined: quarantined.clone(),
                    last_primary: mem.last_primary.clone(),
                };
                self.effects.push(Effect::StartRecovery(job));
            }
        }
        let enabled_reason = if !cfg.enabled {
            Some(
                "automatic recovery is disabled in the configuration ([recovery] enabled = false)"
                    .to_string(),
            )
        } else {
            disabled.or_else(|| flapping.as_ref().map(|f| f.reason(ks, shard)))
        };
        ShardStatus {
            keyspace: ks.to_string(),
            shard: shard.to_string(),
            problems,
            next,
            recovery: mem.running.as_ref().map(|r| RecoveryInProgress {
                problem: r.problem.code,
                tablet: r.problem.tablet.clone(),
                detail: r.problem.detail.clone(),
                since_ms: r.since_ms,
                running_ms: recovery::millis(now.saturating_duration_since(r.since)),
            }),
            recoveries_enabled: enabled_reason.is_none(),
            disabled_reason: enabled_reason,
            flapping,
            waiting,
            last_recovery: mem.last.clone(),
        }
    }

    /// Until when an unchanged view of the shard needs no re-evaluation: the next tick while
    /// anything is going on, else the moment the first tablet's health would turn stale
    /// (at most a second away).
    fn due(&self, m: &ShardMem, view: &ShardView, status: &ShardStatus, now: Instant) -> Instant {
        let busy =
            m.running.is_some() || m.hold.is_some() || !m.episodes.is_empty() || m.flap.loading;
        if busy || !status.problems.is_empty() || status.waiting.is_some() {
            return now + self.opts.tick;
        }
        let stale_after = self.cfg.analysis.health_stale_after;
        view.tablets
            .values()
            .filter_map(|t| t.last_health.as_deref())
            .map(|h| h.received_at + stale_after + Duration::from_millis(1))
            .min()
            .unwrap_or(now + self.opts.tick)
            .min(now + Duration::from_secs(1))
            .max(now)
    }

    /// Starts reading the shard's audit log when its reparent history is unknown, stale
    /// (a recovery ended, the term changed) or old.
    fn maybe_load_audit(&mut self, mem: &mut ShardMem, key: &ShardKey, term: Term, now: Instant) {
        let reload = self.opts.flap_reload;
        let f = &mem.flap;
        let due = !f.loading
            && (f.loaded_at.is_none()
                || f.stale
                || f.loaded_term != term
                || f.loaded_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= reload));
        if !due || self.loads_in_flight >= MAX_AUDIT_LOADS {
            return;
        }
        mem.flap.loading = true;
        self.loads_in_flight += 1;
        self.effects.push(Effect::LoadAudit {
            keyspace: key.0.clone(),
            shard: key.1.clone(),
            term,
        });
    }
}

fn skip_action(code: ProblemCode) -> String {
    if code.is_dead_primary() {
        recovery::ACTION_EMERGENCY_REPARENT.to_string()
    } else {
        code.as_str().to_string()
    }
}

/// For tests and the API: the problems of one shard of a snapshot. Pure.
pub fn shard_problems(
    view: &ShardView,
    ctl: &ControlState,
    cfg: &analysis::AnalysisConfig,
    now: Instant,
    now_ms: u64,
) -> Vec<Problem> {
    let quarantined = ctl.quarantined(view.tablets.keys().map(String::as_str));
    let input = input::shard_input(
        view,
        now,
        now_ms,
        ctl.durability(&view.keyspace).unwrap_or_default(),
        &quarantined,
    );
    analysis::analyze(&input, cfg)
}

#[cfg(test)]
mod tests;
