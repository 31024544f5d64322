//! `concurrency-limit`: at most `max` requests in flight per key (`route` by default);
//! more wait in a bounded queue for a bounded time, then get `503
//! concurrency_limited`. A request is in flight from its admission until its response
//! body ended (or the client went away): the permit lives in the request's `Ctx`,
//! which the gateway drops once the exchange is logged.
//!
//! The counts live in the gateway's `PolicyState`, so a reload that keeps the settings
//! keeps counting the requests already in flight.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use parking_lot::Mutex;
use portico_config::grammar::{KeyPart, KeySpec};
use portico_config::units::Dur;
use portico_config::KeyPath;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::Body;
use crate::ctx::Ctx;
use crate::error::{ErrorKind, GatewayError};
use crate::policy::{Flow, Policy, Step};
use crate::registry::{BuildEnv, SettingsErrors};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Requests in flight at once per key.
    pub max: u32,
    /// What is counted separately (the key grammar; default `route`).
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// Requests over `max` that may wait for a slot. Default: none wait.
    #[serde(default)]
    pub queue: Option<QueueSettings>,
    /// How many keys are tracked at once at most (default 10000); a request of a new
    /// key past it is refused.
    #[serde(default)]
    pub max_keys: Option<usize>,
    /// The message of the `503` answer. Default: "too many requests in flight".
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// How many requests may wait per key.
    pub size: u32,
    /// How long one waits at most (default 1s).
    #[serde(default = "default_wait")]
    pub timeout: Dur,
}

fn default_wait() -> Dur {
    Dur(Duration::from_secs(1))
}

const SHARDS: usize = 16;
const DEFAULT_MAX_KEYS: usize = 10_000;

type Shard = Mutex<HashMap<Box<str>, Arc<Slot>>>;

/// One key's permits and waiters.
struct Slot {
    sem: Arc<Semaphore>,
    waiting: AtomicU32,
}

/// Every key's slot, sharded; kept across reloads.
struct Slots {
    max: u32,
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    rejected: AtomicU64,
}

impl Slots {
    fn slot(&self, key: &str) -> Option<Arc<Slot>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut map = self.shards[i].lock();
        if let Some(s) = map.get(key) {
            return Some(s.clone());
        }
        if map.len() >= self.per_shard {
            // Slots only the map holds have nothing in flight and nobody waiting.
            map.retain(|_, s| Arc::strong_count(s) > 1);
            if map.len() >= self.per_shard {
                return None;
            }
        }
        let s = Arc::new(Slot {
            sem: Arc::new(Semaphore::new(self.max as usize)),
            waiting: AtomicU32::new(0),
        });
        map.insert(key.into(), s.clone());
        Some(s)
    }
}

/// A request in flight: dropped with the request's `Ctx` at the end of the exchange.
#[derive(Clone)]
struct Held(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, Arc<Slot>)>);

/// Counts a waiter until dropped (also when the client goes away while waiting).
struct Waiting<'a>(&'a Slot);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct ConcurrencyLimit {
    key: KeySpec,
    queue: u32,
    wait: Duration,
    slots: Arc<Slots>,
    message: String,
    scope: Arc<str>,
}

impl ConcurrencyLimit {
    pub fn new(s: Settings, env: &BuildEnv) -> Result<Self, SettingsErrors> {
        let mut errs: SettingsErrors = Vec::new();
        let root = KeyPath::root();
        if s.max == 0 {
            errs.push((root.key("max"), "must be at least 1".into()));
        }
        let max_keys = s.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            errs.push((root.key("max_keys"), "must be at least 1".into()));
        }
        let (queue, wait) = match &s.queue {
            Some(q) => {
                if q.timeout.0.is_zero() {
                    errs.push((
                        root.key("queue").key("timeout"),
                        "must be more than 0".into(),
                    ));
                }
                (q.size, q.timeout.0)
            }
            None => (0, Duration::ZERO),
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let key = s.key.unwrap_or_else(|| KeySpec(vec![KeyPart::Route]));
        let key_text = serde_json::to_string(&key).unwrap_or_default();
        let slots = env.state.get_or_insert(
            &format!(
                "concurrency-limit/{}/{}/{key_text}/{max_keys}",
                env.scope, s.max
            ),
            || Slots {
                max: s.max,
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                per_shard: max_keys.div_ceil(SHARDS),
                hasher: Default::default(),
                rejected: AtomicU64::new(0),
            },
        );
        Ok(ConcurrencyLimit {
            key,
            queue,
            wait,
            slots,
            message: s
                .message
                .unwrap_or_else(|| "too many requests in flight".into()),
            scope: env.scope.clone(),
        })
    }

