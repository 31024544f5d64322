//! `openapi`: validate requests (and optionally responses) against an OpenAPI 3.0 or
//! 3.1 document.
//!
//! - The document (a file next to the configuration, YAML or JSON, or written inline)
//!   is read and compiled once, when the policy is built: every operation's
//!   parameters, request body and responses become compiled JSON Schemas. Only
//!   references inside the document are followed (`#/components/...`); any other
//!   `$ref` is a settings error. OpenAPI 3.0 schemas are converted to JSON Schema
//!   draft 2020-12 first ([`Converter`]); 3.1 schemas are 2020-12 already.
//! - A request is matched to an operation by its path (templates such as
//!   `/orders/{id}`; the most literal path first) and its method. No matching path is
//!   answered `404 no_operation`, a path without that method `405 method_not_allowed`
//!   with `Allow` (or both pass through, with `unknown_operation: pass`).
//! - Path, query, header and cookie parameters and the request body are checked; every
//!   violation is listed in one `400 validation_failed` answer (as `request-validation`
//!   does: `{"in", "name", "pointer", "keyword", "message"}`). An undeclared body media
//!   type is `415`, a body over `max_body` is `413`.
//! - With `response_validation: log | reject`, the upstream's response is checked too
//!   (status, headers, media type, JSON body up to `max_body`): `log` writes a sampled
//!   warning per violation, `reject` also replaces the response with
//!   `502 response_contract_violation`.
//! - Counters per route, operation and direction are reported on the admin `/metrics`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use jsonschema::{Draft, Registry, Validator};
use parking_lot::RwLock;
use portico_config::units::ByteSize;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::request_validation::{
    collect, convert, decode, failed, has_type, query_value, read_limited, scalar_of,
    schema_options, schema_problem, too_large, truncate, Coerce, Scalar, Strict, MAX_MESSAGE,
    MAX_VIOLATIONS,
};
use crate::body::{Body, BoxError};
use crate::ctx::{cookie, Ctx};
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{BodyStep, Flow, Policy, Step};
use crate::registry::SettingsErrors;

const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// The base URI of the document in the schema registry.
const DOC_URI: &str = "urn:portico:openapi";
/// At most this many problems of a document are reported.
const MAX_SPEC_ERRORS: usize = 50;
/// `$ref` chains (outside schemas) longer than this are refused.
const MAX_REF_HOPS: usize = 32;
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The OpenAPI 3.0 or 3.1 document, YAML or JSON: a file path, relative to the
    /// configuration file's directory. Set this or `spec_inline`.
    #[serde(default)]
    pub spec: Option<String>,
    /// The OpenAPI document written in the configuration itself.
    #[serde(default)]
    pub spec_inline: Option<Value>,
    /// Prefix of the request path that the document's paths are relative to (e.g.
    /// `/api`); requests outside it are unknown operations. Default: the path of the
    /// document's first `servers[].url`, else none. `""` or `/`: none.
    #[serde(default)]
    pub base_path: Option<String>,
    /// Check requests (parameters and body). Default `true`.
    #[serde(default = "default_true")]
    pub request_validation: bool,
    /// Check the upstream's responses: `off` (default), `log` (a sampled warning per
    /// violation) or `reject` (also answer `502 response_contract_violation`).
    #[serde(default)]
    pub response_validation: ResponseMode,
    /// What happens to a request the document has no operation for: `reject` (404
    /// `no_operation`, or 405 when the path exists) or `pass` (sent upstream unchecked).
    #[serde(default)]
    pub unknown_operation: UnknownOperation,
    /// Largest request body that is validated (a larger one is refused with 413) and
    /// largest response body that is buffered and validated (a larger one streams
    /// through unchecked). Default `1MiB`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// At most this many response-violation warnings are logged per second and route
    /// (the others are counted in the next line's `suppressed`). Default 10.
    #[serde(default = "default_sample")]
    pub log_sample_per_second: u32,
}

fn default_true() -> bool {
    true
}

fn default_max_body() -> ByteSize {
    ByteSize(DEFAULT_MAX_BODY)
}

fn default_sample() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResponseMode {
    #[default]
    Off,
    Log,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownOperation {
    #[default]
    Reject,
    Pass,
}

// ---------------------------------------------------------------------------
// The compiled document
// ---------------------------------------------------------------------------

pub struct OpenApi {
    /// By precedence: the most literal paths first.
    paths: Vec<PathEntry>,
    ops: Vec<Operation>,
    /// Without a trailing `/`; never empty.
    base_path: Option<String>,
    request_validation: bool,
    response: ResponseMode,
    unknown: UnknownOperation,
    max_body: u64,
    sample: u32,
    stats: RwLock<HashMap<Arc<str>, Arc<RouteStats>>>,
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    /// A segment with variables (`{id}`, `{name}.{ext}`, `v{version}`).
    Tpl(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(String),
}

struct PathEntry {
    segs: Vec<Seg>,
    /// Operations of the path by method (index into `ops`).
    methods: Vec<(Method, usize)>,
    allow: HeaderValue,
}

struct Operation {
    /// `operationId`, else `METHOD /template`.
    label: String,
    params: Vec<Param>,
    has_query: bool,
    body: Option<ReqBody>,
    /// Compiled when responses are validated.
    responses: Option<Responses>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum In {
    Path,
    Query,
    Header,
    Cookie,
}

impl In {
    fn as_str(self) -> &'static str {
        match self {
            In::Path => "path",
            In::Query => "query",
            In::Header => "header",
            In::Cookie => "cookie",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Simple,
    Label,
    Matrix,
    Form,
    SpaceDelimited,
    PipeDelimited,
    DeepObject,
}

/// How a parameter's (or response header's) strings become the JSON value validated.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    /// One value, converted when the schema's type is integer, number or boolean.
    Scalar(Option<Scalar>),
    /// A list; its items converted by `items.type`.
    Array(Option<Scalar>),
    /// An object: every property of the schema, with its conversion.
    Object(HashMap<String, Coerce>),
    /// `content: {application/json: ...}`: the value is a JSON document.
    Json,
}

struct Param {
    name: String,
    header: Option<HeaderName>,
    location: In,
    required: bool,
    style: Style,
    explode: bool,
    shape: Shape,
    validator: Option<Validator>,
}

struct ReqBody {
    required: bool,
    media: Vec<Media>,
}

/// A media type range of a `content` map.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Range {
    Exact(String),
    /// `type/*`: the type with its `/`.
    Type(String),
    Any,
}

impl Range {
    fn parse(key: &str) -> Range {
        let essence = key
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.split_once('/') {
            Some(("*", "*")) => Range::Any,
            Some((t, "*")) => Range::Type(format!("{t}/")),
            _ => Range::Exact(essence),
        }
    }
}

struct Media {
    /// The key as written in the document.
    key: String,
    range: Range,
    validator: Option<Validator>,
    /// Conversions of a form body's fields.
    form: HashMap<String, Coerce>,
}

/// The most specific entry of `media` for the (lower-case) essence: exact, then
/// `type/*`, then `*/*`.
fn find_media<'m>(media: &'m [Media], essence: &str) -> Option<&'m Media> {
    media
        .iter()
        .find(|m| matches!(&m.range, Range::Exact(e) if e == essence))
        .or_else(|| {
            media.iter().find(
                |m| matches!(&m.range, Range::Type(t) if essence.starts_with(t.as_str()) && essence.len() > t.len()),
            )
        })
        .or_else(|| media.iter().find(|m| m.range == Range::Any))
}

fn media_list(media: &[Media]) -> String {
    let keys: Vec<&str> = media.iter().map(|m| m.key.as_str()).collect();
    keys.join(", ")
}

/// What a body of this media type is, for validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Form,
    Other,
}

fn kind_of(essence: &str) -> Kind {
    if essence == "application/json"
        || essence
            .split_once('/')
            .is_some_and(|(_, sub)| sub.len() > 5 && sub.ends_with("+json"))
    {
        Kind::Json
    } else if essence == "application/x-www-form-urlencoded" {
        Kind::Form
    } else {
        Kind::Other
    }
}

