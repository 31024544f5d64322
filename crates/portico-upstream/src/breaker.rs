//! Circuit breaker: a per-upstream (or per-target) state machine that stops sending
//! requests to an upstream that keeps failing, and probes it again after a while.
//!
//! ```text
//!            failure rate ≥ threshold (≥ min_requests in window)
//!            or consecutive failures ≥ limit
//!   Closed ───────────────────────────────────────────────▶ Open
//!     ▲                                                     │  ▲
//!     │ half_open_requests trial successes     open_for     │  │ any trial failure
//!     │ (window reset)                         elapsed      ▼  │ (open time doubles, ≤ max_open_for)
//!     └──────────────────────────────────────────────── HalfOpen
//! ```
//!
//! Time is always passed in (`now_ms`, the clock of [`crate::now_ms`]), so every
//! transition can be tested on a controllable clock.
//!
//! # Concurrency
//!
//! Lock-free. The whole state (phase, epoch, open-time level, and either the time the
//! open period ends or the half-open trial counters) is packed into one `AtomicU64`
//! that transitions replace with a compare-and-swap, so exactly one caller sees (and
//! reports) each transition. The closed-state sliding window is a ring of bits in
//! `AtomicU64`s (1 = failure) plus a position counter. The hot path (closed, a success)
//! is: one load of the state word when acquiring; one load, one `fetch_add` and one
//! `fetch_and` when recording (plus a store only if a failure streak was running). A
//! failure also counts the set bits of the ring (at most 16 words) to get the rate.
//!
//! A mutex around a small ring would have been simpler, but every request to the
//! upstream would take it twice, and the gateway's hot path takes no lock per request
//! (docs/design.md).
//!
//! # Permits
//!
//! [`CircuitBreaker::try_acquire`] hands out a [`Permit`] that remembers the epoch it
//! was issued in. Its outcome is reported with [`Permit::success`] or
//! [`Permit::failure`]; an outcome reported after the breaker changed state (a request
//! that started while closed and ends after the breaker opened) is ignored. Dropping a
//! permit without reporting counts as neither success nor failure (use it for requests
//! whose outcome says nothing about the upstream, e.g. the client went away); a dropped
//! half-open trial permit gives its trial slot back so another request can probe.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub use portico_config::resilience::{
    CircuitBreakerConfig, Fallback, Ratio, MAX_HALF_OPEN_REQUESTS, MAX_WINDOW,
};
use portico_config::units::Dur;
/// What a request refused in half-open (all trials in flight) is told to wait: the
/// trials' outcome is not known in advance, and `Retry-After` counts whole seconds.
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests are refused until the open period ends.
    Open,
    /// A limited number of trial requests probe the upstream.
    HalfOpen,
}

impl State {
    /// `closed`, `open`, `half_open` (for logs and metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    fn from_code(c: u64) -> State {
        match c {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Closed → Open: `failures` of the last `requests` requests failed.
    FailureRate { failures: u32, requests: u32 },
    /// Closed → Open: this many failures in a row.
    ConsecutiveFailures(u32),
    /// Open → HalfOpen: the open period ended.
    OpenElapsed,
    /// HalfOpen → Closed: this many trial requests succeeded.
    TrialsSucceeded(u32),
    /// HalfOpen → Open: a trial request failed.
    TrialFailed,
}

/// A state change, returned (once) to the caller whose call caused it, to be logged and
/// counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// How long the breaker stays open (set when `to` is [`State::Open`]).
    pub open_for: Option<Duration>,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit breaker {} → {}", self.from, self.to)?;
        match self.reason {
            Reason::FailureRate { failures, requests } => {
                write!(f, " ({failures} of the last {requests} requests failed)")?
            }
            Reason::ConsecutiveFailures(n) => write!(f, " ({n} consecutive failures)")?,
            Reason::OpenElapsed => f.write_str(" (open period over, probing)")?,
            Reason::TrialsSucceeded(n) => write!(f, " ({n} trial requests succeeded)")?,
            Reason::TrialFailed => f.write_str(" (a trial request failed)")?,
        }
        if let Some(d) = self.open_for {
            write!(f, ", open for {}", Dur(d))?;
        }
        Ok(())
    }
}

