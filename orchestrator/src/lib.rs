//! myha-orchestrator: follows every tablet's health, analyses each shard, and recovers.
//!
//! - [`problem`]: every problem code and its facts (urgency, remedy, holds), in one table;
//! - [`analysis`]: pure `(shard input) -> problems` and candidate choice;
//! - [`ranking`]: the one candidate ranking both reparents use;
//! - [`input`]: builds the analysis input from a snapshot or from fresh `FullStatus` answers;
//! - [`engine`]: the decision loop and its published [`engine::EngineView`];
//! - [`recovery`]: what runs under the shard lock (emergency reparent, repairs);
//! - [`control`]: etcd-backed operator switches (disable, ack, quarantine) and flapping;
//! - [`operator`]: operator-requested reparents (planned, emergency), streamed as they run;
//! - [`api`]: the HTTP API's pure JSON translation and request parsing; [`auth`]: its tokens,
//!   roles and the authorization decision; [`http`]: its routes and handlers.

pub mod analysis;
pub mod api;
pub mod auth;
pub mod config;
pub mod control;
pub mod engine;
pub mod http;
pub mod input;
pub use myha_mutants as mutants;
pub mod operator;
pub mod problem;
pub mod ranking;
pub mod recovery;