/// The lower-case media type of a `Content-Type`, without parameters.
fn essence(h: &HeaderMap) -> Option<String> {
    let v = h.get(CONTENT_TYPE)?;
    Some(
        String::from_utf8_lossy(v.as_bytes())
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

struct Responses {
    list: Vec<Resp>,
    exact: HashMap<u16, usize>,
    /// `1XX` … `5XX` at indexes 1 … 5.
    ranges: [Option<usize>; 6],
    default: Option<usize>,
}

impl Responses {
    fn find(&self, status: u16) -> Option<&Resp> {
        self.exact
            .get(&status)
            .or_else(|| {
                self.ranges
                    .get(usize::from(status / 100))
                    .and_then(Option::as_ref)
            })
            .or(self.default.as_ref())
            .and_then(|&i| self.list.get(i))
    }
}

struct Resp {
    headers: Vec<RespHeader>,
    /// Empty: the response has no body.
    content: Vec<Media>,
}

struct RespHeader {
    name: HeaderName,
    label: String,
    required: bool,
    shape: Shape,
    validator: Option<Validator>,
}

/// The operation a request matched, kept for its response.
#[derive(Debug, Clone, Copy)]
struct Matched {
    op: usize,
    /// A `HEAD` request answered by the `get` operation: no body.
    head: bool,
}

enum Found {
    Op {
        op: usize,
        head: bool,
        params: Vec<(String, String)>,
    },
    /// The path exists, without that method.
    Method(HeaderValue),
    None,
}

// ---------------------------------------------------------------------------
// Counters and log sampling
// ---------------------------------------------------------------------------

#[derive(Default)]
struct OpStats {
    req_validated: AtomicU64,
    req_violations: AtomicU64,
    resp_validated: AtomicU64,
    resp_violations: AtomicU64,
    resp_skipped: AtomicU64,
}

struct RouteStats {
    ops: Box<[OpStats]>,
    /// Requests for no operation of the document (answered 404/405).
    unknown: OpStats,
    sampler: Sampler,
}

impl RouteStats {
    fn op(&self, op: Option<usize>) -> &OpStats {
        op.and_then(|i| self.ops.get(i)).unwrap_or(&self.unknown)
    }
}

/// At most N log lines per second.
#[derive(Default)]
struct Sampler {
    second: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
}

impl Sampler {
    /// Whether a line may be logged now; with the number suppressed since the last one.
    fn allow(&self, per_second: u32) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < per_second {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

/// A problem of the document: a JSON pointer into it and a message.
type SpecError = (String, String);

impl OpenApi {
    pub fn new(s: Settings, config_dir: Option<&Path>) -> Result<Self, SettingsErrors> {
        let mut errors = SettingsErrors::new();
        if s.max_body.0 == 0 {
            errors.push((
                KeyPath::root().key("max_body"),
                "must be at least 1 byte".into(),
            ));
        }
        let base_path = match s.base_path.as_deref().map(str::trim) {
            Some(b) if !b.is_empty() && !b.starts_with('/') => {
                errors.push((
                    KeyPath::root().key("base_path"),
                    format!("`{b}` is not a path; write it from the root, e.g. `/api`"),
                ));
                None
            }
            Some(b) => Some(Some(b.trim_end_matches('/').to_string()).filter(|b| !b.is_empty())),
            None => None,
        };
        let source = match (&s.spec, &s.spec_inline) {
            (Some(file), None) => Some(Source::load(file, config_dir)),
            (None, Some(doc)) => Some(Ok(Source::inline(doc.clone()))),
            (Some(_), Some(_)) => {
                errors.push((
                    KeyPath::root(),
                    "set either `spec` (a file) or `spec_inline`, not both".into(),
                ));
                None
            }
            (None, None) => {
                errors.push((
                    KeyPath::root(),
                    "set `spec` (the path of an OpenAPI document) or `spec_inline`".into(),
                ));
                None
            }
        };
        let source = match source {
            Some(Ok(src)) => Some(src),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
            None => None,
        };
        let Some(source) = source else {
            return Err(errors);
        };
        let compiled = match Builder::compile(&source.doc, s.response_validation) {
            Ok(c) => Some(c),
            Err(spec_errors) => {
                errors.extend(source.locate(spec_errors));
                None
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let Some((paths, ops, servers_base)) = compiled else {
            return Err(errors);
        };
        Ok(OpenApi {
            paths,
            ops,
            base_path: base_path.unwrap_or(servers_base),
            request_validation: s.request_validation,
            response: s.response_validation,
            unknown: s.unknown_operation,
            max_body: s.max_body.0,
            sample: s.log_sample_per_second,
            stats: RwLock::new(HashMap::new()),
        })
    }
}

/// Where the document came from, to locate its problems.
struct Source {
    doc: Value,
    /// The file as written in the settings and the positions of its nodes; `None`
    /// for `spec_inline` (located in the configuration itself).
    file: Option<(String, portico_config::yaml::Positions)>,
}

impl Source {
    fn inline(doc: Value) -> Source {
        Source { doc, file: None }
    }

    fn load(file: &str, config_dir: Option<&Path>) -> Result<Source, (KeyPath, String)> {
        let at = KeyPath::root().key("spec");
        let path = resolve(file, config_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            (
                at.clone(),
                format!("cannot read the OpenAPI document `{}`: {e}", path.display()),
            )
        })?;
        let (doc, positions) = portico_config::yaml::parse(&text).map_err(|d| {
            let pos = d
                .pos
                .map(|p| format!(":{}:{}", p.line, p.col))
                .unwrap_or_default();
            (at.clone(), format!("{file}{pos}: {}", d.message))
        })?;
        Ok(Source {
            doc,
            file: Some((file.to_string(), positions)),
        })
    }

    /// The document's problems as settings errors: inside `spec_inline`, or `spec`
    /// with the file, line and column.
    fn locate(&self, errs: Vec<SpecError>) -> SettingsErrors {
        let n = errs.len();
        let mut out: SettingsErrors = errs
            .into_iter()
            .take(MAX_SPEC_ERRORS)
            .map(|(ptr, msg)| {
                let rel = key_path(&self.doc, &ptr);
                match &self.file {
                    None => {
                        let mut p = KeyPath::root().key("spec_inline");
                        p.append(&rel);
                        (p, msg)
                    }
                    Some((file, positions)) => {
                        let pos = positions
                            .value(&rel)
                            .map(|p| format!(":{}:{}", p.line, p.col))
                            .unwrap_or_default();
                        let inside = if rel.is_root() {
                            String::new()
                        } else {
                            format!(" {rel}:")
                        };
                        (
                            KeyPath::root().key("spec"),
                            format!("{file}{pos}:{inside} {msg}"),
                        )
                    }
                }
            })
            .collect();
        if n > MAX_SPEC_ERRORS {
            let at = if self.file.is_some() {
                "spec"
            } else {
                "spec_inline"
            };
            out.push((
                KeyPath::root().key(at),
                format!("and {} more problems", n - MAX_SPEC_ERRORS),
            ));
        }
        out
    }
}

fn resolve(file: &str, config_dir: Option<&Path>) -> PathBuf {
    let p = Path::new(file);
    match config_dir {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The key path of a JSON pointer into `doc` (array positions as indexes).
fn key_path(doc: &Value, ptr: &str) -> KeyPath {
    let mut p = KeyPath::root();
    let mut cur = Some(doc);
    for raw in ptr.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            Some(Value::Array(a)) => match seg.parse::<usize>() {
                Ok(i) => {
                    p.push_index(i);
                    a.get(i)
                }
                Err(_) => {
                    p.push_key(&seg);
                    None
                }
            },
            Some(Value::Object(m)) => {
                p.push_key(&seg);
                m.get(&seg)
            }
            _ => {
                p.push_key(&seg);
                None
            }
        };
    }
    p
}

/// A JSON pointer segment for a key.
fn esc(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The URI of the schema at `ptr` in the registry.
fn schema_uri(ptr: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    const FRAGMENT: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'~')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    format!("{DOC_URI}#{}", utf8_percent_encode(ptr, FRAGMENT))
}

/// Which side of the exchange a converted document is for: `readOnly` properties are
/// not required in requests, `writeOnly` ones not in responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Request,
    Response,
}

/// Turns the schemas of a document into JSON Schema draft 2020-12.
///
/// OpenAPI 3.0 (its Schema Object is a variant of JSON Schema draft 4/5):
/// - `nullable: true` adds `"null"` to `type` (only when `type` is written, as the
///   3.0.3 specification says; `enum` is not changed, so an enum must list `null` to
///   accept it); `nullable` is removed.
/// - `exclusiveMinimum: true` with `minimum: m` becomes `exclusiveMinimum: m` (same for
///   the maximum); `exclusiveMinimum: false` is removed.
/// - A `$ref` with other keywords keeps only the `$ref` (3.0 ignores the others).
///
/// Both versions: a property that is `readOnly` is dropped from `required` in the
/// request document, a `writeOnly` one in the response document (the property itself
/// is still validated when present); `$schema` naming an OpenAPI dialect is removed.
struct Converter<'a> {
    v30: bool,
    dir: Dir,
    original: &'a Value,
}

impl Converter<'_> {
    fn schema(&self, s: &mut Value) {
        let Value::Object(m) = s else { return };
        self.drop_required(m);
        if self.v30 && m.contains_key("$ref") && m.len() > 1 {
            m.retain(|k, _| k == "$ref");
            return;
        }
        if m.get("$schema")
            .and_then(Value::as_str)
            .is_some_and(|d| d.starts_with("https://spec.openapis.org/oas/"))
        {
            m.remove("$schema");
        }
        for k in [
            "properties",
            "patternProperties",
            "$defs",
            "definitions",
            "dependentSchemas",
        ] {
            if let Some(Value::Object(children)) = m.get_mut(k) {
                for c in children.values_mut() {
                    self.schema(c);
                }
            }
        }
        for k in [
            "additionalProperties",
            "items",
            "additionalItems",
            "not",
            "if",
            "then",
            "else",
            "contains",
            "propertyNames",
            "unevaluatedProperties",
            "unevaluatedItems",
        ] {
            match m.get_mut(k) {
                Some(c @ Value::Object(_)) => self.schema(c),
                Some(Value::Array(list)) => list.iter_mut().for_each(|c| self.schema(c)),
                _ => {}
            }
        }
        for k in ["allOf", "anyOf", "oneOf", "prefixItems"] {
            if let Some(Value::Array(list)) = m.get_mut(k) {
                list.iter_mut().for_each(|c| self.schema(c));
            }
        }
        if self.v30 {
            if m.remove("nullable") == Some(Value::Bool(true)) {
                match m.get_mut("type") {
                    Some(Value::String(t)) => {
                        let t = std::mem::take(t);
                        m.insert("type".into(), json!([t, "null"]));
                    }
                    Some(Value::Array(types)) if !types.iter().any(|t| t == "null") => {
                        types.push(json!("null"));
                    }
                    _ => {}
                }
            }
            for (ex, bound) in [
                ("exclusiveMinimum", "minimum"),
                ("exclusiveMaximum", "maximum"),
            ] {
                match m.get(ex) {
                    Some(Value::Bool(true)) => match m.remove(bound) {
                        Some(b) => {
                            m.insert(ex.into(), b);
                        }
                        None => {
                            m.remove(ex);
                        }
                    },
                    Some(Value::Bool(false)) => {
                        m.remove(ex);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Remove from `required` the properties that do not apply in this direction.
    fn drop_required(&self, m: &mut Map<String, Value>) {
        let flag = match self.dir {
            Dir::Request => "readOnly",
            Dir::Response => "writeOnly",
        };
        let Some(Value::Object(props)) = m.get("properties") else {
            return;
        };
        let skip: Vec<String> = props
            .iter()
            .filter(|(_, p)| {
                let direct = p.get(flag) == Some(&Value::Bool(true));
                // Or behind one local `$ref`.
                let referenced = p
                    .get("$ref")
                    .and_then(Value::as_str)
                    .and_then(|r| pointer(self.original, r))
                    .is_some_and(|t| t.get(flag) == Some(&Value::Bool(true)));
                direct || referenced
            })
            .map(|(k, _)| k.clone())
            .collect();
        if skip.is_empty() {
            return;
        }
        if let Some(Value::Array(req)) = m.get_mut("required") {
            req.retain(|r| !r.as_str().is_some_and(|r| skip.iter().any(|s| s == r)));
        }
    }
}

/// The value a local reference (`#/a/b`) points to.
fn pointer<'v>(doc: &'v Value, reference: &str) -> Option<&'v Value> {
    let frag = reference.strip_prefix('#')?;
    let frag = percent_encoding::percent_decode_str(frag)
        .decode_utf8()
        .ok()?;
    doc.pointer(&frag)
}

/// Calls `f` with the pointer of every Schema Object position of an OpenAPI document
/// (not inside schemas: those are the schemas' own business).
fn each_schema(doc: &mut Value, f: &mut dyn FnMut(&str, &mut Value)) {
    fn content(v: &mut Value, ptr: &str, f: &mut dyn FnMut(&str, &mut Value)) {
        if let Some(Value::Object(c)) = v.get_mut("content") {
            for (mt, m) in c.iter_mut() {
                if let Some(s) = m.get_mut("schema") {
                    f(&format!("{ptr}/content/{}/schema", esc(mt)), s);
                }
            }
        }
    }
    fn parameter(v: &mut Value, ptr: &str, f: &mut dyn FnMut(&str, &mut Value)) {
        if v.get("$ref").is_some() {
            return;
        }
        if let Some(s) = v.get_mut("schema") {
            f(&format!("{ptr}/schema"), s);
        }
        content(v, ptr, f);
    }
    fn response(v: &mut Value, ptr: &str, f: &mut dyn FnMut(&str, &mut Value)) {
        if v.get("$ref").is_some() {
            return;
        }
        if let Some(Value::Object(hs)) = v.get_mut("headers") {
            for (name, h) in hs.iter_mut() {
                parameter(h, &format!("{ptr}/headers/{}", esc(name)), f);
            }
        }
        content(v, ptr, f);
    }
    fn body(v: &mut Value, ptr: &str, f: &mut dyn FnMut(&str, &mut Value)) {
        if v.get("$ref").is_none() {
            content(v, ptr, f);
        }
    }
    fn path_item(v: &mut Value, ptr: &str, f: &mut dyn FnMut(&str, &mut Value)) {
        if let Some(Value::Array(ps)) = v.get_mut("parameters") {
            for (i, p) in ps.iter_mut().enumerate() {
                parameter(p, &format!("{ptr}/parameters/{i}"), f);
            }
        }
        for m in METHODS {
            let Some(op) = v.get_mut(m) else { continue };
            let op_ptr = format!("{ptr}/{m}");
            if let Some(Value::Array(ps)) = op.get_mut("parameters") {
                for (i, p) in ps.iter_mut().enumerate() {
                    parameter(p, &format!("{op_ptr}/parameters/{i}"), f);
                }
            }
            if let Some(b) = op.get_mut("requestBody") {
                body(b, &format!("{op_ptr}/requestBody"), f);
            }
            if let Some(Value::Object(rs)) = op.get_mut("responses") {
                for (code, r) in rs.iter_mut() {
                    response(r, &format!("{op_ptr}/responses/{}", esc(code)), f);
                }
            }
        }
    }
    if let Some(Value::Object(paths)) = doc.get_mut("paths") {
        for (p, item) in paths.iter_mut() {
            path_item(item, &format!("/paths/{}", esc(p)), f);
        }
    }
    let Some(Value::Object(c)) = doc.get_mut("components") else {
        return;
    };
    for (kind, entries) in c.iter_mut() {
        let Value::Object(entries) = entries else {
            continue;
        };
        for (name, v) in entries.iter_mut() {
            let ptr = format!("/components/{}/{}", esc(kind), esc(name));
            match kind.as_str() {
                "schemas" => f(&ptr, v),
                "parameters" | "headers" => parameter(v, &ptr, f),
                "requestBodies" => body(v, &ptr, f),
                "responses" => response(v, &ptr, f),
                "pathItems" => path_item(v, &ptr, f),
                _ => {}
            }
        }
    }
}

/// Every `$ref` that leaves the document.
fn remote_refs(v: &Value, ptr: &mut String, out: &mut Vec<SpecError>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&esc(k));
                match (k.as_str(), child) {
                    ("$ref", Value::String(r)) if !r.starts_with('#') => out.push((
                        ptr.clone(),
                        format!(
                            "`{}` is not a reference inside the document: only `#/...` \
                             references are followed (nothing is fetched)",
                            truncate(r, 200)
                        ),
                    )),
                    _ => remote_refs(child, ptr, out),
                }
                ptr.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&i.to_string());
                remote_refs(child, ptr, out);
                ptr.truncate(len);
            }
        }
        _ => {}
    }
}

type Compiled = (Vec<PathEntry>, Vec<Operation>, Option<String>);

/// Compiles a document.
struct Builder<'d> {
    /// The document converted for requests, and its registry.
    req: (&'d Value, Registry<'static>),
    /// The same for responses (when they are validated).
    resp: Option<(&'d Value, Registry<'static>)>,
    errors: Vec<SpecError>,
}

