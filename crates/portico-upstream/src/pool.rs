//! Connections to one target: pooled HTTP/1.1 connections (one request at a time each)
//! or one shared HTTP/2 connection, over TCP or TLS.
//!
//! HTTP/1.1 exchanges use Portico's own codec ([`crate::h1`]) inside the request's
//! task; a connection goes back to the pool when its response body has been read to the
//! end, so checking one out is a short lock on a per-target list: no hashing, no
//! spawned task, no channel per request. HTTP/2 uses hyper's client (one shared
//! connection per target, driven by its own task). A request that a reused connection
//! could not even start sending (the peer closed it while idle) is retried once on a
//! new connection.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Scheme, Uri};
use http::{Method, Request, Response, Version};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use portico_config::model::Protocol;
use portico_plugins::{Body, BoxError};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::h1::{self, ReqFraming, ResponseBody, Sending, Stream};
use crate::overlay::Overlay;

/// A failed exchange; `body` is given back when nothing of the request was sent (the
/// request head stays with the caller), so it can go to another target.
pub struct Failed {
    pub error: SendError,
    pub body: Option<Body>,
}

impl std::fmt::Debug for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failed")
            .field("error", &self.error)
            .field("body_returned", &self.body.is_some())
            .finish()
    }
}

/// Request parts with nothing in them (taking parts out of a `&mut` for HTTP/2).
fn empty_parts() -> http::request::Parts {
    Request::new(()).into_parts().0
}

/// How connections to the targets of one upstream are made.
pub struct Connector {
    /// TLS settings, ALPN already set from the protocol.
    pub tls: Arc<rustls::ClientConfig>,
    /// Server name to send instead of the target host.
    pub sni: Option<ServerName<'static>>,
    pub protocol: Protocol,
    pub max_idle: usize,
    /// How long an unused connection stays pooled (`timeouts.keepalive`).
    pub keepalive: Duration,
}

