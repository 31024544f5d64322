//! Target selection: the `balance:` algorithms of an upstream (docs/upstreams.md).
//!
//! What a pick needs is built once per snapshot (a smooth weighted round-robin order,
//! a Maglev table, cumulative weights); a pick reads atomics (a cursor, the targets'
//! requests in flight and latency estimates), takes no lock and allocates nothing.

mod maglev;

use std::sync::atomic::{AtomicUsize, Ordering};

use portico_config::grammar::KeySpec;
use portico_config::model::Balance;

use crate::health::TargetHealth;

pub use maglev::{hash64, table_size, Maglev, MIN_TABLE_SIZE};

/// Seed of request-key hashes (`consistent_hash`).
const SEED_KEY: u64 = 0x2545_f491_4f6c_dd1d;

/// The hash of a request key's value (`Ctx::key`), or `None` when every part of the
/// key is missing or empty: such requests fall back to the weighted order.
pub fn key_hash(spec: &KeySpec, value: &str) -> Option<u64> {
    // `Ctx::key` joins the parts with `|`: only separators means nothing was found.
    if value.len() <= spec.0.len().saturating_sub(1) {
        return None;
    }
    Some(hash64(value.as_bytes(), SEED_KEY))
}

/// What a balancer reads of a target.
pub trait Load {
    fn load(&self) -> &TargetHealth;
}

impl Load for TargetHealth {
    fn load(&self) -> &TargetHealth {
        self
    }
}

impl Load for crate::Target {
    fn load(&self) -> &TargetHealth {
        &self.health
    }
}

/// A compiled `balance:` algorithm.
#[derive(Debug)]
pub enum Balancer {
    /// `weighted` and `round_robin`: a precomputed order.
    Schedule(Schedule),
    /// `least_connections`: the fewest requests in flight per weight; ties go in the
    /// weighted order.
    LeastConnections { weights: Box<[u32]>, ties: Schedule },
    /// `p2c_ewma`: the better of two random targets by latency estimate × (in flight
    /// + 1) / weight.
    P2cEwma { weights: Box<[u32]> },
    /// `consistent_hash`: a Maglev table; requests without the key go in the weighted
    /// order.
    ConsistentHash { table: Maglev, fallback: Schedule },
    /// `random`: weighted random; the running sums of the weights.
    Random { cumulative: Box<[u64]> },
}

impl Balancer {
    /// Compile `balance` for targets with these weights; `names` (the targets' URLs)
    /// place them in the `consistent_hash` table.
    pub fn new(balance: Balance, weights: &[u32], names: &[&str]) -> Balancer {
        match balance {
            Balance::Weighted => Balancer::Schedule(Schedule::weighted(weights)),
            Balance::RoundRobin => Balancer::Schedule(Schedule::round_robin(weights)),
            Balance::LeastConnections => Balancer::LeastConnections {
                weights: weights.into(),
                ties: Schedule::weighted(weights),
            },
            Balance::P2cEwma => Balancer::P2cEwma {
                weights: weights.into(),
            },
            Balance::ConsistentHash => Balancer::ConsistentHash {
                table: Maglev::new(names, weights),
                fallback: Schedule::weighted(weights),
            },
            Balance::Random => Balancer::Random {
                cumulative: weights
                    .iter()
                    .scan(0u64, |sum, &w| {
                        *sum += u64::from(w);
                        Some(*sum)
                    })
                    .collect(),
            },
        }
    }

    /// Whether picks read latency estimates (so exchanges should be timed).
    pub fn uses_latency(&self) -> bool {
        matches!(self, Balancer::P2cEwma { .. })
    }

    /// Pick a target with a weight above 0 for which `usable` holds. `key` is the hash
    /// of the request key ([`key_hash`]) for `consistent_hash` (`None`: no key, weighted
    /// order); the other algorithms ignore it.
    pub fn pick<T: Load>(
        &self,
        targets: &[T],
        key: Option<u64>,
        mut usable: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Balancer::Schedule(s) => s.pick(usable),
            Balancer::LeastConnections { weights, ties } => {
                least_connections(weights, ties, targets, &mut usable)
            }
            Balancer::P2cEwma { weights } => p2c(weights, targets, &mut usable),
            Balancer::ConsistentHash { table, fallback } => match key {
                Some(h) => table.lookup(h, usable),
                None => fallback.pick(usable),
            },
            Balancer::Random { cumulative } => random(cumulative, &mut usable),
        }
    }
}

