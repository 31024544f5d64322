//! `quota`: how much a consumer (or any key of the key grammar) may use per calendar
//! day or month, in a time zone or from a billing anchor day, counted in requests or
//! in bytes (request and response bodies). Kept per gateway in memory and saved to the
//! store (`mode: local`, survives restarts) or shared by every gateway through Redis
//! (`mode: cluster`). The admin API reads and resets it (`/admin/quotas`, through the
//! [`Registry`]). docs/traffic.md describes it for users.
//!
//! A request is counted when it is admitted (after authentication and `rate-limit`);
//! its bytes are added when the exchange ends. Once a limit is used up, requests are
//! refused with `429 quota_exceeded` and `Retry-After` until its period ends. Every
//! answer carries `X-Quota-Limit`, `X-Quota-Remaining`, `X-Quota-Reset` and
//! `X-Quota-Name` for the limit closest to being used up (the one that refused).

pub mod cluster;
pub mod local;
pub mod period;
pub mod registry;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use portico_config::grammar::{KeyPart, KeySpec};
use portico_config::units::{ByteSize, Dur};
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;

use self::local::{LocalCounts, Slot};
use self::period::{Calendar, Per, SystemWallClock, WallClock};
pub use self::registry::{registry, Registry, Usage};
use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::plugins::rate_limit::cluster::RedisStore;
use crate::plugins::rate_limit::{Mode, OnStoreError};
use crate::policy::{Flow, Outcome, Policy, Step};
use crate::registry::{BuildEnv, SettingsErrors};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The limits; a request is refused once any of them is used up.
    pub limits: Vec<LimitSettings>,
    /// What is counted separately (the key grammar; default `consumer`). A request
    /// whose key has no value (no consumer) is counted by client IP, as `ip:ADDR`.
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// The IANA time zone days and months follow (`Europe/Paris`); default `UTC`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// The day of the month monthly periods start on, 1 to 28 (default 1).
    #[serde(default)]
    pub billing_anchor_day: Option<i64>,
    /// `local` (default): counted by each gateway, saved to the store every second.
    /// `cluster`: shared by every gateway through `redis`.
    #[serde(default)]
    pub mode: Mode,
    /// The Redis server of `mode: cluster`.
    #[serde(default)]
    pub redis: Option<RedisSettings>,
    /// When Redis does not answer in time (cluster mode): `allow` (default) lets the
    /// request through uncounted, `deny` answers `503 quota_unavailable`.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// The message of the `429` answer. Default: "quota exceeded".
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Requests admitted per period (give this or `bytes`).
    #[serde(default)]
    pub requests: Option<u64>,
    /// Bytes (request plus response bodies) per period, e.g. `10GiB` (give this or
    /// `requests`).
    #[serde(default)]
    pub bytes: Option<ByteSize>,
    /// The period: `day` or `month`.
    pub per: Per,
    /// The name in headers, the admin API and the store. Default:
    /// `requests-per-day`, `bytes-per-month`, ...
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// How long a request waits for Redis (default 50ms).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Prefix of the keys in Redis (default `portico:quota`).
    #[serde(default)]
    pub prefix: Option<String>,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_millis(50))
}

struct Limit {
    name: String,
    amount: u64,
    /// Counts requests (else bytes).
    requests: bool,
    per: Per,
}

impl Limit {
    fn unit(&self) -> &'static str {
        if self.requests {
            "requests"
        } else {
            "bytes"
        }
    }
}

enum Backend {
    Local(Arc<LocalCounts>),
    Cluster {
        store: Arc<RedisStore>,
        /// `{prefix}:{scope}:`; a key is this + `{limit}:{period start}:{request key}`.
        prefix: String,
        on_error: OnStoreError,
    },
}

/// Counters of one scope, kept across reloads.
#[derive(Default)]
struct Stats {
    admitted: AtomicU64,
    rejected: AtomicU64,
    store_errors: AtomicU64,
}

/// A built `quota` policy; the [`Registry`] holds it weakly for the admin API.
pub struct Shared {
    scope: Arc<str>,
    limits: Box<[Limit]>,
    key: KeySpec,
    calendar: Calendar,
    backend: Backend,
    message: String,
    clock: Arc<dyn WallClock>,
    stats: Arc<Stats>,
    /// Keeps the registry (and its background saving) alive while the policy is.
    _registry: Arc<Registry>,
}

