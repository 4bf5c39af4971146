//! A small mutational fuzzing engine on the stable toolchain, for the short run in the test
//! suite: it needs no sanitizer build and no second compilation of the dependency tree, so it
//! costs CI only the seconds it runs (the coverage-guided runs are `scripts/dev fuzz`).
//!
//! Not coverage-guided: it mutates the checked-in seeds (byte edits, interesting numbers,
//! dictionary tokens, pieces of other seeds) and keeps a mutant as a new seed when the target
//! accepted it. That validity feedback is what lets it walk away from the seeds while staying in
//! the format: a mutant of a config that still parses can be mutated further into one that
//! fails validation in a new way.
//!
//! A panic is caught ([`std::panic::catch_unwind`]), its input minimised and returned with the
//! panic message; an input that runs longer than [`Settings::hang_after`] aborts the process
//! after printing it, since a thread cannot be stopped from outside.

use std::cell::RefCell;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::Target;

/// How long and how hard to fuzz one target.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Wall time of the run.
    pub duration: Duration,
    /// The PRNG seed; printed with every report so a run can be repeated.
    pub seed: u64,
    /// Mutants are cut to this many bytes.
    pub max_len: usize,
    /// One input running longer than this is a hang: the input is printed and the process aborts.
    pub hang_after: Duration,
    /// The corpus stops growing at this many entries (then accepted mutants replace old ones).
    pub max_corpus: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            duration: Duration::from_secs(10),
            seed: 1,
            max_len: 4096,
            hang_after: Duration::from_secs(20),
            max_corpus: 4096,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub execs: u64,
    /// Inputs some parser of the target accepted.
    pub accepted: u64,
    /// Seeds plus accepted mutants kept.
    pub corpus: usize,
    pub elapsed: Duration,
    /// The slowest single input.
    pub slowest: Duration,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "{} execs in {:.1} s ({:.0}/s), {} accepted, corpus {}, slowest input {:?}",
            self.execs,
            secs,
            self.execs as f64 / secs,
            self.accepted,
            self.corpus,
            self.slowest
        )
    }
}

/// A panic a target raised, with the input that raised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    pub input: Vec<u8>,
    /// The smallest input found that panics at the same place.
    pub minimized: Vec<u8>,
    /// The panic as the default hook would print it: location and message.
    pub message: String,
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\nminimised input ({} bytes): {}\noriginal input ({} bytes): {}",
            self.message,
            self.minimized.len(),
            escape(&self.minimized),
            self.input.len(),
            escape(&self.input)
        )
    }
}

/// `input` as a Rust byte-string literal body, to paste into a regression test.
pub fn escape(input: &[u8]) -> String {
    input.escape_ascii().to_string()
}

// ---- panics ----------------------------------------------------------------------------------

