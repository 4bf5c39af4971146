//! An in-memory model of etcd as myha's `topo` crate uses it: one linearizable key-value store
//! with a global revision, leases, transactions, prefix watches and compaction, plus
//! [`ShardLockRecipe`], the shard lock recipe of `topo/src/lock.rs` on top of it.
//!
//! # Shape (sans-IO)
//!
//! One [`Etcd`] is the whole cluster seen as a single linearizable server. Every entry point
//! takes an explicit `now` and is atomic at that instant; the store never reads a clock.
//! Either call the methods directly or send a [`Request`] through [`Etcd::handle`] (what a
//! driver does when it puts the network model in front). Watch events are queued as
//! [`Output`]s and taken with [`Etcd::poll_output`] / [`Etcd::drain_outputs`]. Lease expiry is
//! the only timer: [`Etcd::poll_timeout`] reports the next one and [`Etcd::handle_timeout`]
//! fires it; every other entry point fires the expiries due by its `now` first, each at its own
//! deadline, so a keep-alive that comes too late fails whether or not the driver fired the
//! timer.
//!
//! # Semantics kept from etcd
//!
//! - The revision starts at 1 (an empty store) and grows by exactly one per request that
//!   changes something: a put, a delete of an existing key, a transaction whose chosen branch
//!   writes, a lease revocation or expiry that deletes keys. A request that changes nothing
//!   (deleting a missing key, a read-only transaction) does not move it.
//! - Per key: `create_revision` (revision of the put that created it), `mod_revision` (of the
//!   last put), `version` (puts since creation, 1 for a new key), value bytes and an optional
//!   lease. A put without a lease detaches the key from its lease, as etcd's put does without
//!   `ignore_lease`.
//! - Transactions compare `create_revision`, `mod_revision`, `version`, `value` or `lease` with
//!   `=`, `!=`, `<`, `>`. A missing key compares as revisions, version and lease 0; a `value`
//!   compare on a missing key is always false (etcd cannot represent a missing value). Ops of
//!   the chosen branch apply in order at one revision, a get seeing earlier puts of the same
//!   branch. A branch writing one key twice, or putting under an unknown lease, is refused
//!   before anything applies.
//! - Leases: the TTL is rounded up to whole seconds and raised to the configured minimum (etcd's
//!   default minimum is 2 s with the default election timeout). A lease expires at exactly its
//!   deadline: a keep-alive at or after it fails with [`EtcdError::LeaseNotFound`]. Expiry and
//!   revocation delete the attached keys in one revision.
//! - Watches cover one key or a prefix, start at a revision (0: the next one), and get every
//!   event of every revision from there, in revision order, one [`Output::Watch`] per revision
//!   (a transaction's events in op order). Starting below the compaction floor fails with
//!   [`EtcdError::Compacted`], as etcd cancels such a watch with its compact revision. A
//!   watch is never interrupted once created (no slow-watcher drop, no leader change).
//!
//! # Not modelled
//!
//! Cluster membership, leader elections (etcd extends every lease's deadline on a new leader)
//! and an unavailable cluster (put the network model in front and cut it instead); historical
//! reads (`get` at a revision); range options (limit, sort, `max_create_revision`: the lock
//! recipe filters a full range client-side, which is equivalent on a linearizable store);
//! `prev_kv` on watch events; watch progress notifications and fragmentation; lease expiry
//! slack (etcd checks expiries every 500 ms); keys are UTF-8 strings, as every key myha writes.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::SimTime;

/// A store revision (etcd's `int64`).
pub type Revision = i64;
/// A lease id; never 0 (etcd's "no lease").
pub type LeaseId = i64;
/// Identifies one watch for the whole run.
pub type WatchId = u64;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watch sees it. For a put, `kv` is the key as written; for a delete, as
/// etcd reports a tombstone: the key, `mod_revision` = the deleting revision, everything else
/// empty or 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

impl Event {
    /// The revision this change happened at.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The keys a range read or a watch covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRange {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this prefix (give it a trailing `/`); `""` is every key.
    Prefix(String),
}

