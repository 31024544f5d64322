//! Portico's upstreams.
//!
//! Owns: compiled upstreams (targets, balancing schedule, timeouts), passive health,
//! and pooled HTTP/1.1 + HTTP/2 clients (plain and TLS). The state that must outlive a
//! configuration snapshot (clients and connection pools, target health) lives in
//! [`UpstreamState`], keyed by upstream name and target URL.
//!
//! Does not own: sending a request through the pipeline (`portico-proxy`) or active
//! health checks and discovery (planned, see docs/design.md).
#![forbid(unsafe_code)]

pub mod balance;
pub mod client;
pub mod health;

use std::collections::HashMap;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use parking_lot::Mutex;
use portico_config::model::{Balance, Passive, Timeouts, Upstream as UpstreamConfig};

pub use balance::Schedule;
pub use client::{ClientError, ConnectTimeout, HttpClient};
pub use health::{now_ms, TargetHealth};

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
}

/// A compiled upstream, part of a snapshot.
pub struct Upstream {
    pub name: Arc<str>,
    pub targets: Vec<Target>,
    pub schedule: Schedule,
    pub timeouts: Timeouts,
    pub passive: Passive,
    pub client: HttpClient,
}

impl Upstream {
    /// Pick the next available target, skipping `exclude` (already tried) and ejected ones.
    pub fn pick(&self, exclude: &[usize]) -> Option<usize> {
        let now = now_ms();
        self.schedule
            .pick(|i| !exclude.contains(&i) && self.targets[i].health.available(now))
    }

    /// Record a connect failure on target `i` (passive health).
    pub fn connect_failed(&self, i: usize) {
        let p = &self.passive;
        if !p.enabled {
            return;
        }
        if self.targets[i].health.failure(
            now_ms(),
            p.consecutive_failures,
            p.ejection_time.0.as_millis() as u64,
        ) {
            tracing::warn!(upstream = %self.name, target = %self.targets[i].url, ejection = %p.ejection_time, "target ejected after consecutive connect failures");
        }
    }
}

/// What a client is built from: the settings (without targets) and the contents of the
/// files they name (CA bundle, client certificate and key), so that a reload after
/// replacing a file builds a new client.
#[derive(Clone, PartialEq)]
struct ClientKey(UpstreamConfig, Vec<Option<Vec<u8>>>);

/// State that outlives snapshots: clients (with their pools) and target health.
#[derive(Default)]
pub struct UpstreamState {
    clients: Mutex<HashMap<String, (ClientKey, HttpClient)>>,
    health: Mutex<HashMap<(String, String), Arc<TargetHealth>>>,
}

/// A problem compiling an upstream, with the config keys below `upstreams.NAME` it concerns.
#[derive(Debug)]
pub struct CompileError {
    pub key: Vec<String>,
    pub message: String,
}

impl UpstreamState {
    /// Compile an upstream, reusing its client and target health when unchanged.
    pub fn compile(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Result<Upstream, CompileError> {
        let mut targets = Vec::with_capacity(cfg.targets.len());
        for (i, t) in cfg.targets.iter().enumerate() {
            let uri = portico_config::load::check_target_url(&t.url).map_err(|m| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: m,
            })?;
            let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            let authority = uri.authority().cloned().ok_or_else(|| CompileError {
                key: vec!["targets".into(), i.to_string(), "url".into()],
                message: format!("`{}` has no host", t.url),
            })?;
            let host_header =
                HeaderValue::from_str(authority.as_str()).map_err(|_| CompileError {
                    key: vec!["targets".into(), i.to_string(), "url".into()],
                    message: format!("`{}` is not a valid host", t.url),
                })?;
            let health = self
                .health
                .lock()
                .entry((name.to_string(), t.url.clone()))
                .or_default()
                .clone();
            targets.push(Target {
                url: t.url.as_str().into(),
                scheme,
                authority,
                host_header,
                weight: t.weight,
                health,
            });
        }
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let schedule = match cfg.balance {
            Balance::Weighted => Schedule::weighted(&weights),
            Balance::RoundRobin => Schedule::round_robin(&weights),
        };
        let client = self.client_for(name, cfg, resolve)?;
        Ok(Upstream {
            name: name.into(),
            targets,
            schedule,
            timeouts: cfg.timeouts,
            passive: cfg.health.passive,
            client,
        })
    }

    /// The pooled client for `name` with these settings (shared while they are unchanged).
    pub fn client_for(
        &self,
        name: &str,
        cfg: &UpstreamConfig,
        resolve: &dyn Fn(&str) -> std::path::PathBuf,
    ) -> Result<HttpClient, CompileError> {
        // Targets and weights do not affect the client; everything else does.
        let mut key_cfg = cfg.clone();
        key_cfg.targets.clear();
        let tls = &cfg.tls;
        let files = [
            tls.ca.as_deref(),
            tls.client_cert.as_ref().map(|c| c.cert.as_str()),
            tls.client_cert.as_ref().map(|c| c.key.as_str()),
        ]
        .iter()
        .map(|f| f.and_then(|f| std::fs::read(resolve(f)).ok()))
        .collect();
        let key = ClientKey(key_cfg, files);
        let mut clients = self.clients.lock();
        if let Some((k, c)) = clients.get(name) {
            if *k == key {
                return Ok(c.clone());
            }
        }
        let c = client::build(cfg, resolve).map_err(|e| CompileError {
            key: e.key.iter().map(|s| s.to_string()).collect(),
            message: e.message,
        })?;
        clients.insert(name.to_string(), (key, c.clone()));
        Ok(c)
    }

    /// Forget state of upstreams and targets that are no longer configured.
    pub fn retain(&self, live: &[(String, Vec<String>)]) {
        self.clients.lock().retain(|n, _| {
            let base = n.split_once('#').map_or(n.as_str(), |(b, _)| b);
            live.iter().any(|(u, _)| u == base)
        });
        self.health.lock().retain(|(u, t), _| {
            live.iter()
                .any(|(lu, ts)| lu == u && ts.iter().any(|x| x == t))
        });
    }
}
