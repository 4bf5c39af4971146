//! Building the analysis input ([`ShardInput`]): from the tabletwatch snapshot (the engine's
//! continuous view) or from fresh `FullStatus` answers (under the shard lock). Pure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myha_proto::agent as pb;
use tabletwatch::ShardView;
use topo::{Durability, ShardRecord, TabletRecord};

use crate::analysis::{ShardInput, TabletInput};

/// The analysis input of one shard of a snapshot, with every age measured at `now`
/// (`now_ms` is the same moment on the wall clock, to age the replicas' probes).
/// `quarantined` maps aliases to reasons; only this shard's tablets are kept.
pub fn shard_input(
    view: &ShardView,
    now: Instant,
    now_ms: u64,
    durability: Durability,
    quarantined: &BTreeMap<String, String>,
) -> ShardInput {
    ShardInput {
        keyspace: view.keyspace.clone(),
        shard: view.shard.clone(),
        record: view.record.clone(),
        durability,
        tablets: view
            .tablets
            .values()
            .map(|t| TabletInput {
                record: t.record.clone(),
                health: t.health_shared().cloned(),
                health_age: t.health_age(now),
                stream_connected: t.is_connected(),
                position: None,
            })
            .collect(),
        quarantined: quarantined
            .iter()
            .filter(|(a, _)| view.tablets.contains_key(a.as_str()))
            .map(|(a, r)| (a.clone(), r.clone()))
            .collect(),
        now_ms,
    }
}

