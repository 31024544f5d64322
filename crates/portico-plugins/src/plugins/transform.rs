//! `request-transformer` and `response-transformer` (docs/transform.md).
//!
//! Request side, phase `upstream_request` (on the request as it goes upstream, after
//! the route's `rewrite`/`strip_prefix`): headers, then query parameters, then the
//! path (a regular expression with captures), then the method. The JSON body is
//! edited in `on_request` (it must be read before the request goes upstream).
//!
//! Response side: the JSON body in `response_body`, the status map and the headers in
//! `upstream_response`.
//!
//! Bodies are only touched when they are `application/json` (or `+json`), not
//! content-encoded and at most `max_body`; others stream through untouched (logged at
//! debug level with the route).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use portico_config::grammar::Template;
use portico_config::KeyPath;
use regex::Regex;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::body::{self, Body, Buffered};
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::plugins::headers::{self, HeaderOps};
use crate::plugins::jsonops::{BodyOps, BodySettings};
use crate::policy::{BodyStep, Flow, Policy, Step};
use crate::registry::SettingsErrors;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSettings {
    #[serde(default)]
    pub headers: HeaderOps,
    /// Query parameters of the upstream request.
    #[serde(default)]
    pub query: QueryOps,
    /// The method sent upstream (`POST`).
    #[serde(default)]
    pub method: Option<String>,
    /// Rewrite the upstream path with a regular expression (a `{param}` rewrite is
    /// the route's `rewrite:`).
    #[serde(default)]
    pub path: Option<PathRewrite>,
    /// Edits of a JSON request body.
    #[serde(default)]
    pub body: BodySettings,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResponseSettings {
    #[serde(default)]
    pub headers: HeaderOps,
    /// Edits of a JSON response body.
    #[serde(default)]
    pub body: BodySettings,
    /// Status from the upstream (or the gateway) → status sent to the client:
    /// `{"500": 503, "404": 200}`.
    #[serde(default)]
    pub status_map: BTreeMap<String, u16>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryOps {
    /// Added only when the parameter is absent. Values are templates.
    #[serde(default)]
    pub add: BTreeMap<String, Template>,
    /// Replaces every value of the parameter.
    #[serde(default)]
    pub set: BTreeMap<String, Template>,
    /// Removed (every value).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Renamed: old name → new name (the values are kept as sent).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathRewrite {
    /// A regular expression matched against the upstream path (without the query).
    pub regex: String,
    /// The replacement, in the regular expression's syntax: `$1`, `${id}` for captures
    /// (not a `${...}` template). A path that does not match is sent as it is.
    pub replace: String,
}

/// Everything a query component needs encoded (`&`, `=`, `+`, `#`, space, ...).
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, QUERY).to_string()
}

fn decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

struct CompiledQuery {
    add: Vec<(String, Template)>,
    set: Vec<(String, Template)>,
    remove: Vec<String>,
    rename: Vec<(String, String)>,
}

impl CompiledQuery {
    fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.set.is_empty()
            && self.remove.is_empty()
            && self.rename.is_empty()
    }

    /// The new query string; `values`: the rendered `set` then `add` values.
    fn apply(&self, query: Option<&str>, values: &[String]) -> String {
        // (decoded name, the pair as sent)
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                (
                    decode(p.split_once('=').map_or(p, |(k, _)| k)),
                    p.to_string(),
                )
            })
            .collect();
        pairs.retain(|(n, _)| !self.remove.contains(n));
        for (from, to) in &self.rename {
            for (n, raw) in pairs.iter_mut().filter(|(n, _)| n == from) {
                let value = raw.split_once('=').map(|(_, v)| v);
                *raw = match value {
                    Some(v) => format!("{}={v}", enc(to)),
                    None => enc(to),
                };
                n.clone_from(to);
            }
        }
        let (set_vals, add_vals) = values.split_at(self.set.len());
        for ((name, _), v) in self.set.iter().zip(set_vals) {
            pairs.retain(|(n, _)| n != name);
            pairs.push((name.clone(), format!("{}={}", enc(name), enc(v))));
        }
        for ((name, _), v) in self.add.iter().zip(add_vals) {
            if !pairs.iter().any(|(n, _)| n == name) {
                pairs.push((name.clone(), format!("{}={}", enc(name), enc(v))));
            }
        }
        let mut out = String::new();
        for (i, (_, raw)) in pairs.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(raw);
        }
        out
    }
}

