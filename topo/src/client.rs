//! [`Topo`]: the etcd connection, key layout and record CRUD.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use crate::access::{
    etcd_error_text, maybe_tls_refusal, needs_auth, refusal, tls_reason, Authenticator, EtcdAccess,
    Refusal,
};
use crate::error::{is_unavailable, TopoError};
use crate::keys::{validate_name, Keys};
use crate::records::{
    now_ms, parse_alias, AuditEntry, CellRecord, KeyspaceRecord, LockInfo, PromotionRecord,
    QuarantineRecord, ShardRecord, TabletRecord,
};
use crate::term::Term;
use crate::tls_probe;

/// Result of the topology layer.
pub type Result<T, E = TopoError> = std::result::Result<T, E>;

/// Default bound on every single etcd call.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on asking etcd why it closed a TLS connection (see `tls_probe`), added to a call
/// that failed so.
const TLS_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long what a `tls_probe` learnt stands.
const TLS_PROBE_EVERY: Duration = Duration::from_secs(10);

/// One etcd client per endpoint, and the one in use.
///
/// Why not one client balanced over every endpoint: a member that is silently cut off (no
/// reset, no ICMP) keeps its connection looking healthy until the HTTP/2 keepalive gives up
/// (10 s and more), and a round-robin balancer keeps sending it a share of the calls, each of
/// which then waits out its timeout: with three members, one call in three. A pinned
/// endpoint instead costs one timed-out call: the failure moves every clone (they share this)
/// to the next endpoint, and reads are retried there at once.
struct Endpoints {
    urls: Vec<String>,
    clients: Vec<Client>,
    /// Index of the endpoint in use.
    current: AtomicUsize,
    /// The user each client authenticates as (none: etcd without auth).
    auth: Option<Authenticator>,
    /// The TLS material (its common name is etcd's user when none authenticated; a refused
    /// certificate is diagnosed with it, see `tls_probe`).
    tls: Option<pki::Material>,
    /// Per endpoint, when `tls_probe` last asked and what it learnt (a refusal, or none):
    /// asked at most every [`TLS_PROBE_EVERY`], so that a flapping connection does not add a
    /// probe to every failed call.
    probes: Vec<std::sync::Mutex<Option<Probed>>>,
}

/// When a `tls_probe` asked, and the refusal it heard (`None`: none).
type Probed = (Instant, Option<String>);

impl Endpoints {
    fn current(&self) -> (usize, &Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, &self.clients[i])
    }

    /// Moves off endpoint `failed` (when it is still the one in use: concurrent failures of
    /// one endpoint move once).
    fn failed(&self, failed: usize) {
        let n = self.clients.len();
        if n > 1
            && self
                .current
                .compare_exchange(
                    failed,
                    (failed + 1) % n,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                failed = %self.urls[failed],
                next = %self.urls[(failed + 1) % n],
                "etcd endpoint not answering: moving to the next"
            );
        }
    }
}

/// Handle on the topology in etcd. Cheap to clone; all clones share the connections and the
/// choice of endpoint.
#[derive(Clone)]
pub struct Topo {
    endpoints: Arc<Endpoints>,
    keys: Keys,
    op_timeout: Duration,
    reachable: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Topo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topo")
            .field("prefix", &self.keys.prefix())
            .field("op_timeout", &self.op_timeout)
            .field("reachable", &*self.reachable.borrow())
            .finish()
    }
}

