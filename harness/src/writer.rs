//! [`Writer`]: an acknowledged-write recorder for failover tests and benchmarks.
//!
//! A background task inserts rows into `app.writes` as the `app` user, always on the primary the
//! shard record names now: one insert at a time on the current primary, ids from a sequence it
//! owns, each row carrying a payload, the client's send time, the tablet it was sent to and the
//! term of the shard record when it was sent. Every acknowledged insert is recorded with its ack
//! time (wall clock and monotonic), the tablet that acked it and that term.
//!
//! On an error it drops the connection, re-reads the shard record (a resilient etcd watch: the
//! last known record while etcd is down) and reconnects. When the shard record names another
//! primary while an insert is in flight, that insert is left to finish on its own connection (a
//! "straggler": it is not the current primary's insert any more, the writer moves on to the new
//! primary at once) and is recorded like any other if it is ever acknowledged: an ack from a
//! deposed primary after the new term began is exactly what [`Writer::verify`] looks for.
//!
//! With [`WriterOptions::via`] it writes through a fixed address instead (the gateway's RW port)
//! like an application would: it never looks at the shard record to choose where to connect,
//! and identifies the server behind each connection with `SELECT @@server_id` (the tablet's
//! uid). Each ack is then attributed to that tablet, with the term of the newest shard record
//! seen naming that tablet primary (0 if none): an ack from a tablet after a newer term naming
//! another primary began is caught exactly as in the direct mode. An insert in flight when the
//! record moves on is not abandoned in this mode: closing connections to a deposed primary is
//! the gateway's job, and a connection it fails to close shows up as a timed-out attempt.
//!
//! After the test, [`Writer::verify`] checks that every acknowledged id is on the current primary
//! and that no ack came from a deposed primary after a newer term had started, and reports the
//! write unavailability (first ack after [`Writer::mark_fault`] minus the fault time).

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topo::Term;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tokio::sync::watch;
use tokio::task::JoinSet;
use topo::ShardRecord;

use launcher::{Cluster, HarnessError, Result};

/// The table the writer fills, in the application database.
pub const WRITES_TABLE: &str = "writes";

/// How the writer runs; every bound is explicit.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Stop after this many acknowledged inserts (`None`: no count bound).
    pub max_acks: Option<u64>,
    /// Stop after this long in any case.
    pub max_duration: Duration,
    /// Pause after each acknowledged insert (0: back to back).
    pub pause: Duration,
    /// Pause after a failed attempt (connect or insert) before re-reading the record.
    pub retry_pause: Duration,
    /// An insert on the current primary not answered within this is abandoned (left to finish
    /// as a straggler) and the connection dropped.
    pub attempt_timeout: Duration,
    /// Bound on one connection attempt (a frozen mysqld accepts TCP but never greets).
    pub connect_timeout: Duration,
    /// Bytes of payload per row.
    pub payload_len: usize,
    /// At stop, how long stragglers still in flight may take to finish before being aborted.
    pub straggler_grace: Duration,
    /// Write through this address (e.g. the gateway's RW port) instead of to the primary the
    /// shard record names (see the module doc). Give it a `connect_timeout` above the gateway's
    /// buffer window: a held connection is the point.
    pub via: Option<SocketAddr>,
    /// The table written (in the application database; default [`WRITES_TABLE`]): writers
    /// running side by side need one each, their ids would collide otherwise.
    pub table: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_acks: None,
            max_duration: Duration::from_secs(300),
            pause: Duration::from_millis(2),
            retry_pause: Duration::from_millis(10),
            attempt_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            payload_len: 32,
            straggler_grace: Duration::from_secs(1),
            via: None,
            table: WRITES_TABLE.into(),
        }
    }
}

/// One acknowledged insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: u64,
    /// The tablet the insert was sent to (whose mysqld acknowledged it).
    pub tablet: String,
    /// The shard record's term when it was sent.
    pub term: Term,
    /// Wall clock, ms since the epoch, when it was sent and when the ack arrived.
    pub sent_ms: u64,
    pub acked_ms: u64,
    /// Monotonic send and ack times (for durations against [`Writer::mark_fault`]).
    pub sent_at: Instant,
    pub acked_at: Instant,
    /// It was acknowledged after the writer had moved on to another primary.
    pub straggler: bool,
}

