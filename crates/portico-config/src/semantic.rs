//! Semantic checks on the typed model: addresses, cross references, patterns,
//! templates, methods, hosts, target URLs and each policy's own rules.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::diag::{closest, Diagnostic, KeyPath};
use crate::grammar::{Template, Var};
use crate::load::PluginCatalog;
use crate::model::{Balance, Config};
use crate::pattern::PathPattern;

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

pub(crate) fn semantic_check(
    c: &Config,
    catalog: &dyn PluginCatalog,
    base_dir: &Path,
    diags: &mut Vec<Diagnostic>,
) {
    let root = KeyPath::root();
    for (i, l) in c.listen.iter().enumerate() {
        check_addr(l, root.key("listen").index(i), diags);
    }
    check_addr(&c.admin.listen, root.key("admin").key("listen"), diags);
    if let Some(tls) = &c.tls {
        let p = root.key("tls");
        for (i, l) in tls.listen.iter().enumerate() {
            check_addr(l, p.key("listen").index(i), diags);
        }
        if tls.certificates.is_empty() {
            diags.push(Diagnostic::new(
                p.key("certificates"),
                "at least one certificate is needed",
            ));
        }
        if tls.certificates.iter().filter(|c| c.default).count() > 1 {
            diags.push(Diagnostic::new(
                p.key("certificates"),
                "only one certificate can be `default: true`",
            ));
        }
    }
    if c.workers == Some(0) {
        diags.push(Diagnostic::new(
            root.key("workers"),
            "workers must be at least 1",
        ));
    }
    for (i, cidr) in c.trusted_proxies.iter().enumerate() {
        if parse_cidr(cidr).is_none() {
            diags.push(Diagnostic::new(
                root.key("trusted_proxies").index(i),
                format!("`{cidr}` is not an IP address or CIDR range"),
            ));
        }
    }
    for (name, up) in &c.upstreams {
        let p = root.key("upstreams").key(name);
        if up.timeouts.total.is_some_and(|t| t.0.is_zero()) {
            diags.push(Diagnostic::new(
                p.key("timeouts").key("total"),
                "`total` must be above 0 (leave it out for no total timeout)",
            ));
        }
        if let Some(d) = &up.discovery {
            diags.extend(d.validate(&p.key("discovery")));
        }
        if let Some(a) = &up.health.active {
            diags.extend(a.validate(&p.key("health").key("active")));
        }
        let pv = &up.health.passive;
        if pv.max_ejected_percent > 100 {
            diags.push(Diagnostic::new(
                p.key("health").key("passive").key("max_ejected_percent"),
                "a percentage is at most 100",
            ));
        }
        if pv.ejection_time.0 > pv.max_ejection_time.0 {
            diags.push(Diagnostic::new(
                p.key("health").key("passive").key("ejection_time"),
                "`ejection_time` is above `max_ejection_time`",
            ));
        }
        if up.targets.is_empty() {
            if up.discovery.is_none() {
                diags.push(Diagnostic::new(
                    p.key("targets"),
                    "an upstream needs at least one target (or a `discovery` source)",
                ));
            }
        } else if up.targets.iter().all(|t| t.weight == 0) {
            diags.push(Diagnostic::new(
                p.key("targets"),
                "every target has weight 0; at least one must take traffic",
            ));
        }
        for (i, t) in up.targets.iter().enumerate() {
            if let Err(e) = check_target_url(&t.url) {
                diags.push(Diagnostic::new(p.key("targets").index(i).key("url"), e));
            }
        }
        if let Some(cb) = &up.circuit_breaker {
            diags.extend(cb.validate(&p.key("circuit_breaker")));
        }
        if let Some(r) = &up.retries {
            diags.extend(r.validate(&p.key("retries")));
        }
        if let Some(a) = &up.adaptive_concurrency {
            diags.extend(a.validate(&p.key("adaptive_concurrency")));
        }
        if let Some(h) = &up.hedging {
            diags.extend(h.validate(&p.key("hedging")));
        }
        match (up.balance, &up.hash_key) {
            // Reported at `hash_key` (located at the upstream): a `hash_key` the schema
            // refused is then not reported twice.
            (Balance::ConsistentHash, None) => diags.push(Diagnostic::new(
                p.key("hash_key"),
                "`balance: consistent_hash` needs a `hash_key`: the request key to hash, e.g. `hash_key: \"header:x-user\"`",
            )),
            (b, Some(_)) if b != Balance::ConsistentHash => diags.push(Diagnostic::new(
                p.key("hash_key"),
                format!(
                    "`hash_key` is only used by `balance: consistent_hash` (this upstream has `{}`); remove it or change `balance`",
                    balance_name(b)
                ),
            )),
            _ => {}
        }
    }
    check_plugins(&c.plugins, &root.key("plugins"), catalog, base_dir, diags);
    crate::identity::check_consumers(&c.consumers, &root.key("consumers"), diags);
    for (key, name) in [
        ("name", &c.consumer_headers.name),
        ("groups", &c.consumer_headers.groups),
    ] {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            diags.push(Diagnostic::new(
                root.key("consumer_headers").key(key),
                format!("`{name}` is not a valid header name"),
            ));
        }
    }
    let mut names = HashSet::new();
    let upstream_names: Vec<&str> = c.upstreams.keys().map(String::as_str).collect();
    for (i, r) in c.routes.iter().enumerate() {
        let p = root.key("routes").index(i);
        if let Some(rt) = &r.retries {
            diags.extend(rt.validate(&p.key("retries")));
        }
        if r.timeouts.total.is_some_and(|t| t.0.is_zero()) {
            diags.push(Diagnostic::new(
                p.key("timeouts").key("total"),
                "`total` must be above 0 (leave it out for no total timeout)",
            ));
        }
        if r.name.is_empty() {
            diags.push(Diagnostic::new(
                p.key("name"),
                "a route needs a non-empty name",
            ));
        } else if !names.insert(r.name.as_str()) {
            diags.push(Diagnostic::new(
                p.key("name"),
                format!("route name `{}` is used twice", r.name),
            ));
        }
        if r.paths.is_empty() {
            diags.push(Diagnostic::new(
                p.key("paths"),
                "a route needs at least one path",
            ));
        }
        let mut captures: Vec<String> = Vec::new();
        for (j, path) in r.paths.iter().enumerate() {
            match PathPattern::parse(path) {
                Ok(pat) => captures.extend(pat.captures()),
                Err(e) => diags.push(Diagnostic::new(p.key("paths").index(j), e)),
            }
        }
        for (j, h) in r.hosts.iter().enumerate() {
            if let Err(e) = check_host(h) {
                diags.push(Diagnostic::new(p.key("hosts").index(j), e));
            }
        }
        for (j, m) in r.methods.iter().enumerate() {
            let up = m.to_ascii_uppercase();
            if *m != up && KNOWN_METHODS.contains(&up.as_str()) {
                diags.push(Diagnostic::new(
                    p.key("methods").index(j),
                    format!("methods are upper-case: write `{up}`"),
                ));
            } else if http::Method::from_bytes(m.as_bytes()).is_err() {
                diags.push(
                    Diagnostic::new(
                        p.key("methods").index(j),
                        format!("`{m}` is not an HTTP method"),
                    )
                    .suggest(&up, KNOWN_METHODS),
                );
            } else if !KNOWN_METHODS.contains(&m.as_str()) && closest(m, KNOWN_METHODS).is_some() {
                diags.push(
                    Diagnostic::new(p.key("methods").index(j), format!("unknown method `{m}`"))
                        .suggest(m, KNOWN_METHODS),
                );
            }
        }
        for name in r.headers.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                diags.push(Diagnostic::new(
                    p.key("headers").key(name),
                    format!("`{name}` is not a valid header name"),
                ));
            }
        }
        let has_terminator = r
            .plugins
            .iter()
            .any(|(k, v)| !is_disabled(v) && catalog.answers_itself(k))
            || c.plugins.iter().any(|(k, v)| {
                !is_disabled(v) && !r.plugins.contains_key(k) && catalog.answers_itself(k)
            });
        let undefined = |key: KeyPath, u: &str| {
            Diagnostic::new(key, format!("upstream `{u}` is not defined in `upstreams`"))
                .suggest(u, upstream_names.iter().copied())
        };
        match &r.upstream {
            Some(u) if !c.upstreams.contains_key(u) => diags.push(undefined(p.key("upstream"), u)),
            Some(_) if !r.upstreams.is_empty() => diags.push(Diagnostic::new(
                p.key("upstreams"),
                "a route has either `upstream` or `upstreams` (a weighted split), not both",
            )),
            Some(_) if r.aggregate.is_some() => diags.push(Diagnostic::new(
                p.key("aggregate"),
                "a route has either `upstream` or `aggregate`, not both",
            )),
            None if r.upstreams.is_empty() && r.aggregate.is_none() && !has_terminator => diags
                .push(Diagnostic::new(
                    p.clone(),
                    "a route needs an `upstream` (or a policy that answers itself, like `echo`)",
                )),
            _ => {}
        }
        let mut in_split = HashSet::new();
        for (j, w) in r.upstreams.iter().enumerate() {
            let q = p.key("upstreams").index(j);
            if !c.upstreams.contains_key(&w.name) {
                diags.push(undefined(q.key("name"), &w.name));
            }
            if !in_split.insert(w.name.as_str()) {
                diags.push(Diagnostic::new(
                    q.key("name"),
                    format!("upstream `{}` is listed twice", w.name),
                ));
            }
        }
        if !r.upstreams.is_empty() && r.upstreams.iter().all(|w| w.weight == 0) {
            diags.push(Diagnostic::new(
                p.key("upstreams"),
                "every upstream of the split has weight 0; at least one must take traffic",
            ));
        }
        if let Some(sp) = &r.split {
            if r.upstreams.is_empty() {
                diags.push(Diagnostic::new(
                    p.key("split"),
                    "`split` applies to `upstreams` (a weighted split), which this route does not have",
                ));
            }
            diags.extend(sp.validate(&p.key("split")));
        }
        if let Some(a) = &r.aggregate {
            let q = p.key("aggregate");
            if !r.upstreams.is_empty() {
                diags.push(Diagnostic::new(
                    q.clone(),
                    "a route has either `upstreams` (a split) or `aggregate`, not both",
                ));
            }
            for (j, call) in a.calls.iter().enumerate() {
                if !c.upstreams.contains_key(&call.upstream) {
                    diags.push(undefined(
                        q.key("calls").index(j).key("upstream"),
                        &call.upstream,
                    ));
                }
            }
            diags.extend(a.validate(&q));
        }
        if let Some(m) = &r.mirror {
            if !c.upstreams.contains_key(&m.upstream) {
                diags.push(undefined(p.key("mirror").key("upstream"), &m.upstream));
            }
            if r.upstream.is_none() && r.upstreams.is_empty() {
                diags.push(Diagnostic::new(
                    p.key("mirror"),
                    "`mirror` copies requests that go to an upstream; this route has none",
                ));
            }
            diags.extend(m.validate(&p.key("mirror")));
        }
        if let Some(rw) = &r.rewrite {
            match Template::parse_path(rw) {
                Err(e) => diags.push(Diagnostic::new(p.key("rewrite"), e)),
                Ok(t) => {
                    if !rw.starts_with('/') && !rw.starts_with("${") {
                        diags.push(Diagnostic::new(
                            p.key("rewrite"),
                            "a rewrite must produce a path starting with `/`",
                        ));
                    }
                    for v in t.vars() {
                        if let Var::Param(n) = v {
                            if !captures.contains(n) {
                                diags.push(
                                    Diagnostic::new(p.key("rewrite"), format!("`{{{n}}}` is not captured by any of this route's paths"))
                                        .suggest(n, captures.iter().map(String::as_str)),
                                );
                            }
                        }
                    }
                }
            }
        }
        check_plugins(&r.plugins, &p.key("plugins"), catalog, base_dir, diags);
    }
}

