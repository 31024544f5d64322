//! `oidc`: an OpenID Connect relying party for browser apps — the authorization-code
//! flow with PKCE (RFC 7636, `S256`), a session in an encrypted cookie, token refresh
//! and RP-initiated logout.
//!
//! - **Login.** A browser navigation without a valid session is redirected to the
//!   identity provider's `authorization_endpoint` (found through discovery of
//!   `issuer`) with a random `state`, `nonce` and PKCE challenge; these, the verifier
//!   and the URL to come back to are kept in a short-lived encrypted cookie
//!   (`{cookie_name}_auth`, 10 minutes). Other requests (APIs, XHR/fetch) are not
//!   redirected: without another credential they get the route's 401.
//! - **Callback** (`redirect_path`): the `state` is checked against the cookie
//!   (constant time), the code is exchanged at the `token_endpoint`
//!   (`client_secret_basic`), the ID token is verified by an inner [`Jwt`] policy
//!   (discovery, key set cache and refresh, algorithm rules, `iss`, `aud` =
//!   `client_id`, `exp`) plus `nonce` and `azp` here; then the session cookie is set
//!   and the browser goes back to where it was (same origin only).
//! - **Session cookie:** the claims needed upstream, the refresh token, the access
//!   token's expiry and the session's absolute expiry, as JSON sealed with AES-256-GCM
//!   (key from `session_secret` by HKDF-SHA256, a random 96-bit nonce per cookie, the
//!   cookie's name as associated data), base64url.
//! - **Refresh:** an access token within 60 s of its expiry is refreshed (one refresh
//!   per refresh token at a time) before the request goes on; the new cookie is sent
//!   with the response. A failed refresh ends the session.
//! - **Logout** (`logout_path`): the cookies are cleared and the browser goes to the
//!   provider's `end_session_endpoint` (or to `post_logout_redirect`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::{constant_time, digest, hkdf, rand};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{AUTHORIZATION, CACHE_CONTROL, COOKIE, HOST, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use parking_lot::Mutex;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use portico_config::units::Dur;
use portico_config::{KeyPath, Secret};
use portico_store::{now_secs, Identity};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::auth::{claim_header, info, refusal, REALM};
use super::fetch::{ca_roots, check_url, Fetch, HttpFetch};
use super::jwks::{discovery_url, mono_ms};
use super::jwt::{self, looks_like_jwt, Jwt};
use crate::body::Body;
use crate::ctx::{cookie, query_param, Ctx};
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// The shortest `session_secret` accepted.
pub const MIN_SESSION_SECRET: usize = 32;
/// Lifetime of the login cookie (`{cookie_name}_auth`), in seconds.
pub const LOGIN_TTL: i64 = 600;
/// An access token this close to its expiry (seconds) is refreshed.
pub const REFRESH_MARGIN: i64 = 60;
/// The largest `name=value` of a cookie the policy sets (browsers keep ~4096 bytes
/// per cookie, attributes included).
pub const MAX_COOKIE: usize = 3800;
/// The longest URL to come back to after the login that is kept (longer: the path
/// alone, or `/`).
const MAX_RETURN: usize = 1500;
/// How long a discovery document is used before it is fetched again (ms).
const DISCOVERY_TTL_MS: u64 = 3_600_000;
/// After a failed discovery, at most one new attempt per this long (ms).
const DISCOVERY_RETRY_MS: u64 = 5_000;
/// How long the outcome of a refresh is reused for requests carrying the same
/// refresh token (parallel requests, a browser that has not stored the new cookie yet).
const REFRESH_REUSE_MS: u64 = 30_000;
/// The format byte in front of a sealed cookie.
const COOKIE_VERSION: u8 = 1;
const TAG_LEN: usize = 16;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The OpenID provider: its discovery document is
    /// `{issuer}/.well-known/openid-configuration`, and ID tokens must name it as `iss`.
    pub issuer: String,
    /// The gateway's client id at the provider (also the required ID token audience).
    pub client_id: String,
    /// The client secret, sent with HTTP Basic at the token endpoint
    /// (`client_secret_basic`). Without it the gateway is a public client (PKCE only).
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// The callback path the provider redirects back to (on the request's own host).
    #[serde(default = "default_redirect_path")]
    pub redirect_path: String,
    /// The path that ends the session (default `/oauth2/logout`).
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    /// Where the browser goes after the logout: a path on the request's host or an
    /// absolute URL (default `/`).
    #[serde(default = "default_post_logout")]
    pub post_logout_redirect: String,
    /// Scopes asked for; `openid` is required (default `[openid, profile, email]`).
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The secret the session cookies are encrypted with (at least 32 bytes; a base64
    /// string is used as it is).
    pub session_secret: Secret,
    /// The session cookie's name; the login cookie is `{cookie_name}_auth`.
    #[serde(default = "default_cookie_name")]
    pub cookie_name: String,
    /// Absolute lifetime of a session (default 8h); a refresh does not extend it.
    #[serde(default = "default_session_ttl")]
    pub session_ttl: Dur,
    /// Claims to send upstream as headers: `{claim: Header-Name}`.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// The claim naming the consumer (default `sub`).
    #[serde(default = "default_claim")]
    pub consumer_claim: String,
    /// More ID token claims to keep in the session (for `claims` rules and `${jwt.*}`
    /// templates); `sub`, `consumer_claim` and the `claims_to_headers` claims always are.
    #[serde(default)]
    pub keep_claims: Vec<String>,
    /// Timeout of one call to the provider (discovery, keys, token endpoint).
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: Dur,
    /// A PEM bundle (inline, or the absolute path of a file): calls to the provider
    /// trust only these CAs (default: the system's roots).
    #[serde(default)]
    pub ca: Option<String>,
    /// Accept a plain-http issuer (and endpoints) elsewhere than on loopback, and
    /// leave `Secure` off the cookies of requests that came over plain http.
    #[serde(default)]
    pub allow_http: bool,
}

fn default_redirect_path() -> String {
    "/oauth2/callback".into()
}
fn default_logout_path() -> String {
    "/oauth2/logout".into()
}
fn default_post_logout() -> String {
    "/".into()
}
fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "profile".into(), "email".into()]
}
fn default_cookie_name() -> String {
    "portico_session".into()
}
fn default_session_ttl() -> Dur {
    Dur::secs(8 * 3600)
}
fn default_claim() -> String {
    "sub".into()
}
fn default_fetch_timeout() -> Dur {
    Dur::secs(5)
}

/// Characters percent-encoded in query values (everything but RFC 3986 unreserved).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

// ---------------------------------------------------------------------------------
// Cookie sealing

/// Seals and opens cookie values: AES-256-GCM with a random 96-bit nonce, the cookie
/// name as associated data. Format: base64url(`0x01` ‖ nonce ‖ ciphertext ‖ tag).
pub struct Sealer {
    key: RandomizedNonceKey,
}

struct KeyLen(usize);

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        self.0
    }
}

impl Sealer {
    /// The key: HKDF-SHA256 of `secret`, bound to `context` (the issuer and client id,
    /// so two policies sharing a secret do not accept each other's cookies).
    pub fn new(secret: &[u8], context: &[u8]) -> Result<Sealer, String> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"portico oidc session cookie v1");
        let prk = salt.extract(secret);
        let info = [context];
        let okm = prk
            .expand(&info, KeyLen(32))
            .map_err(|_| "deriving the cookie key failed".to_string())?;
        let mut key = [0u8; 32];
        okm.fill(&mut key)
            .map_err(|_| "deriving the cookie key failed".to_string())?;
        let key = RandomizedNonceKey::new(&AES_256_GCM, &key)
            .map_err(|_| "making the cookie key failed".to_string())?;
        Ok(Sealer { key })
    }

    /// `plain` sealed for the cookie `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Option<String> {
        let mut buf = plain.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(name.as_bytes()), &mut buf)
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(COOKIE_VERSION);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        Some(URL_SAFE_NO_PAD.encode(out))
    }

    /// The plaintext of a value sealed for the cookie `name`, or None when it was not
    /// (tampered with, another key, another cookie, not a sealed value at all).
    pub fn open(&self, name: &str, value: &str) -> Option<Vec<u8>> {
        let mut raw = URL_SAFE_NO_PAD.decode(value.trim()).ok()?;
        if raw.len() < 1 + NONCE_LEN + TAG_LEN || raw.first() != Some(&COOKIE_VERSION) {
            return None;
        }
        let (head, sealed) = raw.split_at_mut(1 + NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(head.get(1..)?).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), sealed)
            .ok()?;
        Some(plain.to_vec())
    }
}

// ---------------------------------------------------------------------------------
// Small pure helpers (unit-tested)

