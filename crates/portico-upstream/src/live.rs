//! The live target set of an upstream: what a request picks from. It changes without
//! a reload when a discovery source reports new endpoints, and is replaced whole
//! (targets and balancer together) through one `ArcSwap`, so a request that loaded a
//! set keeps a consistent one (its target indexes stay valid) until it ends.
//!
//! A [`Live`] outlives snapshots: a reload that leaves an upstream's static targets,
//! balancing, connection settings and discovery source unchanged keeps the same one
//! (and with it what discovery found).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::Scheme;
use http::HeaderValue;
use parking_lot::Mutex;
use portico_config::discovery::Discovery;
use portico_config::model::Balance;

use crate::balance::Balancer;
use crate::breaker::{BreakerSettings, CircuitBreaker};
use crate::health::TargetHealth;
use crate::pool::{Connector, TargetPool};
use crate::Target;

/// A target as configured or discovered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub weight: u32,
    /// The `Host` header to send instead of the URL's authority (a DNS name whose
    /// addresses were discovered).
    pub host: Option<String>,
}

/// The targets a request picks from, and the balancer compiled for them.
pub struct TargetSet {
    pub targets: Vec<Target>,
    pub balancer: Balancer,
}

impl TargetSet {
    /// The number of targets that may take traffic now (not ejected, not failing
    /// active checks).
    pub fn available(&self, now: u64) -> usize {
        self.targets
            .iter()
            .filter(|t| t.health.available(now))
            .count()
    }
}

/// A breaker kept across reloads, with the settings it was built with.
type KeptBreaker = (BreakerSettings, Arc<CircuitBreaker>);

/// State shared by every upstream's targets, keyed by upstream name and target URL, so
/// that a target keeps its connections, health and breaker across reloads and target
/// set changes.
#[derive(Default)]
pub(crate) struct Maps {
    pub pools: Mutex<HashMap<(String, String), Arc<TargetPool>>>,
    pub health: Mutex<HashMap<(String, String), Arc<TargetHealth>>>,
    /// Breakers by upstream and target URL (`""` for an upstream-wide one), kept while
    /// their settings are unchanged.
    pub breakers: Mutex<HashMap<(String, String), KeptBreaker>>,
}

impl Maps {
    pub fn health(&self, name: &str, url: &str) -> Arc<TargetHealth> {
        self.health
            .lock()
            .entry((name.to_string(), url.to_string()))
            .or_default()
            .clone()
    }

    pub fn breaker(&self, name: &str, url: &str, settings: BreakerSettings) -> Arc<CircuitBreaker> {
        let mut map = self.breakers.lock();
        let key = (name.to_string(), url.to_string());
        match map.get(&key) {
            Some((s, b)) if *s == settings => b.clone(),
            _ => {
                let b = Arc::new(CircuitBreaker::new(settings));
                map.insert(key, (settings, b.clone()));
                b
            }
        }
    }

