//! The file form of what keeps an upstream's target set current without a reload:
//! `discovery:` (DNS, etcd, Consul, Kubernetes, the gateway's own registry) and
//! `health:` (active checks, outlier detection, the all-unhealthy policy). The tasks
//! that act on them live in `portico-upstream`.

use serde::{Deserialize, Serialize};

use schemars::JsonSchema;

use crate::diag::{Diagnostic, KeyPath};
use crate::units::Dur;

/// Where an upstream's targets come from besides `targets:`. Exactly one source.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// A/AAAA or SRV records, re-resolved as their TTL says.
    #[serde(default)]
    pub dns: Option<Dns>,
    /// Targets stored under a key prefix in etcd (v3), kept current with a watch.
    #[serde(default)]
    pub etcd: Option<Etcd>,
    /// Passing instances of a Consul service (blocking queries).
    #[serde(default)]
    pub consul: Option<Consul>,
    /// The ready endpoints of a Kubernetes service (EndpointSlices, watched).
    #[serde(default)]
    pub kubernetes: Option<Kubernetes>,
    /// Instances registered with this gateway (`PUT /admin/registry/{service}`).
    #[serde(default)]
    pub registry: Option<Registry>,
    /// Scheme of the discovered targets: `http` (default) or `https`.
    #[serde(default)]
    pub scheme: DiscoveredScheme,
    /// Weight of discovered targets whose source gives none (SRV and etcd values may).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveredScheme {
    #[default]
    Http,
    Https,
}

impl DiscoveredScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoveredScheme::Http => "http",
            DiscoveredScheme::Https => "https",
        }
    }
}

/// DNS records of one name.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// The name to resolve, e.g. `users.service.internal` (or `_http._tcp.users...` for SRV).
    pub name: String,
    /// `a` (IPv4), `aaaa` (IPv6), `a_aaaa` (both, the default) or `srv` (targets,
    /// ports and weights from SRV records; the lowest priority value wins).
    #[serde(default)]
    pub record: DnsRecord,
    /// Port of the targets (A/AAAA; SRV records carry their own).
    #[serde(default)]
    pub port: Option<u16>,
    /// A DNS server to ask (`127.0.0.1:5353`) instead of the system's resolvers.
    #[serde(default)]
    pub resolver: Option<String>,
    /// Re-resolve no sooner than this, whatever the TTL (default 1s).
    #[serde(default = "default_min_ttl")]
    pub min_ttl: Dur,
    /// Re-resolve at least this often, whatever the TTL (default 5m).
    #[serde(default = "default_max_ttl")]
    pub max_ttl: Dur,
    /// Keep the `Host` header of requests to these targets as the DNS name (default
    /// true); `false` sends the target's address.
    #[serde(default = "default_true")]
    pub host_header: bool,
}

fn default_min_ttl() -> Dur {
    Dur::secs(1)
}
fn default_max_ttl() -> Dur {
    Dur::secs(300)
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DnsRecord {
    A,
    Aaaa,
    #[default]
    AAaaa,
    Srv,
}

/// etcd v3 (through its JSON gateway, `/v3/kv/range` and `/v3/watch`). Each key under
/// `prefix` is one target; its value is `host:port`, a URL, or JSON
/// `{"url": "http://10.0.0.5:8080", "weight": 2}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    /// etcd client URLs, tried in turn: `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix, e.g. `/services/users/`.
    pub prefix: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Consul's health API with blocking queries; only passing instances are used.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Consul {
    /// The Consul agent: `http://127.0.0.1:8500`.
    pub address: String,
    /// The service name.
    pub service: String,
    /// Only instances with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub datacenter: Option<String>,
    /// ACL token (sent as `X-Consul-Token`).
    #[serde(default)]
    pub token: Option<String>,
    /// How long one blocking query may wait (default 30s, at most 10m).
    #[serde(default = "default_wait")]
    pub wait: Dur,
}

fn default_wait() -> Dur {
    Dur::secs(30)
}

/// A Kubernetes service's EndpointSlices.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// The service name.
    pub service: String,
    /// Its namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The endpoint port: its name (`http`) or number; absent: the slice's only port.
    #[serde(default)]
    pub port: Option<crate::model::Scalar>,
    /// The API server URL; absent: in-cluster settings (service account).
    #[serde(default)]
    pub api_server: Option<String>,
    /// Bearer token file (default: the service account's).
    #[serde(default)]
    pub token_file: Option<String>,
    /// CA bundle of the API server (default: the service account's).
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// Instances registered through the admin API.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// The service name instances register under.
    pub service: String,
}

