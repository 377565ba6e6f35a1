//! Connection-pool limits as admission control (Envoy's circuit breakers).
//!
//! Each limit is a counter with a ceiling. Taking a slot returns a [`Permit`] that gives it back
//! when dropped, so the proxy cannot leak a slot on any path (errors, cancellation, panics).
//! The counters are per destination cluster and shared by every snapshot (a reload changes the
//! limits in force, never the counts); they are their one home: the proxy's upstream pool takes
//! its connection and pending slots here, through [`ClusterPool`].
//!
//! Mapping (all per destination cluster, as Envoy's thresholds are):
//! - `http.http2MaxRequests` ⇒ concurrent attempts in flight (taken by `next_attempt`; over it
//!   the request fails at once with `UO`);
//! - `http.maxRetries` ⇒ concurrent retries (taken when a retry is granted, held until that
//!   retry's outcome is reported);
//! - `tcp.maxConnections` ⇒ open upstream connections ([`ClusterPool::try_connection`], held
//!   by the connection while it is open). At the limit an HTTP request waits for a connection;
//! - `http.http1MaxPendingRequests` ⇒ requests waiting for a connection
//!   ([`ClusterPool::try_pending`]); past it the request fails at once with `UO`;
//! - `http.maxRequestsPerConnection`, `tcp.connectTimeout`, idle timeouts ⇒ read by the
//!   proxy's connection pool from [`PoolLimits`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::endpoint::EndpointState;
use super::error::EngineError;
use super::metrics::EngineMetrics;
use crate::config::model::ConnectionPool;

/// A cluster's limits; absent settings are unlimited, as Istio's effective defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `None` ⇒ unlimited requests per connection.
    pub max_requests_per_connection: Option<u32>,
    pub connect_timeout: Duration,
    pub tcp_idle_timeout: Option<Duration>,
    pub http_idle_timeout: Option<Duration>,
}

impl PoolLimits {
    pub(crate) fn new(pool: Option<&ConnectionPool>) -> Self {
        let pool = pool.cloned().unwrap_or_default();
        let unlimited = |v: Option<u32>| v.unwrap_or(u32::MAX);
        PoolLimits {
            max_connections: unlimited(pool.tcp.max_connections),
            max_pending_requests: unlimited(pool.http.http1_max_pending_requests),
            max_requests: unlimited(pool.http.http2_max_requests),
            max_retries: unlimited(pool.http.max_retries),
            max_requests_per_connection: pool.http.max_requests_per_connection.filter(|&n| n > 0),
            connect_timeout: pool.tcp.connect_timeout,
            tcp_idle_timeout: pool.tcp.idle_timeout,
            http_idle_timeout: pool.http.idle_timeout,
        }
    }
}

/// Slots in use; shared across snapshots so a reload does not reset what is in flight.
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Connection,
    Pending,
    Request,
    Retry,
}

impl PoolCounters {
    fn counter(&self, slot: Slot) -> &AtomicU32 {
        match slot {
            Slot::Connection => &self.connections,
            Slot::Pending => &self.pending,
            Slot::Request => &self.requests,
            Slot::Retry => &self.retries,
        }
    }
}

/// A held slot of a pool limit; dropping it gives the slot back.
#[derive(Debug)]
#[must_use = "dropping a permit releases its slot at once"]
pub struct Permit {
    counters: Arc<PoolCounters>,
    slot: Slot,
    /// Request permits also count toward the endpoint's load (for LEAST_REQUEST).
    endpoint: Option<Arc<EndpointState>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counters
            .counter(self.slot)
            .fetch_sub(1, Ordering::AcqRel);
        if let Some(endpoint) = &self.endpoint {
            endpoint.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Takes a slot if the limit allows (the caller counts refusals in the metric it belongs to).
pub(crate) fn acquire(
    counters: &Arc<PoolCounters>,
    slot: Slot,
    limit: u32,
    endpoint: Option<&Arc<EndpointState>>,
) -> Result<Permit, EngineError> {
    let taken = counters
        .counter(slot)
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok();
    if !taken {
        return Err(EngineError::Overflow);
    }
    if let Some(endpoint) = endpoint {
        endpoint.active.fetch_add(1, Ordering::AcqRel);
    }
    Ok(Permit {
        counters: Arc::clone(counters),
        slot,
        endpoint: endpoint.cloned(),
    })
}

/// One destination cluster's pool as the proxy's upstream pool uses it: the limits of the
/// snapshot the request was routed on, and the cluster's counters.
#[derive(Clone, Copy, Debug)]
pub struct ClusterPool<'a> {
    pub(crate) limits: &'a PoolLimits,
    pub(crate) counters: &'a Arc<PoolCounters>,
    /// Refusals are counted engine-wide and for the destination service.
    pub(crate) overflows: [&'a AtomicU64; 2],
}

/// Which cluster pooled connections belong to: the same across snapshots for as long as the
/// cluster exists (holding it keeps its [`ClusterPool::key`] from being reused).
#[derive(Clone, Debug)]
pub struct ClusterId(
    #[expect(dead_code, reason = "held only to keep the key unique")] Arc<PoolCounters>,
);

impl<'a> ClusterPool<'a> {
    pub fn limits(&self) -> &'a PoolLimits {
        self.limits
    }

    /// The cluster as a map key: unique among the clusters alive, stable across snapshots.
    pub fn key(&self) -> usize {
        Arc::as_ptr(self.counters) as usize
    }

    pub fn id(&self) -> ClusterId {
        ClusterId(Arc::clone(self.counters))
    }

    /// A slot for one more open connection (`tcp.maxConnections`), if the cluster is below
    /// its limit. Hold it while the connection is open. `None` is not a refusal by itself: an
    /// HTTP request then waits for a connection (see [`Self::try_pending`]).
    pub fn try_connection(&self) -> Option<Permit> {
        acquire(
            self.counters,
            Slot::Connection,
            self.limits.max_connections,
            None,
        )
        .ok()
    }

    /// A connection slot even at the limit: Envoy's guarantee that an endpoint the balancer
    /// picked can have one connection, so its pool never waits on other pools' connections.
    pub fn connection_beyond_limit(&self) -> Permit {
        acquire(self.counters, Slot::Connection, u32::MAX, None)
            .expect("fewer than 2^32 connections")
    }

    /// A pending slot (`http1MaxPendingRequests`), held while a request waits for a connection
    /// (its own opening, or one coming back). Past the limit the request is refused: counted,
    /// and [`EngineError::Overflow`] (`UO`).
    pub fn try_pending(&self) -> Result<Permit, EngineError> {
        acquire(
            self.counters,
            Slot::Pending,
            self.limits.max_pending_requests,
            None,
        )
        .map_err(|_| self.overflowed())
    }

    /// Counts a refusal by a pool limit (an opaque TCP connection over `tcp.maxConnections`,
    /// say) and returns the error to answer it with.
    pub fn overflowed(&self) -> EngineError {
        for counter in self.overflows {
            EngineMetrics::inc(counter);
        }
        EngineError::Overflow
    }
}
