//! etcd discovery through etcd v3's JSON gateway: every key under `prefix` is one
//! target. A session lists the prefix (`/v3/kv/range`), publishes what it found, then
//! watches it from the next revision (`/v3/watch`) and applies PUT and DELETE events
//! as they come. When the watch ends (etcd restarted, history compacted, connection
//! lost) the prefix is listed again. While no endpoint answers, the last known targets
//! stay in use and the endpoints are tried in turn, with backoff after a full round.
//!
//! Unlike DNS, etcd is authoritative: a prefix with no keys means no discovered
//! targets.

mod gateway;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use portico_config::discovery::{DiscoveredScheme, Etcd};
use serde::Deserialize;
use serde_json::json;

use super::{endpoint, Backoff};
use crate::{Endpoint, Live};

/// A watch that sends nothing (not even a progress notification, asked for every
/// ten minutes by etcd's default) for this long is taken for a dead connection.
const WATCH_IDLE: Duration = Duration::from_secs(11 * 60);

/// A watch that ended sooner than this after the list is retried with backoff.
const SHORT_WATCH: Duration = Duration::from_secs(5);

/// Run the etcd source of upstream `name` until aborted.
pub async fn run(
    name: Arc<str>,
    cfg: Etcd,
    scheme: DiscoveredScheme,
    weight: u32,
    live: Arc<Live>,
) {
    if cfg.endpoints.is_empty() {
        live.discovery_failed("no etcd endpoint configured");
        return;
    }
    let n = cfg.endpoints.len();
    let mut i = 0;
    let mut backoff = Backoff::default();
    let mut failing = false;
    loop {
        let ep = &cfg.endpoints[i % n];
        let src = Source {
            upstream: &name,
            cfg: &cfg,
            endpoint: ep,
            scheme,
            weight,
        };
        match src.session(&live, &mut failing).await {
            Ended::Unreachable(e) => {
                if failing {
                    tracing::debug!(upstream = %name, etcd = %ep, "etcd discovery still failing: {e}");
                } else {
                    tracing::warn!(upstream = %name, etcd = %ep, "etcd discovery failed, keeping the last known targets: {e}");
                }
                failing = true;
                live.discovery_failed(&format!("{ep}: {e}"));
                i += 1;
                if i % n == 0 {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
            Ended::Watch { reason, lasted } => {
                tracing::info!(upstream = %name, etcd = %ep, "etcd watch ended ({reason}); listing again");
                if lasted < SHORT_WATCH {
                    tokio::time::sleep(backoff.next_delay()).await;
                } else {
                    backoff.reset();
                }
            }
        }
    }
}

/// How a session ended.
enum Ended {
    /// Authentication or the list failed: nothing was learnt.
    Unreachable(String),
    /// The list succeeded and the watch then ended.
    Watch { reason: String, lasted: Duration },
}

struct Source<'a> {
    upstream: &'a str,
    cfg: &'a Etcd,
    endpoint: &'a str,
    scheme: DiscoveredScheme,
    weight: u32,
}

impl Source<'_> {
    /// Authenticate, list, publish, watch until the watch ends.
    async fn session(&self, live: &Live, failing: &mut bool) -> Ended {
        let ep = self.endpoint;
        let token = match (&self.cfg.username, &self.cfg.password) {
            (Some(u), Some(p)) => {
                let body = json!({"name": u, "password": p});
                match gateway::call(ep, "/v3/auth/authenticate", &body, None).await {
                    Ok(v) => match v.get("token").and_then(|t| t.as_str()) {
                        Some(t) => Some(t.to_string()),
                        None => {
                            return Ended::Unreachable("authentication returned no token".into())
                        }
                    },
                    Err(e) => return Ended::Unreachable(format!("authenticating: {e}")),
                }
            }
            _ => None,
        };
        let token = token.as_deref();
        let key = self.cfg.prefix.as_bytes();
        let end = range_end(key);
        let range = json!({"key": B64.encode(key), "range_end": B64.encode(&end)});
        let listed: RangeResponse = match gateway::call(ep, "/v3/kv/range", &range, token).await {
            Ok(v) => match serde_json::from_value(v) {
                Ok(r) => r,
                Err(e) => return Ended::Unreachable(format!("the list answer is not etcd's: {e}")),
            },
            Err(e) => return Ended::Unreachable(e),
        };
        let mut targets = Targets::default();
        for kv in &listed.kvs {
            if let Err((key, m)) = put(&mut targets, kv, self.scheme, self.weight) {
                self.bad_value(&key, &m);
            }
        }
        if *failing {
            tracing::info!(upstream = %self.upstream, etcd = %ep, targets = targets.len(), "etcd discovery answers again");
            *failing = false;
        }
        live.set_discovered(targets.endpoints());
        let started = Instant::now();
        let revision = listed.header.map(|h| h.revision).unwrap_or(0);
        let reason = self
            .watch(live, &mut targets, &end, revision + 1, token)
            .await;
        Ended::Watch {
            reason,
            lasted: started.elapsed(),
        }
    }

    /// Watch from `start`, applying events, until the watch ends; why it did.
    async fn watch(
        &self,
        live: &Live,
        targets: &mut Targets,
        end: &[u8],
        start: i64,
        token: Option<&str>,
    ) -> String {
        let create = json!({"create_request": {
            "key": B64.encode(self.cfg.prefix.as_bytes()),
            "range_end": B64.encode(end),
            "start_revision": start,
            "progress_notify": true,
        }});
        let mut body = match gateway::post(self.endpoint, "/v3/watch", &create, token).await {
            Ok(r) => r.into_body(),
            Err(e) => return e,
        };
        let mut stream = gateway::JsonStream::default();
        loop {
            let chunk = match tokio::time::timeout(WATCH_IDLE, gateway::next_chunk(&mut body)).await
            {
                Err(_) => return format!("nothing received for {WATCH_IDLE:?}"),
                Ok(Err(e)) => return format!("connection lost: {e}"),
                Ok(Ok(None)) => return "etcd closed the watch".into(),
                Ok(Ok(Some(c))) => c,
            };
            let messages = match stream.push(&chunk) {
                Ok(m) => m,
                Err(e) => return e,
            };
            for m in messages {
                let msg: WatchMessage = match serde_json::from_value(m) {
                    Ok(m) => m,
                    Err(e) => return format!("a watch message is not etcd's: {e}"),
                };
                let Some(result) = msg.result else {
                    let e = msg.error.unwrap_or_default();
                    let m = e
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string);
                    return format!(
                        "etcd reported an error: {}",
                        m.unwrap_or_else(|| e.to_string())
                    );
                };
                if result.canceled {
                    return if result.compact_revision > 0 {
                        format!(
                            "history compacted up to revision {}",
                            result.compact_revision
                        )
                    } else {
                        format!("watch canceled: {}", result.cancel_reason)
                    };
                }
                if result.events.is_empty() {
                    continue;
                }
                for (key, m) in apply(targets, &result.events, self.scheme, self.weight) {
                    self.bad_value(&key, &m);
                }
                live.set_discovered(targets.endpoints());
            }
        }
    }

    fn bad_value(&self, key: &str, m: &str) {
        tracing::warn!(upstream = %self.upstream, key = %key, "etcd discovery: skipping a bad value: {m}");
    }
}