pub struct Quota(Arc<Shared>);

/// What the request phase leaves for the response and log phases.
#[derive(Clone)]
struct Ticket {
    key: Arc<str>,
    /// Counted: its bytes are added at the end.
    admitted: bool,
    /// The limit shown in the headers: index, remaining, seconds until reset.
    shown: Option<(usize, u64, i64)>,
}

static X_NAME: HeaderName = HeaderName::from_static("x-quota-name");
static X_LIMIT: HeaderName = HeaderName::from_static("x-quota-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-quota-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-quota-reset");

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Quota {
    pub fn new(s: Settings, env: &BuildEnv) -> Result<Self, SettingsErrors> {
        Self::with_clock(s, env, Arc::new(SystemWallClock))
    }

    pub fn with_clock(
        s: Settings,
        env: &BuildEnv,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, SettingsErrors> {
        let mut errs: SettingsErrors = Vec::new();
        let root = KeyPath::root();
        if s.limits.is_empty() {
            errs.push((root.key("limits"), "give at least one limit".into()));
        }
        let anchor = s.billing_anchor_day.unwrap_or(1);
        let anchor_ok = (1..=28).contains(&anchor);
        if !anchor_ok {
            errs.push((
                root.key("billing_anchor_day"),
                "must be from 1 to 28 (every month has that day; a period starting on the 29th to 31st would not exist in February)".into(),
            ));
        }
        let tz = s.time_zone.as_deref().unwrap_or("UTC");
        let calendar = match Calendar::new(tz, if anchor_ok { anchor as i8 } else { 1 }) {
            Ok(c) => Some(c),
            Err(e) => {
                errs.push((root.key("time_zone"), e));
                None
            }
        };
        if s.billing_anchor_day.is_some() && !s.limits.iter().any(|l| l.per == Per::Month) {
            errs.push((
                root.key("billing_anchor_day"),
                "only monthly limits (`per: month`) use it; remove it or add one".into(),
            ));
        }
        let mut limits: Vec<Limit> = Vec::with_capacity(s.limits.len());
        for (i, l) in s.limits.iter().enumerate() {
            let at = root.key("limits").index(i);
            let (amount, requests) = match (l.requests, l.bytes) {
                (Some(n), None) => (n, true),
                (None, Some(b)) => (b.0, false),
                (Some(_), Some(_)) => {
                    errs.push((
                        at.clone(),
                        "give `requests` or `bytes`, not both (make two limits)".into(),
                    ));
                    (1, true)
                }
                (None, None) => {
                    errs.push((at.clone(), "give `requests` or `bytes`".into()));
                    (1, true)
                }
            };
            if amount == 0 {
                let k = if requests { "requests" } else { "bytes" };
                errs.push((at.key(k), "must be at least 1".into()));
            }
            let unit = if requests { "requests" } else { "bytes" };
            let name = l
                .name
                .clone()
                .unwrap_or_else(|| format!("{unit}-per-{}", l.per.as_str()));
            if !name_ok(&name) {
                errs.push((
                    at.key("name"),
                    "use 1 to 64 letters, digits, `-`, `_` or `.`".into(),
                ));
            }
            if limits.iter().any(|x| x.name == name) {
                errs.push((
                    at.key("name"),
                    format!("another limit is named `{name}`; give each limit its own `name`"),
                ));
            }
            limits.push(Limit {
                name,
                amount: amount.max(1),
                requests,
                per: l.per,
            });
        }
        let scope = env.scope.clone();
        let backend = match (s.mode, &s.redis) {
            (Mode::Local, None) => Some(Backend::Local(env.state.get_or_insert(
                &format!("quota/{scope}"),
                || {
                    let counts = LocalCounts::new(scope.clone());
                    if let Some(store) = env.identity.store() {
                        match store.quota_rows(&scope, clock.now_secs()) {
                            Ok(rows) => counts.load(rows),
                            Err(e) => {
                                tracing::error!(error = %e, scope = %scope, "quota: cannot read the saved counts; starting from zero")
                            }
                        }
                    }
                    counts
                },
            ))),
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
                let prefix = r.prefix.clone().unwrap_or_else(|| "portico:quota".into());
                if prefix.is_empty() {
                    errs.push((root.key("redis").key("prefix"), "must not be empty".into()));
                }
                // The same key as `rate-limit`'s: one connection per Redis server.
                let key = format!("redis/{}/{:?}", r.url, r.timeout.0);
                match RedisStore::new(&r.url, r.timeout.0) {
                    Ok(store) => Some(Backend::Cluster {
                        store: env.state.get_or_insert(&key, move || store),
                        prefix: format!("{prefix}:{scope}:"),
                        on_error: s.on_store_error,
                    }),
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
        if s.mode == Mode::Local && s.on_store_error != OnStoreError::Allow {
            errs.push((
                root.key("on_store_error"),
                "only used with `mode: cluster` (local counts are in memory)".into(),
            ));
        }
        let (Some(calendar), Some(backend), true) = (calendar, backend, errs.is_empty()) else {
            return Err(errs);
        };
        let registry = registry::obtain(env);
        let shared = Arc::new(Shared {
            stats: env
                .state
                .get_or_insert(&format!("quota-stats/{scope}"), Stats::default),
            scope,
            limits: limits.into(),
            key: s.key.unwrap_or_else(|| KeySpec(vec![KeyPart::Consumer])),
            calendar,
            backend,
            message: s.message.unwrap_or_else(|| "quota exceeded".into()),
            clock,
            _registry: registry.clone(),
        });
        registry.register(&shared);
        Ok(Quota(shared))
    }
}

impl Shared {
    fn key(&self, ctx: &Ctx, req: &Request<Body>) -> String {
        ctx.key_of(req, &self.key)
            .unwrap_or_else(|| format!("ip:{}", ctx.client_ip))
    }

    fn periods(&self, now: i64) -> Vec<(i64, i64)> {
        self.limits
            .iter()
            .map(|l| self.calendar.period(l.per, now))
            .collect()
    }

    fn slots<'a>(&'a self, periods: &[(i64, i64)]) -> Vec<Slot<'a>> {
        self.limits
            .iter()
            .zip(periods)
            .map(|(l, &(start, end))| Slot {
                name: &l.name,
                amount: l.amount,
                requests: l.requests,
                start,
                end,
            })
            .collect()
    }

    fn redis_keys(&self, prefix: &str, periods: &[(i64, i64)], key: &str) -> Vec<String> {
        self.limits
            .iter()
            .zip(periods)
            .map(|(l, (start, _))| format!("{prefix}{}:{start}:{key}", l.name))
            .collect()
    }

    /// One call per limit for the cluster store: its key, size and period end.
    fn redis_calls<'k>(
        &self,
        keys: &'k [String],
        periods: &[(i64, i64)],
    ) -> Vec<cluster::Call<'k>> {
        self.limits
            .iter()
            .zip(keys)
            .zip(periods)
            .map(|((l, k), (_, end))| cluster::Call {
                key: k,
                amount: l.amount,
                requests: l.requests,
                end: *end,
            })
            .collect()
    }

    /// Record the verdict in `ctx` (for the headers and the log phase) and answer.
    fn conclude(
        &self,
        ctx: &mut Ctx,
        key: Arc<str>,
        admitted: bool,
        used: &[u64],
        periods: &[(i64, i64)],
        now: i64,
    ) -> Flow {
        let rows = self.limits.iter().zip(used).zip(periods).enumerate();
        let shown = if admitted {
            // The limit with the smallest share left.
            rows.min_by(|(_, ((a, ua), _)), (_, ((b, ub), _))| {
                let left = |l: &Limit, u: u64| u128::from(l.amount.saturating_sub(u));
                (left(a, **ua) * u128::from(b.amount)).cmp(&(left(b, **ub) * u128::from(a.amount)))
            })
        } else {
            // The used-up limit that frees last.
            rows.filter(|(_, ((l, u), _))| **u >= l.amount)
                .max_by_key(|(_, (_, (_, end)))| *end)
        }
        .map(|(i, ((l, u), (_, end)))| (i, l.amount.saturating_sub(*u), (end - now).max(1)));
        ctx.extensions.insert(Ticket {
            key,
            admitted,
            shown,
        });
        if admitted {
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            return Flow::Continue;
        }
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        let retry = shown.map_or(1, |(_, _, r)| r);
        Flow::Error(
            GatewayError::new(ErrorKind::QuotaExceeded, self.message.clone())
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry)),
        )
    }
}