impl Builder<'_> {
    fn compile(doc: &Value, response: ResponseMode) -> Result<Compiled, Vec<SpecError>> {
        let mut errors = Vec::new();
        if !doc.is_object() {
            return Err(vec![(
                String::new(),
                "an OpenAPI document is a mapping (with `openapi`, `paths`, ...)".into(),
            )]);
        }
        let version = match doc.get("openapi") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ if doc.get("swagger").is_some() => {
                return Err(vec![(
                    "/swagger".into(),
                    "Swagger 2.0 documents are not supported; convert it to OpenAPI 3".into(),
                )])
            }
            _ => {
                return Err(vec![(
                    String::new(),
                    "not an OpenAPI document: `openapi: 3.0.x` or `3.1.x` is missing".into(),
                )])
            }
        };
        let v30 = match version.as_str() {
            v if v == "3.0" || v.starts_with("3.0.") => true,
            v if v == "3.1" || v.starts_with("3.1.") => false,
            v => {
                return Err(vec![(
                    "/openapi".into(),
                    format!("OpenAPI `{v}` is not supported; only 3.0 and 3.1 are"),
                )])
            }
        };
        match doc.get("paths") {
            None | Some(Value::Object(_)) => {}
            Some(_) => errors.push(("/paths".into(), "`paths` must be a mapping".into())),
        }
        remote_refs(doc, &mut String::new(), &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let converted = |dir| {
            let mut d = doc.clone();
            let c = Converter {
                v30,
                dir,
                original: doc,
            };
            each_schema(&mut d, &mut |_, s| c.schema(s));
            d
        };
        let req_doc = converted(Dir::Request);
        // Every schema must be a valid 2020-12 schema (located messages).
        let mut probe = req_doc.clone();
        each_schema(&mut probe, &mut |ptr, s| {
            if !s.is_object() && !s.is_boolean() {
                errors.push((
                    ptr.to_string(),
                    "a schema is a mapping (or `true`/`false`)".into(),
                ));
            } else if let Err(e) = jsonschema::draft202012::meta::validate(s) {
                errors.push((
                    format!("{ptr}{}", e.instance_path().as_str()),
                    schema_problem(&e),
                ));
            }
        });
        drop(probe);
        if !errors.is_empty() {
            return Err(errors);
        }
        let resp_doc = (response != ResponseMode::Off).then(|| converted(Dir::Response));
        let registry = |d: &Value| {
            Registry::new()
                .draft(Draft::Draft202012)
                .add(DOC_URI, d.clone())
                .and_then(|b| b.prepare())
                .map_err(|e| vec![(String::new(), format!("the document's schemas: {e}"))])
        };
        let req_reg = registry(&req_doc)?;
        let resp = match &resp_doc {
            Some(d) => Some((d, registry(d)?)),
            None => None,
        };
        let mut b = Builder {
            req: (&req_doc, req_reg),
            resp,
            errors,
        };
        let compiled = b.operations(doc);
        if !b.errors.is_empty() {
            return Err(b.errors);
        }
        Ok(compiled)
    }

    fn validator(&mut self, response: bool, ptr: &str) -> Option<Validator> {
        let reg = if response {
            &self.resp.as_ref()?.1
        } else {
            &self.req.1
        };
        let wrapper = json!({ "$ref": schema_uri(ptr) });
        match schema_options()
            .with_registry(reg)
            .with_draft(Draft::Draft202012)
            .build(&wrapper)
        {
            Ok(v) => Some(v),
            Err(e) => {
                let at = e.instance_path().as_str();
                let at = if at.is_empty() { ptr } else { at };
                self.errors.push((at.to_string(), schema_problem(&e)));
                None
            }
        }
    }

    /// Follows `$ref`s (outside schemas) to the object; returns it and its pointer.
    fn deref<'v>(
        &mut self,
        doc: &'v Value,
        v: &'v Value,
        ptr: String,
    ) -> Option<(&'v Value, String)> {
        let (mut v, mut ptr) = (v, ptr);
        for _ in 0..MAX_REF_HOPS {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else {
                return Some((v, ptr));
            };
            match pointer(doc, r) {
                Some(t) => {
                    ptr = percent_encoding::percent_decode_str(&r[1..])
                        .decode_utf8_lossy()
                        .into_owned();
                    v = t;
                }
                None => {
                    self.errors
                        .push((format!("{ptr}/$ref"), format!("`{r}` points to nothing")));
                    return None;
                }
            }
        }
        self.errors.push((
            ptr,
            format!("more than {MAX_REF_HOPS} `$ref`s in a row (a cycle?)"),
        ));
        None
    }

    fn operations(&mut self, original: &Value) -> Compiled {
        let doc = self.req.0;
        let mut entries = Vec::new();
        let mut ops = Vec::new();
        if let Some(Value::Object(paths)) = doc.get("paths") {
            for (template, item) in paths {
                let item_ptr = format!("/paths/{}", esc(template));
                let segs = match parse_template(template) {
                    Ok(s) => s,
                    Err(m) => {
                        self.errors.push((item_ptr, m));
                        continue;
                    }
                };
                let Some((item, item_ptr)) = self.deref(doc, item, item_ptr) else {
                    continue;
                };
                let mut methods = Vec::new();
                for m in METHODS {
                    let Some(op) = item.get(m) else { continue };
                    let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .unwrap_or(Method::GET);
                    let op_ptr = format!("{item_ptr}/{m}");
                    let label = match op.get("operationId").and_then(Value::as_str) {
                        Some(id) if !id.is_empty() => id.to_string(),
                        _ => format!("{method} {template}"),
                    };
                    let compiled = self.operation(item, &item_ptr, op, &op_ptr, label);
                    methods.push((method, ops.len()));
                    ops.push(compiled);
                }
                if methods.is_empty() {
                    continue;
                }
                let mut allow: Vec<&str> = methods.iter().map(|(m, _)| m.as_str()).collect();
                if allow.contains(&"GET") && !allow.contains(&"HEAD") {
                    allow.push("HEAD");
                }
                entries.push(PathEntry {
                    segs,
                    allow: HeaderValue::from_str(&allow.join(", "))
                        .unwrap_or(HeaderValue::from_static("GET")),
                    methods,
                });
            }
        }
        // The most literal path first; the document's order otherwise.
        entries.sort_by_cached_key(|e| precedence(&e.segs));
        (entries, ops, servers_base(original))
    }

    fn operation(
        &mut self,
        item: &Value,
        item_ptr: &str,
        op: &Value,
        op_ptr: &str,
        label: String,
    ) -> Operation {
        let doc = self.req.0;
        // Path-level parameters, replaced by the operation's of the same name and place.
        let mut params: Vec<Param> = Vec::new();
        for (list, ptr) in [(item, item_ptr), (op, op_ptr)] {
            let Some(Value::Array(ps)) = list.get("parameters") else {
                continue;
            };
            for (i, p) in ps.iter().enumerate() {
                let Some((p, p_ptr)) = self.deref(doc, p, format!("{ptr}/parameters/{i}")) else {
                    continue;
                };
                let Some(param) = self.parameter(p, &p_ptr) else {
                    continue;
                };
                params.retain(|q: &Param| {
                    !(q.location == param.location
                        && if q.location == In::Header {
                            q.name.eq_ignore_ascii_case(&param.name)
                        } else {
                            q.name == param.name
                        })
                });
                params.push(param);
            }
        }
        let body = match op.get("requestBody") {
            Some(rb) => self
                .deref(doc, rb, format!("{op_ptr}/requestBody"))
                .map(|(rb, ptr)| ReqBody {
                    required: rb.get("required") == Some(&Value::Bool(true)),
                    media: self.content(rb, &ptr, false),
                }),
            None => None,
        };
        let responses = if self.resp.is_some() {
            Some(self.responses(op, op_ptr))
        } else {
            None
        };
        Operation {
            label,
            has_query: params.iter().any(|p| p.location == In::Query),
            params,
            body,
            responses,
        }
    }

    fn parameter(&mut self, p: &Value, ptr: &str) -> Option<Param> {
        let Some(name) = p.get("name").and_then(Value::as_str) else {
            self.errors
                .push((ptr.to_string(), "a parameter needs a `name`".into()));
            return None;
        };
        let location = match p.get("in").and_then(Value::as_str) {
            Some("path") => In::Path,
            Some("query") => In::Query,
            Some("header") => In::Header,
            Some("cookie") => In::Cookie,
            _ => {
                self.errors.push((
                    format!("{ptr}/in"),
                    "`in` must be `path`, `query`, `header` or `cookie`".into(),
                ));
                return None;
            }
        };
        // These are described by other means (OpenAPI: "the parameter definition
        // SHALL be ignored").
        if location == In::Header
            && ["accept", "content-type", "authorization"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        {
            return None;
        }
        let header = if location == In::Header {
            match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    self.errors.push((
                        format!("{ptr}/name"),
                        format!("`{name}` is not a valid header name"),
                    ));
                    return None;
                }
            }
        } else {
            None
        };
        let style = match p.get("style").and_then(Value::as_str) {
            None => match location {
                In::Path | In::Header => Style::Simple,
                In::Query | In::Cookie => Style::Form,
            },
            Some("simple") => Style::Simple,
            Some("label") => Style::Label,
            Some("matrix") => Style::Matrix,
            Some("form") => Style::Form,
            Some("spaceDelimited") => Style::SpaceDelimited,
            Some("pipeDelimited") => Style::PipeDelimited,
            Some("deepObject") => Style::DeepObject,
            Some(other) => {
                self.errors
                    .push((format!("{ptr}/style"), format!("unknown style `{other}`")));
                return None;
            }
        };
        let explode = p
            .get("explode")
            .and_then(Value::as_bool)
            .unwrap_or(style == Style::Form);
        let (shape, validator) = self.value_schema(p, ptr, false);
        Some(Param {
            name: name.to_string(),
            header,
            location,
            // Path parameters are always required.
            required: location == In::Path || p.get("required") == Some(&Value::Bool(true)),
            style,
            explode,
            shape,
            validator,
        })
    }

    /// The shape and validator of a parameter or header: its `schema`, or the schema
    /// of its one `content` entry (the value is then a JSON document).
    fn value_schema(&mut self, p: &Value, ptr: &str, response: bool) -> (Shape, Option<Validator>) {
        let doc = if response {
            self.resp.as_ref().map_or(self.req.0, |r| r.0)
        } else {
            self.req.0
        };
        if p.get("schema").is_some() {
            let shape = shape_of(doc, p.get("schema"));
            return (shape, self.validator(response, &format!("{ptr}/schema")));
        }
        if let Some(Value::Object(c)) = p.get("content") {
            if let Some((mt, m)) = c.iter().next() {
                let json = kind_of(&mt.to_ascii_lowercase()) == Kind::Json;
                let v = if m.get("schema").is_some() {
                    self.validator(response, &format!("{ptr}/content/{}/schema", esc(mt)))
                } else {
                    None
                };
                return (
                    if json {
                        Shape::Json
                    } else {
                        Shape::Scalar(None)
                    },
                    v,
                );
            }
        }
        (Shape::Scalar(None), None)
    }

    fn content(&mut self, v: &Value, ptr: &str, response: bool) -> Vec<Media> {
        let Some(Value::Object(c)) = v.get("content") else {
            return Vec::new();
        };
        let doc = if response {
            self.resp.as_ref().map_or(self.req.0, |r| r.0)
        } else {
            self.req.0
        };
        let mut out = Vec::with_capacity(c.len());
        for (key, m) in c {
            let schema = m.get("schema");
            let validator = match schema {
                Some(_) => self.validator(response, &format!("{ptr}/content/{}/schema", esc(key))),
                None => None,
            };
            let form = match shape_of(doc, schema) {
                Shape::Object(props) => props,
                _ => HashMap::new(),
            };
            out.push(Media {
                key: key.clone(),
                range: Range::parse(key),
                validator,
                form,
            });
        }
        out
    }

    fn responses(&mut self, op: &Value, op_ptr: &str) -> Responses {
        let mut r = Responses {
            list: Vec::new(),
            exact: HashMap::new(),
            ranges: [None; 6],
            default: None,
        };
        let Some(doc) = self.resp.as_ref().map(|r| r.0) else {
            return r;
        };
        let Some(Value::Object(codes)) = op.get("responses") else {
            return r;
        };
        for (code, resp) in codes {
            let code_ptr = format!("{op_ptr}/responses/{}", esc(code));
            let slot = if code == "default" {
                Slot::Default
            } else if let Some(n) = code
                .strip_suffix("XX")
                .or_else(|| code.strip_suffix("xx"))
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|d| (1..=5).contains(d))
            {
                Slot::Range(n)
            } else if let Some(n) = code.parse::<u16>().ok().filter(|n| (100..=599).contains(n)) {
                Slot::Exact(n)
            } else {
                self.errors.push((
                    code_ptr,
                    format!("`{code}` is not a status code, a range such as `2XX` or `default`"),
                ));
                continue;
            };
            let Some((resp, ptr)) = self.deref(doc, resp, code_ptr) else {
                continue;
            };
            let mut headers = Vec::new();
            if let Some(Value::Object(hs)) = resp.get("headers") {
                for (name, h) in hs {
                    if name.eq_ignore_ascii_case("content-type") {
                        continue;
                    }
                    let Some((h, h_ptr)) =
                        self.deref(doc, h, format!("{ptr}/headers/{}", esc(name)))
                    else {
                        continue;
                    };
                    let Ok(hn) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    else {
                        self.errors.push((
                            format!("{ptr}/headers/{}", esc(name)),
                            format!("`{name}` is not a valid header name"),
                        ));
                        continue;
                    };
                    let (shape, validator) = self.value_schema(h, &h_ptr, true);
                    headers.push(RespHeader {
                        name: hn,
                        label: name.clone(),
                        required: h.get("required") == Some(&Value::Bool(true)),
                        shape,
                        validator,
                    });
                }
            }
            let content = self.content(resp, &ptr, true);
            let i = r.list.len();
            r.list.push(Resp { headers, content });
            match slot {
                Slot::Default => r.default = Some(i),
                Slot::Range(n) => {
                    if let Some(s) = r.ranges.get_mut(n) {
                        *s = Some(i);
                    }
                }
                Slot::Exact(n) => {
                    r.exact.insert(n, i);
                }
            }
        }
        r
    }
}

