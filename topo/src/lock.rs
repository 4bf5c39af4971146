//! The shard lock: etcd's lock recipe, done by hand so that the owner key holds a
//! [`LockInfo`] naming the holder.
//!
//! Each contender writes `{p}/locks/{ks}/{shard}/{lease_id:x}` (value: its `LockInfo`) under
//! its own lease; the owner is the key with the lowest `create_revision`; a waiter watches for
//! the deletion of its predecessor (the key created just before its own). Because every key
//! lives under a lease kept alive by its holder, a dead holder's key disappears after the TTL.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, GetResponse, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{encode, lock_info_of, Result, Topo};
use crate::error::TopoError;
use crate::keys::validate_name;
use crate::lease::KeptLease;
use crate::records::{now_ms, AuditEntry, LockInfo, ShardRecord};

/// Default TTL of a shard lock's lease.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);

/// What [`Topo::lock_shard`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    /// Who takes the lock (shown to whoever finds it held).
    pub holder: String,
    /// Why.
    pub purpose: String,
    /// TTL of the lock's lease: how long the lock survives its holder's death.
    pub ttl: Duration,
    /// `None`: try-lock, fail at once if held. `Some(d)`: wait up to `d`.
    pub wait: Option<Duration>,
}

impl LockRequest {
    /// A try-lock with the default TTL.
    pub fn new(holder: impl Into<String>, purpose: impl Into<String>) -> Self {
        LockRequest {
            holder: holder.into(),
            purpose: purpose.into(),
            ttl: DEFAULT_LOCK_TTL,
            wait: None,
        }
    }

    /// Sets the lease TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Waits up to `wait` for the lock instead of failing at once.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}

/// A held shard lock. Its lease is kept alive by a background task until [`ShardLock::release`],
/// [`ShardLock::abandon`] or drop (which revokes it, best effort).
#[derive(Debug)]
pub struct ShardLock {
    topo: Topo,
    keyspace: String,
    shard: String,
    key: String,
    info: LockInfo,
    lease: KeptLease,
    /// The create revision of our owner key (see [`ShardLock::epoch`]).
    epoch: i64,
    done: bool,
}

impl Topo {
    /// Takes the lock of a shard. Fails with [`TopoError::LockHeld`] naming the holder if it is
    /// held (at once for a try-lock, after `wait` otherwise).
    pub async fn lock_shard(
        &self,
        keyspace: &str,
        shard: &str,
        req: LockRequest,
    ) -> Result<ShardLock> {
        validate_name("keyspace", keyspace).map_err(TopoError::InvalidArgument)?;
        validate_name("shard", shard).map_err(TopoError::InvalidArgument)?;
        let lease = KeptLease::grant(self, req.ttl).await?;
        let key = self.keys().lock_owner(keyspace, shard, lease.id);
        let mut info = LockInfo {
            holder: req.holder,
            purpose: req.purpose,
            acquired_ms: now_ms(),
        };
        match self
            .acquire(keyspace, shard, &key, &mut info, &lease, req.wait)
            .await
        {
            Ok(epoch) => {
                tracing::info!(key, holder = %info.holder, purpose = %info.purpose, "shard lock acquired");
                Ok(ShardLock {
                    topo: self.clone(),
                    keyspace: keyspace.to_string(),
                    shard: shard.to_string(),
                    key,
                    info,
                    lease,
                    epoch,
                    done: false,
                })
            }
            Err(e) => {
                lease.stop();
                if let Err(e) = self.delete_key(&key).await {
                    tracing::debug!(key, error = %e, "cleaning up a failed lock attempt");
                }
                if let Err(e) = self.revoke_lease(lease.id).await {
                    tracing::debug!(key, error = %e, "revoking a failed lock attempt's lease");
                }
                Err(e)
            }
        }
    }

