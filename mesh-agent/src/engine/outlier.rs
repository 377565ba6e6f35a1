//! Per-endpoint outlier detection with Envoy's consecutive-error semantics.
//!
//! - Each attempt's outcome updates the endpoint's consecutive counters. When a counter reaches
//!   its threshold the endpoint is ejected **immediately** (Envoy ejects inline on the event),
//!   unless that would eject more than `maxEjectionPercent`: Envoy's rule is to eject only if
//!   `(ejected + 1) / total × 100 <= maxEjectionPercent`, so with the default 10% and fewer than
//!   ten endpoints nothing is ever ejected, and with 100% every endpoint may be. The counter
//!   resets after the ejection attempt either way.
//! - The ejection lasts `baseEjectionTime × multiplier`, capped at `max(base, 300 s)` (Envoy's
//!   default `max_ejection_time`, which Istio does not expose). The multiplier grows by one per
//!   ejection and shrinks by one on every interval sweep that finds the endpoint in service —
//!   so an endpoint that fails again right after coming back stays out twice as long.
//! - Endpoints come back only on an **interval sweep** (as in Envoy, where the `interval` timer
//!   un-ejects): sweep ticks are at `created + k × interval`; an endpoint ejected at `t` returns
//!   at the first tick `>= t + duration`, i.e. after its ejection time plus less than one
//!   interval. Sweeps run lazily: the first engine call at or after a tick performs every tick
//!   that passed, evaluated at the tick's own time, so the result is the same as with a timer.
//! - Local-origin failures (connect failure, reset, refused stream, per-try timeout): with
//!   `splitExternalLocalOriginErrors: false` (the default) they count as the 503 (or 504 for a
//!   timeout) the proxy answers with, as Envoy does, feeding `consecutive5xxErrors` and
//!   `consecutiveGatewayErrors`; `consecutiveLocalOriginFailures` is then unused. With `true`
//!   they feed only `consecutiveLocalOriginFailures`, and HTTP statuses only the other two.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::clock::nanos;
use super::metrics::EngineMetrics;
use crate::config::model::OutlierDetection;

const NOT_EJECTED: u64 = u64::MAX;

/// Envoy's default `max_ejection_time`; bounds how long repeated ejections grow.
pub(crate) const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// An outlier-detection policy with its durations as ticks.
#[derive(Clone, Debug)]
pub(crate) struct OutlierPolicy {
    config: OutlierDetection,
    interval: u64,
    base: u64,
    max_ejection: u64,
}

impl OutlierPolicy {
    pub(crate) fn new(config: &OutlierDetection) -> Self {
        // A zero interval would make every call a sweep; 1 ms is finer than anything useful.
        let interval = nanos(config.interval).max(1_000_000);
        let base = nanos(config.base_ejection_time);
        OutlierPolicy {
            config: config.clone(),
            interval,
            base,
            max_ejection: base.max(nanos(MAX_EJECTION_TIME)),
        }
    }

    pub(crate) fn interval(&self) -> u64 {
        self.interval
    }

    pub(crate) fn min_health_percent(&self) -> u32 {
        self.config.min_health_percent
    }

    fn ejection_time(&self, multiplier: u32) -> u64 {
        self.base
            .saturating_mul(u64::from(multiplier.max(1)))
            .min(self.max_ejection)
    }
}

/// What one attempt told us about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Observation {
    /// The endpoint answered with this status.
    Status(u16),
    /// Connect failure, reset or refused stream: the proxy answers 503 for it.
    LocalFailure,
    /// The try timed out: the proxy answers 504 for it.
    LocalTimeout,
}

/// One endpoint's outlier state, shared by every snapshot that has the endpoint.
#[derive(Debug)]
pub(crate) struct EndpointHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Tick of the current ejection, or `NOT_EJECTED`.
    ejected_at: AtomicU64,
    /// Envoy's ejection backoff: times ejected, minus healthy sweeps since.
    multiplier: AtomicU32,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        EndpointHealth {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            ejected_at: AtomicU64::new(NOT_EJECTED),
            multiplier: AtomicU32::new(0),
        }
    }
}

impl EndpointHealth {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_at.load(Ordering::Relaxed) != NOT_EJECTED
    }

    /// When the current ejection ends at the earliest (the endpoint returns at the first
    /// sweep from then), in ticks; `None` when not ejected.
    pub(crate) fn ejected_until(&self, policy: &OutlierPolicy) -> Option<u64> {
        let at = self.ejected_at.load(Ordering::Relaxed);
        (at != NOT_EJECTED).then(|| {
            at.saturating_add(policy.ejection_time(self.multiplier.load(Ordering::Relaxed)))
        })
    }

    fn reset_counters(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }
}

/// A cluster's outlier bookkeeping: how many of its endpoints are out, and the next sweep.
#[derive(Debug)]
pub(crate) struct ClusterHealth {
    ejected: AtomicU32,
    next_sweep: AtomicU64,
}

impl ClusterHealth {
    pub(crate) fn new(first_sweep: u64) -> Self {
        ClusterHealth {
            ejected: AtomicU32::new(0),
            next_sweep: AtomicU64::new(first_sweep),
        }
    }

    pub(crate) fn ejected(&self) -> u32 {
        self.ejected.load(Ordering::Relaxed)
    }