/// `n` random bytes, base64url.
fn random_token(n: usize) -> Option<String> {
    let mut b = vec![0u8; n];
    rand::fill(&mut b).ok()?;
    Some(URL_SAFE_NO_PAD.encode(b))
}

/// The PKCE `S256` challenge of a verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, verifier.as_bytes()))
}

/// Constant-time equality (of `state`, `nonce`).
pub fn same(a: &str, b: &str) -> bool {
    constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

/// Whether a value is a same-origin path to redirect to: `/...`, not `//host` nor
/// `/\host` (which browsers read as another host), no control characters.
pub fn is_local_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.starts_with("//")
        && !p.starts_with("/\\")
        && !p.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// Where to come back to after the login: the request's (normalized) path and query
/// when they are a same-origin path (never another host) and not one of the policy's
/// own paths; else `/`.
pub fn return_url(path: &str, query: Option<&str>, own: &[&str]) -> String {
    if !is_local_path(path) || own.contains(&path) {
        return "/".into();
    }
    let full = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    if full.len() <= MAX_RETURN && is_local_path(&full) {
        full
    } else if path.len() <= MAX_RETURN {
        path.to_string()
    } else {
        "/".into()
    }
}

/// Whether a request is a browser navigation (which may be redirected to log in):
/// `GET`/`HEAD`, `Accept` naming `text/html`, not an XHR (`X-Requested-With`), and a
/// `Sec-Fetch-Mode` (when sent) of `navigate`.
pub fn is_navigation(method: &Method, h: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let html = h
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/html"));
    if !html {
        return false;
    }
    if h.get("x-requested-with").is_some() {
        return false;
    }
    match h.get("sec-fetch-mode").and_then(|v| v.to_str().ok()) {
        Some(mode) => mode.eq_ignore_ascii_case("navigate"),
        None => true,
    }
}

/// `scheme://host[:port]` of a request: `https` when it came over TLS; the host from
/// `Host` (or the URI's authority, HTTP/2), which must be a plain `host[:port]`.
pub fn origin(tls: bool, req_uri: &Uri, h: &HeaderMap) -> Option<String> {
    let host = h
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req_uri.authority().map(|a| a.as_str()))?;
    let a: http::uri::Authority = host.parse().ok()?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    let scheme = if tls { "https" } else { "http" };
    Some(format!("{scheme}://{}", a.as_str()))
}

/// `url` with more query parameters.
fn with_query(url: &str, params: &[(&str, &str)]) -> String {
    let mut out = String::from(url);
    let mut sep = if url.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        out.push(sep);
        out.push_str(&enc(k));
        out.push('=');
        out.push_str(&enc(v));
        sep = '&';
    }
    out
}

/// A `Set-Cookie` value.
fn set_cookie(name: &str, value: &str, max_age: Option<i64>, secure: bool) -> Option<HeaderValue> {
    let mut s = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(a) = max_age {
        s.push_str(&format!("; Max-Age={a}"));
    }
    if secure {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).ok()
}

/// Remove some cookies from the `Cookie` headers, keeping the others.
fn remove_cookies(h: &mut HeaderMap, names: &[&str]) {
    let kept: Vec<String> = h
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|line| {
            line.split(';')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .filter(|c| {
                    c.split_once('=')
                        .is_none_or(|(k, _)| !names.contains(&k.trim()))
                })
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

/// Text from the provider shown to the client: printable ASCII, at most 200 bytes.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

// ---------------------------------------------------------------------------------
// What the cookies hold

/// The login in progress (`{cookie_name}_auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// `state`.
    pub s: String,
    /// `nonce`.
    pub n: String,
    /// The PKCE verifier.
    pub v: String,
    /// Where to come back to (a same-origin path).
    pub r: String,
    /// The `redirect_uri` sent (the token request repeats it exactly).
    pub u: String,
    /// Expiry, Unix seconds.
    pub e: i64,
}

/// Why a callback is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackError {
    Expired,
    Provider(String),
    NoState,
    WrongState,
    NoCode,
    WrongIssuer,
}

impl CallbackError {
    pub fn message(&self) -> String {
        match self {
            CallbackError::Expired => {
                "the login took too long (more than 10 minutes): log in again".into()
            }
            CallbackError::Provider(e) => {
                format!("the identity provider refused the login: {e}")
            }
            CallbackError::NoState => "the login callback has no state".into(),
            CallbackError::WrongState => {
                "the login callback's state does not match the login in progress".into()
            }
            CallbackError::NoCode => "the login callback has no authorization code".into(),
            CallbackError::WrongIssuer => "the login callback names another issuer (iss)".into(),
        }
    }
}

/// Check a callback's query against the login in progress at `now`: the code.
pub fn check_callback(
    pending: &Pending,
    query: Option<&str>,
    issuer: &str,
    now: i64,
) -> Result<String, CallbackError> {
    if now >= pending.e {
        return Err(CallbackError::Expired);
    }
    if let Some(e) = query_param(query, "error") {
        let mut m = printable(&e);
        if let Some(d) = query_param(query, "error_description") {
            m.push_str(": ");
            m.push_str(&printable(&d));
        }
        return Err(CallbackError::Provider(m));
    }
    let state = query_param(query, "state").ok_or(CallbackError::NoState)?;
    if !same(&state, &pending.s) {
        return Err(CallbackError::WrongState);
    }
    // RFC 9207: when the provider names itself, it must be the configured one.
    if let Some(iss) = query_param(query, "iss") {
        if iss != issuer {
            return Err(CallbackError::WrongIssuer);
        }
    }
    query_param(query, "code")
        .filter(|c| !c.is_empty())
        .map(|c| c.into_owned())
        .ok_or(CallbackError::NoCode)
}

/// The checks of an ID token this policy adds to the signature, `iss`, `aud` and time
/// checks: the `nonce` of the login, `azp` (required with several audiences), `sub`.
pub fn check_id_claims(
    claims: &Map<String, Value>,
    nonce: Option<&str>,
    client_id: &str,
) -> Result<(), &'static str> {
    if let Some(n) = nonce {
        match claims.get("nonce").and_then(Value::as_str) {
            Some(got) if same(got, n) => {}
            Some(_) => return Err("the ID token's nonce does not match the login"),
            None => return Err("the ID token has no nonce"),
        }
    }
    let several = matches!(claims.get("aud"), Some(Value::Array(a)) if a.len() > 1);
    match claims.get("azp") {
        Some(Value::String(azp)) if azp == client_id => {}
        Some(_) => return Err("the ID token's authorized party (azp) is not this client"),
        None if several => {
            return Err("the ID token has several audiences and no authorized party (azp)")
        }
        None => {}
    }
    match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => Ok(()),
        _ => Err("the ID token has no subject (sub)"),
    }
}

/// A session (the session cookie).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The kept claims.
    pub c: Map<String, Value>,
    /// The refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<String>,
    /// The access token's expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<i64>,
    /// The session's absolute expiry, Unix seconds.
    pub x: i64,
}

impl Session {
    fn needs_refresh(&self, now: i64) -> bool {
        self.r.is_some()
            && self
                .a
                .is_some_and(|a| now.saturating_add(REFRESH_MARGIN) >= a)
    }
}

