//! launchday: an edge HTTP load balancer for launch day.
//!
//! `main.rs` is only the CLI; everything else lives here so that `tests/` and
//! `benches/` can drive the real components. See `README.md` for the user's view and
//! `../shared/DESIGN.md` for the architecture and the external contract.

pub mod accesslog;
pub mod admin;
pub mod body;
pub mod coalesce;
pub mod config;
pub mod conn;
pub mod demo;
pub mod edge;
pub mod h1_server;
pub mod headers;
pub mod health;
pub mod history;
pub mod hll;
pub mod listener;
pub mod maintenance;
pub mod metrics;
pub mod page_cache;
pub mod park;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod recycle;
pub mod reload;
pub mod route;
pub mod sched;
pub mod server;
pub mod status;
pub mod strict;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
pub mod upstream_h1;
pub mod upstream_io;
