//! What the benchmarks (`tests/benches/*.rs`) share: percentiles and table cells, argument
//! parsing, an HAProxy in `mode tcp` (the anchor the gateway is measured against) and a sysbench
//! runner with its output parsed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100); zero when empty.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `min | p50 | p99 | max` of the values present, each printed by `unit`; runs without a value
/// are counted after the cells.
pub fn stats_with(v: &[Option<Duration>], unit: fn(Duration) -> String) -> String {
    let mut s: Vec<Duration> = v.iter().flatten().copied().collect();
    s.sort();
    if s.is_empty() {
        return "n/a | n/a | n/a | n/a".into();
    }
    let missing = v.len() - s.len();
    format!(
        "{} | {} | {} | {}{}",
        unit(s[0]),
        unit(pct(&s, 50.0)),
        unit(pct(&s, 99.0)),
        unit(s[s.len() - 1]),
        if missing > 0 {
            format!(" ({missing} runs without a value)")
        } else {
            String::new()
        }
    )
}

/// Seconds with 3 decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Whole milliseconds.
pub fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// The value after `--name` on the command line (cargo bench passes `--bench`, ignored).
pub fn arg(name: &str) -> Option<String> {
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == name {
            return it.next();
        }
        if let Some(v) = a.strip_prefix(&format!("{name}=")) {
            return Some(v.to_string());
        }
    }
    None
}

/// `--name N` parsed, or `default`; a value that does not parse is a usage error (panic with it).
pub fn arg_parsed<T: std::str::FromStr>(name: &str, default: T) -> T {
    match arg(name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} {v:?}: not a valid value")),
    }
}

/// The benchmarks' runtime: 2 workers, like the daemons'.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Where a benchmark's acknowledged-write recorder sends its inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// To the primary the shard record names (the client follows etcd itself).
    Direct,
    /// Through the gateway's RW port (the client knows nothing of the topology).
    Gateway,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "writes to the primary named by etcd",
            Via::Gateway => "writes through the myha-gateway RW port",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Gateway => "gateway",
        }
    }

    /// `--via a,b` (gateway, direct), or `default`.
    pub fn from_args(default: &[Via]) -> Vec<Via> {
        match arg("--via") {
            None => default.to_vec(),
            Some(list) => list
                .split(',')
                .map(|v| match v.trim() {
                    "gateway" => Via::Gateway,
                    "direct" => Via::Direct,
                    other => panic!("--via {other:?}: gateway or direct"),
                })
                .collect(),
        }
    }
}

/// Where a benchmark's cluster runs: every process on loopback, or each on a host of its own
/// (network namespaces) with a round trip of `rtt` between any two hosts (each host's link
/// delayed by a quarter of it each way: `harness::netns::Network::delay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Links {
    Loopback,
    Netns { rtt: Duration },
}

/// `--security tls,plain` (default both, TLS first): the clusters to compare. Every test runs
/// with TLS; plaintext exists only to show beside it what TLS costs, in the same run.
pub fn security_from_args() -> Vec<harness::Security> {
    arg("--security")
        .unwrap_or_else(|| "tls,plain".into())
        .split(',')
        .map(|s| match s.trim() {
            "tls" => harness::Security::Tls,
            "plain" | "plaintext" => harness::Security::Plaintext,
            other => panic!("--security {other:?}: tls or plain"),
        })
        .collect()
}

/// For table titles.
pub fn security_name(s: harness::Security) -> &'static str {
    match s {
        harness::Security::Tls => "TLS and authentication on every control-plane link",
        harness::Security::Plaintext => "plaintext control plane (for comparison only)",
    }
}

