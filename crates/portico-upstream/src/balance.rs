//! Target selection. Smooth weighted round robin (nginx's algorithm) is computed once
//! per snapshot into a schedule; picking is one atomic increment, no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

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
}