    /// After a reload the endpoint set may differ: recount from the endpoints themselves.
    pub(crate) fn recount<'e>(&self, endpoints: impl Iterator<Item = &'e EndpointHealth>) {
        let ejected = endpoints.filter(|e| e.is_ejected()).count();
        self.ejected.store(
            u32::try_from(ejected).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Whether picks must ignore ejections (Envoy's panic routing): fewer than `minHealthPercent`
/// of the endpoints are healthy, or none is (see `EngineSettings::panic_when_all_ejected`).
pub(crate) fn in_panic(
    min_health_percent: u32,
    total: usize,
    ejected: u32,
    when_all_ejected: bool,
) -> bool {
    let total = total as u64;
    let healthy = total.saturating_sub(u64::from(ejected));
    (when_all_ejected && healthy == 0 && total > 0)
        || healthy * 100 < u64::from(min_health_percent) * total
}

/// Feeds one observation into an endpoint's counters and ejects it if a threshold is reached.
pub(crate) fn record(
    policy: &OutlierPolicy,
    cluster: &ClusterHealth,
    endpoint: &EndpointHealth,
    total: usize,
    observation: Observation,
    now: u64,
    metrics: &EngineMetrics,
) {
    let config = &policy.config;
    let status = match (observation, config.split_external_local_origin_errors) {
        (Observation::Status(status), true) => {
            endpoint.consecutive_local.store(0, Ordering::Relaxed);
            status
        }
        (Observation::Status(status), false) => status,
        (Observation::LocalFailure | Observation::LocalTimeout, true) => {
            let n = endpoint.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1;
            if config.consecutive_local_origin_failures > 0
                && n >= config.consecutive_local_origin_failures
            {
                endpoint.consecutive_local.store(0, Ordering::Relaxed);
                eject(policy, cluster, endpoint, total, now, metrics);
            }
            return;
        }
        (Observation::LocalFailure, false) => 503,
        (Observation::LocalTimeout, false) => 504,
    };
    if !(500..=599).contains(&status) {
        endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
        return;
    }
    if let Some(threshold) = config.consecutive_gateway_errors.filter(|&t| t > 0) {
        if matches!(status, 502..=504) {
            let n = endpoint.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= threshold {
                endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
                eject(policy, cluster, endpoint, total, now, metrics);
            }
        } else {
            endpoint.consecutive_gateway.store(0, Ordering::Relaxed);
        }
    }
    let n = endpoint.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
    if config.consecutive_5xx_errors > 0 && n >= config.consecutive_5xx_errors {
        endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        eject(policy, cluster, endpoint, total, now, metrics);
    }
}

fn eject(
    policy: &OutlierPolicy,
    cluster: &ClusterHealth,
    endpoint: &EndpointHealth,
    total: usize,
    now: u64,
    metrics: &EngineMetrics,
) {
    if endpoint.is_ejected() {
        return;
    }
    let max_percent = u64::from(policy.config.max_ejection_percent.min(100));
    let total = total as u64;
    let admitted = cluster
        .ejected
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |ejected| {
            ((u64::from(ejected) + 1) * 100 <= max_percent * total).then_some(ejected + 1)
        })
        .is_ok();
    if !admitted {
        EngineMetrics::inc(&metrics.ejections_overflow);
        return;
    }
    if endpoint
        .ejected_at
        .compare_exchange(NOT_EJECTED, now, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        // Another task ejected it first; give back the slot we took.
        cluster.ejected.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    // Envoy grows the backoff only while base × backoff is below the cap.
    let _ = endpoint
        .multiplier
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
            (policy.base.saturating_mul(u64::from(m)) < policy.max_ejection).then_some(m + 1)
        });
    EngineMetrics::inc(&metrics.ejections);
}

/// Runs every interval tick up to `now` that has not run yet (see the module docs).
pub(crate) fn sweep<'e>(
    policy: &OutlierPolicy,
    cluster: &ClusterHealth,
    endpoints: impl Iterator<Item = &'e EndpointHealth>,
    now: u64,
    metrics: &EngineMetrics,
) {
    let interval = policy.interval;
    let first_tick = cluster.next_sweep.load(Ordering::Acquire);
    if now < first_tick {
        return;
    }
    let last_tick = first_tick + (now - first_tick) / interval * interval;
    if cluster
        .next_sweep
        .compare_exchange(
            first_tick,
            last_tick + interval,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return; // another task is sweeping these ticks
    }
    for endpoint in endpoints {
        sweep_endpoint(policy, cluster, endpoint, first_tick, last_tick, metrics);
    }
}

fn sweep_endpoint(
    policy: &OutlierPolicy,
    cluster: &ClusterHealth,
    endpoint: &EndpointHealth,
    first_tick: u64,
    last_tick: u64,
    metrics: &EngineMetrics,
) {
    let interval = policy.interval;
    let mut healthy_from = first_tick;
    let ejected_at = endpoint.ejected_at.load(Ordering::Acquire);
    if ejected_at != NOT_EJECTED {
        let multiplier = endpoint.multiplier.load(Ordering::Relaxed);
        let due = ejected_at.saturating_add(policy.ejection_time(multiplier));
        let back_at = if due <= first_tick {
            first_tick
        } else {
            first_tick.saturating_add((due - first_tick).div_ceil(interval) * interval)
        };
        if back_at > last_tick {
            return;
        }
        if endpoint
            .ejected_at
            .compare_exchange(ejected_at, NOT_EJECTED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let _ = cluster
                .ejected
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |e| {
                    Some(e.saturating_sub(1))
                });
            // As Envoy: start counting afresh, so a few errors right after return do not
            // re-eject because a counter was near its threshold.
            endpoint.reset_counters();
            EngineMetrics::inc(&metrics.unejections);
        }
        healthy_from = back_at + interval;
    }
    if healthy_from <= last_tick {
        let healthy_ticks =
            u32::try_from((last_tick - healthy_from) / interval + 1).unwrap_or(u32::MAX);
        let _ = endpoint
            .multiplier
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(m.saturating_sub(healthy_ticks))
            });
    }
}