/// The breaker refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// For `Retry-After`: until the open period ends, or [`HALF_OPEN_RETRY_AFTER`]
    /// when half-open with every trial slot taken.
    pub retry_after: Duration,
    /// [`State::Open`] or [`State::HalfOpen`].
    pub state: State,
}

/// Runtime settings of a breaker (see [`CircuitBreakerConfig`] for the file form).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Requests in the sliding window (1..=[`MAX_WINDOW`]).
    pub window: u32,
    /// Share of failed requests in the window that opens the breaker (0..=1); reached
    /// or exceeded opens.
    pub failure_rate: f64,
    /// Requests the window must hold before the failure rate is considered.
    pub min_requests: u32,
    /// Failures in a row that open the breaker regardless of the rate (`None`: off).
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open the first time.
    pub open_for: Duration,
    /// Each reopening after a failed trial doubles the open time, up to this
    /// (equal to `open_for`: no growth).
    pub max_open_for: Duration,
    /// Trial requests let through when half-open; all must succeed to close.
    pub half_open_requests: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            window: 20,
            failure_rate: 0.5,
            min_requests: 10,
            consecutive_failures: Some(5),
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(30),
            half_open_requests: 3,
        }
    }
}

impl From<&CircuitBreakerConfig> for BreakerSettings {
    /// The runtime settings of a configured breaker (validate first; out-of-range
    /// values are clamped by [`CircuitBreaker::new`]).
    fn from(c: &CircuitBreakerConfig) -> Self {
        BreakerSettings {
            window: c.window,
            failure_rate: c.failure_rate.0,
            min_requests: c.min_requests,
            consecutive_failures: (c.consecutive_failures > 0).then_some(c.consecutive_failures),
            open_for: c.open_for.0,
            max_open_for: c.max_open_for.map_or(c.open_for.0, |d| d.0),
            half_open_requests: c.half_open_requests,
        }
    }
}

impl BreakerSettings {
    /// The open time after `level` reopenings in a row: `open_for · 2^level`, at most
    /// `max(open_for, max_open_for)`.
    pub fn open_time(&self, level: u32) -> Duration {
        let factor = 1u32.checked_shl(level).unwrap_or(u32::MAX);
        self.open_for
            .saturating_mul(factor)
            .min(self.max_open_for.max(self.open_for))
    }
}

// The state word: phase (2 bits) | level (5) | epoch (15) | payload (42).
// Payload when open: the time (ms) the open period ends. When half-open: trial permits
// taken (21 bits) and trial successes (21 bits). When closed: 0.
const PHASE_SHIFT: u32 = 62;
const LEVEL_SHIFT: u32 = 57;
const LEVEL_MAX: u32 = 31;
const EPOCH_SHIFT: u32 = 42;
const EPOCH_MASK: u64 = (1 << 15) - 1;
const PAYLOAD_MASK: u64 = (1 << 42) - 1;
const COUNT_BITS: u32 = 21;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    phase: State,
    level: u32,
    epoch: u64,
    payload: u64,
}

impl Word {
    fn unpack(w: u64) -> Word {
        Word {
            phase: State::from_code(w >> PHASE_SHIFT),
            level: ((w >> LEVEL_SHIFT) as u32) & LEVEL_MAX,
            epoch: (w >> EPOCH_SHIFT) & EPOCH_MASK,
            payload: w & PAYLOAD_MASK,
        }
    }

    fn pack(self) -> u64 {
        (self.phase.code() << PHASE_SHIFT)
            | (u64::from(self.level.min(LEVEL_MAX)) << LEVEL_SHIFT)
            | ((self.epoch & EPOCH_MASK) << EPOCH_SHIFT)
            | (self.payload & PAYLOAD_MASK)
    }

    fn next(self, phase: State, level: u32, payload: u64) -> Word {
        Word {
            phase,
            level,
            epoch: (self.epoch + 1) & EPOCH_MASK,
            payload,
        }
    }

