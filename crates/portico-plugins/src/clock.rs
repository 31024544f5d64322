//! The request path's clock: read once per turn of a worker's event loop, not once per
//! use.
//!
//! A proxied request used to read the monotonic clock about eight times (start, the
//! upstream try, the pool's idle stamps, health, latency at the end); in a virtual
//! machine each read is a `clock_gettime` costing tens of nanoseconds, about 2 % of the
//! gateway's CPU per request. Like nginx's cached time, [`now`] returns the time read
//! at the first use after the worker last woke up (the runtime calls [`tick`] each time
//! it unparks), so every request handled in one turn shares one reading. The error is
//! bounded by the time the turn has run so far; a turn that never parks re-reads the
//! clock every [`MAX_READS`] uses.
//!
//! Only threads whose runtime calls [`tick`] (the gateway's workers) use the cache:
//! elsewhere (tests with paused time, the admin runtime, tools) [`now`] reads the clock
//! each time. Timers (`tokio::time::sleep`) keep their own exact clock.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::time::Instant;

/// Uses of one reading before the clock is read again even without a new turn.
pub const MAX_READS: u32 = 64;

/// One worker's cached reading, in cells of their own: a use that hits the cache reads
/// and decrements `left` and reads the value it wants, nothing more (copying the whole
/// cache in and out of one cell cost about 50 instructions per use).
struct Cache {
    /// Uses left of the current reading; 0: read the clock at the next use.
    left: Cell<u32>,
    enabled: Cell<bool>,
    at: Cell<Option<Instant>>,
    /// `at` in [`ms_at`]'s milliseconds (worked out once per reading: comparing
    /// `Instant`s costs a checked subtraction each time).
    ms: Cell<u64>,
}

thread_local! {
    static CACHE: Cache = const {
        Cache {
            left: Cell::new(0),
            enabled: Cell::new(false),
            at: Cell::new(None),
            ms: Cell::new(0),
        }
    };
}

/// The origin of [`ms_at`]'s milliseconds: the first use in the process.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds from the process's clock origin to `t`, plus one (so that 0 can mean
/// "never"). On tokio's clock, so tests can pause time.
pub fn ms_at(t: Instant) -> u64 {
    t.saturating_duration_since(base()).as_millis() as u64 + 1
}

/// A new turn of this thread's event loop: the next [`now`] reads the clock. Also turns
/// the cache on for this thread. Install with the runtime builder's
/// `on_thread_unpark`.
pub fn tick() {
    CACHE.with(|c| {
        c.enabled.set(true);
        c.left.set(0);
    });
}

/// The time, as read at the first use in this turn of the event loop.
#[inline]
pub fn now() -> Instant {
    CACHE.with(|c| match c.at.get() {
        Some(t) if use_cached(c) => t,
        _ => read(c).0,
    })
}

/// [`now`] in [`ms_at`]'s milliseconds.
#[inline]
pub fn now_ms() -> u64 {
    CACHE.with(|c| if use_cached(c) { c.ms.get() } else { read(c).1 })
}

/// Whether the cached reading may serve this use (and count the use if so).
#[inline]
fn use_cached(c: &Cache) -> bool {
    let left = c.left.get();
    if left == 0 {
        return false;
    }
    c.left.set(left - 1);
    true
}

/// Read the clock; where the cache is on, keep the reading for the next uses.
#[cold]
fn read(c: &Cache) -> (Instant, u64) {
    let t = Instant::now();
    let ms = ms_at(t);
    if c.enabled.get() {
        c.at.set(Some(t));
        c.ms.set(ms);
        c.left.set(MAX_READS - 1);
    }
    (t, ms)
}

/// The time since `t` by [`now`].
#[inline]
pub fn since(t: Instant) -> std::time::Duration {
    now().saturating_duration_since(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn uncached_until_a_turn_then_one_reading_per_turn() {
        std::thread::spawn(|| {
            // Not enabled: every call reads the clock.
            let a = now();
            std::thread::sleep(Duration::from_millis(2));
            assert!(now() > a);
            tick();
            let b = now();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(now(), b, "the same turn shares one reading");
            assert_eq!(now_ms(), ms_at(b), "milliseconds of the same reading");
            tick();
            assert!(now() > b, "a new turn reads the clock again");
            assert!(now_ms() > ms_at(b));
            // A turn that never ends still moves on after MAX_READS uses.
            let c = now();
            std::thread::sleep(Duration::from_millis(2));
            let mut later = c;
            for _ in 0..MAX_READS {
                later = now();
            }
            assert!(later > c);
        })
        .join()
        .expect("clock test thread");
    }
}
