//! Operator control of automatic recovery, stored in etcd so that every orchestrator instance
//! agrees:
//!
//! | key | value (JSON) |
//! |---|---|
//! | `{p}/control/recoveries` | [`ControlRecord`]: recoveries disabled everywhere |
//! | `{p}/control/shards/{ks}/{shard}` | [`ControlRecord`]: disabled for one shard, and the last `ack` |
//!
//! The quarantine (`{p}/quarantine/{alias}`, [`QuarantineRecord`], defined in `topo` because
//! the gateway reads it too) is written here: by the repairs (errant deposed primary) and by
//! operators through the API, each audited.
//!
//! Flapping ([`flapping`]) is computed from the shard's audit log: at least `flap_limit`
//! successful emergency reparents within `flap_window`, counting only those after the shard's
//! last acknowledgement. While a shard flaps, its automatic recovery stops until `ack`.
//!
//! [`ControlWatch`] follows these keys (and the keyspace records, for durability) and publishes
//! a [`ControlState`] for the engine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use topo::Term;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use topo::etcd_client::{self, Compare, CompareOp, GetOptions, Txn, TxnOp};
use topo::{AuditEntry, Durability, Keys, KeyspaceRecord, Topo};

use crate::recovery::{ACTION_EMERGENCY_REPARENT, OPERATOR_ACTOR_PREFIX, OUTCOME_OK};

/// The value of a control key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ControlRecord {
    pub disabled: bool,
    #[serde(default)]
    pub reason: String,
    /// When `disabled` was last set (ms since the epoch).
    #[serde(default)]
    pub at_ms: u64,
    /// Who set it.
    #[serde(default)]
    pub by: String,
    /// Per shard: the last acknowledgement (flapping counts only reparents after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at_ms: Option<u64>,
}

pub use topo::QuarantineRecord;

/// A shard that reparented too often.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flapping {
    /// Successful emergency reparents counted (within the window, after the last ack).
    pub count: u32,
    pub limit: u32,
    pub window_ms: u64,
    /// The oldest counted reparent.
    pub since_ms: u64,
    /// The newest counted reparent.
    pub last_ms: u64,
    pub acked_at_ms: Option<u64>,
}

impl Flapping {
    /// Why automatic recovery stopped, and what to do.
    pub fn reason(&self, keyspace: &str, shard: &str) -> String {
        format!(
            "shard {keyspace}/{shard} is flapping: {} emergency reparents within {} (limit {}), \
             the first at {} ms; automatic recovery of this shard is stopped until an operator \
             acknowledges it (ack {keyspace}/{shard})",
            self.count,
            humantime::format_duration(Duration::from_millis(self.window_ms)),
            self.limit,
            self.since_ms
        )
    }
}

/// Whether an audit entry counts towards flapping: a successful automatic emergency reparent
/// (one an operator asked for is deliberate, not a symptom).
pub fn counts_for_flapping(e: &AuditEntry) -> bool {
    e.action == ACTION_EMERGENCY_REPARENT
        && e.outcome == OUTCOME_OK
        && !e.actor.starts_with(OPERATOR_ACTOR_PREFIX)
}

