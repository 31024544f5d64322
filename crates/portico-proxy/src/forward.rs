//! Proxying one request to an upstream: the upstream path, the forwarded headers,
//! target choice with passive health, timeouts, and error mapping.
//!
//! Without `retries`, retries are limited to what is always safe: a request none of
//! which was sent (its connection could not be established) is tried on another target
//! (at most 3 tries); an idempotent request without a body that met a pooled connection
//! the upstream had just closed is repeated once by the pool on a fresh connection.
//! With `retries` (the route's, else the upstream's), a try is repeated on the
//! configured conditions, within the upstream's retry budget (docs/upstreams.md).
//! Each try first asks the circuit breaker, when the upstream has one.

use std::error::Error as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use portico_config::model::Timeouts;
use portico_config::resilience::{HedgeDelay, Hedging};
use portico_plugins::body::{BodyTooLarge, IdleTimeout};
use portico_plugins::clock;
use portico_plugins::{Body, ErrorKind, GatewayError};
use portico_upstream::h1::RawRequest;
use portico_upstream::{
    now_ms, Circuit, ConnectTimeout, Field, Overlay, Permit, Rejected, RetryOn, SendError, Target,
    TargetSet, Terms, Upstream,
};
use tokio::time::Instant;

use crate::bodyclock::{self, BodyClock};
use crate::logbody::Finish;
use crate::pipeline::ConnInfo;
use crate::snapshot::{CompiledRoute, Snapshot};

/// Tries without `retries` configured.
const MAX_TRIES: usize = 3;
/// Targets remembered as tried (or refused by their breaker) for one request.
const MAX_EXCLUDED: usize = 16;

pub(crate) use portico_upstream::overlay::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID,
};
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Remove hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it
/// names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`
/// and `Upgrade`. A request's `TE: trailers` is kept (gRPC needs it upstream); `TE`
/// means nothing in a response.
pub fn strip_hop_by_hop(h: &mut HeaderMap, request: bool) {
    // Most messages carry none of these: one pass over the names instead of a lookup each.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRAILER
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    };
    if !h.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        h.remove(n);
    }
    let te_trailers = request
        && h.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The path sent upstream: the normalized path, rewritten or with its prefix stripped,
/// plus the client's query string unchanged. A `rewrite` may use every template
/// namespace (`${query.page}`, `${header.x-tenant}`, ...), so it sees the request.
fn upstream_path(
    route: &CompiledRoute,
    fin: &Finish,
    req: &http::request::Parts,
    prefix_len: Option<usize>,
) -> String {
    let ctx = &fin.ctx;
    let query = req.uri.query();
    let mut p = if let Some(t) = &route.rewrite {
        ctx.render_path(Some(req), t)
    } else if let (true, Some(n)) = (route.strip_prefix, prefix_len) {
        let rest = ctx.path.get(n..).unwrap_or("");
        if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        }
    } else {
        ctx.path.clone()
    };
    if let Some(q) = query {
        p.push('?');
        p.push_str(q);
    }
    p
}