fn in_flight<T: Load>(targets: &[T], i: usize) -> u64 {
    targets
        .get(i)
        .map_or(0, |t| u64::from(t.load().in_flight()))
}

/// The target with the fewest requests in flight relative to its weight; among equals,
/// the next of them in the smooth weighted order (so equal targets take turns).
fn least_connections<T: Load>(
    weights: &[u32],
    ties: &Schedule,
    targets: &[T],
    usable: &mut impl FnMut(usize) -> bool,
) -> Option<usize> {
    // (index, in flight, weight) of the best so far; a/wa < b/wb  <=>  a*wb < b*wa.
    let mut best: Option<(usize, u64, u64)> = None;
    let mut tied = 0usize;
    for (i, &w) in weights.iter().enumerate() {
        let w = u64::from(w);
        if w == 0 || !usable(i) {
            continue;
        }
        let f = in_flight(targets, i);
        match best {
            Some((_, bf, bw)) if f * bw > bf * w => {}
            Some((_, bf, bw)) if f * bw == bf * w => tied += 1,
            _ => {
                best = Some((i, f, w));
                tied = 1;
            }
        }
    }
    let (first, bf, bw) = best?;
    if tied == 1 {
        return Some(first);
    }
    ties.pick(|i| {
        let w = weights.get(i).map_or(0, |&w| u64::from(w));
        w > 0 && usable(i) && in_flight(targets, i) * bw == bf * w
    })
    .or(Some(first))
}

/// Power of two choices: two distinct random targets among those that can be used;
/// the one with the lower score wins.
fn p2c<T: Load>(
    weights: &[u32],
    targets: &[T],
    usable: &mut impl FnMut(usize) -> bool,
) -> Option<usize> {
    let n = weights.len().min(targets.len());
    let mut eligible = |i: usize| weights[i] > 0 && usable(i);
    let mut count = 0usize;
    let mut only = None;
    for i in 0..n {
        if eligible(i) {
            count += 1;
            only = Some(i);
        }
    }
    if count < 2 {
        return only;
    }
    let ra = fastrand::usize(..count);
    let mut rb = fastrand::usize(..count - 1);
    if rb >= ra {
        rb += 1;
    }
    let (mut a, mut b, mut rank) = (None, None, 0usize);
    for i in 0..n {
        if eligible(i) {
            if rank == ra {
                a = Some(i);
            } else if rank == rb {
                b = Some(i);
            }
            rank += 1;
        }
    }
    match (a, b) {
        (Some(a), Some(b)) => Some(
            if p2c_prefers(targets[a].load(), weights[a], targets[b].load(), weights[b]) {
                a
            } else {
                b
            },
        ),
        (x, y) => x.or(y),
    }
}

/// Whether `a` scores no worse than `b`: score = latency estimate × (in flight + 1) /
/// weight. A target without a latency sample yet is neutral: it is given the other's
/// estimate, so the two compare by load alone.
fn p2c_prefers(a: &TargetHealth, wa: u32, b: &TargetHealth, wb: u32) -> bool {
    let (la, lb) = match (a.latency_log(), b.latency_log()) {
        (Some(x), Some(y)) => (x, y),
        (Some(x), None) => (x, x),
        (None, Some(y)) => (y, y),
        (None, None) => (0.0, 0.0),
    };
    let load_a = (f64::from(a.in_flight()) + 1.0) / f64::from(wa.max(1));
    let load_b = (f64::from(b.in_flight()) + 1.0) / f64::from(wb.max(1));
    // score_a / score_b = e^(la - lb) × load_a / load_b (the log forms differ by the
    // log of the ratio of the estimates, at any time).
    (la - lb).exp() * load_a <= load_b
}

