//! Adaptive concurrency: an upstream's limit on requests in flight that adjusts itself
//! from observed latency, shedding the excess with 503 before the upstream falls over.
//!
//! The controller is a gradient one, after Envoy's adaptive concurrency filter and
//! Netflix's concurrency-limits:
//!
//! - **No-load latency.** At start, and every `min_rtt_interval`, the limit drops to
//!   `min_limit` until `min_samples` requests *started in that phase* have answered;
//!   their mean latency is the upstream's no-load latency (`min_rtt`). The limit then
//!   returns to where it was. (Measuring under load would take a standing queue for
//!   normal.)
//! - **Each window** (`window`): `sample` = the window's mean latency;
//!   `gradient` = clamp(`tolerance` × `min_rtt` / `sample`, 0.5, 1): 1 while answers
//!   are no slower than `tolerance` times the no-load latency, falling as queues build;
//!   the new limit = `limit` × `gradient` + √`limit` (headroom to probe upwards),
//!   moved `smoothing` of the way from the old one, within [`min_limit`, `max_limit`].
//!   A window in which the upstream never had half the limit in flight does not raise
//!   the limit (low load says nothing about capacity).
//!
//! What is limited is each try while it is in flight to the upstream: the caller
//! takes a slot ([`AdaptiveLimit::try_acquire`]) just before sending, samples the
//! time to the response head, and frees the slot then (or when the try fails), not
//! while it reads a request body from the client or pauses between retries.
//!
//! Per try: one `fetch_add` to enter (refused at the limit), at the end one
//! `fetch_sub`, a few `fetch_add`s to the window and a clock read; the window's end
//! is claimed by one thread with a compare-exchange. No locks.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use portico_config::resilience::AdaptiveConcurrency as Settings;

/// An upstream's adaptive limit (outlives snapshots while its settings are unchanged).
#[derive(Debug)]
pub struct AdaptiveLimit {
    settings: Settings,
    /// The current limit.
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// The most in flight seen this window.
    peak: AtomicU32,
    /// Sum of latencies (µs) and count of samples in the window.
    sum_us: AtomicU64,
    samples: AtomicU64,
    /// When the window started (ms on the caller's clock); claimed to close it.
    window_start: AtomicU64,
    /// The no-load latency in µs, as f64 bits (0: not measured yet).
    min_rtt_us: AtomicU64,
    /// Measuring the no-load latency now.
    measuring: AtomicBool,
    /// The limit to return to after measuring.
    saved_limit: AtomicU32,
    /// When the next measurement starts (ms).
    next_measure: AtomicU64,
    /// Counts phase changes: only samples of requests admitted in the current
    /// measuring phase count towards `min_rtt`.
    epoch: AtomicU64,
    /// Tries refused.
    pub shed: AtomicU64,
}

/// A try admitted (in flight to the upstream); dropping it releases its slot.
#[derive(Debug)]
pub struct Admitted<'a> {
    limit: &'a AdaptiveLimit,
    epoch: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admitted<'_> {
    /// A try got its answer (or timed out) after `latency`, at `now` (ms).
    pub fn sample(&self, latency: Duration, now: u64) {
        self.limit.sample(latency, now, self.epoch);
    }
}

