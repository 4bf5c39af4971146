//! TabletWatch against fake agents (real gRPC on loopback) with hand-fed topology: subscribe,
//! follow health, notice breaks, reconnect, follow address changes, drop deregistered tablets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use myha_proto::agent as pb;
use myha_proto::agent::agent_server::{Agent, AgentServer};
use tabletwatch::testing::{shard_record, tablet_record};
use tabletwatch::{FleetSnapshot, ShardMap, TabletMap, TabletWatch, TopoInputs, WatchOptions};
use tokio::sync::watch;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use topo::TabletRecord;

const WAIT: Duration = Duration::from_secs(5);

/// A fake agent: streams `health` like the real one (on change, and every `interval` if set).
#[derive(Clone)]
struct FakeAgent {
    health: watch::Receiver<pb::Health>,
    interval: Option<Duration>,
    killed: watch::Receiver<bool>,
    active: Arc<AtomicUsize>,
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<pb::Health, Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("fake agent"))
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    type StreamHealthStream = HealthStream;

    async fn stream_health(
        &self,
        _: Request<pb::StreamHealthRequest>,
    ) -> Result<Response<HealthStream>, Status> {
        let mut rx = self.health.clone();
        let mut killed = self.killed.clone();
        let every = self.interval;
        let active = self.active.clone();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            active.fetch_add(1, Ordering::SeqCst);
            loop {
                let h = rx.borrow_and_update().clone();
                if tx.send(Ok(h)).await.is_err() {
                    break;
                }
                let tick = async {
                    match every {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tick => {}
                    _ = async { let _ = killed.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("agent killed"))).await;
                        break;
                    }
                    _ = tx.closed() => break,
                }
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
    async fn full_status(
        &self,
        _: Request<pb::FullStatusRequest>,
    ) -> Result<Response<pb::Health>, Status> {
        Ok(Response::new(self.health.borrow().clone()))
    }
    async fn stop_replication(
        &self,
        _: Request<pb::StopReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn start_replication(
        &self,
        _: Request<pb::StartReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn wait_for_position(
        &self,
        _: Request<pb::WaitForPositionRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn set_read_only(
        &self,
        _: Request<pb::SetReadOnlyRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn set_replication_source(
        &self,
        _: Request<pb::SetReplicationSourceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn reset_replication(
        &self,
        _: Request<pb::ResetReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn set_semi_sync(
        &self,
        _: Request<pb::SetSemiSyncRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn promote(
        &self,
        _: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn demote(
        &self,
        _: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
    async fn undo_demote(
        &self,
        _: Request<pb::UndoDemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }

    async fn fence_server(
        &self,
        _: Request<pb::FenceServerRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        unimplemented()
    }
}

/// A running fake agent; `kill` breaks its streams and closes its port.
struct FakeServer {
    addr: SocketAddr,
    health: watch::Sender<pb::Health>,
    killed: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start(addr: SocketAddr, health: pb::Health, interval: Option<Duration>) -> FakeServer {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake agent");
        let addr = listener.local_addr().unwrap();
        let (health_tx, health_rx) = watch::channel(health);
        let (killed_tx, killed_rx) = watch::channel(false);
        let active = Arc::new(AtomicUsize::new(0));
        let svc = FakeAgent {
            health: health_rx,
            interval,
            killed: killed_rx,
            active: active.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        FakeServer {
            addr,
            health: health_tx,
            killed: killed_tx,
            active,
            task,
        }
    }

    fn kill(&self) {
        self.task.abort();
        let _ = self.killed.send(true);
    }
}

fn health(alias: &str, read_only: bool, marker: &str) -> pb::Health {
    pb::Health {
        alias: alias.into(),
        mysql_reachable: true,
        mysql_addr: marker.into(),
        mysql: Some(pb::MysqlStatus {
            read_only,
            ..Default::default()
        }),
        term: 1,
        ..Default::default()
    }
}

struct Topology {
    tablets: watch::Sender<TabletMap>,
    _shards: watch::Sender<ShardMap>,
    _synced: watch::Sender<bool>,
}

fn topology(tablets: Vec<TabletRecord>) -> (Topology, TopoInputs) {
    let map: BTreeMap<String, TabletRecord> =
        tablets.into_iter().map(|t| (t.alias.clone(), t)).collect();
    let shards: BTreeMap<(String, String), topo::ShardRecord> = [(
        ("ks".to_string(), "0".to_string()),
        shard_record("ks", "0", Some("zone1-101"), 1),
    )]
    .into();
    let (t_tx, t_rx) = watch::channel(Arc::new(map));
    let (s_tx, s_rx) = watch::channel(Arc::new(shards));
    let (y_tx, y_rx) = watch::channel(true);
    let (_, q_rx) = watch::channel(Arc::default());
    let inputs = TopoInputs {
        tablets: t_rx,
        shards: s_rx,
        tablets_synced: y_rx.clone(),
        shards_synced: y_rx.clone(),
        quarantine: q_rx,
        quarantine_synced: y_rx,
    };
    (
        Topology {
            tablets: t_tx,
            _shards: s_tx,
            _synced: y_tx,
        },
        inputs,
    )
}

fn fast() -> WatchOptions {
    WatchOptions {
        connect_timeout: Duration::from_millis(500),
        keepalive_interval: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(10),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        tls: None,
    }
}

fn record_at(alias: &str, addr: SocketAddr) -> TabletRecord {
    TabletRecord {
        grpc_addr: addr.to_string(),
        ..tablet_record(alias, "ks", "0")
    }
}

async fn wait(
    w: &TabletWatch,
    what: &str,
    pred: impl FnMut(&FleetSnapshot) -> bool,
) -> Arc<FleetSnapshot> {
    match w.wait_for(WAIT, pred).await {
        Some(s) => s,
        None => panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            w.snapshot()
        ),
    }
}

fn marker_of(s: &FleetSnapshot, alias: &str) -> Option<String> {
    Some(s.tablet(alias)?.health()?.mysql_addr.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_health_breaks_reconnects_moves_and_deregistrations() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = FakeServer::start(
        any,
        health("zone1-101", false, "a"),
        Some(Duration::from_millis(200)),
    )
    .await;
    let (topo, inputs) = topology(vec![record_at("zone1-101", a.addr)]);
    let w = TabletWatch::start_with(inputs, fast());

    let s = wait(&w, "connected with health", |s| {
        s.tablet("zone1-101")
            .is_some_and(|t| t.is_connected() && t.health().is_some())
    })
    .await;
    assert!(s.topo_synced);
    let shard = s.shard("ks", "0").expect("shard view");
    assert_eq!(shard.primary_alias(), Some("zone1-101"));
    assert_eq!(shard.primary().and_then(|t| t.read_only()), Some(false));

    // A change is pushed at once.
    a.health.send_replace(health("zone1-101", true, "a"));
    wait(&w, "read_only flip", |s| {
        s.tablet("zone1-101").and_then(|t| t.read_only()) == Some(true)
    })
    .await;

    // The agent dies: the stream breaks, the last health is kept, retries fail.
    a.kill();
    let s = wait(&w, "stream down", |s| {
        s.tablet("zone1-101")
            .is_some_and(|t| !t.is_connected() && t.stream.last_error().is_some())
    })
    .await;
    let t = s.tablet("zone1-101").unwrap();
    assert!(t.health().is_some(), "last health kept after the break");
    eprintln!("after kill: {:?}", t.stream);
    wait(&w, "failed reconnects", |s| {
        matches!(s.tablet("zone1-101").map(|t| &t.stream),
            Some(tabletwatch::StreamState::Connecting { failures, .. }) if *failures >= 2)
    })
    .await;

    // It comes back on the same port: the stream is re-established.
    let a2 = FakeServer::start(
        a.addr,
        health("zone1-101", true, "a2"),
        Some(Duration::from_millis(200)),
    )
    .await;
    wait(&w, "reconnected", |s| {
        s.tablet("zone1-101").is_some_and(|t| t.is_connected())
            && marker_of(s, "zone1-101").as_deref() == Some("a2")
    })
    .await;

    // It re-registers on another address: the watch moves there and drops the old stream.
    let b = FakeServer::start(
        any,
        health("zone1-101", true, "b"),
        Some(Duration::from_millis(200)),
    )
    .await;
    topo.tablets.send_replace(Arc::new(
        [("zone1-101".to_string(), record_at("zone1-101", b.addr))].into(),
    ));
    wait(&w, "moved", |s| {
        marker_of(s, "zone1-101").as_deref() == Some("b")
    })
    .await;
    for _ in 0..100 {
        if a2.active.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        a2.active.load(Ordering::SeqCst),
        0,
        "the old address's stream is closed"
    );

    // Deregistered: gone from the snapshot and its stream closed; the shard record stays.
    topo.tablets.send_replace(Arc::new(BTreeMap::new()));
    let s = wait(&w, "deregistered", |s| s.tablet("zone1-101").is_none()).await;
    assert!(s
        .shard("ks", "0")
        .is_some_and(|v| v.tablets.is_empty() && v.record.is_some()));
    for _ in 0..100 {
        if b.active.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.active.load(Ordering::SeqCst),
        0,
        "the deregistered tablet's stream is closed"
    );
    b.kill();
    a2.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agent_is_reported_with_the_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_topo, inputs) = topology(vec![
        record_at("zone1-102", addr),
        TabletRecord {
            keyspace: "other".into(),
            ..record_at("zone1-201", addr)
        },
    ]);
    let w = TabletWatch::start_with(inputs, fast());
    let s = wait(&w, "connect failures", |s| {
        s.tablet("zone1-102")
            .and_then(|t| t.stream.last_error())
            .is_some()
    })
    .await;
    let t = s.tablet("zone1-102").unwrap();
    assert!(!t.is_connected());
    assert!(t.health().is_none());
    let err = t.stream.last_error().unwrap();
    assert!(err.contains(&addr.to_string()), "{err}");
    // A tablet of a shard without a record still shows, under its shard.
    let other = s.shard("other", "0").expect("shard of a registered tablet");
    assert!(other.record.is_none());
    assert!(other.tablet("zone1-201").is_some());
    assert_eq!(s.tablet_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stream_is_dropped_after_the_idle_timeout() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Sends one message, then nothing (no periodic push).
    let a = FakeServer::start(any, health("zone1-103", true, "a"), None).await;
    let (_topo, inputs) = topology(vec![record_at("zone1-103", a.addr)]);
    let w = TabletWatch::start_with(
        inputs,
        WatchOptions {
            idle_timeout: Duration::from_millis(300),
            ..fast()
        },
    );
    wait(&w, "connected", |s| {
        s.tablet("zone1-103")
            .is_some_and(|t| t.is_connected() && t.health().is_some())
    })
    .await;
    let s = wait(&w, "idle break", |s| {
        s.tablet("zone1-103")
            .and_then(|t| t.stream.last_error())
            .is_some_and(|e| e.contains("no health message"))
    })
    .await;
    assert!(s.tablet("zone1-103").unwrap().health().is_some());
    a.kill();
}