impl Discovery {
    /// The configured source's name, when exactly one is.
    pub fn source(&self) -> Option<&'static str> {
        let set = self.sources();
        (set.len() == 1).then(|| set[0])
    }

    fn sources(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.dns.is_some() {
            v.push("dns");
        }
        if self.etcd.is_some() {
            v.push("etcd");
        }
        if self.consul.is_some() {
            v.push("consul");
        }
        if self.kubernetes.is_some() {
            v.push("kubernetes");
        }
        if self.registry.is_some() {
            v.push("registry");
        }
        v
    }

    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        let set = self.sources();
        if set.is_empty() {
            d.push(Diagnostic::new(
                p.clone(),
                "`discovery` needs one source: `dns`, `etcd`, `consul`, `kubernetes` or `registry`",
            ));
        } else if set.len() > 1 {
            d.push(Diagnostic::new(
                p.clone(),
                format!(
                    "`discovery` takes one source, found {}; use one upstream per source",
                    set.join(" and ")
                ),
            ));
        }
        if let Some(dns) = &self.dns {
            let q = p.key("dns");
            if dns.name.trim().is_empty() {
                d.push(Diagnostic::new(
                    q.key("name"),
                    "the name to resolve is empty",
                ));
            } else if !dns_name(&dns.name) {
                d.push(Diagnostic::new(
                    q.key("name"),
                    format!(
                        "`{}` is not a DNS name like `users.internal` (letters, digits, `-`, `_` and dots)",
                        dns.name
                    ),
                ));
            }
            if dns.record != DnsRecord::Srv && dns.port.is_none() {
                d.push(Diagnostic::new(
                    q.key("port"),
                    "A/AAAA records carry no port: set `port` (or use `record: srv`)",
                ));
            }
            if let Some(r) = &dns.resolver {
                if parse_socket(r).is_none() {
                    d.push(Diagnostic::new(
                        q.key("resolver"),
                        format!("`{r}` is not an address like `127.0.0.1:53`"),
                    ));
                }
            }
            if dns.min_ttl.0 > dns.max_ttl.0 {
                d.push(Diagnostic::new(
                    q.key("min_ttl"),
                    "`min_ttl` is above `max_ttl`",
                ));
            }
        }
        if let Some(e) = &self.etcd {
            let q = p.key("etcd");
            if e.endpoints.is_empty() {
                d.push(Diagnostic::new(
                    q.key("endpoints"),
                    "give at least one etcd endpoint, e.g. `http://127.0.0.1:2379`",
                ));
            }
            for (i, u) in e.endpoints.iter().enumerate() {
                if let Err(m) = check_http_url(u) {
                    d.push(Diagnostic::new(q.key("endpoints").index(i), m));
                }
            }
            if e.prefix.is_empty() {
                d.push(Diagnostic::new(
                    q.key("prefix"),
                    "the key prefix is empty (it would take every key in etcd)",
                ));
            }
            match (&e.username, &e.password) {
                (Some(_), None) => d.push(Diagnostic::new(
                    q.clone(),
                    "`username` is set but `password` is missing: they go together",
                )),
                (None, Some(_)) => d.push(Diagnostic::new(
                    q.clone(),
                    "`password` is set but `username` is missing: they go together",
                )),
                _ => {}
            }
        }
        if let Some(c) = &self.consul {
            let q = p.key("consul");
            if let Err(m) = check_http_url(&c.address) {
                d.push(Diagnostic::new(q.key("address"), m));
            }
            if c.service.is_empty() {
                d.push(Diagnostic::new(
                    q.key("service"),
                    "the service name is empty",
                ));
            }
            if c.wait.0.is_zero() || c.wait.0.as_secs() > 600 {
                d.push(Diagnostic::new(
                    q.key("wait"),
                    "`wait` must be between 1s and 10m",
                ));
            }
        }
        if let Some(k) = &self.kubernetes {
            let q = p.key("kubernetes");
            if k.service.is_empty() {
                d.push(Diagnostic::new(
                    q.key("service"),
                    "the service name is empty",
                ));
            }
            if let Some(u) = &k.api_server {
                if let Err(m) = check_http_url(u) {
                    d.push(Diagnostic::new(q.key("api_server"), m));
                }
            }
            if k.namespace.is_empty() {
                d.push(Diagnostic::new(
                    q.key("namespace"),
                    "the namespace is empty",
                ));
            }
            if let Some(port) = &k.port {
                let p = port.0.trim();
                let bad_number = p.parse::<i64>().is_ok_and(|n| !(1..=65535).contains(&n));
                if p.is_empty() || bad_number {
                    d.push(Diagnostic::new(
                        q.key("port"),
                        format!("`{p}` is not a port name or a number from 1 to 65535"),
                    ));
                }
            }
        }
        if let Some(r) = &self.registry {
            if r.service.is_empty() || !r.service.chars().all(service_char) {
                d.push(Diagnostic::new(
                    p.key("registry").key("service"),
                    "a service name is letters, digits, `-`, `_` and `.`",
                ));
            }
        }
        if self.weight == 0 {
            d.push(Diagnostic::new(
                p.key("weight"),
                "weight 0 would take every discovered target out of rotation",
            ));
        }
        d
    }
}

