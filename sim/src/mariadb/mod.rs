//! An in-memory model of one MariaDB server (a `mysqld`) and its GTID replication, as myha
//! configures it: `gtid_strict_mode=1`, `log_slave_updates=1`, `sync_binlog=1`,
//! `innodb_flush_log_at_trx_commit=1`, `relay_log_recovery=1`, semi-sync with
//! `rpl_semi_sync_master_wait_point=AFTER_SYNC` and `rpl_semi_sync_master_wait_no_slave=ON`.
//!
//! # Shape (sans-IO)
//!
//! A [`Server`] is a step machine on the virtual clock. Every entry point takes an explicit
//! `now`; the server never reads a clock. Effects are queued and taken with
//! [`Server::poll_output`] (or [`Server::drain_outputs`]): messages to other servers
//! ([`Output::Send`], addressed by server id), and answers to clients ([`Output::Ack`],
//! [`Output::WriteFailed`]). The server's own timers (semi-sync timeout, SQL thread apply
//! delay and `MASTER_DELAY`, heartbeats, `slave_net_timeout`) are reported by
//! [`Server::poll_timeout`] and fired by [`Server::handle_timeout`]; every other entry point
//! also fires the timers that are due first, each at its own deadline, so outputs carry the
//! instant they logically happened.
//!
//! The caller (a network model) delivers messages late, reordered, never, or twice. The model
//! treats one replication connection as a TCP stream: every event and heartbeat carries a
//! per-connection sequence number, and a gap (a lost or overtaken message) breaks the
//! connection, after which the IO thread reconnects from `gtid_io_pos`. A connection that goes
//! silent (source crashed, frozen, partitioned, or the dump request lost) is abandoned after
//! `slave_net_timeout` and retried. Messages of an older connection are ignored. So any loss
//! pattern delays replication but never corrupts the relay log.
//!
//! # What survives a crash
//!
//! Durable (InnoDB + binlog with the settings above): the binlog, `gtid_binlog_pos`,
//! `gtid_slave_pos` (the `mysql.gtid_slave_pos` table is transactional) and the `CHANGE MASTER`
//! settings (`master.info`). Lost: the relay log (`relay_log_recovery=1` discards it, and the
//! IO thread re-fetches from `gtid_slave_pos`), semi-sync state and waiting commits (their
//! clients see the connection drop: [`WriteError::ConnectionLost`]; the transactions stay in the
//! binlog), dump threads, runtime `SET GLOBAL` values. A restart comes back with the
//! configuration's `read_only` (myha: ON) and replication stopped unless asked.
//!
//! # Not modelled
//!
//! One replication connection per server (no multi-source), one transaction per event, no
//! parallel replication, no binlog truncation on restart (`--init-rpl-role=SLAVE`), no
//! `gtid_binlog_state` without events (a server whose binlog lacks a GTID cannot serve a replica
//! starting there, even after `SET GLOBAL gtid_binlog_state`), no `wait_no_slave=OFF`, no
//! `MASTER_CONNECT_RETRY` (a failed connection is retried after `slave_net_timeout`), no
//! connection reset: a source drops a dump thread only when its replica reconnects or sends
//! `Quit`, so `Rpl_semi_sync_master_clients` still counts a crashed replica.
//! `CHANGE MASTER` always discards the relay log, even when only `MASTER_DELAY` changes.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use gtid::{MariaDbGtid, MariaDbPosition};

use crate::time::SimTime;

/// A server's `server_id`; also its address for messages.
pub type ServerId = u32;
/// An opaque client write, chosen by the caller; it identifies the transaction in acks and in
/// every binlog and relay log it reaches.
pub type WriteId = u64;
/// Identifies one replication connection of one replica (unique per replica for the whole
/// run, across crashes).
pub type ConnectionId = u64;

/// One transaction in a binlog or relay log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event {
    pub gtid: MariaDbGtid,
    pub write_id: WriteId,
    /// When the transaction was committed on the server that originated it. Replication keeps
    /// it (as MariaDB keeps the event timestamp), so `MASTER_DELAY` and `Seconds_Behind_Master`
    /// are measured against the original commit.
    pub timestamp: SimTime,
}

/// `rpl_semi_sync_master_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SemiSyncTimeout {
    /// Wait for acks forever: no fallback to async. myha's lossless setting.
    Never,
    /// After waiting this long, acknowledge the client anyway and switch semi-sync off
    /// (`Rpl_semi_sync_master_status=OFF`) until replicas catch up.
    After(Duration),
}

/// The master side of semi-sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SemiSyncMaster {
    /// `rpl_semi_sync_master_enabled`.
    pub enabled: bool,
    /// `rpl_semi_sync_master_wait_for_slave_count`-like; 0 is treated as 1.
    pub wait_for_slave_count: u32,
    pub timeout: SemiSyncTimeout,
}

impl SemiSyncMaster {
    pub const DISABLED: SemiSyncMaster = SemiSyncMaster {
        enabled: false,
        wait_for_slave_count: 1,
        timeout: SemiSyncTimeout::After(Duration::from_secs(10)),
    };

    fn acks_required(&self) -> usize {
        usize::try_from(self.wait_for_slave_count.max(1)).unwrap_or(usize::MAX)
    }
}

/// What `my.cnf` says: the values a server starts (and restarts) with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub server_id: ServerId,
    /// `gtid_domain_id`: the domain of this server's own client writes.
    pub domain_id: u32,
    /// `read_only` at startup; myha starts every server with it ON. Read-only is modelled as
    /// `super_read_only`: every client write is refused; replication applies regardless.
    pub read_only: bool,
    pub semi_sync_master: SemiSyncMaster,
    /// `rpl_semi_sync_slave_enabled`; takes effect when the IO thread (re)connects.
    pub semi_sync_slave: bool,
    /// SQL thread time per applied event, to model a slow applier. Only running time counts:
    /// a frozen server makes no progress.
    pub apply_delay: Duration,
    /// `slave_net_timeout`: a replication connection silent this long is abandoned and
    /// retried. Zero disables it.
    pub slave_net_timeout: Duration,
    /// `MASTER_HEARTBEAT_PERIOD` as sent by the source: an idle dump connection carries a
    /// heartbeat this often. Zero disables heartbeats.
    pub heartbeat_period: Duration,
}

