//! Leases kept alive by a background task, and the jitter of the etcd retry backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Topo;

/// Up to 20 % jitter for a retry delay ([`backoff::Backoff::next_delay_jittered`]), from the
/// clock's sub-second nanos: etcd clients retrying in step drift apart without an RNG.
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 200) / 1000.0
}

/// A granted lease whose keep-alive runs in a background task. `lost` turns `Some(reason)`
/// the moment a keep-alive fails (the task then stops: the lease will expire on its own).
/// Dropping it stops the keep-alive without revoking the lease.
///
/// `valid_until` is a local, conservative deadline: the instant a request that etcd answered
/// with the lease alive was *sent* (the grant, then each keep-alive), plus the TTL etcd gave.
/// etcd starts its own countdown no earlier than it received that request, so before this
/// deadline the lease cannot have expired, whatever the keep-alive task has or has not noticed
/// (a process frozen past the TTL wakes up with an old `lost == None` but a passed deadline).
#[derive(Debug)]
pub(crate) struct KeptLease {
    pub(crate) id: i64,
    pub(crate) ttl: Duration,
    lost: watch::Receiver<Option<String>>,
    valid_until: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

impl KeptLease {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub(crate) async fn grant(topo: &Topo, ttl: Duration) -> crate::Result<KeptLease> {
        let asked = Instant::now();
        let (id, granted) = topo.grant_lease(ttl).await?;
        let (tx, lost) = watch::channel(None);
        let valid_until = Arc::new(Mutex::new(asked + granted));
        let task = tokio::spawn(keep_alive(
            topo.clone(),
            id,
            granted,
            tx,
            valid_until.clone(),
        ));
        Ok(KeptLease {
            id,
            ttl: granted,
            lost,
            valid_until,
            task,
        })
    }

    /// The shared deadline [`KeptLease::valid_until`] reads (kept current by the keep-alive).
    pub(crate) fn deadline(&self) -> Arc<Mutex<Instant>> {
        self.valid_until.clone()
    }

    /// The local deadline before which the lease is certainly alive (see the type's doc).
    pub(crate) fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }

    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Stops the keep-alive (the lease then expires after its TTL unless revoked).
    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep_alive(
    topo: Topo,
    id: i64,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
    valid_until: Arc<Mutex<Instant>>,
) {
    let reason = keep_alive_until_failure(&topo, id, ttl, &valid_until).await;
    tracing::warn!(lease = format_args!("{id:x}"), %reason, "lease keep-alive failed");
    let _ = lost.send(Some(reason));
}

/// Renews every ttl/3 and waits for each answer; returns why it stopped. A stream that fails
/// or goes silent moves every clone of `topo` to the next endpoint and is opened again there
/// while the lease is still valid (a lease belongs to the cluster, not to a member): losing one
/// etcd member must not cost a lease.
async fn keep_alive_until_failure(
    topo: &Topo,
    id: i64,
    ttl: Duration,
    valid_until: &Mutex<Instant>,
) -> String {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    // An answer must come back well before the lease could expire, and soon enough that a
    // silent member still leaves time to renew through another: a renewal sent just before
    // the cut leaves `ttl`, the next ping goes `interval` later and is given up after half an
    // interval, and the first ping on the next endpoint then goes out at once.
    let answer_timeout = topo.op_timeout().min(interval / 2);
    let what = format!("lease {id:x}");
    let valid = || *valid_until.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let endpoint = topo.endpoint_index();
        let why = keep_alive_on(topo, id, interval, answer_timeout, &what, valid_until).await;
        // etcd answered that the lease is gone: the endpoint works, the lease does not.
        if why == LEASE_GONE {
            return why;
        }
        topo.set_reachable(false);
        topo.endpoint_failed(endpoint);
        // Another endpoint is worth a try only while an answer there can still come in time.
        if Instant::now() + answer_timeout >= valid() {
            return why;
        }
        tracing::warn!(lease = %what, reason = %why, "lease keep-alive: trying the next etcd endpoint");
    }
}

/// What [`keep_alive_on`] returns when etcd says the lease is no more.
const LEASE_GONE: &str = "lease expired or revoked";

/// Keeps the lease alive over one keep-alive stream on the endpoint in use; returns why it
/// stopped.
async fn keep_alive_on(
    topo: &Topo,
    id: i64,
    interval: Duration,
    answer_timeout: Duration,
    what: &str,
    valid_until: &Mutex<Instant>,
) -> String {
    let mut client = topo.client().lease_client();
    let (mut keeper, mut stream) = match topo
        .call("lease keep-alive", what, client.keep_alive(id))
        .await
    {
        Ok(pair) => pair,
        Err(e) => return e.to_string(),
    };
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        next = sent + interval;
        if let Err(e) = keeper.keep_alive().await {
            return format!("sending keep-alive: {e}");
        }
        match tokio::time::timeout(answer_timeout, stream.message()).await {
            Err(_) => return format!("no keep-alive answer within {answer_timeout:?}"),
            Ok(Err(e)) => return format!("keep-alive stream failed: {e}"),
            Ok(Ok(None)) => return "keep-alive stream closed".to_string(),
            Ok(Ok(Some(resp))) => {
                topo.set_reachable(true);
                if resp.ttl() <= 0 {
                    return LEASE_GONE.to_string();
                }
                let granted = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
                let mut v = valid_until.lock().unwrap_or_else(|p| p.into_inner());
                *v = (*v).max(sent + granted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_at_most_a_fifth() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..0.2).contains(&j), "{j}");
        }
    }
}
