//! myhactl: the operator's CLI for myha.
//!
//! Exit status, for every command: 0 success; 1 refused or failed, with the reason on stderr;
//! 2 usage error (clap's own, which also covers a malformed `keyspace/shard` or duration since
//! those are parsed by clap).

mod api;
mod audit;
mod quarantine;
mod recoveries;
mod reparent;
mod sandbox;
mod sandbox_fault;
mod sandbox_restart;
mod sandbox_write;
mod scope;
mod security;
mod sql;
mod status;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

const LONG_ABOUT: &str = "\
Operate myha: see each shard's state, move primaries, control automatic recovery, quarantine
tablets, read the audit log, and run a local sandbox cluster.

Commands that change something speak to the orchestrator's HTTP API, found with
--orchestrator or $MYHA_ORCHESTRATOR, else the sandbox's; when the orchestrator has API
tokens, give one with --token or $MYHA_API_TOKEN (a `read` token for status, audit and
quarantine list, an `operate` token for changes; the audit names the token as the actor).
Reads fall back to etcd when the orchestrator does not answer, and say so.

etcd and the agents are reached over TLS with the operator's certificate (--ca, --cert, --key
or $MYHA_CA, $MYHA_CERT, $MYHA_KEY) and etcd as a user (--etcd-user or $MYHA_ETCD_USER, the
password in --etcd-password-file, $MYHA_ETCD_PASSWORD_FILE or $MYHA_ETCD_PASSWORD); with none
of these given, the sandbox's own are used.

Exit status: 0 success, 1 refused or failed (reason on stderr), 2 usage error.";

const EXAMPLES: &str = "\
Examples:
  myhactl sandbox up                                  # a local cluster to try it on
  myhactl status
  myhactl sandbox fault kill primary                  # then: myhactl sandbox restart ALIAS
  myhactl reparent planned commerce/0 --to zone1-102
  myhactl recoveries disable commerce/0 --reason 'disk swap on zone1-101'
  myhactl recoveries enable commerce/0
  myhactl ack commerce/0
  myhactl audit commerce/0 --limit 20
  myhactl quarantine add zone1-103 --reason 'checksum mismatch'
  myhactl quarantine release zone1-103
  source <(myhactl completions bash)";

#[derive(Parser, Debug)]
#[command(
    name = "myhactl",
    version,
    about = "Operate myha: status, reparents, recovery control, audit, sandbox",
    long_about = LONG_ABOUT,
    after_long_help = EXAMPLES,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    security: security::SecurityArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Each shard: primary, term, and every tablet's health.
    Status(status::StatusArgs),
    /// Move a shard's primary (planned: lossless switchover; emergency: promote now).
    Reparent {
        #[command(subcommand)]
        command: reparent::ReparentCommand,
    },
    /// Disable or enable automatic recovery, of one shard or globally.
    Recoveries {
        #[command(subcommand)]
        command: recoveries::RecoveriesCommand,
    },
    /// Acknowledge a shard's recoveries: resets its flapping count so that automatic
    /// recovery acts on it again.
    #[command(after_long_help = ACK_EXAMPLES)]
    Ack(recoveries::AckArgs),
    /// The audit log: every recovery, reparent step, switch and ack, newest first.
    Audit(audit::AuditArgs),
    /// Keep tablets out of promotion and read routing (list, add, release).
    Quarantine {
        #[command(subcommand)]
        command: quarantine::QuarantineCommand,
    },
    /// Print a shell completion script.
    #[command(after_long_help = COMPLETION_EXAMPLES)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// A local cluster (etcd + MariaDB + agents + orchestrator + gateway) to try myha on one machine.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

const ACK_EXAMPLES: &str = "\
A shard that had too many emergency reparents in a short time (flapping) is left alone by
automatic recovery until an operator has looked at it and acknowledged.

Examples:
  myhactl audit commerce/0          # what happened
  myhactl ack commerce/0 --reason 'bad NIC on zone1-101 replaced'";

