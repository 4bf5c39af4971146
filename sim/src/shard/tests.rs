use super::*;

fn show(r: &RunReport) -> String {
    format!(
        "{}\n{}",
        r.violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        r.trace.join("\n")
    )
}

#[test]
fn a_quiet_shard_takes_writes_and_never_fails_over() {
    let mut cfg = ShardSimConfig::new(1);
    cfg.horizon = Duration::from_secs(3);
    cfg.quiet = Duration::from_secs(3);
    cfg.converge_within = Duration::from_secs(2);
    let mut sim = ShardSim::new(cfg);
    sim.faults.clear();
    let r = sim.run();
    assert!(r.violations.is_empty(), "{}", show(&r));
    assert!(r.acked > 400, "acked {}", r.acked);
    assert_eq!(r.reparents, 0);
    assert_eq!(r.final_term, 1);
}

#[test]
fn a_crashed_primary_is_replaced_without_losing_an_acknowledged_write() {
    let mut cfg = ShardSimConfig::new(2);
    cfg.horizon = Duration::from_secs(6);
    cfg.quiet = Duration::from_secs(4);
    let mut sim = ShardSim::new(cfg);
    sim.faults = [(SimTime::from_millis(700), Fault::Crash(101))].into();
    let r = sim.run();
    assert!(r.violations.is_empty(), "{}", show(&r));
    assert_eq!(r.reparents, 1, "{}", show(&r));
    assert_eq!(r.final_term, 2);
}

#[test]
fn seeded_fault_schedules_keep_every_invariant() {
    let failing = explore(0, 40, |_| {});
    let text: Vec<String> = failing
        .iter()
        .map(|(seed, r)| format!("seed {seed}: {}", show(r)))
        .collect();
    assert!(failing.is_empty(), "{}", text.join("\n\n"));
}