/// Weighted random; when the drawn target cannot be used, a second draw among those
/// that can (so each usable target's chance stays proportional to its weight).
fn random(cumulative: &[u64], usable: &mut impl FnMut(usize) -> bool) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let r = fastrand::u64(..total);
    let i = cumulative.partition_point(|&c| c <= r);
    if usable(i) {
        return Some(i);
    }
    let weight = |i: usize| cumulative[i] - if i == 0 { 0 } else { cumulative[i - 1] };
    let mut open = 0u64;
    for i in 0..cumulative.len() {
        if weight(i) > 0 && usable(i) {
            open += weight(i);
        }
    }
    if open == 0 {
        return None;
    }
    let mut r = fastrand::u64(..open);
    for i in 0..cumulative.len() {
        let w = weight(i);
        if w > 0 && usable(i) {
            if r < w {
                return Some(i);
            }
            r -= w;
        }
    }
    None
}

/// Longest schedule kept; larger weight sums are scaled down proportionally.
const MAX_SCHEDULE: u64 = 4096;

/// A precomputed smooth weighted round-robin order over target indexes.
#[derive(Debug)]
pub struct Schedule {
    order: Vec<u32>,
    next: AtomicUsize,
}

impl Schedule {
    /// Build the schedule for these weights (0 = never picked).
    pub fn weighted(weights: &[u32]) -> Schedule {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let scaled: Vec<i64> = if total > MAX_SCHEDULE {
            weights
                .iter()
                .map(|&w| {
                    if w == 0 {
                        0
                    } else {
                        ((u64::from(w) * MAX_SCHEDULE) / total).max(1) as i64
                    }
                })
                .collect()
        } else {
            weights.iter().map(|&w| i64::from(w)).collect()
        };
        let sum: i64 = scaled.iter().sum();
        let mut current = vec![0i64; scaled.len()];
        let mut order = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for i in 0..scaled.len() {
                current[i] += scaled[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            order.push(best as u32);
        }
        Schedule {
            order,
            next: AtomicUsize::new(0),
        }
    }

    /// Equal turns for every target with a non-zero weight.
    pub fn round_robin(weights: &[u32]) -> Schedule {
        let w: Vec<u32> = weights.iter().map(|&w| u32::from(w > 0)).collect();
        Schedule::weighted(&w)
    }

    /// Next target index for which `usable` holds, trying each slot at most once.
    pub fn pick(&self, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        let n = self.order.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            // One target: no turn to take (and no shared counter to bump).
            let idx = self.order[0] as usize;
            return usable(idx).then_some(idx);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let idx = self.order[(start + k) % n] as usize;
            if usable(idx) {
                if k > 0 {
                    // Skip the slots we passed over so the next pick does not land on them again.
                    self.next.fetch_add(k, Ordering::Relaxed);
                }
                return Some(idx);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn smooth_weighted_order() {
        let s = Schedule::weighted(&[5, 1, 1]);
        assert_eq!(s.order, vec![0, 0, 1, 0, 2, 0, 0]);
        let s = Schedule::weighted(&[3, 1]);
        let picks: Vec<usize> = (0..8).filter_map(|_| s.pick(|_| true)).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn exact_share_over_many() {
        let s = Schedule::weighted(&[3, 1]);
        let mut n = [0usize; 2];
        for _ in 0..4000 {
            if let Some(i) = s.pick(|_| true) {
                n[i] += 1;
            }
        }
        assert_eq!(n, [3000, 1000]);
    }

    #[test]
    fn skips_unusable_and_zero_weight() {
        let s = Schedule::weighted(&[1, 0, 1]);
        for _ in 0..10 {
            assert_eq!(s.pick(|i| i != 0), Some(2));
        }
        assert_eq!(s.pick(|_| false), None);
        let big = Schedule::weighted(&[100_000, 1]);
        assert!(big.order.len() <= MAX_SCHEDULE as usize + 1);
        assert!(big.order.contains(&1));
    }

    // ----------------------------------------------------------- the balancers ---

    fn healths(n: usize) -> Vec<TargetHealth> {
        (0..n).map(|_| TargetHealth::default()).collect()
    }

    /// `picks` sequential requests (each finished before the next), counted per target.
    fn sequential(b: &Balancer, h: &[TargetHealth], picks: usize) -> Vec<usize> {
        let mut n = vec![0; h.len()];
        for _ in 0..picks {
            let i = b.pick(h, None, |_| true).unwrap();
            h[i].start();
            n[i] += 1;
            h[i].finish();
        }
        n
    }

    /// Six standard deviations of a binomial count.
    fn six_sigma(trials: usize, p: f64) -> f64 {
        6.0 * (trials as f64 * p * (1.0 - p)).sqrt()
    }

    #[test]
    fn weighted_and_round_robin_exact_counts() {
        let h = healths(3);
        let w = Balancer::new(Balance::Weighted, &[5, 3, 2], &[]);
        assert_eq!(sequential(&w, &h, 10_000), [5000, 3000, 2000]);
        let rr = Balancer::new(Balance::RoundRobin, &[5, 3, 2], &[]);
        assert_eq!(sequential(&rr, &h, 9_000), [3000, 3000, 3000]);
        let rr0 = Balancer::new(Balance::RoundRobin, &[5, 0, 2], &[]);
        assert_eq!(sequential(&rr0, &h, 9_000), [4500, 0, 4500]);
    }

    #[test]
    fn least_connections_exact_counts() {
        // Idle targets (each request done before the next): every pick is a tie, taken
        // in the weighted order, so the shares are exact.
        let h = healths(2);
        let lc = Balancer::new(Balance::LeastConnections, &[3, 1], &[]);
        assert_eq!(sequential(&lc, &h, 4000), [3000, 1000]);
        let h = healths(3);
        let lc = Balancer::new(Balance::LeastConnections, &[1, 1, 1], &[]);
        assert_eq!(sequential(&lc, &h, 3000), [1000, 1000, 1000]);

        // Requests held open: in flight stays proportional to the weights.
        let h = healths(3);
        let lc = Balancer::new(Balance::LeastConnections, &[2, 1, 1], &[]);
        for _ in 0..400 {
            let i = lc.pick(&h, None, |_| true).unwrap();
            h[i].start();
        }
        let f: Vec<u32> = h.iter().map(TargetHealth::in_flight).collect();
        assert_eq!(f, [200, 100, 100]);

        // A target holding requests gets none until the others catch up; the others
        // take strict turns meanwhile.
        let h = healths(3);
        for _ in 0..5 {
            h[0].start();
        }
        let lc = Balancer::new(Balance::LeastConnections, &[1, 1, 1], &[]);
        let seq: Vec<usize> = (0..100)
            .map(|_| lc.pick(&h, None, |_| true).unwrap())
            .collect();
        assert!(!seq.contains(&0), "{seq:?}");
        assert!(seq.windows(2).all(|w| w[0] != w[1]), "{seq:?}");
        // Unusable and zero-weight targets are never picked.
        let lc = Balancer::new(Balance::LeastConnections, &[1, 0, 1], &[]);
        let h = healths(3);
        for _ in 0..10 {
            assert_eq!(lc.pick(&h, None, |i| i != 2), Some(0));
        }
        assert_eq!(lc.pick(&h, None, |i| i == 1), None);
    }

    #[test]
    fn random_is_weighted_within_six_sigma() {
        fastrand::seed(7);
        const N: usize = 100_000;
        let h = healths(3);
        let r = Balancer::new(Balance::Random, &[3, 1, 0], &[]);
        let n = sequential(&r, &h, N);
        let dev = (n[0] as f64 - 0.75 * N as f64).abs();
        assert!(dev <= six_sigma(N, 0.75), "{n:?}");
        assert_eq!(n[2], 0);
        // An unusable target's share goes to the others in proportion to their weights.
        let r = Balancer::new(Balance::Random, &[1, 2, 1], &[]);
        let mut n = [0usize; 3];
        for _ in 0..N {
            n[r.pick(&h, None, |i| i != 1).unwrap()] += 1;
        }
        assert_eq!(n[1], 0);
        let dev = (n[0] as f64 - 0.5 * N as f64).abs();
        assert!(dev <= six_sigma(N, 0.5), "{n:?}");
        assert_eq!(r.pick(&h, None, |_| false), None);
    }

    // ----------------------------------------------------------------- Maglev ---

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8080")).collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    fn key(k: usize) -> u64 {
        let spec = KeySpec(vec![portico_config::grammar::KeyPart::Header(
            "x-user".into(),
        )]);
        key_hash(&spec, &format!("user-{k}")).unwrap()
    }

    #[test]
    fn maglev_table_size_and_fill_follow_weights() {
        assert_eq!(table_size(1), 65_537);
        assert_eq!(table_size(655), 65_537);
        let big = table_size(1000);
        assert!(
            big >= 100_000
                && (2..big)
                    .take_while(|d| d * d <= big)
                    .all(|d| !big.is_multiple_of(d))
        );
        let weights = [1, 2, 3, 4, 10, 0];
        let t = Maglev::new(&refs(&names(6)), &weights);
        assert_eq!(t.size(), MIN_TABLE_SIZE);
        assert_eq!(
            t.slots().iter().map(|&s| s as usize).sum::<usize>(),
            t.size()
        );
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let want = t.size() as f64 * f64::from(w) / f64::from(total);
            let got = f64::from(t.slots()[i]);
            assert!(
                (got - want).abs() <= 0.01 * want,
                "target {i}: {got} slots, want {want}"
            );
        }
        // The keys follow the table: weights 3:1 give 75 % of distinct keys.
        let t = Maglev::new(&refs(&names(2)), &[3, 1]);
        let first = (0..100_000)
            .filter(|&k| t.lookup(key(k), |_| true) == Some(0))
            .count();
        let dev = (first as f64 - 75_000.0).abs();
        assert!(dev <= six_sigma(100_000, 0.75), "{first}");
        // A weight far below the others still gets a slot; all zero: no table.
        let t = Maglev::new(&refs(&names(2)), &[1_000_000, 1]);
        assert_eq!(t.slots()[1], 1);
        let t = Maglev::new(&refs(&names(2)), &[0, 0]);
        assert_eq!(t.lookup(1, |_| true), None);
    }

    #[test]
    fn maglev_removing_one_of_ten_moves_about_a_tenth() {
        const KEYS: usize = 100_000;
        let all = names(10);
        let before = Maglev::new(&refs(&all), &[1; 10]);
        let removed = 3;
        let rest: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, n)| n.clone())
            .collect();
        let after = Maglev::new(&refs(&rest), &[1; 9]);
        let (mut moved, mut stayed_elsewhere_moved, mut on_rest) = (0, 0, 0);
        for k in 0..KEYS {
            let h = key(k);
            let a = &all[before.lookup(h, |_| true).unwrap()];
            let b = &rest[after.lookup(h, |_| true).unwrap()];
            if a != b {
                moved += 1;
            }
            if *a != all[removed] {
                on_rest += 1;
                if a != b {
                    stayed_elsewhere_moved += 1;
                }
            }
        }
        eprintln!(
            "maglev: removing 1 of 10 moved {moved} of {KEYS} keys; {stayed_elsewhere_moved} of the {on_rest} keys of the other targets"
        );
        assert!(moved as f64 <= (0.1 + 0.02) * KEYS as f64, "{moved}");
        // Keys of the remaining targets stay (Maglev's disruption: a small fraction).
        assert!(
            stayed_elsewhere_moved as f64 <= 0.02 * on_rest as f64,
            "{stayed_elsewhere_moved} of {on_rest}"
        );

        // Taken out at run time (ejected): exactly its keys move, spread over the others.
        let mut spread = [0usize; 10];
        for k in 0..KEYS {
            let h = key(k);
            let a = before.lookup(h, |_| true).unwrap();
            let b = before.lookup(h, |i| i != removed).unwrap();
            if a == removed {
                assert_ne!(b, removed);
                spread[b] += 1;
            } else {
                assert_eq!(a, b);
            }
        }
        assert!(
            spread
                .iter()
                .enumerate()
                .all(|(i, &n)| (i == removed) == (n == 0)),
            "{spread:?}"
        );
    }