    fn issued(self) -> u64 {
        self.payload >> COUNT_BITS
    }

    fn successes(self) -> u64 {
        self.payload & COUNT_MASK
    }

    fn trials(issued: u64, successes: u64) -> u64 {
        ((issued & COUNT_MASK) << COUNT_BITS) | (successes & COUNT_MASK)
    }
}

/// A circuit breaker. See the module documentation for the state machine and the
/// concurrency design.
pub struct CircuitBreaker {
    settings: BreakerSettings,
    /// `failure_rate` in parts per million, so the comparison is exact.
    rate_ppm: u64,
    word: AtomicU64,
    /// The sliding window: bit `i % window` holds the outcome of the i-th request
    /// recorded in this closed period (1 = failure).
    ring: Box<[AtomicU64]>,
    /// Requests recorded in this closed period.
    recorded: AtomicU64,
    /// Current failure streak in this closed period.
    consecutive: AtomicU32,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = Word::unpack(self.word.load(Ordering::Relaxed));
        let (failures, requests) = self.window_counts();
        f.debug_struct("CircuitBreaker")
            .field("phase", &w.phase)
            .field("failures", &failures)
            .field("requests", &requests)
            .field("settings", &self.settings)
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker. Out-of-range settings are clamped (the configuration is
    /// validated before, see [`CircuitBreakerConfig::validate`]).
    pub fn new(settings: BreakerSettings) -> Self {
        let mut s = settings;
        s.window = s.window.clamp(1, MAX_WINDOW);
        s.min_requests = s.min_requests.clamp(1, s.window);
        s.half_open_requests = s.half_open_requests.clamp(1, MAX_HALF_OPEN_REQUESTS);
        s.failure_rate = if s.failure_rate.is_nan() {
            1.0
        } else {
            s.failure_rate.clamp(0.0, 1.0)
        };
        s.consecutive_failures = s.consecutive_failures.filter(|n| *n > 0);
        s.max_open_for = s.max_open_for.max(s.open_for);
        let words = s.window.div_ceil(64) as usize;
        CircuitBreaker {
            rate_ppm: (s.failure_rate * 1e6).round() as u64,
            settings: s,
            word: AtomicU64::new(0),
            ring: (0..words).map(|_| AtomicU64::new(0)).collect(),
            recorded: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
        }
    }

    /// The settings in force (after clamping).
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// The state at `now`: an open breaker whose open period is over reports
    /// [`State::HalfOpen`] even before a request moved it there.
    pub fn state(&self, now_ms: u64) -> State {
        let w = Word::unpack(self.word.load(Ordering::Acquire));
        match w.phase {
            State::Open if now_ms >= w.payload => State::HalfOpen,
            p => p,
        }
    }

    /// Failures and requests in the sliding window (meaningful while closed).
    pub fn window_counts(&self) -> (u32, u32) {
        let recorded = self.recorded.load(Ordering::Relaxed);
        let requests = recorded.min(u64::from(self.settings.window)) as u32;
        (self.failures_in_window(), requests)
    }

    /// The current failure streak (meaningful while closed).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    /// Ask to send a request. Closed: always granted. Open: refused until the open
    /// period ends; the first request after it moves the breaker to half-open (its
    /// permit carries that transition, see [`Permit::transition`]). Half-open: at most
    /// `half_open_requests` trial permits are out at once; the rest are refused.
    pub fn try_acquire(&self, now_ms: u64) -> Result<Permit<'_>, Rejected> {
        loop {
            let cur = self.word.load(Ordering::Acquire);
            let w = Word::unpack(cur);
            match w.phase {
                State::Closed => return Ok(Permit::new(self, w.epoch, false, None)),
                State::Open => {
                    if now_ms < w.payload {
                        return Err(Rejected {
                            retry_after: Duration::from_millis(w.payload - now_ms),
                            state: State::Open,
                        });
                    }
                    let next = w.next(State::HalfOpen, w.level, Word::trials(1, 0));
                    if self.swap(cur, next) {
                        let t = Transition {
                            from: State::Open,
                            to: State::HalfOpen,
                            reason: Reason::OpenElapsed,
                            open_for: None,
                        };
                        return Ok(Permit::new(self, next.epoch, true, Some(t)));
                    }
                }
                State::HalfOpen => {
                    let issued = w.issued();
                    if issued >= u64::from(self.settings.half_open_requests) {
                        return Err(Rejected {
                            retry_after: HALF_OPEN_RETRY_AFTER,
                            state: State::HalfOpen,
                        });
                    }
                    let next = Word {
                        payload: Word::trials(issued + 1, w.successes()),
                        ..w
                    };
                    if self.swap(cur, next) {
                        return Ok(Permit::new(self, w.epoch, true, None));
                    }
                }
            }
        }
    }

