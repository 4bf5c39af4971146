//! Fuzz targets for every parser of outside input (issue 12, point 7; scenario X5: garbage on
//! any parser is a clear error, never a panic). Each target is a `pub fn(&[u8]) -> bool` that
//! feeds one input to a group of parsers and checks what they promise beyond not panicking:
//! round trips (what parses prints back to an equal value), errors that are short, JSON, and
//! never quote a secret. It returns whether some parser accepted the input.
//!
//! Two engines drive the same functions:
//! - the short run in the test suite (`tests/short_run.rs`, [`engine`]): stable Rust, a few
//!   seconds a target, seeded from `corpus/<target>/`, mutating with `dict/<target>.dict`;
//!   no sanitizer build, so CI pays only the seconds it runs;
//! - cargo-fuzz (`fuzz/`, libFuzzer, coverage-guided) for long runs: `scripts/dev fuzz`.
//!
//! A test-only crate: no daemon or tool depends on it.

pub mod engine;

mod configs;
mod etcd_records;
mod greeting;
mod gtid_sets;
mod http_bodies;
mod server_rows;

use std::path::PathBuf;

pub use configs::configs;
pub use etcd_records::etcd_records;
pub use greeting::greeting;
pub use gtid_sets::gtid_sets;
pub use http_bodies::http_bodies;
pub use server_rows::server_rows;

/// A fuzz target: runs one input, panics on a bug, returns whether a parser accepted it.
pub type Target = fn(&[u8]) -> bool;

/// A target with its name (that of its corpus and dictionary directories and of its
/// cargo-fuzz target) and the longest input worth trying.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub run: Target,
    pub max_len: usize,
}

/// Every target.
pub const TARGETS: &[Spec] = &[
    Spec {
        name: "gtid_sets",
        run: gtid_sets,
        max_len: 2048,
    },
    Spec {
        name: "server_rows",
        run: server_rows,
        max_len: 4096,
    },
    Spec {
        name: "configs",
        run: configs,
        max_len: 4096,
    },
    Spec {
        name: "http_bodies",
        run: http_bodies,
        max_len: 2048,
    },
    Spec {
        name: "etcd_records",
        run: etcd_records,
        max_len: 2048,
    },
    Spec {
        name: "greeting",
        run: greeting,
        max_len: greeting::MAX_INPUT,
    },
];

/// The target named `name`.
pub fn spec(name: &str) -> Option<Spec> {
    TARGETS.iter().copied().find(|s| s.name == name)
}

/// This crate's directory, where `corpus/` and `dict/` are.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `corpus/<name>/`: the checked-in seeds (real configs, server answers, records, GTID text).
pub fn corpus_dir(name: &str) -> PathBuf {
    root().join("corpus").join(name)
}

/// `dict/<name>.dict`: tokens of the format, in libFuzzer's dictionary syntax.
pub fn dictionary_file(name: &str) -> PathBuf {
    root().join("dict").join(format!("{name}.dict"))
}
