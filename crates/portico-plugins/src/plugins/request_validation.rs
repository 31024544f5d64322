//! `request-validation`: check the JSON body, the query parameters and the headers of
//! a request against JSON Schemas before it goes upstream.
//!
//! - The schemas are compiled once, when the policy is built (draft 2020-12 unless the
//!   schema's `$schema` names another draft); an invalid schema is a settings error
//!   located inside the schema (`body.properties.price.type`).
//! - The headers and the query are checked first, without touching the body. Then the
//!   body: its media type must be one of `content_types` (else 415), it must fit in
//!   `max_body` (else 413, whether `Content-Length` says so or a streamed body turns out
//!   larger), be JSON (else 400 with the line and column) and match the schema.
//! - Violations are answered `400 validation_failed` with every violation (up to
//!   [`MAX_VIOLATIONS`]) under `error.violations`: `{"in", "pointer", "keyword",
//!   "message"}`. Messages never repeat the request's values.
//! - A valid body is buffered and sent upstream unchanged, with its `Content-Length`.
//!
//! Per request: nothing is allocated unless a schema applies (a request without a body
//! and no `query`/`headers` schema costs two checks); the body is only read (and the
//! step only boxed) when a `body` schema is set and the request has a body.

use std::collections::HashMap;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Request};
use jsonschema::{Draft, PatternOptions, Validator};
use portico_config::units::ByteSize;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Number, Value};

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// At most this many violations are listed in one answer (then `truncated: true`).
pub const MAX_VIOLATIONS: usize = 100;
/// A violation's message is cut to about this many bytes.
pub(crate) const MAX_MESSAGE: usize = 300;
const DEFAULT_MAX_BODY: u64 = 1 << 20;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// JSON Schema of the JSON request body (draft 2020-12 unless `$schema` names
    /// another draft: 4, 6, 7, 2019-09).
    #[serde(default)]
    pub body: Option<Value>,
    /// JSON Schema of the query parameters, seen as an object of name → string (an
    /// array of strings when a parameter repeats). A top-level property whose `type`
    /// is `integer`, `number` or `boolean` gets the value converted when it parses as
    /// one; `type: array` always gets an array.
    #[serde(default)]
    pub query: Option<Value>,
    /// JSON Schema of the request headers, seen as an object of lower-case name →
    /// string (repeated headers joined with `, `).
    #[serde(default)]
    pub headers: Option<Value>,
    /// Largest body that is validated; a larger one is refused with 413. Default `1MiB`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Media types of the bodies that `body` validates: `type/subtype`, `type/*` or a
    /// structured-syntax suffix such as `+json`. A body of another type is refused
    /// with 415. Default: `application/json` and `+json`.
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// With a `body` schema, refuse requests without a body (400). Default `true`;
    /// `false` lets them through without body validation.
    #[serde(default = "default_true")]
    pub body_required: bool,
}

fn default_max_body() -> ByteSize {
    ByteSize(DEFAULT_MAX_BODY)
}

fn default_content_types() -> Vec<String> {
    vec!["application/json".into(), "+json".into()]
}

fn default_true() -> bool {
    true
}

/// One accepted media type, lower-case.
#[derive(Debug, PartialEq, Eq)]
enum MediaRule {
    /// `application/json`
    Exact(String),
    /// `application/*`: the type with its `/`.
    AnySubtype(String),
    /// `+json`
    Suffix(String),
}

impl MediaRule {
    fn parse(raw: &str) -> Result<MediaRule, String> {
        let s = raw.trim().to_ascii_lowercase();
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
        };
        if let Some(suffix) = s.strip_prefix('+') {
            if token(suffix) {
                return Ok(MediaRule::Suffix(s));
            }
        } else if let Some((ty, sub)) = s.split_once('/') {
            if token(ty) && sub == "*" {
                return Ok(MediaRule::AnySubtype(format!("{ty}/")));
            }
            if token(ty) && token(sub) {
                return Ok(MediaRule::Exact(s));
            }
        }
        Err(format!(
            "`{raw}` is not a media type; write `type/subtype` (`application/json`), \
             `type/*` or a suffix (`+json`), without parameters"
        ))
    }

    fn matches(&self, essence: &str) -> bool {
        match self {
            MediaRule::Exact(m) => essence == m,
            MediaRule::AnySubtype(t) => essence.starts_with(t.as_str()) && essence.len() > t.len(),
            MediaRule::Suffix(x) => {
                essence.ends_with(x.as_str())
                    && essence
                        .split_once('/')
                        .is_some_and(|(_, sub)| sub.len() > x.len())
            }
        }
    }
}