impl ServerConfig {
    /// MariaDB's defaults with myha's `read_only=ON`: semi-sync off (10 s timeout when
    /// enabled), `slave_net_timeout` 60 s, heartbeat 30 s, no apply delay.
    pub fn new(server_id: ServerId, domain_id: u32) -> ServerConfig {
        ServerConfig {
            server_id,
            domain_id,
            read_only: true,
            semi_sync_master: SemiSyncMaster::DISABLED,
            semi_sync_slave: false,
            apply_delay: Duration::ZERO,
            slave_net_timeout: Duration::from_secs(60),
            heartbeat_period: Duration::from_secs(30),
        }
    }
}

/// `CHANGE MASTER TO ... MASTER_USE_GTID=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UseGtid {
    /// Connect from `gtid_slave_pos`: local writes (errant transactions) are not requested;
    /// under strict mode they make the SQL thread fail when the source's transaction with the
    /// same seq_no arrives.
    SlavePos,
    /// Connect from `gtid_current_pos`: local writes are requested, so a source that lacks them
    /// refuses the connection (error 1236).
    CurrentPos,
}

/// The `CHANGE MASTER` settings, kept in `master.info` (durable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MasterConfig {
    pub source: ServerId,
    pub use_gtid: UseGtid,
    /// `MASTER_DELAY`: an event is applied no earlier than this long after its original commit.
    pub master_delay: Duration,
}

impl MasterConfig {
    pub fn new(source: ServerId) -> MasterConfig {
        MasterConfig {
            source,
            use_gtid: UseGtid::SlavePos,
            master_delay: Duration::ZERO,
        }
    }
}

/// The replication protocol between a replica's IO thread and its source's dump thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Replica → source: `COM_BINLOG_DUMP` in GTID mode. Replaces any earlier connection of the
    /// same replica, as MariaDB kills an older dump thread with the same server_id.
    BinlogDump {
        connection: ConnectionId,
        start: MariaDbPosition,
        semi_sync: bool,
    },
    /// Replica → source: the replica closed the connection (`STOP SLAVE`).
    Quit { connection: ConnectionId },
    /// Source → replica: one transaction. `stream_seq` counts messages on the connection from
    /// 0; `binlog_index` is the event's index in the source's binlog (what a semi-sync ack
    /// names).
    BinlogEvent {
        connection: ConnectionId,
        stream_seq: u64,
        binlog_index: u64,
        event: Event,
    },
    /// Source → replica: nothing new. `stream_seq` is the number of the next message, so a lost
    /// trailing event is noticed.
    Heartbeat {
        connection: ConnectionId,
        stream_seq: u64,
    },
    /// Source → replica: the dump cannot be served; the IO thread stops with this error.
    DumpError {
        connection: ConnectionId,
        error: IoError,
    },
    /// Replica → source: semi-sync ack, sent once the event is in the relay log.
    SemiSyncAck {
        connection: ConnectionId,
        binlog_index: u64,
    },
}

/// Why a replica's IO thread stopped (`Last_IO_Error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error(
        "Got fatal error 1236 from master when reading data from binary log: \
         connecting slave requested to start from GTID {requested}, which is not in the master's binlog"
    )]
    GtidNotInSourceBinlog { requested: MariaDbGtid },
    #[error(
        "Got fatal error 1236 from master when reading data from binary log: \
         the binlog events the slave needs (from {needed}) have been purged"
    )]
    Purged { needed: MariaDbGtid },
}

impl IoError {
    /// The MariaDB error number.
    pub fn code(&self) -> u32 {
        1236
    }
}

/// Why a replica's SQL thread stopped (`Last_SQL_Error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    #[error(
        "Error 1950: An attempt was made to binlog GTID {gtid} which would create an out-of-order \
         sequence number with existing GTID {existing}, and gtid strict mode is enabled"
    )]
    OutOfOrder {
        gtid: MariaDbGtid,
        existing: MariaDbGtid,
    },
}

impl SqlError {
    pub fn code(&self) -> u32 {
        1950
    }
}

/// Why a client write was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WriteError {
    /// Refused, nothing written (error 1290).
    #[error("The MariaDB server is running with the --read-only option so it cannot execute this statement")]
    ReadOnly,
    /// The server is down: nothing written.
    #[error("Can't connect to MySQL server (connection refused)")]
    ServerDown,
    /// The server crashed while the client waited: the outcome is unknown to the client (the
    /// transaction may well be in the binlog).
    #[error("Lost connection to MySQL server during query")]
    ConnectionLost,
}

/// A refused administrative statement or fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AdminError {
    #[error("server is down")]
    Down,
    /// A frozen server does not answer: the statement would hang. The caller models its timeout.
    #[error("server is frozen (SIGSTOP): the statement would hang")]
    Frozen,
    #[error("server is not down")]
    NotDown,
    #[error("server is not frozen")]
    NotFrozen,
    #[error("Error 1198: This operation cannot be performed as you have a running slave; run STOP SLAVE first")]
    SlaveRunning,
    #[error("Error 1200: The server is not configured as slave; fix in config file or with CHANGE MASTER TO")]
    NotConfiguredAsSlave,
    #[error("a server cannot replicate from itself")]
    SelfSource,
}

/// Input to [`Server::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A client commits one transaction.
    ClientWrite { write_id: WriteId },
    /// A client with `SUPER` (or `READ_ONLY ADMIN`) commits one transaction: `read_only` does
    /// not stop it. On a replica this is how errant transactions are born (an operator's
    /// maintenance, a misrouted script).
    SuperWrite { write_id: WriteId },
    /// A message from another server, delivered by the network.
    Message { from: ServerId, message: Message },
}

/// Effects, taken with [`Server::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send {
        to: ServerId,
        message: Message,
    },
    /// The client's commit returned OK. `semi_sync` is true when the required number of
    /// replicas had acknowledged it; false when semi-sync was off or timed out.
    Ack {
        write_id: WriteId,
        gtid: MariaDbGtid,
        at: SimTime,
        semi_sync: bool,
    },
    WriteFailed {
        write_id: WriteId,
        error: WriteError,
        at: SimTime,
    },
}

/// The process state of the `mysqld`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcessState {
    Running,
    /// SIGSTOP: inputs queue up (the kernel buffers sockets), nothing runs, no timer fires.
    Frozen,
    Down,
}

/// `Slave_IO_Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoRunning {
    No,
    /// Started, but nothing heard yet on the current connection.
    Connecting,
    Yes,
}

