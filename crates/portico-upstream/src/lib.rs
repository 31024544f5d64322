//! Portico's upstreams.
//!
//! Owns: compiled upstreams (the live target set with its balancing algorithm,
//! timeouts, breakers, retries), health (passive and active), service discovery, and
//! pooled HTTP/1.1 + HTTP/2 clients (plain and TLS). The state that must outlive a
//! configuration snapshot (clients and connection pools, target health, breakers, live
//! target sets) lives in [`UpstreamState`], keyed by upstream name and target URL.
//!
//! Does not own: sending a request through the pipeline (`portico-proxy`).
#![forbid(unsafe_code)]

pub mod adaptive;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod check;
pub mod client;
pub mod discovery;
pub mod h1;
pub mod health;
pub mod live;
pub mod overlay;
pub mod pool;
pub mod supervise;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use parking_lot::Mutex;
use portico_config::discovery::AllUnhealthy;
use portico_config::grammar::KeySpec;
use portico_config::model::{Passive, Protocol, Timeouts, Upstream as UpstreamConfig, UpstreamTls};
use tokio::time::Instant;

pub use balance::{Balancer, Schedule};
pub use breaker::{BreakerSettings, CircuitBreaker, Permit, Rejected, State, Transition};
pub use budget::{BudgetSettings, RetriesConfig, RetryBudget, RetryOn};
pub use client::{ClientError, ConnectTimeout};
pub use health::{ms_at, now_ms, Ejection, Streak, TargetHealth};
pub use live::{Endpoint, Live, TargetSet};
pub use overlay::{Field, Overlay};
pub use pool::{Connector, Failed, SendError, TargetPool};

