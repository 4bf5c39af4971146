//! The audit sink: a recovery's steps reach the shard's etcd audit log in order, in the
//! background, so that etcd writes never slow a recovery down.

use super::*;

enum AuditMsg {
    Entry {
        keyspace: String,
        shard: String,
        entry: AuditEntry,
    },
    Flush(oneshot::Sender<()>),
}

/// Appends audit entries in the background, in order, so recoveries never wait on etcd
/// writes for their log. An entry that cannot be written (etcd down) is retried a few times,
/// then logged and dropped.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditMsg>,
}

impl std::fmt::Debug for AuditMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditMsg::Entry {
                keyspace,
                shard,
                entry,
            } => {
                write!(f, "audit {keyspace}/{shard} {}", entry.action)
            }
            AuditMsg::Flush(_) => f.write_str("flush"),
        }
    }
}

/// One shard's audit log cut to `retention` (by age, then by count); a failure is logged and
/// retried at the next interval.
async fn prune_audit(topo: &Topo, keyspace: &str, shard: &str, retention: AuditRetention) {
    let cutoff = topo::now_ms().saturating_sub(millis(retention.max_age));
    let by_age = topo.prune_audit_before(keyspace, shard, cutoff).await;
    let by_count = topo.prune_audit(keyspace, shard, retention.keep).await;
    match (by_age, by_count) {
        (Ok(a), Ok(c)) => {
            if a + c > 0 {
                tracing::debug!(
                    keyspace,
                    shard,
                    by_age = a,
                    by_count = c,
                    "audit log pruned"
                );
                metrics::counter!("myha_orchestrator_audit_pruned_total").increment((a + c) as u64);
            }
        }
        (a, c) => tracing::warn!(
            keyspace, shard, by_age = ?a.err(), by_count = ?c.err(),
            "audit log pruning failed; retried later"
        ),
    }
}

impl AuditSink {
    /// Starts the writer task (needs a tokio runtime); it also prunes each shard's log it
    /// writes to, per `retention`.
    pub fn spawn(topo: Topo, retention: AuditRetention) -> AuditSink {
        let (tx, mut rx) = mpsc::channel::<AuditMsg>(4096);
        tokio::spawn(async move {
            let mut pruned_at: HashMap<(String, String), Instant> = HashMap::new();
            while let Some(msg) = rx.recv().await {
                match msg {
                    AuditMsg::Flush(done) => {
                        let _ = done.send(());
                    }
                    AuditMsg::Entry {
                        keyspace,
                        shard,
                        entry,
                    } => {
                        let mut last = None;
                        for attempt in 0..3u32 {
                            match topo.append_audit(&keyspace, &shard, &entry).await {
                                Ok(_) => {
                                    last = None;
                                    break;
                                }
                                Err(e) => {
                                    last = Some(e);
                                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                                }
                            }
                        }
                        if let Some(e) = last {
                            tracing::warn!(
                                keyspace, shard, action = %entry.action, outcome = %entry.outcome,
                                detail = %entry.detail, error = %e,
                                "audit entry could not be written to etcd; dropped"
                            );
                        }
                        let key = (keyspace, shard);
                        let due = pruned_at
                            .get(&key)
                            .is_none_or(|t| t.elapsed() >= retention.prune_interval);
                        if due {
                            prune_audit(&topo, &key.0, &key.1, retention).await;
                            pruned_at.insert(key, Instant::now());
                        }
                    }
                }
            }
        });
        AuditSink { tx }
    }

    /// Queues one entry (`at_ms` 0 means now). Never blocks; a full queue drops the entry
    /// with a warning.
    pub fn append(&self, keyspace: &str, shard: &str, mut entry: AuditEntry) {
        if entry.at_ms == 0 {
            entry.at_ms = topo::now_ms();
        }
        tracing::debug!(
            keyspace, shard, action = %entry.action, tablet = ?entry.tablet,
            outcome = %entry.outcome, detail = %entry.detail, "audit"
        );
        if let Err(e) = self.tx.try_send(AuditMsg::Entry {
            keyspace: keyspace.to_string(),
            shard: shard.to_string(),
            entry,
        }) {
            tracing::warn!(keyspace, shard, error = %e, "audit queue full or closed; entry dropped");
        }
    }

    /// Waits (up to `timeout`) until every entry queued before is written or dropped.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        if self.tx.send(AuditMsg::Flush(done)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(())))
    }
}
