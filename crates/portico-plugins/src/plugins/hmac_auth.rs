//! `hmac-auth`: HTTP Message Signatures (RFC 9421) with `hmac-sha256` (§3.3.3).
//!
//! A client signs chosen parts of its request (the covered components) with a secret
//! it shares with the gateway and sends two structured-field dictionaries (RFC 8941):
//!
//! ```text
//! Signature-Input: sig1=("@method" "@path" "@authority");created=1735689600;nonce="n-8f3a";keyid="alice-1"
//! Signature: sig1=:<base64 of HMAC-SHA256(secret, signature base)>:
//! ```
//!
//! Verification, in this order:
//! 1. No `Signature-Input` and no `Signature`: not a credential of this kind; the
//!    request goes on (the route's other authentication policies, then the 401 or the
//!    anonymous consumer).
//! 2. The signature to check: the label set in `label`, else every label in the order
//!    of `Signature-Input`; a label is a candidate when its `alg` is `hmac-sha256` or
//!    absent and its `keyid` is known. Candidates are tried in order; the first that
//!    verifies wins (a refusal reports the first candidate's problem).
//! 3. The signature must cover `required_components`, and `content-digest` when the
//!    request has a body; `created` must be within `clock_skew` of now (past and
//!    future); `expires`, when present, must not have passed; `nonce` is required
//!    (`require_nonce`).
//! 4. The signature base is rebuilt exactly as RFC 9421 §2.5 says and its HMAC-SHA256
//!    with the consumer's secret is compared in constant time.
//! 5. When `content-digest` is covered, `Content-Digest` (RFC 9530, `sha-256` and/or
//!    `sha-512`) is checked against the body, read up to `max_body` (413 beyond), and
//!    the identical bytes go upstream.
//! 6. The `(keyid, nonce)` pair is remembered until the signature could no longer be
//!    accepted (`created` + `clock_skew`, at least now + `clock_skew`): the same nonce
//!    for the same key is refused as replayed. The cache is per gateway process
//!    ([`NonceCache`]); a cluster-wide one needs a shared store.
//!
//! Verification takes "now" as a parameter ([`HmacAuth::step`]) so tests use their own
//! clock. Secrets and signatures are never logged nor repeated in answers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::{digest, hmac};
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Version};
use parking_lot::Mutex;
use portico_config::units::{ByteSize, Dur};
use portico_config::KeyPath;
use portico_store::index::HmacEntry;
use portico_store::{now_secs, Identity};
use schemars::JsonSchema;
use serde::Deserialize;

use super::auth::{info, REALM};
use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

pub const SIGNATURE: HeaderName = HeaderName::from_static("signature");
pub const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
pub const ACCEPT_SIGNATURE: HeaderName = HeaderName::from_static("accept-signature");
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");

/// The one algorithm this policy verifies.
pub const ALG: &str = "hmac-sha256";
/// Most `(keyid, nonce)` pairs one gateway process remembers (about 24 bytes each).
/// When it is full even after forgetting expired pairs, signed requests are answered
/// 429 until pairs expire: replay protection fails closed.
pub const NONCE_CACHE_MAX: usize = 400_000;
/// Most components one signature may cover.
const MAX_COMPONENTS: usize = 64;
const DEFAULT_MAX_BODY: u64 = 1 << 20;
/// Expired nonces are forgotten at most this often (seconds), and when the cache is full.
const SWEEP_EVERY: i64 = 10;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Check only the signature with this label (a structured-field key such as
    /// `sig1`). Default: every label of `Signature-Input`, in order.
    #[serde(default)]
    pub label: Option<String>,
    /// Components every signature must cover: derived components (`@method`,
    /// `@target-uri`, `@authority`, `@scheme`, `@request-target`, `@path`, `@query`)
    /// and lower-case header names. `content-digest` is added when the request has a
    /// body. Default: `["@method", "@path", "@authority"]`.
    #[serde(default = "default_required")]
    pub required_components: Vec<String>,
    /// How far `created` may be from the gateway's clock, in the past or the future
    /// (default `300s`); also how long a nonce is remembered.
    #[serde(default = "default_skew")]
    pub clock_skew: Dur,
    /// Require a `nonce` parameter and refuse a nonce seen before for the same key id
    /// (default `true`).
    #[serde(default = "default_true")]
    pub require_nonce: bool,
    /// Largest body whose `Content-Digest` is checked; a larger one is refused with
    /// 413 (default `1MiB`).
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// The scheme of `@scheme` and `@target-uri` for requests that do not carry one
    /// (HTTP/1.1 in origin form): `http` or `https`. Default: `https` when the
    /// connection presented a verified client certificate, else `http`.
    #[serde(default)]
    pub scheme: Option<Scheme>,
    /// Send `Signature` and `Signature-Input` on to the upstream (default: removed).
    #[serde(default)]
    pub forward_credentials: bool,
    /// A consumer for requests without a signature (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

fn default_required() -> Vec<String> {
    vec!["@method".into(), "@path".into(), "@authority".into()]
}

fn default_skew() -> Dur {
    Dur::secs(300)
}

fn default_true() -> bool {
    true
}

fn default_max_body() -> ByteSize {
    ByteSize(DEFAULT_MAX_BODY)
}

/// A covered component this policy can rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Component {
    Method,
    TargetUri,
    Authority,
    Scheme,
    RequestTarget,
    Path,
    Query,
    Field(HeaderName),
}

impl Component {
    fn parse(name: &str) -> Result<Component, String> {
        Ok(match name {
            "@method" => Component::Method,
            "@target-uri" => Component::TargetUri,
            "@authority" => Component::Authority,
            "@scheme" => Component::Scheme,
            "@request-target" => Component::RequestTarget,
            "@path" => Component::Path,
            "@query" => Component::Query,
            "@signature-params" => {
                return Err("`@signature-params` is never a covered component".into())
            }
            "@query-param" | "@status" => {
                return Err(format!("the component `{name}` is not supported"))
            }
            n if n.starts_with('@') => {
                return Err(format!(
                    "`{}` is not a derived component (use @method, @target-uri, @authority, \
                     @scheme, @request-target, @path or @query)",
                    clip(n, 40)
                ))
            }
            n => {
                if n.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "header names are covered in lower case: `{}`",
                        clip(n, 40)
                    ));
                }
                match HeaderName::from_bytes(n.as_bytes()) {
                    Ok(h) => Component::Field(h),
                    Err(_) => return Err(format!("`{}` is not a header name", clip(n, 40))),
                }
            }
        })
    }

    fn name(&self) -> &str {
        match self {
            Component::Method => "@method",
            Component::TargetUri => "@target-uri",
            Component::Authority => "@authority",
            Component::Scheme => "@scheme",
            Component::RequestTarget => "@request-target",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::Field(h) => h.as_str(),
        }
    }
}

/// The parts of a request the derived components are made of.
struct Message<'a> {
    method: &'a str,
    scheme: Cow<'a, str>,
    /// Lower case, without the scheme's default port (RFC 9421 §2.2.3).
    authority: Option<String>,
    path: &'a str,
    query: Option<&'a str>,
    request_target: Cow<'a, str>,
    headers: &'a HeaderMap,
}

