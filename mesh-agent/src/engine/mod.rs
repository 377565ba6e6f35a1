//! The L7 engine: pure per-request decisions (route, split, balance, retry, outlier, pool,
//! fault, mirror). No sockets, no kernel, no I/O.
//!
//! - **Clock**: every call that depends on time takes `now: Instant` from the caller; there is
//!   no hidden clock, so tests are deterministic without sleeping.
//! - **Randomness**: each [`RequestPlan`] owns a `fastrand::Rng` seeded from
//!   [`EngineSettings::seed`] and a per-engine sequence number, so a test that routes requests
//!   in order sees the same choices every run. Only LEAST_REQUEST/RANDOM picks and backoff
//!   jitter are random; splits, faults and mirroring are exact (see `split`).
//! - **Snapshots**: [`Engine::new`] compiles config and registry into an immutable snapshot
//!   behind an `Arc`; per-endpoint and per-cluster state lives in atomics inside it, so many
//!   proxy tasks decide concurrently without locks. [`Engine::reload`] compiles a new snapshot
//!   and carries live state over (see its docs).
//!
//! The layers, in request order: route match → split (once per request, as Envoy's weighted
//! clusters) → retry loop { balance (outlier gate, panic routing) → pool admission } →
//! outcome feeds outlier detection and the retry decision.

mod balance;
mod clock;
mod cluster;
mod endpoint;
mod error;
mod fault;
mod gateway;
mod metrics;
mod mirror;
mod outlier;
mod plan;
mod pool;
mod redirect;
pub mod registry;
mod request;
mod retry;
mod rewrite;
mod routing;
mod settings;
mod snapshot;
mod split;

#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cluster::Destination;
pub use error::{Cause, EngineError, ResponseFlags, TryFailure};
pub use gateway::GatewayLabels;
pub use metrics::EngineMetrics;
pub use plan::{Attempt, MirrorTarget, RequestPlan, Verdict};
pub use pool::{ClusterId, ClusterPool, Permit, PoolLimits};
pub use redirect::LocalAnswer;
pub use registry::Registry;
pub use request::RequestInfo;
pub use retry::{Outcome, RetryBudget};
pub use settings::EngineSettings;

use crate::config::model::MeshConfig;
use clock::Epoch;
use routing::{UriMatched, VirtualHost};
use snapshot::{Lineage, Snapshot};

/// One cluster (`outbound|port|subset|host`) as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterHealth {
    pub cluster: String,
    pub endpoints: Vec<EndpointHealth>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointHealth {
    pub address: SocketAddr,
    /// `None`: healthy. Otherwise the least time left in its ejection (it returns at the
    /// first outlier sweep after).
    pub ejected_for: Option<Duration>,
}

/// The engine: a shareable handle to the current compiled snapshot. Cloning is an `Arc` clone.
#[derive(Clone, Debug)]
pub struct Engine {
    snap: Arc<Snapshot>,
}

impl Engine {
    /// Compiles `config` and `registry`. `now` starts the engine's clock (outlier sweeps run
    /// every `interval` from here).
    pub fn new(
        config: &MeshConfig,
        registry: &Registry,
        settings: EngineSettings,
        now: Instant,
    ) -> Engine {
        let lineage = Lineage {
            settings,
            epoch: Epoch::new(now),
            metrics: Arc::default(),
            seeds: Arc::new(AtomicU64::new(0)),
            previous: None,
        };
        Engine {
            snap: Arc::new(Snapshot::compile(config, registry, lineage, 0)),
        }
    }

    /// Compiles a new snapshot for changed config or endpoints, keeping live state where the
    /// same thing still exists: per-endpoint outlier state and load by (cluster, address),
    /// pool counters and sweep schedule by cluster (`host`, port, subset), retry budgets by
    /// service, and all metrics. Only what changed is built again (see `Snapshot::compile`):
    /// when only endpoints changed, routes and their split positions carry on; otherwise
    /// routes are compiled anew and split positions restart. Requests in flight keep the
    /// snapshot they were routed on.
    pub fn reload(&self, config: &MeshConfig, registry: &Registry, now: Instant) -> Engine {
        let settings = self.snap.settings.clone();
        let lineage = self.snap.lineage(settings);
        let ticks = self.snap.epoch.ticks(now);
        Engine {
            snap: Arc::new(Snapshot::compile(config, registry, lineage, ticks)),
        }
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.snap.settings
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.snap.metrics
    }

