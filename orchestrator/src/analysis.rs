//! Shard analysis: `(shard input, now) -> problems`. Pure: the caller builds [`ShardInput`]
//! from the tabletwatch snapshot (or from fresh `FullStatus` answers after taking the lock)
//! with ages measured against one explicit `now`.
//!
//! Invariant: a primary is only ever called dead when the orchestrator cannot see it AND every
//! reachable replica's own probe of its mysqld fails. A primary that only the orchestrator
//! cannot see is `UnreachablePrimary`, never a failover (scenarios P5, P6).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use topo::Term;

use gtid::{Flavor, GtidSet};
use myha_proto::agent as pb;
use serde::Serialize;
use topo::{Durability, PromotionRule, ShardRecord, TabletRecord};

pub use crate::problem::{ProblemCode, Remedy, Subject};
use crate::ranking::{self, Rank};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub code: ProblemCode,
    /// The tablet it is about; `None` for shard-wide problems.
    pub tablet: Option<String>,
    /// What was seen, in words an operator can act on.
    pub detail: String,
}

impl Problem {
    fn new(code: ProblemCode, tablet: Option<&str>, detail: impl Into<String>) -> Problem {
        debug_assert_eq!(
            tablet.is_some(),
            code.facts().subject != Subject::Shard,
            "{code:?}: a problem names a tablet unless it is about the shard"
        );
        Problem {
            code,
            tablet: tablet.map(str::to_string),
            detail: detail.into(),
        }
    }
}

/// One tablet as the analysis sees it.
#[derive(Debug, Clone)]
pub struct TabletInput {
    /// Shared with the snapshot (the engine analyses a changed shard without copying it).
    pub record: Arc<TabletRecord>,
    /// The latest health, however old.
    pub health: Option<Arc<pb::Health>>,
    /// Age of `health` at `now`; `None` when none was ever received.
    pub health_age: Option<Duration>,
    /// The orchestrator's stream from this agent is up.
    pub stream_connected: bool,
    /// `health`'s GTID position, parsed, when the builder already had it (the engine keeps
    /// the parse of a health message it analysed before); `None`: parsed from `health` here.
    pub position: Option<Arc<GtidSet>>,
}

#[derive(Debug, Clone)]
pub struct ShardInput {
    pub keyspace: String,
    pub shard: String,
    pub record: Option<Arc<ShardRecord>>,
    pub durability: Durability,
    pub tablets: Vec<TabletInput>,
    /// Quarantined tablets and why.
    pub quarantined: BTreeMap<String, String>,
    /// Wall clock at `now`, ms since the epoch (to age the replicas' probe results).
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisConfig {
    /// Health older than this does not count as seeing the tablet.
    pub health_stale_after: Duration,
    /// A replica's probe of the primary older than this does not count as a confirmation.
    pub probe_stale_after: Duration,
    /// A primary semi-sync timeout below this could fall back to async: not lossless.
    pub min_semi_sync_timeout: Duration,
    /// See [`ProblemCode::IsolatedPrimary`].
    pub isolated_primary_after: Duration,
    /// See [`ProblemCode::PrimaryWritesStalled`].
    pub writes_stalled_after: Duration,
    /// See [`ProblemCode::StalledPrimary`]: `None` (the default) never fails over on a stall.
    pub stalled_failover_after: Option<Duration>,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            health_stale_after: Duration::from_millis(1500),
            probe_stale_after: Duration::from_millis(1500),
            min_semi_sync_timeout: topo::MIN_LOSSLESS_SEMI_SYNC_TIMEOUT,
            isolated_primary_after: Duration::from_secs(1),
            writes_stalled_after: Duration::from_secs(2),
            stalled_failover_after: None,
        }
    }
}

impl TabletInput {
    pub fn alias(&self) -> &str {
        &self.record.alias
    }

    /// Fresh health from a live stream.
    pub fn fresh_health(&self, cfg: &AnalysisConfig) -> Option<&pb::Health> {
        match (self.stream_connected, self.health_age, &self.health) {
            (true, Some(age), Some(h)) if age <= cfg.health_stale_after => Some(h),
            _ => None,
        }
    }

    /// Seen through its agent with mysqld answering.
    pub fn mysql_seen(&self, cfg: &AnalysisConfig) -> Option<&pb::Health> {
        self.fresh_health(cfg).filter(|h| h.mysql_reachable)
    }

    /// The GTID position of `h` (this tablet's health), from [`TabletInput::position`] when
    /// set.
    fn position_of<'a>(&'a self, h: &pb::Health) -> Option<Cow<'a, GtidSet>> {
        match &self.position {
            Some(p) => Some(Cow::Borrowed(&**p)),
            None => position(h).map(Cow::Owned),
        }
    }
}