/// Flapping status from audit entries (any order), the last ack and `now_ms`. Pure.
pub fn flapping(
    entries: &[AuditEntry],
    acked_at_ms: Option<u64>,
    now_ms: u64,
    limit: u32,
    window: Duration,
) -> Option<Flapping> {
    if limit == 0 {
        return None;
    }
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let from = now_ms.saturating_sub(window_ms);
    let times: Vec<u64> = entries
        .iter()
        .filter(|e| counts_for_flapping(e))
        .map(|e| e.at_ms)
        .filter(|at| *at >= from && acked_at_ms.is_none_or(|ack| *at > ack))
        .collect();
    let count = u32::try_from(times.len()).unwrap_or(u32::MAX);
    if count < limit {
        return None;
    }
    Some(Flapping {
        count,
        limit,
        window_ms,
        since_ms: times.iter().copied().min().unwrap_or(0),
        last_ms: times.iter().copied().max().unwrap_or(0),
        acked_at_ms,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("etcd {op} on {key:?} failed: {source}")]
    Etcd {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op} on {key:?} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    #[error("cannot decode {key:?}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Topo(#[from] topo::TopoError),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{key:?} keeps changing; try again")]
    Contended { key: String },
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// `{p}/control/recoveries`.
pub fn global_key(keys: &Keys) -> String {
    format!("{}/control/recoveries", keys.prefix())
}

/// `{p}/control/shards/{ks}/{shard}`.
pub fn shard_key(keys: &Keys, keyspace: &str, shard: &str) -> String {
    format!("{}/control/shards/{keyspace}/{shard}", keys.prefix())
}

/// `{p}/control/`.
pub fn control_prefix(keys: &Keys) -> String {
    format!("{}/control/", keys.prefix())
}

/// `{p}/quarantine/{alias}`.
pub fn quarantine_key(keys: &Keys, alias: &str) -> String {
    keys.quarantine(alias)
}

/// `{p}/quarantine/`.
pub fn quarantine_prefix(keys: &Keys) -> String {
    keys.quarantine_prefix()
}

/// The etcd-backed control operations.
#[derive(Debug, Clone)]
pub struct Control {
    topo: Topo,
}

impl Control {
    pub fn new(topo: Topo) -> Control {
        Control { topo }
    }

    fn keys(&self) -> &Keys {
        self.topo.keys()
    }

    async fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let after = self.topo.op_timeout();
        match tokio::time::timeout(after, fut).await {
            Err(_) => Err(ControlError::Timeout {
                op,
                key: key.to_string(),
                after,
            }),
            Ok(Err(source)) => Err(ControlError::Etcd {
                op,
                key: key.to_string(),
                source,
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        let mut kv = self.topo.client().kv_client();
        let mut resp = self.call("get", key, kv.get(key, None)).await?;
        match resp.take_kvs().into_iter().next() {
            None => Ok(None),
            Some(kv) => {
                let v =
                    serde_json::from_slice(kv.value()).map_err(|source| ControlError::Decode {
                        key: key.to_string(),
                        source,
                    })?;
                Ok(Some((v, kv.mod_revision())))
            }
        }
    }

    async fn list<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>> {
        let mut kv = self.topo.client().kv_client();
        let mut resp = self
            .call(
                "get prefix",
                prefix,
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        resp.take_kvs()
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let v =
                    serde_json::from_slice(kv.value()).map_err(|source| ControlError::Decode {
                        key: key.clone(),
                        source,
                    })?;
                Ok((key, v))
            })
            .collect()
    }

    /// Read-modify-write of one JSON key, conditional on its revision (retried on a race).
    async fn update<T, F>(&self, key: &str, mut f: F) -> Result<T>
    where
        T: Serialize + serde::de::DeserializeOwned + Default + Clone,
        F: FnMut(T) -> T,
    {
        for _ in 0..10 {
            let (cur, cmp) = match self.get::<T>(key).await? {
                Some((v, rev)) => (v, Compare::mod_revision(key, CompareOp::Equal, rev)),
                None => (T::default(), Compare::version(key, CompareOp::Equal, 0)),
            };
            let next = f(cur);
            let data = serde_json::to_vec(&next).map_err(|source| ControlError::Decode {
                key: key.to_string(),
                source,
            })?;
            let txn = Txn::new()
                .when([cmp])
                .and_then([TxnOp::put(key, data, None)]);
            let mut kv = self.topo.client().kv_client();
            if self.call("txn", key, kv.txn(txn)).await?.succeeded() {
                return Ok(next);
            }
        }
        Err(ControlError::Contended {
            key: key.to_string(),
        })
    }

    /// The global switch (`None`: never set, recoveries enabled).
    pub async fn global(&self) -> Result<Option<ControlRecord>> {
        Ok(self.get(&global_key(self.keys())).await?.map(|(v, _)| v))
    }

    /// Disables (or enables) automatic recovery everywhere.
    pub async fn set_global(
        &self,
        disabled: bool,
        reason: &str,
        by: &str,
    ) -> Result<ControlRecord> {
        let key = global_key(self.keys());
        let (reason, by) = (reason.to_string(), by.to_string());
        self.update(&key, |cur: ControlRecord| ControlRecord {
            disabled,
            reason: reason.clone(),
            at_ms: topo::now_ms(),
            by: by.clone(),
            acked_at_ms: cur.acked_at_ms,
        })
        .await
    }

    /// One shard's switch and last ack (`None`: never set).
    pub async fn shard(&self, keyspace: &str, shard: &str) -> Result<Option<ControlRecord>> {
        Ok(self
            .get(&shard_key(self.keys(), keyspace, shard))
            .await?
            .map(|(v, _)| v))
    }

    /// Every shard's control record, by `(keyspace, shard)`.
    pub async fn shards(&self) -> Result<BTreeMap<(String, String), ControlRecord>> {
        let prefix = format!("{}/control/shards/", self.keys().prefix());
        Ok(self
            .list::<ControlRecord>(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(&prefix)?;
                let (ks, shard) = rest.split_once('/')?;
                Some(((ks.to_string(), shard.to_string()), v))
            })
            .collect())
    }

    /// Disables (or enables) automatic recovery of one shard; keeps its last ack. Audited.
    pub async fn set_shard(
        &self,
        keyspace: &str,
        shard: &str,
        disabled: bool,
        reason: &str,
        by: &str,
    ) -> Result<ControlRecord> {
        check_names(keyspace, shard)?;
        let key = shard_key(self.keys(), keyspace, shard);
        let (r, b) = (reason.to_string(), by.to_string());
        let rec = self
            .update(&key, |cur: ControlRecord| ControlRecord {
                disabled,
                reason: r.clone(),
                at_ms: topo::now_ms(),
                by: b.clone(),
                acked_at_ms: cur.acked_at_ms,
            })
            .await?;
        self.audit(
            keyspace,
            shard,
            by,
            if disabled {
                "recoveries_disabled"
            } else {
                "recoveries_enabled"
            },
            None,
            Term::ZERO,
            reason,
        )
        .await;
        Ok(rec)
    }

    /// Acknowledges a shard's recoveries: flapping counts only reparents after now. Audited.
    pub async fn ack(&self, keyspace: &str, shard: &str, by: &str) -> Result<ControlRecord> {
        check_names(keyspace, shard)?;
        let key = shard_key(self.keys(), keyspace, shard);
        let now = topo::now_ms();
        let rec = self
            .update(&key, |cur: ControlRecord| ControlRecord {
                acked_at_ms: Some(now),
                ..cur
            })
            .await?;
        self.audit(
            keyspace,
            shard,
            by,
            "ack",
            None,
            Term::ZERO,
            "recoveries acknowledged: flapping count reset",
        )
        .await;
        Ok(rec)
    }

    #[allow(clippy::too_many_arguments)]
    async fn audit(
        &self,
        keyspace: &str,
        shard: &str,
        by: &str,
        action: &str,
        tablet: Option<&str>,
        term: Term,
        detail: &str,
    ) {
        let entry = AuditEntry {
            at_ms: topo::now_ms(),
            term,
            actor: by.to_string(),
            action: action.to_string(),
            tablet: tablet.map(str::to_string),
            outcome: OUTCOME_OK.to_string(),
            detail: detail.to_string(),
            duration_ms: None,
        };
        if let Err(e) = self.topo.append_audit(keyspace, shard, &entry).await {
            tracing::warn!(keyspace, shard, action, error = %e, "audit entry not written");
        }
    }

    /// Whether the shard is flapping now (reads the audit log and the last ack).
    pub async fn flapping(
        &self,
        keyspace: &str,
        shard: &str,
        limit: u32,
        window: Duration,
        now_ms: u64,
    ) -> Result<Option<Flapping>> {
        let (entries, rec) = tokio::join!(
            self.topo.list_audit(keyspace, Some(shard), AUDIT_SCAN),
            self.shard(keyspace, shard)
        );
        let entries = entries?;
        let acked = rec?.and_then(|r| r.acked_at_ms);
        Ok(flapping(&entries, acked, now_ms, limit, window))
    }

    /// Quarantines a tablet: kept out of promotion and routing, with the reason. The repair's
    /// own step is its audit entry; operators go through [`Control::quarantine_by`].
    pub async fn quarantine(
        &self,
        alias: &str,
        reason: &str,
        term: Term,
    ) -> Result<QuarantineRecord> {
        let rec = QuarantineRecord {
            reason: reason.to_string(),
            at_ms: topo::now_ms(),
            term,
            by: None,
        };
        self.put_quarantine(alias, &rec).await?;
        Ok(rec)
    }

    async fn put_quarantine(&self, alias: &str, rec: &QuarantineRecord) -> Result<()> {
        match self.topo.put_quarantine(alias, rec).await {
            Err(topo::TopoError::Parse(e)) => Err(ControlError::Invalid(e.to_string())),
            r => Ok(r?),
        }
    }

    /// An operator quarantines `alias` of `keyspace/shard` (whose record is at `term`); audited
    /// on that shard as `quarantine_added`. Whether the tablet may be quarantined (registered,
    /// not the primary) is the caller's check.
    pub async fn quarantine_by(
        &self,
        keyspace: &str,
        shard: &str,
        alias: &str,
        reason: &str,
        term: Term,
        by: &str,
    ) -> Result<QuarantineRecord> {
        check_names(keyspace, shard)?;
        let rec = QuarantineRecord {
            reason: reason.to_string(),
            at_ms: topo::now_ms(),
            term,
            by: Some(by.to_string()),
        };
        self.put_quarantine(alias, &rec).await?;
        self.audit(
            keyspace,
            shard,
            by,
            ACTION_QUARANTINE_ADDED,
            Some(alias),
            term,
            reason,
        )
        .await;
        Ok(rec)
    }

    /// Releases a tablet from quarantine; returns the record that was removed (`None`: it was
    /// not quarantined).
    pub async fn release_quarantine(&self, alias: &str) -> Result<Option<QuarantineRecord>> {
        match self.topo.delete_quarantine(alias).await {
            Err(topo::TopoError::Parse(e)) => Err(ControlError::Invalid(e.to_string())),
            r => Ok(r?),
        }
    }

    /// An operator releases `alias`; audited as `quarantine_released` on `shard` when the
    /// tablet's shard is known (`None`: not registered, nothing to audit on). Returns the
    /// removed record (`None`: it was not quarantined, nothing changed or audited).
    pub async fn release_quarantine_by(
        &self,
        alias: &str,
        shard: Option<(&str, &str, Term)>,
        reason: Option<&str>,
        by: &str,
    ) -> Result<Option<QuarantineRecord>> {
        let Some(rec) = self.release_quarantine(alias).await? else {
            return Ok(None);
        };
        if let Some((keyspace, shard, term)) = shard {
            let why = reason
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let detail = format!("released{why}; it had been quarantined: {}", rec.describe());
            self.audit(
                keyspace,
                shard,
                by,
                ACTION_QUARANTINE_RELEASED,
                Some(alias),
                term,
                &detail,
            )
            .await;
        }
        Ok(Some(rec))
    }

    /// Every quarantined tablet, by alias.
    pub async fn list_quarantine(&self) -> Result<BTreeMap<String, QuarantineRecord>> {
        Ok(self.topo.list_quarantine().await?)
    }
}

/// Audit action of an operator's quarantine.
pub const ACTION_QUARANTINE_ADDED: &str = "quarantine_added";
/// Audit action of an operator's release.
pub const ACTION_QUARANTINE_RELEASED: &str = "quarantine_released";

/// How many of a shard's newest audit entries the flapping check reads.
pub const AUDIT_SCAN: usize = 2000;

fn check_names(keyspace: &str, shard: &str) -> Result<()> {
    topo::validate_name("keyspace", keyspace).map_err(ControlError::Invalid)?;
    topo::validate_name("shard", shard).map_err(ControlError::Invalid)
}

// ---- the watched state ------------------------------------------------------------------

/// What the engine knows of the control keys, quarantine and keyspaces at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlState {
    /// Every watch is current.
    pub synced: bool,
    pub global: Option<ControlRecord>,
    pub shards: BTreeMap<(String, String), ControlRecord>,
    pub quarantine: BTreeMap<String, QuarantineRecord>,
    /// Keyspace durability, by keyspace.
    pub keyspaces: BTreeMap<String, Durability>,
}

impl ControlState {
    /// Decodes the raw watch contents (undecodable values are logged and skipped). Pure.
    pub fn from_raw(
        keys: &Keys,
        control: &BTreeMap<String, Vec<u8>>,
        quarantine: &BTreeMap<String, Vec<u8>>,
        keyspaces: &BTreeMap<String, Vec<u8>>,
        synced: bool,
    ) -> ControlState {
        let global_key = global_key(keys);
        let shard_prefix = format!("{}/control/shards/", keys.prefix());
        let q_prefix = quarantine_prefix(keys);
        let ks_prefix = keys.keyspaces_prefix();
        let mut st = ControlState {
            synced,
            ..ControlState::default()
        };
        for (k, v) in control {
            let Some(rec) = decode::<ControlRecord>(k, v) else {
                continue;
            };
            if *k == global_key {
                st.global = Some(rec);
            } else if let Some((ks, shard)) = k
                .strip_prefix(&shard_prefix)
                .and_then(|r| r.split_once('/'))
            {
                st.shards.insert((ks.to_string(), shard.to_string()), rec);
            }
        }
        for (k, v) in quarantine {
            if let (Some(alias), Some(rec)) =
                (k.strip_prefix(&q_prefix), decode::<QuarantineRecord>(k, v))
            {
                st.quarantine.insert(alias.to_string(), rec);
            }
        }
        for (k, v) in keyspaces {
            if let (Some(name), Some(rec)) =
                (k.strip_prefix(&ks_prefix), decode::<KeyspaceRecord>(k, v))
            {
                st.keyspaces.insert(name.to_string(), rec.durability);
            }
        }
        st
    }

    pub fn durability(&self, keyspace: &str) -> Option<Durability> {
        self.keyspaces.get(keyspace).copied()
    }

    pub fn shard(&self, keyspace: &str, shard: &str) -> Option<&ControlRecord> {
        // Asked for every shard the engine analyses: no key built when there is no record.
        if self.shards.is_empty() {
            return None;
        }
        self.shards.get(&(keyspace.to_string(), shard.to_string()))
    }

    /// Quarantined tablets among `aliases`, alias -> reason.
    pub fn quarantined<'a>(
        &self,
        aliases: impl IntoIterator<Item = &'a str>,
    ) -> BTreeMap<String, String> {
        if self.quarantine.is_empty() {
            return BTreeMap::new();
        }
        aliases
            .into_iter()
            .filter_map(|a| {
                self.quarantine
                    .get(a)
                    .map(|q| (a.to_string(), quarantine_text(q)))
            })
            .collect()
    }

    /// Why automatic recovery of the shard is disabled (global switch first), if it is.
    pub fn disabled_reason(&self, keyspace: &str, shard: &str) -> Option<String> {
        if let Some(g) = self.global.as_ref().filter(|g| g.disabled) {
            return Some(format!(
                "recoveries disabled globally by {} at {} ms: {}",
                or_unknown(&g.by),
                g.at_ms,
                or_unknown(&g.reason)
            ));
        }
        self.shard(keyspace, shard).filter(|s| s.disabled).map(|s| {
            format!(
                "recoveries of {keyspace}/{shard} disabled by {} at {} ms: {}",
                or_unknown(&s.by),
                s.at_ms,
                or_unknown(&s.reason)
            )
        })
    }

    /// The shard's last acknowledgement.
    pub fn acked_at_ms(&self, keyspace: &str, shard: &str) -> Option<u64> {
        self.shard(keyspace, shard).and_then(|s| s.acked_at_ms)
    }
}