    /// The counters, shared by every snapshot reloaded from this engine (for the exporter).
    pub fn shared_metrics(&self) -> Arc<EngineMetrics> {
        Arc::clone(&self.snap.metrics)
    }

    /// Decides a request: virtual host by authority, first matching route (or the service's
    /// default route, unless a Gateway API route made the host exclusive), weighted
    /// destination, fault and mirror choices — or the route's own answer (see
    /// [`RequestPlan::local_answer`]). Errors with `NR` when nothing routes the request.
    pub fn route(&self, req: &RequestInfo<'_>, now: Instant) -> Result<RequestPlan, EngineError> {
        EngineMetrics::inc(&self.snap.metrics.requests);
        let Some((route_id, matched)) = self.match_route(req) else {
            EngineMetrics::inc(&self.snap.metrics.no_route);
            return Err(EngineError::NoRoute);
        };
        self.decide(route_id, matched, req, now)
    }

    /// Decides a request that came in through the ingress gateway's listener on `req.port`:
    /// routed by the rules bound to the served gateways with a server on that port (all served
    /// gateways if none names that port), tried in order until one routes it, each admitting
    /// only the hosts its servers name (see `gateway`). No service's default route applies:
    /// a host no gateway admits, or no route of it matches, is `NR`. `req.gateway` is ignored.
    pub fn route_ingress(
        &self,
        req: &RequestInfo<'_>,
        now: Instant,
    ) -> Result<RequestPlan, EngineError> {
        let snap = &self.snap;
        EngineMetrics::inc(&snap.metrics.requests);
        let mut req = *req;
        for gateway in snap.gateways.for_port(req.port) {
            req.gateway = Some(&gateway.name);
            let matched = gateway
                .table
                .lookup(req.authority, req.namespace)
                .and_then(|vhost| self.first_match(vhost, &req));
            if let Some((route_id, matched)) = matched {
                return self.decide(route_id, matched, &req, now);
            }
        }
        EngineMetrics::inc(&snap.metrics.no_route);
        Err(EngineError::NoRoute)
    }

    /// Decides an opaque TCP connection to a service (`authority` is `host:port` as a rule
    /// would name it): the service's default route, so its endpoints, load balancer, outlier
    /// detection and connect retries apply; HTTP matches, faults and mirroring do not.
    pub fn route_tcp(
        &self,
        authority: &str,
        namespace: &str,
        port: u16,
        now: Instant,
    ) -> Result<RequestPlan, EngineError> {
        let snap = &self.snap;
        let Some(route_id) = snap
            .table
            .lookup(authority, namespace)
            .and_then(|vhost| vhost.default)
        else {
            EngineMetrics::inc(&snap.metrics.no_route);
            return Err(EngineError::NoRoute);
        };
        self.plan(route_id, UriMatched::Whole, port, true, false, now)
    }

    /// The plan of an HTTP request that matched `route_id`: its own answer if the route has
    /// one, else the route's upstream plan.
    fn decide(
        &self,
        route_id: u32,
        matched: UriMatched,
        req: &RequestInfo<'_>,
        now: Instant,
    ) -> Result<RequestPlan, EngineError> {
        let snap = &self.snap;
        let Some(local) = &snap.routes[route_id as usize].local else {
            return self.plan(route_id, matched, req.port, req.replayable, true, now);
        };
        let answer = local.answer(req, matched);
        let counter = match answer {
            LocalAnswer::Redirect { .. } => &snap.metrics.redirects,
            LocalAnswer::Direct { .. } => &snap.metrics.direct_responses,
        };
        EngineMetrics::inc(counter);
        Ok(RequestPlan::local(Arc::clone(snap), route_id, answer))
    }

