//! [`ConfigDaemon`]: any myha daemon binary run as `BIN --config FILE`, for tests that write
//! their own config or run a binary deployed somewhere else (the playbooks). The typed wrappers
//! ([`crate::OrchestratorProc`], [`crate::GatewayProc`], ...) generate their configs themselves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::process::Proc;
use crate::util::{find_myha_bin, log_tail};

/// Killed (SIGKILL) on drop. `$MYHA_LOG` is not passed on: the config's `[log]` rules.
#[derive(Debug)]
pub struct ConfigDaemon {
    proc: Proc,
}

impl ConfigDaemon {
    /// Starts `bin --config config`, output to `log`.
    pub fn start(bin: &Path, config: &Path, log: PathBuf) -> Result<ConfigDaemon> {
        let name = bin
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| bin.display().to_string());
        let args: Vec<OsString> = vec!["--config".into(), config.as_os_str().to_owned()];
        let proc = Proc::new(name, bin.to_path_buf(), args, log, false).without_env("MYHA_LOG");
        proc.spawn()?;
        Ok(ConfigDaemon { proc })
    }

    /// Starts the built binary `name` (see [`find_myha_bin`]) with `config`.
    pub fn start_built(name: &str, config: &Path, log: PathBuf) -> Result<ConfigDaemon> {
        ConfigDaemon::start(&find_myha_bin(name)?, config, log)
    }

    pub fn name(&self) -> &str {
        self.proc.name()
    }

    pub fn log_path(&self) -> &Path {
        self.proc.log()
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.proc.log()).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(self.proc.log(), lines)
    }

    /// Fails with the log's tail when the process has exited.
    pub fn check_alive(&self) -> Result<()> {
        self.proc.check_alive()
    }

    crate::process::signal_controls!();
}