thread_local! {
    /// `Some` while this thread runs a target: the hook stores the panic here instead of
    /// printing it (a run catches thousands of panics only when it finds a bug, but even one
    /// printed backtrace per minimisation step would bury the report).
    static CAPTURE: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Installs, once per process, a hook that captures panics of threads running a target and
/// passes every other panic (a failing assertion of another test) to the previous hook.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| match c.try_borrow_mut() {
                Ok(mut slot) => match slot.as_mut() {
                    Some(message) => {
                        *message = Some(info.to_string());
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

/// Runs `target` on `input`: whether it accepted it, or the panic message.
pub fn run_one(target: Target, input: &[u8]) -> Result<bool, String> {
    install_hook();
    CAPTURE.with(|c| *c.borrow_mut() = Some(None));
    let result = panic::catch_unwind(AssertUnwindSafe(|| target(input)));
    let captured = CAPTURE.with(|c| c.borrow_mut().take().flatten());
    result.map_err(|payload| {
        captured.unwrap_or_else(|| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-string payload".into())
        })
    })
}

/// The `file:line:col` a panic message starts with (`panicked at src/x.rs:1:2:`), which
/// identifies the bug while the minimiser changes the input.
fn panic_site(message: &str) -> &str {
    message
        .strip_prefix("panicked at ")
        .and_then(|m| m.split_once(":\n").map(|(site, _)| site))
        .unwrap_or(message)
}

/// The shortest input found (by removing chunks, halving their size) that still panics at
/// the same site; bounded in time, since it only makes the report readable.
fn minimize(target: Target, input: &[u8], message: &str, budget: Duration) -> Vec<u8> {
    let site = panic_site(message).to_string();
    let start = Instant::now();
    let mut best = input.to_vec();
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < best.len() {
            if start.elapsed() > budget {
                return best;
            }
            let end = (i + chunk).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            match run_one(target, &candidate) {
                Err(m) if panic_site(&m) == site => best = candidate,
                _ => i += chunk,
            }
        }
        if chunk == 1 {
            return best;
        }
        chunk = chunk.div_ceil(2);
    }
}

// ---- hangs -----------------------------------------------------------------------------------

/// The input being run, and since when.
type Running = Arc<Mutex<Option<(Instant, Vec<u8>)>>>;

/// The input being run, watched by a thread that aborts the process when one input takes
/// longer than [`Settings::hang_after`].
struct Watchdog {
    current: Running,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(name: &'static str, hang_after: Duration) -> Watchdog {
        let current: Running = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (c, d) = (current.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let guard = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, input)) = guard.as_ref() {
                    if since.elapsed() > hang_after {
                        eprintln!(
                            "fuzz target {name}: one input has run for over {hang_after:?} (a hang); \
                             aborting. Input ({} bytes): {}",
                            input.len(),
                            escape(input)
                        );
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog {
            current,
            done,
            thread: Some(thread),
        }
    }

    fn enter(&self, input: &[u8]) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), input.to_vec()));
    }

    fn leave(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- mutation --------------------------------------------------------------------------------

/// SplitMix64: a few lines, fast, and the same sequence on every platform and toolchain, so a
/// seed printed by a failed run replays it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Byte values that tend to matter to text and binary parsers: separators, quotes, escapes,
/// controls, the ends of the signed and unsigned ranges, and UTF-8 lead and continuation bytes.
const INTERESTING_BYTES: &[u8] = &[
    0, 1, b'\t', b'\n', b'\r', b' ', b'"', b'#', b'\'', b',', b'-', b'.', b'/', b'0', b'1', b'9',
    b':', b'=', b'[', b'\\', b']', b'_', b'{', b'}', 0x7f, 0x80, 0xbf, 0xc0, 0xe2, 0xf0, 0xff,
];

/// Numbers at the edges of the integer types parsers convert to.
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "00",
    "-1",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "1e308",
    "1.5",
];

