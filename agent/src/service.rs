//! The gRPC face of the agent.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use myha_proto::agent as pb;
use myha_proto::agent::agent_server::Agent;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::actions::{self, ActionError};
use crate::agent::{RpcLimits, Shared};
use crate::health;
use crate::mysql::MysqlError;

pub struct AgentService {
    pub shared: Arc<Shared>,
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<pb::Health, Status>> + Send + 'static>>;

/// A permit of `pool`, or `RESOURCE_EXHAUSTED` naming the bound (never queued: a flood of
/// calls must not hold memory or MySQL connections while it waits).
fn permit(
    pool: &Arc<tokio::sync::Semaphore>,
    what: &str,
    limit: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
    pool.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!("myha_agent_rpcs_refused_total", "kind" => what.to_string()).increment(1);
        Status::resource_exhausted(format!(
            "too many concurrent {what} (at most {limit}); retry shortly"
        ))
    })
}

/// The mutating RPCs' requests: each carries the caller's action context.
trait Acting {
    fn ctx_mut(&mut self) -> &mut Option<pb::ActionContext>;
}

macro_rules! acting {
    ($($t:ty),* $(,)?) => {
        $(impl Acting for $t {
            fn ctx_mut(&mut self) -> &mut Option<pb::ActionContext> {
                &mut self.ctx
            }
        })*
    };
}

acting!(
    pb::StopReplicationRequest,
    pb::StartReplicationRequest,
    pb::WaitForPositionRequest,
    pb::SetReadOnlyRequest,
    pb::SetReplicationSourceRequest,
    pb::ResetReplicationRequest,
    pb::SetSemiSyncRequest,
    pb::PromoteRequest,
    pb::DemoteRequest,
    pb::UndoDemoteRequest,
    pb::FenceServerRequest,
);

impl AgentService {
    /// Admits a mutating RPC: with `[tls]`, only a caller whose certificate names an identity
    /// of `agent.grpc_allowed_clients` (the TLS handshake already required a certificate of
    /// the cluster CA, valid now). The request's free-text requester is kept, prefixed by the
    /// authenticated identity: what the agent logs and records as the actor is never a name
    /// taken from the request alone.
    fn admit<T: Acting>(&self, req: Request<T>, rpc: &'static str) -> Result<T, Status> {
        let identity = if self.shared.cfg.tls.is_some() {
            let refuse = |why: String| {
                metrics::counter!("myha_agent_rpcs_refused_total", "kind" => "not_allowed")
                    .increment(1);
                warn!(rpc, reason = %why, "mutating RPC refused");
                Status::permission_denied(format!("{rpc} refused: {why}"))
            };
            let certs = req
                .peer_certs()
                .ok_or_else(|| refuse("no client certificate".into()))?;
            let leaf = certs
                .first()
                .ok_or_else(|| refuse("no client certificate".into()))?;
            let identity = pki::peer_identity(leaf).map_err(|e| refuse(e.to_string()))?;
            if !self
                .shared
                .cfg
                .agent
                .grpc_allowed_clients
                .contains(&identity)
            {
                return Err(refuse(format!(
                    "identity {identity:?} is not in agent.grpc_allowed_clients (only the \
                     orchestrators may change this tablet)"
                )));
            }
            Some(identity)
        } else {
            None
        };
        let mut inner = req.into_inner();
        if let (Some(identity), Some(ctx)) = (identity, inner.ctx_mut().as_mut()) {
            ctx.requester = if ctx.requester.is_empty() {
                format!("cert:{identity}")
            } else {
                format!("cert:{identity} ({})", ctx.requester)
            };
        }
        Ok(inner)
    }
}

fn answer(
    r: Result<pb::ActionResponse, ActionError>,
) -> Result<Response<pb::ActionResponse>, Status> {
    match r {
        Ok(resp) => Ok(Response::new(resp)),
        Err(e) => {
            warn!(error = %e, "action refused or failed");
            let outcome = match e {
                ActionError::StaleTerm { .. } => "stale_term",
                ActionError::Invalid { .. } => "invalid",
                ActionError::Refused { .. } => "refused",
                ActionError::Deadline { .. } => "deadline",
                ActionError::Mysql { .. } => "mysql_error",
            };
            let action = match &e {
                ActionError::StaleTerm { action, .. }
                | ActionError::Invalid { action, .. }
                | ActionError::Refused { action, .. }
                | ActionError::Deadline { action, .. }
                | ActionError::Mysql { action, .. } => *action,
            };
            metrics::counter!("myha_agent_actions_total", "action" => action, "outcome" => outcome)
                .increment(1);
            Err(e.into())
        }
    }
}