struct CompiledPath {
    regex: Regex,
    replace: String,
}

/// Check that a replacement only names captures the expression has.
fn check_replacement(re: &Regex, rep: &str) -> Result<(), String> {
    let names: Vec<&str> = re.capture_names().flatten().collect();
    let mut rest = rep;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            rest = r;
            continue;
        }
        let (name, after) = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(end) => (&r[..end], &r[end + 1..]),
                None => return Err(format!("unclosed `${{` in `{rep}`")),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        rest = after;
        if name.is_empty() {
            return Err(format!(
                "a `$` in `{rep}` names no capture (write `$$` for a `$`)"
            ));
        }
        let ok = match name.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => names.contains(&name),
        };
        if !ok {
            return Err(format!(
                "`{rep}` refers to the capture `{name}`, which the regex does not have"
            ));
        }
    }
    Ok(())
}

/// `request-transformer`.
pub struct RequestTransformer {
    headers: headers::Compiled,
    query: CompiledQuery,
    method: Option<Method>,
    path: Option<CompiledPath>,
    body: BodyOps,
}

impl RequestTransformer {
    pub fn new(s: RequestSettings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let h = headers::Compiled::new(s.headers, false)
            .map_err(|e| errs.extend(e))
            .ok();
        let body = BodyOps::new(s.body, false).map_err(|e| errs.extend(e)).ok();
        let method = s
            .method
            .as_deref()
            .and_then(|m| match Method::from_bytes(m.as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    errs.push((
                        KeyPath::root().key("method"),
                        format!("`{m}` is not a method"),
                    ));
                    None
                }
            });
        let path = s.path.and_then(|p| {
            let at = KeyPath::root().key("path");
            let re = match Regex::new(&p.regex) {
                Ok(r) => r,
                Err(e) => {
                    errs.push((at.key("regex"), format!("not a regular expression: {e}")));
                    return None;
                }
            };
            if let Err(m) = check_replacement(&re, &p.replace) {
                errs.push((at.key("replace"), m));
                return None;
            }
            Some(CompiledPath {
                regex: re,
                replace: p.replace,
            })
        });
        let q = s.query;
        let qa = KeyPath::root().key("query");
        for (n, _) in q.add.iter().chain(q.set.iter()) {
            if n.is_empty() {
                errs.push((qa.clone(), "a query parameter needs a name".into()));
            }
        }
        let query = CompiledQuery {
            add: q.add.into_iter().collect(),
            set: q.set.into_iter().collect(),
            remove: q.remove,
            rename: q.rename.into_iter().collect(),
        };
        match (h, body) {
            (Some(headers), Some(body)) if errs.is_empty() => Ok(RequestTransformer {
                headers,
                query,
                method,
                path,
                body,
            }),
            _ => Err(errs),
        }
    }

    /// Read, edit and put back a JSON body.
    async fn edit_body(&self, ctx: &Ctx, req: &mut Request<Body>) -> Flow {
        let declared = body::declared_length(req.headers());
        let b = std::mem::take(req.body_mut());
        match body::buffer_upto(b, declared, self.body.max_body).await {
            Ok(Buffered::TooLarge(b)) => {
                tracing::debug!(route = %ctx.route_name, max_body = self.body.max_body,
                    "request-transformer: the request body is larger than max_body; sent untouched");
                *req.body_mut() = b;
                Flow::Continue
            }
            Ok(Buffered::Whole(bytes)) => {
                let out = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(mut v) => {
                        let (parts, empty) = std::mem::take(req).into_parts();
                        self.body.apply(&mut v, &|t| ctx.render(Some(&parts), t));
                        *req = Request::from_parts(parts, empty);
                        Bytes::from(v.to_string())
                    }
                    Err(e) => {
                        tracing::debug!(route = %ctx.route_name, error = %e,
                            "request-transformer: the request body is not JSON; sent untouched");
                        bytes
                    }
                };
                body::set_length(req.headers_mut(), out.len());
                *req.body_mut() = Body::full(out);
                Flow::Continue
            }
            Err(e) => Flow::Error(body::read_error(&e)),
        }
    }
}

