//! Every problem code and its facts, in one table ([`PROBLEMS`]): how urgent it is against the
//! others, what it is about, whether a reparent mark holds it, how long it must last, and the
//! remedy it maps to. The analysis says *which* problems a shard has; the engine and the
//! recoveries read everything else about a code from here, never from a `match` of their own.
//!
//! Invariant (checked at compile time): `PROBLEMS[code as usize].code == code` for every code,
//! so the table has exactly one row per code and [`ProblemCode::facts`] cannot miss one.

use serde::{Deserialize, Serialize};

/// Every problem the orchestrator knows, one per catalog case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    /// Primary unreachable by the orchestrator and by every reachable replica (P1-P3).
    DeadPrimary,
    /// As DeadPrimary, and some replicas are unreachable too (P8).
    DeadPrimaryAndSomeReplicas,
    /// The primary and every replica are unreachable: nothing to promote.
    DeadPrimaryAndAllReplicas,
    /// The orchestrator cannot see the primary but replicas reach it (P5, P6): no failover.
    UnreachablePrimary,
    /// The primary's own agent reaches it, but every replica has lost it: each replica that is
    /// not quarantined is seen with its mysqld up, its probe of the primary's mysqld fails and
    /// it has not received the primary's heartbeat for `isolated_primary_after` (P20; with a
    /// replica unseen or down the confirming ones may be the isolated side). The
    /// co-located agent is no independent observer of network reachability, and under semi_sync
    /// a primary no replica reaches cannot commit anyway: failed over like a dead primary; its
    /// agent, which still reaches etcd, fences it on the new term.
    IsolatedPrimary,
    /// The primary answers pings and reads but its writes have not completed (the agent's
    /// heartbeat write pending) for `writes_stalled_after`: a global read lock, semi-sync
    /// waiting for acks, a stalled disk. Reported with what blocks; no automatic failover
    /// unless the operator opted in ([`ProblemCode::StalledPrimary`]).
    PrimaryWritesStalled,
    /// Opt-in (`[recovery] failover_on_writes_stalled`, off by default): the primary's writes
    /// have been stalled for that long. Failed over like a dead primary, except that the live
    /// old primary is set read-only first (`Demote`, which passes a global read lock's holder)
    /// and its final position is what the replicas apply; under durability none, where nothing
    /// else stops its writes once the stall clears, a failed demotion refuses the failover.
    /// VTOrc's equivalent is `PrimaryDiskStalled` behind `--enable-primary-disk-stalled-recovery`.
    StalledPrimary,
    /// The shard record names no primary (R8).
    NoPrimary,
    PrimaryReadOnly,
    /// The primary replicates from someone (R5).
    PrimaryReplicating,
    /// Durability semi_sync: the primary side is off or not lossless (R6).
    PrimarySemiSyncMustBeSet,
    /// Durability none: the primary side is on (R7).
    PrimarySemiSyncMustNotBeSet,
    /// Durability semi_sync: the primary side is on and no replica is connected to acknowledge:
    /// every commit waits (the lossless setting: until a replica returns). Reported.
    PrimarySemiSyncNoAckers,
    /// Durability semi_sync: the primary side is on but not active (`Rpl_semi_sync_master_status`
    /// OFF): it fell back to async and acknowledges commits no replica holds. Reported.
    PrimarySemiSyncFellBack,
    ReplicaSemiSyncMustBeSet,
    ReplicaSemiSyncMustNotBeSet,
    /// A replica with read_only off (R2).
    ReplicaWritable,
    /// A replica whose IO and/or SQL thread is stopped (R3).
    ReplicaNotReplicating,
    /// A replica pointed at another replica, a wrong host, or nowhere (R4).
    ReplicaWrongSource,
    /// A replica holds transactions the primary never had (R10, P9).
    ErrantGtid,
    /// A tablet promoted under an older term that is not a replica of the current primary (R9, P3).
    StaleTabletClaimingPrimary,
    /// A replica whose mysqld its agent cannot reach.
    ReplicaMysqlUnreachable,
    /// A replica whose agent the orchestrator cannot hear.
    ReplicaAgentUnreachable,
    /// A tablet held out of promotion and routing, with the reason recorded.
    Quarantined,
    /// The shard record marks a reparent in progress. While it is set, the primary and replica
    /// fixes are not reported (a planned reparent demotes the primary on purpose); a mark left
    /// by a dead orchestrator is cleared once the shard lock is free (the engine waits
    /// `lock_ttl` first).
    ReparentInProgress,
    /// A tablet reports a term the shard record does not account for: a promotion above the
    /// record's term, or a known term above its reservation (X2: an etcd restored from a
    /// snapshot, or an orchestrator that died between a promotion and the record write). The
    /// record is not to be trusted, so every other fix is held (repairing towards a stale
    /// record could make a second primary); the repair adopts the one writable tablet that
    /// claims the newest promotion, or only raises the reservation, and refuses otherwise.
    TermAheadOfRecord,
}

