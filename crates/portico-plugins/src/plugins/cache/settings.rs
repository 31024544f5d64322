//! The settings of `cache` (docs/traffic.md#response-caching lists them for users).

use portico_config::units::{ByteSize, Dur};
use schemars::JsonSchema;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Keep entries in this gateway's memory (the default: `{max_size: 64MiB}`).
    #[serde(default)]
    pub memory: Option<MemorySettings>,
    /// Keep entries in Redis, shared by every gateway that names it.
    #[serde(default)]
    pub redis: Option<RedisSettings>,
    /// How long a response that says nothing about its freshness (no `max-age`,
    /// `s-maxage` or `Expires`) is fresh. Default `60s`; `0s` stores only responses
    /// that say.
    #[serde(default)]
    pub default_ttl: Option<Dur>,
    /// Methods whose responses are cached (default `[GET, HEAD]`).
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Statuses that are cached (default `[200, 203, 204, 301, 404, 410]`).
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
    /// Larger responses stream through without being stored (default `1MiB`).
    #[serde(default)]
    pub max_object_size: Option<ByteSize>,
    /// Request headers whose values are part of the key (e.g. `Accept-Language`).
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// The consumer is part of the key (needs `cache_authenticated: true`).
    #[serde(default)]
    pub per_consumer: bool,
    /// Cache responses to authenticated requests (a consumer, or an `Authorization`
    /// header). Default false: they bypass the cache.
    #[serde(default)]
    pub cache_authenticated: bool,
    /// Store responses with `Set-Cookie` (and replay the cookie). Default false.
    #[serde(default)]
    pub cache_set_cookie: bool,
    /// Honour the client's `Cache-Control`: `no-store` bypasses the cache, `no-cache`
    /// (or `max-age=0`, `Pragma: no-cache`) fetches from the upstream and stores the
    /// answer. Default false: the client's directives are ignored.
    #[serde(default)]
    pub respect_client_no_cache: bool,
    /// How long past freshness an entry is served while it is refreshed in the
    /// background, when the response has no `stale-while-revalidate`. Default `0s`.
    #[serde(default)]
    pub stale_while_revalidate: Option<Dur>,
    /// How long past freshness an entry is served when the upstream fails or answers
    /// `5xx`, when the response has no `stale-if-error`. Default `0s`.
    #[serde(default)]
    pub stale_if_error: Option<Dur>,
    /// Concurrent misses of one key make one upstream request (default true).
    #[serde(default)]
    pub coalesce: Option<bool>,
    /// How long a coalesced request waits for the first one's answer before going
    /// upstream itself (default `5s`).
    #[serde(default)]
    pub coalesce_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// The most bytes entries take (bodies, headers and keys); least recently used
    /// entries are evicted past it. Default `64MiB`.
    #[serde(default)]
    pub max_size: Option<ByteSize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// How long a lookup or store waits for Redis (default `100ms`); past it, a miss.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Prefix of the keys in Redis (default `portico:cache:`).
    #[serde(default)]
    pub prefix: Option<String>,
}