/// A fault injected while the writer ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultMark {
    pub at: Instant,
    /// Wall clock, ms since the epoch.
    pub at_ms: u64,
}

/// An ack from a tablet that a newer term had already replaced as primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeposedAck {
    pub ack: Ack,
    /// The record of the newer term (its primary, term and term_start_ms).
    pub newer: ShardRecord,
}

impl fmt::Display for DeposedAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "id {} acked by {} (sent under term {}) at {} ms, {} ms after term {} began with primary {:?}{}",
            self.ack.id,
            self.ack.tablet,
            self.ack.term,
            self.ack.acked_ms,
            self.ack.acked_ms as i64 - self.newer.term_start_ms as i64,
            self.newer.term,
            self.newer.primary,
            if self.ack.straggler { " (straggler)" } else { "" }
        )
    }
}

/// What the writer saw, and what [`Writer::verify`] found.
#[derive(Debug, Clone)]
pub struct WriterReport {
    /// Inserts sent (acknowledged or not).
    pub attempts: u64,
    /// Acknowledged inserts.
    pub acked: usize,
    /// Connect and insert failures.
    pub errors: u64,
    /// The last errors (newest last).
    pub last_errors: Vec<String>,
    /// Inserts left in flight on a deposed (or unresponsive) primary.
    pub stragglers: u64,
    /// Acknowledged ids missing from the current primary.
    pub lost: Vec<u64>,
    /// Acks from a deposed primary after the newer term began, of writes the current primary
    /// does not have: split brain. Must be empty.
    pub deposed_acks: Vec<DeposedAck>,
    /// Acks from a deposed primary after the newer term began, of writes the current primary
    /// has: the old primary was frozen after a replica had acknowledged the transaction and
    /// before it answered its client, and answered on resume. Durable in the new timeline, so
    /// not split brain; reported, not hidden.
    pub late_acks: Vec<DeposedAck>,
    /// The primary and term the ids were checked on.
    pub checked_on: Option<(String, Term)>,
    /// Rows found on it.
    pub rows_on_primary: usize,
    /// The fault, if one was marked.
    pub fault: Option<FaultMark>,
    /// The last ack at or before the fault.
    pub last_ack_before_fault: Option<Ack>,
    /// The first ack after the fault.
    pub first_ack_after_fault: Option<Ack>,
    /// First ack after the fault minus the fault time.
    pub unavailability: Option<Duration>,
    /// Distinct shard records (primary, term) the writer saw, oldest first.
    pub records: Vec<ShardRecord>,
}

impl WriterReport {
    /// No lost ack and no ack from a deposed primary.
    pub fn is_safe(&self) -> bool {
        self.lost.is_empty() && self.deposed_acks.is_empty()
    }

    /// Panics with the whole report unless [`WriterReport::is_safe`].
    pub fn assert_safe(&self) {
        assert!(self.is_safe(), "writer safety violated:\n{self}");
    }
}