/// What a problem is about; a problem names a tablet unless it is [`Subject::Shard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// The shard as a whole (its record, its lack of a primary).
    Shard,
    /// The tablet the shard record names as primary.
    Primary,
    /// A tablet that is not the primary.
    Replica,
    /// Any tablet, primary or not.
    Tablet,
}

/// What the orchestrator does about a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// Reported only: an operator decides.
    Report,
    /// Emergency reparent away from the primary.
    EmergencyReparent,
    /// The live primary is demoted first, then an emergency reparent from its final position.
    DemoteThenEmergencyReparent,
    /// Elect the first primary of a shard with none.
    ElectPrimary,
    /// Semi-sync made lossless (under semi_sync), then read_only OFF on the primary.
    MakePrimaryWritable,
    /// Stop and reset replication on the primary.
    ResetPrimaryReplication,
    /// Set the primary side of semi-sync on (true) or off.
    SetPrimarySemiSync(bool),
    /// Set the replica side of semi-sync on (true) or off.
    SetReplicaSemiSync(bool),
    /// read_only back ON on a replica.
    MakeReplicaReadOnly,
    /// Start a replica's replication threads again.
    RestartReplication,
    /// Point a replica at the primary.
    RepointAtPrimary,
    /// Rejoin a returning old primary as a replica, or quarantine it when it cannot be.
    RejoinOrQuarantine,
    /// Quarantine a tablet holding transactions the primary never had.
    QuarantineErrant,
    /// Adopt the tablets' newer term into the record, or raise the reservation.
    ReconcileTerms,
    /// Clear a reparent mark left by a dead orchestrator.
    ClearStaleMark,
}

impl Remedy {
    /// Whether the remedy is an emergency reparent (the dead-primary family).
    pub fn is_emergency_reparent(self) -> bool {
        matches!(
            self,
            Remedy::EmergencyReparent | Remedy::DemoteThenEmergencyReparent
        )
    }
}

/// One code's facts. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub code: ProblemCode,
    /// The code's stable name (metrics, audit, API).
    pub name: &'static str,
    /// Rank among recoverable problems, lower first; `None` exactly when the remedy is
    /// [`Remedy::Report`].
    pub urgency: Option<u8>,
    pub remedy: Remedy,
    pub subject: Subject,
    /// Expected, not fixed, while the shard record marks a reparent in progress: the primary
    /// is demoted and replicas are repointed on purpose.
    pub held_while_reparenting: bool,
    /// Recovered even while a replica reports the primary suspect (it is the dead-primary
    /// analysis itself, or the record that analysis rests on).
    pub while_primary_suspect: bool,
    /// Repaired only once it has lasted `replica_grace`, with these words in the wait reason:
    /// the replica's IO thread sees a dead primary before its death is confirmed, and a
    /// reparent that just wrote the record repoints such replicas itself moments later.
    pub grace: Option<&'static str>,
    /// The root symptom codes share an episode by (detection latency runs from the first
    /// moment of the root symptom); `None`: the code's own name.
    pub episode_root: Option<&'static str>,
}

impl ProblemCode {
    /// This code's row of [`PROBLEMS`].
    pub fn facts(self) -> &'static Facts {
        &PROBLEMS[self as usize]
    }

    pub fn as_str(self) -> &'static str {
        self.facts().name
    }

    /// Whether the orchestrator has a recovery for it (others are reported only).
    pub fn actionable(self) -> bool {
        self.facts().remedy != Remedy::Report
    }

    /// Whether an emergency reparent recovers it.
    pub fn is_dead_primary(self) -> bool {
        self.facts().remedy.is_emergency_reparent()
    }

    /// Every code, in declaration (analysis) order.
    pub fn all() -> impl Iterator<Item = ProblemCode> {
        PROBLEMS.iter().map(|f| f.code)
    }
}

