//! The two algorithms as pure functions of (settings, stored state, now), so the local
//! store, the tests and (line for line) the Redis script agree. Times are nanoseconds
//! on a monotonic clock here; the Redis script runs the same steps in microseconds of
//! the Redis server's clock.

use schemars::JsonSchema;
use serde::Deserialize;

/// How a limit counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Generic cell rate algorithm (a token bucket without a refill task): `burst`
    /// requests at once, then one every `per / requests`.
    #[default]
    Gcra,
    /// Two fixed windows weighted by how far the current one has gone (Cloudflare's
    /// and Kong's sliding-window approximation).
    SlidingWindow,
}

/// One limit, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub algorithm: Algorithm,
    pub requests: u64,
    pub per_ns: u64,
    /// GCRA only: how many requests may come at once.
    pub burst: u64,
}

impl Params {
    /// GCRA's emission interval: the time one request "costs".
    pub fn interval(&self) -> u64 {
        (self.per_ns / self.requests.max(1)).max(1)
    }
}

/// What one limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still admitted right now after this one.
    pub remaining: u64,
    /// Time until the limit is back to its full quota (GCRA) or until the current
    /// window ends (sliding window), in ns.
    pub reset_ns: u64,
    /// When refused: time until a request would be admitted, in ns.
    pub retry_ns: u64,
}

/// The stored state of one key under one limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cell {
    #[default]
    Empty,
    /// GCRA: the theoretical arrival time of the next request.
    Gcra { tat: u64 },
    /// Sliding window: the current window's index and the counts of it and the one before.
    Window { win: u64, prev: u64, cur: u64 },
}

impl Cell {
    /// When this state has no effect any more (it can be forgotten).
    pub fn expires_at(&self, p: &Params) -> u64 {
        match *self {
            Cell::Empty => 0,
            Cell::Gcra { tat } => tat,
            Cell::Window { win, .. } => win.saturating_add(2).saturating_mul(p.per_ns),
        }
    }
}

/// Decide on one request and update the state when it is admitted.
pub fn check(p: &Params, cell: &mut Cell, now: u64) -> Decision {
    match p.algorithm {
        Algorithm::Gcra => gcra(p, cell, now),
        Algorithm::SlidingWindow => sliding(p, cell, now),
    }
}

/// Give back an admitted request (another limit of the route refused it).
pub fn refund(p: &Params, cell: &mut Cell) {
    match cell {
        Cell::Gcra { tat } => *tat = tat.saturating_sub(p.interval()),
        Cell::Window { cur, .. } => *cur = cur.saturating_sub(1),
        Cell::Empty => {}
    }
}

fn gcra(p: &Params, cell: &mut Cell, now: u64) -> Decision {
    let t = p.interval();
    let tau = t.saturating_mul(p.burst);
    let tat = match *cell {
        Cell::Gcra { tat } => tat.max(now),
        _ => now,
    };
    let new_tat = tat.saturating_add(t);
    let ahead = new_tat - now;
    if ahead > tau {
        return Decision {
            allowed: false,
            remaining: 0,
            reset_ns: tat - now,
            retry_ns: ahead - tau,
        };
    }
    *cell = Cell::Gcra { tat: new_tat };
    Decision {
        allowed: true,
        remaining: (tau - ahead) / t,
        reset_ns: ahead,
        retry_ns: 0,
    }
}