impl Policy for Quota {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let q = &*self.0;
        let now = q.clock.now_secs();
        let key = q.key(ctx, req);
        let periods = q.periods(now);
        match &q.backend {
            Backend::Local(counts) => {
                let (admitted, used) = counts.admit(&key, &q.slots(&periods));
                Step::Ready(Some(q.conclude(
                    ctx,
                    key.into(),
                    admitted,
                    &used,
                    &periods,
                    now,
                )))
            }
            Backend::Cluster {
                store,
                prefix,
                on_error,
            } => Step::Pending(Box::pin(async move {
                let keys = q.redis_keys(prefix, &periods, &key);
                let calls = q.redis_calls(&keys, &periods);
                match cluster::admit(store, &calls).await {
                    Ok((admitted, used)) => {
                        q.conclude(ctx, key.into(), admitted, &used, &periods, now)
                    }
                    Err(_) => {
                        q.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        if *on_error == OnStoreError::Allow {
                            Flow::Continue
                        } else {
                            Flow::Error(GatewayError::new(
                                ErrorKind::QuotaUnavailable,
                                "the quota store did not answer",
                            ))
                        }
                    }
                }
            })),
        }
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        let Some((i, remaining, reset)) = ctx.extensions.get::<Ticket>().and_then(|t| t.shown)
        else {
            return;
        };
        let Some(l) = self.0.limits.get(i) else {
            return;
        };
        let h = &mut resp.headers;
        if let Ok(v) = HeaderValue::from_str(&l.name) {
            h.insert(X_NAME.clone(), v);
        }
        h.insert(X_LIMIT.clone(), HeaderValue::from(l.amount));
        h.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
        h.insert(X_RESET.clone(), HeaderValue::from(reset));
    }

    fn log(&self, ctx: &Ctx, outcome: &Outcome) {
        let q = &self.0;
        let Some(t) = ctx.extensions.get::<Ticket>().filter(|t| t.admitted) else {
            return;
        };
        let bytes = outcome.bytes_in.saturating_add(outcome.bytes_out);
        if bytes == 0 || q.limits.iter().all(|l| l.requests) {
            return;
        }
        // Into the periods current when the exchange ends.
        let periods = q.periods(q.clock.now_secs());
        match &q.backend {
            Backend::Local(counts) => counts.add_bytes(&t.key, &q.slots(&periods), bytes),
            Backend::Cluster { prefix, .. } => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let keys = q.redis_keys(prefix, &periods, &t.key);
                let q = self.0.clone();
                rt.spawn(async move {
                    let Backend::Cluster { store, .. } = &q.backend else {
                        return;
                    };
                    let calls = q.redis_calls(&keys, &periods);
                    if cluster::add_bytes(store, &calls, bytes).await.is_err() {
                        q.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }

    fn metrics(&self, out: &mut String) {
        let q = &self.0;
        let scope = q.scope.replace('\\', "\\\\").replace('"', "\\\"");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP portico_quota_requests_total Requests checked by quota, by result.\n# TYPE portico_quota_requests_total counter\nportico_quota_requests_total{{scope=\"{scope}\",result=\"admitted\"}} {}\nportico_quota_requests_total{{scope=\"{scope}\",result=\"rejected\"}} {}",
            load(&q.stats.admitted),
            load(&q.stats.rejected),
        );
        if let Backend::Cluster { .. } = &q.backend {
            let _ = writeln!(
                out,
                "# HELP portico_quota_store_errors_total Quota calls Redis did not answer (on_store_error applied to requests).\n# TYPE portico_quota_store_errors_total counter\nportico_quota_store_errors_total{{scope=\"{scope}\"}} {}",
                load(&q.stats.store_errors),
            );
        }
    }
}

#[cfg(test)]
mod tests;
