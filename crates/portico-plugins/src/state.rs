//! State that outlives a snapshot (rate-limit counters, in-flight counts, store
//! connections), and the clock policies read time from.
//!
//! The gateway owns one [`PolicyState`] and hands it to every snapshot it compiles
//! (`BuildEnv::state`). A policy asks it for its state under a stable name (scope +
//! settings): a reload that builds the same policy with the same settings gets the same
//! state back, so counters survive. Entries are held weakly: once no snapshot uses a
//! state any more, it is freed.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Named state shared by the snapshots of one gateway.
#[derive(Default)]
pub struct PolicyState {
    entries: Mutex<HashMap<String, Weak<dyn Any + Send + Sync>>>,
}

impl PolicyState {
    /// The state kept under `key`, or a new one made by `make` (kept under `key` from
    /// now on). A `key` holding a state of another type is replaced.
    pub fn get_or_insert<T, F>(&self, key: &str, make: F) -> Arc<T>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> T,
    {
        let mut map = self.entries.lock();
        if let Some(found) = map.get(key).and_then(Weak::upgrade) {
            if let Ok(t) = found.downcast::<T>() {
                return t;
            }
        }
        // Forget the states nobody uses any more (compile time only: cheap enough).
        map.retain(|_, w| w.strong_count() > 0);
        let t = Arc::new(make());
        let any: Arc<dyn Any + Send + Sync> = t.clone();
        map.insert(key.to_owned(), Arc::downgrade(&any));
        t
    }

    /// The state kept under `key`, if one of type `T` is alive.
    pub fn get<T: Send + Sync + 'static>(&self, key: &str) -> Option<Arc<T>> {
        let found = self.entries.lock().get(key).and_then(Weak::upgrade)?;
        found.downcast::<T>().ok()
    }

    /// How many states are alive (for tests).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A monotonic clock in nanoseconds since an arbitrary origin, injectable so tests
/// drive time instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock (`tokio::time::Instant`, so a paused tokio runtime
/// pauses it too).
pub struct SystemClock {
    origin: tokio::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn advance(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn set_ns(&self, ns: u64) {
        self.0.store(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_state_while_used() {
        let s = PolicyState::default();
        let a = s.get_or_insert("k", || std::sync::atomic::AtomicU32::new(7));
        let b = s.get_or_insert("k", || std::sync::atomic::AtomicU32::new(0));
        assert!(Arc::ptr_eq(&a, &b));
        let c = s.get_or_insert("other", || std::sync::atomic::AtomicU32::new(0));
        assert!(!Arc::ptr_eq(&a, &c));
        drop((a, b));
        // Nobody holds "k" any more: a new state is made.
        let d = s.get_or_insert("k", || std::sync::atomic::AtomicU32::new(1));
        assert_eq!(d.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(s.len(), 2);
    }
}
