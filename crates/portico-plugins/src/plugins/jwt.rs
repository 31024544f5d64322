//! `jwt`: JSON Web Tokens (RFC 7519) signed with HS256/384/512, RS256/384/512,
//! PS256/384/512, ES256/384 or EdDSA.
//!
//! - Keys: an HMAC `secret`, a PEM `public_key`, a key set fetched from `jwks_uri`, or
//!   one found through OpenID Connect discovery of `issuer` (see [`super::jwks`]). A
//!   policy is built without touching the network; the first fetch happens at the
//!   first request that needs it.
//! - Security: `alg: none` is refused; each key verifies only the algorithms of its
//!   key type (no algorithm confusion), further restricted by `algorithms`; a `kid`
//!   selects the key; critical header extensions (`crit`) are refused.
//! - Claims: `exp` (required unless `require_exp: false`), `nbf`, `iat` with `leeway`;
//!   `iss` against `issuer` (exact); `aud` against `audiences` (any of). The checks take
//!   "now" as a parameter ([`Verifier::verify`]); the request path passes the clock.
//! - Consumer: the `consumer_claim` (default `sub`) is looked up among the consumers'
//!   `{type: jwt, subject}` credentials; a token of no known consumer still
//!   authenticates the request (`ctx.auth = "jwt"`, no consumer) unless
//!   `require_consumer: true`. The claims go to `ctx.jwt_claims`; `claims_to_headers`
//!   sends some upstream (client-sent headers of those names are always removed).
//! - Refusals are 401 with an RFC 6750 challenge saying what failed. The token is
//!   never logged, and is removed before the upstream unless `forward_credentials`.
//!
//! Per request with cached keys: everything is synchronous; the allocations are the
//! decoded header and claims (kept as `ctx.jwt_claims`) and the signature check.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use jsonwebtoken::Algorithm;
use parking_lot::Mutex;
use portico_config::units::Dur;
use portico_config::{KeyPath, Secret};
use portico_store::secret::{key_digest, KeyDigest};
use portico_store::{now_secs, Identity};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::auth::{info, refusal, unauthorized, without_query_param, REALM};
use super::fetch::{ca_roots, check_url, HttpFetch};
use super::jwks::{
    alg_by_name, alg_name, hmac_key, mono_ms, pem_key, shared, AlgSet, CachePolicy, Key, KeySet,
    Remote, Source, ALGORITHMS,
};
use crate::body::Body;
use crate::ctx::{cookie, query_param, Ctx};
use crate::error::GatewayError;
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// The shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash size of HS256).
pub const MIN_SECRET: usize = 32;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The HMAC secret for HS256/384/512 tokens (at least 32 bytes).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// `secret` is base64 (standard or URL-safe alphabet, padding optional).
    #[serde(default)]
    pub secret_base64: bool,
    /// A PEM public key (RSA, EC P-256/P-384 or Ed25519): the PEM text itself, or the
    /// absolute path of a file holding it.
    #[serde(default)]
    pub public_key: Option<String>,
    /// The URL of a JSON Web Key Set (https, or http to a loopback address).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The required `iss` claim (exact). Without `secret`, `public_key` and
    /// `jwks_uri`, the keys are found through OpenID Connect discovery of this issuer.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted audiences: the token's `aud` must name one of them (default: `aud` is
    /// not checked).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted algorithms (default: every algorithm of the configured keys' types).
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat` (default 30s).
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// Refuse tokens without `exp` (default true).
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Where to read the token, in order: `bearer` (`Authorization: Bearer`),
    /// `header:NAME`, `query:NAME`, `cookie:NAME`. Default: `[bearer]`.
    #[serde(default = "default_locations")]
    pub locations: Vec<String>,
    /// The claim naming the consumer (default `sub`).
    #[serde(default = "default_claim")]
    pub consumer_claim: String,
    /// Refuse tokens whose consumer claim matches no consumer (default false: such a
    /// token authenticates the request without a consumer).
    #[serde(default)]
    pub require_consumer: bool,
    /// Claims to send upstream as headers: `{claim: Header-Name}`.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Send the token on to the upstream (default: removed).
    #[serde(default)]
    pub forward_credentials: bool,
    /// A consumer for requests without a token (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
    /// Lifetime of a fetched key set whose answer has no `Cache-Control: max-age`
    /// (default 5m).
    #[serde(default = "default_cache_ttl")]
    pub jwks_cache_ttl: Dur,
    /// Shortest lifetime of a fetched key set, whatever `max-age` says (default 1m).
    #[serde(default = "default_cache_min")]
    pub jwks_cache_min: Dur,
    /// Longest lifetime of a fetched key set (default 24h).
    #[serde(default = "default_cache_max")]
    pub jwks_cache_max: Dur,
    /// At most one key fetch per this long, for whatever reason (default 10s).
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh: Dur,
    /// Timeout of a whole key or discovery fetch (default 5s).
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: Dur,
    /// A PEM bundle (inline, or the absolute path of a file): fetches trust only
    /// these CAs (default: the system's roots).
    #[serde(default)]
    pub ca: Option<String>,
    /// Accept plain-http `jwks_uri` and `issuer` URLs to hosts other than loopback.
    #[serde(default)]
    pub allow_http: bool,
}

fn yes() -> bool {
    true
}
fn default_leeway() -> Dur {
    Dur::secs(30)
}
fn default_locations() -> Vec<String> {
    vec!["bearer".into()]
}
fn default_claim() -> String {
    "sub".into()
}
fn default_cache_ttl() -> Dur {
    Dur::secs(300)
}
fn default_cache_min() -> Dur {
    Dur::secs(60)
}
fn default_cache_max() -> Dur {
    Dur::secs(86_400)
}
fn default_min_refresh() -> Dur {
    Dur::secs(10)
}
fn default_fetch_timeout() -> Dur {
    Dur::secs(5)
}

/// Why a token was refused. Each has a message for the client (also the
/// `error_description` of the challenge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Malformed,
    AlgNone,
    AlgUnsupported,
    AlgNotAllowed,
    AlgNotForKey,
    NoKeyForAlg,
    Critical,
    UnknownKid,
    BadSignature,
    BadClaims,
    MissingExp,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    KeysUnavailable,
    NoConsumer,
}

impl Failure {
    pub fn message(self) -> &'static str {
        match self {
            Failure::Malformed => "the token is not a well-formed JWT",
            Failure::AlgNone => "the token is unsigned (alg none), which is never accepted",
            Failure::AlgUnsupported => "the token's algorithm is not supported",
            Failure::AlgNotAllowed => "the token's algorithm is not allowed",
            Failure::AlgNotForKey => "the token's algorithm is not allowed for its key",
            Failure::NoKeyForAlg => "the token's algorithm is not allowed: no key of its type",
            Failure::Critical => {
                "the token has critical header parameters (crit) that are not supported"
            }
            Failure::UnknownKid => "the token's key id (kid) is unknown",
            Failure::BadSignature => "the token's signature is not valid",
            Failure::BadClaims => "the token's claims are malformed",
            Failure::MissingExp => "the token has no expiry (exp)",
            Failure::Expired => "the token has expired",
            Failure::NotYetValid => "the token is not yet valid (nbf)",
            Failure::IssuedInFuture => "the token is issued in the future (iat)",
            Failure::WrongIssuer => "the token's issuer (iss) is not accepted",
            Failure::WrongAudience => "the token's audience (aud) is not accepted",
            Failure::KeysUnavailable => "the keys to verify the token are unavailable",
            Failure::NoConsumer => "the token names no known consumer",
        }
    }

    /// The `WWW-Authenticate` challenge of this refusal (RFC 6750 §3).
    pub fn challenge(self) -> HeaderValue {
        let v = match self {
            // Not the token's fault: no error code.
            Failure::KeysUnavailable => format!("Bearer realm=\"{REALM}\""),
            _ => format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                self.message()
            ),
        };
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }
}

/// The parts of a token, borrowed from it.
#[derive(Debug)]
struct Token<'t> {
    alg: Algorithm,
    kid: Option<String>,
    /// `header.payload`, what the signature covers.
    signed: &'t str,
    payload: &'t str,
    signature: &'t str,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// Whether a credential has the shape of a JWS compact serialization (three parts).
pub fn looks_like_jwt(s: &str) -> bool {
    s.bytes().filter(|b| *b == b'.').count() == 2
}

fn parse(token: &str) -> Result<Token<'_>, Failure> {
    let mut it = token.splitn(3, '.');
    let (Some(h), Some(p), Some(sig)) = (it.next(), it.next(), it.next()) else {
        return Err(Failure::Malformed);
    };
    if h.is_empty() || p.is_empty() || sig.contains('.') {
        return Err(Failure::Malformed);
    }
    let hb = URL_SAFE_NO_PAD.decode(h).map_err(|_| Failure::Malformed)?;
    let raw: RawHeader = serde_json::from_slice(&hb).map_err(|_| Failure::Malformed)?;
    let alg = raw.alg.ok_or(Failure::Malformed)?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(Failure::AlgNone);
    }
    let alg = alg_by_name(&alg).ok_or(Failure::AlgUnsupported)?;
    if raw.crit.is_some() {
        return Err(Failure::Critical);
    }
    if sig.is_empty() {
        return Err(Failure::BadSignature);
    }
    Ok(Token {
        alg,
        kid: raw.kid,
        signed: &token[..h.len() + 1 + p.len()],
        payload: p,
        signature: sig,
    })
}

/// The verification rules: keys, algorithms and claims.
pub struct Verifier {
    /// Keys from the settings.
    keys: Vec<Key>,
    /// The fetched key set, if any.
    remote: Option<Arc<Remote>>,
    allowed: AlgSet,
    issuer: Option<String>,
    audiences: Vec<String>,
    leeway: i64,
    require_exp: bool,
}

impl Verifier {
    /// Verify a token at `now` (Unix seconds) with the keys held now (no fetch):
    /// the claims, or why it is refused.
    pub fn verify(&self, token: &str, now: i64) -> Result<Value, Failure> {
        let t = parse(token)?;
        self.check_alg(&t)?;
        let held = self.remote.as_ref().map(|r| r.current());
        let set = held.as_ref().and_then(|g| g.as_deref());
        self.verify_parsed(&t, set, now)
    }

    fn check_alg(&self, t: &Token<'_>) -> Result<(), Failure> {
        if self.allowed.has(t.alg) {
            Ok(())
        } else {
            Err(Failure::AlgNotAllowed)
        }
    }

    fn verify_parsed(
        &self,
        t: &Token<'_>,
        set: Option<&KeySet>,
        now: i64,
    ) -> Result<Value, Failure> {
        let fetched: &[Key] = set.map_or(&[], |s| s.keys.as_slice());
        let all = || self.keys.iter().chain(fetched.iter());
        let fits = |k: &&Key| k.algs.has(t.alg);
        let named = |k: &&Key| k.kid.is_some() && k.kid.as_deref() == t.kid.as_deref();
        let mut tried = false;
        let mut verifies = |k: &Key| {
            tried = true;
            matches!(
                jsonwebtoken::crypto::verify(t.signature, t.signed.as_bytes(), &k.key, t.alg),
                Ok(true)
            )
        };
        let ok = match t.kid {
            // The keys with the token's id...
            Some(_) if all().any(|k| named(&k)) => {
                let mut fitting = all().filter(named).filter(fits).peekable();
                if fitting.peek().is_none() {
                    return Err(Failure::AlgNotForKey);
                }
                fitting.any(&mut verifies)
            }
            // ...else the keys without an id.
            Some(_) if !all().any(|k| k.kid.is_none()) => return Err(Failure::UnknownKid),
            Some(_) => all()
                .filter(|k| k.kid.is_none())
                .filter(fits)
                .any(&mut verifies),
            None => all().filter(fits).any(&mut verifies),
        };
        if !tried {
            return Err(Failure::NoKeyForAlg);
        }
        if !ok {
            return Err(Failure::BadSignature);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(t.payload)
            .map_err(|_| Failure::Malformed)?;
        let claims: Value = serde_json::from_slice(&bytes).map_err(|_| Failure::BadClaims)?;
        if !claims.is_object() {
            return Err(Failure::BadClaims);
        }
        self.check_claims(&claims, now)?;
        Ok(claims)
    }

    fn check_claims(&self, c: &Value, now: i64) -> Result<(), Failure> {
        let time = |name: &str| -> Result<Option<f64>, Failure> {
            match c.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or(Failure::BadClaims),
            }
        };
        let (now, leeway) = (now as f64, self.leeway as f64);
        match time("exp")? {
            None if self.require_exp => return Err(Failure::MissingExp),
            Some(exp) if now >= exp + leeway => return Err(Failure::Expired),
            _ => {}
        }
        if time("nbf")?.is_some_and(|nbf| now + leeway < nbf) {
            return Err(Failure::NotYetValid);
        }
        if time("iat")?.is_some_and(|iat| iat > now + leeway) {
            return Err(Failure::IssuedInFuture);
        }
        if let Some(iss) = &self.issuer {
            if c.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(Failure::WrongIssuer);
            }
        }
        if !self.audiences.is_empty() {
            let accepted = |a: &Value| {
                a.as_str()
                    .is_some_and(|a| self.audiences.iter().any(|x| x == a))
            };
            let ok = match c.get("aud") {
                Some(Value::Array(list)) => list.iter().any(accepted),
                Some(a) => accepted(a),
                None => false,
            };
            if !ok {
                return Err(Failure::WrongAudience);
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Location {
    Bearer,
    Header(HeaderName),
    Query(Arc<str>),
    Cookie(Box<str>),
}

/// What the request path does next.
enum Next {
    Done(Result<Value, Failure>),
    /// Fetch the key set first (none held, or the token's `kid` is not in it).
    Fetch(Arc<Remote>),
}

pub struct Jwt {
    verifier: Verifier,
    locations: Vec<Location>,
    consumer_claim: String,
    require_consumer: bool,
    claims_to_headers: Vec<(String, HeaderName)>,
    /// The header names of `claims_to_headers`, which clients may not send.
    claim_headers: Vec<HeaderName>,
    forward: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    identity: Arc<Identity>,
    /// Tokens verified recently (by SHA-256): a client sends the same token many times,
    /// and checking an RS256 signature costs tens of microseconds.
    verified: Mutex<HashMap<KeyDigest, Verified>>,
}

/// A verified token's claims, reused until `until` (Unix seconds: the earlier of its
/// `exp` and [`VERIFIED_TTL`] after the check) while the fetched key set it was checked
/// with is still the one in force (kept alive here, so the comparison is exact).
struct Verified {
    claims: Value,
    until: i64,
    keys: Option<Arc<KeySet>>,
}

/// How long a verified token is reused at most.
const VERIFIED_TTL: i64 = 60;
/// Most verified tokens remembered per policy.
const VERIFIED_MAX: usize = 10_000;

impl Jwt {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        // jsonwebtoken picks its crypto backend from its features; name it, so that a
        // second backend enabled elsewhere in the build cannot leave it undecided.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
        );
        let root = KeyPath::root();
        let mut errs = SettingsErrors::new();

        // Keys from the settings.
        let mut keys = Vec::new();
        if let Some(secret) = &s.secret {
            let bytes = if s.secret_base64 {
                decode_base64(&secret.0)
                    .ok_or_else(|| "`secret` is not base64 (`secret_base64: true`)".to_string())
            } else {
                Ok(secret.0.as_bytes().to_vec())
            };
            match bytes {
                Ok(b) if b.len() >= MIN_SECRET => keys.push(hmac_key(&b)),
                Ok(_) => errs.push((
                    root.key("secret"),
                    format!("an HMAC secret has at least {MIN_SECRET} bytes"),
                )),
                Err(e) => errs.push((root.key("secret"), e)),
            }
        } else if s.secret_base64 {
            errs.push((
                root.key("secret_base64"),
                "`secret_base64` without a `secret`".into(),
            ));
        }
        if let Some(pk) = &s.public_key {
            match read_pem(pk).and_then(|pem| pem_key(&pem)) {
                Ok(k) => keys.push(k),
                Err(e) => errs.push((root.key("public_key"), e)),
            }
        }

        // Keys to fetch.
        let discovery = s.issuer.is_some()
            && s.jwks_uri.is_none()
            && s.secret.is_none()
            && s.public_key.is_none();
        let mut source = None;
        if let Some(u) = &s.jwks_uri {
            match check_url(u, s.allow_http) {
                Ok(()) => source = Some(Source::Jwks(u.clone())),
                Err(e) => errs.push((root.key("jwks_uri"), e)),
            }
        }
        if let Some(iss) = &s.issuer {
            if iss.is_empty() {
                errs.push((root.key("issuer"), "`issuer` is empty".into()));
            } else if discovery {
                match check_url(iss, s.allow_http) {
                    Ok(()) => {
                        source = Some(Source::Discovery {
                            issuer: iss.clone(),
                        })
                    }
                    Err(e) => errs.push((
                        root.key("issuer"),
                        format!(
                            "keys are found through OpenID Connect discovery of the issuer: {e}"
                        ),
                    )),
                }
            }
        }
        if s.secret.is_none()
            && s.public_key.is_none()
            && s.jwks_uri.is_none()
            && s.issuer.is_none()
        {
            errs.push((
                root.clone(),
                "no keys to verify tokens with: set `secret`, `public_key`, `jwks_uri`, or \
                 `issuer` (OpenID Connect discovery)"
                    .into(),
            ));
        }

        // Algorithms.
        let mut available = keys.iter().fold(AlgSet::EMPTY, |a, k| a.union(k.algs));
        if s.jwks_uri.is_some() || discovery {
            available = available.union(AlgSet::ASYMMETRIC);
        }
        let mut allowed = AlgSet::EMPTY;
        for (i, name) in s.algorithms.iter().enumerate() {
            let p = root.key("algorithms").index(i);
            if name.eq_ignore_ascii_case("none") {
                errs.push((p, "`none` (unsigned tokens) is never accepted".into()));
                continue;
            }
            let Some(a) = alg_by_name(name) else {
                let names: Vec<&str> = ALGORITHMS.iter().map(|a| alg_name(*a)).collect();
                errs.push((
                    p,
                    format!("`{name}` is not an algorithm: use {}", names.join(", ")),
                ));
                continue;
            };
            if !available.has(a) {
                errs.push((
                    p,
                    format!(
                        "no configured key can verify {name}: {}",
                        if AlgSet::HMAC.has(a) {
                            "HMAC algorithms need `secret` (key sets never provide HMAC keys)"
                        } else {
                            "it needs a `public_key` of its type, `jwks_uri` or `issuer`"
                        }
                    ),
                ));
                continue;
            }
            allowed = allowed.union(AlgSet::of(a));
        }
        if s.algorithms.is_empty() {
            allowed = available;
        }

        // Durations.
        let leeway = i64::try_from(s.leeway.0.as_secs()).unwrap_or(i64::MAX);
        if s.jwks_cache_min.0 > s.jwks_cache_max.0 {
            errs.push((
                root.key("jwks_cache_min"),
                "`jwks_cache_min` is longer than `jwks_cache_max`".into(),
            ));
        }
        if s.fetch_timeout.0.is_zero() {
            errs.push((root.key("fetch_timeout"), "must be longer than 0s".into()));
        }
        let fetch = match s.ca.as_deref().map(ca_roots).transpose() {
            Ok(roots) => Some(HttpFetch::new(s.fetch_timeout.0, roots)),
            Err(e) => {
                errs.push((root.key("ca"), e));
                None
            }
        };

        // Where the token is, who it names, what goes upstream.
        let mut locations = Vec::new();
        for (i, l) in s.locations.iter().enumerate() {
            let p = root.key("locations").index(i);
            match l.split_once(':') {
                Some(("header", n)) => match HeaderName::from_bytes(n.as_bytes()) {
                    Ok(h) => locations.push(Location::Header(h)),
                    Err(_) => errs.push((p, format!("`{n}` is not a valid header name"))),
                },
                Some(("query", n)) if !n.is_empty() => {
                    locations.push(Location::Query(Arc::from(n)))
                }
                Some(("cookie", n)) if !n.is_empty() && !n.contains([';', '=', ' ']) => {
                    locations.push(Location::Cookie(Box::from(n)))
                }
                None if l == "bearer" => locations.push(Location::Bearer),
                _ => errs.push((
                    p,
                    format!(
                        "`{l}` is not a token location: use `bearer`, `header:NAME`, \
                         `query:NAME` or `cookie:NAME`"
                    ),
                )),
            }
        }
        if s.locations.is_empty() {
            errs.push((
                root.key("locations"),
                "at least one location is needed".into(),
            ));
        }
        if s.consumer_claim.is_empty() {
            errs.push((root.key("consumer_claim"), "the claim name is empty".into()));
        }
        for (i, a) in s.audiences.iter().enumerate() {
            if a.is_empty() {
                errs.push((
                    root.key("audiences").index(i),
                    "an audience is empty".into(),
                ));
            }
        }
        let mut claims_to_headers = Vec::new();
        for (claim, name) in &s.claims_to_headers {
            let p = root.key("claims_to_headers").key(claim);
            match super::auth::claim_header(name) {
                Ok(h) => claims_to_headers.push((claim.clone(), h)),
                Err(e) => errs.push((p, e)),
            }
        }
        if let Some(a) = &s.anonymous {
            if let Err(e) = portico_config::identity::check_name(a) {
                errs.push((root.key("anonymous"), e));
            }
        }

        // The fetched key set, shared with the instances built with the same settings.
        let mut remote = None;
        if let (Some(src), Some(fetch), true) = (source, fetch, errs.is_empty()) {
            let policy = CachePolicy {
                default_ttl: s.jwks_cache_ttl.0,
                min_ttl: s.jwks_cache_min.0,
                max_ttl: s.jwks_cache_max.0,
                min_refresh: s.jwks_min_refresh.0,
            };
            let id = format!("{src:?}|{policy:?}|{}|{}", s.allow_http, fetch.identity());
            let allow_http = s.allow_http;
            remote = Some(shared(id, move || {
                Remote::new(src, policy, allow_http, Arc::new(fetch))
            }));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Jwt {
            verified: Mutex::new(HashMap::new()),
            verifier: Verifier {
                keys,
                remote,
                allowed,
                issuer: s.issuer,
                audiences: s.audiences,
                leeway,
                require_exp: s.require_exp,
            },
            locations,
            consumer_claim: s.consumer_claim,
            require_consumer: s.require_consumer,
            claim_headers: claims_to_headers.iter().map(|(_, h)| h.clone()).collect(),
            claims_to_headers,
            forward: s.forward_credentials,
            anonymous: s.anonymous,
            challenge: HeaderValue::from_static("Bearer realm=\"portico\""),
            identity,
        })
    }

    /// The verification rules (for tests and tools).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The token and where it was found.
    fn find<'r>(&self, req: &'r Request<Body>) -> Option<(std::borrow::Cow<'r, str>, &Location)> {
        use std::borrow::Cow;
        for l in &self.locations {
            let v = match l {
                Location::Bearer => req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(strip_bearer)
                    .map(Cow::Borrowed),
                Location::Header(h) => req
                    .headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| strip_bearer(v).unwrap_or(v.trim()))
                    .map(Cow::Borrowed),
                Location::Query(n) => query_param(req.uri().query(), n),
                Location::Cookie(n) => cookie(req.headers(), n).map(Cow::Borrowed),
            };
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                return Some((v, l));
            }
        }
        None
    }

    /// Verify with the keys held (or reuse a recent verification of this token), or say
    /// that a fetch is needed first.
    fn evaluate(&self, token: &str, now: i64, now_ms: u64, may_fetch: bool) -> Next {
        let digest = key_digest(token.as_bytes());
        let held = self.verifier.remote.as_ref().map(|r| r.current().clone());
        {
            let cache = self.verified.lock();
            if let Some(hit) = cache.get(&digest) {
                let same_keys = match (&hit.keys, &held) {
                    (None, None) => true,
                    (Some(a), Some(Some(b))) => Arc::ptr_eq(a, b),
                    (None, Some(None)) => true,
                    _ => false,
                };
                if now < hit.until && same_keys {
                    return Next::Done(Ok(hit.claims.clone()));
                }
            }
        }
        let next = self.evaluate_uncached(token, now, now_ms, may_fetch);
        if let Next::Done(Ok(claims)) = &next {
            let exp = claims.get("exp").and_then(Value::as_i64);
            let until = exp.map_or(now + VERIFIED_TTL, |e| e.min(now + VERIFIED_TTL));
            let keys = self
                .verifier
                .remote
                .as_ref()
                .and_then(|r| r.current().clone());
            let mut cache = self.verified.lock();
            if cache.len() >= VERIFIED_MAX {
                cache.retain(|_, v| now < v.until);
                if cache.len() >= VERIFIED_MAX {
                    cache.clear();
                }
            }
            cache.insert(
                digest,
                Verified {
                    claims: claims.clone(),
                    until,
                    keys,
                },
            );
        }
        next
    }

    fn evaluate_uncached(&self, token: &str, now: i64, now_ms: u64, may_fetch: bool) -> Next {
        let v = &self.verifier;
        let t = match parse(token) {
            Ok(t) => t,
            Err(f) => return Next::Done(Err(f)),
        };
        if let Err(f) = v.check_alg(&t) {
            return Next::Done(Err(f));
        }
        let Some(remote) = &v.remote else {
            return Next::Done(v.verify_parsed(&t, None, now));
        };
        let held = remote.current();
        let set = held.as_deref();
        if may_fetch && AlgSet::ASYMMETRIC.has(t.alg) {
            let unknown_kid = t
                .kid
                .as_deref()
                .is_some_and(|k| !set.is_some_and(|s| s.has_kid(k)))
                && !v.keys.iter().any(|k| k.kid.is_none() && k.algs.has(t.alg));
            // Fetch, or wait for the fetch under way (not refuse around it).
            if (set.is_none() || unknown_kid)
                && (remote.may_refresh(now_ms) || remote.is_fetching())
            {
                return Next::Fetch(remote.clone());
            }
            if set.is_some_and(|s| now_ms >= s.fresh_until) && remote.may_refresh(now_ms) {
                remote.refresh_in_background(now_ms);
            }
        }
        if set.is_none() && !v.keys.iter().any(|k| k.algs.has(t.alg)) {
            return Next::Done(Err(Failure::KeysUnavailable));
        }
        Next::Done(v.verify_parsed(&t, set, now))
    }

    /// A verified token: the consumer, the claim headers, the credential removed, the
    /// context set.
    fn accept(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        at: &Location,
        claims: Value,
    ) -> Result<(), Failure> {
        let consumer = claims
            .as_object()
            .and_then(|c| super::auth::token_consumer(&self.identity, c, &self.consumer_claim));
        if consumer.is_none() && self.require_consumer {
            return Err(Failure::NoConsumer);
        }
        if let Some(c) = claims.as_object() {
            super::auth::set_claim_headers(req.headers_mut(), c, &self.claims_to_headers);
        }
        if !self.forward {
            match at {
                Location::Bearer => {
                    req.headers_mut().remove(AUTHORIZATION);
                }
                Location::Header(h) => {
                    req.headers_mut().remove(h);
                }
                Location::Query(n) => {
                    let u = without_query_param(req.uri(), n);
                    *req.uri_mut() = u;
                }
                Location::Cookie(n) => remove_cookie(req.headers_mut(), n),
            }
        }
        if ctx.auth.is_none() {
            ctx.auth = Some("jwt");
            ctx.consumer = consumer;
        }
        if ctx.jwt_claims.is_none() {
            ctx.jwt_claims = Some(claims);
        }
        Ok(())
    }

    fn refuse(&self, ctx: &Ctx, f: Failure) -> GatewayError {
        self.log_refusal(ctx, f);
        refusal(&f.challenge(), f.message())
    }

    /// Why a token was refused (never the token itself).
    fn log_refusal(&self, ctx: &Ctx, f: Failure) {
        tracing::debug!(route = %ctx.route_name, request_id = %ctx.request_id, reason = f.message(), "jwt refused");
    }
}

impl Policy for Jwt {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn secret_params(&self) -> Vec<Arc<str>> {
        self.locations
            .iter()
            .filter_map(|l| match l {
                Location::Query(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        // Claim headers come from the gateway only.
        crate::ctx::remove_identity_headers(
            req.headers_mut(),
            &self.claim_headers,
            ctx.underscores,
        );
        let Some((token, at)) = self.find(req) else {
            return Step::cont();
        };
        if let Location::Query(n) = at {
            ctx.secret_query = Some(n.clone());
        }
        // Not a JWT: a credential of another kind (e.g. an opaque bearer key).
        if !looks_like_jwt(&token) {
            return Step::cont();
        }
        match self.evaluate(&token, now_secs(), mono_ms(), true) {
            Next::Done(Ok(claims)) => {
                drop(token);
                match self.accept(ctx, req, at, claims) {
                    Ok(()) => Step::cont(),
                    Err(f) => Step::error(self.refuse(ctx, f)),
                }
            }
            Next::Done(Err(f)) => {
                drop(token);
                self.log_refusal(ctx, f);
                unauthorized(&f.challenge(), f.message())
            }
            Next::Fetch(remote) => {
                let token = token.into_owned();
                Step::Pending(Box::pin(async move {
                    // In its own task: a client that goes away does not cancel it.
                    let _ = tokio::spawn(async move { remote.refresh(mono_ms()).await }).await;
                    let next = self.evaluate(&token, now_secs(), mono_ms(), false);
                    drop(token);
                    match next {
                        Next::Done(Ok(claims)) => match self.accept(ctx, req, at, claims) {
                            Ok(()) => Flow::Continue,
                            Err(f) => Flow::Error(self.refuse(ctx, f)),
                        },
                        Next::Done(Err(f)) => Flow::Error(self.refuse(ctx, f)),
                        Next::Fetch(_) => Flow::Error(self.refuse(ctx, Failure::KeysUnavailable)),
                    }
                }))
            }
        }
    }
}

/// `Bearer <token>` → the token.
fn strip_bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE};
    let s = s.trim();
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .ok()
}

/// The PEM text: `public_key` itself, or the content of the absolute path it names.
fn read_pem(v: &str) -> Result<String, String> {
    if v.contains("-----BEGIN") {
        return Ok(v.to_string());
    }
    let p = Path::new(v.trim());
    if !p.is_absolute() {
        return Err("give the PEM text itself or the absolute path of a file holding it".into());
    }
    std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// Remove one cookie from the `Cookie` headers, keeping the others.
fn remove_cookie(h: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = h
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|line| {
            line.split(';')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .filter(|c| c.split_once('=').is_none_or(|(k, _)| k.trim() != name))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|l| !l.is_empty())
        .collect();
    h.remove(COOKIE);
    for l in kept {
        if let Ok(v) = HeaderValue::from_str(&l) {
            h.append(COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{
        EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
        ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: i64 = 1_700_000_000;
    const SECRET: &str = "0123456789abcdef0123456789abcdef-hmac";

    fn pem(tag: &str, der: &[u8]) -> String {
        let b = STANDARD.encode(der);
        let mut s = format!("-----BEGIN {tag}-----\n");
        for line in b.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(line).unwrap());
            s.push('\n');
        }
        s.push_str(&format!("-----END {tag}-----\n"));
        s
    }

    struct Rsa {
        enc: EncodingKey,
        public_pem: String,
        jwk: Value,
    }

    fn rsa() -> &'static Rsa {
        static K: OnceLock<Rsa> = OnceLock::new();
        K.get_or_init(|| {
            let kp = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).unwrap();
            let enc = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
                .unwrap();
            let spki =
                AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key()).unwrap();
            let c = RsaPublicKeyComponents::<Vec<u8>>::from(kp.public_key());
            Rsa {
                enc,
                public_pem: pem("PUBLIC KEY", spki.as_ref()),
                jwk: json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)}),
            }
        })
    }

    fn ec() -> (EncodingKey, Value) {
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let pkcs8 = kp.to_pkcs8v1().unwrap();
        let point = kp.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])});
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
    }

    fn ed() -> (EncodingKey, String, Value) {
        let kp = Ed25519KeyPair::generate().unwrap();
        let pkcs8 = kp.to_pkcs8().unwrap();
        let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key()).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(kp.public_key().as_ref())});
        (
            EncodingKey::from_ed_der(pkcs8.as_ref()),
            pem("PUBLIC KEY", spki.as_ref()),
            jwk,
        )
    }

    fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, &claims, key).unwrap()
    }

    fn hs(claims: Value) -> String {
        mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            claims,
        )
    }

    fn policy(settings: Value) -> Jwt {
        Jwt::new(
            serde_json::from_value(settings).unwrap(),
            Arc::new(Identity::detached()),
        )
        .map_err(|e| format!("{e:?}"))
        .unwrap()
    }

    fn errors(settings: Value) -> String {
        match serde_json::from_value::<Settings>(settings) {
            Err(e) => e.to_string(),
            Ok(s) => match Jwt::new(s, Arc::new(Identity::detached())) {
                Ok(_) => String::new(),
                Err(e) => e
                    .iter()
                    .map(|(p, m)| format!("{p}: {m}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            },
        }
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn verified_tokens_are_reused_until_exp_at_most() {
        let p = policy(json!({"secret": SECRET}));
        let t = hs(json!({"sub": "a", "exp": NOW + 30}));
        let ok = |n: Next| matches!(n, Next::Done(Ok(_)));
        assert!(ok(p.evaluate(&t, NOW, 0, false)));
        assert_eq!(p.verified.lock().len(), 1);
        assert_eq!(p.verified.lock().values().next().unwrap().until, NOW + 30);
        // Reused while fresh (the same answer as a new check).
        assert!(ok(p.evaluate(&t, NOW + 29, 0, false)));
        // At exp the entry is not used: the token is checked again (and still passes
        // within the leeway); past exp + leeway it is refused.
        assert!(ok(p.evaluate(&t, NOW + 30, 0, false)));
        assert!(matches!(
            p.evaluate(&t, NOW + 61, 0, false),
            Next::Done(Err(Failure::Expired))
        ));
        // A long-lived token is reused for VERIFIED_TTL at most.
        let long = hs(json!({"sub": "b", "exp": NOW + 86_400}));
        assert!(ok(p.evaluate(&long, NOW, 0, false)));
        let until = p.verified.lock().values().map(|v| v.until).max().unwrap();
        assert_eq!(until, NOW + VERIFIED_TTL);
        // Another token (one changed byte) is never taken for a cached one.
        let mut forged = long.clone();
        forged.pop();
        forged.push('A');
        assert!(!ok(p.evaluate(&forged, NOW, 0, false)) || forged == long);
    }

    #[test]
    fn time_claims_on_a_controlled_clock() {
        let p = policy(json!({"secret": SECRET}));
        let v = p.verifier();
        let ok = hs(json!({"sub": "a", "exp": NOW + 60, "iat": NOW, "nbf": NOW}));
        assert_eq!(v.verify(&ok, NOW).unwrap()["sub"], "a");
        // exp: valid until exp + leeway (30s)
        let t = hs(json!({"exp": NOW}));
        assert!(v.verify(&t, NOW - 1).is_ok());
        assert!(v.verify(&t, NOW + 29).is_ok());
        assert_eq!(v.verify(&t, NOW + 30), Err(Failure::Expired));
        assert_eq!(v.verify(&t, NOW + 3600), Err(Failure::Expired));
        // nbf: valid from nbf - leeway
        let t = hs(json!({"exp": NOW + 3600, "nbf": NOW + 100}));
        assert_eq!(v.verify(&t, NOW), Err(Failure::NotYetValid));
        assert_eq!(v.verify(&t, NOW + 69), Err(Failure::NotYetValid));
        assert!(v.verify(&t, NOW + 70).is_ok());
        // iat: not in the future beyond the leeway
        let t = hs(json!({"exp": NOW + 3600, "iat": NOW + 31}));
        assert_eq!(v.verify(&t, NOW), Err(Failure::IssuedInFuture));
        assert!(v.verify(&t, NOW + 1).is_ok());
        // exp required by default; fractional and malformed times
        assert_eq!(
            v.verify(&hs(json!({"sub": "a"})), NOW),
            Err(Failure::MissingExp)
        );
        assert!(v.verify(&hs(json!({"exp": NOW as f64 + 0.5})), NOW).is_ok());
        assert_eq!(
            v.verify(&hs(json!({"exp": "tomorrow"})), NOW),
            Err(Failure::BadClaims)
        );
        // a larger leeway, and exp not required
        let p = policy(json!({"secret": SECRET, "leeway": "2m", "require_exp": false}));
        assert!(p.verifier().verify(&hs(json!({"sub": "a"})), NOW).is_ok());
        let t = hs(json!({"exp": NOW}));
        assert!(p.verifier().verify(&t, NOW + 119).is_ok());
        assert_eq!(p.verifier().verify(&t, NOW + 120), Err(Failure::Expired));
        // no leeway
        let p = policy(json!({"secret": SECRET, "leeway": "0s"}));
        assert_eq!(p.verifier().verify(&t, NOW), Err(Failure::Expired));
        assert!(p.verifier().verify(&t, NOW - 1).is_ok());
    }

    #[test]
    fn issuer_and_audience() {
        let p = policy(json!({"secret": SECRET, "issuer": "https://idp.test",
            "audiences": ["api", "admin"]}));
        let v = p.verifier();
        let exp = NOW + 60;
        let ok = |c: Value| v.verify(&hs(c), NOW);
        assert!(ok(json!({"exp": exp, "iss": "https://idp.test", "aud": "api"})).is_ok());
        assert!(ok(json!({"exp": exp, "iss": "https://idp.test", "aud": ["x", "admin"]})).is_ok());
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.test/", "aud": "api"})),
            Err(Failure::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": exp, "aud": "api"})),
            Err(Failure::WrongIssuer)
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.test", "aud": "other"})),
            Err(Failure::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.test", "aud": ["x", "y"]})),
            Err(Failure::WrongAudience)
        );
        assert_eq!(
            ok(json!({"exp": exp, "iss": "https://idp.test"})),
            Err(Failure::WrongAudience)
        );
    }

    #[test]
    fn alg_none_and_malformed_tokens() {
        let p = policy(json!({"secret": SECRET, "require_exp": false}));
        let v = p.verifier();
        let claims = b64(&json!({"sub": "a"}));
        for alg in ["none", "None", "NONE"] {
            let t = format!("{}.{claims}.", b64(&json!({"alg": alg, "typ": "JWT"})));
            assert_eq!(v.verify(&t, NOW), Err(Failure::AlgNone), "{alg}");
            // with some signature too
            let t = format!("{}.{claims}.c2ln", b64(&json!({"alg": alg})));
            assert_eq!(v.verify(&t, NOW), Err(Failure::AlgNone), "{alg}");
        }
        let t = format!("{}.{claims}.c2ln", b64(&json!({"alg": "HS1"})));
        assert_eq!(v.verify(&t, NOW), Err(Failure::AlgUnsupported));
        let t = format!("{}.{claims}.c2ln", b64(&json!({"typ": "JWT"})));
        assert_eq!(v.verify(&t, NOW), Err(Failure::Malformed));
        let t = format!(
            "{}.{claims}.c2ln",
            b64(&json!({"alg": "HS256", "crit": ["exp"]}))
        );
        assert_eq!(v.verify(&t, NOW), Err(Failure::Critical));
        let t = format!("{}.{claims}.", b64(&json!({"alg": "HS256"})));
        assert_eq!(v.verify(&t, NOW), Err(Failure::BadSignature));
        for t in ["", "a.b", "a.b.c.d", "!!.e30.x", ".e30.x", "e30..x"] {
            assert_eq!(v.verify(t, NOW), Err(Failure::Malformed), "{t}");
        }
        // a good signature over claims that are not an object
        let t = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            json!([1, 2]),
        );
        assert_eq!(v.verify(&t, NOW), Err(Failure::BadClaims));
        // a bad signature
        let good = hs(json!({"sub": "a"}));
        let forged = format!(
            "{}.{}.{}",
            good.split('.').next().unwrap(),
            b64(&json!({"sub": "root"})),
            good.rsplit('.').next().unwrap()
        );
        assert_eq!(v.verify(&forged, NOW), Err(Failure::BadSignature));
        let other = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(b"another-secret-another-secret-0123456789"),
            json!({"sub": "a"}),
        );
        assert_eq!(v.verify(&other, NOW), Err(Failure::BadSignature));
    }

    #[test]
    fn hs_rs_confusion_is_refused() {
        let r = rsa();
        // The RSA public key's PEM bytes used as an HMAC secret.
        let confused = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(r.public_pem.as_bytes()),
            json!({"sub": "a", "exp": NOW + 60}),
        );
        let p = policy(json!({"public_key": r.public_pem}));
        assert_eq!(
            p.verifier().verify(&confused, NOW),
            Err(Failure::AlgNotAllowed)
        );
        // A genuine RS256 token passes, and so do PS256 ones.
        let rs = mint(Algorithm::RS256, None, &r.enc, json!({"exp": NOW + 60}));
        assert!(p.verifier().verify(&rs, NOW).is_ok());
        let ps = mint(Algorithm::PS384, None, &r.enc, json!({"exp": NOW + 60}));
        assert!(p.verifier().verify(&ps, NOW).is_ok());
        // Even with HS256 allowed (a secret is configured), the RSA key is never used
        // as an HMAC secret.
        let p = policy(json!({"public_key": r.public_pem, "secret": SECRET,
            "algorithms": ["HS256", "RS256"]}));
        assert_eq!(
            p.verifier().verify(&confused, NOW),
            Err(Failure::BadSignature)
        );
        assert!(p.verifier().verify(&rs, NOW).is_ok());
        // `algorithms` restricts further.
        assert_eq!(p.verifier().verify(&ps, NOW), Err(Failure::AlgNotAllowed));
        let p = policy(json!({"public_key": r.public_pem, "algorithms": ["PS384"]}));
        assert_eq!(p.verifier().verify(&rs, NOW), Err(Failure::AlgNotAllowed));
        assert!(p.verifier().verify(&ps, NOW).is_ok());
    }

    #[test]
    fn keys_by_kid_and_type() {
        let r = rsa();
        let (ec_enc, mut ec_jwk) = ec();
        let (ed_enc, ed_pem, mut ed_jwk) = ed();
        let mut rsa_jwk = r.jwk.clone();
        rsa_jwk["kid"] = json!("r1");
        ec_jwk["kid"] = json!("e1");
        ed_jwk["kid"] = json!("d1");
        let body = json!({"keys": [rsa_jwk, ec_jwk, ed_jwk]}).to_string();
        let (keys, skipped) = super::super::jwks::parse_jwks(body.as_bytes()).unwrap();
        assert!(skipped.is_empty());
        let v = Verifier {
            keys: vec![],
            remote: None,
            allowed: AlgSet::ASYMMETRIC,
            issuer: None,
            audiences: vec![],
            leeway: 30,
            require_exp: true,
        };
        let set = KeySet {
            keys,
            fresh_until: u64::MAX,
        };
        let check = |t: &str| -> Result<Value, Failure> {
            let t = parse(t)?;
            v.check_alg(&t)?;
            v.verify_parsed(&t, Some(&set), NOW)
        };
        let c = json!({"exp": NOW + 60});
        assert!(check(&mint(Algorithm::RS256, Some("r1"), &r.enc, c.clone())).is_ok());
        assert!(check(&mint(Algorithm::ES256, Some("e1"), &ec_enc, c.clone())).is_ok());
        assert!(check(&mint(Algorithm::EdDSA, Some("d1"), &ed_enc, c.clone())).is_ok());
        // without a kid: the keys of the token's type are tried
        assert!(check(&mint(Algorithm::EdDSA, None, &ed_enc, c.clone())).is_ok());
        assert!(check(&mint(Algorithm::PS512, None, &r.enc, c.clone())).is_ok());
        // an unknown kid
        assert_eq!(
            check(&mint(Algorithm::EdDSA, Some("zz"), &ed_enc, c.clone())),
            Err(Failure::UnknownKid)
        );
        // a kid naming a key of another type
        assert_eq!(
            check(&mint(Algorithm::EdDSA, Some("r1"), &ed_enc, c.clone())),
            Err(Failure::AlgNotForKey)
        );
        // the right kid, the wrong signer
        let (other_ed, _, _) = ed();
        assert_eq!(
            check(&mint(Algorithm::EdDSA, Some("d1"), &other_ed, c.clone())),
            Err(Failure::BadSignature)
        );
        // ES384 with only a P-256 key
        assert_eq!(
            check(&format!("{}.e30.c2ln", b64(&json!({"alg": "ES384"})))),
            Err(Failure::NoKeyForAlg)
        );
        // HMAC never from a key set
        assert_eq!(check(&hs(c.clone())), Err(Failure::AlgNotAllowed));
        // A static Ed25519 PEM key (no kid) serves tokens with any kid.
        let p = policy(json!({"public_key": ed_pem}));
        assert!(p
            .verifier()
            .verify(
                &mint(Algorithm::EdDSA, Some("any"), &ed_enc, c.clone()),
                NOW
            )
            .is_ok());
    }

    #[test]
    fn settings_errors() {
        let e = errors(json!({}));
        assert!(e.contains("no keys to verify tokens"), "{e}");
        let e = errors(json!({"secret": "short"}));
        assert!(
            e.contains("secret: an HMAC secret has at least 32 bytes"),
            "{e}"
        );
        assert!(!e.contains("short"), "the secret was echoed: {e}");
        let e = errors(json!({"secret": "!!!", "secret_base64": true}));
        assert!(e.contains("not base64"), "{e}");
        assert!(
            errors(json!({"secret": STANDARD.encode([7u8; 32]), "secret_base64": true})).is_empty()
        );
        let e = errors(
            json!({"public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}),
        );
        assert!(e.contains("public_key: not a PEM public key"), "{e}");
        let e = errors(json!({"public_key": "keys/public.pem"}));
        assert!(e.contains("absolute path"), "{e}");
        let e = errors(json!({"public_key": "/nonexistent/public.pem"}));
        assert!(e.contains("cannot read /nonexistent/public.pem"), "{e}");
        let e = errors(json!({"jwks_uri": "http://idp.example.com/keys"}));
        assert!(e.contains("jwks_uri: ") && e.contains("https"), "{e}");
        assert!(
            errors(json!({"jwks_uri": "http://idp.example.com/keys", "allow_http": true}))
                .is_empty()
        );
        let e = errors(json!({"issuer": "not a url"}));
        assert!(
            e.contains("issuer: keys are found through OpenID Connect discovery"),
            "{e}"
        );
        // With a key, the issuer is only checked against `iss`.
        assert!(errors(json!({"secret": SECRET, "issuer": "my-issuer"})).is_empty());
        let e =
            errors(json!({"secret": SECRET, "algorithms": ["none", "HS257", "RS256", "HS512"]}));
        assert!(e.contains("algorithms[0]: `none`"), "{e}");
        assert!(
            e.contains("algorithms[1]: `HS257` is not an algorithm"),
            "{e}"
        );
        assert!(
            e.contains("algorithms[2]: no configured key can verify RS256"),
            "{e}"
        );
        assert!(!e.contains("algorithms[3]"), "{e}");
        let e = errors(json!({"jwks_uri": "https://idp.test/k", "algorithms": ["HS256"]}));
        assert!(e.contains("HMAC algorithms need `secret`"), "{e}");
        let e = errors(
            json!({"secret": SECRET, "locations": ["cookie:", "form:x", "header:bad header"]}),
        );
        assert!(
            e.contains("locations[0]") && e.contains("locations[1]") && e.contains("locations[2]"),
            "{e}"
        );
        let e = errors(
            json!({"secret": SECRET, "claims_to_headers": {"sub": "bad header", "email": "Host"}}),
        );
        assert!(
            e.contains("claims_to_headers.sub") && e.contains("claims_to_headers.email"),
            "{e}"
        );
        let e = errors(json!({"secret": SECRET, "jwks_cache_min": "2h", "jwks_cache_max": "1h"}));
        assert!(e.contains("jwks_cache_min"), "{e}");
        let e = errors(json!({"jwks_uri": "https://idp.test/k", "ca": "ca.pem"}));
        assert!(
            e.contains("ca: give the CA bundle as PEM text or as an absolute path"),
            "{e}"
        );
        let e = errors(json!({"jwks_uri": "https://idp.test/k", "ca": "/nonexistent/ca.pem"}));
        assert!(e.contains("ca: cannot read the CA bundle"), "{e}");
        let e = errors(json!({"secret": SECRET, "anonymous": "bad name"}));
        assert!(e.contains("anonymous"), "{e}");
        let e = errors(json!({"secret": SECRET, "secrett": "x"}));
        assert!(e.contains("unknown field"), "{e}");
        let r = rsa();
        let e = errors(json!({"public_key": pem("PRIVATE KEY", b"x")}));
        assert!(e.contains("private key"), "{e}");
        assert!(errors(json!({"public_key": r.public_pem, "algorithms": ["PS256"]})).is_empty());
    }

    fn request(headers: &[(&str, &str)], uri: &str) -> Request<Body> {
        let mut b = Request::builder().uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Body::default()).unwrap()
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "rid".into(),
            "127.0.0.1".parse().unwrap(),
            Arc::from("r"),
            "/".into(),
            Default::default(),
        )
    }

    fn run(p: &Jwt, ctx: &mut Ctx, req: &mut Request<Body>) -> Result<(), GatewayError> {
        match p.on_request(ctx, req) {
            Step::Ready(Some(Flow::Continue)) => Ok(()),
            Step::Ready(Some(Flow::Error(e))) => Err(e),
            _ => panic!("not a synchronous answer"),
        }
    }

    #[test]
    fn request_path() {
        let p = policy(json!({"secret": SECRET, "require_exp": false,
            "locations": ["bearer", "header:x-token", "query:jwt", "cookie:session"],
            "claims_to_headers": {"sub": "X-User-Id", "roles": "X-Roles"}}));
        let t = hs(json!({"sub": "alice", "roles": ["a", "b"]}));
        // Bearer: accepted, claims in the context, headers set, forged ones replaced,
        // the token removed.
        let mut c = ctx();
        let mut r = request(
            &[
                ("authorization", &format!("Bearer {t}")),
                ("x-user-id", "mallory"),
            ],
            "/a",
        );
        run(&p, &mut c, &mut r).unwrap();
        assert_eq!(c.auth, Some("jwt"));
        assert!(c.consumer.is_none());
        assert_eq!(c.jwt_claims.as_ref().unwrap()["sub"], "alice");
        assert_eq!(r.headers()["x-user-id"], "alice");
        assert_eq!(r.headers()["x-roles"], r#"["a","b"]"#);
        assert!(r.headers().get("authorization").is_none());
        // No token: the forged header is still removed; the request goes on.
        let mut c = ctx();
        let mut r = request(&[("x-user-id", "mallory")], "/a");
        run(&p, &mut c, &mut r).unwrap();
        assert!(r.headers().get("x-user-id").is_none());
        assert!(c.auth.is_none());
        // Another scheme or a non-JWT bearer: not ours.
        let mut r = request(&[("authorization", "Basic YTpi")], "/a");
        run(&p, &mut ctx(), &mut r).unwrap();
        assert!(r.headers().get("authorization").is_some());
        let mut r = request(&[("authorization", "Bearer opaque-key")], "/a");
        run(&p, &mut ctx(), &mut r).unwrap();
        // A custom header, a query parameter, a cookie.
        let mut c = ctx();
        let mut r = request(&[("x-token", &t)], "/a");
        run(&p, &mut c, &mut r).unwrap();
        assert!(r.headers().get("x-token").is_none());
        let mut c = ctx();
        let mut r = request(&[], &format!("/a?x=1&jwt={t}&y=2"));
        run(&p, &mut c, &mut r).unwrap();
        assert_eq!(r.uri().to_string(), "/a?x=1&y=2");
        assert_eq!(c.secret_query.as_deref(), Some("jwt"));
        let mut c = ctx();
        let mut r = request(&[("cookie", &format!("a=1; session={t}; b=2"))], "/a");
        run(&p, &mut c, &mut r).unwrap();
        assert_eq!(r.headers()["cookie"], "a=1; b=2");
        assert_eq!(c.auth, Some("jwt"));
        // A refusal: 401 with the RFC 6750 challenge naming the failure.
        let bad = mint(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(b"another-secret-another-secret-0123456789"),
            json!({"sub": "a"}),
        );
        let mut r = request(&[("authorization", &format!("bearer {bad}"))], "/a");
        let e = run(&p, &mut ctx(), &mut r).unwrap_err();
        assert_eq!(e.kind.status(), 401);
        assert_eq!(e.message, "the token's signature is not valid");
        let (_, ch) = e
            .headers
            .iter()
            .find(|(n, _)| n == "www-authenticate")
            .unwrap();
        assert_eq!(
            ch,
            "Bearer realm=\"portico\", error=\"invalid_token\", error_description=\"the token's signature is not valid\""
        );
        assert_eq!(p.auth().unwrap().challenge, "Bearer realm=\"portico\"");
    }

    #[test]
    fn consumers_by_subject() {
        use portico_config::ConsumerDecl;
        let decl: ConsumerDecl = serde_json::from_value(json!({"name": "alice",
            "credentials": [{"type": "jwt", "subject": "user-1"}]}))
        .unwrap();
        let declared = portico_store::Declared::compile(&[decl], None).unwrap();
        let identity = Arc::new(Identity::detached());
        identity.set_declared(declared).unwrap();
        let mk = |s: Value| {
            Jwt::new(serde_json::from_value(s).unwrap(), identity.clone())
                .ok()
                .unwrap()
        };
        let p = mk(json!({"secret": SECRET, "require_exp": false}));
        let mut c = ctx();
        let mut r = request(
            &[(
                "authorization",
                &format!("Bearer {}", hs(json!({"sub": "user-1"}))),
            )],
            "/",
        );
        run(&p, &mut c, &mut r).unwrap();
        assert_eq!(c.consumer.as_ref().unwrap().name, "alice");
        // Another claim names the consumer.
        let p = mk(json!({"secret": SECRET, "require_exp": false, "consumer_claim": "client_id"}));
        let mut c = ctx();
        let mut r = request(
            &[(
                "authorization",
                &format!("Bearer {}", hs(json!({"sub": "x", "client_id": "user-1"}))),
            )],
            "/",
        );
        run(&p, &mut c, &mut r).unwrap();
        assert_eq!(c.consumer.as_ref().unwrap().name, "alice");
        // An unknown subject: authenticated without a consumer, or refused.
        let t = hs(json!({"sub": "user-2"}));
        let mut c = ctx();
        let mut r = request(&[("authorization", &format!("Bearer {t}"))], "/");
        run(
            &mk(json!({"secret": SECRET, "require_exp": false})),
            &mut c,
            &mut r,
        )
        .unwrap();
        assert!(c.consumer.is_none() && c.auth == Some("jwt"));
        let mut r = request(&[("authorization", &format!("Bearer {t}"))], "/");
        let e = run(
            &mk(json!({"secret": SECRET, "require_exp": false, "require_consumer": true})),
            &mut ctx(),
            &mut r,
        )
        .unwrap_err();
        assert_eq!(e.message, Failure::NoConsumer.message());
    }

    #[test]
    fn keys_unavailable_without_a_runtime_fetch() {
        // With only a jwks_uri and nothing fetched yet, the request path asks for a
        // fetch; the pure verifier says the keys are unavailable.
        let p = policy(json!({"jwks_uri": "http://127.0.0.1:9/jwks"}));
        let r = rsa();
        let t = mint(
            Algorithm::RS256,
            Some("k"),
            &r.enc,
            json!({"exp": NOW + 60}),
        );
        assert!(matches!(p.evaluate(&t, NOW, 0, true), Next::Fetch(_)));
        assert!(matches!(
            p.evaluate(&t, NOW, 0, false),
            Next::Done(Err(Failure::KeysUnavailable))
        ));
        // An HMAC token never waits for a fetch.
        assert!(matches!(
            p.evaluate(&hs(json!({})), NOW, 0, true),
            Next::Done(Err(Failure::AlgNotAllowed))
        ));
    }
}
