//! The live target set of an upstream: what a request picks from. It changes without
//! a reload when a discovery source reports new endpoints, and is replaced whole
//! (targets and balancer together) through one `ArcSwap`, so a request that loaded a
//! set keeps a consistent one (its target indexes stay valid) until it ends.
//!
//! A [`Live`] outlives snapshots: a reload that leaves an upstream's static targets,
//! balancing, connection settings and discovery source unchanged keeps the same one
//! (and with it what discovery found).
//!
//! Compiling a snapshot changes none of this state: a new `Live`, and the pools,
//! health and breakers made for it, are staged ([`StagedMaps`]) and only become shared
//! when the snapshot is published ([`publish`]); a rejected snapshot leaves nothing
//! behind. From then on, a `Live` the published snapshot replaced passes what its
//! discovery task still reports to its replacement (or drops it), so that an answer
//! given during a reload is neither lost nor applied to a set no longer served.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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

/// Upstream name and target URL.
type TargetKey = (String, String);

/// State shared by every upstream's targets, keyed by upstream name and target URL, so
/// that a target keeps its connections, health and breaker across reloads and target
/// set changes.
#[derive(Default)]
pub(crate) struct Maps {
    pub pools: Mutex<HashMap<TargetKey, Arc<TargetPool>>>,
    pub health: Mutex<HashMap<TargetKey, Arc<TargetHealth>>>,
    /// Breakers by upstream and target URL (`""` for an upstream-wide one), kept while
    /// their settings are unchanged.
    pub breakers: Mutex<HashMap<TargetKey, KeptBreaker>>,
    /// Held while a published target set is rebuilt (a discovery answer), while a
    /// snapshot's staged state is published, and while unused state is pruned: so that
    /// pruning never drops what a set just built uses, and a discovery answer is applied
    /// either before a `Live` is replaced (and carried over) or after (and passed on).
    pub updates: Mutex<()>,
}

impl Maps {
    /// Make what a published snapshot staged shared: each object unless the maps
    /// meanwhile got one that fits as well (a discovery answer of the same target).
    /// Called with [`Maps::updates`] held.
    pub fn adopt(&self, staged: StagedMaps) {
        let mut health = self.health.lock();
        for (k, h) in staged.health {
            health.entry(k).or_insert(h);
        }
        drop(health);
        let mut pools = self.pools.lock();
        for (k, p) in staged.pools {
            if !pools
                .get(&k)
                .is_some_and(|q| Arc::ptr_eq(q.connector(), p.connector()))
            {
                pools.insert(k, p);
            }
        }
        drop(pools);
        let mut breakers = self.breakers.lock();
        for (k, b) in staged.breakers {
            if !breakers.get(&k).is_some_and(|(s, _)| *s == b.0) {
                breakers.insert(k, b);
            }
        }
    }
}

/// Pools, health and breakers a snapshot being compiled made because the shared
/// [`Maps`] had none that fit (a new target, new connection or breaker settings). They
/// become shared when the snapshot is published ([`Maps::adopt`]); a rejected snapshot
/// drops them.
#[derive(Default)]
pub(crate) struct StagedMaps {
    pools: HashMap<TargetKey, Arc<TargetPool>>,
    health: HashMap<TargetKey, Arc<TargetHealth>>,
    breakers: HashMap<TargetKey, KeptBreaker>,
}

/// The value for `key` that `fits`: with `staged` (a snapshot being compiled), the one
/// it already staged, else the shared one, else a new one from `make`, which is staged
/// and leaves `shared` as it is; without (a published set), the shared one, else a new
/// one, which `shared` keeps.
pub(crate) fn find_or_make<K: Hash + Eq, V: Clone>(
    shared: &Mutex<HashMap<K, V>>,
    staged: Option<&mut HashMap<K, V>>,
    key: K,
    fits: impl Fn(&V) -> bool,
    make: impl FnOnce() -> V,
) -> V {
    let Some(staged) = staged else {
        let mut map = shared.lock();
        return match map.get(&key) {
            Some(v) if fits(v) => v.clone(),
            _ => {
                let v = make();
                map.insert(key, v.clone());
                v
            }
        };
    };
    if let Some(v) = staged.get(&key).filter(|v| fits(v)) {
        return v.clone();
    }
    if let Some(v) = shared.lock().get(&key).filter(|v| fits(v)) {
        return v.clone();
    }
    let v = make();
    staged.insert(key, v.clone());
    v
}

