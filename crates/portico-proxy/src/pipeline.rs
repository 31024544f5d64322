//! The request pipeline: limits → normalize → route → policies (`on_request`) →
//! proxy (`upstream_request`, send, `upstream_response`) → log (when the body ends).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, ALLOW, HOST};
use http::{Request, Response};
use portico_plugins::{
    client_ip, BackgroundRefresh, Body, Ctx, ErrorKind, Flow, GatewayError, RequestId,
};
use portico_router::{normalize_host, normalize_path, Match};
use portico_upstream::h1::RawRequest;

use crate::forward;
use crate::gateway::Gateway;
use crate::logbody::{Finish, LogBody};
use crate::snapshot::{CompiledRoute, Snapshot};

/// What the pipeline knows about the client connection (made once per connection).
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP, IPv4-mapped IPv6 shown as IPv4.
    pub peer_ip: std::net::IpAddr,
    pub tls: bool,
    /// The peer address (IPv4-mapped IPv6 shown as IPv4) as a header value, for
    /// `X-Forwarded-For`.
    pub peer_header: http::HeaderValue,
    /// Requests in progress on this connection.
    pub in_flight: std::sync::atomic::AtomicU32,
    /// When the last request on this connection finished (ms, `portico_upstream::now_ms`).
    pub idle_since: std::sync::atomic::AtomicU64,
    /// The verified client certificate (mutual TLS).
    pub client_cert: Option<Arc<portico_plugins::ctx::ClientCert>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let ip = portico_plugins::canonical(peer.ip());
        let peer_header = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            peer_ip: ip,
            tls,
            peer_header,
            in_flight: std::sync::atomic::AtomicU32::new(0),
            idle_since: std::sync::atomic::AtomicU64::new(portico_upstream::now_ms()),
            client_cert: None,
        }
    }
}

/// A request as a server read it: its head and body, and what the server noted about
/// the head. The pipeline borrows it: the head stays in place from the parser to the
/// upstream (it is large, and moving it at every step cost more than the rest of
/// handling it). The HTTP/1.1 server keeps one per connection and parses each request
/// into it, reusing its header map's memory; it may leave the fields unparsed in `raw`
/// (`parts.headers` is then empty until [`Received::headers`] fills it).
pub struct Received {
    pub parts: http::request::Parts,
    pub body: Body,
    pub meta: Meta,
    pub raw: RawRequest,
}

impl Received {
    pub fn new(req: Request<Body>, meta: Meta) -> Received {
        let (parts, body) = req.into_parts();
        Received {
            parts,
            body,
            meta,
            raw: RawRequest::default(),
        }
    }

    /// An empty one, to be filled in place.
    pub fn empty() -> Received {
        Received {
            parts: empty_parts(),
            body: Body::Empty,
            meta: Meta::default(),
            raw: RawRequest::default(),
        }
    }
}

/// Make sure the request's fields are in its header map (they may still be the bytes
/// the HTTP/1.1 server parsed, in `raw`).
fn headers(parts: &mut http::request::Parts, raw: &mut RawRequest) -> Result<(), GatewayError> {
    if raw.pending() {
        let filled = raw.fill(&mut parts.headers, false);
        raw.clear();
        filled.map_err(|m| GatewayError::new(ErrorKind::BadRequest, m))?;
    }
    Ok(())
}