/// Send the request upstream and return the response head with a streaming body.
pub async fn forward(
    snap: &Snapshot,
    route: &CompiledRoute,
    (up, timeouts): (&Upstream, &Timeouts),
    fin: &mut Finish,
    (parts, body, raw): (
        &mut http::request::Parts,
        Body,
        Option<(&RawRequest, Option<&HeaderValue>)>,
    ),
    conn: &ConnInfo,
    prefix_len: Option<usize>,
) -> Result<Response<Body>, GatewayError> {
    // `consistent_hash`: the request key, on the request as the client sent it (only
    // evaluated when the upstream has one).
    let key_hash = up.key_hash(|k| fin.ctx.key(parts, k));
    // Most requests go upstream with the path they came with: reuse it, unparsed.
    let unchanged = route.rewrite.is_none()
        && !(route.strip_prefix && prefix_len.is_some())
        && fin.ctx.path == parts.uri.path();
    // `None`: the URI is already what goes upstream (origin form, path unchanged).
    let pq = match parts.uri.path_and_query() {
        Some(_) if unchanged && parts.uri.scheme().is_none() => None,
        Some(pq) if unchanged => Some(pq.clone()),
        _ => {
            let p = upstream_path(route, fin, parts, prefix_len);
            // A substituted value of exactly `.` or `..` (path captures never are:
            // routing removed dot segments) would climb out of the rewritten path.
            if route.rewrite.is_some() && portico_plugins::ctx::has_dot_segment(&p) {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    "a value substituted into the route's rewrite makes a `.` or `..` path segment",
                ));
            }
            Some(PathAndQuery::try_from(p).map_err(|_| {
                GatewayError::new(
                    ErrorKind::BadRequest,
                    "the rewritten path is not a valid URI path",
                )
            })?)
        }
    };
    // Fields still unparsed (`raw`, with the `Host` the server read from them):
    // nothing here reads them; hop-by-hop fields are left out as the head is encoded,
    // and identity fields are not among them (the pipeline checked).
    // The client's `Host`: lent by the server with unparsed fields, else a copy (the
    // map changes below).
    let (raw, lent, mut owned) = match raw {
        Some((r, host)) => (Some(r), host, None),
        None => (None, None, parts.headers.get(header::HOST).cloned()),
    };
    if lent.is_none() && owned.is_none() {
        owned = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    }
    let client_host = lent.or(owned.as_ref());
    strip_hop_by_hop(&mut parts.headers, true);
    // Who the caller is: never what the client says, only what a policy established.
    let [name_h, groups_h] = &snap.consumer_headers;
    portico_plugins::ctx::remove_identity_headers(
        &mut parts.headers,
        &snap.consumer_headers,
        fin.ctx.underscores,
    );
    if let Some(c) = &fin.ctx.consumer {
        parts.headers.insert(name_h.clone(), c.name_header.clone());
        if let Some(g) = &c.groups_header {
            parts.headers.insert(groups_h.clone(), g.clone());
        }
    }
    let mut overlay = Overlay {
        request_id: Field::Set(fin.ctx.request_id.header().clone()),
        ..forwarded_headers(snap, conn, &parts.headers, client_host)
    };
    parts.version = Version::HTTP_11;
    // The upstream path (after `rewrite`/`strip_prefix`), which policies may change.
    if let Some(pq) = pq {
        parts.uri = Uri::from(pq);
    }
    if route.edits_upstream_request {
        // The policies see (and may change) the headers, path, query and method as
        // they will be sent.
        overlay.apply(&mut parts.headers);
        for entry in &route.chain {
            entry.policy.upstream_request(&mut fin.ctx, parts);
        }
    }

    // Without `retries`: a request none of which was sent (the connection could not be
    // made) goes to another target (at most 3 tries); an idempotent request without a
    // body that met a pooled connection the upstream had just closed is repeated by the
    // pool itself. With `retries` (the route's, else the upstream's): see `may_retry`.
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let replayable = idempotent && body.is_end_stream();
    let raw_head = fin.raw_response;
    // A copy for the route's mirror (sampled), taken as the request goes upstream.
    let body = match &route.mirror {
        Some(m) => {
            // A request the adaptive limit would refuse now is not copied either (its
            // first try takes its own slot below).
            if let Some(a) = up.adaptive.as_deref().filter(|a| a.shed_if_full()) {
                return Err(overloaded(up, a));
            }
            let len = known_length(&body, &parts.headers);
            let (b, pending) = m.begin(parts, &overlay, body, len);
            fin.mirror = pending;
            b
        }
        None => body,
    };
    let retries = route
        .config
        .retries
        .as_ref()
        .or(up.retries.as_ref())
        .filter(|r| r.attempts > 1);
    let max_tries = retries.map_or(MAX_TRIES, |r| {
        (r.attempts as usize).min(portico_upstream::budget::MAX_ATTEMPTS as usize)
    });
    // The body kept so the request can be sent again (retries only): none, or one
    // whose length is known and at most `max_replay_body`, read before the first try.
    let mut replay: Option<Bytes> = None;
    let mut body = Some(body);
    if let (Some(r), Some(b)) = (retries, body.as_mut()) {
        if b.is_end_stream() {
            replay = Some(Bytes::new());
        } else if known_length(b, &parts.headers).is_some_and(|n| n <= r.max_replay_body.0) {
            if let Some(b) = body.take() {
                // Boxed: only requests kept for a retry read their body here.
                replay = Some(Box::pin(read_body(b)).await?);
            }
        }
        up.budget.deposit(now_ms());
    } else if up.hedging.is_some() {
        up.budget.deposit(now_ms());
    }
    // Hedging needs a body it can send twice: none, or the kept one.
    let hedge_body: Option<Bytes> = match (&up.hedging, &replay) {
        (None, _) => None,
        (Some(_), Some(b)) if idempotent => Some(b.clone()),
        (Some(_), None) if replayable => Some(Bytes::new()),
        _ => None,
    };
    // `request` counts from the end of the request body; `idle` while it streams. A
    // kept body is sent at once: each try has its own `request` deadline.
    let (mut body, clock) = match body {
        Some(b) => {
            let (b, clock) = BodyClock::wrap(b);
            (Some(b), clock)
        }
        None => (None, None),
    };
    // The head stays here, lent to each try; a streamed body goes and comes back when
    // nothing of the request was sent. `excluded`: the targets tried, and those whose
    // own breaker (`per_target`) refused.
    let mut excluded = [usize::MAX; MAX_EXCLUDED];
    let mut n_excluded = 0;
    // Boxed: only set when a try is retried, and kept out of the future's state.
    let mut last: Option<Box<Result<Response<Body>, GatewayError>>> = None;
    // The targets as they are now: indexes stay valid for this request even if
    // discovery changes the set meanwhile.
    let set = up.live.current();
    // `total`: every try, and the pauses between them, end by this.
    let deadline = timeouts.total.map(|t| Instant::now() + t.0);
    for attempt in 0..max_tries {
        let per_try = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(GatewayError::new(
                        ErrorKind::UpstreamTimeout,
                        format!(
                            "the upstream did not answer within the total timeout ({}, {attempt} tries)",
                            timeouts.total.unwrap_or_default()
                        ),
                    ));
                }
                timeouts.request.0.min(left)
            }
            None => timeouts.request.0,
        };
        let request_body = match (&replay, body.take()) {
            (Some(b), _) if b.is_empty() => Body::Empty,
            (Some(b), _) => Body::full(b.clone()),
            (None, Some(b)) => b,
            (None, None) => break,
        };
        // Adaptive concurrency: a slot for as long as this try is in flight to the
        // upstream (until its response head, or its failure), taken only now: not
        // while a kept body is read from the client, nor during the pause between
        // tries. Above the learnt limit the try is not sent: a first try is refused
        // with 503, a retry leaves the client the last answer (as the budget does).
        let admitted = match &up.adaptive {
            Some(a) => match a.try_acquire() {
                Some(adm) => Some(adm),
                None if last.is_some() => break,
                None => return Err(overloaded(up, a)),
            },
            None => None,
        };
        // The target, and the breaker's permit.
        let mut refused: Option<Rejected> = None;
        let mut chosen = None;
        loop {
            let idx = match up.pick(&set, &excluded[..n_excluded], key_hash) {
                Some(i) => Some(i),
                // Every target tried: a retry goes to one of them again.
                None if retries.is_some() && attempt > 0 => up.pick(&set, &[], key_hash),
                None => None,
            };
            let Some(idx) = idx else { break };
            let Some((circuit, breaker)) = up
                .circuit
                .as_ref()
                .and_then(|c| c.breaker(&set.targets[idx]).map(|b| (c, b)))
            else {
                chosen = Some((idx, None));
                break;
            };
            match breaker.try_acquire(now_ms()) {
                Ok(permit) => {
                    if let Some(t) = permit.transition() {
                        circuit.note(&up.name, &set.targets[idx].url, t);
                    }
                    chosen = Some((idx, Some(permit)));
                    break;
                }
                Err(r) => {
                    refused = Some(match refused {
                        Some(p) if p.retry_after <= r.retry_after => p,
                        _ => r,
                    });
                    // With a breaker per target, another target may take the request.
                    if circuit.per_target
                        && n_excluded < MAX_EXCLUDED
                        && !excluded[..n_excluded].contains(&idx)
                    {
                        excluded[n_excluded] = idx;
                        n_excluded += 1;
                        continue;
                    }
                    break;
                }
            }
        }
        let Some((mut idx, mut permit)) = chosen else {
            // A retry the breaker refuses: the client gets the last real answer (as
            // when the budget refuses), not `circuit_open`.
            if let (Some(r), Some(circuit), None) = (refused, &up.circuit, &last) {
                return circuit_refused(up, circuit, r);
            }
            break;
        };
        if n_excluded < MAX_EXCLUDED && !excluded[..n_excluded].contains(&idx) {
            excluded[n_excluded] = idx;
            n_excluded += 1;
        }
        let first = &set.targets[idx];
        overlay.host = host_for(route, first, client_host);
        // Hedging (first try only): the delay after which a second try may start.
        let hedge = match (&up.hedging, &hedge_body) {
            (Some(h), Some(b)) if attempt == 0 => hedge_delay(up, h).map(|d| (d, b.clone())),
            _ => None,
        };
        let hedge_head = hedge.as_ref().map(|_| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        let mut sent = clock::now();
        let first_in_flight = first.health.enter();
        // Boxed: the exchange's state is large and would otherwise be copied each time
        // the futures around it move (measured: ~1k instructions per request).
        let primary = bodyclock::send(
            Box::pin(first.pool.send(
                parts,
                raw,
                request_body,
                &overlay,
                Terms {
                    connect: timeouts.connect.0,
                    idle: Some(timeouts.idle.0),
                    replayable,
                    raw_head,
                },
            )),
            clock.as_deref(),
            sent,
            (per_try, timeouts.idle.0),
            deadline,
        );
        let result = match (hedge, hedge_head) {
            // Boxed, and in a function of its own: the second try's state would
            // otherwise enlarge (and be copied with) every request's future.
            (Some((delay, hbody)), Some(head)) => {
                let h = Hedge {
                    up,
                    set: &set,
                    first: idx,
                    excluded: (excluded, n_excluded),
                    key_hash,
                    route,
                    overlay: &overlay,
                    client_host,
                    deadline,
                    timeouts,
                    raw_head,
                };
                let (r, won) = Box::pin(hedged(primary, delay, hbody, head, h)).await;
                if let Some((i2, sent2, permit2)) = won {
                    idx = i2;
                    sent = sent2;
                    // A breaker of its own: its permit; else the upstream's, which
                    // the first try holds.
                    if permit2.is_some() {
                        permit = permit2;
                    }
                    if n_excluded < MAX_EXCLUDED {
                        excluded[n_excluded] = i2;
                        n_excluded += 1;
                    }
                }
                r
            }
            _ => primary.await,
        };
        drop(first_in_flight);
        let target = &set.targets[idx];
        fin.target = Some(target.url.clone());
        if snap.access_log {
            fin.upstream_ms = Some(clock::since(sent).as_secs_f64() * 1000.0);
        }
        // What happened: the answer, the retry condition met, and the breaker outcome
        // (`None`: the outcome says nothing about the upstream).
        let (outcome, cond, failure) = match result {
            Ok(Ok(mut resp)) => {
                up.responded(&set, idx, resp.status());
                up.answered(&set, idx, sent, resp.status());
                if admitted.is_some() || up.hedging.is_some() {
                    let took = clock::since(sent);
                    if let Some(a) = &admitted {
                        a.sample(took, now_ms());
                    }
                    up.recent.record(took);
                }
                strip_hop_by_hop(resp.headers_mut(), false);
                // The client gets the gateway's protocol version, not the upstream's.
                *resp.version_mut() = Version::HTTP_11;
                // Nothing to record or retry: the common case returns at once.
                if retries.is_none() && permit.is_none() {
                    return Ok(resp);
                }
                let status = resp.status();
                (
                    Ok(resp),
                    Some(RetryOn::Status(status.as_u16())),
                    Some(status.is_server_error()),
                )
            }
            Ok(Err(failed)) => {
                let e = &failed.error;
                let (err, connect) = map_client_error(e, timeouts.connect.0);
                tracing::debug!(target = %target.url, error = %e, source = ?e.source(), "upstream request failed");
                if connect {
                    up.connect_failed(&set, idx);
                }
                let upstream_side = matches!(
                    err.kind,
                    ErrorKind::UpstreamUnavailable | ErrorKind::UpstreamTimeout
                );
                if upstream_side {
                    up.failed(&set, idx, sent);
                }
                let cond = if connect {
                    if let Some(back) = failed.body {
                        body = Some(back);
                    }
                    Some(RetryOn::ConnectError)
                } else if err.kind == ErrorKind::UpstreamUnavailable {
                    Some(RetryOn::Reset)
                } else {
                    None
                };
                (Err(err), cond, upstream_side.then_some(true))
            }
            Err(mut timeout) => {
                up.failed(&set, idx, sent);
                up.timed_out(&set, idx);
                if let Some(a) = &admitted {
                    a.sample(clock::since(sent), now_ms());
                }
                if let (Some(d), Some(t)) = (deadline, timeouts.total) {
                    if Instant::now() >= d {
                        timeout.message = format!(
                            "the upstream did not answer within the total timeout ({t}, {} tries)",
                            attempt + 1
                        )
                        .into();
                    }
                }
                (Err(timeout), Some(RetryOn::Timeout), Some(true))
            }
        };
        // The try is over: its slot is free before any pause for a retry.
        drop(admitted);
        if let (Some(p), Some(circuit)) = (permit, &up.circuit) {
            let now = now_ms();
            let t = match failure {
                Some(true) => p.failure(now),
                Some(false) => p.success(now),
                None => None,
            };
            if let Some(t) = t {
                circuit.note(&up.name, &target.url, t);
            }
        }
        let again = attempt + 1 < max_tries
            && deadline.is_none_or(|d| Instant::now() < d)
            && match (retries, cond) {
                (_, None) => false,
                (None, Some(c)) => c == RetryOn::ConnectError && body.is_some(),
                (Some(r), Some(c)) => {
                    r.retries_on(c)
                        && (c == RetryOn::ConnectError || r.retries_method(&parts.method))
                        && (replay.is_some() || body.is_some())
                        && up.budget.try_withdraw(now_ms())
                }
            };
        if !again {
            return outcome;
        }
        tracing::debug!(upstream = %up.name, target = %target.url, condition = %cond.map(|c| c.to_string()).unwrap_or_default(), attempt = attempt + 1, "retrying the request");
        // The previous answer (its body unread) is what the client gets if no target
        // can be tried.
        last = Some(Box::new(outcome));
        if let Some(r) = retries {
            let pause = r.backoff(attempt as u32, fastrand::f64());
            // Boxed: a timer is large, and only retried requests wait.
            let until = Instant::now() + pause;
            Box::pin(tokio::time::sleep_until(
                deadline.map_or(until, |d| until.min(d)),
            ))
            .await;
        }
    }
    last.map(|b| *b).unwrap_or_else(|| {
        Err(GatewayError::new(
            ErrorKind::NoHealthyUpstream,
            format!("upstream `{}` has no available target", up.name),
        ))
    })
}