pub fn flavor_of(h: &pb::Health) -> Flavor {
    match h.mysql.as_ref().map(|m| m.flavor.as_str()) {
        Some("mysql") => Flavor::MySql,
        _ => Flavor::MariaDb,
    }
}

pub fn position(h: &pb::Health) -> Option<GtidSet> {
    let m = h.mysql.as_ref()?;
    GtidSet::parse(flavor_of(h), &m.gtid_position).ok()
}

fn running(s: i32) -> bool {
    s == pb::ThreadState::Running as i32
}

pub fn replicating(h: &pb::Health) -> bool {
    h.replication
        .as_ref()
        .is_some_and(|r| r.configured && running(r.io_state) && running(r.sql_state))
}

/// Transactions of `replica` that `reference` (the primary) never had and that the reference did
/// not write itself: errant ones. A replica merely ahead of a slightly older primary health holds
/// the primary's own transactions, which are not errant.
///
/// `reference_writer` is the primary's server id (MariaDB) or server uuid (MySQL).
pub fn errant(replica: &GtidSet, reference: &GtidSet, reference_writer: &str) -> Option<String> {
    let diff = replica.difference(reference).ok()?;
    if diff.is_empty() {
        return None;
    }
    match &diff {
        gtid::GtidDifference::MariaDb(d) => {
            let foreign: Vec<String> = d
                .ranges()
                .iter()
                .filter(|r| r.server_id.to_string() != reference_writer)
                .map(|r| r.to_string())
                .collect();
            (!foreign.is_empty()).then(|| foreign.join(","))
        }
        gtid::GtidDifference::MySql(set) => {
            let text = set.to_string();
            let foreign: Vec<&str> = text
                .split(',')
                .filter(|part| {
                    !part
                        .to_ascii_lowercase()
                        .starts_with(&reference_writer.to_ascii_lowercase())
                })
                .collect();
            (!foreign.is_empty()).then(|| foreign.join(","))
        }
    }
}

/// MariaDB: the entries of `tablet_state` (a `gtid_binlog_state`) that `primary_state` does not
/// cover: a (domain, server) it lacks or has at a lower sequence. Such a transaction is not on
/// the primary even when the primary's position is numerically ahead (it wrote its own
/// transactions at those sequence numbers), so the tablet cannot replicate from it.
pub fn binlog_state_missing(
    tablet_state: &str,
    primary_state: &str,
) -> Result<Vec<String>, String> {
    Ok(binlog_state_gaps(tablet_state, primary_state)?
        .into_iter()
        .map(|g| g.to_string())
        .collect())
}

/// [`binlog_state_missing`]'s entries, as GTIDs.
fn binlog_state_gaps(
    tablet_state: &str,
    primary_state: &str,
) -> Result<Vec<gtid::MariaDbGtid>, String> {
    fn parse(s: &str) -> Result<Vec<gtid::MariaDbGtid>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<gtid::MariaDbGtid>().map_err(|e| e.to_string()))
            .collect()
    }
    let primary = parse(primary_state)?;
    Ok(parse(tablet_state)?
        .into_iter()
        .filter(|g| {
            !primary
                .iter()
                .any(|p| p.domain == g.domain && p.server_id == g.server_id && p.seq >= g.seq)
        })
        .collect())
}

/// MariaDB: the entries of `replica`'s `gtid_binlog_state` that `primary`'s lacks (see
/// [`binlog_state_missing`]), leaving out the primary's own server id (`primary_writer`): a
/// replica's health may be newer than the primary's, and holding what the primary wrote since
/// is not errant. `None` for MySQL, when either state is unknown, or when nothing is missing.
pub fn errant_in_binlog_state(
    replica: &pb::Health,
    primary: &pb::Health,
    primary_writer: &str,
) -> Option<String> {
    if flavor_of(replica) != Flavor::MariaDb {
        return None;
    }
    let r = replica.mysql.as_ref()?.gtid_binlog_state.as_str();
    let p = primary.mysql.as_ref()?.gtid_binlog_state.as_str();
    // Equal states (the usual case between pushes) need no parsing.
    if r.is_empty() || p.is_empty() || r == p {
        return None;
    }
    let foreign: Vec<String> = binlog_state_gaps(r, p)
        .ok()?
        .into_iter()
        .filter(|g| g.server_id.to_string() != primary_writer)
        .map(|g| g.to_string())
        .collect();
    (!foreign.is_empty()).then(|| foreign.join(","))
}