enum Slot {
    Default,
    Range(usize),
    Exact(u16),
}

/// Follows a schema's local `$ref`s (a few), for its shape.
fn deref_schema<'v>(doc: &'v Value, mut s: &'v Value) -> &'v Value {
    for _ in 0..MAX_REF_HOPS {
        match s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| pointer(doc, r))
        {
            Some(t) => s = t,
            None => break,
        }
    }
    s
}

/// How strings become the value a schema validates (see [`Shape`]).
fn shape_of(doc: &Value, schema: Option<&Value>) -> Shape {
    let Some(s) = schema.map(|s| deref_schema(doc, s)) else {
        return Shape::Scalar(None);
    };
    let coerce_of = |s: &Value| {
        let s = deref_schema(doc, s);
        let array = has_type(s, "array") && !has_type(s, "string");
        let target = if array {
            s.get("items").map(|i| deref_schema(doc, i))
        } else {
            Some(s)
        };
        Coerce {
            array,
            scalar: target.and_then(scalar_of),
        }
    };
    if has_type(s, "string") {
        return Shape::Scalar(None);
    }
    if has_type(s, "array") {
        return Shape::Array(coerce_of(s).scalar);
    }
    if has_type(s, "object") {
        let props = s
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.iter().map(|(k, v)| (k.clone(), coerce_of(v))).collect())
            .unwrap_or_default();
        return Shape::Object(props);
    }
    Shape::Scalar(scalar_of(s))
}

/// The path of the first server's URL (`https://api.example.com/v1` → `/v1`), with
/// its variables replaced by their defaults.
fn servers_base(doc: &Value) -> Option<String> {
    let server = doc.get("servers")?.as_array()?.first()?;
    let mut url = server.get("url")?.as_str()?.to_string();
    if let Some(Value::Object(vars)) = server.get("variables") {
        for (name, var) in vars {
            if let Some(d) = var.get("default").and_then(Value::as_str) {
                url = url.replace(&format!("{{{name}}}"), d);
            }
        }
    }
    let path = if let Some((_, rest)) = url.split_once("://") {
        rest.find('/').map_or("", |i| &rest[i..])
    } else if let Some(rest) = url.strip_prefix("//") {
        rest.find('/').map_or("", |i| &rest[i..])
    } else {
        url.as_str()
    };
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    if path.is_empty() || path.contains('{') {
        return None;
    }
    Some(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    })
}

fn parse_template(t: &str) -> Result<Vec<Seg>, String> {
    let Some(rest) = t.strip_prefix('/') else {
        return Err(format!("the path `{t}` must start with `/`"));
    };
    let mut segs = Vec::new();
    for raw in rest.split('/') {
        if !raw.contains(['{', '}']) {
            segs.push(Seg::Lit(raw.to_string()));
            continue;
        }
        let mut pieces = Vec::new();
        let mut s = raw;
        while !s.is_empty() {
            match s.find('{') {
                Some(0) => {
                    let Some(end) = s.find('}') else {
                        return Err(format!("unbalanced `{{` in the path `{t}`"));
                    };
                    let name = &s[1..end];
                    if name.is_empty() || name.contains('{') {
                        return Err(format!("bad variable in the path `{t}`"));
                    }
                    if matches!(pieces.last(), Some(Piece::Var(_))) {
                        return Err(format!(
                            "two variables without text between them in the path `{t}`"
                        ));
                    }
                    pieces.push(Piece::Var(name.to_string()));
                    s = &s[end + 1..];
                }
                Some(i) => {
                    let lit = &s[..i];
                    if lit.contains('}') {
                        return Err(format!("unbalanced `}}` in the path `{t}`"));
                    }
                    pieces.push(Piece::Lit(lit.to_string()));
                    s = &s[i..];
                }
                None => {
                    if s.contains('}') {
                        return Err(format!("unbalanced `}}` in the path `{t}`"));
                    }
                    pieces.push(Piece::Lit(s.to_string()));
                    s = "";
                }
            }
        }
        segs.push(Seg::Tpl(pieces));
    }
    Ok(segs)
}

/// Sort key of a template: segment by segment, literal before partly templated before
/// a whole variable; then more literal characters first.
fn precedence(segs: &[Seg]) -> (Vec<u8>, std::cmp::Reverse<usize>) {
    let mut lits = 0;
    let ranks = segs
        .iter()
        .map(|s| match s {
            Seg::Lit(l) => {
                lits += l.len();
                0
            }
            Seg::Tpl(p) if p.iter().any(|x| matches!(x, Piece::Lit(_))) => {
                lits += p
                    .iter()
                    .map(|x| match x {
                        Piece::Lit(l) => l.len(),
                        Piece::Var(_) => 0,
                    })
                    .sum::<usize>();
                1
            }
            Seg::Tpl(_) => 2,
        })
        .collect();
    (ranks, std::cmp::Reverse(lits))
}

/// Matches the decoded segments of a path; the variables' values in `out`.
fn match_segments(segs: &[Seg], parts: &[String], out: &mut Vec<(String, String)>) -> bool {
    if segs.len() != parts.len() {
        return false;
    }
    out.clear();
    segs.iter().zip(parts).all(|(seg, part)| match seg {
        Seg::Lit(l) => l == part,
        Seg::Tpl(pieces) => match_pieces(pieces, part, out),
    })
}

