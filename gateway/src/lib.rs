//! myha-gateway as a library: its config types ([`config`]), the pure routing function
//! ([`routing`]) and the proxy ([`proxy`]). The binary (`main.rs`) parses arguments and runs
//! them; the test harness and the simulator use the same types instead of describing them
//! again. [`splice`] (how the server's greeting and everything after it reach the client,
//! unparsed) and [`mysql`] (the error packet sent in the greeting's place) are public for the
//! fuzz targets of `myha-fuzzing`.

pub mod affinity;
pub mod config;
pub mod mysql;
pub mod proxy;
pub mod routing;
pub mod splice;