/// MySQL/MariaDB error 1236 (ER_MASTER_FATAL_ERROR_READING_BINLOG): the source lacks what the
/// replica asks for; restarting replication cannot help.
const ER_SOURCE_FATAL_READING_BINLOG: u32 = 1236;

pub fn writer_id(h: &pb::Health) -> String {
    match (flavor_of(h), h.mysql.as_ref()) {
        (Flavor::MySql, Some(m)) => m.server_uuid.clone(),
        (_, Some(m)) => m.server_id.to_string(),
        (_, None) => String::new(),
    }
}

/// All problems of one shard, most urgent first. While the shard record marks a reparent in
/// progress, the problems held while reparenting ([`crate::problem::Facts`]) are left out and
/// [`ProblemCode::ReparentInProgress`] is reported instead.
pub fn analyze(input: &ShardInput, cfg: &AnalysisConfig) -> Vec<Problem> {
    if let Some(p) = term_ahead_of_record(input, cfg) {
        return vec![p];
    }
    let mut out = analyze_topology(input, cfg);
    let mark = input
        .record
        .as_ref()
        .and_then(|r| r.reparent_in_progress.as_deref());
    if let Some(mark) = mark {
        out.retain(|p| !p.code.facts().held_while_reparenting);
        out.push(Problem::new(
            ProblemCode::ReparentInProgress,
            None,
            format!("reparent in progress: {mark}"),
        ));
    }
    out
}

/// X2: a tablet's term the record does not account for (see [`ProblemCode::TermAheadOfRecord`]).
fn term_ahead_of_record(input: &ShardInput, cfg: &AnalysisConfig) -> Option<Problem> {
    let rec = input.record.as_ref()?;
    // A marked reparent promotes before it writes the record: expected, held like the rest.
    if rec.reparent_in_progress.is_some() {
        return None;
    }
    let known = rec.term.max(rec.reserved_term);
    let mut ahead: Vec<String> = Vec::new();
    for t in &input.tablets {
        let Some(h) = t.fresh_health(cfg) else {
            continue;
        };
        if h.promoted_term > rec.term.get() {
            ahead.push(format!(
                "{} promoted under term {}",
                t.alias(),
                h.promoted_term
            ));
        } else if h.term > known.get() {
            ahead.push(format!("{} knows term {}", t.alias(), h.term));
        }
    }
    (!ahead.is_empty()).then(|| {
        Problem::new(
            ProblemCode::TermAheadOfRecord,
            None,
            format!(
                "the shard record (primary {}, term {}, reserved {}) is behind what tablets report: {}; every other fix is held until it is reconciled",
                rec.primary.as_deref().unwrap_or("none"),
                rec.term,
                rec.reserved_term,
                ahead.join(", ")
            ),
        )
    })
}