const ROW: Facts = Facts {
    code: ProblemCode::DeadPrimary,
    name: "",
    urgency: None,
    remedy: Remedy::Report,
    subject: Subject::Shard,
    held_while_reparenting: false,
    while_primary_suspect: false,
    grace: None,
    episode_root: None,
};

/// Facts of a code that is only reported.
const fn report(code: ProblemCode, name: &'static str, subject: Subject) -> Facts {
    Facts {
        code,
        name,
        subject,
        ..ROW
    }
}

/// Facts of a recoverable code of rank `urgency`.
const fn recover(
    code: ProblemCode,
    name: &'static str,
    subject: Subject,
    urgency: u8,
    remedy: Remedy,
) -> Facts {
    Facts {
        code,
        name,
        subject,
        urgency: Some(urgency),
        remedy,
        ..ROW
    }
}

const fn held(f: Facts) -> Facts {
    Facts {
        held_while_reparenting: true,
        ..f
    }
}

const fn graced(what: &'static str, f: Facts) -> Facts {
    Facts {
        grace: Some(what),
        ..f
    }
}

const fn while_suspect(f: Facts) -> Facts {
    Facts {
        while_primary_suspect: true,
        ..f
    }
}

const fn episode(root: &'static str, f: Facts) -> Facts {
    Facts {
        episode_root: Some(root),
        ..f
    }
}

use ProblemCode as P;
use Remedy as R;
use Subject as S;

/// The table. Urgency rules: a record behind the tablets is reconciled first (every other fix
/// rests on it) together with a dead primary; a stale reparent mark hides every fix below it,
/// so it is cleared early; errant tablets are quarantined before anything else touches them;
/// semi-sync is turned off primary side first (else it waits for acks nobody sends) and on
/// replica side first (else every commit blocks).
pub const PROBLEMS: [Facts; 26] = [
    episode(
        "primary_unseen",
        while_suspect(recover(
            P::DeadPrimary,
            "dead_primary",
            S::Primary,
            0,
            R::EmergencyReparent,
        )),
    ),
    episode(
        "primary_unseen",
        while_suspect(recover(
            P::DeadPrimaryAndSomeReplicas,
            "dead_primary_and_some_replicas",
            S::Primary,
            1,
            R::EmergencyReparent,
        )),
    ),
    episode(
        "primary_unseen",
        report(
            P::DeadPrimaryAndAllReplicas,
            "dead_primary_and_all_replicas",
            S::Primary,
        ),
    ),
    episode(
        "primary_unseen",
        report(P::UnreachablePrimary, "unreachable_primary", S::Primary),
    ),
    episode(
        "primary_isolated",
        while_suspect(recover(
            P::IsolatedPrimary,
            "isolated_primary",
            S::Primary,
            1,
            R::EmergencyReparent,
        )),
    ),
    report(
        P::PrimaryWritesStalled,
        "primary_writes_stalled",
        S::Primary,
    ),
    while_suspect(recover(
        P::StalledPrimary,
        "stalled_primary",
        S::Primary,
        1,
        R::DemoteThenEmergencyReparent,
    )),
    recover(P::NoPrimary, "no_primary", S::Shard, 2, R::ElectPrimary),
    held(recover(
        P::PrimaryReadOnly,
        "primary_read_only",
        S::Primary,
        6,
        R::MakePrimaryWritable,
    )),
    held(recover(
        P::PrimaryReplicating,
        "primary_replicating",
        S::Primary,
        5,
        R::ResetPrimaryReplication,
    )),
    held(recover(
        P::PrimarySemiSyncMustBeSet,
        "primary_semi_sync_must_be_set",
        S::Primary,
        13,
        R::SetPrimarySemiSync(true),
    )),
    held(recover(
        P::PrimarySemiSyncMustNotBeSet,
        "primary_semi_sync_must_not_be_set",
        S::Primary,
        7,
        R::SetPrimarySemiSync(false),
    )),
    report(
        P::PrimarySemiSyncNoAckers,
        "primary_semi_sync_no_ackers",
        S::Primary,
    ),
    report(
        P::PrimarySemiSyncFellBack,
        "primary_semi_sync_fell_back",
        S::Primary,
    ),
    held(recover(
        P::ReplicaSemiSyncMustBeSet,
        "replica_semi_sync_must_be_set",
        S::Replica,
        11,
        R::SetReplicaSemiSync(true),
    )),
    held(recover(
        P::ReplicaSemiSyncMustNotBeSet,
        "replica_semi_sync_must_not_be_set",
        S::Replica,
        12,
        R::SetReplicaSemiSync(false),
    )),
    held(recover(
        P::ReplicaWritable,
        "replica_writable",
        S::Replica,
        8,
        R::MakeReplicaReadOnly,
    )),
    graced(
        "replication stopped",
        held(recover(
            P::ReplicaNotReplicating,
            "replica_not_replicating",
            S::Replica,
            10,
            R::RestartReplication,
        )),
    ),
    graced(
        "wrong replication source",
        held(recover(
            P::ReplicaWrongSource,
            "replica_wrong_source",
            S::Replica,
            9,
            R::RepointAtPrimary,
        )),
    ),
    recover(
        P::ErrantGtid,
        "errant_gtid",
        S::Replica,
        4,
        R::QuarantineErrant,
    ),
    graced(
        "stale primary claim",
        held(recover(
            P::StaleTabletClaimingPrimary,
            "stale_tablet_claiming_primary",
            S::Replica,
            3,
            R::RejoinOrQuarantine,
        )),
    ),
    report(
        P::ReplicaMysqlUnreachable,
        "replica_mysql_unreachable",
        S::Replica,
    ),
    report(
        P::ReplicaAgentUnreachable,
        "replica_agent_unreachable",
        S::Replica,
    ),
    report(P::Quarantined, "quarantined", S::Tablet),
    recover(
        P::ReparentInProgress,
        "reparent_in_progress",
        S::Shard,
        2,
        R::ClearStaleMark,
    ),
    while_suspect(recover(
        P::TermAheadOfRecord,
        "term_ahead_of_record",
        S::Shard,
        0,
        R::ReconcileTerms,
    )),
];

