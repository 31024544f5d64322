//! Retries: the retry budget that keeps retries from amplifying an outage, the backoff
//! between tries (exponential with full jitter), and the `retries:` configuration.
//!
//! # The budget
//!
//! In the style of Finagle's and linkerd's retry budgets: every request deposits
//! `ratio` tokens, every retry withdraws one, and tokens expire `window` after they
//! were deposited. On top of that, `min_per_second` retries are allowed in every
//! second whatever the balance, so a quiet upstream can still be retried.
//!
//! Time is cut into one-second buckets (`window` must be whole seconds, 1s-60s); the
//! window at time `t` is the bucket of `t` and the `window − 1` before it, so a
//! deposit made in second `s` counts until second `s + window` starts. Tokens are kept
//! in thousandths, so a `ratio` of `0.2` deposits exactly 200 per request and the
//! arithmetic is exact. A retry at `t` is allowed when either
//!
//! 1. fewer than `min_per_second` retries were allowed in the bucket of `t` (the
//!    floor), or
//! 2. the balance of the window (deposits − withdrawals) is at least one token;
//!
//! and every allowed retry withdraws one token, including the floor's (the balance can
//! go negative; the debt expires with its bucket). So the floor is a floor, not an
//! addition: at a steady request rate the budget allows max(ratio × requests/s,
//! min_per_second) retries per second, e.g. 100 requests/s at 0.2 allow 20 retries/s
//! and 20 requests/s allow 10/s (Finagle adds the two). The worst case within one
//! window, when the deposits are spent at its start and the floor is used for the
//! rest of it, is ratio × requests + min_per_second × window seconds.
//!
//! # Concurrency
//!
//! A deposit (once per request) is one atomic load and one `fetch_add`. The first
//! caller in a new second resets that second's bucket under a small mutex (once per
//! second; the others see the bucket's second already set and take no lock). A
//! withdrawal (only for retries) sums the window's buckets; the check and the
//! withdrawal are not one atomic step, so concurrent retries can overdraw the balance
//! by at most the number of retries racing, which the next ones pay back.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
pub use portico_config::resilience::{
    backoff, BackoffConfig, BudgetConfig, RetriesConfig, RetryOn, MAX_ATTEMPTS, MAX_WINDOW_SECS,
};

/// Thousandths of a token withdrawn by one retry.
const TOKEN: i64 = 1000;

/// Runtime settings of a retry budget (see [`BudgetConfig`] for the file form).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetSettings {
    /// Tokens deposited per request: the share of requests that may be retried.
    pub ratio: f64,
    /// Retries allowed in every second whatever the balance.
    pub min_per_second: u32,
    /// How long deposits count (whole seconds, 1s-60s; rounded up and clamped).
    pub window: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

struct Bucket {
    /// The second this bucket holds (`u64::MAX`: none yet).
    sec: AtomicU64,
    /// Deposits minus withdrawals, in thousandths of a token.
    tokens: AtomicI64,
    /// Retries allowed by the floor in this second.
    floor: AtomicU32,
}

/// A retry budget shared by the requests of an upstream (or a route).
pub struct RetryBudget {
    deposit: i64,
    min_per_second: u32,
    secs: u64,
    buckets: Box<[Bucket]>,
    rotate: Mutex<()>,
    /// Withdrawals granted (retries and hedges sent) and refused (budget spent).
    pub granted: AtomicU64,
    pub refused: AtomicU64,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("deposit_milli", &self.deposit)
            .field("min_per_second", &self.min_per_second)
            .field("window_secs", &self.secs)
            .finish()
    }
}

