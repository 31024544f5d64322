//! `oauth2-introspection`: opaque OAuth 2 access tokens checked against the
//! authorization server's introspection endpoint (RFC 7662).
//!
//! The bearer token is POSTed (`token`, `token_type_hint`) with the gateway's client
//! credentials; an answer without `"active": true` — or with an `exp` in the past, an
//! `iss`/`aud` other than configured — refuses the request. Answers are cached by a
//! SHA-256 of the token: an active one until the earlier of `cache_ttl` and its
//! `exp`, an inactive one for `negative_cache_ttl`. The introspection result becomes
//! the request's claims (`ctx.jwt_claims`, for `claims`, templates and keys), and its
//! `consumer_claim` (default `sub`) is matched against consumers' `jwt` subjects.
//!
//! A token another policy of the route already accepted (a JWT, with `jwt` at a
//! higher priority) is not introspected. An unreachable or failing endpoint is
//! `503 auth_unavailable` (the token may be fine; the client may retry).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue, Request};
use parking_lot::Mutex;
use portico_config::units::Dur;
use portico_config::{KeyPath, Secret};
use portico_store::secret::{key_digest, KeyDigest};
use portico_store::{now_secs, Identity};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::auth::{info, refusal, REALM};
use super::fetch::{ca_roots, check_url, HttpFetch};
use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// Most cached introspection answers; when full, expired ones go, then all.
const CACHE_MAX: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (RFC 6749 §2.3.1).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The introspection endpoint (https, or http on loopback / with `allow_http`).
    pub endpoint: String,
    /// The gateway's client id at the authorization server.
    pub client_id: String,
    /// Its secret.
    pub client_secret: Secret,
    /// How the gateway authenticates to the endpoint (default `client_secret_basic`).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Sent as `token_type_hint` (default `access_token`; empty: not sent).
    #[serde(default = "default_hint")]
    pub token_type_hint: String,
    /// Longest time an active answer is reused (never past the token's `exp`).
    #[serde(default = "default_ttl")]
    pub cache_ttl: Dur,
    /// How long an inactive answer is reused (0s: not cached).
    #[serde(default = "default_negative_ttl")]
    pub negative_cache_ttl: Dur,
    /// Timeout of one introspection call.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// CA bundle (PEM text or absolute path) for the endpoint; default: system roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Accept a plain-http endpoint that is not on loopback.
    #[serde(default)]
    pub allow_http: bool,
    /// The answer's `iss` must equal this, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The answer's `aud` must contain one of these, when set.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The claim naming the consumer (matched against `jwt` subjects).
    #[serde(default = "default_claim")]
    pub consumer_claim: String,
    /// An active token of no known consumer is refused (401).
    #[serde(default)]
    pub require_consumer: bool,
    /// Claims sent upstream as headers (client-sent copies are removed first).
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Keep `Authorization` in what the upstream gets.
    #[serde(default)]
    pub forward_credentials: bool,
    /// A consumer for requests without a token (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
}

fn default_hint() -> String {
    "access_token".into()
}
fn default_ttl() -> Dur {
    Dur::secs(60)
}
fn default_negative_ttl() -> Dur {
    Dur::secs(5)
}
fn default_timeout() -> Dur {
    Dur::secs(5)
}
fn default_claim() -> String {
    "sub".into()
}

/// A cached answer: the claims of an active token, or None for an inactive one.
#[derive(Clone)]
struct Entry {
    claims: Option<Arc<Value>>,
    /// Unix seconds after which the answer is not reused.
    until: i64,
}

/// The answer cache, driven by explicit times (unit-tested on a controlled clock).
#[derive(Default)]
struct Cache {
    map: Mutex<HashMap<KeyDigest, Entry>>,
}

impl Cache {
    fn get(&self, k: &KeyDigest, now: i64) -> Option<Entry> {
        self.map.lock().get(k).filter(|e| now < e.until).cloned()
    }

    fn put(&self, k: KeyDigest, e: Entry, now: i64) {
        if e.until <= now {
            return;
        }
        let mut m = self.map.lock();
        if m.len() >= CACHE_MAX {
            m.retain(|_, v| now < v.until);
            if m.len() >= CACHE_MAX {
                m.clear();
            }
        }
        m.insert(k, e);
    }
}

