//! A real upstream server on `127.0.0.1` for end-to-end tests.
//!
//! Plain upstreams serve HTTP/1.1 and h2c (prior knowledge) on the same port;
//! TLS upstreams negotiate `h2` or `http/1.1` via ALPN. The default behaviour
//! depends on the request path (see [`default_handler`]):
//!
//! | path | behaviour |
//! | --- | --- |
//! | anything else | 200 echo: JSON describing the request |
//! | `/status/{code}` | echo with that status |
//! | `/sleep/{ms}` | waits `ms` milliseconds, then echoes |
//! | `/bytes/{n}` | streams `n` bytes of `x` in 64 KiB chunks (`?chunked` omits `content-length`) |
//! | `/slowbytes/{n}/{ms}` | streams `n` bytes in 1 KiB chunks, `ms` apart (`?chunked` as above) |
//! | `/upload` | counts the request body without buffering it, answers `{"received": N}` |
//!
//! The echo JSON is
//! `{"upstream", "method", "path", "query", "uri", "version", "headers", "body_len", "body"}`;
//! every response carries `x-upstream: NAME`.

mod behaviour;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use behaviour::default_handler;

/// Error type of [`BoxBody`]: anything boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body type used by upstream handlers.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Future returned by a [`Handler`].
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>>;

/// A request handler for [`Upstream::start_with`].
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// Wraps an async closure into a [`Handler`].
///
/// ```no_run
/// use portico_test_support::upstream::{handler, full, Upstream};
/// # async fn f() {
/// let up = Upstream::start_with("custom", handler(|_req| async {
///     http::Response::builder().status(418).body(full("teapot")).unwrap()
/// })).await;
/// # drop(up); }
/// ```
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<BoxBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// A complete body from bytes.
pub fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response with `status`, `content-type: application/json` and `value` as body.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<BoxBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[derive(Default)]
struct Stats {
    hits: AtomicUsize,
    connections: AtomicUsize,
}

/// A running upstream server. Dropping it aborts the server (like [`Upstream::stop`]
/// without waiting).
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    tls: bool,
    stats: Arc<Stats>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Upstream {
    /// Starts a plain (HTTP/1.1 + h2c) upstream with the default behaviour on an
    /// ephemeral `127.0.0.1` port, on the current tokio runtime.
    pub async fn start(name: &str) -> Upstream {
        Self::spawn(name, loopback0(), None, None).await
    }

    /// Like [`Upstream::start`] but on a given address, e.g. to restart an upstream on
    /// the port of one that was stopped.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        Self::spawn(name, addr, None, None).await
    }

    /// Starts a plain upstream driven by a custom handler.
    pub async fn start_with(name: &str, handler: Handler) -> Upstream {
        Self::spawn(name, loopback0(), None, Some(handler)).await
    }

    /// Starts an HTTPS upstream (ALPN `h2`, `http/1.1`) with the default behaviour.
    /// The certificate should cover `127.0.0.1` if it is reached through [`Upstream::url`].
    pub async fn start_tls(name: &str, cert_pem: &str, key_pem: &str) -> Upstream {
        let cfg = crate::certs::server_config(cert_pem, key_pem);
        Self::spawn(name, loopback0(), Some(Arc::new(cfg)), None).await
    }

    /// The general constructor: any address, optional TLS config (its ALPN list is used
    /// as-is), optional handler (default behaviour when `None`). Panics if binding fails.
    pub async fn spawn(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Option<Handler>,
    ) -> Upstream {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("upstream {name}: cannot bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let handler = handler.unwrap_or_else(|| default_handler(name));
        let stats = Arc::new(Stats::default());
        let is_tls = tls.is_some();
        let acceptor = tls.map(TlsAcceptor::from);
        let name_hv = HeaderValue::from_str(name).unwrap();
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            handler,
            Arc::clone(&stats),
            name_hv,
        ));
        Upstream {
            name: name.to_owned(),
            addr,
            tls: is_tls,
            stats,
            task: Mutex::new(Some(task)),
        }
    }

    /// The name given at start (echoed as `upstream` and `x-upstream`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` (or `https://` for TLS upstreams), without trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Total number of requests received so far (counted when the request arrives).
    pub fn hits(&self) -> usize {
        self.stats.hits.load(Ordering::SeqCst)
    }

    /// Resets [`Upstream::hits`] to zero.
    pub fn reset_hits(&self) {
        self.stats.hits.store(0, Ordering::SeqCst);
    }

    /// Total number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes the listener and aborts every open connection.
    /// When this returns the port refuses new connections. Idempotent.
    pub async fn stop(&self) {
        let task = self.task.lock().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Connection tasks live in a `JoinSet` owned by this future, so aborting it
/// drops the listener and aborts every connection.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    handler: Handler,
    stats: Arc<Stats>,
    name: HeaderValue,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    conns.spawn(serve_conn(
                        stream,
                        acceptor.clone(),
                        Arc::clone(&handler),
                        Arc::clone(&stats),
                        name.clone(),
                    ));
                }
                // e.g. EMFILE: back off instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    acceptor: Option<TlsAcceptor>,
    handler: Handler,
    stats: Arc<Stats>,
    name: HeaderValue,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        stats.hits.fetch_add(1, Ordering::SeqCst);
        let fut = handler(req);
        let name = name.clone();
        async move {
            let mut resp = fut.await;
            resp.headers_mut().entry("x-upstream").or_insert(name);
            Ok::<_, Infallible>(resp)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    // Connection errors (resets, malformed input) are expected in tests; ignore them.
    match acceptor {
        None => {
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
        Some(acceptor) => {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        }
    }
}
