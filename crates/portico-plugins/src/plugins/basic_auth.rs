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
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{AuthInfo, Flow, Policy, Step};
use crate::registry::SettingsErrors;

/// Most remembered verifications; when full, expired ones go, then refusals, then all.
const CACHE_MAX: usize = 10_000;

/// Password checks waiting for a slot beyond which new ones are refused (503): each
/// check takes 19 MiB and tens of milliseconds, so they run at most one per core and
/// a flood of guesses cannot exhaust memory or starve the blocking pool.
const MAX_WAITING: usize = 64;

fn slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A hash no password matches, checked for unknown user names so that an unknown
/// name costs the same time as a wrong password (no user enumeration by timing).
fn decoy() -> Arc<str> {
    static DECOY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    DECOY
        .get_or_init(|| {
            let random = portico_store::secret::generate_secret();
            Arc::from(
                portico_store::secret::hash_password(&random)
                    .unwrap_or_else(|_| "$argon2id$unusable".into())
                    .as_str(),
            )
        })
        .clone()
}

/// Check a password on the blocking pool, one per core at a time; `None` when too
/// many checks are already waiting.
async fn verify(password: String, phc: Arc<str>) -> Option<bool> {
    use std::sync::atomic::Ordering;
    if WAITING.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
        WAITING.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    let permit = slots().acquire().await;
    WAITING.fetch_sub(1, Ordering::AcqRel);
    let _permit = permit.ok()?;
    tokio::task::spawn_blocking(move || portico_store::secret::verify_password(&password, &phc))
        .await
        .ok()
}

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
                // Guesses must not push out the passwords that worked.
                c.retain(|_, (ok, _)| *ok);
            }
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
        // The first policy that names a consumer decides (an earlier one may have
        // authenticated the request without naming one).
        if ctx.consumer.is_none() {
            ctx.consumer = Some(consumer);
            ctx.auth = Some("basic-auth");
        }
    }
}

/// User name and password from `Authorization: Basic ...`; `Err` when the header
/// uses the Basic scheme but is malformed.
fn credentials(req: &Request<Body>) -> Option<Result<(String, String), ()>> {
    let raw = req.headers().get(AUTHORIZATION)?;
    let Ok(v) = raw.to_str() else {
        // Not text: a Basic credential that cannot be read is malformed, not absent.
        let b = raw.as_bytes();
        return (b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"basic ")).then_some(Err(()));
    };
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
        let (phc, consumer) = match self.identity.index().user(&user) {
            Some(e) => (e.phc.clone(), Some(e.consumer.clone())),
            None => (decoy(), None),
        };
        let mut material = Vec::with_capacity(phc.len() + 1 + password.len());
        material.extend_from_slice(phc.as_bytes());
        material.push(0);
        material.extend_from_slice(password.as_bytes());
        let k = key_digest(&material);
        match (self.remembered(&k), &consumer) {
            (Some(true), Some(c)) => {
                self.accept(ctx, req, c.clone());
                return Step::cont();
            }
            (Some(_), _) => return unauthorized(&self.challenge, REFUSED),
            (None, _) => {}
        }
        Step::Pending(Box::pin(async move {
            let Some(ok) = verify(password, phc).await else {
                return Flow::Error(GatewayError::new(
                    ErrorKind::AuthUnavailable,
                    "too many password checks are in progress; try again",
                ));
            };
            // The decoy never matches; a name that is not a user is always refused.
            let ok = ok && consumer.is_some();
            self.remember(k, ok);
            match consumer {
                Some(c) if ok => {
                    self.accept(ctx, req, c);
                    Flow::Continue
                }
                _ => Flow::Error(refusal(&self.challenge, REFUSED)),
            }
        }))
    }
}