fn analyze_topology(input: &ShardInput, cfg: &AnalysisConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    for (alias, reason) in &input.quarantined {
        out.push(Problem::new(
            ProblemCode::Quarantined,
            Some(alias),
            reason.clone(),
        ));
    }
    let primary_alias = input.record.as_ref().and_then(|r| r.primary.as_deref());
    let Some(primary_alias) = primary_alias else {
        if !input.tablets.is_empty() {
            let reachable = input
                .tablets
                .iter()
                .filter(|t| t.mysql_seen(cfg).is_some())
                .count();
            out.push(Problem::new(
                ProblemCode::NoPrimary,
                None,
                format!(
                    "{}/{} has no primary; {reachable} of {} tablets reachable",
                    input.keyspace,
                    input.shard,
                    input.tablets.len()
                ),
            ));
        }
        return out;
    };
    let term = input.record.as_ref().map(|r| r.term).unwrap_or(Term::ZERO);
    let primary = input.tablets.iter().find(|t| t.alias() == primary_alias);
    let replicas: Vec<&TabletInput> = input
        .tablets
        .iter()
        .filter(|t| t.alias() != primary_alias)
        .collect();

    let primary_health = primary.and_then(|p| p.mysql_seen(cfg));
    let Some(ph) = primary_health else {
        out.push(primary_unseen(
            input,
            cfg,
            primary_alias,
            primary,
            &replicas,
        ));
        return out;
    };

    if let Some(p) = primary_isolated(input, cfg, primary_alias, ph, &replicas) {
        out.push(p);
        return out;
    }

    // The primary is seen: check it and every replica against it. The healthy path borrows
    // and allocates nothing (the engine analyses every changed shard: issue 11, point 6).
    let p_host = primary.map_or("", |p| p.record.mysql_host.as_str());
    let p_port = primary.map_or(0, |p| p.record.mysql_port);
    let p_addr = || format!("{p_host}:{p_port}");
    let (no_mysql, no_replication, no_semi_sync) = (
        pb::MysqlStatus::default(),
        pb::Replication::default(),
        pb::SemiSync::default(),
    );
    let pm = ph.mysql.as_ref().unwrap_or(&no_mysql);
    if pm.read_only {
        out.push(Problem::new(
            ProblemCode::PrimaryReadOnly,
            Some(primary_alias),
            "the primary is read-only",
        ));
    } else if Duration::from_millis(ph.write_stalled_ms) >= cfg.writes_stalled_after {
        let stalled = Duration::from_millis(ph.write_stalled_ms);
        let semi_clients = ph
            .semi_sync
            .as_ref()
            .map(|s| (s.primary_enabled, s.primary_clients));
        let what = format!(
            "the primary answers but its writes have not completed for {} ms (the heartbeat write waits: {}){}",
            ph.write_stalled_ms,
            if ph.write_blocked_by.is_empty() {
                "state not read yet"
            } else {
                ph.write_blocked_by.as_str()
            },
            match semi_clients {
                Some((true, 0)) => "; semi-sync is on and no replica is connected to acknowledge",
                _ => "",
            }
        );
        match cfg.stalled_failover_after {
            Some(bound) if stalled >= bound => {
                out.push(Problem::new(
                    ProblemCode::StalledPrimary,
                    Some(primary_alias),
                    format!(
                        "{what}: past [recovery] failover_on_writes_stalled ({}), failing over",
                        humantime::format_duration(bound)
                    ),
                ));
                return out;
            }
            _ => out.push(Problem::new(
                ProblemCode::PrimaryWritesStalled,
                Some(primary_alias),
                what,
            )),
        }
    }
    if let Some(r) = ph.replication.as_ref().filter(|r| r.configured) {
        out.push(Problem::new(
            ProblemCode::PrimaryReplicating,
            Some(primary_alias),
            format!(
                "the primary replicates from {}:{}",
                r.source_host, r.source_port
            ),
        ));
    }
    let p_pos = primary.and_then(|p| p.position_of(ph));
    let p_writer = writer_id(ph);
    let semi = input.durability == Durability::SemiSync;
    let mut acking_replicas = 0;
    for r in &replicas {
        let alias = r.alias();
        if input.quarantined.contains_key(alias) {
            continue;
        }
        let Some(h) = r.fresh_health(cfg) else {
            out.push(Problem::new(
                ProblemCode::ReplicaAgentUnreachable,
                Some(alias),
                if r.stream_connected {
                    "no fresh health from its agent".to_string()
                } else {
                    "its agent's health stream is down".to_string()
                },
            ));
            continue;
        };
        if !h.mysql_reachable {
            out.push(Problem::new(
                ProblemCode::ReplicaMysqlUnreachable,
                Some(alias),
                format!("mysqld unreachable: {}", h.mysql_error),
            ));
            continue;
        }
        let m = h.mysql.as_ref().unwrap_or(&no_mysql);
        let rep = h.replication.as_ref().unwrap_or(&no_replication);
        // A returning old primary first: its repair decides between rejoining and quarantine,
        // whatever extra transactions it holds.
        if h.promoted_term > 0 && h.promoted_term < term.get() && !rep.configured {
            out.push(Problem::new(
                ProblemCode::StaleTabletClaimingPrimary,
                Some(alias),
                format!(
                    "promoted under term {} but {primary_alias} is primary at term {term}",
                    h.promoted_term
                ),
            ));
            continue;
        }
        if let (Some(rp), Some(pp)) = (r.position_of(h), p_pos.as_deref()) {
            if let Some(e) = errant(&rp, pp, &p_writer) {
                out.push(Problem::new(
                    ProblemCode::ErrantGtid,
                    Some(alias),
                    format!("errant transactions {e} (not on primary {primary_alias})"),
                ));
                continue;
            }
        }
        // MariaDB positions keep one GTID per domain: once the primary has written past the
        // sequence number of a replica's errant transaction, the positions compare as if the
        // replica were merely behind (and its SQL thread stops on the primary's transaction at
        // that number, error 1950, which restarting never cures). The binlog states keep every
        // (domain, server): one the primary lacks is errant.
        if let Some(e) = errant_in_binlog_state(h, ph, &p_writer) {
            out.push(Problem::new(
                ProblemCode::ErrantGtid,
                Some(alias),
                format!(
                    "errant transactions {e} (in its binlog state, not in primary {primary_alias}'s)"
                ),
            ));
            continue;
        }
        if !m.read_only {
            out.push(Problem::new(
                ProblemCode::ReplicaWritable,
                Some(alias),
                "replica is writable (read_only off)",
            ));
        }
        let from_primary = rep.source_host == p_host && rep.source_port == u32::from(p_port);
        if !rep.configured || !from_primary {
            out.push(Problem::new(
                ProblemCode::ReplicaWrongSource,
                Some(alias),
                if rep.configured {
                    format!(
                        "replicates from {}:{}, not from the primary at {}",
                        rep.source_host,
                        rep.source_port,
                        p_addr()
                    )
                } else {
                    format!("has no replication source (primary is {})", p_addr())
                },
            ));
        } else if !replicating(h) && rep.last_io_errno == ER_SOURCE_FATAL_READING_BINLOG {
            out.push(Problem::new(
                ProblemCode::ErrantGtid,
                Some(alias),
                format!(
                    "diverged from the primary, replication cannot resume: {}",
                    rep.last_io_error
                ),
            ));
            continue;
        } else if !replicating(h) {
            let errors = [rep.last_io_error.as_str(), rep.last_sql_error.as_str()]
                .into_iter()
                .filter(|e| !e.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Problem::new(
                ProblemCode::ReplicaNotReplicating,
                Some(alias),
                format!(
                    "IO {}, SQL {}{}",
                    thread_word(rep.io_state),
                    thread_word(rep.sql_state),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(": {errors}")
                    }
                ),
            ));
        }
        let semi_r = h.semi_sync.as_ref().unwrap_or(&no_semi_sync);
        if semi && !semi_r.replica_enabled {
            out.push(Problem::new(
                ProblemCode::ReplicaSemiSyncMustBeSet,
                Some(alias),
                "durability semi_sync: replica side is off",
            ));
        } else if !semi && semi_r.replica_enabled {
            out.push(Problem::new(
                ProblemCode::ReplicaSemiSyncMustNotBeSet,
                Some(alias),
                "durability none: replica side is on",
            ));
        }
        if semi && semi_r.replica_enabled && replicating(h) && from_primary {
            acking_replicas += 1;
        }
    }
    let ps = ph.semi_sync.as_ref().unwrap_or(&no_semi_sync);
    if semi {
        // Read back, not assumed from the promotion: AFTER_SYNC, a timeout that never falls
        // back, and waiting with no replica attached (wait_no_slave / wait_no_replica).
        let lossless = ps.wait_point.eq_ignore_ascii_case("AFTER_SYNC")
            && Duration::from_millis(ps.primary_timeout_ms) >= cfg.min_semi_sync_timeout
            && ps.wait_no_replica != Some(false);
        // Enabling the primary side with no acking replica would block every commit: wait for
        // the replicas' side to be fixed first.
        if (!ps.primary_enabled || !lossless) && acking_replicas > 0 {
            out.push(Problem::new(
                ProblemCode::PrimarySemiSyncMustBeSet,
                Some(primary_alias),
                if ps.primary_enabled {
                    format!(
                        "durability semi_sync: not lossless (wait point {}, timeout {} ms, wait with no replica {})",
                        ps.wait_point,
                        ps.primary_timeout_ms,
                        match ps.wait_no_replica {
                            Some(true) => "on",
                            Some(false) => "off",
                            None => "unknown",
                        }
                    )
                } else {
                    "durability semi_sync: primary side is off".to_string()
                },
            ));
        }
        if ps.primary_enabled && ps.primary_clients == 0 {
            out.push(Problem::new(
                ProblemCode::PrimarySemiSyncNoAckers,
                Some(primary_alias),
                format!(
                    "durability semi_sync: no replica is connected to acknowledge; every commit waits (up to {} ms)",
                    ps.primary_timeout_ms
                ),
            ));
        } else if ps.primary_enabled && !ps.primary_active {
            out.push(Problem::new(
                ProblemCode::PrimarySemiSyncFellBack,
                Some(primary_alias),
                format!(
                    "durability semi_sync: enabled but not active (fell back to async): {} commits acknowledged without a replica",
                    ps.primary_no_tx
                ),
            ));
        }
    } else if ps.primary_enabled {
        out.push(Problem::new(
            ProblemCode::PrimarySemiSyncMustNotBeSet,
            Some(primary_alias),
            "durability none: primary side is on",
        ));
    }
    out
}

