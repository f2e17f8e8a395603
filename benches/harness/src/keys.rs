//! Which descriptor value each call carries: `count` keys, picked uniformly or by a Zipf law.
//!
//! A [`KeyDist`] holds the cumulative probabilities of its keys (key 0 is the most likely under
//! Zipf), so a draw is one uniform number and a binary search. Draws come from a seeded
//! [`fastrand::Rng`] per client, so a scenario offers the same key sequence to every strategy.
//! With **sticky** spread each node only ever sees the keys `k` with `k % nodes == node` (as
//! when a load balancer hashes a key to one Envoy): [`KeyDist::restricted`] gives that node's
//! share of the mass and its own sampler.

use serde::Serialize;

/// The most keys one scenario may use (the rules and the per-key truth stay bounded).
pub const MAX_KEYS: usize = 1_000_000;

/// A discrete distribution over keys `0..count`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyDist {
    /// The key indices this distribution draws, in increasing order.
    keys: Vec<u32>,
    /// `cdf[i]` = probability of drawing one of `keys[..=i]`; the last is 1.
    cdf: Vec<f64>,
}

impl KeyDist {
    /// Every key equally likely.
    pub fn uniform(count: usize) -> KeyDist {
        Self::from_weights((0..count).map(|_| 1.0).collect())
    }

    /// Key `k` (0-based) drawn with probability proportional to `1 / (k + 1)^exponent`.
    pub fn zipf(count: usize, exponent: f64) -> KeyDist {
        Self::from_weights(
            (0..count)
                .map(|k| 1.0 / ((k + 1) as f64).powf(exponent))
                .collect(),
        )
    }

    fn from_weights(weights: Vec<f64>) -> KeyDist {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        let mut dist = KeyDist {
            keys: (0..weights.len() as u32).collect(),
            cdf,
        };
        dist.close();
        dist
    }

    /// Makes the last cumulative probability exactly 1, so every draw lands on a key.
    fn close(&mut self) {
        if let Some(last) = self.cdf.last_mut() {
            *last = 1.0;
        }
    }

    /// How many keys the distribution can draw.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it draws nothing (a sticky node that owns no key).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The probability of drawing the `i`-th key of this distribution.
    pub fn probability(&self, i: usize) -> f64 {
        let below = if i == 0 { 0.0 } else { self.cdf[i - 1] };
        self.cdf.get(i).map_or(0.0, |c| c - below)
    }

    /// The key a uniform number `u` in `[0, 1)` maps to.
    pub fn key_at(&self, u: f64) -> u32 {
        let i = self
            .cdf
            .partition_point(|c| *c <= u)
            .min(self.keys.len() - 1);
        self.keys[i]
    }

    /// One draw.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u32 {
        self.key_at(rng.f64())
    }

    /// The keys `k` with `k % of == part`, renormalised, and the probability mass they had:
    /// what node `part` of `of` receives under sticky spread.
    pub fn restricted(&self, part: usize, of: usize) -> (KeyDist, f64) {
        let mut weights = Vec::new();
        let mut keys = Vec::new();
        for (i, &k) in self.keys.iter().enumerate() {
            if k as usize % of == part {
                keys.push(k);
                weights.push(self.probability(i));
            }
        }
        let mass: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / mass;
                acc
            })
            .collect();
        let mut dist = KeyDist { keys, cdf };
        dist.close();
        (dist, mass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_keys_are_equally_likely() {
        let d = KeyDist::uniform(4);
        for i in 0..4 {
            assert!((d.probability(i) - 0.25).abs() < 1e-12);
        }
        assert_eq!(d.key_at(0.0), 0);
        assert_eq!(d.key_at(0.2499), 0);
        assert_eq!(d.key_at(0.25), 1);
        assert_eq!(d.key_at(0.9999), 3);
    }

    #[test]
    fn zipf_probabilities_follow_the_exponent() {
        // s = 1 over 3 keys: weights 1, 1/2, 1/3, total 11/6.
        let d = KeyDist::zipf(3, 1.0);
        assert!((d.probability(0) - 6.0 / 11.0).abs() < 1e-12);
        assert!((d.probability(1) - 3.0 / 11.0).abs() < 1e-12);
        assert!((d.probability(2) - 2.0 / 11.0).abs() < 1e-12);
        // s = 0 is uniform.
        assert_eq!(KeyDist::zipf(5, 0.0), KeyDist::uniform(5));
    }

    #[test]
    fn zipf_sampling_matches_the_law() {
        // 200,000 seeded draws over 1,000 keys, s = 1.1: the empirical frequencies of the top
        // keys are within 3 standard deviations of the law, and the ratio p(0)/p(1) = 2^1.1.
        let d = KeyDist::zipf(1_000, 1.1);
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 200_000;
        let mut counts = vec![0u64; 1_000];
        for _ in 0..n {
            counts[d.sample(&mut rng) as usize] += 1;
        }
        for (k, &count) in counts.iter().enumerate().take(10) {
            let p = d.probability(k);
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            let diff = (count as f64 - n as f64 * p).abs();
            assert!(
                diff < 3.0 * sd + 1.0,
                "key {k}: {count} vs {}",
                n as f64 * p
            );
        }
        let ratio = d.probability(0) / d.probability(1);
        assert!((ratio - 2f64.powf(1.1)).abs() < 1e-9);
        assert!(counts.iter().all(|&c| c < counts[0] + 1));
    }

    #[test]
    fn sticky_parts_partition_the_keys_and_the_mass() {
        let d = KeyDist::zipf(10, 1.0);
        let mut seen = Vec::new();
        let mut mass = 0.0;
        for part in 0..3 {
            let (sub, m) = d.restricted(part, 3);
            mass += m;
            let mut rng = fastrand::Rng::with_seed(part as u64);
            for _ in 0..200 {
                assert_eq!(sub.sample(&mut rng) as usize % 3, part);
            }
            seen.extend(sub.keys.clone());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<u32>>());
        assert!((mass - 1.0).abs() < 1e-12);
        // Node 0 owns keys 0, 3, 6, 9 of 1, 1/2, …, 1/10.
        let (_, m0) = d.restricted(0, 3);
        let h: f64 = (1..=10).map(|k| 1.0 / k as f64).sum();
        assert!((m0 - (1.0 + 0.25 + 1.0 / 7.0 + 0.1) / h).abs() < 1e-12);
        // More nodes than keys: some own nothing.
        assert!(KeyDist::uniform(2).restricted(2, 3).0.is_empty());
    }
}
