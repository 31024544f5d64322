//! `cache`: response caching per route (docs/traffic.md describes it for users).
//!
//! Request phase ("cache lookup", after request validation): a fresh entry is the
//! answer (`X-Cache: HIT`, `Age`; `304` when the client's conditional request
//! matches); a stale one within `stale-while-revalidate` is the answer too (`STALE`)
//! while the pipeline sends the request upstream again in the background
//! ([`BackgroundRefresh`]); otherwise the request goes upstream (`MISS`), conditional
//! on the stale entry's validators when it has some. Concurrent misses of one key are
//! coalesced: the first goes upstream, the others wait for its stored response.
//!
//! Response phase (`response_body`): a `304` to a revalidation refreshes the entry
//! (`REVALIDATED`); a `5xx` (or, through `upstream_error`, no answer at all) within
//! `stale-if-error` is replaced by the stale entry (`STALE`); a storable response is
//! streamed to the client through a [`tee::Tee`] that stores a copy at its end.
//!
//! Entries live in memory (sharded LRU bounded by bytes, kept across reloads in the
//! gateway's [`PolicyState`]) or in Redis (shared by gateways). The admin API purges
//! them through [`purge`].

pub mod control;
pub mod key;
pub mod purge;
pub mod redis;
mod respond;
pub mod settings;
pub mod store;
pub mod tee;

pub use purge::{purge, Purge, Registry};
pub use settings::{MemorySettings, RedisSettings, Settings};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    AUTHORIZATION, ETAG, HOST, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use portico_config::KeyPath;

use self::control::{CacheControl, Defaults};
use self::redis::RedisCache;
use self::respond::answer;
use self::store::{Entry, Flights, Join, Leader, MemoryStore, Slot};
use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{GatewayError, Side};
use crate::policy::{BackgroundRefresh, BodyStep, Flow, Policy, Step};
use crate::registry::{BuildEnv, SettingsErrors};
use crate::state::Clock;

const DEFAULT_MAX_SIZE: u64 = 64 << 20;
const DEFAULT_MAX_OBJECT: u64 = 1 << 20;
const DEFAULT_TTL: Duration = Duration::from_secs(60);
const DEFAULT_STATUSES: [u16; 6] = [200, 203, 204, 301, 404, 410];

/// Where entries are kept.
#[derive(Clone)]
pub enum Backend {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisCache>),
}

/// Counters of one scope, kept across reloads.
#[derive(Default)]
pub struct Stats {
    hit: AtomicU64,
    miss: AtomicU64,
    stale: AtomicU64,
    bypass: AtomicU64,
    revalidated: AtomicU64,
    stored: AtomicU64,
}

/// Stores complete responses (from [`tee::Tee`] or a revalidation).
#[derive(Clone)]
pub struct Sink {
    backend: Backend,
    stats: Arc<Stats>,
}

impl Sink {
    /// Store `entry` under `key` (and the `Vary` marker under the primary key), then
    /// release `leader`. Redis stores run in the background.
    pub fn store(
        &self,
        key: String,
        vary: Option<(String, Arc<[HeaderName]>)>,
        entry: Entry,
        leader: Option<Arc<Leader>>,
    ) {
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        let keep = entry.keep_ms;
        let marker = vary.map(|(pk, names)| {
            (
                pk,
                Slot::Vary {
                    names,
                    until_ms: entry.stored_ms.saturating_add(keep),
                },
            )
        });
        let slot = Slot::Response(Arc::new(entry));
        match &self.backend {
            Backend::Memory(m) => {
                if let Some((pk, marker)) = marker {
                    m.put(&pk, marker);
                }
                m.put(&key, slot);
                drop(leader);
            }
            Backend::Redis(r) => {
                let r = r.clone();
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                rt.spawn(async move {
                    if let Some((pk, marker)) = marker {
                        r.put(&pk, &marker, keep).await;
                    }
                    r.put(&key, &slot, keep).await;
                    drop(leader);
                });
            }
        }
    }
}

pub struct Cache {
    scope: Arc<str>,
    sink: Sink,
    flights: Arc<Flights>,
    methods: Box<[Method]>,
    statuses: Box<[u16]>,
    max_object: u64,
    key_headers: Box<[HeaderName]>,
    per_consumer: bool,
    cache_authenticated: bool,
    cache_set_cookie: bool,
    respect_client: bool,
    coalesce: bool,
    coalesce_timeout: Duration,
    defaults: Defaults,
    clock: Arc<dyn Clock>,
    _registry: Arc<Registry>,
}

