//! Connections to one target: pooled HTTP/1.1 connections (one request at a time each)
//! or one shared HTTP/2 connection, over TCP or TLS.
//!
//! An HTTP/1.1 connection goes back to the pool when its response body has been read
//! to the end (see `Body::incoming_pooled`), so checking one out is a short lock on a
//! per-target list: no hashing, no spawned task per request. A request that a reused
//! connection could not even start sending (the peer closed it while idle) is retried
//! once on a new connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use portico_config::model::Protocol;
use portico_plugins::body::{PoolReturn, Repool};
use portico_plugins::Body;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long an idle pooled connection is kept.
const IDLE_KEEP: Duration = Duration::from_secs(90);

/// Below this idle time no upstream closes a kept-alive connection (keep-alive timeouts
/// are seconds), so a request on a busier connection needs no replay copy.
const STALE_RISK: Duration = Duration::from_millis(250);

/// A failed exchange; `request` is given back when nothing of it was sent.
pub struct Failed {
    pub error: SendError,
    pub request: Option<Request<Body>>,
}

impl std::fmt::Debug for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failed")
            .field("error", &self.error)
            .field("request_returned", &self.request.is_some())
            .finish()
    }
}

/// A copy of a bodyless request's head, to send it again.
fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut r = Request::new(Body::Empty);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// How connections to the targets of one upstream are made.
pub struct Connector {
    /// TLS settings, ALPN already set from the protocol.
    pub tls: Arc<rustls::ClientConfig>,
    /// Server name to send instead of the target host.
    pub sni: Option<ServerName<'static>>,
    pub protocol: Protocol,
    pub max_idle: usize,
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
    Stale(hyper::Error),
    /// The exchange failed after the connection was made.
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
    conn: http1::SendRequest<Body>,
    since: Instant,
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

impl Repool for TargetPool {
    fn put(&self, conn: http1::SendRequest<Body>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < self.connector.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
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
    pub fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    /// Idle HTTP/1.1 connections currently pooled.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// A pooled connection and how long it sat idle, or else a new connection.
    async fn checkout(&self, connect: Duration) -> Result<(Conn, Option<Duration>), SendError> {
        match self.pooled() {
            Some(c) => Ok(c),
            None => Ok((self.connect(connect).await?, None)),
        }
    }

    /// A pooled connection and how long it sat idle.
    fn pooled(&self) -> Option<(Conn, Option<Duration>)> {
        if self.may_h2 {
            if let Some(h2) = self.h2.lock().as_ref() {
                if !h2.is_closed() {
                    return Some((Conn::H2(h2.clone()), Some(Duration::ZERO)));
                }
            }
        }
        let mut idle = self.idle.lock();
        while let Some(c) = idle.pop() {
            let idle_for = c.since.elapsed();
            if !c.conn.is_closed() && idle_for < IDLE_KEEP {
                return Some((Conn::H1(c.conn), Some(idle_for)));
            }
        }
        None
    }

    /// Send a request (its URI in origin form: path and query) and return the response
    /// head with a body that gives the connection back when finished. `connect` bounds
    /// making a new connection (TCP and TLS); `idle` bounds the gaps in the response
    /// body. `replayable` says the request may be sent twice (idempotent, no body): then
    /// a pooled connection that turns out closed by the upstream (its keep-alive timeout
    /// racing with our request) is replaced by a fresh one and the request sent again.
    /// On failure the request comes back when nothing of it was sent.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        connect: Duration,
        idle: Option<Duration>,
        replayable: bool,
    ) -> Result<Response<Body>, Failed> {
        let (mut conn, mut idle_for) = match self.checkout(connect).await {
            Ok(c) => c,
            Err(error) => {
                return Err(Failed {
                    error,
                    request: Some(req),
                })
            }
        };
        let mut retried = false;
        loop {
            // Only a connection that sat idle for a while can have been closed by the
            // upstream's keep-alive timeout; keep a copy of the request just then.
            let backup = match (&conn, idle_for) {
                (Conn::H1(_), Some(d)) if replayable && !retried && d >= STALE_RISK => {
                    Some(copy_head(&req))
                }
                _ => None,
            };
            let result = match &mut conn {
                Conn::H1(c) => {
                    if c.ready().await.is_err() {
                        // Closed while idle: take another one.
                        (conn, idle_for) = match self.checkout(connect).await {
                            Ok(c) => c,
                            Err(error) => {
                                return Err(Failed {
                                    error,
                                    request: Some(req),
                                })
                            }
                        };
                        continue;
                    }
                    *req.version_mut() = Version::HTTP_11;
                    c.try_send_request(req).await
                }
                Conn::H2(c) => {
                    *req.version_mut() = Version::HTTP_2;
                    self.absolute_form(req.uri_mut());
                    c.try_send_request(req).await
                }
            };
            let reused = idle_for.is_some();
            match result {
                Ok(resp) => return Ok(self.wrap(resp, conn, idle)),
                Err(mut e) => {
                    let back = e.take_message();
                    let error = e.into_error();
                    let stale = reused
                        && (error.is_incomplete_message()
                            || error.is_closed()
                            || error.is_canceled()
                            || is_reset(&error));
                    req = match (back, backup) {
                        // Not sent at all on a reused connection: once more on a new one.
                        (Some(r), _) if reused => r,
                        // Sent on a connection the upstream had closed: repeat it.
                        (None, Some(copy)) if stale => copy,
                        (back, _) => {
                            let error = if stale {
                                SendError::Stale(error)
                            } else {
                                SendError::Http(error)
                            };
                            return Err(Failed {
                                error,
                                request: back,
                            });
                        }
                    };
                    retried = true;
                    idle_for = None;
                    conn = match self.connect(connect).await {
                        Ok(c) => c,
                        Err(error) => {
                            return Err(Failed {
                                error,
                                request: Some(req),
                            })
                        }
                    };
                }
            }
        }
    }

    fn wrap(&self, resp: Response<Incoming>, conn: Conn, idle: Option<Duration>) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let body = match (conn, self.me.upgrade()) {
            (Conn::H1(c), Some(pool)) => {
                Body::incoming_pooled(body, idle, PoolReturn { pool, conn: c })
            }
            _ => Body::incoming(body, idle),
        };
        Response::from_parts(parts, body)
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
                self.handshake_h1(TokioIo::new(tls)).await
            }
        } else if matches!(c.protocol, Protocol::H2 | Protocol::H2c) {
            self.handshake_h2(TokioIo::new(tcp)).await
        } else {
            self.handshake_h1(TokioIo::new(tcp)).await
        }
    }

    async fn handshake_h1<T>(&self, io: T) -> Result<Conn, SendError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Conn::H1(tx))
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

/// The connection was reset or its write side broken (the peer closed it).
fn is_reset(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        src = s.source();
    }
    false
}
