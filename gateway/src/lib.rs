//! myha-gateway as a library: its config types ([`config`]), the pure routing function
//! ([`routing`]) and the proxy ([`proxy`]). The binary (`main.rs`) parses arguments and runs
//! them; the test harness and the simulator use the same types instead of describing them
//! again.

pub mod affinity;
pub mod config;
mod mysql;
pub mod proxy;
pub mod routing;
mod splice;
