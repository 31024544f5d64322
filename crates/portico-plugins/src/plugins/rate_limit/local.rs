//! The per-node store of one limit: a fixed number of shards, each a small map behind
//! its own lock (a request locks one shard, briefly), with a bound on keys. Expired
//! keys are dropped when a shard is full; when every key of a full shard is still
//! live, the one closest to expiring goes (the store never grows past its bound).

use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::Mutex;

use super::algo::{self, Cell, Decision, Params};

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<Box<str>, Cell>>;

pub struct LocalStore {
    params: Params,
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl LocalStore {
    /// A store for `params` holding at most about `max_keys` keys.
    pub fn new(params: Params, max_keys: usize) -> LocalStore {
        LocalStore {
            params,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &str) -> &Shard {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Decide on one request of `key` at `now` (ns).
    pub fn check(&self, key: &str, now: u64) -> Decision {
        let mut map = self.shard(key).lock();
        if let Some(cell) = map.get_mut(key) {
            return algo::check(&self.params, cell, now);
        }
        let mut cell = Cell::Empty;
        let d = algo::check(&self.params, &mut cell, now);
        if d.allowed {
            if map.len() >= self.per_shard {
                self.make_room(&mut map, now);
            }
            map.insert(key.into(), cell);
        }
        d
    }

    /// Give back a request admitted by [`LocalStore::check`].
    pub fn refund(&self, key: &str) {
        if let Some(cell) = self.shard(key).lock().get_mut(key) {
            algo::refund(&self.params, cell);
        }
    }

    fn make_room(&self, map: &mut HashMap<Box<str>, Cell>, now: u64) {
        let p = &self.params;
        map.retain(|_, c| c.expires_at(p) > now);
        if map.len() < self.per_shard {
            return;
        }
        let oldest = map
            .iter()
            .min_by_key(|(_, c)| c.expires_at(p))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            map.remove(&k);
        }
    }

    /// Keys held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::rate_limit::algo::Algorithm;

    #[test]
    fn keys_are_separate_and_bounded() {
        let p = Params {
            algorithm: Algorithm::Gcra,
            requests: 2,
            per_ns: 1_000_000_000,
            burst: 2,
        };
        let s = LocalStore::new(p, 32);
        assert!(s.check("a", 0).allowed);
        assert!(s.check("a", 0).allowed);
        assert!(!s.check("a", 0).allowed);
        assert!(s.check("b", 0).allowed);
        // Many keys: never more than the bound (2 per shard here).
        for i in 0..1000 {
            s.check(&format!("k{i}"), 10);
        }
        assert!(s.len() <= 32, "{}", s.len());
        // Expired keys go first: after a while everything fits again.
        for i in 0..1000 {
            assert!(s.check(&format!("n{i}"), 10_000_000_000 + i).allowed);
        }
        assert!(s.len() <= 32);
    }
}
