//! Destination clusters: the endpoints of one (service, port, subset) with their traffic policy
//! and live state, as Envoy's `outbound|port|subset|host` clusters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::balance::{self, Cursor, Tried};
use super::endpoint::{authority_of, ClusterEndpoint, EndpointState};
use super::error::EngineError;
use super::metrics::EngineMetrics;
use super::outlier::{self, ClusterHealth, Observation, OutlierPolicy};
use super::pool::{PoolCounters, PoolLimits};
use super::registry::{resolve_host_owned, Registry, Service};
use super::retry::BudgetState;
use crate::config::model::{DestinationRule, LoadBalancer, MeshConfig, TrafficPolicy};
use crate::identity::ServiceIdentity;

/// A cluster's identity across reloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClusterKey {
    pub(crate) host: Box<str>,
    pub(crate) port: u16,
    pub(crate) subset: Option<Box<str>>,
}

/// Cluster-wide live state; kept across reloads while the cluster exists.
#[derive(Debug)]
pub(crate) struct ClusterShared {
    pub(crate) pool: Arc<PoolCounters>,
    cursor: Cursor,
    health: ClusterHealth,
}

/// Where a request routed to a cluster goes, as telemetry names it. Shared parts only, so a
/// request can keep it after its plan is gone without copying a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The destination service; `None` when the host is not a service of the registry (an
    /// external host, or one whose `Service` is gone).
    pub service: Option<Arc<ServiceIdentity>>,
    /// The `DestinationRule` subset, if the route names one.
    pub subset: Option<Arc<str>>,
    /// `outbound|port|subset|host`, as Envoy names the cluster.
    pub cluster: Arc<str>,
}

#[derive(Debug)]
pub(crate) struct Cluster {
    /// The cluster's name and what it routes to, for logs and metrics.
    pub(crate) destination: Destination,
    pub(crate) endpoints: Box<[ClusterEndpoint]>,
    pub(crate) lb: LoadBalancer,
    pub(crate) limits: PoolLimits,
    outlier: Option<OutlierPolicy>,
    pub(crate) shared: Arc<ClusterShared>,
    /// The destination service's retry budget (shared by all its clusters).
    pub(crate) budget: Arc<BudgetState>,
}

impl Cluster {
    /// Runs any outlier sweep that is due.
    pub(crate) fn sweep(&self, now: u64, metrics: &EngineMetrics) {
        if let Some(policy) = &self.outlier {
            let endpoints = self.endpoints.iter().map(|e| &e.state.health);
            outlier::sweep(policy, &self.shared.health, endpoints, now, metrics);
        }
    }

    /// Picks an endpoint for a try (see `balance::pick`), in panic mode when too few endpoints
    /// are healthy.
    pub(crate) fn pick(
        &self,
        rng: &mut fastrand::Rng,
        tried: &Tried,
        panic_when_all_ejected: bool,
        now: u64,
        metrics: &EngineMetrics,
    ) -> Result<u32, EngineError> {
        self.sweep(now, metrics);
        let panic = self.outlier.as_ref().is_some_and(|policy| {
            outlier::in_panic(
                policy.min_health_percent(),
                self.endpoints.len(),
                self.shared.health.ejected(),
                panic_when_all_ejected,
            )
        });
        if panic {
            EngineMetrics::inc(&metrics.panic_routing);
        }
        let picked = balance::pick(
            self.lb,
            &self.endpoints,
            &self.shared.cursor,
            rng,
            tried,
            panic,
        );
        picked.ok_or_else(|| {
            EngineMetrics::inc(&metrics.no_healthy_upstream);
            EngineError::NoHealthyUpstream
        })
    }

    /// Feeds a try's outcome to outlier detection.
    pub(crate) fn observe(
        &self,
        endpoint: u32,
        observation: Observation,
        now: u64,
        metrics: &EngineMetrics,
    ) {
        let (Some(policy), Some(endpoint)) = (&self.outlier, self.endpoints.get(endpoint as usize))
        else {
            return;
        };
        self.sweep(now, metrics);
        let total = self.endpoints.len();
        outlier::record(
            policy,
            &self.shared.health,
            &endpoint.state.health,
            total,
            observation,
            now,
            metrics,
        );
    }

