//! Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016): a lookup table of prime size in which every target owns a
//! share of the slots. Each target walks its own permutation of the slots (from its
//! name) and claims the first free one, in turns; so removing a target frees its slots
//! and disturbs the others' claims only a little: about 1/N of the keys move.
//!
//! Weights: a target's share of the table is proportional to its weight (largest
//! remainder; a target with a weight above 0 gets at least one slot), and the turns
//! are interleaved smoothly in proportion to the shares. The table depends only on the
//! targets' names and weights, not on their order: every gateway with the same targets
//! maps a key to the same target.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;

/// Smallest table size: a prime, at least 100 slots per target for up to 655 targets.
pub const MIN_TABLE_SIZE: usize = 65_537;

const NONE: u32 = u32::MAX;
const SEED_OFFSET: u64 = 0x9e37_79b9_7f4a_7c15;
const SEED_SKIP: u64 = 0xc2b2_ae3d_27d4_eb4f;
const SEED_ORDER: u64 = 0x1656_67b1_9e37_79f9;

/// 64-bit FNV-1a finished with MurmurHash3's `fmix64` (so every input bit affects every
/// output bit). Stable across versions and machines: gateways must agree on it.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h ^ seed)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The smallest prime that is at least `max(MIN_TABLE_SIZE, 100 * targets)`.
pub fn table_size(targets: usize) -> usize {
    let mut m = MIN_TABLE_SIZE.max(targets.saturating_mul(100));
    while !is_prime(m) {
        m += 1;
    }
    m
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A Maglev lookup table.
pub struct Maglev {
    /// Slot → target index.
    table: Box<[u32]>,
    /// Slots owned by each target.
    slots: Box<[u32]>,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.table.len())
            .field("slots", &self.slots)
            .finish()
    }
}

/// The `k`-th claim of a target with `quota` slots, ordered by its time `(2k+1)/(2·quota)`
/// (ties by the name's hash, then index, so the order does not depend on the targets').
#[derive(PartialEq, Eq)]
struct Claim {
    k: u64,
    quota: u64,
    tie: u64,
    i: usize,
}

impl Ord for Claim {
    fn cmp(&self, o: &Self) -> Ordering {
        let a = u128::from(2 * self.k + 1) * u128::from(o.quota);
        let b = u128::from(2 * o.k + 1) * u128::from(self.quota);
        a.cmp(&b).then(self.tie.cmp(&o.tie)).then(self.i.cmp(&o.i))
    }
}

impl PartialOrd for Claim {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Maglev {
    /// Build the table for targets named `names` (their URLs) with these weights
    /// (0: no slot). `names` and `weights` have one entry per target.
    pub fn new(names: &[&str], weights: &[u32]) -> Maglev {
        let n = weights.len().min(names.len());
        let m = table_size(n);
        // Equal names (a target listed twice) get distinct permutations.
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let dup = names[..i].iter().filter(|x| **x == names[i]).count();
                let mut k = names[i].as_bytes().to_vec();
                if dup > 0 {
                    k.extend_from_slice(format!("#{dup}").as_bytes());
                }
                k
            })
            .collect();
        let tie: Vec<u64> = keys.iter().map(|k| hash64(k, SEED_ORDER)).collect();
        let quotas = quotas(m, &weights[..n], &tie);
        let mut table = vec![NONE; m];
        if quotas.iter().all(|&q| q == 0) {
            return Maglev {
                table: Box::new([]),
                slots: vec![0; n].into_boxed_slice(),
            };
        }
        let m64 = m as u64;
        let mut pos: Vec<u64> = keys.iter().map(|k| hash64(k, SEED_OFFSET) % m64).collect();
        let skip: Vec<u64> = keys
            .iter()
            .map(|k| hash64(k, SEED_SKIP) % (m64 - 1) + 1)
            .collect();
        let mut heap: BinaryHeap<Reverse<Claim>> = (0..n)
            .filter(|&i| quotas[i] > 0)
            .map(|i| {
                Reverse(Claim {
                    k: 0,
                    quota: quotas[i],
                    tie: tie[i],
                    i,
                })
            })
            .collect();
        while let Some(Reverse(c)) = heap.pop() {
            // The permutation visits every slot once (m is prime, 0 < skip < m), and
            // the quotas add up to m: a free slot is always found.
            for _ in 0..m {
                let slot = pos[c.i] as usize;
                pos[c.i] = (pos[c.i] + skip[c.i]) % m64;
                if table[slot] == NONE {
                    table[slot] = c.i as u32;
                    break;
                }
            }
            if c.k + 1 < c.quota {
                heap.push(Reverse(Claim { k: c.k + 1, ..c }));
            }
        }
        let mut slots = vec![0u32; n];
        for &t in &table {
            if let Some(s) = slots.get_mut(t as usize) {
                *s += 1;
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
            slots: slots.into_boxed_slice(),
        }
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.table.len()
    }

    /// Slots owned by each target.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The target for a key's hash: the owner of its slot, or — when that one cannot be
    /// used (`usable` is false: ejected, or already tried) — the owner of the next slot
    /// after it that is a different target that can be used. Deterministic, so a key
    /// keeps its second choice too.
    pub fn lookup(&self, hash: u64, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let start = (hash % m as u64) as usize;
        let first = self.table[start] as usize;
        if usable(first) {
            return Some(first);
        }
        // Walk only when some other target can be used (else it would be m steps).
        let others = self
            .slots
            .iter()
            .enumerate()
            .any(|(i, &s)| s > 0 && i != first && usable(i));
        if !others {
            return None;
        }
        (1..m)
            .map(|k| self.table[(start + k) % m] as usize)
            .find(|&i| i != first && usable(i))
    }
}

/// Slots per target: proportional to the weights (largest remainder, ties by `tie`),
/// at least one for a weight above 0 while there are slots to spare.
fn quotas(m: usize, weights: &[u32], tie: &[u64]) -> Vec<u64> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let m128 = m as u128;
    let mut q: Vec<u64> = weights
        .iter()
        .map(|&w| (m128 * u128::from(w) / total) as u64)
        .collect();
    let given: u64 = q.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0).collect();
    order.sort_by(|&a, &b| {
        let ra = m128 * u128::from(weights[a]) % total;
        let rb = m128 * u128::from(weights[b]) % total;
        rb.cmp(&ra).then(tie[a].cmp(&tie[b])).then(a.cmp(&b))
    });
    for &i in order.iter().take((m as u64 - given) as usize) {
        q[i] += 1;
    }
    // A tiny weight still gets a slot, taken from the largest share.
    for i in 0..weights.len() {
        if weights[i] > 0 && q[i] == 0 {
            if let Some(j) = (0..q.len()).filter(|&j| q[j] > 1).max_by_key(|&j| q[j]) {
                q[j] -= 1;
                q[i] += 1;
            }
        }
    }
    q
}
