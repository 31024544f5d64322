//! The end of every exchange: the response body wrapper that, once the body is
//! finished (or the client went away), records metrics, writes the access-log line
//! and runs the policies' `log` phase.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use portico_plugins::{Body, BoxError, Ctx, GatewayError, Outcome};
use portico_router::Params;
use tokio::time::Instant;

use crate::access_log::{now_rfc3339, Record};
use crate::gateway::Gateway;
use crate::pipeline::ConnInfo;
use crate::snapshot::{CompiledRoute, Snapshot};

/// Everything needed to account for one exchange once it ends.
pub struct Finish {
    /// For the access log (only kept when it is on: a reference count less to update).
    pub gw: Option<Arc<Gateway>>,
    pub snap: Arc<Snapshot>,
    pub started: Instant,
    pub method: Method,
    pub uri: Uri,
    pub host: Option<HeaderValue>,
    pub version: Version,
    pub ctx: Ctx,
    pub route: Option<Arc<CompiledRoute>>,
    pub bytes_in: u64,
    /// Set when the request body has no Content-Length: the bytes actually read.
    pub bytes_in_counter: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub target: Option<Arc<str>>,
    pub upstream_ms: Option<f64>,
    pub status: u16,
    pub error: Option<&'static str>,
    /// A mirrored request's link to its copy (the primary's answer goes there).
    pub mirror: Option<crate::mirror::Pending>,
    /// Counts this exchange as in progress on its client connection until dropped
    /// (unless the server does: `Meta::in_flight_kept`).
    pub conn: Option<InFlight>,
    /// The answer goes to an HTTP/1.1 client through Portico's own server unchanged:
    /// an HTTP/1.1 upstream's response fields may stay unparsed (`RawFields`).
    pub raw_response: bool,
}

/// An exchange in progress on a client connection; dropping it (the exchange ended,
/// or was abandoned) restarts the connection's idle clock.
pub struct InFlight(pub Arc<ConnInfo>);