    #[test]
    fn maglev_adding_a_target_moves_about_its_share() {
        const KEYS: usize = 100_000;
        let ten = names(10);
        let eleven = names(11);
        let before = Maglev::new(&refs(&ten), &[1; 10]);
        let after = Maglev::new(&refs(&eleven), &[1; 11]);
        let (mut moved, mut to_new) = (0, 0);
        for k in 0..KEYS {
            let h = key(k);
            let a = &ten[before.lookup(h, |_| true).unwrap()];
            let b = &eleven[after.lookup(h, |_| true).unwrap()];
            if a != b {
                moved += 1;
                if *b == eleven[10] {
                    to_new += 1;
                }
            }
        }
        eprintln!("maglev: adding an 11th target moved {moved} of {KEYS} keys, {to_new} to it");
        assert!(moved as f64 <= (1.0 / 11.0 + 0.02) * KEYS as f64, "{moved}");
        assert!(
            (moved - to_new) as f64 <= 0.02 * KEYS as f64,
            "{moved} {to_new}"
        );
    }

    #[test]
    fn maglev_fallback_walk_and_order_independence() {
        let all = names(5);
        let t = Maglev::new(&refs(&all), &[1; 5]);
        for k in 0..1000 {
            let h = key(k);
            let first = t.lookup(h, |_| true).unwrap();
            let second = t.lookup(h, |i| i != first).unwrap();
            let third = t.lookup(h, |i| i != first && i != second).unwrap();
            assert!(first != second && second != third && first != third);
            // Deterministic.
            assert_eq!(t.lookup(h, |i| i != first), Some(second));
        }
        assert_eq!(t.lookup(key(1), |_| false), None);
        // The same targets listed in another order map every key to the same URL.
        let rev: Vec<String> = all.iter().rev().cloned().collect();
        let r = Maglev::new(&refs(&rev), &[1; 5]);
        for k in 0..10_000 {
            let h = key(k);
            assert_eq!(
                all[t.lookup(h, |_| true).unwrap()],
                rev[r.lookup(h, |_| true).unwrap()]
            );
        }
    }

