//! A Jepsen-style chaos run (the nemesis and the checker): a seeded schedule of faults drawn
//! from the fault catalogue (process faults, and network faults between hosts), each applied
//! for a random while, then healed; a share of the steps overlap two faults (the second begins
//! while the first holds, on whichever tablet is then primary or a replica, and each is undone
//! when its own hold ends). On a 3-tablet semi_sync shard with every process on a host of its
//! own, under
//! - a writer through the gateway's RW port and one straight to the primary the shard record
//!   names (each with its own table: [`harness::Writer`] checks that no acknowledged write is lost
//!   and none was acknowledged by a deposed primary after the newer term began),
//! - a reader through the RO port (its reads must never be older than the lag bound allows),
//! - a sampler of every tablet's `read_only` every 50 ms over its unix socket (no network: it
//!   sees through every cut): never two tablets that both acknowledge writes around one sample.
//!
//! A shard that does not come back whole after a fault (a deposed primary quarantined for an
//! errant transaction, as the catalogue allows) ends a segment: the checks run on it and the
//! schedule goes on on a fresh cluster. Every violation names the schedule step and the seed,
//! so that `--seed` replays the schedule.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::netns::Direction;
use harness::{Ack, Cluster, ClusterOptions, Writer, WriterOptions};
use mysql_async::prelude::Queryable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bench::{self, Links};
use crate::gw;
use crate::ha::{self, BOUND};

/// One kind of fault of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    KillPrimary,
    FreezePrimary,
    KillPrimaryAgent,
    KillReplica,
    CutPrimary,
    PrimaryFromReplicas,
    OrchestratorFromPrimary,
    PrimaryFromEtcd,
    SlowPrimaryLink,
}

const PROCESS_KINDS: [Kind; 4] = [
    Kind::KillPrimary,
    Kind::FreezePrimary,
    Kind::KillPrimaryAgent,
    Kind::KillReplica,
];
const NETWORK_KINDS: [Kind; 5] = [
    Kind::CutPrimary,
    Kind::PrimaryFromReplicas,
    Kind::OrchestratorFromPrimary,
    Kind::PrimaryFromEtcd,
    Kind::SlowPrimaryLink,
];

impl Kind {
    /// Whether the catalogue expects a failover from this fault alone (held 1-4 s): the
    /// others (P5, a replica lost, P6, P16, a slow link) must leave the primary in place, and
    /// a failover after one of them is reported with the orchestrator's reason.
    fn may_fail_over(self) -> bool {
        matches!(
            self,
            Kind::KillPrimary | Kind::FreezePrimary | Kind::CutPrimary | Kind::PrimaryFromReplicas
        )
    }

    /// The process a process fault acts on (two faults of one step never share one).
    fn target(self, primary: usize, replica: usize) -> Option<Target> {
        match self {
            Kind::KillPrimary | Kind::FreezePrimary => Some(Target::Mysqld(primary)),
            Kind::KillPrimaryAgent => Some(Target::Agent(primary)),
            Kind::KillReplica => Some(Target::Mysqld(replica)),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::KillPrimary => "primary mysqld killed (P1)",
            Kind::FreezePrimary => "primary mysqld frozen (P3)",
            Kind::KillPrimaryAgent => "primary's agent killed (P5)",
            Kind::KillReplica => "a replica's mysqld killed",
            Kind::CutPrimary => "primary's host cut from all (P4)",
            Kind::PrimaryFromReplicas => "primary cut from its replicas (P20)",
            Kind::OrchestratorFromPrimary => "orchestrator cut from the primary (P6)",
            Kind::PrimaryFromEtcd => "primary cut from etcd (P16)",
            Kind::SlowPrimaryLink => "primary's link slowed (5 ms + 0-5 ms each way)",
        }
    }
}

/// A process a fault acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Mysqld(usize),
    Agent(usize),
}

/// A row of the report: steps of one fault alone, or steps of two overlapping faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Row {
    Single(Kind),
    Overlapping,
}