impl InFlight {
    pub fn start(conn: Arc<ConnInfo>) -> InFlight {
        conn.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.idle_since.store(portico_upstream::now_ms(), Relaxed);
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Finish {
    pub fn new(
        gw: &Arc<Gateway>,
        snap: Arc<Snapshot>,
        started: Instant,
        parts: &http::request::Parts,
        request_id: portico_plugins::RequestId,
        ip: IpAddr,
        conn: Option<Arc<ConnInfo>>,
    ) -> Box<Finish> {
        let logged = snap.access_log;
        // Boxed once here: it is moved through the pipeline and into the response body.
        // The box is allocated first and the value written into it, so that it is built
        // in place rather than on the stack and then copied (it is large).
        Box::write(
            Box::new_uninit(),
            Finish {
                ctx: Ctx::new(
                    request_id,
                    ip,
                    gw.no_route_name.clone(),
                    String::new(),
                    Params::default(),
                ),
                gw: logged.then(|| gw.clone()),
                snap,
                started,
                method: parts.method.clone(),
                // Only the access log needs these; skip the copies when it is off.
                uri: if logged {
                    parts.uri.clone()
                } else {
                    Uri::default()
                },
                // Set by the pipeline when the access log is on.
                host: None,
                version: parts.version,
                route: None,
                bytes_in: 0,
                bytes_in_counter: None,
                target: None,
                upstream_ms: None,
                status: 0,
                error: None,
                mirror: None,
                conn: conn.map(InFlight::start),
                raw_response: false,
            },
        )
    }

    /// Answer with an error (the standard JSON shape).
    pub fn error(mut self: Box<Self>, e: GatewayError) -> Response<LogBody> {
        let resp = self.error_response(e);
        self.complete(resp)
    }

    /// The error's answer, recorded for the log (the caller completes it).
    pub fn error_response(&mut self, e: GatewayError) -> Response<Body> {
        if e.side == portico_plugins::Side::Upstream || e.side == portico_plugins::Side::Internal {
            tracing::warn!(request_id = %self.ctx.request_id, code = e.kind.code(), error = %e.message, "request failed");
        }
        self.error = Some(e.kind.code());
        e.to_response(&self.ctx.request_id)
    }

    /// Finish the response head and wrap the body.
    pub fn complete(mut self: Box<Self>, resp: Response<Body>) -> Response<LogBody> {
        let (mut parts, body) = resp.into_parts();
        // With the upstream's fields unparsed, the server writes the id after them
        // (the map is empty: an insert would allocate it).
        // It is read from `fin` while that is kept (a copy only once it is not).
        let mut request_id = None;
        let end = body.is_end_stream();
        if body.raw_fields().is_none() {
            let v = self.ctx.request_id.header().clone();
            parts.headers.insert(&crate::forward::X_REQUEST_ID, v);
        } else if end {
            request_id = Some(self.ctx.request_id.header().clone());
        }
        self.status = parts.status.as_u16();
        let mut lb = LogBody {
            inner: body,
            fin: Some(self),
            bytes: 0,
            request_id,
        };
        if end {
            lb.finish();
        }
        Response::from_parts(parts, lb)
    }

    fn emit(&mut self, bytes_out: u64) {
        let elapsed = portico_plugins::clock::since(self.started);
        if let Some(c) = &self.bytes_in_counter {
            self.bytes_in = c.load(std::sync::atomic::Ordering::Relaxed);
        }
        let metrics = match &self.route {
            Some(r) => &r.metrics,
            None => &self.snap.unrouted,
        };
        metrics.observe(&self.method, self.status, elapsed);
        if let Some(r) = &self.route {
            let outcome = Outcome {
                status: self.status,
                bytes_in: self.bytes_in,
                bytes_out,
                error_code: self.error,
            };
            for e in &r.chain {
                e.policy.log(&self.ctx, &outcome);
            }
        }
        if self.snap.access_log {
            let host = self
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .or(self.uri.authority().map(|a| a.as_str()))
                .unwrap_or("");
            let rec = Record {
                time: now_rfc3339(),
                request_id: &self.ctx.request_id,
                client_ip: self.ctx.client_ip,
                method: self.method.as_str(),
                host,
                path: self.uri.path(),
                query: crate::access_log::redact_query(self.uri.query(), &self.snap.secret_params),
                protocol: version_str(self.version),
                route: self.route.as_ref().map(|r| &*r.name),
                consumer: self.ctx.consumer.as_ref().map(|c| c.name.as_str()),
                auth: self.ctx.auth,
                upstream: self.target.as_deref(),
                status: self.status,
                error: self.error,
                bytes_in: self.bytes_in,
                bytes_out,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                upstream_ms: self.upstream_ms,
            };
            if let Some(gw) = &self.gw {
                gw.access_log.write(&rec);
            }
        }
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// The response body sent to the client.
pub struct LogBody {
    inner: Body,
    fin: Option<Box<Finish>>,
    bytes: u64,
    /// `X-Request-Id` for a response whose fields are kept unparsed, once `fin` (which
    /// holds it) is gone.
    request_id: Option<HeaderValue>,
}

impl LogBody {
    /// The upstream response's fields kept unparsed, and the request id to add to
    /// them; the response's `HeaderMap` holds only what the gateway added.
    pub fn raw_fields(&self) -> Option<(&portico_plugins::body::RawFields, Option<&HeaderValue>)> {
        let id = self
            .request_id
            .as_ref()
            .or_else(|| self.fin.as_ref().map(|f| f.ctx.request_id.header()));
        self.inner.raw_fields().map(|r| (r, id))
    }

    fn finish(&mut self) {
        if let Some(mut f) = self.fin.take() {
            f.emit(self.bytes);
        }
    }
}

impl http_body::Body for LogBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = this.fin.as_mut() {
                    f.error = Some("upstream_body_error");
                    tracing::warn!(request_id = %f.ctx.request_id, error = %e, "response body failed mid-stream");
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LogBody {
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream();
        if let Some(f) = self.fin.as_mut() {
            if f.error.is_none() && !ended {
                f.error = Some("client_aborted");
            }
        }
        self.finish();
    }
}
