//! The L4 proxy: per shard an RW and/or RO listener, a routing loop that swaps in a new
//! immutable [`Routes`] whenever tabletwatch publishes (and every [`REEVALUATE_EVERY`], since
//! health goes stale without any new snapshot), and one task per client connection.
//!
//! Threads: the control plane (tabletwatch, the routing loop, the admin API) runs on the main
//! thread; connections run on `[gateway] proxy_threads` single-threaded runtimes. Proxy thread 0
//! accepts on every listener and hands each new connection to the thread with the fewest
//! connections (itself included); from then on both sockets of the connection live on that
//! thread only. On a small machine shared with the client and mysqld this keeps the per-query
//! cost below a work-stealing runtime's (measured: ~18-25 us of proxy CPU per point select,
//! ~35 us with tokio's 2-worker scheduler).
//!
//! Invariants:
//! - Connection tasks read the routing snapshot with a lock-free `ArcSwap::load` and never wait
//!   on etcd; every decision is a pure function of [`crate::routing`].
//! - A connection's decision and its registration in its shard's [`ConnTable`] happen under
//!   the table's mutex, and the routing loop stores a new snapshot *before* sweeping the table
//!   under the same mutex: so a connection routed by an older snapshot is always seen by the
//!   sweep of every newer one (no connection to a deposed primary slips through).
//! - The mutex is taken per connection event (route, close) and per sweep, never per packet:
//!   the data path is [`crate::splice`] between the two sockets plus an atomic kill flag.
//! - Held connections wait on a `watch` of routing changes (woken by the change itself, not by
//!   polling) and the end of their buffer window.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};
use topo::Term;

use arc_swap::ArcSwap;
use futures::task::AtomicWaker;
use metrics::{Counter, Gauge};
use tabletwatch::{FleetSnapshot, TabletWatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::mysql;
use crate::routing::{
    close_reason, compute_routes, excluded_counts, ro_choice, route_changes, rw_choice, Ask,
    BackendJson, ConnRole, ListenersJson, ProxyPolicy, Refusal, RefusalKind, RoChoice, Routes,
    RoutingPolicy, RoutingResponse, RwChoice, ShardConnections, Target,
};

/// Routing is recomputed at least this often: freshness and lag bounds move with time alone.
pub const REEVALUATE_EVERY: Duration = Duration::from_millis(100);
/// Per direction and connection. Big enough for result sets to move in few syscalls, small
/// enough for thousands of connections.
pub const SPLICE_BUFFER: usize = 16 * 1024;
/// A connect failure to the primary is retried (within the buffer window) after this, or as
/// soon as the routing changes.
const RW_CONNECT_RETRY: Duration = Duration::from_millis(100);
/// Accept queue of each listening socket.
const LISTEN_BACKLOG: u32 = 1024;
/// How long a refused client gets to read its error packet before the socket is dropped.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Which port of a shard a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Rw,
    Ro,
}

impl Port {
    pub fn as_str(self) -> &'static str {
        match self {
            Port::Rw => "rw",
            Port::Ro => "ro",
        }
    }
}

/// What the proxy needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub routing: RoutingPolicy,
    pub proxy: ProxyPolicy,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Connections open through the gateway at once (beyond: refused at accept).
    pub max_connections: usize,
}

/// New connections that may wait for one proxy thread to take them (beyond: refused): a
/// stalled thread must not queue an unbounded number of sockets.
pub const HANDOFF_QUEUE: usize = 1024;

/// A listener to open: one port of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub keyspace: String,
    pub shard: String,
    pub port: Port,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr} ([[listener]] {keyspace}/{shard} {port}): {source}")]
    Bind {
        keyspace: String,
        shard: String,
        port: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

// ---- kill switch ----------------------------------------------------------------------------

/// Lets the routing loop close one connection: an atomic flag plus the waker of the task
/// splicing it (lock-free on the data path).
#[derive(Debug, Default)]
struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
    reason: Mutex<Option<String>>,
}

