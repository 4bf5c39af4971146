//! Tablet registration under a lease that is renewed, and re-created when lost, forever.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::Backoff;
use etcd_client::PutOptions;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{encode, Result, Topo};
use crate::error::TopoError;
use crate::lease::{jitter, KeptLease};
use crate::records::{now_ms, TabletRecord};

/// Where a [`Registration`] stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// The tablet key exists under our live lease (as far as we know).
    pub registered: bool,
    /// The lease the key is attached to, while registered.
    pub lease_id: Option<i64>,
    /// The most recent error (kept after recovering, for diagnosis).
    pub last_error: Option<String>,
    /// How many times the key was (re)written under a new lease.
    pub registrations: u64,
}

enum Command {
    Update(Box<TabletRecord>, oneshot::Sender<Result<()>>),
    Deregister(oneshot::Sender<Result<()>>),
}

/// A tablet's registration at `{p}/tablets/{alias}`. A background task keeps the lease alive,
/// and when the lease is lost (etcd down longer than the TTL, keep-alive errors, lease revoked)
/// it grants a new one and writes the key again, retrying with backoff (100 ms .. 2 s) forever.
///
/// Dropping it stops the task without revoking the lease (like a crash: the key disappears
/// when the lease expires); call [`Registration::deregister`] to remove the key at once.
#[derive(Debug)]
pub struct Registration {
    topo: Topo,
    key: String,
    status: watch::Receiver<RegistrationStatus>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    /// The deadline of the lease the key was last written under (kept after it is lost).
    lease: LeaseDeadline,
}

/// The deadline of the registration's latest lease, shared with its task.
type LeaseDeadline = Arc<Mutex<Option<Arc<Mutex<Instant>>>>>;

impl Topo {
    /// Registers `record` at `{p}/tablets/{record.alias}` under a lease of `ttl`, kept alive
    /// (and re-created when lost) by a background task. Returns at once; follow
    /// [`Registration::status`] or await [`Registration::wait_registered`].
    /// `registered_ms` is set to the time of each (re)registration.
    pub fn register_tablet(&self, record: TabletRecord, ttl: Duration) -> Registration {
        let key = self.keys().tablet(&record.alias);
        let (status_tx, status) = watch::channel(RegistrationStatus::default());
        let (commands, rx) = mpsc::channel(8);
        let lease = LeaseDeadline::default();
        let task = tokio::spawn(run(
            self.clone(),
            key.clone(),
            record,
            ttl,
            status_tx,
            rx,
            lease.clone(),
        ));
        Registration {
            topo: self.clone(),
            key,
            status,
            commands,
            task,
            lease,
        }
    }
}

