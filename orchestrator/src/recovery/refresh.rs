//! What every recovery shares ([`Deps`]), the job the engine hands over, and the fresh state of
//! a shard read under its lock from etcd and from every agent ([`FreshShard`]).

use super::*;
use topo::Term;

/// What every recovery of this process shares.
#[derive(Clone, Debug)]
pub struct Deps {
    pub topo: Topo,
    pub agents: AgentClients,
    pub audit: AuditSink,
    pub cfg: Arc<RecoveryConfig>,
    /// `orchestrator@{hostname}:{pid}`: lock holder, audit actor, RPC requester.
    pub actor: Arc<str>,
    /// When each tablet's registration was last seen in a current snapshot.
    pub registrations: Arc<RegistrationsSeen>,
}

/// When each tablet's registration was last seen in etcd, by this process's synced watch (ms
/// since the epoch). A registration gone before a primary was lost means its agent was gone
/// then: the isolation rule cannot have demoted it (see `reparent::wait_for_self_demotion`).
#[derive(Debug, Default)]
pub struct RegistrationsSeen {
    seen: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl RegistrationsSeen {
    /// Notes every registration of a snapshot whose watches are current, at `now_ms`.
    pub fn observe(&self, snap: &tabletwatch::FleetSnapshot, now_ms: u64) {
        if !snap.topo_synced {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for shard in snap.shards.values() {
            for alias in shard.tablets.keys() {
                seen.insert(alias.clone(), now_ms);
            }
        }
    }

    /// When `alias` was last seen registered.
    pub fn last_seen(&self, alias: &str) -> Option<u64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(alias).copied()
    }
}

impl Deps {
    /// Builds the shared handles (spawns the audit writer).
    pub fn new(topo: Topo, cfg: RecoveryConfig) -> Deps {
        Deps::with_tls(topo, cfg, None)
    }

    /// [`Deps::new`] calling agents over TLS with `tls` (`[tls]`).
    pub fn with_tls(topo: Topo, cfg: RecoveryConfig, tls: Option<pki::Material>) -> Deps {
        Deps {
            agents: AgentClients::new(cfg.connect_timeout).with_tls(tls),
            audit: AuditSink::spawn(topo.clone(), cfg.audit),
            topo,
            cfg: Arc::new(cfg),
            actor: actor_name().into(),
            registrations: Arc::default(),
        }
    }
}

/// `orchestrator@{hostname}:{pid}`.
pub fn actor_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("orchestrator@{host}:{}", std::process::id())
}

/// The primary's position as last seen healthy in the snapshots (the reference for the errant
/// check of an emergency reparent: the dead primary cannot be asked any more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrimaryPosition {
    pub alias: String,
    pub term: Term,
    pub gtid_position: String,
    /// Server id (MariaDB) or uuid (MySQL) of the primary: its own writes are never errant.
    pub writer: String,
    pub flavor: &'static str,
    pub seen_ms: u64,
}

impl PrimaryPosition {
    /// From a health of the primary with mysqld reachable.
    pub fn from_health(alias: &str, term: Term, h: &pb::Health, now_ms: u64) -> Option<Self> {
        let m = h.mysql.as_ref().filter(|_| h.mysql_reachable)?;
        Some(PrimaryPosition {
            alias: alias.to_string(),
            term,
            gtid_position: m.gtid_position.clone(),
            writer: analysis::writer_id(h),
            flavor: match analysis::flavor_of(h) {
                gtid::Flavor::MySql => "mysql",
                _ => "mariadb",
            },
            // When the health was polled, not when it was read here: a reparent's relay-log
            // rule compares replicas' restarts with the last moment the primary was known alive.
            seen_ms: if h.polled_at_ms > 0 {
                h.polled_at_ms.min(now_ms)
            } else {
                now_ms
            },
        })
    }

    pub fn gtid_set(&self) -> Option<gtid::GtidSet> {
        let flavor = if self.flavor == "mysql" {
            gtid::Flavor::MySql
        } else {
            gtid::Flavor::MariaDb
        };
        gtid::GtidSet::parse(flavor, &self.gtid_position).ok()
    }
}

/// One recovery the engine asks for.
#[derive(Debug, Clone)]
pub struct Job {
    pub keyspace: String,
    pub shard: String,
    /// The problem as the engine saw it in the snapshot.
    pub problem: Problem,
    /// Quarantined tablets (alias -> reason), from the control cache.
    pub quarantined: BTreeMap<String, String>,
    /// The primary's last healthy position from the snapshots, if known.
    pub last_primary: Option<PrimaryPosition>,
}

/// The shard as re-read under the lock: etcd records and every agent's `FullStatus`.
#[derive(Debug, Clone)]
pub struct FreshShard {
    pub record: Option<ShardRecord>,
    /// etcd `mod_revision` of the record (0 without one).
    pub record_revision: i64,
    pub durability: Durability,
    /// Registered tablets, by alias.
    pub tablets: BTreeMap<String, TabletRecord>,
    /// Answers of the agents that answered, by alias.
    pub statuses: BTreeMap<String, pb::Health>,
    /// Why each silent agent is unseen, by alias.
    pub unseen: BTreeMap<String, String>,
    /// The analysis input built from the above.
    pub input: ShardInput,
    /// `analyze(input)`.
    pub problems: Vec<Problem>,
    /// Tablet records under the prefix that could not be decoded, skipped.
    pub unreadable: Vec<topo::Unreadable>,
}

impl FreshShard {
    /// The record's term (0 without a record).
    pub fn record_term(&self) -> Term {
        self.record.as_ref().map_or(Term::ZERO, |r| r.term)
    }