/// What `SHOW ALL SLAVES STATUS` says about the (single, default) connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveStatus {
    pub source: ServerId,
    pub use_gtid: UseGtid,
    pub io_running: IoRunning,
    pub sql_running: bool,
    /// `Gtid_IO_Pos`: the last GTID received per domain.
    pub gtid_io_pos: MariaDbPosition,
    pub last_io_error: Option<IoError>,
    pub last_sql_error: Option<SqlError>,
    /// NULL unless both threads run and the IO thread is connected; 0 when the SQL thread has
    /// applied its whole relay log; otherwise the age, in whole seconds, of the oldest
    /// unapplied event's original commit.
    pub seconds_behind_master: Option<u64>,
    /// `SQL_Delay` (`MASTER_DELAY`).
    pub sql_delay: Duration,
    /// Events received but not applied.
    pub relay_log_events: usize,
}

/// What the agent's queries return: `@@gtid_*`, `@@read_only`, semi-sync status variables and
/// `SHOW ALL SLAVES STATUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    pub server_id: ServerId,
    pub read_only: bool,
    pub gtid_binlog_pos: MariaDbPosition,
    pub gtid_slave_pos: MariaDbPosition,
    pub gtid_current_pos: MariaDbPosition,
    pub semi_sync_master: SemiSyncMaster,
    /// `Rpl_semi_sync_master_status`.
    pub semi_sync_master_active: bool,
    /// `Rpl_semi_sync_master_clients`.
    pub semi_sync_master_clients: usize,
    /// Commits waiting for semi-sync acks.
    pub semi_sync_waiting: usize,
    pub semi_sync_slave: bool,
    /// None when no `CHANGE MASTER` was run (or after `RESET SLAVE ALL`).
    pub slave: Option<SlaveStatus>,
    /// The original commit time of the newest replicated transaction this server applied:
    /// what the agent's heartbeat row shows on a replica (the simulated writer commits every
    /// few milliseconds, as the primary's agent writes its heartbeat), so `now` minus it is
    /// the agent's `lag_ms`. Data: it survives a restart.
    pub applied_commit_at: Option<SimTime>,
    /// `@@gtid_binlog_state`: the last GTID of every (domain, server) pair in the binlog, in
    /// MariaDB's text form. Unlike the position it shows a transaction of another server
    /// hidden behind a higher sequence number (what the errant checks compare).
    pub gtid_binlog_state: String,
}

/// One GTID per domain: the last transaction of the domain. Kept as a map so updates cannot
/// fail; converted to a [`MariaDbPosition`] at the edges.
type Gtids = BTreeMap<u32, MariaDbGtid>;

fn to_position(gtids: &Gtids) -> MariaDbPosition {
    // Invariant: one entry per domain, keyed by its own domain, so no two entries can conflict.
    MariaDbPosition::from_gtids(gtids.values().copied())
        .unwrap_or_else(|e| unreachable!("one GTID per domain cannot conflict: {e}"))
}

fn from_position(pos: &MariaDbPosition) -> Gtids {
    pos.iter().map(|g| (g.domain, g)).collect()
}

/// Whether `gtids` already holds transaction `gtid` (same domain, seq not behind). Under strict
/// mode the seqs of a domain are gapless, so this is "the prefix up to the entry includes it".
fn covers(gtids: &Gtids, gtid: MariaDbGtid) -> bool {
    gtids.get(&gtid.domain).is_some_and(|g| g.seq >= gtid.seq)
}

fn index_u64(i: usize) -> u64 {
    u64::try_from(i).unwrap_or(u64::MAX)
}

/// A client commit waiting for semi-sync acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingCommit {
    write_id: WriteId,
    gtid: MariaDbGtid,
    binlog_index: u64,
    since: SimTime,
}

/// A source-side dump thread serving one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DumpThread {
    connection: ConnectionId,
    semi_sync: bool,
    /// The replica's requested start: events it covers are not sent.
    start: Gtids,
    /// Next binlog index to consider sending.
    next_index: usize,
    next_stream_seq: u64,
    last_sent: SimTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum IoThread {
    Stopped,
    Running {
        connection: ConnectionId,
        /// Whether this connection asked for semi-sync (fixed when it connected).
        semi_sync: bool,
        expected_stream_seq: u64,
        /// Whether anything arrived on this connection.
        connected: bool,
        last_heard: SimTime,
    },
}

/// The SQL thread's progress on the head of the relay log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SqlThread {
    Stopped,
    /// Running; the head event (if any) waits for `MASTER_DELAY`.
    Waiting,
    /// Running and applying the head event since this instant (running time only).
    Applying {
        since: SimTime,
    },
}

/// Everything volatile about replication on the replica side.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReplicaState {
    io: IoThread,
    sql: SqlThread,
    io_error: Option<IoError>,
    sql_error: Option<SqlError>,
    /// Last GTID received per domain. Invariant: covers every relay log event and
    /// `gtid_slave_pos` as of the connection's start.
    io_pos: Gtids,
    relay: VecDeque<Event>,
}

