//! A short seeded chaos run (`myha_tests::chaos`): ten faults, process and network ones mixed,
//! some steps overlapping two,
//! on a 3-tablet semi_sync shard with every process on a host of its own, under writers through
//! the gateway and straight to the primary, a reader through the RO port and a sampler of every
//! tablet's read_only. No acknowledged write lost, none acknowledged by a deposed primary, never
//! two tablets acknowledging at once, no read older than the lag bound. Needs root.
//! `MYHA_CHAOS_FAULTS` and `MYHA_CHAOS_SEED` change the schedule (the benchmark,
//! `scripts/dev bench chaos`, is the long run).

use std::time::Duration;

use myha_tests::bench::Links;
use myha_tests::chaos;

#[test]
fn a_seeded_chaos_run_of_ten_faults_loses_nothing_and_never_has_two_writers() {
    // A long scenario: polled on a big stack (see `block_on_big_stack`).
    myha_tests::block_on_big_stack(chaos_run)
}

async fn chaos_run() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let faults = env("MYHA_CHAOS_FAULTS", 10) as usize;
    let report = chaos::run(chaos::Options {
        seed: env("MYHA_CHAOS_SEED", 20261202),
        faults,
        // Higher than the benchmark's share: ten faults must hold some overlapping steps.
        overlap: 0.5,
        links: Links::Netns {
            rtt: Duration::ZERO,
        },
    })
    .await;
    println!("{}", report.table());
    assert_eq!(report.faults(), faults, "every fault ran");
    assert!(
        report.kinds.contains_key(&chaos::Row::Overlapping),
        "the schedule overlaps faults: {}",
        report.table()
    );
    assert!(report.is_clean(), "{}", report.table());
}
