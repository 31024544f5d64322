//! The file format: serde types with `deny_unknown_fields`. Every key here is
//! documented in `docs/configuration.md`; the JSON Schema is generated from these types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::grammar::KeySpec;
use crate::units::{ByteSize, Dur};

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:8080".to_string()]
}
fn default_true() -> bool {
    true
}
fn default_weight() -> u32 {
    1
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plain-text HTTP listeners (HTTP/1.1 and h2c with prior knowledge).
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// HTTPS listeners and their certificates.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The admin listener (metrics, health, admin API).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Worker threads of the data plane; default: one per core.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Peers (CIDR or address) whose `X-Forwarded-For`/`Forwarded` headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Listener limits applied before routing.
    #[serde(default)]
    pub limits: Limits,
    /// The access log.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: Shutdown,
    /// Named groups of targets that routes send traffic to.
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    /// Routes, matched by host, path, method and headers.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Policies for every route: a map from policy name to its settings.
    #[serde(default)]
    pub plugins: BTreeMap<String, Value>,
    /// Where consumers and credentials made through the admin API are kept.
    #[serde(default)]
    pub store: Store,
    /// Consumers declared in this file (read-only through the admin API).
    #[serde(default)]
    pub consumers: Vec<ConsumerDecl>,
    /// Names of the headers that tell the upstream who the caller is. Headers of
    /// these names sent by clients are always removed.
    #[serde(default)]
    pub consumer_headers: ConsumerHeaders,
}

/// The embedded store.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// SQLite file (relative to the configuration file; created when missing).
    #[serde(default = "default_store_path")]
    pub path: String,
}

fn default_store_path() -> String {
    "data/portico.db".to_string()
}

impl Default for Store {
    fn default() -> Self {
        Store {
            path: default_store_path(),
        }
    }
}

/// Header names for the caller's identity sent upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerHeaders {
    /// The consumer's name.
    #[serde(default = "default_consumer_name_header")]
    pub name: String,
    /// The consumer's groups, comma-separated.
    #[serde(default = "default_consumer_groups_header")]
    pub groups: String,
}

fn default_consumer_name_header() -> String {
    "X-Consumer-Name".to_string()
}
fn default_consumer_groups_header() -> String {
    "X-Consumer-Groups".to_string()
}

impl Default for ConsumerHeaders {
    fn default() -> Self {
        ConsumerHeaders {
            name: default_consumer_name_header(),
            groups: default_consumer_groups_header(),
        }
    }
}

/// A consumer declared in the file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerDecl {
    /// Unique name: letters, digits, `.`, `_`, `-`, `@` (at most 128).
    pub name: String,
    /// Groups, for `acl` and the `X-Consumer-Groups` header.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Free-form data shown by the admin API.
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
    /// How the consumer proves who it is.
    #[serde(default)]
    pub credentials: Vec<CredentialDecl>,
}

/// A credential declared in the file. Secrets are hashed at load and never shown.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CredentialDecl {
    /// An API key (16 characters or more).
    KeyAuth {
        key: Secret,
        /// RFC 3339 time after which the key is refused.
        #[serde(default)]
        expires_at: Option<String>,
    },
    /// A user name and password (or an Argon2id PHC string `$argon2id$...`).
    BasicAuth { username: String, password: Secret },
    /// JWTs whose consumer claim (`sub` by default) equals `subject`.
    /// With `issuer`, only tokens from that issuer (`iss`) map to the consumer — set
    /// it when several identity providers are trusted, so one provider's subjects
    /// cannot stand for another's.
    Jwt {
        subject: String,
        #[serde(default)]
        issuer: Option<String>,
    },
    /// Client certificates whose subject common name or a SAN equals `subject`.
    Mtls { subject: String },
    /// HTTP Message Signatures (RFC 9421) with HMAC-SHA256: the `keyid` and the shared
    /// secret (16 bytes or more). The secret must be kept to check signatures, so it
    /// is stored as given (not hashed).
    HmacAuth { key_id: String, secret: Secret },
}

