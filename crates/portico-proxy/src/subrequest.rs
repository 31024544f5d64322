//! One request the gateway makes on its own behalf to an upstream (a mirrored copy, an
//! aggregate's call): a target picked by the upstream's balancer, one try, the
//! upstream's connection pool, and the answer's body read with a bound.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use portico_plugins::Body;
use portico_upstream::{Field, Overlay, Terms, Upstream};

/// What an upstream answered.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `None`: larger than the bound, or it failed or stalled while being read.
    pub body: Option<Bytes>,
}

/// Why no answer came.
#[derive(Debug)]
pub enum Failure {
    /// No target could be tried.
    NoTarget,
    /// The connection failed or was lost.
    Failed(String),
    /// No answer within the time limit.
    Timeout(Duration),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoTarget => f.write_str("the upstream has no available target"),
            Failure::Failed(e) => write!(f, "the upstream request failed: {e}"),
            Failure::Timeout(t) => write!(f, "no answer within {t:?}"),
        }
    }
}

/// The request to send.
pub struct Sub {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The gateway's own headers (forwarded-for, request id); `host` is set here.
    pub overlay: Overlay,
    pub body: Body,
}

/// Send `sub` to one target of `up`: `connect` and `limit` bound connecting and the
/// whole exchange (answer body included), at most `max_body` of the answer is read.
pub async fn send_once(
    up: &Upstream,
    sub: Sub,
    connect: Duration,
    limit: Duration,
    max_body: u64,
) -> Result<Answer, Failure> {
    let set = up.live.current();
    let Some(i) = up.pick(&set, &[], None) else {
        return Err(Failure::NoTarget);
    };
    let t = &set.targets[i];
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = sub.method;
    parts.uri = sub.uri;
    parts.headers = sub.headers;
    let mut overlay = sub.overlay;
    overlay.host = Field::Set(t.host_header.clone());
    let in_flight = t.health.enter();
    let exchange = async {
        let resp = t
            .pool
            .send(
                &mut parts,
                None,
                sub.body,
                &overlay,
                Terms {
                    connect,
                    idle: Some(limit),
                    replayable: false,
                    raw_head: false,
                },
            )
            .await
            .map_err(|f| Failure::Failed(f.error.to_string()))?;
        let (head, mut body) = resp.into_parts();
        let body = portico_plugins::body::read_limited(&mut body, None, max_body)
            .await
            .ok();
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body,
        })
    };
    let out = match tokio::time::timeout(limit, exchange).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout(limit)),
    };
    drop(in_flight);
    out
}
