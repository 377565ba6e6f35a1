//! Exact proportional decisions: weighted destination splits and percentages.
//!
//! Both are deterministic rather than random, so shares are exact over any window: Istio only
//! promises weights in proportion, and exact shares make canaries and tests predictable.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::model::Percent;

/// A weighted split, decided by smooth weighted round-robin (nginx's SWRR).
///
/// SWRR with integer weights is periodic with period `sum(weights)`, so the whole sequence is
/// precomputed once and a decision is one atomic increment and an index: lock-free, and any
/// `sum(weights)` consecutive decisions contain each destination exactly `weight` times
/// (90/10 ⇒ exactly 90 and 10 in every window of 100). Weights are reduced by their greatest
/// common divisor first, which only shortens the period (90/10 interleaves as 9:1).
#[derive(Debug)]
pub(crate) struct Split {
    schedule: Box<[u8]>,
    next: AtomicU64,
}

/// More destinations than any route has; keeps schedule entries one byte.
pub(crate) const MAX_DESTINATIONS: usize = 256;

impl Split {
    /// `weights[i]` is destination `i`'s weight. All-zero or empty weights send everything to
    /// destination 0.
    pub(crate) fn new(weights: &[u32]) -> Split {
        assert!(weights.len() <= MAX_DESTINATIONS, "too many destinations");
        let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
        if divisor == 0 {
            return Split {
                schedule: Box::new([0]),
                next: AtomicU64::new(0),
            };
        }
        let reduced: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
        let total: i64 = reduced.iter().sum();
        let mut current = vec![0i64; reduced.len()];
        let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(&reduced) {
                *c += w;
            }
            // First maximum wins ties, so the order is stable and the heavier-listed-first
            // destination leads.
            let (best, _) = current
                .iter()
                .enumerate()
                .fold(
                    (0, i64::MIN),
                    |acc, (i, &c)| if c > acc.1 { (i, c) } else { acc },
                );
            current[best] -= total;
            schedule.push(u8::try_from(best).unwrap_or(u8::MAX));
        }
        Split {
            schedule: schedule.into_boxed_slice(),
            next: AtomicU64::new(0),
        }
    }

    /// The destination index for the next request.
    pub(crate) fn pick(&self) -> usize {
        if self.schedule.len() == 1 {
            return usize::from(self.schedule[0]);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let len = self.schedule.len() as u64;
        usize::from(self.schedule[(n % len) as usize])
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Chooses a `Percent` of decisions, spread evenly: decision `n` (0-based) is chosen when
/// `floor((n+1)·p) > floor(n·p)`, so after `N` decisions exactly `floor(N·p)` were chosen.
/// Used for fault and mirror percentages (Envoy samples these randomly; exact counts are
/// easier to reason about and to test, and the long-run share is the same).
#[derive(Debug, Default)]
pub(crate) struct Spread {
    next: AtomicU64,
}

impl Spread {
    pub(crate) fn hit(&self, percent: Percent) -> bool {
        let p = u128::from(percent.per_million);
        if p == 0 {
            return false;
        }
        if p >= 1_000_000 {
            return true;
        }
        let n = u128::from(self.next.fetch_add(1, Ordering::Relaxed));
        (n + 1) * p / 1_000_000 > n * p / 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u32], decisions: usize) -> Vec<usize> {
        let split = Split::new(weights);
        let mut counts = vec![0; weights.len()];
        for _ in 0..decisions {
            counts[split.pick()] += 1;
        }
        counts
    }

    #[test]
    fn ninety_ten_is_exact_in_every_window_of_100() {
        let split = Split::new(&[90, 10]);
        let picks: Vec<usize> = (0..1_000).map(|_| split.pick()).collect();
        for window in picks.windows(100) {
            let first = window.iter().filter(|&&d| d == 0).count();
            assert_eq!(first, 90);
        }
    }

    #[test]
    fn ten_thousand_decisions_are_within_one_percent() {
        let cases: [&[u32]; 5] = [&[100, 0], &[90, 10], &[50, 50], &[0, 100], &[60, 30, 10]];
        for weights in cases {
            let counts = shares(weights, 10_000);
            for (count, weight) in counts.iter().zip(weights) {
                let expected = *weight as f64 * 100.0;
                let diff = (*count as f64 - expected).abs();
                assert!(diff <= 100.0, "{weights:?}: {counts:?}");
            }
        }
    }

    #[test]
    fn shares_are_exact_at_whole_periods() {
        assert_eq!(shares(&[60, 30, 10], 10_000), vec![6_000, 3_000, 1_000]);
        assert_eq!(shares(&[100, 0], 10_000), vec![10_000, 0]);
        assert_eq!(shares(&[0, 100], 10_000), vec![0, 10_000]);
        assert_eq!(shares(&[50, 50], 10_000), vec![5_000, 5_000]);
    }

    #[test]
    fn swrr_interleaves_smoothly() {
        let split = Split::new(&[60, 30, 10]);
        let picks: Vec<usize> = (0..10).map(|_| split.pick()).collect();
        // 6:3:1 without bursts: never three of the heaviest in a row.
        assert_eq!(picks, vec![0, 1, 0, 0, 1, 0, 2, 0, 1, 0]);
    }

    #[test]
    fn spread_chooses_exact_counts() {
        let cases = [
            (0, 0),
            (1_000_000, 1_000),
            (250_000, 250),
            (333_333, 333),
            (1, 0),
        ];
        for (per_million, want) in cases {
            let spread = Spread::default();
            let hits = (0..1_000)
                .filter(|_| spread.hit(Percent { per_million }))
                .count();
            assert_eq!(hits, want, "{per_million}");
        }
    }
}