/// Handle one request from a client, on the snapshot current as it starts (`snap`).
pub async fn handle(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnInfo>,
    snap: &Arc<Snapshot>,
    received: &mut Received,
) -> Result<Response<LogBody>, Infallible> {
    let started = portico_plugins::clock::now();
    // The head and the server's notes stay where they are; the body is taken out.
    let Received {
        parts,
        body,
        meta,
        raw,
    } = received;
    let meta: &Meta = meta;
    let mut body = std::mem::take(body);
    let request_id = request_id(meta.request_id.as_ref());
    // Fields the HTTP/1.1 server left unparsed stay so while nothing reads them:
    // routing on headers does, and so does finding the client behind a trusted proxy.
    let early = if raw.pending() && (snap.routes_on_headers || snap.trusts(conn.peer_ip)) {
        headers(parts, raw).err()
    } else {
        None
    };
    let ip = client_ip(conn.peer_ip, &parts.headers, &snap.trusted_proxies);
    let mut fin = Finish::new(
        gw,
        snap.clone(),
        started,
        parts,
        request_id,
        ip,
        (!meta.in_flight_kept).then(|| conn.clone()),
    );
    if snap.access_log {
        fin.host.clone_from(&meta.host);
    }
    let body_len = meta.content_length;
    fin.bytes_in = body_len.unwrap_or(0);

    if let Some(e) = early
        .or_else(|| check_limits(snap, parts, raw))
        .or_else(|| check_framing(parts, meta))
    {
        linger(body, parts.version);
        return Ok(fin.error(e));
    }
    let path = match normalize_path(parts.uri.path()) {
        Ok(p) => p.into_owned(),
        Err(_) => {
            linger(body, parts.version);
            return Ok(fin.error(GatewayError::new(
                ErrorKind::BadRequest,
                "the request path is not valid (bad percent-encoding or not absolute)",
            )));
        }
    };
    let host_raw = parts
        .uri
        .host()
        .or_else(|| meta.host.as_ref().and_then(|h| h.to_str().ok()));
    let host = host_raw.map(normalize_host);
    // The captures go straight into the context.
    let matched = snap.router.route(
        host.as_deref(),
        &path,
        &parts.method,
        &parts.headers,
        &mut fin.ctx.params,
    );
    drop(host);
    let (route, prefix_len, allow) = match matched {
        Match::Found { route, prefix_len } => (route, prefix_len, None),
        Match::MethodNotAllowed { allow, route } => (route, None, Some(allow)),
        Match::NotFound => {
            fin.ctx.path = path;
            linger(body, parts.version);
            return Ok(fin.error(GatewayError::new(
                ErrorKind::NoRoute,
                "no route matches this request",
            )));
        }
    };
    let Some(route) = snap.routes.get(route) else {
        return Ok(fin.error(GatewayError::new(
            ErrorKind::Internal,
            "route table out of sync",
        )));
    };
    // Past routing, the fields stay unparsed only on a route where nothing else reads
    // them, and when the client sent none of the identity headers (which are removed).
    if raw.pending() && (!route.raw_request || raw.has_any(&snap.consumer_headers)) {
        if let Err(e) = headers(parts, raw) {
            linger(body, parts.version);
            return Ok(fin.error(e));
        }
    }
    // The context made with `fin` is still untouched: fill in what routing found.
    fin.ctx.route_name = route.name.clone();
    fin.ctx.path = path;
    fin.ctx.client_cert.clone_from(&conn.client_cert);
    fin.ctx.underscores = meta.underscores;
    fin.ctx.tls = conn.tls;
    fin.raw_response = meta.raw_response && route.passes_response_through();
    fin.route = Some(route.clone());
    let idle = Some(route.timeouts.idle.0);
    // Without a Content-Length (chunked, or HTTP/2 without one) count what is read.
    if body_len.is_none() && !http_body::Body::is_end_stream(&body) {
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        fin.bytes_in_counter = Some(counter.clone());
        body.configure(idle, Some(counter));
    } else {
        body.configure(idle, None);
    }

    // Request phase. When only the method failed, request hygiene still runs (e.g. so a
    // CORS preflight can answer) before the 405.
    let upto = if allow.is_some() {
        route.hygiene
    } else {
        route.chain.len()
    };
    let gate_at = match (&route.auth_gate, allow.is_none()) {
        (Some(g), true) => g.at,
        _ => usize::MAX,
    };
    // The policies see the request whole: the head is lent to them (and put back).
    if upto > 0 {
        let head = std::mem::replace(parts, empty_parts());
        let mut req = Request::from_parts(head, std::mem::take(&mut body));
        for (i, entry) in route.chain[..upto].iter().enumerate() {
            if i == gate_at {
                if let Some(e) = auth_gate(snap, route, &mut fin.ctx) {
                    linger(std::mem::take(req.body_mut()), req.version());
                    return Ok(respond_error(route, fin, e));
                }
            }
            match entry.policy.on_request(&mut fin.ctx, &mut req).await {
                Flow::Continue => {}
                Flow::Respond(resp) => {
                    let resp = *resp;
                    if let Some(bg) = fin.ctx.extensions.remove::<BackgroundRefresh>() {
                        refresh_in_background(gw, conn, &req, meta, bg);
                    }
                    linger(std::mem::take(req.body_mut()), req.version());
                    // The body phase of the policies after this one (a cache hit gets the
                    // same response transforms and masking as the upstream's answer).
                    if route.response_body {
                        return Ok(Box::pin(respond_upstream(route, fin, resp, i + 1)).await);
                    }
                    return Ok(respond(route, fin, resp));
                }
                Flow::Error(e) => {
                    linger(std::mem::take(req.body_mut()), req.version());
                    return Ok(respond_error(route, fin, e));
                }
            }
        }
        let (p, b) = req.into_parts();
        *parts = p;
        body = b;
    }
    if gate_at == upto {
        if let Some(e) = auth_gate(snap, route, &mut fin.ctx) {
            linger(body, parts.version);
            return Ok(respond_error(route, fin, e));
        }
    }
    if let Some(allow) = allow {
        linger(body, parts.version);
        let list = allow
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let mut e = GatewayError::new(
            ErrorKind::MethodNotAllowed,
            format!("method {} is not allowed here", parts.method),
        );
        if let Ok(v) = HeaderValue::from_str(&list) {
            e = e.with_header(ALLOW, v);
        }
        return Ok(respond_error(route, fin, e));
    }
    let (upstream, timeouts) = match (&route.split, &route.upstream) {
        (Some(split), _) => {
            let share = split.pick(&fin.ctx, parts);
            (&share.upstream, &share.timeouts)
        }
        (None, Some(u)) => (u, &route.timeouts),
        (None, None) if route.aggregate.is_some() => {
            linger(std::mem::take(&mut body), parts.version);
            let (overlay, identity) = forward::own_request_headers(snap, &fin, parts, conn);
            let result = match &route.aggregate {
                Some(a) => Box::pin(a.run(&fin.ctx, parts, &overlay, &identity)).await,
                None => Err(GatewayError::new(ErrorKind::Internal, "no aggregate")),
            };
            return Ok(match result {
                Ok(resp) => respond(route, fin, resp),
                Err(e) => respond_error(route, fin, e),
            });
        }
        (None, None) => {
            return Ok(respond_error(
                route,
                fin,
                GatewayError::new(
                    ErrorKind::Internal,
                    "the route has no upstream and no policy answered",
                ),
            ))
        }
    };
    match forward::forward(
        snap,
        route,
        (upstream, timeouts),
        &mut fin,
        // Unparsed fields come with the `Host` the server found among them (the
        // absolute form, whose authority replaces `Host`, always takes the map).
        (
            parts,
            body,
            raw.pending().then_some((&*raw, meta.host.as_ref())),
        ),
        conn,
        prefix_len,
    )
    .await
    {
        Ok(resp) if fin.mirror.is_some() => {
            let resp = match fin.mirror.take() {
                Some(p) => p.primary(resp),
                None => resp,
            };
            if route.response_body {
                Ok(Box::pin(respond_upstream(route, fin, resp, 0)).await)
            } else {
                Ok(respond(route, fin, resp))
            }
        }
        // Boxed: only routes with a policy that reads response bodies take this step.
        Ok(resp) if route.response_body => {
            Ok(Box::pin(respond_upstream(route, fin, resp, 0)).await)
        }
        Ok(resp) => Ok(respond(route, fin, resp)),
        Err(e) => {
            // A policy may answer instead (the cache's stale-if-error).
            let instead = route
                .chain
                .iter()
                .rev()
                .find_map(|entry| entry.policy.upstream_error(&mut fin.ctx, &e));
            match instead {
                Some(resp) => Ok(respond(route, fin, resp)),
                None => Ok(respond_error(route, fin, e)),
            }
        }
    }
}

