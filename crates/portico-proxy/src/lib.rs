//! Portico's data plane.
//!
//! Owns: listeners (plain HTTP/1.1 + h2c, TLS with SNI and ALPN), the request pipeline
//! (limits, normalization, routing, policy phases, proxying, logging), compiling a
//! validated configuration into an immutable [`Snapshot`] published through
//! `ArcSwap`, reload and graceful shutdown, metrics and the access log.
//!
//! Does not own: the configuration format (`portico-config`), policies
//! (`portico-plugins`), upstream clients and health (`portico-upstream`), or the admin
//! API (`portico-admin`).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod aggregate;
pub mod bodyclock;
pub mod forward;
pub mod gateway;
pub mod h1server;
pub mod logbody;
pub mod metrics;
pub mod mirror;
pub mod pipeline;
pub mod server;
pub mod snapshot;
pub mod split;
pub mod subrequest;
pub mod tls;

pub use gateway::Gateway;
pub use portico_store as store;
pub use portico_upstream::UpstreamState;
pub use snapshot::{CompiledRoute, Snapshot};