    async fn acquire(
        &self,
        keyspace: &str,
        shard: &str,
        key: &str,
        info: &mut LockInfo,
        lease: &KeptLease,
        wait: Option<Duration>,
    ) -> Result<i64> {
        let started = Instant::now();
        let prefix = self.keys().lock_prefix(keyspace, shard);
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                encode(key, info)?,
                Some(PutOptions::new().with_lease(lease.id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn("lock", key, txn).await?;
        let my_rev = if resp.succeeded() {
            resp.header().map(|h| h.revision()).unwrap_or_default()
        } else {
            Topo::txn_kvs(&resp)
                .first()
                .map(|kv| kv.create_revision())
                .unwrap_or_default()
        };
        if my_rev <= 1 {
            return Err(TopoError::Conflict {
                key: key.to_string(),
                detail: format!("odd create revision {my_rev}"),
            });
        }
        let mut waited = false;
        loop {
            if let Some(reason) = lease.lost_reason() {
                return Err(TopoError::LockLost {
                    key: key.to_string(),
                    reason,
                });
            }
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(my_rev - 1)
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(1);
            let mut kv = self.client().kv_client();
            let mut resp: GetResponse = self
                .call(
                    "get lock contenders",
                    &prefix,
                    kv.get(prefix.as_str(), Some(options)),
                )
                .await?;
            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            let Some(pred) = resp.take_kvs().into_iter().next() else {
                break;
            };
            let now = Instant::now();
            let remaining = match wait {
                Some(w) if now < started + w => started + w - now,
                _ => {
                    let holder = match self.get_lock_holder(keyspace, shard).await {
                        Ok(Some(h)) => h,
                        _ => lock_info_of(&pred),
                    };
                    return Err(TopoError::LockHeld {
                        key: self.keys().lock(keyspace, shard),
                        holder,
                        waited: wait.map(|_| now - started),
                    });
                }
            };
            waited = true;
            self.wait_deleted(pred.key(), rev + 1, remaining, lease)
                .await;
        }
        if waited {
            info.acquired_ms = now_ms();
            let mut kv = self.client().kv_client();
            let put = kv.put(
                key,
                encode(key, info)?,
                Some(PutOptions::new().with_lease(lease.id)),
            );
            self.call("put", key, put).await?;
        }
        Ok(my_rev)
    }

    /// The current holder of a shard's lock with its epoch (the create revision of its owner
    /// key, see [`ShardLock::epoch`]): the oldest owner key. `None` when nobody holds it.
    pub async fn lock_holder_epoch(
        &self,
        keyspace: &str,
        shard: &str,
    ) -> Result<Option<(u64, LockInfo)>> {
        let prefix = self.keys().lock_prefix(keyspace, shard);
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let mut kv = self.client().kv_client();
        let mut resp: GetResponse = self
            .call(
                "get lock holder",
                &prefix,
                kv.get(prefix.as_str(), Some(options)),
            )
            .await?;
        Ok(resp.take_kvs().into_iter().next().map(|kv| {
            (
                u64::try_from(kv.create_revision()).unwrap_or(0),
                lock_info_of(&kv),
            )
        }))
    }

    /// Returns when `key` is deleted (at or after `from_rev`), when `remaining` passes, when
    /// the lease is lost, or when the watch fails (the caller re-checks in every case).
    async fn wait_deleted(
        &self,
        key: &[u8],
        from_rev: i64,
        remaining: Duration,
        lease: &KeptLease,
    ) {
        let deadline = Instant::now() + remaining;
        let what = String::from_utf8_lossy(key).into_owned();
        let mut wc = self.client().watch_client();
        let options = WatchOptions::new().with_start_revision(from_rev);
        let mut stream = match self
            .call("watch", &what, wc.watch(key, Some(options)))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(key = what, error = %e, "watching the lock predecessor");
                tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(200)))
                    .await;
                return;
            }
        };
        let mut lost = lease.lost();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = lost.changed() => return,
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() || resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => {
                        tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(200))).await;
                        return;
                    }
                },
            }
        }
    }
}

impl ShardLock {
    /// The keyspace locked.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// The shard locked.
    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Our owner key, `{p}/locks/{ks}/{shard}/{lease_id:x}`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What the owner key says.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// The lock's lease.
    pub fn lease_id(&self) -> i64 {
        self.lease.id
    }

    /// The TTL etcd granted the lease.
    pub fn ttl(&self) -> Duration {
        self.lease.ttl
    }