const COMPLETION_EXAMPLES: &str = "\
Examples:
  source <(myhactl completions bash)                          # this shell
  myhactl completions bash > /etc/bash_completion.d/myhactl
  myhactl completions zsh > \"${fpath[1]}/_myhactl\"
  myhactl completions fish > ~/.config/fish/completions/myhactl.fish";

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// Start etcd, N MariaDB instances, their agents, an orchestrator and a gateway in the background.
    Up(sandbox::UpArgs),
    /// Stop everything a sandbox started.
    Down(sandbox::DownArgs),
    /// Run SQL as the application user on the current primary (or --tablet).
    Sql(sql::SqlArgs),
    /// Write one row per interval as the application user (through the gateway's RW port by
    /// default), across faults; then check every acknowledged write is on the current primary.
    #[command(after_long_help = WRITE_EXAMPLES)]
    Write(sandbox_write::WriteArgs),
    /// Kill, freeze (stop) or thaw (cont) a tablet's mysqld: the primary or one by alias.
    #[command(after_long_help = FAULT_EXAMPLES)]
    Fault(sandbox_fault::FaultArgs),
    /// Start a killed tablet's mysqld again (same datadir, ports, config; its agent too if it
    /// is gone): the tablet rejoins as a replica, or is quarantined with the reason.
    #[command(after_long_help = FAULT_EXAMPLES)]
    Restart(sandbox_restart::RestartArgs),
}

const FAULT_EXAMPLES: &str = "\
Examples:
  myhactl sandbox fault kill primary       # a crash: the orchestrator promotes a replica
  myhactl status                           # the new primary; the old one is down
  myhactl sandbox restart zone1-101        # the old primary comes back and rejoins as a replica
  myhactl sandbox fault stop zone1-102     # a freeze; thaw it with `fault cont zone1-102`";

const WRITE_EXAMPLES: &str = "\
Examples:
  myhactl sandbox write --duration 20s &              # an application writing through the gateway
  myhactl sandbox fault kill primary                  # a crash: watch the writes resume elsewhere
  myhactl sandbox write --via primary --interval 5ms  # straight to the primary etcd names";

fn main() -> ExitCode {
    // Parse errors exit 2 (clap's usage error) from here.
    let cli = Cli::parse();
    security::init(cli.security.clone());
    if let Command::Completions { shell } = cli.command {
        // No runtime or logging: the script alone goes to stdout.
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "myhactl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MYHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("myhactl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        match cli.command {
            Command::Status(a) => status::run(a).await.map_err(Into::into),
            Command::Reparent { command } => reparent::run(command).await.map_err(Into::into),
            Command::Recoveries { command } => {
                recoveries::toggle(command).await.map_err(Into::into)
            }
            Command::Ack(a) => recoveries::ack(a).await.map_err(Into::into),
            Command::Audit(a) => audit::run(a).await.map_err(Into::into),
            Command::Quarantine { command } => quarantine::run(command).await.map_err(Into::into),
            // Handled above, before the runtime.
            Command::Completions { .. } => Ok(()),
            Command::Sandbox { command } => match command {
                SandboxCommand::Up(a) => sandbox::up(a).await,
                SandboxCommand::Down(a) => sandbox::down(a).await,
                SandboxCommand::Sql(a) => sql::run(a).await,
                SandboxCommand::Write(a) => sandbox_write::run(a).await.map_err(Into::into),
                SandboxCommand::Fault(a) => sandbox_fault::run(a).await.map_err(Into::into),
                SandboxCommand::Restart(a) => sandbox_restart::run(a).await.map_err(Into::into),
            },
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("myhactl: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("myhactl").chain(args.iter().copied()))
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        // More cases, checked on the real binary's exit code, in tests/tests/myhactl.rs.
        for args in [
            &["reparent", "emergency", "commerce/0", "--lock-timeout", "5"][..],
            &["reparent", "planned", "commerce/0", "--to", "zone 1"],
            &["ack", "commerce/"],
            &["recoveries", "disable", "/0"],
            &["audit", "--limit", "1001"],
            &["quarantine", "add", "zone1-103"],
            &["quarantine", "add", "zone1", "--reason", "x"],
            &["quarantine", "release"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?}"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        let cli = parse(&[
            "reparent",
            "planned",
            "commerce/-80",
            "--to",
            "zone1-102",
            "--max-lag",
            "500ms",
        ])
        .unwrap();
        match cli.command {
            Command::Reparent {
                command: reparent::ReparentCommand::Planned(a),
            } => {
                assert_eq!(a.target.shard.shard, "-80");
                assert_eq!(a.max_lag, Some(std::time::Duration::from_millis(500)));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["recoveries", "enable"]).is_ok());
        assert!(parse(&["audit", "commerce"]).is_ok());
        assert!(parse(&["quarantine", "list"]).is_ok());
        assert!(parse(&["quarantine", "add", "zone1-103", "--reason", "x"]).is_ok());
        assert!(parse(&["quarantine", "release", "zone1-103"]).is_ok());
        assert!(parse(&["sandbox", "restart", "zone1-101", "--dir", "/tmp/x"]).is_ok());
        assert_eq!(parse(&["sandbox", "restart"]).unwrap_err().exit_code(), 2);
    }
}
