//! Verification keys for `jwt`: keys from the settings (an HMAC secret, a PEM public
//! key), JSON Web Key Sets (RFC 7517), and the cache of a key set fetched from a
//! `jwks_uri` or found through OpenID Connect discovery.
//!
//! Each key carries the set of algorithms it may verify, fixed by its key type (and
//! its JWK `alg` or curve): an RSA key never verifies an HMAC token, so a token signed
//! with the RSA public key as an HMAC secret cannot pass (algorithm confusion).
//!
//! The cache ([`Remote`]) is read without a lock per request. It is refreshed when its
//! lifetime (`Cache-Control: max-age`, clamped to the settings' bounds) is over — in
//! the background while the old set keeps verifying — and when a token names a key id
//! it does not hold; fetches (whatever the reason) are at most one per
//! `jwks_min_refresh`, so tokens with made-up key ids cannot make the gateway hammer
//! the identity provider. A failed fetch keeps the set it had. Times are explicit
//! parameters (milliseconds of a monotonic clock), so the rules are testable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::Mutex;
use serde_json::Value;

use super::fetch::{check_url, Fetch};

/// Every algorithm, in the order of [`AlgSet`]'s bits.
pub const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A set of algorithms (a bit per entry of [`ALGORITHMS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AlgSet(u16);

impl AlgSet {
    pub const EMPTY: AlgSet = AlgSet(0);
    pub const HMAC: AlgSet = AlgSet(0b0000_0000_0111);
    pub const RSA: AlgSet = AlgSet(0b0001_1111_1000);
    pub const EC: AlgSet = AlgSet(0b0110_0000_0000);
    pub const ED: AlgSet = AlgSet(0b1000_0000_0000);
    /// What a key set fetched from an identity provider may hold (no HMAC secrets).
    pub const ASYMMETRIC: AlgSet = AlgSet(Self::RSA.0 | Self::EC.0 | Self::ED.0);

    pub fn of(alg: Algorithm) -> AlgSet {
        let i = ALGORITHMS.iter().position(|a| *a == alg).unwrap_or(0);
        AlgSet(1 << i)
    }
    pub fn has(self, alg: Algorithm) -> bool {
        self.0 & AlgSet::of(alg).0 != 0
    }
    pub fn union(self, o: AlgSet) -> AlgSet {
        AlgSet(self.0 | o.0)
    }
    pub fn intersect(self, o: AlgSet) -> AlgSet {
        AlgSet(self.0 & o.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The name of an algorithm as written in tokens and settings.
pub fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// An algorithm by its name (exact, as in a JWT header).
pub fn alg_by_name(s: &str) -> Option<Algorithm> {
    ALGORITHMS.iter().copied().find(|a| alg_name(*a) == s)
}

/// A verification key.
pub struct Key {
    /// Its key id (`kid`), if it has one.
    pub kid: Option<Box<str>>,
    pub key: DecodingKey,
    /// The algorithms it may verify.
    pub algs: AlgSet,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish_non_exhaustive()
    }
}

/// An HMAC key (HS256/384/512).
pub fn hmac_key(secret: &[u8]) -> Key {
    Key {
        kid: None,
        key: DecodingKey::from_secret(secret),
        algs: AlgSet::HMAC,
    }
}

/// A PEM public key: RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`), EC P-256 or P-384, or
/// Ed25519. Its type decides which algorithms it verifies.
pub fn pem_key(pem: &str) -> Result<Key, String> {
    if pem.contains("PRIVATE KEY") {
        return Err("this is a private key: give the public key (`PUBLIC KEY` PEM)".into());
    }
    let bytes = pem.as_bytes();
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        return Ok(Key {
            kid: None,
            key,
            algs: AlgSet::RSA,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        // The uncompressed point: 1 + 2 × 32 bytes on P-256, 1 + 2 × 48 on P-384.
        let algs = match key.as_bytes().len() {
            65 => AlgSet::of(Algorithm::ES256),
            97 => AlgSet::of(Algorithm::ES384),
            _ => {
                return Err(
                    "only the EC curves P-256 (ES256) and P-384 (ES384) are supported".into(),
                )
            }
        };
        return Ok(Key {
            kid: None,
            key,
            algs,
        });
    }
    if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        return Ok(Key {
            kid: None,
            key,
            algs: AlgSet::ED,
        });
    }
    Err("not a PEM public key (RSA, EC P-256/P-384 or Ed25519)".into())
}

/// One JWK as a verification key; `Err` says why it is not usable (skipped). Only
/// signature keys of asymmetric types are used: a symmetric (`oct`) key published in
/// a key set is ignored.
pub fn jwk_key(v: &Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    let c = &jwk.common;
    if matches!(c.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signature key (`use`)".into());
    }
    if let Some(ops) = &c.key_operations {
        if !ops.iter().any(|o| matches!(o, KeyOperations::Verify)) {
            return Err("`key_ops` does not include `verify`".into());
        }
    }
    let (key, type_algs) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => (DecodingKey::from_rsa_components(&p.n, &p.e), AlgSet::RSA),
        AlgorithmParameters::EllipticCurve(p) => {
            let algs = match p.curve {
                EllipticCurve::P256 => AlgSet::of(Algorithm::ES256),
                EllipticCurve::P384 => AlgSet::of(Algorithm::ES384),
                _ => return Err("unsupported EC curve".into()),
            };
            (DecodingKey::from_ec_components(&p.x, &p.y), algs)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err("unsupported OKP curve".into());
            }
            (DecodingKey::from_ed_components(&p.x), AlgSet::ED)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are not taken from a key set".into())
        }
    };
    let key = key.map_err(|e| format!("bad key material: {e}"))?;
    let algs = match c.key_algorithm {
        None => type_algs,
        Some(ka) => {
            let named = key_alg(ka).map(AlgSet::of).unwrap_or(AlgSet::EMPTY);
            let algs = named.intersect(type_algs);
            if algs.is_empty() {
                return Err(format!("its `alg` ({ka}) does not fit its key type"));
            }
            algs
        }
    };
    Ok(Key {
        kid: c.key_id.as_deref().map(Box::from),
        key,
        algs,
    })
}

