//! The engine's counters and their export. The data path only adds to atomics; the names, labels
//! and encoding live here too, registered by whoever runs the engine
//! ([`EngineMetrics::register`]) and read when `/metrics` is scraped.
//!
//! - `mesh_engine_events_total{event}`: every decision of the engine, counted globally;
//! - `mesh_outlier_ejections_total`, `mesh_retries_total`, `mesh_retry_budget_exhausted_total`,
//!   `mesh_pool_overflows_total`, `mesh_panic_routing_total`, each by `destination_service`
//!   (hosts that are not a service of the registry count as `unknown`). A service's series
//!   live as long as it has clusters, so they are bounded by the registry.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, MetricType},
    registry::Registry,
};

use crate::exposition::encode_counters;

/// Counters shared by every snapshot of one engine (they survive reloads).
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Requests that got a plan.
    pub requests: AtomicU64,
    /// Requests no route matched, or whose destination does not exist (yet) (`NR`).
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
    /// Requests answered with a redirect by their route (Gateway API `RequestRedirect`).
    pub redirects: AtomicU64,
    /// Requests answered by their route with a fixed status (a Gateway API rule without a
    /// valid backend: 500).
    pub direct_responses: AtomicU64,
    /// Requests chosen for mirroring.
    pub mirrored: AtomicU64,
    /// Mirrored copies not sent: no upstream connection was free at once, or too many copies
    /// were in flight (a copy never waits).
    pub mirror_dropped: AtomicU64,
    /// Per destination service, what happened to its requests.
    services: Mutex<HashMap<Arc<str>, Arc<ServiceEvents>>>,
}

/// One destination service's counters; its clusters hold them, so counting takes no lock.
#[derive(Debug, Default)]
pub(crate) struct ServiceEvents {
    pub(crate) ejections: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) retry_budget_exhausted: AtomicU64,
    pub(crate) pool_overflows: AtomicU64,
    pub(crate) panic_routing: AtomicU64,
}

impl EngineMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter (relaxed; counters are monotonic and independent).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Serves these counters from `registry` (the agent's `mesh` sub-registry).
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Export(Arc::clone(self))));
    }

    /// The counters of destination service `service` (its host), made on first use.
    pub(crate) fn service_events(&self, service: &str) -> Arc<ServiceEvents> {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(events) = services.get(service) {
            return Arc::clone(events);
        }
        let events = Arc::<ServiceEvents>::default();
        services.insert(service.into(), Arc::clone(&events));
        events
    }

    /// Forgets the services that are no longer destinations.
    pub(crate) fn keep_services(&self, services: &HashSet<&str>) {
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|service, _| services.contains(&**service));
    }

    /// The counters of one service, by name (for tests and the exporter).
    pub fn service_counts(&self, service: &str) -> Option<ServiceCounts> {
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services.get(service).map(|events| events.counts())
    }
}

/// A service's counters, each with the family it is exported in.
pub type ServiceCounts = [(&'static str, u64); 5];

impl ServiceEvents {
    fn counts(&self) -> ServiceCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("outlier_ejections", get(&self.ejections)),
            ("retries", get(&self.retries)),
            ("retry_budget_exhausted", get(&self.retry_budget_exhausted)),
            ("pool_overflows", get(&self.pool_overflows)),
            ("panic_routing", get(&self.panic_routing)),
        ]
    }
}

/// Help texts of the per-service families, in the order of [`ServiceEvents::counts`].
const SERVICE_FAMILIES: [&str; 5] = [
    "Endpoints ejected by outlier detection",
    "Retry attempts",
    "Retries skipped because the retry budget was spent",
    "Requests refused by a connection-pool limit",
    "Requests balanced over all endpoints because too many were ejected",
];

struct Export(Arc<EngineMetrics>);

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineMetrics export")
    }
}

impl Collector for Export {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let engine = &self.0;
        let get = EngineMetrics::get;
        let events = [
            ("request", get(&engine.requests)),
            ("no_route", get(&engine.no_route)),
            ("no_healthy_upstream", get(&engine.no_healthy_upstream)),
            ("ejection", get(&engine.ejections)),
            ("ejection_overflow", get(&engine.ejections_overflow)),
            ("unejection", get(&engine.unejections)),
            ("panic_routing", get(&engine.panic_routing)),
            ("retry", get(&engine.retries)),
            (
                "retry_budget_exhausted",
                get(&engine.retry_budget_exhausted),
            ),
            ("retry_overflow", get(&engine.retry_overflow)),
            ("pool_overflow", get(&engine.pool_overflow)),
            ("fault_abort", get(&engine.fault_aborts)),
            ("fault_delay", get(&engine.fault_delays)),
            ("redirect", get(&engine.redirects)),
            ("direct_response", get(&engine.direct_responses)),
            ("mirrored", get(&engine.mirrored)),
            ("mirror_dropped", get(&engine.mirror_dropped)),
        ];
        encode_counters(
            &mut encoder,
            "engine_events",
            "Decisions of the L7 engine, by kind",
            "event",
            &events,
        )?;

        let services: Vec<(Arc<str>, ServiceCounts)> = engine
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(service, events)| (Arc::clone(service), events.counts()))
            .collect();
        for (index, help) in SERVICE_FAMILIES.iter().enumerate() {
            let Some((_, counts)) = services.first() else {
                break;
            };
            let name = counts[index].0;
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (service, counts) in &services {
                let labels = [("destination_service", &**service)];
                ConstCounter::new(counts[index].1).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition;

    #[test]
    fn counters_are_served_under_the_callers_prefix_and_read_at_scrape_time() {
        let engine = Arc::new(EngineMetrics::default());
        let mut registry = Registry::default();
        engine.register(registry.sub_registry_with_prefix("mesh"));
        let reviews = engine.service_events("reviews.default.svc.cluster.local");
        EngineMetrics::inc(&reviews.retries);
        engine.retries.fetch_add(4, Ordering::Relaxed);
        let (_, text) = exposition::render(&registry, None);
        assert!(
            text.contains("mesh_engine_events_total{event=\"retry\"} 4"),
            "{text}"
        );
        assert!(text.contains("mesh_engine_events_total{event=\"ejection\"} 0"));
        assert!(text.contains(
            "mesh_retries_total{destination_service=\"reviews.default.svc.cluster.local\"} 1"
        ));
        assert!(text.contains("mesh_outlier_ejections_total{destination_service="));

        // A service that is no longer a destination stops being served.
        engine.keep_services(&HashSet::new());
        let (_, text) = exposition::render(&registry, None);
        assert!(!text.contains("mesh_retries_total"), "{text}");
    }
}