impl KeyRange {
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeyRange::Key(k) => k == key,
            KeyRange::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CompareOp {
    fn holds<T: Ord + ?Sized>(self, actual: &T, expected: &T) -> bool {
        match self {
            CompareOp::Equal => actual == expected,
            CompareOp::NotEqual => actual != expected,
            CompareOp::Less => actual < expected,
            CompareOp::Greater => actual > expected,
        }
    }
}

/// What a [`Compare`] looks at, with the value it is compared against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CompareTarget {
    CreateRevision(Revision),
    ModRevision(Revision),
    Version(i64),
    Value(Vec<u8>),
    /// The key's lease id (0: no lease, or no key).
    Lease(LeaseId),
}

/// One condition of a [`Txn`]: `key`'s target `op` the given value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn create_revision(key: impl Into<String>, op: CompareOp, rev: Revision) -> Compare {
        Compare::new(key, op, CompareTarget::CreateRevision(rev))
    }

    pub fn mod_revision(key: impl Into<String>, op: CompareOp, rev: Revision) -> Compare {
        Compare::new(key, op, CompareTarget::ModRevision(rev))
    }

    pub fn version(key: impl Into<String>, op: CompareOp, version: i64) -> Compare {
        Compare::new(key, op, CompareTarget::Version(version))
    }

    pub fn value(key: impl Into<String>, op: CompareOp, value: impl Into<Vec<u8>>) -> Compare {
        Compare::new(key, op, CompareTarget::Value(value.into()))
    }

    pub fn lease(key: impl Into<String>, op: CompareOp, lease: LeaseId) -> Compare {
        Compare::new(key, op, CompareTarget::Lease(lease))
    }

    fn new(key: impl Into<String>, op: CompareOp, target: CompareTarget) -> Compare {
        Compare {
            key: key.into(),
            op,
            target,
        }
    }

    fn holds(&self, kv: Option<&KeyValue>) -> bool {
        let (create, modr, version, lease) = kv.map_or((0, 0, 0, 0), |kv| {
            (
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv.lease.unwrap_or(0),
            )
        });
        match &self.target {
            CompareTarget::CreateRevision(r) => self.op.holds(&create, r),
            CompareTarget::ModRevision(r) => self.op.holds(&modr, r),
            CompareTarget::Version(v) => self.op.holds(&version, v),
            CompareTarget::Lease(l) => self.op.holds(&lease, l),
            // etcd: a value compare on a missing key always fails.
            CompareTarget::Value(v) => kv.is_some_and(|kv| self.op.holds(kv.value.as_slice(), v)),
        }
    }
}

/// One operation of a [`Txn`] branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> TxnOp {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn get(key: impl Into<String>) -> TxnOp {
        TxnOp::Get { key: key.into() }
    }

    pub fn delete(key: impl Into<String>) -> TxnOp {
        TxnOp::Delete { key: key.into() }
    }

    fn written_key(&self) -> Option<&str> {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => Some(key),
            TxnOp::Get { .. } => None,
        }
    }
}

/// `if all(compares) then success else failure`, atomically.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Txn {
        self.compares.extend(compares);
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Txn {
        self.success.extend(ops);
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Txn {
        self.failure.extend(ops);
        self
    }
}