/// Mutates `input` in place with one to eight stacked edits, some using `others` (the rest
/// of the corpus) and `dictionary`.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[Vec<u8>], dictionary: &[Vec<u8>]) {
    let edits = 1 + rng.below(8);
    for _ in 0..edits {
        let len = input.len();
        match rng.below(13) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            // A random byte.
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            // An interesting byte, replacing or inserted.
            2 => {
                let b = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
                let i = rng.below(len + 1);
                if i < len && rng.chance(2) {
                    input[i] = b;
                } else {
                    input.insert(i, b);
                }
            }
            // Delete a range.
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                input.drain(i..i + n);
            }
            // Insert random bytes.
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            // Duplicate a range of the input elsewhere in it.
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let piece = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, piece);
            }
            // Insert a piece of another corpus entry (crossover).
            6 | 7 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - i).min(128));
                    let at = rng.below(len + 1);
                    if rng.chance(2) && at < len {
                        let end = (at + n).min(len);
                        input.splice(at..end, other[i..i + n].iter().copied());
                    } else {
                        input.splice(at..at, other[i..i + n].iter().copied());
                    }
                }
            }
            // A dictionary token, inserted or overwriting.
            8 | 9 if !dictionary.is_empty() => {
                let token = &dictionary[rng.below(dictionary.len())];
                let at = rng.below(len + 1);
                if rng.chance(2) && at < len {
                    let end = (at + token.len()).min(len);
                    input.splice(at..end, token.iter().copied());
                } else {
                    input.splice(at..at, token.iter().copied());
                }
            }
            // Replace a run of digits with a number at a type's edge.
            10 => {
                let digits: Vec<usize> = (0..len).filter(|&i| input[i].is_ascii_digit()).collect();
                let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
                if digits.is_empty() {
                    let at = rng.below(len + 1);
                    input.splice(at..at, number.bytes());
                } else {
                    let start = digits[rng.below(digits.len())];
                    let end = (start..len)
                        .find(|&j| !input[j].is_ascii_digit())
                        .unwrap_or(len);
                    input.splice(start..end, number.bytes());
                }
            }
            // Truncate.
            11 if len > 1 => input.truncate(rng.below(len)),
            // Change a byte by a small amount (a digit to the next, a letter's case).
            _ if len > 0 => {
                let i = rng.below(len);
                input[i] = input[i].wrapping_add(rng.below(5) as u8).wrapping_sub(2);
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

// ---- the run -----------------------------------------------------------------------------------

/// Fuzzes `target` from `seeds` for `settings.duration`: the statistics, or the first crash.
/// Every seed is run first, unmutated.
pub fn fuzz(
    name: &'static str,
    target: Target,
    seeds: Vec<Vec<u8>>,
    dictionary: &[Vec<u8>],
    settings: &Settings,
) -> Result<Stats, Crash> {
    let start = Instant::now();
    let watchdog = Watchdog::start(name, settings.hang_after);
    let mut rng = Rng(settings.seed);
    let mut corpus: Vec<Vec<u8>> = if seeds.is_empty() {
        vec![Vec::new()]
    } else {
        seeds
    };
    let seed_count = corpus.len();
    let mut stats = Stats {
        execs: 0,
        accepted: 0,
        corpus: corpus.len(),
        elapsed: Duration::ZERO,
        slowest: Duration::ZERO,
    };
    let crash = |input: &[u8], message: String| {
        let minimized = minimize(target, input, &message, Duration::from_secs(5));
        Crash {
            input: input.to_vec(),
            minimized,
            message,
        }
    };
    let mut next_seed = 0;
    loop {
        // Seeds first, as they are; then mutants of random corpus entries.
        let input = if next_seed < seed_count {
            next_seed += 1;
            corpus[next_seed - 1].clone()
        } else {
            if start.elapsed() >= settings.duration {
                break;
            }
            let mut m = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut m, &corpus, dictionary);
            m.truncate(settings.max_len);
            m
        };
        watchdog.enter(&input);
        let t0 = Instant::now();
        let outcome = run_one(target, &input);
        stats.slowest = stats.slowest.max(t0.elapsed());
        watchdog.leave();
        stats.execs += 1;
        match outcome {
            Err(message) => return Err(crash(&input, message)),
            Ok(true) => {
                stats.accepted += 1;
                if corpus.len() < settings.max_corpus {
                    corpus.push(input);
                } else if corpus.len() > seed_count {
                    // Keep the seeds; replace a mutant.
                    let i = seed_count + rng.below(corpus.len() - seed_count);
                    corpus[i] = input;
                }
            }
            Ok(false) => {}
        }
    }
    stats.corpus = corpus.len();
    stats.elapsed = start.elapsed();
    Ok(stats)
}

// ---- corpus and dictionary files ---------------------------------------------------------------

/// The files of a corpus directory (sorted by name, for a repeatable run), with their bytes.
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            let bytes = std::fs::read(&path)?;
            files.push((path, bytes));
        }
    }
    files.sort();
    Ok(files)
}

/// Why a dictionary line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dictionary line {line}: {reason}")]
pub struct DictError {
    pub line: usize,
    pub reason: String,
}