    /// The pool of a target, kept while its connector is the same.
    pub fn pool(
        &self,
        name: &str,
        url: &str,
        uri: &http::Uri,
        c: &Arc<Connector>,
    ) -> Arc<TargetPool> {
        let mut pools = self.pools.lock();
        let key = (name.to_string(), url.to_string());
        if let Some(p) = pools.get(&key) {
            if Arc::ptr_eq(p.connector(), c) {
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
        let p = TargetPool::new(scheme, authority, host, port, c.clone());
        pools.insert(key, p.clone());
        p
    }
}

/// What a target set is built from besides the endpoints.
#[derive(Clone)]
pub(crate) struct Spec {
    pub statics: Vec<Endpoint>,
    pub balance: Balance,
    pub connector: Arc<Connector>,
    /// Breaker settings when there is one breaker per target.
    pub per_target: Option<BreakerSettings>,
    pub discovery: Option<Discovery>,
}

impl PartialEq for Spec {
    fn eq(&self, o: &Spec) -> bool {
        self.statics == o.statics
            && self.balance == o.balance
            && Arc::ptr_eq(&self.connector, &o.connector)
            && self.per_target == o.per_target
            && self.discovery == o.discovery
    }
}

/// How discovery is doing, for the admin API and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// Successful updates (including ones that changed nothing).
    pub updates: AtomicU64,
    /// Failed attempts to reach the source.
    pub errors: AtomicU64,
    /// When the source last answered (ms on the [`crate::now_ms`] clock; 0: never).
    pub last_ok_ms: AtomicU64,
    /// The last error, cleared by the next success.
    pub last_error: Mutex<Option<String>>,
}

/// An upstream's live target set.
pub struct Live {
    name: Arc<str>,
    set: ArcSwap<TargetSet>,
    inner: Mutex<Inner>,
    maps: Arc<Maps>,
    pub discovery: DiscoveryStatus,
}

struct Inner {
    spec: Spec,
    /// What discovery last reported (`None`: nothing yet).
    discovered: Option<Vec<Endpoint>>,
}

impl Live {
    pub(crate) fn new(
        name: &str,
        spec: Spec,
        discovered: Option<Vec<Endpoint>>,
        maps: Arc<Maps>,
    ) -> Arc<Live> {
        let set = build(name, &spec, discovered.as_deref(), &maps);
        Arc::new(Live {
            name: name.into(),
            set: ArcSwap::from_pointee(set),
            inner: Mutex::new(Inner { spec, discovered }),
            maps,
            discovery: DiscoveryStatus::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current target set (a request keeps the one it loaded).
    #[inline]
    pub fn current(&self) -> Arc<TargetSet> {
        self.set.load_full()
    }

    /// Whether this set was built from `spec`.
    pub(crate) fn built_from(&self, spec: &Spec) -> bool {
        self.inner.lock().spec == *spec
    }

    /// Whether this set's discovery source is the one `spec` names.
    pub(crate) fn built_from_discovery(&self, spec: &Spec) -> bool {
        self.inner.lock().spec.discovery == spec.discovery
    }

    /// What discovery reported last, to seed a replacement `Live`.
    pub(crate) fn discovered(&self) -> Option<Vec<Endpoint>> {
        self.inner.lock().discovered.clone()
    }

    /// A discovery source's answer: the endpoints it knows now. Rebuilds and publishes
    /// the target set when they differ from the last answer. Returns whether it did.
    pub fn set_discovered(&self, mut endpoints: Vec<Endpoint>) -> bool {
        endpoints.sort_by(|a, b| a.url.cmp(&b.url));
        endpoints.dedup_by(|a, b| a.url == b.url);
        self.discovery.updates.fetch_add(1, Ordering::Relaxed);
        self.discovery
            .last_ok_ms
            .store(crate::now_ms(), Ordering::Relaxed);
        *self.discovery.last_error.lock() = None;
        let mut inner = self.inner.lock();
        if inner.discovered.as_ref() == Some(&endpoints) {
            return false;
        }
        let before: HashSet<String> = inner
            .discovered
            .iter()
            .flatten()
            .map(|e| e.url.clone())
            .collect();
        let added = endpoints
            .iter()
            .filter(|e| !before.contains(&e.url))
            .count();
        let removed = before.len() + added - endpoints.len();
        let set = build(&self.name, &inner.spec, Some(&endpoints), &self.maps);
        tracing::info!(upstream = %self.name, targets = set.targets.len(), added, removed, "discovered targets changed");
        inner.discovered = Some(endpoints);
        // Targets gone for good take their connections and health with them.
        let keep: HashSet<&str> = set.targets.iter().map(|t| &*t.url).collect();
        let gone = |(u, t): &(String, String)| *u == *self.name && !keep.contains(t.as_str());
        self.maps.pools.lock().retain(|k, _| !gone(k));
        self.maps.health.lock().retain(|k, _| !gone(k));
        self.maps
            .breakers
            .lock()
            .retain(|k, _| k.1.is_empty() || !gone(k));
        self.set.store(Arc::new(set));
        true
    }

    /// A discovery source could not be reached: the last known targets stay in use.
    pub fn discovery_failed(&self, error: &str) {
        self.discovery.errors.fetch_add(1, Ordering::Relaxed);
        *self.discovery.last_error.lock() = Some(error.to_string());
    }
}

/// Build the target set of `spec` plus what discovery found (static targets first; a
/// discovered URL equal to a static one is not added twice).
fn build(name: &str, spec: &Spec, discovered: Option<&[Endpoint]>, maps: &Maps) -> TargetSet {
    let mut targets = Vec::new();
    let mut seen = HashSet::new();
    for e in spec.statics.iter().chain(discovered.into_iter().flatten()) {
        if !seen.insert(e.url.as_str()) {
            continue;
        }
        match target(name, e, spec, maps) {
            Ok(t) => targets.push(t),
            Err(m) => {
                tracing::warn!(upstream = %name, target = %e.url, "ignoring a discovered target: {m}")
            }
        }
    }
    let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
    let names: Vec<&str> = targets.iter().map(|t| &*t.url).collect();
    let balancer = Balancer::new(spec.balance, &weights, &names);
    TargetSet { targets, balancer }
}

/// One target: its URL parsed, its pool, health and breaker found or made.
pub(crate) fn target(name: &str, e: &Endpoint, spec: &Spec, maps: &Maps) -> Result<Target, String> {
    let uri = portico_config::load::check_target_url(&e.url)?;
    let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{}` has no host", e.url))?;
    let host_header = match &e.host {
        Some(h) => HeaderValue::from_str(h),
        None => HeaderValue::from_str(authority.as_str()),
    }
    .map_err(|_| format!("`{}` is not a valid host", e.url))?;
    Ok(Target {
        pool: maps.pool(name, &e.url, &uri, &spec.connector),
        url: e.url.as_str().into(),
        scheme,
        authority,
        host_header,
        weight: e.weight,
        health: maps.health(name, &e.url),
        breaker: spec.per_target.map(|s| maps.breaker(name, &e.url, s)),
    })
}