/// A policy answered but asked for the request to go upstream anyway
/// ([`BackgroundRefresh`]): a copy of its head goes through the route again in a task
/// of its own, and the answer is read to its end (so that, e.g., the cache stores it).
fn refresh_in_background(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnInfo>,
    req: &Request<Body>,
    meta: &Meta,
    bg: BackgroundRefresh,
) {
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy.headers_mut().remove(http::header::CONTENT_LENGTH);
    copy.headers_mut().remove(http::header::TRANSFER_ENCODING);
    copy.extensions_mut().insert(bg);
    // The answer is read here, not written to a client.
    let meta = Meta {
        content_length: None,
        request_id: None,
        raw_response: false,
        in_flight_kept: false,
        ..meta.clone()
    };
    let (gw, conn) = (gw.clone(), conn.clone());
    tokio::spawn(async move {
        let mut received = Received::new(copy, meta);
        let snap = gw.snapshot();
        let Ok(resp) = Box::pin(handle(&gw, &conn, &snap, &mut received)).await;
        let mut body = std::pin::pin!(resp.into_body());
        while let Some(Ok(_)) =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await
        {
        }
    });
}

/// Request parts with nothing in them (a placeholder while the head is lent).
fn empty_parts() -> http::request::Parts {
    Request::new(()).into_parts().0
}

