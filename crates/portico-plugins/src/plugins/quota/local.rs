//! The counts of `mode: local`: in memory, a fixed number of shards (a request locks
//! the one of its key, briefly), each key with one counter per limit. Saved to the
//! store in the background by the [`Registry`](super::registry::Registry) and read
//! back when the gateway starts.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;
use portico_store::QuotaRow;

const SHARDS: usize = 16;

/// What one key used of one limit in one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub start: i64,
    pub end: i64,
    pub used: u64,
    /// Changed since the store last saved it.
    pub dirty: bool,
}

/// One limit as the counts see it: its name, its amount, whether a request counts one
/// (else the exchange's bytes are added at its end), and the current period.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    pub name: &'a str,
    pub amount: u64,
    pub requests: bool,
    pub start: i64,
    pub end: i64,
}

type KeyCounts = Vec<(Arc<str>, Counter)>;
type Shard = Mutex<HashMap<Box<str>, KeyCounts>>;

pub struct LocalCounts {
    scope: Arc<str>,
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
}

/// The counter of `name` in `counts`, moved to the period `[start, end)` when it
/// belongs to another one.
fn counter<'c>(counts: &'c mut KeyCounts, name: &str, start: i64, end: i64) -> &'c mut Counter {
    let i = match counts.iter().position(|(n, _)| &**n == name) {
        Some(i) => i,
        None => {
            counts.push((
                Arc::from(name),
                Counter {
                    start,
                    end,
                    used: 0,
                    dirty: false,
                },
            ));
            counts.len() - 1
        }
    };
    let c = &mut counts[i].1;
    if c.start != start {
        *c = Counter {
            start,
            end,
            used: 0,
            dirty: false,
        };
    }
    c
}

impl LocalCounts {
    pub fn new(scope: Arc<str>) -> LocalCounts {
        LocalCounts {
            scope,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    pub fn scope(&self) -> &Arc<str> {
        &self.scope
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Admit one request of `key` when no limit is used up, counting it against the
    /// request limits. Returns whether it was admitted and each limit's use (after
    /// counting it). A refused request counts against nothing.
    pub fn admit(&self, key: &str, slots: &[Slot<'_>]) -> (bool, Vec<u64>) {
        let mut map = self.shard(key).lock();
        let counts = map.entry(Box::from(key)).or_default();
        let used: Vec<u64> = slots
            .iter()
            .map(|s| counter(counts, s.name, s.start, s.end).used)
            .collect();
        if slots.iter().zip(&used).any(|(s, u)| *u >= s.amount) {
            return (false, used);
        }
        let used = slots
            .iter()
            .map(|s| {
                let c = counter(counts, s.name, s.start, s.end);
                if s.requests {
                    c.used = c.used.saturating_add(1);
                    c.dirty = true;
                }
                c.used
            })
            .collect();
        (true, used)
    }

    /// Add an exchange's bytes to the byte limits of `key`.
    pub fn add_bytes(&self, key: &str, slots: &[Slot<'_>], bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut map = self.shard(key).lock();
        let counts = map.entry(Box::from(key)).or_default();
        for s in slots.iter().filter(|s| !s.requests) {
            let c = counter(counts, s.name, s.start, s.end);
            c.used = c.used.saturating_add(bytes);
            c.dirty = true;
        }
    }

    /// Every counter whose period has not ended at `now`: `(key, limit, counter)`.
    pub fn usage(&self, now: i64) -> Vec<(String, Arc<str>, Counter)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, counts) in shard.lock().iter() {
                for (name, c) in counts {
                    if c.end > now {
                        out.push((key.to_string(), name.clone(), *c));
                    }
                }
            }
        }
        out
    }

    /// Forget `key`'s counts; whether it had any in a current period.
    pub fn reset(&self, key: &str, now: i64) -> bool {
        self.shard(key)
            .lock()
            .remove(key)
            .is_some_and(|counts| counts.iter().any(|(_, c)| c.end > now && c.used > 0))
    }

    /// The counters changed since the last call (now marked saved), and forget the
    /// periods that ended.
    pub fn take_dirty(&self, now: i64) -> Vec<QuotaRow> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            map.retain(|key, counts| {
                counts.retain(|(_, c)| c.end > now);
                for (name, c) in counts.iter_mut().filter(|(_, c)| c.dirty) {
                    c.dirty = false;
                    out.push(QuotaRow {
                        scope: self.scope.to_string(),
                        key: key.to_string(),
                        limit: name.to_string(),
                        period_start: c.start,
                        period_end: c.end,
                        used: c.used,
                    });
                }
                !counts.is_empty()
            });
        }
        out
    }