// The table's invariant, checked by the compiler: row `i` is the code whose discriminant is
// `i`, and a recoverable row has an urgency.
const _: () = {
    let mut i = 0;
    while i < PROBLEMS.len() {
        assert!(PROBLEMS[i].code as usize == i, "PROBLEMS is out of order");
        let reported = matches!(PROBLEMS[i].remedy, Remedy::Report);
        assert!(
            reported == PROBLEMS[i].urgency.is_none(),
            "urgency set exactly for recoverable codes"
        );
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The API crate's list is what clients (myhactl) use to tell a recovery from a step in
    /// the audit log: it must name exactly these codes, in this order.
    #[test]
    fn the_api_lists_exactly_these_codes() {
        let ours: Vec<&str> = ProblemCode::all().map(ProblemCode::as_str).collect();
        assert_eq!(ours, myha_api::PROBLEM_CODES);
    }

    #[test]
    fn every_code_has_its_row_and_a_unique_name() {
        let names: std::collections::BTreeSet<&str> =
            ProblemCode::all().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), PROBLEMS.len());
        for c in ProblemCode::all() {
            assert_eq!(c.facts().code, c);
            // The name is what serde writes for the code (API and audit agree).
            let json = serde_json::to_string(&c).expect("serialize");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
    }

    #[test]
    fn held_and_graced_codes_are_repairs_not_reparents() {
        for f in &PROBLEMS {
            if f.held_while_reparenting || f.grace.is_some() {
                assert!(f.urgency.is_some(), "{:?}", f.code);
                assert!(!f.remedy.is_emergency_reparent(), "{:?}", f.code);
            }
            if f.remedy.is_emergency_reparent() {
                assert!(f.while_primary_suspect, "{:?}", f.code);
                assert_eq!(f.subject, Subject::Primary, "{:?}", f.code);
            }
        }
    }
}