impl Registration {
    /// The tablet key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Follows the registration state.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// The local deadline before which the lease the key was last written under is certainly
    /// alive (from the send time of its last answered renewal); in the past once it is lost.
    /// `None` before the first registration. etcd deletes the key at the earliest then: a
    /// tablet that must stop something before others may see it gone acts before this.
    pub fn lease_valid_until(&self) -> Option<Instant> {
        let outer = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        outer
            .as_ref()
            .map(|d| *d.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// True while the key is written under a live lease.
    pub fn is_registered(&self) -> bool {
        self.status.borrow().registered
    }

    /// Waits until registered; false if `timeout` passes first.
    pub async fn wait_registered(&self, timeout: Duration) -> bool {
        let mut rx = self.status.clone();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| s.registered)).await,
            Ok(Ok(_))
        );
        ok
    }

    /// Replaces the record (same alias). Written at once if registered (the error is returned
    /// if that write fails); in any case used for every later re-registration.
    pub async fn update(&self, record: TabletRecord) -> Result<()> {
        if self.topo.keys().tablet(&record.alias) != self.key {
            return Err(TopoError::InvalidArgument(format!(
                "cannot change the alias of registration {:?} to {:?}",
                self.key, record.alias
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Update(Box::new(record), tx))
            .await
            .map_err(|_| TopoError::Stopped("registration task"))?;
        rx.await
            .map_err(|_| TopoError::Stopped("registration task"))?
    }

    /// Stops re-registering, deletes the key and revokes the lease.
    pub async fn deregister(self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let bound = self.topo.op_timeout() * 3;
        if self.commands.send(Command::Deregister(tx)).await.is_ok() {
            if let Ok(Ok(result)) = tokio::time::timeout(bound, rx).await {
                return result;
            }
        }
        // The task did not answer: stop it and clean up ourselves.
        self.task.abort();
        if let Some(lease) = self.status.borrow().lease_id {
            let _ = self.topo.revoke_lease(lease).await;
        }
        self.topo.delete_key(&self.key).await.map(drop)
    }

    /// Test hook: stops the keep-alive without revoking, as if the process died. The key
    /// disappears when the lease expires.
    pub fn abandon(self) {
        self.task.abort();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    topo: Topo,
    key: String,
    mut record: TabletRecord,
    ttl: Duration,
    status: watch::Sender<RegistrationStatus>,
    mut commands: mpsc::Receiver<Command>,
    deadline: LeaseDeadline,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let set_error = |e: String| {
        status.send_modify(|s| {
            s.registered = false;
            s.lease_id = None;
            s.last_error = Some(e);
        })
    };
    let mut delay = Duration::ZERO;
    loop {
        // Wait before the next attempt, still answering commands.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Update(r, reply)) => {
                        record = *r;
                        let _ = reply.send(Err(TopoError::Conflict {
                            key: key.clone(),
                            detail: "not registered right now; the record will be used when re-registering".into(),
                        }));
                    }
                    Some(Command::Deregister(reply)) => {
                        let _ = reply.send(topo.delete_key(&key).await.map(drop));
                        return;
                    }
                },
            }
        }
        delay = backoff.next_delay_jittered(jitter());

        // Two agents configured with one alias must not take turns overwriting each other's
        // record: refuse while another mysqld holds it (the same mysqld is a restart of us).
        match topo.get_tablet(&record.alias).await {
            Ok(Some(other))
                if (other.mysql_host.as_str(), other.mysql_port)
                    != (record.mysql_host.as_str(), record.mysql_port) =>
            {
                let e = TopoError::Conflict {
                    key: key.clone(),
                    detail: format!(
                        "alias {} is already registered by another tablet (mysql {}:{}, agent {}); \
                         refusing to overwrite it until that registration ends",
                        record.alias, other.mysql_host, other.mysql_port, other.grpc_addr
                    ),
                };
                tracing::error!(key, error = %e, "duplicate tablet alias");
                set_error(e.to_string());
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                set_error(e.to_string());
                continue;
            }
        }

        let lease = match KeptLease::grant(&topo, ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(key, error = %e, "cannot grant a registration lease");
                set_error(e.to_string());
                continue;
            }
        };
        record.registered_ms = now_ms();
        if let Err(e) = put(&topo, &key, &record, lease.id).await {
            tracing::debug!(key, error = %e, "cannot register");
            set_error(e.to_string());
            lease.stop();
            revoke_later(&topo, lease.id);
            continue;
        }
        tracing::info!(
            key,
            lease = format_args!("{:x}", lease.id),
            "tablet registered"
        );
        *deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease.deadline());
        status.send_modify(|s| {
            s.registered = true;
            s.lease_id = Some(lease.id);
            s.registrations += 1;
        });
        backoff.reset();
        delay = Duration::ZERO;

        let mut lost = lease.lost();
        loop {
            tokio::select! {
                changed = lost.changed() => {
                    let reason = match changed {
                        Ok(()) => lost.borrow().clone().unwrap_or_default(),
                        Err(_) => "keep-alive task stopped".to_string(),
                    };
                    tracing::warn!(key, %reason, "registration lease lost; re-registering");
                    // Not revoked: if it is in fact still alive, the key stays until the
                    // new lease's put re-attaches it, so watchers see no gap.
                    set_error(format!("lease {:x} lost: {reason}", lease.id));
                    break;
                }
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Update(r, reply)) => {
                        let registered_ms = record.registered_ms;
                        record = *r;
                        record.registered_ms = registered_ms;
                        let _ = reply.send(put(&topo, &key, &record, lease.id).await);
                    }
                    Some(Command::Deregister(reply)) => {
                        lease.stop();
                        let deleted = topo.delete_key(&key).await.map(drop);
                        let revoked = topo.revoke_lease(lease.id).await;
                        status.send_modify(|s| {
                            s.registered = false;
                            s.lease_id = None;
                        });
                        let _ = reply.send(deleted.and(revoked));
                        return;
                    }
                },
            }
        }
    }
}

async fn put(topo: &Topo, key: &str, record: &TabletRecord, lease: i64) -> Result<()> {
    let data = encode(key, record)?;
    let mut kv = topo.client().kv_client();
    topo.call(
        "put",
        key,
        kv.put(key, data, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .map(drop)
}

/// Best-effort revoke of a lease we gave up on (it expires anyway).
fn revoke_later(topo: &Topo, lease: i64) {
    let topo = topo.clone();
    tokio::spawn(async move {
        if let Err(e) = topo.revoke_lease(lease).await {
            tracing::debug!(lease = format_args!("{lease:x}"), error = %e, "revoking an abandoned lease failed");
        }
    });
}
