//! [`TabletWatch`]: the supervisor that follows etcd, owns one stream task per registered
//! tablet and publishes [`FleetSnapshot`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use topo::{PrefixWatch, QuarantineRecord, ShardRecord, TabletRecord, Topo};

use crate::snapshot::{FleetSnapshot, HealthSample, ShardView, StreamState, TabletView};
use crate::stream::{self, now_ms, Report};

/// Tuning of the health streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// Bound on connecting to an agent and on its answer to `StreamHealth`.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval on each agent connection (a frozen or partitioned agent is noticed
    /// after about this plus `connect_timeout`).
    pub keepalive_interval: Duration,
    /// A stream without any message for this long is dropped and reconnected. Must exceed the
    /// agents' `health_interval` (they push at least that often).
    pub idle_timeout: Duration,
    /// Reconnect backoff: doubles from `backoff_min` to `backoff_max`, reset by a message.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The daemon's certificates: agents are reached over TLS with them (`[tls]`).
    pub tls: Option<pki::Material>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// Registered tablets by alias.
pub type TabletMap = Arc<BTreeMap<String, TabletRecord>>;
/// Shard records by `(keyspace, shard)`.
pub type ShardMap = Arc<BTreeMap<(String, String), ShardRecord>>;
/// Quarantine records by alias.
pub type QuarantineMap = Arc<BTreeMap<String, QuarantineRecord>>;

/// Where [`TabletWatch`] learns the topology from. [`TabletWatch::start`] builds it from etcd;
/// tests can feed it by hand.
#[derive(Debug, Clone)]
pub struct TopoInputs {
    pub tablets: watch::Receiver<TabletMap>,
    pub shards: watch::Receiver<ShardMap>,
    /// True while the tablets input is current.
    pub tablets_synced: watch::Receiver<bool>,
    /// True while the shards input is current.
    pub shards_synced: watch::Receiver<bool>,
    pub quarantine: watch::Receiver<QuarantineMap>,
    /// True while the quarantine input is current.
    pub quarantine_synced: watch::Receiver<bool>,
}

impl TopoInputs {
    /// Resilient etcd watches (see [`Topo::watch_prefix`]) on `{p}/tablets/`, `{p}/shards/`
    /// and `{p}/quarantine/`. Undecodable records are logged and skipped.
    pub fn from_topo(topo: &Topo) -> TopoInputs {
        let keys = topo.keys().clone();
        let k = keys.clone();
        let (tablets, tablets_synced) = typed(
            topo.watch_prefix(&keys.tablets_prefix()),
            move |key, value| {
                let alias = k.parse_tablet_key(key)?;
                let rec: TabletRecord = decode_logged(key, value)?;
                if rec.alias != alias {
                    tracing::warn!(key, alias = %rec.alias, "tablet record names another alias; skipped");
                    return None;
                }
                Some((alias.to_string(), rec))
            },
        );
        let k = keys.clone();
        let (shards, shards_synced) = typed(
            topo.watch_prefix(&keys.all_shards_prefix()),
            move |key, value| {
                let (ks, shard) = k.parse_shard_key(key)?;
                let rec: ShardRecord = decode_logged(key, value)?;
                Some(((ks.to_string(), shard.to_string()), rec))
            },
        );
        let (quarantine, quarantine_synced) = topo.watch_quarantine();
        TopoInputs {
            tablets,
            shards,
            tablets_synced,
            shards_synced,
            quarantine,
            quarantine_synced,
        }
    }
}

fn decode_logged<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key, error = %e, "undecodable record skipped");
            None
        }
    }
}

/// Decodes a raw prefix watch into a typed map; runs until every receiver is dropped.
fn typed<K, V, F>(
    pw: PrefixWatch,
    decode: F,
) -> (watch::Receiver<Arc<BTreeMap<K, V>>>, watch::Receiver<bool>)
where
    K: Ord + Clone + Send + Sync + 'static,
    V: PartialEq + Clone + Send + Sync + 'static,
    F: Fn(&str, &[u8]) -> Option<(K, V)> + Send + 'static,
{
    let (tx, rx) = watch::channel(Arc::new(BTreeMap::new()));
    let synced = pw.synced();
    let mut content = pw.subscribe();
    tokio::spawn(async move {
        let _keep = pw;
        loop {
            let next: BTreeMap<K, V> = {
                let raw = content.borrow_and_update().clone();
                raw.iter().filter_map(|(k, v)| decode(k, v)).collect()
            };
            tx.send_if_modified(|cur| {
                if **cur != next {
                    *cur = Arc::new(next);
                    true
                } else {
                    false
                }
            });
            tokio::select! {
                _ = tx.closed() => return,
                changed = content.changed() => if changed.is_err() { return },
            }
        }
    });
    (rx, synced)
}