impl Links {
    /// `--hosts loopback|netns` (default loopback) and, with netns, `--rtt 0ms,0.5ms,2ms`
    /// (humantime, comma-separated; default 0ms): one setting per round trip.
    pub fn from_args() -> Vec<Links> {
        match arg("--hosts").as_deref() {
            None | Some("loopback") => vec![Links::Loopback],
            Some("netns") => arg("--rtt")
                .unwrap_or_else(|| "0ms".into())
                .split(',')
                .map(|r| {
                    let rtt = humantime::parse_duration(r.trim())
                        .unwrap_or_else(|e| panic!("--rtt {r:?}: {e}"));
                    Links::Netns { rtt }
                })
                .collect(),
            Some(other) => panic!("--hosts {other:?}: loopback or netns"),
        }
    }

    pub fn hosts(self) -> harness::Hosts {
        match self {
            Links::Loopback => harness::Hosts::Loopback,
            Links::Netns { .. } => harness::Hosts::Netns,
        }
    }

    /// For table titles.
    pub fn name(self) -> String {
        match self {
            Links::Loopback => "loopback".into(),
            Links::Netns { rtt } => format!(
                "a host per process (network namespaces), {} ms round trip between hosts",
                rtt.as_secs_f64() * 1000.0
            ),
        }
    }

    /// Delays every host's link of `c` (again after a heal, which removes delays).
    pub fn shape(self, c: &harness::Cluster) {
        if let (Links::Netns { rtt }, Some(net)) = (self, c.network()) {
            if rtt.is_zero() {
                return;
            }
            for h in net.hosts() {
                self.shape_host(c, &h.name);
            }
        }
    }

    /// Gives `host` its share of the round trip again (after a heal removed it).
    pub fn shape_host(self, c: &harness::Cluster, host: &str) {
        if let (Links::Netns { rtt }, Some(net)) = (self, c.network()) {
            if !rtt.is_zero() {
                net.delay(host, rtt / 4, Duration::ZERO)
                    .unwrap_or_else(|e| panic!("delay {host}: {e}"));
            }
        }
    }
}

/// HAProxy 2.x in `mode tcp` in front of one backend, with the distribution's defaults otherwise
/// (threads = CPUs). Killed on drop.
pub struct Haproxy {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
    log: PathBuf,
}

impl Haproxy {
    /// Starts `haproxy -db -f cfg` listening on `127.0.0.1:listen_port` and waits until it accepts.
    pub fn start(dir: &Path, listen_port: u16, backend: &str) -> Result<Haproxy, String> {
        Haproxy::start_with(
            dir,
            listen_port,
            &format!(
                "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 1s\n    \
                 timeout client 1h\n    timeout server 1h\n\nlisten mysql_ro\n    \
                 bind 127.0.0.1:{listen_port}\n    server backend {backend}\n"
            ),
        )
    }

