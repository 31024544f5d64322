//! The gateway's `quota` policies, for the admin API (read and reset usage) and for
//! saving local counts to the store: every second in the background, and once more
//! when the gateway shuts down ([`Registry::flush`]).
//!
//! The registry lives in the gateway's [`PolicyState`] under [`KEY`], alive while a
//! `quota` policy is; it holds the policies weakly, by scope (the newest build of a
//! scope wins, so a reload shows each scope once).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use portico_store::Identity;
use serde::Serialize;

use super::{cluster, Backend, Shared};
use crate::registry::BuildEnv;
use crate::state::PolicyState;

/// Where the registry is kept in [`PolicyState`].
pub const KEY: &str = "quota-registry";

/// How often local counts are saved.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub struct Registry {
    identity: Arc<Identity>,
    scopes: Mutex<HashMap<Arc<str>, Weak<Shared>>>,
    /// Held while saving or resetting, so a reset is never undone by a save that
    /// read the counts before it.
    saving: Mutex<()>,
}

/// What a key used of one limit in the current period (the admin API's rows).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub scope: String,
    pub key: String,
    pub limit: String,
    /// `requests` or `bytes`.
    pub unit: &'static str,
    pub per: &'static str,
    /// The limit's amount.
    pub quota: u64,
    pub used: u64,
    pub remaining: u64,
    /// RFC 3339, UTC.
    pub period_start: String,
    pub period_end: String,
}

/// The gateway's registry, if a `quota` policy is configured.
pub fn registry(state: &PolicyState) -> Option<Arc<Registry>> {
    state.get::<Registry>(KEY)
}

/// The registry of `env`'s gateway, made (and its saving started) on first use.
pub(crate) fn obtain(env: &BuildEnv) -> Arc<Registry> {
    env.state.get_or_insert(KEY, || {
        let r = Registry {
            identity: env.identity.clone(),
            scopes: Mutex::default(),
            saving: Mutex::default(),
        };
        if env.identity.store().is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let weak = Arc::downgrade(&env.state);
                rt.spawn(save_loop(weak));
            }
        }
        r
    })
}

async fn save_loop(state: Weak<PolicyState>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(r) = state.upgrade().and_then(|s| registry(&s)) else {
            return;
        };
        if tokio::task::spawn_blocking(move || r.flush())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn rfc3339(t: i64) -> String {
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |t| t.to_string())
}

impl Registry {
    pub(crate) fn register(&self, s: &Arc<Shared>) {
        let mut m = self.scopes.lock();
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(s.scope.clone(), Arc::downgrade(s));
    }

    fn live(&self) -> Vec<Arc<Shared>> {
        let mut v: Vec<Arc<Shared>> = self
            .scopes
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        v.sort_by(|a, b| a.scope.cmp(&b.scope));
        v
    }

    /// Save the local counts changed since the last save (blocking: SQLite).
    pub fn flush(&self) {
        let Some(store) = self.identity.store() else {
            return;
        };
        let _g = self.saving.lock();
        for s in self.live() {
            let Backend::Local(counts) = &s.backend else {
                continue;
            };
            let now = s.clock.now_secs();
            let rows = counts.take_dirty(now);
            if rows.is_empty() {
                continue;
            }
            if let Err(e) = store.save_quota_rows(&rows, now) {
                counts.restore_dirty(&rows);
                tracing::error!(error = %e, scope = %s.scope, "quota: cannot save the counts; trying again in a second");
            }
        }
    }

    /// The current usage, optionally of one scope and/or one key, sorted by scope,
    /// key and limit.
    pub async fn usage(
        &self,
        scope: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<Usage>, String> {
        let mut out = Vec::new();
        for s in self.live() {
            if scope.is_some_and(|x| x != &*s.scope) {
                continue;
            }
            let now = s.clock.now_secs();
            let periods = s.periods(now);
            let mut push = |i: usize, k: &str, used: u64| {
                let (Some(l), Some((start, end))) = (s.limits.get(i), periods.get(i)) else {
                    return;
                };
                out.push(Usage {
                    scope: s.scope.to_string(),
                    key: k.to_string(),
                    limit: l.name.clone(),
                    unit: l.unit(),
                    per: l.per.as_str(),
                    quota: l.amount,
                    used,
                    remaining: l.amount.saturating_sub(used),
                    period_start: rfc3339(*start),
                    period_end: rfc3339(*end),
                });
            };
            match &s.backend {
                Backend::Local(counts) => {
                    for (k, name, c) in counts.usage(now) {
                        if key.is_some_and(|x| x != k) {
                            continue;
                        }
                        let Some(i) = s.limits.iter().position(|l| *l.name == *name) else {
                            continue;
                        };
                        if periods.get(i).is_some_and(|(start, _)| *start == c.start) {
                            push(i, &k, c.used);
                        }
                    }
                }
                Backend::Cluster { store, prefix, .. } => {
                    for (i, l) in s.limits.iter().enumerate() {
                        let Some((start, _)) = periods.get(i) else {
                            continue;
                        };
                        let p = format!("{prefix}{}:{start}:{}", l.name, key.unwrap_or(""));
                        let found = cluster::scan(store, &p)
                            .await
                            .map_err(|e| format!("Redis: {e}"))?;
                        for (rest, used) in found {
                            match key {
                                Some(k) if rest.is_empty() => push(i, k, used),
                                Some(_) => {}
                                None => push(i, &rest, used),
                            }
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.scope, &a.key, &a.limit).cmp(&(&b.scope, &b.key, &b.limit)));
        Ok(out)
    }

    /// Forget what `key` used in `scope` (every limit, the current period); whether
    /// there was anything to forget.
    pub async fn reset(self: Arc<Self>, scope: &str, key: &str) -> Result<bool, String> {
        let Some(s) = self.live().into_iter().find(|s| &*s.scope == scope) else {
            return Ok(false);
        };
        let now = s.clock.now_secs();
        match &s.backend {
            Backend::Local(_) => {
                let (scope, key) = (scope.to_string(), key.to_string());
                let this = self.clone();
                tokio::task::spawn_blocking(move || {
                    let _g = this.saving.lock();
                    let Backend::Local(counts) = &s.backend else {
                        return Ok(false);
                    };
                    let in_memory = counts.reset(&key, now);
                    let saved = match this.identity.store() {
                        Some(store) => store
                            .delete_quota_rows(&scope, &key)
                            .map_err(|e| e.to_string())?,
                        None => 0,
                    };
                    Ok(in_memory || saved > 0)
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Backend::Cluster { store, prefix, .. } => {
                let keys = s.redis_keys(prefix, &s.periods(now), key);
                let n = cluster::delete(store, &keys)
                    .await
                    .map_err(|e| format!("Redis: {e}"))?;
                Ok(n > 0)
            }
        }
    }
}