/// What the gateway's own requests for this request (an aggregate's calls) carry:
/// the forwarded headers and request id, and the consumer headers.
pub(crate) fn own_request_headers(
    snap: &Snapshot,
    fin: &Finish,
    req: &http::request::Parts,
    conn: &ConnInfo,
) -> (Overlay, HeaderMap) {
    let host = req.headers.get(header::HOST).cloned().or_else(|| {
        req.uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let overlay = Overlay {
        request_id: Field::Set(fin.ctx.request_id.header().clone()),
        ..forwarded_headers(snap, conn, &req.headers, host.as_ref())
    };
    let mut identity = HeaderMap::new();
    if let Some(c) = &fin.ctx.consumer {
        let [name_h, groups_h] = &snap.consumer_headers;
        identity.insert(name_h.clone(), c.name_header.clone());
        if let Some(g) = &c.groups_header {
            identity.insert(groups_h.clone(), g.clone());
        }
    }
    (overlay, identity)
}

/// The `Host` sent to target `t`: its own, or the client's with `preserve_host`.
fn host_for(route: &CompiledRoute, t: &Target, client_host: Option<&HeaderValue>) -> Field {
    if !route.preserve_host {
        Field::Set(t.host_header.clone())
    } else {
        client_host.cloned().map_or(Field::Keep, Field::Set)
    }
}

/// How long the first try may go unanswered before a hedge: the fixed delay, or the
/// upstream's recent 95th percentile (not before 20 samples: until then, no hedging).
fn hedge_delay(up: &Upstream, h: &Hedging) -> Option<Duration> {
    match h.delay {
        HedgeDelay::Fixed(d) => Some(d.0),
        HedgeDelay::P95 => up.recent.quantile(0.95, 20).map(|d| d.max(h.min_delay.0)),
    }
}

/// A target for the hedge: another one than `first` and those already excluded, with
/// its breaker's permit when it has its own, and within the retry budget.
fn pick_hedge<'s>(
    up: &'s Upstream,
    set: &'s TargetSet,
    first: usize,
    excluded: &[usize],
    key: Option<u64>,
) -> Option<(usize, Option<Permit<'s>>)> {
    let mut skip = [usize::MAX; MAX_EXCLUDED + 1];
    let n = excluded.len().min(MAX_EXCLUDED);
    skip[..n].copy_from_slice(&excluded[..n]);
    skip[n] = first;
    let i = up.pick(set, &skip[..=n], key).filter(|&i| i != first)?;
    let permit = match up.circuit.as_ref() {
        Some(c) if c.per_target => Some(c.breaker(&set.targets[i])?.try_acquire(now_ms()).ok()?),
        _ => None,
    };
    up.budget.try_withdraw(now_ms()).then_some((i, permit))
}

type TryResult = Result<Result<Response<Body>, portico_upstream::Failed>, GatewayError>;

/// What a hedge needs to know of the request's first try.
struct Hedge<'s> {
    up: &'s Upstream,
    set: &'s TargetSet,
    first: usize,
    /// The targets already tried or refused (a copy: the caller adds to its own).
    excluded: ([usize; MAX_EXCLUDED], usize),
    key_hash: Option<u64>,
    route: &'s CompiledRoute,
    overlay: &'s Overlay,
    client_host: Option<&'s HeaderValue>,
    deadline: Option<Instant>,
    timeouts: &'s Timeouts,
    raw_head: bool,
}

