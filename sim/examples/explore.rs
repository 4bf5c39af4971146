//! `scripts/dev sim`: explores seeded fault schedules of one simulated shard, replays one seed,
//! and runs them against a re-introduced bug.
//!
//! ```text
//! explore [--seeds N] [--first F] [--seed X] [--mutant NAME] [--list-mutants] [--trace]
//! ```
//!
//! A violation prints the seed, the shrunk fault schedule (as the Rust a pinned test replays it
//! with) and the shrunk run's trace. Exit status 1 when an invariant broke.

use std::process::ExitCode;
use std::time::Instant;

use myha_orchestrator::mutants::Mutant;
use myha_sim::shard::{schedule_code, shrink, ShardSim, ShardSimConfig};

struct Args {
    seeds: u64,
    first: u64,
    seed: Option<u64>,
    mutant: Option<Mutant>,
    list: bool,
    trace: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 200,
        first: 0,
        seed: None,
        mutant: None,
        list: false,
        trace: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seeds" => {
                a.seeds = value("--seeds")?
                    .parse()
                    .map_err(|e| format!("--seeds: {e}"))?
            }
            "--first" => {
                a.first = value("--first")?
                    .parse()
                    .map_err(|e| format!("--first: {e}"))?
            }
            "--seed" => {
                a.seed = Some(
                    value("--seed")?
                        .parse()
                        .map_err(|e| format!("--seed: {e}"))?,
                )
            }
            "--mutant" => {
                let name = value("--mutant")?;
                a.mutant = Some(Mutant::parse(&name).ok_or(format!(
                    "--mutant: unknown mutant {name:?} (see --list-mutants)"
                ))?);
            }
            "--list-mutants" => a.list = true,
            "--trace" => a.trace = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn config(seed: u64, mutant: Option<Mutant>) -> ShardSimConfig {
    let mut cfg = ShardSimConfig::for_seed(seed);
    cfg.mutant = mutant;
    cfg
}

fn report_violation(seed: u64, mutant: Option<Mutant>) {
    let cfg = config(seed, mutant);
    let Some((faults, report)) = shrink(&cfg) else {
        return;
    };
    println!(
        "\nseed {seed} ({} tablets, durability {:?}{}): {}",
        cfg.tablets,
        cfg.durability,
        mutant
            .map(|m| format!(", mutant {}", m.name()))
            .unwrap_or_default(),
        report.violations[0]
    );
    println!(
        "shrunk schedule ({} faults):\n{}",
        faults.len(),
        schedule_code(&faults)
    );
    println!("trace of the shrunk run:");
    for line in &report.trace {
        println!("  {line}");
    }
    println!(
        "replay: scripts/dev sim --seed {seed}{}",
        mutant
            .map(|m| format!(" --mutant {}", m.name()))
            .unwrap_or_default()
    );
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("explore: {e}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        println!("{:<24} what it re-introduces", "mutant");
        for m in Mutant::ALL {
            println!("{:<24} {}", m.name(), m.describe());
        }
        return ExitCode::SUCCESS;
    }
    if let Some(seed) = args.seed {
        let cfg = config(seed, args.mutant);
        let r = ShardSim::new(cfg.clone()).run();
        println!(
            "seed {seed}: {} tablets, durability {:?}: {} writes acknowledged, {} reparent(s), {} refusal(s), final term {}",
            cfg.tablets, cfg.durability, r.acked, r.reparents, r.refusals, r.final_term
        );
        for line in &r.trace {
            println!("  {line}");
        }
        for v in &r.violations {
            println!("VIOLATION {v}");
        }
        if r.violations.is_empty() {
            return ExitCode::SUCCESS;
        }
        report_violation(seed, args.mutant);
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let mut failing = Vec::new();
    let mut virtual_secs = 0.0;
    for seed in args.first..args.first + args.seeds {
        let cfg = config(seed, args.mutant);
        virtual_secs += cfg.horizon.as_secs_f64();
        let r = ShardSim::new(cfg).run();
        if args.trace {
            println!("seed {seed}: {} violation(s)", r.violations.len());
        }
        if let Some(v) = r.violations.first() {
            println!("seed {seed}: {v}");
            failing.push(seed);
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "{} seeds ({}..{}){}: {} failing; {:.0} s of virtual time in {:.1} s",
        args.seeds,
        args.first,
        args.first + args.seeds,
        args.mutant
            .map(|m| format!(" with mutant {}", m.name()))
            .unwrap_or_default(),
        failing.len(),
        virtual_secs,
        took
    );
    for seed in failing.iter().take(3) {
        report_violation(*seed, args.mutant);
    }
    if failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