/// A quarantine record in words.
pub fn quarantine_text(q: &QuarantineRecord) -> String {
    q.describe()
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "(unknown)"
    } else {
        s
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Option<T> {
    match serde_json::from_slice(v) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key, error = %e, "undecodable control value skipped");
            None
        }
    }
}

/// Follows `{p}/control/`, `{p}/quarantine/` and `{p}/keyspaces/` and publishes a
/// [`ControlState`] on every change. Dropping it stops the watches.
#[derive(Debug)]
pub struct ControlWatch {
    rx: watch::Receiver<Arc<ControlState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ControlWatch {
    /// Starts the watches (needs a tokio runtime).
    pub fn start(topo: &Topo) -> ControlWatch {
        let keys = topo.keys().clone();
        let control = topo.watch_prefix(&control_prefix(&keys));
        let quarantine = topo.watch_prefix(&quarantine_prefix(&keys));
        let keyspaces = topo.watch_prefix(&keys.keyspaces_prefix());
        let (tx, rx) = watch::channel(Arc::new(ControlState::default()));
        let task = tokio::spawn(async move {
            let mut c = control.subscribe();
            let mut q = quarantine.subscribe();
            let mut k = keyspaces.subscribe();
            let mut cs = control.synced();
            let mut qs = quarantine.synced();
            let mut ks = keyspaces.synced();
            loop {
                let synced =
                    *cs.borrow_and_update() && *qs.borrow_and_update() && *ks.borrow_and_update();
                let st = ControlState::from_raw(
                    &keys,
                    &c.borrow_and_update().clone(),
                    &q.borrow_and_update().clone(),
                    &k.borrow_and_update().clone(),
                    synced,
                );
                tx.send_if_modified(|cur| {
                    if **cur != st {
                        *cur = Arc::new(st);
                        true
                    } else {
                        false
                    }
                });
                let changed = tokio::select! {
                    r = c.changed() => r,
                    r = q.changed() => r,
                    r = k.changed() => r,
                    r = cs.changed() => r,
                    r = qs.changed() => r,
                    r = ks.changed() => r,
                    _ = tx.closed() => return,
                };
                if changed.is_err() {
                    return;
                }
            }
        });
        ControlWatch { rx, task }
    }

    pub fn current(&self) -> Arc<ControlState> {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ControlState>> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests;