/// Why an answer does not authenticate.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Inactive,
    Expired,
    Issuer,
    Audience,
}

impl Refused {
    fn message(&self) -> &'static str {
        match self {
            Refused::Inactive => "the token is not active",
            Refused::Expired => "the token has expired",
            Refused::Issuer => "the token was issued by another issuer",
            Refused::Audience => "the token is not meant for this audience",
        }
    }
}

pub struct Introspection {
    endpoint: String,
    client_id: String,
    client_secret: String,
    client_auth: ClientAuth,
    hint: String,
    ttl: i64,
    negative_ttl: i64,
    issuer: Option<String>,
    audiences: Vec<String>,
    consumer_claim: String,
    require_consumer: bool,
    claims_to_headers: Vec<(String, HeaderName)>,
    /// The header names of `claims_to_headers`, which clients may not send.
    claim_headers: Vec<HeaderName>,
    forward: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    fetch: HttpFetch,
    cache: Cache,
    identity: Arc<Identity>,
}

fn secs(d: Dur) -> i64 {
    i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX)
}

impl Introspection {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        let mut errs = SettingsErrors::new();
        if let Err(e) = check_url(&s.endpoint, s.allow_http) {
            errs.push((KeyPath::root().key("endpoint"), e));
        }
        if s.client_id.is_empty() {
            errs.push((
                KeyPath::root().key("client_id"),
                "the client id is empty".into(),
            ));
        }
        if s.client_secret.0.is_empty() {
            errs.push((
                KeyPath::root().key("client_secret"),
                "the client secret is empty".into(),
            ));
        }
        if s.timeout.0.is_zero() {
            errs.push((
                KeyPath::root().key("timeout"),
                "the timeout must be above 0s".into(),
            ));
        }
        let mut claims_to_headers = Vec::new();
        for (claim, name) in &s.claims_to_headers {
            match super::auth::claim_header(name) {
                Ok(h) => claims_to_headers.push((claim.clone(), h)),
                Err(e) => errs.push((KeyPath::root().key("claims_to_headers").key(claim), e)),
            }
        }
        if let Some(a) = &s.anonymous {
            if let Err(e) = portico_config::identity::check_name(a) {
                errs.push((KeyPath::root().key("anonymous"), e));
            }
        }
        let roots = match s.ca.as_deref().map(ca_roots).transpose() {
            Ok(r) => r,
            Err(e) => {
                errs.push((KeyPath::root().key("ca"), e));
                None
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Introspection {
            endpoint: s.endpoint,
            client_id: s.client_id,
            client_secret: s.client_secret.0,
            client_auth: s.client_auth,
            hint: s.token_type_hint,
            ttl: secs(s.cache_ttl),
            negative_ttl: secs(s.negative_cache_ttl),
            issuer: s.issuer,
            audiences: s.audiences,
            consumer_claim: s.consumer_claim,
            require_consumer: s.require_consumer,
            claim_headers: claims_to_headers.iter().map(|(_, h)| h.clone()).collect(),
            claims_to_headers,
            forward: s.forward_credentials,
            anonymous: s.anonymous,
            challenge: HeaderValue::from_str(&format!("Bearer realm=\"{REALM}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer")),
            fetch: HttpFetch::new(s.timeout.0, roots),
            cache: Cache::default(),
            identity,
        })
    }

    /// Judge an introspection answer at `now`: the cache entry it makes.
    fn judge(&self, v: &Value, now: i64) -> (Result<Arc<Value>, Refused>, i64) {
        let negative = now.saturating_add(self.negative_ttl);
        if v.get("active") != Some(&Value::Bool(true)) {
            return (Err(Refused::Inactive), negative);
        }
        // `exp` is a NumericDate: an integer or not (RFC 7519 §2); a fraction counts
        // as the second it is in.
        let exp = v
            .get("exp")
            .and_then(Value::as_f64)
            .map(|e| e.floor() as i64);
        if exp.is_some_and(|e| e <= now) {
            return (Err(Refused::Expired), negative);
        }
        if let Some(iss) = &self.issuer {
            if v.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return (Err(Refused::Issuer), negative);
            }
        }
        if !self.audiences.is_empty() {
            let ok = match v.get("aud") {
                Some(Value::String(a)) => self.audiences.iter().any(|x| x == a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return (Err(Refused::Audience), negative);
            }
        }
        let until = now.saturating_add(self.ttl);
        let until = exp.map_or(until, |e| until.min(e));
        (Ok(Arc::new(v.clone())), until)
    }