fn thread_word(s: i32) -> &'static str {
    if s == pb::ThreadState::Running as i32 {
        "running"
    } else if s == pb::ThreadState::Connecting as i32 {
        "connecting"
    } else {
        "stopped"
    }
}

/// The primary is seen by its own agent: is it cut off from every replica? Every replica that
/// is not quarantined must be seen with its mysqld up (an unseen one may still reach the
/// primary, and then the confirming ones may be the isolated side) and must have a fresh probe of it failing without a break for
/// `isolated_primary_after`, and no heartbeat from it for as long (its lag that long, or its IO
/// thread not running). Under durability
/// `none`, where nothing else stops the old primary's writes, only while its agent reaches etcd
/// (it then fences it on the new term); otherwise reported as unreachable, no failover.
fn primary_isolated(
    input: &ShardInput,
    cfg: &AnalysisConfig,
    primary_alias: &str,
    ph: &pb::Health,
    replicas: &[&TabletInput],
) -> Option<Problem> {
    let voters: Vec<&TabletInput> = replicas
        .iter()
        .copied()
        .filter(|r| !input.quarantined.contains_key(r.alias()))
        .collect();
    let reachable: Vec<&TabletInput> = voters
        .iter()
        .copied()
        .filter(|r| r.mysql_seen(cfg).is_some())
        .collect();
    // Every replica must give its view: one whose agent is unseen or whose mysqld is down may
    // still reach the primary, and the ones that confirm may be the isolated side (failing
    // over to them would move the primary onto the host cut off from everyone).
    if reachable.is_empty() || reachable.len() < voters.len() {
        return None;
    }
    let bound_ms = cfg.isolated_primary_after.as_millis() as u64;
    let mut lost = Vec::new();
    for r in &reachable {
        let h = r.health.as_ref()?;
        let probe = h
            .primary_probe
            .as_ref()
            .filter(|p| p.primary_alias == primary_alias)
            .filter(|p| {
                input.now_ms.saturating_sub(p.probed_at_ms)
                    <= cfg.probe_stale_after.as_millis() as u64
            })
            .filter(|p| !p.reachable)
            // Failing without a break for the whole bound (a loaded host can fail one probe).
            .filter(|p| {
                p.failing_since_ms > 0
                    && input.now_ms.saturating_sub(p.failing_since_ms) >= bound_ms
            })?;
        let io_running = h
            .replication
            .as_ref()
            .is_some_and(|rep| rep.configured && running(rep.io_state));
        let stream = match h.lag_ms {
            Some(lag) if lag >= bound_ms => format!("no heartbeat for {lag} ms"),
            _ if !io_running => "IO thread not running".to_string(),
            _ => return None,
        };
        lost.push(format!("{} ({}; {stream})", r.alias(), probe.error));
    }
    if input.durability == Durability::None && !ph.etcd_connected {
        return Some(Problem::new(
            ProblemCode::UnreachablePrimary,
            Some(primary_alias),
            format!(
                "every replica has lost primary {primary_alias} ({}), but under durability none its agent must reach etcd to fence it, and it does not: no failover",
                lost.join(", ")
            ),
        ));
    }
    Some(Problem::new(
        ProblemCode::IsolatedPrimary,
        Some(primary_alias),
        format!(
            "primary {primary_alias} isolated: its agent still reaches it, but every replica has lost it for over {:?}: {}",
            cfg.isolated_primary_after,
            lost.join(", ")
        ),
    ))
}