    /// Endpoints currently ejected (for tests and the admin page).
    /// Each endpoint and, if ejected, the tick its ejection ends at the earliest.
    pub(crate) fn health(&self) -> impl Iterator<Item = (SocketAddr, Option<u64>)> + '_ {
        self.endpoints.iter().map(|e| {
            let until = self
                .outlier
                .as_ref()
                .and_then(|policy| e.state.health.ejected_until(policy));
            (e.addr, until)
        })
    }

    pub(crate) fn ejected(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .filter(|e| e.state.health.is_ejected())
            .map(|e| e.addr)
            .collect()
    }
}

/// Which cluster a destination uses, by the port the request arrived on: a destination without
/// `port` on a multi-port service follows the request's port (as a sidecar listener does).
#[derive(Clone, Debug)]
pub(crate) struct Target {
    by_port: Box<[(u16, u32)]>,
}

impl Target {
    /// The cluster for a request on `port`; the first one when no port matches.
    pub(crate) fn cluster(&self, port: u16) -> u32 {
        self.by_port
            .iter()
            .find(|(p, _)| *p == port)
            .or_else(|| self.by_port.first())
            .map_or(0, |(_, c)| *c)
    }
}

/// Live state of a previous snapshot, to carry over into the next one.
#[derive(Default)]
pub(crate) struct Carried {
    pub(crate) clusters: HashMap<ClusterKey, Arc<ClusterShared>>,
    pub(crate) endpoints: HashMap<(ClusterKey, SocketAddr), Arc<EndpointState>>,
    pub(crate) budgets: HashMap<Box<str>, Arc<BudgetState>>,
}

impl Carried {
    pub(crate) fn from_clusters(keys: &[ClusterKey], clusters: &[Cluster]) -> Carried {
        let mut carried = Carried::default();
        for (key, cluster) in keys.iter().zip(clusters) {
            carried
                .clusters
                .insert(key.clone(), Arc::clone(&cluster.shared));
            carried
                .budgets
                .insert(key.host.clone(), Arc::clone(&cluster.budget));
            for endpoint in cluster.endpoints.iter() {
                carried
                    .endpoints
                    .insert((key.clone(), endpoint.addr), Arc::clone(&endpoint.state));
            }
        }
        carried
    }
}

/// Builds clusters on demand while routes are compiled, one per distinct key.
pub(crate) struct ClusterSet<'a> {
    registry: &'a Registry,
    services: HashMap<String, usize>,
    /// Every DestinationRule per host, oldest first.
    rules: HashMap<String, Vec<&'a DestinationRule>>,
    carried: Carried,
    first_sweep: u64,
    index: HashMap<ClusterKey, u32>,
    pub(crate) keys: Vec<ClusterKey>,
    pub(crate) clusters: Vec<Cluster>,
}