    /// Starts `haproxy -db -f cfg` with `config` (which must bind `127.0.0.1:listen_port`) and
    /// waits until that port accepts.
    pub fn start_with(dir: &Path, listen_port: u16, config: &str) -> Result<Haproxy, String> {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).map_err(|e| format!("write {}: {e}", cfg.display()))?;
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("haproxy log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("haproxy log: {e}"))?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn haproxy: {e} (scripts/dev setup installs it)"))?;
        let mut h = Haproxy {
            child,
            port: listen_port,
            log,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = h.child.try_wait() {
                return Err(format!(
                    "haproxy exited with {status}: {}",
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                ));
            }
            if std::net::TcpStream::connect(("127.0.0.1", h.port)).is_ok() {
                return Ok(h);
            }
            if started.elapsed() > Duration::from_secs(10) {
                h.stop();
                return Err("haproxy did not accept within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The figures of one sysbench run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SysbenchResult {
    pub qps: f64,
    pub avg_ms: f64,
    pub p95_ms: f64,
    pub errors: u64,
    pub reconnects: u64,
}

/// Where and as whom sysbench connects.
#[derive(Debug, Clone)]
pub struct SysbenchTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub db: String,
}

/// Runs `sysbench <test> <command>` with the common options; returns stdout (error with the
/// whole output when it fails).
pub fn sysbench(
    target: &SysbenchTarget,
    test: &str,
    command: &str,
    tables: u32,
    table_size: u32,
    extra: &[String],
) -> Result<String, String> {
    let out = Command::new("sysbench")
        .arg(test)
        .arg(format!("--mysql-host={}", target.host))
        .arg(format!("--mysql-port={}", target.port))
        .arg(format!("--mysql-user={}", target.user))
        .arg(format!("--mysql-password={}", target.password))
        .arg(format!("--mysql-db={}", target.db))
        .arg(format!("--tables={tables}"))
        .arg(format!("--table-size={table_size}"))
        .args(extra)
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run sysbench: {e} (package sysbench)"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "sysbench {test} {command} failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

/// Parses sysbench 1.0's summary: `queries: N (X per sec.)`, latency `avg:` and
/// `95th percentile:`, `ignored errors:` and `reconnects:`.
pub fn parse_sysbench(text: &str) -> Result<SysbenchResult, String> {
    let value_after = |label: &str| -> Option<&str> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(label))
            .map(str::trim)
    };
    let per_sec = |label: &str| -> Option<f64> {
        let v = value_after(label)?;
        let open = v.find('(')?;
        v[open + 1..].split_whitespace().next()?.parse().ok()
    };
    let count = |label: &str| -> Option<u64> {
        value_after(label)?.split_whitespace().next()?.parse().ok()
    };
    let number = |label: &str| -> Option<f64> { value_after(label)?.parse().ok() };
    let missing = |what: &str| format!("sysbench output without {what}:\n{text}");
    Ok(SysbenchResult {
        qps: per_sec("queries:").ok_or_else(|| missing("queries per second"))?,
        avg_ms: number("avg:").ok_or_else(|| missing("avg latency"))?,
        p95_ms: number("95th percentile:").ok_or_else(|| missing("95th percentile"))?,
        errors: count("ignored errors:").ok_or_else(|| missing("ignored errors"))?,
        reconnects: count("reconnects:").ok_or_else(|| missing("reconnects"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "sysbench 1.0.20 (using system LuaJIT 2.1.0-beta3)

SQL statistics:
    queries performed:
        read:                            163213
        write:                           0
        other:                           0
        total:                           163213
    transactions:                        163213 (10880.12 per sec.)
    queries:                             163213 (10880.12 per sec.)
    ignored errors:                      0      (0.00 per sec.)
    reconnects:                          0      (0.00 per sec.)

General statistics:
    total time:                          15.0001s
    total number of events:              163213

Latency (ms):
         min:                                    0.06
         avg:                                    0.09
         max:                                    3.41
         95th percentile:                        0.13
         sum:                                14862.96
";

    #[test]
    fn parses_a_sysbench_summary() {
        let r = parse_sysbench(SAMPLE).unwrap();
        assert_eq!(
            r,
            SysbenchResult {
                qps: 10880.12,
                avg_ms: 0.09,
                p95_ms: 0.13,
                errors: 0,
                reconnects: 0
            }
        );
    }

    #[test]
    fn a_truncated_summary_names_what_is_missing() {
        let cut = &SAMPLE[..SAMPLE.find("Latency").unwrap()];
        let e = parse_sysbench(cut).unwrap_err();
        assert!(e.contains("avg latency"), "{e}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(pct(&v, 50.0), Duration::from_millis(50));
        assert_eq!(pct(&v, 99.0), Duration::from_millis(99));
        assert_eq!(pct(&v, 100.0), Duration::from_millis(100));
        assert_eq!(pct(&[], 50.0), Duration::ZERO);
        let cells = stats_with(
            &[
                Some(Duration::from_millis(2)),
                None,
                Some(Duration::from_millis(1)),
            ],
            millis,
        );
        assert_eq!(cells, "1 ms | 1 ms | 2 ms | 2 ms (1 runs without a value)");
    }
}
