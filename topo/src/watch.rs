//! Resilient watches: the full current content of a key range, kept up to date across etcd
//! restarts, broken streams and compactions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backoff::Backoff;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::Topo;
use crate::keys::prefix_range_end;
use crate::lease::jitter;
use crate::records::{QuarantineRecord, ShardRecord, TabletRecord};

/// The content of a watched range: full key -> raw value.
pub type Snapshot = Arc<BTreeMap<String, Vec<u8>>>;

/// A watch on a key range. A background task reads the range, then watches it from the next
/// revision; when the stream breaks, etcd restarts or the revision was compacted it reads the
/// range again and re-watches (backoff 100 ms .. 2 s, forever), so the content converges.
/// The task ends when every receiver (including this handle) is dropped.
#[derive(Debug, Clone)]
pub struct PrefixWatch {
    content: watch::Receiver<Snapshot>,
    synced: watch::Receiver<bool>,
}

impl PrefixWatch {
    /// Follows the content.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.content.clone()
    }

    /// The content now.
    pub fn current(&self) -> Snapshot {
        self.content.borrow().clone()
    }

    /// True while the content is known current (read done and the watch stream healthy);
    /// false before the first read and while reconnecting.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// Waits until synced; false if `timeout` passes first.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.clone();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        );
        ok
    }
}

impl Topo {
    /// Watches every key starting with `prefix` (give it a trailing `/`).
    pub fn watch_prefix(&self, prefix: &str) -> PrefixWatch {
        self.watch_range(
            prefix.as_bytes().to_vec(),
            prefix_range_end(prefix.as_bytes()),
        )
    }

    /// Watches the single key `key` (the map then has at most one entry).
    pub fn watch_key(&self, key: &str) -> PrefixWatch {
        let mut end = key.as_bytes().to_vec();
        end.push(0);
        self.watch_range(key.as_bytes().to_vec(), end)
    }

    fn watch_range(&self, start: Vec<u8>, end: Vec<u8>) -> PrefixWatch {
        let (content_tx, content) = watch::channel(Snapshot::default());
        let (synced_tx, synced) = watch::channel(false);
        let topo = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = content_tx.closed() => {}
                _ = run(&topo, &start, &end, &content_tx, &synced_tx) => {}
            }
        });
        PrefixWatch { content, synced }
    }

    /// The shard record, `None` while it does not exist. An undecodable value is logged and
    /// the previous value kept.
    pub fn watch_shard(&self, keyspace: &str, shard: &str) -> watch::Receiver<Option<ShardRecord>> {
        let key = self.keys().shard(keyspace, shard);
        let pw = self.watch_key(&key);
        map_watch(pw, None, move |map, prev: &Option<ShardRecord>| {
            match map.get(&key) {
                None => None,
                Some(v) => match serde_json::from_slice(v) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "undecodable shard record");
                        prev.clone()
                    }
                },
            }
        })
    }

    /// The shards of a keyspace, by shard name (an undecodable record is logged; it keeps its
    /// last readable value, or is skipped when it never had one).
    pub fn watch_shards(
        &self,
        keyspace: &str,
    ) -> watch::Receiver<Arc<BTreeMap<String, ShardRecord>>> {
        let keys = self.keys().clone();
        let pw = self.watch_prefix(&keys.shards_prefix(keyspace));
        map_watch(pw, Arc::default(), move |map, prev| {
            Arc::new(
                map.iter()
                    .filter_map(|(k, v)| {
                        let (_, shard) = keys.parse_shard_key(k)?;
                        decode_or_keep::<ShardRecord>(k, v, shard, prev)
                            .map(|r| (shard.to_string(), r))
                    })
                    .collect(),
            )
        })
    }

    /// Registered tablets by alias (an undecodable record is logged; it keeps its last readable
    /// value, or is skipped when it never had one).
    pub fn watch_tablets(&self) -> watch::Receiver<Arc<BTreeMap<String, TabletRecord>>> {
        let keys = self.keys().clone();
        let pw = self.watch_prefix(&keys.tablets_prefix());
        map_watch(pw, Arc::default(), move |map, prev| {
            Arc::new(
                map.iter()
                    .filter_map(|(k, v)| {
                        let alias = keys.parse_tablet_key(k)?;
                        decode_or_keep::<TabletRecord>(k, v, alias, prev)
                            .map(|r| (alias.to_string(), r))
                    })
                    .collect(),
            )
        })
    }

    /// Quarantined tablets by alias (undecodable records are logged and skipped), with whether
    /// the watch is current: a consumer keeping tablets out of traffic must know when its view
    /// of the quarantine may be missing a record.
    pub fn watch_quarantine(
        &self,
    ) -> (
        watch::Receiver<Arc<BTreeMap<String, QuarantineRecord>>>,
        watch::Receiver<bool>,
    ) {
        let keys = self.keys().clone();
        let pw = self.watch_prefix(&keys.quarantine_prefix());
        let synced = pw.synced();
        let rx = map_watch(pw, Arc::default(), move |map, prev| {
            Arc::new(
                map.iter()
                    .filter_map(|(k, v)| {
                        let alias = keys.parse_quarantine_key(k)?;
                        decode_or_keep::<QuarantineRecord>(k, v, alias, prev)
                            .map(|r| (alias.to_string(), r))
                    })
                    .collect(),
            )
        });
        (rx, synced)
    }
}

