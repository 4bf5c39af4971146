//! `myhactl sandbox write`: an application writing to the sandbox, one insert per interval, as
//! the app user through the gateway's RW port (or straight to the primary etcd names), across
//! whatever happens meanwhile (`myhactl sandbox fault kill primary` in another shell). It says
//! when writes stop and start being acknowledged, sums up, and checks that every acknowledged
//! write is on the current primary.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use launcher::SandboxState;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use topo::Topo;

use crate::sandbox_fault::{self, FaultError};

/// The table, in the app database.
const TABLE: &str = "sandbox_writes";
/// Connect bound through the gateway: above its buffer window (5 s by default), since a
/// connection held while there is no primary is the point.
const GATEWAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(7);
/// Connect bound straight to a mysqld (a frozen one accepts TCP and never greets).
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the read-back may keep trying to connect.
const VERIFY_PATIENCE: Duration = Duration::from_secs(20);
/// At most this many missing ids are listed.
const MAX_LISTED: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Sandbox(#[from] FaultError),
    #[error(
        "the sandbox in {0} has no gateway RW port (it predates the gateway); use --via primary"
    )]
    NoGateway(PathBuf),
    #[error("{what} must be more than 0")]
    Zero { what: &'static str },
    #[error("no write was acknowledged in {duration:?} ({failed} failed attempts; last error: {last_error})")]
    NoAck {
        duration: Duration,
        failed: u64,
        last_error: String,
    },
    #[error("cannot read the acknowledged writes back {via} within {patience:?}: {reason}")]
    Verify {
        via: String,
        patience: Duration,
        reason: String,
    },
    #[error("{missing} of {acked} acknowledged writes are missing on the current primary, server_id {server_id}{alias}: ids {ids}")]
    Missing {
        missing: usize,
        acked: usize,
        server_id: u32,
        alias: String,
        ids: String,
    },
}

/// Where the writes go.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The gateway's RW port, as an application would.
    Gateway,
    /// Straight to the mysqld of the primary the etcd shard record names (re-read on every
    /// reconnect).
    Primary,
}

#[derive(clap::Args, Debug)]
pub struct WriteArgs {
    /// Sandbox directory (default: $MYHA_SANDBOX_DIR, else $HOME/.myha/sandbox).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How long to write (humantime, e.g. 10s).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// One insert per interval (humantime, e.g. 20ms).
    #[arg(long, default_value = "20ms", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Through the gateway's RW port, or straight to the primary named in etcd.
    #[arg(long, value_enum, default_value_t = Via::Gateway)]
    pub via: Via,
    /// Bound on one insert (or read-back query); past it the connection is dropped.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,
    /// Bound on one connection attempt (default: 7s through the gateway, above its buffer
    /// window, so that a connection it holds during a failover is waited for; 1s direct).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// How the writer connects.
enum Route {
    Gateway { addr: String },
    Primary { topo: Box<Topo> },
}

/// One open connection and the server behind it.
struct Open {
    conn: Conn,
    server_id: u32,
}

struct Target<'a> {
    state: &'a SandboxState,
    route: Route,
    connect_timeout: Duration,
    query_timeout: Duration,
}