    async fn introspect(&self, token: &str) -> Result<Value, String> {
        let mut form: Vec<(&str, &str)> = vec![("token", token)];
        if !self.hint.is_empty() {
            form.push(("token_type_hint", &self.hint));
        }
        let basic = match self.client_auth {
            ClientAuth::ClientSecretBasic => {
                Some((self.client_id.as_str(), self.client_secret.as_str()))
            }
            ClientAuth::ClientSecretPost => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", &self.client_secret));
                None
            }
        };
        let answer = self.fetch.post_form(&self.endpoint, &form, basic).await?;
        if answer.status != 200 {
            return Err(format!(
                "the introspection endpoint answered {}",
                answer.status
            ));
        }
        serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| "the introspection endpoint's answer is not a JSON object".to_string())
    }

    fn accept(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        claims: Arc<Value>,
    ) -> Result<(), GatewayError> {
        let consumer = claims
            .as_object()
            .and_then(|c| super::auth::token_consumer(&self.identity, c, &self.consumer_claim));
        if consumer.is_none() && self.require_consumer {
            return Err(refusal(
                &self.invalid(),
                "the token belongs to no known consumer",
            ));
        }
        if let Some(c) = claims.as_object() {
            super::auth::set_claim_headers(req.headers_mut(), c, &self.claims_to_headers);
        }
        if !self.forward {
            req.headers_mut().remove(AUTHORIZATION);
        }
        ctx.auth = Some("oauth2-introspection");
        ctx.consumer = consumer;
        ctx.jwt_claims = Some(Value::clone(&claims));
        Ok(())
    }

    fn invalid(&self) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "Bearer realm=\"{REALM}\", error=\"invalid_token\""
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }
}

/// The bearer token of the request, if any.
fn bearer(req: &Request<Body>) -> Option<String> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    let t = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then(|| t.to_string())
}