/// One poll of mysqld on the kept `FullStatus` connection (made first when there is none),
/// with the write-stall report; the connection is dropped when the poll fails. Also returns
/// whether the failure was a timeout.
async fn full_poll(
    shared: &Arc<Shared>,
    slot: &mut Option<(mysql_async::Conn, flavor::Dialect)>,
    timeout: std::time::Duration,
) -> (pb::Health, bool) {
    if slot.is_none() {
        match shared.connect().await {
            Ok(c) => *slot = Some(c),
            Err(e) => {
                let timed_out = matches!(e, MysqlError::ConnectTimeout { .. });
                return (shared.health_from(&Err(e.to_string())), timed_out);
            }
        }
    }
    let Some((conn, dialect)) = slot.as_mut() else {
        return (shared.health_from(&Err("no connection".into())), false);
    };
    match health::observe(conn, *dialect, timeout).await {
        Ok(o) => {
            let mut h = shared.health_from(&Ok(o));
            // The same stall report as the pushed health: a recovery re-analyses on this.
            crate::agent::report_write_stall(shared, conn, &mut h, timeout).await;
            (h, false)
        }
        Err(e) => {
            let timed_out = matches!(e, MysqlError::QueryTimeout { .. });
            *slot = None;
            (shared.health_from(&Err(e.to_string())), timed_out)
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type StreamHealthStream = HealthStream;

    async fn stream_health(
        &self,
        _req: Request<pb::StreamHealthRequest>,
    ) -> Result<Response<Self::StreamHealthStream>, Status> {
        let stream_permit = permit(
            &self.shared.limits.streams,
            "health streams",
            RpcLimits::STREAMS,
        )?;
        let mut rx = self.shared.health.subscribe();
        let every = self.shared.cfg.agent.health_interval;
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // Held for the stream's life.
            let _permit = stream_permit;
            loop {
                let h = (**rx.borrow_and_update()).clone();
                if tx.send(Ok(h)).await.is_err() {
                    return; // the caller went away
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn full_status(
        &self,
        _req: Request<pb::FullStatusRequest>,
    ) -> Result<Response<pb::Health>, Status> {
        let _permit = permit(
            &self.shared.limits.status,
            "FullStatus calls",
            RpcLimits::STATUS,
        )?;
        let timeout = self.shared.endpoint.query_timeout;
        // One poll at a time on the kept connection: each answer comes from a poll that
        // started after the call arrived (a recovery reads what its last action did).
        let mut slot = self.shared.status_conn.lock().await;
        let kept = slot.is_some();
        let mut h = full_poll(&self.shared, &mut slot, timeout).await;
        // A kept connection may have died with an earlier mysqld (a restart, a killed
        // session): one new connection says whether mysqld is really unreachable. A timeout
        // is not retried: the server was reached and did not answer (frozen), as a new
        // connection would find after `connect_timeout` more.
        if kept && slot.is_none() && !h.1 {
            h = full_poll(&self.shared, &mut slot, timeout).await;
        }
        Ok(Response::new(h.0))
    }

    async fn stop_replication(
        &self,
        req: Request<pb::StopReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "StopReplication")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::stop_replication(&self.shared, req).await)
    }

    async fn start_replication(
        &self,
        req: Request<pb::StartReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "StartReplication")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::start_replication(&self.shared, req).await)
    }

    async fn wait_for_position(
        &self,
        req: Request<pb::WaitForPositionRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "WaitForPosition")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::wait_for_position(&self.shared, req).await)
    }

    async fn set_read_only(
        &self,
        req: Request<pb::SetReadOnlyRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "SetReadOnly")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::set_read_only(&self.shared, req).await)
    }

    async fn set_replication_source(
        &self,
        req: Request<pb::SetReplicationSourceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "SetReplicationSource")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::set_replication_source(&self.shared, req).await)
    }

    async fn reset_replication(
        &self,
        req: Request<pb::ResetReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "ResetReplication")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::reset_replication(&self.shared, req).await)
    }

    async fn set_semi_sync(
        &self,
        req: Request<pb::SetSemiSyncRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "SetSemiSync")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::set_semi_sync(&self.shared, req).await)
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "Promote")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::promote(&self.shared, req).await)
    }

    async fn demote(
        &self,
        req: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "Demote")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::demote(&self.shared, req).await)
    }

    async fn undo_demote(
        &self,
        req: Request<pb::UndoDemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "UndoDemote")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::undo_demote(&self.shared, req).await)
    }

    async fn fence_server(
        &self,
        req: Request<pb::FenceServerRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        let req = self.admit(req, "FenceServer")?;
        let _permit = permit(&self.shared.limits.actions, "actions", RpcLimits::ACTIONS)?;
        answer(actions::fence_server(&self.shared, req).await)
    }
}