impl Target<'_> {
    fn describe(&self) -> String {
        match &self.route {
            Route::Gateway { addr } => format!("through the gateway RW port {addr}"),
            Route::Primary { .. } => "straight to the primary named in etcd".to_string(),
        }
    }

    /// `server_id 102 (zone1-102)`: the sandbox's tablets have server_id = uid.
    fn server(&self, server_id: u32) -> String {
        match alias_of(self.state, server_id) {
            Some(a) => format!("server_id {server_id} ({a})"),
            None => format!("server_id {server_id}"),
        }
    }

    /// Connects (bounded by `limit`, at most the connect timeout) and learns the server id.
    async fn open(&self, limit: Duration) -> Result<Open, Attempt> {
        let addr = match &self.route {
            Route::Gateway { addr } => addr.clone(),
            Route::Primary { topo } => {
                let (alias, _) = sandbox_fault::current_primary(topo, self.state)
                    .await
                    .map_err(|e| Attempt::Failed(e.to_string()))?;
                let t = sandbox_fault::tablet(self.state, &alias)
                    .map_err(|e| Attempt::Failed(e.to_string()))?;
                t.mysql.clone()
            }
        };
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(Attempt::Failed(format!("bad address {addr}")));
        };
        let Ok(port) = port.parse::<u16>() else {
            return Err(Attempt::Failed(format!("bad address {addr}")));
        };
        let opts = OptsBuilder::default()
            .ip_or_hostname(host.to_string())
            .tcp_port(port)
            .user(Some(self.state.app_user.clone()))
            .pass(Some(self.state.app_password.clone()))
            .db_name(Some(self.state.database.clone()))
            .prefer_socket(false);
        let bound = limit.min(self.connect_timeout);
        let mut conn = match tokio::time::timeout(bound, Conn::new(opts)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Attempt::Failed(format!(
                    "connect to {addr}: {}",
                    one_line(&e)
                )))
            }
            Err(_) if bound < self.connect_timeout => {
                return Err(Attempt::OutOfTime(format!(
                    "connect to {addr}: no answer when the run ended ({bound:?} later)"
                )))
            }
            Err(_) => {
                return Err(Attempt::Failed(format!(
                    "connect to {addr}: no answer within {bound:?}"
                )))
            }
        };
        let server_id = match tokio::time::timeout(
            self.query_timeout,
            conn.query_first::<u32, _>("SELECT @@server_id"),
        )
        .await
        {
            Ok(Ok(Some(id))) => id,
            Ok(Ok(None)) => return Err(Attempt::Failed("SELECT @@server_id: no row".into())),
            Ok(Err(e)) => {
                return Err(Attempt::Failed(format!(
                    "SELECT @@server_id: {}",
                    one_line(&e)
                )))
            }
            Err(_) => {
                return Err(Attempt::Failed(format!(
                    "SELECT @@server_id: no answer within {:?}",
                    self.query_timeout
                )))
            }
        };
        Ok(Open { conn, server_id })
    }

    /// Runs `stmt` within the query timeout.
    async fn exec<P>(&self, conn: &mut Conn, stmt: &str, params: P) -> Result<(), String>
    where
        P: Into<mysql_async::Params> + Send,
    {
        match tokio::time::timeout(self.query_timeout, conn.exec_drop(stmt, params)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(one_line(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.query_timeout)),
        }
    }
}

/// Why an attempt did not end in an acknowledged write.
enum Attempt {
    Failed(String),
    /// The duration ended while connecting (counted as failed; the run stops).
    OutOfTime(String),
}

