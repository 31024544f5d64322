//! Aggregating routes (`aggregate:`): calls to named upstreams, in parallel except
//! where one uses an earlier one's result, combined into one JSON answer. A call's
//! path is a template over the request whose substituted values are percent-encoded,
//! so a client can fill in values but never steer a call to another host or path
//! shape.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use percent_encoding::utf8_percent_encode;
use portico_config::aggregate::{
    parse_call_template, step_refs, Aggregate as Config, CallPart, Merge, OnError,
};
// Everything but the unreserved characters is encoded in substituted values.
use portico_plugins::ctx::{has_dot_segment, PATH_VALUE as VALUE};
use portico_plugins::{Body, Ctx, ErrorKind, GatewayError};
use portico_upstream::{Overlay, Upstream};
use serde_json::{json, Map, Value};

use crate::subrequest::{send_once, Sub};

/// The header listing the calls whose results are missing.
static MISSING: HeaderName = HeaderName::from_static("portico-aggregate-missing");

/// A compiled call.
struct Call {
    name: String,
    upstream: Arc<Upstream>,
    method: Method,
    path: Vec<CallPart>,
    headers: Vec<(HeaderName, Vec<CallPart>)>,
    timeout: Duration,
    on_error: OnError,
    /// Indexes of the calls it uses results of.
    deps: Vec<usize>,
    /// 0 for calls using no results, else 1 + the deepest dependency's level.
    level: usize,
}

/// A compiled `aggregate`.
pub struct Aggregate {
    calls: Vec<Call>,
    merge: Merge,
    max_body: u64,
    timeout: Duration,
}

/// What one call produced.
enum Outcome {
    Ok(Value),
    Failed {
        status: Option<u16>,
        message: String,
    },
}

impl Aggregate {
    /// Compile; `None` if a call names an upstream that is not compiled (validation
    /// reports that).
    pub fn new(
        cfg: &Config,
        upstreams: &std::collections::HashMap<String, Arc<Upstream>>,
    ) -> Option<Aggregate> {
        let mut calls: Vec<Call> = Vec::new();
        for c in &cfg.calls {
            let upstream = upstreams.get(&c.upstream)?.clone();
            let path = parse_call_template(&c.path).ok()?;
            let mut headers = Vec::new();
            for (h, v) in &c.headers {
                headers.push((
                    HeaderName::from_bytes(h.as_bytes()).ok()?,
                    parse_call_template(v).ok()?,
                ));
            }
            let mut deps: Vec<usize> = step_refs(&path)
                .chain(headers.iter().flat_map(|(_, t)| step_refs(t)))
                .filter_map(|r| calls.iter().position(|x| x.name == r))
                .collect();
            deps.sort_unstable();
            deps.dedup();
            let level = deps.iter().map(|&d| calls[d].level + 1).max().unwrap_or(0);
            calls.push(Call {
                name: c.name.clone(),
                method: Method::from_bytes(c.method.as_bytes()).ok()?,
                timeout: c.timeout.map_or(upstream.timeouts.request.0, |t| t.0),
                upstream,
                path,
                headers,
                on_error: c.on_error.unwrap_or(cfg.on_error),
                deps,
                level,
            });
        }
        Some(Aggregate {
            calls,
            merge: cfg.merge,
            max_body: cfg.max_body.0,
            timeout: cfg.timeout.0,
        })
    }

