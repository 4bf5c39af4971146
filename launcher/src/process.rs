//! [`Proc`]: one child process (re)started from a fixed command line, output appended to a
//! log file, killed and reaped on drop unless detached.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};
use crate::util::{log_tail, signal};

/// Lines of log put into start errors.
pub(crate) const TAIL_LINES: usize = 30;

/// A process's complete command line, as `sandbox.json` keeps it so that `myhactl sandbox
/// restart` starts the process again exactly as the harness first did (same arguments, hence
/// the same datadir, ports, socket and config). Text only: the harness's own paths are UTF-8,
/// and a command line that is not is simply not recorded (see [`Proc::command_line`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Variables set for the process (on top of the starter's environment).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Variables removed from the starter's environment.
    #[serde(default)]
    pub env_removed: Vec<String>,
    /// Where stdout and stderr are appended.
    pub log: PathBuf,
}

pub(crate) struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    new_session: bool,
    env: Vec<(OsString, OsString)>,
    env_removed: Vec<OsString>,
    child: Mutex<Option<Child>>,
    last_exit: Mutex<Option<ExitStatus>>,
    detached: AtomicBool,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("log", &self.log)
            .finish()
    }
}

impl Proc {
    pub(crate) fn new(
        name: impl Into<String>,
        program: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
        new_session: bool,
    ) -> Proc {
        Proc {
            name: name.into(),
            program,
            args,
            log,
            new_session,
            env: Vec::new(),
            env_removed: Vec::new(),
            child: Mutex::new(None),
            last_exit: Mutex::new(None),
            detached: AtomicBool::new(false),
        }
    }

    /// A process started from a recorded command line (see [`Proc::command_line`]).
    pub(crate) fn from_command_line(
        name: impl Into<String>,
        cl: &CommandLine,
        new_session: bool,
    ) -> Proc {
        let mut p = Proc::new(
            name,
            cl.program.clone(),
            cl.args.iter().map(OsString::from).collect(),
            cl.log.clone(),
            new_session,
        );
        p.env = cl
            .env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        p.env_removed = cl.env_removed.iter().map(OsString::from).collect();
        p
    }

    /// The command line this process is (re)started with; `None` when a part of it is not
    /// UTF-8 (it could not be recorded faithfully).
    pub(crate) fn command_line(&self) -> Option<CommandLine> {
        let text = |s: &OsString| s.to_str().map(str::to_string);
        // serde_json cannot write a non-UTF-8 path either.
        self.program.to_str()?;
        self.log.to_str()?;
        Some(CommandLine {
            program: self.program.clone(),
            args: self.args.iter().map(text).collect::<Option<_>>()?,
            env: self
                .env
                .iter()
                .map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect::<Option<_>>()?,
            env_removed: self.env_removed.iter().map(text).collect::<Option<_>>()?,
            log: self.log.clone(),
        })
    }

    /// Runs the process inside network namespace `ns` (`None`: where the harness runs), through
    /// `ip netns exec`, which enters the namespace and execs the program: the pid, signals and
    /// exit status stay the program's, and the recorded command line carries the namespace.
    pub(crate) fn in_netns(mut self, ns: Option<&str>) -> Proc {
        if let Some(ns) = ns {
            let mut args: Vec<OsString> = vec!["netns".into(), "exec".into(), ns.into()];
            args.push(std::mem::take(&mut self.program).into_os_string());
            args.append(&mut self.args);
            self.program = PathBuf::from("ip");
            self.args = args;
        }
        self
    }