/// A token endpoint's answer.
#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl TokenAnswer {
    fn expires_in(&self) -> Option<i64> {
        match &self.expires_in {
            Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// Why a token call failed.
enum TokenError {
    /// The provider refused (a 4xx, e.g. `invalid_grant`).
    Refused(String),
    /// The provider could not be asked or answered something unusable.
    Unavailable(String),
}

// ---------------------------------------------------------------------------------
// Discovery

#[derive(Debug)]
struct Endpoints {
    authorization: String,
    token: String,
    end_session: Option<String>,
}

/// The provider's endpoints, from its discovery document (kept an hour).
struct Discovery {
    issuer: String,
    allow_http: bool,
    held: Mutex<Option<(Arc<Endpoints>, u64)>>,
    /// Monotonic ms + 1 of the last failure (0: none).
    failed_at: AtomicU64,
    one: tokio::sync::Mutex<()>,
}

impl Discovery {
    async fn endpoints(&self, fetch: &HttpFetch) -> Result<Arc<Endpoints>, String> {
        let held = self.held.lock().clone();
        if let Some((e, at)) = &held {
            if mono_ms() < at.saturating_add(DISCOVERY_TTL_MS) {
                return Ok(e.clone());
            }
        }
        let _one = self.one.lock().await;
        let now = mono_ms();
        let held = self.held.lock().clone();
        if let Some((e, at)) = &held {
            if now < at.saturating_add(DISCOVERY_TTL_MS) {
                return Ok(e.clone());
            }
        }
        let failed = self.failed_at.load(Ordering::Acquire);
        if failed != 0 && now < (failed - 1).saturating_add(DISCOVERY_RETRY_MS) {
            return held
                .map(|(e, _)| e)
                .ok_or_else(|| "the last discovery failed moments ago".to_string());
        }
        match self.fetch(fetch).await {
            Ok(e) => {
                let e = Arc::new(e);
                *self.held.lock() = Some((e.clone(), now));
                self.failed_at.store(0, Ordering::Release);
                Ok(e)
            }
            Err(err) => {
                self.failed_at
                    .store(now.saturating_add(1), Ordering::Release);
                tracing::warn!(issuer = %self.issuer, error = %err, keeping_endpoints = held.is_some(), "OpenID Connect discovery failed");
                held.map(|(e, _)| e).ok_or(err)
            }
        }
    }

    async fn fetch(&self, fetch: &HttpFetch) -> Result<Endpoints, String> {
        let url = discovery_url(&self.issuer);
        let f = fetch
            .get(&url)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if f.status != 200 {
            return Err(format!("GET {url}: status {}", f.status));
        }
        let doc: Value = serde_json::from_slice(&f.body)
            .map_err(|e| format!("GET {url}: the discovery document is not JSON: {e}"))?;
        parse_discovery(&doc, &self.issuer, self.allow_http).map_err(|e| format!("GET {url}: {e}"))
    }
}

fn parse_discovery(doc: &Value, issuer: &str, allow_http: bool) -> Result<Endpoints, String> {
    let found = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
    if found != issuer {
        return Err(format!(
            "the discovery document names the issuer `{found}`, not `{issuer}`"
        ));
    }
    let url = |name: &str| -> Result<String, String> {
        let u = doc
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the discovery document has no `{name}`"))?;
        check_url(u, allow_http).map_err(|e| format!("{name}: {e}"))?;
        Ok(u.to_string())
    };
    let authorization = url("authorization_endpoint")?;
    let token = url("token_endpoint")?;
    let end_session = match doc.get("end_session_endpoint") {
        None | Some(Value::Null) => None,
        Some(_) => match url("end_session_endpoint") {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(issuer, error = %e, "the end_session_endpoint is not used");
                None
            }
        },
    };
    if let Some(list) = doc
        .get("code_challenge_methods_supported")
        .and_then(Value::as_array)
    {
        if !list.iter().any(|m| m.as_str() == Some("S256")) {
            tracing::warn!(
                issuer,
                "the provider does not list S256 in code_challenge_methods_supported; \
                 PKCE S256 is sent anyway"
            );
        }
    }
    Ok(Endpoints {
        authorization,
        token,
        end_session,
    })
}

// ---------------------------------------------------------------------------------
// The policy

/// `Set-Cookie` values to add to the response (a refreshed session, a cleared one).
#[derive(Clone)]
struct SetCookies(Vec<HeaderValue>);

type RefreshCell = Arc<tokio::sync::OnceCell<Result<Session, String>>>;

/// What to do with a request that has no valid session.
enum NoSession {
    /// Let the route's other authentication policies (or its 401) have it.
    Continue,
    /// Redirect the browser to log in.
    Login,
    /// Answer 401 now (a session was there but is not valid).
    Refuse,
}

pub struct Oidc {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    redirect_path: String,
    logout_path: String,
    post_logout_redirect: String,
    scope: String,
    cookie_name: String,
    auth_cookie_name: String,
    session_ttl: i64,
    claims_to_headers: Vec<(String, HeaderName)>,
    /// The header names of `claims_to_headers`, which clients may not send.
    claim_headers: Vec<HeaderName>,
    consumer_claim: String,
    /// The claims kept in the session.
    kept: Vec<String>,
    allow_http: bool,
    sealer: Sealer,
    /// Verifies ID tokens (keys by discovery, `iss`, `aud` = client id, times).
    id_tokens: Jwt,
    fetch: HttpFetch,
    discovery: Discovery,
    refreshes: Mutex<HashMap<[u8; 32], (u64, RefreshCell)>>,
    challenge: HeaderValue,
    identity: Arc<Identity>,
}

fn check_path(p: &str) -> Result<(), String> {
    if !is_local_path(p) || p.contains(['?', '#', ' ']) {
        return Err(format!(
            "`{p}` is not a path: it starts with one `/` and has no query or fragment"
        ));
    }
    Ok(())
}

fn is_cookie_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

impl Oidc {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        let root = KeyPath::root();
        let mut errs = SettingsErrors::new();
        if s.issuer.is_empty() {
            errs.push((root.key("issuer"), "`issuer` is empty".into()));
        } else if let Err(e) = check_url(&s.issuer, s.allow_http) {
            errs.push((root.key("issuer"), e));
        }
        if s.client_id.is_empty() || s.client_id.chars().any(char::is_control) {
            errs.push((
                root.key("client_id"),
                "the client id is empty or has control characters".into(),
            ));
        }
        if s.client_secret.as_ref().is_some_and(|c| c.0.is_empty()) {
            errs.push((
                root.key("client_secret"),
                "the client secret is empty (leave it out for a public client)".into(),
            ));
        }
        for (key, p) in [
            ("redirect_path", &s.redirect_path),
            ("logout_path", &s.logout_path),
        ] {
            if let Err(e) = check_path(p) {
                errs.push((root.key(key), e));
            }
        }
        if s.redirect_path == s.logout_path {
            errs.push((
                root.key("logout_path"),
                "`logout_path` is the same as `redirect_path`".into(),
            ));
        }
        let post = &s.post_logout_redirect;
        let absolute = post
            .parse::<Uri>()
            .ok()
            .filter(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            })
            .is_some();
        if !absolute && !is_local_path(post) {
            errs.push((
                root.key("post_logout_redirect"),
                format!("`{post}` is neither a path (`/...`) nor an absolute http(s) URL"),
            ));
        }
        if !s.scopes.iter().any(|x| x == "openid") {
            errs.push((
                root.key("scopes"),
                "the scopes must include `openid`".into(),
            ));
        }
        for (i, sc) in s.scopes.iter().enumerate() {
            let ok = !sc.is_empty()
                && sc
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
            if !ok {
                errs.push((
                    root.key("scopes").index(i),
                    format!("`{sc}` is not a scope token"),
                ));
            }
        }
        if s.session_secret.0.len() < MIN_SESSION_SECRET {
            errs.push((
                root.key("session_secret"),
                format!("the session secret has at least {MIN_SESSION_SECRET} bytes"),
            ));
        }
        if !is_cookie_name(&s.cookie_name) {
            errs.push((
                root.key("cookie_name"),
                format!("`{}` is not a cookie name", s.cookie_name),
            ));
        }
        if s.session_ttl.0.as_secs() == 0 {
            errs.push((root.key("session_ttl"), "must be 1s or longer".into()));
        }
        if s.fetch_timeout.0.is_zero() {
            errs.push((root.key("fetch_timeout"), "must be longer than 0s".into()));
        }
        if s.consumer_claim.is_empty() {
            errs.push((root.key("consumer_claim"), "the claim name is empty".into()));
        }
        let mut claims_to_headers = Vec::new();
        for (claim, name) in &s.claims_to_headers {
            match claim_header(name) {
                Ok(h) => claims_to_headers.push((claim.clone(), h)),
                Err(e) => errs.push((root.key("claims_to_headers").key(claim), e)),
            }
        }
        let roots = match s.ca.as_deref().map(ca_roots).transpose() {
            Ok(r) => r,
            Err(e) => {
                errs.push((root.key("ca"), e));
                None
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }

        // ID tokens are verified by a `jwt` policy of the same issuer: keys through
        // discovery, `iss`, `aud` = the client id, `exp` required.
        let mut js: jwt::Settings = serde_json::from_value(serde_json::json!({
            "issuer": s.issuer,
            "audiences": [s.client_id],
        }))
        .map_err(|e| vec![(root.clone(), format!("the ID token rules: {e}"))])?;
        js.allow_http = s.allow_http;
        js.ca = s.ca.clone();
        js.fetch_timeout = s.fetch_timeout;
        let id_tokens = Jwt::new(js, identity.clone())?;

        let sealer = Sealer::new(
            s.session_secret.0.as_bytes(),
            format!("{}\n{}", s.issuer, s.client_id).as_bytes(),
        )
        .map_err(|e| vec![(root.key("session_secret"), e)])?;

        let mut kept: Vec<String> = vec!["sub".into(), s.consumer_claim.clone()];
        kept.extend(s.claims_to_headers.keys().cloned());
        kept.extend(s.keep_claims.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        kept.retain(|c| seen.insert(c.clone()));

        Ok(Oidc {
            discovery: Discovery {
                issuer: s.issuer.clone(),
                allow_http: s.allow_http,
                held: Mutex::new(None),
                failed_at: AtomicU64::new(0),
                one: tokio::sync::Mutex::new(()),
            },
            issuer: s.issuer,
            client_id: s.client_id,
            client_secret: s.client_secret.map(|c| c.0),
            redirect_path: s.redirect_path,
            logout_path: s.logout_path,
            post_logout_redirect: s.post_logout_redirect,
            scope: s.scopes.join(" "),
            auth_cookie_name: format!("{}_auth", s.cookie_name),
            cookie_name: s.cookie_name,
            session_ttl: i64::try_from(s.session_ttl.0.as_secs()).unwrap_or(i64::MAX),
            claim_headers: claims_to_headers.iter().map(|(_, h)| h.clone()).collect(),
            claims_to_headers,
            consumer_claim: s.consumer_claim,
            kept,
            allow_http: s.allow_http,
            sealer,
            id_tokens,
            fetch: HttpFetch::new(s.fetch_timeout.0, roots),
            refreshes: Mutex::new(HashMap::new()),
            challenge: HeaderValue::from_str(&format!("Bearer realm=\"{REALM}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer")),
            identity,
        })
    }

    /// Whether cookies set for this request carry `Secure`: always, except on a
    /// request over plain http with `allow_http: true`.
    fn secure(&self, ctx: &Ctx) -> bool {
        ctx.tls || !self.allow_http
    }

    fn clear(&self, name: &str, secure: bool) -> Option<HeaderValue> {
        set_cookie(name, "", Some(0), secure)
    }

    /// The session in a cookie value, if it opens and has not expired.
    fn open_session(&self, value: &str, now: i64) -> Result<Session, &'static str> {
        let plain = self
            .sealer
            .open(&self.cookie_name, value)
            .ok_or("the session cookie is not valid")?;
        let s: Session =
            serde_json::from_slice(&plain).map_err(|_| "the session cookie is not valid")?;
        if now >= s.x {
            return Err("the session has expired");
        }
        Ok(s)
    }

    /// The `Set-Cookie` of a session, or why it cannot be set.
    fn session_cookie(&self, s: &Session, secure: bool) -> Result<HeaderValue, String> {
        let json = serde_json::to_vec(s).map_err(|e| e.to_string())?;
        let sealed = self
            .sealer
            .seal(&self.cookie_name, &json)
            .ok_or("sealing the session failed")?;
        let len = self.cookie_name.len() + 1 + sealed.len();
        if len > MAX_COOKIE {
            return Err(format!(
                "the session cookie would be {len} bytes (at most {MAX_COOKIE}): keep fewer \
                 claims (`claims_to_headers`, `keep_claims`), or the provider's refresh token \
                 is too large"
            ));
        }
        set_cookie(&self.cookie_name, &sealed, None, secure)
            .ok_or_else(|| "the session cookie is not a valid header".to_string())
    }

    /// The claims a session keeps.
    fn keep(&self, claims: &Map<String, Value>) -> Map<String, Value> {
        self.kept
            .iter()
            .filter_map(|c| claims.get(c).map(|v| (c.clone(), v.clone())))
            .collect()
    }

    /// A valid session: the context, the claim headers.
    fn accept(&self, ctx: &mut Ctx, req: &mut Request<Body>, s: &Session) {
        super::auth::set_claim_headers(req.headers_mut(), &s.c, &self.claims_to_headers);
        if ctx.auth.is_none() {
            // Issuer-scoped `jwt` credentials apply to OIDC logins too.
            let consumer = super::auth::token_consumer(&self.identity, &s.c, &self.consumer_claim);
            ctx.auth = Some("oidc");
            ctx.consumer = consumer;
        }
        if ctx.jwt_claims.is_none() {
            ctx.jwt_claims = Some(Value::Object(s.c.clone()));
        }
    }

    /// Add `Set-Cookie` values to the response (in `upstream_response`).
    fn stash(ctx: &mut Ctx, v: Option<HeaderValue>) {
        let Some(v) = v else { return };
        match ctx.extensions.get_mut::<SetCookies>() {
            Some(list) => list.0.push(v),
            None => {
                ctx.extensions.insert(SetCookies(vec![v]));
            }
        }
    }

    fn decide(&self, ctx: &Ctx, req: &Request<Body>, had_session: bool) -> NoSession {
        // Another credential: the route's other authentication policies judge it.
        if ctx.auth.is_some() || req.headers().contains_key(AUTHORIZATION) {
            return NoSession::Continue;
        }
        if is_navigation(req.method(), req.headers()) {
            return NoSession::Login;
        }
        if had_session {
            NoSession::Refuse
        } else {
            NoSession::Continue
        }
    }

    fn refuse(&self, ctx: &Ctx, message: &'static str) -> GatewayError {
        let mut e = refusal(&self.challenge, message);
        if let Some(c) = self.clear(&self.cookie_name, self.secure(ctx)) {
            e = e.with_header(SET_COOKIE, c);
        }
        e
    }

    /// A request without a valid session, after an await (a failed refresh).
    async fn without_session(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        why: &'static str,
    ) -> Flow {
        match self.decide(ctx, req, true) {
            NoSession::Continue => {
                Self::stash(ctx, self.clear(&self.cookie_name, self.secure(ctx)));
                Flow::Continue
            }
            NoSession::Login => self.login(ctx, req, true).await,
            NoSession::Refuse => Flow::Error(self.refuse(ctx, why)),
        }
    }

    fn unavailable(&self, ctx: &Ctx, what: &str, e: &str) -> GatewayError {
        tracing::warn!(route = %ctx.route_name, request_id = %ctx.request_id, issuer = %self.issuer, error = %e, "oidc: {what}");
        GatewayError::new(
            ErrorKind::AuthUnavailable,
            "the identity provider is unavailable; try again later",
        )
    }

    /// Redirect to the provider's authorization endpoint.
    async fn login(&self, ctx: &mut Ctx, req: &mut Request<Body>, clear_session: bool) -> Flow {
        let ep = match self.discovery.endpoints(&self.fetch).await {
            Ok(ep) => ep,
            Err(e) => return Flow::Error(self.unavailable(ctx, "discovery failed", &e)),
        };
        let Some(origin) = origin(ctx.tls, req.uri(), req.headers()) else {
            return Flow::Error(GatewayError::new(
                ErrorKind::BadRequest,
                "the request has no valid Host to build the login callback URL from",
            ));
        };
        let (Some(state), Some(nonce), Some(verifier)) =
            (random_token(24), random_token(24), random_token(32))
        else {
            return Flow::Error(GatewayError::new(
                ErrorKind::Internal,
                "no random numbers for the login",
            ));
        };
        let redirect_uri = format!("{origin}{}", self.redirect_path);
        let pending = Pending {
            r: return_url(
                &ctx.path,
                req.uri().query(),
                &[&self.redirect_path, &self.logout_path],
            ),
            u: redirect_uri,
            e: now_secs().saturating_add(LOGIN_TTL),
            s: state,
            n: nonce,
            v: verifier,
        };
        let location = self.authorize_url(&ep.authorization, &pending);
        let secure = self.secure(ctx);
        let sealed = serde_json::to_vec(&pending)
            .ok()
            .and_then(|j| self.sealer.seal(&self.auth_cookie_name, &j));
        let Some(login_cookie) =
            sealed.and_then(|v| set_cookie(&self.auth_cookie_name, &v, Some(LOGIN_TTL), secure))
        else {
            return Flow::Error(GatewayError::new(
                ErrorKind::Internal,
                "the login cookie could not be made",
            ));
        };
        let mut cookies = vec![login_cookie];
        if clear_session {
            cookies.extend(self.clear(&self.cookie_name, secure));
        }
        redirect(&location, cookies)
    }

    /// The authorization request (OpenID Connect Core §3.1.2.1, RFC 7636 §4.3).
    fn authorize_url(&self, endpoint: &str, p: &Pending) -> String {
        let challenge = pkce_challenge(&p.v);
        with_query(
            endpoint,
            &[
                ("response_type", "code"),
                ("client_id", &self.client_id),
                ("redirect_uri", &p.u),
                ("scope", &self.scope),
                ("state", &p.s),
                ("nonce", &p.n),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        )
    }

    /// POST a grant to the token endpoint.
    async fn token_call<'a>(
        &'a self,
        endpoint: &str,
        form: &mut Vec<(&'a str, &'a str)>,
    ) -> Result<TokenAnswer, TokenError> {
        let basic = match &self.client_secret {
            Some(secret) => Some((self.client_id.as_str(), secret.as_str())),
            None => {
                form.push(("client_id", &self.client_id));
                None
            }
        };
        let answer = self
            .fetch
            .post_form(endpoint, form, basic)
            .await
            .map_err(|e| TokenError::Unavailable(format!("POST {endpoint}: {e}")))?;
        let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        if answer.status == 200 {
            return serde_json::from_value(body).map_err(|e| {
                TokenError::Unavailable(format!(
                    "POST {endpoint}: the answer is not a token response: {e}"
                ))
            });
        }
        let error = body.get("error").and_then(Value::as_str);
        match (answer.status, error) {
            (400..=499, Some(e)) => Err(TokenError::Refused(printable(e))),
            (400..=499, None) => Err(TokenError::Refused(format!("status {}", answer.status))),
            (st, _) => Err(TokenError::Unavailable(format!(
                "POST {endpoint}: status {st}"
            ))),
        }
    }

    /// Verify an ID token with the inner `jwt` policy: its claims, or why not.
    async fn verify_id_token(&self, ctx: &Ctx, token: &str) -> Result<Map<String, Value>, String> {
        if !looks_like_jwt(token) {
            return Err("the ID token is not a JWT".into());
        }
        let mut scratch = Ctx::new(
            ctx.request_id.clone(),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ctx.route_name.clone(),
            String::new(),
            Default::default(),
        );
        let mut r = Request::new(Body::default());
        let v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the ID token is not a JWT".to_string())?;
        r.headers_mut().insert(AUTHORIZATION, v);
        match self.id_tokens.on_request(&mut scratch, &mut r).await {
            Flow::Continue => match scratch.jwt_claims {
                Some(Value::Object(m)) => Ok(m),
                _ => Err("the ID token could not be verified".into()),
            },
            Flow::Error(e) => Err(e.message.into_owned()),
            Flow::Respond(_) => Err("the ID token could not be verified".into()),
        }
    }

    /// The provider redirected back: check, exchange the code, set the session.
    async fn callback(&self, ctx: &mut Ctx, req: &mut Request<Body>) -> Flow {
        let secure = self.secure(ctx);
        let clear_login = self.clear(&self.auth_cookie_name, secure);
        let fail = |kind: ErrorKind, msg: String| {
            tracing::debug!(route = %ctx.route_name, request_id = %ctx.request_id, reason = %msg, "oidc login refused");
            let mut e = GatewayError::new(kind, msg);
            if kind == ErrorKind::Unauthorized {
                e = e.with_header(http::header::WWW_AUTHENTICATE, self.challenge.clone());
            }
            if let Some(c) = clear_login.clone() {
                e = e.with_header(SET_COOKIE, c);
            }
            Flow::Error(e)
        };
        let unauthorized = |msg: String| fail(ErrorKind::Unauthorized, msg);
        let now = now_secs();
        let pending = match cookie(req.headers(), &self.auth_cookie_name) {
            None => {
                return unauthorized(
                    "no login is in progress: the login cookie is missing (expired, or the \
                     browser does not keep cookies)"
                        .into(),
                )
            }
            Some(v) => match self
                .sealer
                .open(&self.auth_cookie_name, v)
                .and_then(|p| serde_json::from_slice::<Pending>(&p).ok())
            {
                Some(p) => p,
                None => return unauthorized("the login cookie is not valid".into()),
            },
        };
        let code = match check_callback(&pending, req.uri().query(), &self.issuer, now) {
            Ok(c) => c,
            Err(e) => return unauthorized(e.message()),
        };
        let ep = match self.discovery.endpoints(&self.fetch).await {
            Ok(ep) => ep,
            Err(e) => {
                let ge = self.unavailable(ctx, "discovery failed", &e);
                return fail(ge.kind, ge.message.into_owned());
            }
        };
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", pending.u.as_str()),
            ("code_verifier", pending.v.as_str()),
        ];
        let answer = match self.token_call(&ep.token, &mut form).await {
            Ok(a) => a,
            Err(TokenError::Refused(e)) => {
                return unauthorized(format!(
                    "the identity provider refused the authorization code: {e}"
                ))
            }
            Err(TokenError::Unavailable(e)) => {
                let ge = self.unavailable(ctx, "the token exchange failed", &e);
                return fail(ge.kind, ge.message.into_owned());
            }
        };
        let Some(id_token) = answer.id_token.as_deref() else {
            return unauthorized("the identity provider's answer has no ID token".into());
        };
        let claims = match self.verify_id_token(ctx, id_token).await {
            Ok(c) => c,
            Err(e) => return unauthorized(format!("the ID token is not valid: {e}")),
        };
        if let Err(e) = check_id_claims(&claims, Some(&pending.n), &self.client_id) {
            return unauthorized(e.into());
        }
        let session = Session {
            c: self.keep(&claims),
            r: answer.refresh_token.clone(),
            a: answer.expires_in().map(|e| now.saturating_add(e)),
            x: now.saturating_add(self.session_ttl),
        };
        let session_cookie = match self.session_cookie(&session, secure) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(route = %ctx.route_name, request_id = %ctx.request_id, error = %e, "oidc: the session cannot be kept in a cookie");
                return fail(
                    ErrorKind::Internal,
                    "the session is too large for a cookie (see the gateway's log)".into(),
                );
            }
        };
        tracing::debug!(route = %ctx.route_name, request_id = %ctx.request_id, "oidc login");
        let back = if is_local_path(&pending.r) {
            pending.r.as_str()
        } else {
            "/"
        };
        let mut cookies = vec![session_cookie];
        cookies.extend(clear_login);
        redirect(back, cookies)
    }

    /// Clear the cookies; on to the provider's end-session endpoint, or to
    /// `post_logout_redirect`.
    async fn logout(&self, ctx: &mut Ctx, req: &mut Request<Body>) -> Flow {
        let secure = self.secure(ctx);
        let mut cookies: Vec<HeaderValue> = Vec::new();
        cookies.extend(self.clear(&self.cookie_name, secure));
        cookies.extend(self.clear(&self.auth_cookie_name, secure));
        let post = if self.post_logout_redirect.starts_with('/') {
            origin(ctx.tls, req.uri(), req.headers())
                .map(|o| format!("{o}{}", self.post_logout_redirect))
        } else {
            Some(self.post_logout_redirect.clone())
        };
        let target = match (self.discovery.endpoints(&self.fetch).await, post) {
            (Ok(ep), Some(post)) => match &ep.end_session {
                Some(end) => with_query(
                    end,
                    &[
                        ("client_id", &self.client_id),
                        ("post_logout_redirect_uri", &post),
                    ],
                ),
                None => self.post_logout_redirect.clone(),
            },
            (Err(e), _) => {
                tracing::warn!(route = %ctx.route_name, error = %e, "oidc logout: discovery failed; the session is ended locally only");
                self.post_logout_redirect.clone()
            }
            (Ok(_), None) => self.post_logout_redirect.clone(),
        };
        redirect(&target, cookies)
    }

    /// The single-flight cell of a refresh token.
    fn refresh_cell(&self, refresh_token: &str) -> RefreshCell {
        let d = digest::digest(&digest::SHA256, refresh_token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(d.as_ref());
        let now = mono_ms();
        let mut m = self.refreshes.lock();
        m.retain(|_, (at, _)| now < at.saturating_add(REFRESH_REUSE_MS));
        m.entry(key)
            .or_insert_with(|| (now, Arc::new(tokio::sync::OnceCell::new())))
            .1
            .clone()
    }

    /// Refresh a session's tokens at the token endpoint: the new session.
    async fn refresh(&self, ctx: &Ctx, old: &Session) -> Result<Session, String> {
        let rt = old.r.as_deref().ok_or("no refresh token")?;
        let ep = self.discovery.endpoints(&self.fetch).await?;
        let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
        let answer = match self.token_call(&ep.token, &mut form).await {
            Ok(a) => a,
            Err(TokenError::Refused(e)) => return Err(format!("the provider refused: {e}")),
            Err(TokenError::Unavailable(e)) => return Err(e),
        };
        let now = now_secs();
        let mut s = old.clone();
        if let Some(id) = answer.id_token.as_deref() {
            let claims = self
                .verify_id_token(ctx, id)
                .await
                .map_err(|e| format!("the refreshed ID token is not valid: {e}"))?;
            check_id_claims(&claims, None, &self.client_id)?;
            if claims.get("sub") != old.c.get("sub") {
                return Err("the refreshed ID token names another subject".into());
            }
            s.c = self.keep(&claims);
        }
        s.a = answer.expires_in().map(|e| now.saturating_add(e));
        if let Some(r) = answer.refresh_token {
            s.r = Some(r);
        }
        Ok(s)
    }

    async fn refresh_then_accept(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        old: Session,
    ) -> Flow {
        let Some(rt) = old.r.as_deref() else {
            self.accept(ctx, req, &old);
            return Flow::Continue;
        };
        let cell = self.refresh_cell(rt);
        let shared: &Ctx = ctx;
        let outcome = cell
            .get_or_init(|| async { self.refresh(shared, &old).await })
            .await
            .clone();
        let secure = self.secure(ctx);
        let fresh = outcome.and_then(|s| self.session_cookie(&s, secure).map(|c| (s, c)));
        match fresh {
            Ok((s, c)) => {
                Self::stash(ctx, Some(c));
                self.accept(ctx, req, &s);
                Flow::Continue
            }
            Err(e) => {
                tracing::info!(route = %ctx.route_name, request_id = %ctx.request_id, error = %e, "oidc: refreshing the tokens failed; the session ends");
                self.without_session(ctx, req, "the session has ended: log in again")
                    .await
            }
        }
    }
}