impl KillSwitch {
    fn kill(&self, reason: String) {
        *lock(&self.reason) = Some(reason);
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    fn reason(&self) -> String {
        lock(&self.reason).clone().unwrap_or_default()
    }
}

/// Runs `fut` until it finishes (`Some`) or `kill` fires (`None`).
async fn killable<F: Future>(fut: F, kill: &KillSwitch) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if kill.is_killed() {
            return Poll::Ready(None);
        }
        kill.waker.register(cx.waker());
        // Re-check after registering: a kill between the first check and the registration
        // would otherwise go unnoticed until the next packet.
        if kill.is_killed() {
            return Poll::Ready(None);
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// A poisoned mutex only means a panic elsewhere; the data (counters, a reason) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splices `client` and `backend` (see [`crate::splice`]) until both directions reached EOF
/// (each EOF is passed on as a write shutdown of the other socket: half-close), an error, or
/// `kill`. Returns the bytes moved (client to backend, backend to client), or `None` when killed.
async fn splice(
    client: TcpStream,
    backend: TcpStream,
    to_backend: Counter,
    to_client: Counter,
    kill: &KillSwitch,
) -> Option<io::Result<(u64, u64)>> {
    killable(
        crate::splice::splice(client, backend, SPLICE_BUFFER, to_backend, to_client),
        kill,
    )
    .await
}

// ---- metrics --------------------------------------------------------------------------------

pub fn describe_metrics() {
    metrics::describe_counter!(
        "myha_gateway_connections_total",
        "Client connections routed to a backend, by keyspace, shard, role (the port: rw|ro) and backend tablet"
    );
    metrics::describe_gauge!(
        "myha_gateway_connections_open",
        "Client connections open now, by keyspace, shard, role and backend tablet"
    );
    metrics::describe_counter!(
        "myha_gateway_bytes_total",
        "Bytes spliced, by direction (to_backend|to_client) and role (rw|ro)"
    );
    metrics::describe_gauge!(
        "myha_gateway_held_connections",
        "New connections held waiting for a target (buffer window)"
    );
    metrics::describe_counter!(
        "myha_gateway_routing_changes_total",
        "Changes of a shard's routing decision (rw target or term, set of ro targets)"
    );
    metrics::describe_counter!(
        "myha_gateway_refusals_total",
        "Connections refused with a MySQL error packet, by reason"
    );
    metrics::describe_gauge!(
        "myha_gateway_ro_excluded",
        "Replicas left out of a shard's RO routing now, by keyspace, shard and reason (quarantined, no_health, stale_health, mysql_unreachable, fenced, not_replicating, lag_unknown, lag_too_high)"
    );
    metrics::describe_counter!(
        "myha_gateway_closed_by_routing_total",
        "Open connections the gateway closed because the routing moved on (deposed primary, replica over ro_hard_lag, ...), by role"
    );
}

/// Metric handles looked up once (the data path only does atomic adds).
struct Meters {
    /// `[port][direction]`: direction 0 = to_backend, 1 = to_client.
    bytes: [[Counter; 2]; 2],
    held: Gauge,
    routing_changes: Counter,
}

impl Meters {
    fn new() -> Meters {
        let bytes = |role: &'static str, direction: &'static str| metrics::counter!("myha_gateway_bytes_total", "direction" => direction, "role" => role);
        // Refusal counters exist (at 0) from the start, so rates work before the first one.
        for k in RefusalKind::ALL {
            metrics::counter!("myha_gateway_refusals_total", "reason" => k.as_str()).absolute(0);
        }
        Meters {
            bytes: [
                [bytes("rw", "to_backend"), bytes("rw", "to_client")],
                [bytes("ro", "to_backend"), bytes("ro", "to_client")],
            ],
            held: metrics::gauge!("myha_gateway_held_connections"),
            routing_changes: metrics::counter!("myha_gateway_routing_changes_total"),
        }
    }

    fn bytes(&self, port: Port) -> (Counter, Counter) {
        let [to_backend, to_client] = match port {
            Port::Rw => &self.bytes[0],
            Port::Ro => &self.bytes[1],
        };
        (to_backend.clone(), to_client.clone())
    }
}

// ---- per-shard connection table ------------------------------------------------------------

/// One open (or connecting) connection, as the routing loop sees it.
#[derive(Debug)]
struct OpenConn {
    role: ConnRole,
    backend: Arc<str>,
    /// The shard record's term when it was routed.
    term: Term,
    kill: Arc<KillSwitch>,
}

#[derive(Debug, Default, Clone, Copy)]
struct BackendCount {
    rw: usize,
    ro: usize,
}

#[derive(Debug, Default)]
struct ConnTable {
    conns: HashMap<u64, OpenConn>,
    backends: BTreeMap<Arc<str>, BackendCount>,
}

impl ConnTable {
    fn open_to(&self, alias: &str) -> usize {
        self.backends.get(alias).map_or(0, |c| c.rw + c.ro)
    }
}

/// One configured shard: its listeners, held count and open connections.
struct ShardConns {
    key: (String, String),
    listeners: ListenersJson,
    held: AtomicUsize,
    table: Mutex<ConnTable>,
}

/// A connection routed and registered in its shard's table.
struct Routed {
    id: u64,
    role: ConnRole,
    target: Target,
    kill: Arc<KillSwitch>,
}

enum Decision {
    Routed(Routed),
    Hold(String),
    Refuse(Refusal),
}

/// Counts a held connection (global and per shard) until dropped.
struct HeldGuard {
    gw: Arc<Gateway>,
    shard: Arc<ShardConns>,
    since: Instant,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.gw.held.fetch_sub(1, Ordering::AcqRel);
        self.shard.held.fetch_sub(1, Ordering::AcqRel);
        self.gw.meters.held.decrement(1.0);
    }
}

/// Counts a connection (for the graceful shutdown, and its proxy thread's load) until dropped.
struct ActiveGuard {
    gw: Arc<Gateway>,
    thread: usize,
}

impl ActiveGuard {
    fn new(gw: &Arc<Gateway>, thread: usize) -> ActiveGuard {
        gw.active.fetch_add(1, Ordering::AcqRel);
        if let Some(l) = gw.load.get(thread) {
            l.fetch_add(1, Ordering::AcqRel);
        }
        ActiveGuard {
            gw: gw.clone(),
            thread,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.gw.active.fetch_sub(1, Ordering::AcqRel);
        if let Some(l) = self.gw.load.get(self.thread) {
            l.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A connection accepted by proxy thread 0 for another proxy thread.
struct Incoming {
    shard: Arc<ShardConns>,
    port: Port,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    guard: ActiveGuard,
}

// ---- the gateway ------------------------------------------------------------------------------

/// Everything the connection tasks, the routing loop and the admin API share.
pub struct Gateway {
    settings: Settings,
    routes: ArcSwap<Routes>,
    /// The `seq` of the last routing snapshot whose decisions changed: held connections wait
    /// on it.
    changed: watch::Sender<u64>,
    shards: BTreeMap<(String, String), Arc<ShardConns>>,
    /// The shards routing is computed for: those with listeners (`None` without any: every
    /// shard, for `/routing`).
    scope: Option<BTreeSet<(String, String)>>,
    held: AtomicUsize,
    /// Connection tasks alive (held, connecting or splicing).
    active: AtomicUsize,
    /// Per proxy thread, its connections.
    load: Vec<AtomicUsize>,
    /// Per proxy thread, where thread 0 hands it new connections (set when the threads start).
    handoff: std::sync::OnceLock<Vec<tokio::sync::mpsc::Sender<Incoming>>>,
    spin: AtomicU64,
    next_id: AtomicU64,
    stopping: watch::Sender<bool>,
    /// Set once the shutdown has drained: the proxy threads end.
    finished: watch::Sender<bool>,
    meters: Meters,
}

impl Gateway {
    /// A gateway for the shards of `listeners`, with `threads` proxy threads (the sockets are
    /// opened by [`Gateway::bind`], served once [`Gateway::start_proxy_threads`] runs).
    pub fn new(settings: Settings, listeners: &[ListenerSpec], threads: usize) -> Arc<Gateway> {
        let mut shards: BTreeMap<(String, String), ListenersJson> = BTreeMap::new();
        for l in listeners {
            let e = shards
                .entry((l.keyspace.clone(), l.shard.clone()))
                .or_insert(ListenersJson { rw: None, ro: None });
            match l.port {
                Port::Rw => e.rw = Some(l.addr.to_string()),
                Port::Ro => e.ro = Some(l.addr.to_string()),
            }
        }
        let scope = (!shards.is_empty()).then(|| shards.keys().cloned().collect());
        Arc::new(Gateway {
            settings,
            scope,
            routes: ArcSwap::from_pointee(Routes::empty()),
            changed: watch::channel(0).0,
            shards: shards
                .into_iter()
                .map(|(key, listeners)| {
                    let s = ShardConns {
                        key: key.clone(),
                        listeners,
                        held: AtomicUsize::new(0),
                        table: Mutex::new(ConnTable::default()),
                    };
                    (key, Arc::new(s))
                })
                .collect(),
            held: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            load: (0..threads.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            handoff: std::sync::OnceLock::new(),
            spin: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            stopping: watch::channel(false).0,
            finished: watch::channel(false).0,
            meters: Meters::new(),
        })
    }

    /// Binds every listener, all or nothing. Needs a tokio runtime (any): the sockets are
    /// returned unregistered, for the proxy threads to take.
    pub fn bind(
        listeners: &[ListenerSpec],
    ) -> Result<Vec<(ListenerSpec, std::net::TcpListener)>, ProxyError> {
        let mut out = Vec::new();
        for l in listeners {
            let err = |source: io::Error| ProxyError::Bind {
                keyspace: l.keyspace.clone(),
                shard: l.shard.clone(),
                port: l.port.as_str(),
                addr: l.addr,
                source,
            };
            let sock = match l.addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(err)?;
            sock.set_reuseaddr(true).map_err(err)?;
            sock.bind(l.addr).map_err(err)?;
            let listener = sock.listen(LISTEN_BACKLOG).map_err(err)?;
            out.push((l.clone(), listener.into_std().map_err(err)?));
        }
        Ok(out)
    }

    /// Starts the proxy threads (as many as [`Gateway::new`] was given), each a
    /// single-threaded tokio runtime; thread 0 accepts on `listeners`. They end once the
    /// gateway has drained ([`Gateway::shutdown`]). Thread `i` is pinned to `cpus[i]` when
    /// `cpus` is not empty (see [`crate::affinity`]); a pin that fails is logged, not fatal.
    pub fn start_proxy_threads(
        self: &Arc<Gateway>,
        listeners: Vec<(ListenerSpec, std::net::TcpListener)>,
        cpus: &[usize],
    ) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
        let n = self.load.len();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| tokio::sync::mpsc::channel::<Incoming>(HANDOFF_QUEUE))
            .unzip();
        if self.handoff.set(txs).is_err() {
            return Err(io::Error::other("the proxy threads are started already"));
        }
        let mut listeners = Some(listeners);
        let mut threads = Vec::new();
        for (index, rx) in rxs.into_iter().enumerate() {
            let gw = self.clone();
            let mine = if index == 0 { listeners.take() } else { None };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let cpu = cpus.get(index).copied();
            let t = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        match crate::affinity::pin_current_thread(cpu) {
                            Ok(()) => debug!(thread = index, cpu, "proxy thread pinned"),
                            Err(e) => {
                                warn!(thread = index, cpu, error = %e, "cannot pin the proxy thread; it runs unpinned")
                            }
                        }
                    }
                    rt.block_on(proxy_thread(gw, index, mine.unwrap_or_default(), rx))
                })?;
            threads.push(t);
        }
        Ok(threads)
    }