impl AdaptiveLimit {
    pub fn new(settings: Settings, now: u64) -> AdaptiveLimit {
        let initial = settings
            .initial_limit
            .clamp(settings.min_limit, settings.max_limit);
        AdaptiveLimit {
            limit: AtomicU32::new(settings.min_limit),
            saved_limit: AtomicU32::new(initial),
            measuring: AtomicBool::new(true),
            next_measure: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            settings,
            in_flight: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            sum_us: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            window_start: AtomicU64::new(now),
            min_rtt_us: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The measured no-load latency.
    pub fn min_rtt(&self) -> Option<Duration> {
        let us = f64::from_bits(self.min_rtt_us.load(Ordering::Relaxed));
        (us > 0.0).then(|| Duration::from_micros(us as u64))
    }

    /// Whether the no-load latency is being measured.
    pub fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// Admit a try about to be sent, or refuse it (`None`, counted in `shed`) when the
    /// limit is reached. Hold the slot only while the try is in flight.
    pub fn try_acquire(&self) -> Option<Admitted<'_>> {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.limit.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.shed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(Admitted {
            limit: self,
            epoch: self.epoch.load(Ordering::Relaxed),
        })
    }

    /// Whether a try would be refused now; if so it counts as refused (`shed`). For a
    /// request about to start work on the upstream's behalf before its first try (a
    /// mirrored copy): one the limit would refuse does not start it.
    pub fn shed_if_full(&self) -> bool {
        let full = self.in_flight.load(Ordering::Relaxed) >= self.limit.load(Ordering::Relaxed);
        if full {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        full
    }

    fn sample(&self, latency: Duration, now: u64, epoch: u64) {
        let measuring = self.measuring.load(Ordering::Relaxed);
        if measuring && epoch != self.epoch.load(Ordering::Relaxed) {
            return; // started before this measurement: it says nothing about no load
        }
        self.sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        let start = self.window_start.load(Ordering::Relaxed);
        let window_ms = self.settings.window.0.as_millis() as u64;
        if now < start + window_ms
            || self
                .window_start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let sum = self.sum_us.swap(0, Ordering::Relaxed);
        let n = self.samples.swap(0, Ordering::Relaxed);
        let peak = self
            .peak
            .swap(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        if n < u64::from(self.settings.min_samples) {
            // Too few to judge: kept for the next window.
            self.sum_us.fetch_add(sum, Ordering::Relaxed);
            self.samples.fetch_add(n, Ordering::Relaxed);
            return;
        }
        let mean = sum as f64 / n as f64;
        if measuring {
            self.min_rtt_us
                .store(mean.max(1.0).to_bits(), Ordering::Relaxed);
            self.limit
                .store(self.saved_limit.load(Ordering::Relaxed), Ordering::Relaxed);
            self.next_measure.store(
                now + self.settings.min_rtt_interval.0.as_millis() as u64,
                Ordering::Relaxed,
            );
            self.epoch.fetch_add(1, Ordering::Relaxed);
            self.measuring.store(false, Ordering::Relaxed);
            return;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        if now >= self.next_measure.load(Ordering::Relaxed) {
            self.saved_limit.store(limit, Ordering::Relaxed);
            self.epoch.fetch_add(1, Ordering::Relaxed);
            self.measuring.store(true, Ordering::Relaxed);
            self.limit.store(self.settings.min_limit, Ordering::Relaxed);
            return;
        }
        let min_rtt = f64::from_bits(self.min_rtt_us.load(Ordering::Relaxed)).max(1.0);
        let limit = f64::from(limit);
        let gradient = (self.settings.tolerance * min_rtt / mean.max(1.0)).clamp(0.5, 1.0);
        let mut target = limit * gradient + limit.sqrt();
        if f64::from(peak) < limit / 2.0 {
            // Not enough load to learn anything about more capacity.
            target = target.min(limit);
        }
        let s = self.settings.smoothing;
        let next = (limit * (1.0 - s) + target * s).round() as u32;
        let next = next.clamp(self.settings.min_limit, self.settings.max_limit);
        self.limit.store(next, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use portico_config::units::Dur;

    fn settings() -> Settings {
        Settings {
            initial_limit: 20,
            min_limit: 3,
            max_limit: 200,
            window: Dur(Duration::from_millis(100)),
            min_samples: 3,
            tolerance: 1.5,
            smoothing: 0.5,
            min_rtt_interval: Dur(Duration::from_secs(30)),
        }
    }

    /// Run `rounds` windows: each admits up to `offered` requests at once, which all
    /// answer at the window's end after `latency(in flight)` ms. Returns the limit.
    fn drive(
        l: &AdaptiveLimit,
        clock: &mut u64,
        rounds: u32,
        offered: u32,
        latency: impl Fn(u32) -> u64,
    ) -> u32 {
        for _ in 0..rounds {
            let held: Vec<_> = (0..offered).filter_map(|_| l.try_acquire()).collect();
            let ms = latency(held.len() as u32);
            *clock += 100;
            for a in held {
                a.sample(Duration::from_millis(ms), *clock);
            }
        }
        l.limit()
    }

    /// An upstream whose latency is 2 ms per request in flight.
    fn queueing(n: u32) -> u64 {
        2 * u64::from(n)
    }

    #[test]
    fn starts_by_measuring_the_no_load_latency() {
        let l = AdaptiveLimit::new(settings(), 0);
        let mut clock = 0;
        assert!(l.measuring());
        assert_eq!(l.limit(), 3);
        // The first window closes with the first sample after it ends.
        drive(&l, &mut clock, 2, 100, queueing);
        assert!(!l.measuring());
        assert_eq!(l.min_rtt(), Some(Duration::from_millis(6)));
        assert_eq!(l.limit(), 20, "back to the initial limit");
    }

    #[test]
    fn a_standing_queue_brings_the_limit_down_to_what_the_upstream_serves_fast() {
        let l = AdaptiveLimit::new(settings(), 0);
        let mut clock = 0;
        drive(&l, &mut clock, 2, 100, queueing);
        // 100 clients: at 20 in flight answers take 40 ms, 6.7 × the no-load 6 ms.
        let settled = drive(&l, &mut clock, 40, 100, queueing);
        // 1.5 × 6 ms allows about 4-5 in flight (2 ms each) plus headroom.
        assert!(settled <= 8, "{settled}");
        assert!(settled >= 3);
    }

    #[test]
    fn a_fast_upstream_under_load_lets_the_limit_grow() {
        let l = AdaptiveLimit::new(settings(), 0);
        let mut clock = 0;
        let grown = drive(&l, &mut clock, 30, 300, |_| 10);
        assert!(grown > 60, "{grown}");
        assert!(grown <= 200);
    }

    #[test]
    fn low_load_does_not_raise_the_limit() {
        let l = AdaptiveLimit::new(settings(), 0);
        let mut clock = 0;
        assert_eq!(drive(&l, &mut clock, 20, 3, |_| 10), 20);
    }

    #[test]
    fn the_no_load_latency_is_measured_again_periodically() {
        let s = Settings {
            min_rtt_interval: Dur(Duration::from_secs(2)),
            ..settings()
        };
        let l = AdaptiveLimit::new(s, 0);
        let mut clock = 0;
        drive(&l, &mut clock, 2, 100, |_| 10);
        assert_eq!(l.min_rtt(), Some(Duration::from_millis(10)));
        // The upstream became slower for good (20 ms even alone): after the next
        // measurement the new normal is learnt instead of shedding forever.
        drive(&l, &mut clock, 25, 100, |_| 20);
        assert_eq!(l.min_rtt(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn requests_above_the_limit_are_shed_and_slots_come_back() {
        let l = AdaptiveLimit::new(settings(), 0);
        let held: Vec<_> = (0..3).map(|_| l.try_acquire().unwrap()).collect();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.shed.load(Ordering::Relaxed), 1);
        assert!(l.shed_if_full());
        assert_eq!(l.shed.load(Ordering::Relaxed), 2);
        drop(held);
        assert!(!l.shed_if_full());
        assert_eq!(l.shed.load(Ordering::Relaxed), 2);
        assert!(l.try_acquire().is_some());
    }
}

/// Recent latencies of an upstream as a decaying log-scale histogram (buckets a
/// factor √2 apart), for percentiles such as hedging's `p95`. Lock-free; when the
/// count passes [`RECENT_WINDOW`], every bucket is halved, so old samples fade.
#[derive(Debug)]
pub struct RecentLatency {
    buckets: [AtomicU32; 64],
    total: AtomicU32,
    /// Hedges sent, and those whose answer was used.
    pub hedges_sent: AtomicU64,
    pub hedges_won: AtomicU64,
}

/// Samples after which the histogram halves.
pub const RECENT_WINDOW: u32 = 2048;

impl Default for RecentLatency {
    fn default() -> Self {
        RecentLatency {
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            total: AtomicU32::new(0),
            hedges_sent: AtomicU64::new(0),
            hedges_won: AtomicU64::new(0),
        }
    }
}

impl RecentLatency {
    fn bucket(d: Duration) -> usize {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64 + 1;
        // 2·log2(us), by integer parts: the leading bit, plus one if the next is set.
        let lead = 63 - us.leading_zeros() as usize;
        let half = if lead > 0 && (us >> (lead - 1)) & 1 == 1 {
            1
        } else {
            0
        };
        (2 * lead + half).min(63)
    }

    /// The upper bound of bucket `i`.
    fn bound(i: usize) -> Duration {
        let us = 2f64.powf((i as f64 + 1.0) / 2.0);
        Duration::from_micros(us as u64)
    }

    pub fn record(&self, d: Duration) {
        self.buckets[Self::bucket(d)].fetch_add(1, Ordering::Relaxed);
        let n = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= RECENT_WINDOW
            && self
                .total
                .compare_exchange(n, n / 2, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            for b in &self.buckets {
                let v = b.load(Ordering::Relaxed);
                b.store(v / 2, Ordering::Relaxed);
            }
        }
    }

    /// The `q` quantile (0–1), rounded up to its bucket's bound; `None` with fewer than
    /// `min` samples.
    pub fn quantile(&self, q: f64, min: u32) -> Option<Duration> {
        let counts: Vec<u32> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let sum: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if sum < u64::from(min) || sum == 0 {
            return None;
        }
        let want = (q * sum as f64).ceil() as u64;
        let mut acc = 0u64;
        for (i, c) in counts.iter().enumerate() {
            acc += u64::from(*c);
            if acc >= want {
                return Some(Self::bound(i));
            }
        }
        Some(Self::bound(63))
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    #[test]
    fn p95_follows_the_slow_tail() {
        let r = RecentLatency::default();
        assert_eq!(r.quantile(0.95, 20), None);
        for _ in 0..90 {
            r.record(Duration::from_millis(2));
        }
        for _ in 0..10 {
            r.record(Duration::from_millis(100));
        }
        let p95 = r.quantile(0.95, 20).unwrap_or_default();
        // Within a bucket (factor √2) above 100 ms.
        assert!(
            p95 >= Duration::from_millis(100) && p95 <= Duration::from_millis(142),
            "{p95:?}"
        );
        let p50 = r.quantile(0.5, 20).unwrap_or_default();
        assert!(
            p50 >= Duration::from_millis(2) && p50 <= Duration::from_millis(3),
            "{p50:?}"
        );
    }

    #[test]
    fn old_samples_fade() {
        let r = RecentLatency::default();
        for _ in 0..RECENT_WINDOW {
            r.record(Duration::from_millis(100));
        }
        for _ in 0..(RECENT_WINDOW * 4) {
            r.record(Duration::from_millis(1));
        }
        let p95 = r.quantile(0.95, 20).unwrap_or_default();
        assert!(p95 <= Duration::from_millis(2), "{p95:?}");
    }
}