/// The result of one [`TxnOp`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpResponse {
    /// `prev`: the key before the put.
    Put {
        prev: Option<KeyValue>,
    },
    Get(Option<KeyValue>),
    /// `prev`: the key deleted, None if it did not exist.
    Delete {
        prev: Option<KeyValue>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxnResponse {
    /// Whether every compare held (the success branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction (its own revision if it wrote).
    pub revision: Revision,
    /// One per op of the branch that ran, in order.
    pub responses: Vec<OpResponse>,
}

impl TxnResponse {
    /// The key-values the branch's gets returned (what `topo`'s `txn_kvs` reads).
    pub fn kvs(&self) -> Vec<&KeyValue> {
        self.responses
            .iter()
            .filter_map(|r| match r {
                OpResponse::Get(kv) => kv.as_ref(),
                OpResponse::Put { .. } | OpResponse::Delete { .. } => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PutResponse {
    pub revision: Revision,
    pub prev: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeleteResponse {
    pub revision: Revision,
    pub prev: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GetResponse {
    pub revision: Revision,
    pub kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RangeResponse {
    pub revision: Revision,
    /// Sorted by key.
    pub kvs: Vec<KeyValue>,
}

/// A granted or renewed lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL granted (whole seconds, at least the minimum).
    pub ttl: Duration,
}

/// A refused request. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: requested lease not found (lease {0:x})")]
    LeaseNotFound(LeaseId),
    #[error(
        "mvcc: required revision has been compacted (requested {requested}, compacted at {compact_revision})"
    )]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error(
        "mvcc: required revision is a future revision (requested {requested}, current {current})"
    )]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("etcdserver: duplicate key given in txn request ({0})")]
    DuplicateKey(String),
}

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EtcdConfig {
    /// Leases are granted at least this TTL (rounded up to whole seconds).
    pub min_lease_ttl: Duration,
}

impl Default for EtcdConfig {
    /// etcd's defaults: 100 ms heartbeat, 1 s election timeout, so a 2 s minimum TTL.
    fn default() -> EtcdConfig {
        EtcdConfig {
            min_lease_ttl: Duration::from_secs(2),
        }
    }
}

/// What the store emits on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// The events of one revision that fall in the watch's range (never empty).
    Watch {
        watch: WatchId,
        revision: Revision,
        events: Vec<Event>,
    },
}

/// A request, for a driver that carries requests over the network model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Request {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Get {
        key: String,
    },
    Range {
        range: KeyRange,
    },
    Delete {
        key: String,
    },
    Txn(Txn),
    Grant {
        ttl: Duration,
    },
    KeepAlive {
        lease: LeaseId,
    },
    Revoke {
        lease: LeaseId,
    },
    Watch {
        range: KeyRange,
        start_revision: Revision,
    },
    CancelWatch {
        watch: WatchId,
    },
    Compact {
        revision: Revision,
    },
}