/// The primary is not seen by the orchestrator: dead only if every reachable replica confirms.
fn primary_unseen(
    input: &ShardInput,
    cfg: &AnalysisConfig,
    primary_alias: &str,
    primary: Option<&TabletInput>,
    replicas: &[&TabletInput],
) -> Problem {
    let why = match primary {
        None => "it is not registered (agent gone, lease expired)".to_string(),
        Some(p) => match p.fresh_health(cfg) {
            Some(h) => format!("its agent reports mysqld unreachable: {}", h.mysql_error),
            None if !p.stream_connected => "its agent's health stream is down".to_string(),
            None => "its agent's health is stale".to_string(),
        },
    };
    let reachable: Vec<&TabletInput> = replicas
        .iter()
        .copied()
        .filter(|r| !input.quarantined.contains_key(r.alias()) && r.mysql_seen(cfg).is_some())
        .collect();
    if reachable.is_empty() {
        return Problem::new(
            ProblemCode::DeadPrimaryAndAllReplicas,
            Some(primary_alias),
            format!("primary {primary_alias} unseen ({why}) and no replica is reachable: nothing can be promoted"),
        );
    }
    let agent_says_down = primary
        .and_then(|p| p.fresh_health(cfg))
        .is_some_and(|h| !h.mysql_reachable);
    if agent_says_down && crate::mutants::active(crate::mutants::Mutant::TrustColocatedAgent) {
        return Problem::new(
            ProblemCode::DeadPrimary,
            Some(primary_alias),
            format!("primary {primary_alias} dead: {why} (mutant: replicas not asked)"),
        );
    }
    let mut confirm = Vec::new();
    let mut deny = Vec::new();
    let mut unknown = Vec::new();
    for r in &reachable {
        let probe = r
            .health
            .as_ref()
            .and_then(|h| h.primary_probe.as_ref())
            .filter(|p| p.primary_alias == primary_alias)
            .filter(|p| {
                input.now_ms.saturating_sub(p.probed_at_ms)
                    <= cfg.probe_stale_after.as_millis() as u64
            });
        match probe {
            Some(p) if !p.reachable => confirm.push(format!("{} ({})", r.alias(), p.error)),
            Some(_) => deny.push(r.alias().to_string()),
            None => unknown.push(r.alias().to_string()),
        }
    }
    if !deny.is_empty() {
        return Problem::new(
            ProblemCode::UnreachablePrimary,
            Some(primary_alias),
            format!(
                "orchestrator cannot see primary {primary_alias} ({why}) but replicas {} reach its mysqld: not dead, no failover",
                deny.join(", ")
            ),
        );
    }
    if !unknown.is_empty() {
        return Problem::new(
            ProblemCode::UnreachablePrimary,
            Some(primary_alias),
            format!(
                "orchestrator cannot see primary {primary_alias} ({why}); waiting for replicas {} to confirm",
                unknown.join(", ")
            ),
        );
    }
    let down = replicas.len() - reachable.len();
    let code = if down > 0 {
        ProblemCode::DeadPrimaryAndSomeReplicas
    } else {
        ProblemCode::DeadPrimary
    };
    Problem::new(
        code,
        Some(primary_alias),
        format!(
            "primary {primary_alias} dead: {why}; confirmed by {}{}",
            confirm.join(", "),
            if down > 0 {
                format!("; {down} replica(s) unreachable too")
            } else {
                String::new()
            }
        ),
    )
}

