//! A route's weighted split between upstreams (canary releases, A/B tests): which
//! upstream a request goes to. Built once per snapshot; a pick reads an atomic cursor
//! (smooth weighted order) or hashes the sticky key, and allocates nothing beyond
//! evaluating that key.

use std::sync::Arc;

use http::HeaderName;
use portico_config::grammar::KeySpec;
use portico_config::model::Timeouts;
use portico_plugins::Ctx;
use portico_upstream::balance::hash64;
use portico_upstream::{Schedule, Upstream};

/// Seed of sticky-key hashes (unrelated to `consistent_hash`'s, so the two do not
/// correlate when both use the same key).
const SEED_STICKY: u64 = 0x9e37_79b9_7f4a_7c15;

/// One upstream of a split.
pub struct Share {
    pub upstream: Arc<Upstream>,
    /// The upstream's timeouts with the route's overrides.
    pub timeouts: Timeouts,
    pub weight: u32,
}

/// A compiled `upstreams:` + `split:`.
pub struct Split {
    pub shares: Vec<Share>,
    schedule: Schedule,
    /// Running sums of the weights (sticky picks).
    cumulative: Vec<u64>,
    sticky: Option<KeySpec>,
    override_header: Option<HeaderName>,
    override_cookie: Option<String>,
    /// The share `always` names (smallest weight) and the one `never` names (largest).
    canary: usize,
    stable: usize,
}

impl Split {
    pub fn new(
        shares: Vec<Share>,
        sticky: Option<KeySpec>,
        override_header: Option<HeaderName>,
        override_cookie: Option<String>,
    ) -> Split {
        let weights: Vec<u32> = shares.iter().map(|s| s.weight).collect();
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        // Ties: the canary is the last listed, the stable one the first.
        let canary = (0..shares.len())
            .rev()
            .min_by_key(|&i| shares[i].weight)
            .unwrap_or(0);
        let stable = (0..shares.len())
            .max_by_key(|&i| (shares[i].weight, std::cmp::Reverse(i)))
            .unwrap_or(0);
        Split {
            schedule: Schedule::weighted(&weights),
            shares,
            cumulative,
            sticky,
            override_header,
            override_cookie,
            canary,
            stable,
        }
    }

    /// The share a request goes to: an override, else the sticky key's, else the next
    /// in the weighted order.
    pub fn pick(&self, ctx: &Ctx, req: &http::request::Parts) -> &Share {
        let i = self
            .overridden(req)
            .or_else(|| self.sticky_pick(ctx, req))
            .or_else(|| self.schedule.pick(|_| true))
            .unwrap_or(0);
        &self.shares[i.min(self.shares.len() - 1)]
    }

    fn overridden(&self, req: &http::request::Parts) -> Option<usize> {
        let header = self
            .override_header
            .as_ref()
            .and_then(|h| req.headers.get(h))
            .and_then(|v| v.to_str().ok());
        let value = header.or_else(|| {
            self.override_cookie
                .as_deref()
                .and_then(|c| portico_plugins::ctx::cookie(&req.headers, c))
        })?;
        let value = value.trim();
        match value {
            "always" => Some(self.canary),
            "never" => Some(self.stable),
            _ => self.shares.iter().position(|s| &*s.upstream.name == value),
        }
    }

    fn sticky_pick(&self, ctx: &Ctx, req: &http::request::Parts) -> Option<usize> {
        let spec = self.sticky.as_ref()?;
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let value = ctx.key(req, spec);
        if value.len() <= spec.0.len().saturating_sub(1) {
            return None; // none of the key's parts present
        }
        Some(bucket(
            &self.cumulative,
            hash64(value.as_bytes(), SEED_STICKY) % total,
        ))
    }
}

/// The share whose weight range holds `point` (0 <= point < total).
fn bucket(cumulative: &[u64], point: u64) -> usize {
    cumulative.partition_point(|&c| c <= point)
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_follow_the_weights() {
        let cum = [95, 100];
        assert_eq!(bucket(&cum, 0), 0);
        assert_eq!(bucket(&cum, 94), 0);
        assert_eq!(bucket(&cum, 95), 1);
        assert_eq!(bucket(&cum, 99), 1);
        // A zero weight gets no range.
        let cum = [0, 10];
        assert_eq!(bucket(&cum, 0), 1);
    }
}