/// The answer to a [`Request`] of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Response {
    Put(PutResponse),
    Get(GetResponse),
    Range(RangeResponse),
    Delete(DeleteResponse),
    Txn(TxnResponse),
    /// To `Grant` and `KeepAlive`.
    Lease(Lease),
    /// To `Revoke`: the revision after it.
    Revoked(Revision),
    Watch(WatchId),
    /// To `CancelWatch`: whether the watch existed.
    WatchCanceled(bool),
    /// To `Compact`.
    Compacted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseState {
    ttl: Duration,
    expires_at: SimTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Watcher {
    range: KeyRange,
    /// Events below this revision are not for this watch (a watch may start in the future).
    start: Revision,
}

/// The etcd cluster as one linearizable store. See the module documentation.
#[derive(Debug, Clone)]
pub struct Etcd {
    config: EtcdConfig,
    /// The latest instant processed; never decreases.
    now: SimTime,
    /// The store revision. Invariant: every key's `mod_revision` is at most this, and the last
    /// history entry (if any) is at this revision.
    revision: Revision,
    /// The compaction floor: history below it is gone. 0 until the first compaction.
    compact_revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// Every event at or above `compact_revision`, in revision order (op order within one).
    history: Vec<Event>,
    /// Invariant: every key's lease is in here (a lease's removal deletes its keys).
    leases: BTreeMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    watches: BTreeMap<WatchId, Watcher>,
    next_watch: WatchId,
    outputs: VecDeque<Output>,
}

impl Etcd {
    /// An empty store at revision 1, at `now`.
    pub fn new(config: EtcdConfig, now: SimTime) -> Etcd {
        Etcd {
            config,
            now,
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            history: Vec::new(),
            leases: BTreeMap::new(),
            next_lease: 1,
            watches: BTreeMap::new(),
            next_watch: 0,
            outputs: VecDeque::new(),
        }
    }

    /// The current revision (no timers fired).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The compaction floor (0: never compacted).
    pub fn compact_revision(&self) -> Revision {
        self.compact_revision
    }

    // ----- Driving -----

    /// Serves one request at `now` (after firing the expiries due by then).
    pub fn handle(&mut self, request: Request, now: SimTime) -> Result<Response, EtcdError> {
        Ok(match request {
            Request::Put { key, value, lease } => Response::Put(self.put(key, value, lease, now)?),
            Request::Get { key } => Response::Get(self.get(&key, now)),
            Request::Range { range } => Response::Range(self.range(&range, now)),
            Request::Delete { key } => Response::Delete(self.delete(&key, now)),
            Request::Txn(txn) => Response::Txn(self.txn(txn, now)?),
            Request::Grant { ttl } => Response::Lease(self.grant(ttl, now)),
            Request::KeepAlive { lease } => Response::Lease(self.keep_alive(lease, now)?),
            Request::Revoke { lease } => Response::Revoked(self.revoke(lease, now)?),
            Request::Watch {
                range,
                start_revision,
            } => Response::Watch(self.watch(range, start_revision, now)?),
            Request::CancelWatch { watch } => Response::WatchCanceled(self.cancel_watch(watch)),
            Request::Compact { revision } => {
                self.compact(revision, now)?;
                Response::Compacted
            }
        })
    }

    /// The next lease expiry; None when no lease is alive.
    pub fn poll_timeout(&self) -> Option<SimTime> {
        self.leases.values().map(|l| l.expires_at).min()
    }

    /// Expires every lease due by `now`.
    pub fn handle_timeout(&mut self, now: SimTime) {
        self.advance(now);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub fn drain_outputs(&mut self) -> Vec<Output> {
        self.outputs.drain(..).collect()
    }

    // ----- KV -----

    pub fn put(
        &mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: Option<LeaseId>,
        now: SimTime,
    ) -> Result<PutResponse, EtcdError> {
        let resp = self.txn(Txn::new().and_then([TxnOp::put(key, value, lease)]), now)?;
        let prev = match resp.responses.into_iter().next() {
            Some(OpResponse::Put { prev }) => prev,
            _ => None,
        };
        Ok(PutResponse {
            revision: resp.revision,
            prev,
        })
    }

    pub fn get(&mut self, key: &str, now: SimTime) -> GetResponse {
        self.advance(now);
        GetResponse {
            revision: self.revision,
            kv: self.kvs.get(key).cloned(),
        }
    }

    pub fn range(&mut self, range: &KeyRange, now: SimTime) -> RangeResponse {
        self.advance(now);
        let kvs = match range {
            KeyRange::Key(k) => self.kvs.get(k).cloned().into_iter().collect(),
            KeyRange::Prefix(p) => self
                .kvs
                .range::<str, _>((
                    std::ops::Bound::Included(p.as_str()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(p.as_str()))
                .map(|(_, kv)| kv.clone())
                .collect(),
        };
        RangeResponse {
            revision: self.revision,
            kvs,
        }
    }

    /// Deletes one key (a missing key changes nothing, not even the revision).
    pub fn delete(&mut self, key: &str, now: SimTime) -> DeleteResponse {
        self.advance(now);
        let responses = self.commit(&[TxnOp::delete(key)]);
        let prev = match responses.into_iter().next() {
            Some(OpResponse::Delete { prev }) => prev,
            _ => None,
        };
        DeleteResponse {
            revision: self.revision,
            prev,
        }
    }

    /// Runs a transaction atomically at `now`.
    pub fn txn(&mut self, txn: Txn, now: SimTime) -> Result<TxnResponse, EtcdError> {
        self.advance(now);
        let succeeded = txn.compares.iter().all(|c| c.holds(self.kvs.get(&c.key)));
        let ops = if succeeded { txn.success } else { txn.failure };
        // Refuse before applying anything, so an error changes nothing.
        let mut written = BTreeSet::new();
        for op in &ops {
            if let Some(key) = op.written_key() {
                if !written.insert(key) {
                    return Err(EtcdError::DuplicateKey(key.to_string()));
                }
            }
            if let TxnOp::Put {
                lease: Some(id), ..
            } = op
            {
                if !self.leases.contains_key(id) {
                    return Err(EtcdError::LeaseNotFound(*id));
                }
            }
        }
        let responses = self.commit(&ops);
        Ok(TxnResponse {
            succeeded,
            revision: self.revision,
            responses,
        })
    }

    /// Applies validated ops in order at the next revision; the revision moves only if
    /// something changed. Emits the watch events.
    fn commit(&mut self, ops: &[TxnOp]) -> Vec<OpResponse> {
        let rev = self.revision + 1;
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Get { key } => responses.push(OpResponse::Get(self.kvs.get(key).cloned())),
                TxnOp::Put { key, value, lease } => {
                    let prev = self.kvs.get(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    self.kvs.insert(key.clone(), kv.clone());
                    events.push(Event {
                        kind: EventKind::Put,
                        kv,
                    });
                    responses.push(OpResponse::Put { prev });
                }
                TxnOp::Delete { key } => {
                    let prev = self.kvs.remove(key);
                    if prev.is_some() {
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: tombstone(key, rev),
                        });
                    }
                    responses.push(OpResponse::Delete { prev });
                }
            }
        }
        if !events.is_empty() {
            self.revision = rev;
            self.notify(rev, &events);
            self.history.extend(events);
        }
        responses
    }

    fn notify(&mut self, rev: Revision, events: &[Event]) {
        for (&id, w) in &self.watches {
            if rev < w.start {
                continue;
            }
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| w.range.contains(&e.kv.key))
                .cloned()
                .collect();
            if !mine.is_empty() {
                self.outputs.push_back(Output::Watch {
                    watch: id,
                    revision: rev,
                    events: mine,
                });
            }
        }
    }

    /// Drops the history below `revision`: watches can no longer start there.
    pub fn compact(&mut self, revision: Revision, now: SimTime) -> Result<(), EtcdError> {
        self.advance(now);
        if revision <= self.compact_revision {
            return Err(EtcdError::Compacted {
                requested: revision,
                compact_revision: self.compact_revision,
            });
        }
        if revision > self.revision {
            return Err(EtcdError::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        self.compact_revision = revision;
        self.history.retain(|e| e.revision() >= revision);
        Ok(())
    }

    // ----- Watches -----

    /// Watches `range` from `start_revision` (0: the next revision). The events of past
    /// revisions are queued at once, then each new revision's as it commits.
    pub fn watch(
        &mut self,
        range: KeyRange,
        start_revision: Revision,
        now: SimTime,
    ) -> Result<WatchId, EtcdError> {
        self.advance(now);
        let start = if start_revision <= 0 {
            self.revision + 1
        } else {
            start_revision
        };
        if start < self.compact_revision {
            return Err(EtcdError::Compacted {
                requested: start,
                compact_revision: self.compact_revision,
            });
        }
        let id = self.next_watch;
        self.next_watch += 1;
        // Replay, one output per revision.
        let mut pending: Option<(Revision, Vec<Event>)> = None;
        for e in self
            .history
            .iter()
            .filter(|e| e.revision() >= start && range.contains(&e.kv.key))
        {
            match &mut pending {
                Some((rev, events)) if *rev == e.revision() => events.push(e.clone()),
                _ => {
                    if let Some((revision, events)) = pending.take() {
                        self.outputs.push_back(Output::Watch {
                            watch: id,
                            revision,
                            events,
                        });
                    }
                    pending = Some((e.revision(), vec![e.clone()]));
                }
            }
        }
        if let Some((revision, events)) = pending {
            self.outputs.push_back(Output::Watch {
                watch: id,
                revision,
                events,
            });
        }
        self.watches.insert(id, Watcher { range, start });
        Ok(id)
    }

    /// Stops a watch; returns whether it existed. Outputs already queued stay queued.
    pub fn cancel_watch(&mut self, watch: WatchId) -> bool {
        self.watches.remove(&watch).is_some()
    }

    // ----- Leases -----

    /// Grants a lease of `ttl`, rounded up to whole seconds and to the minimum.
    pub fn grant(&mut self, ttl: Duration, now: SimTime) -> Lease {
        self.advance(now);
        let ttl = whole_seconds(ttl).max(whole_seconds(self.config.min_lease_ttl));
        let id = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            LeaseState {
                ttl,
                expires_at: self.now + ttl,
            },
        );
        Lease { id, ttl }
    }

    /// Renews a lease for its full TTL from `now`.
    pub fn keep_alive(&mut self, id: LeaseId, now: SimTime) -> Result<Lease, EtcdError> {
        self.advance(now);
        let at = self.now;
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or(EtcdError::LeaseNotFound(id))?;
        lease.expires_at = at + lease.ttl;
        Ok(Lease { id, ttl: lease.ttl })
    }

    /// Revokes a lease, deleting its keys in one revision; returns the revision after it.
    pub fn revoke(&mut self, id: LeaseId, now: SimTime) -> Result<Revision, EtcdError> {
        self.advance(now);
        if self.leases.remove(&id).is_none() {
            return Err(EtcdError::LeaseNotFound(id));
        }
        self.delete_lease_keys(id);
        Ok(self.revision)
    }

    /// How long the lease has left at `now`; None once it is gone.
    pub fn time_to_live(&mut self, id: LeaseId, now: SimTime) -> Option<Duration> {
        self.advance(now);
        self.leases.get(&id).map(|l| l.expires_at - self.now)
    }

    fn delete_lease_keys(&mut self, id: LeaseId) {
        let ops: Vec<TxnOp> = self
            .kvs
            .values()
            .filter(|kv| kv.lease == Some(id))
            .map(|kv| TxnOp::delete(kv.key.clone()))
            .collect();
        self.commit(&ops);
    }

    /// Moves the clock to `now`, expiring every lease due by then at its own deadline, earliest
    /// first (ties by id).
    fn advance(&mut self, now: SimTime) {
        while let Some((id, at)) = self
            .leases
            .iter()
            .map(|(&id, l)| (id, l.expires_at))
            .filter(|&(_, at)| at <= now)
            .min_by_key(|&(id, at)| (at, id))
        {
            self.now = self.now.max(at);
            self.leases.remove(&id);
            self.delete_lease_keys(id);
        }
        self.now = self.now.max(now);
    }
}

fn tombstone(key: &str, rev: Revision) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: rev,
        version: 0,
        lease: None,
    }
}

