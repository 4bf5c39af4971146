//! gRPC channels to the agents and the typed call every recovery step makes through them.

use super::*;

/// gRPC channels to agents, by address, shared by every recovery. Channels are lazy and
/// reconnect by themselves; a call to a dead agent fails within `connect_timeout`.
#[derive(Clone, Debug)]
pub struct AgentClients {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    connect_timeout: Duration,
    /// The orchestrator's certificates (`[tls]`): agents are called over TLS with them, as
    /// an identity on their `grpc_allowed_clients`.
    tls: Option<Arc<pki::Material>>,
}

impl AgentClients {
    pub fn new(connect_timeout: Duration) -> AgentClients {
        AgentClients {
            channels: Arc::default(),
            connect_timeout,
            tls: None,
        }
    }

    /// Calls agents over TLS with `tls` (channels made before keep plaintext: set it first).
    pub fn with_tls(mut self, tls: Option<pki::Material>) -> AgentClients {
        self.tls = tls.map(Arc::new);
        self
    }

    fn endpoint(&self, tablet: &TabletRecord) -> Result<Endpoint, RecoveryError> {
        let addr = tablet.grpc_addr.trim();
        let bad = |reason: String| RecoveryError::AgentAddress {
            tablet: tablet.alias.clone(),
            addr: tablet.grpc_addr.clone(),
            reason,
        };
        if addr.is_empty() {
            return Err(bad("the registration has no grpc_addr".into()));
        }
        let ep = pki::grpc_endpoint(addr, self.tls.as_deref()).map_err(bad)?;
        // No Nagle: a request written in several frames would otherwise wait ~40 ms for the
        // peer's delayed ACK.
        Ok(ep
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(self.connect_timeout)
            .keep_alive_while_idle(true))
    }

    /// A client for the agent of `tablet` (never blocks: a channel not warmed yet connects on
    /// its first call).
    pub fn client(&self, tablet: &TabletRecord) -> Result<AgentClient<Channel>, RecoveryError> {
        let addr = tablet.grpc_addr.trim().to_string();
        if let Some(ch) = self.cached(&addr) {
            return Ok(AgentClient::new(ch));
        }
        let ch = self.endpoint(tablet)?.connect_lazy();
        let ch = self.insert_if_absent(addr, ch);
        Ok(AgentClient::new(ch))
    }

    fn cached(&self, addr: &str) -> Option<Channel> {
        self.channels.lock().ok()?.get(addr).cloned()
    }

    fn insert_if_absent(&self, addr: String, ch: Channel) -> Channel {
        match self.channels.lock() {
            Ok(mut map) => map.entry(addr).or_insert(ch).clone(),
            Err(_) => ch,
        }
    }

    /// Connects to the agent of `tablet` in the background unless a channel exists, so that
    /// the first call of a recovery does not pay for the connection (~40 ms on loopback).
    /// Needs a tokio runtime.
    pub fn warm(&self, tablet: &TabletRecord) {
        let addr = tablet.grpc_addr.trim().to_string();
        if addr.is_empty() || self.cached(&addr).is_some() {
            return;
        }
        let Ok(ep) = self.endpoint(tablet) else {
            return;
        };
        // Reserve the slot with a lazy channel, replaced by the connected one.
        let lazy = ep.connect_lazy();
        self.insert_if_absent(addr.clone(), lazy);
        let channels = self.channels.clone();
        tokio::spawn(async move {
            if let Ok(ch) = ep.connect().await {
                if let Ok(mut map) = channels.lock() {
                    map.insert(addr, ch);
                }
            }
        });
    }

    /// Drops the cached channel of an address (e.g. after the tablet re-registered).
    pub fn forget(&self, grpc_addr: &str) {
        if let Ok(mut map) = self.channels.lock() {
            map.remove(grpc_addr.trim());
        }
    }
}

/// `FullStatus` of one agent, bounded.
pub async fn full_status(
    agents: &AgentClients,
    tablet: &TabletRecord,
    timeout: Duration,
) -> Result<pb::Health, RecoveryError> {
    let mut client = agents.client(tablet)?;
    let started = Instant::now();
    let r = tokio::time::timeout(timeout, client.full_status(pb::FullStatusRequest {})).await;
    tracing::debug!(tablet = %tablet.alias, took_ms = started.elapsed().as_secs_f64() * 1000.0, "FullStatus");
    match r {
        Err(_) => Err(RecoveryError::AgentTimeout {
            rpc: "FullStatus",
            tablet: tablet.alias.clone(),
            after: timeout,
        }),
        Ok(Err(status)) => Err(agent_error("FullStatus", &tablet.alias, &status)),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

pub(super) fn agent_error(rpc: &'static str, tablet: &str, s: &tonic::Status) -> RecoveryError {
    let mut message = s.message().to_string();
    if let Some(src) = std::error::Error::source(s) {
        message.push_str(&format!(" ({src})"));
    }
    RecoveryError::Agent {
        rpc,
        tablet: tablet.to_string(),
        code: s.code(),
        message,
        stale: myha_proto::stale_term_refusal(s),
    }
}
