//! `rate-limit`: one or more limits per route (`10 per 1s` and `1000 per 1h`), each
//! counted per key of the shared key grammar (`ip` by default), by GCRA (default) or
//! a sliding window; per node in memory (`mode: local`) or shared by every gateway
//! through Redis (`mode: cluster`). docs/traffic.md describes it for users.
//!
//! A request is admitted only when every limit admits it, and a refused request
//! counts against none of them. Answers carry the `RateLimit-Policy` and `RateLimit`
//! fields of draft-ietf-httpapi-ratelimit-headers (the most restrictive limit); a
//! refusal is `429 too_many_requests` with `Retry-After`.
//!
//! Counters live in the gateway's [`PolicyState`](crate::state::PolicyState) under the
//! route and the limit's settings, so a reload that keeps a limit keeps its counters.

pub mod algo;
pub mod cluster;
pub mod local;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use portico_config::grammar::{KeyPart, KeySpec};
use portico_config::units::Dur;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use self::algo::{Algorithm, Decision, Params};
use self::cluster::RedisStore;
use self::local::LocalStore;
use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Flow, Policy, Step};
use crate::registry::{BuildEnv, SettingsErrors};
use crate::state::{Clock, SystemClock};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The limits; a request must fit in every one.
    pub limits: Vec<LimitSettings>,
    /// The algorithm of limits that name none: `gcra` (default) or `sliding_window`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// `local` (default): counted by each gateway in memory. `cluster`: shared by
    /// every gateway through `redis`.
    #[serde(default)]
    pub mode: Mode,
    /// The Redis server of `mode: cluster`.
    #[serde(default)]
    pub redis: Option<RedisSettings>,
    /// When Redis does not answer in time (cluster mode): `allow` (default) lets the
    /// request through, `deny` answers `503 rate_limit_unavailable`.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Also send `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    #[serde(default)]
    pub legacy_headers: bool,
    /// Local mode: how many keys each limit keeps at most (default 100000); past it,
    /// the keys closest to expiring are forgotten first.
    #[serde(default)]
    pub max_keys: Option<usize>,
    /// The message of the `429` answer. Default: "rate limit exceeded".
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Requests admitted per `per`.
    pub requests: u64,
    /// The window: `1s`, `1m`, `1h`, `1d`, ...
    pub per: Dur,
    /// GCRA only: requests admitted at once (default: `requests`).
    #[serde(default)]
    pub burst: Option<u64>,
    /// What is counted separately (the key grammar; default `ip`). A request whose
    /// key has no value at all (e.g. `consumer` without one) is counted by client IP.
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// The name in the `RateLimit` fields. Default: `<requests>-per-<per>`.
    #[serde(default)]
    pub name: Option<String>,
    /// This limit's algorithm, instead of the policy's.
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Local,
    Cluster,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// How long a request waits for Redis (default 50ms).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Prefix of the keys in Redis (default `portico:rl`).
    #[serde(default)]
    pub prefix: Option<String>,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_millis(50))
}

const DEFAULT_MAX_KEYS: usize = 100_000;

struct Limit {
    name: String,
    params: Params,
    key: KeySpec,
    /// Local mode.
    store: Option<Arc<LocalStore>>,
    /// Cluster mode: the Redis key is this prefix + the request's key.
    redis_prefix: String,
}

enum Backend {
    Local,
    Cluster(Arc<RedisStore>, OnStoreError),
}

/// Counters of one scope (a route, or the global policy), kept across reloads.
#[derive(Default)]
struct Stats {
    admitted: AtomicU64,
    rejected: AtomicU64,
    store_errors: AtomicU64,
}

pub struct RateLimit {
    limits: Box<[Limit]>,
    backend: Backend,
    policy_header: HeaderValue,
    legacy: bool,
    message: String,
    scope: Arc<str>,
    stats: Arc<Stats>,
    clock: Arc<dyn Clock>,
}

/// What the request phase leaves for the response phase.
#[derive(Clone, Copy)]
struct Verdict {
    limit: usize,
    remaining: u64,
    reset_s: u64,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `1s`, `90s`, `1m`, `1h`, `2d`, `500ms`: the shortest exact spelling.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

impl RateLimit {
    pub fn new(s: Settings, env: &BuildEnv) -> Result<Self, SettingsErrors> {
        Self::with_clock(s, env, Arc::new(SystemClock::default()))
    }

