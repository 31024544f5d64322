//! What is stored (an [`Entry`], or a [`Slot::Vary`] marker naming the headers a
//! response varies on) and the in-memory store: shards, each an LRU map bounded by
//! bytes (the sum of [`Slot::weight`]), so one hit locks one shard only.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use parking_lot::Mutex;

/// A stored response. Times are milliseconds of the cache's clock (the Unix epoch in
/// production, so gateways sharing Redis agree on ages).
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it was stored (or last revalidated).
    pub stored_ms: u64,
    /// The `Age` it arrived with.
    pub initial_age_ms: u64,
    pub ttl_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
    /// How long after `stored_ms` it is kept at all.
    pub keep_ms: u64,
}

impl Entry {
    /// Its current age (RFC 9111 §4.2.3, with the upstream's `Age` as initial age).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        self.initial_age_ms
            .saturating_add(now_ms.saturating_sub(self.stored_ms))
    }
    pub fn fresh(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms
    }
    /// Stale, but within `stale-while-revalidate`.
    pub fn usable_while_revalidating(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms.saturating_add(self.swr_ms)
    }
    /// Within `stale-if-error`.
    pub fn usable_on_error(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms.saturating_add(self.sie_ms)
    }
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.stored_ms) >= self.keep_ms
    }
    /// Has a validator, so it can be revalidated with a conditional request.
    pub fn validators(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }
}

/// What a key holds.
#[derive(Debug, Clone)]
pub enum Slot {
    Response(Arc<Entry>),
    /// The response under this key varies on these request headers: its variants are
    /// stored under [`super::key::variant`] keys. Kept until `until_ms`.
    Vary {
        names: Arc<[HeaderName]>,
        until_ms: u64,
    },
}

impl Slot {
    /// Bytes it accounts for in the memory store (key included).
    pub fn weight(&self, key: &str) -> usize {
        let base = key.len() + 96;
        match self {
            Slot::Response(e) => {
                base + e.body.len()
                    + e.headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len() + 16)
                        .sum::<usize>()
            }
            Slot::Vary { names, .. } => {
                base + names.iter().map(|n| n.as_str().len()).sum::<usize>()
            }
        }
    }
    pub fn expired(&self, now_ms: u64) -> bool {
        match self {
            Slot::Response(e) => e.expired(now_ms),
            Slot::Vary { until_ms, .. } => now_ms >= *until_ms,
        }
    }
}

struct Item {
    slot: Slot,
    tick: u64,
    weight: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Item>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    bytes: usize,
    tick: u64,
}

impl Shard {
    fn remove(&mut self, key: &str) -> Option<Item> {
        let it = self.map.remove(key)?;
        self.order.remove(&it.tick);
        self.bytes -= it.weight;
        Some(it)
    }
}

/// The in-memory store of `memory: {max_size}`.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
    pub evictions: AtomicU64,
}

const MAX_SHARDS: usize = 16;

impl MemoryStore {
    /// A store of at most `max_bytes`, split over shards each of which can still hold
    /// at least four objects of `max_object` bytes.
    pub fn new(max_bytes: u64, max_object: u64) -> MemoryStore {
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let max_object = usize::try_from(max_object).unwrap_or(usize::MAX).max(1);
        let n = (max_bytes / max_object.saturating_mul(4)).clamp(1, MAX_SHARDS);
        MemoryStore {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
            per_shard: max_bytes / n,
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// The slot under `key` (marked as just used), or `None`; an expired one is removed.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<Slot> {
        let mut s = self.shard(key).lock();
        let s = &mut *s;
        let expired = s.map.get(key)?.slot.expired(now_ms);
        if expired {
            s.remove(key);
            return None;
        }
        s.tick += 1;
        let tick = s.tick;
        let (k, it) = s.map.get_key_value(key)?;
        let k = k.clone();
        let old = it.tick;
        let slot = it.slot.clone();
        s.order.remove(&old);
        s.order.insert(tick, k);
        if let Some(it) = s.map.get_mut(key) {
            it.tick = tick;
        }
        Some(slot)
    }

    /// Store `slot` under `key`, evicting the least recently used entries of its shard
    /// until it fits. Returns false when it is larger than a shard.
    pub fn put(&self, key: &str, slot: Slot) -> bool {
        let weight = slot.weight(key);
        if weight > self.per_shard {
            return false;
        }
        let mut s = self.shard(key).lock();
        s.remove(key);
        let mut evicted = 0;
        while s.bytes + weight > self.per_shard {
            let Some((_, oldest)) = s.order.pop_first() else {
                break;
            };
            if let Some(it) = s.map.remove(&oldest) {
                s.bytes -= it.weight;
                evicted += 1;
            }
        }
        s.tick += 1;
        let tick = s.tick;
        let k: Arc<str> = Arc::from(key);
        s.order.insert(tick, k.clone());
        s.map.insert(k, Item { slot, tick, weight });
        s.bytes += weight;
        drop(s);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    /// Remove every key `matches` selects; returns how many.
    pub fn purge(&self, matches: &dyn Fn(&str) -> bool) -> u64 {
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            let doomed: Vec<Arc<str>> = s.map.keys().filter(|k| matches(k)).cloned().collect();
            for k in doomed {
                if s.remove(&k).is_some() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Bytes and entries held.
    pub fn usage(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(b, n), s| {
            let s = s.lock();
            (b + s.bytes as u64, n + s.map.len() as u64)
        })
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }
}

/// Misses in progress, one per key (request coalescing): the first request for a key
/// leads (goes upstream); the others wait until its [`Leader`] is dropped (the response
/// was stored, or turned out not storable), then look again.
#[derive(Default)]
pub struct Flights {
    shards: [Mutex<HashMap<String, tokio::sync::watch::Receiver<()>>>; 8],
    hasher: std::collections::hash_map::RandomState,
}

/// Held by the request fetching a key; dropping it wakes the waiters.
pub struct Leader {
    key: String,
    flights: Arc<Flights>,
    _tx: tokio::sync::watch::Sender<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.flights.shard(&self.key).lock().remove(&self.key);
        // `_tx` is dropped after this: the waiters wake once the key is free again.
    }
}

pub enum Join {
    Lead(Leader),
    Wait(tokio::sync::watch::Receiver<()>),
}

impl Flights {
    fn shard(&self, key: &str) -> &Mutex<HashMap<String, tokio::sync::watch::Receiver<()>>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }

    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut m = self.shard(key).lock();
        if let Some(rx) = m.get(key) {
            return Join::Wait(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(());
        m.insert(key.to_owned(), rx);
        Join::Lead(Leader {
            key: key.to_owned(),
            flights: self.clone(),
            _tx: tx,
        })
    }

    /// Lead `key` only if nobody does.
    pub fn try_lead(self: &Arc<Self>, key: &str) -> Option<Leader> {
        match self.join(key) {
            Join::Lead(l) => Some(l),
            Join::Wait(_) => None,
        }
    }
}

/// Wait until the leader of a key is done, at most `max`.
pub async fn wait(mut rx: tokio::sync::watch::Receiver<()>, max: std::time::Duration) {
    let _ = tokio::time::timeout(max, async {
        // `changed` fails once the sender (the leader) is gone.
        while rx.changed().await.is_ok() {}
    })
    .await;
}