/// A secret read from the file: shown as `<redacted>` by `Debug` and when written out.
#[derive(Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// HTTPS listeners.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Addresses to listen on with TLS.
    pub listen: Vec<String>,
    /// Certificates, chosen by SNI from the names in each certificate.
    pub certificates: Vec<Certificate>,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: Option<TlsVersion>,
    /// Ask clients for certificates, verified against a CA bundle (mutual TLS). The
    /// `mtls` policy then maps a route's callers to consumers.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// Client certificates on the TLS listeners.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca: String,
    /// `required`: the handshake fails without a valid certificate (default);
    /// `optional`: a certificate is asked for, and checked when sent.
    #[serde(default)]
    pub mode: ClientAuthMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    #[default]
    Required,
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V12,
    #[serde(rename = "1.3")]
    V13,
}

/// A certificate chain and its private key, PEM files (paths relative to the config file).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert: String,
    pub key: String,
    /// Served to clients that send no SNI or an unknown name.
    #[serde(default)]
    pub default: bool,
}

/// Admin listener settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9080".to_string()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

/// Limits enforced on every listener before routing.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest accepted request target (path and query); longer gets 414.
    #[serde(default = "default_max_uri")]
    pub max_uri_length: usize,
    /// Most request headers accepted; more gets 431 (at most 8192).
    #[serde(default = "default_max_headers")]
    #[schemars(range(min = 1, max = 8192))]
    pub max_header_count: usize,
    /// Largest total size of the request headers; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// How long a client connection may go without a request in progress (idle
    /// keep-alive, or still sending the next request's headers) before it is closed.
    #[serde(default = "default_client_idle_timeout")]
    pub client_idle_timeout: Dur,
}

fn default_client_idle_timeout() -> Dur {
    Dur::secs(30)
}

fn default_max_uri() -> usize {
    8192
}
fn default_max_headers() -> usize {
    100
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 * 1024)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uri_length: default_max_uri(),
            max_header_count: default_max_headers(),
            max_header_bytes: default_max_header_bytes(),
            client_idle_timeout: default_client_idle_timeout(),
        }
    }
}

/// Access log settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// Write one JSON line per request.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A file to append to; default: standard output.
    #[serde(default)]
    pub path: Option<String>,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: true,
            path: None,
        }
    }
}

/// Shutdown behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "default_grace")]
    pub grace: Dur,
}

fn default_grace() -> Dur {
    Dur::secs(30)
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace: default_grace(),
        }
    }
}

/// A named group of targets.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Target servers: `http://` or `https://` URLs with an optional weight (may be
    /// empty when `discovery` supplies them).
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Targets found by a discovery source, used beside `targets` and kept current
    /// without a reload.
    #[serde(default)]
    pub discovery: Option<crate::discovery::Discovery>,
    /// How a target is chosen: `weighted` (smooth weighted round robin, the default),
    /// `round_robin`, `least_connections`, `p2c_ewma`, `consistent_hash` or `random`.
    #[serde(default)]
    pub balance: Balance,
    /// For `balance: consistent_hash` (and only then): the request key hashed to pick
    /// a target, e.g. `header:x-user`, `cookie:session`, `ip`.
    #[serde(default)]
    #[schemars(schema_with = "hash_key_schema")]
    pub hash_key: Option<KeySpec>,
    /// Protocol spoken to the targets.
    #[serde(default)]
    pub protocol: Protocol,
    /// Timeouts towards the targets.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// TLS towards `https://` targets.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// Health: active checks, passive outlier detection, and what happens when no
    /// target is healthy.
    #[serde(default)]
    pub health: Health,
    /// Idle keep-alive connections kept per target.
    #[serde(default = "default_pool_max_idle")]
    pub max_idle_connections: usize,
    /// Stop sending requests to a failing upstream for a while (off when absent).
    #[serde(default)]
    pub circuit_breaker: Option<crate::resilience::CircuitBreakerConfig>,
    /// Retry failed tries on the configured conditions, within a retry budget (absent:
    /// only connect failures are tried on another target, at most 3 tries).
    #[serde(default)]
    pub retries: Option<crate::resilience::RetriesConfig>,
    /// Limit requests in flight to what the upstream handles without slowing down,
    /// learnt from latency; the excess is answered 503 (off when absent).
    #[serde(default)]
    pub adaptive_concurrency: Option<crate::resilience::AdaptiveConcurrency>,
    /// Send a second try to another target when the first is slow (idempotent
    /// requests only; off when absent).
    #[serde(default)]
    pub hedging: Option<crate::resilience::Hedging>,
}

