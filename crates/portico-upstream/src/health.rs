//! Passive health: consecutive connect failures eject a target for a while.
//! This state outlives snapshots (keyed by upstream name and target URL).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on the process's monotonic clock (tokio's, so tests can pause time).
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// The same clock, read at `t`.
pub fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_millis() as u64 + 1
}

/// Health of one target.
#[derive(Debug, Default)]
pub struct TargetHealth {
    failures: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU64,
    in_flight: AtomicU32,
}

impl TargetHealth {
    /// Whether the target may be tried now.
    pub fn available(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// A response arrived: the failure streak ends.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure; returns true when this failure ejected the target.
    pub fn failure(&self, now: u64, threshold: u32, ejection_ms: u64) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold > 0 && n >= threshold {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until
                .store(now + ejection_ms, Ordering::Relaxed);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Requests currently in flight to this target.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_threshold_and_recovers() {
        let h = TargetHealth::default();
        assert!(h.available(100));
        assert!(!h.failure(100, 3, 1000));
        h.success();
        assert!(!h.failure(100, 3, 1000));
        assert!(!h.failure(100, 3, 1000));
        assert!(h.failure(100, 3, 1000));
        assert!(!h.available(500));
        assert!(h.available(1100));
        assert_eq!(h.ejections(), 1);
    }
}