impl fmt::Display for WriterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "writer: {} acked of {} sent, {} errors, {} stragglers; checked on {:?}: {} rows",
            self.acked,
            self.attempts,
            self.errors,
            self.stragglers,
            self.checked_on,
            self.rows_on_primary
        )?;
        match (
            &self.fault,
            self.unavailability,
            &self.first_ack_after_fault,
        ) {
            (Some(_), Some(u), Some(a)) => writeln!(
                f,
                "write unavailability {:.3} s (first ack after the fault: id {} by {} at term {})",
                u.as_secs_f64(),
                a.id,
                a.tablet,
                a.term
            )?,
            (Some(_), _, _) => writeln!(f, "no ack after the fault")?,
            _ => {}
        }
        if !self.lost.is_empty() {
            let shown: Vec<String> = self.lost.iter().take(20).map(u64::to_string).collect();
            writeln!(
                f,
                "LOST {} acknowledged writes: {}{}",
                self.lost.len(),
                shown.join(","),
                if self.lost.len() > 20 { ",..." } else { "" }
            )?;
        }
        for d in &self.deposed_acks {
            writeln!(
                f,
                "ACK FROM A DEPOSED PRIMARY (write not on the new primary): {d}"
            )?;
        }
        for d in &self.late_acks {
            writeln!(
                f,
                "late ack from a deposed primary (write is on the new primary): {d}"
            )?;
        }
        let recs: Vec<String> = self
            .records
            .iter()
            .map(|r| {
                format!(
                    "term {} primary {:?} from {}",
                    r.term, r.primary, r.term_start_ms
                )
            })
            .collect();
        writeln!(f, "shard records seen: {}", recs.join("; "))?;
        if !self.last_errors.is_empty() {
            writeln!(f, "last errors: {}", self.last_errors.join(" | "))?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Log {
    attempts: u64,
    errors: u64,
    stragglers: u64,
    last_errors: VecDeque<(String, u64)>,
    acks: Vec<Ack>,
    records: Vec<ShardRecord>,
    fault: Option<FaultMark>,
}

impl Log {
    fn error(&mut self, e: String) {
        self.errors += 1;
        // Repeats of the last error are counted, not listed again.
        if let Some((last, n)) = self.last_errors.back_mut() {
            if *last == e {
                *n += 1;
                return;
            }
        }
        if self.last_errors.len() >= 20 {
            self.last_errors.pop_front();
        }
        self.last_errors.push_back((e, 1));
    }

    fn errors_text(&self) -> Vec<String> {
        self.last_errors
            .iter()
            .map(|(e, n)| {
                if *n > 1 {
                    format!("{e} (x{n})")
                } else {
                    e.clone()
                }
            })
            .collect()
    }

    /// The term of the newest record seen naming `alias` primary (0 if none).
    fn term_as_primary(&self, alias: &str) -> Term {
        self.records
            .iter()
            .filter(|r| r.primary.as_deref() == Some(alias))
            .map(|r| r.term)
            .max()
            .unwrap_or(Term::ZERO)
    }

    fn saw(&mut self, rec: &ShardRecord) {
        let new = self
            .records
            .last()
            .is_none_or(|l| l.term != rec.term || l.primary != rec.primary);
        if new {
            self.records.push(rec.clone());
        }
    }
}

/// Where the writer connects: per tablet alias its mysqld port, or a fixed address.
#[derive(Clone)]
struct Target {
    addrs: Vec<(String, SocketAddr)>,
    /// `(server_id, alias)` of every tablet (server_id = uid).
    server_ids: Vec<(u32, String)>,
    via: Option<SocketAddr>,
    user: String,
    password: String,
    database: String,
}

impl Target {
    fn addr(&self, alias: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(a, _)| a == alias).map(|(_, p)| *p)
    }

    async fn connect(&self, alias: &str) -> std::result::Result<Conn, String> {
        let addr = self
            .addr(alias)
            .ok_or_else(|| format!("{alias} is not a tablet of this cluster"))?;
        let opts = OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(Some(self.database.clone()))
            .prefer_socket(false);
        Conn::new(opts)
            .await
            .map_err(|e| format!("connect to {alias} ({addr}): {e}"))
    }

    /// Connects through `addr` and names the tablet that answers.
    async fn connect_via(&self, addr: SocketAddr) -> std::result::Result<(String, Conn), String> {
        let opts = OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(self.user.clone()))
            .pass(Some(self.password.clone()))
            .db_name(Some(self.database.clone()))
            // Never switch to the server's unix socket: that would bypass `addr`.
            .prefer_socket(false);
        let mut c = Conn::new(opts)
            .await
            .map_err(|e| format!("connect via {addr}: {e}"))?;
        let id: Option<u32> = c
            .query_first("SELECT @@server_id")
            .await
            .map_err(|e| format!("via {addr}: SELECT @@server_id: {e}"))?;
        let alias = self
            .server_ids
            .iter()
            .find(|(s, _)| Some(*s) == id)
            .map(|(_, a)| a.clone())
            .ok_or_else(|| format!("via {addr}: server_id {id:?} is no tablet of this cluster"))?;
        Ok((alias, c))
    }

    /// Connects to `primary` (direct mode) or through `via`; the tablet connected to.
    async fn open(&self, primary: Option<&str>) -> std::result::Result<(String, Conn), String> {
        match (self.via, primary) {
            (Some(addr), _) => self.connect_via(addr).await,
            (None, Some(p)) => Ok((p.to_string(), self.connect(p).await?)),
            (None, None) => Err("no primary to connect to".into()),
        }
    }
}

