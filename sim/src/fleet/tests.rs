use super::*;

#[test]
fn one_engine_recovers_every_killed_primary_of_a_fleet() {
    let mut cfg = FleetConfig::new(20);
    cfg.kill_fraction = 0.25;
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.killed, 5);
    assert!(
        r.unrecovered.is_empty(),
        "not recovered: {:?}",
        r.unrecovered
    );
    assert_eq!(r.recovery.len(), 5);
    // A generous bound (the scale run reports the real distribution).
    assert!(
        r.quantile(1.0) < Some(Duration::from_secs(2)),
        "{:?}",
        r.recovery
    );
    assert!(r.evaluations > 100, "{} evaluations", r.evaluations);
    // Incremental evaluation: a shard is analysed when its view changed or its memory fell
    // due (about once per health message of its tablets), not at every evaluation of the
    // fleet. Analysing every shard every time would be `evaluations * shards`.
    let every_time = r.evaluations * u64::from(r.shards);
    assert!(
        r.analyses > 0 && r.analyses * 4 < every_time,
        "{} analyses in {} evaluations of {} shards",
        r.analyses,
        r.evaluations,
        r.shards
    );
    assert!(r.acked > 1_000, "{} writes acknowledged", r.acked);
    assert!(r.decision > Duration::ZERO);
}

#[test]
fn quantiles_pick_from_the_sorted_times() {
    let r = FleetReport {
        recovery: (1..=100).map(Duration::from_millis).collect(),
        ..FleetReport::default()
    };
    assert_eq!(r.quantile(0.5), Some(Duration::from_millis(51)));
    assert_eq!(r.quantile(0.99), Some(Duration::from_millis(99)));
    assert_eq!(r.quantile(1.0), Some(Duration::from_millis(100)));
    assert_eq!(FleetReport::default().quantile(0.5), None);
}