impl Topo {
    /// Connects to a plaintext etcd without a user (see [`Topo::connect_with`]).
    pub async fn connect<I>(endpoints: I, prefix: &str, dial_timeout: Duration) -> Result<Topo>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Topo::connect_with(endpoints, prefix, dial_timeout, &EtcdAccess::plain()).await
    }

    /// Connects to etcd over TLS and as a user when `access` says so. The connection is lazy:
    /// an unreachable etcd is not an error here (everything retries or fails per call later);
    /// only malformed endpoints are, and a refusal (TLS, user, password) of the first call.
    /// With a user, each endpoint's client authenticates at once (in the background, the
    /// endpoint in use with the probe), again on its next call when that failed, and whenever
    /// etcd drops its token. One probe, bounded by `dial_timeout`, initialises
    /// [`Topo::reachable`].
    pub async fn connect_with<I>(
        endpoints: I,
        prefix: &str,
        dial_timeout: Duration,
        access: &EtcdAccess,
    ) -> Result<Topo>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let eps: Vec<String> = endpoints
            .into_iter()
            .map(|e| e.as_ref().to_string())
            .collect();
        let what = eps.join(",");
        if eps.is_empty() {
            return Err(TopoError::InvalidArgument("no etcd endpoints".into()));
        }
        for ep in &eps {
            let https = ep.starts_with("https://");
            if access.tls.is_some() && ep.starts_with("http://") {
                return Err(TopoError::InvalidArgument(format!(
                    "etcd endpoint {ep}: TLS is configured, so the endpoint must be https://"
                )));
            }
            if access.tls.is_none() && https {
                return Err(TopoError::InvalidArgument(format!(
                    "etcd endpoint {ep} is https:// but no TLS (CA certificate) is configured"
                )));
            }
        }
        let dial_timeout = dial_timeout.max(Duration::from_millis(100));
        let options = ConnectOptions::new()
            .with_connect_timeout(dial_timeout)
            // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
            .with_keep_alive(
                Duration::from_secs(10),
                dial_timeout.max(Duration::from_secs(2)),
            )
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let options = access.apply(options);
        let mut clients = Vec::new();
        for ep in &eps {
            let connect = Client::connect([ep.as_str()], Some(options.clone()));
            let client = match tokio::time::timeout(dial_timeout, connect).await {
                Err(_) => {
                    return Err(TopoError::Timeout {
                        op: "connect",
                        key: ep.clone(),
                        after: dial_timeout,
                    })
                }
                Ok(Err(source)) => {
                    return Err(TopoError::Etcd {
                        op: "connect",
                        key: ep.clone(),
                        source,
                    })
                }
                Ok(Ok(c)) => c,
            };
            clients.push(client);
        }
        // Processes start on different endpoints, so that they do not all load one member.
        let first = std::process::id() as usize % clients.len();
        let (tx, _) = watch::channel(false);
        let n = clients.len();
        let topo = Topo {
            endpoints: Arc::new(Endpoints {
                urls: eps,
                clients,
                current: AtomicUsize::new(first),
                auth: access.user.clone().map(|u| Authenticator::new(u, n)),
                tls: access.tls.clone(),
                probes: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            }),
            keys: Keys::new(prefix),
            op_timeout: DEFAULT_OP_TIMEOUT,
            reachable: Arc::new(tx),
        };
        if n > 1 && topo.endpoints.auth.is_some() {
            // The other endpoints authenticate now, in the background, rather than on their
            // first call: calls through [`Topo::client`] after a move to another endpoint
            // find it authenticated (they do not authenticate by themselves).
            let endpoints = topo.endpoints.clone();
            tokio::spawn(async move {
                if let Some(auth) = &endpoints.auth {
                    let all = (0..n).filter(|i| *i != first).map(|i| {
                        tokio::time::timeout(
                            dial_timeout,
                            auth.authenticate(i, &endpoints.clients[i]),
                        )
                    });
                    // Failures are met again, and reported, by that endpoint's next call.
                    futures::future::join_all(all).await;
                }
            });
        }
        let probe = topo.clone().with_op_timeout(dial_timeout);
        match probe.current_revision().await {
            Ok(_) => {}
            // A refusal will not go away by itself: say so now, not on every call later.
            Err(e @ TopoError::Refused { .. }) => return Err(e),
            Err(e) => tracing::warn!(endpoints = %what, error = %e, "etcd not reachable yet"),
        }
        Ok(topo)
    }

    /// Sets the bound on every single etcd call (default [`DEFAULT_OP_TIMEOUT`]).
    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout.max(Duration::from_millis(10));
        self
    }

    /// The bound on every single etcd call.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The etcd client of the endpoint in use (escape hatch; calls through it are not
    /// bounded, and their failures do not move to another endpoint).
    pub fn client(&self) -> &Client {
        self.endpoints.current().1
    }

    /// Index of the endpoint in use (for [`Topo::endpoint_failed`]).
    pub(crate) fn endpoint_index(&self) -> usize {
        self.endpoints.current().0
    }

    /// A stream opened on endpoint `i` went silent or broke: move every clone off it.
    pub(crate) fn endpoint_failed(&self, i: usize) {
        self.endpoints.failed(i);
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        let (i, _) = self.endpoints.current();
        &self.endpoints.urls[i]
    }

    /// Whether the last etcd call (of any clone, including background tasks) got an answer.
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    pub(crate) fn set_reachable(&self, up: bool) {
        self.reachable.send_if_modified(|cur| {
            let changed = *cur != up;
            *cur = up;
            changed
        });
    }

    /// Runs one etcd call (made on [`Topo::client`] just before) under the operation timeout,
    /// with context on failure. A timeout or a connectivity error moves every clone to the next
    /// endpoint; the call itself is not repeated (a write may have been applied): see
    /// [`Topo::read`] for calls that may be.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let (endpoint, client) = self.endpoints.current();
        if let Some(auth) = &self.endpoints.auth {
            if !auth.is_ready(endpoint) {
                let user = auth.user.name().to_string();
                let authenticate = auth.authenticate(endpoint, client);
                self.settle(endpoint, "authenticate", &user, authenticate)
                    .await?;
            }
        }
        self.settle(endpoint, op, key, fut).await
    }

    /// Awaits `fut` (a call on endpoint `endpoint`) under the operation timeout and turns its
    /// outcome into ours: reachability, moving off a failing endpoint, and an error with
    /// context (a refusal in words: see [`refusal`]).
    async fn settle<T>(
        &self,
        endpoint: usize,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.op_timeout, fut).await {
            Err(_) => {
                self.set_reachable(false);
                self.endpoints.failed(endpoint);
                Err(TopoError::Timeout {
                    op,
                    key: key.to_string(),
                    after: self.op_timeout,
                })
            }
            Ok(Err(source)) => {
                if let Some(auth) = &self.endpoints.auth {
                    if needs_auth(&source) {
                        auth.invalidate(endpoint);
                    }
                }
                let user = self.endpoints.auth.as_ref().map(|a| a.user.name());
                let identity = self.endpoints.tls.as_ref().map(|m| m.identity.as_str());
                let mut refused = refusal(&source, user, identity);
                if refused.is_none() && maybe_tls_refusal(&source) {
                    if let Some(alert) = self.tls_refusal(endpoint).await {
                        let why = tls_reason(&alert).unwrap_or("TLS handshake failed");
                        refused = Some((
                            Refusal::Tls,
                            format!(
                                "{why} ({alert}; the call itself saw: {})",
                                etcd_error_text(&source)
                            ),
                        ));
                    }
                }
                if let Some((kind, reason)) = refused {
                    if kind == Refusal::Tls {
                        // No answer from etcd at all; another member may have a good
                        // certificate.
                        self.set_reachable(false);
                        self.endpoints.failed(endpoint);
                    } else {
                        self.set_reachable(true);
                    }
                    return Err(TopoError::Refused {
                        op,
                        key: key.to_string(),
                        kind,
                        reason: format!("at {} ({kind}): {reason}", self.endpoints.urls[endpoint]),
                    });
                }
                if is_unavailable(&source) {
                    self.set_reachable(false);
                    self.endpoints.failed(endpoint);
                }
                Err(TopoError::Etcd {
                    op,
                    key: key.to_string(),
                    source,
                })
            }
            Ok(Ok(v)) => {
                self.set_reachable(true);
                Ok(v)
            }
        }
    }

    /// Whether etcd at endpoint `i` refuses our TLS client, and its alert: asked with
    /// `tls_probe` (at most every [`TLS_PROBE_EVERY`]; `None` without TLS).
    async fn tls_refusal(&self, i: usize) -> Option<String> {
        let tls = self.endpoints.tls.as_ref()?;
        let fresh = |slot: &Option<Probed>| {
            slot.as_ref()
                .filter(|(at, _)| at.elapsed() < TLS_PROBE_EVERY)
                .map(|(_, alert)| alert.clone())
        };
        let lock = |i: usize| {
            self.endpoints.probes[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if let Some(known) = fresh(&lock(i)) {
            return known;
        }
        let bound = self.op_timeout.min(TLS_PROBE_TIMEOUT);
        let alert = tls_probe::refusal(&self.endpoints.urls[i], tls, bound).await;
        *lock(i) = Some((Instant::now(), alert.clone()));
        alert
    }

    /// A call that changes nothing, tried on each endpoint in turn while the answer is a
    /// timeout or a connectivity error (`make` builds it on the client it is given).
    pub(crate) async fn read<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut make: F,
    ) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut tries = self.endpoints.clients.len();
        // One more try after etcd dropped our token (see `needs_auth`): that call
        // authenticates again first.
        let mut reauthenticated = false;
        loop {
            let (endpoint, client) = self.endpoints.current();
            let result = self.call(op, key, make(client.clone())).await;
            let retry = match &result {
                Err(e) if e.is_unavailable() || e.refusal() == Some(Refusal::Tls) => {
                    tries -= 1;
                    tries > 0
                }
                // Not when authenticating itself was refused (a wrong password).
                Err(TopoError::Refused { op, .. }) if *op != "authenticate" && !reauthenticated => {
                    reauthenticated = true;
                    self.endpoints
                        .auth
                        .as_ref()
                        .is_some_and(|a| !a.is_ready(endpoint))
                }
                _ => false,
            };
            if !retry {
                return result;
            }
        }
    }

    // ---- generic helpers -------------------------------------------------------------

    pub(crate) async fn get_kv(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut resp = self
            .read("get", key, |c| {
                let key = key.to_string();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, i64)>> {
        match self.get_kv(key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(key, kv.value())?, kv.mod_revision()))),
        }
    }

    pub(crate) async fn list_kvs(
        &self,
        prefix: &str,
        options: GetOptions,
    ) -> Result<Vec<KeyValue>> {
        let options = options.with_prefix();
        let mut resp = self
            .read("get prefix", prefix, |c| {
                let (prefix, options) = (prefix.to_string(), options.clone());
                async move { c.kv_client().get(prefix, Some(options)).await }
            })
            .await?;
        Ok(resp.take_kvs())
    }

    async fn list_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let kvs = self.list_kvs(prefix, GetOptions::new()).await?;
        kvs.iter()
            .map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// As [`Topo::list_json`], but a value that cannot be decoded (corrupt, or a variant this
    /// version does not know) is skipped and returned beside the others: one bad record must not
    /// hide every good one.
    async fn list_json_lenient<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<T>, Vec<Unreadable>)> {
        let kvs = self.list_kvs(prefix, GetOptions::new()).await?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match decode(&key, kv.value()) {
                Ok(v) => good.push(v),
                Err(e) => bad.push(Unreadable {
                    error: e.to_string(),
                    key,
                }),
            }
        }
        Ok((good, bad))
    }

    async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<i64> {
        let data = encode(key, value)?;
        let mut kv = self.client().kv_client();
        let resp = self.call("put", key, kv.put(key, data, None)).await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    pub(crate) async fn txn(
        &self,
        op: &'static str,
        key: &str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse> {
        let mut kv = self.client().kv_client();
        self.call(op, key, kv.txn(txn)).await
    }

    /// Creates `key` only if it does not exist. Returns whether it was created.
    async fn create_json<T: Serialize>(&self, key: &str, value: &T, lease: i64) -> Result<bool> {
        let data = encode(key, value)?;
        let put = if lease != 0 {
            Some(PutOptions::new().with_lease(lease))
        } else {
            None
        };
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, data, put)]);
        Ok(self.txn("create", key, txn).await?.succeeded())
    }

    /// Deletes one key; returns whether it existed.
    pub(crate) async fn delete_key(&self, key: &str) -> Result<bool> {
        let mut kv = self.client().kv_client();
        let resp = self.call("delete", key, kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    /// Revokes a lease (deleting its keys). A lease that is already gone is not an error.
    pub(crate) async fn revoke_lease(&self, lease_id: i64) -> Result<()> {
        let mut lease = self.client().lease_client();
        let what = format!("lease {lease_id:x}");
        match self
            .call("lease revoke", &what, lease.revoke(lease_id))
            .await
        {
            Ok(_) => Ok(()),
            Err(TopoError::Etcd {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.message().contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds, at least 1). Returns the lease id
    /// and the TTL etcd granted (it may raise it to its minimum).
    pub(crate) async fn grant_lease(&self, ttl: Duration) -> Result<(i64, Duration)> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut lease = self.client().lease_client();
        let resp = self
            .call(
                "lease grant",
                &format!("ttl {secs}s"),
                lease.grant(secs, None),
            )
            .await?;
        let granted = resp.ttl().max(secs) as u64;
        Ok((resp.id(), Duration::from_secs(granted)))
    }

    // ---- public API ------------------------------------------------------------------

    /// The current etcd revision (also a cheap liveness probe).
    pub async fn current_revision(&self) -> Result<i64> {
        let root = self.keys.root();
        let resp = self
            .read("get", &root, |c| {
                let root = root.clone();
                async move {
                    let opts = GetOptions::new().with_prefix().with_count_only();
                    c.kv_client().get(root, Some(opts)).await
                }
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Compacts etcd's history up to `revision` (physically), as an operator or test would.
    pub async fn compact(&self, revision: i64) -> Result<()> {
        let mut kv = self.client().kv_client();
        let opts = etcd_client::CompactionOptions::new().with_physical();
        self.call(
            "compact",
            &format!("revision {revision}"),
            kv.compact(revision, Some(opts)),
        )
        .await?;
        Ok(())
    }

    /// Writes `{p}/cells/{name}`.
    pub async fn put_cell(&self, cell: &CellRecord) -> Result<()> {
        validate_name("cell", &cell.name).map_err(TopoError::InvalidArgument)?;
        self.put_json(&self.keys.cell(&cell.name), cell)
            .await
            .map(drop)
    }

    /// Reads `{p}/cells/{name}`.
    pub async fn get_cell(&self, name: &str) -> Result<Option<CellRecord>> {
        Ok(self.get_json(&self.keys.cell(name)).await?.map(|(c, _)| c))
    }

    /// All cells, by name.
    pub async fn list_cells(&self) -> Result<Vec<CellRecord>> {
        self.list_json(&self.keys.cells_prefix()).await
    }

    /// Writes `{p}/keyspaces/{name}`.
    pub async fn put_keyspace(&self, ks: &KeyspaceRecord) -> Result<()> {
        validate_name("keyspace", &ks.name).map_err(TopoError::InvalidArgument)?;
        self.put_json(&self.keys.keyspace(&ks.name), ks)
            .await
            .map(drop)
    }

    /// Reads `{p}/keyspaces/{name}`.
    pub async fn get_keyspace(&self, name: &str) -> Result<Option<KeyspaceRecord>> {
        Ok(self
            .get_json(&self.keys.keyspace(name))
            .await?
            .map(|(k, _)| k))
    }

    /// All keyspaces, by name.
    pub async fn list_keyspaces(&self) -> Result<Vec<KeyspaceRecord>> {
        self.list_json(&self.keys.keyspaces_prefix()).await
    }

    /// Creates `{p}/shards/{ks}/{shard}` (no primary, term 0) unless it exists.
    /// Returns whether it was created.
    pub async fn create_shard(&self, keyspace: &str, shard: &str) -> Result<bool> {
        validate_name("keyspace", keyspace).map_err(TopoError::InvalidArgument)?;
        validate_name("shard", shard).map_err(TopoError::InvalidArgument)?;
        let key = self.keys.shard(keyspace, shard);
        self.create_json(&key, &ShardRecord::new(keyspace, shard), 0)
            .await
    }

    /// Reads a shard record and its etcd `mod_revision` (for conditional updates).
    pub async fn get_shard(
        &self,
        keyspace: &str,
        shard: &str,
    ) -> Result<Option<(ShardRecord, i64)>> {
        self.get_json(&self.keys.shard(keyspace, shard)).await
    }

    /// The shards of a keyspace, by shard name.
    pub async fn list_shards(&self, keyspace: &str) -> Result<Vec<ShardRecord>> {
        self.list_json(&self.keys.shards_prefix(keyspace)).await
    }

    /// Sets the first primary of a shard: `primary = alias`, `term = term + 1`,
    /// `term_start_ms = now`, only if the shard has no primary (creating the shard record if it
    /// does not exist). Conditional on the record's `mod_revision`. Used by the test harness
    /// and sandbox before an orchestrator runs. Returns the new record.
    pub async fn bootstrap_primary(
        &self,
        keyspace: &str,
        shard: &str,
        alias: &str,
    ) -> Result<ShardRecord> {
        validate_name("keyspace", keyspace).map_err(TopoError::InvalidArgument)?;
        validate_name("shard", shard).map_err(TopoError::InvalidArgument)?;
        parse_alias(alias)?;
        let key = self.keys.shard(keyspace, shard);
        for _ in 0..10 {
            let (current, compare) = match self.get_shard(keyspace, shard).await? {
                Some((rec, rev)) => (
                    rec,
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
                ),
                None => (
                    ShardRecord::new(keyspace, shard),
                    Compare::version(key.as_str(), CompareOp::Equal, 0),
                ),
            };
            if let Some(p) = &current.primary {
                return Err(TopoError::Conflict {
                    key,
                    detail: format!("shard already has primary {p} at term {}", current.term),
                });
            }
            let next = ShardRecord {
                primary: Some(alias.to_string()),
                term: current.term.next(),
                term_start_ms: now_ms(),
                ..current
            };
            let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                key.as_str(),
                encode(&key, &next)?,
                None,
            )]);
            if self.txn("bootstrap primary", &key, txn).await?.succeeded() {
                return Ok(next);
            }
        }
        Err(TopoError::Conflict {
            key,
            detail: "the shard record keeps changing".into(),
        })
    }

    /// Records a promotion in the shard's history, create-only: the first tablet to claim a term
    /// keeps it. Returns the record now stored: `rec` itself, or an earlier record of the same
    /// term (an idempotent repeat when it names the same tablet). A record naming another tablet
    /// is [`TopoError::Conflict`].
    pub async fn record_promotion(&self, rec: &PromotionRecord) -> Result<PromotionRecord> {
        let key = self.keys.promotion(&rec.keyspace, &rec.shard, rec.term);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(&key, rec)?, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.txn("record promotion", &key, txn).await?;
        if resp.succeeded() {
            return Ok(rec.clone());
        }
        let existing: PromotionRecord = match Topo::txn_kvs(&resp).first() {
            Some(kv) => decode(&key, kv.value())?,
            None => {
                return Err(TopoError::Conflict {
                    key,
                    detail: "the record exists but could not be read back".into(),
                })
            }
        };
        if existing.primary != rec.primary {
            return Err(TopoError::Conflict {
                key,
                detail: format!(
                    "term {} was already given to {} (by {})",
                    rec.term, existing.primary, existing.by
                ),
            });
        }
        Ok(existing)
    }

    /// The promotion that started `term`, if recorded.
    pub async fn get_promotion(
        &self,
        keyspace: &str,
        shard: &str,
        term: Term,
    ) -> Result<Option<PromotionRecord>> {
        Ok(self
            .get_json(&self.keys.promotion(keyspace, shard, term))
            .await?
            .map(|(r, _)| r))
    }

    /// Every recorded promotion of a shard, in term order.
    pub async fn promotion_history(
        &self,
        keyspace: &str,
        shard: &str,
    ) -> Result<Vec<PromotionRecord>> {
        self.list_json(&self.keys.history_prefix(keyspace, shard))
            .await
    }

    /// Reads `{p}/tablets/{alias}`.
    pub async fn get_tablet(&self, alias: &str) -> Result<Option<TabletRecord>> {
        Ok(self
            .get_json(&self.keys.tablet(alias))
            .await?
            .map(|(t, _)| t))
    }

    /// Registered tablets by alias, optionally only those of a keyspace (and shard). A record
    /// that cannot be decoded is skipped with a warning; [`Topo::list_tablets_reporting`] also
    /// returns those.
    pub async fn list_tablets(
        &self,
        keyspace: Option<&str>,
        shard: Option<&str>,
    ) -> Result<Vec<TabletRecord>> {
        let (tablets, unreadable) = self.list_tablets_reporting(keyspace, shard).await?;
        for u in &unreadable {
            tracing::warn!(key = %u.key, error = %u.error, "skipping an unreadable tablet record");
        }
        Ok(tablets)
    }

    /// As [`Topo::list_tablets`], with the records that could not be decoded (of any shard:
    /// their shard cannot be read either).
    pub async fn list_tablets_reporting(
        &self,
        keyspace: Option<&str>,
        shard: Option<&str>,
    ) -> Result<(Vec<TabletRecord>, Vec<Unreadable>)> {
        let (all, unreadable): (Vec<TabletRecord>, _) =
            self.list_json_lenient(&self.keys.tablets_prefix()).await?;
        let tablets = all
            .into_iter()
            .filter(|t| {
                keyspace.is_none_or(|k| t.keyspace == k) && shard.is_none_or(|s| t.shard == s)
            })
            .collect();
        Ok((tablets, unreadable))
    }

    /// Deletes a tablet's registration (e.g. cleaning up after a dead agent). Returns whether
    /// it existed.
    pub async fn delete_tablet(&self, alias: &str) -> Result<bool> {
        self.delete_key(&self.keys.tablet(alias)).await
    }

    /// Writes `{p}/quarantine/{alias}` (replacing any earlier record of the tablet). Whether
    /// the alias names a registered tablet, or the shard's primary, is the caller's judgement.
    pub async fn put_quarantine(&self, alias: &str, rec: &QuarantineRecord) -> Result<()> {
        parse_alias(alias)?;
        self.put_json(&self.keys.quarantine(alias), rec)
            .await
            .map(drop)
    }

    /// Reads `{p}/quarantine/{alias}` (`None`: not quarantined).
    pub async fn get_quarantine(&self, alias: &str) -> Result<Option<QuarantineRecord>> {
        parse_alias(alias)?;
        Ok(self
            .get_json(&self.keys.quarantine(alias))
            .await?
            .map(|(q, _)| q))
    }

    /// Every quarantined tablet, by alias. An undecodable record is an error: a caller listing
    /// quarantines must not silently miss one.
    pub async fn list_quarantine(
        &self,
    ) -> Result<std::collections::BTreeMap<String, QuarantineRecord>> {
        let kvs = self
            .list_kvs(&self.keys.quarantine_prefix(), GetOptions::new())
            .await?;
        let mut out = std::collections::BTreeMap::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(alias) = self.keys.parse_quarantine_key(&key) else {
                continue;
            };
            out.insert(alias.to_string(), decode(&key, kv.value())?);
        }
        Ok(out)
    }

    /// Deletes `{p}/quarantine/{alias}` (releases the tablet); returns the record that was
    /// there (`None`: it was not quarantined), as etcd removed it (no read-then-delete race).
    pub async fn delete_quarantine(&self, alias: &str) -> Result<Option<QuarantineRecord>> {
        parse_alias(alias)?;
        let key = self.keys.quarantine(alias);
        let mut kv = self.client().kv_client();
        let mut resp = self
            .call(
                "delete",
                &key,
                kv.delete(key.as_str(), Some(DeleteOptions::new().with_prev_key())),
            )
            .await?;
        let prev = resp.take_prev_kvs().into_iter().next();
        prev.map(|kv| decode(&key, kv.value())).transpose()
    }

    /// The current holder of a shard lock, if any.
    pub async fn get_lock_holder(&self, keyspace: &str, shard: &str) -> Result<Option<LockInfo>> {
        let prefix = self.keys.lock_prefix(keyspace, shard);
        let kvs = self
            .list_kvs(
                &prefix,
                GetOptions::new()
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1),
            )
            .await?;
        Ok(kvs.first().map(lock_info_of))
    }

    /// Appends to `{p}/audit/{ks}/{shard}/`, keyed by `entry.at_ms` (now if 0) and the first
    /// free sequence number for that millisecond. Returns the key written.
    pub async fn append_audit(
        &self,
        keyspace: &str,
        shard: &str,
        entry: &AuditEntry,
    ) -> Result<String> {
        validate_name("keyspace", keyspace).map_err(TopoError::InvalidArgument)?;
        validate_name("shard", shard).map_err(TopoError::InvalidArgument)?;
        let mut entry = entry.clone();
        if entry.at_ms == 0 {
            entry.at_ms = now_ms();
        }
        for seq in 0..1000 {
            let key = self.keys.audit(keyspace, shard, entry.at_ms, seq);
            if self.create_json(&key, &entry, 0).await? {
                return Ok(key);
            }
        }
        Err(TopoError::Conflict {
            key: self.keys.audit_prefix(keyspace, shard),
            detail: format!("no free audit sequence number at {} ms", entry.at_ms),
        })
    }

    /// The newest `limit` audit entries (0 = all) of one shard, or of every shard of the
    /// keyspace when `shard` is `None`, newest (most recently appended) first.
    pub async fn list_audit(
        &self,
        keyspace: &str,
        shard: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        let prefix = match shard {
            Some(s) => self.keys.audit_prefix(keyspace, s),
            None => self.keys.audit_keyspace_prefix(keyspace),
        };
        let options = GetOptions::new()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let kvs = self.list_kvs(&prefix, options).await?;
        kvs.iter()
            .map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// Deletes the oldest audit entries of a shard so that at most `keep` remain. Returns how
    /// many were deleted.
    pub async fn prune_audit(&self, keyspace: &str, shard: &str, keep: usize) -> Result<usize> {
        let prefix = self.keys.audit_prefix(keyspace, shard);
        let kvs = self
            .list_kvs(&prefix, GetOptions::new().with_keys_only())
            .await?;
        if kvs.len() <= keep {
            return Ok(0);
        }
        // Keys sort by time: delete [prefix, first kept key).
        let first_kept = match keep {
            0 => crate::keys::prefix_range_end(prefix.as_bytes()),
            _ => kvs[kvs.len() - keep].key().to_vec(),
        };
        self.delete_range(&prefix, first_kept).await
    }

    /// Deletes the keys in `[start, end)`; returns how many were deleted.
    async fn delete_range(&self, start: &str, end: impl Into<Vec<u8>>) -> Result<usize> {
        let mut kv = self.client().kv_client();
        let resp = self
            .call(
                "delete range",
                start,
                kv.delete(start, Some(DeleteOptions::new().with_range(end))),
            )
            .await?;
        Ok(usize::try_from(resp.deleted()).unwrap_or_default())
    }

    /// Deletes the audit entries of a shard written before `cutoff_ms` (keys sort by time).
    /// Returns how many were deleted.
    pub async fn prune_audit_before(
        &self,
        keyspace: &str,
        shard: &str,
        cutoff_ms: u64,
    ) -> Result<usize> {
        let prefix = self.keys.audit_prefix(keyspace, shard);
        let end = format!("{prefix}{cutoff_ms:020}");
        self.delete_range(&prefix, end).await
    }

    /// Ops of a transaction's responses that were range reads, flattened.
    pub(crate) fn txn_kvs(resp: &etcd_client::TxnResponse) -> Vec<KeyValue> {
        resp.op_responses()
            .into_iter()
            .flat_map(|r| match r {
                TxnOpResponse::Get(mut g) => g.take_kvs(),
                _ => Vec::new(),
            })
            .collect()
    }
}

/// The [`LockInfo`] stored in a lock owner key; a key written by something else (e.g.
/// `etcdctl lock`) is reported by its key.
pub(crate) fn lock_info_of(kv: &KeyValue) -> LockInfo {
    serde_json::from_slice(kv.value()).unwrap_or_else(|_| LockInfo {
        holder: format!("unknown ({})", String::from_utf8_lossy(kv.key())),
        purpose: String::from_utf8_lossy(kv.value()).into_owned(),
        acquired_ms: 0,
    })
}

pub(crate) fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| TopoError::Encode {
        key: key.to_string(),
        source,
    })
}

/// A record that could not be decoded: its key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub error: String,
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|source| TopoError::Decode {
        key: key.to_string(),
        source,
    })
}
