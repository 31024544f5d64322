//! Listeners: accept loops for plain (HTTP/1.1 + h2c) and TLS (ALPN h2/http1.1)
//! sockets. HTTP/1.1 connections are served by Portico's own server
//! ([`crate::h1server`]), HTTP/2 ones by hyper; both are watched for a graceful drain.
//! Sockets are bound once and kept across reloads that keep them.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use portico_plugins::Body;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;
use crate::h1server;
use crate::pipeline::{handle, ConnInfo, Meta, Received};

/// A listening socket: address and whether it speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub addr: SocketAddr,
    pub tls: bool,
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The running listeners.
#[derive(Default)]
pub struct Listeners {
    running: HashMap<ListenKey, Running>,
}

/// Bind a socket with SO_REUSEADDR (tokio sets it on Unix) and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

impl Listeners {
    /// Bind every wanted socket not yet open. On failure nothing new is kept.
    pub fn bind_missing(
        &self,
        wanted: &[ListenKey],
    ) -> Result<Vec<(ListenKey, TcpListener)>, (ListenKey, std::io::Error)> {
        let mut out = Vec::new();
        for k in wanted {
            if !self.running.contains_key(k) && !out.iter().any(|(o, _)| o == k) {
                let l = bind(k.addr).map_err(|e| (*k, e))?;
                out.push((*k, l));
            }
        }
        Ok(out)
    }

    /// Start accept loops on freshly bound sockets.
    pub fn start(&mut self, gw: &Arc<Gateway>, bound: Vec<(ListenKey, TcpListener)>) {
        for (k, l) in bound {
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(accept_loop(gw.clone(), k, l, rx));
            tracing::info!(addr = %k.addr, tls = k.tls, "listening");
            self.running.insert(k, Running { stop: tx, task });
        }
    }

    /// Stop listeners not in `wanted`; their connections drain in the background.
    pub fn stop_unwanted(&mut self, wanted: &[ListenKey]) {
        let gone: Vec<ListenKey> = self
            .running
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(r) = self.running.remove(&k) {
                tracing::info!(addr = %k.addr, tls = k.tls, "closing listener; draining its connections");
                let _ = r.stop.send(true);
            }
        }
    }

    /// Stop every listener and wait (up to `grace`) for their connections to finish.
    pub async fn shutdown(&mut self, grace: Duration) {
        let all: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for r in &all {
            let _ = r.stop.send(true);
        }
        let wait = futures_util::future::join_all(all.into_iter().map(|r| r.task));
        if tokio::time::timeout(grace + Duration::from_millis(200), wait)
            .await
            .is_err()
        {
            tracing::warn!(?grace, "grace period over; closing remaining connections");
        }
    }
}

async fn accept_loop(
    gw: Arc<Gateway>,
    key: ListenKey,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    // Stops this listener's HTTP/1.1 connections; `closed()` says they have all ended.
    let (h1_stop, h1_stop_rx) = watch::channel(false);
    let limits = gw.snapshot().limits.clone();
    // The raw limits sit above the configured ones so that the pipeline answers 414 and
    // 431 with the standard JSON body and an access-log line; these are the backstop.
    let buf = ((limits.max_header_bytes.0 as usize).saturating_mul(2))
        .max(16 * 1024)
        .max(limits.max_uri_length * 2);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size((buf as u32).max(16 * 1024))
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(Builders {
        h1: h1server::Settings {
            max_head: buf,
            max_headers: (limits.max_header_count + 1).max(100),
            write_idle: limits.client_idle_timeout.0,
        },
        h2,
        idle: limits.client_idle_timeout.0,
        h1_stop: h1_stop_rx,
    });
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = Arc::new(ConnInfo::new(peer, key.tls));
                serve(gw.clone(), builder.clone(), &graceful, stream, conn);
            }
        }
    }
    drop(listener);
    drop(builder);
    let grace = gw.snapshot().loaded.config.shutdown.grace.0;
    let _ = h1_stop.send(true);
    let all_closed = async {
        graceful.shutdown().await;
        h1_stop.closed().await;
    };
    if tokio::time::timeout(grace, all_closed).await.is_err() {
        tracing::warn!(addr = %key.addr, "connections still open after the grace period");
    }
}

/// The HTTP/1.1 and HTTP/2 server settings of a listener.
struct Builders {
    h1: h1server::Settings,
    h2: http2::Builder<TokioExecutor>,
    /// `limits.client_idle_timeout`.
    idle: Duration,
    /// Turns true when the listener stops (graceful drain of HTTP/1.1 connections).
    h1_stop: watch::Receiver<bool>,
}

