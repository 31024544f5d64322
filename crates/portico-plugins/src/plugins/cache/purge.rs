//! Purging entries for the admin API: every store in use is registered (weakly) in
//! the gateway's [`PolicyState`], and a purge filters keys by route, URL or path prefix
//! (see [`super::key`] for why keys can be filtered without an index).

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::key;
use super::redis::RedisCache;
use super::store::MemoryStore;
use super::Backend;
use crate::state::PolicyState;

/// Every store in use, for the admin API's purge (held weakly: a store no
/// configuration uses any more is gone).
#[derive(Default)]
pub struct Registry {
    stores: Mutex<Vec<WeakBackend>>,
}

enum WeakBackend {
    Memory(Weak<MemoryStore>),
    Redis(Weak<RedisCache>),
}

pub(super) const REGISTRY: &str = "cache/registry";

impl Registry {
    pub(super) fn add(&self, b: &Backend) {
        let mut v = self.stores.lock();
        v.retain(|w| match w {
            WeakBackend::Memory(m) => m.strong_count() > 0,
            WeakBackend::Redis(r) => r.strong_count() > 0,
        });
        let known = v.iter().any(|w| match (w, b) {
            (WeakBackend::Memory(w), Backend::Memory(m)) => {
                std::ptr::eq(w.as_ptr(), Arc::as_ptr(m))
            }
            (WeakBackend::Redis(w), Backend::Redis(r)) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(r)),
            _ => false,
        });
        if !known {
            v.push(match b {
                Backend::Memory(m) => WeakBackend::Memory(Arc::downgrade(m)),
                Backend::Redis(r) => WeakBackend::Redis(Arc::downgrade(r)),
            });
        }
    }

    fn live(&self) -> Vec<Backend> {
        self.stores
            .lock()
            .iter()
            .filter_map(|w| match w {
                WeakBackend::Memory(m) => m.upgrade().map(Backend::Memory),
                WeakBackend::Redis(r) => r.upgrade().map(Backend::Redis),
            })
            .collect()
    }
}

/// What the admin API purges.
#[derive(Debug, Clone)]
pub enum Purge {
    /// Every entry of a route.
    Route(String),
    /// Every entry (every method, variant, key header and consumer) of a URL, given
    /// as [`key::url`] makes it (`host[:port]/path?sorted-query`).
    Url(String),
    /// Every entry whose path starts with this (any host).
    Prefix(String),
}

impl Purge {
    /// A purge by URL from an absolute `http://` or `https://` URL (the scheme is not
    /// part of keys). The path is normalized as routing normalizes it.
    pub fn url(raw: &str) -> Result<Purge, String> {
        let uri: http::Uri = raw.parse().map_err(|_| format!("`{raw}` is not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => {
                return Err(format!(
                    "`{raw}` is not an absolute http:// or https:// URL"
                ))
            }
        }
        let host = uri
            .authority()
            .map(|a| a.as_str())
            .filter(|a| !a.is_empty() && !a.contains('@'))
            .ok_or_else(|| format!("`{raw}` has no host"))?;
        let path = portico_router::normalize_path(uri.path())
            .map_err(|_| format!("`{raw}` has an invalid path"))?;
        Ok(Purge::Url(key::url(host, &path, uri.query())))
    }

    pub(super) fn matches(&self, k: &str) -> bool {
        let Some(p) = key::parse(k) else {
            return false;
        };
        match self {
            Purge::Route(r) => p.route == r,
            Purge::Url(u) => p.url == u,
            Purge::Prefix(pre) => p.path.starts_with(pre.as_str()),
        }
    }
}

/// Remove the entries `p` selects from every store in use; returns how many keys
/// were removed (`Vary` markers and variants count one each).
pub async fn purge(state: &PolicyState, p: &Purge) -> Result<u64, String> {
    let reg = state.get_or_insert(REGISTRY, Registry::default);
    let mut n = 0;
    for b in reg.live() {
        n += match b {
            Backend::Memory(m) => m.purge(&|k| p.matches(k)),
            Backend::Redis(r) => r.purge(&|k| p.matches(k)).await?,
        };
    }
    Ok(n)
}
