//! `basic-auth`: `Authorization: Basic` (RFC 7617) against Argon2id password hashes.
//!
//! Argon2id is slow on purpose (tens of milliseconds), so a verified result — and a
//! refused one, so guessing costs the gateway nothing twice — is remembered for
//! `cache_ttl`, keyed by a digest of the stored hash and the password (a changed or
//! deleted credential misses). Verification runs on the blocking pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request};
use parking_lot::Mutex;
use portico_config::units::Dur;
use portico_config::KeyPath;
use portico_store::secret::{key_digest, KeyDigest};
use portico_store::{Consumer, Identity};
use schemars::JsonSchema;
use serde::Deserialize;

use super::auth::{info, refusal, unauthorized, REALM};
use crate::body::Body;
use crate::ctx::Ctx;
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// Most remembered verifications; when full, expired ones go, then all.
const CACHE_MAX: usize = 10_000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The realm in the `WWW-Authenticate` challenge (default `portico`).
    #[serde(default)]
    pub realm: Option<String>,
    /// Send the `Authorization` header on to the upstream (default: removed).
    #[serde(default)]
    pub forward_credentials: bool,
    /// A consumer for requests without credentials (instead of 401).
    #[serde(default)]
    pub anonymous: Option<String>,
    /// How long a password check is remembered (default 30s; 0s: never).
    #[serde(default = "default_ttl")]
    pub cache_ttl: Dur,
}

fn default_ttl() -> Dur {
    Dur::secs(30)
}

pub struct BasicAuth {
    forward: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
    ttl: Duration,
    identity: Arc<Identity>,
    cache: Arc<Mutex<HashMap<KeyDigest, (bool, Instant)>>>,
}

impl BasicAuth {
    pub fn new(s: Settings, identity: Arc<Identity>) -> Result<Self, SettingsErrors> {
        let realm = s.realm.as_deref().unwrap_or(REALM);
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .ok()
                .filter(|_| !realm.contains('"'))
                .ok_or_else(|| {
                    vec![(
                        KeyPath::root().key("realm"),
                        "the realm must be printable ASCII without `\"`".to_string(),
                    )]
                })?;
        if let Some(a) = &s.anonymous {
            portico_config::identity::check_name(a)
                .map_err(|e| vec![(KeyPath::root().key("anonymous"), e)])?;
        }
        Ok(BasicAuth {
            forward: s.forward_credentials,
            anonymous: s.anonymous,
            challenge,
            ttl: s.cache_ttl.0,
            identity,
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn remembered(&self, k: &KeyDigest) -> Option<bool> {
        let c = self.cache.lock();
        c.get(k)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(ok, _)| *ok)
    }

    fn remember(&self, k: KeyDigest, ok: bool) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut c = self.cache.lock();
        if c.len() >= CACHE_MAX {
            c.retain(|_, (_, until)| now < *until);
            if c.len() >= CACHE_MAX {
                c.clear();
            }
        }
        c.insert(k, (ok, now + self.ttl));
    }

    fn accept(&self, ctx: &mut Ctx, req: &mut Request<Body>, consumer: Arc<Consumer>) {
        if !self.forward {
            req.headers_mut().remove(AUTHORIZATION);
        }
        if ctx.auth.is_none() {
            ctx.consumer = Some(consumer);
            ctx.auth = Some("basic-auth");
        }
    }
}

/// User name and password from `Authorization: Basic ...`; `Err` when the header
/// uses the Basic scheme but is malformed.
fn credentials(req: &Request<Body>) -> Option<Result<(String, String), ()>> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    Some(
        decoded
            .and_then(|s| {
                let (u, p) = s.split_once(':')?;
                Some((u.to_string(), p.to_string()))
            })
            .ok_or(()),
    )
}

impl Policy for BasicAuth {
    fn name(&self) -> &'static str {
        "basic-auth"
    }

    fn auth(&self) -> Option<AuthInfo> {
        Some(info(&self.challenge, &self.anonymous))
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let (user, password) = match credentials(req) {
            None => return Step::cont(),
            Some(Err(())) => {
                return unauthorized(&self.challenge, "the Basic credentials are malformed")
            }
            Some(Ok(c)) => c,
        };
        const REFUSED: &str = "the user name or password is not valid";
        let Some(entry) = self.identity.index().user(&user).cloned() else {
            return unauthorized(&self.challenge, REFUSED);
        };
        let mut material = Vec::with_capacity(entry.phc.len() + 1 + password.len());
        material.extend_from_slice(entry.phc.as_bytes());
        material.push(0);
        material.extend_from_slice(password.as_bytes());
        let k = key_digest(&material);
        match self.remembered(&k) {
            Some(true) => {
                self.accept(ctx, req, entry.consumer);
                return Step::cont();
            }
            Some(false) => return unauthorized(&self.challenge, REFUSED),
            None => {}
        }
        Step::Pending(Box::pin(async move {
            let phc = entry.phc.clone();
            let ok = tokio::task::spawn_blocking(move || {
                portico_store::secret::verify_password(&password, &phc)
            })
            .await
            .unwrap_or(false);
            self.remember(k, ok);
            if ok {
                self.accept(ctx, req, entry.consumer);
                Flow::Continue
            } else {
                Flow::Error(refusal(&self.challenge, REFUSED))
            }
        }))
    }
}