/// The first try, and after `delay` without an answer a second one on another target
/// (when one may be tried): the first good answer wins ([`race`]). Returns the answer,
/// and when the second try won, its target, start and breaker permit.
async fn hedged<'s>(
    primary: impl std::future::Future<Output = TryResult>,
    delay: Duration,
    hbody: Bytes,
    (method, uri, headers): (Method, Uri, HeaderMap),
    h: Hedge<'s>,
) -> (TryResult, Option<(usize, Instant, Option<Permit<'s>>)>) {
    let mut primary = std::pin::pin!(primary);
    tokio::select! {
        biased;
        r = &mut primary => return (r, None),
        () = tokio::time::sleep(delay) => {}
    }
    let Some((i2, permit2)) = pick_hedge(
        h.up,
        h.set,
        h.first,
        &h.excluded.0[..h.excluded.1],
        h.key_hash,
    ) else {
        return (primary.await, None);
    };
    let (up, timeouts) = (h.up, h.timeouts);
    let t2 = &h.set.targets[i2];
    if let (Some(p), Some(c)) = (&permit2, &up.circuit) {
        if let Some(t) = p.transition() {
            c.note(&up.name, &t2.url, t);
        }
    }
    let (mut p2, ()) = Request::new(()).into_parts();
    (p2.method, p2.uri, p2.headers) = (method, uri, headers);
    p2.version = Version::HTTP_11;
    let mut ov2 = h.overlay.clone();
    ov2.host = host_for(h.route, t2, h.client_host);
    let sent2 = clock::now();
    let per_try2 = h.deadline.map_or(timeouts.request.0, |d| {
        timeouts.request.0.min(d.saturating_duration_since(sent2))
    });
    up.recent
        .hedges_sent
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let second_in_flight = t2.health.enter();
    let second = bodyclock::send(
        Box::pin(t2.pool.send(
            &mut p2,
            None,
            if hbody.is_empty() {
                Body::Empty
            } else {
                Body::full(hbody)
            },
            &ov2,
            Terms {
                connect: timeouts.connect.0,
                idle: Some(timeouts.idle.0),
                replayable: true,
                raw_head: h.raw_head,
            },
        )),
        None,
        sent2,
        (per_try2, timeouts.idle.0),
        h.deadline,
    );
    let (r, hedge_won) = race(primary, second).await;
    drop(second_in_flight);
    if !hedge_won {
        return (r, None);
    }
    up.recent
        .hedges_won
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (r, Some((i2, sent2, permit2)))
}

/// The first good answer of two tries in flight: an answer (any status) wins; a
/// failure waits for the other, and if both fail the first try's failure is kept. The
/// loser is dropped (its exchange cancelled). Returns whether the second try won.
async fn race(
    first: impl std::future::Future<Output = TryResult>,
    second: impl std::future::Future<Output = TryResult>,
) -> (TryResult, bool) {
    let mut first = std::pin::pin!(first);
    let mut second = std::pin::pin!(second);
    let answered = |r: &TryResult| matches!(r, Ok(Ok(_)));
    tokio::select! {
        r = &mut first => {
            if answered(&r) {
                return (r, false);
            }
            let r2 = second.await;
            if answered(&r2) { (r2, true) } else { (r, false) }
        }
        r = &mut second => {
            if answered(&r) {
                return (r, true);
            }
            (first.await, false)
        }
    }
}

/// The answer when the adaptive concurrency limit refused a request's first try.
#[cold]
fn overloaded(up: &Upstream, a: &portico_upstream::adaptive::AdaptiveLimit) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamOverloaded,
        format!(
            "upstream `{}` is at its adaptive concurrency limit ({} in flight); the request was not sent",
            up.name,
            a.limit()
        ),
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

/// The answer when the breaker refused the request: the configured fallback, or the
/// 503 `circuit_open` error with `Retry-After` (whole seconds, rounded up).
fn circuit_refused(
    up: &Upstream,
    circuit: &Circuit,
    r: Rejected,
) -> Result<Response<Body>, GatewayError> {
    if let Some(fb) = &circuit.fallback {
        let mut resp = Response::new(if fb.body.is_empty() {
            Body::Empty
        } else {
            Body::full(fb.body.clone())
        });
        *resp.status_mut() = fb.status;
        *resp.headers_mut() = fb.headers.clone();
        return Ok(resp);
    }
    let secs = r.retry_after.as_millis().div_ceil(1000);
    Err(GatewayError::new(
        ErrorKind::CircuitOpen,
        format!(
            "the circuit breaker of upstream `{}` is {}; the request was not sent",
            up.name, r.state
        ),
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from(secs as u64)))
}

/// The length of a request body, when known in advance.
fn known_length(b: &Body, h: &HeaderMap) -> Option<u64> {
    b.size_hint().exact().or_else(|| {
        h.get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

/// Read a whole request body (of a known, bounded length) so it can be sent again.
/// Trailers are not kept.
async fn read_body(mut b: Body) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let mut buf = BytesMut::new();
    while let Some(frame) = b.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Err(e) => {
                return Err(map_source(Some(&*e)).map_or_else(
                    || {
                        let mut err = GatewayError::new(
                            ErrorKind::BadRequest,
                            format!("the request body could not be read: {e}"),
                        );
                        err.close = true;
                        err
                    },
                    |(err, _)| err,
                ))
            }
        }
    }
    Ok(buf.freeze())
}

/// `X-Forwarded-For` is appended to only when the peer is a trusted proxy; otherwise it
/// is replaced by the peer address. `-Proto` and `-Host` likewise.
fn forwarded_headers(
    snap: &Snapshot,
    conn: &ConnInfo,
    h: &HeaderMap,
    host: Option<&HeaderValue>,
) -> Overlay {
    let trusted = snap.trusts(conn.peer_ip);
    let prior: Option<String> = if trusted {
        let parts: Vec<&str> = h
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    } else {
        None
    };
    let forwarded_for = match prior {
        Some(p) => {
            let xff = format!("{p}, {}", conn.peer_header.to_str().unwrap_or_default());
            HeaderValue::from_str(&xff).map_or(Field::Keep, Field::Set)
        }
        None => Field::Set(conn.peer_header.clone()),
    };
    let forwarded_proto = if trusted && h.contains_key(&X_FORWARDED_PROTO) {
        Field::Keep
    } else {
        Field::Set(HeaderValue::from_static(if conn.tls {
            "https"
        } else {
            "http"
        }))
    };
    let forwarded_host = if trusted && h.contains_key(&X_FORWARDED_HOST) {
        Field::Keep
    } else {
        host.cloned().map_or(Field::Remove, Field::Set)
    };
    Overlay {
        forwarded_for,
        forwarded_proto,
        forwarded_host,
        ..Overlay::default()
    }
}

/// Map a client error to the gateway error; the flag says it was a connect failure
/// (nothing was sent, so another target may be tried).
fn map_client_error(e: &SendError, connect_timeout: Duration) -> (GatewayError, bool) {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<ConnectTimeout>() {
            return (
                GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("connecting to the upstream timed out after {connect_timeout:?}"),
                ),
                true,
            );
        }
        src = s.source();
    }
    if let Some(mapped) = map_source(Some(e)) {
        return mapped;
    }
    if e.is_connect() {
        return (
            GatewayError::new(
                ErrorKind::UpstreamUnavailable,
                format!("cannot connect to the upstream: {}", root_cause(e)),
            ),
            true,
        );
    }
    (
        GatewayError::new(
            ErrorKind::UpstreamUnavailable,
            format!("the upstream connection failed: {}", root_cause(e)),
        ),
        false,
    )
}

/// A client-side body error (too large, badly framed, stalled) somewhere in the chain
/// of `src`.
fn map_source(mut src: Option<&(dyn std::error::Error + 'static)>) -> Option<(GatewayError, bool)> {
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyTooLarge>() {
            let mut err = GatewayError::new(ErrorKind::PayloadTooLarge, b.to_string());
            err.close = true;
            return Some((err, false));
        }
        if let Some(b) = s.downcast_ref::<crate::h1server::BadBody>() {
            let mut err = GatewayError::new(ErrorKind::BadRequest, b.to_string());
            err.close = true;
            return Some((err, false));
        }
        if s.is::<IdleTimeout>() {
            let mut err = GatewayError::new(
                ErrorKind::BadRequest,
                "the request body stalled (idle timeout)",
            );
            err.close = true;
            return Some((err, false));
        }
        src = s.source();
    }
    None
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}