/// The alias of the sandbox tablet whose uid is `server_id`.
fn alias_of(state: &SandboxState, server_id: u32) -> Option<&str> {
    state
        .tablets
        .iter()
        .find(|t| {
            t.alias
                .rsplit_once('-')
                .and_then(|(_, uid)| uid.parse::<u32>().ok())
                == Some(server_id)
        })
        .map(|t| t.alias.as_str())
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `+2.314 s` since the start.
fn at(start: Instant, t: Instant) -> String {
    format!("+{:.3} s", t.duration_since(start).as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// What the run saw.
#[derive(Debug, Default)]
struct Tally {
    acked: Vec<u64>,
    failed: u64,
    by_server: BTreeMap<u32, u64>,
    last_ack: Option<Instant>,
    /// The longest time between two acks: (gap, from, to).
    longest_gap: Option<(Duration, Instant, Instant)>,
    /// Writes fail since then, with this many failed attempts so far.
    failing: Option<(Instant, u64)>,
    server: Option<u32>,
    last_error: Option<String>,
}

impl Tally {
    /// Records a failed attempt that started at `t`; returns whether writes just began failing.
    fn fail(&mut self, t: Instant, error: String) -> bool {
        self.failed += 1;
        self.last_error = Some(error);
        match &mut self.failing {
            Some((_, n)) => {
                *n += 1;
                false
            }
            None => {
                self.failing = Some((t, 1));
                true
            }
        }
    }

    /// Records an ack at `t`; returns the failure streak it ends and the gap since the last
    /// ack (if any).
    fn ack(
        &mut self,
        id: u64,
        server_id: u32,
        t: Instant,
    ) -> (Option<(Instant, u64)>, Option<Duration>) {
        self.acked.push(id);
        *self.by_server.entry(server_id).or_default() += 1;
        let gap = self.last_ack.map(|last| t.duration_since(last));
        if let (Some(g), Some(last)) = (gap, self.last_ack) {
            if self.longest_gap.is_none_or(|(l, _, _)| g > l) {
                self.longest_gap = Some((g, last, t));
            }
        }
        self.last_ack = Some(t);
        self.server = Some(server_id);
        (self.failing.take(), gap)
    }
}

pub async fn run(args: WriteArgs) -> Result<(), WriteError> {
    if args.interval.is_zero() {
        return Err(WriteError::Zero { what: "--interval" });
    }
    if args.duration.is_zero() {
        return Err(WriteError::Zero { what: "--duration" });
    }
    if args.query_timeout.is_zero() {
        return Err(WriteError::Zero {
            what: "--query-timeout",
        });
    }
    let dir = args.dir.unwrap_or_else(crate::sandbox::default_dir);
    let state = sandbox_fault::read_state(&dir)?;
    let (route, default_connect) = match args.via {
        Via::Gateway => {
            let addr = state
                .gateway
                .as_ref()
                .and_then(|g| g.rw.clone())
                .ok_or_else(|| WriteError::NoGateway(dir.clone()))?;
            (Route::Gateway { addr }, GATEWAY_CONNECT_TIMEOUT)
        }
        Via::Primary => (
            Route::Primary {
                topo: Box::new(sandbox_fault::connect_topo(&state).await?),
            },
            DIRECT_CONNECT_TIMEOUT,
        ),
    };
    let connect_timeout = args.connect_timeout.unwrap_or(default_connect);
    if connect_timeout.is_zero() {
        return Err(WriteError::Zero {
            what: "--connect-timeout",
        });
    }
    let target = Target {
        state: &state,
        route,
        connect_timeout,
        query_timeout: args.query_timeout,
    };
    println!(
        "writing to {}.{TABLE} as {} {} every {} for {}",
        state.database,
        state.app_user,
        target.describe(),
        humantime::format_duration(args.interval),
        humantime::format_duration(args.duration)
    );
    let start = Instant::now();
    let end = start + args.duration;
    let mut tally = Tally::default();
    let mut first_id: Option<u64> = None;
    let mut next_id = 0u64;
    let mut open: Option<Open> = None;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let began = Instant::now();
        if began >= end {
            break;
        }
        let outcome = attempt(&target, &mut open, &mut first_id, &mut next_id, end).await;
        let now = Instant::now();
        match outcome {
            Ok((id, server_id)) => {
                let previous = tally.server;
                let (streak, gap) = tally.ack(id, server_id, now);
                let server = target.server(server_id);
                if let Some((_, failed)) = streak {
                    let without = match gap {
                        Some(g) => format!("after {} without an acknowledged write", ms(g)),
                        None => "(the first acknowledged write)".to_string(),
                    };
                    println!(
                        "writes ok again at {} on {server} {without} ({failed} failed attempt{})",
                        at(start, now),
                        if failed == 1 { "" } else { "s" }
                    );
                } else if previous.is_none() {
                    println!("writes ok at {} on {server}", at(start, now));
                } else if previous != Some(server_id) {
                    let gap = gap.map(ms).unwrap_or_default();
                    println!(
                        "writes moved to {server} at {} ({gap} since the previous ack)",
                        at(start, now)
                    );
                }
            }
            Err(Attempt::OutOfTime(e)) => {
                if tally.fail(began, e.clone()) {
                    println!("writes failing since {}: {e}", at(start, began));
                }
                break;
            }
            Err(Attempt::Failed(e)) => {
                if tally.fail(began, e.clone()) {
                    println!("writes failing since {}: {e}", at(start, began));
                }
            }
        }
    }
    let stopped = Instant::now();
    if let Some(o) = open.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), o.conn.disconnect()).await;
    }
    print_summary(&target, &tally, start, stopped);
    if tally.acked.is_empty() {
        return Err(WriteError::NoAck {
            duration: args.duration,
            failed: tally.failed,
            last_error: tally.last_error.unwrap_or_else(|| "none".into()),
        });
    }
    verify(&target, &tally.acked).await
}