impl Policy for RequestTransformer {
    fn name(&self) -> &'static str {
        "request-transformer"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        if self.body.is_empty()
            || http_body::Body::is_end_stream(req.body())
            || !body::is_json(req.headers())
            || body::is_encoded(req.headers())
        {
            return Step::cont();
        }
        Step::Pending(Box::pin(self.edit_body(ctx, req)))
    }

    fn edits_upstream_request(&self) -> bool {
        !self.headers.is_empty()
            || !self.query.is_empty()
            || self.path.is_some()
            || self.method.is_some()
    }

    fn upstream_request(&self, ctx: &mut Ctx, req: &mut http::request::Parts) {
        let mut h = std::mem::take(&mut req.headers);
        self.headers.apply(ctx, Some(req), &mut h);
        req.headers = h;
        let query = if self.query.is_empty() {
            req.uri.query().map(str::to_string)
        } else {
            let values: Vec<String> = self
                .query
                .set
                .iter()
                .chain(self.query.add.iter())
                .map(|(_, t)| ctx.render(Some(req), t))
                .collect();
            let q = self.query.apply(req.uri.query(), &values);
            (!q.is_empty()).then_some(q)
        };
        let path = match &self.path {
            Some(p) => p
                .regex
                .replace(req.uri.path(), p.replace.as_str())
                .into_owned(),
            None => req.uri.path().to_string(),
        };
        if !self.query.is_empty() || self.path.is_some() {
            let pq = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            match PathAndQuery::try_from(pq) {
                Ok(pq) if pq.path().starts_with('/') => req.uri = Uri::from(pq),
                _ => tracing::debug!(route = %ctx.route_name,
                    "request-transformer: the rewritten path is not a valid path; sent unchanged"),
            }
        }
        if let Some(m) = &self.method {
            req.method = m.clone();
        }
    }
}

/// `response-transformer`.
pub struct ResponseTransformer {
    headers: headers::Compiled,
    body: BodyOps,
    status_map: Vec<(StatusCode, StatusCode)>,
}

impl ResponseTransformer {
    pub fn new(s: ResponseSettings) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        let h = headers::Compiled::new(s.headers, true)
            .map_err(|e| errs.extend(e))
            .ok();
        let body = BodyOps::new(s.body, true).map_err(|e| errs.extend(e)).ok();
        let mut status_map = Vec::new();
        for (from, to) in &s.status_map {
            let at = KeyPath::root().key("status_map").key(from);
            let f = from
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|c| c.as_u16() >= 100);
            let t = StatusCode::from_u16(*to).ok().filter(|c| c.as_u16() >= 200);
            match (f, t) {
                (Some(f), Some(t)) => status_map.push((f, t)),
                (None, _) => errs.push((at, format!("`{from}` is not a status code (100-999)"))),
                (_, None) => errs.push((at, format!("{to} is not a final status (200-999)"))),
            }
        }
        match (h, body) {
            (Some(headers), Some(body)) if errs.is_empty() => Ok(ResponseTransformer {
                headers,
                body,
                status_map,
            }),
            _ => Err(errs),
        }
    }
}