    /// The proxy thread with the fewest connections (ties: the lowest index).
    fn least_loaded_thread(&self) -> usize {
        self.load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.load(Ordering::Acquire))
            .map_or(0, |(i, _)| i)
    }

    /// Follows `watch`: a new routing snapshot on every tabletwatch snapshot and every
    /// [`REEVALUATE_EVERY`], until the gateway stops.
    pub async fn routing_loop(self: Arc<Gateway>, watch: Arc<TabletWatch>) {
        let mut snapshots = watch.subscribe();
        let mut stopping = self.stopping.subscribe();
        let mut tick = tokio::time::interval(REEVALUATE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = tick.tick() => {}
                _ = stopped(&mut stopping) => break,
            }
            let snap = snapshots.borrow_and_update().clone();
            seq += 1;
            self.apply(&snap, seq);
        }
        debug!("routing loop stopped");
    }

    /// Computes and swaps in the routing of `snap` now, wakes held connections when a decision
    /// changed, and closes the open connections the new routing rules out.
    fn apply(&self, snap: &FleetSnapshot, seq: u64) {
        let now = Instant::now();
        let new = Arc::new(compute_routes(
            snap,
            now,
            topo::now_ms(),
            seq,
            &self.settings.routing,
            self.scope.as_ref(),
        ));
        let old = self.routes.swap(new.clone());
        let changes = route_changes(&old, &new);
        for c in &changes {
            self.meters.routing_changes.increment(1);
            let route = new.shards.get(&(c.keyspace.clone(), c.shard.clone()));
            let rw_why = route.and_then(|r| r.routing.rw.as_ref().err().map(|e| e.to_string()));
            let ro_why = route.and_then(|r| r.routing.ro_unavailable());
            info!(
                keyspace = %c.keyspace,
                shard = %c.shard,
                snapshot = new.snapshot_version,
                before = ?c.before,
                after = ?c.after,
                rw_unavailable = rw_why.as_deref().unwrap_or(""),
                ro_unavailable = ro_why.as_deref().unwrap_or(""),
                "routing changed"
            );
        }
        if !changes.is_empty() || old.topo_synced != new.topo_synced {
            self.changed.send_replace(seq);
        }
        for route in new.shards.values() {
            for (reason, n) in excluded_counts(route) {
                metrics::gauge!(
                    "myha_gateway_ro_excluded",
                    "keyspace" => route.keyspace.clone(),
                    "shard" => route.shard.clone(),
                    "reason" => reason
                )
                .set(n as f64);
            }
        }
        self.sweep(&new);
    }

    /// Closes every open connection that [`close_reason`] rules out under `routes`.
    fn sweep(&self, routes: &Routes) {
        for shard in self.shards.values() {
            let route = routes.shards.get(&shard.key);
            let table = lock(&shard.table);
            for (id, c) in &table.conns {
                if c.kill.is_killed() {
                    continue;
                }
                if let Some(why) = close_reason(c.role, &c.backend, c.term, route) {
                    info!(
                        keyspace = %shard.key.0,
                        shard = %shard.key.1,
                        conn = id,
                        role = ?c.role,
                        backend = %c.backend,
                        reason = %why,
                        "closing connection"
                    );
                    metrics::counter!("myha_gateway_closed_by_routing_total", "role" => c.role.port())
                        .increment(1);
                    c.kill.kill(why);
                }
            }
        }
    }

    /// Decides for one connection under its shard's table lock and registers it when routed.
    fn decide(
        &self,
        shard: &ShardConns,
        port: Port,
        held_for: Option<Duration>,
        hold_room: bool,
        exclude: &[String],
    ) -> Decision {
        let mut table = lock(&shard.table);
        // Loaded under the lock: see the module's invariants.
        let routes = self.routes.load();
        let route = routes.shards.get(&shard.key);
        let ask = Ask {
            keyspace: &shard.key.0,
            shard: &shard.key.1,
            route,
            topo_synced: routes.topo_synced,
            held_for,
            hold_room,
        };
        let p = &self.settings.proxy;
        let (role, target) = match port {
            Port::Rw => match rw_choice(&ask, p) {
                RwChoice::Route(t) => (ConnRole::Rw, t),
                RwChoice::Hold(why) => return Decision::Hold(why),
                RwChoice::Refuse(r) => return Decision::Refuse(r),
            },
            Port::Ro => {
                let spin = match p.ro_policy {
                    crate::routing::RoPolicy::Random => rand::random::<u64>(),
                    _ => self.spin.fetch_add(1, Ordering::Relaxed),
                };
                let t = &*table;
                match ro_choice(&ask, p, &|a: &str| t.open_to(a), exclude, spin) {
                    RoChoice::Replica(t) => (ConnRole::RoReplica, t),
                    RoChoice::Primary(t) => (ConnRole::RoPrimary, t),
                    RoChoice::Hold(why) => return Decision::Hold(why),
                    RoChoice::Refuse(r) => return Decision::Refuse(r),
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let backend: Arc<str> = Arc::from(target.alias.as_str());
        let kill = Arc::new(KillSwitch::default());
        let count = table.backends.entry(backend.clone()).or_default();
        match port {
            Port::Rw => count.rw += 1,
            Port::Ro => count.ro += 1,
        }
        table.conns.insert(
            id,
            OpenConn {
                role,
                backend,
                term: route.map_or(Term::ZERO, |r| r.term),
                kill: kill.clone(),
            },
        );
        Decision::Routed(Routed {
            id,
            role,
            target,
            kill,
        })
    }

    fn unregister(&self, shard: &ShardConns, id: u64) {
        let mut table = lock(&shard.table);
        let Some(c) = table.conns.remove(&id) else {
            return;
        };
        if let Some(count) = table.backends.get_mut(&c.backend) {
            match c.role {
                ConnRole::Rw => count.rw = count.rw.saturating_sub(1),
                ConnRole::RoReplica | ConnRole::RoPrimary => count.ro = count.ro.saturating_sub(1),
            }
            if count.rw == 0 && count.ro == 0 {
                table.backends.remove(&c.backend);
            }
        }
    }

    /// Counts one more held connection unless `max_buffered` are held already.
    fn try_hold(self: &Arc<Gateway>, shard: &Arc<ShardConns>) -> Option<HeldGuard> {
        let max = self.settings.proxy.max_buffered;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h < max).then_some(h + 1)
            })
            .ok()?;
        shard.held.fetch_add(1, Ordering::AcqRel);
        self.meters.held.increment(1.0);
        Some(HeldGuard {
            gw: self.clone(),
            shard: shard.clone(),
            since: Instant::now(),
        })
    }

    fn hold_room(&self) -> bool {
        self.held.load(Ordering::Acquire) < self.settings.proxy.max_buffered
    }

    /// Connection tasks alive now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// `GET /routing`.
    pub fn routing_json(&self) -> RoutingResponse {
        let routes = self.routes.load();
        let conns: BTreeMap<(String, String), ShardConnections> = self
            .shards
            .iter()
            .map(|(k, s)| {
                let table = lock(&s.table);
                let backends = table
                    .backends
                    .iter()
                    .map(|(alias, c)| BackendJson {
                        alias: alias.to_string(),
                        rw_open: c.rw,
                        ro_open: c.ro,
                    })
                    .collect();
                (
                    k.clone(),
                    ShardConnections {
                        listeners: Some(s.listeners.clone()),
                        held: s.held.load(Ordering::Acquire),
                        backends,
                    },
                )
            })
            .collect();
        crate::routing::routing_response(
            &routes,
            &self.settings.routing,
            &self.settings.proxy,
            self.held.load(Ordering::Acquire),
            &conns,
        )
    }

    /// Graceful shutdown: stop accepting (listeners close, held connections are refused),
    /// let open connections finish for up to `shutdown_grace`, then close the rest.
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        let grace = self.settings.shutdown_grace;
        info!(
            open = self.active(),
            grace = ?grace,
            "stopping: no new connections; open ones may finish"
        );
        let start = Instant::now();
        while self.active() > 0 && start.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.active();
        if left > 0 {
            warn!(
                open = left,
                "shutdown_grace over: closing the open connections"
            );
            for shard in self.shards.values() {
                for c in lock(&shard.table).conns.values() {
                    c.kill.kill("the gateway is shutting down".into());
                }
            }
            let start = Instant::now();
            while self.active() > 0 && start.elapsed() < Duration::from_secs(2) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        info!(left = self.active(), "proxy stopped");
        self.finished.send_replace(true);
    }
}