    /// Turns `Some(reason)` the moment the lease keep-alive fails: from then on the lock must be
    /// considered lost (lock-conditional writes are refused).
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lease.lost()
    }

    /// True once the keep-alive failed.
    pub fn is_lost(&self) -> bool {
        self.lease.lost_reason().is_some()
    }

    /// The lock's epoch: the etcd create revision of our owner key. Owners of a shard's lock
    /// follow the order of their keys' creation, so a later holder always has a higher epoch;
    /// agents use it to refuse an older holder at an equal term.
    pub fn epoch(&self) -> u64 {
        u64::try_from(self.epoch).unwrap_or(0)
    }

    /// How long the lock is still certainly ours by the local lease deadline (measured from
    /// when the request that last renewed it was sent), `None` once past it. Checked right
    /// before every action taken under the lock: after a freeze longer than the TTL this says
    /// so at once, before the keep-alive task has had a chance to notice.
    pub fn remaining(&self) -> Option<Duration> {
        self.lease
            .valid_until()
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// `Err(LockLost)` unless the lock is neither lost nor within `margin` of its local lease
    /// deadline.
    pub fn check_deadline(&self, margin: Duration) -> Result<()> {
        self.check()?;
        let (until, now) = (self.lease.valid_until(), Instant::now());
        match lease_left(until.into_std(), now.into_std(), margin) {
            Ok(_) => Ok(()),
            Err(left) => Err(TopoError::LockLost {
                key: self.key.clone(),
                reason: format!(
                    "the local lease deadline {} (TTL {:?}, margin {margin:?}): the lock may belong to another holder now",
                    match left {
                        Some(l) => format!("is {l:?} away"),
                        None => "has passed".to_string(),
                    },
                    self.lease.ttl
                ),
            }),
        }
    }

    /// `Err(LockLost)` if the keep-alive failed.
    pub fn check(&self) -> Result<()> {
        match self.lease.lost_reason() {
            Some(reason) => Err(TopoError::LockLost {
                key: self.key.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Writes the shard record, in a transaction conditional on our lock key still existing
    /// under our lease. Returns the etcd revision of the write (the record's new
    /// `mod_revision`). [`TopoError::LockLost`] if the lock is gone.
    pub async fn update_shard(&self, record: &ShardRecord) -> Result<i64> {
        self.write_shard(record, None).await
    }

    /// Like [`ShardLock::update_shard`], also conditional on the shard record's `mod_revision`
    /// being `expected_mod_revision` ([`TopoError::Conflict`] otherwise).
    pub async fn update_shard_if(
        &self,
        record: &ShardRecord,
        expected_mod_revision: i64,
    ) -> Result<i64> {
        self.write_shard(record, Some(expected_mod_revision)).await
    }

    async fn write_shard(&self, record: &ShardRecord, expected: Option<i64>) -> Result<i64> {
        if record.keyspace != self.keyspace || record.shard != self.shard {
            return Err(TopoError::InvalidArgument(format!(
                "shard record {}/{} written under the lock of {}/{}",
                record.keyspace, record.shard, self.keyspace, self.shard
            )));
        }
        self.check()?;
        let shard_key = self.topo.keys().shard(&self.keyspace, &self.shard);
        let mut compares = vec![Compare::lease(
            self.key.as_str(),
            CompareOp::Equal,
            self.lease.id,
        )];
        if let Some(rev) = expected {
            compares.push(Compare::mod_revision(
                shard_key.as_str(),
                CompareOp::Equal,
                rev,
            ));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::put(
                shard_key.as_str(),
                encode(&shard_key, record)?,
                None,
            )])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let resp = self
            .topo
            .txn("update shard under lock", &shard_key, txn)
            .await?;
        if resp.succeeded() {
            return Ok(resp.header().map(|h| h.revision()).unwrap_or_default());
        }
        let still_ours = Topo::txn_kvs(&resp)
            .iter()
            .any(|kv| kv.lease() == self.lease.id);
        match (still_ours, expected) {
            (true, Some(rev)) => Err(TopoError::Conflict {
                key: shard_key,
                detail: format!("shard record changed since mod_revision {rev}"),
            }),
            _ => Err(TopoError::LockLost {
                key: self.key.clone(),
                reason: "the lock key no longer exists (lease expired or revoked)".into(),
            }),
        }
    }

    /// Appends to the shard's audit log (not conditional on the lock: failures are recorded too).
    pub async fn append_audit(&self, entry: &AuditEntry) -> Result<String> {
        self.topo
            .append_audit(&self.keyspace, &self.shard, entry)
            .await
    }

    /// Releases the lock: stops the keep-alive, deletes the key and revokes the lease.
    pub async fn release(mut self) -> Result<()> {
        self.done = true;
        self.lease.stop();
        let deleted = self.topo.delete_key(&self.key).await;
        let revoked = self.topo.revoke_lease(self.lease.id).await;
        tracing::info!(key = self.key, "shard lock released");
        deleted.map(drop).and(revoked)
    }

    /// Test hook: stops the keep-alive without releasing, as if the holder died. The lock is
    /// free once the lease expires.
    pub fn abandon(mut self) {
        self.done = true;
        self.lease.stop();
    }
}

impl Drop for ShardLock {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.lease.stop();
        // Best effort: free the lock now rather than after the TTL.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let topo = self.topo.clone();
            let lease = self.lease.id;
            rt.spawn(async move {
                let _ = topo.revoke_lease(lease).await;
            });
        }
    }
}

/// The lease gate every action under a shard lock passes (the daemon's [`ShardLock::
/// check_deadline`] and the simulator's orchestrators alike): `Ok(time left)` while the local
/// lease deadline `valid_until` is more than `margin` after `now`, else `Err` with what is left
/// (`None`: passed).
///
/// `valid_until` is the send time of the last keep-alive etcd answered plus the TTL: etcd
/// counts the TTL from its receipt of that request, later, so the lease is certainly alive in
/// etcd before `valid_until`, and no other contender can hold the lock then. `margin` leaves
/// the request time to reach the agent before that instant.
pub fn lease_left(
    valid_until: std::time::Instant,
    now: std::time::Instant,
    margin: Duration,
) -> std::result::Result<Duration, Option<Duration>> {
    if myha_mutants::active(myha_mutants::Mutant::SkipLeaseDeadline) {
        return Ok(Duration::MAX);
    }
    let left = valid_until
        .checked_duration_since(now)
        .filter(|d| !d.is_zero());
    match left {
        Some(l) if l > margin => Ok(l),
        other => Err(other),
    }
}