/// The running recorder. Dropping it stops the task (without verifying).
pub struct Writer {
    log: Arc<Mutex<Log>>,
    /// The table written ([`WriterOptions::table`]).
    table: String,
    /// Writing through a fixed address ([`WriterOptions::via`]).
    via: bool,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    done: watch::Receiver<bool>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.lock();
        f.debug_struct("Writer")
            .field("acked", &log.acks.len())
            .field("attempts", &log.attempts)
            .field("errors", &log.errors)
            .finish_non_exhaustive()
    }
}

type Pending = Pin<Box<dyn Future<Output = (Conn, std::result::Result<(), String>)> + Send>>;

fn now_ms() -> u64 {
    topo::now_ms()
}

impl Writer {
    /// Creates `app.writes` on the current primary if needed and starts writing. The id sequence
    /// continues after the largest id already in the table.
    pub async fn start(cluster: &Cluster, opts: WriterOptions) -> Result<Writer> {
        if opts.table.is_empty()
            || !opts
                .table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(HarnessError::Invalid(format!(
                "writer table {:?}: letters, digits and '_' only",
                opts.table
            )));
        }
        let creds = cluster.credentials();
        let target = Target {
            addrs: cluster
                .tablets()
                .iter()
                .map(|t| {
                    let m = t.mysqld();
                    (t.alias().to_string(), (m.ip(), m.port()).into())
                })
                .collect(),
            server_ids: cluster
                .tablets()
                .iter()
                .map(|t| (t.uid(), t.alias().to_string()))
                .collect(),
            via: opts.via,
            user: creds.app_user.clone(),
            password: creds.app_password.clone(),
            database: creds.database.clone(),
        };
        let primary = cluster.primary().await?;
        let mut c = primary.app_conn().await?;
        c.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (\
             id BIGINT UNSIGNED NOT NULL PRIMARY KEY, \
             payload VARCHAR(1024) NOT NULL, \
             sent_ms BIGINT UNSIGNED NOT NULL, \
             tablet VARCHAR(64) NOT NULL, \
             term BIGINT UNSIGNED NOT NULL) ENGINE=InnoDB",
            opts.table
        ))
        .await
        .map_err(HarnessError::mysql(format!(
            "{}: create app.{}",
            primary.alias(),
            opts.table
        )))?;
        let max: Option<u64> = c
            .query_first(format!("SELECT COALESCE(MAX(id), 0) FROM {}", opts.table))
            .await
            .map_err(HarnessError::mysql("max id"))?;
        let _ = c.disconnect().await;
        let first_id = max.unwrap_or(0) + 1;

        let records = cluster
            .topo()
            .watch_shard(cluster.keyspace(), cluster.shard());
        let log = Arc::new(Mutex::new(Log::default()));
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let via = opts.via.is_some();
        let table = opts.table.clone();
        let task = tokio::spawn(run(
            target,
            opts,
            records,
            log.clone(),
            stop_rx,
            first_id,
            done_tx,
        ));
        Ok(Writer {
            log,
            table,
            via,
            stop,
            task: Mutex::new(Some(task)),
            done,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The acks as [`deposed`] judges them. Through a fixed address the term an insert was
    /// labelled with at send time may predate the writer's view of a failover the gateway had
    /// already acted on, so each ack's term is taken from every record seen by now:
    /// [`term_at`] its ack time.
    fn judged_acks(&self, log: &Log) -> Vec<Ack> {
        if !self.via {
            return log.acks.clone();
        }
        log.acks
            .iter()
            .map(|a| Ack {
                term: term_at(&log.records, &a.tablet, a.acked_ms),
                ..a.clone()
            })
            .collect()
    }

    /// Records the fault time (now).
    pub fn mark_fault(&self) -> FaultMark {
        let m = FaultMark {
            at: Instant::now(),
            at_ms: now_ms(),
        };
        self.lock().fault = Some(m);
        m
    }

    /// The fault marked last.
    pub fn fault(&self) -> Option<FaultMark> {
        self.lock().fault
    }

    /// Acknowledged inserts so far.
    pub fn acked(&self) -> usize {
        self.lock().acks.len()
    }

    /// A copy of every ack so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.lock().acks.clone()
    }

    /// The distinct shard records (primary, term) seen so far, oldest first.
    pub fn records(&self) -> Vec<ShardRecord> {
        self.lock().records.clone()
    }

    /// The last errors (newest last).
    pub fn last_errors(&self) -> Vec<String> {
        self.lock().errors_text()
    }

    /// The first ack after `at`, if any yet.
    /// The first ack of an insert sent after `at`: an insert already in flight at the fault may
    /// still be acknowledged by the old primary just after it, which says nothing about recovery.
    pub fn first_ack_after(&self, at: Instant) -> Option<Ack> {
        self.lock()
            .acks
            .iter()
            .filter(|a| a.sent_at > at)
            .min_by_key(|a| a.acked_at)
            .cloned()
    }

    /// Waits until `n` more inserts than now are acknowledged.
    pub async fn wait_more_acks(&self, n: usize, timeout: Duration) -> Result<()> {
        let want = self.acked() + n;
        let start = Instant::now();
        while self.acked() < want {
            if start.elapsed() > timeout || *self.done.borrow() {
                return Err(HarnessError::Timeout {
                    what: format!("{n} acknowledged writes"),
                    after: timeout,
                    detail: Some(format!(
                        "{} acked; last errors: {}",
                        self.acked(),
                        self.last_errors().join(" | ")
                    )),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Waits for the first ack after `at` (e.g. a fault); returns it and `ack - at`.
    pub async fn wait_ack_after(&self, at: Instant, timeout: Duration) -> Result<(Ack, Duration)> {
        let start = Instant::now();
        loop {
            if let Some(a) = self.first_ack_after(at) {
                let d = a.acked_at.saturating_duration_since(at);
                return Ok((a, d));
            }
            if start.elapsed() > timeout || *self.done.borrow() {
                return Err(HarnessError::Timeout {
                    what: "an acknowledged write after the fault".into(),
                    after: timeout,
                    detail: Some(format!(
                        "{} acked in all; last errors: {}",
                        self.acked(),
                        self.last_errors().join(" | ")
                    )),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops the task (stragglers get [`WriterOptions::straggler_grace`]) and waits for it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Stops, then checks on the current primary (the shard record's, waiting up to 15 s for it
    /// to answer) without asserting. An error only when the check itself cannot run.
    pub async fn check(&self, cluster: &Cluster) -> Result<WriterReport> {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let (rec, ids) = loop {
            let attempt = async {
                let (rec, _) = cluster
                    .topo()
                    .get_shard(cluster.keyspace(), cluster.shard())
                    .await
                    .map_err(|e| format!("read shard record: {e}"))?
                    .ok_or_else(|| "no shard record".to_string())?;
                let alias = rec
                    .primary
                    .clone()
                    .ok_or_else(|| "the shard record names no primary".to_string())?;
                let t = cluster
                    .tablet_by_alias(&alias)
                    .ok_or_else(|| format!("{alias} is not a tablet of this cluster"))?;
                // The application's user: the agent's may not read application tables.
                let mut c = tokio::time::timeout(Duration::from_secs(2), t.app_conn())
                    .await
                    .map_err(|_| format!("{alias}: connect timed out"))?
                    .map_err(|e| e.to_string())?;
                let ids: Vec<u64> = c
                    .query(format!(
                        "SELECT id FROM {}.{}",
                        cluster.credentials().database,
                        self.table
                    ))
                    .await
                    .map_err(|e| format!("{alias}: select ids: {e}"))?;
                let _ = c.disconnect().await;
                Ok::<_, String>((rec, ids))
            };
            match attempt.await {
                Ok(r) => break r,
                Err(e) if Instant::now() > deadline => {
                    return Err(HarnessError::Invalid(format!(
                        "writer check: cannot read the current primary's rows: {e}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let present: BTreeSet<u64> = ids.iter().copied().collect();
        let mut log = self.lock();
        log.saw(&rec);
        let mut lost: Vec<u64> = log
            .acks
            .iter()
            .map(|a| a.id)
            .filter(|id| !present.contains(id))
            .collect();
        lost.sort_unstable();
        let (late_acks, deposed_acks): (Vec<DeposedAck>, Vec<DeposedAck>) =
            deposed(&self.judged_acks(&log), &log.records)
                .into_iter()
                .partition(|d| present.contains(&d.ack.id));
        let fault = log.fault;
        let (before, after) = match fault {
            Some(m) => (
                log.acks
                    .iter()
                    .filter(|a| a.acked_at <= m.at)
                    .max_by_key(|a| a.acked_at)
                    .cloned(),
                log.acks
                    .iter()
                    .filter(|a| a.acked_at > m.at)
                    .min_by_key(|a| a.acked_at)
                    .cloned(),
            ),
            None => (None, None),
        };
        let unavailability = match (fault, &after) {
            (Some(m), Some(a)) => Some(a.acked_at.saturating_duration_since(m.at)),
            _ => None,
        };
        Ok(WriterReport {
            attempts: log.attempts,
            acked: log.acks.len(),
            errors: log.errors,
            last_errors: log.errors_text(),
            stragglers: log.stragglers,
            lost,
            deposed_acks,
            late_acks,
            checked_on: rec.primary.clone().map(|p| (p, rec.term)),
            rows_on_primary: present.len(),
            fault,
            last_ack_before_fault: before,
            first_ack_after_fault: after,
            unavailability,
            records: log.records.clone(),
        })
    }

    /// [`Writer::check`], then asserts that no acknowledged write is lost and that no ack came
    /// from a deposed primary after its successor's term began. Prints the report.
    pub async fn verify(&self, cluster: &Cluster) -> WriterReport {
        let report = match self.check(cluster).await {
            Ok(r) => r,
            Err(e) => panic!("writer verify: {e}"),
        };
        println!("{report}");
        report.assert_safe();
        report
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// The term under which `tablet` was primary when it acknowledged at `at_ms`: the newest
/// record naming it that had begun by then (0: none had).
fn term_at(records: &[ShardRecord], tablet: &str, at_ms: u64) -> Term {
    records
        .iter()
        .filter(|r| r.primary.as_deref() == Some(tablet) && r.term_start_ms <= at_ms)
        .map(|r| r.term)
        .max()
        .unwrap_or(Term::ZERO)
}

/// Acks by a tablet after a newer term naming another primary had started.
fn deposed(acks: &[Ack], records: &[ShardRecord]) -> Vec<DeposedAck> {
    let mut out = Vec::new();
    for a in acks {
        let newer = records
            .iter()
            .filter(|r| {
                r.term > a.term
                    && r.primary.as_deref() != Some(a.tablet.as_str())
                    && r.term_start_ms <= a.acked_ms
            })
            .min_by_key(|r| r.term);
        if let Some(r) = newer {
            out.push(DeposedAck {
                ack: a.clone(),
                newer: r.clone(),
            });
        }
    }
    out
}

/// Resolves when the record names a primary other than `alias` (never for `None`: writing
/// through a fixed address).
async fn moved_from(rx: &mut watch::Receiver<Option<ShardRecord>>, alias: Option<&str>) {
    match alias {
        Some(a) => primary_moved(rx, a).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the record names a primary other than `alias`.
async fn primary_moved(rx: &mut watch::Receiver<Option<ShardRecord>>, alias: &str) {
    loop {
        let moved = rx
            .borrow_and_update()
            .as_ref()
            .is_some_and(|r| r.primary.as_deref() != Some(alias));
        if moved {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn payload(id: u64, len: usize) -> String {
    let seed = format!("w{id:012}-");
    seed.chars().cycle().take(len.max(1)).collect()
}

#[allow(clippy::too_many_arguments)]
async fn run(
    target: Target,
    opts: WriterOptions,
    mut records: watch::Receiver<Option<ShardRecord>>,
    log: Arc<Mutex<Log>>,
    mut stop: watch::Receiver<bool>,
    first_id: u64,
    done: watch::Sender<bool>,
) {
    let lock = || log.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut next_id = first_id;
    let mut conn: Option<(String, Conn)> = None;
    let mut stragglers: JoinSet<()> = JoinSet::new();
    let mut acked: u64 = 0;
    loop {
        if *stop.borrow() || started.elapsed() > opts.max_duration {
            break;
        }
        if opts.max_acks.is_some_and(|m| acked >= m) {
            break;
        }
        let rec = records.borrow_and_update().clone();
        let Some(rec) = rec else {
            // Not read yet (or etcd unreachable since the start): wait for it.
            tokio::select! {
                _ = records.changed() => {}
                _ = tokio::time::sleep(opts.retry_pause.max(Duration::from_millis(10))) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        lock().saw(&rec);
        // Direct mode: the record's primary; through `via`: whatever answers there.
        let record_primary = match (target.via, rec.primary.clone()) {
            (Some(_), _) => None,
            (None, Some(p)) => Some(p),
            (None, None) => {
                tokio::select! {
                    _ = records.changed() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        };
        if let (Some(p), Some((a, _))) = (&record_primary, &conn) {
            if a != p {
                conn = None;
            }
        }
        let (primary, mut c) = match conn.take() {
            Some(x) => x,
            None => {
                let to = match (&record_primary, target.via) {
                    (Some(p), _) => p.clone(),
                    (None, Some(a)) => a.to_string(),
                    (None, None) => String::new(),
                };
                let res = tokio::select! {
                    r = tokio::time::timeout(opts.connect_timeout, target.open(record_primary.as_deref())) => {
                        r.unwrap_or_else(|_| Err(format!("connect to {to}: timed out after {:?}", opts.connect_timeout)))
                    }
                    _ = moved_from(&mut records, record_primary.as_deref()) => Err(format!("connect to {to}: the shard record moved on")),
                    _ = stop.changed() => break,
                };
                match res {
                    Ok(c) => c,
                    Err(e) => {
                        lock().error(e);
                        tokio::select! {
                            _ = tokio::time::sleep(opts.retry_pause) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
        };
        let id = next_id;
        next_id += 1;
        let term = match target.via {
            Some(_) => lock().term_as_primary(&primary),
            None => rec.term,
        };
        let sent_ms = now_ms();
        let sent_at = Instant::now();
        lock().attempts += 1;
        let sql = format!(
            "INSERT INTO {} (id, payload, sent_ms, tablet, term) VALUES ({id}, '{}', {sent_ms}, '{}', {term})",
            opts.table,
            payload(id, opts.payload_len),
            primary.replace('\'', "")
        );
        let mut pending: Pending = Box::pin(async move {
            let r = c.query_drop(sql).await.map_err(|e| e.to_string());
            (c, r)
        });
        let record_ack = {
            let log = log.clone();
            let primary = primary.clone();
            move |straggler: bool| {
                let a = Ack {
                    id,
                    tablet: primary.clone(),
                    term,
                    sent_ms,
                    acked_ms: now_ms(),
                    sent_at,
                    acked_at: Instant::now(),
                    straggler,
                };
                log.lock().unwrap_or_else(|e| e.into_inner()).acks.push(a);
            }
        };
        enum Outcome {
            Done(Conn, std::result::Result<(), String>),
            Moved,
            TimedOut,
            Stop,
        }
        let outcome = tokio::select! {
            (c, r) = &mut pending => Outcome::Done(c, r),
            _ = moved_from(&mut records, record_primary.as_deref()) => Outcome::Moved,
            _ = tokio::time::sleep(opts.attempt_timeout) => Outcome::TimedOut,
            _ = stop.changed() => Outcome::Stop,
        };
        match outcome {
            Outcome::Done(c, Ok(())) => {
                record_ack(false);
                acked += 1;
                conn = Some((primary, c));
                if !opts.pause.is_zero() {
                    tokio::time::sleep(opts.pause).await;
                }
            }
            Outcome::Done(_c, Err(e)) => {
                lock().error(format!("insert {id} on {primary} (term {term}): {e}"));
                tokio::select! {
                    _ = tokio::time::sleep(opts.retry_pause) => {}
                    _ = stop.changed() => {}
                }
            }
            Outcome::Moved | Outcome::TimedOut | Outcome::Stop => {
                let why = match outcome {
                    Outcome::Moved => "the shard record named another primary",
                    Outcome::TimedOut => "no answer within the attempt timeout",
                    _ => "the writer stopped",
                };
                {
                    let mut l = lock();
                    l.stragglers += 1;
                    l.error(format!(
                        "insert {id} on {primary} (term {term}) left in flight: {why}"
                    ));
                }
                let log2 = log.clone();
                // Runs until it resolves, or is aborted after the grace period at stop.
                stragglers.spawn(async move {
                    let (_c, r) = pending.await;
                    match r {
                        Ok(()) => record_ack(true),
                        Err(e) => log2
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .error(format!("straggler insert {id}: {e}")),
                    }
                });
                if matches!(outcome, Outcome::Stop) {
                    break;
                }
            }
        }
    }
    drop(conn);
    let _ = tokio::time::timeout(opts.straggler_grace, async {
        while stragglers.join_next().await.is_some() {}
    })
    .await;
    stragglers.abort_all();
    let _ = done.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(primary: &str, term: u64, start: u64) -> ShardRecord {
        ShardRecord {
            keyspace: "ks".into(),
            shard: "0".into(),
            primary: Some(primary.into()),
            term: Term::new(term),
            term_start_ms: start,
            reparent_in_progress: None,
            reserved_term: Term::ZERO,
        }
    }

    fn ack(id: u64, tablet: &str, term: u64, acked_ms: u64) -> Ack {
        Ack {
            id,
            tablet: tablet.into(),
            term: Term::new(term),
            sent_ms: acked_ms.saturating_sub(1),
            acked_ms,
            sent_at: Instant::now(),
            acked_at: Instant::now(),
            straggler: false,
        }
    }

    #[test]
    fn deposed_acks_are_the_old_primarys_after_the_new_term() {
        let records = vec![rec("a", 1, 100), rec("b", 2, 1000), rec("a", 3, 2000)];
        let acks = vec![
            ack(1, "a", 1, 500),  // fine: before term 2
            ack(2, "a", 1, 1001), // deposed: term 2 began at 1000
            ack(3, "b", 2, 1500), // fine
            ack(4, "b", 2, 2500), // deposed by term 3
            ack(5, "a", 3, 2600), // fine
        ];
        let d = deposed(&acks, &records);
        assert_eq!(
            d.iter()
                .map(|d| (d.ack.id, d.newer.term))
                .collect::<Vec<_>>(),
            vec![(2, Term::new(2)), (4, Term::new(3))]
        );
        assert!(d[0].to_string().contains("1 ms after term 2"), "{}", d[0]);
    }

    #[test]
    fn through_a_fixed_address_acks_are_judged_by_the_term_at_ack_time() {
        let records = vec![rec("a", 1, 100), rec("b", 2, 1000), rec("a", 3, 2000)];
        // b acked just after its term began, before the writer saw the record: term 2.
        assert_eq!(term_at(&records, "b", 1001), Term::new(2));
        assert_eq!(term_at(&records, "b", 999), Term::ZERO);
        assert_eq!(term_at(&records, "a", 1500), Term::new(1));
        assert_eq!(term_at(&records, "a", 2500), Term::new(3));
        let acks: Vec<Ack> = [
            (1, "b", 1001),
            (2, "a", 1500),
            (3, "b", 2100),
            (4, "a", 2100),
        ]
        .into_iter()
        .map(|(id, t, at)| ack(id, t, term_at(&records, t, at).get(), at))
        .collect();
        let d = deposed(&acks, &records);
        // a acked at 1500 under term 1 although term 2 (b) began at 1000; b acked at 2100
        // although term 3 (a) began at 2000.
        assert_eq!(d.iter().map(|d| d.ack.id).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn payload_has_the_asked_length() {
        assert_eq!(payload(7, 40).len(), 40);
        assert!(payload(7, 40).starts_with("w000000000007-"));
    }
}