impl ReplicaState {
    fn new(io_pos: Gtids) -> ReplicaState {
        ReplicaState {
            io: IoThread::Stopped,
            sql: SqlThread::Stopped,
            io_error: None,
            sql_error: None,
            io_pos,
            relay: VecDeque::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Process {
    Running,
    Frozen { since: SimTime, inbox: Vec<Input> },
    Down,
}

/// Which timer is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    SemiSyncTimeout,
    Heartbeat(ServerId),
    NetTimeout,
    SqlStart,
    SqlDone,
}

/// One MariaDB server. See the module documentation.
#[derive(Debug, Clone)]
pub struct Server {
    config: ServerConfig,
    /// The latest instant processed. Never decreases; an earlier `now` passed in is treated as
    /// this one.
    now: SimTime,
    process: Process,
    outputs: VecDeque<Output>,
    /// Never reset, so a connection after a restart cannot be confused with one before it.
    next_connection: ConnectionId,

    // Durable state.
    /// Every transaction this server committed, own or replicated, in commit order. Indices
    /// are stable (append-only); `purged` hides a prefix from dump threads only.
    binlog: Vec<Event>,
    /// The last GTID per (domain, server) in `binlog`, and its text (both kept as events are
    /// appended: every status read takes the text, far more often than the binlog grows).
    binlog_state: BTreeMap<(u32, u32), MariaDbGtid>,
    binlog_state_text: String,
    purged: usize,
    binlog_pos: Gtids,
    slave_pos: Gtids,
    master: Option<MasterConfig>,

    // Volatile state.
    read_only: bool,
    semi_sync_master: SemiSyncMaster,
    semi_sync_slave: bool,
    /// `Rpl_semi_sync_master_status`.
    semi_sync_active: bool,
    /// Ordered by binlog index.
    pending: VecDeque<PendingCommit>,
    /// Highest binlog index each replica acknowledged. Acks are cumulative: the stream is in
    /// binlog order, so an ack of index i means the replica holds every event up to i it needs.
    acked: BTreeMap<ServerId, u64>,
    dumps: BTreeMap<ServerId, DumpThread>,
    replica: ReplicaState,
    /// See [`ServerStatus::applied_commit_at`].
    applied_commit_at: Option<SimTime>,
}

impl Server {
    /// A freshly installed server (empty binlog), running at `now`.
    pub fn new(config: ServerConfig, now: SimTime) -> Server {
        Server {
            now,
            process: Process::Running,
            outputs: VecDeque::new(),
            next_connection: 0,
            binlog: Vec::new(),
            binlog_state: BTreeMap::new(),
            binlog_state_text: String::new(),
            purged: 0,
            binlog_pos: Gtids::new(),
            slave_pos: Gtids::new(),
            master: None,
            read_only: config.read_only,
            semi_sync_master: config.semi_sync_master,
            semi_sync_slave: config.semi_sync_slave,
            semi_sync_active: config.semi_sync_master.enabled,
            pending: VecDeque::new(),
            acked: BTreeMap::new(),
            dumps: BTreeMap::new(),
            replica: ReplicaState::new(Gtids::new()),
            applied_commit_at: None,
            config,
        }
    }

    pub fn id(&self) -> ServerId {
        self.config.server_id
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    // ----- Driving -----

    /// Processes one input at `now` (after firing the timers due by then).
    pub fn handle(&mut self, input: Input, now: SimTime) {
        match &mut self.process {
            Process::Down => {
                // A down server accepts no connection; messages are lost, clients are refused.
                if let Input::ClientWrite { write_id } = input {
                    let at = self.now.max(now);
                    self.outputs.push_back(Output::WriteFailed {
                        write_id,
                        error: WriteError::ServerDown,
                        at,
                    });
                }
            }
            Process::Frozen { inbox, .. } => inbox.push(input),
            Process::Running => {
                self.advance(now);
                self.process_input(input);
                self.fire_due();
            }
        }
    }

    /// The earliest instant at which a timer is due; None while frozen or down, or when no
    /// timer is armed.
    pub fn poll_timeout(&self) -> Option<SimTime> {
        self.next_timer().map(|(t, _)| t)
    }

    /// Fires every timer due by `now`.
    pub fn handle_timeout(&mut self, now: SimTime) {
        if self.process == Process::Running {
            self.advance(now);
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub fn drain_outputs(&mut self) -> Vec<Output> {
        self.outputs.drain(..).collect()
    }

    // ----- Faults (driven by the simulator) -----

    /// A slow (or fast again) applier from now on: SQL thread time per applied event.
    pub fn set_apply_delay(&mut self, delay: Duration) {
        self.config.apply_delay = delay;
    }

    /// SIGSTOP at `now`.
    pub fn freeze(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.require_running()?;
        self.advance(now);
        self.process = Process::Frozen {
            since: self.now,
            inbox: Vec::new(),
        };
        Ok(())
    }

    /// SIGCONT at `now`: in-progress applies resume where they stopped, queued inputs are
    /// processed in arrival order, then overdue timers fire (at `now`: nothing ran meanwhile).
    pub fn thaw(&mut self, now: SimTime) -> Result<(), AdminError> {
        let Process::Frozen { since, inbox } =
            std::mem::replace(&mut self.process, Process::Running)
        else {
            return Err(AdminError::NotFrozen);
        };
        self.now = self.now.max(now);
        if let SqlThread::Applying { since: started } = self.replica.sql {
            // Only running time counts toward the apply delay.
            self.replica.sql = SqlThread::Applying {
                since: started + (self.now - since),
            };
        }
        for input in inbox {
            self.process_input(input);
        }
        self.fire_due();
        Ok(())
    }

    /// `kill -9` (or power loss) at `now`. Works on a frozen server too.
    pub fn crash(&mut self, now: SimTime) -> Result<(), AdminError> {
        match self.process {
            Process::Down => return Err(AdminError::Down),
            // Whatever was due before the crash happened.
            Process::Running => self.advance(now),
            // Nothing ran while frozen.
            Process::Frozen { .. } => {}
        }
        let inbox = match std::mem::replace(&mut self.process, Process::Down) {
            Process::Frozen { inbox, .. } => inbox,
            Process::Running | Process::Down => Vec::new(),
        };
        self.now = self.now.max(now);
        let at = self.now;
        // Clients waiting on a commit (semi-sync) or on a frozen server lose their connection.
        let waiting = self.pending.drain(..).map(|p| p.write_id);
        let queued = inbox.into_iter().filter_map(|i| match i {
            Input::ClientWrite { write_id } | Input::SuperWrite { write_id } => Some(write_id),
            Input::Message { .. } => None,
        });
        let lost: Vec<WriteId> = waiting.chain(queued).collect();
        for write_id in lost {
            self.outputs.push_back(Output::WriteFailed {
                write_id,
                error: WriteError::ConnectionLost,
                at,
            });
        }
        self.acked.clear();
        self.dumps.clear();
        // relay_log_recovery=1: the relay log is discarded.
        self.replica = ReplicaState::new(self.slave_pos.clone());
        Ok(())
    }

    /// Starts the crashed server at `now` with its configuration's settings (`read_only` ON
    /// under myha); replication starts only if `start_slave` and a master is configured.
    pub fn restart(&mut self, now: SimTime, start_slave: bool) -> Result<(), AdminError> {
        if self.process != Process::Down {
            return Err(AdminError::NotDown);
        }
        self.process = Process::Running;
        self.now = self.now.max(now);
        self.read_only = self.config.read_only;
        self.semi_sync_master = self.config.semi_sync_master;
        self.semi_sync_active = self.semi_sync_master.enabled;
        self.semi_sync_slave = self.config.semi_sync_slave;
        if start_slave && self.master.is_some() {
            self.start_slave(now)?;
        }
        Ok(())
    }

    // ----- Administrative statements (the agent's SQL) -----

    /// `SET GLOBAL read_only = on`.
    pub fn set_read_only(&mut self, on: bool, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.read_only = on;
        Ok(())
    }

    /// `SET GLOBAL rpl_semi_sync_master_*`. Enabling turns the status ON at once (commits then
    /// wait, even with no replica: `wait_no_slave=ON`); disabling releases waiting commits.
    pub fn set_semi_sync_master(
        &mut self,
        settings: SemiSyncMaster,
        now: SimTime,
    ) -> Result<(), AdminError> {
        self.admin(now)?;
        let was_enabled = self.semi_sync_master.enabled;
        self.semi_sync_master = settings;
        if !settings.enabled {
            self.semi_sync_active = false;
            self.release_all_pending(false);
        } else if !was_enabled {
            self.semi_sync_active = true;
        }
        // A lower ack count may release waiting commits.
        self.release_acked();
        self.fire_due();
        Ok(())
    }

    /// `SET GLOBAL rpl_semi_sync_slave_enabled`; used from the next connection on.
    pub fn set_semi_sync_slave(&mut self, on: bool, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.semi_sync_slave = on;
        Ok(())
    }

    /// `CHANGE MASTER TO`. Needs both threads stopped; discards the relay log (whatever was
    /// received but not applied is gone).
    pub fn change_master(&mut self, master: MasterConfig, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        if master.source == self.config.server_id {
            return Err(AdminError::SelfSource);
        }
        self.require_slave_stopped()?;
        self.master = Some(master);
        self.replica = ReplicaState::new(self.slave_pos.clone());
        Ok(())
    }

    /// Lifts `MASTER_DELAY` keeping the relay log, as myha's agent does (a `CHANGE MASTER TO
    /// MASTER_USE_GTID = no, MASTER_DELAY = 0, RELAY_LOG_FILE = .., RELAY_LOG_POS = ..` at where
    /// the SQL thread stopped): every received transaction stays, and is applied as soon as the
    /// SQL thread starts. Needs both threads stopped, like any `CHANGE MASTER`. The connection
    /// settings are otherwise kept (the model has no file positions: the next IO thread start
    /// resumes from `gtid_slave_pos` as before).
    pub fn lift_master_delay(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.require_slave_stopped()?;
        let master = self
            .master
            .as_mut()
            .ok_or(AdminError::NotConfiguredAsSlave)?;
        master.master_delay = Duration::ZERO;
        Ok(())
    }

    /// `RESET SLAVE ALL`: forgets the master and the relay log. `gtid_slave_pos` is kept.
    pub fn reset_slave_all(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.require_slave_stopped()?;
        self.master = None;
        self.replica = ReplicaState::new(self.slave_pos.clone());
        Ok(())
    }

    /// `SET GLOBAL gtid_slave_pos = ...`; needs both threads stopped.
    pub fn set_gtid_slave_pos(
        &mut self,
        pos: &MariaDbPosition,
        now: SimTime,
    ) -> Result<(), AdminError> {
        self.admin(now)?;
        self.require_slave_stopped()?;
        self.slave_pos = from_position(pos);
        Ok(())
    }

    /// `START SLAVE`: starts whichever thread is stopped. In GTID mode, starting with both
    /// threads stopped discards the relay log and fetches again from `gtid_slave_pos` (or
    /// `gtid_current_pos`); starting only the IO thread while the SQL thread runs continues from
    /// `gtid_io_pos`.
    pub fn start_slave(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        let master = self.master.ok_or(AdminError::NotConfiguredAsSlave)?;
        if self.replica.io == IoThread::Stopped {
            if self.replica.sql == SqlThread::Stopped {
                self.replica.relay.clear();
                self.replica.io_pos = match master.use_gtid {
                    UseGtid::SlavePos => self.slave_pos.clone(),
                    UseGtid::CurrentPos => self.current_pos(),
                };
            }
            self.replica.io_error = None;
            self.connect();
        }
        if self.replica.sql == SqlThread::Stopped {
            self.replica.sql_error = None;
            self.replica.sql = SqlThread::Waiting;
        }
        self.fire_due();
        Ok(())
    }

    /// `START SLAVE SQL_THREAD`.
    pub fn start_slave_sql(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        if self.master.is_none() {
            return Err(AdminError::NotConfiguredAsSlave);
        }
        if self.replica.sql == SqlThread::Stopped {
            self.replica.sql_error = None;
            self.replica.sql = SqlThread::Waiting;
        }
        self.fire_due();
        Ok(())
    }

    /// `STOP SLAVE`: both threads. An event being applied is rolled back and applied again later.
    pub fn stop_slave(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.stop_io();
        self.replica.sql = SqlThread::Stopped;
        Ok(())
    }

    /// `STOP SLAVE IO_THREAD`: stop receiving; the SQL thread keeps applying the relay log.
    pub fn stop_slave_io(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.stop_io();
        Ok(())
    }

    /// `PURGE BINARY LOGS`: dump threads can no longer serve the first `count` events.
    pub fn purge_binary_logs(&mut self, count: usize, now: SimTime) -> Result<(), AdminError> {
        self.admin(now)?;
        self.purged = self.purged.max(count.min(self.binlog.len()));
        Ok(())
    }

    /// What the agent's status queries return at `now`.
    pub fn status(&mut self, now: SimTime) -> Result<ServerStatus, AdminError> {
        self.admin(now)?;
        Ok(self.snapshot())
    }

    // ----- Oracle views (simulator ground truth, available in any process state) -----

    pub fn process_state(&self) -> ProcessState {
        match self.process {
            Process::Running => ProcessState::Running,
            Process::Frozen { .. } => ProcessState::Frozen,
            Process::Down => ProcessState::Down,
        }
    }

    /// Every transaction committed here, in order (the database content: with
    /// `log_slave_updates` every applied transaction is in the binlog).
    pub fn binlog(&self) -> &[Event] {
        &self.binlog
    }

    /// Received, not yet applied.
    pub fn relay_log(&self) -> impl Iterator<Item = &Event> + '_ {
        self.replica.relay.iter()
    }

    /// See [`ServerStatus::gtid_binlog_state`].
    pub fn gtid_binlog_state(&self) -> String {
        self.binlog_state_text.clone()
    }

    pub fn gtid_binlog_pos(&self) -> MariaDbPosition {
        to_position(&self.binlog_pos)
    }

    pub fn gtid_slave_pos(&self) -> MariaDbPosition {
        to_position(&self.slave_pos)
    }

    pub fn gtid_current_pos(&self) -> MariaDbPosition {
        to_position(&self.current_pos())
    }

    /// Whether this server holds transaction `write_id` in its binlog or relay log.
    pub fn holds(&self, write_id: WriteId) -> bool {
        self.binlog.iter().any(|e| e.write_id == write_id)
            || self.replica.relay.iter().any(|e| e.write_id == write_id)
    }

    /// The status as queries would see it, regardless of the process state.
    pub fn snapshot(&self) -> ServerStatus {
        let slave = self.master.map(|m| {
            let io_running = match self.replica.io {
                IoThread::Stopped => IoRunning::No,
                IoThread::Running {
                    connected: false, ..
                } => IoRunning::Connecting,
                IoThread::Running {
                    connected: true, ..
                } => IoRunning::Yes,
            };
            let sql_running = self.replica.sql != SqlThread::Stopped;
            let seconds_behind_master = (io_running == IoRunning::Yes && sql_running).then(|| {
                self.replica
                    .relay
                    .front()
                    .map_or(0, |e| (self.now - e.timestamp).as_secs())
            });
            SlaveStatus {
                source: m.source,
                use_gtid: m.use_gtid,
                io_running,
                sql_running,
                gtid_io_pos: to_position(&self.replica.io_pos),
                last_io_error: self.replica.io_error.clone(),
                last_sql_error: self.replica.sql_error.clone(),
                seconds_behind_master,
                sql_delay: m.master_delay,
                relay_log_events: self.replica.relay.len(),
            }
        });
        ServerStatus {
            server_id: self.config.server_id,
            read_only: self.read_only,
            gtid_binlog_pos: self.gtid_binlog_pos(),
            gtid_slave_pos: self.gtid_slave_pos(),
            gtid_current_pos: self.gtid_current_pos(),
            semi_sync_master: self.semi_sync_master,
            semi_sync_master_active: self.semi_sync_active,
            semi_sync_master_clients: self.dumps.values().filter(|d| d.semi_sync).count(),
            semi_sync_waiting: self.pending.len(),
            semi_sync_slave: self.semi_sync_slave,
            slave,
            applied_commit_at: self.applied_commit_at,
            gtid_binlog_state: self.gtid_binlog_state(),
        }
    }

    // ----- Internals -----

    fn require_running(&self) -> Result<(), AdminError> {
        match self.process {
            Process::Running => Ok(()),
            Process::Frozen { .. } => Err(AdminError::Frozen),
            Process::Down => Err(AdminError::Down),
        }
    }

    /// Common prologue of a statement: the server must answer, and time catches up first.
    fn admin(&mut self, now: SimTime) -> Result<(), AdminError> {
        self.require_running()?;
        self.advance(now);
        Ok(())
    }

    fn require_slave_stopped(&self) -> Result<(), AdminError> {
        if self.replica.io != IoThread::Stopped || self.replica.sql != SqlThread::Stopped {
            return Err(AdminError::SlaveRunning);
        }
        Ok(())
    }

    /// `gtid_current_pos`, by MariaDB's rule: per domain, the binlog's GTID if it was written by
    /// this server and is ahead of `gtid_slave_pos`, else `gtid_slave_pos`'s.
    fn current_pos(&self) -> Gtids {
        let mut pos = self.slave_pos.clone();
        for (domain, g) in &self.binlog_pos {
            let ahead = pos.get(domain).is_none_or(|s| g.seq > s.seq);
            if g.server_id == self.config.server_id && ahead {
                pos.insert(*domain, *g);
            }
        }
        pos
    }

    /// Fires due timers up to `now`, then sets the clock to `now`.
    fn advance(&mut self, now: SimTime) {
        while let Some((t, timer)) = self.next_timer() {
            if t > now {
                break;
            }
            self.now = self.now.max(t);
            self.fire(timer);
        }
        self.now = self.now.max(now);
    }

    /// Fires timers due at the current instant (zero delays armed by an input).
    fn fire_due(&mut self) {
        let now = self.now;
        self.advance(now);
    }

    fn next_timer(&self) -> Option<(SimTime, Timer)> {
        if self.process != Process::Running {
            return None;
        }
        let mut timers: Vec<(SimTime, Timer)> = Vec::new();
        if let (true, SemiSyncTimeout::After(d), Some(p)) = (
            self.semi_sync_active,
            self.semi_sync_master.timeout,
            self.pending.front(),
        ) {
            timers.push((p.since + d, Timer::SemiSyncTimeout));
        }
        if !self.config.heartbeat_period.is_zero() {
            for (replica, dump) in &self.dumps {
                timers.push((
                    dump.last_sent + self.config.heartbeat_period,
                    Timer::Heartbeat(*replica),
                ));
            }
        }
        if let IoThread::Running { last_heard, .. } = self.replica.io {
            if !self.config.slave_net_timeout.is_zero() {
                timers.push((
                    last_heard + self.config.slave_net_timeout,
                    Timer::NetTimeout,
                ));
            }
        }
        if let Some(head) = self.replica.relay.front() {
            match self.replica.sql {
                SqlThread::Stopped => {}
                SqlThread::Waiting => {
                    let delay = self.master.map_or(Duration::ZERO, |m| m.master_delay);
                    timers.push((head.timestamp + delay, Timer::SqlStart));
                }
                SqlThread::Applying { since } => {
                    timers.push((since + self.config.apply_delay, Timer::SqlDone));
                }
            }
        }
        // Earliest first; equal instants in a fixed order, so runs are reproducible.
        timers.into_iter().min_by_key(|(t, timer)| {
            let rank = match timer {
                Timer::SqlDone => 0,
                Timer::SqlStart => 1,
                Timer::SemiSyncTimeout => 2,
                Timer::Heartbeat(_) => 3,
                Timer::NetTimeout => 4,
            };
            (*t, rank)
        })
    }

    /// Invariant: every firing changes state so that the same timer is not due again at the
    /// same instant (otherwise `advance` would not terminate).
    fn fire(&mut self, timer: Timer) {
        match timer {
            Timer::SemiSyncTimeout => {
                // MariaDB: the waiting commit gives up, the master switches semi-sync off, and
                // every other waiter returns too.
                self.semi_sync_active = false;
                self.release_all_pending(false);
            }
            Timer::Heartbeat(replica) => {
                let now = self.now;
                if let Some(dump) = self.dumps.get_mut(&replica) {
                    dump.last_sent = now;
                    let message = Message::Heartbeat {
                        connection: dump.connection,
                        stream_seq: dump.next_stream_seq,
                    };
                    self.outputs.push_back(Output::Send {
                        to: replica,
                        message,
                    });
                }
            }
            Timer::NetTimeout => self.connect(),
            Timer::SqlStart => {
                self.replica.sql = SqlThread::Applying { since: self.now };
            }
            Timer::SqlDone => {
                self.replica.sql = SqlThread::Waiting;
                self.apply_head();
            }
        }
    }

    fn process_input(&mut self, input: Input) {
        match input {
            Input::ClientWrite { write_id } => self.client_write(write_id, false),
            Input::SuperWrite { write_id } => self.client_write(write_id, true),
            Input::Message { from, message } => self.receive(from, message),
        }
    }

    fn client_write(&mut self, write_id: WriteId, super_user: bool) {
        let at = self.now;
        if self.read_only && !super_user {
            self.outputs.push_back(Output::WriteFailed {
                write_id,
                error: WriteError::ReadOnly,
                at,
            });
            return;
        }
        // The next seq of the domain comes from the binlog state (strict mode: gapless,
        // increasing). On a replica this is the errant-transaction case: the replica's own
        // server_id at the next seq of the shared domain.
        let domain = self.config.domain_id;
        let seq = self.binlog_pos.get(&domain).map_or(0, |g| g.seq) + 1;
        let gtid = MariaDbGtid::new(domain, self.config.server_id, seq);
        let binlog_index = index_u64(self.binlog.len());
        // AFTER_SYNC: durable in the binlog and streamed to replicas before the client hears back.
        self.append_binlog(Event {
            gtid,
            write_id,
            timestamp: at,
        });
        if self.semi_sync_master.enabled && self.semi_sync_active {
            self.pending.push_back(PendingCommit {
                write_id,
                gtid,
                binlog_index,
                since: at,
            });
        } else {
            self.outputs.push_back(Output::Ack {
                write_id,
                gtid,
                at,
                semi_sync: false,
            });
        }
    }

    fn append_binlog(&mut self, event: Event) {
        self.binlog_pos.insert(event.gtid.domain, event.gtid);
        self.binlog_state
            .insert((event.gtid.domain, event.gtid.server_id), event.gtid);
        self.binlog_state_text = self
            .binlog_state
            .values()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.binlog.push(event);
        let replicas: Vec<ServerId> = self.dumps.keys().copied().collect();
        for replica in replicas {
            self.pump(replica);
        }
    }

    /// Sends `replica` every binlog event its dump thread has not yet considered.
    fn pump(&mut self, replica: ServerId) {
        let now = self.now;
        let Some(dump) = self.dumps.get_mut(&replica) else {
            return;
        };
        while let Some(event) = self.binlog.get(dump.next_index) {
            let binlog_index = index_u64(dump.next_index);
            dump.next_index += 1;
            if covers(&dump.start, event.gtid) {
                continue;
            }
            let message = Message::BinlogEvent {
                connection: dump.connection,
                stream_seq: dump.next_stream_seq,
                binlog_index,
                event: *event,
            };
            dump.next_stream_seq += 1;
            dump.last_sent = now;
            self.outputs.push_back(Output::Send {
                to: replica,
                message,
            });
        }
    }

    fn receive(&mut self, from: ServerId, message: Message) {
        match message {
            Message::BinlogDump {
                connection,
                start,
                semi_sync,
            } => self.start_dump(from, connection, &start, semi_sync),
            Message::Quit { connection } => {
                if self
                    .dumps
                    .get(&from)
                    .is_some_and(|d| d.connection == connection)
                {
                    self.dumps.remove(&from);
                }
            }
            Message::SemiSyncAck {
                connection,
                binlog_index,
            } => self.semi_sync_ack(from, connection, binlog_index),
            Message::BinlogEvent {
                connection,
                stream_seq,
                event,
                binlog_index,
            } => {
                if self.on_current_connection(from, connection) {
                    self.relay_event(stream_seq, binlog_index, event);
                }
            }
            Message::Heartbeat {
                connection,
                stream_seq,
            } => {
                if self.on_current_connection(from, connection) {
                    self.heard(stream_seq, false);
                }
            }
            Message::DumpError { connection, error } => {
                if self.on_current_connection(from, connection) {
                    // Fatal for the IO thread: it stops until START SLAVE.
                    self.replica.io = IoThread::Stopped;
                    self.replica.io_error = Some(error);
                }
            }
        }
    }

    /// Source side of `COM_BINLOG_DUMP`: refuse (1236) unless the binlog can continue the
    /// replica's history exactly.
    fn start_dump(
        &mut self,
        replica: ServerId,
        connection: ConnectionId,
        start: &MariaDbPosition,
        semi_sync: bool,
    ) {
        if replica == self.config.server_id {
            return;
        }

        // Connection ids grow per replica. A request older than the one being served comes from
        // a connection the replica has already abandoned (and closed), so it is not served.
        if self
            .dumps
            .get(&replica)
            .is_some_and(|d| d.connection > connection)
        {
            return;
        }
        // Every GTID the replica names must be a transaction of this binlog (including purged
        // ones: the binlog index files still list them); otherwise the replica is ahead or has
        // diverged.
        if let Some(requested) = start
            .iter()
            .find(|g| !self.binlog.iter().any(|e| e.gtid == *g))
        {
            self.dump_error(
                replica,
                connection,
                IoError::GtidNotInSourceBinlog { requested },
            );
            return;
        }
        let start = from_position(start);
        let first_needed = self
            .binlog
            .iter()
            .position(|e| !covers(&start, e.gtid))
            .unwrap_or(self.binlog.len());
        if first_needed < self.purged {
            let needed = self.binlog[first_needed].gtid;
            self.dump_error(replica, connection, IoError::Purged { needed });
            return;
        }
        self.dumps.insert(
            replica,
            DumpThread {
                connection,
                semi_sync,
                start,
                next_index: first_needed,
                next_stream_seq: 0,
                last_sent: self.now,
            },
        );
        // MariaDB opens every dump with a format description and a Gtid_list event; the
        // model's equivalent is a heartbeat with the stream's first number, so the replica
        // knows it is connected even when there is nothing to send.
        self.outputs.push_back(Output::Send {
            to: replica,
            message: Message::Heartbeat {
                connection,
                stream_seq: 0,
            },
        });
        self.pump(replica);
        // A replica already holding everything can switch semi-sync back on.
        self.try_switch_on();
    }

    fn dump_error(&mut self, replica: ServerId, connection: ConnectionId, error: IoError) {
        self.outputs.push_back(Output::Send {
            to: replica,
            message: Message::DumpError { connection, error },
        });
    }

    fn semi_sync_ack(&mut self, replica: ServerId, connection: ConnectionId, binlog_index: u64) {
        // Only the replica's current semi-sync connection counts (a stale ack is dropped, which
        // can only delay an ack, never invent one).
        let current = self
            .dumps
            .get(&replica)
            .is_some_and(|d| d.connection == connection && d.semi_sync);
        if !current || binlog_index >= index_u64(self.binlog.len()) {
            return;
        }
        let acked = self.acked.entry(replica).or_insert(binlog_index);
        *acked = (*acked).max(binlog_index);
        self.release_acked();
        self.try_switch_on();
    }

    /// Acknowledges the waiting commits that enough replicas hold.
    fn release_acked(&mut self) {
        let k = self.semi_sync_master.acks_required();
        while let Some(p) = self.pending.front().copied() {
            let holders = self
                .acked
                .values()
                .filter(|&&acked| acked >= p.binlog_index)
                .count();
            if holders < k {
                break;
            }
            self.pending.pop_front();
            let at = self.now;
            self.outputs.push_back(Output::Ack {
                write_id: p.write_id,
                gtid: p.gtid,
                at,
                semi_sync: true,
            });
        }
    }

    fn release_all_pending(&mut self, semi_sync: bool) {
        let at = self.now;
        for p in std::mem::take(&mut self.pending) {
            self.outputs.push_back(Output::Ack {
                write_id: p.write_id,
                gtid: p.gtid,
                at,
                semi_sync,
            });
        }
    }

    /// Semi-sync switches back on once enough semi-sync replicas have caught up with the end of
    /// the binlog: each has acknowledged the last event, or asked to start from a position that
    /// already covers the whole binlog.
    fn try_switch_on(&mut self) {
        if !self.semi_sync_master.enabled || self.semi_sync_active {
            return;
        }
        let last = self.binlog.len().checked_sub(1).map(index_u64);
        let caught_up = self
            .dumps
            .iter()
            .filter(|(replica, dump)| {
                let has_all = match last {
                    None => true,
                    Some(last) => {
                        self.acked.get(replica).is_some_and(|&a| a >= last)
                            || self.binlog_pos.values().all(|g| covers(&dump.start, *g))
                    }
                };
                dump.semi_sync && has_all
            })
            .count();
        if caught_up >= self.semi_sync_master.acks_required() {
            self.semi_sync_active = true;
        }
    }

    /// Replica side: whether a message belongs to the IO thread's current connection.
    fn on_current_connection(&self, from: ServerId, connection: ConnectionId) -> bool {
        let source = self.master.map(|m| m.source);
        matches!(self.replica.io, IoThread::Running { connection: c, .. } if c == connection)
            && source == Some(from)
    }

    /// Something carrying `stream_seq` arrived on the current connection. Returns whether it is
    /// the next event of the stream (and then counts it); a gap breaks the connection.
    fn heard(&mut self, stream_seq: u64, is_event: bool) -> bool {
        let now = self.now;
        let IoThread::Running {
            expected_stream_seq,
            connected,
            last_heard,
            ..
        } = &mut self.replica.io
        else {
            return false;
        };
        *connected = true;
        *last_heard = now;
        let expected = *expected_stream_seq;
        if stream_seq < expected {
            // A duplicate, or a heartbeat overtaken by later events: nothing new.
            return false;
        }
        if stream_seq > expected {
            // Something was lost or overtaken: like a broken TCP stream, reconnect from what
            // the relay log holds.
            self.connect();
            return false;
        }
        if is_event {
            *expected_stream_seq += 1;
        }
        is_event
    }

    fn relay_event(&mut self, stream_seq: u64, binlog_index: u64, event: Event) {
        if !self.heard(stream_seq, true) {
            return;
        }
        self.replica.io_pos.insert(event.gtid.domain, event.gtid);
        self.replica.relay.push_back(event);
        if let (
            Some(m),
            IoThread::Running {
                connection,
                semi_sync: true,
                ..
            },
        ) = (self.master, &self.replica.io)
        {
            // The relay log write is done (the model's relay log is the durable-enough write
            // that semi-sync acks): acknowledge it.
            self.outputs.push_back(Output::Send {
                to: m.source,
                message: Message::SemiSyncAck {
                    connection: *connection,
                    binlog_index,
                },
            });
        }
    }

    /// (Re)connects the IO thread from `gtid_io_pos` on a fresh connection.
    fn connect(&mut self) {
        let Some(m) = self.master else {
            return;
        };
        if let IoThread::Running { connection, .. } = self.replica.io {
            self.outputs.push_back(Output::Send {
                to: m.source,
                message: Message::Quit { connection },
            });
        }
        let connection = self.next_connection;
        self.next_connection += 1;
        self.replica.io = IoThread::Running {
            connection,
            semi_sync: self.semi_sync_slave,
            expected_stream_seq: 0,
            connected: false,
            last_heard: self.now,
        };
        self.outputs.push_back(Output::Send {
            to: m.source,
            message: Message::BinlogDump {
                connection,
                start: to_position(&self.replica.io_pos),
                semi_sync: self.semi_sync_slave,
            },
        });
    }

    fn stop_io(&mut self) {
        if let (IoThread::Running { connection, .. }, Some(m)) = (&self.replica.io, self.master) {
            self.outputs.push_back(Output::Send {
                to: m.source,
                message: Message::Quit {
                    connection: *connection,
                },
            });
        }
        self.replica.io = IoThread::Stopped;
    }

    /// Applies the head of the relay log (its delays have elapsed).
    fn apply_head(&mut self) {
        let Some(event) = self.replica.relay.front().copied() else {
            return;
        };
        let gtid = event.gtid;
        if gtid.server_id == self.config.server_id {
            // replicate_same_server_id=0: our own transaction coming back is skipped, but the
            // slave position still moves past it.
            self.replica.relay.pop_front();
            self.slave_pos.insert(gtid.domain, gtid);
            return;
        }
        if let Some(existing) = self.binlog_pos.get(&gtid.domain).copied() {
            if existing.seq >= gtid.seq {
                // Strict mode refuses an out-of-order seq (typically an errant local write at
                // the same seq); the SQL thread stops with the event still at the head.
                self.replica.sql = SqlThread::Stopped;
                self.replica.sql_error = Some(SqlError::OutOfOrder { gtid, existing });
                return;
            }
        }
        self.replica.relay.pop_front();
        self.slave_pos.insert(gtid.domain, gtid);
        self.applied_commit_at = Some(event.timestamp);
        // log_slave_updates: applied transactions reach our binlog (and our own replicas).
        self.append_binlog(event);
    }
}