fn key_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    alg_by_name(&ka.to_string())
}

/// The usable keys of a JWKS document, and what was skipped (with why).
pub fn parse_jwks(body: &[u8]) -> Result<(Vec<Key>, Vec<String>), String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("the key set is not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the key set has no `keys` array")?;
    let mut keys = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    for (i, v) in list.iter().enumerate() {
        match jwk_key(v) {
            Ok(k) => keys.push(k),
            Err(why) => {
                let kid = v.get("kid").and_then(Value::as_str).unwrap_or("-");
                skipped.push(format!("key {i} (kid {kid}): {why}"));
            }
        }
    }
    Ok((keys, skipped))
}

/// A fetched key set and until when it is fresh.
#[derive(Debug)]
pub struct KeySet {
    pub keys: Vec<Key>,
    /// Monotonic milliseconds after which the set is refreshed.
    pub fresh_until: u64,
}

impl KeySet {
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// How long fetched key sets are kept, and how often they may be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Lifetime when the answer has no `max-age`.
    pub default_ttl: Duration,
    /// Bounds of the lifetime (`max-age` outside them is clamped).
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// At most one fetch per this long.
    pub min_refresh: Duration,
}

impl CachePolicy {
    /// The lifetime of an answer with this `Cache-Control` header.
    pub fn ttl(&self, cache_control: Option<&str>) -> Duration {
        let wanted = cache_control.and_then(max_age).unwrap_or(self.default_ttl);
        wanted.clamp(self.min_ttl, self.min_ttl.max(self.max_ttl))
    }
}

/// The lifetime a `Cache-Control` header gives: `max-age=N`, or zero for `no-cache`
/// and `no-store` (then clamped up to the minimum).
pub fn max_age(cache_control: &str) -> Option<Duration> {
    let mut out = None;
    for d in cache_control.split(',') {
        let d = d.trim();
        let (name, value) = d.split_once('=').unwrap_or((d, ""));
        let name = name.trim();
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if name.eq_ignore_ascii_case("max-age") {
            let v = value.trim().trim_matches('"');
            if let Ok(n) = v.parse::<u64>() {
                out = Some(Duration::from_secs(n));
            }
        }
    }
    out
}

/// Milliseconds of a monotonic clock (since the first call in the process).
pub fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where a fetched key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JWKS URL.
    Jwks(String),
    /// OpenID Connect discovery: `{issuer}/.well-known/openid-configuration` names the
    /// `jwks_uri`, and its `issuer` must be this one exactly.
    Discovery { issuer: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Jwks(u) => write!(f, "jwks_uri {u}"),
            Source::Discovery { issuer } => write!(f, "OIDC discovery of {issuer}"),
        }
    }
}