impl Row {
    pub fn name(self) -> &'static str {
        match self {
            Row::Single(k) => k.name(),
            Row::Overlapping => "two faults overlapping (any two of the above)",
        }
    }
}

/// The share of steps that overlap two faults by default.
pub const OVERLAP_SHARE: f64 = 1.0 / 3.0;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub seed: u64,
    /// Faults in all (an overlapping step counts two).
    pub faults: usize,
    /// The share of steps that overlap two faults (0 for one at a time; clamped to 0-1).
    pub overlap: f64,
    /// Network faults need [`Links::Netns`]; on loopback only process faults are drawn.
    pub links: Links,
}

#[derive(Debug, Default, Clone)]
pub struct KindStats {
    /// Faults (two per overlapping step).
    pub injected: usize,
    /// New terms.
    pub failovers: usize,
    /// Per step: the longest time without an acknowledged write through the gateway, from the
    /// fault until the shard was whole again.
    pub unavailability: Vec<Option<Duration>>,
    pub lost: usize,
    pub deposed: usize,
    pub dual_writer: usize,
}

/// What a chaos run found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub links: String,
    /// The schedule as run, one line per step.
    pub steps: Vec<String>,
    pub kinds: BTreeMap<Row, KindStats>,
    /// Samples with two writable tablets (expected briefly: a cut-off old primary stays
    /// writable until it fences itself, without acknowledging anything).
    pub writable_pairs: usize,
    pub stale_reads: usize,
    /// Failovers after a fault the catalogue expects none from, with the orchestrator's
    /// reason (a needless failover loses nothing but deposes a working primary).
    pub unexpected_failovers: Vec<String>,
    pub segments: usize,
    /// Each with its step and the seed.
    pub violations: Vec<String>,
}

impl Report {
    /// Faults injected in all (an overlapping step counts two).
    pub fn faults(&self) -> usize {
        self.kinds.values().map(|k| k.injected).sum()
    }

