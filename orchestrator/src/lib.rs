//! myha-orchestrator: follows every tablet's health, analyses each shard, and recovers.

pub mod analysis;
pub mod api;
pub mod config;