/// A `302 Found` to `location` with cookies, never cached.
fn redirect(location: &str, cookies: Vec<HeaderValue>) -> Flow {
    let Ok(loc) = HeaderValue::from_str(location) else {
        return Flow::Error(GatewayError::new(
            ErrorKind::Internal,
            "the redirect URL is not a valid header",
        ));
    };
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = StatusCode::FOUND;
    let h = r.headers_mut();
    h.insert(LOCATION, loc);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        h.append(SET_COOKIE, c);
    }
    Flow::Respond(Box::new(r))
}

impl Policy for Oidc {
    fn name(&self) -> &'static str {
        "oidc"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &None))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        // Claim headers come from the gateway only (also under `_` spellings).
        crate::ctx::remove_identity_headers(
            req.headers_mut(),
            &self.claim_headers,
            ctx.underscores,
        );
        // The normalized path (what routing saw).
        let path = ctx.path.as_str();
        if path == self.redirect_path {
            return Step::Pending(Box::pin(self.callback(ctx, req)));
        }
        if path == self.logout_path {
            return Step::Pending(Box::pin(self.logout(ctx, req)));
        }
        let raw = cookie(req.headers(), &self.cookie_name).map(str::to_string);
        if raw.is_some() || cookie(req.headers(), &self.auth_cookie_name).is_some() {
            // The upstream never sees the policy's cookies.
            remove_cookies(
                req.headers_mut(),
                &[&self.cookie_name, &self.auth_cookie_name],
            );
        }
        let now = now_secs();
        let (session, had) = match raw.as_deref().map(|v| self.open_session(v, now)) {
            None => (None, false),
            Some(Ok(s)) => (Some(s), true),
            Some(Err(why)) => {
                tracing::debug!(route = %ctx.route_name, request_id = %ctx.request_id, reason = why, "oidc session refused");
                (None, true)
            }
        };
        let Some(session) = session else {
            return match self.decide(ctx, req, had) {
                NoSession::Continue => {
                    if had {
                        Self::stash(ctx, self.clear(&self.cookie_name, self.secure(ctx)));
                    }
                    Step::cont()
                }
                NoSession::Login => Step::Pending(Box::pin(self.login(ctx, req, had))),
                NoSession::Refuse => Step::error(
                    self.refuse(ctx, "the session has expired or is not valid: log in again"),
                ),
            };
        };
        if session.needs_refresh(now) {
            return Step::Pending(Box::pin(self.refresh_then_accept(ctx, req, session)));
        }
        self.accept(ctx, req, &session);
        Step::cont()
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        if let Some(SetCookies(list)) = ctx.extensions.remove::<SetCookies>() {
            for v in list {
                resp.headers.append(SET_COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const SECRET: &str = "a-session-secret-of-at-least-32-bytes!!";
    const NOW: i64 = 1_700_000_000;

    fn policy(extra: Value) -> Oidc {
        let mut v = json!({"issuer": "https://idp.test", "client_id": "portal",
            "client_secret": "s3cret", "session_secret": SECRET,
            "claims_to_headers": {"sub": "X-User-Id", "email": "X-User-Email"}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        Oidc::new(
            serde_json::from_value(v).unwrap(),
            Arc::new(Identity::detached()),
        )
        .ok()
        .unwrap()
    }

    fn errors(v: Value) -> String {
        let s: Settings = match serde_json::from_value(v) {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        match Oidc::new(s, Arc::new(Identity::detached())) {
            Ok(_) => String::new(),
            Err(e) => e
                .iter()
                .map(|(p, m)| format!("{p}: {m}"))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    fn pending() -> Pending {
        Pending {
            s: "state-123".into(),
            n: "nonce-456".into(),
            v: "verifier".into(),
            r: "/app?x=1".into(),
            u: "https://app.test/oauth2/callback".into(),
            e: NOW + LOGIN_TTL,
        }
    }

    #[test]
    fn cookie_sealing_round_trip_and_tamper() {
        let s = Sealer::new(SECRET.as_bytes(), b"https://idp.test\nportal").unwrap();
        let plain = br#"{"c":{"sub":"u1"},"x":1}"#;
        let v = s.seal("sess", plain).unwrap();
        assert!(!v.contains(['=', '+', '/', ';', ' ']), "not base64url: {v}");
        assert_eq!(s.open("sess", &v).unwrap(), plain);
        // A fresh nonce each time: two seals differ, both open.
        let w = s.seal("sess", plain).unwrap();
        assert_ne!(v, w);
        assert_eq!(s.open("sess", &w).unwrap(), plain);
        // Any flipped bit (version, nonce, ciphertext, tag) is refused.
        let raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        for i in 0..raw.len() {
            let mut t = raw.clone();
            t[i] ^= 0x01;
            assert!(
                s.open("sess", &URL_SAFE_NO_PAD.encode(&t)).is_none(),
                "byte {i}"
            );
        }
        // Truncated, empty, not base64.
        assert!(s
            .open("sess", &URL_SAFE_NO_PAD.encode(&raw[..raw.len() - 1]))
            .is_none());
        assert!(s.open("sess", "").is_none());
        assert!(s.open("sess", "not base64 !!").is_none());
        // Sealed for another cookie (the login cookie): refused.
        assert!(s.open("sess_auth", &v).is_none());
        // Another secret, or another issuer/client with the same secret: refused.
        let other = Sealer::new(
            b"another-secret-another-secret-0123",
            b"https://idp.test\nportal",
        )
        .unwrap();
        assert!(other.open("sess", &v).is_none());
        let other = Sealer::new(SECRET.as_bytes(), b"https://idp.test\nother-client").unwrap();
        assert!(other.open("sess", &v).is_none());
    }

    #[test]
    fn pkce_rfc7636_vector() {
        // RFC 7636 Appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        // Verifiers made for a login: 43 characters of the unreserved set, random.
        let v = random_token(32).unwrap();
        assert_eq!(v.len(), 43);
        assert!(v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(v, random_token(32).unwrap());
        // state and nonce: 192 bits.
        assert_eq!(random_token(24).unwrap().len(), 32);
    }

    #[test]
    fn state_checks() {
        let p = pending();
        let iss = "https://idp.test";
        assert_eq!(
            check_callback(&p, Some("code=abc&state=state-123"), iss, NOW).unwrap(),
            "abc"
        );
        // RFC 9207 `iss`: the configured one passes, another is refused.
        assert_eq!(
            check_callback(
                &p,
                Some("code=abc&state=state-123&iss=https%3A%2F%2Fidp.test"),
                iss,
                NOW
            )
            .unwrap(),
            "abc"
        );
        assert_eq!(
            check_callback(
                &p,
                Some("code=abc&state=state-123&iss=https%3A%2F%2Fevil.test"),
                iss,
                NOW
            ),
            Err(CallbackError::WrongIssuer)
        );
        assert_eq!(
            check_callback(&p, Some("code=abc&state=state-124"), iss, NOW),
            Err(CallbackError::WrongState)
        );
        assert_eq!(
            check_callback(&p, Some("code=abc&state="), iss, NOW),
            Err(CallbackError::WrongState)
        );
        assert_eq!(
            check_callback(&p, Some("code=abc"), iss, NOW),
            Err(CallbackError::NoState)
        );
        assert_eq!(
            check_callback(&p, Some("state=state-123"), iss, NOW),
            Err(CallbackError::NoCode)
        );
        assert_eq!(
            check_callback(&p, None, iss, NOW),
            Err(CallbackError::NoState)
        );
        // Too late.
        assert_eq!(
            check_callback(&p, Some("code=abc&state=state-123"), iss, p.e),
            Err(CallbackError::Expired)
        );
        // The provider's error, shown printable.
        let e = check_callback(
            &p,
            Some("error=access_denied&error_description=User+said+no%0A"),
            iss,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            e,
            CallbackError::Provider("access_denied: User said no".into())
        );
        assert!(e.message().contains("access_denied"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "abcd"));
    }

    #[test]
    fn nonce_and_audience_checks() {
        let c = |v: Value| v.as_object().unwrap().clone();
        let ok = c(json!({"sub": "u1", "nonce": "n1", "aud": "portal"}));
        assert!(check_id_claims(&ok, Some("n1"), "portal").is_ok());
        assert!(check_id_claims(&ok, None, "portal").is_ok());
        assert_eq!(
            check_id_claims(&ok, Some("n2"), "portal"),
            Err("the ID token's nonce does not match the login")
        );
        let no_nonce = c(json!({"sub": "u1"}));
        assert_eq!(
            check_id_claims(&no_nonce, Some("n1"), "portal"),
            Err("the ID token has no nonce")
        );
        // Several audiences: azp is required and must be this client.
        let many = c(json!({"sub": "u1", "nonce": "n1", "aud": ["portal", "api"]}));
        assert!(check_id_claims(&many, Some("n1"), "portal")
            .unwrap_err()
            .contains("azp"));
        let many_azp =
            c(json!({"sub": "u1", "nonce": "n1", "aud": ["portal", "api"], "azp": "portal"}));
        assert!(check_id_claims(&many_azp, Some("n1"), "portal").is_ok());
        let wrong_azp = c(json!({"sub": "u1", "nonce": "n1", "aud": "portal", "azp": "api"}));
        assert!(check_id_claims(&wrong_azp, Some("n1"), "portal")
            .unwrap_err()
            .contains("azp"));
        let no_sub = c(json!({"nonce": "n1", "aud": "portal"}));
        assert_eq!(
            check_id_claims(&no_sub, Some("n1"), "portal"),
            Err("the ID token has no subject (sub)")
        );
    }

    #[test]
    fn return_url_is_same_origin_only() {
        let own = ["/oauth2/callback", "/oauth2/logout"];
        let r = |u: &str| {
            let u: Uri = u.parse().unwrap();
            return_url(u.path(), u.query(), &own)
        };
        assert_eq!(r("/app/page?x=1&y=2"), "/app/page?x=1&y=2");
        assert_eq!(r("/"), "/");
        // Another host is never a place to come back to (open redirect).
        assert_eq!(r("//evil.example/x"), "/");
        assert_eq!(r("//evil.example"), "/");
        assert_eq!(r("http://evil.example/steal?x=1"), "/steal?x=1");
        assert_eq!(r("https://evil.example"), "/");
        // The policy's own paths would loop.
        assert_eq!(r("/oauth2/callback?code=x"), "/");
        assert_eq!(r("/oauth2/logout"), "/");
        // Very long: the path alone.
        let long = format!("/a?{}", "q".repeat(2000));
        assert_eq!(r(&long), "/a");
        assert!(is_local_path("/a/b"));
        assert!(!is_local_path("/\\evil.example"));
        assert!(!is_local_path("https://evil.example/"));
        assert!(!is_local_path("evil"));
        assert!(!is_local_path("/a\nb"));
    }

    #[test]
    fn redirect_building() {
        let p = policy(json!({"scopes": ["openid", "email"]}));
        let mut pend = pending();
        pend.v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into();
        let url = p.authorize_url("https://idp.test/authorize", &pend);
        let uri: Uri = url.parse().unwrap();
        let q = uri.query();
        assert_eq!(uri.path(), "/authorize");
        assert_eq!(query_param(q, "response_type").unwrap(), "code");
        assert_eq!(query_param(q, "client_id").unwrap(), "portal");
        assert_eq!(
            query_param(q, "redirect_uri").unwrap(),
            "https://app.test/oauth2/callback"
        );
        assert_eq!(query_param(q, "scope").unwrap(), "openid email");
        assert_eq!(query_param(q, "state").unwrap(), "state-123");
        assert_eq!(query_param(q, "nonce").unwrap(), "nonce-456");
        assert_eq!(
            query_param(q, "code_challenge").unwrap(),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(query_param(q, "code_challenge_method").unwrap(), "S256");
        // The verifier itself never leaves the gateway.
        assert!(!url.contains("dBjftJeZ4CVP"));
        // An endpoint with a query of its own.
        assert!(p
            .authorize_url("https://idp.test/auth?tenant=a", &pend)
            .starts_with("https://idp.test/auth?tenant=a&response_type=code&"));

        // The callback URL's origin: https over TLS, the Host header.
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("app.test:8443"));
        let u: Uri = "/x".parse().unwrap();
        assert_eq!(origin(true, &u, &h).unwrap(), "https://app.test:8443");
        assert_eq!(origin(false, &u, &h).unwrap(), "http://app.test:8443");
        // HTTP/2: the authority.
        let u2: Uri = "https://app.test/x".parse().unwrap();
        assert_eq!(
            origin(true, &u2, &HeaderMap::new()).unwrap(),
            "https://app.test"
        );
        // Not a host.
        for bad in ["evil.test/path", "user@evil.test", "", "a b"] {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_str(bad).unwrap());
            assert!(origin(true, &u, &h).is_none(), "{bad}");
        }
        assert_eq!(
            with_query("https://idp.test/logout", &[("a", "x y&z"), ("b", "/")]),
            "https://idp.test/logout?a=x%20y%26z&b=%2F"
        );
    }

    #[test]
    fn browser_navigation() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let html = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");
        assert!(is_navigation(&Method::GET, &h(&[html])));
        assert!(is_navigation(&Method::HEAD, &h(&[html])));
        assert!(is_navigation(
            &Method::GET,
            &h(&[html, ("sec-fetch-mode", "navigate")])
        ));
        assert!(!is_navigation(&Method::POST, &h(&[html])));
        assert!(!is_navigation(&Method::GET, &h(&[])));
        assert!(!is_navigation(&Method::GET, &h(&[("accept", "*/*")])));
        assert!(!is_navigation(
            &Method::GET,
            &h(&[("accept", "application/json")])
        ));
        assert!(!is_navigation(
            &Method::GET,
            &h(&[html, ("x-requested-with", "XMLHttpRequest")])
        ));
        assert!(!is_navigation(
            &Method::GET,
            &h(&[html, ("sec-fetch-mode", "cors")])
        ));
    }

    #[test]
    fn discovery_documents() {
        let iss = "https://idp.test";
        let e = parse_discovery(
            &json!({"issuer": iss, "authorization_endpoint": "https://idp.test/auth",
                "token_endpoint": "https://idp.test/token",
                "end_session_endpoint": "https://idp.test/logout"}),
            iss,
            false,
        )
        .unwrap();
        assert_eq!(e.authorization, "https://idp.test/auth");
        assert_eq!(e.token, "https://idp.test/token");
        assert_eq!(e.end_session.as_deref(), Some("https://idp.test/logout"));
        let e = parse_discovery(
            &json!({"issuer": "https://evil.test", "authorization_endpoint": "https://idp.test/auth",
                "token_endpoint": "https://idp.test/token"}),
            iss,
            false,
        )
        .unwrap_err();
        assert!(e.contains("names the issuer"), "{e}");
        let e = parse_discovery(
            &json!({"issuer": iss, "authorization_endpoint": "https://idp.test/auth"}),
            iss,
            false,
        )
        .unwrap_err();
        assert!(e.contains("token_endpoint"), "{e}");
        let e = parse_discovery(
            &json!({"issuer": iss, "authorization_endpoint": "https://idp.test/auth",
                "token_endpoint": "http://idp.test/token"}),
            iss,
            false,
        )
        .unwrap_err();
        assert!(e.contains("token_endpoint") && e.contains("https"), "{e}");
        // A bad end_session_endpoint is not used (logout then stays local).
        let e = parse_discovery(
            &json!({"issuer": iss, "authorization_endpoint": "https://idp.test/auth",
                "token_endpoint": "https://idp.test/token", "end_session_endpoint": 7}),
            iss,
            false,
        )
        .unwrap();
        assert!(e.end_session.is_none());
    }

    #[test]
    fn settings_errors() {
        let base = json!({"issuer": "https://idp.test", "client_id": "portal",
            "session_secret": SECRET});
        let with = |extra: Value| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            errors(v)
        };
        assert_eq!(with(json!({})), "");
        let e = with(json!({"session_secret": "short-secret"}));
        assert!(
            e.contains("session_secret: the session secret has at least 32"),
            "{e}"
        );
        assert!(!e.contains("short-secret"), "the secret was echoed: {e}");
        let e = with(json!({"issuer": "http://idp.example.com"}));
        assert!(e.contains("issuer: ") && e.contains("https"), "{e}");
        assert_eq!(
            with(json!({"issuer": "http://idp.example.com", "allow_http": true})),
            ""
        );
        let e = with(json!({"scopes": ["profile", "bad scope"]}));
        assert!(
            e.contains("scopes: the scopes must include `openid`"),
            "{e}"
        );
        assert!(e.contains("scopes[1]"), "{e}");
        let e = with(json!({"redirect_path": "oauth2/cb", "logout_path": "//x"}));
        assert!(
            e.contains("redirect_path: ") && e.contains("logout_path: "),
            "{e}"
        );
        let e = with(json!({"redirect_path": "/same", "logout_path": "/same"}));
        assert!(e.contains("the same as"), "{e}");
        let e = with(json!({"post_logout_redirect": "//evil.test"}));
        assert!(e.contains("post_logout_redirect"), "{e}");
        assert_eq!(
            with(json!({"post_logout_redirect": "https://www.example.com/bye"})),
            ""
        );
        let e = with(json!({"cookie_name": "bad;name"}));
        assert!(e.contains("cookie_name"), "{e}");
        let e = with(json!({"session_ttl": "0s", "fetch_timeout": "0s"}));
        assert!(
            e.contains("session_ttl") && e.contains("fetch_timeout"),
            "{e}"
        );
        let e = with(json!({"claims_to_headers": {"sub": "Host", "email": "bad header"}}));
        assert!(
            e.contains("claims_to_headers.sub") && e.contains("claims_to_headers.email"),
            "{e}"
        );
        let e = with(json!({"client_id": "", "client_secret": ""}));
        assert!(
            e.contains("client_id") && e.contains("client_secret"),
            "{e}"
        );
        let e = with(json!({"ca": "ca.pem"}));
        assert!(e.contains("ca: give the CA bundle"), "{e}");
        let e = with(json!({"clientid": "x"}));
        assert!(e.contains("unknown field"), "{e}");
        let e = errors(json!({"issuer": "https://idp.test", "client_id": "portal"}));
        assert!(e.contains("session_secret"), "{e}");
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

    fn request(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::builder().uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Body::default()).unwrap()
    }

    fn run(p: &Oidc, ctx: &mut Ctx, req: &mut Request<Body>) -> Option<Result<(), GatewayError>> {
        match p.on_request(ctx, req) {
            Step::Ready(Some(Flow::Continue)) => Some(Ok(())),
            Step::Ready(Some(Flow::Error(e))) => Some(Err(e)),
            _ => None,
        }
    }

    fn session(exp: i64) -> Session {
        Session {
            c: json!({"sub": "user-1", "email": "u1@example.test"})
                .as_object()
                .unwrap()
                .clone(),
            r: None,
            a: None,
            x: exp,
        }
    }

    fn cookie_value(set_cookie: &HeaderValue) -> String {
        let s = set_cookie.to_str().unwrap();
        let (nv, _) = s.split_once(';').unwrap();
        nv.split_once('=').unwrap().1.to_string()
    }

    #[test]
    fn request_with_a_session() {
        let p = policy(json!({}));
        let now = now_secs();
        let sc = p.session_cookie(&session(now + 3600), true).unwrap();
        let text = sc.to_str().unwrap();
        assert!(text.starts_with("portico_session="), "{text}");
        assert!(text.contains("; Path=/; HttpOnly; SameSite=Lax"), "{text}");
        assert!(text.ends_with("; Secure"), "{text}");
        assert!(!text.contains("Max-Age"), "{text}");
        let value = cookie_value(&sc);

        // A valid session: authenticated, claims and headers, forged copies replaced,
        // the session cookie removed before the upstream (others kept).
        let mut c = ctx();
        let mut r = request(
            "/app",
            &[
                ("cookie", &format!("a=1; portico_session={value}; b=2")),
                ("x-user-id", "mallory"),
            ],
        );
        run(&p, &mut c, &mut r).unwrap().unwrap();
        assert_eq!(c.auth, Some("oidc"));
        assert_eq!(c.jwt_claims.as_ref().unwrap()["sub"], "user-1");
        assert_eq!(r.headers()["x-user-id"], "user-1");
        assert_eq!(r.headers()["x-user-email"], "u1@example.test");
        assert_eq!(r.headers()["cookie"], "a=1; b=2");
        assert!(c.extensions.get::<SetCookies>().is_none());

        // No session, an API client: left to the route's 401 (any of); forged claim
        // headers removed.
        let mut c = ctx();
        let mut r = request(
            "/app",
            &[("accept", "application/json"), ("x-user-id", "mallory")],
        );
        run(&p, &mut c, &mut r).unwrap().unwrap();
        assert!(c.auth.is_none());
        assert!(r.headers().get("x-user-id").is_none());

        // No session, a browser: the login redirect (needs the provider: pending).
        let mut c = ctx();
        let mut r = request("/app", &[("accept", "text/html")]);
        assert!(run(&p, &mut c, &mut r).is_none());

        // A tampered session, an API client: 401 now, the cookie cleared.
        let mut bad = value.clone().into_bytes();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        let mut c = ctx();
        let mut r = request(
            "/app",
            &[
                ("cookie", &format!("portico_session={bad}")),
                ("accept", "application/json"),
            ],
        );
        let e = run(&p, &mut c, &mut r).unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        let cleared = e.headers.iter().find(|(n, _)| n == SET_COOKIE).unwrap();
        assert!(
            cleared
                .1
                .to_str()
                .unwrap()
                .starts_with("portico_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
            "{:?}",
            cleared.1
        );
        let ch = e
            .headers
            .iter()
            .find(|(n, _)| n == http::header::WWW_AUTHENTICATE)
            .unwrap();
        assert_eq!(ch.1, "Bearer realm=\"portico\"");

        // A tampered session with a bearer token: left to the `jwt` policy; the
        // cookie is cleared on the response.
        let mut c = ctx();
        let mut r = request(
            "/app",
            &[
                ("cookie", &format!("portico_session={bad}")),
                ("authorization", "Bearer a.b.c"),
            ],
        );
        run(&p, &mut c, &mut r).unwrap().unwrap();
        assert!(c.auth.is_none());
        assert!(r.headers().get("cookie").is_none());
        let (mut parts, _) = Response::new(()).into_parts();
        p.upstream_response(&mut c, &mut parts);
        assert_eq!(parts.headers.get_all(SET_COOKIE).iter().count(), 1);

        // An expired session: not valid.
        let old = cookie_value(&p.session_cookie(&session(now - 1), true).unwrap());
        assert_eq!(
            p.open_session(&old, now).unwrap_err(),
            "the session has expired"
        );
        // A session of another policy (another client) with the same secret.
        let other = policy(json!({"client_id": "other"}));
        assert!(other.open_session(&value, now).is_err());
        // A login cookie is not a session.
        let login = p.sealer.seal("portico_session_auth", b"{}").unwrap();
        assert!(p.open_session(&login, now).is_err());

        // A session whose access token expires soon and a refresh token: refreshed
        // first (pending); without a refresh token it is used as it is.
        let mut s = session(now + 3600);
        s.a = Some(now + 30);
        assert!(!s.needs_refresh(now));
        let v = cookie_value(&p.session_cookie(&s, true).unwrap());
        let mut r = request("/app", &[("cookie", &format!("portico_session={v}"))]);
        run(&p, &mut ctx(), &mut r).unwrap().unwrap();
        s.r = Some("rt".into());
        assert!(s.needs_refresh(now));
        assert!(!s.needs_refresh(now - 31));
        let v = cookie_value(&p.session_cookie(&s, true).unwrap());
        let mut r = request("/app", &[("cookie", &format!("portico_session={v}"))]);
        assert!(run(&p, &mut ctx(), &mut r).is_none());
    }

    #[test]
    fn cookie_attributes_and_size() {
        let p = policy(json!({"allow_http": true, "issuer": "http://idp.example.com"}));
        let mut c = ctx();
        assert!(!p.secure(&c), "plain http with allow_http: no Secure");
        c.tls = true;
        assert!(p.secure(&c));
        let p = policy(json!({}));
        assert!(p.secure(&ctx()), "plain http without allow_http: Secure");
        // Too large for a cookie: refused, not truncated.
        let mut s = session(NOW + 10);
        s.c.insert("email".into(), Value::String("x".repeat(4000)));
        let e = p.session_cookie(&s, true).unwrap_err();
        assert!(e.contains("at most 3800"), "{e}");
        // Kept claims: sub, consumer_claim, claims_to_headers, keep_claims only.
        let p = policy(json!({"keep_claims": ["groups"], "consumer_claim": "preferred_username"}));
        let all = json!({"sub": "u", "email": "e", "groups": ["g"], "preferred_username": "pu",
            "name": "N", "nonce": "n", "at_hash": "h"});
        let kept = p.keep(all.as_object().unwrap());
        let mut names: Vec<&str> = kept.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["email", "groups", "preferred_username", "sub"]);
    }
}