fn sliding(p: &Params, cell: &mut Cell, now: u64) -> Decision {
    let per = p.per_ns;
    let idx = now / per;
    let (prev, cur) = match *cell {
        Cell::Window { win, prev, cur } if win == idx => (prev, cur),
        Cell::Window { win, cur, .. } if win.saturating_add(1) == idx => (cur, 0),
        _ => (0, 0),
    };
    let left = (idx + 1) * per - now;
    // The estimate `prev * left / per + cur`, scaled by `per` to stay in integers.
    let (per_w, cap) = (u128::from(per), u128::from(p.requests) * u128::from(per));
    let used = u128::from(prev) * u128::from(left) + u128::from(cur) * per_w;
    if used + per_w <= cap {
        *cell = Cell::Window {
            win: idx,
            prev,
            cur: cur + 1,
        };
        let remaining = u64::try_from((cap - used - per_w) / per_w).unwrap_or(u64::MAX);
        return Decision {
            allowed: true,
            remaining,
            reset_ns: left,
            retry_ns: 0,
        };
    }
    // Refused: when will `prev * left' + (cur + 1) * per <= cap` hold?
    let retry = if cur < p.requests && prev > 0 {
        // Later in this window, once enough of the previous window's weight is gone.
        let room = cap - u128::from(cur + 1) * per_w;
        let left_ok = u64::try_from(room / u128::from(prev)).unwrap_or(0);
        left.saturating_sub(left_ok).max(1)
    } else {
        // In the next window, where this window's count is the previous one.
        let room = cap - per_w;
        let left_ok = u64::try_from(room / u128::from(cur.max(1))).unwrap_or(0);
        left + per - left_ok.min(per)
    };
    Decision {
        allowed: false,
        remaining: 0,
        reset_ns: left,
        retry_ns: retry.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn gcra_params(requests: u64, per_s: u64, burst: u64) -> Params {
        Params {
            algorithm: Algorithm::Gcra,
            requests,
            per_ns: per_s * S,
            burst,
        }
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_interval() {
        // {requests: 5, per: 1m}: 5 at once, then one every 12 s.
        let p = gcra_params(5, 60, 5);
        let mut c = Cell::Empty;
        let t0 = 1000 * S;
        for i in 0..5 {
            let d = check(&p, &mut c, t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = check(&p, &mut c, t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_ns, 12 * S);
        assert_eq!(d.reset_ns, 60 * S);
        // 11.9 s later: still refused; at 12 s one more.
        assert!(!check(&p, &mut c, t0 + 11_900_000_000).allowed);
        let d = check(&p, &mut c, t0 + 12 * S);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert!(!check(&p, &mut c, t0 + 12 * S).allowed);
        // A full minute idle refills the whole burst, not more.
        let later = t0 + 12 * S + 60 * S;
        for _ in 0..5 {
            assert!(check(&p, &mut c, later).allowed);
        }
        assert!(!check(&p, &mut c, later).allowed);
    }

    #[test]
    fn gcra_smooths_with_a_small_burst() {
        // 10 per second with burst 1: one every 100 ms, never two at once.
        let p = gcra_params(10, 1, 1);
        let mut c = Cell::Empty;
        let t0 = 5 * S;
        assert!(check(&p, &mut c, t0).allowed);
        let d = check(&p, &mut c, t0 + 50_000_000);
        assert!(!d.allowed);
        assert_eq!(d.retry_ns, 50_000_000);
        assert!(check(&p, &mut c, t0 + 100_000_000).allowed);
        // Over 10 s at a steady 1 per 50 ms, exactly half get through.
        let mut ok = 0;
        for i in 0..200u64 {
            if check(&p, &mut c, t0 + 150_000_000 + i * 50_000_000).allowed {
                ok += 1;
            }
        }
        assert_eq!(ok, 100);
    }

    #[test]
    fn gcra_refund_gives_the_request_back() {
        let p = gcra_params(2, 10, 2);
        let mut c = Cell::Empty;
        assert!(check(&p, &mut c, 0).allowed);
        assert!(check(&p, &mut c, 0).allowed);
        refund(&p, &mut c);
        assert!(check(&p, &mut c, 0).allowed);
        assert!(!check(&p, &mut c, 0).allowed);
    }

    fn sw_params(requests: u64, per_s: u64) -> Params {
        Params {
            algorithm: Algorithm::SlidingWindow,
            requests,
            per_ns: per_s * S,
            burst: requests,
        }
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let p = sw_params(10, 10);
        let mut c = Cell::Empty;
        // Window [100 s, 110 s): 10 admitted, the 11th refused.
        for i in 0..10 {
            let d = check(&p, &mut c, 100 * S + i * S / 2);
            assert!(d.allowed);
            assert_eq!(d.remaining, 9 - i);
        }
        let d = check(&p, &mut c, 105 * S);
        assert!(!d.allowed);
        assert_eq!(d.reset_ns, 5 * S);
        // Next window, 2 s in: the previous 10 weigh 10 * 0.8 = 8; two more fit.
        let t = 112 * S;
        assert!(check(&p, &mut c, t).allowed);
        assert!(check(&p, &mut c, t).allowed);
        let d = check(&p, &mut c, t);
        assert!(!d.allowed);
        // 8 + 2 + 1 <= 10 needs the weight to drop to 7: at 3 s in (1 s from now).
        assert_eq!(d.retry_ns, S);
        assert!(!check(&p, &mut c, t + S - 1).allowed);
        assert!(check(&p, &mut c, t + S).allowed);
        // Two windows later everything is forgotten.
        let t = 130 * S;
        for _ in 0..10 {
            assert!(check(&p, &mut c, t).allowed);
        }
        assert!(!check(&p, &mut c, t).allowed);
    }

    #[test]
    fn sliding_window_full_current_window_waits_for_the_next() {
        let p = sw_params(4, 10);
        let mut c = Cell::Empty;
        for _ in 0..4 {
            assert!(check(&p, &mut c, 10 * S).allowed);
        }
        let d = check(&p, &mut c, 10 * S);
        assert!(!d.allowed);
        // In the next window 4 * left/10 + 1 <= 4 needs left <= 7.5 s: 2.5 s into it.
        assert_eq!(d.retry_ns, 10 * S + 2_500_000_000);
        assert!(!check(&p, &mut c, 22 * S).allowed);
        assert!(check(&p, &mut c, 22 * S + S / 2).allowed);
    }

    #[test]
    fn expiry() {
        let p = gcra_params(1, 10, 1);
        let mut c = Cell::Empty;
        check(&p, &mut c, 0);
        assert_eq!(c.expires_at(&p), 10 * S);
        let p = sw_params(1, 10);
        let mut c = Cell::Empty;
        check(&p, &mut c, 15 * S);
        assert_eq!(c.expires_at(&p), 30 * S);
    }
}
