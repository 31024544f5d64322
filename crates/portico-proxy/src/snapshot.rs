//! The compiled, immutable configuration a request runs against. Built once per
//! (re)load; published through `ArcSwap`; a request keeps the one it started with.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use portico_config::grammar::{KeyPart, Template, Var};
use portico_config::load::parse_cidr;
use portico_config::model::{Limits, Route, Timeouts};
use portico_config::pattern::PathPattern;
use portico_config::{Diagnostic, Diagnostics, KeyPath, Loaded};
use portico_plugins::{build_chain, build_global, BuildEnv, ChainEntry, HYGIENE_PRIORITY};
use portico_router::{RouteSpec, Router};
use portico_store::{Consumer, Identity, Source};
use portico_upstream::{Staged, Upstream, UpstreamState};

use crate::metrics::{Metrics, RouteMetrics};
use crate::tls;

/// One compiled route.
pub struct CompiledRoute {
    pub name: Arc<str>,
    pub upstream: Option<Arc<Upstream>>,
    /// A weighted split between upstreams (`upstreams:`), instead of `upstream`.
    pub split: Option<crate::split::Split>,
    /// Copies of requests to another upstream (`mirror:`).
    pub mirror: Option<crate::mirror::Mirror>,
    /// Calls to several upstreams combined into one answer (`aggregate:`).
    pub aggregate: Option<crate::aggregate::Aggregate>,
    pub strip_prefix: bool,
    pub rewrite: Option<Template>,
    pub preserve_host: bool,
    pub timeouts: Timeouts,
    /// Policies by descending priority.
    pub chain: Vec<ChainEntry>,
    /// How many leading entries of `chain` are request hygiene.
    pub hygiene: usize,
    /// Some policy of `chain` edits the upstream request (`Policy::upstream_request`).
    pub edits_upstream_request: bool,
    /// Some policy of `chain` reads upstream response bodies (`Policy::response_body`).
    pub response_body: bool,
    /// Some policy of `chain` finishes responses (`Policy::finish_response`).
    pub finishes: bool,
    /// When the route has authentication policies: where the chain's authentication
    /// ends and what a request none of them authenticated gets.
    pub auth_gate: Option<AuthGate>,
    /// Nothing on this route reads or edits the request's header fields (no policy,
    /// split, mirror, aggregate, hedging or retries, no header in `rewrite` or in the
    /// upstream's `hash_key`): an HTTP/1.1 request's fields may go upstream as the
    /// bytes they came in.
    pub raw_request: bool,
    pub metrics: Arc<RouteMetrics>,
    pub config: Route,
}

impl Snapshot {
    /// The peer is a trusted proxy (its `X-Forwarded-For` names the client).
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        portico_plugins::ctx::is_trusted(peer, &self.trusted_proxies)
    }
}

/// Whether a template or key reads request header fields (cookies are one).
fn reads_fields<'a>(vars: impl IntoIterator<Item = &'a Var>) -> bool {
    vars.into_iter()
        .any(|v| matches!(v, Var::Header(_) | Var::Cookie(_)))
}

impl CompiledRoute {
    /// The upstream's response goes to the client as it came (no policy sees it, no
    /// mirror takes a copy): its fields may stay unparsed on the way.
    pub fn passes_response_through(&self) -> bool {
        self.chain.is_empty() && self.mirror.is_none()
    }
}

/// The check after a route's authentication policies ("any of" them).
pub struct AuthGate {
    /// Index in `chain` of the first policy after authentication.
    pub at: usize,
    /// Every authentication policy's challenge, for the 401.
    pub challenges: Vec<HeaderValue>,
    /// The consumer given to requests without credentials, instead of a 401. Looked up
    /// in the consumer index per request (so it follows admin changes); this one,
    /// with no groups, is used when no consumer of that name exists.
    pub anonymous: Option<Arc<Consumer>>,
}

/// Everything a request needs, compiled.
pub struct Snapshot {
    pub routes: Vec<Arc<CompiledRoute>>,
    pub router: Router,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    pub access_log: bool,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub loaded: Loaded,
    /// Metrics for requests no route took.
    pub unrouted: Arc<RouteMetrics>,
    pub generation: u64,
    /// Consumers and credentials (shared by every snapshot; changes without reload).
    pub identity: Arc<Identity>,
    /// Header names for the consumer's name and groups sent upstream.
    pub consumer_headers: [HeaderName; 2],
    /// Every query parameter a policy reads a credential from (kept out of the log).
    pub secret_params: Vec<Arc<str>>,
    /// Some route matches on request headers.
    pub routes_on_headers: bool,
}