    /// Make the calls for this request and combine their answers.
    /// `overlay` carries the forwarded headers and request id, `identity` the
    /// consumer headers; both go with every call.
    pub async fn run(
        &self,
        ctx: &Ctx,
        req: &http::request::Parts,
        overlay: &Overlay,
        identity: &HeaderMap,
    ) -> Result<Response<Body>, GatewayError> {
        match tokio::time::timeout(self.timeout, self.calls(ctx, req, overlay, identity)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "the aggregate's calls did not end within {:?}",
                    self.timeout
                ),
            )),
        }
    }

    async fn calls(
        &self,
        ctx: &Ctx,
        req: &http::request::Parts,
        overlay: &Overlay,
        identity: &HeaderMap,
    ) -> Result<Response<Body>, GatewayError> {
        let mut results: Vec<Option<Outcome>> = (0..self.calls.len()).map(|_| None).collect();
        let depth = self.calls.iter().map(|c| c.level).max().unwrap_or(0);
        for level in 0..=depth {
            let wave: Vec<usize> = (0..self.calls.len())
                .filter(|&i| self.calls[i].level == level)
                .collect();
            let futures = wave
                .iter()
                .map(|&i| self.call(&self.calls[i], ctx, req, overlay, identity, &results));
            let done = futures_util::future::join_all(futures).await;
            for (&i, outcome) in wave.iter().zip(done) {
                if let Outcome::Failed { status, message } = &outcome {
                    let c = &self.calls[i];
                    tracing::debug!(route = %ctx.route_name, call = %c.name, status = ?status, error = %message, "aggregate call failed");
                    if c.on_error == OnError::Fail {
                        let kind = if message.starts_with("no answer within") {
                            ErrorKind::UpstreamTimeout
                        } else {
                            ErrorKind::UpstreamUnavailable
                        };
                        return Err(GatewayError::new(
                            kind,
                            format!("aggregate call `{}` failed: {message}", c.name),
                        ));
                    }
                }
                results[i] = Some(outcome);
            }
        }
        Ok(self.combine(results))
    }

    /// One call: render it from the request and the results it uses, send it.
    async fn call(
        &self,
        c: &Call,
        ctx: &Ctx,
        req: &http::request::Parts,
        overlay: &Overlay,
        identity: &HeaderMap,
        results: &[Option<Outcome>],
    ) -> Outcome {
        for &d in &c.deps {
            if !matches!(results[d], Some(Outcome::Ok(_))) {
                return Outcome::Failed {
                    status: None,
                    message: format!(
                        "it uses the result of `{}`, which failed",
                        self.calls[d].name
                    ),
                };
            }
        }
        let (path, empty) = render(&c.path, ctx, req, results, &self.calls, true);
        if let Some(what) = empty {
            return Outcome::Failed {
                status: None,
                message: format!("the path needs `{what}`, which this request does not give"),
            };
        }
        let uri = match checked_path(&path) {
            Ok(u) => u,
            Err(m) => {
                return Outcome::Failed {
                    status: None,
                    message: m,
                }
            }
        };
        let mut headers = identity.clone();
        for (n, t) in &c.headers {
            let (v, _) = render(t, ctx, req, results, &self.calls, false);
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(n.clone(), v);
            }
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let sub = Sub {
            method: c.method.clone(),
            uri,
            headers,
            overlay: overlay.clone(),
            body: Body::Empty,
        };
        let t = &c.upstream.timeouts;
        match send_once(&c.upstream, sub, t.connect.0, c.timeout, self.max_body).await {
            Err(e) => Outcome::Failed {
                status: None,
                message: e.to_string(),
            },
            Ok(a) => {
                let Some(body) = a.body else {
                    return Outcome::Failed {
                        status: Some(a.status.as_u16()),
                        message: format!(
                            "the answer is larger than {} bytes or could not be read",
                            self.max_body
                        ),
                    };
                };
                let value = to_value(&body);
                if a.status.is_client_error() || a.status.is_server_error() {
                    return Outcome::Failed {
                        status: Some(a.status.as_u16()),
                        message: format!("the upstream answered {}", a.status.as_u16()),
                    };
                }
                Outcome::Ok(value)
            }
        }
    }

    /// One JSON answer from the results; missing parts are listed in
    /// `Portico-Aggregate-Missing` and under `_aggregate.missing`.
    fn combine(&self, results: Vec<Option<Outcome>>) -> Response<Body> {
        let mut out = Map::new();
        let mut missing = Vec::new();
        let mut errors = Map::new();
        for (c, r) in self.calls.iter().zip(results) {
            match r {
                Some(Outcome::Ok(v)) => match self.merge {
                    Merge::Keys => {
                        out.insert(c.name.clone(), v);
                    }
                    Merge::Deep => {
                        let mut whole = Value::Object(std::mem::take(&mut out));
                        deep_merge(&mut whole, v);
                        out = match whole {
                            Value::Object(m) => m,
                            other => {
                                let mut m = Map::new();
                                m.insert(c.name.clone(), other);
                                m
                            }
                        };
                    }
                },
                Some(Outcome::Failed { status, message }) => {
                    missing.push(c.name.clone());
                    if c.on_error == OnError::Include {
                        let e = json!({"error": {"status": status, "message": message}});
                        match self.merge {
                            Merge::Keys => {
                                out.insert(c.name.clone(), e);
                            }
                            Merge::Deep => {
                                errors.insert(c.name.clone(), e["error"].clone());
                            }
                        }
                    }
                }
                None => missing.push(c.name.clone()),
            }
        }
        if !missing.is_empty() {
            let mut meta = Map::new();
            meta.insert("missing".into(), json!(missing));
            if !errors.is_empty() {
                meta.insert("errors".into(), Value::Object(errors));
            }
            out.insert("_aggregate".into(), Value::Object(meta));
        }
        let body = serde_json::to_vec(&Value::Object(out)).unwrap_or_default();
        let mut resp = Response::new(Body::full(Bytes::from(body)));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !missing.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&missing.join(",")) {
                h.insert(MISSING.clone(), v);
            }
        }
        *resp.status_mut() = StatusCode::OK;
        resp
    }
}