    fn refuse(&self) -> Flow {
        self.slots.rejected.fetch_add(1, Ordering::Relaxed);
        Flow::Error(GatewayError::new(
            ErrorKind::ConcurrencyLimited,
            self.message.clone(),
        ))
    }
}

impl Policy for ConcurrencyLimit {
    fn name(&self) -> &'static str {
        "concurrency-limit"
    }

    fn on_request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Request<Body>) -> Step<'a> {
        let key = ctx
            .key_of(req, &self.key)
            .unwrap_or_else(|| format!("\u{0}ip:{}", ctx.client_ip));
        let Some(slot) = self.slots.slot(&key) else {
            return Step::Ready(Some(self.refuse()));
        };
        if let Ok(p) = slot.sem.clone().try_acquire_owned() {
            ctx.extensions.insert(Held(Arc::new((p, slot))));
            return Step::cont();
        }
        if slot.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue {
            slot.waiting.fetch_sub(1, Ordering::Relaxed);
            return Step::Ready(Some(self.refuse()));
        }
        Step::Pending(Box::pin(async move {
            let acquired = {
                let _waiting = Waiting(&slot);
                tokio::time::timeout(self.wait, slot.sem.clone().acquire_owned()).await
            };
            match acquired {
                Ok(Ok(p)) => {
                    ctx.extensions.insert(Held(Arc::new((p, slot))));
                    Flow::Continue
                }
                _ => self.refuse(),
            }
        }))
    }

    fn metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let scope = self.scope.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP portico_concurrency_limit_rejected_total Requests refused by concurrency-limit.\n# TYPE portico_concurrency_limit_rejected_total counter\nportico_concurrency_limit_rejected_total{{scope=\"{scope}\"}} {}",
            self.slots.rejected.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(json: serde_json::Value, env: &BuildEnv) -> ConcurrencyLimit {
        ConcurrencyLimit::new(crate::registry::parse(&json).unwrap(), env).unwrap()
    }

    fn ctx() -> Ctx {
        Ctx::new(
            "rid".into(),
            "192.0.2.1".parse().unwrap(),
            "r".into(),
            "/".into(),
            Default::default(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_queue_then_refusal() {
        let env = BuildEnv::default();
        let p = policy(
            serde_json::json!({"max": 1, "queue": {"size": 1, "timeout": "2s"}}),
            &env,
        );
        let mut req = Request::new(Body::default());
        let mut first = ctx();
        assert!(matches!(
            p.on_request(&mut first, &mut req).await,
            Flow::Continue
        ));
        // The second waits; the third finds the queue full.
        let mut second = ctx();
        let mut req2 = Request::new(Body::default());
        let waiting = p.on_request(&mut second, &mut req2);
        let mut third = ctx();
        match p.on_request(&mut third, &mut req).await {
            Flow::Error(e) => assert_eq!(e.kind, ErrorKind::ConcurrencyLimited),
            _ => panic!("expected a refusal"),
        }
        // The first ends: the second gets its slot.
        let release = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(first);
        };
        let (flow, ()) = tokio::join!(waiting, release);
        assert!(matches!(flow, Flow::Continue));
        // A waiter that runs out of time is refused.
        let mut fourth = ctx();
        match p.on_request(&mut fourth, &mut req).await {
            Flow::Error(e) => assert_eq!(e.kind, ErrorKind::ConcurrencyLimited),
            _ => panic!("expected a refusal after the wait"),
        }
        drop(second);
        let mut fifth = ctx();
        assert!(matches!(
            p.on_request(&mut fifth, &mut req).await,
            Flow::Continue
        ));
    }

    #[test]
    fn settings_errors() {
        let errs = ConcurrencyLimit::new(
            crate::registry::parse(
                &serde_json::json!({"max": 0, "queue": {"size": 1, "timeout": "0s"}}),
            )
            .unwrap(),
            &BuildEnv::default(),
        )
        .err()
        .unwrap();
        let got: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
        assert_eq!(
            got,
            [
                "max: must be at least 1",
                "queue.timeout: must be more than 0"
            ]
        );
    }
}