/// The wall clock (ms since the Unix epoch, as ns), so that gateways sharing Redis
/// agree on the age of an entry.
#[derive(Default)]
pub struct UnixClock;

impl Clock for UnixClock {
    fn now_ns(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// `X-Cache` of the answer, set in the request or response phase.
#[derive(Clone, Copy)]
struct XCache(&'static str);

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// A request the cache sent upstream: what the response phase needs.
#[derive(Clone)]
struct Pending {
    key: Arc<str>,
    leader: Option<Arc<Leader>>,
    /// The stale entry and its key (revalidated, or used on errors).
    stale: Option<(Arc<Entry>, Arc<str>)>,
    /// The request carries the stale entry's validators.
    revalidating: bool,
    /// The request's headers as the client sent them (variant keys, conditionals).
    req_headers: Arc<HeaderMap>,
    head: bool,
}

/// What a stale-while-revalidate answer hands to the background request.
#[derive(Clone)]
struct Refresh {
    key: Arc<str>,
    leader: Arc<Leader>,
    stale: (Arc<Entry>, Arc<str>),
}

enum Decided {
    Flow(Flow),
    Wait(tokio::sync::watch::Receiver<()>),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Cache {
    pub fn new(s: Settings, env: &BuildEnv) -> Result<Self, SettingsErrors> {
        Self::with_clock(s, env, Arc::new(UnixClock))
    }

    pub fn with_clock(
        s: Settings,
        env: &BuildEnv,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SettingsErrors> {
        let root = KeyPath::root();
        let mut errs: SettingsErrors = Vec::new();
        let max_object = s.max_object_size.map_or(DEFAULT_MAX_OBJECT, |b| b.0);
        if max_object == 0 {
            errs.push((root.key("max_object_size"), "must be more than 0".into()));
        }
        let mut methods = Vec::new();
        for (i, m) in s
            .methods
            .clone()
            .unwrap_or_else(|| vec!["GET".into(), "HEAD".into()])
            .iter()
            .enumerate()
        {
            match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) if m != Method::CONNECT => methods.push(m),
                _ => errs.push((
                    root.key("methods").index(i),
                    format!("`{m}` is not a method that can be cached"),
                )),
            }
        }
        if methods.is_empty() {
            errs.push((root.key("methods"), "give at least one method".into()));
        }
        let statuses = s
            .statuses
            .clone()
            .unwrap_or_else(|| DEFAULT_STATUSES.to_vec());
        for (i, st) in statuses.iter().enumerate() {
            if !(200..=599).contains(st) || matches!(st, 206 | 304) {
                errs.push((
                    root.key("statuses").index(i),
                    format!(
                        "{st} cannot be cached: use final statuses 200-599 other than 206 and 304"
                    ),
                ));
            }
        }
        let mut key_headers = Vec::new();
        for (i, h) in s.key_headers.iter().enumerate() {
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => key_headers.push(n),
                Err(_) => errs.push((
                    root.key("key_headers").index(i),
                    format!("`{h}` is not a header name"),
                )),
            }
        }
        if s.per_consumer && !s.cache_authenticated {
            errs.push((
                root.key("per_consumer"),
                "only authenticated requests have a consumer, and they bypass the cache unless `cache_authenticated: true`".into(),
            ));
        }
        let coalesce_timeout = s.coalesce_timeout.map_or(Duration::from_secs(5), |d| d.0);
        if coalesce_timeout.is_zero() {
            errs.push((root.key("coalesce_timeout"), "must be more than 0".into()));
        }
        let backend = match (&s.memory, &s.redis) {
            (Some(_), Some(_)) => {
                errs.push((root, "give `memory` or `redis`, not both".into()));
                None
            }
            (_, Some(r)) => {
                let timeout = r.timeout.map_or(Duration::from_millis(100), |d| d.0);
                if timeout.is_zero() {
                    errs.push((
                        root.key("redis").key("timeout"),
                        "must be more than 0".into(),
                    ));
                }
                let prefix = r.prefix.clone().unwrap_or_else(|| "portico:cache:".into());
                match RedisCache::new(&r.url, timeout, prefix.clone()) {
                    Ok(c) => Some(Backend::Redis(env.state.get_or_insert(
                        &format!("cache-redis/{}/{timeout:?}/{prefix}", r.url),
                        move || c,
                    ))),
                    Err(e) => {
                        errs.push((
                            root.key("redis").key("url"),
                            format!("not a Redis URL: {e}"),
                        ));
                        None
                    }
                }
            }
            (m, None) => {
                let max = m
                    .as_ref()
                    .and_then(|m| m.max_size)
                    .map_or(DEFAULT_MAX_SIZE, |b| b.0);
                if max < max_object.saturating_mul(2) {
                    errs.push((
                        root.key("memory").key("max_size"),
                        format!("must be at least twice `max_object_size` ({max_object} bytes)"),
                    ));
                    None
                } else {
                    Some(Backend::Memory(env.state.get_or_insert(
                        &format!("cache-memory/{}/{max}/{max_object}", env.scope),
                        || MemoryStore::new(max, max_object),
                    )))
                }
            }
        };
        let (Some(backend), true) = (backend, errs.is_empty()) else {
            return Err(errs);
        };
        let registry = env.state.get_or_insert(purge::REGISTRY, Registry::default);
        registry.add(&backend);
        let stats = env
            .state
            .get_or_insert(&format!("cache-stats/{}", env.scope), Stats::default);
        Ok(Cache {
            scope: env.scope.clone(),
            sink: Sink { backend, stats },
            flights: env
                .state
                .get_or_insert(&format!("cache-flights/{}", env.scope), Flights::default),
            methods: methods.into(),
            statuses: statuses.into(),
            max_object,
            key_headers: key_headers.into(),
            per_consumer: s.per_consumer,
            cache_authenticated: s.cache_authenticated,
            cache_set_cookie: s.cache_set_cookie,
            respect_client: s.respect_client_no_cache,
            coalesce: s.coalesce.unwrap_or(true),
            coalesce_timeout,
            defaults: Defaults {
                ttl_ms: ms(s.default_ttl.map_or(DEFAULT_TTL, |d| d.0)),
                swr_ms: ms(s.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0)),
                sie_ms: ms(s.stale_if_error.map_or(Duration::ZERO, |d| d.0)),
            },
            clock,
            _registry: registry,
        })
    }

    fn now(&self) -> u64 {
        self.clock.now_ns() / 1_000_000
    }

    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn primary_key(&self, ctx: &Ctx, req: &Request<Body>) -> String {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let url = key::url(host, &ctx.path, req.uri().query());
        let consumer = if self.per_consumer {
            ctx.consumer.as_ref().map(|c| c.name.as_str())
        } else {
            None
        };
        key::primary(
            &ctx.route_name,
            &url,
            req.method().as_str(),
            &self.key_headers,
            req.headers(),
            consumer,
        )
    }

    /// The entry a request selects in memory (through its `Vary` marker if any).
    fn resolve_memory(
        m: &MemoryStore,
        key: &str,
        h: &HeaderMap,
        now: u64,
    ) -> Option<(Arc<Entry>, Arc<str>)> {
        match m.get(key, now)? {
            Slot::Response(e) => Some((e, Arc::from(key))),
            Slot::Vary { names, .. } => {
                let vk = key::variant(key, &names, h);
                match m.get(&vk, now)? {
                    Slot::Response(e) => Some((e, Arc::from(vk))),
                    Slot::Vary { .. } => None,
                }
            }
        }
    }

    async fn resolve_redis(
        r: &RedisCache,
        key: &str,
        h: &HeaderMap,
        now: u64,
    ) -> Option<(Arc<Entry>, Arc<str>)> {
        let found = match r.get(key).await? {
            Slot::Response(e) => (e, Arc::from(key)),
            Slot::Vary { names, .. } => {
                let vk = key::variant(key, &names, h);
                match r.get(&vk).await? {
                    Slot::Response(e) => (e, Arc::from(vk)),
                    Slot::Vary { .. } => return None,
                }
            }
        };
        (!found.0.expired(now)).then_some(found)
    }

    /// Decide on a request given what the store holds for it.
    fn decide(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        key: &Arc<str>,
        found: Option<(Arc<Entry>, Arc<str>)>,
        may_wait: bool,
    ) -> Decided {
        let now = self.now();
        if let Some((e, ek)) = &found {
            if e.fresh(now) {
                self.count(&self.sink.stats.hit);
                return Decided::Flow(self.serve(
                    ctx,
                    req.headers(),
                    req.method() == Method::HEAD,
                    e,
                    now,
                    "HIT",
                ));
            }
            if e.usable_while_revalidating(now) {
                // One background refresh per key at a time.
                if let Some(l) = self.flights.try_lead(key) {
                    let r = Refresh {
                        key: key.clone(),
                        leader: Arc::new(l),
                        stale: (e.clone(), ek.clone()),
                    };
                    ctx.extensions.insert(BackgroundRefresh(Arc::new(r)));
                }
                self.count(&self.sink.stats.stale);
                return Decided::Flow(self.serve(
                    ctx,
                    req.headers(),
                    req.method() == Method::HEAD,
                    e,
                    now,
                    "STALE",
                ));
            }
        }
        let mut leader = None;
        if self.coalesce && may_wait {
            match self.flights.join(key) {
                Join::Lead(l) => leader = Some(Arc::new(l)),
                Join::Wait(rx) => return Decided::Wait(rx),
            }
        }
        self.fetch(ctx, req, key.clone(), leader, found);
        Decided::Flow(Flow::Continue)
    }

    /// Send the request upstream, revalidating `stale` when it has validators.
    fn fetch(
        &self,
        ctx: &mut Ctx,
        req: &mut Request<Body>,
        key: Arc<str>,
        leader: Option<Arc<Leader>>,
        stale: Option<(Arc<Entry>, Arc<str>)>,
    ) {
        let req_headers = Arc::new(req.headers().clone());
        let revalidating = stale.as_ref().is_some_and(|(e, _)| e.validators());
        if let Some((e, _)) = &stale {
            // The answer refreshes the entry: the client's own conditions are answered
            // from it afterwards, not by the upstream.
            let h = req.headers_mut();
            h.remove(IF_NONE_MATCH);
            h.remove(IF_MODIFIED_SINCE);
            if let Some(v) = e.headers.get(ETAG) {
                h.insert(IF_NONE_MATCH, v.clone());
            }
            if let Some(v) = e.headers.get(LAST_MODIFIED) {
                h.insert(IF_MODIFIED_SINCE, v.clone());
            }
        }
        self.count(&self.sink.stats.miss);
        ctx.extensions.insert(XCache("MISS"));
        ctx.extensions.insert(Pending {
            key,
            leader,
            stale,
            revalidating,
            req_headers,
            head: req.method() == Method::HEAD,
        });
    }

    /// Answer from an entry.
    fn serve(
        &self,
        ctx: &mut Ctx,
        req: &HeaderMap,
        head: bool,
        e: &Entry,
        now: u64,
        label: &'static str,
    ) -> Flow {
        ctx.extensions.insert(XCache(label));
        Flow::Respond(Box::new(answer(req, head, e, now)))
    }

    fn bypass(&self, ctx: &mut Ctx) -> Step<'static> {
        self.count(&self.sink.stats.bypass);
        ctx.extensions.insert(XCache("BYPASS"));
        Step::cont()
    }
}