/// Compile a validated configuration. Problems found here (files, certificates) are
/// located like validation problems.
///
/// The upstream state is only read: what the snapshot needs made anew comes back as
/// [`Staged`], for [`UpstreamState::commit`] when (and only if) the snapshot is
/// published.
pub fn compile(
    loaded: Loaded,
    upstream_state: &UpstreamState,
    metrics: &Metrics,
    generation: u64,
    identity: &Arc<Identity>,
    state: &Arc<portico_plugins::PolicyState>,
) -> Result<(Snapshot, Staged), Diagnostics> {
    let cfg = &loaded.config;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let resolve = |p: &str| loaded.resolve(p);
    let env = BuildEnv {
        identity: identity.clone(),
        config_dir: Some(loaded.base_dir.clone()),
        state: state.clone(),
        scope: Arc::from("global"),
    };

    let mut upstreams = HashMap::new();
    let mut staged = Staged::default();
    for (name, u) in &cfg.upstreams {
        match upstream_state.compile(name, u, &resolve, &mut staged) {
            Ok(c) => {
                upstreams.insert(name.clone(), Arc::new(c));
            }
            Err(e) => {
                let mut p = KeyPath::root().key("upstreams").key(name);
                for k in &e.key {
                    match k.parse::<usize>() {
                        Ok(i) => p.push_index(i),
                        Err(_) => p.push_key(k),
                    }
                }
                diags.push(Diagnostic::new(p, e.message));
            }
        }
    }

    let global = match build_global(&cfg.plugins, &env) {
        Ok(g) => g,
        Err((name, errs)) => {
            for (rel, msg) in errs {
                let mut p = KeyPath::root().key("plugins").key(&name);
                p.append(&rel);
                diags.push(Diagnostic::new(p, msg));
            }
            Default::default()
        }
    };

    let mut routes = Vec::with_capacity(cfg.routes.len());
    let mut specs = Vec::with_capacity(cfg.routes.len());
    for (i, r) in cfg.routes.iter().enumerate() {
        let rp = KeyPath::root().key("routes").index(i);
        let chain = match build_chain(&global, &r.plugins, &env.for_route(&r.name)) {
            Ok(c) => c,
            Err((name, errs)) => {
                for (rel, msg) in errs {
                    let mut p = rp.key("plugins").key(&name);
                    p.append(&rel);
                    diags.push(Diagnostic::new(p, msg));
                }
                Vec::new()
            }
        };
        let hygiene = chain
            .iter()
            .take_while(|e| e.priority >= HYGIENE_PRIORITY)
            .count();
        let edits_upstream_request = chain.iter().any(|e| e.policy.edits_upstream_request());
        let response_body = chain.iter().any(|e| e.policy.wants_response_body());
        let finishes = chain.iter().any(|e| e.policy.finishes_response());
        let auth_gate = auth_gate(&chain);
        let upstream = r.upstream.as_ref().and_then(|u| upstreams.get(u).cloned());
        let with_overrides = |base: Timeouts| Timeouts {
            connect: r.timeouts.connect.unwrap_or(base.connect),
            request: r.timeouts.request.unwrap_or(base.request),
            total: r.timeouts.total.or(base.total),
            idle: r.timeouts.idle.unwrap_or(base.idle),
            keepalive: base.keepalive,
        };
        let split = (!r.upstreams.is_empty()).then(|| {
            let shares = r
                .upstreams
                .iter()
                .filter_map(|w| {
                    let u = upstreams.get(&w.name)?.clone();
                    Some(crate::split::Share {
                        timeouts: with_overrides(u.timeouts),
                        upstream: u,
                        weight: w.weight,
                    })
                })
                .collect();
            let sp = r.split.clone().unwrap_or_default();
            crate::split::Split::new(
                shares,
                sp.sticky,
                sp.override_header
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                sp.override_cookie,
            )
        });
        // The route's own timeouts (the client body's idle time): its upstream's, or
        // the first of its split's.
        let base = upstream
            .as_ref()
            .or_else(|| {
                split
                    .as_ref()
                    .and_then(|s| s.shares.first())
                    .map(|s| &s.upstream)
            })
            .map(|u| u.timeouts)
            .unwrap_or_default();
        let timeouts = with_overrides(base);
        let mirror = r.mirror.as_ref().and_then(|m| {
            let u = upstreams.get(&m.upstream)?.clone();
            Some(crate::mirror::Mirror::new(
                m,
                u.clone(),
                u.timeouts,
                r.name.as_str().into(),
                metrics.mirror(&r.name),
            ))
        });
        let rewrite = r
            .rewrite
            .as_ref()
            .and_then(|s| Template::parse_path(s).ok());
        let mut headers = Vec::new();
        for (n, v) in &r.headers {
            match (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_str(&v.0),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => diags.push(Diagnostic::new(
                    rp.key("headers").key(n),
                    "not a valid header name or value",
                )),
            }
        }
        specs.push(RouteSpec {
            hosts: r.hosts.clone(),
            paths: r
                .paths
                .iter()
                .filter_map(|p| PathPattern::parse(p).ok())
                .collect(),
            methods: r
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            headers,
            priority: r.priority,
        });
        let raw_request = chain.is_empty()
            && split.is_none()
            && mirror.is_none()
            && r.aggregate.is_none()
            && r.retries.is_none()
            && rewrite.as_ref().is_none_or(|t| !reads_fields(t.vars()))
            && upstream.as_ref().is_some_and(|u| {
                u.hedging.is_none()
                    && u.retries.is_none()
                    && u.hash_key.as_ref().is_none_or(|k| {
                        !k.0.iter()
                            .any(|p| matches!(p, KeyPart::Header(_) | KeyPart::Cookie(_)))
                    })
            });
        routes.push(Arc::new(CompiledRoute {
            name: r.name.as_str().into(),
            metrics: metrics.route(&r.name, &route_upstream_label(r)),
            upstream,
            split,
            mirror,
            aggregate: r
                .aggregate
                .as_ref()
                .and_then(|a| crate::aggregate::Aggregate::new(a, &upstreams)),
            strip_prefix: r.strip_prefix,
            rewrite,
            preserve_host: r.preserve_host,
            timeouts,
            chain,
            hygiene,
            edits_upstream_request,
            response_body,
            finishes,
            raw_request,
            auth_gate,
            config: r.clone(),
        }));
    }
    let routes_on_headers = cfg.routes.iter().any(|r| !r.headers.is_empty());
    let router = match Router::new(specs) {
        Ok(r) => Some(r),
        Err(e) => {
            diags.push(Diagnostic::new(
                KeyPath::root().key("routes"),
                format!("regular expressions: {e}"),
            ));
            None
        }
    };

    let tls = match &cfg.tls {
        Some(t) => match tls::server_config(t, &loaded) {
            Ok(c) => Some(Arc::new(c)),
            Err(mut ds) => {
                diags.append(&mut ds);
                None
            }
        },
        None => None,
    };

    let trusted_proxies = cfg
        .trusted_proxies
        .iter()
        .filter_map(|s| parse_cidr(s))
        .collect();
    let consumer_headers = consumer_headers(&cfg.consumer_headers);
    let mut secret_params: Vec<Arc<str>> = routes
        .iter()
        .flat_map(|r| r.chain.iter())
        .chain(global.values())
        .flat_map(|e| e.policy.secret_params())
        .collect();
    secret_params.sort();
    secret_params.dedup();
    match router {
        Some(router) if diags.is_empty() => Ok((
            Snapshot {
                routes,
                router,
                upstreams,
                trusted_proxies,
                limits: cfg.limits.clone(),
                access_log: cfg.access_log.enabled,
                tls,
                unrouted: metrics.route("", ""),
                loaded,
                generation,
                identity: identity.clone(),
                consumer_headers,
                secret_params,
                routes_on_headers,
            },
            staged,
        )),
        _ => Err(Diagnostics(
            diags.into_iter().map(|d| loaded.locate(d)).collect(),
        )),
    }
}