fn whole_seconds(d: Duration) -> Duration {
    let ms = d.as_millis();
    let secs = u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    Duration::from_secs(secs)
}

// ----- The shard lock recipe -----

/// One contender of a shard lock: its key under its own lease, and the key's create revision
/// (the lock's epoch once it holds).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Contender {
    pub key: String,
    pub lease: LeaseId,
    pub epoch: Revision,
}

/// Why a lock step failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LockError {
    /// The contender's key no longer exists under its lease (lease expired or revoked).
    #[error("lock {key} lost: the lock key no longer exists (lease expired or revoked)")]
    LockLost { key: String },
    /// The lock is ours but the record changed since `expected`.
    #[error("conflict on {key}: the record changed since mod_revision {expected}")]
    Conflict { key: String, expected: Revision },
    /// `topo`'s sanity check on the contender key's create revision.
    #[error("lock {key}: odd create revision {revision}")]
    OddCreateRevision { key: String, revision: Revision },
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// `topo/src/lock.rs`'s recipe for one shard: every contender writes
/// `{prefix}{lease_id:x}` under its own lease; the holder is the key with the lowest
/// `create_revision`; a waiter waits for the deletion of its predecessor (the live key created
/// just before its own); writes under the lock are transactions conditional on the
/// contender's key still existing under its lease. As in `topo`, the write condition does not
/// re-check that the contender is the lowest: holding is established when
/// [`ShardLockRecipe::predecessor`] is None, and kept for as long as the key exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardLockRecipe {
    prefix: String,
}

