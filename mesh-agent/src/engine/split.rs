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
/// common divisor first, which only shortens the period (90/10 interleaves as 9:1). A period
/// still longer than [`MAX_PERIOD`] is rescaled to it (see [`Split::new`]).
#[derive(Debug)]
pub(crate) struct Split {
    schedule: Box<[u8]>,
    next: AtomicU64,
}

/// More destinations than any route has; keeps schedule entries one byte.
pub(crate) const MAX_DESTINATIONS: usize = 256;

/// The longest schedule a split keeps. Gateway API weights are relative and a rule's may sum
/// to 16 × 1,000,000 with no common divisor: a schedule that long would cost megabytes per
/// route. Past this, shares are exact to within 1/`MAX_PERIOD` of the traffic instead.
pub(crate) const MAX_PERIOD: u64 = 10_000;

impl Split {
    /// `weights[i]` is destination `i`'s weight. All-zero or empty weights send everything to
    /// destination 0. When the reduced weights sum to more than [`MAX_PERIOD`], they are
    /// rescaled to sum to it (see [`rescale`]).
    pub(crate) fn new(weights: &[u32]) -> Split {
        assert!(weights.len() <= MAX_DESTINATIONS, "too many destinations");
        let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
        if divisor == 0 {
            return Split {
                schedule: Box::new([0]),
                next: AtomicU64::new(0),
            };
        }
        let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w / divisor)).collect();
        if reduced.iter().sum::<u64>() > MAX_PERIOD {
            rescale(&mut reduced, MAX_PERIOD);
        }
        let reduced: Vec<i64> = reduced
            .iter()
            .map(|&w| i64::try_from(w).unwrap_or(i64::MAX))
            .collect();
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

/// Scales `weights` (summing to more than `total`) to sum to exactly `total`, proportionally:
/// each gets the floor of its share, the units left over go to the largest remainders (the
/// first listed on a tie), and a non-zero weight never becomes 0 — a backend someone weighted
/// must still see traffic — its unit taken from the largest weight at the time.
fn rescale(weights: &mut [u64], total: u64) {
    let sum: u64 = weights.iter().sum();
    let mut remainders = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter_mut().enumerate() {
        // u128: no overflow, whatever the weights and `total`.
        let exact = u128::from(*w) * u128::from(total);
        let floor = exact / u128::from(sum);
        remainders.push((exact % u128::from(sum), i, *w > 0));
        *w = u64::try_from(floor).unwrap_or(u64::MAX);
    }
    let mut left = total - weights.iter().sum::<u64>();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i, _) in remainders.iter() {
        if left == 0 {
            break;
        }
        weights[i] += 1;
        left -= 1;
    }
    for &(_, i, nonzero) in &remainders {
        if nonzero && weights[i] == 0 {
            // The first of the largest, so the outcome does not depend on sort stability.
            let largest = (0..weights.len())
                .max_by_key(|&j| (weights[j], std::cmp::Reverse(j)))
                .unwrap_or(0);
            weights[largest] -= 1;
            weights[i] = 1;
        }
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
    fn a_long_period_is_rescaled_to_max_period_within_rounding() {
        let weights = [999_999, 1, 1_000_000];
        let split = Split::new(&weights);
        assert!(split.schedule.len() as u64 <= MAX_PERIOD);
        let counts = shares(&weights, MAX_PERIOD as usize);
        let total: u32 = weights.iter().sum();
        for (count, weight) in counts.iter().zip(weights) {
            let exact = f64::from(weight) * MAX_PERIOD as f64 / f64::from(total);
            assert!((*count as f64 - exact).abs() <= 1.0, "{counts:?}");
        }
        // Weighted, however lightly: still chosen.
        assert_eq!(counts[1], 1);

        // Gateway API's largest rule: 16 backends of weight 1,000,000 and 1 apart.
        let weights: Vec<u32> = (0..16).map(|i| 1_000_000 - i).collect();
        let split = Split::new(&weights);
        assert_eq!(split.schedule.len() as u64, MAX_PERIOD);
        for count in shares(&weights, MAX_PERIOD as usize) {
            assert!((624..=626).contains(&count), "{count}");
        }
    }

    #[test]
    fn short_periods_are_not_rescaled() {
        assert_eq!(Split::new(&[90, 10]).schedule.len(), 10);
        assert_eq!(Split::new(&[1_000_000; 16]).schedule.len(), 16);
        assert_eq!(
            Split::new(&[9_999, 1]).schedule.len() as u64,
            MAX_PERIOD,
            "exactly the bound is kept as is"
        );
        let mut weights = [8_000_000, 1, 1, 7_999_998];
        rescale(&mut weights, MAX_PERIOD);
        assert_eq!(weights, [4_999, 1, 1, 4_999]);
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
