//! The fuzz run of the test suite: every target of `myha-fuzzing` for a few seconds on the
//! stable engine, from its checked-in corpus. A failure prints the panic, the minimised input
//! (as a byte-string literal for a regression test) and the seed to replay the run.
//!
//! `MYHA_FUZZ_SECS` sets the seconds per target (default 10: six targets, two test threads,
//! about 30 s of wall time); `MYHA_FUZZ_SEED` replays a run (default: from the clock, so that
//! every CI run tries other mutants).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use myha_fuzzing::engine::{self, Settings};
use myha_fuzzing::{corpus_dir, dictionary_file, spec, TARGETS};

const DEFAULT_SECS: f64 = 10.0;

fn seconds() -> Duration {
    let secs = std::env::var("MYHA_FUZZ_SECS")
        .ok()
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .unwrap_or_else(|| panic!("MYHA_FUZZ_SECS={v:?} is not a number of seconds"))
        })
        .unwrap_or(DEFAULT_SECS);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    match std::env::var("MYHA_FUZZ_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("MYHA_FUZZ_SEED={v:?} is not a u64")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

fn seeds(name: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let dir = corpus_dir(name);
    let files =
        engine::load_corpus(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

fn dictionary(name: &str) -> Vec<Vec<u8>> {
    let path = dictionary_file(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("dictionary {}: {e}", path.display()));
    engine::parse_dictionary(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn short_run(name: &'static str) {
    let spec = spec(name).expect("a target of TARGETS");
    let seed = seed();
    let settings = Settings {
        duration: seconds(),
        seed,
        max_len: spec.max_len,
        ..Settings::default()
    };
    let seeds = seeds(name).into_iter().map(|(_, b)| b).collect();
    match engine::fuzz(name, spec.run, seeds, &dictionary(name), &settings) {
        Ok(stats) => {
            // Shown with --nocapture (scripts/dev fuzz --stable).
            println!("fuzz {name}: {stats} (MYHA_FUZZ_SEED={seed})");
            assert!(
                stats.execs >= 20,
                "fuzz {name} ran only {} inputs: {stats}",
                stats.execs
            );
        }
        Err(crash) => {
            let saved = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("fuzz-crash-{name}-{seed}"));
            let _ = std::fs::write(&saved, &crash.input);
            panic!(
                "fuzz target {name} panicked (replay: MYHA_FUZZ_SEED={seed}; input saved in {}):\n{crash}",
                saved.display()
            );
        }
    }
}

#[test]
fn gtid_sets() {
    short_run("gtid_sets");
}

#[test]
fn server_rows() {
    short_run("server_rows");
}

#[test]
fn configs() {
    short_run("configs");
}

#[test]
fn http_bodies() {
    short_run("http_bodies");
}

#[test]
fn etcd_records() {
    short_run("etcd_records");
}

#[test]
fn greeting() {
    short_run("greeting");
}

/// The seeds are real examples of their formats: each is accepted by its target (unless its
/// name says `invalid-`), so a format change that leaves a seed behind shows here instead of
/// silently turning the fuzzing into noise. The greeting target accepts nothing (every byte
/// string is a valid greeting to pass on), so only its panics count.
#[test]
fn every_seed_runs_and_valid_seeds_are_accepted() {
    for spec in TARGETS {
        for (path, bytes) in seeds(spec.name) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let accepted = engine::run_one(spec.run, &bytes).unwrap_or_else(|panic| {
                panic!("seed {} panics: {panic}", path.display());
            });
            if spec.name != "greeting" {
                assert_eq!(
                    accepted,
                    !name.starts_with("invalid-"),
                    "seed {} is {}accepted",
                    path.display(),
                    if accepted { "" } else { "not " }
                );
            }
        }
    }
}

/// Every target has a test above, a dictionary, and a cargo-fuzz target in `fuzz/`.
#[test]
fn every_target_is_wired_up() {
    let this_file = include_str!("short_run.rs");
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let fuzz_dir = fuzz.join("fuzz_targets");
    let fuzz_manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for spec in TARGETS {
        assert!(
            this_file.contains(&format!("short_run(\"{}\")", spec.name)),
            "no short run for {}",
            spec.name
        );
        assert!(!dictionary(spec.name).is_empty(), "{}", spec.name);
        let target = std::fs::read_to_string(fuzz_dir.join(format!("{}.rs", spec.name)))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{}.rs: {e}", spec.name));
        assert!(
            target.contains(&format!("myha_fuzzing::{}(", spec.name)),
            "fuzz/fuzz_targets/{}.rs does not call myha_fuzzing::{}",
            spec.name,
            spec.name
        );
        assert!(
            fuzz_manifest.contains(&format!("name = \"{}\"", spec.name)),
            "fuzz/Cargo.toml has no [[bin]] {}",
            spec.name
        );
    }
}