impl RetryBudget {
    /// A budget with nothing deposited. Out-of-range settings are clamped (ratio to
    /// 0..=1, window to whole seconds in 1s..=60s).
    pub fn new(settings: BudgetSettings) -> Self {
        let ratio = if settings.ratio.is_nan() {
            0.0
        } else {
            settings.ratio.clamp(0.0, 1.0)
        };
        let w = settings.window;
        let secs = w
            .as_secs()
            .saturating_add(u64::from(w.subsec_nanos() > 0))
            .clamp(1, MAX_WINDOW_SECS);
        RetryBudget {
            deposit: (ratio * TOKEN as f64).round() as i64,
            min_per_second: settings.min_per_second,
            secs,
            buckets: (0..secs)
                .map(|_| Bucket {
                    sec: AtomicU64::new(u64::MAX),
                    tokens: AtomicI64::new(0),
                    floor: AtomicU32::new(0),
                })
                .collect(),
            rotate: Mutex::new(()),
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The window, in seconds, after clamping.
    pub fn window_secs(&self) -> u64 {
        self.secs
    }

    /// The bucket of second `sec`, reset if it still holds an older second. `None`
    /// when it already holds a later one (a caller with a stale clock reading).
    fn bucket(&self, sec: u64) -> Option<&Bucket> {
        let b = self.buckets.get((sec % self.secs) as usize)?;
        let held = b.sec.load(Ordering::Acquire);
        if held == sec {
            return Some(b);
        }
        if held != u64::MAX && held > sec {
            return None;
        }
        let _g = self.rotate.lock();
        let held = b.sec.load(Ordering::Acquire);
        if held == sec {
            return Some(b);
        }
        if held != u64::MAX && held > sec {
            return None;
        }
        b.tokens.store(0, Ordering::Relaxed);
        b.floor.store(0, Ordering::Relaxed);
        b.sec.store(sec, Ordering::Release);
        Some(b)
    }

    /// A request arrived: deposit `ratio` tokens. Call once per client request (not per
    /// try).
    pub fn deposit(&self, now_ms: u64) {
        if let Some(b) = self.bucket(now_ms / 1000) {
            b.tokens.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Ask to retry: true (and one token withdrawn) when the floor of this second or the
    /// balance allows it.
    pub fn try_withdraw(&self, now_ms: u64) -> bool {
        let sec = now_ms / 1000;
        let Some(b) = self.bucket(sec) else {
            return false;
        };
        let min = self.min_per_second;
        let floor = b
            .floor
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < min).then_some(n + 1)
            })
            .is_ok();
        if floor || self.balance_milli(sec) >= TOKEN {
            b.tokens.fetch_sub(TOKEN, Ordering::Relaxed);
            self.granted.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The balance of the window at `now` in tokens (negative when the floor's retries
    /// outran the deposits), for metrics.
    pub fn balance(&self, now_ms: u64) -> f64 {
        self.balance_milli(now_ms / 1000) as f64 / TOKEN as f64
    }

    fn balance_milli(&self, sec: u64) -> i64 {
        self.buckets
            .iter()
            .filter(|b| {
                let s = b.sec.load(Ordering::Acquire);
                s <= sec && s.saturating_add(self.secs) > sec
            })
            .map(|b| b.tokens.load(Ordering::Relaxed))
            .sum()
    }
}

impl From<&BudgetConfig> for BudgetSettings {
    fn from(c: &BudgetConfig) -> Self {
        BudgetSettings {
            ratio: c.ratio.0,
            min_per_second: c.min_per_second,
            window: c.window.0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn budget(ratio: f64, min_per_second: u32, window_secs: u64) -> RetryBudget {
        RetryBudget::new(BudgetSettings {
            ratio,
            min_per_second,
            window: Duration::from_secs(window_secs),
        })
    }

    /// Retries allowed out of `tries` attempts at `now`.
    fn retries(b: &RetryBudget, now: u64, tries: u32) -> u32 {
        (0..tries).filter(|_| b.try_withdraw(now)).count() as u32
    }

    #[test]
    fn budget_100_requests_per_second_allow_20_retries_per_second() {
        let b = budget(0.2, 10, 10);
        // 60 seconds: 100 requests spread over each second, then as many retries as
        // anyone could want at the end of it.
        for sec in 0..60u64 {
            for i in 0..100 {
                b.deposit(sec * 1000 + i * 10);
            }
            assert_eq!(retries(&b, sec * 1000 + 999, 1000), 20, "second {sec}");
        }
    }

    #[test]
    fn budget_interleaved_requests_and_retries() {
        // Each request fails and asks for a retry right away.
        let b = budget(0.2, 10, 10);
        let mut per_sec = Vec::new();
        for sec in 0..30u64 {
            let mut n = 0;
            for i in 0..100 {
                let now = sec * 1000 + i * 10;
                b.deposit(now);
                n += u32::from(b.try_withdraw(now));
            }
            per_sec.push(n);
        }
        // The floor's 10 come first each second (overdrawing the balance), then the
        // deposits of that second pay them back and allow 10 more: 20 every second.
        assert!(per_sec.iter().all(|n| *n == 20), "{per_sec:?}");
    }

    #[test]
    fn budget_floor_with_no_traffic() {
        let b = budget(0.2, 10, 10);
        for sec in 0..30u64 {
            assert_eq!(retries(&b, sec * 1000 + 500, 50), 10, "second {sec}");
        }
        // Spread over a second, the floor is per second, not per call.
        let b = budget(0.2, 10, 10);
        let n: u32 = (0..100).map(|i| retries(&b, 100_000 + i * 10, 1)).sum();
        assert_eq!(n, 10);
        // No floor: nothing without traffic.
        let b = budget(0.2, 0, 10);
        assert_eq!(retries(&b, 1, 5), 0);
    }

    #[test]
    fn budget_floor_is_a_floor_not_an_addition() {
        // 20 requests/s at 0.2 earn 4 retries/s, less than the floor: 10/s.
        let b = budget(0.2, 10, 10);
        for sec in 0..30u64 {
            for i in 0..20 {
                b.deposit(sec * 1000 + i * 50);
            }
            assert_eq!(retries(&b, sec * 1000 + 999, 100), 10, "second {sec}");
        }
        // 60 requests/s earn 12/s, more than the floor: 12/s, not 22/s.
        let b = budget(0.2, 10, 10);
        for sec in 0..30u64 {
            for i in 0..60 {
                b.deposit(sec * 1000 + i * 15);
            }
            assert_eq!(retries(&b, sec * 1000 + 999, 100), 12, "second {sec}");
        }
    }

    #[test]
    fn budget_tokens_expire_after_the_window() {
        let b = budget(0.2, 10, 10);
        for _ in 0..1000 {
            b.deposit(0);
        }
        assert_eq!(b.balance(0), 200.0);
        assert_eq!(b.balance(9_999), 200.0);
        assert_eq!(b.balance(10_000), 0.0);
        // Still there at the end of the window: 200 retries (the floor's 10 are paid
        // from the balance too).
        assert_eq!(retries(&b, 9_999, 1000), 200);
        let b = budget(0.2, 10, 10);
        for _ in 0..1000 {
            b.deposit(0);
        }
        // Gone once it is over: only the floor.
        assert_eq!(retries(&b, 10_000, 1000), 10);
        // A window of 1s.
        let b = budget(0.5, 0, 1);
        for _ in 0..10 {
            b.deposit(1_500);
        }
        assert_eq!(b.balance(1_999), 5.0);
        assert_eq!(b.balance(2_000), 0.0);
    }

    #[test]
    fn budget_withdrawals_expire_too() {
        let b = budget(0.2, 0, 2);
        for _ in 0..100 {
            b.deposit(0);
        }
        assert_eq!(retries(&b, 0, 100), 20);
        for _ in 0..100 {
            b.deposit(1_000);
        }
        // The first second's deposits were spent.
        assert_eq!(retries(&b, 1_000, 100), 20);
        for _ in 0..100 {
            b.deposit(2_000);
        }
        // Second 0 left the window with its deposits and its withdrawals.
        assert_eq!(retries(&b, 2_000, 100), 20);
    }

    #[test]
    fn budget_settings_clamped_and_stale_clock() {
        let b = RetryBudget::new(BudgetSettings {
            ratio: f64::NAN,
            min_per_second: 1,
            window: Duration::from_millis(1500),
        });
        assert_eq!(b.window_secs(), 2);
        assert_eq!(
            RetryBudget::new(BudgetSettings {
                window: Duration::ZERO,
                ..Default::default()
            })
            .window_secs(),
            1
        );
        assert_eq!(
            RetryBudget::new(BudgetSettings {
                window: Duration::MAX,
                ..Default::default()
            })
            .window_secs(),
            60
        );
        b.deposit(5_000);
        assert!(b.try_withdraw(5_000));
        // A reading of the clock older than the bucket's second changes nothing.
        b.deposit(3_000);
        assert!(!b.try_withdraw(3_000));
    }

    #[test]
    fn budget_concurrent_deposits_all_count() {
        let b = budget(0.2, 0, 10);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || {
                    for i in 0..2500u64 {
                        b.deposit((t + i) % 3 * 1000);
                    }
                });
            }
        });
        // 10 000 requests at 0.2.
        assert_eq!(b.balance(2_500), 2000.0);
    }

    #[test]
    fn budget_backoff_bounds() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        let caps: Vec<u128> = (0..6)
            .map(|a| backoff(a, base, max, 1.0).as_millis())
            .collect();
        assert_eq!(caps, [25, 50, 100, 200, 250, 250]);
        for a in 0..40 {
            assert_eq!(backoff(a, base, max, 0.0), Duration::ZERO);
            assert!(backoff(a, base, max, 0.999_999) <= max);
        }
        assert_eq!(backoff(u32::MAX, base, max, 1.0), max);
        assert_eq!(
            backoff(70, Duration::MAX, Duration::MAX, 0.999_999_999),
            Duration::MAX.mul_f64(0.999_999_999).min(Duration::MAX)
        );
        assert_eq!(backoff(2, base, max, f64::NAN), Duration::ZERO);
        assert_eq!(backoff(2, base, max, -3.0), Duration::ZERO);
        assert_eq!(backoff(2, base, max, 7.0), Duration::from_millis(100));
    }

    #[test]
    fn budget_backoff_jitter_range() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        // Full jitter: uniform over [0, cap), proportional to the random number.
        assert_eq!(backoff(1, base, max, 0.5), Duration::from_millis(25));
        assert_eq!(backoff(3, base, max, 0.25), Duration::from_millis(50));
        assert_eq!(backoff(9, base, max, 0.1), Duration::from_millis(25));
        let xs: Vec<Duration> = (0..100)
            .map(|i| backoff(2, base, max, f64::from(i) / 100.0))
            .collect();
        assert!(xs.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(xs[0], Duration::ZERO);
        assert_eq!(xs[99], Duration::from_micros(99_000));
    }

    #[test]
    fn budget_settings_from_config() {
        let c = RetriesConfig::default();
        assert_eq!(BudgetSettings::from(&c.budget), BudgetSettings::default());
        assert_eq!(c.backoff(0, 1.0), Duration::from_millis(25));
        assert_eq!(c.backoff(10, 1.0), Duration::from_millis(250));
    }
}
