//! Target health: passive (outlier detection: consecutive connect failures, 5xx
//! answers or timeouts eject a target for a time that grows with repeated ejections)
//! and active (the verdict of the health checker, [`crate::check`]). Also the load
//! signals balancers read: requests in flight and (for `p2c_ewma`) a latency estimate.
//! This state outlives snapshots (keyed by upstream name and target URL).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Milliseconds on the process's monotonic clock (tokio's, so tests can pause time),
/// at the request path's cached reading ([`portico_plugins::clock`]).
pub fn now_ms() -> u64 {
    portico_plugins::clock::now_ms()
}

/// The same clock, read at `t`.
pub fn ms_at(t: Instant) -> u64 {
    portico_plugins::clock::ms_at(t)
}

/// Time constant of the latency estimate, in milliseconds: an estimate not refreshed
/// by a slower response falls to 1/e of its value in this time.
pub const LATENCY_DECAY_MS: u64 = 10_000;

/// The least a failed exchange (no connection, connection lost, timeout, or a 502, 503
/// or 504 answer) counts as in the latency estimate.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// A request counted in flight on a target; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight<'a>(&'a TargetHealth);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// What passive health counts in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streak {
    /// No connection (refused, reset, TLS failure) before an answer.
    Connect,
    /// A 5xx answer.
    Status5xx,
    /// No answer in time (connect or response timeout).
    Timeout,
}

impl Streak {
    fn slot(self) -> usize {
        match self {
            Streak::Connect => 0,
            Streak::Status5xx => 1,
            Streak::Timeout => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Streak::Connect => "connect failures",
            Streak::Status5xx => "5xx answers",
            Streak::Timeout => "timeouts",
        }
    }
}

/// How long passive ejections last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// The first ejection's length, and the step each further one adds.
    pub base_ms: u64,
    /// The longest ejection.
    pub max_ms: u64,
}

/// Health of one target.
#[derive(Debug, Default)]
pub struct TargetHealth {
    /// Consecutive failures by kind ([`Streak`]).
    streaks: [AtomicU32; 3],
    ejected_until: AtomicU64,
    ejections: AtomicU64,
    /// The multiplier of the next ejection's length, minus one; it decays by one per
    /// `base` of time the target spends in rotation.
    level: AtomicU32,
    /// Active checks say the target is down.
    active_down: AtomicBool,
    /// Active check results in a row: > 0 successes, < 0 failures.
    active_streak: AtomicI32,
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
    /// Whether the target may be tried now: not ejected, not down by active checks.
    #[inline]
    pub fn available(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
            && !self.active_down.load(Ordering::Relaxed)
    }

    /// Whether passive health has the target ejected at `now`.
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// When the current (or last) ejection ends (ms; 0: never ejected).
    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    /// Whether active checks have the target down.
    pub fn active_down(&self) -> bool {
        self.active_down.load(Ordering::Relaxed)
    }

    /// A response arrived: the connect and timeout streaks end, and so does the 5xx
    /// streak unless `status_5xx`.
    #[inline]
    pub fn success(&self, status_5xx: bool) {
        for (i, s) in self.streaks.iter().enumerate() {
            if (i != Streak::Status5xx.slot() || !status_5xx) && s.load(Ordering::Relaxed) != 0 {
                s.store(0, Ordering::Relaxed);
            }
        }
    }