/// Where the pools, health and breakers of targets come from: the shared maps, and
/// while a snapshot compiles, what it staged.
pub(crate) struct Objects<'a> {
    pub maps: &'a Maps,
    pub staged: Option<&'a mut StagedMaps>,
}

impl<'a> Objects<'a> {
    /// For a published set: straight from (and into) the shared maps.
    pub fn shared(maps: &'a Maps) -> Objects<'a> {
        Objects { maps, staged: None }
    }

    pub fn health(&mut self, name: &str, url: &str) -> Arc<TargetHealth> {
        find_or_make(
            &self.maps.health,
            self.staged.as_deref_mut().map(|s| &mut s.health),
            (name.to_string(), url.to_string()),
            |_| true,
            Default::default,
        )
    }

    pub fn breaker(
        &mut self,
        name: &str,
        url: &str,
        settings: BreakerSettings,
    ) -> Arc<CircuitBreaker> {
        find_or_make(
            &self.maps.breakers,
            self.staged.as_deref_mut().map(|s| &mut s.breakers),
            (name.to_string(), url.to_string()),
            |(s, _)| *s == settings,
            || (settings, Arc::new(CircuitBreaker::new(settings))),
        )
        .1
    }

    /// The pool of a target, kept while its connector is the same.
    pub fn pool(
        &mut self,
        name: &str,
        url: &str,
        uri: &http::Uri,
        c: &Arc<Connector>,
    ) -> Arc<TargetPool> {
        find_or_make(
            &self.maps.pools,
            self.staged.as_deref_mut().map(|s| &mut s.pools),
            (name.to_string(), url.to_string()),
            |p| Arc::ptr_eq(p.connector(), c),
            || {
                let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
                let host = uri.host().unwrap_or_default().to_string();
                let port = uri
                    .port_u16()
                    .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
                let authority = uri
                    .authority()
                    .cloned()
                    .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
                TargetPool::new(scheme, authority, host, port, c.clone())
            },
        )
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
    /// Held while passive health decides whether one of this upstream's targets is
    /// ejected (`max_ejected_percent`): the count and the ejection are one step.
    eject_gate: Mutex<()>,
}

struct Inner {
    spec: Spec,
    /// What discovery last reported (`None`: nothing yet).
    discovered: Option<Vec<Endpoint>>,
    /// Set once the published snapshot no longer uses this set: what its discovery
    /// task still reports (until it is stopped) goes to the set that replaced it with
    /// the same source, or nowhere (a dangling `Weak`).
    retired: Option<Weak<Live>>,
}

impl Live {
    /// A new set, built from `objects` (staged while a snapshot compiles).
    pub(crate) fn new(
        name: &str,
        spec: Spec,
        discovered: Option<Vec<Endpoint>>,
        maps: Arc<Maps>,
        objects: &mut Objects<'_>,
    ) -> Arc<Live> {
        let set = build(name, &spec, discovered.as_deref(), objects);
        Arc::new(Live {
            name: name.into(),
            set: ArcSwap::from_pointee(set),
            inner: Mutex::new(Inner {
                spec,
                discovered,
                retired: None,
            }),
            maps,
            discovery: DiscoveryStatus::default(),
            eject_gate: Mutex::new(()),
        })
    }

    /// Serializes passive health's ejection decisions for this upstream (see
    /// [`crate::Upstream`]'s streak handling): taken only when a failure streak reaches
    /// its threshold.
    pub(crate) fn eject_gate(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.eject_gate.lock()
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
    /// A set the published snapshot replaced passes the answer on to its replacement
    /// (same source) or drops it.
    pub fn set_discovered(&self, endpoints: Vec<Endpoint>) -> bool {
        let _updating = self.maps.updates.lock();
        self.apply_discovered(endpoints)
    }

    /// [`Live::set_discovered`] with [`Maps::updates`] held.
    fn apply_discovered(&self, mut endpoints: Vec<Endpoint>) -> bool {
        let mut inner = self.inner.lock();
        if let Some(next) = &inner.retired {
            let next = next.upgrade();
            drop(inner);
            return next.is_some_and(|n| n.apply_discovered(endpoints));
        }
        endpoints.sort_by(|a, b| a.url.cmp(&b.url));
        endpoints.dedup_by(|a, b| a.url == b.url);
        self.discovery.updates.fetch_add(1, Ordering::Relaxed);
        self.discovery
            .last_ok_ms
            .store(crate::now_ms(), Ordering::Relaxed);
        *self.discovery.last_error.lock() = None;
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
        let set = build(
            &self.name,
            &inner.spec,
            Some(&endpoints),
            &mut Objects::shared(&self.maps),
        );
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
    /// (A set the published snapshot replaced ignores it: its task is being stopped.)
    pub fn discovery_failed(&self, error: &str) {
        if self.inner.lock().retired.is_some() {
            return;
        }
        self.discovery.errors.fetch_add(1, Ordering::Relaxed);
        *self.discovery.last_error.lock() = Some(error.to_string());
    }

    /// The published snapshot no longer has this set's upstream: what its discovery
    /// task still reports is dropped. Called with [`Maps::updates`] held.
    pub(crate) fn retire(&self) {
        self.inner.lock().retired.get_or_insert_with(Weak::new);
    }
}

/// Publish `new`, compiled in place of `old` (if any), with [`Maps::updates`] held and
/// the snapshot's staged objects already adopted by the maps. With the same discovery
/// source, `new` starts from what `old` found last (answers given since `new` was
/// compiled included), and `old`'s later answers come to `new`; otherwise `old`'s are
/// dropped. `new`'s set is rebuilt from the shared maps, so that it uses the very
/// objects they keep.
pub(crate) fn publish(new: &Arc<Live>, old: Option<&Live>) {
    let mut inner = new.inner.lock();
    if let Some(old) = old {
        let mut was = old.inner.lock();
        if was.spec.discovery.is_some() && was.spec.discovery == inner.spec.discovery {
            inner.discovered = was.discovered.clone();
            was.retired = Some(Arc::downgrade(new));
        } else {
            was.retired = Some(Weak::new());
        }
    }
    let set = build(
        &new.name,
        &inner.spec,
        inner.discovered.as_deref(),
        &mut Objects::shared(&new.maps),
    );
    new.set.store(Arc::new(set));
}

/// Build the target set of `spec` plus what discovery found (static targets first; a
/// discovered URL equal to a static one is not added twice).
fn build(
    name: &str,
    spec: &Spec,
    discovered: Option<&[Endpoint]>,
    objects: &mut Objects<'_>,
) -> TargetSet {
    let mut targets = Vec::new();
    let mut seen = HashSet::new();
    for e in spec.statics.iter().chain(discovered.into_iter().flatten()) {
        if !seen.insert(e.url.as_str()) {
            continue;
        }
        match target(name, e, spec, objects) {
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
pub(crate) fn target(
    name: &str,
    e: &Endpoint,
    spec: &Spec,
    objects: &mut Objects<'_>,
) -> Result<Target, String> {
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
        pool: objects.pool(name, &e.url, &uri, &spec.connector),
        url: e.url.as_str().into(),
        scheme,
        authority,
        host_header,
        weight: e.weight,
        health: objects.health(name, &e.url),
        breaker: spec.per_target.map(|s| objects.breaker(name, &e.url, s)),
    })
}