    /// The highest term any answering agent reports (its known term or promoted term).
    pub fn highest_reported_term(&self) -> Term {
        self.statuses
            .values()
            .map(|h| Term::new(h.term.max(h.promoted_term)))
            .max()
            .unwrap_or(Term::ZERO)
    }

    /// A term every answering agent accepts: max(record, reported).
    pub fn action_term(&self) -> Term {
        self.record_term().max(self.highest_reported_term())
    }

    /// The term a new promotion must use: above the record's, any reservation, and anything an
    /// agent reports.
    pub fn next_promotion_term(&self) -> Term {
        let reserved = self.record.as_ref().map_or(Term::ZERO, |r| r.reserved_term);
        reparent::next_term(self.record_term(), reserved, self.highest_reported_term())
    }
}

/// A primary already suspected dead gets this long to answer the refresh: a frozen mysqld
/// keeps its agent's `FullStatus` waiting for the agent's own query timeout, and the reparent
/// must not wait for that. One that answers alive in time cancels the reparent.
/// How often [`RecoveryContext::apply_received`] audits the progress of a long apply.
pub const APPLY_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// An action is only sent while the shard lock's local lease deadline is at least this far away:
/// the RPC must reach the agent before another orchestrator could take the lock.
pub const LOCK_DEADLINE_MARGIN: Duration = Duration::from_millis(200);

pub const SUSPECT_STATUS_TIMEOUT: Duration = Duration::from_millis(150);

/// Re-reads the shard record, keyspace and registrations from etcd, and asks every registered
/// tablet's agent for `FullStatus` in parallel (each bounded by `status_timeout`, the
/// `suspect`'s by [`SUSPECT_STATUS_TIMEOUT`]).
pub async fn refresh(
    deps: &Deps,
    keyspace: &str,
    shard: &str,
    quarantined: &BTreeMap<String, String>,
    suspect: Option<&str>,
) -> Result<FreshShard, RecoveryError> {
    let topo = &deps.topo;
    let (rec, tablets, ks) = tokio::join!(
        topo.get_shard(keyspace, shard),
        topo.list_tablets_reporting(Some(keyspace), Some(shard)),
        topo.get_keyspace(keyspace),
    );
    let rec = rec.map_err(RecoveryError::topo("read the shard record"))?;
    // One corrupt or unknown-variant tablet record (of this shard or any other) must not stop
    // this shard's recovery: it is skipped, and reported with every recovery it is seen in.
    let (tablets, unreadable) = tablets.map_err(RecoveryError::topo("list the shard's tablets"))?;
    let ks = ks
        .map_err(RecoveryError::topo("read the keyspace record"))?
        .ok_or_else(|| {
            RecoveryError::Refused(format!(
                "keyspace record {keyspace} does not exist: durability unknown"
            ))
        })?;
    let tablets: BTreeMap<String, TabletRecord> =
        tablets.into_iter().map(|t| (t.alias.clone(), t)).collect();
    let answers = futures::future::join_all(tablets.values().map(|t| async {
        let bound = if suspect == Some(t.alias.as_str()) {
            SUSPECT_STATUS_TIMEOUT.min(deps.cfg.status_timeout)
        } else {
            deps.cfg.status_timeout
        };
        (t.alias.clone(), full_status(&deps.agents, t, bound).await)
    }))
    .await;
    let mut statuses = BTreeMap::new();
    let mut unseen = BTreeMap::new();
    for (alias, r) in answers {
        match r {
            Ok(h) => {
                statuses.insert(alias, h);
            }
            Err(e) => {
                unseen.insert(alias, e.to_string());
            }
        }
    }
    Ok(FreshShard::assemble(
        FreshReads {
            keyspace,
            shard,
            record: rec,
            durability: ks.durability,
            tablets,
            unreadable,
        },
        statuses,
        unseen,
        quarantined,
        topo::now_ms(),
        &deps.cfg.analysis,
    ))
}

/// What the refresh read from etcd for one shard.
#[derive(Debug, Clone)]
pub struct FreshReads<'a> {
    pub keyspace: &'a str,
    pub shard: &'a str,
    /// The shard record and its `mod_revision`.
    pub record: Option<(ShardRecord, i64)>,
    pub durability: Durability,
    pub tablets: BTreeMap<String, TabletRecord>,
    pub unreadable: Vec<topo::Unreadable>,
}

impl FreshShard {
    /// The fresh shard from what was read (etcd, the agents' answers) at `now_ms`, analysed.
    /// Pure: the refresh and the simulator build it the same way.
    pub fn assemble(
        reads: FreshReads<'_>,
        statuses: BTreeMap<String, pb::Health>,
        unseen: BTreeMap<String, String>,
        quarantined: &BTreeMap<String, String>,
        now_ms: u64,
        cfg: &AnalysisConfig,
    ) -> FreshShard {
        let (record, record_revision) = match reads.record {
            Some((r, rev)) => (Some(r), rev),
            None => (None, 0),
        };
        let input = input::fresh_input(
            reads.keyspace,
            reads.shard,
            record.clone(),
            reads.durability,
            reads.tablets.values().cloned().collect(),
            &statuses,
            quarantined.clone(),
            now_ms,
        );
        let problems = analysis::analyze(&input, cfg);
        FreshShard {
            record,
            record_revision,
            durability: reads.durability,
            tablets: reads.tablets,
            statuses,
            unseen,
            input,
            problems,
            unreadable: reads.unreadable,
        }
    }
}