impl<'a> ClusterSet<'a> {
    /// `now` is the current tick: a new cluster's first outlier sweep is one interval later.
    pub(crate) fn new(
        config: &'a MeshConfig,
        registry: &'a Registry,
        carried: Carried,
        now: u64,
    ) -> Self {
        let services = registry
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.fqdn().to_owned(), i))
            .collect();
        let mut rules: HashMap<String, Vec<&DestinationRule>> = HashMap::new();
        for rule in &config.destination_rules {
            let host = resolve_host_owned(&rule.host.name, &rule.host.namespace);
            rules.entry(host).or_default().push(rule);
        }
        ClusterSet {
            registry,
            services,
            rules,
            carried,
            first_sweep: now,
            index: HashMap::new(),
            keys: Vec::new(),
            clusters: Vec::new(),
        }
    }

    pub(crate) fn service(&self, fqdn: &str) -> Option<&'a Service> {
        let registry = self.registry;
        self.services.get(fqdn).map(|&i| &*registry.services[i])
    }

    /// The target for a destination `fqdn` with optional `port` and `subset`.
    pub(crate) fn target(&mut self, fqdn: &str, port: Option<u16>, subset: Option<&str>) -> Target {
        let ports: Vec<u16> = match (port, self.service(fqdn)) {
            (Some(port), _) => vec![port],
            (None, Some(service)) if !service.ports.is_empty() => {
                service.ports.iter().map(|p| p.port).collect()
            }
            (None, _) => vec![0],
        };
        let by_port = ports
            .into_iter()
            .map(|port| (port, self.cluster(fqdn, port, subset)))
            .collect();
        Target { by_port }
    }

    fn cluster(&mut self, fqdn: &str, port: u16, subset: Option<&str>) -> u32 {
        let key = ClusterKey {
            host: fqdn.into(),
            port,
            subset: subset.map(Into::into),
        };
        if let Some(&index) = self.index.get(&key) {
            return index;
        }
        let cluster = self.build(&key);
        let index = u32::try_from(self.clusters.len()).expect("fewer than 2^32 clusters");
        self.clusters.push(cluster);
        self.keys.push(key.clone());
        self.index.insert(key, index);
        index
    }

    fn build(&mut self, key: &ClusterKey) -> Cluster {
        // Several rules for one host merge as in Istio: the oldest rule's traffic policy,
        // subsets from all of them (the first definition of a name wins).
        let rules = self.rules.get(&*key.host).map_or(&[][..], Vec::as_slice);
        let subset = key.subset.as_deref().and_then(|name| {
            rules
                .iter()
                .find_map(|r| r.subsets.iter().find(|s| s.name == name))
        });
        let policy = effective_policy(
            rules.first().map(|r| &r.traffic_policy),
            subset.map(|s| &s.traffic_policy),
        );

        let mut endpoints = Vec::new();
        let subset_missing = key.subset.is_some() && subset.is_none();
        if let (Some(service), false) = (self.service(&key.host), subset_missing) {
            if let Some(port) = service.port_for(key.port) {
                for endpoint in &service.endpoints {
                    let selected = subset.is_none_or(|s| {
                        s.labels
                            .iter()
                            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
                    });
                    if selected {
                        let addr = SocketAddr::new(endpoint.ip, port.target_port);
                        let state = self
                            .carried
                            .endpoints
                            .remove(&(key.clone(), addr))
                            .unwrap_or_default();
                        endpoints.push(ClusterEndpoint {
                            addr,
                            authority: authority_of(addr),
                            workload: endpoint.workload.clone(),
                            state,
                        });
                    }
                }
            }
        }

        let outlier = policy.outlier_detection.as_ref().map(OutlierPolicy::new);
        let first_sweep = self.first_sweep + outlier.as_ref().map_or(0, OutlierPolicy::interval);
        let shared = self.carried.clusters.get(key).cloned().unwrap_or_else(|| {
            Arc::new(ClusterShared {
                pool: Arc::default(),
                cursor: Cursor::default(),
                health: ClusterHealth::new(first_sweep),
            })
        });
        shared
            .health
            .recount(endpoints.iter().map(|e| &e.state.health));
        let budget = self
            .carried
            .budgets
            .entry(key.host.clone())
            .or_insert_with(|| Arc::new(BudgetState::new()))
            .clone();
        let destination = Destination {
            service: self.service(&key.host).map(|s| Arc::clone(&s.identity)),
            subset: key.subset.as_deref().map(Arc::from),
            cluster: format!(
                "outbound|{}|{}|{}",
                key.port,
                key.subset.as_deref().unwrap_or(""),
                key.host
            )
            .into(),
        };
        Cluster {
            destination,
            endpoints: endpoints.into_boxed_slice(),
            lb: policy.load_balancer.unwrap_or_default(),
            limits: PoolLimits::new(policy.connection_pool.as_ref()),
            outlier,
            shared,
            budget,
        }
    }
}

/// Istio's override rule: each section a subset sets replaces the host-level one.
fn effective_policy(host: Option<&TrafficPolicy>, subset: Option<&TrafficPolicy>) -> TrafficPolicy {
    let host = host.cloned().unwrap_or_default();
    let Some(subset) = subset else {
        return host;
    };
    TrafficPolicy {
        load_balancer: subset.load_balancer.or(host.load_balancer),
        connection_pool: subset.connection_pool.clone().or(host.connection_pool),
        outlier_detection: subset.outlier_detection.clone().or(host.outlier_detection),
    }
}