/// Characters of a registry service name.
pub fn service_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether `s` looks like a DNS name: dot-separated labels of letters, digits, `-` and
/// `_` (SRV names), at most one final dot.
fn dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn parse_socket(s: &str) -> Option<std::net::SocketAddr> {
    s.parse().ok().or_else(|| {
        // A bare address means port 53.
        s.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

/// The resolver address of `dns.resolver` (a bare IP means port 53).
pub fn resolver_addr(s: &str) -> Option<std::net::SocketAddr> {
    parse_socket(s)
}

fn check_http_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u
        .parse()
        .map_err(|_| format!("`{u}` is not a URL like `http://127.0.0.1:8500`"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{u}` must start with http:// or https://")),
    }
    if uri.host().is_none() {
        return Err(format!("`{u}` has no host"));
    }
    Ok(())
}

/// Active health checks: probes sent to every target on a timer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheck {
    /// `http` (default) or `tcp` (a connection is enough).
    #[serde(default, rename = "type")]
    pub kind: CheckKind,
    /// HTTP: the path probed.
    #[serde(default = "default_check_path")]
    pub path: String,
    /// HTTP: the method (default GET).
    #[serde(default = "default_check_method")]
    pub method: String,
    /// HTTP: statuses that count as healthy; empty: any 2xx or 3xx.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
    /// HTTP: the response body must contain this text.
    #[serde(default)]
    pub body_contains: Option<String>,
    /// HTTP: the `Host` header sent (default: the target's).
    #[serde(default)]
    pub host: Option<String>,
    /// Time between probes of one target (default 5s); each wait is jittered by up to
    /// `jitter` so targets are not probed in lockstep.
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Random extra wait added to each interval, at most this (default 10% of `interval`).
    #[serde(default)]
    pub jitter: Option<Dur>,
    /// A probe not answered within this fails (default 2s).
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
    /// Consecutive successes that bring an unhealthy target back (default 2).
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a target out (default 3).
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
}

fn default_check_path() -> String {
    "/".into()
}
fn default_check_method() -> String {
    "GET".into()
}
fn default_interval() -> Dur {
    Dur::secs(5)
}
fn default_check_timeout() -> Dur {
    Dur::secs(2)
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    #[default]
    Http,
    Tcp,
}

impl ActiveCheck {
    pub fn validate(&self, p: &KeyPath) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        if self.kind == CheckKind::Http {
            if !self.path.starts_with('/') || self.path.parse::<http::Uri>().is_err() {
                d.push(Diagnostic::new(
                    p.key("path"),
                    format!("`{}` is not a path starting with `/`", self.path),
                ));
            }
            if http::Method::from_bytes(self.method.as_bytes()).is_err() {
                d.push(Diagnostic::new(
                    p.key("method"),
                    format!("`{}` is not an HTTP method", self.method),
                ));
            }
            for (i, s) in self.expected_statuses.iter().enumerate() {
                if !(100..=599).contains(s) {
                    d.push(Diagnostic::new(
                        p.key("expected_statuses").index(i),
                        format!("{s} is not an HTTP status (100-599)"),
                    ));
                }
            }
            if let Some(h) = &self.host {
                if http::HeaderValue::from_str(h).is_err() {
                    d.push(Diagnostic::new(p.key("host"), "not a valid Host value"));
                }
            }
        }
        if self.interval.0.as_millis() < 100 {
            d.push(Diagnostic::new(
                p.key("interval"),
                "`interval` must be at least 100ms",
            ));
        }
        if self.timeout.0.is_zero() {
            d.push(Diagnostic::new(
                p.key("timeout"),
                "`timeout` must be above 0",
            ));
        }
        for (k, v) in [
            ("healthy_threshold", self.healthy_threshold),
            ("unhealthy_threshold", self.unhealthy_threshold),
        ] {
            if v == 0 {
                d.push(Diagnostic::new(
                    p.key(k),
                    format!("`{k}` must be at least 1"),
                ));
            }
        }
        d
    }
}

/// What happens when no target is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// Answer 503 `no_healthy_upstream` at once.
    #[default]
    Fail,
    /// "Panic mode": ignore health and spread over every target (as Envoy does below
    /// its panic threshold), on the grounds that some answer beats none.
    Panic,
}