/// A fetched key set with its refresh rules.
pub struct Remote {
    source: Source,
    policy: CachePolicy,
    allow_http: bool,
    fetch: Arc<dyn Fetch>,
    keys: ArcSwapOption<KeySet>,
    /// Monotonic ms + 1 of the last fetch attempt (0: never).
    last_attempt: AtomicU64,
    /// A background refresh was started and has not finished.
    in_flight: AtomicBool,
    /// A fetch is under way.
    fetching: AtomicBool,
    /// The `jwks_uri` found by discovery.
    discovered: Mutex<Option<String>>,
    /// One fetch at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Remote {
    pub fn new(
        source: Source,
        policy: CachePolicy,
        allow_http: bool,
        fetch: Arc<dyn Fetch>,
    ) -> Remote {
        Remote {
            source,
            policy,
            allow_http,
            fetch,
            keys: ArcSwapOption::empty(),
            last_attempt: AtomicU64::new(0),
            in_flight: AtomicBool::new(false),
            fetching: AtomicBool::new(false),
            discovered: Mutex::new(None),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The key set now held (none before the first successful fetch).
    pub fn current(&self) -> arc_swap::Guard<Option<Arc<KeySet>>> {
        self.keys.load()
    }

    /// Whether a fetch may start at `now` (ms): none happened in the last
    /// `min_refresh`.
    pub fn may_refresh(&self, now: u64) -> bool {
        match self.last_attempt.load(Ordering::Acquire) {
            0 => true,
            last => now >= (last - 1).saturating_add(ms(self.policy.min_refresh)),
        }
    }

    /// Whether a fetch is under way (a request needing keys should wait for it:
    /// [`Remote::refresh`] returns once it is over).
    pub fn is_fetching(&self) -> bool {
        self.fetching.load(Ordering::Acquire)
    }

    /// Whether the held set is past its lifetime at `now`.
    pub fn is_stale(&self, now: u64) -> bool {
        self.keys
            .load()
            .as_ref()
            .is_none_or(|s| now >= s.fresh_until)
    }

    /// Fetch the key set now if the rate limit allows it (else return at once). Waits
    /// for a fetch already under way, then returns without fetching again.
    pub async fn refresh(&self, now: u64) {
        let _one = self.lock.lock().await;
        if !self.may_refresh(now) {
            return;
        }
        // Under way until the new set is stored (or this future is dropped).
        let _fetching = Flag::raise(&self.fetching);
        self.last_attempt
            .store(now.saturating_add(1), Ordering::Release);
        match self.fetch_keys().await {
            Ok((keys, skipped, cache_control)) => {
                for s in &skipped {
                    tracing::warn!(source = %self.source, "a JWKS key is not used: {s}");
                }
                let ttl = self.policy.ttl(cache_control.as_deref());
                tracing::debug!(source = %self.source, keys = keys.len(), ttl = ?ttl, "JWT signing keys fetched");
                self.keys.store(Some(Arc::new(KeySet {
                    keys,
                    fresh_until: now.saturating_add(ms(ttl)),
                })));
            }
            Err(e) => {
                let held = self.keys.load().is_some();
                tracing::warn!(
                    source = %self.source,
                    error = %e,
                    keeping_cached_keys = held,
                    "fetching the JWT signing keys failed"
                );
            }
        }
    }

    /// Start a refresh in the background (stale-while-revalidate): at most one at a
    /// time, and only inside a tokio runtime.
    pub fn refresh_in_background(self: &Arc<Self>, now: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            me.refresh(now).await;
            me.in_flight.store(false, Ordering::Release);
        });
    }