/// The schema of `hash_key`: the shared key grammar's (`Key`) as one schema instead of
/// an `anyOf`, so that a wrong key is reported with the pattern it does not match
/// rather than as "not valid under any of the schemas".
fn hash_key_schema(gen: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let key = KeySpec::json_schema(gen).to_value();
    let pattern = key
        .pointer("/anyOf/0/pattern")
        .cloned()
        .unwrap_or_else(|| Value::String(".".into()));
    schemars::json_schema!({
        "description": key.get("description").cloned().unwrap_or(Value::Null),
        "type": ["string", "array", "null"],
        "pattern": pattern,
        "minItems": 1,
        "items": {"type": "string", "pattern": pattern}
    })
}

fn default_pool_max_idle() -> usize {
    256
}

/// One target of an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// `http://host:port` or `https://host:port` (no path).
    pub url: String,
    /// Relative share of traffic (0 takes the target out of rotation).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// How a target is chosen; docs/upstreams.md says when to use which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin (as nginx): no bursts to one target.
    #[default]
    Weighted,
    /// Plain round robin, ignoring weights.
    RoundRobin,
    /// The fewest requests in flight relative to weight; ties in weighted turns.
    LeastConnections,
    /// Power of two choices: of two random targets, the lower latency estimate
    /// (peak-sensitive, decaying) times requests in flight + 1, divided by weight.
    P2cEwma,
    /// A Maglev table over the hash of `hash_key`: the same key goes to the same target.
    ConsistentHash,
    /// Weighted random.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// ALPN on `https://` targets (h2 preferred), HTTP/1.1 on `http://`.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 (over TLS on `https://`, prior knowledge on `http://`).
    H2,
    /// HTTP/2 with prior knowledge over plain TCP.
    H2c,
}

/// Timeouts: `connect` for TCP+TLS, `request` per try until response headers,
/// `total` over every try, `idle` between body bytes, `keepalive` for unused pooled
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_connect")]
    pub connect: Dur,
    /// Per try: from the end of the request body until the response headers.
    #[serde(default = "default_request")]
    pub request: Dur,
    /// Over all tries (retries, backoff, hedges) until the response headers; none by
    /// default.
    #[serde(default)]
    pub total: Option<Dur>,
    #[serde(default = "default_idle")]
    pub idle: Dur,
    /// How long an unused keep-alive connection stays pooled (default 90s; upstream
    /// only).
    #[serde(default = "default_keepalive")]
    pub keepalive: Dur,
}

fn default_keepalive() -> Dur {
    Dur::secs(90)
}

fn default_connect() -> Dur {
    Dur::secs(5)
}
fn default_request() -> Dur {
    Dur::secs(60)
}
fn default_idle() -> Dur {
    Dur::secs(60)
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: default_connect(),
            request: default_request(),
            total: None,
            idle: default_idle(),
            keepalive: default_keepalive(),
        }
    }
}

/// Per-route timeout overrides; unset keys keep the upstream's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutOverrides {
    #[serde(default)]
    pub connect: Option<Dur>,
    #[serde(default)]
    pub request: Option<Dur>,
    #[serde(default)]
    pub total: Option<Dur>,
    #[serde(default)]
    pub idle: Option<Dur>,
}

/// TLS towards the targets of an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Verify the target's certificate (default true).
    #[serde(default = "default_true")]
    pub verify: bool,
    /// PEM bundle of CAs to trust instead of the system roots.
    #[serde(default)]
    pub ca: Option<String>,
    /// Server name to send and verify instead of the target host.
    #[serde(default)]
    pub sni: Option<String>,
    /// Client certificate for mutual TLS to the upstream.
    #[serde(default)]
    pub client_cert: Option<ClientCert>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            verify: true,
            ca: None,
            sni: None,
            client_cert: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientCert {
    pub cert: String,
    pub key: String,
}

