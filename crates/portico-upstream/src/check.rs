//! Active health checks: every target of an upstream is probed on a timer; after
//! `unhealthy_threshold` failed probes in a row a target leaves rotation, after
//! `healthy_threshold` good ones it comes back. Each probe of a round starts after a
//! random delay of up to `jitter`, so targets (and upstreams) are not probed in
//! lockstep. HTTP probes go through the target's own connection pool (its TLS and
//! HTTP/2 settings), TCP probes open a connection and close it.
//!
//! A target the checker has not probed yet (new, or just discovered) counts as
//! healthy: traffic is not held back waiting for the first round.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use portico_config::discovery::{ActiveCheck, CheckKind};
use portico_plugins::Body;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{timeout, Instant};

use crate::supervise::Stop;
use crate::{Live, Overlay, Target, Terms};

/// The most of a probe's response body read to look for `body_contains`.
const MAX_PROBE_BODY: u64 = 64 * 1024;

static USER_AGENT: HeaderValue = HeaderValue::from_static("portico-health-check");

/// Start the checker of upstream `name`; once `stop` says so, it records no verdict.
pub fn spawn(name: Arc<str>, cfg: ActiveCheck, live: Arc<Live>, stop: Arc<Stop>) -> JoinHandle<()> {
    tokio::spawn(run(name, Arc::new(cfg), live, stop))
}

async fn run(name: Arc<str>, cfg: Arc<ActiveCheck>, live: Arc<Live>, stop: Arc<Stop>) {
    let interval = cfg.interval.0;
    let jitter = cfg.jitter.map_or(interval / 10, |j| j.0);
    loop {
        let round = Instant::now();
        let set = live.current();
        let mut probes = JoinSet::new();
        for i in 0..set.targets.len() {
            let (set, cfg) = (set.clone(), cfg.clone());
            let delay = jitter.mul_f64(fastrand::f64());
            probes.spawn(async move {
                tokio::time::sleep(delay).await;
                let t = &set.targets[i];
                let result = probe(t, &cfg).await;
                (i, result)
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((i, result)) = done else { continue };
            let t = &set.targets[i];
            let ok = result.is_ok();
            let Some(changed) = stop.unless_stopped(|| {
                t.health
                    .checked(ok, cfg.healthy_threshold, cfg.unhealthy_threshold)
            }) else {
                return;
            };
            match changed {
                Some(true) => {
                    tracing::info!(upstream = %name, target = %t.url, "target healthy again (active checks)")
                }
                Some(false) => {
                    let why = result.err().unwrap_or_default();
                    tracing::warn!(upstream = %name, target = %t.url, reason = %why, "target unhealthy (active checks): out of rotation")
                }
                None => {}
            }
        }
        tokio::time::sleep_until(round + interval).await;
    }
}

/// One probe of target `t`: `Err` says why it failed.
async fn probe(t: &Target, cfg: &ActiveCheck) -> Result<(), String> {
    let limit = cfg.timeout.0;
    match cfg.kind {
        CheckKind::Tcp => {
            let addr = format!(
                "{}:{}",
                t.pool.host().trim_start_matches('[').trim_end_matches(']'),
                t.pool.port()
            );
            match timeout(limit, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect: {e}")),
                Err(_) => Err(format!("no connection within {limit:?}")),
            }
        }
        CheckKind::Http => match timeout(limit, http_probe(t, cfg, limit)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {limit:?}")),
        },
    }
}

async fn http_probe(t: &Target, cfg: &ActiveCheck, limit: Duration) -> Result<(), String> {
    let method = Method::from_bytes(cfg.method.as_bytes()).unwrap_or(Method::GET);
    let host = match &cfg.host {
        Some(h) => HeaderValue::from_str(h).unwrap_or_else(|_| t.host_header.clone()),
        None => t.host_header.clone(),
    };
    let (mut parts, ()) = Request::builder()
        .method(method)
        .uri(cfg.path.as_str())
        .body(())
        .map_err(|e| format!("bad probe request: {e}"))?
        .into_parts();
    parts.headers.insert(header::HOST, host);
    parts.headers.insert(header::USER_AGENT, USER_AGENT.clone());
    let resp = t
        .pool
        .send(
            &mut parts,
            None,
            Body::Empty,
            &Overlay::default(),
            Terms {
                connect: limit,
                idle: Some(limit),
                replayable: true,
                raw_head: false,
            },
        )
        .await
        .map_err(|f| format!("request failed: {}", f.error))?;
    let status = resp.status().as_u16();
    let good = if cfg.expected_statuses.is_empty() {
        (200..400).contains(&status)
    } else {
        cfg.expected_statuses.contains(&status)
    };
    let mut body = resp.into_body();
    // Read the body (bounded) so the connection can be reused, and to search it.
    let text = portico_plugins::body::read_limited(&mut body, None, MAX_PROBE_BODY)
        .await
        .unwrap_or_else(|_| Bytes::new());
    if !good {
        return Err(format!("status {status}"));
    }
    if let Some(needle) = &cfg.body_contains {
        if !contains(&text, needle.as_bytes()) {
            return Err(format!("the body does not contain `{needle}`"));
        }
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::contains;

    #[test]
    fn body_search() {
        assert!(contains(b"status: ok", b"ok"));
        assert!(!contains(b"status: down", b"ok"));
        assert!(contains(b"", b""));
        assert!(!contains(b"o", b"ok"));
    }
}