/// Resolves once `rx` is true (never if the sender is gone: it lives as long as the gateway).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        let stop = *rx.borrow_and_update();
        if stop {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The body of one proxy thread: thread 0 accepts on every listener; every thread runs the
/// connections handed to it, until the gateway has drained.
async fn proxy_thread(
    gw: Arc<Gateway>,
    index: usize,
    listeners: Vec<(ListenerSpec, std::net::TcpListener)>,
    mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
) {
    for (l, std_listener) in listeners {
        let Some(shard) = gw.shards.get(&(l.keyspace.clone(), l.shard.clone())) else {
            continue;
        };
        match TcpListener::from_std(std_listener) {
            Ok(sock) => {
                info!(keyspace = %l.keyspace, shard = %l.shard, port = l.port.as_str(), addr = %l.addr, "listening");
                tokio::spawn(accept_loop(gw.clone(), shard.clone(), l.port, sock));
            }
            Err(e) => {
                warn!(addr = %l.addr, error = %e, "cannot register the listener: this port is not served")
            }
        }
    }
    let mut finished = gw.finished.subscribe();
    loop {
        tokio::select! {
            Some(inc) = incoming.recv() => match TcpStream::from_std(inc.stream) {
                Ok(client) => {
                    tokio::spawn(handle(gw.clone(), inc.shard, inc.port, client, inc.peer, inc.guard));
                }
                Err(e) => warn!(thread = index, peer = %inc.peer, error = %e, "cannot take over a connection"),
            },
            _ = stopped(&mut finished) => break,
        }
    }
}

/// Moves an accepted connection to proxy thread `thread` (its socket is re-registered there).
fn hand_off(
    gw: &Gateway,
    thread: usize,
    shard: Arc<ShardConns>,
    port: Port,
    client: TcpStream,
    peer: SocketAddr,
    guard: ActiveGuard,
) {
    let stream = match client.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, error = %e, "cannot hand a connection over");
            return;
        }
    };
    let Some(tx) = gw.handoff.get().and_then(|h| h.get(thread)) else {
        debug!(%peer, thread, "proxy thread gone; connection dropped");
        return;
    };
    match tx.try_send(Incoming {
        shard,
        port,
        stream,
        peer,
        guard,
    }) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full(inc)) => {
            // Refused here, on the accepting thread, with the reason.
            if let Ok(mut client) = TcpStream::from_std(inc.stream) {
                let r = Refusal::overloaded(&inc.shard.key.0, &inc.shard.key.1, HANDOFF_QUEUE);
                tokio::spawn(async move {
                    let _guard = inc.guard;
                    refuse(&mut client, peer, port, &r).await;
                });
            }
        }
        // The thread is gone (shutting down): dropping the socket closes the connection.
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
            debug!(%peer, thread, "proxy thread gone; connection dropped");
        }
    }
}