/// After a route's authentication policies: a request none of them authenticated
/// gets the anonymous consumer, or a 401 with every policy's challenge.
fn auth_gate(snap: &Snapshot, route: &CompiledRoute, ctx: &mut Ctx) -> Option<GatewayError> {
    let g = route.auth_gate.as_ref()?;
    if ctx.auth.is_some() || ctx.consumer.is_some() {
        return None;
    }
    if let Some(anon) = &g.anonymous {
        let c = snap.identity.index().consumer(&anon.name).cloned();
        ctx.consumer = Some(c.unwrap_or_else(|| anon.clone()));
        return None;
    }
    let mut e = GatewayError::new(
        ErrorKind::Unauthorized,
        "this route needs credentials and the request has none",
    );
    for c in &g.challenges {
        e = e.with_header(http::header::WWW_AUTHENTICATE, c.clone());
    }
    Some(e)
}

/// A gateway error once a route is known: its response phases run on the answer too
/// (as Kong runs its plugins' header phase on its own answers), so e.g. `cors` headers
/// reach a browser with a 401 or a 502.
fn respond_error(
    route: &CompiledRoute,
    mut fin: Box<Finish>,
    e: GatewayError,
) -> Response<LogBody> {
    let resp = fin.error_response(e);
    respond(route, fin, resp)
}

/// The request body of an early answer is read and discarded in the background on
/// HTTP/1.x, so that a client still sending it gets the answer, not a connection reset
/// (HTTP/2 resets just the stream, cleanly).
fn linger(body: Body, version: http::Version) {
    if version < http::Version::HTTP_2 {
        portico_plugins::body::drain_in_background(body);
    }
}

/// Run the response phase (ascending priority) and wrap the body for logging.
fn respond(route: &CompiledRoute, mut fin: Box<Finish>, resp: Response<Body>) -> Response<LogBody> {
    if route.chain.is_empty() {
        return fin.complete(resp);
    }
    let (mut parts, mut body) = resp.into_parts();
    for entry in route.chain.iter().rev() {
        entry.policy.upstream_response(&mut fin.ctx, &mut parts);
    }
    if route.finishes {
        for entry in route.chain.iter().rev() {
            if entry.policy.finishes_response() {
                body = entry.policy.finish_response(&mut fin.ctx, &mut parts, body);
            }
        }
    }
    fin.complete(Response::from_parts(parts, body))
}

