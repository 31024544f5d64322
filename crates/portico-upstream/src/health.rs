//! Passive health: consecutive connect failures eject a target for a while. Also the
//! load signals balancers read: requests in flight and (for `p2c_ewma`) a latency
//! estimate. This state outlives snapshots (keyed by upstream name and target URL).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

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

/// Time constant of the latency estimate, in milliseconds: an estimate not refreshed
/// by a slower response falls to 1/e of its value in this time.
pub const LATENCY_DECAY_MS: u64 = 10_000;

/// The least a failed exchange (no connection, connection lost, timeout, or a 502, 503
/// or 504 answer) counts as in the latency estimate.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Health of one target.
#[derive(Debug, Default)]
pub struct TargetHealth {
    failures: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU64,
    in_flight: AtomicU32,
    /// The latency estimate in log form (see [`TargetHealth::observe`]): the bits of
    /// `1 + ln(latency in ns) + t / LATENCY_DECAY_MS` for the sample that dominates;
    /// 0 before any sample.
    latency: AtomicU64,
}

/// The log form of a latency sample taken at `now` (ms): at least 1, so its bits order
/// like the numbers (non-negative `f64`s do) and 0 stays free for "no sample".
fn latency_key(latency: Duration, now: u64) -> f64 {
    let ns = (latency.as_nanos() as f64).max(1.0);
    1.0 + ns.ln() + now as f64 / LATENCY_DECAY_MS as f64
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

    /// A response head arrived `latency` after sending began, at `now` (ms on the
    /// [`now_ms`] clock, or any clock the caller keeps consistent).
    ///
    /// The estimate is peak-sensitive and decays: a sample above the current estimate
    /// replaces it at once; otherwise the estimate keeps decaying exponentially with
    /// time constant [`LATENCY_DECAY_MS`] (towards 0 while no sample is above it). So
    /// it is the largest recent sample, each discounted by `e^(-age / decay)`: a slow
    /// response counts in full at once and fades within tens of seconds, and a target
    /// that gets no traffic (being slow) looks better and better until it is tried
    /// again. In log form this is a running maximum, one lock-free `fetch_max`.
    pub fn observe(&self, latency: Duration, now: u64) {
        self.latency
            .fetch_max(latency_key(latency, now).to_bits(), Ordering::Relaxed);
    }

    /// An exchange failed after `elapsed`: it counts as a sample of at least
    /// [`FAILURE_PENALTY`].
    pub fn observe_failure(&self, elapsed: Duration, now: u64) {
        self.observe(elapsed.max(FAILURE_PENALTY), now);
    }

    /// The latency estimate at `now`; `None` before the first sample.
    pub fn latency_estimate(&self, now: u64) -> Option<Duration> {
        let k = self.latency_log()?;
        let ns = (k - 1.0 - now as f64 / LATENCY_DECAY_MS as f64).exp();
        Some(Duration::from_nanos(ns.min(u64::MAX as f64) as u64))
    }

    /// The estimate in log form, `ln(estimate at t) + t / decay + 1`, which does not
    /// change with `t` between samples: two targets' estimates compare (and divide)
    /// without reading the clock.
    pub(crate) fn latency_log(&self) -> Option<f64> {
        match self.latency.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
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

    fn ms(d: Option<Duration>) -> f64 {
        d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }

    #[test]
    fn latency_estimate_is_peak_sensitive_and_decays() {
        let h = TargetHealth::default();
        assert_eq!(h.latency_estimate(0), None);
        let t0 = 1_000;
        h.observe(Duration::from_millis(10), t0);
        assert!((ms(h.latency_estimate(t0)) - 10.0).abs() < 1e-4);
        // A faster sample does not pull it down at once...
        h.observe(Duration::from_millis(1), t0 + 1);
        assert!(ms(h.latency_estimate(t0 + 1)) > 9.99);
        // ...it decays with the time constant: 1/e after 10 s, 1/e^2 after 20 s.
        let e = std::f64::consts::E;
        assert!((ms(h.latency_estimate(t0 + 10_000)) - 10.0 / e).abs() < 1e-4);
        assert!((ms(h.latency_estimate(t0 + 20_000)) - 10.0 / (e * e)).abs() < 1e-4);
        // Until a sample is above it, which then counts in full.
        h.observe(Duration::from_millis(2), t0 + 20_000);
        assert!((ms(h.latency_estimate(t0 + 20_000)) - 2.0).abs() < 1e-4);
        // A slower sample replaces it at once.
        h.observe(Duration::from_millis(50), t0 + 20_001);
        assert!((ms(h.latency_estimate(t0 + 20_001)) - 50.0).abs() < 1e-4);
        // A failure counts as at least the penalty.
        h.observe_failure(Duration::from_millis(3), t0 + 20_002);
        assert!(ms(h.latency_estimate(t0 + 20_002)) >= 999.9);
        // Zero latency is a valid sample.
        let z = TargetHealth::default();
        z.observe(Duration::ZERO, 5);
        assert!(z.latency_estimate(5).is_some());
    }
}
