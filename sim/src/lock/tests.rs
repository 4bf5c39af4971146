use super::*;

fn show(r: &LockReport) -> String {
    let v: Vec<String> = r.violations.iter().map(|v| v.to_string()).collect();
    format!("{}\n{}", v.join("\n"), r.trace.join("\n"))
}

#[test]
fn seeded_lock_schedules_keep_every_invariant_and_hand_the_lock_over() {
    let (mut acquisitions, mut gated, mut refused, mut reserved) = (0, 0, 0, 0);
    for seed in 0..60 {
        let r = run(&LockSimConfig::new(seed));
        assert!(r.violations.is_empty(), "seed {seed}: {}", show(&r));
        assert!(r.applied > 50, "seed {seed}: only {} applied", r.applied);
        acquisitions += r.acquisitions;
        gated += r.gated;
        refused += r.refused;
        reserved += r.reserved;
    }
    // The runs exercise what they are for: handovers, the lease gate stopping a holder that
    // lost touch with etcd, agents refusing a deposed holder, reservations.
    assert!(acquisitions > 60 * 5, "acquisitions {acquisitions}");
    assert!(gated > 0, "the lease gate never stopped anyone");
    assert!(refused > 0, "no agent ever refused a stale request");
    assert!(reserved > 60, "reserved {reserved}");
}

/// Seeds each lock mutant gets in `cargo test` (from seed 0), about twice the first catching
/// seed or at least 10.
fn budget(m: Mutant) -> u64 {
    match m {
        Mutant::EqualTermOtherHolder => 10,
        Mutant::SkipLeaseDeadline => 15,
        _ => 0,
    }
}

#[test]
fn every_lock_mutant_is_caught_within_its_seed_budget() {
    const {
        assert!(
            mutants::ENABLED,
            "the simulator's tests turn the mutants feature on"
        )
    };
    let mut missed = Vec::new();
    for m in MUTANTS {
        match first_violation(Some(m), 0..budget(m)) {
            Some((seed, v)) => println!("{:<26} caught at seed {seed}: {v}", m.name()),
            None => missed.push(m.name()),
        }
    }
    assert!(
        missed.is_empty(),
        "not caught within their budgets: {missed:?}"
    );
}

/// The check-then-send race, pinned: an orchestrator pauses between the lease gate and the
/// send for longer than its lease; another takes the lock and acts at the same term; the
/// paused one's request then reaches an agent. The real admission refuses it (the later
/// holder's epoch is known at that term); without the holder rule the agent obeys it.
#[test]
fn a_request_sent_after_a_pause_past_the_lease_is_refused_by_the_later_holders_epoch() {
    let seed = (0..200)
        .find(|&s| {
            let mut cfg = LockSimConfig::new(s);
            cfg.mutant = Some(Mutant::EqualTermOtherHolder);
            run(&cfg)
                .violations
                .first()
                .is_some_and(|v| v.invariant == "deposed holder obeyed")
        })
        .expect("a seed where a deposed holder's request arrives after its successor's");
    let real = run(&LockSimConfig::new(seed));
    assert!(real.violations.is_empty(), "seed {seed}: {}", show(&real));
    assert!(
        real.trace
            .iter()
            .any(|l| l.contains("refused: stale term") && l.contains("lock epoch")),
        "seed {seed}: no refusal by the holder rule\n{}",
        show(&real)
    );
}