impl Policy for Introspection {
    fn name(&self) -> &'static str {
        "oauth2-introspection"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        crate::ctx::remove_identity_headers(
            req.headers_mut(),
            &self.claim_headers,
            ctx.underscores,
        );
        if ctx.auth.is_some() {
            // Another policy accepted the request. A `jwt` policy decided about the
            // bearer token itself; any other leaves it unverified: it does not go on.
            if ctx.auth != Some("jwt") && !self.forward {
                req.headers_mut().remove(AUTHORIZATION);
            }
            return Step::cont();
        }
        let Some(token) = bearer(req) else {
            return Step::cont();
        };
        // An API key of a consumer (`key-auth` with a `bearer` location on the same
        // route) is not sent to the authorization server.
        if !matches!(
            self.identity.index().key(token.as_bytes(), 0),
            portico_store::KeyLookup::Unknown
        ) {
            return Step::cont();
        }
        let key = key_digest(token.as_bytes());
        let now = now_secs();
        if let Some(e) = self.cache.get(&key, now) {
            return match e.claims {
                Some(c) => match self.accept(ctx, req, c) {
                    Ok(()) => Step::cont(),
                    Err(e) => Step::error(e),
                },
                None => Step::error(refusal(&self.invalid(), Refused::Inactive.message())),
            };
        }
        Step::Pending(Box::pin(async move {
            let answer = self.introspect(&token).await;
            drop(token);
            let v = match answer {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "token introspection failed");
                    return Flow::Error(GatewayError::new(
                        ErrorKind::AuthUnavailable,
                        "the token could not be checked (introspection failed); try again",
                    ));
                }
            };
            let now = now_secs();
            let (verdict, until) = self.judge(&v, now);
            match verdict {
                Ok(claims) => {
                    self.cache.put(
                        key,
                        Entry {
                            claims: Some(claims.clone()),
                            until,
                        },
                        now,
                    );
                    match self.accept(ctx, req, claims) {
                        Ok(()) => Flow::Continue,
                        Err(e) => Flow::Error(e),
                    }
                }
                Err(r) => {
                    if r == Refused::Inactive {
                        self.cache.put(
                            key,
                            Entry {
                                claims: None,
                                until,
                            },
                            now,
                        );
                    }
                    Flow::Error(refusal(&self.invalid(), r.message()))
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn policy(extra: Value) -> Introspection {
        let mut s = json!({
            "endpoint": "http://127.0.0.1:9/introspect",
            "client_id": "gw",
            "client_secret": "s3cret",
            "cache_ttl": "60s",
            "negative_cache_ttl": "5s",
        });
        if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        Introspection::new(
            serde_json::from_value(s).unwrap(),
            Arc::new(Identity::detached()),
        )
        .unwrap()
    }

    #[test]
    fn answers_are_judged_and_cached_up_to_exp_on_a_controlled_clock() {
        let p = policy(json!({"issuer": "https://idp", "audiences": ["api"]}));
        let now = 1_000_000;
        let good =
            json!({"active": true, "iss": "https://idp", "aud": ["x", "api"], "exp": now + 30});
        let (v, until) = p.judge(&good, now);
        assert!(v.is_ok());
        assert_eq!(
            until,
            now + 30,
            "cached until exp when exp is sooner than the ttl"
        );
        let (_, until) = p.judge(
            &json!({"active": true, "iss": "https://idp", "aud": "api", "exp": now + 3600}),
            now,
        );
        assert_eq!(until, now + 60, "cached for the ttl when exp is later");
        assert_eq!(
            p.judge(&json!({"active": false}), now).0.unwrap_err(),
            Refused::Inactive
        );
        assert_eq!(
            p.judge(&json!({"active": "true"}), now).0.unwrap_err(),
            Refused::Inactive
        );
        assert_eq!(
            p.judge(&json!({"active": true, "exp": now}), now)
                .0
                .unwrap_err(),
            Refused::Expired
        );
        assert_eq!(
            p.judge(
                &json!({"active": true, "iss": "https://evil", "aud": "api"}),
                now
            )
            .0
            .unwrap_err(),
            Refused::Issuer
        );
        assert_eq!(
            p.judge(
                &json!({"active": true, "iss": "https://idp", "aud": "other"}),
                now
            )
            .0
            .unwrap_err(),
            Refused::Audience
        );
        let (_, until) = p.judge(&json!({"active": false}), now);
        assert_eq!(until, now + 5);

        let k = key_digest(b"token");
        p.cache.put(
            k,
            Entry {
                claims: Some(Arc::new(good)),
                until: now + 30,
            },
            now,
        );
        assert!(p.cache.get(&k, now + 29).is_some());
        assert!(
            p.cache.get(&k, now + 30).is_none(),
            "never reused at or past exp"
        );
        // an entry already expired is not stored
        let k2 = key_digest(b"other");
        p.cache.put(
            k2,
            Entry {
                claims: None,
                until: now,
            },
            now,
        );
        assert!(p.cache.get(&k2, now - 1).is_none());
    }

    #[test]
    fn settings_errors() {
        let bad = serde_json::from_value::<Settings>(json!({
            "endpoint": "http://idp.example.com/introspect",
            "client_id": "",
            "client_secret": "",
            "claims_to_headers": {"sub": "bad header"},
            "timeout": "0s",
        }))
        .unwrap();
        let errs = Introspection::new(bad, Arc::new(Identity::detached()))
            .err()
            .unwrap();
        let paths: Vec<String> = errs.iter().map(|(p, _)| p.to_string()).collect();
        for want in [
            "endpoint",
            "client_id",
            "client_secret",
            "timeout",
            "claims_to_headers.sub",
        ] {
            assert!(
                paths.iter().any(|p| p == want),
                "{want} missing in {paths:?}"
            );
        }
    }
}