    #[allow(clippy::type_complexity)]
    async fn fetch_keys(&self) -> Result<(Vec<Key>, Vec<String>, Option<String>), String> {
        let uri = match &self.source {
            Source::Jwks(u) => u.clone(),
            Source::Discovery { issuer } => {
                let known = self.discovered.lock().clone();
                match known {
                    Some(u) => u,
                    None => {
                        let u = self.discover(issuer).await?;
                        *self.discovered.lock() = Some(u.clone());
                        u
                    }
                }
            }
        };
        let got = self
            .fetch
            .get(&uri)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))
            .and_then(|f| {
                if f.status != 200 {
                    return Err(format!("GET {uri}: status {}", f.status));
                }
                let (keys, skipped) = parse_jwks(&f.body).map_err(|e| format!("GET {uri}: {e}"))?;
                Ok((keys, skipped, f.cache_control))
            });
        if got.is_err() {
            // Discover again next time (the provider may have moved its keys).
            *self.discovered.lock() = None;
        }
        got
    }

    async fn discover(&self, issuer: &str) -> Result<String, String> {
        let url = discovery_url(issuer);
        let f = self
            .fetch
            .get(&url)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if f.status != 200 {
            return Err(format!("GET {url}: status {}", f.status));
        }
        let doc: Value = serde_json::from_slice(&f.body)
            .map_err(|e| format!("GET {url}: the discovery document is not JSON: {e}"))?;
        let found = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
        if found != issuer {
            return Err(format!(
                "GET {url}: the discovery document names the issuer `{found}`, not `{issuer}`"
            ));
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("GET {url}: the discovery document has no `jwks_uri`"))?;
        check_url(jwks, self.allow_http).map_err(|e| format!("GET {url}: jwks_uri {e}"))?;
        Ok(jwks.to_string())
    }
}

/// A flag set while a value of this type lives.
struct Flag<'a>(&'a AtomicBool);