/// The analysis input from answers just received: a tablet whose agent answered `FullStatus`
/// has fresh health (age 0, "connected"); one that did not is unseen.
#[allow(clippy::too_many_arguments)]
pub fn fresh_input(
    keyspace: &str,
    shard: &str,
    record: Option<ShardRecord>,
    durability: Durability,
    tablets: Vec<TabletRecord>,
    statuses: &BTreeMap<String, pb::Health>,
    quarantined: BTreeMap<String, String>,
    now_ms: u64,
) -> ShardInput {
    let quarantined = quarantined
        .into_iter()
        .filter(|(a, _)| tablets.iter().any(|t| t.alias == *a))
        .collect();
    ShardInput {
        keyspace: keyspace.to_string(),
        shard: shard.to_string(),
        record: record.map(Arc::new),
        durability,
        tablets: tablets
            .into_iter()
            .map(|record| {
                let health = statuses.get(&record.alias).cloned().map(Arc::new);
                TabletInput {
                    stream_connected: health.is_some(),
                    health_age: health.as_ref().map(|_| Duration::ZERO),
                    health,
                    record: Arc::new(record),
                    position: None,
                }
            })
            .collect(),
        quarantined,
        now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{analyze, AnalysisConfig, ProblemCode};
    use tabletwatch::testing::*;
    use tabletwatch::StreamState;
    use topo::Term;

    fn probe(primary: &str, reachable: bool, at_ms: u64) -> pb::PrimaryProbe {
        pb::PrimaryProbe {
            primary_alias: primary.into(),
            addr: "127.0.0.1:3401".into(),
            reachable,
            error: if reachable { "" } else { "Connection refused" }.into(),
            consecutive_failures: u32::from(!reachable),
            probed_at_ms: at_ms,
            rtt_us: 100,
            failing_since_ms: if reachable { 0 } else { at_ms },
        }
    }

    #[test]
    fn snapshot_view_becomes_input_with_ages_at_now() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(700);
        let mut r = tablet(
            tablet_record("zone1-102", "ks", "0"),
            Some(replica_health("zone1-102", 1, Some(5))),
            t0 + Duration::from_millis(200),
        );
        r.stream = StreamState::Connecting {
            since: t0,
            since_ms: 0,
            failures: 1,
            last_error: Some("reset".into()),
        };
        let view = shard(
            "ks",
            "0",
            Some(shard_record("ks", "0", Some("zone1-101"), 1)),
            vec![
                tablet(
                    tablet_record("zone1-101", "ks", "0"),
                    Some(primary_health("zone1-101", 1)),
                    t0 + Duration::from_millis(600),
                ),
                r,
                tablet(tablet_record("zone1-103", "ks", "0"), None, t0),
            ],
        );
        let q: BTreeMap<String, String> = [
            ("zone1-103".to_string(), "errant".to_string()),
            ("zone1-999".to_string(), "elsewhere".to_string()),
        ]
        .into();
        let input = shard_input(&view, now, 42_000, Durability::SemiSync, &q);
        assert_eq!((input.keyspace.as_str(), input.shard.as_str()), ("ks", "0"));
        assert_eq!(input.record.as_ref().map(|r| r.term), Some(Term::new(1)));
        assert_eq!(input.durability, Durability::SemiSync);
        assert_eq!(input.now_ms, 42_000);
        let [p, r, n] = &input.tablets[..] else {
            panic!("3 tablets")
        };
        assert_eq!(p.alias(), "zone1-101");
        assert_eq!(p.health_age, Some(Duration::from_millis(100)));
        assert!(p.stream_connected);
        assert_eq!(r.health_age, Some(Duration::from_millis(500)));
        assert!(
            !r.stream_connected,
            "a stream that is down is not connected"
        );
        assert!(r.health.is_some(), "the last health is kept for diagnosis");
        assert_eq!((n.health.is_none(), n.health_age), (true, None));
        assert_eq!(
            input.quarantined.keys().collect::<Vec<_>>(),
            ["zone1-103"],
            "only this shard's quarantined tablets"
        );
    }

    #[test]
    fn fresh_answers_are_seen_and_silent_agents_are_not() {
        let rec = shard_record("ks", "0", Some("zone1-101"), 3);
        let tablets = vec![
            tablet_record("zone1-101", "ks", "0"),
            tablet_record("zone1-102", "ks", "0"),
            tablet_record("zone1-103", "ks", "0"),
        ];
        let now_ms = 1_000_000;
        let mut dead = primary_health("zone1-101", 3);
        dead.mysql_reachable = false;
        dead.mysql = None;
        dead.mysql_error = "Connection refused".into();
        let mut r2 = replica_health("zone1-102", 3, None);
        r2.primary_probe = Some(probe("zone1-101", false, now_ms - 50));
        let mut r3 = replica_health("zone1-103", 3, None);
        r3.primary_probe = Some(probe("zone1-101", false, now_ms - 80));
        let mut statuses: BTreeMap<String, pb::Health> = [
            ("zone1-101".to_string(), dead),
            ("zone1-102".to_string(), r2),
            ("zone1-103".to_string(), r3),
        ]
        .into();
        let input = fresh_input(
            "ks",
            "0",
            Some(rec.clone()),
            Durability::SemiSync,
            tablets.clone(),
            &statuses,
            BTreeMap::new(),
            now_ms,
        );
        assert!(input
            .tablets
            .iter()
            .all(|t| t.stream_connected && t.health_age == Some(Duration::ZERO)));
        let cfg = AnalysisConfig::default();
        let problems = analyze(&input, &cfg);
        assert_eq!(problems[0].code, ProblemCode::DeadPrimary, "{problems:?}");

        // A replica whose agent did not answer is unseen: the primary is dead and so is it.
        statuses.remove("zone1-103");
        let input = fresh_input(
            "ks",
            "0",
            Some(rec),
            Durability::SemiSync,
            tablets,
            &statuses,
            [("zone1-102".to_string(), "x".to_string())].into(),
            now_ms,
        );
        let silent = input
            .tablets
            .iter()
            .find(|t| t.alias() == "zone1-103")
            .expect("listed");
        assert!(!silent.stream_connected && silent.health.is_none() && silent.health_age.is_none());
        assert_eq!(input.quarantined.len(), 1);
        let problems = analyze(&input, &cfg);
        // 102 quarantined, 103 unseen: nobody reachable to promote.
        assert!(
            problems
                .iter()
                .any(|p| p.code == ProblemCode::DeadPrimaryAndAllReplicas),
            "{problems:?}"
        );
    }
}