impl Connector {
    /// `keepalive` in milliseconds (idle connections are stamped in milliseconds).
    fn keepalive_ms(&self) -> u64 {
        u64::try_from(self.keepalive.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why a request could not be exchanged with a target.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could not be established (nothing was sent).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// TCP and TLS did not complete within the connect timeout (nothing was sent).
    #[error(transparent)]
    ConnectTimeout(#[from] crate::ConnectTimeout),
    /// A pooled connection the upstream had already closed: the request may have been
    /// written but no answer began (the keep-alive race). Safe to repeat if idempotent.
    #[error("the upstream closed a kept-alive connection: {0}")]
    Stale(#[source] BoxError),
    /// An HTTP/1.1 exchange failed after the connection was made.
    #[error(transparent)]
    H1(#[from] h1::Error),
    /// An HTTP/2 exchange failed after the connection was made.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// Nothing was sent: another target may be tried.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::ConnectTimeout(_))
    }

    /// A reused connection was found closed before any answer (see [`SendError::Stale`]).
    pub fn is_stale(&self) -> bool {
        matches!(self, SendError::Stale(_))
    }
}

struct Idle {
    conn: Box<h1::Conn>,
    /// When it was put back ([`portico_plugins::clock::now_ms`]).
    since_ms: u64,
}

/// The connections to one target.
pub struct TargetPool {
    scheme: Scheme,
    authority: http::uri::Authority,
    host: String,
    port: u16,
    connector: Arc<Connector>,
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// Whether connections to this target can be HTTP/2 at all.
    may_h2: bool,
    me: std::sync::Weak<TargetPool>,
}

impl std::fmt::Debug for TargetPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetPool")
            .field("scheme", &self.scheme)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// A connection checked out for one exchange. An HTTP/1.1 connection is boxed once,
/// when it is made: it moves from the pool to the exchange to the response body and
/// back for every request, and a pointer is cheaper to move than its state.
enum Conn {
    H1(Box<h1::Conn>),
    H2(http2::SendRequest<Body>),
}

/// The terms of one exchange (see [`TargetPool::send`]).
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    /// Bounds making a new connection (TCP and TLS).
    pub connect: Duration,
    /// Bounds the gaps in the response body.
    pub idle: Option<Duration>,
    /// The request may be sent twice (idempotent, no body): then a pooled connection
    /// that turns out closed by the upstream (its keep-alive timeout racing with our
    /// request) is replaced by a fresh one and the request sent again.
    pub replayable: bool,
    /// The response goes to an HTTP/1.1 client unchanged: an HTTP/1.1 upstream's
    /// response fields may be kept unparsed (`portico_plugins::body::RawFields`),
    /// leaving the response's `HeaderMap` empty.
    pub raw_head: bool,
}

/// How one attempt on a connection ended.
enum Outcome {
    Done(Result<Response<Body>, Failed>),
    /// Try again on this new connection, which speaks the other protocol (the head is
    /// back in the caller's parts).
    Switch(Conn, Body),
}

impl TargetPool {
    pub fn new(
        scheme: Scheme,
        authority: http::uri::Authority,
        host: String,
        port: u16,
        connector: Arc<Connector>,
    ) -> Arc<TargetPool> {
        let may_h2 = match connector.protocol {
            Protocol::Http1 => false,
            Protocol::H2 | Protocol::H2c => true,
            Protocol::Auto => scheme == Scheme::HTTPS,
        };
        Arc::new_cyclic(|me| TargetPool {
            may_h2,
            scheme,
            authority,
            host,
            port,
            connector,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            me: me.clone(),
        })
    }

    /// Take back an HTTP/1.1 connection whose exchange completed cleanly.
    pub(crate) fn put_h1(&self, conn: Box<h1::Conn>) {
        let now = portico_plugins::clock::now_ms();
        let keep = self.connector.keepalive_ms();
        let mut idle = self.idle.lock();
        // The list is used as a stack, so the oldest connections sit at the front:
        // close those past their keep time here (a closed upstream connection would
        // otherwise hold its descriptor and buffer until the next quiet checkout).
        let expired = idle
            .iter()
            .take_while(|c| now.saturating_sub(c.since_ms) >= keep)
            .count();
        if expired > 0 {
            idle.drain(..expired);
        }
        if idle.len() < self.connector.max_idle {
            idle.push(Idle {
                conn,
                since_ms: now,
            });
        }
    }

    /// HTTP/2 requests carry scheme and authority (`:scheme`, `:authority`).
    fn absolute_form(&self, uri: &mut Uri) {
        if uri.scheme().is_some() {
            return;
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        if let Ok(u) = Uri::from_parts(parts) {
            *uri = u;
        }
    }

    /// The connector this pool makes connections with.
    /// The host connected to (a name or an IP address, IPv6 in brackets as in URLs).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    /// Idle HTTP/1.1 connections currently pooled.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// A pooled connection (the shared HTTP/2 one, or an idle HTTP/1.1 one that the
    /// upstream has not closed).
    fn pooled(&self) -> Option<Conn> {
        if self.may_h2 {
            if let Some(h2) = self.h2.lock().as_ref() {
                if !h2.is_closed() {
                    return Some(Conn::H2(h2.clone()));
                }
            }
        }
        let now = portico_plugins::clock::now_ms();
        let keep = self.connector.keepalive_ms();
        loop {
            let c = self.idle.lock().pop()?;
            let mut conn = c.conn;
            if now.saturating_sub(c.since_ms) < keep && conn.usable() {
                return Some(Conn::H1(conn));
            }
        }
    }

    /// Send a request (its URI in origin form: path and query) and return the response
    /// head with a body that gives the connection back when finished, on the
    /// [`Terms`] given. `overlay` holds the gateway's own headers (applied over the request's). The
    /// request head is borrowed (its URI in origin form); on failure the body comes back
    /// when nothing of the request was sent.
    pub async fn send(
        &self,
        parts: &mut http::request::Parts,
        mut raw: Option<&h1::RawRequest>,
        body: Body,
        overlay: &Overlay,
        t: Terms,
    ) -> Result<Response<Body>, Failed> {
        let (mut conn, mut reused) = match self.pooled() {
            Some(c) => (c, true),
            None => match self.connect(t.connect).await {
                Ok(c) => (c, false),
                Err(error) => {
                    return Err(Failed {
                        error,
                        body: Some(body),
                    })
                }
            },
        };
        let mut body = body;
        // A retry on a new connection may negotiate the other protocol (ALPN); retries
        // only follow a reused connection, so this loops at most twice.
        loop {
            let outcome = match conn {
                Conn::H1(c) => {
                    self.send_h1(c, reused, (parts, raw), body, overlay, t)
                        .await
                }
                // Boxed: hyper's exchange state is large, and only HTTP/2 upstreams
                // need it.
                Conn::H2(c) => {
                    // HTTP/2 takes a header map: the fields kept as bytes go into it
                    // (once: a switch back to HTTP/1.1 then sends the map).
                    if let Some(r) = raw.take() {
                        if let Err(e) = r.fill(&mut parts.headers, true) {
                            return Err(Failed {
                                error: SendError::H1(h1::Error::Framing(e)),
                                body: Some(body),
                            });
                        }
                    }
                    Box::pin(self.send_h2(c, reused, parts, body, overlay, t)).await
                }
            };
            match outcome {
                Outcome::Done(r) => return r,
                Outcome::Switch(c, b) => (conn, body, reused) = (c, b, false),
            }
        }
    }

    async fn send_h1(
        &self,
        mut conn: Box<h1::Conn>,
        mut reused: bool,
        (parts, raw): (&mut http::request::Parts, Option<&h1::RawRequest>),
        body: Body,
        overlay: &Overlay,
        t: Terms,
    ) -> Outcome {
        let Terms {
            connect,
            idle,
            replayable,
            raw_head,
        } = t;
        let length = match raw {
            Some(r) => r.has_length(),
            None => parts.headers.contains_key(http::header::CONTENT_LENGTH),
        };
        let framing = ReqFraming::of(&parts.method, length, &body);
        h1::encode_head(conn.head_buf(), parts, raw, overlay, framing);
        let head_request = parts.method == Method::HEAD;
        let mut sending = Sending::new(std::mem::take(conn.head_buf()), body, framing);
        loop {
            let mut write_error = None;
            let result = poll_fn(|cx| {
                h1::poll_exchange(
                    &mut conn,
                    &mut sending,
                    &mut write_error,
                    (head_request, raw_head),
                    cx,
                )
            })
            .await;
            let e = match result {
                Ok(mut h) => {
                    let mut resp = Response::new(Body::Empty);
                    *resp.status_mut() = h.status;
                    *resp.version_mut() = h.version;
                    // The rest of the request, when the upstream answered before taking all of
                    // it (rare: boxed only then).
                    let unsent = if sending.done() {
                        *conn.head_buf() = sending.take_head_buf();
                        None
                    } else {
                        Some(Box::new(sending))
                    };
                    let body = ResponseBody::new(conn, &mut h, unsent, self.me.upgrade(), idle);
                    *resp.headers_mut() = h.headers;
                    if let Some(b) = body {
                        *resp.body_mut() = Body::Stream(b);
                    }
                    return Outcome::Done(Ok(resp));
                }
                Err(e) => e,
            };
            // A reused connection the upstream had closed: once more on a new one, if
            // nothing was sent or the request may be repeated.
            let stale = reused && e.is_closed();
            let give_back = |sending: &mut Sending| {
                (!sending.wrote)
                    .then(|| sending.take_unstarted_body())
                    .flatten()
            };
            if !(stale && (!sending.wrote || replayable)) {
                let error = if stale {
                    SendError::Stale(Box::new(e))
                } else {
                    SendError::H1(e)
                };
                return Outcome::Done(Err(Failed {
                    body: give_back(&mut sending),
                    error,
                }));
            }
            reused = false;
            // Encoded again (the first head went to the connection's buffer, partly
            // written perhaps): rare, so into a buffer of its own.
            let mut head = bytes::BytesMut::new();
            h1::encode_head(&mut head, parts, raw, overlay, framing);
            sending.restart(head);
            match self.connect(connect).await {
                Ok(Conn::H1(c)) => conn = c,
                Ok(c @ Conn::H2(_)) => {
                    let body = sending.take_unstarted_body().unwrap_or_default();
                    return Outcome::Switch(c, body);
                }
                Err(error) => {
                    return Outcome::Done(Err(Failed {
                        body: give_back(&mut sending),
                        error,
                    }))
                }
            }
        }
    }

    async fn send_h2(
        &self,
        mut conn: http2::SendRequest<Body>,
        mut reused: bool,
        parts: &mut http::request::Parts,
        body: Body,
        overlay: &Overlay,
        t: Terms,
    ) -> Outcome {
        let Terms { connect, idle, .. } = t;
        // hyper takes the request by value: the head is lent and put back on failure.
        let mut req = Request::from_parts(std::mem::replace(parts, empty_parts()), body);
        overlay.clone().apply(req.headers_mut());
        *req.version_mut() = Version::HTTP_2;
        self.absolute_form(req.uri_mut());
        loop {
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    let (p, body) = resp.into_parts();
                    return Outcome::Done(Ok(Response::from_parts(p, Body::incoming(body, idle))));
                }
                Err(mut e) => {
                    let back = e.take_message();
                    let error = SendError::Http(e.into_error());
                    req = match back {
                        // Not sent at all on a reused connection: once more on a new one.
                        Some(r) if reused => r,
                        Some(r) => {
                            let (p, b) = r.into_parts();
                            *parts = p;
                            return Outcome::Done(Err(Failed {
                                error,
                                body: Some(b),
                            }));
                        }
                        None => return Outcome::Done(Err(Failed { error, body: None })),
                    };
                }
            }
            reused = false;
            match self.connect(connect).await {
                Ok(Conn::H2(c)) => conn = c,
                Ok(c @ Conn::H1(_)) => {
                    // The new connection negotiated HTTP/1.1 (ALPN).
                    let (mut p, b) = origin_form(req).into_parts();
                    p.version = Version::HTTP_11;
                    *parts = p;
                    return Outcome::Switch(c, b);
                }
                Err(error) => {
                    let (p, b) = req.into_parts();
                    *parts = p;
                    return Outcome::Done(Err(Failed {
                        error,
                        body: Some(b),
                    }));
                }
            }
        }
    }

    /// Make a new connection. Boxed: the TLS handshake state is large and only needed
    /// here, so it must not inflate the future of every request.
    fn connect(
        &self,
        t: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Conn, SendError>> + Send + '_>> {
        Box::pin(async move {
            match tokio::time::timeout(t, self.connect_inner()).await {
                Ok(r) => r,
                Err(_) => Err(SendError::ConnectTimeout(crate::ConnectTimeout(t))),
            }
        })
    }

    async fn connect_inner(&self) -> Result<Conn, SendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(SendError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let c = &self.connector;
        if self.scheme == Scheme::HTTPS {
            let name = match &c.sni {
                Some(n) => n.clone(),
                None => ServerName::try_from(
                    self.host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                )
                .map_err(|e| {
                    SendError::Connect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?,
            };
            let tls = tokio_rustls::TlsConnector::from(c.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(SendError::Connect)?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                self.handshake_h2(TokioIo::new(tls)).await
            } else {
                Ok(Conn::H1(Box::new(h1::Conn::new(Stream::Tls(Box::new(
                    tls,
                ))))))
            }
        } else if matches!(c.protocol, Protocol::H2 | Protocol::H2c) {
            self.handshake_h2(TokioIo::new(tcp)).await
        } else {
            Ok(Conn::H1(Box::new(h1::Conn::new(Stream::Tcp(tcp)))))
        }
    }

    async fn handshake_h2<T>(&self, io: T) -> Result<Conn, SendError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *self.h2.lock() = Some(tx.clone());
        Ok(Conn::H2(tx))
    }
}

/// The request with its URI reduced to path and query (HTTP/1.1 request target).
fn origin_form(mut req: Request<Body>) -> Request<Body> {
    if req.uri().scheme().is_some() {
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
    }
    req
}