    fn swap(&self, cur: u64, next: Word) -> bool {
        self.word
            .compare_exchange(cur, next.pack(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn failures_in_window(&self) -> u32 {
        self.ring
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }

    fn open_until(&self, now_ms: u64, level: u32) -> (u64, Duration) {
        let d = self.settings.open_time(level);
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (now_ms.saturating_add(ms).min(PAYLOAD_MASK), d)
    }

    fn record_closed(&self, epoch: u64, ok: bool, now_ms: u64) -> Option<Transition> {
        let cur = self.word.load(Ordering::Acquire);
        let w = Word::unpack(cur);
        if w.phase != State::Closed || w.epoch != epoch {
            return None;
        }
        let window = u64::from(self.settings.window);
        let i = self.recorded.fetch_add(1, Ordering::Relaxed);
        let slot = i % window;
        let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
        let cell = self.ring.get(word)?;
        if ok {
            cell.fetch_and(!bit, Ordering::Relaxed);
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return None;
        }
        cell.fetch_or(bit, Ordering::Relaxed);
        let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let requests = (i + 1).min(window);
        let failures = self.failures_in_window();
        let reason = match self.settings.consecutive_failures {
            Some(limit) if streak >= limit => Reason::ConsecutiveFailures(streak),
            _ if requests >= u64::from(self.settings.min_requests)
                && u64::from(failures) * 1_000_000 >= self.rate_ppm * requests =>
            {
                Reason::FailureRate {
                    failures,
                    requests: requests as u32,
                }
            }
            _ => return None,
        };
        let (until, open_for) = self.open_until(now_ms, 0);
        // The state word does not change while closed, so a failed swap means another
        // caller made the transition (and reports it).
        self.swap(cur, w.next(State::Open, 0, until))
            .then_some(Transition {
                from: State::Closed,
                to: State::Open,
                reason,
                open_for: Some(open_for),
            })
    }

    fn record_trial(&self, epoch: u64, ok: bool, now_ms: u64) -> Option<Transition> {
        loop {
            let cur = self.word.load(Ordering::Acquire);
            let w = Word::unpack(cur);
            if w.phase != State::HalfOpen || w.epoch != epoch {
                return None;
            }
            if ok {
                let successes = w.successes() + 1;
                let needed = u64::from(self.settings.half_open_requests);
                if successes < needed {
                    let next = Word {
                        payload: Word::trials(w.issued(), successes),
                        ..w
                    };
                    if self.swap(cur, next) {
                        return None;
                    }
                    continue;
                }
                // Reset the window before closing: while half-open nothing records
                // into it, so no outcome of the new closed period is lost.
                self.reset_window();
                if self.swap(cur, w.next(State::Closed, 0, 0)) {
                    return Some(Transition {
                        from: State::HalfOpen,
                        to: State::Closed,
                        reason: Reason::TrialsSucceeded(successes as u32),
                        open_for: None,
                    });
                }
            } else {
                let level = (w.level + 1).min(LEVEL_MAX);
                let (until, open_for) = self.open_until(now_ms, level);
                if self.swap(cur, w.next(State::Open, level, until)) {
                    return Some(Transition {
                        from: State::HalfOpen,
                        to: State::Open,
                        reason: Reason::TrialFailed,
                        open_for: Some(open_for),
                    });
                }
            }
        }
    }

    /// A trial permit was dropped unreported: give its slot back.
    fn release_trial(&self, epoch: u64) {
        loop {
            let cur = self.word.load(Ordering::Acquire);
            let w = Word::unpack(cur);
            if w.phase != State::HalfOpen || w.epoch != epoch || w.issued() == 0 {
                return;
            }
            let next = Word {
                payload: Word::trials(w.issued() - 1, w.successes()),
                ..w
            };
            if self.swap(cur, next) {
                return;
            }
        }
    }

    fn reset_window(&self) {
        for w in self.ring.iter() {
            w.store(0, Ordering::Relaxed);
        }
        self.recorded.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }
}

/// Permission to send one request. Report its outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported counts as neither (a half-open trial
/// slot is given back).
#[must_use = "report the outcome with success() or failure(); a dropped permit counts as neither"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    epoch: u64,
    trial: bool,
    transition: Option<Transition>,
    reported: bool,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("epoch", &self.epoch)
            .field("trial", &self.trial)
            .field("transition", &self.transition)
            .finish()
    }
}

impl<'a> Permit<'a> {
    fn new(
        breaker: &'a CircuitBreaker,
        epoch: u64,
        trial: bool,
        transition: Option<Transition>,
    ) -> Self {
        Permit {
            breaker,
            epoch,
            trial,
            transition,
            reported: false,
        }
    }