/// A response from the upstream (`from` 0), or from the policy at `from - 1` of the
/// chain, on a route with policies that read response bodies: those of them after
/// `from` run first (ascending priority) on the head and body as they came, then the
/// response phase. A policy's error replaces the response (and gets the response phase).
async fn respond_upstream(
    route: &CompiledRoute,
    mut fin: Box<Finish>,
    resp: Response<Body>,
    from: usize,
) -> Response<LogBody> {
    let (mut parts, mut body) = resp.into_parts();
    for entry in route.chain.get(from..).unwrap_or_default().iter().rev() {
        if !entry.policy.wants_response_body() {
            continue;
        }
        match entry
            .policy
            .response_body(&mut fin.ctx, &mut parts, body)
            .await
        {
            Ok(b) => body = b,
            Err(e) => {
                let resp = fin.error_response(e);
                return respond(route, fin, resp);
            }
        }
    }
    respond(route, fin, Response::from_parts(parts, body))
}

/// Requests that cannot be forwarded safely or that a gateway does not serve: more
/// than one or an invalid `Host` (RFC 9112 §3.2), `CONNECT` tunnels and the
/// server-wide `OPTIONS *`. (Ambiguous framing — `Transfer-Encoding` with
/// `Content-Length` — is settled by the HTTP/1.1 parser, which drops the length as
/// RFC 9112 §6.3 requires; the request then goes upstream chunked.)
fn check_framing(parts: &http::request::Parts, meta: &Meta) -> Option<GatewayError> {
    let bad = |m: &'static str| {
        let mut e = GatewayError::new(ErrorKind::BadRequest, m);
        e.close = true;
        Some(e)
    };
    if meta.hosts > 1 {
        return bad("the request has more than one Host header");
    }
    if let Some(first) = &meta.host {
        if !valid_host(first.as_bytes()) {
            return bad("the Host header is not a valid host[:port]");
        }
        // HTTP/2 keeps `:authority` and a `host` field apart (HTTP/1.1's absolute form
        // already replaced `Host`): routing, policies and the upstream must all see
        // one host, so two different ones are refused (RFC 9113 §8.3.1).
        if let Some(a) = parts.uri.authority() {
            if !a.as_str().as_bytes().eq_ignore_ascii_case(first.as_bytes()) {
                return bad("the Host header differs from the request's :authority");
            }
        }
    }
    // `Authorization` is a single credential (not a list): with two, the gateway and
    // the upstream could each read a different one.
    if meta.authorizations > 1 {
        return bad("the request has more than one Authorization header");
    }
    if parts.method == http::Method::CONNECT {
        let mut e = GatewayError::new(
            ErrorKind::MethodNotAllowed,
            "CONNECT (tunnelling) is not supported",
        );
        e.close = true;
        return Some(e);
    }
    if parts
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() == "*")
    {
        return bad("the server-wide request target `*` is not supported; send OPTIONS to a path");
    }
    None
}

/// A `Host` value is `host[:port]`: a registered name, an IPv4 address or a bracketed
/// IPv6 literal. Spaces, `/`, `?`, `#`, `@` and control characters are refused.
fn valid_host(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b':'
                        | b'['
                        | b']'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

fn check_limits(
    snap: &Snapshot,
    parts: &http::request::Parts,
    raw: &RawRequest,
) -> Option<GatewayError> {
    let l = &snap.limits;
    let uri_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > l.max_uri_length {
        return Some(GatewayError::new(
            ErrorKind::UriTooLong,
            format!(
                "the request target is {uri_len} bytes; at most {} are accepted",
                l.max_uri_length
            ),
        ));
    }
    let (count, bytes) = if raw.pending() {
        raw.size()
    } else {
        parts.headers.iter().fold((0, 0), |(n, b), (k, v)| {
            (n + 1, b + k.as_str().len() + v.len() + 4)
        })
    };
    if count > l.max_header_count {
        let mut e = GatewayError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "{count} request headers; at most {} are accepted",
                l.max_header_count
            ),
        );
        e.close = true;
        return Some(e);
    }
    if bytes as u64 > l.max_header_bytes.0 {
        let mut e = GatewayError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "the request headers are {bytes} bytes; at most {} are accepted",
                l.max_header_bytes.0
            ),
        );
        e.close = true;
        return Some(e);
    }
    None
}