fn match_pieces(pieces: &[Piece], s: &str, out: &mut Vec<(String, String)>) -> bool {
    match pieces.split_first() {
        None => s.is_empty(),
        Some((Piece::Lit(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|r| match_pieces(rest, r, out)),
        Some((Piece::Var(name), rest)) => match rest.first() {
            None => {
                if s.is_empty() {
                    return false;
                }
                out.push((name.clone(), s.to_string()));
                true
            }
            Some(Piece::Lit(l)) => {
                // The longest value first (`{name}.{ext}` of `a.b.json`: `a.b`, `json`).
                let found: Vec<usize> = s.match_indices(l.as_str()).map(|(i, _)| i).collect();
                for i in found.into_iter().rev().filter(|i| *i > 0) {
                    let mark = out.len();
                    out.push((name.clone(), s[..i].to_string()));
                    if match_pieces(rest, &s[i..], out) {
                        return true;
                    }
                    out.truncate(mark);
                }
                false
            }
            Some(Piece::Var(_)) => false,
        },
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A violation, in the shape of `request-validation`'s (with the parameter's name).
fn violation(place: &str, name: Option<&str>, keyword: &str, message: String) -> Value {
    let mut v = json!({
        "in": place,
        "pointer": "",
        "keyword": keyword,
        "message": truncate(&message, MAX_MESSAGE),
    });
    if let (Some(n), Some(m)) = (name, v.as_object_mut()) {
        m.insert("name".into(), Value::String(truncate(n, 200)));
    }
    v
}

/// The query string's pairs, percent-decoded.
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A list value split on `sep`, each item converted.
fn split_items(s: &str, sep: char, to: Option<Scalar>) -> Value {
    Value::Array(
        s.split(sep)
            .map(|x| convert(x.trim().to_string(), to))
            .collect(),
    )
}

/// `k1,v1,k2,v2` (or `k1=v1,k2=v2` when `pairs`) as an object.
fn split_object(s: &str, pairs: bool, props: &HashMap<String, Coerce>) -> Value {
    let mut m = Map::new();
    let conv = |k: &str, v: &str| {
        let c = props.get(k).copied().unwrap_or_default();
        let v = convert(v.to_string(), c.scalar);
        if c.array {
            Value::Array(vec![v])
        } else {
            v
        }
    };
    if pairs {
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            m.insert(k.trim().to_string(), conv(k.trim(), v.trim()));
        }
    } else {
        let items: Vec<&str> = s.split(',').collect();
        for kv in items.chunks(2) {
            let k = kv.first().copied().unwrap_or("").trim();
            let v = kv.get(1).copied().unwrap_or("").trim();
            m.insert(k.to_string(), conv(k, v));
        }
    }
    Value::Object(m)
}

/// A single string (path segment, header, cookie) as the parameter's value.
fn simple_value(s: &str, shape: &Shape, explode: bool) -> Result<Value, String> {
    match shape {
        Shape::Scalar(to) => Ok(convert(s.to_string(), *to)),
        Shape::Array(to) => Ok(split_items(s, ',', *to)),
        Shape::Object(props) => Ok(split_object(s, explode, props)),
        Shape::Json => json_value(s),
    }
}

fn json_value(s: &str) -> Result<Value, String> {
    serde_json::from_str::<Strict>(s)
        .map(|v| v.0)
        .map_err(|e| format!("the value is not valid JSON: {e}"))
}

impl OpenApi {
    fn find(&self, path: &str, method: &Method) -> Found {
        let rest = match &self.base_path {
            None => path,
            Some(b) => match path.strip_prefix(b.as_str()) {
                Some("") => "/",
                Some(r) if r.starts_with('/') => r,
                _ => return Found::None,
            },
        };
        let parts: Vec<String> = rest
            .strip_prefix('/')
            .unwrap_or(rest)
            .split('/')
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect();
        let mut params = Vec::new();
        let Some(entry) = self
            .paths
            .iter()
            .find(|e| match_segments(&e.segs, &parts, &mut params))
        else {
            return Found::None;
        };
        let op = |m: &Method| entry.methods.iter().find(|(x, _)| x == m).map(|(_, i)| *i);
        match op(method) {
            Some(op) => Found::Op {
                op,
                head: false,
                params,
            },
            None if method == Method::HEAD => match op(&Method::GET) {
                Some(op) => Found::Op {
                    op,
                    head: true,
                    params,
                },
                None => Found::Method(entry.allow.clone()),
            },
            None => Found::Method(entry.allow.clone()),
        }
    }

    fn route_stats(&self, route: &Arc<str>) -> Arc<RouteStats> {
        if let Some(s) = self.stats.read().get(route) {
            return s.clone();
        }
        self.stats
            .write()
            .entry(route.clone())
            .or_insert_with(|| {
                Arc::new(RouteStats {
                    ops: (0..self.ops.len()).map(|_| OpStats::default()).collect(),
                    unknown: OpStats::default(),
                    sampler: Sampler::default(),
                })
            })
            .clone()
    }

    fn count_request(&self, route: &Arc<str>, op: Option<usize>, ok: bool) {
        let s = self.route_stats(route);
        let o = s.op(op);
        o.req_validated.fetch_add(1, Ordering::Relaxed);
        if !ok {
            o.req_violations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The value of a parameter in the request, `None` when it is absent.
    fn param_value(
        p: &Param,
        req: &Request<Body>,
        path_params: &[(String, String)],
        query: &[(String, String)],
    ) -> Option<Result<Value, String>> {
        match p.location {
            In::Path => {
                let raw = path_params.iter().find(|(n, _)| *n == p.name)?.1.as_str();
                // `.a.b` (label), `;name=a;name=b` (matrix), `a,b` (simple).
                let prefix = format!(";{}=", p.name);
                let (raw, sep) = match p.style {
                    Style::Label => (
                        raw.strip_prefix('.').unwrap_or(raw),
                        if p.explode { "." } else { "," },
                    ),
                    Style::Matrix => (
                        raw.strip_prefix(prefix.as_str()).unwrap_or(raw),
                        if p.explode { prefix.as_str() } else { "," },
                    ),
                    _ => (raw, ","),
                };
                Some(match &p.shape {
                    Shape::Array(to) => Ok(Value::Array(
                        raw.split(sep)
                            .map(|x| convert(x.trim().to_string(), *to))
                            .collect(),
                    )),
                    shape => simple_value(raw, shape, p.explode),
                })
            }
            In::Header => {
                let name = p.header.as_ref()?;
                let mut values = req.headers().get_all(name).iter().peekable();
                values.peek()?;
                let joined = values
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ");
                Some(simple_value(&joined, &p.shape, p.explode))
            }
            In::Cookie => {
                let v = cookie(req.headers(), &p.name)?;
                Some(simple_value(v, &p.shape, p.explode))
            }
            In::Query => Self::query_param(p, query),
        }
    }

    fn query_param(p: &Param, query: &[(String, String)]) -> Option<Result<Value, String>> {
        let values = || query.iter().filter(|(k, _)| *k == p.name).map(|(_, v)| v);
        match &p.shape {
            Shape::Json => values().next().map(|v| json_value(v)),
            Shape::Scalar(to) => {
                let vs: Vec<Value> = values().map(|v| convert(v.clone(), *to)).collect();
                match vs.len() {
                    0 => None,
                    1 => vs.into_iter().next().map(Ok),
                    _ => Some(Ok(Value::Array(vs))),
                }
            }
            Shape::Array(to) => {
                let sep = match p.style {
                    Style::SpaceDelimited => Some(' '),
                    Style::PipeDelimited => Some('|'),
                    _ if !p.explode => Some(','),
                    _ => None,
                };
                let vs: Vec<&String> = values().collect();
                if vs.is_empty() {
                    return None;
                }
                Some(Ok(match sep {
                    Some(sep) => {
                        let mut all = Vec::new();
                        for v in vs {
                            if let Value::Array(items) = split_items(v, sep, *to) {
                                all.extend(items);
                            }
                        }
                        Value::Array(all)
                    }
                    None => Value::Array(vs.into_iter().map(|v| convert(v.clone(), *to)).collect()),
                }))
            }
            Shape::Object(props) => {
                let fields: Vec<(&str, &str)> = if p.style == Style::DeepObject {
                    // `name[field]=value`
                    query
                        .iter()
                        .filter_map(|(k, v)| {
                            let field = k.strip_prefix(p.name.as_str())?.strip_prefix('[')?;
                            Some((field.strip_suffix(']')?, v.as_str()))
                        })
                        .collect()
                } else if p.explode {
                    // Each property is a parameter of its own.
                    query
                        .iter()
                        .filter(|(k, _)| props.contains_key(k))
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect()
                } else {
                    return values().next().map(|v| Ok(split_object(v, false, props)));
                };
                if fields.is_empty() {
                    return None;
                }
                Some(Ok(object_from_fields(&fields, props)))
            }
        }
    }

    /// Checks the parameters, then the body; `Flow` when done without the body.
    fn check_request<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        req: &'a mut Request<Body>,
        op_index: usize,
        path_params: Vec<(String, String)>,
    ) -> Step<'a> {
        let Some(op) = self.ops.get(op_index) else {
            return Step::cont();
        };
        let mut violations = Vec::new();
        let mut truncated = false;
        let query = if op.has_query {
            query_pairs(req.uri().query())
        } else {
            Vec::new()
        };
        for p in &op.params {
            let place = p.location.as_str();
            match Self::param_value(p, req, &path_params, &query) {
                None if p.required => violations.push(violation(
                    place,
                    Some(&p.name),
                    "required",
                    format!(
                        "the {place} parameter `{}` is required",
                        truncate(&p.name, 100)
                    ),
                )),
                None => {}
                Some(Err(m)) => violations.push(violation(place, Some(&p.name), "content", m)),
                Some(Ok(value)) => {
                    if let Some(v) = &p.validator {
                        let start = violations.len();
                        truncated |= collect(v, &value, place, &mut violations);
                        for x in violations.iter_mut().skip(start) {
                            if let Some(m) = x.as_object_mut() {
                                m.insert("name".into(), Value::String(p.name.clone()));
                            }
                        }
                    }
                }
            }
            if violations.len() >= MAX_VIOLATIONS {
                truncated = true;
                violations.truncate(MAX_VIOLATIONS);
                break;
            }
        }

        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let has_body = !(declared == Some(0) || http_body::Body::is_end_stream(req.body()));
        let route = ctx.route_name.clone();
        let done = move |violations: Vec<Value>, truncated: bool| {
            let ok = violations.is_empty();
            self.count_request(&route, Some(op_index), ok);
            if ok {
                Flow::Continue
            } else {
                Flow::Error(failed(violations, truncated))
            }
        };
        let Some(body) = &op.body else {
            if has_body {
                violations.push(violation(
                    "body",
                    None,
                    "requestBody",
                    "the operation takes no request body".into(),
                ));
            }
            return Step::Ready(Some(done(violations, truncated)));
        };
        if !has_body {
            if body.required {
                violations.push(violation(
                    "body",
                    None,
                    "required",
                    "a request body is required".into(),
                ));
            }
            return Step::Ready(Some(done(violations, truncated)));
        }
        let ct = essence(req.headers());
        let Some(media) = ct.as_deref().and_then(|e| find_media(&body.media, e)) else {
            self.count_request(&ctx.route_name, Some(op_index), false);
            let got = match &ct {
                None => "no Content-Type".to_string(),
                Some(c) => format!("`{}`", truncate(c, 100)),
            };
            return Step::error(GatewayError::new(
                ErrorKind::UnsupportedMediaType,
                format!(
                    "the request body must be {}; the request has {got}",
                    media_list(&body.media)
                ),
            ));
        };
        let kind = ct.as_deref().map_or(Kind::Other, kind_of);
        let Some(validator) = media.validator.as_ref().filter(|_| kind != Kind::Other) else {
            return Step::Ready(Some(done(violations, truncated)));
        };
        if let Some(n) = declared {
            if n > self.max_body {
                self.count_request(&ctx.route_name, Some(op_index), false);
                return Step::error(too_large(Some(n), self.max_body));
            }
        }
        let required = body.required;
        Step::Pending(Box::pin(async move {
            let bytes = match read_limited(req.body_mut(), declared, self.max_body).await {
                Ok(b) => b,
                Err(e) => {
                    self.count_request(&ctx.route_name, Some(op_index), false);
                    return Flow::Error(e);
                }
            };
            if bytes.is_empty() {
                *req.body_mut() = Body::Empty;
                req.headers_mut().remove(TRANSFER_ENCODING);
                req.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
                if required {
                    violations.push(violation(
                        "body",
                        None,
                        "required",
                        "a request body is required".into(),
                    ));
                }
                return done(violations, truncated);
            }
            match body_value(&bytes, kind, &media.form) {
                Ok(value) => {
                    if violations.len() < MAX_VIOLATIONS {
                        truncated |= collect(validator, &value, "body", &mut violations);
                    }
                }
                Err(m) => violations.push(violation("body", None, "json", m)),
            }
            let h = req.headers_mut();
            h.remove(TRANSFER_ENCODING);
            h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            *req.body_mut() = Body::full(bytes);
            done(violations, truncated)
        }))
    }
}

/// Decoded fields as an object, converted like a query (`request-validation`): a
/// repeated field is an array, an array property always is.
fn object_from_fields(fields: &[(&str, &str)], props: &HashMap<String, Coerce>) -> Value {
    let mut m = Map::new();
    for &(k, v) in fields {
        let c = props.get(k).copied().unwrap_or_default();
        let v = convert(v.to_string(), c.scalar);
        match m.get_mut(k) {
            Some(Value::Array(a)) => a.push(v),
            Some(old) => {
                let first = old.take();
                *old = Value::Array(vec![first, v]);
            }
            None if c.array => {
                m.insert(k.to_string(), Value::Array(vec![v]));
            }
            None => {
                m.insert(k.to_string(), v);
            }
        }
    }
    Value::Object(m)
}

/// The body as the value its schema validates: JSON, or a form as an object.
fn body_value(bytes: &[u8], kind: Kind, form: &HashMap<String, Coerce>) -> Result<Value, String> {
    match kind {
        Kind::Json => serde_json::from_slice::<Strict>(bytes)
            .map(|v| v.0)
            .map_err(|e| format!("the body is not valid JSON: {e}")),
        Kind::Form => std::str::from_utf8(bytes)
            .map(|s| query_value(Some(s), form))
            .map_err(|_| "the form is not UTF-8".to_string()),
        Kind::Other => Ok(Value::Null),
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// A body read up to a limit.
enum Buffered {
    Whole(Bytes),
    /// Larger than the limit: what was read, then the rest.
    Large(Body),
    Failed(BoxError),
}

async fn buffer(mut body: Body, max: u64) -> Buffered {
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Buffered::Failed(e),
        };
        let Ok(data) = frame.into_data() else {
            // Trailers of a buffered body are dropped.
            continue;
        };
        total += data.len() as u64;
        chunks.push_back(data);
        if total > max {
            return Buffered::Large(Body::boxed(Replay { chunks, rest: body }));
        }
    }
    Buffered::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut b = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
            for c in chunks {
                b.extend_from_slice(&c);
            }
            b.freeze()
        }
    })
}

/// The chunks already read, then the rest of the body.
struct Replay {
    chunks: VecDeque<Bytes>,
    rest: Body,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(c))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.rest.is_end_stream()
    }
}

impl OpenApi {
    /// Checks the head of a response; `Some(media validator)` when the body must be
    /// read and checked too.
    fn check_head<'o>(
        &self,
        resp: &'o Resp,
        parts: &http::response::Parts,
        head_request: bool,
        body_empty: bool,
        out: &mut Vec<Value>,
    ) -> Option<&'o Media> {
        for h in &resp.headers {
            let mut values = parts.headers.get_all(&h.name).iter().peekable();
            if values.peek().is_none() {
                if h.required {
                    out.push(violation(
                        "header",
                        Some(&h.label),
                        "required",
                        format!("the response header `{}` is required", h.label),
                    ));
                }
                continue;
            }
            let joined = values
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            match simple_value(&joined, &h.shape, false) {
                Err(m) => out.push(violation("header", Some(&h.label), "content", m)),
                Ok(value) => {
                    if let Some(v) = &h.validator {
                        let start = out.len();
                        collect(v, &value, "header", out);
                        for x in out.iter_mut().skip(start) {
                            if let Some(m) = x.as_object_mut() {
                                m.insert("name".into(), Value::String(h.label.clone()));
                            }
                        }
                    }
                }
            }
        }
        let status = parts.status.as_u16();
        if head_request || status == 204 || status == 304 || status < 200 {
            return None;
        }
        let ct = essence(&parts.headers);
        if resp.content.is_empty() {
            let announced = parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0);
            if !body_empty && (ct.is_some() || announced) {
                out.push(violation(
                    "body",
                    None,
                    "content",
                    format!("the operation declares no body for status {status}"),
                ));
            }
            return None;
        }
        let Some(ct) = ct else {
            out.push(violation(
                "content-type",
                None,
                "content",
                format!(
                    "the response has no Content-Type; the operation declares {}",
                    media_list(&resp.content)
                ),
            ));
            return None;
        };
        let Some(media) = find_media(&resp.content, &ct) else {
            out.push(violation(
                "content-type",
                None,
                "content",
                format!(
                    "the media type `{}` is not declared for status {status}; the operation declares {}",
                    truncate(&ct, 100),
                    media_list(&resp.content)
                ),
            ));
            return None;
        };
        if kind_of(&ct) != Kind::Json || media.validator.is_none() {
            return None;
        }
        if body_empty {
            out.push(violation(
                "body",
                None,
                "required",
                "the response has no body".into(),
            ));
            return None;
        }
        Some(media)
    }

    /// Counts, logs and decides on a checked response.
    fn finish_response(
        &self,
        ctx: &Ctx,
        op: usize,
        status: u16,
        violations: &[Value],
        body: Body,
    ) -> Result<Body, GatewayError> {
        let stats = self.route_stats(&ctx.route_name);
        let o = stats.op(Some(op));
        o.resp_validated.fetch_add(1, Ordering::Relaxed);
        if violations.is_empty() {
            return Ok(body);
        }
        o.resp_violations.fetch_add(1, Ordering::Relaxed);
        let label = self.ops.get(op).map_or("", |o| o.label.as_str());
        for v in violations {
            let Some(suppressed) = stats.sampler.allow(self.sample) else {
                continue;
            };
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
            let name = v
                .get("name")
                .and_then(Value::as_str)
                .map(tracing::field::display);
            tracing::warn!(
                route = %ctx.route_name,
                operation = %label,
                request_id = %ctx.request_id,
                status,
                location = %s("in"),
                name,
                pointer = %s("pointer"),
                rule = %s("keyword"),
                suppressed,
                "openapi: the response does not match the API description: {}",
                s("message"),
            );
        }
        if self.response == ResponseMode::Reject {
            drop(body);
            return Err(GatewayError::new(
                ErrorKind::ResponseContractViolation,
                "the upstream's response does not match the API description",
            ));
        }
        Ok(body)
    }
}