    /// Adds an environment variable for every (re)start.
    pub(crate) fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Proc {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Removes an inherited environment variable for every (re)start.
    pub(crate) fn without_env(mut self, key: impl Into<OsString>) -> Proc {
        self.env_removed.push(key.into());
        self
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns the process; an error if it is already running.
    pub(crate) fn spawn(&self) -> Result<u32> {
        let mut guard = self.lock();
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Err(self.err(format!("already running as pid {}", child.id())));
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(HarnessError::io(format!(
                "{}: open log {}",
                self.name,
                self.log.display()
            )))?;
        let log2 = log
            .try_clone()
            .map_err(HarnessError::io(format!("{}: dup log fd", self.name)))?;
        let mut cmd = Command::new(&self.program);
        for k in &self.env_removed {
            cmd.env_remove(k);
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if self.new_session {
            // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(HarnessError::io(format!(
            "{}: spawn {}",
            self.name,
            self.program.display()
        )))?;
        let pid = child.id();
        *guard = Some(child);
        Ok(pid)
    }

    fn err(&self, message: impl Into<String>) -> HarnessError {
        HarnessError::Process {
            process: self.name.clone(),
            message: message.into(),
        }
    }

    /// A start failure with the log's tail.
    pub(crate) fn start_error(&self, reason: impl Into<String>) -> HarnessError {
        HarnessError::Start {
            process: self.name.clone(),
            reason: reason.into(),
            log: self.log.clone(),
            tail: log_tail(&self.log, TAIL_LINES),
        }
    }

    /// The pid while the process runs (a stopped/frozen process counts as running).
    pub(crate) fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        self.reap_if_exited(&mut guard);
        guard.as_ref().map(Child::id)
    }

    fn reap_if_exited(&self, guard: &mut Option<Child>) {
        if let Some(child) = guard.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                *self.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                *guard = None;
            }
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// How the last run ended, if it did.
    pub(crate) fn last_exit(&self) -> Option<ExitStatus> {
        *self.last_exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running_pid(&self) -> Result<u32> {
        self.pid().ok_or_else(|| self.err("not running"))
    }

    pub(crate) fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.running_pid()?;
        signal(pid, sig).map_err(HarnessError::io(format!(
            "{}: signal {sig} to pid {pid}",
            self.name
        )))
    }

    /// SIGKILL and reap. A no-op when not running.
    pub(crate) fn kill(&self) -> Result<()> {
        let mut guard = self.lock();
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let status = child.wait().map_err(HarnessError::io(format!(
                "{}: wait after SIGKILL",
                self.name
            )))?;
            *self.last_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        }
        Ok(())
    }

    /// SIGSTOP, returning once every thread of the process is stopped (bounded by 1 s): the
    /// signal takes effect at each thread's next return to user space, and a test that acts
    /// right after the call must find the process frozen, not answering one last query.
    pub(crate) fn freeze(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)?;
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && !all_threads_stopped(pid) {
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    pub(crate) fn thaw(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGTERM (and SIGCONT, in case it is frozen), wait up to `grace` for the exit, then
    /// SIGKILL. Returns whether it exited on its own. A no-op when not running.
    pub(crate) async fn stop(&self, grace: Duration) -> Result<bool> {
        let Some(pid) = self.pid() else {
            return Ok(true);
        };
        let _ = signal(pid, libc::SIGTERM);
        let _ = signal(pid, libc::SIGCONT);
        let start = Instant::now();
        while start.elapsed() < grace {
            if !self.is_running() {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(process = %self.name, ?grace, "did not exit on SIGTERM; killing");
        self.kill()?;
        Ok(false)
    }

    /// Leave the process running when this handle is dropped.
    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    /// Fails with the log tail if the process has exited.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let how = self
            .last_exit()
            .map(|s| format!("exited ({s})"))
            .unwrap_or_else(|| "not running".into());
        Err(self.start_error(how))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.kill();
    }
}

/// The signal and state accessors every process wrapper of the harness shares (the wrapper keeps
/// its child in a field named `proc`), written once.
macro_rules! signal_controls {
    () => {
        pub fn pid(&self) -> Option<u32> {
            self.proc.pid()
        }

        pub fn is_running(&self) -> bool {
            self.proc.is_running()
        }

        /// SIGKILL, and reap.
        pub fn kill(&self) -> $crate::Result<()> {
            self.proc.kill()
        }

        /// SIGSTOP.
        pub fn freeze(&self) -> $crate::Result<()> {
            self.proc.freeze()
        }

        /// SIGCONT.
        pub fn thaw(&self) -> $crate::Result<()> {
            self.proc.thaw()
        }
    };
}
pub(crate) use signal_controls;

/// Whether every thread of `pid` is in the stopped state (`T`), read from `/proc`; `true` when
/// the process is gone (nothing left to run).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|task| {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return true;
        };
        // `pid (comm) S ...`: the state follows the last ')' (comm may hold spaces or parens).
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "T" || state == "t" || state == "Z" || state == "X")
    })
}