/// Apply a PUT (or a listed key): a bad value drops the key's target. `Err`: the key
/// and what is wrong with its value.
fn put(
    targets: &mut Targets,
    kv: &Kv,
    scheme: DiscoveredScheme,
    weight: u32,
) -> Result<(), (String, String)> {
    let key = kv.key_bytes();
    match kv
        .value_bytes()
        .and_then(|v| parse_value(&v, scheme, weight))
    {
        Ok(e) => {
            targets.put(key, e);
            Ok(())
        }
        Err(m) => {
            let name = String::from_utf8_lossy(&key).into_owned();
            targets.remove(&key);
            Err((name, m))
        }
    }
}

/// Apply watch events in order; the bad values met (key, problem).
fn apply(
    targets: &mut Targets,
    events: &[Event],
    scheme: DiscoveredScheme,
    weight: u32,
) -> Vec<(String, String)> {
    let mut bad = Vec::new();
    for ev in events {
        let Some(kv) = &ev.kv else { continue };
        if ev.kind.as_deref() == Some("DELETE") {
            targets.remove(&kv.key_bytes());
        } else if let Err(b) = put(targets, kv, scheme, weight) {
            bad.push(b);
        }
    }
    bad
}

/// The end of the range of keys starting with `prefix` (etcd's prefix + 1).
pub(crate) fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: every key from `prefix` on.
    vec![0]
}