// ---------------------------------------------------------------------------
// The policy
// ---------------------------------------------------------------------------

impl Policy for OpenApi {
    fn name(&self) -> &'static str {
        "openapi"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        match self.find(&ctx.path, req.method()) {
            Found::Op { op, head, params } => {
                if self.response != ResponseMode::Off {
                    ctx.extensions.insert(Matched { op, head });
                }
                if !self.request_validation {
                    return Step::cont();
                }
                self.check_request(ctx, req, op, params)
            }
            _ if self.unknown == UnknownOperation::Pass => Step::cont(),
            Found::Method(allow) => {
                self.count_request(&ctx.route_name, None, false);
                Step::error(
                    GatewayError::new(
                        ErrorKind::MethodNotAllowed,
                        format!(
                            "the API description has no {} operation for this path",
                            req.method()
                        ),
                    )
                    .with_header(ALLOW, allow),
                )
            }
            Found::None => {
                self.count_request(&ctx.route_name, None, false);
                Step::error(GatewayError::new(
                    ErrorKind::NoOperation,
                    "the API description has no operation for this path",
                ))
            }
        }
    }

    fn wants_response_body(&self) -> bool {
        self.response != ResponseMode::Off
    }

    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        parts: &'a mut http::response::Parts,
        body: Body,
    ) -> BodyStep<'a> {
        let Some(m) = ctx.extensions.remove::<Matched>() else {
            return BodyStep::pass(body);
        };
        let Some(responses) = self.ops.get(m.op).and_then(|o| o.responses.as_ref()) else {
            return BodyStep::pass(body);
        };
        let status = parts.status.as_u16();
        let mut violations = Vec::new();
        let Some(resp) = responses.find(status) else {
            violations.push(violation(
                "status",
                None,
                "responses",
                format!("the status {status} is not declared for this operation"),
            ));
            return BodyStep::Ready(Some(self.finish_response(
                ctx,
                m.op,
                status,
                &violations,
                body,
            )));
        };
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body_empty = declared == Some(0) || http_body::Body::is_end_stream(&body);
        let Some(media) = self.check_head(resp, parts, m.head, body_empty, &mut violations) else {
            return BodyStep::Ready(Some(self.finish_response(
                ctx,
                m.op,
                status,
                &violations,
                body,
            )));
        };
        let op = m.op;
        let skip = move |ctx: &Ctx| {
            let s = self.route_stats(&ctx.route_name);
            s.op(Some(op)).resp_skipped.fetch_add(1, Ordering::Relaxed);
        };
        // Too large to buffer, or compressed (`gzip`, ...): not checked.
        let encoded = parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded || declared.is_some_and(|n| n > self.max_body) {
            skip(ctx);
            return BodyStep::Ready(Some(self.finish_response(
                ctx,
                m.op,
                status,
                &violations,
                body,
            )));
        }
        BodyStep::Pending(Box::pin(async move {
            let bytes = match buffer(body, self.max_body).await {
                Buffered::Whole(b) => b,
                Buffered::Large(body) => {
                    skip(ctx);
                    return self.finish_response(ctx, m.op, status, &violations, body);
                }
                Buffered::Failed(e) => {
                    return Err(GatewayError::new(
                        ErrorKind::UpstreamUnavailable,
                        format!("the upstream's response body could not be read: {e}"),
                    ));
                }
            };
            if bytes.is_empty() {
                violations.push(violation(
                    "body",
                    None,
                    "required",
                    "the response has no body".into(),
                ));
            } else if let Some(v) = &media.validator {
                match serde_json::from_slice::<Strict>(&bytes) {
                    Ok(value) => {
                        collect(v, &value.0, "body", &mut violations);
                    }
                    Err(e) => violations.push(violation(
                        "body",
                        None,
                        "json",
                        format!("the body is not valid JSON: {e}"),
                    )),
                }
            }
            let body = if bytes.is_empty() {
                Body::Empty
            } else {
                Body::full(bytes)
            };
            self.finish_response(ctx, m.op, status, &violations, body)
        }))
    }

    fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let stats = self.stats.read();
        let mut routes: Vec<(&Arc<str>, &Arc<RouteStats>)> = stats.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        // Every (route, operation) with its counters; `""` for unknown operations.
        let mut rows: Vec<(String, String, &OpStats)> = Vec::new();
        for (route, s) in &routes {
            for (i, o) in s.ops.iter().enumerate() {
                let label = self.ops.get(i).map_or("", |o| o.label.as_str());
                rows.push((label_value(route), label_value(label), o));
            }
            rows.push((label_value(route), String::new(), &s.unknown));
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        type Pick = fn(&OpStats) -> (&AtomicU64, &AtomicU64);
        let families: [(&str, &str, Pick); 2] = [
            (
                "portico_openapi_validated_total",
                "Requests and responses checked against the route's OpenAPI document.",
                |o| (&o.req_validated, &o.resp_validated),
            ),
            (
                "portico_openapi_violations_total",
                "Requests and responses that did not match the route's OpenAPI document.",
                |o| (&o.req_violations, &o.resp_violations),
            ),
        ];
        for (name, help, counters) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (route, op, o) in &rows {
                // Only the label sets that saw traffic.
                let (req, resp) = counters(o);
                for (dir, n, seen) in [
                    ("request", load(req), load(&o.req_validated)),
                    ("response", load(resp), load(&o.resp_validated)),
                ] {
                    if seen > 0 {
                        let _ = writeln!(
                            out,
                            "{name}{{route=\"{route}\",operation=\"{op}\",direction=\"{dir}\"}} {n}"
                        );
                    }
                }
            }
        }
        let name = "portico_openapi_response_skipped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Response bodies not validated because they were larger than max_body.\n# TYPE {name} counter"
        );
        for (route, op, o) in &rows {
            let n = load(&o.resp_skipped);
            if n > 0 {
                let _ = writeln!(out, "{name}{{route=\"{route}\",operation=\"{op}\"}} {n}");
            }
        }
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::parse;
    use std::net::{IpAddr, Ipv4Addr};

    fn build(settings: Value) -> Result<OpenApi, SettingsErrors> {
        OpenApi::new(parse(&settings)?, None)
    }

    fn spec_errors(settings: Value) -> Vec<(String, String)> {
        match build(settings) {
            Ok(_) => panic!("settings accepted"),
            Err(e) => e.into_iter().map(|(p, m)| (p.to_string(), m)).collect(),
        }
    }

    fn ctx(path: &str) -> Ctx {
        Ctx::new(
            "rid-1".into(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Arc::from("r"),
            path.into(),
            Default::default(),
        )
    }

    fn request(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Request<Body> {
        let mut b = Request::builder().method(method).uri(uri);
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

    /// Runs the request phase; the error, if any, and the context.
    async fn run(p: &OpenApi, req: &mut Request<Body>) -> (Result<(), GatewayError>, Ctx) {
        let mut c = ctx(req.uri().path());
        let r = match p.on_request(&mut c, req).await {
            Flow::Continue => Ok(()),
            Flow::Error(e) => Err(e),
            Flow::Respond(_) => panic!("answered"),
        };
        (r, c)
    }

    /// `(in, name, pointer, keyword)` of each violation of a 400.
    fn violations(e: &GatewayError) -> Vec<(String, String, String, String)> {
        assert_eq!(e.kind, ErrorKind::ValidationFailed, "{e:?}");
        let d = e.details.as_ref().unwrap();
        let mut v: Vec<_> = d["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                assert!(!s("message").is_empty(), "{v}");
                (s("in"), s("name"), s("pointer"), s("keyword"))
            })
            .collect();
        v.sort();
        v
    }

    fn orders_spec(version: &str) -> Value {
        json!({
            "openapi": version,
            "info": {"title": "orders", "version": "1"},
            "servers": [{"url": "https://api.example.com/{base}", "variables": {"base": {"default": "api"}}}],
            "paths": {
                "/orders": {
                    "post": {
                        "operationId": "createOrder",
                        "parameters": [{"$ref": "#/components/parameters/Version"}],
                        "requestBody": {"$ref": "#/components/requestBodies/Order"},
                        "responses": {"201": {"$ref": "#/components/responses/Created"}},
                    },
                    "get": {
                        "parameters": [
                            {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}},
                            {"name": "tag", "in": "query", "schema": {"type": "array", "items": {"type": "integer"}}},
                            {"name": "ids", "in": "query", "explode": false, "schema": {"type": "array", "items": {"type": "integer"}}},
                            {"name": "filter", "in": "query", "style": "deepObject", "schema": {"type": "object", "properties": {"min": {"type": "number"}}, "additionalProperties": false}},
                            {"name": "q", "in": "query", "required": true, "schema": {"type": "string", "minLength": 2}},
                        ],
                        "responses": {"2XX": {"description": "ok", "content": {"application/json": {"schema": {"type": "array"}}}}},
                    },
                },
                "/orders/mine": {"get": {"operationId": "mine", "responses": {"default": {"description": "x"}}}},
                "/orders/{id}": {
                    "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}}],
                    "get": {"operationId": "getOrder", "responses": {"200": {"description": "ok"}}},
                    "delete": {"operationId": "deleteOrder", "responses": {"204": {"description": "gone"}}},
                },
                "/orders/{id}.{format}": {
                    "get": {
                        "operationId": "getOrderAs",
                        "parameters": [
                            {"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}},
                            {"name": "format", "in": "path", "required": true, "schema": {"enum": ["json", "xml"]}},
                        ],
                        "responses": {"200": {"description": "ok"}},
                    },
                },
                "/{any}/status": {"get": {"operationId": "status", "responses": {"200": {"description": "ok"}}}},
            },
            "components": {
                "parameters": {
                    "Version": {"name": "X-Api-Version", "in": "header", "required": true, "schema": {"$ref": "#/components/schemas/Version"}},
                },
                "requestBodies": {
                    "Order": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
                },
                "responses": {
                    "Created": {
                        "description": "created",
                        "headers": {"Location": {"required": true, "schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}},
                    },
                },
                "schemas": {
                    "Version": {"type": "integer", "enum": [1, 2]},
                    "Order": {
                        "type": "object",
                        "required": ["id", "customer", "items"],
                        "properties": {
                            "id": {"type": "integer", "readOnly": true},
                            "customer": {"type": "string", "minLength": 1},
                            "items": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Item"}},
                        },
                    },
                    "Item": {
                        "type": "object",
                        "required": ["price"],
                        "properties": {"price": {"type": "number", "minimum": 0}},
                    },
                },
            },
        })
    }

    fn find_label(
        p: &OpenApi,
        path: &str,
        method: Method,
    ) -> Option<(String, Vec<(String, String)>)> {
        match p.find(path, &method) {
            Found::Op { op, params, .. } => Some((p.ops[op].label.clone(), params)),
            _ => None,
        }
    }

    #[test]
    fn path_templates_most_literal_first() {
        let p = build(json!({"spec_inline": orders_spec("3.1.0")})).unwrap();
        // servers[0].url with its variable's default is the base path.
        assert_eq!(p.base_path.as_deref(), Some("/api"));
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            find_label(&p, "/api/orders/mine", Method::GET),
            Some(("mine".into(), vec![]))
        );
        assert_eq!(
            find_label(&p, "/api/orders/42", Method::GET),
            Some(("getOrder".into(), pairs(&[("id", "42")])))
        );
        assert_eq!(
            find_label(&p, "/api/orders/4.2.json", Method::GET),
            Some((
                "getOrderAs".into(),
                pairs(&[("id", "4.2"), ("format", "json")])
            ))
        );
        assert_eq!(
            find_label(&p, "/api/orders/status", Method::GET),
            Some(("getOrder".into(), pairs(&[("id", "status")]))),
            "a literal first segment wins over a variable"
        );
        assert_eq!(
            find_label(&p, "/api/x%20y/status", Method::GET),
            Some(("status".into(), pairs(&[("any", "x y")])))
        );
        assert_eq!(
            find_label(&p, "/api/orders", Method::HEAD).map(|x| x.0),
            Some("GET /orders".into()),
            "HEAD uses the GET operation"
        );
        // Outside the base path, an empty variable, a trailing slash: nothing.
        assert!(matches!(p.find("/orders/1", &Method::GET), Found::None));
        assert!(matches!(p.find("/api/orders/", &Method::GET), Found::None));
        assert!(matches!(p.find("/api", &Method::GET), Found::None));
        // The path exists without the method.
        match p.find("/api/orders/1", &Method::PUT) {
            Found::Method(allow) => assert_eq!(allow, "GET, DELETE, HEAD"),
            _ => panic!("expected 405"),
        }
        // Precedence keys.
        let key = |t: &str| precedence(&parse_template(t).unwrap());
        assert!(key("/a/b") < key("/a/{x}"));
        assert!(key("/a/{x}.json") < key("/a/{x}"));
        assert!(key("/a/{x}") < key("/{y}/b"));
        assert!(key("/a/v{x}.{y}") < key("/a/{x}.{y}"));
        assert!(parse_template("/a/{x}{y}").is_err());
        assert!(parse_template("/a/{x").is_err());
        assert!(parse_template("a").is_err());
        // An explicit base path replaces the servers' one; `/` is none.
        let p = build(json!({"spec_inline": orders_spec("3.1.0"), "base_path": "/"})).unwrap();
        assert!(p.base_path.is_none());
        assert!(matches!(
            p.find("/orders/1", &Method::GET),
            Found::Op { .. }
        ));
    }

    #[test]
    fn servers_paths() {
        let base = |url: &str| servers_base(&json!({"servers": [{"url": url}]}));
        assert_eq!(base("https://x.example/v1/"), Some("/v1".into()));
        assert_eq!(base("/v2"), Some("/v2".into()));
        assert_eq!(base("v3"), Some("/v3".into()));
        assert_eq!(base("//h.example/a/b"), Some("/a/b".into()));
        assert_eq!(base("https://x.example"), None);
        assert_eq!(base("/"), None);
        assert_eq!(base("https://x.example/{unknown}"), None);
    }

    #[test]
    fn openapi_30_schemas_become_2020_12() {
        let doc = json!({});
        let c = Converter {
            v30: true,
            dir: Dir::Request,
            original: &doc,
        };
        let mut s = json!({
            "type": "object",
            "properties": {
                "a": {"type": "string", "nullable": true},
                "b": {"type": "integer", "minimum": 0, "exclusiveMinimum": true, "maximum": 9, "exclusiveMaximum": false},
                "c": {"$ref": "#/components/schemas/C", "description": "ignored", "nullable": true},
                "d": {"enum": ["x"], "nullable": true},
                "e": {"type": "array", "items": {"type": "number", "nullable": true, "exclusiveMaximum": true, "maximum": 1}},
                "f": {"allOf": [{"type": "integer", "nullable": false}]},
                "id": {"type": "integer", "readOnly": true},
            },
            "required": ["a", "id"],
        });
        c.schema(&mut s);
        assert_eq!(
            s,
            json!({
                "type": "object",
                "properties": {
                    "a": {"type": ["string", "null"]},
                    "b": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
                    "c": {"$ref": "#/components/schemas/C"},
                    "d": {"enum": ["x"]},
                    "e": {"type": "array", "items": {"type": ["number", "null"], "exclusiveMaximum": 1}},
                    "f": {"allOf": [{"type": "integer"}]},
                    "id": {"type": "integer", "readOnly": true},
                },
                "required": ["a"],
            })
        );
        // 3.1: nothing but `required` changes; in responses `writeOnly` is not required.
        let c = Converter {
            v30: false,
            dir: Dir::Response,
            original: &doc,
        };
        let mut s = json!({
            "type": "object",
            "properties": {
                "a": {"type": "string", "nullable": true},
                "b": {"$ref": "#/x", "description": "kept"},
                "pw": {"type": "string", "writeOnly": true},
                "id": {"type": "integer", "readOnly": true},
            },
            "required": ["pw", "id"],
        });
        let mut want = s.clone();
        want["required"] = json!(["id"]);
        c.schema(&mut s);
        assert_eq!(s, want);
    }

    #[test]
    fn converted_schemas_validate_as_intended() {
        let spec = json!({
            "openapi": "3.0.3",
            "paths": {"/t": {"post": {
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/T"}}}},
                "responses": {"200": {"description": "ok"}},
            }}},
            "components": {"schemas": {"T": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer", "nullable": true, "minimum": 0, "exclusiveMinimum": true},
                    "s": {"type": "string", "format": "date-time"},
                },
            }}},
        });
        let p = build(json!({"spec_inline": spec})).unwrap();
        let v = p.ops[0].body.as_ref().unwrap().media[0]
            .validator
            .as_ref()
            .unwrap();
        assert!(v.is_valid(&json!({"n": null})));
        assert!(v.is_valid(&json!({"n": 1})));
        assert!(!v.is_valid(&json!({"n": 0})), "exclusiveMinimum: true");
        assert!(!v.is_valid(&json!({"s": "yesterday"})), "format is checked");
        assert!(v.is_valid(&json!({"s": "2024-01-02T03:04:05Z"})));
    }

    #[test]
    fn references_are_resolved_and_remote_ones_refused() {
        let p = build(json!({"spec_inline": orders_spec("3.0.3"), "response_validation": "log"}))
            .unwrap();
        let create = p.ops.iter().find(|o| o.label == "createOrder").unwrap();
        // components/parameters → header parameter with its referenced schema.
        assert_eq!(create.params.len(), 1);
        assert_eq!(create.params[0].location, In::Header);
        assert_eq!(create.params[0].shape, Shape::Scalar(Some(Scalar::Integer)));
        // components/requestBodies → schemas → nested items.
        let body = create.body.as_ref().unwrap();
        assert!(body.required);
        let v = body.media[0].validator.as_ref().unwrap();
        assert!(
            v.is_valid(&json!({"customer": "c", "items": [{"price": 1}]})),
            "readOnly id is not required in requests"
        );
        assert!(!v.is_valid(&json!({"customer": "c", "items": [{"price": -1}]})));
        // components/responses: `id` required in the response.
        let r = create.responses.as_ref().unwrap().find(201).unwrap();
        assert_eq!(r.headers[0].name, "location");
        assert!(r.headers[0].required);
        let v = r.content[0].validator.as_ref().unwrap();
        assert!(!v.is_valid(&json!({"customer": "c", "items": [{"price": 1}]})));
        assert!(v.is_valid(&json!({"id": 1, "customer": "c", "items": [{"price": 1}]})));
        // Status lookup: exact, range, default.
        let list = p.ops.iter().find(|o| o.label == "GET /orders").unwrap();
        assert!(list.responses.as_ref().unwrap().find(204).is_some());
        assert!(list.responses.as_ref().unwrap().find(404).is_none());
        let mine = p.ops.iter().find(|o| o.label == "mine").unwrap();
        assert!(mine.responses.as_ref().unwrap().find(500).is_some());

        // Remote and dangling references are settings errors inside `spec_inline`.
        let mut spec = orders_spec("3.1.0");
        spec["components"]["schemas"]["Item"] = json!({"$ref": "https://example.com/item.json"});
        spec["paths"]["/orders/{id}"]["get"]["parameters"] = json!([{"$ref": "other.yaml#/P"}]);
        let e = spec_errors(json!({"spec_inline": spec}));
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec_inline.components.schemas.Item[\"$ref\"]",
                "spec_inline.paths[\"/orders/{id}\"].get.parameters[0][\"$ref\"]",
            ],
            "{e:?}"
        );
        assert!(e[0].1.contains("https://example.com/item.json"), "{e:?}");
        assert!(e[0].1.contains("nothing is fetched"), "{e:?}");
        let mut spec = orders_spec("3.1.0");
        spec["components"]["parameters"]["Version"]["schema"] =
            json!({"$ref": "#/components/schemas/Nope"});
        spec["paths"]["/orders"]["post"]["requestBody"] =
            json!({"$ref": "#/components/requestBodies/Nope"});
        let e = spec_errors(json!({"spec_inline": spec}));
        assert!(
            e.iter().any(
                |(p, m)| p == "spec_inline.paths[\"/orders\"].post.requestBody[\"$ref\"]"
                    && m.contains("points to nothing")
            ),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|(_, m)| m.contains("/components/schemas/Nope")),
            "{e:?}"
        );
    }

    #[test]
    fn invalid_documents_and_settings() {
        let e = spec_errors(json!({}));
        assert!(e[0].1.contains("set `spec`"), "{e:?}");
        let e = spec_errors(json!({"spec": "a.yaml", "spec_inline": {}}));
        assert!(e[0].1.contains("not both"), "{e:?}");
        let e = spec_errors(json!({"spec_inline": {"swagger": "2.0"}}));
        assert_eq!(e[0].0, "spec_inline.swagger");
        let e = spec_errors(json!({"spec_inline": {"openapi": "2.5"}}));
        assert_eq!(e[0].0, "spec_inline.openapi");
        let e = spec_errors(
            json!({"spec_inline": {"openapi": "3.1.0", "paths": {"/a": {"get": {
                "parameters": [{"name": "x", "in": "query", "schema": {"type": "nmber"}}],
                "responses": {},
            }}}}}),
        );
        assert_eq!(
            e[0].0, "spec_inline.paths[\"/a\"].get.parameters[0].schema.type",
            "{e:?}"
        );
        assert!(e[0].1.starts_with("invalid JSON Schema"), "{e:?}");
        let e = spec_errors(
            json!({"spec_inline": {"openapi": "3.1.0", "paths": {"/a": {"get": {
            "parameters": [{"name": "x", "in": "body"}],
            "responses": {"20": {"description": "x"}},
        }}}}, "response_validation": "reject", "max_body": 0, "base_path": "api"}),
        );
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "max_body",
                "base_path",
                "spec_inline.paths[\"/a\"].get.parameters[0].in",
                "spec_inline.paths[\"/a\"].get.responses.20",
            ],
            "{e:?}"
        );
        let e =
            spec_errors(json!({"spec_inline": {"openapi": "3.1.0"}, "response_validation": "yes"}));
        assert!(e[0].1.contains("unknown variant"), "{e:?}");
    }

    #[test]
    fn spec_files_resolve_against_the_config_dir_and_errors_have_positions() {
        let dir = std::env::temp_dir().join(format!("portico-openapi-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("specs")).unwrap();
        std::fs::write(
            dir.join("specs/api.yaml"),
            "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      responses:\n        '200':\n          $ref: 'other.yaml#/R'\n",
        )
        .unwrap();
        let s: Settings = parse(&json!({"spec": "specs/api.yaml"})).unwrap();
        let e = match OpenApi::new(s, Some(&dir)) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        assert_eq!(e[0].0.to_string(), "spec");
        assert!(
            e[0].1.starts_with(
                "specs/api.yaml:7:17: paths[\"/a\"].get.responses.200[\"$ref\"]: `other.yaml#/R`"
            ),
            "{e:?}"
        );
        // Relative to the current directory it is not found.
        let s: Settings = parse(&json!({"spec": "specs/api.yaml"})).unwrap();
        let e = OpenApi::new(s, None).err().unwrap();
        assert!(e[0].1.contains("cannot read the OpenAPI document"), "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parameter_values_and_coercion() {
        let shape = |s: Value| {
            shape_of(
                &json!({"components": {"schemas": {"I": {"type": "integer"}}}}),
                Some(&s),
            )
        };
        assert_eq!(
            shape(json!({"type": "integer"})),
            Shape::Scalar(Some(Scalar::Integer))
        );
        assert_eq!(
            shape(json!({"$ref": "#/components/schemas/I"})),
            Shape::Scalar(Some(Scalar::Integer))
        );
        assert_eq!(
            shape(json!({"type": ["integer", "null"]})),
            Shape::Scalar(Some(Scalar::Integer))
        );
        assert_eq!(
            shape(json!({"type": ["integer", "string"]})),
            Shape::Scalar(None)
        );
        assert_eq!(
            shape(json!({"type": "array", "items": {"$ref": "#/components/schemas/I"}})),
            Shape::Array(Some(Scalar::Integer))
        );
        let p = build(json!({"spec_inline": orders_spec("3.1.0"), "base_path": ""})).unwrap();
        let list = p.ops.iter().find(|o| o.label == "GET /orders").unwrap();
        let value = |name: &str, q: &str| {
            let req = request("GET", &format!("/orders?{q}"), &[], None);
            let param = list.params.iter().find(|x| x.name == name).unwrap();
            OpenApi::param_value(param, &req, &[], &query_pairs(req.uri().query()))
                .map(|r| r.unwrap())
        };
        assert_eq!(value("limit", "limit=5"), Some(json!(5)));
        assert_eq!(value("limit", "limit=five"), Some(json!("five")));
        assert_eq!(value("limit", "limit=1&limit=2"), Some(json!([1, 2])));
        assert_eq!(value("limit", "other=1"), None);
        assert_eq!(value("tag", "tag=1&tag=x"), Some(json!([1, "x"])));
        assert_eq!(value("tag", "tag=7"), Some(json!([7])));
        assert_eq!(value("ids", "ids=1,2,3"), Some(json!([1, 2, 3])));
        assert_eq!(
            value("filter", "filter%5Bmin%5D=2.5&filter[x]=a"),
            Some(json!({"min": 2.5, "x": "a"}))
        );
        assert_eq!(value("q", "q=a+b%21"), Some(json!("a b!")));
        // Header and path values.
        let create = p.ops.iter().find(|o| o.label == "createOrder").unwrap();
        let req = request("POST", "/orders", &[("x-api-version", "2")], None);
        assert_eq!(
            OpenApi::param_value(&create.params[0], &req, &[], &[]).map(|r| r.unwrap()),
            Some(json!(2))
        );
        let get = p.ops.iter().find(|o| o.label == "getOrder").unwrap();
        let path = vec![("id".to_string(), "17".to_string())];
        assert_eq!(
            OpenApi::param_value(&get.params[0], &req, &path, &[]).map(|r| r.unwrap()),
            Some(json!(17))
        );
        // Label and matrix styles of an array path parameter.
        let mut param = Param {
            name: "ids".into(),
            header: None,
            location: In::Path,
            required: true,
            style: Style::Label,
            explode: true,
            shape: Shape::Array(Some(Scalar::Integer)),
            validator: None,
        };
        let at = |p: &Param, raw: &str| {
            OpenApi::param_value(p, &req, &[("ids".to_string(), raw.to_string())], &[])
                .map(|r| r.unwrap())
        };
        assert_eq!(at(&param, ".1.2"), Some(json!([1, 2])));
        param.style = Style::Matrix;
        assert_eq!(at(&param, ";ids=1;ids=2"), Some(json!([1, 2])));
        param.explode = false;
        assert_eq!(at(&param, ";ids=1,2"), Some(json!([1, 2])));
    }

    #[tokio::test]
    async fn requests_list_every_violation() {
        let p = build(json!({"spec_inline": orders_spec("3.0.3")})).unwrap();
        // Valid: passes, body put back unchanged.
        let text = r#"{"customer": "c", "items": [{"price": 1.5}]}"#;
        let mut req = request(
            "POST",
            "/api/orders",
            &[("content-type", "application/json"), ("x-api-version", "1")],
            Some(text),
        );
        let (r, _) = run(&p, &mut req).await;
        r.unwrap();
        let b = std::mem::take(req.body_mut())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(b, text.as_bytes());

        // Header, body: every violation.
        let mut req = request(
            "POST",
            "/api/orders",
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("x-api-version", "3"),
            ],
            Some(r#"{"items": [{"price": -1}, {}]}"#),
        );
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [
                ("body".into(), "".into(), "".into(), "required".into()),
                (
                    "body".into(),
                    "".into(),
                    "/items/0/price".into(),
                    "minimum".into()
                ),
                (
                    "body".into(),
                    "".into(),
                    "/items/1".into(),
                    "required".into()
                ),
                (
                    "header".into(),
                    "X-Api-Version".into(),
                    "".into(),
                    "enum".into()
                ),
            ]
        );
        // Path and query.
        let mut req = request("GET", "/api/orders/0", &[], None);
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [("path".into(), "id".into(), "".into(), "minimum".into())]
        );
        let mut req = request(
            "GET",
            "/api/orders?limit=500&tag=x&filter[max]=1",
            &[],
            None,
        );
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [
                (
                    "query".into(),
                    "filter".into(),
                    "".into(),
                    "additionalProperties".into()
                ),
                ("query".into(), "limit".into(), "".into(), "maximum".into()),
                ("query".into(), "q".into(), "".into(), "required".into()),
                ("query".into(), "tag".into(), "/0".into(), "type".into()),
            ]
        );
        // Missing body, unexpected body, media type, size, malformed JSON.
        let mut req = request("POST", "/api/orders", &[("x-api-version", "1")], None);
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [("body".into(), "".into(), "".into(), "required".into())]
        );
        let mut req = request("DELETE", "/api/orders/1", &[], Some("{}"));
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [("body".into(), "".into(), "".into(), "requestBody".into())]
        );
        let mut req = request(
            "POST",
            "/api/orders",
            &[("x-api-version", "1"), ("content-type", "text/plain")],
            Some("{}"),
        );
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnsupportedMediaType);
        assert!(e.message.contains("application/json"), "{e:?}");
        let p_small = build(json!({"spec_inline": orders_spec("3.0.3"), "max_body": 8})).unwrap();
        let mut req = request(
            "POST",
            "/api/orders",
            &[("x-api-version", "1"), ("content-type", "application/json")],
            Some(text),
        );
        let e = run(&p_small, &mut req).await.0.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        let mut req = request(
            "POST",
            "/api/orders",
            &[("x-api-version", "1"), ("content-type", "application/json")],
            Some("{,}"),
        );
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [("body".into(), "".into(), "".into(), "json".into())]
        );

        // Unknown operations: 404 / 405 with Allow, or pass.
        let mut req = request("GET", "/api/nothing", &[], None);
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            (e.kind.status().as_u16(), e.kind.code()),
            (404, "no_operation")
        );
        let mut req = request("PATCH", "/api/orders", &[], None);
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(e.kind, ErrorKind::MethodNotAllowed);
        assert_eq!(
            e.headers,
            vec![(ALLOW, HeaderValue::from_static("GET, POST, HEAD"))]
        );
        let pass = build(json!({"spec_inline": orders_spec("3.0.3"), "unknown_operation": "pass"}))
            .unwrap();
        let mut req = request("PATCH", "/api/orders", &[], None);
        run(&pass, &mut req).await.0.unwrap();
        // request_validation: false only matches.
        let off = build(json!({"spec_inline": orders_spec("3.0.3"), "request_validation": false}))
            .unwrap();
        let mut req = request("GET", "/api/orders/0", &[], None);
        run(&off, &mut req).await.0.unwrap();

        // Counters.
        let mut m = String::new();
        p.metrics(&mut m);
        assert!(m.contains("portico_openapi_validated_total{route=\"r\",operation=\"createOrder\",direction=\"request\"} 5\n"), "{m}");
        assert!(m.contains("portico_openapi_violations_total{route=\"r\",operation=\"createOrder\",direction=\"request\"} 4\n"), "{m}");
        assert!(m.contains("portico_openapi_violations_total{route=\"r\",operation=\"\",direction=\"request\"} 2\n"), "{m}");
        assert!(!m.contains("direction=\"response\""), "{m}");
    }

    #[tokio::test]
    async fn form_bodies_are_validated_as_objects() {
        let spec = json!({"openapi": "3.1.0", "paths": {"/f": {"post": {
            "requestBody": {"content": {
                "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}},
                "text/*": {},
            }},
            "responses": {"200": {"description": "ok"}},
        }}}});
        let p = build(json!({"spec_inline": spec})).unwrap();
        let form = [("content-type", "application/x-www-form-urlencoded")];
        let mut req = request("POST", "/f", &form, Some("n=2"));
        run(&p, &mut req).await.0.unwrap();
        let mut req = request("POST", "/f", &form, Some("n=9"));
        let e = run(&p, &mut req).await.0.unwrap_err();
        assert_eq!(
            violations(&e),
            [("body".into(), "".into(), "/n".into(), "maximum".into())]
        );
        // Another declared media type: not validated.
        let mut req = request("POST", "/f", &[("content-type", "text/csv")], Some("a,b"));
        run(&p, &mut req).await.0.unwrap();
        // An optional body may be left out.
        let mut req = request("POST", "/f", &[], None);
        run(&p, &mut req).await.0.unwrap();
    }

    /// Runs the response phase for a request matched by `on_request`.
    async fn respond(
        p: &OpenApi,
        method: &str,
        path: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: Body,
    ) -> (Result<Bytes, GatewayError>, Ctx) {
        let mut req = request(method, path, &[("x-api-version", "1")], None);
        let mut c = ctx(req.uri().path());
        // The request may fail validation; only the match matters here.
        let _ = p.on_request(&mut c, &mut req).await;
        let mut b = http::Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let r = match p.response_body(&mut c, &mut parts, body).await {
            Ok(b) => Ok(b.collect().await.unwrap().to_bytes()),
            Err(e) => Err(e),
        };
        (r, c)
    }

    #[tokio::test]
    async fn responses_are_checked() {
        let p = build(json!({"spec_inline": orders_spec("3.0.3"), "response_validation": "reject", "max_body": 64})).unwrap();
        assert!(p.wants_response_body());
        let json_ct = [
            ("content-type", "application/json"),
            ("location", "/orders/1"),
        ];
        let good = r#"{"id": 1, "customer": "c", "items": [{"price": 2}]}"#;
        let (r, _) = respond(&p, "POST", "/api/orders", 201, &json_ct, Body::full(good)).await;
        assert_eq!(r.unwrap(), good.as_bytes());
        // Streamed in pieces: still buffered and checked.
        let (r, _) = respond(
            &p,
            "POST",
            "/api/orders",
            201,
            &json_ct,
            frames(&[&good[..10], &good[10..]]),
        )
        .await;
        assert_eq!(r.unwrap(), good.as_bytes());
        let bad = r#"{"customer": "c", "items": []}"#;
        let (r, _) = respond(&p, "POST", "/api/orders", 201, &json_ct, Body::full(bad)).await;
        let e = r.unwrap_err();
        assert_eq!(
            (e.kind.status().as_u16(), e.kind.code()),
            (502, "response_contract_violation")
        );
        // Undeclared status, missing required header, undeclared media type.
        let (r, _) = respond(&p, "POST", "/api/orders", 500, &json_ct, Body::full(good)).await;
        assert!(r.is_err());
        let (r, _) = respond(
            &p,
            "POST",
            "/api/orders",
            201,
            &[("content-type", "application/json")],
            Body::full(good),
        )
        .await;
        assert!(r.is_err());
        let (r, _) = respond(
            &p,
            "POST",
            "/api/orders",
            201,
            &[("content-type", "text/html"), ("location", "/x")],
            Body::full("<p>"),
        )
        .await;
        assert!(r.is_err());
        // A body where none is declared; none where one is.
        let (r, _) = respond(
            &p,
            "GET",
            "/api/orders/1",
            200,
            &[("content-type", "application/json")],
            Body::full("{}"),
        )
        .await;
        assert!(r.is_err());
        let (r, _) = respond(&p, "DELETE", "/api/orders/1", 204, &[], Body::Empty).await;
        r.unwrap();
        let (r, _) = respond(
            &p,
            "GET",
            "/api/orders?q=ab",
            200,
            &[("content-type", "application/json")],
            Body::Empty,
        )
        .await;
        assert!(r.is_err());
        // Larger than max_body: streamed through unchecked, counted as skipped.
        let big = format!("[{}1]", "1,".repeat(100));
        let (r, _) = respond(
            &p,
            "GET",
            "/api/orders?q=ab",
            200,
            &[("content-type", "application/json")],
            frames(&[&big[..50], &big[50..120], &big[120..]]),
        )
        .await;
        assert_eq!(r.unwrap(), big.as_bytes());
        let (r, _) = respond(
            &p,
            "GET",
            "/api/orders?q=ab",
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "1000"),
            ],
            Body::full("[]"),
        )
        .await;
        r.unwrap();
        // Compressed: not checked either.
        let (r, _) = respond(
            &p,
            "GET",
            "/api/orders?q=ab",
            200,
            &[
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            Body::full("\u{1f}\u{8b}"),
        )
        .await;
        r.unwrap();
        // HEAD: no body expected.
        let (r, _) = respond(
            &p,
            "HEAD",
            "/api/orders?q=ab",
            200,
            &[("content-type", "application/json")],
            Body::Empty,
        )
        .await;
        r.unwrap();

        let mut m = String::new();
        p.metrics(&mut m);
        assert!(m.contains("portico_openapi_validated_total{route=\"r\",operation=\"createOrder\",direction=\"response\"} 6\n"), "{m}");
        assert!(m.contains("portico_openapi_violations_total{route=\"r\",operation=\"createOrder\",direction=\"response\"} 4\n"), "{m}");
        assert!(
            m.contains(
                "portico_openapi_response_skipped_total{route=\"r\",operation=\"GET /orders\"} 3\n"
            ),
            "{m}"
        );

        // `log`: the same response passes.
        let p = build(json!({"spec_inline": orders_spec("3.0.3"), "response_validation": "log"}))
            .unwrap();
        let (r, _) = respond(&p, "POST", "/api/orders", 201, &json_ct, Body::full(bad)).await;
        assert_eq!(r.unwrap(), bad.as_bytes());
        // Off: no body phase.
        let p = build(json!({"spec_inline": orders_spec("3.0.3")})).unwrap();
        assert!(!p.wants_response_body());
    }

    /// A streamed body of several frames, without a known length.
    fn frames(parts: &[&str]) -> Body {
        Body::boxed(Frames(
            parts.iter().map(|p| Bytes::from(p.to_string())).collect(),
        ))
    }

    struct Frames(VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[test]
    fn log_sampling() {
        let s = Sampler::default();
        let allowed = (0..25).filter(|_| s.allow(10).is_some()).count();
        // Within one second (or straddling two), at most 2 × 10.
        assert!((10..=20).contains(&allowed), "{allowed}");
        assert!(Sampler::default().allow(0).is_none());
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