    /// The transition taking this permit caused (Open → HalfOpen for the first
    /// request after the open period), to be logged and counted by the caller.
    pub fn transition(&self) -> Option<Transition> {
        self.transition
    }

    /// Whether this is a half-open trial request.
    pub fn is_trial(&self) -> bool {
        self.trial
    }

    /// The request succeeded. Returns the transition it caused, if any.
    pub fn success(mut self, now_ms: u64) -> Option<Transition> {
        self.report(true, now_ms)
    }

    /// The request failed. Returns the transition it caused, if any.
    pub fn failure(mut self, now_ms: u64) -> Option<Transition> {
        self.report(false, now_ms)
    }

    fn report(&mut self, ok: bool, now_ms: u64) -> Option<Transition> {
        self.reported = true;
        if self.trial {
            self.breaker.record_trial(self.epoch, ok, now_ms)
        } else {
            self.breaker.record_closed(self.epoch, ok, now_ms)
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.breaker.release_trial(self.epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: u64 = 1000;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            window: 10,
            failure_rate: 0.5,
            min_requests: 6,
            consecutive_failures: None,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(10),
            half_open_requests: 2,
        }
    }

    /// Record one outcome at `now`; returns the transition, if any.
    fn record(b: &CircuitBreaker, now: u64, ok: bool) -> Option<Transition> {
        let p = b.try_acquire(now).unwrap();
        if ok {
            p.success(now)
        } else {
            p.failure(now)
        }
    }

    /// Open the breaker with consecutive failures at `now`.
    fn open(b: &CircuitBreaker, now: u64) {
        while b.state(now) == State::Closed {
            let _ = record(b, now, false);
        }
        assert_eq!(b.state(now), State::Open);
    }

    #[test]
    fn breaker_opens_on_failure_rate_only_after_min_requests() {
        let b = CircuitBreaker::new(settings());
        // 5 failures: 100% failure rate, but only 5 of the 6 required requests.
        for _ in 0..5 {
            assert_eq!(record(&b, 100, false), None);
        }
        assert_eq!(b.state(100), State::Closed);
        assert_eq!(b.window_counts(), (5, 5));
        // The 6th request is a failure: 6/6 → open.
        let t = record(&b, 100, false).unwrap();
        assert_eq!(t.from, State::Closed);
        assert_eq!(t.to, State::Open);
        assert_eq!(
            t.reason,
            Reason::FailureRate {
                failures: 6,
                requests: 6
            }
        );
        assert_eq!(t.open_for, Some(Duration::from_secs(10)));
        assert_eq!(b.state(100), State::Open);
    }

    #[test]
    fn breaker_rate_threshold_is_reached_not_only_exceeded() {
        // 0.3 of 10 is exactly 3 failures (no floating point surprise).
        let b = CircuitBreaker::new(BreakerSettings {
            failure_rate: 0.3,
            min_requests: 10,
            ..settings()
        });
        for _ in 0..8 {
            assert_eq!(record(&b, 1, true), None);
        }
        assert_eq!(record(&b, 1, false), None);
        assert_eq!(record(&b, 1, false), None); // 2 of 10
        assert_eq!(b.state(1), State::Closed);
        let t = record(&b, 1, false).unwrap(); // 3 of 10 (window slid)
        assert_eq!(
            t.reason,
            Reason::FailureRate {
                failures: 3,
                requests: 10
            }
        );
    }

    #[test]
    fn breaker_successes_below_rate_keep_it_closed() {
        let b = CircuitBreaker::new(settings());
        for i in 0..100 {
            // 40% failures (any 10 in a row hold 4)
            assert_eq!(record(&b, 1, i % 5 < 3), None);
        }
        assert_eq!(b.state(1), State::Closed);
    }

    #[test]
    fn breaker_opens_on_consecutive_failures() {
        let b = CircuitBreaker::new(BreakerSettings {
            window: 100,
            min_requests: 100,
            consecutive_failures: Some(3),
            ..settings()
        });
        for _ in 0..20 {
            assert_eq!(record(&b, 1, true), None);
        }
        assert_eq!(record(&b, 1, false), None);
        assert_eq!(record(&b, 1, false), None);
        assert_eq!(record(&b, 1, true), None); // the streak ends
        assert_eq!(record(&b, 1, false), None);
        assert_eq!(record(&b, 1, false), None);
        assert_eq!(b.consecutive_failures(), 2);
        let t = record(&b, 1, false).unwrap();
        assert_eq!(t.reason, Reason::ConsecutiveFailures(3));
        assert_eq!(t.to, State::Open);
    }

    #[test]
    fn breaker_stays_open_for_open_for_then_half_open() {
        let b = CircuitBreaker::new(settings());
        open(&b, 1000);
        let r = b.try_acquire(1000).unwrap_err();
        assert_eq!(r.state, State::Open);
        assert_eq!(r.retry_after, Duration::from_secs(10));
        let r = b.try_acquire(1000 + 10 * S - 1).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_millis(1));
        assert_eq!(b.state(1000 + 10 * S - 1), State::Open);
        // The open period is over: the state reads half-open before any request...
        assert_eq!(b.state(1000 + 10 * S), State::HalfOpen);
        // ... and the first request moves it there and reports the transition.
        let p = b.try_acquire(1000 + 10 * S).unwrap();
        assert!(p.is_trial());
        let t = p.transition().unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (State::Open, State::HalfOpen, Reason::OpenElapsed)
        );
        drop(p);
    }