    #[test]
    fn consistent_hash_balancer_and_missing_keys() {
        use portico_config::grammar::KeyPart;
        let one = KeySpec(vec![KeyPart::Header("x-user".into())]);
        let two = KeySpec(vec![KeyPart::Consumer, KeyPart::Cookie("s".into())]);
        assert_eq!(key_hash(&one, ""), None);
        assert_eq!(key_hash(&two, "|"), None);
        assert!(key_hash(&two, "a|").is_some());
        assert!(key_hash(&two, "|b").is_some());
        assert_ne!(key_hash(&one, "a"), key_hash(&one, "b"));
        // Stable across versions and machines.
        assert_eq!(hash64(b"", 0), hash64(b"", 0));
        // Pinned: changing it would move every key on every gateway at upgrade.
        assert_eq!(hash64(b"portico", 1), 0xdbf5_3bf0_369d_17be_u64);

        let n = names(3);
        let h = healths(3);
        let b = Balancer::new(Balance::ConsistentHash, &[1, 1, 1], &refs(&n));
        let k = key(42);
        let i = b.pick(&h, Some(k), |_| true).unwrap();
        for _ in 0..10 {
            assert_eq!(b.pick(&h, Some(k), |_| true), Some(i));
        }
        // Without a key: the weighted order (here: turns).
        let seq: Vec<usize> = (0..6)
            .map(|_| b.pick(&h, None, |_| true).unwrap())
            .collect();
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 0, 1, 1, 2, 2]);
    }

    // -------------------------------------------------------------- p2c_ewma ---

    /// Picks of one simulated phase: per target, how many, and when the first and
    /// the last were.
    struct Phase {
        n: Vec<usize>,
        first: Vec<Option<u64>>,
        last: Vec<Option<u64>>,
    }

    /// Simulated requests on a controllable clock (ms), one every millisecond, each
    /// answered at once with its target's latency.
    fn simulate(
        b: &Balancer,
        h: &[TargetHealth],
        latency_ms: &[f64],
        clock: &mut u64,
        steps: usize,
    ) -> Phase {
        let mut p = Phase {
            n: vec![0; h.len()],
            first: vec![None; h.len()],
            last: vec![None; h.len()],
        };
        for _ in 0..steps {
            let i = b.pick(h, None, |_| true).unwrap();
            p.n[i] += 1;
            p.first[i].get_or_insert(*clock);
            p.last[i] = Some(*clock);
            h[i].start();
            h[i].observe(
                std::time::Duration::from_secs_f64(latency_ms[i] / 1000.0),
                *clock,
            );
            h[i].finish();
            *clock += 1;
        }
        p
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_target_and_recovers_after_the_decay() {
        fastrand::seed(11);
        let h = healths(2);
        let b = Balancer::new(Balance::P2cEwma, &[1, 1], &[]);
        let mut clock = 1_000;
        // 10 s of traffic: target 1 answers in 50 ms, target 0 in 1 ms. Target 1 gets a
        // request or two at the start (before target 0 has an estimate), then none.
        let slow = simulate(&b, &h, &[1.0, 50.0], &mut clock, 10_000);
        eprintln!(
            "p2c_ewma: slow phase {:?}, slow target last picked at {:?} ms",
            slow.n, slow.last[1]
        );
        assert!(slow.n[1] <= 5, "{:?}", slow.n);
        let last_slow = slow.last[1].unwrap();
        // Target 1 is fast again, but nothing tells: its 50 ms decays (time constant
        // 10 s) while target 0's 1 ms is refreshed every millisecond. It is tried again
        // when 50 ms × e^(-age / 10 s) reaches 1 ms: at age 10 s × ln 50 ≈ 39.1 s.
        let wait = simulate(&b, &h, &[1.0, 1.0], &mut clock, 45_000);
        let back = wait.first[1].unwrap() - last_slow;
        let expect = 10_000.0 * 50f64.ln();
        eprintln!("p2c_ewma: slow target tried again {back} ms after its last answer (expected {expect:.0})");
        assert!((back as f64 - expect).abs() <= 5.0, "{back}");
        // From then on both are equal: an even share.
        let even = simulate(&b, &h, &[1.0, 1.0], &mut clock, 10_000);
        eprintln!("p2c_ewma: recovered {:?}", even.n);
        assert!(even.n[1].abs_diff(5_000) <= 100, "{:?}", even.n);
    }

    #[test]
    fn p2c_ewma_weighs_in_flight_and_weight_new_targets_are_neutral() {
        fastrand::seed(3);
        let ms = std::time::Duration::from_millis(1);
        // Equal latency; target 0 holds 10 requests: it loses every comparison.
        let h = healths(3);
        for t in &h {
            t.observe(ms, 100);
        }
        for _ in 0..10 {
            h[0].start();
        }
        let b = Balancer::new(Balance::P2cEwma, &[1, 1, 1], &[]);
        let mut n = [0usize; 3];
        for _ in 0..3000 {
            n[b.pick(&h, None, |_| true).unwrap()] += 1;
        }
        assert_eq!(n[0], 0, "{n:?}");
        // Targets 1 and 2 meet in 1/3 of the pairs and win each of the others: 1/2 each.
        assert!(
            (n[1] as f64 - 1500.0).abs() <= six_sigma(3000, 0.5),
            "{n:?}"
        );

        // Held requests spread by weight: in flight 3:1.
        let h = healths(2);
        for t in &h {
            t.observe(ms, 100);
        }
        let b = Balancer::new(Balance::P2cEwma, &[3, 1], &[]);
        for _ in 0..400 {
            let i = b.pick(&h, None, |_| true).unwrap();
            h[i].start();
        }
        assert!(h[0].in_flight().abs_diff(300) <= 1, "{}", h[0].in_flight());

        // A new target (no sample) against a known one compares by load alone: even
        // while idle, and preferred while the other has requests in flight.
        let h = healths(2);
        h[0].observe(std::time::Duration::from_millis(100), 100);
        let b = Balancer::new(Balance::P2cEwma, &[1, 1], &[]);
        let mut n = [0usize; 2];
        for _ in 0..2000 {
            n[b.pick(&h, None, |_| true).unwrap()] += 1;
        }
        assert!(
            (n[1] as f64 - 1000.0).abs() <= six_sigma(2000, 0.5),
            "{n:?}"
        );
        h[0].start();
        for _ in 0..100 {
            assert_eq!(b.pick(&h, None, |_| true), Some(1));
        }
        // Unusable targets are never candidates; one usable target is picked alone.
        assert_eq!(b.pick(&h, None, |i| i == 0), Some(0));
        assert_eq!(b.pick(&h, None, |_| false), None);
    }
}