    fn plan(
        &self,
        route_id: u32,
        matched: UriMatched,
        port: u16,
        replayable: bool,
        http: bool,
        now: Instant,
    ) -> Result<RequestPlan, EngineError> {
        let snap = &self.snap;
        let metrics = &snap.metrics;
        let route = &snap.routes[route_id as usize];
        let destination = route.split.pick();
        let Some(dest) = route.destinations.get(destination) else {
            EngineMetrics::inc(&metrics.no_route);
            return Err(EngineError::NoRoute);
        };
        let cluster = dest.target.cluster(port);
        let chosen = &snap.clusters[cluster as usize];
        if !chosen.exists {
            // A subset or host named before it is defined: Envoy has no such cluster either.
            EngineMetrics::inc(&metrics.no_route);
            return Err(EngineError::ClusterNotFound);
        }
        chosen.budget.record_request(snap.epoch.ticks(now));

        let fault = match &route.fault {
            Some(fault) if http => fault.decide(),
            _ => Default::default(),
        };
        if fault.delay.is_some() {
            EngineMetrics::inc(&metrics.fault_delays);
        }
        if fault.abort.is_some() {
            EngineMetrics::inc(&metrics.fault_aborts);
        }
        let mirror = route
            .mirror
            .as_ref()
            .filter(|m| http && m.decide())
            .map(|m| m.target.cluster(port));
        if mirror.is_some() {
            EngineMetrics::inc(&metrics.mirrored);
        }
        let sequence = snap.seeds.fetch_add(1, Ordering::Relaxed);
        let rng = fastrand::Rng::with_seed(
            snap.settings.seed ^ sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        Ok(RequestPlan::new(
            Arc::clone(snap),
            route_id,
            destination as u16,
            cluster,
            matched,
            fault.delay,
            fault.abort,
            mirror,
            replayable,
            rng,
        ))
    }

    /// Decides a request sent to the service of `service_authority` if Gateway API routes
    /// claim that service on the request's port: their routes apply whatever the request's
    /// `Host` (GAMMA), and what none matches is `NR`. `None` when they do not claim it.
    pub fn route_claimed(
        &self,
        req: &RequestInfo<'_>,
        service_authority: &str,
        now: Instant,
    ) -> Option<Result<RequestPlan, EngineError>> {
        let table = &self.snap.table;
        if !table.any_exclusive {
            return None;
        }
        let vhost = table
            .lookup(service_authority, req.namespace)
            .filter(|vhost| vhost.exclusive.covers(req.port))?;
        EngineMetrics::inc(&self.snap.metrics.requests);
        Some(match self.first_match(vhost, req) {
            Some((route_id, matched)) => self.decide(route_id, matched, req, now),
            None => {
                EngineMetrics::inc(&self.snap.metrics.no_route);
                Err(EngineError::NoRoute)
            }
        })
    }

    fn match_route(&self, req: &RequestInfo<'_>) -> Option<(u32, UriMatched)> {
        let vhost = self.snap.table.lookup(req.authority, req.namespace)?;
        let default = vhost.default.filter(|_| !vhost.exclusive.covers(req.port));
        self.first_match(vhost, req)
            .or_else(|| default.map(|id| (id, UriMatched::Whole)))
    }

    /// The first of the virtual host's routes that matches the request.
    fn first_match(&self, vhost: &VirtualHost, req: &RequestInfo<'_>) -> Option<(u32, UriMatched)> {
        vhost.routes.iter().find_map(|&id| {
            let route = &self.snap.routes[id as usize];
            routing::route_matches(&route.matches, &route.gateways, req).map(|m| (id, m))
        })
    }

    /// Endpoints of a destination that outlier detection has ejected right now (for the admin
    /// page and tests). `host` is resolved like a rule's host in namespace `default`.
    pub fn ejected(&self, host: &str, port: u16, subset: Option<&str>) -> Vec<SocketAddr> {
        self.cluster(host, port, subset)
            .map(|c| c.ejected())
            .unwrap_or_default()
    }

    /// Every cluster's endpoints and their outlier state (for the admin API).
    pub fn endpoint_health(&self, now: Instant) -> Vec<ClusterHealth> {
        let snap = &self.snap;
        let ticks = snap.epoch.ticks(now);
        snap.clusters
            .iter()
            .map(|cluster| ClusterHealth {
                cluster: cluster.destination.cluster.to_string(),
                endpoints: cluster
                    .health()
                    .map(|(address, until)| EndpointHealth {
                        address,
                        ejected_for: until.map(|t| Duration::from_nanos(t.saturating_sub(ticks))),
                    })
                    .collect(),
            })
            .collect()
    }

    fn cluster(&self, host: &str, port: u16, subset: Option<&str>) -> Option<&cluster::Cluster> {
        let fqdn = registry::resolve_host_owned(host, "default");
        let snap = &self.snap;
        snap.cluster_keys
            .iter()
            .position(|k| *k.host == *fqdn && k.port == port && k.subset.as_deref() == subset)
            .map(|i| &*snap.clusters[i])
    }
}