    #[test]
    fn breaker_half_open_admits_exactly_n_concurrent_trials() {
        let b = CircuitBreaker::new(BreakerSettings {
            half_open_requests: 3,
            ..settings()
        });
        open(&b, 0);
        let now = 10 * S;
        let p1 = b.try_acquire(now).unwrap();
        let p2 = b.try_acquire(now).unwrap();
        let p3 = b.try_acquire(now).unwrap();
        let r = b.try_acquire(now).unwrap_err();
        assert_eq!(r.state, State::HalfOpen);
        assert_eq!(r.retry_after, HALF_OPEN_RETRY_AFTER);
        // A dropped (unreported) trial gives its slot back...
        drop(p2);
        let p4 = b.try_acquire(now).unwrap();
        assert!(b.try_acquire(now).is_err());
        // ... a success does not: the half-open period lets exactly N trials through.
        assert_eq!(p1.success(now), None);
        assert!(b.try_acquire(now).is_err());
        assert_eq!(p3.success(now), None);
        let t = p4.success(now).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason),
            (State::HalfOpen, State::Closed, Reason::TrialsSucceeded(3))
        );
        assert_eq!(b.state(now), State::Closed);
    }

    #[test]
    fn breaker_trial_successes_close_and_reset_the_window() {
        let b = CircuitBreaker::new(settings());
        open(&b, 0);
        let now = 10 * S;
        let p1 = b.try_acquire(now).unwrap();
        let p2 = b.try_acquire(now).unwrap();
        assert_eq!(p1.success(now), None);
        assert_eq!(b.state(now), State::HalfOpen);
        let t = p2.success(now).unwrap();
        assert_eq!(t.to, State::Closed);
        assert_eq!(b.window_counts(), (0, 0));
        assert_eq!(b.consecutive_failures(), 0);
        // A fresh window: 5 failures are below min_requests again.
        for _ in 0..5 {
            assert_eq!(record(&b, now, false), None);
        }
        assert_eq!(b.state(now), State::Closed);
    }

    #[test]
    fn breaker_trial_failure_reopens_with_longer_time_capped_at_max() {
        let b = CircuitBreaker::new(BreakerSettings {
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(35),
            ..settings()
        });
        open(&b, 0);
        let mut now = 0;
        let mut expected = vec![20, 35, 35];
        expected.reverse();
        let mut open_for = 10 * S;
        while let Some(secs) = expected.pop() {
            now += open_for;
            assert_eq!(b.state(now - 1), State::Open);
            let p = b.try_acquire(now).unwrap();
            let t = p.failure(now).unwrap();
            assert_eq!(
                (t.from, t.to, t.reason),
                (State::HalfOpen, State::Open, Reason::TrialFailed)
            );
            assert_eq!(t.open_for, Some(Duration::from_secs(secs)));
            assert_eq!(
                b.try_acquire(now).unwrap_err().retry_after,
                Duration::from_secs(secs)
            );
            open_for = secs * S;
        }
        // Closing resets the growth: the next open lasts open_for again.
        now += open_for;
        for _ in 0..2 {
            let p = b.try_acquire(now).unwrap();
            let _ = p.success(now);
        }
        assert_eq!(b.state(now), State::Closed);
        let mut t = None;
        while t.is_none() {
            t = record(&b, now, false);
        }
        assert_eq!(t.unwrap().open_for, Some(Duration::from_secs(10)));
    }

    #[test]
    fn breaker_transitions_reported_once_each() {
        let b = CircuitBreaker::new(settings());
        // Ten requests in flight while closed; they all fail.
        let permits: Vec<_> = (0..10).map(|_| b.try_acquire(0).unwrap()).collect();
        let opened = permits
            .into_iter()
            .filter_map(|p| p.failure(0))
            .collect::<Vec<_>>();
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].to, State::Open);
        // Several requests after the open period: one reports Open → HalfOpen.
        let trials: Vec<_> = (0..2).map(|_| b.try_acquire(10 * S).unwrap()).collect();
        assert_eq!(
            trials.iter().filter(|p| p.transition().is_some()).count(),
            1
        );
        // Both trials fail: one reopening.
        let reopened = trials.into_iter().filter_map(|p| p.failure(10 * S)).count();
        assert_eq!(reopened, 1);
    }

    #[test]
    fn breaker_ignores_outcomes_from_an_earlier_state() {
        let b = CircuitBreaker::new(settings());
        let late = b.try_acquire(0).unwrap();
        open(&b, 0);
        // A request admitted while closed ends while open: ignored.
        assert_eq!(late.failure(1), None);
        let now = 10 * S;
        let p1 = b.try_acquire(now).unwrap();
        let p2 = b.try_acquire(now).unwrap();
        let stale = p1.failure(now).unwrap(); // reopen
        assert_eq!(stale.to, State::Open);
        // p2's trial belonged to the previous half-open period.
        assert_eq!(p2.success(now), None);
        assert_eq!(b.state(now), State::Open);
    }

    #[test]
    fn breaker_window_slides_old_failures_forgotten() {
        let b = CircuitBreaker::new(BreakerSettings {
            min_requests: 10,
            ..settings()
        });
        for _ in 0..4 {
            assert_eq!(record(&b, 1, false), None);
        }
        for _ in 0..12 {
            assert_eq!(record(&b, 1, true), None);
        }
        assert_eq!(b.window_counts(), (0, 10));
        // Were the first four remembered, this would be 8 of 10.
        for _ in 0..4 {
            assert_eq!(record(&b, 1, false), None);
        }
        assert_eq!(b.window_counts(), (4, 10));
        assert_eq!(b.state(1), State::Closed);
        // One more makes 5 of 10: open.
        assert!(record(&b, 1, false).is_some());
    }

    #[test]
    fn breaker_dropped_closed_permit_counts_as_neither() {
        let b = CircuitBreaker::new(settings());
        for _ in 0..100 {
            drop(b.try_acquire(1).unwrap());
        }
        assert_eq!(b.window_counts(), (0, 0));
    }

    #[test]
    fn breaker_concurrent_failures_open_once() {
        let b = CircuitBreaker::new(BreakerSettings {
            window: 200,
            min_requests: 50,
            consecutive_failures: Some(20),
            ..settings()
        });
        let opened = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if let Ok(p) = b.try_acquire(5) {
                            if p.failure(5).is_some() {
                                opened.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(opened.load(Ordering::Relaxed), 1);
        assert_eq!(b.state(5), State::Open);
    }

    #[test]
    fn breaker_large_window_and_packing() {
        let b = CircuitBreaker::new(BreakerSettings {
            window: 1000,
            min_requests: 1000,
            ..settings()
        });
        for i in 0..999 {
            assert_eq!(record(&b, 1, i % 2 == 0), None);
        }
        assert_eq!(b.window_counts(), (499, 999));
        assert!(record(&b, 1, false).is_some()); // 500 of 1000
        let w = Word {
            phase: State::HalfOpen,
            level: 31,
            epoch: EPOCH_MASK,
            payload: Word::trials(1000, 999),
        };
        assert_eq!(Word::unpack(w.pack()), w);
        assert_eq!(Word::unpack(w.pack()).issued(), 1000);
        assert_eq!(Word::unpack(w.pack()).successes(), 999);
        assert_eq!(w.next(State::Closed, 0, 0).epoch, 0);
    }

    #[test]
    fn breaker_open_time_growth() {
        let s = BreakerSettings {
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
            ..settings()
        };
        let secs: Vec<u64> = (0..7).map(|l| s.open_time(l).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(s.open_time(200), Duration::from_secs(300));
        // max below open_for: no growth, never shorter.
        let s = BreakerSettings {
            max_open_for: Duration::ZERO,
            ..s
        };
        assert_eq!(s.open_time(3), Duration::from_secs(30));
    }

    #[test]
    fn breaker_settings_clamped() {
        let b = CircuitBreaker::new(BreakerSettings {
            window: 0,
            failure_rate: f64::NAN,
            min_requests: 50,
            consecutive_failures: Some(0),
            open_for: Duration::MAX,
            max_open_for: Duration::ZERO,
            half_open_requests: 0,
        });
        let s = b.settings();
        assert_eq!((s.window, s.min_requests, s.half_open_requests), (1, 1, 1));
        assert_eq!(s.consecutive_failures, None);
        assert!(record(&b, 1, false).is_some());
        // An open period beyond the clock's range (2^42 ms, 139 years) ends there,
        // without overflowing.
        assert_eq!(b.state(PAYLOAD_MASK - 1), State::Open);
        assert_eq!(b.state(PAYLOAD_MASK), State::HalfOpen);
    }

    #[test]
    fn breaker_settings_from_config() {
        let c = CircuitBreakerConfig::default();
        assert_eq!(BreakerSettings::from(&c), BreakerSettings::default());
        let c = CircuitBreakerConfig {
            consecutive_failures: 0,
            max_open_for: Some(Dur(Duration::from_secs(300))),
            failure_rate: Ratio(0.25),
            ..c
        };
        let s = BreakerSettings::from(&c);
        assert_eq!(s.failure_rate, 0.25);
        assert_eq!(s.consecutive_failures, None);
        assert_eq!(s.max_open_for, Duration::from_secs(300));
    }
}