impl<'a> Flag<'a> {
    fn raise(f: &'a AtomicBool) -> Flag<'a> {
        f.store(true, Ordering::Release);
        Flag(f)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// `{issuer}/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// The [`Remote`] for these settings, shared by every policy instance built with the
/// same ones while any is alive, so a configuration reload keeps the fetched keys and
/// the rate limit.
pub fn shared(id: String, make: impl FnOnce() -> Remote) -> Arc<Remote> {
    static ALL: OnceLock<Mutex<HashMap<String, Weak<Remote>>>> = OnceLock::new();
    let mut all = ALL.get_or_init(Default::default).lock();
    if let Some(r) = all.get(&id).and_then(Weak::upgrade) {
        return r;
    }
    all.retain(|_, w| w.strong_count() > 0);
    let r = Arc::new(make());
    all.insert(id, Arc::downgrade(&r));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::plugins::fetch::{FetchFuture, Fetched};
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;

    const SEC: u64 = 1000;

    fn policy() -> CachePolicy {
        CachePolicy {
            default_ttl: Duration::from_secs(300),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            min_refresh: Duration::from_secs(10),
        }
    }

    #[test]
    fn cache_control_within_bounds() {
        let p = policy();
        assert_eq!(p.ttl(None), Duration::from_secs(300));
        assert_eq!(p.ttl(Some("public, max-age=600")), Duration::from_secs(600));
        assert_eq!(p.ttl(Some("max-age=\"900\"")), Duration::from_secs(900));
        // below the minimum, above the maximum: clamped
        assert_eq!(p.ttl(Some("max-age=5")), Duration::from_secs(60));
        assert_eq!(p.ttl(Some("max-age=86400")), Duration::from_secs(3600));
        assert_eq!(p.ttl(Some("no-store")), Duration::from_secs(60));
        assert_eq!(
            p.ttl(Some("no-cache, max-age=600")),
            Duration::from_secs(60)
        );
        assert_eq!(p.ttl(Some("max-age=bogus")), Duration::from_secs(300));
        assert_eq!(p.ttl(Some("private")), Duration::from_secs(300));
        assert_eq!(
            max_age("s-maxage=5, MAX-AGE=7"),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn alg_sets() {
        assert!(AlgSet::HMAC.has(Algorithm::HS384));
        assert!(!AlgSet::HMAC.has(Algorithm::RS256));
        assert!(AlgSet::RSA.has(Algorithm::PS512) && AlgSet::RSA.has(Algorithm::RS256));
        assert!(!AlgSet::RSA.has(Algorithm::ES256));
        assert!(AlgSet::EC.has(Algorithm::ES384) && !AlgSet::EC.has(Algorithm::EdDSA));
        assert!(AlgSet::ED.has(Algorithm::EdDSA));
        assert!(!AlgSet::ASYMMETRIC.has(Algorithm::HS256));
        for a in ALGORITHMS {
            assert_eq!(alg_by_name(alg_name(a)), Some(a));
        }
        assert_eq!(alg_by_name("none"), None);
        assert_eq!(alg_by_name("hs256"), None);
    }

    #[test]
    fn jwk_rules() {
        // oct keys are never taken from a key set
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "s"});
        assert!(jwk_key(&oct).unwrap_err().contains("symmetric"));
        // an encryption key is skipped
        let enc = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "use": "enc"});
        assert!(jwk_key(&enc).is_err());
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "e1"});
        let k = jwk_key(&ed).unwrap();
        assert_eq!(k.algs, AlgSet::ED);
        assert_eq!(k.kid.as_deref(), Some("e1"));
        // an `alg` that does not fit the key type
        let bad = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "alg": "HS256"});
        assert!(jwk_key(&bad).unwrap_err().contains("alg"));
        // an RSA key restricted by `alg`
        let rsa = serde_json::json!({"kty": "RSA", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB", "alg": "PS256"});
        assert_eq!(jwk_key(&rsa).unwrap().algs, AlgSet::of(Algorithm::PS256));
        let (keys, skipped) = parse_jwks(
            serde_json::json!({"keys": [oct, ed, rsa]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(skipped.len(), 1);
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"nope").is_err());
    }

    /// A stand-in identity provider: answers by URL, counts requests.
    struct FakeIdp {
        answers: Mutex<HashMap<String, Result<Fetched, String>>>,
        hits: AtomicUsize,
    }

    impl FakeIdp {
        fn new() -> Arc<FakeIdp> {
            Arc::new(FakeIdp {
                answers: Mutex::new(HashMap::new()),
                hits: AtomicUsize::new(0),
            })
        }
        fn set(&self, url: &str, status: u16, cc: Option<&str>, body: Value) {
            self.answers.lock().insert(
                url.into(),
                Ok(Fetched {
                    status,
                    cache_control: cc.map(str::to_string),
                    body: Bytes::from(body.to_string()),
                }),
            );
        }
        fn fail(&self, url: &str) {
            self.answers
                .lock()
                .insert(url.into(), Err("connection refused".into()));
        }
        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Fetch for FakeIdp {
        fn get<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
            self.hits.fetch_add(1, Ordering::SeqCst);
            let a = self
                .answers
                .lock()
                .get(url)
                .cloned()
                .unwrap_or_else(|| Err("no such URL".into()));
            Box::pin(async move { a })
        }
    }

    fn ed_jwk(kid: &str) -> Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
    }

    const URL: &str = "https://idp.test/jwks";

    fn kids(r: &Remote) -> Vec<String> {
        r.current()
            .as_ref()
            .map(|s| {
                s.keys
                    .iter()
                    .filter_map(|k| k.kid.as_deref().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn refresh_rate_limit_and_lifetime() {
        let idp = FakeIdp::new();
        idp.set(
            URL,
            200,
            Some("max-age=120"),
            serde_json::json!({"keys": [ed_jwk("k1")]}),
        );
        let r = Remote::new(Source::Jwks(URL.into()), policy(), false, idp.clone());
        assert!(r.current().is_none());
        assert!(r.is_stale(0));
        assert!(r.may_refresh(0));

        r.refresh(1000).await;
        assert_eq!(idp.hits(), 1);
        assert_eq!(kids(&r), ["k1"]);
        assert_eq!(r.current().as_ref().unwrap().fresh_until, 1000 + 120 * SEC);

        // Within min_refresh (10s): no second fetch, whatever asks for it.
        idp.set(URL, 200, None, serde_json::json!({"keys": [ed_jwk("k2")]}));
        assert!(!r.may_refresh(1000 + 9 * SEC));
        for t in [1001, 5000, 1000 + 9 * SEC] {
            r.refresh(t).await;
        }
        assert_eq!(idp.hits(), 1);
        assert_eq!(kids(&r), ["k1"]);

        // After it: one fetch; no max-age now, so the default lifetime (300s).
        assert!(r.may_refresh(1000 + 10 * SEC));
        r.refresh(1000 + 10 * SEC).await;
        assert_eq!(idp.hits(), 2);
        assert_eq!(kids(&r), ["k2"]);
        assert!(!r.is_stale(11 * SEC + 299 * SEC));
        assert!(r.is_stale(11 * SEC + 300 * SEC));

        // A failure keeps the held set, and still counts for the rate limit.
        idp.fail(URL);
        r.refresh(100 * SEC).await;
        assert_eq!(idp.hits(), 3);
        assert_eq!(kids(&r), ["k2"]);
        assert!(!r.may_refresh(105 * SEC));
        // A bad document too.
        idp.set(URL, 200, None, serde_json::json!({"nope": 1}));
        r.refresh(110 * SEC).await;
        assert_eq!(kids(&r), ["k2"]);
        idp.set(URL, 503, None, serde_json::json!({"keys": []}));
        r.refresh(120 * SEC).await;
        assert_eq!(kids(&r), ["k2"]);
        assert_eq!(idp.hits(), 5);
    }

    #[tokio::test]
    async fn concurrent_refreshes_fetch_once() {
        let idp = FakeIdp::new();
        idp.set(URL, 200, None, serde_json::json!({"keys": [ed_jwk("k1")]}));
        let r = Arc::new(Remote::new(
            Source::Jwks(URL.into()),
            policy(),
            false,
            idp.clone(),
        ));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let r = r.clone();
            set.spawn(async move { r.refresh(50).await });
        }
        while set.join_next().await.is_some() {}
        assert_eq!(idp.hits(), 1);
        assert_eq!(kids(&r), ["k1"]);
    }

    /// A provider that answers after a while.
    struct SlowIdp(Arc<FakeIdp>);

    impl Fetch for SlowIdp {
        fn get<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.0.get(url).await
            })
        }
    }

    #[tokio::test]
    async fn a_fetch_under_way_is_visible() {
        let idp = FakeIdp::new();
        idp.set(URL, 200, None, serde_json::json!({"keys": [ed_jwk("k1")]}));
        let r = Arc::new(Remote::new(
            Source::Jwks(URL.into()),
            policy(),
            false,
            Arc::new(SlowIdp(idp.clone())),
        ));
        assert!(!r.is_fetching());
        let bg = r.clone();
        let task = tokio::spawn(async move { bg.refresh(0).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(r.is_fetching());
        // Not allowed to fetch again, but waiting on `refresh` ends with the keys.
        assert!(!r.may_refresh(10));
        r.refresh(10).await;
        assert!(!r.is_fetching());
        assert_eq!(kids(&r), ["k1"]);
        task.await.unwrap();
        assert_eq!(idp.hits(), 1);
    }

    #[tokio::test]
    async fn discovery() {
        let idp = FakeIdp::new();
        let issuer = "https://idp.test/realms/x";
        let disc = "https://idp.test/realms/x/.well-known/openid-configuration";
        idp.set(
            disc,
            200,
            None,
            serde_json::json!({"issuer": issuer, "jwks_uri": URL}),
        );
        idp.set(URL, 200, None, serde_json::json!({"keys": [ed_jwk("d1")]}));
        let src = Source::Discovery {
            issuer: issuer.into(),
        };
        let r = Remote::new(src.clone(), policy(), false, idp.clone());
        r.refresh(0).await;
        assert_eq!(kids(&r), ["d1"]);
        assert_eq!(idp.hits(), 2);
        // The discovered jwks_uri is remembered.
        r.refresh(20 * SEC).await;
        assert_eq!(idp.hits(), 3);

        // A discovery document for another issuer is refused.
        let idp = FakeIdp::new();
        idp.set(
            disc,
            200,
            None,
            serde_json::json!({"issuer": "https://evil.test", "jwks_uri": URL}),
        );
        idp.set(URL, 200, None, serde_json::json!({"keys": [ed_jwk("d1")]}));
        let r = Remote::new(src.clone(), policy(), false, idp.clone());
        r.refresh(0).await;
        assert!(r.current().is_none());
        assert_eq!(idp.hits(), 1);

        // A plain-http jwks_uri elsewhere than loopback is refused.
        let idp = FakeIdp::new();
        idp.set(
            disc,
            200,
            None,
            serde_json::json!({"issuer": issuer, "jwks_uri": "http://idp.test/jwks"}),
        );
        let r = Remote::new(src, policy(), false, idp.clone());
        r.refresh(0).await;
        assert!(r.current().is_none());
        assert_eq!(
            discovery_url("https://a.test/"),
            "https://a.test/.well-known/openid-configuration"
        );
    }

    #[test]
    fn shared_while_alive() {
        let idp = FakeIdp::new();
        let make = || Remote::new(Source::Jwks(URL.into()), policy(), false, idp.clone());
        let a = shared("test-shared-1".into(), make);
        let b = shared("test-shared-1".into(), || panic!("made twice"));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = shared("test-shared-1".into(), make);
        assert!(c.current().is_none());
    }
}