/// The HTTP/2 connection preface a client with prior knowledge (h2c) starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a plain-text connection starts with the HTTP/2 preface, read without
/// consuming it (so the chosen server sees every byte, with no rewind layer per read).
/// `None` when the client sent nothing within `timeout` (the connection is dropped).
async fn is_h2c(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Some(false),
            Err(_) => return None,
        };
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A partial preface: wait for the rest (rare; clients send it in one piece).
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Serve one connection with HTTP/2 or HTTP/1.1, watched for graceful shutdown.
async fn serve_io<I>(
    gw: Arc<Gateway>,
    builders: &Builders,
    watcher: Watcher,
    io: I,
    h2: bool,
    conn: Arc<ConnInfo>,
) where
    I: h1server::SplitIo,
{
    let ended = if h2 {
        let svc_conn = conn.clone();
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let meta = Meta::of(req.headers());
            let (gw, conn) = (gw.clone(), svc_conn.clone());
            async move {
                let mut received = Received::new(req.map(|b| Body::incoming(b, None)), meta);
                handle(&gw, &conn, &gw.snapshot(), &mut received).await
            }
        });
        let c = watcher.watch(builders.h2.serve_connection(TokioIo::new(io), service));
        match idle_guard(c, &conn, builders.idle).await {
            Some(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
                true
            }
            Some(Ok(())) => true,
            None => false,
        }
    } else {
        drop(watcher);
        let c = h1server::serve(io, gw, conn.clone(), builders.h1, builders.h1_stop.clone());
        idle_guard(c, &conn, builders.idle).await.is_some()
    };
    if !ended {
        tracing::debug!(peer = %conn.peer, "closing a connection idle past limits.client_idle_timeout");
    }
}

/// Runs a connection until it ends, or until it has had no request in progress for
/// `timeout` (idle keep-alive, or a client still trickling the next request's headers:
/// slow-loris protection). One timer per connection, re-armed only when it fires, so
/// requests pay two atomic updates for it, not a timer each (hyper's own header-read
/// timeout allocates and registers one per request).
async fn idle_guard<F: std::future::Future>(
    conn_fut: F,
    conn: &ConnInfo,
    timeout: Duration,
) -> Option<F::Output> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut conn_fut = std::pin::pin!(conn_fut);
    let sleep = tokio::time::sleep(timeout);
    let mut sleep = std::pin::pin!(sleep);
    let timeout_ms = timeout.as_millis() as u64;
    // The timer is registered with this task once polled: until it fires, the task's
    // wake-ups (every read and write of the connection) need not poll it again.
    let mut armed = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = conn_fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        loop {
            if armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                armed = true;
                return Poll::Pending;
            }
            armed = false;
            let now = portico_upstream::now_ms();
            let idle_since = conn.idle_since.load(Relaxed);
            if conn.in_flight.load(Relaxed) == 0 && now.saturating_sub(idle_since) >= timeout_ms {
                return Poll::Ready(None);
            }
            let next = if conn.in_flight.load(Relaxed) > 0 {
                now + timeout_ms
            } else {
                idle_since + timeout_ms
            };
            let wait = Duration::from_millis(next.saturating_sub(now).max(1));
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
        }
    })
    .await
}

fn serve(
    gw: Arc<Gateway>,
    builders: Arc<Builders>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    conn: Arc<ConnInfo>,
) {
    gw.metrics.open_connections.fetch_add(1, Ordering::Relaxed);
    let watcher = graceful.watcher();
    let tls = if conn.tls {
        match gw.snapshot().tls.clone() {
            Some(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg)),
            None => {
                gw.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    } else {
        None
    };
    tokio::spawn(async move {
        match tls {
            Some(acceptor) => {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let session = tls.get_ref().1;
                        let h2 = session.alpn_protocol() == Some(b"h2");
                        let cert = session
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(crate::tls::client_cert);
                        let conn = match cert {
                            Some(c) => Arc::new(ConnInfo {
                                client_cert: Some(Arc::new(c)),
                                ..ConnInfo::new(conn.peer, true)
                            }),
                            None => conn,
                        };
                        serve_io(gw.clone(), &builders, watcher, tls, h2, conn).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %conn.peer, "TLS handshake timed out"),
                }
            }
            None => match is_h2c(&stream, builders.idle).await {
                Some(h2) => serve_io(gw.clone(), &builders, watcher, stream, h2, conn).await,
                None => {
                    tracing::debug!(peer = %conn.peer, "closing a connection that sent nothing")
                }
            },
        }
        gw.metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
    });
}
