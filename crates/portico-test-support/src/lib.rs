//! Shared helpers for Portico end-to-end tests.
//!
//! Everything here talks to real sockets on `127.0.0.1` ephemeral ports:
//!
//! * [`upstream`]: an HTTP/1.1 + h2c (or TLS with ALPN `h2`/`http/1.1`) upstream server
//!   with echo, status, sleep, streaming download and streaming upload endpoints.
//! * [`certs`]: a throw-away certificate authority issuing leaf certificates, plus
//!   rustls config builders using the aws-lc-rs provider.
//! * [`gateway`]: starts the real `portico` binary in a temporary directory and
//!   controls it (config rewrite, signals, logs, RSS, exit).
//! * [`daemon`]: third-party servers (dnsmasq, etcd) as child processes; a missing
//!   binary fails the test naming its package.
//! * [`client`]: preconfigured `reqwest` clients and a raw TCP helper.
//! * [`response`]: [`RawResponse`], a response as plain data, parsed from raw
//!   HTTP/1.1 text or read from a `reqwest` response.
//!
//! # Runtime note
//! [`upstream::Upstream`] runs on the tokio runtime it was started from. The
//! blocking helpers of [`gateway::Gateway`] block the calling thread (for at most
//! their timeout), so with the default current-thread `#[tokio::test]` runtime the
//! upstreams make no progress while e.g. [`gateway::Gateway::start`] waits. Prefer
//! `#[tokio::test(flavor = "multi_thread")]`, or the `*_async` variants, when the
//! gateway needs the upstreams during startup.

#![allow(clippy::unwrap_used)]

pub mod certs;
pub mod client;
pub mod daemon;
pub mod gateway;
pub mod redis;
pub mod response;
pub mod sink;
pub mod upstream;

use std::future::Future;
use std::time::{Duration, Instant};

pub use certs::{Ca, Cert};
pub use client::{h2c_client, http_client, raw_http, tls_client};
pub use gateway::{free_port, portico_bin, Gateway, LocalGateway};
pub use response::RawResponse;
pub use upstream::{BoxBody, Handler, Upstream};

/// Polls `check` every `interval` until it returns `true` or `timeout` elapses.
///
/// Returns whether the condition became true. Useful for "eventually" assertions
/// such as waiting for a config reload to take effect.
pub async fn wait_until<F, Fut>(timeout: Duration, interval: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(interval).await;
    }
}
