//! Picking an endpoint inside a cluster: the load-balancing policy, the outlier gate and the
//! retry's preference for endpoints not tried yet.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::endpoint::ClusterEndpoint;
use crate::config::model::LoadBalancer;

/// The endpoints a request already tried, most recent last; remembers the last
/// [`Tried::CAPACITY`] (more retries than that are rare, and then the oldest may repeat).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Tried {
    indices: [u32; Tried::CAPACITY],
    len: usize,
    next: usize,
}

impl Tried {
    pub(crate) const CAPACITY: usize = 8;

    pub(crate) fn push(&mut self, index: u32) {
        self.indices[self.next] = index;
        self.next = (self.next + 1) % Self::CAPACITY;
        self.len = (self.len + 1).min(Self::CAPACITY);
    }

    pub(crate) fn contains(&self, index: u32) -> bool {
        self.indices[..self.len].contains(&index)
    }
}

/// The cluster's rotating cursor for ROUND_ROBIN.
#[derive(Debug, Default)]
pub(crate) struct Cursor(AtomicUsize);

/// Picks an endpoint index, or `None` if the cluster has no endpoints.
///
/// Eligible endpoints are those not ejected (all of them in `panic`) and not tried yet; if
/// every eligible one was tried, tried ones are allowed again (Envoy's `previous_hosts`
/// predicate gives up the same way). Within that set:
/// - ROUND_ROBIN: the next eligible endpoint after a shared cursor;
/// - RANDOM: a uniformly random start, then the next eligible one;
/// - LEAST_REQUEST: two such random picks, the one with fewer requests in flight wins
///   (power of two choices, Envoy's algorithm for equal weights);
/// - PASSTHROUGH: treated as LEAST_REQUEST (the engine always chooses among known endpoints).
pub(crate) fn pick(
    lb: LoadBalancer,
    endpoints: &[ClusterEndpoint],
    cursor: &Cursor,
    rng: &mut fastrand::Rng,
    tried: &Tried,
    panic: bool,
) -> Option<u32> {
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    let untried =
        |i: usize| (panic || !endpoints[i].state.health.is_ejected()) && !tried.contains(i as u32);
    let any = |i: usize| panic || !endpoints[i].state.health.is_ejected();
    let choose = |start: usize| probe(n, start, untried).or_else(|| probe(n, start, any));
    let index = match lb {
        LoadBalancer::RoundRobin => choose(cursor.0.fetch_add(1, Ordering::Relaxed) % n)?,
        LoadBalancer::Random => choose(rng.usize(..n))?,
        LoadBalancer::LeastRequest | LoadBalancer::Passthrough => {
            let a = choose(rng.usize(..n))?;
            let b = choose(rng.usize(..n)).unwrap_or(a);
            let load = |i: usize| endpoints[i].state.active.load(Ordering::Relaxed);
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
    };
    Some(index as u32)
}

fn probe(n: usize, start: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    (0..n).map(|i| (start + i) % n).find(|&i| eligible(i))
}