impl ShardLockRecipe {
    /// The recipe over contender keys `{prefix}{lease:x}` (`{p}/locks/{ks}/{shard}/` in topo).
    pub fn new(prefix: impl Into<String>) -> ShardLockRecipe {
        ShardLockRecipe {
            prefix: prefix.into(),
        }
    }

    pub fn contender_key(&self, lease: LeaseId) -> String {
        format!("{}{lease:x}", self.prefix)
    }

    /// `acquire`'s first step: create the contender key under `lease` unless it exists (txn on
    /// `create_revision == 0`, else read it back), giving the contender's epoch.
    pub fn enter(
        &self,
        etcd: &mut Etcd,
        lease: LeaseId,
        value: impl Into<Vec<u8>>,
        now: SimTime,
    ) -> Result<Contender, LockError> {
        let key = self.contender_key(lease);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, Some(lease))])
            .or_else([TxnOp::get(key.as_str())]);
        let resp = etcd.txn(txn, now)?;
        let epoch = if resp.succeeded {
            resp.revision
        } else {
            resp.kvs().first().map_or(0, |kv| kv.create_revision)
        };
        if epoch <= 1 {
            return Err(LockError::OddCreateRevision {
                key,
                revision: epoch,
            });
        }
        Ok(Contender { key, lease, epoch })
    }

    /// The live contender key created just before `contender`'s (topo's get with
    /// `max_create_revision = epoch - 1`, sorted by create revision descending, limit 1):
    /// what the contender waits on. None: the contender holds the lock (if its key exists).
    pub fn predecessor(
        &self,
        etcd: &mut Etcd,
        contender: &Contender,
        now: SimTime,
    ) -> Option<KeyValue> {
        etcd.range(&KeyRange::Prefix(self.prefix.clone()), now)
            .kvs
            .into_iter()
            .filter(|kv| kv.create_revision < contender.epoch)
            .max_by_key(|kv| kv.create_revision)
    }

    /// The holder's key: the lowest create revision under the prefix.
    pub fn holder(&self, etcd: &mut Etcd, now: SimTime) -> Option<KeyValue> {
        etcd.range(&KeyRange::Prefix(self.prefix.clone()), now)
            .kvs
            .into_iter()
            .min_by_key(|kv| kv.create_revision)
    }

    /// Whether `contender` holds the lock now: its key exists under its lease and no older
    /// contender is alive.
    pub fn holds(&self, etcd: &mut Etcd, contender: &Contender, now: SimTime) -> bool {
        let alive = etcd
            .get(&contender.key, now)
            .kv
            .is_some_and(|kv| kv.lease == Some(contender.lease));
        alive && self.predecessor(etcd, contender, now).is_none()
    }

    /// `ShardLock::update_shard` / `update_shard_if`: puts `record_key` in a transaction
    /// conditional on the contender's key existing under its lease and, with `expected`, on
    /// the record's `mod_revision` being `expected`. Returns the write's revision.
    pub fn write_under_lock(
        &self,
        etcd: &mut Etcd,
        contender: &Contender,
        record_key: &str,
        value: impl Into<Vec<u8>>,
        expected: Option<Revision>,
        now: SimTime,
    ) -> Result<Revision, LockError> {
        let mut compares = vec![Compare::lease(
            contender.key.as_str(),
            CompareOp::Equal,
            contender.lease,
        )];
        if let Some(rev) = expected {
            compares.push(Compare::mod_revision(record_key, CompareOp::Equal, rev));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::put(record_key, value, None)])
            .or_else([TxnOp::get(contender.key.as_str())]);
        let resp = etcd.txn(txn, now)?;
        if resp.succeeded {
            return Ok(resp.revision);
        }
        let still_ours = resp
            .kvs()
            .iter()
            .any(|kv| kv.lease == Some(contender.lease));
        match (still_ours, expected) {
            (true, Some(expected)) => Err(LockError::Conflict {
                key: record_key.to_string(),
                expected,
            }),
            _ => Err(LockError::LockLost {
                key: contender.key.clone(),
            }),
        }
    }

    /// `ShardLock::release`: deletes the key and revokes the lease (a lease already gone is
    /// not an error).
    pub fn release(
        &self,
        etcd: &mut Etcd,
        contender: &Contender,
        now: SimTime,
    ) -> Result<(), LockError> {
        etcd.delete(&contender.key, now);
        match etcd.revoke(contender.lease, now) {
            Ok(_) | Err(EtcdError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