/// A key's value: `host:port`, a URL, or `{"url": "...", "weight": N}`.
pub(crate) fn parse_value(
    raw: &[u8],
    scheme: DiscoveredScheme,
    weight: u32,
) -> Result<Endpoint, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "the value is not UTF-8".to_string())?;
    let text = text.trim();
    if text.starts_with('{') {
        #[derive(Deserialize)]
        struct Value {
            url: String,
            weight: Option<u32>,
        }
        let v: Value = serde_json::from_str(text).map_err(|e| format!("`{text}`: {e}"))?;
        return target(&v.url, scheme, v.weight.unwrap_or(weight));
    }
    target(text, scheme, weight)
}

/// `http[s]://host[:port]` or `host:port` as an endpoint.
fn target(s: &str, scheme: DiscoveredScheme, weight: u32) -> Result<Endpoint, String> {
    if s.contains("://") {
        let uri = portico_config::load::check_target_url(s)?;
        let scheme = match uri.scheme_str() {
            Some("https") => DiscoveredScheme::Https,
            _ => DiscoveredScheme::Http,
        };
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(match scheme {
            DiscoveredScheme::Https => 443,
            DiscoveredScheme::Http => 80,
        });
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("`{s}`: user information is not allowed"));
        }
        return Ok(endpoint(scheme, host, port, weight, None));
    }
    let a: http::uri::Authority = s
        .parse()
        .map_err(|_| format!("`{s}` is neither `host:port` nor a URL"))?;
    let port = a
        .port_u16()
        .ok_or_else(|| format!("`{s}` has no port (`host:port`)"))?;
    if a.host().is_empty() || a.as_str().contains('@') {
        return Err(format!("`{s}` is neither `host:port` nor a URL"));
    }
    Ok(endpoint(scheme, a.host(), port, weight, None))
}

/// The targets known, by key.
#[derive(Debug, Default)]
pub(crate) struct Targets(BTreeMap<Vec<u8>, Endpoint>);

impl Targets {
    pub fn put(&mut self, key: Vec<u8>, e: Endpoint) {
        self.0.insert(key, e);
    }
    pub fn remove(&mut self, key: &[u8]) {
        self.0.remove(key);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.0.values().cloned().collect()
    }
}

/// etcd's int64 fields come as JSON strings.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(i64),
    }
    match N::deserialize(d)? {
        N::N(n) => Ok(n),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Debug, Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

impl Kv {
    fn key_bytes(&self) -> Vec<u8> {
        B64.decode(&self.key)
            .unwrap_or_else(|_| self.key.as_bytes().to_vec())
    }
    fn value_bytes(&self) -> Result<Vec<u8>, String> {
        B64.decode(&self.value)
            .map_err(|_| "the value is not base64 (not etcd's answer?)".into())
    }
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    header: Option<Header>,
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Debug, Deserialize)]
struct Event {
    /// `PUT` (usually left out, being the default) or `DELETE`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    kv: Option<Kv>,
}

#[derive(Debug, Deserialize)]
struct WatchResult {
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct WatchMessage {
    result: Option<WatchResult>,
    error: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests;