fn auth_gate(chain: &[ChainEntry]) -> Option<AuthGate> {
    let auths: Vec<(usize, portico_plugins::AuthInfo)> = chain
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.policy.auth().map(|a| (i, a)))
        .collect();
    let last = auths.last()?.0;
    let anonymous = auths
        .iter()
        .find_map(|(_, a)| a.anonymous.clone())
        .map(|name| {
            Arc::new(Consumer::new(
                name.to_string(),
                Vec::new(),
                Default::default(),
                Source::File,
            ))
        });
    Some(AuthGate {
        at: last + 1,
        challenges: auths.into_iter().map(|(_, a)| a.challenge).collect(),
        anonymous,
    })
}

fn consumer_headers(c: &portico_config::ConsumerHeaders) -> [HeaderName; 2] {
    // Validated with the configuration; the defaults stand in should that ever fail.
    let name = HeaderName::from_bytes(c.name.as_bytes())
        .unwrap_or(HeaderName::from_static("x-consumer-name"));
    let groups = HeaderName::from_bytes(c.groups.as_bytes())
        .unwrap_or(HeaderName::from_static("x-consumer-groups"));
    [name, groups]
}

/// The `upstream` label of a route's metrics: its upstream, or its split's upstreams
/// joined by `,`.
fn route_upstream_label(r: &Route) -> String {
    match &r.upstream {
        Some(u) => u.clone(),
        None => r
            .upstreams
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
    }
}
