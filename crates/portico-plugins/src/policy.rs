//! The policy contract: one trait with a default no-op method per phase.
//!
//! Phases, in order (docs/plugins.md):
//! 1. `on_request` — route matched; may answer (auth, limits, cache hit, echo) and stop.
//! 2. `upstream_request` — rewrite what is sent upstream.
//! 3. `upstream_response` — status and headers from upstream (or from a policy's answer).
//!    Before it, on a response from the upstream, `response_body` of the policies that
//!    opt in ([`Policy::wants_response_body`]) sees its head and body as they came.
//! 4. `log` — always runs once the exchange is over.
//!
//! Request phases run in descending priority; response phases in ascending priority
//! (the reverse, as in Envoy's filter chain), so the policy nearest the client on the
//! way in is nearest the client on the way out.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::GatewayError;

/// What a request phase decided.
pub enum Flow {
    /// Go on with the next policy.
    Continue,
    /// Answer the client with this response; later request policies and the proxy are
    /// skipped. (Boxed: answering is the rare path; it keeps `Flow` small.)
    Respond(Box<Response<Body>>),
    /// Answer with an error.
    Error(GatewayError),
}

/// The result of a request phase: ready now (no allocation) or an async step.
pub enum Step<'a> {
    Ready(Option<Flow>),
    Pending(Pin<Box<dyn Future<Output = Flow> + Send + 'a>>),
}

impl Step<'_> {
    pub fn cont() -> Self {
        Step::Ready(Some(Flow::Continue))
    }
    pub fn respond(r: Response<Body>) -> Self {
        Step::Ready(Some(Flow::Respond(Box::new(r))))
    }
    pub fn error(e: GatewayError) -> Self {
        Step::Ready(Some(Flow::Error(e)))
    }
}

impl Future for Step<'_> {
    type Output = Flow;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Flow> {
        match self.get_mut() {
            Step::Ready(f) => Poll::Ready(f.take().unwrap_or(Flow::Continue)),
            Step::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// What [`Policy::response_body`] decided: the body to go on with (the same, or a
/// replacement such as the buffered bytes), or an error that replaces the response.
pub enum BodyStep<'a> {
    Ready(Option<Result<Body, GatewayError>>),
    Pending(Pin<Box<dyn Future<Output = Result<Body, GatewayError>> + Send + 'a>>),
}

impl BodyStep<'_> {
    /// Go on with this body.
    pub fn pass(body: Body) -> Self {
        BodyStep::Ready(Some(Ok(body)))
    }
    /// Replace the response with this error's answer.
    pub fn reject(e: GatewayError) -> Self {
        BodyStep::Ready(Some(Err(e)))
    }
}

impl Future for BodyStep<'_> {
    type Output = Result<Body, GatewayError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            BodyStep::Ready(r) => Poll::Ready(r.take().unwrap_or(Ok(Body::Empty))),
            BodyStep::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

/// Left in [`Ctx::extensions`] by a policy that answered a request itself
/// ([`Flow::Respond`]) but wants it to reach the upstream anyway, in the background:
/// the cache's stale-while-revalidate. The pipeline then sends a copy of the request
/// head (no body) through the route once more, with this value in the copy's
/// `Request::extensions` (where the policy finds its payload again), and reads the
/// answer to its end without sending it anywhere.
#[derive(Clone)]
pub struct BackgroundRefresh(pub Arc<dyn Any + Send + Sync>);

/// Summary of a finished exchange, given to the `log` phase.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error_code: Option<&'static str>,
}

/// What the gateway needs to know about an authentication policy.
#[derive(Debug, Clone)]
pub struct AuthInfo {
    /// Its `WWW-Authenticate` challenge, sent with the 401 when no policy of the route
    /// authenticated the request.
    pub challenge: http::HeaderValue,
    /// The consumer to use instead of answering 401 (`anonymous:` in its settings).
    pub anonymous: Option<Arc<str>>,
}