impl<'a> Message<'a> {
    /// `fallback_scheme` when the request target does not say.
    fn of(req: &'a Request<Body>, fallback_scheme: &'static str) -> Message<'a> {
        let uri = req.uri();
        let scheme = match uri.scheme_str() {
            Some(s) => Cow::Owned(s.to_ascii_lowercase()),
            None => Cow::Borrowed(fallback_scheme),
        };
        let raw = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
        let authority = raw.map(|a| {
            // No user information in an authority component.
            let a = a.rsplit_once('@').map_or(a, |(_, host)| host);
            let a = a.to_ascii_lowercase();
            let default = match &*scheme {
                "http" => Some(":80"),
                "https" => Some(":443"),
                _ => None,
            };
            match default.and_then(|p| a.strip_suffix(p)) {
                Some(host) if !host.is_empty() => host.to_string(),
                _ => a,
            }
        });
        let path = match uri.path() {
            "" => "/",
            p => p,
        };
        // Absolute form on HTTP/1.x: the request target is the whole URI.
        let request_target = if req.version() < Version::HTTP_2 && uri.scheme().is_some() {
            Cow::Owned(uri.to_string())
        } else {
            match uri.path_and_query() {
                Some(pq) if !pq.as_str().is_empty() => Cow::Borrowed(pq.as_str()),
                _ => Cow::Borrowed(path),
            }
        };
        Message {
            method: req.method().as_str(),
            scheme,
            authority,
            path,
            query: uri.query(),
            request_target,
            headers: req.headers(),
        }
    }

    /// The component's value (RFC 9421 §2.1, §2.2), appended to `out`.
    fn append_value(&self, c: &Component, out: &mut Vec<u8>) -> Result<(), String> {
        let no_authority = || "the request has no authority (Host) to sign".to_string();
        match c {
            Component::Method => out.extend_from_slice(self.method.as_bytes()),
            Component::Scheme => out.extend_from_slice(self.scheme.as_bytes()),
            Component::Authority => {
                out.extend_from_slice(self.authority.as_ref().ok_or_else(no_authority)?.as_bytes())
            }
            Component::TargetUri => {
                let a = self.authority.as_ref().ok_or_else(no_authority)?;
                out.extend_from_slice(self.scheme.as_bytes());
                out.extend_from_slice(b"://");
                out.extend_from_slice(a.as_bytes());
                out.extend_from_slice(self.path.as_bytes());
                if let Some(q) = self.query {
                    out.push(b'?');
                    out.extend_from_slice(q.as_bytes());
                }
            }
            Component::RequestTarget => out.extend_from_slice(self.request_target.as_bytes()),
            Component::Path => out.extend_from_slice(self.path.as_bytes()),
            Component::Query => {
                out.push(b'?');
                out.extend_from_slice(self.query.unwrap_or("").as_bytes());
            }
            Component::Field(name) => {
                let mut any = false;
                for v in self.headers.get_all(name) {
                    if any {
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(trim_ows(v.as_bytes()));
                    any = true;
                }
                if !any {
                    return Err(format!(
                        "the signature covers `{name}`, which the request does not have"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t'));
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

/// The signature base of RFC 9421 §2.5: one `"name": value` line per covered
/// component, then `"@signature-params": ` and the serialized signature parameters
/// (no final newline).
fn signature_base(
    msg: &Message<'_>,
    covered: &[Component],
    params: &str,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64 * (covered.len() + 1) + params.len());
    for c in covered {
        // Component names are tokens or `@name`: nothing to escape in the quotes.
        out.push(b'"');
        out.extend_from_slice(c.name().as_bytes());
        out.extend_from_slice(b"\": ");
        msg.append_value(c, &mut out)?;
        out.push(b'\n');
    }
    out.extend_from_slice(b"\"@signature-params\": ");
    out.extend_from_slice(params.as_bytes());
    Ok(out)
}

/// HMAC-SHA256 of the base with the secret, checked in constant time.
fn hmac_ok(secret: &[u8], base: &[u8], signature: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, base, signature).is_ok()
}

/// A digest algorithm of RFC 9530 this policy checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DigestAlg {
    Sha256,
    Sha512,
}

/// The digests of `Content-Digest` this policy understands (others are ignored, as
/// RFC 9530 says); at least one is required.
fn expected_digests(headers: &HeaderMap) -> Result<Vec<(DigestAlg, Vec<u8>)>, String> {
    let raw = joined(headers, &CONTENT_DIGEST)
        .ok_or_else(|| "the request has no Content-Digest header".to_string())?;
    let dict = sf::parse_dictionary(&raw)
        .map_err(|e| format!("the Content-Digest header is malformed: {e}"))?;
    let mut out = Vec::new();
    for (k, m) in dict {
        let alg = match k.as_str() {
            "sha-256" => DigestAlg::Sha256,
            "sha-512" => DigestAlg::Sha512,
            _ => continue,
        };
        match m {
            sf::Member::Item(sf::Item {
                bare: sf::Bare::Bytes(b),
                ..
            }) => out.push((alg, b)),
            _ => {
                return Err(format!(
                    "the Content-Digest `{k}` is not a byte sequence (`{k}=:base64:`)"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err("the Content-Digest header has no sha-256 or sha-512 digest".into());
    }
    Ok(out)
}

/// Whether every expected digest is the body's.
fn digests_match(want: &[(DigestAlg, Vec<u8>)], body: &[u8]) -> bool {
    want.iter().all(|(alg, d)| {
        let a = match alg {
            DigestAlg::Sha256 => &digest::SHA256,
            DigestAlg::Sha512 => &digest::SHA512,
        };
        digest::digest(a, body).as_ref() == d.as_slice()
    })
}

/// Every field line of `name` joined with `, ` (how a structured field split over
/// several lines is parsed), or None without any.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for v in headers.get_all(name) {
        match &mut out {
            None => out = Some(v.as_bytes().to_vec()),
            Some(o) => {
                o.extend_from_slice(b", ");
                o.extend_from_slice(v.as_bytes());
            }
        }
    }
    out
}

/// Whether a request has a body (a positive `Content-Length`, or a streamed one).
fn has_body(req: &Request<Body>) -> bool {
    match declared_length(req.headers()) {
        Some(n) => n > 0,
        None => !http_body::Body::is_end_stream(req.body()),
    }
}

fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// `s` cut to at most `max` bytes (at a character boundary), with `…` when cut.
fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// What a verified signature leaves to do.
struct Verified {
    consumer: Arc<portico_store::Consumer>,
    /// The `(keyid, nonce)` key and until when it is remembered.
    nonce: Option<(u128, i64)>,
    /// The digests the body must have (`content-digest` covered).
    digests: Option<Vec<(DigestAlg, Vec<u8>)>>,
}

/// One `Signature-Input` member that may be checked: its label, covered components,
/// parameters and key.
struct Candidate<'a> {
    label: &'a str,
    items: &'a [sf::Item],
    params: &'a sf::Params,
    key_id: &'a str,
    entry: HmacEntry,
}

impl Candidate<'_> {
    fn param(&self, name: &str) -> Option<&sf::Bare> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// `(keyid, nonce)` pairs recently accepted, with until when (Unix seconds) each is
/// kept. One per gateway process, shared by every `hmac-auth` instance (key ids are
/// unique across consumers, and a reload keeps what was seen); a cluster of gateways
/// needs a shared store for cluster-wide replay protection.
pub struct NonceCache {
    max: usize,
    inner: Mutex<NonceInner>,
}

#[derive(Default)]
struct NonceInner {
    until: HashMap<u128, i64>,
    next_sweep: i64,
}

/// What remembering a nonce found.
#[derive(Debug, PartialEq, Eq)]
enum Remember {
    Fresh,
    Replayed,
    Full,
}

impl NonceCache {
    pub fn new(max: usize) -> NonceCache {
        NonceCache {
            max,
            inner: Mutex::new(NonceInner::default()),
        }
    }

    /// The process's cache.
    pub fn shared() -> Arc<NonceCache> {
        static SHARED: OnceLock<Arc<NonceCache>> = OnceLock::new();
        SHARED
            .get_or_init(|| Arc::new(NonceCache::new(NONCE_CACHE_MAX)))
            .clone()
    }

    /// Pairs remembered (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.inner.lock().until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn seen(&self, k: u128, now: i64) -> bool {
        self.inner.lock().until.get(&k).is_some_and(|&u| now <= u)
    }

    /// Remember `k` until `until`, unless it is remembered already.
    fn remember(&self, k: u128, until: i64, now: i64) -> Remember {
        let mut g = self.inner.lock();
        if now >= g.next_sweep || g.until.len() >= self.max {
            g.until.retain(|_, u| now <= *u);
            g.next_sweep = now.saturating_add(SWEEP_EVERY);
        }
        if g.until.get(&k).is_some_and(|&u| now <= u) {
            return Remember::Replayed;
        }
        if g.until.len() >= self.max {
            return Remember::Full;
        }
        g.until.insert(k, until);
        Remember::Fresh
    }
}

/// The cache key of a `(keyid, nonce)` pair: 128 bits of their SHA-256 (neither
/// contains a NUL: both are structured-field strings).
fn nonce_key(key_id: &str, nonce: &str) -> u128 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(key_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(nonce.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(b)
}

pub struct HmacAuth {
    label: Option<String>,
    required: Vec<Component>,
    skew: i64,
    require_nonce: bool,
    max_body: u64,
    scheme: Option<Scheme>,
    forward: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    /// `Accept-Signature` on 401s, without and with `content-digest`.
    accept: HeaderValue,
    accept_with_body: HeaderValue,
    identity: Arc<Identity>,
    nonces: Arc<NonceCache>,
}

impl HmacAuth {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        Self::with_nonce_cache(s, identity, NonceCache::shared())
    }

    /// With its own nonce cache (tests).
    pub fn with_nonce_cache(
        s: Settings,
        identity: Arc<Identity>,
        nonces: Arc<NonceCache>,
    ) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        if let Some(l) = &s.label {
            if !sf::is_key(l) {
                errs.push((
                    KeyPath::root().key("label"),
                    format!(
                        "`{}` is not a signature label: lower-case letters, digits, `_`, `-`, \
                         `.` and `*`, starting with a letter or `*`",
                        clip(l, 40)
                    ),
                ));
            }
        }
        let mut required: Vec<Component> = Vec::new();
        for (i, r) in s.required_components.iter().enumerate() {
            match Component::parse(r) {
                Ok(c) if !required.contains(&c) => required.push(c),
                Ok(_) => {}
                Err(e) => errs.push((KeyPath::root().key("required_components").index(i), e)),
            }
        }
        let skew = i64::try_from(s.clock_skew.0.as_secs()).unwrap_or(i64::MAX);
        if skew == 0 {
            errs.push((
                KeyPath::root().key("clock_skew"),
                "must be at least 1s".into(),
            ));
        }
        if s.max_body.0 == 0 {
            errs.push((
                KeyPath::root().key("max_body"),
                "must be at least 1 byte".into(),
            ));
        }
        if let Some(a) = &s.anonymous {
            if let Err(e) = portico_config::identity::check_name(a) {
                errs.push((KeyPath::root().key("anonymous"), e));
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let label = s.label.as_deref().unwrap_or("sig1");
        let accept = accept_signature(label, &required, false);
        let accept_with_body = accept_signature(label, &required, true);
        let challenge = HeaderValue::from_str(&format!("Signature realm=\"{REALM}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("Signature"));
        Ok(HmacAuth {
            label: s.label,
            required,
            skew,
            require_nonce: s.require_nonce,
            max_body: s.max_body.0,
            scheme: s.scheme,
            forward: s.forward_credentials,
            anonymous: s.anonymous,
            challenge,
            accept,
            accept_with_body,
            identity,
            nonces,
        })
    }

    /// A 401 with the challenge and the `Accept-Signature` for this request.
    fn refuse(&self, message: impl Into<Cow<'static, str>>, body: bool) -> GatewayError {
        let accept = if body {
            &self.accept_with_body
        } else {
            &self.accept
        };
        GatewayError::new(ErrorKind::Unauthorized, message)
            .with_header(WWW_AUTHENTICATE, self.challenge.clone())
            .with_header(ACCEPT_SIGNATURE, accept.clone())
    }

    /// The request phase, with "now" (Unix seconds) given.
    pub fn step<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>, now: i64) -> Step<'a> {
        let body = has_body(req);
        let fallback = match self.scheme {
            Some(Scheme::Https) => "https",
            Some(Scheme::Http) => "http",
            None if ctx.client_cert.is_some() => "https",
            None => "http",
        };
        let mut v = match self.verify_head(req, body, fallback, now) {
            Ok(Some(v)) => v,
            Ok(None) => return Step::cont(),
            Err(e) => return Step::error(e),
        };
        if let Some((k, _)) = v.nonce {
            if self.nonces.seen(k, now) {
                return Step::error(self.refuse("the nonce was already used (replayed)", body));
            }
        }
        let Some(want) = v.digests.take() else {
            return Step::Ready(Some(self.accept(ctx, req, v, body, now)));
        };
        if !body {
            return Step::Ready(Some(if digests_match(&want, b"") {
                self.accept(ctx, req, v, body, now)
            } else {
                Flow::Error(self.digest_mismatch(body))
            }));
        }
        if let Some(n) = declared_length(req.headers()) {
            if n > self.max_body {
                return Step::error(self.too_large(Some(n)));
            }
        }
        Step::Pending(Box::pin(async move {
            let bytes = match self.read_body(req.body_mut()).await {
                Ok(b) => b,
                Err(e) => return Flow::Error(e),
            };
            if !digests_match(&want, &bytes) {
                return Flow::Error(self.digest_mismatch(body));
            }
            let h = req.headers_mut();
            h.remove(TRANSFER_ENCODING);
            h.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            *req.body_mut() = if bytes.is_empty() {
                Body::Empty
            } else {
                Body::full(bytes)
            };
            self.accept(ctx, req, v, body, now)
        }))
    }

    fn digest_mismatch(&self, body: bool) -> GatewayError {
        self.refuse(
            "the body does not match its Content-Digest (digest mismatch)",
            body,
        )
    }

    /// The signature checked (all but the body): None when the request carries no
    /// signature at all.
    fn verify_head(
        &self,
        req: &Request<Body>,
        body: bool,
        fallback_scheme: &'static str,
        now: i64,
    ) -> Result<Option<Verified>, GatewayError> {
        let input = joined(req.headers(), &SIGNATURE_INPUT);
        let signature = joined(req.headers(), &SIGNATURE);
        let (input, signature) =
            match (input, signature) {
                (None, None) => return Ok(None),
                (None, Some(_)) => {
                    return Err(self.refuse(
                        "the request has a Signature header but no Signature-Input",
                        body,
                    ))
                }
                (Some(_), None) => return Err(self.refuse(
                    "the request has a Signature-Input header but no Signature (missing signature)",
                    body,
                )),
                (Some(i), Some(s)) => (i, s),
            };
        let inputs = sf::parse_dictionary(&input).map_err(|e| {
            self.refuse(
                format!("the Signature-Input header is malformed: {e}"),
                body,
            )
        })?;
        let signatures = sf::parse_dictionary(&signature)
            .map_err(|e| self.refuse(format!("the Signature header is malformed: {e}"), body))?;
        let index = self.identity.index();
        let mut candidates = Vec::new();
        let mut first_problem: Option<Cow<'static, str>> = None;
        let mut labels = 0;
        for (label, member) in &inputs {
            if self.label.as_ref().is_some_and(|l| l != label) {
                continue;
            }
            labels += 1;
            let (items, params) = match member {
                sf::Member::InnerList(items, params) => (items, params),
                sf::Member::Item(_) => {
                    first_problem.get_or_insert(
                        "a Signature-Input member is not a list of components".into(),
                    );
                    continue;
                }
            };
            let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v);
            match param("alg") {
                None => {}
                Some(sf::Bare::String(a)) if a == ALG => {}
                Some(_) => {
                    first_problem.get_or_insert(
                        "the signature's algorithm is not supported (unsupported alg): only \
                         `hmac-sha256` is"
                            .into(),
                    );
                    continue;
                }
            }
            let key_id = match param("keyid") {
                Some(sf::Bare::String(k)) => k.as_str(),
                Some(_) => {
                    first_problem.get_or_insert("the signature's `keyid` is not a string".into());
                    continue;
                }
                None => {
                    first_problem.get_or_insert("the signature has no `keyid`".into());
                    continue;
                }
            };
            let Some(entry) = index.hmac_key(key_id) else {
                first_problem.get_or_insert("the signature's key id is unknown".into());
                continue;
            };
            candidates.push(Candidate {
                label,
                items,
                params,
                key_id,
                entry: entry.clone(),
            });
        }
        drop(index);
        if candidates.is_empty() {
            let msg = match (&self.label, labels, first_problem) {
                (_, _, Some(p)) => p,
                (Some(l), 0, None) => format!("the request has no signature labelled `{l}`").into(),
                _ => "the Signature-Input header lists no signature".into(),
            };
            return Err(self.refuse(msg, body));
        }
        let msg = Message::of(req, fallback_scheme);
        let mut first_err = None;
        for c in &candidates {
            match self.check(c, &signatures, &msg, body, now) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(self.refuse(
            first_err.unwrap_or(Cow::Borrowed("the signature does not match")),
            body,
        ))
    }

    /// Check one candidate; the refusal's message on failure.
    fn check(
        &self,
        c: &Candidate<'_>,
        signatures: &sf::Dictionary,
        msg: &Message<'_>,
        body: bool,
        now: i64,
    ) -> Result<Verified, Cow<'static, str>> {
        // Covered components.
        if c.items.len() > MAX_COMPONENTS {
            return Err(
                format!("the signature covers more than {MAX_COMPONENTS} components").into(),
            );
        }
        let mut covered: Vec<Component> = Vec::with_capacity(c.items.len());
        for it in c.items {
            let sf::Bare::String(name) = &it.bare else {
                return Err("a covered component is not a string".into());
            };
            if !it.params.is_empty() {
                return Err(format!(
                    "the component `{}` has parameters (`;sf`, `;key`, `;bs`, `;req`, `;tr`), \
                     which are not supported",
                    clip(name, 40)
                )
                .into());
            }
            let comp = Component::parse(name).map_err(Cow::Owned)?;
            if covered.contains(&comp) {
                return Err(format!("the signature covers `{}` twice", comp.name()).into());
            }
            covered.push(comp);
        }
        let content_digest = Component::Field(CONTENT_DIGEST);
        for r in self.required.iter().chain(body.then_some(&content_digest)) {
            if !covered.contains(r) {
                return Err(format!(
                    "the signature does not cover `{}`, which is required{}",
                    r.name(),
                    if *r == content_digest && body {
                        " when the request has a body"
                    } else {
                        ""
                    }
                )
                .into());
            }
        }
        // Times.
        let created = match c.param("created") {
            Some(sf::Bare::Integer(t)) => *t,
            Some(_) => return Err("the signature's `created` is not an integer".into()),
            None => return Err("the signature has no `created` time".into()),
        };
        if created > now.saturating_add(self.skew) {
            return Err(format!(
                "the signature's `created` time is {}s in the future; at most {}s of clock skew \
                 is allowed",
                created.saturating_sub(now),
                self.skew
            )
            .into());
        }
        if created < now.saturating_sub(self.skew) {
            return Err(format!(
                "the signature is too old: created {}s ago, at most {}s is allowed",
                now.saturating_sub(created),
                self.skew
            )
            .into());
        }
        match c.param("expires") {
            None => {}
            Some(sf::Bare::Integer(t)) if now > *t => {
                return Err("the signature has expired (`expires` has passed)".into())
            }
            Some(sf::Bare::Integer(_)) => {}
            Some(_) => return Err("the signature's `expires` is not an integer".into()),
        }
        let nonce = match c.param("nonce") {
            Some(sf::Bare::String(n)) => Some(n.as_str()),
            Some(_) => return Err("the signature's `nonce` is not a string".into()),
            None if self.require_nonce => return Err("the signature has no `nonce`".into()),
            None => None,
        };
        // The signature itself.
        let sig = match signatures.iter().find(|(k, _)| k == c.label) {
            Some((
                _,
                sf::Member::Item(sf::Item {
                    bare: sf::Bare::Bytes(b),
                    ..
                }),
            )) => b,
            Some(_) => {
                return Err("the Signature member is not a byte sequence (`:base64:`)".into())
            }
            None => {
                return Err(
                    "the Signature header has no signature for the label of Signature-Input \
                     (missing signature)"
                        .into(),
                )
            }
        };
        let mut params = String::with_capacity(128);
        sf::write_inner_list(c.items, c.params, &mut params);
        let base = signature_base(msg, &covered, &params).map_err(Cow::Owned)?;
        if !hmac_ok(&c.entry.secret, &base, sig) {
            return Err("the signature does not match the request (bad signature)".into());
        }
        let digests = if covered.contains(&content_digest) {
            Some(expected_digests(msg.headers).map_err(Cow::Owned)?)
        } else {
            None
        };
        let nonce = nonce.map(|n| {
            let until = created.max(now).saturating_add(self.skew);
            (nonce_key(c.key_id, n), until)
        });
        Ok(Verified {
            consumer: c.entry.consumer.clone(),
            nonce,
            digests,
        })
    }

    /// Remember the nonce, strip the credential, name the consumer.
    fn accept(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        v: Verified,
        body: bool,
        now: i64,
    ) -> Flow {
        if let Some((k, until)) = v.nonce {
            match self.nonces.remember(k, until, now) {
                Remember::Fresh => {}
                Remember::Replayed => {
                    return Flow::Error(self.refuse("the nonce was already used (replayed)", body))
                }
                Remember::Full => {
                    return Flow::Error(GatewayError::new(
                        ErrorKind::TooManyRequests,
                        "too many signed requests within the replay window; try again later",
                    ))
                }
            }
        }
        if !self.forward {
            let h = req.headers_mut();
            h.remove(SIGNATURE);
            h.remove(SIGNATURE_INPUT);
        }
        // The first policy that names a consumer decides (an earlier one may have
        // authenticated the request without naming one).
        if ctx.consumer.is_none() {
            ctx.consumer = Some(v.consumer);
            ctx.auth = Some("hmac-auth");
        }
        Flow::Continue
    }

    fn too_large(&self, len: Option<u64>) -> GatewayError {
        let msg = match len {
            Some(n) => format!(
                "the request body ({n} bytes) is larger than the {} bytes whose digest is checked",
                self.max_body
            ),
            None => format!(
                "the request body is larger than the {} bytes whose digest is checked",
                self.max_body
            ),
        };
        let mut e = GatewayError::new(ErrorKind::PayloadTooLarge, msg);
        e.close = true;
        e
    }

    /// The whole body (at most `max_body`), or the error to answer. On 413 the rest
    /// of the body stays in `body`, for the pipeline to discard.
    async fn read_body(&self, body: &mut Body) -> Result<Bytes, GatewayError> {
        crate::body::read_limited(body, None, self.max_body)
            .await
            .map_err(|e| e.or_else(|| self.too_large(None)))
    }
}

/// `Accept-Signature` (RFC 9421 §5.1): the components required, `alg` and `created`.
fn accept_signature(label: &str, required: &[Component], body: bool) -> HeaderValue {
    let mut items: Vec<sf::Item> = required
        .iter()
        .map(|c| sf::Item {
            bare: sf::Bare::String(c.name().to_string()),
            params: Vec::new(),
        })
        .collect();
    let cd = Component::Field(CONTENT_DIGEST);
    if body && !required.contains(&cd) {
        items.push(sf::Item {
            bare: sf::Bare::String(cd.name().to_string()),
            params: Vec::new(),
        });
    }
    let params = vec![
        ("alg".to_string(), sf::Bare::String(ALG.into())),
        ("created".to_string(), sf::Bare::Boolean(true)),
    ];
    let mut v = format!("{label}=");
    sf::write_inner_list(&items, &params, &mut v);
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("sig1=()"))
}

impl Policy for HmacAuth {
    fn name(&self) -> &'static str {
        "hmac-auth"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        self.step(ctx, req, now_secs())
    }
}

/// The part of RFC 8941 (structured fields) this policy needs: dictionaries whose
/// members are items or inner lists, with parameters, and the canonical serialization
/// of an inner list. Strict: anything the RFC's parsing algorithms refuse is refused,
/// and so are keys repeated in a dictionary or in parameters (which the RFC resolves
/// silently, letting two readers see different values).
mod sf {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    use std::fmt::Write as _;

    /// Standard base64; `=` padding optional on input (RFC 8941 §4.2.7), written on output.
    const B64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Bare {
        Integer(i64),
        /// In thousandths.
        Decimal(i64),
        String(String),
        Token(String),
        Bytes(Vec<u8>),
        Boolean(bool),
    }

    pub type Params = Vec<(String, Bare)>;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Item {
        pub bare: Bare,
        pub params: Params,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Member {
        Item(Item),
        InnerList(Vec<Item>, Params),
    }

    pub type Dictionary = Vec<(String, Member)>;

    pub type Error = &'static str;

    /// Whether `s` is a valid key.
    pub fn is_key(s: &str) -> bool {
        let b = s.as_bytes();
        matches!(b.first(), Some(c) if c.is_ascii_lowercase() || *c == b'*')
            && b.iter().all(|&c| is_key_char(c))
    }

    fn is_key_char(c: u8) -> bool {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.' | b'*')
    }

    fn is_tchar(c: u8) -> bool {
        c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
    }

    /// A whole field value (the field lines joined with `, `) as a dictionary.
    pub fn parse_dictionary(input: &[u8]) -> Result<Dictionary, Error> {
        let mut p = Parser { s: input, i: 0 };
        p.skip_sp();
        let mut out: Dictionary = Vec::new();
        while !p.done() {
            let key = p.key()?;
            let member = if p.eat(b'=') {
                if p.peek() == Some(b'(') {
                    p.inner_list()?
                } else {
                    Member::Item(p.item()?)
                }
            } else {
                Member::Item(Item {
                    bare: Bare::Boolean(true),
                    params: p.params()?,
                })
            };
            if out.iter().any(|(k, _)| *k == key) {
                return Err("a key appears twice");
            }
            out.push((key, member));
            p.skip_ows();
            if p.done() {
                break;
            }
            if !p.eat(b',') {
                return Err("expected `,` between members");
            }
            p.skip_ows();
            if p.done() {
                return Err("a trailing `,`");
            }
        }
        Ok(out)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn done(&self) -> bool {
            self.i >= self.s.len()
        }

        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }

        fn eat(&mut self, c: u8) -> bool {
            let hit = self.peek() == Some(c);
            if hit {
                self.i += 1;
            }
            hit
        }

        fn skip_sp(&mut self) {
            while self.peek() == Some(b' ') {
                self.i += 1;
            }
        }

        fn skip_ows(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t')) {
                self.i += 1;
            }
        }

        /// The ASCII text of `start..self.i`.
        fn text(&self, start: usize) -> String {
            self.s
                .get(start..self.i)
                .map(|b| b.iter().map(|&c| char::from(c)).collect())
                .unwrap_or_default()
        }

        fn key(&mut self) -> Result<String, Error> {
            match self.peek() {
                Some(c) if c.is_ascii_lowercase() || c == b'*' => {}
                _ => return Err("a key must start with a lower-case letter or `*`"),
            }
            let start = self.i;
            while self.peek().is_some_and(is_key_char) {
                self.i += 1;
            }
            Ok(self.text(start))
        }

        fn inner_list(&mut self) -> Result<Member, Error> {
            self.i += 1; // (
            let mut items = Vec::new();
            loop {
                self.skip_sp();
                match self.peek() {
                    None => return Err("an inner list is not closed"),
                    Some(b')') => {
                        self.i += 1;
                        let params = self.params()?;
                        return Ok(Member::InnerList(items, params));
                    }
                    Some(_) => {
                        items.push(self.item()?);
                        if !matches!(self.peek(), Some(b' ' | b')')) {
                            return Err("expected a space or `)` after an inner list item");
                        }
                    }
                }
            }
        }

        fn item(&mut self) -> Result<Item, Error> {
            let bare = self.bare()?;
            let params = self.params()?;
            Ok(Item { bare, params })
        }

        fn params(&mut self) -> Result<Params, Error> {
            let mut out: Params = Vec::new();
            while self.eat(b';') {
                self.skip_sp();
                let key = self.key()?;
                let value = if self.eat(b'=') {
                    self.bare()?
                } else {
                    Bare::Boolean(true)
                };
                if out.iter().any(|(k, _)| *k == key) {
                    return Err("a parameter appears twice");
                }
                out.push((key, value));
            }
            Ok(out)
        }

        fn bare(&mut self) -> Result<Bare, Error> {
            match self.peek() {
                Some(b'-' | b'0'..=b'9') => self.number(),
                Some(b'"') => self.string(),
                Some(b':') => self.bytes(),
                Some(b'?') => self.boolean(),
                Some(c) if c.is_ascii_alphabetic() || c == b'*' => Ok(self.token()),
                _ => Err("expected an item"),
            }
        }

        fn number(&mut self) -> Result<Bare, Error> {
            let neg = self.eat(b'-');
            let start = self.i;
            let mut dot = None;
            while let Some(c) = self.peek() {
                match c {
                    b'0'..=b'9' => self.i += 1,
                    b'.' if dot.is_none() => {
                        dot = Some(self.i);
                        self.i += 1;
                    }
                    _ => break,
                }
            }
            let value = |digits: &[u8]| {
                digits
                    .iter()
                    .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
            };
            let sign = if neg { -1 } else { 1 };
            match dot {
                None => {
                    let digits = self.s.get(start..self.i).unwrap_or_default();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err("an integer has 1 to 15 digits");
                    }
                    Ok(Bare::Integer(sign * value(digits)))
                }
                Some(d) => {
                    let int = self.s.get(start..d).unwrap_or_default();
                    let frac = self.s.get(d + 1..self.i).unwrap_or_default();
                    if int.is_empty() || int.len() > 12 || frac.is_empty() || frac.len() > 3 {
                        return Err("a decimal has 1 to 12 digits, `.` and 1 to 3 digits");
                    }
                    let scale = match frac.len() {
                        1 => 100,
                        2 => 10,
                        _ => 1,
                    };
                    Ok(Bare::Decimal(
                        sign * (value(int) * 1000 + value(frac) * scale),
                    ))
                }
            }
        }

        fn string(&mut self) -> Result<Bare, Error> {
            self.i += 1; // "
            let mut out = String::new();
            loop {
                let Some(c) = self.peek() else {
                    return Err("a string is not closed");
                };
                self.i += 1;
                match c {
                    b'\\' => match self.peek() {
                        Some(e @ (b'"' | b'\\')) => {
                            self.i += 1;
                            out.push(char::from(e));
                        }
                        _ => return Err("a string has an escape other than \\\" or \\\\"),
                    },
                    b'"' => return Ok(Bare::String(out)),
                    0x20..=0x7e => out.push(char::from(c)),
                    _ => return Err("a string has a character outside printable ASCII"),
                }
            }
        }

        fn token(&mut self) -> Bare {
            let start = self.i;
            self.i += 1;
            while self
                .peek()
                .is_some_and(|c| is_tchar(c) || c == b':' || c == b'/')
            {
                self.i += 1;
            }
            Bare::Token(self.text(start))
        }

        fn bytes(&mut self) -> Result<Bare, Error> {
            self.i += 1; // :
            let start = self.i;
            loop {
                match self.peek() {
                    None => return Err("a byte sequence is not closed"),
                    Some(b':') => break,
                    Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=') => {
                        self.i += 1
                    }
                    Some(_) => return Err("a byte sequence has a character outside base64"),
                }
            }
            let b64 = self.s.get(start..self.i).unwrap_or_default();
            self.i += 1; // :
            B64.decode(b64)
                .map(Bare::Bytes)
                .map_err(|_| "a byte sequence is not valid base64")
        }

        fn boolean(&mut self) -> Result<Bare, Error> {
            self.i += 1; // ?
            let v = match self.peek() {
                Some(b'1') => true,
                Some(b'0') => false,
                _ => return Err("a boolean is ?0 or ?1"),
            };
            self.i += 1;
            Ok(Bare::Boolean(v))
        }
    }

    /// The canonical serialization of an inner list with its parameters (RFC 8941
    /// §4.1.1.1): items and parameters in the order given.
    pub fn write_inner_list(items: &[Item], params: &Params, out: &mut String) {
        out.push('(');
        for (i, it) in items.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            write_bare(&it.bare, out);
            write_params(&it.params, out);
        }
        out.push(')');
        write_params(params, out);
    }

    fn write_params(params: &Params, out: &mut String) {
        for (k, v) in params {
            out.push(';');
            out.push_str(k);
            if *v != Bare::Boolean(true) {
                out.push('=');
                write_bare(v, out);
            }
        }
    }

    fn write_bare(b: &Bare, out: &mut String) {
        match b {
            Bare::Integer(n) => {
                let _ = write!(out, "{n}");
            }
            Bare::Decimal(v) => {
                if *v < 0 {
                    out.push('-');
                }
                let a = v.unsigned_abs();
                let frac = format!("{:03}", a % 1000);
                let frac = frac.trim_end_matches('0');
                let _ = write!(
                    out,
                    "{}.{}",
                    a / 1000,
                    if frac.is_empty() { "0" } else { frac }
                );
            }
            Bare::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
            Bare::Token(t) => out.push_str(t),
            Bare::Bytes(b) => {
                out.push(':');
                out.push_str(&B64.encode(b));
                out.push(':');
            }
            Bare::Boolean(v) => out.push_str(if *v { "?1" } else { "?0" }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::parse;
    use base64::Engine as _;
    use http_body_util::BodyExt;
    use portico_config::model::Secret;
    use portico_config::{ConsumerDecl, CredentialDecl};
    use serde_json::{json, Value};
    use std::net::{IpAddr, Ipv4Addr};

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
    const T: i64 = 1_700_000_000;
    const ALICE_SECRET: &str = "alice-shared-secret-0123456789";

    fn identity() -> Arc<Identity> {
        let id = Identity::detached();
        let decls = vec![
            ConsumerDecl {
                name: "alice".into(),
                groups: vec!["gold".into()],
                metadata: Default::default(),
                credentials: vec![CredentialDecl::HmacAuth {
                    key_id: "alice-1".into(),
                    secret: Secret(ALICE_SECRET.into()),
                }],
            },
            ConsumerDecl {
                name: "bob".into(),
                groups: vec![],
                metadata: Default::default(),
                credentials: vec![CredentialDecl::HmacAuth {
                    key_id: "bob-1".into(),
                    secret: Secret("bob-shared-secret-0123456789".into()),
                }],
            },
        ];
        id.set_declared(portico_store::Declared::compile(&decls, None).unwrap())
            .unwrap();
        Arc::new(id)
    }

    fn build(v: Value) -> Result<HmacAuth, SettingsErrors> {
        HmacAuth::with_nonce_cache(parse(&v)?, identity(), Arc::new(NonceCache::new(1000)))
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

    fn content_digest(body: &[u8]) -> String {
        format!(
            "sha-256=:{}:",
            B64.encode(digest::digest(&digest::SHA256, body).as_ref())
        )
    }

    /// The test's own signer: the base written out by hand from the request (origin
    /// form, `Host`), independent of the policy's code.
    fn sign(
        req: &mut Request<Body>,
        label: &str,
        components: &[&str],
        params: &str,
        secret: &[u8],
    ) {
        let mut base = String::new();
        for c in components {
            let v = match *c {
                "@method" => req.method().to_string(),
                "@path" => req.uri().path().to_string(),
                "@query" => format!("?{}", req.uri().query().unwrap_or("")),
                "@authority" => req.headers()["host"].to_str().unwrap().to_lowercase(),
                "@target-uri" => format!(
                    "http://{}{}",
                    req.headers()["host"].to_str().unwrap(),
                    req.uri().path_and_query().unwrap()
                ),
                h => req
                    .headers()
                    .get_all(h)
                    .iter()
                    .map(|v| v.to_str().unwrap().trim().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            base.push_str(&format!("\"{c}\": {v}\n"));
        }
        let list: Vec<String> = components.iter().map(|c| format!("\"{c}\"")).collect();
        let sig_params = format!("({}){params}", list.join(" "));
        base.push_str(&format!("\"@signature-params\": {sig_params}"));
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, base.as_bytes());
        let h = req.headers_mut();
        h.append(
            SIGNATURE_INPUT,
            HeaderValue::from_str(&format!("{label}={sig_params}")).unwrap(),
        );
        h.append(
            SIGNATURE,
            HeaderValue::from_str(&format!("{label}=:{}:", B64.encode(tag.as_ref()))).unwrap(),
        );
    }

    fn params(created: i64, nonce: &str, key_id: &str) -> String {
        format!(";created={created};nonce=\"{nonce}\";keyid=\"{key_id}\";alg=\"hmac-sha256\"")
    }

    const GET: &[&str] = &["@method", "@path", "@authority"];
    const POST: &[&str] = &["@method", "@path", "@authority", "content-digest"];

    fn get(nonce: &str, created: i64) -> Request<Body> {
        let mut r = request("GET", "/things?a=1", &[("host", "API.example.com")], None);
        sign(
            &mut r,
            "sig1",
            GET,
            &params(created, nonce, "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        r
    }

    async fn run(p: &HmacAuth, req: &mut Request<Body>, now: i64) -> Result<Ctx, GatewayError> {
        let mut c = ctx();
        match p.step(&mut c, req, now).await {
            Flow::Continue => Ok(c),
            Flow::Error(e) => Err(e),
            Flow::Respond(_) => panic!("answered"),
        }
    }

    async fn refused(p: &HmacAuth, req: &mut Request<Body>, now: i64) -> GatewayError {
        match run(p, req, now).await {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    fn header<'a>(e: &'a GatewayError, name: &str) -> Option<&'a str> {
        e.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn rfc9421_b25_hmac_sha256_vector() {
        // The test request of RFC 9421 Appendix B.2 and the signature of B.2.5.
        let body = "{\"hello\": \"world\"}";
        let mut req = request(
            "POST",
            "/foo?param=Value&Pet=dog",
            &[
                ("host", "example.com"),
                ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
                ("content-type", "application/json"),
                (
                    "content-digest",
                    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
                ),
            ],
            Some(body),
        );
        req.headers_mut().insert(
            SIGNATURE_INPUT,
            HeaderValue::from_static(
                "sig-b25=(\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\"",
            ),
        );
        let inputs = sf::parse_dictionary(req.headers()[SIGNATURE_INPUT].as_bytes()).unwrap();
        let (label, sf::Member::InnerList(items, ps)) = &inputs[0] else {
            panic!("{inputs:?}")
        };
        assert_eq!(label, "sig-b25");
        let covered: Vec<Component> = items
            .iter()
            .map(|i| match &i.bare {
                sf::Bare::String(s) => Component::parse(s).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        let mut serialized = String::new();
        sf::write_inner_list(items, ps, &mut serialized);
        let base = signature_base(&Message::of(&req, "https"), &covered, &serialized).unwrap();
        let expected = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\
                        \"@authority\": example.com\n\
                        \"content-type\": application/json\n\
                        \"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\"";
        assert_eq!(String::from_utf8(base.clone()).unwrap(), expected);
        let secret = B64
            .decode("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==")
            .unwrap();
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &secret), &base);
        assert_eq!(
            B64.encode(tag.as_ref()),
            "pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8="
        );
        let sigs = sf::parse_dictionary(b"sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:")
            .unwrap();
        let sf::Member::Item(sf::Item {
            bare: sf::Bare::Bytes(sig),
            ..
        }) = &sigs[0].1
        else {
            panic!("{sigs:?}")
        };
        assert!(hmac_ok(&secret, &base, sig));
        assert!(!hmac_ok(b"another secret", &base, sig));
        // The vector's body matches its Content-Digest (sha-512).
        let want = expected_digests(req.headers()).unwrap();
        assert!(digests_match(&want, body.as_bytes()));
        assert!(!digests_match(&want, b"{\"hello\": \"World\"}"));
    }

    #[test]
    fn derived_components() {
        let req = request(
            "GET",
            "/a%20b/c?x=1&y",
            &[
                ("host", "Example.COM:443"),
                ("x-multi", " one "),
                ("x-multi", "two"),
            ],
            None,
        );
        let m = Message::of(&req, "https");
        let v = |c: &str| {
            let mut out = Vec::new();
            m.append_value(&Component::parse(c).unwrap(), &mut out)
                .map(|()| String::from_utf8(out).unwrap())
        };
        assert_eq!(v("@method").unwrap(), "GET");
        assert_eq!(v("@authority").unwrap(), "example.com");
        assert_eq!(v("@scheme").unwrap(), "https");
        assert_eq!(v("@path").unwrap(), "/a%20b/c");
        assert_eq!(v("@query").unwrap(), "?x=1&y");
        assert_eq!(v("@request-target").unwrap(), "/a%20b/c?x=1&y");
        assert_eq!(
            v("@target-uri").unwrap(),
            "https://example.com/a%20b/c?x=1&y"
        );
        assert_eq!(v("x-multi").unwrap(), "one, two");
        assert!(v("x-none").unwrap_err().contains("does not have"));
        // A non-default port stays; http's default goes; no query is `?`.
        let req = request("GET", "/", &[("host", "h:8443")], None);
        assert_eq!(
            Message::of(&req, "https").authority.as_deref(),
            Some("h:8443")
        );
        let req = request("GET", "/", &[("host", "h:80")], None);
        let m = Message::of(&req, "http");
        assert_eq!(m.authority.as_deref(), Some("h"));
        let mut out = Vec::new();
        m.append_value(&Component::Query, &mut out).unwrap();
        assert_eq!(out, b"?");
        // HTTP/2 style: the URI carries scheme and authority.
        let req = request("GET", "https://H.example:443/p?q", &[], None);
        let mut req = req;
        *req.version_mut() = Version::HTTP_2;
        let m = Message::of(&req, "http");
        assert_eq!(m.authority.as_deref(), Some("h.example"));
        assert_eq!(&*m.scheme, "https");
        assert_eq!(&*m.request_target, "/p?q");
        // Unsupported names.
        for bad in [
            "@status",
            "@query-param",
            "@signature-params",
            "@nope",
            "X-Up",
        ] {
            assert!(Component::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn structured_fields_are_parsed_strictly() {
        let d = sf::parse_dictionary(
            b"  a=( \"x\"  \"y\";p=1 );n=-12;d=1.50;t=tok/en:1;b=?0;s=\"q\\\"\\\\\";x, \tk=:aGk=:, f",
        )
        .unwrap();
        assert_eq!(d.len(), 3);
        let sf::Member::InnerList(items, ps) = &d[0].1 else {
            panic!()
        };
        let mut out = String::new();
        sf::write_inner_list(items, ps, &mut out);
        // Canonical: one space between items, `true` parameters without a value.
        assert_eq!(
            out,
            "(\"x\" \"y\";p=1);n=-12;d=1.5;t=tok/en:1;b=?0;s=\"q\\\"\\\\\";x"
        );
        assert_eq!(
            d[1].1,
            sf::Member::Item(sf::Item {
                bare: sf::Bare::Bytes(b"hi".to_vec()),
                params: vec![]
            })
        );
        assert_eq!(
            d[2].1,
            sf::Member::Item(sf::Item {
                bare: sf::Bare::Boolean(true),
                params: vec![]
            })
        );
        // Unpadded base64 is accepted.
        assert!(sf::parse_dictionary(b"k=:aGk:").is_ok());
        assert_eq!(sf::parse_dictionary(b"").unwrap(), vec![]);
        for bad in [
            &b"A=1"[..],
            b"a=1,",
            b"a=1 b=2",
            b"a=1, a=2",
            b"a=(\"x\";p;p)",
            b"a=(\"x\"",
            b"a=(\"x\"\"y\")",
            b"a=\"unterminated",
            b"a=\"bad\\escape\"",
            b"a=\"\xc3\xa9\"",
            b"a=:not base64!:",
            b"a=:aGk=",
            b"a=1234567890123456",
            b"a=1.2345",
            b"a=1.",
            b"a=-",
            b"a=?2",
            b"a=%",
            b"a=1;",
        ] {
            assert!(
                sf::parse_dictionary(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(sf::is_key("sig-b25") && sf::is_key("*x") && !sf::is_key("Sig") && !sf::is_key(""));
    }

    #[tokio::test]
    async fn valid_get_and_post() {
        let p = build(json!({})).unwrap();
        // GET: the consumer is named, the signature headers are gone.
        let mut req = get("n-1", T);
        let c = run(&p, &mut req, T).await.unwrap();
        assert_eq!(c.consumer.as_ref().unwrap().name, "alice");
        assert_eq!(c.auth, Some("hmac-auth"));
        assert!(req.headers().get(SIGNATURE).is_none());
        assert!(req.headers().get(SIGNATURE_INPUT).is_none());

        // POST with a body and its digest: the identical bytes go on.
        let body = "{\"a\": [1, 2.50, \"\\u00e9\"]}\n";
        let mut req = request(
            "POST",
            "/things",
            &[
                ("host", "api.example.com"),
                ("content-digest", &content_digest(body.as_bytes())),
            ],
            Some(body),
        );
        sign(
            &mut req,
            "sig1",
            POST,
            &params(T, "n-2", "bob-1"),
            b"bob-shared-secret-0123456789",
        );
        let c = run(&p, &mut req, T + 10).await.unwrap();
        assert_eq!(c.consumer.as_ref().unwrap().name, "bob");
        assert_eq!(
            req.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert!(req.headers().get("content-digest").is_some());
        let b = std::mem::take(req.body_mut())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(b, body.as_bytes());

        // No signature at all: not this policy's credential.
        let mut req = request("GET", "/", &[("host", "h")], None);
        let c = run(&p, &mut req, T).await.unwrap();
        assert!(c.consumer.is_none() && c.auth.is_none());

        // forward_credentials keeps the headers; `expires` in the future is fine.
        let p = build(json!({"forward_credentials": true})).unwrap();
        let mut req = request("GET", "/x", &[("host", "h")], None);
        let ps = format!("{};expires={}", params(T, "n-3", "alice-1"), T + 60);
        sign(&mut req, "sig1", GET, &ps, ALICE_SECRET.as_bytes());
        run(&p, &mut req, T).await.unwrap();
        assert!(req.headers().get(SIGNATURE).is_some());
        assert!(req.headers().get(SIGNATURE_INPUT).is_some());
    }

    #[tokio::test]
    async fn created_must_be_within_the_skew_and_expires_is_honoured() {
        let p = build(json!({"clock_skew": "60s"})).unwrap();
        // At the edges: accepted.
        run(&p, &mut get("e-1", T - 60), T).await.unwrap();
        run(&p, &mut get("e-2", T + 60), T).await.unwrap();
        // Beyond: refused, with the challenge.
        let e = refused(&p, &mut get("e-3", T - 61), T).await;
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert!(e.message.contains("too old"), "{}", e.message);
        assert_eq!(
            header(&e, "www-authenticate"),
            Some("Signature realm=\"portico\"")
        );
        let e = refused(&p, &mut get("e-4", T + 61), T).await;
        assert!(e.message.contains("in the future"), "{}", e.message);
        // No `created`, or not an integer.
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            ";nonce=\"e-5\";keyid=\"alice-1\"",
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("no `created`"), "{}", e.message);
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            ";created=\"1\";nonce=\"e-6\";keyid=\"alice-1\"",
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("not an integer"), "{}", e.message);
        // `expires` passed.
        let mut req = request("GET", "/", &[("host", "h")], None);
        let ps = format!("{};expires={}", params(T - 10, "e-7", "alice-1"), T - 1);
        sign(&mut req, "s", GET, &ps, ALICE_SECRET.as_bytes());
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("expired"), "{}", e.message);
    }

    #[tokio::test]
    async fn nonces_are_single_use() {
        let cache = Arc::new(NonceCache::new(1000));
        let p = HmacAuth::with_nonce_cache(
            parse(&json!({"clock_skew": "60s"})).unwrap(),
            identity(),
            cache.clone(),
        )
        .unwrap();
        run(&p, &mut get("r-1", T), T).await.unwrap();
        // The same request again, later within the window: replayed.
        let e = refused(&p, &mut get("r-1", T), T + 30).await;
        assert!(e.message.contains("replayed"), "{}", e.message);
        // The same nonce with a fresh `created`, still within the window: replayed.
        let e = refused(&p, &mut get("r-1", T + 30), T + 30).await;
        assert!(e.message.contains("replayed"), "{}", e.message);
        // After the window the old request is too old anyway, and the pair is forgotten.
        let e = refused(&p, &mut get("r-1", T), T + 61).await;
        assert!(e.message.contains("too old"), "{}", e.message);
        run(&p, &mut get("r-1", T + 70), T + 70).await.unwrap();
        // The same nonce for another key id is another pair.
        let mut req = request("GET", "/things?a=1", &[("host", "API.example.com")], None);
        sign(
            &mut req,
            "sig1",
            GET,
            &params(T + 70, "r-1", "bob-1"),
            b"bob-shared-secret-0123456789",
        );
        run(&p, &mut req, T + 70).await.unwrap();
        // A nonce is required unless `require_nonce: false`.
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &format!(";created={T};keyid=\"alice-1\""),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("no `nonce`"), "{}", e.message);
        let q = build(json!({"require_nonce": false})).unwrap();
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &format!(";created={T};keyid=\"alice-1\""),
            ALICE_SECRET.as_bytes(),
        );
        run(&q, &mut req, T).await.unwrap();

        // Expired pairs are swept; a full cache fails closed (429).
        let small = Arc::new(NonceCache::new(2));
        let p = HmacAuth::with_nonce_cache(
            parse(&json!({"clock_skew": "60s"})).unwrap(),
            identity(),
            small.clone(),
        )
        .unwrap();
        run(&p, &mut get("f-1", T), T).await.unwrap();
        run(&p, &mut get("f-2", T), T).await.unwrap();
        let e = refused(&p, &mut get("f-3", T), T).await;
        assert_eq!(e.kind, ErrorKind::TooManyRequests);
        run(&p, &mut get("f-3", T + 61), T + 61).await.unwrap();
        assert_eq!(small.len(), 1);
    }

    #[tokio::test]
    async fn required_components_must_be_covered() {
        let p = build(json!({})).unwrap();
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            &["@method", "@path"],
            &params(T, "m-1", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(
            e.message.contains("does not cover `@authority`"),
            "{}",
            e.message
        );
        assert_eq!(
            header(&e, "accept-signature"),
            Some("sig1=(\"@method\" \"@path\" \"@authority\");alg=\"hmac-sha256\";created")
        );
        // A body needs `content-digest` covered.
        let body = "hello";
        let mut req = request(
            "PUT",
            "/",
            &[
                ("host", "h"),
                ("content-digest", &content_digest(body.as_bytes())),
            ],
            Some(body),
        );
        sign(
            &mut req,
            "s",
            GET,
            &params(T, "m-2", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("`content-digest`"), "{}", e.message);
        assert_eq!(
            header(&e, "accept-signature"),
            Some("sig1=(\"@method\" \"@path\" \"@authority\" \"content-digest\");alg=\"hmac-sha256\";created")
        );
        // Settings may require header fields.
        let p = build(
            json!({"required_components": ["@method", "@target-uri", "x-tenant"], "label": "app"}),
        )
        .unwrap();
        let mut req = request("GET", "/t?q=1", &[("host", "h"), ("x-tenant", "t1")], None);
        sign(
            &mut req,
            "app",
            &["@method", "@target-uri"],
            &params(T, "m-3", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("`x-tenant`"), "{}", e.message);
        assert!(header(&e, "accept-signature")
            .unwrap()
            .starts_with("app=(\"@method\" \"@target-uri\" \"x-tenant\")"));
        let mut req = request("GET", "/t?q=1", &[("host", "h"), ("x-tenant", "t1")], None);
        sign(
            &mut req,
            "app",
            &["@method", "@target-uri", "x-tenant"],
            &params(T, "m-4", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        run(&p, &mut req, T).await.unwrap();
        // A covered header the request lacks; a component with parameters; twice.
        let p = build(json!({})).unwrap();
        let mut req = request("GET", "/", &[("host", "h"), ("x-a", "1")], None);
        sign(
            &mut req,
            "s",
            &["@method", "@path", "@authority", "x-a"],
            &params(T, "m-5", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        req.headers_mut().remove("x-a");
        let e = refused(&p, &mut req, T).await;
        assert!(
            e.message.contains("`x-a`, which the request does not have"),
            "{}",
            e.message
        );
        for list in [
            "(\"@method\" \"@path\" \"@authority\" \"x-a\";sf)",
            "(\"@method\" \"@path\" \"@authority\" \"@path\")",
            "(\"@method\" \"@path\" \"@authority\" \"@status\")",
        ] {
            let mut req = request("GET", "/", &[("host", "h"), ("x-a", "1")], None);
            req.headers_mut().insert(
                SIGNATURE_INPUT,
                HeaderValue::from_str(&format!("s={list}{}", params(T, "m-6", "alice-1"))).unwrap(),
            );
            req.headers_mut()
                .insert(SIGNATURE, HeaderValue::from_static("s=:AAAA:"));
            let e = refused(&p, &mut req, T).await;
            assert!(
                ["not supported", "twice"]
                    .iter()
                    .any(|w| e.message.contains(w)),
                "{}",
                e.message
            );
        }
    }

    #[tokio::test]
    async fn content_digest_is_checked_against_the_body() {
        let p = build(json!({"max_body": 16})).unwrap();
        let signed = |body: &str, digest: &str, nonce: &str| {
            let mut req = request(
                "POST",
                "/",
                &[("host", "h"), ("content-digest", digest)],
                Some(body),
            );
            sign(
                &mut req,
                "s",
                POST,
                &params(T, nonce, "alice-1"),
                ALICE_SECRET.as_bytes(),
            );
            req
        };
        // Tampered body: the digest (signed) no longer matches.
        let mut req = signed("amount=1", &content_digest(b"amount=1"), "d-1");
        *req.body_mut() = Body::full("amount=9");
        let e = refused(&p, &mut req, T).await;
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert!(e.message.contains("digest mismatch"), "{}", e.message);
        // Tampered digest: the signature no longer matches.
        let mut req = signed("amount=1", &content_digest(b"amount=1"), "d-2");
        req.headers_mut().insert(
            "content-digest",
            HeaderValue::from_str(&content_digest(b"amount=9")).unwrap(),
        );
        *req.body_mut() = Body::full("amount=9");
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("bad signature"), "{}", e.message);
        // sha-512 alone, and both.
        let s512 = format!(
            "sha-512=:{}:",
            B64.encode(digest::digest(&digest::SHA512, b"x=1").as_ref())
        );
        run(&p, &mut signed("x=1", &s512, "d-3"), T).await.unwrap();
        let both = format!("{}, {s512}", content_digest(b"x=1"));
        run(&p, &mut signed("x=1", &both, "d-4"), T).await.unwrap();
        // Only algorithms this policy does not check.
        let e = refused(&p, &mut signed("x=1", "md5=:AAAA:", "d-5"), T).await;
        assert!(e.message.contains("no sha-256 or sha-512"), "{}", e.message);
        // Larger than max_body: 413, announced or streamed.
        let big = "0123456789abcdefg";
        let e = refused(
            &p,
            &mut signed(big, &content_digest(big.as_bytes()), "d-6"),
            T,
        )
        .await;
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        let mut req = signed(big, &content_digest(big.as_bytes()), "d-7");
        req.headers_mut().remove("content-length");
        *req.body_mut() = Body::boxed(http_body_util::Full::new(Bytes::from(big)));
        let e = refused(&p, &mut req, T).await;
        assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
        // Covered without a body: the digest of nothing.
        let mut req = request(
            "GET",
            "/",
            &[("host", "h"), ("content-digest", &content_digest(b""))],
            None,
        );
        sign(
            &mut req,
            "s",
            POST,
            &params(T, "d-8", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        run(&p, &mut req, T).await.unwrap();
    }

    #[tokio::test]
    async fn labels_keys_and_algorithms() {
        let p = build(json!({})).unwrap();
        // Another party's signature first (other alg), ours second: ours is used.
        let mut req = request("GET", "/", &[("host", "h")], None);
        req.headers_mut().append(
            SIGNATURE_INPUT,
            HeaderValue::from_str(&format!(
                "other=(\"@method\");created={T};keyid=\"k\";alg=\"ed25519\""
            ))
            .unwrap(),
        );
        req.headers_mut()
            .append(SIGNATURE, HeaderValue::from_static("other=:AAAA:"));
        sign(
            &mut req,
            "mine",
            GET,
            &params(T, "l-1", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        assert_eq!(req.headers().get_all(SIGNATURE).iter().count(), 2);
        run(&p, &mut req, T).await.unwrap();
        // Only an unsupported algorithm.
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &format!(";created={T};nonce=\"l-2\";keyid=\"alice-1\";alg=\"rsa-pss-sha512\""),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("unsupported alg"), "{}", e.message);
        // Unknown key id; no key id.
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &params(T, "l-3", "mallory-1"),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("key id is unknown"), "{}", e.message);
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &format!(";created={T};nonce=\"l-4\""),
            ALICE_SECRET.as_bytes(),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("no `keyid`"), "{}", e.message);
        // Wrong secret: bad signature.
        let mut req = request("GET", "/", &[("host", "h")], None);
        sign(
            &mut req,
            "s",
            GET,
            &params(T, "l-5", "alice-1"),
            b"not-alice-secret-0123456789",
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("bad signature"), "{}", e.message);
        // One header without the other; garbage.
        let mut req = get("l-6", T);
        req.headers_mut().remove(SIGNATURE);
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("missing signature"), "{}", e.message);
        let mut req = get("l-7", T);
        req.headers_mut().remove(SIGNATURE_INPUT);
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("no Signature-Input"), "{}", e.message);
        let mut req = get("l-8", T);
        req.headers_mut().insert(
            SIGNATURE_INPUT,
            HeaderValue::from_static("sig1=(\"@method\""),
        );
        let e = refused(&p, &mut req, T).await;
        assert!(e.message.contains("malformed"), "{}", e.message);
        // `label`: only that one is checked.
        let q = build(json!({"label": "app"})).unwrap();
        let e = refused(&q, &mut get("l-9", T), T).await;
        assert!(
            e.message.contains("no signature labelled `app`"),
            "{}",
            e.message
        );
        let mut req = request("GET", "/things?a=1", &[("host", "API.example.com")], None);
        sign(
            &mut req,
            "app",
            GET,
            &params(T, "l-10", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        run(&q, &mut req, T).await.unwrap();
        // The error never repeats the secret or the signature.
        let mut req = get("l-11", T);
        let sig = req.headers()[SIGNATURE].to_str().unwrap().to_string();
        let e = refused(&p, &mut req, T + 1000).await;
        let shown = format!("{e:?}");
        assert!(!shown.contains(ALICE_SECRET) && !shown.contains(&sig[6..20]));
        // Each policy has its challenge.
        let a = p.auth().unwrap();
        assert_eq!(a.challenge, "Signature realm=\"portico\"");
        assert!(a.anonymous.is_none());
        let g = build(json!({"anonymous": "guest"})).unwrap();
        assert_eq!(g.auth().unwrap().anonymous.as_deref(), Some("guest"));
    }

    #[tokio::test]
    async fn an_authority_signed_with_a_port_is_normalized() {
        let p = build(json!({"scheme": "https"})).unwrap();
        // The client signs `example.com` for `Host: example.com:443` over https.
        let mut req = request("GET", "/", &[("host", "Example.com:443")], None);
        let mut bare = req.headers().clone();
        bare.insert("host", HeaderValue::from_static("example.com"));
        let mut signer = request("GET", "/", &[], None);
        *signer.headers_mut() = bare;
        sign(
            &mut signer,
            "s",
            GET,
            &params(T, "a-1", "alice-1"),
            ALICE_SECRET.as_bytes(),
        );
        for n in [SIGNATURE, SIGNATURE_INPUT] {
            req.headers_mut()
                .insert(n.clone(), signer.headers()[&n].clone());
        }
        run(&p, &mut req, T).await.unwrap();
    }

    /// The example of docs/security.md, byte for byte.
    #[tokio::test]
    async fn the_documented_example_verifies() {
        let id = Identity::detached();
        let decls = vec![ConsumerDecl {
            name: "alice".into(),
            groups: vec![],
            metadata: Default::default(),
            credentials: vec![CredentialDecl::HmacAuth {
                key_id: "alice-1".into(),
                secret: Secret("a-shared-secret-of-16+-chars".into()),
            }],
        }];
        id.set_declared(portico_store::Declared::compile(&decls, None).unwrap())
            .unwrap();
        let p = HmacAuth::with_nonce_cache(
            parse(&json!({})).unwrap(),
            Arc::new(id),
            Arc::new(NonceCache::new(10)),
        )
        .unwrap();
        let body = "{\"item\": 42}";
        let mut req = request(
            "POST",
            "/orders",
            &[
                ("host", "api.example.com"),
                ("content-type", "application/json"),
                (
                    "content-digest",
                    "sha-256=:JqM68V0z5QFjzpHOq2A9EBqZfMrlf1Ht7WLa/hBoT6o=:",
                ),
                (
                    "signature-input",
                    "sig1=(\"@method\" \"@path\" \"@authority\" \"content-digest\")\
                     ;created=1767225600;nonce=\"7f3a9c21e0\";keyid=\"alice-1\";alg=\"hmac-sha256\"",
                ),
                (
                    "signature",
                    "sig1=:ProeJydcxLgvHQqDlmCecu199uhTxgEsnCiFvzUshOM=:",
                ),
            ],
            Some(body),
        );
        let c = run(&p, &mut req, 1_767_225_600 + 5).await.unwrap();
        assert_eq!(c.consumer.unwrap().name, "alice");
    }

    #[test]
    fn settings_errors() {
        let errs = |v: Value| match build(v) {
            Ok(_) => panic!("accepted"),
            Err(e) => e
                .into_iter()
                .map(|(p, m)| (p.to_string(), m))
                .collect::<Vec<_>>(),
        };
        let e = errs(json!({
            "label": "Sig",
            "required_components": ["@method", "@status", "X-Up", "@signature-params"],
            "clock_skew": "0s",
            "max_body": 0,
            "anonymous": "not a name",
        }));
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "label",
                "required_components[1]",
                "required_components[2]",
                "required_components[3]",
                "clock_skew",
                "max_body",
                "anonymous"
            ],
            "{e:?}"
        );
        let e = errs(json!({"scheme": "ftp"}));
        assert_eq!(e[0].0, "scheme");
        let e = errs(json!({"secret": "x"}));
        assert!(e[0].1.contains("unknown field"), "{e:?}");
    }
}