/// Aborts the task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows every tablet's health. Dropping it stops every task it started.
#[derive(Debug)]
pub struct TabletWatch {
    snapshots: watch::Receiver<Arc<FleetSnapshot>>,
    _task: AbortOnDrop,
}

impl TabletWatch {
    /// Starts following the tablets and shards of `topo`'s cluster (needs a tokio runtime).
    pub fn start(topo: &Topo, opts: WatchOptions) -> TabletWatch {
        TabletWatch::start_with(TopoInputs::from_topo(topo), opts)
    }

    /// Starts with the given topology inputs.
    pub fn start_with(inputs: TopoInputs, opts: WatchOptions) -> TabletWatch {
        describe_metrics();
        let (tx, snapshots) = watch::channel(Arc::new(FleetSnapshot::empty(Instant::now())));
        let task = tokio::spawn(supervise(inputs, opts, tx));
        TabletWatch {
            snapshots,
            _task: AbortOnDrop(task),
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// Follows the snapshots (each change is a new `Arc`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<FleetSnapshot>> {
        self.snapshots.clone()
    }

    /// Waits until a snapshot satisfies `pred` and returns it; `None` if `timeout` passes
    /// first.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&FleetSnapshot) -> bool,
    ) -> Option<Arc<FleetSnapshot>> {
        let mut rx = self.snapshots.clone();
        let wait = async {
            loop {
                let snap = rx.borrow_and_update().clone();
                if pred(&snap) {
                    return Some(snap);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "myha_tabletwatch_health_messages_total",
        "Health messages received from agents' StreamHealth, per tablet"
    );
    metrics::describe_counter!(
        "myha_tabletwatch_stream_reconnects_total",
        "StreamHealth subscriptions that broke or failed to start (each is followed by a retry), per tablet"
    );
    metrics::describe_gauge!("myha_tabletwatch_tablets", "Registered tablets followed");
    metrics::describe_gauge!(
        "myha_tabletwatch_streams_connected",
        "Tablets with an established health stream"
    );
    metrics::describe_gauge!(
        "myha_tabletwatch_topo_synced",
        "1 while the etcd watches are current"
    );
}

/// One followed tablet.
struct Entry {
    record: Arc<TabletRecord>,
    generation: u64,
    last_health: Option<Arc<HealthSample>>,
    stream: StreamState,
    _task: AbortOnDrop,
}

struct Supervisor {
    opts: WatchOptions,
    tablets: BTreeMap<String, Entry>,
    shards: BTreeMap<(String, String), Arc<ShardRecord>>,
    quarantine: BTreeMap<String, Arc<QuarantineRecord>>,
    next_generation: u64,
    reports: mpsc::Sender<Report>,
    version: u64,
    /// The views of the last snapshot.
    views: BTreeMap<ShardKey, Arc<ShardView>>,
    /// The aliases registered per shard (rebuilt with every full build).
    by_shard: BTreeMap<ShardKey, Vec<String>>,
    /// Shards whose tablets' health or stream changed since the last build.
    dirty: BTreeSet<ShardKey>,
    /// Every shard must be built again (a registration, record or quarantine changed).
    all_dirty: bool,
}

type ShardKey = (String, String);

impl Supervisor {
    fn new(opts: WatchOptions, reports: mpsc::Sender<Report>) -> Supervisor {
        Supervisor {
            opts,
            tablets: BTreeMap::new(),
            shards: BTreeMap::new(),
            quarantine: BTreeMap::new(),
            next_generation: 0,
            reports,
            version: 0,
            views: BTreeMap::new(),
            by_shard: BTreeMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
        }
    }

    fn spawn_stream(&mut self, rec: &TabletRecord) -> (u64, AbortOnDrop) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let task = tokio::spawn(stream::run(
            rec.alias.clone(),
            rec.grpc_addr.clone(),
            generation,
            self.reports.clone(),
            self.opts.clone(),
        ));
        (generation, AbortOnDrop(task))
    }

    /// Follows new registrations, drops removed ones, restarts the stream of a tablet whose
    /// gRPC address changed. Returns whether anything changed.
    fn apply_tablets(&mut self, map: &BTreeMap<String, TabletRecord>) -> bool {
        let before = self.tablets.len();
        self.tablets.retain(|alias, _| {
            let keep = map.contains_key(alias);
            if !keep {
                tracing::info!(tablet = %alias, "tablet deregistered; health stream dropped");
            }
            keep
        });
        let mut changed = before != self.tablets.len();
        for (alias, rec) in map {
            match self.tablets.get(alias) {
                Some(e) if *e.record == *rec => {}
                Some(e) if e.record.grpc_addr == rec.grpc_addr => {
                    let record = Arc::new(rec.clone());
                    if let Some(e) = self.tablets.get_mut(alias) {
                        e.record = record;
                    }
                    changed = true;
                }
                existing => {
                    let moved = existing.map(|e| e.record.grpc_addr.clone());
                    let last_health = existing.and_then(|e| e.last_health.clone());
                    match &moved {
                        Some(old) => {
                            tracing::info!(tablet = %alias, from = %old, to = %rec.grpc_addr, "agent address changed; resubscribing")
                        }
                        None => {
                            tracing::info!(tablet = %alias, addr = %rec.grpc_addr, "tablet registered; subscribing to its health")
                        }
                    }
                    let (generation, task) = self.spawn_stream(rec);
                    let entry = Entry {
                        record: Arc::new(rec.clone()),
                        generation,
                        last_health,
                        stream: StreamState::Connecting {
                            since: Instant::now(),
                            since_ms: now_ms(),
                            failures: 0,
                            last_error: None,
                        },
                        _task: task,
                    };
                    self.tablets.insert(alias.clone(), entry);
                    changed = true;
                }
            }
        }
        changed
    }

    fn apply_shards(&mut self, map: &BTreeMap<(String, String), ShardRecord>) -> bool {
        let next: BTreeMap<(String, String), Arc<ShardRecord>> = map
            .iter()
            .map(|(k, v)| match self.shards.get(k) {
                Some(old) if **old == *v => (k.clone(), old.clone()),
                _ => (k.clone(), Arc::new(v.clone())),
            })
            .collect();
        let changed = next != self.shards;
        self.shards = next;
        changed
    }

    fn apply_quarantine(&mut self, map: &BTreeMap<String, QuarantineRecord>) -> bool {
        let next: BTreeMap<String, Arc<QuarantineRecord>> = map
            .iter()
            .map(|(k, v)| match self.quarantine.get(k) {
                Some(old) if **old == *v => (k.clone(), old.clone()),
                _ => (k.clone(), Arc::new(v.clone())),
            })
            .collect();
        let changed = next != self.quarantine;
        self.quarantine = next;
        changed
    }

    /// Applies a stream task's report; returns whether anything changed.
    fn apply_report(&mut self, report: Report) -> bool {
        match report {
            Report::Health {
                alias,
                generation,
                sample,
            } => match self.tablets.get_mut(&alias) {
                Some(e) if e.generation == generation => {
                    e.last_health = Some(sample);
                    self.mark(&alias);
                    true
                }
                _ => false,
            },
            Report::State {
                alias,
                generation,
                state,
            } => match self.tablets.get_mut(&alias) {
                Some(e) if e.generation == generation => {
                    e.stream = state;
                    self.mark(&alias);
                    true
                }
                _ => false,
            },
        }
    }

    /// The snapshot of now. Only the shards marked dirty since the last build are built again
    /// (all of them after a registration, record or quarantine change, keeping the `Arc` of
    /// every shard that came out equal); the others keep their `Arc` (see
    /// [`FleetSnapshot::shards`]).
    fn build(&mut self, topo_synced: bool) -> FleetSnapshot {
        self.version += 1;
        if self.all_dirty {
            self.by_shard.clear();
            for (alias, e) in &self.tablets {
                self.by_shard
                    .entry((e.record.keyspace.clone(), e.record.shard.clone()))
                    .or_default()
                    .push(alias.clone());
            }
            let keys: BTreeSet<ShardKey> = self
                .shards
                .keys()
                .chain(self.by_shard.keys())
                .cloned()
                .collect();
            let mut views = BTreeMap::new();
            for key in keys {
                let Some(view) = self.shard_view(&key) else {
                    continue;
                };
                let view = match self.views.get(&key) {
                    Some(old) if **old == view => old.clone(),
                    _ => Arc::new(view),
                };
                views.insert(key, view);
            }
            self.views = views;
        } else {
            for key in std::mem::take(&mut self.dirty) {
                match self.shard_view(&key) {
                    Some(view) => {
                        self.views.insert(key, Arc::new(view));
                    }
                    None => {
                        self.views.remove(&key);
                    }
                }
            }
        }
        self.all_dirty = false;
        self.dirty.clear();
        let connected = self
            .tablets
            .values()
            .filter(|e| e.stream.is_connected())
            .count();
        metrics::gauge!("myha_tabletwatch_tablets").set(self.tablets.len() as f64);
        metrics::gauge!("myha_tabletwatch_streams_connected").set(connected as f64);
        metrics::gauge!("myha_tabletwatch_topo_synced").set(if topo_synced { 1.0 } else { 0.0 });
        FleetSnapshot {
            version: self.version,
            taken_at: Instant::now(),
            topo_synced,
            shards: self.views.clone(),
        }
    }

    /// One shard's view from the current state (`by_shard` must be current); `None` when the
    /// shard has neither a record nor a registered tablet.
    fn shard_view(&self, key: &ShardKey) -> Option<ShardView> {
        let record = self.shards.get(key).cloned();
        let aliases = self.by_shard.get(key);
        if record.is_none() && aliases.is_none_or(Vec::is_empty) {
            return None;
        }
        let tablets = aliases
            .into_iter()
            .flatten()
            .filter_map(|alias| {
                let e = self.tablets.get(alias)?;
                Some((
                    alias.clone(),
                    TabletView {
                        record: e.record.clone(),
                        last_health: e.last_health.clone(),
                        stream: e.stream.clone(),
                        quarantine: self.quarantine.get(alias).cloned(),
                    },
                ))
            })
            .collect();
        Some(ShardView {
            keyspace: key.0.clone(),
            shard: key.1.clone(),
            record,
            tablets,
        })
    }

    /// Marks the shard of `alias` to be built again.
    fn mark(&mut self, alias: &str) {
        if let Some(e) = self.tablets.get(alias) {
            self.dirty
                .insert((e.record.keyspace.clone(), e.record.shard.clone()));
        }
    }
}

/// `rx.changed()`, or never once the sender is gone (so a `select!` does not spin).
async fn changed<T>(rx: &mut watch::Receiver<T>, open: &mut bool) {
    if *open && rx.changed().await.is_ok() {
        return;
    }
    *open = false;
    std::future::pending::<()>().await
}

async fn supervise(
    mut inputs: TopoInputs,
    opts: WatchOptions,
    out: watch::Sender<Arc<FleetSnapshot>>,
) {
    let (reports, mut report_rx) = mpsc::channel::<Report>(1024);
    let mut sup = Supervisor::new(opts, reports);
    let (mut t_open, mut s_open, mut ts_open, mut ss_open) = (true, true, true, true);
    let (mut q_open, mut qs_open) = (true, true);
    let mut last_synced = None;
    let mut reported = false;
    loop {
        let tablets = inputs.tablets.borrow_and_update().clone();
        let shards = inputs.shards.borrow_and_update().clone();
        let quarantine = inputs.quarantine.borrow_and_update().clone();
        let mut dirty = std::mem::take(&mut reported);
        let mut topo_changed = sup.apply_tablets(&tablets);
        topo_changed |= sup.apply_shards(&shards);
        topo_changed |= sup.apply_quarantine(&quarantine);
        // Registrations, records and quarantines change rarely: every shard is built again
        // (keeping the `Arc` of those that come out equal).
        sup.all_dirty |= topo_changed;
        dirty |= topo_changed;
        // Every input is read (no short-circuit) so that each change notification is consumed.
        let synced = [
            *inputs.tablets_synced.borrow_and_update(),
            *inputs.shards_synced.borrow_and_update(),
            *inputs.quarantine_synced.borrow_and_update(),
        ]
        .iter()
        .all(|s| *s);
        if last_synced != Some(synced) {
            if last_synced.is_some() {
                if synced {
                    tracing::info!("etcd watches current again");
                } else {
                    tracing::warn!(
                        "etcd watches interrupted; registrations, shard records and quarantines may be stale"
                    );
                }
            }
            last_synced = Some(synced);
            dirty = true;
        }
        // Fold in every report already queued, then publish once.
        while let Ok(r) = report_rx.try_recv() {
            dirty |= sup.apply_report(r);
        }
        if dirty {
            out.send_replace(Arc::new(sup.build(synced)));
        }
        tokio::select! {
            _ = out.closed() => return,
            _ = changed(&mut inputs.tablets, &mut t_open) => {}
            _ = changed(&mut inputs.shards, &mut s_open) => {}
            _ = changed(&mut inputs.tablets_synced, &mut ts_open) => {}
            _ = changed(&mut inputs.shards_synced, &mut ss_open) => {}
            _ = changed(&mut inputs.quarantine, &mut q_open) => {}
            _ = changed(&mut inputs.quarantine_synced, &mut qs_open) => {}
            r = report_rx.recv() => match r {
                Some(r) => reported = sup.apply_report(r),
                // Never: the supervisor holds a sender.
                None => std::future::pending::<()>().await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{primary_health, shard_record, tablet_record};

    fn key(shard: &str) -> ShardKey {
        ("ks".to_string(), shard.to_string())
    }

    fn supervisor() -> Supervisor {
        let (reports, _) = mpsc::channel(16);
        Supervisor::new(WatchOptions::default(), reports)
    }

    fn registered(aliases: &[(&str, &str)]) -> BTreeMap<String, TabletRecord> {
        aliases
            .iter()
            .map(|(a, shard)| {
                let mut r = tablet_record(a, "ks", shard);
                // Nothing listens there: the streams never deliver anything by themselves.
                r.grpc_addr = "127.0.0.1:1".into();
                (a.to_string(), r)
            })
            .collect()
    }

    fn health(sup: &mut Supervisor, alias: &str, term: u64) -> bool {
        let generation = sup.tablets.get(alias).map_or(0, |e| e.generation);
        sup.apply_report(Report::Health {
            alias: alias.into(),
            generation,
            sample: Arc::new(HealthSample {
                health: Arc::new(primary_health(alias, term)),
                received_at: Instant::now(),
                received_ms: 1,
            }),
        })
    }

    /// A snapshot rebuilds only the shards whose inputs changed; the others keep their `Arc`
    /// (the engine skips them by pointer), and a rebuilt shard shows the new state.
    #[tokio::test]
    async fn only_changed_shards_are_rebuilt() {
        let mut sup = supervisor();
        sup.apply_tablets(&registered(&[("z-1", "0"), ("z-2", "0"), ("z-3", "1")]));
        sup.apply_shards(
            &[
                (key("0"), shard_record("ks", "0", Some("z-1"), 1)),
                (key("1"), shard_record("ks", "1", Some("z-3"), 1)),
            ]
            .into(),
        );
        let s1 = sup.build(true);
        assert_eq!(s1.shards.len(), 2);
        assert_eq!(s1.shards[&key("0")].tablets.len(), 2);

        // Nothing changed: both shards are the same allocation.
        let s2 = sup.build(true);
        for k in [key("0"), key("1")] {
            assert!(Arc::ptr_eq(&s1.shards[&k], &s2.shards[&k]), "{k:?}");
        }

        // A health message for z-2 rebuilds shard 0 only, with the health in it.
        assert!(health(&mut sup, "z-2", 1));
        let s3 = sup.build(true);
        assert!(!Arc::ptr_eq(&s2.shards[&key("0")], &s3.shards[&key("0")]));
        assert!(Arc::ptr_eq(&s2.shards[&key("1")], &s3.shards[&key("1")]));
        assert!(s3.shards[&key("0")].tablets["z-2"].last_health.is_some());
        assert!(s3.shards[&key("1")].tablets["z-3"].last_health.is_none());

        // A stale generation's report changes nothing.
        let stale = sup.apply_report(Report::Health {
            alias: "z-3".into(),
            generation: 999,
            sample: Arc::new(HealthSample {
                health: Arc::new(primary_health("z-3", 1)),
                received_at: Instant::now(),
                received_ms: 1,
            }),
        });
        assert!(!stale);

        // A record change rebuilds everything, keeping the Arc of each shard that came out
        // equal: shard 0 is the same, shard 1 shows its new term.
        sup.all_dirty |= sup.apply_shards(
            &[
                (key("0"), shard_record("ks", "0", Some("z-1"), 1)),
                (key("1"), shard_record("ks", "1", Some("z-3"), 2)),
            ]
            .into(),
        );
        let s4 = sup.build(true);
        assert!(Arc::ptr_eq(&s3.shards[&key("0")], &s4.shards[&key("0")]));
        assert_eq!(s4.shards[&key("1")].term(), topo::Term::new(2));

        // A tablet moving to another shard, and a shard losing its record and tablets.
        sup.all_dirty |= sup.apply_tablets(&registered(&[("z-1", "0"), ("z-2", "1")]));
        sup.all_dirty |=
            sup.apply_shards(&[(key("0"), shard_record("ks", "0", Some("z-1"), 1))].into());
        let s5 = sup.build(true);
        assert_eq!(
            s5.shards[&key("0")].tablets.keys().collect::<Vec<_>>(),
            ["z-1"]
        );
        assert_eq!(
            s5.shards[&key("1")].tablets.keys().collect::<Vec<_>>(),
            ["z-2"],
            "shard 1 has a tablet but no record"
        );
        assert!(s5.shards[&key("1")].record.is_none());
        sup.all_dirty |= sup.apply_tablets(&registered(&[("z-1", "0")]));
        let s6 = sup.build(true);
        assert_eq!(s6.shards.keys().collect::<Vec<_>>(), [&key("0")]);
    }
}