/// A policy. Settings are parsed once when a snapshot is compiled; methods are called per request.
pub trait Policy: Send + Sync + 'static {
    /// The policy's name as written under `plugins:`.
    fn name(&self) -> &'static str;

    /// Phase 1, after routing. Default: continue.
    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let _ = (ctx, req);
        Step::cont()
    }

    /// `Some` for authentication policies. Several on one route mean "any of": each
    /// one that finds no credential of its kind lets the request go on, and once every
    /// authentication policy ran, a request none of them authenticated is answered 401
    /// (or gets the anonymous consumer). A credential that is present but wrong is
    /// answered 401 by the policy at once.
    fn auth(&self) -> Option<AuthInfo> {
        None
    }

    /// Query parameters this policy reads credentials from: the access log never shows
    /// their values, on any route or answer. Asked once, when the snapshot is built.
    fn secret_params(&self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// Whether [`Policy::upstream_request`] is implemented. The gateway's own upstream
    /// headers (`Host`, `X-Forwarded-*`, `X-Request-Id`) are only put into the request's
    /// header map (where such a policy can see and change them) when one is.
    fn edits_upstream_request(&self) -> bool {
        false
    }

    /// Phase 2, just before the request goes upstream: `req.uri` is the upstream path
    /// and query (after the route's `rewrite`/`strip_prefix`); the policy may change
    /// it, the method and the headers. Default: nothing.
    fn upstream_request(&self, ctx: &mut Ctx, req: &mut http::request::Parts) {
        let _ = (ctx, req);
    }

    /// Phase 3, on the response head (from upstream or from a policy). Default: nothing.
    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        let _ = (ctx, resp);
    }

    /// Whether [`Policy::response_body`] is implemented. Only routes with such a policy
    /// run that phase (the others pay nothing for it).
    fn wants_response_body(&self) -> bool {
        false
    }

    /// Phase 3a, on a response from the upstream (not on the gateway's own answers nor
    /// on a policy's), before `upstream_response`: the head and the body as the upstream
    /// sent them. Policies that opt in run in ascending priority. Returns the body to go
    /// on with (e.g. the bytes it buffered), or an error whose answer replaces the
    /// response (the response phase then runs on that answer). Default: the body.
    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        resp: &'a mut http::response::Parts,
        body: Body,
    ) -> BodyStep<'a> {
        let _ = (ctx, resp);
        BodyStep::pass(body)
    }

    /// Whether [`Policy::finish_response`] is implemented.
    fn finishes_response(&self) -> bool {
        false
    }

    /// Last of the response phases, after `upstream_response`, on every answer of the
    /// route (the upstream's, a policy's, the gateway's own): may change the head and
    /// wrap the body (e.g. compress it as it streams). Policies that opt in run in
    /// ascending priority. Default: the body.
    fn finish_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts, body: Body) -> Body {
        let _ = (ctx, resp);
        body
    }

    /// Phase 3b, when no response came from the upstream (unreachable, timed out, circuit
    /// open, ...): a response to send instead of the error's answer (the cache's
    /// stale-if-error). Policies are asked in ascending priority; the first answer is
    /// used, and the response phase runs on it. Default: `None` (the error's answer).
    fn upstream_error(&self, ctx: &mut Ctx, err: &GatewayError) -> Option<Response<Body>> {
        let _ = (ctx, err);
        None
    }

    /// Phase 4, once the response is finished or failed. Default: nothing.
    fn log(&self, ctx: &Ctx, outcome: &Outcome) {
        let _ = (ctx, outcome);
    }

    /// Append the policy's own metrics to the admin `/metrics` answer, in the Prometheus
    /// text format (`# HELP`/`# TYPE` lines may repeat across instances; the admin API
    /// groups each family once). Called once per policy instance of the current
    /// configuration (a global policy shared by routes is one instance). Default: none.
    fn metrics(&self, out: &mut String) {
        let _ = out;
    }
}