/// Decodes a watched record. One that cannot be decoded is logged, and keeps its last readable
/// value (from `prev`, by `id`): one corrupt write must not drop a shard from routing or a tablet out
/// of the view (a missing record would read as "no primary" or "not registered").
fn decode_or_keep<T: serde::de::DeserializeOwned + Clone>(
    key: &str,
    value: &[u8],
    id: &str,
    prev: &BTreeMap<String, T>,
) -> Option<T> {
    match serde_json::from_slice(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let kept = prev.get(id).cloned();
            tracing::warn!(
                key, error = %e, kept_last_readable = kept.is_some(),
                "undecodable record"
            );
            kept
        }
    }
}

/// Derives a typed watch from a [`PrefixWatch`]; runs until every typed receiver is dropped.
fn map_watch<T, F>(pw: PrefixWatch, initial: T, f: F) -> watch::Receiver<T>
where
    T: Clone + PartialEq + Send + Sync + 'static,
    F: Fn(&BTreeMap<String, Vec<u8>>, &T) -> T + Send + 'static,
{
    let (tx, rx) = watch::channel(initial);
    let mut content = pw.subscribe();
    tokio::spawn(async move {
        let _keep = pw;
        loop {
            let next = {
                let map = content.borrow_and_update().clone();
                let prev = tx.borrow().clone();
                f(&map, &prev)
            };
            tx.send_if_modified(|cur| {
                if *cur != next {
                    *cur = next;
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
    rx
}

fn publish(tx: &watch::Sender<Snapshot>, map: &BTreeMap<String, Vec<u8>>) {
    tx.send_if_modified(|cur| {
        if **cur != *map {
            *cur = Arc::new(map.clone());
            true
        } else {
            false
        }
    });
}

async fn run(
    topo: &Topo,
    start: &[u8],
    end: &[u8],
    content: &watch::Sender<Snapshot>,
    synced: &watch::Sender<bool>,
) {
    let what = String::from_utf8_lossy(start).into_owned();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // How often we ask the server for progress on an idle stream, to notice a dead one.
    let probe_every = topo.op_timeout().max(Duration::from_millis(500));
    loop {
        // 1. Read the whole range.
        let mut kv = topo.client().kv_client();
        let get = kv.get(start, Some(GetOptions::new().with_range(end)));
        let (mut map, rev) = match topo.call("get range", &what, get).await {
            Ok(mut resp) => {
                let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
                let map: BTreeMap<String, Vec<u8>> = resp
                    .take_kvs()
                    .into_iter()
                    .map(|kv| {
                        let (k, v) = kv.into_key_value();
                        (String::from_utf8_lossy(&k).into_owned(), v)
                    })
                    .collect();
                (map, rev)
            }
            Err(e) => {
                synced.send_replace(false);
                tracing::debug!(prefix = what, error = %e, "watch: reading the range failed");
                tokio::time::sleep(backoff.next_delay_jittered(jitter())).await;
                continue;
            }
        };
        publish(content, &map);

        // 2. Watch from the next revision.
        let endpoint = topo.endpoint_index();
        let mut wc = topo.client().watch_client();
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(rev + 1);
        let mut stream = match topo
            .call("watch", &what, wc.watch(start, Some(options)))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                synced.send_replace(false);
                tracing::debug!(prefix = what, error = %e, "watch: creating the watch failed");
                tokio::time::sleep(backoff.next_delay_jittered(jitter())).await;
                continue;
            }
        };
        synced.send_replace(true);
        backoff.reset();

        let mut last_message = Instant::now();
        let mut probe = tokio::time::interval_at(Instant::now() + probe_every, probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        last_message = Instant::now();
                        if resp.compact_revision() > 0 {
                            break format!("revision compacted (at {})", resp.compact_revision());
                        }
                        if resp.canceled() {
                            break format!("watch canceled: {}", resp.cancel_reason());
                        }
                        if resp.events().is_empty() {
                            continue;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            match ev.event_type() {
                                EventType::Put => {
                                    map.insert(key, kv.value().to_vec());
                                }
                                EventType::Delete => {
                                    map.remove(&key);
                                }
                            }
                        }
                        publish(content, &map);
                    }
                    Ok(None) => break "watch stream closed".to_string(),
                    Err(e) => break format!("watch stream failed: {e}"),
                },
                _ = probe.tick() => {
                    if last_message.elapsed() > probe_every * 2 + topo.op_timeout() {
                        topo.set_reachable(false);
                        topo.endpoint_failed(endpoint);
                        break format!("no answer on the watch stream for {:?}", last_message.elapsed());
                    }
                    if let Err(e) = stream.request_progress().await {
                        break format!("watch progress request failed: {e}");
                    }
                }
            }
        };
        synced.send_replace(false);
        tracing::info!(prefix = what, reason = why, "watch interrupted; re-reading");
        tokio::time::sleep(backoff.next_delay_jittered(jitter())).await;
    }
}
