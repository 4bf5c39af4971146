//! Small helpers: free ports, passwords, locating binaries, log tails, signals.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::error::{HarnessError, Result};

/// Ports this process already handed out (never handed out twice).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
/// Cross-process reservations: an flock on `{tmp}/myha-harness-ports/{port}` held until this
/// process exits, so concurrent test processes never pick the same port, even while the
/// process owning it is down between a kill and a restart.
static RESERVATIONS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// Tries to reserve `port` across processes; `true` when this process now holds it (or
/// reservations are unavailable, e.g. an unwritable temp dir: the bind check still applies).
fn reserve(port: u16) -> bool {
    use std::os::fd::AsRawFd;
    let dir = std::env::temp_dir().join("myha-harness-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    // SAFETY: flock(2) on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false;
    }
    RESERVATIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(file);
    true
}

/// The kernel's ephemeral range (outgoing connections take their local port from it).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A free TCP port on 127.0.0.1, checked by binding it.
///
/// Ports are picked at random *below* the kernel's ephemeral range when there is room
/// (15000..low): a process restarted on the same port then never finds it taken by the local
/// end of some outgoing connection. Falls back to binding port 0. A port is never handed out
/// twice by one process, nor by two processes that both use this function (see `reserve`).
pub fn free_port() -> Result<u16> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let taken = guard.get_or_insert_with(HashSet::new);
    let (low, high) = ephemeral_range();
    let mut rng = rand::rng();
    if low > 16000 {
        for _ in 0..200 {
            let port = rng.random_range(15000..low);
            if !taken.contains(&port) && bindable(port) && reserve(port) {
                taken.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..200 {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .map_err(HarnessError::io("bind 127.0.0.1:0 to pick a free port"))?;
        let port = l
            .local_addr()
            .map_err(HarnessError::io("local_addr"))?
            .port();
        if !taken.contains(&port) && reserve(port) {
            taken.insert(port);
            return Ok(port);
        }
    }
    Err(HarnessError::Invalid(format!(
        "no free loopback port found (ephemeral range {low}-{high})"
    )))
}

/// A random alphanumeric password (20 characters).
pub fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(20)
        .map(char::from)
        .collect()
}

/// Finds a system program: `$env_var` (a full path) if set, else `$PATH`, else the usual
/// sbin/bin directories.
pub(crate) fn find_system_program(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(HarnessError::BinaryNotFound {
            name: name.into(),
            searched: format!("${env_var}={}", p.display()),
            hint: format!("${env_var} must name the `{name}` executable"),
        });
    }
    let mut searched = Vec::new();
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let extra = [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ];
    for dir in path_dirs.into_iter().chain(extra.iter().map(PathBuf::from)) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    searched.dedup();
    Err(HarnessError::BinaryNotFound {
        name: name.into(),
        searched: format!("$PATH and {}", searched.join(":")),
        hint: format!("install it or set ${env_var} to its path"),
    })
}

/// Finds one of myha's own binaries (`myha-agent`, ...): the directory `$MYHA_BIN_DIR` if set,
/// else the first ancestor of the running executable's directory that contains it (tests run
/// from `target/debug/deps`, `myhactl` from `target/debug`).
pub fn find_myha_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MYHA_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        return Err(HarnessError::BinaryNotFound {
            name: name.into(),
            searched: format!("$MYHA_BIN_DIR ({})", p.display()),
            hint: "set MYHA_BIN_DIR to the directory holding the myha binaries".into(),
        });
    }
    let exe = std::env::current_exe().map_err(HarnessError::io("current_exe"))?;
    let mut searched = Vec::new();
    for dir in exe.parent().into_iter().flat_map(Path::ancestors) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        searched.push(dir.display().to_string());
    }
    Err(HarnessError::BinaryNotFound {
        name: name.into(),
        searched: format!("$MYHA_BIN_DIR (unset), then {}", searched.join(", ")),
        hint: format!("build it (`cargo build -p {name}`) or set MYHA_BIN_DIR"),
    })
}

/// The last `lines` lines of a (log) file; a note when it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The state letter of a process (`R`, `S`, `T`, `Z`, ...), from /proc/PID/stat.
fn pid_state(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state is the first field after the parenthesised command name (which may hold
    // spaces or parentheses itself).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_string)
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    pid_state(pid).is_some_and(|state| state != "Z" && state != "X")
}

/// Whether the process is stopped by a signal (SIGSTOP: frozen, waiting for SIGCONT).
pub fn pid_stopped(pid: u32) -> bool {
    pid_state(pid).is_some_and(|state| state == "T")
}

/// The resident set size of a process in KiB (from /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Polls `probe` every `every` until it returns `Ok(Some(_))` or `timeout` passes; the last
/// probe error is put in the timeout error.
pub(crate) async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last: Option<String> = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e.to_string()),
        }
        if start.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                after: timeout,
                detail: last,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs a system tool to completion: its stdout, or an error with its stderr (`hint` names the
/// package that provides it).
pub fn run_tool(program: &str, args: &[&str], hint: &str) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HarnessError::Io {
            what: format!("run {program} ({hint})"),
            source,
        })?;
    if !out.status.success() {
        return Err(HarnessError::Io {
            what: format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            source: std::io::Error::other(format!("{program} failed")),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        assert!(bindable(a) && bindable(b));
    }

    #[test]
    fn passwords_are_random_alphanumeric() {
        let a = random_password();
        assert_eq!(a.len(), 20);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, random_password());
    }

    #[test]
    fn own_pid_is_alive_and_has_rss() {
        assert!(pid_alive(std::process::id()));
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(!pid_alive(u32::MAX - 1));
    }

    #[test]
    fn log_tail_takes_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "c\nd");
        assert!(log_tail(&dir.path().join("nope"), 2).contains("cannot read"));
    }

    #[test]
    fn missing_myha_bin_names_the_search() {
        let err = find_myha_bin("no-such-myha-binary")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-myha-binary"), "{err}");
        assert!(err.contains("searched"), "{err}");
    }
}