/// One insert, connecting first when needed (and making the table on the first connection).
/// Ok: the acknowledged id and the server that acknowledged it. On failure the connection is
/// dropped (the next attempt reconnects).
async fn attempt(
    target: &Target<'_>,
    open: &mut Option<Open>,
    first_id: &mut Option<u64>,
    next_id: &mut u64,
    end: Instant,
) -> Result<(u64, u32), Attempt> {
    if open.is_none() {
        let left = end.saturating_duration_since(Instant::now());
        *open = Some(target.open(left).await?);
    }
    let Some(o) = open.as_mut() else {
        return Err(Attempt::Failed("no connection".into()));
    };
    if first_id.is_none() {
        // Ids continue after earlier runs' (the table stays).
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT PRIMARY KEY, at TIMESTAMP(6), server_id INT)"
        );
        let created =
            tokio::time::timeout(target.query_timeout, o.conn.query_drop(create.as_str())).await;
        let created = match created {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(one_line(&e)),
            Err(_) => Err(format!("no answer within {:?}", target.query_timeout)),
        };
        if let Err(e) = created {
            *open = None;
            return Err(Attempt::Failed(format!("create {TABLE}: {e}")));
        }
        let max = tokio::time::timeout(
            target.query_timeout,
            o.conn
                .query_first::<Option<u64>, _>(format!("SELECT MAX(id) FROM {TABLE}")),
        )
        .await;
        match max {
            Ok(Ok(m)) => {
                let first = m.flatten().unwrap_or(0) + 1;
                *first_id = Some(first);
                *next_id = first;
            }
            Ok(Err(e)) => {
                *open = None;
                return Err(Attempt::Failed(format!("SELECT MAX(id): {}", one_line(&e))));
            }
            Err(_) => {
                *open = None;
                return Err(Attempt::Failed(format!(
                    "SELECT MAX(id): no answer within {:?}",
                    target.query_timeout
                )));
            }
        }
    }
    // Every attempt takes a new id: one that timed out may still have committed.
    let id = *next_id;
    *next_id += 1;
    let insert = format!("INSERT INTO {TABLE} (id, at, server_id) VALUES (?, NOW(6), @@server_id)");
    let server_id = o.server_id;
    match target.exec(&mut o.conn, &insert, (id,)).await {
        Ok(()) => Ok((id, server_id)),
        Err(e) => {
            *open = None;
            Err(Attempt::Failed(format!(
                "insert id {id} on {}: {e}",
                target.server(server_id)
            )))
        }
    }
}

fn print_summary(target: &Target<'_>, tally: &Tally, start: Instant, stopped: Instant) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "summary after {:.1} s:",
        stopped.duration_since(start).as_secs_f64()
    );
    let ids = match (tally.acked.first(), tally.acked.last()) {
        (Some(a), Some(b)) => format!(" (ids {a}..{b})"),
        _ => String::new(),
    };
    let _ = writeln!(out, "  acknowledged      {}{ids}", tally.acked.len());
    let _ = writeln!(out, "  failed attempts   {}", tally.failed);
    match tally.longest_gap {
        Some((g, from, to)) => {
            let _ = writeln!(
                out,
                "  longest gap       {} without an acknowledged write ({} to {})",
                ms(g),
                at(start, from),
                at(start, to)
            );
        }
        None => {
            let _ = writeln!(out, "  longest gap       -");
        }
    }
    if let Some((since, n)) = tally.failing {
        let _ = writeln!(
            out,
            "  still failing     at the end: since {} ({n} failed attempts)",
            at(start, since)
        );
    }
    let servers: Vec<String> = tally
        .by_server
        .iter()
        .map(|(id, n)| format!("{}: {n}", target.server(*id)))
        .collect();
    let servers = if servers.is_empty() {
        "-".to_string()
    } else {
        servers.join(", ")
    };
    let _ = writeln!(out, "  acknowledged by   {servers}");
    print!("{out}");
}