/// A balancing algorithm as written in the file.
fn balance_name(b: Balance) -> String {
    serde_json::to_value(b)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{b:?}"))
}

pub(crate) fn check_plugins(
    map: &BTreeMap<String, Value>,
    path: &KeyPath,
    catalog: &dyn PluginCatalog,
    base_dir: &Path,
    diags: &mut Vec<Diagnostic>,
) {
    for (name, settings) in map {
        if is_disabled(settings) {
            continue;
        }
        let settings = strip_enabled(settings);
        for (rel, msg) in catalog.check_in(name, &settings, base_dir) {
            let mut p = path.key(name);
            p.append(&rel);
            diags.push(Diagnostic::new(p, msg));
        }
    }
}

/// A policy's settings without the common `enabled` key (and `null` read as `{}`).
pub fn strip_enabled(settings: &Value) -> Value {
    match settings {
        Value::Object(m) => {
            let mut m = m.clone();
            m.remove("enabled");
            Value::Object(m)
        }
        Value::Null => json!({}),
        other => other.clone(),
    }
}

/// Whether policy settings say `enabled: false`.
pub fn is_disabled(settings: &Value) -> bool {
    settings.get("enabled").and_then(Value::as_bool) == Some(false)
}

pub(crate) fn check_addr(s: &str, path: KeyPath, diags: &mut Vec<Diagnostic>) {
    if s.parse::<std::net::SocketAddr>().is_err() {
        diags.push(Diagnostic::new(
            path,
            format!("`{s}` is not an address; write IP:PORT, e.g. `127.0.0.1:8080` or `[::]:8080`"),
        ));
    }
}

/// Parse a CIDR, or a bare address as a single-host range.
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

pub(crate) fn check_host(h: &str) -> Result<(), String> {
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.is_empty() || name.contains('*') {
        return Err(format!(
            "`{h}`: a wildcard is only allowed as a leading `*.` label"
        ));
    }
    if name.contains(':') && !name.starts_with('[') {
        return Err(format!(
            "`{h}`: hosts are matched without a port; remove `:PORT`"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':'))
    {
        return Err(format!("`{h}` is not a valid host name"));
    }
    Ok(())
}

/// Check a target URL: `http(s)://host[:port]` with no path beyond `/`.
pub fn check_target_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(format!(
                "`{url}`: a target URL starts with `http://` or `https://`"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty())
    {
        return Err(format!(
            "`{url}`: a target URL has no path; use `rewrite` on the route to change paths"
        ));
    }
    Ok(uri)
}