    pub fn with_clock(
        s: Settings,
        env: &BuildEnv,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SettingsErrors> {
        let mut errs: SettingsErrors = Vec::new();
        let root = KeyPath::root();
        if s.limits.is_empty() {
            errs.push((root.key("limits"), "give at least one limit".into()));
        }
        let max_keys = s.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            errs.push((root.key("max_keys"), "must be at least 1".into()));
        }
        let backend_store = match (s.mode, &s.redis) {
            (Mode::Local, None) => None,
            (Mode::Local, Some(_)) => {
                errs.push((
                    root.key("redis"),
                    "only used with `mode: cluster`; set it or remove `redis`".into(),
                ));
                None
            }
            (Mode::Cluster, None) => {
                errs.push((
                    root.key("redis"),
                    "`mode: cluster` needs `redis: {url: ...}`".into(),
                ));
                None
            }
            (Mode::Cluster, Some(r)) => {
                if r.timeout.0.is_zero() {
                    errs.push((
                        root.key("redis").key("timeout"),
                        "must be more than 0".into(),
                    ));
                }
                let key = format!("redis/{}/{:?}", r.url, r.timeout.0);
                match RedisStore::new(&r.url, r.timeout.0) {
                    Ok(store) => Some(env.state.get_or_insert(&key, move || store)),
                    Err(e) => {
                        errs.push((
                            root.key("redis").key("url"),
                            format!("not a Redis URL: {e}"),
                        ));
                        None
                    }
                }
            }
        };
        let prefix = s
            .redis
            .as_ref()
            .and_then(|r| r.prefix.clone())
            .unwrap_or_else(|| "portico:rl".into());
        let mut limits = Vec::with_capacity(s.limits.len());
        let mut policy_header = String::new();
        for (i, l) in s.limits.iter().enumerate() {
            let at = root.key("limits").index(i);
            let algorithm = l.algorithm.unwrap_or(s.algorithm);
            if l.requests == 0 {
                errs.push((at.key("requests"), "must be at least 1".into()));
            }
            let per_ns = u64::try_from(l.per.0.as_nanos()).unwrap_or(u64::MAX);
            if l.per.0 < Duration::from_millis(1) {
                errs.push((at.key("per"), "must be at least 1ms".into()));
            }
            match (l.burst, algorithm) {
                (Some(0), _) => errs.push((at.key("burst"), "must be at least 1".into())),
                (Some(_), Algorithm::SlidingWindow) => errs.push((
                    at.key("burst"),
                    "only `algorithm: gcra` has a burst; a sliding window admits `requests` per window".into(),
                )),
                _ => {}
            }
            let name = l
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-per-{}", l.requests, human(l.per.0)));
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
            {
                errs.push((
                    at.key("name"),
                    "use printable ASCII without `\"` or `\\` (it is sent in a header)".into(),
                ));
            }
            if limits.iter().any(|x: &Limit| x.name == name) {
                errs.push((
                    at.key("name"),
                    format!("another limit is named `{name}`; give each limit its own `name`"),
                ));
            }
            let params = Params {
                algorithm,
                requests: l.requests.max(1),
                per_ns: per_ns.max(1),
                burst: l.burst.unwrap_or(l.requests).max(1),
            };
            let key = l.key.clone().unwrap_or_else(|| KeySpec(vec![KeyPart::Ip]));
            let key_text = serde_json::to_string(&key).unwrap_or_default();
            let fingerprint = format!(
                "{:?}/{}/{}/{}/{key_text}",
                params.algorithm, params.requests, params.per_ns, params.burst
            );
            let store = (s.mode == Mode::Local).then(|| {
                env.state.get_or_insert(
                    &format!("rate-limit/{}/{name}/{fingerprint}/{max_keys}", env.scope),
                    || LocalStore::new(params, max_keys.max(1)),
                )
            });
            let _ = write!(
                policy_header,
                "{}\"{name}\";q={};w={}",
                if i > 0 { ", " } else { "" },
                l.requests,
                ceil_secs(per_ns).max(1)
            );
            limits.push(Limit {
                redis_prefix: format!("{prefix}:{}:{name}:{fingerprint}:", env.scope),
                name,
                params,
                key,
                store,
            });
        }
        let policy_header = HeaderValue::from_str(&policy_header);
        if !errs.is_empty() {
            return Err(errs);
        }
        let Ok(policy_header) = policy_header else {
            return Err(vec![(
                root.key("limits"),
                "names must be header-safe".into(),
            )]);
        };
        let backend = match backend_store {
            Some(store) => Backend::Cluster(store, s.on_store_error),
            None => Backend::Local,
        };
        Ok(RateLimit {
            limits: limits.into(),
            backend,
            policy_header,
            legacy: s.legacy_headers,
            message: s.message.unwrap_or_else(|| "rate limit exceeded".into()),
            stats: env
                .state
                .get_or_insert(&format!("rate-limit-stats/{}", env.scope), Stats::default),
            scope: env.scope.clone(),
            clock,
        })
    }

    fn key(&self, ctx: &Ctx, req: &Request<Body>, l: &Limit) -> String {
        ctx.key_of(req, &l.key)
            .unwrap_or_else(|| format!("\u{0}ip:{}", ctx.client_ip))
    }