/// What candidate choice sees of one tablet (after its relay log was applied).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub alias: String,
    pub cell: String,
    pub rule: PromotionRule,
    /// Everything the tablet holds: applied, or received into its relay log (an acknowledged
    /// write may exist only there). Candidates are ranked on this.
    pub position: GtidSet,
    /// What it has applied; it must apply up to `position` before it is promoted. Among equally
    /// advanced candidates the one with less left to apply is chosen (it is promoted sooner).
    pub applied: GtidSet,
    /// Errant transactions, if any: never promoted, never a source.
    pub errant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub candidate: String,
    /// Most advanced tablet to catch the candidate up from first, when it is behind it.
    pub catch_up_from: Option<String>,
    /// The position the candidate must reach before promotion.
    pub target_position: String,
    /// Everyone else to repoint at the candidate.
    pub others: Vec<String>,
    /// Why this one, for the audit log.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no candidate: {0}")]
    NoCandidate(String),
    #[error("candidates diverged: {0}")]
    Diverged(String),
    #[error("durability {policy} cannot be met after promoting {candidate}: {why}")]
    Durability {
        policy: &'static str,
        candidate: String,
        why: String,
    },
}

/// Chooses the new primary among reachable, non-quarantined tablets.
///
/// The most advanced tablet (a superset of every other) sets the target; errant tablets are out;
/// `must_not` tablets are never chosen but may serve as the catch-up source; the eligible are
/// ranked by [`crate::ranking`] (rule, the old primary's cell, holding the target, least left
/// to apply, alias).
pub fn choose_candidate(
    candidates: &[Candidate],
    old_primary_cell: Option<&str>,
    durability: Durability,
) -> Result<Choice, Refusal> {
    let mut clean: Vec<&Candidate> = candidates.iter().filter(|c| c.errant.is_none()).collect();
    clean.sort_by(|a, b| a.alias.cmp(&b.alias));
    if clean.is_empty() {
        let why = if candidates.is_empty() {
            "no reachable replica".to_string()
        } else {
            format!(
                "every reachable replica has errant transactions ({})",
                candidates
                    .iter()
                    .map(|c| format!("{}: {}", c.alias, c.errant.clone().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        return Err(Refusal::NoCandidate(why));
    }
    let most = most_advanced(&clean)?;
    let eligible: Vec<&Candidate> = clean
        .iter()
        .copied()
        .filter(|c| c.rule != PromotionRule::MustNot)
        .collect();
    if eligible.is_empty() {
        return Err(Refusal::NoCandidate(
            "every clean reachable replica has promotion rule must_not".into(),
        ));
    }
    let Some(chosen) = ranking::best(eligible, |c| {
        Rank::new(
            &c.alias,
            c.rule,
            old_primary_cell.is_some_and(|cell| cell != c.cell),
            !c.position.contains_set(&most.position).unwrap_or(false),
            c.position
                .transaction_count()
                .saturating_sub(c.applied.transaction_count()),
        )
    }) else {
        return Err(Refusal::NoCandidate("no eligible replica".into()));
    };
    let at_target = chosen
        .position
        .contains_set(&most.position)
        .unwrap_or(false);
    let others: Vec<String> = candidates
        .iter()
        .filter(|c| c.alias != chosen.alias)
        .map(|c| c.alias.clone())
        .collect();
    if durability == Durability::SemiSync {
        let ackers = candidates
            .iter()
            .filter(|c| c.alias != chosen.alias && c.errant.is_none())
            .count();
        if ackers == 0 {
            return Err(Refusal::Durability {
                policy: "semi_sync",
                candidate: chosen.alias.clone(),
                why: "no other reachable replica could acknowledge its writes; refusing to promote (the shard stays as it is)".into(),
            });
        }
    }
    let reason = format!(
        "{} ({:?}, cell {}) at {}; most advanced {} at {}",
        chosen.alias, chosen.rule, chosen.cell, chosen.position, most.alias, most.position
    );
    Ok(Choice {
        candidate: chosen.alias.clone(),
        catch_up_from: (!at_target).then(|| most.alias.clone()),
        target_position: most.position.to_string(),
        others,
        reason,
    })
}

/// The clean candidate whose position contains every other's (first in alias order among
/// equals); [`Refusal::Diverged`] when there is none. `clean` must not be empty.
fn most_advanced<'a>(clean: &[&'a Candidate]) -> Result<&'a Candidate, Refusal> {
    let Some(first) = clean.first() else {
        return Err(Refusal::NoCandidate("no reachable replica".into()));
    };
    let mut most = *first;
    for c in &clean[1..] {
        // Strictly more advanced only: among equals the first (alias order) stays.
        if c.position.contains_set(&most.position).unwrap_or(false) && c.position != most.position {
            most = c;
        }
    }
    for c in clean {
        if !most.position.contains_set(&c.position).unwrap_or(false) {
            return Err(Refusal::Diverged(format!(
                "{} ({}) and {} ({}) each hold transactions the other lacks",
                most.alias, most.position, c.alias, c.position
            )));
        }
    }
    Ok(most)
}

/// As [`choose_candidate`], for the candidate an operator asked for (`to`): refused when it
/// is not among `candidates` (not answering, or quarantined: the caller leaves those out, with
/// `why_missing` saying why), has errant transactions, or has promotion rule `must_not`. It is
/// caught up from the most advanced clean candidate first when behind it.
pub fn choose_requested_candidate(
    candidates: &[Candidate],
    to: &str,
    why_missing: Option<&str>,
    durability: Durability,
) -> Result<Choice, Refusal> {
    let Some(chosen) = candidates.iter().find(|c| c.alias == to) else {
        return Err(Refusal::NoCandidate(format!(
            "requested candidate {to} cannot be promoted: {}",
            why_missing.unwrap_or("it did not answer with a readable GTID position")
        )));
    };
    if let Some(e) = &chosen.errant {
        return Err(Refusal::NoCandidate(format!(
            "requested candidate {to} has errant transactions {e}: never promoted"
        )));
    }
    if chosen.rule == PromotionRule::MustNot {
        return Err(Refusal::NoCandidate(format!(
            "requested candidate {to} has promotion rule must_not"
        )));
    }
    let mut clean: Vec<&Candidate> = candidates.iter().filter(|c| c.errant.is_none()).collect();
    clean.sort_by(|a, b| a.alias.cmp(&b.alias));
    let most = most_advanced(&clean)?;
    let at_target = chosen
        .position
        .contains_set(&most.position)
        .unwrap_or(false);
    if durability == Durability::SemiSync
        && !candidates
            .iter()
            .any(|c| c.alias != chosen.alias && c.errant.is_none())
    {
        return Err(Refusal::Durability {
            policy: "semi_sync",
            candidate: chosen.alias.clone(),
            why: "no other reachable replica could acknowledge its writes; refusing to promote (the shard stays as it is)".into(),
        });
    }
    Ok(Choice {
        candidate: chosen.alias.clone(),
        catch_up_from: (!at_target).then(|| most.alias.clone()),
        target_position: most.position.to_string(),
        others: candidates
            .iter()
            .filter(|c| c.alias != chosen.alias)
            .map(|c| c.alias.clone())
            .collect(),
        reason: format!(
            "{} requested by the operator ({:?}, cell {}) at {}; most advanced {} at {}",
            chosen.alias, chosen.rule, chosen.cell, chosen.position, most.alias, most.position
        ),
    })
}

#[cfg(test)]
mod tests;
