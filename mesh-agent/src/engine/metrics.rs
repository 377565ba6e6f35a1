//! Engine counters, as plain atomics the telemetry layer reads (it owns names and export).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every snapshot of one engine (they survive reloads).
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Requests that got a plan.
    pub requests: AtomicU64,
    /// Requests no route matched (`NR`).
    pub no_route: AtomicU64,
    /// Requests with no endpoint to send to (`UH`).
    pub no_healthy_upstream: AtomicU64,
    /// Endpoints ejected by outlier detection.
    pub ejections: AtomicU64,
    /// Ejections outlier detection wanted but `maxEjectionPercent` prevented.
    pub ejections_overflow: AtomicU64,
    /// Endpoints returned to service by an interval sweep.
    pub unejections: AtomicU64,
    /// Endpoint picks made in panic mode (too few healthy endpoints, so all were used).
    pub panic_routing: AtomicU64,
    /// Retries granted.
    pub retries: AtomicU64,
    /// Retries denied by the retry budget.
    pub retry_budget_exhausted: AtomicU64,
    /// Retries denied by `maxRetries` (concurrent retries).
    pub retry_overflow: AtomicU64,
    /// Attempts or connections refused by a connection-pool limit (`UO`).
    pub pool_overflow: AtomicU64,
    /// Requests aborted by fault injection (`FI`).
    pub fault_aborts: AtomicU64,
    /// Requests delayed by fault injection (`DI`).
    pub fault_delays: AtomicU64,
    /// Requests chosen for mirroring.
    pub mirrored: AtomicU64,
}

impl EngineMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter (relaxed; counters are monotonic and independent).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
