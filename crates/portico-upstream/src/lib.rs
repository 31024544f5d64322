//! Portico's upstreams.
//!
//! Owns: compiled upstreams (the live target set with its balancing algorithm,
//! timeouts, breakers, retries), health (passive and active), service discovery, and
//! pooled HTTP/1.1 + HTTP/2 clients (plain and TLS). The state that must outlive a
//! configuration snapshot (clients and connection pools, target health, breakers, live
//! target sets) lives in [`UpstreamState`], keyed by upstream name and target URL.
//! Compiling a snapshot only stages what it would add to that state ([`Staged`]); the
//! state changes when the snapshot is published ([`UpstreamState::commit`]), so a
//! rejected one leaves the serving state exactly as it was.
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
pub use pool::{Connector, Failed, SendError, TargetPool, Terms};

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
        // The cap's check and the ejection are one step: decisions of the upstream's
        // target set are taken one at a time (only when a streak reaches its threshold,
        // never on the way of an ordinary request), and the ejected targets are counted
        // under the gate from their ejection times, so expiry needs no bookkeeping.
        let may_eject = || {
            let gate = self.live.eject_gate();
            let cap = (set.targets.len() * p.max_ejected_percent as usize / 100).max(1);
            (set.targets.iter().filter(|t| t.health.ejected(now)).count() < cap).then_some(gate)
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
///
/// [`UpstreamState::compile`] reads it but changes nothing: what it makes anew goes into
/// a [`Staged`], which [`UpstreamState::commit`] adds when the snapshot is published.
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

/// What compiling a snapshot's upstreams made anew (connectors, target sets with their
/// pools, health and breakers, retry budgets, adaptive limits, ...) because the
/// [`UpstreamState`] had nothing that fit. Nothing of it is shared until
/// [`UpstreamState::commit`], when the snapshot is published; dropping it (a rejected
/// snapshot, `portico validate`) leaves the state as it was.
#[must_use = "commit it when the snapshot is published"]
#[derive(Default)]
pub struct Staged {
    connectors: HashMap<String, (ConnectorKey, Arc<Connector>)>,
    targets: live::StagedMaps,
    transitions: HashMap<String, Arc<TransitionCounts>>,
    budgets: HashMap<String, (BudgetSettings, Arc<RetryBudget>)>,
    lives: HashMap<String, Arc<Live>>,
    adaptive: HashMap<String, Arc<adaptive::AdaptiveLimit>>,
    recent: HashMap<String, Arc<adaptive::RecentLatency>>,
}

/// A problem compiling an upstream, with the config keys below `upstreams.NAME` it concerns.
#[derive(Debug)]
pub struct CompileError {
    pub key: Vec<String>,
    pub message: String,
}

impl UpstreamState {
    /// Compile an upstream, reusing its client, target health and live target set
    /// when unchanged. What it makes anew goes into `staged`, not into this state.
    pub fn compile(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
        staged: &mut Staged,
    ) -> Result<Upstream, CompileError> {
        if let Some(source) = cfg.discovery.as_ref().and_then(discovery::unavailable) {
            return Err(CompileError {
                key: vec!["discovery".into(), source.into()],
                message: format!("discovery source `{source}` is not available in this build yet"),
            });
        }
        let connector = self.connector_for(name, cfg, resolve, &mut staged.connectors)?;
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
        let mut objects = live::Objects {
            maps: &self.maps,
            staged: Some(&mut staged.targets),
        };
        // Static targets are checked here so that a bad one is a compile error with
        // its key (a discovered one is only skipped).
        for (i, e) in spec.statics.iter().enumerate() {
            live::target(name, e, &spec, &mut objects).map_err(|m| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: m,
            })?;
        }
        let old = self.lives.lock().get(name).cloned();
        let live = match old {
            Some(l) if l.built_from(&spec) => l,
            old => {
                // Same source: what it found stays until it reports again (publishing
                // carries over what it found meanwhile).
                let seed = old
                    .filter(|o| o.built_from_discovery(&spec))
                    .and_then(|o| o.discovered());
                let l = Live::new(name, spec, seed, self.maps.clone(), &mut objects);
                staged.lives.insert(name.to_string(), l.clone());
                l
            }
        };
        let circuit = match &cfg.circuit_breaker {
            Some(cb) => Some(self.circuit_for(name, cb, &mut objects, &mut staged.transitions)?),
            None => None,
        };
        let budget_settings = cfg
            .retries
            .as_ref()
            .map(|r| BudgetSettings::from(&r.budget))
            .unwrap_or_default();
        let budget = live::find_or_make(
            &self.budgets,
            Some(&mut staged.budgets),
            name.to_string(),
            |(s, _)| *s == budget_settings,
            || (budget_settings, Arc::new(RetryBudget::new(budget_settings))),
        )
        .1;
        let adaptive = cfg.adaptive_concurrency.map(|s| {
            live::find_or_make(
                &self.adaptive,
                Some(&mut staged.adaptive),
                name.to_string(),
                |a| *a.settings() == s,
                || Arc::new(adaptive::AdaptiveLimit::new(s, now_ms())),
            )
        });
        let recent = live::find_or_make(
            &self.recent,
            Some(&mut staged.recent),
            name.to_string(),
            |_| true,
            Default::default,
        );
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
        objects: &mut live::Objects<'_>,
        transitions: &mut HashMap<String, Arc<TransitionCounts>>,
    ) -> Result<Circuit, CompileError> {
        let settings = BreakerSettings::from(cfg);
        let upstream_wide = (!cfg.per_target).then(|| objects.breaker(name, "", settings));
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
        let transitions = live::find_or_make(
            &self.transitions,
            Some(transitions),
            name.to_string(),
            |_| true,
            Default::default,
        );
        Ok(Circuit {
            per_target: cfg.per_target,
            upstream_wide,
            fallback,
            transitions,
        })
    }

    /// The connector for `name` (shared while its settings and files are unchanged; a
    /// new one is staged).
    fn connector_for(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
        staged: &mut HashMap<String, (ConnectorKey, Arc<Connector>)>,
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
        let kept = |m: &HashMap<String, (ConnectorKey, Arc<Connector>)>| {
            m.get(name)
                .filter(|(k, _)| *k == key)
                .map(|(_, c)| c.clone())
        };
        if let Some(c) = kept(staged).or_else(|| kept(&self.connectors.lock())) {
            return Ok(c);
        }
        let c = Arc::new(client::build(cfg, resolve).map_err(|e| CompileError {
            key: e.key.iter().map(|s| s.to_string()).collect(),
            message: e.message,
        })?);
        staged.insert(name.to_string(), (key, c.clone()));
        Ok(c)
    }

    /// The snapshot compiled with `staged` is being published (call it just before the
    /// snapshot is, when nothing can reject it any more): what it made becomes shared
    /// state. A target set it replaces hands over to the new one (what discovery found
    /// meanwhile carries over; its task's later answers go to the new set) and is no
    /// longer updated.
    pub fn commit(&self, staged: Staged) {
        let _updating = self.maps.updates.lock();
        self.maps.adopt(staged.targets);
        self.connectors.lock().extend(staged.connectors);
        self.transitions.lock().extend(staged.transitions);
        self.budgets.lock().extend(staged.budgets);
        self.adaptive.lock().extend(staged.adaptive);
        self.recent.lock().extend(staged.recent);
        let mut lives = self.lives.lock();
        for (name, l) in staged.lives {
            live::publish(&l, lives.get(&name).map(|o| &**o));
            lives.insert(name, l);
        }
    }

    /// Forget the state of upstreams and targets that the current snapshot (its
    /// `upstreams`) no longer uses: what is not in any live target set. Target sets
    /// dropped are retired (their discovery task's last answers are ignored).
    pub fn retain(&self, current: &HashMap<String, Arc<Upstream>>) {
        let _updating = self.maps.updates.lock();
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
        self.lives.lock().retain(|n, l| {
            let used = current.get(n).is_some_and(|u| Arc::ptr_eq(&u.live, l));
            if !used {
                l.retire();
            }
            used
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> UpstreamConfig {
        serde_json::from_value(v).unwrap()
    }

    fn resolve(p: &str) -> std::path::PathBuf {
        p.into()
    }

    /// Compile `cfg` as upstream `u` and publish it (as a reload does).
    fn publish(state: &UpstreamState, cfg: &UpstreamConfig) -> Arc<Upstream> {
        let mut staged = Staged::default();
        let u = Arc::new(state.compile("u", cfg, &resolve, &mut staged).unwrap());
        state.commit(staged);
        state.retain(&HashMap::from([("u".to_string(), u.clone())]));
        u
    }

    /// Compile `cfg` as upstream `u` and drop it (a rejected reload, `validate`).
    fn reject(state: &UpstreamState, cfg: &UpstreamConfig) -> Upstream {
        let mut staged = Staged::default();
        state.compile("u", cfg, &resolve, &mut staged).unwrap()
    }

    fn endpoint(url: &str) -> Endpoint {
        Endpoint {
            url: url.into(),
            weight: 1,
            host: None,
        }
    }

    fn urls(u: &Upstream) -> Vec<String> {
        u.live
            .current()
            .targets
            .iter()
            .map(|t| t.url.to_string())
            .collect()
    }

    #[test]
    fn a_rejected_compile_leaves_the_state_to_the_next_one() {
        let state = UpstreamState::default();
        let base = config(json!({
            "targets": [{"url": "http://127.0.0.1:1"}],
            "circuit_breaker": {"consecutive_failures": 1},
            "retries": {"attempts": 1},
            "adaptive_concurrency": {},
        }));
        let first = publish(&state, &base);
        let now = now_ms();
        let breaker = first
            .circuit
            .as_ref()
            .unwrap()
            .upstream_wide
            .clone()
            .unwrap();
        assert!(breaker.try_acquire(now).unwrap().failure(now).is_some());
        assert_eq!(breaker.state(now), State::Open);

        // Every setting that makes new state changes, and the compile is dropped.
        let changed = config(json!({
            "targets": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2"}],
            "balance": "least_connections",
            "max_idle_connections": 3,
            "circuit_breaker": {"consecutive_failures": 2},
            "retries": {"attempts": 1, "budget": {"min_per_second": 50}},
            "adaptive_concurrency": {"initial_limit": 7},
        }));
        let rejected = reject(&state, &changed);
        assert!(!Arc::ptr_eq(&rejected.live, &first.live));

        // The next reload, as first configured, finds what the first one made.
        let again = publish(&state, &base);
        assert!(Arc::ptr_eq(&again.live, &first.live), "live set replaced");
        let c = again.circuit.as_ref().unwrap();
        assert!(Arc::ptr_eq(c.upstream_wide.as_ref().unwrap(), &breaker));
        assert_eq!(breaker.state(now_ms()), State::Open);
        let c1 = first.circuit.as_ref().unwrap();
        assert!(Arc::ptr_eq(&c.transitions, &c1.transitions));
        assert!(Arc::ptr_eq(&again.budget, &first.budget), "budget replaced");
        assert!(Arc::ptr_eq(
            again.adaptive.as_ref().unwrap(),
            first.adaptive.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&again.recent, &first.recent));
        let (t1, t2) = (
            &first.live.current().targets[0],
            &again.live.current().targets[0],
        );
        assert!(Arc::ptr_eq(&t1.pool, &t2.pool), "pool replaced");
        assert!(Arc::ptr_eq(&t1.health, &t2.health));
        // The target only the rejected config had left nothing behind.
        let key = ("u".to_string(), "http://127.0.0.1:2".to_string());
        assert!(!state.maps.health.lock().contains_key(&key));
        assert!(!state.maps.pools.lock().contains_key(&key));
    }

    #[test]
    fn a_published_compile_replaces_what_changed_and_keeps_the_rest() {
        let state = UpstreamState::default();
        let base = config(json!({
            "targets": [{"url": "http://127.0.0.1:1"}],
            "circuit_breaker": {"consecutive_failures": 1},
        }));
        let first = publish(&state, &base);
        let changed = config(json!({
            "targets": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2"}],
            "circuit_breaker": {"consecutive_failures": 2},
        }));
        let second = publish(&state, &changed);
        assert!(!Arc::ptr_eq(&second.live, &first.live));
        let (b1, b2) = (
            first
                .circuit
                .as_ref()
                .unwrap()
                .upstream_wide
                .as_ref()
                .unwrap(),
            second
                .circuit
                .as_ref()
                .unwrap()
                .upstream_wide
                .as_ref()
                .unwrap(),
        );
        assert!(!Arc::ptr_eq(b1, b2), "new breaker settings, new breaker");
        let (t1, t2) = (
            &first.live.current().targets[0],
            &second.live.current().targets[0],
        );
        assert!(Arc::ptr_eq(&t1.health, &t2.health), "health kept");
        assert!(Arc::ptr_eq(&t1.pool, &t2.pool), "pool kept");
        // The published set uses what the maps keep.
        for t in &second.live.current().targets {
            let key = ("u".to_string(), t.url.to_string());
            assert!(Arc::ptr_eq(&state.maps.health.lock()[&key], &t.health));
            assert!(Arc::ptr_eq(&state.maps.pools.lock()[&key], &t.pool));
        }
        // And the next unchanged compile reuses all of it.
        let third = publish(&state, &changed);
        assert!(Arc::ptr_eq(&third.live, &second.live));
    }

    #[test]
    fn discovery_answers_while_a_replacement_compiles_are_not_lost() {
        let state = UpstreamState::default();
        let discovery = json!({"registry": {"service": "s"}});
        let first = publish(&state, &config(json!({"discovery": discovery})));
        first
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:1")]);

        // A reload changing the balancing compiles, seeded with what discovery had
        // found; discovery answers again before it is published.
        let changed = config(json!({"discovery": discovery, "balance": "least_connections"}));
        let mut staged = Staged::default();
        let second = Arc::new(state.compile("u", &changed, &resolve, &mut staged).unwrap());
        assert_eq!(urls(&second), ["http://127.0.0.1:1"]);
        assert!(first
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:2")]));
        state.commit(staged);
        assert_eq!(urls(&second), ["http://127.0.0.1:2"], "the answer was lost");

        // The old set's task answers once more before it is stopped: the answer goes
        // to the published set.
        assert!(first
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:3")]));
        assert_eq!(urls(&second), ["http://127.0.0.1:3"]);
        assert_eq!(urls(&first), ["http://127.0.0.1:2"]);
        state.retain(&HashMap::from([("u".to_string(), second.clone())]));
        let key = ("u".to_string(), "http://127.0.0.1:3".to_string());
        let health = state.maps.health.lock().get(&key).cloned().unwrap();
        assert!(Arc::ptr_eq(
            &health,
            &second.live.current().targets[0].health
        ));
    }

    #[test]
    fn a_replaced_set_with_another_source_no_longer_changes_anything() {
        let state = UpstreamState::default();
        let discovery = json!({"registry": {"service": "s"}});
        let first = publish(&state, &config(json!({"discovery": discovery})));
        first
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:1")]);
        let statics = config(json!({"targets": [{"url": "http://127.0.0.1:9"}]}));
        let second = publish(&state, &statics);
        // A late answer of the old set's task neither changes the published set nor
        // prunes the state of its targets.
        assert!(!first
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:2")]));
        assert_eq!(urls(&second), ["http://127.0.0.1:9"]);
        let key = ("u".to_string(), "http://127.0.0.1:9".to_string());
        assert!(state.maps.health.lock().contains_key(&key));
        assert!(state.maps.pools.lock().contains_key(&key));
        // Nor does one of a set whose upstream is gone.
        let third = publish(&state, &config(json!({"discovery": discovery})));
        third
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:4")]);
        state.retain(&HashMap::new());
        assert!(!third
            .live
            .set_discovered(vec![endpoint("http://127.0.0.1:5")]));
        assert!(state.maps.health.lock().is_empty());
        assert!(state.maps.pools.lock().is_empty());
    }

    #[tokio::test]
    async fn turning_active_checks_off_clears_their_verdict_once_published() {
        let state = UpstreamState::default();
        let sup = supervise::Supervisor::default();
        let ctx = discovery::SourceCtx::default();
        let checked = config(json!({
            "targets": [{"url": "http://127.0.0.1:1"}],
            "health": {"active": {"path": "/health", "interval": "1h"}},
        }));
        let first = publish(&state, &checked);
        sup.sync(&HashMap::from([("u".to_string(), first.clone())]), &ctx);
        let health = first.live.current().targets[0].health.clone();
        assert_eq!(health.checked(false, 1, 1), Some(false));

        // Compiled without checks but not published: the verdict stands.
        let unchecked = config(json!({"targets": [{"url": "http://127.0.0.1:1"}]}));
        reject(&state, &unchecked);
        assert!(health.active_down());

        // Published: the checker stops and its verdict goes.
        let second = publish(&state, &unchecked);
        sup.sync(&HashMap::from([("u".to_string(), second)]), &ctx);
        assert!(!health.active_down());
        sup.stop();
    }

    #[test]
    fn a_stopped_task_acts_no_more() {
        let stop = supervise::Stop::default();
        assert_eq!(stop.unless_stopped(|| 1), Some(1));
        stop.stop();
        assert_eq!(stop.unless_stopped(|| 1), None);
    }

    /// An upstream of `n` targets (nothing listens) whose every connect failure ejects
    /// its target for an hour, at most `percent` of them at once.
    fn ejecting(n: usize, percent: u32) -> Arc<Upstream> {
        let targets: Vec<_> = (0..n)
            .map(|i| json!({"url": format!("http://127.0.0.1:{}", 1 + i)}))
            .collect();
        let cfg = config(json!({
            "targets": targets,
            "health": {"passive": {
                "consecutive_failures": 1,
                "ejection_time": "1h",
                "max_ejection_time": "1h",
                "max_ejected_percent": percent,
            }},
        }));
        publish(&UpstreamState::default(), &cfg)
    }

    fn ejected_now(set: &TargetSet) -> usize {
        let now = now_ms();
        set.targets.iter().filter(|t| t.health.ejected(now)).count()
    }

    #[test]
    fn concurrent_failures_never_eject_more_than_the_cap() {
        // 10 targets at 20 %: at most 2 ejected, however many threads fail at once.
        const THREADS: usize = 4;
        for round in 0..200 {
            let u = ejecting(10, 20);
            let set = u.live.current();
            let start = std::sync::Barrier::new(THREADS);
            let peak = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for k in 0..THREADS {
                    let (u, set, start, peak) = (&u, &set, &start, &peak);
                    s.spawn(move || {
                        start.wait();
                        for j in 0..set.targets.len() {
                            // Each thread starts on other targets.
                            let i = (j + k * 3) % set.targets.len();
                            u.connect_failed(set, i);
                            peak.fetch_max(ejected_now(set), std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            });
            let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
            assert!(peak <= 2, "round {round}: {peak} of 10 ejected at once");
            // Every target failed: the cap is reached, not undershot.
            assert_eq!(ejected_now(&set), 2, "round {round}");
            let ejections: u64 = set.targets.iter().map(|t| t.health.ejections()).sum();
            assert_eq!(ejections, 2, "round {round}: one ejection per target");
        }
    }

    #[test]
    fn one_target_may_always_be_ejected() {
        // 1 % of 3 rounds down to none: one is ejected all the same, not two.
        let u = ejecting(3, 1);
        let set = u.live.current();
        for i in 0..3 {
            u.connect_failed(&set, i);
        }
        assert_eq!(ejected_now(&set), 1);
        assert!(set.targets[0].health.ejected(now_ms()));
    }
}