/// Ask the upstream for an uncompressed body (a transform reads it).
pub(crate) fn ask_identity(req: &mut http::request::Parts) {
    req.headers.insert(
        http::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// Whether a response body can be read by a transform of `kind`: it has one, of the
/// right type (`wanted`), not content-encoded.
pub(crate) fn readable(
    parts: &http::response::Parts,
    body: &Body,
    wanted: impl Fn(&http::HeaderMap) -> bool,
) -> bool {
    !http_body::Body::is_end_stream(body)
        && body::declared_length(&parts.headers) != Some(0)
        && wanted(&parts.headers)
        && !body::is_encoded(&parts.headers)
}

/// The answer to a response body that broke off while a transform read it.
pub(crate) fn upstream_body_error(e: &body::BoxError) -> GatewayError {
    GatewayError::new(
        ErrorKind::UpstreamUnavailable,
        format!("the upstream response body could not be read: {e}"),
    )
}

impl Policy for ResponseTransformer {
    fn name(&self) -> &'static str {
        "response-transformer"
    }

    fn edits_upstream_request(&self) -> bool {
        !self.body.is_empty()
    }

    fn upstream_request(&self, _ctx: &mut Ctx, req: &mut http::request::Parts) {
        ask_identity(req);
    }

    fn wants_response_body(&self) -> bool {
        !self.body.is_empty()
    }

    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        parts: &'a mut http::response::Parts,
        b: Body,
    ) -> BodyStep<'a> {
        if !readable(parts, &b, body::is_json) {
            return BodyStep::pass(b);
        }
        BodyStep::Pending(Box::pin(async move {
            let declared = body::declared_length(&parts.headers);
            match body::buffer_upto(b, declared, self.body.max_body).await {
                Ok(Buffered::TooLarge(b)) => {
                    tracing::debug!(route = %ctx.route_name, max_body = self.body.max_body,
                        "response-transformer: the response body is larger than max_body; sent untouched");
                    Ok(b)
                }
                // A body that turned out empty (e.g. the answer to a HEAD): as it is.
                Ok(Buffered::Whole(bytes)) if bytes.is_empty() => Ok(Body::Empty),
                Ok(Buffered::Whole(bytes)) => {
                    let out = match serde_json::from_slice::<Value>(&bytes) {
                        Ok(mut v) => {
                            self.body.apply(&mut v, &|t| ctx.render(None, t));
                            Bytes::from(v.to_string())
                        }
                        Err(e) => {
                            tracing::debug!(route = %ctx.route_name, error = %e,
                                "response-transformer: the response body is not JSON; sent untouched");
                            bytes
                        }
                    };
                    body::set_length(&mut parts.headers, out.len());
                    Ok(Body::full(out))
                }
                Err(e) => Err(upstream_body_error(&e)),
            }
        }))
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        if let Some((_, to)) = self.status_map.iter().find(|(f, _)| *f == resp.status) {
            resp.status = *to;
        }
        self.headers.apply(ctx, None, &mut resp.headers);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn req_policy(v: Value) -> Result<RequestTransformer, SettingsErrors> {
        RequestTransformer::new(serde_json::from_value(v).unwrap())
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "rid-1".into(),
            "127.0.0.1".parse().unwrap(),
            "r".into(),
            "/".into(),
            Default::default(),
        )
    }

    fn upstream(p: &RequestTransformer, method: &str, uri: &str) -> http::request::Parts {
        let (mut parts, ()) = Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts();
        p.upstream_request(&mut ctx(), &mut parts);
        parts
    }

    #[test]
    fn query_operations_keep_what_they_do_not_touch() {
        let p = req_policy(json!({"query": {
            "add": {"page": "1", "src": "gw"},
            "set": {"v": "${request_id}"},
            "remove": ["debug"],
            "rename": {"q": "search"}
        }}))
        .unwrap();
        let r = upstream(&p, "GET", "/a?q=x%20y&debug=1&page=3&v=old&v=older&k=a+b");
        assert_eq!(r.uri.path(), "/a");
        assert_eq!(
            r.uri.query(),
            Some("search=x%20y&page=3&k=a+b&v=rid-1&src=gw")
        );
        // No query at all: only the additions.
        let r = upstream(&p, "GET", "/a");
        assert_eq!(r.uri.query(), Some("v=rid-1&page=1&src=gw"));
    }

    #[test]
    fn path_regex_and_method() {
        let p = req_policy(json!({
            "method": "POST",
            "path": {"regex": "^/old/(?P<id>[0-9]+)$", "replace": "/new/${id}"}
        }))
        .unwrap();
        let r = upstream(&p, "GET", "/old/42?x=1");
        assert_eq!(r.uri.path(), "/new/42");
        assert_eq!(r.uri.query(), Some("x=1"));
        assert_eq!(r.method, Method::POST);
        // No match: as it was.
        let r = upstream(&p, "GET", "/other/42");
        assert_eq!(r.uri.path(), "/other/42");
    }

    #[test]
    fn bad_settings_are_refused_with_their_key() {
        let e = req_policy(json!({"path": {"regex": "^/(a$", "replace": "/"}}))
            .err()
            .unwrap();
        assert_eq!(e[0].0.to_string(), "path.regex");
        let e = req_policy(json!({"path": {"regex": "^/(?P<id>a)$", "replace": "/${nope}"}}))
            .err()
            .unwrap();
        assert_eq!(e[0].0.to_string(), "path.replace");
        let e = req_policy(json!({"method": "G T"})).err().unwrap();
        assert_eq!(e[0].0.to_string(), "method");
        let e = ResponseTransformer::new(
            serde_json::from_value(json!({"status_map": {"abc": 200, "500": 100}})).unwrap(),
        )
        .err()
        .unwrap();
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn status_map_changes_the_status() {
        let p = ResponseTransformer::new(
            serde_json::from_value(json!({"status_map": {"500": 503, "404": 200}})).unwrap(),
        )
        .unwrap();
        let (mut parts, ()) = http::Response::builder()
            .status(404)
            .body(())
            .unwrap()
            .into_parts();
        p.upstream_response(&mut ctx(), &mut parts);
        assert_eq!(parts.status, 200);
        let (mut parts, ()) = http::Response::builder()
            .status(502)
            .body(())
            .unwrap()
            .into_parts();
        p.upstream_response(&mut ctx(), &mut parts);
        assert_eq!(parts.status, 502);
    }

    #[tokio::test]
    async fn json_request_bodies_are_edited_and_others_left_alone() {
        let p = req_policy(json!({"body": {"remove": ["/password"], "add": {"/by": "${request_id}"}, "max_body": 64}}))
            .unwrap();
        let mut c = ctx();
        let mk = |ct: &str, body: &str| {
            Request::builder()
                .method("POST")
                .uri("/")
                .header("content-type", ct)
                .header("content-length", body.len())
                .body(Body::full(body.to_string()))
                .unwrap()
        };
        let mut r = mk("application/json", r#"{"user":"a","password":"p"}"#);
        assert!(matches!(p.on_request(&mut c, &mut r).await, Flow::Continue));
        let b = http_body_util::BodyExt::collect(std::mem::take(r.body_mut()))
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(r.headers()["content-length"], b.len().to_string().as_str());
        assert_eq!(
            serde_json::from_slice::<Value>(&b).unwrap(),
            json!({"user": "a", "by": "rid-1"})
        );
        // Not JSON: untouched.
        let mut r = mk("text/plain", r#"{"password":"p"}"#);
        assert!(matches!(p.on_request(&mut c, &mut r).await, Flow::Continue));
        let b = http_body_util::BodyExt::collect(std::mem::take(r.body_mut()))
            .await
            .unwrap();
        assert_eq!(&b.to_bytes()[..], br#"{"password":"p"}"#);
        // Too large: untouched.
        let big = format!(r#"{{"password":"{}"}}"#, "x".repeat(100));
        let mut r = mk("application/json", &big);
        assert!(matches!(p.on_request(&mut c, &mut r).await, Flow::Continue));
        let b = http_body_util::BodyExt::collect(std::mem::take(r.body_mut()))
            .await
            .unwrap();
        assert_eq!(b.to_bytes(), big.as_bytes());
    }
}