/// The client's `X-Request-Id` when it is sane (1–200 visible ASCII characters), else a new one.
/// Facts about a request head the pipeline needs first, gathered by the HTTP/1.1
/// parser during its one pass over the fields ([`Meta::of`] looks them up otherwise).
#[derive(Debug, Default, Clone)]
pub struct Meta {
    /// The (first) `Host` field.
    pub host: Option<HeaderValue>,
    /// How many `Host` fields there are.
    pub hosts: u8,
    /// The declared body length.
    pub content_length: Option<u64>,
    /// The client's `X-Request-Id`.
    pub request_id: Option<HeaderValue>,
    /// Some header name has an underscore (see `Ctx::underscores`).
    pub underscores: bool,
    /// How many `Authorization` fields there are.
    pub authorizations: u8,
    /// The answer is written by Portico's own HTTP/1.1 server, which can write an
    /// upstream response's fields kept unparsed (`RawFields`).
    pub raw_response: bool,
    /// The server counts the exchange as in progress on its connection itself (the
    /// HTTP/1.1 server: one at a time, with plain stores), so the pipeline does not
    /// (`ConnInfo::in_flight`, a shared count, for HTTP/2's concurrent streams).
    pub in_flight_kept: bool,
}

impl Meta {
    pub fn of(h: &http::HeaderMap) -> Meta {
        let mut hosts = h.get_all(HOST).iter();
        let host = hosts.next().cloned();
        let more = hosts.next().is_some();
        Meta {
            hosts: u8::from(host.is_some()) + u8::from(more),
            host,
            content_length: h
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            request_id: h.get(&crate::forward::X_REQUEST_ID).cloned(),
            underscores: h.keys().any(|k| k.as_str().contains('_')),
            authorizations: u8::try_from(h.get_all(http::header::AUTHORIZATION).iter().count())
                .unwrap_or(u8::MAX),
            raw_response: false,
            in_flight_kept: false,
        }
    }
}

/// The client's request id when it is usable (1–200 visible ASCII characters), else a
/// new random one.
pub(crate) fn request_id(client: Option<&HeaderValue>) -> RequestId {
    RequestId::of_request(client)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn framing(uri: &str, host: Option<&str>) -> Option<GatewayError> {
        let (parts, ()) = Request::builder().uri(uri).body(()).unwrap().into_parts();
        let meta = Meta {
            host: host.map(|h| HeaderValue::from_str(h).unwrap()),
            hosts: u8::from(host.is_some()),
            ..Meta::default()
        };
        check_framing(&parts, &meta)
    }

    #[test]
    fn authority_and_host_must_agree() {
        // HTTP/2: `:authority` with a different `host` field is refused.
        let e = framing("https://www.example.com/x", Some("admin.example.com")).unwrap();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains(":authority"));
        // The same host (any case), or no `host` field, is fine.
        assert!(framing("https://www.example.com/x", Some("WWW.example.com")).is_none());
        assert!(framing(
            "https://www.example.com:8443/x",
            Some("www.example.com:8443")
        )
        .is_none());
        assert!(framing("https://www.example.com/x", None).is_none());
        // Origin form (HTTP/1.1) has no authority to compare.
        assert!(framing("/x", Some("admin.example.com")).is_none());
    }

    #[test]
    fn one_authorization_header_at_most() {
        let (parts, ()) = Request::builder().uri("/x").body(()).unwrap().into_parts();
        let two = Meta {
            authorizations: 2,
            ..Meta::default()
        };
        let e = check_framing(&parts, &two).unwrap();
        assert!(e.message.contains("more than one Authorization"));
        let one = Meta {
            authorizations: 1,
            ..Meta::default()
        };
        assert!(check_framing(&parts, &one).is_none());
    }
}