    /// Decide in local mode; admitted requests of a refused one are given back.
    fn check_local(&self, ctx: &Ctx, req: &Request<Body>) -> Vec<Decision> {
        let now = self.clock.now_ns();
        let mut keys = Vec::with_capacity(self.limits.len());
        let mut out = Vec::with_capacity(self.limits.len());
        for l in self.limits.iter() {
            let key = self.key(ctx, req, l);
            if let Some(store) = &l.store {
                out.push(store.check(&key, now));
            }
            keys.push(key);
        }
        if out.iter().any(|d| !d.allowed) {
            for ((l, d), key) in self.limits.iter().zip(&out).zip(&keys) {
                if let (true, Some(store)) = (d.allowed, &l.store) {
                    store.refund(key);
                }
            }
        }
        out
    }

    /// Record the decisions in `ctx` (for the response headers) and answer.
    fn conclude(&self, ctx: &mut Ctx, decisions: &[Decision]) -> Flow {
        let refused = decisions
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.allowed)
            .max_by_key(|(_, d)| d.retry_ns);
        let (limit, d) = match refused {
            Some(r) => r,
            None => match decisions
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| (d.remaining, std::cmp::Reverse(d.reset_ns)))
            {
                Some(x) => x,
                None => return Flow::Continue,
            },
        };
        ctx.extensions.insert(Verdict {
            limit,
            remaining: d.remaining,
            reset_s: ceil_secs(d.reset_ns),
        });
        if refused.is_none() {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Flow::Continue;
        }
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let retry = ceil_secs(d.retry_ns).max(1);
        Flow::Error(
            GatewayError::new(ErrorKind::TooManyRequests, self.message.clone())
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry)),
        )
    }
}

impl Policy for RateLimit {
    fn name(&self) -> &'static str {
        "rate-limit"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        match &self.backend {
            Backend::Local => {
                let decisions = self.check_local(ctx, req);
                Step::Ready(Some(self.conclude(ctx, &decisions)))
            }
            Backend::Cluster(store, on_error) => {
                let keys: Vec<String> = self
                    .limits
                    .iter()
                    .map(|l| {
                        let mut k = l.redis_prefix.clone();
                        k.push_str(&self.key(ctx, req, l));
                        k
                    })
                    .collect();
                Step::Pending(Box::pin(async move {
                    let args: Vec<(Params, &str)> = self
                        .limits
                        .iter()
                        .zip(&keys)
                        .map(|(l, k)| (l.params, k.as_str()))
                        .collect();
                    let r = store.check(&args).await;
                    if r.is_err() {
                        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    match r {
                        Ok(decisions) => self.conclude(ctx, &decisions),
                        Err(_) if *on_error == OnStoreError::Allow => Flow::Continue,
                        Err(_) => Flow::Error(GatewayError::new(
                            ErrorKind::RateLimitUnavailable,
                            "the rate-limit store did not answer",
                        )),
                    }
                }))
            }
        }
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        let Some(v) = ctx.extensions.get::<Verdict>().copied() else {
            return;
        };
        let Some(l) = self.limits.get(v.limit) else {
            return;
        };
        let h = &mut resp.headers;
        h.insert(RATELIMIT_POLICY.clone(), self.policy_header.clone());
        let item = format!("\"{}\";r={};t={}", l.name, v.remaining, v.reset_s);
        if let Ok(item) = HeaderValue::from_str(&item) {
            h.insert(RATELIMIT.clone(), item);
        }
        if self.legacy {
            h.insert(X_LIMIT.clone(), HeaderValue::from(l.params.requests));
            h.insert(X_REMAINING.clone(), HeaderValue::from(v.remaining));
            h.insert(X_RESET.clone(), HeaderValue::from(v.reset_s));
        }
    }

    fn metrics(&self, out: &mut String) {
        let scope = self.scope.replace('\\', "\\\\").replace('"', "\\\"");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP portico_rate_limit_requests_total Requests checked by rate-limit, by result.\n# TYPE portico_rate_limit_requests_total counter\nportico_rate_limit_requests_total{{scope=\"{scope}\",result=\"admitted\"}} {}\nportico_rate_limit_requests_total{{scope=\"{scope}\",result=\"rejected\"}} {}",
            load(&self.stats.admitted),
            load(&self.stats.rejected),
        );
        if let Backend::Cluster(..) = &self.backend {
            let _ = writeln!(
                out,
                "# HELP portico_rate_limit_store_errors_total Rate-limit decisions Redis did not answer (on_store_error applied).\n# TYPE portico_rate_limit_store_errors_total counter\nportico_rate_limit_store_errors_total{{scope=\"{scope}\"}} {}",
                load(&self.stats.store_errors),
            );
        }
    }
}

#[cfg(test)]
mod tests;
