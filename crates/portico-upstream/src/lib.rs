//! Portico's upstreams.
//!
//! Owns: compiled upstreams (targets, balancing algorithm, timeouts), passive health,
//! and pooled HTTP/1.1 + HTTP/2 clients (plain and TLS). The state that must outlive a
//! configuration snapshot (clients and connection pools, target health) lives in
//! [`UpstreamState`], keyed by upstream name and target URL.
//!
//! Does not own: sending a request through the pipeline (`portico-proxy`) or active
//! health checks and discovery (planned, see docs/design.md).
#![forbid(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod client;
pub mod h1;
pub mod health;
pub mod overlay;
pub mod pool;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use parking_lot::Mutex;
use portico_config::grammar::KeySpec;
use portico_config::model::{Passive, Protocol, Timeouts, Upstream as UpstreamConfig, UpstreamTls};
use tokio::time::Instant;

pub use balance::{Balancer, Schedule};
pub use breaker::{BreakerSettings, CircuitBreaker, Permit, Rejected, State, Transition};
pub use budget::{BudgetSettings, RetriesConfig, RetryBudget, RetryOn};
pub use client::{ClientError, ConnectTimeout};
pub use health::{ms_at, now_ms, TargetHealth};
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
}

/// A compiled upstream, part of a snapshot.
pub struct Upstream {
    pub name: Arc<str>,
    pub targets: Vec<Target>,
    pub balancer: Balancer,
    /// The request key hashed by `consistent_hash`.
    pub hash_key: Option<KeySpec>,
    pub timeouts: Timeouts,
    pub passive: Passive,
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
    /// One breaker per target (`per_target: true`) or one for the upstream.
    pub per_target: bool,
    /// One breaker, or one per target (in target order).
    pub breakers: Vec<Arc<CircuitBreaker>>,
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
    /// The breaker that governs target `i`.
    pub fn breaker(&self, i: usize) -> Option<&CircuitBreaker> {
        let at = if self.per_target { i } else { 0 };
        self.breakers.get(at).map(|b| &**b)
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
    /// Pick the next available target, skipping `exclude` (already tried) and ejected
    /// ones. `key` is the request's [`Upstream::key_hash`] (`consistent_hash`).
    pub fn pick(&self, exclude: &[usize], key: Option<u64>) -> Option<usize> {
        let now = now_ms();
        self.balancer.pick(&self.targets, key, |i| {
            !exclude.contains(&i) && self.targets[i].health.available(now)
        })
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
    pub fn answered(&self, i: usize, sent: Instant, status: StatusCode) {
        if !self.balancer.uses_latency() {
            return;
        }
        if let Some(t) = self.targets.get(i) {
            let now = Instant::now();
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
    pub fn failed(&self, i: usize, sent: Instant) {
        if !self.balancer.uses_latency() {
            return;
        }
        if let Some(t) = self.targets.get(i) {
            let now = Instant::now();
            t.health
                .observe_failure(now.saturating_duration_since(sent), ms_at(now));
        }
    }

    /// Record a connect failure on target `i` (passive health).
    pub fn connect_failed(&self, i: usize) {
        let p = &self.passive;
        if !p.enabled {
            return;
        }
        if self.targets[i].health.failure(
            now_ms(),
            p.consecutive_failures,
            p.ejection_time.0.as_millis() as u64,
        ) {
            tracing::warn!(upstream = %self.name, target = %self.targets[i].url, ejection = %p.ejection_time, "target ejected after consecutive connect failures");
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
struct ConnectorKey(Protocol, UpstreamTls, usize, Vec<Option<Vec<u8>>>);

/// A breaker kept across reloads, with the settings it was built with.
type KeptBreaker = (BreakerSettings, Arc<CircuitBreaker>);

/// State that outlives snapshots: connectors, connection pools and target health.
#[derive(Default)]
pub struct UpstreamState {
    connectors: Mutex<HashMap<String, (ConnectorKey, Arc<Connector>)>>,
    pools: Mutex<HashMap<(String, String), Arc<TargetPool>>>,
    health: Mutex<HashMap<(String, String), Arc<TargetHealth>>>,
    /// Breakers by upstream and target URL (`""` for an upstream-wide one), kept while
    /// their settings are unchanged.
    breakers: Mutex<HashMap<(String, String), KeptBreaker>>,
    transitions: Mutex<HashMap<String, Arc<TransitionCounts>>>,
    budgets: Mutex<HashMap<String, (BudgetSettings, Arc<RetryBudget>)>>,
}

/// A problem compiling an upstream, with the config keys below `upstreams.NAME` it concerns.
#[derive(Debug)]
pub struct CompileError {
    pub key: Vec<String>,
    pub message: String,
}

impl UpstreamState {
    /// Compile an upstream, reusing its client and target health when unchanged.
    pub fn compile(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Result<Upstream, CompileError> {
        let connector = self.connector_for(name, cfg, resolve)?;
        let mut targets = Vec::with_capacity(cfg.targets.len());
        for (i, t) in cfg.targets.iter().enumerate() {
            let uri = portico_config::load::check_target_url(&t.url).map_err(|m| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: m,
            })?;
            let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            let authority = uri.authority().cloned().ok_or_else(|| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: format!("`{}` has no host", t.url),
            })?;
            let host_header =
                HeaderValue::from_str(authority.as_str()).map_err(|_| CompileError {
                    key: vec!["targets".into(), i.to_string(), "url".into()],
                    message: format!("`{}` is not a valid host", t.url),
                })?;
            let health = self
                .health
                .lock()
                .entry((name.to_string(), t.url.clone()))
                .or_default()
                .clone();
            let pool = self.pool_for(name, &t.url, &uri, &connector);
            targets.push(Target {
                pool,
                url: t.url.as_str().into(),
                scheme,
                authority,
                host_header,
                weight: t.weight,
                health,
            });
        }
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let names: Vec<&str> = targets.iter().map(|t| &*t.url).collect();
        let balancer = Balancer::new(cfg.balance, &weights, &names);
        let circuit = match &cfg.circuit_breaker {
            Some(cb) => Some(self.circuit_for(name, cb, &names)?),
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
        Ok(Upstream {
            name: name.into(),
            hash_key: cfg.hash_key.clone(),
            targets,
            balancer,
            timeouts: cfg.timeouts,
            passive: cfg.health.passive,
            circuit,
            retries: cfg.retries.clone(),
            budget,
        })
    }

    /// The breakers of an upstream, reusing the existing ones while their settings are
    /// unchanged (a reload keeps an open breaker open).
    fn circuit_for(
        &self,
        name: &str,
        cfg: &breaker::CircuitBreakerConfig,
        targets: &[&str],
    ) -> Result<Circuit, CompileError> {
        let settings = BreakerSettings::from(cfg);
        let keys: Vec<&str> = if cfg.per_target {
            targets.to_vec()
        } else {
            vec![""]
        };
        let mut map = self.breakers.lock();
        let breakers = keys
            .iter()
            .map(|t| {
                let key = (name.to_string(), t.to_string());
                match map.get(&key) {
                    Some((s, b)) if *s == settings => b.clone(),
                    _ => {
                        let b = Arc::new(CircuitBreaker::new(settings));
                        map.insert(key, (settings, b.clone()));
                        b
                    }
                }
            })
            .collect();
        drop(map);
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
            breakers,
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

    /// The pool of a target, kept while its connector is the same.
    fn pool_for(
        &self,
        name: &str,
        url: &str,
        uri: &http::Uri,
        connector: &Arc<Connector>,
    ) -> Arc<TargetPool> {
        let mut pools = self.pools.lock();
        let key = (name.to_string(), url.to_string());
        if let Some(p) = pools.get(&key) {
            if Arc::ptr_eq(p.connector(), connector) {
                return p.clone();
            }
        }
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
        let authority = uri
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let p = TargetPool::new(scheme, authority, host, port, connector.clone());
        pools.insert(key, p.clone());
        p
    }

    /// Forget state of upstreams and targets that are no longer configured.
    pub fn retain(&self, live: &[(String, Vec<String>)]) {
        self.connectors
            .lock()
            .retain(|n, _| live.iter().any(|(u, _)| u == n));
        self.pools.lock().retain(|(u, t), _| {
            live.iter()
                .any(|(lu, ts)| lu == u && ts.iter().any(|x| x == t))
        });
        self.health.lock().retain(|(u, t), _| {
            live.iter()
                .any(|(lu, ts)| lu == u && ts.iter().any(|x| x == t))
        });
        self.breakers.lock().retain(|(u, t), _| {
            live.iter()
                .any(|(lu, ts)| lu == u && (t.is_empty() || ts.iter().any(|x| x == t)))
        });
        self.transitions
            .lock()
            .retain(|n, _| live.iter().any(|(u, _)| u == n));
        self.budgets
            .lock()
            .retain(|n, _| live.iter().any(|(u, _)| u == n));
    }
}
