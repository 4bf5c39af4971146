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
use crate::agent::Shared;
use crate::health;

pub struct AgentService {
    pub shared: Arc<Shared>,
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<pb::Health, Status>> + Send + 'static>>;

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

#[tonic::async_trait]
impl Agent for AgentService {
    type StreamHealthStream = HealthStream;

    async fn stream_health(
        &self,
        _req: Request<pb::StreamHealthRequest>,
    ) -> Result<Response<Self::StreamHealthStream>, Status> {
        let mut rx = self.shared.health.subscribe();
        let every = self.shared.cfg.agent.health_interval;
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
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
        let timeout = self.shared.endpoint.query_timeout;
        let h = match self.shared.connect().await {
            Ok((mut conn, dialect)) => {
                let poll = health::observe(&mut conn, dialect, timeout)
                    .await
                    .map_err(|e| e.to_string());
                let mut h = self.shared.health_from(&poll);
                // The same stall report as the pushed health: a recovery re-analyses on this.
                if poll.is_ok() {
                    crate::agent::report_write_stall(&self.shared, &mut conn, &mut h, timeout)
                        .await;
                }
                h
            }
            Err(e) => self.shared.health_from(&Err(e.to_string())),
        };
        Ok(Response::new(h))
    }

    async fn stop_replication(
        &self,
        req: Request<pb::StopReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::stop_replication(&self.shared, req.into_inner()).await)
    }

    async fn start_replication(
        &self,
        req: Request<pb::StartReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::start_replication(&self.shared, req.into_inner()).await)
    }

    async fn wait_for_position(
        &self,
        req: Request<pb::WaitForPositionRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::wait_for_position(&self.shared, req.into_inner()).await)
    }

    async fn set_read_only(
        &self,
        req: Request<pb::SetReadOnlyRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::set_read_only(&self.shared, req.into_inner()).await)
    }

    async fn set_replication_source(
        &self,
        req: Request<pb::SetReplicationSourceRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::set_replication_source(&self.shared, req.into_inner()).await)
    }

    async fn reset_replication(
        &self,
        req: Request<pb::ResetReplicationRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::reset_replication(&self.shared, req.into_inner()).await)
    }

    async fn set_semi_sync(
        &self,
        req: Request<pb::SetSemiSyncRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::set_semi_sync(&self.shared, req.into_inner()).await)
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::promote(&self.shared, req.into_inner()).await)
    }

    async fn demote(
        &self,
        req: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::demote(&self.shared, req.into_inner()).await)
    }

    async fn undo_demote(
        &self,
        req: Request<pb::UndoDemoteRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::undo_demote(&self.shared, req.into_inner()).await)
    }

    async fn fence_server(
        &self,
        req: Request<pb::FenceServerRequest>,
    ) -> Result<Response<pb::ActionResponse>, Status> {
        answer(actions::fence_server(&self.shared, req.into_inner()).await)
    }
}