async fn accept_loop(gw: Arc<Gateway>, shard: Arc<ShardConns>, port: Port, sock: TcpListener) {
    let mut stopping = gw.stopping.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stopping) => break,
            r = sock.accept() => match r {
                Ok((mut client, peer)) => {
                    let max = gw.settings.max_connections;
                    if gw.active.load(Ordering::Acquire) >= max {
                        let r = Refusal::max_connections(&shard.key.0, &shard.key.1, max);
                        tokio::spawn(async move { refuse(&mut client, peer, port, &r).await });
                        continue;
                    }
                    let thread = gw.least_loaded_thread();
                    let guard = ActiveGuard::new(&gw, thread);
                    if thread == 0 {
                        tokio::spawn(handle(gw.clone(), shard.clone(), port, client, peer, guard));
                    } else {
                        hand_off(&gw, thread, shard.clone(), port, client, peer, guard);
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!(keyspace = %shard.key.0, shard = %shard.key.1, port = port.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Dropping the socket closes the port: new connects are refused by the kernel.
    debug!(keyspace = %shard.key.0, shard = %shard.key.1, port = port.as_str(), "listener closed");
}

/// Sends the error packet at greeting position, then closes (after the client had a moment to
/// read it).
async fn refuse(client: &mut TcpStream, peer: SocketAddr, port: Port, r: &Refusal) {
    metrics::counter!("myha_gateway_refusals_total", "reason" => r.kind.as_str()).increment(1);
    debug!(%peer, port = port.as_str(), reason = r.kind.as_str(), message = %r.message, "refused");
    let pkt = mysql::err_packet(mysql::ER_UNKNOWN_ERROR, mysql::SQLSTATE_GENERAL, &r.message);
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        client.write_all(&pkt).await?;
        client.shutdown().await?;
        // Wait for the client's close rather than resetting a socket it has not read yet.
        let mut sink = [0u8; 256];
        while client.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

async fn handle(
    gw: Arc<Gateway>,
    shard: Arc<ShardConns>,
    port: Port,
    mut client: TcpStream,
    peer: SocketAddr,
    _active: ActiveGuard,
) {
    // Interactive protocol of small packets: never delay them.
    let _ = client.set_nodelay(true);
    let mut changed = gw.changed.subscribe();
    let mut stopping = gw.stopping.subscribe();
    let (ks, sh) = (&shard.key.0, &shard.key.1);
    let window = gw.settings.proxy.buffer_window;
    let mut held: Option<HeldGuard> = None;
    let mut exclude: Vec<String> = Vec::new();
    // Set when the last hold slot went to another connection between decision and hold.
    let mut no_room = false;
    let (routed, backend) = loop {
        if *stopping.borrow() {
            refuse(&mut client, peer, port, &Refusal::shutting_down(ks, sh)).await;
            return;
        }
        changed.borrow_and_update();
        let held_for = held.as_ref().map(|h| h.since.elapsed());
        let decision = gw.decide(&shard, port, held_for, gw.hold_room() && !no_room, &exclude);
        let routed = match decision {
            Decision::Refuse(r) => {
                refuse(&mut client, peer, port, &r).await;
                return;
            }
            Decision::Hold(why) => {
                if held.is_none() {
                    match gw.try_hold(&shard) {
                        Some(g) => {
                            debug!(%peer, keyspace = %ks, shard = %sh, port = port.as_str(), reason = %why, "holding");
                            held = Some(g);
                        }
                        None => {
                            // Raced with other holders to the last slot: decide again without
                            // room (the pure decision words the refusal, or routes if a target
                            // appeared meanwhile).
                            no_room = true;
                            continue;
                        }
                    }
                }
                let deadline = held
                    .as_ref()
                    .map_or_else(Instant::now, |h| h.since + window);
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = stopping.changed() => {}
                }
                continue;
            }
            Decision::Routed(r) => r,
        };
        let addr = routed.target.mysql_addr.as_str();
        let connect = tokio::time::timeout(gw.settings.connect_timeout, TcpStream::connect(addr));
        let error = match connect.await {
            Ok(Ok(s)) => break (routed, s),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {:?}", gw.settings.connect_timeout),
        };
        gw.unregister(&shard, routed.id);
        debug!(%peer, keyspace = %ks, shard = %sh, backend = %routed.target.alias, %error, "backend connect failed");
        match port {
            // Another replica, else the fallback (the pure choice skips what failed).
            Port::Ro => exclude.push(routed.target.alias.clone()),
            // The primary may be dying before the snapshot says so: retry within the window.
            Port::Rw => {
                let waited = held.as_ref().map_or(Duration::ZERO, |h| h.since.elapsed());
                if held.is_none() {
                    held = gw.try_hold(&shard);
                }
                if held.is_none() || waited >= window {
                    let r = Refusal::connect_failed(ks, sh, "primary", &routed.target, &error);
                    refuse(&mut client, peer, port, &r).await;
                    return;
                }
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep(RW_CONNECT_RETRY) => {}
                    _ = stopping.changed() => {}
                }
            }
        }
    };
    let held_ms = held.as_ref().map(|h| h.since.elapsed().as_millis());
    drop(held);
    let _ = backend.set_nodelay(true);
    let alias = routed.target.alias.clone();
    let labels = [
        ("keyspace", ks.clone()),
        ("shard", sh.clone()),
        ("role", port.as_str().to_string()),
        ("backend", alias.clone()),
    ];
    metrics::counter!("myha_gateway_connections_total", &labels).increment(1);
    let open = metrics::gauge!("myha_gateway_connections_open", &labels);
    open.increment(1.0);
    debug!(%peer, keyspace = %ks, shard = %sh, port = port.as_str(), role = ?routed.role, backend = %alias, held_ms, "routed");
    let (to_backend, to_client) = gw.meters.bytes(port);
    let outcome = splice(client, backend, to_backend, to_client, &routed.kill).await;
    open.decrement(1.0);
    gw.unregister(&shard, routed.id);
    match outcome {
        None => {
            debug!(%peer, backend = %alias, reason = %routed.kill.reason(), "closed by the gateway")
        }
        Some(Ok((up, down))) => debug!(%peer, backend = %alias, up, down, "connection done"),
        Some(Err(e)) => debug!(%peer, backend = %alias, error = %e, "connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that reads until EOF, then answers with the reversed input plus a tail, and
    /// closes: only a proxy that forwards the client's half-close lets it answer at all.
    async fn reverse_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut input = Vec::new();
                    s.read_to_end(&mut input).await.unwrap();
                    input.reverse();
                    s.write_all(&input).await.unwrap();
                    s.write_all(&vec![b'z'; 100_000]).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        addr
    }

    /// A proxy that splices every accepted client to `backend`.
    async fn splice_proxy(backend: SocketAddr, kill: Arc<KillSwitch>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let kill = kill.clone();
                tokio::spawn(async move {
                    let b = TcpStream::connect(backend).await.unwrap();
                    let r = splice(c, b, Counter::noop(), Counter::noop(), &kill).await;
                    if let Some(r) = r {
                        r.unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn half_close_is_forwarded_and_the_rest_of_the_reply_arrives() {
        let server = reverse_server().await;
        let proxy = splice_proxy(server, Arc::new(KillSwitch::default())).await;
        let mut c = TcpStream::connect(proxy).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        // Our write side closes; we still read everything the server sends after that.
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply))
            .await
            .expect("reply within 5 s")
            .unwrap();
        assert_eq!(&reply[..5], b"olleh");
        assert_eq!(reply.len(), 5 + 100_000);
    }

    #[tokio::test]
    async fn a_kill_closes_the_client_side() {
        // A backend that never answers nor closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut keep = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                keep.push(s);
            }
        });
        let kill = Arc::new(KillSwitch::default());
        let proxy = splice_proxy(server, kill.clone()).await;
        let mut c = TcpStream::connect(proxy).await.unwrap();
        c.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        kill.kill("test".into());
        assert_eq!(kill.reason(), "test");
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed within 5 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "EOF after the kill");
    }

    #[tokio::test]
    async fn killable_returns_the_output_when_not_killed() {
        let k = KillSwitch::default();
        assert_eq!(killable(async { 7 }, &k).await, Some(7));
        k.kill("x".into());
        assert_eq!(killable(async { 7 }, &k).await, None);
    }
}