    /// Mark rows whose save failed as changed again (unless their key moved on).
    pub fn restore_dirty(&self, rows: &[QuotaRow]) {
        for r in rows {
            let mut map = self.shard(&r.key).lock();
            if let Some(counts) = map.get_mut(r.key.as_str()) {
                for (name, c) in counts.iter_mut() {
                    if **name == *r.limit && c.start == r.period_start {
                        c.dirty = true;
                    }
                }
            }
        }
    }

    /// Load saved counts (at start); a count already in memory is kept.
    pub fn load(&self, rows: Vec<QuotaRow>) {
        for r in rows {
            let mut map = self.shard(&r.key).lock();
            let counts = map.entry(Box::from(r.key.as_str())).or_default();
            if !counts.iter().any(|(n, _)| **n == *r.limit) {
                counts.push((
                    Arc::from(r.limit.as_str()),
                    Counter {
                        start: r.period_start,
                        end: r.period_end,
                        used: r.used,
                        dirty: false,
                    },
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(start: i64) -> [Slot<'static>; 2] {
        [
            Slot {
                name: "requests-per-day",
                amount: 2,
                requests: true,
                start,
                end: start + 86400,
            },
            Slot {
                name: "bytes-per-day",
                amount: 100,
                requests: false,
                start,
                end: start + 86400,
            },
        ]
    }

    #[test]
    fn counts_refuses_and_starts_over_next_period() {
        let c = LocalCounts::new(Arc::from("route:a"));
        let s = slots(0);
        assert_eq!(c.admit("alice", &s), (true, vec![1, 0]));
        assert_eq!(c.admit("alice", &s), (true, vec![2, 0]));
        // Used up: refused, and the refusal counts nothing.
        assert_eq!(c.admit("alice", &s), (false, vec![2, 0]));
        assert_eq!(c.admit("alice", &s), (false, vec![2, 0]));
        // Another key is separate.
        assert_eq!(c.admit("bob", &s), (true, vec![1, 0]));
        // The next day starts from zero.
        assert_eq!(c.admit("alice", &slots(86400)), (true, vec![1, 0]));
    }

    #[test]
    fn bytes_refuse_once_used_up() {
        let c = LocalCounts::new(Arc::from("global"));
        let mut s = slots(0);
        s[0].amount = 1000;
        assert!(c.admit("k", &s).0);
        // An exchange may go past the amount; the next request is refused.
        c.add_bytes("k", &s, 150);
        assert_eq!(c.admit("k", &s), (false, vec![1, 150]));
    }

    #[test]
    fn dirty_rows_load_and_reset() {
        let c = LocalCounts::new(Arc::from("global"));
        let s = slots(0);
        c.admit("alice", &s);
        c.add_bytes("alice", &s, 10);
        let mut rows = c.take_dirty(5);
        rows.sort_by(|a, b| a.limit.cmp(&b.limit));
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].limit.as_str(), rows[0].used),
            ("bytes-per-day", 10)
        );
        assert_eq!(
            (rows[1].limit.as_str(), rows[1].used),
            ("requests-per-day", 1)
        );
        // Nothing changed since.
        assert!(c.take_dirty(5).is_empty());
        c.restore_dirty(&rows);
        assert_eq!(c.take_dirty(5).len(), 2);
        // A restart: the saved rows come back.
        let d = LocalCounts::new(Arc::from("global"));
        d.load(rows);
        assert_eq!(d.admit("alice", &s), (true, vec![2, 10]));
        assert!(d.reset("alice", 5));
        assert!(!d.reset("alice", 5));
        assert_eq!(d.admit("alice", &s), (true, vec![1, 0]));
        // Ended periods are forgotten.
        assert_eq!(d.take_dirty(86400), vec![]);
        assert!(d.usage(86400).is_empty());
    }
}