/// Parses a libFuzzer dictionary (`-dict=`): one `"token"` or `name="token"` a line, `#`
/// comments, `\\`, `\"` and `\xHH` escapes. The same files feed both engines.
pub fn parse_dictionary(text: &str) -> Result<Vec<Vec<u8>>, DictError> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| DictError {
            line: n + 1,
            reason: reason.to_string(),
        };
        let quoted = match line.find('"') {
            Some(i) if line.len() > i + 1 && line.ends_with('"') => &line[i + 1..line.len() - 1],
            _ => return Err(err("expected a token in double quotes")),
        };
        let mut token = Vec::new();
        let mut bytes = quoted.bytes();
        while let Some(b) = bytes.next() {
            if b != b'\\' {
                token.push(b);
                continue;
            }
            match bytes.next() {
                Some(b'\\') => token.push(b'\\'),
                Some(b'"') => token.push(b'"'),
                Some(b'x') => {
                    let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                    let value = std::str::from_utf8(&hex)
                        .ok()
                        .filter(|h| h.len() == 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| err("`\\x` needs two hexadecimal digits"))?;
                    token.push(value);
                }
                _ => return Err(err("unknown escape (use \\\\, \\\" or \\xHH)")),
            }
        }
        if token.is_empty() {
            return Err(err("empty token"));
        }
        tokens.push(token);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panics on any input holding `BUG`; accepts inputs holding `BU`.
    fn planted(data: &[u8]) -> bool {
        assert!(!data.windows(3).any(|w| w == b"BUG"), "planted bug reached");
        data.windows(2).any(|w| w == b"BU")
    }

    #[test]
    fn the_engine_finds_a_planted_bug_and_minimises_it() {
        let settings = Settings {
            duration: Duration::from_secs(20),
            ..Settings::default()
        };
        let seeds = vec![b"xxxxBUxxxx".to_vec()];
        let crash = fuzz("planted", planted, seeds, &[], &settings)
            .expect_err("three letters from a seed holding two of them are found");
        assert!(crash.message.contains("planted bug reached"), "{crash}");
        assert_eq!(crash.minimized, b"BUG", "{crash}");
        assert!(crash.input.windows(3).any(|w| w == b"BUG"));
    }

    #[test]
    fn a_clean_target_runs_for_its_time_and_grows_its_corpus() {
        let settings = Settings {
            duration: Duration::from_millis(300),
            ..Settings::default()
        };
        let accept_digits = |d: &[u8]| d.iter().all(u8::is_ascii_digit);
        let stats = fuzz(
            "digits",
            accept_digits,
            vec![b"123".to_vec()],
            &[],
            &settings,
        )
        .expect("no panic");
        assert!(stats.execs > 100, "{stats}");
        assert!(stats.accepted >= 1 && stats.corpus > 1, "{stats}");
        assert!(stats.elapsed >= settings.duration, "{stats}");
    }

    #[test]
    fn run_one_reports_the_site_and_message_and_stops_capturing() {
        assert_eq!(run_one(planted, b"xBU"), Ok(true));
        assert_eq!(run_one(planted, b"x"), Ok(false));
        let message = run_one(planted, b"a BUG").unwrap_err();
        assert!(
            message.starts_with("panicked at fuzzing/src/engine.rs:"),
            "{message}"
        );
        assert!(message.ends_with("planted bug reached"), "{message}");
        // Outside a run the hook captures nothing: another test's panic is printed as usual.
        assert!(CAPTURE.with(|c| c.borrow().is_none()));
    }

    #[test]
    fn panic_sites_ignore_the_message() {
        let m = "panicked at gtid/src/lib.rs:10:5:\nindex out of bounds";
        assert_eq!(panic_site(m), "gtid/src/lib.rs:10:5");
        assert_eq!(panic_site("odd"), "odd");
    }

    #[test]
    fn dictionaries_read_libfuzzer_syntax() {
        let text = "# comment\n\"a\"\nkw=\"[tablet]\"\n\"\\x00\\\\\\\"\"\n\n";
        assert_eq!(
            parse_dictionary(text),
            Ok(vec![
                b"a".to_vec(),
                b"[tablet]".to_vec(),
                b"\0\\\"".to_vec()
            ])
        );
        for bad in ["a", "\"\"", "\"\\q\"", "\"\\x1\""] {
            assert!(parse_dictionary(bad).is_err(), "{bad:?}");
        }
    }
}