/// How a query parameter's string is converted before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scalar {
    Integer,
    Number,
    Boolean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Coerce {
    /// The property is an array: a single value becomes a one-element array.
    pub(crate) array: bool,
    /// Conversion of the value (or of each item of an array).
    pub(crate) scalar: Option<Scalar>,
}

pub struct RequestValidation {
    body: Option<Validator>,
    query: Option<(Validator, HashMap<String, Coerce>)>,
    headers: Option<Validator>,
    max_body: u64,
    content_types: Vec<MediaRule>,
    body_required: bool,
}

impl RequestValidation {
    pub fn new(s: Settings) -> Result<Self, SettingsErrors> {
        let mut errors = SettingsErrors::new();
        if s.body.is_none() && s.query.is_none() && s.headers.is_none() {
            errors.push((
                KeyPath::root(),
                "set at least one schema: `body`, `query` or `headers`".into(),
            ));
        }
        let mut compile_at = |key: &str, schema: Option<&Value>| {
            let schema = schema?;
            match compile(schema) {
                Ok(v) => Some(v),
                Err((rel, msg)) => {
                    let mut p = KeyPath::root().key(key);
                    p.append(&rel);
                    errors.push((p, msg));
                    None
                }
            }
        };
        let body = compile_at("body", s.body.as_ref());
        let query = compile_at("query", s.query.as_ref());
        let headers = compile_at("headers", s.headers.as_ref());
        if s.max_body.0 == 0 {
            errors.push((
                KeyPath::root().key("max_body"),
                "must be at least 1 byte".into(),
            ));
        }
        if s.content_types.is_empty() {
            errors.push((
                KeyPath::root().key("content_types"),
                "list at least one media type (default: `application/json` and `+json`)".into(),
            ));
        }
        let mut content_types = Vec::with_capacity(s.content_types.len());
        for (i, raw) in s.content_types.iter().enumerate() {
            match MediaRule::parse(raw) {
                Ok(r) => content_types.push(r),
                Err(m) => errors.push((KeyPath::root().key("content_types").index(i), m)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let query = query.map(|v| (v, coercions(s.query.as_ref())));
        Ok(RequestValidation {
            body,
            query,
            headers,
            max_body: s.max_body.0,
            content_types,
            body_required: s.body_required,
        })
    }

    /// Whether every `Content-Type` of the request is one of `content_types`.
    fn accepts(&self, h: &HeaderMap) -> bool {
        let mut any = false;
        for v in h.get_all(CONTENT_TYPE) {
            any = true;
            let essence = v
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !self.content_types.iter().any(|r| r.matches(&essence)) {
                return false;
            }
        }
        any
    }

    fn unsupported(&self, h: &HeaderMap) -> GatewayError {
        let got = match h.get(CONTENT_TYPE).map(|v| v.to_str()) {
            None => "no Content-Type".to_string(),
            Some(Ok(v)) => format!("`{}`", truncate(v, 100)),
            Some(Err(_)) => "an unreadable Content-Type".to_string(),
        };
        let want: Vec<String> = self
            .content_types
            .iter()
            .map(|r| match r {
                MediaRule::Exact(m) => m.clone(),
                MediaRule::AnySubtype(t) => format!("{t}*"),
                MediaRule::Suffix(x) => format!("*/*{x}"),
            })
            .collect();
        GatewayError::new(
            ErrorKind::UnsupportedMediaType,
            format!(
                "the request body must be {}; the request has {got}",
                want.join(" or ")
            ),
        )
    }

    /// Read the body (at most `max_body`), check it, and put it back for the upstream.
    async fn check_body(
        &self,
        validator: &Validator,
        req: &mut Request<Body>,
        declared: Option<u64>,
    ) -> Flow {
        let bytes = match read_limited(req.body_mut(), declared, self.max_body).await {
            Ok(b) => b,
            Err(e) => return Flow::Error(e),
        };
        if bytes.is_empty() {
            // A streamed body that turned out empty.
            *req.body_mut() = Body::Empty;
            req.headers_mut().remove(TRANSFER_ENCODING);
            req.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            return if self.body_required {
                Flow::Error(body_required())
            } else {
                Flow::Continue
            };
        }
        let value = match serde_json::from_slice::<Strict>(&bytes) {
            Ok(v) => v.0,
            Err(e) => return Flow::Error(malformed(&e)),
        };
        let mut violations = Vec::new();
        let truncated = collect(validator, &value, "body", &mut violations);
        if !violations.is_empty() {
            return Flow::Error(failed(violations, truncated));
        }
        drop(value);
        let h = req.headers_mut();
        h.remove(TRANSFER_ENCODING);
        h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        *req.body_mut() = Body::full(bytes);
        Flow::Continue
    }
}

/// 413 for a request body over `max` bytes (`len`: its announced length).
pub(crate) fn too_large(len: Option<u64>, max: u64) -> GatewayError {
    let msg = match len {
        Some(n) => format!(
            "the request body ({n} bytes) is larger than the {max} bytes that are validated"
        ),
        None => format!("the request body is larger than the {max} bytes that are validated"),
    };
    let mut e = GatewayError::new(ErrorKind::PayloadTooLarge, msg);
    e.close = true;
    e
}

/// The whole body (at most `max` bytes), or the error to answer. On 413 the rest of
/// the body stays in `body`, for the pipeline to discard (so the client receives the
/// answer).
pub(crate) async fn read_limited(
    body: &mut Body,
    declared: Option<u64>,
    max: u64,
) -> Result<Bytes, GatewayError> {
    crate::body::read_limited(body, declared, max)
        .await
        .map_err(|e| e.or_else(|| too_large(None, max)))
}

impl Policy for RequestValidation {
    fn name(&self) -> &'static str {
        "request-validation"
    }

    fn on_request<'a>(&'a self, _ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let mut violations = Vec::new();
        let mut truncated = false;
        if let Some(v) = &self.headers {
            truncated |= collect(v, &headers_value(req.headers()), "headers", &mut violations);
        }
        if let Some((v, coerce)) = &self.query {
            let q = query_value(req.uri().query(), coerce);
            truncated |= collect(v, &q, "query", &mut violations);
        }
        if !violations.is_empty() {
            return Step::error(failed(violations, truncated));
        }
        let Some(validator) = &self.body else {
            return Step::cont();
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared == Some(0) || http_body::Body::is_end_stream(req.body()) {
            return if self.body_required {
                Step::error(body_required())
            } else {
                Step::cont()
            };
        }
        if !self.accepts(req.headers()) {
            return Step::error(self.unsupported(req.headers()));
        }
        if let Some(n) = declared {
            if n > self.max_body {
                return Step::error(too_large(Some(n), self.max_body));
            }
        }
        Step::Pending(Box::pin(self.check_body(validator, req, declared)))
    }
}

/// A JSON document parsed like [`Value`], except that an object with the same key
/// twice is refused: parsers disagree on which one counts (serde_json keeps the last,
/// others the first), so `{"role": "user", "role": "admin"}` could pass validation
/// as one and reach the upstream as the other.
pub(crate) struct Strict(pub(crate) Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{}`",
                    truncate(&k, 100)
                )));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// Compile a schema; a problem comes with its path inside the schema.
fn compile(schema: &Value) -> Result<Validator, (KeyPath, String)> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err((
            KeyPath::root(),
            "a JSON Schema is an object (or `true`/`false`)".into(),
        ));
    }
    let mut opts = schema_options();
    if schema.get("$schema").is_none() {
        opts = opts.with_draft(Draft::Draft202012);
    }
    opts.build(schema).map_err(|e| {
        (
            KeyPath::from_pointer(e.instance_path().as_str()),
            schema_problem(&e),
        )
    })
}

/// The options every schema is compiled with (also by `openapi`).
pub(crate) fn schema_options<'a>() -> jsonschema::ValidationOptions<'a> {
    jsonschema::options()
        // Referenced schemas are never fetched: everything must be in the document.
        .offline()
        // Linear-time matching for `pattern`/`patternProperties` on untrusted input.
        .with_pattern_options(PatternOptions::regex())
        // `format` is checked (2020-12 only annotates it by default).
        .should_validate_formats(true)
}

/// The message for a schema that does not compile, with a hint for the usual mistakes.
pub(crate) fn schema_problem(e: &jsonschema::ValidationError<'_>) -> String {
    use jsonschema::error::ValidationErrorKind as K;
    let at = e.instance_path().as_str();
    let last = at.rsplit('/').next().unwrap_or("");
    let hint = match e.kind() {
        K::AnyOf { .. }
            if last == "type" && (e.instance().is_string() || e.instance().is_array()) =>
        {
            " (the types are array, boolean, integer, null, number, object and string)"
        }
        K::Format { format } if format == "regex" => {
            " (patterns use linear-time regular expressions: no look-around, no back-references)"
        }
        _ => "",
    };
    format!("invalid JSON Schema: {e}{hint}")
}

/// The conversions of the query schema's top-level properties.
fn coercions(schema: Option<&Value>) -> HashMap<String, Coerce> {
    let Some(props) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    else {
        return HashMap::new();
    };
    props
        .iter()
        .filter_map(|(name, p)| {
            let array = has_type(p, "array") && !has_type(p, "string");
            let target = if array { p.get("items") } else { Some(p) };
            let c = Coerce {
                array,
                scalar: target.and_then(scalar_of),
            };
            (c != Coerce::default()).then(|| (name.clone(), c))
        })
        .collect()
}

pub(crate) fn has_type(schema: &Value, t: &str) -> bool {
    match schema.get("type") {
        Some(Value::String(s)) => s == t,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(t)),
        _ => false,
    }
}

/// The conversion for a schema whose `type` allows no string.
pub(crate) fn scalar_of(schema: &Value) -> Option<Scalar> {
    if schema.get("type").is_none() || has_type(schema, "string") {
        return None;
    }
    if has_type(schema, "integer") {
        Some(Scalar::Integer)
    } else if has_type(schema, "number") {
        Some(Scalar::Number)
    } else if has_type(schema, "boolean") {
        Some(Scalar::Boolean)
    } else {
        None
    }
}

pub(crate) fn convert(s: String, to: Option<Scalar>) -> Value {
    let converted = match to {
        None => None,
        Some(Scalar::Boolean) => match s.as_str() {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Some(Scalar::Integer) => s
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| s.parse::<u64>().map(Value::from))
            .ok(),
        Some(Scalar::Number) => s.parse::<i64>().map(Value::from).ok().or_else(|| {
            s.parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
        }),
    };
    converted.unwrap_or(Value::String(s))
}

/// The query string as a JSON object (names and values percent-decoded, `+` as space).
pub(crate) fn query_value(query: Option<&str>, coerce: &HashMap<String, Coerce>) -> Value {
    let mut m = Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k), decode(v));
        match m.get_mut(&k) {
            None => {
                m.insert(k, Value::String(v));
            }
            Some(Value::Array(a)) => a.push(Value::String(v)),
            Some(old) => {
                let first = old.take();
                *old = Value::Array(vec![first, Value::String(v)]);
            }
        }
    }
    if !coerce.is_empty() {
        for (k, v) in &mut m {
            let Some(c) = coerce.get(k) else { continue };
            let conv = |x: Value| match x {
                Value::String(s) => convert(s, c.scalar),
                other => other,
            };
            *v = match v.take() {
                Value::Array(a) => Value::Array(a.into_iter().map(conv).collect()),
                one if c.array => Value::Array(vec![conv(one)]),
                one => conv(one),
            };
        }
    }
    Value::Object(m)
}

pub(crate) fn decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_string();
    }
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// The headers as a JSON object: lower-case name → value (repeats joined with `, `).
fn headers_value(h: &HeaderMap) -> Value {
    let mut m = Map::new();
    for (name, value) in h {
        let v = String::from_utf8_lossy(value.as_bytes());
        match m.get_mut(name.as_str()) {
            Some(Value::String(s)) => {
                s.push_str(", ");
                s.push_str(&v);
            }
            _ => {
                m.insert(name.as_str().to_string(), Value::String(v.into_owned()));
            }
        }
    }
    Value::Object(m)
}

/// Add the violations of `value` (at most [`MAX_VIOLATIONS`] in all); true when some
/// were left out.
pub(crate) fn collect(v: &Validator, value: &Value, place: &str, out: &mut Vec<Value>) -> bool {
    for err in v.iter_errors(value) {
        if out.len() == MAX_VIOLATIONS {
            return true;
        }
        out.push(json!({
            "in": place,
            "pointer": err.instance_path().as_str(),
            "keyword": err.kind().keyword(),
            "message": truncate(&err.masked_with("the value").to_string(), MAX_MESSAGE),
        }));
    }
    false
}

pub(crate) fn failed(violations: Vec<Value>, truncated: bool) -> GatewayError {
    let n = violations.len();
    let msg = match (n, truncated) {
        (1, false) => "the request does not match its schema: 1 violation".to_string(),
        (n, false) => format!("the request does not match its schema: {n} violations"),
        (n, true) => format!("the request does not match its schema: more than {n} violations"),
    };
    let mut e = GatewayError::new(ErrorKind::ValidationFailed, msg)
        .with_detail("violations", Value::Array(violations));
    if truncated {
        e = e.with_detail("truncated", Value::Bool(true));
    }
    e
}

fn body_required() -> GatewayError {
    GatewayError::new(ErrorKind::BadRequest, "a JSON body is required")
}

fn malformed(e: &serde_json::Error) -> GatewayError {
    // serde_json's message ends with "at line L column C".
    GatewayError::new(
        ErrorKind::BadRequest,
        format!("the request body is not valid JSON: {e}"),
    )
    .with_detail("line", e.line().into())
    .with_detail("column", e.column().into())
}

/// `s` cut to at most `max` bytes (at a character boundary), with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::parse;
    use http_body_util::BodyExt;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    fn build(v: Value) -> Result<RequestValidation, SettingsErrors> {
        RequestValidation::new(parse(&v)?)
    }

    fn errors(v: Value) -> Vec<(String, String)> {
        match build(v) {
            Ok(_) => panic!("settings accepted"),
            Err(e) => e.into_iter().map(|(p, m)| (p.to_string(), m)).collect(),
        }
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "rid-1".into(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Arc::from("r"),
            "/".into(),
            Default::default(),
        )
    }

    fn request(uri: &str, headers: &[(&str, &str)], body: Option<&str>) -> Request<Body> {
        let mut b = Request::builder().method("POST").uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let body = match body {
            Some(s) => {
                b = b.header("content-length", s.len());
                Body::full(s.to_string())
            }
            None => Body::Empty,
        };
        b.body(body).unwrap()
    }

    async fn run(p: &RequestValidation, req: &mut Request<Body>) -> Result<(), GatewayError> {
        let mut c = ctx();
        match p.on_request(&mut c, req).await {
            Flow::Continue => Ok(()),
            Flow::Error(e) => Err(e),
            Flow::Respond(_) => panic!("answered"),
        }
    }

    /// The JSON error body of an error.
    async fn answer(e: &GatewayError) -> Value {
        let resp = e.to_response("rid-1");
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn invalid_schemas_are_located_settings_errors() {
        let e =
            errors(json!({"body": {"type": "object", "properties": {"price": {"type": "nmber"}}}}));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].0, "body.properties.price.type");
        assert!(e[0].1.starts_with("invalid JSON Schema: "), "{e:?}");
        assert!(e[0].1.contains("the types are array, boolean"), "{e:?}");

        let e = errors(json!({"query": {"minLength": -1}, "headers": {"required": "x"}}));
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["query.minLength", "headers.required"], "{e:?}");

        // Not a schema at all.
        let e = errors(json!({"body": "object"}));
        assert_eq!(e[0].0, "body");
        assert!(e[0].1.contains("a JSON Schema is an object"), "{e:?}");

        // References are never fetched.
        let e = errors(json!({"body": {"$ref": "https://example.com/schema.json"}}));
        assert_eq!(e[0].0, "body", "{e:?}");
        assert!(e[0].1.contains("example.com"), "{e:?}");

        // Patterns with look-around need backtracking, which is not offered.
        let e = errors(json!({"body": {"type": "string", "pattern": "^(?!admin)"}}));
        assert_eq!(e[0].0, "body.pattern", "{e:?}");
        assert!(e[0].1.contains("no look-around"), "{e:?}");

        // Nothing to do, bad media types, zero size, unknown keys.
        let e = errors(json!({}));
        assert_eq!(e[0].0, "");
        assert!(e[0].1.contains("at least one schema"), "{e:?}");
        let e = errors(
            json!({"body": {}, "content_types": ["application/json", "json", "text/*; q=1"], "max_body": 0}),
        );
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["max_body", "content_types[1]", "content_types[2]"],
            "{e:?}"
        );
        let e = errors(json!({"body": {}, "content_type": ["application/json"]}));
        assert!(e[0].1.contains("unknown field"), "{e:?}");
    }

    #[test]
    fn schema_draft_follows_dollar_schema() {
        // 2020-12 by default: `prefixItems` applies.
        let p = build(json!({"body": {"prefixItems": [{"type": "integer"}]}})).unwrap();
        let v = p.body.as_ref().unwrap();
        assert!(!v.is_valid(&json!(["x"])));
        // Draft 7 when the schema says so: `prefixItems` is an unknown keyword there,
        // and `items` as an array validates positions.
        let p = build(json!({"body": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "prefixItems": [{"type": "integer"}],
        }}))
        .unwrap();
        assert!(p.body.as_ref().unwrap().is_valid(&json!(["x"])));
        let p = build(json!({"body": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "items": [{"type": "integer"}],
        }}))
        .unwrap();
        assert!(!p.body.as_ref().unwrap().is_valid(&json!(["x"])));
        // `format` is asserted.
        let p = build(json!({"body": {"format": "email"}})).unwrap();
        assert!(!p.body.as_ref().unwrap().is_valid(&json!("not an email")));
    }

    #[test]
    fn media_types() {
        let rules: Vec<MediaRule> = ["application/json", "+json", "text/*"]
            .iter()
            .map(|r| MediaRule::parse(r).unwrap())
            .collect();
        let ok = |m: &str| rules.iter().any(|r| r.matches(m));
        assert!(ok("application/json"));
        assert!(ok("application/problem+json"));
        assert!(ok("application/vnd.api+json"));
        assert!(ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(!ok("application/+json"));
        assert!(!ok("text/"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert_eq!(
            MediaRule::parse("Application/JSON").unwrap(),
            MediaRule::Exact("application/json".into())
        );
    }

    #[test]
    fn query_values_and_coercion() {
        let schema = json!({"properties": {
            "page": {"type": "integer"},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "integer"}},
            "names": {"type": "array"},
            "either": {"type": ["integer", "string"]},
            "maybe": {"type": ["integer", "null"]},
        }});
        let c = coercions(Some(&schema));
        let q = query_value(
            Some("page=2&ratio=0.5&flag=true&tags=1&tags=x&names=a&either=3&maybe=4&free=a+b%21&free=c&empty&&page2=9"),
            &c,
        );
        assert_eq!(
            q,
            json!({
                "page": 2, "ratio": 0.5, "flag": true, "tags": [1, "x"], "names": ["a"],
                "either": "3", "maybe": 4, "free": ["a b!", "c"], "empty": "", "page2": "9",
            })
        );
        // Values that do not parse stay strings (and fail `type`).
        let q = query_value(Some("page=two&flag=yes&ratio=NaN"), &c);
        assert_eq!(q, json!({"page": "two", "flag": "yes", "ratio": "NaN"}));
        // A repeated scalar is an array (and fails `type: integer`).
        let q = query_value(Some("page=1&page=2"), &c);
        assert_eq!(q, json!({"page": [1, 2]}));
        assert_eq!(query_value(None, &c), json!({}));
    }

    #[test]
    fn headers_as_an_object() {
        let mut h = HeaderMap::new();
        h.append("X-Api-Version", HeaderValue::from_static("2"));
        h.append("accept", HeaderValue::from_static("a/b"));
        h.append("accept", HeaderValue::from_static("c/d"));
        assert_eq!(
            headers_value(&h),
            json!({"x-api-version": "2", "accept": "a/b, c/d"})
        );
    }

    #[tokio::test]
    async fn every_violation_is_listed_with_its_pointer() {
        let p = build(json!({"body": {
            "type": "object",
            "required": ["name", "items"],
            "properties": {
                "items": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"price": {"type": "number", "minimum": 0}},
                }},
                "secret": {"type": "integer"},
            },
        }}))
        .unwrap();
        let mut req = request(
            "/",
            &[("content-type", "application/json")],
            Some(r#"{"items": [{"price": -1}, {"price": "x"}], "secret": "hunter2"}"#),
        );
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ValidationFailed);
        let a = answer(&e).await;
        let err = &a["error"];
        assert_eq!(err["status"], 400);
        assert_eq!(err["code"], "validation_failed");
        assert_eq!(err["request_id"], "rid-1");
        assert_eq!(
            err["message"],
            "the request does not match its schema: 4 violations"
        );
        let mut got: Vec<(String, String, String)> = err["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                assert_eq!(v["in"], "body");
                (
                    v["pointer"].as_str().unwrap().to_string(),
                    v["keyword"].as_str().unwrap().to_string(),
                    v["message"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].0, "");
        assert_eq!(got[0].1, "required");
        assert!(got[0].2.contains("\"name\""), "{got:?}");
        assert_eq!(
            (got[1].0.as_str(), got[1].1.as_str()),
            ("/items/0/price", "minimum")
        );
        assert_eq!(
            (got[2].0.as_str(), got[2].1.as_str()),
            ("/items/1/price", "type")
        );
        assert_eq!((got[3].0.as_str(), got[3].1.as_str()), ("/secret", "type"));
        // The request's values are never repeated.
        assert!(!a.to_string().contains("hunter2"), "{a}");
    }

    #[tokio::test]
    async fn violations_are_capped() {
        let p = build(json!({"body": {"items": {"type": "integer"}}})).unwrap();
        let body = serde_json::to_string(&vec!["x"; 500]).unwrap();
        let mut req = request("/", &[("content-type", "application/json")], Some(&body));
        let e = run(&p, &mut req).await.unwrap_err();
        let a = answer(&e).await;
        assert_eq!(
            a["error"]["violations"].as_array().unwrap().len(),
            MAX_VIOLATIONS
        );
        assert_eq!(a["error"]["truncated"], true);
    }

    #[tokio::test]
    async fn valid_body_is_put_back_unchanged() {
        let p = build(json!({"body": {"type": "object"}})).unwrap();
        let text = "{ \"a\" : [1, 2.50, \"\\u00e9\"] }\n";
        let mut req = request(
            "/",
            &[("content-type", "application/vnd.x+json; charset=utf-8")],
            Some(text),
        );
        run(&p, &mut req).await.unwrap();
        assert_eq!(
            req.headers()["content-length"],
            text.len().to_string().as_str()
        );
        let b = std::mem::take(req.body_mut())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(b, text.as_bytes());
    }

    #[tokio::test]
    async fn body_problems() {
        let p = build(json!({"body": {"type": "object"}, "max_body": 16})).unwrap();
        // Not JSON: line and column.
        let mut req = request(
            "/",
            &[("content-type", "application/json")],
            Some("{\n \"a\": }"),
        );
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("line 2 column 7"), "{}", e.message);
        let a = answer(&e).await;
        assert_eq!(
            (a["error"]["line"].as_u64(), a["error"]["column"].as_u64()),
            (Some(2), Some(7))
        );
        // The same key twice: which one counts depends on the parser.
        let mut req = request(
            "/",
            &[("content-type", "application/json")],
            Some(r#"{"a":1,"a":2}"#),
        );
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(
            e.message.contains("duplicate key `a` at line 1"),
            "{}",
            e.message
        );
        // Too deep.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut req = request("/", &[("content-type", "application/json")], Some(&deep));
        let p2 = build(json!({"body": {}})).unwrap();
        let e = run(&p2, &mut req).await.unwrap_err();
        assert!(e.message.contains("recursion limit"), "{}", e.message);
        // Another media type, or none.
        let mut req = request("/", &[("content-type", "text/plain")], Some("{}"));
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMediaType);
        assert_eq!(e.kind.status().as_u16(), 415);
        assert!(e.message.contains("`text/plain`"), "{}", e.message);
        let mut req = request("/", &[], Some("{}"));
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMediaType);
        // Too large, announced.
        let mut req = request(
            "/",
            &[("content-type", "application/json")],
            Some(r#"{"aaaaaaaaaaaaaaaa": 1}"#),
        );
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        assert!(e.close);
        // Too large, streamed (no Content-Length).
        let mut req = request("/", &[("content-type", "application/json")], None);
        req.headers_mut().remove("content-length");
        *req.body_mut() = Body::boxed(Frames(vec!["{\"a\": ", "\"0123456789\"", "}"]));
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        // Streamed and small enough: joined and put back.
        let mut req = request("/", &[("content-type", "application/json")], None);
        *req.body_mut() = Body::boxed(Frames(vec!["{\"a\": ", "1", "}"]));
        run(&p, &mut req).await.unwrap();
        assert_eq!(req.headers()["content-length"], "8");
        let b = std::mem::take(req.body_mut())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(b, "{\"a\": 1}");
        // No body.
        let mut req = request("/", &[], None);
        let e = run(&p, &mut req).await.unwrap_err();
        assert_eq!(e.message, "a JSON body is required");
        let p = build(json!({"body": {"type": "object"}, "body_required": false})).unwrap();
        let mut req = request("/", &[], None);
        run(&p, &mut req).await.unwrap();
    }

    /// A streamed body of several frames, without a known length.
    struct Frames(Vec<&'static str>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            let next = (!self.0.is_empty()).then(|| self.0.remove(0));
            std::task::Poll::Ready(
                next.map(|s| Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes())))),
            )
        }
    }

    #[tokio::test]
    async fn query_and_headers() {
        let p = build(json!({
            "query": {"type": "object", "properties": {"page": {"type": "integer", "minimum": 1}}, "required": ["page"]},
            "headers": {"type": "object", "properties": {"x-api-version": {"enum": ["1", "2"]}}, "required": ["x-api-version"]},
        }))
        .unwrap();
        let mut req = request("/?page=2", &[("x-api-version", "2")], None);
        run(&p, &mut req).await.unwrap();
        let mut req = request("/?page=0", &[("X-Api-Version", "3")], None);
        let e = run(&p, &mut req).await.unwrap_err();
        let a = answer(&e).await;
        let v: Vec<(String, String)> = a["error"]["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["in"].as_str().unwrap().into(),
                    v["pointer"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            v,
            [
                ("headers".to_string(), "/x-api-version".to_string()),
                ("query".to_string(), "/page".to_string())
            ]
        );
        // A policy without a body schema never looks at the body.
        let mut req = request(
            "/?page=1",
            &[("x-api-version", "1"), ("content-type", "text/plain")],
            Some("not json"),
        );
        run(&p, &mut req).await.unwrap();
        assert!(matches!(req.body(), Body::Full(Some(_))));
    }
}