/// Health settings of an upstream.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Probes sent to every target on a timer (off when absent).
    #[serde(default)]
    pub active: Option<crate::discovery::ActiveCheck>,
    /// Outlier detection from live traffic.
    #[serde(default)]
    pub passive: Passive,
    /// When no target is healthy: `fail` (503 at once, the default) or `panic`
    /// (spread over every target regardless of health).
    #[serde(default)]
    pub when_all_unhealthy: crate::discovery::AllUnhealthy,
}

/// Passive health (outlier detection): a target that fails repeatedly on live traffic
/// is ejected for `ejection_time` × the number of times it was ejected (at most
/// `max_ejection_time`); at most `max_ejected_percent` of the targets at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive connect failures (refused, reset before an answer) that eject.
    #[serde(default = "default_failures")]
    pub consecutive_failures: u32,
    /// Consecutive 5xx answers that eject (0: off, the default).
    #[serde(default)]
    pub consecutive_5xx: u32,
    /// Consecutive timeouts (connect or answer) that eject (0: off, the default).
    #[serde(default)]
    pub consecutive_timeouts: u32,
    /// The first ejection's length; each further one is longer by as much.
    #[serde(default = "default_ejection")]
    pub ejection_time: Dur,
    /// The longest ejection (default 5m).
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: Dur,
    /// At most this share of the targets is ejected at once (default 50; one target
    /// may always be ejected).
    #[serde(default = "default_max_ejected")]
    pub max_ejected_percent: u32,
}

fn default_max_ejection() -> Dur {
    Dur::secs(300)
}
fn default_max_ejected() -> u32 {
    50
}

fn default_failures() -> u32 {
    3
}
fn default_ejection() -> Dur {
    Dur::secs(10)
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            enabled: true,
            consecutive_failures: default_failures(),
            consecutive_5xx: 0,
            consecutive_timeouts: 0,
            ejection_time: default_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejected_percent: default_max_ejected(),
        }
    }
}

/// A route: which requests it takes and where they go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name, used in logs, metrics and the admin API.
    pub name: String,
    /// Host names (exact, or a leading wildcard `*.example.org`); empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path patterns: `/exact`, `/users/{id}`, `/static/*` (prefix) or `~regex`.
    pub paths: Vec<String>,
    /// Allowed methods; empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, Scalar>,
    /// The upstream to proxy to.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Instead of `upstream`: several upstreams sharing the route's requests by weight
    /// (canary releases, A/B tests).
    #[serde(default)]
    pub upstreams: Vec<crate::split::WeightedUpstream>,
    /// How `upstreams` are assigned: sticky key, override header or cookie.
    #[serde(default)]
    pub split: Option<crate::split::Split>,
    /// Send copies of requests to another upstream (and optionally compare answers).
    #[serde(default)]
    pub mirror: Option<crate::split::Mirror>,
    /// Instead of an upstream: calls to several upstreams combined into one JSON
    /// answer.
    #[serde(default)]
    pub aggregate: Option<crate::aggregate::Aggregate>,
    /// For `/*` paths: drop the matched prefix before proxying.
    #[serde(default)]
    pub strip_prefix: bool,
    /// New upstream path; may use `{param}` captures.
    #[serde(default)]
    pub rewrite: Option<String>,
    /// Send the client's `Host` to the upstream instead of the target's.
    #[serde(default)]
    pub preserve_host: bool,
    /// Higher wins among routes of equal host and path specificity.
    #[serde(default)]
    pub priority: i32,
    /// Overrides of the upstream's timeouts for this route.
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    /// Replaces the upstream's `retries` for this route (the retry budget stays the
    /// upstream's: its `budget` settings are used only when the upstream has none).
    #[serde(default)]
    pub retries: Option<crate::resilience::RetriesConfig>,
    /// Policies on this route; an entry replaces the global one of the same name.
    #[serde(default)]
    pub plugins: BTreeMap<String, Value>,
}

/// A string, number or boolean written in YAML, used as a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(transparent)]
pub struct Scalar(#[schemars(with = "ScalarSchema")] pub String);

#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum ScalarSchema {
    S(String),
    N(f64),
    B(bool),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Scalar(s)),
            Value::Number(n) => Ok(Scalar(n.to_string())),
            Value::Bool(b) => Ok(Scalar(b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a string, number or boolean, found {other}"
            ))),
        }
    }
}