/// A result as JSON: the parsed body, or its text as a string when it is not JSON.
fn to_value(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// Render a call template; substituted values are percent-encoded when `encode`.
/// Also returns the first substitution in the path (before any `?`) that came out
/// empty or missing: the path would have another shape (`/users/{id}` would become
/// `/users/`).
fn render(
    parts: &[CallPart],
    ctx: &Ctx,
    req: &http::request::Parts,
    results: &[Option<Outcome>],
    calls: &[Call],
    encode: bool,
) -> (String, Option<String>) {
    let mut out = String::new();
    let mut empty: Option<String> = None;
    // Only in the path: an empty query value is a query value.
    let note_empty = |what: String, out: &str, empty: &mut Option<String>| {
        if empty.is_none() && !out.contains('?') {
            *empty = Some(what);
        }
    };
    let push = |v: &str, out: &mut String| {
        if encode {
            out.extend(utf8_percent_encode(v, VALUE));
        } else {
            out.push_str(v);
        }
    };
    for p in parts {
        match p {
            CallPart::Lit(l) => out.push_str(l),
            CallPart::Var(v) => match ctx.var(Some(req), v) {
                Some(x) if !x.is_empty() => push(&x, &mut out),
                _ => note_empty(format!("${{{v}}}"), &out, &mut empty),
            },
            CallPart::Step(call, ptr) => {
                let value = calls
                    .iter()
                    .position(|c| &c.name == call)
                    .and_then(|i| match &results[i] {
                        Some(Outcome::Ok(v)) => v.pointer(ptr),
                        _ => None,
                    });
                match value {
                    Some(Value::String(s)) if !s.is_empty() => push(s, &mut out),
                    Some(Value::String(_)) | Some(Value::Null) | None => note_empty(
                        format!("${{steps.{call}.body{}}}", ptr.replace('/', ".")),
                        &out,
                        &mut empty,
                    ),
                    Some(other) => push(&other.to_string(), &mut out),
                }
            }
        }
    }
    (out, empty)
}

/// The rendered path as a URI, refused if it is not a plain path (a value cannot add
/// `..` segments: they are checked after rendering).
fn checked_path(path: &str) -> Result<Uri, String> {
    let (p, _) = path.split_once('?').unwrap_or((path, ""));
    if !p.starts_with('/') || p.contains("//") || has_dot_segment(p) {
        return Err(format!(
            "the rendered path `{path}` is not a plain absolute path"
        ));
    }
    path.parse::<Uri>()
        .ok()
        .filter(|u| u.scheme().is_none() && u.authority().is_none())
        .ok_or_else(|| format!("the rendered path `{path}` is not a valid URI path"))
}

/// Merge `from` into `into`: objects key by key (recursively), anything else replaced.
fn deep_merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => deep_merge(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn deep_merge_merges_objects_and_replaces_the_rest() {
        let mut a = json!({"user": {"id": 1, "name": "a"}, "tags": [1]});
        deep_merge(
            &mut a,
            json!({"user": {"name": "b", "age": 3}, "tags": [2]}),
        );
        assert_eq!(
            a,
            json!({"user": {"id": 1, "name": "b", "age": 3}, "tags": [2]})
        );
    }

    #[test]
    fn rendered_paths_must_stay_plain() {
        assert!(checked_path("/users/7?x=1").is_ok());
        assert!(checked_path("/users/../admin").is_err());
        assert!(checked_path("/users/.").is_err());
        assert!(checked_path("//evil.example/x").is_err());
        assert!(checked_path("/accounts//balance").is_err());
        // Encoded values cannot add segments or a query.
        let v: String = utf8_percent_encode("../x?y=1#z", VALUE).collect();
        assert_eq!(v, "..%2Fx%3Fy%3D1%23z");
        assert!(checked_path(&format!("/users/{v}")).is_ok());
    }
}