impl Policy for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        // The pipeline's background request of a stale-while-revalidate answer.
        if let Some(bg) = req.extensions_mut().remove::<BackgroundRefresh>() {
            if let Ok(r) = bg.0.downcast::<Refresh>() {
                let r = Arc::unwrap_or_clone(r);
                self.fetch(ctx, req, r.key, Some(r.leader), Some(r.stale));
                return Step::cont();
            }
        }
        // A range is answered by the upstream (a 206 is never stored, nor a whole
        // entry sent for a part).
        if !self.methods.contains(req.method()) || req.headers().contains_key(RANGE) {
            return self.bypass(ctx);
        }
        if !self.cache_authenticated
            && (ctx.consumer.is_some()
                || ctx.auth.is_some()
                || req.headers().contains_key(AUTHORIZATION))
        {
            return self.bypass(ctx);
        }
        let key: Arc<str> = Arc::from(self.primary_key(ctx, req));
        if self.respect_client {
            let cc = CacheControl::parse(req.headers());
            if cc.no_store {
                return self.bypass(ctx);
            }
            if cc.request_wants_fresh(req.headers()) {
                self.fetch(ctx, req, key, None, None);
                return Step::cont();
            }
        }
        match &self.sink.backend {
            Backend::Memory(m) => {
                let found = Self::resolve_memory(m, &key, req.headers(), self.now());
                match self.decide(ctx, req, &key, found, true) {
                    Decided::Flow(f) => Step::Ready(Some(f)),
                    Decided::Wait(rx) => Step::Pending(Box::pin(async move {
                        store::wait(rx, self.coalesce_timeout).await;
                        let found = Self::resolve_memory(m, &key, req.headers(), self.now());
                        match self.decide(ctx, req, &key, found, false) {
                            Decided::Flow(f) => f,
                            Decided::Wait(_) => Flow::Continue,
                        }
                    })),
                }
            }
            Backend::Redis(r) => Step::Pending(Box::pin(async move {
                let found = Self::resolve_redis(r, &key, req.headers(), self.now()).await;
                match self.decide(ctx, req, &key, found, true) {
                    Decided::Flow(f) => f,
                    Decided::Wait(rx) => {
                        store::wait(rx, self.coalesce_timeout).await;
                        let found = Self::resolve_redis(r, &key, req.headers(), self.now()).await;
                        match self.decide(ctx, req, &key, found, false) {
                            Decided::Flow(f) => f,
                            Decided::Wait(_) => Flow::Continue,
                        }
                    }
                }
            })),
        }
    }

    fn upstream_response(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        if let Some(x) = ctx.extensions.get::<XCache>() {
            resp.headers
                .insert(X_CACHE.clone(), HeaderValue::from_static(x.0));
        }
    }

    fn wants_response_body(&self) -> bool {
        true
    }

    fn response_body<'a>(
        &'a self,
        ctx: &'a mut Ctx,
        parts: &'a mut http::response::Parts,
        body: Body,
    ) -> BodyStep<'a> {
        let Some(p) = ctx.extensions.remove::<Pending>() else {
            return BodyStep::pass(body);
        };
        let now = self.now();
        if let (StatusCode::NOT_MODIFIED, true, Some((stale, sk))) =
            (parts.status, p.revalidating, &p.stale)
        {
            if let Some(e) = self.refreshed(stale, &parts.headers, now) {
                let resp = answer(&p.req_headers, p.head, &e, now);
                self.count(&self.sink.stats.revalidated);
                ctx.extensions.insert(XCache("REVALIDATED"));
                self.sink.store(sk.to_string(), None, e, p.leader.clone());
                let (rp, rb) = resp.into_parts();
                *parts = rp;
                return BodyStep::pass(rb);
            }
        }
        if parts.status.is_server_error() {
            if let Some((stale, _)) = p.stale.as_ref().filter(|(e, _)| e.usable_on_error(now)) {
                let resp = answer(&p.req_headers, p.head, stale, now);
                self.count(&self.sink.stats.stale);
                ctx.extensions.insert(XCache("STALE"));
                let (rp, rb) = resp.into_parts();
                *parts = rp;
                return BodyStep::pass(rb);
            }
        }
        match self.storable(&p, parts, now) {
            Some(job) => BodyStep::pass(tee::body(body, self.max_object, job)),
            None => BodyStep::pass(body),
        }
    }

    fn upstream_error(&self, ctx: &mut Ctx, err: &GatewayError) -> Option<Response<Body>> {
        let p = ctx.extensions.remove::<Pending>()?;
        if err.side != Side::Upstream {
            return None;
        }
        let now = self.now();
        let (stale, _) = p.stale.as_ref().filter(|(e, _)| e.usable_on_error(now))?;
        self.count(&self.sink.stats.stale);
        ctx.extensions.insert(XCache("STALE"));
        Some(answer(&p.req_headers, p.head, stale, now))
    }

    fn metrics(&self, out: &mut String) {
        let scope = self.scope.replace('\\', "\\\\").replace('"', "\\\"");
        let s = &self.sink.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP portico_cache_requests_total Requests seen by cache, by result (X-Cache).\n# TYPE portico_cache_requests_total counter"
        );
        for (result, c) in [
            ("hit", &s.hit),
            ("miss", &s.miss),
            ("stale", &s.stale),
            ("bypass", &s.bypass),
            ("revalidated", &s.revalidated),
        ] {
            let _ = writeln!(
                out,
                "portico_cache_requests_total{{scope=\"{scope}\",result=\"{result}\"}} {}",
                load(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP portico_cache_stores_total Responses stored (or refreshed) by cache.\n# TYPE portico_cache_stores_total counter\nportico_cache_stores_total{{scope=\"{scope}\"}} {}",
            load(&s.stored)
        );
        match &self.sink.backend {
            Backend::Memory(m) => {
                let (bytes, entries) = m.usage();
                let _ = writeln!(
                    out,
                    "# HELP portico_cache_stored_bytes Bytes held by an in-memory cache.\n# TYPE portico_cache_stored_bytes gauge\nportico_cache_stored_bytes{{scope=\"{scope}\"}} {bytes}\n# HELP portico_cache_entries Entries held by an in-memory cache.\n# TYPE portico_cache_entries gauge\nportico_cache_entries{{scope=\"{scope}\"}} {entries}\n# HELP portico_cache_evictions_total Entries an in-memory cache evicted to stay within max_size.\n# TYPE portico_cache_evictions_total counter\nportico_cache_evictions_total{{scope=\"{scope}\"}} {}",
                    load(&m.evictions)
                );
            }
            Backend::Redis(r) => {
                let _ = writeln!(
                    out,
                    "# HELP portico_cache_store_errors_total Redis cache calls that failed (lookups count as misses).\n# TYPE portico_cache_store_errors_total counter\nportico_cache_store_errors_total{{scope=\"{scope}\"}} {}",
                    load(&r.errors)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