/// Reads the acknowledged ids back through the same path; an error listing the missing ones.
async fn verify(target: &Target<'_>, acked: &[u64]) -> Result<(), WriteError> {
    let (Some(lo), Some(hi)) = (acked.iter().min(), acked.iter().max()) else {
        return Ok(());
    };
    let start = Instant::now();
    let query = format!("SELECT id FROM {TABLE} WHERE id BETWEEN {lo} AND {hi}");
    let (found, server_id) = loop {
        let err = match target.open(VERIFY_PATIENCE).await {
            Ok(mut o) => {
                match tokio::time::timeout(
                    target.query_timeout.max(Duration::from_secs(5)),
                    o.conn.query::<u64, _>(query.as_str()),
                )
                .await
                {
                    Ok(Ok(ids)) => {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), o.conn.disconnect()).await;
                        break (ids.into_iter().collect::<BTreeSet<u64>>(), o.server_id);
                    }
                    Ok(Err(e)) => one_line(&e),
                    Err(_) => "the read-back query did not answer".to_string(),
                }
            }
            Err(Attempt::Failed(e)) => e,
            Err(Attempt::OutOfTime(e)) => e,
        };
        if start.elapsed() > VERIFY_PATIENCE {
            return Err(WriteError::Verify {
                via: target.describe(),
                patience: VERIFY_PATIENCE,
                reason: err,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|id| !found.contains(id))
        .collect();
    let server = target.server(server_id);
    if missing.is_empty() {
        println!(
            "all {} acknowledged writes are on the current primary, {server}",
            acked.len()
        );
        return Ok(());
    }
    Err(WriteError::Missing {
        missing: missing.len(),
        acked: acked.len(),
        server_id,
        alias: alias_of(target.state, server_id)
            .map(|a| format!(" ({a})"))
            .unwrap_or_default(),
        ids: ranges(&missing, MAX_LISTED),
    })
}

/// `3, 7-9, 12` for sorted ids; at most `max` items, then `... (N more)`.
fn ranges(ids: &[u64], max: usize) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        items.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    if items.len() > max {
        let more = items.len() - max;
        items.truncate(max);
        items.push(format!("... ({more} more ranges)"));
    }
    items.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        write: WriteArgs,
    }

    #[test]
    fn arguments_parse_with_defaults_and_refuse_nonsense() {
        use clap::Parser;
        let c = Cli::try_parse_from(["write"]).unwrap();
        assert_eq!(c.write.duration, Duration::from_secs(10));
        assert_eq!(c.write.interval, Duration::from_millis(20));
        assert_eq!(c.write.via, Via::Gateway);
        assert_eq!(c.write.connect_timeout, None);
        let c = Cli::try_parse_from(["write", "--via", "primary", "--duration", "6s"]).unwrap();
        assert_eq!(c.write.via, Via::Primary);
        assert_eq!(c.write.duration, Duration::from_secs(6));
        for bad in [
            &["write", "--via", "proxy"][..],
            &["write", "--duration", "soon"],
            &["write", "--interval", "5"],
        ] {
            assert_eq!(
                Cli::try_parse_from(bad).unwrap_err().exit_code(),
                2,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_ids_are_listed_as_ranges() {
        assert_eq!(ranges(&[3, 7, 8, 9, 12], 10), "3, 7-9, 12");
        assert_eq!(ranges(&[1], 10), "1");
        assert_eq!(ranges(&[1, 3, 5, 7], 2), "1, 3, ... (2 more ranges)");
        assert_eq!(ranges(&[], 2), "");
    }

    #[test]
    fn tally_tracks_streaks_gaps_and_servers() {
        let t0 = Instant::now();
        let mut t = Tally::default();
        assert!(
            t.fail(t0, "refused".into()),
            "the first failure starts a streak"
        );
        let (streak, gap) = t.ack(1, 101, t0 + Duration::from_millis(10));
        assert_eq!(streak.map(|(_, n)| n), Some(1));
        assert_eq!(gap, None);
        t.ack(2, 101, t0 + Duration::from_millis(30));
        assert!(t.fail(t0 + Duration::from_millis(50), "reset".into()));
        assert!(!t.fail(t0 + Duration::from_millis(70), "refused".into()));
        let (streak, gap) = t.ack(3, 102, t0 + Duration::from_millis(530));
        assert_eq!(streak.map(|(_, n)| n), Some(2));
        assert_eq!(gap, Some(Duration::from_millis(500)));
        t.ack(4, 102, t0 + Duration::from_millis(550));
        assert_eq!(t.failed, 3);
        assert_eq!(t.acked, [1, 2, 3, 4]);
        assert_eq!(t.by_server, BTreeMap::from([(101, 2), (102, 2)]));
        let (g, _, to) = t.longest_gap.unwrap();
        assert_eq!(g, Duration::from_millis(500));
        assert_eq!(to, t0 + Duration::from_millis(530));
        assert!(t.failing.is_none());
    }
}
