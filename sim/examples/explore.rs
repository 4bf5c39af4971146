//! `scripts/dev sim`: explores seeded fault schedules of one simulated shard, replays one seed,
//! and runs them against a re-introduced bug; or, with `--shards`, runs a fleet under one engine
//! with 10 % of its primaries killed at once and prints the recovery times and the decision
//! code's CPU.
//!
//! ```text
//! explore [--seeds N] [--first F] [--seed X] [--mutant NAME] [--list-mutants] [--trace]
//! explore --lock [--seeds N] [--first F] [--seed X] [--mutant NAME]
//! explore --shards S [--seed X]
//! ```
//!
//! `--lock` (implied by a mutant of the lock: `equal-term-other-holder`, `skip-lease-deadline`)
//! runs several orchestrators contending for one shard's lock instead (`myha_sim::lock`).
//!
//! A violation prints the seed, the shrunk fault schedule (as the Rust a pinned test replays it
//! with) and the shrunk run's trace. Exit status 1 when an invariant broke (or, for a fleet,
//! when a killed shard was not recovered).

use std::process::ExitCode;
use std::time::Instant;

use myha_orchestrator::mutants::Mutant;
use myha_sim::fleet::FleetConfig;
use myha_sim::shard::{schedule_code, shrink, ShardSim, ShardSimConfig};

struct Args {
    seeds: u64,
    first: u64,
    seed: Option<u64>,
    mutant: Option<Mutant>,
    list: bool,
    trace: bool,
    shards: Option<u32>,
    lock: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 200,
        first: 0,
        seed: None,
        mutant: None,
        list: false,
        trace: false,
        shards: None,
        lock: false,
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
            "--shards" => {
                a.shards = Some(
                    value("--shards")?
                        .parse()
                        .map_err(|e| format!("--shards: {e}"))?,
                )
            }
            "--list-mutants" => a.list = true,
            "--trace" => a.trace = true,
            "--lock" => a.lock = true,
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
        println!("{:<26} what it re-introduces", "mutant");
        for m in Mutant::ALL {
            println!("{:<26} {}", m.name(), m.describe());
        }
        return ExitCode::SUCCESS;
    }
    if let Some(shards) = args.shards {
        return fleet(shards, args.seed.unwrap_or(1));
    }
    if args.lock
        || args
            .mutant
            .is_some_and(|m| myha_sim::lock::MUTANTS.contains(&m))
    {
        return lock(&args);
    }
    if let Some(seed) = args.seed {
        let cfg = config(seed, args.mutant);
        let r = ShardSim::new(cfg.clone()).run();
        println!(
            "seed {seed}: {} tablets, durability {:?}: {} writes acknowledged, {} reparent(s), {} refusal(s), {} planned reparent(s) done, {} not, final term {}",
            cfg.tablets, cfg.durability, r.acked, r.reparents, r.refusals, r.switchovers, r.switchover_refusals, r.final_term
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
    let (mut reparents, mut switchovers, mut switchovers_not_done) = (0, 0, 0);
    for seed in args.first..args.first + args.seeds {
        let cfg = config(seed, args.mutant);
        virtual_secs += cfg.horizon.as_secs_f64();
        let r = ShardSim::new(cfg).run();
        reparents += r.reparents;
        switchovers += r.switchovers;
        switchovers_not_done += r.switchover_refusals;
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
        "{reparents} emergency reparents; {switchovers} planned reparents done, {switchovers_not_done} refused or undone"
    );
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

fn fleet(shards: u32, seed: u64) -> ExitCode {
    let mut cfg = FleetConfig::new(shards);
    cfg.seed = seed;
    let r = myha_sim::fleet::run(&cfg);
    let ms =
        |d: Option<std::time::Duration>| d.map_or("-".to_string(), |d| d.as_millis().to_string());
    println!(
        "fleet of {} shards / {} tablets, one engine, seed {seed}: {} primaries killed at {} ms",
        r.shards,
        r.tablets,
        r.killed,
        cfg.kill_at.as_millis()
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "", "p50 ms", "p99 ms", "max ms", "goal"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "kill -> new primary in the record",
        ms(r.quantile(0.5)),
        ms(r.quantile(0.99)),
        ms(r.quantile(1.0)),
        "p99 <= 2000"
    );
    println!(
        "recovered {} of {}; {} invariant violations; {} writes acknowledged",
        r.recovery.len(),
        r.killed,
        r.violations.len(),
        r.acked
    );
    println!(
        "decision code: {:.3} s of CPU for {:.1} s simulated = {:.1} % of one core (goal < 10 %); engine {:.3} s in {} evaluations analysing {} shards; whole run {:.1} s",
        r.decision.as_secs_f64(),
        r.simulated.as_secs_f64(),
        100.0 * r.decision_share(),
        r.engine.as_secs_f64(),
        r.evaluations,
        r.analyses,
        r.wall.as_secs_f64()
    );
    for (shard, v) in r.violations.iter().take(10) {
        println!("  ks/{shard}: {v}");
    }
    if r.unrecovered.is_empty() && r.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("not recovered: {:?}", r.unrecovered);
        ExitCode::FAILURE
    }
}

/// Several orchestrators contending for one shard's lock: seeds explored, or one replayed with
/// its trace.
fn lock(args: &Args) -> ExitCode {
    use myha_sim::lock::{run, LockSimConfig};
    let config = |seed| {
        let mut cfg = LockSimConfig::new(seed);
        cfg.mutant = args.mutant;
        cfg
    };
    let mutant = args
        .mutant
        .map(|m| format!(" with mutant {}", m.name()))
        .unwrap_or_default();
    if let Some(seed) = args.seed {
        let cfg = config(seed);
        let r = run(&cfg);
        println!(
            "lock seed {seed}{mutant}: {} orchestrators, {} acquisitions, {} actions applied, {} refused as stale, {} stopped by the lease gate, {} terms reserved",
            cfg.orchestrators, r.acquisitions, r.applied, r.refused, r.gated, r.reserved
        );
        for line in &r.trace {
            println!("  {line}");
        }
        for v in &r.violations {
            println!("VIOLATION {v}");
        }
        return if r.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let started = Instant::now();
    let mut failing = Vec::new();
    for seed in args.first..args.first + args.seeds {
        let r = run(&config(seed));
        if let Some(v) = r.violations.first() {
            println!("lock seed {seed}: {v}");
            failing.push(seed);
        }
    }
    println!(
        "{} lock seeds ({}..{}){mutant}: {} failing; in {:.1} s",
        args.seeds,
        args.first,
        args.first + args.seeds,
        failing.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(seed) = failing.first() {
        println!(
            "replay: scripts/dev sim --lock --seed {seed}{}",
            args.mutant
                .map(|m| format!(" --mutant {}", m.name()))
                .unwrap_or_default()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
