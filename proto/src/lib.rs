//! Generated gRPC types for the agent service (`myha.agent.v1`).

#[allow(clippy::all, clippy::pedantic)]
pub mod agent {
    tonic::include_proto!("myha.agent.v1");
}
