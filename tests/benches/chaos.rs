//! Chaos benchmark (not a test): `cargo bench -p myha-tests --bench chaos -- [--faults N]
//! [--seed S] [--overlap SHARE] [--hosts netns [--rtt 0.5ms]] [--json]`: a seeded schedule of N
//! faults (default 100; a share of the steps, default 1/3, overlap two of them) on a 3-tablet
//! semi_sync shard under writers and a reader, checked as `myha_tests::chaos` describes; prints
//! one table per fault kind and one for overlapping steps (injected, failovers, write
//! unavailability, acknowledged writes lost, writes acknowledged by a deposed primary,
//! dual-writer samples), or the JSON report with `--json`. `--hosts` defaults to netns here
//! (network faults need hosts); `--hosts loopback` draws process faults only.

use myha_tests::bench::{self, Links};
use myha_tests::chaos;

fn main() {
    let faults: usize = bench::arg_parsed("--faults", 100);
    let seed: u64 = bench::arg_parsed("--seed", 1);
    let overlap: f64 = bench::arg_parsed("--overlap", chaos::OVERLAP_SHARE);
    let links = match bench::arg("--hosts") {
        None => Links::Netns {
            rtt: std::time::Duration::ZERO,
        },
        Some(_) => Links::from_args()[0],
    };
    let json = std::env::args().any(|a| a == "--json");
    let rt = bench::runtime();
    let report = rt.block_on(chaos::run(chaos::Options {
        seed,
        faults,
        overlap,
        links,
    }));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json()).unwrap_or_default()
        );
    } else {
        println!("{}", report.table());
    }
    if !report.is_clean() {
        std::process::exit(1);
    }
}