    /// One more failure of `kind` at `now`. Returns true when it ejected the target:
    /// the streak reached `threshold` (0: never) and `may_eject` allowed it (the cap
    /// on ejected targets). The ejection lasts `base` × (1 + level), at most `max`,
    /// where the level counts recent ejections: it drops by one per `base` the target
    /// has spent in rotation since its last ejection ended.
    ///
    /// `may_eject` is only called once the streak reaches the threshold; what it
    /// returns (`Some`: allowed) is held until the ejection is recorded, so a guard
    /// that serializes the decisions of a target set makes the cap's check and the
    /// ejection one step (the cap then holds under concurrent failures).
    pub fn failure<G>(
        &self,
        kind: Streak,
        now: u64,
        threshold: u32,
        ej: Ejection,
        may_eject: impl FnOnce() -> Option<G>,
    ) -> bool {
        // While ejected, late failures (requests sent before the ejection, panic
        // mode) do not count: the target starts afresh when it returns.
        if threshold == 0 || self.ejected(now) {
            return false;
        }
        let n = self.streaks[kind.slot()].fetch_add(1, Ordering::Relaxed) + 1;
        if n < threshold {
            return false;
        }
        let Some(_allowed) = may_eject() else {
            return false;
        };
        // Another failure of this target may have ejected it meanwhile: once is enough.
        if self.ejected(now) {
            return false;
        }
        for s in &self.streaks {
            s.store(0, Ordering::Relaxed);
        }
        let last_end = self.ejected_until.load(Ordering::Relaxed);
        let level = u64::from(self.level.load(Ordering::Relaxed));
        let decayed = if last_end == 0 {
            0
        } else {
            level.saturating_sub(now.saturating_sub(last_end) / ej.base_ms.max(1))
        };
        let length = ej
            .base_ms
            .saturating_mul(decayed + 1)
            .min(ej.max_ms.max(ej.base_ms));
        self.level.store(
            u32::try_from(decayed + 1).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
        self.ejected_until.store(now + length, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The record of one active check at `now`; returns `Some(healthy)` when the
    /// target's active state changed.
    pub fn checked(&self, ok: bool, healthy_after: u32, unhealthy_after: u32) -> Option<bool> {
        let prev = self.active_streak.load(Ordering::Relaxed);
        let streak = match (ok, prev) {
            (true, p) if p > 0 => p.saturating_add(1),
            (true, _) => 1,
            (false, p) if p < 0 => p.saturating_sub(1),
            (false, _) => -1,
        };
        self.active_streak.store(streak, Ordering::Relaxed);
        let down = self.active_down.load(Ordering::Relaxed);
        let flip = if down {
            ok && streak >= i32::try_from(healthy_after).unwrap_or(i32::MAX)
        } else {
            !ok && -streak >= i32::try_from(unhealthy_after).unwrap_or(i32::MAX)
        };
        if flip {
            self.active_down.store(!down, Ordering::Relaxed);
            return Some(down);
        }
        None
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Consecutive failures of the kind with the longest current streak.
    pub fn consecutive_failures(&self) -> u32 {
        self.streaks
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Requests currently in flight to this target.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a request in flight until the returned guard drops: also when the
    /// request's future is dropped half-way (a client gone, an outer timeout).
    pub fn enter(&self) -> InFlight<'_> {
        self.start();
        InFlight(self)
    }

    /// Forget what active checks said (they were turned off).
    pub fn clear_active(&self) {
        self.active_down.store(false, Ordering::Relaxed);
        self.active_streak.store(0, Ordering::Relaxed);
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

    const EJ: Ejection = Ejection {
        base_ms: 1000,
        max_ms: 3500,
    };

    fn fail(h: &TargetHealth, now: u64) -> bool {
        h.failure(Streak::Connect, now, 3, EJ, || Some(()))
    }

    #[test]
    fn ejects_after_threshold_and_recovers() {
        let h = TargetHealth::default();
        assert!(h.available(100));
        assert!(!fail(&h, 100));
        h.success(false);
        assert!(!fail(&h, 100));
        assert!(!fail(&h, 100));
        assert!(fail(&h, 100));
        assert!(!h.available(500));
        assert!(h.available(1100));
        assert_eq!(h.ejections(), 1);
    }

    #[test]
    fn ejections_grow_then_decay() {
        let h = TargetHealth::default();
        let eject = |now| {
            for _ in 0..2 {
                assert!(!fail(&h, now));
            }
            assert!(fail(&h, now));
            h.ejected_until() - now
        };
        // Back-to-back ejections: 1 s, 2 s, 3 s, then the 3.5 s cap.
        assert_eq!(eject(0), 1000);
        assert_eq!(eject(1000), 2000);
        assert_eq!(eject(3000), 3000);
        assert_eq!(eject(6000), 3500);
        // In rotation for 2 × base since the last ejection ended (at 9500): the level
        // drops by 2 (4 -> 2), so the next ejection is 3 × base.
        assert_eq!(eject(11_500), 3000);
        // A long healthy spell forgets every past ejection.
        assert_eq!(eject(100_000), 1000);
    }

    #[test]
    fn streaks_are_counted_apart_and_capped() {
        let h = TargetHealth::default();
        // 5xx answers do not end a 5xx streak; other answers do.
        assert!(!h.failure(Streak::Status5xx, 0, 2, EJ, || Some(())));
        h.success(true);
        assert!(h.failure(Streak::Status5xx, 0, 2, EJ, || Some(())));
        let h = TargetHealth::default();
        assert!(!h.failure(Streak::Timeout, 0, 2, EJ, || Some(())));
        h.success(false);
        assert!(!h.failure(Streak::Timeout, 0, 2, EJ, || Some(())));
        // The cap refuses: no ejection, the target stays available.
        assert!(!h.failure(Streak::Timeout, 0, 2, EJ, || None::<()>));
        assert!(h.available(1));
        // Threshold 0: never.
        for _ in 0..10 {
            assert!(!h.failure(Streak::Connect, 0, 0, EJ, || Some(())));
        }
    }

    #[test]
    fn in_flight_ends_when_the_guard_drops_even_if_abandoned() {
        let h = TargetHealth::default();
        let fut = async {
            let _g = h.enter();
            std::future::pending::<()>().await;
        };
        {
            let mut fut = Box::pin(fut);
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            assert!(std::future::Future::poll(fut.as_mut(), &mut cx).is_pending());
            assert_eq!(h.in_flight(), 1);
            // Dropped half-way, as a cancelled request's future is.
        }
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn failures_while_ejected_do_not_count() {
        let h = TargetHealth::default();
        for _ in 0..2 {
            assert!(!fail(&h, 0));
        }
        assert!(fail(&h, 0)); // ejected until 1000
        for _ in 0..10 {
            assert!(!fail(&h, 500)); // late failures of requests sent before
        }
        // Back: a fresh streak is needed to eject again.
        assert!(!fail(&h, 1000));
        assert!(!fail(&h, 1000));
        assert!(fail(&h, 1000));
    }

    #[test]
    fn turning_active_checks_off_forgets_their_verdict() {
        let h = TargetHealth::default();
        for _ in 0..3 {
            h.checked(false, 2, 3);
        }
        assert!(!h.available(1));
        h.clear_active();
        assert!(h.available(1));
    }

    #[test]
    fn active_checks_flip_after_thresholds() {
        let h = TargetHealth::default();
        assert_eq!(h.checked(false, 2, 3), None);
        assert_eq!(h.checked(false, 2, 3), None);
        assert_eq!(h.checked(false, 2, 3), Some(false));
        assert!(!h.available(1));
        assert_eq!(h.checked(false, 2, 3), None);
        assert_eq!(h.checked(true, 2, 3), None);
        assert_eq!(h.checked(false, 2, 3), None);
        assert_eq!(h.checked(true, 2, 3), None);
        assert_eq!(h.checked(true, 2, 3), Some(true));
        assert!(h.available(1));
        assert_eq!(h.checked(true, 2, 3), None);
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