/// One target of a compiled upstream.
#[derive(Debug)]
pub struct Target {
    pub url: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` sent upstream unless the route preserves the client's.
    pub host_header: HeaderValue,
    pub weight: u32,
    pub health: Arc<TargetHealth>,
    /// Connections to this target.
    pub pool: Arc<TargetPool>,
    /// Its own circuit breaker (`circuit_breaker.per_target`).
    pub breaker: Option<Arc<CircuitBreaker>>,
}

/// A compiled upstream, part of a snapshot.
pub struct Upstream {
    pub name: Arc<str>,
    /// The targets (static and discovered) and their balancer, current without a
    /// reload. A request loads it once ([`Live::current`]).
    pub live: Arc<Live>,
    /// The request key hashed by `consistent_hash`.
    pub hash_key: Option<KeySpec>,
    pub timeouts: Timeouts,
    pub passive: Passive,
    /// What happens when no target is healthy.
    pub when_all_unhealthy: AllUnhealthy,
    /// The discovery source (its task runs beside the snapshot).
    pub discovery: Option<portico_config::discovery::Discovery>,
    /// Active health checks (their task runs beside the snapshot).
    pub active: Option<portico_config::discovery::ActiveCheck>,
    /// The adaptive concurrency limit (kept across reloads while its settings are).
    pub adaptive: Option<Arc<adaptive::AdaptiveLimit>>,
    /// Hedging settings.
    pub hedging: Option<portico_config::resilience::Hedging>,
    /// Recent response-head latencies (hedging's `p95`), kept across reloads.
    pub recent: Arc<adaptive::RecentLatency>,
    /// The circuit breaker(s), when `circuit_breaker` is configured.
    pub circuit: Option<Circuit>,
    /// The upstream's `retries` (a route's own replace them).
    pub retries: Option<RetriesConfig>,
    /// The retry budget, shared by every route to this upstream (settings from the
    /// upstream's `retries.budget`, the defaults without one).
    pub budget: Arc<RetryBudget>,
}

/// The circuit breaker(s) of an upstream.
pub struct Circuit {
    /// One breaker per target (`per_target: true`, each [`Target::breaker`]) or one
    /// for the upstream.
    pub per_target: bool,
    /// The upstream's breaker (not `per_target`).
    pub upstream_wide: Option<Arc<CircuitBreaker>>,
    /// The answer while open, instead of the 503 error.
    pub fallback: Option<FallbackResponse>,
    /// Transitions counted by the state entered (closed, open, half-open), kept
    /// across reloads.
    pub transitions: Arc<TransitionCounts>,
}

/// A compiled `circuit_breaker.fallback`.
#[derive(Debug, Clone)]
pub struct FallbackResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Breaker transitions of an upstream, by the state entered.
#[derive(Debug, Default)]
pub struct TransitionCounts([AtomicU64; 3]);

impl TransitionCounts {
    fn slot(s: State) -> usize {
        match s {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    /// Count a transition into `to`.
    pub fn count(&self, to: State) {
        self.0[Self::slot(to)].fetch_add(1, Ordering::Relaxed);
    }

    /// Transitions into `to` so far.
    pub fn get(&self, to: State) -> u64 {
        self.0[Self::slot(to)].load(Ordering::Relaxed)
    }
}

impl Circuit {
    /// The breaker that governs target `t`.
    pub fn breaker<'a>(&'a self, t: &'a Target) -> Option<&'a CircuitBreaker> {
        if self.per_target {
            t.breaker.as_deref()
        } else {
            self.upstream_wide.as_deref()
        }
    }

    /// Log (at warn) and count a transition of the breaker of target `i`.
    pub fn note(&self, upstream: &str, target: &str, t: Transition) {
        self.transitions.count(t.to);
        if self.per_target {
            tracing::warn!(upstream = %upstream, target = %target, from = %t.from, to = %t.to, "{t}");
        } else {
            tracing::warn!(upstream = %upstream, from = %t.from, to = %t.to, "{t}");
        }
    }
}

impl Upstream {
    /// Pick the next available target of `set`, skipping `exclude` (already tried)
    /// and unhealthy ones. `key` is the request's [`Upstream::key_hash`]
    /// (`consistent_hash`). When no target at all is healthy and the upstream says
    /// `when_all_unhealthy: panic`, health is ignored.
    pub fn pick(&self, set: &TargetSet, exclude: &[usize], key: Option<u64>) -> Option<usize> {
        let now = now_ms();
        let t = &set.targets;
        let picked = set.balancer.pick(t, key, |i| {
            !exclude.contains(&i) && t[i].health.available(now)
        });
        if picked.is_none()
            && self.when_all_unhealthy == AllUnhealthy::Panic
            && !t.iter().any(|x| x.health.available(now))
        {
            return set.balancer.pick(t, key, |i| !exclude.contains(&i));
        }
        picked
    }

    /// The hash of the request key for `consistent_hash`: `value` evaluates the key
    /// (`Ctx::key`) and is only called when the upstream has one. `None`: no
    /// `hash_key`, or the request has none of its parts.
    pub fn key_hash(&self, value: impl FnOnce(&KeySpec) -> String) -> Option<u64> {
        let spec = self.hash_key.as_ref()?;
        balance::key_hash(spec, &value(spec))
    }

    /// Target `i` answered (its response head arrived); `sent` is when sending began.
    /// Feeds the latency estimate of `p2c_ewma` (nothing to do for other algorithms):
    /// the time to the response head, or a failure for a 502, 503 or 504 answer (an
    /// upstream that fails fast must not look fast).
    pub fn answered(&self, set: &TargetSet, i: usize, sent: Instant, status: StatusCode) {
        if !set.balancer.uses_latency() {
            return;
        }
        if let Some(t) = set.targets.get(i) {
            let now = portico_plugins::clock::now();
            let elapsed = now.saturating_duration_since(sent);
            if counts_as_failure(status) {
                t.health.observe_failure(elapsed, ms_at(now));
            } else {
                t.health.observe(elapsed, ms_at(now));
            }
        }
    }

    /// The exchange with target `i` failed on the upstream's side (no connection, the
    /// connection lost, a timeout): for `p2c_ewma`, a penalty latency
    /// ([`health::FAILURE_PENALTY`] at least).
    pub fn failed(&self, set: &TargetSet, i: usize, sent: Instant) {
        if !set.balancer.uses_latency() {
            return;
        }
        if let Some(t) = set.targets.get(i) {
            let now = portico_plugins::clock::now();
            t.health
                .observe_failure(now.saturating_duration_since(sent), ms_at(now));
        }
    }

    /// Target `i` answered with `status` (passive health): a 5xx continues its 5xx
    /// streak, anything else ends it; every answer ends the connect and timeout streaks.
    #[inline]
    pub fn responded(&self, set: &TargetSet, i: usize, status: StatusCode) {
        let Some(t) = set.targets.get(i) else { return };
        let is_5xx = status.is_server_error();
        t.health.success(is_5xx);
        if is_5xx {
            self.streak(set, i, Streak::Status5xx);
        }
    }

    /// Target `i` could not be reached (passive health).
    pub fn connect_failed(&self, set: &TargetSet, i: usize) {
        self.streak(set, i, Streak::Connect);
    }

    /// Target `i` did not answer in time (passive health).
    pub fn timed_out(&self, set: &TargetSet, i: usize) {
        self.streak(set, i, Streak::Timeout);
    }

    /// One more failure of `kind` on target `i`: eject it when its streak reaches the
    /// threshold, unless `max_ejected_percent` of the targets already are (one target
    /// may always be).
    fn streak(&self, set: &TargetSet, i: usize, kind: Streak) {
        let p = &self.passive;
        let Some(t) = set.targets.get(i) else { return };
        let threshold = match kind {
            Streak::Connect => p.consecutive_failures,
            Streak::Status5xx => p.consecutive_5xx,
            Streak::Timeout => p.consecutive_timeouts,
        };
        if !p.enabled || threshold == 0 {
            return;
        }
        let now = now_ms();
        let ej = Ejection {
            base_ms: p.ejection_time.0.as_millis() as u64,
            max_ms: p.max_ejection_time.0.as_millis() as u64,
        };
        let may_eject = || {
            let cap = (set.targets.len() * p.max_ejected_percent as usize / 100).max(1);
            set.targets.iter().filter(|t| t.health.ejected(now)).count() < cap
        };
        if t.health.failure(kind, now, threshold, ej, may_eject) {
            let secs = (t.health.ejected_until().saturating_sub(now)) as f64 / 1000.0;
            tracing::warn!(upstream = %self.name, target = %t.url, ejection_secs = secs, "target ejected after {threshold} consecutive {}", kind.as_str());
        }
    }
}

/// Answers that count as failures for the latency estimate: the upstream (or a proxy
/// in front of it) could not serve the request.
fn counts_as_failure(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// What a connector is built from: the connection settings and the contents of the
/// files they name (CA bundle, client certificate and key), so that a reload after
/// replacing a file builds a new connector (and new connections).
#[derive(Clone, PartialEq)]
struct ConnectorKey(
    Protocol,
    UpstreamTls,
    usize,
    std::time::Duration,
    Vec<Option<Vec<u8>>>,
);

/// State that outlives snapshots: connectors, connection pools, target health,
/// breakers, retry budgets and live target sets.
#[derive(Default)]
pub struct UpstreamState {
    connectors: Mutex<HashMap<String, (ConnectorKey, Arc<Connector>)>>,
    maps: Arc<live::Maps>,
    transitions: Mutex<HashMap<String, Arc<TransitionCounts>>>,
    budgets: Mutex<HashMap<String, (BudgetSettings, Arc<RetryBudget>)>>,
    lives: Mutex<HashMap<String, Arc<Live>>>,
    adaptive: Mutex<HashMap<String, Arc<adaptive::AdaptiveLimit>>>,
    recent: Mutex<HashMap<String, Arc<adaptive::RecentLatency>>>,
}

/// A problem compiling an upstream, with the config keys below `upstreams.NAME` it concerns.
#[derive(Debug)]
pub struct CompileError {
    pub key: Vec<String>,
    pub message: String,
}

impl UpstreamState {
    /// Compile an upstream, reusing its client, target health and live target set
    /// when unchanged.
    pub fn compile(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Result<Upstream, CompileError> {
        if let Some(source) = cfg.discovery.as_ref().and_then(discovery::unavailable) {
            return Err(CompileError {
                key: vec!["discovery".into(), source.into()],
                message: format!("discovery source `{source}` is not available in this build yet"),
            });
        }
        let connector = self.connector_for(name, cfg, resolve)?;
        let statics: Vec<Endpoint> = cfg
            .targets
            .iter()
            .map(|t| Endpoint {
                url: t.url.clone(),
                weight: t.weight,
                host: None,
            })
            .collect();
        let spec = live::Spec {
            statics,
            balance: cfg.balance,
            connector,
            per_target: cfg
                .circuit_breaker
                .as_ref()
                .filter(|cb| cb.per_target)
                .map(BreakerSettings::from),
            discovery: cfg.discovery.clone(),
        };
        // Static targets are checked here so that a bad one is a compile error with
        // its key (a discovered one is only skipped).
        for (i, e) in spec.statics.iter().enumerate() {
            live::target(name, e, &spec, &self.maps).map_err(|m| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: m,
            })?;
        }
        let live = {
            let mut lives = self.lives.lock();
            match lives.get(name) {
                Some(l) if l.built_from(&spec) => l.clone(),
                old => {
                    // Same source: what it found stays until it reports again.
                    let seed = old
                        .filter(|o| o.built_from_discovery(&spec))
                        .and_then(|o| o.discovered());
                    let l = Live::new(name, spec, seed, self.maps.clone());
                    lives.insert(name.to_string(), l.clone());
                    l
                }
            }
        };
        if cfg.health.active.is_none() {
            // Active checks off (or turned off by this reload): what they last said
            // must not keep targets out of rotation.
            for t in &live.current().targets {
                t.health.clear_active();
            }
        }
        let circuit = match &cfg.circuit_breaker {
            Some(cb) => Some(self.circuit_for(name, cb)?),
            None => None,
        };
        let budget_settings = cfg
            .retries
            .as_ref()
            .map(|r| BudgetSettings::from(&r.budget))
            .unwrap_or_default();
        let budget = {
            let mut budgets = self.budgets.lock();
            match budgets.get(name) {
                Some((s, b)) if *s == budget_settings => b.clone(),
                _ => {
                    let b = Arc::new(RetryBudget::new(budget_settings));
                    budgets.insert(name.to_string(), (budget_settings, b.clone()));
                    b
                }
            }
        };
        let adaptive = cfg.adaptive_concurrency.map(|s| {
            let mut map = self.adaptive.lock();
            match map.get(name) {
                Some(a) if *a.settings() == s => a.clone(),
                _ => {
                    let a = Arc::new(adaptive::AdaptiveLimit::new(s, now_ms()));
                    map.insert(name.to_string(), a.clone());
                    a
                }
            }
        });
        let recent = self
            .recent
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        Ok(Upstream {
            adaptive,
            hedging: cfg.hedging,
            recent,
            name: name.into(),
            hash_key: cfg.hash_key.clone(),
            live,
            timeouts: cfg.timeouts,
            passive: cfg.health.passive,
            when_all_unhealthy: cfg.health.when_all_unhealthy,
            discovery: cfg.discovery.clone(),
            active: cfg.health.active.clone(),
            circuit,
            retries: cfg.retries.clone(),
            budget,
        })
    }

    /// The breakers of an upstream, reusing the existing ones while their settings are
    /// unchanged (a reload keeps an open breaker open). Per-target breakers are made
    /// with the targets ([`live`]).
    fn circuit_for(
        &self,
        name: &str,
        cfg: &breaker::CircuitBreakerConfig,
    ) -> Result<Circuit, CompileError> {
        let settings = BreakerSettings::from(cfg);
        let upstream_wide = (!cfg.per_target).then(|| self.maps.breaker(name, "", settings));
        let fallback = match &cfg.fallback {
            None => None,
            Some(fb) => {
                let bad = |k: Vec<String>, m: String| CompileError {
                    key: [vec!["circuit_breaker".into(), "fallback".into()], k].concat(),
                    message: m,
                };
                let status = StatusCode::from_u16(fb.status).map_err(|_| {
                    bad(
                        vec!["status".into()],
                        format!("{} is not a status", fb.status),
                    )
                })?;
                let mut headers = HeaderMap::new();
                for (n, v) in &fb.headers {
                    let hn = HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                        bad(
                            vec!["headers".into(), n.clone()],
                            format!("`{n}` is not a valid header name"),
                        )
                    })?;
                    let hv = HeaderValue::from_str(&v.0).map_err(|_| {
                        bad(
                            vec!["headers".into(), n.clone()],
                            format!("the value of `{n}` is not a valid header value"),
                        )
                    })?;
                    headers.append(hn, hv);
                }
                Some(FallbackResponse {
                    status,
                    headers,
                    body: Bytes::from(fb.body.clone()),
                })
            }
        };
        let transitions = self
            .transitions
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone();
        Ok(Circuit {
            per_target: cfg.per_target,
            upstream_wide,
            fallback,
            transitions,
        })
    }

    /// The connector for `name` (shared while its settings and files are unchanged).
    fn connector_for(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Result<Arc<Connector>, CompileError> {
        let tls = &cfg.tls;
        let files = [
            tls.ca.as_deref(),
            tls.client_cert.as_ref().map(|c| c.cert.as_str()),
            tls.client_cert.as_ref().map(|c| c.key.as_str()),
        ]
        .iter()
        .map(|f| f.and_then(|f| std::fs::read(resolve(f)).ok()))
        .collect();
        let key = ConnectorKey(
            cfg.protocol,
            cfg.tls.clone(),
            cfg.max_idle_connections,
            cfg.timeouts.keepalive.0,
            files,
        );
        let mut connectors = self.connectors.lock();
        if let Some((k, c)) = connectors.get(name) {
            if *k == key {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(client::build(cfg, resolve).map_err(|e| CompileError {
            key: e.key.iter().map(|s| s.to_string()).collect(),
            message: e.message,
        })?);
        connectors.insert(name.to_string(), (key, c.clone()));
        Ok(c)
    }

    /// Forget the state of upstreams and targets that the current snapshot (its
    /// `upstreams`) no longer uses: what is not in any live target set.
    pub fn retain(&self, current: &HashMap<String, Arc<Upstream>>) {
        let live: HashMap<&str, Vec<Arc<str>>> = current
            .iter()
            .map(|(n, u)| {
                let set = u.live.current();
                (
                    n.as_str(),
                    set.targets.iter().map(|t| t.url.clone()).collect(),
                )
            })
            .collect();
        let has = |u: &str, t: &str| live.get(u).is_some_and(|ts| ts.iter().any(|x| &**x == t));
        self.connectors
            .lock()
            .retain(|n, _| live.contains_key(n.as_str()));
        self.maps.pools.lock().retain(|(u, t), _| has(u, t));
        self.maps.health.lock().retain(|(u, t), _| has(u, t));
        self.maps
            .breakers
            .lock()
            .retain(|(u, t), _| (t.is_empty() && live.contains_key(u.as_str())) || has(u, t));
        self.transitions
            .lock()
            .retain(|n, _| live.contains_key(n.as_str()));
        self.budgets
            .lock()
            .retain(|n, _| live.contains_key(n.as_str()));
        self.adaptive
            .lock()
            .retain(|n, _| current.get(n).is_some_and(|u| u.adaptive.is_some()));
        self.recent
            .lock()
            .retain(|n, _| live.contains_key(n.as_str()));
        self.lives
            .lock()
            .retain(|n, l| current.get(n).is_some_and(|u| Arc::ptr_eq(&u.live, l)));
    }
}