    /// No acknowledged write lost, none acknowledged by a deposed primary, no dual writer, no
    /// stale read, and no other violation.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    fn totals(&self) -> (usize, usize, usize) {
        self.kinds.values().fold((0, 0, 0), |(l, d, w), k| {
            (l + k.lost, d + k.deposed, w + k.dual_writer)
        })
    }

    /// The markdown table, with the seed and the goals.
    pub fn table(&self) -> String {
        let mut out = format!(
            "\n### chaos run: {} faults in {} steps, seed {}, 3-tablet semi_sync shard, {}, {} cluster(s)\n\n\
             | fault | injected | failovers | write unavailability min | p50 | p99 | max | acked writes lost | acked by a deposed primary | dual-writer samples |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            self.faults(),
            self.steps.len(),
            self.seed,
            self.links,
            self.segments
        );
        for (kind, s) in &self.kinds {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                kind.name(),
                s.injected,
                s.failovers,
                bench::stats_with(&s.unavailability, bench::secs),
                s.lost,
                s.deposed,
                s.dual_writer
            ));
        }
        let (lost, deposed, dual) = self.totals();
        out.push_str(&format!(
            "| **all** | {} | {} | | | | | **{lost}** | **{deposed}** | **{dual}** |\n\n\
             goal: >= 100 faults with 0 / 0 / 0. Samples with two writable tablets, neither \
             acknowledging twice: {}; reads through the RO port older than the lag bound: {}; \
             failovers not expected from their fault: {}; violations: {}\n",
            self.faults(),
            self.kinds.values().map(|k| k.failovers).sum::<usize>(),
            self.writable_pairs,
            self.stale_reads,
            if self.unexpected_failovers.is_empty() {
                "none".to_string()
            } else {
                self.unexpected_failovers.join("; ")
            },
            if self.violations.is_empty() {
                "none".to_string()
            } else {
                self.violations.join("; ")
            }
        ));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let (lost, deposed, dual) = self.totals();
        serde_json::json!({
            "seed": self.seed,
            "links": self.links,
            "faults": self.faults(),
            "steps_run": self.steps.len(),
            "segments": self.segments,
            "lost": lost,
            "deposed_acks": deposed,
            "dual_writer_samples": dual,
            "writable_pairs": self.writable_pairs,
            "stale_reads": self.stale_reads,
            "unexpected_failovers": self.unexpected_failovers,
            "violations": self.violations,
            "steps": self.steps,
            "kinds": self.kinds.iter().map(|(k, s)| serde_json::json!({
                "kind": k.name(),
                "injected": s.injected,
                "failovers": s.failovers,
                "unavailability_s": s.unavailability.iter()
                    .map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
                "lost": s.lost,
                "deposed_acks": s.deposed,
                "dual_writer_samples": s.dual_writer,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One step as run: its number, its row and start.
#[derive(Debug, Clone)]
struct Step {
    n: usize,
    row: Row,
    from: Instant,
}

/// Samples of the writable tablets: (when, their aliases).
type Samples = Vec<(Instant, Vec<String>)>;

/// Every tablet's `read_only` every 50 ms, over the unix socket.
struct Sampler {
    samples: Arc<Mutex<Samples>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(c: &Cluster) -> Sampler {
        let sockets: Vec<(String, String)> = c
            .tablets()
            .iter()
            .map(|t| {
                (
                    t.alias().to_string(),
                    t.mysqld().socket().display().to_string(),
                )
            })
            .collect();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut conns: Vec<Option<mysql_async::Conn>> = sockets.iter().map(|_| None).collect();
            loop {
                let at = Instant::now();
                let mut writable = Vec::new();
                for (i, (alias, socket)) in sockets.iter().enumerate() {
                    if conns[i].is_none() {
                        let opts = mysql_async::OptsBuilder::default()
                            .socket(Some(socket.clone()))
                            .user(Some("root"))
                            .prefer_socket(true);
                        let conn = tokio::time::timeout(
                            Duration::from_millis(200),
                            mysql_async::Conn::new(opts),
                        )
                        .await;
                        conns[i] = conn.ok().and_then(Result::ok);
                    }
                    let Some(conn) = conns[i].as_mut() else {
                        continue;
                    };
                    let q = tokio::time::timeout(
                        Duration::from_millis(200),
                        conn.query_first::<i64, _>("SELECT @@global.read_only"),
                    )
                    .await;
                    match q {
                        Ok(Ok(Some(0))) => writable.push(alias.clone()),
                        Ok(Ok(_)) => {}
                        _ => conns[i] = None,
                    }
                }
                out.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((at, writable));
                tokio::time::sleep_until((at + Duration::from_millis(50)).into()).await;
            }
        });
        Sampler { samples, task }
    }

    fn stop(self) -> Samples {
        self.task.abort();
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.clone()
    }
}

/// `MAX(id)` of the gateway writer's table through the RO port every 100 ms: (when, value).
struct Reader {
    reads: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(c: &Cluster, table: &str) -> Option<Reader> {
        let ro = c.gateway()?.ro_addr()?;
        let opts = gw::app_opts(c, ro);
        let sql = format!("SELECT COALESCE(MAX(id), 0) FROM {table}");
        let reads = Arc::new(Mutex::new(Vec::new()));
        let out = reads.clone();
        let task = tokio::spawn(async move {
            loop {
                let started = Instant::now();
                let read = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut conn = mysql_async::Conn::new(opts.clone()).await.ok()?;
                    let v: Option<u64> = conn.query_first(sql.as_str()).await.ok()?;
                    let _ = conn.disconnect().await;
                    v
                })
                .await;
                if let Ok(Some(v)) = read {
                    // The read saw the table as of some moment after it started.
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((started, v));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Some(Reader { reads, task })
    }

    fn stop(self) -> Vec<(Instant, u64)> {
        self.task.abort();
        let r = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        r.clone()
    }
}

/// A cluster with its writers, reader and sampler.
struct Segment {
    c: Cluster,
    via_gateway: Writer,
    direct: Writer,
    reader: Option<Reader>,
    sampler: Sampler,
    steps: Vec<Step>,
}

const GATEWAY_TABLE: &str = "chaos_gateway";
const DIRECT_TABLE: &str = "chaos_direct";
/// How stale a read through the RO port may be: the gateway's default `max_replica_lag` (5 s)
/// plus the time for a lagging replica to leave the routing (<= 500 ms) and slack.
const READ_BOUND: Duration = Duration::from_secs(7);
/// How close to a sample an ack must be for its tablet to count as acknowledging then.
const ACK_NEAR: Duration = Duration::from_millis(100);

fn options(links: Links) -> ClusterOptions {
    ClusterOptions {
        hosts: links.hosts(),
        start_gateway: true,
        agent_log_level: "warn".into(),
        orchestrator_log_level: "warn".into(),
        gateway_log_level: "warn".into(),
        ..ha::ha_options_with(3, |cfg| {
            // Many failovers in a row are the point here, not flapping protection.
            cfg.recovery.flap_limit = 1_000_000;
        })
    }
}

async fn new_segment(links: Links) -> Segment {
    let c = Cluster::start(options(links))
        .await
        .expect("cluster starts");
    links.shape(&c);
    let g = c.gateway().expect("gateway");
    gw::wait_shard_routes(&c, g).await;
    ha::wait_quiet(ha::orch(&c), &c, BOUND).await;
    let writer = |via, table: &str| WriterOptions {
        via,
        table: table.into(),
        // Above the gateway's buffer window (5 s): a held connect is the point.
        connect_timeout: Duration::from_secs(10),
        max_duration: Duration::from_secs(24 * 3600),
        pause: Duration::from_millis(5),
        ..WriterOptions::default()
    };
    let via_gateway = Writer::start(&c, writer(g.rw_addr(), GATEWAY_TABLE))
        .await
        .expect("writer through the gateway");
    let direct = Writer::start(&c, writer(None, DIRECT_TABLE))
        .await
        .expect("direct writer");
    via_gateway
        .wait_more_acks(20, BOUND)
        .await
        .expect("acks through the gateway");
    direct.wait_more_acks(20, BOUND).await.expect("direct acks");
    let reader = Reader::start(&c, GATEWAY_TABLE);
    let sampler = Sampler::start(&c);
    Segment {
        c,
        via_gateway,
        direct,
        reader,
        sampler,
        steps: Vec::new(),
    }
}

/// The step running at `at` (or the last one before it).
fn step_at(steps: &[Step], at: Instant) -> Option<&Step> {
    steps.iter().rev().find(|s| s.from <= at)
}

/// Checks a segment and folds its findings into `report`.
async fn end_segment(seg: Segment, report: &mut Report) {
    let Segment {
        c,
        via_gateway,
        direct,
        reader,
        sampler,
        steps,
    } = seg;
    let samples = sampler.stop();
    let reads = reader.map(Reader::stop).unwrap_or_default();
    let seed = report.seed;
    let blame = |report: &mut Report, at: Instant, what: String, field: fn(&mut KindStats)| {
        let step = step_at(&steps, at);
        if let Some(s) = step {
            field(report.kinds.entry(s.row).or_default());
        }
        report.violations.push(format!(
            "{what} (step {}, seed {seed})",
            step.map_or("before the first fault".to_string(), |s| format!(
                "{}: {}",
                s.n,
                s.row.name()
            ))
        ));
    };
    let mut all_acks: Vec<Ack> = Vec::new();
    for (name, w) in [("gateway", &via_gateway), ("direct", &direct)] {
        w.stop().await;
        let acks = w.acks();
        match w.check(&c).await {
            Ok(r) => {
                for id in &r.lost {
                    let at = acks
                        .iter()
                        .find(|a| a.id == *id)
                        .map_or_else(Instant::now, |a| a.acked_at);
                    blame(
                        report,
                        at,
                        format!("{name} writer: acknowledged write {id} lost"),
                        |k| k.lost += 1,
                    );
                }
                for d in &r.deposed_acks {
                    blame(report, d.ack.acked_at, format!("{name} writer: {d}"), |k| {
                        k.deposed += 1
                    });
                }
            }
            Err(e) => report
                .violations
                .push(format!("{name} writer: check failed: {e} (seed {seed})")),
        }
        all_acks.extend(acks);
    }
    // Two tablets acknowledging writes around one sample: writes both sent and acknowledged
    // within ACK_NEAR of it (a write sent long before, answered late by a thawed old primary,
    // was committed before the failover: the writers' check calls it late, not deposed). One
    // hand-over from a tablet to another near a sample is a failover (the writers' term check
    // shows the old one stopped before the new term began); acks that go back and forth
    // between them are two writers.
    all_acks.sort_by_key(|a| a.acked_at);
    for (at, writable) in &samples {
        if writable.len() < 2 {
            continue;
        }
        report.writable_pairs += 1;
        let near: Vec<&Ack> = all_acks
            .iter()
            .filter(|a| a.sent_at + ACK_NEAR >= *at && a.acked_at <= *at + ACK_NEAR)
            .filter(|a| writable.contains(&a.tablet))
            .collect();
        let switches = near
            .windows(2)
            .filter(|p| p[0].tablet != p[1].tablet)
            .count();
        if switches >= 2 {
            let seq: Vec<String> = near
                .iter()
                .map(|a| {
                    let ms = a.acked_at.saturating_duration_since(*at).as_millis() as i64
                        - at.saturating_duration_since(a.acked_at).as_millis() as i64;
                    format!("{}@{ms:+}ms", a.tablet)
                })
                .collect();
            blame(
                report,
                *at,
                format!(
                    "dual writer: {writable:?} writable, acks alternating around the sample: {}",
                    seq.join(", ")
                ),
                |k| k.dual_writer += 1,
            );
        }
    }
    // A read through the RO port older than the bound: it missed a write acknowledged
    // through the gateway more than READ_BOUND before it started.
    let gw_acks = via_gateway.acks();
    for (at, v) in &reads {
        let missed = gw_acks
            .iter()
            .filter(|a| a.acked_at + READ_BOUND <= *at && a.id > *v)
            .map(|a| a.id)
            .max();
        if let Some(id) = missed {
            report.stale_reads += 1;
            blame(
                report,
                *at,
                format!("stale read through the RO port: max id {v}, but {id} was acknowledged over {READ_BOUND:?} earlier"),
                |_| {},
            );
        }
    }
    report.segments += 1;
    drop(c);
}

/// Index of the tablet the shard record names primary.
async fn primary_index(c: &Cluster) -> Option<usize> {
    let p = c.primary().await.ok()?;
    Some(p.index())
}

/// A network fault as applied: healing its host removes every fault about that host, so the
/// others still holding there are applied again.
#[derive(Debug, Clone)]
struct NetFault {
    host: String,
    what: NetWhat,
}

#[derive(Debug, Clone)]
enum NetWhat {
    Isolate,
    Cut(Vec<String>),
    Delay(Duration, Duration),
}

impl NetFault {
    fn apply(&self, c: &Cluster) -> Result<(), String> {
        let net = c.net().map_err(|e| e.to_string())?;
        let h = self.host.as_str();
        match &self.what {
            NetWhat::Isolate => net.isolate(h, Direction::Both),
            NetWhat::Cut(others) => {
                let others: Vec<&str> = others.iter().map(String::as_str).collect();
                net.cut(h, &others, Direction::Both)
            }
            NetWhat::Delay(one_way, jitter) => net.delay(h, *one_way, *jitter),
        }
        .map_err(|e| e.to_string())
    }
}

/// Applies `kind`, with `primary` the tablet the shard record names, leaving alone the
/// processes in `busy` (another fault of the step holds them); returns what undoes it.
async fn inject(
    c: &Cluster,
    kind: Kind,
    primary: usize,
    busy: &[Target],
    rng: &mut StdRng,
) -> Result<Undo, String> {
    let p = c.tablet(primary);
    let pa = p.alias().to_string();
    let replicas: Vec<usize> = c
        .tablets()
        .iter()
        .map(|t| t.index())
        .filter(|i| *i != primary)
        .collect();
    let free: Vec<usize> = replicas
        .iter()
        .copied()
        .filter(|i| !busy.contains(&Target::Mysqld(*i)))
        .collect();
    let replica = match free.len() {
        0 => None,
        n => Some(free[rng.random_range(0..n)]),
    };
    if kind == Kind::KillReplica && replica.is_none() {
        return Err("every replica's mysqld is already down".into());
    }
    if let Some(t) = kind.target(primary, replica.unwrap_or(primary)) {
        if busy.contains(&t) {
            return Err(format!("{t:?} is already held by the step's other fault"));
        }
    }
    let e = |e: harness::HarnessError| e.to_string();
    let net = |what: NetWhat, host: &str| -> Result<Undo, String> {
        let f = NetFault {
            host: host.to_string(),
            what,
        };
        f.apply(c)?;
        Ok(Undo::Heal(f))
    };
    match kind {
        Kind::KillPrimary => {
            p.mysqld().kill().map_err(e)?;
            Ok(Undo::StartMysqld(primary))
        }
        Kind::FreezePrimary => {
            p.mysqld().freeze().map_err(e)?;
            Ok(Undo::Thaw(primary))
        }
        Kind::KillPrimaryAgent => {
            p.agent_proc().map_err(e)?.kill().map_err(e)?;
            Ok(Undo::StartAgent(primary))
        }
        Kind::KillReplica => {
            let r = replica.ok_or("no replica")?;
            c.tablet(r).mysqld().kill().map_err(e)?;
            Ok(Undo::StartMysqld(r))
        }
        Kind::CutPrimary => net(NetWhat::Isolate, &pa),
        Kind::PrimaryFromReplicas => {
            let others = replicas.iter().map(|i| c.tablet(*i).alias().to_string());
            net(NetWhat::Cut(others.collect()), &pa)
        }
        Kind::OrchestratorFromPrimary => net(NetWhat::Cut(vec![pa]), "orchestrator"),
        Kind::PrimaryFromEtcd => net(NetWhat::Cut(vec!["etcd".into()]), &pa),
        Kind::SlowPrimaryLink => net(
            NetWhat::Delay(Duration::from_millis(5), Duration::from_millis(5)),
            &pa,
        ),
    }
}

/// How a fault is undone.
#[derive(Debug)]
enum Undo {
    StartMysqld(usize),
    Thaw(usize),
    StartAgent(usize),
    Heal(NetFault),
}

impl Undo {
    /// The tablet or host the fault acts on.
    fn on(&self, c: &Cluster) -> String {
        match self {
            Undo::StartMysqld(i) | Undo::Thaw(i) | Undo::StartAgent(i) => {
                c.tablet(*i).alias().to_string()
            }
            Undo::Heal(f) => f.host.clone(),
        }
    }

    fn target(&self) -> Option<Target> {
        match self {
            Undo::StartMysqld(i) | Undo::Thaw(i) => Some(Target::Mysqld(*i)),
            Undo::StartAgent(i) => Some(Target::Agent(*i)),
            Undo::Heal(_) => None,
        }
    }
}

/// Undoes `u`; `others` are the step's faults that still hold.
async fn undo(c: &Cluster, u: Undo, others: &[&Undo], links: Links) -> Result<(), String> {
    let e = |e: harness::HarnessError| e.to_string();
    match u {
        Undo::StartMysqld(i) => c.tablet(i).mysqld().start().await.map_err(e),
        Undo::Thaw(i) => c.tablet(i).mysqld().thaw().map_err(e),
        // While another fault holds, its host may be cut from this one: started, not awaited
        // (the shard's restoration, checked after the step, includes its agent).
        Undo::StartAgent(i) if !others.is_empty() => {
            c.tablet(i).agent_proc().map_err(e)?.spawn().map_err(e)
        }
        Undo::StartAgent(i) => c
            .tablet(i)
            .agent_proc()
            .map_err(e)?
            .start()
            .await
            .map_err(e),
        Undo::Heal(f) => {
            c.net().map_err(e)?.heal(&f.host).map_err(e)?;
            // A heal removes the host's link delay and its other faults too.
            links.shape_host(c, &f.host);
            for o in others {
                if let Undo::Heal(g) = o {
                    if g.host == f.host {
                        g.apply(c)?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// The shard whole again: three healthy tablets, nothing reported, replication flowing. `Err`
/// with why not, at once when a tablet is quarantined (only an operator brings it back).
async fn restored(c: &Cluster, bound: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < bound {
        let problems = ha::problems(&ha::shard_json(ha::orch(c), c).await);
        if let Some((_, tablet, detail)) =
            problems.iter().find(|(code, _, _)| code == "quarantined")
        {
            return Err(format!("{tablet:?} quarantined: {detail}"));
        }
        match ha::shard_healthy(c, &[]).await {
            // Replication flowing, not only threads that read "Yes" (a healed cut can leave the
            // IO thread's connection dead until TCP retransmits): every replica applies the
            // primary's position within a second.
            Ok(_) if problems.is_empty() => match c.wait_replicated(Duration::from_secs(1)).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Ok(_) => last = format!("{problems:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

/// The longest time without an acknowledged write in `acks` from `from` to `to` (from the
/// fault to its first ack counts).
fn unavailability(acks: &[Ack], from: Instant, to: Instant) -> Option<Duration> {
    let mut times: Vec<Instant> = acks
        .iter()
        .map(|a| a.acked_at)
        .filter(|t| *t > from && *t <= to)
        .collect();
    times.sort();
    if times.is_empty() {
        return None;
    }
    let mut prev = from;
    let mut worst = Duration::ZERO;
    for t in times {
        worst = worst.max(t.duration_since(prev));
        prev = t;
    }
    Some(worst)
}

/// The second fault of an overlapping step: when it begins after the first and how long it
/// holds.
struct Second {
    kind: Kind,
    after: Duration,
    hold: Duration,
}

/// A fault of a step that holds: what undoes it, and when.
struct Holding {
    kind: Kind,
    until: Instant,
    undo: Undo,
}

/// Runs the schedule; prints each step as it goes.
pub async fn run(opts: Options) -> Report {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let kinds: Vec<Kind> = match opts.links {
        Links::Loopback => PROCESS_KINDS.to_vec(),
        Links::Netns { .. } => PROCESS_KINDS
            .iter()
            .chain(&NETWORK_KINDS)
            .copied()
            .collect(),
    };
    let mut report = Report {
        seed: opts.seed,
        links: opts.links.name(),
        ..Report::default()
    };
    let mut seg = Some(new_segment(opts.links).await);
    let mut n = 0;
    while report.faults() < opts.faults {
        n += 1;
        let mut s = match seg.take() {
            Some(s) => s,
            None => new_segment(opts.links).await,
        };
        // The step's faults and times are drawn up front, from the seed (inject only draws
        // which replica a replica fault takes).
        let kind = kinds[rng.random_range(0..kinds.len())];
        let hold = Duration::from_millis(rng.random_range(1000..4000));
        let share = if opts.overlap.is_finite() {
            opts.overlap.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let second =
            (opts.faults - report.faults() >= 2 && rng.random_bool(share)).then(|| Second {
                kind: kinds[rng.random_range(0..kinds.len())],
                after: Duration::from_millis(rng.random_range(0..hold.as_millis() as u64)),
                hold: Duration::from_millis(rng.random_range(1000..4000)),
            });
        let before = ha::record(&s.c).await;
        let Some(primary) = primary_index(&s.c).await else {
            report.violations.push(format!(
                "step {n}: no primary before the fault (seed {})",
                opts.seed
            ));
            end_segment(s, &mut report).await;
            continue;
        };
        let from = Instant::now();
        let first = match inject(&s.c, kind, primary, &[], &mut rng).await {
            Ok(u) => u,
            Err(e) => {
                println!("step {n}: {} could not be injected: {e}", kind.name());
                seg = Some(s);
                continue;
            }
        };
        let mut what = format!(
            "{} on {} for {:.1} s",
            kind.name(),
            first.on(&s.c),
            hold.as_secs_f64()
        );
        let mut holding = vec![Holding {
            kind,
            until: from + hold,
            undo: first,
        }];
        let mut overlapped = false;
        if let Some(two) = &second {
            tokio::time::sleep_until((from + two.after).into()).await;
            // On whichever tablet is primary now (a failover may have begun or ended).
            let now_primary = primary_index(&s.c).await.unwrap_or(primary);
            let busy: Vec<Target> = holding.iter().filter_map(|h| h.undo.target()).collect();
            let injected =
                if two.kind == kind && NETWORK_KINDS.contains(&kind) && now_primary == primary {
                    Err("the same fault already holds there".to_string())
                } else {
                    inject(&s.c, two.kind, now_primary, &busy, &mut rng).await
                };
            match injected {
                Ok(u) => {
                    what.push_str(&format!(
                        ", and {:.1} s in {} on {} for {:.1} s",
                        two.after.as_secs_f64(),
                        two.kind.name(),
                        u.on(&s.c),
                        two.hold.as_secs_f64()
                    ));
                    holding.push(Holding {
                        kind: two.kind,
                        until: Instant::now() + two.hold,
                        undo: u,
                    });
                    overlapped = true;
                }
                Err(e) => what.push_str(&format!(
                    ", and {:.1} s in {} not injected: {e}",
                    two.after.as_secs_f64(),
                    two.kind.name()
                )),
            }
        }
        // Each fault is undone when its own hold ends, the others still holding.
        holding.sort_by_key(|h| h.until);
        let mut undone: Result<(), String> = Ok(());
        while !holding.is_empty() {
            let h = holding.remove(0);
            tokio::time::sleep_until(h.until.into()).await;
            let rest: Vec<&Undo> = holding.iter().map(|h| &h.undo).collect();
            if let Err(e) = undo(&s.c, h.undo, &rest, opts.links).await {
                undone = Err(format!("{}: {e}", h.kind.name()));
            }
        }
        let row = if overlapped {
            Row::Overlapping
        } else {
            Row::Single(kind)
        };
        let back = restored(&s.c, Duration::from_secs(30)).await;
        let to = Instant::now();
        let after = ha::record(&s.c).await;
        let unavailable = unavailability(&s.via_gateway.acks(), from, to);
        let stats = report.kinds.entry(row).or_default();
        stats.injected += if overlapped { 2 } else { 1 };
        let terms = after.term.get().saturating_sub(before.term.get()) as usize;
        stats.failovers += terms;
        stats.unavailability.push(unavailable);
        let mut why = String::new();
        if terms > 0 && !overlapped && !kind.may_fail_over() {
            let reasons: Vec<String> = ha::audit(&s.c)
                .await
                .into_iter()
                .filter(|e| e.action == "emergency_reparent" && e.term > before.term)
                .map(|e| format!("term {} {}: {}", e.term, e.outcome, e.detail))
                .collect();
            why = format!(
                " (not expected from this fault; the orchestrator's reason: {})",
                reasons.join(" | ")
            );
            report.unexpected_failovers.push(format!("step {n}{why}"));
        }
        let line = format!(
            "step {n}: {what}: {}{why}; longest write gap {}; {}",
            if terms > 0 {
                format!(
                    "failover term {} -> {} ({:?})",
                    before.term, after.term, after.primary
                )
            } else {
                "no failover".to_string()
            },
            unavailable.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64())),
            match (&undone, &back) {
                (Ok(()), Ok(())) => "shard whole again".to_string(),
                (Err(e), _) => format!("undo failed ({e}): next step on a fresh cluster"),
                (_, Err(e)) => format!("not whole ({e}): next step on a fresh cluster"),
            }
        );
        println!("{line}");
        report.steps.push(line);
        s.steps.push(Step { n, row, from });
        if undone.is_ok() && back.is_ok() {
            seg = Some(s);
        } else {
            end_segment(s, &mut report).await;
        }
    }
    if let Some(s) = seg {
        end_segment(s, &mut report).await;
    }
    report
}
